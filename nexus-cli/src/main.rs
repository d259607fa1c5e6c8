//! `nexus`: generate text with a Llama-family model, serve it over an OpenAI-compatible HTTP API,
//! benchmark serving, in-process or against any OpenAI-compatible server, and profile a model on
//! a device for the controller of the `nexus` schedule.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod bench;
mod profile;
mod serve;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nexus_runtime::engine::cost_model::CostModel;
use nexus_runtime::engine::generate::{GenerateOptions, generate_text};
use nexus_runtime::engine::profile::{KernelsCheck, SavedProfile};
use nexus_runtime::engine::sampling::{Penalties, SamplingParams};
use nexus_runtime::engine::scheduler::controller::{BacklogTarget, ControllerConfig};
use nexus_runtime::engine::scheduler::{NexusConfig, PrefillPacking, PrefillTokens, SchedulerConfig};
use nexus_runtime::engine::{DEFAULT_BLOCK_SIZE, Engine, EngineConfig, NexusControl, RequestOptions, Schedule};
use nexus_runtime::kernels::Gpu;
use nexus_runtime::model::LlamaModel;
use nexus_runtime::model::backend::Backend;
use nexus_runtime::model::cpu::CpuBackend;
use nexus_runtime::model::cuda::{CudaBackend, CudaBackendConfig};
use nexus_runtime::model::simulated::{SimulatedBackend, SimulatedTime, Simulation};
use nexus_runtime::text::chat_template::ChatMessage;
use nexus_runtime::text::tokenizer::Tokenizer;
use nexus_runtime::weights::config::ModelConfig;
use nexus_runtime::weights::hub::{HubCache, HubPick};
use nexus_runtime::weights::loader::{self, DEFAULT_MODEL, LoadedModel, ModelPath};
use nexus_runtime::weights::synthetic;

#[derive(Parser, Debug)]
#[command(name = "nexus", version, about = "Serve LLMs with prefill and decode on disjoint SMs of one GPU")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Serve an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models,
    /// /health, /metrics).
    Serve(ServeArgs),
    /// Replay a serving workload (Poisson or bursty arrivals, at rates or under a concurrency cap)
    /// through the engine in-process, or against an OpenAI-compatible server with --url, and
    /// report TTFT, TBT (ITL), TPOT, end-to-end latency, goodput and throughput, as vLLM's bench
    /// and ours.
    Bench(bench::BenchArgs),
    /// Measure a model's operators on this device against the CTA budget, fit the cost model the
    /// `nexus` schedule's controller splits the SMs with, report its prediction error and save it
    /// where `serve` and `bench` find it.
    Profile(profile::ProfileArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A GGUF file, a Hugging Face model folder, a repo in the local Hugging Face cache (org/name;
    /// see --revision), or `synthetic:<name>` (random weights of a published config:
    /// llama-3.1-8b, qwen2.5-3b, qwen2.5-14b; no tokenizer, so prompts are token ids and outputs
    /// token ids).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    #[command(flatten)]
    hub: HubArgs,
    /// The name clients use for the model (default: the file or folder name, else the repo id or
    /// `synthetic:<name>` as given).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer <key>` on every API request (`/v1/...`); not empty.
    #[arg(long)]
    api_key: Option<String>,
    /// On SIGINT or SIGTERM, the seconds requests in flight get to finish before they are ended
    /// (a 503, or an error event then `[DONE]`).
    #[arg(long, default_value_t = 30.0)]
    shutdown_grace_s: f64,
    /// Seconds a client may take to send a request's head, and a keep-alive connection may stay
    /// idle; the connection is closed after that.
    #[arg(long, default_value_t = 30.0)]
    header_timeout_s: f64,
    /// Seconds a client may take to send a request's body (a 408 after that).
    #[arg(long, default_value_t = 60.0)]
    body_timeout_s: f64,
    /// The most connections open at once; more wait to be accepted until one closes.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
    #[command(flatten)]
    engine: EngineArgs,
}

impl ServeArgs {
    /// The settings that do not need the model, checked before it loads.
    fn http(&self) -> anyhow::Result<(serve::HttpLimits, Duration)> {
        if self.api_key.as_deref() == Some("") {
            bail!("--api-key is empty: give a key, or leave the flag out to serve without one");
        }
        if self.max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        let seconds = |flag: &str, value: f64, least: f64| {
            if value.is_finite() && value >= least {
                Ok(Duration::from_secs_f64(value))
            } else {
                Err(anyhow::anyhow!("--{flag} {value}: give a number of seconds >= {least}"))
            }
        };
        let limits = serve::HttpLimits {
            header_timeout: seconds("header-timeout-s", self.header_timeout_s, 0.001)?,
            body_timeout: seconds("body-timeout-s", self.body_timeout_s, 0.001)?,
            max_connections: self.max_connections,
        };
        Ok((limits, seconds("shutdown-grace-s", self.shutdown_grace_s, 0.0)?))
    }
}

/// Which snapshot and file of a repo in the local Hugging Face cache `--model org/name` loads
/// (shared by every command that takes `--model`).
#[derive(Args, Debug)]
struct HubArgs {
    /// With `--model org/name`: the snapshot to load from the Hugging Face cache, a ref name (a
    /// branch or tag) or a commit hash (default: main). The cache is $HF_HUB_CACHE, else
    /// $HF_HOME/hub, else ~/.cache/huggingface/hub; nothing is downloaded.
    #[arg(long, value_name = "REV")]
    revision: Option<String>,
    /// With `--model org/name`: the GGUF file of the snapshot to load, by its name in it (needed
    /// when it holds several; a snapshot with config.json is otherwise loaded as a Hugging Face
    /// folder).
    #[arg(long, value_name = "NAME")]
    gguf_file: Option<String>,
}

impl HubArgs {
    fn pick(&self) -> HubPick<'_> {
        HubPick { revision: self.revision.as_deref(), gguf_file: self.gguf_file.as_deref() }
    }

    /// `model` with the revision and GGUF file given, as one name: profiles are saved and looked
    /// up under it, so that two files or revisions of one repo get a profile each.
    fn qualified(&self, model: &str) -> String {
        let mut name = model.to_owned();
        if let Some(revision) = &self.revision {
            name = format!("{name}@{revision}");
        }
        if let Some(file) = &self.gguf_file {
            name = format!("{name}:{file}");
        }
        name
    }

    /// The flags that name `model` with these again, for commands a message suggests.
    fn flags(&self, model: &str) -> String {
        let mut flags = format!("--model {model}");
        if let Some(revision) = &self.revision {
            flags = format!("{flags} --revision {revision}");
        }
        if let Some(file) = &self.gguf_file {
            flags = format!("{flags} --gguf-file {file}");
        }
        flags
    }

    /// Finds the file or folder of `model`: the path, else the repo in the local Hugging Face
    /// cache, which is then said on stderr.
    fn locate(&self, model: &str) -> anyhow::Result<PathBuf> {
        let found = loader::locate(model, &self.pick(), HubCache::from_env().as_ref())?;
        if let ModelPath::Hub(path) = &found {
            eprintln!("{model}: {} in the Hugging Face cache", path.display());
        }
        Ok(found.path().to_path_buf())
    }
}

