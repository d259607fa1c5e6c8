#!/usr/bin/env python3
"""Small random-weight Hugging Face models and their logits, for tests/gpu/hf_models.rs.

    python3 scripts/make-hf-random-models.py OUT_DIR

writes two checkpoints made by transformers itself, each a folder of config.json + safetensors
weights (bf16), with the logits transformers computes for a few fixed prompts:

  OUT_DIR/llama/  LlamaForCausalLM: GQA (8 query heads, 2 KV heads, head_dim 64), untied LM head,
                  rope_theta 500000 with Llama 3.1's `llama3` rope scaling (factor 8, low 1,
                  high 4) over an original context of 256, so that the test prompts' positions
                  turn every pair through all three frequency bands noticeably.
  OUT_DIR/qwen2/  Qwen2ForCausalLM: Q/K/V biases, tied embeddings, head_dim 128 (8 heads, 2 KV
                  heads), with `linear` rope scaling (factor 2).

and in each folder expected.json (the prompts' token ids, the vocabulary size and the name of the
logits file) and expected-logits.f32: for every prompt in order, the logits at every position,
[prompt_len, vocab] little-endian f32, computed by transformers in float32 (on the CPU, eager
attention) from the bf16 weights as saved (reloaded with from_pretrained and upcast).

The default initialisation (normal, std 0.02) gives near-uniform logits, which would make any
comparison pass; the weights are drawn here instead so that activations keep unit scale through
the layers and the logits spread (their std is printed): linear weights N(0, 1/in_features)
(Q and K 1.5x, for attention that is neither uniform nor one-hot), norms 1 + N(0, 0.1²), biases
N(0, 0.5²).

Needs torch, transformers (4.45+ or 5.x) and numpy; no GPU, no network. Takes well under a
minute.
"""

import json
import math
import os
import random
import sys

try:
    import numpy as np
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM
except ImportError as e:
    sys.exit(f"make-hf-random-models: needs torch, transformers and numpy ({e})")

SEED = 1234
PROMPT_LENGTHS = [7, 40, 300]
VOCAB = 32000

MODELS = [
    {
        "name": "llama",
        "config_class": LlamaConfig,
        "model_class": LlamaForCausalLM,
        "config": dict(
            vocab_size=VOCAB,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=64,
            max_position_embeddings=2048,
            rms_norm_eps=1e-5,
            hidden_act="silu",
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
        ),
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
        # Untied: the input embedding at unit scale, the LM head giving logits of std ~2.
        "embedding_std": 1.0,
        "lm_head_gain": 2.0,
    },
    {
        "name": "qwen2",
        "config_class": Qwen2Config,
        "model_class": Qwen2ForCausalLM,
        "config": dict(
            vocab_size=VOCAB,
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            rms_norm_eps=1e-6,
            hidden_act="silu",
            tie_word_embeddings=True,
        ),
        "rope_theta": 1000000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        # Tied: one matrix is both the embedding and the LM head; std 0.1 gives logits of std ~3.
        "embedding_std": 0.1,
        "lm_head_gain": None,
    },
]


def major_version():
    return int(transformers.__version__.split(".")[0])


def rope_kwargs(theta, scaling):
    """Config arguments for the rope base and scaling, in the form this transformers takes."""
    if major_version() >= 5:
        # Transformers 5 keeps everything about rope in `rope_parameters`.
        return {"rope_parameters": dict(scaling, rope_theta=theta)}
    return {"rope_theta": theta, "rope_scaling": dict(scaling)}


