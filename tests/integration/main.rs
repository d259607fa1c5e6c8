mod gguf;
mod tokenizer;
mod hf_checkpoint;
mod common;
mod oracle;
