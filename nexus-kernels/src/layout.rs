//! Shapes shared by the kernels, their launchers and their references.

use crate::Result;
use crate::error::ensure_shape;

/// How rotary position embeddings pair up the dimensions of a head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: what GGUF llama weights need (llama.cpp permutes their Q/K rows).
    Interleaved,
    /// Pairs `(i, i + d/2)`: the rotate-half form of Hugging Face checkpoints.
    RotateHalf,
}

/// How the rotary frequencies are stretched for contexts longer than the model was trained on,
/// as Hugging Face transformers defines each kind (`rope_scaling` / `rope_parameters` of
/// config.json). Neither kind changes the attention scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// The frequencies `theta^(-2i/d)` as they are.
    None,
    /// Every frequency divided by `factor` (`rope_type: linear`, i.e. positions divided by it).
    Linear { factor: f32 },
    /// Llama 3.1's (`rope_type: llama3`): with `wavelen = 2π / freq`, frequencies whose wavelength
    /// is shorter than `original_max_position_embeddings / high_freq_factor` are kept, those
    /// longer than `original_max_position_embeddings / low_freq_factor` are divided by `factor`,
    /// and those in between are interpolated: with `smooth = (original / wavelen - low) / (high -
    /// low)`, `freq = (1 - smooth) · freq / factor + smooth · freq`.
    Llama3 { factor: f32, low_freq_factor: f32, high_freq_factor: f32, original_max_position_embeddings: u32 },
}

impl RopeScaling {
    /// Checks that the parameters make sense (positive factors, a non-empty interpolation band);
    /// the kernels would otherwise divide by zero.
    pub fn check(&self) -> Result<()> {
        match *self {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                ensure_shape!(factor.is_finite() && factor > 0.0, "rope scaling: factor {factor} must be positive");
            }
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                ensure_shape!(
                    factor.is_finite() && factor > 0.0,
                    "llama3 rope scaling: factor {factor} must be positive"
                );
                ensure_shape!(
                    low_freq_factor > 0.0 && high_freq_factor.is_finite() && high_freq_factor > low_freq_factor,
                    "llama3 rope scaling: need 0 < low_freq_factor ({low_freq_factor}) < high_freq_factor \
                     ({high_freq_factor})"
                );
                ensure_shape!(
                    original_max_position_embeddings > 0,
                    "llama3 rope scaling: original_max_position_embeddings is 0"
                );
            }
        }
        Ok(())
    }
}

/// Rotary embedding parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    /// The base of the frequencies (`rope_theta`).
    pub theta: f32,
    /// Which dimensions are rotated together.
    pub style: RopeStyle,
    /// How the frequencies are stretched.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// Checks the base and the scaling parameters.
    pub fn check(&self) -> Result<()> {
        ensure_shape!(self.theta.is_finite() && self.theta > 0.0, "rope: theta {} must be positive", self.theta);
        self.scaling.check()
    }
}

