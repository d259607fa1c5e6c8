//! The row-wise kernels against their references.

use cudarc::driver::CudaSlice;
use half::bf16;
use nexus::kernels::{
    PagedKvLayout, PhaseContext, QkvLayout, RopeConfig, RopeScaling, RopeStyle, elementwise, reference,
};
use rand::Rng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use crate::common::*;

/// Budgets every shape runs with: one CTA, a few, and all SMs.
const BUDGETS: [Option<u32>; 3] = [Some(1), Some(7), None];

#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_and_fused_add_match_reference() {
    let mut rng = rng("rms_norm");
    // Threads of one to four vectors of a row (8192: two; 12288: three, the fourth vector past the
    // row; 16384: four), and one to four rows per round (small budgets).
    for &(rows, hidden) in &[(1, 64), (7, 576), (33, 4096), (1000, 8192), (65, 128), (9, 12288), (5, 16384)] {
        for budget in BUDGETS {
            check_rms_norms(&mut rng, rows, hidden, budget);
        }
    }
}

/// A few rows at every number of warps per row (1 to 32): small enough for racecheck, which the
/// full test above outlasts.
#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_warp_groups_for_sanitizers() {
    let mut rng = rng("rms_norm_small");
    for hidden in [128, 576, 1024, 2048, 4096, 8192] {
        check_rms_norms(&mut rng, 5, hidden, Some(2));
    }
}

