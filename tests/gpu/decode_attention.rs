//! Paged decode attention against its reference: ragged batches (single tokens to 8k), GQA 32/8
//! with d = 128, SmolLM2's 9/3 with d = 64, MHA 8/8 and a group of 16, block sizes 8 to 128 with
//! shuffled block tables, budgets from one CTA to all SMs, each split mode, and the portable (sm_80)
//! build on the same GPU; plus batch
//! invariance of fixed chunks, CUDA-graph capture, the CTA trace, and the plan's and launcher's
//! errors. And `decode_attention_rope` (the new tokens' RoPE and KV write in the same launch)
//! against its reference: the output and both whole pools.

use std::sync::Arc;

use cudarc::driver::{CudaGraph, CudaSlice, CudaView};
use half::bf16;
use nexus::kernels::decode_attention::{DecodeOptions, DecodePlan, KvSplit, decode_attention, decode_attention_rope};
use nexus::kernels::{
    ErrorKind, Gpu, PagedKvLayout, PhaseContext, QkvLayout, RopeConfig, RopeScaling, RopeStyle, copy_rows_htod,
    reference,
};
use rand::Rng;
use rand::rngs::StdRng;

use crate::common::*;

/// Absolute tolerance: outputs are softmax-weighted means of values in [-1, 1], far below 1 in
/// magnitude for long rows, so 1e-2 would hide real errors. The kernel's own error (P and the
/// output rounded to bf16) stays within 2^-9 of the largest |v|.
const ATOL: f32 = 2e-3;

/// The lengths of the issue: single tokens, around one 16-token sub-tile, and long ones.
const LENGTHS: [u32; 8] = [1, 15, 16, 17, 100, 1000, 4097, 8192];

fn gqa() -> QkvLayout {
    QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 }
}

fn smollm2() -> QkvLayout {
    QkvLayout { num_heads: 9, num_kv_heads: 3, head_dim: 64 }
}

fn mha() -> QkvLayout {
    QkvLayout { num_heads: 8, num_kv_heads: 8, head_dim: 128 }
}

/// Budgets of the tests: 1, 7, 64 and all SMs (64 only where the GPU has more).
fn budgets() -> Vec<Option<u32>> {
    let sms = gpu().sm_count();
    let mut b = vec![Some(1), Some(7)];
    if sms > 64 {
        b.push(Some(64));
    }
    b.push(None);
    b
}

/// A decode batch over a paged cache whose blocks are handed out in shuffled order. Pool slots
/// that no sequence owns below its length hold NaN: the kernel must never read them.
struct Case {
    layout: QkvLayout,
    cache: PagedKvLayout,
    kv_lens: Vec<u32>,
    block_tables: Vec<i32>,
    max_blocks: usize,
    qkv: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    scale: f32,
}

impl Case {
    fn new(rng: &mut StdRng, layout: QkvLayout, block_size: usize, kv_lens: &[u32]) -> Case {
        // Spare table columns (never used, left at -1) and spare pool blocks.
        let ScatteredPool { cache, block_tables, max_blocks, k, v } =
            ScatteredPool::new(rng, layout, block_size, kv_lens, 2, 5);
        // Queries up to 3 in magnitude spread the scores, so the softmax is not flat.
        let qkv = random_bf16(rng, kv_lens.len() * layout.row_len(), 3.0);
        let scale = 1.0 / (layout.head_dim as f32).sqrt();
        Case { layout, cache, kv_lens: kv_lens.to_vec(), block_tables, max_blocks, qkv, k, v, scale }
    }

    fn out_len(&self) -> usize {
        self.kv_lens.len() * self.layout.num_heads * self.layout.head_dim
    }

    fn reference(&self) -> Vec<f32> {
        let mut want = vec![0.0; self.out_len()];
        reference::decode_attention(
            &self.qkv,
            self.layout,
            &self.k,
            &self.v,
            self.cache,
            &self.kv_lens,
            &self.block_tables,
            self.max_blocks,
            self.scale,
            &mut want,
        )
        .expect("reference");
        want
    }

