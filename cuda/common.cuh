// Shared helpers of the Nexus kernels.
//
// Every kernel is persistent: it is launched with grid = min(CTA budget, work items) CTAs, each
// sized to be the only CTA on its SM (the launcher reserves more than half of the SM's shared
// memory), and each CTA loops over work items. So a budget of N occupies at most N SMs.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

namespace nexus {

__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ __nv_bfloat16 to_bf16(float x) { return __float2bfloat16_rn(x); }

// Sum of `v` over the warp, in every lane.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

// Sum of `v` over the CTA, in every thread. `scratch` holds one float per warp (at most 32).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // `scratch` may still be read by an earlier call.
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.f;
    return warp_sum(v);
}

// The SM this thread runs on, and the global nanosecond timer: a kernel given a non-null
// `cta_trace` records, per CTA, {sm id, start ns, end ns} so tests can prove which SMs a launch
// used and when.
__device__ __forceinline__ uint32_t sm_id() {
    uint32_t id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return id;
}
__device__ __forceinline__ uint64_t global_timer_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// ---- Step timeline (only in builds with -DNEXUS_TIMELINE: scripts/timeline-build.sh) -----------
// Thread 0 of every CTA of every kernel records, once it has waited for the previous kernel,
// {ns before the wait, ns after it, sm | block << 16 | grid << 40} into its module's
// `nexus_timeline`, in the order of an atomic count: the CTAs of a kernel then come after all
// those of the kernel before it (they wait for its end), so the host splits the records into
// launches by their grids (scripts/timeline.py). Kernels that call timeline_exit() at a CTA's end
// (the wgmma GEMMs, the attention kernels) record {ns, ids} into `nexus_timeline_exits` the same
// way. No shared memory is used: the attention kernels size their ring to all of it. The records
// make a decode step 1.5-3% longer (Llama-3.1-8B, H200).
#ifdef NEXUS_TIMELINE
constexpr unsigned TIMELINE_RECORDS = 1u << 17;
}  // namespace nexus
// Unmangled, so that the host finds them by these names.
extern "C" __device__ unsigned long long nexus_timeline[nexus::TIMELINE_RECORDS][3];
extern "C" __device__ unsigned nexus_timeline_count;
extern "C" __device__ unsigned long long nexus_timeline_exits[nexus::TIMELINE_RECORDS][2];
extern "C" __device__ unsigned nexus_timeline_exit_count;
namespace nexus {
__device__ __forceinline__ unsigned long long timeline_ids() {
    return sm_id() | (static_cast<unsigned long long>(blockIdx.x) << 16) |
           (static_cast<unsigned long long>(gridDim.x) << 40);
}
// Appends {times..., timeline_ids()} to `records` at the index the atomic `count` hands out (none
// past TIMELINE_RECORDS). The times are taken before the atomic, whose round trip can take
// microseconds while HBM is busy.
template <int N>
__device__ __forceinline__ void timeline_record(unsigned long long (*records)[N], unsigned* count,
                                                const uint64_t (&times)[N - 1]) {
    const unsigned i = atomicAdd(count, 1u);
    if (i < TIMELINE_RECORDS) {
#pragma unroll
        for (int w = 0; w < N - 1; ++w) records[i][w] = times[w];
        records[i][N - 1] = timeline_ids();
    }
}
#endif
__device__ __forceinline__ void timeline_exit() {
#ifdef NEXUS_TIMELINE
    const uint64_t now[1] = {global_timer_ns()};
    timeline_record(nexus_timeline_exits, &nexus_timeline_exit_count, now);
#endif
}

struct CtaTrace {
    uint64_t* out;  // [gridDim.x][3] or null
    uint64_t start;
    __device__ __forceinline__ explicit CtaTrace(uint64_t* out_) : out(out_), start(0) {
        if (out && threadIdx.x == 0) start = global_timer_ns();
    }
    __device__ __forceinline__ void finish() {
        if (threadIdx.x == 0) timeline_exit();
        if (out && threadIdx.x == 0) {
            out[blockIdx.x * 3 + 0] = sm_id();
            out[blockIdx.x * 3 + 1] = start;
            out[blockIdx.x * 3 + 2] = global_timer_ns();
        }
    }
};

// ---- Programmatic dependent launch (sm_90+) -----------------------------------------------------
// A launcher may let a kernel start while the previous kernel of its stream is still running
// (nexus-kernels' LaunchOptions::dependent_launch). Every kernel therefore calls
// wait_for_previous_kernel() before it touches memory that an earlier kernel writes or reads
// (reads of weights may come first), and then allow_next_kernel(): the next kernel's CTAs may then
// take SMs as this kernel's CTAs leave them and set up while this one drains. Placed after the
// wait, the release keeps at most two kernels of a stream in flight (three around the short
// kernels that release first, let_next_kernel_start_early), and every kernel started early still
// waits for all earlier ones (each waited for its own predecessor). Launched without the
// attribute, or below sm_90, both are no-ops.
__device__ __forceinline__ void wait_for_previous_kernel() {
#ifdef NEXUS_TIMELINE
    const uint64_t from = global_timer_ns();
#endif
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
#ifdef NEXUS_TIMELINE
    if (threadIdx.x == 0) {
        const uint64_t times[2] = {from, global_timer_ns()};
        timeline_record(nexus_timeline, &nexus_timeline_count, times);
    }
#endif
}
__device__ __forceinline__ void allow_next_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Both, for a kernel with nothing to do before the wait.
__device__ __forceinline__ void follow_previous_kernel() {
    wait_for_previous_kernel();
    allow_next_kernel();
}
// The release first, for a short kernel after which a GEMM comes: the GEMM's CTAs then start, and
// stream their first ring of weight, while this kernel still waits for its predecessor, instead
// of after this kernel started (the split-KV merge: the output GEMM's CTAs started 2.3 us after it
// ended and passed their wait ~8 us after it, H100 step timeline). The next kernel still waits for
// this one, which waits for its own predecessor, so it sees what both wrote.
__device__ __forceinline__ void let_next_kernel_start_early() {
    allow_next_kernel();
    wait_for_previous_kernel();
}

// ---- PTX wrappers shared by the tensor-core kernels ---------------------------------------------

// The shared-memory address of a generic pointer into shared memory.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared memory with cp.async, bypassing L1 (.cg). Only the first `src_bytes`
// (16, or 0) are read and the rest is zero-filled: with 0 nothing is read, but `src` must still be
// a valid address.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, uint32_t src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// Closes this thread's current group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Waits until all of this thread's cp.async copies have landed.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Four 8x8 b16 matrices from shared memory, one per register: lanes 8i .. 8i + 7 give the row
// addresses of matrix i. `_trans`: each matrix transposed.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr)
                 : "memory");
}

