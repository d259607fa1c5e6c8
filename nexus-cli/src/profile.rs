//! `nexus profile`: measures a model's operators on this device against the CTA budget, fits the
//! cost model the Nexus controller splits the SMs with, reports its prediction error, and saves
//! it under the cache folder, where `nexus serve` and `nexus bench --schedule nexus` find it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use nexus_runtime::engine::Engine;
use nexus_runtime::engine::cost_model::IterationWork;
use nexus_runtime::engine::profile::{Profile, ProfileConfig, SavedMeasurements, SavedProfile, fit, measure};
use nexus_runtime::engine::scheduler::controller::{Controller, ControllerConfig};
use nexus_runtime::model::backend::{Backend, StepKind};
use nexus_runtime::weights::loader::DEFAULT_MODEL;

use crate::{DeviceArgs, HubArgs, KvSizing, OnBackend, load_model};

#[derive(Args, Debug)]
pub struct ProfileArgs {
    /// A GGUF file, a Hugging Face model folder, a repo in the local Hugging Face cache (org/name;
    /// see --revision), or `synthetic:<name>` (random weights of a published config:
    /// llama-3.1-8b, qwen2.5-3b, qwen2.5-14b).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    #[command(flatten)]
    hub: HubArgs,
    /// Budgets are measured on a grid of this many SMs (and all SMs); the controller moves decode
    /// budgets on it.
    #[arg(long, default_value_t = 8)]
    grid: u32,
    /// Fewer shapes and repeats: a rough profile in a fraction of the time.
    #[arg(long)]
    quick: bool,
    /// Shrinks every measured shape to at most this many tokens of context (for a small model, or
    /// a slow device such as the CPU).
    #[arg(long)]
    max_shape_tokens: Option<usize>,
    /// Where to save the profile (default: where `serve` and `bench` look for it, printed).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also write every measurement here as JSON: each timed operator, and each whole step
    /// (alone, or next to the other lane's iterations), to study them or fit them again.
    #[arg(long)]
    samples: Option<PathBuf>,
    /// Measure nothing: fit the cost model to the measurements that --samples saved in this file
    /// (on any machine; the profile is made for the device, model and kernels they were made on).
    #[arg(long, conflicts_with_all = ["samples", "quick", "max_shape_tokens"])]
    refit: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArgs,
}

pub fn run(args: ProfileArgs) -> anyhow::Result<()> {
    if args.grid == 0 {
        anyhow::bail!("--grid must be at least 1 SM");
    }
    if let Some(file) = &args.refit {
        let measured = SavedMeasurements::load(file)?;
        if measured.model != args.hub.qualified(&args.model) && args.model != DEFAULT_MODEL {
            anyhow::bail!("{} holds measurements of {}, not {}", file.display(), measured.model, args.model);
        }
        let path = profile_path(&args, &measured.device, &measured.model)?;
        let fitted = fit(&measured.measurements)?;
        return report(&measured, &fitted, &path, None);
    }
    args.device.run(ProfileJob(&args), KvSizing::Blocks(0), KvSizing::Blocks(0))
}

/// Where the profile goes: --out, else where `serve` and `bench` look for the profile of `model`
/// on `device`.
fn profile_path(args: &ProfileArgs, device: &str, model: &str) -> anyhow::Result<PathBuf> {
    match &args.out {
        Some(path) => Ok(path.clone()),
        None => SavedProfile::default_path(device, model)
            .context("no cache folder (set NEXUS_CACHE_DIR, XDG_CACHE_HOME or HOME), or give --out"),
    }
}

struct ProfileJob<'a>(&'a ProfileArgs);

impl OnBackend for ProfileJob<'_> {
    fn run<B: Backend + 'static>(self, backend: B, _: KvSizing) -> anyhow::Result<()>
    where
        Engine<B>: Send,
    {
        run_on(backend, self.0)
    }
}