/// Each row's norm is the same bit for bit whether it is normalized alone on every SM or among
/// many rows on a few CTAs (several rows per round): what the batch-invariant mode relies on.
#[test]
#[ignore = "needs a CUDA GPU"]
fn rms_norm_rows_are_batch_invariant() {
    let mut rng = rng("rms_norm invariance");
    for hidden in [576, 4096, 8192] {
        let rows = 300;
        let x = random_bf16(&mut rng, rows * hidden, 2.0);
        let residual = random_bf16(&mut rng, rows * hidden, 2.0);
        let weight = random_bf16(&mut rng, hidden, 1.0);
        let norms = |budget: Option<u32>, first: usize, count: usize| {
            let ctx = phase(budget);
            let span = first * hidden..(first + count) * hidden;
            let (dx, dw) = (upload(&ctx, &x[span.clone()]), upload(&ctx, &weight));
            let mut dres = upload(&ctx, &residual[span]);
            let mut out = poisoned(&ctx, count * hidden);
            let (x, w) = (dx.as_view(), dw.as_view());
            elementwise::rms_norm(&ctx, &x, &w, 1e-5, &mut out.as_view_mut()).expect("rms_norm");
            let plain = download(&ctx, &out);
            let mut out = poisoned(&ctx, count * hidden);
            elementwise::fused_add_rms_norm(&ctx, &x, &mut dres.as_view_mut(), &w, 1e-5, &mut out.as_view_mut())
                .expect("fused_add_rms_norm");
            (plain, download(&ctx, &out))
        };
        for budget in [Some(1), Some(5)] {
            let (plain, fused) = norms(budget, 0, rows);
            for row in [0, 1, 137, rows - 1] {
                let (one_plain, one_fused) = norms(None, row, 1);
                let span = row * hidden..(row + 1) * hidden;
                assert!(
                    one_plain.iter().zip(&plain[span.clone()]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "rms_norm row {row} of {hidden}"
                );
                assert!(
                    one_fused.iter().zip(&fused[span]).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "fused_add_rms_norm row {row} of {hidden}"
                );
            }
        }
    }
}

/// RMSNorm and the fused residual add + RMSNorm of `rows` random rows against the references.
fn check_rms_norms(rng: &mut StdRng, rows: usize, hidden: usize, budget: Option<u32>) {
    let ctx = phase(budget);
    let x = random_bf16(rng, rows * hidden, 2.0);
    let residual = random_bf16(rng, rows * hidden, 2.0);
    let weight = random_bf16(rng, hidden, 1.0);
    let (dx, dw) = (upload(&ctx, &x), upload(&ctx, &weight));

    let mut out = poisoned(&ctx, rows * hidden);
    elementwise::rms_norm(&ctx, &dx.as_view(), &dw.as_view(), 1e-5, &mut out.as_view_mut()).expect("rms_norm");
    let mut want = vec![0.0; rows * hidden];
    reference::rms_norm(&x, &weight, 1e-5, &mut want).expect("reference rms_norm");
    assert_close(&format!("rms_norm {rows}x{hidden}"), &download(&ctx, &out), &want, BF16_RTOL, 1e-2);

    let mut dres = upload(&ctx, &residual);
    let mut out = poisoned(&ctx, rows * hidden);
    elementwise::fused_add_rms_norm(
        &ctx,
        &dx.as_view(),
        &mut dres.as_view_mut(),
        &dw.as_view(),
        1e-5,
        &mut out.as_view_mut(),
    )
    .expect("fused_add_rms_norm");
    let mut want_res = residual.clone();
    reference::fused_add_rms_norm(&x, &mut want_res, &weight, 1e-5, &mut want).expect("reference fused_add_rms_norm");
    let what = format!("fused_add_rms_norm {rows}x{hidden}");
    assert_close(&format!("{what} residual"), &download(&ctx, &dres), &want_res, BF16_RTOL, 1e-2);
    assert_close(&format!("{what} out"), &download(&ctx, &out), &want, BF16_RTOL, 2e-2);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn embedding_gathers_rows() {
    let mut rng = rng("embedding");
    let (vocab, hidden) = (1000, 576);
    let table = random_bf16(&mut rng, vocab * hidden, 1.0);
    for budget in BUDGETS {
        let ctx = phase(budget);
        let tokens: Vec<u32> = (0..77).map(|_| rng.random_range(0..vocab as u32)).collect();
        let (dt, dtok) = (upload(&ctx, &table), upload_u32(&ctx, &tokens));
        let mut out = poisoned(&ctx, tokens.len() * hidden);
        elementwise::embedding(&ctx, &dt.as_view(), hidden, &dtok.as_view(), &mut out.as_view_mut()).unwrap();
        let mut want = vec![0.0; tokens.len() * hidden];
        reference::embedding(&table, hidden, &tokens, &mut want).unwrap();
        assert_close("embedding", &download(&ctx, &out), &want, 0.0, 0.0);
    }
}

/// The device buffers of `rope_and_write_kv`'s tests.
struct RopeKvBuffers {
    qkv: CudaSlice<bf16>,
    positions: CudaSlice<u32>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
}

impl RopeKvBuffers {
    fn new(ctx: &PhaseContext, qkv: &[f32], positions: &[u32], k: &[f32], v: &[f32]) -> Self {
        let (qkv, positions) = (upload(ctx, qkv), upload_u32(ctx, positions));
        RopeKvBuffers { qkv, positions, k: upload(ctx, k), v: upload(ctx, v) }
    }

    /// One launch over these buffers, writing at `slots` (uploaded here).
    fn launch(
        &mut self,
        ctx: &PhaseContext,
        layout: QkvLayout,
        rope: RopeConfig,
        slots: &[u32],
        cache: PagedKvLayout,
    ) -> nexus::kernels::Result<()> {
        let dslots = upload_u32(ctx, slots);
        elementwise::rope_and_write_kv(
            ctx,
            &mut self.qkv.as_view_mut(),
            &self.positions.as_view(),
            layout,
            rope,
            &dslots.as_view(),
            slots,
            &mut self.k.as_view_mut(),
            &mut self.v.as_view_mut(),
            cache,
        )
    }
}

/// Runs `rope_and_write_kv` on `rows` random rows at random positions below `max_position`, into
/// random pools at distinct random slots, and checks the QKV buffer (rotated Q and K, V as it
/// was) and both whole pools (only the rows' slots written) against the reference.
fn check_rope_and_write_kv(
    rng: &mut StdRng,
    what: &str,
    layout: QkvLayout,
    rows: usize,
    max_position: u32,
    rope: RopeConfig,
    atol: f32,
) {
    let cache = PagedKvLayout {
        num_blocks: rows.div_ceil(16) + 3,
        block_size: 16,
        num_kv_heads: layout.num_kv_heads,
        head_dim: layout.head_dim,
    };
    // One CTA gives a thread four heads of a row (the last group of a row partly past its heads:
    // `rope_and_write_kv_many_rows`), eight CTAs or every SM one (`rope_and_write_kv`).
    for budget in [Some(1), Some(8), None] {
        let ctx = phase(budget);
        let mut all_slots: Vec<u32> = (0..(cache.num_blocks * cache.block_size) as u32).collect();
        all_slots.shuffle(rng);
        let slots = &all_slots[..rows];
        let qkv = random_bf16(rng, rows * layout.row_len(), 2.0);
        let positions: Vec<u32> = (0..rows).map(|_| rng.random_range(0..max_position)).collect();
        let k0 = random_bf16(rng, cache.pool_len(), 1.0);
        let v0 = random_bf16(rng, cache.pool_len(), 1.0);
        let mut device = RopeKvBuffers::new(&ctx, &qkv, &positions, &k0, &v0);
        device.launch(&ctx, layout, rope, slots, cache).expect("rope_and_write_kv");
        let (mut want, mut k, mut v) = (qkv.clone(), k0.clone(), v0.clone());
        reference::rope_and_write_kv(&mut want, &positions, layout, rope, slots, &mut k, &mut v, cache)
            .expect("reference");
        let what = format!("{what}, budget {budget:?}");
        assert_close(&format!("{what}: qkv"), &download(&ctx, &device.qkv), &want, BF16_RTOL, atol);
        assert_close(&format!("{what}: K pool"), &download(&ctx, &device.k), &k, BF16_RTOL, atol);
        assert_close(&format!("{what}: V pool"), &download(&ctx, &device.v), &v, 0.0, 0.0);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_and_write_kv_matches_reference_in_both_styles() {
    let mut rng = rng("rope");
    // A thread takes 8 pairs of a head: 4 threads a head at d64, 8 at d128, 6 at d96; rows of 15,
    // 48 and 10 heads.
    for &(heads, kv_heads, head_dim) in &[(9, 3, 64), (32, 8, 128), (6, 2, 96)] {
        for style in [RopeStyle::Interleaved, RopeStyle::RotateHalf] {
            let layout = QkvLayout { num_heads: heads, num_kv_heads: kv_heads, head_dim };
            let cfg = RopeConfig { theta: 500_000.0, style, scaling: RopeScaling::None };
            // Large angles amplify f32 differences in sin/cos; values are O(1).
            check_rope_and_write_kv(&mut rng, &format!("rope {style:?} d={head_dim}"), layout, 37, 8192, cfg, 2e-2);
        }
    }
}

/// Llama 3.1's scaling (its own parameters, and a short original context as the random HF test
/// model has, so that every band is reached) and linear scaling, in both styles.
#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_and_write_kv_matches_reference_with_scaling() {
    let mut rng = rng("rope scaling");
    let llama3 = |original| RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: original,
    };
    let cases = [(llama3(8192), 128), (llama3(256), 64), (RopeScaling::Linear { factor: 4.0 }, 128)];
    for (scaling, head_dim) in cases {
        for style in [RopeStyle::Interleaved, RopeStyle::RotateHalf] {
            let layout = QkvLayout { num_heads: 8, num_kv_heads: 2, head_dim };
            let cfg = RopeConfig { theta: 500_000.0, style, scaling };
            // Angles up to 32k radians: f32 rounding of the angle dominates, as in the test above.
            let what = format!("rope {scaling:?} {style:?} d={head_dim}");
            check_rope_and_write_kv(&mut rng, &what, layout, 41, 32_768, cfg, 3e-2);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn rope_and_write_kv_refuses_bad_slots_and_pools() {
    let mut rng = rng("rope_and_write_kv refusals");
    let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
    let cache = PagedKvLayout { num_blocks: 40, block_size: 16, num_kv_heads: 8, head_dim: 128 };
    let ctx = phase(Some(3));
    let rows = 100;
    let qkv = random_bf16(&mut rng, rows * layout.row_len(), 1.0);
    let positions: Vec<u32> = (0..rows as u32).collect();
    let slots: Vec<u32> = (0..rows as u32).collect();
    let pool = vec![0.0; cache.pool_len()];
    let mut device = RopeKvBuffers::new(&ctx, &qkv, &positions, &pool, &pool);
    let rope = RopeConfig { theta: 10_000.0, style: RopeStyle::RotateHalf, scaling: RopeScaling::None };
    let mut run = |slots: &[u32], cache: PagedKvLayout| device.launch(&ctx, layout, rope, slots, cache);
    // A slot outside the pool, a slot list of the wrong length, a pool of other heads: refused
    // before anything is launched.
    let mut bad = slots.clone();
    bad[7] = (cache.num_blocks * cache.block_size) as u32;
    assert!(run(&bad, cache).is_err());
    assert!(run(&slots[..rows - 1], cache).is_err());
    assert!(run(&slots, PagedKvLayout { num_kv_heads: 4, num_blocks: 80, ..cache }).is_err());
    assert!(run(&slots, cache).is_ok());
    // The refusals left the buffer as it was: the one launch rotated it once, as the reference.
    let (mut want, mut k, mut v) = (qkv.clone(), pool.clone(), pool.clone());
    reference::rope_and_write_kv(&mut want, &positions, layout, rope, &slots, &mut k, &mut v, cache).unwrap();
    assert_close("qkv after the refusals and one launch", &download(&ctx, &device.qkv), &want, BF16_RTOL, 2e-2);
    // Heads of 120 values: the kernel takes 16 values of a head at a time.
    let narrow = QkvLayout { num_heads: 4, num_kv_heads: 2, head_dim: 120 };
    let narrow_cache = PagedKvLayout { num_kv_heads: 2, head_dim: 120, ..cache };
    let narrow_qkv = random_bf16(&mut rng, rows * narrow.row_len(), 1.0);
    let narrow_pool = vec![0.0; narrow_cache.pool_len()];
    let mut narrow_device = RopeKvBuffers::new(&ctx, &narrow_qkv, &positions, &narrow_pool, &narrow_pool);
    assert!(narrow_device.launch(&ctx, narrow, rope, &slots, narrow_cache).is_err());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn argmax_takes_the_first_maximum() {
    let mut rng = rng("argmax");
    // Vocabularies that are a multiple of 8 and some that are not (rows start off 16-byte
    // boundaries: the values before the first boundary and after the last are taken one by one).
    for (rows, vocab) in [(1, 49152), (3, 49152), (200, 49152), (1, 32003), (7, 32003), (5, 13)] {
        let ctx = phase(Some(4));
        let mut logits = random_bf16(&mut rng, rows * vocab, 8.0);
        // Plant ties for the maximum in every row: the earlier index must win. The last row of
        // several holds a NaN and the one before is all -inf: neither has a token.
        for r in 0..rows {
            let a = rng.random_range(0..vocab / 2);
            let b = rng.random_range(vocab / 2..vocab);
            logits[r * vocab + a] = 100.0;
            logits[r * vocab + b] = 100.0;
            // And a tie at adjacent indices (often in one 16-byte piece) in every other row.
            if r % 2 == 1 && a > 0 {
                logits[r * vocab + a - 1] = 100.0;
            }
        }
        if rows > 1 {
            logits[(rows - 1) * vocab + rng.random_range(0..vocab)] = f32::NAN;
            logits[(rows - 2) * vocab..(rows - 1) * vocab].fill(f32::NEG_INFINITY);
        }
        let dl = upload(&ctx, &logits);
        let mut out = ctx.stream().clone_htod(&vec![u32::MAX; rows]).unwrap();
        elementwise::argmax(&ctx, &dl.as_view(), vocab, &mut out.as_view_mut()).unwrap();
        let got = ctx.stream().clone_dtoh(&out).unwrap();
        let want = reference::argmax(&logits, vocab).unwrap();
        assert_eq!(got, want);
        if rows > 1 {
            assert_eq!(want[rows - 2..], [reference::ARGMAX_NONE; 2]);
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn launchers_reject_bad_shapes() {
    let ctx = phase(None);
    let x = poisoned(&ctx, 100);
    let w = poisoned(&ctx, 12);
    let mut out = poisoned(&ctx, 100);
    // 100 values are not whole rows of 12, and 12 is not a multiple of 8.
    assert!(elementwise::rms_norm(&ctx, &x.as_view(), &w.as_view(), 1e-5, &mut out.as_view_mut()).is_err());
    let w = poisoned(&ctx, 16);
    let mut small = poisoned(&ctx, 96);
    let x = poisoned(&ctx, 96 + 16);
    assert!(elementwise::rms_norm(&ctx, &x.as_view(), &w.as_view(), 1e-5, &mut small.as_view_mut()).is_err());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fill_uniform_matches_reference() {
    let ctx = phase(Some(6));
    for (n, seed, mean, spread) in
        [(1usize, 0u64, 0.0f32, 1.0f32), (100_003, 42, 1.0, 0.1), (1 << 22, u64::MAX, -0.5, 0.02)]
    {
        let mut out = poisoned(&ctx, n);
        elementwise::fill_uniform(&ctx, &mut out.as_view_mut(), seed, mean, spread).unwrap();
        let mut want = vec![0.0; n];
        reference::fill_uniform(&mut want, seed, mean, spread);
        let got = download(&ctx, &out);
        assert_close(&format!("fill_uniform n={n}"), &got, &want, BF16_RTOL, 1e-6);
        let lo = got.iter().copied().fold(f32::INFINITY, f32::min);
        let hi = got.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Rounding to bf16 may move a value by half an ulp (2^-8 relative) past the range.
        let slack = (mean.abs() + spread) / 256.0;
        assert!(lo >= mean - spread - slack && hi <= mean + spread + slack, "range [{lo}, {hi}]");
    }
}

/// The fold of a norm's gain into a weight: every value the reference's product rounded to bf16,
/// bit for bit (one f32 multiply of two bf16 values), over rows of SmolLM2's and Llama-3.1-8B's
/// hidden sizes at budgets 1 and all; shapes that are not rows of the gain refused.
#[test]
#[ignore = "needs a CUDA GPU"]
fn fold_norm_gain_matches_reference() {
    let mut rng = rng("fold_norm_gain");
    for budget in [Some(1), None] {
        let ctx = phase(budget);
        for (rows, k) in [(3, 576), (1537, 4096)] {
            let weight = random_bf16(&mut rng, rows * k, 1.0);
            let gain = random_bf16(&mut rng, k, 2.0);
            let mut dev = upload(&ctx, &weight);
            elementwise::fold_norm_gain(&ctx, &mut dev.as_view_mut(), &upload(&ctx, &gain).as_view()).unwrap();
            let mut want = weight.clone();
            reference::fold_norm_gain(&mut want, &gain).unwrap();
            let want: Vec<f32> = want.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
            assert_eq!(download(&ctx, &dev), want, "{rows} x {k} on {budget:?} SMs");
        }
        let mut short = upload(&ctx, &[1.0; 10]);
        let err = elementwise::fold_norm_gain(&ctx, &mut short.as_view_mut(), &upload(&ctx, &[1.0; 4]).as_view());
        assert!(err.is_err_and(|e| e.to_string().contains("not rows of 4")), "10 values are not rows of 4");
    }
}
