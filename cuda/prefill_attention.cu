// Paged prefill attention (chunked prefill): a batch of prompt chunks of different lengths, each
// query attending causally to its sequence's cached prefix and to the chunk's earlier tokens, all
// read from the paged K/V pools [num_blocks, block_size, num_kv_heads, head_dim] through the
// sequence's block table. Queries are rows of the fused QKV buffer [tokens, (H_q + 2 H_kv) d];
// the output is [tokens, H_q d].
//
// Structure (FlashAttention-2 style, tensor cores through mma.sync so one source serves sm_80 and
// sm_90a):
// - Work item = (sequence, KV head, tile of up to 128 query rows). The rows of a tile are the
//   query heads of the KV head's GQA group packed token-major: row r is token r / G, head
//   kv_head * G + r % G (G = H_q / H_kv; 128 / G tokens per tile). Every K/V byte loaded into
//   shared memory serves all G heads.
// - Persistent: grid = min(budget, items); each CTA takes items from an atomic counter over a
//   host-built list sorted longest-first, and the last CTA to finish resets the counter, so the
//   launch needs no memset and can be captured in a CUDA graph.
// - 8 warps; warp w owns rows 16w..16w+15. Q fragments stay in registers for the whole item.
// - K/V tiles of BN tokens are gathered through the block table with cp.async into a STAGES-deep
//   ring (XOR-swizzled 16-byte chunks, read back with ldmatrix; V with ldmatrix.trans). Block
//   ids for the next tile are loaded one iteration ahead so their latency hides under the math.
// - S = Q Kᵀ and O += P V with mma.sync.m16n8k16 (bf16 in, f32 accumulate); online softmax in f32
//   with exp2 and the scale pre-multiplied by log2(e); the row sums stay per-thread until the end.
// - Causal masking only on tiles that cross the diagonal; K/V tiles past the item's last query
//   are never loaded, and inside a diagonal tile a warp skips the 16-column blocks beyond its own
//   last row.
// - The output goes through shared memory so every global store is a 16-byte vector.
//
// The Hopper kernels (prefill_attention_wgmma_*, sm_90a; FlashAttention-3's structure) take the
// same work items, one per 128 query rows, and differ in how a CTA computes one:
// - Warp-specialized, 3 warpgroups. The first warp of warpgroup 0 is the producer: it copies each
//   K/V tile of 128 keys with TMA (one box per cache block of the tile, up to the whole tile, and
//   per 64-dim panel; a lane per box) into a ring of stages, K and V completing on mbarriers
//   of their own, and runs ahead across items. Warpgroups 1 and 2 consume: each owns 64 of the item's rows.
// - S = Q Kᵀ with wgmma m64n128k16 from shared memory (Q loaded once per item by the consumers);
//   the online softmax runs on the accumulator registers, which are laid out as mma.sync's, so it
//   is the FA2 kernel's; O += P V with wgmma taking P from registers and V as a transposed
//   (MN-major) operand straight from the tile TMA wrote.
// - Groups of 16 keys past the sequence's end are copied from rows outside the pool, which TMA
//   fills with zeros; the rows past the end inside the last block are zeroed by the consumers
//   (a pool row there may hold anything, and 0 x NaN is NaN).
// - The two consumer warpgroups run the same tiles. In the plain kernels they do so independently
//   (S, softmax, P V in turn); the _pipelined ones issue the scores of tile j + 1 with P V of tile
//   j and compute the softmax of tile j + 1 while both are in flight, and the two warpgroups issue
//   their wgmmas in alternate turns (named barriers), so one's softmax overlaps the other's
//   matrix products (FlashAttention-3's intra-warpgroup pipelining and ping-pong).
#include "common.cuh"
#include "wgmma.cuh"

