// Paged decode attention: one query token per sequence over its paged K/V cache, with grouped
// query heads, split-KV work planned on the host, and a merge kernel for split sequences.
//
// Work. The host (nexus-kernels/src/decode_attention.rs) builds a flat list of work items, each one
// KV head of one sequence over one KV chunk [kv_start, kv_end) for up to HEADS (8) of the query
// heads that share that KV head, and hands CTA c the items work_indptr[c] .. work_indptr[c + 1].
// An item reads its K/V bytes once for all its query heads. A sequence whose KV is not split
// writes `out` (bf16) directly; a split one writes each chunk's normalized output (f32) and
// log2-sum-exp to a scratch, and `decode_attention_merge` combines the chunks into `out`.
//
// CTA (8 consumer warps, or 12 for head dim 64 on Hopper; 4 producer warps, or 8 for head dim 64
// on Hopper at small budgets; one per SM: __launch_bounds__(max_threads<D>(), 1) and > half the
// SM's shared memory):
//   - producers walk the CTA's items and stream K and V into a ring of `ring_slots` shared-memory
//     slots of `slot_tokens` tokens each (16, or 32 at head dim 64 on Hopper), running up to a
//     whole ring (about 190 KB) ahead, across item boundaries; they wait for the consumers only for
//     a free slot. Block-table entries are read 32 at a time, one per lane, and the next 32 (or the
//     next item's first 32) load while the current ones are used.
//     On Hopper (sm_90) the producer warps take the slots round-robin; per slot one thread
//     issues one bulk tensor copy (TMA) of K and one of V: the slot's token rows of one KV head
//     straight out of a block, through a 4-D tensor map of each pool, completing on the slot's
//     `full` mbarrier by byte count. The cp.async producers before spent ~90 instructions per slot;
//     profiled on the H200 at a budget of 32 (64 x 4096 tokens, 32/8 heads, d = 128), they issued
//     one slot per ~320 cycles while the consumers spent half their time waiting for data: 1.39
//     TB/s where the streaming read at that budget gets 2.64. Rows of a slot past the end of the
//     sequence then hold whatever the pool holds there; the consumers zero those rows of V (a
//     score of 0 times a NaN is still NaN).
//     Elsewhere (sm_80) the 4 cp.async producer warps remain (see `produce_cp_async`).
//   - W consumer warps (`consumer_warps`): slot k of an item (tokens kv_start + T k .., T =
//     `slot_tokens`) goes to warp k % W. Per 16-token mma tile of the slot a warp computes
//     S^T = K Q^T (16 tokens x 8 heads, mma.sync m16n8k16 over the head dim, K from shared memory
//     by ldmatrix, Q in registers); per slot, an online softmax per head in f32, and per tile
//     O^T += V^T P^T (P^T transposed in registers by movmatrix, V^T by ldmatrix.trans); then it
//     frees the slot. At the end of an item the W warps' (max, sum, O) are combined through shared
//     memory in a fixed order (deterministic) and written out.
// decode_attention_rope_d* is the same kernel with RoPE and the KV write of the step's new tokens
// in it, one launch where rope_and_write_kv (elementwise.cu) and the attention were two: the
// consumer warps, idle until the first slot lands, first write the rotated key and the value of
// every item of the CTA's list that holds its sequence's new token (the last of its KV, at
// position `last`) into the pools (write_new_kv) and arrive on the `written` barrier; a producer
// waits for it only before the slot that holds such a token, so the stream starts at once. The
// consumers rotate the query heads in registers as they take them (rotate_q). Only the item whose
// KV chunk holds a token reads it, so no CTA waits for another. The query rows of `qkv` are read
// as the QKV GEMM wrote them, unrotated.
// The ring slot of the g-th slot of the CTA is g % ring_slots, filled for the (g / ring_slots)-th
// time; ring_slots is a multiple of W and of 8 so that a slot is always reused by the same consumer
// warp within an item, which keeps each barrier's phase parity unambiguous.
//
// A slot holds K then V, each as D / 64 panels of `slot_tokens` token rows x 64 dims (128 bytes),
// the panel's 16-byte chunks XOR-swizzled by (token & 7): the layout TMA's 128-byte swizzle writes
// (the ring is 1024-byte aligned), and the one in which ldmatrix reads of 8 rows hit 8 different
// bank groups.
#include "common.cuh"

