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

/// Reserves KV slots for every chunk and builds a step of `kind`. Either all chunks get their
/// slots or, on a full cache, none does and the error is of kind [`ErrorKind::KvCacheFull`].
pub fn build_step(blocks: &mut BlockManager, chunks: &[SeqChunk<'_>], kind: StepKind) -> Result<StepInput> {
    let needed: usize = chunks.iter().map(|c| blocks.blocks_needed(c.seq, c.tokens.len())).sum();
    if needed > blocks.num_free_blocks() {
        return Err(Error::new(
            ErrorKind::KvCacheFull,
            format!("the step needs {needed} blocks, {} are free", blocks.num_free_blocks()),
        ));
    }
    let mut step = StepInput { kind, q_indptr: vec![0], ..StepInput::default() };
    for chunk in chunks {
        if chunk.tokens.is_empty() {
            return Err(Error::invalid(format!("sequence {} has no tokens in this step", chunk.seq)));
        }
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
