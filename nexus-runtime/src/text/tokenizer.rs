//! Tokenizers: Hugging Face's `tokenizers` crate, built from a `tokenizer.json` folder or from the
//! vocabulary a GGUF file carries in its metadata.
//!
//! A GGUF has no `tokenizer.json`; llama.cpp's converter stores the vocabulary, the merges, a type
//! per token and the name of the pre-tokenizer (`tokenizer.ggml.pre`) instead. [`Tokenizer::from_gguf`]
//! rebuilds the tokenizer the model was trained with from those: the same BPE model, the
//! pre-tokenizer the name stands for, and the control tokens as special added tokens, so that ids
//! match what the original `tokenizer.json` gives.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use serde_json::Value;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{Prepend, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

use crate::text::chat_template::ChatTemplate;
use crate::weights::gguf::GgufFile;
use crate::{Error, ErrorKind, Result};

/// GGUF token types (`tokenizer.ggml.token_type`), as llama.cpp writes them.
mod token_type {
    pub const UNKNOWN: i64 = 2;
    pub const CONTROL: i64 = 3;
    pub const USER_DEFINED: i64 = 4;
}

/// The split regex of Llama 3's `tokenizer.json` (also used by llama.cpp for `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The split regex of Qwen2's `tokenizer.json`: like Llama 3's, but one digit per piece.
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// SentencePiece's stand-in for a space.
const SPM_SPACE: &str = "\u{2581}";

/// A text tokenizer with the model's special tokens and chat template.
///
/// Cloning is cheap (the tokenizer is shared), so each [`StreamDecoder`] owns a clone.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<Inner>,
}

struct Inner {
    tokenizer: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    /// Whether [`Tokenizer::encode`] puts the BOS token in front itself. This is the case for
    /// GGUF vocabularies that ask for a BOS, and for `tokenizer.json` files whose post-processor
    /// does not add the BOS that `tokenizer_config.json` asks for.
    prepend_bos: bool,
    chat_template: Option<ChatTemplate>,
}

