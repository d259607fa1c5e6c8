//! A Hugging Face checkpoint folder as a [`WeightSource`]: `config.json` and safetensors weights.
//!
//! A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
//! name to its dtype, shape and byte range (`data_offsets`, relative to the end of the header),
//! and the tensor bytes. Files are memory-mapped and every range in a header is checked against
//! the file before anything is read, so a truncated or corrupted file is an
//! [`ErrorKind::Format`] error naming the problem, never a panic. Big checkpoints are split into
//! shards listed by `model.safetensors.index.json`.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::weights::config::{
    Architecture, LayerWeight, ModelConfig, RopeScaling, RopeStyle, WeightName, WeightSource,
};
use crate::weights::dequant::alloc_f32;
use crate::weights::gguf::HostTensor;
use crate::weights::loader::check_regular_file;
use crate::{Error, ErrorKind, Result};

const SINGLE_FILE: &str = "model.safetensors";
const INDEX_FILE: &str = "model.safetensors.index.json";

/// A Llama-family checkpoint in Hugging Face's layout.
#[derive(Debug)]
pub struct HfCheckpoint {
    config: ModelConfig,
    shards: Vec<Shard>,
    /// Each tensor's shard (an index into `shards`) and entry.
    tensors: HashMap<String, (usize, TensorEntry)>,
}

struct Shard {
    path: PathBuf,
    map: memmap2::Mmap,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("path", &self.path).field("bytes", &self.map.len()).finish()
    }
}

/// Where a tensor is in its shard: absolute byte offsets, already checked against the file.
#[derive(Clone, Debug)]
struct TensorEntry {
    dtype: Dtype,
    shape: Vec<usize>,
    start: usize,
    end: usize,
}

/// The storage types we convert to f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dtype {
    F32,
    F16,
    Bf16,
}

impl Dtype {
    fn size(self) -> usize {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::Bf16 => 2,
        }
    }
}

/// The safetensors dtypes we know of but do not convert.
const OTHER_DTYPES: &[&str] = &[
    "BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F6_E2M3",
    "F6_E3M2", "F4", "E8M0", "C64",
];

impl HfCheckpoint {
    /// Opens the checkpoint in `dir`: reads `config.json` (LlamaForCausalLM, MistralForCausalLM
    /// or Qwen2ForCausalLM), maps `model.safetensors` or the shards `model.safetensors.index.json`
    /// lists, and checks that every weight the model needs is there with the shape the config
    /// implies. The sizes config.json declares are checked against their bounds
    /// ([`ModelConfig::validate`]) and the layer count against the layers whose tensors are there
    /// before anything is sized by them, and every file is checked to be a regular file before it
    /// is opened.
    ///
    /// A feature the Llama model does not implement (rope scaling other than `linear` and
    /// `llama3`, sliding-window attention, MLP or output-projection biases, an activation other
    /// than SiLU) is an [`ErrorKind::Unsupported`] error; a malformed file an
    /// [`ErrorKind::Format`] error.
    pub fn open(dir: &Path) -> Result<Self> {
        let config = read_config(&dir.join("config.json"))?;
        let index_path = dir.join(INDEX_FILE);
        let files = if index_path.exists() { shard_names(&index_path)? } else { vec![SINGLE_FILE.to_owned()] };

        let mut shards = Vec::with_capacity(files.len());
        let mut tensors = HashMap::new();
        for (i, name) in files.iter().enumerate() {
            let path = dir.join(name);
            check_regular_file(&path)?;
            let file = File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the map is read-only and private to this value; a checkpoint changed on disk
            // while it is mapped is outside what we guard against (as in every mmap-based loader).
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let entries =
                parse_header(&map).map_err(|e| Error::new(e.kind(), format!("{}: {}", path.display(), e.message())))?;
            for (tensor, entry) in entries {
                if let Some((other, _)) = tensors.insert(tensor.clone(), (i, entry)) {
                    return Err(Error::format(format!("tensor `{tensor}` is in both {} and {name}", files[other])));
                }
            }
            shards.push(Shard { path, map });
        }

        config
            .check_layers_present("num_hidden_layers", "model.layers.", tensors.keys().map(String::as_str))
            .map_err(|e| Error::format(format!("{}: {}", dir.display(), e.message())))?;
        for (name, shape) in config.weight_shapes() {
            let tensor = hf_tensor_name(name);
            let (_, entry) = tensors
                .get(&tensor)
                .ok_or_else(|| Error::format(format!("{}: tensor `{tensor}` is missing", dir.display())))?;
            if entry.shape != shape {
                return Err(Error::format(format!(
                    "{}: tensor `{tensor}` has shape {:?}, but config.json implies {shape:?}",
                    dir.display(),
                    entry.shape
                )));
            }
        }
        Ok(HfCheckpoint { config, shards, tensors })
    }
}