def expected_inv_freq(theta, head_dim, scaling):
    """The frequencies the config should give, from the formulas of transformers'
    modeling_rope_utils (`_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
    `_compute_llama3_parameters`), in float64."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    kind = scaling["rope_type"]
    if kind == "linear":
        return inv_freq / scaling["factor"]
    assert kind == "llama3", kind
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    out = np.where(wavelen > original / low, inv_freq / factor, inv_freq)
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    bands = (int((wavelen < original / high).sum()), int(medium.sum()), int((wavelen > original / low).sum()))
    print(f"  llama3 bands (kept, interpolated, divided): {bands} of {head_dim // 2} pairs")
    return np.where(medium, smoothed, out)


def check_rope(model, spec, head_dim):
    """Fails unless transformers' rotary embedding uses the frequencies the scaling implies: a
    config argument it silently ignored would otherwise make the expected logits test nothing."""
    rotary = getattr(model.model, "rotary_emb", None)
    if rotary is None or not hasattr(rotary, "inv_freq"):
        sys.exit("make-hf-random-models: this transformers has no model.rotary_emb.inv_freq to check the rope with")
    want = expected_inv_freq(spec["rope_theta"], head_dim, spec["rope_scaling"])
    got = rotary.inv_freq.detach().double().cpu().numpy()
    if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=0):
        sys.exit(f"make-hf-random-models: {spec['name']}: rope frequencies {got[:8]}... differ from {want[:8]}...")
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    if scaling != 1.0:
        sys.exit(f"make-hf-random-models: {spec['name']}: rope attention scaling {scaling}, expected 1")
    return rotary


@torch.no_grad()
def init_weights(model, spec, generator):
    for name, p in model.named_parameters():
        def normal(std):
            return torch.randn(p.shape, generator=generator, dtype=torch.float32) * std

        if name.endswith("norm.weight"):
            value = 1.0 + normal(0.1)
        elif name.endswith(".bias"):
            value = normal(0.5)
        elif "embed_tokens" in name:
            value = normal(spec["embedding_std"])
        elif name.startswith("lm_head"):
            value = normal(spec["lm_head_gain"] / math.sqrt(p.shape[1]))
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            value = normal(1.5 / math.sqrt(p.shape[1]))
        elif p.dim() == 2:
            value = normal(1.0 / math.sqrt(p.shape[1]))
        else:
            sys.exit(f"make-hf-random-models: no initialisation for parameter {name} {tuple(p.shape)}")
        p.copy_(value.to(p.dtype))


def load_float32(folder, model_class):
    """The saved checkpoint through from_pretrained, in float32 with eager attention."""
    kwargs = {"attn_implementation": "eager"}
    # Transformers 5 renamed `torch_dtype` to `dtype` (and loads bf16 files as bf16 by default).
    if major_version() >= 5:
        kwargs["dtype"] = torch.float32
    else:
        kwargs["torch_dtype"] = torch.float32
    model = model_class.from_pretrained(folder, **kwargs)
    # Upcasting is exact, and makes sure of float32 whatever the loader did.
    return model.float().eval()


@torch.no_grad()
def all_logits(model, prompt):
    out = model(input_ids=torch.tensor([prompt], dtype=torch.long), use_cache=False)
    return out.logits[0].float()


def prompts(vocab):
    rng = random.Random(SEED)
    return [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENGTHS]


def make(spec, out_dir):
    name = spec["name"]
    folder = os.path.join(out_dir, name)
    os.makedirs(folder, exist_ok=True)
    print(f"{name}: building", flush=True)
    config = spec["config_class"](**spec["config"], **rope_kwargs(spec["rope_theta"], spec["rope_scaling"]))
    torch.manual_seed(SEED)
    model = spec["model_class"](config).float().eval()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    init_weights(model, spec, torch.Generator().manual_seed(SEED))
    if config.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        sys.exit(f"make-hf-random-models: {name}: the LM head is not tied to the embedding")
    model = model.to(torch.bfloat16)
    # Safetensors is the default format since transformers 4.35 and the only one in 5.x (which
    # dropped the `safe_serialization` argument): check rather than ask.
    model.save_pretrained(folder)
    if not any(f.endswith(".safetensors") for f in os.listdir(folder)):
        sys.exit(f"make-hf-random-models: {name}: save_pretrained wrote no safetensors file: {os.listdir(folder)}")
    saved = {k: v.float() for k, v in model.state_dict().items()}

    ref = load_float32(folder, spec["model_class"])
    for key, value in ref.state_dict().items():
        if key in saved and not torch.equal(value, saved[key]):
            sys.exit(f"make-hf-random-models: {name}: {key} changed on the way through save/load")
    rotary = check_rope(ref, spec, head_dim)

    ids = prompts(config.vocab_size)
    logits = [all_logits(ref, p) for p in ids]
    stds = [float(l.std(dim=-1).mean()) for l in logits]
    print(f"  logits: mean per-position std {[round(s, 3) for s in stds]}, max |value| {float(logits[-1].abs().max()):.2f}")

    # How much the rope scaling matters here: the same model with the unscaled frequencies. The
    # comparison in Rust is only meaningful if this differs clearly from the scaled logits.
    scaled_inv_freq = rotary.inv_freq.clone()
    plain = 1.0 / spec["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    rotary.inv_freq.copy_(plain.to(rotary.inv_freq.dtype))
    unscaled = all_logits(ref, ids[-1])
    rotary.inv_freq.copy_(scaled_inv_freq)
    cosine = torch.nn.functional.cosine_similarity(unscaled, logits[-1], dim=-1)
    print(f"  without rope scaling, the longest prompt's logits have cosine {float(cosine.min()):.4f} (min over "
          f"positions) with the scaled ones; max |diff| {float((unscaled - logits[-1]).abs().max()):.3f}")

    logits_file = "expected-logits.f32"
    with open(os.path.join(folder, logits_file), "wb") as f:
        for l in logits:
            f.write(l.contiguous().numpy().astype("<f4").tobytes())
    meta = {
        "prompts": ids,
        "vocab_size": config.vocab_size,
        "logits_file": logits_file,
        "logits_std": stds,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    with open(os.path.join(folder, "expected.json"), "w") as f:
        json.dump(meta, f)
    print(f"  wrote {folder}: {sorted(os.listdir(folder))}", flush=True)


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    torch.set_grad_enabled(False)
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for spec in MODELS:
        make(spec, sys.argv[1])


if __name__ == "__main__":
    main()
