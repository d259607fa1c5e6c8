//! The Nexus scheduler: prefill and decode in two lanes at once, on disjoint SMs.

use std::time::Duration;

use super::controller::Controller;
use super::{
    Lane, LanePlan, Plan, PromptOrder, Scheduler, SchedulerConfig, SchedulerView, SeqState, preempt_if_stuck,
    schedule_decodes, schedule_prompts,
};
use crate::engine::cost_model::IterationWork;
use crate::engine::kv_cache::{BlockManager, SeqId};
use crate::model::backend::StepKind;
use crate::{Error, Result};

/// How the Nexus scheduler splits the SMs and orders prompts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NexusConfig {
    /// SMs of the prefill lane while both lanes have work; the decode lane gets the rest. A lane
    /// with no work gives all of its SMs to the other.
    pub prefill_sms: u32,
    /// The prefill queue runs the shortest remaining prompt first, each prompt's remaining
    /// tokens lowered by this many per scheduling round it has waited (the paper's γ, which it
    /// gives as 15 without a unit): a prompt `n` tokens longer than another overtakes it after
    /// `n / aging` rounds, so none starves. 0: shortest first, without aging.
    pub prefill_aging: u64,
    /// The most prompt tokens of one prefill iteration, if fewer than the scheduler's
    /// `max_num_batched_tokens`: shorter iterations let a prompt that arrives during one start
    /// sooner (decode does not wait for them, as it does in a mixed batch).
    pub prefill_tokens: Option<PrefillTokens>,
    /// Whether a prefill iteration that finishes prompts also takes a chunk of a longer one.
    pub prefill_packing: PrefillPacking,
}

/// How a prefill iteration takes the prompts of its queue, in the queue's order (shortest
/// remaining first, with aging).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillPacking {
    /// Whole prompts while they fit; the first one that does not is chunked only into an
    /// iteration that has nothing else. A prompt gets its first token when the iteration that
    /// finishes it ends, so a chunk of a longer prompt beside it delays it by the chunk's time,
    /// while that chunk in an iteration of its own costs the longer prompt one more launch and
    /// weight read (~10 ms on Qwen2.5-14B, against ~60 ms per 1000 prompt tokens on 107 of an
    /// H100's SMs). Against `Fill` on the H200, on the same traces of four workloads at two
    /// rates each (`bench-results/nexus-vs-chunked-h200.md`, fifteenth round): mean TTFT
    /// 10-25% lower, p95 TTFT from 17% lower to 7% higher, p99 TTFT up to 32% higher (long
    /// prompts wait behind more short ones), TBT within a few percent.
    #[default]
    WholeFirst,
    /// Up to the iteration's token limit, the last prompt chunked to fill it (as a mixed batch
    /// of chunked prefill takes its prompts).
    Fill,
}

/// The most prompt tokens of one prefill iteration: `tokens`, or `backlog` once the prompts
/// waiting hold at least that many. Long iterations prefill more tokens per second (their GEMMs
/// have more tiles per launch: on the H200, 8192-token iterations 16% more than 2048-token ones on
/// Qwen2.5-3B, 6-7% on Llama-3.1-8B), short ones let a prompt that arrives during one start
/// sooner. While a backlog waits, the lane's rate is what limits the prompts' wait, so the long
/// iterations drain it; while the queue is short, the short ones keep new prompts' wait short.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PrefillTokens {
    /// The limit while fewer prompt tokens wait than `backlog` (always, without one); >= 1.
    pub tokens: usize,
    /// The larger limit of a backlog, > `tokens`.
    pub backlog: Option<usize>,
}

impl PrefillTokens {
    /// At most `tokens` per iteration, whatever waits.
    pub const fn fixed(tokens: usize) -> Self {
        PrefillTokens { tokens, backlog: None }
    }

    /// Fails unless `tokens` is at least 1 and a backlog limit larger than it.
    pub fn validate(&self) -> Result<()> {
        if self.tokens == 0 {
            return Err(Error::invalid("a prefill iteration must take at least one prompt token"));
        }
        if let Some(backlog) = self.backlog.filter(|&b| b <= self.tokens) {
            return Err(Error::invalid(format!(
                "the prefill iteration limit with a backlog ({backlog}) must be larger than without ({})",
                self.tokens
            )));
        }
        Ok(())
    }

    /// The limit of the next iteration while `waiting()` prompt tokens wait (counted only with
    /// a backlog limit).
    pub fn limit(&self, waiting: impl FnOnce() -> usize) -> usize {
        match self.backlog {
            Some(backlog) if waiting() >= backlog => backlog,
            _ => self.tokens,
        }
    }
}

impl NexusConfig {
    /// The paper's aging, 15 tokens per round.
    pub const DEFAULT_PREFILL_AGING: u64 = 15;

    /// A fixed split of `prefill_sms` for prefill, with the default aging.
    pub fn fixed(prefill_sms: u32) -> Self {
        NexusConfig {
            prefill_sms,
            prefill_aging: Self::DEFAULT_PREFILL_AGING,
            prefill_tokens: None,
            prefill_packing: PrefillPacking::default(),
        }
    }
}

