//! The GEMM kernels against the reference: every kernel the device runs (forced with
//! `gemm_with`) and the planned one, over edge shapes, with and without bias, at budgets of 1, 7
//! and all SMs; outputs poisoned with NaN first, so an unwritten element fails.
//!
//! Tolerance: inputs are bf16 uniform in `[-1, 1)`, so each product is at most 1 in magnitude and
//! a sum of `k` of them has a spread of about `sqrt(k) / 3`. The kernels accumulate in f32 (in
//! another order than the reference) and round once to bf16, so they may differ from the f32
//! reference by the bf16 rounding (`rtol` = 1e-2 ≥ 2⁻⁸) plus a little summation noise:
//! `atol` = 2e-3 · sqrt(k). A lost or doubled K block, tile or bias shows up as an error of order
//! 1, far above both.

use cudarc::driver::CudaSlice;
use half::bf16;
use nexus::kernels::gemm::{
    self, GemmConfig, GemmFusion, GemmKernel, GemmShape, GemmWorkspace, MAX_SPLITS, MAX_UNITS_PER_SM,
};
use nexus::kernels::gpu::PtxTarget;
use nexus::kernels::{PhaseContext, reference};
use rand::rngs::StdRng;

use crate::common::*;

/// Budgets every shape runs with: one CTA, a few, and all SMs.
const BUDGETS: [Option<u32>; 3] = [Some(1), Some(7), None];

/// Rows of A for the small (N, K) pairs.
const SMALL_MS: [usize; 11] = [1, 2, 7, 16, 33, 64, 65, 128, 255, 1000, 2048];
/// (N, K) pairs run with every M of [`SMALL_MS`].
const SMALL_NK: [(usize, usize); 5] = [(576, 576), (192, 576), (1536, 576), (8, 8), (72, 200)];
/// A Llama-3-8B projection (N, K), with the M values that keep the CPU reference quick.
const LARGE_NK: (usize, usize) = (6144, 4096);
const LARGE_MS: [usize; 7] = [1, 7, 16, 33, 64, 65, 128];

fn tolerance(k: usize) -> f32 {
    2e-3 * (k as f32).sqrt()
}

/// The kernels the device runs.
fn kernels(ctx: &PhaseContext) -> Vec<GemmKernel> {
    let mut v: Vec<GemmKernel> = GemmKernel::PORTABLE.into_iter().chain(GemmKernel::STREAMS).collect();
    if ctx.gpu().target() == PtxTarget::Sm90a {
        v.extend(GemmKernel::HOPPER.into_iter().chain(GemmKernel::PAIRS));
    }
    v
}

/// Whether a test runs `kernel` on `shape`: the register-streamed kernels read the whole weight
/// once per M tile of 8 or 16 rows, so on a large weight (a Llama projection) only where two
/// tiles hold M; the small shapes give them many tiles.
fn runs_on(kernel: GemmKernel, shape: GemmShape) -> bool {
    !GemmKernel::STREAMS.contains(&kernel) || shape.n * shape.k < 1 << 22 || shape.m <= 2 * kernel.tile().0
}

/// Whether `config` is a pair kernel on a budget of one CTA, which its clusters of two cannot
/// run on: the launcher must refuse it (`result`), and did, if this returns true.
fn refused_pair<T>(config: Option<GemmConfig>, ctx: &PhaseContext, result: &nexus::kernels::Result<T>) -> bool {
    if !config.is_some_and(|c| c.kernel.is_pair()) || ctx.budget().get() >= 2 {
        return false;
    }
    let kind = result.as_ref().err().map(|e| e.kind());
    assert_eq!(kind, Some(nexus::kernels::ErrorKind::Unsupported), "{config:?} on one CTA");
    true
}

struct Case {
    shape: GemmShape,
    a: Vec<f32>,
    b: Vec<f32>,
    bias: Vec<f32>,
    /// Reference without bias, and with it.
    want: Vec<f32>,
    want_bias: Vec<f32>,
}

