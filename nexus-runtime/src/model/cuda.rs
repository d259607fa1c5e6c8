//! The CUDA backend: the model's operations on `nexus-kernels`' GPU kernels, bf16 in memory.
//!
//! The backend holds what phases share: the device, and a setup stream on which weights and KV
//! pools are made. A [`CudaPhase`] is one lane: its own stream and CTA budget
//! ([`PhaseContext`]), GEMM tile counters, activations (allocated on its stream), recorded
//! decode steps and host buffers for the logits. Every launch of a step goes to the phase it runs
//! in, so a prefill phase and a decode phase with budgets that add up to at most the SM count run
//! on disjoint SMs at the same time. The backend turns cudarc's per-buffer event tracking off:
//! the pools are written by both phases (each only its own sequences' slots, which the engine
//! guarantees), and tracking would make each phase wait for the other.
//!
//! A step's host inputs are uploaded once in [`Backend::prepare`]; its attention plan (decode or
//! prefill, as the step's [`StepKind`] says) and its GEMM kernels are chosen once per step and
//! budget, at the first layer, and reused by the others.
//!
//! # CUDA graphs
//!
//! A decode step launches a few hundred small kernels, whose launch costs are most of a step at
//! small batches. So decode steps run as CUDA graphs, one per batch-size bucket
//! ([`CudaBackendConfig::graph_batch_sizes`]) and CTA budget (a recorded grid is fixed): a step
//! of `n` sequences is padded to the smallest bucket `b >= n` (padding rows attend over one
//! token of the cache's padding block and write there), its inputs are copied into the bucket's
//! buffers (one set per bucket, shared by the bucket's recordings at every budget), its decode
//! plan for the budget is rewritten in place ([`DecodePlan::update`]), and the graph is
//! launched. The first step of a (bucket, budget) runs eagerly on those buffers, then is recorded
//! ([`PhaseContext::capture`]). The activations of both runs are placed by the host in one buffer
//! of the phase (an arena, shared by the phase's graphs since they run one after another on its
//! stream), not allocated on the stream: a stream-ordered allocation would be recorded as a
//! memory node between two kernels and cut the dependent launch between them. The logits of
//! every recording land in one buffer of the phase. Prefill steps run eagerly.

mod arena;

use std::sync::{Arc, Mutex, MutexGuard};

use nexus_kernels::cudarc::driver::sys::CUevent_flags;
use nexus_kernels::cudarc::driver::{
    CudaEvent, CudaGraph, CudaSlice, CudaView, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};
use nexus_kernels::decode_attention::{self, DecodeOptions, DecodePlan};
use nexus_kernels::gemm::{self, GemmConfig, GemmFusion, GemmWorkspace};
use nexus_kernels::gpu::PtxTarget;
use nexus_kernels::prefill_attention::{self, PrefillOptions, PrefillPlan};
use nexus_kernels::reference::GemmShape;
use nexus_kernels::{
    CtaBudget, Gpu, GraphCensus, LaunchOptions, PagedKvLayout, PhaseContext, QkvLayout, RopeConfig, bf16,
    copy_rows_htod, copy_to_pinned, elementwise,
};

use self::arena::{Arena, MatrixData};
use crate::model::backend::{
    Backend, DecodeFusions, HostLogits, LogitsReadback, OpShape, OpTime, StepInput, StepKind, StepScope,
};
use crate::weights::gguf::HostTensor;
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
    data: MatrixData,
    /// The sums of squares of the rows per 64 columns (f32, `[rows, cols / 64]` rounded up), as
    /// [`Backend::linear_add`] last wrote them, for [`Backend::linear_normalized`].
    square_sums: Option<MatrixData>,
}

impl CudaMatrix {
    /// How many square sums the rows have.
    fn square_sums_len(&self) -> usize {
        self.rows * self.cols.div_ceil(gemm::SQUARE_SUM_COLS)
    }

    /// The square sums [`Backend::linear_add`] wrote, as f32.
    fn square_sums_view(&self) -> Result<CudaView<'_, f32>> {
        let sums = self.square_sums.as_ref().ok_or_else(|| {
            Error::invalid("a normalized GEMM's input has no row sums: no linear_add wrote it".to_string())
        })?;
        let len = self.square_sums_len();
        // SAFETY: linear_add made the buffer with room for `len` f32 values (256-byte aligned) and
        // wrote every one; any bit pattern is a valid f32.
        unsafe { sums.transmute::<f32>(len) }.ok_or_else(|| Error::invalid("row sums of another shape".to_string()))
    }
}

/// One layer's K and V pools on the GPU.
#[derive(Debug)]
pub struct CudaKvPool {
    layout: PagedKvLayout,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
}

// One plan per step and budget: the size difference of the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum AttentionPlan {
    Decode(DecodePlan),
    Prefill(PrefillPlan),
}

/// The pools an attention launch reads, or also writes the step's new tokens into, rotated by
/// the RoPE (`decode_attention_rope`).
enum PoolAccess<'a> {
    Read(&'a CudaKvPool),
    WriteNewTokens(&'a mut CudaKvPool, RopeConfig),
}

/// What a step decided once for all its layers, per budget it runs at.
#[derive(Default)]
struct StepPlans {
    attention: Vec<(CtaBudget, AttentionPlan)>,
    gemm: Vec<(CtaBudget, GemmShape, GemmConfig)>,
}

/// A step's inputs on the GPU, with the plans its first layer made.
pub struct CudaStep {
    host: StepInput,
    tokens: CudaSlice<u32>,
    positions: CudaSlice<u32>,
    slots: CudaSlice<u32>,
    block_tables: CudaSlice<i32>,
    plans: Mutex<StepPlans>,
    /// The step's buffers and decode plans are a bucket's, rewritten for later steps: its decode
    /// plans are made with capacity.
    recorded: bool,
}

impl std::fmt::Debug for CudaStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStep").field("tokens", &self.host.tokens.len()).finish_non_exhaustive()
    }
}

