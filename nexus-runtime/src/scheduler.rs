//! Batch planning: which sequences advance in the next step, by how many tokens, and which are
//! preempted to make room. Planning only reads the KV-cache bookkeeping; the engine applies the
//! plan (it owns the sequences, the cache and the model).
//!
//! [`ChunkedScheduler`] is the baseline every peer uses (vLLM's chunked prefill): one mixed batch
//! per step under a token budget — running decodes first, then the chunks of prompts already
//! started, then new prompts (first come, first served) while sequences and blocks allow. When
//! the cache cannot hold the decodes' next tokens, the most recently arrived running sequences are
//! preempted (their blocks freed; the engine recomputes them later from their tokens).

use crate::kv_cache::{BlockManager, SeqId};
use crate::{Error, Result};

/// Limits of one step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// The most sequences running (holding KV blocks) at once.
    pub max_num_seqs: usize,
    /// The most tokens (decode tokens plus prompt-chunk tokens) in one step.
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

/// What the scheduler needs to know of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeqState {
    pub id: SeqId,
    /// Tokens not yet in the KV cache: 1 for a sequence in its decode phase (the last sampled
    /// token), more while its prompt (or, after preemption, its whole text) is being prefilled.
    pub uncached: usize,
}

/// One sequence's share of the planned step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Scheduled {
    pub id: SeqId,
    /// How many of its uncached tokens run in this step.
    pub tokens: usize,
}

/// The plan of one step.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// Sequences to preempt before the step (their blocks freed, recomputed later).
    pub preempted: Vec<SeqId>,
    /// Sequences that advance, running ones first, then newly admitted ones.
    pub scheduled: Vec<Scheduled>,
    /// How many of the waiting sequences (from the front) were admitted and appear in
    /// `scheduled`.
    pub admitted: usize,
}

