//! The engine on the CPU backend with SmolLM2, with every schedule (chunked, and Nexus's two
//! lanes, split fixed or by the controller, which the CPU backend runs one after the other): continuous batching with chunked
//! prefill gives every request the same greedy tokens as transformers (the oracle fixtures),
//! also when a small KV cache forces preemption; aborts free blocks; bad requests are refused.

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;

use nexus::runtime::ErrorKind;
use nexus::runtime::engine::scheduler::{Lane, NexusConfig, PrefillPacking, SchedulerConfig};
use nexus::runtime::engine::{Engine, EngineConfig, EngineEvent, FinishReason, RequestOptions, Schedule};
use nexus::runtime::model::LlamaModel;
use nexus::runtime::model::backend::StepKind;
use nexus::runtime::model::cpu::CpuBackend;
use nexus::runtime::weights::loader::{self, LoadedModel};
use serde::Deserialize;

use crate::common::default_model_path;

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
    greedy_ids: Vec<u32>,
}

fn fixtures() -> Fixtures {
    serde_json::from_str(include_str!("../fixtures/oracle/smollm2-135m-instruct.json")).expect("fixtures")
}

fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| loader::open(&default_model_path()).expect("open the default model"))
}

/// Chunked, Nexus with 64 of the CPU backend's 132 nominal SMs for prefill, and Nexus split by
/// the controller from a cost model of SmolLM2 (made up: the CPU backend's budgets are nominal).
fn schedules() -> [Schedule; 3] {
    use nexus::runtime::engine::NexusControl;
    use nexus::runtime::engine::cost_model::{CostModel, ModelShape, OpCurve};
    use nexus::runtime::engine::scheduler::controller::ControllerConfig;
    let curve = OpCurve::new(1e10, 64.0, 0.5);
    let shape = ModelShape::of(&smollm2().weights.config().clone());
    let cost = CostModel::new(shape, 132, vec![(1, 1e10), (64, 4e11)], curve, curve, curve, 1e-4, 1e-4).expect("cost");
    let control = NexusControl {
        cost,
        controller: ControllerConfig::default(),
        prefill_aging: 15,
        prefill_tokens: None,
        prefill_packing: PrefillPacking::WholeFirst,
    };
    [Schedule::Chunked, Schedule::Nexus(NexusConfig::fixed(64)), Schedule::NexusControlled(Box::new(control))]
}

fn engine(num_blocks: usize, scheduler: SchedulerConfig, schedule: Schedule) -> Engine<CpuBackend> {
    engine_with(EngineConfig { num_blocks, block_size: 16, scheduler, max_model_len: None, schedule }).expect("engine")
}

fn engine_with(config: EngineConfig) -> nexus::runtime::Result<Engine<CpuBackend>> {
    let model = LlamaModel::load(&CpuBackend, smollm2().weights.as_ref(), |_, _| {}).expect("load");
    let eos = smollm2().tokenizer.eos_token_ids().to_vec();
    Engine::new(CpuBackend, model, eos, config)
}

const TOKENS: usize = 16;

/// Runs every fixture prompt through `engine`, adding the second half of them only after a few
/// steps (so that requests join a running batch), and returns each request's tokens.
fn run_all(engine: &mut Engine<CpuBackend>, cases: &[Case]) -> HashMap<u64, Vec<u32>> {
    let options = RequestOptions { max_tokens: TOKENS, ignore_eos: true, ..RequestOptions::default() };
    let (first, later) = cases.split_at(cases.len() / 2);
    for (i, case) in first.iter().enumerate() {
        engine.add_request(i as u64, case.prompt_ids.clone(), options.clone()).expect("add");
    }
    let mut out: HashMap<u64, Vec<u32>> = HashMap::new();
    let mut finished = 0;
    let mut steps = 0;
    while engine.has_unfinished() || steps < 3 {
        if steps == 3 {
            for (i, case) in later.iter().enumerate() {
                engine.add_request((first.len() + i) as u64, case.prompt_ids.clone(), options.clone()).expect("add");
            }
        }
        for event in engine.step().expect("step") {
            match event {
                EngineEvent::Token { id, token, .. } => out.entry(id).or_default().push(token),
                EngineEvent::Finished { reason, .. } => {
                    assert_eq!(reason, FinishReason::Length);
                    finished += 1;
                }
                EngineEvent::Failed { id, message } => panic!("request {id} failed: {message}"),
            }
        }
        steps += 1;
        assert!(steps < 10_000, "the engine does not finish");
    }
    assert_eq!(finished, cases.len(), "every request finished");
    out
}

