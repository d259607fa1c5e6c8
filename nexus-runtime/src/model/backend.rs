//! The operations a model's forward pass needs, behind one trait.
//!
//! The model is written once over [`Backend`]. A backend owns what both phases share (weights
//! and KV pools); a [`Backend::Phase`] is one lane of execution — on the GPU a stream, a CTA
//! budget and the lane's own scratch, workspaces and recorded steps — and every operation runs
//! in the phase it is given, so two forward passes can be in flight at once, one per phase. A
//! step's host-side inputs become what the backend needs once per step ([`Backend::prepare`]),
//! so that per-layer calls carry no host data, and its logits come back to the host without
//! blocking the caller ([`Backend::read_logits`], [`Backend::is_ready`],
//! [`Backend::take_logits`]).

use std::time::Instant;

use nexus_kernels::{AttentionBatch, PagedKvLayout, QkvLayout, RopeConfig};

use crate::weights::gguf::HostTensor;
use crate::{Error, Result};

/// What a step computes, as the scheduler decided it: the backend picks its kernels (and
/// whether a recording can be replayed) from this, never from the step's shape.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// One new token of each sequence, every row's logits: decode attention, and replays of
    /// recorded steps where the backend has them.
    Decode,
    /// Prompt chunks, possibly with single-token rows of sequences that decode (the chunked
    /// scheduler's mixed batches): every row goes through the prefill attention kernel.
    #[default]
    Prefill,
}

/// The host-side description of one forward step over a batch of sequences.
///
/// Sequence `i` contributes query rows `q_indptr[i]..q_indptr[i + 1]` (its new tokens) and has
/// `kv_lens[i]` tokens in the cache once they are written. `slots[t]` is where row `t`'s keys and
/// values go. Logits are computed only for `logit_rows`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepInput {
    pub kind: StepKind,
    pub tokens: Vec<u32>,
    pub positions: Vec<u32>,
    pub slots: Vec<u32>,
    pub q_indptr: Vec<u32>,
    pub kv_lens: Vec<u32>,
    pub block_tables: Vec<i32>,
    pub max_blocks_per_seq: usize,
    pub logit_rows: Vec<u32>,
}

impl StepInput {
    /// The number of query rows (new tokens).
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// The attention batch these inputs describe.
    pub fn attention_batch(&self) -> AttentionBatch<'_> {
        AttentionBatch {
            q_indptr: &self.q_indptr,
            kv_lens: &self.kv_lens,
            block_tables: &self.block_tables,
            max_blocks_per_seq: self.max_blocks_per_seq,
        }
    }

    /// This decode step of `n` sequences as one of `batch >= n` with block tables `width` wide
    /// (at least this step's): the padding sequences hold one token at the start of the scope's
    /// padding block, where they write. Backends that record steps replay one recording for
    /// every batch up to its size this way; an empty step gives a batch of padding only.
    pub fn padded_decode(&self, batch: usize, width: usize, scope: StepScope) -> StepInput {
        let n = self.kv_lens.len();
        let mut block_tables = vec![scope.padding_block as i32; batch * width];
        for (i, row) in self.block_tables.chunks(self.max_blocks_per_seq.max(1)).take(n).enumerate() {
            block_tables[i * width..][..row.len()].copy_from_slice(row);
        }
        let pad = batch - n;
        let extend =
            |v: &[u32], value: u32| v.iter().copied().chain(std::iter::repeat_n(value, pad)).collect::<Vec<u32>>();
        StepInput {
            kind: StepKind::Decode,
            tokens: extend(&self.tokens, 0),
            positions: extend(&self.positions, 0),
            slots: extend(&self.slots, scope.padding_block * scope.block_size as u32),
            q_indptr: (0..=batch as u32).collect(),
            kv_lens: extend(&self.kv_lens, 1),
            block_tables,
            max_blocks_per_seq: width,
            logit_rows: (0..batch as u32).collect(),
        }
    }

    /// Checks internal consistency (lengths agree, rows in range, and a decode step is one token
    /// of each sequence with every row's logits, in order).
    pub fn validate(&self) -> Result<()> {
        let n = self.tokens.len();
        if self.positions.len() != n || self.slots.len() != n {
            return Err(Error::invalid("step input: tokens, positions and slots differ in length"));
        }
        if self.q_indptr.len() != self.kv_lens.len() + 1 || self.q_indptr.last().map(|&x| x as usize) != Some(n) {
            return Err(Error::invalid("step input: q_indptr does not cover the tokens"));
        }
        if let Some(&r) = self.logit_rows.iter().find(|&&r| r as usize >= n) {
            return Err(Error::invalid(format!("step input: logit row {r} of {n}")));
        }
        let one_row_each = self.kv_lens.len() == n && self.logit_rows.iter().enumerate().all(|(i, &r)| r as usize == i);
        if self.kind == StepKind::Decode && !(one_row_each && self.logit_rows.len() == n) {
            return Err(Error::invalid(
                "step input: a decode step must be one token of each sequence, all with logits",
            ));
        }
        Ok(())
    }
}