/// The row layout of a fused QKV projection's output: per token, `num_heads` query heads, then
/// `num_kv_heads` key heads, then `num_kv_heads` value heads, each `head_dim` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QkvLayout {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl QkvLayout {
    /// Values per token row.
    pub fn row_len(&self) -> usize {
        (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
    }

    /// Offset of the keys within a row.
    pub fn k_offset(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Offset of the values within a row.
    pub fn v_offset(&self) -> usize {
        (self.num_heads + self.num_kv_heads) * self.head_dim
    }

    /// Query heads that share one KV head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Checks the layout itself and that `qkv` holds `tokens` rows.
    pub fn check(&self, qkv_len: usize, tokens: usize) -> Result<()> {
        ensure_shape!(
            self.num_kv_heads > 0 && self.num_heads.is_multiple_of(self.num_kv_heads),
            "{} query heads are not a multiple of {} KV heads",
            self.num_heads,
            self.num_kv_heads
        );
        ensure_shape!(self.head_dim > 0 && self.head_dim.is_multiple_of(2), "head_dim {} must be even", self.head_dim);
        ensure_shape!(
            qkv_len == tokens * self.row_len(),
            "qkv has {qkv_len} values, expected {tokens} tokens x {}",
            self.row_len()
        );
        Ok(())
    }
}

/// The layout of one layer's paged K (or V) pool: `[num_blocks, block_size, num_kv_heads,
/// head_dim]`, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedKvLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl PagedKvLayout {
    /// Values in one pool.
    pub fn pool_len(&self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Values per token slot (all KV heads).
    pub fn slot_len(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Checks that the pools hold the KV heads of QKV rows laid out as `layout`; `what` names the
    /// operation in the error.
    pub fn check_holds(&self, layout: QkvLayout, what: &str) -> Result<()> {
        ensure_shape!(
            self.num_kv_heads == layout.num_kv_heads && self.head_dim == layout.head_dim,
            "{what}: cache holds {} heads of {}, qkv {} of {}",
            self.num_kv_heads,
            self.head_dim,
            layout.num_kv_heads,
            layout.head_dim
        );
        Ok(())
    }

    /// The slot (block id × block size + offset in the block) of position `pos` of a sequence whose
    /// block-table row is `table`, or `None` where the row holds no block for it (too short, or a
    /// negative id).
    pub fn slot_of(&self, table: &[i32], pos: usize) -> Option<usize> {
        let block = usize::try_from(*table.get(pos / self.block_size)?).ok()?;
        Some(block * self.block_size + pos % self.block_size)
    }

    /// Checks that every slot (= block id × block size + offset in the block) lies in the pools;
    /// `what` names the operation in the error.
    pub fn check_slots(&self, slots: &[u32], what: &str) -> Result<()> {
        let num_slots = self.num_blocks * self.block_size;
        if let Some(&bad) = slots.iter().find(|&&s| s as usize >= num_slots) {
            return Err(crate::Error::Shape(format!("{what}: slot {bad} is outside the pool of {num_slots}")));
        }
        Ok(())
    }

    /// Checks the layout and the pool lengths.
    pub fn check(&self, k_len: usize, v_len: usize) -> Result<()> {
        ensure_shape!(
            self.block_size.is_power_of_two() && (1..=256).contains(&self.block_size),
            "block size {} is not a power of two up to 256",
            self.block_size
        );
        ensure_shape!(
            k_len == self.pool_len() && v_len == self.pool_len(),
            "K/V pools have {k_len}/{v_len} values, the layout {self:?} needs {}",
            self.pool_len()
        );
        Ok(())
    }
}

/// A batch of sequences for attention over a paged KV cache. Sequence `i` owns query rows
/// `q_indptr[i]..q_indptr[i + 1]`, the last of its `kv_lens[i]` cached tokens; the first
/// `kv_lens[i] - q_len` are its prefix. Its blocks are `block_tables[i * max_blocks ..]`.
#[derive(Clone, Copy, Debug)]
pub struct AttentionBatch<'a> {
    pub q_indptr: &'a [u32],
    pub kv_lens: &'a [u32],
    pub block_tables: &'a [i32],
    pub max_blocks_per_seq: usize,
}

impl AttentionBatch<'_> {
    /// The number of sequences.
    pub fn num_seqs(&self) -> usize {
        self.kv_lens.len()
    }

    /// The number of query rows.
    pub fn num_tokens(&self) -> usize {
        self.q_indptr.last().map_or(0, |&n| n as usize)
    }

    /// Checks the batch against a cache layout: monotone offsets, every sequence's query rows
    /// within its KV length, and every block id it uses inside the pool.
    pub fn check(&self, cache: &PagedKvLayout) -> Result<()> {
        let n = self.num_seqs();
        ensure_shape!(
            self.q_indptr.len() == n + 1 && self.q_indptr[0] == 0,
            "q_indptr must have {} entries starting at 0",
            n + 1
        );
        ensure_shape!(
            self.block_tables.len() == n * self.max_blocks_per_seq,
            "block_tables has {} entries, expected {n} x {}",
            self.block_tables.len(),
            self.max_blocks_per_seq
        );
        for i in 0..n {
            let (start, end) = (self.q_indptr[i], self.q_indptr[i + 1]);
            ensure_shape!(start <= end, "q_indptr decreases at sequence {i}");
            let kv_len = self.kv_lens[i] as usize;
            ensure_shape!(
                (end - start) as usize <= kv_len,
                "sequence {i} has {} query tokens but only {kv_len} KV tokens",
                end - start
            );
            let blocks = kv_len.div_ceil(cache.block_size);
            ensure_shape!(
                blocks <= self.max_blocks_per_seq,
                "sequence {i} needs {blocks} blocks, the table has {}",
                self.max_blocks_per_seq
            );
            for &b in &self.block_tables[i * self.max_blocks_per_seq..][..blocks] {
                ensure_shape!(
                    b >= 0 && (b as usize) < cache.num_blocks,
                    "sequence {i} uses block {b}, the pool has {}",
                    cache.num_blocks
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_s_slot_comes_from_its_block() {
        let cache = PagedKvLayout { num_blocks: 8, block_size: 16, num_kv_heads: 2, head_dim: 64 };
        let row = [3, -1];
        assert_eq!(cache.slot_of(&row, 5), Some(3 * 16 + 5));
        assert_eq!(cache.slot_of(&row, 20), None, "a negative block id");
        assert_eq!(cache.slot_of(&row, 40), None, "past the row");
    }
}
