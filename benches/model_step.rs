//! Forward-step times of a synthetic model (published config, random bf16 weights made on the
//! GPU) on the CUDA backend: prefill throughput of an 8k-token prompt with all SMs (on Hopper also
//! with the portable prefill attention kernel in place of the wgmma one), and decode
//! step time at batch 1 and at batch 64 with 2k tokens of context each, with all SMs and on a
//! budget of 64, each against its floor: the larger of the bytes it must read at the streaming
//! read's limit measured in the same run at that budget (`common::stream_read_curve`: 192 KB in
//! flight per SM, not the planners' curve of [`nexus::kernels::Gpu::model`]) and its FLOPs at 798
//! TFLOP/s (an 8192³ bf16 matrix product on an H100; the H200 has the same tensor cores) times
//! the budget's share of the SMs. Then each mode's decode steps at batch 1 and 64 kernel by kernel
//! (each launch timed between CUDA events, so run eagerly): where the time goes and which GEMM
//! kernel each projection plans, against the streaming read at the budget.
//!
//! `NEXUS_MODEL_STEP=<name>` picks the model (default `llama-3.1-8b`; see
//! `nexus_runtime::weights::synthetic::NAMES`); `NEXUS_BENCH_OUT=<dir>` saves the table;
//! `NEXUS_TIMELINE=<file>`, in a build of `scripts/timeline-build.sh`, appends each mode's decode
//! steps' CTA records to the file (read them with `scripts/timeline.py`). Times are wall
//! clock per step with the result (greedy argmax) back on the host: what a serving loop sees,
//! launch overheads included. Decode steps are timed four ways: replayed from CUDA graphs (the
//! backend's default: on Hopper with dependent launches while the phase has every SM), the same
//! without dependent launches, launched eagerly, and in the batch-invariant mode.

mod common;

use std::time::Instant;

use common::{Report, device_name, plan_label, stream_read_curve};
use nexus::kernels::gemm::{self, GemmShape};
use nexus::kernels::{CtaBudget, Gpu, QkvLayout};
use nexus::runtime::engine::DEFAULT_BLOCK_SIZE;
use nexus::runtime::engine::batch::{SeqChunk, build_step};
use nexus::runtime::engine::kv_cache::BlockManager;
use nexus::runtime::model::LlamaModel;
use nexus::runtime::model::backend::{Backend, HostLogits, LogitsReadback, OpShape, OpTime, StepKind};
use nexus::runtime::model::cuda::{CudaBackend, CudaBackendConfig};
use nexus::runtime::weights::config::ModelConfig;
use nexus::runtime::weights::synthetic;

/// Dense bf16 matrix-product throughput measured on the H100 (8192³), FLOP per second.
const ANCHOR_FLOPS: f64 = 798e12;

