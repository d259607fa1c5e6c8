// Row-wise kernels of the forward pass: embedding gather, RMSNorm (plain and with the residual
// add fused), RoPE with the writes of new keys/values into the paged cache, and argmax.
//
// All are persistent (grid-stride over their work with at most one CTA per SM, see common.cuh),
// bf16 in memory and f32 in registers, and move 16 bytes (8 bf16) per load where the layout
// allows: the launchers require row lengths that are multiples of 8.
#include "common.cuh"

using nexus::to_bf16;
using nexus::to_float;

namespace {

constexpr int THREADS = 1024;
constexpr int WARPS = THREADS / 32;
// The norms and RoPE hold several 16-byte vectors per thread in registers (bytes in flight): half
// the threads, twice the registers each (1024 threads left them 64 and spilled).
constexpr int ROW_THREADS = 512;
constexpr int ROW_WARPS = ROW_THREADS / 32;
constexpr int ROW_SLOTS = 4;  // (row, vector) pairs a norm's thread holds per round
constexpr int VEC = 8;  // bf16 per 16-byte access

struct __align__(16) Bf16x8 {
    __nv_bfloat162 v[4];
};

__device__ __forceinline__ void unpack(const Bf16x8& p, float (&f)[VEC]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        float2 t = __bfloat1622float2(p.v[i]);
        f[2 * i] = t.x;
        f[2 * i + 1] = t.y;
    }
}

