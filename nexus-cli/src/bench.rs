//! `nexus bench`: replays a workload trace (Poisson arrivals at each `--rate`) through the engine
//! in-process, or against any OpenAI-compatible server with `--url` ([`remote`]), and prints
//! TTFT, TBT, normalized latency, throughput and failed requests as a table (the same for both),
//! optionally as JSON and as an SVG plot ([`plot`]). A progress bar on stderr shows each run.
//!
//! In-process, every schedule that `--schedule` and `--prefill-sms` name runs the same trace of
//! each rate on one engine (the model loaded once, the schedule switched between them), so that
//! `chunked` and `nexus` splits compare side by side. Each in-process run also records the
//! engine's timeline, every iteration of every lane with its budget and host time: the report
//! summarizes it per lane under the table, the JSON holds it whole, and the plot draws one run's
//! SMs per lane against time for each schedule.
//!
//! Workloads are the paper's four (lengths drawn from its table, prompts of random token ids from
//! `--token-id-range`) or `jsonl:PATH`, a file of one request per line:
//! `{"prompt": "text", "output_len": N}` or `{"prompt_token_ids": [ids], "output_len": N}`. Text
//! prompts are tokenized by the model's tokenizer in-process and sent as text with `--url`. A
//! file's requests arrive as a Poisson process at `--rate` too, in file order; `--num-requests`
//! defaults to the file's length, and a shorter file is cycled, a longer one cut. Outputs are
//! always forced to the asked length (end-of-sequence ignored), so that runs compare.

mod plot;
mod remote;

use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nexus_runtime::bench::workload::{
    BenchRequest, DatasetEntry, Summary, Workload, dataset_requests, parse_jsonl, synthetic_requests, trace,
};
use nexus_runtime::bench::{ReplayReport, Slo, TimelineIteration, TimelineSummary, replay_requests};
use nexus_runtime::engine::{Engine, Schedule};
use nexus_runtime::model::backend::{Backend, StepKind};
use nexus_runtime::weights::loader;
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
    /// Also write an SVG plot here: p95 TTFT and p95 TBT against the rate, a line per schedule,
    /// and in-process, for each schedule, its lanes' SMs against time during one run.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The rate (one of --rate) whose runs the plot's timelines show (default: the highest).
    #[arg(long, requires = "plot", conflicts_with = "url")]
    plot_timeline_rate: Option<f64>,
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

/// What a group of runs ran on: one schedule in-process, or whatever the server runs.
#[derive(Clone, Debug)]
struct Arm {
    /// `chunked`, or `nexus P/D` (prefill/decode SMs while both have work); `None` for a server.
    name: Option<String>,
    /// The SMs of the prefill lane, for `nexus` schedules.
    prefill_sms: Option<u32>,
}

impl Arm {
    /// What `--url` benchmarks: the server's own scheduling.
    const SERVER: Arm = Arm { name: None, prefill_sms: None };

    fn new(schedule: Schedule, sm_count: u32) -> Arm {
        match schedule {
            Schedule::Chunked => Arm { name: Some("chunked".into()), prefill_sms: None },
            Schedule::Nexus(split) => Arm {
                name: Some(format!("nexus {}/{}", split.prefill_sms, sm_count.saturating_sub(split.prefill_sms))),
                prefill_sms: Some(split.prefill_sms),
            },
        }
    }

    /// How a line of the report names a run of this arm at `rate`.
    fn run_label(&self, rate: f64) -> String {
        match &self.name {
            Some(name) => format!("{name} at {rate} req/s"),
            None => format!("at {rate} req/s"),
        }
    }
}

/// The runs of one arm, one per rate.
struct ArmRuns {
    arm: Arm,
    runs: Vec<(f64, ReplayReport)>,
}