#[test]
fn continuous_batching_with_chunked_prefill_matches_transformers() {
    let f = fixtures();
    // 24 tokens an iteration: prompts run in chunks, next to (or alongside) the decodes of other
    // requests.
    let mut engine = engine(512, SchedulerConfig { max_num_seqs: 8, max_num_batched_tokens: 24 }, Schedule::Chunked);
    for schedule in schedules() {
        engine.set_schedule(schedule.clone()).expect("schedule");
        engine.keep_timeline(true);
        let out = run_all(&mut engine, &f.cases);
        for (i, case) in f.cases.iter().enumerate() {
            assert_eq!(out[&(i as u64)], case.greedy_ids[..TOKENS], "{schedule:?}: request {i}");
        }
        assert_eq!(engine.kv_usage(), 0.0, "{schedule:?}: every block was freed");
        // Nexus runs prompt chunks and decodes in their own lanes, each with the SMs the split
        // gives it (all of them when the other lane has no work); chunked runs one lane.
        let timeline = engine.take_timeline();
        let lanes: HashSet<Lane> = timeline.iter().map(|it| it.lane).collect();
        match schedule {
            Schedule::Chunked => assert_eq!(lanes, HashSet::from([Lane::Mixed])),
            Schedule::Nexus(_) | Schedule::NexusControlled(_) => {
                assert_eq!(lanes, HashSet::from([Lane::Prefill, Lane::Decode]));
                let controlled = matches!(schedule, Schedule::NexusControlled(_));
                for it in &timeline {
                    // The controller moves decode budgets on a grid of 8 SMs (prefill gets the rest).
                    let shared = match it.lane {
                        Lane::Decode if controlled => it.budget.is_multiple_of(8),
                        Lane::Prefill if controlled => (132 - it.budget).is_multiple_of(8),
                        _ => [64, 68].contains(&it.budget),
                    };
                    assert!(it.budget == 132 || shared, "{it:?}");
                    assert_eq!(it.kind == StepKind::Decode, it.lane == Lane::Decode, "{it:?}");
                }
            }
        }
        assert!(timeline.iter().all(|it| it.start <= it.end && it.tokens >= it.seqs && it.seqs > 0));
    }
}

#[test]
fn preemption_under_a_small_cache_loses_nothing_and_changes_nothing() {
    let f = fixtures();
    for schedule in schedules() {
        // 12 blocks of 16 tokens cannot hold the seven requests (36-73 tokens each) at once.
        let config = SchedulerConfig { max_num_seqs: 8, max_num_batched_tokens: 64 };
        let mut engine = engine(12, config, schedule.clone());
        let out = run_all(&mut engine, &f.cases);
        assert!(engine.preemptions() > 0, "{schedule:?}: the cache was meant to be too small");
        for (i, case) in f.cases.iter().enumerate() {
            assert_eq!(out[&(i as u64)], case.greedy_ids[..TOKENS], "{schedule:?}: request {i}");
        }
        assert_eq!(engine.kv_usage(), 0.0);
    }
}

#[test]
fn an_aborted_request_in_flight_frees_its_blocks_when_its_iteration_is_done() {
    let f = fixtures();
    let [_, nexus, _] = schedules();
    let mut engine = engine(64, SchedulerConfig::default(), nexus);
    let options = RequestOptions { max_tokens: 100, ..RequestOptions::default() };
    engine.add_request(1, f.cases[0].prompt_ids.clone(), options.clone()).expect("add");
    // The first step prefills request 1 (the decode lane has nothing); the second launches its
    // decode, and the prefill of request 2, then returns when the decode is done: request 2's
    // prefill is still in flight.
    engine.step().expect("step");
    engine.add_request(2, f.cases[1].prompt_ids.clone(), options).expect("add");
    let events = engine.step().expect("step");
    assert!(events.iter().all(|e| matches!(e, EngineEvent::Token { id: 1, .. })), "{events:?}");
    let held = engine.kv_usage();
    assert!(engine.abort(2));
    assert!(!engine.abort(2), "aborted once");
    assert_eq!(engine.kv_usage(), held, "the blocks of an iteration in flight stay until it is done");
    assert!(engine.abort(1));
    while engine.has_unfinished() {
        let events = engine.step().expect("step");
        assert!(events.is_empty(), "aborted requests report nothing: {events:?}");
    }
    assert_eq!(engine.kv_usage(), 0.0);
}

