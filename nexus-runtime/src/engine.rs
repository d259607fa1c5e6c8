//! The engine: continuous batching of many requests over one model and one paged KV cache.
//!
//! Requests come in as token ids ([`Engine::add_request`]); each [`Engine::step`] asks the
//! scheduler for a plan (which sequences advance, by how many tokens, which are preempted), builds
//! one mixed batch of decode tokens and prompt chunks, runs the model once, samples the sequences
//! whose chunk reached their end, and reports the new tokens and the finished requests as
//! [`EngineEvent`]s. Batch planning ([`crate::scheduler`]), KV ownership ([`BlockManager`]) and
//! the device ([`Backend`]) stay separate, so that a scheduler running prefill and decode on two
//! streams can reuse the same pieces.
//!
//! Preemption is by recompute: a preempted sequence loses its blocks and goes back to the front of
//! the queue with its prompt and the tokens it generated so far, which are prefilled again when
//! there is room. No request is lost. Its output is the same as without preemption on a backend
//! whose rows do not depend on the batch (the CPU backend, the CUDA backend's batch-invariant
//! mode); otherwise bf16 rounding may differ and flip a near-tie.

use std::collections::{HashMap, VecDeque};

use crate::backend::Backend;
use crate::batch::{SeqChunk, build_step};
use crate::generate::FinishReason;
use crate::kv_cache::{BlockManager, SeqId};
use crate::model::{KvCache, LlamaModel};
use crate::sampling::{Sampler, SamplingParams, TokenLogprobs, token_logprobs};
use crate::scheduler::{ChunkedScheduler, SchedulerConfig, SeqState};
use crate::{Error, Result};

/// Identifies a request.
pub type RequestId = SeqId;

/// How a request generates.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestOptions {
    /// The most tokens to generate.
    pub max_tokens: usize,
    /// How to pick each token.
    pub sampling: SamplingParams,
    /// Keep generating past the model's end-of-sequence tokens.
    pub ignore_eos: bool,
    /// More token ids that end the request (the stop token is reported, then the request ends).
    pub stop_token_ids: Vec<u32>,
    /// End-of-sequence and stop tokens do not end the request before it has generated this many
    /// tokens (vLLM's `min_tokens`), so that a benchmark can force output lengths.
    pub min_tokens: usize,
    /// Report each token's log-probability with this many most likely alternatives (at most
    /// [`MAX_LOGPROBS`]), from the model's logits before penalties and temperature, as vLLM does.
    pub logprobs: Option<usize>,
}

/// The most alternatives a request may ask log-probabilities of.
pub const MAX_LOGPROBS: usize = 20;

impl Default for RequestOptions {
    fn default() -> Self {
        RequestOptions {
            max_tokens: 256,
            sampling: SamplingParams::default(),
            ignore_eos: false,
            stop_token_ids: Vec::new(),
            min_tokens: 0,
            logprobs: None,
        }
    }
}

/// What a step produced.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// Request `id` generated `token`, with its log-probabilities if the request asked for them.
    Token { id: RequestId, token: u32, logprobs: Option<Box<TokenLogprobs>> },
    /// Request `id` is done; its blocks are free.
    Finished { id: RequestId, reason: FinishReason },
}

/// Sizes of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Blocks in the KV cache (per layer).
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Limits of each step.
    pub scheduler: SchedulerConfig,
    /// The most tokens (prompt and output) of one request, below the model's context (vLLM's
    /// `max_model_len`); `None`: the model's context. Decode graphs are recorded for it.
    pub max_model_len: Option<usize>,
}

struct Sequence {
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    generated: usize,
    options: RequestOptions,
    sampler: Sampler,
}

