//! Paged prefill attention on tensor cores (`cuda/prefill_attention.cu`): a batch of prompt chunks
//! of different lengths, each query attending causally to its sequence's cached prefix and to the
//! chunk's earlier tokens — chunked prefill — all read from the paged K/V pools through the block
//! tables.
//!
//! Two families of kernels compute it. On Hopper, with blocks of 16 tokens or more, the default is
//! FlashAttention-3's structure: a producer thread copies K/V tiles with TMA while two consumer
//! warpgroups run wgmma on them (`prefill_attention_wgmma_d*`). Everywhere (and on Hopper on
//! request), FlashAttention-2's: 8 warps on mma.sync fed by cp.async.
//!
//! It is split into a host-side plan and a device-side run:
//!
//! - [`PrefillPlan::new`] checks the batch against the layouts (every block-table entry a sequence
//!   uses, query lengths, sizes), cuts the work into items — (sequence, KV head, up to 128 query
//!   rows, with the query heads of the KV head's GQA group packed into the rows) — sorts them
//!   longest first and uploads the list.
//! - [`prefill_attention`] launches at most the phase's CTA budget of persistent CTAs, which take
//!   items from an atomic counter in the plan. It allocates nothing, copies nothing and never
//!   synchronizes, so it can be captured in a CUDA graph; the kernel's last CTA resets the counter
//!   for the next launch.
//!
//! The reference is [`crate::reference::prefill_attention`].
//!
//! ```no_run
//! # fn main() -> nexus_kernels::Result<()> {
//! use nexus_kernels::prefill_attention::{prefill_attention, PrefillPlan};
//! use nexus_kernels::{AttentionBatch, Gpu, PagedKvLayout, PhaseContext, QkvLayout};
//! # let gpu = Gpu::new(0)?;
//! # let ctx = PhaseContext::new(gpu.clone(), gpu.new_stream()?, nexus_kernels::CtaBudget::all(&gpu));
//! let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
//! let cache = PagedKvLayout { num_blocks: 64, block_size: 16, num_kv_heads: 8, head_dim: 128 };
//! // One sequence: a chunk of 100 tokens over a cached prefix of 20 (120 tokens, 8 blocks).
//! let (q_indptr, kv_lens) = ([0u32, 100], [120u32]);
//! let block_tables: Vec<i32> = (0..8).collect();
//! let batch = AttentionBatch { q_indptr: &q_indptr, kv_lens: &kv_lens, block_tables: &block_tables, max_blocks_per_seq: 8 };
//! let plan = PrefillPlan::new(&ctx, batch, layout, cache)?;
//! # let s = ctx.stream();
//! # let qkv = s.alloc_zeros::<half::bf16>(100 * layout.row_len())?;
//! # let k = s.alloc_zeros::<half::bf16>(cache.pool_len())?;
//! # let v = s.alloc_zeros::<half::bf16>(cache.pool_len())?;
//! # let tables = s.clone_htod(&block_tables)?;
//! # let mut out = s.alloc_zeros::<half::bf16>(100 * 32 * 128)?;
//! prefill_attention(
//!     &ctx, &plan, &qkv.as_view(), &k.as_view(), &v.as_view(), &tables.as_view(),
//!     1.0 / (128f32).sqrt(), &mut out.as_view_mut(), None,
//! )?;
//! # Ok(())
//! # }
//! ```

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr};
use half::bf16;

use crate::error::ensure_shape;
use crate::gpu::{CtaBudget, PhaseContext, PtxTarget};
use crate::layout::{AttentionBatch, PagedKvLayout, QkvLayout};
use crate::tensor_map;
use crate::{Error, Result};

