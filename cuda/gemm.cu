// GEMM for the linear layers: C[M, N] = A[M, K] · B[N, K]ᵀ (+ bias[N]), bf16 in and out, f32
// accumulation. A holds activations (row-major, K contiguous), B a weight in the
// [out_features, in_features] layout (also K contiguous), C is row-major [M, N].
//
// Every kernel is persistent: the launcher starts min(CTA budget, tiles) CTAs, one per SM, and
// each CTA takes output tiles from an atomic counter, so CTAs that run faster, or start earlier,
// take more tiles. The last CTA to find no tile left resets the counters, so launches need no
// fill of them in between (one launch fewer per GEMM, in a graph too). Tiles are numbered in bands of
// GROUP_M tile rows, M fastest inside a band, so that the CTAs running at one time share both
// A rows and B rows in L2.
//
// Two families:
//
// * gemm_wgmma_* (Hopper, sm_90a only). Warp-specialized: one thread of the producer
//   warpgroup issues TMA loads of 64-wide K slices of the A and B tiles into a ring of
//   shared-memory stages (TMA's 128-byte swizzle; each stage completes on a `full` mbarrier),
//   and one or two consumer warpgroups run wgmma on each stage straight from shared memory,
//   keeping one wgmma group in flight, and hand the stage back on an `empty` mbarrier. The
//   producer runs ahead across tile boundaries, so the next tile's loads overlap the current
//   tile's epilogue, which each consumer warp stores through a buffer of its own after the ring
//   (store_rows_staged). Each CTA's first tile is its own (CTA i takes tile i; the counter hands out
//   the rest), so the producer can request that tile's first ring of B before the previous
//   kernel has finished (dependent launch: see wait_for_previous_kernel in common.cuh). The
//   `swap` kernel computes the tile transposed (weight rows on wgmma's 64-row side, activation
//   rows on its narrow N side) for M <= 16, where a 64-row A tile would be mostly padding and
//   its useless math would slow a weight-streaming GEMM. Its
//   consumers spread each K block's 4 wgmma m64n16k16 over 4 independent accumulator sets: one
//   dependent chain of them ran at wgmma latency, ~47 GB/s of weight per SM. The sets did not
//   overlap either (one warp's wgmmas ran one after the other), but warpgroups do: swap_16x128 has
//   two consumer warpgroups (128 weight rows, 16 KB of weight per stage, 12 stages in flight),
//   swap_16x256 four (256 rows, 32 KB per stage), which streamed 104-113 GB/s per SM at 8-16 SMs
//   on the H200 with 5 stages (the 64 KB read curve gave 114-125) where swap_16x128 takes 66-68.
//   swap_32x256 is that tile with 32 activation rows (m64n32, two accumulator sets) for
//   17 <= M <= 32, where a 64-row A tile does twice the math and, on few SMs, is bound by it;
//   swap_16x192 has three consumers, for weights whose 256-row tiles make uneven waves (Llama's
//   6144-row QKV: 24 tiles on 16 or 32 CTAs, 32 of 192 rows).
// * gemm_mma_* (every GPU from sm_80 on): all 8 warps copy tiles with cp.async into a ring of
//   stages (the same 128-byte XOR swizzle, so ldmatrix reads are free of bank conflicts) and
//   compute with mma.sync m16n8k16; the loads also run ahead across tile boundaries. The
//   number of stages is a launch argument, sized by the launcher to the device's shared memory.
//
// Split-K (wgmma kernels): when a shape's output tiles do not spread evenly over the budget's CTAs
// (fewer tiles than CTAs, or a last wave that leaves some idle), the launcher may split K into
// `splits` ranges: each (tile, range) is a work unit of its own, whose partial sums go to a float
// workspace; the tile's last unit to finish adds the partials in range order (so the result does
// not depend on which finished last) and stores C.
//
// Epilogues: STORE writes C (+ bias). SILU_AND_MUL is the SwiGLU of a feed-forward layer: B holds
// the gate rows, then the up rows ([n / 2 gate | n / 2 up], n a multiple of 16), and a tile of B
// holds BN / 2 gate rows and the matching up rows, placed so that every thread finds each gate
// value and its up value in its own accumulators: wgmma and mma.sync give a thread the same
// columns 8j + 2 (lane % 4) (+1) of every 8-column block j, and the swapped tiles rows r and r + 8
// of each 16. So the wgmma tiles take the gate rows, then the up rows (a 3-D tensor map: one box
// of both halves), the swapped ones and the cp.async loads 8 gate rows, then the 8 matching up
// rows, and so on (a 4-D map; a row mapping). The kernel then stores silu(gate) * up into C
// [m, n / 2] from f32, and the intermediate [m, n] never goes to memory (one launch and a write
// and read of it fewer per layer than a separate silu_and_mul). Measured on the H200
// (bench-results/gemm-h200.md): against the plain GEMM of the same shape, the swapped and mma
// tiles take the same time, the wide wgmma tiles 0-5% longer at M <= 16 (the epilogue's math,
// during which the ring stops streaming).
//
// Residual add and RMSNorm (wgmma kernels): ACCUMULATE adds the product, rounded to bf16, to what
// C holds (a layer's output projection into the residual stream) and writes each new row's sums
// of squares per SQ_COLS columns to `sq_out`; a later launch given those sums as `sq_in` scales
// its rows of the product by 1 / sqrt(mean of squares + eps) before the bias and the SiLU (the
// RMSNorm of A, whose gain the launcher's caller folded into B). Each consumer warpgroup makes
// the factors of its CTA's first M tile right after the dependent-launch wait (of a later M tile,
// before that unit's main loop). So a decode layer runs no norm kernel between its GEMMs. Only the
// `*_fused` instantiations of the tiles carry this code.
//
// Edges: TMA fills rows and columns outside A and B with zeros and the cp.async path
// zero-fills them, so partial tiles need no special case in the main loop; epilogues store only
// inside C. The launcher requires K % 8 == 0 and N % 8 == 0 (16-byte rows: TMA strides, 16-byte
// copies, and bf16 pairs in the epilogue), 16-byte aligned A, B, C and bias.
#include "common.cuh"
#include "wgmma.cuh"

namespace {

using nexus::cp_async_16;
using nexus::cp_async_commit;
using nexus::cp_async_wait;
using nexus::ldmatrix_x4;
using nexus::mbar_arrive;
using nexus::mbar_arrive_expect_tx;
using nexus::mbar_init;
using nexus::mbar_wait;
using nexus::mma_16816;
using nexus::smem_addr;
using nexus::swizzled;
using nexus::TensorMap;

using bf16 = __nv_bfloat16;

constexpr int BK = 64;          // K elements of one pipeline stage: 128 bytes of each tile row
constexpr int ROW_BYTES = 128;  // one tile row of one stage in shared memory
constexpr int GROUP_M = 16;     // tile rows per band of the tile order

// Output tiles of BM x BN, numbered in bands of GROUP_M tile rows, M fastest inside a band.
struct TileOrder {
    int m_tiles, n_tiles, tiles;
    __device__ TileOrder(int m, int n, int bm, int bn)
        : m_tiles((m + bm - 1) / bm), n_tiles((n + bn - 1) / bn), tiles(m_tiles * n_tiles) {}
    __device__ __forceinline__ void coords(int t, int& mt, int& nt) const {
        const int band = t / (GROUP_M * n_tiles);
        const int first = band * GROUP_M;
        const int rows = min(GROUP_M, m_tiles - first);
        const int local = t - first * n_tiles;
        mt = first + local % rows;
        nt = local / rows;
    }
};

// Tiles come from counters[0] in two steps: take_ticket adds one to it, claim turns the number it
// returned into the next tile for this CTA (counting from `first`: the tiles before are taken
// without the counter), or `tiles` when none is left. A CTA that can take its ticket early and
// claim it later hides the atomic's round trip (about a microsecond with HBM busy) behind other
// work. counters[1] counts the takers that found none left (each takes one ticket past its last
// tile, then stops); the last of the `takers` (the grid's CTAs, or its clusters where one CTA of
// each takes for both) resets both for the next launch: every taker has then taken its final ticket.
__device__ __forceinline__ unsigned take_ticket(unsigned* counters) { return atomicAdd(&counters[0], 1u); }

__device__ __forceinline__ int claim(unsigned* counters, unsigned ticket, int tiles, int first, unsigned takers) {
    const unsigned t = static_cast<unsigned>(first) + ticket;
    if (t >= static_cast<unsigned>(tiles)) {
        __threadfence();  // this taker's last take happens before it is counted out
        if (atomicAdd(&counters[1], 1u) == takers - 1) {
            counters[0] = 0;
            counters[1] = 0;
        }
        return tiles;
    }
    return static_cast<int>(t);
}

__device__ __forceinline__ int next_tile(unsigned* counters, int tiles) {
    return claim(counters, take_ticket(counters), tiles, 0, gridDim.x);
}

__device__ __forceinline__ float2 bias_pair(const bf16* __restrict__ bias, int col) {
    if (bias == nullptr) return make_float2(0.f, 0.f);
    return __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(bias + col));
}

__device__ __forceinline__ void store_pair(bf16* p, float x, float y) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(x, y);
}

// Columns of C per square sum (ACCUMULATE's `sq_out`), and of A per one a row norm reads (`sq_in`).
constexpr int SQ_COLS = 64;

// Row norm (`sq_in`): the scales 1 / sqrt(mean of squares + eps) of ROWS rows of A from row0 on
// into `scale`, from their square sums ([m, ceil(k / SQ_COLS)], ACCUMULATE's output), by 128
// threads (`ctid` among them: a wgmma consumer warpgroup, or a stream kernel's first four warps):
// 8 lanes a row, each adding up every eighth sum in order, then a butterfly, the same order in
// every tile. Rows past M get 0.
template <int ROWS>
__device__ __forceinline__ void row_norm_scales(const float* __restrict__ sq_in, float eps, int m, int k, int row0,
                                                int ctid, float* scale) {
    // Row p * 16 + ctid / 8 for each pass p; the loads of every pass and of 4 sums a lane go out
    // together (one by one, a 64-row tile's factors took ~1 us per pass under a streaming GEMM).
    constexpr int PASSES = (ROWS + 15) / 16, AHEAD = 4;
    const int groups = (k + SQ_COLS - 1) / SQ_COLS, lane8 = ctid % 8;
    float sum[PASSES];
#pragma unroll
    for (int p = 0; p < PASSES; ++p) sum[p] = 0.f;
    for (int g0 = lane8; g0 < groups; g0 += 8 * AHEAD) {
        float v[AHEAD][PASSES];
#pragma unroll
        for (int u = 0; u < AHEAD; ++u)
#pragma unroll
            for (int p = 0; p < PASSES; ++p) {
                const int row = p * 16 + ctid / 8, r = row0 + row, g = g0 + 8 * u;
                v[u][p] = row < ROWS && r < m && g < groups ? __ldcg(sq_in + (size_t)r * groups + g) : 0.f;
            }
#pragma unroll
        for (int u = 0; u < AHEAD; ++u)
#pragma unroll
            for (int p = 0; p < PASSES; ++p) sum[p] += v[u][p];
    }
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
        float s = sum[p];
        s += __shfl_xor_sync(0xffffffffu, s, 1);
        s += __shfl_xor_sync(0xffffffffu, s, 2);
        s += __shfl_xor_sync(0xffffffffu, s, 4);
        const int row = p * 16 + ctid / 8, r = row0 + row;
        if (lane8 == 0 && row < ROWS) scale[row] = r < m ? rsqrtf(s / k + eps) : 0.f;
    }
}

