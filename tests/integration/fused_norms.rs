//! The model's decode path with the residual adds and RMSNorms inside the GEMMs (what the CUDA
//! backend runs on Hopper: `Backend::fuses_norms`), on the CPU: a backend that does the fused
//! operations with the kernels' references (square sums per 64 columns, the norm factor from
//! them, the gains folded into the weights) against the plain CPU backend, on random Llama- and
//! Qwen2-style models, and on SmolLM2 against transformers' greedy continuations.

use nexus::kernels::reference;
use nexus::kernels::{PagedKvLayout, QkvLayout, RopeConfig};
use nexus::runtime::Result;
use nexus::runtime::engine::Engine;
use nexus::runtime::engine::batch::{SeqChunk, build_step};
use nexus::runtime::engine::generate::generate_text;
use nexus::runtime::engine::kv_cache::BlockManager;
use nexus::runtime::model::LlamaModel;
use nexus::runtime::model::backend::{Backend, HostLogits, LogitsReadback, OpTime, StepInput, StepKind};
use nexus::runtime::model::cpu::{CpuBackend, CpuKvPool, CpuMatrix, CpuPhase};
use nexus::runtime::weights::config::{Architecture, ModelConfig, RopeScaling, RopeStyle};
use nexus::runtime::weights::gguf::HostTensor;

use crate::oracle;

/// The CPU backend with the fusions the CUDA backend runs in decode steps on Hopper; everything
/// else is [`CpuBackend`]'s.
#[derive(Clone, Copy, Debug, Default)]
struct FusingCpu;

/// `rms_norm(x)` without gain: each row times `1 / sqrt(mean of squares + eps)`, the factor made
/// from the row's square sums per 64 columns, as the fused GEMMs make it.
fn normalized(x: &CpuMatrix, eps: f32) -> Result<CpuMatrix> {
    let sums = reference::square_sums(&x.data, x.cols)?;
    let scales = reference::rms_scales_from_square_sums(&sums, x.cols, eps)?;
    let data = x.data.iter().enumerate().map(|(i, v)| v * scales[i / x.cols]).collect();
    Ok(CpuMatrix { rows: x.rows, cols: x.cols, data })
}

impl Backend for FusingCpu {
    type Weight = HostTensor;
    type Activation = CpuMatrix;
    type KvPool = CpuKvPool;
    type Step = StepInput;
    type Phase = CpuPhase;
    type Pending = HostLogits;

