//! Responses: OpenAI-style errors, and a request's output as one JSON body or as server-sent
//! events (chunks, then a last chunk with the finish reason and usage, then `[DONE]`; a request
//! that fails midway gets an error event, then `[DONE]`).

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use nexus_runtime::engine::sampling::TokenLogprobs;
use serde_json::{Value, json};

use crate::serve::AppState;
use crate::serve::openai::Prepared;
use crate::serve::stream::{Output, Piece, submit};

/// An error answered with an OpenAI-style body: `{"error": {"message", "type", "param", "code"}}`.
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind, "param": null, "code": null } })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

pub fn error(status: StatusCode, kind: &'static str, message: impl Into<String>) -> ApiError {
    ApiError { status, kind, message: message.into() }
}

pub fn bad_request(message: impl Into<String>) -> ApiError {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

/// Which endpoint a request came to: the shape of its response.
#[derive(Clone, Copy)]
pub enum Kind {
    Completion,
    Chat,
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Runs `prepared`, which arrived at `arrival`, and answers with its output.
pub async fn respond(state: Arc<AppState>, prepared: Prepared, kind: Kind, arrival: Instant) -> Response {
    let stream = prepared.stream;
    let include_usage = prepared.include_usage;
    let prompt_ids = prepared.token_ids.then(|| prepared.prompt.clone());
    let logprobs = prepared.options.logprobs.map(|_| LogprobsJson { state: state.clone(), kind, offset: 0 });
    let (request, output) = match submit(&state, prepared, arrival).await {
        Ok(submitted) => submitted,
        Err(e) => return e.into_response(),
    };
    let prefix = if matches!(kind, Kind::Chat) { "chatcmpl" } else { "cmpl" };
    let chunks = Chunks {
        id: format!("{prefix}-{request}"),
        created: unix_time(),
        model: state.config.model_name.clone(),
        kind,
        with_ids: prompt_ids.is_some(),
        prompt_ids,
        include_usage,
        logprobs,
    };
    if stream { Sse::new(Events::new(output, chunks)).into_response() } else { whole(output, chunks).await }
}

/// The usage object of a response.
fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    let total_tokens = prompt_tokens + completion_tokens;
    json!({ "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": total_tokens })
}

/// The response's JSON, pieces and all; the request's error if it failed.
async fn whole(mut output: Output, mut chunks: Chunks) -> Response {
    let (mut text, mut token_ids, mut all_logprobs) = (String::new(), Vec::new(), Vec::new());
    while let Some(piece) = output.next().await {
        match piece {
            Piece::Chunk { text: t, token_ids: ids, logprobs } => {
                text.push_str(&t);
                token_ids.extend(ids);
                all_logprobs.extend(logprobs);
            }
            Piece::End { reason, prompt_tokens, completion_tokens } => {
                let object = if matches!(chunks.kind, Kind::Chat) { "chat.completion" } else { "text_completion" };
                let logprobs = chunks.logprobs.as_mut().map(|l| l.render(&all_logprobs));
                let choice = chunks.choice(&text, &token_ids, logprobs, Some(reason), false);
                let mut body = json!({
                    "id": chunks.id, "object": object, "created": chunks.created, "model": chunks.model,
                    "choices": [choice],
                    "usage": usage(prompt_tokens, completion_tokens)
                });
                if let Some(ids) = chunks.prompt_ids.take() {
                    body["prompt_token_ids"] = json!(ids);
                }
                return axum::Json(body).into_response();
            }
            Piece::Failed(e) => return e.into_response(),
        }
    }
    error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "the request ended without a result").into_response()
}

/// What every chunk (or the whole response) of one request shares, and how its choices look.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
    /// Choices carry their token ids (asked for, or the model has no tokenizer).
    with_ids: bool,
    /// The prompt's token ids, until the first chunk (or the response) has carried them, as
    /// vLLM's do.
    prompt_ids: Option<Vec<u32>>,
    include_usage: bool,
    /// Set when log-probabilities were asked for.
    logprobs: Option<LogprobsJson>,
}

impl Chunks {
    /// A choice of `text` and `token_ids`, with the token ids and log-probabilities only when
    /// asked for.
    fn choice(
        &self,
        text: &str,
        token_ids: &[u32],
        logprobs: Option<Value>,
        finish_reason: Option<&str>,
        streamed: bool,
    ) -> Value {
        let mut choice = match (self.kind, streamed) {
            (Kind::Completion, _) => {
                json!({ "index": 0, "text": text, "logprobs": logprobs.clone(), "finish_reason": finish_reason })
            }
            (Kind::Chat, false) => json!({
                "index": 0,
                "message": { "role": "assistant", "content": text },
                "finish_reason": finish_reason
            }),
            (Kind::Chat, true) if text.is_empty() && finish_reason.is_some() => {
                json!({ "index": 0, "delta": {}, "finish_reason": finish_reason })
            }
            (Kind::Chat, true) => json!({ "index": 0, "delta": { "content": text }, "finish_reason": finish_reason }),
        };
        if self.with_ids {
            choice["token_ids"] = json!(token_ids);
        }
        if let (Kind::Chat, Some(logprobs)) = (self.kind, logprobs) {
            choice["logprobs"] = logprobs;
        }
        choice
    }