const MODULE: &str = "prefill_attention";
/// Query rows (token × head) per work item (`BLOCK_M` in the source).
const BLOCK_M: usize = 128;
/// `int`s per work item (an `int4` in the source).
const ITEM_INTS: usize = 4;
/// Rows of the smallest TMA box of the Hopper kernels (`MIN_BOX_ROWS`): a box lies in one cache
/// block, so they need blocks of at least this many tokens.
const MIN_BOX_ROWS: usize = 16;
/// Keys per K/V tile of the Hopper kernels (`HOPPER_KV_TILE`): the tallest box.
const HOPPER_KV_TILE: usize = 128;

/// How a kernel is built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Family {
    /// mma.sync, cp.async: 8 warps (`THREADS` in the source), every GPU from sm_80 on.
    Portable,
    /// wgmma, TMA: a producer warpgroup and two consumers (`HOPPER_THREADS`), sm_90a only, with
    /// tensor maps of the pools in boxes of a whole block up to [`HOPPER_KV_TILE`] rows (blocks
    /// of at least [`MIN_BOX_ROWS`] tokens).
    Hopper,
}

/// One compiled kernel: its family, head dim, K/V tile (tokens), pipeline stages, entry point,
/// and the TMA box heights (rows, [`box_rows`]) for which it is the default, `[from, to)`.
#[derive(Clone, Copy, Debug)]
struct Variant {
    family: Family,
    head_dim: usize,
    kv_tile: usize,
    stages: usize,
    name: &'static str,
    default_boxes: (usize, usize),
}

/// Any box height (and the portable kernels, which copy no boxes).
const ANY_BOXES: (usize, usize) = (0, usize::MAX);
/// Boxes from this many rows on make the pipelined Hopper kernel at d=128 the default.
const PIPELINED_MIN_BOX_ROWS: usize = 64;

/// Rows of the Hopper kernels' TMA boxes over a pool of `block_size`-token blocks: a whole block,
/// up to a K/V tile (`box_rows` in the source).
fn box_rows(block_size: usize) -> usize {
    block_size.min(HOPPER_KV_TILE)
}

/// Every kernel of the module; the first one a plan can run whose `default_boxes` hold the pool's
/// box height is its default (else the first it can run). `_pipelined` kernels compute the scores
/// of the next K/V tile before the softmax of the current one, so the tensor cores and the
/// exponentials overlap inside each warp (the Hopper one also gives its two consumer warpgroups the
/// tensor cores in alternate turns, as FlashAttention-3's ping-pong). The portable plain kernel at
/// d=128 measured 1-4% faster than its pipelined one on an H100
/// (bench-results/prefill_attention-h100.md). On the H200 the pipelined Hopper kernel consumes
/// tiles faster than its producer can copy them in boxes of 16 rows (one per block of 16 tokens,
/// 32 copies a tile): with blocks of 16 the plain kernel is 10-20% faster, with blocks of 64 (8
/// copies a tile) the pipelined one is 3-17% faster (causal 4k-16k and chunks,
/// bench-results/prefill_attention-h200.md).
const VARIANTS: &[Variant] = &[
    Variant {
        family: Family::Hopper,
        head_dim: 128,
        kv_tile: 128,
        stages: 2,
        name: "prefill_attention_wgmma_d128",
        default_boxes: (0, PIPELINED_MIN_BOX_ROWS),
    },
    Variant {
        family: Family::Hopper,
        head_dim: 128,
        kv_tile: 128,
        stages: 3,
        name: "prefill_attention_wgmma_d128_pipelined",
        default_boxes: (PIPELINED_MIN_BOX_ROWS, usize::MAX),
    },
    Variant {
        family: Family::Hopper,
        head_dim: 64,
        kv_tile: 128,
        stages: 4,
        name: "prefill_attention_wgmma_d64",
        default_boxes: ANY_BOXES,
    },
    Variant {
        family: Family::Hopper,
        head_dim: 64,
        kv_tile: 128,
        stages: 4,
        name: "prefill_attention_wgmma_d64_pipelined",
        default_boxes: ANY_BOXES,
    },
    Variant {
        family: Family::Portable,
        head_dim: 128,
        kv_tile: 64,
        stages: 3,
        name: "prefill_attention_d128_n64",
        default_boxes: ANY_BOXES,
    },
    Variant {
        family: Family::Portable,
        head_dim: 128,
        kv_tile: 64,
        stages: 4,
        name: "prefill_attention_d128_n64_pipelined",
        default_boxes: ANY_BOXES,
    },
    Variant {
        family: Family::Portable,
        head_dim: 64,
        kv_tile: 64,
        stages: 4,
        name: "prefill_attention_d64_n64_pipelined",
        default_boxes: ANY_BOXES,
    },
    Variant {
        family: Family::Portable,
        head_dim: 64,
        kv_tile: 128,
        stages: 3,
        name: "prefill_attention_d64_n128",
        default_boxes: ANY_BOXES,
    },
];

