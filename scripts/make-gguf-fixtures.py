#!/usr/bin/env python3
"""Writes the GGUF test fixtures in tests/fixtures/gguf/.

dequant.gguf holds metadata of every GGUF value type and one small tensor of each storage type
that nexus-runtime dequantizes. The quantized tensors are random block bytes (with finite,
moderate f16 scales patched in), so every bit pattern of the quantized values is exercised rather
than only the ones a quantizer would produce.

dequant-expected.json holds what the `gguf` Python package (llama.cpp's own gguf-py, an
implementation independent of ours) dequantizes each tensor to, so the Rust tests compare against
values we did not compute ourselves. Its layout:

    {"tensors": [{"name": str, "type": str, "shape": [rows, cols], "values": [float, ...]}, ...]}

`shape` is row-major (outermost first) and `values` is the row-major f32 data, written as the
exact float64 value of each f32 so that it reads back bit for bit.

The output is deterministic (fixed seed), so rerunning the script rewrites identical files.

Usage: pip install gguf numpy; python3 scripts/make-gguf-fixtures.py
"""

import json
from pathlib import Path

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as V

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "gguf"

# Byte offsets of the f16 scale fields inside one block of each quantized type (ggml's block
# layouts). Random bytes there could be NaN or huge, so they are overwritten with moderate values.
F16_FIELDS = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}

# Row-major shapes: several blocks per tensor, more than one row, and row lengths of more than
# one block so that row and block boundaries both get crossed.
SHAPES = {
    Q.Q4_0: (4, 128),
    Q.Q4_1: (4, 128),
    Q.Q5_0: (4, 128),
    Q.Q5_1: (4, 128),
    Q.Q8_0: (4, 128),
    Q.Q2_K: (2, 512),
    Q.Q3_K: (2, 512),
    Q.Q4_K: (2, 512),
    Q.Q5_K: (2, 512),
    Q.Q6_K: (2, 512),
}


def random_blocks(rng: np.random.Generator, qtype: Q, shape: tuple[int, int]) -> np.ndarray:
    """Random raw bytes for a tensor of `shape`, as gguf-py's (rows, bytes per row) uint8 array."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    blocks = rng.integers(0, 256, size=(rows * cols // block_size, type_size), dtype=np.uint8)
    for at in F16_FIELDS[qtype]:
        # Signed scales in [-0.05, 0.05] cover negative d and dmin too, which real files can hold.
        scales = rng.uniform(-0.05, 0.05, size=blocks.shape[0]).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, cols // block_size * type_size)


def add_metadata(w: gguf.GGUFWriter) -> None:
    """One key per value type, with values at the edges of each type's range."""
    w.add_uint8("test.u8", 255)
    w.add_int8("test.i8", -128)
    w.add_uint16("test.u16", 65535)
    w.add_int16("test.i16", -32768)
    w.add_uint32("test.u32", 4294967295)
    w.add_int32("test.i32", -2147483648)
    w.add_uint64("test.u64", 18446744073709551615)
    w.add_int64("test.i64", -9223372036854775808)
    w.add_float32("test.f32", 3.14159274101257324)  # exactly representable as f32
    w.add_float64("test.f64", -1.2345678901234567e-100)  # beyond f32 range and precision
    w.add_bool("test.bool_true", True)
    w.add_bool("test.bool_false", False)
    w.add_string("test.string", "héllo, wörld ✓")
    w.add_key_value("test.array_i32", [1, -2, 3, -4, 2147483647], V.ARRAY, sub_type=V.INT32)
    w.add_key_value("test.array_u64", [0, 1, 18446744073709551615], V.ARRAY, sub_type=V.UINT64)
    w.add_key_value("test.array_f32", [0.5, -1.25, 1e-3], V.ARRAY, sub_type=V.FLOAT32)
    w.add_key_value("test.array_bool", [True, False, True], V.ARRAY, sub_type=V.BOOL)
    w.add_array("test.array_string", ["a", "", "ccc", "ü"])
    # An array of arrays: GGUF allows it and gguf-py writes it (inner arrays as i32 arrays).
    w.add_key_value("test.array_nested", [[1, 2], [3], [4, 5, 6]], V.ARRAY)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(20250101)
    w = gguf.GGUFWriter(OUT / "dequant.gguf", arch="nexus-test")
    add_metadata(w)
    expected = []

    def add(name: str, qtype: Q, data: np.ndarray, values: np.ndarray) -> None:
        if data.dtype == np.uint8:
            w.add_tensor(name, data, raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
        expected.append({
            "name": name,
            "type": qtype.name,
            "shape": list(values.shape),
            "values": [float(v) for v in values.astype(np.float32).ravel()],
        })

    f32 = rng.normal(0, 1, size=(3, 40)).astype(np.float32)
    add("t.f32", Q.F32, f32, f32)
    # A 3-D tensor checks that shapes come back outermost first.
    f32_3d = rng.normal(0, 1, size=(2, 3, 8)).astype(np.float32)
    add("t.f32_3d", Q.F32, f32_3d, f32_3d)
    f16 = rng.normal(0, 10, size=(3, 40)).astype(np.float16)
    add("t.f16", Q.F16, f16, gguf.quants.dequantize(f16.view(np.uint8), Q.F16))
    # bf16 is the top half of an f32; gguf-py stores it as raw bytes with raw_dtype BF16.
    bf16 = (rng.normal(0, 10, size=(3, 40)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    bf16_bytes = bf16.view(np.uint8).reshape(3, 80)
    add("t.bf16", Q.BF16, bf16_bytes, gguf.quants.dequantize(bf16_bytes, Q.BF16))
    for qtype in F16_FIELDS:
        raw = random_blocks(rng, qtype, SHAPES[qtype])
        values = gguf.quants.dequantize(raw, qtype)
        assert values.shape == SHAPES[qtype] and np.isfinite(values).all()
        add(f"t.{qtype.name.lower()}", qtype, raw, values)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(OUT / "dequant-expected.json", "w") as f:
        json.dump({"tensors": expected}, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