impl WeightSource for HfCheckpoint {
    fn config(&self) -> &ModelConfig {
        &self.config
    }

    fn load(&self, name: WeightName) -> Result<HostTensor> {
        if !self.contains(name) {
            return Err(Error::invalid(format!("this model has no weight {name:?}")));
        }
        let tensor = hf_tensor_name(name);
        // `open` checked that every weight the config implies is present.
        let (shard, entry) =
            self.tensors.get(&tensor).ok_or_else(|| Error::format(format!("tensor `{tensor}` is missing")))?;
        let bytes = &self.shards[*shard].map[entry.start..entry.end];
        let data = to_f32(entry.dtype, bytes)
            .map_err(|e| Error::new(e.kind(), format!("tensor `{tensor}`: {}", e.message())))?;
        let t = HostTensor { shape: entry.shape.clone(), data };
        t.check_finite(&tensor)?;
        Ok(t)
    }
}

/// The Hugging Face name of a weight, e.g. `model.layers.3.self_attn.q_proj.weight`.
fn hf_tensor_name(name: WeightName) -> String {
    let (layer, weight) = match name {
        WeightName::TokenEmbedding => return "model.embed_tokens.weight".to_owned(),
        WeightName::FinalNorm => return "model.norm.weight".to_owned(),
        WeightName::LmHead => return "lm_head.weight".to_owned(),
        WeightName::Layer(layer, weight) => (layer, weight),
    };
    let suffix = match weight {
        LayerWeight::AttnNorm => "input_layernorm.weight",
        LayerWeight::Q => "self_attn.q_proj.weight",
        LayerWeight::K => "self_attn.k_proj.weight",
        LayerWeight::V => "self_attn.v_proj.weight",
        LayerWeight::QBias => "self_attn.q_proj.bias",
        LayerWeight::KBias => "self_attn.k_proj.bias",
        LayerWeight::VBias => "self_attn.v_proj.bias",
        LayerWeight::O => "self_attn.o_proj.weight",
        LayerWeight::FfnNorm => "post_attention_layernorm.weight",
        LayerWeight::Gate => "mlp.gate_proj.weight",
        LayerWeight::Up => "mlp.up_proj.weight",
        LayerWeight::Down => "mlp.down_proj.weight",
    };
    format!("model.layers.{layer}.{suffix}")
}

fn to_f32(dtype: Dtype, bytes: &[u8]) -> Result<Vec<f32>> {
    let mut out = alloc_f32(bytes.len() / dtype.size())?;
    match dtype {
        Dtype::F32 => out.extend(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))),
        Dtype::F16 => out.extend(bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())),
        Dtype::Bf16 => out.extend(bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())),
    }
    Ok(out)
}

// ---- safetensors headers ----------------------------------------------------------------------

