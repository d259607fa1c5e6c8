//! Hugging Face checkpoints: the tiny Llama and Qwen2 folders of tests/fixtures (made by
//! scripts/make-tiny-hf-checkpoint.py), and malformed copies of them.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use nexus::runtime::weights::config::{Architecture, LayerWeight, RopeScaling, RopeStyle, WeightName, WeightSource};
use nexus::runtime::weights::safetensors::HfCheckpoint;
use nexus::runtime::{Error, ErrorKind};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn open(dir: &Path) -> HfCheckpoint {
    HfCheckpoint::open(dir)
        .unwrap_or_else(|e| panic!("{}: {e} (regenerate with scripts/make-tiny-hf-checkpoint.py)", dir.display()))
}

/// The value the fixture script gives element `i` of tensor `name`.
fn expected_value(name: &str, i: usize) -> f32 {
    let seed = name.bytes().map(usize::from).sum::<usize>() % 251;
    ((i * 7 + seed * 13) % 61) as f32 / 32.0 - 30.0 / 32.0
}

fn check_values(source: &HfCheckpoint, name: WeightName, hf_name: &str, shape: &[usize]) {
    let tensor = source.load(name).unwrap_or_else(|e| panic!("{hf_name}: {e}"));
    assert_eq!(tensor.shape, shape, "{hf_name}");
    let expected: Vec<f32> = (0..tensor.data.len()).map(|i| expected_value(hf_name, i)).collect();
    assert_eq!(tensor.data, expected, "{hf_name}");
}

#[test]
fn tiny_llama_loads() {
    let source = open(&fixture("tiny-llama"));
    let c = source.config();
    assert_eq!(c.architecture, Architecture::Llama);
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim),
        (16, 24, 2, 4, 2, 8)
    );
    assert_eq!((c.vocab_size, c.max_position_embeddings), (32, 64));
    assert_eq!((c.rms_norm_eps, c.rope_theta), (1e-5, 50_000.0));
    assert_eq!((c.rope_style, c.rope_scaling), (RopeStyle::RotateHalf, RopeScaling::None));
    assert!(!c.tie_word_embeddings && !c.attention_bias);

    assert!(source.contains(WeightName::LmHead));
    assert!(!source.contains(WeightName::Layer(0, LayerWeight::QBias)));
    assert!(!source.contains(WeightName::Layer(2, LayerWeight::Q)));
    assert_eq!(
        source.load(WeightName::Layer(0, LayerWeight::QBias)).expect_err("no bias").kind(),
        ErrorKind::InvalidInput
    );

    // The fixture stores tensors as F32, F16 and BF16 (by name); all convert exactly.
    check_values(&source, WeightName::TokenEmbedding, "model.embed_tokens.weight", &[32, 16]);
    check_values(&source, WeightName::LmHead, "lm_head.weight", &[32, 16]);
    check_values(&source, WeightName::FinalNorm, "model.norm.weight", &[16]);
    let layer = |w| WeightName::Layer(1, w);
    check_values(&source, layer(LayerWeight::AttnNorm), "model.layers.1.input_layernorm.weight", &[16]);
    check_values(&source, layer(LayerWeight::Q), "model.layers.1.self_attn.q_proj.weight", &[32, 16]);
    check_values(&source, layer(LayerWeight::K), "model.layers.1.self_attn.k_proj.weight", &[16, 16]);
    check_values(&source, layer(LayerWeight::V), "model.layers.1.self_attn.v_proj.weight", &[16, 16]);
    check_values(&source, layer(LayerWeight::O), "model.layers.1.self_attn.o_proj.weight", &[16, 32]);
    check_values(&source, layer(LayerWeight::FfnNorm), "model.layers.1.post_attention_layernorm.weight", &[16]);
    check_values(&source, layer(LayerWeight::Gate), "model.layers.1.mlp.gate_proj.weight", &[24, 16]);
    check_values(&source, layer(LayerWeight::Up), "model.layers.1.mlp.up_proj.weight", &[24, 16]);
    check_values(&source, layer(LayerWeight::Down), "model.layers.1.mlp.down_proj.weight", &[16, 24]);
}