impl fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The wrapped tokenizer's own Debug prints the whole vocabulary; summarize instead.
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos_token_id", &self.inner.bos_token_id)
            .field("eos_token_ids", &self.inner.eos_token_ids)
            .field("prepend_bos", &self.inner.prepend_bos)
            .field("chat_template", &self.inner.chat_template.is_some())
            .finish()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata.
    ///
    /// Supported are `tokenizer.ggml.model` = `gpt2` (byte-level BPE) with the pre-tokenizers
    /// `default`/`gpt2`/`gpt-2`, `smollm`/`starcoder`, `llama3`/`llama-v3`/`llama-bpe` and
    /// `qwen2`/`deepseek-r1-qwen`, and `llama` (SentencePiece-style BPE with scores and byte
    /// fallback). Anything else is an [`ErrorKind::Unsupported`] error naming it; a chat template
    /// that does not compile is an [`ErrorKind::Template`] error.
    pub fn from_gguf(gguf: &GgufFile) -> Result<Self> {
        let model = metadata_str(gguf, "tokenizer.ggml.model")?;
        let tokens = token_strings(gguf)?;
        let types = token_types(gguf, tokens.len())?;
        let (tokenizer, add_bos_by_default) = match model {
            "gpt2" => byte_level_bpe(gguf, &tokens, &types)?,
            "llama" => (sentencepiece_bpe(gguf, &tokens, &types)?, true),
            other => {
                return Err(Error::new(
                    ErrorKind::Unsupported,
                    format!("tokenizer model `{other}` (supported: gpt2, llama)"),
                ));
            }
        };
        let bos_token_id = gguf_token_id(gguf, "tokenizer.ggml.bos_token_id", tokens.len())?;
        let mut eos_token_ids = Vec::new();
        // llama.cpp ends generation at the end-of-turn and end-of-message tokens as well as at
        // EOS; chat models often name only those as the end of their reply.
        for key in ["tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            if let Some(id) = gguf_token_id(gguf, key, tokens.len())? {
                push_unique(&mut eos_token_ids, id);
            }
        }
        let add_bos = match gguf.get("tokenizer.ggml.add_bos_token") {
            None => add_bos_by_default,
            Some(v) => {
                v.as_bool().ok_or_else(|| Error::format("metadata `tokenizer.ggml.add_bos_token` is not a bool"))?
            }
        };
        if add_bos && bos_token_id.is_none() {
            return Err(Error::format("the GGUF asks for a BOS token but names no tokenizer.ggml.bos_token_id"));
        }
        let chat_template = match gguf.get("tokenizer.chat_template") {
            None => None,
            Some(v) => {
                let source =
                    v.as_str().ok_or_else(|| Error::format("metadata `tokenizer.chat_template` is not a string"))?;
                let text = |id: Option<u32>| id.map(|id| tokens[id as usize].as_str());
                Some(ChatTemplate::new(source, text(bos_token_id), text(eos_token_ids.first().copied()))?)
            }
        };
        Ok(Tokenizer {
            inner: Arc::new(Inner { tokenizer, bos_token_id, eos_token_ids, prepend_bos: add_bos, chat_template }),
        })
    }

    /// Builds the tokenizer of a Hugging Face model folder: `tokenizer.json`, with the special
    /// tokens, `add_bos_token` and chat template of `tokenizer_config.json` (the template may
    /// instead be in `chat_template.jinja` or `chat_template.json`), and the end-of-sequence ids
    /// of `generation_config.json` when it exists.
    ///
    /// Encoding follows `tokenizer.json`'s post-processor; when `tokenizer_config.json` says
    /// `add_bos_token: true` and that post-processor adds no BOS, [`Tokenizer::encode`] adds it.
    /// A named list of chat templates uses the one called `default` (none if there is none).
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let mut tokenizer = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            Error::with_source(ErrorKind::Tokenizer, format!("{}: cannot build the tokenizer", path.display()), e)
        })?;
        // Some tokenizer.json files carry truncation or padding settings from training; a server
        // must see the whole prompt, unpadded.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::with_source(ErrorKind::Tokenizer, "cannot disable truncation", e))?;
        tokenizer.with_padding(None);

        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_present(&config_path)?.unwrap_or(Value::Null);
        let special = |field: &str| -> Result<Option<(String, u32)>> {
            let Some(text) = special_token_text(&config, field, &config_path)? else { return Ok(None) };
            let id = tokenizer.token_to_id(&text).ok_or_else(|| {
                Error::format(format!("{}: {field} `{text}` is not in the vocabulary", config_path.display()))
            })?;
            Ok(Some((text, id)))
        };
        let bos = special("bos_token")?;
        let eos = special("eos_token")?;

        let mut eos_token_ids = Vec::new();
        if let Some((_, id)) = &eos {
            eos_token_ids.push(*id);
        }
        let generation_path = dir.join("generation_config.json");
        if let Some(generation) = read_json_if_present(&generation_path)? {
            for id in generation_eos_ids(&generation, &generation_path)? {
                if tokenizer.id_to_token(id).is_none() {
                    return Err(Error::format(format!(
                        "{}: eos_token_id {id} is not in the vocabulary",
                        generation_path.display()
                    )));
                }
                push_unique(&mut eos_token_ids, id);
            }
        }

        let bos_token_id = bos.as_ref().map(|(_, id)| *id);
        let add_bos_token = match config.get("add_bos_token") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => {
                return Err(Error::format(format!("{}: add_bos_token is not a bool", config_path.display())));
            }
        };
        let prepend_bos = match bos_token_id {
            Some(bos_id) if add_bos_token => {
                let probe = tokenizer
                    .encode_fast("", true)
                    .map_err(|e| Error::with_source(ErrorKind::Tokenizer, "cannot encode the empty string", e))?;
                probe.get_ids().first() != Some(&bos_id)
            }
            _ => false,
        };

        let source = chat_template_source(dir, &config, &config_path)?;
        let chat_template = source
            .map(|s| {
                ChatTemplate::new(&s, bos.as_ref().map(|(t, _)| t.as_str()), eos.as_ref().map(|(t, _)| t.as_str()))
            })
            .transpose()?;
        Ok(Tokenizer { inner: Arc::new(Inner { tokenizer, bos_token_id, eos_token_ids, prepend_bos, chat_template }) })
    }

    /// Encodes `text`. Special tokens written in the text (such as `<|im_start|>`) become their
    /// ids whatever `add_special_tokens` says; `add_special_tokens` adds the tokens the model puts
    /// around every input (typically a BOS). Encode a rendered chat prompt without them: chat
    /// templates write their own BOS.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| Error::with_source(ErrorKind::Tokenizer, "encoding failed", e))?;
        let ids = encoding.get_ids();
        match self.inner.bos_token_id {
            Some(bos) if add_special_tokens && self.inner.prepend_bos => {
                let mut out = Vec::with_capacity(ids.len() + 1);
                out.push(bos);
                out.extend_from_slice(ids);
                Ok(out)
            }
            _ => Ok(ids.to_vec()),
        }
    }

    /// Decodes `ids` to text; with `skip_special_tokens`, special tokens (BOS, `<|im_end|>`, ...)
    /// are left out. An id the vocabulary does not have is an [`ErrorKind::InvalidInput`] error.
    /// Bytes that do not form valid UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        if let Some(&bad) = ids.iter().find(|&&id| self.inner.tokenizer.id_to_token(id).is_none()) {
            return Err(Error::invalid(format!(
                "token id {bad} is not in the vocabulary of {} tokens",
                self.vocab_size()
            )));
        }
        self.inner
            .tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::with_source(ErrorKind::Tokenizer, "decoding failed", e))
    }

    /// The ids that end generation: the EOS token, then any other end-of-turn ids the model
    /// names. May be empty.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.inner.eos_token_ids
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.inner.bos_token_id
    }

    /// The number of tokens, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.tokenizer.get_vocab_size(true)
    }

    /// The id of the token spelled `token` (in the vocabulary's own spelling), if there is one.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        self.inner.chat_template.as_ref()
    }

    /// A decoder that turns a stream of ids into text as it becomes complete.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder {
        StreamDecoder { tokenizer: self.clone(), skip_special_tokens, ids: Vec::new(), read_offset: 0 }
    }
}