/// Where the model runs and how (shared by `generate`, `serve` and `bench`).
#[derive(Args, Debug)]
struct DeviceArgs {
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Launch every step's kernels one by one: no CUDA graphs for decode steps (GPU only).
    #[arg(long)]
    enforce_eager: bool,
    /// Make each request's output independent of what it is batched with, of how its prompt is
    /// chunked and of preemption, bit for bit (GPU only; slower: see the README).
    #[arg(long)]
    batch_invariant: bool,
    /// Run prefill attention on the portable kernels (FlashAttention-2's structure) on Hopper
    /// too, where the default is the wgmma one (FlashAttention-3's): a fallback, and a baseline
    /// (GPU only).
    #[arg(long)]
    portable_prefill_attention: bool,
    /// Launch each kernel only once the previous one has finished, also on Hopper, where by
    /// default a phase holding every SM lets the next kernel start while the previous drains
    /// (programmatic dependent launch; GPU only): a comparison and a fallback.
    #[arg(long)]
    no_dependent_launch: bool,
}

impl DeviceArgs {
    /// Runs `job` on the backend `--device` picks, with `cpu` or `gpu` KV-cache sizing.
    fn run<J: OnBackend>(&self, job: J, cpu: KvSizing, gpu: KvSizing) -> anyhow::Result<()> {
        match self.device {
            Device::Cpu => job.run(CpuBackend, cpu),
            Device::Cuda => job.run(self.cuda_backend()?, gpu),
            Device::Auto => match self.cuda_backend() {
                Ok(backend) => job.run(backend, gpu),
                Err(e) => {
                    eprintln!("{e:#}; running on the CPU");
                    job.run(CpuBackend, cpu)
                }
            },
        }
    }

    /// The CUDA backend on GPU 0.
    fn cuda_backend(&self) -> anyhow::Result<CudaBackend> {
        let gpu = Gpu::new(0)?;
        eprintln!("running on {gpu:?}");
        let mut config = CudaBackendConfig {
            batch_invariant: self.batch_invariant,
            portable_prefill_attention: self.portable_prefill_attention,
            dependent_launch: !self.no_dependent_launch,
            ..CudaBackendConfig::default()
        };
        if self.enforce_eager {
            config.graph_batch_sizes.clear();
        }
        Ok(CudaBackend::with_config(gpu, config)?)
    }
}

