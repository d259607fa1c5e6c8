//! Paged decode attention on the GPU: one new query token per sequence over its paged K/V cache,
//! planned on the host ([`DecodePlan`]) and run on the device ([`decode_attention`], or
//! [`decode_attention_rope`], which first rotates and writes the step's new tokens into the cache:
//! one launch where RoPE with the KV write and the attention were two).
//!
//! The plan splits the batch into work items — one KV head of one sequence over one KV chunk,
//! for all the query heads that share that KV head (up to 8 per item, so each K/V byte is read once
//! for groups of up to 8) — and balances them over the CTA budget longest-first. When the
//! sequences × KV heads alone cannot fill the budget, long sequences are split into chunks of a
//! common length (a multiple of the block size, at least 256 tokens) whose partial results a
//! second, also budgeted, kernel merges; candidate splits are timed at the read bandwidth the
//! device measured for their busy CTAs ([`Gpu::model`](crate::Gpu::model)). The plan uploads its work lists and allocates its scratch
//! once; [`decode_attention`] then only launches (no allocation, no copy, no host synchronization),
//! so it can be captured in a CUDA graph, which stays valid as long as the plan lives.
//!
//! Kernel: `cuda/decode_attention.cu` (one CTA of 384 threads per SM: 4 producer warps streaming
//! K and V pages into a ring of ~190 KB of shared memory, on Hopper with one bulk tensor copy
//! (TMA) of K and one of V per 16-token slot, elsewhere with `cp.async`; 8 consumer warps running
//! `mma.sync` and an online softmax in f32).
//! The reference is
//! [`crate::reference::decode_attention`].
//!
//! # Batch invariance
//!
//! Given the same chunk boundaries, a sequence's output is bitwise the same whatever the rest of
//! the batch, the budget or the CTA its items land on: work inside an item is split over warps
//! relative to the item's start and combined in a fixed order, and split sequences are merged in
//! chunk order. [`KvSplit::Auto`] (the default) picks the chunk length per batch to fill the
//! budget, so outputs may differ in the last bf16 bit between batches; [`KvSplit::Fixed`] (or
//! [`KvSplit::Never`]) makes every sequence's result depend on that sequence alone.
//!
//! ```no_run
//! use nexus_kernels::decode_attention::{decode_attention, DecodeOptions, DecodePlan};
//! use nexus_kernels::{Gpu, PhaseContext, CtaBudget, PagedKvLayout, QkvLayout};
//! # fn main() -> nexus_kernels::Result<()> {
//! let gpu = Gpu::new(0)?;
//! let ctx = PhaseContext::new(gpu.clone(), gpu.new_stream()?, CtaBudget::new(64, &gpu)?);
//! let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
//! let cache = PagedKvLayout { num_blocks: 1024, block_size: 16, num_kv_heads: 8, head_dim: 128 };
//! let (kv_lens, max_blocks) = ([100u32, 4000], 256);
//! let block_tables: Vec<i32> = (0..2 * max_blocks as i32).collect();
//! let plan = DecodePlan::new(&ctx, layout, cache, &kv_lens, &block_tables, max_blocks, DecodeOptions::new(128))?;
//! let s = ctx.stream();
//! let qkv = s.alloc_zeros::<half::bf16>(2 * layout.row_len())?;
//! let (k, v) = (s.alloc_zeros::<half::bf16>(cache.pool_len())?, s.alloc_zeros::<half::bf16>(cache.pool_len())?);
//! let tables = s.clone_htod(&block_tables)?;
//! let mut out = s.alloc_zeros::<half::bf16>(2 * 32 * 128)?;
//! decode_attention(&ctx, &plan, &qkv.as_view(), &k.as_view(), &v.as_view(), &tables.as_view(), &mut out.as_view_mut(), None)?;
//! # Ok(()) }
//! ```

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use cudarc::driver::sys::CUdevice_attribute;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr};
use half::bf16;

use crate::elementwise::RopeArgs;
use crate::error::ensure_shape;
use crate::gpu::{BandwidthCurve, CtaBudget, Gpu, PhaseContext, PtxTarget};
use crate::layout::{PagedKvLayout, QkvLayout, RopeConfig};
use crate::tensor_map::{self, PANEL_DIMS, TensorMap};
use crate::{Error, Result};

const MODULE: &str = "decode_attention";
/// Threads of an attention launch of `ctas` CTAs for `head_dim` on `target`: the consumer warps
/// ([`consumer_warps`]) and 4 producer warps, or 8 for head dim 64 on Hopper below
/// [`WIDE_PRODUCERS_BELOW_CTAS`] CTAs (at most `max_threads<D>()` in the source). A Hopper
/// producer's cost is per slot, and a head-dim-64 slot of 16 tokens held half the bytes: measured
/// on the H200 then (9/3 d64, blocks of 64, 8 consumer warps, the build with 4 and with 8 producer
/// warps in one call), 8 streamed 4-16% faster at 8-48 CTAs on 32 x 2048 and 64 x 4096 tokens, and
/// 3-6% slower from 64 CTAs on, where the waiting warps slow the consumers more than the
/// producers limit them. Not measured again since the slots hold 32 tokens ([`slot_tokens`]).
fn attention_threads(head_dim: usize, target: PtxTarget, ctas: u32) -> u32 {
    let wide = head_dim == 64 && target == PtxTarget::Sm90a && ctas < WIDE_PRODUCERS_BELOW_CTAS;
    32 * (consumer_warps(head_dim, target) as u32 + if wide { 8 } else { 4 })
}

/// Consumer warps of the attention kernel (`consumer_warps<D>()` in the source): 8, or 12 for head
/// dim 64 on Hopper, where each token's softmax costs a warp the same instructions for half the
/// bytes of head dim 128 (with 32-token slots, 8 warps measured 5-19% slower at 8-32 SMs on the
/// H200).
fn consumer_warps(head_dim: usize, target: PtxTarget) -> usize {
    if head_dim == 64 && target == PtxTarget::Sm90a { 12 } else { 8 }
}

/// Tokens per ring slot (`slot_tokens<D>()` in the source): 32 for head dim 64 on Hopper, 16
/// (one mma tile) otherwise. A Hopper producer pays per bulk copy whatever its bytes, and 32
/// tokens of head dim 64 make copies of 4 KB, as 16 tokens of head dim 128 do.
fn slot_tokens(head_dim: usize, target: PtxTarget) -> usize {
    if head_dim == 64 && target == PtxTarget::Sm90a { 32 } else { 16 }
}

/// See [`attention_threads`].
const WIDE_PRODUCERS_BELOW_CTAS: u32 = 64;
/// Threads of the merge kernel (`MERGE_THREADS`); one warp merges one (sequence, head) row.
const MERGE_THREADS: u32 = 512;
/// The box of the Hopper producers' bulk copies, (token rows, 64-dim panels), for head dim
/// `head_dim` and blocks of `block_size`: the rows of one ring slot that lie in one block (the
/// slot's tokens, or the block size if less) of all panels, or of one panel for blocks of 8.
/// Where a slot spans several blocks the kernel copies one box per block and panel, so such
/// boxes must hold one panel (or the head dim have only one).
fn tma_box(head_dim: usize, block_size: usize) -> (usize, usize) {
    let tokens = slot_tokens(head_dim, PtxTarget::Sm90a);
    if block_size >= 16 { (block_size.min(tokens), head_dim / PANEL_DIMS) } else { (block_size, 1) }
}