namespace {

using nexus::cp_async_16;
using nexus::cp_async_commit;
using nexus::cp_async_wait;
using nexus::fast_exp2;
using nexus::ldmatrix_x4;
using nexus::ldmatrix_x4_trans;
using nexus::mma_16816;
using nexus::pack_bf16;
using nexus::smem_addr;
using nexus::swizzled;

constexpr int THREADS = 256;
constexpr int WARPS = THREADS / 32;
constexpr int BLOCK_M = 16 * WARPS;  // query rows (token x head) per work item

typedef __nv_bfloat16 bf16;

// ---- The kernel ---------------------------------------------------------------------------------

// A work item, built on the host (nexus-kernels/src/prefill_attention.rs):
//   x: the QKV row of the item's first token      y: that token's position in its sequence
//   z: the sequence (row of the block table)      w: kv_head << 8 | tokens (1..=BLOCK_M / G)
// The item's tokens sit at positions y .. y + tokens - 1 and attend to positions 0 ..= their own.

template <int D, int BN, int STAGES>
struct Config {
    static constexpr int CHUNKS = D / 8;                 // 16-byte chunks per row
    static constexpr int ROWS_PER_PASS = THREADS / CHUNKS;  // rows one pass of all threads copies
    static constexpr int Q_PASSES = BLOCK_M / ROWS_PER_PASS;
    static constexpr int KV_PASSES = BN / ROWS_PER_PASS;  // rows of a K/V tile per thread
    static constexpr int KD = D / 16;                    // k-steps of Q Kᵀ
    static constexpr int DB = D / 8;                     // 8-column blocks of O
    static constexpr int TILE_BYTES = BN * D * 2;
    static constexpr int Q_BYTES = BLOCK_M * D * 2;
    // Dynamic shared memory: Q tile, STAGES K tiles, STAGES V tiles, 2 ints (the launcher
    // computes the same sum).
    static_assert(BLOCK_M % ROWS_PER_PASS == 0 && BN % ROWS_PER_PASS == 0, "tile rows");
    static_assert(STAGES >= 2, "at least double buffering");
};

// The three phases of one K/V tile. MASK: the tile crosses the diagonal; the warp then skips
// the 16-column blocks past its own last row, and masks columns past each row's position.
// Fragment layout (m16n8k16): this lane holds rows g = lane / 4 (c0, c1) and g + 8 (c2, c3), at
// columns 2 (lane % 4) + {0, 1} of each 8-column block.

// s = Q Kᵀ. ldmatrix x4 at K rows n0 + (lane & 7) + 8 (lane >> 4), chunk 2 kk + ((lane >> 3) & 1)
// yields the B fragments of n-blocks n0 / 8 and n0 / 8 + 1.
template <int D, int BN, bool MASK>
__device__ __forceinline__ void qk_tile(uint32_t k_tile, const uint32_t (&qf)[D / 16][4], float (&s)[BN / 8][4],
                                        int col0, int warp_last, int lane) {
    constexpr int KD = D / 16, NB = BN / 8;
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
    const uint32_t k_lane = k_tile + ((lane & 7) + ((lane >> 4) << 3)) * (D * 2);
    const int k_chunk = ((lane >> 3) & 1) ^ (lane & 7);
#pragma unroll
    for (int kk = 0; kk < KD; ++kk) {
#pragma unroll
        for (int np = 0; np < NB / 2; ++np) {
            if (MASK && col0 + np * 16 > warp_last) continue;  // all 16 columns masked for this warp
            uint32_t b[4];
            ldmatrix_x4(b, k_lane + np * 16 * (D * 2) + (((2 * kk) ^ k_chunk) << 4));
            mma_16816(s[2 * np], qf[kk], b[0], b[1]);
            mma_16816(s[2 * np + 1], qf[kk], b[2], b[3]);
        }
    }
}

// Leaves in a[0] the reduction of a[0 .. 2 W) by op, as a tree of depth log2 2W (W a power of 2):
// a template recursion, so that every index is a constant and the array stays in registers.
template <int W, int N, typename Op>
__device__ __forceinline__ void tree_reduce(float (&a)[N], Op op) {
    if constexpr (W >= 1) {
#pragma unroll
        for (int i = 0; i < W; ++i) a[i] = op(a[i], a[i + W]);
        tree_reduce<W / 2>(a, op);
    }
}

// Masks s (MASK), updates the reference max m and sum l, leaves exp(s - m) in p as bf16 A
// fragments (k-step kb covers n-blocks 2 kb and 2 kb + 1) and in alpha the factor the output
// accumulated so far must be scaled by (`rescale`) before P V is added: 1 unless m moved. Every
// row sees column 0 in the first tile, so m is finite after it; the guards only keep -inf - -inf
// out of the arithmetic.
template <int BN, bool MASK>
__device__ __forceinline__ void softmax_scores(float (&s)[BN / 8][4], float (&m)[2], float (&l)[2],
                                               uint32_t (&p)[BN / 16][4], float (&alpha)[2], int col0, int pos_a,
                                               int pos_b, float scale_log2, int lane) {
    constexpr int NB = BN / 8;
    static_assert((NB & (NB - 1)) == 0, "the trees below halve NB");
    if (MASK) {
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            const int c = col0 + nb * 8 + 2 * (lane & 3);
            if (c > pos_a) s[nb][0] = -INFINITY;
            if (c + 1 > pos_a) s[nb][1] = -INFINITY;
            if (c > pos_b) s[nb][2] = -INFINITY;
            if (c + 1 > pos_b) s[nb][3] = -INFINITY;
        }
    }
    // Row maxima as a tree (depth log2 NB + 1, not a chain of NB): this latency is the consumer's
    // own, and the consumers' softmax, not the tensor cores, bounds the Hopper kernels.
    float mx0[NB], mx1[NB];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        mx0[nb] = fmaxf(s[nb][0], s[nb][1]);
        mx1[nb] = fmaxf(s[nb][2], s[nb][3]);
    }
    const auto max = [](float a, float b) { return fmaxf(a, b); };
    tree_reduce<NB / 2>(mx0, max);
    tree_reduce<NB / 2>(mx1, max);
    float mx[2] = {fmaxf(m[0], mx0[0]), fmaxf(m[1], mx1[0])};
    float base[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 1));
        mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffffu, mx[h], 2));
        // (-inf) - (-inf) is NaN, which compares false: a row with no score yet keeps m = -inf.
        const bool moves = (mx[h] - m[h]) * scale_log2 > nexus::RESCALE_THRESHOLD_LOG2;
        const float ref = moves ? mx[h] : m[h];
        base[h] = ref == -INFINITY ? 0.f : ref * scale_log2;
        alpha[h] = moves ? fast_exp2(m[h] * scale_log2 - base[h]) : 1.f;
        m[h] = ref;
        l[h] *= alpha[h];
    }
    // The row sums as trees too (the same adds, reassociated).
    float sum0[NB], sum1[NB];
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
        const float p0 = fast_exp2(fmaf(s[nb][0], scale_log2, -base[0]));
        const float p1 = fast_exp2(fmaf(s[nb][1], scale_log2, -base[0]));
        const float p2 = fast_exp2(fmaf(s[nb][2], scale_log2, -base[1]));
        const float p3 = fast_exp2(fmaf(s[nb][3], scale_log2, -base[1]));
        sum0[nb] = p0 + p1;
        sum1[nb] = p2 + p3;
        p[nb / 2][(nb & 1) * 2 + 0] = pack_bf16(p0, p1);
        p[nb / 2][(nb & 1) * 2 + 1] = pack_bf16(p2, p3);
    }
    const auto add = [](float a, float b) { return a + b; };
    tree_reduce<NB / 2>(sum0, add);
    tree_reduce<NB / 2>(sum1, add);
    l[0] += sum0[0];
    l[1] += sum1[0];
}

// O *= alpha, row by row (this lane's rows g and g + 8); skipped by the whole warp when no row of
// it moved its max. Called by every lane of the warp.
template <int D>
__device__ __forceinline__ void rescale(float (&o)[D / 8][4], const float (&alpha)[2]) {
    if (!__any_sync(0xffffffffu, alpha[0] != 1.f || alpha[1] != 1.f)) return;
#pragma unroll
    for (int db = 0; db < D / 8; ++db) {
        o[db][0] *= alpha[0];
        o[db][1] *= alpha[0];
        o[db][2] *= alpha[1];
        o[db][3] *= alpha[1];
    }
}

// The softmax of one tile with O rescaled at once (O must not be in flight).
template <int D, int BN, bool MASK>
__device__ __forceinline__ void softmax_tile(float (&s)[BN / 8][4], float (&o)[D / 8][4], float (&m)[2],
                                             float (&l)[2], uint32_t (&p)[BN / 16][4], int col0, int pos_a,
                                             int pos_b, float scale_log2, int lane) {
    float alpha[2];
    softmax_scores<BN, MASK>(s, m, l, p, alpha, col0, pos_a, pos_b, scale_log2, lane);
    rescale<D>(o, alpha);
}

// O += P V. ldmatrix x4 .trans at V rows k0 + (lane & 7) + 8 ((lane >> 3) & 1), chunk
// 2 dp + (lane >> 4) yields the B fragments of d-blocks 2 dp and 2 dp + 1.
template <int D, int BN, bool MASK>
__device__ __forceinline__ void pv_tile(uint32_t v_tile, const uint32_t (&p)[BN / 16][4], float (&o)[D / 8][4],
                                        int col0, int warp_last, int lane) {
    constexpr int DB = D / 8, KB = BN / 16;
    const uint32_t v_lane = v_tile + ((lane & 7) + (((lane >> 3) & 1) << 3)) * (D * 2);
    const int v_chunk = (lane >> 4) ^ (lane & 7);
#pragma unroll
    for (int kb = 0; kb < KB; ++kb) {
        if (MASK && col0 + kb * 16 > warp_last) continue;
#pragma unroll
        for (int dp = 0; dp < DB / 2; ++dp) {
            uint32_t b[4];
            ldmatrix_x4_trans(b, v_lane + kb * 16 * (D * 2) + (((2 * dp) ^ v_chunk) << 4));
            mma_16816(o[2 * dp], p[kb], b[0], b[1]);
            mma_16816(o[2 * dp + 1], p[kb], b[2], b[3]);
        }
    }
}

