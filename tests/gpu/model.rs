//! The CUDA backend against the CPU backend on SmolLM2-135M-Instruct: the greedy continuation
//! of every oracle-fixture prompt agrees for its first 16 tokens, and the last prompt position's
//! logits agree to a cosine similarity of at least 0.999.

use std::path::PathBuf;

use nexus::runtime::backend::CpuBackend;
use nexus::runtime::cuda_backend::CudaBackend;
use nexus::runtime::generate::{DEFAULT_BLOCK_SIZE, GenerateOptions, Generator};
use nexus::runtime::loader::{self, DEFAULT_MODEL};
use nexus::runtime::model::LlamaModel;
use serde::Deserialize;

use crate::common::phase;

#[derive(Deserialize)]
struct Fixtures {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt_ids: Vec<u32>,
}

/// The model file: `$NEXUS_MODEL`, else the default under the current directory (the GPU
/// machine runs the test binary from a copy of the repository, not from where it was built).
fn model_path() -> PathBuf {
    let path = std::env::var_os("NEXUS_MODEL").map_or_else(|| PathBuf::from(DEFAULT_MODEL), PathBuf::from);
    assert!(path.is_file(), "{} is missing: run scripts/fetch-model.sh or set NEXUS_MODEL", path.display());
    path
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn smollm2_on_the_gpu_matches_the_cpu_backend() {
    let fixtures: Fixtures =
        serde_json::from_str(include_str!("../fixtures/oracle/smollm2-135m-instruct.json")).expect("fixtures");
    let loaded = loader::open(&model_path()).expect("open the model");
    let cpu_model = LlamaModel::load(&CpuBackend, loaded.weights.as_ref(), |_, _| {}).expect("load on the CPU");
    let gpu = CudaBackend::new(phase(None)).expect("CUDA backend");
    let gpu_model = LlamaModel::load(&gpu, loaded.weights.as_ref(), |_, _| {}).expect("load on the GPU");
    let mut cpu = Generator::new(CpuBackend, cpu_model, 256, DEFAULT_BLOCK_SIZE).expect("CPU generator");
    let mut gpu = Generator::new(gpu, gpu_model, 256, DEFAULT_BLOCK_SIZE).expect("GPU generator");
    let options = GenerateOptions { max_tokens: 16, ignore_eos: true, ..GenerateOptions::default() };
    for (i, case) in fixtures.cases.iter().enumerate() {
        let want = cpu.generate(&case.prompt_ids, &options, &[], |_| Ok(true)).expect("CPU generate");
        let got = gpu.generate(&case.prompt_ids, &options, &[], |_| Ok(true)).expect("GPU generate");
        let similarity = cosine(&got.prompt_logits.data, &want.prompt_logits.data);
        eprintln!("case {i}: cosine {similarity:.6}, tokens {:?} / {:?}", got.token_ids, want.token_ids);
        assert!(similarity >= 0.999, "case {i}: last-prompt-position logits cosine {similarity}");
        assert_eq!(got.token_ids, want.token_ids, "case {i}: greedy continuation");
    }
}
