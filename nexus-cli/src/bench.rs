//! `nexus bench`: replays a workload trace (Poisson arrivals at each `--rate`) through the engine
//! in-process and prints TTFT, TBT, normalized latency and throughput as a table, optionally as
//! JSON and, for a sweep over several rates, as an SVG plot of p95 latencies against the rate.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use nexus_runtime::backend::Backend;
use nexus_runtime::bench::{ReplayReport, replay};
use nexus_runtime::engine::Engine;
use nexus_runtime::model::LlamaModel;
use nexus_runtime::workload::{Summary, Workload, trace};
use nexus_runtime::{loader, synthetic};
use serde_json::json;

use crate::{EngineArgs, KvSizing, OnBackend, make_engine};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A GGUF file, a Hugging Face folder, or `synthetic:<name>` (random weights of a published
    /// config: llama-3.1-8b, qwen2.5-3b, qwen2.5-14b).
    #[arg(long, default_value = loader::DEFAULT_MODEL)]
    model: String,
    /// Request lengths: long-data, arxiv, sharegpt or mixed (the paper's distributions).
    #[arg(long, default_value = "sharegpt")]
    workload: Workload,
    /// Arrival rates to run, requests per second (comma-separated for a sweep).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    rate: Vec<f64>,
    /// Requests per run.
    #[arg(long, default_value_t = 100)]
    num_requests: usize,
    /// Seed of the trace and the prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    engine: EngineArgs,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write an SVG plot of p95 TTFT and TBT against the rate here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.rate.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("every --rate must be a positive number");
    }
    args.engine.run(BenchJob(&args))
}

struct BenchJob<'a>(&'a BenchArgs);

impl OnBackend for BenchJob<'_> {
    fn run<B: Backend + 'static>(self, backend: B, sizing: KvSizing) -> anyhow::Result<()>
    where
        Engine<B>: Send,
    {
        run_with(backend, self.0, sizing)
    }
}

fn run_with<B: Backend>(backend: B, args: &BenchArgs, sizing: KvSizing) -> anyhow::Result<()> {
    let model = match args.model.strip_prefix("synthetic:") {
        Some(name) => LlamaModel::random(&backend, &synthetic::config(name)?, 1)?,
        None => {
            let loaded = loader::open(std::path::Path::new(&args.model))
                .with_context(|| format!("cannot load the model at {}", args.model))?;
            LlamaModel::load(&backend, loaded.weights.as_ref(), |_, _| {})?
        }
    };
    // Outputs are forced to the trace's lengths, so end-of-sequence tokens do not matter.
    let mut engine = make_engine(backend, model, Vec::new(), sizing, args.engine.scheduler())?;
    let mut results = Vec::new();
    for &rate in &args.rate {
        let requests = trace(args.workload, rate, args.num_requests, args.seed)?;
        eprintln!("{} at {rate} req/s: {} requests", args.workload.name(), requests.len());
        let (_, report) = replay(&mut engine, &requests, args.seed)?;
        results.push((rate, report));
    }
    print!("{}", table(args, &results));
    if let Some(path) = &args.json {
        let runs: Vec<_> = results.iter().map(|(rate, r)| report_json(*rate, r)).collect();
        let doc = json!({ "model": args.model, "workload": args.workload.name(), "num_requests": args.num_requests, "runs": runs });
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, plot(args, &results)).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn ms(s: &Summary) -> String {
    format!("{:.1} / {:.1} / {:.1} / {:.1}", s.mean * 1e3, s.p50 * 1e3, s.p95 * 1e3, s.p99 * 1e3)
}

fn table(args: &BenchArgs, results: &[(f64, ReplayReport)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} on {}, {} requests per rate (latencies in ms: mean / p50 / p95 / p99)\n",
        args.workload.name(),
        args.model,
        args.num_requests
    );
    let _ = writeln!(out, "| rate (req/s) | TTFT | TBT | normalized latency | req/s | output tok/s | preemptions |");
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- |");
    for (rate, r) in results {
        let _ = writeln!(
            out,
            "| {rate} | {} | {} | {} | {:.2} | {:.0} | {} |",
            ms(&r.ttft),
            ms(&r.tbt),
            ms(&r.normalized_latency),
            r.request_throughput,
            r.token_throughput,
            r.preemptions
        );
    }
    out
}

fn summary_json(s: &Summary) -> serde_json::Value {
    json!({ "count": s.count, "mean": s.mean, "p50": s.p50, "p95": s.p95, "p99": s.p99 })
}

fn report_json(rate: f64, r: &ReplayReport) -> serde_json::Value {
    json!({
        "rate": rate,
        "ttft_s": summary_json(&r.ttft),
        "tbt_s": summary_json(&r.tbt),
        "normalized_latency_s": summary_json(&r.normalized_latency),
        "request_throughput": r.request_throughput,
        "token_throughput": r.token_throughput,
        "duration_s": r.duration_s,
        "preemptions": r.preemptions,
    })
}

/// A line chart of p95 TTFT and p95 TBT (ms, each on its own scale) against the arrival rate.
fn plot(args: &BenchArgs, results: &[(f64, ReplayReport)]) -> String {
    let (w, h, pad) = (640.0, 400.0, 50.0);
    let max_rate = results.iter().map(|r| r.0).fold(f64::MIN_POSITIVE, f64::max);
    let series = [
        ("p95 TTFT", "#d62728", results.iter().map(|(x, r)| (*x, r.ttft.p95 * 1e3)).collect::<Vec<_>>()),
        ("p95 TBT", "#1f77b4", results.iter().map(|(x, r)| (*x, r.tbt.p95 * 1e3)).collect::<Vec<_>>()),
    ];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\">{} on {}: p95 latency (ms, each line on its own scale) vs rate (req/s, max {max_rate})</text>\n\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        args.workload.name(),
        args.model,
        h - pad,
        w - pad,
        h - pad
    );
    for (i, (name, color, points)) in series.iter().enumerate() {
        let max_y = points.iter().map(|p| p.1).fold(f64::MIN_POSITIVE, f64::max);
        let coords: Vec<String> = points
            .iter()
            .map(|(x, y)| {
                format!("{:.1},{:.1}", pad + x / max_rate * (w - 2.0 * pad), h - pad - y / max_y * (h - 2.0 * pad))
            })
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            coords.join(" ")
        );
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" fill=\"{color}\">{name} (max {max_y:.1} ms)</text>",
            w - 220.0,
            40.0 + 16.0 * i as f64
        );
    }
    svg.push_str("</svg>\n");
    svg
}
