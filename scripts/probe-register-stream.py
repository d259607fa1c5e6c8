#!/usr/bin/env python3
"""Probe: is a decode GEMM on few SMs bound by shared memory, and does streaming its weight
through registers instead lift it to the streaming read?

Why (from committed H100 tables, no new measurement): on 8 SMs our swapped decode tiles stream
99-103 GB/s of weight per SM, cuBLAS with `cublasSetSmCountTarget(8)` 124, while a plain read with
128-192 KB in flight reads 197-207 (`stream-depth-h100.md`). Every one of those GEMMs stages the
weight in shared memory: a bulk copy writes each byte once and the tensor cores read it once (and
the activations a quarter as much again at N = 16), and shared memory moves 128 bytes a clock per
SM. Two bytes of traffic per weight byte cap a kernel at 64 bytes of weight a clock, 127 GB/s per
SM at 1.98 GHz: cuBLAS's 124-126 GB/s per SM at 8-16 SMs sits on that cap, and our tiles' 2.3
bytes per byte (the activations' reads) put theirs near 110. A kernel that loads the weight from
global memory straight into mma.sync's A fragments touches no shared memory at all.

Tried before (`gemm-h200.md`, eighth round, H200): such a kernel ran 62 GB/s per SM on 16 SMs, and
a probe of its load pattern (8 rows x 64 bytes per warp instruction) read 81-84 GB/s per SM where
contiguous loads read 98.5, with 64 KB in flight. At that depth every pattern is bound by bytes in
flight (`stream-depth-h100.md`); whether the half-line pattern costs anything at 96-144 KB is what
`MATH` false with and without `SHUFFLED` says. (The L1 tag stage resolves 4 cache lines x 4 sectors
a clock, per NVIDIA's forum answers: an instruction over 8 lines takes 2 tag cycles against 4 data
cycles for its 512 bytes, so the pattern need not cost throughput.)

Kernels (one CTA per SM, every one asks for more than half the shared memory):

- `regs<D>`: the streaming read with D coalesced 16-byte loads a thread in flight (1024 threads),
  as `cuda/stream_read.cu` (`stream_read_deep` is D = 12): the limit;
- `bulk<S>` / `bulk_read<S>`: a ring of S bulk copies of 16 KB (`cp.async.bulk`, one thread
  issuing), alone, and with 8 warps reading every byte of each stage from shared memory
  (`ld.shared.v4`) before it is reused, as a GEMM's consumers do: if shared memory bounds the
  GEMMs, `bulk_read` reads about half what `bulk` does on few SMs;
- `mma_stream<RG, D, MT, T, SHUFFLED, MATH>`: C[M, N] = X[M, K] W[N, K]^T for M <= 8 MT, the weight
  streamed into registers: each warp walks an even share of the (16 RG-row block, 32-deep K slab)
  pairs of the weight (row block major, so a warp's share crosses few blocks), keeping D slabs
  of loads in flight; lane (g, t) loads 16 bytes of weight rows g and g + 8 of each 16-row block at
  K 8t..8t+7 of the slab, and the same 16 bytes of activation row g, which with K permuted the
  same way on both sides are the A and B fragments of two mma.sync m16n8k16 (no shuffle, no shared
  memory). Partial sums go to C with f32 atomics where a warp's share leaves a row block. Each
  load instruction of a warp touches 8 rows of 64 bytes: `SHUFFLED` reads a copy of the weight
  stored in fragment order (each 16-row, 32-deep block as 1 KB, a warp's loads 512 contiguous
  bytes each), to tell whether the half-line pattern costs anything; `MATH` false replaces the mma
  with an XOR of the loaded words (the load pattern alone). T threads a CTA.

Shapes: Llama-3.1-8B's QKV (K 4096, N 6144), output (4096 x 4096) and down (14336 x 4096) at M = 1
and 16, budgets 8 to all SMs; each GEMM checked against an f32 product of the same bf16 values
(relative error, to 1e-3 of the result's largest magnitude) before it is timed. Weights rotate
over three copies (beyond L2), the median of 3 launches after a warm-up (about 2 minutes in all,
by count); TB/s counts the weight's bytes. Prints markdown tables of TB/s (GB/s per SM).

Runs on the GPU machine with CuPy (NVRTC, sm_90a), from the repository root:

    python3 scripts/probe-register-stream.py > $OUT/register-stream.md
"""
import cupy as cp
import numpy as np

from probe_common import REGS_SRC, nexus_header_options, timed

