#!/usr/bin/env python3
"""Probe: per-SM streaming bandwidth when each CTA also prefetches its own next chunks into L2
(`cp.async.bulk.prefetch.L2`) `ahead` chunks before it loads them. Asks whether L2 prefetch can
carry more bytes in flight per SM than the loads themselves, i.e. lift a budgeted decode kernel
above the streaming-read curve. Runs on the GPU machine with CuPy (compiles with NVRTC):

    python3 scripts/probe-l2-prefetch.py > $OUT/l2-prefetch.md

One CTA of 1024 (or 256) threads per SM, 4 loads of 16 bytes in flight per thread, CTA c reading
chunks c, c + grid, ... of a 1 GB region (three regions rotated, so nothing is in L2), timed with
CUDA events after a 300 us spin that hides Python's launch overhead; TB/s = bytes / median time.
Results: bench-results/l2-prefetch-h200.md.
"""
import cupy as cp, numpy as np
src = r'''
template<int T, int DEPTH> __device__ void body(const char* __restrict__ d, unsigned long long nchunks, int ahead, unsigned* out){
  constexpr unsigned CHUNK = T * 16 * DEPTH;
  unsigned acc = 0;
  const unsigned long long G = gridDim.x;
  if (threadIdx.x == 0) for (int a = 0; a < ahead; ++a) { unsigned long long j = blockIdx.x + a * G;
      if (j < nchunks) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(d + j * CHUNK), "r"(CHUNK) : "memory"); }
  for (unsigned long long j = blockIdx.x; j < nchunks; j += G) {
    if (threadIdx.x == 0 && ahead) { unsigned long long p = j + (unsigned long long)ahead * G;
      if (p < nchunks) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(d + p * CHUNK), "r"(CHUNK) : "memory"); }
    const uint4* c = reinterpret_cast<const uint4*>(d + j * CHUNK);
    uint4 v[DEPTH];
    #pragma unroll
    for (int k = 0; k < DEPTH; ++k) v[k] = c[threadIdx.x + k * T];
    #pragma unroll
    for (int k = 0; k < DEPTH; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  }
  if (acc == 0x12345678u) out[0] = acc;
}
extern "C" __global__ void __launch_bounds__(1024,1) rd1024(const char* d, unsigned long long n, int ahead, unsigned* out){ body<1024,4>(d, n, ahead, out); }
extern "C" __global__ void __launch_bounds__(256,1) rd256(const char* d, unsigned long long n, int ahead, unsigned* out){ body<256,4>(d, n, ahead, out); }
extern "C" __global__ void spin(unsigned long long ns){
  unsigned long long t0; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  unsigned long long t=t0; while(t-t0<ns){ asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } }
'''
m = cp.RawModule(code=src, options=("-arch=sm_90a", "-std=c++17"))
k1024, k256, spin = m.get_function("rd1024"), m.get_function("rd256"), m.get_function("spin")
for k in (k1024, k256): k.max_dynamic_shared_size_bytes = 120 * 1024
big = cp.random.randint(0, 2**31, size=(4 << 30) // 4, dtype=cp.int32)
out = cp.zeros(4, dtype=cp.uint32)
st = cp.cuda.Stream(non_blocking=True)
NB = 1 << 30
def run(kern, threads, sms, ahead, reps=9):
    chunk = threads * 64
    ts = []
    with st:
        for r in range(reps):
            base = big.data.ptr + (r % 3) * NB
            spin((1,), (1,), (cp.uint64(300_000),), stream=st)
            s = cp.cuda.Event(); e = cp.cuda.Event(); s.record(st)
            kern((sms,), (threads,), (base, cp.uint64(NB // chunk), cp.int32(ahead), out), shared_mem=100 * 1024, stream=st)
            e.record(st); e.synchronize(); ts.append(cp.cuda.get_elapsed_time(s, e) * 1e3)
    return NB / float(np.median(ts)) / 1e6
smss = (8, 16, 24, 32, 48, 64, 96, 132)
for name, kern, threads in (("1024 threads x 4 x 16 B (64 KB in flight)", k1024, 1024), ("256 threads x 4 x 16 B (16 KB in flight)", k256, 256)):
    print(f"\n### {name}: TB/s over 1 GB, chunks of {threads*64//1024} KB\n")
    print("| prefetch ahead (chunks) | " + " | ".join(f"{s} SMs" for s in smss) + " |")
    print("| --- |" + " --- |" * len(smss))
    for ahead in (0, 1, 2, 4, 8, 16, 32):
        row = [run(kern, threads, s, ahead) for s in smss]
        print(f"| {ahead} | " + " | ".join(f"{x:.2f}" for x in row) + " |", flush=True)