impl Variant {
    /// The kernels that run `head_dim` on `target` with blocks of `block_size` tokens, as
    /// `options` allow.
    fn available(
        head_dim: usize,
        target: PtxTarget,
        block_size: usize,
        options: PrefillOptions,
    ) -> impl Iterator<Item = Variant> {
        VARIANTS.iter().copied().filter(move |v| {
            v.head_dim == head_dim
                && match v.family {
                    Family::Portable => true,
                    Family::Hopper => {
                        !options.portable_only && target == PtxTarget::Sm90a && block_size.is_multiple_of(MIN_BOX_ROWS)
                    }
                }
        })
    }

    /// The kernel a plan runs by default: the first available one whose `default_boxes` hold the
    /// pool's box height, else the first available one.
    fn default_for(head_dim: usize, target: PtxTarget, block_size: usize, options: PrefillOptions) -> Option<Variant> {
        let boxes = box_rows(block_size);
        let mut available = Variant::available(head_dim, target, block_size, options);
        let first = available.next()?;
        let preferred = |v: &Variant| (v.default_boxes.0..v.default_boxes.1).contains(&boxes);
        Some(if preferred(&first) { first } else { available.find(preferred).unwrap_or(first) })
    }

    fn threads(&self) -> u32 {
        match self.family {
            Family::Portable => 256,
            Family::Hopper => 384,
        }
    }

    /// Dynamic shared memory. Portable: the Q tile, `stages` K and V tiles, and the two-int item
    /// mailbox. Hopper (`HopperConfig::SMEM_BYTES`): 1024 bytes of alignment slack, the Q tile, and
    /// `stages` K and V tiles.
    fn smem_bytes(&self) -> u32 {
        let bf16_bytes = 2;
        let tiles = (BLOCK_M + 2 * self.stages * self.kv_tile) * self.head_dim * bf16_bytes;
        (match self.family {
            Family::Portable => tiles + 16,
            Family::Hopper => 1024 + tiles,
        }) as u32
    }
}

/// Which kernels a [`PrefillPlan`] may run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefillOptions {
    /// Only the portable kernels (FlashAttention-2's structure, mma.sync), on Hopper too: the
    /// kernels every GPU runs, to compare against the Hopper ones or to fall back on.
    pub portable_only: bool,
}

/// The head dims the kernel is built for.
pub const HEAD_DIMS: [usize; 2] = [64, 128];

/// A batch of prompt chunks planned for [`prefill_attention`]: the checked shapes and the work
/// list on the device, sorted longest first.
///
/// A plan belongs to one batch: its query lengths, KV lengths and table width. The block-table
/// *contents* are read on the device at run time (so they may be rewritten between runs, e.g.
/// for a CUDA graph), but only entries the plan checked are meaningful; any id outside the pool
/// is clamped into it rather than read out of bounds.
///
/// Runs of one plan must not overlap: its work counter is shared by them. Launch them on one
/// stream (or order them), and give concurrent launches their own plans.
pub struct PrefillPlan {
    layout: QkvLayout,
    cache: PagedKvLayout,
    num_seqs: usize,
    num_tokens: usize,
    max_blocks_per_seq: usize,
    num_items: usize,
    flops: f64,
    variant: Variant,
    /// `[num_items, 4]` (at least one item's worth, so the buffer is never empty).
    items: CudaSlice<i32>,
    /// `[next item, CTAs finished]`, zero between launches.
    counters: CudaSlice<u32>,
    /// The kernels this plan can run: those of its head dim for its GPU and block size, as its
    /// options allow.
    target: PtxTarget,
    options: PrefillOptions,
}

