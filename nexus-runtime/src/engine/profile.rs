//! Profiling a model on a device for the Nexus controller (`nexus profile`): every operator of
//! forward steps timed against the CTA budget, the cost model fitted to those times, and its
//! prediction error on whole steps it was not fitted to, alone and with both lanes running.
//!
//! Steps: prefill chunks (tokens × cached prefix) and decode batches (sequences × context), each
//! at every budget of the grid, run in a phase whose operators are timed
//! ([`Backend::time_ops`]); each shape's step is built once and run again and again (it writes
//! the same keys and values at the same slots every time). Each operator class's curve is fitted
//! ([`fit_op_curve`]): compute against SMs, the share of the device's streaming-read curve
//! ([`Backend::bandwidth_curve`]) its kernels reach, and a time per launch. Whole steps, timed
//! without the operator timing, give each kind's fixed cost and its scale per budget (half of
//! them: [`CostModel::fit_step_scales`]) and the prediction error (the other half, repeats of
//! the same shapes). Then prefill and decode run at once on two phases at several splits, as the
//! engine runs them: one prefill step, and decode steps back to back while it runs. Half of these
//! pairs fit what each lane does to the other ([`CostModel::fit_contention`], then what it leaves
//! per budget: [`CostModel::fit_beside_scales`]), the other half give the prediction error with
//! both lanes running. In each pair, one decode step more has its operators timed while the
//! prefill runs: its launches fit what a prefill does to each class of decode operator
//! ([`CostModel::fit_decode_beside`]), among them decode attention's bandwidth.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::engine::batch::{SeqChunk, build_step};
use crate::engine::cost_model::{
    CostModel, IterationWork, ModelShape, Op, OpCurve, Sample, fit_op_curve, relative_errors,
};
use crate::engine::kv_cache::BlockManager;
use crate::engine::scheduler::controller::{Controller, ControllerConfig};
use crate::model::backend::{Backend, DecodeFusions, LogitsReadback, OpTime, StepInput, StepKind};
use crate::model::{KvCache, LlamaModel};
use crate::{Error, Result};

/// What to measure.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileConfig {
    /// Budgets each shape runs at (ascending; the last is every SM).
    pub budgets: Vec<u32>,
    /// Prefill chunks: `(new tokens, cached tokens before them)`.
    pub prefill: Vec<(usize, usize)>,
    /// Decode batches: `(sequences, cached tokens of each)`.
    pub decode: Vec<(usize, usize)>,
    /// Decode budgets of the runs of both lanes at once (prefill gets the rest).
    pub splits: Vec<u32>,
    /// Whole-step runs of each shape and budget (at least two: alternately fitted and held out),
    /// after one run whose operators are timed; and runs of each combination of both lanes.
    pub repeats: usize,
    /// Tokens per KV block.
    pub block_size: usize,
}

impl ProfileConfig {
    /// Shapes like the paper's workloads' (prompts of 0.5k-8k tokens, chunks over a cached
    /// prefix, decode batches of 1-64 over 1k-4k tokens), on budgets of a grid of `grid` SMs up to
    /// `sm_count`, both lanes with an eighth, a quarter, half and three quarters of the SMs for
    /// decode (the eighth and the quarter are where a decode target puts it while prefill is
    /// protected). Also a prompt of 128 tokens, whose operators take microseconds, so that a fixed
    /// cost per prefill step, if the device has one, has a step it dominates to fit it. (On the
    /// H200 the fit gives 0 with it as without: its small prefill steps are their operators'
    /// launch costs, so what makes `chunked`'s small mixed steps there ~3 ms slower than the
    /// model says lies elsewhere.)
    pub fn for_device(sm_count: u32, grid: u32) -> Self {
        let mut budgets: Vec<u32> = (1..).map(|k| k * grid).take_while(|&b| b < sm_count).collect();
        budgets.push(sm_count);
        let split = |eighths: u32| (sm_count * eighths / 8 / grid).max(1) * grid;
        let mut splits = vec![split(1), split(2), split(4), split(6)];
        splits.dedup();
        ProfileConfig {
            budgets,
            prefill: vec![(128, 0), (512, 0), (2048, 0), (8192, 0), (2048, 2048), (2048, 8192)],
            decode: vec![(1, 1024), (16, 2048), (64, 2048), (32, 4096)],
            splits,
            repeats: 2,
            block_size: crate::engine::DEFAULT_BLOCK_SIZE,
        }
    }

