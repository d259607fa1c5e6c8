//! A small, memory-mapped GGUF reader.
//!
//! GGUF (llama.cpp's model format) is a header, a list of typed metadata key/values, a list of
//! tensor descriptions, and an aligned data section. [`GgufFile::open`] maps the file and parses
//! everything but the tensor data; [`GgufFile::tensor_f32`] dequantizes one tensor on demand.
//! Every length and offset read from the file is checked against the bytes that are really there,
//! so a truncated or corrupted file gives an [`ErrorKind::Format`](crate::ErrorKind::Format) error
//! naming the problem, never a panic or an absurd allocation.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::Path;

use rayon::prelude::*;

use crate::weights::dequant::{self, GgmlType};
use crate::weights::loader::check_regular_file;
use crate::{Error, Result};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
}

impl MetadataValue {
    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, if it is a float or an integer.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, if it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The value as an array, if it is one.
    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// Where one tensor lives in the file and how it is stored.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorInfo {
    /// The tensor's name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` is the fastest-varying (the row length).
    pub dims: Vec<u64>,
    /// Storage type.
    pub ty: GgmlType,
    /// Byte offset of the data from the start of the file.
    pub offset: usize,
    /// Byte length of the data.
    pub len: usize,
}

impl TensorInfo {
    /// The shape in row-major order (the reverse of [`TensorInfo::dims`]), e.g. `[rows, cols]`.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// The number of elements.
    pub fn num_elements(&self) -> usize {
        self.dims.iter().product::<u64>() as usize
    }
}

/// A dense row-major f32 tensor on the host.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Refuses a tensor that holds a NaN or an infinity, naming it (`name`) and the first such
    /// value's index: a weight like that turns every output it touches into NaN, which no check
    /// downstream can tell from a model that merely answers badly.
    pub fn check_finite(&self, name: &str) -> Result<()> {
        // Chunks are scanned in parallel, except in a tensor of one chunk (norms, biases), which
        // this thread scans faster than the pool would start.
        const CHUNK: usize = 1 << 16;
        let first_bad = |c: &[f32]| c.iter().position(|v| !v.is_finite());
        let flat = if self.data.len() <= CHUNK {
            first_bad(&self.data)
        } else {
            self.data.par_chunks(CHUNK).enumerate().find_map_first(|(i, c)| Some(i * CHUNK + first_bad(c)?))
        };
        let Some(flat) = flat else { return Ok(()) };
        let value = self.data[flat];
        // The row-major index of element `flat`, outermost first.
        let mut index = vec![0; self.shape.len()];
        let mut rest = flat;
        for (i, &d) in index.iter_mut().zip(&self.shape).rev() {
            *i = rest % d.max(1);
            rest /= d.max(1);
        }
        Err(Error::format(format!("tensor `{name}` holds {value} at {index:?}: the weights are corrupt")))
    }
}

enum Bytes {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed GGUF file: metadata and tensor infos, with the tensor data mapped but not read.
pub struct GgufFile {
    version: u32,
    metadata: BTreeMap<String, MetadataValue>,
    tensors: Vec<TensorInfo>,
    /// Index into `tensors` by name, since models look tensors up by name hundreds of times.
    by_name: HashMap<String, usize>,
    alignment: u64,
    bytes: Bytes,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .finish()
    }
}

impl GgufFile {
    /// Maps and parses the file at `path`.
    pub fn open(path: &Path) -> Result<Self> {
        check_regular_file(path)?;
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and private to this value; a model file changed on disk
        // while it is mapped is outside what we guard against (as in every mmap-based loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        Self::parse(Bytes::Mapped(map))
            .map_err(|e| Error::new(e.kind(), format!("{}: {}", path.display(), e.message())))
    }