/// Incremental detokenization for streaming output.
///
/// Decoding one token at a time goes wrong in two ways: a token may hold only part of a UTF-8
/// character (byte-level and byte-fallback vocabularies split rare characters into bytes), and
/// some decoders change a token's text depending on what precedes it (SentencePiece strips the
/// space of the first token). So each step decodes a window: the ids of the last output chunk as
/// context (the usual "prefix offset" to "read offset" range), followed by the ids since; and
/// emits the part of the window's text beyond the context's text, once it does not end in an
/// unfinished character.
#[derive(Debug)]
pub struct StreamDecoder {
    tokenizer: Tokenizer,
    skip_special_tokens: bool,
    /// The context ids (`..read_offset`), then the ids not yet emitted; older ids are dropped.
    ids: Vec<u32>,
    read_offset: usize,
}

impl StreamDecoder {
    /// Adds the next id; returns the text it completes, or `None` while the text so far ends in
    /// an unfinished UTF-8 character (or the id adds no text, like a skipped special token).
    /// An id the vocabulary does not have is an [`ErrorKind::InvalidInput`] error and is not
    /// added.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let (context, text) = match self.window_texts() {
            Ok(texts) => texts,
            Err(e) => {
                self.ids.pop();
                return Err(e);
            }
        };
        // U+FFFD at the end is how the decoders spell a character whose bytes have not all
        // arrived yet; wait for the rest. (A text that really ends in U+FFFD is emitted by the
        // next push or by `finish`.)
        if text.len() <= context.len() || text.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let new_text = text[common_prefix_len(&context, &text)..].to_owned();
        self.ids.drain(..self.read_offset);
        self.read_offset = self.ids.len();
        Ok(Some(new_text))
    }

    /// Ends the stream: returns whatever text is still held back (for instance bytes that never
    /// formed a character, as U+FFFD), if any.
    pub fn finish(self) -> Result<Option<String>> {
        let (context, text) = self.window_texts()?;
        let rest = &text[common_prefix_len(&context, &text)..];
        Ok((!rest.is_empty()).then(|| rest.to_owned()))
    }

    /// The texts of the context ids and of the whole window.
    fn window_texts(&self) -> Result<(String, String)> {
        let context = self.tokenizer.decode(&self.ids[..self.read_offset], self.skip_special_tokens)?;
        let text = self.tokenizer.decode(&self.ids, self.skip_special_tokens)?;
        Ok((context, text))
    }
}