    /// These shapes, shrunk to fit a model of `context` tokens (each keeping its proportions), and
    /// fewer repeats when `quick`.
    pub fn fitted_to(mut self, context: usize) -> Self {
        for (new, cached) in &mut self.prefill {
            let total = *new + *cached;
            if total > context {
                let scale = context as f64 / total as f64;
                *new = ((*new as f64 * scale) as usize).max(1);
                *cached = ((*cached as f64 * scale) as usize).min(context - *new);
            }
        }
        for (_, cached) in &mut self.decode {
            *cached = (*cached).min(context.saturating_sub(1));
        }
        self.prefill.dedup();
        self.decode.dedup();
        self
    }

    /// The most cached tokens one shape needs at once.
    fn tokens_needed(&self) -> usize {
        let prefill = self.prefill.iter().map(|&(new, cached)| new + cached);
        let decode = self.decode.iter().map(|&(seqs, cached)| seqs * (cached + 1));
        // Both lanes at once hold one of each.
        prefill.clone().max().unwrap_or(0) + decode.clone().max().unwrap_or(0)
    }
}

/// A whole step's measured time.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepSample {
    pub work: IterationWork,
    pub sms: u32,
    /// The other lane's iteration running meanwhile and its SMs (`None` alone).
    pub other: Option<(IterationWork, u32)>,
    pub seconds: f64,
    /// Whether it measures the model's error rather than fitting it.
    pub held_out: bool,
}

/// A decode operator launch timed while the other lane ran a prefill step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BesideSample {
    pub sample: Sample,
    /// The prefill iteration and its SMs.
    pub other: (IterationWork, u32),
    /// Whether it measures the model's error rather than fitting it.
    pub held_out: bool,
}

/// What a profile measured, to fit a cost model to ([`fit`]); `nexus profile --samples` saves
/// it, `--refit` reads it back.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Measurements {
    pub model: ModelShape,
    pub sm_count: u32,
    /// The streaming-read curve, `(SMs, bytes/s)`.
    pub bandwidth: Vec<(u32, f64)>,
    /// Every timed operator launch.
    pub ops: Vec<Sample>,
    /// Whole steps timed alone and with both lanes running.
    pub steps: Vec<StepSample>,
    /// Decode operator launches timed while a prefill step ran (measurements saved before they
    /// were taken: none).
    #[serde(default)]
    pub beside_ops: Vec<BesideSample>,
    /// What the backend's decode steps fused ([`Backend::decode_fusions`]; measurements saved
    /// before it was kept: none).
    #[serde(default)]
    pub decode_fusions: DecodeFusions,
}

/// The outcome of a profile.
#[derive(Clone, Debug)]
pub struct Profile {
    pub cost: CostModel,
    /// Median and 90th percentile of the relative error of the predicted time of whole steps the
    /// model was not fitted to, alone.
    pub alone_error: (f64, f64),
    /// The same for steps with both lanes running.
    pub both_error: (f64, f64),
    /// What a prefill running beside it does to decode: per decode budget of the both-lane runs,
    /// the median over its decode steps of their time over the same step's mean time alone on as
    /// many SMs.
    pub decode_slowdown: Vec<(u32, f64)>,
    /// What a prefill running beside it leaves decode attention of its bandwidth alone: per
    /// decode budget, the median over its launches beside a prefill of the same launch's median
    /// time alone over its time beside.
    pub attention_bandwidth_beside: Vec<(u32, f64)>,
    /// Median and 90th percentile of the relative error of the predicted time of decode
    /// attention launches beside a prefill that the model was not fitted to (`NaN` without).
    pub attention_beside_error: (f64, f64),
    /// Seconds the controller takes to choose a split with this model (an 8k-token prompt
    /// against 64 decodes of 2k tokens), the mean of many.
    pub decision_s: f64,
}

/// A step built once and run again and again, with the sequences it needs in the cache.
struct Shape {
    input: StepInput,
    work: IterationWork,
    seqs: Vec<u64>,
}

/// Profiles `model` on `backend`: [`measure`], then [`fit`]; `progress(done, total)` after each
/// measurement.
pub fn profile<B: Backend>(
    backend: &B,
    model: &LlamaModel<B>,
    config: &ProfileConfig,
    progress: impl FnMut(usize, usize),
) -> Result<(Measurements, Profile)> {
    let measured = measure(backend, model, config, progress)?;
    let fitted = fit(&measured)?;
    Ok((measured, fitted))
}

