//! A GGUF file as a [`WeightSource`]: the model configuration from its metadata and the weights,
//! dequantized to f32, from its tensors.
//!
//! Supported are llama.cpp's `llama` architecture (Llama 2/3, Mistral, SmolLM) and `qwen2`.
//! llama.cpp's converter permutes the rows of a `llama` model's Q and K projections so that its
//! rope, which rotates adjacent pairs of dimensions, computes what Hugging Face's rotate-half
//! rope computes on the original rows; so those files need [`RopeStyle::Interleaved`]. It does
//! not permute `qwen2` models, which llama.cpp runs with its NEOX (rotate-half) rope.

use std::path::Path;

use crate::config::{Architecture, LayerWeight, ModelConfig, RopeStyle, WeightName, WeightSource};
use crate::gguf::{GgufFile, HostTensor, MetadataValue};
use crate::{Error, ErrorKind, Result};

/// The rope base llama.cpp assumes when a file does not give one.
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

/// A Llama-family model stored in a GGUF file.
#[derive(Debug)]
pub struct GgufModel {
    file: GgufFile,
    config: ModelConfig,
}

impl GgufModel {
    /// Opens the GGUF file at `path`; see [`GgufModel::new`].
    pub fn open(path: &Path) -> Result<Self> {
        Self::new(GgufFile::open(path)?)
    }

    /// Reads the configuration from `file`'s metadata and checks that every weight the model
    /// needs is there with the shape the configuration implies; a missing or misshapen tensor is
    /// an [`ErrorKind::Format`] error naming it. An architecture or feature the Llama model does
    /// not implement (rope scaling, partial rotary dimensions, mixture of experts, an output
    /// projection bias) is an [`ErrorKind::Unsupported`] error.
    pub fn new(file: GgufFile) -> Result<Self> {
        let config = read_config(&file)?;
        for (name, shape) in config.weight_shapes() {
            let tensor = gguf_tensor_name(name);
            let info =
                file.tensor_info(&tensor).ok_or_else(|| Error::format(format!("tensor `{tensor}` is missing")))?;
            if info.shape() != shape {
                return Err(Error::format(format!(
                    "tensor `{tensor}` has shape {:?}, but the model config implies {shape:?}",
                    info.shape()
                )));
            }
        }
        Ok(GgufModel { file, config })
    }

    /// The underlying file (its metadata also describes the tokenizer).
    pub fn file(&self) -> &GgufFile {
        &self.file
    }
}

impl WeightSource for GgufModel {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn load(&self, name: WeightName) -> Result<HostTensor> {
        if !self.contains(name) {
            return Err(Error::invalid(format!("this model has no weight {name:?}")));
        }
        self.file.tensor_f32(&gguf_tensor_name(name))
    }
}

/// The GGUF tensor name of a weight, e.g. `blk.3.attn_q.weight`.
fn gguf_tensor_name(name: WeightName) -> String {
    let layer = match name {
        WeightName::TokenEmbedding => return "token_embd.weight".to_owned(),
        WeightName::FinalNorm => return "output_norm.weight".to_owned(),
        WeightName::LmHead => return "output.weight".to_owned(),
        WeightName::Layer(i, w) => (i, w),
    };
    let suffix = match layer.1 {
        LayerWeight::AttnNorm => "attn_norm.weight",
        LayerWeight::Q => "attn_q.weight",
        LayerWeight::K => "attn_k.weight",
        LayerWeight::V => "attn_v.weight",
        LayerWeight::QBias => "attn_q.bias",
        LayerWeight::KBias => "attn_k.bias",
        LayerWeight::VBias => "attn_v.bias",
        LayerWeight::O => "attn_output.weight",
        LayerWeight::FfnNorm => "ffn_norm.weight",
        LayerWeight::Gate => "ffn_gate.weight",
        LayerWeight::Up => "ffn_up.weight",
        LayerWeight::Down => "ffn_down.weight",
    };
    format!("blk.{}.{suffix}", layer.0)
}

fn unsupported(message: String) -> Error {
    Error::new(ErrorKind::Unsupported, message)
}