namespace {

using nexus::cp_async_16;
using nexus::cp_async_commit;
using nexus::cp_async_wait;
using nexus::cp_async_wait_all;
using nexus::fast_exp2;
using nexus::ldmatrix_x4;
using nexus::ldmatrix_x4_trans;
using nexus::mbar_arrive;
using nexus::mbar_arrive_expect_tx;
using nexus::mbar_init;
using nexus::mbar_wait;
using nexus::mma_16816;
using nexus::pack_bf16;
using nexus::smem_addr;
using nexus::swizzled;
using nexus::TensorMap;

constexpr int PARTS = 2;  // sm_80: producer warps per role (K, V); each fills the ring slots of one parity
#if __CUDA_ARCH__ >= 900
constexpr int FULL_ARRIVALS = 1;  // a slot's `full` barrier: the TMA thread's arrive (and the bytes)
#else
constexpr int FULL_ARRIVALS = 2 * 32;  // a slot's `full` barrier: every lane of its K and its V warp
#endif

// Consumer warps for head dim D: 8, or 12 for head dim 64 on Hopper. Profiled on the H200 (9/3
// heads, d = 64, 16 SMs, 64 x 4096 tokens), that kernel was bound by its consumers: they never
// waited for data, its producers waited for a free slot before 97% of their copies, and a warp
// spends ~170 instructions of one dependent chain (mma, shuffles, exp2, mma) on a 16-token slot of
// 4 KB; more warps keep more slots in work per SM. With 32-token slots (slot_tokens), 8 warps
// measured 5-19% slower at 8-32 SMs, so 12 stay. The ring's slot count is a multiple of it.
template <int D>
__host__ __device__ constexpr int consumer_warps() {
#if __CUDA_ARCH__ >= 900
    return D == 64 ? 12 : 8;
#else
    return 8;
#endif
}
// Tokens per ring slot for head dim D: 32 for head dim 64 on Hopper, else 16 (one mma tile). A
// Hopper producer's cost is per bulk copy, whatever its bytes, and a 16-token slot of head dim 64
// is a copy of 2 KB of K and one of V: with 32 tokens the copies are of 4 KB, as at head dim 128.
// A consumer takes a slot's 16-token tiles in one step (one max reduction and rescale test).
template <int D>
__host__ __device__ constexpr int slot_tokens() {
#if __CUDA_ARCH__ >= 900
    return D == 64 ? 32 : 16;
#else
    return 16;
#endif
}
template <int D>
__host__ __device__ constexpr int consumers() {
    return consumer_warps<D>() * 32;
}

// The most producer warps a launch for head dim D may have; the launch's block size says how many
// it has. On Hopper a slot costs its producer warp about the same issue time whatever its bytes
// (see produce_tma), so head dim 64, whose 16-token slots held half the bytes, took 8 where each
// SM must stream fast (a small budget); 4 otherwise, where more waiting warps only slow the
// consumers (measured with 16-token slots, not again since they hold 32). The count divides the ring's slot count (a multiple of 8). The cp.async
// producers (sm_80) are always two per role.
template <int D>
__host__ __device__ constexpr int max_producer_warps() {
#if __CUDA_ARCH__ >= 900
    return D == 64 ? 8 : 4;
#else
    return 2 * PARTS;
#endif
}
template <int D>
__host__ __device__ constexpr int max_threads() {
    return consumers<D>() + max_producer_warps<D>() * 32;
}
constexpr int MMA_TOKENS = 16;   // tokens of one mma tile (its M)
constexpr int HEADS = 8;         // query heads per work item: the N of one mma tile
constexpr int TABLE_BATCH = 32;  // block-table entries a producer warp loads at once
constexpr int MERGE_THREADS = 512;
constexpr int CONSUMER_BARRIER = 1;  // named barrier of the consumer warps (0 is __syncthreads)

// A work item, as the host writes it: 8 ints.
// `last`: the sequence's last position (kv_len - 1), its new token's.
struct Item {
    int seq, kv_start, kv_end, kv_head, q_head, num_q_heads, partial, last;
};

__device__ __forceinline__ Item load_item(const int* items, int i) {
    const int4* p = reinterpret_cast<const int4*>(items) + 2 * i;
    const int4 a = __ldg(p), b = __ldg(p + 1);
    return Item{a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
}

// Shared-memory layout for head dim D and R ring slots, from the first 1024-byte boundary:
//   ring [R][K | V][D / 64 panels][slot_tokens<D>()][64] bf16 |
//   obuf [consumer warps][HEADS][D + 4] f32 | mbuf, lbuf [consumer warps][HEADS] f32 |
//   full [R], empty [R], written mbarriers
// The host computes the same size, alignment slack included (decode_attention.rs, `smem_bytes`).
constexpr int PANEL_ROW_BYTES = 128;                  // 64 dims of one token
constexpr int RING_ALIGN = 1024;                      // TMA's 128-byte swizzle repeats every 1024 bytes

template <int D>
struct Layout {
    static constexpr int PANELS = D / 64;
    static constexpr int TOKENS = slot_tokens<D>();
    static constexpr int PANEL_BYTES = TOKENS * PANEL_ROW_BYTES;  // 64 dims of the slot's tokens
    static constexpr int HALF_BYTES = PANELS * PANEL_BYTES;      // K (or V) of one slot
    static constexpr int SLOT_BYTES = 2 * HALF_BYTES;
    static constexpr int O_STRIDE = D + 4;  // floats per head row of obuf: pads away bank conflicts
    static constexpr int WARPS = consumer_warps<D>();
    static constexpr int OBUF_BYTES = WARPS * HEADS * O_STRIDE * 4;
    static constexpr int ML_BYTES = WARPS * HEADS * 4;
};

// Byte offset of 16-byte chunk `chunk` (of D / 8) of token row `tok` in the K (or V) half of a slot.
template <int D>
__device__ __forceinline__ uint32_t slot_offset(int tok, int chunk) {
    return (chunk >> 3) * Layout<D>::PANEL_BYTES + swizzled<PANEL_ROW_BYTES>(tok, chunk & 7);
}

// Transposes an 8x8 bf16 matrix held in mma fragment layout (lane holds row lane / 4, columns
// 2 (lane % 4) and 2 (lane % 4) + 1).
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
    return y;
}

template <int D>
__device__ __forceinline__ void consumer_barrier() {
    asm volatile("bar.sync %0, %1;" ::"n"(CONSUMER_BARRIER), "n"(consumers<D>()) : "memory");
}

// Kernel arguments shared by the roles.
struct Args {
    const TensorMap* k_map;  // the pools as 4-D tensors (sm_90 only; see the entry points)
    const TensorMap* v_map;
    const __nv_bfloat16* qkv;
    const __nv_bfloat16* k_cache;
    const __nv_bfloat16* v_cache;
    const int* block_tables;
    const int* items;
    float* part_o;
    float* part_lse;
    __nv_bfloat16* out;
    int num_heads, num_kv_heads, max_blocks_per_seq, block_log2, ring_slots;
    float scale_log2;  // softmax scale x log2(e): scores are kept in the log2 domain
};

// The RoPE of decode_attention_rope, whose pools it writes.
struct Rope {
    __nv_bfloat16* k_cache;
    __nv_bfloat16* v_cache;
    nexus::RopeFreqs freqs;
    int style;  // 0: interleaved pairs (2i, 2i + 1); 1: rotate-half pairs (i, i + D / 2)
};

// The consumers' first work with RoPE: writes the rotated key and the value of each item in
// [i0, i1) that holds its sequence's new token (row seq of qkv, at position `last`) into the
// pools, at the slot the block table gives that position: a consumer thread per pair of the key
// head or 16 bytes of the value head. The rotation is rope_and_write_kv's (the same frequencies,
// angle and rounding), so the pools hold what that kernel writes. Each thread then arrives on
// `written` (release), after a proxy fence on Hopper, whose TMA loads read through the async
// proxy; a producer waits for it before loading a slot that holds a new token.
template <int D>
__device__ __forceinline__ void write_new_kv(const Args& a, const Rope& r, const float* inv_freq, uint32_t written,
                                             int i0, int i1) {
    constexpr int PAIRS = D / 2, CHUNKS = D / 8, UNITS = PAIRS + CHUNKS;
    const size_t row_len = (size_t)(a.num_heads + 2 * a.num_kv_heads) * D;
    const size_t slot_len = (size_t)a.num_kv_heads * D;
    for (int u = threadIdx.x; u < (i1 - i0) * UNITS; u += consumers<D>()) {
        const Item it = load_item(a.items, i0 + u / UNITS);
        if (it.last < it.kv_start || it.last >= it.kv_end) continue;
        const __nv_bfloat16* key = a.qkv + it.seq * row_len + (size_t)(a.num_heads + it.kv_head) * D;
        const int block = __ldg(a.block_tables + (size_t)it.seq * a.max_blocks_per_seq + (it.last >> a.block_log2));
        const size_t slot = ((size_t)block << a.block_log2) + (it.last & ((1 << a.block_log2) - 1));
        const size_t dst = slot * slot_len + (size_t)it.kv_head * D;
        const int j = u % UNITS;
        if (j < PAIRS) {
            const int lo = r.style == 0 ? 2 * j : j, hi = r.style == 0 ? 2 * j + 1 : j + PAIRS;
            float x = nexus::to_float(key[lo]), y = nexus::to_float(key[hi]), sn, cs;
            nexus::sin_cos((float)it.last * inv_freq[j], &sn, &cs);
            nexus::rotate(x, y, sn, cs);
            r.k_cache[dst + lo] = nexus::to_bf16(x);
            r.k_cache[dst + hi] = nexus::to_bf16(y);
        } else {
            const int c = 8 * (j - PAIRS);
            const uint4 v = *reinterpret_cast<const uint4*>(key + (size_t)a.num_kv_heads * D + c);
            *reinterpret_cast<uint4*>(r.v_cache + dst + c) = v;
        }
    }
#if __CUDA_ARCH__ >= 900
    asm volatile("fence.proxy.async.global;\n" ::: "memory");
#endif
    mbar_arrive(written);
}

// Whether the slot of item `it` starting at token t holds the item's new token, which the
// consumers write first (rope) and a producer must wait for.
template <int D, bool ROPE>
__device__ __forceinline__ bool holds_new_token(const Item& it, int t) {
    return ROPE && it.last >= t && it.last < t + slot_tokens<D>() && it.last < it.kv_end;
}

// The frequencies of the pairs of load_q's fragments a lane rotates (see rotate_q), from the
// table of a head's D / 2.
template <int D>
__device__ __forceinline__ void q_freqs(const float* inv_freq, int style, int lane, float (&freq)[D / 8]) {
    constexpr int KS = D / 16;
    const int c = 2 * (lane & 3);
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            if (style == 1) {
                if (kk < KS / 2) {
                    freq[4 * kk + 2 * h] = inv_freq[16 * kk + 8 * h + c];
                    freq[4 * kk + 2 * h + 1] = inv_freq[16 * kk + 8 * h + c + 1];
                }
            } else {
                freq[2 * kk + h] = inv_freq[8 * kk + 4 * h + c / 2];
            }
        }
    }
}