/// Times `model`'s operators and whole steps on `backend` (see the module documentation).
pub fn measure<B: Backend>(
    backend: &B,
    model: &LlamaModel<B>,
    config: &ProfileConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<Measurements> {
    let sm_count = backend.sm_count();
    if config.budgets.is_empty() || config.budgets.iter().any(|&b| b == 0 || b > sm_count) {
        return Err(Error::invalid(format!("profile budgets must be in 1..={sm_count}")));
    }
    if config.splits.iter().any(|&d| d == 0 || d >= sm_count) || config.repeats == 0 {
        return Err(Error::invalid("profile splits must leave each lane an SM, and repeats be at least 1"));
    }
    let context = model.config().max_position_embeddings;
    if config.prefill.iter().any(|&(new, cached)| new == 0 || new + cached > context)
        || config.decode.iter().any(|&(seqs, cached)| seqs == 0 || cached + 1 > context)
    {
        return Err(Error::invalid(format!("profile shapes must be non-empty and fit the model's {context} tokens")));
    }
    let num_blocks = config.tokens_needed().div_ceil(config.block_size) + 2 * config.decode.len().max(1) * 64;
    let mut cache = model.alloc_kv_cache(backend, num_blocks, config.block_size)?;
    let mut blocks = BlockManager::new(num_blocks, config.block_size)?;
    let mut phases = [backend.new_phase()?, backend.new_phase()?];
    // Prices the operators the backend reports (only their FLOPs and bytes are used).
    let start = OpCurve::new(1e12, f64::from(sm_count), 1.0);
    let shape = ModelShape::of(model.config());
    let pricing = CostModel::new(shape, sm_count, backend.bandwidth_curve(), start, start, start, 0.0, 0.0)?;
    let shapes = config.prefill.len() + config.decode.len();
    let total = shapes * config.budgets.len() + config.prefill.len() * config.decode.len() * config.splits.len();
    let mut done = 0;
    let mut ops = Vec::new();
    let mut steps = Vec::new();
    let mut beside_ops = Vec::new();
    let mut next_seq = 0u64;
    let sample_of = |t: &OpTime| {
        let op = pricing.op_work(&t.shape);
        Sample { op: op.op, flops: op.flops, bytes: op.bytes, sms: t.sms, seconds: t.seconds }
    };

    // Each shape at each budget: its operators timed in one run, then whole steps, alternately
    // fitted and held out.
    let kinds = config.prefill.iter().map(|&(n, c)| (StepKind::Prefill, 1, n, c));
    let all = kinds.chain(config.decode.iter().map(|&(s, c)| (StepKind::Decode, s, 1, c)));
    for (kind, seqs, new, cached) in all {
        let step =
            prepare(backend, model, &mut phases[0], &mut cache, &mut blocks, kind, seqs, new, cached, &mut next_seq)?;
        for &budget in &config.budgets {
            backend.set_budget(&mut phases[0], budget)?;
            if kind == StepKind::Decode {
                // Untimed first: the step's graph at this budget is recorded.
                run(backend, model, &phases[0], &mut cache, &step.input)?;
            }
            backend.time_ops(&phases[0], true)?;
            run(backend, model, &phases[0], &mut cache, &step.input)?;
            ops.extend(backend.take_op_times(&phases[0])?.iter().map(sample_of));
            backend.time_ops(&phases[0], false)?;
            if kind == StepKind::Decode {
                // Untimed again: the first replay of the graph after the eager, op-timed run is
                // slower than the next ones (H200, Llama-3.1-8B: by 0.6-0.8 ms, 5-13% for batches
                // of 1 to 16), while serving replays graphs back to back. Fitting the H200
                // measurements again without those first replays lowered the held-out p90 error
                // alone from 14.6% to 9.3%.
                run(backend, model, &phases[0], &mut cache, &step.input)?;
            }
            for repeat in 0..config.repeats.max(2) {
                let started = Instant::now();
                run(backend, model, &phases[0], &mut cache, &step.input)?;
                let seconds = started.elapsed().as_secs_f64();
                let held_out = repeat % 2 == 1;
                steps.push(StepSample { work: step.work, sms: budget, other: None, seconds, held_out });
            }
            done += 1;
            progress(done, total);
        }
        step.seqs.iter().for_each(|&s| blocks.free(s));
    }

    // Both lanes at once: each prefill shape next to each decode shape, at each split; the
    // combinations alternate between fitting the contention and measuring the error.
    let mut pair = 0usize;
    for &(new, cached) in &config.prefill {
        let prefill = prepare(
            backend,
            model,
            &mut phases[0],
            &mut cache,
            &mut blocks,
            StepKind::Prefill,
            1,
            new,
            cached,
            &mut next_seq,
        )?;
        for &(seqs, context) in &config.decode {
            let decode = prepare(
                backend,
                model,
                &mut phases[1],
                &mut cache,
                &mut blocks,
                StepKind::Decode,
                seqs,
                1,
                context,
                &mut next_seq,
            )?;
            for (split, &decode_sms) in config.splits.iter().enumerate() {
                let prefill_sms = sm_count - decode_sms;
                backend.set_budget(&mut phases[0], prefill_sms)?;
                backend.set_budget(&mut phases[1], decode_sms)?;
                // Untimed first: the decode step's graph at this budget is recorded, then replayed
                // once (see the steps alone).
                run(backend, model, &phases[1], &mut cache, &decode.input)?;
                run(backend, model, &phases[1], &mut cache, &decode.input)?;
                let held_out = both_lanes_held_out(pair, split);
                let [p, d] = &phases;
                for _ in 0..config.repeats {
                    let (prefill_s, decode_s) =
                        run_both(backend, model, (p, &prefill.input), (d, &decode.input), &mut cache)?;
                    steps.push(StepSample {
                        work: prefill.work,
                        sms: prefill_sms,
                        other: Some((decode.work, decode_sms)),
                        seconds: prefill_s,
                        held_out,
                    });
                    steps.push(StepSample {
                        work: decode.work,
                        sms: decode_sms,
                        other: Some((prefill.work, prefill_sms)),
                        seconds: decode_s,
                        held_out,
                    });
                }
                let timed = time_beside(backend, model, (p, &prefill.input), (d, &decode.input), &mut cache)?;
                beside_ops.extend(timed.unwrap_or_default().iter().map(|t| BesideSample {
                    sample: sample_of(t),
                    other: (prefill.work, prefill_sms),
                    held_out,
                }));
                done += 1;
                progress(done, total);
            }
            decode.seqs.iter().for_each(|&s| blocks.free(s));
            pair += 1;
        }
        prefill.seqs.iter().for_each(|&s| blocks.free(s));
    }
    Ok(Measurements {
        model: shape,
        sm_count,
        bandwidth: pricing.bandwidth.clone(),
        ops,
        steps,
        beside_ops,
        decode_fusions: backend.decode_fusions(),
    })
}

/// Whether the both-lane runs of the `pair`-th pair of shapes at its `split`-th split measure the
/// error rather than fit the model: alternately, shifted by one every pair, so that every split
/// has both (with an even number of splits a plain alternation fitted half the splits and held out
/// the other half).
fn both_lanes_held_out(pair: usize, split: usize) -> bool {
    (pair + split) % 2 == 1
}

/// The cost model that `measured` fits (see the module documentation), with its errors on the
/// held-out steps.
pub fn fit(measured: &Measurements) -> Result<Profile> {
    let sm_count = measured.sm_count;
    let start = OpCurve::new(1e12, f64::from(sm_count), 1.0);
    let mut cost = CostModel::new(measured.model, sm_count, measured.bandwidth.clone(), start, start, start, 0.0, 0.0)?;
    cost.decode_fusions = measured.decode_fusions;
    // Every layer launches the same operators: one sample per operator and budget, the median of
    // its launches.
    let ops = median_per_launch(&measured.ops);
    let fit = |op: Op| {
        let of_op: Vec<Sample> = ops.iter().filter(|s| s.op == op).copied().collect();
        fit_op_curve(&of_op, sm_count, |sms| cost.bandwidth(sms))
            .ok_or_else(|| Error::invalid(format!("the profile timed no {op:?} operator")))
    };
    (cost.gemm, cost.prefill_attention, cost.decode_attention, cost.rest) =
        (fit(Op::Gemm)?, fit(Op::PrefillAttention)?, fit(Op::DecodeAttention)?, fit(Op::Rest)?);
    cost = cost.checked()?;
    let alone = |held_out: bool| measured.steps.iter().filter(move |s| s.other.is_none() && s.held_out == held_out);
    // Each kind's fixed cost: on a grid of 25 us up to 5 ms, the one that explains its fitted
    // steps best (squared log-ratio, as the curves).
    let overhead = |kind: StepKind| {
        let priced: Vec<(f64, f64)> = alone(false)
            .filter(|s| s.work.kind == kind)
            .map(|s| (cost.seconds(&s.work, s.sms, None), s.seconds))
            .collect();
        let error = |overhead: f64| -> f64 {
            priced.iter().map(|&(operators, seconds)| ((operators + overhead) / seconds).ln().powi(2)).sum()
        };
        (0..=200).map(|k| 25e-6 * f64::from(k)).min_by(|&a, &b| error(a).total_cmp(&error(b))).unwrap_or(0.0)
    };
    (cost.prefill_overhead_s, cost.decode_overhead_s) = (overhead(StepKind::Prefill), overhead(StepKind::Decode));
    let fitted_alone: Vec<_> = alone(false).map(|s| (s.work, s.sms, s.seconds)).collect();
    cost.fit_step_scales(&fitted_alone);
    cost = cost.checked()?;
    let alone_error = relative_errors(alone(true).map(|s| (cost.seconds(&s.work, s.sms, None), s.seconds)))
        .ok_or_else(|| Error::invalid("the profile timed no whole step"))?;
    // Both lanes: the other lane's counted bytes per second, from the model fitted alone.
    let (fitted, held): (Vec<_>, Vec<_>) = measured
        .steps
        .iter()
        .filter_map(|s| {
            let (work, sms) = s.other?;
            Some((s.held_out, (s.work, s.sms, cost.bytes_per_s(&work, sms), s.seconds)))
        })
        .partition(|(held_out, _)| !held_out);
    let fitted: Vec<_> = fitted.into_iter().map(|(_, s)| s).collect();
    // The decode launches' factors beside a prefill first: the iterations' contention and beside
    // scales are then fitted around them.
    let launches: Vec<Sample> = measured.beside_ops.iter().filter(|b| !b.held_out).map(|b| b.sample).collect();
    cost.fit_decode_beside(&launches);
    let attention_held: Vec<(Sample, f64)> = measured
        .beside_ops
        .iter()
        .filter(|b| b.held_out && b.sample.op == Op::DecodeAttention)
        .map(|b| (b.sample, cost.bytes_per_s(&b.other.0, b.other.1)))
        .collect();
    cost.fit_contention(&fitted);
    cost.fit_beside_scales(&fitted);
    cost = cost.checked()?;
    let both_error = relative_errors(
        held.iter().map(|&(_, (work, sms, other, seconds))| (cost.seconds(&work, sms, Some(other)), seconds)),
    )
    .unwrap_or((f64::NAN, f64::NAN));
    let attention_beside_error =
        relative_errors(attention_held.iter().map(|&(s, other)| (cost.launch_seconds(&s, Some(other)), s.seconds)))
            .unwrap_or((f64::NAN, f64::NAN));
    let decision_s = decision_seconds(&cost)?;
    let decode_slowdown = decode_slowdown(&measured.steps);
    let attention_bandwidth_beside = attention_bandwidth_beside(measured, &ops);
    Ok(Profile {
        cost,
        alone_error,
        both_error,
        decode_slowdown,
        attention_bandwidth_beside,
        attention_beside_error,
        decision_s,
    })
}

/// [`Profile::attention_bandwidth_beside`] of `measured`, against its launches' medians alone
/// (`alone`, [`median_per_launch`]): decode budgets with a decode attention launch both alone and
/// beside a prefill, in ascending order.
fn attention_bandwidth_beside(measured: &Measurements, alone: &[Sample]) -> Vec<(u32, f64)> {
    let ratios = measured
        .beside_ops
        .iter()
        .map(|b| b.sample)
        .filter(|s| s.op == Op::DecodeAttention)
        .filter_map(|s| alone.iter().find(|a| launch_key(a) == launch_key(&s)).map(|a| (s.sms, a.seconds / s.seconds)))
        .collect();
    median_per_budget(ratios)
}

/// [`Profile::decode_slowdown`] of `steps`: decode budgets with a step both alone and beside a
/// prefill, in ascending order.
fn decode_slowdown(steps: &[StepSample]) -> Vec<(u32, f64)> {
    let decode = |s: &&StepSample| s.work.kind == StepKind::Decode;
    let ratios = steps
        .iter()
        .filter(decode)
        .filter(|s| s.other.is_some())
        .filter_map(|beside| {
            let alone: Vec<f64> = steps
                .iter()
                .filter(decode)
                .filter(|s| s.other.is_none() && s.sms == beside.sms && s.work == beside.work)
                .map(|s| s.seconds)
                .collect();
            (!alone.is_empty()).then(|| {
                let mean = alone.iter().sum::<f64>() / alone.len() as f64;
                (beside.sms, beside.seconds / mean)
            })
        })
        .collect();
    median_per_budget(ratios)
}

/// Per budget of `ratios` (`(SMs, ratio)`), the median ratio, by ascending budget.
fn median_per_budget(mut ratios: Vec<(u32, f64)>) -> Vec<(u32, f64)> {
    ratios.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
    ratios.chunk_by(|a, b| a.0 == b.0).map(|same| same[same.len() / 2]).collect()
}

/// What tells one operator launch from another: class, FLOPs, bytes, SMs.
fn launch_key(s: &Sample) -> (u8, u64, u64, u32) {
    (s.op as u8, s.flops.to_bits(), s.bytes.to_bits(), s.sms)
}

/// One sample per distinct operator launch ([`launch_key`]): the median time.
fn median_per_launch(samples: &[Sample]) -> Vec<Sample> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| launch_key(a).cmp(&launch_key(b)).then(a.seconds.total_cmp(&b.seconds)));
    sorted.chunk_by(|a, b| launch_key(a) == launch_key(b)).map(|same| same[same.len() / 2]).collect()
}

