//! The CPU backend against Hugging Face transformers on SmolLM2-135M-Instruct: token ids, greedy
//! continuations and top-5 logits from `tests/fixtures/oracle/` (made by
//! `scripts/make-oracle-fixtures.py`); and the paged KV cache against a contiguous one.

use std::sync::{Mutex, OnceLock};

use nexus::runtime::engine::generate::{GenerateOptions, generate_text};
use nexus::runtime::engine::sampling::SamplingParams;
use nexus::runtime::engine::scheduler::SchedulerConfig;
use nexus::runtime::engine::{Engine, EngineConfig, FinishReason, RequestOptions, Schedule};
use nexus::runtime::model::LlamaModel;
use nexus::runtime::model::backend::{Backend, StepInput, StepKind};
use nexus::runtime::model::cpu::CpuBackend;
use nexus::runtime::text::chat_template::ChatMessage;
use nexus::runtime::weights::loader::{self, LoadedModel};
use serde::Deserialize;

use crate::common::default_model_path;

#[derive(Deserialize)]
pub(crate) struct Fixtures {
    pub(crate) greedy_tokens: usize,
    pub(crate) cases: Vec<Case>,
    tokenizations: Vec<Tokenization>,
}

#[derive(Deserialize)]
pub(crate) struct Case {
    kind: String,
    prompt: Option<String>,
    messages: Option<Vec<Message>>,
    rendered: Option<String>,
    pub(crate) prompt_ids: Vec<u32>,
    pub(crate) greedy_ids: Vec<u32>,
    last_prompt_top5: Top5,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Deserialize)]
struct Top5 {
    ids: Vec<u32>,
    logits: Vec<f32>,
}

#[derive(Deserialize)]
struct Tokenization {
    text: String,
    ids: Vec<u32>,
}

pub(crate) fn fixtures() -> Fixtures {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/oracle/smollm2-135m-instruct.json");
    let text = std::fs::read_to_string(path).expect("read the oracle fixtures");
    serde_json::from_str(&text).expect("parse the oracle fixtures")
}

/// The default model, opened once for all tests of this module and `fused_norms`.
pub(crate) fn smollm2() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| loader::open(&default_model_path()).expect("open the default model"))
}

/// An engine over the default model on the CPU, shared by the tests (its weights take 0.5 GB).
fn cpu_engine() -> &'static Mutex<Engine<CpuBackend>> {
    static ENGINE: OnceLock<Mutex<Engine<CpuBackend>>> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let model = LlamaModel::load(&CpuBackend, smollm2().weights.as_ref(), |_, _| {}).expect("load weights");
        let eos = smollm2().tokenizer.eos_token_ids().to_vec();
        Mutex::new(Engine::new(CpuBackend, model, eos, engine_config()).expect("engine"))
    })
}

/// The engine settings of the oracle tests: 64 blocks of 16 tokens, chunked prefill.
pub(crate) fn engine_config() -> EngineConfig {
    EngineConfig {
        num_blocks: 64,
        block_size: 16,
        scheduler: SchedulerConfig::default(),
        max_model_len: None,
        schedule: Schedule::Chunked,
    }
}

/// Greedy options for `max_tokens` tokens.
pub(crate) fn greedy(max_tokens: usize, ignore_eos: bool) -> GenerateOptions {
    GenerateOptions { request: RequestOptions { max_tokens, ignore_eos, ..RequestOptions::default() }, stop: vec![] }
}

fn prompt_ids(case: &Case) -> Vec<u32> {
    let tokenizer = &smollm2().tokenizer;
    match case.kind.as_str() {
        "raw" => tokenizer.encode(case.prompt.as_deref().expect("raw case has a prompt"), true).expect("encode"),
        "chat" => {
            let messages: Vec<ChatMessage> = case
                .messages
                .as_ref()
                .expect("chat case has messages")
                .iter()
                .map(|m| ChatMessage::new(&m.role, &m.content))
                .collect();
            let template = tokenizer.chat_template().expect("SmolLM2 has a chat template");
            let rendered = template.render(&messages, true).expect("render");
            assert_eq!(Some(&rendered), case.rendered.as_ref(), "rendered chat prompt");
            tokenizer.encode(&rendered, false).expect("encode")
        }
        other => panic!("unknown fixture kind {other}"),
    }
}

