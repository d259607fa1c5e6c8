//! ggml storage types and their dequantization to f32.
//!
//! Block layouts follow ggml's `ggml-common.h` (facts of the format; the code is ours). A block
//! of a quantized type holds `block_elements()` values in `block_bytes()` bytes; scales are f16.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::{Error, ErrorKind, Result};

/// The storage type of a GGUF tensor, with ggml's numeric ids.
///
/// Every type ggml defines is listed, so that a file using one we cannot dequantize (the IQ and
/// ternary quants, MXFP4) still opens and its metadata and other tensors stay readable; only
/// [`dequantize`] of such a tensor fails, with [`ErrorKind::Unsupported`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgmlType {
    F32,
    F16,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q8_0,
    Q8_1,
    Q2K,
    Q3K,
    Q4K,
    Q5K,
    Q6K,
    Q8K,
    IQ2XXS,
    IQ2XS,
    IQ3XXS,
    IQ1S,
    IQ4NL,
    IQ3S,
    IQ2S,
    IQ4XS,
    I8,
    I16,
    I32,
    I64,
    F64,
    IQ1M,
    BF16,
    TQ1_0,
    TQ2_0,
    MXFP4,
}

/// K-quant super-block size.
const QK_K: usize = 256;

impl GgmlType {
    /// The type with ggml id `id`, or `None` for ids this reader does not know.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            6 => GgmlType::Q5_0,
            7 => GgmlType::Q5_1,
            8 => GgmlType::Q8_0,
            9 => GgmlType::Q8_1,
            10 => GgmlType::Q2K,
            11 => GgmlType::Q3K,
            12 => GgmlType::Q4K,
            13 => GgmlType::Q5K,
            14 => GgmlType::Q6K,
            15 => GgmlType::Q8K,
            16 => GgmlType::IQ2XXS,
            17 => GgmlType::IQ2XS,
            18 => GgmlType::IQ3XXS,
            19 => GgmlType::IQ1S,
            20 => GgmlType::IQ4NL,
            21 => GgmlType::IQ3S,
            22 => GgmlType::IQ2S,
            23 => GgmlType::IQ4XS,
            24 => GgmlType::I8,
            25 => GgmlType::I16,
            26 => GgmlType::I32,
            27 => GgmlType::I64,
            28 => GgmlType::F64,
            29 => GgmlType::IQ1M,
            30 => GgmlType::BF16,
            34 => GgmlType::TQ1_0,
            35 => GgmlType::TQ2_0,
            39 => GgmlType::MXFP4,
            _ => return None,
        })
    }

    /// Values per block (1 for plain types).
    pub fn block_elements(self) -> usize {
        match self {
            GgmlType::F32
            | GgmlType::F16
            | GgmlType::BF16
            | GgmlType::F64
            | GgmlType::I8
            | GgmlType::I16
            | GgmlType::I32
            | GgmlType::I64 => 1,
            GgmlType::Q4_0
            | GgmlType::Q4_1
            | GgmlType::Q5_0
            | GgmlType::Q5_1
            | GgmlType::Q8_0
            | GgmlType::Q8_1
            | GgmlType::IQ4NL
            | GgmlType::MXFP4 => 32,
            GgmlType::Q2K
            | GgmlType::Q3K
            | GgmlType::Q4K
            | GgmlType::Q5K
            | GgmlType::Q6K
            | GgmlType::Q8K
            | GgmlType::IQ2XXS
            | GgmlType::IQ2XS
            | GgmlType::IQ3XXS
            | GgmlType::IQ1S
            | GgmlType::IQ3S
            | GgmlType::IQ2S
            | GgmlType::IQ4XS
            | GgmlType::IQ1M
            | GgmlType::TQ1_0
            | GgmlType::TQ2_0 => QK_K,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            GgmlType::F32 | GgmlType::I32 => 4,
            GgmlType::F16 | GgmlType::BF16 | GgmlType::I16 => 2,
            GgmlType::I8 => 1,
            GgmlType::I64 | GgmlType::F64 => 8,
            GgmlType::Q4_0 => 2 + 16,
            GgmlType::Q4_1 => 2 + 2 + 16,
            GgmlType::Q5_0 => 2 + 4 + 16,
            GgmlType::Q5_1 => 2 + 2 + 4 + 16,
            GgmlType::Q8_0 => 2 + 32,
            // d and d * sum(qs) as f16 (gguf-py still lists the 40-byte layout of early ggml,
            // which had f32 there; ggml itself asserts 36).
            GgmlType::Q8_1 => 2 + 2 + 32,
            GgmlType::Q2K => QK_K / 16 + QK_K / 4 + 2 + 2,
            GgmlType::Q3K => QK_K / 8 + QK_K / 4 + 12 + 2,
            GgmlType::Q4K => 2 + 2 + 12 + QK_K / 2,
            GgmlType::Q5K => 2 + 2 + 12 + QK_K / 8 + QK_K / 2,
            GgmlType::Q6K => QK_K / 2 + QK_K / 4 + QK_K / 16 + 2,
            GgmlType::Q8K => 4 + QK_K + QK_K / 16 * 2,
            // The remaining sizes are those of ggml's block structs; we only need them to know
            // where such tensors end, since we cannot dequantize them.
            GgmlType::IQ2XXS => 2 + QK_K / 4,
            GgmlType::IQ2XS => 2 + QK_K / 4 + QK_K / 32,
            GgmlType::IQ3XXS => 2 + 3 * QK_K / 8,
            GgmlType::IQ1S => 2 + QK_K / 8 + QK_K / 16,
            GgmlType::IQ4NL => 2 + 16,
            GgmlType::IQ3S => 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4,
            GgmlType::IQ2S => 2 + QK_K / 4 + QK_K / 16,
            GgmlType::IQ4XS => 2 + 2 + QK_K / 64 + QK_K / 2,
            GgmlType::IQ1M => QK_K / 8 + QK_K / 16 + QK_K / 32,
            GgmlType::TQ1_0 => 2 + QK_K / 64 + (QK_K - 4 * QK_K / 64) / 5,
            GgmlType::TQ2_0 => 2 + QK_K / 4,
            GgmlType::MXFP4 => 1 + 16,
        }
    }
}