impl CudaStep {
    /// Copies a decode step padded to this bucket's batch into the bucket's buffers (the block
    /// table at its own width: only the columns it uses) and replans its attention for `ctx`'s
    /// budget in place.
    fn rewrite(&mut self, ctx: &PhaseContext, step: &StepInput, block_size: usize) -> Result<()> {
        // The graph's KV write trusts these slots (its launcher checked only the recorded ones):
        // each must be its sequence's last position, in a block of its table, whose ids the plan
        // update below checks against the pool.
        check_decode_slots(step, block_size)?;
        self.copy_inputs(ctx, step)?;
        let width = step.max_blocks_per_seq;
        let mut plans = lock(&self.plans);
        match plans.attention.iter_mut().find(|(b, _)| *b == ctx.budget()) {
            Some((_, AttentionPlan::Decode(plan))) => Ok(plan.update(ctx, &step.kv_lens, &step.block_tables, width)?),
            _ => Err(Error::invalid("a recorded step has no decode plan for this budget")),
        }
    }

    /// Copies all of `step` (of this step's sizes) into the step's buffers and makes it the
    /// step's host inputs, from which plans at new budgets are made.
    fn load(&mut self, ctx: &PhaseContext, step: StepInput) -> Result<()> {
        self.copy_inputs(ctx, &step)?;
        self.host = step;
        Ok(())
    }

    /// Copies `step`'s inputs into the step's buffers: its block table at its own width (only
    /// the columns it uses) into the first columns of the step's.
    fn copy_inputs(&mut self, ctx: &PhaseContext, step: &StepInput) -> Result<()> {
        let stream = ctx.stream();
        stream.memcpy_htod(&step.tokens, &mut self.tokens).map_err(kernel_error)?;
        stream.memcpy_htod(&step.positions, &mut self.positions).map_err(kernel_error)?;
        stream.memcpy_htod(&step.slots, &mut self.slots).map_err(kernel_error)?;
        let (width, recorded_width) = (step.max_blocks_per_seq, self.host.max_blocks_per_seq);
        Ok(copy_rows_htod(stream, &step.block_tables, width, &mut self.block_tables, recorded_width)?)
    }

    /// Whether a layer planned anything for this step yet.
    fn plans_made(&self) -> bool {
        !lock(&self.plans).attention.is_empty()
    }
}

/// The most rows of a decode step that runs its norms inside its GEMMs: the swapped tiles' steps
/// and the 64-row tiles'. Steps of more rows run 128-row tiles, whose prefill-sized GEMMs leave
/// the norm kernels a small share. On a budget of 64 (no dependent launches) fusing up to 64 rows
/// made Qwen2.5-3B's batch-64 step 1.7% faster and left Llama-3.1-8B's level
/// (`bench-results/model_step-llama-3.1-8b-h100.md`, H100).
const FUSED_NORM_ROWS: usize = 64;

/// The same on a phase that launches dependently (every SM): the swapped tiles' steps only. There
/// a norm kernel overlaps the GEMMs around it, and the 64-row tiles' fused launches, each 1-3 us
/// longer than the plain ones, made Llama-3.1-8B's batch-64 step 1.5-2.5% slower (Qwen2.5-3B's
/// 1.5-3% faster).
const FUSED_NORM_ROWS_DEPENDENT: usize = 32;

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
    /// Prefill attention only on the portable kernels (FlashAttention-2's structure), also on
    /// Hopper, where the default is the wgmma one: a fallback, and the comparison the benchmarks
    /// make.
    pub portable_prefill_attention: bool,
    /// Launch kernels with programmatic dependent launch on Hopper while a phase has every SM
    /// ([`nexus_kernels::LaunchOptions`]): each kernel's CTAs take the SMs the previous kernel's
    /// CTAs leave and start reading its weights while that kernel drains, which shortens decode
    /// steps whose kernels are each a few microseconds. Never while the phase shares the GPU
    /// (a budget below the SM count): a kernel started early may take SMs the other lane has idle
    /// for a moment and keep them for its whole run.
    pub dependent_launch: bool,
}

impl Default for CudaBackendConfig {
    /// Graphs for decode batches of 1, 2, 4, 8, then every multiple of 8 up to 64, of 16 up to
    /// 128 and of 32 up to 256: padding wastes at most an eighth of a step past 8 sequences.
    fn default() -> Self {
        let mut sizes = vec![1, 2, 4];
        sizes.extend((8..=64).step_by(8));
        sizes.extend((80..=128).step_by(16));
        sizes.extend((160..=256).step_by(32));
        CudaBackendConfig {
            graph_batch_sizes: sizes,
            batch_invariant: false,
            portable_prefill_attention: false,
            dependent_launch: true,
        }
    }
}

/// A CUDA graph that may move to another thread with its phase (the engine runs on its own).
struct SendGraph(CudaGraph);

// SAFETY: a graph's handles are the context's, not a thread's: the driver accepts them from any
// thread, and cudarc binds the context to the calling thread before each use. A phase keeps its
// graphs behind a mutex, so one thread at a time uses them.
unsafe impl Send for SendGraph {}

/// A decode step of one bucket, recorded at one budget.
struct DecodeGraph {
    batch: usize,
    budget: CtaBudget,
    graph: SendGraph,
    /// The phase's activation buffer when the step was recorded, which the graph's kernels use.
    _activations: Arc<CudaSlice<u8>>,
}

/// A phase's recorded decode steps, over one scope.
#[derive(Default)]
struct Recordings {
    scope: Option<StepScope>,
    /// Per bucket, its input buffers (and per-budget decode plans), in the order first recorded.
    buckets: Vec<(usize, CudaStep)>,
    graphs: Vec<DecodeGraph>,
    /// `[largest bucket, vocab]`: where every graph of the phase leaves its logits.
    logits: Option<(CudaSlice<bf16>, usize)>,
}

/// Host-side buffers the logits of a phase's steps arrive in (page-locked, so that the copies
/// are asynchronous). Freeing page-locked memory waits for the whole device, the other phase's
/// work included, so these are made once, or grown by doubling, rarely.
struct Readback {
    /// Argmax results on the device, then on the host: [`READBACK_ROWS`] of them.
    ids: (CudaSlice<u32>, PinnedHostSlice<u32>),
    /// Every logit of a step, when a sequence needs them.
    logits: Option<PinnedHostSlice<bf16>>,
}

/// The most logit rows a step may have (the engine's steps have one per sequence, at most
/// `max_num_seqs`).
const READBACK_ROWS: usize = 1 << 16;

/// Where the attention kernels of a phase write `{sm id, start ns, end ns}` of each CTA, launch
/// after launch ([`CudaBackend::trace_attention`]).
struct AttentionTrace {
    records: CudaSlice<u64>,
    /// Per launch so far: its first record and its budget.
    launches: Vec<(usize, u32)>,
}

