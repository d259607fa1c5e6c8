//! The GGUF reader and dequantization, checked against values computed independently by llama.cpp's
//! `gguf` Python package, against the real SmolLM2 model file, and against malformed images.

use std::path::{Path, PathBuf};

use nexus::runtime::weights::config::WeightSource;
use nexus::runtime::weights::dequant::{GgmlType, dequantize};
use nexus::runtime::weights::gguf::{GgufFile, MetadataValue as V};
use nexus::runtime::weights::gguf_weights::GgufModel;
use nexus::runtime::{Error, ErrorKind};
use serde::Deserialize;

fn workspace_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn fixture() -> GgufFile {
    let path = workspace_path("tests/fixtures/gguf/dequant.gguf");
    GgufFile::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (regenerate with scripts/make-gguf-fixtures.py)", path.display()))
}

/// The metadata scripts/make-gguf-fixtures.py writes, one key per value type.
fn fixture_metadata() -> Vec<(&'static str, V)> {
    let ints = |v: &[i32]| V::Array(v.iter().map(|&x| V::I32(x)).collect());
    vec![
        ("general.architecture", V::String("nexus-test".into())),
        ("test.u8", V::U8(255)),
        ("test.i8", V::I8(-128)),
        ("test.u16", V::U16(65535)),
        ("test.i16", V::I16(-32768)),
        ("test.u32", V::U32(u32::MAX)),
        ("test.i32", V::I32(i32::MIN)),
        ("test.u64", V::U64(u64::MAX)),
        ("test.i64", V::I64(i64::MIN)),
        ("test.f32", V::F32(std::f32::consts::PI)),
        ("test.f64", V::F64(-1.2345678901234567e-100)),
        ("test.bool_true", V::Bool(true)),
        ("test.bool_false", V::Bool(false)),
        ("test.string", V::String("héllo, wörld ✓".into())),
        ("test.array_i32", ints(&[1, -2, 3, -4, i32::MAX])),
        ("test.array_u64", V::Array(vec![V::U64(0), V::U64(1), V::U64(u64::MAX)])),
        ("test.array_f32", V::Array(vec![V::F32(0.5), V::F32(-1.25), V::F32(1e-3)])),
        ("test.array_bool", V::Array(vec![V::Bool(true), V::Bool(false), V::Bool(true)])),
        ("test.array_string", V::Array(["a", "", "ccc", "ü"].iter().map(|s| V::String((*s).into())).collect())),
        ("test.array_nested", V::Array(vec![ints(&[1, 2]), ints(&[3]), ints(&[4, 5, 6])])),
    ]
}

#[test]
fn gguf_fixture_metadata_reads_back_exactly() {
    let file = fixture();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    let expected = fixture_metadata();
    for (key, value) in &expected {
        assert_eq!(file.get(key), Some(value), "metadata `{key}`");
    }
    assert_eq!(file.metadata().len(), expected.len(), "keys: {:?}", file.metadata().keys());
    let missing = file.require("test.absent").expect_err("absent key");
    assert_eq!(missing.kind(), ErrorKind::Format);
    assert!(missing.message().contains("test.absent"), "{missing}");
}

#[test]
fn gguf_metadata_value_conversions() {
    assert_eq!(V::U8(7).as_u64(), Some(7));
    assert_eq!(V::I8(-1).as_u64(), None);
    assert_eq!(V::I8(-1).as_i64(), Some(-1));
    assert_eq!(V::U64(u64::MAX).as_i64(), None);
    assert_eq!(V::U32(3).as_f64(), Some(3.0));
    assert_eq!(V::F32(0.5).as_f64(), Some(0.5));
    assert_eq!(V::String("x".into()).as_str(), Some("x"));
    assert_eq!(V::Bool(true).as_bool(), Some(true));
    assert_eq!(V::Bool(true).as_u64(), None);
    assert_eq!(V::Array(vec![V::U8(1)]).as_array().map(<[V]>::len), Some(1));
}

