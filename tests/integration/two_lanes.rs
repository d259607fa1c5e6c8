//! The two-lane invariants of the engine, on random workloads: requests arriving and aborted at
//! random moments, a cache small enough to preempt, and lanes whose iterations finish in a random
//! order (a backend that wraps the CPU one and says an iteration is done only when a seeded coin
//! says so). Whatever happens, the budgets of the iterations in flight never add up to more than
//! the SM count, a sequence is never in two iterations at once (no two iterations in flight touch
//! the same KV block), every request that is not aborted gets exactly its tokens, aborted ones
//! get no more events, and at the end no block is owned or leaked.

use std::collections::HashMap;
use std::sync::Mutex;

use nexus::kernels::{PagedKvLayout, QkvLayout, RopeConfig};
use nexus::runtime::Result;
use nexus::runtime::engine::scheduler::{NexusConfig, SchedulerConfig};
use nexus::runtime::engine::{Engine, EngineConfig, EngineEvent, FinishReason, RequestOptions, Schedule};
use nexus::runtime::model::LlamaModel;
use nexus::runtime::model::backend::{Backend, HostLogits, LogitsReadback, StepInput, StepScope};
use nexus::runtime::model::cpu::{CPU_SM_COUNT, CpuBackend, CpuKvPool, CpuMatrix, CpuPhase};
use nexus::runtime::weights::config::{Architecture, ModelConfig, RopeScaling, RopeStyle};
use nexus::runtime::weights::gguf::HostTensor;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The CPU backend, with iterations that finish when a coin says so, and a ledger of what each
/// phase has in flight.
struct Chaos {
    state: Mutex<Ledger>,
}

struct Ledger {
    coin: StdRng,
    next_phase: usize,
    /// Per phase with work in flight: its budget and the KV blocks its steps read and write.
    in_flight: HashMap<usize, (u32, Vec<i32>)>,
    violations: Vec<String>,
}

/// A phase of [`Chaos`]: the CPU phase and an id for the ledger.
struct ChaosPhase {
    id: usize,
    cpu: CpuPhase,
}

impl Chaos {
    fn new(seed: u64) -> Self {
        let ledger =
            Ledger { coin: StdRng::seed_from_u64(seed), next_phase: 0, in_flight: HashMap::new(), violations: vec![] };
        Chaos { state: Mutex::new(ledger) }
    }

    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
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

