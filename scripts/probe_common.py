"""What the probes (scripts/probe-*.py) share: the decode lane's streaming read and CUDA-event
timing, for CuPy on the GPU machine."""
import glob
import os
import site
import tempfile

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
# The streaming read D deep: CTA c reads chunks c, c + grid, ... of 1024 x D 16-byte vectors
# (1024 threads, D loads each in flight; `cuda/stream_read.cu`'s kernel at D = 4 and 12). A
# template for NVRTC's name expressions, `regs<D>`.
REGS_SRC = r'''
template <int D>
__global__ void __launch_bounds__(1024, 1)
regs(const uint4* __restrict__ data, unsigned long long chunks, unsigned* out) {
    unsigned acc = 0;
    for (unsigned long long j = blockIdx.x; j < chunks; j += gridDim.x) {
        const uint4* c = data + j * 1024 * D;
        uint4 v[D];
#pragma unroll
        for (int i = 0; i < D; ++i) v[i] = c[threadIdx.x + i * 1024];
#pragma unroll
        for (int i = 0; i < D; ++i) acc ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
    }
    if (acc == 0x12345678u) out[0] = acc;
}
'''
STREAM_SMEM = 120 * 1024
STREAM_CHUNK = 1024 * 64


def stream_kernel(module):
    """STREAM_SRC's kernel of `module`, allowed its shared memory (once, outside timed launches)."""
    kernel = module.get_function("stream")
    kernel.max_dynamic_shared_size_bytes = STREAM_SMEM
    return kernel


def launch_stream(kernel, ctas, base, n_bytes, out, on):
    """Reads `n_bytes` at device address `base` on `ctas` CTAs of `kernel` (from stream_kernel)."""
    kernel((ctas,), (1024,), (base, cp.uint64(n_bytes // STREAM_CHUNK), out), shared_mem=STREAM_SMEM, stream=on)


def timed(on, launch):
    """Seconds between events around `launch()` on stream `on`."""
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record(on)
    launch()
    end.record(on)
    end.synchronize()
    return cp.cuda.get_elapsed_time(start, end) * 1e-3


# NVRTC has no <stdint.h>, which cuda/common.cuh includes: a stand-in with the types it uses.
STDINT_SHIM = """#pragma once
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
"""


def nexus_header_options():
    """NVRTC options under which a probe can include cuda/*.cuh (run from the repository root):
    cuda/ and the CUDA headers (cuda_bf16.h) on the include path, the stdint shim, and functions
    without an execution space (the headers' constexpr helpers) compiled for the device."""
    shim = tempfile.mkdtemp(prefix="nexus-nvrtc-")
    with open(os.path.join(shim, "stdint.h"), "w") as f:
        f.write(STDINT_SHIM)
    roots = [os.environ.get("CUDA_PATH", "/usr/local/cuda") + "/include"]
    for packages in site.getsitepackages():
        roots += glob.glob(os.path.join(packages, "nvidia/cu13/include"))
        roots += glob.glob(os.path.join(packages, "nvidia/cuda_runtime/include"))
    found = [r for r in roots if os.path.exists(os.path.join(r, "cuda_bf16.h"))]
    return ("-Icuda", *(f"-I{r}" for r in found[:1]), f"-I{shim}", "-default-device")
