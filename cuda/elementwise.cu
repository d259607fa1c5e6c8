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

// A group of `warps_per_row` warps (1, 2, 4, 8, 16 or 32) normalizes one row; the CTA's groups
// take rows in turn. With one warp per row, a batch of 64 decode rows used 2 CTAs, each warp
// streaming its 8 KB row with one 16-byte load in flight per lane: ~20 us per launch on the H200,
// 23% of a Llama-3.1-8B decode step. The host sizes the group from the row length alone (about one
// 16-byte vector per thread), which keeps the order of the sums the same for every batch and
// budget. When `residual` is set, the row is first `residual += x` (stored back) and the sum is
// normalized.
__device__ __forceinline__ void rms_norm_rows(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ residual,
                                              const __nv_bfloat16* __restrict__ weight, __nv_bfloat16* __restrict__ out,
                                              int rows, int hidden, float eps, int warps_per_row) {
    __shared__ float partial[WARPS];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int groups = WARPS / warps_per_row;
    const int group = warp / warps_per_row;
    const int first = (warp % warps_per_row) * 32 + lane;  // this thread's first vector of the row
    const int step = warps_per_row * 32 * VEC;
    // Every thread runs the same number of rounds (the block barriers need all of them).
    for (int base = blockIdx.x * groups; base < rows; base += gridDim.x * groups) {
        const int row = base + group;
        const bool live = row < rows;
        const __nv_bfloat16* xr = x + (size_t)row * hidden;
        __nv_bfloat16* rr = residual ? residual + (size_t)row * hidden : nullptr;
        float sum_sq = 0.f;
        if (live) {
            for (int c = first * VEC; c < hidden; c += step) {
                float v[VEC];
                unpack(load8(xr + c), v);
                if (rr) {
                    float r[VEC];
                    unpack(load8(rr + c), r);
#pragma unroll
                    for (int i = 0; i < VEC; ++i) v[i] += r[i];
                    // Round the sum to bf16 before squaring: it is what the next layer reads back.
                    Bf16x8 packed = pack(v);
                    store8(rr + c, packed);
                    unpack(packed, v);
                }
#pragma unroll
                for (int i = 0; i < VEC; ++i) sum_sq += v[i] * v[i];
            }
        }
        sum_sq = nexus::warp_sum(sum_sq);
        if (warps_per_row > 1) {
            // The group's warps add their sums in a fixed order (the result does not depend on
            // which warp finishes first).
            if (lane == 0) partial[warp] = sum_sq;
            __syncthreads();
            sum_sq = 0.f;
            for (int w = group * warps_per_row; w < (group + 1) * warps_per_row; ++w) sum_sq += partial[w];
            __syncthreads();  // `partial` is free for the next round
        }
        if (live) {
            const float scale = rsqrtf(sum_sq / hidden + eps);
            // Each thread reads back the residual sums it stored itself.
            const __nv_bfloat16* src = rr ? rr : xr;
            for (int c = first * VEC; c < hidden; c += step) {
                float v[VEC], w[VEC];
                unpack(load8(src + c), v);
                unpack(load8(weight + c), w);
#pragma unroll
                for (int i = 0; i < VEC; ++i) v[i] = v[i] * scale * w[i];
                store8(out + (size_t)row * hidden + c, pack(v));
            }
        }
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    rms_norm(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ weight,
             __nv_bfloat16* __restrict__ out, int rows, int hidden, float eps, int warps_per_row) {
    nexus::follow_previous_kernel();
    rms_norm_rows(x, nullptr, weight, out, rows, hidden, eps, warps_per_row);
}

extern "C" __global__ void __launch_bounds__(THREADS, 1)
    fused_add_rms_norm(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ residual,
                       const __nv_bfloat16* __restrict__ weight, __nv_bfloat16* __restrict__ out, int rows,
                       int hidden, float eps, int warps_per_row) {
    nexus::follow_previous_kernel();
    rms_norm_rows(x, residual, weight, out, rows, hidden, eps, warps_per_row);
}

// out[t, :] = table[tokens[t], :]. Token ids are checked by the host before upload; an id out of
// range still reads row 0 rather than outside the table.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    embedding(const __nv_bfloat16* __restrict__ table, const uint32_t* __restrict__ tokens,
              __nv_bfloat16* __restrict__ out, int rows, int hidden, int vocab) {
    nexus::follow_previous_kernel();
    const int vecs_per_row = hidden / VEC;
    const size_t total = (size_t)rows * vecs_per_row;
    for (size_t i = (size_t)blockIdx.x * THREADS + threadIdx.x; i < total; i += (size_t)gridDim.x * THREADS) {
        const size_t row = i / vecs_per_row, c = (i % vecs_per_row) * VEC;
        uint32_t token = tokens[row];
        if (token >= (uint32_t)vocab) token = 0;
        store8(out + row * hidden + c, load8(table + (size_t)token * hidden + c));
    }
}

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

// Rotates the query and key heads of a fused QKV buffer [rows, (heads + 2 kv_heads) * head_dim]
// in place, and writes each row's rotated keys and its values into slot `slots[row]` of the paged
// pools [blocks * block_size, kv_heads, head_dim]: one launch where RoPE and the KV write were two,
// each waiting for the kernel before it. style 0: interleaved pairs (2i, 2i+1); style 1:
// rotate-half pairs (i, i + d/2). Frequencies theta^(-2i/d) in f32, scaled by `scale_inv_freq`, as
// the reference computes them. One warp per head of a row (rows * (heads + 2 kv_heads) < 2^32, the
// launcher checks), its lanes over the head's pairs: one 32-bit division per head, where a thread
// per pair divided 64-bit indices three times per pair. The frequencies are the same for every
// head and row, so each CTA computes them once into `head_dim / 2` floats of dynamic shared
// memory. A value head's pair (2i, 2i+1) is copied as one 4-byte word. Slots are checked by the
// host.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
    rope_and_write_kv(__nv_bfloat16* __restrict__ qkv, const uint32_t* __restrict__ positions,
                      const uint32_t* __restrict__ slots, __nv_bfloat16* __restrict__ k_cache,
                      __nv_bfloat16* __restrict__ v_cache, int rows, int num_heads, int num_kv_heads, int head_dim,
                      float theta, int style, int scaling, float factor, float low_freq_factor,
                      float high_freq_factor, float original_max_position) {
    extern __shared__ float inv_freq[];
    const int half = head_dim / 2;
    // Depends on nothing the kernel before wrote: computed before waiting for it.
    for (int pair = threadIdx.x; pair < half; pair += THREADS) {
        inv_freq[pair] =
            scale_inv_freq(1.f / powf(theta, (float)(2 * pair) / (float)head_dim), scaling, factor, low_freq_factor,
                           high_freq_factor, original_max_position);
    }
    __syncthreads();
    nexus::follow_previous_kernel();
    const int lane = threadIdx.x & 31;
    const int row_heads = num_heads + 2 * num_kv_heads;  // query, key, then value heads
    const size_t slot_len = (size_t)num_kv_heads * head_dim;
    const uint32_t heads = (uint32_t)rows * (uint32_t)row_heads;
    for (uint32_t unit = blockIdx.x * WARPS + (threadIdx.x >> 5); unit < heads; unit += gridDim.x * WARPS) {
        const uint32_t row = unit / (uint32_t)row_heads;
        const int head = (int)(unit - row * (uint32_t)row_heads);
        // Rows are row_heads heads of head_dim values each: head `unit` of the buffer.
        __nv_bfloat16* h = qkv + (size_t)unit * head_dim;
        if (head >= num_heads + num_kv_heads) {
            __nv_bfloat16* v = v_cache + (size_t)slots[row] * slot_len + (size_t)(head - num_heads - num_kv_heads) * head_dim;
            for (int pair = lane; pair < half; pair += 32) {
                *reinterpret_cast<uint32_t*>(v + 2 * pair) = *reinterpret_cast<const uint32_t*>(h + 2 * pair);
            }
            continue;
        }
        const float position = (float)positions[row];
        __nv_bfloat16* k = head >= num_heads
                               ? k_cache + (size_t)slots[row] * slot_len + (size_t)(head - num_heads) * head_dim
                               : nullptr;
        for (int pair = lane; pair < half; pair += 32) {
            float s, c;
            sincosf(position * inv_freq[pair], &s, &c);
            const int a = style == 0 ? 2 * pair : pair;
            const int b = style == 0 ? 2 * pair + 1 : pair + half;
            const float x = to_float(h[a]), y = to_float(h[b]);
            const __nv_bfloat16 ra = to_bf16(x * c - y * s), rb = to_bf16(y * c + x * s);
            h[a] = ra;
            h[b] = rb;
            if (k != nullptr) {
                k[a] = ra;
                k[b] = rb;
            }
        }
    }
}

// out[r] = the index of the largest logit of row r (the first on ties). One CTA per row.
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
        for (int i = threadIdx.x; i < vocab; i += THREADS) {
            const float v = to_float(r[i]);
            nan |= isnan(v);
            if (v > value) {
                value = v;
                index = i;
            }
        }
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
