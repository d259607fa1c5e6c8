#!/usr/bin/env python3
"""Probe: does TMA multicast within thread-block clusters spare a decode lane the L2 traffic of a
prefill lane beside it?

The twenty-sixth session measured (bench-results/nexus-vs-chunked-h100.md, first section) that a
decode GEMM on 16-32 SMs takes 1.34-1.43x its time alone beside a compute-bound prefill GEMM on the
other SMs, 1.7-1.95x when the prefill's tiles load a third more bytes from L2 per FLOP, but only
1.07-1.10x beside a streaming read of the prefill's HBM bytes: the prefill's L2 operand traffic is
what decode waits behind. Clusters of 2 CTAs that share a tile's operand load half each and
multicast it to both, so L2 serves each byte once for two SMs. Before building that into the GEMM,
this probe asks whether it helps at all, without the GEMM:

- `stream`: decode's stand-in, a streaming read of a 1 GB region (three rotated, so nothing is in
  L2) on D CTAs, 64 KB of loads in flight per SM (as the read curve's kernel);
- `hammer`: the prefill's stand-in on the other SMs, clusters of 2 CTAs that pull 16 KB chunks of
  an 8 MB region (resident in L2) into a ring of shared memory by bulk copies (`cp.async.bulk`),
  both CTAs of a cluster the same chunk, as two CTAs sharing a weight tile would; `plain`: each CTA
  copies the chunk itself (L2 serves it twice), `multicast`: each copies half, to both CTAs
  (`.multicast::cluster`; L2 serves it once). The same clusters, ring and synchronization
  otherwise (each CTA frees a slot on both CTAs' `empty` barriers once its copy landed).

For D in 16 and 32: the stream's TB/s alone and beside each hammer, the hammer's bytes landed in
shared memory per second (TB/s) and what it read from L2 for them. Runs on the GPU machine with
CuPy (NVRTC), sm_90:

    python3 scripts/probe-l2-multicast.py > $OUT/l2-multicast.md
"""
import cupy as cp
import numpy as np

from probe_common import STREAM_SRC, launch_stream as stream_on, stream_kernel, timed

src = r'''
using u32 = unsigned;
using u64 = unsigned long long;

__device__ __forceinline__ u32 smem(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }
__device__ __forceinline__ void wait(u32 bar, u32 parity) {
  asm volatile("{\n .reg .pred p;\n W: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n @!p bra W;\n}\n"
               :: "r"(bar), "r"(parity) : "memory");
}

constexpr u32 CHUNK = 16384;  // bytes a cluster's CTAs each receive per step
constexpr int SLOTS = 8;      // 128 KB of ring: one CTA per SM beside the stream's 120 KB

// Clusters of 2 pull chunk (i * clusters + cluster) % chunks of `region` into slot i % SLOTS of
// both CTAs' rings, `steps` times. MULTICAST: CTA r copies half r of the chunk to both CTAs.
template <bool MULTICAST>
__device__ void hammer(const char* __restrict__ region, u32 chunks, u32 steps, u32* out) {
  extern __shared__ __align__(128) unsigned char ring[];
  __shared__ __align__(8) u64 full[SLOTS], empty[SLOTS];
  u32 rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(rank));
  const u32 cluster = blockIdx.x / 2, clusters = gridDim.x / 2;
  if (threadIdx.x == 0) {
    for (int s = 0; s < SLOTS; ++s) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem(&full[s])) : "memory");
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 2;" :: "r"(smem(&empty[s])) : "memory");
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
  if (threadIdx.x == 0) {
    const u32 base = smem(ring);
    for (u32 i = 0; i < steps + SLOTS; ++i) {
      if (i >= SLOTS) {
        // Retire step j: its bytes landed here; free its slot on both CTAs.
        const u32 j = i - SLOTS, s = j % SLOTS;
        wait(smem(&full[s]), (j / SLOTS) & 1);
        for (u32 r = 0; r < 2; ++r) {
          u32 remote;
          asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(smem(&empty[s])), "r"(r));
          asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];" :: "r"(remote) : "memory");
        }
      }
      if (i < steps) {
        const u32 s = i % SLOTS;
        if (i >= SLOTS) wait(smem(&empty[s]), ((i / SLOTS) - 1) & 1);
        const u32 bar = smem(&full[s]), dst = base + s * CHUNK;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(CHUNK) : "memory");
        const char* chunk = region + (u64)((i * clusters + cluster) % chunks) * CHUNK;
        if (MULTICAST) {
          const unsigned short both = 3;
          asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                       " [%0], [%1], %2, [%3], %4;"
                       :: "r"(dst + rank * (CHUNK / 2)), "l"(chunk + rank * (CHUNK / 2)), "r"(CHUNK / 2), "r"(bar), "h"(both)
                       : "memory");
        } else {
          asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                       :: "r"(dst), "l"(chunk), "r"(CHUNK), "r"(bar) : "memory");
        }
      }
    }
    if (steps == 0xffffffffu) out[0] = rank;  // never: keeps `out` an argument like the stream's
  }
  // No CTA leaves while its partner may still copy into its ring or arrive on its barriers.
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
}

extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(32, 1)
hammer_plain(const char* region, u32 chunks, u32 steps, u32* out) { hammer<false>(region, chunks, steps, out); }
extern "C" __global__ void __cluster_dims__(2, 1, 1) __launch_bounds__(32, 1)
hammer_multicast(const char* region, u32 chunks, u32 steps, u32* out) { hammer<true>(region, chunks, steps, out); }

extern "C" __global__ void spin(u64 ns) {
  u64 t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
'''