/// What a forward step runs over besides its inputs, for backends that record steps and replay
/// them ([`Backend::run_step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepScope {
    /// Identifies the model and KV cache the step reads and writes; a recording is replayed only
    /// over the same ones.
    pub cache_id: u64,
    /// The widest block table a sequence of the model can need.
    pub max_blocks_per_seq: usize,
    /// A cache block no sequence owns, where padding rows may write.
    pub padding_block: u32,
    /// Tokens per cache block.
    pub block_size: usize,
}

/// How a step's logits come back to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitsReadback {
    /// The index of each row's largest logit, picked on the device (greedy sampling).
    Argmax,
    /// Every logit (for sampling, penalties and log-probabilities on the host).
    Full,
}

/// Logits on the host, as [`LogitsReadback`] asked.
#[derive(Clone, Debug, PartialEq)]
pub enum HostLogits {
    /// The largest logit's index of each row.
    Argmax(Vec<u32>),
    /// `[rows, vocab]`.
    Full(HostTensor),
}

/// What a timed operator did ([`Backend::time_ops`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OpShape {
    /// `[m, k] · [n, k]ᵀ`.
    Gemm { m: usize, n: usize, k: usize },
    /// Attention of a step of `kind` over `tokens` query rows of `seqs` sequences, attending to
    /// `attended` query-key pairs and reading `kv_tokens` cached tokens of K and V (with the
    /// write of the step's keys and values).
    Attention { kind: StepKind, tokens: usize, seqs: usize, attended: f64, kv_tokens: f64 },
    /// An elementwise operator (norm, RoPE, embedding, row gather) moving `bytes`.
    Elementwise { bytes: f64 },
}

impl OpShape {
    /// A GEMM of `[m, k] · [n, k]ᵀ`.
    pub fn gemm(m: usize, n: usize, k: usize) -> Self {
        OpShape::Gemm { m, n, k }
    }

    /// The attention of `step`.
    pub fn attention(step: &StepInput) -> Self {
        let (mut attended, mut kv_tokens) = (0.0, 0.0);
        for (q, &kv) in step.q_indptr.windows(2).zip(&step.kv_lens) {
            let (c, total) = (f64::from(q[1] - q[0]), f64::from(kv));
            attended += c * (total - c) + c * (c + 1.0) / 2.0;
            kv_tokens += total;
        }
        OpShape::Attention { kind: step.kind, tokens: step.num_tokens(), seqs: step.kv_lens.len(), attended, kv_tokens }
    }

    /// An elementwise operator that reads or writes `values` bf16 values in all.
    pub fn elementwise(values: usize) -> Self {
        OpShape::Elementwise { bytes: 2.0 * values as f64 }
    }

    /// [`Backend::rope_and_write_kv`] over `rows` tokens: the Q and K heads read and written, the
    /// V heads read, and K and V written to the pools.
    pub fn rope_and_write_kv(rows: usize, layout: QkvLayout) -> Self {
        let (rotated, kv) =
            ((layout.num_heads + layout.num_kv_heads) * layout.head_dim, layout.num_kv_heads * layout.head_dim);
        Self::elementwise(rows * (2 * rotated + 3 * kv))
    }
}

/// What a backend's decode steps run inside other kernels, which decides the elementwise
/// launches they make (the cost model counts them): a decode step of at most `norm_rows` rows
/// runs its residual adds and norms inside the GEMMs, and with `rope` its RoPE and KV write
/// inside the attention kernel. The default: neither. A backend may fuse fewer rows in some
/// phases ([`Backend::fuses_norms`]; the CUDA backend's with every SM and dependent launches):
/// `norm_rows` is what its budgeted lanes, which the cost model prices, fuse.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DecodeFusions {
    pub norm_rows: usize,
    pub rope: bool,
}

