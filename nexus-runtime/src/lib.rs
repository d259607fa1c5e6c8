//! The Nexus runtime: everything between a model file and generated tokens, in layers:
//!
//! - [`weights`]: a memory-mapped GGUF reader (with dequantization), Hugging Face safetensors
//!   checkpoints, published configurations for random weights, all behind
//!   [`weights::config::WeightSource`]; [`weights::loader::open`] picks by path, and
//!   [`weights::loader::locate`] finds a model named as users name it (a path, `synthetic:<name>`,
//!   or a repository of the local Hugging Face cache).
//! - [`text`]: the tokenizer (from a GGUF's vocabulary or `tokenizer.json`), chat templates and
//!   stop strings.
//! - [`model`]: [`model::LlamaModel`] (Llama, Mistral, Qwen2, SmolLM) written once over
//!   [`model::backend::Backend`], with a CPU backend on the kernels' references and
//!   [`model::cuda::CudaBackend`] on the GPU kernels, and [`model::simulated::SimulatedBackend`],
//!   which computes nothing and takes the time a GPU's profile predicts (schedules tried without
//!   the GPU); a forward pass runs in a backend phase (a stream and a CTA budget on the GPU), so
//!   that two run at once on disjoint SMs.
//! - [`engine`]: continuous batching with preemption over a paged KV cache, driven by a
//!   [`engine::scheduler::Scheduler`] — chunked prefill in one lane, or Nexus's prefill and
//!   decode lanes at once — with sampling and text generation.
//! - [`mod@bench`]: serving workloads and their replay.
//!
//! ```no_run
//! use nexus_runtime::engine::generate::{GenerateOptions, generate_text};
//! use nexus_runtime::engine::{Engine, EngineConfig, RequestOptions, Schedule};
//! use nexus_runtime::engine::scheduler::SchedulerConfig;
//! use nexus_runtime::model::{LlamaModel, cpu::CpuBackend};
//! use nexus_runtime::weights::loader;
//!
//! # fn main() -> nexus_runtime::Result<()> {
//! let loaded = loader::open(std::path::Path::new(loader::DEFAULT_MODEL))?;
//! let model = LlamaModel::load(&CpuBackend, loaded.weights.as_ref(), |_, _| {})?;
//! let config = EngineConfig {
//!     num_blocks: 64,
//!     block_size: 16,
//!     scheduler: SchedulerConfig::default(),
//!     max_model_len: None,
//!     schedule: Schedule::Chunked,
//! };
//! let mut engine = Engine::new(CpuBackend, model, loaded.tokenizer.eos_token_ids().to_vec(), config)?;
//! let prompt = loaded.tokenizer.encode("The capital of France is", true)?;
//! let options = GenerateOptions { request: RequestOptions { max_tokens: 16, ..RequestOptions::default() }, stop: vec![] };
//! let out = generate_text(&mut engine, 0, &loaded.tokenizer, &prompt, &options, |piece| print!("{piece}"))?;
//! assert!(!out.text.is_empty());
//! # Ok(()) }
//! ```

mod error;

pub mod bench;
pub mod engine;
pub mod model;
pub mod text;
pub mod weights;

pub use error::{Error, ErrorKind, Result};
/// The kernels the CUDA backend runs on, for callers that set up devices and budgets.
pub use nexus_kernels as kernels;
