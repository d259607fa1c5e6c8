//! Shared by the GPU benchmarks: CUDA-event timing inside criterion, rotating inputs larger than
//! L2, and a summary table printed at the end (and saved when `NEXUS_BENCH_OUT` names a folder).
#![allow(dead_code)] // Each bench uses its own subset.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::Criterion;
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::{CudaSlice, CudaStream, CudaView};
use nexus::kernels::gemm::GemmPlan;
use nexus::kernels::stream_read::{ReadDepth, stream_read};
use nexus::kernels::{BandwidthCurve, CtaBudget, Gpu, PhaseContext};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Budgets every kernel is measured with (plus all SMs).
pub const BUDGETS: [u32; 7] = [8, 16, 24, 32, 48, 64, 96];

/// Bytes that certainly exceed the L2 cache (50 MB on H100, 60 MB on H200): inputs are rotated
/// over copies adding up to at least this, so that no launch finds its data in L2.
pub const ROTATE_BYTES: usize = 256 << 20;

/// How many copies of an input of `bytes` to rotate over.
pub fn copies_for(bytes: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes.max(1)).clamp(1, 64)
}

/// The KV cache's block size of the attention kernels' benches unless `NEXUS_BENCH_BLOCK_SIZE`
/// says otherwise (the kernels' smallest blocks with TMA boxes; the engine uses its own default).
pub const KERNEL_BENCH_BLOCK_SIZE: usize = 16;

/// The KV cache's block size for a bench: `NEXUS_BENCH_BLOCK_SIZE` if set, else `default`.
pub fn block_size(default: usize) -> usize {
    match std::env::var("NEXUS_BENCH_BLOCK_SIZE") {
        Ok(v) => v.parse().expect("NEXUS_BENCH_BLOCK_SIZE: a block size"),
        Err(_) => default,
    }
}

/// The budgets to sweep on `gpu`: [`BUDGETS`] below its SM count, then all SMs.
pub fn budgets(gpu: &Gpu) -> Vec<CtaBudget> {
    let mut v: Vec<CtaBudget> =
        BUDGETS.iter().filter(|&&b| b < gpu.sm_count()).map(|&b| CtaBudget::new(b, gpu).expect("budget")).collect();
    v.push(CtaBudget::all(gpu));
    v
}

/// Whether the case named `name` runs: every case unless `NEXUS_BENCH_ONLY` is set, then those whose
/// name contains it (e.g. `NEXUS_BENCH_ONLY="64x4096/budget 32"` times one case, for a profiler).
/// Criterion's own filter (`cargo bench -- FILTER`) skips only its timing, not the summary table.
pub fn selected(name: &str) -> bool {
    std::env::var("NEXUS_BENCH_ONLY").map_or(true, |only| name.contains(&only))
}

pub fn open() -> (Arc<Gpu>, Arc<CudaStream>) {
    let gpu = Gpu::new(0).expect("a CUDA GPU");
    let stream = gpu.new_stream().expect("stream");
    (gpu, stream)
}

pub fn phase(gpu: &Arc<Gpu>, stream: &Arc<CudaStream>, budget: CtaBudget) -> PhaseContext {
    PhaseContext::new(gpu.clone(), stream.clone(), budget)
}

/// Criterion set up for GPU kernels: few samples, short windows (the kernels are timed by CUDA
/// events, which are precise; many shapes x budgets must fit in minutes).
pub fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(200))
        .measurement_time(Duration::from_millis(400))
        .without_plots()
        .configure_from_args()
}

/// Times `iters` calls of `launch` (each enqueuing one run on `stream`) with CUDA events; returns
/// the GPU time they took.
pub fn time_gpu(stream: &Arc<CudaStream>, iters: u64, mut launch: impl FnMut(u64)) -> Duration {
    let ctx = stream.context();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
    let stop = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
    start.record(stream).expect("record");
    for i in 0..iters {
        launch(i);
    }
    stop.record(stream).expect("record");
    stop.synchronize().expect("sync");
    Duration::from_secs_f64(start.elapsed_ms(&stop).expect("elapsed") as f64 / 1e3)
}

/// The median time of one run, measured outside criterion (for the summary table): `warmup`
/// runs, then `samples` samples of `per_sample` runs each.
pub fn median_gpu_time(stream: &Arc<CudaStream>, mut launch: impl FnMut(u64)) -> Duration {
    let mut i = 0u64;
    time_gpu(stream, 5, |_| {
        launch(i);
        i += 1;
    });
    let mut samples: Vec<Duration> = (0..15)
        .map(|_| {
            time_gpu(stream, 5, |_| {
                launch(i);
                i += 1;
            }) / 5
        })
        .collect();
    samples.sort();
    samples[samples.len() / 2]
}

/// `stream_read` at [`ReadDepth::Limit`] (192 KB in flight per SM: what the SMs can read at all,
/// not the planners' 64 KB curve, which a deep enough kernel beats on few SMs) over a buffer of
/// random words (a 16 MB pattern repeated: the values only keep the power and clocks those of real
/// data), timed like the benchmarked kernels
/// ([`median_gpu_time`]) in the same run: the curve of reads of [`ROTATE_BYTES`] at each budget a
/// bench reports, and reads of any size up to the buffer's.
pub struct StreamRead {
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    data: CudaSlice<u32>,
    curve: BandwidthCurve,
}

