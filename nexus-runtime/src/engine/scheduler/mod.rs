//! Batch planning: which sequences advance in each lane's next iteration, by how many tokens, on
//! how many SMs, and which are preempted to make room. Planning only reads the KV-cache
//! bookkeeping; the engine applies the plan (it owns the sequences, the cache, the model and the
//! lanes).
//!
//! Two [`Scheduler`]s:
//!
//! - [`ChunkedScheduler`], the baseline every peer uses (vLLM's chunked prefill): one lane,
//!   [`Lane::Mixed`], on every SM, running one mixed batch per iteration under a token budget —
//!   running decodes first, then the chunks of prompts already started, then new prompts (first
//!   come, first served) while sequences and blocks allow.
//! - [`NexusScheduler`]: two lanes at once on disjoint SMs, [`Lane::Decode`] (the running
//!   sequences, first come first served) and [`Lane::Prefill`] (prompt chunks), each starting its
//!   next iteration as soon as its last one is done, with the budget the split gives it then.
//!
//! In both, when the cache cannot hold the decodes' next tokens, the most recently arrived idle
//! sequences are preempted (their blocks freed; the engine recomputes them later from their
//! tokens). A sequence is in at most one lane at a time, and the budgets of the iterations in
//! flight never add up to more than the SM count.

mod chunked;
pub mod controller;
mod nexus;

pub use chunked::ChunkedScheduler;
pub use nexus::{NexusConfig, NexusScheduler, PrefillPacking, PrefillTokens};

use std::time::Duration;

use crate::engine::kv_cache::{BlockManager, SeqId};
use crate::model::backend::StepKind;
use crate::{Error, Result};

/// Limits of one iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// The most sequences running (holding KV blocks) at once.
    pub max_num_seqs: usize,
    /// The most tokens (decode tokens plus prompt-chunk tokens) in one iteration of a lane.
    pub max_num_batched_tokens: usize,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig { max_num_seqs: 256, max_num_batched_tokens: 8192 }
    }
}

impl SchedulerConfig {
    /// Checks that both limits are positive.
    pub fn validate(&self) -> Result<()> {
        if self.max_num_seqs == 0 || self.max_num_batched_tokens == 0 {
            return Err(Error::invalid("max_num_seqs and max_num_batched_tokens must be at least 1"));
        }
        Ok(())
    }
}

/// A lane of execution: one stream with its own budget, running one iteration at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Lane {
    /// Decodes and prompt chunks in one batch, on every SM ([`ChunkedScheduler`]).
    Mixed,
    /// Prompt chunks ([`NexusScheduler`]).
    Prefill,
    /// One token of each running sequence ([`NexusScheduler`]).
    Decode,
}

impl Lane {
    /// The lane's name in metrics and timelines.
    pub fn name(self) -> &'static str {
        match self {
            Lane::Mixed => "mixed",
            Lane::Prefill => "prefill",
            Lane::Decode => "decode",
        }
    }
}

/// What the scheduler needs to know of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqState {
    pub id: SeqId,
    /// Tokens not yet in the KV cache: 1 for a sequence in its decode phase (the last sampled
    /// token), more while its prompt (or, after preemption, its whole text) is being prefilled.
    pub uncached: usize,
    /// Scheduling rounds (the engine's plans) since the request arrived: its age.
    pub age: u64,
}

/// What the scheduler sees when it plans.
#[derive(Clone, Copy, Debug)]
pub struct SchedulerView<'a> {
    /// Sequences holding blocks and in no lane's iteration, oldest first: the only ones that may
    /// be scheduled or preempted.
    pub idle: &'a [SeqState],
    /// Sequences without blocks, in the order they should be admitted.
    pub waiting: &'a [SeqState],
    /// Sequences holding blocks, idle or in flight.
    pub num_running: usize,
    pub blocks: &'a BlockManager,
    /// The SMs budgets are counted out of.
    pub sm_count: u32,
    /// Each of the scheduler's lanes ([`Scheduler::lanes`], same order): the budget of its
    /// iteration in flight, or `None` when it is idle.
    pub busy: &'a [Option<u32>],
    /// Whether the backend can give an iteration in flight a new budget
    /// ([`Backend::resize_in_flight`](crate::model::backend::Backend::resize_in_flight)).
    pub resizable: bool,
}