fn read_config(file: &GgufFile) -> Result<ModelConfig> {
    let arch_value = file.require("general.architecture")?;
    let arch = arch_value.as_str().ok_or_else(|| Error::format("metadata `general.architecture` is not a string"))?;
    let (architecture, rope_style) = match arch {
        "llama" => (Architecture::Llama, RopeStyle::Interleaved),
        "qwen2" => (Architecture::Qwen2, RopeStyle::RotateHalf),
        other => return Err(unsupported(format!("GGUF architecture `{other}` (supported: llama, qwen2)"))),
    };
    let key = |suffix: &str| format!("{arch}.{suffix}");
    let count = |suffix: &str| -> Result<usize> { metadata_usize(file, &key(suffix)) };
    let optional_count = |suffix: &str| -> Result<Option<usize>> {
        match file.get(&key(suffix)) {
            None => Ok(None),
            Some(_) => count(suffix).map(Some),
        }
    };

    let hidden_size = count("embedding_length")?;
    let num_heads = count("attention.head_count")?;
    let num_kv_heads = optional_count("attention.head_count_kv")?.unwrap_or(num_heads);
    let head_dim = match optional_count("attention.key_length")? {
        Some(d) => d,
        None if num_heads > 0 && hidden_size % num_heads == 0 => hidden_size / num_heads,
        None => {
            return Err(Error::format(format!(
                "{arch}.embedding_length {hidden_size} is not a multiple of the {num_heads} heads"
            )));
        }
    };
    if let Some(value_dim) = optional_count("attention.value_length")?
        && value_dim != head_dim
    {
        return Err(unsupported(format!("value heads of {value_dim} dimensions and key heads of {head_dim}")));
    }
    if let Some(rotary) = optional_count("rope.dimension_count")?
        && rotary != head_dim
    {
        return Err(unsupported(format!("rope over {rotary} of the {head_dim} dimensions of a head")));
    }
    if let Some(experts) = optional_count("expert_count")?
        && experts > 0
    {
        return Err(unsupported(format!("a mixture of {experts} experts")));
    }
    if let Some(scaling) = file.get(&key("rope.scaling.type")) {
        match scaling.as_str() {
            Some("none") => {}
            Some(other) => return Err(unsupported(format!("rope scaling `{other}`"))),
            None => return Err(Error::format(format!("metadata `{}` is not a string", key("rope.scaling.type")))),
        }
    }
    // Llama 3.1's rope scaling reaches GGUF as a tensor of per-frequency factors.
    if file.tensor_info("rope_freqs.weight").is_some() {
        return Err(unsupported("Llama 3 rope scaling (tensor `rope_freqs.weight`)".to_owned()));
    }
    if file.tensor_info("blk.0.attn_output.bias").is_some() {
        return Err(unsupported("a bias on the attention output projection".to_owned()));
    }

    let vocab_size = match optional_count("vocab_size")? {
        Some(n) => n,
        None => {
            file.get("tokenizer.ggml.tokens").and_then(MetadataValue::as_array).map(<[MetadataValue]>::len).ok_or_else(
                || Error::format(format!("neither `{}` nor `tokenizer.ggml.tokens` is there", key("vocab_size"))),
            )?
        }
    };
    let rope_theta = match file.get(&key("rope.freq_base")) {
        None => DEFAULT_ROPE_THETA,
        Some(v) => {
            v.as_f64().ok_or_else(|| Error::format(format!("metadata `{}` is not a number", key("rope.freq_base"))))?
        }
    };
    let eps_key = key("attention.layer_norm_rms_epsilon");
    let rms_norm_eps = file
        .require(&eps_key)?
        .as_f64()
        .ok_or_else(|| Error::format(format!("metadata `{eps_key}` is not a number")))?;

    let config = ModelConfig {
        architecture,
        hidden_size,
        intermediate_size: count("feed_forward_length")?,
        num_layers: count("block_count")?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size,
        max_position_embeddings: count("context_length")?,
        rms_norm_eps: rms_norm_eps as f32,
        rope_theta: rope_theta as f32,
        rope_style,
        // Without an output projection, llama.cpp multiplies by the token embedding.
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        attention_bias: architecture == Architecture::Qwen2 || file.tensor_info("blk.0.attn_q.bias").is_some(),
    };
    config.validate()?;
    Ok(config)
}