__device__ __forceinline__ Bf16x8 pack(const float (&f)[VEC]) {
    Bf16x8 p;
#pragma unroll
    for (int i = 0; i < 4; ++i) p.v[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return p;
}

__device__ __forceinline__ Bf16x8 load8(const __nv_bfloat16* p) { return *reinterpret_cast<const Bf16x8*>(p); }
__device__ __forceinline__ void store8(__nv_bfloat16* p, const Bf16x8& v) { *reinterpret_cast<Bf16x8*>(p) = v; }

// A group of `warps_per_row` warps (1, 2, 4, 8 or 16) normalizes a row, ROWS rows at a time;
// the CTA's groups take rows in turn. The host sizes the group from the row length alone (about
// one 16-byte vector per thread), which keeps the order of each row's sums the same for every
// batch and budget (batch invariant): a thread adds up its vectors of the row in order, the warp
// by a butterfly, the group's warps in warp order. Each thread keeps its values in registers
// between the sum and the scaling, and loads its next round's rows while it finishes the current
// one. With one 16-byte load in flight per thread and the row read back from memory for the
// scaling, a prefill's norms ran at 10-61% of the streaming read (H100, `cargo bench --bench
// elementwise`). ROWS > 1 only for many rows (a prefill chunk); a decode batch takes one row per
// group, spread over as many CTAs as it can. When `residual` is set, the row is first `residual +=
// x` (rounded to bf16, stored back) and the sum is normalized.
template <int VECS, int ROWS>  // 16-byte vectors of a row per thread; rows per group and round
__device__ __forceinline__ void rms_norm_rows(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ residual,
                                              const __nv_bfloat16* __restrict__ weight, __nv_bfloat16* __restrict__ out,
                                              int rows, int hidden, float eps, int warps_per_row) {
    __shared__ float partial[ROWS][ROW_WARPS];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int groups = ROW_WARPS / warps_per_row;
    const int group = warp / warps_per_row;
    const int first = (warp % warps_per_row) * 32 + lane;  // this thread's first vector of the row
    const int step = warps_per_row * 32 * VEC;
    bool has[VECS];  // whether this thread's vector v lies inside the row
    Bf16x8 w[VECS];
    // The gain is no kernel's output: loaded before waiting for the previous kernel.
#pragma unroll
    for (int v = 0; v < VECS; ++v) {
        const int c = first * VEC + v * step;
        has[v] = c < hidden;
        if (has[v]) w[v] = load8(weight + c);
    }
    nexus::follow_previous_kernel();
    const int per_round = gridDim.x * groups * ROWS;
    // The rows of the round from `base` this thread has a share of, into val (and add).
    auto load_round = [&](int base, Bf16x8 (&val)[ROWS][VECS], Bf16x8 (&add)[ROWS][VECS]) {
#pragma unroll
        for (int j = 0; j < ROWS; ++j) {
            const int row = base + group * ROWS + j;
#pragma unroll
            for (int v = 0; v < VECS; ++v) {
                if (row < rows && has[v]) {
                    const size_t at = (size_t)row * hidden + first * VEC + v * step;
                    val[j][v] = load8(x + at);
                    if (residual) add[j][v] = load8(residual + at);
                }
            }
        }
    };
    Bf16x8 val[ROWS][VECS], add[ROWS][VECS];
    int base = blockIdx.x * groups * ROWS;
    if constexpr (ROWS > 1) load_round(base, val, add);
    // Every thread runs the same number of rounds (the block barriers need all of them).
    for (; base < rows; base += per_round) {
        // One row per group (a decode batch, mostly one round): no loads ahead, the least code.
        Bf16x8 next_val[ROWS][VECS], next_add[ROWS][VECS];
        if constexpr (ROWS > 1) {
            if (base + per_round < rows) load_round(base + per_round, next_val, next_add);
        } else {
            load_round(base, val, add);
        }
        const int row0 = base + group * ROWS;
        float sum_sq[ROWS];
#pragma unroll
        for (int j = 0; j < ROWS; ++j) {
            sum_sq[j] = 0.f;
#pragma unroll
            for (int v = 0; v < VECS; ++v) {
                if (!(row0 + j < rows && has[v])) continue;
                float f[VEC];
                unpack(val[j][v], f);
                if (residual) {
                    float r[VEC];
                    unpack(add[j][v], r);
#pragma unroll
                    for (int i = 0; i < VEC; ++i) f[i] += r[i];
                    // Round the sum to bf16 before squaring: it is what the next layer reads back.
                    val[j][v] = pack(f);
                    store8(residual + (size_t)(row0 + j) * hidden + first * VEC + v * step, val[j][v]);
                    unpack(val[j][v], f);
                }
#pragma unroll
                for (int i = 0; i < VEC; ++i) sum_sq[j] += f[i] * f[i];
            }
            sum_sq[j] = nexus::warp_sum(sum_sq[j]);
        }
        if (warps_per_row > 1) {
            // The group's warps add their sums in a fixed order (the result does not depend on
            // which warp finishes first).
            if (lane == 0) {
#pragma unroll
                for (int j = 0; j < ROWS; ++j) partial[j][warp] = sum_sq[j];
            }
            __syncthreads();
#pragma unroll
            for (int j = 0; j < ROWS; ++j) {
                sum_sq[j] = 0.f;
                for (int g = group * warps_per_row; g < (group + 1) * warps_per_row; ++g) sum_sq[j] += partial[j][g];
            }
            __syncthreads();  // `partial` is free for the next round
        }
#pragma unroll
        for (int j = 0; j < ROWS; ++j) {
            if (row0 + j >= rows) continue;
            const float scale = rsqrtf(sum_sq[j] / hidden + eps);
#pragma unroll
            for (int v = 0; v < VECS; ++v) {
                if (!has[v]) continue;
                float f[VEC], g[VEC];
                unpack(val[j][v], f);
                unpack(w[v], g);
#pragma unroll
                for (int i = 0; i < VEC; ++i) f[i] = f[i] * scale * g[i];
                store8(out + (size_t)(row0 + j) * hidden + first * VEC + v * step, pack(f));
            }
        }
        if constexpr (ROWS > 1) {
#pragma unroll
            for (int j = 0; j < ROWS; ++j)
#pragma unroll
                for (int v = 0; v < VECS; ++v) {
                    val[j][v] = next_val[j][v];
                    add[j][v] = next_add[j][v];
                }
        }
    }
}

// One row per group and round (`one`: a decode batch) or ROW_SLOTS / vecs (a prefill chunk), with
// `vecs` (1, 2 or 4) vectors of a row per thread. The two are separate kernels so that a decode
// step's launches carry only the code they run.
template <bool ONE>
__device__ __forceinline__ void rms_norm_launch(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ residual,
                                                const __nv_bfloat16* __restrict__ weight,
                                                __nv_bfloat16* __restrict__ out, int rows, int hidden, float eps,
                                                int warps_per_row, int vecs) {
    if constexpr (ONE) {
        if (vecs == 1)
            rms_norm_rows<1, 1>(x, residual, weight, out, rows, hidden, eps, warps_per_row);
        else if (vecs == 2)
            rms_norm_rows<2, 1>(x, residual, weight, out, rows, hidden, eps, warps_per_row);
        else
            rms_norm_rows<4, 1>(x, residual, weight, out, rows, hidden, eps, warps_per_row);
    } else {
        if (vecs == 1)
            rms_norm_rows<1, ROW_SLOTS>(x, residual, weight, out, rows, hidden, eps, warps_per_row);
        else
            rms_norm_rows<2, ROW_SLOTS / 2>(x, residual, weight, out, rows, hidden, eps, warps_per_row);
    }
}

}  // namespace