/// Dequantizes `n` values of type `ty` stored in `bytes` (exactly `n / block_elements` blocks).
pub fn dequantize(ty: GgmlType, bytes: &[u8], n: usize) -> Result<Vec<f32>> {
    let per_block = ty.block_elements();
    if !n.is_multiple_of(per_block) {
        return Err(Error::format(format!("{n} values of {ty:?} are not whole blocks of {per_block}")));
    }
    let blocks = n / per_block;
    if blocks.checked_mul(ty.block_bytes()) != Some(bytes.len()) {
        return Err(Error::format(format!(
            "{n} values of {ty:?} need {} bytes, got {}",
            blocks.saturating_mul(ty.block_bytes()),
            bytes.len()
        )));
    }
    let block_fn: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::BF16 => |b, y| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        GgmlType::Q4_0 => dequantize_q4_0,
        GgmlType::Q4_1 => dequantize_q4_1,
        GgmlType::Q5_0 => dequantize_q5_0,
        GgmlType::Q5_1 => dequantize_q5_1,
        GgmlType::Q8_0 => dequantize_q8_0,
        GgmlType::Q2K => dequantize_q2_k,
        GgmlType::Q3K => dequantize_q3_k,
        GgmlType::Q4K => dequantize_q4_k,
        GgmlType::Q5K => dequantize_q5_k,
        GgmlType::Q6K => dequantize_q6_k,
        other => {
            return Err(Error::new(ErrorKind::Unsupported, format!("dequantization of {other:?} is not implemented")));
        }
    };
    let mut out = alloc_f32(n)?;
    out.resize(n, 0.0);
    let convert = |(y, b): (&mut [f32], &[u8])| {
        for (y, b) in y.chunks_exact_mut(per_block).zip(b.chunks_exact(ty.block_bytes())) {
            block_fn(b, y);
        }
    };
    // Chunks of whole blocks, large enough that rayon's overhead does not matter; a tensor of one
    // chunk or less (norm weights, biases) is converted on this thread, as handing it to the pool
    // would cost more than the conversion.
    let blocks_per_chunk = (1 << 16) / per_block;
    let (chunk_values, chunk_bytes) = (blocks_per_chunk * per_block, blocks_per_chunk * ty.block_bytes());
    if n <= chunk_values {
        convert((&mut out, bytes));
    } else {
        out.par_chunks_mut(chunk_values).zip(bytes.par_chunks(chunk_bytes)).for_each(convert);
    }
    Ok(out)
}