fn metadata_usize(file: &GgufFile, key: &str) -> Result<usize> {
    let value = file.require(key)?;
    value
        .as_u64()
        .and_then(|v| usize::try_from(v).ok())
        .ok_or_else(|| Error::format(format!("metadata `{key}` = {value:?} is not a count")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(attention_bias: bool, tie_word_embeddings: bool) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            hidden_size: 8,
            intermediate_size: 12,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            vocab_size: 10,
            max_position_embeddings: 32,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_style: RopeStyle::Interleaved,
            tie_word_embeddings,
            attention_bias,
        }
    }

    #[test]
    fn weight_lists_follow_the_config() {
        assert_eq!(config(false, true).weight_shapes().len(), 2 + 2 * 9);
        assert_eq!(config(true, false).weight_shapes().len(), 3 + 2 * 12);
        let c = config(true, false);
        assert_eq!(c.weight_shape(WeightName::Layer(1, LayerWeight::K)), Some(vec![8, 8]));
        assert_eq!(c.weight_shape(WeightName::Layer(1, LayerWeight::O)), Some(vec![8, 16]));
        assert_eq!(c.weight_shape(WeightName::Layer(0, LayerWeight::KBias)), Some(vec![8]));
        assert_eq!(c.weight_shape(WeightName::Layer(2, LayerWeight::Q)), None);
        assert_eq!(config(false, true).weight_shape(WeightName::LmHead), None);
    }

    #[test]
    fn gguf_names() {
        assert_eq!(gguf_tensor_name(WeightName::TokenEmbedding), "token_embd.weight");
        assert_eq!(gguf_tensor_name(WeightName::LmHead), "output.weight");
        assert_eq!(gguf_tensor_name(WeightName::Layer(7, LayerWeight::VBias)), "blk.7.attn_v.bias");
        assert_eq!(gguf_tensor_name(WeightName::Layer(0, LayerWeight::Down)), "blk.0.ffn_down.weight");
    }

    #[test]
    fn smollm2_config_and_weights() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/SmolLM2-135M-Instruct.Q4_1.gguf");
        assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh", path.display());
        let model = GgufModel::open(&path).expect("opens");
        let c = model.config();
        assert_eq!(c.architecture, Architecture::Llama);
        assert_eq!(
            (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
            (576, 1536, 30, 9, 3, 64)
        );
        assert_eq!((c.vocab_size, c.max_position_embeddings), (49152, 8192));
        assert_eq!((c.rope_theta, c.rms_norm_eps), (100_000.0, 1e-5));
        assert_eq!(c.rope_style, RopeStyle::Interleaved);
        assert!(c.tie_word_embeddings && !c.attention_bias);
        assert!(!model.contains(WeightName::LmHead));
        // F32 norms, as llama.cpp's gguf package reads them.
        let norm = model.load(WeightName::FinalNorm).expect("loads");
        assert_eq!(norm.shape, vec![576]);
        assert_eq!(norm.data[..4], [1.7578125, 1.8203125, 1.78125, 1.6015625]);
        let norm = model.load(WeightName::Layer(0, LayerWeight::AttnNorm)).expect("loads");
        assert_eq!(norm.data[..4], [0.013977051, 0.023803711, -0.01977539, -0.030273438]);
        let k = model.load(WeightName::Layer(29, LayerWeight::K)).expect("loads");
        assert_eq!(k.shape, vec![192, 576]);
    }

    /// A little GGUF writer: metadata of u32, f32 and string values, and F32 tensors.
    enum Meta {
        U32(u32),
        F32(f32),
        Str(&'static str),
    }

    fn gguf_image(metadata: &[(&str, Meta)], tensors: &[(String, Vec<usize>)]) -> Vec<u8> {
        fn string(out: &mut Vec<u8>, s: &str) {
            out.extend((s.len() as u64).to_le_bytes());
            out.extend(s.as_bytes());
        }
        let mut out = b"GGUF".to_vec();
        out.extend(3u32.to_le_bytes());
        out.extend((tensors.len() as u64).to_le_bytes());
        out.extend((metadata.len() as u64).to_le_bytes());
        for (key, value) in metadata {
            string(&mut out, key);
            match value {
                Meta::U32(v) => {
                    out.extend(4u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Meta::F32(v) => {
                    out.extend(6u32.to_le_bytes());
                    out.extend(v.to_le_bytes());
                }
                Meta::Str(v) => {
                    out.extend(8u32.to_le_bytes());
                    string(&mut out, v);
                }
            }
        }
        let mut offset = 0usize;
        for (name, shape) in tensors {
            string(&mut out, name);
            out.extend((shape.len() as u32).to_le_bytes());
            for &d in shape.iter().rev() {
                out.extend((d as u64).to_le_bytes());
            }
            out.extend(0u32.to_le_bytes());
            out.extend((offset as u64).to_le_bytes());
            offset += (shape.iter().product::<usize>() * 4).next_multiple_of(32);
        }
        out.resize(out.len().next_multiple_of(32), 0);
        for (t, (_, shape)) in tensors.iter().enumerate() {
            let n = shape.iter().product::<usize>();
            for i in 0..n {
                out.extend((t as f32 + i as f32 / 1000.0).to_le_bytes());
            }
            out.resize(out.len().next_multiple_of(32), 0);
        }
        out
    }

    /// GGUF metadata and tensor names with shapes.
    type Fixture = (Vec<(&'static str, Meta)>, Vec<(String, Vec<usize>)>);

    /// A two-layer Qwen2 model with tied embeddings.
    fn tiny_qwen2() -> Fixture {
        let metadata = vec![
            ("general.architecture", Meta::Str("qwen2")),
            ("qwen2.block_count", Meta::U32(2)),
            ("qwen2.embedding_length", Meta::U32(8)),
            ("qwen2.feed_forward_length", Meta::U32(12)),
            ("qwen2.attention.head_count", Meta::U32(4)),
            ("qwen2.attention.head_count_kv", Meta::U32(2)),
            ("qwen2.attention.layer_norm_rms_epsilon", Meta::F32(1e-6)),
            ("qwen2.context_length", Meta::U32(64)),
            ("qwen2.vocab_size", Meta::U32(10)),
        ];
        let c = ModelConfig { head_dim: 2, ..config(true, true) };
        let tensors = c.weight_shapes().into_iter().map(|(name, shape)| (gguf_tensor_name(name), shape)).collect();
        (metadata, tensors)
    }

    fn model(metadata: &[(&str, Meta)], tensors: &[(String, Vec<usize>)]) -> Result<GgufModel> {
        GgufModel::new(GgufFile::from_bytes(gguf_image(metadata, tensors))?)
    }

    #[test]
    fn qwen2_uses_rotate_half_and_biases() {
        let (metadata, tensors) = tiny_qwen2();
        let m = model(&metadata, &tensors).expect("loads");
        let c = m.config();
        assert_eq!((c.architecture, c.rope_style), (Architecture::Qwen2, RopeStyle::RotateHalf));
        assert_eq!((c.head_dim, c.rope_theta, c.vocab_size), (2, 10_000.0, 10));
        assert!(c.attention_bias && c.tie_word_embeddings);
        let index = tensors.iter().position(|(n, _)| n == "blk.1.attn_k.bias").expect("bias tensor");
        let bias = m.load(WeightName::Layer(1, LayerWeight::KBias)).expect("loads");
        assert_eq!(bias.shape, vec![4]);
        assert_eq!(bias.data, (0..4).map(|i| index as f32 + i as f32 / 1000.0).collect::<Vec<_>>());
        let err = m.load(WeightName::LmHead).expect_err("tied");
        assert_eq!(err.kind(), ErrorKind::InvalidInput);
    }

    #[test]
    fn missing_and_misshapen_tensors_are_named() {
        let (metadata, mut tensors) = tiny_qwen2();
        tensors.retain(|(n, _)| n != "blk.1.ffn_up.weight");
        let err = model(&metadata, &tensors).expect_err("missing");
        assert_eq!(err.kind(), ErrorKind::Format);
        assert!(err.to_string().contains("blk.1.ffn_up.weight"), "{err}");

        let (metadata, mut tensors) = tiny_qwen2();
        let v = tensors.iter_mut().find(|(n, _)| n == "blk.0.attn_v.weight").expect("tensor");
        v.1 = vec![8, 4];
        let err = model(&metadata, &tensors).expect_err("misshapen");
        assert_eq!(err.kind(), ErrorKind::Format);
        assert!(err.to_string().contains("blk.0.attn_v.weight") && err.to_string().contains("[8, 4]"), "{err}");
    }

    #[test]
    fn unsupported_models_are_refused() {
        let (mut metadata, tensors) = tiny_qwen2();
        metadata[0].1 = Meta::Str("gpt2");
        assert_eq!(model(&metadata, &tensors).expect_err("gpt2").kind(), ErrorKind::Unsupported);

        let (mut metadata, tensors) = tiny_qwen2();
        metadata.push(("qwen2.rope.scaling.type", Meta::Str("yarn")));
        let err = model(&metadata, &tensors).expect_err("yarn");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("yarn"), "{err}");

        let (mut metadata, tensors) = tiny_qwen2();
        metadata.push(("qwen2.rope.dimension_count", Meta::U32(1)));
        assert_eq!(model(&metadata, &tensors).expect_err("partial rope").kind(), ErrorKind::Unsupported);

        let (mut metadata, tensors) = tiny_qwen2();
        metadata.retain(|(k, _)| *k != "qwen2.attention.layer_norm_rms_epsilon");
        let err = model(&metadata, &tensors).expect_err("no epsilon");
        assert_eq!(err.kind(), ErrorKind::Format);
        assert!(err.to_string().contains("layer_norm_rms_epsilon"), "{err}");
    }
}