/// One tensor's description in a safetensors header.
#[derive(Deserialize)]
struct RawEntry {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parses and checks the header of a safetensors image, returning each tensor's entry.
fn parse_header(bytes: &[u8]) -> Result<Vec<(String, TensorEntry)>> {
    let Some(len_bytes) = bytes.first_chunk::<8>() else {
        return Err(Error::format(format!("truncated: {} bytes, too short for the 8-byte header length", bytes.len())));
    };
    let header_len = u64::from_le_bytes(*len_bytes);
    let data_start = header_len.checked_add(8).filter(|&end| end <= bytes.len() as u64).ok_or_else(|| {
        Error::format(format!("header length {header_len} runs past the end of the file ({} bytes)", bytes.len()))
    })? as usize;
    let header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..data_start])
        .map_err(|e| Error::with_source(ErrorKind::Format, "the header is not a JSON object", e))?;
    let data_len = (bytes.len() - data_start) as u64;

    let mut entries = Vec::with_capacity(header.len());
    for (name, value) in header {
        if name == "__metadata__" {
            continue;
        }
        let raw: RawEntry = serde_json::from_value(value)
            .map_err(|e| Error::with_source(ErrorKind::Format, format!("tensor `{name}`: bad header entry"), e))?;
        let dtype = match raw.dtype.as_str() {
            "F32" => Dtype::F32,
            "F16" => Dtype::F16,
            "BF16" => Dtype::Bf16,
            other if OTHER_DTYPES.contains(&other) => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("tensor `{name}`: dtype {other} (supported: F32, F16, BF16)"),
                ));
            }
            other => return Err(Error::format(format!("tensor `{name}`: unknown dtype `{other}`"))),
        };
        let elements = raw.shape.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).ok_or_else(|| {
            Error::format(format!("tensor `{name}`: element count of shape {:?} overflows", raw.shape))
        })?;
        let [begin, end] = raw.data_offsets;
        let expected = elements.checked_mul(dtype.size() as u64);
        if begin > end || end > data_len {
            return Err(Error::format(format!(
                "tensor `{name}`: data offsets [{begin}, {end}] are outside the {data_len} data bytes"
            )));
        }
        if expected != Some(end - begin) {
            return Err(Error::format(format!(
                "tensor `{name}`: {} bytes of data for shape {:?} of {}, which needs {elements} x {}",
                end - begin,
                raw.shape,
                raw.dtype,
                dtype.size()
            )));
        }
        // Fits in usize: the range lies inside the mapped file.
        let shape = raw.shape.iter().map(|&d| d as usize).collect();
        let start = data_start + begin as usize;
        entries.push((name, TensorEntry { dtype, shape, start, end: data_start + end as usize }));
    }
    Ok(entries)
}

/// The shard files `model.safetensors.index.json` lists, each once, in order. They must be plain
/// file names in the same folder.
fn shard_names(index_path: &Path) -> Result<Vec<String>> {
    #[derive(Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    check_regular_file(index_path)?;
    let bytes = std::fs::read(index_path).map_err(|e| Error::io(index_path, e))?;
    let index: Index = serde_json::from_slice(&bytes).map_err(|e| {
        Error::with_source(ErrorKind::Format, format!("{}: no `weight_map` of tensor to file", index_path.display()), e)
    })?;
    let names: BTreeSet<String> = index.weight_map.into_values().collect();
    for name in &names {
        let plain = Path::new(name).file_name().is_some_and(|f| f == name.as_str());
        if !plain || name == ".." {
            return Err(Error::format(format!(
                "{}: shard `{name}` is not a file name in the checkpoint folder",
                index_path.display()
            )));
        }
    }
    Ok(names.into_iter().collect())
}

// ---- config.json ------------------------------------------------------------------------------

/// The fields of `config.json` that the Llama family uses.
#[derive(Deserialize)]
struct HfConfig {
    architectures: Option<Vec<String>>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    /// Transformers 5 keeps the rope settings here instead (`rope_theta`, `rope_type`).
    rope_parameters: Option<Value>,
    rope_scaling: Option<Value>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
}

fn read_config(path: &Path) -> Result<ModelConfig> {
    check_regular_file(path)?;
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let hf: HfConfig = serde_json::from_slice(&bytes)
        .map_err(|e| Error::with_source(ErrorKind::Format, format!("{}: not a model config", path.display()), e))?;
    config_from_hf(&hf).map_err(|e| Error::new(e.kind(), format!("{}: {}", path.display(), e.message())))
}

fn unsupported(message: String) -> Error {
    Error::new(ErrorKind::Unsupported, message)
}