/// The most tokens a ring slot holds ([`slot_tokens`]): chunk starts are multiples of it (and of
/// the block size), whatever the kernel.
const CHUNK_GRANULE: usize = 32;
/// Query heads per work item (`HEADS`): larger GQA groups take several items per KV head.
const HEADS: usize = 8;
/// Alignment of the ring in shared memory (`RING_ALIGN`): TMA's 128-byte swizzle pattern.
const RING_ALIGN: usize = 1024;
/// The shortest KV chunk the planner splits into, in tokens.
pub const MIN_CHUNK_TOKENS: usize = 256;
/// Ring slots are used in multiples of the consumer warps and of [`RING_SLOT_MULTIPLE`], between
/// these bounds. The kernel needs a multiple of 8: its producer warps (4 or 8) take the slots
/// round-robin, and on sm_80 its two producer warps per role take alternate slots, each keeping
/// up to `ring_slots / 2` slots of loads in flight, 4 at the least.
const RING_SLOT_MULTIPLE: usize = 8;
const MAX_RING_SLOTS: usize = 48;

/// How a plan splits the KV of long sequences into chunks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KvSplit {
    /// Choose per batch: no split when the sequences × KV heads already fill the budget, else the
    /// chunk length (a multiple of the block size and of 32, at least [`MIN_CHUNK_TOKENS`]) whose
    /// chunks, balanced longest-first, finish soonest. Results can then differ in the last bf16
    /// bit with the batch composition and the budget.
    #[default]
    Auto,
    /// Split every sequence longer than this many tokens into chunks of it (a positive multiple of
    /// 16 and of the block size). Every sequence's result then depends on itself only: batch
    /// invariant.
    Fixed(usize),
    /// Never split: one item per sequence and KV head (batch invariant too).
    Never,
}

/// What a plan computes, besides the batch itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeOptions {
    /// The softmax scale applied to `q · k` (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// How long sequences are split.
    pub split: KvSplit,
}

impl DecodeOptions {
    /// Scale `1 / sqrt(head_dim)`, [`KvSplit::Auto`].
    pub fn new(head_dim: usize) -> Self {
        DecodeOptions { scale: 1.0 / (head_dim as f32).sqrt(), split: KvSplit::Auto }
    }
}

/// A decode batch planned for one CTA budget: the work lists of the attention kernel, the merge
/// list, and the scratch for split sequences, all already on the device.
///
/// A plan is tied to its batch (sequence count and KV lengths, and the block-table entries it
/// validated: the device copy passed to [`decode_attention`] must hold the same), its layouts,
/// and its budget: running it on a context with another budget is refused — make a new plan.
/// One plan serves every layer of a forward pass (the layers differ only in their caches). Its
/// scratch is written by each run, so a plan must not be used by two runs in flight at once (on
/// two streams). It uploads its buffers on the stream of the context it was made with; run it on
/// that stream, or synchronize first.
pub struct DecodePlan {
    gpu: Arc<Gpu>,
    budget: CtaBudget,
    layout: QkvLayout,
    cache: PagedKvLayout,
    num_seqs: usize,
    max_blocks_per_seq: usize,
    scale: f32,
    split: KvSplit,
    /// `Some` for a plan made [`DecodePlan::with_capacity`]: the most chunks of split sequences
    /// its scratch holds.
    max_split_pieces: Option<usize>,
    chunk: Option<usize>,
    grid: u32,
    num_items: usize,
    num_split: usize,
    merge_grid: u32,
    ring_slots: usize,
    smem_bytes: u32,
    kv_tokens: usize,
    work_indptr: CudaSlice<i32>,
    items: CudaSlice<i32>,
    merge_items: CudaSlice<i32>,
    /// `[1]`: split sequences, read by the merge kernel.
    merge_count: CudaSlice<i32>,
    part_o: CudaSlice<f32>,
    part_lse: CudaSlice<f32>,
}

impl std::fmt::Debug for DecodePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DecodePlan")
            .field("budget", &self.budget.get())
            .field("num_seqs", &self.num_seqs)
            .field("layout", &self.layout)
            .field("chunk", &self.chunk)
            .field("grid", &self.grid)
            .field("num_items", &self.num_items)
            .field("num_split", &self.num_split)
            .field("ring_slots", &self.ring_slots)
            .finish()
    }
}

/// Shared memory of the attention kernel with `warps` consumer warps and `slots` ring slots
/// (`Layout` in the source), with the slack that aligns the ring to `RING_ALIGN` bytes.
fn smem_bytes(head_dim: usize, slot_tokens: usize, warps: usize, slots: usize) -> usize {
    let slot = 2 * slot_tokens * head_dim * 2;
    let obuf = warps * HEADS * (head_dim + 4) * 4;
    let ml = 2 * warps * HEADS * 4;
    // Per slot its `full` and `empty` barriers; and the `written` barrier of the RoPE's form.
    slots * (slot + 16) + 8 + obuf + ml + RING_ALIGN
}

/// The fewest ring slots the kernel with `warps` consumer warps takes, and the multiple its slot
/// count must be.
fn ring_slot_multiple(warps: usize) -> usize {
    let (mut a, mut b) = (warps, RING_SLOT_MULTIPLE);
    while b != 0 {
        (a, b) = (b, a % b);
    }
    warps / a * RING_SLOT_MULTIPLE
}

/// The most ring slots (a multiple of [`ring_slot_multiple`]) of `slot_tokens` tokens that fit in
/// `max_smem` bytes.
fn ring_slots(head_dim: usize, slot_tokens: usize, warps: usize, max_smem: usize) -> Option<usize> {
    let fixed = smem_bytes(head_dim, slot_tokens, warps, 0);
    let per_slot = smem_bytes(head_dim, slot_tokens, warps, 1) - fixed;
    let multiple = ring_slot_multiple(warps);
    let slots = (max_smem.checked_sub(fixed)? / per_slot).min(MAX_RING_SLOTS);
    let slots = slots - slots % multiple;
    (slots >= multiple).then_some(slots)
}

/// Checks a batch's lengths and block tables against the pool: the device cannot report a bad
/// block id.
fn check_batch(
    cache: PagedKvLayout,
    kv_lens: &[u32],
    block_tables: &[i32],
    num_seqs: usize,
    max_blocks_per_seq: usize,
) -> Result<()> {
    ensure_shape!(
        kv_lens.len() == num_seqs && block_tables.len() == num_seqs * max_blocks_per_seq,
        "decode attention: block_tables has {} entries, expected {} x {max_blocks_per_seq}",
        block_tables.len(),
        kv_lens.len()
    );
    for (i, &len) in kv_lens.iter().enumerate() {
        ensure_shape!(len > 0, "decode attention: sequence {i} has no KV tokens");
        let blocks = (len as usize).div_ceil(cache.block_size);
        ensure_shape!(
            blocks <= max_blocks_per_seq,
            "decode attention: sequence {i} needs {blocks} blocks, the table has {max_blocks_per_seq}"
        );
        let row = &block_tables[i * max_blocks_per_seq..][..blocks];
        if let Some(&bad) = row.iter().find(|&&b| b < 0 || b as usize >= cache.num_blocks) {
            return Err(Error::Shape(format!(
                "decode attention: sequence {i} uses block {bad}, the pool has {}",
                cache.num_blocks
            )));
        }
    }
    Ok(())
}

