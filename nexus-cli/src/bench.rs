//! `nexus bench`: replays a workload trace through the engine in-process, or against any
//! OpenAI-compatible server with `--url` ([`remote`]), at each `--rate`, and prints the paper's
//! metrics (TTFT, TBT, normalized latency, throughput, failed requests) and vLLM's `bench serve`
//! metrics (TTFT, TPOT, ITL, E2EL at the percentiles asked, request goodput, input, output and
//! total token throughput) as tables (the same in-process and with `--url`), optionally as JSON
//! (`--json`, ours; `--save-result`, vLLM's field names) and as an SVG plot ([`plot`]). A progress
//! bar on stderr shows each run.
//!
//! Load shapes are vLLM's: arrivals with gamma-distributed gaps of mean 1/rate and shape
//! `--burstiness` (1, the default, is a Poisson process), every request at once at `--rate inf`,
//! and `--max-concurrency N`, a cap on the requests in flight (a request held back by it is sent
//! when one ends, and its times count from then, as in vLLM).
//!
//! In-process, every schedule that `--schedule` and `--prefill-sms` name runs the same trace of
//! each rate on one engine (the model loaded once, the schedule switched between them), so that
//! `chunked` and `nexus` splits compare side by side. Each in-process run also records the
//! engine's timeline, every iteration of every lane with its budget and host time: the report
//! summarizes it per lane under the table, the JSON holds it whole, and the plot draws one run's
//! SMs per lane against time for each schedule.
//!
//! Workloads are the paper's four (lengths drawn from its table, prompts of random token ids from
//! `--token-id-range`), vLLM's `random` dataset (lengths uniform around `--random-input-len` and
//! `--random-output-len`, the same prompts), or `jsonl:PATH`, a file of one request per line:
//! `{"prompt": "text", "output_len": N}` or `{"prompt_token_ids": [ids], "output_len": N}`. Text
//! prompts are tokenized by the model's tokenizer in-process and sent as text with `--url`. A
//! file's requests arrive in file order; `--num-requests` defaults to the file's length, and a
//! shorter file is cycled, a longer one cut. Outputs are always forced to the asked length
//! (end-of-sequence ignored), so that runs compare.

mod plot;
mod remote;

use std::fmt::Write as _;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nexus_runtime::bench::metrics::{Goodput, Metric, MetricStats};
use nexus_runtime::bench::workload::{
    Arrivals, BenchRequest, DatasetEntry, RandomLengths, Summary, Workload, dataset_requests, parse_jsonl,
    random_trace, synthetic_requests, trace,
};
use nexus_runtime::bench::{ReplayReport, Slo, TimelineIteration, TimelineSummary, replay_requests};
use nexus_runtime::engine::scheduler::{PrefillPacking, PrefillTokens, SchedulerConfig};
use nexus_runtime::engine::{Engine, Schedule};
use nexus_runtime::model::backend::{Backend, StepKind};
use nexus_runtime::weights::loader;
use serde_json::json;

use crate::{EngineArgs, HubArgs, KvSizing, OnBackend, load_model, make_engine};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// A GGUF file, a Hugging Face folder, a repo in the local Hugging Face cache (org/name; see
    /// --revision), or `synthetic:<name>` (random weights of a published config: llama-3.1-8b,
    /// qwen2.5-3b, qwen2.5-14b). In-process only.
    #[arg(long, default_value = loader::DEFAULT_MODEL, conflicts_with = "url")]
    model: String,
    // In-process only too: `--url` conflicts with this group.
    #[command(flatten)]
    hub: HubArgs,
    /// Requests: long-data, arxiv, sharegpt or mixed (lengths of the paper's distributions,
    /// prompts of random token ids), random (vLLM's random dataset: see --random-input-len), or
    /// `jsonl:PATH`, one JSON object per line: {"prompt": "text", "output_len": N} or
    /// {"prompt_token_ids": [ids], "output_len": N}. `--dataset-name` is the same flag.
    #[arg(long, visible_alias = "dataset-name", default_value = "sharegpt", value_parser = parse_workload)]
    workload: WorkloadArg,
    /// Arrival rates to run, requests per second, or `inf` for every request at once
    /// (comma-separated for a sweep; `--sweep` and vLLM's `--request-rate` are the same flag).
    #[arg(long, visible_aliases = ["sweep", "request-rate"], value_delimiter = ',', default_value = "1")]
    rate: Vec<f64>,
    #[command(flatten)]
    vllm: Box<VllmArgs>,
    /// A p95 TTFT objective in milliseconds (with --slo-tbt-ms): the report then says which
    /// rates met it and the throughput, the highest rate up to which every run met it (ours; see
    /// --goodput for vLLM's per-request objectives).
    #[arg(long, requires = "slo_tbt_ms")]
    slo_ttft_ms: Option<f64>,
    /// A p95 TBT objective in milliseconds (with --slo-ttft-ms).
    #[arg(long, requires = "slo_ttft_ms")]
    slo_tbt_ms: Option<f64>,
    /// An objective relative to this run, instead of --slo-ttft-ms and --slo-tbt-ms: p95 TTFT and
    /// p95 TBT each at most this many times what the first schedule of --schedule reaches at the
    /// lowest rate (the Nexus paper's way: 5 against the baseline at light load).
    #[arg(long, conflicts_with_all = ["slo_ttft_ms", "slo_tbt_ms"])]
    slo_scale: Option<f64>,
    /// Requests per run (default: 100, or every request of a JSONL file; a shorter file is
    /// cycled, a longer one cut). `--num-prompts` is the same flag.
    #[arg(long, visible_alias = "num-prompts")]
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
    #[arg(long, conflicts_with = "HubArgs")]
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
    // Boxed, as `VllmArgs` is.
    #[command(flatten)]
    engine: Box<EngineArgs>,
    /// Also write the results as JSON here (ours: every run, its timeline, the objective).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the results here as vLLM's `bench serve --save-result` does, one JSON object
    /// per run and line (a single run makes a plain JSON file; a sweep, what vLLM's
    /// --append-result makes): vLLM's field names, its per-request arrays, and ours under "nexus".
    #[arg(long, value_name = "PATH")]
    save_result: Option<PathBuf>,
    /// Also write an SVG plot here: p95 TTFT and p95 TBT against the rate, a line per schedule;
    /// per schedule, the TTFT and ITL distributions (CDFs), a line per rate; and in-process, for
    /// each schedule, its lanes' SMs against time during one run.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// The rate (one of --rate) whose runs the plot's timelines show (default: the highest).
    #[arg(long, requires = "plot", conflicts_with = "url")]
    plot_timeline_rate: Option<f64>,
}