fn config_from_hf(hf: &HfConfig) -> Result<ModelConfig> {
    let class = match hf.architectures.as_deref() {
        Some([class]) => class.as_str(),
        _ => return Err(Error::format("`architectures` should name one model class")),
    };
    let architecture = match class {
        "LlamaForCausalLM" | "MistralForCausalLM" => Architecture::Llama,
        "Qwen2ForCausalLM" => Architecture::Qwen2,
        other => {
            return Err(unsupported(format!(
                "model class {other} (supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)"
            )));
        }
    };
    if let Some(act) = &hf.hidden_act
        && act != "silu"
    {
        return Err(unsupported(format!("activation `{act}` (only silu)")));
    }
    if hf.mlp_bias == Some(true) {
        return Err(unsupported("MLP biases (`mlp_bias`)".to_owned()));
    }
    // Qwen2 always has Q/K/V biases and no output bias; in Llama, `attention_bias` puts a bias on
    // all four projections, and the model has no slot for the output one.
    let attention_bias = match architecture {
        Architecture::Qwen2 => true,
        Architecture::Llama if hf.attention_bias == Some(true) => {
            return Err(unsupported("attention biases in a Llama model (the o_proj bias)".to_owned()));
        }
        Architecture::Llama => false,
    };
    // Mistral's sliding window only matters where it is shorter than the context; Qwen2 turns it
    // on explicitly.
    let sliding = match architecture {
        Architecture::Qwen2 => hf.use_sliding_window == Some(true),
        Architecture::Llama => hf.sliding_window.is_some_and(|w| w < hf.max_position_embeddings),
    };
    if sliding {
        return Err(unsupported("sliding-window attention".to_owned()));
    }
    // Transformers 4 writes the scaling to `rope_scaling`, transformers 5 to `rope_parameters`;
    // a file with both must not contradict itself.
    let mut rope_scaling = RopeScaling::None;
    for settings in [&hf.rope_scaling, &hf.rope_parameters].into_iter().flatten() {
        let scaling = rope_scaling_from_hf(settings)?;
        if rope_scaling != RopeScaling::None && scaling != RopeScaling::None && scaling != rope_scaling {
            return Err(Error::format(format!(
                "rope_scaling ({rope_scaling:?}) and rope_parameters ({scaling:?}) disagree"
            )));
        }
        if scaling != RopeScaling::None {
            rope_scaling = scaling;
        }
    }
    let rope_theta = match (hf.rope_theta, hf.rope_parameters.as_ref().and_then(|p| p.get("rope_theta"))) {
        (Some(theta), _) => theta,
        (None, Some(theta)) => {
            theta.as_f64().ok_or_else(|| Error::format("rope_parameters.rope_theta is not a number"))?
        }
        // The default of LlamaConfig, MistralConfig and Qwen2Config.
        (None, None) => 10_000.0,
    };
    if hf.num_attention_heads == 0 {
        return Err(Error::format("num_attention_heads is 0"));
    }
    let head_dim = hf.head_dim.unwrap_or(hf.hidden_size / hf.num_attention_heads);
    let config = ModelConfig {
        architecture,
        hidden_size: hf.hidden_size,
        intermediate_size: hf.intermediate_size,
        num_layers: hf.num_hidden_layers,
        num_heads: hf.num_attention_heads,
        num_kv_heads: hf.num_key_value_heads.unwrap_or(hf.num_attention_heads),
        head_dim,
        vocab_size: hf.vocab_size,
        max_position_embeddings: hf.max_position_embeddings,
        rms_norm_eps: hf.rms_norm_eps as f32,
        rope_theta: rope_theta as f32,
        rope_style: RopeStyle::RotateHalf,
        rope_scaling,
        // False is the default of LlamaConfig, MistralConfig and Qwen2Config alike.
        tie_word_embeddings: hf.tie_word_embeddings.unwrap_or(false),
        attention_bias,
    };
    config.validate()?;
    Ok(config)
}