/// Where the engine runs and how big it is (shared by `serve` and `bench`).
#[derive(Args, Debug)]
struct EngineArgs {
    #[command(flatten)]
    device: DeviceArgs,
    /// The most requests running at once.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// The most tokens (prompt and output) of one request, if less than the model's context
    /// (requests over it are refused; decode graphs hold block tables for it only).
    #[arg(long)]
    max_model_len: Option<usize>,
    /// The most tokens (decodes plus prompt chunks) in one step.
    #[arg(long, default_value_t = 8192)]
    max_num_batched_tokens: usize,
    /// Fraction of the GPU's memory to use for weights, KV cache and activations (GPU only).
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    /// KV-cache blocks of 64 tokens on the CPU backend (refused when more than the memory
    /// available holds).
    #[arg(long, default_value_t = 256)]
    cpu_kv_blocks: usize,
    /// How iterations are scheduled: `chunked` (one mixed batch of decodes and prompt chunks per
    /// iteration on every SM, as vLLM) or `nexus` (prefill and decode at the same time on
    /// disjoint SMs: split by the controller from this device's profile of the model, made by
    /// `nexus profile`, or at a fixed --prefill-sms). `nexus bench` takes several,
    /// comma-separated, and runs each on the same trace.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "chunked")]
    schedule: Vec<ScheduleKind>,
    /// With `--schedule nexus`: a fixed split instead of the controller's, the SMs of prefill
    /// while both prefill and decode have work (decode gets the rest; a phase with no work
    /// leaves all SMs to the other). `nexus bench` takes several, comma-separated, and runs each
    /// (and the controller too when `nexus` is named twice).
    #[arg(long, value_delimiter = ',')]
    prefill_sms: Vec<u32>,
    /// With the controller: the profile to split with (default: the one `nexus profile` saved for
    /// this device and model, or with --simulate the profile simulated).
    #[arg(long)]
    profile: Option<PathBuf>,
    /// No device: simulate the GPU this profile (made by `nexus profile`) was made on. The model
    /// computes nothing (its logits are zeros: greedy sampling picks token 0) and each iteration
    /// takes what the profile's cost model predicts for it, beside what the other lane runs
    /// meanwhile, in real time (see --simulated-virtual-time): a way to try schedules and
    /// controller settings on a trace without the GPU. The profile must be of --model; it may be
    /// of other kernels than this build's.
    #[arg(long, value_name = "PROFILE")]
    simulate: Option<PathBuf>,
    /// With --simulate: the simulated GPU's memory in GiB, of which --gpu-memory-utilization holds
    /// the bf16 weights and the KV cache (the default leaves Llama-3.1-8B a 111 GiB cache; the
    /// H200 runs had 110.3 GiB).
    #[arg(long, default_value_t = 140.4, requires = "simulate")]
    simulated_memory_gib: f64,
    /// With --simulate: milliseconds of the engine thread that launching a prefill step and a
    /// decode step take, PREFILL,DECODE (default: what the engine spent per iteration on the
    /// H200 in the controller experiment's eleventh round, 2.4-2.9 ms and 0.5-0.6 ms, less its
    /// planning).
    #[arg(long, value_delimiter = ',', default_values_t = [2.5, 0.5], requires = "simulate")]
    simulated_launch_ms: Vec<f64>,
    /// With --simulate: factors on a prefill and a decode step's time while the other lane runs
    /// beside it, PREFILL,DECODE (at least 1): how much slower than its profile the GPU runs
    /// then, which the controller's calibration learns in a run.
    #[arg(long, value_delimiter = ',', default_values_t = [1.0, 1.0], requires = "simulate")]
    simulated_beside: Vec<f64>,
    /// With --simulate: a device whose kernels read their CTA budget as they start, so that the
    /// nexus schedule moves the split of a step in flight too (at once here; the CUDA backend
    /// cannot: its budgets are launch arguments).
    #[arg(long, requires = "simulate")]
    simulated_resize: bool,
    /// With --simulate, in `nexus bench`: the simulated device keeps a clock of its own, which
    /// moves only by the steps and their launches (--simulated-launch-ms), instead of the host's:
    /// a run takes a fraction of the time it stands for and comes out the same every time, less
    /// the engine's planning time (microseconds a step).
    #[arg(long, requires = "simulate")]
    simulated_virtual_time: bool,
    /// With the controller: prefill is protected while less than this fraction of the KV cache is
    /// in use, decode above it.
    #[arg(long, default_value_t = ControllerConfig::default().kv_threshold)]
    kv_threshold: f64,
    /// With the controller: how much slower than its best beside prefill a protected decode may
    /// get.
    #[arg(long, default_value_t = ControllerConfig::default().decode_slack)]
    decode_slack: f64,
    /// With the controller: how much slower than its best beside decode a protected prefill may
    /// get.
    #[arg(long, default_value_t = ControllerConfig::default().prefill_slack)]
    prefill_slack: f64,
    /// With the controller and a decode target, while prefill is protected: the largest share of
    /// the SMs decode may get to meet the target (prefill keeps the rest).
    #[arg(long, default_value_t = ControllerConfig::default().max_decode_share)]
    max_decode_share: f64,
    /// With the controller, instead of --prefill-slack: while prefill is protected, decode gets
    /// the fewest SMs whose predicted iteration (the time between tokens) takes at most this many
    /// milliseconds, and prefill the rest. T..B: T, and B while prompts back up (see
    /// --backlog-tokens), so that prefill drains a queue with more SMs; `none`: the paper's rule,
    /// --prefill-slack. `nexus bench` takes several, comma-separated, and runs the controller
    /// with each (`none,10..28`: the paper's controller beside a tuned one on the same trace).
    #[arg(long, value_delimiter = ',', value_parser = parse_decode_target)]
    decode_target_ms: Vec<DecodeTarget>,
    /// With --decode-target-ms T..B: the prompt tokens waiting (not in an iteration in flight; a
    /// prefill iteration being planned counts its own) from which B holds (default: the backlog
    /// limit of --prefill-tokens N..M, else --max-num-batched-tokens).
    #[arg(long)]
    backlog_tokens: Option<usize>,
    /// With the controller: decide on the profile's predictions alone, as the paper does, instead
    /// of scaling them by what each lane's recent iterations measured against them.
    #[arg(long)]
    no_calibration: bool,
    /// With the controller: decode budgets are multiples of this many SMs.
    #[arg(long, default_value_t = ControllerConfig::default().grid)]
    split_grid: u32,
    /// With the controller: a new split is applied only when it moves decode by more SMs than
    /// this.
    #[arg(long, default_value_t = ControllerConfig::default().hysteresis)]
    split_hysteresis: u32,
    /// With `--schedule nexus`: prompts run shortest remaining first, each one's remaining tokens
    /// lowered by this many per scheduling round it has waited, so that long prompts do not
    /// starve (0: no aging).
    #[arg(long, default_value_t = NexusConfig::DEFAULT_PREFILL_AGING)]
    prefill_aging: u64,
    /// With `--schedule nexus`: the most prompt tokens of one prefill iteration (default:
    /// --max-num-batched-tokens). Shorter iterations let a prompt that arrives during one start
    /// sooner; longer ones keep more of the GPU busy per launch; decode waits for neither. N..M:
    /// N, and M once the prompts waiting hold M tokens or more. `nexus bench` takes several,
    /// comma-separated, and runs each nexus schedule with each.
    #[arg(long, value_delimiter = ',', value_parser = parse_prefill_tokens)]
    prefill_tokens: Vec<PrefillTokens>,
    /// With `--schedule nexus`: how a prefill iteration takes the prompts, shortest first.
    #[arg(long, value_enum, default_value_t = PackingArg::WholeFirst)]
    prefill_packing: PackingArg,
}

