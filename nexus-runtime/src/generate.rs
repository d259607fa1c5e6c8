//! Generating one sequence at a time: chunked prefill of the prompt, then token-by-token decode,
//! with streaming text, stop strings and timings. This is what `nexus generate` runs; serving
//! many sequences at once is the engine's job.

use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::batch::{SeqChunk, build_step};
use crate::gguf::HostTensor;
use crate::kv_cache::{BlockManager, SeqId};
use crate::model::{KvCache, LlamaModel};
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Tokens per KV block.
pub const DEFAULT_BLOCK_SIZE: usize = 16;

/// What to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateOptions {
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingParams,
    /// Generation ends when the text contains one of these; the stop string is not returned.
    pub stop: Vec<String>,
    /// Keep generating past end-of-sequence tokens (for benchmarks and fixed-length tests).
    pub ignore_eos: bool,
    /// The most prompt tokens one prefill step processes; longer prompts run as several chunks,
    /// each attending to the cached earlier ones.
    pub prefill_chunk: usize,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            stop: Vec::new(),
            ignore_eos: false,
            prefill_chunk: 512,
        }
    }
}

/// Why generation ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` were generated, or the context is full.
    Length,
    /// An end-of-sequence token or a stop string.
    Stop,
}

/// The result of [`Generator::generate`].
#[derive(Clone, Debug)]
pub struct Generation {
    /// The generated ids (an ending EOS token included).
    pub token_ids: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The logits of the last prompt position, `[1, vocab]`.
    pub prompt_logits: HostTensor,
    /// Time to process the prompt and produce the first token.
    pub prefill_time: Duration,
    /// Time for the remaining tokens.
    pub decode_time: Duration,
}

/// The output of [`generate_text`]: a [`Generation`] and its text.
#[derive(Clone, Debug)]
pub struct TextGeneration {
    pub generation: Generation,
    /// The generated text, cut before a stop string.
    pub text: String,
}

/// A model, a backend and a KV cache sized for one sequence of up to `max_context` tokens.
pub struct Generator<B: Backend> {
    backend: B,
    model: LlamaModel<B>,
    cache: KvCache<B>,
    blocks: BlockManager,
}

impl<B: Backend> std::fmt::Debug for Generator<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Generator").field("model", &self.model).field("cache", &self.cache).finish_non_exhaustive()
    }
}

const SEQ: SeqId = 0;

impl<B: Backend> Generator<B> {
    /// A generator whose cache holds `max_context` tokens (at most the model's context length)
    /// in blocks of `block_size`.
    pub fn new(backend: B, model: LlamaModel<B>, max_context: usize, block_size: usize) -> Result<Self> {
        let max_context = max_context.min(model.config().max_position_embeddings);
        let num_blocks = max_context.div_ceil(block_size).max(1);
        let cache = model.alloc_kv_cache(&backend, num_blocks, block_size)?;
        let blocks = BlockManager::new(num_blocks, block_size)?;
        Ok(Generator { backend, model, cache, blocks })
    }

    /// The model.
    pub fn model(&self) -> &LlamaModel<B> {
        &self.model
    }

    /// The number of tokens the cache holds.
    pub fn capacity(&self) -> usize {
        self.blocks.num_blocks() * self.blocks.block_size()
    }

    /// Generates a continuation of `prompt`; `on_token` sees each id as it is produced and may
    /// return `false` to stop early. The cache is emptied afterwards, whatever the outcome.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        eos_ids: &[u32],
        mut on_token: impl FnMut(u32) -> Result<bool>,
    ) -> Result<Generation> {
        let result = self.run(prompt, options, eos_ids, &mut on_token);
        self.blocks.free(SEQ);
        result
    }

    fn run(
        &mut self,
        prompt: &[u32],
        options: &GenerateOptions,
        eos_ids: &[u32],
        on_token: &mut dyn FnMut(u32) -> Result<bool>,
    ) -> Result<Generation> {
        if prompt.is_empty() {
            return Err(Error::invalid("the prompt is empty"));
        }
        if options.prefill_chunk == 0 {
            return Err(Error::invalid("prefill_chunk must be at least 1"));
        }
        if prompt.len() >= self.capacity() {
            return Err(Error::invalid(format!(
                "the prompt has {} tokens; the context holds {}",
                prompt.len(),
                self.capacity()
            )));
        }
        let mut sampler = Sampler::new(options.sampling.clone(), prompt)?;
        let start = Instant::now();
        let mut logits = None;
        for chunk in prompt.chunks(options.prefill_chunk) {
            let step = build_step(&mut self.blocks, &[SeqChunk { seq: SEQ, tokens: chunk, wants_logits: true }])?;
            logits = Some(self.model.forward(&self.backend, &mut self.cache, &step)?);
        }
        let prompt_logits = self.backend.to_host(&logits.ok_or_else(|| Error::invalid("the prompt is empty"))?)?;
        let mut token_ids = Vec::new();
        let mut finish_reason = FinishReason::Length;
        let mut next = sampler.sample(&prompt_logits.data)?;
        let prefill_time = start.elapsed();
        let decode_start = Instant::now();
        while token_ids.len() < options.max_tokens {
            token_ids.push(next);
            let keep_going = on_token(next)?;
            if (!options.ignore_eos && eos_ids.contains(&next)) || !keep_going {
                finish_reason = FinishReason::Stop;
                break;
            }
            if token_ids.len() == options.max_tokens || prompt.len() + token_ids.len() >= self.capacity() {
                break;
            }
            let step = build_step(&mut self.blocks, &[SeqChunk { seq: SEQ, tokens: &[next], wants_logits: true }])?;
            let logits = self.model.forward(&self.backend, &mut self.cache, &step)?;
            next = if !sampler.needs_logits() {
                self.backend.argmax(&logits)?[0]
            } else {
                sampler.sample(&self.backend.to_host(&logits)?.data)?
            };
        }
        Ok(Generation { token_ids, finish_reason, prompt_logits, prefill_time, decode_time: decode_start.elapsed() })
    }
}