/// One CTA of a traced attention launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtaSpan {
    pub sm: u32,
    /// `%globaltimer` nanoseconds.
    pub start_ns: u64,
    pub end_ns: u64,
}

/// An operator timed by a phase ([`Backend::time_ops`]): events around its launches.
struct TimedOp {
    shape: OpShape,
    sms: u32,
    start: CudaEvent,
    end: CudaEvent,
}

/// One lane of the CUDA backend (see the module documentation).
pub struct CudaPhase {
    ctx: PhaseContext,
    gemm_workspace: Mutex<GemmWorkspace>,
    recordings: Mutex<Recordings>,
    /// Activations of the decode steps being recorded.
    arena: Arena,
    readback: Mutex<Readback>,
    trace: Mutex<Option<AttentionTrace>>,
    timer: Mutex<Option<Vec<TimedOp>>>,
}

impl std::fmt::Debug for CudaPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaPhase").field("ctx", &self.ctx).finish_non_exhaustive()
    }
}

impl CudaPhase {
    /// The stream and budget its launches use.
    pub fn context(&self) -> &PhaseContext {
        &self.ctx
    }
}

/// Logits on their way to the host.
#[derive(Debug)]
pub struct CudaPending {
    /// Recorded after the copy to the host.
    done: CudaEvent,
    rows: usize,
    cols: usize,
    how: LogitsReadback,
}

/// Runs the model on one GPU, in as many phases as the caller makes.
pub struct CudaBackend {
    gpu: Arc<Gpu>,
    /// Where weights and KV pools are made (all SMs).
    setup: PhaseContext,
    config: CudaBackendConfig,
}

