//! The CUDA backend: the model's operations on `nexus-kernels`' GPU kernels, bf16 in memory.
//!
//! Every launch goes to the backend's [`PhaseContext`] (one stream, one CTA budget). A step's
//! host inputs are uploaded once in [`Backend::prepare`]; its attention plan (decode when every
//! sequence brings one token, prefill otherwise) is made at the first layer and reused by the
//! others, since all layers share the batch and the cache layout.
//!
//! # CUDA graphs
//!
//! A decode step launches a few hundred small kernels, whose launch costs are most of a step at
//! small batches. So decode steps run as CUDA graphs, one per batch-size bucket
//! ([`CudaBackendConfig::graph_batch_sizes`]): a step of `n` sequences is padded to the smallest
//! bucket `b >= n` (padding rows attend over one token of the cache's padding block and write
//! there), its inputs are copied into the bucket's fixed buffers, its decode plan is rewritten in
//! place ([`DecodePlan::update`]), and the bucket's graph is launched. The first step of a bucket
//! runs eagerly on those buffers, then is recorded ([`PhaseContext::capture`]); activations are
//! the graph's own memory. Prefill and mixed steps, and steps over larger batches, run eagerly.

use std::cell::OnceCell;
use std::sync::{Mutex, MutexGuard};

use nexus_kernels::cudarc::driver::{CudaGraph, CudaSlice};
use nexus_kernels::decode_attention::{self, DecodeOptions, DecodePlan};
use nexus_kernels::gemm::{self, GemmWorkspace};
use nexus_kernels::prefill_attention::{self, PrefillPlan};
use nexus_kernels::reference::GemmShape;
use nexus_kernels::{PagedKvLayout, PhaseContext, QkvLayout, RopeConfig, bf16, copy_rows_htod, elementwise};

use crate::backend::{Backend, StepInput, StepScope};
use crate::gguf::HostTensor;
use crate::{Error, Result};

/// A weight on the GPU, bf16, row-major.
#[derive(Debug)]
pub struct CudaWeight {
    shape: Vec<usize>,
    data: CudaSlice<bf16>,
}

/// An activation matrix `[rows, cols]` on the GPU, bf16.
#[derive(Debug)]
pub struct CudaMatrix {
    rows: usize,
    cols: usize,
    data: CudaSlice<bf16>,
}

/// One layer's K and V pools on the GPU.
#[derive(Debug)]
pub struct CudaKvPool {
    layout: PagedKvLayout,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
}

// One plan per step: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum AttentionPlan {
    Decode(DecodePlan),
    Prefill(PrefillPlan),
}

/// A step's inputs on the GPU, with its attention plan once the first layer made it.
pub struct CudaStep {
    host: StepInput,
    tokens: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    block_tables: CudaSlice<i32>,
    plan: OnceCell<AttentionPlan>,
    /// The step's buffers and decode plan are a graph's, to be rewritten for later steps: its
    /// plan is made with capacity.
    recorded: bool,
}

impl std::fmt::Debug for CudaStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStep").field("tokens", &self.host.tokens.len()).finish_non_exhaustive()
    }
}

impl CudaStep {
    /// Copies a decode step padded to this recorded step's batch into the step's buffers (the
    /// block table at its own width: only the columns it uses) and replans its attention in
    /// place.
    fn rewrite(&mut self, ctx: &PhaseContext, step: &StepInput, block_size: usize) -> Result<()> {
        // The graph's KV write trusts these slots (its launcher checked only the recorded ones):
        // each must be its sequence's last position, in a block of its table, whose ids the plan
        // update below checks against the pool.
        check_decode_slots(step, block_size)?;
        let stream = ctx.stream();
        stream.memcpy_htod(&step.tokens, &mut self.tokens).map_err(kernel_error)?;
        stream.memcpy_htod(&step.positions, &mut self.positions).map_err(kernel_error)?;
        stream.memcpy_htod(&step.slots, &mut self.slots).map_err(kernel_error)?;
        let (width, recorded_width) = (step.max_blocks_per_seq, self.host.max_blocks_per_seq);
        copy_rows_htod(stream, &step.block_tables, width, &mut self.block_tables, recorded_width)?;
        match self.plan.get_mut() {
            Some(AttentionPlan::Decode(plan)) => Ok(plan.update(ctx, &step.kv_lens, &step.block_tables, width)?),
            _ => Err(Error::invalid("a recorded step has no decode plan")),
        }
    }
}

