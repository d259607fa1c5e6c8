//! `nexus`: generate text with a Llama-family model (and, later, serve, bench and profile).

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use nexus_runtime::backend::{Backend, CpuBackend};
use nexus_runtime::chat_template::ChatMessage;
use nexus_runtime::cuda_backend::CudaBackend;
use nexus_runtime::generate::{DEFAULT_BLOCK_SIZE, GenerateOptions, Generator, generate_text};
use nexus_runtime::kernels::{CtaBudget, Gpu, PhaseContext};
use nexus_runtime::loader::{self, DEFAULT_MODEL, LoadedModel};
use nexus_runtime::model::LlamaModel;
use nexus_runtime::sampling::SamplingParams;

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
    /// Stop when the output contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating after the end-of-sequence token.
    #[arg(long)]
    ignore_eos: bool,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Generate(args) => generate(args),
    }
}

fn generate(args: GenerateArgs) -> anyhow::Result<()> {
    let sampling =
        SamplingParams { temperature: args.temperature, top_k: args.top_k, top_p: args.top_p, seed: args.seed };
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

    match args.device {
        Device::Cpu => run_generate(CpuBackend, &args, &loaded, &prompt, sampling),
        Device::Cuda => run_generate(cuda_backend()?, &args, &loaded, &prompt, sampling),
        Device::Auto => match cuda_backend() {
            Ok(backend) => run_generate(backend, &args, &loaded, &prompt, sampling),
            Err(e) => {
                eprintln!("no usable GPU ({e:#}); running on the CPU");
                run_generate(CpuBackend, &args, &loaded, &prompt, sampling)
            }
        },
    }
}

/// The CUDA backend on GPU 0 with all of its SMs.
fn cuda_backend() -> anyhow::Result<CudaBackend> {
    let gpu = Gpu::new(0)?;
    let ctx = PhaseContext::new(gpu.clone(), gpu.new_stream()?, CtaBudget::all(&gpu));
    eprintln!("running on {gpu:?}");
    Ok(CudaBackend::new(ctx)?)
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
    let max_context = prompt.len() + args.max_tokens;
    if prompt.len() >= config.max_position_embeddings {
        bail!("the prompt has {} tokens; the model's context is {}", prompt.len(), config.max_position_embeddings);
    }
    let mut generator = Generator::new(backend, model, max_context, DEFAULT_BLOCK_SIZE)?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling,
        stop: args.stop.clone(),
        ignore_eos: args.ignore_eos,
        ..GenerateOptions::default()
    };
    let mut stdout = std::io::stdout().lock();
    if !args.chat {
        write!(stdout, "{}", args.prompt)?;
    }
    let mut write_error = None;
    let out = generate_text(&mut generator, tokenizer, prompt, &options, |piece| {
        if write_error.is_none() {
            write_error = write!(stdout, "{piece}").and_then(|()| stdout.flush()).err();
        }
    })?;
    if let Some(e) = write_error {
        return Err(e).context("writing to stdout");
    }
    writeln!(stdout)?;
    let g = &out.generation;
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