impl StreamRead {
    /// A buffer of at least [`ROTATE_BYTES`], and of `max_bytes` when that is more; measures the
    /// curve at 1 CTA and at each of `budgets`.
    pub fn new(gpu: &Arc<Gpu>, stream: &Arc<CudaStream>, max_bytes: usize, budgets: &[CtaBudget]) -> Self {
        let mut rng = StdRng::seed_from_u64(0x5eed);
        let tile: Vec<u32> = (0..1 << 22).map(|_| rng.random()).collect();
        let words = max_bytes.max(ROTATE_BYTES).div_ceil(4 * tile.len()) * tile.len();
        let mut data = stream.alloc_zeros::<u32>(words).expect("alloc");
        for at in (0..words).step_by(tile.len()) {
            stream.memcpy_htod(&tile, &mut data.slice_mut(at..at + tile.len())).expect("upload");
        }
        let mut ctas: Vec<CtaBudget> = budgets.to_vec();
        ctas.push(CtaBudget::new(1, gpu).expect("budget"));
        ctas.sort();
        ctas.dedup();
        let points: Vec<(u32, f64)> =
            ctas.into_iter().map(|b| (b.get(), read_rate(gpu, stream, &data, b, ROTATE_BYTES))).collect();
        let curve = BandwidthCurve::from_points(&points).expect("a curve from 1 CTA up");
        StreamRead { gpu: gpu.clone(), stream: stream.clone(), data, curve }
    }

    /// The streaming-read curve: reads of [`ROTATE_BYTES`] (as many bytes as `Gpu::new` reads for
    /// the planners' curve, at the deeper depth), so that a kernel's TB/s can be put next to what
    /// its SMs can read at all.
    pub fn curve(&self) -> &BandwidthCurve {
        &self.curve
    }

    /// The whole buffer (random words, at least [`ROTATE_BYTES`]), for a kernel that streams it.
    pub fn data(&self) -> CudaView<'_, u32> {
        self.data.as_view()
    }

    /// Bytes per second of one `stream_read` launch that reads `bytes` (rounded up to whole 16-byte
    /// vectors) on `budget` CTAs; consecutive launches read different parts of the buffer, so that
    /// none finds its bytes in L2 (as the kernels' inputs are rotated, [`copies_for`]).
    ///
    /// Of a kernel's own bytes it is what one launch moving that much can reach at all, its start,
    /// first requests and drain included, which a read of 256 MB spreads over more bytes than a
    /// kernel of a few MB has.
    pub fn bytes_per_second(&self, budget: CtaBudget, bytes: usize) -> f64 {
        read_rate(&self.gpu, &self.stream, &self.data, budget, bytes)
    }
}

/// [`StreamRead::bytes_per_second`] over `data`.
fn read_rate(gpu: &Arc<Gpu>, stream: &Arc<CudaStream>, data: &CudaSlice<u32>, budget: CtaBudget, bytes: usize) -> f64 {
    let words = bytes.div_ceil(16) * 4;
    assert!(words <= data.len(), "StreamRead: {bytes} bytes, the buffer holds {}", 4 * data.len());
    let copies = (data.len() / words).clamp(1, 64);
    let ctx = phase(gpu, stream, budget);
    let mut checksums = stream.alloc_zeros::<u32>(budget.get() as usize).expect("alloc");
    let t = median_gpu_time(stream, |i| {
        let at = (i as usize % copies) * words;
        stream_read(&ctx, &data.slice(at..at + words), &mut checksums.as_view_mut(), ReadDepth::Limit)
            .expect("stream_read")
    });
    (4 * words) as f64 / t.as_secs_f64()
}

/// The streaming-read curve of [`StreamRead::new`] at 1 CTA and at each of `budgets`.
pub fn stream_read_curve(gpu: &Arc<Gpu>, stream: &Arc<CudaStream>, budgets: &[CtaBudget]) -> BandwidthCurve {
    StreamRead::new(gpu, stream, ROTATE_BYTES, budgets).curve().clone()
}

/// Rows of the summary table, in the order they were added.
#[derive(Default)]
pub struct Report {
    title: String,
    header: Vec<String>,
    rows: Mutex<Vec<Vec<String>>>,
}

impl Report {
    pub fn new(title: &str, header: &[&str]) -> Self {
        Report {
            title: title.into(),
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Mutex::new(Vec::new()),
        }
    }

    pub fn add(&self, row: Vec<String>) {
        self.rows.lock().expect("report lock").push(row);
    }

    /// Prints the table as Markdown, with the device named, and saves it to
    /// `$NEXUS_BENCH_OUT/<file>.md` when that variable is set (making the folder if need be).
    pub fn finish(&self, gpu: &Gpu, file: &str) {
        let name = device_name(gpu);
        let mut s = String::new();
        let _ = writeln!(s, "## {} — {name}\n", self.title);
        let _ = writeln!(s, "| {} |", self.header.join(" | "));
        let _ = writeln!(s, "|{}|", self.header.iter().map(|_| " --- ").collect::<Vec<_>>().join("|"));
        for row in self.rows.lock().expect("report lock").iter() {
            let _ = writeln!(s, "| {} |", row.join(" | "));
        }
        println!("\n{s}");
        if let Ok(dir) = std::env::var("NEXUS_BENCH_OUT") {
            let path = std::path::Path::new(&dir).join(format!("{file}.md"));
            std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("make {dir}: {e}"));
            std::fs::write(&path, &s).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        }
    }
}

/// The device's marketing name, e.g. "NVIDIA H100 80GB HBM3".
pub fn device_name(gpu: &Gpu) -> String {
    gpu.context().name().unwrap_or_else(|_| "unknown GPU".into())
}

/// A GEMM plan's kernel, and its split of K when it has one.
pub fn plan_label(plan: &GemmPlan) -> String {
    match plan.splits {
        1 => format!("{:?}", plan.kernel),
        s => format!("{:?} split {s}", plan.kernel),
    }
}