#[test]
fn tiny_qwen2_loads_from_shards() {
    let source = open(&fixture("tiny-qwen2"));
    let c = source.config();
    assert_eq!(c.architecture, Architecture::Qwen2);
    assert_eq!((c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim), (16, 4, 2, 4));
    assert_eq!((c.rms_norm_eps, c.rope_theta, c.max_position_embeddings), (1e-6, 1_000_000.0, 128));
    assert_eq!(c.rope_style, RopeStyle::RotateHalf);
    assert!(c.tie_word_embeddings && c.attention_bias);
    assert!(!source.contains(WeightName::LmHead));
    assert!(source.contains(WeightName::Layer(1, LayerWeight::VBias)));

    check_values(&source, WeightName::TokenEmbedding, "model.embed_tokens.weight", &[32, 16]);
    for layer in 0..2 {
        let name = |suffix: &str| format!("model.layers.{layer}.self_attn.{suffix}");
        let w = |w| WeightName::Layer(layer, w);
        check_values(&source, w(LayerWeight::QBias), &name("q_proj.bias"), &[16]);
        check_values(&source, w(LayerWeight::KBias), &name("k_proj.bias"), &[8]);
        check_values(&source, w(LayerWeight::VBias), &name("v_proj.bias"), &[8]);
        check_values(&source, w(LayerWeight::Q), &name("q_proj.weight"), &[16, 16]);
        check_values(&source, w(LayerWeight::K), &name("k_proj.weight"), &[8, 16]);
    }
}

// ---- malformed checkpoints ----------------------------------------------------------------------