// One tile, phase after phase.
template <int D, int BN, bool MASK>
__device__ __forceinline__ void attend_tile(uint32_t k_tile, uint32_t v_tile, const uint32_t (&qf)[D / 16][4],
                                            float (&o)[D / 8][4], float (&m)[2], float (&l)[2], int col0,
                                            int pos_a, int pos_b, int warp_last, float scale_log2, int lane) {
    float s[BN / 8][4];
    uint32_t p[BN / 16][4];
    qk_tile<D, BN, MASK>(k_tile, qf, s, col0, warp_last, lane);
    softmax_tile<D, BN, MASK>(s, o, m, l, p, col0, pos_a, pos_b, scale_log2, lane);
    pv_tile<D, BN, MASK>(v_tile, p, o, col0, warp_last, lane);
}

// One step of the software-pipelined loop: the scores of the next tile (whose tensor-core work
// is independent of the softmax, so the scheduler can interleave the two), then softmax and P V
// of the current tile, whose scores `s` were computed one step earlier. Each combination of
// (next tile exists, current masked, next masked) is its own straight-line instance.
template <int D, int BN, bool HAS_NEXT, bool MASK_CUR, bool MASK_NEXT>
__device__ __forceinline__ void pipelined_step(uint32_t k_next, uint32_t v_cur, const uint32_t (&qf)[D / 16][4],
                                               float (&s)[BN / 8][4], float (&o)[D / 8][4], float (&m)[2],
                                               float (&l)[2], int col0, int pos_a, int pos_b, int warp_last,
                                               float scale_log2, int lane) {
    float s_next[BN / 8][4];
    uint32_t p[BN / 16][4];
    if (HAS_NEXT) qk_tile<D, BN, MASK_NEXT>(k_next, qf, s_next, col0 + BN, warp_last, lane);
    softmax_tile<D, BN, MASK_CUR>(s, o, m, l, p, col0, pos_a, pos_b, scale_log2, lane);
    pv_tile<D, BN, MASK_CUR>(v_cur, p, o, col0, warp_last, lane);
    if (HAS_NEXT) {
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int i = 0; i < 4; ++i) s[nb][i] = s_next[nb][i];
    }
}