/// The `--prefill-packing` values.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum PackingArg {
    /// Whole prompts while they fit; a prompt that does not fit is chunked only into an
    /// iteration that has nothing else, so the prompts an iteration finishes get their first
    /// token sooner.
    WholeFirst,
    /// Up to the iteration's token limit, the last prompt chunked to fill it.
    Fill,
}

impl From<PackingArg> for PrefillPacking {
    fn from(arg: PackingArg) -> Self {
        match arg {
            PackingArg::WholeFirst => PrefillPacking::WholeFirst,
            PackingArg::Fill => PrefillPacking::Fill,
        }
    }
}

/// A `--prefill-tokens` value: `N`, or `N..M` (`M` with a backlog of `M` prompt tokens).
fn parse_prefill_tokens(value: &str) -> Result<PrefillTokens, String> {
    let number = |n: &str| n.parse::<usize>().map_err(|_| format!("{value}: give N or N..M, token counts"));
    let tokens = match value.split_once("..") {
        Some((n, m)) => PrefillTokens { tokens: number(n)?, backlog: Some(number(m)?) },
        None => PrefillTokens::fixed(number(value)?),
    };
    tokens.validate().map_err(|e| format!("{value}: {e}"))?;
    Ok(tokens)
}

/// A `--decode-target-ms` value: `T` milliseconds, or `T..B`, `B` while prompts back up.
#[derive(Clone, Copy, Debug, PartialEq)]
struct DecodeTargetMs {
    ms: f64,
    backlog_ms: Option<f64>,
}

/// A `--decode-target-ms` value: a target, or none (`none`: the prefill slack decides).
#[derive(Clone, Copy, Debug, PartialEq)]
struct DecodeTarget(Option<DecodeTargetMs>);

fn parse_decode_target(value: &str) -> Result<DecodeTarget, String> {
    if value.trim() == "none" {
        return Ok(DecodeTarget(None));
    }
    let number = |n: &str| match n.trim().parse::<f64>() {
        Ok(ms) if ms.is_finite() && ms > 0.0 => Ok(ms),
        _ => Err(format!("{value}: give T or T..B, positive milliseconds, or none")),
    };
    let target = match value.split_once("..") {
        Some((t, b)) => DecodeTargetMs { ms: number(t)?, backlog_ms: Some(number(b)?) },
        None => DecodeTargetMs { ms: number(value)?, backlog_ms: None },
    };
    if target.backlog_ms.is_some_and(|b| b < target.ms) {
        return Err(format!("{value}: the target with a backlog must be at least the one without"));
    }
    Ok(DecodeTarget(Some(target)))
}

/// The `--schedule` values.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum ScheduleKind {
    Chunked,
    Nexus,
}

impl EngineArgs {
    fn scheduler(&self) -> SchedulerConfig {
        SchedulerConfig { max_num_seqs: self.max_num_seqs, max_num_batched_tokens: self.max_num_batched_tokens }
    }

    /// Every schedule `--schedule` and `--prefill-sms` name, in order, for `model` (as `hub`
    /// picks it) on `device` of `sm_count` SMs: `nexus` with fixed splits when `--prefill-sms`
    /// gives them, and otherwise (or for a second `nexus`) with the controller, whose profile
    /// must exist.
    fn schedules(&self, device: &str, sm_count: u32, model: &str, hub: &HubArgs) -> anyhow::Result<Vec<Schedule>> {
        if self.backlog_tokens.is_some()
            && !self.decode_target_ms.iter().any(|t| t.0.is_some_and(|t| t.backlog_ms.is_some()))
        {
            bail!("--backlog-tokens needs a target with a backlog, --decode-target-ms T..B");
        }
        let mut out = Vec::new();
        let mut fixed_done = false;
        // The profile, read once for every controlled schedule.
        let mut cost: Option<CostModel> = None;
        for kind in &self.schedule {
            match kind {
                ScheduleKind::Chunked => out.push(Schedule::Chunked),
                ScheduleKind::Nexus if self.prefill_sms.is_empty() || fixed_done => {
                    let targets: Vec<Option<DecodeTargetMs>> = match self.decode_target_ms.as_slice() {
                        [] => vec![None],
                        targets => targets.iter().map(|t| t.0).collect(),
                    };
                    for target in targets {
                        for prefill_tokens in self.prefill_token_limits() {
                            let controller = self.controller(sm_count, target, prefill_tokens)?;
                            let cost = match cost.as_ref() {
                                Some(cost) => cost.clone(),
                                None => cost.insert(self.cost_model(device, model, hub)?).clone(),
                            };
                            let control = NexusControl {
                                cost,
                                controller,
                                prefill_aging: self.prefill_aging,
                                prefill_tokens,
                                prefill_packing: self.prefill_packing.into(),
                            };
                            out.push(Schedule::NexusControlled(Box::new(control)));
                        }
                    }
                }
                ScheduleKind::Nexus => {
                    fixed_done = true;
                    for &prefill_sms in &self.prefill_sms {
                        out.extend(self.prefill_token_limits().into_iter().map(|prefill_tokens| {
                            Schedule::Nexus(NexusConfig {
                                prefill_sms,
                                prefill_aging: self.prefill_aging,
                                prefill_tokens,
                                prefill_packing: self.prefill_packing.into(),
                            })
                        }));
                    }
                }
            }
        }
        if !self.prefill_sms.is_empty() && !self.schedule.contains(&ScheduleKind::Nexus) {
            bail!("--prefill-sms needs --schedule nexus");
        }
        if !self.prefill_tokens.is_empty() && !self.schedule.contains(&ScheduleKind::Nexus) {
            bail!("--prefill-tokens needs --schedule nexus")
        }
        // Checked here, before any model loads, rather than when the engine builds the scheduler.
        if let Some(bad) = self.prefill_sms.iter().find(|&&n| n == 0 || n >= sm_count) {
            bail!(
                "--prefill-sms {bad}: give prefill 1 to {} SMs (this device has {sm_count}; decode gets the rest)",
                sm_count.saturating_sub(1)
            );
        }
        out.dedup();
        Ok(out)
    }

