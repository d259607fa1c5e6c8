//! The operations a model's forward pass needs, behind one trait, and the CPU backend that runs
//! them on [`nexus_kernels::reference`].
//!
//! The model is written once over [`Backend`]; a backend owns its storage (weights, activations,
//! KV pools) and turns a step's host-side inputs into whatever it needs once per step
//! ([`Backend::prepare`]), so that per-layer calls carry no host data.

use nexus_kernels::reference::{self, GemmShape};
use nexus_kernels::{AttentionBatch, PagedKvLayout, QkvLayout, RopeConfig};

use crate::gguf::HostTensor;
use crate::{Error, Result};

/// The host-side description of one forward step over a batch of sequences.
///
/// Sequence `i` contributes query rows `q_indptr[i]..q_indptr[i + 1]` (its new tokens) and has
/// `kv_lens[i]` tokens in the cache once they are written. `slots[t]` is where row `t`'s keys and
/// values go. Logits are computed only for `logit_rows`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepInput {
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

    /// Checks internal consistency (lengths agree, rows in range).
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

    /// Stores a weight.
    fn upload(&self, tensor: HostTensor) -> Result<Self::Weight>;
    /// A weight of `shape` filled with `mean + spread · u`, `u` uniform in [-1, 1) from a hash of
    /// `(seed, index)` ([`nexus_kernels::reference::fill_uniform`]), made where it will live.
    fn random_weight(&self, shape: Vec<usize>, seed: u64, mean: f32, spread: f32) -> Result<Self::Weight>;
    /// Allocates one layer's K and V pools.
    fn alloc_kv_pool(&self, layout: PagedKvLayout) -> Result<Self::KvPool>;
    /// Moves a step's inputs to the backend.
    fn prepare(&self, step: &StepInput) -> Result<Self::Step>;
    /// The decode batch sizes this backend records steps of ([`Backend::run_step`]), ascending;
    /// [`LlamaModel::warm_up`](crate::model::LlamaModel::warm_up) records them before serving.
    /// None by default.
    fn recorded_batch_sizes(&self) -> Vec<usize> {
        Vec::new()
    }
    /// Runs a forward step: `forward` over the prepared `step`, whose result is the logits of the
    /// step's logit rows. A backend may instead replay a recording of an earlier call of
    /// `forward` over the same `scope` (the CUDA backend does for decode steps): the result is
    /// then the same as calling it, and `forward` must depend on nothing but the step and the
    /// scope.
    fn run_step(
        &self,
        step: &StepInput,
        scope: StepScope,
        forward: &mut dyn FnMut(&Self::Step) -> Result<Self::Activation>,
    ) -> Result<Self::Activation> {
        let _ = scope;
        forward(&self.prepare(step)?)
    }

    /// Rows of `table` picked by the step's tokens.
    fn embedding(&self, table: &Self::Weight, step: &Self::Step) -> Result<Self::Activation>;
    /// RMSNorm of each row.
    fn rms_norm(&self, x: &Self::Activation, weight: &Self::Weight, eps: f32) -> Result<Self::Activation>;
    /// `residual += x`, then the RMSNorm of `residual`.
    fn fused_add_rms_norm(
        &self,
        x: &Self::Activation,
        residual: &mut Self::Activation,
        weight: &Self::Weight,
        eps: f32,
    ) -> Result<Self::Activation>;
    /// `x · weightᵀ (+ bias)`.
    fn linear(
        &self,
        x: &Self::Activation,
        weight: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Result<Self::Activation>;
    /// Rotates the Q and K heads of a fused QKV activation by the step's positions.
    fn rope(&self, qkv: &mut Self::Activation, layout: QkvLayout, rope: RopeConfig, step: &Self::Step) -> Result<()>;
    /// Writes the step's keys and values into the pools, then attends.
    fn attention(
        &self,
        qkv: &Self::Activation,
        layout: QkvLayout,
        pool: &mut Self::KvPool,
        step: &Self::Step,
        scale: f32,
    ) -> Result<Self::Activation>;
    /// `silu(gate) * up` of a fused `[rows, 2 × width]` activation.
    fn silu_and_mul(&self, gate_up: &Self::Activation) -> Result<Self::Activation>;
    /// The step's logit rows of `x`.
    fn gather_logit_rows(&self, x: &Self::Activation, step: &Self::Step) -> Result<Self::Activation>;
    /// The index of the largest value of each row.
    fn argmax(&self, x: &Self::Activation) -> Result<Vec<u32>>;
    /// Copies an activation to the host as `[rows, cols]`.
    fn to_host(&self, x: &Self::Activation) -> Result<HostTensor>;
}

/// A `[rows, cols]` f32 matrix of the CPU backend.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl CpuMatrix {
    fn zeros(rows: usize, cols: usize) -> Self {
        CpuMatrix { rows, cols, data: vec![0.0; rows * cols] }
    }
}

