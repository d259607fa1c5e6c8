//! `nexus`: generate text with a Llama-family model, serve it over an OpenAI-compatible HTTP API,
//! and benchmark serving, in-process or against any OpenAI-compatible server (profile comes later).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

mod bench;
mod serve;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nexus_runtime::engine::generate::{GenerateOptions, generate_text};
use nexus_runtime::engine::sampling::{Penalties, SamplingParams};
use nexus_runtime::engine::scheduler::{NexusConfig, SchedulerConfig};
use nexus_runtime::engine::{DEFAULT_BLOCK_SIZE, Engine, EngineConfig, RequestOptions, Schedule};
use nexus_runtime::kernels::Gpu;
use nexus_runtime::model::LlamaModel;
use nexus_runtime::model::backend::Backend;
use nexus_runtime::model::cpu::CpuBackend;
use nexus_runtime::model::cuda::{CudaBackend, CudaBackendConfig};
use nexus_runtime::text::chat_template::ChatMessage;
use nexus_runtime::text::tokenizer::Tokenizer;
use nexus_runtime::weights::loader::{self, DEFAULT_MODEL, LoadedModel};
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
    /// Replay a serving workload (Poisson arrivals) through the engine in-process, or against an
    /// OpenAI-compatible server with --url, and report TTFT, TBT, normalized latency and
    /// throughput.
    Bench(bench::BenchArgs),
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// A GGUF file, a Hugging Face model folder, or `synthetic:<name>` (random weights of a
    /// published config: llama-3.1-8b, qwen2.5-3b, qwen2.5-14b; no tokenizer, so prompts are
    /// token ids and outputs token ids).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// The name clients use for the model (default: the file or folder name, or `synthetic:<name>`).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer <key>` on every API request.
    #[arg(long)]
    api_key: Option<String>,
    #[command(flatten)]
    engine: EngineArgs,
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
                    eprintln!("no usable GPU ({e:#}); running on the CPU");
                    job.run(CpuBackend, cpu)
                }
            },
        }
    }

    /// The CUDA backend on GPU 0.
    fn cuda_backend(&self) -> anyhow::Result<CudaBackend> {
        let gpu = Gpu::new(0)?;
        eprintln!("running on {gpu:?}");
        let mut config = CudaBackendConfig { batch_invariant: self.batch_invariant, ..CudaBackendConfig::default() };
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
    /// KV-cache blocks of 16 tokens on the CPU backend.
    #[arg(long, default_value_t = 1024)]
    cpu_kv_blocks: usize,
    /// How iterations are scheduled: `chunked` (one mixed batch of decodes and prompt chunks per
    /// iteration on every SM, as vLLM) or `nexus` (prefill and decode at the same time on
    /// disjoint SMs, split by --prefill-sms). `nexus bench` takes several, comma-separated, and
    /// runs each on the same trace.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "chunked")]
    schedule: Vec<ScheduleKind>,
    /// With `--schedule nexus`: the SMs of prefill while both prefill and decode have work
    /// (decode gets the rest; a phase with no work leaves all SMs to the other). Default: half
    /// of the SMs. `nexus bench` takes several, comma-separated, and runs each.
    #[arg(long, value_delimiter = ',')]
    prefill_sms: Vec<u32>,
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

    /// Every schedule `--schedule` and `--prefill-sms` name, in order, on a device of
    /// `sm_count` SMs.
    fn schedules(&self, sm_count: u32) -> anyhow::Result<Vec<Schedule>> {
        let mut out = Vec::new();
        for kind in &self.schedule {
            match kind {
                ScheduleKind::Chunked => out.push(Schedule::Chunked),
                ScheduleKind::Nexus if self.prefill_sms.is_empty() => {
                    out.push(Schedule::Nexus(NexusConfig { prefill_sms: (sm_count / 2).max(1) }));
                }
                ScheduleKind::Nexus => {
                    out.extend(
                        self.prefill_sms.iter().map(|&prefill_sms| Schedule::Nexus(NexusConfig { prefill_sms })),
                    );
                }
            }
        }
        if !self.prefill_sms.is_empty() && !self.schedule.contains(&ScheduleKind::Nexus) {
            bail!("--prefill-sms needs --schedule nexus");
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

    /// The one schedule `--schedule` names (serving runs one).
    fn schedule(&self, sm_count: u32) -> anyhow::Result<Schedule> {
        match self.schedules(sm_count)?.as_slice() {
            [one] => Ok(*one),
            _ => bail!("give one --schedule (and one --prefill-sms) to serve"),
        }
    }

    /// Runs `job` on the backend `--device` picks, with the matching KV-cache sizing.
    fn run<J: OnBackend>(&self, job: J) -> anyhow::Result<()> {
        if !(self.gpu_memory_utilization > 0.0 && self.gpu_memory_utilization <= 1.0) {
            bail!("--gpu-memory-utilization must be in (0, 1]");
        }
        self.device.run(job, KvSizing::Blocks(self.cpu_kv_blocks), KvSizing::GpuMemory(self.gpu_memory_utilization))
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
    /// A GGUF file or a Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: PathBuf,
    /// The prompt.
    #[arg(long)]
    prompt: String,
    /// Wrap the prompt in the model's chat template as a user message.
    #[arg(long)]
    chat: bool,
    /// A system message for --chat (the template's default is used otherwise).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    /// The most tokens to generate.
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
    }
}

fn serve_command(args: ServeArgs) -> anyhow::Result<()> {
    args.engine.run(ServeJob(&args))
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

/// Loads the model `--model` names: a GGUF file or a Hugging Face folder (with its tokenizer), or
/// `synthetic:<name>`, random weights of a published config without a tokenizer.
fn load_model<B: Backend>(backend: &B, spec: &str) -> anyhow::Result<(LlamaModel<B>, Option<Tokenizer>)> {
    match spec.strip_prefix("synthetic:") {
        Some(name) => Ok((LlamaModel::random(backend, &synthetic::config(name)?, 1)?, None)),
        None => {
            let loaded = loader::open(Path::new(spec)).with_context(|| format!("cannot load the model at {spec}"))?;
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
    // bf16 K and V of every layer.
    let bytes_per_block = (c.num_layers * 2 * block_size * c.num_kv_heads * c.head_dim * 2) as f64;
    let num_blocks = match sizing {
        KvSizing::Blocks(n) => n,
        KvSizing::GpuMemory(fraction) => {
            let (free, total) = nexus_runtime::kernels::cudarc::driver::result::mem_get_info()?;
            let keep = (1.0 - fraction) * total as f64;
            ((free as f64 - keep).max(0.0) / bytes_per_block) as usize
        }
    };
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
        let cache = (num_blocks + 1) as f64 * bytes_per_block;
        eprintln!(
            "engine ready in {:.1} s: KV cache {:.2} GiB, decode graphs and other engine memory {:.2} GiB",
            start.elapsed().as_secs_f64(),
            gib(cache),
            gib((before.saturating_sub(after) as f64 - cache).max(0.0))
        );
    }
    Ok(engine)
}

/// How many KV blocks to allocate.
enum KvSizing {
    Blocks(usize),
    /// Whatever the GPU has free after the weights, down to `1 - fraction` of its memory.
    GpuMemory(f64),
}

fn serve_with<B: Backend + 'static>(backend: B, args: &ServeArgs, sizing: KvSizing) -> anyhow::Result<()>
where
    Engine<B>: Send,
{
    // Checked before the model loads, so that a bad --schedule or --prefill-sms fails at once.
    let schedule = args.engine.schedule(backend.sm_count())?;
    let (model, tokenizer) = load_model(&backend, &args.model)?;
    let eos = tokenizer.as_ref().map_or_else(Vec::new, |t| t.eos_token_ids().to_vec());
    let vocab_size = model.config().vocab_size;
    let engine = make_engine(backend, model, eos, sizing, &args.engine, schedule)?;
    let max_context = engine.max_request_tokens();
    let model_name = args.served_model_name.clone().unwrap_or_else(|| match args.model.strip_prefix("synthetic:") {
        Some(_) => args.model.clone(),
        None => Path::new(&args.model).file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
    });
    let config = serve::ServerConfig { model_name, api_key: args.api_key.clone(), max_context, vocab_size };
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
    };
    sampling.validate()?;

    let loaded =
        loader::open(&args.model).with_context(|| format!("cannot load the model at {}", args.model.display()))?;
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

    // A single request sizes its own cache.
    let job = GenerateJob { args: &args, loaded: &loaded, prompt: &prompt, sampling };
    args.device.run(job, KvSizing::Blocks(0), KvSizing::Blocks(0))
}

struct GenerateJob<'a> {
    args: &'a GenerateArgs,
    loaded: &'a LoadedModel,
    prompt: &'a [u32],
    sampling: SamplingParams,
}

impl OnBackend for GenerateJob<'_> {
    fn run<B: Backend + 'static>(self, backend: B, _: KvSizing) -> anyhow::Result<()>
    where
        Engine<B>: Send,
    {
        run_generate(backend, self.args, self.loaded, self.prompt, self.sampling)
    }
}

fn run_generate<B: Backend>(
    backend: B,
    args: &GenerateArgs,
    loaded: &LoadedModel,
    prompt: &[u32],
    sampling: SamplingParams,
) -> anyhow::Result<()> {
    let tokenizer = &loaded.tokenizer;
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
        args.model.display(),
        config.num_layers,
        config.hidden_size,
        config.num_heads,
        config.num_kv_heads,
        load_start.elapsed().as_secs_f64()
    );
    if prompt.len() >= config.max_position_embeddings {
        bail!("the prompt has {} tokens; the model's context is {}", prompt.len(), config.max_position_embeddings);
    }
    // One request: a cache that holds it, and one iteration of the whole prompt (up to 8192).
    let max_tokens = args.max_tokens.min(config.max_position_embeddings - prompt.len());
    let engine_config = EngineConfig {
        num_blocks: (prompt.len() + max_tokens).div_ceil(DEFAULT_BLOCK_SIZE),
        block_size: DEFAULT_BLOCK_SIZE,
        scheduler: SchedulerConfig { max_num_seqs: 1, ..SchedulerConfig::default() },
        max_model_len: None,
        schedule: Schedule::Chunked,
    };
    let mut engine = Engine::new(backend, model, tokenizer.eos_token_ids().to_vec(), engine_config)?;
    let request = RequestOptions { max_tokens, sampling, ignore_eos: args.ignore_eos, ..RequestOptions::default() };
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