// Rotates load_q's fragments of a query at `position`. A lane holds both values of each of its
// pairs: rotate-half pairs dim d < D / 2 (fragment kk < KS / 2) with d + D / 2, in the same place
// of fragment kk + KS / 2; interleaved pairs are the two values of one register.
template <int D>
__device__ __forceinline__ void rotate_q(uint32_t (&q)[D / 16][2], const float (&freq)[D / 8], int style,
                                         float position) {
    constexpr int KS = D / 16;
    const auto unpack = [](uint32_t u, float& lo, float& hi) {
        lo = __uint_as_float(u << 16);
        hi = __uint_as_float(u & 0xffff0000u);
    };
#pragma unroll
    for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float x0, x1, y0, y1, sn, cs;
            if (style == 1) {
                if (kk >= KS / 2) continue;
                unpack(q[kk][h], x0, x1);
                unpack(q[kk + KS / 2][h], y0, y1);
                nexus::sin_cos(position * freq[4 * kk + 2 * h], &sn, &cs);
                nexus::rotate(x0, y0, sn, cs);
                nexus::sin_cos(position * freq[4 * kk + 2 * h + 1], &sn, &cs);
                nexus::rotate(x1, y1, sn, cs);
                q[kk][h] = pack_bf16(x0, x1);
                q[kk + KS / 2][h] = pack_bf16(y0, y1);
            } else {
                unpack(q[kk][h], x0, y0);
                nexus::sin_cos(position * freq[2 * kk + h], &sn, &cs);
                nexus::rotate(x0, y0, sn, cs);
                q[kk][h] = pack_bf16(x0, y0);
            }
        }
    }
}

// ---- producers ----

// Block ids first_block + lane of item `it` (lanes past its last block get 0, unused).
__device__ __forceinline__ int load_block_ids(const Args& a, const Item& it, int first_block, int lane) {
    const int b = first_block + lane;
    const int last = (it.kv_end - 1) >> a.block_log2;
    return b <= last ? __ldg(a.block_tables + (size_t)it.seq * a.max_blocks_per_seq + b) : 0;
}

// The block ids that follow batch `b` of item `it`: its next batch, or the first of the next
// item (`has_next`), loaded while batch b is used.
__device__ __forceinline__ int next_block_ids(const Args& a, const Item& it, const Item& next, bool has_next, int b,
                                              int lane) {
    if (b + TABLE_BATCH <= (it.kv_end - 1) >> a.block_log2) return load_block_ids(a, it, b + TABLE_BATCH, lane);
    return has_next ? load_block_ids(a, next, next.kv_start >> a.block_log2, lane) : 0;
}

