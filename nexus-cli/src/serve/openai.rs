//! OpenAI requests: their JSON, checked and turned into a prompt of token ids and the engine's
//! options ([`Prepared`]), or a 4xx saying what is wrong.
//!
//! Beyond OpenAI's fields, requests take vLLM's `top_k`, `min_p`, `repetition_penalty`,
//! `ignore_eos`, `min_tokens` (end-of-sequence and stop strings cannot end the output before
//! that many tokens), `stop_token_ids`, `include_stop_str_in_output` and `return_token_ids`.
//! Fields asking for what this server does not do (`echo`, `best_of` > 1, `n` > 1,
//! `response_format` other than text, `tools`, `tool_choice` other than `none`) are refused;
//! others that clients send (`user`, ...) are ignored.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::http::StatusCode;
use nexus_runtime::engine::sampling::{MAX_LOGIT_BIAS, Penalties, SamplingParams};
use nexus_runtime::engine::{MAX_LOGPROBS, RequestOptions};
use nexus_runtime::text::chat_template::ChatMessage;
use serde::Deserialize;
use serde_json::Value;

use crate::serve::AppState;
use crate::serve::response::{ApiError, bad_request, error};

/// Fields shared by both endpoints.
#[derive(Deserialize)]
pub struct CommonFields {
    model: String,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    max_completion_tokens: Option<u64>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    top_k: Option<i64>,
    /// vLLM's: drop tokens less likely than `min_p` times the most likely one.
    #[serde(default)]
    min_p: Option<f64>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    presence_penalty: Option<f64>,
    #[serde(default)]
    frequency_penalty: Option<f64>,
    /// vLLM's: divides the positive logits (multiplies the negative ones) of tokens seen.
    #[serde(default)]
    repetition_penalty: Option<f64>,
    /// Token ids (as strings, the keys of a JSON object) and what to add to their logits.
    #[serde(default)]
    logit_bias: Option<HashMap<String, f64>>,
    #[serde(default)]
    n: Option<u64>,
    #[serde(default)]
    stop: Option<Value>,
    /// vLLM's: the text ends after the stop string that ended it, not before.
    #[serde(default)]
    include_stop_str_in_output: bool,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    ignore_eos: bool,
    /// vLLM's: the least output tokens before end-of-sequence or a stop string may end it.
    #[serde(default)]
    min_tokens: Option<i64>,
    /// vLLM's: also return the prompt's and the output's token ids.
    #[serde(default)]
    return_token_ids: bool,
    /// vLLM's: more token ids that end the output (the token is part of it).
    #[serde(default)]
    stop_token_ids: Option<Vec<u32>>,
    /// Completions: an integer (`null` for none); chat: `true`/`false`, with `top_logprobs`.
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<u64>,
    #[serde(default)]
    echo: Option<bool>,
    #[serde(default)]
    best_of: Option<u64>,
    #[serde(default)]
    response_format: Option<Value>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(default)]
    tool_choice: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
pub struct CompletionRequest {
    prompt: Value,
    #[serde(flatten)]
    common: CommonFields,
}

#[derive(Deserialize)]
pub struct ChatRequest {
    messages: Vec<ChatMessageIn>,
    #[serde(flatten)]
    common: CommonFields,
}

#[derive(Deserialize)]
struct ChatMessageIn {
    role: String,
    /// A string, an array of text parts, or `null` (an assistant turn that only called tools).
    #[serde(default)]
    content: Value,
}

/// A validated request, ready for the engine.
pub struct Prepared {
    pub prompt: Vec<u32>,
    pub options: RequestOptions,
    pub stops: Vec<String>,
    pub include_stop_str: bool,
    pub stream: bool,
    pub include_usage: bool,
    /// Return token ids (asked for, or the model has no tokenizer).
    pub token_ids: bool,
}

/// Parses a request body.
pub fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| bad_request(format!("malformed request body: {e}")))
}

/// A `/v1/completions` request, ready for the engine.
pub fn completion(state: &AppState, request: &CompletionRequest) -> Result<Prepared, ApiError> {
    prepare(state, &request.common, completion_prompt(state, &request.prompt)?)
}

/// A `/v1/chat/completions` request, its messages rendered by the model's chat template.
pub fn chat(state: &AppState, request: &ChatRequest) -> Result<Prepared, ApiError> {
    if request.messages.is_empty() {
        return Err(bad_request("messages must not be empty"));
    }
    // As vLLM, `tool` messages (results of tool calls) go to the template, which decides.
    if let Some(m) =
        request.messages.iter().find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant" | "tool"))
    {
        return Err(bad_request(format!("unknown message role `{}`", m.role)));
    }
    let Some(tokenizer) = &state.tokenizer else {
        return Err(no_tokenizer(state, "use /v1/completions with a prompt of token ids"));
    };
    let Some(template) = tokenizer.chat_template() else {
        return Err(bad_request("this model has no chat template; use /v1/completions"));
    };
    let messages = request
        .messages
        .iter()
        .map(|m| Ok(ChatMessage::new(&m.role, message_text(&m.content)?)))
        .collect::<Result<Vec<_>, ApiError>>()?;
    let prompt = template
        .render(&messages, true)
        .and_then(|text| tokenizer.encode(&text, false))
        .map_err(|e| bad_request(e.message().to_owned()))?;
    prepare(state, &request.common, prompt)
}