#[test]
fn abort_frees_blocks_at_once_and_bad_requests_are_refused() {
    let f = fixtures();
    let mut engine = engine(64, SchedulerConfig::default(), Schedule::Chunked);
    let options = RequestOptions { max_tokens: 100, ..RequestOptions::default() };
    engine.add_request(1, f.cases[0].prompt_ids.clone(), options.clone()).expect("add");
    engine.add_request(2, f.cases[1].prompt_ids.clone(), options.clone()).expect("add");
    engine.step().expect("step");
    engine.step().expect("step");
    assert!(engine.kv_usage() > 0.0);
    assert!(engine.abort(1));
    assert!(!engine.abort(1));
    assert!(engine.abort(2));
    assert_eq!(engine.kv_usage(), 0.0);
    assert!(!engine.has_unfinished());
    assert!(engine.step().expect("step").is_empty());

    let bad = |engine: &mut Engine<CpuBackend>, id, prompt: Vec<u32>, max_tokens| {
        let options = RequestOptions { max_tokens, ..RequestOptions::default() };
        engine.add_request(id, prompt, options).expect_err("refused").kind()
    };
    assert_eq!(bad(&mut engine, 3, vec![], 5), ErrorKind::InvalidInput);
    assert_eq!(bad(&mut engine, 3, vec![1, 49_152], 5), ErrorKind::InvalidInput);
    assert_eq!(bad(&mut engine, 3, vec![1; 10], 0), ErrorKind::InvalidInput);
    // 64 blocks of 16 tokens hold 1024.
    assert_eq!(bad(&mut engine, 3, vec![1; 1000], 100), ErrorKind::InvalidInput);
    engine.add_request(4, vec![1, 2, 3], options.clone()).expect("add");
    assert_eq!(bad(&mut engine, 4, vec![1, 2, 3], 5), ErrorKind::InvalidInput);
    assert!(!engine.abort(3), "refused requests leave nothing behind");

    // max_model_len caps requests below the model's context and the cache; it must lie in the
    // model's context (8192 for SmolLM2).
    let config = |max_model_len| EngineConfig {
        num_blocks: 64,
        block_size: 16,
        scheduler: SchedulerConfig::default(),
        max_model_len: Some(max_model_len),
        schedule: Schedule::Chunked,
    };
    let mut capped = engine_with(config(100)).expect("engine");
    assert_eq!(capped.max_request_tokens(), 100);
    assert_eq!(bad(&mut capped, 1, vec![1; 90], 11), ErrorKind::InvalidInput);
    capped.add_request(1, vec![1; 90], RequestOptions { max_tokens: 10, ..RequestOptions::default() }).expect("fits");
    for len in [0, 8193] {
        assert_eq!(engine_with(config(len)).expect_err("refused").kind(), ErrorKind::InvalidInput, "{len}");
    }
    // A cache larger than memory, or than block ids can number, is an error, not an abort.
    for num_blocks in [100_000_000, usize::MAX / 2] {
        let huge = EngineConfig { num_blocks, max_model_len: None, ..config(100) };
        assert!(engine_with(huge).is_err(), "{num_blocks} blocks");
    }
}

#[test]
fn replaying_a_trace_forces_output_lengths_and_measures_latencies() {
    use nexus::runtime::bench::replay;
    use nexus::runtime::bench::workload::Request;
    let [_, nexus, _] = schedules();
    let mut engine = engine(256, SchedulerConfig { max_num_seqs: 4, max_num_batched_tokens: 64 }, nexus);
    let trace: Vec<Request> =
        (0..6).map(|i| Request { arrival_s: 0.05 * i as f64, input_len: 20 + 7 * i, output_len: 3 + i }).collect();
    let (times, report) = replay(&mut engine, &trace, 1).expect("replay");
    for (i, (t, r)) in times.iter().zip(&trace).enumerate() {
        assert_eq!(t.tokens.len(), r.output_len, "request {i} got its forced length");
        assert!(t.tokens.windows(2).all(|w| w[0] <= w[1]) && t.tokens[0] > 0.0, "request {i}: {:?}", t.tokens);
    }
    assert_eq!(report.ttft.count, 6);
    assert_eq!(report.tbt.count, trace.iter().map(|r| r.output_len - 1).sum::<usize>());
    assert!(report.ttft.p50 <= report.ttft.p99 && report.token_throughput > 0.0);
    assert_eq!(engine.kv_usage(), 0.0);
}