// PIPELINED: the loop computes the scores of tile j + 1 before the softmax and P V of tile j
// (needs STAGES >= 3: tile j + 1 must have landed while tile j is still resident).
template <int D, int BN, int STAGES, bool PIPELINED>
__device__ __forceinline__ void prefill_attention_body(
    const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,
    const int* __restrict__ block_tables, const int4* __restrict__ items, int num_items,
    unsigned* __restrict__ counters, bf16* __restrict__ out, int num_heads, int num_kv_heads, int block_size_log2,
    int max_blocks_per_seq, int num_blocks, float scale_log2, uint64_t* cta_trace) {
    using C = Config<D, BN, STAGES>;
    static_assert(!PIPELINED || STAGES >= 3, "the pipelined loop keeps two tiles resident");
    nexus::CtaTrace trace(cta_trace);

    extern __shared__ __align__(128) unsigned char smem[];
    const uint32_t q_smem = smem_addr(smem);
    const uint32_t k_smem = q_smem + C::Q_BYTES;
    const uint32_t v_smem = k_smem + STAGES * C::TILE_BYTES;
    unsigned char* q_tile = smem;
    int* next_item = reinterpret_cast<int*>(smem + C::Q_BYTES + 2 * STAGES * C::TILE_BYTES);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = num_heads / num_kv_heads;
    const size_t qkv_row = static_cast<size_t>(num_heads + 2 * num_kv_heads) * D;
    const size_t out_row = static_cast<size_t>(num_heads) * D;
    const size_t slot_len = static_cast<size_t>(num_kv_heads) * D;
    const int block_mask = (1 << block_size_log2) - 1;
    const int copy_row = tid / C::CHUNKS, copy_chunk = tid % C::CHUNKS;  // this thread's copy slot

    if (tid == 0) next_item[0] = static_cast<int>(atomicAdd(&counters[0], 1u));
    __syncthreads();
    for (int buf = 0;; buf ^= 1) {
        const int index = next_item[buf];
        if (index >= num_items) break;
        // Claim the next item now; it is read after this item's closing barrier.
        if (tid == 0) next_item[buf ^ 1] = static_cast<int>(atomicAdd(&counters[0], 1u));

        const int4 item = items[index];
        const int row0 = item.x, pos0 = item.y, kv_head = item.w >> 8, tokens = item.w & 255;
        const int rows = tokens * group;      // rows past this are padding
        const int kv_end = pos0 + tokens;     // the last query's position + 1
        const int num_tiles = (kv_end + BN - 1) / BN;
        const int first_masked = (pos0 + 1) / BN;  // tiles from here on cross the diagonal
        const int* table = block_tables + static_cast<size_t>(item.z) * max_blocks_per_seq;
        const bf16* k_head = k_cache + static_cast<size_t>(kv_head) * D + copy_chunk * 8;
        const bf16* v_head = v_cache + static_cast<size_t>(kv_head) * D + copy_chunk * 8;

        // Q rows (zeros for padding rows) into shared memory: commit group 0 of the item.
#pragma unroll
        for (int i = 0; i < C::Q_PASSES; ++i) {
            const int r = copy_row + i * C::ROWS_PER_PASS;
            const bool valid = r < rows;
            const bf16* src = qkv;
            if (valid) {
                const int t = r / group, head = kv_head * group + (r - t * group);
                src = qkv + static_cast<size_t>(row0 + t) * qkv_row + head * D + copy_chunk * 8;
            }
            cp_async_16(q_smem + swizzled<D * 2>(r, copy_chunk), src, valid ? 16 : 0);
        }
        cp_async_commit();

        // The pool slot of each K/V row this thread copies for `tile` (-1: past the item's last
        // query, copied as zeros). Block ids are clamped into the pool: the host checked them,
        // and a table changed behind the plan's back cannot make the kernel read outside it.
        auto tile_slots = [&](int tile, int (&slots)[C::KV_PASSES]) {
#pragma unroll
            for (int i = 0; i < C::KV_PASSES; ++i) {
                const int pos = tile * BN + copy_row + i * C::ROWS_PER_PASS;
                int slot = -1;
                if (pos < kv_end) {
                    const int block = min(max(__ldg(table + (pos >> block_size_log2)), 0), num_blocks - 1);
                    slot = (block << block_size_log2) | (pos & block_mask);
                }
                slots[i] = slot;
            }
        };
        auto load_tile = [&](int tile, const int (&slots)[C::KV_PASSES]) {
            const int stage = tile % STAGES;
#pragma unroll
            for (int i = 0; i < C::KV_PASSES; ++i) {
                const int r = copy_row + i * C::ROWS_PER_PASS;
                const bool valid = slots[i] >= 0;
                const size_t offset = valid ? static_cast<size_t>(slots[i]) * slot_len : 0;
                const uint32_t dst = stage * C::TILE_BYTES + swizzled<D * 2>(r, copy_chunk);
                cp_async_16(k_smem + dst, k_head + offset, valid ? 16 : 0);
                cp_async_16(v_smem + dst, v_head + offset, valid ? 16 : 0);
            }
        };

        // Tiles 0 .. STAGES - 2 in flight (one commit group each, empty past the last tile).
#pragma unroll
        for (int t = 0; t < STAGES - 1; ++t) {
            if (t < num_tiles) {
                int slots[C::KV_PASSES];
                tile_slots(t, slots);
                load_tile(t, slots);
            }
            cp_async_commit();
        }
        int next_slots[C::KV_PASSES];  // for tile j + STAGES - 1, loaded one iteration ahead
        tile_slots(STAGES - 1, next_slots);

        // Q fragments into registers once Q (and for the pipelined loop, tile 0) has landed.
        cp_async_wait<PIPELINED ? STAGES - 2 : STAGES - 1>();
        __syncthreads();
        uint32_t qf[C::KD][4];
        {
            const uint32_t q_lane = q_smem + (warp * 16 + (lane & 15)) * (D * 2);
            const int q_chunk = (lane >> 4) ^ (lane & 7);
#pragma unroll
            for (int kk = 0; kk < C::KD; ++kk) ldmatrix_x4(qf[kk], q_lane + (((2 * kk) ^ q_chunk) << 4));
        }

        // This lane's two rows and the warp's last row, as positions (padding rows act as the
        // item's last token; they are never written).
        const int row_a = warp * 16 + (lane >> 2);
        const int pos_a = pos0 + min(row_a / group, tokens - 1);
        const int pos_b = pos0 + min((row_a + 8) / group, tokens - 1);
        const int warp_last = pos0 + min((warp * 16 + 15) / group, tokens - 1);

        float o[C::DB][4];
#pragma unroll
        for (int db = 0; db < C::DB; ++db) o[db][0] = o[db][1] = o[db][2] = o[db][3] = 0.f;
        float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

        if constexpr (!PIPELINED) {
            for (int j = 0; j < num_tiles; ++j) {
                cp_async_wait<STAGES - 2>();  // tile j has landed (this thread's copies)
                __syncthreads();              // ... everyone's; and everyone is done with tile j - 1
                if (j + STAGES - 1 < num_tiles) load_tile(j + STAGES - 1, next_slots);
                cp_async_commit();
                tile_slots(j + STAGES, next_slots);
                const uint32_t stage = (j % STAGES) * C::TILE_BYTES;
                if (j < first_masked)
                    attend_tile<D, BN, false>(k_smem + stage, v_smem + stage, qf, o, m, l, j * BN, pos_a, pos_b,
                                              warp_last, scale_log2, lane);
                else
                    attend_tile<D, BN, true>(k_smem + stage, v_smem + stage, qf, o, m, l, j * BN, pos_a, pos_b,
                                             warp_last, scale_log2, lane);
            }
        } else {
            // s holds the scores of tile j at the top of iteration j.
            float s[BN / 8][4];
            if (0 < first_masked)
                qk_tile<D, BN, false>(k_smem, qf, s, 0, warp_last, lane);
            else
                qk_tile<D, BN, true>(k_smem, qf, s, 0, warp_last, lane);
            for (int j = 0; j < num_tiles; ++j) {
                // Groups committed so far end with tile j + STAGES - 2: at most STAGES - 3 pending
                // means tile j + 1 has landed (tile j did so one iteration earlier).
                cp_async_wait<STAGES - 3>();
                __syncthreads();  // everyone's copies; everyone is done with tile j - 1's stage
                if (j + STAGES - 1 < num_tiles) load_tile(j + STAGES - 1, next_slots);
                cp_async_commit();
                tile_slots(j + STAGES, next_slots);
                const uint32_t k_next = k_smem + ((j + 1) % STAGES) * C::TILE_BYTES;
                const uint32_t v_cur = v_smem + (j % STAGES) * C::TILE_BYTES;
                const int col0 = j * BN;
#define NEXUS_STEP(NEXT, MC, MN)                                                                              \
    pipelined_step<D, BN, NEXT, MC, MN>(k_next, v_cur, qf, s, o, m, l, col0, pos_a, pos_b, warp_last, scale_log2, \
                                        lane)
                if (j + 1 < num_tiles) {
                    if (j + 1 < first_masked)
                        NEXUS_STEP(true, false, false);
                    else if (j < first_masked)
                        NEXUS_STEP(true, false, true);
                    else
                        NEXUS_STEP(true, true, true);
                } else {
                    if (j < first_masked)
                        NEXUS_STEP(false, false, false);
                    else
                        NEXUS_STEP(false, true, false);
                }
#undef NEXUS_STEP
            }
        }

        // O / l, staged in bf16 through this warp's 16 rows of the Q tile (no warp reads Q from
        // shared memory after the first loop barrier), then 16-byte stores.
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
            l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
            l[h] = l[h] > 0.f ? 1.f / l[h] : 0.f;
        }
#pragma unroll
        for (int db = 0; db < C::DB; ++db) {
            const int col = 4 * (lane & 3);  // byte offset in the 16-byte chunk
            *reinterpret_cast<uint32_t*>(q_tile + swizzled<D * 2>(row_a, db) + col) =
                pack_bf16(o[db][0] * l[0], o[db][1] * l[0]);
            *reinterpret_cast<uint32_t*>(q_tile + swizzled<D * 2>(row_a + 8, db) + col) =
                pack_bf16(o[db][2] * l[1], o[db][3] * l[1]);
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 16 * C::CHUNKS / 32; ++i) {
            const int idx = i * 32 + lane;
            const int r = warp * 16 + idx / C::CHUNKS, c = idx % C::CHUNKS;
            if (r < rows) {
                const int t = r / group, head = kv_head * group + (r - t * group);
                *reinterpret_cast<uint4*>(out + static_cast<size_t>(row0 + t) * out_row + head * D + c * 8) =
                    *reinterpret_cast<const uint4*>(q_tile + swizzled<D * 2>(r, c));
            }
        }
        __syncthreads();  // shared memory is free for the next item, and next_item[buf ^ 1] is set
    }

    // The last CTA out resets the counter for the next launch (every CTA has taken its final
    // index before it counts itself out).
    if (tid == 0) {
        __threadfence();
        if (atomicAdd(&counters[1], 1u) == gridDim.x - 1) {
            counters[0] = 0;
            counters[1] = 0;
            __threadfence();
        }
    }
    trace.finish();
}


