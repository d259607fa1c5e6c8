//! The tokenizer and chat template, on the real SmolLM2 GGUF and on small synthetic GGUF images.

use std::path::{Path, PathBuf};

use nexus::runtime::text::chat_template::{ChatMessage, ChatTemplate};
use nexus::runtime::text::tokenizer::Tokenizer;
use nexus::runtime::weights::gguf::{GgufFile, MetadataValue as V};
use nexus::runtime::{ErrorKind, Result};

fn smollm2_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn smollm2() -> Tokenizer {
    let path = smollm2_path();
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh", path.display());
    let gguf = GgufFile::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Tokenizer::from_gguf(&gguf).unwrap_or_else(|e| panic!("tokenizer of {}: {e}", path.display()))
}

const SAMPLES: &[&str] = &[
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "héllo wörld, ñandú, Ærøskøbing — «quotes» and ‘single’",
    "日本語のテキストと中文, 한국어",
    "emoji 🤖🚀👍🏽 and a ZWJ sequence 👩\u{200d}💻",
    "   leading spaces",
    "trailing spaces   ",
    "runs    of     spaces\t\ttabs",
    "line one\nline two\r\n\n\nafter blank lines\n",
    "3.14159 and 2,718,281 and -42 and 1234567890",
    "don't won't I'm they'll we've",
    "fn main() { println!(\"{}\", 1 + 2); }",
    "",
    " ",
    "\n",
];

#[test]
fn round_trips_text() {
    let tok = smollm2();
    for &text in SAMPLES {
        let ids = tok.encode(text, false).expect("encodes");
        assert_eq!(tok.decode(&ids, false).expect("decodes"), text, "ids {ids:?}");
        // SmolLM2 adds no BOS, so special tokens change nothing here.
        assert_eq!(tok.encode(text, true).expect("encodes"), ids, "{text:?}");
    }
}

#[test]
fn special_tokens_and_ids() {
    let tok = smollm2();
    assert_eq!(tok.vocab_size(), 49152);
    assert_eq!(tok.bos_token_id(), Some(1));
    assert_eq!(tok.eos_token_ids(), &[2]);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.encode("<|im_start|>", false).expect("encodes"), vec![1]);
    assert_eq!(tok.encode("<|im_end|>", true).expect("encodes"), vec![2]);

    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n", false).expect("encodes");
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.iter().filter(|&&id| id == 2).count(), 1, "{ids:?}");
    assert_eq!(tok.decode(&ids, false).expect("decodes"), "<|im_start|>user\nhi<|im_end|>\n");
    assert_eq!(tok.decode(&ids, true).expect("decodes"), "user\nhi\n");
}

#[test]
fn digits_are_split_one_by_one() {
    // SmolLM2's tokenizer.json isolates every digit before the byte-level split ("smollm").
    let tok = smollm2();
    let digit = |d: &str| tok.token_to_id(d).expect("digit token");
    let ids = tok.encode("2024", false).expect("encodes");
    assert_eq!(ids, vec![digit("2"), digit("0"), digit("2"), digit("4")]);
    // The space before a number stays a piece of its own.
    let ids = tok.encode("in 1999", false).expect("encodes");
    assert_eq!(&ids[ids.len() - 4..], &[digit("1"), digit("9"), digit("9"), digit("9")]);
    assert_eq!(ids[ids.len() - 5], tok.token_to_id("\u{120}").expect("space token"));
}

#[test]
fn unknown_ids_are_invalid_input() {
    let tok = smollm2();
    let err = tok.decode(&[1, 49152], false).expect_err("out of range");
    assert_eq!(err.kind(), ErrorKind::InvalidInput);
    assert!(err.to_string().contains("49152"), "{err}");
    // A stream decoder refuses the id and carries on.
    let mut decoder = tok.stream_decoder(false);
    assert_eq!(decoder.push(49152).expect_err("out of range").kind(), ErrorKind::InvalidInput);
    let a = tok.token_to_id("a").expect("token");
    assert_eq!(decoder.push(a).expect("push"), Some("a".to_owned()));
}