impl std::fmt::Debug for PrefillPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefillPlan")
            .field("layout", &self.layout)
            .field("cache", &self.cache)
            .field("num_seqs", &self.num_seqs)
            .field("num_tokens", &self.num_tokens)
            .field("num_items", &self.num_items)
            .field("kernel", &self.variant.name)
            .finish()
    }
}

fn fits_i32(value: usize, what: &str) -> Result<()> {
    if value > i32::MAX as usize {
        return Err(Error::Unsupported(format!("{what} {value} does not fit in i32")));
    }
    Ok(())
}

impl PrefillPlan {
    /// Checks `batch` against the layouts and uploads its work list on `ctx`'s stream.
    ///
    /// Fails with [`Error::Shape`] when the batch is inconsistent (query rows beyond a sequence's
    /// KV length, a used block-table entry outside the pool, table or offset lengths, cache and
    /// QKV layouts that disagree) and with [`Error::Unsupported`] for head dims other than
    /// [`HEAD_DIMS`], more than 128 query heads per KV head, or sizes beyond `i32`.
    pub fn new(ctx: &PhaseContext, batch: AttentionBatch<'_>, layout: QkvLayout, cache: PagedKvLayout) -> Result<Self> {
        Self::with_options(ctx, batch, layout, cache, PrefillOptions::default())
    }

    /// [`PrefillPlan::new`] restricted to the kernels `options` allow.
    pub fn with_options(
        ctx: &PhaseContext,
        batch: AttentionBatch<'_>,
        layout: QkvLayout,
        cache: PagedKvLayout,
        options: PrefillOptions,
    ) -> Result<Self> {
        ensure_shape!(
            layout.num_kv_heads > 0 && layout.num_heads > 0 && layout.num_heads.is_multiple_of(layout.num_kv_heads),
            "prefill_attention: {} query heads are not a positive multiple of {} KV heads",
            layout.num_heads,
            layout.num_kv_heads
        );
        cache.check_holds(layout, "prefill_attention")?;
        let target = ctx.gpu().target();
        let variant = Variant::default_for(layout.head_dim, target, cache.block_size, options).ok_or_else(|| {
            Error::Unsupported(format!("prefill_attention: head dim {} (supported: {HEAD_DIMS:?})", layout.head_dim))
        })?;
        let group = layout.group_size();
        if group > BLOCK_M {
            return Err(Error::Unsupported(format!(
                "prefill_attention: {group} query heads per KV head (at most {BLOCK_M})"
            )));
        }
        cache.check(cache.pool_len(), cache.pool_len())?;
        batch.check(&cache)?;
        let num_tokens = batch.num_tokens();
        fits_i32(num_tokens, "tokens")?;
        fits_i32(cache.num_blocks * cache.block_size, "cache slots")?;
        fits_i32(layout.num_heads * layout.head_dim, "query width")?;
        if layout.num_kv_heads >= 1 << 23 {
            return Err(Error::Unsupported(format!("prefill_attention: {} KV heads", layout.num_kv_heads)));
        }

        // Items: per sequence, tiles of `tokens_per_item` consecutive queries, each for every KV
        // head. Cost ∝ the K/V tokens an item reads = its last query's position + 1.
        let tokens_per_item = BLOCK_M / group;
        let mut items: Vec<[i32; ITEM_INTS]> = Vec::new();
        let mut flops = 0f64;
        for seq in 0..batch.num_seqs() {
            let (start, end) = (batch.q_indptr[seq] as usize, batch.q_indptr[seq + 1] as usize);
            let kv_len = batch.kv_lens[seq] as usize;
            fits_i32(kv_len + BLOCK_M, "KV length")?;
            let q_len = end - start;
            let prefix = kv_len - q_len;
            let (c, p) = (q_len as f64, prefix as f64);
            flops += 4.0 * (layout.num_heads * layout.head_dim) as f64 * (c * p + c * (c + 1.0) / 2.0);
            for first in (0..q_len).step_by(tokens_per_item) {
                let tokens = tokens_per_item.min(q_len - first);
                for kv_head in 0..layout.num_kv_heads {
                    items.push([
                        (start + first) as i32,
                        (prefix + first) as i32,
                        seq as i32,
                        ((kv_head << 8) | tokens) as i32,
                    ]);
                }
            }
        }
        // Longest first (ties: sequence, then position, then head, so plans are reproducible).
        items.sort_by_key(|it| (std::cmp::Reverse(it[1] + (it[3] & 255)), it[2], it[1], it[3]));
        let num_items = items.len();
        let mut flat: Vec<i32> = items.into_iter().flatten().collect();
        if flat.is_empty() {
            flat.resize(ITEM_INTS, 0);
        }
        let stream = ctx.stream();
        Ok(PrefillPlan {
            layout,
            cache,
            num_seqs: batch.num_seqs(),
            num_tokens,
            max_blocks_per_seq: batch.max_blocks_per_seq,
            num_items,
            flops,
            variant,
            items: stream.clone_htod(&flat)?,
            counters: stream.alloc_zeros::<u32>(2)?,
            target,
            options,
        })
    }