#if __CUDA_ARCH__ >= 900
// Hopper: the launch's P producer warps (4 or 8, see max_producer_warps) take the CTA's slots
// round-robin (warp w the g-th with g % P == w); per slot, lane 0 copies K and V with TMA.
// One warp alone spent ~120 instructions per slot (the TMA operands go through uniform registers, a loop of ~20
// instructions per copy, then one copy per 64 dims) at ~5 cycles each: 1 slot per ~600 cycles,
// 0.75 TB/s on 32 SMs of the H200. The tensor maps (see the entry points) put the 64-dim panels
// after the rows, so that one copy fills a whole half slot: `min(block size, slot_tokens<D>())`
// token rows of one KV head. The rows of a slot lie in one block (block size >= the slot's tokens;
// slots start at multiples of them) or in several. Boxes are always whole: rows past the
// sequence's end are still rows of its last block (or of block 0 past it, see load_block_ids),
// inside the pool.
template <int D, bool ROPE>
__device__ __forceinline__ void produce_tma(const Args& a, uint32_t ring, uint32_t full, uint32_t empty,
                                            uint32_t written, int i0, int i1) {
    using L = Layout<D>;
    const int P = (blockDim.x >> 5) - L::WARPS;  // 4 or 8: a power of two
    const int lane = threadIdx.x & 31;
    const int pw = (threadIdx.x >> 5) - L::WARPS;
    const uint32_t R = a.ring_slots;  // a multiple of 8, so of P
    const int block_size = 1 << a.block_log2;

    Item it = load_item(a.items, i0);
    Item next = i0 + 1 < i1 ? load_item(a.items, i0 + 1) : it;
    int ids = load_block_ids(a, it, it.kv_start >> a.block_log2, lane);
    uint32_t g_item = 0;  // the CTA's slots before this item
    for (int i = i0; i < i1; ++i) {
        const Item after = i + 2 < i1 ? load_item(a.items, i + 2) : next;
        const int last_block = (it.kv_end - 1) >> a.block_log2;
        for (int b = it.kv_start >> a.block_log2; b <= last_block; b += TABLE_BATCH) {
            const int ids_next = next_block_ids(a, it, next, i + 1 < i1, b, lane);
            // This warp's slots among those starting in the batch's tokens [t0, t_end): the item's
            // k-th slot is the CTA's (g_item + k)-th, in ring slot (g_item + k) % R.
            const int t0 = max(it.kv_start, b << a.block_log2), t_end = min(it.kv_end, (b + TABLE_BATCH) << a.block_log2);
            const int k0 = (t0 - it.kv_start) / L::TOKENS;
            const int k = k0 + ((pw - (int)(g_item + k0)) & (P - 1));
            uint32_t slot = (g_item + k) % R, fill = (g_item + k) / R;
            for (int t = it.kv_start + k * L::TOKENS; t < t_end; t += P * L::TOKENS) {
                if (block_size >= L::TOKENS) {
                    // The slot's rows lie in one block: one copy of K and one of V, all panels.
                    const int block = __shfl_sync(0xffffffffu, ids, ((t >> a.block_log2) - b) & 31);
                    if (lane == 0) {
                        const uint32_t bar = full + 8 * slot, dst = ring + slot * L::SLOT_BYTES;
                        if (fill > 0) mbar_wait(empty + 8 * slot, (fill - 1) & 1);
                        if (holds_new_token<D, ROPE>(it, t)) mbar_wait(written, 0);
                        mbar_arrive_expect_tx(bar, L::SLOT_BYTES);
                        const int row = block * block_size + (t & (block_size - 1));
                        nexus::tma_load_4d(dst, a.k_map, 0, row, 0, it.kv_head, bar);
                        nexus::tma_load_4d(dst + L::HALF_BYTES, a.v_map, 0, row, 0, it.kv_head, bar);
                    }
                } else {
                    // Blocks smaller than a slot: its rows lie in consecutive blocks, all in this
                    // batch (t is a multiple of the slot's tokens); one copy per block and panel
                    // (boxes of one panel, or of all at head dim 64, which has one).
                    int blocks[L::TOKENS / 8];
#pragma unroll
                    for (int r = 0; r < L::TOKENS / 8; ++r)
                        blocks[r] = __shfl_sync(0xffffffffu, ids, (((t + 8 * r) >> a.block_log2) - b) & 31);
                    if (lane == 0) {
                        const uint32_t bar = full + 8 * slot, dst = ring + slot * L::SLOT_BYTES;
                        if (fill > 0) mbar_wait(empty + 8 * slot, (fill - 1) & 1);
                        if (holds_new_token<D, ROPE>(it, t)) mbar_wait(written, 0);
                        mbar_arrive_expect_tx(bar, L::SLOT_BYTES);
#pragma unroll
                        for (int j = 0; j < L::TOKENS / 8; ++j) {
                            const int r = 8 * j;  // the first row of each block: r % block_size == 0
                            if (r & (block_size - 1)) continue;
                            const int row = blocks[j] * block_size;
                            for (int p = 0; p < L::PANELS; ++p) {
                                const uint32_t d = dst + p * L::PANEL_BYTES + r * PANEL_ROW_BYTES;
                                nexus::tma_load_4d(d, a.k_map, 0, row, p, it.kv_head, bar);
                                nexus::tma_load_4d(d + L::HALF_BYTES, a.v_map, 0, row, p, it.kv_head, bar);
                            }
                        }
                    }
                }
                slot += P;
                if (slot >= R) {
                    slot -= R;
                    ++fill;
                }
            }
            ids = ids_next;
        }
        g_item += (it.kv_end - it.kv_start + L::TOKENS - 1) / L::TOKENS;
        it = next;
        next = after;
    }
}
#endif

// sm_80: K (role 0) or V (role 1) of every sub-tile into the ring with cp.async.
//
// Why this shape (first round: ~24 GB/s per SM at d = 128, ~11 at d = 64, i.e. one 16-token slot
// per SM every ~340-370 ns whatever the head dim, about one HBM round trip): each producer warp
// signalled a slot with `cp.async.mbarrier.arrive.noinc`, and one warp per role walked every slot
// with ~170 instructions of 64-bit address math each. So now:
//   - PARTS (2) warps per role; warp `part` of a role owns the ring slots with slot % PARTS == part
//     (the same warp always fills a given slot, so each barrier's phases stay in order);
//   - a slot is signalled with a plain mbarrier arrive (release) after cp.async.wait_group: each
//     lane commits one cp.async group per slot and arrives on the slot it issued LAG slots of its
//     own before, so every producer warp keeps LAG + 1 slots of loads in flight whatever the
//     hardware does with cp.async-triggered arrivals (2 roles x 2 parts x 8 slots x 4 KB = 128 KB
//     per SM at d = 128 with a 24-slot ring);
//   - the copies of a slot are one 64-bit base address and a constant byte step per copy.
// Deadlock freedom: before issuing its own slot j (global sub-tile G), a warp waits for the
// consumers to free sub-tile G - R; it has already arrived on all its sub-tiles up to
// G - PARTS (LAG + 1), so PARTS (LAG + 1) <= R makes that wait depend only on earlier sub-tiles
// (induction over the sub-tile index; the consumers take their sub-tiles in order).