impl Case {
    fn new(rng: &mut StdRng, m: usize, n: usize, k: usize) -> Case {
        let shape = GemmShape { m, n, k };
        let a = random_bf16(rng, m * k, 1.0);
        let b = random_bf16(rng, n * k, 1.0);
        let bias = random_bf16(rng, n, 1.0);
        let mut want = vec![0.0; m * n];
        reference::gemm(&a, &b, None, &mut want, shape).expect("reference gemm");
        let want_bias = want.iter().enumerate().map(|(i, w)| w + bias[i % n]).collect();
        Case { shape, a, b, bias, want, want_bias }
    }

    /// Runs `kernel` (the planned one when `None`) on every budget and compares.
    fn check(&self, kernel: Option<GemmConfig>, buffers: &Buffers, ctxs: &mut [(PhaseContext, GemmWorkspace)]) {
        let GemmShape { m, n, k } = self.shape;
        for (i, (ctx, workspace)) in ctxs.iter_mut().enumerate() {
            // Bias on budgets 1 and all, none on 7.
            let with_bias = i != 1;
            let mut out = poisoned(ctx, m * n);
            let bias_view = buffers.bias.as_view();
            let bias = with_bias.then_some(&bias_view);
            let (a, b) = (buffers.a.as_view(), buffers.b.as_view());
            let result = match kernel {
                Some(kernel) => gemm::gemm_with(
                    ctx,
                    kernel,
                    GemmFusion::None,
                    &a,
                    &b,
                    bias,
                    &mut out.as_view_mut(),
                    self.shape,
                    workspace,
                ),
                None => gemm::gemm(ctx, &a, &b, bias, &mut out.as_view_mut(), self.shape, workspace),
            };
            if refused_pair(kernel, ctx, &result) {
                continue;
            }
            result.unwrap_or_else(|e| panic!("{kernel:?} {m}x{n}x{k}: {e}"));
            let want = if with_bias { &self.want_bias } else { &self.want };
            let what = format!("{kernel:?} m={m} n={n} k={k} budget {} bias {with_bias}", ctx.budget().get());
            assert_close(&what, &download(ctx, &out), want, BF16_RTOL, tolerance(k));
        }
    }
}

struct Buffers {
    a: CudaSlice<bf16>,
    b: CudaSlice<bf16>,
    bias: CudaSlice<bf16>,
}

fn contexts() -> Vec<(PhaseContext, GemmWorkspace)> {
    BUDGETS
        .iter()
        .map(|&budget| {
            let ctx = phase(budget);
            let workspace = GemmWorkspace::new(&ctx).expect("workspace");
            (ctx, workspace)
        })
        .collect()
}

fn run_cases(test: &str, cases: impl IntoIterator<Item = (usize, usize, usize)>) {
    let mut rng = rng(test);
    let mut ctxs = contexts();
    let kernels = kernels(&ctxs[0].0);
    for (m, n, k) in cases {
        let case = Case::new(&mut rng, m, n, k);
        let ctx = &ctxs[0].0;
        let buffers = Buffers { a: upload(ctx, &case.a), b: upload(ctx, &case.b), bias: upload(ctx, &case.bias) };
        ctx.stream().synchronize().expect("upload");
        for &kernel in kernels.iter().filter(|&&kernel| runs_on(kernel, case.shape)) {
            case.check(Some(kernel.into()), &buffers, &mut ctxs);
        }
        case.check(None, &buffers, &mut ctxs);
    }
}

/// SwiGLU shapes `(m, n, k)`, `n` counting the gate and the up rows: SmolLM2's feed-forward layer,
/// tiles cut short in N, M and K, and Llama-3.1-8B's at a decode batch.
const SILU_CASES: [(usize, usize, usize); 6] =
    [(1, 3072, 576), (7, 48, 64), (65, 208, 200), (16, 1040, 576), (255, 1536, 576), (64, 28672, 4096)];

