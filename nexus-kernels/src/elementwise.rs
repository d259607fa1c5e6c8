//! Launchers of the row-wise kernels of `cuda/elementwise.cu`: embedding gather, RMSNorm (with
//! the residual add fused), RoPE with the KV-cache write, argmax, and the fold of a norm's gain
//! into a weight (SiLU-and-mul is the epilogue of [`crate::gemm::gemm_silu_and_mul`]).
//!
//! Each checks its shapes and launches at most the phase's CTA budget. Their references, with the
//! same names, are in [`crate::reference`].

use cudarc::driver::{CudaView, CudaViewMut};
use half::bf16;

use crate::Result;
use crate::error::ensure_shape;
use crate::gpu::{Launch, PhaseContext};
use crate::layout::{PagedKvLayout, QkvLayout, RopeConfig, RopeScaling, RopeStyle};

const MODULE: &str = "elementwise";
/// Threads per CTA of the embedding gather, argmax and fill (`THREADS` in the source).
const THREADS: u32 = 1024;
/// Threads per CTA of the norms and RoPE (`ROW_THREADS` in the source).
const ROW_THREADS: u32 = 512;
/// Warps per CTA of the norms.
const ROW_WARPS: usize = ROW_THREADS as usize / 32;
/// Elements per 16-byte access; row lengths must be multiples of it.
const VEC: usize = 8;
/// (row, vector) pairs a norm's thread holds per round (`ROW_SLOTS`): it holds at most this many
/// vectors of one row, which bounds the hidden size.
const ROW_SLOTS: usize = 4;
/// Heads of a row one thread of `rope_and_write_kv_many_rows` takes.
const ROPE_HEADS: usize = 4;

fn to_i32(value: usize, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| crate::Error::Unsupported(format!("{what} {value} does not fit in i32")))
}

fn check_row_len(len: usize, what: &str) -> Result<()> {
    ensure_shape!(len > 0 && len.is_multiple_of(VEC), "{what} {len} must be a positive multiple of {VEC}");
    Ok(())
}