/// The mean seconds of the controller's split decision with `cost`, over 1000 decisions
/// alternating between the two priorities.
fn decision_seconds(cost: &CostModel) -> Result<f64> {
    let mut controller = Controller::new(cost.clone(), ControllerConfig::default())?;
    let prefill = IterationWork::of(StepKind::Prefill, [(8192, 0)]);
    let decode = IterationWork::of(StepKind::Decode, (0..64).map(|_| (1, 2048)));
    const DECISIONS: u32 = 1000;
    let start = Instant::now();
    for i in 0..DECISIONS {
        let usage = if i % 2 == 0 { 0.2 } else { 0.9 };
        std::hint::black_box(controller.split(&prefill, &decode, usage, 0));
    }
    Ok(start.elapsed().as_secs_f64() / f64::from(DECISIONS))
}

/// Puts `seqs` sequences of `cached` tokens into the cache (prefilled in `phase` with every SM,
/// untimed) and builds the step that advances each by `new` tokens.
#[allow(clippy::too_many_arguments)]
fn prepare<B: Backend>(
    backend: &B,
    model: &LlamaModel<B>,
    phase: &mut B::Phase,
    cache: &mut KvCache<B>,
    blocks: &mut BlockManager,
    kind: StepKind,
    seqs: usize,
    new: usize,
    cached: usize,
    next_seq: &mut u64,
) -> Result<Shape> {
    let vocab = model.config().vocab_size;
    let token = |i: usize| ((i * 7919 + 13) % vocab) as u32;
    let ids: Vec<u64> = (0..seqs as u64).map(|i| *next_seq + i).collect();
    *next_seq += seqs as u64;
    backend.set_budget(phase, backend.sm_count())?;
    let context: Vec<u32> = (0..cached).map(token).collect();
    // At most 8192 prompt tokens a step, as the engine's default.
    for group in ids.chunks((8192 / cached.max(1)).max(1)) {
        for piece in context.chunks(8192) {
            let chunks: Vec<SeqChunk<'_>> =
                group.iter().map(|&seq| SeqChunk { seq, tokens: piece, wants_logits: true }).collect();
            let step = build_step(blocks, &chunks, StepKind::Prefill)?;
            run(backend, model, phase, cache, &step)?;
        }
    }
    let tokens: Vec<u32> = (cached..cached + new).map(token).collect();
    let chunks: Vec<SeqChunk<'_>> =
        ids.iter().map(|&seq| SeqChunk { seq, tokens: &tokens, wants_logits: true }).collect();
    let input = build_step(blocks, &chunks, kind)?;
    let work = IterationWork::of(kind, ids.iter().map(|_| (new, cached)));
    Ok(Shape { input, work, seqs: ids })
}