    /// Parses a GGUF image held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self> {
        Self::parse(Bytes::Owned(bytes))
    }

    fn parse(bytes: Bytes) -> Result<Self> {
        let mut r = Reader { buf: &bytes, pos: 0 };
        let magic = r.take(4, "magic")?;
        if magic != MAGIC {
            return Err(Error::format(format!("not a GGUF file (magic {magic:02x?}, expected \"GGUF\")")));
        }
        let version = r.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(Error::format(format!("unsupported GGUF version {version} (2 and 3 are supported)")));
        }
        let tensor_count = r.u64("tensor count")?;
        let kv_count = r.u64("metadata count")?;
        // Each key/value takes at least 12 bytes and each tensor info at least 24.
        r.check_count(kv_count, 12, "metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..kv_count {
            let key = r.string(&format!("key of metadata entry {i}"))?;
            let ty = r.u32(&format!("type of metadata `{key}`"))?;
            let value = r.value(ty, &key, 0)?;
            if metadata.insert(key.clone(), value).is_some() {
                return Err(Error::format(format!("metadata key `{key}` appears twice")));
            }
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a.is_power_of_two() && a <= 1 << 16 => a,
                _ => {
                    return Err(Error::format(format!("general.alignment {v:?} is not a power of two <= 65536")));
                }
            },
        };
        r.check_count(tensor_count, 24, "tensor count")?;
        let mut raw = Vec::with_capacity(tensor_count as usize);
        for i in 0..tensor_count {
            let name = r.string(&format!("name of tensor {i}"))?;
            let n_dims = r.u32(&format!("dimension count of tensor `{name}`"))?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::format(format!(
                    "tensor `{name}` has {n_dims} dimensions (1 to {MAX_DIMS} allowed)"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for d in 0..n_dims {
                dims.push(r.u64(&format!("dimension {d} of tensor `{name}`"))?);
            }
            let ty_id = r.u32(&format!("type of tensor `{name}`"))?;
            let ty = GgmlType::from_id(ty_id)
                .ok_or_else(|| Error::format(format!("tensor `{name}` has unknown ggml type {ty_id}")))?;
            let offset = r.u64(&format!("offset of tensor `{name}`"))?;
            raw.push((name, dims, ty, offset));
        }
        // The data section may start past the end of the file when no tensor has bytes in it (a
        // vocabulary-only file need not be padded); each tensor's own bounds are checked below.
        let data_start = (r.pos as u64).next_multiple_of(alignment);
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::with_capacity(raw.len());
        for (name, dims, ty, offset) in raw {
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(Error::format(format!("tensor `{name}` appears twice")));
            }
            let elements = dims
                .iter()
                .try_fold(1u64, |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| Error::format(format!("tensor `{name}`: element count overflows")))?;
            if !dims[0].is_multiple_of(ty.block_elements() as u64) {
                return Err(Error::format(format!(
                    "tensor `{name}`: row length {} is not a multiple of the {ty:?} block size {}",
                    dims[0],
                    ty.block_elements()
                )));
            }
            let len = (elements / ty.block_elements() as u64)
                .checked_mul(ty.block_bytes() as u64)
                .ok_or_else(|| Error::format(format!("tensor `{name}`: byte size overflows")))?;
            if !offset.is_multiple_of(alignment) {
                return Err(Error::format(format!("tensor `{name}`: offset {offset} is not aligned to {alignment}")));
            }
            let start = data_start.checked_add(offset);
            let end = start.and_then(|s| s.checked_add(len));
            match (start, end) {
                (Some(start), Some(end)) if end <= bytes.len() as u64 => {
                    tensors.push(TensorInfo { name, dims, ty, offset: start as usize, len: len as usize })
                }
                _ => {
                    return Err(Error::format(format!(
                        "tensor `{name}`: data ({len} bytes at offset {offset}) runs past the end of the file ({} bytes)",
                        bytes.len()
                    )));
                }
            }
        }
        Ok(GgufFile { version, metadata, tensors, by_name, alignment, bytes })
    }

    /// The GGUF version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The alignment of the data section.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// All metadata, by key.
    pub fn metadata(&self) -> &BTreeMap<String, MetadataValue> {
        &self.metadata
    }

    /// One metadata value.
    pub fn get(&self, key: &str) -> Option<&MetadataValue> {
        self.metadata.get(key)
    }

    /// A required metadata value, or a format error naming the missing key.
    pub fn require(&self, key: &str) -> Result<&MetadataValue> {
        self.get(key).ok_or_else(|| Error::format(format!("metadata key `{key}` is missing")))
    }

    /// All tensor infos, in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The info of the tensor called `name`.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    /// The raw stored bytes of a tensor.
    pub fn tensor_bytes(&self, info: &TensorInfo) -> &[u8] {
        &self.bytes[info.offset..info.offset + info.len]
    }

    /// Dequantizes the tensor called `name` to f32, in row-major shape.
    pub fn tensor_f32(&self, name: &str) -> Result<HostTensor> {
        let info = self.tensor_info(name).ok_or_else(|| Error::format(format!("tensor `{name}` is missing")))?;
        let data = dequant::dequantize(info.ty, self.tensor_bytes(info), info.num_elements())
            .map_err(|e| Error::new(e.kind(), format!("tensor `{name}`: {}", e.message())))?;
        Ok(HostTensor { shape: info.shape(), data })
    }
}