/// The length in bytes of the longest common prefix of `a` and `b` that ends on a character
/// boundary. The window's text normally starts with the context's text; this keeps a decoder
/// that rewrites earlier text from making us slice inside a character.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices().zip(b.chars()).find(|((_, x), y)| x != y).map_or(a.len().min(b.len()), |((i, _), _)| i)
}

fn push_unique(ids: &mut Vec<u32>, id: u32) {
    if !ids.contains(&id) {
        ids.push(id);
    }
}

fn tokenizer_error(what: &str, e: tokenizers::Error) -> Error {
    Error::with_source(ErrorKind::Tokenizer, what.to_owned(), e)
}

// ---- GGUF -------------------------------------------------------------------------------------

fn metadata_str<'a>(gguf: &'a GgufFile, key: &str) -> Result<&'a str> {
    gguf.require(key)?.as_str().ok_or_else(|| Error::format(format!("metadata `{key}` is not a string")))
}

/// `tokenizer.ggml.tokens`, with empty tokens renamed the way llama.cpp does (an empty added
/// token would match everywhere).
fn token_strings(gguf: &GgufFile) -> Result<Vec<String>> {
    const KEY: &str = "tokenizer.ggml.tokens";
    let values =
        gguf.require(KEY)?.as_array().ok_or_else(|| Error::format(format!("metadata `{KEY}` is not an array")))?;
    if values.is_empty() {
        return Err(Error::format(format!("metadata `{KEY}` is empty")));
    }
    if u32::try_from(values.len()).is_err() {
        return Err(Error::format(format!("metadata `{KEY}` has {} tokens, more than ids can number", values.len())));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v.as_str() {
            Some("") => Ok(format!("[EMPTY_{i}]")),
            Some(s) => Ok(s.to_owned()),
            None => Err(Error::format(format!("metadata `{KEY}`[{i}] is not a string"))),
        })
        .collect()
}

/// `tokenizer.ggml.token_type`, or all-normal when the file has none.
fn token_types(gguf: &GgufFile, n_tokens: usize) -> Result<Vec<i64>> {
    const KEY: &str = "tokenizer.ggml.token_type";
    let Some(value) = gguf.get(KEY) else { return Ok(vec![1; n_tokens]) };
    let values = value.as_array().ok_or_else(|| Error::format(format!("metadata `{KEY}` is not an array")))?;
    if values.len() != n_tokens {
        return Err(Error::format(format!("metadata `{KEY}` has {} entries for {n_tokens} tokens", values.len())));
    }
    values
        .iter()
        .enumerate()
        .map(|(i, v)| v.as_i64().ok_or_else(|| Error::format(format!("metadata `{KEY}`[{i}] is not an integer"))))
        .collect()
}

/// An optional token id, checked against the vocabulary size.
fn gguf_token_id(gguf: &GgufFile, key: &str, n_tokens: usize) -> Result<Option<u32>> {
    let Some(value) = gguf.get(key) else { return Ok(None) };
    match value.as_u64() {
        Some(id) if id < n_tokens as u64 => Ok(Some(id as u32)),
        _ => Err(Error::format(format!("metadata `{key}` = {value:?} is not a token id below {n_tokens}"))),
    }
}

/// The vocabulary map of the BPE model: each token's stored spelling to its id.
fn vocab_map(tokens: &[String]) -> Result<Vocab> {
    let mut vocab = Vocab::with_capacity(tokens.len());
    for (id, token) in tokens.iter().enumerate() {
        if let Some(first) = vocab.insert(token.clone(), id as u32) {
            return Err(Error::format(format!(
                "token `{token}` appears twice in the vocabulary (ids {first} and {id})"
            )));
        }
    }
    Ok(vocab)
}