/// Runs `step` in `phase` and waits for its logits.
fn run<B: Backend>(
    backend: &B,
    model: &LlamaModel<B>,
    phase: &B::Phase,
    cache: &mut KvCache<B>,
    step: &StepInput,
) -> Result<()> {
    let logits = model.forward(backend, phase, cache, step)?;
    backend.logits_to_host(phase, logits, LogitsReadback::Argmax).map(|_| ())
}

/// Launches a prefill step, and decode steps one after another while it runs (as the engine's
/// lanes do); returns the seconds from the prefill's launch to when it was seen done, and the
/// median of the decode steps' (launch to seen done) that ended before it.
fn run_both<B: Backend>(
    backend: &B,
    model: &LlamaModel<B>,
    (prefill_phase, prefill): (&B::Phase, &StepInput),
    (decode_phase, decode): (&B::Phase, &StepInput),
    cache: &mut KvCache<B>,
) -> Result<(f64, f64)> {
    let prefill_start = Instant::now();
    let logits = model.forward(backend, prefill_phase, cache, prefill)?;
    let prefill_pending = backend.read_logits(prefill_phase, logits, LogitsReadback::Argmax)?;
    let mut prefill_s = None;
    let mut decodes = Vec::new();
    while prefill_s.is_none() {
        let decode_start = Instant::now();
        let logits = model.forward(backend, decode_phase, cache, decode)?;
        let decode_pending = backend.read_logits(decode_phase, logits, LogitsReadback::Argmax)?;
        loop {
            if prefill_s.is_none() && backend.is_ready(&prefill_pending)? {
                prefill_s = Some(prefill_start.elapsed().as_secs_f64());
            }
            if backend.is_ready(&decode_pending)? {
                // A decode step that ended after the prefill ran partly alone: it counts only
                // when none ended before.
                if prefill_s.is_none() || decodes.is_empty() {
                    decodes.push(decode_start.elapsed().as_secs_f64());
                }
                break;
            }
            std::thread::yield_now();
        }
        backend.take_logits(decode_phase, decode_pending)?;
    }
    backend.take_logits(prefill_phase, prefill_pending)?;
    decodes.sort_by(f64::total_cmp);
    Ok((prefill_s.unwrap_or_default(), decodes.get(decodes.len() / 2).copied().unwrap_or_default()))
}

