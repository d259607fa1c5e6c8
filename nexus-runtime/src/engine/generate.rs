//! Generating text for one prompt over the [`Engine`]: its tokens detokenized as they come,
//! with stop strings and timings. This is what `nexus generate` runs; a single request is just
//! the engine with one request in it, so it takes the same path (scheduler, lanes, CUDA graphs)
//! as serving.

use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineEvent, FinishReason, RequestId, RequestOptions};
use crate::model::backend::Backend;
use crate::text::stop::StopMatcher;
use crate::text::tokenizer::Tokenizer;
use crate::{Error, Result};

/// What to generate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerateOptions {
    /// How the request generates (`max_tokens`, sampling, `ignore_eos`, ...).
    pub request: RequestOptions,
    /// Generation ends when the text contains one of these; the stop string is not returned.
    pub stop: Vec<String>,
}

/// The result of [`generate_text`].
#[derive(Clone, Debug)]
pub struct TextGeneration {
    /// The generated ids (an ending EOS token included).
    pub token_ids: Vec<u32>,
    /// The generated text, cut before a stop string.
    pub text: String,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Time to process the prompt and produce the first token.
    pub prefill_time: Duration,
    /// Time for the remaining tokens.
    pub decode_time: Duration,
}

/// Generates a continuation of `prompt` on `engine` (which must have no other request with the
/// id `id`), detokenized by `tokenizer`, calling `on_text` with each new piece of text. Text that
/// might begin a stop string is held back until it is known not to; when a stop string appears
/// the request is aborted and the text cut before it.
pub fn generate_text<B: Backend>(
    engine: &mut Engine<B>,
    id: RequestId,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<TextGeneration> {
    let start = Instant::now();
    engine.add_request(id, prompt.to_vec(), options.request.clone())?;
    let mut decoder = tokenizer.stream_decoder(true);
    let mut stops = StopMatcher::new(&options.stop);
    let mut token_ids = Vec::new();
    let mut first_token = None;
    let mut finish_reason = None;
    while finish_reason.is_none() {
        let events = match engine.step() {
            Ok(events) => events,
            Err(e) => {
                engine.abort(id);
                return Err(e);
            }
        };
        if events.is_empty() && !engine.has_unfinished() {
            return Err(Error::invalid(format!("request {id} ended without finishing")));
        }
        for event in events {
            match event {
                EngineEvent::Token { id: got, token, .. } if got == id => {
                    first_token.get_or_insert_with(Instant::now);
                    token_ids.push(token);
                    if let Some(piece) = decoder.push(token)? {
                        let (ready, stopped) = stops.push(&piece);
                        on_text(ready);
                        if stopped {
                            engine.abort(id);
                            finish_reason = Some(FinishReason::Stop);
                        }
                    }
                }
                EngineEvent::Finished { id: got, reason } if got == id => {
                    finish_reason.get_or_insert(reason);
                }
                _ => {}
            }
        }
    }
    if !stops.stopped() {
        if let Some(rest) = decoder.finish()? {
            let (ready, _) = stops.push(&rest);
            on_text(ready);
        }
        if !stops.stopped() {
            on_text(stops.flush());
        }
    }
    let first = first_token.unwrap_or_else(Instant::now);
    Ok(TextGeneration {
        token_ids,
        finish_reason: if stops.stopped() { FinishReason::Stop } else { finish_reason.unwrap_or(FinishReason::Length) },
        text: stops.into_text(),
        prefill_time: first - start,
        decode_time: first.elapsed(),
    })
}