/// An empty vector with room for `n` values, or an error when the memory is not there: a tensor
/// too big for this machine must fail its load, not abort the process.
pub(crate) fn alloc_f32(n: usize) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|e| {
        let bytes = n.saturating_mul(size_of::<f32>());
        Error::with_source(ErrorKind::Unsupported, format!("not enough memory for {n} values ({bytes} bytes)"), e)
    })?;
    Ok(out)
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

/// The 32 quants of a Q4_0/Q4_1/Q5_0/Q5_1 block, each passed through `value` into `y`: value `j`
/// has the low nibble of `qs[j]` and value `j + 16` its high nibble, with bit `j` of `qh` (the
/// little-endian fifth-bit word of the Q5 types; 0 for the Q4 types) as bit 4.
#[inline(always)]
fn dequantize_nibbles(qs: &[u8], qh: u32, y: &mut [f32], value: impl Fn(u32) -> f32) {
    for (j, &q) in qs[..16].iter().enumerate() {
        y[j] = value((q & 0x0f) as u32 | ((qh >> j) & 1) << 4);
        y[j + 16] = value((q >> 4) as u32 | ((qh >> (j + 16)) & 1) << 4);
    }
}

/// The fifth bits of a Q5_0/Q5_1 block: bit `j` of the little-endian `qh` word belongs to value `j`.
fn q5_high_bits(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// `d: f16, qs: [u8; 16]`; value = (nibble - 8) * d.
fn dequantize_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    dequantize_nibbles(&b[2..18], 0, y, |q| (q as i32 - 8) as f32 * d);
}

/// `d: f16, m: f16, qs: [u8; 16]`; value = nibble * d + m.
fn dequantize_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    dequantize_nibbles(&b[4..20], 0, y, |q| q as f32 * d + m);
}

/// `d: f16, qh: [u8; 4], qs: [u8; 16]`; value = ((nibble | fifth bit << 4) - 16) * d.
fn dequantize_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    dequantize_nibbles(&b[6..22], q5_high_bits(b, 2), y, |q| (q as i32 - 16) as f32 * d);
}

/// `d: f16, m: f16, qh: [u8; 4], qs: [u8; 16]`; value = (nibble | fifth bit << 4) * d + m.
fn dequantize_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    dequantize_nibbles(&b[8..24], q5_high_bits(b, 4), y, |q| q as f32 * d + m);
}

/// `d: f16, qs: [i8; 32]`; value = q * d.
fn dequantize_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = (q as i8) as f32 * d;
    }
}

/// The 2-bit planes of Q2_K and Q3_K: sixteen sub-blocks of 16 values; each 32-byte half of `qs`
/// holds 128 values as four 2-bit planes (shift 0, 2, 4, 6), and each plane is two sub-blocks of
/// 16. Calls `sub_block(i, out, q, shift)` for sub-block `i` with its 16 outputs and the 16 bytes
/// whose bits `shift..shift + 2` are its quants.
#[inline(always)]
fn for_each_plane_sub_block(qs: &[u8], y: &mut [f32], mut sub_block: impl FnMut(usize, &mut [f32], &[u8], u32)) {
    for (i, out) in y.chunks_exact_mut(16).enumerate() {
        let (half, plane, second) = (i / 8, (i / 2) % 4, i % 2);
        let at = 32 * half + 16 * second;
        sub_block(i, out, &qs[at..at + 16], 2 * plane as u32);
    }
}

/// `scales: [u8; 16], qs: [u8; 64], d: f16, dmin: f16`: 2-bit planes, each sub-block with a 4-bit
/// scale (low nibble) and 4-bit min (high nibble); value = d * scale * q - dmin * min.
fn dequantize_q2_k(b: &[u8], y: &mut [f32]) {
    let scales = &b[0..16];
    let d = f16_at(b, 80);
    let dmin = f16_at(b, 82);
    for_each_plane_sub_block(&b[16..80], y, |i, out, q, shift| {
        let dl = d * (scales[i] & 0x0f) as f32;
        let ml = dmin * (scales[i] >> 4) as f32;
        for (y, &q) in out.iter_mut().zip(q) {
            *y = dl * ((q >> shift) & 3) as f32 - ml;
        }
    });
}

/// The signed 6-bit scale of sub-block `i` (0..16) of a Q3_K block's 12 packed scale bytes: the
/// low 4 bits are nibbles of bytes 0..8 (low nibbles for sub-blocks 0..8, high ones for 8..16),
/// the high 2 bits are 2-bit fields of bytes 8..12, and the result is offset by 32.
fn scale_k3(i: usize, s: &[u8]) -> i32 {
    let low = if i < 8 { s[i] & 0x0f } else { s[i - 8] >> 4 };
    let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
    (low | high << 4) as i32 - 32
}