fn to_i32(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value)
        .map_err(|_| Error::Unsupported(format!("decode attention: {what} {value} does not fit in i32")))
}

impl DecodePlan {
    /// Plans the decode of `kv_lens.len()` sequences for the budget of `ctx` and uploads the plan
    /// on its stream. Sequence `i` has `kv_lens[i] >= 1` cached tokens (the new one included) in
    /// blocks `block_tables[i * max_blocks_per_seq ..]`; every block id it uses is checked to be
    /// inside the pool (the device cannot report a bad one). Head dims 64 and 128, block sizes
    /// 8 to 128 (powers of two). An empty batch gives a plan whose runs do nothing.
    pub fn new(
        ctx: &PhaseContext,
        layout: QkvLayout,
        cache: PagedKvLayout,
        kv_lens: &[u32],
        block_tables: &[i32],
        max_blocks_per_seq: usize,
        options: DecodeOptions,
    ) -> Result<Self> {
        let mut plan = Self::empty(ctx, layout, cache, kv_lens.len(), max_blocks_per_seq, options)?;
        check_batch(cache, kv_lens, block_tables, plan.num_seqs, max_blocks_per_seq)?;
        let work = schedule(
            kv_lens,
            layout,
            cache.block_size,
            plan.budget.get() as usize,
            options.split,
            usize::MAX,
            ctx.gpu().model().bandwidth(),
        )?;
        to_i32(work.items.len(), "work item ints")?;
        to_i32(work.partial_slots * layout.num_heads, "partial rows")?;
        let stream = ctx.stream();
        let upload = |v: &[i32]| -> Result<CudaSlice<i32>> {
            Ok(if v.is_empty() { stream.alloc_zeros::<i32>(1)? } else { stream.clone_htod(v)? })
        };
        let num_split = work.merge.len() / 4;
        let partial_rows = (work.partial_slots * layout.num_heads).max(1);
        plan.work_indptr = upload(&work.work_indptr)?;
        plan.items = upload(&work.items)?;
        plan.merge_items = upload(&work.merge)?;
        plan.merge_count = stream.clone_htod(&[num_split as i32])?;
        plan.part_o = stream.alloc_zeros::<f32>(partial_rows * layout.head_dim)?;
        plan.part_lse = stream.alloc_zeros::<f32>(partial_rows)?;
        plan.grid = (work.work_indptr.len().saturating_sub(1)) as u32;
        plan.merge_grid = plan.budget.grid((num_split * layout.num_heads).div_ceil((MERGE_THREADS / 32) as usize));
        plan.record(&work, kv_lens);
        Ok(plan)
    }

    /// A plan for any batch of `num_seqs` sequences of up to `max_blocks_per_seq` blocks, whose
    /// device buffers [`DecodePlan::update`] rewrites in place, and whose kernels always launch on
    /// the whole budget (CTAs without work return at once): a CUDA graph captured with it replays
    /// the batch of the latest update. Until the first update a run does nothing. Splits are
    /// limited to twice the budget in chunks, which is what the capacity of the scratch allows.
    pub fn with_capacity(
        ctx: &PhaseContext,
        layout: QkvLayout,
        cache: PagedKvLayout,
        num_seqs: usize,
        max_blocks_per_seq: usize,
        options: DecodeOptions,
    ) -> Result<Self> {
        ensure_shape!(num_seqs > 0, "decode attention: a plan with capacity needs at least one sequence");
        let mut plan = Self::empty(ctx, layout, cache, num_seqs, max_blocks_per_seq, options)?;
        let budget = plan.budget.get() as usize;
        let units = layout.num_kv_heads * layout.group_size().div_ceil(HEADS);
        let max_split_pieces = 2 * budget;
        let item_ints = (num_seqs + max_split_pieces) * units * 8;
        to_i32(item_ints, "work item ints")?;
        to_i32(max_split_pieces * layout.num_heads, "partial rows")?;
        let stream = ctx.stream();
        plan.work_indptr = stream.alloc_zeros::<i32>(budget + 1)?;
        plan.items = stream.alloc_zeros::<i32>(item_ints.max(1))?;
        plan.merge_items = stream.alloc_zeros::<i32>(4 * num_seqs.max(1))?;
        plan.merge_count = stream.alloc_zeros::<i32>(1)?;
        plan.part_o = stream.alloc_zeros::<f32>(max_split_pieces * layout.num_heads * layout.head_dim)?;
        plan.part_lse = stream.alloc_zeros::<f32>(max_split_pieces * layout.num_heads)?;
        plan.grid = budget as u32;
        plan.merge_grid = plan.budget.grid((num_seqs * layout.num_heads).div_ceil((MERGE_THREADS / 32) as usize));
        plan.max_split_pieces = Some(max_split_pieces);
        Ok(plan)
    }

    /// Replans a plan made by [`DecodePlan::with_capacity`] for a new batch of the same number
    /// of sequences and writes its work lists into the same device buffers, on the stream of
    /// `ctx` (which must be the plan's stream, with the plan's budget). A run launched before the
    /// update may still read the buffers: order them on the stream, as a graph replay after the
    /// update is. `block_tables: [num_seqs, table_width]` (`table_width` at most the plan's
    /// width) is checked as in [`DecodePlan::new`]; the device table a run reads keeps the plan's
    /// width and must hold these entries at the start of each row (see
    /// [`crate::gpu::copy_rows_htod`]).
    pub fn update(
        &mut self,
        ctx: &PhaseContext,
        kv_lens: &[u32],
        block_tables: &[i32],
        table_width: usize,
    ) -> Result<()> {
        let Some(max_split_pieces) = self.max_split_pieces else {
            return Err(Error::Unsupported("decode attention: only a plan made with_capacity can be updated".into()));
        };
        if ctx.budget() != self.budget || !Arc::ptr_eq(ctx.gpu(), &self.gpu) {
            return Err(Error::Unsupported("decode attention: update on another budget or device".into()));
        }
        ensure_shape!(
            kv_lens.len() == self.num_seqs,
            "decode attention: the plan holds {} sequences, the update {}",
            self.num_seqs,
            kv_lens.len()
        );
        ensure_shape!(
            table_width <= self.max_blocks_per_seq,
            "decode attention: a table of {table_width} blocks per sequence, the plan holds {}",
            self.max_blocks_per_seq
        );
        check_batch(self.cache, kv_lens, block_tables, self.num_seqs, table_width)?;
        let budget = self.budget.get() as usize;
        let mut work = schedule(
            kv_lens,
            self.layout,
            self.cache.block_size,
            budget,
            self.split,
            max_split_pieces,
            self.gpu.model().bandwidth(),
        )?;
        // Lists past the last used one are empty.
        let last = *work.work_indptr.last().unwrap_or(&0);
        work.work_indptr.resize(budget + 1, last);
        let stream = ctx.stream();
        let num_split = work.merge.len() / 4;
        stream.memcpy_htod(&work.work_indptr, &mut self.work_indptr.slice_mut(..budget + 1))?;
        if !work.items.is_empty() {
            stream.memcpy_htod(&work.items, &mut self.items.slice_mut(..work.items.len()))?;
        }
        if !work.merge.is_empty() {
            stream.memcpy_htod(&work.merge, &mut self.merge_items.slice_mut(..work.merge.len()))?;
        }
        stream.memcpy_htod(&[num_split as i32], &mut self.merge_count)?;
        self.record(&work, kv_lens);
        Ok(())
    }