/// Times the operators of one decode step launched while one prefill step runs beside it:
/// `None` when the prefill was done first (the decode's last operators then ran alone, or the
/// backend runs a step before it returns).
fn time_beside<B: Backend>(
    backend: &B,
    model: &LlamaModel<B>,
    (prefill_phase, prefill): (&B::Phase, &StepInput),
    (decode_phase, decode): (&B::Phase, &StepInput),
    cache: &mut KvCache<B>,
) -> Result<Option<Vec<OpTime>>> {
    let logits = model.forward(backend, prefill_phase, cache, prefill)?;
    let prefill_pending = backend.read_logits(prefill_phase, logits, LogitsReadback::Argmax)?;
    backend.time_ops(decode_phase, true)?;
    let mut timed = || -> Result<Option<Vec<OpTime>>> {
        let logits = model.forward(backend, decode_phase, cache, decode)?;
        let decode_pending = backend.read_logits(decode_phase, logits, LogitsReadback::Argmax)?;
        let decode_first = loop {
            if backend.is_ready(&prefill_pending)? {
                break false;
            }
            if backend.is_ready(&decode_pending)? {
                break true;
            }
            std::thread::yield_now();
        };
        backend.take_logits(decode_phase, decode_pending)?;
        let times = backend.take_op_times(decode_phase)?;
        Ok(decode_first.then_some(times))
    };
    let times = timed();
    backend.time_ops(decode_phase, false)?;
    backend.take_logits(prefill_phase, prefill_pending)?;
    times
}