/// Two lanes at once (see the module documentation), split by a fixed policy: while both have
/// work, prefill iterations run on [`NexusConfig::prefill_sms`] SMs and decode iterations on the
/// rest; a lane with no work leaves every SM to the other. A lane starting an iteration never
/// gets more than what the other lane's iteration in flight leaves, so the split is real: it
/// waits instead, unless the backend can resize the iteration in flight
/// ([`SchedulerView::resizable`]): then both take the split when one starts, and a lane in
/// flight takes every SM when the other has no work. The decode lane runs every idle decoding sequence, oldest first (preempting
/// the newest idle sequences when blocks run out); the prefill lane runs prompts, started or new,
/// shortest remaining first with aging ([`NexusConfig::prefill_aging`]), packed as
/// [`NexusConfig::prefill_packing`] says.
#[derive(Clone, Debug)]
pub struct NexusScheduler {
    config: SchedulerConfig,
    split: NexusConfig,
    /// Chooses the split every time a lane starts an iteration while the other has work, in
    /// place of the fixed one.
    controller: Option<Controller>,
    /// The work of each lane's latest iteration (kept with a controller only), for its decision
    /// and predictions when a lane starts next to the other's iteration in flight.
    last_prefill: IterationWork,
    last_decode: IterationWork,
    /// What the cost model predicted for each lane's iteration in flight (decode, prefill), for
    /// the controller to learn from when it is done.
    in_flight: [Option<Predicted>; 2],
}

/// A prediction of the cost model for an iteration, and where it ran.
#[derive(Clone, Copy, Debug)]
struct Predicted {
    kind: StepKind,
    budget: u32,
    /// Whether the other lane's iteration ran beside it when it was planned.
    beside: bool,
    seconds: f64,
}

/// The index of a Nexus lane in [`NexusScheduler::in_flight`].
fn lane_index(lane: Lane) -> usize {
    usize::from(lane == Lane::Prefill)
}

impl NexusScheduler {
    /// A scheduler with these limits and split, for a device of `sm_count` SMs: the prefill
    /// share must leave the decode lane at least one SM.
    pub fn new(config: SchedulerConfig, split: NexusConfig, sm_count: u32) -> Result<Self> {
        config.validate()?;
        if split.prefill_sms == 0 || split.prefill_sms >= sm_count {
            return Err(Error::invalid(format!(
                "prefill SMs must be between 1 and {} (the device has {sm_count}; decode gets the rest), not {}",
                sm_count.saturating_sub(1),
                split.prefill_sms
            )));
        }
        if let Some(tokens) = &split.prefill_tokens {
            tokens.validate()?;
        }
        Ok(NexusScheduler {
            config,
            split,
            controller: None,
            last_prefill: IterationWork::default(),
            last_decode: IterationWork::default(),
            in_flight: [None; 2],
        })
    }

    /// The same scheduler, with `controller` choosing the split (its cost model must be of a
    /// device of `sm_count` SMs).
    pub fn with_controller(mut self, controller: Controller, sm_count: u32) -> Result<Self> {
        if controller.cost().sm_count != sm_count {
            return Err(Error::invalid(format!(
                "the cost model was made for {} SMs; this device has {sm_count}",
                controller.cost().sm_count
            )));
        }
        self.controller = Some(controller);
        Ok(self)
    }

    /// Prefill's SMs while both lanes have work: the fixed split, or the controller's for the
    /// lanes' latest iterations (planned now or in flight), the decode work joined by the
    /// sequences `waiting` for the decode iteration in flight, `(1, cached)` each, with
    /// `prompts_waiting()` prompt tokens in no iteration in flight, those of the prefill iteration
    /// planned now included (counted only with a controller).
    fn prefill_share(
        &mut self,
        sms: u32,
        blocks: &BlockManager,
        waiting: impl IntoIterator<Item = (usize, usize)>,
        prompts_waiting: impl FnOnce() -> usize,
    ) -> u32 {
        let Some(controller) = &mut self.controller else { return self.split.prefill_sms };
        let decode = self.last_decode.with(waiting);
        sms - controller.split(&self.last_prefill, &decode, blocks.usage(), prompts_waiting()).decode_sms
    }

    /// Whether the latest prefill work ends sooner after the decode iteration in flight on
    /// `decode_sms` of the `sms` (counted whole, as predicted when it started) and then on `share`
    /// SMs than started now on the SMs it leaves (`false` without a controller's predictions).
    fn waits_for_decode(&self, sms: u32, share: u32, decode_sms: u32) -> bool {
        let Some(decode) = self.in_flight[lane_index(Lane::Decode)] else { return false };
        let left = sms - decode_sms;
        let now = self.predict(&self.last_prefill, left, Some(decode_sms));
        let later = self.predict(&self.last_prefill, share, Some(sms - share));
        now.zip(later).is_some_and(|(now, later)| now.as_secs_f64() > decode.seconds + later.as_secs_f64())
    }

