//! Configurations of published models, for benchmarks with random weights
//! ([`LlamaModel::random`](crate::model::LlamaModel::random)): `nexus` names them
//! `synthetic:<name>`. Tokenizer-free: token ids in, token ids out.
//!
//! The numbers are those of the models' published `config.json` files, Llama 3.1's RoPE scaling
//! included.

use crate::weights::config::{Architecture, ModelConfig, RopeScaling, RopeStyle};
use crate::{Error, ErrorKind, Result};

/// The names [`config`] knows: published models, and `tiny` (two layers of width 64, for tests
/// of the whole stack in a moment on a CPU).
pub const NAMES: [&str; 4] = ["llama-3.1-8b", "qwen2.5-3b", "qwen2.5-14b", "tiny"];

/// The configuration of the model called `name` (one of [`NAMES`]).
pub fn config(name: &str) -> Result<ModelConfig> {
    let llama = |hidden, intermediate, layers, heads, kv_heads, vocab, theta, context| ModelConfig {
        architecture: Architecture::Llama,
        hidden_size: hidden,
        intermediate_size: intermediate,
        num_layers: layers,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: hidden / heads,
        vocab_size: vocab,
        max_position_embeddings: context,
        rms_norm_eps: 1e-5,
        rope_theta: theta,
        rope_style: RopeStyle::RotateHalf,
        rope_scaling: RopeScaling::None,
        tie_word_embeddings: false,
        attention_bias: false,
    };
    let qwen2 = |hidden, intermediate, layers, heads, kv_heads, vocab, tie| ModelConfig {
        architecture: Architecture::Qwen2,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: tie,
        attention_bias: true,
        ..llama(hidden, intermediate, layers, heads, kv_heads, vocab, 1_000_000.0, 32_768)
    };
    match name {
        "llama-3.1-8b" => Ok(ModelConfig {
            rope_scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
            ..llama(4096, 14336, 32, 32, 8, 128_256, 500_000.0, 131_072)
        }),
        "qwen2.5-3b" => Ok(qwen2(2048, 11008, 36, 16, 2, 151_936, true)),
        "qwen2.5-14b" => Ok(qwen2(5120, 13824, 48, 40, 8, 152_064, false)),
        "tiny" => Ok(ModelConfig { head_dim: 16, ..llama(64, 128, 2, 4, 2, 512, 10_000.0, 1024) }),
        other => Err(Error::new(
            ErrorKind::InvalidInput,
            format!("unknown synthetic model `{other}` (known: {})", NAMES.join(", ")),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_has_a_valid_config_and_others_are_refused() {
        for name in NAMES {
            let c = config(name).unwrap();
            c.validate().unwrap();
            assert_eq!(c.head_dim, if name == "tiny" { 16 } else { 128 }, "{name}");
        }
        // Parameter counts of the published models, as a check on the numbers (embeddings counted
        // once when tied).
        let params = |c: &ModelConfig| c.num_parameters();
        assert_eq!(params(&config("llama-3.1-8b").unwrap()), 8_030_261_248);
        assert_eq!(params(&config("qwen2.5-3b").unwrap()), 3_085_938_688);
        assert_eq!(params(&config("qwen2.5-14b").unwrap()), 14_770_033_664);
        assert_eq!(config("gpt-5").unwrap_err().kind(), ErrorKind::InvalidInput);
        assert!(matches!(config("llama-3.1-8b").unwrap().rope_scaling, RopeScaling::Llama3 { factor: 8.0, .. }));
        assert_eq!(config("qwen2.5-3b").unwrap().rope_scaling, RopeScaling::None);
    }
}