template <int D, int LAG, bool ROPE>
__device__ __forceinline__ void produce_cp_async(const Args& a, uint32_t ring, uint32_t full, uint32_t empty,
                                                 uint32_t written, int i0, int i1) {
    using L = Layout<D>;
    constexpr int CPT = D / 8;              // 16-byte chunks per token row
    constexpr int TOK_STEP = 32 / CPT;      // tokens a warp covers per copy round
    constexpr int COPIES = L::TOKENS / TOK_STEP;  // copies per lane per slot
    const int lane = threadIdx.x & 31;
    const int pw = (threadIdx.x >> 5) - L::WARPS;
    const int role = pw & 1;    // 0: K, 1: V
    const int part = pw >> 1;   // which slots: slot % PARTS == part
    const int R = a.ring_slots;  // a multiple of 8, so of PARTS, and >= PARTS (LAG + 1)
    const __nv_bfloat16* pool = role == 0 ? a.k_cache : a.v_cache;
    const uint32_t half = ring + role * L::HALF_BYTES;
    const int chunk = lane % CPT, tok0 = lane / CPT;
    const int block_size = 1 << a.block_log2;
    const size_t token_stride = (size_t)a.num_kv_heads * D;  // elements between tokens of a head
    // Bytes between a lane's consecutive copies (TOK_STEP tokens); small (the host checks the
    // query width fits in i32, and num_kv_heads <= num_heads).
    const int copy_step = TOK_STEP * a.num_kv_heads * D * 2;
    uint32_t dst[COPIES];
#pragma unroll
    for (int i = 0; i < COPIES; ++i) {
        const int tok = tok0 + TOK_STEP * i;
        dst[i] = slot_offset<D>(tok, chunk);
    }

    Item it = load_item(a.items, i0);
    Item next = i0 + 1 < i1 ? load_item(a.items, i0 + 1) : it;
    int ids = load_block_ids(a, it, it.kv_start >> a.block_log2, lane);
    int slot = 0;
    uint32_t fill = 0;    // how many times the ring has wrapped
    uint32_t issued = 0;  // slots this warp has issued
    int last = 0;         // the ring slot of its latest one
    for (int i = i0; i < i1; ++i) {
        const Item after = i + 2 < i1 ? load_item(a.items, i + 2) : next;
        const __nv_bfloat16* head = pool + (size_t)it.kv_head * D + chunk * 8;
        const int last_block = (it.kv_end - 1) >> a.block_log2;
        for (int b = it.kv_start >> a.block_log2; b <= last_block; b += TABLE_BATCH) {
            const int ids_next = next_block_ids(a, it, next, i + 1 < i1, b, lane);
            const int t_end = min(it.kv_end, (b + TABLE_BATCH) << a.block_log2);
            for (int t = max(it.kv_start, b << a.block_log2); t < t_end; t += L::TOKENS) {
                if (slot % PARTS == part) {
                    if (fill > 0) mbar_wait(empty + 8 * slot, (fill - 1) & 1);
                    if (holds_new_token<D, ROPE>(it, t)) mbar_wait(written, 0);
                    const uint32_t s = half + slot * L::SLOT_BYTES;
                    if (block_size >= L::TOKENS) {
                        // The sub-tile lies in one block (t is a multiple of 16): one id, then a
                        // stride. Rows past kv_end are zero-filled; their addresses stay inside the
                        // block, so inside the pool.
                        const int block = __shfl_sync(0xffffffffu, ids, ((t >> a.block_log2) - b) & 31);
                        const char* row = reinterpret_cast<const char*>(
                            head + ((size_t)block * block_size + (t & (block_size - 1)) + tok0) * token_stride);
                        const int left = it.kv_end - t - tok0;  // rows from this lane's first to the end
#pragma unroll
                        for (int c = 0; c < COPIES; ++c) {
                            cp_async_16(s + dst[c], row, TOK_STEP * c < left ? 16 : 0);
                            row += copy_step;
                        }
                    } else {
#pragma unroll
                        for (int c = 0; c < COPIES; ++c) {
                            const int tok = t + tok0 + TOK_STEP * c;
                            const int block = __shfl_sync(0xffffffffu, ids, ((tok >> a.block_log2) - b) & 31);
                            const bool valid = tok < it.kv_end;
                            const __nv_bfloat16* src =
                                valid ? head + ((size_t)block * block_size + (tok & (block_size - 1))) * token_stride
                                      : pool;
                            cp_async_16(s + dst[c], src, valid ? 16 : 0);
                        }
                    }
                    cp_async_commit();
                    if (issued >= LAG) {
                        // This lane's copies of its slot LAG before this one have landed: publish
                        // them (release) on that slot's barrier.
                        cp_async_wait<LAG>();
                        int done = slot - PARTS * LAG;
                        if (done < 0) done += R;
                        mbar_arrive(full + 8 * done);
                    }
                    ++issued;
                    last = slot;
                }
                if (++slot == R) {
                    slot = 0;
                    ++fill;
                }
            }
            ids = ids_next;
        }
        it = next;
        next = after;
    }
    // Publish the slots still in flight, oldest first.
    cp_async_wait_all();
    const int pending = issued < LAG ? (int)issued : LAG;
    for (int k = pending - 1; k >= 0; --k) {
        int done = last - PARTS * k;
        if (done < 0) done += R;
        mbar_arrive(full + 8 * done);
    }
}

// ---- consumers ----

// The Q^T fragments (B operand: k = head dim, n = query head) of an item's query heads: lane
// holds head lane / 4, dims 16 kk + 2 (lane % 4) + {0, 1} and + 8. Heads past the item's are 0.
template <int D>
__device__ __forceinline__ void load_q(const Args& a, const Item& it, int lane, uint32_t (&q)[D / 16][2]) {
    const int n = lane >> 2;
    if (n < it.num_q_heads) {
        const size_t row_len = (size_t)(a.num_heads + 2 * a.num_kv_heads) * D;
        const uint32_t* p = reinterpret_cast<const uint32_t*>(a.qkv + (size_t)it.seq * row_len +
                                                              (size_t)(it.q_head + n) * D + 2 * (lane & 3));
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            q[kk][0] = __ldg(p + kk * 8);
            q[kk][1] = __ldg(p + kk * 8 + 4);
        }
    } else {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) q[kk][0] = q[kk][1] = 0u;
    }
}