    fn sm_count(&self) -> u32 {
        CpuBackend.sm_count()
    }
    fn device_name(&self) -> String {
        CpuBackend.device_name()
    }
    fn new_phase(&self) -> Result<CpuPhase> {
        CpuBackend.new_phase()
    }
    fn set_budget(&self, phase: &mut CpuPhase, sms: u32) -> Result<()> {
        CpuBackend.set_budget(phase, sms)
    }
    fn synchronize(&self) -> Result<()> {
        CpuBackend.synchronize()
    }
    fn upload(&self, tensor: HostTensor) -> Result<HostTensor> {
        CpuBackend.upload(tensor)
    }
    fn random_weight(&self, shape: Vec<usize>, seed: u64, mean: f32, spread: f32) -> Result<HostTensor> {
        CpuBackend.random_weight(shape, seed, mean, spread)
    }
    fn alloc_kv_pool(&self, layout: PagedKvLayout) -> Result<CpuKvPool> {
        CpuBackend.alloc_kv_pool(layout)
    }
    fn prepare(&self, phase: &CpuPhase, step: &StepInput) -> Result<StepInput> {
        CpuBackend.prepare(phase, step)
    }
    fn embedding(&self, phase: &CpuPhase, table: &HostTensor, step: &StepInput) -> Result<CpuMatrix> {
        CpuBackend.embedding(phase, table, step)
    }
    fn rms_norm(&self, phase: &CpuPhase, x: &CpuMatrix, weight: &HostTensor, eps: f32) -> Result<CpuMatrix> {
        CpuBackend.rms_norm(phase, x, weight, eps)
    }
    fn fused_add_rms_norm(
        &self,
        phase: &CpuPhase,
        x: &CpuMatrix,
        residual: &mut CpuMatrix,
        weight: &HostTensor,
        eps: f32,
    ) -> Result<CpuMatrix> {
        CpuBackend.fused_add_rms_norm(phase, x, residual, weight, eps)
    }
    fn linear(
        &self,
        phase: &CpuPhase,
        step: &StepInput,
        x: &CpuMatrix,
        weight: &HostTensor,
        bias: Option<&HostTensor>,
    ) -> Result<CpuMatrix> {
        CpuBackend.linear(phase, step, x, weight, bias)
    }
    fn folds_norm_gains(&self) -> bool {
        true
    }
    fn fold_norm_gain(&self, mut weight: HostTensor, gain: &HostTensor) -> Result<HostTensor> {
        reference::fold_norm_gain(&mut weight.data, &gain.data)?;
        Ok(weight)
    }
    fn fuses_norms(&self, _phase: &CpuPhase, step: &StepInput) -> bool {
        step.kind == StepKind::Decode
    }
    fn linear_add(
        &self,
        phase: &CpuPhase,
        step: &StepInput,
        x: &CpuMatrix,
        weight: &HostTensor,
        residual: &mut CpuMatrix,
    ) -> Result<()> {
        let product = CpuBackend.linear(phase, step, x, weight, None)?;
        assert_eq!((product.rows, product.cols), (residual.rows, residual.cols), "linear_add's shapes");
        residual.data.iter_mut().zip(&product.data).for_each(|(r, p)| *r += p);
        Ok(())
    }
    fn linear_normalized(
        &self,
        phase: &CpuPhase,
        step: &StepInput,
        x: &CpuMatrix,
        weight: &HostTensor,
        bias: Option<&HostTensor>,
        eps: f32,
    ) -> Result<CpuMatrix> {
        CpuBackend.linear(phase, step, &normalized(x, eps)?, weight, bias)
    }
    fn linear_silu_and_mul_normalized(
        &self,
        phase: &CpuPhase,
        step: &StepInput,
        x: &CpuMatrix,
        gate_up: &HostTensor,
        eps: f32,
    ) -> Result<CpuMatrix> {
        CpuBackend.linear_silu_and_mul(phase, step, &normalized(x, eps)?, gate_up)
    }
    fn rope_and_write_kv(
        &self,
        phase: &CpuPhase,
        qkv: &mut CpuMatrix,
        layout: QkvLayout,
        rope: RopeConfig,
        pool: &mut CpuKvPool,
        step: &StepInput,
    ) -> Result<()> {
        CpuBackend.rope_and_write_kv(phase, qkv, layout, rope, pool, step)
    }
    fn attention(
        &self,
        phase: &CpuPhase,
        qkv: &CpuMatrix,
        layout: QkvLayout,
        pool: &CpuKvPool,
        step: &StepInput,
        scale: f32,
    ) -> Result<CpuMatrix> {
        CpuBackend.attention(phase, qkv, layout, pool, step, scale)
    }
    fn linear_silu_and_mul(
        &self,
        phase: &CpuPhase,
        step: &StepInput,
        x: &CpuMatrix,
        gate_up: &HostTensor,
    ) -> Result<CpuMatrix> {
        CpuBackend.linear_silu_and_mul(phase, step, x, gate_up)
    }
    fn gather_logit_rows(&self, phase: &CpuPhase, x: &CpuMatrix, step: &StepInput) -> Result<CpuMatrix> {
        CpuBackend.gather_logit_rows(phase, x, step)
    }
    fn read_logits(&self, phase: &CpuPhase, logits: CpuMatrix, how: LogitsReadback) -> Result<HostLogits> {
        CpuBackend.read_logits(phase, logits, how)
    }
    fn is_ready(&self, pending: &HostLogits) -> Result<bool> {
        CpuBackend.is_ready(pending)
    }
    fn take_logits(&self, phase: &CpuPhase, pending: HostLogits) -> Result<HostLogits> {
        CpuBackend.take_logits(phase, pending)
    }
    fn time_ops(&self, phase: &CpuPhase, on: bool) -> Result<()> {
        CpuBackend.time_ops(phase, on)
    }
    fn take_op_times(&self, phase: &CpuPhase) -> Result<Vec<OpTime>> {
        CpuBackend.take_op_times(phase)
    }
    fn bandwidth_curve(&self) -> Vec<(u32, f64)> {
        CpuBackend.bandwidth_curve()
    }
}

