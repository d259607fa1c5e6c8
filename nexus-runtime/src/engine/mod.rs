//! The engine: continuous batching of many requests over one model and one paged KV cache, in
//! one lane or two.
//!
//! Requests come in as token ids ([`Engine::add_request`]). Each [`Engine::step`] asks the
//! [`Scheduler`] what the idle lanes run next (which sequences advance, by how many tokens, on
//! how many SMs, which are preempted), launches those iterations — each lane in its own backend
//! phase, so a prefill and a decode iteration run at the same time on disjoint SMs — and then
//! waits for the first iteration in flight to finish, samples the sequences whose chunk reached
//! their end, and reports the new tokens and the finished requests as [`EngineEvent`]s. The
//! engine thread never waits on one lane to feed the other: it polls the lanes' completions and
//! relaunches a lane as soon as the caller steps again. A sequence is in at most one lane's
//! iteration; one whose prompt is done joins the decode lane in the same KV pool, with nothing
//! copied. Batch planning ([`scheduler`]), KV ownership ([`BlockManager`]) and the device
//! ([`Backend`]) stay separate.
//!
//! Preemption is by recompute: a preempted sequence loses its blocks and goes back to the front of
//! the queue with its prompt and the tokens it generated so far, which are prefilled again when
//! there is room. No request is lost. Its output is the same as without preemption on a backend
//! whose rows do not depend on the batch (the CPU backend, the CUDA backend's batch-invariant
//! mode); otherwise bf16 rounding may differ and flip a near-tie. Aborting a request whose
//! iteration is in flight frees its blocks when that iteration is done (the device may still be
//! writing them until then).

pub mod batch;
pub mod cost_model;
pub mod generate;
pub mod kv_cache;
pub mod profile;
pub mod sampling;
pub mod scheduler;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::engine::batch::{SeqChunk, build_step};
use crate::engine::cost_model::CostModel;
use crate::engine::kv_cache::{BlockManager, SeqId};
use crate::engine::sampling::{Sampler, SamplingParams, TokenLogprobs, token_logprobs};
use crate::engine::scheduler::controller::{Controller, ControllerConfig};
use crate::engine::scheduler::{
    ChunkedScheduler, Lane, LanePlan, NexusConfig, NexusScheduler, PrefillPacking, PrefillTokens, Scheduled, Scheduler,
    SchedulerConfig, SchedulerView, SeqState,
};
use crate::model::backend::{Backend, HostLogits, LogitsReadback, StepInput, StepKind};
use crate::model::{KvCache, LlamaModel};
use crate::{Error, Result};
use nexus_kernels::reference::ARGMAX_NONE;

/// Tokens per KV block, unless configured otherwise. 64, not the 16 of the kernels' benches: the
/// Hopper prefill attention copies K and V in one TMA box per block (up to 128 rows), and with
/// boxes of 16 rows its copies, not its math, bound it (H200, a 2048-token chunk over 2048 cached
/// tokens: 499-518 TFLOP/s with blocks of 16, 580-583 with blocks of 64, in two calls;
/// bench-results/prefill_attention-h200.md). A sequence then holds at most 63 slots it does not
/// use.
pub const DEFAULT_BLOCK_SIZE: usize = 64;

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

/// Why a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` were generated.
    Length,
    /// An end-of-sequence or stop token (or, in text generation, a stop string).
    Stop,
}

/// What a step produced.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// Request `id` generated `token`, with its log-probabilities if the request asked for them.
    Token { id: RequestId, token: u32, logprobs: Option<Box<TokenLogprobs>> },
    /// Request `id` is done; its blocks are free.
    Finished { id: RequestId, reason: FinishReason },
    /// Request `id` failed and was dropped (its blocks are free): the step it was in failed on
    /// the device, or its logits were not numbers (NaN) so no token could be picked. The engine
    /// goes on with the other requests.
    Failed { id: RequestId, message: String },
}

