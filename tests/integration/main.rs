mod gguf;
mod tokenizer;
mod hf_checkpoint;
mod common;
mod oracle;
mod kv_cache;
mod sampling;
