//! A GGUF file as a [`WeightSource`]: the model configuration from its metadata and the weights,
//! dequantized to f32, from its tensors.
//!
//! Supported are llama.cpp's `llama` architecture (Llama 2/3, Mistral, SmolLM) and `qwen2`.
//! llama.cpp's converter permutes the rows of a `llama` model's Q and K projections so that its
//! rope, which rotates adjacent pairs of dimensions, computes what Hugging Face's rotate-half
//! rope computes on the original rows; so those files need [`RopeStyle::Interleaved`]. It does
//! not permute `qwen2` models, which llama.cpp runs with its NEOX (rotate-half) rope.

use std::path::Path;

use nexus_kernels::RopeConfig;

use crate::weights::config::{
    Architecture, LayerWeight, ModelConfig, RopeScaling, RopeStyle, WeightName, WeightSource,
};
use crate::weights::gguf::{GgufFile, HostTensor, MetadataValue};
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
    /// an [`ErrorKind::Format`] error naming it, and so is a size beyond its bound
    /// ([`ModelConfig::validate`]) or a `block_count` other than the number of layers whose
    /// tensors are there, both checked before anything is sized by them. An architecture or feature the Llama model does
    /// not implement (rope scaling other than linear and Llama 3's, partial rotary dimensions,
    /// mixture of experts, an output projection bias) is an [`ErrorKind::Unsupported`] error.
    pub fn new(file: GgufFile) -> Result<Self> {
        let config = read_config(&file)?;
        let block_count = format!("{}.block_count", architecture_name(&file)?);
        config.check_layers_present(&block_count, "blk.", file.tensors().iter().map(|t| t.name.as_str()))?;
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
        let tensor = gguf_tensor_name(name);
        let t = self.file.tensor_f32(&tensor)?;
        t.check_finite(&tensor)?;
        Ok(t)
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

/// The file's `general.architecture`, which prefixes its other keys.
fn architecture_name(file: &GgufFile) -> Result<&str> {
    file.require("general.architecture")?
        .as_str()
        .ok_or_else(|| Error::format("metadata `general.architecture` is not a string"))
}

fn read_config(file: &GgufFile) -> Result<ModelConfig> {
    let arch = architecture_name(file)?;
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
    let rope_scaling = read_rope_scaling(file, arch, rope_theta as f32, head_dim)?;
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
        rope_scaling,
        // Without an output projection, llama.cpp multiplies by the token embedding.
        tie_word_embeddings: file.tensor_info("output.weight").is_none(),
        attention_bias: architecture == Architecture::Qwen2 || file.tensor_info("blk.0.attn_q.bias").is_some(),
    };
    config.validate()?;
    Ok(config)
}

/// The tensor in which llama.cpp's converter stores Llama 3's rope scaling: per frequency, the
/// divisor that turns the plain frequency into the scaled one.
const ROPE_FREQS: &str = "rope_freqs.weight";