/// The scaling that one `rope_scaling` / `rope_parameters` object of config.json describes, read
/// as transformers reads it: `rope_type` (or the older `type`) names the kind, and every parameter
/// the kind uses is required.
fn rope_scaling_from_hf(settings: &Value) -> Result<RopeScaling> {
    let kind = match settings.get("rope_type").or_else(|| settings.get("type")) {
        None => return Ok(RopeScaling::None),
        Some(kind) => kind.as_str().ok_or_else(|| Error::format(format!("rope type {kind} is not a string")))?,
    };
    let number = |key: &str| -> Result<f32> {
        let value = settings.get(key).ok_or_else(|| Error::format(format!("{kind} rope scaling without `{key}`")))?;
        value
            .as_f64()
            .map(|v| v as f32)
            .ok_or_else(|| Error::format(format!("{kind} rope scaling: `{key}` = {value} is not a number")))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: number("factor")? },
        "llama3" => {
            let (factor, low_freq_factor, high_freq_factor) =
                (number("factor")?, number("low_freq_factor")?, number("high_freq_factor")?);
            let key = "original_max_position_embeddings";
            let original =
                settings.get(key).ok_or_else(|| Error::format(format!("llama3 rope scaling without `{key}`")))?;
            let original_max_position_embeddings = original
                .as_u64()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| Error::format(format!("llama3 rope scaling: `{key}` = {original} is not a count")))?;
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }
        }
        other => return Err(unsupported(format!("rope scaling `{other}` (supported: linear, llama3)"))),
    };
    scaling.check().map_err(|e| Error::format(format!("{kind} rope scaling: {e}")))?;
    Ok(scaling)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(header: &str, data_len: usize) -> Vec<u8> {
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header.as_bytes());
        out.resize(out.len() + data_len, 0);
        out
    }

    #[test]
    fn parses_entries_and_metadata() {
        let header = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,12]},"b":{"dtype":"F32","shape":[],"data_offsets":[12,16]}}"#;
        let mut entries = parse_header(&image(header, 16)).expect("parses");
        entries.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].1.shape, vec![2, 3]);
        assert_eq!(entries[0].1.dtype, Dtype::Bf16);
        assert_eq!(entries[0].1.start, 8 + header.len());
        assert_eq!(entries[1].1.end - entries[1].1.start, 4);
    }

    #[test]
    fn rejects_bad_headers() {
        let cases = [
            (vec![1u8, 0, 0], "too short"),
            (image("{}", 0)[..6].to_vec(), "too short"),
            ((1000u64).to_le_bytes().to_vec(), "runs past the end"),
            (image("[1, 2]", 0), "not a JSON object"),
            (image(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#, 4), "outside"),
            (image(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,0]}}"#, 8), "outside"),
            (image(r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#, 8), "needs 3 x 4"),
            (image(r#"{"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}}"#, 8), "unknown dtype"),
            (image(r#"{"a":{"dtype":"F32","shape":[2]}}"#, 8), "bad header entry"),
            (image(r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}}"#, 8), "overflows"),
        ];
        for (bytes, needle) in cases {
            let err = parse_header(&bytes).expect_err(needle);
            assert_eq!(err.kind(), ErrorKind::Format, "{err}");
            assert!(err.to_string().contains(needle), "{err} should mention {needle}");
        }
        let err =
            parse_header(&image(r#"{"a":{"dtype":"I64","shape":[1],"data_offsets":[0,8]}}"#, 8)).expect_err("I64");
        assert_eq!(err.kind(), ErrorKind::Unsupported);
    }

    #[test]
    fn converts_half_precision() {
        let bf16 = half::bf16::from_f32(-1.5).to_le_bytes();
        let f16 = half::f16::from_f32(0.25).to_le_bytes();
        assert_eq!(to_f32(Dtype::Bf16, &bf16).unwrap(), vec![-1.5]);
        assert_eq!(to_f32(Dtype::F16, &f16).unwrap(), vec![0.25]);
        assert_eq!(to_f32(Dtype::F32, &2.0f32.to_le_bytes()).unwrap(), vec![2.0]);
    }
}