/// A profile as `nexus profile` saves it: the cost model, what it was made for, and its errors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedProfile {
    /// The device ([`Backend::device_name`]).
    pub device: String,
    /// The model, as `--model` named it.
    pub model: String,
    /// [`nexus_kernels::gpu::kernels_fingerprint`] of the kernels measured, in hex.
    pub kernels: String,
    pub cost_model: CostModel,
    /// Median and 90th percentile relative error on whole steps, alone and with both lanes.
    pub alone_error: (f64, f64),
    pub both_error: (f64, f64),
}

/// Measurements as `nexus profile --samples` saves them, with what they were made on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedMeasurements {
    /// The device ([`Backend::device_name`]).
    pub device: String,
    /// The model, as `--model` named it.
    pub model: String,
    /// [`nexus_kernels::gpu::kernels_fingerprint`] of the kernels measured, in hex.
    pub kernels: String,
    pub measurements: Measurements,
}

impl SavedMeasurements {
    /// `measurements` of these kernels, made on `device` for `model`.
    pub fn new(measurements: Measurements, device: &str, model: &str) -> Self {
        SavedMeasurements {
            device: device.to_owned(),
            model: model.to_owned(),
            kernels: kernels_version(),
            measurements,
        }
    }

    /// Writes them as JSON to `path`.
    pub fn save(&self, path: &Path) -> Result<()> {
        write_json(path, self)
    }