/// Logits that are not numbers fail their request, never a token: a backend whose logit rows
/// come out NaN for one token (as from activations that overflowed), with requests greedy (the
/// argmax on the backend) and sampled (logits on the host), in both schedules. Each poisoned
/// request gets one `Failed` event and nothing else, the others complete as if alone, and the
/// engine frees every block and goes on.
#[test]
fn nan_logits_fail_their_request_and_the_engine_serves_the_others() {
    use crate::chaos::{Chaos, tiny_config};
    use nexus::runtime::engine::sampling::SamplingParams;
    const POISON: u32 = 13;
    let [chunked, nexus, _] = schedules();
    for schedule in [chunked, nexus] {
        let backend = Chaos::poisoning(7, POISON);
        let model = LlamaModel::random(&backend, &tiny_config(), 3).expect("model");
        let scheduler = SchedulerConfig { max_num_seqs: 8, max_num_batched_tokens: 16 };
        let config =
            EngineConfig { num_blocks: 64, block_size: 4, scheduler, max_model_len: None, schedule: schedule.clone() };
        let mut engine = Engine::new(backend, model, vec![], config).expect("engine");
        let sampled = SamplingParams { temperature: 0.8, seed: Some(1), ..SamplingParams::default() };
        let greedy = RequestOptions { max_tokens: 6, ignore_eos: true, ..RequestOptions::default() };
        let drawn = RequestOptions { sampling: sampled, ..greedy.clone() };
        // Requests 1 and 3 end their prompts with the poisoned token; 0 and 2 do not contain it.
        let prompts = [vec![1, 2, 3], vec![4, 5, POISON], vec![6, 7, 8, 9, 10], vec![POISON + 1, POISON]];
        for (id, prompt) in prompts.iter().enumerate() {
            let options = if id % 2 == 0 { greedy.clone() } else { drawn.clone() };
            engine.add_request(id as u64, prompt.clone(), options).expect("add");
        }
        let mut tokens: HashMap<u64, usize> = HashMap::new();
        let mut failed: Vec<u64> = Vec::new();
        let mut finished: Vec<u64> = Vec::new();
        while engine.has_unfinished() {
            for event in engine.step().expect("step") {
                match event {
                    EngineEvent::Token { id, .. } => *tokens.entry(id).or_default() += 1,
                    EngineEvent::Finished { id, .. } => finished.push(id),
                    EngineEvent::Failed { id, message } => {
                        assert!(message.contains("NaN") || message.contains("no maximum"), "{message}");
                        failed.push(id);
                    }
                }
            }
        }
        failed.sort_unstable();
        finished.sort_unstable();
        assert_eq!(failed, vec![1, 3], "{schedule:?}");
        assert_eq!(finished, vec![0, 2], "{schedule:?}");
        assert_eq!((tokens.get(&1), tokens.get(&3)), (None, None), "{schedule:?}: no token from NaN logits");
        assert_eq!((tokens[&0], tokens[&2]), (6, 6), "{schedule:?}");
        assert_eq!(engine.kv_usage(), 0.0);
        // The engine goes on.
        engine.add_request(9, vec![1, 2], greedy.clone()).expect("add");
        let mut after = 0;
        while engine.has_unfinished() {
            after += engine.step().expect("step").iter().filter(|e| matches!(e, EngineEvent::Token { .. })).count();
        }
        assert_eq!(after, 6);
    }
}

/// Sequences preempted together go back to the front of the queue oldest first (as vLLM
/// re-admits them), ahead of requests that never started.
#[test]
fn preempted_sequences_are_queued_again_oldest_first() {
    use crate::chaos::{Chaos, tiny_config};
    let backend = Chaos::new(0);
    let model = LlamaModel::random(&backend, &tiny_config(), 3).expect("model");
    // Three blocks of 4 tokens: three 4-token prompts fill them, and their first decodes need
    // three more.
    let scheduler = SchedulerConfig { max_num_seqs: 8, max_num_batched_tokens: 64 };
    let config =
        EngineConfig { num_blocks: 3, block_size: 4, scheduler, max_model_len: None, schedule: Schedule::Chunked };
    let mut engine = Engine::new(backend, model, vec![], config).expect("engine");
    let options = RequestOptions { max_tokens: 4, ignore_eos: true, ..RequestOptions::default() };
    for id in 1..=3 {
        engine.add_request(id, vec![id as u32; 4], options.clone()).expect("add");
    }
    engine.step().expect("prefill");
    engine.add_request(4, vec![9; 4], options).expect("add");
    engine.step().expect("decode");
    assert_eq!(engine.preemptions(), 2);
    assert_eq!(engine.waiting_requests().collect::<Vec<_>>(), vec![2, 3, 4]);
}