/// A message's text: its string, or its text parts joined by newlines (as vLLM joins them for
/// templates that take a string).
fn message_text(content: &Value) -> Result<String, ApiError> {
    match content {
        Value::String(text) => Ok(text.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let texts = parts
                .iter()
                .map(|part| match (part["type"].as_str(), part["text"].as_str()) {
                    (Some("text"), Some(text)) => Ok(text),
                    (Some("text"), None) => Err(bad_request("a text content part needs a string `text`")),
                    (Some(other), _) => {
                        Err(bad_request(format!("content parts of type `{other}` are not supported (only `text`)")))
                    }
                    (None, _) => Err(bad_request("every content part needs a `type`")),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(texts.join("\n"))
        }
        _ => Err(bad_request("message content must be a string or an array of text parts")),
    }
}

fn prepare(state: &AppState, common: &CommonFields, prompt: Vec<u32>) -> Result<Prepared, ApiError> {
    if common.model != state.config.model_name {
        return Err(error(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            format!("the model `{}` does not exist; this server has `{}`", common.model, state.config.model_name),
        ));
    }
    if common.n.is_some_and(|n| n != 1) {
        return Err(bad_request("only n = 1 is supported"));
    }
    if common.best_of.is_some_and(|n| n != 1) {
        return Err(bad_request("only best_of = 1 is supported"));
    }
    if common.echo == Some(true) {
        return Err(bad_request("echo is not supported by this server"));
    }
    refuse_unsupported(common)?;
    // Completions ask with `logprobs: N`, chat with `logprobs: true` and `top_logprobs: N`.
    let logprobs = match (&common.logprobs, common.top_logprobs) {
        (None | Some(Value::Null) | Some(Value::Bool(false)), None) => None,
        (None | Some(Value::Null) | Some(Value::Bool(false)), Some(_)) => {
            return Err(bad_request("top_logprobs needs logprobs: true"));
        }
        (Some(Value::Bool(true)), n) => Some(n.unwrap_or(0)),
        (Some(Value::Number(n)), None) if n.as_u64().is_some() => n.as_u64(),
        _ => return Err(bad_request("logprobs must be true (with top_logprobs: N) or an integer N >= 0")),
    };
    if let Some(n) = logprobs.filter(|&n| n > MAX_LOGPROBS as u64) {
        return Err(bad_request(format!("logprobs: {n} alternatives asked, at most {MAX_LOGPROBS}")));
    }
    let logprobs = logprobs.map(|n| n as usize);
    let vocab = state.config.vocab_size;
    let stop_token_ids = common.stop_token_ids.clone().unwrap_or_default();
    if let Some(&bad) = stop_token_ids.iter().find(|&&t| t as usize >= vocab) {
        return Err(bad_request(format!("stop_token_ids: {bad} is outside the vocabulary (0..{vocab})")));
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(bad_request(format!("temperature {temperature} is not in [0, 2]")));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad_request(format!("top_p {top_p} is not in (0, 1]")));
    }
    let top_k = match common.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(k) if k > 0 => k as usize,
        Some(k) => return Err(bad_request(format!("top_k {k} must be positive (or -1 for all)"))),
    };
    let min_p = common.min_p.unwrap_or(0.0);
    if !(0.0..=1.0).contains(&min_p) {
        return Err(bad_request(format!("min_p {min_p} is not in [0, 1]")));
    }
    let logit_bias = logit_bias(common.logit_bias.as_ref(), vocab)?;
    let stops = match &common.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad_request("stop must be a string or strings")))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad_request("stop must be a string or up to 4 strings")),
    };
    if state.tokenizer.is_none() && stops.iter().any(|s| !s.is_empty()) {
        return Err(no_tokenizer(state, "stop strings need a tokenizer"));
    }
    if prompt.is_empty() {
        return Err(bad_request("the prompt is empty"));
    }
    let room = state.config.max_context.saturating_sub(prompt.len());
    if room == 0 {
        return Err(bad_request(format!(
            "the prompt has {} tokens; the context holds {}",
            prompt.len(),
            state.config.max_context
        )));
    }
    let max_tokens = match common.max_completion_tokens.or(common.max_tokens) {
        None => room.min(1024),
        Some(0) => return Err(bad_request("max_tokens must be at least 1")),
        Some(m) if m > room as u64 => {
            return Err(bad_request(format!(
                "the prompt has {} tokens and asks for {m} more; the context holds {}",
                prompt.len(),
                state.config.max_context
            )));
        }
        Some(m) => m as usize,
    };
    let min_tokens = match common.min_tokens {
        None => 0,
        Some(m) if m >= 0 && m as u64 <= max_tokens as u64 => m as usize,
        Some(m) => return Err(bad_request(format!("min_tokens {m} must be in [0, max_tokens = {max_tokens}]"))),
    };
    let penalties = Penalties {
        presence: common.presence_penalty.unwrap_or(0.0) as f32,
        frequency: common.frequency_penalty.unwrap_or(0.0) as f32,
        repetition: common.repetition_penalty.unwrap_or(1.0) as f32,
    };
    penalties.validate().map_err(|e| bad_request(e.message().to_owned()))?;
    let sampling = SamplingParams {
        temperature: temperature as f32,
        top_k,
        top_p: top_p as f32,
        seed: common.seed,
        penalties,
        logit_bias,
        min_p: min_p as f32,
    };
    let options =
        RequestOptions { max_tokens, sampling, ignore_eos: common.ignore_eos, min_tokens, stop_token_ids, logprobs };
    Ok(Prepared {
        prompt,
        options,
        stops,
        include_stop_str: common.include_stop_str_in_output,
        stream: common.stream,
        include_usage: common.stream_options.as_ref().is_some_and(|o| o.include_usage),
        token_ids: common.return_token_ids || state.tokenizer.is_none(),
    })
}

