//! Row-wise operations: embedding gather, RMSNorm, RoPE, SiLU-and-mul, KV-cache writes, argmax.

use rayon::prelude::*;

use crate::Result;
use crate::error::ensure_shape;
use crate::layout::{PagedKvLayout, QkvLayout, RopeConfig, RopeStyle};

/// `out[t] = table[tokens[t]]`, with `table: [vocab, hidden]`, `out: [tokens, hidden]`.
pub fn embedding(table: &[f32], hidden: usize, tokens: &[u32], out: &mut [f32]) -> Result<()> {
    ensure_shape!(hidden > 0 && table.len().is_multiple_of(hidden), "embedding: table is not [vocab, {hidden}]");
    ensure_shape!(out.len() == tokens.len() * hidden, "embedding: out is not [{}, {hidden}]", tokens.len());
    let vocab = table.len() / hidden;
    for (&t, row) in tokens.iter().zip(out.chunks_exact_mut(hidden)) {
        ensure_shape!((t as usize) < vocab, "embedding: token {t} is outside the vocabulary of {vocab}");
        row.copy_from_slice(&table[t as usize * hidden..][..hidden]);
    }
    Ok(())
}

fn normalize_row(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let mean_square = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    let scale = 1.0 / (mean_square + eps).sqrt();
    for ((o, &v), &w) in out.iter_mut().zip(x).zip(weight) {
        *o = v * scale * w;
    }
}

/// RMSNorm of each row: `out = x / sqrt(mean(x²) + eps) * weight`, with `x, out: [rows, hidden]`.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let hidden = weight.len();
    ensure_shape!(hidden > 0 && x.len().is_multiple_of(hidden), "rms_norm: x is not [rows, {hidden}]");
    ensure_shape!(out.len() == x.len(), "rms_norm: out has {} values, x {}", out.len(), x.len());
    out.par_chunks_mut(hidden).zip(x.par_chunks(hidden)).for_each(|(o, x)| normalize_row(x, weight, eps, o));
    Ok(())
}

/// The residual step of a pre-norm block: `residual += x`, then `out = rms_norm(residual)`.
pub fn fused_add_rms_norm(x: &[f32], residual: &mut [f32], weight: &[f32], eps: f32, out: &mut [f32]) -> Result<()> {
    let hidden = weight.len();
    ensure_shape!(hidden > 0 && x.len().is_multiple_of(hidden), "fused_add_rms_norm: x is not [rows, {hidden}]");
    ensure_shape!(
        residual.len() == x.len() && out.len() == x.len(),
        "fused_add_rms_norm: x, residual and out differ in length"
    );
    out.par_chunks_mut(hidden).zip(residual.par_chunks_mut(hidden)).zip(x.par_chunks(hidden)).for_each(
        |((o, r), x)| {
            for (r, &x) in r.iter_mut().zip(x) {
                *r += x;
            }
            normalize_row(r, weight, eps, o);
        },
    );
    Ok(())
}

/// Rotates the query and key heads of a fused QKV buffer `[tokens, layout.row_len()]` in place by
/// each token's position. Frequencies are `theta^(-2i/d)`, computed in f32 as Hugging Face does.
pub fn rope(qkv: &mut [f32], positions: &[u32], layout: QkvLayout, rope: RopeConfig) -> Result<()> {
    layout.check(qkv.len(), positions.len())?;
    let d = layout.head_dim;
    let inv_freq: Vec<f32> = (0..d / 2).map(|i| 1.0 / rope.theta.powf((2 * i) as f32 / d as f32)).collect();
    let rotated = (layout.num_heads + layout.num_kv_heads) * d;
    qkv.par_chunks_mut(layout.row_len()).zip(positions.par_iter()).for_each(|(row, &pos)| {
        let (sin, cos): (Vec<f32>, Vec<f32>) = inv_freq.iter().map(|f| (pos as f32 * f).sin_cos()).unzip();
        for head in row[..rotated].chunks_exact_mut(d) {
            for i in 0..d / 2 {
                let (a, b) = match rope.style {
                    RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                    RopeStyle::RotateHalf => (i, i + d / 2),
                };
                let (x, y) = (head[a], head[b]);
                head[a] = x * cos[i] - y * sin[i];
                head[b] = y * cos[i] + x * sin[i];
            }
        }
    });
    Ok(())
}