/// One tensor of dequant-expected.json (layout documented in scripts/make-gguf-fixtures.py).
#[derive(Deserialize)]
struct ExpectedTensor {
    name: String,
    #[serde(rename = "type")]
    ty: String,
    shape: Vec<usize>,
    values: Vec<f64>,
}

#[derive(Deserialize)]
struct Expected {
    tensors: Vec<ExpectedTensor>,
}

/// The ggml type gguf-py calls `name`.
fn ggml_type_named(name: &str) -> GgmlType {
    match name {
        "F32" => GgmlType::F32,
        "F16" => GgmlType::F16,
        "BF16" => GgmlType::BF16,
        "Q4_0" => GgmlType::Q4_0,
        "Q4_1" => GgmlType::Q4_1,
        "Q5_0" => GgmlType::Q5_0,
        "Q5_1" => GgmlType::Q5_1,
        "Q8_0" => GgmlType::Q8_0,
        "Q2_K" => GgmlType::Q2K,
        "Q3_K" => GgmlType::Q3K,
        "Q4_K" => GgmlType::Q4K,
        "Q5_K" => GgmlType::Q5K,
        "Q6_K" => GgmlType::Q6K,
        other => panic!("fixture has a tensor of type {other} the test does not know"),
    }
}

/// Both sides compute in f32 with the same operations, so the values should agree bit for bit;
/// the tolerance only allows for a different but equally valid order of f32 operations.
fn assert_close(name: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{name}: value count");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let w = w as f32;
        let tolerance = 1e-6 * g.abs().max(w.abs());
        assert!((g - w).abs() <= tolerance, "{name}[{i}]: got {g}, gguf-py gives {w}");
    }
}

#[test]
fn gguf_fixture_tensors_match_gguf_py() {
    let file = fixture();
    let text = std::fs::read_to_string(workspace_path("tests/fixtures/gguf/dequant-expected.json")).expect("read json");
    let expected: Expected = serde_json::from_str(&text).expect("parse json");
    assert_eq!(file.tensors().len(), expected.tensors.len());
    let mut types = Vec::new();
    for want in &expected.tensors {
        let info = file.tensor_info(&want.name).unwrap_or_else(|| panic!("tensor `{}` missing", want.name));
        assert_eq!(info.ty, ggml_type_named(&want.ty), "{}", want.name);
        assert_eq!(info.shape(), want.shape, "{}", want.name);
        assert_eq!(info.num_elements(), want.values.len(), "{}", want.name);
        assert_eq!(info.offset as u64 % file.alignment(), 0, "{}: data start is aligned", want.name);
        let got = file.tensor_f32(&want.name).expect("dequantize");
        assert_eq!(got.shape, want.shape);
        assert_close(&want.name, &got.data, &want.values);
        types.push(info.ty);
    }
    // The fixture must keep covering every type we dequantize.
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q2K,
        GgmlType::Q3K,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        assert!(types.contains(&ty), "fixture has no {ty:?} tensor");
    }
}

#[test]
fn gguf_fixture_from_bytes_matches_open() {
    let bytes = std::fs::read(workspace_path("tests/fixtures/gguf/dequant.gguf")).expect("read fixture");
    let mapped = fixture();
    let owned = GgufFile::from_bytes(bytes).expect("parse");
    assert_eq!(owned.metadata(), mapped.metadata());
    assert_eq!(owned.tensors(), mapped.tensors());
    for info in owned.tensors() {
        assert_eq!(owned.tensor_bytes(info), mapped.tensor_bytes(info));
    }
}

