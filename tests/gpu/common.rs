//! Helpers of the GPU tests: the device, random data, poisoned buffers and tolerant comparison.

use std::sync::{Arc, OnceLock};

use cudarc::driver::CudaSlice;
use half::bf16;
use nexus::kernels::{CtaBudget, Gpu, PhaseContext};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The first GPU, opened once.
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new(0).expect("open GPU 0")).clone()
}

/// A context on a fresh stream with `budget` CTAs (`None`: all SMs).
pub fn phase(budget: Option<u32>) -> PhaseContext {
    let gpu = gpu();
    let budget = match budget {
        Some(n) => CtaBudget::new(n, &gpu).expect("budget"),
        None => CtaBudget::all(&gpu),
    };
    PhaseContext::new(gpu.clone(), gpu.new_stream().expect("stream"), budget)
}

/// A random generator with a fresh seed, printed so that a failure can be replayed.
pub fn rng(test: &str) -> StdRng {
    let seed = rand::rng().random::<u64>();
    eprintln!("{test}: seed {seed}");
    StdRng::seed_from_u64(seed)
}

/// `n` values uniform in `[-scale, scale)`, rounded to bf16 (so the reference sees exactly what
/// the GPU sees).
pub fn random_bf16(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-scale..scale)).to_f32()).collect()
}

pub fn upload(ctx: &PhaseContext, values: &[f32]) -> CudaSlice<bf16> {
    let host: Vec<bf16> = values.iter().map(|&v| bf16::from_f32(v)).collect();
    ctx.stream().clone_htod(&host).expect("upload")
}

pub fn upload_u32(ctx: &PhaseContext, values: &[u32]) -> CudaSlice<u32> {
    ctx.stream().clone_htod(values).expect("upload")
}

/// A buffer of `n` NaNs: whatever a kernel fails to write stays NaN and fails the comparison.
pub fn poisoned(ctx: &PhaseContext, n: usize) -> CudaSlice<bf16> {
    ctx.stream().clone_htod(&vec![bf16::NAN; n]).expect("upload")
}

pub fn download(ctx: &PhaseContext, buf: &CudaSlice<bf16>) -> Vec<f32> {
    let host = ctx.stream().clone_dtoh(buf).expect("download");
    host.iter().map(|v| v.to_f32()).collect()
}

/// Asserts `|got - want| <= atol + rtol × |want|` everywhere (NaN never passes), naming the
/// worst element.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    // NaN fails: it is what poisoned outputs hold where a kernel did not write.
    let within = |g: f32, w: f32| (g - w).abs() <= atol + rtol * w.abs();
    let excess = |g: f32, w: f32| if g.is_nan() { f32::INFINITY } else { (g - w).abs() - (atol + rtol * w.abs()) };
    let bad: Vec<usize> = (0..got.len()).filter(|&i| !within(got[i], want[i])).collect();
    if let Some(&worst) = bad.iter().max_by(|&&a, &&b| excess(got[a], want[a]).total_cmp(&excess(got[b], want[b]))) {
        panic!(
            "{what}: {} of {} values differ; worst at {worst}: got {}, want {}",
            bad.len(),
            got.len(),
            got[worst],
            want[worst]
        );
    }
}

/// The tolerance of a bf16 result against an f32 reference: bf16 has an 8-bit mantissa.
pub const BF16_RTOL: f32 = 1e-2;
