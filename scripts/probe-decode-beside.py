#!/usr/bin/env python3
"""Probe: which part of a prefill GEMM slows a decode lane beside it?

The beside bench (`benches/gemm.rs`, `gemm-beside`) finds a decode GEMM (M 16) on 16-32 SMs
1.35-1.44x slower beside a prefill GEMM (M 2048) on the other SMs (H100, twenty-sixth and
twenty-seventh sessions), but only 1.07-1.10x beside a streaming read of the prefill's HBM bytes,
and no better when the prefill's CTAs share B by TMA multicast (half its L2 reads). This probe
takes the prefill GEMM apart. Its stand-in `lane` is one kernel with the GEMM's shape: 384 threads
(a producer warpgroup and two consumer warpgroups), a ring of 4 stages of 48 KB (A 128 x 64 and
B 256 x 64 bf16, random values), one CTA per SM, each consumer running wgmma m64n256k16 four times
a stage. Its modes each keep some of the GEMM:

- `idle`: every CTA waits on its SM (sleeps), nothing else: SMs taken, no work;
- `mma`: the stages loaded once, then wgmma on them forever: the tensor cores' work (and power)
  with no memory traffic;
- `mma+store`: the same, and every 64 stages (a 128 x 256 tile of K 4096) the consumers store
  their accumulators as bf16 (64 KB a tile), as the GEMM's epilogue does;
- `l2`: bulk copies (`cp.async.bulk`) of 48 KB chunks of an 8 MB region (resident in L2) into the
  ring as fast as it frees, no wgmma: the operand traffic alone;
- `gemm-l2`: both, the consumers freeing each stage after its wgmmas: a GEMM whose operands come
  from L2, which is where most of a prefill GEMM's tile loads are served;
- `gemm-l2+store`: and the epilogue's stores.

The decode lane's stand-ins on D SMs (16, 32): `stream`, a streaming read of 1 GB regions (three
rotated, beyond L2) with 64 KB of loads in flight per SM, and `bulk`, the `lane` kernel's `l2`
mode reading the same regions (bulk copies into a 192 KB ring, as the decode GEMM streams its
weights). Each is timed alone and beside each mode run on the other SMs for each of `--hold-ms`
(default 5 and 300 ms: a few milliseconds as in the beside bench, and long enough for the board's
power management to act), seven runs spread over that time, against the same runs with the other
SMs idle (the gaps between runs alone cost a 300 ms pattern 1.15-1.28x on an H100, so a
back-to-back baseline would not do). A thread samples the SM clock, the board
power and the clock event reasons through NVML every millisecond; the table gives the clock's and
the power's medians over each case's timed runs and the share of samples with the software power
cap among the reasons.

Runs on the GPU machine with CuPy (NVRTC, sm_90a), from the repository root (it includes
cuda/wgmma.cuh; `scripts/gpu-round.sh DIR OUT beside` runs it with the GEMM bench's beside rows):

    python3 scripts/probe-decode-beside.py > $OUT/decode-beside.md
"""
import argparse
import ctypes
import threading
import time

import cupy as cp
import numpy as np

from probe_common import STREAM_SRC, launch_stream, nexus_header_options, stream_kernel, timed