// What a kernel stores (the `epilogue` argument; see the top of the file).
enum Epilogue : int { STORE = 0, SILU_AND_MUL = 1, ACCUMULATE = 2 };

// SILU_AND_MUL's interleaved order of B's rows: row q of it is row `gated_row(q, n / 2)` of B
// (blocks of 8 rows alternate gate, up), and when q is a gate row (q & 8 == 0), its output column
// is `gated_col(q)`.
__device__ __forceinline__ int gated_row(int q, int half) { return ((q >> 3) & 1) * half + (q >> 4) * 8 + (q & 7); }
__device__ __forceinline__ int gated_col(int q) { return (q >> 4) * 8 + (q & 7); }

// silu(gate) * up with the fast exponential and division: the epilogue stalls the consumers, and
// so the stream, for as long as it runs; with IEEE division the wide wgmma tiles took 6-12%
// longer than the plain GEMM at M <= 64, with these 0-5%. Very negative gates give 0: exp
// overflows to infinity and __fdividef(x, inf) is 0.
__device__ __forceinline__ float silu_mul(float gate, float up) { return __fdividef(gate, 1.f + __expf(-gate)) * up; }

// ---------------------------------------------------------------------------------------------
// Portable path: cp.async + ldmatrix + mma.sync (sm_80 and newer).

constexpr int MMA_THREADS = 256;    // 8 warps, 2 along M x 4 along N
constexpr int MMA_MAX_STAGES = 16;  // bound of the launch argument `stages`

// Tiles of BM rows of A x BN rows of B. SWAP puts B's rows (the weight) on the mma's m16 side
// and A's (the activations, M <= 16) on its n8 side, the 8 warps stacked along B: for decode-sized
// M, where wgmma's 64-row side would stream a fixed 2 KB of weight per instruction at ~49 cycles
// each (~80 GB/s per SM on the H200), mma.sync takes 512 bytes per instruction fed by ldmatrix.
template <int BM, int BN, bool SWAP = false>
struct MmaConfig {
    static constexpr int TM = SWAP ? BN : BM, TN = SWAP ? BM : BN;  // the mma's M and N sides
    static constexpr int WARPS_M = SWAP ? 8 : 2, WARPS_N = SWAP ? 1 : 4;
    static constexpr int WM = TM / WARPS_M, WN = TN / WARPS_N;  // warp tile
    static constexpr int MI = WM / 16, NI = WN / 8;             // m16 and n8 fragments per warp
    static constexpr int A_BYTES = BM * ROW_BYTES;              // a stage holds A's rows, then B's
    static constexpr int STAGE_BYTES = (BM + BN) * ROW_BYTES;
    static_assert(WM % 16 == 0 && WN % 16 == 0, "warp tiles are whole m16 x n16 blocks");
    static_assert(WARPS_M * WARPS_N * 32 == MMA_THREADS, "8 warps");
};

// Waits until at most `n` committed groups are pending (`n` known only at run time).
__device__ __forceinline__ void cp_async_wait_pending(int n) {
    switch (n) {
        case 1: cp_async_wait<1>(); break;
        case 2: cp_async_wait<2>(); break;
        case 3: cp_async_wait<3>(); break;
        case 4: cp_async_wait<4>(); break;
        case 5: cp_async_wait<5>(); break;
        case 6: cp_async_wait<6>(); break;
        case 7: cp_async_wait<7>(); break;
        case 8: cp_async_wait<8>(); break;
        case 9: cp_async_wait<9>(); break;
        case 10: cp_async_wait<10>(); break;
        case 11: cp_async_wait<11>(); break;
        case 12: cp_async_wait<12>(); break;
        case 13: cp_async_wait<13>(); break;
        case 14: cp_async_wait<14>(); break;
        default: cp_async_wait<0>(); break;  // 0, or more than can be pending: wait for all
    }
}

// Copies rows [row0, row0 + ROWS) x columns [k0, k0 + 64) of the row-major [rows, k] matrix
// `src` into the swizzled tile at `dst`; whatever lies outside the matrix is zero-filled. With
// `gated`, the rows are those of SILU_AND_MUL's interleaved order (see gated_row).
template <int ROWS>
__device__ __forceinline__ void copy_tile_async(uint32_t dst, const bf16* __restrict__ src, int rows, int k, int row0,
                                                int k0, int tid, bool gated = false) {
    constexpr int CHUNKS = ROWS * 8;
#pragma unroll
    for (int j = 0; j < (CHUNKS + MMA_THREADS - 1) / MMA_THREADS; ++j) {
        const int i = tid + j * MMA_THREADS;
        if (CHUNKS % MMA_THREADS != 0 && i >= CHUNKS) break;  // a tile of fewer chunks than threads
        const int r = i >> 3, chunk = i & 7;
        const int q = row0 + r, col = k0 + chunk * 8;
        const bool valid = q < rows && col < k;
        const int row = gated ? gated_row(q, rows / 2) : q;
        cp_async_16(dst + swizzled<ROW_BYTES>(r, chunk), valid ? src + (size_t)row * k + col : src, valid ? 16 : 0);
    }
}

// One stage (64 of K) of a warp's WM x WN tile: `a_tile` holds the rows of the mma's M side,
// `b_tile` those of its N side. `live_mi` m16 fragments hold rows inside the matrix; the others
// are skipped (small M).
template <int BM, int BN, bool SWAP>
__device__ __forceinline__ void mma_stage(
    uint32_t a_tile, uint32_t b_tile,
    float (&acc)[MmaConfig<BM, BN, SWAP>::MI][MmaConfig<BM, BN, SWAP>::NI][4], int wm0, int wn0, int lane,
    int live_mi) {
    using C = MmaConfig<BM, BN, SWAP>;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
        uint32_t af[C::MI][4];
        uint32_t bfr[C::NI][2];
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi) {
            // Lanes 0-15 address rows 0-15 of the fragment at k 0-7, lanes 16-31 the same rows at k 8-15.
            if (mi < live_mi)
                ldmatrix_x4(af[mi], a_tile + swizzled<ROW_BYTES>(wm0 + mi * 16 + (lane & 15), 2 * kk + (lane >> 4)));
        }
#pragma unroll
        for (int nj = 0; nj < C::NI / 2; ++nj) {
            // Matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
            uint32_t r[4];
            ldmatrix_x4(r, b_tile + swizzled<ROW_BYTES>(wn0 + nj * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                        2 * kk + ((lane >> 3) & 1)));
            bfr[2 * nj][0] = r[0];
            bfr[2 * nj][1] = r[1];
            bfr[2 * nj + 1][0] = r[2];
            bfr[2 * nj + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < C::MI; ++mi) {
            if (mi < live_mi) {
#pragma unroll
                for (int ni = 0; ni < C::NI; ++ni) mma_16816(acc[mi][ni], af[mi], bfr[ni][0], bfr[ni][1]);
            }
        }
    }
}

