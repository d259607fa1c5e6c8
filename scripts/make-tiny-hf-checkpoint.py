#!/usr/bin/env python3
"""Writes the tiny Hugging Face checkpoints that tests/integration/hf_checkpoint.rs loads.

    python3 scripts/make-tiny-hf-checkpoint.py tests/fixtures

makes two folders of config.json + safetensors weights, a few kilobytes each:

  tiny-llama/  LlamaForCausalLM, untied LM head, an explicit head_dim (8, not hidden/heads = 4),
               one model.safetensors file.
  tiny-qwen2/  Qwen2ForCausalLM, tied embeddings, Q/K/V biases, rope settings in transformers 5's
               `rope_parameters`, weights split over two shards listed by
               model.safetensors.index.json.

Every tensor's values follow a formula the Rust test recomputes (see `values`): multiples of 1/32
below 1 in magnitude, exact in F32, F16 and BF16 alike, so the test checks each dtype's conversion
exactly. The dtype of a tensor also follows from its name. The safetensors files are written by
hand (8-byte little-endian header length, JSON header, data), so only numpy is needed.
"""

import json
import os
import struct
import sys

import numpy as np

DTYPES = ["F32", "F16", "BF16"]


def seed(name):
    return sum(name.encode()) % 251


def values(name, count):
    """Element i of tensor `name`: ((7 i + 13 seed) mod 61 - 30) / 32."""
    i = np.arange(count, dtype=np.int64)
    return (((i * 7 + seed(name) * 13) % 61) - 30).astype(np.float32) / 32.0


def dtype_of(name):
    return DTYPES[seed(name) % 3]


def encode(name, shape):
    data = values(name, int(np.prod(shape, dtype=np.int64)))
    dtype = dtype_of(name)
    if dtype == "F32":
        raw = data.astype("<f4").tobytes()
    elif dtype == "F16":
        raw = data.astype("<f2").tobytes()
    else:
        # bfloat16 is the top half of a float32; these values are exact, so no rounding is needed.
        raw = (data.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return dtype, raw


def write_safetensors(path, tensors):
    header, chunks, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, shape in tensors:
        dtype, raw = encode(name, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for chunk in chunks:
            f.write(chunk)


def weights(config, qkv_bias):
    h, i = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    d = config.get("head_dim") or h // heads
    out = [("model.embed_tokens.weight", (config["vocab_size"], h)), ("model.norm.weight", (h,))]
    if not config["tie_word_embeddings"]:
        out.append(("lm_head.weight", (config["vocab_size"], h)))
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (heads * d, h)),
            (p + "self_attn.k_proj.weight", (kv_heads * d, h)),
            (p + "self_attn.v_proj.weight", (kv_heads * d, h)),
            (p + "self_attn.o_proj.weight", (h, heads * d)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
        if qkv_bias:
            out += [
                (p + "self_attn.q_proj.bias", (heads * d,)),
                (p + "self_attn.k_proj.bias", (kv_heads * d,)),
                (p + "self_attn.v_proj.bias", (kv_heads * d,)),
            ]
    return out


def write_config(folder, config):
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def tiny_llama(folder):
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "vocab_size": 32,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-05,
        "rope_theta": 50000.0,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    write_config(folder, config)
    write_safetensors(os.path.join(folder, "model.safetensors"), weights(config, qkv_bias=False))


def tiny_qwen2(folder):
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": 16,
        "intermediate_size": 24,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 32,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        "sliding_window": 64,
        "hidden_act": "silu",
        "dtype": "bfloat16",
    }
    write_config(folder, config)
    tensors = weights(config, qkv_bias=True)
    # Layer 0 and the embeddings in the first shard, the rest in the second.
    first = [t for t in tensors if not t[0].startswith("model.layers.1.")]
    second = [t for t in tensors if t[0].startswith("model.layers.1.")]
    weight_map = {}
    for shard, part in (("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)):
        write_safetensors(os.path.join(folder, shard), part)
        weight_map.update({name: shard for name, _ in part})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
        f.write("\n")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"
    for name, make in (("tiny-llama", tiny_llama), ("tiny-qwen2", tiny_qwen2)):
        folder = os.path.join(root, name)
        os.makedirs(folder, exist_ok=True)
        make(folder)
        size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
        print(f"{folder}: {size} bytes")


if __name__ == "__main__":
    main()
