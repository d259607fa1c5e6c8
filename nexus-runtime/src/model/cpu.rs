//! The CPU backend: f32 everywhere, on the kernels' plain-Rust references
//! ([`nexus_kernels::reference`]).
//!
//! Its phases run one after the other: a step computes while it is launched, so its logits are
//! ready at once. Budgets are bookkeeping only, counted out of [`CPU_SM_COUNT`] nominal SMs so
//! that the schedulers' splits work (and are tested) the same way as on a GPU.

use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use nexus_kernels::reference::{self, GemmShape};
use nexus_kernels::{PagedKvLayout, QkvLayout, RopeConfig};

use crate::model::backend::{Backend, HostLogits, LogitsReadback, OpShape, OpTime, StepInput, check_budget};
use crate::weights::gguf::HostTensor;
use crate::{Error, Result};

/// The nominal SM count of the CPU backend's budgets (an H100's or H200's).
pub const CPU_SM_COUNT: u32 = 132;

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

/// A phase of the CPU backend: its budget, which changes nothing of how it computes, and the
/// operators it timed, when it times them.
#[derive(Debug)]
pub struct CpuPhase {
    pub budget: u32,
    timed: Mutex<Option<Vec<OpTime>>>,
}

impl CpuPhase {
    fn timed(&self) -> MutexGuard<'_, Option<Vec<OpTime>>> {
        self.timed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Runs `op`, timing it as `shape` when the phase times its operators.
    fn run<T>(&self, shape: OpShape, op: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let out = op()?;
        if let Some(times) = self.timed().as_mut() {
            times.push(OpTime { shape, sms: self.budget, seconds: start.elapsed().as_secs_f64() });
        }
        Ok(out)
    }
}

/// The nominal bandwidth curve of the CPU backend's budgets: 10 GB/s per nominal SM, flat past
/// 8 of them (what a few cores stream). Only the cost model's plumbing runs on it.
const CPU_BANDWIDTH: [(u32, f64); 2] = [(1, 10e9), (8, 80e9)];

