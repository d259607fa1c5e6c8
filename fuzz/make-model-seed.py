#!/usr/bin/env python3
"""Writes a seed for the gguf_reader fuzz target that reads as a model: a two-layer `qwen2` GGUF
(hidden size 8, 4 query and 2 KV heads, FFN 12, vocabulary 10, context 64, tied embeddings) with
F32 tensors, the layout of the tiny_qwen2 fixture of the unit tests in
nexus-runtime/src/weights/gguf_weights.rs. Without it the fuzzer rarely builds the metadata that
gets past the model's configuration checks. Usage: make-model-seed.py OUT.gguf"""

import struct
import sys


def string(s):
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def main(out_path):
    hidden, ffn, q_rows, kv_rows, vocab = 8, 12, 8, 4, 10
    metadata = [
        ("general.architecture", string("qwen2"), 8),
        ("qwen2.block_count", struct.pack("<I", 2), 4),
        ("qwen2.embedding_length", struct.pack("<I", hidden), 4),
        ("qwen2.feed_forward_length", struct.pack("<I", ffn), 4),
        ("qwen2.attention.head_count", struct.pack("<I", 4), 4),
        ("qwen2.attention.head_count_kv", struct.pack("<I", 2), 4),
        ("qwen2.attention.layer_norm_rms_epsilon", struct.pack("<f", 1e-6), 6),
        ("qwen2.context_length", struct.pack("<I", 64), 4),
        ("qwen2.vocab_size", struct.pack("<I", vocab), 4),
    ]
    tensors = [("token_embd.weight", [vocab, hidden]), ("output_norm.weight", [hidden])]
    layer = [
        ("attn_norm.weight", [hidden]),
        ("attn_q.weight", [q_rows, hidden]),
        ("attn_k.weight", [kv_rows, hidden]),
        ("attn_v.weight", [kv_rows, hidden]),
        ("attn_q.bias", [q_rows]),
        ("attn_k.bias", [kv_rows]),
        ("attn_v.bias", [kv_rows]),
        ("attn_output.weight", [hidden, q_rows]),
        ("ffn_norm.weight", [hidden]),
        ("ffn_gate.weight", [ffn, hidden]),
        ("ffn_up.weight", [ffn, hidden]),
        ("ffn_down.weight", [hidden, ffn]),
    ]
    tensors += [(f"blk.{i}.{name}", shape) for i in range(2) for name, shape in layer]

    def count(shape):
        n = 1
        for d in shape:
            n *= d
        return n

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value, value_type in metadata:
        out += string(key) + struct.pack("<I", value_type) + value
    offset = 0
    for name, shape in tensors:
        dims = b"".join(struct.pack("<Q", d) for d in reversed(shape))
        out += string(name) + struct.pack("<I", len(shape)) + dims + struct.pack("<IQ", 0, offset)
        offset += (count(shape) * 4 + 31) // 32 * 32
    out += b"\0" * (-len(out) % 32)
    for t, (_, shape) in enumerate(tensors):
        out += b"".join(struct.pack("<f", t + j / 1000) for j in range(count(shape)))
        out += b"\0" * (-len(out) % 32)
    with open(out_path, "wb") as f:
        f.write(out)


if __name__ == "__main__":
    main(sys.argv[1])
