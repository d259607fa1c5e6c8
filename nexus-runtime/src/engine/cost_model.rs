//! The Nexus controller's cost model: how long one lane's iteration takes at a CTA budget, and
//! what an iteration of the other lane running at the same time does to it.
//!
//! As in the paper, an iteration is priced operator by operator — each GEMM of every layer and
//! the LM head, the layer's attention, and the rest (norms, RoPE, KV writes, activation) — each
//! at the larger of its compute time and its memory time, plus a fixed cost per iteration
//! (launches):
//!
//! - compute time is the operator's FLOPs over `flops_per_sm × effective SMs`, where the
//!   effective SMs grow with the budget `r` up to a saturation share and then only as
//!   `saturation × (r / saturation)^decay` ([`OpCurve`], fitted per operator class);
//! - memory time is its bytes over the streaming-read bandwidth `r` SMs reach, a curve measured
//!   on the device ([`nexus_kernels::BandwidthCurve`]);
//! - while the other lane runs, HBM is shared: an operator gets at most what the device's whole
//!   bandwidth leaves after the other lane's traffic (measured on an H200: a stream on D SMs
//!   keeps its rate next to compute-bound work, and loses about half next to another stream), so
//!   decode pays for a memory-bound prefill phase, not for its SM count alone. The other lane's
//!   traffic is its counted bytes per second times a fitted weight (its tiles re-read from HBM,
//!   its writes), and compute slows by a fitted factor (shared power and clocks, L2):
//!   [`Contention`], one per kind of iteration, fitted by `nexus profile` on both lanes run at
//!   once; where the profile timed a decode iteration's launches beside a prefill, those of each
//!   operator class take instead their time alone times a factor per budget fitted on them
//!   ([`DecodeBeside`]: on an H100 decode GEMMs and attention lost the same share whether the
//!   prefill was memory- or compute-bound, so not an HBM share);
//! - whole iterations are then scaled per budget by what the profile measured against that sum,
//!   alone and beside the other lane ([`CostModel::decode_scale`],
//!   [`CostModel::decode_beside_scale`]): the operators are timed one launch at a time, and a
//!   step's launches follow each other more closely (on an H200 a Llama-3.1-8B decode step took
//!   0.81-0.84x their sum from 64 SMs on).

use nexus_kernels::BandwidthCurve;
use serde::{Deserialize, Serialize};

use crate::model::backend::{DecodeFusions, OpShape, StepKind};
use crate::weights::config::ModelConfig;
use crate::{Error, Result};

/// The sizes of a model that its iterations' costs depend on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelShape {
    pub layers: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
}

impl ModelShape {
    /// The shape of `config`'s model.
    pub fn of(config: &ModelConfig) -> Self {
        ModelShape {
            layers: config.num_layers,
            hidden: config.hidden_size,
            intermediate: config.intermediate_size,
            heads: config.num_heads,
            kv_heads: config.num_kv_heads,
            head_dim: config.head_dim,
            vocab: config.vocab_size,
        }
    }

    /// `(n, k)` of each layer's GEMMs: fused QKV, output, fused gate/up, down.
    fn layer_linears(&self) -> [(usize, usize); 4] {
        let q = self.heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        [
            (q + 2 * kv, self.hidden),
            (self.hidden, q),
            (2 * self.intermediate, self.hidden),
            (self.hidden, self.intermediate),
        ]
    }

    /// Bytes of K and V (bf16) of one cached token in one layer.
    fn kv_bytes_per_token(&self) -> f64 {
        (2 * self.kv_heads * self.head_dim * 2) as f64
    }
}

/// What one iteration of a lane computes, in the units the model prices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct IterationWork {
    pub kind: StepKind,
    /// New tokens: the query rows.
    pub tokens: usize,
    /// Sequences (each brings at most one row of logits).
    pub seqs: usize,
    /// Query-key pairs attended, over all rows (a prompt chunk of `c` tokens after `p` cached
    /// ones: `c·p + c(c+1)/2`; a decode row: its context length).
    pub attended: f64,
    /// Tokens of K and V read, over all sequences (each sequence's context once).
    pub kv_tokens: f64,
    /// Of those sequences, the ones that advance by a single token (decode rows, also those a
    /// mixed batch of the chunked schedule carries in its prefill iteration). Their attention is
    /// priced as decode attention's, in a prefill iteration too: they read their cache once, at
    /// decode attention's bandwidth, where the prefill attention curve is fitted on prompt
    /// chunks, whose memory time hardly counts (its bandwidth fraction came out 0.1 in an H200
    /// profile).
    #[serde(default)]
    pub single_rows: usize,
    /// Their tokens of K and V (each row attends to all of its own).
    #[serde(default)]
    pub single_kv_tokens: f64,
}

impl IterationWork {
    /// The work of sequences advancing by `new` tokens after `cached` ones each, `(new, cached)`.
    pub fn of(kind: StepKind, chunks: impl IntoIterator<Item = (usize, usize)>) -> Self {
        IterationWork { kind, ..IterationWork::default() }.with(chunks)
    }

    /// This work and that of more sequences, `(new, cached)` as in [`IterationWork::of`].
    pub fn with(mut self, chunks: impl IntoIterator<Item = (usize, usize)>) -> Self {
        for (new, cached) in chunks {
            let (c, p) = (new as f64, cached as f64);
            self.tokens += new;
            self.seqs += 1;
            self.attended += c * p + c * (c + 1.0) / 2.0;
            self.kv_tokens += p + c;
            if new == 1 {
                self.single_rows += 1;
                self.single_kv_tokens += p + c;
            }
        }
        self
    }
}

/// The classes of operators, each with its own compute curve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    Gemm,
    PrefillAttention,
    DecodeAttention,
    /// Norms, RoPE, KV writes, embedding: memory-bound.
    Rest,
}

/// How an operator class's time depends on its SMs: compute time falls as `1/r` up to
/// `saturation` SMs, then as `(saturation / r)^decay` (0: no faster with more SMs, 1: still
/// `1/r`); memory time is its bytes over `bandwidth_fraction` of what a streaming read reaches on
/// those SMs (the class's kernels pull less than the streaming kernel); each launch costs
/// `launch_s` more (latency that neither hides: a small kernel's whole time).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OpCurve {
    /// FLOP/s one SM reaches below saturation.
    pub flops_per_sm: f64,
    pub saturation: f64,
    pub decay: f64,
    /// The share of the streaming read's bandwidth the class's kernels reach, in (0, 1].
    pub bandwidth_fraction: f64,
    /// Seconds each launch costs besides its compute or memory time.
    pub launch_s: f64,
}

impl OpCurve {
    /// A curve of `flops_per_sm` up to `saturation` SMs, `decay` beyond, and the streaming
    /// read's bandwidth.
    pub fn new(flops_per_sm: f64, saturation: f64, decay: f64) -> Self {
        OpCurve { flops_per_sm, saturation, decay, bandwidth_fraction: 1.0, launch_s: 0.0 }
    }

    /// Seconds to compute `flops` on `sms` SMs.
    pub fn seconds(&self, flops: f64, sms: u32) -> f64 {
        let r = f64::from(sms.max(1));
        let effective = if r <= self.saturation { r } else { self.saturation * (r / self.saturation).powf(self.decay) };
        flops / (self.flops_per_sm * effective)
    }
}

