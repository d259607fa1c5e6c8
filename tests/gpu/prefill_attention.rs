//! Paged prefill attention against its reference: ragged batches of chunks with and without
//! cached prefixes, GQA groups of several sizes, block sizes 8 to 128 with shuffled block tables,
//! budgets from one CTA to all SMs, every kernel the plan can run (on Hopper the wgmma ones too);
//! inputs that exercise one of the two products at a time; plus the CTA trace, the kernels each
//! GPU build and block size offers, and the plan's and launcher's errors.

use nexus::kernels::gpu::PtxTarget;
use nexus::kernels::prefill_attention::{PrefillOptions, PrefillPlan, prefill_attention};
use nexus::kernels::{AttentionBatch, ErrorKind, PagedKvLayout, PhaseContext, QkvLayout, reference};
use rand::rngs::StdRng;

use crate::common::*;

/// Budgets every batch runs with: one CTA, a few, and all SMs.
const BUDGETS: [Option<u32>; 3] = [Some(1), Some(7), None];

/// The reference is slow: every test keeps its work below this many multiply-adds.
const MAX_REFERENCE_MACS: f64 = 1e10;

/// Absolute tolerance: outputs are softmax-weighted means of values in [-1, 1], mostly far below
/// 1e-2 in magnitude, so the usual 1e-2 would pass almost anything for long rows. The kernel's
/// own error (P and the output rounded to bf16) stays within 2^-9 of the largest |v|.
const ATOL: f32 = 2e-3;

/// A batch of chunks `(q_len, prefix)` over a paged cache whose blocks are handed out in shuffled
/// order. Pool slots that no sequence owns below its KV length hold NaN: the kernel must never
/// read them.
struct Case {
    layout: QkvLayout,
    cache: PagedKvLayout,
    q_indptr: Vec<u32>,
    kv_lens: Vec<u32>,
    block_tables: Vec<i32>,
    max_blocks: usize,
    qkv: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    scale: f32,
}

impl Case {
    fn new(rng: &mut StdRng, layout: QkvLayout, block_size: usize, chunks: &[(usize, usize)]) -> Case {
        let kv_lens: Vec<u32> = chunks.iter().map(|&(q, p)| (q + p) as u32).collect();
        let mut q_indptr = vec![0u32];
        for &(q, _) in chunks {
            q_indptr.push(q_indptr.last().copied().unwrap_or(0) + q as u32);
        }
        // One spare column in every table row (never used) and a few spare blocks in the pool.
        let ScatteredPool { cache, block_tables, max_blocks, k, v } =
            ScatteredPool::new(rng, layout, block_size, &kv_lens, 1, 3);
        let tokens = *q_indptr.last().unwrap_or(&0) as usize;
        // Queries up to 3 in magnitude spread the scores (std ≈ 1), so softmax is not flat.
        let qkv = random_bf16(rng, tokens * layout.row_len(), 3.0);
        let scale = 1.0 / (layout.head_dim as f32).sqrt();
        Case { layout, cache, q_indptr, kv_lens, block_tables, max_blocks, qkv, k, v, scale }
    }

    fn batch(&self) -> AttentionBatch<'_> {
        AttentionBatch {
            q_indptr: &self.q_indptr,
            kv_lens: &self.kv_lens,
            block_tables: &self.block_tables,
            max_blocks_per_seq: self.max_blocks,
        }
    }

    fn tokens(&self) -> usize {
        *self.q_indptr.last().unwrap_or(&0) as usize
    }

    fn out_len(&self) -> usize {
        self.tokens() * self.layout.num_heads * self.layout.head_dim
    }

    /// Multiply-adds of the reference (QKᵀ and PV).
    fn macs(&self) -> f64 {
        let per_pair = 2.0 * (self.layout.num_heads * self.layout.head_dim) as f64;
        (0..self.kv_lens.len())
            .map(|i| {
                let q = (self.q_indptr[i + 1] - self.q_indptr[i]) as f64;
                let p = self.kv_lens[i] as f64 - q;
                per_pair * (q * p + q * (q + 1.0) / 2.0)
            })
            .sum()
    }

    fn reference(&self) -> Vec<f32> {
        assert!(self.macs() < MAX_REFERENCE_MACS, "test too large for the reference: {:e} MACs", self.macs());
        let mut want = vec![0.0; self.out_len()];
        reference::prefill_attention(
            &self.qkv,
            self.layout,
            &self.k,
            &self.v,
            self.cache,
            self.batch(),
            self.scale,
            &mut want,
        )
        .expect("reference");
        want
    }
}