fn main() {
    let name = std::env::var("NEXUS_MODEL_STEP").unwrap_or_else(|_| "llama-3.1-8b".into());
    let config = synthetic::config(&name).expect("synthetic model");
    let gpu = Gpu::new(0).expect("a CUDA GPU");
    // The decode steps run on every SM and on this budget; the read's limit is measured at both.
    let budget = 64.min(gpu.sm_count());
    let mut read_budgets = vec![CtaBudget::new(budget, &gpu).expect("budget"), CtaBudget::all(&gpu)];
    read_budgets.dedup();
    let limit = stream_read_curve(&gpu, &gpu.new_stream().expect("stream"), &read_budgets);
    eprintln!("streaming read with every SM: {:.2} TB/s", limit.at(gpu.sm_count()) / 1e12);
    let backend = CudaBackend::new(gpu.clone()).expect("backend");
    let eager = CudaBackend::with_config(
        gpu.clone(),
        CudaBackendConfig { graph_batch_sizes: Vec::new(), ..CudaBackendConfig::default() },
    )
    .expect("eager backend");
    let invariant = CudaBackend::with_config(
        gpu.clone(),
        CudaBackendConfig { batch_invariant: true, ..CudaBackendConfig::default() },
    )
    .expect("batch-invariant backend");
    let portable = CudaBackend::with_config(
        gpu.clone(),
        CudaBackendConfig { portable_prefill_attention: true, ..CudaBackendConfig::default() },
    )
    .expect("portable-attention backend");
    let serial = CudaBackend::with_config(
        gpu.clone(),
        CudaBackendConfig { dependent_launch: false, ..CudaBackendConfig::default() },
    )
    .expect("backend without dependent launches");
    let start = Instant::now();
    let model = LlamaModel::random(&backend, &config, 1).expect("random weights");
    backend.synchronize().expect("sync");
    let params: usize = config.weight_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let weight_bytes = params as f64 * 2.0;
    eprintln!("{name}: {params} parameters made in {:.2} s", start.elapsed().as_secs_f64());

    let (decode_batch, context) = (64usize, 2048usize);
    let prefill_tokens = 8192usize;
    let block_size = common::block_size(DEFAULT_BLOCK_SIZE);
    let num_blocks = (decode_batch * (context + 64) + 2 * prefill_tokens + 4096) / block_size;
    let mut cache = model.alloc_kv_cache(&backend, num_blocks, block_size).expect("KV cache");
    let mut blocks = BlockManager::new(num_blocks, block_size).expect("blocks");
    let token = |i: usize| (i * 7919 % config.vocab_size) as u32;
    let kv_bytes_per_token = (config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2) as f64;

    // Each backend runs its steps in a phase of its own, with every SM; the CUDA graphs also on a
    // phase of a smaller budget.
    let phases = [&backend, &eager, &invariant, &portable, &serial].map(|b| b.new_phase().expect("phase"));
    let mut budgeted = backend.new_phase().expect("phase");
    backend.set_budget(&mut budgeted, budget).expect("budget");
    let mut step_on = |(backend, phase): (&CudaBackend, &_), blocks: &mut BlockManager, chunks: &[SeqChunk<'_>]| {
        let decode = chunks.iter().all(|c| c.tokens.len() == 1);
        let kind = if decode { StepKind::Decode } else { StepKind::Prefill };
        let input = build_step(blocks, chunks, kind).expect("step");
        let logits = model.forward(backend, phase, &mut cache, &input).expect("forward");
        match backend.logits_to_host(phase, logits, LogitsReadback::Argmax).expect("argmax") {
            HostLogits::Argmax(ids) => ids,
            HostLogits::Full(_) => unreachable!("argmax was asked for"),
        }
    };
    let report = Report::new(
        &format!("{name} forward steps, CUDA backend, all SMs (wall clock, greedy token on the host)"),
        &["step", "tokens", "ms per step", "tokens/s", "TFLOP/s", "GB read", "floor ms", "floor / time"],
    );
    // FLOPs of a step: 2 per parameter per token in the linear layers, plus attention's
    // 4·H·d per (query, key) pair in every layer.
    let attention_flops = |pairs: f64| 4.0 * (config.num_heads * config.head_dim * config.num_layers) as f64 * pairs;
    let row = |what: &str, sms: u32, tokens: usize, seconds: f64, bytes: f64, flops: f64| {
        let floor = (bytes / limit.at(sms)).max(flops / ANCHOR_FLOPS * f64::from(sms) / f64::from(gpu.sm_count()));
        report.add(vec![
            what.into(),
            tokens.to_string(),
            format!("{:.2}", seconds * 1e3),
            format!("{:.0}", tokens as f64 / seconds),
            format!("{:.1}", flops / seconds / 1e12),
            format!("{:.2}", bytes / 1e9),
            format!("{:.2}", floor * 1e3),
            format!("{:.0}%", 100.0 * floor / seconds),
        ]);
    };
    let linear_flops = |tokens: usize| 2.0 * params as f64 * tokens as f64;

    // Prefill: one 8k-token prompt in one step (after a warm-up run of the same), with the
    // default prefill attention kernel and, on Hopper (where the default is the wgmma one), with
    // the portable one.
    let prompt: Vec<u32> = (0..prefill_tokens).map(token).collect();
    let causal_pairs = (prefill_tokens * (prefill_tokens + 1) / 2) as f64;
    let mut prefill_runs = vec![("prefill 8k prompt", &backend, &phases[0])];
    if gpu.target() == nexus::kernels::gpu::PtxTarget::Sm90a {
        prefill_runs.push(("prefill 8k prompt, portable attention", &portable, &phases[3]));
    }
    for (what, backend, phase) in prefill_runs {
        let mut times = Vec::new();
        for run in 0..4 {
            let seq = 1_000_000 + run as u64;
            let t = Instant::now();
            step_on((backend, phase), &mut blocks, &[SeqChunk { seq, tokens: &prompt, wants_logits: true }]);
            times.push(t.elapsed().as_secs_f64());
            blocks.free(seq);
        }
        let prefill = median(&times[1..]);
        let flops = linear_flops(prefill_tokens) + attention_flops(causal_pairs);
        row(what, gpu.sm_count(), prefill_tokens, prefill, weight_bytes, flops);
    }

    let all = gpu.sm_count();
    let modes = [
        (format!("CUDA graphs, {all} SMs"), &backend, &phases[0], all),
        (format!("CUDA graphs, no dependent launch, {all} SMs"), &serial, &phases[4], all),
        (format!("eager, {all} SMs"), &eager, &phases[1], all),
        (format!("batch invariant, {all} SMs"), &invariant, &phases[2], all),
        (format!("CUDA graphs, {budget} SMs"), &backend, &budgeted, budget),
    ];
    let kernels = Report::new(
        &format!("{name} decode steps, kernel by kernel (eager, CUDA events)"),
        &[
            "step",
            "SMs",
            "kernel",
            "GEMM plan",
            "launches",
            "ms",
            "share of the kernels' time",
            "GB moved",
            "TB/s",
            "streaming read at the SMs (TB/s)",
        ],
    );
    for (mode, backend, phase, sms) in modes {
        let graphs = mode.starts_with("CUDA graphs");
        // The kernel each GEMM runs: what the backend's planner picks for the shape at the budget.
        let budget_sms = CtaBudget::new(sms, &gpu).expect("budget");
        let batch_invariant = std::ptr::eq(backend, &invariant);
        let plan = |shape: GemmShape| {
            plan_label(&if batch_invariant {
                gemm::plan_batch_invariant(shape, budget_sms, gpu.model())
            } else {
                gemm::plan(shape, budget_sms, gpu.model())
            })
        };
        let backend = (backend, phase);
        // Decode at batch 1, after a 128-token prompt.
        let short: Vec<u32> = (0..128).map(token).collect();
        let mut next = step_on(backend, &mut blocks, &[SeqChunk { seq: 0, tokens: &short, wants_logits: true }])[0];
        let mut times = Vec::new();
        for i in 0..60 {
            let t = Instant::now();
            next = step_on(backend, &mut blocks, &[SeqChunk { seq: 0, tokens: &[next], wants_logits: true }])[0];
            if i >= 10 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        timeline(&gpu, &format!("batch 1, {mode}"), || {
            next = step_on(backend, &mut blocks, &[SeqChunk { seq: 0, tokens: &[next], wants_logits: true }])[0];
        });
        // The step at batch 1 once more, each kernel timed (in every mode: the kernels' times and
        // plans, not the mode's overlap).
        let ops = kernel_times(backend, || {
            step_on(backend, &mut blocks, &[SeqChunk { seq: 0, tokens: &[next], wants_logits: true }]);
        });
        let step = format!("batch 1, {mode}");
        kernel_rows(&kernels, &step, &config, 1, sms, limit.at(sms), &plan, &ops);
        blocks.free(0);
        let bytes = weight_bytes + 150.0 * kv_bytes_per_token;
        let flops = linear_flops(1) + attention_flops(150.0);
        row(&format!("decode, batch 1, ~150 tokens of context, {mode}"), sms, 1, median(&times), bytes, flops);

        // Decode at batch 64 with 2k tokens of context each: prefill four sequences per step first.
        let long: Vec<u32> = (0..context).map(token).collect();
        let seqs: Vec<u64> = (1..=decode_batch as u64).collect();
        for group in seqs.chunks(4) {
            let chunks: Vec<SeqChunk<'_>> =
                group.iter().map(|&seq| SeqChunk { seq, tokens: &long, wants_logits: true }).collect();
            step_on(backend, &mut blocks, &chunks);
        }
        let mut last: Vec<u32> = vec![token(1); decode_batch];
        let mut times = Vec::new();
        for i in 0..25 {
            let chunks = decode_chunks(&seqs, &last);
            let t = Instant::now();
            let out = step_on(backend, &mut blocks, &chunks);
            if i >= 5 {
                times.push(t.elapsed().as_secs_f64());
            }
            last = out;
        }
        let step = format!("batch {decode_batch} x {context}, {mode}");
        timeline(&gpu, &step, || last = step_on(backend, &mut blocks, &decode_chunks(&seqs, &last)));
        // The same step once more, each kernel timed.
        let chunks = decode_chunks(&seqs, &last);
        let ops = kernel_times(backend, || {
            step_on(backend, &mut blocks, &chunks);
        });
        kernel_rows(&kernels, &step, &config, decode_batch, sms, limit.at(sms), &plan, &ops);
        if graphs {
            for (batch, budget, census) in backend.0.recorded_graph_census(backend.1).expect("graph census") {
                eprintln!("{mode}: graph of batch {batch} on {budget} SMs: {census:?}");
            }
        }
        seqs.iter().for_each(|&seq| blocks.free(seq));
        let kv_read = decode_batch as f64 * (context + 15) as f64 * kv_bytes_per_token;
        let flops = linear_flops(decode_batch) + attention_flops((decode_batch * (context + 15)) as f64);
        let what = format!("decode, batch {decode_batch}, {context} tokens of context, {mode}");
        row(&what, sms, decode_batch, median(&times), weight_bytes + kv_read, flops);
    }
    report.finish(&gpu, &format!("model_step-{name}"));
    kernels.finish(&gpu, &format!("model_step-kernels-{name}"));
    eprintln!("device: {}", device_name(&gpu));
}

/// One decode token per sequence: `last[i]` for `seqs[i]`.
fn decode_chunks<'a>(seqs: &[u64], last: &'a [u32]) -> Vec<SeqChunk<'a>> {
    seqs.iter()
        .zip(last)
        .map(|(&seq, t)| SeqChunk { seq, tokens: std::slice::from_ref(t), wants_logits: true })
        .collect()
}