/// One operator of an iteration: its class, FLOPs and bytes moved, over how many launches.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OpWork {
    pub op: Op,
    pub flops: f64,
    pub bytes: f64,
    pub launches: f64,
}

/// What the other lane running at the same time does to an iteration of one kind (see the
/// module documentation).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Contention {
    /// Factor on compute times (at least 1).
    pub compute: f64,
    /// Bytes of HBM traffic per byte the other lane is counted to move (at least 0).
    pub bandwidth_weight: f64,
}

impl Default for Contention {
    /// Compute untouched, the other lane's counted bytes taken as its traffic.
    fn default() -> Self {
        Contention { compute: 1.0, bandwidth_weight: 1.0 }
    }
}

/// The cost model of one model on one device (see the module documentation).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CostModel {
    pub model: ModelShape,
    pub sm_count: u32,
    /// The streaming-read curve, `(SMs, bytes/s)`, from 1 SM up.
    pub bandwidth: Vec<(u32, f64)>,
    pub gemm: OpCurve,
    pub prefill_attention: OpCurve,
    pub decode_attention: OpCurve,
    /// The elementwise kernels: their share of the streaming read's bandwidth and launch time
    /// (their FLOPs are not counted).
    pub rest: OpCurve,
    /// Seconds each iteration costs besides its operators, by kind (launches and the host).
    pub prefill_overhead_s: f64,
    pub decode_overhead_s: f64,
    /// What whole iterations of each kind measured against their priced operators, by budget:
    /// `(SMs, measured / predicted)`, ascending, interpolated between budgets and held beyond
    /// the ends (empty: 1). Consecutive launches of one step (decode replays a CUDA graph) cost
    /// less than the operators `nexus profile` times one by one, the more so the more SMs: on an
    /// H200, Llama-3.1-8B decode steps took 0.98x their operators' sum on 16 SMs and 0.81-0.84x
    /// from 64 on.
    #[serde(default)]
    pub prefill_scale: Vec<(u32, f64)>,
    #[serde(default)]
    pub decode_scale: Vec<(u32, f64)>,
    /// What iterations of each kind measured beside the other lane against their prediction by
    /// the contention, the same way by budget: what [`Contention`]'s two terms leave (on an
    /// H200, Llama-3.1-8B prefill on 36 SMs next to decode on 96 took 1.23x its prediction, on
    /// 68 next to 64 1.01x).
    #[serde(default)]
    pub prefill_beside_scale: Vec<(u32, f64)>,
    #[serde(default)]
    pub decode_beside_scale: Vec<(u32, f64)>,
    /// What decode running beside a prefill iteration does to it, and the other way round.
    pub prefill_contention: Contention,
    pub decode_contention: Contention,
    /// What a prefill beside it does to a decode iteration's launches, per operator class
    /// ([`CostModel::fit_decode_beside`]; empty in profiles without such launches: the decode
    /// contention prices them).
    #[serde(default)]
    pub decode_beside: DecodeBeside,
    /// What the profiled backend's decode steps fuse: the elementwise launches an iteration makes
    /// (profiles made before it was kept: none).
    #[serde(default)]
    pub decode_fusions: DecodeFusions,
    #[serde(skip)]
    curve: Option<BandwidthCurve>,
}