/// Continuous batching over one model (see the module documentation).
pub struct Engine<B: Backend> {
    backend: B,
    model: LlamaModel<B>,
    cache: KvCache<B>,
    blocks: BlockManager,
    scheduler: ChunkedScheduler,
    eos_token_ids: Vec<u32>,
    seqs: HashMap<RequestId, Sequence>,
    /// Sequences holding blocks, oldest first.
    running: Vec<RequestId>,
    /// Sequences without blocks, in admission order.
    waiting: VecDeque<RequestId>,
    preemptions: u64,
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .field("free_blocks", &self.blocks.num_free_blocks())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Engine<B> {
    /// An engine over `model`, whose KV cache it allocates on `backend`; `eos_token_ids` end a
    /// request unless it ignores them. The backend's decode steps are recorded here for every
    /// batch size up to `max_num_seqs` ([`LlamaModel::warm_up`]).
    pub fn new(backend: B, model: LlamaModel<B>, eos_token_ids: Vec<u32>, config: EngineConfig) -> Result<Self> {
        let scheduler = ChunkedScheduler::new(config.scheduler)?;
        let blocks = BlockManager::new(config.num_blocks, config.block_size)?;
        // Checked before the cache takes its memory.
        let context = model.config().max_position_embeddings;
        if let Some(len) = config.max_model_len.filter(|&len| len == 0 || len > context) {
            return Err(Error::invalid(format!("max_model_len {len} must be in 1..={context} (the model's context)")));
        }
        let mut cache = model.alloc_kv_cache(&backend, config.num_blocks, config.block_size)?;
        if let Some(len) = config.max_model_len {
            cache.limit_seq_len(len);
        }
        model.warm_up(&backend, &mut cache, config.scheduler.max_num_seqs)?;
        Ok(Engine {
            backend,
            model,
            cache,
            blocks,
            scheduler,
            eos_token_ids,
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            preemptions: 0,
        })
    }

    /// The most tokens (prompt plus output) one request may have: the model's context (or
    /// `max_model_len`), and what the whole cache holds.
    pub fn max_request_tokens(&self) -> usize {
        self.cache.max_seq_len(self.model.config()).min(self.blocks.num_blocks() * self.blocks.block_size())
    }

    /// Queues a request. Fails (and queues nothing) on an empty prompt, a token outside the
    /// vocabulary, bad sampling parameters, a request that could never fit (prompt plus
    /// `max_tokens` beyond [`Engine::max_request_tokens`]) or an id already in use.
    pub fn add_request(&mut self, id: RequestId, prompt: Vec<u32>, options: RequestOptions) -> Result<()> {
        if self.seqs.contains_key(&id) {
            return Err(Error::invalid(format!("request {id} already exists")));
        }
        if prompt.is_empty() {
            return Err(Error::invalid("the prompt is empty"));
        }
        if options.logprobs.is_some_and(|n| n > MAX_LOGPROBS) {
            return Err(Error::invalid(format!("logprobs: at most {MAX_LOGPROBS} alternatives")));
        }
        if options.max_tokens == 0 {
            return Err(Error::invalid("max_tokens must be at least 1"));
        }
        let vocab = self.model.config().vocab_size;
        if let Some(&t) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::invalid(format!("token id {t} is outside the vocabulary of {vocab}")));
        }
        let limit = self.max_request_tokens();
        if prompt.len() + options.max_tokens > limit {
            return Err(Error::invalid(format!(
                "the prompt has {} tokens and asks for {} more; at most {limit} fit",
                prompt.len(),
                options.max_tokens
            )));
        }
        let sampler = Sampler::new(options.sampling.clone(), &prompt)?;
        self.seqs.insert(id, Sequence { tokens: prompt, computed: 0, generated: 0, options, sampler });
        self.waiting.push_back(id);
        Ok(())
    }

    /// Drops request `id` (a client went away) and frees its blocks at once. Returns whether it
    /// existed.
    pub fn abort(&mut self, id: RequestId) -> bool {
        if self.seqs.remove(&id).is_none() {
            return false;
        }
        self.blocks.free(id);
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&r| r != id);
        true
    }

    /// Whether any request is queued or running.
    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Requests holding KV blocks.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting for admission.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The fraction of KV blocks in use.
    pub fn kv_usage(&self) -> f64 {
        self.blocks.usage()
    }

    /// How many times a sequence was preempted so far.
    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// The model.
    pub fn model(&self) -> &LlamaModel<B> {
        &self.model
    }

    /// Runs one step; returns its events (empty when there is nothing to do).
    pub fn step(&mut self) -> Result<Vec<EngineEvent>> {
        let state = |id: &RequestId| {
            let s = &self.seqs[id];
            SeqState { id: *id, uncached: s.tokens.len() - s.computed }
        };
        let running: Vec<SeqState> = self.running.iter().map(state).collect();
        let waiting: Vec<SeqState> = self.waiting.iter().map(state).collect();
        let plan = self.scheduler.plan(&running, &waiting, &self.blocks);

        // Preempted sequences go back to the front of the queue, oldest first.
        for &id in plan.preempted.iter().rev() {
            self.blocks.free(id);
            self.running.retain(|&r| r != id);
            if let Some(s) = self.seqs.get_mut(&id) {
                s.computed = 0;
            }
            self.waiting.push_front(id);
            self.preemptions += 1;
        }
        // `admitted` counts from the front of the queue as the scheduler saw it.
        for _ in 0..plan.admitted {
            if let Some(id) = self.waiting.pop_front() {
                self.running.push(id);
            }
        }
        if plan.scheduled.is_empty() {
            return Ok(Vec::new());
        }

        let chunks: Vec<SeqChunk<'_>> = plan
            .scheduled
            .iter()
            .map(|s| {
                let seq = &self.seqs[&s.id];
                let end = seq.computed + s.tokens;
                SeqChunk { seq: s.id, tokens: &seq.tokens[seq.computed..end], wants_logits: end == seq.tokens.len() }
            })
            .collect();
        let input = build_step(&mut self.blocks, &chunks)?;
        let sampled_ids: Vec<RequestId> = chunks.iter().filter(|c| c.wants_logits).map(|c| c.seq).collect();
        let logits = self.model.forward(&self.backend, &mut self.cache, &input)?;
        // The device picks the argmax unless some sequence needs its logits (drawing, penalties,
        // log-probabilities).
        let argmax_only = sampled_ids.iter().all(|id| {
            let seq = &self.seqs[id];
            !seq.sampler.needs_logits() && seq.options.logprobs.is_none()
        });
        let mut logprobs: Vec<Option<Box<TokenLogprobs>>> = vec![None; sampled_ids.len()];
        let tokens = if argmax_only {
            self.backend.argmax(&logits)?
        } else {
            let host = self.backend.to_host(&logits)?;
            let vocab = host.shape[1];
            let mut tokens = Vec::with_capacity(sampled_ids.len());
            for (i, (row, id)) in host.data.chunks_exact(vocab).zip(&sampled_ids).enumerate() {
                let seq = self.seqs.get_mut(id).expect("scheduled sequences exist");
                let token = seq.sampler.sample(row)?;
                if let Some(top) = seq.options.logprobs {
                    logprobs[i] = Some(Box::new(token_logprobs(row, token, top)));
                }
                tokens.push(token);
            }
            tokens
        };

        for s in &plan.scheduled {
            if let Some(seq) = self.seqs.get_mut(&s.id) {
                seq.computed += s.tokens;
            }
        }
        let mut events = Vec::with_capacity(2 * tokens.len());
        for ((&id, &token), logprobs) in sampled_ids.iter().zip(&tokens).zip(logprobs) {
            let seq = self.seqs.get_mut(&id).expect("scheduled sequences exist");
            seq.tokens.push(token);
            seq.generated += 1;
            events.push(EngineEvent::Token { id, token, logprobs });
            let stop = seq.generated >= seq.options.min_tokens
                && ((!seq.options.ignore_eos && self.eos_token_ids.contains(&token))
                    || seq.options.stop_token_ids.contains(&token));
            let reason = if stop {
                Some(FinishReason::Stop)
            } else if seq.generated >= seq.options.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                self.seqs.remove(&id);
                self.blocks.free(id);
                self.running.retain(|&r| r != id);
                events.push(EngineEvent::Finished { id, reason });
            }
        }
        Ok(events)
    }
}