    /// A plan with its checks done and no work yet (1-element buffers).
    fn empty(
        ctx: &PhaseContext,
        layout: QkvLayout,
        cache: PagedKvLayout,
        num_seqs: usize,
        max_blocks_per_seq: usize,
        options: DecodeOptions,
    ) -> Result<Self> {
        layout.check(0, 0)?;
        let d = layout.head_dim;
        if d != 64 && d != 128 {
            return Err(Error::Unsupported(format!("decode attention: head dim {d} (64 and 128 are built)")));
        }
        cache.check_holds(layout, "decode attention")?;
        let bs = cache.block_size;
        if !bs.is_power_of_two() || !(8..=128).contains(&bs) {
            return Err(Error::Unsupported(format!("decode attention: block size {bs} (powers of two 8 to 128)")));
        }
        ensure_shape!(cache.num_blocks > 0, "decode attention: the KV pool has no blocks");
        ensure_shape!(options.scale.is_finite(), "decode attention: softmax scale {} is not finite", options.scale);
        // Everything the kernel indexes with i32.
        to_i32(num_seqs, "sequence count")?;
        to_i32(max_blocks_per_seq, "max blocks per sequence")?;
        to_i32(layout.num_heads * d, "query width")?;
        to_i32(max_blocks_per_seq * bs + CHUNK_GRANULE, "KV length")?;
        to_i32(cache.num_blocks * bs, "KV pool rows")?; // TMA coordinates are i32

        let gpu = ctx.gpu().clone();
        let max_smem =
            gpu.context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        let (warps, tokens) = (consumer_warps(d, gpu.target()), slot_tokens(d, gpu.target()));
        let ring_slots = ring_slots(d, tokens, warps, max_smem as usize).ok_or_else(|| {
            Error::Unsupported(format!(
                "decode attention: a CTA may use {max_smem} bytes of shared memory, the kernel needs {}",
                smem_bytes(d, tokens, warps, ring_slot_multiple(warps))
            ))
        })?;
        let stream = ctx.stream();
        let one_int = || stream.alloc_zeros::<i32>(1);
        Ok(DecodePlan {
            budget: ctx.budget(),
            layout,
            cache,
            num_seqs,
            max_blocks_per_seq,
            scale: options.scale,
            split: options.split,
            max_split_pieces: None,
            chunk: None,
            grid: 0,
            num_items: 0,
            num_split: 0,
            merge_grid: 0,
            ring_slots,
            smem_bytes: smem_bytes(d, tokens, warps, ring_slots) as u32,
            kv_tokens: 0,
            work_indptr: one_int()?,
            items: one_int()?,
            merge_items: one_int()?,
            merge_count: one_int()?,
            part_o: stream.alloc_zeros::<f32>(1)?,
            part_lse: stream.alloc_zeros::<f32>(1)?,
            gpu,
        })
    }

    /// Keeps the figures of the batch `work` was planned for.
    fn record(&mut self, work: &Schedule, kv_lens: &[u32]) {
        self.chunk = work.chunk;
        self.num_items = work.items.len() / 8;
        self.num_split = work.merge.len() / 4;
        self.kv_tokens = kv_lens.iter().map(|&l| l as usize).sum();
    }

    /// The budget the plan was made for.
    pub fn budget(&self) -> CtaBudget {
        self.budget
    }

    /// The number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.num_seqs
    }

    /// The query/KV head layout.
    pub fn layout(&self) -> QkvLayout {
        self.layout
    }

    /// The KV cache layout.
    pub fn cache(&self) -> PagedKvLayout {
        self.cache
    }

    /// The KV chunk length sequences longer than it are split into; `None` when no sequence is split.
    pub fn chunk_tokens(&self) -> Option<usize> {
        self.chunk
    }

    /// CTAs the attention kernel launches (at most the budget).
    pub fn grid(&self) -> u32 {
        self.grid
    }

    /// Work items over all CTAs.
    pub fn num_items(&self) -> usize {
        self.num_items
    }

    /// Sequences split into several chunks (merged by the second kernel).
    pub fn num_split_seqs(&self) -> usize {
        self.num_split
    }

    /// CTAs the merge kernel launches (0 when no sequence is split, unless the plan was made
    /// [`DecodePlan::with_capacity`]: its graph must hold the merge for later updates).
    pub fn merge_grid(&self) -> u32 {
        if self.num_split == 0 && self.max_split_pieces.is_none() { 0 } else { self.merge_grid }
    }

    /// Shared-memory ring slots (16 tokens of K and V each) per CTA on this device.
    pub fn ring_slots(&self) -> usize {
        self.ring_slots
    }

    /// Bytes of K and V a run reads: `Σ 2 · kv_len · num_kv_heads · head_dim · 2`.
    pub fn kv_bytes(&self) -> usize {
        self.kv_tokens * 2 * self.cache.num_kv_heads * self.cache.head_dim * 2
    }
}

/// Decode attention of the batch planned in `plan`: row `i` of `out: [seqs, num_heads × head_dim]`
/// is the attention of sequence `i`'s query (the first `num_heads × head_dim` values of row `i` of
/// `qkv: [seqs, layout.row_len()]`) over its cached keys and values in the pools
/// `k_cache`/`v_cache` (`[num_blocks, block_size, num_kv_heads, head_dim]`), through
/// `block_tables: [seqs, max_blocks_per_seq]` — the device copy of the table the plan checked.
///
/// Launches the attention kernel on `plan.grid()` CTAs and, when some sequence is split, the merge
/// kernel on at most the budget; nothing else (CUDA-graph capturable). `ctx` must have the plan's
/// budget. `trace`, when given, must hold at least `3 × budget` values: CTA `c` of the attention
/// kernel writes `{sm id, start ns, end ns}` to `trace[3c..3c + 3]` (entries of CTAs not launched
/// are left as they are); if it holds `6 × budget`, the merge kernel's CTAs write theirs from
/// `3 × budget` on.
#[allow(clippy::too_many_arguments)]
pub fn decode_attention(
    ctx: &PhaseContext,
    plan: &DecodePlan,
    qkv: &CudaView<'_, bf16>,
    k_cache: &CudaView<'_, bf16>,
    v_cache: &CudaView<'_, bf16>,
    block_tables: &CudaView<'_, i32>,
    out: &mut CudaViewMut<'_, bf16>,
    trace: Option<&mut CudaViewMut<'_, u64>>,
) -> Result<()> {
    run(ctx, plan, qkv, Pools::Read(k_cache, v_cache), block_tables, out, trace)
}

/// [`crate::elementwise::rope_and_write_kv`] of the step's new tokens, then [`decode_attention`],
/// in one launch (two with the merge). Sequence `i`'s new token is row `i` of `qkv` (as the QKV
/// projection wrote it: nothing rotated, and left so) and the last of its KV, at position
/// `kv_len − 1`: each CTA first writes the rotated key and the value of the new tokens its work
/// items end with into the pools, at the slot the block table gives that position, then attends,
/// rotating the query heads as it loads them. The pools end up as `rope_and_write_kv` leaves them.
/// The other arguments and the trace are [`decode_attention`]'s. The reference is
/// [`crate::reference::decode_attention_rope`].
#[allow(clippy::too_many_arguments)]
pub fn decode_attention_rope(
    ctx: &PhaseContext,
    plan: &DecodePlan,
    qkv: &CudaView<'_, bf16>,
    rope: RopeConfig,
    k_cache: &mut CudaViewMut<'_, bf16>,
    v_cache: &mut CudaViewMut<'_, bf16>,
    block_tables: &CudaView<'_, i32>,
    out: &mut CudaViewMut<'_, bf16>,
    trace: Option<&mut CudaViewMut<'_, u64>>,
) -> Result<()> {
    run(ctx, plan, qkv, Pools::Write(k_cache, v_cache, rope), block_tables, out, trace)
}