/// With `NEXUS_TIMELINE=<file>` and kernels built with `-DNEXUS_TIMELINE`: the CTA records of the
/// step `run` makes (after one run to warm it), appended to the file as CSV lines of `step, module,
/// wait | exit, grid, block, sm, ns, ns` ([`nexus::kernels::gpu::TimelineRecord`]).
fn timeline(gpu: &std::sync::Arc<Gpu>, step: &str, mut run: impl FnMut()) {
    let Ok(path) = std::env::var("NEXUS_TIMELINE") else { return };
    let stream = gpu.new_stream().expect("stream");
    run();
    gpu.take_timeline(&stream).expect("timeline");
    run();
    let records = gpu.take_timeline(&stream).expect("timeline");
    let mut text = String::new();
    for r in &records {
        text += &format!(
            "{step},{},{},{},{},{},{},{}\n",
            r.module,
            if r.exit { "exit" } else { "wait" },
            r.grid,
            r.block,
            r.sm,
            r.from,
            r.until
        );
    }
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path).expect("timeline file");
    file.write_all(text.as_bytes()).expect("timeline write");
    eprintln!("timeline of {step}: {} CTA records", records.len());
}

/// The kernels of the step `run` launches, each timed between CUDA events (so launched eagerly,
/// whatever the mode).
fn kernel_times((backend, phase): (&CudaBackend, &<CudaBackend as Backend>::Phase), run: impl FnOnce()) -> Vec<OpTime> {
    backend.time_ops(phase, true).expect("time ops");
    run();
    let ops = backend.take_op_times(phase).expect("op times");
    backend.time_ops(phase, false).expect("time ops");
    ops
}