/// The rope scaling of a GGUF file, read as llama.cpp reads it: `{arch}.rope.scaling.type` (when
/// absent, a `rope.scaling.factor` or the older `rope.scale_linear` means linear scaling) and the
/// `rope_freqs.weight` table that Llama 3.1 and 3.2 files carry instead of parameters.
fn read_rope_scaling(file: &GgufFile, arch: &str, theta: f32, head_dim: usize) -> Result<RopeScaling> {
    let key = |suffix: &str| format!("{arch}.rope.{suffix}");
    let number = |name: &str| -> Result<Option<f64>> {
        file.get(name)
            .map(|v| v.as_f64().ok_or_else(|| Error::format(format!("metadata `{name}` is not a number"))))
            .transpose()
    };
    let kind = match file.get(&key("scaling.type")) {
        None => None,
        Some(v) => Some(
            v.as_str().ok_or_else(|| Error::format(format!("metadata `{}` is not a string", key("scaling.type"))))?,
        ),
    };
    let factor = match number(&key("scaling.factor"))? {
        Some(f) => Some(f),
        None => number(&key("scale_linear"))?,
    };
    // llama.cpp treats a factor of 0 as "not given" and 1 scales nothing.
    let factor = factor.filter(|&f| f != 0.0 && f != 1.0);
    let linear = match (kind, factor) {
        (Some("none"), _) | (None | Some("linear"), None) => None,
        (None | Some("linear"), Some(factor)) => Some(RopeScaling::Linear { factor: factor as f32 }),
        (Some(other), _) => return Err(unsupported(format!("rope scaling `{other}` (supported: none, linear)"))),
    };
    if file.tensor_info(ROPE_FREQS).is_none() {
        let scaling = linear.unwrap_or(RopeScaling::None);
        scaling.check().map_err(|e| Error::format(format!("{}: {e}", key("scaling.factor"))))?;
        return Ok(scaling);
    }
    if linear.is_some() {
        return Err(unsupported(format!("linear rope scaling together with a `{ROPE_FREQS}` table")));
    }
    let table = file.tensor_f32(ROPE_FREQS)?;
    table.check_finite(ROPE_FREQS)?;
    if table.shape != [head_dim / 2] {
        return Err(Error::format(format!(
            "tensor `{ROPE_FREQS}` has shape {:?}, expected [{}] (one factor per rotated pair)",
            table.shape,
            head_dim / 2
        )));
    }
    llama3_scaling_of_table(&table.data, file, arch, theta, head_dim)
}