/// Which scheduler runs the engine.
#[derive(Clone, Debug, Default, PartialEq)]
pub enum Schedule {
    /// One mixed batch per iteration on every SM ([`ChunkedScheduler`]).
    #[default]
    Chunked,
    /// Prefill and decode in two lanes at once, on disjoint SMs, split at a fixed share
    /// ([`NexusScheduler`]).
    Nexus(NexusConfig),
    /// The same two lanes, split by the controller from a cost model ([`Controller`]).
    NexusControlled(Box<NexusControl>),
}

/// What the controlled Nexus schedule decides with.
#[derive(Clone, Debug, PartialEq)]
pub struct NexusControl {
    /// The model's costs on this device (`nexus profile` measures them).
    pub cost: CostModel,
    pub controller: ControllerConfig,
    /// As [`NexusConfig::prefill_aging`], [`NexusConfig::prefill_tokens`] and
    /// [`NexusConfig::prefill_packing`].
    pub prefill_aging: u64,
    pub prefill_tokens: Option<PrefillTokens>,
    pub prefill_packing: PrefillPacking,
}

/// Sizes of the engine.
#[derive(Clone, Debug, PartialEq)]
pub struct EngineConfig {
    /// Blocks in the KV cache (per layer).
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Limits of each iteration.
    pub scheduler: SchedulerConfig,
    /// The most tokens (prompt and output) of one request, below the model's context (vLLM's
    /// `max_model_len`); `None`: the model's context. Decode graphs are recorded for it.
    pub max_model_len: Option<usize>,
    /// Which scheduler runs the lanes.
    pub schedule: Schedule,
}

/// One iteration of one lane, as a timeline records it.
#[derive(Clone, Debug, PartialEq)]
pub struct Iteration {
    pub lane: Lane,
    pub kind: StepKind,
    /// Its CTA budget, in SMs (the last one, on a backend that resized it in flight).
    pub budget: u32,
    /// Sequences it advanced, and their new tokens (query rows).
    pub seqs: usize,
    pub tokens: usize,
    /// When it was launched and when the engine saw it done, since [`Engine::epoch`].
    pub start: Duration,
    pub end: Duration,
    /// CPU time the engine thread spent on it: its share of planning, building and launching
    /// the step, and reading and sampling its results.
    pub host: Duration,
    /// How long the scheduler's cost model predicted it would take (the Nexus controller's).
    pub predicted: Option<Duration>,
}

struct Sequence {
    /// Prompt, then generated tokens.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    generated: usize,
    options: RequestOptions,
    sampler: Sampler,
    /// In a lane's iteration in flight.
    in_flight: bool,
    /// Aborted while in flight: dropped (and its blocks freed) when its iteration is done.
    aborted: bool,
    /// The scheduling round it arrived in.
    arrival: u64,
}

/// An iteration in flight.
struct InFlight<B: Backend> {
    kind: StepKind,
    budget: u32,
    scheduled: Vec<Scheduled>,
    /// The sequences whose logits come back, in row order.
    sampled: Vec<RequestId>,
    pending: B::Pending,
    start: Instant,
    host: Duration,
    predicted: Option<Duration>,
}

/// An iteration planned and built, about to be launched.
struct Prepared {
    /// Its lane's index.
    index: usize,
    plan: LanePlan,
    input: StepInput,
    /// The sequences whose logits come back, in row order.
    sampled: Vec<RequestId>,
    how: LogitsReadback,
    /// When preparing it began, and its share of the planning.
    launching: Instant,
    planning: Duration,
}

/// A lane of the engine: a backend phase and the iteration it runs.
struct LaneSlot<B: Backend> {
    lane: Lane,
    phase: B::Phase,
    in_flight: Option<InFlight<B>>,
    /// The budget of its latest iteration.
    budget: u32,
}

