// Streaming read: the HBM read bandwidth a CTA budget reaches, at two depths.
//
// One persistent CTA of 1024 threads per SM (the launcher reserves more than half of the SM's
// shared memory, see common.cuh), each thread keeping DEPTH 16-byte loads in flight:
// * stream_read (4 deep, 64 KB per SM, the depth of the probe in KERNEL-NOTES.md) is what the
//   planners' bandwidth curve is measured with (nexus-kernels/src/gpu/model.rs): on few SMs it
//   reads about what our streaming kernels reach, so it predicts them;
// * stream_read_deep (12 deep, 192 KB per SM) is what the SMs can read at all, the limit the
//   benchmarks compare kernels with: on an H100, 64 KB in flight read 117 GB/s per SM on 16 SMs
//   and 192 KB 165 (scripts/probe-stream-depth.py), where cuBLAS's M = 1 GEMM took 126.
// The buffer is dealt out in chunks of 1024 16-byte vectors (16 KB, one per thread), round-robin
// over the CTAs; each CTA writes the XOR of the 32-bit words it read, so the loads cannot be
// optimized away and a test can check that every word was read once.
#include "common.cuh"

namespace {

constexpr int THREADS = 1024;

__device__ __forceinline__ uint32_t xor_words(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

__device__ __forceinline__ uint32_t warp_xor(uint32_t v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v ^= __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

}  // namespace

// `data`: `n` 16-byte vectors. CTA c reads chunks c, c + gridDim.x, c + 2·gridDim.x, ... (chunk j is
// vectors [j·THREADS, (j + 1)·THREADS)) and writes the XOR of their words to `checksums[c]` (0 for a
// CTA without a chunk).
// DEPTH: the loads each thread issues before it uses any of them.
template <int DEPTH>
__device__ __forceinline__ void stream_read_body(const uint4* __restrict__ data, unsigned long long n,
                                                 uint32_t* __restrict__ checksums) {
    nexus::follow_previous_kernel();
    const unsigned long long stride = (unsigned long long)gridDim.x * THREADS;
    unsigned long long i = (unsigned long long)blockIdx.x * THREADS + threadIdx.x;
    uint32_t acc = 0;
    // Whole groups of DEPTH strides: all loads first, then their use, so DEPTH are in flight.
    for (; i + (DEPTH - 1) * stride < n; i += DEPTH * stride) {
        uint4 v[DEPTH];
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) v[d] = data[i + d * stride];
#pragma unroll
        for (int d = 0; d < DEPTH; ++d) acc ^= xor_words(v[d]);
    }
    // The last strides, fewer than DEPTH.
    for (; i < n; i += stride) acc ^= xor_words(data[i]);

    __shared__ uint32_t warp_acc[THREADS / 32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    acc = warp_xor(acc);
    if (lane == 0) warp_acc[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        acc = warp_xor(warp_acc[lane]);
        if (lane == 0) checksums[blockIdx.x] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    stream_read(const uint4* __restrict__ data, unsigned long long n, uint32_t* __restrict__ checksums) {
    stream_read_body<4>(data, n, checksums);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    stream_read_deep(const uint4* __restrict__ data, unsigned long long n, uint32_t* __restrict__ checksums) {
    stream_read_body<12>(data, n, checksums);
}