impl std::fmt::Debug for CudaBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaBackend").field("gpu", &self.gpu).field("config", &self.config).finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl CudaBackend {
    /// A backend on `gpu`, with CUDA graphs for decode steps ([`CudaBackendConfig::default`]).
    pub fn new(gpu: Arc<Gpu>) -> Result<Self> {
        Self::with_config(gpu, CudaBackendConfig::default())
    }

    /// A backend on `gpu`, configured.
    pub fn with_config(gpu: Arc<Gpu>, mut config: CudaBackendConfig) -> Result<Self> {
        config.graph_batch_sizes.sort_unstable();
        config.graph_batch_sizes.dedup();
        config.graph_batch_sizes.retain(|&b| b > 0);
        // SAFETY: the backend orders its work itself (see the module documentation): weights and
        // pools are made on the setup stream, which is synchronized before the call that made them
        // returns, a phase's buffers are used on its own stream only, and phases touch disjoint
        // KV slots.
        unsafe { gpu.context().disable_event_tracking() };
        let setup = PhaseContext::new(gpu.clone(), gpu.new_stream()?, CtaBudget::all(&gpu));
        Ok(CudaBackend { gpu, setup, config })
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// How a phase of `budget` launches: dependent launches only with every SM (see
    /// [`CudaBackendConfig::dependent_launch`]).
    fn launch_options(&self, budget: CtaBudget) -> LaunchOptions {
        LaunchOptions { dependent_launch: self.config.dependent_launch && budget == CtaBudget::all(&self.gpu) }
    }

    /// The batch sizes and budgets of `phase`'s recorded decode steps, ascending.
    pub fn recorded_graphs(&self, phase: &CudaPhase) -> Vec<(usize, u32)> {
        let mut keys: Vec<(usize, u32)> =
            lock(&phase.recordings).graphs.iter().map(|g| (g.batch, g.budget.get())).collect();
        keys.sort_unstable();
        keys
    }

    /// What each of `phase`'s recorded decode steps holds (kernels, copies, memory nodes,
    /// programmatic edges), by batch size and budget, ascending.
    pub fn recorded_graph_census(&self, phase: &CudaPhase) -> Result<Vec<(usize, u32, GraphCensus)>> {
        let recordings = lock(&phase.recordings);
        let mut out = recordings
            .graphs
            .iter()
            .map(|g| Ok((g.batch, g.budget.get(), GraphCensus::of(&g.graph.0)?)))
            .collect::<Result<Vec<_>>>()?;
        out.sort_unstable_by_key(|&(batch, budget, _)| (batch, budget));
        Ok(out)
    }

    /// Makes the attention kernels of `phase`'s next `launches` launches (one per layer and
    /// step, eager steps only) record where each CTA ran ([`CudaBackend::take_attention_trace`]):
    /// a debugging probe of the SMs a phase really occupies.
    pub fn trace_attention(&self, phase: &CudaPhase, launches: usize) -> Result<()> {
        let records = phase.ctx.stream().alloc_zeros::<u64>(3 * self.gpu.sm_count() as usize * launches.max(1));
        *lock(&phase.trace) = Some(AttentionTrace { records: records.map_err(kernel_error)?, launches: Vec::new() });
        Ok(())
    }

    /// The CTAs of each traced attention launch of `phase` so far, in launch order (waits for the
    /// phase's work), and stops tracing.
    pub fn take_attention_trace(&self, phase: &CudaPhase) -> Result<Vec<Vec<CtaSpan>>> {
        let Some(trace) = lock(&phase.trace).take() else { return Ok(Vec::new()) };
        let records = phase.ctx.stream().clone_dtoh(&trace.records).map_err(kernel_error)?;
        Ok(trace
            .launches
            .iter()
            .map(|&(first, budget)| {
                records[first..first + 3 * budget as usize]
                    .chunks_exact(3)
                    .filter(|r| r[2] != 0)
                    .map(|r| CtaSpan { sm: r[0] as u32, start_ns: r[1], end_ns: r[2] })
                    .collect()
            })
            .collect())
    }

    /// Runs a decode step of `phase` in the graph of its bucket and budget, recording it first
    /// if needed.
    fn run_graph(
        &self,
        phase: &CudaPhase,
        input: &StepInput,
        scope: StepScope,
        batch: usize,
        forward: &mut dyn FnMut(&CudaStep) -> Result<CudaMatrix>,
    ) -> Result<CudaMatrix> {
        let mut recordings = lock(&phase.recordings);
        if recordings.scope != Some(scope) {
            // Recordings over another cache (or model) will not be replayed again.
            *recordings = Recordings { scope: Some(scope), ..Recordings::default() };
        }
        let Recordings { buckets, graphs, logits, .. } = &mut *recordings;
        let ctx = &phase.ctx;
        let budget = ctx.budget();
        let rows = input.num_tokens();
        let stream = ctx.stream();
        let full = || input.padded_decode(batch, scope.max_blocks_per_seq, scope);
        let bucket = match buckets.iter().position(|(b, _)| *b == batch) {
            Some(i) => i,
            None => {
                let mut step = self.prepare(phase, &full())?;
                step.recorded = true;
                buckets.push((batch, step));
                buckets.len() - 1
            }
        };
        let step = &mut buckets[bucket].1;
        let recorded = graphs.iter().find(|g| g.batch == batch && g.budget == budget);
        if let (Some(g), Some((kept, vocab))) = (recorded, logits.as_ref()) {
            let width = input.max_blocks_per_seq.max(1);
            step.rewrite(ctx, &input.padded_decode(batch, width, scope), scope.block_size)?;
            g.graph.0.launch().map_err(kernel_error)?;
            let mut out = self.output(phase, rows, *vocab)?;
            stream.memcpy_dtod(&kept.slice(..rows * vocab), &mut *out.data).map_err(kernel_error)?;
            return Ok(out);
        }
        // The first step of a bucket and budget runs eagerly over the bucket's buffers, holding
        // the whole step (which makes its plan for the budget and loads every kernel), then the
        // same forward is recorded.
        if step.plans_made() {
            step.load(ctx, full())?;
        }
        // The eager run places its activations as the recording will, and so sizes the arena.
        let open = phase.arena.open()?;
        let eager = forward(step)?;
        drop(open);
        let vocab = eager.cols;
        let mut out = self.output(phase, rows, vocab)?;
        stream.memcpy_dtod(&eager.data.slice(..rows * vocab), &mut *out.data).map_err(kernel_error)?;
        drop(eager);
        let activations = phase.arena.fit(stream)?;
        if logits.is_none() {
            let largest = self.config.graph_batch_sizes.last().copied().unwrap_or(batch).max(batch);
            *logits = Some((stream.alloc_zeros::<bf16>(largest * vocab).map_err(kernel_error)?, vocab));
        }
        let Some((kept, kept_vocab)) = logits.as_mut() else { unreachable!("set above") };
        // Every recording of the phase writes there: it is never reallocated under them.
        if *kept_vocab != vocab || kept.len() < batch * vocab {
            return Err(Error::invalid("a recording's logits do not fit its phase's logits buffer"));
        }
        let open = phase.arena.open()?;
        let (graph, ()) = ctx.capture(|| {
            let logits = forward(step)?;
            stream.memcpy_dtod(&*logits.data, &mut kept.slice_mut(..batch * vocab)).map_err(kernel_error)?;
            Ok::<_, Error>(())
        })?;
        drop(open);
        graphs.push(DecodeGraph { batch, budget, graph: SendGraph(graph), _activations: activations });
        Ok(out)
    }

    /// A new activation whose values the kernel that produces it writes, every one (the GPU
    /// tests poison outputs and check that): not zeroed first, since a fill is one more
    /// launch per activation, about 300 of a decode step.
    /// While a decode step is recorded (and in the eager run before), the activation comes from
    /// the phase's [`Arena`].
    fn output(&self, phase: &CudaPhase, rows: usize, cols: usize) -> Result<CudaMatrix> {
        Ok(CudaMatrix { rows, cols, data: self.scratch(phase, rows * cols)?, square_sums: None })
    }

    /// Device memory for `len` bf16 values that a kernel writes before any is read, as
    /// [`CudaBackend::output`] takes it.
    fn scratch(&self, phase: &CudaPhase, len: usize) -> Result<MatrixData> {
        let stream = phase.ctx.stream();
        Ok(match phase.arena.matrix_data(stream, len)? {
            Some(data) => data,
            // SAFETY: any bit pattern is a valid bf16, and no value is read before a kernel or a
            // copy writes it.
            None => MatrixData::owned(unsafe { stream.alloc::<bf16>(len) }.map_err(kernel_error)?),
        })
    }

    /// Waits for the setup stream: a weight or pool is ready for every phase once the call that
    /// made it returns (no event orders the phases' streams after it).
    fn setup_done(&self) -> Result<()> {
        self.setup.stream().synchronize().map_err(kernel_error)
    }

    /// Runs the launches of one operator on `phase`, between timing events when the phase times
    /// its operators.
    fn run_op<T>(&self, phase: &CudaPhase, shape: OpShape, launches: impl FnOnce() -> Result<T>) -> Result<T> {
        let mut timer = lock(&phase.timer);
        let Some(times) = timer.as_mut() else {
            drop(timer);
            return launches();
        };
        let event = || -> Result<CudaEvent> {
            let event = self.gpu.context().new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(kernel_error)?;
            event.record(phase.ctx.stream()).map_err(kernel_error)?;
            Ok(event)
        };
        let start = event()?;
        let out = launches()?;
        times.push(TimedOp { shape, sms: phase.ctx.budget().get(), start, end: event()? });
        Ok(out)
    }

    /// [`Backend::linear`], or with `norm_eps` [`Backend::linear_normalized`].
    fn linear_op(
        &self,
        phase: &CudaPhase,
        step: &CudaStep,
        x: &CudaMatrix,
        weight: &CudaWeight,
        bias: Option<&CudaWeight>,
        norm_eps: Option<f32>,
    ) -> Result<CudaMatrix> {
        let n = weight.shape.first().copied().unwrap_or(0);
        let shape = GemmShape { m: x.rows, n, k: x.cols };
        let config = self.gemm_config(phase, step, shape);
        self.run_op(phase, OpShape::gemm(x.rows, n, x.cols), || {
            let mut out = self.output(phase, x.rows, n)?;
            let bias = bias.map(|b| b.data.as_view());
            let sums = norm_eps.map(|_| x.square_sums_view()).transpose()?;
            let mut workspace = lock(&phase.gemm_workspace);
            gemm::gemm_with(
                &phase.ctx,
                config,
                row_norm(sums.as_ref(), norm_eps),
                &x.data.as_view(),
                &weight.data.as_view(),
                bias.as_ref(),
                &mut out.data.as_view_mut(),
                shape,
                &mut workspace,
            )?;
            Ok(out)
        })
    }

    /// [`Backend::linear_silu_and_mul`], or with `norm_eps` its normalized form.
    fn linear_silu_and_mul_op(
        &self,
        phase: &CudaPhase,
        step: &CudaStep,
        x: &CudaMatrix,
        gate_up: &CudaWeight,
        norm_eps: Option<f32>,
    ) -> Result<CudaMatrix> {
        let n = gate_up.shape.first().copied().unwrap_or(0);
        let shape = GemmShape { m: x.rows, n, k: x.cols };
        let config = self.gemm_config(phase, step, shape);
        self.run_op(phase, OpShape::gemm(x.rows, n, x.cols), || {
            let mut out = self.output(phase, x.rows, n / 2)?;
            let sums = norm_eps.map(|_| x.square_sums_view()).transpose()?;
            let mut workspace = lock(&phase.gemm_workspace);
            gemm::gemm_silu_and_mul_with(
                &phase.ctx,
                config,
                row_norm(sums.as_ref(), norm_eps),
                &x.data.as_view(),
                &gate_up.data.as_view(),
                &mut out.data.as_view_mut(),
                shape,
                &mut workspace,
            )?;
            Ok(out)
        })
    }

    /// Page-locked host memory for `len` values that the device writes and the host reads.
    fn pinned<T: DeviceRepr>(&self, len: usize) -> Result<PinnedHostSlice<T>> {
        // SAFETY: the values are written by a copy from the device before the host reads them;
        // no write combining (cudarc's default), which would make the host's reads slow.
        unsafe { self.gpu.context().alloc_pinned_with_flags(len.max(1), 0) }.map_err(kernel_error)
    }

    /// The launch of [`Backend::attention`]: the attention kernel of the step's plan at the
    /// phase's budget (made at the first layer).
    fn attention_launches(
        &self,
        phase: &CudaPhase,
        qkv: &CudaMatrix,
        layout: QkvLayout,
        pool: PoolAccess<'_>,
        step: &CudaStep,
        scale: f32,
    ) -> Result<CudaMatrix> {
        let ctx = &phase.ctx;
        let host = &step.host;
        let mut plans = lock(&step.plans);
        let budget = ctx.budget();
        let pool_layout = match &pool {
            PoolAccess::Read(p) => p.layout,
            PoolAccess::WriteNewTokens(p, _) => p.layout,
        };
        let index = match plans.attention.iter().position(|(b, _)| *b == budget) {
            Some(i) => i,
            None => {
                let plan = if self.plans_decode_attention(step) {
                    let options = DecodeOptions { scale, ..DecodeOptions::new(layout.head_dim) };
                    let (lens, tables, width) = (&host.kv_lens, &host.block_tables, host.max_blocks_per_seq);
                    AttentionPlan::Decode(if step.recorded {
                        let mut plan = DecodePlan::with_capacity(ctx, layout, pool_layout, lens.len(), width, options)?;
                        plan.update(ctx, lens, tables, width)?;
                        plan
                    } else {
                        DecodePlan::new(ctx, layout, pool_layout, lens, tables, width, options)?
                    })
                } else {
                    let options = PrefillOptions { portable_only: self.config.portable_prefill_attention };
                    let batch = host.attention_batch();
                    AttentionPlan::Prefill(PrefillPlan::with_options(ctx, batch, layout, pool_layout, options)?)
                };
                plans.attention.push((budget, plan));
                plans.attention.len() - 1
            }
        };
        let mut out = self.output(phase, qkv.rows, layout.num_heads * layout.head_dim)?;
        let tables = step.block_tables.slice(..host.block_tables.len());
        let q = qkv.data.as_view();
        let mut trace = lock(&phase.trace);
        let mut records = trace.as_mut().and_then(|t| {
            let first = t.launches.last().map_or(0, |&(first, budget)| first + 3 * budget as usize);
            let end = first + 3 * budget.get() as usize;
            (end <= t.records.len()).then(|| {
                t.launches.push((first, budget.get()));
                t.records.slice_mut(first..end)
            })
        });
        let out_view = &mut out.data.as_view_mut();
        match (&plans.attention[index].1, pool) {
            (AttentionPlan::Decode(plan), PoolAccess::Read(pool)) => {
                let (k, v) = (pool.k.as_view(), pool.v.as_view());
                decode_attention::decode_attention(ctx, plan, &q, &k, &v, &tables, out_view, records.as_mut())?;
            }
            (AttentionPlan::Decode(plan), PoolAccess::WriteNewTokens(pool, rope)) => {
                let (k, v) = (&mut pool.k.as_view_mut(), &mut pool.v.as_view_mut());
                decode_attention::decode_attention_rope(
                    ctx,
                    plan,
                    &q,
                    rope,
                    k,
                    v,
                    &tables,
                    out_view,
                    records.as_mut(),
                )?;
            }
            (AttentionPlan::Prefill(plan), PoolAccess::Read(pool)) => {
                let (k, v) = (pool.k.as_view(), pool.v.as_view());
                prefill_attention::prefill_attention(
                    ctx,
                    plan,
                    &q,
                    &k,
                    &v,
                    &tables,
                    scale,
                    out_view,
                    records.as_mut(),
                )?;
            }
            (AttentionPlan::Prefill(_), PoolAccess::WriteNewTokens(..)) => {
                return Err(Error::invalid("a prefill step's attention does not write its new tokens"));
            }
        }
        Ok(out)
    }

    /// Whether `step`'s attention runs the decode kernel (else the prefill one).
    fn plans_decode_attention(&self, step: &CudaStep) -> bool {
        step.host.kind == StepKind::Decode && !self.config.batch_invariant
    }

    /// The kernel and split of K for `shape` at `phase`'s budget, chosen once per step.
    fn gemm_config(&self, phase: &CudaPhase, step: &CudaStep, shape: GemmShape) -> GemmConfig {
        let budget = phase.ctx.budget();
        let mut plans = lock(&step.plans);
        if let Some(&(_, _, config)) = plans.gemm.iter().find(|(b, s, _)| *b == budget && *s == shape) {
            return config;
        }
        let config = if self.config.batch_invariant {
            gemm::plan_batch_invariant(shape, budget, self.gpu.model()).config()
        } else {
            gemm::plan(shape, budget, self.gpu.model()).config()
        };
        plans.gemm.push((budget, shape, config));
        config
    }
}

