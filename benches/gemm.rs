//! GEMM (`C[M, N] = A[M, K] · B[N, K]ᵀ`, bf16, f32 accumulation) across CTA budgets, side by side
//! with cuBLAS (`cublasGemmEx`, bf16 in and out, 32-bit compute) at all SMs and with
//! `cublasSetSmCountTarget` set to the same budget. Shapes: the K × N of Llama-3-8B's projections
//! (4096 × 6144 fused QKV, 4096 × 28672 fused gate/up, 14336 × 4096 down) for M in 1, 16, 64,
//! 256, 1024, 4096, 8192. Inputs are random bf16 in [-1, 1), carved from one pool; when one set
//! of A and B fits in L2 the launches rotate over copies adding up to at least 256 MB.
//!
//! TFLOP/s = 2·M·N·K / time; TB/s = (M·K + N·K + M·N) · 2 bytes / time (for small M, almost all
//! of it is the weight B), next to the streaming read at the same budget measured in the same run
//! (`StreamRead::curve`, reads of 256 MB) and its share of it; for M <= 64 also next to a streaming
//! read of the GEMM's own bytes at that budget (one launch of that size, whose fixed costs a read of
//! 256 MB spreads thinner). The summary table is timed outside criterion (median of CUDA-event
//! samples); criterion itself times a subset (M = 1, 64, 4096 at budget 64 and all SMs), so the
//! whole run fits in a few minutes.
//!
//! A second table times every kernel on the decode-sized GEMMs (M = 1, 16, 32, 64) of Llama-3.1-8B,
//! Qwen2.5-3B and Qwen2.5-14B at every budget, next to the planner's pick (with its split of K)
//! and what it measured, and cuBLAS; the register-streamed kernels ([`GemmKernel::STREAMS`]),
//! which the planner does not pick yet, among them. A third times one 128 MB weight at M = 1 with
//! rows (K) of 256 bytes to 32 KB: what the weight's layout in memory costs the streaming.
//!
//! A fourth times the SwiGLU epilogue ([`gemm::gemm_silu_and_mul`]) against the plain GEMM of the
//! same gate/up shapes, kernel by kernel: what reading the weight's gate and up rows interleaved
//! and the epilogue's math cost the GEMM (the plain launch stores twice the output, and a separate
//! SiLU-and-mul launch would then read it back).
//!
//! A fifth times the planned decode GEMMs with a decode step's norm fusions inside
//! ([`gemm::GemmFusion`]: the residual add, or the row norm) against the same launches plain.
//!
//! A sixth times Llama-3.1-8B's projections at a prefill-lane iteration's M (2048, 8192) on the
//! budgets a prefill lane gets beside decode (88-116 SMs), every wide tile with its waves: what
//! wave quantization costs the prefill lane.
//!
//! A seventh times a prefill-lane GEMM (the gate/up projection at M = 2048 and 8192) on 36, 68
//! and 100 SMs while a second stream keeps the other SMs busy with decode GEMMs (M = 16, streaming
//! their weight), a streaming read or another prefill GEMM (compute-bound), and a decode GEMM of
//! the same weight on 16 and 32 SMs beside a prefill GEMM or a streaming read: what each lane does
//! to the other's GEMMs, and whether it is memory traffic or the mere work (power, shared L2).
//!
//! `cargo bench --bench gemm`; `NEXUS_BENCH_QUICK=1` measures only budget 64 and all SMs;
//! `NEXUS_BENCH_ONLY=text` only the cases whose name (as criterion prints it) contains `text`; with
//! `NEXUS_BENCH_OUT=dir` the summary table is also written to `dir/gemm.md`.

mod common;

use std::ffi::c_void;
use std::sync::Arc;

use common::*;
use cudarc::cublas::{CudaBlas, sys};
use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr};
use half::bf16;
use nexus::kernels::gemm::{self, GemmConfig, GemmFusion, GemmKernel, GemmShape, GemmWorkspace};
use nexus::kernels::gpu::PtxTarget;
use nexus::kernels::stream_read::{ReadDepth, stream_read};
use nexus::kernels::{BandwidthCurve, CtaBudget, Gpu, PhaseContext};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// (K, N) of Llama-3-8B's linear layers.
const KN: [(usize, usize); 3] = [(4096, 6144), (4096, 28672), (14336, 4096)];
const MS: [usize; 7] = [1, 16, 64, 256, 1024, 4096, 8192];
/// The M values criterion times, at budget 64 and all SMs.
const CRITERION_MS: [usize; 3] = [1, 64, 4096];
const CRITERION_BUDGET: u32 = 64;

/// Elements of the random pool every operand is carved from: enough for the largest set
/// (A of 8192 × 14336 plus B of 4096 × 14336, 352 MB) or for 256 MB of rotated copies of a
/// smaller one.
const POOL_ELEMS: usize = 320 << 20;