    /// The compiled kernels that can run this plan, the default first: on Hopper with blocks of
    /// 16 tokens or more, `prefill_attention_wgmma_d*` (wgmma and TMA, K/V tiles of 128 tokens);
    /// then the portable ones, e.g. `prefill_attention_d128_n64` (head dim 128, K/V tiles of 64
    /// tokens; `_pipelined` variants overlap the next tile's scores with the current softmax). Any
    /// of them computes the same result; they differ in speed.
    pub fn kernels(&self) -> Vec<&'static str> {
        self.available().map(|v| v.name).collect()
    }

    /// Launches kernel `name` (one of [`PrefillPlan::kernels`]) instead of the default: a tuning
    /// knob for benchmarks and tests.
    pub fn set_kernel(&mut self, name: &str) -> Result<()> {
        let variant = self.available().find(|v| v.name == name);
        self.variant = variant.ok_or_else(|| {
            Error::Unsupported(format!(
                "prefill_attention: no kernel `{name}` for head dim {} and blocks of {} on this GPU",
                self.layout.head_dim, self.cache.block_size
            ))
        })?;
        Ok(())
    }

    fn available(&self) -> impl Iterator<Item = Variant> + use<> {
        Variant::available(self.layout.head_dim, self.target, self.cache.block_size, self.options)
    }

    /// The kernel this plan launches.
    pub fn kernel(&self) -> &'static str {
        self.variant.name
    }

    /// The K/V tile (tokens per pipeline stage) of the kernel this plan launches.
    pub fn kv_tile(&self) -> usize {
        self.variant.kv_tile
    }

    /// The QKV layout the plan was built for.
    pub fn layout(&self) -> QkvLayout {
        self.layout
    }

    /// The paged cache layout the plan was built for.
    pub fn cache(&self) -> PagedKvLayout {
        self.cache
    }

    /// Query rows (tokens) of the batch: rows of `qkv` and of `out`.
    pub fn num_tokens(&self) -> usize {
        self.num_tokens
    }

    /// Sequences of the batch.
    pub fn num_seqs(&self) -> usize {
        self.num_seqs
    }

    /// Work items: (sequence, KV head, up to 128 / group-size query tokens).
    pub fn num_items(&self) -> usize {
        self.num_items
    }

    /// The CTAs a run with `budget` launches: `min(budget, items)`, 0 when there is no work.
    pub fn ctas(&self, budget: CtaBudget) -> u32 {
        if self.num_items == 0 { 0 } else { budget.grid(self.num_items) }
    }

    /// Useful floating-point operations of a run: `4·H_q·d·Σ(C·P + C(C+1)/2)` over the chunks
    /// (C query tokens over a prefix of P), the causal half of the FlashAttention convention.
    pub fn flops(&self) -> f64 {
        self.flops
    }
}

