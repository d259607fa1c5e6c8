//! GPU tests: every kernel against its plain-Rust reference on fresh random inputs, with outputs
//! poisoned (NaN) before each launch and checked for full coverage afterwards. They need a CUDA
//! GPU, so they are ignored by default: run them with `cargo test --test gpu -- --ignored` on a
//! machine that has one (and under compute-sanitizer; see ../shared/GPU.md).

mod bandwidth;
mod common;
mod coresidency;
mod decode_attention;
mod dependent_launch;
mod elementwise;
mod gemm;
mod hf_models;
mod model;
mod prefill_attention;
