"""What the probes (scripts/probe-*.py) share: the decode lane's streaming read and CUDA-event
timing, for CuPy on the GPU machine."""
import cupy as cp

# The streaming read, the decode lane's stand-in: CTA c reads 64 KB chunks c, c + grid, ... of a
# region (1024 threads x 4 x 16 B in flight), launched with STREAM_SMEM of shared memory so that it
# is the only CTA on its SM.
STREAM_SRC = r'''
extern "C" __global__ void __launch_bounds__(1024, 1)
stream(const char* __restrict__ d, unsigned long long chunks, unsigned* out) {
  constexpr unsigned T = 1024, DEPTH = 4, BYTES = T * 16 * DEPTH;
  unsigned acc = 0;
  for (unsigned long long j = blockIdx.x; j < chunks; j += gridDim.x) {
    const uint4* c = reinterpret_cast<const uint4*>(d + j * BYTES);
    uint4 v[DEPTH];
#pragma unroll
    for (unsigned k = 0; k < DEPTH; ++k) v[k] = c[threadIdx.x + k * T];
#pragma unroll
    for (unsigned k = 0; k < DEPTH; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  }
  if (acc == 0x12345678u) out[0] = acc;
}
'''
STREAM_SMEM = 120 * 1024
STREAM_CHUNK = 1024 * 64


def launch_stream(kernel, ctas, base, n_bytes, out, on):
    """Reads `n_bytes` at device address `base` on `ctas` CTAs of `kernel` (STREAM_SRC's)."""
    kernel.max_dynamic_shared_size_bytes = STREAM_SMEM
    kernel((ctas,), (1024,), (base, cp.uint64(n_bytes // STREAM_CHUNK), out), shared_mem=STREAM_SMEM, stream=on)


def timed(on, launch):
    """Seconds between events around `launch()` on stream `on`."""
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(on)
    launch()
    end.record(on)
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) * 1e-3