fn run_on<B: Backend>(backend: B, args: &ProfileArgs) -> anyhow::Result<()> {
    let device = backend.device_name();
    // Saved under the name `serve` and `bench` look it up by: the model with its revision and file.
    let key = args.hub.qualified(&args.model);
    let path = profile_path(args, &device, &key)?;
    let (model, _) = load_model(&backend, &args.model, &args.hub)?;
    let sms = backend.sm_count();
    if 2 * args.grid > sms {
        anyhow::bail!("--grid {} leaves no split of the device's {sms} SMs", args.grid);
    }
    let mut config = ProfileConfig::for_device(sms, args.grid);
    if args.quick {
        config.prefill = vec![(512, 0), (2048, 0), (1024, 2048)];
        config.decode = vec![(8, 1024), (32, 2048)];
        // One split, decode on about half the SMs.
        config.splits = vec![config.splits[config.splits.len() / 2]];
        config.repeats = 1;
    }
    let context = model.config().max_position_embeddings;
    let config = config.fitted_to(args.max_shape_tokens.map_or(context, |n| n.clamp(2, context)));
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("profiling {msg} [{bar:40}] {pos}/{len} ({elapsed})")
            .context("progress bar style")?,
    );
    bar.set_message(format!("{key} on {device}"));
    let start = Instant::now();
    let measured = measure(&backend, &model, &config, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    });
    bar.finish_and_clear();
    let measured = SavedMeasurements::new(measured?, &device, &key);
    let measuring_s = start.elapsed().as_secs_f64();
    if let Some(out) = &args.samples {
        measured.save(out)?;
        println!("measurements in {}", out.display());
    }
    let fitted = fit(&measured.measurements)?;
    report(&measured, &fitted, &path, Some((measuring_s, start.elapsed().as_secs_f64() - measuring_s)))
}

