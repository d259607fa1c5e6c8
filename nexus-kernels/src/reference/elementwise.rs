//! Row-wise operations: embedding gather, RMSNorm, RoPE, SiLU-and-mul, KV-cache writes, argmax.

use rayon::prelude::*;

use crate::Result;
use crate::error::ensure_shape;
use crate::layout::{PagedKvLayout, QkvLayout, RopeConfig, RopeScaling, RopeStyle};

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

/// The rotation frequency of each pair `i < head_dim / 2`: `theta^(-2i/d)`, then scaled as
/// [`RopeScaling`] describes, all in f32 in the order of Hugging Face's `_compute_*_parameters`.
pub fn rope_inv_freq(rope: RopeConfig, head_dim: usize) -> Result<Vec<f32>> {
    rope.check()?;
    ensure_shape!(head_dim > 0 && head_dim.is_multiple_of(2), "rope: head_dim {head_dim} must be even");
    let plain = (0..head_dim / 2).map(|i| 1.0 / rope.theta.powf((2 * i) as f32 / head_dim as f32));
    Ok(plain.map(|f| scale_inv_freq(f, rope.scaling)).collect())
}

/// One frequency under `scaling`; the CUDA kernel's `scale_inv_freq` is the same arithmetic.
fn scale_inv_freq(inv_freq: f32, scaling: RopeScaling) -> f32 {
    match scaling {
        RopeScaling::None => inv_freq,
        RopeScaling::Linear { factor } => inv_freq / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings,
        } => {
            let original = original_max_position_embeddings as f32;
            let wavelen = 2.0 * std::f32::consts::PI / inv_freq;
            if wavelen < original / high {
                inv_freq
            } else if wavelen > original / low {
                inv_freq / factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
            }
        }
    }
}

