#!/usr/bin/env python3
"""Probe: how many bytes in flight per SM does the streaming-read curve need at small budgets?

The curve every bench and planner divides by comes from `cuda/stream_read.cu`: one CTA of 1024
threads per SM, each keeping 4 16-byte loads in flight (64 KB per SM). On an H100 it reads
0.97 TB/s on 8 SMs (121 GB/s per SM) but 1.73 on 16 (108 per SM), and cuBLAS M = 1 with
`cublasSetSmCountTarget(16)` ran 2.01 TB/s on Llama-3.1-8B's gate/up weight (126 per SM,
`gemm-decode-h100/ring-227k-s30.md.gz`): above the "limit". By Little's law, 64 KB in flight at
~0.7 us of loaded latency is ~94 GB/s, so the probe may be short of loads in flight rather than
at what an SM can pull. This probe reads the same data with more in flight:

- `regs<D>`: the curve's kernel with D loads per thread (1024 threads: 16 KB per D);
- `bulk<S, C>`: one thread keeps S bulk copies (`cp.async.bulk`, C KB each) into a ring of shared
  memory in flight, as the GEMMs' producer does (S x C KB per SM).

Each at budgets 1, 8, 16, ..., all SMs (one CTA per SM: every kernel asks for more than half of
the shared memory), reading 512 MB of random words (three regions in turn, beyond L2), the median
of 5 timed launches after a warm-up. Prints a markdown table of TB/s and GB/s per SM.

Runs on the GPU machine with CuPy (NVRTC, sm_90a), from the repository root:

    python3 scripts/probe-stream-depth.py > $OUT/stream-depth.md
"""
import cupy as cp

from probe_common import REGS_SRC, nexus_header_options, timed

SRC = r'''
#include "common.cuh"
using namespace nexus;

// One thread keeps S bulk copies of C KB in flight into a ring of S stages: chunk j of CTA c is
// c + j * grid; stage s waits for its previous copy before it is reused.
template <int S, int C>
__global__ void __launch_bounds__(32, 1)
bulk(const char* __restrict__ data, unsigned long long chunks, unsigned* out) {
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ __align__(8) unsigned long long full[S];
    if (threadIdx.x != 0) return;
    for (int s = 0; s < S; ++s) mbar_init(smem_addr(&full[s]), 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    constexpr unsigned BYTES = C * 1024;
    unsigned long long j = blockIdx.x;
    unsigned n = 0;  // copies issued
    for (; j < chunks; j += gridDim.x, ++n) {
        const int s = n % S;
        const unsigned bar = smem_addr(&full[s]);
        if (n >= S) mbar_wait(bar, ((n / S) - 1) & 1);
        mbar_arrive_expect_tx(bar, BYTES);
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
            ::"r"(smem_addr(ring + s * BYTES)), "l"(data + j * BYTES), "r"(BYTES), "r"(bar) : "memory");
    }
    // Drain: the last S copies.
    for (unsigned m = n > S ? n - S : 0; m < n; ++m) mbar_wait(smem_addr(&full[m % S]), (m / S) & 1);
    if (ring[0] == 0x5a && ring[1] == 0xa5 && ring[2] == 0x33) out[0] = 1;
}
'''

REGS = [4, 8, 12]
BULK = [(4, 16), (8, 16), (12, 16), (6, 32), (13, 16)]
REGION = 512 << 20
RUNS = 5
# Above half of the SM's shared memory (228 KB): one CTA per SM.
ONE_PER_SM = 120 * 1024


def main():
    options = ("-arch=sm_90a", "-std=c++17", *nexus_header_options())
    names = [f"regs<{d}>" for d in REGS] + [f"bulk<{s}, {c}>" for s, c in BULK]
    module = cp.RawModule(code=SRC + REGS_SRC, options=options, name_expressions=names)
    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    regions = [cp.random.randint(0, 2**31, size=REGION // 4, dtype=cp.uint32) for _ in range(3)]
    out = cp.zeros(1, dtype=cp.uint32)
    on = cp.cuda.Stream(non_blocking=True)
    budgets = [b for b in (1, 8, 16, 24, 32, 40, 48, 64, 96) if b < sms] + [sms]

    variants = []
    for d in REGS:
        f = module.get_function(f"regs<{d}>")
        f.max_dynamic_shared_size_bytes = ONE_PER_SM
        chunk = 1024 * 16 * d
        variants.append((f"regs<{d}> ({16 * d} KB)", f, 1024, ONE_PER_SM, chunk))
    for s, c in BULK:
        f = module.get_function(f"bulk<{s}, {c}>")
        smem = max(s * c * 1024, ONE_PER_SM)
        f.max_dynamic_shared_size_bytes = smem
        variants.append((f"bulk<{s}, {c}> ({s * c} KB)", f, 32, smem, c * 1024))

    rates = {}
    turn = 0
    for label, f, threads, smem, chunk in variants:
        for b in budgets:
            chunks = REGION // chunk

            def launch():
                nonlocal turn
                r = regions[turn % 3]
                turn += 1
                f((b,), (threads,), (r, cp.uint64(chunks), out), shared_mem=smem, stream=on)

            launch()
            ts = sorted(timed(on, launch) for _ in range(RUNS))
            rates[(label, b)] = chunks * chunk / ts[RUNS // 2]

    print(f"## Streaming read by bytes in flight per SM (TB/s; GB/s per SM) — {name}\n")
    print("| kernel | " + " | ".join(f"{b} SMs" for b in budgets) + " |")
    print("| --- |" + " --- |" * len(budgets))
    for label, *_ in variants:
        cells = [f"{rates[(label, b)] / 1e12:.2f} ({rates[(label, b)] / b / 1e9:.0f})" for b in budgets]
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