// ---- The Hopper kernel (sm_90a) -----------------------------------------------------------------

constexpr int WG_THREADS = 128;                   // one warpgroup
constexpr int HOPPER_THREADS = 3 * WG_THREADS;    // the producer's warpgroup and two consumers
constexpr int HOPPER_KV_TILE = 128;               // keys per K/V tile: the N of S = Q Kᵀ
constexpr int PANEL_ROW_BYTES = 128;              // one row of a 64-dim panel
constexpr int MIN_BOX_ROWS = 16;
// Registers per thread after setmaxnreg: the producer's one working warp needs few.
constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;
static_assert(nexus::register_split_fits(HOPPER_THREADS, PRODUCER_REGS, 2, CONSUMER_REGS),
              "the consumers' registers come from what the producer gives back");

// STAGES_: K/V tiles in the ring. The plain loop needs 2 (64 KB each at d = 128, as
// FlashAttention-3); the pipelined one 3 at d = 128, because it issues the scores of tile j + 1
// while tile j's V is still in use: with 2 stages, K of tile j + 1 could only start loading once
// tile j - 1 was released, right before it is needed (measured on the H200: 382-412 TFLOP/s on
// causal 4k-16k with 2 stages, 444-465 with 3; the plain loop 489-515 with either). 4 at d = 64.
template <int D, int STAGES_>
struct HopperConfig {
    static constexpr int BN = HOPPER_KV_TILE;
    static constexpr int PANELS = D / 64;
    static constexpr int MAX_BOXES = BN / MIN_BOX_ROWS;           // boxes per panel of a tile
    static constexpr int Q_PANEL_BYTES = 64 * PANEL_ROW_BYTES;     // 64 rows of one consumer
    static constexpr int Q_BYTES = PANELS * Q_PANEL_BYTES;          // one consumer's Q
    static constexpr int TILE_PANEL_BYTES = BN * PANEL_ROW_BYTES;
    static constexpr int TILE_BYTES = PANELS * TILE_PANEL_BYTES;   // one K or V tile
    static constexpr int STAGES = STAGES_;
    // Dynamic shared memory: 1024 bytes of alignment slack, both consumers' Q, the K and V rings
    // (the launcher computes the same sum).
    static constexpr int SMEM_BYTES = 1024 + 2 * Q_BYTES + 2 * STAGES * TILE_BYTES;
    static_assert(D == 64 || D == 128, "head dims 64 and 128");
    static_assert(SMEM_BYTES <= 227 * 1024, "fits the shared memory a Hopper CTA may have");
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

using nexus::mbar_arrive;
using nexus::mbar_arrive_expect_tx;
using nexus::mbar_init;
using nexus::mbar_wait;
using nexus::desc_advance;
using nexus::smem_desc;
using nexus::smem_desc_mn;
using nexus::st_shared_zero16;
using nexus::TensorMap;
using nexus::touch;
using nexus::Wgmma;
using nexus::wgmma_commit;
using nexus::wgmma_fence;
using nexus::wgmma_wait;
using nexus::WgmmaRegA;

// Named barriers: 1 + c is consumer c's own; both consumers meet at CONSUMERS_BARRIER; the
// ping-pong turn of consumer c is TURN_BARRIER + c (its bar.sync meets the other's bar.arrive).
constexpr int CONSUMERS_BARRIER = 3;
constexpr int TURN_BARRIER = 4;

__device__ __forceinline__ void named_barrier(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Orders this thread's generic-proxy writes to shared memory before later async-proxy reads
// (wgmma operands, once a barrier has been passed).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

template <int D, int STAGES_, bool PIPELINED>
__device__ __forceinline__ void prefill_attention_wgmma_body(
    const TensorMap* k_map, const TensorMap* v_map, const bf16* __restrict__ qkv, const int* __restrict__ block_tables,
    const int4* __restrict__ items, int num_items, unsigned* __restrict__ counters, bf16* __restrict__ out,
    int num_heads, int num_kv_heads, int block_size_log2, int max_blocks_per_seq, int num_blocks, float scale_log2,
    uint64_t* cta_trace) {
    using C = HopperConfig<D, STAGES_>;
    constexpr int BN = C::BN, STAGES = C::STAGES;

    extern __shared__ uint8_t smem_raw[];
    __shared__ __align__(8) uint64_t k_full[STAGES], v_full[STAGES], kv_empty[STAGES];
    // The item mailbox: the producer takes items from the counter and hands each index to the
    // consumers through one of two slots (the sentinel num_items or more: no item left).
    __shared__ __align__(8) uint64_t item_full[2], item_empty[2];
    __shared__ int item_slot[2];
    // The trace's start time waits in shared memory: the consumers take every register.
    __shared__ uint64_t trace_start;
    const uint32_t q_smem = (smem_addr(smem_raw) + 1023u) & ~1023u;  // [consumer][panel][64 rows][128 B]
    const uint32_t k_smem = q_smem + 2 * C::Q_BYTES;                  // [stage][panel][BN rows][128 B]
    const uint32_t v_smem = k_smem + STAGES * C::TILE_BYTES;

    const int tid = threadIdx.x;
    const int group = num_heads / num_kv_heads;
    // Rows of one TMA box: a whole cache block, up to a K/V tile (at least MIN_BOX_ROWS: the
    // launcher takes the Hopper kernels for blocks of 16 tokens or more). Fewer, larger boxes per
    // tile cost the producer fewer copies.
    static_assert(BN == 1 << 7, "boxes are capped at a tile");
    const int box_log2 = min(block_size_log2, 7), box_rows = 1 << box_log2;
    if (tid == 0) {
        if (cta_trace != nullptr) trace_start = nexus::global_timer_ns();
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(smem_addr(&k_full[s]), 1);      // the producer's arrive + the TMA bytes
            mbar_init(smem_addr(&v_full[s]), 1);
            mbar_init(smem_addr(&kv_empty[s]), 8);    // lane 0 of every consumer warp
        }
        for (int q = 0; q < 2; ++q) {
            mbar_init(smem_addr(&item_full[q]), 1);
            mbar_init(smem_addr(&item_empty[q]), 2 * WG_THREADS);  // every consumer thread has read it
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");  // visible to the TMA unit
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(k_map)) : "memory");
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(v_map)) : "memory");
    }
    __syncthreads();

    if (tid < WG_THREADS) {
        // Producer warpgroup: gives its registers to the consumers; its first warp works. Lane 0
        // runs the item mailbox; a lane issues one box copy of each tile (K on the first
        // copies_per_tile lanes, V on the next), so that the copies of a tile and their
        // block-table reads go out at once instead of one after the other from one thread.
        nexus::setmaxnreg_dec<PRODUCER_REGS>();
        static_assert(2 * C::MAX_BOXES * C::PANELS <= 32, "a lane per box copy of a K and a V tile");
        const int copies_per_tile = (BN >> box_log2) * C::PANELS;  // box copies of one K or V tile
        if (tid < 32) {
            const int lane = tid;
            const bool copies = lane < 2 * copies_per_tile, is_v = lane >= copies_per_tile;
            const int box = (lane % copies_per_tile) / C::PANELS, panel = lane % C::PANELS;
            const TensorMap* map = is_v ? v_map : k_map;
            const uint32_t ring = (is_v ? v_smem : k_smem) + panel * C::TILE_PANEL_BYTES + box * box_rows * PANEL_ROW_BYTES;
            const int block_mask = (1 << block_size_log2) - 1;
            int stage = 0;
            uint32_t phase = 0;
            for (int n = 0;; ++n) {
                int index = 0;
                if (lane == 0) {
                    index = static_cast<int>(atomicAdd(&counters[0], 1u));
                    mbar_wait(smem_addr(&item_empty[n & 1]), ((n >> 1) & 1) ^ 1);
                    item_slot[n & 1] = index;  // published by the arrive (release)
                    mbar_arrive(smem_addr(&item_full[n & 1]));
                }
                index = __shfl_sync(0xffffffffu, index, 0);
                if (index >= num_items) break;

                const int4 item = items[index];
                const int kv_head = item.w >> 8, kv_end = item.y + (item.w & 255);
                const int num_tiles = (kv_end + BN - 1) / BN;
                const int* table = block_tables + static_cast<size_t>(item.z) * max_blocks_per_seq;
                // The pool row of this lane's box of `tile`: the first of its rows, or
                // -box_rows (wholly outside the pool: TMA fills zeros) past the sequence's end.
                // Block ids are clamped into the pool, as in the FA2 kernel.
                auto box_row = [&](int tile) {
                    const int pos = tile * BN + box * box_rows;
                    if (!copies || pos >= kv_end) return -box_rows;
                    const int block = min(max(__ldg(table + (pos >> block_size_log2)), 0), num_blocks - 1);
                    return (block << block_size_log2) | (pos & block_mask);
                };
                int row = box_row(0);
                for (int j = 0; j < num_tiles; ++j) {
                    mbar_wait(smem_addr(&kv_empty[stage]), phase ^ 1);
                    if (lane == 0) {
                        mbar_arrive_expect_tx(smem_addr(&k_full[stage]), C::TILE_BYTES);
                        mbar_arrive_expect_tx(smem_addr(&v_full[stage]), C::TILE_BYTES);
                    }
                    __syncwarp();
                    if (copies) {
                        const uint32_t bar = smem_addr(is_v ? &v_full[stage] : &k_full[stage]);
                        nexus::tma_load_4d(ring + stage * C::TILE_BYTES, map, 0, row, panel, kv_head, bar);
                    }
                    // The next tile's block id now, so its latency passes while this one lands.
                    if (j + 1 < num_tiles) row = box_row(j + 1);
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1;
                    }
                }
            }
            // The last CTA out resets the counter for the next launch (every CTA's producer has
            // taken its final index before it counts itself out).
            if (lane == 0) {
                __threadfence();
                if (atomicAdd(&counters[1], 1u) == gridDim.x - 1) {
                    counters[0] = 0;
                    counters[1] = 0;
                    __threadfence();
                }
            }
        }
    } else {
        nexus::setmaxnreg_inc<CONSUMER_REGS>();
        // Read from lane 0, so that the compiler knows it is the same across the warp and keeps
        // what derives from it (the wgmma descriptors) in uniform registers.
        const int consumer = __shfl_sync(0xffffffffu, tid / WG_THREADS, 0) - 1, ctid = tid % WG_THREADS;
        const int warp = ctid / 32, lane = tid % 32;
        const int wg_barrier = 1 + consumer;
        const uint32_t q_wg = q_smem + consumer * C::Q_BYTES;
        const uint64_t q_desc = smem_desc(q_wg);
        const int row_a = consumer * 64 + warp * 16 + (lane >> 2);  // this lane's rows: row_a, row_a + 8
        const size_t qkv_row = static_cast<size_t>(num_heads + 2 * num_kv_heads) * D;
        const size_t out_row = static_cast<size_t>(num_heads) * D;
        int stage = 0;
        uint32_t phase = 0;
        // Ping-pong: consumer 0 takes the first turn. Every turn ends with an arrive on the other's
        // barrier, so consumer 1's last arrive is met by consumer 0's sync at the end.
        if (PIPELINED && consumer == 1) named_barrier_arrive(TURN_BARRIER, 2 * WG_THREADS);
        // The index of item n from the producer's mailbox.
        auto take_item = [&](int n) {
            mbar_wait(smem_addr(&item_full[n & 1]), (n >> 1) & 1);
            const int index = item_slot[n & 1];
            mbar_arrive(smem_addr(&item_empty[n & 1]));
            return index;
        };
        // Starts copying this warpgroup's 64 rows of the item's Q (zeros for padding rows); the
        // caller makes sure no wgmma of this warpgroup still reads the previous item's.
        auto load_q = [&](int index) {
            if (index < num_items) {
                const int4 item = items[index];
                const int rows = (item.w & 255) * group, q_head = (item.w >> 8) * group;
#pragma unroll
                for (int i = ctid; i < 64 * D / 8; i += WG_THREADS) {
                    const int r = i / (D / 8), chunk = i % (D / 8);
                    const int packed = consumer * 64 + r;
                    const bool valid = packed < rows;
                    const bf16* src = qkv;
                    if (valid) {
                        const int t = packed / group, head = q_head + (packed - t * group);
                        src = qkv + static_cast<size_t>(item.x + t) * qkv_row + head * D + chunk * 8;
                    }
                    cp_async_16(q_wg + (chunk / 8) * C::Q_PANEL_BYTES + swizzled<PANEL_ROW_BYTES>(r, chunk % 8),
                                src, valid ? 16 : 0);
                }
            }
            cp_async_commit();
        };
        int index = take_item(0);
        load_q(index);
        for (int n = 0;; ++n) {
            if (index >= num_items) {
                if (PIPELINED && consumer == 0) named_barrier(TURN_BARRIER, 2 * WG_THREADS);
                break;
            }
            const int4 item = items[index];
            const int row0 = item.x, pos0 = item.y, kv_head = item.w >> 8, tokens = item.w & 255;
            const int rows = tokens * group;  // rows past this are padding
            const int kv_end = pos0 + tokens;
            const int num_tiles = (kv_end + BN - 1) / BN;
            const int first_masked = (pos0 + 1) / BN;  // tiles from here on cross the diagonal

            // This item's Q, copied while the previous item ended, has landed for every warp.
            cp_async_wait<0>();
            fence_proxy_async();
            named_barrier(wg_barrier, WG_THREADS);
            // Once the scores of the item's last tile have landed in every warp of this warpgroup,
            // Q is free: the next item's copy then runs under the last P V and the output's stores.
            int next = num_items;
            auto prefetch_next_q = [&]() {
                named_barrier(wg_barrier, WG_THREADS);
                next = take_item(n + 1);
                load_q(next);
            };

            // Positions of this lane's two rows (padding rows act as the item's last token).
            const int pos_a = pos0 + min(row_a / group, tokens - 1);
            const int pos_b = pos0 + min((row_a + 8) / group, tokens - 1);
            float o[D / 8][4];
#pragma unroll
            for (int db = 0; db < D / 8; ++db) o[db][0] = o[db][1] = o[db][2] = o[db][3] = 0.f;
            float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
            auto& o_flat = reinterpret_cast<float (&)[D / 2]>(o);

            // S = Q Kᵀ of the tile at k_tile into s, issued and committed: 16 of the head dim per
            // wgmma, 32 bytes further along a panel's rows. Each descriptor is the tile's plus a
            // constant (one add, not a descriptor built per wgmma).
            auto issue_scores = [&](uint32_t k_tile, float (&s)[BN / 8][4]) {
                const uint64_t k_desc = smem_desc(k_tile);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < D / 16; ++kk) {
                    const uint32_t q_at = (kk / 4) * C::Q_PANEL_BYTES + (kk % 4) * 32;
                    const uint32_t k_at = (kk / 4) * C::TILE_PANEL_BYTES + (kk % 4) * 32;
                    Wgmma<BN>::run(reinterpret_cast<float (&)[BN / 2]>(s), desc_advance(q_desc, q_at),
                                   desc_advance(k_desc, k_at), kk > 0);
                }
                wgmma_commit();
            };
            // O += P V of the tile at v_tile, issued and committed: 16 keys per wgmma (16 rows of
            // the tile, 2048 bytes), the head dim along N across the panels.
            auto issue_pv = [&](uint32_t v_tile, const uint32_t (&p)[BN / 16][4]) {
                const uint64_t v_desc = smem_desc_mn(v_tile, C::TILE_PANEL_BYTES);
                wgmma_fence();
#pragma unroll
                for (int kb = 0; kb < BN / 16; ++kb)
                    WgmmaRegA<D>::run(o_flat, p[kb], desc_advance(v_desc, kb * 16 * PANEL_ROW_BYTES), 1);
                wgmma_commit();
            };
            // The softmax of tile j's scores (masked from first_masked on).
            auto scores_to_p = [&](int j, float (&s)[BN / 8][4], uint32_t (&p)[BN / 16][4], float (&alpha)[2]) {
                if (j < first_masked)
                    softmax_scores<BN, false>(s, m, l, p, alpha, j * BN, pos_a, pos_b, scale_log2, lane);
                else
                    softmax_scores<BN, true>(s, m, l, p, alpha, j * BN, pos_a, pos_b, scale_log2, lane);
            };
            // Before the last tile's P V: the rows of its last box past the sequence's end become
            // zeros (by one warpgroup, then both wait; outside the ping-pong turns).
            auto zero_tail = [&](int j, uint32_t v_tile) {
                if (j != num_tiles - 1 || kv_end % box_rows == 0) return;
                if (consumer == 0) {
                    const int r0 = kv_end - j * BN, r1 = (r0 + box_rows - 1) & ~(box_rows - 1);
                    for (int i = ctid; i < (r1 - r0) * (D / 8); i += WG_THREADS) {
                        const int r = r0 + i / (D / 8), chunk = i % (D / 8);
                        st_shared_zero16(v_tile + (chunk / 8) * C::TILE_PANEL_BYTES +
                                         swizzled<PANEL_ROW_BYTES>(r, chunk % 8));
                    }
                    fence_proxy_async();
                }
                named_barrier(CONSUMERS_BARRIER, 2 * WG_THREADS);
            };
            auto release = [&](int st) {
                if (lane == 0) mbar_arrive(smem_addr(&kv_empty[st]));
            };

            if constexpr (!PIPELINED) {
                // Tile after tile: S, softmax, P V.
                for (int j = 0; j < num_tiles; ++j) {
                    const uint32_t k_tile = k_smem + stage * C::TILE_BYTES, v_tile = v_smem + stage * C::TILE_BYTES;
                    float s[BN / 8][4];
                    uint32_t p[BN / 16][4];
                    float alpha[2];
                    mbar_wait(smem_addr(&k_full[stage]), phase);
                    issue_scores(k_tile, s);
                    wgmma_wait<0>();
                    touch(reinterpret_cast<float (&)[BN / 2]>(s));
                    if (j == num_tiles - 1) prefetch_next_q();
                    scores_to_p(j, s, p, alpha);
                    rescale<D>(o, alpha);
                    mbar_wait(smem_addr(&v_full[stage]), phase);
                    zero_tail(j, v_tile);
                    issue_pv(v_tile, p);
                    wgmma_wait<0>();
                    touch(o_flat);
                    touch(p);
                    release(stage);
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1;
                    }
                }
            } else {
                // The scores of tile j + 1 and P V of tile j are issued together, in this
                // warpgroup's turn; the softmax of tile j + 1 then runs while P V of tile j is in
                // flight (and while the other warpgroup takes its turn), and O is rescaled once
                // P V has landed.
                float s[BN / 8][4];
                uint32_t p[BN / 16][4];
                float alpha[2];
                mbar_wait(smem_addr(&k_full[stage]), phase);
                issue_scores(k_smem + stage * C::TILE_BYTES, s);
                wgmma_wait<0>();
                touch(reinterpret_cast<float (&)[BN / 2]>(s));
                scores_to_p(0, s, p, alpha);  // O is zero: no rescale
                int cur = stage;              // the stage of tile j
                uint32_t cur_phase = phase;
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
                // One tile with a successor: P V of tile j (its P in p_cur) and the scores of tile
                // j + 1 are issued together in this warpgroup's turn; the softmax of tile j + 1
                // (into p_next) then runs while P V is in flight, and O is rescaled once it has
                // landed. Straight-line, and called with the two P arrays swapped in turn (no copy),
                // so that ptxas sees which wgmmas each wait retires and keeps them asynchronous.
                auto step = [&](int j, uint32_t (&p_cur)[BN / 16][4], uint32_t (&p_next)[BN / 16][4]) {
                    const uint32_t v_tile = v_smem + cur * C::TILE_BYTES;
                    float s_next[BN / 8][4];
                    mbar_wait(smem_addr(&v_full[cur]), cur_phase);
                    named_barrier(TURN_BARRIER + consumer, 2 * WG_THREADS);  // this warpgroup's turn
                    mbar_wait(smem_addr(&k_full[stage]), phase);
                    issue_scores(k_smem + stage * C::TILE_BYTES, s_next);
                    issue_pv(v_tile, p_cur);
                    named_barrier_arrive(TURN_BARRIER + 1 - consumer, 2 * WG_THREADS);  // the other's turn
                    wgmma_wait<1>();  // the scores (committed first) have landed
                    touch(reinterpret_cast<float (&)[BN / 2]>(s_next));
                    scores_to_p(j + 1, s_next, p_next, alpha);
                    wgmma_wait<0>();
                    touch(o_flat);
                    touch(p_cur);
                    release(cur);
                    rescale<D>(o, alpha);
                    cur = stage;
                    cur_phase = phase;
                    if (++stage == STAGES) {
                        stage = 0;
                        phase ^= 1;
                    }
                };
                // The last tile: P V alone.
                auto last = [&](uint32_t (&p_cur)[BN / 16][4]) {
                    prefetch_next_q();
                    const uint32_t v_tile = v_smem + cur * C::TILE_BYTES;
                    mbar_wait(smem_addr(&v_full[cur]), cur_phase);
                    zero_tail(num_tiles - 1, v_tile);
                    named_barrier(TURN_BARRIER + consumer, 2 * WG_THREADS);
                    issue_pv(v_tile, p_cur);
                    named_barrier_arrive(TURN_BARRIER + 1 - consumer, 2 * WG_THREADS);
                    wgmma_wait<0>();
                    touch(o_flat);
                    touch(p_cur);
                    release(cur);
                };
                uint32_t q[BN / 16][4];
                int j = 0;
                for (; j + 2 < num_tiles; j += 2) {
                    step(j, p, q);
                    step(j + 1, q, p);
                }
                if (j + 1 < num_tiles) {
                    step(j, p, q);
                    last(q);
                } else {
                    last(p);
                }
            }

            // O / l straight from the accumulators: rows row_a and row_a + 8, columns
            // 8 db + 2 (lane % 4) and the next.
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
                l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
                const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
                const int r = row_a + 8 * h;
                if (r < rows) {
                    const int t = r / group, head = kv_head * group + (r - t * group);
                    bf16* dst = out + static_cast<size_t>(row0 + t) * out_row + head * D + 2 * (lane & 3);
#pragma unroll
                    for (int db = 0; db < D / 8; ++db)
                        *reinterpret_cast<uint32_t*>(dst + db * 8) = pack_bf16(o[db][2 * h] * inv, o[db][2 * h + 1] * inv);
                }
            }
            index = next;
        }
    }
    __syncthreads();
    if (cta_trace != nullptr && tid == 0) {
        cta_trace[blockIdx.x * 3 + 0] = nexus::sm_id();
        cta_trace[blockIdx.x * 3 + 1] = trace_start;
        cta_trace[blockIdx.x * 3 + 2] = nexus::global_timer_ns();
    }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace

// One entry point per (head dim, K/V tile, stages). Arguments (all validated by the launcher):
//   qkv [tokens, (num_heads + 2 num_kv_heads) head_dim], k_cache / v_cache [blocks, block_size,
//   num_kv_heads, head_dim], block_tables [seqs, max_blocks_per_seq], items [num_items] (int4,
//   longest first), counters [2] (zero between launches), out [tokens, num_heads head_dim],
//   scale_log2 = softmax scale x log2(e), cta_trace [grid][3] or null.
#define NEXUS_PREFILL_KERNEL(NAME, D, BN, STAGES, PIPELINED)                                                \
    extern "C" __global__ void __launch_bounds__(THREADS, 1) NAME(                                               \
        const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache, const bf16* __restrict__ v_cache,      \
        const int* __restrict__ block_tables, const int4* __restrict__ items, int num_items,                   \
        unsigned* __restrict__ counters, bf16* __restrict__ out, int num_heads, int num_kv_heads,              \
        int block_size_log2, int max_blocks_per_seq, int num_blocks, float scale_log2, uint64_t* cta_trace) {  \
        nexus::follow_previous_kernel();                                                                           \
        prefill_attention_body<D, BN, STAGES, PIPELINED>(qkv, k_cache, v_cache, block_tables, items, num_items, \
                                                         counters, out, num_heads, num_kv_heads, block_size_log2, \
                                                         max_blocks_per_seq, num_blocks, scale_log2, cta_trace);  \
    }

