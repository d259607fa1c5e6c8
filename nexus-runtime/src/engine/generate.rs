//! Generating text for one prompt over the [`Engine`]: its tokens detokenized as they come,
//! with stop strings and timings. This is what `nexus generate` runs; a single request is just
//! the engine with one request in it, so it takes the same path (scheduler, lanes, CUDA graphs)
//! as serving, and its tokens become text through the same [`Detokenizer`] as the server's.

use std::time::{Duration, Instant};

use crate::engine::{Engine, EngineEvent, FinishReason, RequestId, RequestOptions};
use crate::model::backend::Backend;
use crate::text::detokenizer::Detokenizer;
use crate::text::tokenizer::Tokenizer;
use crate::{Error, ErrorKind, Result};

/// What to generate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GenerateOptions {
    /// How the request generates (`max_tokens`, sampling, `ignore_eos`, ...). Its `min_tokens`
    /// also holds off the stop strings.
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
/// the request is aborted and the text cut before it. A request the engine fails (its logits were
/// not numbers, its step failed on the device) is an error.
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
    let mut detokenizer = Detokenizer::new(Some(tokenizer), options.stop.clone(), options.request.min_tokens, false);
    let mut text = String::new();
    let mut show = |piece: &str| {
        text.push_str(piece);
        on_text(piece);
    };
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
                EngineEvent::Token { id: got, token, .. } if got == id && finish_reason.is_none() => {
                    first_token.get_or_insert_with(Instant::now);
                    token_ids.push(token);
                    let delta = detokenizer.push(token).inspect_err(|_| {
                        engine.abort(id);
                    })?;
                    show(&delta.text);
                    if delta.stopped {
                        engine.abort(id);
                        finish_reason = Some(FinishReason::Stop);
                    }
                }
                EngineEvent::Finished { id: got, reason } if got == id => {
                    finish_reason.get_or_insert(reason);
                }
                EngineEvent::Failed { id: got, message } if got == id => {
                    return Err(Error::new(ErrorKind::Kernel, format!("request {id} failed: {message}")));
                }
                _ => {}
            }
        }
    }
    if !detokenizer.stopped() {
        let delta = detokenizer.finish()?;
        show(&delta.text);
    }
    let first = first_token.unwrap_or_else(Instant::now);
    Ok(TextGeneration {
        token_ids,
        finish_reason: if detokenizer.stopped() {
            FinishReason::Stop
        } else {
            finish_reason.unwrap_or(FinishReason::Length)
        },
        text,
        prefill_time: first - start,
        decode_time: first.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::engine::scheduler::SchedulerConfig;
    use crate::engine::{DEFAULT_BLOCK_SIZE, EngineConfig, Schedule};
    use crate::model::LlamaModel;
    use crate::model::cpu::CpuBackend;
    use crate::weights::loader;

    #[test]
    fn stop_strings_wait_for_min_tokens_as_in_the_server() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(loader::DEFAULT_MODEL);
        let loaded = loader::open(&path).expect("the default model (scripts/fetch-model.sh)");
        let model = LlamaModel::load(&CpuBackend, loaded.weights.as_ref(), |_, _| {}).expect("load");
        let config = EngineConfig {
            num_blocks: 8,
            block_size: DEFAULT_BLOCK_SIZE,
            scheduler: SchedulerConfig::default(),
            max_model_len: None,
            schedule: Schedule::Chunked,
        };
        let eos = loaded.tokenizer.eos_token_ids().to_vec();
        let mut engine = Engine::new(CpuBackend, model, eos, config).expect("engine");
        let prompt = loaded.tokenizer.encode("The capital of France is", true).expect("encode");
        let run = |engine: &mut Engine<CpuBackend>, id, min_tokens| {
            let request = RequestOptions { max_tokens: 8, min_tokens, ..RequestOptions::default() };
            let options = GenerateOptions { request, stop: vec![".".into()] };
            let mut shown = String::new();
            let g =
                generate_text(engine, id, &loaded.tokenizer, &prompt, &options, |p| shown.push_str(p)).expect("run");
            assert_eq!(shown, g.text);
            g
        };
        let plain = run(&mut engine, 0, 0);
        assert_eq!((plain.text.as_str(), plain.finish_reason), (" Paris", FinishReason::Stop));
        // The dot comes within the first four tokens: it does not end the text.
        let held = run(&mut engine, 1, 4);
        assert!(held.text.starts_with(" Paris.") && held.token_ids.len() >= 4, "{held:?}");
        assert!(!engine.has_unfinished());
    }
}