impl Case {
    /// The case's inputs on the device.
    fn device(&self, ctx: &PhaseContext) -> DeviceInputs {
        DeviceInputs::new(ctx, &self.qkv, &self.k, &self.v, &self.block_tables)
    }
}

impl DeviceInputs {
    /// Runs `plan` on `ctx` into a fresh poisoned output and downloads it.
    fn run_prefill(&self, ctx: &PhaseContext, case: &Case, plan: &PrefillPlan) -> Vec<f32> {
        let mut out = poisoned(ctx, case.out_len());
        prefill_attention(
            ctx,
            plan,
            &self.qkv.as_view(),
            &self.k.as_view(),
            &self.v.as_view(),
            &self.tables.as_view(),
            case.scale,
            &mut out.as_view_mut(),
            None,
        )
        .expect("prefill_attention");
        download(ctx, &out)
    }
}

/// Checks one batch against the reference with every budget and every compiled kernel for the
/// head dim, reusing one plan across launches (its work counter must reset itself).
fn check(test: &str, layout: QkvLayout, block_size: usize, chunks: &[(usize, usize)]) {
    let mut rng = rng(test);
    check_case(test, &Case::new(&mut rng, layout, block_size, chunks));
}

/// [`check`] of a prepared case.
fn check_case(test: &str, case: &Case) {
    let (layout, block_size) = (case.layout, case.cache.block_size);
    let want = case.reference();
    let setup = phase(None);
    let inputs = case.device(&setup);
    let mut plan = PrefillPlan::new(&setup, case.batch(), layout, case.cache).expect("plan");
    for kernel in plan.kernels() {
        plan.set_kernel(kernel).expect("kernel");
        for budget in BUDGETS {
            let ctx = phase(budget);
            let got = inputs.run_prefill(&ctx, case, &plan);
            let what = format!(
                "{test}: {}/{} heads d={} block {block_size}, {kernel}, budget {budget:?}",
                layout.num_heads, layout.num_kv_heads, layout.head_dim
            );
            assert_close(&what, &got, &want, BF16_RTOL, ATOL);
        }
    }
}

/// Chunks `(q_len, prefix)` covering the lengths of interest: single tokens, around one item
/// (64 tokens ≈ 2 items of 32/8 heads), long chunks, and prefixes that start mid-block.
const RAGGED: [(usize, usize); 9] =
    [(1, 0), (5, 17), (63, 300), (64, 0), (65, 2000), (200, 17), (1000, 0), (0, 40), (1, 2000)];