SRC = r'''
#include "common.cuh"
using namespace nexus;

// Warp 0's lane 0 keeps S bulk copies of 16 KB in flight into a ring of S stages; with READ, warps
// 1..8 read every stage (ld.shared.v4) and free it on `empty`, else a stage is reused once its copy
// has landed.
template <int S, bool READ>
__global__ void __launch_bounds__(288, 1)
bulk(const char* __restrict__ data, unsigned long long chunks, unsigned* out) {
    constexpr unsigned BYTES = 16384, READERS = 8;
    extern __shared__ __align__(128) unsigned char ring[];
    __shared__ __align__(8) unsigned long long full[S], empty[S];
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; ++s) {
            mbar_init(smem_addr(&full[s]), 1);
            mbar_init(smem_addr(&empty[s]), READERS);
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    __syncthreads();
    const unsigned mine = chunks > blockIdx.x ? (chunks - blockIdx.x + gridDim.x - 1) / gridDim.x : 0;
    if (threadIdx.x == 0) {
        for (unsigned i = 0; i < mine; ++i) {
            const int s = i % S;
            const unsigned bar = smem_addr(&full[s]);
            if (i >= S) {
                if (READ) mbar_wait(smem_addr(&empty[s]), ((i / S) - 1) & 1);
                else mbar_wait(bar, ((i / S) - 1) & 1);
            }
            mbar_arrive_expect_tx(bar, BYTES);
            asm volatile(
                "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                ::"r"(smem_addr(ring + s * BYTES)), "l"(data + (blockIdx.x + (unsigned long long)i * gridDim.x) * BYTES),
                "r"(BYTES), "r"(bar) : "memory");
        }
        if (!READ)
            for (unsigned i = mine > S ? mine - S : 0; i < mine; ++i) mbar_wait(smem_addr(&full[i % S]), (i / S) & 1);
    } else if (READ && threadIdx.x >= 32) {
        const unsigned r = threadIdx.x - 32;
        unsigned acc = 0;
        for (unsigned i = 0; i < mine; ++i) {
            const int s = i % S;
            mbar_wait(smem_addr(&full[s]), (i / S) & 1);
            const uint4* stage = reinterpret_cast<const uint4*>(ring + s * BYTES);
#pragma unroll 4
            for (unsigned v = r; v < BYTES / 16; v += READERS * 32) {
                const uint4 q = stage[v];
                acc ^= q.x ^ q.y ^ q.z ^ q.w;
            }
            __syncwarp();
            if ((threadIdx.x & 31) == 0) mbar_arrive(smem_addr(&empty[s]));
        }
        if (acc == 0x12345678u) out[0] = acc;
    }
}

__device__ __forceinline__ uint4 load_streaming(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

template <int RG, int D, int MT, int T, bool SHUFFLED, bool MATH>
__global__ void __launch_bounds__(T, 1)
mma_stream(const uint4* __restrict__ w, const uint4* __restrict__ x, float* __restrict__ out, int m, int n, int k) {
    constexpr int WARPS = T / 32;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int warps = gridDim.x * WARPS, me = blockIdx.x * WARPS + threadIdx.x / 32;
    const int slabs = k / 32, row_vecs = k / 8;
    const int total = n / (16 * RG) * slabs;
    const int first = static_cast<int>(static_cast<long long>(total) * me / warps);
    const int last = static_cast<int>(static_cast<long long>(total) * (me + 1) / warps);
    if (first >= last) return;

    struct Slab {
        uint4 a[RG][2];
        uint4 b[MT];
    };
    Slab buf[D];
    float acc[RG][MT][4];
#pragma unroll
    for (int r = 0; r < RG; ++r)
#pragma unroll
        for (int j = 0; j < MT; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[r][j][e] = 0.f;
    unsigned check = 0;
    int load_rb = first / slabs, load_ks = first - load_rb * slabs;
    int use_rb = load_rb, use_ks = load_ks, acc_rb = load_rb;

    auto load = [&](Slab& s) {
#pragma unroll
        for (int r = 0; r < RG; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int block16 = load_rb * RG + r;
                const uint4* p = SHUFFLED
                    ? w + (static_cast<size_t>(block16) * slabs + load_ks) * 64 + h * 32 + lane
                    : w + static_cast<size_t>(block16 * 16 + g + 8 * h) * row_vecs + load_ks * 4 + t;
                s.a[r][h] = load_streaming(p);
            }
#pragma unroll
        for (int j = 0; j < MT; ++j) {
            const int row = j * 8 + g;
            s.b[j] = row < m ? __ldg(x + static_cast<size_t>(row) * row_vecs + load_ks * 4 + t) : make_uint4(0, 0, 0, 0);
        }
        if (++load_ks == slabs) {
            load_ks = 0;
            ++load_rb;
        }
    };
    auto flush = [&]() {
#pragma unroll
        for (int r = 0; r < RG; ++r)
#pragma unroll
            for (int j = 0; j < MT; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = (acc_rb * RG + r) * 16 + g + (e >= 2 ? 8 : 0);
                    const int col = j * 8 + 2 * t + (e & 1);
                    if (col < m) atomicAdd(out + static_cast<size_t>(col) * n + row, acc[r][j][e]);
                    acc[r][j][e] = 0.f;
                }
    };
    auto use = [&](const Slab& s) {
        if (use_rb != acc_rb) {
            if (MATH) flush();
            acc_rb = use_rb;
        }
#pragma unroll
        for (int r = 0; r < RG; ++r) {
            if (MATH) {
#pragma unroll
                for (int j = 0; j < MT; ++j) {
                    const uint32_t lo[4] = {s.a[r][0].x, s.a[r][1].x, s.a[r][0].y, s.a[r][1].y};
                    const uint32_t hi[4] = {s.a[r][0].z, s.a[r][1].z, s.a[r][0].w, s.a[r][1].w};
                    mma_16816(acc[r][j], lo, s.b[j].x, s.b[j].y);
                    mma_16816(acc[r][j], hi, s.b[j].z, s.b[j].w);
                }
            } else {
#pragma unroll
                for (int h = 0; h < 2; ++h) check ^= s.a[r][h].x ^ s.a[r][h].y ^ s.a[r][h].z ^ s.a[r][h].w;
            }
        }
        if (!MATH)
#pragma unroll
            for (int j = 0; j < MT; ++j) check ^= s.b[j].x ^ s.b[j].w;
        if (++use_ks == slabs) {
            use_ks = 0;
            ++use_rb;
        }
    };

#pragma unroll
    for (int d = 0; d < D; ++d)
        if (first + d < last) load(buf[d]);
    for (int i = first; i < last; i += D) {
#pragma unroll
        for (int d = 0; d < D; ++d) {
            if (i + d < last) {
                use(buf[d]);
                if (i + d + D < last) load(buf[d]);
            }
        }
    }
    if (MATH) flush();
    else if (check == 0x12345678u) out[0] = 1.f;
}
'''