/// The Llama 3 scaling whose divisors are `table`. The file keeps no low/high frequency factors,
/// so the candidates are those every Llama 3.1 and 3.2 model uses (low 1, high 4) with the
/// table's largest divisor as the factor (8 in Llama 3.1, 32 in 3.2) and the original context
/// the file names, else 8192 (what llama.cpp's converter assumes); any other table is refused
/// rather than run with frequencies we cannot reproduce.
fn llama3_scaling_of_table(
    table: &[f32],
    file: &GgufFile,
    arch: &str,
    theta: f32,
    head_dim: usize,
) -> Result<RopeScaling> {
    const STANDARD_ORIGINAL: u32 = 8192;
    let factor = table.iter().copied().fold(f32::NAN, f32::max);
    let named = file.get(&format!("{arch}.rope.scaling.original_context_length")).and_then(MetadataValue::as_u64);
    let originals = named.and_then(|n| u32::try_from(n).ok()).into_iter().chain([STANDARD_ORIGINAL]);
    let plain_rope = RopeConfig { theta, style: RopeStyle::RotateHalf, scaling: RopeScaling::None };
    let plain = nexus_kernels::reference::rope_inv_freq(plain_rope, head_dim)?;
    for original in originals {
        let scaling = RopeScaling::Llama3 {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: original,
        };
        if scaling.check().is_err() {
            break;
        }
        let scaled = nexus_kernels::reference::rope_inv_freq(RopeConfig { scaling, ..plain_rope }, head_dim)?;
        // The converter computes the divisors in f32 (or f64) from the same formula.
        let matches =
            table.iter().zip(plain.iter().zip(&scaled)).all(|(&t, (&p, &s))| (t - p / s).abs() <= 1e-4 * (p / s));
        if matches {
            return Ok(scaling);
        }
    }
    Err(unsupported(format!(
        "a `{ROPE_FREQS}` table that is not Llama 3's rope scaling with low_freq_factor 1, high_freq_factor 4 \
         and factor {factor} (divisors {:?}...)",
        &table[..table.len().min(8)]
    )))
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
            rope_scaling: RopeScaling::None,
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

    /// A GGUF file of `metadata` and F32 `tensors`: those named in `data` hold those values, the
    /// others `t + i / 1000` (tensor number, element number).
    fn gguf_image(metadata: &[(&str, Meta)], tensors: &[(String, Vec<usize>)], data: &[(&str, Vec<f32>)]) -> Vec<u8> {
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
        for (t, (name, shape)) in tensors.iter().enumerate() {
            let n = shape.iter().product::<usize>();
            match data.iter().find(|(d, _)| d == name) {
                Some((_, values)) => {
                    assert_eq!(values.len(), n, "{name}");
                    out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
                }
                None => out.extend((0..n).flat_map(|i| (t as f32 + i as f32 / 1000.0).to_le_bytes())),
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
        model_with_data(metadata, tensors, &[])
    }

    fn model_with_data(
        metadata: &[(&str, Meta)],
        tensors: &[(String, Vec<usize>)],
        data: &[(&str, Vec<f32>)],
    ) -> Result<GgufModel> {
        GgufModel::new(GgufFile::from_bytes(gguf_image(metadata, tensors, data))?)
    }

    /// A two-layer `llama` model with heads of 64 dimensions (`attention.key_length`, so the
    /// matrices stay small) and rope base 500000, as Llama 3 has.
    fn tiny_llama() -> Fixture {
        let metadata = vec![
            ("general.architecture", Meta::Str("llama")),
            ("llama.block_count", Meta::U32(2)),
            ("llama.embedding_length", Meta::U32(8)),
            ("llama.feed_forward_length", Meta::U32(12)),
            ("llama.attention.head_count", Meta::U32(4)),
            ("llama.attention.head_count_kv", Meta::U32(2)),
            ("llama.attention.key_length", Meta::U32(64)),
            ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
            ("llama.rope.freq_base", Meta::F32(500_000.0)),
            ("llama.context_length", Meta::U32(131_072)),
            ("llama.vocab_size", Meta::U32(10)),
        ];
        let c = ModelConfig { head_dim: 64, ..config(false, true) };
        let tensors = c.weight_shapes().into_iter().map(|(name, shape)| (gguf_tensor_name(name), shape)).collect();
        (metadata, tensors)
    }

    /// The `rope_freqs` table of llama.cpp's converter (`convert_hf_to_gguf.py`, LlamaModel),
    /// transcribed in f64: per frequency, 1 above the high-frequency wavelength, `factor` below
    /// the low one, `1 / ((1 - smooth) / factor + smooth)` in between.
    fn llama_cpp_rope_freqs(theta: f64, head_dim: usize, factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
        (0..head_dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf(2.0 * i as f64 / head_dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                if wavelen < original / high {
                    1.0
                } else if wavelen > original / low {
                    factor as f32
                } else {
                    let smooth = (original / wavelen - low) / (high - low);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect()
    }

    fn with_rope_freqs(table: Vec<f32>, extra: &[(&'static str, Meta)]) -> Result<GgufModel> {
        let (mut metadata, mut tensors) = tiny_llama();
        metadata.extend(extra.iter().map(|(k, v)| {
            let v = match v {
                Meta::U32(x) => Meta::U32(*x),
                Meta::F32(x) => Meta::F32(*x),
                Meta::Str(x) => Meta::Str(x),
            };
            (*k, v)
        }));
        tensors.push((ROPE_FREQS.to_owned(), vec![table.len()]));
        model_with_data(&metadata, &tensors, &[(ROPE_FREQS, table)])
    }

    #[test]
    fn llama3_rope_freqs_tables_are_recognised() {
        let llama3 = |factor, original| RopeScaling::Llama3 {
            factor,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: original,
        };
        // Llama 3.1 (factor 8) and 3.2 (factor 32), original context 8192.
        for factor in [8.0, 32.0] {
            let table = llama_cpp_rope_freqs(500_000.0, 64, factor, 1.0, 4.0, 8192.0);
            let m = with_rope_freqs(table, &[]).expect("loads");
            assert_eq!(m.config().rope_scaling, llama3(factor as f32, 8192));
            assert_eq!(m.config().rope_style, RopeStyle::Interleaved);
        }
        // An original context the file names.
        let table = llama_cpp_rope_freqs(500_000.0, 64, 8.0, 1.0, 4.0, 2048.0);
        let m =
            with_rope_freqs(table, &[("llama.rope.scaling.original_context_length", Meta::U32(2048))]).expect("loads");
        assert_eq!(m.config().rope_scaling, llama3(8.0, 2048));
    }

    #[test]
    fn other_rope_freqs_tables_are_refused() {
        let standard = llama_cpp_rope_freqs(500_000.0, 64, 8.0, 1.0, 4.0, 8192.0);
        // One divisor off by 1%.
        let mut table = standard.clone();
        table[12] *= 1.01;
        let err = with_rope_freqs(table, &[]).expect_err("tampered");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        assert!(err.to_string().contains("rope_freqs.weight"), "{err}");
        // Other low/high frequency factors, which the file cannot name.
        let err = with_rope_freqs(llama_cpp_rope_freqs(500_000.0, 64, 8.0, 2.0, 8.0, 8192.0), &[]).expect_err("bands");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
        // A table for another head size.
        let err = with_rope_freqs(standard[..16].to_vec(), &[]).expect_err("shape");
        assert_eq!(err.kind(), ErrorKind::Format);
        assert!(err.to_string().contains("[32]"), "{err}");
        // Linear scaling on top of a table.
        let linear = [("llama.rope.scaling.type", Meta::Str("linear")), ("llama.rope.scaling.factor", Meta::F32(2.0))];
        let err = with_rope_freqs(standard, &linear).expect_err("both");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn linear_rope_scaling_is_read() {
        let cases = [
            (
                vec![("llama.rope.scaling.type", Meta::Str("linear")), ("llama.rope.scaling.factor", Meta::F32(4.0))],
                4.0,
            ),
            // Without a type, llama.cpp takes a factor as linear scaling; older files name it so.
            (vec![("llama.rope.scaling.factor", Meta::F32(2.0))], 2.0),
            (vec![("llama.rope.scale_linear", Meta::F32(8.0))], 8.0),
        ];
        for (extra, factor) in cases {
            let (mut metadata, tensors) = tiny_llama();
            metadata.extend(extra);
            let m = model(&metadata, &tensors).expect("loads");
            assert_eq!(m.config().rope_scaling, RopeScaling::Linear { factor });
        }
        let unscaled = [
            vec![("llama.rope.scaling.type", Meta::Str("none")), ("llama.rope.scaling.factor", Meta::F32(4.0))],
            vec![("llama.rope.scaling.factor", Meta::F32(1.0))],
            vec![],
        ];
        for extra in unscaled {
            let (mut metadata, tensors) = tiny_llama();
            metadata.extend(extra);
            assert_eq!(model(&metadata, &tensors).expect("loads").config().rope_scaling, RopeScaling::None);
        }
        let (mut metadata, tensors) = tiny_llama();
        metadata.push(("llama.rope.scaling.type", Meta::Str("linear")));
        metadata.push(("llama.rope.scaling.factor", Meta::F32(-2.0)));
        assert_eq!(model(&metadata, &tensors).expect_err("negative").kind(), ErrorKind::Format);
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

    /// Replaces the value of metadata `key`.
    fn set(metadata: &mut [(&str, Meta)], key: &str, value: Meta) {
        metadata.iter_mut().find(|(k, _)| *k == key).expect("key").1 = value;
    }

    #[test]
    fn layer_counts_are_checked_against_the_tensors_before_anything_is_sized_by_them() {
        // Counts a crafted file may declare: 10^7 layers once took 6 GB and 20 s to refuse, 2^31
        // aborted the process; now the bound refuses them before any list of weights is made.
        for count in [10_000_000, 1 << 31, u32::MAX] {
            let (mut metadata, tensors) = tiny_qwen2();
            set(&mut metadata, "qwen2.block_count", Meta::U32(count));
            let start = std::time::Instant::now();
            let err = model(&metadata, &tensors).expect_err("absurd layer count");
            assert_eq!(err.kind(), ErrorKind::Format);
            assert!(err.to_string().contains(&format!("num_layers {count} is beyond the limit of 1024")), "{err}");
            assert!(start.elapsed().as_secs() < 1, "took {:?}", start.elapsed());
        }
        // Within the bound, but more or fewer layers than the file holds.
        for (count, held) in [(3, "the tensors of 2 layers (blk.0 to blk.1)"), (1, "the tensors of 2 layers")] {
            let (mut metadata, tensors) = tiny_qwen2();
            set(&mut metadata, "qwen2.block_count", Meta::U32(count));
            let err = model(&metadata, &tensors).expect_err("wrong layer count");
            assert_eq!(err.kind(), ErrorKind::Format);
            assert!(
                err.to_string().contains(&format!("qwen2.block_count is {count}, but the file has {held}")),
                "{err}"
            );
        }
        // No layer tensor at all.
        let (metadata, mut tensors) = tiny_qwen2();
        tensors.retain(|(n, _)| !n.starts_with("blk."));
        let err = model(&metadata, &tensors).expect_err("no layers");
        assert!(err.to_string().contains("no tensor named blk.N.*"), "{err}");
        // A layer in the middle without any tensor is named by the first tensor it lacks.
        let (mut metadata, mut tensors) = tiny_qwen2();
        set(&mut metadata, "qwen2.block_count", Meta::U32(3));
        for (name, _) in &mut tensors {
            if let Some(rest) = name.strip_prefix("blk.1.") {
                *name = format!("blk.2.{rest}");
            }
        }
        let err = model(&metadata, &tensors).expect_err("gap");
        assert!(err.to_string().contains("tensor `blk.1.attn_norm.weight` is missing"), "{err}");
    }

    #[test]
    fn declared_sizes_beyond_their_bounds_are_refused() {
        // A context of 2^32 - 1 was accepted, and every size it sizes with it.
        let cases = [
            ("qwen2.context_length", u32::MAX, "max_position_embeddings 4294967295"),
            // A multiple of the 4 heads, so that the bound is what refuses it.
            ("qwen2.embedding_length", 1 << 20, "hidden_size 1048576"),
            ("qwen2.feed_forward_length", u32::MAX, "intermediate_size 4294967295"),
            ("qwen2.attention.head_count_kv", u32::MAX, "num_kv_heads 4294967295"),
            ("qwen2.vocab_size", u32::MAX, "vocab_size 4294967295"),
        ];
        for (key, value, needle) in cases {
            let (mut metadata, tensors) = tiny_qwen2();
            set(&mut metadata, key, Meta::U32(value));
            let err = model(&metadata, &tensors).expect_err(key);
            assert_eq!(err.kind(), ErrorKind::Format, "{err}");
            assert!(err.to_string().contains(&format!("{needle} is beyond the limit")), "{key}: {err}");
        }
        // The bounds themselves are allowed (and refused one past).
        let c = config(false, true);
        let at = |c: ModelConfig| c.validate().map_err(|e| e.to_string());
        assert_eq!(at(ModelConfig { max_position_embeddings: 1 << 24, ..c.clone() }), Ok(()));
        assert!(at(ModelConfig { max_position_embeddings: (1 << 24) + 1, ..c.clone() }).is_err());
        assert_eq!(at(ModelConfig { num_heads: 1024, num_kv_heads: 1024, ..c.clone() }), Ok(()));
        assert!(
            at(ModelConfig { num_heads: 1025, num_kv_heads: 1025, ..c.clone() }).unwrap_err().contains("num_heads")
        );
        assert!(at(ModelConfig { head_dim: 1026, ..c }).unwrap_err().contains("head_dim 1026"));
    }

    #[test]
    fn non_finite_weights_are_refused_with_the_tensor_named() {
        let (metadata, tensors) = tiny_qwen2();
        let mut values: Vec<f32> = (0..96).map(|i| i as f32).collect();
        values[2 * 8 + 5] = f32::NAN;
        let nan = ("blk.1.ffn_up.weight", values.clone());
        values[2 * 8 + 5] = 0.0;
        values[95] = f32::NEG_INFINITY;
        let inf = ("blk.0.ffn_gate.weight", values);
        let m = model_with_data(&metadata, &tensors, &[nan.clone(), inf.clone()]).expect("opens");
        let err = m.load(WeightName::Layer(1, LayerWeight::Up)).expect_err("NaN");
        assert_eq!(err.kind(), ErrorKind::Format);
        assert!(err.to_string().contains("tensor `blk.1.ffn_up.weight` holds NaN at [2, 5]"), "{err}");
        let err = m.load(WeightName::Layer(0, LayerWeight::Gate)).expect_err("inf");
        assert!(err.to_string().contains("tensor `blk.0.ffn_gate.weight` holds -inf at [11, 7]"), "{err}");
        // The other weights still load.
        m.load(WeightName::Layer(0, LayerWeight::Up)).expect("finite");
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
