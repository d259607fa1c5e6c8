mod common;
mod engine;
mod gguf;
mod hf_checkpoint;
mod kv_cache;
mod oracle;
mod sampling;
mod tokenizer;
