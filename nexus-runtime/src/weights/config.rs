//! Model configuration and the weight-source abstraction shared by the GGUF and safetensors
//! loaders.

use crate::weights::gguf::HostTensor;
use crate::{Error, Result};

pub use nexus_kernels::{RopeScaling, RopeStyle};

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
    /// How the rope frequencies are stretched (Llama 3.1's `llama3`, or `linear`).
    pub rope_scaling: RopeScaling,
    /// The output projection reuses the token embedding.
    pub tie_word_embeddings: bool,
    /// Q, K and V projections carry a bias (Qwen2).
    pub attention_bias: bool,
}

/// The largest sizes a configuration may declare. Every published model is far below them (Llama
/// 3.1 405B: 126 layers, hidden size 16384, FFN 53248, 128 heads; Gemma 3: vocabulary 262208;
/// Llama 4 Scout: context 10M), and they keep a crafted file from sizing anything absurd before
/// its tensors are checked: every weight's element count stays below 2^40, and every position
/// fits in the kernels' `u32`.
pub const MAX_LAYERS: usize = 1024;
/// See [`MAX_LAYERS`].
pub const MAX_HIDDEN_SIZE: usize = 1 << 17;
/// See [`MAX_LAYERS`].
pub const MAX_INTERMEDIATE_SIZE: usize = 1 << 20;
/// Query or KV heads; see [`MAX_LAYERS`].
pub const MAX_HEADS: usize = 1024;
/// See [`MAX_LAYERS`].
pub const MAX_HEAD_DIM: usize = 1024;
/// See [`MAX_LAYERS`].
pub const MAX_VOCAB_SIZE: usize = 1 << 22;
/// The longest context (`max_position_embeddings`); see [`MAX_LAYERS`].
pub const MAX_CONTEXT: usize = 1 << 24;

impl ModelConfig {
    /// Checks that every size is positive and within its bound ([`MAX_LAYERS`] and the others),
    /// and that the numbers are consistent with each other.
    pub fn validate(&self) -> Result<()> {
        let sizes = [
            ("hidden_size", self.hidden_size, MAX_HIDDEN_SIZE),
            ("intermediate_size", self.intermediate_size, MAX_INTERMEDIATE_SIZE),
            ("num_layers", self.num_layers, MAX_LAYERS),
            ("num_heads", self.num_heads, MAX_HEADS),
            ("num_kv_heads", self.num_kv_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("vocab_size", self.vocab_size, MAX_VOCAB_SIZE),
            ("max_position_embeddings", self.max_position_embeddings, MAX_CONTEXT),
        ];
        for (name, value, max) in sizes {
            if value == 0 {
                return Err(Error::format(format!("model config: {name} is 0")));
            }
            if value > max {
                return Err(Error::format(format!("model config: {name} {value} is beyond the limit of {max}")));
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
        self.rope_scaling.check().map_err(|e| Error::format(format!("model config: {e}")))?;
        Ok(())
    }

    /// Checks that a file's tensors, `names`, are those of as many layers as the configuration
    /// declares (in the key called `key`, for the message): layer `N`'s are named `{prefix}N.…`,
    /// and the highest `N` must be the last layer. Loaders call this before anything is sized by
    /// the layer count, so that a crafted count is refused at the cost of one pass over the names;
    /// a layer missing in the middle is left to the per-weight check, which names the tensor.
    pub fn check_layers_present<'a>(
        &self,
        key: &str,
        prefix: &str,
        names: impl IntoIterator<Item = &'a str>,
    ) -> Result<()> {
        let layer_of = |name: &str| name.strip_prefix(prefix)?.split_once('.')?.0.parse::<usize>().ok();
        let present = names.into_iter().filter_map(layer_of).max().map_or(0, |n| n.saturating_add(1));
        if present != self.num_layers {
            let held = match present {
                0 => format!("no tensor named {prefix}N.*"),
                n => format!("the tensors of {n} layers ({prefix}0 to {prefix}{})", n - 1),
            };
            return Err(Error::format(format!("{key} is {}, but the file has {held}", self.num_layers)));
        }
        Ok(())
    }

    /// The row-major shape of `name` in a model with this configuration, or `None` when such a model has no
    /// such weight (a bias without `attention_bias`, the LM head of tied embeddings, a layer past the
    /// last). Both weight loaders check the tensors they find against this.
    pub fn weight_shape(&self, name: WeightName) -> Option<Vec<usize>> {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q_rows = self.num_heads * self.head_dim;
        let kv_rows = self.num_kv_heads * self.head_dim;
        Some(match name {
            WeightName::TokenEmbedding => vec![self.vocab_size, h],
            WeightName::FinalNorm => vec![h],
            WeightName::LmHead if self.tie_word_embeddings => return None,
            WeightName::LmHead => vec![self.vocab_size, h],
            WeightName::Layer(layer, _) if layer >= self.num_layers => return None,
            WeightName::Layer(_, w) => match w {
                LayerWeight::AttnNorm | LayerWeight::FfnNorm => vec![h],
                LayerWeight::Q => vec![q_rows, h],
                LayerWeight::K | LayerWeight::V => vec![kv_rows, h],
                LayerWeight::QBias | LayerWeight::KBias | LayerWeight::VBias if !self.attention_bias => return None,
                LayerWeight::QBias => vec![q_rows],
                LayerWeight::KBias | LayerWeight::VBias => vec![kv_rows],
                LayerWeight::O => vec![h, q_rows],
                LayerWeight::Gate | LayerWeight::Up => vec![i, h],
                LayerWeight::Down => vec![h, i],
            },
        })
    }

    /// Every weight a model with this configuration has, with its shape.
    pub fn weight_shapes(&self) -> Vec<(WeightName, Vec<usize>)> {
        const LAYER_WEIGHTS: [LayerWeight; 12] = [
            LayerWeight::AttnNorm,
            LayerWeight::Q,
            LayerWeight::K,
            LayerWeight::V,
            LayerWeight::QBias,
            LayerWeight::KBias,
            LayerWeight::VBias,
            LayerWeight::O,
            LayerWeight::FfnNorm,
            LayerWeight::Gate,
            LayerWeight::Up,
            LayerWeight::Down,
        ];
        let globals = [WeightName::TokenEmbedding, WeightName::FinalNorm, WeightName::LmHead];
        let layers = (0..self.num_layers).flat_map(|l| LAYER_WEIGHTS.map(|w| WeightName::Layer(l, w)));
        globals
            .into_iter()
            .chain(layers)
            .filter_map(|name| self.weight_shape(name).map(|shape| (name, shape)))
            .collect()
    }

    /// The number of weights of a model with this configuration (a tied embedding once).
    pub fn num_parameters(&self) -> usize {
        self.weight_shapes().iter().map(|(_, shape)| shape.iter().product::<usize>()).sum()
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

    /// Whether the source has `name` (optional weights: biases, an untied LM head). Loaders check
    /// at open that they hold every weight their configuration implies.
    fn contains(&self, name: WeightName) -> bool {
        self.config().weight_shape(name).is_some()
    }

    /// Loads `name` as a row-major f32 tensor (dequantized or converted as needed). The file
    /// loaders refuse a tensor holding a NaN or an infinity ([`HostTensor::check_finite`]).
    fn load(&self, name: WeightName) -> Result<HostTensor>;
}