/// The scheduler of `schedule`, for a device of `sm_count` SMs.
fn scheduler(limits: SchedulerConfig, schedule: Schedule, sm_count: u32) -> Result<Box<dyn Scheduler>> {
    Ok(match schedule {
        Schedule::Chunked => Box::new(ChunkedScheduler::new(limits)?),
        Schedule::Nexus(split) => Box::new(NexusScheduler::new(limits, split, sm_count)?),
        Schedule::NexusControlled(control) => {
            let NexusControl { cost, controller, prefill_aging, prefill_tokens, prefill_packing } = *control;
            // The fixed share is never used: the controller gives every split.
            let prefill_sms = (sm_count / 2).max(1);
            let split = NexusConfig { prefill_sms, prefill_aging, prefill_tokens, prefill_packing };
            let controller = Controller::new(cost, controller)?;
            Box::new(NexusScheduler::new(limits, split, sm_count)?.with_controller(controller, sm_count)?)
        }
    })
}

/// `scheduler`'s lanes, each with a backend phase warmed up at every budget it may get
/// ([`LlamaModel::warm_up`]: the decode steps recorded for every batch size up to
/// `max_num_seqs`, the prefill kernels loaded).
fn lanes<B: Backend>(
    backend: &B,
    model: &LlamaModel<B>,
    cache: &mut KvCache<B>,
    scheduler: &dyn Scheduler,
) -> Result<Vec<LaneSlot<B>>> {
    let sm_count = backend.sm_count();
    let mut lanes = Vec::new();
    for &lane in scheduler.lanes() {
        let mut phase = backend.new_phase()?;
        let kind = if lane == Lane::Prefill { StepKind::Prefill } else { StepKind::Decode };
        let budgets = scheduler.budgets(lane, sm_count);
        model.warm_up(backend, &mut phase, cache, kind, scheduler.config().max_num_seqs, &budgets)?;
        // One lane's warm-up at a time: each may use every SM.
        backend.synchronize()?;
        lanes.push(LaneSlot { lane, phase, in_flight: None, budget: sm_count });
    }
    Ok(lanes)
}

/// Continuous batching over one model (see the module documentation).
pub struct Engine<B: Backend> {
    backend: B,
    model: LlamaModel<B>,
    cache: KvCache<B>,
    blocks: BlockManager,
    scheduler: Box<dyn Scheduler>,
    lanes: Vec<LaneSlot<B>>,
    eos_token_ids: Vec<u32>,
    seqs: HashMap<RequestId, Sequence>,
    /// Sequences holding blocks, oldest first.
    running: Vec<RequestId>,
    /// Sequences without blocks, in admission order.
    waiting: VecDeque<RequestId>,
    preemptions: u64,
    /// Scheduling rounds so far (plans asked for): the clock of requests' ages.
    round: u64,
    epoch: Instant,
    /// Iterations done since the timeline was last taken, when one is kept.
    timeline: Option<Vec<Iteration>>,
}