fn check_aligned<T>(ctx: &PhaseContext, view: &impl DevicePtr<T>, what: &str) -> Result<()> {
    let (ptr, _record) = view.device_ptr(ctx.stream());
    ensure_shape!(ptr % 16 == 0, "prefill_attention: {what} is not 16-byte aligned");
    Ok(())
}

/// Causal attention of the batch `plan` was built for, into `out: [tokens, num_heads × head_dim]`.
///
/// Queries are the first `num_heads × head_dim` values of each row of the fused QKV buffer
/// `qkv: [tokens, layout.row_len()]`. Keys and values, the chunk's own included (write them with
/// [`crate::elementwise::rope_and_write_kv`] first), come from the pools `k_cache`/`v_cache`
/// (`[num_blocks, block_size, num_kv_heads, head_dim]`) through `block_tables:
/// [num_seqs, max_blocks_per_seq]`, which must hold the entries the plan checked. `scale` (positive)
/// multiplies the scores (usually `1/√head_dim`).
///
/// Launches `plan.ctas(ctx.budget())` CTAs on `ctx`'s stream, one per SM. `ctx` must run the
/// kernels of the GPU build the plan was made with (a plan made on Hopper may hold a kernel the
/// portable build lacks): [`Error::Shape`] otherwise. With `trace`
/// (at least `3 × budget` values), CTA `i` writes `[sm id, start ns, end ns]` (global timer) to
/// `trace[3i..3i + 3]`; entries of CTAs not launched are left alone.
#[allow(clippy::too_many_arguments)]
pub fn prefill_attention(
    ctx: &PhaseContext,
    plan: &PrefillPlan,
    qkv: &CudaView<'_, bf16>,
    k_cache: &CudaView<'_, bf16>,
    v_cache: &CudaView<'_, bf16>,
    block_tables: &CudaView<'_, i32>,
    scale: f32,
    out: &mut CudaViewMut<'_, bf16>,
    trace: Option<&mut CudaViewMut<'_, u64>>,
) -> Result<()> {
    ensure_shape!(
        ctx.gpu().target() == plan.target,
        "prefill_attention: the plan was made for {:?} kernels, the context runs {:?}",
        plan.target,
        ctx.gpu().target()
    );
    let (layout, cache) = (plan.layout, plan.cache);
    layout.check(qkv.len(), plan.num_tokens)?;
    cache.check(k_cache.len(), v_cache.len())?;
    ensure_shape!(
        block_tables.len() == plan.num_seqs * plan.max_blocks_per_seq,
        "prefill_attention: block_tables has {} entries, the plan {} x {}",
        block_tables.len(),
        plan.num_seqs,
        plan.max_blocks_per_seq
    );
    let q_width = layout.num_heads * layout.head_dim;
    ensure_shape!(
        out.len() == plan.num_tokens * q_width,
        "prefill_attention: out has {} values, expected [{}, {q_width}]",
        out.len(),
        plan.num_tokens
    );
    // The running max is taken over unscaled scores, which is the max of the scaled ones only
    // for a positive scale.
    ensure_shape!(scale.is_finite() && scale > 0.0, "prefill_attention: scale {scale} is not positive and finite");
    let budget = ctx.budget().get() as usize;
    if let Some(t) = &trace {
        ensure_shape!(
            t.len() >= 3 * budget,
            "prefill_attention: trace has {} values, a budget of {budget} needs {}",
            t.len(),
            3 * budget
        );
    }
    if plan.num_items == 0 {
        return Ok(());
    }
    check_aligned(ctx, qkv, "qkv")?;
    check_aligned(ctx, k_cache, "k_cache")?;
    check_aligned(ctx, v_cache, "v_cache")?;
    check_aligned(ctx, out, "out")?;

    let v = plan.variant;
    let grid = ctx.budget().grid(plan.num_items);
    let (f, cfg) = ctx.kernel(MODULE, v.name, grid, v.threads(), v.smem_bytes())?;
    let ints = [
        plan.num_items as i32,
        layout.num_heads as i32,
        layout.num_kv_heads as i32,
        cache.block_size.trailing_zeros() as i32,
        plan.max_blocks_per_seq.min(i32::MAX as usize) as i32,
        cache.num_blocks.min(i32::MAX as usize) as i32,
    ];
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let null_trace: u64 = 0;
    let stream = ctx.stream();
    let maps = match v.family {
        Family::Hopper => {
            let map = |ptr| tensor_map::pool_map(ptr, cache, box_rows(cache.block_size), 1);
            Some((map(k_cache.device_ptr(stream).0)?, map(v_cache.device_ptr(stream).0)?))
        }
        Family::Portable => None,
    };
    let mut launch = ctx.launch(&f);
    match &maps {
        Some((k_map, v_map)) => launch.arg(k_map).arg(v_map).arg(qkv),
        None => launch.arg(qkv).arg(k_cache).arg(v_cache),
    };
    launch
        .arg(block_tables)
        .arg(&plan.items)
        .arg(&ints[0])
        .arg(&plan.counters)
        .arg(out)
        .arg(&ints[1])
        .arg(&ints[2])
        .arg(&ints[3])
        .arg(&ints[4])
        .arg(&ints[5])
        .arg(&scale_log2);
    match trace {
        Some(t) => launch.arg(t),
        None => launch.arg(&null_trace),
    };
    // SAFETY: the arguments match `prefill_attention_d*` (the tensor maps first for
    // `prefill_attention_wgmma_d*`, in place of the pools) in cuda/prefill_attention.cu, and the
    // plan's kernel was built for this context's target (checked above). The plan checked every
    // block id its items read against the pool and the kernel clamps them anyway; the lengths of
    // qkv, the pools, the table and out are checked above against the plan, whose items stay
    // inside them; the tensor maps cover exactly the pools (rows outside them read as zeros);
    // `trace` holds a record for every CTA of the grid (<= budget).
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_name(head_dim: usize, target: PtxTarget, block_size: usize, portable_only: bool) -> &'static str {
        Variant::default_for(head_dim, target, block_size, PrefillOptions { portable_only }).expect("a kernel").name
    }

    /// On Hopper at d=128 the plain kernel takes 16- and 32-row boxes, the pipelined one 64 rows and
    /// up; blocks of 8 (no box fits) and portable-only plans take the portable kernels.
    #[test]
    fn the_default_kernel_follows_the_box_height() {
        let hopper = PtxTarget::Sm90a;
        for block_size in [16, 32] {
            assert_eq!(default_name(128, hopper, block_size, false), "prefill_attention_wgmma_d128");
        }
        for block_size in [64, 128, 256] {
            assert_eq!(default_name(128, hopper, block_size, false), "prefill_attention_wgmma_d128_pipelined");
        }
        assert_eq!(default_name(64, hopper, 128, false), "prefill_attention_wgmma_d64");
        assert_eq!(default_name(128, hopper, 8, false), "prefill_attention_d128_n64");
        assert_eq!(default_name(128, hopper, 64, true), "prefill_attention_d128_n64");
        assert_eq!(default_name(128, PtxTarget::Sm80, 64, false), "prefill_attention_d128_n64");
        assert!(Variant::default_for(96, hopper, 64, PrefillOptions::default()).is_none());
    }
}