/// An operator timed on a phase: what it did, its budget, and how long it took.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OpTime {
    pub shape: OpShape,
    pub sms: u32,
    pub seconds: f64,
}

/// Fails unless `sms` is a budget of a device of `sm_count` SMs (1 ..= `sm_count`).
pub(crate) fn check_budget(sms: u32, sm_count: u32) -> Result<()> {
    if sms == 0 || sms > sm_count {
        return Err(Error::invalid(format!("budget {sms} is not between 1 and the {sm_count} SMs")));
    }
    Ok(())
}

/// What a model needs from a device.
pub trait Backend {
    /// A stored weight.
    type Weight;
    /// An activation matrix `[rows, cols]`.
    type Activation;
    /// One layer's K and V pools.
    type KvPool;
    /// A step's inputs, in the backend's memory.
    type Step;
    /// One lane of execution with the state it owns (see the module documentation). A phase
    /// runs one step at a time; two phases may each have one in flight.
    type Phase;
    /// A step's logits on their way to the host.
    type Pending;

    /// The number of SMs budgets are counted in: a phase's budget is between 1 and this.
    fn sm_count(&self) -> u32;
    /// What the device is called (a cost-model profile is made for one).
    fn device_name(&self) -> String;
    /// A new phase with a budget of every SM.
    fn new_phase(&self) -> Result<Self::Phase>;
    /// Sets the CTA budget of `phase`'s next steps (1 ..= [`Backend::sm_count`]).
    fn set_budget(&self, phase: &mut Self::Phase, sms: u32) -> Result<()>;
    /// Waits until everything every phase launched is done.
    fn synchronize(&self) -> Result<()>;
    /// Whether a step in flight can take a new budget ([`Backend::resize_in_flight`]). None can
    /// by default: a kernel's budget is its launch argument, fixed when the host enqueues it,
    /// well before it runs.
    fn resizes_in_flight(&self) -> bool {
        false
    }
    /// Gives `phase`'s step in flight a budget of `sms` (1 ..= [`Backend::sm_count`]) from its
    /// next kernel on, where [`Backend::resizes_in_flight`] says it can (a step that has ended,
    /// seen or not, keeps what it had); fails elsewhere.
    fn resize_in_flight(&self, phase: &Self::Phase, sms: u32) -> Result<()> {
        let _ = (phase, sms);
        Err(Error::invalid("this backend cannot change the budget of a step in flight"))
    }

    /// Stores a weight; like the two calls below, what it makes is ready for every phase when it
    /// returns.
    fn upload(&self, tensor: HostTensor) -> Result<Self::Weight>;
    /// A weight of `shape` filled with `mean + spread · u`, `u` uniform in [-1, 1) from a hash of
    /// `(seed, index)` ([`nexus_kernels::reference::fill_uniform`]), made where it will live.
    fn random_weight(&self, shape: Vec<usize>, seed: u64, mean: f32, spread: f32) -> Result<Self::Weight>;
    /// Allocates one layer's K and V pools.
    fn alloc_kv_pool(&self, layout: PagedKvLayout) -> Result<Self::KvPool>;
    /// Moves a step's inputs to the backend, in `phase`.
    fn prepare(&self, phase: &Self::Phase, step: &StepInput) -> Result<Self::Step>;
    /// The decode batch sizes this backend records steps of ([`Backend::run_step`]), ascending;
    /// [`LlamaModel::warm_up`](crate::model::LlamaModel::warm_up) records them before serving.
    /// None by default.
    fn recorded_batch_sizes(&self) -> Vec<usize> {
        Vec::new()
    }
    /// Runs a forward step in `phase`: `forward` over the prepared `step`, whose result is the
    /// logits of the step's logit rows. A backend may instead replay a recording of an earlier
    /// call of `forward` over the same `scope` and budget (the CUDA backend does for decode
    /// steps): the result is then the same as calling it, and `forward` must depend on nothing
    /// but the phase, the step and the scope.
    fn run_step(
        &self,
        phase: &Self::Phase,
        step: &StepInput,
        scope: StepScope,
        forward: &mut dyn FnMut(&Self::Step) -> Result<Self::Activation>,
    ) -> Result<Self::Activation> {
        let _ = scope;
        forward(&self.prepare(phase, step)?)
    }