#[test]
fn chat_template_renders_smollm2_prompt() {
    let tok = smollm2();
    let template = tok.chat_template().expect("SmolLM2 ships a chat template");
    let messages = [ChatMessage::new("user", "What is the capital of France?")];
    let prompt = template.render(&messages, true).expect("renders");
    assert_eq!(
        prompt,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
         <|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    );
    // A system message of the user's own replaces the default one.
    let messages = [ChatMessage::new("system", "Be brief."), ChatMessage::new("user", "Hi")];
    let prompt = template.render(&messages, false).expect("renders");
    assert_eq!(prompt, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n");
    let ids = tok.encode(&prompt, false).expect("encodes");
    assert_eq!(ids.iter().filter(|&&id| id == 1).count(), 2, "two <|im_start|> tokens in {ids:?}");
}

/// Decodes `ids` through a stream decoder, returning the chunks.
fn stream(tok: &Tokenizer, ids: &[u32], skip_special_tokens: bool) -> Result<Vec<String>> {
    let mut decoder = tok.stream_decoder(skip_special_tokens);
    let mut chunks = Vec::new();
    for &id in ids {
        chunks.extend(decoder.push(id)?);
    }
    chunks.extend(decoder.finish()?);
    Ok(chunks)
}

#[test]
fn stream_decoder_matches_full_decode() {
    let tok = smollm2();
    let text = "<|im_start|>assistant\nZürich 🤖🚀 is 日本語のテキスト — 👩\u{200d}💻 ok<|im_end|>";
    let ids = tok.encode(text, false).expect("encodes");
    // Multi-byte characters are split over several byte-level tokens here, so some pushes
    // must hold text back.
    assert!(ids.len() > text.chars().count() / 2, "{ids:?}");
    for skip in [false, true] {
        let chunks = stream(&tok, &ids, skip).expect("streams");
        assert_eq!(chunks.concat(), tok.decode(&ids, skip).expect("decodes"));
        for chunk in &chunks {
            assert!(!chunk.contains('\u{FFFD}'), "chunk {chunk:?} splits a character");
        }
    }
    for &sample in SAMPLES {
        let ids = tok.encode(sample, false).expect("encodes");
        assert_eq!(stream(&tok, &ids, false).expect("streams").concat(), sample);
    }
}

#[test]
fn stream_decoder_flushes_an_unfinished_character_at_the_end() {
    let tok = smollm2();
    // The first byte of "é" (0xC3) alone is the byte-level token "Ã".
    let lone_byte = tok.token_to_id("\u{c3}").expect("byte token");
    let mut decoder = tok.stream_decoder(false);
    assert_eq!(decoder.push(tok.token_to_id("a").expect("token")).expect("push"), Some("a".to_owned()));
    assert_eq!(decoder.push(lone_byte).expect("push"), None);
    assert_eq!(decoder.finish().expect("finish"), Some("\u{FFFD}".to_owned()));
}

// ---- synthetic GGUF images ----------------------------------------------------------------------

/// Serializes metadata into a GGUF v3 image with no tensors.
fn gguf_image(metadata: &[(&str, V)]) -> Vec<u8> {
    fn type_id(v: &V) -> u32 {
        match v {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::String(_) => 8,
            V::Array(_) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
        }
    }
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    fn value(out: &mut Vec<u8>, v: &V) {
        match v {
            V::U8(x) => out.extend(x.to_le_bytes()),
            V::I8(x) => out.extend(x.to_le_bytes()),
            V::U16(x) => out.extend(x.to_le_bytes()),
            V::I16(x) => out.extend(x.to_le_bytes()),
            V::U32(x) => out.extend(x.to_le_bytes()),
            V::I32(x) => out.extend(x.to_le_bytes()),
            V::U64(x) => out.extend(x.to_le_bytes()),
            V::I64(x) => out.extend(x.to_le_bytes()),
            V::F32(x) => out.extend(x.to_le_bytes()),
            V::F64(x) => out.extend(x.to_le_bytes()),
            V::Bool(x) => out.push(u8::from(*x)),
            V::String(s) => string(out, s),
            V::Array(items) => {
                out.extend(items.first().map_or(8, type_id).to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for item in items {
                    value(out, item);
                }
            }
        }
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(0u64.to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, v) in metadata {
        string(&mut out, key);
        out.extend(type_id(v).to_le_bytes());
        value(&mut out, v);
    }
    out.resize(out.len().next_multiple_of(32), 0);
    out
}

fn strings(items: &[&str]) -> V {
    V::Array(items.iter().map(|s| V::String((*s).to_owned())).collect())
}

fn gguf_tokenizer(metadata: &[(&str, V)]) -> Result<Tokenizer> {
    Tokenizer::from_gguf(&GgufFile::from_bytes(gguf_image(metadata)).expect("valid GGUF image"))
}

/// A byte-level vocabulary: `<|end|>` (control), the letters of "hi", "hi" itself, and `Ġ`.
fn byte_level_metadata(pre: &str) -> Vec<(&'static str, V)> {
    vec![
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String(pre.into())),
        ("tokenizer.ggml.tokens", strings(&["<|end|>", "h", "i", "hi", "\u{120}"])),
        ("tokenizer.ggml.token_type", V::Array(vec![V::I32(3), V::I32(1), V::I32(1), V::I32(1), V::I32(1)])),
        ("tokenizer.ggml.merges", strings(&["h i"])),
        ("tokenizer.ggml.bos_token_id", V::U32(0)),
        ("tokenizer.ggml.eos_token_id", V::U32(0)),
    ]
}

#[test]
fn synthetic_byte_level_vocabularies_with_each_pre_tokenizer() {
    for pre in ["default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2"] {
        let tok = gguf_tokenizer(&byte_level_metadata(pre)).unwrap_or_else(|e| panic!("{pre}: {e}"));
        assert_eq!(tok.encode("hi hi<|end|>", false).expect("encodes"), vec![3, 4, 3, 0], "{pre}");
        assert_eq!(tok.eos_token_ids(), &[0]);
        assert_eq!(tok.decode(&[3, 4, 1, 0], true).expect("decodes"), "hi h", "{pre}");
        // llama.cpp adds a BOS by default for Llama 3's vocabulary only.
        let with_bos = tok.encode("hi", true).expect("encodes");
        assert_eq!(with_bos, if pre.starts_with("llama") { vec![0, 3] } else { vec![3] }, "{pre}");
    }
}

#[test]
fn unknown_pre_tokenizer_is_unsupported() {
    let err = gguf_tokenizer(&byte_level_metadata("made-up-pre")).expect_err("unknown pre");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("made-up-pre"), "{err}");

    let mut metadata = byte_level_metadata("default");
    metadata[0].1 = V::String("bert".into());
    let err = gguf_tokenizer(&metadata).expect_err("unknown model");
    assert_eq!(err.kind(), ErrorKind::Unsupported);
    assert!(err.to_string().contains("bert"), "{err}");
}

#[test]
fn malformed_tokenizer_metadata_is_a_format_error() {
    let mut metadata = byte_level_metadata("default");
    metadata[4].1 = strings(&["hi"]);
    let err = gguf_tokenizer(&metadata).expect_err("merge without a space");
    assert_eq!(err.kind(), ErrorKind::Format);
    assert!(err.to_string().contains("tokenizer.ggml.merges"), "{err}");

    let mut metadata = byte_level_metadata("default");
    metadata[6].1 = V::U32(5);
    let err = gguf_tokenizer(&metadata).expect_err("EOS out of range");
    assert_eq!(err.kind(), ErrorKind::Format);
    assert!(err.to_string().contains("eos_token_id"), "{err}");

    let mut metadata = byte_level_metadata("default");
    metadata[2].1 = strings(&["<|end|>", "h", "i", "hi", "h"]);
    let err = gguf_tokenizer(&metadata).expect_err("duplicate token");
    assert_eq!(err.kind(), ErrorKind::Format);
}

#[test]
fn bad_chat_templates_are_template_errors() {
    let mut metadata = byte_level_metadata("default");
    metadata.push(("tokenizer.chat_template", V::String("{% for m in messages %}{{ m.content }".into())));
    let err = gguf_tokenizer(&metadata).expect_err("template does not compile");
    assert_eq!(err.kind(), ErrorKind::Template);

    let template = ChatTemplate::new("{{ raise_exception('no system messages') }}", None, None).expect("compiles");
    let err = template.render(&[ChatMessage::new("system", "x")], true).expect_err("raises");
    assert_eq!(err.kind(), ErrorKind::Template);
    assert!(err.to_string().contains("no system messages"), "{err}");
}

/// A SentencePiece-style vocabulary: `<unk>`, `<s>`, `</s>`, the 256 byte tokens, then pieces
/// with scores.
fn sentencepiece_metadata() -> Vec<(&'static str, V)> {
    let pieces = [
        ("\u{2581}", -1.0),
        ("h", -2.0),
        ("e", -2.0),
        ("l", -2.0),
        ("o", -2.0),
        ("ll", -3.0),
        ("\u{2581}h", -4.0),
        ("\u{2581}he", -5.0),
        ("llo", -6.0),
        ("\u{2581}hello", -7.0),
    ];
    let mut tokens: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    let mut types = vec![2, 3, 3];
    let mut scores = vec![0.0f32; 3];
    for byte in 0..=255u8 {
        tokens.push(format!("<0x{byte:02X}>"));
        types.push(6);
        scores.push(0.0);
    }
    for (piece, score) in pieces {
        tokens.push(piece.to_owned());
        types.push(1);
        scores.push(score);
    }
    vec![
        ("tokenizer.ggml.model", V::String("llama".into())),
        ("tokenizer.ggml.tokens", V::Array(tokens.into_iter().map(V::String).collect())),
        ("tokenizer.ggml.token_type", V::Array(types.into_iter().map(V::I32).collect())),
        ("tokenizer.ggml.scores", V::Array(scores.into_iter().map(V::F32).collect())),
        ("tokenizer.ggml.unknown_token_id", V::U32(0)),
        ("tokenizer.ggml.bos_token_id", V::U32(1)),
        ("tokenizer.ggml.eos_token_id", V::U32(2)),
    ]
}

#[test]
fn sentencepiece_vocabulary_with_byte_fallback() {
    let tok = gguf_tokenizer(&sentencepiece_metadata()).expect("builds");
    let piece = |p: &str| tok.token_to_id(p).expect("piece");
    // A BOS by default, a space in front of the text, merges by score.
    assert_eq!(tok.encode("hello", true).expect("encodes"), vec![1, piece("\u{2581}hello")]);
    assert_eq!(tok.encode("hello", false).expect("encodes"), vec![piece("\u{2581}hello")]);
    assert_eq!(tok.encode("hell", false).expect("encodes"), vec![piece("\u{2581}he"), piece("ll")]);
    // "é" has no piece: its UTF-8 bytes become byte tokens; decoding puts it back together.
    let ids = tok.encode("hé", false).expect("encodes");
    assert_eq!(ids, vec![piece("\u{2581}h"), piece("<0xC3>"), piece("<0xA9>")]);
    assert_eq!(tok.decode(&ids, false).expect("decodes"), "hé");
    let ids = tok.encode("hello hello", true).expect("encodes");
    assert_eq!(tok.decode(&ids, true).expect("decodes"), "hello hello");
    assert_eq!(stream(&tok, &ids, true).expect("streams").concat(), "hello hello");
    assert_eq!(tok.eos_token_ids(), &[2]);
}

// ---- Hugging Face folders -----------------------------------------------------------------------

/// A scratch folder under the target directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("hf-tokenizer-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch folder");
        Scratch(dir)
    }

    fn write(&self, file: &str, json: &serde_json::Value) {
        std::fs::write(self.0.join(file), json.to_string()).expect("write");
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a leftover folder under the target directory is harmless.
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A byte-level tokenizer.json: `<s>`, `</s>`, `<|eot|>`, then `h`, `i`, `hi`, `Ġ`. It carries a
/// truncation setting of two tokens, which loading must drop.
fn tokenizer_json(post_processor: serde_json::Value) -> serde_json::Value {
    let special = |id: u32, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                           "rstrip": false, "normalized": false, "special": true})
    };
    serde_json::json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0},
        "padding": null,
        "added_tokens": [special(0, "<s>"), special(1, "</s>"), special(2, "<|eot|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": {"<s>": 0, "</s>": 1, "<|eot|>": 2, "h": 3, "i": 4, "hi": 5, "\u{120}": 6},
                  "merges": ["h i"]}
    })
}

