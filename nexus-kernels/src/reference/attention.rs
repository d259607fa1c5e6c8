//! Causal attention over a paged KV cache: `prefill_attention` for chunks of prompt tokens,
//! `decode_attention` for one new token per sequence.

use half::bf16;
use rayon::prelude::*;

use super::elementwise::rope_and_write_kv;
use super::gemm::dot;
use crate::Result;
use crate::error::ensure_shape;
use crate::layout::{AttentionBatch, PagedKvLayout, QkvLayout, RopeConfig};

/// Attention of a batch of prompt chunks. Query row `j` of sequence `i` sits at position
/// `kv_lens[i] - q_len + j` and attends to cached positions `0..=` that one (its prefix and the
/// chunk's earlier tokens, which must already be written to the cache). Queries come from the
/// fused QKV buffer `[tokens, layout.row_len()]`; `out: [tokens, num_heads × head_dim]`.
#[allow(clippy::too_many_arguments)] // The kernel's own argument list.
pub fn prefill_attention(
    qkv: &[f32],
    layout: QkvLayout,
    k_cache: &[f32],
    v_cache: &[f32],
    cache: PagedKvLayout,
    batch: AttentionBatch<'_>,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let tokens = batch.num_tokens();
    layout.check(qkv.len(), tokens)?;
    cache.check(k_cache.len(), v_cache.len())?;
    batch.check(&cache)?;
    cache.check_holds(layout, "attention")?;
    let d = layout.head_dim;
    let q_width = layout.num_heads * d;
    ensure_shape!(out.len() == tokens * q_width, "attention: out is not [{tokens}, {q_width}]");

    // For every query row: its sequence and its position.
    let mut row_seq = Vec::with_capacity(tokens);
    for i in 0..batch.num_seqs() {
        let q_len = batch.q_indptr[i + 1] - batch.q_indptr[i];
        let first = batch.kv_lens[i] - q_len;
        row_seq.extend((0..q_len).map(|j| (i, (first + j) as usize)));
    }
    out.par_chunks_mut(q_width).enumerate().for_each(|(t, out_row)| {
        let (seq, pos) = row_seq[t];
        let table = &batch.block_tables[seq * batch.max_blocks_per_seq..][..batch.max_blocks_per_seq];
        let q_row = &qkv[t * layout.row_len()..][..q_width];
        let mut scores = vec![0f32; pos + 1];
        for head in 0..layout.num_heads {
            let kv_head = head / layout.group_size();
            let q = &q_row[head * d..][..d];
            let slot_of = |p: usize| {
                let block = table[p / cache.block_size] as usize;
                ((block * cache.block_size + p % cache.block_size) * cache.num_kv_heads + kv_head) * d
            };
            let mut max = f32::NEG_INFINITY;
            for (p, s) in scores.iter_mut().enumerate() {
                *s = dot(q, &k_cache[slot_of(p)..][..d]) * scale;
                max = max.max(*s);
            }
            let mut sum = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out_row[head * d..][..d];
            o.fill(0.0);
            for (p, &s) in scores.iter().enumerate() {
                let w = s / sum;
                for (o, &v) in o.iter_mut().zip(&v_cache[slot_of(p)..][..d]) {
                    *o += w * v;
                }
            }
        }
    });
    Ok(())
}

/// Attention of one new token per sequence (its query in row `i` of `qkv`) over the sequence's
/// `kv_lens[i]` cached tokens, the new one included.
#[allow(clippy::too_many_arguments)] // The kernel's own argument list.
pub fn decode_attention(
    qkv: &[f32],
    layout: QkvLayout,
    k_cache: &[f32],
    v_cache: &[f32],
    cache: PagedKvLayout,
    kv_lens: &[u32],
    block_tables: &[i32],
    max_blocks_per_seq: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let q_indptr: Vec<u32> = (0..=kv_lens.len() as u32).collect();
    let batch = AttentionBatch { q_indptr: &q_indptr, kv_lens, block_tables, max_blocks_per_seq };
    prefill_attention(qkv, layout, k_cache, v_cache, cache, batch, scale, out)
}

/// The step's new tokens rotated and written into the pools, then [`decode_attention`]: what the
/// fused kernel does in one launch. Sequence `i`'s new token is row `i` of `qkv` and the last of
/// its KV: [`rope_and_write_kv`] at position `kv_lens[i] - 1`, into the slot `block_tables` gives
/// that position. The rotated heads are rounded to bf16 before the attention, as the pools hold
/// them (and the unfused kernels write them back). `qkv` is left as it is.
#[allow(clippy::too_many_arguments)] // The kernel's own argument list.
pub fn decode_attention_rope(
    qkv: &[f32],
    layout: QkvLayout,
    rope: RopeConfig,
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    cache: PagedKvLayout,
    kv_lens: &[u32],
    block_tables: &[i32],
    max_blocks_per_seq: usize,
    scale: f32,
    out: &mut [f32],
) -> Result<()> {
    let mut positions = Vec::with_capacity(kv_lens.len());
    let mut slots = Vec::with_capacity(kv_lens.len());
    for (i, &len) in kv_lens.iter().enumerate() {
        ensure_shape!(len > 0, "decode_attention_rope: sequence {i} has no tokens");
        let pos = len as usize - 1;
        let row = block_tables.get(i * max_blocks_per_seq..).map_or(&[][..], |r| &r[..max_blocks_per_seq.min(r.len())]);
        let Some(slot) = cache.slot_of(row, pos) else {
            return Err(crate::Error::Shape(format!(
                "decode_attention_rope: sequence {i}'s table has no block for position {pos}"
            )));
        };
        positions.push(pos as u32);
        slots.push(slot as u32);
    }
    let mut rotated = qkv.to_vec();
    rope_and_write_kv(&mut rotated, &positions, layout, rope, &slots, k_cache, v_cache, cache)?;
    let round = |x: &mut f32| *x = bf16::from_f32(*x).to_f32();
    rotated.iter_mut().for_each(round);
    let slot_len = cache.slot_len();
    for &slot in &slots {
        k_cache[slot as usize * slot_len..][..slot_len].iter_mut().for_each(round);
        v_cache[slot as usize * slot_len..][..slot_len].iter_mut().for_each(round);
    }
    decode_attention(&rotated, layout, k_cache, v_cache, cache, kv_lens, block_tables, max_blocks_per_seq, scale, out)
}