template <int D, bool ROPE>
__device__ __forceinline__ void consume(const Args& a, const Rope& rope, const float (&freq)[D / 8], uint32_t ring,
                                        uint32_t full, uint32_t empty, float* obuf, float* mbuf, float* lbuf, int i0,
                                        int i1) {
    using L = Layout<D>;
    constexpr int KS = D / 16;  // k-steps of K Q^T, and m-tiles of V^T P^T
    constexpr int TILES = L::TOKENS / MMA_TOKENS;  // mma tiles per slot
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int R = a.ring_slots;

    // Per-lane ldmatrix offsets within a slot half, for k-steps / m-tiles 0..3 of the first panel
    // (4..7 are the same in the next panel).
    uint32_t k_off[4], v_off[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        // K as the A operand (rows: tokens, k: head dim): matrices (tokens 0-7 | 8-15) x (dims lo | hi).
        const int kt = lane & 15, kc = 2 * j + (lane >> 4);
        k_off[j] = slot_offset<D>(kt, kc);
        // V^T as the A operand (rows: head dim, k: tokens), read transposed from V's token rows.
        const int vt = (lane & 7) + ((lane >> 4) << 3), vc = 2 * j + ((lane >> 3) & 1);
        v_off[j] = slot_offset<D>(vt, vc);
    }

    uint32_t q[KS][2], q_next[KS][2];
    Item it = load_item(a.items, i0);
    Item next = i0 + 1 < i1 ? load_item(a.items, i0 + 1) : it;
    load_q<D>(a, it, lane, q_next);
    uint32_t g = 0;  // the CTA's slots before this item
    for (int i = i0; i < i1; ++i) {
#pragma unroll
        for (int kk = 0; kk < KS; ++kk) {
            q[kk][0] = q_next[kk][0];
            q[kk][1] = q_next[kk][1];
        }
        // The item's position, read again here (an L1 hit) rather than carried in the items kept
        // ahead: those three more registers made the head-dim-64 kernel spill.
        if constexpr (ROPE) rotate_q<D>(q, freq, rope.style, (float)__ldg(a.items + 8 * i + 7));
        const Item after = i + 2 < i1 ? load_item(a.items, i + 2) : next;
        if (i + 1 < i1) load_q<D>(a, next, lane, q_next);

        const int n_slots = (it.kv_end - it.kv_start + L::TOKENS - 1) / L::TOKENS;
        // This lane's two heads (columns of S^T and O^T): 2 (lane % 4) and + 1.
        float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
        float o[KS][4];
#pragma unroll
        for (int mt = 0; mt < KS; ++mt) o[mt][0] = o[mt][1] = o[mt][2] = o[mt][3] = 0.f;

        uint32_t gg = g + warp;
        int slot = gg % R;
        uint32_t fill = gg / R;
        for (int k = warp; k < n_slots; k += L::WARPS) {
            mbar_wait(full + 8 * slot, fill & 1);
            const uint32_t ks = ring + slot * L::SLOT_BYTES, vs = ks + L::HALF_BYTES;
            const int valid = it.kv_end - (it.kv_start + k * L::TOKENS);  // the slot's tokens in the item
#if __CUDA_ARCH__ >= 900
            // Rows past the end came from the pool as they are (TMA copies whole boxes): zero V's,
            // whose products with the zero probabilities must stay 0 (K's scores are masked below).
            const bool partial = valid < L::TOKENS;
            if (partial) {
                const int chunks = (L::TOKENS - valid) * L::PANELS * 8;
                for (int c = lane; c < chunks; c += 32) {
                    const int row = valid + c / (L::PANELS * 8), p = (c / 8) % L::PANELS;
                    nexus::st_shared_zero16(vs + p * L::PANEL_BYTES + row * PANEL_ROW_BYTES + (c % 8) * 16);
                }
                __syncwarp();
            }
#endif

            // S^T (16 tokens x 8 heads) = K Q^T per mma tile of the slot, over two accumulators
            // each to halve the mma chain. Lane holds tokens t and t + 8 (rows lane / 4 and + 8),
            // heads 2 (lane % 4) + {0, 1}; tokens past the end score -inf (a tile wholly past it
            // is skipped).
            float s[TILES][4];
#pragma unroll
            for (int e = 0; e < TILES; ++e) {
                float s_odd[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int j = 0; j < 4; ++j) s[e][j] = 0.f;
                if (e * MMA_TOKENS < valid) {
                    const uint32_t kt = ks + e * MMA_TOKENS * PANEL_ROW_BYTES;
#pragma unroll
                    for (int kk = 0; kk < KS; ++kk) {
                        uint32_t frag[4];
                        ldmatrix_x4(frag, kt + k_off[kk & 3] + (kk >> 2) * L::PANEL_BYTES);
                        mma_16816(kk % 2 == 0 ? s[e] : s_odd, frag, q[kk][0], q[kk][1]);
                    }
                }
                const int t = e * MMA_TOKENS + (lane >> 2);
                const bool lo_ok = t < valid, hi_ok = t + 8 < valid;
                s[e][0] = lo_ok ? (s[e][0] + s_odd[0]) * a.scale_log2 : -INFINITY;
                s[e][1] = lo_ok ? (s[e][1] + s_odd[1]) * a.scale_log2 : -INFINITY;
                s[e][2] = hi_ok ? (s[e][2] + s_odd[2]) * a.scale_log2 : -INFINITY;
                s[e][3] = hi_ok ? (s[e][3] + s_odd[3]) * a.scale_log2 : -INFINITY;
            }
            float mx0 = fmaxf(s[0][0], s[0][2]), mx1 = fmaxf(s[0][1], s[0][3]);
#pragma unroll
            for (int e = 1; e < TILES; ++e) {
                mx0 = fmaxf(mx0, fmaxf(s[e][0], s[e][2]));
                mx1 = fmaxf(mx1, fmaxf(s[e][1], s[e][3]));
            }
#pragma unroll
            for (int off = 4; off < 32; off <<= 1) {
                mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
                mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
            }
            // Lazy rescaling (nexus::RESCALE_THRESHOLD_LOG2; the scores are in the log2 domain
            // already): the reference maxima move, and O and the sums are rescaled, only when a
            // head's maximum rises more than the threshold above its reference, which the first
            // slot of an item always does (m = -inf; its first token is valid, so the maxima are
            // finite). Most slots skip the 2 KS multiplies per lane and the two exponentials.
            const bool moves0 = mx0 - m0 > nexus::RESCALE_THRESHOLD_LOG2;
            const bool moves1 = mx1 - m1 > nexus::RESCALE_THRESHOLD_LOG2;
            if (__any_sync(0xffffffffu, moves0 || moves1)) {
                const float n0 = moves0 ? mx0 : m0, n1 = moves1 ? mx1 : m1;
                const float alpha0 = fast_exp2(m0 - n0), alpha1 = fast_exp2(m1 - n1);
                m0 = n0;
                m1 = n1;
                l0 *= alpha0;
                l1 *= alpha1;
#pragma unroll
                for (int mt = 0; mt < KS; ++mt) {
                    o[mt][0] *= alpha0;
                    o[mt][1] *= alpha1;
                    o[mt][2] *= alpha0;
                    o[mt][3] *= alpha1;
                }
            }
            // Per tile, P^T (16 tokens x 8 heads) as the B operand (the transposes of its two 8x8
            // halves), and O^T (head dim x 8 heads) += V^T P^T.
#pragma unroll
            for (int e = 0; e < TILES; ++e) {
                const float p0 = fast_exp2(s[e][0] - m0), p1 = fast_exp2(s[e][1] - m1);
                const float p2 = fast_exp2(s[e][2] - m0), p3 = fast_exp2(s[e][3] - m1);
                l0 += p0 + p2;
                l1 += p1 + p3;
                if (e * MMA_TOKENS >= valid) continue;
                const uint32_t b0 = transpose8x8(pack_bf16(p0, p1));
                const uint32_t b1 = transpose8x8(pack_bf16(p2, p3));
                const uint32_t vt = vs + e * MMA_TOKENS * PANEL_ROW_BYTES;
#pragma unroll
                for (int mt = 0; mt < KS; ++mt) {
                    uint32_t frag[4];
                    ldmatrix_x4_trans(frag, vt + v_off[mt & 3] + (mt >> 2) * L::PANEL_BYTES);
                    mma_16816(o[mt], frag, b0, b1);
                }
            }
            __syncwarp();
#if __CUDA_ARCH__ >= 900
            // The zeros were written through the generic proxy; the slot's next TMA fill writes
            // through the async proxy.
            if (partial) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
            mbar_arrive(empty + 8 * slot);

            slot += L::WARPS;
            if (slot >= R) {
                slot -= R;
                ++fill;
            }
        }
        g += n_slots;

        // Combine the warps: each publishes its per-head max, sum and unnormalized O.
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {
            l0 += __shfl_xor_sync(0xffffffffu, l0, off);
            l1 += __shfl_xor_sync(0xffffffffu, l1, off);
        }
        const int h0 = 2 * (lane & 3);
        if (lane < 4) {
            mbuf[warp * HEADS + h0] = m0;
            mbuf[warp * HEADS + h0 + 1] = m1;
            lbuf[warp * HEADS + h0] = l0;
            lbuf[warp * HEADS + h0 + 1] = l1;
        }
        float* ow = obuf + warp * HEADS * L::O_STRIDE;
#pragma unroll
        for (int mt = 0; mt < KS; ++mt) {
            const int d = 16 * mt + (lane >> 2);
            ow[h0 * L::O_STRIDE + d] = o[mt][0];
            ow[(h0 + 1) * L::O_STRIDE + d] = o[mt][1];
            ow[h0 * L::O_STRIDE + d + 8] = o[mt][2];
            ow[(h0 + 1) * L::O_STRIDE + d + 8] = o[mt][3];
        }
        consumer_barrier<D>();
        // Thread -> 4 consecutive dims of one head; the warps summed in a fixed order.
        {
            const int h = threadIdx.x / (D / 4), dim = (threadIdx.x % (D / 4)) * 4;
            if (h < it.num_q_heads) {
                float mx = -INFINITY;
#pragma unroll
                for (int w = 0; w < L::WARPS; ++w) mx = fmaxf(mx, mbuf[w * HEADS + h]);
                float sum = 0.f;
                float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
                for (int w = 0; w < L::WARPS; ++w) {
                    const float c = fast_exp2(mbuf[w * HEADS + h] - mx);  // 0 for a warp with no tokens
                    sum += lbuf[w * HEADS + h] * c;
                    const float4 v = *reinterpret_cast<const float4*>(obuf + (w * HEADS + h) * L::O_STRIDE + dim);
                    acc.x += v.x * c;
                    acc.y += v.y * c;
                    acc.z += v.z * c;
                    acc.w += v.w * c;
                }
                const float inv = 1.f / sum;
                acc.x *= inv;
                acc.y *= inv;
                acc.z *= inv;
                acc.w *= inv;
                const int qh = it.q_head + h;
                if (it.partial < 0) {
                    uint2 packed;
                    packed.x = pack_bf16(acc.x, acc.y);
                    packed.y = pack_bf16(acc.z, acc.w);
                    *reinterpret_cast<uint2*>(a.out + ((size_t)it.seq * a.num_heads + qh) * D + dim) = packed;
                } else {
                    const size_t row = (size_t)it.partial * a.num_heads + qh;
                    *reinterpret_cast<float4*>(a.part_o + row * D + dim) = acc;
                    if (dim == 0) a.part_lse[row] = mx + log2f(sum);
                }
            }
        }
        consumer_barrier<D>();  // obuf / mbuf / lbuf are free again
        it = next;
        next = after;
    }
}