/// cuBLAS on `stream`: `c = a · bᵀ` in row-major terms, which in cuBLAS's column-major terms is
/// `cᵀ [N×M] = bᵀᵀ · aᵀ`: op(A) = T on b (K × N, ld K), op(B) = N on a (K × M, ld K), ldc = N.
fn cublas_gemm(
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    a: &CudaView<'_, bf16>,
    b: &CudaView<'_, bf16>,
    c: &mut CudaViewMut<'_, bf16>,
    shape: GemmShape,
) {
    let GemmShape { m, n, k } = shape;
    let (alpha, beta) = (1.0f32, 0.0f32);
    let (a_ptr, _a) = a.device_ptr(stream);
    let (b_ptr, _b) = b.device_ptr(stream);
    let (c_ptr, _c) = c.device_ptr(stream);
    // SAFETY: the handle is bound to `stream`; the pointers cover [m, k], [n, k] and [m, n]
    // bf16 matrices (the views were carved with those lengths), and alpha/beta are host f32
    // as the 32-bit compute type expects.
    unsafe {
        sys::cublasGemmEx(
            *blas.handle(),
            sys::cublasOperation_t::CUBLAS_OP_T,
            sys::cublasOperation_t::CUBLAS_OP_N,
            n as i32,
            m as i32,
            k as i32,
            &alpha as *const f32 as *const c_void,
            b_ptr as *const c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            k as i32,
            a_ptr as *const c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            k as i32,
            &beta as *const f32 as *const c_void,
            c_ptr as *mut c_void,
            sys::cudaDataType_t::CUDA_R_16BF,
            n as i32,
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .result()
    .expect("cublasGemmEx");
}

fn set_sm_target(blas: &CudaBlas, sms: u32) {
    // SAFETY: a plain setter on a live handle; 0 restores the default (all SMs).
    unsafe { sys::cublasSetSmCountTarget(*blas.handle(), sms as i32) }.result().expect("cublasSetSmCountTarget");
}

/// Median time of cuBLAS on `shape` with its SM count target set to `sms` (0: all), rotating
/// over `views`.
fn cublas_time(
    blas: &CudaBlas,
    stream: &Arc<CudaStream>,
    views: &[(CudaView<'_, bf16>, CudaView<'_, bf16>)],
    out: &mut CudaSlice<bf16>,
    shape: GemmShape,
    sms: u32,
) -> f64 {
    set_sm_target(blas, sms);
    let mut launch = |i: u64| {
        let (a, b) = &views[i as usize % views.len()];
        cublas_gemm(blas, stream, a, b, &mut out.slice_mut(..shape.m * shape.n), shape);
    };
    let t = median_gpu_time(stream, &mut launch).as_secs_f64();
    set_sm_target(blas, 0);
    t
}

/// Median time of our plain GEMM on `shape` under `ctx`'s budget, rotating over `views`: with
/// `config`, or as [`gemm::gemm`] plans it at every launch (`None`).
fn gemm_time(
    ctx: &PhaseContext,
    config: Option<GemmConfig>,
    views: &[(CudaView<'_, bf16>, CudaView<'_, bf16>)],
    out: &mut CudaSlice<bf16>,
    shape: GemmShape,
    workspace: &mut GemmWorkspace,
) -> f64 {
    median_gpu_time(ctx.stream(), |i| {
        let (a, b) = &views[i as usize % views.len()];
        let c = &mut out.slice_mut(..shape.m * shape.n);
        match config {
            Some(config) => gemm::gemm_with(ctx, config, GemmFusion::None, a, b, None, c, shape, workspace),
            None => gemm::gemm(ctx, a, b, None, c, shape, workspace),
        }
        .expect("gemm");
    })
    .as_secs_f64()
}

/// The budgets, in order, whose case (named by `case`) [`selected`] lets run.
fn selected_budgets(budgets: &[CtaBudget], case: impl Fn(CtaBudget) -> String) -> Vec<CtaBudget> {
    budgets.iter().copied().filter(|&b| selected(&case(b))).collect()
}

/// The cases of a section over named layers: each `(layer, K, N)` of `layers` at each M of `ms`,
/// with the budgets whose case `<section>/<layer>/m <M>/budget <SMs>` [`selected`] lets run (a
/// layer and M with none are left out).
fn layer_cases<'a>(
    section: &'a str,
    layers: impl IntoIterator<Item = (&'static str, usize, usize)> + 'a,
    ms: &'a [usize],
    budgets: &'a [CtaBudget],
) -> impl Iterator<Item = (&'static str, GemmShape, Vec<CtaBudget>)> + 'a {
    layers.into_iter().flat_map(move |(layer, k, n)| {
        ms.iter().filter_map(move |&m| {
            let chosen = selected_budgets(budgets, |budget| format!("{section}/{layer}/m {m}/budget {}", budget.get()));
            (!chosen.is_empty()).then_some((layer, GemmShape { m, n, k }, chosen))
        })
    })
}

/// Seconds of cuBLAS at `budget`, of the planned launch, and of each of `kernels` unsplit, on
/// `shape` (in that order, each rotating over `views`).
struct BudgetTimes {
    cublas: f64,
    planned: f64,
    kernels: Vec<f64>,
}

#[allow(clippy::too_many_arguments)] // the bench's shared buffers, then what is timed
fn time_at_budget(
    gpu: &Arc<Gpu>,
    blas: &CudaBlas,
    views: &[(CudaView<'_, bf16>, CudaView<'_, bf16>)],
    out: &mut CudaSlice<bf16>,
    stream: &Arc<CudaStream>,
    shape: GemmShape,
    budget: CtaBudget,
    kernels: &[GemmKernel],
) -> BudgetTimes {
    let ctx = phase(gpu, stream, budget);
    let mut workspace = GemmWorkspace::new(&ctx).expect("workspace");
    let cublas = cublas_time(blas, stream, views, out, shape, budget.get());
    let planned = gemm_time(&ctx, None, views, out, shape, &mut workspace);
    let kernels =
        kernels.iter().map(|&kernel| gemm_time(&ctx, Some(kernel.into()), views, out, shape, &mut workspace)).collect();
    BudgetTimes { cublas, planned, kernels }
}

fn main() {
    let (gpu, stream) = open();
    let mut c = criterion();
    let quick = std::env::var("NEXUS_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
    let budgets: Vec<CtaBudget> = if quick {
        budgets(&gpu).into_iter().filter(|b| b.get() == CRITERION_BUDGET || b.get() == gpu.sm_count()).collect()
    } else {
        budgets(&gpu)
    };
    let blas = CudaBlas::new(stream.clone()).expect("cuBLAS");
    // The decode-sized GEMMs' bytes (M <= 64), which a streaming read of the same size is put beside.
    let max_m = DECODE_MS.iter().copied().max().unwrap_or(1);
    let max_bytes = DECODE_SHAPES.iter().map(|&(_, k, n)| GemmShape { m: max_m, n, k }.bf16_bytes()).max().unwrap_or(0);
    let reads = StreamRead::new(&gpu, &stream, max_bytes, &budgets);
    let stream_read = reads.curve();
    let report = Report::new(
        "GEMM bf16 (C = A·Bᵀ), ours vs cuBLAS (TFLOP/s = 2MNK / t; TB/s = 2(MK + NK + MN) / t)",
        &[
            "K x N",
            "M",
            "budget",
            "kernel",
            "CTAs",
            "us",
            "TFLOP/s",
            "TB/s",
            "stream read at this budget",
            "% of stream",
            "stream read of the same bytes (M <= 64)",
            "% of it",
            "cuBLAS@budget TFLOP/s",
            "cuBLAS@budget TB/s",
            "cuBLAS@all TFLOP/s",
            "ours / cuBLAS@budget",
            "ours / cuBLAS@all",
        ],
    );

    let mut rng = StdRng::seed_from_u64(0x6e6d);
    let pattern: Vec<bf16> = (0..32 << 20).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect();
    let mut pool: CudaSlice<bf16> = stream.alloc_zeros(POOL_ELEMS).expect("alloc");
    let mut at = 0;
    while at < POOL_ELEMS {
        let len = pattern.len().min(POOL_ELEMS - at);
        stream.memcpy_htod(&pattern[..len], &mut pool.slice_mut(at..at + len)).expect("upload");
        at += len;
    }
    let max_c = MS.iter().max().unwrap_or(&1) * KN.iter().map(|&(_, n)| n).max().unwrap_or(1);
    let mut out: CudaSlice<bf16> = stream.alloc_zeros(max_c).expect("alloc");

    for (k, n) in KN {
        for m in MS {
            let shape = GemmShape { m, n, k };
            let views = rotated_operands(&pool, m * k, n * k);
            let copies = views.len();
            let flops = 2.0 * (m * n * k) as f64;
            let bytes = shape.bf16_bytes() as f64;
            let shape_name = format!("{k} x {n}");

            let case = |budget: CtaBudget| format!("gemm/{k}x{n}/m {m}/budget {}", budget.get());
            let chosen = selected_budgets(&budgets, case);
            if chosen.is_empty() {
                continue;
            }
            let cublas_all = cublas_time(&blas, &stream, &views, &mut out, shape, 0);

            for budget in chosen {
                let case = case(budget);
                let ctx = phase(&gpu, &stream, budget);
                let mut workspace = GemmWorkspace::new(&ctx).expect("workspace");
                let plan = gemm::plan(shape, budget, gpu.model());
                let mut launch = |i: u64| {
                    let (a, b) = &views[i as usize % copies];
                    gemm::gemm(&ctx, a, b, None, &mut out.slice_mut(..m * n), shape, &mut workspace).expect("gemm");
                };
                if CRITERION_MS.contains(&m) && (budget.get() == CRITERION_BUDGET || budget.get() == gpu.sm_count()) {
                    c.bench_function(&case, |bch| bch.iter_custom(|iters| time_gpu(&stream, iters, &mut launch)));
                }
                let t = median_gpu_time(&stream, &mut launch).as_secs_f64();
                let cublas_budget = if budget.get() == gpu.sm_count() {
                    cublas_all
                } else {
                    cublas_time(&blas, &stream, &views, &mut out, shape, budget.get())
                };
                let same_bytes = (m <= max_m).then(|| reads.bytes_per_second(budget, bytes as usize));
                report.add(vec![
                    shape_name.clone(),
                    m.to_string(),
                    budget.get().to_string(),
                    plan_label(&plan),
                    plan.ctas.to_string(),
                    format!("{:.1}", t * 1e6),
                    format!("{:.1}", flops / t / 1e12),
                    format!("{:.2}", bytes / t / 1e12),
                    format!("{:.2}", stream_read.at(budget.get()) / 1e12),
                    format!("{:.0}%", 100.0 * bytes / t / stream_read.at(budget.get())),
                    same_bytes.map_or("-".into(), |r| format!("{:.2}", r / 1e12)),
                    same_bytes.map_or("-".into(), |r| format!("{:.0}%", 100.0 * bytes / t / r)),
                    format!("{:.1}", flops / cublas_budget / 1e12),
                    format!("{:.2}", bytes / cublas_budget / 1e12),
                    format!("{:.1}", flops / cublas_all / 1e12),
                    format!("{:.2}", cublas_budget / t),
                    format!("{:.2}", cublas_all / t),
                ]);
            }
        }
    }
    report.finish(&gpu, "gemm");
    decode_sizes(&gpu, &stream, &blas, &pool, &mut out, &budgets, &reads);
    weight_row_length(&gpu, &stream, &pool, &mut out, &budgets, stream_read);
    silu_and_mul_epilogue(&gpu, &stream, &pool, &mut out, &budgets, stream_read);
    norm_fusion(&gpu, &stream, &pool, &mut out, &budgets, stream_read);
    prefill_lane(&gpu, &stream, &blas, &pool, &mut out);
    beside_other_lane(&gpu, &stream, &pool, &mut out, &reads);
    c.final_summary();
}

/// Whether a table times `kernel` at `m` rows of A: the register-streamed kernels only where one M
/// tile holds them (more would re-read the weight per tile, for nothing the tables need).
fn timed_at(kernel: GemmKernel, m: usize) -> bool {
    !GemmKernel::STREAMS.contains(&kernel) || m <= kernel.tile().0
}

/// Rows of A for [`silu_and_mul_epilogue`]: decode batches and a prefill chunk.
const SILU_MS: [usize; 4] = [1, 16, 64, 4096];

/// Every kernel on the gate/up GEMMs of [`DECODE_SHAPES`], as a plain GEMM and with the SwiGLU
/// epilogue, at every budget (`gemm-silu.md` with `NEXUS_BENCH_OUT`; cases
/// `gemm-silu/<shape>/m <M>/budget <SMs>`). TB/s counts what each launch must move: A, B and its
/// own output (`[m, n]` plain, `[m, n / 2]` fused).
fn silu_and_mul_epilogue(
    gpu: &Arc<Gpu>,
    stream: &Arc<CudaStream>,
    pool: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    budgets: &[CtaBudget],
    stream_read: &BandwidthCurve,
) {
    let mut kernels: Vec<Option<GemmKernel>> = vec![None];
    if gpu.target() == PtxTarget::Sm90a {
        kernels.extend(GemmKernel::HOPPER.map(Some));
    }
    kernels.extend(GemmKernel::PORTABLE.into_iter().chain(GemmKernel::STREAMS).map(Some));
    let report = Report::new(
        "GEMM with the SwiGLU epilogue against the plain GEMM (TB/s = 2(MK + NK + M·out) / t)",
        &[
            "layer (K x N)",
            "M",
            "budget",
            "stream read",
            "kernel",
            "plain us",
            "SwiGLU us",
            "plain TB/s",
            "SwiGLU TB/s",
            "SwiGLU / plain time",
        ],
    );
    let gate_up = DECODE_SHAPES.into_iter().filter(|(layer, ..)| layer.ends_with("gate/up"));
    for (layer, shape, chosen) in layer_cases("gemm-silu", gate_up, &SILU_MS, budgets) {
        let GemmShape { m, n, k } = shape;
        let views = rotated_operands(pool, m * k, n * k);
        let copies = views.len();
        for budget in chosen {
            // A prefill chunk on 8-48 SMs takes tens of milliseconds a launch, and prefill
            // runs on the larger share of the split.
            if m >= 1024 && budget.get() < 64 {
                continue;
            }
            let ctx = phase(gpu, stream, budget);
            let mut workspace = GemmWorkspace::new(&ctx).expect("workspace");
            let planned = gemm::plan(shape, budget, gpu.model());
            for &kernel in &kernels {
                if kernel.is_some_and(|k| !timed_at(k, m)) {
                    continue;
                }
                let config = kernel.map_or_else(|| planned.config(), Into::into);
                let plain = gemm_time(&ctx, Some(config), &views, out, shape, &mut workspace);
                let fused = median_gpu_time(stream, |i| {
                    let (a, b) = &views[i as usize % copies];
                    let c = &mut out.slice_mut(..m * n / 2);
                    gemm::gemm_silu_and_mul_with(&ctx, config, GemmFusion::None, a, b, c, shape, &mut workspace)
                        .expect("gemm");
                })
                .as_secs_f64();
                let inputs = 2.0 * (m * k + n * k) as f64;
                let name = match kernel {
                    Some(kernel) => format!("{kernel:?}"),
                    None => format!("planned: {}", plan_label(&planned)),
                };
                report.add(vec![
                    format!("{layer} ({k} x {n})"),
                    m.to_string(),
                    budget.get().to_string(),
                    format!("{:.2}", stream_read.at(budget.get()) / 1e12),
                    name,
                    format!("{:.1}", plain * 1e6),
                    format!("{:.1}", fused * 1e6),
                    format!("{:.2}", (inputs + 2.0 * (m * n) as f64) / plain / 1e12),
                    format!("{:.2}", (inputs + (m * n) as f64) / fused / 1e12),
                    format!("{:.3}", fused / plain),
                ]);
            }
        }
    }
    report.finish(gpu, "gemm-silu");
}

/// The planned launch of every shape of [`DECODE_SHAPES`] at the decode Ms, plain and as a decode
/// step with its norms inside the GEMMs runs it ([`GemmFusion`]): the output and down projections
/// add to C and write its square sums ([`GemmFusion::AddToC`]), QKV and gate/up scale their rows by
/// A's norm ([`GemmFusion::RowNorm`]; gate/up with the SwiGLU epilogue, against the plain SwiGLU
/// launch), at every budget: what the fused epilogue and the row norm's factors cost a launch, which
/// decides the most rows a decode step fuses (`gemm-norm-fusion.md` with `NEXUS_BENCH_OUT`; cases
/// `gemm-norm-fusion/<shape>/m <M>/budget <SMs>`). Hopper only, where the fusions run.
fn norm_fusion(
    gpu: &Arc<Gpu>,
    stream: &Arc<CudaStream>,
    pool: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    budgets: &[CtaBudget],
    stream_read: &BandwidthCurve,
) {
    if gpu.target() != PtxTarget::Sm90a {
        return;
    }
    let report = Report::new(
        "Decode GEMMs with the residual add or the row norm inside, against the same launch plain",
        &[
            "layer (K x N)",
            "M",
            "budget",
            "stream read",
            "planned",
            "fusion",
            "plain us",
            "fused us",
            "fused - plain us",
        ],
    );
    for (layer, shape, chosen) in layer_cases("gemm-norm-fusion", DECODE_SHAPES, &DECODE_MS, budgets) {
        let GemmShape { m, n, k } = shape;
        let silu = layer.ends_with("gate/up");
        let adds = layer.ends_with("output") || layer.ends_with("down");
        let views = rotated_operands(pool, m * k, n * k);
        let copies = views.len();
        // Square sums of rows of 64 values in [-1, 1): about 64 / 3 each.
        let a_sums = stream.clone_htod(&vec![21.3f32; m * k.div_ceil(gemm::SQUARE_SUM_COLS)]).expect("upload");
        let mut c_sums = stream.alloc_zeros::<f32>(m * n.div_ceil(gemm::SQUARE_SUM_COLS)).expect("alloc");
        let c_len = if silu { m * n / 2 } else { m * n };
        for budget in chosen {
            let ctx = phase(gpu, stream, budget);
            let mut workspace = GemmWorkspace::new(&ctx).expect("workspace");
            let planned = gemm::plan(shape, budget, gpu.model());
            if !planned.kernel.fuses_norms() {
                continue;
            }
            let config = planned.config();
            let mut time = |fused: bool| {
                median_gpu_time(stream, |i| {
                    let (a, b) = &views[i as usize % copies];
                    let c = &mut out.slice_mut(..c_len);
                    let fusion = match (fused, adds) {
                        (false, _) => GemmFusion::None,
                        (true, true) => GemmFusion::AddToC { square_sums: &mut c_sums.as_view_mut() },
                        (true, false) => GemmFusion::RowNorm { square_sums: &a_sums.as_view(), eps: 1e-5 },
                    };
                    if silu {
                        gemm::gemm_silu_and_mul_with(&ctx, config, fusion, a, b, c, shape, &mut workspace)
                    } else {
                        gemm::gemm_with(&ctx, config, fusion, a, b, None, c, shape, &mut workspace)
                    }
                    .expect("gemm");
                })
                .as_secs_f64()
            };
            let (plain, fused) = (time(false), time(true));
            report.add(vec![
                format!("{layer} ({k} x {n})"),
                m.to_string(),
                budget.get().to_string(),
                format!("{:.2}", stream_read.at(budget.get()) / 1e12),
                plan_label(&planned),
                if adds { "add to C" } else { "row norm" }.to_string(),
                format!("{:.1}", plain * 1e6),
                format!("{:.1}", fused * 1e6),
                format!("{:+.1}", (fused - plain) * 1e6),
            ]);
        }
    }
    report.finish(gpu, "gemm-norm-fusion");
}

/// Prompt tokens of one prefill-lane iteration: the controller's 2048, and 8192 with a backlog.
const PREFILL_LANE_MS: [usize; 2] = [2048, 8192];
/// The budgets the prefill lane ran on beside decode in the controller's experiment (88-116 SMs).
const PREFILL_LANE_BUDGETS: [u32; 8] = [88, 92, 96, 100, 104, 108, 112, 116];
/// The tiles a prefill-sized GEMM can use, and the widest in pairs that share B (a third fewer
/// bytes loaded from L2 per FLOP; not planned).
const WIDE_KERNELS: [GemmKernel; 4] =
    [GemmKernel::Wgmma128x256, GemmKernel::Wgmma128x128, GemmKernel::Wgmma64x256, GemmKernel::WgmmaPair128x256];

/// Llama-3.1-8B's four projections at a prefill-lane iteration's M, on the budgets the prefill
/// lane gets beside decode: the planned launch, each wide tile unsplit with its waves (work units
/// over the CTAs, or over the clusters for pairs, rounded up) and how full its last wave is, and
/// cuBLAS at the same budget. Where a last wave leaves SMs idle (256 tiles of the output and down
/// projections at M = 2048 make 3 waves on 88-124 SMs), and whether the plan picks the fastest
/// tile there (`gemm-prefill-lane.md` with `NEXUS_BENCH_OUT`; cases
/// `gemm-prefill-lane/<shape>/m <M>/budget <SMs>`). Hopper only.
fn prefill_lane(
    gpu: &Arc<Gpu>,
    stream: &Arc<CudaStream>,
    blas: &CudaBlas,
    pool: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
) {
    if gpu.target() != PtxTarget::Sm90a {
        return;
    }
    let names: Vec<String> = WIDE_KERNELS.iter().map(|k| format!("{k:?} TFLOP/s (waves, last full)")).collect();
    let mut header = vec![
        "layer (K x N)",
        "M",
        "budget",
        "cuBLAS@budget TFLOP/s",
        "planner's pick",
        "planned TFLOP/s",
        "planned / cuBLAS",
    ];
    header.extend(names.iter().map(String::as_str));
    let report =
        Report::new("Prefill-lane GEMMs: the wide tiles on the prefill lane's budgets (TFLOP/s = 2MNK / t)", &header);
    let budgets: Vec<CtaBudget> = PREFILL_LANE_BUDGETS.iter().filter_map(|&b| CtaBudget::new(b, gpu).ok()).collect();
    let llama = DECODE_SHAPES.into_iter().filter(|(layer, ..)| layer.starts_with("Llama"));
    for (layer, shape, chosen) in layer_cases("gemm-prefill-lane", llama, &PREFILL_LANE_MS, &budgets) {
        let GemmShape { m, n, k } = shape;
        let views = rotated_operands(pool, m * k, n * k);
        let flops = 2.0 * (m * n * k) as f64;
        for budget in chosen {
            let times = time_at_budget(gpu, blas, &views, out, stream, shape, budget, &WIDE_KERNELS);
            let mut row = vec![
                format!("{layer} ({k} x {n})"),
                m.to_string(),
                budget.get().to_string(),
                format!("{:.1}", flops / times.cublas / 1e12),
                plan_label(&gemm::plan(shape, budget, gpu.model())),
                format!("{:.1}", flops / times.planned / 1e12),
                format!("{:.2}", times.planned / times.cublas),
            ];
            for (kernel, t) in WIDE_KERNELS.into_iter().zip(times.kernels) {
                // A pair kernel's units (two M tiles) are taken by clusters of two CTAs.
                let takers = (budget.get() as usize / if kernel.is_pair() { 2 } else { 1 }).max(1);
                let units = kernel.units(shape);
                let last = units - (units.div_ceil(takers) - 1) * takers;
                row.push(format!(
                    "{:.1} ({}, {:.0}%)",
                    flops / t / 1e12,
                    units.div_ceil(takers),
                    100.0 * last as f64 / takers as f64
                ));
            }
            report.add(row);
        }
    }
    report.finish(gpu, "gemm-prefill-lane");
}

/// The prefill lane's budgets in [`beside_other_lane`]; the other lane gets the rest of the SMs.
const BESIDE_BUDGETS: [u32; 3] = [36, 68, 100];
/// Decode's budget in [`beside_other_lane`] when it takes fewer than the rest of the SMs (the rest
/// idle): whether a prefill's loss follows the SMs decode holds or the bytes it draws.
const BESIDE_FEW_DECODE_SMS: u32 = 32;
/// The decode lane's budgets where [`beside_other_lane`] times it: what the controller gives decode
/// beside a prompt (16-32 SMs in the twentieth H100 round).
const BESIDE_DECODE_BUDGETS: [u32; 2] = [16, 32];
/// The streaming read's budgets beside the decode lane in [`beside_other_lane`] (the rest idle):
/// HBM traffic from a prefill's 0.5 TB/s up, without a prefill's L2 traffic.
const BESIDE_FEW_STREAM_SMS: [u32; 3] = [4, 8, 16];
/// Rows of a decode GEMM in [`beside_other_lane`], timed or beside.
const BESIDE_DECODE_M: usize = 16;
/// Runs of the timed GEMM per sample, and samples, in [`beside_other_lane`].
const BESIDE_RUNS: u64 = 3;
const BESIDE_SAMPLES: usize = 5;

/// What keeps the other SMs busy in [`beside_other_lane`].
#[derive(Clone, Copy, Debug)]
enum OtherLane {
    /// Decode GEMMs: M = 16 over the gate/up weight (235 MB, more than L2 holds), one after the
    /// other; the weight is streamed from HBM at every launch.
    Decode,
    /// The streaming read over the bench's 256 MB buffer: HBM traffic with no tensor-core work.
    Stream,
    /// Prefill GEMMs of M rows on operands of their own: work that keeps its SMs' tensor cores
    /// busy and reads little from HBM, but much from L2 (each tile's operands), with the tile
    /// the planner picks or a given one (a narrower tile loads more bytes per FLOP).
    Prefill(usize, Option<GemmKernel>),
}

impl OtherLane {
    /// The rows of its GEMMs and the kernel they are launched with, the planner's if none (no
    /// GEMM for the streaming read).
    fn gemm(self) -> Option<(usize, Option<GemmKernel>)> {
        match self {
            OtherLane::Decode => Some((BESIDE_DECODE_M, None)),
            OtherLane::Stream => None,
            OtherLane::Prefill(m, kernel) => Some((m, kernel)),
        }
    }

    /// Its name in a case and in the report.
    fn name(self) -> String {
        match self {
            OtherLane::Decode => format!("decode (M {BESIDE_DECODE_M})"),
            OtherLane::Stream => "stream".into(),
            OtherLane::Prefill(m, None) => format!("prefill (M {m})"),
            OtherLane::Prefill(m, Some(kernel)) => format!("prefill (M {m}, {kernel:?})"),
        }
    }
}

/// Llama-3.1-8B's gate/up projection (K = 4096, N = 28672) timed alone and while a second stream
/// runs [`OtherLane`] work throughout on the other SMs: the time beside over the time alone, with
/// what the other lane reads alone (`gemm-beside.md` with `NEXUS_BENCH_OUT`; cases
/// `gemm-beside/m <M>/budget <SMs>/<other> <SMs>`). Hopper only. Two timed lanes:
/// - a prefill iteration's M on [`BESIDE_BUDGETS`] SMs, beside decode on the rest and on
///   [`BESIDE_FEW_DECODE_SMS`] of them, a streaming read, and prefill of its own M. The profile's
///   both-lane pairs (H100 round 18) found whole prefill steps 1.6-2.1x slower beside decode on
///   64-96 SMs, compute-bound prompts alike; a compute-bound other lane tells the traffic from the
///   power the SMs draw, the streaming read HBM traffic from decode's own;
/// - a decode GEMM (M = 16) on [`BESIDE_DECODE_BUDGETS`] SMs, beside a prefill of 2048 rows on
///   the rest (planned, and with each wide tile), a streaming read on the rest, and a streaming
///   read on [`BESIDE_FEW_STREAM_SMS`]. The profiles price decode GEMMs beside a prompt at
///   1.56-1.68x their time alone on 16 SMs (H100 round 20); here, on an H100, it took 1.43x beside
///   the prefill at full SM clock (the samples last milliseconds, too short for the power limiter:
///   what the case measures is the memory system's share). The tiles and the small reads tell the
///   prefill's L2 traffic from its HBM traffic.
fn beside_other_lane(
    gpu: &Arc<Gpu>,
    stream: &Arc<CudaStream>,
    pool: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    reads: &StreamRead,
) {
    if gpu.target() != PtxTarget::Sm90a {
        return;
    }
    let report = Report::new(
        "A GEMM beside the other lane (gate/up 4096 x 28672; TB/s = the other lane's bytes / its time alone)",
        &[
            "M",
            "budget",
            "other lane",
            "other SMs",
            "other TB/s alone",
            "us alone",
            "us beside",
            "beside / alone",
            "TFLOP/s beside",
            "TB/s beside",
        ],
    );
    let (k, n) = (4096, 28672);
    let other_stream = gpu.new_stream().expect("stream");
    let prefill_lanes = PREFILL_LANE_MS.map(|m| (m, &BESIDE_BUDGETS[..]));
    let lanes = prefill_lanes.into_iter().chain([(BESIDE_DECODE_M, &BESIDE_DECODE_BUDGETS[..])]);
    for (m, budgets) in lanes {
        let shape = GemmShape { m, n, k };
        let flops = 2.0 * (m * n * k) as f64;
        // The timed GEMM's operands at the pool's start, the other lane's after them: neither
        // finds the other's lines in L2.
        let (a, b) = (pool.slice(..m * k), pool.slice(m * k..(m + n) * k));
        let rest = (m + n) * k;
        for budget in budgets.iter().filter_map(|&sms| CtaBudget::new(sms, gpu).ok()) {
            let rest_sms = gpu.sm_count() - budget.get();
            let ctx = phase(gpu, stream, budget);
            let mut workspace = GemmWorkspace::new(&ctx).expect("workspace");
            let mut launch = |_: u64| {
                gemm::gemm(&ctx, &a, &b, None, &mut out.slice_mut(..m * n), shape, &mut workspace).expect("gemm");
            };
            let others = if m == BESIDE_DECODE_M {
                // The prefill with each wide tile tells L2 traffic (the tiles' loads) from HBM
                // traffic; the read on few SMs, HBM traffic of the prefill's size without it.
                let prefill = |kernel| (OtherLane::Prefill(PREFILL_LANE_MS[0], kernel), rest_sms);
                let mut others = vec![prefill(None)];
                others.extend(WIDE_KERNELS.map(|kernel| prefill(Some(kernel))));
                others.push((OtherLane::Stream, rest_sms));
                others.extend(BESIDE_FEW_STREAM_SMS.map(|sms| (OtherLane::Stream, sms)));
                others
            } else {
                let mut others = vec![(OtherLane::Decode, rest_sms)];
                if rest_sms > BESIDE_FEW_DECODE_SMS {
                    others.push((OtherLane::Decode, BESIDE_FEW_DECODE_SMS));
                }
                others.extend([(OtherLane::Stream, rest_sms), (OtherLane::Prefill(m, None), rest_sms)]);
                others
            };
            let mut alone = None;
            for (other, other_sms) in others {
                let case = format!("gemm-beside/m {m}/budget {}/{} {other_sms}", budget.get(), other.name());
                let Ok(other_budget) = CtaBudget::new(other_sms, gpu) else { continue };
                if !selected(&case) {
                    continue;
                }
                let alone = *alone.get_or_insert_with(|| median_gpu_time(stream, &mut launch).as_secs_f64());
                let other_ctx = phase(gpu, &other_stream, other_budget);
                // The other lane's launch, and the bytes one launch reads.
                let (mut other_launch, other_bytes): (Box<dyn FnMut() + '_>, usize) = match other.gemm() {
                    Some((other_m, kernel)) => {
                        let other_shape = GemmShape { m: other_m, n, k };
                        let config = kernel.map_or_else(
                            || gemm::plan(other_shape, other_budget, gpu.model()).config(),
                            GemmConfig::from,
                        );
                        let (other_a, other_b) = (
                            pool.slice(rest..rest + other_m * k),
                            pool.slice(rest + other_m * k..rest + (other_m + n) * k),
                        );
                        let mut other_out: CudaSlice<bf16> = other_stream.alloc_zeros(other_m * n).expect("alloc");
                        let mut other_workspace = GemmWorkspace::new(&other_ctx).expect("workspace");
                        let other_ctx = &other_ctx;
                        let launch = move || {
                            gemm::gemm_with(
                                other_ctx,
                                config,
                                GemmFusion::None,
                                &other_a,
                                &other_b,
                                None,
                                &mut other_out.as_view_mut(),
                                other_shape,
                                &mut other_workspace,
                            )
                            .expect("gemm");
                        };
                        (Box::new(launch), other_shape.bf16_bytes())
                    }
                    None => {
                        let mut checksums = other_stream.alloc_zeros::<u32>(other_sms as usize).expect("alloc");
                        let other_ctx = &other_ctx;
                        let launch = move || {
                            // As deep as our kernels: HBM traffic like a decode lane's.
                            stream_read(other_ctx, &reads.data(), &mut checksums.as_view_mut(), ReadDepth::Kernel)
                                .expect("stream_read")
                        };
                        (Box::new(launch), 4 * reads.data().len())
                    }
                };
                // One launch of the other lane alone, to queue enough of them to outlast a sample
                // of the timed GEMM at three times its time alone.
                let one = time_gpu(&other_stream, 3, |_| other_launch()).as_secs_f64() / 3.0;
                let queued = ((3.0 * BESIDE_RUNS as f64 * alone / one).ceil() as usize).clamp(1, 2000);
                let mut samples: Vec<f64> = (0..BESIDE_SAMPLES)
                    .map(|_| {
                        for _ in 0..queued {
                            other_launch();
                        }
                        let t = time_gpu(stream, BESIDE_RUNS, &mut launch).as_secs_f64() / BESIDE_RUNS as f64;
                        other_stream.synchronize().expect("sync");
                        t
                    })
                    .collect();
                samples.sort_by(f64::total_cmp);
                let beside = samples[samples.len() / 2];
                report.add(vec![
                    m.to_string(),
                    budget.get().to_string(),
                    other.name(),
                    other_sms.to_string(),
                    format!("{:.2}", other_bytes as f64 / one / 1e12),
                    format!("{:.0}", alone * 1e6),
                    format!("{:.0}", beside * 1e6),
                    format!("{:.2}", beside / alone),
                    format!("{:.1}", flops / beside / 1e12),
                    format!("{:.2}", shape.bf16_bytes() as f64 / beside / 1e12),
                ]);
            }
        }
    }
    report.finish(gpu, "gemm-beside");
}

/// Elements of the weight in [`weight_row_length`]: 128 MB of bf16 whatever its shape.
const ROW_LENGTH_WEIGHT: usize = 64 << 20;
/// The rows (K) of that weight, from rows of 256 bytes to rows of 32 KB.
const ROW_LENGTHS: [usize; 5] = [128, 512, 2048, 8192, 16384];

/// The same 128 MB weight streamed at M = 1 with rows (K) of 256 bytes to 32 KB, every Hopper
/// kernel unsplit at every budget: a tile's K slice is a box of 128-byte pieces, one per weight
/// row, so short rows make each box one contiguous run and long rows scatter it over DRAM. If the
/// short rows stream faster per SM, the layout of the weight in memory (not the kernel's
/// pipeline) limits the decode GEMMs at small budgets (`gemm-row.md` with `NEXUS_BENCH_OUT`;
/// cases `gemm-row/k <K>/budget <SMs>`).
fn weight_row_length(
    gpu: &Arc<Gpu>,
    stream: &Arc<CudaStream>,
    pool: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    budgets: &[CtaBudget],
    stream_read: &BandwidthCurve,
) {
    if !matches!(gpu.target(), PtxTarget::Sm90a) {
        return;
    }
    let kernels = GemmKernel::HOPPER;
    let names: Vec<String> = kernels.iter().map(|k| format!("{k:?} GB/s per SM")).collect();
    let mut header = vec!["K (row bytes)", "N", "budget", "stream read GB/s per SM"];
    header.extend(names.iter().map(String::as_str));
    let report = Report::new("One 128 MB weight at M = 1, by row length (GB/s per CTA = bytes / t / CTAs)", &header);
    for k in ROW_LENGTHS {
        let n = ROW_LENGTH_WEIGHT / k;
        let shape = GemmShape { m: 1, n, k };
        let views = rotated_operands(pool, k, n * k);
        let bytes = 2.0 * (k + n * k + n) as f64;
        for &budget in budgets {
            if !selected(&format!("gemm-row/k {k}/budget {}", budget.get())) {
                continue;
            }
            let ctx = phase(gpu, stream, budget);
            let mut workspace = GemmWorkspace::new(&ctx).expect("workspace");
            let per_sm = |t: f64, ctas: u32| format!("{:.1}", bytes / t / ctas as f64 / 1e9);
            let mut row = vec![
                format!("{k} ({} B)", 2 * k),
                n.to_string(),
                budget.get().to_string(),
                format!("{:.1}", stream_read.at(budget.get()) / budget.get() as f64 / 1e9),
            ];
            for &kernel in &kernels {
                let t = gemm_time(&ctx, Some(kernel.into()), &views, out, shape, &mut workspace);
                let ctas = (kernel.tiles(shape) as u32).min(budget.get());
                row.push(per_sm(t, ctas));
            }
            report.add(row);
        }
    }
    report.finish(gpu, "gemm-row");
}

/// Copies of an A of `a_len` and a B of `b_len` elements carved from `pool`, enough to rotate the
/// launches beyond L2 ([`copies_for`]): copy i has A at i·(a_len + b_len) and B right after it
/// (both multiples of 8 elements: 16-byte aligned).
fn rotated_operands(
    pool: &CudaSlice<bf16>,
    a_len: usize,
    b_len: usize,
) -> Vec<(CudaView<'_, bf16>, CudaView<'_, bf16>)> {
    let set = a_len + b_len;
    let copies = copies_for(2 * set);
    assert!(copies * set <= POOL_ELEMS, "pool too small for A of {a_len} and B of {b_len} elements");
    (0..copies).map(|i| (pool.slice(i * set..i * set + a_len), pool.slice(i * set + a_len..(i + 1) * set))).collect()
}

/// The linear layers of the three models of the experiments, (name, K, N).
const DECODE_SHAPES: [(&str, usize, usize); 12] = [
    ("Llama-3.1-8B QKV", 4096, 6144),
    ("Llama-3.1-8B output", 4096, 4096),
    ("Llama-3.1-8B gate/up", 4096, 28672),
    ("Llama-3.1-8B down", 14336, 4096),
    ("Qwen2.5-3B QKV", 2048, 2560),
    ("Qwen2.5-3B output", 2048, 2048),
    ("Qwen2.5-3B gate/up", 2048, 22016),
    ("Qwen2.5-3B down", 11008, 2048),
    ("Qwen2.5-14B QKV", 5120, 7168),
    ("Qwen2.5-14B output", 5120, 5120),
    ("Qwen2.5-14B gate/up", 5120, 27648),
    ("Qwen2.5-14B down", 13824, 5120),
];
/// Decode batch sizes: the rows of A.
const DECODE_MS: [usize; 4] = [1, 16, 32, 64];

/// Every kernel that runs on this device, on every decode-sized GEMM of [`DECODE_SHAPES`] at every
/// budget, next to the planner's pick, cuBLAS at the same budget and the streaming read: which tile
/// shape streams the weight best at each budget (the table the planner's model is fitted to), and
/// how far the best is from the read curve (`gemm-decode.md` with `NEXUS_BENCH_OUT`; cases named
/// `gemm-decode/<shape>/m <M>/budget <SMs>` for `NEXUS_BENCH_ONLY`).
fn decode_sizes(
    gpu: &Arc<Gpu>,
    stream: &Arc<CudaStream>,
    blas: &CudaBlas,
    pool: &CudaSlice<bf16>,
    out: &mut CudaSlice<bf16>,
    budgets: &[CtaBudget],
    reads: &StreamRead,
) {
    let mut kernels: Vec<GemmKernel> = match gpu.target() {
        PtxTarget::Sm90a => GemmKernel::HOPPER.iter().chain(&GemmKernel::PORTABLE).copied().collect(),
        PtxTarget::Sm80 => GemmKernel::PORTABLE.to_vec(),
    };
    kernels.extend(GemmKernel::STREAMS);
    let names: Vec<String> = kernels.iter().map(|k| format!("{k:?} TB/s")).collect();
    let mut header = vec![
        "layer (K x N)",
        "M",
        "budget",
        "stream read",
        "stream read of the same bytes",
        "cuBLAS@budget",
        "planner's pick",
        "planned TB/s",
        "planned % of the same bytes' read",
    ];
    header.extend(names.iter().map(String::as_str));
    let report = Report::new("Decode-sized GEMMs, every kernel (TB/s = 2(MK + NK + MN) / t)", &header);
    for (layer, shape, chosen) in layer_cases("gemm-decode", DECODE_SHAPES, &DECODE_MS, budgets) {
        let GemmShape { m, n, k } = shape;
        let views = rotated_operands(pool, m * k, n * k);
        let bytes = shape.bf16_bytes() as f64;
        let timed: Vec<GemmKernel> = kernels.iter().copied().filter(|&kernel| timed_at(kernel, m)).collect();
        for budget in chosen {
            let times = time_at_budget(gpu, blas, &views, out, stream, shape, budget, &timed);
            let same_bytes = reads.bytes_per_second(budget, bytes as usize);
            let mut row = vec![
                format!("{layer} ({k} x {n})"),
                m.to_string(),
                budget.get().to_string(),
                format!("{:.2}", reads.curve().at(budget.get()) / 1e12),
                format!("{:.2}", same_bytes / 1e12),
                format!("{:.2}", bytes / times.cublas / 1e12),
                plan_label(&gemm::plan(shape, budget, gpu.model())),
                format!("{:.2}", bytes / times.planned / 1e12),
                format!("{:.0}%", 100.0 * bytes / times.planned / same_bytes),
            ];
            let mut measured = timed.iter().zip(&times.kernels).peekable();
            row.extend(kernels.iter().map(|kernel| match measured.next_if(|(k, _)| *k == kernel) {
                Some((_, t)) => format!("{:.2}", bytes / t / 1e12),
                None => "-".to_string(),
            }));
            report.add(row);
        }
    }
    report.finish(gpu, "gemm-decode");
}