impl<B: Backend> std::fmt::Debug for Engine<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("scheduler", &self.scheduler)
            .field("running", &self.running.len())
            .field("waiting", &self.waiting.len())
            .field("free_blocks", &self.blocks.num_free_blocks())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Engine<B> {
    /// An engine over `model`, whose KV cache it allocates on `backend`; `eos_token_ids` end a
    /// request unless it ignores them. Each of the schedule's lanes gets a backend phase, warmed
    /// up here at every budget it may get (decode steps recorded for every batch size up to
    /// `max_num_seqs`, prefill kernels loaded), so that no request waits for that.
    pub fn new(backend: B, model: LlamaModel<B>, eos_token_ids: Vec<u32>, config: EngineConfig) -> Result<Self> {
        let scheduler = scheduler(config.scheduler, config.schedule, backend.sm_count())?;
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
        let lanes = lanes(&backend, &model, &mut cache, scheduler.as_ref())?;
        let epoch = backend.now();
        Ok(Engine {
            backend,
            model,
            cache,
            blocks,
            scheduler,
            lanes,
            eos_token_ids,
            seqs: HashMap::new(),
            running: Vec::new(),
            waiting: VecDeque::new(),
            preemptions: 0,
            round: 0,
            epoch,
            timeline: None,
        })
    }

    /// Runs the engine with another schedule from now on (same limits), making and warming up
    /// its lanes: only while no request is queued or running, so that `nexus bench` can compare
    /// schedules on one engine.
    pub fn set_schedule(&mut self, schedule: Schedule) -> Result<()> {
        if self.has_unfinished() {
            return Err(Error::invalid("the schedule changes only while no request is queued or running"));
        }
        let scheduler = scheduler(self.scheduler.config(), schedule, self.backend.sm_count())?;
        // The old lanes' phases (and their recordings) go first, so that both sets never hold
        // memory at once.
        self.lanes.clear();
        self.lanes = lanes(&self.backend, &self.model, &mut self.cache, scheduler.as_ref())?;
        self.scheduler = scheduler;
        Ok(())
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
        let seq = Sequence {
            tokens: prompt,
            computed: 0,
            generated: 0,
            options,
            sampler,
            in_flight: false,
            aborted: false,
            arrival: self.round,
        };
        self.seqs.insert(id, seq);
        self.waiting.push_back(id);
        Ok(())
    }

    /// Drops request `id` (a client went away): it produces no more events, and its blocks are
    /// freed at once, or when its iteration in flight is done. Returns whether it existed.
    pub fn abort(&mut self, id: RequestId) -> bool {
        match self.seqs.get_mut(&id) {
            None => false,
            Some(seq) if seq.aborted => false,
            Some(seq) if seq.in_flight => {
                seq.aborted = true;
                true
            }
            Some(_) => {
                self.drop_sequence(id);
                true
            }
        }
    }

    /// Forgets sequence `id` and frees its blocks.
    fn drop_sequence(&mut self, id: RequestId) {
        self.seqs.remove(&id);
        self.blocks.free(id);
        self.running.retain(|&r| r != id);
        self.waiting.retain(|&r| r != id);
    }

    /// Whether any request is queued or running (or an iteration in flight still holds an
    /// aborted one's blocks).
    pub fn has_unfinished(&self) -> bool {
        !self.seqs.is_empty()
    }

    /// Requests holding KV blocks.
    pub fn num_running(&self) -> usize {
        self.running.iter().filter(|id| !self.seqs[*id].aborted).count()
    }

    /// Requests waiting for admission.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// The requests waiting for admission, in the order they will be admitted.
    pub fn waiting_requests(&self) -> impl Iterator<Item = RequestId> + '_ {
        self.waiting.iter().copied()
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

    /// The backend the model runs on.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The scheduler's lanes, with the budget of each one's iteration in flight (or of its
    /// latest one), in SMs.
    pub fn lane_budgets(&self) -> Vec<(Lane, u32)> {
        self.lanes.iter().map(|l| (l.lane, l.in_flight.as_ref().map_or(l.budget, |f| f.budget))).collect()
    }

    /// When the engine started: the origin of its [`Iteration`] times.
    pub fn epoch(&self) -> Instant {
        self.epoch
    }

    /// Starts (or stops and drops) keeping a timeline of the iterations ([`Engine::take_timeline`]).
    pub fn keep_timeline(&mut self, keep: bool) {
        self.timeline = keep.then(Vec::new);
    }

    /// The iterations done since the timeline was last taken (none if it is not kept).
    pub fn take_timeline(&mut self) -> Vec<Iteration> {
        self.timeline.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Launches what the scheduler plans for the idle lanes, waits until the first iteration in
    /// flight is done, and returns its events: empty when nothing can run. An iteration that
    /// fails (on the device, or in reading its results) fails its requests alone:
    /// [`EngineEvent::Failed`] for each, the others go on. `Err` is left for what is wrong with
    /// the engine itself (a plan that breaks its own limits).
    pub fn step(&mut self) -> Result<Vec<EngineEvent>> {
        let mut events = self.launch_idle(|_| {})?;
        events.extend(self.finish_one());
        Ok(events)
    }

    /// The first half of [`Engine::step`]: plans iterations for the idle lanes, calls `planned`
    /// once their requests are admitted and hold their blocks (so that what it reads of the
    /// engine — running, waiting, KV usage — counts them), launches them, and returns the
    /// failures of those that could not be launched. (A backend that computes as it launches, the
    /// CPU one, spends the step's time in the launch.)
    pub fn launch_idle(&mut self, planned: impl FnOnce(&Self)) -> Result<Vec<EngineEvent>> {
        self.launch(planned)
    }

    /// The second half of [`Engine::step`]: waits until the first iteration in flight is done and
    /// returns its events (none when no iteration is in flight).
    pub fn finish_one(&mut self) -> Vec<EngineEvent> {
        let mut events = Vec::new();
        if let Some(lane) = self.wait_for_a_lane(&mut events) {
            self.complete(lane, &mut events);
        }
        events
    }

    /// Plans and launches iterations on the idle lanes (see [`Engine::launch_idle`]); returns the
    /// failures of those that could not be launched.
    fn launch(&mut self, planned: impl FnOnce(&Self)) -> Result<Vec<EngineEvent>> {
        let planning = self.backend.now();
        self.round += 1;
        let state = |id: &RequestId| {
            let s = &self.seqs[id];
            SeqState { id: *id, uncached: s.tokens.len() - s.computed, age: self.round - s.arrival }
        };
        let idle: Vec<SeqState> = self.running.iter().filter(|id| !self.seqs[*id].in_flight).map(state).collect();
        let waiting: Vec<SeqState> = self.waiting.iter().map(state).collect();
        let busy: Vec<Option<u32>> = self.lanes.iter().map(|l| l.in_flight.as_ref().map(|f| f.budget)).collect();
        let view = SchedulerView {
            idle: &idle,
            waiting: &waiting,
            num_running: self.running.len(),
            blocks: &self.blocks,
            sm_count: self.backend.sm_count(),
            busy: &busy,
            resizable: self.backend.resizes_in_flight(),
        };
        let plan = self.scheduler.plan(&view);
        self.resize(&plan.resized)?;

        // Preempted sequences go back to the front of the queue, oldest first: the plan lists them
        // newest first, and each goes in front of the one before.
        for &id in &plan.preempted {
            self.blocks.free(id);
            self.running.retain(|&r| r != id);
            if let Some(s) = self.seqs.get_mut(&id) {
                s.computed = 0;
            }
            self.waiting.push_front(id);
            self.preemptions += 1;
        }
        self.waiting.retain(|id| !plan.admitted.contains(id));
        self.running.extend(&plan.admitted);
        let planning = self.backend.now().saturating_duration_since(planning) / plan.lanes.len().max(1) as u32;
        let mut prepared: Vec<Prepared> = Vec::with_capacity(plan.lanes.len());
        let mut broken = None;
        for lane_plan in plan.lanes {
            let budgets: u32 = prepared.iter().map(|p| p.plan.budget).sum();
            match self.prepare_lane(lane_plan, planning, budgets) {
                Ok(lane) => prepared.push(lane),
                Err(e) => {
                    broken = Some(e);
                    break;
                }
            }
        }
        planned(self);
        let mut failures = Vec::new();
        // What was prepared holds its sequences in flight: it is launched even when a later
        // plan was broken.
        for lane in prepared {
            self.launch_lane(lane, &mut failures);
        }
        match broken {
            Some(e) => Err(e),
            None => Ok(failures),
        }
    }

    /// Gives the lanes' iterations in flight the budgets `resized` says, shrinking ones first,
    /// checking that the budgets in flight never add up to more than the SMs.
    fn resize(&mut self, resized: &[(Lane, u32)]) -> Result<()> {
        let sm_count = self.backend.sm_count();
        let mut order: Vec<(usize, u32)> = Vec::with_capacity(resized.len());
        for &(lane, sms) in resized {
            let Some(index) = self.lanes.iter().position(|l| l.lane == lane && l.in_flight.is_some()) else {
                return Err(Error::invalid(format!("the scheduler resized lane {}, which is idle", lane.name())));
            };
            order.push((index, sms));
        }
        let budget = |lanes: &[LaneSlot<B>], i: usize| lanes[i].in_flight.as_ref().map_or(0, |f| f.budget);
        order.sort_by_key(|&(i, sms)| sms > budget(&self.lanes, i));
        for (index, sms) in order {
            let others: u32 = (0..self.lanes.len()).filter(|&i| i != index).map(|i| budget(&self.lanes, i)).sum();
            if sms == 0 || others + sms > sm_count {
                return Err(Error::invalid(format!(
                    "the scheduler resized lane {} to {sms} SMs with {others} of {sm_count} in flight beside it",
                    self.lanes[index].lane.name()
                )));
            }
            let slot = &mut self.lanes[index];
            self.backend.resize_in_flight(&slot.phase, sms)?;
            if let Some(flight) = slot.in_flight.as_mut() {
                flight.budget = sms;
            }
            slot.budget = sms;
        }
        Ok(())
    }

    /// Builds `plan`'s step (its sequences' slots taken, the sequences in flight), checking that
    /// its lane is idle and that its budget fits next to those in flight and the `prepared` ones.
    fn prepare_lane(&mut self, plan: LanePlan, planning: Duration, prepared: u32) -> Result<Prepared> {
        let launching = self.backend.now();
        let sm_count = self.backend.sm_count();
        let in_flight: u32 =
            prepared + self.lanes.iter().filter_map(|l| l.in_flight.as_ref().map(|f| f.budget)).sum::<u32>();
        let Some(index) = self.lanes.iter().position(|l| l.lane == plan.lane && l.in_flight.is_none()) else {
            return Err(Error::invalid(format!("the scheduler planned for lane {}, which is busy", plan.lane.name())));
        };
        if plan.budget == 0 || in_flight + plan.budget > sm_count {
            return Err(Error::invalid(format!(
                "the scheduler gave {} SMs to lane {} with {in_flight} of {sm_count} in flight",
                plan.budget,
                plan.lane.name()
            )));
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
        let sampled: Vec<RequestId> = chunks.iter().filter(|c| c.wants_logits).map(|c| c.seq).collect();
        let input = build_step(&mut self.blocks, &chunks, plan.kind)?;
        for s in &plan.scheduled {
            if let Some(seq) = self.seqs.get_mut(&s.id) {
                seq.in_flight = true;
            }
        }
        // The device picks the argmax unless some sequence needs its logits (drawing, penalties,
        // log-probabilities).
        let needs_logits = sampled.iter().any(|id| {
            let seq = &self.seqs[id];
            seq.sampler.needs_logits() || seq.options.logprobs.is_some()
        });
        let how = if needs_logits { LogitsReadback::Full } else { LogitsReadback::Argmax };
        Ok(Prepared { index, plan, input, sampled, how, launching, planning })
    }

    /// Runs the model on a prepared step in its lane's phase and starts reading its logits back;
    /// if that fails, its requests fail (pushed to `failures`).
    fn launch_lane(&mut self, prepared: Prepared, failures: &mut Vec<EngineEvent>) {
        let Prepared { index, plan, input, sampled, how, launching, planning } = prepared;
        let slot = &mut self.lanes[index];
        let launched = self.backend.set_budget(&mut slot.phase, plan.budget).and_then(|()| {
            let logits = self.model.forward(&self.backend, &slot.phase, &mut self.cache, &input)?;
            self.backend.read_logits(&slot.phase, logits, how)
        });
        match launched {
            Ok(pending) => {
                slot.budget = plan.budget;
                slot.in_flight = Some(InFlight {
                    kind: plan.kind,
                    budget: plan.budget,
                    scheduled: plan.scheduled,
                    sampled,
                    pending,
                    start: launching,
                    host: planning + self.backend.now().saturating_duration_since(launching),
                    predicted: plan.predicted,
                });
            }
            Err(e) => failures.extend(self.fail(&plan.scheduled, &e)),
        }
    }

    /// Waits until an iteration in flight is done, the earliest launched first; returns its lane,
    /// or `None` when none is in flight any more (an iteration that failed on the device adds its
    /// failures to `events`).
    fn wait_for_a_lane(&mut self, events: &mut Vec<EngineEvent>) -> Option<usize> {
        loop {
            let mut order: Vec<(Instant, usize)> =
                self.lanes.iter().enumerate().filter_map(|(i, l)| l.in_flight.as_ref().map(|f| (f.start, i))).collect();
            if order.is_empty() {
                return None;
            }
            order.sort();
            for &(_, i) in &order {
                let ready = self.lanes[i].in_flight.as_ref().map(|f| self.backend.is_ready(&f.pending));
                match ready {
                    Some(Ok(true)) => return Some(i),
                    Some(Err(e)) => {
                        let scheduled = self.lanes[i].in_flight.take().map(|f| f.scheduled).unwrap_or_default();
                        events.extend(self.fail(&scheduled, &e));
                    }
                    _ => {}
                }
            }
            self.backend.idle();
        }
    }

    /// Reads the logits of lane `index`'s iteration (which is done), samples, and reports into
    /// `events`.
    fn complete(&mut self, index: usize, events: &mut Vec<EngineEvent>) {
        let seen = self.backend.now();
        let slot = &mut self.lanes[index];
        let Some(flight) = slot.in_flight.take() else { return };
        let logits = match self.backend.take_logits(&slot.phase, flight.pending) {
            Ok(logits) => logits,
            Err(e) => {
                events.extend(self.fail(&flight.scheduled, &e));
                return;
            }
        };
        self.scheduler.observe(slot.lane, seen - flight.start);
        for s in &flight.scheduled {
            let Some(seq) = self.seqs.get_mut(&s.id) else { continue };
            seq.in_flight = false;
            seq.computed += s.tokens;
            if seq.aborted {
                self.drop_sequence(s.id);
            }
        }
        for (row, &id) in flight.sampled.iter().enumerate() {
            let Some(seq) = self.seqs.get_mut(&id) else { continue };
            let picked = match &logits {
                HostLogits::Argmax(ids) if ids[row] == ARGMAX_NONE => Err(Error::invalid("no maximum")),
                HostLogits::Argmax(ids) => Ok((ids[row], None)),
                HostLogits::Full(host) => {
                    let vocab = host.shape[1];
                    let logits = &host.data[row * vocab..][..vocab];
                    let sampled = if logits.iter().any(|v| v.is_nan()) {
                        Err(Error::invalid("NaN"))
                    } else {
                        seq.sampler.sample(logits)
                    };
                    sampled.map(|token| {
                        (token, seq.options.logprobs.map(|top| Box::new(token_logprobs(logits, token, top))))
                    })
                }
            };
            let (token, logprobs) = match picked {
                Ok(picked) => picked,
                Err(e) => {
                    let message = format!("the model's logits hold no token to pick ({})", e.message());
                    self.drop_sequence(id);
                    events.push(EngineEvent::Failed { id, message });
                    continue;
                }
            };
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
                self.drop_sequence(id);
                events.push(EngineEvent::Finished { id, reason });
            }
        }
        if let Some(timeline) = &mut self.timeline {
            timeline.push(Iteration {
                lane: self.lanes[index].lane,
                kind: flight.kind,
                budget: flight.budget,
                seqs: flight.scheduled.len(),
                tokens: flight.scheduled.iter().map(|s| s.tokens).sum(),
                start: flight.start - self.epoch,
                end: seen - self.epoch,
                host: flight.host + self.backend.now().saturating_duration_since(seen),
                predicted: flight.predicted,
            });
        }
    }

    /// Drops the sequences of an iteration that failed with `error`, once the device is done
    /// with whatever part of it was launched; returns their failures (none for aborted ones).
    fn fail(&mut self, scheduled: &[Scheduled], error: &Error) -> Vec<EngineEvent> {
        // Best effort: the device may be in error, and the blocks are freed either way.
        let _ = self.backend.synchronize();
        let mut failures = Vec::new();
        for s in scheduled {
            if self.seqs.get(&s.id).is_some_and(|seq| !seq.aborted) {
                failures.push(EngineEvent::Failed { id: s.id, message: format!("the step failed: {error}") });
            }
            self.drop_sequence(s.id);
        }
        failures
    }
}