    /// The controller's prediction of an iteration doing `work` on `budget` SMs, next to the
    /// other lane's latest iteration on `other` SMs if that runs (`None` without a controller).
    fn predict(&self, work: &IterationWork, budget: u32, other: Option<u32>) -> Option<Duration> {
        let cost = self.controller.as_ref()?.cost();
        let other_work = if work.kind == StepKind::Decode { &self.last_prefill } else { &self.last_decode };
        Some(Duration::from_secs_f64(cost.seconds_beside(work, budget, other.map(|sms| (other_work, sms)))))
    }
}

impl Scheduler for NexusScheduler {
    fn lanes(&self) -> &'static [Lane] {
        &[Lane::Decode, Lane::Prefill]
    }

    fn budgets(&self, lane: Lane, sm_count: u32) -> Vec<u32> {
        let decode: Vec<u32> = match &self.controller {
            Some(controller) => controller.config().decode_budgets(sm_count),
            None => vec![sm_count - self.split.prefill_sms, sm_count],
        };
        match lane {
            Lane::Decode => decode,
            _ => decode.iter().map(|&d| if d == sm_count { d } else { sm_count - d }).collect(),
        }
    }

    fn config(&self) -> SchedulerConfig {
        self.config
    }

    fn observe(&mut self, lane: Lane, took: Duration) {
        let Some(predicted) = self.in_flight.get_mut(lane_index(lane)).and_then(Option::take) else { return };
        if let Some(controller) = &mut self.controller {
            let Predicted { kind, budget, beside, seconds } = predicted;
            controller.observe(kind, budget, beside, seconds, took.as_secs_f64());
        }
    }

    fn plan(&mut self, view: &SchedulerView<'_>) -> Plan {
        let lanes = self.lanes();
        let sms = view.sm_count;
        let decode_busy = view.lane_busy(lanes, Lane::Decode);
        let prefill_busy = view.lane_busy(lanes, Lane::Prefill);
        let blocks = view.blocks;
        let mut plan = Plan::default();
        let mut free = blocks.num_free_blocks();
        let mut alive = view.idle.to_vec();
        // The prompt tokens waiting: the rest of the started prompts and the new ones.
        let prompt_tokens = |alive: &[SeqState]| -> usize {
            alive.iter().filter(|s| s.uncached > 1).chain(view.waiting).map(|s| s.uncached).sum()
        };
        // A lane plans only if the other's iteration in flight leaves it SMs, or can give some
        // back.
        let leaves_room = |other: Option<u32>| view.resizable || other.is_none_or(|b| b < sms);
        let mut decodes = Vec::new();
        if decode_busy.is_none() && leaves_room(prefill_busy) {
            let mut budget = self.config.max_num_batched_tokens;
            decodes = schedule_decodes(&mut alive, &mut budget, &mut free, blocks, &mut plan.preempted);
        }
        let decode_active = decode_busy.is_some() || !decodes.is_empty();
        let mut prompts = Vec::new();
        if prefill_busy.is_none() && leaves_room(decode_busy) {
            let max = self.config.max_num_batched_tokens;
            loop {
                let waiting = || prompt_tokens(&alive);
                let mut budget = self.split.prefill_tokens.map_or(max, |t| t.limit(waiting).min(max));
                let room = self.config.max_num_seqs.saturating_sub(view.num_running - plan.preempted.len());
                let admit = plan.preempted.is_empty();
                let order =
                    PromptOrder::ShortestFirst { aging: self.split.prefill_aging, packing: self.split.prefill_packing };
                let (scheduled, admitted) =
                    schedule_prompts(&alive, view.waiting, room, admit, order, &mut budget, &mut free, blocks);
                if !scheduled.is_empty() {
                    prompts = scheduled;
                    plan.admitted = admitted;
                    break;
                }
                if decode_active || !preempt_if_stuck(&mut alive, &mut free, blocks, &mut plan.preempted) {
                    break;
                }
            }
        }
        let prefill_active = prefill_busy.is_some() || !prompts.is_empty();
        let cached = |id: SeqId| blocks.get(id).map_or(0, |b| b.len);
        if self.controller.is_some() {
            if !decodes.is_empty() {
                self.last_decode =
                    IterationWork::of(StepKind::Decode, decodes.iter().map(|s| (s.tokens, cached(s.id))));
            }
            if !prompts.is_empty() {
                self.last_prefill =
                    IterationWork::of(StepKind::Prefill, prompts.iter().map(|s| (s.tokens, cached(s.id))));
            }
        }
        let share = if decode_active && prefill_active {
            // Beside a prefill iteration planned while a decode one is in flight, the next decode
            // iteration also takes the idle sequences waiting for it (prompts just done).
            let waiting = alive.iter().filter(|s| decode_busy.is_some() && s.uncached == 1);
            self.prefill_share(sms, blocks, waiting.map(|s| (1, cached(s.id))), || prompt_tokens(view.idle))
        } else {
            sms
        };
        let mut decode_budget = decode_busy;
        if !decodes.is_empty() {
            let wanted = if prefill_active { sms - share } else { sms };
            decode_budget = Some(wanted.min(sms - prefill_busy.unwrap_or(0)));
        }
        let mut prefill_budget = prefill_busy;
        if !prompts.is_empty() {
            let wanted = if decode_active { share } else { sms };
            let left = wanted.min(sms - decode_budget.unwrap_or(0));
            // A prefill iteration keeps its SMs for up to hundreds of milliseconds, so it does
            // not start on the few that a decode iteration in flight leaves (one that had its
            // SMs beside a short prompt) when waiting for that iteration and then starting on
            // its share ends sooner.
            if !view.resizable && left < share && decode_busy.is_some_and(|d| self.waits_for_decode(sms, share, d)) {
                prompts.clear();
                plan.admitted.clear();
            } else {
                prefill_budget = Some(left);
            }
        }
        // A backend that resizes iterations in flight gives both lanes the split when one of them
        // starts an iteration, and every SM to a lane in flight when the other has no work.
        let launching = !decodes.is_empty() || !prompts.is_empty();
        if view.resizable && (launching || decode_active != prefill_active) {
            let (decode_sms, prefill_sms) =
                if decode_active && prefill_active { (sms - share, share) } else { (sms, sms) };
            for (lane, busy, budget, target) in [
                (Lane::Decode, decode_busy, &mut decode_budget, decode_sms),
                (Lane::Prefill, prefill_busy, &mut prefill_budget, prefill_sms),
            ] {
                if budget.is_some() {
                    *budget = Some(target);
                }
                if busy.is_some_and(|b| b != target) {
                    plan.resized.push((lane, target));
                    // Its time no longer says what the model predicted for one budget.
                    self.in_flight[lane_index(lane)] = None;
                }
            }
        }
        let lanes = [
            (Lane::Decode, StepKind::Decode, decodes, decode_budget, prefill_budget),
            (Lane::Prefill, StepKind::Prefill, prompts, prefill_budget, decode_budget),
        ];
        for (lane, kind, scheduled, budget, other) in lanes {
            let Some(budget) = budget.filter(|_| !scheduled.is_empty()) else { continue };
            let work = if kind == StepKind::Decode { &self.last_decode } else { &self.last_prefill };
            let predicted = self.predict(work, budget, other);
            self.in_flight[lane_index(lane)] =
                predicted.map(|p| Predicted { kind, budget, beside: other.is_some(), seconds: p.as_secs_f64() });
            plan.lanes.push(LanePlan { lane, kind, budget, scheduled, predicted });
        }
        plan
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::engine::kv_cache::{BlockManager, SeqId};
    use crate::engine::scheduler::{Scheduled, SeqState};

    fn s(id: SeqId, uncached: usize) -> SeqState {
        SeqState { id, uncached, age: 0 }
    }

    fn nexus(prefill_sms: u32) -> NexusScheduler {
        NexusScheduler::new(SchedulerConfig::default(), NexusConfig::fixed(prefill_sms), 132).unwrap()
    }

    fn budgets(plan: &Plan) -> Vec<(Lane, u32)> {
        plan.lanes.iter().map(|l| (l.lane, l.budget)).collect()
    }

    #[test]
    fn both_lanes_split_the_sms_and_a_lane_alone_takes_them_all() {
        let mut blocks = BlockManager::new(100, 4).unwrap();
        blocks.append(1, 7).unwrap(); // decoding
        blocks.append(2, 4).unwrap(); // a prompt half done
        let sched = nexus(64);
        let view = |idle: &[SeqState], waiting: &[SeqState], busy: &[Option<u32>]| {
            let view =
                SchedulerView { idle, waiting, num_running: 2, blocks: &blocks, sm_count: 132, busy, resizable: false };
            sched.clone().plan(&view)
        };
        let both = view(&[s(1, 1), s(2, 16)], &[s(3, 5)], &[None, None]);
        assert_eq!(budgets(&both), vec![(Lane::Decode, 68), (Lane::Prefill, 64)]);
        assert_eq!(both.lanes[0].scheduled, vec![Scheduled { id: 1, tokens: 1 }]);
        // Shortest remaining prompt first: the new 5-token prompt before the started one.
        assert_eq!(both.lanes[1].scheduled, vec![Scheduled { id: 3, tokens: 5 }, Scheduled { id: 2, tokens: 16 }]);
        assert_eq!((both.lanes[0].kind, both.lanes[1].kind), (StepKind::Decode, StepKind::Prefill));
        assert_eq!(both.admitted, vec![3]);
        // Decode alone, prefill alone: all SMs.
        assert_eq!(budgets(&view(&[s(1, 1)], &[], &[None, None])), vec![(Lane::Decode, 132)]);
        assert_eq!(budgets(&view(&[s(2, 16)], &[], &[None, None])), vec![(Lane::Prefill, 132)]);
        // With the other lane in flight: what it leaves, and the split while both have work.
        assert_eq!(budgets(&view(&[s(1, 1)], &[], &[None, Some(64)])), vec![(Lane::Decode, 68)]);
        assert_eq!(budgets(&view(&[s(2, 16)], &[], &[Some(68), None])), vec![(Lane::Prefill, 64)]);
        // A lane that had every SM to itself makes the other wait.
        assert_eq!(view(&[s(2, 16)], &[], &[Some(132), None]), Plan::default());
        assert_eq!(view(&[s(1, 1)], &[], &[None, Some(132)]), Plan::default());
        // A decode lane in flight at its share while prefill has nothing left: prefill waits for
        // nothing and decode's next iteration (planned later) takes every SM.
        assert_eq!(view(&[], &[], &[Some(68), None]), Plan::default());
    }

    #[test]
    fn a_resizable_backend_gives_the_lane_in_flight_its_share_of_the_split() {
        let mut blocks = BlockManager::new(100, 4).unwrap();
        blocks.append(1, 7).unwrap(); // decoding
        blocks.append(2, 4).unwrap(); // a prompt half done
        let sched = nexus(64);
        let plan = |idle: &[SeqState], busy: &[Option<u32>]| {
            let view = SchedulerView {
                idle,
                waiting: &[],
                num_running: 2,
                blocks: &blocks,
                sm_count: 132,
                busy,
                resizable: true,
            };
            sched.clone().plan(&view)
        };
        // A prefill in flight on every SM and a decode ready: decode starts on its share at once,
        // and the prefill shrinks to its own.
        let both = plan(&[s(1, 1)], &[None, Some(132)]);
        assert_eq!(budgets(&both), vec![(Lane::Decode, 68)]);
        assert_eq!(both.resized, vec![(Lane::Prefill, 64)]);
        // A prefill in flight on its share with nothing to decode takes every SM; so does a decode.
        let alone = plan(&[], &[None, Some(64)]);
        assert!(alone.lanes.is_empty() && alone.resized == vec![(Lane::Prefill, 132)], "{alone:?}");
        assert_eq!(plan(&[], &[Some(68), None]).resized, vec![(Lane::Decode, 132)]);
        // A decode in flight on its share and a prompt to run: prefill starts on the rest.
        let prompt = plan(&[s(2, 16)], &[Some(68), None]);
        assert_eq!(budgets(&prompt), vec![(Lane::Prefill, 64)]);
        assert!(prompt.resized.is_empty());
        // Both in flight: nothing starts, nothing moves.
        assert_eq!(plan(&[], &[Some(68), Some(64)]), Plan::default());
    }

    #[test]
    fn a_controller_moves_the_split_with_the_batches_and_the_cache() {
        use crate::engine::cost_model::tests::llama8b_h200;
        use crate::engine::scheduler::controller::{Controller, ControllerConfig};
        let controller = Controller::new(llama8b_h200(), ControllerConfig::default()).unwrap();
        let sched = nexus(64).with_controller(controller, 132).unwrap();
        assert_eq!(sched.budgets(Lane::Decode, 132), (1..=16).map(|k| 8 * k).chain([132]).collect::<Vec<_>>());
        assert_eq!(sched.budgets(Lane::Prefill, 132), (1..=16).map(|k| 132 - 8 * k).chain([132]).collect::<Vec<_>>());
        // 64 sequences decoding 2k tokens each, and an 8k prompt; the cache a quarter full, then
        // most of it full.
        let split = |used_blocks: usize| {
            let mut blocks = BlockManager::new(64 * 130 * 4, 16).unwrap();
            for id in 0..64 {
                blocks.append(id, 2048).unwrap();
            }
            blocks.append(1000, used_blocks * 16).unwrap();
            let idle: Vec<SeqState> = (0..64).map(|id| s(id, 1)).collect();
            let view = SchedulerView {
                idle: &idle,
                waiting: &[s(2000, 8192)],
                num_running: 65,
                blocks: &blocks,
                sm_count: 132,
                busy: &[None, None],
                resizable: false,
            };
            budgets(&sched.clone().plan(&view))
        };
        let low = split(0);
        let high = split(64 * 130 * 4 - 64 * 128 - 600);
        assert_eq!((low[0].0, low[1].0), (Lane::Decode, Lane::Prefill));
        assert_eq!(low[0].1 + low[1].1, 132);
        assert!(low[0].1.is_multiple_of(8) && high[0].1.is_multiple_of(8));
        assert!(high[0].1 > low[0].1, "a fuller cache protects decode: {low:?} then {high:?}");
        // A cost model of another device is refused.
        let controller = Controller::new(llama8b_h200(), ControllerConfig::default()).unwrap();
        assert!(nexus(64).with_controller(controller, 114).is_err());
    }

    #[test]
    fn the_controller_counts_waiting_decodes_and_learns_from_the_lanes() {
        use crate::engine::cost_model::tests::llama8b_h200;
        use crate::engine::scheduler::controller::{Controller, ControllerConfig};
        let config = ControllerConfig { decode_target_s: Some(0.012), hysteresis: 0, ..ControllerConfig::default() };
        let controller = Controller::new(llama8b_h200(), config).unwrap();
        let mut sched = nexus(64).with_controller(controller, 132).unwrap();
        let mut blocks = BlockManager::new(64 * 130 * 4, 16).unwrap();
        for id in 0..48 {
            blocks.append(id, 2048).unwrap();
        }
        let plan = |sched: &mut NexusScheduler, idle: &[SeqState], busy: &[Option<u32>]| {
            let view = SchedulerView {
                idle,
                waiting: &[s(1000, 20_000)],
                num_running: 48,
                blocks: &blocks,
                sm_count: 132,
                busy,
                resizable: false,
            };
            sched.plan(&view)
        };
        // 16 sequences decode and a long prompt waits: both lanes start.
        let decoding: Vec<SeqState> = (0..16).map(|id| s(id, 1)).collect();
        let both = plan(&mut sched, &decoding, &[None, None]);
        assert_eq!(both.lanes.len(), 2);
        let decode_sms = both.lanes[0].budget;
        // The prefill iteration ends first while that decode runs; the next one is planned
        // beside the decode in flight. With 32 more sequences waiting for the next decode
        // iteration (prompts just done), decode is given more SMs than the 16 in flight need.
        sched.observe(Lane::Prefill, Duration::from_millis(60));
        let waiting: Vec<SeqState> = (16..48).map(|id| s(id, 1)).collect();
        let beside = |sched: &NexusScheduler, idle: &[SeqState]| {
            let plan = plan(&mut sched.clone(), idle, &[Some(decode_sms), None]);
            132 - plan.lanes[0].budget
        };
        let alone = beside(&sched, &[]);
        let with_waiting = beside(&sched, &waiting);
        assert!(with_waiting > alone, "decode SMs beside prefill: {alone} then {with_waiting}");
        // The decode iteration in flight takes twice its prediction: the next split gives
        // decode more SMs for the same work.
        let predicted = both.lanes[0].predicted.unwrap();
        sched.observe(Lane::Decode, 2 * predicted);
        let again = plan(&mut sched, &decoding, &[None, None]);
        assert!(again.lanes[0].budget > decode_sms, "{} then {}", decode_sms, again.lanes[0].budget);
        // An observation of a lane with nothing predicted in flight is ignored.
        let mut observed = sched.clone();
        observed.observe(Lane::Prefill, Duration::from_secs(100));
        observed.observe(Lane::Prefill, Duration::from_secs(100));
        assert_eq!(plan(&mut observed, &decoding, &[None, None]), plan(&mut sched, &decoding, &[None, None]));
    }

    #[test]
    fn a_long_prompt_waits_for_a_decode_iteration_holding_its_share() {
        use crate::engine::cost_model::tests::llama8b_h200;
        use crate::engine::scheduler::controller::{Controller, ControllerConfig};
        let config = ControllerConfig { decode_target_s: Some(0.012), hysteresis: 0, ..ControllerConfig::default() };
        let controller = Controller::new(llama8b_h200(), config).unwrap();
        let mut sched = nexus(64).with_controller(controller, 132).unwrap();
        let mut blocks = BlockManager::new(64 * 130 * 4, 16).unwrap();
        for id in 0..16 {
            blocks.append(id, 2048).unwrap();
        }
        let decoding: Vec<SeqState> = (0..16).map(|id| s(id, 1)).collect();
        let plan = |sched: &mut NexusScheduler, idle: &[SeqState], busy: &[Option<u32>]| {
            let view = SchedulerView {
                idle,
                waiting: &[s(1000, 8192)],
                num_running: 16,
                blocks: &blocks,
                sm_count: 132,
                busy,
                resizable: false,
            };
            sched.plan(&view)
        };
        // Both lanes start on the split; the prefill iteration is seen done first.
        let both = plan(&mut sched, &decoding, &[None, None]);
        let (decode_sms, prefill_sms) = (both.lanes[0].budget, both.lanes[1].budget);
        assert_eq!(decode_sms + prefill_sms, 132);
        sched.observe(Lane::Prefill, both.lanes[1].predicted.unwrap());
        // The decode iteration in flight leaves prefill its share: the next prompt starts on it.
        let next = plan(&mut sched.clone(), &[], &[Some(decode_sms), None]);
        assert_eq!(budgets(&next), vec![(Lane::Prefill, prefill_sms)]);
        assert_eq!(next.admitted, vec![1000]);
        // It leaves 8 SMs: an 8k-token prompt there would take many decode iterations, so it
        // waits for this one to end and admits nothing yet.
        assert_eq!(plan(&mut sched.clone(), &[], &[Some(124), None]), Plan::default());
        // Without a prediction of the decode iteration in flight there is nothing to weigh: it
        // starts on what is left.
        sched.in_flight = [None, None];
        assert_eq!(budgets(&plan(&mut sched, &[], &[Some(124), None])), vec![(Lane::Prefill, 8)]);
    }

    #[test]
    fn a_backlog_of_prompts_gives_prefill_the_looser_targets_sms() {
        use crate::engine::cost_model::tests::llama8b_h200;
        use crate::engine::scheduler::controller::{BacklogTarget, Controller, ControllerConfig};
        let config = ControllerConfig {
            decode_target_s: Some(0.012),
            backlog_target: Some(BacklogTarget { tokens: 8192, decode_s: 0.04 }),
            hysteresis: 0,
            ..ControllerConfig::default()
        };
        let controller = Controller::new(llama8b_h200(), config).unwrap();
        let sched = nexus(64).with_controller(controller, 132).unwrap();
        let mut blocks = BlockManager::new(64 * 130 * 4, 16).unwrap();
        for id in 0..32 {
            blocks.append(id, 2048).unwrap();
        }
        let idle: Vec<SeqState> = (0..32).map(|id| s(id, 1)).collect();
        let decode_sms = |waiting: &[SeqState]| {
            let view = SchedulerView {
                idle: &idle,
                waiting,
                num_running: 32,
                blocks: &blocks,
                sm_count: 132,
                busy: &[None, None],
                resizable: false,
            };
            let plan = sched.clone().plan(&view);
            assert_eq!(plan.lanes.len(), 2);
            plan.lanes[0].budget
        };
        // 4000 prompt tokens wait: the tight target; 4000 and 6000: a backlog, the loose one.
        let (short, backlog) = (decode_sms(&[s(100, 4000)]), decode_sms(&[s(100, 4000), s(101, 6000)]));
        assert!(backlog < short, "decode SMs: {short} without a backlog, {backlog} with one");
    }

    #[test]
    fn prefill_iterations_take_at_most_their_tokens() {
        let mut blocks = BlockManager::new(100, 4).unwrap();
        blocks.append(1, 7).unwrap(); // decoding
        let plan = |tokens: PrefillTokens, waiting: &[SeqState]| {
            let prefill_packing = PrefillPacking::Fill;
            let split = NexusConfig { prefill_tokens: Some(tokens), prefill_packing, ..NexusConfig::fixed(64) };
            let mut sched = NexusScheduler::new(SchedulerConfig::default(), split, 132).unwrap();
            let view = SchedulerView {
                idle: &[s(1, 1)],
                waiting,
                num_running: 1,
                blocks: &blocks,
                sm_count: 132,
                busy: &[None, None],
                resizable: false,
            };
            sched.plan(&view)
        };
        let plan_10 = plan(PrefillTokens::fixed(10), &[s(2, 6), s(3, 30)]);
        // The 6-token prompt whole, then 4 tokens of the 30-token one: 10 in all; decode as ever.
        assert_eq!(plan_10.lanes[1].scheduled, vec![Scheduled { id: 2, tokens: 6 }, Scheduled { id: 3, tokens: 4 }]);
        assert_eq!(plan_10.lanes[0].scheduled, vec![Scheduled { id: 1, tokens: 1 }]);
        // With a backlog limit of 20: 36 prompt tokens wait, so 20 go; with 19 waiting, 10.
        let backlogged = PrefillTokens { tokens: 10, backlog: Some(20) };
        let plan_20 = plan(backlogged, &[s(2, 6), s(3, 30)]);
        assert_eq!(plan_20.lanes[1].scheduled, vec![Scheduled { id: 2, tokens: 6 }, Scheduled { id: 3, tokens: 14 }]);
        let short = plan(backlogged, &[s(2, 6), s(3, 13)]);
        assert_eq!(short.lanes[1].scheduled, vec![Scheduled { id: 2, tokens: 6 }, Scheduled { id: 3, tokens: 4 }]);
        for bad in [PrefillTokens::fixed(0), PrefillTokens { tokens: 10, backlog: Some(10) }] {
            let split = NexusConfig { prefill_tokens: Some(bad), ..NexusConfig::fixed(64) };
            assert!(NexusScheduler::new(SchedulerConfig::default(), split, 132).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn whole_prompts_go_first_and_a_longer_one_is_chunked_alone() {
        let mut blocks = BlockManager::new(5, 4).unwrap();
        blocks.append(1, 7).unwrap(); // decoding: 2 of the 5 blocks, 12 tokens' room left
        let prefill = |waiting: &[SeqState]| {
            let split = NexusConfig { prefill_tokens: Some(PrefillTokens::fixed(10)), ..NexusConfig::fixed(64) };
            assert_eq!(split.prefill_packing, PrefillPacking::WholeFirst, "the default");
            let mut sched = NexusScheduler::new(SchedulerConfig::default(), split, 132).unwrap();
            let busy = [None, None];
            let view = SchedulerView {
                idle: &[],
                waiting,
                num_running: 1,
                blocks: &blocks,
                sm_count: 132,
                busy: &busy,
                resizable: false,
            };
            sched.plan(&view).lanes.into_iter().flat_map(|l| l.scheduled).collect::<Vec<_>>()
        };
        let chunk = |id, tokens| Scheduled { id, tokens };
        // The 6-token prompt finishes alone: a chunk of the 30-token one beside it would delay it.
        assert_eq!(prefill(&[s(2, 6), s(3, 30)]), vec![chunk(2, 6)]);
        // Whole prompts that fit together go together, shortest first.
        assert_eq!(prefill(&[s(2, 5), s(3, 30), s(4, 3)]), vec![chunk(4, 3), chunk(2, 5)]);
        // A prompt longer than the limit is chunked into an iteration of its own.
        assert_eq!(prefill(&[s(3, 30)]), vec![chunk(3, 10)]);
        // A prompt within the token limit but not the blocks left (room for 8 tokens after the
        // first prompt's block) does not fit whole either.
        assert_eq!(prefill(&[s(2, 2), s(3, 9)]), vec![chunk(2, 2)]);
    }

    #[test]
    fn the_split_leaves_each_lane_an_sm() {
        for bad in [0, 132, 200] {
            assert!(NexusScheduler::new(SchedulerConfig::default(), NexusConfig::fixed(bad), 132).is_err());
        }
        assert_eq!(nexus(32).budgets(Lane::Decode, 132), vec![100, 132]);
        assert_eq!(nexus(32).budgets(Lane::Prefill, 132), vec![32, 132]);
    }

    /// The decode lane serves the running sequences first come, first served: with fewer tokens an
    /// iteration than decoding sequences the oldest go, and when the cache has no block for the
    /// next token the newest give theirs to the older ones.
    #[test]
    fn the_decode_lane_serves_the_oldest_sequences_first() {
        let mut blocks = BlockManager::new(100, 4).unwrap();
        for id in 1..=5 {
            blocks.append(id, 2).unwrap();
        }
        let config = SchedulerConfig { max_num_batched_tokens: 3, ..SchedulerConfig::default() };
        let mut sched = NexusScheduler::new(config, NexusConfig::fixed(64), 132).unwrap();
        let idle = [s(1, 1), s(2, 1), s(3, 1), s(4, 1), s(5, 1)];
        let view = SchedulerView {
            idle: &idle,
            waiting: &[],
            num_running: 5,
            blocks: &blocks,
            sm_count: 132,
            busy: &[None, None],
            resizable: false,
        };
        let plan = sched.plan(&view);
        let decode_ids = |plan: &Plan| plan.lanes[0].scheduled.iter().map(|s| s.id).collect::<Vec<_>>();
        assert_eq!(decode_ids(&plan), vec![1, 2, 3]);
        assert!(plan.preempted.is_empty());
        // Three sequences with full blocks and one free block: the oldest takes it; the next needs
        // one too and gets the newest's.
        let mut blocks = BlockManager::new(4, 4).unwrap();
        for id in 1..=3 {
            blocks.append(id, 4).unwrap();
        }
        let idle = [s(1, 1), s(2, 1), s(3, 1)];
        let view = SchedulerView { idle: &idle, num_running: 3, blocks: &blocks, ..view };
        let plan = sched.plan(&view);
        assert_eq!(decode_ids(&plan), vec![1, 2]);
        assert_eq!(plan.preempted, vec![3]);
    }

    #[test]
    fn decodes_preempt_idle_prompts_and_stuck_prompts_give_way() {
        let mut blocks = BlockManager::new(3, 4).unwrap();
        blocks.append(1, 4).unwrap(); // decoding, its block full
        blocks.append(2, 8).unwrap(); // prompt of 20, 2 blocks
        let mut sched = nexus(64);
        let view = SchedulerView {
            idle: &[s(1, 1), s(2, 12)],
            waiting: &[s(3, 4)],
            num_running: 2,
            blocks: &blocks,
            sm_count: 132,
            busy: &[None, None],
            resizable: false,
        };
        let plan = sched.plan(&view);
        assert_eq!(plan.preempted, vec![2], "the newest idle sequence gives its blocks to the decode");
        assert_eq!(budgets(&plan), vec![(Lane::Decode, 132)]);
        assert!(plan.admitted.is_empty(), "nothing is admitted after a preemption");
        // Two prompts stuck on a full cache with no decode: the newer gives way.
        let mut blocks = BlockManager::new(4, 4).unwrap();
        blocks.append(1, 8).unwrap();
        blocks.append(2, 8).unwrap();
        let view = SchedulerView {
            idle: &[s(1, 12), s(2, 12)],
            waiting: &[],
            num_running: 2,
            blocks: &blocks,
            sm_count: 132,
            busy: &[None, None],
            resizable: false,
        };
        let plan = sched.plan(&view);
        assert_eq!(plan.preempted, vec![2]);
        assert_eq!(plan.lanes[0].scheduled, vec![Scheduled { id: 1, tokens: 8 }]);
    }
}