// With ROPE, the kernel waits for the previous one here, after the setup that reads nothing it
// writes (the barriers, the tensor maps, the table of the RoPE's frequencies); without, its entry
// point waited before.
template <int D, bool ROPE>
__device__ __forceinline__ void decode_attention_body(const Args& a, const Rope& rope,
                                                      const int* __restrict__ work_indptr,
                                                      uint64_t* __restrict__ cta_trace) {
    using L = Layout<D>;
    nexus::CtaTrace trace(cta_trace);
    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((RING_ALIGN - smem_addr(smem_raw) % RING_ALIGN) % RING_ALIGN);
    const int R = a.ring_slots;
    float* obuf = reinterpret_cast<float*>(smem + (size_t)R * L::SLOT_BYTES);
    float* mbuf = reinterpret_cast<float*>(smem + (size_t)R * L::SLOT_BYTES + L::OBUF_BYTES);
    float* lbuf = mbuf + L::WARPS * HEADS;
    const uint32_t ring = smem_addr(smem);
    const uint32_t full = smem_addr(smem + (size_t)R * L::SLOT_BYTES + L::OBUF_BYTES + 2 * L::ML_BYTES);
    const uint32_t empty = full + 8 * R;
    const uint32_t written = empty + 8 * R;  // with RoPE: the consumers' new tokens are in the pools

    const int i0 = work_indptr[blockIdx.x], i1 = work_indptr[blockIdx.x + 1];
    if (threadIdx.x == 0) {
        for (int s = 0; s < R; ++s) {
            mbar_init(full + 8 * s, FULL_ARRIVALS);
            mbar_init(empty + 8 * s, 32);
        }
        mbar_init(written, consumers<D>());
#if __CUDA_ARCH__ >= 900
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the TMA unit
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(a.k_map)) : "memory");
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(a.v_map)) : "memory");
#endif
    }
    // With RoPE: the frequencies of a head's pairs, in obuf until the items' ends use it.
    if constexpr (ROPE) {
        for (int pair = threadIdx.x; pair < D / 2; pair += blockDim.x)
            obuf[pair] = nexus::rope_inv_freq(pair, D, rope.freqs);
    }
    __syncthreads();
    if (i0 < i1) {
        if (threadIdx.x < consumers<D>()) {
            // With RoPE only the consumers wait for the previous kernel (the QKV GEMM, which
            // wrote the query and the new token's key and value): the producers read the pools'
            // rows of earlier steps, which every kernel before that GEMM wrote (a kernel starts
            // only once its predecessor has passed its own wait), and the slot of a new token
            // only after the consumers wrote it (`written`); so under a dependent launch the KV
            // stream starts while the GEMM drains. The consumers' release lets the next kernel
            // start (a CTA with no items releases it by exiting).
            if constexpr (ROPE) nexus::follow_previous_kernel();
            float freq[D / 8];
            if constexpr (ROPE) {
                q_freqs<D>(obuf, rope.style, threadIdx.x & 31, freq);
                write_new_kv<D>(a, rope, obuf, written, i0, i1);
                consumer_barrier<D>();  // every consumer has read the table: obuf is free again
            }
            consume<D, ROPE>(a, rope, freq, ring, full, empty, obuf, mbuf, lbuf, i0, i1);
        } else {
#if __CUDA_ARCH__ >= 900
            produce_tma<D, ROPE>(a, ring, full, empty, written, i0, i1);
#else
            if (R >= PARTS * 16) {
                // In flight per producer warp: LAG + 1 slots, with PARTS (LAG + 1) <= R (see
                // produce_cp_async).
                produce_cp_async<D, 15, ROPE>(a, ring, full, empty, written, i0, i1);
            } else if (R >= PARTS * 8) {
                produce_cp_async<D, 7, ROPE>(a, ring, full, empty, written, i0, i1);
            } else {
                produce_cp_async<D, 3, ROPE>(a, ring, full, empty, written, i0, i1);  // R >= 8 = PARTS * 4
            }
#endif
        }
    }
    trace.finish();  // thread 0, a consumer: after its last item
}

