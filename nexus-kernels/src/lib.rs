//! Nexus kernels: the operations of a Llama-family forward pass over a paged KV cache.
//!
//! Every operation has a plain-Rust reference in [`reference`], in f32, with the same shapes and
//! names as its CUDA kernel. The runtime's CPU backend runs models on the references, and the GPU
//! tests compare each kernel with its reference.
//!
//! ```
//! use nexus_kernels::reference;
//! use nexus_kernels::reference::GemmShape;
//!
//! // y = x · wᵀ for a linear layer with weight [out_features = 2, in_features = 3].
//! let x = [1.0, 2.0, 3.0];
//! let w = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0];
//! let mut y = [0.0; 2];
//! reference::gemm(&x, &w, None, &mut y, GemmShape { m: 1, n: 2, k: 3 })?;
//! assert_eq!(y, [1.0, 5.0]);
//! # Ok::<(), nexus_kernels::Error>(())
//! ```

mod error;
mod layout;

pub mod decode_attention;
pub mod elementwise;
pub mod gemm;
pub mod gpu;
pub mod prefill_attention;
pub mod reference;

pub use error::{Error, ErrorKind, Result};
pub use gpu::{CtaBudget, Gpu, PhaseContext};
pub use layout::{AttentionBatch, PagedKvLayout, QkvLayout, RopeConfig, RopeStyle};
