//! Nexus kernels: SM-bounded persistent CUDA kernels for LLM inference, with plain-Rust
//! references.
//!
//! Every kernel is persistent and takes a **CTA budget** ([`CtaBudget`]): it launches at most that
//! many CTAs, each alone on its SM, and each CTA loops over work items. Two launches on two
//! streams whose budgets add up to at most the SM count therefore run side by side on disjoint
//! SMs — which is how Nexus runs prefill and decode at the same time on one GPU. Launches take a
//! [`PhaseContext`] (device, stream, budget, and [`LaunchOptions`]).
//!
//! | module | kernels |
//! | --- | --- |
//! | [`decode_attention`] | paged decode attention: one query per sequence, GQA, split-KV with a merge, planned on the host; with the new tokens' RoPE and KV-cache write in the same launch (`decode_attention_rope`) |
//! | [`prefill_attention`] | paged chunked-prefill attention: causal chunks over cached prefixes, tensor cores |
//! | [`gemm`] | bf16 GEMM `C = A·Bᵀ (+ bias)` with f32 accumulation, M from 1 up, tensor cores (wgmma on Hopper); with a SwiGLU epilogue, `silu(A·gateᵀ) * (A·upᵀ)`; on Hopper with a pre-norm layer's residual add and RMSNorm fused in (`GemmFusion`) |
//! | [`elementwise`] | embedding gather, RMSNorm (with fused residual add), RoPE with the KV-cache write, argmax, a norm's gain folded into a weight |
//! | [`mod@stream_read`] | a streaming read of a buffer, 64 or 192 KB in flight per SM: the HBM bandwidth of a budget |
//! | [`mod@reference`] | the plain-Rust f32 version of each, with the same names and shapes |
//!
//! The planners ([`gemm::plan`], [`decode_attention::DecodePlan`]) rank their choices with a
//! [`DeviceModel`] of the GPU: its PTX build, SM count and a [`BandwidthCurve`] of read bytes/s
//! against CTAs, which [`Gpu::new`] measures on the device with the streaming read
//! ([`Gpu::model`]), so plans follow the card they run on (an H200 reads 1.45 times as fast as an
//! H100 of the same compute).
//!
//! Nothing here needs the CUDA toolkit to build: the kernels of `cuda/*.cu` are embedded (for
//! Hopper the `sm_90a` machine code, for every other GPU from Ampere on a `compute_80` PTX build
//! the driver compiles) and loaded through the driver, which cudarc finds at run time. [`Gpu::new`] fails with
//! [`Error::NoGpu`] when there is no driver, no device, or a device older than sm_80. Launchers
//! check every shape, length and budget and return [`Error`] rather than launch out of bounds;
//! `unsafe` appears only at the launch itself.
//!
//! A budgeted paged decode-attention launch:
//!
//! ```no_run
//! use nexus_kernels::bf16;
//! use nexus_kernels::decode_attention::{DecodeOptions, DecodePlan, decode_attention};
//! use nexus_kernels::{CtaBudget, Gpu, PagedKvLayout, PhaseContext, QkvLayout};
//!
//! # fn main() -> nexus_kernels::Result<()> {
//! let gpu = Gpu::new(0)?;
//! // Half of an H100's 132 SMs; another phase can use the other half at the same time.
//! let ctx = PhaseContext::new(gpu.clone(), gpu.new_stream()?, CtaBudget::new(66, &gpu)?);
//! let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
//! let cache = PagedKvLayout { num_blocks: 4096, block_size: 16, num_kv_heads: 8, head_dim: 128 };
//! // Two sequences of 1000 and 3000 cached tokens; sequence i owns blocks i*256 .. i*256+255.
//! let (kv_lens, max_blocks) = ([1000u32, 3000], 256);
//! let tables: Vec<i32> = (0..2 * max_blocks as i32).collect();
//! let plan = DecodePlan::new(&ctx, layout, cache, &kv_lens, &tables, max_blocks, DecodeOptions::new(128))?;
//!
//! let stream = ctx.stream();
//! let qkv = stream.alloc_zeros::<bf16>(2 * layout.row_len())?; // one fused QKV row per sequence
//! let k = stream.alloc_zeros::<bf16>(cache.pool_len())?;
//! let v = stream.alloc_zeros::<bf16>(cache.pool_len())?;
//! let device_tables = stream.clone_htod(&tables)?;
//! let mut out = stream.alloc_zeros::<bf16>(2 * 32 * 128)?;
//! decode_attention(&ctx, &plan, &qkv.as_view(), &k.as_view(), &v.as_view(), &device_tables.as_view(), &mut out.as_view_mut(), None)?;
//! stream.synchronize()?;
//! # Ok(()) }
//! ```
//!
//! The references run anywhere:
//!
//! ```
//! use nexus_kernels::reference::{self, GemmShape};
//!
//! // y = x · wᵀ for a linear layer with weight [out_features = 2, in_features = 3].
//! let (x, w) = ([1.0, 2.0, 3.0], [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]);
//! let mut y = [0.0; 2];
//! reference::gemm(&x, &w, None, &mut y, GemmShape { m: 1, n: 2, k: 3 })?;
//! assert_eq!(y, [1.0, 5.0]);
//! # Ok::<(), nexus_kernels::Error>(())
//! ```

mod error;
mod layout;
mod tensor_map;

pub mod decode_attention;
pub mod elementwise;
pub mod gemm;
pub mod gpu;
pub mod prefill_attention;
pub mod reference;
pub mod stream_read;

pub use cudarc;
pub use error::{Error, ErrorKind, Result};
pub use gpu::{
    BandwidthCurve, CtaBudget, DeviceModel, Gpu, GraphCensus, LaunchOptions, PhaseContext, copy_rows_htod,
    copy_to_pinned,
};
/// The bf16 type of the kernels' buffers, and the CUDA driver bindings their launchers take
/// buffers and streams from, re-exported so that users get the versions this crate is built with.
pub use half::bf16;
pub use layout::{AttentionBatch, PagedKvLayout, QkvLayout, RopeConfig, RopeScaling, RopeStyle};