// Combines the chunks of each split sequence: row (split sequence s, query head h) of `out` is
// the log-sum-exp-weighted mean of the chunks' normalized outputs. One warp per row.
template <int D>
__device__ __forceinline__ void merge_body(const float* __restrict__ part_o, const float* __restrict__ part_lse,
                                           const int* __restrict__ merge_items, int num_split, int num_heads,
                                           __nv_bfloat16* __restrict__ out, uint64_t* __restrict__ cta_trace) {
    constexpr int V = D / 32;  // dims per lane
    constexpr int WARPS = MERGE_THREADS / 32;
    nexus::CtaTrace trace(cta_trace);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int rows = num_split * num_heads;
    for (int row = blockIdx.x * WARPS + warp; row < rows; row += gridDim.x * WARPS) {
        const int s = row / num_heads, h = row % num_heads;
        const int4 m = __ldg(reinterpret_cast<const int4*>(merge_items) + s);  // seq, first slot, chunks
        const float* lse = part_lse + (size_t)m.y * num_heads + h;
        float mx = -INFINITY;
        for (int k = lane; k < m.z; k += 32) mx = fmaxf(mx, lse[(size_t)k * num_heads]);
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        float acc[V], sum = 0.f;
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = 0.f;
        const float* o = part_o + ((size_t)m.y * num_heads + h) * D + lane * V;
        for (int k = 0; k < m.z; ++k) {
            const float w = fast_exp2(lse[(size_t)k * num_heads] - mx);
            sum += w;
            const float* ok = o + (size_t)k * num_heads * D;
            if constexpr (V == 4) {
                const float4 v = *reinterpret_cast<const float4*>(ok);
                acc[0] += w * v.x;
                acc[1] += w * v.y;
                acc[2] += w * v.z;
                acc[3] += w * v.w;
            } else {
                const float2 v = *reinterpret_cast<const float2*>(ok);
                acc[0] += w * v.x;
                acc[1] += w * v.y;
            }
        }
        const float inv = 1.f / sum;
        __nv_bfloat16* dst = out + ((size_t)m.x * num_heads + h) * D + lane * V;
        if constexpr (V == 4) {
            uint2 packed;
            packed.x = pack_bf16(acc[0] * inv, acc[1] * inv);
            packed.y = pack_bf16(acc[2] * inv, acc[3] * inv);
            *reinterpret_cast<uint2*>(dst) = packed;
        } else {
            *reinterpret_cast<uint32_t*>(dst) = pack_bf16(acc[0] * inv, acc[1] * inv);
        }
    }
    trace.finish();
}

}  // namespace

// Launched with consumer_warps<D>() consumer warps and 4 producer warps, or 8 for head dim 64 on
// Hopper (at most max_threads<D>() threads), grid = the plan's CTAs (<= budget; CTAs past the last
// list find it empty), and the dynamic shared memory the host computes for `ring_slots`. `k_map`,
// `v_map`: the K and V pools as 4-D bf16 tensors (64 dims, num_blocks x block_size token rows, D / 64 panels of
// 64 dims, KV heads: the panel's stride, 128 bytes, is below the rows'), boxes of 64 x min(block
// size, 16) x (D / 64, or 1 for block size 8) x 1, 128-byte swizzle; read on sm_90 only (zeros
// elsewhere). decode_attention_rope_d* takes the same arguments, the pools writable, then the RoPE
// of rope_and_write_kv (the frequencies' scalars; style 0: interleaved, 1: rotate-half). The merge
// kernel reads
// its row count from the device (`num_split`), so a graph replays it for whatever batch the plan
// was last updated to. `items`: 8 ints per item (see Item). `part_o`:
// [chunk slots][num_heads][D] f32, `part_lse`: [chunk slots][num_heads] f32 (log2 domain).
#define DECODE_ATTENTION_KERNEL(D)                                                                                   \
    extern "C" __global__ void __launch_bounds__(max_threads<D>(), 1) decode_attention_d##D(                       \
        const __grid_constant__ TensorMap k_map, const __grid_constant__ TensorMap v_map,                           \
        const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ k_cache,                           \
        const __nv_bfloat16* __restrict__ v_cache, const int* __restrict__ block_tables,                            \
        const int* __restrict__ work_indptr, const int* __restrict__ items, float* __restrict__ part_o,             \
        float* __restrict__ part_lse, __nv_bfloat16* __restrict__ out, int num_heads, int num_kv_heads,             \
        int max_blocks_per_seq, int block_log2, int ring_slots, float scale_log2, uint64_t* __restrict__ cta_trace) { \
        nexus::follow_previous_kernel();                                                                           \
        const Args a{&k_map,   &v_map,    qkv,      k_cache,   v_cache,            block_tables, items,      part_o,     \
                     part_lse, out,       num_heads,          num_kv_heads, max_blocks_per_seq,     \
                     block_log2, ring_slots, scale_log2};                                                   \
        decode_attention_body<D, false>(a, Rope{}, work_indptr, cta_trace);                                          \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(max_threads<D>(), 1) decode_attention_rope_d##D(                  \
        const __grid_constant__ TensorMap k_map, const __grid_constant__ TensorMap v_map,                           \
        const __nv_bfloat16* __restrict__ qkv, __nv_bfloat16* k_cache, __nv_bfloat16* v_cache,                      \
        const int* __restrict__ block_tables, const int* __restrict__ work_indptr, const int* __restrict__ items,   \
        float* __restrict__ part_o, float* __restrict__ part_lse, __nv_bfloat16* __restrict__ out, int num_heads,   \
        int num_kv_heads, int max_blocks_per_seq, int block_log2, int ring_slots, float scale_log2, float theta,    \
        int style, int scaling, float factor, float low_freq_factor, float high_freq_factor,                        \
        float original_max_position, uint64_t* __restrict__ cta_trace) {                                             \
        const Args a{&k_map,   &v_map,    qkv,      k_cache,   v_cache,            block_tables, items,      part_o,     \
                     part_lse, out,       num_heads,          num_kv_heads, max_blocks_per_seq,     \
                     block_log2, ring_slots, scale_log2};                                                   \
        const Rope rope{k_cache, v_cache,                                                                            \
                        nexus::RopeFreqs{theta, scaling, factor, low_freq_factor, high_freq_factor,                  \
                                         original_max_position},                                                     \
                        style};                                                                                      \
        decode_attention_body<D, true>(a, rope, work_indptr, cta_trace);                                             \
    }                                                                                                                \
    extern "C" __global__ void __launch_bounds__(MERGE_THREADS, 1) decode_attention_merge_d##D(                     \
        const float* __restrict__ part_o, const float* __restrict__ part_lse, const int* __restrict__ merge_items,  \
        const int* __restrict__ num_split, int num_heads, __nv_bfloat16* __restrict__ out,                          \
        uint64_t* __restrict__ cta_trace) {                                                                          \
        nexus::let_next_kernel_start_early();                                                                      \
        merge_body<D>(part_o, part_lse, merge_items, *num_split, num_heads, out, cta_trace);                         \
    }

DECODE_ATTENTION_KERNEL(64)
DECODE_ATTENTION_KERNEL(128)