SLOT_BYTES, SLOTS = 16384, 8
RING = SLOT_BYTES * SLOTS
REGION = 8 << 20  # the hammer's chunks: resident in L2
NB = 1 << 30  # the stream's region, three of them rotated

module = cp.RawModule(code=src + STREAM_SRC, options=("-arch=sm_90a", "-std=c++17"))
hammers = {name: module.get_function(f"hammer_{name}") for name in ("plain", "multicast")}
stream, spin = stream_kernel(module), module.get_function("spin")
for kernel in hammers.values():
    kernel.max_dynamic_shared_size_bytes = RING
sms = cp.cuda.Device().attributes["MultiProcessorCount"]
region = cp.random.randint(0, 2**31, size=REGION // 4, dtype=cp.int32)
big = cp.random.randint(0, 2**31, size=3 * NB // 4, dtype=cp.int32)
out = cp.zeros(4, dtype=cp.uint32)
hs, st = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)


def launch_hammer(name, ctas, steps):
    hammers[name]((ctas,), (32,), (region, cp.uint32(REGION // SLOT_BYTES), cp.uint32(steps), out),
                  shared_mem=RING, stream=hs)


def launch_stream(ctas, rep):
    stream_on(stream, ctas, big.data.ptr + (rep % 3) * NB, NB, out, st)


def median(xs):
    return float(np.median(xs))


STEPS_ALONE = 2000
print(f"### Stream on D SMs beside a hammer on the rest (clusters of 2) — {cp.cuda.runtime.getDeviceProperties(0)['name'].decode()}\n")
print("| D | hammer | hammer CTAs | hammer TB/s into shared memory (alone) | its L2 reads TB/s | stream TB/s alone | beside | beside / alone |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for d in (16, 32):
    ctas = (sms - d - 4) // 2 * 2  # a few SMs of slack: clusters are placed within a GPC
    with st:
        alone = median([timed(st, lambda r=r: launch_stream(d, r)) for r in range(7)])
    for name in ("plain", "multicast"):
        with hs:
            t = median([timed(hs, lambda: launch_hammer(name, ctas, STEPS_ALONE)) for _ in range(5)])
        landed = ctas * STEPS_ALONE * SLOT_BYTES / t
        l2 = landed / (2 if name == "multicast" else 1)
        # The hammer long enough to outlast a stream run three times over.
        steps = int(3 * alone / t * STEPS_ALONE) + SLOTS
        beside = []
        for r in range(7):
            with hs:
                launch_hammer(name, ctas, steps)
            with st:
                spin((1,), (1,), (cp.uint64(20_000),), stream=st)
                beside.append(timed(st, lambda r=r: launch_stream(d, r)))
            hs.synchronize()
        b = median(beside)
        print(f"| {d} | {name} | {ctas} | {landed / 1e12:.2f} | {l2 / 1e12:.2f} | {NB / alone / 1e12:.2f} | "
              f"{NB / b / 1e12:.2f} | {b / alone:.2f} |", flush=True)