    /// Rows of `table` picked by the step's tokens.
    fn embedding(&self, phase: &Self::Phase, table: &Self::Weight, step: &Self::Step) -> Result<Self::Activation>;
    /// RMSNorm of each row.
    fn rms_norm(
        &self,
        phase: &Self::Phase,
        x: &Self::Activation,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Activation>;
    /// `residual += x`, then the RMSNorm of `residual`.
    fn fused_add_rms_norm(
        &self,
        phase: &Self::Phase,
        x: &Self::Activation,
        residual: &mut Self::Activation,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Activation>;
    /// `x · weightᵀ (+ bias)`, for `step` (whose GEMM kernel choices a backend may keep).
    fn linear(
        &self,
        phase: &Self::Phase,
        step: &Self::Step,
        x: &Self::Activation,
        weight: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Activation>;
    /// Whether the model's weights after each RMSNorm (QKV, gate/up) hold that norm's gain
    /// ([`Backend::fold_norm_gain`]), its norm kernels then running with a gain of ones: a backend
    /// that [fuses norms](Backend::fuses_norms) into its GEMMs in some steps. None by default.
    fn folds_norm_gains(&self) -> bool {
        false
    }
    /// `weight` (`[rows, gain.len()]`) with each row multiplied by `gain` elementwise, where
    /// [`Backend::folds_norm_gains`].
    fn fold_norm_gain(&self, weight: Self::Weight, gain: &Self::Weight) -> Result<Self::Weight> {
        let _ = (weight, gain);
        Err(Error::invalid("this backend keeps its norms' gains apart"))
    }
    /// Whether `step`, run in `phase`, runs each layer's residual adds and RMSNorms inside its
    /// GEMMs ([`Backend::linear_add`], [`Backend::linear_normalized`],
    /// [`Backend::linear_silu_and_mul_normalized`]) instead of norm kernels; only where
    /// [`Backend::folds_norm_gains`].
    fn fuses_norms(&self, phase: &Self::Phase, step: &Self::Step) -> bool {
        let _ = (phase, step);
        false
    }
    /// `residual += x · weightᵀ`, keeping what [`Backend::linear_normalized`] needs of the new
    /// residual's rows (their sums of squares), where [`Backend::fuses_norms`].
    fn linear_add(
        &self,
        phase: &Self::Phase,
        step: &Self::Step,
        x: &Self::Activation,
        weight: &Self::Weight,
        residual: &mut Self::Activation,
    ) -> Result<()> {
        let _ = (phase, step, x, weight, residual);
        Err(Error::invalid("this backend fuses no residual add into its GEMMs"))
    }
    /// `rms_norm(x) · weightᵀ (+ bias)`, where `weight` holds the norm's gain and `x` was last
    /// written by [`Backend::linear_add`].
    fn linear_normalized(
        &self,
        phase: &Self::Phase,
        step: &Self::Step,
        x: &Self::Activation,
        weight: &Self::Weight,
        bias: Option<&Self::Weight>,
        eps: f32,
    ) -> Result<Self::Activation> {
        let _ = (phase, step, x, weight, bias, eps);
        Err(Error::invalid("this backend fuses no RMSNorm into its GEMMs"))
    }
    /// [`Backend::linear_silu_and_mul`] of `rms_norm(x)`, as [`Backend::linear_normalized`].
    fn linear_silu_and_mul_normalized(
        &self,
        phase: &Self::Phase,
        step: &Self::Step,
        x: &Self::Activation,
        gate_up: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Activation> {
        let _ = (phase, step, x, gate_up, eps);
        Err(Error::invalid("this backend fuses no RMSNorm into its GEMMs"))
    }
    /// What this backend's decode steps fuse (none by default).
    fn decode_fusions(&self) -> DecodeFusions {
        DecodeFusions::default()
    }
    /// Rotates the Q and K heads of a fused QKV activation by the step's positions, and writes
    /// the step's (rotated) keys and its values into the pools. The pools are shared by every
    /// phase: a step writes only its own sequences' slots.
    fn rope_and_write_kv(
        &self,
        phase: &Self::Phase,
        qkv: &mut Self::Activation,
        layout: QkvLayout,
        rope: RopeConfig,
        pool: &mut Self::KvPool,
        step: &Self::Step,
    ) -> Result<()>;
    /// Attends with the step's queries over the pools, which hold its keys and values
    /// ([`Backend::rope_and_write_kv`]); a step reads only its own sequences' blocks.
    fn attention(
        &self,
        phase: &Self::Phase,
        qkv: &Self::Activation,
        layout: QkvLayout,
        pool: &Self::KvPool,
        step: &Self::Step,
        scale: f32,
    ) -> Result<Self::Activation>;
    /// [`Backend::rope_and_write_kv`], then [`Backend::attention`]: one call, so that a backend may
    /// do both in one launch (the CUDA backend's decode steps). `qkv` is left rotated or not.
    #[allow(clippy::too_many_arguments)]
    fn rope_and_attention(
        &self,
        phase: &Self::Phase,
        qkv: &mut Self::Activation,
        layout: QkvLayout,
        rope: RopeConfig,
        pool: &mut Self::KvPool,
        step: &Self::Step,
        scale: f32,
    ) -> Result<Self::Activation> {
        self.rope_and_write_kv(phase, qkv, layout, rope, pool, step)?;
        self.attention(phase, qkv, layout, pool, step, scale)
    }
    /// The SwiGLU of a feed-forward layer, `silu(x · gateᵀ) * (x · upᵀ)`, where `gate_up` is
    /// `[2 × width, in]` (the gate rows, then the up rows) and the result `[rows, width]`.
    fn linear_silu_and_mul(
        &self,
        phase: &Self::Phase,
        step: &Self::Step,
        x: &Self::Activation,
        gate_up: &Self::Weight,
    ) -> Result<Self::Activation>;
    /// The step's logit rows of `x`.
    fn gather_logit_rows(
        &self,
        phase: &Self::Phase,
        x: &Self::Activation,
        step: &Self::Step,
    ) -> Result<Self::Activation>;

    /// Starts bringing `logits` (`[rows, vocab]`) to the host after the work `phase` has queued,
    /// without waiting for it.
    fn read_logits(&self, phase: &Self::Phase, logits: Self::Activation, how: LogitsReadback) -> Result<Self::Pending>;
    /// Whether `pending`'s logits have arrived (the step that made them is done).
    fn is_ready(&self, pending: &Self::Pending) -> Result<bool>;
    /// The time on the device's clock: the host's, unless the device keeps its own (a
    /// simulation in virtual time), which the engine and a replay then read instead.
    fn now(&self) -> Instant {
        Instant::now()
    }
    /// Waits until `instant` on [`Backend::now`]'s clock.
    fn sleep_until(&self, instant: Instant) {
        std::thread::sleep(instant.saturating_duration_since(Instant::now()));
    }
    /// Waits a moment between polls of [`Backend::is_ready`] (a device on a clock of its own
    /// moves it on to the next step's end).
    fn idle(&self) {
        std::thread::yield_now();
    }
    /// The logits of `pending`, read in `phase`; waits for them if they are not ready.
    fn take_logits(&self, phase: &Self::Phase, pending: Self::Pending) -> Result<HostLogits>;
    /// Starts (or stops) timing every operator `phase` runs, for a profile of the device: each is
    /// then measured on its own, which makes steps slower.
    fn time_ops(&self, phase: &Self::Phase, on: bool) -> Result<()>;
    /// The operators `phase` timed since its timing started, in order, once they are done
    /// (waits for them).
    fn take_op_times(&self, phase: &Self::Phase) -> Result<Vec<OpTime>>;
    /// The streaming-read bandwidth of the device against its SMs, `(SMs, bytes/s)` from 1 SM up
    /// (what the cost model prices memory-bound operators with).
    fn bandwidth_curve(&self) -> Vec<(u32, f64)>;
    /// [`Backend::read_logits`] and [`Backend::take_logits`] at once: waits for the step.
    fn logits_to_host(&self, phase: &Self::Phase, logits: Self::Activation, how: LogitsReadback) -> Result<HostLogits> {
        let pending = self.read_logits(phase, logits, how)?;
        self.take_logits(phase, pending)
    }
}