// c += a · b for one m16n8k16 bf16 fragment (a row-major 16x16 in 4 registers, b column-major
// 16x8 in 2), f32 accumulators.
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// How far (in the log2 domain of the scaled scores) a softmax row's maximum may rise above its
// reference m before m moves. Until then exp2(s - m) stays below 2^8, where the f32 sums and the
// bf16 P keep the same relative precision as below 1, and the output accumulated so far needs no
// rescale: after the first tiles of a row its maximum rarely moves that far, so most tiles skip
// the multiplies of the rescale (lazy rescaling, as FlashAttention-4 does). The attention kernels
// skip it only when no row of a warp moved, so the branch stays warp-uniform.
constexpr float RESCALE_THRESHOLD_LOG2 = 8.f;

// 2^x, approximate (ex2.approx.ftz: the softmax's exponential).
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a tile of ROW_BYTES-byte rows whose chunks
// are XOR-swizzled by the row's low three bits: the same chunk of 8 consecutive rows (the 8 rows an
// ldmatrix phase reads) falls in 8 different bank groups. With 128-byte rows it is the layout TMA's
// SWIZZLE_128B writes and wgmma's 128-byte swizzle mode reads (given a 1024-byte aligned tile).
template <int ROW_BYTES>
__device__ __forceinline__ uint32_t swizzled(int row, int chunk) {
    return static_cast<uint32_t>(row * ROW_BYTES + ((chunk ^ (row & 7)) << 4));
}

// A CUtensorMap (the host encodes it: nexus-kernels/src/tensor_map.rs), passed by value as a
// __grid_constant__ kernel parameter.
struct alignas(64) TensorMap {
    unsigned long long opaque[16];
};

#if __CUDA_ARCH__ >= 900
// The box of the 4-D tensor map `map` at coordinates (c0, c1, c2, c3), innermost first, into
// shared memory at `dst`; the copy counts its bytes down on the mbarrier `bar` (complete_tx).
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const TensorMap* map, int c0, int c1, int c2, int c3,
                                            uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
        "[%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}
#endif