    /// The prefill iteration limits of the nexus schedules: each `--prefill-tokens`, or the
    /// default when none is given.
    fn prefill_token_limits(&self) -> Vec<Option<PrefillTokens>> {
        match self.prefill_tokens.as_slice() {
            [] => vec![None],
            limits => limits.iter().map(|&n| Some(n)).collect(),
        }
    }

    /// The one schedule `--schedule` names (serving runs one).
    fn schedule(&self, device: &str, sm_count: u32, model: &str, hub: &HubArgs) -> anyhow::Result<Schedule> {
        match self.schedules(device, sm_count, model, hub)?.as_slice() {
            [one] => Ok(one.clone()),
            _ => bail!(
                "give one --schedule (and at most one --prefill-sms, --decode-target-ms or --prefill-tokens) to serve"
            ),
        }
    }

    /// The controller's settings with the decode target `target` for prefill iterations of at
    /// most `prefill_tokens`, checked for a device of `sm_count` SMs. A backlog, for the target's
    /// looser half, is --backlog-tokens prompt tokens waiting, else as many as make prefill
    /// iterations longer (`prefill_tokens`' backlog limit), else as many as one iteration takes.
    fn controller(
        &self,
        sm_count: u32,
        target: Option<DecodeTargetMs>,
        prefill_tokens: Option<PrefillTokens>,
    ) -> anyhow::Result<ControllerConfig> {
        let backlog_tokens =
            self.backlog_tokens.or(prefill_tokens.and_then(|t| t.backlog)).unwrap_or(self.max_num_batched_tokens);
        let backlog_target =
            target.and_then(|t| t.backlog_ms).map(|ms| BacklogTarget { tokens: backlog_tokens, decode_s: ms / 1e3 });
        let controller = ControllerConfig {
            kv_threshold: self.kv_threshold,
            decode_slack: self.decode_slack,
            prefill_slack: self.prefill_slack,
            grid: self.split_grid,
            hysteresis: self.split_hysteresis,
            decode_target_s: target.map(|t| t.ms / 1e3),
            backlog_target,
            max_decode_share: self.max_decode_share,
            calibrate: !self.no_calibration,
        };
        controller.validate(sm_count)?;
        Ok(controller)
    }

    /// The cost model of the profile of `model` (as `hub` picks it) on `device`: --profile, else
    /// the one --simulate simulates, else the one `nexus profile` saved.
    fn cost_model(&self, device: &str, model: &str, hub: &HubArgs) -> anyhow::Result<CostModel> {
        let name = hub.qualified(model);
        let path = match (&self.profile, &self.simulate) {
            (Some(path), _) | (None, Some(path)) => path.clone(),
            (None, None) => SavedProfile::default_path(device, &name)
                .context("no cache folder to find the profile in (set NEXUS_CACHE_DIR, XDG_CACHE_HOME or HOME)")?,
        };
        // A simulated device runs the kernels its profile measured, whatever this build's are.
        let kernels = if self.simulate.is_some() { KernelsCheck::Any } else { KernelsCheck::This };
        let saved = SavedProfile::load(&path, device, &name, kernels).with_context(|| {
            format!(
                "--schedule nexus splits the SMs from a profile of {name} on {device}, and there is none usable at \
                 {}: make one with `nexus profile {}` (or give a fixed --prefill-sms)",
                path.display(),
                hub.flags(model)
            )
        })?;
        Ok(saved.cost_model)
    }

    /// Runs `job` for `model` (as `hub` picks it) on the backend `--device` picks, or on the
    /// device `--simulate` gives, with the matching KV-cache sizing.
    fn run<J: OnBackend>(&self, job: J, model: &str, hub: &HubArgs) -> anyhow::Result<()> {
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            bail!("--gpu-memory-utilization must be in (0, 1]");
        }
        let Some(path) = &self.simulate else {
            let gpu = KvSizing::GpuMemory(self.gpu_memory_utilization);
            return self.device.run(job, KvSizing::Blocks(self.cpu_kv_blocks), gpu);
        };
        if !(self.simulated_memory_gib.is_finite() && self.simulated_memory_gib > 0.0) {
            bail!("--simulated-memory-gib must be a positive number");
        }
        let name = hub.qualified(model);
        let saved = SavedProfile::read(path)?;
        if saved.model != name {
            bail!("--simulate {} is a profile of {}, not of {name}", path.display(), saved.model);
        }
        let launch = self.simulated_launch_ms.iter().map(|ms| Duration::try_from_secs_f64(ms / 1e3).ok());
        let [Some(prefill), Some(decode)] = launch.collect::<Vec<_>>()[..] else {
            bail!("--simulated-launch-ms takes two numbers of milliseconds, at least 0: PREFILL,DECODE");
        };
        let [prefill_beside, decode_beside] = self.simulated_beside[..] else {
            bail!("--simulated-beside takes two factors: PREFILL,DECODE");
        };
        let simulation = Simulation {
            prefill_launch: prefill,
            decode_launch: decode,
            prefill_beside,
            decode_beside,
            resize_in_flight: self.simulated_resize,
            time: if self.simulated_virtual_time { SimulatedTime::Virtual } else { SimulatedTime::Host },
        };
        let backend = SimulatedBackend::new(saved.cost_model, &saved.device, simulation)?;
        eprintln!(
            "simulating {} ({} SMs) from {}: no computation, each iteration takes what the profile predicts",
            saved.device,
            backend.sm_count(),
            path.display()
        );
        let bytes = self.gpu_memory_utilization * self.simulated_memory_gib * (1u64 << 30) as f64;
        job.run(backend, KvSizing::Simulated(bytes))
    }
}