/// `out[t] = table[tokens[t]]`, with `table: [vocab, hidden]`, `out: [tokens, hidden]`. Token ids
/// must be below `vocab` (the device cannot report a bad one; it would read row 0).
pub fn embedding(
    ctx: &PhaseContext,
    table: &CudaView<'_, bf16>,
    hidden: usize,
    tokens: &CudaView<'_, u32>,
    out: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    check_row_len(hidden, "hidden size")?;
    ensure_shape!(table.len() % hidden == 0, "embedding: table is not [vocab, {hidden}]");
    let rows = tokens.len();
    ensure_shape!(out.len() == rows * hidden, "embedding: out is not [{rows}, {hidden}]");
    let (rows_i, hidden_i, vocab_i) =
        (to_i32(rows, "rows")?, to_i32(hidden, "hidden")?, to_i32(table.len() / hidden, "vocab")?);
    let grid = ctx.budget().grid((rows * hidden / VEC).div_ceil(THREADS as usize));
    let (f, cfg) = ctx.kernel(MODULE, "embedding", grid, THREADS, 0)?;
    let mut launch = ctx.launch(&f);
    launch.arg(table).arg(tokens).arg(out).arg(&rows_i).arg(&hidden_i).arg(&vocab_i);
    // SAFETY: the arguments match `embedding` in cuda/elementwise.cu, and the lengths checked
    // above bound every access.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// How an RMSNorm launch spreads `rows` rows of `hidden` values.
struct NormGrid {
    grid: u32,
    /// Warps that share a row: about one 16-byte vector per thread (a power of two, up to the
    /// CTA's 16). It and `vecs` depend on `hidden` alone, so each row's sums are added in the same
    /// order whatever the batch and the budget: the norms stay batch invariant.
    warps_per_row: i32,
    /// Whether a group of warps takes `ROW_SLOTS / vecs` rows per round (the `*_many_rows`
    /// kernels): when every CTA of the budget gets a whole round of them (a prefill chunk: more
    /// loads in flight per thread); else one (a decode batch, spread as widely as it can be).
    many_rows: bool,
    /// 16-byte vectors of a row per thread: 1, 2 or 4.
    vecs: i32,
}

fn norm_grid(ctx: &PhaseContext, rows: usize, hidden: usize) -> Result<NormGrid> {
    let per_row = (hidden / (32 * VEC)).clamp(1, ROW_WARPS);
    let warps_per_row = 1 << per_row.ilog2();
    let vecs = (hidden / VEC).div_ceil(warps_per_row * 32).next_power_of_two();
    ensure_shape!(
        vecs <= ROW_SLOTS,
        "RMSNorm of rows of {hidden} values: at most {} are supported",
        ROW_SLOTS * ROW_WARPS * 32 * VEC
    );
    let groups = ROW_WARPS / warps_per_row;
    let full = ROW_SLOTS / vecs;
    let rows_per_group = if rows >= ctx.budget().get() as usize * groups * full { full } else { 1 };
    Ok(NormGrid {
        grid: ctx.budget().grid(rows.div_ceil(groups * rows_per_group)),
        warps_per_row: warps_per_row as i32,
        many_rows: rows_per_group > 1,
        vecs: vecs as i32,
    })
}

fn check_norm(x: usize, weight: usize, out: usize, name: &str) -> Result<(usize, i32, i32)> {
    check_row_len(weight, "hidden size")?;
    ensure_shape!(x.is_multiple_of(weight), "{name}: x is not [rows, {weight}]");
    ensure_shape!(out == x, "{name}: out has {out} values, x {x}");
    let rows = x / weight;
    Ok((rows, to_i32(rows, "rows")?, to_i32(weight, "hidden")?))
}

/// RMSNorm of each row of `x: [rows, hidden]` into `out`, with `weight: [hidden]`.
pub fn rms_norm(
    ctx: &PhaseContext,
    x: &CudaView<'_, bf16>,
    weight: &CudaView<'_, bf16>,
    eps: f32,
    out: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    let (rows, rows_i, hidden_i) = check_norm(x.len(), weight.len(), out.len(), "rms_norm")?;
    let g = norm_grid(ctx, rows, weight.len())?;
    let name = if g.many_rows { "rms_norm_many_rows" } else { "rms_norm" };
    let (f, cfg) = ctx.kernel(MODULE, name, g.grid, ROW_THREADS, 0)?;
    let mut launch = ctx.launch(&f);
    launch.arg(x).arg(weight).arg(out).arg(&rows_i).arg(&hidden_i).arg(&eps);
    launch.arg(&g.warps_per_row).arg(&g.vecs);
    // SAFETY: the arguments match `rms_norm` and `rms_norm_many_rows` in cuda/elementwise.cu;
    // lengths checked above.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// `residual += x` (stored in bf16), then the RMSNorm of `residual` into `out`.
pub fn fused_add_rms_norm(
    ctx: &PhaseContext,
    x: &CudaView<'_, bf16>,
    residual: &mut CudaViewMut<'_, bf16>,
    weight: &CudaView<'_, bf16>,
    eps: f32,
    out: &mut CudaViewMut<'_, bf16>,
) -> Result<()> {
    let (rows, rows_i, hidden_i) = check_norm(x.len(), weight.len(), out.len(), "fused_add_rms_norm")?;
    ensure_shape!(
        residual.len() == x.len(),
        "fused_add_rms_norm: residual has {} values, x {}",
        residual.len(),
        x.len()
    );
    let g = norm_grid(ctx, rows, weight.len())?;
    let name = if g.many_rows { "fused_add_rms_norm_many_rows" } else { "fused_add_rms_norm" };
    let (f, cfg) = ctx.kernel(MODULE, name, g.grid, ROW_THREADS, 0)?;
    let mut launch = ctx.launch(&f);
    launch.arg(x).arg(residual).arg(weight).arg(out).arg(&rows_i).arg(&hidden_i).arg(&eps);
    launch.arg(&g.warps_per_row).arg(&g.vecs);
    // SAFETY: the arguments match `fused_add_rms_norm` and `fused_add_rms_norm_many_rows` in
    // cuda/elementwise.cu; lengths checked.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// A RoPE configuration as the kernels take it (`rope_and_write_kv` and
/// `decode_attention_rope_d*`): theta, the style (0: interleaved, 1: rotate-half), then the
/// scaling's kind (0: none, 1: linear, 2: llama3) and its four scalars (unused ones 1).
pub(crate) struct RopeArgs {
    theta: f32,
    style: i32,
    scaling: i32,
    scalars: [f32; 4],
}

impl RopeArgs {
    pub(crate) fn new(rope: RopeConfig) -> Self {
        let style = match rope.style {
            RopeStyle::Interleaved => 0,
            RopeStyle::RotateHalf => 1,
        };
        let (scaling, scalars) = match rope.scaling {
            RopeScaling::None => (0, [1.0; 4]),
            RopeScaling::Linear { factor } => (1, [factor, 1.0, 1.0, 1.0]),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                (2, [factor, low_freq_factor, high_freq_factor, original_max_position_embeddings as f32])
            }
        };
        RopeArgs { theta: rope.theta, style, scaling, scalars }
    }

    /// Pushes them in the kernels' order.
    pub(crate) fn push<'a>(&'a self, launch: &mut Launch<'a>) {
        launch.arg(&self.theta).arg(&self.style).arg(&self.scaling);
        for x in &self.scalars {
            launch.arg(x);
        }
    }
}

/// Rotates the Q and K heads of a fused QKV buffer `[rows, layout.row_len()]` in place by each
/// row's position, at the (scaled) frequencies of [`reference::rope_inv_freq`](crate::reference::rope_inv_freq),
/// and writes each row's rotated keys and its values into the paged pools at `slots[row]`: one
/// launch for what RoPE and the KV write did in two. `host_slots` is the host copy of `slots`,
/// checked against the pool (the device cannot report a bad slot).
#[allow(clippy::too_many_arguments)]
pub fn rope_and_write_kv(
    ctx: &PhaseContext,
    qkv: &mut CudaViewMut<'_, bf16>,
    positions: &CudaView<'_, u32>,
    layout: QkvLayout,
    rope: RopeConfig,
    slots: &CudaView<'_, u32>,
    host_slots: &[u32],
    k_cache: &mut CudaViewMut<'_, bf16>,
    v_cache: &mut CudaViewMut<'_, bf16>,
    cache: PagedKvLayout,
) -> Result<()> {
    let rows = positions.len();
    layout.check(qkv.len(), rows)?;
    rope.check()?;
    cache.check(k_cache.len(), v_cache.len())?;
    cache.check_holds(layout, "rope_and_write_kv")?;
    ensure_shape!(
        slots.len() == rows && host_slots.len() == rows,
        "rope_and_write_kv: {} slots ({} on the host) for {rows} rows",
        slots.len(),
        host_slots.len()
    );
    cache.check_slots(host_slots, "rope_and_write_kv")?;
    ensure_shape!(
        layout.head_dim.is_multiple_of(2 * VEC),
        "rope_and_write_kv: head dim {} is not a multiple of {}",
        layout.head_dim,
        2 * VEC
    );
    // A thread per 8 pairs of `heads_per_item` heads of a row: as many heads (up to ROPE_HEADS)
    // as leave a thread for every one of the budget's CTAs' threads.
    let row_heads = layout.num_heads + 2 * layout.num_kv_heads;
    let items_of = |heads: usize| rows * row_heads.div_ceil(heads) * (layout.head_dim / (2 * VEC));
    let threads = ctx.budget().get() as usize * ROW_THREADS as usize;
    let heads_per_item = if items_of(ROPE_HEADS) >= threads { ROPE_HEADS } else { 1 };
    let items = items_of(heads_per_item);
    let r = RopeArgs::new(rope);
    let args = [
        to_i32(rows, "rows")?,
        to_i32(layout.num_heads, "heads")?,
        to_i32(layout.num_kv_heads, "KV heads")?,
        to_i32(layout.head_dim, "head dim")?,
    ];
    // Few items (a decode batch) spread over every CTA of the budget, in CTAs of fewer threads.
    let budget = ctx.budget().get() as usize;
    let block = items.div_ceil(budget).next_multiple_of(32).clamp(32, ROW_THREADS as usize);
    let grid = ctx.budget().grid(items.div_ceil(block));
    // The kernel's grid-stride loop steps past the last item by at most a grid of threads.
    to_i32(items + grid as usize * block, "RoPE work items of the rows")?;
    // The inverse frequencies, one f32 per pair of a head.
    let smem = u32::try_from(layout.head_dim / 2 * size_of::<f32>())
        .map_err(|_| crate::Error::Unsupported(format!("rope_and_write_kv: head dim {}", layout.head_dim)))?;
    let name = if heads_per_item == 1 { "rope_and_write_kv" } else { "rope_and_write_kv_many_rows" };
    let (f, cfg) = ctx.kernel(MODULE, name, grid, block as u32, smem)?;
    let mut launch = ctx.launch(&f);
    launch.arg(qkv).arg(positions).arg(slots).arg(k_cache).arg(v_cache);
    launch.arg(&args[0]).arg(&args[1]).arg(&args[2]).arg(&args[3]);
    r.push(&mut launch);
    // SAFETY: the arguments match `rope_and_write_kv` and `rope_and_write_kv_many_rows` in
    // cuda/elementwise.cu; `layout.check` bounded the rows, and every slot was checked against the
    // pool above.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// The index of the largest logit of each row of `logits: [rows, vocab]` into `out: [rows]`
/// (the first on ties), or [`crate::reference::ARGMAX_NONE`] for a row that holds NaN or has no
/// value above -inf.
pub fn argmax(
    ctx: &PhaseContext,
    logits: &CudaView<'_, bf16>,
    vocab: usize,
    out: &mut CudaViewMut<'_, u32>,
) -> Result<()> {
    ensure_shape!(vocab > 0 && logits.len() % vocab == 0, "argmax: logits are not [rows, {vocab}]");
    let rows = logits.len() / vocab;
    ensure_shape!(out.len() == rows, "argmax: out has {} entries for {rows} rows", out.len());
    let (rows_i, vocab_i) = (to_i32(rows, "rows")?, to_i32(vocab, "vocab")?);
    let (f, cfg) = ctx.kernel(MODULE, "argmax", ctx.budget().grid(rows), THREADS, 0)?;
    let mut launch = ctx.launch(&f);
    launch.arg(logits).arg(out).arg(&rows_i).arg(&vocab_i);
    // SAFETY: the arguments match `argmax` in cuda/elementwise.cu; lengths checked above.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// Fills `out` with `mean + spread · u`, `u` uniform in [-1, 1) from a hash of `(seed, index)`:
/// the same values as [`crate::reference::fill_uniform`], rounded to bf16.
pub fn fill_uniform(
    ctx: &PhaseContext,
    out: &mut CudaViewMut<'_, bf16>,
    seed: u64,
    mean: f32,
    spread: f32,
) -> Result<()> {
    let n = out.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let grid = ctx.budget().grid(out.len().div_ceil(THREADS as usize));
    let (f, cfg) = ctx.kernel(MODULE, "fill_uniform", grid, THREADS, 0)?;
    let mut launch = ctx.launch(&f);
    launch.arg(out).arg(&n).arg(&seed).arg(&mean).arg(&spread);
    // SAFETY: the arguments match `fill_uniform` in cuda/elementwise.cu; it writes `n` values.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}

/// Multiplies each row of the `[rows, gain.len()]` matrix `weight` by `gain` elementwise, in
/// place, each value rounded to bf16 (as [`crate::reference::fold_norm_gain`]): an RMSNorm's
/// gain folded into the weight of the GEMM that follows it ([`crate::gemm::GemmFusion::RowNorm`]).
pub fn fold_norm_gain(ctx: &PhaseContext, weight: &mut CudaViewMut<'_, bf16>, gain: &CudaView<'_, bf16>) -> Result<()> {
    let k = gain.len();
    ensure_shape!(
        k > 0 && weight.len().is_multiple_of(k),
        "fold_norm_gain: weight has {} values, not rows of {k}",
        weight.len()
    );
    let k = u32::try_from(k).map_err(|_| crate::Error::Unsupported(format!("fold_norm_gain: rows of {k} values")))?;
    let n = weight.len() as u64;
    if n == 0 {
        return Ok(());
    }
    let grid = ctx.budget().grid(weight.len().div_ceil(THREADS as usize));
    let (f, cfg) = ctx.kernel(MODULE, "fold_norm_gain", grid, THREADS, 0)?;
    let mut launch = ctx.launch(&f);
    launch.arg(weight).arg(gain).arg(&n).arg(&k);
    // SAFETY: the arguments match `fold_norm_gain` in cuda/elementwise.cu; it reads and writes the
    // `n` values of `weight` and reads `k` of `gain` (indices modulo k).
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
