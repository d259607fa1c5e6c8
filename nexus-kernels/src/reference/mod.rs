//! Plain-Rust references of every kernel, with the kernels' shapes and names, in f32 (the
//! streaming read's checksums: u32).
//!
//! The tests compare each GPU kernel with its reference, and the runtime's CPU backend runs
//! models on them. They favour clarity over speed, but parallelise over rows with rayon and keep
//! the inner loops vectorisable, so that a 135M-parameter model generates at interactive speed.

mod attention;
mod elementwise;
mod gemm;
mod stream_read;

pub use attention::{decode_attention, decode_attention_rope, prefill_attention};
pub use elementwise::{
    ARGMAX_NONE, argmax, embedding, fill_uniform, fused_add_rms_norm, rms_norm, rope_and_write_kv, rope_inv_freq,
};
pub use gemm::{GemmShape, fold_norm_gain, gemm, gemm_silu_and_mul, rms_scales_from_square_sums, square_sums};
pub use stream_read::stream_read;