/// A post-processor that puts `<s>` in front, as Llama's tokenizer.json files have.
fn bos_post_processor() -> serde_json::Value {
    serde_json::json!({
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [0], "tokens": ["<s>"]}}
    })
}

#[test]
fn hf_folder_with_config_and_generation_config() {
    let dir = Scratch::new();
    dir.write("tokenizer.json", &tokenizer_json(serde_json::Value::Null));
    dir.write(
        "tokenizer_config.json",
        &serde_json::json!({
            "bos_token": "<s>",
            "eos_token": {"__type": "AddedToken", "content": "</s>", "special": true},
            "add_bos_token": true,
            "chat_template": [
                {"name": "tool_use", "template": "tools"},
                {"name": "default", "template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}
            ]
        }),
    );
    dir.write("generation_config.json", &serde_json::json!({"eos_token_id": [1, 2]}));
    let tok = Tokenizer::from_hf_dir(&dir.0).expect("builds");
    assert_eq!(tok.bos_token_id(), Some(0));
    assert_eq!(tok.eos_token_ids(), &[1, 2]);
    // The post-processor adds nothing, so the BOS the config asks for is added here; and the
    // file's truncation to two tokens is gone.
    assert_eq!(tok.encode("hi hi hi", true).expect("encodes"), vec![0, 5, 6, 5, 6, 5]);
    assert_eq!(tok.encode("hi", false).expect("encodes"), vec![5]);
    let template = tok.chat_template().expect("default template");
    assert_eq!(template.render(&[ChatMessage::new("user", "hi")], false).expect("renders"), "<s>hi</s>");
}

#[test]
fn hf_folder_whose_post_processor_adds_the_bos() {
    let dir = Scratch::new();
    dir.write("tokenizer.json", &tokenizer_json(bos_post_processor()));
    dir.write(
        "tokenizer_config.json",
        &serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": true}),
    );
    std::fs::write(dir.0.join("chat_template.jinja"), "{% for m in messages %}[{{ m.role }}]{% endfor %}")
        .expect("write");
    let tok = Tokenizer::from_hf_dir(&dir.0).expect("builds");
    assert_eq!(tok.encode("hi", true).expect("encodes"), vec![0, 5], "one BOS, not two");
    assert_eq!(tok.encode("hi", false).expect("encodes"), vec![5]);
    assert_eq!(tok.eos_token_ids(), &[1]);
    let template = tok.chat_template().expect("template from chat_template.jinja");
    assert_eq!(template.render(&[ChatMessage::new("user", "x")], false).expect("renders"), "[user]");
}

#[test]
fn hf_folder_errors() {
    let dir = Scratch::new();
    let err = Tokenizer::from_hf_dir(&dir.0).expect_err("no tokenizer.json");
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    dir.write("tokenizer.json", &tokenizer_json(serde_json::Value::Null));
    dir.write("tokenizer_config.json", &serde_json::json!({"eos_token": "<|missing|>"}));
    let err = Tokenizer::from_hf_dir(&dir.0).expect_err("unknown EOS");
    assert_eq!(err.kind(), ErrorKind::Format);
    assert!(err.to_string().contains("<|missing|>"), "{err}");

    dir.write("tokenizer_config.json", &serde_json::json!({"chat_template": "{% if %}"}));
    assert_eq!(Tokenizer::from_hf_dir(&dir.0).expect_err("bad template").kind(), ErrorKind::Template);

    dir.write("tokenizer_config.json", &serde_json::json!({}));
    dir.write("generation_config.json", &serde_json::json!({"eos_token_id": 99}));
    let err = Tokenizer::from_hf_dir(&dir.0).expect_err("EOS out of range");
    assert_eq!(err.kind(), ErrorKind::Format);
    assert!(err.to_string().contains("99"), "{err}");
}

#[test]
fn tokenizers_can_be_shared_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Tokenizer>();
    assert_send_sync::<nexus::runtime::text::tokenizer::StreamDecoder>();
    assert_send_sync::<ChatTemplate>();
}
