//! Everything between a model file and the tensors of a model: the configuration and the
//! weight-source abstraction ([`config`]), a memory-mapped GGUF reader ([`gguf`], with
//! [`dequant`] for its storage types, and [`gguf_weights`] for its Llama-family tensors), Hugging
//! Face checkpoints ([`safetensors`]), published configurations for random weights
//! ([`synthetic`]), and [`loader::open`], which picks by path.

pub mod config;
pub mod dequant;
pub mod gguf;
pub mod gguf_weights;
pub mod loader;
pub mod safetensors;
pub mod synthetic;
