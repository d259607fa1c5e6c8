//! The paged KV cache's block manager under random sequences of operations.

use std::collections::{HashMap, HashSet};

use nexus::runtime::ErrorKind;
use nexus::runtime::engine::kv_cache::BlockManager;
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    /// Sequence `seq` grows by `tokens`.
    Append { seq: u64, tokens: usize },
    /// Sequence `seq` finishes, is aborted or is preempted: all the same to the cache.
    Free { seq: u64 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (0u64..6, 1usize..40).prop_map(|(seq, tokens)| Op::Append { seq, tokens }),
        1 => (0u64..6).prop_map(|seq| Op::Free { seq }),
    ]
}

proptest! {
    #[test]
    fn no_block_is_owned_twice_and_all_come_back(
        num_blocks in 1usize..48,
        block_size in prop::sample::select(vec![1usize, 2, 4, 16]),
        ops in prop::collection::vec(op(), 1..80),
    ) {
        let mut m = BlockManager::new(num_blocks, block_size).unwrap();
        let mut lens: HashMap<u64, usize> = HashMap::new();
        for op in ops {
            match op {
                Op::Append { seq, tokens } => {
                    let before_free = m.num_free_blocks();
                    let len = lens.get(&seq).copied().unwrap_or(0);
                    match m.append(seq, tokens) {
                        Ok(slots) => {
                            prop_assert_eq!(slots.len(), tokens);
                            let blocks = &m.get(seq).unwrap().blocks;
                            // Each new position lands in the block its position says.
                            for (i, &slot) in slots.iter().enumerate() {
                                let p = len + i;
                                prop_assert_eq!(slot as usize, blocks[p / block_size] as usize * block_size + p % block_size);
                            }
                            lens.insert(seq, len + tokens);
                        }
                        Err(e) => {
                            // A full cache changes nothing.
                            prop_assert_eq!(e.kind(), ErrorKind::KvCacheFull);
                            prop_assert_eq!(m.num_free_blocks(), before_free);
                            prop_assert_eq!(m.get(seq).map_or(0, |s| s.len), len);
                        }
                    }
                }
                Op::Free { seq } => {
                    m.free(seq);
                    lens.remove(&seq);
                    prop_assert!(m.get(seq).is_none());
                }
            }
            let mut owned = HashSet::new();
            let mut total = 0;
            for seq in m.sequences().collect::<Vec<_>>() {
                let s = m.get(seq).unwrap();
                prop_assert_eq!(s.blocks.len(), s.len.div_ceil(block_size));
                for &b in &s.blocks {
                    prop_assert!((b as usize) < num_blocks);
                    prop_assert!(owned.insert(b), "block {} owned twice", b);
                    total += 1;
                }
            }
            prop_assert_eq!(total + m.num_free_blocks(), num_blocks);
        }
        for seq in m.sequences().collect::<Vec<_>>() {
            m.free(seq);
        }
        prop_assert_eq!(m.num_free_blocks(), num_blocks);
    }
}
