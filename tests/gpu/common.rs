//! Helpers of the GPU tests: the device, random data, poisoned buffers and tolerant comparison.

use std::sync::{Arc, OnceLock};

use cudarc::driver::CudaSlice;
use half::bf16;
use nexus::kernels::gpu::PtxTarget;
use nexus::kernels::{CtaBudget, Gpu, PhaseContext};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The first GPU, opened once.
pub fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::new(0).expect("open GPU 0")).clone()
}

/// The first GPU with the portable (sm_80) kernels, opened once: on a Hopper, the code paths
/// other GPUs run.
pub fn portable_gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| Gpu::with_target(0, PtxTarget::Sm80).expect("open GPU 0 with the sm_80 kernels")).clone()
}

/// A context on a fresh stream with `budget` CTAs (`None`: all SMs).
pub fn phase(budget: Option<u32>) -> PhaseContext {
    phase_on(&gpu(), budget)
}

/// [`phase`] on `gpu`.
pub fn phase_on(gpu: &Arc<Gpu>, budget: Option<u32>) -> PhaseContext {
    let budget = match budget {
        Some(n) => CtaBudget::new(n, gpu).expect("budget"),
        None => CtaBudget::all(gpu),
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

/// A paged K/V pool holding sequences of `kv_lens` tokens in shuffled blocks, with random
/// values where a sequence owns a slot and NaN everywhere else (so that a kernel reading a slot it
/// does not own fails the comparison).
pub struct ScatteredPool {
    pub cache: nexus::kernels::PagedKvLayout,
    /// `[sequences, max_blocks]`; unused entries are -1.
    pub block_tables: Vec<i32>,
    pub max_blocks: usize,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
}

impl ScatteredPool {
    /// `spare_columns` unused table columns per sequence and `spare_blocks` unowned pool blocks.
    pub fn new(
        rng: &mut StdRng,
        layout: nexus::kernels::QkvLayout,
        block_size: usize,
        kv_lens: &[u32],
        spare_columns: usize,
        spare_blocks: usize,
    ) -> Self {
        use rand::seq::SliceRandom;
        let blocks: Vec<usize> = kv_lens.iter().map(|&l| (l as usize).div_ceil(block_size)).collect();
        let max_blocks = blocks.iter().copied().max().unwrap_or(0) + spare_columns;
        let num_blocks = blocks.iter().sum::<usize>() + spare_blocks;
        let mut ids: Vec<i32> = (0..num_blocks as i32).collect();
        ids.shuffle(rng);
        let mut block_tables = vec![-1i32; kv_lens.len() * max_blocks];
        let mut next = ids.into_iter();
        for (seq, &n) in blocks.iter().enumerate() {
            for b in 0..n {
                block_tables[seq * max_blocks + b] = next.next().expect("enough blocks");
            }
        }
        let cache = nexus::kernels::PagedKvLayout {
            num_blocks,
            block_size,
            num_kv_heads: layout.num_kv_heads,
            head_dim: layout.head_dim,
        };
        let mut k = random_bf16(rng, cache.pool_len(), 1.0);
        let mut v = random_bf16(rng, cache.pool_len(), 1.0);
        let mut owned = vec![false; num_blocks * block_size];
        for (seq, &len) in kv_lens.iter().enumerate() {
            for pos in 0..len as usize {
                let block = block_tables[seq * max_blocks + pos / block_size] as usize;
                owned[block * block_size + pos % block_size] = true;
            }
        }
        for (slot, _) in owned.iter().enumerate().filter(|(_, o)| !**o) {
            let range = slot * cache.slot_len()..(slot + 1) * cache.slot_len();
            k[range.clone()].fill(f32::NAN);
            v[range].fill(f32::NAN);
        }
        ScatteredPool { cache, block_tables, max_blocks, k, v }
    }
}

/// Device copies of an attention test's inputs: the fused QKV rows, the K and V pools and the
/// block tables.
pub struct DeviceInputs {
    pub qkv: CudaSlice<bf16>,
    pub k: CudaSlice<bf16>,
    pub v: CudaSlice<bf16>,
    pub tables: CudaSlice<i32>,
}

impl DeviceInputs {
    pub fn new(ctx: &PhaseContext, qkv: &[f32], k: &[f32], v: &[f32], block_tables: &[i32]) -> Self {
        DeviceInputs {
            qkv: upload(ctx, qkv),
            k: upload(ctx, k),
            v: upload(ctx, v),
            tables: ctx.stream().clone_htod(block_tables).expect("upload"),
        }
    }
}
