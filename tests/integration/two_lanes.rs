//! The two-lane invariants of the engine, on random workloads: requests arriving and aborted at
//! random moments, a cache small enough to preempt, and lanes whose iterations finish in a random
//! order (a backend that wraps the CPU one and says an iteration is done only when a seeded coin
//! says so), with budgets fixed at launch or changed in flight, split fixed or by the controller. Whatever happens, the budgets of
//! the iterations in flight never add up to more than the SM count, a sequence is never in two
//! iterations at once (no two iterations in flight touch the same KV block), every request that
//! is not aborted gets exactly its tokens, aborted ones get no more events, and at the end no
//! block is owned or leaked.

use nexus::runtime::engine::cost_model::{CostModel, ModelShape, OpCurve};
use nexus::runtime::engine::scheduler::controller::ControllerConfig;
use nexus::runtime::engine::scheduler::{NexusConfig, PrefillPacking, PrefillTokens, SchedulerConfig};
use nexus::runtime::engine::{Engine, EngineConfig, EngineEvent, FinishReason, NexusControl, RequestOptions, Schedule};
use nexus::runtime::model::LlamaModel;
use nexus::runtime::model::cpu::CPU_SM_COUNT;
use proptest::prelude::*;

use crate::chaos::{Chaos, tiny_config};

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

/// A cost model of the tiny model on the chaos backend's nominal SMs (made up: its budgets do not
/// change how fast it computes), slow enough at computing that a prefill iteration on a few SMs is
/// predicted to take longer than waiting for a decode iteration (a mutation check saw that path
/// taken).
fn made_up_cost() -> CostModel {
    let curve = OpCurve::new(1e6, 64.0, 0.5);
    CostModel::new(
        ModelShape::of(&tiny_config()),
        CPU_SM_COUNT,
        vec![(1, 1e9), (64, 4e10)],
        curve,
        curve,
        curve,
        1e-5,
        1e-5,
    )
    .expect("a made-up cost model")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn two_lanes_keep_their_invariants(
        events in prop::collection::vec(event(), 1..120),
        num_blocks in 12usize..48,
        prefill_sms in 1u32..CPU_SM_COUNT,
        prefill_aging in 0u64..40,
        fill in any::<bool>(),
        nexus in prop::bool::weighted(0.8),
        controlled in prop::option::of((prop::option::of(1u64..5_000), prop_oneof![Just(0.01), 0.01f64..=1.0])),
        max_num_batched_tokens in 8usize..96,
        prefill_tokens in prop::option::of((1usize..64, prop::option::of(1usize..64))),
        seed in any::<u64>(),
        resizable in any::<bool>(),
    ) {
        let backend = if resizable { Chaos::resizing(seed) } else { Chaos::new(seed) };
        let model = LlamaModel::random(&backend, &tiny_config(), 3).unwrap();
        // A backlog limit, when drawn, above the plain one.
        let prefill_tokens =
            prefill_tokens.map(|(tokens, more)| PrefillTokens { tokens, backlog: more.map(|m| tokens + m) });
        let prefill_packing = if fill { PrefillPacking::Fill } else { PrefillPacking::WholeFirst };
        let split = NexusConfig { prefill_sms, prefill_aging, prefill_tokens, prefill_packing };
        let schedule = match (nexus, controlled) {
            (false, _) => Schedule::Chunked,
            (true, None) => Schedule::Nexus(split),
            // The controller, on a made-up cost model, with the paper's rule or a decode target of
            // that many microseconds (and a largest decode share, at times below the grid's least
            // step): splits that move with the batches, and prefill iterations that wait for a
            // decode iteration holding their share.
            (true, Some((target_us, max_decode_share))) => {
                let controller = ControllerConfig {
                    decode_target_s: target_us.map(|us| us as f64 * 1e-6),
                    max_decode_share,
                    ..ControllerConfig::default()
                };
                Schedule::NexusControlled(Box::new(NexusControl {
                    cost: made_up_cost(),
                    controller,
                    prefill_aging,
                    prefill_tokens,
                    prefill_packing,
                }))
            }
        };
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
                    EngineEvent::Failed { id, message } => panic!("request {id} failed: {message}"),
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