#[test]
fn gguf_fixture_truncated_anywhere_is_an_error() {
    let bytes = std::fs::read(workspace_path("tests/fixtures/gguf/dequant.gguf")).expect("read fixture");
    let file = GgufFile::from_bytes(bytes.clone()).expect("parse");
    // gguf-py pads the file after the last tensor; cutting only padding leaves a valid file.
    let data_end = file.tensors().iter().map(|t| t.offset + t.len).max().expect("tensors");
    for len in 0..bytes.len() {
        let result = GgufFile::from_bytes(bytes[..len].to_vec());
        if len < data_end {
            let e = result.expect_err("truncated file parsed");
            assert_eq!(e.kind(), ErrorKind::Format, "prefix of {len} bytes: {e}");
        } else {
            assert!(result.is_ok(), "prefix of {len} bytes keeps all tensor data: {:?}", result.err());
        }
    }
}

#[test]
fn gguf_block_sizes_match_ggml() {
    // (id, values per block, bytes per block) from gguf-py's GGML_QUANT_SIZES, except Q8_1, where
    // gguf-py still has the 40-byte block of early ggml and ggml's own block_q8_1 is 36 bytes.
    let table: &[(u32, usize, usize)] = &[
        (0, 1, 4),
        (1, 1, 2),
        (2, 32, 18),
        (3, 32, 20),
        (6, 32, 22),
        (7, 32, 24),
        (8, 32, 34),
        (9, 32, 36),
        (10, 256, 84),
        (11, 256, 110),
        (12, 256, 144),
        (13, 256, 176),
        (14, 256, 210),
        (15, 256, 292),
        (16, 256, 66),
        (17, 256, 74),
        (18, 256, 98),
        (19, 256, 50),
        (20, 32, 18),
        (21, 256, 110),
        (22, 256, 82),
        (23, 256, 136),
        (24, 1, 1),
        (25, 1, 2),
        (26, 1, 4),
        (27, 1, 8),
        (28, 1, 8),
        (29, 256, 56),
        (30, 1, 2),
        (34, 256, 54),
        (35, 256, 66),
        (39, 32, 17),
    ];
    for &(id, elements, bytes) in table {
        let ty = GgmlType::from_id(id).unwrap_or_else(|| panic!("ggml type {id} unknown"));
        assert_eq!((ty.block_elements(), ty.block_bytes()), (elements, bytes), "{ty:?}");
    }
    // Ids ggml retired (Q4_2, Q4_3) or never assigned.
    for id in [4, 5, 31, 32, 33, 36, 37, 38, 1000] {
        assert_eq!(GgmlType::from_id(id), None, "id {id}");
    }
}

#[test]
fn gguf_dequantize_checks_its_input() {
    let e = dequantize(GgmlType::Q8_0, &[0; 34], 16).expect_err("half a block");
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(e.message().contains("not whole blocks"), "{e}");
    let e = dequantize(GgmlType::Q8_0, &[0; 33], 32).expect_err("short block");
    assert_eq!(e.kind(), ErrorKind::Format);
    assert!(e.message().contains("need 34 bytes, got 33"), "{e}");
    let e = dequantize(GgmlType::IQ4NL, &[0; 18], 32).expect_err("IQ4_NL");
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert_eq!(dequantize(GgmlType::Q4K, &[], 0).expect("empty"), Vec::<f32>::new());
}

/// The real model CI fetches; a missing file fails the test rather than skipping it.
fn smollm2() -> GgufFile {
    let path = workspace_path("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(path.exists(), "{} is missing: run scripts/fetch-model.sh first", path.display());
    GgufFile::open(&path).expect("open SmolLM2")
}

#[test]
fn gguf_smollm2_structure() {
    let file = smollm2();
    assert_eq!(file.version(), 3);
    assert_eq!(file.tensors().len(), 272);
    assert_eq!(file.require("general.architecture").expect("arch").as_str(), Some("llama"));
    assert_eq!(file.require("llama.block_count").expect("block count").as_u64(), Some(30));
    let rms_eps = file.require("llama.attention.layer_norm_rms_epsilon").expect("eps");
    assert_eq!(rms_eps, &V::F32(1e-5));
    let embd = file.tensor_info("token_embd.weight").expect("token_embd");
    assert_eq!(embd.shape(), [49152, 576]);
    assert_eq!(embd.ty, GgmlType::Q8_0);
    let tokens = file.require("tokenizer.ggml.tokens").expect("tokens").as_array().expect("array");
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[0].as_str(), Some("<|endoftext|>"));
    assert_eq!(tokens[2].as_str(), Some("<|im_end|>"));
    let q4_1 = file.tensors().iter().filter(|t| t.ty == GgmlType::Q4_1).count();
    let f32s = file.tensors().iter().filter(|t| t.ty == GgmlType::F32).count();
    assert_eq!((q4_1, f32s), (210, 61));
}