/// `hmask: [u8; 32], qs: [u8; 64], scales: [u8; 12], d: f16`: Q2_K's 2-bit planes, plus a third
/// bit from `hmask` (bit `k` of byte `l` for plane `k` of position `l`); a clear bit means the
/// value is lowered by 4. Value = d * scale * q for q in -4..=3.
fn dequantize_q3_k(b: &[u8], y: &mut [f32]) {
    let hmask = &b[0..32];
    let scales = &b[96..108];
    let d = f16_at(b, 108);
    for_each_plane_sub_block(&b[32..96], y, |i, out, q, shift| {
        let l0 = 16 * (i % 2);
        let hm = &hmask[l0..l0 + 16];
        // Plane k of the first 128 values uses hmask bit k, of the second 128 bit 4 + k.
        let hbit = i / 2;
        let dl = d * scale_k3(i, scales) as f32;
        for ((y, &q), &h) in out.iter_mut().zip(q).zip(hm) {
            let low = ((q >> shift) & 3) as i32;
            let v = if (h >> hbit) & 1 == 1 { low } else { low - 4 };
            *y = dl * v as f32;
        }
    });
}

/// The 6-bit scale and min of sub-block `j` of a Q4_K/Q5_K block's packed 12 scale bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// The part Q4_K and Q5_K share: `d: f16, dmin: f16, scales: [u8; 12]` at the block's start, then
/// eight sub-blocks of 32 values, each with a 6-bit scale and min; sub-blocks `2c` and `2c + 1` are
/// the low and high nibbles of `qs[32c..32c + 32]`. Value `l` of sub-block `j` is
/// d * scale * q - dmin * min with q = nibble | (bit `j` of `fifth_bits(l)`) << 4.
#[inline(always)]
fn dequantize_k4_sub_blocks(b: &[u8], qs: &[u8], y: &mut [f32], fifth_bits: impl Fn(usize) -> u8) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    for chunk in 0..4 {
        let q = &qs[32 * chunk..32 * chunk + 32];
        let (j1, j2) = (2 * chunk, 2 * chunk + 1);
        let (sc1, m1) = scale_min_k4(j1, scales);
        let (sc2, m2) = scale_min_k4(j2, scales);
        let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
        let out = &mut y[64 * chunk..64 * chunk + 64];
        for l in 0..32 {
            let h = fifth_bits(l);
            out[l] = d1 * ((q[l] & 0x0f) | ((h >> j1) & 1) << 4) as f32 - min1;
            out[l + 32] = d2 * ((q[l] >> 4) | ((h >> j2) & 1) << 4) as f32 - min2;
        }
    }
}

/// `d: f16, dmin: f16, scales: [u8; 12], qs: [u8; 128]`: value = d * scale * nibble - dmin * min.
fn dequantize_q4_k(b: &[u8], y: &mut [f32]) {
    dequantize_k4_sub_blocks(b, &b[16..144], y, |_| 0);
}

/// `d: f16, dmin: f16, scales: [u8; 12], qh: [u8; 32], qs: [u8; 128]`: Q4_K plus a fifth bit
/// per value from `qh`, bit `j` of byte `l` for sub-block `j` (position `l` within it).
fn dequantize_q5_k(b: &[u8], y: &mut [f32]) {
    let qh = &b[16..48];
    dequantize_k4_sub_blocks(b, &b[48..176], y, |l| qh[l]);
}

/// `ql: [u8; 128], qh: [u8; 64], scales: [i8; 16], d: f16`: 6-bit values (low 4 bits in `ql`,
/// high 2 in `qh`) minus 32, times d and a signed 8-bit scale per 16 values.
fn dequantize_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let out = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            // Values l + 32p (p = 0..4): the low or high nibble (p / 2) of ql[l] or ql[l + 32]
            // (p % 2), bits 2p, 2p + 1 of qh[l], and the scale of their 16 values.
            for p in 0..4 {
                let low = (ql[l + 32 * (p % 2)] >> (4 * (p / 2))) & 0x0f;
                let q = (low | ((qh[l] >> (2 * p)) & 3) << 4) as i32 - 32;
                out[l + 32 * p] = d * (sc[l / 16 + 2 * p] as i8) as f32 * q as f32;
            }
        }
    }
}