#define NEXUS_RMS_NORM(NAME, ONE)                                                                                  \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 1)                                                   \
        NAME(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ weight,                        \
             __nv_bfloat16* __restrict__ out, int rows, int hidden, float eps, int warps_per_row, int vecs) {      \
        rms_norm_launch<ONE>(x, nullptr, weight, out, rows, hidden, eps, warps_per_row, vecs);                     \
    }
#define NEXUS_FUSED_ADD_RMS_NORM(NAME, ONE)                                                                        \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 1)                                                   \
        NAME(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ residual,                            \
             const __nv_bfloat16* __restrict__ weight, __nv_bfloat16* __restrict__ out, int rows, int hidden,      \
             float eps, int warps_per_row, int vecs) {                                                             \
        rms_norm_launch<ONE>(x, residual, weight, out, rows, hidden, eps, warps_per_row, vecs);                    \
    }

// A decode batch's norms (one row per group) and a prefill chunk's (several rows per group).
NEXUS_RMS_NORM(rms_norm, true)
NEXUS_RMS_NORM(rms_norm_many_rows, false)
NEXUS_FUSED_ADD_RMS_NORM(fused_add_rms_norm, true)
NEXUS_FUSED_ADD_RMS_NORM(fused_add_rms_norm_many_rows, false)

// out[t, :] = table[tokens[t], :]. Token ids are checked by the host before upload; an id out of
// range still reads row 0 rather than outside the table.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    embedding(const __nv_bfloat16* __restrict__ table, const uint32_t* __restrict__ tokens,
              __nv_bfloat16* __restrict__ out, int rows, int hidden, int vocab) {
    nexus::let_next_kernel_start_early();
    const int vecs_per_row = hidden / VEC;
    const size_t total = (size_t)rows * vecs_per_row;
    for (size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x; i < total; i += (size_t)gridDim.x * THREADS) {
        const size_t row = i / vecs_per_row, c = (i % vecs_per_row) * VEC;
        uint32_t token = tokens[row];
        if (token >= (uint32_t)vocab) token = 0;
        store8(out + row * hidden + c, load8(table + (size_t)token * hidden + c));
    }
}