/// How the CUDA backend runs steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaBackendConfig {
    /// The batch sizes decode steps are recorded for as CUDA graphs, ascending; a decode step of
    /// `n` sequences replays the graph of the smallest size `>= n`, and larger steps run eagerly.
    /// Empty: every step runs eagerly.
    pub graph_batch_sizes: Vec<usize>,
    /// Make every row's result independent of the batch it is computed in, bit for bit, as
    /// vLLM's and SGLang's deterministic modes do: GEMMs only use kernels with one accumulation
    /// order ([`gemm::plan_batch_invariant`]), and every attention row, decode rows included,
    /// goes through the prefill kernel, whose K/V tiles start at position 0 whatever the chunk.
    /// A request's tokens then do not depend on what it was batched with, how its prompt was
    /// chunked, or whether it was preempted and recomputed. Slower: decode GEMMs pay for 64-row
    /// tiles, decode attention runs without split-KV, and no step is replayed from a graph.
    pub batch_invariant: bool,
}

impl Default for CudaBackendConfig {
    /// Graphs for decode batches of 1, 2, 4, 8, then every multiple of 8 up to 64, of 16 up to
    /// 128 and of 32 up to 256: padding wastes at most an eighth of a step past 8 sequences.
    fn default() -> Self {
        let mut sizes = vec![1, 2, 4];
        sizes.extend((8..=64).step_by(8));
        sizes.extend((80..=128).step_by(16));
        sizes.extend((160..=256).step_by(32));
        CudaBackendConfig { graph_batch_sizes: sizes, batch_invariant: false }
    }
}

/// A CUDA graph that may move to another thread with the backend (the engine runs on its own).
struct SendGraph(CudaGraph);

// SAFETY: a graph's handles are the context's, not a thread's: the driver accepts them from any
// thread, and cudarc binds the context to the calling thread before each use. The backend keeps
// its graphs behind a mutex, so one thread at a time uses them.
unsafe impl Send for SendGraph {}

/// A decode step of one batch-size bucket, recorded.
struct DecodeGraph {
    scope: StepScope,
    batch: usize,
    /// The bucket's inputs, rewritten before each replay.
    step: CudaStep,
    graph: SendGraph,
    /// `[batch, vocab]`: where the graph leaves the logits.
    logits: CudaSlice<bf16>,
    vocab: usize,
}