#[test]
#[ignore = "needs a CUDA GPU"]
fn gqa_32_8_d128_ragged_chunks() {
    let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
    check("gqa_32_8_d128_ragged", layout, 16, &RAGGED);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gqa_32_8_d128_block_sizes() {
    let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
    let chunks = [(64, 2000), (5, 300), (1, 17), (200, 0), (65, 127), (33, 95)];
    // The Hopper kernels' TMA boxes are a block tall up to a K/V tile (128): 32, 128 and 256 take
    // boxes of 32 and 128 rows; 8 runs the portable kernel.
    for block_size in [8, 32, 128, 256] {
        check("gqa_32_8_d128_block_sizes", layout, block_size, &chunks);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gqa_9_3_d64_ragged_chunks() {
    let layout = QkvLayout { num_heads: 9, num_kv_heads: 3, head_dim: 64 };
    let chunks = [(1, 2000), (5, 0), (63, 17), (64, 300), (65, 0), (200, 2000), (1000, 300), (43, 0), (42, 1)];
    for block_size in [8, 16, 64, 128] {
        check("gqa_9_3_d64_ragged", layout, block_size, &chunks);
    }
}

/// Sets every row of a pool that a sequence owns (the others hold NaN) to `rows[kv_head]`.
fn same_row_everywhere(pool: &mut [f32], layout: QkvLayout, rows: &[Vec<f32>]) {
    let d = layout.head_dim;
    for (i, slot) in pool.chunks_mut(d).enumerate() {
        if !slot[0].is_nan() {
            slot.copy_from_slice(&rows[i % layout.num_kv_heads]);
        }
    }
}

/// Inputs that exercise one product at a time, so that a failure says which one is wrong: with
/// the same V row at every position, the output is that row whatever the scores (P V alone: the
/// V operand's layout, P's fragments); with the same K row, the scores of a query are all equal
/// and the output is the mean of V over its causal window (Q Kᵀ without information, P V and
/// the masking).
#[test]
#[ignore = "needs a CUDA GPU"]
fn structured_inputs_separate_the_two_products() {
    let chunks = [(200, 0), (37, 300), (1, 129), (130, 16)];
    for (heads, kv_heads, head_dim) in [(32, 8, 128), (9, 3, 64)] {
        let layout = QkvLayout { num_heads: heads, num_kv_heads: kv_heads, head_dim };
        let mut rng = rng("structured_inputs");
        let rows: Vec<Vec<f32>> = (0..kv_heads).map(|_| random_bf16(&mut rng, head_dim, 1.0)).collect();
        let mut same_v = Case::new(&mut rng, layout, 16, &chunks);
        same_row_everywhere(&mut same_v.v, layout, &rows);
        check_case("same V everywhere (P V)", &same_v);
        let mut same_k = Case::new(&mut rng, layout, 16, &chunks);
        same_row_everywhere(&mut same_k.k, layout, &rows);
        check_case("same K everywhere (scores all equal)", &same_k);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn other_group_sizes() {
    let chunks = [(1, 0), (37, 100), (130, 0), (300, 64)];
    // Multi-head (group 1), group 5, multi-query (group 8) and the largest group (128 heads per
    // KV head: one token per item).
    for (heads, kv_heads, head_dim) in [(16, 16, 128), (10, 2, 128), (8, 1, 64), (128, 1, 64)] {
        let layout = QkvLayout { num_heads: heads, num_kv_heads: kv_heads, head_dim };
        check("other_group_sizes", layout, 16, &chunks);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn repeated_runs_are_identical() {
    let mut rng = rng("repeated_runs");
    let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
    let case = Case::new(&mut rng, layout, 16, &[(300, 500), (77, 0), (1, 900)]);
    let ctx = phase(Some(13));
    let inputs = case.device(&ctx);
    let plan = PrefillPlan::new(&ctx, case.batch(), layout, case.cache).expect("plan");
    let first = inputs.run_prefill(&ctx, &case, &plan);
    for _ in 0..3 {
        let again = inputs.run_prefill(&ctx, &case, &plan);
        assert!(first.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "runs differ");
    }
    assert_close("repeated_runs", &first, &case.reference(), BF16_RTOL, ATOL);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn empty_batches_launch_nothing() {
    let layout = QkvLayout { num_heads: 9, num_kv_heads: 3, head_dim: 64 };
    let cache = PagedKvLayout { num_blocks: 2, block_size: 16, num_kv_heads: 3, head_dim: 64 };
    let ctx = phase(None);
    // Zero-length views of real allocations (the driver refuses zero-byte allocations).
    let pool = poisoned(&ctx, cache.pool_len());
    let scratch = poisoned(&ctx, 8);
    let mut out = poisoned(&ctx, 8);
    let tables = ctx.stream().clone_htod(&[0i32, -1, -1, -1]).expect("upload");
    // No sequences; and two sequences with no query tokens (one with a cached prefix).
    for (q_indptr, kv_lens, table_len) in [(&[0u32][..], &[][..], 0), (&[0, 0, 0][..], &[10u32, 0][..], 4)] {
        let host_table = [0i32, -1, -1, -1];
        let batch = AttentionBatch { q_indptr, kv_lens, block_tables: &host_table[..table_len], max_blocks_per_seq: 2 };
        let plan = PrefillPlan::new(&ctx, batch, layout, cache).expect("plan");
        assert_eq!((plan.num_items(), plan.ctas(ctx.budget()), plan.num_tokens()), (0, 0, 0));
        prefill_attention(
            &ctx,
            &plan,
            &scratch.slice(0..0),
            &pool.as_view(),
            &pool.as_view(),
            &tables.slice(0..table_len),
            0.125,
            &mut out.slice_mut(0..0),
            None,
        )
        .expect("prefill_attention");
    }
    assert!(download(&ctx, &out).iter().all(|x| x.is_nan()));
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn trace_records_at_most_budget_ctas_on_distinct_sms() {
    let mut rng = rng("trace");
    let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
    let case = Case::new(&mut rng, layout, 16, &[(500, 100), (64, 0)]);
    let gpu = gpu();
    for budget in [Some(1), Some(7), None] {
        let ctx = phase(budget);
        let inputs = case.device(&ctx);
        let plan = PrefillPlan::new(&ctx, case.batch(), layout, case.cache).expect("plan");
        let ctas = plan.ctas(ctx.budget());
        assert_eq!(ctas as usize, plan.num_items().min(ctx.budget().get() as usize));
        let slots = 3 * gpu.sm_count() as usize;
        let mut trace = ctx.stream().clone_htod(&vec![u64::MAX; slots]).expect("upload");
        let mut out = poisoned(&ctx, case.out_len());
        prefill_attention(
            &ctx,
            &plan,
            &inputs.qkv.as_view(),
            &inputs.k.as_view(),
            &inputs.v.as_view(),
            &inputs.tables.as_view(),
            case.scale,
            &mut out.as_view_mut(),
            Some(&mut trace.as_view_mut()),
        )
        .expect("prefill_attention");
        let records = ctx.stream().clone_dtoh(&trace).expect("download");
        let written: Vec<&[u64]> = records.chunks(3).filter(|r| r[0] != u64::MAX).collect();
        assert_eq!(written.len(), ctas as usize, "budget {budget:?}: CTAs that recorded");
        assert!(records.chunks(3).skip(ctas as usize).all(|r| r.iter().all(|&x| x == u64::MAX)));
        let mut sms: Vec<u64> = written.iter().map(|r| r[0]).collect();
        sms.sort_unstable();
        sms.dedup();
        assert_eq!(sms.len(), written.len(), "budget {budget:?}: two CTAs shared an SM");
        assert!(written.iter().all(|r| r[0] < gpu.sm_count() as u64 && r[1] <= r[2]));
        assert_close("trace run", &download(&ctx, &out), &case.reference(), BF16_RTOL, ATOL);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn plan_rejects_bad_batches() {
    let ctx = phase(None);
    let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
    let cache = PagedKvLayout { num_blocks: 10, block_size: 16, num_kv_heads: 8, head_dim: 128 };
    let table: Vec<i32> = (0..8).collect();
    let plan = |q_indptr: &[u32], kv_lens: &[u32], table: &[i32], max_blocks: usize, layout, cache| {
        let batch = AttentionBatch { q_indptr, kv_lens, block_tables: table, max_blocks_per_seq: max_blocks };
        PrefillPlan::new(&ctx, batch, layout, cache).map(|_| ()).map_err(|e| e.kind())
    };
    // Accepted: 2 sequences of 4 blocks each; unused entries may hold anything.
    assert_eq!(plan(&[0, 10, 30], &[64, 20], &table, 4, layout, cache), Ok(()));
    let mut loose = table.clone();
    loose[3 + 4] = 999;
    assert_eq!(plan(&[0, 10, 30], &[64, 20], &loose, 4, layout, cache), Ok(()));
    // A used block outside the pool, or negative.
    let mut bad = table.clone();
    bad[1] = 10;
    assert_eq!(plan(&[0, 10, 30], &[64, 20], &bad, 4, layout, cache), Err(ErrorKind::Shape));
    bad[1] = -1;
    assert_eq!(plan(&[0, 10, 30], &[64, 20], &bad, 4, layout, cache), Err(ErrorKind::Shape));
    // More queries than KV tokens; KV beyond the table; decreasing or short offsets.
    assert_eq!(plan(&[0, 10, 30], &[64, 19], &table, 4, layout, cache), Err(ErrorKind::Shape));
    assert_eq!(plan(&[0, 10, 30], &[65, 20], &table, 4, layout, cache), Err(ErrorKind::Shape));
    assert_eq!(plan(&[0, 10, 5], &[64, 20], &table, 4, layout, cache), Err(ErrorKind::Shape));
    assert_eq!(plan(&[0, 10], &[64, 20], &table, 4, layout, cache), Err(ErrorKind::Shape));
    assert_eq!(plan(&[1, 10, 30], &[64, 20], &table, 4, layout, cache), Err(ErrorKind::Shape));
    // Table length not sequences x width.
    assert_eq!(plan(&[0, 10, 30], &[64, 20], &table[..7], 4, layout, cache), Err(ErrorKind::Shape));
    // Layouts: cache and QKV disagree; heads not a multiple; unsupported head dim or group.
    let other = PagedKvLayout { num_kv_heads: 4, ..cache };
    assert_eq!(plan(&[0, 10, 30], &[64, 20], &table, 4, layout, other), Err(ErrorKind::Shape));
    let odd = QkvLayout { num_heads: 30, ..layout };
    assert_eq!(plan(&[0, 10, 30], &[64, 20], &table, 4, odd, cache), Err(ErrorKind::Shape));
    let d96 = QkvLayout { head_dim: 96, ..layout };
    let c96 = PagedKvLayout { head_dim: 96, ..cache };
    assert_eq!(plan(&[0, 10, 30], &[64, 20], &table, 4, d96, c96), Err(ErrorKind::Unsupported));
    let wide = QkvLayout { num_heads: 256, num_kv_heads: 1, head_dim: 64 };
    let c1 = PagedKvLayout { num_kv_heads: 1, head_dim: 64, ..cache };
    assert_eq!(plan(&[0, 10, 30], &[64, 20], &table, 4, wide, c1), Err(ErrorKind::Unsupported));
    let bs = PagedKvLayout { block_size: 24, ..cache };
    assert_eq!(plan(&[0, 10, 30], &[64, 20], &table, 4, layout, bs), Err(ErrorKind::Shape));
    // Kernels: only those compiled for the head dim.
    let batch =
        AttentionBatch { q_indptr: &[0, 10, 30], kv_lens: &[64, 20], block_tables: &table, max_blocks_per_seq: 4 };
    let mut p = PrefillPlan::new(&ctx, batch, layout, cache).expect("plan");
    assert_eq!(p.kernel(), p.kernels()[0]);
    assert_eq!(p.set_kernel("prefill_attention_d64_n128").map_err(|e| e.kind()), Err(ErrorKind::Unsupported));
    assert!(p.set_kernel("prefill_attention_d128_n64").is_ok());
    // The Hopper kernel is the default on Hopper for blocks of 16 tokens or more, and never runs
    // blocks of 8 (a TMA box of 16 rows must lie in one block) or on the portable build.
    let hopper = "prefill_attention_wgmma_d128";
    let on_hopper = gpu().target() == PtxTarget::Sm90a;
    assert_eq!(p.kernels()[0] == hopper, on_hopper, "{:?}", p.kernels());
    let blocks_of_8 = PagedKvLayout { num_blocks: 20, block_size: 8, ..cache };
    let table8: Vec<i32> = (0..16).collect();
    let batch8 =
        AttentionBatch { q_indptr: &[0, 10, 30], kv_lens: &[64, 20], block_tables: &table8, max_blocks_per_seq: 8 };
    let p8 = PrefillPlan::new(&ctx, batch8, layout, blocks_of_8).expect("plan");
    assert!(!p8.kernels().contains(&hopper), "{:?}", p8.kernels());
    let portable = phase_on(&portable_gpu(), None);
    let pp = PrefillPlan::new(&portable, batch, layout, cache).expect("plan");
    assert!(!pp.kernels().contains(&hopper), "{:?}", pp.kernels());
    let only = PrefillOptions { portable_only: true };
    let po = PrefillPlan::with_options(&ctx, batch, layout, cache, only).expect("plan");
    assert_eq!(po.kernel(), "prefill_attention_d128_n64", "{:?}", po.kernels());
    assert!(po.kernels().iter().all(|k| !k.contains("wgmma")), "{:?}", po.kernels());
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn launcher_rejects_bad_buffers() {
    let mut rng = rng("launcher_rejects");
    let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
    let case = Case::new(&mut rng, layout, 16, &[(20, 10), (3, 0)]);
    let ctx = phase(Some(4));
    let inputs = case.device(&ctx);
    let plan = PrefillPlan::new(&ctx, case.batch(), layout, case.cache).expect("plan");
    let mut out = poisoned(&ctx, case.out_len());
    let short = poisoned(&ctx, case.out_len() - 8);
    let small_table = ctx.stream().clone_htod(&case.block_tables[1..]).expect("upload");
    let mut short_out = poisoned(&ctx, case.out_len() - 8);
    let mut small_trace = ctx.stream().clone_htod(&vec![0u64; 3 * 4 - 1]).expect("upload");
    let (q, k, v, t) = (inputs.qkv.as_view(), inputs.k.as_view(), inputs.v.as_view(), inputs.tables.as_view());
    let kind = |r: nexus::kernels::Result<()>| r.map_err(|e| e.kind());
    // qkv, pools, table, out of the wrong length; a trace too short for the budget; bad scale.
    let bad_q = inputs.qkv.slice(8..);
    assert_eq!(
        kind(prefill_attention(&ctx, &plan, &bad_q, &k, &v, &t, 0.1, &mut out.as_view_mut(), None)),
        Err(ErrorKind::Shape)
    );
    assert_eq!(
        kind(prefill_attention(&ctx, &plan, &q, &short.as_view(), &v, &t, 0.1, &mut out.as_view_mut(), None)),
        Err(ErrorKind::Shape)
    );
    assert_eq!(
        kind(prefill_attention(&ctx, &plan, &q, &k, &v, &small_table.as_view(), 0.1, &mut out.as_view_mut(), None)),
        Err(ErrorKind::Shape)
    );
    assert_eq!(
        kind(prefill_attention(&ctx, &plan, &q, &k, &v, &t, 0.1, &mut short_out.as_view_mut(), None)),
        Err(ErrorKind::Shape)
    );
    assert_eq!(
        kind(prefill_attention(
            &ctx,
            &plan,
            &q,
            &k,
            &v,
            &t,
            0.1,
            &mut out.as_view_mut(),
            Some(&mut small_trace.as_view_mut())
        )),
        Err(ErrorKind::Shape)
    );
    assert_eq!(
        kind(prefill_attention(&ctx, &plan, &q, &k, &v, &t, f32::NAN, &mut out.as_view_mut(), None)),
        Err(ErrorKind::Shape)
    );
    assert_eq!(
        kind(prefill_attention(&ctx, &plan, &q, &k, &v, &t, -0.1, &mut out.as_view_mut(), None)),
        Err(ErrorKind::Shape)
    );
    // A misaligned output view of the right length.
    let mut big = poisoned(&ctx, case.out_len() + 8);
    let mut shifted = big.slice_mut(1..case.out_len() + 1);
    assert_eq!(kind(prefill_attention(&ctx, &plan, &q, &k, &v, &t, 0.1, &mut shifted, None)), Err(ErrorKind::Shape));
    // A plan run on a context of another build (its kernel may not exist there).
    if gpu().target() == PtxTarget::Sm90a {
        let portable = phase_on(&portable_gpu(), Some(4));
        assert_eq!(
            kind(prefill_attention(&portable, &plan, &q, &k, &v, &t, 0.1, &mut out.as_view_mut(), None)),
            Err(ErrorKind::Shape)
        );
    }
    // Nothing was written by the refused launches.
    assert!(download(&ctx, &out).iter().all(|x| x.is_nan()));
}

/// A batch small enough for compute-sanitizer's racecheck (which slows kernels a
/// hundredfold) that still crosses tile, block and diagonal boundaries in both head dims, with
/// the smallest TMA boxes (blocks of 16) and the tallest (blocks of 128).
#[test]
#[ignore = "needs a CUDA GPU"]
fn small_batches_for_sanitizers() {
    let chunks = [(70, 40), (3, 0)];
    for (heads, kv_heads, head_dim) in [(9, 3, 64), (8, 2, 128)] {
        let layout = QkvLayout { num_heads: heads, num_kv_heads: kv_heads, head_dim };
        for block_size in [16, 128] {
            check("small_batches_for_sanitizers", layout, block_size, &chunks);
        }
    }
}