impl CostModel {
    /// A model of `model` on a device of `sm_count` SMs whose streaming read reaches `bandwidth`
    /// (`(SMs, bytes/s)`, from 1 SM up).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: ModelShape,
        sm_count: u32,
        bandwidth: Vec<(u32, f64)>,
        gemm: OpCurve,
        prefill_attention: OpCurve,
        decode_attention: OpCurve,
        prefill_overhead_s: f64,
        decode_overhead_s: f64,
    ) -> Result<Self> {
        let mut cost = CostModel {
            model,
            sm_count,
            bandwidth,
            gemm,
            prefill_attention,
            decode_attention,
            rest: OpCurve::new(1.0, f64::from(sm_count), 1.0),
            prefill_overhead_s,
            decode_overhead_s,
            prefill_scale: Vec::new(),
            decode_scale: Vec::new(),
            prefill_beside_scale: Vec::new(),
            decode_beside_scale: Vec::new(),
            prefill_contention: Contention::default(),
            decode_contention: Contention::default(),
            decode_beside: DecodeBeside::default(),
            decode_fusions: DecodeFusions::default(),
            curve: None,
        };
        cost.check()?;
        Ok(cost)
    }

    /// Reads a cost model saved as JSON, and checks it.
    pub fn from_json(text: &str) -> Result<Self> {
        let cost: CostModel = serde_json::from_str(text).map_err(|e| Error::format(format!("cost model: {e}")))?;
        cost.checked()
    }

    /// The model, checked (positive, finite figures; a valid bandwidth curve), as one read from a
    /// file must be before use.
    pub fn checked(mut self) -> Result<Self> {
        self.check()?;
        Ok(self)
    }

    /// The model as JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    fn check(&mut self) -> Result<()> {
        let curves = [self.gemm, self.prefill_attention, self.decode_attention, self.rest];
        let positive = |v: f64| v.is_finite() && v > 0.0;
        let overhead = |v: f64| v.is_finite() && v >= 0.0;
        let fraction = |f: f64| f.is_finite() && f > 0.0 && f <= 1.0;
        let curves_ok = curves.iter().all(|c| {
            positive(c.flops_per_sm)
                && positive(c.saturation)
                && c.decay.is_finite()
                && fraction(c.bandwidth_fraction)
                && overhead(c.launch_s)
        });
        let contention_ok = [self.prefill_contention, self.decode_contention]
            .iter()
            .all(|c| c.compute.is_finite() && c.compute >= 1.0 && overhead(c.bandwidth_weight));
        if self.sm_count == 0 || !curves_ok || !overhead(self.prefill_overhead_s) || !overhead(self.decode_overhead_s) {
            return Err(Error::format(
                "cost model: SM count, curves and overheads must be positive and finite, bandwidth fractions in (0, 1], \
                 launch times at least 0",
            ));
        }
        let scale_ok = |scale: &[(u32, f64)]| {
            scale.iter().all(|&(sms, factor)| sms > 0 && positive(factor)) && scale.windows(2).all(|w| w[0].0 < w[1].0)
        };
        let beside = &self.decode_beside;
        let scales = [
            &self.prefill_scale,
            &self.decode_scale,
            &self.prefill_beside_scale,
            &self.decode_beside_scale,
            &beside.gemm,
            &beside.attention,
            &beside.rest,
        ];
        if !scales.iter().all(|scale| scale_ok(scale)) {
            return Err(Error::format("cost model: step scales must be positive and finite, at ascending budgets"));
        }
        if !contention_ok {
            return Err(Error::format(
                "cost model: contention factors must be finite, compute at least 1, weights at least 0",
            ));
        }
        let curve = BandwidthCurve::from_points(&self.bandwidth)
            .map_err(|e| Error::format(format!("cost model: bandwidth: {e}")))?;
        self.curve = Some(curve);
        Ok(())
    }

    /// Bytes/s the streaming read reaches on `sms` SMs.
    pub fn bandwidth(&self, sms: u32) -> f64 {
        self.curve.as_ref().map_or(1.0, |c| c.at(sms))
    }

    /// The FLOPs and bytes of one operator the backend ran (what a profile times).
    pub fn op_work(&self, shape: &OpShape) -> OpWork {
        let m = &self.model;
        match *shape {
            OpShape::Gemm { m: rows, n, k } => {
                let (rows, n, k) = (rows as f64, n as f64, k as f64);
                OpWork {
                    op: Op::Gemm,
                    flops: 2.0 * rows * n * k,
                    bytes: 2.0 * (rows * k + n * k + rows * n),
                    launches: 1.0,
                }
            }
            OpShape::Attention { kind, tokens, attended, kv_tokens, .. } => {
                let q_width = (m.heads * m.head_dim) as f64;
                OpWork {
                    op: if kind == StepKind::Decode { Op::DecodeAttention } else { Op::PrefillAttention },
                    flops: 4.0 * q_width * attended,
                    // The cached K and V, the queries in and the output out.
                    bytes: kv_tokens * m.kv_bytes_per_token() + tokens as f64 * 2.0 * 2.0 * q_width,
                    launches: 1.0,
                }
            }
            OpShape::Elementwise { bytes } => OpWork { op: Op::Rest, flops: 0.0, bytes, launches: 1.0 },
        }
    }

    /// The operators of an iteration doing `work`, with their FLOPs and bytes (every layer's, and
    /// the LM head's).
    pub fn ops(&self, work: &IterationWork) -> Vec<OpWork> {
        let m = &self.model;
        let layers = m.layers as f64;
        let scaled = |op: OpWork, times: f64| OpWork {
            op: op.op,
            flops: times * op.flops,
            bytes: times * op.bytes,
            launches: times * op.launches,
        };
        let mut ops: Vec<OpWork> = m
            .layer_linears()
            .iter()
            .map(|&(n, k)| scaled(self.op_work(&OpShape::gemm(work.tokens, n, k)), layers))
            .collect();
        ops.push(self.op_work(&OpShape::gemm(work.seqs, m.vocab, m.hidden)));
        // Single-token rows (a decode iteration's, or a mixed batch's decode rows in a prefill
        // iteration) are priced as decode attention, within the iteration's one launch per layer.
        let (rows, kv) = (work.single_rows, work.single_kv_tokens);
        let chunks = rows == 0 || work.seqs > rows;
        if chunks {
            let attention = OpShape::Attention {
                kind: work.kind,
                tokens: work.tokens - rows,
                seqs: work.seqs - rows,
                attended: work.attended - kv,
                kv_tokens: work.kv_tokens - kv,
            };
            ops.push(scaled(self.op_work(&attention), layers));
        }
        if rows > 0 {
            let decode =
                OpShape::Attention { kind: StepKind::Decode, tokens: rows, seqs: rows, attended: kv, kv_tokens: kv };
            let op = self.op_work(&decode);
            ops.push(scaled(OpWork { launches: if chunks { 0.0 } else { op.launches }, ..op }, layers));
        }
        // Per layer, up to three elementwise kernels move per token (as the backends count them):
        // two fused residual adds and norms (4h each), RoPE over the Q and K heads (read and
        // write); a decode step runs the norms inside its GEMMs when it has at most
        // `decode_fusions.norm_rows` rows, and the RoPE inside its attention with
        // `decode_fusions.rope`. SiLU-and-mul is the gate/up GEMM's epilogue.
        let decode = work.kind == StepKind::Decode;
        let norms = !(decode && work.tokens <= self.decode_fusions.norm_rows);
        let rope = !(decode && self.decode_fusions.rope);
        let rotated = (m.heads + m.kv_heads) * m.head_dim;
        let per_token = if norms { 8 * m.hidden } else { 0 } + if rope { 2 * rotated } else { 0 };
        let launches = if norms { 2.0 } else { 0.0 } + if rope { 1.0 } else { 0.0 };
        if launches > 0.0 {
            let rest = self.op_work(&OpShape::elementwise(work.tokens * per_token));
            ops.push(scaled(OpWork { launches, ..rest }, layers));
        }
        ops
    }

    /// Seconds `op` of an iteration of `kind` takes on `sms` SMs, alone (`other` is `None`) or
    /// while the other lane runs, moving `other` counted bytes per second, and slows it as
    /// `contention` says (or, for a decode iteration's operator class with one, as
    /// [`CostModel::decode_beside`] says).
    fn op_seconds(&self, op: &OpWork, kind: StepKind, sms: u32, other: Option<f64>, contention: Contention) -> f64 {
        let curve = match op.op {
            Op::Gemm => &self.gemm,
            Op::PrefillAttention => &self.prefill_attention,
            Op::DecodeAttention => &self.decode_attention,
            Op::Rest => &self.rest,
        };
        let compute = if op.op == Op::Rest { 0.0 } else { curve.seconds(op.flops, sms) };
        let launches = op.launches * curve.launch_s;
        let own = self.bandwidth(sms);
        let alone = launches + compute.max(op.bytes / (curve.bandwidth_fraction * own));
        let Some(other) = other else { return alone };
        let factors = self.decode_beside.of(op.op);
        if kind == StepKind::Decode && !factors.is_empty() {
            return alone * interpolate(factors, sms);
        }
        // HBM is shared: what the whole device reads, less the other lane's traffic, but never
        // less than a tenth of what these SMs reach alone.
        let left = (self.bandwidth(self.sm_count) - contention.bandwidth_weight * other).max(0.1 * own);
        launches + (contention.compute * compute).max(op.bytes / (curve.bandwidth_fraction * own.min(left)))
    }

    /// The predicted seconds of an iteration doing `work` on `sms` SMs, alone (`other` is `None`)
    /// or while the other lane moves `other` counted bytes per second.
    pub fn seconds(&self, work: &IterationWork, sms: u32, other: Option<f64>) -> f64 {
        self.priced_seconds(&self.priced(work), sms, other)
    }

    /// [`Self::seconds`] of `work` on `sms` SMs beside the other lane's iteration doing `other`'s
    /// work on its SMs (`None` when that lane is idle): its counted bytes per second priced alone.
    pub fn seconds_beside(&self, work: &IterationWork, sms: u32, other: Option<(&IterationWork, u32)>) -> f64 {
        let other = other.map(|(work, sms)| (self.priced(work), sms));
        self.priced_seconds_beside(&self.priced(work), sms, other.as_ref().map(|(work, sms)| (work, *sms)))
    }

    /// The counted bytes per second an iteration doing `work` on `sms` SMs moves on average,
    /// alone (what it does to the other lane: [`Contention`]).
    pub fn bytes_per_s(&self, work: &IterationWork, sms: u32) -> f64 {
        self.priced_bytes_per_s(&self.priced(work), sms)
    }

    /// What the other lane does to iterations of `kind`.
    pub fn contention(&self, kind: StepKind) -> Contention {
        match kind {
            StepKind::Decode => self.decode_contention,
            StepKind::Prefill => self.prefill_contention,
        }
    }

    /// `work`'s operators, listed once to be priced at many splits.
    pub(crate) fn priced(&self, work: &IterationWork) -> PricedWork {
        let ops = self.ops(work);
        PricedWork { kind: work.kind, bytes: ops.iter().map(|op| op.bytes).sum(), ops }
    }

    /// [`Self::seconds`] of listed work.
    pub(crate) fn priced_seconds(&self, work: &PricedWork, sms: u32, other: Option<f64>) -> f64 {
        self.priced_seconds_with(work, sms, other, self.contention(work.kind))
    }

    /// [`Self::priced_seconds`] with another contention (what the profile fits it with).
    fn priced_seconds_with(&self, work: &PricedWork, sms: u32, other: Option<f64>, contention: Contention) -> f64 {
        let (scale, beside) = self.scales(work.kind);
        let beside = if other.is_some() { interpolate(beside, sms) } else { 1.0 };
        interpolate(scale, sms) * beside * self.unscaled_seconds(work, sms, other, contention)
    }

    /// The iteration's fixed cost and its operators' times, before the scales.
    fn unscaled_seconds(&self, work: &PricedWork, sms: u32, other: Option<f64>, contention: Contention) -> f64 {
        let overhead = if work.kind == StepKind::Decode { self.decode_overhead_s } else { self.prefill_overhead_s };
        overhead + work.ops.iter().map(|op| self.op_seconds(op, work.kind, sms, other, contention)).sum::<f64>()
    }

    /// The step scale and the beside scale of iterations of `kind`.
    fn scales(&self, kind: StepKind) -> (&ScaleTable, &ScaleTable) {
        match kind {
            StepKind::Decode => (&self.decode_scale, &self.decode_beside_scale),
            StepKind::Prefill => (&self.prefill_scale, &self.prefill_beside_scale),
        }
    }

    /// The step scale of iterations of `kind` (`beside`: the beside scale), to set.
    fn scale_mut(&mut self, kind: StepKind, beside: bool) -> &mut Vec<(u32, f64)> {
        match (kind, beside) {
            (StepKind::Decode, false) => &mut self.decode_scale,
            (StepKind::Decode, true) => &mut self.decode_beside_scale,
            (StepKind::Prefill, false) => &mut self.prefill_scale,
            (StepKind::Prefill, true) => &mut self.prefill_beside_scale,
        }
    }

    /// Sets each kind's step scale ([`CostModel::decode_scale`]) from `steps` (iterations alone:
    /// the work, its SMs and the measured seconds): per budget, the geometric mean of measured
    /// over predicted. A kind without steps keeps its scale.
    pub fn fit_step_scales(&mut self, steps: &[(IterationWork, u32, f64)]) {
        for kind in [StepKind::Prefill, StepKind::Decode] {
            let ratios = steps.iter().filter(|s| s.0.kind == kind).map(|&(work, sms, seconds)| {
                (sms, seconds / self.unscaled_seconds(&self.priced(&work), sms, None, self.contention(kind)))
            });
            if let Some(scale) = per_budget(ratios) {
                *self.scale_mut(kind, false) = scale;
            }
        }
    }

    /// Sets each kind's beside scale ([`CostModel::decode_beside_scale`]) from `steps`
    /// (iterations beside the other lane: the work, its SMs, the other lane's counted bytes per
    /// second and the measured seconds), against the prediction with the step scale and the
    /// contention: per budget, the geometric mean of measured over predicted. A kind without
    /// steps keeps its scale.
    pub fn fit_beside_scales(&mut self, steps: &[(IterationWork, u32, f64, f64)]) {
        for kind in [StepKind::Prefill, StepKind::Decode] {
            let ratios = steps.iter().filter(|s| s.0.kind == kind).map(|&(work, sms, other, seconds)| {
                let predicted = interpolate(self.scales(kind).0, sms)
                    * self.unscaled_seconds(&self.priced(&work), sms, Some(other), self.contention(kind));
                (sms, seconds / predicted)
            });
            if let Some(scale) = per_budget(ratios) {
                *self.scale_mut(kind, true) = scale;
            }
        }
    }

    /// [`Self::seconds_beside`] of listed work.
    pub(crate) fn priced_seconds_beside(&self, work: &PricedWork, sms: u32, other: Option<(&PricedWork, u32)>) -> f64 {
        self.priced_seconds(work, sms, other.map(|(other, other_sms)| self.priced_bytes_per_s(other, other_sms)))
    }

    /// [`Self::bytes_per_s`] of listed work.
    pub(crate) fn priced_bytes_per_s(&self, work: &PricedWork, sms: u32) -> f64 {
        work.bytes / self.priced_seconds(work, sms, None).max(1e-9)
    }

    /// The contention of each kind that best explains `steps` (iterations run beside the other
    /// lane: the work, its SMs, the other lane's counted bytes per second and the measured
    /// seconds): on a grid of compute factors 1 to 2 (steps of 0.02) and bandwidth weights 0 to
    /// 8 (steps of 0.1), minimizing the squared log-ratio of predicted to measured times. A kind
    /// without a step keeps its contention.
    pub fn fit_contention(&mut self, steps: &[(IterationWork, u32, f64, f64)]) {
        for kind in [StepKind::Prefill, StepKind::Decode] {
            let of_kind: Vec<(PricedWork, u32, f64, f64)> = steps
                .iter()
                .filter(|s| s.0.kind == kind)
                .map(|&(work, sms, other, seconds)| (self.priced(&work), sms, other, seconds))
                .collect();
            if of_kind.is_empty() {
                continue;
            }
            let error = |c: Contention| -> f64 {
                of_kind
                    .iter()
                    .map(|(work, sms, other, seconds)| {
                        (self.priced_seconds_with(work, *sms, Some(*other), c) / seconds).ln().powi(2)
                    })
                    .sum()
            };
            let candidates = (0..=50).flat_map(|i| {
                (0..=80).map(move |j| Contention {
                    compute: 1.0 + 0.02 * f64::from(i),
                    bandwidth_weight: 0.1 * f64::from(j),
                })
            });
            let best = candidates.map(|c| (error(c), c)).min_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, c)| c);
            if let Some(best) = best {
                match kind {
                    StepKind::Decode => self.decode_contention = best,
                    StepKind::Prefill => self.prefill_contention = best,
                }
            }
        }
    }

    /// Seconds one launch of `sample`'s operator in a decode iteration takes on its SMs, alone
    /// (`other` is `None`) or beside a prefill moving `other` counted bytes per second (as the
    /// launches of an iteration are priced, without its scales).
    pub fn launch_seconds(&self, sample: &Sample, other: Option<f64>) -> f64 {
        let op = OpWork { op: sample.op, flops: sample.flops, bytes: sample.bytes, launches: 1.0 };
        self.op_seconds(&op, StepKind::Decode, sample.sms, other, self.decode_contention)
    }

    /// Sets [`CostModel::decode_beside`] from `launches` (a decode iteration's launches timed
    /// beside a prefill): per operator class and budget, the geometric mean of their time over
    /// what they take alone. A class without a launch keeps its factors.
    pub fn fit_decode_beside(&mut self, launches: &[Sample]) {
        let factors = |op: Op| {
            per_budget(
                launches.iter().filter(|s| s.op == op).map(|s| (s.sms, s.seconds / self.launch_seconds(s, None))),
            )
        };
        let (gemm, attention, rest) = (factors(Op::Gemm), factors(Op::DecodeAttention), factors(Op::Rest));
        let beside = &mut self.decode_beside;
        for (table, fitted) in [(&mut beside.gemm, gemm), (&mut beside.attention, attention), (&mut beside.rest, rest)]
        {
            if let Some(fitted) = fitted {
                *table = fitted;
            }
        }
    }
}

