//! The chunked scheduler's plans on random states: within the token budget and the sequence
//! limit, never more tokens than a sequence has left, never more blocks than are free once the
//! preempted sequences give theirs back, and preempted sequences are not scheduled.

use std::collections::HashSet;

use nexus::runtime::engine::kv_cache::BlockManager;
use nexus::runtime::engine::scheduler::{
    ChunkedScheduler, PrefillPacking, Scheduled, Scheduler, SchedulerConfig, SchedulerView, SeqState,
};
use proptest::prelude::*;

proptest! {
    #[test]
    fn plans_respect_every_limit(
        cached in prop::collection::vec((1usize..60, prop::bool::ANY), 0..10),
        waiting in prop::collection::vec(1usize..80, 0..6),
        num_blocks in 1usize..40,
        max_num_seqs in 1usize..12,
        max_num_batched_tokens in 1usize..100,
    ) {
        let block_size = 4;
        let mut blocks = BlockManager::new(num_blocks, block_size).unwrap();
        // Running sequences: `len` tokens cached, then one token to decode or more to prefill.
        let mut running = Vec::new();
        for (i, &(len, decoding)) in cached.iter().enumerate() {
            if blocks.append(i as u64, len).is_err() {
                break;
            }
            running.push(SeqState { id: i as u64, uncached: if decoding { 1 } else { 1 + len % 7 }, age: 0 });
        }
        let waiting: Vec<SeqState> =
            waiting.iter().enumerate().map(|(i, &n)| SeqState { id: 100 + i as u64, uncached: n, age: 0 }).collect();
        let config = SchedulerConfig { max_num_seqs, max_num_batched_tokens };
        let view = SchedulerView {
            idle: &running,
            waiting: &waiting,
            num_running: running.len(),
            blocks: &blocks,
            sm_count: 132,
            busy: &[None],
            resizable: false,
        };
        let plan = ChunkedScheduler::new(config).unwrap().plan(&view);
        prop_assert!(plan.lanes.len() <= 1);
        let scheduled: Vec<Scheduled> = plan.lanes.iter().flat_map(|l| l.scheduled.clone()).collect();
        prop_assert!(plan.lanes.iter().all(|l| l.budget == 132));

        let total: usize = scheduled.iter().map(|s| s.tokens).sum();
        prop_assert!(total <= max_num_batched_tokens);
        let preempted: HashSet<u64> = plan.preempted.iter().copied().collect();
        let mut free = blocks.num_free_blocks();
        for id in &preempted {
            free += blocks.get(*id).map_or(0, |s| s.blocks.len());
        }
        let mut needed = 0;
        for s in &scheduled {
            prop_assert!(s.tokens > 0 && !preempted.contains(&s.id));
            let state = running.iter().chain(&waiting).find(|r| r.id == s.id).unwrap();
            prop_assert!(s.tokens <= state.uncached);
            needed += blocks.blocks_needed(s.id, s.tokens);
        }
        prop_assert!(needed <= free, "{} blocks needed, {} free", needed, free);
        prop_assert!(plan.admitted.len() <= waiting.len());
        let admitted: Vec<u64> = scheduled.iter().filter(|s| s.id >= 100).map(|s| s.id).collect();
        prop_assert_eq!(&admitted, &plan.admitted);
        // Admissions come in queue order, and only when nothing was preempted.
        prop_assert!(admitted.iter().zip(&waiting).all(|(a, w)| *a == w.id));
        prop_assert!(plan.admitted.is_empty() || preempted.is_empty());
        prop_assert!(running.len() - preempted.len() + plan.admitted.len() <= max_num_seqs.max(running.len()));
    }
}

/// Runs rounds of the Nexus prefill lane over a long prompt that arrives first and `per_round`
/// short prompts arriving every round, whose tokens alone fill every round's budget; returns the
/// round the long prompt first runs in, if it does within `rounds`.
fn first_round_of_the_long_prompt(
    long: usize,
    short: usize,
    per_round: usize,
    (aging, prefill_packing): (u64, PrefillPacking),
    rounds: u64,
) -> Option<u64> {
    use nexus::runtime::engine::scheduler::{Lane, NexusConfig, NexusScheduler};
    let config = SchedulerConfig { max_num_seqs: 100_000, max_num_batched_tokens: short * per_round };
    let split = NexusConfig { prefill_aging: aging, prefill_packing, ..NexusConfig::fixed(66) };
    let mut sched = NexusScheduler::new(config, split, 132).expect("scheduler");
    let mut blocks = BlockManager::new(1 << 20, 16).expect("blocks");
    // (id, tokens left, arrival round); the started ones hold blocks.
    let mut waiting: Vec<(u64, usize, u64)> = vec![(0, long, 0)];
    let mut started: Vec<(u64, usize, u64)> = Vec::new();
    let mut next_id = 1;
    for round in 1..=rounds {
        for _ in 0..per_round {
            waiting.push((next_id, short, round));
            next_id += 1;
        }
        let state = |&(id, uncached, arrival): &(u64, usize, u64)| SeqState { id, uncached, age: round - arrival };
        let idle: Vec<SeqState> = started.iter().map(state).collect();
        let queue: Vec<SeqState> = waiting.iter().map(state).collect();
        let view = SchedulerView {
            idle: &idle,
            waiting: &queue,
            num_running: started.len(),
            blocks: &blocks,
            sm_count: 132,
            busy: &[None, None],
            resizable: false,
        };
        let plan = sched.plan(&view);
        for id in &plan.admitted {
            let i = waiting.iter().position(|w| w.0 == *id).expect("admitted from the queue");
            started.push(waiting.remove(i));
        }
        for lane in plan.lanes.iter().filter(|l| l.lane == Lane::Prefill) {
            for s in &lane.scheduled {
                if s.id == 0 {
                    return Some(round);
                }
                blocks.append(s.id, s.tokens).expect("blocks");
                let seq = started.iter_mut().find(|r| r.0 == s.id).expect("a started prompt");
                seq.1 -= s.tokens;
            }
        }
        // A prompt done leaves the prefill lane (it would decode next).
        for &(id, left, _) in &started {
            if left == 0 {
                blocks.free(id);
            }
        }
        started.retain(|r| r.1 > 0);
    }
    None
}

proptest! {
    /// Shortest remaining prompt first would starve a long prompt behind a stream of short ones
    /// for ever; with aging it runs once it has waited `(long − short) / aging` rounds, as the
    /// scores say, and not much later.
    #[test]
    fn aging_keeps_a_long_prompt_from_starving(
        long in 200usize..3000,
        short in 2usize..100,
        per_round in 1usize..4,
        aging in 1u64..40,
        fill in any::<bool>(),
    ) {
        let packing = if fill { PrefillPacking::Fill } else { PrefillPacking::WholeFirst };
        let bound = ((long - short) as u64).div_ceil(aging) + 1;
        let first = first_round_of_the_long_prompt(long, short, per_round, (aging, packing), bound + 2);
        prop_assert!(first.is_some_and(|r| r <= bound), "ran at round {:?}, bound {}", first, bound);
        prop_assert_eq!(first_round_of_the_long_prompt(long, short, per_round, (0, packing), bound + 2), None);
    }
}