/// The flags of vLLM's `bench serve` that ours lacked: load shapes, the random dataset, and its
/// metrics (boxed in [`BenchArgs`], so that the `bench` variant of the command stays near the
/// others in size).
#[derive(Args, Debug)]
struct VllmArgs {
    /// Gaps between arrivals follow a gamma distribution of this shape and mean 1/rate, as
    /// vLLM's: 1 is a Poisson process, lower is burstier, higher steadier (the gaps' coefficient
    /// of variation is 1/sqrt(B); inf spaces them evenly).
    #[arg(long, value_name = "B", default_value_t = 1.0)]
    burstiness: f64,
    /// At most N requests in flight, as vLLM's: a request that arrives with N in flight is sent
    /// when one ends, and its times count from then. With `--rate inf`, a closed loop of N
    /// clients.
    #[arg(long, value_name = "N")]
    max_concurrency: Option<usize>,
    /// With --workload random: prompt lengths in tokens are drawn uniformly from
    /// [LEN · (1 − R), LEN · (1 + R)], R the --random-range-ratio, as vLLM's (default 1024).
    #[arg(long, value_name = "LEN")]
    random_input_len: Option<usize>,
    /// With --workload random: output lengths likewise (default 128).
    #[arg(long, value_name = "LEN")]
    random_output_len: Option<usize>,
    /// With --workload random: R, in [0, 1) (default 0: every request of exactly those lengths).
    #[arg(long, value_name = "R")]
    random_range_ratio: Option<f64>,
    /// The metrics of vLLM's table and of --save-result, comma-separated: ttft (sending to the
    /// first token, as ours), tpot (per request, (E2EL − TTFT) / (output tokens − 1)), itl (every
    /// gap between tokens: our TBT) and e2el (sending to the end of the response; our normalized
    /// latency is E2EL / output tokens).
    #[arg(long, value_name = "METRICS", value_delimiter = ',', default_value = "ttft,tpot,itl", value_parser = parse_metric)]
    percentile_metrics: Vec<Metric>,
    /// The percentiles of those metrics, comma-separated, in [0, 100] (vLLM's table also has the
    /// mean and median; ours always has p50, p95 and p99).
    #[arg(long, value_name = "PERCENTILES", value_delimiter = ',', default_value = "99", value_parser = parse_percentile)]
    metric_percentiles: Vec<f64>,
    /// vLLM's request goodput (DistServe's): the completed requests per second that met every
    /// per-request objective given, as METRIC:MS pairs separated by spaces, of ttft, tpot
    /// (a single-token output counts 0) and e2el, e.g. `--goodput ttft:500 tpot:50`.
    #[arg(long, num_args = 1.., value_name = "METRIC:MS", value_parser = parse_objective)]
    goodput: Vec<(Metric, f64)>,
}

/// The `--workload` argument.
#[derive(Clone, Debug)]
enum WorkloadArg {
    Paper(Workload),
    Random,
    Jsonl(PathBuf),
}

