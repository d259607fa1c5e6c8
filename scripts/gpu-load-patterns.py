#!/usr/bin/env python3
"""Per-SM read rate of three load patterns on the GPU machine (CuPy): 512 threads per CTA, one CTA
per SM (a shared-memory reservation), each thread with 8 loads of 16 bytes in flight, over a 2 GB
buffer of random words viewed as rows of 4 KB or 16 KB. A warp reads 16 rows x 256 bytes per step:
contiguously (the streaming read's pattern), 8 rows x 64 bytes per instruction (lanes g = lane / 4
on rows, q = lane % 4 along them: an mma.sync fragment's), or 4 rows x 128 bytes (a whole line per
row). Prints a markdown table (bench-results/gemm-h200.md, eighth round).

    python3 scripts/gpu-load-patterns.py
"""
import cupy as cp
src = r'''
extern "C" __global__ void probe(const uint4* __restrict__ p, long long rows, int row_vecs, int pattern, unsigned* out) {
  extern __shared__ int smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  // A warp reads a "block" of 16 rows x 256 B (16 vectors of each row) per step.
  // pattern 0: contiguous 4 KB per warp (probe-like)
  // pattern 1: 8 rows x 64 B per instruction (lane g=lane/4 row, q=lane%4 vector), 8 instructions
  // pattern 2: 4 rows x 128 B per instruction (lane/8 row, lane%8 vector), 8 instructions
  unsigned acc = 0;
  long long blocks_per_rowband = row_vecs / 16;     // 256 B segments per row
  long long bands = rows / 16;
  long long total = bands * blocks_per_rowband;
  long long stride = (long long)gridDim.x * 16;
  for (long long blk = (long long)blockIdx.x * 16 + warp; blk < total; blk += stride) {
    long long band = blk / blocks_per_rowband, seg = blk % blocks_per_rowband;
    uint4 v[8];
    #pragma unroll
    for (int i = 0; i < 8; ++i) {
      long long idx;
      if (pattern == 0) idx = blk * 256 + i * 32 + lane;  // contiguous (not the same bytes, same amount)
      else if (pattern == 1) { int r = (lane >> 2) + 8 * (i & 1); int c = (i >> 1) * 4 + (lane & 3); idx = (band * 16 + r) * row_vecs + seg * 16 + c; }
      else { int r = (lane >> 3) + 4 * (i & 3); int c = (i >> 2) * 8 + (lane & 7); idx = (band * 16 + r) * row_vecs + seg * 16 + c; }
      v[i] = p[idx];
    }
    #pragma unroll
    for (int i = 0; i < 8; ++i) acc ^= v[i].x ^ v[i].y ^ v[i].z ^ v[i].w;
  }
  if (acc == 0x12345678) { smem[0] = acc; out[0] = acc; }
}
'''
mod = cp.RawModule(code=src); f = mod.get_function("probe")
smem = 120 * 1024; f.max_dynamic_shared_size_bytes = smem
nbytes = 2 << 30; buf = cp.random.randint(0, 2**31, size=nbytes // 4, dtype=cp.int32)
out = cp.zeros(4, dtype=cp.uint32)
print("| row bytes | CTAs | contiguous GB/s/SM | 8 rows x 64 B GB/s/SM | 4 rows x 128 B GB/s/SM |")
print("| --- | --- | --- | --- | --- |")
for row in (4096, 16384):
    row_vecs = row // 16; rows = nbytes // row
    for ctas in (16, 32, 64, 132):
        res = []
        for pat in (0, 1, 2):
            args = (buf, cp.int64(rows), cp.int32(row_vecs), cp.int32(pat), out)
            f((ctas,), (512,), args, shared_mem=smem); cp.cuda.Device().synchronize()
            e0, e1 = cp.cuda.Event(), cp.cuda.Event()
            e0.record()
            for _ in range(3): f((ctas,), (512,), args, shared_mem=smem)
            e1.record(); e1.synchronize()
            t = cp.cuda.get_elapsed_time(e0, e1) / 1e3 / 3
            res.append(nbytes / t / ctas / 1e9)
        print(f"| {row} | {ctas} | " + " | ".join(f"{x:.1f}" for x in res) + " |")