// Rotates the query and key heads of a fused QKV buffer [rows, (heads + 2 kv_heads) * head_dim]
// in place, and writes each row's rotated keys and its values into slot `slots[row]` of the paged
// pools [blocks * block_size, kv_heads, head_dim]: one launch where RoPE and the KV write were two.
// style 0: interleaved pairs (2i, 2i+1); style 1: rotate-half pairs (i, i + d/2). Frequencies
// theta^(-2i/d) in f32, scaled by `scale_inv_freq`, as the reference computes them; each CTA
// computes them once into `head_dim / 2` floats of dynamic shared memory, before it waits for the
// previous kernel.
//
// A thread takes 8 pairs of HEADS heads (1 or 4) of one row: two 16-byte vectors of each head
// (the halves' 8-value pieces at 8c and d/2 + 8c, or the 16 values from 16c when interleaved), all
// loaded before it rotates any, and the 8 sines and cosines computed once for its heads. The host
// gives a thread several heads only when there are rows enough to fill the budget's CTAs anyway (a
// prefill chunk); a decode batch spreads one head per thread, and over as many CTAs as the budget
// has (of fewer than ROW_THREADS threads when it must). The kernel
// before (a warp per head, a lane per pair, 2-byte loads and stores) ran at 9-48% of the streaming
// read on a prefill's rows (H100, `cargo bench --bench elementwise`). The value heads are copied as
// they are. head_dim is a multiple of 16 (the launcher checks) and the work items, plus a grid of
// threads, fit in an int. Slots are checked by the host.
template <int HEADS>  // heads of a row per thread
__device__ __forceinline__ void rope_and_write_kv_items(__nv_bfloat16* __restrict__ qkv, const uint32_t* __restrict__ positions,
                      const uint32_t* __restrict__ slots, __nv_bfloat16* __restrict__ k_cache,
                      __nv_bfloat16* __restrict__ v_cache, int rows, int num_heads, int num_kv_heads, int head_dim,
                      float theta, int style, int scaling, float factor, float low_freq_factor,
                      float high_freq_factor, float original_max_position) {
    extern __shared__ float inv_freq[];
    const int half = head_dim / 2;
    for (int pair = threadIdx.x; pair < half; pair += blockDim.x) {
        inv_freq[pair] = nexus::rope_inv_freq(pair, head_dim,
                                              nexus::RopeFreqs{theta, scaling, factor, low_freq_factor,
                                                               high_freq_factor, original_max_position});
    }
    __syncthreads();
    nexus::follow_previous_kernel();
    const int row_heads = num_heads + 2 * num_kv_heads;  // query, key, then value heads
    const int rotated = num_heads + num_kv_heads;
    const int pieces = half / 8;  // 8 pairs each
    const int head_groups = (row_heads + HEADS - 1) / HEADS;
    const int items = rows * head_groups * pieces;
    const size_t slot_len = (size_t)num_kv_heads * head_dim;
    for (int item = blockIdx.x * blockDim.x + threadIdx.x; item < items; item += gridDim.x * blockDim.x) {
        const int piece = item % pieces;
        const int group = (item / pieces) % head_groups;
        const int row = item / (pieces * head_groups);
        // Where the piece's two vectors start in a head.
        const int lo = style == 0 ? 16 * piece : 8 * piece, hi = style == 0 ? lo + 8 : half + 8 * piece;
        __nv_bfloat16* r = qkv + (size_t)row * row_heads * head_dim;
        Bf16x8 a[HEADS], b[HEADS];
#pragma unroll
        for (int u = 0; u < HEADS; ++u) {
            const int head = group * HEADS + u;
            if (head < row_heads) {
                a[u] = load8(r + (size_t)head * head_dim + lo);
                b[u] = load8(r + (size_t)head * head_dim + hi);
            }
        }
        const size_t slot = slots[row];
        float sn[VEC], cs[VEC];
        if (group * HEADS < rotated) {
            const float position = (float)positions[row];
#pragma unroll
            for (int i = 0; i < VEC; ++i) nexus::sin_cos(position * inv_freq[8 * piece + i], &sn[i], &cs[i]);
        }
#pragma unroll
        for (int u = 0; u < HEADS; ++u) {
            const int head = group * HEADS + u;
            if (head >= row_heads) continue;
            if (head >= rotated) {
                __nv_bfloat16* v = v_cache + slot * slot_len + (size_t)(head - rotated) * head_dim;
                store8(v + lo, a[u]);
                store8(v + hi, b[u]);
                continue;
            }
            float fa[VEC], fb[VEC];
            unpack(a[u], fa);
            unpack(b[u], fb);
            // Pair i: (fa[i], fb[i]) rotating half; interleaved, the i-th (even, odd) pair of the
            // 16 values fa then fb.
            float x[VEC], y[VEC];
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const float* src = i < VEC / 2 ? fa : fb;
                x[i] = style == 0 ? src[2 * (i % 4)] : fa[i];
                y[i] = style == 0 ? src[2 * (i % 4) + 1] : fb[i];
            }
#pragma unroll
            for (int i = 0; i < VEC; ++i) nexus::rotate(x[i], y[i], sn[i], cs[i]);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                if (style == 0) {
                    float* dst = i < VEC / 2 ? fa : fb;
                    dst[2 * (i % 4)] = x[i];
                    dst[2 * (i % 4) + 1] = y[i];
                } else {
                    fa[i] = x[i];
                    fb[i] = y[i];
                }
            }
            const Bf16x8 pa = pack(fa), pb = pack(fb);
            store8(r + (size_t)head * head_dim + lo, pa);
            store8(r + (size_t)head * head_dim + hi, pb);
            if (head >= num_heads) {
                __nv_bfloat16* k = k_cache + slot * slot_len + (size_t)(head - num_heads) * head_dim;
                store8(k + lo, pa);
                store8(k + hi, pb);
            }
        }
    }
}