fn parse_workload(s: &str) -> Result<WorkloadArg, String> {
    match s.strip_prefix("jsonl:") {
        Some("") => Err("jsonl: needs a path, as in jsonl:requests.jsonl".into()),
        Some(path) => Ok(WorkloadArg::Jsonl(path.into())),
        None if s.eq_ignore_ascii_case("random") => Ok(WorkloadArg::Random),
        None => s.parse().map(WorkloadArg::Paper).map_err(|e| format!("{e}, random, or jsonl:PATH")),
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

fn parse_metric(s: &str) -> Result<Metric, String> {
    s.parse().map_err(|e: nexus_runtime::Error| e.to_string())
}

fn parse_percentile(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(p) if (0.0..=100.0).contains(&p) => Ok(p),
        _ => Err(format!("{s:?} is not a percentile in [0, 100]")),
    }
}

/// A `--goodput` pair, METRIC:MS, checked as [`Goodput::set`] checks it; the objective in
/// milliseconds.
fn parse_objective(s: &str) -> Result<(Metric, f64), String> {
    let (metric, ms) = s.split_once(':').ok_or_else(|| format!("{s:?} is not METRIC:MS, as in ttft:500"))?;
    let metric = parse_metric(metric)?;
    let ms = ms.trim().parse::<f64>().map_err(|e| format!("{ms:?} in {s:?}: {e}"))?;
    Goodput::default().set(metric, ms / 1e3).map_err(|e| e.to_string())?;
    Ok((metric, ms))
}

/// Where the requests of a run come from.
enum Source {
    Paper(Workload),
    Random(RandomLengths),
    Dataset { path: PathBuf, entries: Vec<DatasetEntry> },
}

/// A loaded `--workload` with the run's settings: makes each rate's requests.
struct Plan<'a> {
    args: &'a BenchArgs,
    source: Source,
    num_requests: usize,
    /// The `--goodput` objectives, in seconds.
    goodput: Goodput,
}

/// What a group of runs ran on: one schedule in-process, or whatever the server runs.
#[derive(Clone, Debug)]
struct Arm {
    /// `chunked`, `nexus P/D` (prefill/decode SMs while both have work), or `nexus controlled`
    /// (with its decode target, if any); `None` for a server.
    name: Option<String>,
    /// The SMs of the prefill lane, for `nexus` schedules.
    prefill_sms: Option<u32>,
}

impl Arm {
    /// What `--url` benchmarks: the server's own scheduling.
    const SERVER: Arm = Arm { name: None, prefill_sms: None };