/// Generates text: like [`Generator::generate`], with the ids detokenized as they come,
/// `on_text` called with each new piece, and the text cut before the first stop string (text
/// that might begin a stop string is held back until it is known not to).
pub fn generate_text<B: Backend>(
    generator: &mut Generator<B>,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    options: &GenerateOptions,
    mut on_text: impl FnMut(&str),
) -> Result<TextGeneration> {
    let mut decoder = tokenizer.stream_decoder(true);
    let mut stops = StopMatcher::new(&options.stop);
    let eos: Vec<u32> = tokenizer.eos_token_ids().to_vec();
    let generation = generator.generate(prompt, options, &eos, |id| {
        if let Some(piece) = decoder.push(id)? {
            let (ready, stopped) = stops.push(&piece);
            on_text(ready);
            return Ok(!stopped);
        }
        Ok(true)
    })?;
    let mut generation = generation;
    if !stops.stopped() {
        if let Some(rest) = decoder.finish()? {
            let (ready, _) = stops.push(&rest);
            on_text(ready);
        }
        if !stops.stopped() {
            on_text(stops.flush());
        }
    }
    if stops.stopped() {
        generation.finish_reason = FinishReason::Stop;
    }
    Ok(TextGeneration { generation, text: stops.into_text() })
}

/// Finds stop strings in streamed text, holding back what could still become one.
#[derive(Debug)]
pub struct StopMatcher<'a> {
    stops: &'a [String],
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
    stopped: bool,
}

impl<'a> StopMatcher<'a> {
    /// A matcher of `stops` (empty strings never match).
    pub fn new(stops: &'a [String]) -> Self {
        StopMatcher { stops, text: String::new(), emitted: 0, stopped: false }
    }

    /// Appends `piece`; returns the text now safe to show and whether a stop string was found.
    pub fn push(&mut self, piece: &str) -> (&str, bool) {
        if self.stopped {
            return ("", true);
        }
        self.text.push_str(piece);
        let from = self.emitted;
        let found =
            self.stops.iter().filter(|s| !s.is_empty()).filter_map(|s| self.text[from..].find(s.as_str())).min();
        let end = match found {
            Some(at) => {
                self.stopped = true;
                self.text.truncate(from + at);
                self.text.len()
            }
            None => self.text.len() - self.held_back(),
        };
        self.emitted = end;
        (&self.text[from..end], self.stopped)
    }

    /// Bytes at the end of the text that are a proper prefix of some stop string.
    fn held_back(&self) -> usize {
        let tail = &self.text[self.emitted..];
        self.stops
            .iter()
            .flat_map(|s| {
                (1..s.len().min(tail.len() + 1)).rev().find(|&n| s.is_char_boundary(n) && tail.ends_with(&s[..n]))
            })
            .max()
            .unwrap_or(0)
    }

    /// Hands out whatever was held back.
    pub fn flush(&mut self) -> &str {
        let from = self.emitted;
        self.emitted = self.text.len();
        &self.text[from..]
    }

    /// Whether a stop string was found.
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// All text so far, cut before the stop string.
    pub fn into_text(self) -> String {
        self.text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(stops: &[&str], pieces: &[&str]) -> (String, String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut shown = String::new();
        for p in pieces {
            let (ready, stopped) = m.push(p);
            shown.push_str(ready);
            if stopped {
                break;
            }
        }
        if !m.stopped() {
            shown.push_str(m.flush());
        }
        let stopped = m.stopped();
        (shown, m.into_text(), stopped)
    }

    #[test]
    fn stop_string_split_across_pieces_is_cut_and_never_shown() {
        let (shown, text, stopped) = stream(&["END"], &["Hello E", "N", "D and more"]);
        assert_eq!((shown.as_str(), text.as_str(), stopped), ("Hello ", "Hello ", true));
    }

    #[test]
    fn held_back_prefix_is_released_when_it_does_not_complete() {
        let (shown, text, stopped) = stream(&["END"], &["a E", "x", "EN"]);
        assert_eq!((shown.as_str(), text.as_str(), stopped), ("a ExEN", "a ExEN", false));
    }

    #[test]
    fn earliest_stop_string_wins() {
        let (shown, _, stopped) = stream(&["cd", "b"], &["abcd"]);
        assert_eq!((shown.as_str(), stopped), ("a", true));
    }
}