/// The CPU backend.
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Weight = HostTensor;
    type Activation = CpuMatrix;
    type KvPool = CpuKvPool;
    type Step = StepInput;
    type Phase = CpuPhase;
    type Pending = HostLogits;

    fn sm_count(&self) -> u32 {
        CPU_SM_COUNT
    }

    fn device_name(&self) -> String {
        "CPU".into()
    }

    fn new_phase(&self) -> Result<CpuPhase> {
        Ok(CpuPhase { budget: CPU_SM_COUNT, timed: Mutex::new(None) })
    }

    fn set_budget(&self, phase: &mut CpuPhase, sms: u32) -> Result<()> {
        check_budget(sms, CPU_SM_COUNT)?;
        phase.budget = sms;
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn upload(&self, tensor: HostTensor) -> Result<HostTensor> {
        Ok(tensor)
    }

    fn random_weight(&self, shape: Vec<usize>, seed: u64, mean: f32, spread: f32) -> Result<HostTensor> {
        let mut data = vec![0.0; shape.iter().product()];
        reference::fill_uniform(&mut data, seed, mean, spread);
        Ok(HostTensor { shape, data })
    }

    fn alloc_kv_pool(&self, layout: PagedKvLayout) -> Result<CpuKvPool> {
        let len = layout
            .num_blocks
            .checked_mul(layout.slot_len())
            .and_then(|n| n.checked_mul(layout.block_size))
            .ok_or_else(|| Error::invalid(format!("a KV pool of {layout:?} has more values than memory holds")))?;
        let zeros = || -> Result<Vec<f32>> {
            let mut pool = Vec::new();
            pool.try_reserve_exact(len)
                .map_err(|e| Error::invalid(format!("no memory for a KV pool of {layout:?}: {e}")))?;
            pool.resize(len, 0.0);
            Ok(pool)
        };
        Ok(CpuKvPool { layout, k: zeros()?, v: zeros()? })
    }

    fn prepare(&self, _: &CpuPhase, step: &StepInput) -> Result<StepInput> {
        step.validate()?;
        Ok(step.clone())
    }

    fn embedding(&self, phase: &CpuPhase, table: &HostTensor, step: &StepInput) -> Result<CpuMatrix> {
        let hidden = *table.shape.last().ok_or_else(|| Error::invalid("embedding table has no shape"))?;
        phase.run(OpShape::elementwise(2 * step.tokens.len() * hidden), || {
            let mut out = CpuMatrix::zeros(step.tokens.len(), hidden);
            reference::embedding(&table.data, hidden, &step.tokens, &mut out.data)?;
            Ok(out)
        })
    }

    fn rms_norm(&self, phase: &CpuPhase, x: &CpuMatrix, weight: &HostTensor, eps: f32) -> Result<CpuMatrix> {
        phase.run(OpShape::elementwise(2 * x.data.len()), || {
            let mut out = CpuMatrix::zeros(x.rows, x.cols);
            reference::rms_norm(&x.data, &weight.data, eps, &mut out.data)?;
            Ok(out)
        })
    }

    fn fused_add_rms_norm(
        &self,
        phase: &CpuPhase,
        x: &CpuMatrix,
        residual: &mut CpuMatrix,
        weight: &HostTensor,
        eps: f32,
    ) -> Result<CpuMatrix> {
        phase.run(OpShape::elementwise(4 * x.data.len()), || {
            let mut out = CpuMatrix::zeros(x.rows, x.cols);
            reference::fused_add_rms_norm(&x.data, &mut residual.data, &weight.data, eps, &mut out.data)?;
            Ok(out)
        })
    }

    fn linear(
        &self,
        phase: &CpuPhase,
        _: &StepInput,
        x: &CpuMatrix,
        weight: &HostTensor,
        bias: Option<&HostTensor>,
    ) -> Result<CpuMatrix> {
        let n = weight.shape.first().copied().unwrap_or(0);
        phase.run(OpShape::gemm(x.rows, n, x.cols), || {
            let mut out = CpuMatrix::zeros(x.rows, n);
            let shape = GemmShape { m: x.rows, n, k: x.cols };
            reference::gemm(&x.data, &weight.data, bias.map(|b| b.data.as_slice()), &mut out.data, shape)?;
            Ok(out)
        })
    }

    fn rope_and_write_kv(
        &self,
        phase: &CpuPhase,
        qkv: &mut CpuMatrix,
        layout: QkvLayout,
        rope: RopeConfig,
        pool: &mut CpuKvPool,
        step: &StepInput,
    ) -> Result<()> {
        phase.run(OpShape::rope_and_write_kv(qkv.rows, layout), || {
            Ok(reference::rope_and_write_kv(
                &mut qkv.data,
                &step.positions,
                layout,
                rope,
                &step.slots,
                &mut pool.k,
                &mut pool.v,
                pool.layout,
            )?)
        })
    }

    fn attention(
        &self,
        phase: &CpuPhase,
        qkv: &CpuMatrix,
        layout: QkvLayout,
        pool: &CpuKvPool,
        step: &StepInput,
        scale: f32,
    ) -> Result<CpuMatrix> {
        phase.run(OpShape::attention(step), || {
            let mut out = CpuMatrix::zeros(qkv.rows, layout.num_heads * layout.head_dim);
            let batch = step.attention_batch();
            reference::prefill_attention(
                &qkv.data,
                layout,
                &pool.k,
                &pool.v,
                pool.layout,
                batch,
                scale,
                &mut out.data,
            )?;
            Ok(out)
        })
    }

    fn linear_silu_and_mul(
        &self,
        phase: &CpuPhase,
        _: &StepInput,
        x: &CpuMatrix,
        gate_up: &HostTensor,
    ) -> Result<CpuMatrix> {
        let n = gate_up.shape.first().copied().unwrap_or(0);
        phase.run(OpShape::gemm(x.rows, n, x.cols), || {
            let mut out = CpuMatrix::zeros(x.rows, n / 2);
            let shape = GemmShape { m: x.rows, n, k: x.cols };
            reference::gemm_silu_and_mul(&x.data, &gate_up.data, &mut out.data, shape)?;
            Ok(out)
        })
    }

    fn gather_logit_rows(&self, phase: &CpuPhase, x: &CpuMatrix, step: &StepInput) -> Result<CpuMatrix> {
        phase.run(OpShape::elementwise(2 * step.logit_rows.len() * x.cols), || {
            let mut out = CpuMatrix::zeros(step.logit_rows.len(), x.cols);
            for (dst, &r) in out.data.chunks_exact_mut(x.cols).zip(&step.logit_rows) {
                dst.copy_from_slice(&x.data[r as usize * x.cols..][..x.cols]);
            }
            Ok(out)
        })
    }

    fn read_logits(&self, _: &CpuPhase, logits: CpuMatrix, how: LogitsReadback) -> Result<HostLogits> {
        Ok(match how {
            LogitsReadback::Argmax => HostLogits::Argmax(reference::argmax(&logits.data, logits.cols)?),
            LogitsReadback::Full => {
                HostLogits::Full(HostTensor { shape: vec![logits.rows, logits.cols], data: logits.data })
            }
        })
    }

    fn is_ready(&self, _: &HostLogits) -> Result<bool> {
        Ok(true)
    }

    fn take_logits(&self, _: &CpuPhase, pending: HostLogits) -> Result<HostLogits> {
        Ok(pending)
    }

    fn time_ops(&self, phase: &CpuPhase, on: bool) -> Result<()> {
        *phase.timed() = on.then(Vec::new);
        Ok(())
    }

    fn take_op_times(&self, phase: &CpuPhase) -> Result<Vec<OpTime>> {
        Ok(phase.timed().as_mut().map(std::mem::take).unwrap_or_default())
    }

    fn bandwidth_curve(&self) -> Vec<(u32, f64)> {
        CPU_BANDWIDTH.to_vec()
    }
}