/// Adds the tokens the file marks as control or unknown as special added tokens, and the
/// user-defined ones as plain added tokens. Without this, `<|im_start|>` in a text would be cut
/// into byte-level pieces instead of becoming its one id. They are matched in the raw text (not
/// normalized), as llama.cpp does.
fn add_marked_tokens(tokenizer: &mut tokenizers::Tokenizer, tokens: &[String], types: &[i64]) {
    let marked = |wanted: &[i64], special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(types)
            .filter(|(_, ty)| wanted.contains(ty))
            .map(|(token, _)| AddedToken::from(token.clone(), special).normalized(false))
            .collect()
    };
    tokenizer.add_special_tokens(&marked(&[token_type::CONTROL, token_type::UNKNOWN], true));
    tokenizer.add_tokens(&marked(&[token_type::USER_DEFINED], false));
}

/// How a byte-level vocabulary splits text before BPE, by `tokenizer.ggml.pre`.
struct BytePreTokenizer {
    pre_tokenizer: PreTokenizerWrapper,
    /// Look a whole piece up in the vocabulary before merging (Llama 3's `ignore_merges`).
    ignore_merges: bool,
    /// Whether the model wants a BOS when the file does not say.
    add_bos: bool,
}

fn byte_pre_tokenizer(pre: &str) -> Result<BytePreTokenizer> {
    // ByteLevel with `use_regex` splits with GPT-2's regex, then maps bytes to the printable
    // alphabet; after a Split of our own it only does the mapping.
    let gpt2_byte_level = || PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true));
    let regex_then_bytes = |regex: &str| -> Result<PreTokenizerWrapper> {
        let split = Split::new(SplitPattern::Regex(regex.to_owned()), SplitDelimiterBehavior::Isolated, false)
            .map_err(|e| tokenizer_error("cannot compile the split regex", e))?;
        Ok(PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
        ])))
    };
    let choice = |pre_tokenizer, ignore_merges, add_bos| BytePreTokenizer { pre_tokenizer, ignore_merges, add_bos };
    Ok(match pre {
        "default" | "gpt2" | "gpt-2" => choice(gpt2_byte_level(), false, false),
        // SmolLM's and StarCoder's tokenizer.json put every digit in a piece of its own before
        // the GPT-2 split (llama.cpp: `\p{N}` then the GPT-2 regex).
        "smollm" | "starcoder" => choice(
            PreTokenizerWrapper::Sequence(PreTokenizerSequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                gpt2_byte_level(),
            ])),
            false,
            false,
        ),
        "llama3" | "llama-v3" | "llama-bpe" => choice(regex_then_bytes(LLAMA3_SPLIT)?, true, true),
        "qwen2" | "deepseek-r1-qwen" => choice(regex_then_bytes(QWEN2_SPLIT)?, false, false),
        other => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "GGUF pre-tokenizer `{other}` (supported: default, gpt2, smollm, starcoder, llama3, llama-bpe, qwen2)"
                ),
            ));
        }
    })
}

/// A byte-level BPE tokenizer (`tokenizer.ggml.model` = `gpt2`) and whether it adds a BOS by
/// default.
fn byte_level_bpe(gguf: &GgufFile, tokens: &[String], types: &[i64]) -> Result<(tokenizers::Tokenizer, bool)> {
    // Files written before llama.cpp recorded pre-tokenizers have none; llama.cpp then falls
    // back to its default, which for byte-level vocabularies is GPT-2's split.
    let pre = match gguf.get("tokenizer.ggml.pre") {
        None => "default",
        Some(_) => metadata_str(gguf, "tokenizer.ggml.pre")?,
    };
    let pre = byte_pre_tokenizer(pre)?;
    let merges = gguf_merges(gguf)?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(tokens)?, merges)
        .ignore_merges(pre.ignore_merges)
        .build()
        .map_err(|e| tokenizer_error("the GGUF vocabulary and merges do not form a BPE model", e))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    tokenizer.with_pre_tokenizer(Some(pre.pre_tokenizer));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::default())));
    add_marked_tokens(&mut tokenizer, tokens, types);
    Ok((tokenizer, pre.add_bos))
}