/// The pools of a launch: read, or also written with the step's new tokens.
enum Pools<'p, 'k, 'v> {
    Read(&'p CudaView<'k, bf16>, &'p CudaView<'v, bf16>),
    Write(&'p mut CudaViewMut<'k, bf16>, &'p mut CudaViewMut<'v, bf16>, RopeConfig),
}

/// [`decode_attention`], or with `Pools::Write` [`decode_attention_rope`].
fn run(
    ctx: &PhaseContext,
    plan: &DecodePlan,
    qkv: &CudaView<'_, bf16>,
    mut pools: Pools<'_, '_, '_>,
    block_tables: &CudaView<'_, i32>,
    out: &mut CudaViewMut<'_, bf16>,
    mut trace: Option<&mut CudaViewMut<'_, u64>>,
) -> Result<()> {
    if ctx.budget() != plan.budget {
        return Err(Error::Unsupported(format!(
            "decode attention: the plan was made for a budget of {} CTAs, the context has {}: make a new plan",
            plan.budget.get(),
            ctx.budget().get()
        )));
    }
    if !Arc::ptr_eq(ctx.gpu(), &plan.gpu) {
        return Err(Error::Unsupported("decode attention: the plan was made on another device".into()));
    }
    let (layout, cache, n) = (plan.layout, plan.cache, plan.num_seqs);
    let d = layout.head_dim;
    layout.check(qkv.len(), n)?;
    let stream = ctx.stream();
    let (k_len, v_len, k_ptr, v_ptr) = match &pools {
        Pools::Read(k, v) => (k.len(), v.len(), k.device_ptr(stream).0, v.device_ptr(stream).0),
        Pools::Write(k, v, _) => (k.len(), v.len(), k.device_ptr(stream).0, v.device_ptr(stream).0),
    };
    cache.check(k_len, v_len)?;
    ensure_shape!(
        block_tables.len() == n * plan.max_blocks_per_seq,
        "decode attention: block_tables has {} entries, the plan {n} x {}",
        block_tables.len(),
        plan.max_blocks_per_seq
    );
    ensure_shape!(
        out.len() == n * layout.num_heads * d,
        "decode attention: out has {} values, expected [{n}, {}]",
        out.len(),
        layout.num_heads * d
    );
    let budget = plan.budget.get() as usize;
    if let Some(t) = trace.as_deref() {
        ensure_shape!(t.len() >= 3 * budget, "decode attention: trace has {} values, needs 3 x {budget}", t.len());
    }
    let rope = match &pools {
        Pools::Read(..) => None,
        Pools::Write(_, _, rope) => {
            rope.check()?;
            Some(RopeArgs::new(*rope))
        }
    };
    if n == 0 {
        return Ok(());
    }
    // The RoPE's kernel copies the value heads 16 bytes at a time.
    let qkv_align = if rope.is_some() { 16 } else { 4 };
    for (ptr, align, what) in [
        (qkv.device_ptr(stream).0, qkv_align, "qkv"),
        (k_ptr, 16, "k_cache"),
        (v_ptr, 16, "v_cache"),
        (out.device_ptr(stream).0, 8, "out"),
    ] {
        ensure_shape!(ptr % align == 0, "decode attention: {what} is not {align}-byte aligned");
    }

    let ints = [
        to_i32(layout.num_heads, "heads")?,
        to_i32(layout.num_kv_heads, "KV heads")?,
        to_i32(plan.max_blocks_per_seq, "max blocks")?,
        cache.block_size.trailing_zeros() as i32,
        plan.ring_slots as i32,
    ];
    let scale_log2 = plan.scale * std::f32::consts::LOG2_E;
    let null = 0u64;
    let (k_map, v_map) = match ctx.gpu().target() {
        PtxTarget::Sm90a => {
            let (rows, panels) = tma_box(d, cache.block_size);
            let map = |ptr| tensor_map::pool_map(ptr, cache, rows, panels);
            (map(k_ptr)?, map(v_ptr)?)
        }
        PtxTarget::Sm80 => (TensorMap::unused(), TensorMap::unused()),
    };
    let (name, merge_name) = match (d, rope.is_some()) {
        (64, false) => ("decode_attention_d64", "decode_attention_merge_d64"),
        (64, true) => ("decode_attention_rope_d64", "decode_attention_merge_d64"),
        (_, false) => ("decode_attention_d128", "decode_attention_merge_d128"),
        (_, true) => ("decode_attention_rope_d128", "decode_attention_merge_d128"),
    };
    {
        let threads = attention_threads(d, ctx.gpu().target(), plan.grid);
        let (f, cfg) = ctx.kernel(MODULE, name, plan.grid, threads, plan.smem_bytes)?;
        let mut launch = ctx.launch(&f);
        launch.arg(&k_map).arg(&v_map).arg(qkv);
        match &mut pools {
            Pools::Read(k, v) => launch.arg(*k).arg(*v),
            Pools::Write(k, v, _) => launch.arg(&mut **k).arg(&mut **v),
        };
        launch
            .arg(block_tables)
            .arg(&plan.work_indptr)
            .arg(&plan.items)
            .arg(&plan.part_o)
            .arg(&plan.part_lse)
            .arg(&mut *out);
        for v in &ints {
            launch.arg(v);
        }
        launch.arg(&scale_log2);
        if let Some(rope) = &rope {
            rope.push(&mut launch);
        }
        match trace.as_deref_mut() {
            Some(t) => launch.arg(t),
            None => launch.arg(&null),
        };
        // SAFETY: the arguments match `decode_attention_d{64,128}` (or, with the new tokens,
        // `decode_attention_rope_d{64,128}`) in cuda/decode_attention.cu. The plan's items stay
        // inside the sequences it checked (lengths and block ids), whose shapes were checked
        // against the buffers above (the tensor maps describe those same pools, so TMA boxes of
        // whole blocks stay inside them), and the new tokens' slots are those of the checked
        // block ids; the trace holds the grid's 3 values per CTA.
        unsafe { launch.launch(cfg) }?;
    }
    if plan.merge_grid() > 0 {
        let (f, cfg) = ctx.kernel(MODULE, merge_name, plan.merge_grid, MERGE_THREADS, 0)?;
        let mut merge_trace = match trace {
            Some(t) if t.len() >= 6 * budget => Some(t.slice_mut(3 * budget..)),
            _ => None,
        };
        let mut launch = ctx.launch(&f);
        launch
            .arg(&plan.part_o)
            .arg(&plan.part_lse)
            .arg(&plan.merge_items)
            .arg(&plan.merge_count)
            .arg(&ints[0])
            .arg(&mut *out);
        match merge_trace.as_mut() {
            Some(t) => launch.arg(t),
            None => launch.arg(&null),
        };
        // SAFETY: the arguments match `decode_attention_merge_d{64,128}`; the merge list indexes
        // the plan's scratch and rows of `out` checked above.
        unsafe { launch.launch(cfg) }?;
    }
    Ok(())
}