/// Saves the profile fitted to `measured` at `path` and prints it, with the seconds measuring and
/// fitting took when they were just done.
fn report(measured: &SavedMeasurements, fitted: &Profile, path: &Path, took: Option<(f64, f64)>) -> anyhow::Result<()> {
    SavedProfile::new(fitted, measured).save(path)?;
    let cost = &fitted.cost;
    let m = &measured.measurements;
    print!(
        "{} on {}: {} operator launches and {} whole steps timed",
        measured.model,
        measured.device,
        m.ops.len(),
        m.steps.len()
    );
    match took {
        Some((measuring, fitting)) => println!(" in {measuring:.0} s, fitted in {fitting:.1} s"),
        None => println!(" (measured before; fitted again here)"),
    }
    println!("| operator | TFLOP/s per SM | saturation (SMs) | decay | share of the streaming read | launch (us) |");
    println!("| --- | --- | --- | --- | --- | --- |");
    for (name, curve) in [
        ("GEMM", cost.gemm),
        ("prefill attention", cost.prefill_attention),
        ("decode attention", cost.decode_attention),
    ] {
        println!(
            "| {name} | {:.2} | {:.0} | {:.2} | {:.3} | {:.1} |",
            curve.flops_per_sm / 1e12,
            curve.saturation,
            curve.decay,
            curve.bandwidth_fraction,
            curve.launch_s * 1e6
        );
    }
    println!(
        "| the rest (elementwise) | - | - | - | {:.3} | {:.1} |",
        cost.rest.bandwidth_fraction,
        cost.rest.launch_s * 1e6
    );
    println!(
        "fixed cost per iteration: prefill {:.2} ms, decode {:.2} ms",
        cost.prefill_overhead_s * 1e3,
        cost.decode_overhead_s * 1e3
    );
    let fusions = cost.decode_fusions;
    println!(
        "decode steps priced with their norms inside the GEMMs up to {} rows, RoPE {} the attention kernel",
        fusions.norm_rows,
        if fusions.rope { "inside" } else { "outside" }
    );
    let beside = &cost.decode_beside;
    let classes = [("GEMMs", &beside.gemm), ("attention", &beside.attention), ("the rest", &beside.rest)];
    // The decode contention prices only the decode classes without factors of their own.
    let unfactored: Vec<&str> =
        classes.iter().filter(|(_, factors)| factors.is_empty()).map(|&(class, _)| class).collect();
    let mut contentions = vec![("prefill next to decode".to_string(), cost.prefill_contention)];
    if !unfactored.is_empty() {
        contentions.insert(0, (format!("decode next to prefill ({})", unfactored.join(", ")), cost.decode_contention));
    }
    for (kind, c) in contentions {
        println!(
            "contention, {kind}: compute x{:.2}, HBM traffic {:.1}x the other lane's counted bytes",
            c.compute, c.bandwidth_weight
        );
    }
    let table = |scale: &[(u32, f64)]| -> String {
        scale.iter().map(|(sms, factor)| format!("{sms}: {factor:.2}")).collect::<Vec<_>>().join(", ")
    };
    if unfactored.len() == classes.len() {
        println!("decode launches beside a prefill: none timed (priced by the decode contention)");
    } else {
        let factors: Vec<String> =
            classes.iter().map(|(class, factors)| format!("{class} {}", table(factors))).collect();
        println!(
            "decode launches beside a prefill against alone, by decode SMs (from {} launches): {}",
            m.beside_ops.iter().filter(|b| !b.held_out).count(),
            factors.join("; ")
        );
    }
    for (kind, scale, beside) in [
        ("prefill", &cost.prefill_scale, &cost.prefill_beside_scale),
        ("decode", &cost.decode_scale, &cost.decode_beside_scale),
    ] {
        println!(
            "{kind} steps against their operators, by SMs: alone {}; beside the other lane {}",
            table(scale),
            table(beside)
        );
    }
    // What a decode target costs prefill, for `nexus serve --decode-target-ms`: the controller's
    // split for a 2048-token prompt beside 16 decodes of 2048 tokens.
    let prefill = IterationWork::of(StepKind::Prefill, [(2048, 0)]);
    let decode = IterationWork::of(StepKind::Decode, (0..16).map(|_| (1, 2048)));
    let alone = cost.seconds(&prefill, cost.sm_count, None);
    let mut choices = Vec::new();
    for ms in [10.0, 15.0, 20.0, 30.0, 40.0, 60.0] {
        let config = ControllerConfig { decode_target_s: Some(ms / 1e3), ..ControllerConfig::default() };
        let split = Controller::new(cost.clone(), config)?.split(&prefill, &decode, 0.0, 0);
        choices.push(format!(
            "{ms:.0} ms: decode {} SMs ({:.1} ms), prefill {:.2}x",
            split.decode_sms,
            split.decode_s * 1e3,
            split.prefill_s / alone
        ));
    }
    println!(
        "decode targets, for a 2048-token prompt beside 16 decodes of 2048 tokens (prefill's time against alone on every SM): {}",
        choices.join("; ")
    );
    let slowdown: Vec<String> =
        fitted.decode_slowdown.iter().map(|(sms, ratio)| format!("{ratio:.2}x on {sms} SMs")).collect();
    if !slowdown.is_empty() {
        println!("a decode step beside a prefill, against alone on as many SMs (median): {}", slowdown.join(", "));
    }
    let kept: Vec<String> = fitted
        .attention_bandwidth_beside
        .iter()
        .map(|(sms, kept)| format!("{:.0}% on {sms} SMs", 100.0 * kept))
        .collect();
    if !kept.is_empty() {
        let (median, p90) = fitted.attention_beside_error;
        println!(
            "decode attention beside a prefill keeps of its bandwidth alone (median): {}; prediction error on held-out launches (median / p90) {:.1}% / {:.1}%",
            kept.join(", "),
            100.0 * median,
            100.0 * p90
        );
    }
    let (median, p90) = fitted.alone_error;
    let (both_median, both_p90) = fitted.both_error;
    println!(
        "prediction error on held-out whole steps (median / p90): alone {:.1}% / {:.1}%, both lanes at once {:.1}% / {:.1}%",
        100.0 * median,
        100.0 * p90,
        100.0 * both_median,
        100.0 * both_p90
    );
    println!("the controller chooses a split in {:.1} us", fitted.decision_s * 1e6);
    println!("saved {}", path.display());
    Ok(())
}