/// `out = silu(gate) * up` for a fused input `[rows, 2 * width]` whose rows are `[gate | up]`;
/// `out: [rows, width]`.
pub fn silu_and_mul(gate_up: &[f32], width: usize, out: &mut [f32]) -> Result<()> {
    ensure_shape!(
        width > 0 && out.len().is_multiple_of(width) && gate_up.len() == 2 * out.len(),
        "silu_and_mul: input has {} values and output {}, expected [rows, 2 x {width}] and [rows, {width}]",
        gate_up.len(),
        out.len()
    );
    out.par_chunks_mut(width).zip(gate_up.par_chunks(2 * width)).for_each(|(o, gu)| {
        let (gate, up) = gu.split_at(width);
        for ((o, &g), &u) in o.iter_mut().zip(gate).zip(up) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    });
    Ok(())
}

/// Copies each token's keys and values from a fused QKV buffer into the paged pools, at slot
/// `slots[t]` (= block id × block size + offset in the block).
pub fn write_kv_cache(
    qkv: &[f32],
    layout: QkvLayout,
    slots: &[u32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    cache: PagedKvLayout,
) -> Result<()> {
    layout.check(qkv.len(), slots.len())?;
    cache.check(k_cache.len(), v_cache.len())?;
    ensure_shape!(
        cache.num_kv_heads == layout.num_kv_heads && cache.head_dim == layout.head_dim,
        "write_kv_cache: cache holds {} heads of {}, qkv {} of {}",
        cache.num_kv_heads,
        cache.head_dim,
        layout.num_kv_heads,
        layout.head_dim
    );
    let slot_len = cache.slot_len();
    let num_slots = cache.num_blocks * cache.block_size;
    for (row, &slot) in qkv.chunks_exact(layout.row_len()).zip(slots) {
        let slot = slot as usize;
        ensure_shape!(slot < num_slots, "write_kv_cache: slot {slot} is outside the pool of {num_slots}");
        k_cache[slot * slot_len..][..slot_len].copy_from_slice(&row[layout.k_offset()..][..slot_len]);
        v_cache[slot * slot_len..][..slot_len].copy_from_slice(&row[layout.v_offset()..][..slot_len]);
    }
    Ok(())
}

/// The index of the largest value of each row of `logits: [rows, vocab]` (the first on ties).
pub fn argmax(logits: &[f32], vocab: usize) -> Result<Vec<u32>> {
    ensure_shape!(vocab > 0 && logits.len().is_multiple_of(vocab), "argmax: logits are not [rows, {vocab}]");
    Ok(logits
        .par_chunks(vocab)
        .map(|row| {
            let mut best = 0;
            for (i, &v) in row.iter().enumerate() {
                if v > row[best] {
                    best = i;
                }
            }
            best as u32
        })
        .collect())
}

/// `out[i] = mean + spread · u(seed, i)` with `u` uniform in [-1, 1) from a counter-based hash
/// (splitmix64 of `seed + (i + 1) · golden ratio`), the same on the CPU and the GPU: random
/// weights for models whose real weights are not at hand.
pub fn fill_uniform(out: &mut [f32], seed: u64, mean: f32, spread: f32) {
    out.par_iter_mut().enumerate().for_each(|(i, o)| {
        let mut z = seed.wrapping_add((i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let u = (z >> 40) as f32 * (1.0 / 16_777_216.0) * 2.0 - 1.0;
        *o = mean + spread * u;
    });
}