/// The chunked-prefill scheduler.
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

    /// The limits.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Plans the next step. `running` are the sequences holding KV blocks, oldest first;
    /// `waiting` those without, in the order they should be admitted.
    pub fn plan(&self, running: &[SeqState], waiting: &[SeqState], blocks: &BlockManager) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut budget = self.config.max_num_batched_tokens;
        let mut free = blocks.num_free_blocks();
        // Running sequences still eligible, oldest first; victims are taken from the back.
        let mut alive: Vec<SeqState> = running.to_vec();

        // Decodes first: each needs one token, and maybe a block for it.
        let mut i = 0;
        while i < alive.len() {
            let seq = alive[i];
            if seq.uncached != 1 {
                i += 1;
                continue;
            }
            if budget == 0 {
                break;
            }
            let need = blocks.blocks_needed(seq.id, 1);
            while need > free && alive.len() > i + 1 {
                // Preempt the newest other running sequence and take its blocks back.
                // (Victims come from behind `i`, so none of them is scheduled yet.)
                let victim = alive.pop().expect("more than i + 1 sequences");
                free += blocks.get(victim.id).map_or(0, |s| s.blocks.len());
                plan.preempted.push(victim.id);
            }
            if need > free {
                // Not even this one fits: it is the newest left, so it goes too.
                free += blocks.get(seq.id).map_or(0, |s| s.blocks.len());
                plan.preempted.push(seq.id);
                alive.remove(i);
                continue;
            }
            free -= need;
            budget -= 1;
            plan.scheduled.push(Scheduled { id: seq.id, tokens: 1 });
            i += 1;
        }

        // Then the prompts already started, as far as the budget and the blocks allow.
        loop {
            for seq in alive.iter().filter(|s| s.uncached > 1) {
                let tokens = self.fit(seq, budget, &mut free, blocks);
                if tokens == 0 {
                    break;
                }
                budget -= tokens;
                plan.scheduled.push(Scheduled { id: seq.id, tokens });
            }
            if !plan.scheduled.is_empty() || alive.len() <= 1 {
                break;
            }
            // Nothing can move: every running sequence waits for blocks that only running
            // sequences hold. The newest gives its blocks up so that the older ones go on (a lone
            // sequence always fits: the engine admits no request larger than the cache).
            let victim = alive.pop().expect("more than one sequence");
            free += blocks.get(victim.id).map_or(0, |s| s.blocks.len());
            plan.preempted.push(victim.id);
        }

        // Then new prompts, first come first served, while there is room. A preemption this step
        // means the cache is full: admit nothing then.
        if plan.preempted.is_empty() {
            let room = self.config.max_num_seqs.saturating_sub(alive.len());
            for seq in waiting.iter().take(room) {
                if budget == 0 {
                    break;
                }
                let tokens = self.fit(seq, budget, &mut free, blocks);
                if tokens == 0 {
                    break;
                }
                budget -= tokens;
                plan.admitted += 1;
                plan.scheduled.push(Scheduled { id: seq.id, tokens });
            }
        }
        plan
    }

    /// The most of `seq`'s uncached tokens that fit the token budget and the free blocks (the
    /// room left in its last block plus whole free blocks); takes their blocks from `free`.
    fn fit(&self, seq: &SeqState, budget: usize, free: &mut usize, blocks: &BlockManager) -> usize {
        let block_size = blocks.block_size();
        let room = blocks.get(seq.id).map_or(0, |s| s.blocks.len() * block_size - s.len);
        let tokens = seq.uncached.min(budget).min(room + *free * block_size);
        *free -= blocks.blocks_needed(seq.id, tokens);
        tokens
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(id: SeqId, uncached: usize) -> SeqState {
        SeqState { id, uncached }
    }

    #[test]
    fn decodes_first_then_started_prompts_then_new_ones_under_the_budget() {
        let mut blocks = BlockManager::new(100, 4).unwrap();
        blocks.append(1, 7).unwrap(); // decoding
        blocks.append(2, 4).unwrap(); // halfway through a 20-token prompt
        let sched = ChunkedScheduler::new(SchedulerConfig { max_num_seqs: 3, max_num_batched_tokens: 10 }).unwrap();
        let plan = sched.plan(&[s(1, 1), s(2, 16)], &[s(3, 50), s(4, 5)], &blocks);
        assert_eq!(plan.scheduled, vec![Scheduled { id: 1, tokens: 1 }, Scheduled { id: 2, tokens: 9 }]);
        assert_eq!(plan.admitted, 0);
        let plan = sched.plan(&[s(1, 1), s(2, 2)], &[s(3, 50), s(4, 5)], &blocks);
        assert_eq!(plan.scheduled.last(), Some(&Scheduled { id: 3, tokens: 7 }));
        assert_eq!(plan.admitted, 1);
    }

    #[test]
    fn prompts_stuck_on_a_full_cache_preempt_the_newest() {
        let mut blocks = BlockManager::new(4, 4).unwrap();
        blocks.append(1, 8).unwrap(); // 2 blocks, prompt of 20 half done
        blocks.append(2, 8).unwrap(); // 2 blocks, prompt of 20 half done
        let sched = ChunkedScheduler::new(SchedulerConfig::default()).unwrap();
        let plan = sched.plan(&[s(1, 12), s(2, 12)], &[], &blocks);
        assert_eq!(plan.preempted, vec![2]);
        assert_eq!(plan.scheduled, vec![Scheduled { id: 1, tokens: 8 }]);
    }

    #[test]
    fn a_full_cache_preempts_the_newest_sequences() {
        let mut blocks = BlockManager::new(3, 4).unwrap();
        blocks.append(1, 4).unwrap();
        blocks.append(2, 4).unwrap();
        blocks.append(3, 4).unwrap();
        let sched = ChunkedScheduler::new(SchedulerConfig::default()).unwrap();
        // Every decode needs a fresh block and none is free: the newest (3) is preempted so that
        // 1 gets its block; then 2 needs one and is itself the newest left, so it goes too.
        let plan = sched.plan(&[s(1, 1), s(2, 1), s(3, 1)], &[s(4, 3)], &blocks);
        assert_eq!(plan.preempted, vec![3, 2]);
        assert_eq!(plan.scheduled, vec![Scheduled { id: 1, tokens: 1 }]);
        assert_eq!(plan.admitted, 0);
    }
}
