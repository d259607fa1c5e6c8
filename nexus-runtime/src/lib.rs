//! The Nexus runtime: everything between a model file and generated tokens.
//!
//! - Weights: [`gguf`] (a memory-mapped GGUF reader, [`dequant`] for its storage types),
//!   [`safetensors`] (Hugging Face checkpoints), [`synthetic`] (published configs for random
//!   weights); all behind [`config::WeightSource`]. [`loader::open`] picks by path.
//! - Text: [`tokenizer`] (from a GGUF's vocabulary or `tokenizer.json`) and [`chat_template`].
//! - The model: [`model::LlamaModel`] (Llama, Mistral, Qwen2, SmolLM) written once over
//!   [`backend::Backend`], with a CPU backend on the kernels' references and
//!   [`cuda_backend::CudaBackend`] on the GPU kernels (decode steps replayed from CUDA graphs;
//!   a batch-invariant mode).
//! - Serving: [`kv_cache`] (paged block bookkeeping), [`scheduler`] (batch planning),
//!   [`engine`] (continuous batching with preemption), [`sampling`], [`generate`] (one sequence,
//!   with streaming text and stop strings), [`workload`] (benchmark traces).
//!
//! ```no_run
//! use nexus_runtime::backend::CpuBackend;
//! use nexus_runtime::generate::{GenerateOptions, Generator, generate_text};
//! use nexus_runtime::{loader, model::LlamaModel};
//!
//! # fn main() -> nexus_runtime::Result<()> {
//! let loaded = loader::open(std::path::Path::new(loader::DEFAULT_MODEL))?;
//! let model = LlamaModel::load(&CpuBackend, loaded.weights.as_ref(), |_, _| {})?;
//! let mut generator = Generator::new(CpuBackend, model, 512, 16)?;
//! let prompt = loaded.tokenizer.encode("The capital of France is", true)?;
//! let options = GenerateOptions { max_tokens: 16, ..GenerateOptions::default() };
//! let out = generate_text(&mut generator, &loaded.tokenizer, &prompt, &options, |piece| print!("{piece}"))?;
//! assert!(!out.text.is_empty());
//! # Ok(()) }
//! ```

mod error;

pub mod backend;
pub mod batch;
pub mod bench;
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
pub mod workload;

pub use error::{Error, ErrorKind, Result};
/// The kernels the CUDA backend runs on, for callers that set up devices and budgets.
pub use nexus_kernels as kernels;