// The expected values are written as the exact decimals of their f32 values, longer than f32's
// shortest round-trip form, so that they can be checked against the Python output by eye.
#[allow(clippy::excessive_precision)]
#[test]
fn gguf_smollm2_dequantizes_like_gguf_py() {
    let file = smollm2();
    // The expected values below come from a one-off run of the gguf Python package (0.19.0):
    // gguf.quants.dequantize(t.data, t.tensor_type) on the same tensors of the same file, printed
    // as exact decimals of the f32 results.
    let k = file.tensor_f32("blk.0.attn_k.weight").expect("attn_k");
    assert_eq!(k.shape, [192, 576]);
    let at = |r: usize, c: usize| k.data[r * 576 + c];
    for (r, c, want) in [
        (0, 0, -0.1552734375),
        (0, 1, 0.3402099609375),
        (0, 31, 0.175048828125),
        (0, 32, 0.01068115234375),
        (0, 575, -0.4442138671875),
        (1, 0, 0.056640625),
        (100, 300, 0.509765625),
        (191, 575, 0.3636474609375),
    ] {
        assert_eq!(at(r, c), want, "attn_k[{r}][{c}]");
    }
    let sum: f64 = k.data.iter().map(|&v| f64::from(v)).sum();
    assert!((sum - 26.937057495117188).abs() < 1e-9, "sum {sum}");
    let embd = file.tensor_f32("token_embd.weight").expect("token_embd");
    for (r, c, want) in [(0, 0, -0.10654449462890625), (1, 5, -0.0079345703125), (49151, 575, -0.0417022705078125)] {
        assert_eq!(embd.data[r * 576 + c], want, "token_embd[{r}][{c}]");
    }
}

// Hand-built GGUF images for the malformed-input tests.

const STRING: u32 = 8;
const U32: u32 = 4;
const BOOL: u32 = 7;
const ARRAY: u32 = 9;
const F32_TYPE: u32 = 0;
const Q8_0_TYPE: u32 = 8;