    fn plan(&self, ctx: &PhaseContext, split: KvSplit) -> DecodePlan {
        let options = DecodeOptions { scale: self.scale, split };
        DecodePlan::new(ctx, self.layout, self.cache, &self.kv_lens, &self.block_tables, self.max_blocks, options)
            .expect("plan")
    }
}

impl Case {
    /// The case's inputs on the device.
    fn device(&self, ctx: &PhaseContext) -> DeviceInputs {
        DeviceInputs::new(ctx, &self.qkv, &self.k, &self.v, &self.block_tables)
    }
}

impl DeviceInputs {
    /// Launches `plan` over these inputs into `out`.
    fn launch_decode(
        &self,
        ctx: &PhaseContext,
        plan: &DecodePlan,
        out: &mut CudaSlice<bf16>,
    ) -> nexus::kernels::Result<()> {
        decode_attention(
            ctx,
            plan,
            &self.qkv.as_view(),
            &self.k.as_view(),
            &self.v.as_view(),
            &self.tables.as_view(),
            &mut out.as_view_mut(),
            None,
        )
    }

    /// Runs `plan` on `ctx` into a fresh poisoned output and downloads it.
    fn run_decode(&self, ctx: &PhaseContext, case: &Case, plan: &DecodePlan) -> Vec<f32> {
        let mut out = poisoned(ctx, case.out_len());
        self.launch_decode(ctx, plan, &mut out).expect("decode_attention");
        download(ctx, &out)
    }
}

fn describe(case: &Case, split: KvSplit, budget: Option<u32>, plan: &DecodePlan) -> String {
    format!(
        "{}/{} heads d={} block {} {split:?} budget {budget:?} (chunk {:?}, {} items on {} CTAs, {} split)",
        case.layout.num_heads,
        case.layout.num_kv_heads,
        case.layout.head_dim,
        case.cache.block_size,
        plan.chunk_tokens(),
        plan.num_items(),
        plan.grid(),
        plan.num_split_seqs()
    )
}

/// Checks one batch against the reference with every budget and the given split modes.
fn check(test: &str, layout: QkvLayout, block_size: usize, kv_lens: &[u32], splits: &[KvSplit]) {
    check_on(&gpu(), test, layout, block_size, kv_lens, splits)
}

/// [`check`] with the kernels `gpu` loaded.
fn check_on(gpu: &Arc<Gpu>, test: &str, layout: QkvLayout, block_size: usize, kv_lens: &[u32], splits: &[KvSplit]) {
    let mut rng = rng(test);
    let case = Case::new(&mut rng, layout, block_size, kv_lens);
    let want = case.reference();
    let setup = phase_on(gpu, None);
    let inputs = case.device(&setup);
    for &split in splits {
        for budget in budgets() {
            let ctx = phase_on(gpu, budget);
            let plan = case.plan(&ctx, split);
            let got = inputs.run_decode(&ctx, &case, &plan);
            assert_close(&format!("{test}: {}", describe(&case, split, budget, &plan)), &got, &want, BF16_RTOL, ATOL);
        }
    }
}

