//! Turning "these sequences advance by these tokens" into a [`StepInput`]: KV slots are
//! reserved in the [`BlockManager`], positions continue each sequence, and block tables are
//! padded to the longest one.

use crate::engine::kv_cache::{BlockManager, SeqId};
use crate::model::backend::{StepInput, StepKind};
use crate::{Error, ErrorKind, Result};

/// One sequence's share of a step: its next tokens (a prompt chunk, or one decoded token).
#[derive(Clone, Copy, Debug)]
pub struct SeqChunk<'a> {
    pub seq: SeqId,
    pub tokens: &'a [u32],
    /// Whether the step should return logits for the chunk's last token.
    pub wants_logits: bool,
}

/// Reserves KV slots for every chunk and builds a step of `kind`. All or nothing: a chunk without
/// tokens or a sequence in two chunks is refused before any slot is taken, and on a full cache
/// no chunk gets its slots (the error is then of kind [`ErrorKind::KvCacheFull`]).
pub fn build_step(blocks: &mut BlockManager, chunks: &[SeqChunk<'_>], kind: StepKind) -> Result<StepInput> {
    let mut seen = std::collections::HashSet::with_capacity(chunks.len());
    for chunk in chunks {
        if chunk.tokens.is_empty() {
            return Err(Error::invalid(format!("sequence {} has no tokens in this step", chunk.seq)));
        }
        if !seen.insert(chunk.seq) {
            return Err(Error::invalid(format!("sequence {} is in this step twice", chunk.seq)));
        }
    }
    let needed: usize = chunks.iter().map(|c| blocks.blocks_needed(c.seq, c.tokens.len())).sum();
    if needed > blocks.num_free_blocks() {
        return Err(Error::new(
            ErrorKind::KvCacheFull,
            format!("the step needs {needed} blocks, {} are free", blocks.num_free_blocks()),
        ));
    }
    let mut step = StepInput { kind, q_indptr: vec![0], ..StepInput::default() };
    for chunk in chunks {
        let start = blocks.get(chunk.seq).map_or(0, |s| s.len);
        step.slots.extend(blocks.append(chunk.seq, chunk.tokens.len())?);
        step.tokens.extend_from_slice(chunk.tokens);
        step.positions.extend((start..start + chunk.tokens.len()).map(|p| p as u32));
        step.q_indptr.push(step.tokens.len() as u32);
        step.kv_lens.push((start + chunk.tokens.len()) as u32);
        if chunk.wants_logits {
            step.logit_rows.push(step.tokens.len() as u32 - 1);
        }
    }
    let tables: Vec<&[u32]> = chunks.iter().map(|c| blocks.get(c.seq).map_or(&[][..], |s| &s.blocks)).collect();
    step.max_blocks_per_seq = tables.iter().map(|t| t.len()).max().unwrap_or(0);
    for table in tables {
        step.block_tables.extend(table.iter().map(|&b| b as i32));
        // Padding is never read (a sequence's KV length bounds its blocks); -1 makes a bug loud.
        step.block_tables.resize(step.block_tables.len() + step.max_blocks_per_seq - table.len(), -1);
    }
    Ok(step)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_step_takes_its_slots_all_or_nothing() {
        let mut blocks = BlockManager::new(4, 4).unwrap();
        let chunk = |seq, tokens| SeqChunk { seq, tokens, wants_logits: true };
        // An empty chunk after a good one, a sequence twice (whose blocks would be counted once),
        // and more than the cache holds: each refused, and nothing taken.
        for bad in [
            vec![chunk(1, &[1, 2, 3][..]), chunk(2, &[][..])],
            vec![chunk(1, &[1; 8][..]), chunk(1, &[1; 8][..])],
            vec![chunk(1, &[1; 12][..]), chunk(2, &[1; 5][..])],
        ] {
            assert!(build_step(&mut blocks, &bad, StepKind::Prefill).is_err());
            assert_eq!((blocks.num_free_blocks(), blocks.get(1)), (4, None));
        }
        let step = build_step(&mut blocks, &[chunk(1, &[1; 5][..]), chunk(2, &[2; 3][..])], StepKind::Prefill).unwrap();
        assert_eq!((step.q_indptr, step.kv_lens, blocks.num_free_blocks()), (vec![0, 5, 8], vec![5, 3], 1));
    }
}
