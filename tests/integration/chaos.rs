//! A test backend: the CPU backend with iterations that finish in a random order, a ledger that
//! checks what phases have in flight, optionally budgets that change in flight, and optionally NaN
//! logits for chosen tokens.

use std::collections::HashMap;
use std::sync::Mutex;

use nexus::kernels::{PagedKvLayout, QkvLayout, RopeConfig};
use nexus::runtime::Result;
use nexus::runtime::model::backend::{Backend, HostLogits, LogitsReadback, OpTime, StepInput, StepScope};
use nexus::runtime::model::cpu::{CPU_SM_COUNT, CpuBackend, CpuKvPool, CpuMatrix, CpuPhase};
use nexus::runtime::weights::config::{Architecture, ModelConfig, RopeScaling, RopeStyle};
use nexus::runtime::weights::gguf::HostTensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The CPU backend, with iterations that finish when a coin says so, and a ledger of what each
/// phase has in flight.
pub struct Chaos {
    state: Mutex<Ledger>,
    /// Logit rows of this token come out NaN, as from a model whose activations overflowed.
    poison: Option<u32>,
    /// Steps in flight take new budgets ([`Backend::resize_in_flight`]).
    resizable: bool,
}

pub struct Ledger {
    coin: StdRng,
    next_phase: usize,
    /// Per phase with work in flight: its budget and the KV blocks its steps read and write.
    pub in_flight: HashMap<usize, (u32, Vec<i32>)>,
    pub violations: Vec<String>,
}

impl Ledger {
    /// The SMs of the steps in flight in every phase but `phase`.
    fn others(&self, phase: usize) -> u32 {
        self.in_flight.iter().filter(|(id, _)| **id != phase).map(|(_, (budget, _))| budget).sum()
    }
}

/// A phase of [`Chaos`]: the CPU phase and an id for the ledger.
pub struct ChaosPhase {
    id: usize,
    cpu: CpuPhase,
}

impl Chaos {
    /// Iterations finish in an order drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        let ledger =
            Ledger { coin: StdRng::seed_from_u64(seed), next_phase: 0, in_flight: HashMap::new(), violations: vec![] };
        Chaos { state: Mutex::new(ledger), poison: None, resizable: false }
    }

    /// Like [`Chaos::new`], and steps in flight take new budgets.
    pub fn resizing(seed: u64) -> Self {
        Chaos { resizable: true, ..Chaos::new(seed) }
    }

    /// Like [`Chaos::new`], and the logits of a row whose token is `token` are NaN.
    pub fn poisoning(seed: u64, token: u32) -> Self {
        Chaos { poison: Some(token), ..Chaos::new(seed) }
    }

    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.state.lock().expect("ledger")
    }
}

impl Backend for Chaos {
    type Weight = HostTensor;
    type Activation = CpuMatrix;
    type KvPool = CpuKvPool;
    type Step = StepInput;
    type Phase = ChaosPhase;
    type Pending = (usize, HostLogits);

    fn sm_count(&self) -> u32 {
        CPU_SM_COUNT
    }

    fn device_name(&self) -> String {
        CpuBackend.device_name()
    }

    fn new_phase(&self) -> Result<ChaosPhase> {
        let mut ledger = self.ledger();
        ledger.next_phase += 1;
        Ok(ChaosPhase { id: ledger.next_phase, cpu: CpuBackend.new_phase()? })
    }

    fn set_budget(&self, phase: &mut ChaosPhase, sms: u32) -> Result<()> {
        CpuBackend.set_budget(&mut phase.cpu, sms)
    }

