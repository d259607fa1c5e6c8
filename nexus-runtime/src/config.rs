//! Model configuration and the weight-source abstraction shared by the GGUF and safetensors
//! loaders.

use crate::gguf::HostTensor;
use crate::{Error, Result};

pub use nexus_kernels::RopeStyle;

/// The architecture family of a checkpoint. All are run by the one Llama-family model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 2/3, Mistral, SmolLM.
    Llama,
    /// Qwen2 / Qwen2.5: Llama with a bias on the Q, K and V projections.
    Qwen2,
}

/// The hyper-parameters of a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_style: RopeStyle,
    /// The output projection reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Q, K and V projections carry a bias (Qwen2).
    pub attention_bias: bool,
}

impl ModelConfig {
    /// Checks that the numbers are consistent with each other.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(Error::format(format!("model config: {name} is 0")));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::format(format!(
                "model config: {} query heads are not a multiple of {} KV heads",
                self.num_heads, self.num_kv_heads
            )));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::format(format!("model config: head_dim {} is odd", self.head_dim)));
        }
        if !(self.rms_norm_eps > 0.0 && self.rope_theta > 0.0) {
            return Err(Error::format("model config: rms_norm_eps and rope_theta must be positive"));
        }
        Ok(())
    }
}

/// Which matrix of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum LayerWeight {
    AttnNorm,
    Q,
    K,
    V,
    QBias,
    KBias,
    VBias,
    O,
    FfnNorm,
    Gate,
    Up,
    Down,
}

/// A weight of a Llama-family model, named independently of the file format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightName {
    /// `[vocab, hidden]`.
    TokenEmbedding,
    /// `[hidden]`.
    FinalNorm,
    /// `[vocab, hidden]`; absent when the embeddings are tied.
    LmHead,
    /// A weight of layer `.0`. Linear weights are `[out_features, in_features]`.
    Layer(usize, LayerWeight),
}

/// Where a model's weights come from: a GGUF file, a safetensors checkpoint, or random numbers.
pub trait WeightSource {
    /// The model's configuration.
    fn config(&self) -> &ModelConfig;

    /// Whether the source has `name` (optional weights: biases, an untied LM head).
    fn contains(&self, name: WeightName) -> bool;

    /// Loads `name` as a row-major f32 tensor (dequantized or converted as needed).
    fn load(&self, name: WeightName) -> Result<HostTensor>;
}