/// The 400 for fields asking for output this server cannot constrain or parse: structured
/// output and tool calls. Their values that ask for nothing (plain text, no tools) pass.
fn refuse_unsupported(common: &CommonFields) -> Result<(), ApiError> {
    match &common.response_format {
        None | Some(Value::Null) => {}
        Some(format) if format["type"] == "text" => {}
        Some(format) => {
            let kind = format["type"].as_str().unwrap_or("?");
            return Err(bad_request(format!("response_format `{kind}` is not supported by this server (only `text`)")));
        }
    }
    match &common.tools {
        None | Some(Value::Null) => {}
        Some(Value::Array(tools)) if tools.is_empty() => {}
        Some(_) => return Err(bad_request("tools (function calling) are not supported by this server")),
    }
    match &common.tool_choice {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(choice)) if choice == "none" => Ok(()),
        Some(_) => Err(bad_request("tool_choice is not supported by this server (only `none`)")),
    }
}

/// `logit_bias` as the sampler takes it: token ids below `vocab`, biases in [-100, 100].
fn logit_bias(biases: Option<&HashMap<String, f64>>, vocab: usize) -> Result<Vec<(u32, f32)>, ApiError> {
    let mut out: Vec<(u32, f32)> = biases
        .into_iter()
        .flatten()
        .map(|(token, &bias)| {
            let id = match token.parse::<u32>() {
                Ok(id) if (id as usize) < vocab => id,
                _ => return Err(bad_request(format!("logit_bias: `{token}` is not a token id (0..{vocab})"))),
            };
            if !(-f64::from(MAX_LOGIT_BIAS)..=f64::from(MAX_LOGIT_BIAS)).contains(&bias) {
                return Err(bad_request(format!("logit_bias: {bias} for token {id} is not in [-100, 100]")));
            }
            Ok((id, bias as f32))
        })
        .collect::<Result<_, _>>()?;
    // A fixed order, so that equal requests sample alike.
    out.sort_unstable_by_key(|&(id, _)| id);
    Ok(out)
}

/// The 400 for what a tokenizer-free model cannot do.
pub fn no_tokenizer(state: &AppState, what: &str) -> ApiError {
    bad_request(format!(
        "the model `{}` has no tokenizer (token ids in, token ids out): {what}",
        state.config.model_name
    ))
}

/// The token ids of a `/v1/completions` prompt: a string, tokenized, or an array of token ids.
fn completion_prompt(state: &AppState, prompt: &Value) -> Result<Vec<u32>, ApiError> {
    let vocab = state.config.vocab_size;
    match prompt {
        Value::String(text) => {
            let Some(tokenizer) = &state.tokenizer else {
                return Err(no_tokenizer(state, "send the prompt as an array of token ids"));
            };
            tokenizer.encode(text, true).map_err(|e| bad_request(e.message().to_owned()))
        }
        Value::Array(items) if items.iter().all(Value::is_number) => items
            .iter()
            .map(|v| match v.as_u64() {
                Some(id) if id < vocab as u64 => Ok(id as u32),
                _ => Err(bad_request(format!("prompt token id {v} is outside the vocabulary (0..{vocab})"))),
            })
            .collect(),
        Value::Array(_) => Err(bad_request(
            "batched prompts (arrays of strings or of token-id arrays) are not supported: send one prompt per \
             request, a string or an array of token ids",
        )),
        _ => Err(bad_request("prompt must be a string or an array of token ids")),
    }
}