#[test]
fn tokenizer_ids_equal_transformers() {
    let f = fixtures();
    for case in &f.cases {
        assert_eq!(
            prompt_ids(case),
            case.prompt_ids,
            "prompt of {:?}",
            case.prompt.as_ref().or(case.rendered.as_ref())
        );
    }
    for t in &f.tokenizations {
        let ids = smollm2().tokenizer.encode(&t.text, false).expect("encode");
        assert_eq!(ids, t.ids, "tokenization of {:?}", t.text);
        assert_eq!(smollm2().tokenizer.decode(&ids, false).expect("decode"), t.text, "round trip of {:?}", t.text);
    }
}

#[test]
fn cpu_greedy_continuations_and_top5_logits_equal_transformers() {
    let f = fixtures();
    let mut engine = cpu_engine().lock().expect("engine lock");
    let tokenizer = &smollm2().tokenizer;
    let mut matched = 0;
    let mut total = 0;
    for case in &f.cases {
        let out = generate_text(&mut engine, 0, tokenizer, &case.prompt_ids, &greedy(f.greedy_tokens, true), |_| {})
            .expect("generate");
        let same = out.token_ids.iter().zip(&case.greedy_ids).take_while(|(a, b)| a == b).count();
        matched += same;
        total += case.greedy_ids.len();
        assert_eq!(out.token_ids, case.greedy_ids, "greedy continuation of {:?} ({same} tokens match)", case.prompt);

        // The last prompt position's logits: the prompt as one step over a contiguous cache.
        let table: Vec<i32> = (0..case.prompt_ids.len().div_ceil(16) as i32).collect();
        let logits = &run_with_blocks(&engine, &case.prompt_ids, case.prompt_ids.len(), 16, &table, &[])[0];
        let mut ours: Vec<u32> = (0..logits.len() as u32).collect();
        ours.sort_by(|&a, &b| logits[b as usize].total_cmp(&logits[a as usize]));
        assert_eq!(&ours[..5], &case.last_prompt_top5.ids[..], "top-5 ids of {:?}", case.prompt);
        for (&id, &want) in case.last_prompt_top5.ids.iter().zip(&case.last_prompt_top5.logits) {
            let got = logits[id as usize];
            assert!(
                (got - want).abs() <= 1e-2 * want.abs(),
                "logit of token {id} for {:?}: {got}, transformers {want}",
                case.prompt
            );
        }
    }
    eprintln!("greedy tokens matching transformers: {matched}/{total}");
}

/// Runs a prompt in chunks and then a few decode steps, with the sequence's blocks where
/// `block_table` says, and returns every step's logits.
fn run_with_blocks(
    engine: &Engine<CpuBackend>,
    prompt: &[u32],
    chunk: usize,
    block_size: usize,
    block_table: &[i32],
    decode: &[u32],
) -> Vec<Vec<f32>> {
    let model = engine.model();
    let phase = CpuBackend.new_phase().expect("phase");
    let num_blocks = block_table.iter().copied().max().unwrap_or(0) as usize + 1;
    let mut cache = model.alloc_kv_cache(&CpuBackend, num_blocks, block_size).expect("cache");
    let slot = |p: usize| block_table[p / block_size] as u32 * block_size as u32 + (p % block_size) as u32;
    let mut steps: Vec<Vec<u32>> = prompt.chunks(chunk).map(<[u32]>::to_vec).collect();
    steps.extend(decode.iter().map(|&t| vec![t]));
    let mut done = 0;
    let mut all = Vec::new();
    for tokens in steps {
        let n = tokens.len();
        let kind = if done >= prompt.len() { StepKind::Decode } else { StepKind::Prefill };
        let step = StepInput {
            kind,
            positions: (done..done + n).map(|p| p as u32).collect(),
            slots: (done..done + n).map(slot).collect(),
            tokens,
            q_indptr: vec![0, n as u32],
            kv_lens: vec![(done + n) as u32],
            block_tables: block_table.to_vec(),
            max_blocks_per_seq: block_table.len(),
            logit_rows: vec![n as u32 - 1],
        };
        let logits = model.forward(&CpuBackend, &phase, &mut cache, &step).expect("forward");
        all.push(logits.data);
        done += n;
    }
    all
}