SRC = r'''
#include "wgmma.cuh"
using namespace nexus;
using u32 = unsigned;
using u64 = unsigned long long;

constexpr u32 STAGES = 4, A_BYTES = 128 * 128, B_BYTES = 256 * 128, STAGE = A_BYTES + B_BYTES;
constexpr u32 PIECE = 16384;   // bytes per bulk copy (three a stage)
constexpr u32 TILE_STEPS = 64; // stages per output tile (K = 4096)
enum : u32 { LOAD = 1, MMA = 2, STORE = 4, IDLE = 8 };

// Step i of CTA c works on chunk (i * grid + c) % chunks of `src` (48 KB chunks). Without LOAD
// the first STAGES steps are loaded once and the consumers go round them for `steps` steps.
extern "C" __global__ void __launch_bounds__(384, 1)
lane(const char* __restrict__ src, u64 chunks, u32 steps, u32 mode, u32* __restrict__ out, u32 out_tiles) {
  extern __shared__ unsigned char ring[];
  __shared__ __align__(8) u64 full[STAGES], empty[STAGES];
  // Stages on 1024-byte boundaries, as the 128-byte swizzle of the wgmma descriptors expects.
  const u32 wg = threadIdx.x / 128, base = (smem_addr(ring) + 1023u) & ~1023u;
  if (mode & IDLE) {
    if (threadIdx.x == 0) {
      const u64 until = global_timer_ns() + (u64)steps * 1000;
      while (global_timer_ns() < until) __nanosleep(10000);
    }
    return;
  }
  if (threadIdx.x == 0) {
    for (u32 s = 0; s < STAGES; ++s) {
      mbar_init(smem_addr(&full[s]), 1);
      mbar_init(smem_addr(&empty[s]), 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const u32 loads = (mode & LOAD) ? steps : (steps < STAGES ? steps : STAGES);
  if (wg == 0) {
    if (threadIdx.x != 0) return;
    for (u32 i = 0; i < loads; ++i) {
      const u32 s = i % STAGES, bar = smem_addr(&full[s]), dst = base + s * STAGE;
      if (i >= STAGES) mbar_wait(smem_addr(&empty[s]), ((i / STAGES) - 1) & 1);
      mbar_arrive_expect_tx(bar, STAGE);
      const char* chunk = src + ((u64)i * gridDim.x + blockIdx.x) % chunks * STAGE;
      for (u32 p = 0; p < STAGE / PIECE; ++p)
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(dst + p * PIECE), "l"(chunk + p * PIECE), "r"(PIECE), "r"(bar) : "memory");
    }
    return;
  }
  const u32 t = threadIdx.x - 128;  // 0..255 over the consumers
  float d[Wgmma<256>::REGS];
  for (int r = 0; r < Wgmma<256>::REGS; ++r) d[r] = 0.f;
  for (u32 i = 0; i < steps; ++i) {
    const u32 s = i % STAGES;
    if (i < loads) mbar_wait(smem_addr(&full[s]), (i / STAGES) & 1);
    if (mode & MMA) {
      const uint64_t da = smem_desc(base + s * STAGE + (wg - 1) * (A_BYTES / 2));
      const uint64_t db = smem_desc(base + s * STAGE + A_BYTES);
      wgmma_fence();
      for (u32 k = 0; k < 4; ++k) Wgmma<256>::run(d, desc_advance(da, 32 * k), desc_advance(db, 32 * k), i % TILE_STEPS + k != 0);
      wgmma_commit();
      wgmma_wait<0>();
      touch(d);
    }
    if ((mode & LOAD) && i < loads) mbar_arrive(smem_addr(&empty[s]));
    if ((mode & STORE) && i % TILE_STEPS == TILE_STEPS - 1) {
      u32* o = out + (u64)((i / TILE_STEPS * gridDim.x + blockIdx.x) % out_tiles) * 256 * 64;
      for (int r = 0; r < Wgmma<256>::REGS / 2; ++r) o[r * 256 + t] = pack_bf16(d[2 * r], d[2 * r + 1]);
    }
  }
  // Never true for random inputs: keeps the accumulators live.
  if (!(mode & STORE) && d[0] == 1234.5f) out[t] = 1;
}

'''

LOAD, MMA, STORE, IDLE = 1, 2, 4, 8
MODES = {
    "idle": IDLE,
    "mma": MMA,
    "mma+store": MMA | STORE,
    "l2": LOAD,
    "gemm-l2": LOAD | MMA,
    "gemm-l2+store": LOAD | MMA | STORE,
}
STAGE = 48 * 1024
RING = 4 * STAGE + 1024  # and the alignment
REGION = 8 << 20  # resident in L2
NB = 1 << 30  # each of the three rotated HBM regions
OUT_TILES = 512  # 64 KB each: 32 MB of outputs