    /// The arm of `schedule` on `sm_count` SMs, with iterations of at most `scheduler`'s tokens
    /// (named for chunked where it is not the default, so that runs of chunked tuned for TBT and
    /// at the default can be told apart once their results are put together).
    fn new(schedule: &Schedule, sm_count: u32, scheduler: SchedulerConfig) -> Arm {
        match schedule {
            Schedule::Chunked => {
                let tokens = scheduler.max_num_batched_tokens;
                let name = if tokens == SchedulerConfig::default().max_num_batched_tokens {
                    "chunked".into()
                } else {
                    format!("chunked, {tokens} tokens")
                };
                Arm { name: Some(name), prefill_sms: None }
            }
            Schedule::Nexus(split) => Arm {
                name: Some(format!(
                    "nexus {}/{}{}{}",
                    split.prefill_sms,
                    sm_count.saturating_sub(split.prefill_sms),
                    prefill_limit(split.prefill_tokens),
                    packing(split.prefill_packing)
                )),
                prefill_sms: Some(split.prefill_sms),
            },
            Schedule::NexusControlled(control) => {
                let ms = |s: f64| (s * 1e6).round() / 1e3;
                let target = match (control.controller.decode_target_s, control.controller.backlog_target) {
                    (Some(target), Some(backlog)) => format!(
                        ", {} ms target ({} ms with {} prompt tokens waiting)",
                        ms(target),
                        ms(backlog.decode_s),
                        backlog.tokens
                    ),
                    (Some(target), None) => format!(", {} ms target", ms(target)),
                    (None, _) => String::new(),
                };
                let (limit, packing) = (prefill_limit(control.prefill_tokens), packing(control.prefill_packing));
                let name = format!("nexus controlled{target}{limit}{packing}");
                Arm { name: Some(name), prefill_sms: None }
            }
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

/// A run whose TTFT grew over its trace ([`ReplayReport::ttft_growth`]) this many times as much as
/// the same arm's run at its lowest rate was queueing up, not at a sustained rate. Relative, since
/// the runs of an arm share their prompt lengths (the trace's seed) and the growth of one run also
/// follows them: with seed 0 the first quarter's prompts are ~1.2x longer than the last's. On the
/// H200 runs of 2026-12-03 (150 requests) the runs that met their objective stayed within
/// 0.83-1.01x of the lowest rate's growth; those that missed it on TTFT reached 1.21-2.51x.
const QUEUE_GROWTH: f64 = 1.3;

/// How an arm's name states its prefill packing, when it is not the default.
fn packing(packing: PrefillPacking) -> &'static str {
    match packing {
        PrefillPacking::WholeFirst => "",
        PrefillPacking::Fill => ", prompts chunked to fill iterations",
    }
}

/// How an arm's name states its prefill iteration limit, when one was given.
fn prefill_limit(prefill_tokens: Option<PrefillTokens>) -> String {
    match prefill_tokens {
        None => String::new(),
        Some(PrefillTokens { tokens, backlog: None }) => format!(", prefill {tokens} tokens"),
        Some(PrefillTokens { tokens, backlog: Some(m) }) => format!(", prefill {tokens} tokens, {m} with a backlog"),
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
    /// The model: as given in-process, as the server names it with `--url`.
    model: &'a str,
    /// What was benchmarked: the model, or the server's model and URL.
    target: String,
    /// The device's SMs, in-process.
    sm_count: Option<u32>,
    arms: Vec<ArmRuns>,
    /// The objective the runs are judged by, once they are done.
    slo: Option<Slo>,
}

impl<'a> Plan<'a> {
    fn new(args: &'a BenchArgs) -> anyhow::Result<Self> {
        let random = [
            args.vllm.random_input_len.is_some(),
            args.vllm.random_output_len.is_some(),
            args.vllm.random_range_ratio.is_some(),
        ];
        if random.contains(&true) && !matches!(args.workload, WorkloadArg::Random) {
            bail!("--random-input-len, --random-output-len and --random-range-ratio need --workload random");
        }
        let source = match &args.workload {
            WorkloadArg::Paper(w) => Source::Paper(*w),
            WorkloadArg::Random => Source::Random(
                RandomLengths::new(
                    args.vllm.random_input_len.unwrap_or(1024),
                    args.vllm.random_output_len.unwrap_or(128),
                    args.vllm.random_range_ratio.unwrap_or(0.0),
                )
                .context("--random-input-len, --random-output-len or --random-range-ratio")?,
            ),
            WorkloadArg::Jsonl(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                let entries = parse_jsonl(&text).with_context(|| format!("in {}", path.display()))?;
                Source::Dataset { path: path.clone(), entries }
            }
        };
        let num_requests = match (&source, args.num_requests) {
            (_, Some(0)) => bail!("--num-requests must be at least 1"),
            (_, Some(n)) => n,
            (Source::Paper(_) | Source::Random(_), None) => 100,
            (Source::Dataset { entries, .. }, None) => entries.len(),
        };
        let mut goodput = Goodput::default();
        for &(metric, ms) in &args.vllm.goodput {
            goodput.set(metric, ms / 1e3)?;
        }
        Ok(Plan { args, source, num_requests, goodput })
    }

    fn name(&self) -> String {
        match &self.source {
            Source::Paper(w) => w.name().to_owned(),
            Source::Random(lengths) => {
                let (input, output, ratio) = lengths.parameters();
                format!("random (input {input}, output {output} tokens, range ratio {ratio})")
            }
            Source::Dataset { path, .. } => format!("jsonl:{}", path.display()),
        }
    }

    fn requests(&self, rate: f64) -> anyhow::Result<Vec<BenchRequest>> {
        let (n, seed) = (self.num_requests, self.args.seed);
        let arrivals = Arrivals { rate_per_s: rate, burstiness: self.args.vllm.burstiness };
        let ids = || self.args.token_id_range.clone();
        Ok(match &self.source {
            Source::Paper(w) => synthetic_requests(&trace(*w, arrivals, n, seed)?, ids(), seed)?,
            Source::Random(lengths) => synthetic_requests(&random_trace(*lengths, arrivals, n, seed)?, ids(), seed)?,
            Source::Dataset { entries, .. } => dataset_requests(entries, arrivals, n, seed)?,
        })
    }

    /// The objective `--slo-ttft-ms` and `--slo-tbt-ms` give, in seconds, or `--slo-scale` times
    /// the p95s of the first arm's run at the lowest rate in `arms`.
    fn slo(&self, arms: &[ArmRuns]) -> Option<Slo> {
        if let Some(scale) = self.args.slo_scale {
            let lightest = arms.first()?.runs.iter().min_by(|a, b| a.0.total_cmp(&b.0))?;
            let r = &lightest.1;
            return Some(Slo { ttft_p95: scale * r.ttft.p95, tbt_p95: scale * r.tbt.p95 });
        }
        Some(Slo { ttft_p95: self.args.slo_ttft_ms? / 1e3, tbt_p95: self.args.slo_tbt_ms? / 1e3 })
    }

    /// The rate whose runs the plot's timelines show.
    fn timeline_rate(&self) -> f64 {
        self.args.plot_timeline_rate.unwrap_or_else(|| self.args.rate.iter().copied().fold(f64::MIN, f64::max))
    }

    /// How the requests arrive, for the report's first line.
    fn load_shape(&self) -> String {
        let b = self.args.vllm.burstiness;
        let mut shape =
            if b == 1.0 { "Poisson arrivals".to_owned() } else { format!("gamma arrivals of burstiness {b}") };
        if let Some(n) = self.args.vllm.max_concurrency {
            let _ = write!(shape, ", at most {n} in flight");
        }
        shape
    }

    /// Runs every rate on every arm (arm by arm, so that the engine switches schedules once per
    /// arm) with `replay`, which gets the arm's index; a progress bar shows each run. Then prints
    /// and writes the report; `model` is what was benchmarked (at `--url`, if given), on
    /// `sm_count` SMs in-process.
    fn run(
        &self,
        model: &str,
        arms: &[Arm],
        sm_count: Option<u32>,
        mut replay: impl FnMut(usize, &[BenchRequest], &ProgressBar) -> anyhow::Result<ReplayReport>,
    ) -> anyhow::Result<()> {
        let style = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} requests ({elapsed})")
            .context("progress bar style")?;
        // Every arm replays the very same requests at each rate.
        let traces: Vec<(f64, Vec<BenchRequest>)> =
            self.args.rate.iter().map(|&rate| Ok((rate, self.requests(rate)?))).collect::<anyhow::Result<_>>()?;
        let target = match &self.args.url {
            Some(url) => format!("{model} at {url}"),
            None => model.to_owned(),
        };
        let mut results = Results { plan: self, model, target, sm_count, arms: Vec::new(), slo: None };
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
        results.slo = self.slo(&results.arms);
        print!("{}", results.table());
        print!("{}", results.vllm_table());
        print!("{}", results.ttft_by_prompt_table()?);
        print!("{}", results.lane_table());
        if let Some(slo) = &results.slo {
            print!("{}", results.slo_lines(slo));
        }
        if let Some(path) = &self.args.json {
            std::fs::write(path, serde_json::to_string_pretty(&results.json(results.slo.as_ref())?)?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &self.args.save_result {
            std::fs::write(path, results.save_result(SystemTime::now())?)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        if let Some(path) = &self.args.plot {
            std::fs::write(path, plot::svg(&results)).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(())
    }
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.rate.iter().any(|r| r.is_nan() || *r <= 0.0) {
        bail!("every --rate must be a positive number of requests per second, or inf");
    }
    if args.vllm.burstiness.is_nan() || args.vllm.burstiness <= 0.0 {
        bail!("--burstiness must be a positive number (or inf), not {}", args.vllm.burstiness);
    }
    if args.vllm.max_concurrency == Some(0) {
        bail!("--max-concurrency must be at least 1");
    }
    for (flag, value) in [("--slo-ttft-ms", args.slo_ttft_ms), ("--slo-tbt-ms", args.slo_tbt_ms)] {
        if value.is_some_and(|v| !(v.is_finite() && v > 0.0)) {
            bail!("{flag} must be a positive number of milliseconds");
        }
    }
    if args.slo_scale.is_some_and(|v| !(v.is_finite() && v >= 1.0)) {
        bail!("--slo-scale must be a number of at least 1 (times the first schedule's p95s at the lowest rate)");
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
            plan.run(server.model(), &[Arm::SERVER], None, |_, requests, bar| {
                server.replay(requests, args.vllm.max_concurrency, || bar.inc(1))
            })
        }
        None => args.engine.run(BenchJob(&plan), &args.model, &args.hub),
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
    let schedules = args.engine.schedules(&backend.device_name(), sm_count, &args.model, &args.hub)?;
    let first = schedules.first().context("--schedule names no schedule")?.clone();
    let (model, tokenizer) = load_model(&backend, &args.model, &args.hub)?;
    let vocab = model.config().vocab_size;
    if !matches!(plan.source, Source::Dataset { .. }) && args.token_id_range.end as usize > vocab {
        bail!("--token-id-range {:?} goes past the vocabulary of {} ({vocab} tokens)", args.token_id_range, args.model);
    }
    // Outputs are forced to the trace's lengths, so end-of-sequence tokens do not matter.
    let mut engine = make_engine(backend, model, Vec::new(), sizing, &args.engine, first)?;
    let arms: Vec<Arm> = schedules.iter().map(|s| Arm::new(s, sm_count, args.engine.scheduler())).collect();
    let mut current = 0;
    plan.run(&args.model, &arms, Some(sm_count), |arm, requests, bar| {
        if arm != current {
            engine.set_schedule(schedules[arm].clone())?;
            current = arm;
        }
        Ok(replay_requests(&mut engine, requests, tokenizer.as_ref(), args.vllm.max_concurrency, || bar.inc(1))?.1)
    })
}

/// The longest prompt the TTFT split counts as short: every `sharegpt` prompt (at most 1764
/// tokens) and the shortest `long-data` ones, so that on `mixed` the split follows the sources.
const SHORT_PROMPT: usize = 2048;

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

/// `v` when it is finite; JSON has no NaN (a figure of nothing) nor infinity.
fn finite(v: f64) -> Option<f64> {
    v.is_finite().then_some(v)
}

/// A rate or burstiness as JSON: a number, or "inf" as vLLM writes it.
fn number_or_inf(v: f64) -> serde_json::Value {
    if v == f64::INFINITY { json!("inf") } else { json!(v) }
}

/// A summary as JSON; a summary of nothing has null figures.
fn summary_json(s: &Summary) -> serde_json::Value {
    json!({ "count": s.count, "mean": finite(s.mean), "p50": finite(s.p50), "p95": finite(s.p95), "p99": finite(s.p99) })
}

/// The summary of a sample as JSON, as [`summary_json`]; null figures for an empty sample.
fn sample_json(values: &[f64]) -> serde_json::Value {
    let empty = Summary { count: 0, mean: f64::NAN, p50: f64::NAN, p95: f64::NAN, p99: f64::NAN };
    summary_json(&Summary::of(values).unwrap_or(empty))
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
                "predicted_s": it.predicted_s,
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
                "prediction_error": l.prediction_error.map(|(p50, p90)| json!({ "p50": p50, "p90": p90 })),
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

fn report_json(arm: &Arm, rate: f64, r: &ReplayReport, goodput: &Goodput) -> anyhow::Result<serde_json::Value> {
    let failures: Vec<_> = r.failures.iter().map(|f| json!({ "request": f.request, "error": f.message })).collect();
    let mismatches: Vec<_> = r
        .length_mismatches
        .iter()
        .map(|m| json!({ "request": m.request, "requested": m.requested, "got": m.got }))
        .collect();
    let summary = r.timeline.as_deref().map(TimelineSummary::of).transpose()?;
    let (short, long) = r.ttft_by_prompt(SHORT_PROMPT)?;
    Ok(json!({
        "schedule": arm.name,
        "prefill_sms": arm.prefill_sms,
        "rate": number_or_inf(rate),
        "completed": r.completed,
        "failed": r.failures.len(),
        "ttft_s": summary_json(&r.ttft),
        "ttft_by_prompt": {
            "max_short_prompt_tokens": SHORT_PROMPT,
            "short_s": summary_json(&short),
            "long_s": summary_json(&long),
        },
        "tbt_s": summary_json(&r.tbt),
        "tpot_s": sample_json(&r.samples(Metric::Tpot)),
        "e2el_s": sample_json(&r.samples(Metric::E2el)),
        "normalized_latency_s": summary_json(&r.normalized_latency),
        "request_throughput": r.request_throughput,
        "request_goodput": (!goodput.is_empty()).then(|| r.request_goodput(goodput)),
        "token_throughput": r.token_throughput,
        "input_throughput": r.input_throughput(),
        "total_token_throughput": r.total_token_throughput(),
        "total_input_tokens": r.total_input_tokens(),
        "total_output_tokens": r.total_output_tokens(),
        "peak_concurrency": r.peak_concurrency(),
        "ttft_growth": r.ttft_growth(),
        "duration_s": r.duration_s,
        "preemptions": r.preemptions,
        "failures": failures,
        "length_mismatches": mismatches,
        "timeline_summary": summary.as_ref().map(timeline_summary_json),
        "timeline": r.timeline.as_deref().map(timeline_json),
    }))
}

/// One run as vLLM's `bench serve --save-result` writes it (its field names and per-request
/// arrays; latencies in milliseconds, except the arrays' seconds), with ours under "nexus".
fn vllm_result(results: &Results<'_>, arm: &Arm, rate: f64, r: &ReplayReport, date: &str) -> serde_json::Value {
    let plan = results.plan;
    let args = plan.args;
    let backend = if args.url.is_some() { "openai" } else { "nexus" };
    let ttfts: Vec<Option<f64>> =
        r.requests.iter().map(|q| q.completed().and_then(|t| t.tokens.first().copied())).collect();
    let itls: Vec<Vec<f64>> =
        r.requests.iter().map(|q| q.completed().map(|t| t.itls().collect()).unwrap_or_default()).collect();
    let mut doc = json!({
        "date": date,
        "backend": backend,
        "endpoint_type": backend,
        "label": arm.name,
        "model_id": results.model,
        "num_prompts": plan.num_requests,
        "request_rate": number_or_inf(rate),
        "burstiness": number_or_inf(args.vllm.burstiness),
        "max_concurrency": args.vllm.max_concurrency,
        "duration": r.duration_s,
        "completed": r.completed,
        "failed": r.failures.len(),
        "total_input_tokens": r.total_input_tokens(),
        "total_output_tokens": r.total_output_tokens(),
        "request_throughput": r.request_throughput,
        "request_goodput": (!plan.goodput.is_empty()).then(|| r.request_goodput(&plan.goodput)),
        "output_throughput": r.token_throughput,
        "total_token_throughput": r.total_token_throughput(),
        "input_throughput": r.input_throughput(),
        "input_lens": r.requests.iter().map(|q| q.input_len()).collect::<Vec<_>>(),
        "output_lens": r.requests.iter().map(|q| q.output_len()).collect::<Vec<_>>(),
        "ttfts": ttfts,
        "itls": itls,
        "errors": r.requests.iter().map(|q| q.error().unwrap_or_default()).collect::<Vec<_>>(),
        "nexus": {
            "workload": plan.name(),
            "seed": args.seed,
            "schedule": arm.name,
            "prefill_sms": arm.prefill_sms,
            "url": args.url,
            "ttft_s": summary_json(&r.ttft),
            "tbt_s": summary_json(&r.tbt),
            "normalized_latency_s": summary_json(&r.normalized_latency),
            "preemptions": r.preemptions,
            "peak_concurrency": r.peak_concurrency(),
            "length_mismatches": r.length_mismatches.len(),
            "slo_met": results.slo.as_ref().map(|slo| slo.met_by(r)),
        },
    });
    for &metric in &args.vllm.percentile_metrics {
        let stats = MetricStats::of(&r.samples(metric), &args.vllm.metric_percentiles);
        let name = metric.name();
        let ms = |v: f64| finite(v * 1e3);
        doc[format!("mean_{name}_ms")] = json!(ms(stats.mean));
        doc[format!("median_{name}_ms")] = json!(ms(stats.median));
        doc[format!("std_{name}_ms")] = json!(ms(stats.std));
        for (p, v) in stats.percentiles {
            doc[format!("p{p}_{name}_ms")] = json!(ms(v));
        }
    }
    doc
}

/// `now` in UTC as vLLM dates its results, YYYYMMDD-HHMMSS (vLLM writes local time; UTC needs no
/// time zone database).
fn utc_date(now: SystemTime) -> String {
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's `civil_from_days`: the proleptic Gregorian date of a day count since
    // 1970-01-01, through 400-year eras that start on March 1st.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}-{:02}{:02}{:02}", rest / 3600, rest / 60 % 60, rest % 60)
}

/// A sample's figures in milliseconds, as the vLLM table's cells give them (mean / median /
/// the percentiles asked), or "-" for an empty sample.
fn stats_cell(stats: &MetricStats) -> String {
    if stats.count == 0 {
        return "-".into();
    }
    let figures = [stats.mean, stats.median].into_iter().chain(stats.percentiles.iter().map(|p| p.1));
    figures.map(|v| format!("{:.1}", v * 1e3)).collect::<Vec<_>>().join(" / ")
}

/// The `--goodput` objectives in words.
fn describe_goodput(goodput: &Goodput) -> String {
    let objectives = [("TTFT", goodput.ttft), ("TPOT", goodput.tpot), ("E2EL", goodput.e2el)];
    let given: Vec<String> =
        objectives.iter().filter_map(|(name, v)| Some(format!("{name} <= {} ms", (*v)? * 1e3))).collect();
    given.join(" and ")
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
            "\n{} on {}, {} requests per rate, {} (latencies in ms: mean / p50 / p95 / p99, over the completed \
             requests)\n\n",
            plan.name(),
            self.target,
            plan.num_requests,
            plan.load_shape()
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

    /// The runs as vLLM's `bench serve` reports them: its latency metrics (`--percentile-metrics`
    /// at `--metric-percentiles`), request goodput and token throughputs.
    fn vllm_table(&self) -> String {
        let plan = self.plan;
        let args = plan.args;
        let order: Vec<String> = ["mean".to_owned(), "median".to_owned()]
            .into_iter()
            .chain(args.vllm.metric_percentiles.iter().map(|p| format!("p{p}")))
            .collect();
        let goodput = !plan.goodput.is_empty();
        let mut out = format!(
            "\nAs vLLM's bench serve measures them (ms: {}; TPOT per request, after the first token; ITL: our TBT; \
             E2EL: sending to the end{})\n\n",
            order.join(" / "),
            if goodput {
                format!("; goodput: requests with {}", describe_goodput(&plan.goodput))
            } else {
                String::new()
            }
        );
        let names: Vec<String> = args.vllm.percentile_metrics.iter().map(|m| m.name().to_uppercase()).collect();
        let mut columns = self.key_columns();
        columns.push("completed");
        columns.extend(names.iter().map(String::as_str));
        columns.push("req/s");
        if goodput {
            columns.push("goodput (req/s)");
        }
        columns.extend(["input tok/s", "output tok/s", "total tok/s", "peak in flight"]);
        out.push_str(&header(&columns));
        for (arm, rate, r) in self.runs() {
            let mut cells = self.key_cells(arm, rate);
            cells.push(r.completed.to_string());
            for &metric in &args.vllm.percentile_metrics {
                cells.push(stats_cell(&MetricStats::of(&r.samples(metric), &args.vllm.metric_percentiles)));
            }
            cells.push(format!("{:.2}", r.request_throughput));
            if goodput {
                cells.push(format!("{:.2}", r.request_goodput(&plan.goodput)));
            }
            cells.extend([
                format!("{:.0}", r.input_throughput()),
                format!("{:.0}", r.token_throughput),
                format!("{:.0}", r.total_token_throughput()),
                r.peak_concurrency().to_string(),
            ]);
            out.push_str(&row(&cells));
        }
        out
    }

    /// TTFT of the prompts up to [`SHORT_PROMPT`] tokens and of the longer ones, per run: empty
    /// when every prompt is on one side (or of unknown length).
    fn ttft_by_prompt_table(&self) -> anyhow::Result<String> {
        let mut rows = String::new();
        let mut mixed = false;
        for (arm, rate, r) in self.runs() {
            let (short, long) = r.ttft_by_prompt(SHORT_PROMPT)?;
            mixed |= short.count > 0 && long.count > 0;
            let mut cells = self.key_cells(arm, rate);
            cells.extend([short.count.to_string(), ms(&short), long.count.to_string(), ms(&long)]);
            rows.push_str(&row(&cells));
        }
        if !mixed {
            return Ok(String::new());
        }
        let mut columns = self.key_columns();
        let (short, long) = (format!("prompts <= {SHORT_PROMPT} tokens"), "longer prompts".to_owned());
        columns.extend([short.as_str(), "their TTFT", long.as_str(), "their TTFT"]);
        Ok(format!(
            "\nTTFT by prompt length (ms: mean / p50 / p95 / p99, over the completed requests)\n\n{}{rows}",
            header(&columns)
        ))
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
                    lane.prediction_error
                        .map_or_else(|| "-".into(), |(p50, p90)| format!("{:.1}% / {:.1}%", p50 * 1e2, p90 * 1e2)),
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
            "prediction error (p50 / p90)",
        ]);
        format!(
            "\nLanes: iteration time from launch to seen done (ms: mean / p50 / p95 / p99); host = the engine \
             thread's CPU time on an iteration (planning, building, launching, reading back, sampling); both lanes \
             in flight = share of the time any lane ran during which two did; prediction error = |predicted / measured - 1| \
             of the iteration times, for a schedule that predicts them (the controller's cost model){}\n\n{}{rows}",
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
            let lowest = arms.runs.iter().min_by(|a, b| a.0.total_cmp(&b.0));
            let Some((lowest_rate, lowest)) = lowest else { continue };
            let Some(base) = lowest.ttft_growth() else { continue };
            for (rate, r) in &arms.runs {
                let Some(growth) = r.ttft_growth().map(|g| g / base) else { continue };
                if growth >= QUEUE_GROWTH && slo.met_by(r) {
                    let _ = writeln!(
                        out,
                        "  at {rate} req/s it met the objective while its queue grew: over the trace its TTFT \
                         grew {growth:.1}x as much as at {lowest_rate} req/s (same prompts); a longer trace \
                         (--num-requests) at that rate would wait longer"
                    );
                }
            }
        }
        out
    }

    fn json(&self, slo: Option<&Slo>) -> anyhow::Result<serde_json::Value> {
        let plan = self.plan;
        let runs: Vec<_> = self
            .runs()
            .map(|(arm, rate, r)| report_json(arm, rate, r, &plan.goodput))
            .collect::<anyhow::Result<_>>()?;
        let slo = slo.map(|slo| {
            let arms: Vec<_> = self
                .arms
                .iter()
                .map(|a| {
                    let met: Vec<_> =
                        a.runs.iter().filter(|(_, r)| slo.met_by(r)).map(|(rate, _)| number_or_inf(*rate)).collect();
                    let throughput = slo.throughput(&a.runs).map(number_or_inf);
                    json!({ "schedule": a.arm.name, "rates_met": met, "throughput": throughput })
                })
                .collect();
            json!({ "ttft_p95_s": slo.ttft_p95, "tbt_p95_s": slo.tbt_p95, "schedules": arms })
        });
        let goodput = (!plan.goodput.is_empty()).then(|| {
            let ms = |v: Option<f64>| v.map(|s| s * 1e3);
            json!({ "ttft_ms": ms(plan.goodput.ttft), "tpot_ms": ms(plan.goodput.tpot), "e2el_ms": ms(plan.goodput.e2el) })
        });
        let schedules: Vec<_> = self.arms.iter().filter_map(|a| a.arm.name.clone()).collect();
        Ok(json!({
            "target": self.target,
            "url": plan.args.url,
            "workload": plan.name(),
            "num_requests": plan.num_requests,
            "burstiness": number_or_inf(plan.args.vllm.burstiness),
            "max_concurrency": plan.args.vllm.max_concurrency,
            "goodput": goodput,
            "sm_count": self.sm_count,
            "schedules": schedules,
            "runs": runs,
            "slo": slo,
        }))
    }

    /// The `--save-result` file: one vLLM result per run and line, dated `now`.
    fn save_result(&self, now: SystemTime) -> anyhow::Result<String> {
        let date = utc_date(now);
        let mut out = String::new();
        for (arm, rate, r) in self.runs() {
            out.push_str(&serde_json::to_string(&vllm_result(self, arm, rate, r, &date))?);
            out.push('\n');
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arms_name_their_prefill_iteration_limit() {
        assert_eq!(prefill_limit(None), "");
        assert_eq!(prefill_limit(Some(PrefillTokens::fixed(2048))), ", prefill 2048 tokens");
        let backlog = PrefillTokens { tokens: 2048, backlog: Some(8192) };
        assert_eq!(prefill_limit(Some(backlog)), ", prefill 2048 tokens, 8192 with a backlog");
        assert_eq!(crate::parse_prefill_tokens("2048..8192"), Ok(backlog));
        assert_eq!(crate::parse_prefill_tokens("512"), Ok(PrefillTokens::fixed(512)));
    }

    #[test]
    fn dates_are_vllms_in_utc() {
        let at = |secs| utc_date(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "19700101-000000");
        assert_eq!(at(951_782_399), "20000228-235959");
        assert_eq!(at(951_782_400), "20000229-000000");
        assert_eq!(at(1_700_000_000), "20231114-221320");
    }

    #[test]
    fn flags_parse_as_vllms() {
        assert_eq!(parse_objective("ttft:500").unwrap(), (Metric::Ttft, 500.0));
        assert_eq!(parse_objective("e2el:0").unwrap(), (Metric::E2el, 0.0));
        for bad in ["ttft", "itl:5", "tbt:5", "tpot:-1", "tpot:x"] {
            assert!(parse_objective(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_percentile("99.9").unwrap(), 99.9);
        assert!(
            parse_percentile("101").is_err() && parse_percentile("-1").is_err() && parse_percentile("NaN").is_err()
        );
        assert!(matches!(parse_workload("random").unwrap(), WorkloadArg::Random));
        assert!(parse_workload("randomly").unwrap_err().contains("random"));
        assert_eq!(number_or_inf(f64::INFINITY), json!("inf"));
        assert_eq!(number_or_inf(2.5), json!(2.5));
        assert_eq!(
            describe_goodput(&Goodput { ttft: Some(0.5), tpot: None, e2el: Some(2.0) }),
            "TTFT <= 500 ms and E2EL <= 2000 ms"
        );
    }
}