/// The GEMM fusion that normalizes A's rows with `eps` from their square `sums`, or none without
/// them.
fn row_norm<'f, 'v>(sums: Option<&'f CudaView<'v, f32>>, eps: Option<f32>) -> GemmFusion<'f, 'v> {
    match (sums, eps) {
        (Some(square_sums), Some(eps)) => GemmFusion::RowNorm { square_sums, eps },
        _ => GemmFusion::None,
    }
}

/// Copies `values` to a new device buffer on `ctx`'s stream.
fn upload<T: DeviceRepr + ValidAsZeroBits>(ctx: &PhaseContext, values: &[T]) -> Result<CudaSlice<T>> {
    // An empty upload would be a null buffer; launches never read it, but keep one element.
    if values.is_empty() {
        return ctx.stream().alloc_zeros::<T>(1).map_err(kernel_error);
    }
    ctx.stream().clone_htod(values).map_err(kernel_error)
}

fn kernel_error(e: nexus_kernels::cudarc::driver::DriverError) -> Error {
    Error::from(nexus_kernels::Error::from(e))
}

impl Backend for CudaBackend {
    type Weight = CudaWeight;
    type Activation = CudaMatrix;
    type KvPool = CudaKvPool;
    type Step = CudaStep;
    type Phase = CudaPhase;
    type Pending = CudaPending;