REGION = 512 << 20
RUNS = 3
ONE_PER_SM = 120 * 1024
REGS = [8, 12]
BULK = [12]
# (RG, D, MT, threads): M <= 8 and M <= 16 variants with 96-144 KB of weight in flight per SM (ptxas: no
# spills, sm_90a, nvcc 13.0).
STREAMS = [(2, 4, 1, 512), (1, 8, 1, 512), (1, 3, 1, 1024), (2, 6, 1, 384), (2, 3, 2, 512)]
SHAPES = [("QKV", 4096, 6144), ("output", 4096, 4096), ("down", 14336, 4096)]


def stream_name(rg, d, mt, threads, shuffled, math):
    return f"mma_stream<{rg}, {d}, {mt}, {threads}, {str(shuffled).lower()}, {str(math).lower()}>"


def bf16_to_f32(u16):
    return (u16.astype(cp.uint32) << 16).view(cp.float32)


def random_bf16(shape):
    """Random bf16 bit patterns of values in about [-1, 1] (as uint16)."""
    f = cp.random.uniform(-1.0, 1.0, size=shape, dtype=cp.float32)
    return (f.view(cp.uint32) >> 16).astype(cp.uint16)


def fragment_order(w, n, k):
    """W [n, k] stored as [n / 16][k / 32] blocks of 1 KB: half h, row g, lane t's 8 values."""
    return cp.ascontiguousarray(w.reshape(n // 16, 2, 8, k // 32, 4, 8).transpose(0, 3, 1, 2, 4, 5))


def main():
    options = ("-arch=sm_90a", "-std=c++17", *nexus_header_options())
    names = [f"regs<{d}>" for d in REGS]
    names += [f"bulk<{s}, {r}>" for s in BULK for r in ("false", "true")]
    for rg, d, mt, threads in STREAMS:
        for shuffled in (False, True):
            names.append(stream_name(rg, d, mt, threads, shuffled, True))
        names.append(stream_name(rg, d, mt, threads, False, False))
    module = cp.RawModule(code=SRC + REGS_SRC, options=options, name_expressions=names)
    dev = cp.cuda.Device()
    sms = dev.attributes["MultiProcessorCount"]
    name = cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    on = cp.cuda.Stream(non_blocking=True)
    budgets = [b for b in (8, 16, 24, 32, 48, 64) if b < sms] + [sms]
    flag = cp.zeros(1, dtype=cp.uint32)

    def function(expr, smem):
        f = module.get_function(expr)
        f.max_dynamic_shared_size_bytes = smem
        return f

    def median_rate(launch, nbytes):
        launch()
        ts = sorted(timed(on, launch) for _ in range(RUNS))
        return nbytes / ts[RUNS // 2]

    def row(label, rates):
        cells = [f"{rates[b] / 1e12:.2f} ({rates[b] / b / 1e9:.0f})" for b in budgets]
        print(f"| {label} | " + " | ".join(cells) + " |")

    header = "| kernel | " + " | ".join(f"{b} SMs" for b in budgets) + " |\n| --- |" + " --- |" * len(budgets)

    # The limit and the shared-memory round trip, on 512 MB regions of random words.
    regions = [cp.random.randint(0, 2**31, size=REGION // 4, dtype=cp.uint32) for _ in range(3)]
    turn = [0]
    print(f"## Reads by path (TB/s; GB/s per SM) — {name}\n")
    print(header)
    for d in REGS:
        f = function(f"regs<{d}>", ONE_PER_SM)
        chunk = 1024 * 16 * d
        rates = {}
        for b in budgets:
            def launch(b=b):
                turn[0] += 1
                f((b,), (1024,), (regions[turn[0] % 3], cp.uint64(REGION // chunk), flag), shared_mem=ONE_PER_SM, stream=on)
            rates[b] = median_rate(launch, REGION // chunk * chunk)
        row(f"regs<{d}> ({16 * d} KB in flight)", rates)
    for s in BULK:
        for read in ("false", "true"):
            smem = max(s * 16384, ONE_PER_SM)
            f = function(f"bulk<{s}, {read}>", smem)
            rates = {}
            for b in budgets:
                def launch(b=b):
                    turn[0] += 1
                    f((b,), (288,), (regions[turn[0] % 3], cp.uint64(REGION // 16384), flag), shared_mem=smem, stream=on)
                rates[b] = median_rate(launch, REGION)
            label = "bulk copies and a read of every byte from shared memory" if read == "true" else "bulk copies"
            row(f"{label} ({16 * s} KB in flight)", rates)
    del regions

    for layer, k, n in SHAPES:
        weights = [random_bf16((n, k)) for _ in range(3)]
        shuffled = [fragment_order(w, n, k) for w in weights]
        for m in (1, 16):
            x = random_bf16((m, k))
            reference = bf16_to_f32(x) @ bf16_to_f32(weights[0]).T
            scale = float(cp.abs(reference).max())
            out = cp.zeros((m, n), dtype=cp.float32)
            print(f"\n## Llama-3.1-8B {layer} (K {k}, N {n}), M = {m}: weight TB/s (GB/s per SM) — {name}\n")
            print(header)
            for rg, d, mt, threads in STREAMS:
                if m > 8 * mt:
                    continue
                for fragment, math in ((False, True), (True, True), (False, False)):
                    f = function(stream_name(rg, d, mt, threads, fragment, math), ONE_PER_SM)
                    source = shuffled if fragment else weights
                    if math:
                        out.fill(0)
                        f((budgets[1],), (threads,), (source[0], x, out, cp.int32(m), cp.int32(n), cp.int32(k)),
                          shared_mem=ONE_PER_SM)
                        error = float(cp.abs(out - reference).max()) / scale
                        if error > 1e-3:
                            print(f"| {stream_name(rg, d, mt, threads, fragment, math)} | wrong: error {error:.2e} |")
                            continue
                    rates = {}
                    for b in budgets:
                        def launch(b=b):
                            turn[0] += 1
                            f((b,), (threads,), (source[turn[0] % 3], x, out, cp.int32(m), cp.int32(n), cp.int32(k)),
                              shared_mem=ONE_PER_SM, stream=on)
                        rates[b] = median_rate(launch, n * k * 2)
                    label = f"RG {rg}, D {d}, MT {mt}, {threads} threads" + (
                        ", fragment order" if fragment else "") + ("" if math else ", loads only")
                    row(label, rates)
        del weights, shuffled


if __name__ == "__main__":
    main()
