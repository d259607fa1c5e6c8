//! A request's way through the engine: submitted to the engine thread, its updates turned into
//! pieces of output — text safe to show (through the runtime's [`Detokenizer`], the same path as
//! `nexus generate`), token ids, log-probabilities — then its end or its failure, with the
//! latency metrics timed from the request's HTTP arrival.
//!
//! The [`Output`] owns the request's channel from the engine thread: when it is dropped (the
//! client went away, and with it the response being written) or closed (a stop string ended the
//! text), the engine thread aborts the request at its next turn.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::StatusCode;
use nexus_runtime::engine::sampling::TokenLogprobs;
use nexus_runtime::engine::{FinishReason, RequestId};
use nexus_runtime::text::detokenizer::Detokenizer;
use tokio::sync::{mpsc as tokio_mpsc, oneshot};

use crate::serve::AppState;
use crate::serve::engine_loop::{Command, Refusal, Update};
use crate::serve::metrics::Metrics;
use crate::serve::openai::Prepared;
use crate::serve::response::{ApiError, bad_request, error};

/// One piece of a response.
pub enum Piece {
    /// Text ready to show and the tokens since the last chunk, with their log-probabilities when
    /// the request asked for them.
    Chunk { text: String, token_ids: Vec<u32>, logprobs: Vec<(u32, Box<TokenLogprobs>)> },
    /// The end, with its reason and token counts.
    End { reason: &'static str, prompt_tokens: usize, completion_tokens: usize },
    /// The request failed (the engine failed it, or the server shut down before it finished):
    /// the error to answer with instead of a result.
    Failed(ApiError),
}

/// Submits `prepared`, which arrived at `arrival`, to the engine thread; returns its id and
/// output once the engine has taken it.
pub async fn submit(
    state: &Arc<AppState>,
    prepared: Prepared,
    arrival: Instant,
) -> Result<(RequestId, Output), ApiError> {
    let id = state.next_id.fetch_add(1, Ordering::Relaxed);
    let (updates_tx, updates) = tokio_mpsc::unbounded_channel();
    let (accepted_tx, accepted) = oneshot::channel();
    let prompt_tokens = prepared.prompt.len();
    let text = Detokenizer::new(
        state.tokenizer.as_ref(),
        prepared.stops,
        prepared.options.min_tokens,
        prepared.include_stop_str,
    );
    let command = Command::Add {
        id,
        prompt: prepared.prompt,
        options: prepared.options,
        updates: updates_tx,
        accepted: accepted_tx,
    };
    let stopped = || error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the engine has stopped");
    state.engine.send(command).map_err(|_| stopped())?;
    match accepted.await {
        Ok(Ok(())) => {}
        Ok(Err(Refusal::Invalid(message))) => return Err(bad_request(message)),
        Ok(Err(Refusal::ShuttingDown)) => return Err(shutting_down()),
        Err(_) => return Err(stopped()),
    }
    let metrics = state.metrics.clone();
    metrics.requests.fetch_add(1, Ordering::Relaxed);
    metrics.prompt_tokens.fetch_add(prompt_tokens as u64, Ordering::Relaxed);
    let output = Output {
        updates,
        text,
        metrics,
        arrival,
        last_token: None,
        every_token: prepared.token_ids,
        token_ids: Vec::new(),
        logprobs: Vec::new(),
        prompt_tokens,
        completion_tokens: 0,
        ready: VecDeque::new(),
        ended: false,
    };
    Ok((id, output))
}

/// The 503 of a request the server could not finish because it is shutting down.
fn shutting_down() -> ApiError {
    error(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down")
}

/// A request's output, piece by piece ([`Output::next`]): chunks, then [`Piece::End`] or
/// [`Piece::Failed`], then nothing.
pub struct Output {
    updates: tokio_mpsc::UnboundedReceiver<Update>,
    text: Detokenizer,
    metrics: Arc<Metrics>,
    /// When the HTTP request arrived: the origin of its time to first token and its latency.
    arrival: Instant,
    last_token: Option<Instant>,
    /// A chunk for every token, text or not (token ids are returned: clients time each token).
    every_token: bool,
    /// Tokens since the last chunk, with their log-probabilities.
    token_ids: Vec<u32>,
    logprobs: Vec<(u32, Box<TokenLogprobs>)>,
    prompt_tokens: usize,
    completion_tokens: usize,
    /// Pieces made but not yet taken.
    ready: VecDeque<Piece>,
    ended: bool,
}

impl Output {
    /// The next piece; `None` after the end.
    pub async fn next(&mut self) -> Option<Piece> {
        std::future::poll_fn(|cx| self.poll_next(cx)).await
    }

    /// The next piece, when there is one.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Piece>> {
        loop {
            if let Some(piece) = self.ready.pop_front() {
                return Poll::Ready(Some(piece));
            }
            if self.ended {
                return Poll::Ready(None);
            }
            match self.updates.poll_recv(cx) {
                Poll::Ready(update) => self.take(update),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Turns an update from the engine thread (`None`: the thread is gone) into pieces.
    fn take(&mut self, update: Option<Update>) {
        match update {
            Some(Update::Token { token, logprobs }) => {
                let now = Instant::now();
                match self.last_token {
                    None => self.metrics.ttft.observe((now - self.arrival).as_secs_f64()),
                    Some(t) => self.metrics.tbt.observe((now - t).as_secs_f64()),
                }
                self.last_token = Some(now);
                self.metrics.generation_tokens.fetch_add(1, Ordering::Relaxed);
                self.completion_tokens += 1;
                self.token_ids.push(token);
                self.logprobs.extend(logprobs.map(|l| (token, l)));
                match self.text.push(token) {
                    Ok(delta) => {
                        if !delta.text.is_empty() || self.every_token {
                            self.chunk(delta.text);
                        }
                        if delta.stopped {
                            self.end("stop");
                        }
                    }
                    Err(e) => self.fail_to_detokenize(token, &e),
                }
            }
            Some(Update::Finished(reason)) => match self.text.finish() {
                Ok(delta) => {
                    if !delta.text.is_empty() || !self.token_ids.is_empty() {
                        self.chunk(delta.text);
                    }
                    self.end(if delta.stopped { "stop" } else { finish_reason(reason) });
                }
                Err(e) => self.fail_to_detokenize(self.token_ids.last().copied().unwrap_or_default(), &e),
            },
            Some(Update::Failed(message)) => self.fail(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                format!("the request failed in the engine: {message}"),
            )),
            Some(Update::ShutDown) => self.fail(shutting_down()),
            None => self.fail(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "the engine stopped before the request finished",
            )),
        }
    }

    fn chunk(&mut self, text: String) {
        let token_ids = std::mem::take(&mut self.token_ids);
        let logprobs = std::mem::take(&mut self.logprobs);
        self.ready.push_back(Piece::Chunk { text, token_ids, logprobs });
    }

    fn end(&mut self, reason: &'static str) {
        self.metrics.e2e.observe(self.arrival.elapsed().as_secs_f64());
        let (prompt_tokens, completion_tokens) = (self.prompt_tokens, self.completion_tokens);
        self.ready.push_back(Piece::End { reason, prompt_tokens, completion_tokens });
        self.finish();
    }

    fn fail(&mut self, error: ApiError) {
        self.ready.push_back(Piece::Failed(error));
        self.finish();
    }

    fn fail_to_detokenize(&mut self, token: u32, e: &nexus_runtime::Error) {
        let message = format!("token {token} of the output has no text: {e}");
        self.metrics.record_failure(&message);
        self.fail(error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", message));
    }

    /// Nothing more comes: the engine thread, seeing the channel closed, aborts the request if it
    /// is still running (a stop string ended its text).
    fn finish(&mut self) {
        self.ended = true;
        self.updates.close();
    }
}

fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
    }
}
