#!/usr/bin/env python3
"""Times torch's scaled_dot_product_attention on the shapes of our attention benchmarks, as the
baseline our kernels are measured against. Runs on the GPU machine (torch 2.11 there):

    python3 scripts/bench-torch-sdpa.py $OUT/torch-sdpa.md [--backend auto|flash|efficient|cudnn|math]

Prefill (TFLOP/s, FLOPs = 4·H_q·d·(C·P + C(C+1)/2) for a chunk of C tokens over P cached ones,
the same count as benches/prefill_attention.rs):
  - causal 1k / 4k / 8k / 16k tokens, one sequence, 32/8 heads, d = 128 (is_causal=True);
  - a 2048-token chunk over 2k and 8k cached tokens: queries are the last C of P + C keys, so the
    mask is causal aligned to the lower right (torch.nn.attention.bias.causal_lower_right, which
    dispatches to the fused kernels; an explicit boolean mask if that is refused).
Decode (TB/s = K and V bytes read / time): batch x context 1x4096, 1x32768, 32x2048, 64x4096,
128x1024, with the heads of Llama-3.1-8B (32/8), Qwen2.5-3B (16/2), Qwen2.5-14B (40/8), all
d = 128, and SmolLM2 (9/3, d = 64); one query token per sequence, contiguous K/V [B, H_kv, L, d],
no mask.

GQA: K/V keep H_kv heads and SDPA gets enable_gqa=True; if a backend refuses that, K/V are expanded
with repeat_interleave beforehand (outside the timing) and the table says so in its "K/V" column.

Timing: bf16 random inputs, rotated over copies adding up to >= 256 MiB so no call finds its
inputs in L2; 5 warm-up calls, then calls back to back for --sustain-ms (default 1000), then 30
calls each timed with its own pair of CUDA events; the median is reported. The Markdown table is
printed and written to the file given as argument.

Why the sustained part: our Rust benches time kernels after 0.6 s of back-to-back runs
(criterion's warm-up and measurement), when an H200 is near its 700 W cap and its SM clock below
the 1980 MHz boost; 35 calls from an idle GPU run at the boost clock. Measured on the GPU machine
(bench-results/prefill_attention-h200.md, eighth round): causal 8k 614-618 TFLOP/s from idle,
526-551 after 1 s of calls. --sustain-ms 0 gives the figure from idle.
"""

import argparse
import contextlib
import math
import sys
import time

import torch
import torch.nn.functional as F

ROTATE_BYTES = 256 << 20
WARMUP = 5
ITERS = 30


def backend_context(name):
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel([backend])


def copies_for(nbytes):
    return max(1, min(64, math.ceil(ROTATE_BYTES / max(nbytes, 1))))


DEFAULT_SUSTAIN_MS = 1000
sustain_ms = DEFAULT_SUSTAIN_MS  # set from --sustain-ms


def median_ms(fn, copies):
    """Median time of fn(i) in milliseconds, i rotating over the input copies, after sustain_ms of
    back-to-back calls."""
    for i in range(WARMUP):
        fn(i % copies)
    torch.cuda.synchronize()
    start = time.perf_counter()
    while (time.perf_counter() - start) * 1e3 < sustain_ms:
        for i in range(WARMUP):
            fn(i % copies)
        torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(ITERS)]
    for i, (start, stop) in enumerate(events):
        start.record()
        fn((WARMUP + i) % copies)
        stop.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(stop) for start, stop in events)
    return times[len(times) // 2]


def make_inputs(batch, heads, kv_heads, q_len, kv_len, d, copies):
    dev, dt = "cuda", torch.bfloat16
    return [
        (
            torch.randn(batch, heads, q_len, d, device=dev, dtype=dt),
            torch.randn(batch, kv_heads, kv_len, d, device=dev, dtype=dt),
            torch.randn(batch, kv_heads, kv_len, d, device=dev, dtype=dt),
        )
        for _ in range(copies)
    ]


def run_sdpa(inputs, heads, kv_heads, **kwargs):
    """Returns (callable over copy index, K/V method). Tries enable_gqa first, then expands K/V."""
    group = heads // kv_heads

    def gqa(i):
        q, k, v = inputs[i]
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)

    if group == 1:
        return (lambda i: F.scaled_dot_product_attention(*inputs[i], **kwargs)), "MHA"
    try:
        gqa(0)
        torch.cuda.synchronize()
        return gqa, "enable_gqa"
    except Exception as e:  # a backend without GQA support: expand K/V outside the timing
        print(f"  enable_gqa refused ({type(e).__name__}: {str(e)[:120]}); using repeat_interleave", file=sys.stderr)
    expanded = [
        (q, k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)) for q, k, v in inputs
    ]
    expanded_fn = lambda i: F.scaled_dot_product_attention(*expanded[i], **kwargs)  # noqa: E731
    expanded_fn(0)  # raise here (inside the caller's fallback) if this is refused too
    torch.cuda.synchronize()
    return expanded_fn, "repeat_interleave"