// A decode batch's rows (a head per thread) and a prefill chunk's (four heads per thread).
#define NEXUS_ROPE_AND_WRITE_KV(NAME, HEADS)                                                                       \
    extern "C" __global__ void __launch_bounds__(ROW_THREADS, 1)                                                   \
        NAME(__nv_bfloat16* __restrict__ qkv, const uint32_t* __restrict__ positions,                               \
             const uint32_t* __restrict__ slots, __nv_bfloat16* __restrict__ k_cache,                               \
             __nv_bfloat16* __restrict__ v_cache, int rows, int num_heads, int num_kv_heads, int head_dim,          \
             float theta, int style, int scaling, float factor, float low_freq_factor, float high_freq_factor,      \
             float original_max_position) {                                                                         \
        rope_and_write_kv_items<HEADS>(qkv, positions, slots, k_cache, v_cache, rows, num_heads, num_kv_heads,     \
                                       head_dim, theta, style, scaling, factor, low_freq_factor, high_freq_factor, \
                                       original_max_position);                                                      \
    }
NEXUS_ROPE_AND_WRITE_KV(rope_and_write_kv, 1)
NEXUS_ROPE_AND_WRITE_KV(rope_and_write_kv_many_rows, 4)

// out[r] = the index of the largest logit of row r (the first on ties). One CTA per row; each
// thread takes ARGMAX_VECS 16-byte pieces of the row at a time, all loaded before it compares any
// (with 2-byte loads, 4 in flight, a thread waited ~32 round trips for a 128k-token row, the
// CTA's SM reading ~10 GB/s). A row's values before its first 16-byte boundary and after its last
// are taken one at a time (a vocabulary not a multiple of 8, or a view that starts off a boundary,
// leaves rows unaligned).
constexpr int ARGMAX_VECS = 4;