/// `tokenizer.ggml.merges`: each entry is the two parts separated by a space. The split is at the
/// first space after the first character, as in llama.cpp, so a part may itself be a space.
fn gguf_merges(gguf: &GgufFile) -> Result<Merges> {
    const KEY: &str = "tokenizer.ggml.merges";
    let values =
        gguf.require(KEY)?.as_array().ok_or_else(|| Error::format(format!("metadata `{KEY}` is not an array")))?;
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let merge = v.as_str().ok_or_else(|| Error::format(format!("metadata `{KEY}`[{i}] is not a string")))?;
            let first_len = merge.chars().next().map_or(0, char::len_utf8);
            match merge[first_len..].find(' ') {
                Some(pos) => {
                    let (left, right) = merge.split_at(first_len + pos);
                    Ok((left.to_owned(), right[1..].to_owned()))
                }
                None => Err(Error::format(format!(
                    "metadata `{KEY}`[{i}] = `{merge}` is not two parts separated by a space"
                ))),
            }
        })
        .collect()
}

/// A SentencePiece-style BPE tokenizer (`tokenizer.ggml.model` = `llama`), built the way
/// Hugging Face's conversion of such vocabularies is: merges recovered from the token scores,
/// spaces written as `▁` (with one in front of the text unless `tokenizer.ggml.add_space_prefix`
/// is false), and bytes without a token of their own spelled as `<0xNN>` byte tokens.
fn sentencepiece_bpe(gguf: &GgufFile, tokens: &[String], types: &[i64]) -> Result<tokenizers::Tokenizer> {
    const SCORES: &str = "tokenizer.ggml.scores";
    let scores = gguf
        .require(SCORES)?
        .as_array()
        .ok_or_else(|| Error::format(format!("metadata `{SCORES}` is not an array")))?;
    if scores.len() != tokens.len() {
        return Err(Error::format(format!(
            "metadata `{SCORES}` has {} entries for {} tokens",
            scores.len(),
            tokens.len()
        )));
    }
    let scores: Vec<f64> = scores
        .iter()
        .enumerate()
        .map(|(i, v)| v.as_f64().ok_or_else(|| Error::format(format!("metadata `{SCORES}`[{i}] is not a number"))))
        .collect::<Result<_>>()?;
    let add_space_prefix = match gguf.get("tokenizer.ggml.add_space_prefix") {
        None => true,
        Some(v) => {
            v.as_bool().ok_or_else(|| Error::format("metadata `tokenizer.ggml.add_space_prefix` is not a bool"))?
        }
    };
    let vocab = vocab_map(tokens)?;
    let merges = merges_from_scores(tokens, &scores, &vocab);
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).byte_fallback(true).fuse_unk(true);
    if let Some(unk) = gguf_token_id(gguf, "tokenizer.ggml.unknown_token_id", tokens.len())? {
        builder = builder.unk_token(tokens[unk as usize].clone());
    }
    let bpe = builder.build().map_err(|e| tokenizer_error("the GGUF vocabulary does not form a BPE model", e))?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);

    let replace =
        |from: &str, to: &str| Replace::new(from, to).map_err(|e| tokenizer_error("cannot build a replace rule", e));
    let spaces = NormalizerWrapper::Replace(replace(" ", SPM_SPACE)?);
    let normalizer = if add_space_prefix {
        NormalizerWrapper::Sequence(NormalizerSequence::new(vec![
            NormalizerWrapper::Prepend(Prepend::new(SPM_SPACE.to_owned())),
            spaces,
        ]))
    } else {
        spaces
    };
    tokenizer.with_normalizer(Some(normalizer));
    let mut decoders = vec![
        DecoderWrapper::Replace(replace(SPM_SPACE, " ")?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_space_prefix {
        // The space put in front when encoding is not part of the text.
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tokenizer.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(decoders))));
    add_marked_tokens(&mut tokenizer, tokens, types);
    Ok(tokenizer)
}