/// Runs the model on one GPU stream with one CTA budget.
pub struct CudaBackend {
    ctx: PhaseContext,
    config: CudaBackendConfig,
    gemm_workspace: Mutex<GemmWorkspace>,
    graphs: Mutex<Vec<DecodeGraph>>,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("ctx", &self.ctx).field("config", &self.config).finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl CudaBackend {
    /// A backend launching on `ctx`, with CUDA graphs for decode steps
    /// ([`CudaBackendConfig::default`]).
    pub fn new(ctx: PhaseContext) -> Result<Self> {
        Self::with_config(ctx, CudaBackendConfig::default())
    }

    /// A backend launching on `ctx`, configured.
    pub fn with_config(ctx: PhaseContext, mut config: CudaBackendConfig) -> Result<Self> {
        config.graph_batch_sizes.sort_unstable();
        config.graph_batch_sizes.dedup();
        config.graph_batch_sizes.retain(|&b| b > 0);
        let gemm_workspace = Mutex::new(GemmWorkspace::new(&ctx)?);
        Ok(CudaBackend { ctx, config, gemm_workspace, graphs: Mutex::new(Vec::new()) })
    }

    /// The batch sizes whose decode graphs are recorded so far, ascending.
    pub fn recorded_graphs(&self) -> Vec<usize> {
        let mut sizes: Vec<usize> = lock(&self.graphs).iter().map(|g| g.batch).collect();
        sizes.sort_unstable();
        sizes
    }

    /// The bucket a step is replayed in ([`graph_bucket`]); none in the batch-invariant mode.
    fn graph_batch(&self, step: &StepInput, scope: StepScope) -> Option<usize> {
        if self.config.batch_invariant {
            return None;
        }
        graph_bucket(&self.config.graph_batch_sizes, step, scope)
    }

    /// Runs a decode step in the graph of its bucket, recording the graph first if needed.
    fn run_graph(
        &self,
        input: &StepInput,
        scope: StepScope,
        batch: usize,
        forward: &mut dyn FnMut(&CudaStep) -> Result<CudaMatrix>,
    ) -> Result<CudaMatrix> {
        let mut graphs = lock(&self.graphs);
        // Recordings over another cache (or model) will not be replayed again.
        graphs.retain(|g| g.scope == scope);
        let rows = input.num_tokens();
        let stream = self.ctx.stream();
        if let Some(g) = graphs.iter_mut().find(|g| g.batch == batch) {
            let width = input.max_blocks_per_seq.max(1);
            g.step.rewrite(&self.ctx, &input.padded_decode(batch, width, scope), scope.block_size)?;
            g.graph.0.launch().map_err(kernel_error)?;
            let mut out = self.output(rows, g.vocab)?;
            stream.memcpy_dtod(&g.logits.slice(..rows * g.vocab), &mut out.data).map_err(kernel_error)?;
            return Ok(out);
        }
        // The first step of the bucket runs eagerly over the bucket's buffers (which makes its
        // plan and loads every kernel), then the same forward is recorded.
        let mut step = self.prepare(&input.padded_decode(batch, scope.max_blocks_per_seq, scope))?;
        step.recorded = true;
        let logits = forward(&step)?;
        let vocab = logits.cols;
        let mut out = self.output(rows, vocab)?;
        stream.memcpy_dtod(&logits.data.slice(..rows * vocab), &mut out.data).map_err(kernel_error)?;
        let mut kept = stream.alloc_zeros::<bf16>(batch * vocab).map_err(kernel_error)?;
        drop(logits);
        let (graph, ()) = self.ctx.capture(|| {
            let logits = forward(&step)?;
            stream.memcpy_dtod(&logits.data, &mut kept).map_err(kernel_error)?;
            Ok::<_, Error>(())
        })?;
        graphs.push(DecodeGraph { scope, batch, step, graph: SendGraph(graph), logits: kept, vocab });
        Ok(out)
    }

    /// The phase context every launch uses.
    pub fn context(&self) -> &PhaseContext {
        &self.ctx
    }

    /// A new activation whose values the kernel that produces it writes, every one (the GPU
    /// tests poison outputs and check that): not zeroed first, since a fill is one more
    /// launch per activation, about 300 of a decode step.
    fn output(&self, rows: usize, cols: usize) -> Result<CudaMatrix> {
        // SAFETY: any bit pattern is a valid bf16, and no value is read before a kernel or a
        // copy writes it.
        let data = unsafe { self.ctx.stream().alloc::<bf16>(rows * cols) }.map_err(kernel_error)?;
        Ok(CudaMatrix { rows, cols, data })
    }

    fn upload<T: nexus_kernels::cudarc::driver::DeviceRepr + nexus_kernels::cudarc::driver::ValidAsZeroBits>(
        &self,
        values: &[T],
    ) -> Result<CudaSlice<T>> {
        // An empty upload would be a null buffer; launches never read it, but keep one element.
        if values.is_empty() {
            return self.ctx.stream().alloc_zeros::<T>(1).map_err(kernel_error);
        }
        self.ctx.stream().clone_htod(values).map_err(kernel_error)
    }
}

fn kernel_error(e: nexus_kernels::cudarc::driver::DriverError) -> Error {
    Error::from(nexus_kernels::Error::from(e))
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Activation = CudaMatrix;
    type KvPool = CudaKvPool;
    type Step = CudaStep;

    fn upload(&self, tensor: HostTensor) -> Result<CudaWeight> {
        let host: Vec<bf16> = tensor.data.iter().map(|&v| bf16::from_f32(v)).collect();
        Ok(CudaWeight { shape: tensor.shape, data: self.upload(&host)? })
    }

    fn random_weight(&self, shape: Vec<usize>, seed: u64, mean: f32, spread: f32) -> Result<CudaWeight> {
        let n: usize = shape.iter().product();
        let mut data = self.ctx.stream().alloc_zeros::<bf16>(n.max(1)).map_err(kernel_error)?;
        elementwise::fill_uniform(&self.ctx, &mut data.slice_mut(..n), seed, mean, spread)?;
        Ok(CudaWeight { shape, data })
    }

    fn alloc_kv_pool(&self, layout: PagedKvLayout) -> Result<CudaKvPool> {
        let stream = self.ctx.stream();
        let k = stream.alloc_zeros::<bf16>(layout.pool_len()).map_err(kernel_error)?;
        let v = stream.alloc_zeros::<bf16>(layout.pool_len()).map_err(kernel_error)?;
        Ok(CudaKvPool { layout, k, v })
    }

    fn prepare(&self, step: &StepInput) -> Result<CudaStep> {
        step.validate()?;
        Ok(CudaStep {
            tokens: self.upload(&step.tokens)?,
            positions: self.upload(&step.positions)?,
            slots: self.upload(&step.slots)?,
            block_tables: self.upload(&step.block_tables)?,
            host: step.clone(),
            plan: OnceCell::new(),
            recorded: false,
        })
    }

    fn recorded_batch_sizes(&self) -> Vec<usize> {
        if self.config.batch_invariant { Vec::new() } else { self.config.graph_batch_sizes.clone() }
    }

    fn run_step(
        &self,
        step: &StepInput,
        scope: StepScope,
        forward: &mut dyn FnMut(&CudaStep) -> Result<CudaMatrix>,
    ) -> Result<CudaMatrix> {
        step.validate()?;
        match self.graph_batch(step, scope) {
            Some(batch) => self.run_graph(step, scope, batch, forward),
            None => forward(&self.prepare(step)?),
        }
    }

    fn embedding(&self, table: &CudaWeight, step: &CudaStep) -> Result<CudaMatrix> {
        let hidden = *table.shape.last().ok_or_else(|| Error::invalid("embedding table has no shape"))?;
        let mut out = self.output(step.host.tokens.len(), hidden)?;
        let tokens = step.tokens.slice(..step.host.tokens.len());
        elementwise::embedding(&self.ctx, &table.data.as_view(), hidden, &tokens, &mut out.data.as_view_mut())?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaMatrix, weight: &CudaWeight, eps: f32) -> Result<CudaMatrix> {
        let mut out = self.output(x.rows, x.cols)?;
        elementwise::rms_norm(&self.ctx, &x.data.as_view(), &weight.data.as_view(), eps, &mut out.data.as_view_mut())?;
        Ok(out)
    }

    fn fused_add_rms_norm(
        &self,
        x: &CudaMatrix,
        residual: &mut CudaMatrix,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaMatrix> {
        let mut out = self.output(x.rows, x.cols)?;
        elementwise::fused_add_rms_norm(
            &self.ctx,
            &x.data.as_view(),
            &mut residual.data.as_view_mut(),
            &weight.data.as_view(),
            eps,
            &mut out.data.as_view_mut(),
        )?;
        Ok(out)
    }

    fn linear(&self, x: &CudaMatrix, weight: &CudaWeight, bias: Option<&CudaWeight>) -> Result<CudaMatrix> {
        let n = weight.shape.first().copied().unwrap_or(0);
        let mut out = self.output(x.rows, n)?;
        let shape = GemmShape { m: x.rows, n, k: x.cols };
        let bias = bias.map(|b| b.data.as_view());
        let kernel = if self.config.batch_invariant {
            gemm::plan_batch_invariant(shape, self.ctx.budget(), self.ctx.gpu().target()).kernel
        } else {
            gemm::plan(shape, self.ctx.budget(), self.ctx.gpu().target()).kernel
        };
        let mut workspace = lock(&self.gemm_workspace);
        gemm::gemm_with(
            &self.ctx,
            kernel,
            &x.data.as_view(),
            &weight.data.as_view(),
            bias.as_ref(),
            &mut out.data.as_view_mut(),
            shape,
            &mut workspace,
        )?;
        Ok(out)
    }

    fn rope(&self, qkv: &mut CudaMatrix, layout: QkvLayout, rope: RopeConfig, step: &CudaStep) -> Result<()> {
        let positions = step.positions.slice(..step.host.positions.len());
        elementwise::rope(&self.ctx, &mut qkv.data.as_view_mut(), &positions, layout, rope)?;
        Ok(())
    }

    fn attention(
        &self,
        qkv: &CudaMatrix,
        layout: QkvLayout,
        pool: &mut CudaKvPool,
        step: &CudaStep,
        scale: f32,
    ) -> Result<CudaMatrix> {
        let host = &step.host;
        let slots = step.slots.slice(..host.slots.len());
        elementwise::write_kv_cache(
            &self.ctx,
            &qkv.data.as_view(),
            layout,
            &slots,
            &host.slots,
            &mut pool.k.as_view_mut(),
            &mut pool.v.as_view_mut(),
            pool.layout,
        )?;
        let plan = match step.plan.get() {
            Some(plan) => plan,
            None => {
                let decode = !self.config.batch_invariant && host.q_indptr.windows(2).all(|w| w[1] - w[0] == 1);
                let plan = if decode {
                    let options = DecodeOptions { scale, ..DecodeOptions::new(layout.head_dim) };
                    let (lens, tables, width) = (&host.kv_lens, &host.block_tables, host.max_blocks_per_seq);
                    AttentionPlan::Decode(if step.recorded {
                        let mut plan =
                            DecodePlan::with_capacity(&self.ctx, layout, pool.layout, lens.len(), width, options)?;
                        plan.update(&self.ctx, lens, tables, width)?;
                        plan
                    } else {
                        DecodePlan::new(&self.ctx, layout, pool.layout, lens, tables, width, options)?
                    })
                } else {
                    AttentionPlan::Prefill(PrefillPlan::new(&self.ctx, host.attention_batch(), layout, pool.layout)?)
                };
                step.plan.get_or_init(|| plan)
            }
        };
        let mut out = self.output(qkv.rows, layout.num_heads * layout.head_dim)?;
        let tables = step.block_tables.slice(..host.block_tables.len());
        let (k, v, q) = (pool.k.as_view(), pool.v.as_view(), qkv.data.as_view());
        match plan {
            AttentionPlan::Decode(plan) => {
                decode_attention::decode_attention(
                    &self.ctx,
                    plan,
                    &q,
                    &k,
                    &v,
                    &tables,
                    &mut out.data.as_view_mut(),
                    None,
                )?;
            }
            AttentionPlan::Prefill(plan) => {
                prefill_attention::prefill_attention(
                    &self.ctx,
                    plan,
                    &q,
                    &k,
                    &v,
                    &tables,
                    scale,
                    &mut out.data.as_view_mut(),
                    None,
                )?;
            }
        }
        Ok(out)
    }

    fn silu_and_mul(&self, gate_up: &CudaMatrix) -> Result<CudaMatrix> {
        let width = gate_up.cols / 2;
        let mut out = self.output(gate_up.rows, width)?;
        elementwise::silu_and_mul(&self.ctx, &gate_up.data.as_view(), width, &mut out.data.as_view_mut())?;
        Ok(out)
    }

    fn gather_logit_rows(&self, x: &CudaMatrix, step: &CudaStep) -> Result<CudaMatrix> {
        let rows = &step.host.logit_rows;
        let mut out = self.output(rows.len(), x.cols)?;
        // One copy per run of consecutive rows (a decode step is one run).
        let mut i = 0;
        while i < rows.len() {
            let first = rows[i] as usize;
            let run = rows[i..].iter().enumerate().take_while(|&(k, &r)| r as usize == first + k).count();
            let src = x.data.slice(first * x.cols..(first + run) * x.cols);
            let mut dst = out.data.slice_mut(i * x.cols..(i + run) * x.cols);
            self.ctx.stream().memcpy_dtod(&src, &mut dst).map_err(kernel_error)?;
            i += run;
        }
        Ok(out)
    }

    fn argmax(&self, x: &CudaMatrix) -> Result<Vec<u32>> {
        let mut out = self.ctx.stream().alloc_zeros::<u32>(x.rows.max(1)).map_err(kernel_error)?;
        elementwise::argmax(&self.ctx, &x.data.as_view(), x.cols, &mut out.slice_mut(..x.rows))?;
        let mut ids = self.ctx.stream().clone_dtoh(&out).map_err(kernel_error)?;
        ids.truncate(x.rows);
        Ok(ids)
    }

    fn to_host(&self, x: &CudaMatrix) -> Result<HostTensor> {
        let host = self.ctx.stream().clone_dtoh(&x.data).map_err(kernel_error)?;
        Ok(HostTensor { shape: vec![x.rows, x.cols], data: host.iter().map(|v| v.to_f32()).collect() })
    }
}

/// The smallest of `sizes` (ascending) that holds a decode step (one token per sequence, every
/// row's logits, in order) whose table fits the scope's width; `None` for other steps and for
/// batches larger than every size.
fn graph_bucket(sizes: &[usize], step: &StepInput, scope: StepScope) -> Option<usize> {
    let n = step.kv_lens.len();
    let decode = n > 0
        && step.num_tokens() == n
        && step.logit_rows.len() == n
        && step.logit_rows.iter().enumerate().all(|(i, &r)| r as usize == i)
        && step.max_blocks_per_seq <= scope.max_blocks_per_seq;
    if !decode {
        return None;
    }
    sizes.iter().copied().find(|&b| b >= n)
}

/// Checks that every row of a decode step writes its keys and values at its sequence's last
/// position, `kv_len - 1`, through its block table.
fn check_decode_slots(step: &StepInput, block_size: usize) -> Result<()> {
    let width = step.max_blocks_per_seq;
    for (i, (&slot, &len)) in step.slots.iter().zip(&step.kv_lens).enumerate() {
        let pos =
            (len as usize).checked_sub(1).ok_or_else(|| Error::invalid(format!("decode row {i} has no tokens")))?;
        let block = step.block_tables.get(i * width + pos / block_size).copied().unwrap_or(-1);
        if block < 0 || slot as usize != block as usize * block_size + pos % block_size {
            return Err(Error::invalid(format!(
                "decode row {i}: slot {slot} is not position {pos} of its blocks (block {block})"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SCOPE: StepScope = StepScope { cache_id: 0, max_blocks_per_seq: 8, padding_block: 99, block_size: 16 };

    /// Three decode sequences of 20, 1 and 33 tokens, with tables 3 blocks wide.
    fn decode_step() -> StepInput {
        StepInput {
            tokens: vec![5, 6, 7],
            positions: vec![19, 0, 32],
            slots: vec![16 * 10 + 3, 16 * 20, 16 * 32],
            q_indptr: vec![0, 1, 2, 3],
            kv_lens: vec![20, 1, 33],
            block_tables: vec![4, 10, -1, 20, -1, -1, 30, 31, 32],
            max_blocks_per_seq: 3,
            logit_rows: vec![0, 1, 2],
        }
    }

    #[test]
    fn decode_steps_take_the_smallest_bucket_that_holds_them() {
        let sizes = [1, 2, 4, 8];
        let step = decode_step();
        step.validate().unwrap();
        assert_eq!(graph_bucket(&sizes, &step, SCOPE), Some(4));
        assert_eq!(graph_bucket(&sizes[..2], &step, SCOPE), None, "larger than every bucket");
        // A prompt chunk, a step whose logits are not every row, or a table wider than the scope.
        let mut prefill = step.clone();
        prefill.q_indptr = vec![0, 1, 2, 4];
        prefill.kv_lens = vec![20, 1];
        assert_eq!(graph_bucket(&sizes, &prefill, SCOPE), None);
        let mut fewer_logits = step.clone();
        fewer_logits.logit_rows = vec![0, 2];
        assert_eq!(graph_bucket(&sizes, &fewer_logits, SCOPE), None);
        let narrow = StepScope { max_blocks_per_seq: 2, ..SCOPE };
        assert_eq!(graph_bucket(&sizes, &step, narrow), None);
    }

    #[test]
    fn padding_rows_attend_over_one_token_of_the_padding_block() {
        let step = decode_step();
        let padded = step.padded_decode(4, SCOPE.max_blocks_per_seq, SCOPE);
        padded.validate().unwrap();
        assert_eq!(padded.tokens, vec![5, 6, 7, 0]);
        assert_eq!(padded.positions, vec![19, 0, 32, 0]);
        assert_eq!(padded.slots, vec![16 * 10 + 3, 16 * 20, 16 * 32, 99 * 16]);
        assert_eq!(padded.kv_lens, vec![20, 1, 33, 1]);
        assert_eq!(padded.q_indptr, vec![0, 1, 2, 3, 4]);
        assert_eq!(padded.logit_rows, vec![0, 1, 2, 3]);
        // Rows keep their blocks at the start; the rest of the table is the padding block.
        assert_eq!(padded.max_blocks_per_seq, 8);
        let rows: Vec<&[i32]> = padded.block_tables.chunks(8).collect();
        assert_eq!(rows[0], &[4, 10, -1, 99, 99, 99, 99, 99]);
        assert_eq!(rows[2], &[30, 31, 32, 99, 99, 99, 99, 99]);
        assert_eq!(rows[3], &[99; 8]);
        // At the step's own width (a replay sends only these columns).
        let compact = step.padded_decode(4, 3, SCOPE);
        assert_eq!(compact.block_tables, vec![4, 10, -1, 20, -1, -1, 30, 31, 32, 99, 99, 99]);
        // Every row, padding included, writes its last position through its table; a slot
        // elsewhere is refused before a graph would write it.
        check_decode_slots(&padded, 16).unwrap();
        check_decode_slots(&compact, 16).unwrap();
        let mut stray = compact.clone();
        stray.slots[1] = 16 * 21;
        assert!(check_decode_slots(&stray, 16).is_err());
        let mut outside = compact;
        outside.kv_lens[0] = 40;
        assert!(check_decode_slots(&outside, 16).is_err(), "position 39 has no block in the table");
    }
}
