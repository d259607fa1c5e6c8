#!/usr/bin/env python3
"""How far transformers' own bf16 run of SmolLM2-135M-Instruct is from its float32 run.

The GPU test of tests/gpu/model.rs holds our bf16 logits to a cosine similarity with the CPU
backend's float32 ones at the last prompt position and at 16 forced decode steps of every oracle
case. This script measures what bf16 alone costs there, with an implementation nobody here wrote:
for each case of tests/fixtures/oracle/smollm2-135m-instruct.json it feeds the prompt, then the
oracle's first 16 greedy tokens one at a time with the KV cache (as a decode loop does), once in
float32 and once in bfloat16 (weights and activations, the cache included), on the same device,
and writes per position the cosine similarity of the bf16 logits to the float32 ones.

Run it where torch, transformers and gguf are installed (the GPU machine; see ../shared/GPU.md):

    python3 scripts/oracle-bf16-drift.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        tests/fixtures/oracle/smollm2-135m-instruct.json tests/fixtures/oracle/smollm2-bf16-drift.json
"""

import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM

FORCED_TOKENS = 16


@torch.no_grad()
def forced_logits(model, prompt, tokens, device):
    """Logits (float64, on the CPU) at the prompt's last position and after each forced token."""
    out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
    rows = [out.logits[0, -1]]
    past = out.past_key_values
    for token in tokens:
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
        rows.append(out.logits[0, -1])
    return [r.double().cpu() for r in rows]


def main():
    gguf_path, fixtures_path, out_path = sys.argv[1:4]
    folder, name = os.path.split(os.path.abspath(gguf_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    f32 = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).to(device).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).to(device).eval()
    bf16 = bf16.to(torch.bfloat16)
    cases = json.load(open(fixtures_path))["cases"]
    result = []
    for i, case in enumerate(cases):
        tokens = case["greedy_ids"][:FORCED_TOKENS]
        want = forced_logits(f32, case["prompt_ids"], tokens, device)
        got = forced_logits(bf16, case["prompt_ids"], tokens, device)
        cosines = [float(torch.nn.functional.cosine_similarity(g, w, dim=0)) for g, w in zip(got, want)]
        # The float32 run must reproduce the oracle's greedy tokens (it is the oracle's run).
        agrees = [int(torch.argmax(w)) == t for w, t in zip(want, tokens)]
        result.append({"case": i, "cosines": cosines, "f32_argmax_is_oracle": all(agrees)})
        print(f"case {i}: least cosine {min(cosines):.6f} at step {cosines.index(min(cosines))}; "
              f"f32 argmax = oracle: {all(agrees)}")
    with open(out_path, "w") as f:
        json.dump({
            "made_by": "scripts/oracle-bf16-drift.py",
            "model_file": name,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
            "forced_tokens": FORCED_TOKENS,
            "cases": result,
        }, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