/// Value type ids of GGUF metadata.
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

/// Arrays of arrays are legal GGUF; deeper nesting than this is treated as corruption.
const MAX_ARRAY_NESTING: u32 = 8;

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            Error::format(format!(
                "truncated: {what} needs {n} bytes at offset {}, but the file has {} bytes",
                self.pos,
                self.buf.len()
            ))
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Rejects a count whose smallest possible encoding is larger than what is left of the file,
    /// before anything is allocated for it.
    fn check_count(&self, count: u64, min_bytes_each: u64, what: &str) -> Result<()> {
        let left = (self.buf.len() - self.pos) as u64;
        if count.saturating_mul(min_bytes_each) > left {
            return Err(Error::format(format!(
                "{what} {count} cannot fit in the {left} bytes left at offset {}",
                self.pos
            )));
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let len = self.u64(what)?;
        let left = self.buf.len() - self.pos;
        if len > left as u64 {
            return Err(Error::format(format!(
                "{what}: string length {len} runs past the end of the file ({left} bytes left at offset {})",
                self.pos
            )));
        }
        let bytes = self.take(len as usize, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| Error::format(format!("{what} is not valid UTF-8")))
    }

    fn value(&mut self, ty: u32, key: &str, depth: u32) -> Result<MetadataValue> {
        use value_type as t;
        let what = || format!("value of metadata `{key}`");
        Ok(match ty {
            t::U8 => MetadataValue::U8(u8::from_le_bytes(self.array(&what())?)),
            t::I8 => MetadataValue::I8(i8::from_le_bytes(self.array(&what())?)),
            t::U16 => MetadataValue::U16(u16::from_le_bytes(self.array(&what())?)),
            t::I16 => MetadataValue::I16(i16::from_le_bytes(self.array(&what())?)),
            t::U32 => MetadataValue::U32(u32::from_le_bytes(self.array(&what())?)),
            t::I32 => MetadataValue::I32(i32::from_le_bytes(self.array(&what())?)),
            t::U64 => MetadataValue::U64(u64::from_le_bytes(self.array(&what())?)),
            t::I64 => MetadataValue::I64(i64::from_le_bytes(self.array(&what())?)),
            t::F32 => MetadataValue::F32(f32::from_le_bytes(self.array(&what())?)),
            t::F64 => MetadataValue::F64(f64::from_le_bytes(self.array(&what())?)),
            t::BOOL => match self.array::<1>(&what())?[0] {
                0 => MetadataValue::Bool(false),
                1 => MetadataValue::Bool(true),
                b => {
                    return Err(Error::format(format!("metadata `{key}`: bool byte {b} is neither 0 nor 1")));
                }
            },
            t::STRING => MetadataValue::String(self.string(&what())?),
            t::ARRAY => {
                if depth >= MAX_ARRAY_NESTING {
                    return Err(Error::format(format!("metadata `{key}`: arrays nested too deeply")));
                }
                let elem_ty = self.u32(&format!("element type of metadata `{key}`"))?;
                let count = self.u64(&format!("length of metadata `{key}`"))?;
                let min_size = match elem_ty {
                    t::U8 | t::I8 | t::BOOL => 1,
                    t::U16 | t::I16 => 2,
                    t::U32 | t::I32 | t::F32 => 4,
                    t::U64 | t::I64 | t::F64 | t::STRING => 8,
                    t::ARRAY => 12,
                    other => {
                        return Err(Error::format(format!("metadata `{key}`: unknown array element type {other}")));
                    }
                };
                self.check_count(count, min_size, &format!("length of metadata `{key}`"))?;
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem_ty, key, depth + 1)?);
                }
                MetadataValue::Array(items)
            }
            other => {
                return Err(Error::format(format!("metadata `{key}` has unknown value type {other}")));
            }
        })
    }
}