/// The sm_80 build (cp.async producers; Hopper runs TMA ones), on whatever GPU runs the tests.
#[test]
#[ignore = "needs a CUDA GPU"]
fn portable_kernel_matches_reference() {
    let portable = portable_gpu();
    for block_size in [8, 16] {
        check_on(&portable, "portable gqa 32/8", gqa(), block_size, &LENGTHS, &[KvSplit::Auto]);
    }
    check_on(&portable, "portable smollm2 9/3", smollm2(), 32, &LENGTHS, &[KvSplit::Auto, KvSplit::Fixed(512)]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn gqa_ragged_batches_match_reference() {
    for block_size in [8, 16, 32, 128] {
        check("gqa 32/8", gqa(), block_size, &LENGTHS, &[KvSplit::Auto]);
    }
    check("gqa 32/8 modes", gqa(), 16, &LENGTHS, &[KvSplit::Never, KvSplit::Fixed(256), KvSplit::Fixed(1024)]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn smollm2_ragged_batches_match_reference() {
    for block_size in [8, 16, 32, 128] {
        check("smollm2 9/3", smollm2(), block_size, &LENGTHS, &[KvSplit::Auto, KvSplit::Fixed(512)]);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn mha_and_large_groups_match_reference() {
    check("mha 8/8", mha(), 16, &LENGTHS, &[KvSplit::Auto, KvSplit::Never]);
    // A group of 16 query heads takes two items per KV head.
    let wide = QkvLayout { num_heads: 32, num_kv_heads: 2, head_dim: 64 };
    check("group 16", wide, 32, &LENGTHS, &[KvSplit::Auto]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn random_batches_match_reference() {
    let mut rng = rng("random batch sizes");
    for (layout, block_size) in [(gqa(), 16), (smollm2(), 8), (mha(), 64), (gqa(), 128)] {
        let seqs = rng.random_range(1..40);
        let lens: Vec<u32> = (0..seqs)
            .map(|_| if rng.random_bool(0.3) { rng.random_range(1..64) } else { rng.random_range(1..6000) })
            .collect();
        check("random", layout, block_size, &lens, &[KvSplit::Auto]);
    }
    // One short sequence, one long one: the long one is split across many CTAs.
    check("single", gqa(), 16, &[20000], &[KvSplit::Auto]);
    check("single short", smollm2(), 16, &[3], &[KvSplit::Auto]);
}

/// The rotated keys' tolerance, as `rope_and_write_kv`'s test: the kernel's sines and cosines
/// (f32, the special function unit's) and the reference's may round a value of up to ~4 to the
/// neighbouring bf16.
const ROPE_ATOL: f32 = 2e-2;

/// Makes the K and V of each sequence's last token (its new one) NaN in the case's pools, as a
/// pool holds before the write: a missed write fails the comparison.
fn clear_new_tokens(case: &mut Case) {
    let slot_len = case.cache.slot_len();
    for (i, &len) in case.kv_lens.iter().enumerate() {
        let row = &case.block_tables[i * case.max_blocks..][..case.max_blocks];
        let slot = case.cache.slot_of(row, len as usize - 1).expect("a block for the last position");
        case.k[slot * slot_len..][..slot_len].fill(f32::NAN);
        case.v[slot * slot_len..][..slot_len].fill(f32::NAN);
    }
}

/// `got` against `want`, a pool: NaN where `want` is (slots no sequence owns, which no kernel may
/// write), else within the tolerances.
fn assert_pool_close(what: &str, got: &[f32], want: &[f32], atol: f32) {
    let stray = got.iter().zip(want).filter(|(g, w)| w.is_nan() && !g.is_nan()).count();
    assert_eq!(stray, 0, "{what}: {stray} values written outside the sequences' slots");
    let (g, w): (Vec<f32>, Vec<f32>) = got.iter().zip(want).filter(|(_, w)| !w.is_nan()).map(|(g, w)| (*g, *w)).unzip();
    assert_close(what, &g, &w, BF16_RTOL, atol);
}

/// `decode_attention_rope` over one batch with each budget and split mode on `gpu`: the output,
/// both pools (the new tokens' rotated keys and values, nothing else written) and the QKV buffer
/// (left as it was) against the reference.
fn check_rope_on(
    gpu: &Arc<Gpu>,
    test: &str,
    layout: QkvLayout,
    block_size: usize,
    kv_lens: &[u32],
    rope: RopeConfig,
    splits: &[KvSplit],
) {
    let mut rng = rng(test);
    let mut case = Case::new(&mut rng, layout, block_size, kv_lens);
    clear_new_tokens(&mut case);
    let (mut want_k, mut want_v, mut want) = (case.k.clone(), case.v.clone(), vec![0.0; case.out_len()]);
    reference::decode_attention_rope(
        &case.qkv,
        layout,
        rope,
        &mut want_k,
        &mut want_v,
        case.cache,
        &case.kv_lens,
        &case.block_tables,
        case.max_blocks,
        case.scale,
        &mut want,
    )
    .expect("reference");
    for &split in splits {
        for budget in budgets() {
            let ctx = phase_on(gpu, budget);
            let plan = case.plan(&ctx, split);
            let what = format!("{test} {rope:?}: {}", describe(&case, split, budget, &plan));
            let mut inputs = case.device(&ctx);
            let mut out = poisoned(&ctx, case.out_len());
            decode_attention_rope(
                &ctx,
                &plan,
                &inputs.qkv.as_view(),
                rope,
                &mut inputs.k.as_view_mut(),
                &mut inputs.v.as_view_mut(),
                &inputs.tables.as_view(),
                &mut out.as_view_mut(),
                None,
            )
            .expect("decode_attention_rope");
            assert_close(&format!("{what}: out"), &download(&ctx, &out), &want, BF16_RTOL, ATOL);
            assert_pool_close(&format!("{what}: k"), &download(&ctx, &inputs.k), &want_k, ROPE_ATOL);
            assert_pool_close(&format!("{what}: v"), &download(&ctx, &inputs.v), &want_v, 0.0);
            assert_eq!(download(&ctx, &inputs.qkv), case.qkv, "{what}: qkv was written");
        }
    }
}

fn llama3_rope() -> RopeConfig {
    let scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192,
    };
    RopeConfig { theta: 500_000.0, style: RopeStyle::RotateHalf, scaling }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_attention_rope_matches_reference() {
    let gpu = gpu();
    let interleaved = RopeConfig { theta: 10_000.0, style: RopeStyle::Interleaved, scaling: RopeScaling::None };
    let linear =
        RopeConfig { theta: 1_000_000.0, style: RopeStyle::RotateHalf, scaling: RopeScaling::Linear { factor: 4.0 } };
    let splits = [KvSplit::Auto, KvSplit::Never];
    check_rope_on(&gpu, "rope gqa 32/8", gqa(), 16, &LENGTHS, llama3_rope(), &splits);
    check_rope_on(&gpu, "rope gqa 32/8 blocks of 8", gqa(), 8, &LENGTHS, interleaved, &[KvSplit::Auto]);
    check_rope_on(&gpu, "rope smollm2 9/3", smollm2(), 64, &LENGTHS, linear, &splits);
    check_rope_on(&gpu, "rope smollm2 9/3 interleaved", smollm2(), 32, &LENGTHS, interleaved, &[KvSplit::Auto]);
    // A group of 16 query heads: two items per KV head hold the new token, and both write it.
    let wide = QkvLayout { num_heads: 32, num_kv_heads: 2, head_dim: 64 };
    check_rope_on(&gpu, "rope group 16", wide, 32, &LENGTHS, linear, &[KvSplit::Auto]);
    check_rope_on(&gpu, "rope single", gqa(), 16, &[20000], llama3_rope(), &[KvSplit::Auto]);
    let portable = portable_gpu();
    check_rope_on(&portable, "portable rope gqa 32/8", gqa(), 16, &LENGTHS, llama3_rope(), &[KvSplit::Auto]);
    check_rope_on(&portable, "portable rope smollm2 9/3", smollm2(), 8, &LENGTHS, interleaved, &[KvSplit::Auto]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_attention_rope_rejects_bad_inputs() {
    let mut rng = rng("rope errors");
    let mut case = Case::new(&mut rng, gqa(), 16, &[40, 17]);
    clear_new_tokens(&mut case);
    let ctx = phase(Some(7));
    let plan = case.plan(&ctx, KvSplit::Auto);
    let mut inputs = case.device(&ctx);
    let mut out = poisoned(&ctx, case.out_len());
    let mut run = |ctx: &PhaseContext, k_len: usize, rope: RopeConfig| {
        decode_attention_rope(
            ctx,
            &plan,
            &inputs.qkv.as_view(),
            rope,
            &mut inputs.k.slice_mut(..k_len),
            &mut inputs.v.as_view_mut(),
            &inputs.tables.as_view(),
            &mut out.as_view_mut(),
            None,
        )
        .map_err(|e| e.kind())
    };
    let (rope, pool) = (llama3_rope(), case.cache.pool_len());
    // A bad RoPE (theta, llama3 factors), a short pool, another budget.
    assert_eq!(run(&ctx, pool, RopeConfig { theta: -1.0, ..rope }), Err(ErrorKind::Shape));
    let bad_scaling = RopeScaling::Llama3 {
        factor: 8.0,
        low_freq_factor: 4.0,
        high_freq_factor: 1.0,
        original_max_position_embeddings: 8192,
    };
    assert_eq!(run(&ctx, pool, RopeConfig { scaling: bad_scaling, ..rope }), Err(ErrorKind::Shape));
    assert_eq!(run(&ctx, pool - 8, rope), Err(ErrorKind::Shape));
    assert_eq!(run(&ctx.with_budget(phase(Some(8)).budget()), pool, rope), Err(ErrorKind::Unsupported));
    // The refused calls wrote nothing: the new tokens' slots still hold NaN.
    let unwritten = |inputs: &DeviceInputs| download(&ctx, &inputs.k).iter().filter(|x| x.is_nan()).count();
    assert_eq!(unwritten(&inputs), unwritten(&case.device(&ctx)));
}

/// Small enough for compute-sanitizer's memcheck and racecheck: a few sequences, one of them split.
#[test]
#[ignore = "needs a CUDA GPU"]
fn decode_attention_rope_for_sanitizers() {
    let gpu = gpu();
    check_rope_on(&gpu, "rope sanitizers d128", gqa(), 16, &[1, 17, 300, 3000], llama3_rope(), &[KvSplit::Auto]);
    let interleaved = RopeConfig { theta: 10_000.0, style: RopeStyle::Interleaved, scaling: RopeScaling::None };
    check_rope_on(&gpu, "rope sanitizers d64", smollm2(), 8, &[1, 17, 300, 3000], interleaved, &[KvSplit::Auto]);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn fixed_chunks_are_batch_invariant() {
    // Sequence 0 alone, and in a larger batch, with two budgets: bitwise the same output.
    let mut rng = rng("batch invariance");
    let layout = gqa();
    let big = Case::new(&mut rng, layout, 16, &[5000, 300, 7000, 17, 2500]);
    let split = KvSplit::Fixed(512);
    let setup = phase(None);
    let inputs = big.device(&setup);
    let row = layout.num_heads * layout.head_dim;
    let mut first: Option<Vec<f32>> = None;
    for (seqs, budget) in [(5, None), (5, Some(7)), (1, Some(64.min(gpu().sm_count()))), (3, Some(1))] {
        let ctx = phase(budget);
        let plan = DecodePlan::new(
            &ctx,
            layout,
            big.cache,
            &big.kv_lens[..seqs],
            &big.block_tables[..seqs * big.max_blocks],
            big.max_blocks,
            DecodeOptions { scale: big.scale, split },
        )
        .expect("plan");
        let mut out = poisoned(&ctx, seqs * row);
        decode_attention(
            &ctx,
            &plan,
            &inputs.qkv.slice(..seqs * layout.row_len()),
            &inputs.k.as_view(),
            &inputs.v.as_view(),
            &inputs.tables.slice(..seqs * big.max_blocks),
            &mut out.as_view_mut(),
            None,
        )
        .expect("decode_attention");
        let got = download(&ctx, &out)[..row].to_vec();
        match &first {
            None => first = Some(got),
            Some(f) => {
                let same = f.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "sequence 0 changed with {seqs} sequences, budget {budget:?}");
            }
        }
    }
    let want = big.reference();
    assert_close("batch invariance vs reference", first.as_deref().unwrap_or(&[]), &want[..row], BF16_RTOL, ATOL);
}

/// Captures one run of `plan` over `inputs` into `out` as a CUDA graph.
fn capture(ctx: &PhaseContext, plan: &DecodePlan, inputs: &DeviceInputs, out: &mut CudaSlice<bf16>) -> CudaGraph {
    ctx.capture(|| inputs.launch_decode(ctx, plan, out)).expect("capture decode_attention").0
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn runs_inside_a_cuda_graph() {
    let mut rng = rng("graph");
    let case = Case::new(&mut rng, gqa(), 16, &[4097, 100, 1]);
    let want = case.reference();
    let ctx = phase(Some(16));
    let inputs = case.device(&ctx);
    let plan = case.plan(&ctx, KvSplit::Auto);
    assert!(plan.num_split_seqs() > 0, "the graph should hold the merge kernel too");
    let mut out = poisoned(&ctx, case.out_len());
    let graph = capture(&ctx, &plan, &inputs, &mut out);
    for _ in 0..3 {
        graph.launch().expect("graph launch");
    }
    ctx.stream().synchronize().expect("sync");
    assert_close("graph replay", &download(&ctx, &out), &want, BF16_RTOL, ATOL);
}

/// A plan made with capacity, captured once, replays every batch it is updated to: split and
/// unsplit, shorter and longer, with new queries each time.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_graph_of_a_plan_with_capacity_replays_each_update() {
    let mut rng = rng("graph capacity");
    for (layout, budget) in [(gqa(), Some(16)), (smollm2(), None)] {
        // Every sequence owns blocks for 8192 tokens; the updates use prefixes of them.
        let mut case = Case::new(&mut rng, layout, 16, &[8192; 4]);
        let ctx = phase(budget);
        let mut inputs = case.device(&ctx);
        let options = DecodeOptions { scale: case.scale, split: KvSplit::Auto };
        let mut plan = DecodePlan::with_capacity(&ctx, case.layout, case.cache, 4, case.max_blocks, options)
            .expect("plan with capacity");
        let mut out = poisoned(&ctx, case.out_len());
        let graph = capture(&ctx, &plan, &inputs, &mut out);
        for lens in [[8192, 100, 4097, 1], [1, 1, 1, 1], [5000, 8192, 17, 16], [8192; 4], [1, 8000, 1, 1]] {
            case.kv_lens = lens.to_vec();
            case.qkv = random_bf16(&mut rng, case.qkv.len(), 3.0);
            let queries: Vec<bf16> = case.qkv.iter().map(|&v| bf16::from_f32(v)).collect();
            ctx.stream().memcpy_htod(&queries, &mut inputs.qkv).expect("queries");
            // The table goes in at this batch's width, into a cleared table of the plan's width.
            let width = lens.iter().map(|&l| (l as usize).div_ceil(case.cache.block_size)).max().unwrap_or(1);
            let compact: Vec<i32> =
                case.block_tables.chunks(case.max_blocks).flat_map(|r| r[..width].to_vec()).collect();
            ctx.stream().memcpy_htod(&vec![0i32; case.block_tables.len()], &mut inputs.tables).expect("clear");
            copy_rows_htod(ctx.stream(), &compact, width, &mut inputs.tables, case.max_blocks).expect("table");
            plan.update(&ctx, &case.kv_lens, &compact, width).expect("update");
            ctx.stream().memcpy_htod(&vec![bf16::NAN; case.out_len()], &mut out).expect("poison");
            graph.launch().expect("graph launch");
            let what = format!("{lens:?} {}", describe(&case, KvSplit::Auto, budget, &plan));
            assert_close(&what, &download(&ctx, &out), &case.reference(), BF16_RTOL, ATOL);
        }
        // An update must keep the batch size, and a plan made for one batch cannot be updated.
        assert!(plan.update(&ctx, &[1, 1], &case.block_tables[..2 * case.max_blocks], case.max_blocks).is_err());
        let mut fixed = case.plan(&ctx, KvSplit::Auto);
        let refused = fixed.update(&ctx, &case.kv_lens, &case.block_tables, case.max_blocks).map_err(|e| e.kind());
        assert_eq!(refused, Err(ErrorKind::Unsupported));
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn trace_shows_at_most_budget_ctas_on_distinct_sms() {
    let mut rng = rng("trace");
    let case = Case::new(&mut rng, smollm2(), 16, &[3000, 50, 9000, 1]);
    let want = case.reference();
    let sms = gpu().sm_count();
    for budget in [Some(7), None] {
        let ctx = phase(budget);
        let b = ctx.budget().get() as usize;
        let inputs = case.device(&ctx);
        let plan = case.plan(&ctx, KvSplit::Auto);
        let mut trace = ctx.stream().alloc_zeros::<u64>(6 * b).expect("alloc");
        let mut out = poisoned(&ctx, case.out_len());
        decode_attention(
            &ctx,
            &plan,
            &inputs.qkv.as_view(),
            &inputs.k.as_view(),
            &inputs.v.as_view(),
            &inputs.tables.as_view(),
            &mut out.as_view_mut(),
            Some(&mut trace.as_view_mut()),
        )
        .expect("decode_attention");
        assert_close("trace run", &download(&ctx, &out), &want, BF16_RTOL, ATOL);
        let t = ctx.stream().clone_dtoh(&trace).expect("download");
        for (kernel, rows, expected) in
            [("attention", &t[..3 * b], plan.grid() as usize), ("merge", &t[3 * b..], plan.merge_grid() as usize)]
        {
            let recorded: Vec<&[u64]> = rows.chunks(3).filter(|r| r[2] != 0).collect();
            assert_eq!(recorded.len(), expected, "{kernel}: CTAs that recorded, budget {b}");
            assert!(recorded.len() <= b, "{kernel}: {} CTAs for a budget of {b}", recorded.len());
            let mut sm_ids: Vec<u64> = recorded.iter().map(|r| r[0]).collect();
            assert!(sm_ids.iter().all(|&s| s < sms as u64), "{kernel}: SM id out of range");
            assert!(recorded.iter().all(|r| r[1] <= r[2]), "{kernel}: a CTA ended before it started");
            // The attention CTAs start together and each runs for microseconds, so each has its
            // own SM. (A merge CTA can end within a microsecond, and its SM could be reused.)
            if kernel == "attention" {
                sm_ids.sort_unstable();
                sm_ids.dedup();
                assert_eq!(sm_ids.len(), recorded.len(), "{kernel}: two CTAs shared an SM");
            }
        }
        assert!(plan.grid() as usize <= b && plan.merge_grid() as usize <= b);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn plan_and_launcher_reject_bad_inputs() {
    let mut rng = rng("errors");
    let layout = gqa();
    let case = Case::new(&mut rng, layout, 16, &[40, 17]);
    let ctx = phase(Some(7));
    let options = DecodeOptions::new(layout.head_dim);
    let plan_err =
        |lens: &[u32], tables: &[i32], max_blocks: usize, cache: PagedKvLayout, l: QkvLayout, o: DecodeOptions| {
            DecodePlan::new(&ctx, l, cache, lens, tables, max_blocks, o).expect_err("plan must fail").kind()
        };
    let (lens, tables, mb, cache) = (&case.kv_lens[..], &case.block_tables[..], case.max_blocks, case.cache);

    // Block ids outside the pool, negative, or a table too short for a sequence.
    let mut bad = tables.to_vec();
    bad[1] = cache.num_blocks as i32;
    assert_eq!(plan_err(lens, &bad, mb, cache, layout, options), ErrorKind::Shape);
    bad[1] = -1;
    assert_eq!(plan_err(lens, &bad, mb, cache, layout, options), ErrorKind::Shape);
    assert_eq!(plan_err(&[40, 17 + 16 * mb as u32], tables, mb, cache, layout, options), ErrorKind::Shape);
    // Zero-length sequence; table of the wrong length.
    assert_eq!(plan_err(&[40, 0], tables, mb, cache, layout, options), ErrorKind::Shape);
    assert_eq!(plan_err(lens, &tables[1..], mb, cache, layout, options), ErrorKind::Shape);
    // Unsupported head dim, block size, chunk; cache and layout that disagree.
    let d96 = QkvLayout { head_dim: 96, ..layout };
    let c96 = PagedKvLayout { head_dim: 96, ..cache };
    assert_eq!(plan_err(lens, tables, mb, c96, d96, options), ErrorKind::Unsupported);
    let bs4 = PagedKvLayout { block_size: 4, ..cache };
    assert_eq!(plan_err(lens, tables, mb, bs4, layout, options), ErrorKind::Unsupported);
    let odd_chunk = DecodeOptions { split: KvSplit::Fixed(40), ..options };
    assert_eq!(plan_err(lens, tables, mb, cache, layout, odd_chunk), ErrorKind::Unsupported);
    let other_heads = PagedKvLayout { num_kv_heads: 4, ..cache };
    assert_eq!(plan_err(lens, tables, mb, other_heads, layout, options), ErrorKind::Shape);

    // The launcher: wrong buffer lengths, another budget, a short trace.
    let plan = case.plan(&ctx, KvSplit::Auto);
    let inputs = case.device(&ctx);
    let mut out = poisoned(&ctx, case.out_len());
    let mut short_out = poisoned(&ctx, case.out_len() - 8);
    let run = |ctx: &PhaseContext,
               qkv: &CudaView<'_, bf16>,
               k: &CudaView<'_, bf16>,
               tables: &CudaView<'_, i32>,
               out: &mut CudaSlice<bf16>,
               trace: Option<&mut CudaSlice<u64>>| {
        let mut trace_view = trace.map(|t| t.as_view_mut());
        decode_attention(ctx, &plan, qkv, k, &inputs.v.as_view(), tables, &mut out.as_view_mut(), trace_view.as_mut())
            .map_err(|e| e.kind())
    };
    let (q, k, t) = (inputs.qkv.as_view(), inputs.k.as_view(), inputs.tables.as_view());
    assert_eq!(run(&ctx, &q.slice(8..), &k, &t, &mut out, None), Err(ErrorKind::Shape));
    assert_eq!(run(&ctx, &q, &k.slice(8..), &t, &mut out, None), Err(ErrorKind::Shape));
    assert_eq!(run(&ctx, &q, &k, &t.slice(1..), &mut out, None), Err(ErrorKind::Shape));
    assert_eq!(run(&ctx, &q, &k, &t, &mut short_out, None), Err(ErrorKind::Shape));
    let mut short_trace = ctx.stream().alloc_zeros::<u64>(3 * 7 - 1).expect("alloc");
    assert_eq!(run(&ctx, &q, &k, &t, &mut out, Some(&mut short_trace)), Err(ErrorKind::Shape));
    let other_budget = ctx.with_budget(phase(Some(8)).budget());
    assert_eq!(run(&other_budget, &q, &k, &t, &mut out, None), Err(ErrorKind::Unsupported));
    // And the good call still works after all that.
    assert_eq!(run(&ctx, &q, &k, &t, &mut out, None), Ok(()));
    assert_close("after errors", &download(&ctx, &out), &case.reference(), BF16_RTOL, ATOL);
}