// Plain loop (S, softmax, P V in turn per tile).
NEXUS_PREFILL_KERNEL(prefill_attention_d128_n64, 128, 64, 3, false)
NEXUS_PREFILL_KERNEL(prefill_attention_d64_n128, 64, 128, 3, false)
// Software-pipelined loop (scores of tile j + 1 overlap the softmax of tile j), 4 stages.
NEXUS_PREFILL_KERNEL(prefill_attention_d128_n64_pipelined, 128, 64, 4, true)
NEXUS_PREFILL_KERNEL(prefill_attention_d64_n64_pipelined, 64, 64, 4, true)

// The Hopper kernels (empty outside sm_90a: the launcher selects them only on Hopper, for blocks
// of 16 tokens or more). Arguments as above, after the tensor maps of the K and V pools (4-D: 64
// dims, pool rows, 64-dim panels, KV heads; boxes of one panel and min(block size, 128) rows).
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NEXUS_PREFILL_WGMMA_BODY(D, STAGES, PIPELINED)                                                          \
    prefill_attention_wgmma_body<D, STAGES, PIPELINED>(&k_map, &v_map, qkv, block_tables, items, num_items, counters, out, \
                                               num_heads, num_kv_heads, block_size_log2, max_blocks_per_seq,     \
                                               num_blocks, scale_log2, cta_trace);
