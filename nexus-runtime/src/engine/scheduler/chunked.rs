//! The chunked-prefill scheduler: one mixed batch per iteration on every SM.

use super::{
    Lane, LanePlan, Plan, PromptOrder, Scheduler, SchedulerConfig, SchedulerView, preempt_if_stuck, schedule_decodes,
    schedule_prompts,
};
use crate::Result;
use crate::model::backend::StepKind;

/// vLLM's chunked prefill (see the module documentation).
#[derive(Clone, Debug)]
pub struct ChunkedScheduler {
    config: SchedulerConfig,
}

impl ChunkedScheduler {
    /// A scheduler with these limits.
    pub fn new(config: SchedulerConfig) -> Result<Self> {
        config.validate()?;
        Ok(ChunkedScheduler { config })
    }
}

impl Scheduler for ChunkedScheduler {
    fn lanes(&self) -> &'static [Lane] {
        &[Lane::Mixed]
    }

    fn budgets(&self, _: Lane, sm_count: u32) -> Vec<u32> {
        vec![sm_count]
    }

    fn config(&self) -> SchedulerConfig {
        self.config
    }

    fn plan(&mut self, view: &SchedulerView<'_>) -> Plan {
        let mut plan = Plan::default();
        if view.busy.first().copied().flatten().is_some() {
            return plan;
        }
        let blocks = view.blocks;
        let mut budget = self.config.max_num_batched_tokens;
        let mut free = blocks.num_free_blocks();
        // Idle sequences still eligible, oldest first; victims are taken from the back.
        let mut alive = view.idle.to_vec();
        let mut scheduled = schedule_decodes(&mut alive, &mut budget, &mut free, blocks, &mut plan.preempted);
        let decodes = scheduled.len();
        // Then the prompts already started, as far as the budget and the blocks allow; then new
        // prompts, first come first served, while there is room. A preemption means the cache is
        // full: admit nothing then.
        loop {
            let room = self.config.max_num_seqs.saturating_sub(view.num_running - plan.preempted.len());
            let admit = plan.preempted.is_empty();
            let order = PromptOrder::FirstCome;
            let (prompts, admitted) =
                schedule_prompts(&alive, view.waiting, room, admit, order, &mut budget, &mut free, blocks);
            if !scheduled.is_empty() || !prompts.is_empty() {
                scheduled.extend(prompts);
                plan.admitted = admitted;
                break;
            }
            if !preempt_if_stuck(&mut alive, &mut free, blocks, &mut plan.preempted) {
                break;
            }
        }
        if !scheduled.is_empty() {
            let kind = if scheduled.len() == decodes { StepKind::Decode } else { StepKind::Prefill };
            plan.lanes.push(LanePlan { lane: Lane::Mixed, kind, budget: view.sm_count, scheduled, predicted: None });
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

    fn plan(sched: &mut ChunkedScheduler, running: &[SeqState], waiting: &[SeqState], blocks: &BlockManager) -> Plan {
        let view = SchedulerView {
            idle: running,
            waiting,
            num_running: running.len(),
            blocks,
            sm_count: 132,
            busy: &[None],
            resizable: false,
        };
        sched.plan(&view)
    }

    fn scheduled(plan: &Plan) -> Vec<Scheduled> {
        plan.lanes.iter().flat_map(|l| l.scheduled.clone()).collect()
    }

    #[test]
    fn decodes_first_then_started_prompts_then_new_ones_under_the_budget() {
        let mut blocks = BlockManager::new(100, 4).unwrap();
        blocks.append(1, 7).unwrap(); // decoding
        blocks.append(2, 4).unwrap(); // halfway through a 20-token prompt
        let mut sched = ChunkedScheduler::new(SchedulerConfig { max_num_seqs: 3, max_num_batched_tokens: 10 }).unwrap();
        let p = plan(&mut sched, &[s(1, 1), s(2, 16)], &[s(3, 50), s(4, 5)], &blocks);
        assert_eq!(scheduled(&p), vec![Scheduled { id: 1, tokens: 1 }, Scheduled { id: 2, tokens: 9 }]);
        assert_eq!((p.admitted.len(), p.lanes[0].kind, p.lanes[0].budget), (0, StepKind::Prefill, 132));
        let p = plan(&mut sched, &[s(1, 1), s(2, 2)], &[s(3, 50), s(4, 5)], &blocks);
        assert_eq!(scheduled(&p).last(), Some(&Scheduled { id: 3, tokens: 7 }));
        assert_eq!(p.admitted, vec![3]);
        let p = plan(&mut sched, &[s(1, 1)], &[], &blocks);
        assert_eq!(p.lanes[0].kind, StepKind::Decode, "decodes only");
        // A lane in flight plans nothing.
        let view = SchedulerView {
            idle: &[],
            waiting: &[s(3, 50)],
            num_running: 1,
            blocks: &blocks,
            sm_count: 132,
            busy: &[Some(132)],
            resizable: false,
        };
        assert_eq!(sched.plan(&view), Plan::default());
    }

    #[test]
    fn prompts_stuck_on_a_full_cache_preempt_the_newest() {
        let mut blocks = BlockManager::new(4, 4).unwrap();
        blocks.append(1, 8).unwrap(); // 2 blocks, prompt of 20 half done
        blocks.append(2, 8).unwrap(); // 2 blocks, prompt of 20 half done
        let mut sched = ChunkedScheduler::new(SchedulerConfig::default()).unwrap();
        let p = plan(&mut sched, &[s(1, 12), s(2, 12)], &[], &blocks);
        assert_eq!(p.preempted, vec![2]);
        assert_eq!(scheduled(&p), vec![Scheduled { id: 1, tokens: 8 }]);
    }

    #[test]
    fn a_full_cache_preempts_the_newest_sequences() {
        let mut blocks = BlockManager::new(3, 4).unwrap();
        blocks.append(1, 4).unwrap();
        blocks.append(2, 4).unwrap();
        blocks.append(3, 4).unwrap();
        let mut sched = ChunkedScheduler::new(SchedulerConfig::default()).unwrap();
        // Every decode needs a fresh block and none is free: the newest (3) is preempted so that
        // 1 gets its block; then 2 needs one and is itself the newest left, so it goes too.
        let p = plan(&mut sched, &[s(1, 1), s(2, 1), s(3, 1)], &[s(4, 3)], &blocks);
        assert_eq!(p.preempted, vec![3, 2]);
        assert_eq!(scheduled(&p), vec![Scheduled { id: 1, tokens: 1 }]);
        assert!(p.admitted.is_empty());
    }
}