template <int BM, int BN, bool SWAP>
__device__ __forceinline__ void gemm_mma_body(const bf16* __restrict__ a, const bf16* __restrict__ b,
                                              const bf16* __restrict__ bias, bf16* __restrict__ c, int m, int n,
                                              int k, int epilogue, int stages, unsigned* __restrict__ counter) {
    using C = MmaConfig<BM, BN, SWAP>;
    extern __shared__ uint8_t smem_raw[];
    __shared__ int stage_tile[MMA_MAX_STAGES];  // the tile each stage holds; -1 once none is left
    __shared__ int fetched[2];                   // tile numbers from the counter, double-buffered

    const uint32_t smem = (smem_addr(smem_raw) + 127u) & ~127u;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm0 = (warp / C::WARPS_N) * C::WM, wn0 = (warp % C::WARPS_N) * C::WN;
    const TileOrder order(m, n, BM, BN);
    const int k_blocks = (k + BK - 1) / BK;

    // Loader state, the same in every thread: the tile and K block the next stage gets.
    if (tid == 0) fetched[0] = next_tile(counter, order.tiles);
    __syncthreads();
    int fetches = 1;
    int load_tile = fetched[0];
    int load_kb = 0;

    // Fills stage `slot` with the next K block (or marks it empty) and commits one cp.async group.
    auto load_next = [&](int slot) {
        const bool live = load_tile < order.tiles;
        if (tid == 0) stage_tile[slot] = live ? load_tile : -1;
        if (live) {
            int mt, nt;
            order.coords(load_tile, mt, nt);
            const uint32_t dst = smem + slot * C::STAGE_BYTES;
            copy_tile_async<BM>(dst, a, m, k, mt * BM, load_kb * BK, tid);
            copy_tile_async<BN>(dst + C::A_BYTES, b, n, k, nt * BN, load_kb * BK, tid, epilogue == SILU_AND_MUL);
            if (++load_kb == k_blocks) {
                // The tile is fully requested: take the next one. Two slots, so that thread 0 never
                // overwrites a number another thread has yet to read.
                load_kb = 0;
                if (tid == 0) fetched[fetches & 1] = next_tile(counter, order.tiles);
                __syncthreads();
                load_tile = fetched[fetches & 1];
                ++fetches;
            }
        }
        cp_async_commit();
    };

    for (int s = 0; s < stages - 1; ++s) load_next(s);

    float acc[C::MI][C::NI][4];
    int read_stage = 0, write_stage = stages - 1;
    int kb = 0, mt = 0, nt = 0, live_mi = 0;
    for (;;) {
        // The stage about to be read has landed, and every warp is done with the one about to be
        // overwritten (it was read in the previous iteration).
        cp_async_wait_pending(stages - 2);
        __syncthreads();
        if (kb == 0) {
            const int tile = stage_tile[read_stage];
            if (tile < 0) break;
            order.coords(tile, mt, nt);
            // Rows of the mma's M side left in its matrix: A's, or B's when SWAP.
            const int left = SWAP ? n - nt * BN : m - mt * BM;
            live_mi = min(C::MI, max(0, (left - wm0 + 15) / 16));
#pragma unroll
            for (int mi = 0; mi < C::MI; ++mi)
#pragma unroll
                for (int ni = 0; ni < C::NI; ++ni)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
        }
        load_next(write_stage);
        const uint32_t a_tile = smem + read_stage * C::STAGE_BYTES, b_tile = a_tile + C::A_BYTES;
        mma_stage<BM, BN, SWAP>(SWAP ? b_tile : a_tile, SWAP ? a_tile : b_tile, acc, wm0, wn0, lane, live_mi);
        read_stage = read_stage + 1 == stages ? 0 : read_stage + 1;
        write_stage = write_stage + 1 == stages ? 0 : write_stage + 1;
        if (++kb == k_blocks) {
            kb = 0;
            // Epilogue straight from registers: fragment rows g and g + 8, columns 2q and 2q + 1.
            if (epilogue == SILU_AND_MUL) {
                const int width = n / 2;
#pragma unroll
                for (int mi = 0; mi < C::MI; ++mi) {
                    if constexpr (!SWAP) {
                        // Fragment ni (even) holds gate columns, ni + 1 the matching up columns.
                        const int row = mt * BM + wm0 + mi * 16 + (lane >> 2);
#pragma unroll
                        for (int ni = 0; ni < C::NI; ni += 2) {
                            const int col = gated_col(nt * BN + wn0 + ni * 8 + (lane & 3) * 2);
                            const float(&g)[4] = acc[mi][ni];
                            const float(&u)[4] = acc[mi][ni + 1];
                            if (col < width) {
                                if (row < m)
                                    store_pair(c + (size_t)row * width + col, silu_mul(g[0], u[0]), silu_mul(g[1], u[1]));
                                if (row + 8 < m)
                                    store_pair(c + (size_t)(row + 8) * width + col, silu_mul(g[2], u[2]),
                                               silu_mul(g[3], u[3]));
                            }
                        }
                    } else {
                        // Fragment rows g (gate) and g + 8 (up) run along N, its columns along M.
                        const int col = gated_col(nt * BN + wm0 + mi * 16 + (lane >> 2));
#pragma unroll
                        for (int ni = 0; ni < C::NI; ++ni) {
                            const int row = mt * BM + wn0 + ni * 8 + (lane & 3) * 2;
#pragma unroll
                            for (int e = 0; e < 2; ++e) {
                                if (row + e < m && col < width)
                                    c[(size_t)(row + e) * width + col] =
                                        __float2bfloat16_rn(silu_mul(acc[mi][ni][e], acc[mi][ni][e + 2]));
                            }
                        }
                    }
                }
                continue;
            }
#pragma unroll
            for (int mi = 0; mi < C::MI; ++mi) {
#pragma unroll
                for (int ni = 0; ni < C::NI; ++ni) {
                    if constexpr (!SWAP) {
                        const int row = mt * BM + wm0 + mi * 16 + (lane >> 2);
                        const int col = nt * BN + wn0 + ni * 8 + (lane & 3) * 2;
                        if (col < n) {
                            const float2 bb = bias_pair(bias, col);
                            if (row < m)
                                store_pair(c + (size_t)row * n + col, acc[mi][ni][0] + bb.x, acc[mi][ni][1] + bb.y);
                            if (row + 8 < m)
                                store_pair(c + (size_t)(row + 8) * n + col, acc[mi][ni][2] + bb.x,
                                           acc[mi][ni][3] + bb.y);
                        }
                    } else {
                        // Transposed: fragment rows run along N (columns of C), its columns along M.
                        const int col = nt * BN + wm0 + mi * 16 + (lane >> 2);
                        const int row = mt * BM + wn0 + ni * 8 + (lane & 3) * 2;
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int r = row + (e & 1), cc = col + (e >> 1) * 8;
                            if (r < m && cc < n) {
                                const float bb = bias != nullptr ? __bfloat162float(bias[cc]) : 0.f;
                                c[(size_t)r * n + cc] = __float2bfloat16_rn(acc[mi][ni][e] + bb);
                            }
                        }
                    }
                }
            }
        }
    }
    cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------------
// Register-streamed path for decode-sized M: mma.sync fed straight from global loads (sm_80+).
//
// Every other kernel here stages the weight in shared memory: a copy writes each byte once and the
// tensor cores (or ldmatrix) read it once more, and shared memory moves 128 bytes a clock per SM.
// At decode's M that traffic, not DRAM, bounds a kernel on few SMs: two bytes of it per byte of
// weight cap an SM at 64 bytes of weight a clock (~125 GB/s), where a plain read with 128-192 KB in
// flight pulls 160-230 GB/s per SM on 1-16 SMs of an H100 (scripts/probe-register-stream.py,
// bench-results/stream-depth-h100.md). Here no byte of the weight touches shared memory.
//
// The weight's rows are mma.sync's m16 side, the activations its n8 side. A warp multiplies
// slabs of 32 of K: lane (g, t) loads 16 bytes of weight rows g and g + 8 of a 16-row block at K
// 8t..8t+7 of the slab, and the same 16 bytes of activation row g. Read with K permuted alike on
// both sides (values 4h..4h+3 of those 8 are fragment columns 2t, 2t + 1, 2t + 8, 2t + 9 of the
// slab's h-th mma), they are the A and B fragments of two m16n8k16 mmas: no shuffle, no ldmatrix.
// Each warp keeps DEPTH slabs of loads in flight (DEPTH x 2 KB of weight; 16 warps: 96-128 KB a
// SM). Work units are 64 weight rows (columns of C) of one M tile, taken by CTAs in a static
// stride (unit = blockIdx.x + i gridDim.x: no counter); a CTA's 16 warps split a unit two ways
// along its rows and SLICES ways along K (warp slice s takes slabs s, s + SLICES, ...), keep
// loading the CTA's next unit while they finish one, and add their partial sums through shared
// memory in slice order (double-buffered by unit), so the result does not depend on timing. The
// epilogues are those of the wgmma kernels, applied to the sums: STORE (+ bias), SILU_AND_MUL
// (the weight's rows read in gated order), and with FUSED the row norm (sq_in) and ACCUMULATE
// with its square sums (a unit's 64 columns are one SQ_COLS group).
// A first kernel of this kind (bench-results/gemm-h200.md, eighth round) streamed 62 GB/s per SM
// on 16 SMs of the H200 and was dropped; this one was written when the wgmma tiles had reached the
// shared-memory limit, with more in flight, two 16-row blocks per activation load and ~45
// instructions a slab on its common path. Not yet measured: the planner leaves these kernels out.
template <int MT>  // n8 fragments of activation rows: M tiles of 8 MT rows
struct StreamConfig {
    static constexpr int THREADS = 512, WARPS = THREADS / 32;
    static constexpr int BM = 8 * MT;                // rows of A (of C) per M tile
    static constexpr int ROWS = 64;                  // rows of B (columns of C) per unit
    static constexpr int SLAB = 32;                  // K per slab
    static constexpr int RG = 2;                     // 16-row blocks a warp multiplies per slab
    static constexpr int PARTS = ROWS / (16 * RG);   // warps along a unit's rows
    static constexpr int SLICES = WARPS / PARTS;     // warps along K
    static constexpr int DEPTH = MT == 1 ? 4 : 3;    // slabs in flight per warp (registers: 128 a thread)
    static constexpr int PARTIAL_STRIDE = ROWS + 4;  // floats per row of A in a slice's partial sums
    // The partial sums of one unit: [SLICES][BM][PARTIAL_STRIDE] floats, two units' worth.
    static constexpr int PARTIAL_BYTES = 2 * SLICES * BM * PARTIAL_STRIDE * 4;
    static_assert(PARTS * SLICES == WARPS && BM <= WARPS, "a warp per row of the M tile in the epilogue");
    static_assert(PARTIAL_BYTES <= 99 * 1024, "the partial sums fit the shared memory of every GPU from sm_80 on");
};

// 16 bytes of a row of the weight into `v`, if `valid` (else `v` keeps what it held): not kept in
// L1 (no CTA reads them twice). In program order with the other loads (volatile), so that the loop
// keeps its DEPTH slabs in flight.
__device__ __forceinline__ void load_weight(uint4& v, const bf16* p, bool valid = true) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %5, 0;\n"
        "@p ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
        : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
        : "l"(p), "r"(static_cast<int>(valid)));
}
// 16 bytes of a row of the activations, cached in L1 (the CTA's other row half reads them too).
// The previous kernel wrote them: only after wait_for_previous_kernel (volatile keeps it there).
__device__ __forceinline__ void load_activation(uint4& v, const bf16* p, bool valid = true) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %5, 0;\n@p ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n}\n"
        : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w)
        : "l"(p), "r"(static_cast<int>(valid)));
}