/// What a prefill running beside it does to a decode iteration's launches of each operator class:
/// `(SMs, time beside / time alone)` by decode budget, ascending, interpolated between budgets and
/// held beyond the ends; empty for a class the profile did not time beside a prefill.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DecodeBeside {
    pub gemm: Vec<(u32, f64)>,
    pub attention: Vec<(u32, f64)>,
    pub rest: Vec<(u32, f64)>,
}

impl DecodeBeside {
    /// The factors of operator class `op` (prefill attention has none: not a decode operator).
    pub fn of(&self, op: Op) -> &[(u32, f64)] {
        match op {
            Op::Gemm => &self.gemm,
            Op::DecodeAttention => &self.attention,
            Op::Rest => &self.rest,
            Op::PrefillAttention => &[],
        }
    }
}

/// An iteration's operators with their total bytes, as [`CostModel::priced`] lists them.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct PricedWork {
    kind: StepKind,
    ops: Vec<OpWork>,
    bytes: f64,
}

/// Factors by budget: `(SMs, factor)`, ascending.
type ScaleTable = [(u32, f64)];

/// `table`'s factor at `sms`: linear between its budgets, held beyond its ends, 1 when empty.
fn interpolate(table: &ScaleTable, sms: u32) -> f64 {
    let Some(&(first, low)) = table.first() else { return 1.0 };
    if sms <= first {
        return low;
    }
    match table.windows(2).find(|w| sms <= w[1].0) {
        Some(w) => {
            let ((a, fa), (b, fb)) = (w[0], w[1]);
            fa + f64::from(sms - a) / f64::from(b - a) * (fb - fa)
        }
        None => table[table.len() - 1].1,
    }
}

