//! `nexus bench`: replays a workload trace (Poisson arrivals at each `--rate`) through the engine
//! in-process, or against any OpenAI-compatible server with `--url` ([`remote`]), and prints
//! TTFT, TBT, normalized latency, throughput and failed requests as a table (the same for both),
//! optionally as JSON and, for a sweep over several rates, as an SVG plot of p95 latencies against
//! the rate. A progress bar on stderr shows each run.
//!
//! Workloads are the paper's four (lengths drawn from its table, prompts of random token ids from
//! `--token-id-range`) or `jsonl:PATH`, a file of one request per line:
//! `{"prompt": "text", "output_len": N}` or `{"prompt_token_ids": [ids], "output_len": N}`. Text
//! prompts are tokenized by the model's tokenizer in-process and sent as text with `--url`. A
//! file's requests arrive as a Poisson process at `--rate` too, in file order; `--num-requests`
//! defaults to the file's length, and a shorter file is cycled, a longer one cut. Outputs are
//! always forced to the asked length (end-of-sequence ignored), so that runs compare.

mod remote;

use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nexus_runtime::backend::Backend;
use nexus_runtime::bench::{ReplayReport, Slo, replay_requests};
use nexus_runtime::engine::Engine;
use nexus_runtime::loader;
use nexus_runtime::workload::{
    BenchRequest, DatasetEntry, Summary, Workload, dataset_requests, parse_jsonl, synthetic_requests, trace,
};
use serde_json::json;

use crate::{EngineArgs, KvSizing, OnBackend, load_model, make_engine};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A GGUF file, a Hugging Face folder, or `synthetic:<name>` (random weights of a published
    /// config: llama-3.1-8b, qwen2.5-3b, qwen2.5-14b). In-process only.
    #[arg(long, default_value = loader::DEFAULT_MODEL, conflicts_with = "url")]
    model: String,
    /// Requests: long-data, arxiv, sharegpt or mixed (lengths of the paper's distributions,
    /// prompts of random token ids), or `jsonl:PATH`, one JSON object per line:
    /// {"prompt": "text", "output_len": N} or {"prompt_token_ids": [ids], "output_len": N}.
    #[arg(long, default_value = "sharegpt", value_parser = parse_workload)]
    workload: WorkloadArg,
    /// Arrival rates to run, requests per second (comma-separated for a sweep; `--sweep` is the
    /// same flag).
    #[arg(long, visible_alias = "sweep", value_delimiter = ',', default_value = "1")]
    rate: Vec<f64>,
    /// A p95 TTFT objective in milliseconds (with --slo-tbt-ms): the report then says which
    /// rates met it and the throughput, the highest rate up to which every run met it.
    #[arg(long, requires = "slo_tbt_ms")]
    slo_ttft_ms: Option<f64>,
    /// A p95 TBT objective in milliseconds (with --slo-ttft-ms).
    #[arg(long, requires = "slo_ttft_ms")]
    slo_tbt_ms: Option<f64>,
    /// Requests per run (default: 100, or every request of a JSONL file; a shorter file is
    /// cycled, a longer one cut).
    #[arg(long)]
    num_requests: Option<usize>,
    /// Seed of the trace and the prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Random prompts draw their token ids from this half-open range, START..END (the default
    /// fits the vocabulary of every model benchmarked, so that runs against different servers
    /// send the same ids).
    #[arg(long, default_value = "1000..30000", value_parser = parse_range)]
    token_id_range: Range<u32>,
    /// Replay against the OpenAI-compatible server (nexus serve, vLLM, SGLang) at this base URL,
    /// http://HOST:PORT, instead of in-process.
    #[arg(long)]
    url: Option<String>,
    /// With --url: the model to request (default: the first one of GET /v1/models).
    #[arg(long, requires = "url")]
    served_model_name: Option<String>,
    /// With --url: send `Authorization: Bearer <key>`.
    #[arg(long, requires = "url")]
    api_key: Option<String>,
    /// With --url: seconds a request may take, from sending to the end of its stream, before it
    /// counts as failed.
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    #[command(flatten)]
    engine: EngineArgs,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write an SVG plot of p95 TTFT and TBT against the rate here.
    #[arg(long)]
    plot: Option<PathBuf>,
}