/// A scratch copy of a fixture folder, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn copy_of(fixture_name: &str) -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hf-checkpoint-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch folder");
        for entry in std::fs::read_dir(fixture(fixture_name)).expect("fixture folder") {
            let path = entry.expect("entry").path();
            std::fs::copy(&path, dir.join(path.file_name().expect("file name"))).expect("copy");
        }
        Scratch(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    fn open(&self) -> Result<HfCheckpoint, Error> {
        HfCheckpoint::open(&self.0)
    }

    /// Rewrites `file`'s safetensors header with `edit`, keeping its data.
    fn edit_header(&self, file: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
        let bytes = std::fs::read(self.path(file)).expect("read");
        let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let mut header: serde_json::Map<String, Value> = serde_json::from_slice(&bytes[8..8 + len]).expect("header");
        edit(&mut header);
        let text = serde_json::to_vec(&header).expect("serialize");
        let mut out = (text.len() as u64).to_le_bytes().to_vec();
        out.extend(text);
        out.extend(&bytes[8 + len..]);
        std::fs::write(self.path(file), out).expect("write");
    }

    /// Overwrites element `index` of tensor `tensor` in `file` with `value`, in the tensor's dtype.
    fn write_value(&self, file: &str, tensor: &str, index: usize, value: f32) {
        let mut bytes = std::fs::read(self.path(file)).expect("read");
        let len = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
        let header: Value = serde_json::from_slice(&bytes[8..8 + len]).expect("header");
        let entry = &header[tensor];
        let encoded = match entry["dtype"].as_str().expect("dtype") {
            "F32" => value.to_le_bytes().to_vec(),
            "F16" => half::f16::from_f32(value).to_le_bytes().to_vec(),
            "BF16" => half::bf16::from_f32(value).to_le_bytes().to_vec(),
            other => panic!("the fixture has a tensor of dtype {other}"),
        };
        let at = 8 + len + entry["data_offsets"][0].as_u64().expect("offset") as usize + index * encoded.len();
        bytes[at..at + encoded.len()].copy_from_slice(&encoded);
        std::fs::write(self.path(file), bytes).expect("write");
    }

    fn edit_config(&self, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
        let mut config: serde_json::Map<String, Value> =
            serde_json::from_slice(&std::fs::read(self.path("config.json")).expect("read")).expect("config");
        edit(&mut config);
        std::fs::write(self.path("config.json"), serde_json::to_vec(&config).expect("serialize")).expect("write");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a leftover folder under the target directory is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[track_caller]
fn assert_error(result: Result<HfCheckpoint, Error>, kind: ErrorKind, needles: &[&str]) {
    let err = result.expect_err("the checkpoint should be rejected");
    assert_eq!(err.kind(), kind, "{err}");
    // The message and its causes, as an error reporter prints them.
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(cause) = source {
        text += &format!(": {cause}");
        source = cause.source();
    }
    for needle in needles {
        assert!(text.contains(needle), "`{text}` should mention `{needle}`");
    }
}

const MODEL: &str = "model.safetensors";

#[test]
fn truncated_files_are_format_errors() {
    let s = Scratch::copy_of("tiny-llama");
    let full = std::fs::read(s.path(MODEL)).expect("read");

    std::fs::write(s.path(MODEL), &full[..5]).expect("write");
    assert_error(s.open(), ErrorKind::Format, &["model.safetensors", "too short"]);

    // The header length is intact but the header itself is cut off.
    std::fs::write(s.path(MODEL), &full[..100]).expect("write");
    assert_error(s.open(), ErrorKind::Format, &["header length", "runs past the end"]);

    // The header is whole but the data is not: the last tensors' offsets run past the end.
    std::fs::write(s.path(MODEL), &full[..full.len() - 10]).expect("write");
    assert_error(s.open(), ErrorKind::Format, &["data offsets", "outside"]);

    std::fs::write(s.path(MODEL), b"\x04\0\0\0\0\0\0\0nope").expect("write");
    assert_error(s.open(), ErrorKind::Format, &["not a JSON object"]);
}

#[test]
fn bad_header_entries_are_format_errors() {
    let s = Scratch::copy_of("tiny-llama");
    s.edit_header(MODEL, |h| h["model.norm.weight"]["data_offsets"] = serde_json::json!([0, 1_000_000]));
    assert_error(s.open(), ErrorKind::Format, &["model.norm.weight", "outside"]);

    let s = Scratch::copy_of("tiny-llama");
    s.edit_header(MODEL, |h| h["model.norm.weight"]["dtype"] = "Q7".into());
    assert_error(s.open(), ErrorKind::Format, &["model.norm.weight", "unknown dtype `Q7`"]);

    let s = Scratch::copy_of("tiny-llama");
    s.edit_header(MODEL, |h| h["model.norm.weight"]["dtype"] = "I64".into());
    assert_error(s.open(), ErrorKind::Unsupported, &["model.norm.weight", "I64"]);

    // The same number of elements in another shape passes the header checks but not the model's.
    let s = Scratch::copy_of("tiny-llama");
    s.edit_header(MODEL, |h| h["model.layers.1.self_attn.q_proj.weight"]["shape"] = serde_json::json!([16, 32]));
    assert_error(s.open(), ErrorKind::Format, &["model.layers.1.self_attn.q_proj.weight", "[16, 32]", "[32, 16]"]);

    let s = Scratch::copy_of("tiny-llama");
    s.edit_header(MODEL, |h| {
        h.remove("model.layers.1.mlp.down_proj.weight");
    });
    assert_error(s.open(), ErrorKind::Format, &["model.layers.1.mlp.down_proj.weight", "missing"]);
}

#[test]
fn bad_configs_are_rejected() {
    let s = Scratch::copy_of("tiny-llama");
    s.edit_config(|c| {
        c.remove("hidden_size");
    });
    assert_error(s.open(), ErrorKind::Format, &["config.json", "hidden_size"]);

    // Rope scalings transformers has and the model does not.
    for kind in ["yarn", "dynamic", "longrope"] {
        let s = Scratch::copy_of("tiny-llama");
        s.edit_config(|c| {
            c.insert("rope_scaling".into(), serde_json::json!({"rope_type": kind, "factor": 8.0}));
        });
        assert_error(s.open(), ErrorKind::Unsupported, &["rope scaling", kind]);
    }
    // A llama3 scaling without its band parameters, and one whose band is empty.
    let s = Scratch::copy_of("tiny-llama");
    s.edit_config(|c| {
        c.insert("rope_scaling".into(), serde_json::json!({"rope_type": "llama3", "factor": 8.0}));
    });
    assert_error(s.open(), ErrorKind::Format, &["llama3", "low_freq_factor"]);
    let s = Scratch::copy_of("tiny-llama");
    s.edit_config(|c| {
        let scaling = serde_json::json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32});
        c.insert("rope_scaling".into(), scaling);
    });
    assert_error(s.open(), ErrorKind::Format, &["llama3", "high_freq_factor"]);

    let s = Scratch::copy_of("tiny-llama");
    s.edit_config(|c| {
        c.insert("architectures".into(), serde_json::json!(["GPT2LMHeadModel"]));
    });
    assert_error(s.open(), ErrorKind::Unsupported, &["GPT2LMHeadModel"]);

    // A config that says the embeddings are tied needs no lm_head; one that says they are not
    // must have it.
    let s = Scratch::copy_of("tiny-qwen2");
    s.edit_config(|c| {
        c.insert("tie_word_embeddings".into(), false.into());
    });
    assert_error(s.open(), ErrorKind::Format, &["lm_head.weight", "missing"]);
}