    /// A chunk event with `choice` (and `usage`).
    fn event(&mut self, choice: Value, usage: Option<Value>) -> Event {
        let object = if matches!(self.kind, Kind::Chat) { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({
            "id": self.id, "object": object, "created": self.created, "model": self.model, "choices": [choice]
        });
        if let Some(ids) = self.prompt_ids.take() {
            v["prompt_token_ids"] = json!(ids);
        }
        if let Some(u) = usage {
            v["usage"] = u;
        }
        Event::default().data(v.to_string())
    }

    /// The events of `piece`: one chunk; or the last chunk and `[DONE]`; or an error event and
    /// `[DONE]`.
    fn events(&mut self, piece: Piece, out: &mut VecDeque<Event>) {
        match piece {
            Piece::Chunk { text, token_ids, logprobs } => {
                let logprobs = self.logprobs.as_mut().map(|l| l.render(&logprobs));
                let choice = self.choice(&text, &token_ids, logprobs, None, true);
                out.push_back(self.event(choice, None));
            }
            Piece::End { reason, prompt_tokens, completion_tokens } => {
                let usage = self.include_usage.then(|| usage(prompt_tokens, completion_tokens));
                let choice = self.choice("", &[], None, Some(reason), true);
                out.push_back(self.event(choice, usage));
                out.push_back(Event::default().data("[DONE]"));
            }
            Piece::Failed(e) => {
                out.push_back(Event::default().data(e.body().to_string()));
                out.push_back(Event::default().data("[DONE]"));
            }
        }
    }
}

/// A streamed response's events, made as the output comes. Dropping it (the connection closed)
/// drops the output, which aborts the request.
struct Events {
    output: Output,
    chunks: Chunks,
    ready: VecDeque<Event>,
}

impl Events {
    fn new(output: Output, mut chunks: Chunks) -> Self {
        let mut ready = VecDeque::new();
        // Chat streams open with the assistant's role.
        if matches!(chunks.kind, Kind::Chat) {
            let mut first =
                json!({ "index": 0, "delta": { "role": "assistant", "content": "" }, "finish_reason": null });
            if chunks.with_ids {
                first["token_ids"] = json!([]);
            }
            ready.push_back(chunks.event(first, None));
        }
        Events { output, chunks, ready }
    }
}

impl tokio_stream::Stream for Events {
    type Item = Result<Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            match this.output.poll_next(cx) {
                Poll::Ready(Some(piece)) => this.chunks.events(piece, &mut this.ready),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Renders tokens' log-probabilities the way the endpoint's clients expect: `tokens`,
/// `token_logprobs`, `top_logprobs` and `text_offset` for completions, `content` entries with
/// `bytes` and `top_logprobs` for chat. A model without a tokenizer names tokens `token_id:<id>`
/// (as vLLM's `return_tokens_as_token_ids`).
struct LogprobsJson {
    state: Arc<AppState>,
    kind: Kind,
    /// Completions: where the next token starts in the output text.
    offset: usize,
}

impl LogprobsJson {
    fn token(&self, id: u32) -> String {
        match &self.state.tokenizer {
            Some(t) => t.decode(&[id], false).unwrap_or_default(),
            None => format!("token_id:{id}"),
        }
    }

    fn render(&mut self, entries: &[(u32, Box<TokenLogprobs>)]) -> Value {
        match self.kind {
            Kind::Completion => {
                let (mut tokens, mut logprobs, mut top, mut offsets) = (vec![], vec![], vec![], vec![]);
                for (id, lp) in entries {
                    let token = self.token(*id);
                    offsets.push(self.offset);
                    self.offset += token.chars().count();
                    tokens.push(token);
                    logprobs.push(lp.logprob);
                    let alternatives: serde_json::Map<String, Value> =
                        lp.top.iter().map(|&(t, l)| (self.token(t), json!(l))).collect();
                    top.push(alternatives);
                }
                json!({ "tokens": tokens, "token_logprobs": logprobs, "top_logprobs": top, "text_offset": offsets })
            }
            Kind::Chat => {
                let entry = |token: String, logprob: f32| {
                    let bytes = token.as_bytes().to_vec();
                    json!({ "token": token, "logprob": logprob, "bytes": bytes })
                };
                let content: Vec<Value> = entries
                    .iter()
                    .map(|(id, lp)| {
                        let mut e = entry(self.token(*id), lp.logprob);
                        e["top_logprobs"] = lp.top.iter().map(|&(t, l)| entry(self.token(t), l)).collect();
                        e
                    })
                    .collect();
                json!({ "content": content })
            }
        }
    }
}
