//! Paged KV cache bookkeeping: a block allocator and each sequence's block table.
//!
//! The pools themselves live in the backend (one K and one V pool per layer, laid out as
//! [`PagedKvLayout`](nexus_kernels::PagedKvLayout)); this module decides which blocks a sequence
//! owns. Growing a sequence either gets every block it needs or none (so a full cache never
//! leaves a sequence half-extended), and finishing, aborting or preempting a sequence returns all
//! of its blocks at once.

use std::collections::HashMap;

use crate::{Error, ErrorKind, Result};

/// Identifies a sequence to the cache.
pub type SeqId = u64;

/// A free list of block ids `0..num_blocks`.
#[derive(Clone, Debug)]
pub struct BlockAllocator {
    free: Vec<u32>,
    num_blocks: usize,
}

impl BlockAllocator {
    /// An allocator with every block free.
    pub fn new(num_blocks: usize) -> Self {
        // Reversed so that blocks are handed out in increasing order, which keeps fresh
        // sequences contiguous and tests readable.
        BlockAllocator { free: (0..num_blocks as u32).rev().collect(), num_blocks }
    }

    /// The number of blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// The number of free blocks.
    pub fn num_free(&self) -> usize {
        self.free.len()
    }

    /// Takes `n` blocks, or none if fewer than `n` are free.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<u32>> {
        if n > self.free.len() {
            return Err(Error::new(
                ErrorKind::KvCacheFull,
                format!("{n} blocks requested, {} of {} free", self.free.len(), self.num_blocks),
            ));
        }
        Ok(self.free.split_off(self.free.len() - n).into_iter().rev().collect())
    }

    /// Returns blocks to the pool.
    pub fn release(&mut self, blocks: impl IntoIterator<Item = u32>) {
        self.free.extend(blocks);
    }
}

/// The blocks and length of one sequence.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SeqBlocks {
    /// Block ids, in order of the positions they hold.
    pub blocks: Vec<u32>,
    /// Tokens stored (or reserved) so far.
    pub len: usize,
}

/// Which blocks each sequence owns.
#[derive(Clone, Debug)]
pub struct BlockManager {
    allocator: BlockAllocator,
    block_size: usize,
    seqs: HashMap<SeqId, SeqBlocks>,
}

impl BlockManager {
    /// A manager of `num_blocks` blocks of `block_size` tokens.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self> {
        if !block_size.is_power_of_two() {
            return Err(Error::invalid(format!("block size {block_size} is not a power of two")));
        }
        // Block ids are u32 (and slots, block id × block size + offset, too).
        if u32::try_from(num_blocks.saturating_add(1).saturating_mul(block_size)).is_err() {
            return Err(Error::invalid(format!(
                "{num_blocks} blocks of {block_size} tokens: too many slots to number"
            )));
        }
        Ok(BlockManager { allocator: BlockAllocator::new(num_blocks), block_size, seqs: HashMap::new() })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The number of blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.allocator.num_blocks()
    }

    /// The number of free blocks.
    pub fn num_free_blocks(&self) -> usize {
        self.allocator.num_free()
    }

    /// The fraction of blocks in use, from 0 to 1.
    pub fn usage(&self) -> f64 {
        let total = self.num_blocks().max(1);
        (total - self.num_free_blocks()) as f64 / total as f64
    }

    /// Blocks needed to grow `seq` by `new_tokens` (0 for an unknown sequence of that size fits
    /// the formula too: it starts empty).
    pub fn blocks_needed(&self, seq: SeqId, new_tokens: usize) -> usize {
        let s = self.seqs.get(&seq);
        let len = s.map_or(0, |s| s.len);
        let have = s.map_or(0, |s| s.blocks.len());
        (len + new_tokens).div_ceil(self.block_size).saturating_sub(have)
    }

    /// Grows `seq` (created on first use) by `new_tokens` positions and returns their slots
    /// (block id × block size + offset). On a full cache nothing changes and the error is of kind
    /// [`ErrorKind::KvCacheFull`].
    pub fn append(&mut self, seq: SeqId, new_tokens: usize) -> Result<Vec<u32>> {
        let needed = self.blocks_needed(seq, new_tokens);
        let fresh = self.allocator.allocate(needed)?;
        let s = self.seqs.entry(seq).or_default();
        s.blocks.extend(fresh);
        let start = s.len;
        s.len += new_tokens;
        let bs = self.block_size;
        Ok((start..s.len).map(|p| s.blocks[p / bs] * bs as u32 + (p % bs) as u32).collect())
    }

    /// The blocks and length of `seq`.
    pub fn get(&self, seq: SeqId) -> Option<&SeqBlocks> {
        self.seqs.get(&seq)
    }

    /// Frees every block of `seq` (on finish, abort or preemption); unknown ids are a no-op.
    pub fn free(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            self.allocator.release(s.blocks);
        }
    }

    /// The ids of the sequences that hold blocks.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_maps_positions_to_slots_and_fails_atomically() {
        let mut m = BlockManager::new(3, 4).unwrap();
        assert_eq!(m.append(7, 5).unwrap(), vec![0, 1, 2, 3, 4]);
        assert_eq!(m.append(7, 2).unwrap(), vec![5, 6]);
        assert_eq!(m.append(8, 4).unwrap(), vec![8, 9, 10, 11]);
        let err = m.append(7, 2).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::KvCacheFull);
        assert_eq!(m.get(7).unwrap().len, 7);
        m.free(8);
        assert_eq!(m.append(7, 2).unwrap(), vec![7, 8]);
        assert_eq!(m.num_free_blocks(), 0);
    }
}