    fn sm_count(&self) -> u32 {
        self.gpu.sm_count()
    }

    fn device_name(&self) -> String {
        self.gpu.context().name().unwrap_or_else(|_| format!("GPU of {} SMs", self.gpu.sm_count()))
    }

    fn new_phase(&self) -> Result<CudaPhase> {
        let ctx = PhaseContext::new(self.gpu.clone(), self.gpu.new_stream()?, CtaBudget::all(&self.gpu));
        let ctx = ctx.with_launch_options(self.launch_options(ctx.budget()));
        let ids = (ctx.stream().alloc_zeros::<u32>(READBACK_ROWS).map_err(kernel_error)?, self.pinned(READBACK_ROWS)?);
        Ok(CudaPhase {
            gemm_workspace: Mutex::new(GemmWorkspace::new(&ctx)?),
            ctx,
            recordings: Mutex::new(Recordings::default()),
            arena: Arena::default(),
            readback: Mutex::new(Readback { ids, logits: None }),
            trace: Mutex::new(None),
            timer: Mutex::new(None),
        })
    }

    fn set_budget(&self, phase: &mut CudaPhase, sms: u32) -> Result<()> {
        let budget = CtaBudget::new(sms, &self.gpu)?;
        phase.ctx = phase.ctx.with_budget(budget).with_launch_options(self.launch_options(budget));
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.gpu.context().synchronize().map_err(kernel_error)
    }

    fn upload(&self, tensor: HostTensor) -> Result<CudaWeight> {
        let host: Vec<bf16> = tensor.data.iter().map(|&v| bf16::from_f32(v)).collect();
        let data = upload(&self.setup, &host)?;
        self.setup_done()?;
        Ok(CudaWeight { shape: tensor.shape, data })
    }

    fn random_weight(&self, shape: Vec<usize>, seed: u64, mean: f32, spread: f32) -> Result<CudaWeight> {
        let n: usize = shape.iter().product();
        let mut data = self.setup.stream().alloc_zeros::<bf16>(n.max(1)).map_err(kernel_error)?;
        elementwise::fill_uniform(&self.setup, &mut data.slice_mut(..n), seed, mean, spread)?;
        self.setup_done()?;
        Ok(CudaWeight { shape, data })
    }

    fn alloc_kv_pool(&self, layout: PagedKvLayout) -> Result<CudaKvPool> {
        let stream = self.setup.stream();
        let k = stream.alloc_zeros::<bf16>(layout.pool_len()).map_err(kernel_error)?;
        let v = stream.alloc_zeros::<bf16>(layout.pool_len()).map_err(kernel_error)?;
        self.setup_done()?;
        Ok(CudaKvPool { layout, k, v })
    }

    fn prepare(&self, phase: &CudaPhase, step: &StepInput) -> Result<CudaStep> {
        step.validate()?;
        Ok(CudaStep {
            tokens: upload(&phase.ctx, &step.tokens)?,
            positions: upload(&phase.ctx, &step.positions)?,
            slots: upload(&phase.ctx, &step.slots)?,
            block_tables: upload(&phase.ctx, &step.block_tables)?,
            host: step.clone(),
            plans: Mutex::new(StepPlans::default()),
            recorded: false,
        })
    }

    fn recorded_batch_sizes(&self) -> Vec<usize> {
        if self.config.batch_invariant { Vec::new() } else { self.config.graph_batch_sizes.clone() }
    }

    fn run_step(
        &self,
        phase: &CudaPhase,
        step: &StepInput,
        scope: StepScope,
        forward: &mut dyn FnMut(&CudaStep) -> Result<CudaMatrix>,
    ) -> Result<CudaMatrix> {
        step.validate()?;
        let bucket = match step.kind {
            StepKind::Decode
                if !self.config.batch_invariant && lock(&phase.trace).is_none() && lock(&phase.timer).is_none() =>
            {
                graph_bucket(&self.config.graph_batch_sizes, step, scope)
            }
            _ => None,
        };
        match bucket {
            Some(batch) => self.run_graph(phase, step, scope, batch, forward),
            None => forward(&self.prepare(phase, step)?),
        }
    }

    fn embedding(&self, phase: &CudaPhase, table: &CudaWeight, step: &CudaStep) -> Result<CudaMatrix> {
        let hidden = *table.shape.last().ok_or_else(|| Error::invalid("embedding table has no shape"))?;
        let rows = step.host.tokens.len();
        self.run_op(phase, OpShape::elementwise(2 * rows * hidden), || {
            let mut out = self.output(phase, rows, hidden)?;
            let tokens = step.tokens.slice(..rows);
            elementwise::embedding(&phase.ctx, &table.data.as_view(), hidden, &tokens, &mut out.data.as_view_mut())?;
            Ok(out)
        })
    }

    fn rms_norm(&self, phase: &CudaPhase, x: &CudaMatrix, weight: &CudaWeight, eps: f32) -> Result<CudaMatrix> {
        self.run_op(phase, OpShape::elementwise(2 * x.rows * x.cols), || {
            let mut out = self.output(phase, x.rows, x.cols)?;
            let (x, weight) = (x.data.as_view(), weight.data.as_view());
            elementwise::rms_norm(&phase.ctx, &x, &weight, eps, &mut out.data.as_view_mut())?;
            Ok(out)
        })
    }

