//! The Nexus runtime: weights, tokenizer, models, paged KV cache and sampling.

mod error;

pub mod config;
pub mod dequant;
pub mod gguf;

pub use error::{Error, ErrorKind, Result};
