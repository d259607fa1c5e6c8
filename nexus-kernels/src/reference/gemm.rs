//! `gemm`: `C[m, n] = A[m, k] · B[n, k]ᵀ (+ bias[n])`, the layout of a linear layer whose weight
//! is stored `[out_features, in_features]`; `gemm_silu_and_mul`, the same with a SwiGLU epilogue.
//! `square_sums`, `rms_scales_from_square_sums` and `fold_norm_gain` are what the GPU GEMM's
//! fusion of the residual add and RMSNorm (`gemm::GemmFusion`) computes on the way.

use rayon::prelude::*;

use super::elementwise::silu_and_mul;
use crate::Result;
use crate::error::ensure_shape;
use crate::gemm::SQUARE_SUM_COLS;

/// The sizes of a GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
}

impl GemmShape {
    /// The bytes of A, B and C in bf16: what a GEMM of this shape reads and writes at least.
    pub fn bf16_bytes(&self) -> usize {
        2 * (self.m * self.k + self.n * self.k + self.m * self.n)
    }
}

/// Rows of B handled together, so that they stay in cache while every row of A passes by.
const B_ROWS_PER_TASK: usize = 16;

/// `c = a · bᵀ (+ bias)`, with `a: [m, k]`, `b: [n, k]`, `bias: [n]`, `c: [m, n]`.
pub fn gemm(a: &[f32], b: &[f32], bias: Option<&[f32]>, c: &mut [f32], shape: GemmShape) -> Result<()> {
    let GemmShape { m, n, k } = shape;
    ensure_shape!(k > 0, "gemm: k is 0");
    ensure_shape!(a.len() == m * k, "gemm: A has {} values, expected {m} x {k}", a.len());
    ensure_shape!(b.len() == n * k, "gemm: B has {} values, expected {n} x {k}", b.len());
    ensure_shape!(c.len() == m * n, "gemm: C has {} values, expected {m} x {n}", c.len());
    if let Some(bias) = bias {
        ensure_shape!(bias.len() == n, "gemm: bias has {} values, expected {n}", bias.len());
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Each task computes a column block of C; tasks write disjoint columns, collected per task
    // and scattered afterwards so that no two threads share a row slice.
    let blocks: Vec<Vec<f32>> = b
        .par_chunks(B_ROWS_PER_TASK * k)
        .enumerate()
        .map(|(block, b_rows)| {
            let rows = b_rows.len() / k;
            let mut out = vec![0f32; m * rows];
            for i in 0..m {
                let a_row = &a[i * k..(i + 1) * k];
                for j in 0..rows {
                    let col = block * B_ROWS_PER_TASK + j;
                    let acc = dot(a_row, &b_rows[j * k..(j + 1) * k]);
                    out[i * rows + j] = acc + bias.map_or(0.0, |bias| bias[col]);
                }
            }
            out
        })
        .collect();
    for (block, out) in blocks.iter().enumerate() {
        let col0 = block * B_ROWS_PER_TASK;
        let rows = out.len() / m;
        for i in 0..m {
            c[i * n + col0..i * n + col0 + rows].copy_from_slice(&out[i * rows..(i + 1) * rows]);
        }
    }
    Ok(())
}

/// The SwiGLU of a feed-forward layer: `out = silu(a · gateᵀ) * (a · upᵀ)`, where `gate_up: [n, k]`
/// holds the gate rows, then the up rows (`n / 2` each), `a: [m, k]` and `out: [m, n / 2]`;
/// `shape` is the GEMM's, `n` included.
pub fn gemm_silu_and_mul(a: &[f32], gate_up: &[f32], out: &mut [f32], shape: GemmShape) -> Result<()> {
    let GemmShape { m, n, .. } = shape;
    ensure_shape!(n > 0 && n % 2 == 0, "gemm_silu_and_mul: n = {n} (gate and up rows) must be even and positive");
    ensure_shape!(
        out.len() == m * (n / 2),
        "gemm_silu_and_mul: out has {} values, expected {m} x {}",
        out.len(),
        n / 2
    );
    let mut both = vec![0f32; m * n];
    gemm(a, gate_up, None, &mut both, shape)?;
    silu_and_mul(&both, n / 2, out)
}

/// The sums of squares of each row of the `[rows, cols]` matrix `x` per [`SQUARE_SUM_COLS`]
/// columns (the last group may be shorter): `[rows, cols.div_ceil(SQUARE_SUM_COLS)]`.
pub fn square_sums(x: &[f32], cols: usize) -> Result<Vec<f32>> {
    ensure_shape!(cols > 0 && x.len().is_multiple_of(cols), "square_sums: x is not rows of {cols}");
    Ok(x.chunks_exact(cols)
        .flat_map(|row| row.chunks(SQUARE_SUM_COLS).map(|group| group.iter().map(|v| v * v).sum::<f32>()))
        .collect())
}

/// The RMSNorm factor `1 / sqrt(mean(row²) + eps)` of each row of `cols` values, from the row's
/// square sums (as [`square_sums`] gives them).
pub fn rms_scales_from_square_sums(sums: &[f32], cols: usize, eps: f32) -> Result<Vec<f32>> {
    let groups = cols.div_ceil(SQUARE_SUM_COLS);
    ensure_shape!(groups > 0 && sums.len().is_multiple_of(groups), "rms_scales: sums are not rows of {groups}");
    Ok(sums.chunks_exact(groups).map(|row| 1.0 / (row.iter().sum::<f32>() / cols as f32 + eps).sqrt()).collect())
}

/// Multiplies each row of the `[rows, gain.len()]` matrix `weight` by `gain` elementwise: the
/// weight whose product with unnormalized rows, scaled by their RMSNorm factors, is the product
/// of their RMSNorm (with weight `gain`) with `weight`.
pub fn fold_norm_gain(weight: &mut [f32], gain: &[f32]) -> Result<()> {
    ensure_shape!(
        !gain.is_empty() && weight.len().is_multiple_of(gain.len()),
        "fold_norm_gain: weight has {} values, not rows of {}",
        weight.len(),
        gain.len()
    );
    for row in weight.chunks_exact_mut(gain.len()) {
        for (w, g) in row.iter_mut().zip(gain) {
            *w *= g;
        }
    }
    Ok(())
}

/// A dot product with eight independent partial sums, which the compiler turns into SIMD.
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (a8, a_rest) = a.split_at(a.len() / 8 * 8);
    let (b8, b_rest) = b.split_at(a8.len());
    for (x, y) in a8.chunks_exact(8).zip(b8.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = acc.iter().sum::<f32>();
    for (x, y) in a_rest.iter().zip(b_rest) {
        sum += x * y;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemm_matches_naive_triple_loop() {
        let (m, n, k) = (5, 37, 19);
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let b: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
        let mut c = vec![f32::NAN; m * n];
        gemm(&a, &b, Some(&bias), &mut c, GemmShape { m, n, k }).unwrap();
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|l| a[i * k + l] * b[j * k + l]).sum::<f32>() + bias[j];
                assert!((c[i * n + j] - want).abs() <= 1e-4 * want.abs().max(1.0), "({i},{j})");
            }
        }
    }

    #[test]
    fn square_sums_give_the_rms_norm_factor() {
        // Rows of 150 values: groups of 64, 64 and 22.
        let (rows, cols, eps) = (3, 150, 1e-5);
        let x: Vec<f32> = (0..rows * cols).map(|i| ((i * 13 % 17) as f32 - 8.0) / 5.0).collect();
        let sums = square_sums(&x, cols).unwrap();
        assert_eq!(sums.len(), rows * 3);
        let tail: f32 = x[128..150].iter().map(|v| v * v).sum();
        assert!((sums[2] - tail).abs() <= 1e-5 * tail, "the last, shorter group of row 0");
        // The factors times a row are the RMSNorm of the row with a gain of ones.
        let scales = rms_scales_from_square_sums(&sums, cols, eps).unwrap();
        let mut want = vec![0.0; rows * cols];
        super::super::elementwise::rms_norm(&x, &vec![1.0; cols], eps, &mut want).unwrap();
        for (i, w) in want.iter().enumerate() {
            assert!((x[i] * scales[i / cols] - w).abs() <= 1e-5 * w.abs().max(1.0), "value {i}");
        }
        assert!(square_sums(&x, 7).is_err() && rms_scales_from_square_sums(&sums[..4], cols, eps).is_err());
    }

    #[test]
    fn a_folded_gain_gives_the_product_of_the_normalized_rows() {
        // rms_norm(x; gain) · Wᵀ = (x · scale) · (W ∘ gain)ᵀ.
        let (m, n, k, eps) = (2, 5, 70, 1e-6);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 5 % 13) as f32 - 6.0) / 4.0).collect();
        let gain: Vec<f32> = (0..k).map(|i| 0.5 + (i % 5) as f32 / 4.0).collect();
        let shape = GemmShape { m, n, k };
        let mut normalized = vec![0.0; m * k];
        super::super::elementwise::rms_norm(&x, &gain, eps, &mut normalized).unwrap();
        let mut want = vec![0.0; m * n];
        gemm(&normalized, &w, None, &mut want, shape).unwrap();
        let mut folded = w.clone();
        fold_norm_gain(&mut folded, &gain).unwrap();
        let scales = rms_scales_from_square_sums(&square_sums(&x, k).unwrap(), k, eps).unwrap();
        let scaled: Vec<f32> = x.iter().enumerate().map(|(i, v)| v * scales[i / k]).collect();
        let mut got = vec![0.0; m * n];
        gemm(&scaled, &folded, None, &mut got, shape).unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
        }
        assert!(fold_norm_gain(&mut folded, &gain[..9]).is_err(), "350 values are not rows of 9");
    }

    #[test]
    fn gemm_rejects_wrong_lengths() {
        let mut c = vec![0f32; 4];
        assert!(gemm(&[0.0; 6], &[0.0; 6], None, &mut c, GemmShape { m: 2, n: 2, k: 4 }).is_err());
    }
}