/// Recovers BPE merges from SentencePiece scores, in the order Hugging Face's conversion of such
/// vocabularies gives them: every way of cutting a token into two tokens is a merge; merges rank
/// by the score of the token they make (best first), then by the length in characters of the
/// left part and then of the right part (longest first), then in vocabulary order.
/// SentencePiece's BPE always joins the adjacent pair that makes the best-scoring token, which is
/// what a BPE model ranked by score does.
fn merges_from_scores(tokens: &[String], scores: &[f64], vocab: &Vocab) -> Merges {
    struct Candidate {
        score: f64,
        left_chars: usize,
        right_chars: usize,
        merged: usize,
        left: u32,
        right: u32,
    }
    let mut candidates = Vec::new();
    for (merged, token) in tokens.iter().enumerate() {
        for (left_chars, (cut, _)) in token.char_indices().enumerate().skip(1) {
            let (left, right) = token.split_at(cut);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                let right_chars = token.chars().count() - left_chars;
                candidates.push(Candidate {
                    score: scores[merged],
                    left_chars,
                    right_chars,
                    merged,
                    left: l,
                    right: r,
                });
            }
        }
    }
    candidates.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
            .then(a.merged.cmp(&b.merged))
            .then(a.left.cmp(&b.left))
            .then(a.right.cmp(&b.right))
    });
    candidates.into_iter().map(|c| (tokens[c.left as usize].clone(), tokens[c.right as usize].clone())).collect()
}

// ---- Hugging Face folders ---------------------------------------------------------------------

fn read_json_if_present(path: &Path) -> Result<Option<Value>> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::with_source(ErrorKind::Format, format!("{} is not valid JSON", path.display()), e))
}

/// The text of a special token in `tokenizer_config.json`: a string, or an `AddedToken` object
/// with a `content` field.
fn special_token_text(config: &Value, field: &str, path: &Path) -> Result<Option<String>> {
    match config.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Object(o)) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::format(format!("{}: {field} has no string `content`", path.display()))),
        },
        Some(_) => Err(Error::format(format!("{}: {field} is neither a string nor a token object", path.display()))),
    }
}

/// `eos_token_id` of `generation_config.json`: absent, one id, or a list of ids.
fn generation_eos_ids(generation: &Value, path: &Path) -> Result<Vec<u32>> {
    let bad = || Error::format(format!("{}: eos_token_id is not a token id or a list of them", path.display()));
    let id = |v: &Value| v.as_u64().and_then(|id| u32::try_from(id).ok()).ok_or_else(bad);
    match generation.get("eos_token_id") {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(ids)) => ids.iter().map(id).collect(),
        Some(v) => Ok(vec![id(v)?]),
    }
}

/// The chat template's text: `chat_template` in `tokenizer_config.json` (a string, or a list of
/// `{name, template}` of which we take `default`), else `chat_template.jinja`, else the
/// `chat_template` field of `chat_template.json` (where newer transformers save it).
fn chat_template_source(dir: &Path, config: &Value, config_path: &Path) -> Result<Option<String>> {
    match config.get("chat_template") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => return Ok(Some(s.clone())),
        Some(Value::Array(named)) => {
            let mut by_name = HashMap::new();
            for entry in named {
                match (entry.get("name").and_then(Value::as_str), entry.get("template").and_then(Value::as_str)) {
                    (Some(name), Some(template)) => by_name.insert(name, template),
                    _ => {
                        return Err(Error::format(format!(
                            "{}: chat_template list entries need string `name` and `template`",
                            config_path.display()
                        )));
                    }
                };
            }
            return Ok(by_name.get("default").map(|t| (*t).to_owned()));
        }
        Some(_) => {
            return Err(Error::format(format!(
                "{}: chat_template is neither a string nor a list",
                config_path.display()
            )));
        }
    }
    let jinja = dir.join("chat_template.jinja");
    match std::fs::read_to_string(&jinja) {
        Ok(source) => return Ok(Some(source)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&jinja, e)),
    }
    let json_path = dir.join("chat_template.json");
    match read_json_if_present(&json_path)? {
        None => Ok(None),
        Some(json) => match json.get("chat_template") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::format(format!("{}: no string `chat_template`", json_path.display()))),
        },
    }
}