/// Work that runs on whichever backend `--device` picks.
trait OnBackend {
    fn run<B: Backend + 'static>(self, backend: B, sizing: KvSizing) -> anyhow::Result<()>
    where
        Engine<B>: Send;
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    /// GPU 0, with the CUDA kernels (bf16).
    Cuda,
    /// The plain-Rust reference backend (f32).
    Cpu,
}

#[derive(Args, Debug)]
struct GenerateArgs {
    /// A GGUF file, a Hugging Face model folder (config.json, *.safetensors, tokenizer.json), or a
    /// repo in the local Hugging Face cache (org/name; see --revision).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    #[command(flatten)]
    hub: HubArgs,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// A system message for --chat (the template's default is used otherwise).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// The most tokens to generate; with the prompt, at most the model's context.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample only from the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample only from the most likely tokens that make up this much probability.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Seed of the sampler, for reproducible sampling.
    #[arg(long)]
    seed: Option<u64>,
    /// Subtracted from the logit of every token already generated, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    presence_penalty: f32,
    /// Subtracted from a token's logit once per time it was generated, in [-2, 2].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    frequency_penalty: f32,
    /// Divides the positive logits (multiplies the negative ones) of tokens of the prompt or
    /// the output, in (0, 2]; above 1 discourages repeats.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    #[command(flatten)]
    device: DeviceArgs,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => generate(args),
        Command::Serve(args) => serve_command(args),
        Command::Bench(args) => bench::run(args),
        Command::Profile(args) => profile::run(args),
    }
}

fn serve_command(args: ServeArgs) -> anyhow::Result<()> {
    args.http()?;
    if args.engine.simulated_virtual_time {
        bail!("--simulated-virtual-time is for `nexus bench`: a server answers its clients in real time");
    }
    args.engine.run(ServeJob(&args), &args.model, &args.hub)
}

struct ServeJob<'a>(&'a ServeArgs);

impl OnBackend for ServeJob<'_> {
    fn run<B: Backend + 'static>(self, backend: B, sizing: KvSizing) -> anyhow::Result<()>
    where
        Engine<B>: Send,
    {
        serve_with(backend, self.0, sizing)
    }
}

/// Loads the model `--model` names (with `hub`'s flags): a GGUF file or a Hugging Face folder
/// (with its tokenizer), at a path or in the local Hugging Face cache, or `synthetic:<name>`,
/// random weights of a published config without a tokenizer.
fn load_model<B: Backend>(
    backend: &B,
    spec: &str,
    hub: &HubArgs,
) -> anyhow::Result<(LlamaModel<B>, Option<Tokenizer>)> {
    match spec.strip_prefix("synthetic:") {
        Some(_) if hub.revision.is_some() || hub.gguf_file.is_some() => {
            bail!("--revision and --gguf-file pick a model in the Hugging Face cache, not {spec}")
        }
        Some(name) => Ok((LlamaModel::random(backend, &synthetic::config(name)?, 1)?, None)),
        None => {
            let path = hub.locate(spec)?;
            let loaded = loader::open(&path).with_context(|| format!("cannot load the model at {}", path.display()))?;
            let model = LlamaModel::load(backend, loaded.weights.as_ref(), |_, _| {})?;
            Ok((model, Some(loaded.tokenizer)))
        }
    }
}

/// An engine over `model` with a KV cache sized by `sizing`, running `schedule`.
fn make_engine<B: Backend>(
    backend: B,
    model: LlamaModel<B>,
    eos: Vec<u32>,
    sizing: KvSizing,
    args: &EngineArgs,
    schedule: Schedule,
) -> anyhow::Result<Engine<B>> {
    let c = model.config().clone();
    let block_size = DEFAULT_BLOCK_SIZE;
    let num_blocks = sizing.num_blocks(&c, block_size, "give fewer --cpu-kv-blocks")?;
    if num_blocks == 0 {
        bail!("no room for the KV cache");
    }
    let config = EngineConfig {
        num_blocks,
        block_size,
        scheduler: args.scheduler(),
        max_model_len: args.max_model_len,
        schedule,
    };
    let gpu_free = || nexus_runtime::kernels::cudarc::driver::result::mem_get_info().ok().map(|(free, _)| free);
    let (start, free_before) = (Instant::now(), matches!(sizing, KvSizing::GpuMemory(_)).then(gpu_free).flatten());
    let engine = Engine::new(backend, model, eos, config)?;
    eprintln!(
        "KV cache: {num_blocks} blocks of {block_size} tokens; requests of up to {} tokens",
        engine.max_request_tokens()
    );
    // The engine allocates the cache (and its padding block) and records the decode graphs: say
    // what the graphs took besides the cache.
    if let (Some(before), Some(after)) = (free_before, free_before.and_then(|_| gpu_free())) {
        let gib = |bytes: f64| bytes / (1u64 << 30) as f64;
        let cache = (num_blocks + 1) as f64 * gpu_bytes_per_block(&c, block_size);
        eprintln!(
            "engine ready in {:.1} s: KV cache {:.2} GiB, decode graphs and other engine memory {:.2} GiB",
            start.elapsed().as_secs_f64(),
            gib(cache),
            gib((before.saturating_sub(after) as f64 - cache).max(0.0))
        );
    }
    Ok(engine)
}