/// The `--workload` argument.
#[derive(Clone, Debug)]
enum WorkloadArg {
    Paper(Workload),
    Jsonl(PathBuf),
}

fn parse_workload(s: &str) -> Result<WorkloadArg, String> {
    match s.strip_prefix("jsonl:") {
        Some("") => Err("jsonl: needs a path, as in jsonl:requests.jsonl".into()),
        Some(path) => Ok(WorkloadArg::Jsonl(path.into())),
        None => s.parse().map(WorkloadArg::Paper).map_err(|e| format!("{e}, or jsonl:PATH")),
    }
}

fn parse_range(s: &str) -> Result<Range<u32>, String> {
    let (start, end) = s.split_once("..").ok_or_else(|| format!("{s:?} is not a range START..END"))?;
    let bound = |b: &str| b.trim().parse::<u32>().map_err(|e| format!("{b:?} in {s:?}: {e}"));
    let range = bound(start)?..bound(end)?;
    if range.is_empty() {
        return Err(format!("the range {s} is empty"));
    }
    Ok(range)
}

/// Where the requests of a run come from.
enum Source {
    Paper(Workload),
    Dataset(Vec<DatasetEntry>),
}

/// A loaded `--workload` with the run's settings: makes each rate's requests.
struct Plan<'a> {
    args: &'a BenchArgs,
    source: Source,
    num_requests: usize,
}

impl<'a> Plan<'a> {
    fn new(args: &'a BenchArgs) -> anyhow::Result<Self> {
        let source = match &args.workload {
            WorkloadArg::Paper(w) => Source::Paper(*w),
            WorkloadArg::Jsonl(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                Source::Dataset(parse_jsonl(&text).with_context(|| format!("in {}", path.display()))?)
            }
        };
        let num_requests = match (&source, args.num_requests) {
            (_, Some(0)) => bail!("--num-requests must be at least 1"),
            (_, Some(n)) => n,
            (Source::Paper(_), None) => 100,
            (Source::Dataset(entries), None) => entries.len(),
        };
        Ok(Plan { args, source, num_requests })
    }

    fn name(&self) -> String {
        match &self.args.workload {
            WorkloadArg::Paper(w) => w.name().to_owned(),
            WorkloadArg::Jsonl(path) => format!("jsonl:{}", path.display()),
        }
    }

    fn requests(&self, rate: f64) -> anyhow::Result<Vec<BenchRequest>> {
        let (n, seed) = (self.num_requests, self.args.seed);
        Ok(match &self.source {
            Source::Paper(w) => synthetic_requests(&trace(*w, rate, n, seed)?, self.args.token_id_range.clone(), seed)?,
            Source::Dataset(entries) => dataset_requests(entries, rate, n, seed)?,
        })
    }

    /// The objective `--slo-ttft-ms` and `--slo-tbt-ms` give, in seconds.
    fn slo(&self) -> Option<Slo> {
        Some(Slo { ttft_p95: self.args.slo_ttft_ms? / 1e3, tbt_p95: self.args.slo_tbt_ms? / 1e3 })
    }