    /// Everything launched is done.
    fn synchronize(&self) -> Result<()> {
        self.ledger().in_flight.clear();
        Ok(())
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

    fn resizes_in_flight(&self) -> bool {
        self.resizable
    }

    /// Checks the new budget against the other steps in flight, as a launch's.
    fn resize_in_flight(&self, phase: &ChaosPhase, sms: u32) -> Result<()> {
        if !self.resizable {
            return CpuBackend.resize_in_flight(&phase.cpu, sms);
        }
        let mut ledger = self.ledger();
        let others = ledger.others(phase.id);
        if others + sms > CPU_SM_COUNT {
            let v = format!("resized to {sms} SMs with {others} in flight");
            ledger.violations.push(v);
        }
        match ledger.in_flight.get_mut(&phase.id) {
            Some(mine) => mine.0 = sms,
            None => ledger.violations.push("resized a phase with nothing in flight".into()),
        }
        Ok(())
    }

    /// A step starts: checks it against every other step in flight.
    fn prepare(&self, phase: &ChaosPhase, step: &StepInput) -> Result<StepInput> {
        let mut guard = self.ledger();
        let ledger = &mut *guard;
        let blocks: Vec<i32> = step.block_tables.iter().copied().filter(|&b| b >= 0).collect();
        let others = ledger.others(phase.id);
        if others + phase.cpu.budget > CPU_SM_COUNT {
            let v = format!("{} SMs launched with {others} in flight", phase.cpu.budget);
            ledger.violations.push(v);
        }
        for (id, (_, theirs)) in &ledger.in_flight {
            if *id != phase.id
                && let Some(b) = blocks.iter().find(|b| theirs.contains(b))
            {
                let v = format!("block {b} is in two iterations in flight");
                ledger.violations.push(v);
            }
        }
        // Steps of one phase run one after the other (warm-up steps queue so, before a synchronize).
        let mine = ledger.in_flight.entry(phase.id).or_insert((0, Vec::new()));
        mine.0 = mine.0.max(phase.cpu.budget);
        mine.1.extend(blocks);
        drop(guard);
        CpuBackend.prepare(&phase.cpu, step)
    }

    fn run_step(
        &self,
        phase: &ChaosPhase,
        step: &StepInput,
        _: StepScope,
        forward: &mut dyn FnMut(&StepInput) -> Result<CpuMatrix>,
    ) -> Result<CpuMatrix> {
        forward(&self.prepare(phase, step)?)
    }

    fn embedding(&self, phase: &ChaosPhase, table: &HostTensor, step: &StepInput) -> Result<CpuMatrix> {
        CpuBackend.embedding(&phase.cpu, table, step)
    }

    fn rms_norm(&self, phase: &ChaosPhase, x: &CpuMatrix, weight: &HostTensor, eps: f32) -> Result<CpuMatrix> {
        CpuBackend.rms_norm(&phase.cpu, x, weight, eps)
    }

    fn fused_add_rms_norm(
        &self,
        phase: &ChaosPhase,
        x: &CpuMatrix,
        residual: &mut CpuMatrix,
        weight: &HostTensor,
        eps: f32,
    ) -> Result<CpuMatrix> {
        CpuBackend.fused_add_rms_norm(&phase.cpu, x, residual, weight, eps)
    }

    fn linear(
        &self,
        phase: &ChaosPhase,
        step: &StepInput,
        x: &CpuMatrix,
        weight: &HostTensor,
        bias: Option<&HostTensor>,
    ) -> Result<CpuMatrix> {
        CpuBackend.linear(&phase.cpu, step, x, weight, bias)
    }

    fn rope_and_write_kv(
        &self,
        phase: &ChaosPhase,
        qkv: &mut CpuMatrix,
        layout: QkvLayout,
        rope: RopeConfig,
        pool: &mut CpuKvPool,
        step: &StepInput,
    ) -> Result<()> {
        CpuBackend.rope_and_write_kv(&phase.cpu, qkv, layout, rope, pool, step)
    }

    fn attention(
        &self,
        phase: &ChaosPhase,
        qkv: &CpuMatrix,
        layout: QkvLayout,
        pool: &CpuKvPool,
        step: &StepInput,
        scale: f32,
    ) -> Result<CpuMatrix> {
        CpuBackend.attention(&phase.cpu, qkv, layout, pool, step, scale)
    }

    fn linear_silu_and_mul(
        &self,
        phase: &ChaosPhase,
        step: &StepInput,
        x: &CpuMatrix,
        gate_up: &HostTensor,
    ) -> Result<CpuMatrix> {
        CpuBackend.linear_silu_and_mul(&phase.cpu, step, x, gate_up)
    }

    fn gather_logit_rows(&self, phase: &ChaosPhase, x: &CpuMatrix, step: &StepInput) -> Result<CpuMatrix> {
        let mut rows = CpuBackend.gather_logit_rows(&phase.cpu, x, step)?;
        for (row, &r) in rows.data.chunks_exact_mut(x.cols).zip(&step.logit_rows) {
            if Some(step.tokens[r as usize]) == self.poison {
                row.fill(f32::NAN);
            }
        }
        Ok(rows)
    }

    fn read_logits(&self, phase: &ChaosPhase, logits: CpuMatrix, how: LogitsReadback) -> Result<(usize, HostLogits)> {
        Ok((phase.id, CpuBackend.read_logits(&phase.cpu, logits, how)?))
    }

    fn time_ops(&self, phase: &ChaosPhase, on: bool) -> Result<()> {
        CpuBackend.time_ops(&phase.cpu, on)
    }

    fn take_op_times(&self, phase: &ChaosPhase) -> Result<Vec<OpTime>> {
        CpuBackend.take_op_times(&phase.cpu)
    }

    fn bandwidth_curve(&self) -> Vec<(u32, f64)> {
        CpuBackend.bandwidth_curve()
    }

    /// Done only when the coin says so (the engine must keep polling, and serve the other lane).
    fn is_ready(&self, _: &(usize, HostLogits)) -> Result<bool> {
        Ok(self.ledger().coin.random_bool(0.3))
    }

    /// The step is over: its phase leaves the ledger.
    fn take_logits(&self, phase: &ChaosPhase, (id, logits): (usize, HostLogits)) -> Result<HostLogits> {
        let mut ledger = self.ledger();
        if id != phase.id || ledger.in_flight.remove(&id).is_none() {
            ledger.violations.push(format!("phase {} took logits it had not launched", phase.id));
        }
        Ok(logits)
    }
}

/// A two-layer model of a 64-token vocabulary, for random weights: what the tests check does not
/// depend on what it computes.
pub fn tiny_config() -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        hidden_size: 16,
        intermediate_size: 24,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 4,
        vocab_size: 64,
        max_position_embeddings: 512,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_style: RopeStyle::RotateHalf,
        rope_scaling: RopeScaling::None,
        tie_word_embeddings: false,
        attention_bias: false,
    }
}