    fn fused_add_rms_norm(
        &self,
        phase: &CudaPhase,
        x: &CudaMatrix,
        residual: &mut CudaMatrix,
        weight: &CudaWeight,
        eps: f32,
    ) -> Result<CudaMatrix> {
        self.run_op(phase, OpShape::elementwise(4 * x.rows * x.cols), || {
            let mut out = self.output(phase, x.rows, x.cols)?;
            elementwise::fused_add_rms_norm(
                &phase.ctx,
                &x.data.as_view(),
                &mut residual.data.as_view_mut(),
                &weight.data.as_view(),
                eps,
                &mut out.data.as_view_mut(),
            )?;
            Ok(out)
        })
    }

    fn linear(
        &self,
        phase: &CudaPhase,
        step: &CudaStep,
        x: &CudaMatrix,
        weight: &CudaWeight,
        bias: Option<&CudaWeight>,
    ) -> Result<CudaMatrix> {
        self.linear_op(phase, step, x, weight, bias, None)
    }

    fn linear_normalized(
        &self,
        phase: &CudaPhase,
        step: &CudaStep,
        x: &CudaMatrix,
        weight: &CudaWeight,
        bias: Option<&CudaWeight>,
        eps: f32,
    ) -> Result<CudaMatrix> {
        self.linear_op(phase, step, x, weight, bias, Some(eps))
    }

    fn linear_silu_and_mul(
        &self,
        phase: &CudaPhase,
        step: &CudaStep,
        x: &CudaMatrix,
        gate_up: &CudaWeight,
    ) -> Result<CudaMatrix> {
        self.linear_silu_and_mul_op(phase, step, x, gate_up, None)
    }

    fn linear_silu_and_mul_normalized(
        &self,
        phase: &CudaPhase,
        step: &CudaStep,
        x: &CudaMatrix,
        gate_up: &CudaWeight,
        eps: f32,
    ) -> Result<CudaMatrix> {
        self.linear_silu_and_mul_op(phase, step, x, gate_up, Some(eps))
    }

    fn folds_norm_gains(&self) -> bool {
        // The wgmma GEMMs fuse the norms; the batch-invariant mode keeps the norm kernels, so that
        // decode rows run through what prefill rows do.
        self.gpu.target() == PtxTarget::Sm90a && !self.config.batch_invariant
    }

    fn fold_norm_gain(&self, mut weight: CudaWeight, gain: &CudaWeight) -> Result<CudaWeight> {
        elementwise::fold_norm_gain(&self.setup, &mut weight.data.as_view_mut(), &gain.data.as_view())?;
        self.setup_done()?;
        Ok(weight)
    }

    /// Decode steps of at most `FUSED_NORM_ROWS` rows (`FUSED_NORM_ROWS_DEPENDENT` in a phase
    /// that launches dependently): a prefill chunk's GEMMs would wait for each tile's row sums
    /// before its main loop, where its norm kernels cost little against its GEMMs.
    fn fuses_norms(&self, phase: &CudaPhase, step: &CudaStep) -> bool {
        let mut rows = self.decode_fusions().norm_rows;
        if self.launch_options(phase.ctx.budget()).dependent_launch {
            rows = rows.min(FUSED_NORM_ROWS_DEPENDENT);
        }
        rows > 0 && step.host.kind == StepKind::Decode && step.host.tokens.len() <= rows
    }

    /// The norms as `fuses_norms` runs them; the RoPE wherever decode steps run the decode
    /// attention kernel (`plans_decode_attention`), which takes it (`rope_and_attention`).
    fn decode_fusions(&self) -> DecodeFusions {
        DecodeFusions {
            norm_rows: if self.folds_norm_gains() { FUSED_NORM_ROWS } else { 0 },
            rope: !self.config.batch_invariant,
        }
    }

    fn linear_add(
        &self,
        phase: &CudaPhase,
        step: &CudaStep,
        x: &CudaMatrix,
        weight: &CudaWeight,
        residual: &mut CudaMatrix,
    ) -> Result<()> {
        let n = weight.shape.first().copied().unwrap_or(0);
        if (residual.rows, residual.cols) != (x.rows, n) {
            return Err(Error::invalid(format!(
                "linear_add: a [{}, {}] residual for a [{}, {n}] product",
                residual.rows, residual.cols, x.rows
            )));
        }
        let shape = GemmShape { m: x.rows, n, k: x.cols };
        let config = self.gemm_config(phase, step, shape);
        let sums_len = residual.square_sums_len();
        self.run_op(phase, OpShape::gemm(x.rows, n, x.cols), || {
            if residual.square_sums.is_none() {
                residual.square_sums = Some(self.scratch(phase, 2 * sums_len)?);
            }
            let sums = residual.square_sums.as_mut().expect("made above");
            // SAFETY: the buffer holds 2 * sums_len bf16 values, so sums_len f32 ones (256-byte
            // aligned), and any bit pattern is a valid f32.
            let mut sums = unsafe { sums.transmute_mut::<f32>(sums_len) }.expect("room for the sums");
            let mut workspace = lock(&phase.gemm_workspace);
            gemm::gemm_with(
                &phase.ctx,
                config,
                GemmFusion::AddToC { square_sums: &mut sums },
                &x.data.as_view(),
                &weight.data.as_view(),
                None,
                &mut residual.data.as_view_mut(),
                shape,
                &mut workspace,
            )?;
            Ok(())
        })
    }

    fn rope_and_write_kv(
        &self,
        phase: &CudaPhase,
        qkv: &mut CudaMatrix,
        layout: QkvLayout,
        rope: RopeConfig,
        pool: &mut CudaKvPool,
        step: &CudaStep,
    ) -> Result<()> {
        self.run_op(phase, OpShape::rope_and_write_kv(qkv.rows, layout), || {
            let host = &step.host;
            let positions = step.positions.slice(..host.positions.len());
            let slots = step.slots.slice(..host.slots.len());
            elementwise::rope_and_write_kv(
                &phase.ctx,
                &mut qkv.data.as_view_mut(),
                &positions,
                layout,
                rope,
                &slots,
                &host.slots,
                &mut pool.k.as_view_mut(),
                &mut pool.v.as_view_mut(),
                pool.layout,
            )?;
            Ok(())
        })
    }

    fn attention(
        &self,
        phase: &CudaPhase,
        qkv: &CudaMatrix,
        layout: QkvLayout,
        pool: &CudaKvPool,
        step: &CudaStep,
        scale: f32,
    ) -> Result<CudaMatrix> {
        self.run_op(phase, OpShape::attention(&step.host), || {
            self.attention_launches(phase, qkv, layout, PoolAccess::Read(pool), step, scale)
        })
    }