/// How many KV blocks to allocate, and where.
enum KvSizing {
    /// This many in host memory (the CPU backend), where they must fit in the memory available.
    Blocks(usize),
    /// This many on the GPU, whose allocator reports a cache that does not fit as an error.
    GpuBlocks(usize),
    /// Whatever the GPU has free after the weights, down to `1 - fraction` of its memory.
    GpuMemory(f64),
    /// What this many bytes of a simulated GPU hold besides the bf16 weights.
    Simulated(f64),
}

impl KvSizing {
    /// The number of blocks of `block_size` tokens to allocate for `c`'s model. A host cache the
    /// memory available cannot hold is refused before anything is allocated (the allocation
    /// would abort the process, or the kernel kill it), with `hint` saying what to change.
    fn num_blocks(&self, c: &ModelConfig, block_size: usize, hint: &str) -> anyhow::Result<usize> {
        match *self {
            KvSizing::Blocks(n) => {
                check_host_kv_cache(c, n, block_size).with_context(|| format!("the KV cache does not fit: {hint}"))?;
                Ok(n)
            }
            KvSizing::GpuBlocks(n) => Ok(n),
            KvSizing::GpuMemory(fraction) => {
                let (free, total) = nexus_runtime::kernels::cudarc::driver::result::mem_get_info()?;
                let keep = (1.0 - fraction) * total as f64;
                Ok(((free as f64 - keep).max(0.0) / gpu_bytes_per_block(c, block_size)) as usize)
            }
            KvSizing::Simulated(bytes) => {
                let weights = 2.0 * c.num_parameters() as f64;
                Ok(((bytes - weights).max(0.0) / gpu_bytes_per_block(c, block_size)) as usize)
            }
        }
    }
}

/// The bytes of one KV block on the GPU: bf16 K and V of every layer.
fn gpu_bytes_per_block(c: &ModelConfig, block_size: usize) -> f64 {
    (c.num_layers * 2 * block_size * c.num_kv_heads * c.head_dim * 2) as f64
}

/// Refuses a host KV cache of `num_blocks` blocks of `block_size` tokens, and the padding block,
/// for `c`'s model (f32 K and V of every layer) that block ids or the memory available cannot
/// hold. The sizes are the user's, so the arithmetic is checked.
fn check_host_kv_cache(c: &ModelConfig, num_blocks: usize, block_size: usize) -> anyhow::Result<()> {
    if num_blocks >= u32::MAX as usize {
        bail!("{num_blocks} blocks: block ids are 32-bit, so at most {} blocks", u32::MAX - 1);
    }
    let factors = [c.num_layers, 2, block_size, c.num_kv_heads, c.head_dim, size_of::<f32>()];
    let per_block = factors.iter().try_fold(1u64, |acc, &x| acc.checked_mul(x as u64));
    let Some((per_block, bytes)) = per_block.and_then(|b| Some((b, b.checked_mul(num_blocks as u64 + 1)?))) else {
        bail!("{num_blocks} blocks of {block_size} tokens take more than 2^64 bytes");
    };
    // Where the system does not say (not Linux), the allocation itself is the only check.
    let Some(available) = available_memory() else { return Ok(()) };
    if bytes > available {
        bail!(
            "{num_blocks} blocks of {block_size} tokens (and a padding block) take {} ({} a block: f32 keys and \
             values of {} layers), but the system has {} of memory available",
            human_bytes(bytes),
            human_bytes(per_block),
            c.num_layers,
            human_bytes(available)
        );
    }
    Ok(())
}

/// The memory the system can give new allocations without swapping (Linux's `MemAvailable`), or
/// `None` where `/proc/meminfo` does not say.
fn available_memory() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = meminfo.lines().find_map(|line| line.strip_prefix("MemAvailable:"))?.trim().strip_suffix("kB")?;
    kib.trim().parse::<u64>().ok()?.checked_mul(1024)
}

/// `bytes` in GiB, MiB or KiB, for messages.
fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    match bytes {
        0..0x10_0000 => format!("{:.1} KiB", b / 1024.0),
        0x10_0000..0x4000_0000 => format!("{:.1} MiB", b / (1u64 << 20) as f64),
        _ => format!("{:.1} GiB", b / (1u64 << 30) as f64),
    }
}