#[test]
fn paged_kv_cache_equals_contiguous_cache() {
    let f = fixtures();
    let prompt = &f.cases[2].prompt_ids;
    let decode = &f.cases[2].greedy_ids[..6];
    let total = prompt.len() + decode.len();
    // One contiguous block holding the whole sequence, prompt in one step.
    let engine = cpu_engine().lock().expect("engine lock");
    let contiguous = run_with_blocks(&engine, prompt, prompt.len(), 64, &[0], decode);
    assert!(total <= 64);
    // Blocks of 4 tokens scattered over a pool in reverse and interleaved order, prompt in
    // chunks of 3 tokens (chunked prefill over the cached prefix).
    let blocks = total.div_ceil(4);
    let scattered: Vec<i32> = (0..blocks as i32).map(|i| (blocks as i32 - 1 - i) * 2 + 1).collect();
    let paged = run_with_blocks(&engine, prompt, 3, 4, &scattered, decode);
    let last = |v: &Vec<Vec<f32>>| v[v.len() - 1 - decode.len()].clone();
    assert_eq!(last(&contiguous), last(&paged), "logits after the prompt");
    for (i, (a, b)) in contiguous[1..].iter().zip(&paged[paged.len() - decode.len()..]).enumerate() {
        assert_eq!(a, b, "logits of decode step {i}");
    }
}

#[test]
fn generation_stops_on_eos_and_stop_strings_and_reproduces_under_a_seed() {
    let f = fixtures();
    let tokenizer = &smollm2().tokenizer;
    let mut engine = cpu_engine().lock().expect("engine lock");
    // The first chat fixture's greedy answer ends with <|im_end|>, SmolLM2's EOS.
    let chat = &f.cases[4];
    let out = generate_text(&mut engine, 1, tokenizer, &chat.prompt_ids, &greedy(32, false), |_| {}).expect("generate");
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert_eq!(out.text, "The capital of France is Paris.");
    assert_eq!(out.token_ids.last(), tokenizer.eos_token_ids().first());

    // A stop string cuts the text before it, also when streamed, and ends the request.
    let raw = &f.cases[0];
    let options = GenerateOptions { stop: vec![".".into()], ..greedy(32, false) };
    let mut streamed = String::new();
    let out = generate_text(&mut engine, 2, tokenizer, &raw.prompt_ids, &options, |s| streamed.push_str(s))
        .expect("generate");
    assert_eq!((out.text.as_str(), streamed.as_str()), (" Paris", " Paris"));
    assert_eq!(out.finish_reason, FinishReason::Stop);
    assert!(!engine.has_unfinished() && engine.kv_usage() == 0.0, "the stopped request is gone");

    // Sampling with a seed reproduces; another seed (almost surely) does not.
    let mut sampled = |seed| {
        let sampling =
            SamplingParams { temperature: 1.0, top_k: 0, top_p: 0.95, seed: Some(seed), ..Default::default() };
        let mut options = greedy(24, true);
        options.request.sampling = sampling;
        generate_text(&mut engine, 3, tokenizer, &raw.prompt_ids, &options, |_| {}).expect("generate").token_ids
    };
    let (a, b, c) = (sampled(11), sampled(11), sampled(12));
    assert_eq!(a, b);
    assert_ne!(a, c);
}