const LLAMA3_SCALING: RopeScaling = RopeScaling::Llama3 {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 32,
};

/// Llama 3.1's rope scaling, as transformers 4 writes it (`rope_scaling`, with `rope_type` or
/// the older `type`) and as transformers 5 does (`rope_parameters`, with `rope_theta` inside).
#[test]
fn llama3_rope_scaling_is_read() {
    let parameters = |key: &str| {
        serde_json::json!({key: "llama3", "factor": 8, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32})
    };
    for (field, value) in [("rope_scaling", parameters("rope_type")), ("rope_scaling", parameters("type"))] {
        let s = Scratch::copy_of("tiny-llama");
        s.edit_config(|c| {
            c.insert(field.into(), value);
        });
        let c = s.open().expect("loads").config().clone();
        assert_eq!((c.rope_scaling, c.rope_theta), (LLAMA3_SCALING, 50_000.0));
    }
    let s = Scratch::copy_of("tiny-llama");
    s.edit_config(|c| {
        c.remove("rope_theta");
        let mut p = parameters("rope_type");
        p["rope_theta"] = 500_000.0.into();
        c.insert("rope_parameters".into(), p);
    });
    let c = s.open().expect("loads").config().clone();
    assert_eq!((c.rope_scaling, c.rope_theta), (LLAMA3_SCALING, 500_000.0));

    // Both fields, in agreement and not.
    let s = Scratch::copy_of("tiny-llama");
    s.edit_config(|c| {
        c.insert("rope_scaling".into(), parameters("rope_type"));
        c.insert("rope_parameters".into(), parameters("rope_type"));
    });
    assert_eq!(s.open().expect("loads").config().rope_scaling, LLAMA3_SCALING);
    let s = Scratch::copy_of("tiny-llama");
    s.edit_config(|c| {
        c.insert("rope_scaling".into(), parameters("rope_type"));
        c.insert("rope_parameters".into(), serde_json::json!({"rope_type": "linear", "factor": 2.0}));
    });
    assert_error(s.open(), ErrorKind::Format, &["disagree"]);
}

#[test]
fn linear_rope_scaling_is_read() {
    let s = Scratch::copy_of("tiny-qwen2");
    s.edit_config(|c| {
        c["rope_parameters"]["rope_type"] = "linear".into();
        c["rope_parameters"]["factor"] = 4.0.into();
    });
    let c = s.open().expect("loads").config().clone();
    assert_eq!((c.rope_scaling, c.rope_theta), (RopeScaling::Linear { factor: 4.0 }, 1_000_000.0));

    let s = Scratch::copy_of("tiny-llama");
    s.edit_config(|c| {
        c.insert("rope_scaling".into(), serde_json::json!({"type": "linear"}));
    });
    assert_error(s.open(), ErrorKind::Format, &["linear", "factor"]);
}

#[test]
fn bad_shard_indexes_are_rejected() {
    let s = Scratch::copy_of("tiny-qwen2");
    std::fs::remove_file(s.path("model-00002-of-00002.safetensors")).expect("remove");
    assert_error(s.open(), ErrorKind::Io, &["model-00002-of-00002.safetensors"]);

    let s = Scratch::copy_of("tiny-qwen2");
    let index = serde_json::json!({"weight_map": {"model.norm.weight": "../model.safetensors"}});
    std::fs::write(s.path("model.safetensors.index.json"), index.to_string()).expect("write");
    assert_error(s.open(), ErrorKind::Format, &["../model.safetensors", "not a file name"]);

    let s = Scratch::copy_of("tiny-qwen2");
    std::fs::write(s.path("model.safetensors.index.json"), "{}").expect("write");
    assert_error(s.open(), ErrorKind::Format, &["weight_map"]);
}