    /// Runs every rate with `replay`, a progress bar showing each, then prints and writes the
    /// report; `target` names what was benchmarked.
    fn run(
        &self,
        target: &str,
        mut replay: impl FnMut(&[BenchRequest], &ProgressBar) -> anyhow::Result<ReplayReport>,
    ) -> anyhow::Result<()> {
        let style = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} requests ({elapsed})")
            .context("progress bar style")?;
        let mut results = Vec::new();
        for &rate in &self.args.rate {
            let requests = self.requests(rate)?;
            let bar = ProgressBar::new(requests.len() as u64).with_style(style.clone());
            bar.set_message(format!("{} at {rate} req/s", self.name()));
            let report = replay(&requests, &bar);
            // Cleared before anything else prints, so that the bar never garbles the table.
            bar.finish_and_clear();
            results.push((rate, report.with_context(|| format!("the run at {rate} req/s"))?));
        }
        print!("{}", table(self, target, &results));
        let slo = self.slo();
        if let Some(slo) = slo {
            print!("{}", slo_lines(&slo, &results));
        }
        if let Some(path) = &self.args.json {
            let runs: Vec<_> = results.iter().map(|(rate, r)| report_json(*rate, r)).collect();
            let slo = slo.map(|slo| {
                let met: Vec<f64> = results.iter().filter(|(_, r)| slo.met_by(r)).map(|(rate, _)| *rate).collect();
                json!({
                    "ttft_p95_s": slo.ttft_p95,
                    "tbt_p95_s": slo.tbt_p95,
                    "rates_met": met,
                    "throughput": slo.throughput(&results),
                })
            });
            let doc = json!({
                "target": target,
                "url": self.args.url,
                "workload": self.name(),
                "num_requests": self.num_requests,
                "runs": runs,
                "slo": slo,
            });
            std::fs::write(path, serde_json::to_string_pretty(&doc)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &self.args.plot {
            std::fs::write(path, plot(self, target, &results))
                .with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.rate.iter().any(|r| !(r.is_finite() && *r > 0.0)) {
        bail!("every --rate must be a positive number");
    }
    for (flag, value) in [("--slo-ttft-ms", args.slo_ttft_ms), ("--slo-tbt-ms", args.slo_tbt_ms)] {
        if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            bail!("{flag} must be a positive number of milliseconds");
        }
    }
    let plan = Plan::new(&args)?;
    match &args.url {
        Some(url) => {
            let request_timeout =
                Duration::try_from_secs_f64(args.request_timeout).ok().filter(|t| !t.is_zero()).with_context(|| {
                    format!("--request-timeout {} must be a positive number of seconds", args.request_timeout)
                })?;
            let config = remote::RemoteConfig {
                url,
                served_model_name: args.served_model_name.as_deref(),
                api_key: args.api_key.as_deref(),
                request_timeout,
            };
            let server = remote::Remote::connect(&config)?;
            eprintln!("benchmarking {} at {url}", server.model());
            plan.run(&format!("{} at {url}", server.model()), |requests, bar| server.replay(requests, || bar.inc(1)))
        }
        None => args.engine.run(BenchJob(&plan)),
    }
}

struct BenchJob<'a>(&'a Plan<'a>);

impl OnBackend for BenchJob<'_> {
    fn run<B: Backend + 'static>(self, backend: B, sizing: KvSizing) -> anyhow::Result<()>
    where
        Engine<B>: Send,
    {
        run_in_process(backend, self.0, sizing)
    }
}

fn run_in_process<B: Backend>(backend: B, plan: &Plan<'_>, sizing: KvSizing) -> anyhow::Result<()> {
    let args = plan.args;
    let (model, tokenizer) = load_model(&backend, &args.model)?;
    let vocab = model.config().vocab_size;
    if matches!(plan.source, Source::Paper(_)) && args.token_id_range.end as usize > vocab {
        bail!("--token-id-range {:?} goes past the vocabulary of {} ({vocab} tokens)", args.token_id_range, args.model);
    }
    // Outputs are forced to the trace's lengths, so end-of-sequence tokens do not matter.
    let mut engine = make_engine(backend, model, Vec::new(), sizing, &args.engine)?;
    plan.run(&args.model, |requests, bar| {
        Ok(replay_requests(&mut engine, requests, tokenizer.as_ref(), || bar.inc(1))?.1)
    })
}

/// The lines under the table that judge a sweep against its objective.
fn slo_lines(slo: &Slo, results: &[(f64, ReplayReport)]) -> String {
    let met: Vec<String> = results.iter().filter(|(_, r)| slo.met_by(r)).map(|(rate, _)| rate.to_string()).collect();
    let throughput = slo.throughput(results).map_or_else(|| "none of the rates".into(), |r| format!("{r} req/s"));
    let met = if met.is_empty() { "at no rate".into() } else { format!("at {} req/s", met.join(", ")) };
    format!(
        "\nSLO p95 TTFT <= {:.0} ms and p95 TBT <= {:.0} ms: met {met}; throughput (the highest rate up to \
         which every run met it): {throughput}\n",
        slo.ttft_p95 * 1e3,
        slo.tbt_p95 * 1e3,
    )
}

/// Milliseconds, or "-" for a summary of nothing (every request failed).
fn ms(s: &Summary) -> String {
    if s.count == 0 {
        return "-".into();
    }
    format!("{:.1} / {:.1} / {:.1} / {:.1}", s.mean * 1e3, s.p50 * 1e3, s.p95 * 1e3, s.p99 * 1e3)
}

/// The first few of a list, for a line of the report.
fn first_few<T>(items: &[T], describe: impl Fn(&T) -> String) -> String {
    let mut shown: Vec<String> = items.iter().take(3).map(describe).collect();
    if items.len() > 3 {
        shown.push("...".into());
    }
    shown.join("; ")
}

fn table(plan: &Plan<'_>, target: &str, results: &[(f64, ReplayReport)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{} on {target}, {} requests per rate (latencies in ms: mean / p50 / p95 / p99, over the completed requests)\n",
        plan.name(),
        plan.num_requests
    );
    let _ = writeln!(
        out,
        "| rate (req/s) | TTFT | TBT | normalized latency | req/s | output tok/s | preemptions | failed |"
    );
    let _ = writeln!(out, "| --- | --- | --- | --- | --- | --- | --- | --- |");
    for (rate, r) in results {
        let _ = writeln!(
            out,
            "| {rate} | {} | {} | {} | {:.2} | {:.0} | {} | {} |",
            ms(&r.ttft),
            ms(&r.tbt),
            ms(&r.normalized_latency),
            r.request_throughput,
            r.token_throughput,
            r.preemptions.map_or_else(|| "-".into(), |p| p.to_string()),
            r.failures.len()
        );
    }
    for (rate, r) in results {
        if !r.failures.is_empty() {
            let _ = writeln!(
                out,
                "\nat {rate} req/s, {} of {} requests failed: {}",
                r.failures.len(),
                r.failures.len() + r.completed,
                first_few(&r.failures, |f| format!("request {}: {}", f.request, f.message))
            );
        }
        if !r.length_mismatches.is_empty() {
            let _ = writeln!(
                out,
                "\nat {rate} req/s, {} requests did not generate the forced length: {}",
                r.length_mismatches.len(),
                first_few(&r.length_mismatches, |m| format!(
                    "request {} asked for {} tokens, got {}",
                    m.request, m.requested, m.got
                ))
            );
        }
    }
    out
}