/// Rotates the query and key heads of a fused QKV buffer `[tokens, layout.row_len()]` in place by
/// each token's position, at the frequencies of [`rope_inv_freq`].
fn rope(qkv: &mut [f32], positions: &[u32], layout: QkvLayout, rope: RopeConfig) -> Result<()> {
    layout.check(qkv.len(), positions.len())?;
    let d = layout.head_dim;
    let inv_freq = rope_inv_freq(rope, d)?;
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
pub(crate) fn silu_and_mul(gate_up: &[f32], width: usize, out: &mut [f32]) -> Result<()> {
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

/// Rotates the query and key heads of a fused QKV buffer `[tokens, layout.row_len()]` in place by
/// each token's position, at the frequencies of [`rope_inv_freq`], then copies each token's
/// (rotated) keys and its values into the paged pools at slot `slots[t]` (= block id × block size
/// + offset in the block). The pools and slots are checked before anything is written.
#[allow(clippy::too_many_arguments)]
pub fn rope_and_write_kv(
    qkv: &mut [f32],
    positions: &[u32],
    layout: QkvLayout,
    rope_config: RopeConfig,
    slots: &[u32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    cache: PagedKvLayout,
) -> Result<()> {
    ensure_shape!(
        slots.len() == positions.len(),
        "rope_and_write_kv: {} slots for {} positions",
        slots.len(),
        positions.len()
    );
    // As the launcher does (rope checks its own arguments first).
    cache.check(k_cache.len(), v_cache.len())?;
    cache.check_holds(layout, "rope_and_write_kv")?;
    cache.check_slots(slots, "rope_and_write_kv")?;
    rope(qkv, positions, layout, rope_config)?;
    let slot_len = cache.slot_len();
    for (row, &slot) in qkv.chunks_exact(layout.row_len()).zip(slots) {
        let slot = slot as usize;
        k_cache[slot * slot_len..][..slot_len].copy_from_slice(&row[layout.k_offset()..][..slot_len]);
        v_cache[slot * slot_len..][..slot_len].copy_from_slice(&row[layout.v_offset()..][..slot_len]);
    }
    Ok(())
}

/// The index of the largest value of each row of `logits: [rows, vocab]` (the first on ties), or
/// [`ARGMAX_NONE`] for a row that holds NaN or has no value above -inf.
pub fn argmax(logits: &[f32], vocab: usize) -> Result<Vec<u32>> {
    ensure_shape!(vocab > 0 && logits.len().is_multiple_of(vocab), "argmax: logits are not [rows, {vocab}]");
    Ok(logits
        .par_chunks(vocab)
        .map(|row| {
            let mut best: Option<usize> = None;
            for (i, &v) in row.iter().enumerate() {
                if v.is_nan() {
                    return ARGMAX_NONE;
                }
                if v > best.map_or(f32::NEG_INFINITY, |b| row[b]) {
                    best = Some(i);
                }
            }
            best.map_or(ARGMAX_NONE, |b| b as u32)
        })
        .collect())
}

/// What [`argmax`] reports for a row that holds NaN or has no value above -inf: no token.
pub const ARGMAX_NONE: u32 = u32::MAX;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argmax_takes_the_first_maximum_and_refuses_rows_without_one() {
        let inf = f32::INFINITY;
        let rows = [1.0, 3.0, 3.0, -inf, -inf, -inf, 2.0, f32::NAN, 5.0, -inf, inf, inf];
        assert_eq!(argmax(&rows, 3).unwrap(), vec![1, ARGMAX_NONE, ARGMAX_NONE, 1]);
        assert!(argmax(&rows, 5).is_err());
    }

    /// Hugging Face's `_compute_llama3_parameters` for one frequency, transcribed in f64 with its
    /// `torch.where` structure (not the branch chain of `scale_inv_freq`).
    fn llama3_f64(inv_freq: f64, factor: f64, low: f64, high: f64, original: f64) -> f64 {
        let low_freq_wavelen = original / low;
        let high_freq_wavelen = original / high;
        let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
        let scaled = if wavelen > low_freq_wavelen { inv_freq / factor } else { inv_freq };
        let smooth = (original / wavelen - low) / (high - low);
        let smoothed = (1.0 - smooth) * scaled / factor + smooth * scaled;
        let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
        if medium { smoothed } else { scaled }
    }

    /// The angle of pair `i` at `pos`, in f64.
    fn expected_angle(rope: RopeConfig, head_dim: usize, i: usize, pos: u32) -> f64 {
        let plain = 1.0 / (rope.theta as f64).powf(2.0 * i as f64 / head_dim as f64);
        let freq = match rope.scaling {
            RopeScaling::None => plain,
            RopeScaling::Linear { factor } => plain / factor as f64,
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                llama3_f64(
                    plain,
                    factor as f64,
                    low_freq_factor as f64,
                    high_freq_factor as f64,
                    original_max_position_embeddings as f64,
                )
            }
        };
        pos as f64 * freq
    }

    /// Rotates, in one query head and one key head, the vector with a 1 in the first dimension of
    /// every pair, so that each pair reads back as (cos, sin) of its angle; checks them against
    /// the f64 angles.
    fn check_angles(rope: RopeConfig, head_dim: usize) {
        let layout = QkvLayout { num_heads: 1, num_kv_heads: 1, head_dim };
        let positions = [0u32, 1, 37, 300, 1000, 9000];
        let pair = |i: usize| match rope.style {
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
            RopeStyle::RotateHalf => (i, i + head_dim / 2),
        };
        let mut qkv = vec![0.0f32; positions.len() * layout.row_len()];
        for row in qkv.chunks_exact_mut(layout.row_len()) {
            for head in 0..2 {
                for i in 0..head_dim / 2 {
                    row[head * head_dim + pair(i).0] = 1.0;
                }
            }
        }
        super::rope(&mut qkv, &positions, layout, rope).expect("rope");
        for (row, &pos) in qkv.chunks_exact(layout.row_len()).zip(&positions) {
            for head in 0..2 {
                for i in 0..head_dim / 2 {
                    let angle = expected_angle(rope, head_dim, i, pos);
                    let (a, b) = pair(i);
                    let got = (row[head * head_dim + a] as f64, row[head * head_dim + b] as f64);
                    // f32 rounds the frequency and the product with the position: the angle's error
                    // grows with its size.
                    let tolerance = 1e-6 * (1.0 + angle);
                    assert!(
                        (got.0 - angle.cos()).abs() <= tolerance && (got.1 - angle.sin()).abs() <= tolerance,
                        "{rope:?} d={head_dim} pair {i} pos {pos}: got (cos, sin) {got:?}, want angle {angle}"
                    );
                }
            }
            // The value heads are not rotated.
            assert!(row[2 * head_dim..].iter().all(|&v| v == 0.0));
        }
    }

    /// The pairs of `head_dim` whose wavelength falls in each of llama3's bands: kept, interpolated,
    /// divided.
    fn band_sizes(theta: f64, head_dim: usize, low: f64, high: f64, original: f64) -> [usize; 3] {
        let mut bands = [0; 3];
        for i in 0..head_dim / 2 {
            let wavelen = 2.0 * std::f64::consts::PI * theta.powf(2.0 * i as f64 / head_dim as f64);
            let band = if wavelen < original / high {
                0
            } else if wavelen > original / low {
                2
            } else {
                1
            };
            bands[band] += 1;
        }
        bands
    }

    #[test]
    fn rope_with_llama3_scaling_matches_the_formula() {
        // Llama 3.1's own parameters, and those of the random HF test model (a short original
        // context, so that test positions reach far into the scaled band).
        let cases = [
            (500_000.0f32, 128, 8.0, 1.0, 4.0, 8192),
            (500_000.0, 64, 8.0, 1.0, 4.0, 256),
            (10_000.0, 64, 4.0, 2.0, 8.0, 512),
        ];
        for (theta, head_dim, factor, low, high, original) in cases {
            // Every band has pairs, so every branch of the rule is checked.
            let bands = band_sizes(theta as f64, head_dim, low as f64, high as f64, original as f64);
            assert!(bands.iter().all(|&n| n > 0), "bands {bands:?} of theta {theta} d={head_dim} original {original}");
            let scaling = RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            };
            for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
                check_angles(RopeConfig { theta, style, scaling }, head_dim);
            }
        }
    }

    #[test]
    fn rope_with_linear_scaling_and_without_matches_the_formula() {
        for scaling in [RopeScaling::None, RopeScaling::Linear { factor: 4.0 }, RopeScaling::Linear { factor: 0.5 }] {
            for style in [RopeStyle::RotateHalf, RopeStyle::Interleaved] {
                check_angles(RopeConfig { theta: 10_000.0, style, scaling }, 64);
            }
        }
    }

    #[test]
    fn llama3_frequencies_are_kept_interpolated_and_divided() {
        let rope = RopeConfig {
            theta: 500_000.0,
            style: RopeStyle::RotateHalf,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let plain = rope_inv_freq(RopeConfig { scaling: RopeScaling::None, ..rope }, 128).expect("plain");
        let scaled = rope_inv_freq(rope, 128).expect("scaled");
        // The highest frequency is kept, the lowest divided by the factor, and the ratio never
        // leaves [1, factor] and never decreases towards lower frequencies.
        assert_eq!(scaled[0], plain[0]);
        assert_eq!(scaled[63], plain[63] / 8.0);
        let ratios: Vec<f32> = plain.iter().zip(&scaled).map(|(p, s)| p / s).collect();
        assert!(ratios.windows(2).all(|w| w[0] <= w[1] * (1.0 + 1e-6)), "{ratios:?}");
        assert!(ratios.iter().all(|&r| (1.0..=8.0 * (1.0 + 1e-6)).contains(&r)), "{ratios:?}");
    }

    #[test]
    fn bad_rope_parameters_are_refused() {
        let llama3 = |factor, low, high, original| RopeConfig {
            theta: 500_000.0,
            style: RopeStyle::RotateHalf,
            scaling: RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: original,
            },
        };
        let linear = |factor| RopeConfig { scaling: RopeScaling::Linear { factor }, ..llama3(8.0, 1.0, 4.0, 8192) };
        for bad in [
            llama3(0.0, 1.0, 4.0, 8192),
            llama3(8.0, 4.0, 4.0, 8192),
            llama3(8.0, 0.0, 4.0, 8192),
            llama3(8.0, 1.0, 4.0, 0),
            linear(0.0),
            linear(f32::NAN),
            RopeConfig { theta: 0.0, ..llama3(8.0, 1.0, 4.0, 8192) },
        ] {
            assert!(rope_inv_freq(bad, 64).is_err(), "{bad:?}");
            let layout = QkvLayout { num_heads: 1, num_kv_heads: 1, head_dim: 64 };
            assert!(rope(&mut vec![0.0; layout.row_len()], &[0], layout, bad).is_err(), "{bad:?}");
        }
    }
}