#else
#define NEXUS_PREFILL_WGMMA_BODY(D, STAGES, PIPELINED)
#endif

#define NEXUS_PREFILL_WGMMA_KERNEL(NAME, D, STAGES, PIPELINED)                                                           \
    extern "C" __global__ void __launch_bounds__(HOPPER_THREADS, 1) NAME(                                        \
        const __grid_constant__ nexus::TensorMap k_map, const __grid_constant__ nexus::TensorMap v_map,          \
        const bf16* __restrict__ qkv, const int* __restrict__ block_tables, const int4* __restrict__ items,      \
        int num_items, unsigned* __restrict__ counters, bf16* __restrict__ out, int num_heads, int num_kv_heads, \
        int block_size_log2, int max_blocks_per_seq, int num_blocks, float scale_log2, uint64_t* cta_trace) {    \
        nexus::follow_previous_kernel();                                                                           \
        NEXUS_PREFILL_WGMMA_BODY(D, STAGES, PIPELINED)                                                                   \
    }

// Tile after tile (S, softmax, P V), the two consumers independent.
NEXUS_PREFILL_WGMMA_KERNEL(prefill_attention_wgmma_d128, 128, 2, false)
NEXUS_PREFILL_WGMMA_KERNEL(prefill_attention_wgmma_d64, 64, 4, false)
// The softmax of tile j + 1 overlapping P V of tile j, the consumers' wgmmas in alternate turns.
NEXUS_PREFILL_WGMMA_KERNEL(prefill_attention_wgmma_d128_pipelined, 128, 3, true)
NEXUS_PREFILL_WGMMA_KERNEL(prefill_attention_wgmma_d64_pipelined, 64, 4, true)
