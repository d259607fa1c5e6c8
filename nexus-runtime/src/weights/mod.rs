//! Everything between a model file and the tensors of a model: the configuration and the
//! weight-source abstraction ([`config`]), a memory-mapped GGUF reader ([`gguf`], with
//! [`dequant`] for its storage types, and [`gguf_weights`] for its Llama-family tensors), Hugging
//! Face checkpoints ([`safetensors`]), published configurations for random weights
//! ([`synthetic`]), models in the local Hugging Face cache ([`hub`]), and [`loader::locate`] and
//! [`loader::open`], which find a model by path or repo id and open it by what the path holds.

pub mod config;
pub mod dequant;
pub mod gguf;
pub mod gguf_weights;
pub mod hub;
pub mod loader;
pub mod safetensors;
pub mod synthetic;