    /// A step starts: checks it against every other step in flight.
    fn prepare(&self, phase: &ChaosPhase, step: &StepInput) -> Result<StepInput> {
        let mut guard = self.ledger();
        let ledger = &mut *guard;
        let blocks: Vec<i32> = step.block_tables.iter().copied().filter(|&b| b >= 0).collect();
        let others: u32 = ledger.in_flight.iter().filter(|(id, _)| **id != phase.id).map(|(_, (b, _))| b).sum();
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

    fn rope(
        &self,
        phase: &ChaosPhase,
        qkv: &mut CpuMatrix,
        layout: QkvLayout,
        rope: RopeConfig,
        step: &StepInput,
    ) -> Result<()> {
        CpuBackend.rope(&phase.cpu, qkv, layout, rope, step)
    }

    fn attention(
        &self,
        phase: &ChaosPhase,
        qkv: &CpuMatrix,
        layout: QkvLayout,
        pool: &mut CpuKvPool,
        step: &StepInput,
        scale: f32,
    ) -> Result<CpuMatrix> {
        CpuBackend.attention(&phase.cpu, qkv, layout, pool, step, scale)
    }

    fn silu_and_mul(&self, phase: &ChaosPhase, gate_up: &CpuMatrix) -> Result<CpuMatrix> {
        CpuBackend.silu_and_mul(&phase.cpu, gate_up)
    }

    fn gather_logit_rows(&self, phase: &ChaosPhase, x: &CpuMatrix, step: &StepInput) -> Result<CpuMatrix> {
        CpuBackend.gather_logit_rows(&phase.cpu, x, step)
    }

    fn read_logits(&self, phase: &ChaosPhase, logits: CpuMatrix, how: LogitsReadback) -> Result<(usize, HostLogits)> {
        Ok((phase.id, CpuBackend.read_logits(&phase.cpu, logits, how)?))
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

/// A two-layer model of a 64-token vocabulary with random weights: the invariants do not depend
/// on what it computes.
fn tiny_config() -> ModelConfig {
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

/// What happens between two steps of the engine.
#[derive(Clone, Debug)]
enum Event {
    /// A request of `prompt` tokens asking for `output` tokens.
    Arrive {
        prompt: usize,
        output: usize,
    },
    /// The `n`-th request so far is aborted (if it exists and is not finished).
    Abort(usize),
    Step,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        2 => (1usize..90, 1usize..12).prop_map(|(prompt, output)| Event::Arrive { prompt, output }),
        1 => (0usize..64).prop_map(Event::Abort),
        4 => Just(Event::Step),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn two_lanes_keep_their_invariants(
        events in prop::collection::vec(event(), 1..120),
        num_blocks in 12usize..48,
        prefill_sms in 1u32..CPU_SM_COUNT,
        nexus in prop::bool::weighted(0.8),
        max_num_batched_tokens in 8usize..96,
        seed in any::<u64>(),
    ) {
        let backend = Chaos::new(seed);
        let model = LlamaModel::random(&backend, &tiny_config(), 3).unwrap();
        let schedule = if nexus { Schedule::Nexus(NexusConfig { prefill_sms }) } else { Schedule::Chunked };
        let config = EngineConfig {
            num_blocks,
            block_size: 4,
            scheduler: SchedulerConfig { max_num_seqs: 6, max_num_batched_tokens },
            max_model_len: None,
            schedule,
        };
        let mut engine = Engine::new(backend, model, vec![], config).unwrap();
        let mut wanted: Vec<usize> = Vec::new();
        let mut got: Vec<usize> = Vec::new();
        let mut finished: Vec<bool> = Vec::new();
        let mut aborted: Vec<bool> = Vec::new();
        let step = |engine: &mut Engine<Chaos>, got: &mut Vec<usize>, finished: &mut Vec<bool>, aborted: &[bool]| {
            for e in engine.step().unwrap() {
                match e {
                    EngineEvent::Token { id, .. } => {
                        let i = id as usize;
                        assert!(!aborted[i] && !finished[i], "request {i} got a token after it ended");
                        got[i] += 1;
                    }
                    EngineEvent::Finished { id, reason } => {
                        let i = id as usize;
                        assert!(!aborted[i] && !finished[i], "request {i} finished twice or after its abort");
                        assert_eq!(reason, FinishReason::Length);
                        finished[i] = true;
                    }
                }
            }
        };
        for e in events {
            match e {
                Event::Arrive { prompt, output } => {
                    let id = wanted.len();
                    let tokens: Vec<u32> = (0..prompt).map(|t| ((t * 7 + id) % 64) as u32).collect();
                    let options = RequestOptions { max_tokens: output, ignore_eos: true, ..RequestOptions::default() };
                    // Requests larger than the whole cache are refused, and then take no id.
                    if engine.add_request(id as u64, tokens, options).is_ok() {
                        wanted.push(output);
                        got.push(0);
                        finished.push(false);
                        aborted.push(false);
                    }
                }
                Event::Abort(n) => {
                    if n < wanted.len() && !finished[n] && !aborted[n] {
                        prop_assert!(engine.abort(n as u64));
                        aborted[n] = true;
                    }
                }
                Event::Step => step(&mut engine, &mut got, &mut finished, &aborted),
            }
        }
        let mut steps = 0;
        while engine.has_unfinished() {
            step(&mut engine, &mut got, &mut finished, &aborted);
            steps += 1;
            prop_assert!(steps < 20_000, "the engine does not finish");
        }
        for i in 0..wanted.len() {
            if !aborted[i] {
                prop_assert!(finished[i], "request {} never finished", i);
                prop_assert_eq!(got[i], wanted[i], "request {} got {} tokens", i, got[i]);
            }
        }
        prop_assert_eq!(engine.kv_usage(), 0.0, "blocks leaked");
        let ledger = engine.backend().ledger();
        prop_assert!(ledger.violations.is_empty(), "{:?}", ledger.violations);
        prop_assert!(ledger.in_flight.is_empty(), "iterations left in flight");
    }
}