impl SchedulerView<'_> {
    /// The budget `lane` has in flight, if any (`lanes` is the scheduler's).
    fn lane_busy(&self, lanes: &[Lane], lane: Lane) -> Option<u32> {
        lanes.iter().position(|&l| l == lane).and_then(|i| self.busy.get(i).copied().flatten())
    }
}

/// One sequence's share of a planned iteration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    /// How many of its uncached tokens run in this iteration.
    pub tokens: usize,
}

/// One lane's next iteration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LanePlan {
    pub lane: Lane,
    /// What the iteration computes: the backend chooses its kernels from this.
    pub kind: StepKind,
    /// Its CTA budget, in SMs.
    pub budget: u32,
    /// Sequences that advance, those already running first, then newly admitted ones.
    pub scheduled: Vec<Scheduled>,
    /// How long the scheduler's cost model predicts it takes, if it has one.
    pub predicted: Option<Duration>,
}

/// A scheduling decision: preemptions, admissions, and the iterations of idle lanes to launch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Sequences to preempt before launching (their blocks freed, recomputed later).
    pub preempted: Vec<SeqId>,
    /// The waiting sequences admitted (they appear in the lanes' `scheduled`), in the order they
    /// start running.
    pub admitted: Vec<SeqId>,
    /// Iterations to launch, in the order to launch them.
    pub lanes: Vec<LanePlan>,
    /// Lanes whose iteration in flight takes a new budget before those launch (only when the
    /// view says the backend can); with the launches, the budgets add up to at most the SMs.
    pub resized: Vec<(Lane, u32)>,
}

/// Plans the iterations of an engine's lanes.
pub trait Scheduler: std::fmt::Debug + Send {
    /// The lanes, each of which the engine gives a phase of its own.
    fn lanes(&self) -> &'static [Lane];
    /// Every budget `lane`'s iterations may get on a device of `sm_count` SMs, so that the engine
    /// can prepare them (record decode steps at each) before serving.
    fn budgets(&self, lane: Lane, sm_count: u32) -> Vec<u32>;
    /// The iterations to launch now on idle lanes (none, if nothing can run).
    fn plan(&mut self, view: &SchedulerView<'_>) -> Plan;
    /// The limits of one iteration.
    fn config(&self) -> SchedulerConfig;
    /// `lane`'s iteration of the last plan that gave it one took `took`, from launch to seen
    /// done (a scheduler that predicts iterations can learn from it).
    fn observe(&mut self, lane: Lane, took: Duration) {
        let _ = (lane, took);
    }
}

/// Schedules one token of each idle decoding sequence (`uncached == 1`) of `alive`, oldest first,
/// within `budget` tokens, taking the blocks they need from `free`. When the blocks run out, the
/// newest sequences of `alive` are preempted (removed, their blocks added to `free`, their ids
/// pushed to `preempted`) until the older ones fit.
fn schedule_decodes(
    alive: &mut Vec<SeqState>,
    budget: &mut usize,
    free: &mut usize,
    blocks: &BlockManager,
    preempted: &mut Vec<SeqId>,
) -> Vec<Scheduled> {
    let mut scheduled = Vec::new();
    let mut i = 0;
    while i < alive.len() {
        let seq = alive[i];
        if seq.uncached != 1 {
            i += 1;
            continue;
        }
        if *budget == 0 {
            break;
        }
        let need = blocks.blocks_needed(seq.id, 1);
        while need > *free && alive.len() > i + 1 {
            // Preempt the newest other sequence and take its blocks back. (Victims come from
            // behind `i`, so none of them is scheduled yet.)
            let victim = alive.pop().expect("more than i + 1 sequences");
            *free += blocks.get(victim.id).map_or(0, |s| s.blocks.len());
            preempted.push(victim.id);
        }
        if need > *free {
            // Not even this one fits: it is the newest left, so it goes too.
            *free += blocks.get(seq.id).map_or(0, |s| s.blocks.len());
            preempted.push(seq.id);
            alive.remove(i);
            continue;
        }
        *free -= need;
        *budget -= 1;
        scheduled.push(Scheduled { id: seq.id, tokens: 1 });
        i += 1;
    }
    scheduled
}

/// Which prompt goes first when the prefill budget cannot hold them all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PromptOrder {
    /// The prompts already started (oldest first), then new ones in queue order.
    FirstCome,
    /// Shortest remaining prompt first, with aging: the lowest `uncached − aging × age` first
    /// (ties to the older), so that a long prompt overtakes every prompt that arrived more than
    /// `(its length − theirs) / aging` rounds after it and none starves; packed as `packing` says.
    ShortestFirst { aging: u64, packing: PrefillPacking },
}

