//! The Nexus runtime: weights, tokenizer, models, paged KV cache and sampling.

mod error;

pub mod backend;
pub mod batch;
pub mod chat_template;
pub mod config;
pub mod cuda_backend;
pub mod dequant;
pub mod engine;
pub mod generate;
pub mod gguf;
pub mod gguf_weights;
pub mod kv_cache;
pub mod loader;
pub mod model;
pub mod safetensors;
pub mod sampling;
pub mod scheduler;
pub mod synthetic;
pub mod tokenizer;

pub use error::{Error, ErrorKind, Result};
/// The kernels the CUDA backend runs on, for callers that set up devices and budgets.
pub use nexus_kernels as kernels;