    /// Reads measurements saved at `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(format!("{}: {e}", path.display())))
    }
}

/// Whether a profile must have measured this build's kernels ([`SavedProfile::load`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelsCheck {
    /// Only a profile of this build's kernels predicts what they do.
    This,
    /// Any kernels: the profile stands for a device (see
    /// [`SimulatedBackend`](crate::model::simulated::SimulatedBackend)).
    Any,
}

impl SavedProfile {
    /// The profile fitted to `measured`, made for what they were.
    pub fn new(profile: &Profile, measured: &SavedMeasurements) -> Self {
        SavedProfile {
            device: measured.device.clone(),
            model: measured.model.clone(),
            kernels: measured.kernels.clone(),
            cost_model: profile.cost.clone(),
            alone_error: profile.alone_error,
            both_error: profile.both_error,
        }
    }

    /// Where the profile of `model` on `device` with these kernels lives: `$NEXUS_CACHE_DIR`, else
    /// `$XDG_CACHE_HOME/nexus`, else `~/.cache/nexus`, under `profiles/`.
    pub fn default_path(device: &str, model: &str) -> Option<PathBuf> {
        let cache = std::env::var_os("NEXUS_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("nexus")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("nexus")))?;
        let clean = |s: &str| -> String {
            s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect()
        };
        let name = format!("{}--{}--{}.json", clean(device), clean(model), kernels_version());
        Some(cache.join("profiles").join(name))
    }

    /// Writes the profile as JSON to `path` (its folder made if needed).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_json(path, self)
    }

    /// Reads the profile at `path`, whatever it was made for (its cost model checked).
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let profile: SavedProfile =
            serde_json::from_str(&text).map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
        let cost =
            profile.cost_model.clone().checked().map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
        Ok(SavedProfile { cost_model: cost, ..profile })
    }

    /// Reads the profile at `path` and checks that it was made for `device`, `model` and, as
    /// `kernels` says, these kernels.
    pub fn load(path: &Path, device: &str, model: &str, kernels: KernelsCheck) -> Result<Self> {
        let profile = Self::read(path)?;
        let mismatch = if profile.device != device {
            Some(format!("device {}, not {device}", profile.device))
        } else if profile.model != model {
            Some(format!("model {}, not {model}", profile.model))
        } else if kernels == KernelsCheck::This && profile.kernels != kernels_version() {
            Some(format!("kernels {}, not these ({})", profile.kernels, kernels_version()))
        } else {
            None
        };
        if let Some(mismatch) = mismatch {
            return Err(Error::invalid(format!("{} was made for {mismatch}", path.display())));
        }
        Ok(profile)
    }
}

/// Writes `value` as JSON to `path`, its folder made if needed.
fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::format(format!("{}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// The kernels' fingerprint in hex.
fn kernels_version() -> String {
    format!("{:016x}", nexus_kernels::gpu::kernels_fingerprint())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_split_has_both_lanes_fitted_and_held_out() {
        for splits in 1..=4 {
            for split in 0..splits {
                let held: Vec<bool> = (0..6).map(|pair| both_lanes_held_out(pair, split)).collect();
                assert!(held.contains(&true) && held.contains(&false), "split {split} of {splits}: {held:?}");
            }
            let per_pair: Vec<bool> = (0..splits).map(|split| both_lanes_held_out(0, split)).collect();
            assert_eq!(per_pair.iter().filter(|&&h| h).count(), splits / 2, "{per_pair:?}");
        }
    }

    #[test]
    fn shapes_cover_the_grid_and_the_splits_a_decode_target_uses() {
        for grid in [8, 16] {
            let config = ProfileConfig::for_device(132, grid);
            assert_eq!(config.budgets.last(), Some(&132));
            assert!(config.budgets.iter().all(|&b| b == 132 || b % grid == 0), "{:?}", config.budgets);
            // An eighth, a quarter, half and three quarters of the SMs for decode, on the grid.
            assert_eq!(config.splits, vec![16, 32, 64, 96], "grid {grid}");
        }
        // A coarse grid leaves fewer distinct splits, each still leaving prefill an SM.
        assert_eq!(ProfileConfig::for_device(132, 64).splits, vec![64]);
        assert_eq!(ProfileConfig::for_device(132, 32).splits, vec![32, 64, 96]);
    }
}