/// The work of one plan, as the kernels read it.
#[derive(Debug)]
struct Schedule {
    /// The chunk length of split sequences (`None`: none is split).
    chunk: Option<usize>,
    /// `[ctas + 1]`: CTA `c` runs items `work_indptr[c] .. work_indptr[c + 1]`.
    work_indptr: Vec<i32>,
    /// 8 ints per item: seq, kv_start, kv_end, kv_head, first query head, query heads, chunk slot
    /// (-1: write `out` directly), the sequence's last position (its new token's, which
    /// `decode_attention_rope_d*` rotates by).
    items: Vec<i32>,
    /// 4 ints per split sequence: seq, first chunk slot, chunks, 0.
    merge: Vec<i32>,
    /// Chunk slots of the scratch (`[slots, num_heads, head_dim]`).
    partial_slots: usize,
}

/// Fixed costs of the planner's model, which otherwise times the streaming of K/V at the
/// bandwidth the device's measured curve gives (only the ranking of candidate splits depends on
/// them).
mod model {
    /// Fixed cost of an item (start, combine of the warps, output), in bytes of K/V.
    pub const ITEM_BYTES: f64 = 4096.0;
    /// Fixed cost of the merge launch (s).
    pub const MERGE_SECONDS: f64 = 4e-6;
}

/// One candidate split of the batch: its pieces (sequence chunks) sorted longest first.
struct Candidate {
    chunk: Option<usize>,
    /// (cost in bytes, seq, chunk start, chunk end, chunk index)
    pieces: Vec<(f64, usize, usize, usize, usize)>,
    /// Pieces of sequences split into several chunks (each writes a partial result).
    split_pieces: usize,
}

fn candidate(kv_lens: &[u32], chunk: Option<usize>, bytes_per_token: f64) -> Candidate {
    let mut pieces = Vec::new();
    let mut split_pieces = 0;
    for (seq, &len) in kv_lens.iter().enumerate() {
        let len = len as usize;
        let c = chunk.unwrap_or(len).max(1);
        let chunks = len.div_ceil(c);
        if chunks > 1 {
            split_pieces += chunks;
        }
        for k in 0..chunks {
            let (start, end) = (k * c, ((k + 1) * c).min(len));
            pieces.push(((end - start) as f64 * bytes_per_token + model::ITEM_BYTES, seq, start, end, k));
        }
    }
    // Longest first; ties in batch order, so the plan is a function of its inputs.
    pieces.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.4).cmp(&(b.1, b.4))));
    Candidate { chunk, pieces, split_pieces }
}

/// Longest-processing-time assignment of `costs` (sorted, longest first) to `ctas` CTAs: for each
/// cost, the CTA it goes to (the least loaded so far, the lowest index on ties); and every CTA's
/// load.
fn lpt(costs: impl Iterator<Item = f64>, ctas: usize) -> (Vec<usize>, Vec<f64>) {
    // Loads are compared as integers (bytes) so that the heap order is total and exact.
    let mut heap: BinaryHeap<Reverse<(u64, usize)>> = (0..ctas).map(|c| Reverse((0, c))).collect();
    let mut loads = vec![0u64; ctas];
    let mut assignment = Vec::new();
    for cost in costs {
        let Some(Reverse((load, cta))) = heap.pop() else { break };
        let load = load + cost as u64;
        loads[cta] = load;
        assignment.push(cta);
        heap.push(Reverse((load, cta)));
    }
    (assignment, loads.into_iter().map(|l| l as f64).collect())
}

/// Seconds to stream per-CTA `loads` (bytes) when the CTAs still busy share the bandwidth
/// `curve` gives that many SMs equally, each at most the per-SM rate: the least-loaded CTAs finish
/// first and leave the tail to fewer, each faster, up to the per-SM limit.
fn stream_seconds(mut loads: Vec<f64>, curve: &BandwidthCurve) -> f64 {
    loads.retain(|&l| l > 0.0);
    loads.sort_by(f64::total_cmp);
    let (mut t, mut done) = (0.0, 0.0);
    for (k, &load) in loads.iter().enumerate() {
        let busy = loads.len() - k;
        let rate = curve.per_sm().min(curve.at(busy as u32) / busy as f64);
        t += (load - done) / rate;
        done = load;
    }
    t
}

/// All K/V bytes of the batch (with the per-item cost of unsplit items).
fn unsplit_bytes(kv_lens: &[u32], bytes_per_token: f64, units: usize) -> f64 {
    kv_lens.iter().map(|&l| l as f64 * bytes_per_token + model::ITEM_BYTES).sum::<f64>() * units as f64
}

/// Estimated seconds of a candidate on `ctas` CTAs (`units` items per piece: KV heads × head
/// groups; `partial_bytes` written and read back per split piece) on a device reading `curve`:
/// streaming its LPT loads, plus the merge when it splits.
fn estimate(c: &Candidate, units: usize, ctas: usize, partial_bytes: f64, curve: &BandwidthCurve) -> f64 {
    let (_, loads) = lpt(c.pieces.iter().flat_map(|p| std::iter::repeat_n(p.0, units)), ctas);
    let mut t = stream_seconds(loads, curve);
    if c.split_pieces > 0 {
        t += model::MERGE_SECONDS + c.split_pieces as f64 * partial_bytes / curve.at(ctas as u32);
    }
    t
}

