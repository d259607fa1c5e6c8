//! Forward-step times of a synthetic model (published config, random bf16 weights made on the
//! GPU) on the CUDA backend with all SMs: prefill throughput of an 8k-token prompt, and decode
//! step time at batch 1 and at batch 64 with 2k tokens of context each, each against its floor:
//! the larger of the bytes it must read at the all-SM streaming read this GPU measured
//! ([`nexus::kernels::Gpu::model`]) and its FLOPs at 798 TFLOP/s (an 8192³ bf16 matrix product
//! on an H100; the H200 has the same tensor cores).
//!
//! `NEXUS_MODEL_STEP=<name>` picks the model (default `llama-3.1-8b`; see
//! `nexus_runtime::weights::synthetic::NAMES`); `NEXUS_BENCH_OUT=<dir>` saves the table. Times are wall
//! clock per step with the result (greedy argmax) back on the host: what a serving loop sees,
//! launch overheads included. Decode steps are timed three ways: replayed from CUDA graphs (the
//! backend's default), launched eagerly, and in the batch-invariant mode.

mod common;

use std::time::Instant;

use common::{Report, device_name};
use nexus::kernels::Gpu;
use nexus::runtime::engine::batch::{SeqChunk, build_step};
use nexus::runtime::engine::kv_cache::BlockManager;
use nexus::runtime::model::LlamaModel;
use nexus::runtime::model::backend::{Backend, HostLogits, LogitsReadback, StepKind};
use nexus::runtime::model::cuda::{CudaBackend, CudaBackendConfig};
use nexus::runtime::weights::synthetic;

/// Dense bf16 matrix-product throughput measured on the H100 (8192³), FLOP per second.
const ANCHOR_FLOPS: f64 = 798e12;
const BLOCK_SIZE: usize = 16;

fn main() {
    let name = std::env::var("NEXUS_MODEL_STEP").unwrap_or_else(|_| "llama-3.1-8b".into());
    let config = synthetic::config(&name).expect("synthetic model");
    let gpu = Gpu::new(0).expect("a CUDA GPU");
    let bandwidth = gpu.model().bandwidth().at(gpu.sm_count());
    eprintln!("streaming read with every SM: {:.2} TB/s", bandwidth / 1e12);
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
    let start = Instant::now();
    let model = LlamaModel::random(&backend, &config, 1).expect("random weights");
    backend.synchronize().expect("sync");
    let params: usize = config.weight_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    let weight_bytes = params as f64 * 2.0;
    eprintln!("{name}: {params} parameters made in {:.2} s", start.elapsed().as_secs_f64());

    let (decode_batch, context) = (64usize, 2048usize);
    let prefill_tokens = 8192usize;
    let num_blocks = (decode_batch * (context + 64) + 2 * prefill_tokens + 4096) / BLOCK_SIZE;
    let mut cache = model.alloc_kv_cache(&backend, num_blocks, BLOCK_SIZE).expect("KV cache");
    let mut blocks = BlockManager::new(num_blocks, BLOCK_SIZE).expect("blocks");
    let token = |i: usize| (i * 7919 % config.vocab_size) as u32;
    let kv_bytes_per_token = (config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2) as f64;

    // Each backend runs its steps in a phase of its own, with every SM.
    let phases = [&backend, &eager, &invariant].map(|b| b.new_phase().expect("phase"));
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
    let row = |what: &str, tokens: usize, seconds: f64, bytes: f64, flops: f64| {
        let floor = (bytes / bandwidth).max(flops / ANCHOR_FLOPS);
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

    // Prefill: one 8k-token prompt in one step (after a warm-up run of the same).
    let prompt: Vec<u32> = (0..prefill_tokens).map(token).collect();
    let mut times = Vec::new();
    for run in 0..4 {
        let seq = 1_000_000 + run as u64;
        let t = Instant::now();
        step_on((&backend, &phases[0]), &mut blocks, &[SeqChunk { seq, tokens: &prompt, wants_logits: true }]);
        times.push(t.elapsed().as_secs_f64());
        blocks.free(seq);
    }
    let prefill = median(&times[1..]);
    let causal_pairs = (prefill_tokens * (prefill_tokens + 1) / 2) as f64;
    row(
        "prefill 8k prompt",
        prefill_tokens,
        prefill,
        weight_bytes,
        linear_flops(prefill_tokens) + attention_flops(causal_pairs),
    );

    let modes = [("CUDA graphs", &backend), ("eager", &eager), ("batch invariant", &invariant)];
    for ((mode, backend), phase) in modes.into_iter().zip(&phases) {
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
        blocks.free(0);
        let bytes = weight_bytes + 150.0 * kv_bytes_per_token;
        let flops = linear_flops(1) + attention_flops(150.0);
        row(&format!("decode, batch 1, ~150 tokens of context, {mode}"), 1, median(&times), bytes, flops);

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
            let chunks: Vec<SeqChunk<'_>> = seqs
                .iter()
                .zip(&last)
                .map(|(&seq, t)| SeqChunk { seq, tokens: std::slice::from_ref(t), wants_logits: true })
                .collect();
            let t = Instant::now();
            let out = step_on(backend, &mut blocks, &chunks);
            if i >= 5 {
                times.push(t.elapsed().as_secs_f64());
            }
            last = out;
        }
        seqs.iter().for_each(|&seq| blocks.free(seq));
        let kv_read = decode_batch as f64 * (context + 15) as f64 * kv_bytes_per_token;
        let flops = linear_flops(decode_batch) + attention_flops((decode_batch * (context + 15)) as f64);
        let what = format!("decode, batch {decode_batch}, {context} tokens of context, {mode}");
        row(&what, decode_batch, median(&times), weight_bytes + kv_read, flops);
    }
    report.finish(&gpu, &format!("model_step-{name}"));
    eprintln!("device: {}", device_name(&gpu));
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