/// One layer's K and V pools on the CPU.
#[derive(Clone, Debug)]
pub struct CpuKvPool {
    pub layout: PagedKvLayout,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

/// The CPU backend: f32 everywhere, on the kernels' plain-Rust references.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Weight = HostTensor;
    type Activation = CpuMatrix;
    type KvPool = CpuKvPool;
    type Step = StepInput;

    fn upload(&self, tensor: HostTensor) -> Result<HostTensor> {
        Ok(tensor)
    }

    fn random_weight(&self, shape: Vec<usize>, seed: u64, mean: f32, spread: f32) -> Result<HostTensor> {
        let mut data = vec![0.0; shape.iter().product()];
        reference::fill_uniform(&mut data, seed, mean, spread);
        Ok(HostTensor { shape, data })
    }

    fn alloc_kv_pool(&self, layout: PagedKvLayout) -> Result<CpuKvPool> {
        Ok(CpuKvPool { layout, k: vec![0.0; layout.pool_len()], v: vec![0.0; layout.pool_len()] })
    }

    fn prepare(&self, step: &StepInput) -> Result<StepInput> {
        step.validate()?;
        Ok(step.clone())
    }

    fn embedding(&self, table: &HostTensor, step: &StepInput) -> Result<CpuMatrix> {
        let hidden = *table.shape.last().ok_or_else(|| Error::invalid("embedding table has no shape"))?;
        let mut out = CpuMatrix::zeros(step.tokens.len(), hidden);
        reference::embedding(&table.data, hidden, &step.tokens, &mut out.data)?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CpuMatrix, weight: &HostTensor, eps: f32) -> Result<CpuMatrix> {
        let mut out = CpuMatrix::zeros(x.rows, x.cols);
        reference::rms_norm(&x.data, &weight.data, eps, &mut out.data)?;
        Ok(out)
    }

    fn fused_add_rms_norm(
        &self,
        x: &CpuMatrix,
        residual: &mut CpuMatrix,
        weight: &HostTensor,
        eps: f32,
    ) -> Result<CpuMatrix> {
        let mut out = CpuMatrix::zeros(x.rows, x.cols);
        reference::fused_add_rms_norm(&x.data, &mut residual.data, &weight.data, eps, &mut out.data)?;
        Ok(out)
    }

    fn linear(&self, x: &CpuMatrix, weight: &HostTensor, bias: Option<&HostTensor>) -> Result<CpuMatrix> {
        let n = weight.shape.first().copied().unwrap_or(0);
        let mut out = CpuMatrix::zeros(x.rows, n);
        let shape = GemmShape { m: x.rows, n, k: x.cols };
        reference::gemm(&x.data, &weight.data, bias.map(|b| b.data.as_slice()), &mut out.data, shape)?;
        Ok(out)
    }

    fn rope(&self, qkv: &mut CpuMatrix, layout: QkvLayout, rope: RopeConfig, step: &StepInput) -> Result<()> {
        Ok(reference::rope(&mut qkv.data, &step.positions, layout, rope)?)
    }

    fn attention(
        &self,
        qkv: &CpuMatrix,
        layout: QkvLayout,
        pool: &mut CpuKvPool,
        step: &StepInput,
        scale: f32,
    ) -> Result<CpuMatrix> {
        reference::write_kv_cache(&qkv.data, layout, &step.slots, &mut pool.k, &mut pool.v, pool.layout)?;
        let mut out = CpuMatrix::zeros(qkv.rows, layout.num_heads * layout.head_dim);
        let batch = step.attention_batch();
        reference::prefill_attention(&qkv.data, layout, &pool.k, &pool.v, pool.layout, batch, scale, &mut out.data)?;
        Ok(out)
    }

    fn silu_and_mul(&self, gate_up: &CpuMatrix) -> Result<CpuMatrix> {
        let mut out = CpuMatrix::zeros(gate_up.rows, gate_up.cols / 2);
        reference::silu_and_mul(&gate_up.data, gate_up.cols / 2, &mut out.data)?;
        Ok(out)
    }

    fn gather_logit_rows(&self, x: &CpuMatrix, step: &StepInput) -> Result<CpuMatrix> {
        let mut out = CpuMatrix::zeros(step.logit_rows.len(), x.cols);
        for (dst, &r) in out.data.chunks_exact_mut(x.cols).zip(&step.logit_rows) {
            dst.copy_from_slice(&x.data[r as usize * x.cols..][..x.cols]);
        }
        Ok(out)
    }

    fn argmax(&self, x: &CpuMatrix) -> Result<Vec<u32>> {
        Ok(reference::argmax(&x.data, x.cols)?)
    }

    fn to_host(&self, x: &CpuMatrix) -> Result<HostTensor> {
        Ok(HostTensor { shape: vec![x.rows, x.cols], data: x.data.clone() })
    }
}