def prefill_rows():
    heads, kv_heads, d = 32, 8, 128
    shapes = [
        ("causal 1k", 0, 1024),
        ("causal 4k", 0, 4096),
        ("causal 8k", 0, 8192),
        ("causal 16k", 0, 16384),
        ("chunk 2k over 2k", 2048, 2048),
        ("chunk 2k over 8k", 8192, 2048),
    ]
    rows = []
    for name, prefix, chunk in shapes:
        kv_len = prefix + chunk
        nbytes = 2 * (heads * chunk * d + 2 * kv_heads * kv_len * d)
        copies = copies_for(nbytes)
        inputs = make_inputs(1, heads, kv_heads, chunk, kv_len, d, copies)
        flops = 4 * heads * d * (chunk * prefix + chunk * (chunk + 1) / 2)
        mask_kind = "is_causal"
        if prefix == 0:
            fn, kv = run_sdpa(inputs, heads, kv_heads, is_causal=True)
        else:
            try:
                from torch.nn.attention.bias import causal_lower_right

                bias = causal_lower_right(chunk, kv_len)
                fn, kv = run_sdpa(inputs, heads, kv_heads, attn_mask=bias)
                mask_kind = "causal_lower_right"
            except Exception as e:
                print(f"  causal_lower_right refused ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
                pos = torch.arange(kv_len, device="cuda")
                mask = pos[None, :] <= (prefix + torch.arange(chunk, device="cuda"))[:, None]
                fn, kv = run_sdpa(inputs, heads, kv_heads, attn_mask=mask)
                mask_kind = "explicit bool mask"
        ms = median_ms(fn, copies)
        rows.append((name, f"{heads}/{kv_heads}, d={d}", f"{kv}, {mask_kind}", ms, f"{flops / ms / 1e9:.1f} TFLOP/s"))
        print(f"{name}: {ms:.3f} ms, {flops / ms / 1e9:.1f} TFLOP/s ({kv}, {mask_kind})", file=sys.stderr)
        del inputs, fn
        torch.cuda.empty_cache()
    return rows


def decode_rows():
    rows = []
    # The head layouts and shapes of benches/decode_attention.rs: Llama-3.1-8B, Qwen2.5-3B,
    # Qwen2.5-14B, SmolLM2.
    for heads, kv_heads, d in [(32, 8, 128), (16, 2, 128), (40, 8, 128), (9, 3, 64)]:
        for batch, ctx in [(1, 4096), (1, 32768), (32, 2048), (64, 4096), (128, 1024)]:
            kv_bytes = 2 * batch * kv_heads * ctx * d * 2
            copies = copies_for(kv_bytes)
            inputs = make_inputs(batch, heads, kv_heads, 1, ctx, d, copies)
            fn, kv = run_sdpa(inputs, heads, kv_heads)
            ms = median_ms(fn, copies)
            name = f"decode {batch}x{ctx}"
            rows.append((name, f"{heads}/{kv_heads}, d={d}", kv, ms, f"{kv_bytes / ms / 1e9:.2f} TB/s"))
            print(f"{name} {heads}/{kv_heads} d={d}: {ms:.4f} ms, {kv_bytes / ms / 1e9:.2f} TB/s ({kv})", file=sys.stderr)
            del inputs, fn
            torch.cuda.empty_cache()
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="Markdown file to write the table to")
    parser.add_argument("--backend", default="auto", choices=["auto", "flash", "efficient", "cudnn", "math"])
    parser.add_argument("--sustain-ms", type=float, default=DEFAULT_SUSTAIN_MS, help="back-to-back calls before timing")
    parser.add_argument("--rows", default="all", choices=["all", "prefill", "decode"])
    args = parser.parse_args()
    global sustain_ms
    sustain_ms = args.sustain_ms
    torch.manual_seed(0)
    device = torch.cuda.get_device_name()
    with backend_context(args.backend), torch.no_grad():
        rows = (prefill_rows() if args.rows != "decode" else []) + (decode_rows() if args.rows != "prefill" else [])
    lines = [
        f"## torch SDPA (torch {torch.__version__}, backend {args.backend}, timed after {sustain_ms:g} ms of "
        f"back-to-back calls) — {device}",
        "",
        "| shape | heads | K/V, mask | ms | throughput |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {n} | {h} | {k} | {ms:.4f} | {t} |" for n, h, k, ms, t in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