template <int MT, bool FUSED>
__device__ __forceinline__ void gemm_stream_body(const bf16* __restrict__ a, const bf16* __restrict__ b,
                                                 const bf16* __restrict__ bias, bf16* __restrict__ c, int m, int n,
                                                 int k, int epilogue, float* __restrict__ sq_out,
                                                 const float* __restrict__ sq_in, float eps) {
    using C = StreamConfig<MT>;
    constexpr int BM = C::BM, RG = C::RG, DEPTH = C::DEPTH, SLICES = C::SLICES, SLAB = C::SLAB;
    if constexpr (!FUSED) {
        sq_out = nullptr;
        sq_in = nullptr;
    }
    extern __shared__ float partials[];  // [2][SLICES][BM][PARTIAL_STRIDE]
    __shared__ float row_scale[2][BM];   // sq_in: the norm's factor of each row of the unit's M tile

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int part = warp / SLICES, slice = warp % SLICES;
    const int m_tiles = (m + BM - 1) / BM, n_units = (n + C::ROWS - 1) / C::ROWS;
    const int units = m_tiles * n_units;
    const int slabs = (k + SLAB - 1) / SLAB;
    // Slabs each warp walks per unit: the same for all, a multiple of DEPTH (so that the slab a
    // buffer holds is the same modulo DEPTH in every unit); those past K are skipped.
    const int steps = ((slabs + SLICES - 1) / SLICES + DEPTH - 1) / DEPTH * DEPTH;
    const bool gated = epilogue == SILU_AND_MUL;
    // The rows of B a lane loads, (r, h) for 16-row block r and fragment row g + 8h, lie r row_r +
    // h row_h elements after its first one (unit_at): 16 and 8 rows on, or for SILU_AND_MUL 8 rows
    // on (the next block of gate rows) and n / 2 rows on (the matching up rows; see gated_row).
    const size_t row_r = static_cast<size_t>(gated ? 8 : 16) * k, row_h = static_cast<size_t>(gated ? n / 2 : 8) * k;

    // Where a unit's loads start: this lane's first weight row at K 8t; its M tile and first row.
    struct Unit {
        const bf16* w;
        int mt, row0;
    };
    auto unit_at = [&](int unit) {
        Unit u;
        u.mt = unit % m_tiles;  // M fastest: CTAs side by side share the weight's rows in L2
        u.row0 = (unit / m_tiles) * C::ROWS;
        const int first = gated ? u.row0 / 2 + part * 8 * RG + g : u.row0 + part * 16 * RG + g;
        u.w = b + static_cast<size_t>(first) * k + 8 * t;
        return u;
    };
    struct Slab {
        uint4 w[RG][2];  // weight rows g and g + 8 of each 16-row block
        uint4 x[MT];     // activation rows g of each n8 fragment
    };
    // Step `j` of unit `u`: slab slice + j SLICES (none past K). A missing row keeps its buffer's
    // old values (weights of an earlier slab, or the zeros the buffers start with: finite, and only
    // in fragment rows that are never stored); in the last slab, cut short by K, the activations
    // past K are zero, so whatever weights face them add nothing.
    auto step_k = [&](int j) { return (slice + j * SLICES) * SLAB; };
    auto load_w = [&](Slab& s, const Unit& u, int j) {
        const int k0 = step_k(j);
        if (k0 >= k) return;
        const bf16* w = u.w + k0;
        if (u.row0 + C::ROWS <= n && k0 + SLAB <= k) {
            // Every row and all of the slab: no predicates to make (a branch the warp takes as one).
#pragma unroll
            for (int r = 0; r < RG; ++r)
#pragma unroll
                for (int h = 0; h < 2; ++h) load_weight(s.w[r][h], w + r * row_r + h * row_h);
            return;
        }
        // A unit cut short by N, or the slab by K: row q (in the unit's order) exists if q < n.
        const bool lane_in = k0 + 8 * t < k;
        const int q = u.row0 + part * 16 * RG + g;
#pragma unroll
        for (int r = 0; r < RG; ++r)
#pragma unroll
            for (int h = 0; h < 2; ++h)
                load_weight(s.w[r][h], w + r * row_r + h * row_h, q + r * 16 + 8 * h < n && lane_in);
    };
    auto load_x = [&](Slab& s, const Unit& u, int j) {
        const int k0 = step_k(j);
        if (k0 >= k) return;
        const bool lane_in = k0 + 8 * t < k;
        // Rows of A past M load nothing (their buffer keeps what it held: they only reach
        // columns of the fragment that are never stored).
        const int row = u.mt * BM + g;
        const bf16* x = a + static_cast<size_t>(row) * k + k0 + 8 * t;
#pragma unroll
        for (int f = 0; f < MT; ++f) {
            load_activation(s.x[f], x + static_cast<size_t>(f * 8) * k, row + f * 8 < m && lane_in);
            if (k0 + SLAB > k && !lane_in) s.x[f] = make_uint4(0u, 0u, 0u, 0u);
        }
    };

    int unit = blockIdx.x;
    if (unit >= units) {
        nexus::follow_previous_kernel();
        return;
    }
    Slab buf[DEPTH];
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) {
#pragma unroll
        for (int r = 0; r < RG; ++r) buf[d].w[r][0] = buf[d].w[r][1] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int f = 0; f < MT; ++f) buf[d].x[f] = make_uint4(0u, 0u, 0u, 0u);
    }
    // The first slabs of weight go out before the wait for the previous kernel (no kernel writes
    // the weight): under a dependent launch they stream while it drains.
    Unit cur = unit_at(unit);
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) load_w(buf[d], cur, d);
    nexus::follow_previous_kernel();
#pragma unroll
    for (int d = 0; d < DEPTH; ++d) load_x(buf[d], cur, d);

    for (int parity = 0; unit < units; unit += gridDim.x, parity ^= 1) {
        const int next_unit = unit + gridDim.x;
        const int mt = cur.mt, row0 = cur.row0;
        // The row norm's factors of the unit's M tile, by the first four warps (the wgmma kernels'
        // order of the sums).
        if (sq_in != nullptr && warp < 4) row_norm_scales<BM>(sq_in, eps, m, k, mt * BM, threadIdx.x, row_scale[parity]);
        // ACCUMULATE: the values of C this warp's epilogue adds to (row `warp` of the M tile,
        // columns row0 + lane and row0 + lane + 32), loaded now to arrive during the main loop.
        float old_c[2] = {0.f, 0.f};
        const int c_row = mt * BM + warp;
        if (FUSED && epilogue == ACCUMULATE && warp < BM && c_row < m) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int col = row0 + lane + 32 * i;
                if (col < n) old_c[i] = __bfloat162float(c[(size_t)c_row * n + col]);
            }
        }

        float acc[RG][MT][4];
#pragma unroll
        for (int r = 0; r < RG; ++r)
#pragma unroll
            for (int f = 0; f < MT; ++f)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[r][f][e] = 0.f;
        for (int j0 = 0; j0 < steps; j0 += DEPTH) {
#pragma unroll
            for (int d = 0; d < DEPTH; ++d) {
                const int j = j0 + d;
                Slab& s = buf[d];
                if (step_k(j) < k) {
#pragma unroll
                    for (int r = 0; r < RG; ++r) {
                        const uint32_t lo[4] = {s.w[r][0].x, s.w[r][1].x, s.w[r][0].y, s.w[r][1].y};
                        const uint32_t hi[4] = {s.w[r][0].z, s.w[r][1].z, s.w[r][0].w, s.w[r][1].w};
#pragma unroll
                        for (int f = 0; f < MT; ++f) {
                            nexus::mma_16816(acc[r][f], lo, s.x[f].x, s.x[f].y);
                            nexus::mma_16816(acc[r][f], hi, s.x[f].z, s.x[f].w);
                        }
                    }
                }
                // Refill with the slab DEPTH steps on: this unit's, or the next unit's first ones
                // (where its loads start is made again for each: fewer registers held).
                if (j + DEPTH < steps) {
                    load_w(s, cur, j + DEPTH);
                    load_x(s, cur, j + DEPTH);
                } else if (next_unit < units) {
                    const Unit next = unit_at(next_unit);
                    load_w(s, next, j + DEPTH - steps);
                    load_x(s, next, j + DEPTH - steps);
                }
            }
        }
        if (next_unit < units) cur = unit_at(next_unit);

        // This warp's partial sums: accumulator (r, f, e) is unit row part*32 + r*16 + g (+8 for
        // e >= 2) and M-tile row f*8 + 2t (+1 for odd e).
        float* const mine = partials + (size_t)(parity * SLICES + slice) * BM * C::PARTIAL_STRIDE;
#pragma unroll
        for (int r = 0; r < RG; ++r)
#pragma unroll
            for (int f = 0; f < MT; ++f)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = part * 16 * RG + r * 16 + g + (e >> 1) * 8, arow = f * 8 + 2 * t + (e & 1);
                    mine[arow * C::PARTIAL_STRIDE + row] = acc[r][f][e];
                }
        // Every slice's sums are in (and the unit two back, which used this buffer, is done:
        // every warp passed its epilogue before arriving here).
        __syncthreads();
        if (warp >= BM || c_row >= m) continue;

        // Epilogue: warp w stores row w of the M tile, adding the slices in order.
        const float* const sums =
            partials + (size_t)parity * SLICES * BM * C::PARTIAL_STRIDE + warp * C::PARTIAL_STRIDE;
        auto unit_sum = [&](int row) {
            float v = 0.f;
#pragma unroll
            for (int sl = 0; sl < SLICES; ++sl) v += sums[(size_t)sl * BM * C::PARTIAL_STRIDE + row];
            return sq_in != nullptr ? v * row_scale[parity][warp] : v;
        };
        if (gated) {
            // Lane i: the gate row (i / 8) * 16 + i % 8 of the unit and its up row 8 further, output
            // column row0 / 2 + i.
            const int row = (lane >> 3) * 16 + (lane & 7), col = row0 / 2 + lane;
            if (row0 + row < n)
                c[(size_t)c_row * (n / 2) + col] = __float2bfloat16_rn(silu_mul(unit_sum(row), unit_sum(row + 8)));
            continue;
        }
        float square = 0.f;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int row = lane + 32 * i, col = row0 + row;
            if (col >= n) continue;
            float v = unit_sum(row);
            if (bias != nullptr) v += __bfloat162float(bias[col]);
            if (FUSED && epilogue == ACCUMULATE) {
                // What is stored: C's value + the product rounded to bf16, rounded again.
                v = __bfloat162float(__float2bfloat16_rn(old_c[i] + __bfloat162float(__float2bfloat16_rn(v))));
                square += v * v;
            }
            c[(size_t)c_row * n + col] = __float2bfloat16_rn(v);
        }
        if (sq_out != nullptr && epilogue == ACCUMULATE) {
            // The unit's 64 columns are one SQ_COLS group: a lane's two, then a butterfly.
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) square += __shfl_xor_sync(0xffffffffu, square, o);
            if (lane == 0) sq_out[(size_t)c_row * ((n + SQ_COLS - 1) / SQ_COLS) + row0 / SQ_COLS] = square;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Hopper path: TMA + mbarriers + wgmma, warp-specialized (sm_90a).

// Threads of a wgmma kernel with tiles of BM (rows of A) x BN (rows of B): a producer warpgroup
// and one consumer warpgroup per 64 rows of wgmma's M side (B's rows when SWAP, else A's).
constexpr int wgmma_threads(int bm, int bn, bool swap) { return 128 * (1 + (swap ? bn : bm) / 64); }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// old + v for 8 packed bf16 values each, rounded to bf16 (v is already rounded: the residual add
// this replaces added the layer's stored bf16 output in f32).
__device__ __forceinline__ uint4 add_bf16x8(uint4 old, uint4 v) {
    uint32_t o[4] = {old.x, old.y, old.z, old.w};
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&o[i]));
        const float2 b = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
        o[i] = nexus::pack_bf16(a.x + b.x, a.y + b.y);
    }
    return make_uint4(o[0], o[1], o[2], o[3]);
}

// The sum of the squares of 8 packed bf16 values, in order.
__device__ __forceinline__ float square_sum8(uint4 v) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 a = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
        sum += a.x * a.x;
        sum += a.y * a.y;
    }
    return sum;
}

// A consumer warp's epilogue buffer in the plain tiles (after the ring; the launcher sizes it, the
// swapped tiles store their few rows directly): its 16 rows of C, 64 columns (128 bytes) at a time.
constexpr int STAGING_ROWS = 16;
constexpr int STAGING_BYTES_PER_WARP = STAGING_ROWS * ROW_BYTES;