fn serve_with<B: Backend + 'static>(backend: B, args: &ServeArgs, sizing: KvSizing) -> anyhow::Result<()>
where
    Engine<B>: Send,
{
    // Checked before the model loads, so that a bad --schedule or --prefill-sms fails at once.
    let schedule = args.engine.schedule(&backend.device_name(), backend.sm_count(), &args.model, &args.hub)?;
    let (model, tokenizer) = load_model(&backend, &args.model, &args.hub)?;
    let eos = tokenizer.as_ref().map_or_else(Vec::new, |t| t.eos_token_ids().to_vec());
    let vocab_size = model.config().vocab_size;
    let engine = make_engine(backend, model, eos, sizing, &args.engine, schedule)?;
    let max_context = engine.max_request_tokens();
    // A path is served by its file or folder name, a repo of the cache by its id, as vLLM does.
    let model_name = args.served_model_name.clone().unwrap_or_else(|| {
        let path = Path::new(&args.model);
        match path.file_name() {
            Some(name) if path.exists() => name.to_string_lossy().into_owned(),
            _ => args.model.clone(),
        }
    });
    let (limits, shutdown_grace) = args.http()?;
    let config = serve::ServerConfig {
        model_name,
        api_key: args.api_key.clone(),
        max_context,
        vocab_size,
        limits,
        shutdown_grace,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
        serve::serve(engine, tokenizer, config, listener).await
    })
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let penalties = Penalties {
        presence: args.presence_penalty,
        frequency: args.frequency_penalty,
        repetition: args.repetition_penalty,
    };
    let sampling = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
        penalties,
        ..SamplingParams::default()
    };
    sampling.validate()?;

    let path = args.hub.locate(&args.model)?;
    let loaded = loader::open(&path).with_context(|| format!("cannot load the model at {}", path.display()))?;
    let tokenizer = &loaded.tokenizer;
    let prompt_text = if args.chat {
        let template = tokenizer.chat_template().context("the model has no chat template; drop --chat")?;
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new("system", system));
        }
        messages.push(ChatMessage::new("user", &args.prompt));
        template.render(&messages, true)?
    } else {
        args.prompt.clone()
    };
    // A chat template writes its special tokens itself.
    let prompt = tokenizer.encode(&prompt_text, !args.chat)?;
    if prompt.is_empty() {
        bail!("the prompt is empty after tokenization");
    }

    // Refused as the server refuses it, before the weights load: the request must fit in the
    // model's context, with sums of the user's numbers checked.
    let context = loaded.weights.config().max_position_embeddings;
    if args.max_tokens == 0 {
        bail!("--max-tokens must be at least 1");
    }
    if prompt.len() >= context {
        bail!("the prompt has {} tokens; the model's context is {context}", prompt.len());
    }
    let Some(total) = prompt.len().checked_add(args.max_tokens).filter(|&total| total <= context) else {
        bail!(
            "the prompt has {} tokens and --max-tokens asks for {} more, but the model's context is {context} \
             (give --max-tokens {} or less)",
            prompt.len(),
            args.max_tokens,
            context - prompt.len()
        );
    };

    // A single request sizes its own cache: one that holds it.
    let num_blocks = total.div_ceil(DEFAULT_BLOCK_SIZE);
    let job = GenerateJob { args: &args, loaded: &loaded, prompt: &prompt, sampling };
    args.device.run(job, KvSizing::Blocks(num_blocks), KvSizing::GpuBlocks(num_blocks))
}

struct GenerateJob<'a> {
    args: &'a GenerateArgs,
    loaded: &'a LoadedModel,
    prompt: &'a [u32],
    sampling: SamplingParams,
}

impl OnBackend for GenerateJob<'_> {
    fn run<B: Backend + 'static>(self, backend: B, sizing: KvSizing) -> anyhow::Result<()>
    where
        Engine<B>: Send,
    {
        run_generate(backend, self.args, self.loaded, self.prompt, self.sampling, sizing)
    }
}

fn run_generate<B: Backend>(
    backend: B,
    args: &GenerateArgs,
    loaded: &LoadedModel,
    prompt: &[u32],
    sampling: SamplingParams,
    sizing: KvSizing,
) -> anyhow::Result<()> {
    let tokenizer = &loaded.tokenizer;
    // Checked before the weights take their memory.
    let num_blocks = sizing.num_blocks(loaded.weights.config(), DEFAULT_BLOCK_SIZE, "ask for fewer --max-tokens")?;
    let load_start = Instant::now();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} ({elapsed})").context("progress bar style")?,
    );
    bar.set_message("loading weights");
    let model = LlamaModel::load(&backend, loaded.weights.as_ref(), |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let config = model.config().clone();
    eprintln!(
        "loaded {} ({} layers, hidden {}, {}/{} heads) in {:.1} s",
        args.model,
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        load_start.elapsed().as_secs_f64()
    );
    // One request: a cache that holds it, and one iteration of the whole prompt (up to 8192).
    let engine_config = EngineConfig {
        num_blocks,
        block_size: DEFAULT_BLOCK_SIZE,
        scheduler: SchedulerConfig { max_num_seqs: 1, ..SchedulerConfig::default() },
        max_model_len: None,
        schedule: Schedule::Chunked,
    };
    let mut engine = Engine::new(backend, model, tokenizer.eos_token_ids().to_vec(), engine_config)?;
    let request = RequestOptions {
        max_tokens: args.max_tokens,
        sampling,
        ignore_eos: args.ignore_eos,
        ..RequestOptions::default()
    };
    let options = GenerateOptions { request, stop: args.stop.clone() };
    let mut stdout = std::io::stdout().lock();
    if !args.chat {
        write!(stdout, "{}", args.prompt)?;
    }
    let mut write_error = None;
    let g = generate_text(&mut engine, 0, tokenizer, prompt, &options, |piece| {
        if write_error.is_none() {
            write_error = write!(stdout, "{piece}").and_then(|()| stdout.flush()).err();
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("writing to stdout");
    }
    writeln!(stdout)?;
    let decoded = g.token_ids.len().saturating_sub(1);
    eprintln!(
        "prompt: {} tokens in {:.2} s ({:.1} tok/s); generated {} tokens, {:.1} tok/s after the first ({:?})",
        prompt.len(),
        g.prefill_time.as_secs_f64(),
        prompt.len() as f64 / g.prefill_time.as_secs_f64(),
        g.token_ids.len(),
        decoded as f64 / g.decode_time.as_secs_f64().max(1e-9),
        g.finish_reason,
    );
    Ok(())
}
