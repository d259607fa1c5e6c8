//! The Nexus runtime: weights, tokenizer, models, paged KV cache and sampling.

mod error;

pub mod backend;
pub mod config;
pub mod dequant;
pub mod gguf;
pub mod kv_cache;
pub mod model;
pub mod sampling;

pub use error::{Error, ErrorKind, Result};