// Tiles of BM (rows of A) x BN (rows of B); SWAP puts B's rows on wgmma's M side.
template <int BM, int BN, bool SWAP>
struct WgmmaConfig {
    static constexpr int MMA_ROWS = SWAP ? BN : BM;  // wgmma M side: 64 per consumer warpgroup
    static constexpr int MMA_N = SWAP ? BM : BN;     // wgmma N
    static constexpr int CONSUMERS = MMA_ROWS / 64;
    static constexpr int A_BYTES = BM * ROW_BYTES, B_BYTES = BN * ROW_BYTES;
    static constexpr int STAGE_BYTES = A_BYTES + B_BYTES;
    // The ring takes what a CTA may have (227 KB) less the epilogue buffers, the slack of the
    // dynamic ring's 1024-byte alignment and what the static arrays may take (barriers, row scales,
    // square sums); the launcher sizes it the same way.
    static constexpr int STAGING_BYTES = SWAP ? 0 : CONSUMERS * 4 * STAGING_BYTES_PER_WARP;
    static constexpr int RING_ALIGN_BYTES = 1024, STATIC_BYTES = SWAP ? 4096 : 2048;
    static constexpr int RING_BYTES = 227 * 1024 - STAGING_BYTES - RING_ALIGN_BYTES - STATIC_BYTES;
    static constexpr int STAGES = RING_BYTES / STAGE_BYTES < 16 ? RING_BYTES / STAGE_BYTES : 16;
    // Independent accumulator sets of a consumer: the 4 wgmmas of a K block go round-robin into
    // them and are summed in the epilogue. A chain of dependent wgmma m64n16k16 runs at their
    // latency (~85 clocks each: 8 KB of weight per ~340 clocks, ~47 GB/s per SM), not at their
    // throughput, so the narrow swapped tiles keep 4 chains in flight (n32: 2, which holds the
    // same 32 accumulators); wide ones are math-bound.
    static constexpr int ACC_SETS = MMA_N <= 16 ? BK / 16 : MMA_N <= 32 ? BK / 32 : 1;
    static_assert(MMA_ROWS % 64 == 0 && (CONSUMERS <= 2 || (SWAP && CONSUMERS <= 4)),
                  "one or two consumer warpgroups of 64 rows, or three or four of a swapped tile");
    // With two consumers (128 x 256 tiles: 128 accumulators each), the producer warpgroup gives
    // them its registers. Four (swapped, 32 accumulators each) fit the even split.
    static constexpr int PRODUCER_REGS = 40, CONSUMER_REGS = 232;
    static_assert(CONSUMERS != 2 ||
                      nexus::register_split_fits(128 * (1 + CONSUMERS), PRODUCER_REGS, CONSUMERS, CONSUMER_REGS),
                  "the consumers' registers come from what the producer gives back");
    static_assert(A_BYTES % 1024 == 0 && B_BYTES % 1024 == 0, "swizzled tiles start on 1024-byte boundaries");
};

using nexus::desc_advance;
using nexus::smem_desc;
using nexus::touch;
using nexus::Wgmma;
using nexus::wgmma_commit;
using nexus::wgmma_fence;
using nexus::wgmma_wait;

// Box {64 of K, rows} at (k0, row0) of the tensor map into shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const TensorMap* map, int k0, int row0, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
            dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(row0), "r"(bar)
        : "memory");
}

// The same with a 3-D map at (k0, row0, z).
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const TensorMap* map, int k0, int row0, int z, uint32_t bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
        "[%5];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(row0), "r"(z), "r"(bar)
        : "memory");
}

// ---- Pairs: clusters of two CTAs that share their tiles of B (gemm_wgmma_pair_*) ---------------
// The cluster's CTA 0 computes M tile 2p of a pair tile p, CTA 1 M tile 2p + 1, over the same N
// tile. One thread of CTA 0 loads for both: each K block's slice of B once, multicast into both
// CTAs' rings (L2 serves it once for two SMs), and each CTA's slice of A. It also publishes each
// stage's work unit in both CTAs and arms both CTAs' `full` barriers, and it waits for CTA 0's
// `empty` barriers, on which the consumer warps of both CTAs arrive. So a prefill GEMM reads a
// third fewer bytes from L2 per FLOP with 128 x 256 tiles (48 KB a stage per SM become 32). Built
// to spare a decode lane beside a prefill the prefill's L2 traffic; measured on the H100
// (bench-results/nexus-vs-chunked-h100.md), it runs 0.88-1.08x the plain tile's speed (median
// 0.98) and leaves the decode GEMM beside it 1.35-1.36x its time alone, against 1.37-1.43x beside
// the plain tile: not what slows decode, so the planner does not pick it.

__device__ __forceinline__ uint32_t cluster_rank() {
    uint32_t rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
    return rank;
}

// The address in CTA `rank` of the cluster of what `addr` is in this CTA.
__device__ __forceinline__ uint32_t cluster_addr(uint32_t addr, uint32_t rank) {
    uint32_t out;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(out) : "r"(addr), "r"(rank));
    return out;
}

// Every thread of both CTAs: what each wrote before is visible to all after (release, acquire).
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}

__device__ __forceinline__ void st_cluster(uint32_t addr, int value) {
    asm volatile("st.shared::cluster.s32 [%0], %1;\n" ::"r"(addr), "r"(value) : "memory");
}

// mbar_arrive and mbar_arrive_expect_tx on a barrier of any CTA of the cluster (an address from
// cluster_addr). CLUSTER: releasing this thread's writes at cluster scope, for a thread of the
// other CTA to read after its wait; that costs a fence of cluster scope, so only the arrives that
// publish a stage's work unit to the other CTA take it (once a unit). The others order no data:
// TMA's bytes are counted by the barrier itself, and a consumer's release of a stage follows its
// wgmma's reads of it (wgmma_wait) and its lane 0's read of the stage's unit (which the wgmma's
// tile coordinates depend on), so CTA 0's next write of either cannot overtake them.
template <bool CLUSTER>
__device__ __forceinline__ void mbar_arrive_remote(uint32_t bar) {
    if constexpr (CLUSTER)
        asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(bar) : "memory");
    else
        asm volatile("mbarrier.arrive.release.cta.shared::cluster.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
template <bool CLUSTER>
__device__ __forceinline__ void mbar_arrive_expect_tx_remote(uint32_t bar, uint32_t bytes) {
    if constexpr (CLUSTER)
        asm volatile("mbarrier.arrive.expect_tx.release.cluster.shared::cluster.b64 _, [%0], %1;\n" ::"r"(bar),
                     "r"(bytes)
                     : "memory");
    else
        asm volatile("mbarrier.arrive.expect_tx.release.cta.shared::cluster.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                     : "memory");
}

// tma_load and tma_load_3d into the CTAs of the cluster whose bits `ctas` holds, each at dst's
// offset and completing on the barrier at bar's offset in that CTA.
__device__ __forceinline__ void tma_load_multicast(uint32_t dst, const TensorMap* map, int k0, int row0, uint32_t bar,
                                                   uint16_t ctas) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, "
        "{%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(row0), "r"(bar), "h"(ctas)
        : "memory");
}
__device__ __forceinline__ void tma_load_3d_multicast(uint32_t dst, const TensorMap* map, int k0, int row0, int z,
                                                      uint32_t bar, uint16_t ctas) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, "
        "{%2, %3, %4}], [%5], %6;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(k0), "r"(row0), "r"(z), "r"(bar), "h"(ctas)
        : "memory");
}

// Stores a consumer warp's 16 rows x COLS columns of C (rows row0.., columns col0.. of a row-major
// C with `width` columns, `m` rows) through its staging buffer at `staging`. pairs(j) gives the
// thread's values of columns 8j + 2 (lane % 4) and + 1 (wgmma's accumulator layout) in rows
// lane / 4 (.x) and lane / 4 + 8 (.y), each pair packed as bf16: one call per column pair, so what
// the two rows share (a bias pair) is read once. Stored straight from the accumulators, each
// 4-byte store of a warp hit 8 rows, so 8 partly written sectors, 64 such stores per thread for a
// 128 x 256 tile, while the tensor cores waited: the K = 4096 shapes ran 0.91-0.93x cuBLAS even
// on 8 SMs, the K = 14336 one (3.5x the math per tile) 0.98x. Here the warp writes 64 columns
// of its rows to shared memory (swizzled: the 8 rows of one store fall in 8 bank groups), then
// reads them back as 16-byte pieces along the rows, so each store of the warp writes 4 whole
// 128-byte rows of C: 0.92-0.97x the time at K = 4096 on the H200, and as fast as with no global
// stores at all (bench-results/gemm-h200.md). `width` is a multiple of 8: a piece is inside C or not.
//
// With `sq` (ACCUMULATE; then COLS and col0 are multiples of SQ_COLS), each piece is added to what
// C holds there, and the sums of squares of each row's new values, per SQ_COLS columns, go to `sq`
// ([m, ceil(width / SQ_COLS)]): a chunk is one such group; the 8 lanes of a row (lane / 8) each
// add up their piece in order, then the 8 sums go through a butterfly, the same in every tile.
template <int COLS, typename Pairs>
__device__ __forceinline__ void store_rows_staged(uint32_t staging, bf16* __restrict__ c, int m, int width, int row0,
                                                  int col0, int lane, Pairs pairs, float* __restrict__ sq = nullptr) {
    constexpr int BLOCKS = COLS / 8;                          // 8-column blocks of the rows
    constexpr int CHUNK = BLOCKS < 8 ? BLOCKS : 8;            // blocks staged at a time
    constexpr int PIECES = STAGING_ROWS * CHUNK / 32;         // 16-byte pieces per thread per chunk
    static_assert(BLOCKS % CHUNK == 0 && PIECES >= 1, "whole chunks of 32 to 64 columns");
    const int groups = (width + SQ_COLS - 1) / SQ_COLS;
    // With `sq`, C's pieces of a chunk are loaded all at once (one after the other, each load
    // waited for the store before it: they might alias, for the compiler), a chunk ahead where the
    // tile has two (loaded just before its stores, a chunk waited a round trip to L2); the 256-wide
    // tiles, which have four, would spill the registers that takes.
    constexpr bool AHEAD = BLOCKS == 2 * CHUNK;
    auto load_old = [&](int j0, uint4 (&old)[PIECES]) {
#pragma unroll
        for (int i = 0; i < PIECES; ++i) {
            const int piece = i * 32 + lane, row = piece / CHUNK, block = piece % CHUNK;
            const int r = row0 + row, col = col0 + (j0 + block) * 8;
            old[i] = r < m && col < width ? *reinterpret_cast<const uint4*>(c + (size_t)r * width + col)
                                          : make_uint4(0, 0, 0, 0);
        }
    };
    uint4 old[PIECES];
    if (sq != nullptr && AHEAD) load_old(0, old);
#pragma unroll
    for (int j0 = 0; j0 < BLOCKS; j0 += CHUNK) {
        uint4 next[PIECES];
        if (sq != nullptr && AHEAD && j0 == 0) load_old(CHUNK, next);
        if (sq != nullptr && !AHEAD) load_old(j0, old);
#pragma unroll
        for (int j = 0; j < CHUNK; ++j) {
            const uint2 v = pairs(j0 + j);
            const uint32_t at = staging + swizzled<ROW_BYTES>(lane / 4, j) + (lane % 4) * 4;
            const uint32_t at8 = at + 8 * ROW_BYTES;  // the swizzle depends on the row modulo 8
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at), "r"(v.x) : "memory");
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at8), "r"(v.y) : "memory");
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < PIECES; ++i) {
            const int piece = i * 32 + lane, row = piece / CHUNK, block = piece % CHUNK;
            uint4 v;
            asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                         : "r"(staging + swizzled<ROW_BYTES>(row, block))
                         : "memory");
            const int r = row0 + row, col = col0 + (j0 + block) * 8;
            const bool inside = r < m && col < width;
            if (sq != nullptr) {
                v = add_bf16x8(old[i], v);
                float sum = inside ? square_sum8(v) : 0.f;
                sum += __shfl_xor_sync(0xffffffffu, sum, 1);
                sum += __shfl_xor_sync(0xffffffffu, sum, 2);
                sum += __shfl_xor_sync(0xffffffffu, sum, 4);
                const int first = col0 + j0 * 8;
                if (block == 0 && r < m && first < width) sq[(size_t)r * groups + first / SQ_COLS] = sum;
            }
            if (inside) *reinterpret_cast<uint4*>(c + (size_t)r * width + col) = v;
        }
        __syncwarp();  // every lane has read the chunk before the next one overwrites it
        if (sq != nullptr && AHEAD && j0 == 0) {
#pragma unroll
            for (int i = 0; i < PIECES; ++i) old[i] = next[i];
        }
    }
}