/// Rows of `report` for the timed operators `ops` of one decode step of `rows` tokens on `sms`
/// SMs, whose streaming read reaches `stream` bytes/s: per kernel (each GEMM by its role, with the
/// kernel `plan` gives its shape; attention; the row-wise kernels by the bytes they move: the
/// layers' fused residual add + norm, RoPE with the KV write, and the rest), its launches, time,
/// bytes and rate.
#[allow(clippy::too_many_arguments)]
fn kernel_rows(
    report: &Report,
    step: &str,
    config: &ModelConfig,
    rows: usize,
    sms: u32,
    stream: f64,
    plan: &dyn Fn(GemmShape) -> String,
    ops: &[OpTime],
) {
    let (q, kv) = (config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim);
    let h = config.hidden_size;
    let role = |n: usize, k: usize| match (n, k) {
        _ if (n, k) == (q + 2 * kv, h) => "GEMM QKV",
        _ if (n, k) == (h, q) => "GEMM output",
        _ if (n, k) == (2 * config.intermediate_size, h) => "GEMM gate/up",
        _ if (n, k) == (h, config.intermediate_size) => "GEMM down",
        _ if n == config.vocab_size => "GEMM LM head",
        _ => "GEMM other",
    };
    // The row-wise operators by the shapes the backend times them as.
    let layout =
        QkvLayout { num_heads: config.num_heads, num_kv_heads: config.num_kv_heads, head_dim: config.head_dim };
    let row_wise = |shape: OpShape| match shape {
        _ if shape == OpShape::elementwise(4 * rows * h) => "norm with residual add",
        _ if shape == OpShape::rope_and_write_kv(rows, layout) => "RoPE + KV write",
        _ => "other row-wise",
    };
    let kv_bytes_per_token = (2 * kv * 2) as f64;
    // (name, GEMM plan, launches, seconds, bytes)
    let mut kernels: Vec<(&str, String, usize, f64, f64)> = Vec::new();
    for op in ops {
        let (name, planned, bytes) = match op.shape {
            OpShape::Gemm { m, n, k } => {
                let shape = GemmShape { m, n, k };
                (role(n, k), plan(shape), shape.bf16_bytes() as f64)
            }
            OpShape::Attention { tokens, kv_tokens, .. } => {
                ("attention", String::new(), kv_tokens * kv_bytes_per_token + (tokens * 4 * q) as f64)
            }
            OpShape::Elementwise { bytes } => (row_wise(op.shape), String::new(), bytes),
        };
        match kernels.iter_mut().find(|k| k.0 == name) {
            Some(k) => (k.2, k.3, k.4) = (k.2 + 1, k.3 + op.seconds, k.4 + bytes),
            None => kernels.push((name, planned, 1, op.seconds, bytes)),
        }
    }
    let seconds_all = kernels.iter().map(|k| k.3).sum::<f64>();
    let all = ("all kernels", String::new(), ops.len(), seconds_all, kernels.iter().map(|k| k.4).sum());
    for (name, planned, launches, seconds, bytes) in kernels.into_iter().chain([all]) {
        report.add(vec![
            step.into(),
            sms.to_string(),
            name.into(),
            planned,
            launches.to_string(),
            format!("{:.3}", seconds * 1e3),
            format!("{:.0}%", 100.0 * seconds / seconds_all),
            format!("{:.2}", bytes / 1e9),
            format!("{:.2}", bytes / seconds / 1e12),
            format!("{:.2}", stream / 1e12),
        ]);
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