fn logits<B: Backend<Activation = CpuMatrix, Phase = CpuPhase, Pending = HostLogits>>(
    backend: &B,
    phase: &CpuPhase,
    logits: CpuMatrix,
) -> Vec<f32> {
    match backend.logits_to_host(phase, logits, LogitsReadback::Full).expect("logits") {
        HostLogits::Full(m) => m.data,
        HostLogits::Argmax(_) => unreachable!("every logit was asked for"),
    }
}

fn config(architecture: Architecture) -> ModelConfig {
    let qwen2 = architecture == Architecture::Qwen2;
    ModelConfig {
        architecture,
        hidden_size: 192,
        intermediate_size: 320,
        num_layers: 3,
        num_heads: 6,
        num_kv_heads: 2,
        head_dim: 32,
        vocab_size: 300,
        max_position_embeddings: 1024,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_style: if qwen2 { RopeStyle::RotateHalf } else { RopeStyle::Interleaved },
        rope_scaling: RopeScaling::None,
        tie_word_embeddings: qwen2,
        attention_bias: qwen2,
    }
}

/// Prompts of 4 sequences as one prefill step, then 8 decode steps fed the plain backend's greedy
/// tokens, on both backends: every step's logits agree to f32 rounding (the fused path adds the
/// same products and scales by the same factors, in other orders).
#[test]
fn decode_steps_with_norms_in_the_gemms_match_the_norm_kernels() {
    for architecture in [Architecture::Llama, Architecture::Qwen2] {
        let config = config(architecture);
        let plain = LlamaModel::random(&CpuBackend, &config, 5).expect("model");
        let fused = LlamaModel::random(&FusingCpu, &config, 5).expect("model");
        let mut plain_cache = plain.alloc_kv_cache(&CpuBackend, 32, 16).expect("cache");
        let mut fused_cache = fused.alloc_kv_cache(&FusingCpu, 32, 16).expect("cache");
        let mut blocks = BlockManager::new(32, 16).expect("blocks");
        let phase = CpuBackend.new_phase().expect("phase");
        let vocab = config.vocab_size;
        let prompts: Vec<Vec<u32>> =
            (0..4).map(|s| (0..(3 + 17 * s)).map(|i| ((i * 31 + s * 7) % vocab) as u32).collect()).collect();
        let mut kind = StepKind::Prefill;
        let mut tokens: Vec<Vec<u32>> = prompts;
        for step_index in 0..9 {
            let chunks: Vec<SeqChunk<'_>> = tokens
                .iter()
                .enumerate()
                .map(|(s, t)| SeqChunk { seq: s as u64, tokens: t, wants_logits: true })
                .collect();
            let step = build_step(&mut blocks, &chunks, kind).expect("step");
            let want = plain.forward(&CpuBackend, &phase, &mut plain_cache, &step).expect("plain");
            let want = logits(&CpuBackend, &phase, want);
            let got = fused.forward(&FusingCpu, &phase, &mut fused_cache, &step).expect("fused");
            let got = logits(&FusingCpu, &phase, got);
            let scale = want.iter().fold(0f32, |m, x| m.max(x.abs()));
            let worst = got.iter().zip(&want).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                worst <= 1e-4 * scale,
                "{architecture:?} step {step_index} ({kind:?}): max |diff| {worst} of {scale}"
            );
            tokens = want
                .chunks_exact(vocab)
                .map(|row| vec![row.iter().enumerate().fold(0, |b, (j, &x)| if x > row[b] { j } else { b }) as u32])
                .collect();
            kind = StepKind::Decode;
        }
    }
}

/// SmolLM2 with the fused decode path generates transformers' greedy continuation of the first
/// oracle fixture prompt.
#[test]
fn smollm2_with_norms_in_the_gemms_continues_as_transformers_does() {
    let fixtures = oracle::fixtures();
    let loaded = oracle::smollm2();
    let model = LlamaModel::load(&FusingCpu, loaded.weights.as_ref(), |_, _| {}).expect("load weights");
    let eos = loaded.tokenizer.eos_token_ids().to_vec();
    let mut engine = Engine::new(FusingCpu, model, eos, oracle::engine_config()).expect("engine");
    let options = oracle::greedy(fixtures.greedy_tokens, true);
    let case = &fixtures.cases[0];
    let out = generate_text(&mut engine, 0, &loaded.tokenizer, &case.prompt_ids, &options, |_| {}).expect("generate");
    assert_eq!(out.token_ids, case.greedy_ids, "greedy continuation with the fused decode path");
}