class Nvml:
    """SM clock (MHz), board power (W) and clock event reasons through libnvidia-ml, sampled by a
    thread."""

    def __init__(self):
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        assert self.lib.nvmlInit_v2() == 0
        self.handle = ctypes.c_void_p()
        assert self.lib.nvmlDeviceGetHandleByIndex_v2(0, ctypes.byref(self.handle)) == 0
        # The reasons' newer name (drivers from r535 on), else the older one.
        names = ("nvmlDeviceGetCurrentClocksEventReasons", "nvmlDeviceGetCurrentClocksThrottleReasons")
        self.reasons = next(getattr(self.lib, n) for n in names if hasattr(self.lib, n))
        self.samples = []  # (perf_counter, MHz, W, reasons)
        self.running = True
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        clock, power, reasons = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_ulonglong()
        while self.running:
            self.lib.nvmlDeviceGetClockInfo(self.handle, 1, ctypes.byref(clock))  # NVML_CLOCK_SM
            self.lib.nvmlDeviceGetPowerUsage(self.handle, ctypes.byref(power))  # mW
            self.reasons(self.handle, ctypes.byref(reasons))
            self.samples.append((time.perf_counter(), clock.value, power.value / 1e3, reasons.value))
            time.sleep(0.001)

    def between(self, t0, t1):
        """Median MHz and W over [t0, t1], and the share of samples at the power cap."""
        got = [(mhz, w, why) for t, mhz, w, why in self.samples if t0 <= t <= t1]
        if not got:
            return "- | - | no samples"
        capped = sum(1 for g in got if g[2] & 0x4) / len(got)  # SW power cap
        return (f"{np.median([g[0] for g in got]):.0f} | {np.median([g[1] for g in got]):.0f} | "
                f"{100 * capped:.0f}% ({len(got)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hold-ms", default="5,300",
                    help="how long the other SMs run per case, in ms (a list: each case at each)")
    ap.add_argument("--decode-sms", default="16,32")
    args = ap.parse_args()

    options = ("-arch=sm_90a", "-std=c++17", *nexus_header_options())
    module = cp.RawModule(code=SRC + STREAM_SRC, options=options)
    lane, stream = module.get_function("lane"), stream_kernel(module)
    lane.max_dynamic_shared_size_bytes = RING
    sms = cp.cuda.Device().attributes["MultiProcessorCount"]
    name = cp.cuda.runtime.getDeviceProperties(0)["name"].decode()

    def bf16_random(n_bytes):
        x = cp.random.standard_normal(n_bytes // 2, dtype=cp.float32)
        return (x.view(cp.uint32) >> 16).astype(cp.uint16)

    region = bf16_random(REGION)
    big = cp.random.randint(0, 2**31, size=3 * NB // 4, dtype=cp.int32)
    out = cp.zeros(OUT_TILES * 256 * 64, dtype=cp.uint32)
    hs, st = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    nvml = Nvml()

    def launch_lane(ctas, src, chunks, steps, mode, on):
        lane((ctas,), (384,), (src, cp.uint64(chunks), cp.uint32(steps), cp.uint32(mode), out, cp.uint32(OUT_TILES)),
             shared_mem=RING, stream=on)

    def launch_hammer(mode, ctas, steps):
        launch_lane(ctas, region.data.ptr, REGION // STAGE, steps, mode, hs)

    def launch_standin(kind, ctas, rep):
        src = big.data.ptr + (rep % 3) * NB
        if kind == "stream":
            launch_stream(stream, ctas, src, NB, out, st)
        else:
            launch_lane(ctas, src, NB // STAGE, NB // STAGE // ctas, LOAD, st)

    print(f"### A decode stand-in on D SMs beside parts of a prefill GEMM on the others — {name}, {sms} SMs\n")
    holds = [float(x) for x in args.hold_ms.split(",")]
    print("Hold: how long the other SMs run (`--hold-ms`, or longer where seven runs up to 3x their time")
    print("alone need it); the timed runs start after 30% of `--hold-ms` and are 5% of it apart. \"Alone\"")
    print("runs the same pattern with the other SMs idle, so that each ratio compares like with like. Each")
    print("case starts after 0.5 s idle. Clock and power: NVML medians over the timed runs.\n")
    print("| D | decode stand-in | other SMs run | their rate alone | hold ms | stand-in TB/s | beside / alone "
          "| SM MHz | board W | samples at the power cap |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def runs(kind, d, hold_ms):
        """Seven timed runs of the stand-in, 30% of the hold after now and 5% of it apart: the
        median seconds, and the clocks over them."""
        time.sleep(0.3e-3 * hold_ms)
        t0 = time.perf_counter()
        times = []
        for r in range(7):
            times.append(timed(st, lambda r=r: launch_standin(kind, d, r)))
            time.sleep(0.05e-3 * hold_ms)
        return float(np.median(times)), nvml.between(t0, time.perf_counter())

    for d in (int(x) for x in args.decode_sms.split(",")):
        ctas = sms - d
        for kind in ("stream", "bulk"):
            alone = {}
            for hold_ms in holds:
                time.sleep(0.5)
                alone[hold_ms], clocks = runs(kind, d, hold_ms)
                print(f"| {d} | {kind} | nothing | - | {hold_ms:.0f} | {NB / alone[hold_ms] / 1e12:.2f} | 1.00 | "
                      f"{clocks} |", flush=True)
            for mode_name, mode in MODES.items():
                if mode == IDLE:
                    rate, step_s = "-", 1e-6  # a step of `lane` in IDLE mode is a microsecond of sleep
                else:
                    step_s = timed(hs, lambda: launch_hammer(mode, ctas, 1024)) / 1024
                    flops = 128 * 256 * 64 * 2 * ctas / step_s if mode & MMA else 0
                    moved = STAGE * ctas / step_s if mode & LOAD else 0
                    rate = " ".join(x for x in (f"{flops / 1e12:.0f} TFLOP/s" if flops else "",
                                                 f"{moved / 1e12:.1f} TB/s from L2" if moved else "") if x)
                for hold_ms in holds:
                    # Long enough for the wait before the first run, the gaps between runs and
                    # seven runs up to 3x their time alone.
                    hold_s = max(hold_ms * 1e-3, 0.65 * hold_ms * 1e-3 + 21 * alone[hold_ms])
                    time.sleep(0.5)
                    launch_hammer(mode, ctas, int(hold_s / step_s))
                    b, clocks = runs(kind, d, hold_ms)
                    hs.synchronize()
                    print(f"| {d} | {kind} | {mode_name} | {rate} | {1e3 * hold_s:.0f} | {NB / b / 1e12:.2f} | "
                          f"{b / alone[hold_ms]:.2f} | {clocks} |", flush=True)
    nvml.running = False


if __name__ == "__main__":
    main()