/// Per budget, the geometric mean of `ratios` (`(SMs, ratio)`), by ascending budget; `None`
/// without a finite positive ratio.
fn per_budget(ratios: impl Iterator<Item = (u32, f64)>) -> Option<Vec<(u32, f64)>> {
    let mut logs: Vec<(u32, f64)> = ratios.map(|(sms, r)| (sms, r.ln())).filter(|(_, l)| l.is_finite()).collect();
    logs.sort_by_key(|&(sms, _)| sms);
    let table: Vec<(u32, f64)> = logs
        .chunk_by(|a, b| a.0 == b.0)
        .map(|same| (same[0].0, (same.iter().map(|s| s.1).sum::<f64>() / same.len() as f64).exp()))
        .collect();
    (!table.is_empty()).then_some(table)
}

/// One timed operator launch: what it did, on how many SMs, and how long it took.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub op: Op,
    pub flops: f64,
    pub bytes: f64,
    pub sms: u32,
    pub seconds: f64,
}

/// The curve that best explains `samples` (all of one operator class, each one launch timed
/// alone) on a device of `sm_count` SMs whose streaming read reaches `bandwidth(sms)`, minimizing
/// the squared log-ratio of predicted to measured times (a sample's prediction is its launch time
/// plus the larger of its compute and memory times, as [`CostModel::seconds`] prices each operator). The launch
/// time (steps of 0.5 us up to 40 us), the bandwidth fraction (steps of 0.025) and the compute
/// curve (the saturation on a grid of 4 SMs, the decay in steps of 0.05, the per-SM rate by a
/// golden-section search) are fitted in turn, three times. A class without FLOPs gets only its
/// launch time and bandwidth fraction. `None` without a sample.
pub fn fit_op_curve(samples: &[Sample], sm_count: u32, bandwidth: impl Fn(u32) -> f64) -> Option<OpCurve> {
    if samples.is_empty() {
        return None;
    }
    let streaming: Vec<f64> = samples.iter().map(|s| s.bytes / bandwidth(s.sms)).collect();
    let error = |curve: &OpCurve| -> f64 {
        samples
            .iter()
            .zip(&streaming)
            .map(|(s, &m)| {
                let predicted = curve.launch_s + curve.seconds(s.flops, s.sms).max(m / curve.bandwidth_fraction);
                (predicted / s.seconds).ln().powi(2)
            })
            .sum()
    };
    let best_of = |candidates: &mut dyn Iterator<Item = OpCurve>, current: OpCurve| -> OpCurve {
        candidates.min_by(|a, b| error(a).total_cmp(&error(b))).unwrap_or(current)
    };
    let memory_side = |curve: OpCurve| -> OpCurve {
        let curve =
            best_of(&mut (4..=40).map(|k| OpCurve { bandwidth_fraction: 0.025 * f64::from(k), ..curve }), curve);
        best_of(&mut (0..=80).map(|k| OpCurve { launch_s: 0.5e-6 * f64::from(k), ..curve }), curve)
    };
    // The per-SM rate a sample implies if it is compute-bound below saturation, to bracket the
    // search.
    let implied: Vec<f64> =
        samples.iter().filter(|s| s.flops > 0.0).map(|s| s.flops / (s.seconds * f64::from(s.sms))).collect();
    let (low, high) = implied.iter().fold((f64::MAX, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
    if implied.is_empty() {
        let mut curve = OpCurve::new(1.0, f64::from(sm_count), 1.0);
        for _ in 0..3 {
            curve = memory_side(curve);
        }
        return Some(curve);
    }
    let mut curve = OpCurve::new(high, f64::from(sm_count), 1.0);
    for _ in 0..3 {
        curve = memory_side(curve);
        let mut best: Option<(f64, OpCurve)> = None;
        for saturation in (4..=sm_count).step_by(4).map(f64::from).chain([f64::from(sm_count)]) {
            for step in 0..=20 {
                let decay = f64::from(step) * 0.05;
                let at = |log_rate: f64| OpCurve { flops_per_sm: log_rate.exp(), saturation, decay, ..curve };
                // Golden-section search of the log rate between a quarter of the lowest implied
                // rate and four times the highest.
                let (mut a, mut b) = ((low / 4.0).ln(), (high * 4.0).ln());
                let phi = (5f64.sqrt() - 1.0) / 2.0;
                for _ in 0..40 {
                    let (c, d) = (b - phi * (b - a), a + phi * (b - a));
                    if error(&at(c)) < error(&at(d)) {
                        b = d;
                    } else {
                        a = c;
                    }
                }
                let candidate = at((a + b) / 2.0);
                let e = error(&candidate);
                if best.as_ref().is_none_or(|(be, _)| e < *be) {
                    best = Some((e, candidate));
                }
            }
        }
        curve = best.map_or(curve, |(_, c)| c);
    }
    Some(curve)
}

/// The median and the 90th percentile of `|predicted / measured − 1|` over pairs.
pub fn relative_errors(pairs: impl IntoIterator<Item = (f64, f64)>) -> Option<(f64, f64)> {
    let mut errors: Vec<f64> =
        pairs.into_iter().map(|(predicted, measured)| (predicted / measured - 1.0).abs()).collect();
    if errors.is_empty() || errors.iter().any(|e| !e.is_finite()) {
        return None;
    }
    errors.sort_by(f64::total_cmp);
    let at = |q: f64| errors[((errors.len() - 1) as f64 * q).round() as usize];
    Some((at(0.5), at(0.9)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// Llama-3.1-8B's shape, and an H200-like device: 132 SMs, ~4.5 TB/s, ~6 TFLOP/s of bf16
    /// tensor work per SM.
    pub(crate) fn llama8b_h200() -> CostModel {
        let model = ModelShape {
            layers: 32,
            hidden: 4096,
            intermediate: 14336,
            heads: 32,
            kv_heads: 8,
            head_dim: 128,
            vocab: 128_256,
        };
        let bandwidth = vec![(1, 0.11e12), (16, 1.73e12), (32, 2.96e12), (64, 4.24e12), (132, 4.53e12)];
        let gemm = OpCurve::new(6.0e12, 132.0, 1.0);
        let prefill = OpCurve::new(4.5e12, 132.0, 1.0);
        let decode = OpCurve::new(1.0e12, 132.0, 1.0);
        CostModel::new(model, 132, bandwidth, gemm, prefill, decode, 2e-3, 0.3e-3).unwrap()
    }

    #[test]
    fn decode_is_memory_bound_and_prefill_compute_bound() {
        let cost = llama8b_h200();
        // A decode of 64 sequences with 2k tokens each reads the weights (16 GB) and 17.2 GB of
        // KV: 7.37 ms at 4.53 TB/s (DESIGN.md's floor), with overheads and the rest a little
        // more; about as much at 64 SMs, much more at 16.
        let decode = IterationWork::of(StepKind::Decode, (0..64).map(|_| (1, 2048)));
        let all = cost.seconds(&decode, 132, None);
        assert!((7.37e-3..8.0e-3).contains(&all), "{all}");
        assert!(cost.seconds(&decode, 64, None) < 1.1 * all);
        assert!(cost.seconds(&decode, 16, None) > 2.0 * all);
        // An 8k prompt: ~130 TFLOP of GEMMs, compute-bound: about half the SMs, about twice the time.
        let prefill = IterationWork::of(StepKind::Prefill, [(8192, 0)]);
        let (full, half) = (cost.seconds(&prefill, 132, None), cost.seconds(&prefill, 66, None));
        assert!((1.8..2.1).contains(&(half / full)), "{full} {half}");
        // Next to a lane that reads 3 TB/s, the decode gets what is left of the device's HBM.
        let shared = cost.seconds(&decode, 64, Some(3.0e12));
        assert!(shared > 2.0 * cost.seconds(&decode, 64, None), "{shared}");
        // And the prefill reads far less than it could: compute bound.
        assert!(cost.bytes_per_s(&prefill, 66) < 0.1 * cost.bandwidth(132));
    }

    /// A mixed batch (chunked's prefill iteration with decode rows in it): the rows read their
    /// cache as decode attention does, not at the prefill curve's bandwidth fraction (0.1 in an
    /// H200 profile, fitted on prompt chunks), and add no launch.
    #[test]
    fn elementwise_launches_follow_the_backends_decode_fusions() {
        let mut cost = llama8b_h200();
        let rest = |cost: &CostModel, work: &IterationWork| -> (f64, f64) {
            let ops = cost.ops(work);
            let rest: Vec<&OpWork> = ops.iter().filter(|op| op.op == Op::Rest).collect();
            (rest.iter().map(|op| op.launches).sum(), rest.iter().map(|op| op.bytes).sum())
        };
        let decode = |rows: usize| IterationWork::of(StepKind::Decode, (0..rows).map(|_| (1, 2048)));
        let prefill = IterationWork::of(StepKind::Prefill, [(512, 0)]);
        let layers = 32.0;
        // No fusion: two norms and the RoPE a layer, in every iteration.
        assert_eq!(rest(&cost, &decode(8)).0, 3.0 * layers);
        assert_eq!(rest(&cost, &prefill).0, 3.0 * layers);
        // Norms inside the GEMMs up to 32 rows and the RoPE inside decode attention: a decode step
        // of 8 rows launches no elementwise kernel, one of 64 the two norms; prefill all three.
        cost.decode_fusions = DecodeFusions { norm_rows: 32, rope: true };
        assert_eq!(rest(&cost, &decode(8)), (0.0, 0.0));
        let (launches, bytes) = rest(&cost, &decode(64));
        assert_eq!(launches, 2.0 * layers);
        assert_eq!(bytes, layers * 64.0 * 2.0 * 8.0 * cost.model.hidden as f64);
        assert_eq!(rest(&cost, &prefill).0, 3.0 * layers);
        // Fewer launches, a shorter predicted step.
        let fused = cost.seconds(&decode(8), 64, None);
        cost.decode_fusions = DecodeFusions::default();
        assert!(fused < cost.seconds(&decode(8), 64, None));
    }

    #[test]
    fn decode_rows_in_a_prefill_iteration_are_priced_as_decode_attention() {
        let mut cost = llama8b_h200();
        cost.prefill_attention.bandwidth_fraction = 0.1;
        let rows = (0..24).map(|_| (1, 2048));
        let mixed = IterationWork::of(StepKind::Prefill, [(256, 0)]).with(rows.clone());
        assert_eq!((mixed.single_rows, mixed.single_kv_tokens), (24, 24.0 * 2049.0));
        let attention: Vec<OpWork> = cost
            .ops(&mixed)
            .into_iter()
            .filter(|op| matches!(op.op, Op::PrefillAttention | Op::DecodeAttention))
            .collect();
        let chunk = cost.op_work(&OpShape::Attention {
            kind: StepKind::Prefill,
            tokens: 256,
            seqs: 1,
            attended: 256.0 * 257.0 / 2.0,
            kv_tokens: 256.0,
        });
        let kv = 24.0 * 2049.0;
        let decode = cost.op_work(&OpShape::Attention {
            kind: StepKind::Decode,
            tokens: 24,
            seqs: 24,
            attended: kv,
            kv_tokens: kv,
        });
        let layers = 32.0;
        assert_eq!(attention.len(), 2, "{attention:?}");
        assert_eq!(
            (attention[0].op, attention[0].bytes, attention[0].launches),
            (Op::PrefillAttention, layers * chunk.bytes, layers)
        );
        assert_eq!(
            (attention[1].op, attention[1].bytes, attention[1].launches),
            (Op::DecodeAttention, layers * decode.bytes, 0.0)
        );
        // The rows' 6.4 GB of KV take ~1.6 ms at 4.53 TB/s: the mixed iteration costs about its
        // 280 tokens' GEMMs and the prompt's attention plus that, not 10x that.
        let kv_seconds = layers * decode.bytes / cost.bandwidth(132);
        let tokens_alone = IterationWork::of(StepKind::Prefill, [(280, 0)]);
        let extra = cost.seconds(&mixed, 132, None) - cost.seconds(&tokens_alone, 132, None);
        assert!(extra > 0.9 * kv_seconds && extra < 1.5 * kv_seconds, "{extra} s for {kv_seconds} s of KV");
        // A decode iteration of the same rows is priced as before.
        let alone = IterationWork::of(StepKind::Decode, rows);
        assert_eq!(cost.ops(&alone).iter().filter(|op| op.op == Op::DecodeAttention).count(), 1);
    }

    /// Factors within ±3% of 1, from a xorshift generator seeded with `seed`.
    fn jitter(mut seed: u64) -> impl FnMut() -> f64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            1.0 + 0.03 * ((seed % 2001) as f64 / 1000.0 - 1.0)
        }
    }

    /// Samples from a known curve (with ±3% noise) over budgets and sizes, some of them
    /// memory-bound: the fit recovers the curve closely enough to predict held-out samples
    /// within a few percent.
    #[test]
    fn a_fit_recovers_a_known_curve() {
        let truth =
            OpCurve { flops_per_sm: 5.0e12, saturation: 96.0, decay: 0.3, bandwidth_fraction: 0.7, launch_s: 4e-6 };
        let bandwidth = |sms: u32| 4.5e12 * (1.0 - (-f64::from(sms) / 30.0).exp());
        let mut jitter = jitter(0x2545_F491_4F6C_DD1D);
        let mut samples = Vec::new();
        for sms in (8..=132).step_by(8) {
            for (flops, bytes) in [(2e12, 1e9), (2e13, 4e9), (5e11, 4e10), (1e11, 1e8)] {
                let seconds = (4e-6 + truth.seconds(flops, sms).max(bytes / (0.7 * bandwidth(sms)))) * jitter();
                samples.push(Sample { op: Op::Gemm, flops, bytes, sms, seconds });
            }
        }
        let (train, held): (Vec<_>, Vec<_>) = samples.iter().enumerate().partition(|(i, _)| i % 4 != 0);
        let train: Vec<Sample> = train.into_iter().map(|(_, s)| *s).collect();
        let fitted = fit_op_curve(&train, 132, bandwidth).unwrap();
        assert!((fitted.flops_per_sm / truth.flops_per_sm - 1.0).abs() < 0.05, "{fitted:?}");
        assert!((fitted.saturation - truth.saturation).abs() <= 8.0, "{fitted:?}");
        assert!((fitted.bandwidth_fraction - 0.7).abs() <= 0.05, "{fitted:?}");
        let predicted = held.iter().map(|(_, s)| {
            let memory = s.bytes / (fitted.bandwidth_fraction * bandwidth(s.sms));
            (fitted.launch_s + fitted.seconds(s.flops, s.sms).max(memory), s.seconds)
        });
        let (median, p90) = relative_errors(predicted).unwrap();
        assert!(median < 0.03 && p90 < 0.06, "{median} {p90}");
        assert_eq!(fit_op_curve(&[], 132, bandwidth), None);
        assert_eq!(relative_errors([(1.0, 2.0), (3.0, 3.0), (4.0, 2.0)]), Some((0.5, 1.0)));
    }

    /// Iterations run beside the other lane, timed with a known contention (±3% noise): the fit
    /// recovers it, for each kind on its own, and predicts held-out ones within a few percent.
    #[test]
    fn a_fit_recovers_a_known_contention() {
        let mut truth = llama8b_h200();
        truth.decode_contention = Contention { compute: 1.1, bandwidth_weight: 3.0 };
        truth.prefill_contention = Contention { compute: 1.3, bandwidth_weight: 0.5 };
        let mut jitter = jitter(0x9E37_79B9_7F4A_7C15);
        let mut steps = Vec::new();
        for (prompt, cached) in [(512, 0), (2048, 0), (8192, 0), (2048, 8192)] {
            for (batch, context) in [(1, 1024), (16, 2048), (64, 2048)] {
                for decode_sms in [32, 64, 96] {
                    let prefill = IterationWork::of(StepKind::Prefill, [(prompt, cached)]);
                    let decode = IterationWork::of(StepKind::Decode, (0..batch).map(|_| (1, context)));
                    let prefill_sms = 132 - decode_sms;
                    let (p_rate, d_rate) =
                        (truth.bytes_per_s(&prefill, prefill_sms), truth.bytes_per_s(&decode, decode_sms));
                    let p = truth.seconds(&prefill, prefill_sms, Some(d_rate)) * jitter();
                    let d = truth.seconds(&decode, decode_sms, Some(p_rate)) * jitter();
                    steps.push((prefill, prefill_sms, d_rate, p));
                    steps.push((decode, decode_sms, p_rate, d));
                }
            }
        }
        let (train, held): (Vec<_>, Vec<_>) = steps.iter().enumerate().partition(|(i, _)| i % 4 < 2);
        let train: Vec<_> = train.into_iter().map(|(_, s)| *s).collect();
        let mut fitted = llama8b_h200();
        fitted.fit_contention(&train);
        assert!((fitted.prefill_contention.compute - 1.3).abs() <= 0.04, "{:?}", fitted.prefill_contention);
        assert!((fitted.decode_contention.bandwidth_weight - 3.0).abs() <= 0.5, "{:?}", fitted.decode_contention);
        let predicted =
            held.iter().map(|(_, (work, sms, other, seconds))| (fitted.seconds(work, *sms, Some(*other)), *seconds));
        let (median, p90) = relative_errors(predicted).unwrap();
        assert!(median < 0.03 && p90 < 0.05, "{median} {p90}");
        // Without contention the same model is far off on them.
        let plain = llama8b_h200();
        let predicted =
            held.iter().map(|(_, (work, sms, other, seconds))| (plain.seconds(work, *sms, Some(*other)), *seconds));
        assert!(relative_errors(predicted).unwrap().1 > 0.15);
        // A kind without steps keeps its contention; a bad one is refused on load.
        let mut only_prefill = llama8b_h200();
        only_prefill
            .fit_contention(&train.iter().filter(|s| s.0.kind == StepKind::Prefill).copied().collect::<Vec<_>>());
        assert_eq!(only_prefill.decode_contention, Contention::default());
        let mut bad = llama8b_h200();
        bad.decode_contention.compute = 0.5;
        assert!(CostModel::from_json(&bad.to_json()).is_err());
    }

    /// A decode iteration's launches timed beside prefills, slower by a known factor per class and
    /// budget (±3% noise): the fit recovers the factors, which then price those launches beside a
    /// prefill and no others; a model saved without them reads back as before.
    #[test]
    fn decode_launches_beside_a_prefill_take_factors_per_class_and_budget() {
        let model = llama8b_h200();
        let truth = |op: Op, sms: u32| match op {
            Op::Gemm => 1.5 - f64::from(sms) / 264.0,
            _ => 1.3 - f64::from(sms) / 528.0,
        };
        let mut jitter = jitter(0x6A09_E667_F3BC_C908);
        let mut launches = Vec::new();
        for (batch, context) in [(1, 1024), (16, 2048), (64, 2048), (32, 4096)] {
            let decode = IterationWork::of(StepKind::Decode, (0..batch).map(|_| (1, context)));
            for op in model.ops(&decode) {
                let layers = if op.launches >= 1.0 { op.launches } else { 1.0 };
                for sms in [16, 32, 64, 96] {
                    let mut s =
                        Sample { op: op.op, flops: op.flops / layers, bytes: op.bytes / layers, sms, seconds: 0.0 };
                    s.seconds = truth(op.op, sms) * model.launch_seconds(&s, None) * jitter();
                    launches.push(s);
                }
            }
        }
        let mut fitted = llama8b_h200();
        fitted.fit_decode_beside(&launches);
        for (op, table) in
            [(Op::Gemm, &fitted.decode_beside.gemm), (Op::DecodeAttention, &fitted.decode_beside.attention)]
        {
            assert_eq!(table.iter().map(|f| f.0).collect::<Vec<_>>(), [16, 32, 64, 96]);
            for &(sms, factor) in table {
                assert!((factor / truth(op, sms) - 1.0).abs() < 0.02, "{op:?} {sms}: {factor}");
            }
        }
        // Beside a prefill a decode launch takes its factor (between budgets interpolated); alone,
        // or in a prefill iteration, it does not.
        let gemm =
            Sample { op: Op::Gemm, flops: 2.0 * 4096.0 * 6144.0, bytes: 2.0 * 4096.0 * 6144.0, sms: 48, seconds: 0.0 };
        let ratio = fitted.launch_seconds(&gemm, Some(1e12)) / fitted.launch_seconds(&gemm, None);
        assert!((ratio / truth(Op::Gemm, 48) - 1.0).abs() < 0.02, "{ratio}");
        assert_eq!(fitted.launch_seconds(&gemm, None), model.launch_seconds(&gemm, None));
        let prefill = IterationWork::of(StepKind::Prefill, [(2048, 0)]);
        assert_eq!(fitted.seconds(&prefill, 96, Some(1e12)), model.seconds(&prefill, 96, Some(1e12)));
        let decode = IterationWork::of(StepKind::Decode, (0..16).map(|_| (1, 2048)));
        assert!(fitted.seconds(&decode, 32, Some(1e12)) > 1.2 * fitted.seconds(&decode, 32, None));
        // Fitting on no launch leaves them; a model saved before they existed reads back without;
        // a bad factor is refused.
        let before = fitted.clone();
        fitted.fit_decode_beside(&[]);
        assert_eq!(fitted, before);
        let mut json: serde_json::Value = serde_json::from_str(&model.to_json()).unwrap();
        json.as_object_mut().unwrap().remove("decode_beside");
        assert_eq!(CostModel::from_json(&json.to_string()).unwrap(), model);
        let mut bad = before;
        bad.decode_beside.attention = vec![(32, 1.2), (16, 1.3)];
        assert!(CostModel::from_json(&bad.to_json()).is_err());
    }

    #[test]
    fn scales_fitted_per_budget_take_up_what_the_operators_miss() {
        // Steps alone run 0.8x their operators at 132 SMs and 1.0x at 16 (consecutive launches
        // hide part of each launch's cost), and beside the other lane 1.25x what the contention
        // says at 36 SMs and 1.0x at 100.
        let truth = |sms: u32| 1.0 - 0.2 * f64::from(sms - 16) / 116.0;
        let beside_truth = |sms: u32| if sms <= 36 { 1.25 } else { 1.0 };
        let model = llama8b_h200();
        let mut jitter = jitter(0x2545_F491_4F6C_DD1D);
        let mut alone = Vec::new();
        let mut beside = Vec::new();
        for work in [
            IterationWork::of(StepKind::Decode, (0..16).map(|_| (1, 2048))),
            IterationWork::of(StepKind::Decode, [(1, 1024)]),
            IterationWork::of(StepKind::Prefill, [(2048, 0)]),
        ] {
            for sms in [16, 36, 64, 100, 132] {
                alone.push((work, sms, truth(sms) * model.seconds(&work, sms, None) * jitter()));
                let other = 1.0e12;
                let seconds = beside_truth(sms) * truth(sms) * model.seconds(&work, sms, Some(other)) * jitter();
                beside.push((work, sms, other, seconds));
            }
        }
        let mut fitted = model.clone();
        fitted.fit_step_scales(&alone);
        fitted.fit_beside_scales(&beside);
        // Within the jitter (3%) of the truth.
        for kind in [StepKind::Decode, StepKind::Prefill] {
            let (scale, beside_scale) = fitted.scales(kind);
            assert!(scale.len() == 5 && beside_scale.len() == 5, "a factor per budget: {scale:?} {beside_scale:?}");
            for &(sms, factor) in scale {
                assert!((factor / truth(sms) - 1.0).abs() < 0.03, "{kind:?} at {sms}: {factor}");
            }
            for &(sms, factor) in beside_scale {
                assert!((factor / beside_truth(sms) - 1.0).abs() < 0.03, "{kind:?} beside at {sms}: {factor}");
            }
        }
        // Between budgets the scales are interpolated, beyond them held; alone ignores the
        // beside scale.
        let work = IterationWork::of(StepKind::Decode, (0..16).map(|_| (1, 2048)));
        let at = |sms: u32| fitted.seconds(&work, sms, None) / model.seconds(&work, sms, None);
        assert!((at(50) / (0.5 * (truth(36) + truth(64))) - 1.0).abs() < 0.03, "{}", at(50));
        assert!((at(8) / truth(16) - 1.0).abs() < 0.03 && (at(132) / truth(132) - 1.0).abs() < 0.03);
        let beside_at = |sms: u32| fitted.seconds(&work, sms, Some(1.0e12)) / model.seconds(&work, sms, Some(1.0e12));
        assert!((beside_at(16) / (1.25 * truth(16)) - 1.0).abs() < 0.03, "{}", beside_at(16));
        // Saved and read back; a bad table is refused.
        assert_eq!(CostModel::from_json(&fitted.to_json()).unwrap(), fitted);
        let mut bad = fitted.clone();
        bad.decode_scale = vec![(64, 1.0), (32, 1.0)];
        assert!(CostModel::from_json(&bad.to_json()).is_err());
        bad.decode_scale = vec![(32, f64::NAN)];
        assert!(CostModel::from_json(&bad.to_json()).is_err());
    }

    #[test]
    fn compute_saturates_and_then_decays() {
        let curve = OpCurve::new(1e12, 64.0, 0.25);
        assert!((curve.seconds(64e12, 64) - 1.0).abs() < 1e-12);
        assert!((curve.seconds(64e12, 32) - 2.0).abs() < 1e-12);
        let beyond = curve.seconds(64e12, 128);
        assert!((beyond - 2f64.powf(-0.25)).abs() < 1e-12);
    }

    #[test]
    fn a_saved_model_reads_back_and_bad_ones_are_refused() {
        let cost = llama8b_h200();
        let back = CostModel::from_json(&cost.to_json()).unwrap();
        assert_eq!(back, cost);
        let mut bad = cost.clone();
        bad.gemm.flops_per_sm = f64::NAN;
        assert!(CostModel::from_json(&bad.to_json().replace("NaN", "null")).is_err());
        let mut bad = cost;
        bad.bandwidth = vec![(4, 1e12)];
        assert!(CostModel::from_json(&bad.to_json()).is_err());
        assert!(CostModel::from_json("{").is_err());
    }
}