// Named barrier 1 of the consumer warpgroups (the producer's have returned or wait elsewhere).
template <int CONSUMERS>
__device__ __forceinline__ void consumers_barrier() {
    asm volatile("bar.sync 1, %0;\n" ::"n"(CONSUMERS * 128) : "memory");
}

// FUSED: the instantiation that runs the residual add and row norm (`*_fused` kernels); the
// others compile none of their code (with it, unfused launches ran 1-3% slower, H100). PAIR: a
// cluster of two CTAs sharing B (see cluster_rank; no split-K, no swapped tiles).
template <int BM, int BN, bool SWAP, bool FUSED, bool PAIR>
__device__ __forceinline__ void gemm_wgmma_body(const TensorMap* tmap_a, const TensorMap* tmap_b,
                                                const bf16* __restrict__ bias, bf16* __restrict__ c, int m, int n,
                                                int k, int epilogue, float* __restrict__ sq_out,
                                                const float* __restrict__ sq_in, float eps, int splits,
                                                int early_stages, float* __restrict__ partials,
                                                unsigned* __restrict__ tile_arrivals, unsigned* __restrict__ counter) {
    using C = WgmmaConfig<BM, BN, SWAP>;
    static_assert(!(PAIR && SWAP), "pairs of plain tiles only");
    if constexpr (!FUSED) {
        // Null pointers the compiler sees remove the fused code from this instantiation.
        sq_out = nullptr;
        sq_in = nullptr;
    }
    constexpr int STAGES = C::STAGES;
    // Rows of A a consumer warpgroup's row norm covers: the whole tile's when swapped (every
    // consumer has all of them), else its own 64.
    constexpr int NORM_ROWS = SWAP ? BM : 64;
    __shared__ float row_scale[C::CONSUMERS][NORM_ROWS];
    __shared__ int row_scale_mt[C::CONSUMERS];  // the M tile whose factors row_scale holds; -1: none
    // ACCUMULATE, swapped: each warp's square sums of its 16 columns, per row of the tile.
    __shared__ float warp_sq[SWAP ? C::CONSUMERS : 1][4][SWAP ? BM : 1];
    extern __shared__ uint8_t smem_raw[];
    __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES];
    __shared__ int stage_tile[STAGES];  // the work unit each stage holds; -1: none left
    __shared__ int last_split;          // split-K: whether this CTA completes the tile's sum

    const uint32_t ring = (smem_addr(smem_raw) + 1023u) & ~1023u;
    const int tid = threadIdx.x;
    // Read from lane 0, so that the compiler knows it is the same across the warp and keeps what
    // derives from it (the consumers' wgmma descriptors) in uniform registers.
    const int warpgroup = __shfl_sync(0xffffffffu, tid / 128, 0);
    // Pairs number their tiles of 2 BM rows; each CTA computes its half.
    const uint32_t rank = PAIR ? cluster_rank() : 0;
    const TileOrder order(m, n, PAIR ? 2 * BM : BM, BN);
    const int first_unit = PAIR ? blockIdx.x / 2 : blockIdx.x;
    const unsigned takers = PAIR ? gridDim.x / 2 : gridDim.x;
    // The M tile this CTA computes of tile t, and its N tile.
    auto own_coords = [&](int t, int& mt, int& nt) {
        order.coords(t, mt, nt);
        if (PAIR) mt = 2 * mt + static_cast<int>(rank);
    };
    const int k_blocks = (k + BK - 1) / BK;
    // Work units: split `s` of tile `t` is unit t * splits + s, and covers K blocks
    // [s * k_blocks / splits, (s + 1) * k_blocks / splits).
    const int units = order.tiles * splits;
    auto unit_k_blocks = [&](int unit, int& kb0, int& kb1) {
        const int s = unit % splits;
        kb0 = s * k_blocks / splits;
        kb1 = (s + 1) * k_blocks / splits;
    };
    // K block kb of B's tile nt. For SILU_AND_MUL, through B's 3-D map (64 of K, row, gate or
    // up): a box of BN / 2 rows of both halves; swapped, through its 4-D map (64 of K, 8 rows, gate
    // or up, block of 8 rows): a box of BN / 16 blocks, which lands as the interleaved rows.
    // Pairs: into both CTAs.
    auto load_b = [&](uint32_t dst, int kb, int nt, uint32_t bar) {
        if constexpr (PAIR) {
            if (epilogue != SILU_AND_MUL)
                tma_load_multicast(dst, tmap_b, kb * BK, nt * BN, bar, 3);
            else
                tma_load_3d_multicast(dst, tmap_b, kb * BK, nt * (BN / 2), 0, bar, 3);
        } else if (epilogue != SILU_AND_MUL) {
            tma_load(dst, tmap_b, kb * BK, nt * BN, bar);
        } else if constexpr (SWAP) {
            nexus::tma_load_4d(dst, tmap_b, kb * BK, 0, 0, nt * (BN / 16), bar);
        } else {
            tma_load_3d(dst, tmap_b, kb * BK, nt * (BN / 2), 0, bar);
        }
    };
    // K block kb of A's tile mt (the order's numbering); pairs: M tile 2 mt here, 2 mt + 1 in CTA 1.
    auto load_a = [&](uint32_t dst, int kb, int mt, uint32_t bar) {
        if constexpr (PAIR) {
            tma_load(dst, tmap_a, kb * BK, 2 * mt * BM, bar);
            tma_load_multicast(dst, tmap_a, kb * BK, (2 * mt + 1) * BM, bar, 2);
        } else {
            tma_load(dst, tmap_a, kb * BK, mt * BM, bar);
        }
    };
    // The producer's side of a stage: publishes the unit it holds (-1: none left) and arrives on
    // its `full` barrier, which then waits for `bytes` from TMA; pairs: in both CTAs, the unit to
    // the other only where its consumers read it (`first`: a unit's first stage, or the end).
    auto publish = [&](int stage, int unit, uint32_t bytes, bool first) {
        stage_tile[stage] = unit;
        const uint32_t bar = smem_addr(&full[stage]);
        mbar_arrive_expect_tx(bar, bytes);
        if constexpr (PAIR) {
            if (first) {
                st_cluster(cluster_addr(smem_addr(&stage_tile[stage]), 1), unit);
                mbar_arrive_expect_tx_remote<true>(cluster_addr(bar, 1), bytes);
            } else {
                mbar_arrive_expect_tx_remote<false>(cluster_addr(bar, 1), bytes);
            }
        }
    };
    // Waits for a phase of a stage's `full` (consumers) or `empty` (producer) barrier; pairs, at
    // a unit's `first` stage: acquiring what the other CTA wrote before it arrived (the unit it
    // published, or read before it gave the stage back).
    auto wait = [&](uint64_t* bar, uint32_t parity, bool first) {
        if (PAIR && first)
            mbar_wait<true>(smem_addr(bar), parity);
        else
            mbar_wait(smem_addr(bar), parity);
    };

    if (tid == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(smem_addr(&full[s]), 1);                    // the producer's arrive + the TMA bytes
            mbar_init(smem_addr(&empty[s]), C::CONSUMERS * 4 * (PAIR ? 2 : 1));  // an arrive per consumer warp
        }
        if constexpr (FUSED)
            for (int c = 0; c < C::CONSUMERS; ++c) row_scale_mt[c] = -1;
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap_a)) : "memory");
        asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap_b)) : "memory");
    }
    // Pairs: both CTAs' barriers are initialized before either loads into or arrives on the other's.
    if constexpr (PAIR)
        cluster_sync();
    else
        __syncthreads();

    if (warpgroup == 0) {
        // Producer: one thread loads; with two consumer warpgroups, the producer warpgroup gives
        // its registers to them (128 accumulators each for 128 x 256 tiles).
        if constexpr (C::CONSUMERS == 2) nexus::setmaxnreg_dec<C::PRODUCER_REGS>();
        if (tid != 0 || rank != 0) {
            nexus::follow_previous_kernel();
            return;
        }
        // Each CTA's first unit is its own (the grid has at most one CTA per unit), the later
        // ones come from the counter. Under a dependent launch the first unit's first ring of B
        // slices (the weight, which no kernel writes) is requested before waiting for the previous
        // kernel (`early_stages`, from the host: the ring's), so that the weight stream starts
        // while that kernel drains; A, which it wrote, and the counter, which the previous GEMM's
        // last CTA reset, only after the wait. Launched otherwise the wait returns at once and
        // nothing is requested before it (`early_stages` 0): each stage's A then follows its B,
        // where a whole ring of B ahead of the first A held the first stage, and so the ring's
        // refill, back until the ring had landed.
        int unit = first_unit;
        int early = 0;  // the first unit's K blocks whose B slice is already in flight
        if (unit < units) {
            int mt, nt, kb0, kb1;
            order.coords(unit / splits, mt, nt);
            unit_k_blocks(unit, kb0, kb1);
            early = min(min(STAGES, early_stages), kb1 - kb0);
            for (int s = 0; s < early; ++s) {
                publish(s, unit, C::STAGE_BYTES, s == 0);
                load_b(ring + s * C::STAGE_BYTES + C::A_BYTES, kb0 + s, nt, smem_addr(&full[s]));
            }
        }
        nexus::follow_previous_kernel();
        int stage = 0;
        uint32_t phase = 0;
        for (bool first = true;; first = false) {
            if (!first) wait(&empty[stage], phase ^ 1, true);
            if (unit >= units) {
                // Tell the consumers there is nothing more: a stage holding no data.
                publish(stage, -1, 0, true);
                return;
            }
            // The unit after this one: its ticket is taken now and claimed once this unit's loads
            // are issued. Taken at the boundary instead, the atomic's round trip left the ring to
            // drain there: ~1.5 us per unit at M = 1 on the H200 (the gemm-row table).
            const unsigned ticket = take_ticket(counter);
            int mt, nt, kb0, kb1;
            order.coords(unit / splits, mt, nt);
            unit_k_blocks(unit, kb0, kb1);
            for (int kb = kb0; kb < kb1; ++kb) {
                const bool b_in_flight = first && kb - kb0 < early;
                const uint32_t bar = smem_addr(&full[stage]);
                const uint32_t dst = ring + stage * C::STAGE_BYTES;
                if (!b_in_flight) {
                    if (kb > kb0) wait(&empty[stage], phase ^ 1, false);
                    // Published to the consumers by the arrive (release) and their wait (acquire).
                    publish(stage, unit, C::STAGE_BYTES, kb == kb0);
                    load_b(dst + C::A_BYTES, kb, nt, bar);
                }
                load_a(dst, kb, mt, bar);
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
            }
            unit = claim(counter, ticket, units, takers, takers);
        }
    } else {
        if constexpr (C::CONSUMERS == 2) nexus::setmaxnreg_inc<C::CONSUMER_REGS>();
        nexus::follow_previous_kernel();
        const int consumer = warpgroup - 1;  // rows [64 consumer, 64 consumer + 64) of the wgmma M side
        const int warp = (tid / 32) % 4, lane = tid % 32;
        // The row norm's factors for the M tile of the CTA's first unit (its own: blockIdx.x), now,
        // while the producer's first loads of A are in flight; made at that unit's start instead,
        // they held its main loop back by a round trip with the ring full.
        auto make_row_scales = [&](int mt) {
            row_norm_scales<NORM_ROWS>(sq_in, eps, m, k, mt * BM + (SWAP ? 0 : consumer * 64), tid - 128 * warpgroup,
                                       row_scale[consumer]);
            if (tid - 128 * warpgroup == 0) row_scale_mt[consumer] = mt;
        };
        if (sq_in != nullptr && first_unit < units) {
            int mt, nt;
            own_coords(first_unit / splits, mt, nt);
            make_row_scales(mt);
            consumers_barrier<C::CONSUMERS>();
        }
        constexpr int SETS = C::ACC_SETS;
        float acc[Wgmma<C::MMA_N>::REGS];
        float part[SETS > 1 ? SETS - 1 : 1][Wgmma<C::MMA_N>::REGS];  // sets 1.. (set 0 is acc)
        float old_c[SWAP ? C::MMA_N / 2 : 1];                          // ACCUMULATE, swapped: C's values
#pragma unroll
        for (int i = 0; i < Wgmma<C::MMA_N>::REGS; ++i) acc[i] = 0.f;
#pragma unroll
        for (int s = 0; s < (SETS > 1 ? SETS - 1 : 1); ++s)
#pragma unroll
            for (int i = 0; i < Wgmma<C::MMA_N>::REGS; ++i) part[s][i] = 0.f;
        int stage = 0;
        uint32_t phase = 0;
        // Pairs: a stage goes back to CTA 0's producer, which loads both CTAs' rings.
        auto release = [&](int stage) {
            if (PAIR && rank != 0)
                mbar_arrive_remote<false>(cluster_addr(smem_addr(&empty[stage]), 0));
            else
                mbar_arrive(smem_addr(&empty[stage]));
        };
        for (;;) {
            wait(&full[stage], phase, true);
            // Lane 0 reads the unit for its warp: it alone gives the stage back, so its read is
            // ordered before the producer's next write by that arrive (racecheck on the H200
            // flagged the other lanes' reads, which no arrive ordered).
            int unit = 0;
            if (lane == 0) unit = stage_tile[stage];
            unit = __shfl_sync(0xffffffffu, unit, 0);
            if (unit < 0) return;
            const int tile = unit / splits;
            int mt, nt, kb0, kb1;
            own_coords(tile, mt, nt);
            unit_k_blocks(unit, kb0, kb1);
            if (sq_in != nullptr && row_scale_mt[consumer] != mt) {
                // A unit of another M tile (a decode step has one): its factors before the main
                // loop; the barriers keep the last unit's epilogue reads before these writes, and
                // these before this unit's reads.
                consumers_barrier<C::CONSUMERS>();
                make_row_scales(mt);
                consumers_barrier<C::CONSUMERS>();
            }
            if constexpr (SWAP) {
                // ACCUMULATE: the thread's values of C (rows j * 8 + 2 (lane % 4) (+1), columns
                // r0 and r0 + 8 of the epilogue below) are loaded now, to arrive during the main
                // loop (loaded in the epilogue, they cost a round trip there).
                if (FUSED && epilogue == ACCUMULATE) {
                    const int col = nt * BN + consumer * 64 + warp * 16 + (lane >> 2);
#pragma unroll
                    for (int j = 0; j < C::MMA_N / 8; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int r = mt * BM + j * 8 + (lane & 3) * 2 + (e & 1), cc = col + (e >> 1) * 8;
                            old_c[4 * j + e] = r < m && cc < n ? __bfloat162float(c[(size_t)r * n + cc]) : 0.f;
                        }
                }
            }
            int previous = stage;
            for (int kb = 0; kb < kb1 - kb0; ++kb) {
                if (kb > 0) wait(&full[stage], phase, false);
                const uint32_t a_tile = ring + stage * C::STAGE_BYTES;
                const uint32_t b_tile = a_tile + C::A_BYTES;
                // The wgmma M side reads 64 rows of its tile, the N side all rows of the other.
                const uint32_t m_side = (SWAP ? b_tile : a_tile) + consumer * 64 * ROW_BYTES;
                const uint32_t n_side = SWAP ? a_tile : b_tile;
                const uint64_t m_desc = smem_desc(m_side), n_desc = smem_desc(n_side);
                wgmma_fence();
#pragma unroll
                for (int kk = 0; kk < BK / 16; ++kk) {
                    // 16 of K = 32 bytes further along the (swizzled) rows. Set kk % SETS; each
                    // set starts from zero at its first wgmma of the tile.
                    const uint64_t da = desc_advance(m_desc, kk * 32), db = desc_advance(n_desc, kk * 32);
                    if (SETS == 1 || kk % SETS == 0) {
                        Wgmma<C::MMA_N>::run(acc, da, db, kb > 0 || kk > 0);
                    } else {
                        Wgmma<C::MMA_N>::run(part[(kk % SETS) - 1], da, db, kb > 0 || kk >= SETS);
                    }
                }
                wgmma_commit();
                if (kb > 0) {
                    // The previous stage's wgmma group has finished reading: give the stage back.
                    wgmma_wait<1>();
                    if (lane == 0) release(previous);
                }
                previous = stage;
                if (++stage == STAGES) {
                    stage = 0;
                    phase ^= 1;
                }
            }
            wgmma_wait<0>();
            touch(acc);
            if constexpr (SETS > 1) {
#pragma unroll
                for (int s = 0; s < SETS - 1; ++s) {
                    touch(part[s]);
#pragma unroll
                    for (int i = 0; i < Wgmma<C::MMA_N>::REGS; ++i) acc[i] += part[s][i];
                }
            }
            if (lane == 0) release(previous);

            if (splits > 1) {
                // Split-K: every split stores its partial sums (thread-fastest, so the stores
                // coalesce) and counts itself in; the tile's last split adds all of them, in
                // split order whatever the order of arrival, and stores C. It also resets the
                // tile's count for the next launch.
                constexpr int REGS = Wgmma<C::MMA_N>::REGS;
                const int ctid = tid - 128;  // among the consumer threads
                const size_t tile_floats = static_cast<size_t>(C::CONSUMERS) * 128 * REGS;
                float* mine = partials + static_cast<size_t>(unit) * tile_floats + ctid;
#pragma unroll
                for (int i = 0; i < REGS; ++i) mine[i * C::CONSUMERS * 128] = acc[i];
                __threadfence();
                consumers_barrier<C::CONSUMERS>();
                if (ctid == 0) last_split = atomicAdd(&tile_arrivals[tile], 1u) == static_cast<unsigned>(splits - 1);
                consumers_barrier<C::CONSUMERS>();
                if (!last_split) continue;
                __threadfence();
                const float* parts = partials + static_cast<size_t>(tile) * splits * tile_floats + ctid;
#pragma unroll
                for (int i = 0; i < REGS; ++i) acc[i] = 0.f;
                for (int sp = 0; sp < splits; ++sp)
#pragma unroll
                    for (int i = 0; i < REGS; ++i) acc[i] += __ldcg(parts + sp * tile_floats + i * C::CONSUMERS * 128);
                if (ctid == 0) tile_arrivals[tile] = 0;
            }

            // Epilogue straight from registers. Accumulator 4j + e of this thread is row
            // 16 warp + lane / 4 (+ 8 for e >= 2) of the wgmma M side, column 8j + 2 (lane % 4)
            // (+ 1 for odd e) of its N side.
            const int r0 = consumer * 64 + warp * 16 + (lane >> 2);
            const int c0 = (lane & 3) * 2;
            const int warp_row0 = mt * BM + consumer * 64 + warp * 16;  // the plain tiles' first row of this warp
            const uint32_t staging =
                ring + STAGES * C::STAGE_BYTES + (consumer * 4 + warp) * STAGING_BYTES_PER_WARP;
            if (sq_in != nullptr) {
                // The row norm: each row of the product scaled (before the bias and the SiLU).
#pragma unroll
                for (int j = 0; j < C::MMA_N / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        acc[4 * j + e] *= SWAP ? row_scale[consumer][j * 8 + c0 + (e & 1)]
                                               : row_scale[consumer][warp * 16 + (lane >> 2) + (e >> 1) * 8];
            }
            if (epilogue == SILU_AND_MUL) {
                const int width = n / 2;
                if constexpr (!SWAP) {
                    // Column block j (gate) and j + U (up): accumulators 4j + e and 4(j + U) + e,
                    // e = 2h, 2h + 1 for row + 8h. Warps whose rows are all past M (most of them
                    // at decode's M) skip the SiLU math.
                    constexpr int U = C::MMA_N / 16;
                    if (warp_row0 < m)
                        store_rows_staged<C::MMA_N / 2>(staging, c, m, width, warp_row0, nt * (BN / 2), lane,
                                                        [&](int j) {
                                                            const int g = 4 * j, u = 4 * (j + U);
                                                            return make_uint2(
                                                                nexus::pack_bf16(silu_mul(acc[g], acc[u]),
                                                                                 silu_mul(acc[g + 1], acc[u + 1])),
                                                                nexus::pack_bf16(silu_mul(acc[g + 2], acc[u + 2]),
                                                                                 silu_mul(acc[g + 3], acc[u + 3])));
                                                        });
                } else {
                    // M-side rows r0 (gate) and r0 + 8 (up): accumulators 4j + e and 4j + e + 2.
                    const int col = gated_col(nt * BN + r0);
#pragma unroll
                    for (int j = 0; j < C::MMA_N / 8; ++j) {
                        const int row = mt * BM + j * 8 + c0;
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            if (row + e < m && col < width)
                                c[(size_t)(row + e) * width + col] =
                                    __float2bfloat16_rn(silu_mul(acc[4 * j + e], acc[4 * j + e + 2]));
                        }
                    }
                }
                continue;
            }
            float* const sq = FUSED && epilogue == ACCUMULATE ? sq_out : nullptr;
            if constexpr (!SWAP) {
                if (warp_row0 < m)
                    store_rows_staged<C::MMA_N>(
                        staging, c, m, n, warp_row0, nt * BN, lane,
                        [&](int j) {
                            const int col = nt * BN + j * 8 + c0;
                            const float2 bb = col < n ? bias_pair(bias, col) : make_float2(0.f, 0.f);
                            return make_uint2(nexus::pack_bf16(acc[4 * j] + bb.x, acc[4 * j + 1] + bb.y),
                                              nexus::pack_bf16(acc[4 * j + 2] + bb.x, acc[4 * j + 3] + bb.y));
                        },
                        sq);
            } else {
                // Transposed: the M side runs along N (columns of C), the N side along M (rows).
                const int col = nt * BN + r0;
                const float b_lo = bias != nullptr && col < n ? __bfloat162float(bias[col]) : 0.f;
                const float b_hi = bias != nullptr && col + 8 < n ? __bfloat162float(bias[col + 8]) : 0.f;
#pragma unroll
                for (int j = 0; j < C::MMA_N / 8; ++j)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc[4 * j + e] += e >> 1 ? b_hi : b_lo;
                if (sq != nullptr) {
                    // Each value becomes what is stored: C's (loaded at the unit's start) + the
                    // product rounded to bf16, rounded again (0 outside C).
#pragma unroll
                    for (int j = 0; j < C::MMA_N / 8; ++j)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const int r = mt * BM + j * 8 + c0 + (e & 1), cc = col + (e >> 1) * 8;
                            float& a = acc[4 * j + e];
                            const float x = __bfloat162float(__float2bfloat16_rn(a));
                            a = r < m && cc < n ? __bfloat162float(__float2bfloat16_rn(old_c[4 * j + e] + x)) : 0.f;
                        }
                }
#pragma unroll
                for (int j = 0; j < C::MMA_N / 8; ++j) {
                    const int row = mt * BM + j * 8 + c0;
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int r = row + (e & 1), cc = col + (e >> 1) * 8;
                        if (r < m && cc < n) c[(size_t)r * n + cc] = __float2bfloat16_rn(acc[4 * j + e]);
                    }
                }
                if (sq != nullptr) {
                    // The square sums of the consumer's 64 columns (one SQ_COLS group) per row:
                    // a thread's two columns, the warp's 16 (lanes of one lane % 4), then its 4 warps in order.
#pragma unroll
                    for (int j = 0; j < C::MMA_N / 8; ++j)
#pragma unroll
                        for (int h = 0; h < 2; ++h) {
                            float q = acc[4 * j + h] * acc[4 * j + h] + acc[4 * j + h + 2] * acc[4 * j + h + 2];
                            q += __shfl_xor_sync(0xffffffffu, q, 4);
                            q += __shfl_xor_sync(0xffffffffu, q, 8);
                            q += __shfl_xor_sync(0xffffffffu, q, 16);
                            if (lane < 4) warp_sq[consumer][warp][j * 8 + c0 + h] = q;
                        }
                    consumers_barrier<C::CONSUMERS>();
                    const int row = tid - 128 * warpgroup, first = nt * BN + consumer * 64;
                    if (row < BM && mt * BM + row < m && first < n) {
                        float sum = 0.f;
#pragma unroll
                        for (int w = 0; w < 4; ++w) sum += warp_sq[consumer][w][row];
                        sq[(size_t)(mt * BM + row) * ((n + SQ_COLS - 1) / SQ_COLS) + first / SQ_COLS] = sum;
                    }
                    consumers_barrier<C::CONSUMERS>();  // read before the next unit writes
                }
            }
        }
    }
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points. Arguments: the operands, then m, n, k, the epilogue (an Epilogue), then the two
// tile counters (zero between launches, see take_ticket). The mma kernels also take the number of
// pipeline stages their shared memory holds; the wgmma ones, after the epilogue, the square sums
// ACCUMULATE writes and those a row norm reads (null: none) and the norm's epsilon, then the split
// of K (1: none), the split-K workspace (a BM x BN tile of floats per work unit) and one arrival
// count per output tile (zero between launches). For SILU_AND_MUL, n is B's rows (gate and up)
// and C has n / 2 columns.