#[test]
fn crafted_sizes_are_refused_before_anything_is_sized_by_them() {
    // 2^31 layers aborted the process ("memory allocation failed") and 10^7 took gigabytes before
    // a missing tensor was noticed; the bounds refuse them at once.
    for layers in [10_000_000u64, 1 << 31] {
        let s = Scratch::copy_of("tiny-llama");
        s.edit_config(|c| {
            c.insert("num_hidden_layers".into(), layers.into());
        });
        let start = std::time::Instant::now();
        assert_error(
            s.open(),
            ErrorKind::Format,
            &["config.json", &format!("num_layers {layers} is beyond the limit")],
        );
        assert!(start.elapsed().as_secs() < 1, "took {:?}", start.elapsed());
    }
    // Within the bounds, the count must be that of the layers whose tensors are there.
    let s = Scratch::copy_of("tiny-llama");
    s.edit_config(|c| {
        c.insert("num_hidden_layers".into(), 3.into());
    });
    assert_error(
        s.open(),
        ErrorKind::Format,
        &["num_hidden_layers is 3, but the file has the tensors of 2 layers (model.layers.0 to model.layers.1)"],
    );
    let s = Scratch::copy_of("tiny-qwen2");
    s.edit_config(|c| {
        c.insert("num_hidden_layers".into(), 1.into());
    });
    assert_error(s.open(), ErrorKind::Format, &["num_hidden_layers is 1, but the file has the tensors of 2 layers"]);

    // A context of 2^32 - 1 was accepted silently; other sizes have their bounds too.
    for (key, value) in [
        ("max_position_embeddings", u32::MAX as u64),
        ("vocab_size", 1 << 40),
        ("intermediate_size", u32::MAX as u64),
        ("num_key_value_heads", 1 << 20),
    ] {
        let s = Scratch::copy_of("tiny-llama");
        s.edit_config(|c| {
            c.insert(key.into(), value.into());
        });
        assert_error(s.open(), ErrorKind::Format, &["config.json", &format!("{value} is beyond the limit")]);
    }
}

#[test]
fn non_finite_weights_are_refused_with_the_tensor_named() {
    use nexus::runtime::model::LlamaModel;
    use nexus::runtime::model::cpu::CpuBackend;

    // One tensor of each stored dtype (the fixture picks it by name): a NaN or an infinity in
    // any of them is refused when it is loaded, naming the tensor and the element.
    let cases = [
        ("model.layers.1.self_attn.q_proj.weight", 16 * 3 + 2, f32::NAN, "holds NaN at [3, 2]"),
        ("model.layers.1.mlp.up_proj.weight", 0, f32::INFINITY, "holds inf at [0, 0]"),
        ("model.norm.weight", 15, f32::NEG_INFINITY, "holds -inf at [15]"),
        ("lm_head.weight", 32 * 16 - 1, f32::NAN, "holds NaN at [31, 15]"),
    ];
    let mut dtypes = std::collections::BTreeSet::new();
    for (tensor, index, value, needle) in cases {
        let s = Scratch::copy_of("tiny-llama");
        s.edit_header(MODEL, |h| {
            dtypes.insert(h[tensor]["dtype"].as_str().expect("dtype").to_owned());
        });
        s.write_value(MODEL, tensor, index, value);
        let source = s.open().expect("the header is fine");
        let err = LlamaModel::load(&CpuBackend, &source, |_, _| {}).expect_err("non-finite weight");
        assert_eq!(err.kind(), ErrorKind::Format, "{err}");
        assert!(err.to_string().contains(&format!("tensor `{tensor}` {needle}")), "{err}");
    }
    assert_eq!(dtypes.len(), 3, "every dtype is covered: {dtypes:?}");
    // The unchanged checkpoint loads.
    LlamaModel::load(&CpuBackend, &open(&fixture("tiny-llama")), |_, _| {}).expect("finite weights");
}
