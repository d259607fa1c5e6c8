//! The streaming read: per-CTA XOR checksums of a buffer's words.

use crate::Result;
use crate::error::ensure_shape;

/// Words the kernel deals out to one CTA at a time: one 16-byte vector (4 words) for each of its
/// 1024 threads.
const CHUNK_WORDS: usize = 1024 * 4;

/// What [`crate::stream_read::stream_read`] writes with `checksums.len()` CTAs: the buffer is cut
/// into chunks of 4096 words (the last one may be shorter), chunk `j` goes to CTA `j %
/// checksums.len()`, and `checksums[c]` is the XOR of every word of CTA `c`'s chunks (0 when it has
/// none). `data` holds whole 16-byte vectors: a multiple of 4 words.
pub fn stream_read(data: &[u32], checksums: &mut [u32]) -> Result<()> {
    ensure_shape!(data.len().is_multiple_of(4), "stream_read: {} words are not whole 16-byte vectors", data.len());
    ensure_shape!(!checksums.is_empty(), "stream_read: no checksums, so no CTA to read with");
    checksums.fill(0);
    let ctas = checksums.len();
    for (j, chunk) in data.chunks(CHUNK_WORDS).enumerate() {
        checksums[j % ctas] ^= chunk.iter().fold(0, |acc, &w| acc ^ w);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_go_round_robin() {
        // Five whole chunks and a short sixth; the first word of chunk j is 1 << j, the rest zero.
        let mut data = vec![0u32; 5 * CHUNK_WORDS + 8];
        for j in 0..6 {
            data[j * CHUNK_WORDS] = 1 << j;
        }
        let mut checksums = [u32::MAX; 3];
        stream_read(&data, &mut checksums).unwrap();
        assert_eq!(checksums, [1 | 1 << 3, 1 << 1 | 1 << 4, 1 << 2 | 1 << 5]);
        // More CTAs than chunks: the idle ones read nothing.
        let mut checksums = [u32::MAX; 8];
        stream_read(&data, &mut checksums).unwrap();
        assert_eq!(checksums, [1, 2, 4, 8, 16, 32, 0, 0]);
    }

    #[test]
    fn rejects_partial_vectors_and_no_ctas() {
        assert!(stream_read(&[1, 2, 3], &mut [0]).is_err());
        assert!(stream_read(&[1, 2, 3, 4], &mut []).is_err());
    }
}