// Writes 16 zero bytes to shared memory at `addr`.
__device__ __forceinline__ void st_shared_zero16(uint32_t addr) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
}

// Two floats rounded to bf16 and packed into one register, `lo` in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

// ---- mbarrier wrappers --------------------------------------------------------------------------
// `bar` is the shared-memory address of a 64-bit mbarrier. init, arrive and the wait are sm_80+
// (the wait spins on try_wait from sm_90 on, on test_wait before); arrive_expect_tx is sm_90+.

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
// Arrives on the barrier (release semantics: this thread's earlier writes are visible to threads
// that see the phase complete).
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar) : "memory");
}
// Arrives and adds `bytes` to the transaction count the current phase waits for (TMA's
// complete_tx counts them down).
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(bar),
                 "r"(bytes)
                 : "memory");
}
// Waits until the phase of parity `parity` of the barrier has completed. CLUSTER (sm_90+):
// acquiring at cluster scope what threads of the cluster's other CTAs wrote before they arrived;
// that is an L1 invalidation in SASS, so not for a wait on every K block.
template <bool CLUSTER = false>
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    uint32_t done;
    do {
#if __CUDA_ARCH__ >= 900
        if constexpr (CLUSTER)
            asm volatile(
                "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
                "selp.u32 %0, 1, 0, p;\n}\n"
                : "=r"(done)
                : "r"(bar), "r"(parity)
                : "memory");
        else
            asm volatile(
                "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                : "=r"(done)
                : "r"(bar), "r"(parity)
                : "memory");
#else
        static_assert(!CLUSTER, "clusters are sm_90+");
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.test_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
#endif
    } while (!done);
}

// ---- Rotary position embedding: rope_and_write_kv (elementwise.cu) and decode_attention_rope -----

// The frequencies of a model's RoPE: base theta and Hugging Face's rope scaling (see
// scale_inv_freq), as the launchers pass them.
struct RopeFreqs {
    float theta;
    int scaling;
    float factor, low, high, original;
};

// One rotary frequency under Hugging Face's rope scalings, the arithmetic of the reference's
// `scale_inv_freq`. scaling 0: none; 1: linear (divided by factor); 2: llama3 (wavelengths shorter
// than original/high kept, longer than original/low divided by factor, interpolated in between).
// A few flops per element: cheaper than a table the host would have to upload per model.
__device__ __forceinline__ float scale_inv_freq(float inv_freq, int scaling, float factor, float low, float high,
                                                float original) {
    if (scaling == 1) return inv_freq / factor;
    if (scaling == 2) {
        const float wavelen = 6.283185307179586f / inv_freq;
        if (wavelen < original / high) return inv_freq;
        if (wavelen > original / low) return inv_freq / factor;
        const float smooth = (original / wavelen - low) / (high - low);
        return (1.f - smooth) * inv_freq / factor + smooth * inv_freq;
    }
    return inv_freq;
}

// sin and cos of the f32 angle x: x less the nearest multiple of 2 pi (2 pi split into two floats,
// Cody and Waite's reduction: exact to well below bf16 for the angles of any context length), then
// the special function unit's __sincosf on [-pi, pi] (absolute error under 1e-6): a few
// instructions, where sincosf inlines its large slow path (|x| > 105615) at each of a thread's 8
// calls.
__device__ __forceinline__ void sin_cos(float x, float* s, float* c) {
    const float k = rintf(x * 0.159154943091895336f);  // x / 2 pi
    float r = fmaf(-k, 6.28318548202514648f, x);       // 2 pi rounded to a float...
    r = fmaf(-k, -1.74845553146951702e-7f, r);         // ...and the rest of it
    __sincosf(r, s, c);
}

// The frequency of pair `pair` of a head of `head_dim` dims, theta^(-2 pair / head_dim) in f32,
// scaled: the reference's `rope_inv_freq`.
__device__ __forceinline__ float rope_inv_freq(int pair, int head_dim, const RopeFreqs& f) {
    return scale_inv_freq(1.f / powf(f.theta, (float)(2 * pair) / (float)head_dim), f.scaling, f.factor, f.low, f.high,
                          f.original);
}

// Rotates the pair (x, y) by the angle whose sine and cosine are s and c.
__device__ __forceinline__ void rotate(float& x, float& y, float s, float c) {
    const float rx = x * c - y * s, ry = y * c + x * s;
    x = rx;
    y = ry;
}

}  // namespace nexus