#define NEXUS_GEMM_MMA(NAME, BM, BN, SWAP)                                                                         \
    extern "C" __global__ void __launch_bounds__(MMA_THREADS, 1)                                                   \
        NAME(const bf16* __restrict__ a, const bf16* __restrict__ b, const bf16* __restrict__ bias,               \
             bf16* __restrict__ c, int m, int n, int k, int epilogue, int stages, unsigned* __restrict__ counter) { \
        nexus::follow_previous_kernel();                                                                           \
        gemm_mma_body<BM, BN, SWAP>(a, b, bias, c, m, n, k, epilogue, stages, counter);                            \
    }

NEXUS_GEMM_MMA(gemm_mma_128x128, 128, 128, false)
NEXUS_GEMM_MMA(gemm_mma_64x64, 64, 64, false)
NEXUS_GEMM_MMA(gemm_mma_swap_16x256, 16, 256, true)

// The register-streamed kernels take, after the epilogue, the square sums ACCUMULATE writes and
// those a row norm reads (null: none) and the norm's epsilon, as the wgmma ones; no counter, no
// split. Their shared memory: StreamConfig<MT>::PARTIAL_BYTES (the launcher asks for more, to run
// one CTA per SM).
#define NEXUS_GEMM_STREAM(NAME, MT, FUSED)                                                                      \
    extern "C" __global__ void __launch_bounds__(StreamConfig<MT>::THREADS, 1)                                   \
        NAME(const bf16* __restrict__ a, const bf16* __restrict__ b, const bf16* __restrict__ bias,            \
             bf16* __restrict__ c, int m, int n, int k, int epilogue, float* __restrict__ sq_out,               \
             const float* __restrict__ sq_in, float eps) {                                                       \
        gemm_stream_body<MT, FUSED>(a, b, bias, c, m, n, k, epilogue, sq_out, sq_in, eps);                      \
    }