fn gguf_string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// One encoded metadata entry: key, value type, value bytes.
fn kv(key: &str, ty: u32, value: &[u8]) -> Vec<u8> {
    let mut out = gguf_string(key.as_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(value);
    out
}

struct TensorSpec {
    name: &'static str,
    dims: Vec<u64>,
    ty: u32,
    offset: u64,
}

/// The parts of a GGUF image, each of which a test can break on its own.
struct Image {
    magic: [u8; 4],
    version: u32,
    /// Counts written to the header; `None` writes the true count.
    tensor_count: Option<u64>,
    kv_count: Option<u64>,
    kvs: Vec<Vec<u8>>,
    tensors: Vec<TensorSpec>,
    alignment: usize,
    data: Vec<u8>,
}

impl Image {
    /// A valid image: two metadata entries, an F32 [2, 4] tensor and a one-block Q8_0 tensor, and
    /// no padding after the last tensor, so that cutting any byte off makes it invalid.
    fn valid() -> Self {
        let mut data: Vec<u8> = (0..8).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
        // A Q8_0 block with scale 1.0 (f16 0x3c00) and quants 0..32.
        data.extend_from_slice(&0x3c00u16.to_le_bytes());
        data.extend((0..32).map(|i| i as u8));
        Image {
            magic: *b"GGUF",
            version: 3,
            tensor_count: None,
            kv_count: None,
            kvs: vec![
                kv("general.architecture", STRING, &gguf_string(b"test")),
                kv("test.n", U32, &7u32.to_le_bytes()),
            ],
            tensors: vec![
                TensorSpec { name: "a", dims: vec![4, 2], ty: F32_TYPE, offset: 0 },
                TensorSpec { name: "b", dims: vec![32], ty: Q8_0_TYPE, offset: 32 },
            ],
            alignment: 32,
            data,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.tensor_count.unwrap_or(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&self.kv_count.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for kv in &self.kvs {
            out.extend_from_slice(kv);
        }
        for t in &self.tensors {
            out.extend_from_slice(&gguf_string(t.name.as_bytes()));
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.to_le_bytes());
            out.extend_from_slice(&t.offset.to_le_bytes());
        }
        out.resize(out.len().next_multiple_of(self.alignment), 0);
        out.extend_from_slice(&self.data);
        out
    }

    fn parse(&self) -> Result<GgufFile, Error> {
        GgufFile::from_bytes(self.bytes())
    }
}

/// Asserts that `image` is rejected with a format error whose message contains `needle`.
#[track_caller]
fn assert_format_error(image: &Image, needle: &str) {
    let e = image.parse().expect_err("malformed image parsed");
    assert_eq!(e.kind(), ErrorKind::Format, "{e}");
    assert!(e.message().contains(needle), "message `{}` does not mention `{needle}`", e.message());
}

#[test]
fn gguf_valid_image_parses() {
    let file = Image::valid().parse().expect("valid image");
    assert_eq!(file.get("test.n"), Some(&V::U32(7)));
    let a = file.tensor_f32("a").expect("a");
    assert_eq!(a.shape, [2, 4]);
    assert_eq!(a.data, [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]);
    let b = file.tensor_f32("b").expect("b");
    assert_eq!(b.shape, [32]);
    assert_eq!(b.data, (0..32).map(|i| i as f32).collect::<Vec<_>>());
    let e = file.tensor_f32("c").expect_err("no tensor c");
    assert!(e.message().contains("`c`"), "{e}");
}

#[test]
fn gguf_every_truncation_is_an_error() {
    let bytes = Image::valid().bytes();
    for len in 0..bytes.len() {
        let e = GgufFile::from_bytes(bytes[..len].to_vec()).expect_err("truncated image parsed");
        assert_eq!(e.kind(), ErrorKind::Format, "prefix of {len} bytes: {e}");
    }
}

#[test]
fn gguf_bad_magic() {
    let mut image = Image::valid();
    image.magic = *b"GGML";
    assert_format_error(&image, "not a GGUF file");
}

#[test]
fn gguf_unsupported_versions() {
    for version in [1, 4] {
        let mut image = Image::valid();
        image.version = version;
        assert_format_error(&image, &format!("unsupported GGUF version {version}"));
    }
    let mut image = Image::valid();
    image.version = 2;
    image.parse().expect("version 2 has the same layout as 3");
}

#[test]
fn gguf_absurd_counts() {
    let mut image = Image::valid();
    image.tensor_count = Some(u64::MAX);
    assert_format_error(&image, "tensor count 18446744073709551615 cannot fit");
    let mut image = Image::valid();
    image.kv_count = Some(1 << 40);
    assert_format_error(&image, "metadata count 1099511627776 cannot fit");
    // An array whose length cannot fit in the rest of the file is refused before allocating.
    let mut image = Image::valid();
    let mut value = U32.to_le_bytes().to_vec();
    value.extend_from_slice(&(u64::MAX / 2).to_le_bytes());
    image.kvs.push(kv("test.huge", ARRAY, &value));
    assert_format_error(&image, "length of metadata `test.huge`");
}

#[test]
fn gguf_string_past_end_of_file() {
    let mut image = Image::valid();
    let mut key = 1_000_000u64.to_le_bytes().to_vec();
    key.extend_from_slice(b"abc");
    image.kvs.insert(0, key);
    assert_format_error(&image, "string length 1000000 runs past the end of the file");
    let mut image = Image::valid();
    let mut value = u64::MAX.to_le_bytes().to_vec();
    value.extend_from_slice(b"x");
    image.kvs.push(kv("test.s", STRING, &value));
    assert_format_error(&image, "value of metadata `test.s`: string length 18446744073709551615");
}

#[test]
fn gguf_invalid_utf8() {
    let mut image = Image::valid();
    image.kvs.push(kv("test.s", STRING, &gguf_string(&[0x66, 0xff, 0x66])));
    assert_format_error(&image, "not valid UTF-8");
}

#[test]
fn gguf_unknown_value_types() {
    let mut image = Image::valid();
    image.kvs.push(kv("test.x", 13, &[0; 8]));
    assert_format_error(&image, "metadata `test.x` has unknown value type 13");
    let mut image = Image::valid();
    let mut value = 99u32.to_le_bytes().to_vec();
    value.extend_from_slice(&1u64.to_le_bytes());
    image.kvs.push(kv("test.x", ARRAY, &value));
    assert_format_error(&image, "unknown array element type 99");
}

#[test]
fn gguf_bad_bool() {
    let mut image = Image::valid();
    image.kvs.push(kv("test.b", BOOL, &[2]));
    assert_format_error(&image, "bool byte 2 is neither 0 nor 1");
}

/// The value of an array key nesting `depth` arrays, the innermost an empty u8 array. The key's
/// own value type is the outermost ARRAY, so the value starts with the element type of that one.
fn nested_arrays(depth: usize) -> Vec<u8> {
    let mut value = Vec::new();
    for _ in 1..depth {
        value.extend_from_slice(&ARRAY.to_le_bytes());
        value.extend_from_slice(&1u64.to_le_bytes());
    }
    value.extend_from_slice(&0u32.to_le_bytes());
    value.extend_from_slice(&0u64.to_le_bytes());
    value
}

#[test]
fn gguf_arrays_nested_too_deeply() {
    let mut image = Image::valid();
    image.kvs.push(kv("test.deep", ARRAY, &nested_arrays(8)));
    image.parse().expect("eight nested arrays are allowed");
    let mut image = Image::valid();
    image.kvs.push(kv("test.deep", ARRAY, &nested_arrays(9)));
    assert_format_error(&image, "metadata `test.deep`: arrays nested too deeply");
}

#[test]
fn gguf_duplicates() {
    let mut image = Image::valid();
    image.kvs.push(kv("test.n", U32, &8u32.to_le_bytes()));
    assert_format_error(&image, "metadata key `test.n` appears twice");
    let mut image = Image::valid();
    image.tensors[1].name = "a";
    assert_format_error(&image, "tensor `a` appears twice");
}

#[test]
fn gguf_unknown_ggml_type() {
    for id in [4, 100] {
        let mut image = Image::valid();
        image.tensors[0].ty = id;
        assert_format_error(&image, &format!("tensor `a` has unknown ggml type {id}"));
    }
}

#[test]
fn gguf_dimension_counts() {
    let mut image = Image::valid();
    image.tensors[0].dims = vec![];
    assert_format_error(&image, "tensor `a` has 0 dimensions");
    let mut image = Image::valid();
    image.tensors[0].dims = vec![1, 1, 1, 1, 8];
    assert_format_error(&image, "tensor `a` has 5 dimensions");
    // Four dimensions are allowed and come back outermost first.
    let mut image = Image::valid();
    image.tensors[0].dims = vec![2, 1, 2, 2];
    let file = image.parse().expect("4-D tensor");
    assert_eq!(file.tensor_info("a").expect("a").shape(), [2, 2, 1, 2]);
}

#[test]
fn gguf_bad_sizes() {
    let mut image = Image::valid();
    image.tensors[1].dims = vec![16];
    assert_format_error(&image, "row length 16 is not a multiple of the Q8_0 block size 32");
    let mut image = Image::valid();
    image.tensors[0].dims = vec![1 << 32, 1 << 32, 2];
    assert_format_error(&image, "element count overflows");
}

#[test]
fn gguf_tensor_data_past_end_of_file() {
    let mut image = Image::valid();
    image.tensors[1].offset = 64;
    assert_format_error(&image, "tensor `b`: data (34 bytes at offset 64) runs past the end of the file");
    let mut image = Image::valid();
    image.tensors[1].offset = u64::MAX - 31;
    assert_format_error(&image, "runs past the end of the file");
    let mut image = Image::valid();
    image.tensors[0].dims = vec![4, 5];
    assert_format_error(&image, "tensor `a`: data (80 bytes at offset 0) runs past");
}

#[test]
fn gguf_misaligned_offset() {
    let mut image = Image::valid();
    image.tensors[1].offset = 8;
    assert_format_error(&image, "tensor `b`: offset 8 is not aligned to 32");
}

#[test]
fn gguf_custom_alignment() {
    // A larger alignment moves the data section and constrains offsets.
    let mut image = Image::valid();
    image.kvs.push(kv("general.alignment", U32, &64u32.to_le_bytes()));
    image.alignment = 64;
    image.tensors[1].offset = 64;
    image.data.splice(32..32, [0; 32]);
    let file = image.parse().expect("alignment 64");
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.tensor_info("a").expect("a").offset % 64, 0);
    assert_eq!(file.tensor_f32("b").expect("b").data[31], 31.0);
    image.tensors[1].offset = 32;
    assert_format_error(&image, "offset 32 is not aligned to 64");
    for bad in [0u32, 3, 1 << 20] {
        let mut image = Image::valid();
        image.kvs.push(kv("general.alignment", U32, &bad.to_le_bytes()));
        assert_format_error(&image, "general.alignment");
    }
}

#[test]
fn gguf_metadata_only_file_needs_no_padding() {
    // A vocabulary-only GGUF has no tensors, and its metadata need not end on an aligned offset.
    let mut image = Image::valid();
    image.tensors.clear();
    image.data.clear();
    image.alignment = 1;
    let bytes = image.bytes();
    assert_ne!(bytes.len() % 32, 0, "the test wants an unaligned end");
    let file = GgufFile::from_bytes(bytes).expect("metadata-only file");
    assert!(file.tensors().is_empty());
    assert_eq!(file.get("test.n"), Some(&V::U32(7)));
}

// A whole model: a two-layer `qwen2` GGUF with F32 tensors (as fuzz/make-model-seed.py writes), and
// every copy of it with one byte changed.

const F32_VALUE: u32 = 6;

/// The tiny model: hidden size 8, 4 query and 2 KV heads, FFN 12, vocabulary 10, context 64, tied
/// embeddings; tensor `t` holds `t + i / 1000` at element `i`.
fn tiny_model_image() -> Vec<u8> {
    let (hidden, ffn, q_rows, kv_rows, vocab) = (8, 12, 8, 4, 10);
    let u32_kv = |key: &str, v: u32| kv(key, U32, &v.to_le_bytes());
    let kvs = [
        kv("general.architecture", STRING, &gguf_string(b"qwen2")),
        u32_kv("qwen2.block_count", 2),
        u32_kv("qwen2.embedding_length", hidden),
        u32_kv("qwen2.feed_forward_length", ffn),
        u32_kv("qwen2.attention.head_count", 4),
        u32_kv("qwen2.attention.head_count_kv", 2),
        kv("qwen2.attention.layer_norm_rms_epsilon", F32_VALUE, &1e-6f32.to_le_bytes()),
        u32_kv("qwen2.context_length", 64),
        u32_kv("qwen2.vocab_size", vocab),
    ];
    let mut tensors: Vec<(String, Vec<u32>)> =
        vec![("token_embd.weight".into(), vec![vocab, hidden]), ("output_norm.weight".into(), vec![hidden])];
    for layer in 0..2 {
        for (name, shape) in [
            ("attn_norm.weight", vec![hidden]),
            ("attn_q.weight", vec![q_rows, hidden]),
            ("attn_k.weight", vec![kv_rows, hidden]),
            ("attn_v.weight", vec![kv_rows, hidden]),
            ("attn_q.bias", vec![q_rows]),
            ("attn_k.bias", vec![kv_rows]),
            ("attn_v.bias", vec![kv_rows]),
            ("attn_output.weight", vec![hidden, q_rows]),
            ("ffn_norm.weight", vec![hidden]),
            ("ffn_gate.weight", vec![ffn, hidden]),
            ("ffn_up.weight", vec![ffn, hidden]),
            ("ffn_down.weight", vec![hidden, ffn]),
        ] {
            tensors.push((format!("blk.{layer}.{name}"), shape));
        }
    }
    let count = |shape: &[u32]| shape.iter().product::<u32>() as usize;
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    out.extend(kvs.concat());
    let mut offset = 0u64;
    for (name, shape) in &tensors {
        out.extend(gguf_string(name.as_bytes()));
        out.extend((shape.len() as u32).to_le_bytes());
        out.extend(shape.iter().rev().flat_map(|&d| u64::from(d).to_le_bytes()));
        out.extend(F32_TYPE.to_le_bytes());
        out.extend(offset.to_le_bytes());
        offset += (count(shape) as u64 * 4).next_multiple_of(32);
    }
    for (t, (_, shape)) in tensors.iter().enumerate() {
        out.resize(out.len().next_multiple_of(32), 0);
        out.extend((0..count(shape)).flat_map(|i| (t as f32 + i as f32 / 1000.0).to_le_bytes()));
    }
    out
}

/// Reads `bytes` as a model and loads every weight; the number of weights loaded, or the first
/// error.
fn load_model(bytes: Vec<u8>) -> Result<usize, Error> {
    let model = GgufModel::new(GgufFile::from_bytes(bytes)?)?;
    let weights = model.config().weight_shapes();
    for (name, shape) in &weights {
        let tensor = model.load(*name)?;
        assert_eq!(&tensor.shape, shape, "{name:?}");
        assert!(tensor.data.iter().all(|v| v.is_finite()), "{name:?} loaded with a non-finite value");
    }
    Ok(weights.len())
}

#[test]
fn gguf_tiny_model_loads() {
    assert_eq!(load_model(tiny_model_image()).expect("the tiny model loads"), 2 + 2 * 12);
}

/// Every single-byte change of a whole model file (each byte with its bits flipped, and plus
/// one) opens and loads or fails with an error of the file's: no panic, no absurd allocation
/// from a corrupted count or size, and no non-finite weight loaded.
#[test]
fn gguf_tiny_model_survives_every_single_byte_change() {
    let image = tiny_model_image();
    let (mut loaded, mut refused) = (0, 0);
    for at in 0..image.len() {
        for change in [|b: u8| !b, |b: u8| b.wrapping_add(1)] {
            let mut bytes = image.clone();
            bytes[at] = change(bytes[at]);
            match load_model(bytes) {
                Ok(_) => loaded += 1,
                Err(e) => {
                    assert!(
                        matches!(e.kind(), ErrorKind::Format | ErrorKind::Unsupported),
                        "byte {at}: {e} is not an error of the file"
                    );
                    refused += 1;
                }
            }
        }
    }
    // Most changes to the tensor data still load; every change to the structure is refused.
    assert!(loaded > image.len() / 2 && refused > 1000, "{loaded} loaded, {refused} refused");
}