/// Schedules chunks of the prompts being prefilled (`uncached > 1`) in `alive` and admits new
/// prompts from `waiting` (unless `admit` is false) while `room` sequences may still start, in
/// `order`, within `budget` tokens and the blocks of `free`. Returns the chunks and the admitted
/// ids. A prompt that does not fit ends the plan (later ones wait rather than overtake it, which
/// would starve it), as does one that does not fit whole beside others with
/// [`PrefillPacking::WholeFirst`].
#[allow(clippy::too_many_arguments)]
fn schedule_prompts(
    alive: &[SeqState],
    waiting: &[SeqState],
    room: usize,
    admit: bool,
    order: PromptOrder,
    budget: &mut usize,
    free: &mut usize,
    blocks: &BlockManager,
) -> (Vec<Scheduled>, Vec<SeqId>) {
    let started = alive.iter().filter(|s| s.uncached > 1).map(|s| (s, false));
    let new = waiting.iter().take(if admit { room } else { 0 }).map(|s| (s, true));
    let mut candidates: Vec<(&SeqState, bool)> = started.chain(new).collect();
    if let PromptOrder::ShortestFirst { aging, .. } = order {
        let score = |s: &SeqState| s.uncached as i128 - (aging as i128) * (s.age as i128);
        candidates.sort_by(|(a, _), (b, _)| score(a).cmp(&score(b)).then(b.age.cmp(&a.age)).then(a.id.cmp(&b.id)));
    }
    let whole_first = matches!(order, PromptOrder::ShortestFirst { packing: PrefillPacking::WholeFirst, .. });
    let mut scheduled = Vec::new();
    let mut admitted = Vec::new();
    for (seq, is_new) in candidates {
        if *budget == 0 {
            break;
        }
        let fits_whole = || seq.uncached <= *budget && blocks.blocks_needed(seq.id, seq.uncached) <= *free;
        if whole_first && !scheduled.is_empty() && !fits_whole() {
            break;
        }
        let tokens = fit(seq, *budget, free, blocks);
        if tokens == 0 {
            break;
        }
        *budget -= tokens;
        scheduled.push(Scheduled { id: seq.id, tokens });
        if is_new {
            admitted.push(seq.id);
        }
    }
    (scheduled, admitted)
}

/// The most of `seq`'s uncached tokens that fit `budget` and the free blocks (the room left in
/// its last block plus whole free blocks); takes their blocks from `free`.
fn fit(seq: &SeqState, budget: usize, free: &mut usize, blocks: &BlockManager) -> usize {
    let block_size = blocks.block_size();
    let room = blocks.get(seq.id).map_or(0, |s| s.blocks.len() * block_size - s.len);
    let tokens = seq.uncached.min(budget).min(room + *free * block_size);
    *free -= blocks.blocks_needed(seq.id, tokens);
    tokens
}

/// Preempts the newest of `alive` (when more than one is left) when nothing could be scheduled
/// and no lane is in flight: every idle sequence then waits for blocks only idle sequences hold,
/// and the newest gives its blocks up so that the older ones go on (a lone sequence always fits:
/// the engine admits no request larger than the cache). Returns whether it preempted.
fn preempt_if_stuck(
    alive: &mut Vec<SeqState>,
    free: &mut usize,
    blocks: &BlockManager,
    preempted: &mut Vec<SeqId>,
) -> bool {
    if alive.len() <= 1 {
        return false;
    }
    let victim = alive.pop().expect("more than one sequence");
    *free += blocks.get(victim.id).map_or(0, |s| s.blocks.len());
    preempted.push(victim.id);
    true
}