/// Plans the work of a batch: chooses the chunk length (ranking candidates by their time at the
/// bandwidth `curve` gives their busy CTAs) and assigns items to CTAs, splitting sequences into at
/// most `max_split_pieces` chunks in all.
fn schedule(
    kv_lens: &[u32],
    layout: QkvLayout,
    block_size: usize,
    ctas: usize,
    split: KvSplit,
    max_split_pieces: usize,
    curve: &BandwidthCurve,
) -> Result<Schedule> {
    let d = layout.head_dim;
    let group = layout.group_size();
    let head_groups = group.div_ceil(HEADS);
    let units = layout.num_kv_heads * head_groups;
    let granule = block_size.max(CHUNK_GRANULE);
    let max_len = kv_lens.iter().map(|&l| l as usize).max().unwrap_or(0);
    let bytes_per_token = (4 * d) as f64;

    let chosen = match split {
        KvSplit::Never => candidate(kv_lens, None, bytes_per_token),
        KvSplit::Fixed(c) => {
            if c == 0 || c % granule != 0 {
                return Err(Error::Unsupported(format!(
                    "decode attention: chunk of {c} tokens is not a positive multiple of {granule} (32 and the block size)"
                )));
            }
            let cand = candidate(kv_lens, (c < max_len).then_some(c), bytes_per_token);
            if cand.split_pieces > max_split_pieces {
                return Err(Error::Unsupported(format!(
                    "decode attention: chunks of {c} tokens split the batch into {} pieces, the plan holds {max_split_pieces}",
                    cand.split_pieces
                )));
            }
            cand
        }
        KvSplit::Auto => {
            // Chunk lengths 2^k and 3 · 2^(k-1) times the minimum, rounded up to the granule...
            let min_chunk = MIN_CHUNK_TOKENS.div_ceil(granule) * granule;
            let mut lengths = Vec::new();
            let mut c = min_chunk;
            while c < max_len {
                lengths.push(c);
                let c3 = (c * 3 / 2).div_ceil(granule) * granule;
                if c3 < max_len {
                    lengths.push(c3);
                }
                c *= 2;
            }
            // And the lengths that cut the longest sequence into 2 to 16 equal chunks.
            for n in 2..=16 {
                let c = max_len.div_ceil(n).div_ceil(granule) * granule;
                if c >= min_chunk && c < max_len {
                    lengths.push(c);
                }
            }
            lengths.sort_unstable_by(|a, b| b.cmp(a));
            lengths.dedup();
            let partial_bytes = (group * d * 4 * 2) as f64 * layout.num_kv_heads as f64;
            // (estimated seconds, CTAs busy, candidate), unsplit first, then longest chunks first.
            let mut scored = Vec::new();
            let unsplit = candidate(kv_lens, None, bytes_per_token);
            scored.push((
                estimate(&unsplit, units, ctas, partial_bytes, curve),
                (unsplit.pieces.len() * units).min(ctas),
                unsplit,
            ));
            // Splitting cannot beat streaming every byte at the budget's full bandwidth; skip it
            // when the unsplit items already come within 2% of that.
            let bound = unsplit_bytes(kv_lens, bytes_per_token, units) / curve.at(ctas as u32);
            if scored[0].0 > bound * 1.02 {
                for &c in &lengths {
                    let pieces: usize = kv_lens.iter().map(|&l| (l as usize).div_ceil(c)).sum();
                    if pieces * units > 32 * ctas {
                        break; // shorter chunks only add items
                    }
                    let cand = candidate(kv_lens, Some(c), bytes_per_token);
                    if cand.split_pieces > max_split_pieces {
                        break; // shorter chunks only add pieces
                    }
                    scored.push((estimate(&cand, units, ctas, partial_bytes, curve), (pieces * units).min(ctas), cand));
                }
            }
            // Within 2% of the fastest estimate, keep the most CTAs busy (the model's bandwidth
            // curve is the least certain part), then the fewest items.
            let fastest = scored.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
            let mut best: Option<(f64, usize, Candidate)> = None;
            for s in scored {
                if s.0 <= fastest * 1.02 && best.as_ref().is_none_or(|b| s.1 > b.1) {
                    best = Some(s);
                }
            }
            match best {
                Some((_, _, c)) => c,
                None => candidate(kv_lens, None, bytes_per_token),
            }
        }
    };

    // Chunk slots of the split sequences, in sequence order.
    let mut first_slot = vec![-1i64; kv_lens.len()];
    let mut merge = Vec::new();
    let mut partial_slots = 0usize;
    let chunk = chosen.chunk.filter(|&c| kv_lens.iter().any(|&l| l as usize > c));
    if let Some(c) = chunk {
        for (seq, &len) in kv_lens.iter().enumerate() {
            let chunks = (len as usize).div_ceil(c);
            if chunks > 1 {
                first_slot[seq] = partial_slots as i64;
                merge.extend([seq as i32, partial_slots as i32, chunks as i32, 0]);
                partial_slots += chunks;
            }
        }
    }

    // Items: every piece × KV head × head group, longest first, onto the least-loaded CTA.
    let mut per_cta: Vec<Vec<[i32; 8]>> = vec![Vec::new(); ctas];
    let costs = chosen.pieces.iter().flat_map(|p| std::iter::repeat_n(p.0, units));
    let (assignment, _) = lpt(costs, ctas);
    let mut next = assignment.into_iter();
    for &(_, seq, start, end, k) in &chosen.pieces {
        let partial = if first_slot[seq] >= 0 { (first_slot[seq] + k as i64) as i32 } else { -1 };
        for kv_head in 0..layout.num_kv_heads {
            for hg in 0..head_groups {
                let q_head = kv_head * group + hg * HEADS;
                let heads = HEADS.min(group - hg * HEADS);
                let cta = next.next().unwrap_or(0);
                per_cta[cta].push([
                    seq as i32,
                    start as i32,
                    end as i32,
                    kv_head as i32,
                    q_head as i32,
                    heads as i32,
                    partial,
                    kv_lens[seq] as i32 - 1,
                ]);
            }
        }
    }
    // LPT fills CTAs 0, 1, ... first, so the non-empty lists are a prefix.
    let used = per_cta.iter().take_while(|l| !l.is_empty()).count();
    let mut work_indptr = Vec::with_capacity(used + 1);
    let mut items = Vec::new();
    work_indptr.push(0);
    for list in &per_cta[..used] {
        for item in list {
            items.extend_from_slice(item);
        }
        work_indptr.push((items.len() / 8) as i32);
    }
    Ok(Schedule { chunk, work_indptr, items, merge, partial_slots })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::gpu::measured::{h100, h200};

    fn layout(h: usize, kv: usize, d: usize) -> QkvLayout {
        QkvLayout { num_heads: h, num_kv_heads: kv, head_dim: d }
    }

    /// Checks that a schedule covers every (sequence, query head, token) exactly once, with chunk
    /// starts on the granule, consistent chunk slots, each sequence's last position in its items,
    /// and at most `ctas` lists.
    fn check(s: &Schedule, kv_lens: &[u32], l: QkvLayout, block_size: usize, ctas: usize) {
        let granule = block_size.max(CHUNK_GRANULE);
        let used = s.work_indptr.len() - 1;
        assert!(used <= ctas && used >= 1.min(kv_lens.len()));
        assert!(s.work_indptr.windows(2).all(|w| w[0] < w[1]), "empty or decreasing list");
        assert_eq!(*s.work_indptr.last().unwrap() as usize * 8, s.items.len());
        let mut covered: Vec<Vec<u64>> = kv_lens.iter().map(|_| vec![0; l.num_heads]).collect();
        let mut slots_seen = vec![false; s.partial_slots];
        for it in s.items.chunks(8) {
            let (seq, start, end, kvh, qh, nh, partial) =
                (it[0] as usize, it[1] as usize, it[2] as usize, it[3] as usize, it[4] as usize, it[5] as usize, it[6]);
            assert!(start < end && end <= kv_lens[seq] as usize);
            assert_eq!(it[7], kv_lens[seq] as i32 - 1, "an item carries its sequence's last position");
            assert_eq!(start % granule, 0);
            assert!((1..=HEADS).contains(&nh) && qh >= kvh * l.group_size() && qh + nh <= (kvh + 1) * l.group_size());
            let whole = start == 0 && end == kv_lens[seq] as usize;
            assert_eq!(partial < 0, whole, "only split sequences use the scratch");
            if let (Some(c), false) = (s.chunk, whole) {
                assert!(end - start <= c);
            }
            if partial >= 0 {
                slots_seen[partial as usize] = true;
            }
            for tokens in &mut covered[seq][qh..qh + nh] {
                *tokens += (end - start) as u64;
            }
        }
        for (seq, heads) in covered.iter().enumerate() {
            for &tokens in heads {
                assert_eq!(tokens, kv_lens[seq] as u64, "sequence {seq} covered {tokens} tokens");
            }
        }
        assert!(slots_seen.iter().all(|&x| x));
        for m in s.merge.chunks(4) {
            let (seq, first, chunks) = (m[0] as usize, m[1] as usize, m[2] as usize);
            assert_eq!(chunks, (kv_lens[seq] as usize).div_ceil(s.chunk.unwrap()));
            assert!(first + chunks <= s.partial_slots);
        }
    }

    #[test]
    fn schedules_cover_every_token_once() {
        let lens: Vec<u32> = vec![1, 15, 16, 17, 100, 1000, 4097, 8192];
        for device in [h100(), h200()] {
            for &(h, kv, d) in &[(32, 8, 128), (9, 3, 64), (8, 8, 128), (64, 4, 64)] {
                let l = layout(h, kv, d);
                for &bs in &[8, 16, 32, 128] {
                    for &ctas in &[1, 7, 64, 132] {
                        for split in [KvSplit::Auto, KvSplit::Never, KvSplit::Fixed(bs.max(16) * 16)] {
                            let s = schedule(&lens, l, bs, ctas, split, usize::MAX, device.bandwidth()).unwrap();
                            check(&s, &lens, l, bs, ctas);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn auto_splits_only_when_the_batch_cannot_fill_the_budget() {
        let l = layout(32, 8, 128);
        for device in [h100(), h200()] {
            let curve = device.bandwidth();
            // One long sequence: 8 items would leave most of 132 CTAs idle.
            let s = schedule(&[4096], l, 16, 132, KvSplit::Auto, usize::MAX, curve).unwrap();
            let c = s.chunk.expect("split");
            assert!(c >= MIN_CHUNK_TOKENS && c.is_multiple_of(16));
            assert!(s.work_indptr.len() > 64, "{} CTAs used", s.work_indptr.len() - 1);
            // 64 x 4096 with 8 KV heads: 512 equal items already fill 64 or 132 CTAs.
            let lens = vec![4096u32; 64];
            for ctas in [64, 132] {
                let s = schedule(&lens, l, 16, ctas, KvSplit::Auto, usize::MAX, curve).unwrap();
                assert_eq!(s.chunk, None);
                assert_eq!(s.work_indptr.len() - 1, ctas);
            }
        }
    }

    /// The H200 needs more SMs than the H100 to come near its full bandwidth (16 SMs read 38% of
    /// it against 61% on the H100, 64 SMs 94% against 98%), so batches whose unsplit items fill
    /// 16 or 64 CTAs are split over the whole budget there and left whole on the H100.
    #[test]
    fn the_h200_curve_splits_what_the_h100_leaves_whole() {
        let l = layout(32, 8, 128);
        for lens in [vec![2048u32; 2], vec![8192; 8]] {
            let s100 = schedule(&lens, l, 16, 132, KvSplit::Auto, usize::MAX, h100().bandwidth()).unwrap();
            let s200 = schedule(&lens, l, 16, 132, KvSplit::Auto, usize::MAX, h200().bandwidth()).unwrap();
            let (cta100, cta200) = (s100.work_indptr.len() - 1, s200.work_indptr.len() - 1);
            assert_eq!((s100.chunk, cta100), (None, lens.len() * 8), "H100, {} x {}", lens.len(), lens[0]);
            assert!(s200.chunk.is_some() && cta200 >= 128, "H200, {} x {}: {cta200} CTAs", lens.len(), lens[0]);
        }
    }

    #[test]
    fn capacity_limits_the_split() {
        let l = layout(32, 8, 128);
        for device in [h100(), h200()] {
            for lens in [vec![131_072u32], vec![1, 20_000, 300], vec![4096; 3]] {
                for ctas in [1, 16, 132] {
                    let s = schedule(&lens, l, 16, ctas, KvSplit::Auto, 2 * ctas, device.bandwidth()).unwrap();
                    check(&s, &lens, l, 16, ctas);
                    assert!(s.partial_slots <= 2 * ctas, "{} pieces for {ctas} CTAs", s.partial_slots);
                }
            }
        }
        // A fixed chunk that needs more pieces than the plan holds is refused, not truncated.
        assert!(schedule(&[8192], l, 16, 4, KvSplit::Fixed(256), 8, h100().bandwidth()).is_err());
    }

    #[test]
    fn fixed_chunks_do_not_depend_on_the_batch() {
        let l = layout(9, 3, 64);
        let (h100, h200) = (h100(), h200());
        let a = schedule(&[5000, 10], l, 16, 7, KvSplit::Fixed(512), usize::MAX, h100.bandwidth()).unwrap();
        let b = schedule(&[5000], l, 16, 132, KvSplit::Fixed(512), usize::MAX, h200.bandwidth()).unwrap();
        let ranges = |s: &Schedule, seq: i32| {
            let mut r: Vec<(i32, i32)> = s.items.chunks(8).filter(|i| i[0] == seq).map(|i| (i[1], i[2])).collect();
            r.sort_unstable();
            r.dedup();
            r
        };
        assert_eq!(ranges(&a, 0), ranges(&b, 0));
        assert!(schedule(&[100], l, 16, 7, KvSplit::Fixed(100), usize::MAX, h100.bandwidth()).is_err());
        assert!(schedule(&[100], l, 32, 7, KvSplit::Fixed(48), usize::MAX, h100.bandwidth()).is_err());
    }

    #[test]
    fn lpt_balances_longest_first() {
        let (assignment, loads) = lpt([7.0, 5.0, 4.0, 3.0, 1.0].into_iter(), 3);
        assert_eq!(assignment, vec![0, 1, 2, 2, 1]);
        assert_eq!(loads, vec![7.0, 6.0, 7.0]);
    }

    #[test]
    fn tma_boxes_fill_a_slot_with_whole_copies() {
        for head_dim in [64, 128] {
            let (tokens, panels) = (slot_tokens(head_dim, PtxTarget::Sm90a), head_dim / PANEL_DIMS);
            for block_size in [8, 16, 32, 64, 128, 256] {
                let (rows, box_panels) = tma_box(head_dim, block_size);
                // One box per block the slot spans (and per panel when a box holds one).
                assert_eq!(rows, block_size.min(tokens), "d {head_dim}, blocks of {block_size}");
                assert!(box_panels == panels || box_panels == 1);
                assert!(rows == tokens || box_panels == 1 || panels == 1, "d {head_dim}, blocks of {block_size}");
            }
        }
        assert_eq!(tma_box(64, 64), (32, 1));
        assert_eq!(tma_box(128, 64), (16, 2));
        assert_eq!(tma_box(128, 8), (8, 1));
    }

    #[test]
    fn ring_fits_hopper_and_smaller_gpus() {
        // H100 / H200: 227 KiB per CTA; head dim 64 there has 12 consumer warps and slots of 32
        // tokens.
        assert_eq!(ring_slots(128, 16, 8, 232_448), Some(24));
        assert_eq!(ring_slots(64, 32, 12, 232_448), Some(24));
        assert!(smem_bytes(128, 16, 8, 24) <= 232_448);
        assert!(smem_bytes(64, 32, 12, 24) <= 232_448);
        // A100 (163 KiB) and consumer Ampere/Ada (99 KiB), 8 consumer warps, slots of 16 tokens.
        assert_eq!(ring_slots(64, 16, 8, 166_912), Some(32));
        assert!(ring_slots(128, 16, 8, 166_912).is_some());
        assert!(ring_slots(128, 16, 8, 101_376).is_some());
        assert_eq!(ring_slots(128, 16, 8, 40_000), None);
        // Slot counts are multiples of the consumer warps and of the producers' 8.
        assert_eq!(ring_slot_multiple(8), 8);
        assert_eq!(ring_slot_multiple(12), 24);
    }
}