// The running maximum of a thread, which meets its indices in increasing order: a value only
// larger replaces it (the earlier index wins ties; a row of -inf keeps none).
__device__ __forceinline__ void take_max(float v, int i, float& value, int& index, int& nan) {
    nan |= isnan(v);
    if (v > value) {
        value = v;
        index = i;
    }
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    argmax(const __nv_bfloat16* __restrict__ logits, uint32_t* __restrict__ out, int rows, int vocab) {
    nexus::follow_previous_kernel();
    __shared__ float best_value[WARPS];
    __shared__ int best_index[WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int row = blockIdx.x; row < rows; row += gridDim.x) {
        const __nv_bfloat16* r = logits + (size_t)row * vocab;
        float value = -INFINITY;
        int index = vocab;  // larger than any real index: loses every tie
        int nan = 0;
        // Values [0, head) and [head + 8 * vecs, vocab) one at a time, the 16-byte pieces between
        // (from the row's address: a view into a buffer may start anywhere a bf16 can).
        const int head = min(vocab, (int)(((16 - reinterpret_cast<uintptr_t>(r) % 16) % 16) / 2));
        const int vecs = (vocab - head) / VEC;
        const int tail = head + vecs * VEC;
        for (int i = threadIdx.x; i < head; i += THREADS) take_max(to_float(r[i]), i, value, index, nan);
        for (int v0 = threadIdx.x; v0 < vecs; v0 += THREADS * ARGMAX_VECS) {
            Bf16x8 piece[ARGMAX_VECS];
#pragma unroll
            for (int u = 0; u < ARGMAX_VECS; ++u) {
                const int v = v0 + u * THREADS;
                if (v < vecs) piece[u] = load8(r + head + v * VEC);
            }
#pragma unroll
            for (int u = 0; u < ARGMAX_VECS; ++u) {
                const int v = v0 + u * THREADS;
                if (v >= vecs) continue;
                float f[VEC];
                unpack(piece[u], f);
#pragma unroll
                for (int e = 0; e < VEC; ++e) take_max(f[e], head + v * VEC + e, value, index, nan);
            }
        }
        for (int i = tail + threadIdx.x; i < vocab; i += THREADS) take_max(to_float(r[i]), i, value, index, nan);
        // Every thread of the block takes the same rows, so all reach this barrier.
        nan = __syncthreads_or(nan);
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, value, offset);
            const int oi = __shfl_xor_sync(0xffffffffu, index, offset);
            if (ov > value || (ov == value && oi < index)) {
                value = ov;
                index = oi;
            }
        }
        if (lane == 0) {
            best_value[warp] = value;
            best_index[warp] = index;
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            for (int w = 1; w < WARPS; ++w) {
                if (best_value[w] > value || (best_value[w] == value && best_index[w] < index)) {
                    value = best_value[w];
                    index = best_index[w];
                }
            }
            // A row holding NaN, or with no value above -inf, has no maximum to trust: report
            // that (ARGMAX_NONE) rather than a token.
            out[row] = (nan || index >= vocab) ? 0xFFFFFFFFu : (uint32_t)index;
        }
        __syncthreads();
    }
}

// out[i] = mean + spread * u(seed, i), u uniform in [-1, 1) from a counter-based hash
// (splitmix64), so the same (seed, i) gives the same value on every device and on the CPU
// (nexus_kernels::reference::fill_uniform): random weights for benchmark models.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    fill_uniform(__nv_bfloat16* __restrict__ out, unsigned long long n, unsigned long long seed, float mean,
                 float spread) {
    nexus::follow_previous_kernel();
    for (unsigned long long i = (unsigned long long)blockIdx.x * THREADS + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * THREADS) {
        unsigned long long z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        // The top 24 bits as a float in [0, 1), then [-1, 1).
        const float u = (float)(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;
        out[i] = to_bf16(mean + spread * u);
    }
}

// weight[r, :] *= gain, each value rounded to bf16 (nexus_kernels::reference::fold_norm_gain): the
// gain of an RMSNorm folded into the weight of the GEMM after it, which then scales its rows of the
// product by the norm's factor (gemm.cu's row norm). Run once when a model is loaded.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    fold_norm_gain(__nv_bfloat16* __restrict__ weight, const __nv_bfloat16* __restrict__ gain, unsigned long long n,
                   unsigned int k) {
    nexus::follow_previous_kernel();
    for (unsigned long long i = (unsigned long long)blockIdx.x * THREADS + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * THREADS)
        weight[i] = to_bf16(to_float(weight[i]) * to_float(gain[i % k]));
}
