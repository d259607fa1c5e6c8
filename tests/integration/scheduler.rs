//! The chunked scheduler's plans on random states: within the token budget and the sequence
//! limit, never more tokens than a sequence has left, never more blocks than are free once the
//! preempted sequences give theirs back, and preempted sequences are not scheduled.

use std::collections::HashSet;

use nexus::runtime::engine::kv_cache::BlockManager;
use nexus::runtime::engine::scheduler::{
    ChunkedScheduler, Scheduled, Scheduler, SchedulerConfig, SchedulerView, SeqState,
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
            running.push(SeqState { id: i as u64, uncached: if decoding { 1 } else { 1 + len % 7 } });
        }
        let waiting: Vec<SeqState> =
            waiting.iter().enumerate().map(|(i, &n)| SeqState { id: 100 + i as u64, uncached: n }).collect();
        let config = SchedulerConfig { max_num_seqs, max_num_batched_tokens };
        let view = SchedulerView {
            idle: &running,
            waiting: &waiting,
            num_running: running.len(),
            blocks: &blocks,
            sm_count: 132,
            busy: &[None],
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
        prop_assert!(plan.admitted <= waiting.len());
        let admitted: Vec<u64> = scheduled.iter().filter(|s| s.id >= 100).map(|s| s.id).collect();
        prop_assert_eq!(admitted.len(), plan.admitted);
        // Admissions come in queue order, and only when nothing was preempted.
        prop_assert!(admitted.iter().zip(&waiting).all(|(a, w)| *a == w.id));
        prop_assert!(plan.admitted == 0 || preempted.is_empty());
        prop_assert!(running.len() - preempted.len() + plan.admitted <= max_num_seqs.max(running.len()));
    }
}
