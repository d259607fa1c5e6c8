//! The CUDA backend: the model's operations on `nexus-kernels`' GPU kernels, bf16 in memory.
//!
//! Every launch goes to the backend's [`PhaseContext`] (one stream, one CTA budget). A step's
//! host inputs are uploaded once in [`Backend::prepare`]; its attention plan (decode when every
//! sequence brings one token, prefill otherwise) is made at the first layer and reused by the
//! others, since all layers share the batch and the cache layout.

use std::cell::OnceCell;
use std::sync::Mutex;

use nexus_kernels::cudarc::driver::CudaSlice;
use nexus_kernels::decode_attention::{self, DecodeOptions, DecodePlan};
use nexus_kernels::gemm::{self, GemmWorkspace};
use nexus_kernels::prefill_attention::{self, PrefillPlan};
use nexus_kernels::reference::GemmShape;
use nexus_kernels::{PagedKvLayout, PhaseContext, QkvLayout, RopeConfig, bf16, elementwise};

use crate::backend::{Backend, StepInput};
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
}

impl std::fmt::Debug for CudaStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaStep").field("tokens", &self.host.tokens.len()).finish_non_exhaustive()
    }
}

/// Runs the model on one GPU stream with one CTA budget.
#[derive(Debug)]
pub struct CudaBackend {
    ctx: PhaseContext,
    gemm_workspace: Mutex<GemmWorkspace>,
}

impl CudaBackend {
    /// A backend launching on `ctx`.
    pub fn new(ctx: PhaseContext) -> Result<Self> {
        let gemm_workspace = Mutex::new(GemmWorkspace::new(&ctx)?);
        Ok(CudaBackend { ctx, gemm_workspace })
    }

    /// The phase context every launch uses.
    pub fn context(&self) -> &PhaseContext {
        &self.ctx
    }

    fn zeros(&self, rows: usize, cols: usize) -> Result<CudaMatrix> {
        Ok(CudaMatrix { rows, cols, data: self.ctx.stream().alloc_zeros::<bf16>(rows * cols).map_err(kernel_error)? })
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
        })
    }

    fn embedding(&self, table: &CudaWeight, step: &CudaStep) -> Result<CudaMatrix> {
        let hidden = *table.shape.last().ok_or_else(|| Error::invalid("embedding table has no shape"))?;
        let mut out = self.zeros(step.host.tokens.len(), hidden)?;
        let tokens = step.tokens.slice(..step.host.tokens.len());
        elementwise::embedding(&self.ctx, &table.data.as_view(), hidden, &tokens, &mut out.data.as_view_mut())?;
        Ok(out)
    }

    fn rms_norm(&self, x: &CudaMatrix, weight: &CudaWeight, eps: f32) -> Result<CudaMatrix> {
        let mut out = self.zeros(x.rows, x.cols)?;
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
        let mut out = self.zeros(x.rows, x.cols)?;
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
        let mut out = self.zeros(x.rows, n)?;
        let shape = GemmShape { m: x.rows, n, k: x.cols };
        let bias = bias.map(|b| b.data.as_view());
        let mut workspace = self.gemm_workspace.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        gemm::gemm(
            &self.ctx,
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
                let decode = host.q_indptr.windows(2).all(|w| w[1] - w[0] == 1);
                let plan = if decode {
                    let options = DecodeOptions { scale, ..DecodeOptions::new(layout.head_dim) };
                    AttentionPlan::Decode(DecodePlan::new(
                        &self.ctx,
                        layout,
                        pool.layout,
                        &host.kv_lens,
                        &host.block_tables,
                        host.max_blocks_per_seq,
                        options,
                    )?)
                } else {
                    AttentionPlan::Prefill(PrefillPlan::new(&self.ctx, host.attention_batch(), layout, pool.layout)?)
                };
                step.plan.get_or_init(|| plan)
            }
        };
        let mut out = self.zeros(qkv.rows, layout.num_heads * layout.head_dim)?;
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
        let mut out = self.zeros(gate_up.rows, width)?;
        elementwise::silu_and_mul(&self.ctx, &gate_up.data.as_view(), width, &mut out.data.as_view_mut())?;
        Ok(out)
    }

    fn gather_logit_rows(&self, x: &CudaMatrix, step: &CudaStep) -> Result<CudaMatrix> {
        let rows = &step.host.logit_rows;
        let mut out = self.zeros(rows.len(), x.cols)?;
        for (i, &r) in rows.iter().enumerate() {
            let src = x.data.slice(r as usize * x.cols..(r as usize + 1) * x.cols);
            let mut dst = out.data.slice_mut(i * x.cols..(i + 1) * x.cols);
            self.ctx.stream().memcpy_dtod(&src, &mut dst).map_err(kernel_error)?;
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