NEXUS_GEMM_STREAM(gemm_mma_stream_8x64, 1, false)
NEXUS_GEMM_STREAM(gemm_mma_stream_8x64_fused, 1, true)
NEXUS_GEMM_STREAM(gemm_mma_stream_16x64, 2, false)
NEXUS_GEMM_STREAM(gemm_mma_stream_16x64_fused, 2, true)

// Empty outside sm_90a: the launcher selects these only on Hopper.
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define NEXUS_GEMM_WGMMA_BODY(BM, BN, SWAP, FUSED, PAIR)                                                    \
    gemm_wgmma_body<BM, BN, SWAP, FUSED, PAIR>(&tmap_a, &tmap_b, bias, c, m, n, k, epilogue, sq_out, sq_in, eps,    \
                                               splits, early_stages, partials, tile_arrivals, counter);         \
    /* The step timeline's CTA end, from the first consumer (the producer's loader returns early). */        \
    if (threadIdx.x == 128) nexus::timeline_exit();                                                           \
    /* Pairs: neither CTA leaves while the other may still arrive on its barriers. */                          \
    if (PAIR) cluster_sync();
// The kernels' cluster shape: CTAs one by one, or pairs (Hopper only; clusters are sm_90+).
#define NEXUS_CLUSTER_1
#define NEXUS_CLUSTER_2 __cluster_dims__(2, 1, 1)
#else
#define NEXUS_GEMM_WGMMA_BODY(BM, BN, SWAP, FUSED, PAIR)
#define NEXUS_CLUSTER_1
#define NEXUS_CLUSTER_2
#endif

// Each tile twice: NAME, and NAME_fused with the residual add and row norm (see FUSED). CLUSTER:
// the CTAs of a cluster (1, or 2 for the pairs).
#define NEXUS_GEMM_WGMMA_ENTRY(NAME, BM, BN, SWAP, FUSED, CLUSTER)                                                 \
    extern "C" __global__ void NEXUS_CLUSTER_##CLUSTER __launch_bounds__(wgmma_threads(BM, BN, SWAP), 1)           \
        NAME(const __grid_constant__ TensorMap tmap_a, const __grid_constant__ TensorMap tmap_b,                   \
             const bf16* __restrict__ bias, bf16* __restrict__ c, int m, int n, int k, int epilogue,               \
             float* __restrict__ sq_out, const float* __restrict__ sq_in, float eps, int splits,                   \
             int early_stages, float* __restrict__ partials, unsigned* __restrict__ tile_arrivals,                 \
             unsigned* __restrict__ counter) {                                                                     \
        NEXUS_GEMM_WGMMA_BODY(BM, BN, SWAP, FUSED, CLUSTER == 2)                                                   \
    }
#define NEXUS_GEMM_WGMMA(NAME, BM, BN, SWAP)             \
    NEXUS_GEMM_WGMMA_ENTRY(NAME, BM, BN, SWAP, false, 1) \
    NEXUS_GEMM_WGMMA_ENTRY(NAME##_fused, BM, BN, SWAP, true, 1)
#define NEXUS_GEMM_WGMMA_PAIR(NAME, BM, BN)                 \
    NEXUS_GEMM_WGMMA_ENTRY(NAME, BM, BN, false, false, 2) \
    NEXUS_GEMM_WGMMA_ENTRY(NAME##_fused, BM, BN, false, true, 2)

NEXUS_GEMM_WGMMA(gemm_wgmma_128x256, 128, 256, false)
NEXUS_GEMM_WGMMA(gemm_wgmma_128x128, 128, 128, false)
NEXUS_GEMM_WGMMA(gemm_wgmma_64x128, 64, 128, false)
NEXUS_GEMM_WGMMA(gemm_wgmma_64x64, 64, 64, false)
NEXUS_GEMM_WGMMA(gemm_wgmma_64x256, 64, 256, false)
NEXUS_GEMM_WGMMA(gemm_wgmma_swap_16x64, 16, 64, true)
NEXUS_GEMM_WGMMA(gemm_wgmma_swap_16x128, 16, 128, true)
NEXUS_GEMM_WGMMA(gemm_wgmma_swap_16x192, 16, 192, true)
NEXUS_GEMM_WGMMA(gemm_wgmma_swap_16x256, 16, 256, true)
NEXUS_GEMM_WGMMA(gemm_wgmma_swap_32x256, 32, 256, true)
NEXUS_GEMM_WGMMA_PAIR(gemm_wgmma_pair_128x256, 128, 256)