/// A summary as JSON; a summary of nothing has null figures.
fn summary_json(s: &Summary) -> serde_json::Value {
    let finite = |v: f64| v.is_finite().then_some(v);
    json!({ "count": s.count, "mean": finite(s.mean), "p50": finite(s.p50), "p95": finite(s.p95), "p99": finite(s.p99) })
}

fn report_json(rate: f64, r: &ReplayReport) -> serde_json::Value {
    let failures: Vec<_> = r.failures.iter().map(|f| json!({ "request": f.request, "error": f.message })).collect();
    let mismatches: Vec<_> = r
        .length_mismatches
        .iter()
        .map(|m| json!({ "request": m.request, "requested": m.requested, "got": m.got }))
        .collect();
    json!({
        "rate": rate,
        "completed": r.completed,
        "failed": r.failures.len(),
        "ttft_s": summary_json(&r.ttft),
        "tbt_s": summary_json(&r.tbt),
        "normalized_latency_s": summary_json(&r.normalized_latency),
        "request_throughput": r.request_throughput,
        "token_throughput": r.token_throughput,
        "duration_s": r.duration_s,
        "preemptions": r.preemptions,
        "failures": failures,
        "length_mismatches": mismatches,
    })
}

/// A line chart of p95 TTFT and p95 TBT (ms, each on its own scale) against the arrival rate.
fn plot(plan: &Plan<'_>, target: &str, results: &[(f64, ReplayReport)]) -> String {
    let (w, h, pad) = (640.0, 400.0, 50.0);
    let max_rate = results.iter().map(|r| r.0).fold(f64::MIN_POSITIVE, f64::max);
    let series = [
        ("p95 TTFT", "#d62728", results.iter().map(|(x, r)| (*x, r.ttft.p95 * 1e3)).collect::<Vec<_>>()),
        ("p95 TBT", "#1f77b4", results.iter().map(|(x, r)| (*x, r.tbt.p95 * 1e3)).collect::<Vec<_>>()),
    ]
    // A rate whose requests all failed has no latency to draw.
    .map(|(name, color, points)| (name, color, points.into_iter().filter(|p| p.1.is_finite()).collect::<Vec<_>>()));
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{pad}\" y=\"20\">{} on {}: p95 latency (ms, each line on its own scale) vs rate (req/s, max {max_rate})</text>\n\
         <line x1=\"{pad}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        plan.name(),
        target,
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