/// Everything a bench invocation measured.
struct Results<'a> {
    plan: &'a Plan<'a>,
    /// What was benchmarked: the model, or the server's model and URL.
    target: &'a str,
    /// The device's SMs, in-process.
    sm_count: Option<u32>,
    arms: Vec<ArmRuns>,
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

    /// The rate whose runs the plot's timelines show.
    fn timeline_rate(&self) -> f64 {
        self.args.plot_timeline_rate.unwrap_or_else(|| self.args.rate.iter().copied().fold(f64::MIN, f64::max))
    }

    /// Runs every rate on every arm (arm by arm, so that the engine switches schedules once per
    /// arm) with `replay`, which gets the arm's index; a progress bar shows each run. Then prints
    /// and writes the report; `target` names what was benchmarked, on `sm_count` SMs in-process.
    fn run(
        &self,
        target: &str,
        arms: &[Arm],
        sm_count: Option<u32>,
        mut replay: impl FnMut(usize, &[BenchRequest], &ProgressBar) -> anyhow::Result<ReplayReport>,
    ) -> anyhow::Result<()> {
        let style = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} requests ({elapsed})")
            .context("progress bar style")?;
        // Every arm replays the very same requests at each rate.
        let traces: Vec<(f64, Vec<BenchRequest>)> =
            self.args.rate.iter().map(|&rate| Ok((rate, self.requests(rate)?))).collect::<anyhow::Result<_>>()?;
        let mut results = Results { plan: self, target, sm_count, arms: Vec::new() };
        for (index, arm) in arms.iter().enumerate() {
            let mut runs = Vec::new();
            for (rate, requests) in &traces {
                let bar = ProgressBar::new(requests.len() as u64).with_style(style.clone());
                bar.set_message(format!("{} {}", self.name(), arm.run_label(*rate)));
                let report = replay(index, requests, &bar);
                // Cleared before anything else prints, so that the bar never garbles the table.
                bar.finish_and_clear();
                runs.push((*rate, report.with_context(|| format!("the run {}", arm.run_label(*rate)))?));
            }
            results.arms.push(ArmRuns { arm: arm.clone(), runs });
        }
        print!("{}", results.table());
        print!("{}", results.lane_table());
        let slo = self.slo();
        if let Some(slo) = &slo {
            print!("{}", results.slo_lines(slo));
        }
        if let Some(path) = &self.args.json {
            std::fs::write(path, serde_json::to_string_pretty(&results.json(slo.as_ref())?)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &self.args.plot {
            std::fs::write(path, plot::svg(&results)).with_context(|| format!("writing {}", path.display()))?;
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
    if let Some(rate) = args.plot_timeline_rate.filter(|r| !args.rate.contains(r)) {
        bail!("--plot-timeline-rate {rate} is not one of the rates run (--rate {:?})", args.rate);
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
            let target = format!("{} at {url}", server.model());
            plan.run(&target, &[Arm::SERVER], None, |_, requests, bar| server.replay(requests, || bar.inc(1)))
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
    let sm_count = backend.sm_count();
    // Checked before the model loads, so that a bad --prefill-sms fails at once.
    let schedules = args.engine.schedules(sm_count)?;
    let first = *schedules.first().context("--schedule names no schedule")?;
    let (model, tokenizer) = load_model(&backend, &args.model)?;
    let vocab = model.config().vocab_size;
    if matches!(plan.source, Source::Paper(_)) && args.token_id_range.end as usize > vocab {
        bail!("--token-id-range {:?} goes past the vocabulary of {} ({vocab} tokens)", args.token_id_range, args.model);
    }
    // Outputs are forced to the trace's lengths, so end-of-sequence tokens do not matter.
    let mut engine = make_engine(backend, model, Vec::new(), sizing, &args.engine, first)?;
    let arms: Vec<Arm> = schedules.iter().map(|&s| Arm::new(s, sm_count)).collect();
    let mut current = 0;
    plan.run(&args.model, &arms, Some(sm_count), |arm, requests, bar| {
        if arm != current {
            engine.set_schedule(schedules[arm])?;
            current = arm;
        }
        Ok(replay_requests(&mut engine, requests, tokenizer.as_ref(), || bar.inc(1))?.1)
    })
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

/// A markdown table row of `cells`.
fn row(cells: &[String]) -> String {
    format!("| {} |\n", cells.join(" | "))
}

/// A markdown table's header and separator rows.
fn header(columns: &[&str]) -> String {
    format!("| {} |\n|{}\n", columns.join(" | "), " --- |".repeat(columns.len()))
}

fn step_kind(kind: StepKind) -> &'static str {
    match kind {
        StepKind::Decode => "decode",
        StepKind::Prefill => "prefill",
    }
}

/// A summary as JSON; a summary of nothing has null figures.
fn summary_json(s: &Summary) -> serde_json::Value {
    let finite = |v: f64| v.is_finite().then_some(v);
    json!({ "count": s.count, "mean": finite(s.mean), "p50": finite(s.p50), "p95": finite(s.p95), "p99": finite(s.p99) })
}

fn timeline_json(timeline: &[TimelineIteration]) -> serde_json::Value {
    timeline
        .iter()
        .map(|it| {
            json!({
                "lane": it.lane.name(),
                "kind": step_kind(it.kind),
                "start_s": it.start_s,
                "end_s": it.end_s,
                "budget": it.budget,
                "seqs": it.seqs,
                "tokens": it.tokens,
                "host_s": it.host_s,
            })
        })
        .collect()
}

fn timeline_summary_json(s: &TimelineSummary) -> serde_json::Value {
    let lanes: Vec<_> = s
        .lanes
        .iter()
        .map(|l| {
            json!({
                "lane": l.lane.name(),
                "iterations": l.iterations,
                "iteration_s": summary_json(&l.time),
                "host_mean_s": l.host_mean_s,
                "host_fraction": l.host_fraction,
                "mean_budget": l.mean_budget,
            })
        })
        .collect();
    let fraction = s.overlap_fraction();
    json!({
        "lanes": lanes,
        "busy_s": s.busy_s,
        "overlap_s": s.overlap_s,
        "overlap_fraction": fraction.is_finite().then_some(fraction),
    })
}

fn report_json(arm: &Arm, rate: f64, r: &ReplayReport) -> anyhow::Result<serde_json::Value> {
    let failures: Vec<_> = r.failures.iter().map(|f| json!({ "request": f.request, "error": f.message })).collect();
    let mismatches: Vec<_> = r
        .length_mismatches
        .iter()
        .map(|m| json!({ "request": m.request, "requested": m.requested, "got": m.got }))
        .collect();
    let summary = r.timeline.as_deref().map(TimelineSummary::of).transpose()?;
    Ok(json!({
        "schedule": arm.name,
        "prefill_sms": arm.prefill_sms,
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
        "timeline_summary": summary.as_ref().map(timeline_summary_json),
        "timeline": r.timeline.as_deref().map(timeline_json),
    }))
}

impl Results<'_> {
    /// Whether the runs are of named schedules (in-process), which then get a column.
    fn named(&self) -> bool {
        self.arms.iter().any(|a| a.arm.name.is_some())
    }

    /// Every run, arm by arm.
    fn runs(&self) -> impl Iterator<Item = (&Arm, f64, &ReplayReport)> {
        self.arms.iter().flat_map(|a| a.runs.iter().map(move |(rate, r)| (&a.arm, *rate, r)))
    }

    /// The first cells of a run's row: its schedule when they are named, and its rate.
    fn key_cells(&self, arm: &Arm, rate: f64) -> Vec<String> {
        let mut cells: Vec<String> = arm.name.iter().filter(|_| self.named()).cloned().collect();
        cells.push(rate.to_string());
        cells
    }

    fn key_columns(&self) -> Vec<&'static str> {
        if self.named() { vec!["schedule", "rate (req/s)"] } else { vec!["rate (req/s)"] }
    }

    fn table(&self) -> String {
        let plan = self.plan;
        let mut out = format!(
            "\n{} on {}, {} requests per rate (latencies in ms: mean / p50 / p95 / p99, over the completed \
             requests)\n\n",
            plan.name(),
            self.target,
            plan.num_requests
        );
        let mut columns = self.key_columns();
        columns.extend(["TTFT", "TBT", "normalized latency", "req/s", "output tok/s", "preemptions", "failed"]);
        out.push_str(&header(&columns));
        for (arm, rate, r) in self.runs() {
            let mut cells = self.key_cells(arm, rate);
            cells.extend([
                ms(&r.ttft),
                ms(&r.tbt),
                ms(&r.normalized_latency),
                format!("{:.2}", r.request_throughput),
                format!("{:.0}", r.token_throughput),
                r.preemptions.map_or_else(|| "-".into(), |p| p.to_string()),
                r.failures.len().to_string(),
            ]);
            out.push_str(&row(&cells));
        }
        for (arm, rate, r) in self.runs() {
            if !r.failures.is_empty() {
                let _ = writeln!(
                    out,
                    "\n{}, {} of {} requests failed: {}",
                    arm.run_label(rate),
                    r.failures.len(),
                    r.failures.len() + r.completed,
                    first_few(&r.failures, |f| format!("request {}: {}", f.request, f.message))
                );
            }
            if !r.length_mismatches.is_empty() {
                let _ = writeln!(
                    out,
                    "\n{}, {} requests did not generate the forced length: {}",
                    arm.run_label(rate),
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

    /// The lanes of each in-process run, from its timeline: empty against a server.
    fn lane_table(&self) -> String {
        let mut rows = String::new();
        for (arm, rate, r) in self.runs() {
            let Some(summary) = r.timeline.as_deref().and_then(|t| TimelineSummary::of(t).ok()) else { continue };
            let overlap = summary.overlap_fraction();
            for lane in &summary.lanes {
                let mut cells = self.key_cells(arm, rate);
                cells.extend([
                    lane.lane.name().to_owned(),
                    lane.iterations.to_string(),
                    ms(&lane.time),
                    format!("{:.3}", lane.host_mean_s * 1e3),
                    format!("{:.1}%", lane.host_fraction * 1e2),
                    format!("{:.0}", lane.mean_budget),
                    if overlap.is_finite() { format!("{:.0}%", overlap * 1e2) } else { "-".into() },
                ]);
                rows.push_str(&row(&cells));
            }
        }
        if rows.is_empty() {
            return rows;
        }
        let mut columns = self.key_columns();
        columns.extend([
            "lane",
            "iterations",
            "iteration (ms)",
            "host per iteration (ms)",
            "host / iteration time",
            "mean budget (SMs)",
            "both lanes in flight",
        ]);
        format!(
            "\nLanes: iteration time from launch to seen done (ms: mean / p50 / p95 / p99); host = the engine \
             thread's CPU time on an iteration (planning, building, launching, reading back, sampling); both lanes \
             in flight = share of the time any lane ran during which two did{}\n\n{}{rows}",
            self.sm_count.map_or_else(String::new, |n| format!("; budgets out of {n} SMs")),
            header(&columns)
        )
    }

    /// The lines under the table that judge each arm's sweep against the objective.
    fn slo_lines(&self, slo: &Slo) -> String {
        let mut out = format!(
            "\nSLO p95 TTFT <= {:.0} ms and p95 TBT <= {:.0} ms (throughput: the highest rate up to which every \
             run met it)\n",
            slo.ttft_p95 * 1e3,
            slo.tbt_p95 * 1e3,
        );
        for arms in &self.arms {
            let met: Vec<String> =
                arms.runs.iter().filter(|(_, r)| slo.met_by(r)).map(|(rate, _)| rate.to_string()).collect();
            let met = if met.is_empty() { "at no rate".into() } else { format!("at {} req/s", met.join(", ")) };
            let throughput = slo
                .throughput(&arms.runs)
                .map_or_else(|| "none (the lowest rate missed it)".into(), |r| format!("{r} req/s"));
            let name = arms.arm.name.as_ref().map_or_else(String::new, |n| format!("{n}: "));
            let _ = writeln!(out, "{name}met {met}; throughput {throughput}");
        }
        out
    }

    fn json(&self, slo: Option<&Slo>) -> anyhow::Result<serde_json::Value> {
        let runs: Vec<_> =
            self.runs().map(|(arm, rate, r)| report_json(arm, rate, r)).collect::<anyhow::Result<_>>()?;
        let slo = slo.map(|slo| {
            let arms: Vec<_> = self
                .arms
                .iter()
                .map(|a| {
                    let met: Vec<f64> = a.runs.iter().filter(|(_, r)| slo.met_by(r)).map(|(rate, _)| *rate).collect();
                    json!({ "schedule": a.arm.name, "rates_met": met, "throughput": slo.throughput(&a.runs) })
                })
                .collect();
            json!({ "ttft_p95_s": slo.ttft_p95, "tbt_p95_s": slo.tbt_p95, "schedules": arms })
        });
        let schedules: Vec<_> = self.arms.iter().filter_map(|a| a.arm.name.clone()).collect();
        Ok(json!({
            "target": self.target,
            "url": self.plan.args.url,
            "workload": self.plan.name(),
            "num_requests": self.plan.num_requests,
            "sm_count": self.sm_count,
            "schedules": schedules,
            "runs": runs,
            "slo": slo,
        }))
    }
}
