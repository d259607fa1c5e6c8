#!/usr/bin/env python3
"""Oracle fixtures for SmolLM2-135M-Instruct from Hugging Face transformers.

Runs the default model (the Q4_1 GGUF that scripts/fetch-model.sh fetches) through transformers,
which dequantizes the GGUF to float32 and converts its tokenizer, and writes for every prompt:
the prompt's token ids, the greedy continuation (32 tokens, EOS not treated specially) and the
top-5 logits at the last prompt position; plus the token ids of tricky strings. The Rust tests in
tests/integration/oracle.rs compare the CPU backend with this file.

Run it where torch, transformers and gguf are installed (the GPU machine; see ../shared/GPU.md):

    python3 scripts/make-oracle-fixtures.py models/SmolLM2-135M-Instruct.Q4_1.gguf \
        tests/fixtures/oracle/smollm2-135m-instruct.json
"""

import json
import os
import platform
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

GREEDY_TOKENS = 32
TOP_K = 5

RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4, 5,",
]

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about GPUs."}],
    [
        {"role": "system", "content": "You are a pirate. Answer briefly."},
        {"role": "user", "content": "How are you today?"},
    ],
]

TRICKY_STRINGS = [
    "12345678901234567890",
    "3.14159 and 2,718,281 and -42",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines",
    "héllo wörld, ñandú, Ærøskøbing",
    "日本語のテキストと中文",
    "emoji 🤖🚀👍🏽 and ZWJ 👩‍💻",
    "<|im_start|>user\nhi<|im_end|>\n",
    "CamelCase snake_case kebab-case SCREAMING",
    "don't won't I'm they'll we've",
    "    ",
    "a",
]


def top_k(logits):
    values, ids = torch.topk(logits, TOP_K)
    return {"ids": ids.tolist(), "logits": [float(v) for v in values]}


@torch.no_grad()
def greedy(model, ids, device):
    """Greedy decoding for GREEDY_TOKENS steps with the model's KV cache."""
    input_ids = torch.tensor([ids], device=device)
    out = model(input_ids=input_ids, use_cache=True)
    last = out.logits[0, -1].float()
    first_top = top_k(last)
    past = out.past_key_values
    generated = []
    for _ in range(GREEDY_TOKENS):
        token = int(torch.argmax(last))
        generated.append(token)
        out = model(input_ids=torch.tensor([[token]], device=device), past_key_values=past, use_cache=True)
        past = out.past_key_values
        last = out.logits[0, -1].float()
    return generated, first_top


def main():
    gguf_path, out_path = sys.argv[1], sys.argv[2]
    folder, name = os.path.split(os.path.abspath(gguf_path))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Full float32 matmuls: no TF32, so that the oracle is as exact as the CPU reference.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).to(device)
    model.eval()

    cases = []
    for prompt in RAW_PROMPTS:
        ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        continuation, first_top = greedy(model, ids, device)
        cases.append({"kind": "raw", "prompt": prompt, "prompt_ids": ids, "greedy_ids": continuation,
                      "greedy_text": tokenizer.decode(continuation), "last_prompt_top5": first_top})
    for messages in CHAT_PROMPTS:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        continuation, first_top = greedy(model, ids, device)
        cases.append({"kind": "chat", "messages": messages, "rendered": text, "prompt_ids": ids,
                      "greedy_ids": continuation, "greedy_text": tokenizer.decode(continuation),
                      "last_prompt_top5": first_top})

    tokenizations = [{"text": s, "ids": tokenizer(s, add_special_tokens=False)["input_ids"]} for s in TRICKY_STRINGS]

    result = {
        "made_by": "scripts/make-oracle-fixtures.py",
        "model_file": name,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor(),
        "dtype": "float32",
        "greedy_tokens": GREEDY_TOKENS,
        "cases": cases,
        "tokenizations": tokenizations,
    }
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for c in cases:
        print(c["kind"], repr(c.get("prompt") or c["messages"][-1]["content"]), "->", repr(c["greedy_text"]))


if __name__ == "__main__":
    main()