    /// A decode step's RoPE and KV write inside its attention kernel: one launch a layer fewer.
    /// The kernel writes each sequence's new token at the slot its block table gives the last
    /// position, which is the step's slot (`check_decode_slots` checks a recorded step's).
    fn rope_and_attention(
        &self,
        phase: &CudaPhase,
        qkv: &mut CudaMatrix,
        layout: QkvLayout,
        rope: RopeConfig,
        pool: &mut CudaKvPool,
        step: &CudaStep,
        scale: f32,
    ) -> Result<CudaMatrix> {
        if !self.plans_decode_attention(step) {
            self.rope_and_write_kv(phase, qkv, layout, rope, pool, step)?;
            return self.attention(phase, qkv, layout, pool, step, scale);
        }
        self.run_op(phase, OpShape::attention(&step.host), || {
            self.attention_launches(phase, qkv, layout, PoolAccess::WriteNewTokens(pool, rope), step, scale)
        })
    }

    fn gather_logit_rows(&self, phase: &CudaPhase, x: &CudaMatrix, step: &CudaStep) -> Result<CudaMatrix> {
        let rows = &step.host.logit_rows;
        self.run_op(phase, OpShape::elementwise(2 * rows.len() * x.cols), || {
            let mut out = self.output(phase, rows.len(), x.cols)?;
            // One copy per run of consecutive rows (a decode step is one run).
            let mut i = 0;
            while i < rows.len() {
                let first = rows[i] as usize;
                let run = rows[i..].iter().enumerate().take_while(|&(k, &r)| r as usize == first + k).count();
                let src = x.data.slice(first * x.cols..(first + run) * x.cols);
                let mut dst = out.data.slice_mut(i * x.cols..(i + run) * x.cols);
                phase.ctx.stream().memcpy_dtod(&src, &mut dst).map_err(kernel_error)?;
                i += run;
            }
            Ok(out)
        })
    }

    fn read_logits(&self, phase: &CudaPhase, logits: CudaMatrix, how: LogitsReadback) -> Result<CudaPending> {
        let ctx = &phase.ctx;
        let stream = ctx.stream();
        let (rows, cols) = (logits.rows, logits.cols);
        let mut readback = lock(&phase.readback);
        match how {
            LogitsReadback::Argmax => {
                if rows > READBACK_ROWS {
                    return Err(Error::invalid(format!("{rows} logit rows in a step; at most {READBACK_ROWS}")));
                }
                let (device, host) = &mut readback.ids;
                let mut device = device.slice_mut(..rows);
                elementwise::argmax(ctx, &logits.data.as_view(), cols, &mut device)?;
                copy_to_pinned(stream, &device.as_view(), host)?;
            }
            LogitsReadback::Full => {
                if readback.logits.as_ref().is_none_or(|host| host.len() < rows * cols) {
                    readback.logits = Some(self.pinned((rows * cols).next_power_of_two())?);
                }
                let Some(host) = readback.logits.as_mut() else { unreachable!("set above") };
                copy_to_pinned(stream, &logits.data.as_view(), host)?;
            }
        }
        let done = self.gpu.context().new_event(Some(CUevent_flags::CU_EVENT_DISABLE_TIMING)).map_err(kernel_error)?;
        done.record(stream).map_err(kernel_error)?;
        Ok(CudaPending { done, rows, cols, how })
    }

    fn time_ops(&self, phase: &CudaPhase, on: bool) -> Result<()> {
        *lock(&phase.timer) = on.then(Vec::new);
        Ok(())
    }

    fn take_op_times(&self, phase: &CudaPhase) -> Result<Vec<OpTime>> {
        let timed = lock(&phase.timer).as_mut().map(std::mem::take).unwrap_or_default();
        timed
            .into_iter()
            .map(|t| {
                let ms = t.start.elapsed_ms(&t.end).map_err(kernel_error)?;
                Ok(OpTime { shape: t.shape, sms: t.sms, seconds: f64::from(ms) / 1e3 })
            })
            .collect()
    }

    fn bandwidth_curve(&self) -> Vec<(u32, f64)> {
        self.gpu.model().bandwidth().points().to_vec()
    }

    fn is_ready(&self, pending: &CudaPending) -> Result<bool> {
        pending.done.try_is_complete().map_err(kernel_error)
    }

    fn take_logits(&self, phase: &CudaPhase, pending: CudaPending) -> Result<HostLogits> {
        pending.done.synchronize().map_err(kernel_error)?;
        let readback = lock(&phase.readback);
        let (rows, cols) = (pending.rows, pending.cols);
        let missing = || Error::invalid("logits were taken from another phase than the one that read them");
        match pending.how {
            LogitsReadback::Argmax => {
                let (_, host) = &readback.ids;
                Ok(HostLogits::Argmax(host.as_slice().map_err(kernel_error)?[..rows].to_vec()))
            }
            LogitsReadback::Full => {
                let host = readback.logits.as_ref().ok_or_else(missing)?;
                let data = host.as_slice().map_err(kernel_error)?[..rows * cols].iter().map(|v| v.to_f32()).collect();
                Ok(HostLogits::Full(HostTensor { shape: vec![rows, cols], data }))
            }
        }
    }
}

/// The smallest of `sizes` (ascending) that holds a decode step whose table fits the scope's
/// width; `None` for batches larger than every size or wider tables.
fn graph_bucket(sizes: &[usize], step: &StepInput, scope: StepScope) -> Option<usize> {
    let n = step.kv_lens.len();
    if n == 0 || step.max_blocks_per_seq > scope.max_blocks_per_seq {
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
            kind: StepKind::Decode,
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
        // A step that is not one token of each sequence with every row's logits is not a decode
        // step, whatever its kind says; a table wider than the scope runs eagerly.
        let mut prefill = step.clone();
        prefill.q_indptr = vec![0, 1, 2, 4];
        prefill.kv_lens = vec![20, 1];
        assert!(prefill.validate().is_err());
        let mut fewer_logits = step.clone();
        fewer_logits.logit_rows = vec![0, 2];
        assert!(fewer_logits.validate().is_err());
        assert!(StepInput { kind: StepKind::Prefill, ..fewer_logits }.validate().is_ok());
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