/// `gemm_silu_and_mul` against its reference: every kernel the device runs, and for shapes of
/// `split_cases` every split the workspace takes, then the planned launch, at every budget, into
/// poisoned outputs. The activations are scaled by 3/√k so that gate and up sums are of order 1
/// (unscaled, the product of two sums of k terms grows with k): the kernels keep both in f32 and
/// round only the product to bf16, so `rtol` is bf16's and `atol` covers summation order; a lost K
/// block moves a sum by ~8/√k ≥ 0.12 (k ≤ 4096), several times `atol`.
fn run_silu_cases(test: &str, cases: &[(usize, usize, usize)], split_cases: usize) {
    let mut rng = rng(test);
    let mut ctxs = contexts();
    let kernels = kernels(&ctxs[0].0);
    let sms = ctxs[0].0.gpu().sm_count() as usize;
    for (case, &(m, n, k)) in cases.iter().enumerate() {
        let shape = GemmShape { m, n, k };
        let a = random_bf16(&mut rng, m * k, 3.0 / (k as f32).sqrt());
        let b = random_bf16(&mut rng, n * k, 1.0);
        let mut want = vec![0.0; m * n / 2];
        reference::gemm_silu_and_mul(&a, &b, &mut want, shape).expect("reference");
        let (da, db) = (upload(&ctxs[0].0, &a), upload(&ctxs[0].0, &b));
        ctxs[0].0.stream().synchronize().expect("upload");
        let mut configs: Vec<Option<GemmConfig>> =
            kernels.iter().filter(|&&kernel| runs_on(kernel, shape)).map(|&kernel| Some(kernel.into())).collect();
        if case < split_cases {
            for kernel in kernels.iter().copied().filter(|kernel| kernel.splits_k()) {
                let most = MAX_SPLITS.min(k.div_ceil(64)).min(MAX_UNITS_PER_SM * sms / kernel.tiles(shape).max(1));
                configs.extend((2..=most).map(|splits| Some(GemmConfig { kernel, splits })));
            }
        }
        configs.push(None);
        for config in configs {
            for (ctx, workspace) in ctxs.iter_mut() {
                let mut out = poisoned(ctx, m * n / 2);
                let (av, bv, mut ov) = (da.as_view(), db.as_view(), out.as_view_mut());
                let result = match config {
                    Some(config) => {
                        gemm::gemm_silu_and_mul_with(ctx, config, GemmFusion::None, &av, &bv, &mut ov, shape, workspace)
                    }
                    None => gemm::gemm_silu_and_mul(ctx, &av, &bv, &mut ov, shape, workspace),
                };
                let what = format!("silu_and_mul {config:?} m={m} n={n} k={k} budget {}", ctx.budget().get());
                if refused_pair(config, ctx, &result) {
                    continue;
                }
                result.unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_close(&what, &download(ctx, &out), &want, BF16_RTOL, 2e-2);
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_silu_and_mul_matches_reference() {
    run_silu_cases("gemm_silu_and_mul", &SILU_CASES, 4);
}

/// The SwiGLU launcher refuses what its epilogue cannot store: gate and up halves that are not
/// whole blocks of 8 rows, an output of the wrong size.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_silu_and_mul_rejects_bad_shapes() {
    let mut ctxs = contexts();
    let (ctx, workspace) = &mut ctxs[2];
    let (m, n, k) = (4, 32, 64);
    let a = poisoned(ctx, m * k);
    let b = poisoned(ctx, n * k);
    let mut out = poisoned(ctx, m * n);
    let mut run = |n: usize, out_len: usize| {
        let shape = GemmShape { m, n, k };
        let (av, bv) = (a.as_view(), b.slice(..n * k));
        gemm::gemm_silu_and_mul(ctx, &av, &bv, &mut out.slice_mut(..out_len), shape, workspace).map_err(|e| e.kind())
    };
    assert_eq!(run(n, m * n / 2), Ok(()));
    assert_eq!(run(24, m * 12), Err(nexus::kernels::ErrorKind::Shape));
    assert_eq!(run(n, m * n), Err(nexus::kernels::ErrorKind::Shape));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_small_shapes_match_reference() {
    run_cases("gemm_small", SMALL_NK.iter().flat_map(|&(n, k)| SMALL_MS.iter().map(move |&m| (m, n, k))));
}

/// Three of the small shapes (M of 1, 65 and 255: one tile row, a partial one, several), and two
/// SwiGLU ones, every kernel at every budget: few enough launches for racecheck, which the full set outlasts
/// (over 200 s on the H200).
#[test]
#[ignore = "needs a CUDA GPU"]
fn few_shapes_for_sanitizers() {
    run_cases("gemm_sanitizers", [(1, 576, 576), (65, 192, 200), (255, 1536, 576)]);
    run_silu_cases("gemm_silu_and_mul_sanitizers", &[(7, 48, 64), (65, 208, 200)], 1);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_llama_projection_matches_reference() {
    run_cases("gemm_llama", LARGE_MS.iter().map(|&m| (m, LARGE_NK.0, LARGE_NK.1)));
}

/// Split-K: every wgmma kernel small enough to split, with K in 2 to 4 ranges (uneven ones
/// included: K of 1000 is 16 blocks of 64 in 3 ranges), twice in a row on the same workspaces
/// (each tile's last unit must reset its arrival count); the planned launch of the shapes the
/// planner splits.
#[test]
#[ignore = "needs a CUDA GPU"]
fn split_k_matches_reference() {
    let mut rng = rng("gemm split-k");
    let mut ctxs = contexts();
    if ctxs[0].0.gpu().target() != PtxTarget::Sm90a {
        return;
    }
    let sms = ctxs[0].0.gpu().sm_count() as usize;
    let splittable = GemmKernel::HOPPER.iter().copied().filter(|k| k.splits_k());
    for (m, n, k) in [(1, 576, 576), (7, 192, 1000), (64, 576, 576), (65, 256, 1000), (16, 4096, 1024)] {
        let case = Case::new(&mut rng, m, n, k);
        let ctx = &ctxs[0].0;
        let buffers = Buffers { a: upload(ctx, &case.a), b: upload(ctx, &case.b), bias: upload(ctx, &case.bias) };
        ctx.stream().synchronize().expect("upload");
        for kernel in splittable.clone() {
            for splits in 2..=MAX_SPLITS.min(k.div_ceil(64)) {
                if kernel.tiles(case.shape) * splits > MAX_UNITS_PER_SM * sms {
                    continue;
                }
                for _ in 0..2 {
                    case.check(Some(GemmConfig { kernel, splits }), &buffers, &mut ctxs);
                }
            }
        }
        case.check(None, &buffers, &mut ctxs);
    }
}

/// Splits a launch cannot take are refused before anything runs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn split_k_refuses_what_it_cannot_run() {
    let mut ctxs = contexts();
    let (ctx, workspace) = &mut ctxs[2];
    let (m, n, k) = (16, 4096, 256);
    let a = poisoned(ctx, m * k);
    let b = poisoned(ctx, n * k);
    let mut c = poisoned(ctx, m * n);
    let shape = GemmShape { m, n, k };
    let mut run = |kernel: GemmKernel, splits: usize| {
        let config = GemmConfig { kernel, splits };
        gemm::gemm_with(
            ctx,
            config,
            GemmFusion::None,
            &a.as_view(),
            &b.as_view(),
            None,
            &mut c.as_view_mut(),
            shape,
            workspace,
        )
        .map_err(|e| e.kind())
    };
    let unsupported = Err(nexus::kernels::ErrorKind::Unsupported);
    // An mma kernel; zero or too many splits; more splits than K has blocks (4 of 64).
    assert_eq!(run(GemmKernel::Mma64x64, 2), unsupported);
    if ctx.gpu().target() == PtxTarget::Sm90a {
        assert_eq!(run(GemmKernel::WgmmaSwap16x64, 0), unsupported);
        assert_eq!(run(GemmKernel::WgmmaSwap16x64, MAX_SPLITS + 1), unsupported);
        let room = MAX_UNITS_PER_SM * ctx.gpu().sm_count() as usize;
        assert_eq!(run(GemmKernel::Wgmma64x128, 4).is_ok(), GemmKernel::Wgmma64x128.tiles(shape) * 4 <= room);
        // A tile too large to split.
        assert_eq!(run(GemmKernel::Wgmma128x256, 2), unsupported);
        // More work units than the workspace holds: one tile of 64 rows more than a quarter of its
        // room, split 4 ways.
        let wide = GemmShape { n: 64 * (room / 4 + 1), ..shape };
        let b_wide = poisoned(ctx, wide.n * k);
        let config = GemmConfig { kernel: GemmKernel::WgmmaSwap16x64, splits: 4 };
        let mut c_wide = poisoned(ctx, m * wide.n);
        let result = gemm::gemm_with(
            ctx,
            config,
            GemmFusion::None,
            &a.as_view(),
            &b_wide.as_view(),
            None,
            &mut c_wide.as_view_mut(),
            wide,
            workspace,
        );
        assert_eq!(result.map_err(|e| e.kind()), unsupported);
    }
    let k_small = GemmShape { k: 64, ..shape };
    let config = GemmConfig { kernel: GemmKernel::WgmmaSwap16x64, splits: 2 };
    let (av, bv) = (a.slice(..m * 64), b.slice(..n * 64));
    let result =
        gemm::gemm_with(ctx, config, GemmFusion::None, &av, &bv, None, &mut c.as_view_mut(), k_small, workspace);
    assert_eq!(result.map_err(|e| e.kind()), unsupported);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_handles_empty_outputs() {
    let mut ctxs = contexts();
    let (ctx, workspace) = &mut ctxs[2];
    // Empty views of non-empty buffers (a zero-byte allocation is itself an error).
    let a = poisoned(ctx, 8);
    let b = poisoned(ctx, 8 * 16);
    let mut c = poisoned(ctx, 8);
    let shape = GemmShape { m: 0, n: 8, k: 16 };
    let (av, mut cv) = (a.slice(0..0), c.slice_mut(0..0));
    gemm::gemm(ctx, &av, &b.as_view(), None, &mut cv, shape, workspace).expect("m = 0 is fine");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_rejects_bad_shapes() {
    let mut ctxs = contexts();
    let (ctx, workspace) = &mut ctxs[2];
    let (m, n, k) = (4, 16, 32);
    let a = poisoned(ctx, m * k + 8);
    let b = poisoned(ctx, n * k);
    let bias = poisoned(ctx, n + 1);
    let mut c = poisoned(ctx, m * n);
    let mut short_c = poisoned(ctx, m * n - 1);
    let av = a.slice(..m * k);
    let bv = b.as_view();
    let mut run =
        |a: &cudarc::driver::CudaView<'_, bf16>,
         bias: Option<&cudarc::driver::CudaView<'_, bf16>>,
         c: &mut CudaSlice<bf16>,
         shape: GemmShape| { gemm::gemm(ctx, a, &bv, bias, &mut c.as_view_mut(), shape, workspace) };
    let ok = GemmShape { m, n, k };
    assert!(run(&av, None, &mut c, ok).is_ok());
    // K or N not a multiple of 8, K of 0.
    assert!(run(&av, None, &mut c, GemmShape { k: 30, ..ok }).is_err());
    assert!(run(&av, None, &mut c, GemmShape { n: 12, ..ok }).is_err());
    assert!(run(&av, None, &mut c, GemmShape { k: 0, ..ok }).is_err());
    // Lengths that do not match the shape.
    assert!(run(&a.slice(..m * k + 8), None, &mut c, ok).is_err());
    assert!(run(&av, None, &mut c, GemmShape { m: m + 1, ..ok }).is_err());
    assert!(run(&av, None, &mut short_c, ok).is_err());
    assert!(run(&av, Some(&bias.as_view()), &mut c, ok).is_err());
    assert!(run(&av, Some(&bias.slice(..n)), &mut c, ok).is_ok());
    // A view that does not start on a 16-byte boundary.
    assert!(run(&a.slice(1..m * k + 1), None, &mut c, ok).is_err());
}

/// The batch-invariant family: every row of C is the same bit for bit whatever M (the other rows
/// of A differ) and whichever kernel of the family computes it, with and without bias; and
/// `plan_batch_invariant` only picks from the family.
#[test]
#[ignore = "needs a CUDA GPU"]
fn batch_invariant_kernels_give_each_row_the_same_bits() {
    let mut rng = rng("gemm batch invariance");
    let ctx = phase(None);
    let family: Vec<GemmKernel> = match ctx.gpu().target() {
        PtxTarget::Sm90a => GemmKernel::BATCH_INVARIANT_HOPPER.to_vec(),
        PtxTarget::Sm80 => GemmKernel::BATCH_INVARIANT_PORTABLE.to_vec(),
    };
    let mut workspace = GemmWorkspace::new(&ctx).expect("workspace");
    for (n, k) in [(576, 576), (6144, 4096), (72, 200)] {
        // The largest M's A; smaller Ms take its first rows.
        let big_m = 300;
        let a = random_bf16(&mut rng, big_m * k, 1.0);
        let b = upload(&ctx, &random_bf16(&mut rng, n * k, 1.0));
        let bias = upload(&ctx, &random_bf16(&mut rng, n, 1.0));
        for with_bias in [false, true] {
            // The first kernel's result at the largest M is what every other run must repeat.
            let mut first: Option<Vec<u16>> = None;
            for &kernel in &family {
                for m in [300, 65, 64, 16, 5, 1] {
                    let a_dev = upload(&ctx, &a[..m * k]);
                    let mut c = poisoned(&ctx, m * n);
                    let shape = GemmShape { m, n, k };
                    let bias = with_bias.then(|| bias.as_view());
                    gemm::gemm_with(
                        &ctx,
                        kernel,
                        GemmFusion::None,
                        &a_dev.as_view(),
                        &b.as_view(),
                        bias.as_ref(),
                        &mut c.as_view_mut(),
                        shape,
                        &mut workspace,
                    )
                    .expect("gemm");
                    let bits: Vec<u16> =
                        ctx.stream().clone_dtoh(&c).expect("download").iter().map(|v| v.to_bits()).collect();
                    assert!(bits.iter().all(|&v| !bf16::from_bits(v).is_nan()), "{kernel:?} m={m}: unwritten output");
                    match &first {
                        None => first = Some(bits),
                        Some(want) => {
                            let differ = bits.iter().zip(want).filter(|(x, y)| x != y).count();
                            assert_eq!(
                                differ, 0,
                                "{kernel:?} m={m} n={n} k={k} bias={with_bias}: {differ} values differ"
                            );
                        }
                    }
                }
            }
        }
        for m in [1, 16, 300, 8192] {
            let plan = gemm::plan_batch_invariant(GemmShape { m, n, k }, ctx.budget(), ctx.gpu().model());
            assert!(family.contains(&plan.kernel), "{plan:?}");
        }
    }
}

/// Square sums (f32) on the device, and a buffer of NaNs for them.
fn upload_f32(ctx: &PhaseContext, values: &[f32]) -> CudaSlice<f32> {
    ctx.stream().clone_htod(values).expect("upload")
}

/// The fused residual add and row norm (`GemmFusion`) of every kernel that has them (the Hopper
/// ones with and without a split of K, and the register-streamed ones on any GPU), at budgets 1,
/// 7 and all, against the reference: `AddToC` adds the product,
/// rounded to bf16, to C (each value rounded again) and writes the square sums of C's new rows,
/// which must be those of the values it stored (compared with the downloaded C, only the order
/// of the sums differs: `rtol` 1e-5); its A is scaled by 3/√k so that the product is of order 1
/// beside a residual of order 4 (`atol` 2e-2: a bf16 step of either after the add; a lost K block
/// moves the product by ~0.1). `RowNorm` scales each row of the product (and of the
/// SwiGLU's gate and up sums) by `1 / sqrt(mean of squares + eps)` from given square sums. Outputs
/// and sums start as NaN. A's rows are scaled from 0.05 to 5 so that a wrong row's factor shows.
fn run_fusion_cases(test: &str, cases: &[(usize, usize, usize)]) {
    let mut rng = rng(test);
    let mut ctxs = contexts();
    let hopper = ctxs[0].0.gpu().target() == PtxTarget::Sm90a;
    let eps = 1e-5;
    for &(m, n, k) in cases {
        let shape = GemmShape { m, n, k };
        let sq_n = n.div_ceil(gemm::SQUARE_SUM_COLS);
        let row_scale: Vec<f32> = (0..m).map(|i| 0.05 * 100f32.powf(i as f32 / m.max(2) as f32)).collect();
        let a: Vec<f32> = random_bf16(&mut rng, m * k, 1.0)
            .iter()
            .enumerate()
            .map(|(i, v)| bf16::from_f32(v * row_scale[i / k]).to_f32())
            .collect();
        let gain = random_bf16(&mut rng, k, 1.0).iter().map(|g| 1.0 + 0.5 * g).collect::<Vec<_>>();
        let mut b = random_bf16(&mut rng, n * k, 1.0);
        reference::fold_norm_gain(&mut b, &gain).expect("fold");
        let b: Vec<f32> = b.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
        let bias = random_bf16(&mut rng, n, 1.0);
        let residual = random_bf16(&mut rng, m * n, 4.0);
        let a_sums = reference::square_sums(&a, k).expect("sums");
        let scales = reference::rms_scales_from_square_sums(&a_sums, k, eps).expect("scales");
        let a_normalized: Vec<f32> = a.iter().enumerate().map(|(i, v)| v * scales[i / k]).collect();
        let a_add = random_bf16(&mut rng, m * k, 3.0 / (k as f32).sqrt());
        let mut product = vec![0.0; m * n];
        reference::gemm(&a_add, &b, None, &mut product, shape).expect("reference");
        let want_add: Vec<f32> = residual
            .iter()
            .zip(&product)
            .map(|(r, p)| bf16::from_f32(r + bf16::from_f32(*p).to_f32()).to_f32())
            .collect();
        let mut want_norm = vec![0.0; m * n];
        reference::gemm(&a_normalized, &b, Some(&bias), &mut want_norm, shape).expect("reference");
        let mut want_silu = vec![0.0; m * n / 2];
        reference::gemm_silu_and_mul(&a_normalized, &b, &mut want_silu, shape).expect("reference");

        let ctx0 = &ctxs[0].0;
        let (da, db, dbias, dsums) =
            (upload(ctx0, &a), upload(ctx0, &b), upload(ctx0, &bias), upload_f32(ctx0, &a_sums));
        let da_add = upload(ctx0, &a_add);
        ctx0.stream().synchronize().expect("upload");
        let sms = ctx0.gpu().sm_count() as usize;
        let mut configs: Vec<GemmConfig> =
            GemmKernel::STREAMS.into_iter().filter(|&kernel| runs_on(kernel, shape)).map(GemmConfig::from).collect();
        for kernel in GemmKernel::HOPPER.into_iter().chain(GemmKernel::PAIRS).filter(|_| hopper) {
            configs.push(GemmConfig::from(kernel));
            let most = MAX_SPLITS.min(k.div_ceil(64)).min(MAX_UNITS_PER_SM * sms / kernel.tiles(shape).max(1));
            if kernel.splits_k() && most >= 2 {
                configs.push(GemmConfig { kernel, splits: 2 });
            }
        }
        for config in configs {
            for (ctx, workspace) in ctxs.iter_mut() {
                let what = |op: &str| format!("{op} {config:?} m={m} n={n} k={k} budget {}", ctx.budget().get());
                let (av, bv) = (da.as_view(), db.as_view());

                let mut c = upload(ctx, &residual);
                let mut sums = upload_f32(ctx, &vec![f32::NAN; m * sq_n]);
                let fusion = GemmFusion::AddToC { square_sums: &mut sums.as_view_mut() };
                let result = gemm::gemm_with(
                    ctx,
                    config,
                    fusion,
                    &da_add.as_view(),
                    &bv,
                    None,
                    &mut c.as_view_mut(),
                    shape,
                    workspace,
                );
                if refused_pair(Some(config), ctx, &result) {
                    continue;
                }
                result.unwrap_or_else(|e| panic!("{}: {e}", what("add")));
                let got = download(ctx, &c);
                assert_close(&what("add"), &got, &want_add, BF16_RTOL, 2e-2);
                let got_sums = ctx.stream().clone_dtoh(&sums).expect("download");
                let want_sums = reference::square_sums(&got, n).expect("sums");
                assert_close(&what("add's square sums"), &got_sums, &want_sums, 1e-5, 1e-6);

                let mut out = poisoned(ctx, m * n);
                let (bias_view, sums_view) = (dbias.as_view(), dsums.as_view());
                let fusion = GemmFusion::RowNorm { square_sums: &sums_view, eps };
                gemm::gemm_with(
                    ctx,
                    config,
                    fusion,
                    &av,
                    &bv,
                    Some(&bias_view),
                    &mut out.as_view_mut(),
                    shape,
                    workspace,
                )
                .unwrap_or_else(|e| panic!("{}: {e}", what("norm")));
                assert_close(&what("norm"), &download(ctx, &out), &want_norm, BF16_RTOL, tolerance(k));

                if n % 16 == 0 {
                    let mut out = poisoned(ctx, m * n / 2);
                    let fusion = GemmFusion::RowNorm { square_sums: &sums_view, eps };
                    gemm::gemm_silu_and_mul_with(
                        ctx,
                        config,
                        fusion,
                        &av,
                        &bv,
                        &mut out.as_view_mut(),
                        shape,
                        workspace,
                    )
                    .unwrap_or_else(|e| panic!("{}: {e}", what("norm + silu")));
                    assert_close(
                        &what("norm + silu"),
                        &download(ctx, &out),
                        &want_silu,
                        BF16_RTOL,
                        2e-2 * (k as f32).sqrt(),
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_fusions_match_reference() {
    // SmolLM2's hidden size (9 square sums a row), tiles cut short in N (200 = 3 sums and 8 left),
    // M beyond one swapped tile, and Llama-3.1-8B's QKV at decode batches.
    let cases = [(1, 576, 576), (5, 200, 576), (16, 1536, 576), (33, 576, 200), (65, 192, 576), (300, 576, 576)];
    run_fusion_cases("gemm_fusions", &cases);
    run_fusion_cases("gemm_fusions_llama", &[(1, 6144, 4096), (64, 4096, 4096)]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_fusions_for_sanitizers() {
    run_fusion_cases("gemm_fusions_for_sanitizers", &[(5, 200, 576)]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gemm_fusions_refuse_what_they_cannot_run() {
    let ctx = phase(None);
    let mut workspace = GemmWorkspace::new(&ctx).expect("workspace");
    let (m, n, k) = (4, 128, 128);
    let shape = GemmShape { m, n, k };
    let (a, b) = (poisoned(&ctx, m * k), poisoned(&ctx, n * k));
    let mut c = poisoned(&ctx, m * n);
    let sums = upload_f32(&ctx, &vec![1.0; m * 2]);
    let mut wrong = upload_f32(&ctx, &vec![1.0; m * 2 + 1]);
    let kernel = if ctx.gpu().target() == PtxTarget::Sm90a { GemmKernel::Wgmma64x64 } else { GemmKernel::Mma64x64 };
    let run = |fusion: GemmFusion<'_, '_>,
               kernel: GemmKernel,
               c: &mut CudaSlice<bf16>,
               workspace: &mut GemmWorkspace| {
        gemm::gemm_with(&ctx, kernel, fusion, &a.as_view(), &b.as_view(), None, &mut c.as_view_mut(), shape, workspace)
    };
    let err = run(
        GemmFusion::RowNorm { square_sums: &sums.as_view(), eps: 1e-5 },
        GemmKernel::Mma64x64,
        &mut c,
        &mut workspace,
    )
    .expect_err("an mma kernel has no fusion");
    assert!(matches!(err, nexus::kernels::Error::Unsupported(_)), "{err}");
    let err = run(GemmFusion::AddToC { square_sums: &mut wrong.as_view_mut() }, kernel, &mut c, &mut workspace)
        .expect_err("square sums of the wrong length");
    assert!(err.to_string().contains("square sums"), "{err}");
    let err = run(GemmFusion::RowNorm { square_sums: &sums.as_view(), eps: 0.0 }, kernel, &mut c, &mut workspace)
        .expect_err("a zero epsilon");
    assert!(err.to_string().contains("epsilon"), "{err}");
    let mut out = poisoned(&ctx, m * n / 2);
    let err = gemm::gemm_silu_and_mul_with(
        &ctx,
        kernel,
        GemmFusion::AddToC { square_sums: &mut wrong.as_view_mut() },
        &a.as_view(),
        &b.as_view(),
        &mut out.as_view_mut(),
        shape,
        &mut workspace,
    )
    .expect_err("the SwiGLU cannot be added to C");
    assert!(err.to_string().contains("SwiGLU"), "{err}");
}
