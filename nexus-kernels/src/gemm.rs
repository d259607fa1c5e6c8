//! The GEMM of the linear layers on the GPU: `C[m, n] = A[m, k] · B[n, k]ᵀ (+ bias[n])`, bf16 in
//! and out with f32 accumulation. A holds activations, B a weight stored `[out_features,
//! in_features]`; all three are row-major. The CPU reference is [`crate::reference::gemm`].
//!
//! # Kernels
//!
//! All kernels of `cuda/gemm.cu` are persistent: a launch starts `min(budget, tiles)` CTAs, one
//! per SM, which take output tiles from an atomic counter in the [`GemmWorkspace`] (the last CTA to
//! finish resets it for the next launch), so a budget of `b` occupies at most `b` SMs.
//!
//! - On Hopper (sm_90a), [`GemmKernel::Wgmma128x256`] and its smaller siblings: one producer
//!   thread streams 64-wide K slices of the A and B tiles with TMA into a ring of shared-memory
//!   stages (4 to 16 of them, what shared memory holds), and one or two consumer warpgroups multiply them
//!   with `wgmma` and hand the stages back through mbarriers. The producer runs ahead across tile
//!   boundaries. Each consumer warp stores its rows of C through 2 KB of shared memory after the
//!   ring, as whole 128-byte rows. For M ≤ 16, [`GemmKernel::WgmmaSwap16x64`], [`GemmKernel::WgmmaSwap16x128`] and
//!   [`GemmKernel::WgmmaSwap16x256`] put the weight rows on wgmma's 64-row side, so that a
//!   decode-sized GEMM streams its weight without 64-row padding math; each consumer warpgroup's
//!   wgmmas run one at a time at their latency, so the widest tile's four consumers are what let
//!   one SM stream at the read curve. [`GemmKernel::WgmmaSwap32x256`] does the same for
//!   17 ≤ M ≤ 32 (the decode batches a decode lane beside prefill runs on a few SMs).
//!   [`GemmKernel::WgmmaPair128x256`] runs the 128 × 256 tile in clusters of two CTAs that share
//!   B by TMA multicast; measured, not planned (see its docs).
//! - Everywhere from sm_80 on, [`GemmKernel::Mma128x128`] and [`GemmKernel::Mma64x64`]: `cp.async`
//!   into a multi-stage swizzled ring, `ldmatrix` and `mma.sync`.
//! - Everywhere from sm_80 on, for M ≤ 8 and M ≤ 16: [`GemmKernel::MmaStream8x64`] and
//!   [`GemmKernel::MmaStream16x64`] load the weight from memory straight into `mma.sync`'s
//!   fragments. Every other kernel stages it in shared memory, whose traffic (a write and a read per
//!   byte) bounds a decode-sized GEMM on few SMs below what those SMs can read. Not planned until
//!   measured ([`GemmKernel::STREAMS`]); they run the fusions below on every GPU.
//!
//! When a shape's output tiles do not spread evenly over the budget's CTAs (decode-sized GEMMs
//! with a narrow N, e.g. Llama-3.1-8B's down and output projections, or 24 tiles on 16 CTAs), the
//! wgmma kernels can split K ([`GemmConfig::splits`]): each tile's K ranges are work units of
//! their own, whose partial sums meet in the [`GemmWorkspace`], added by the tile's last unit in a
//! fixed order.
//!
//! [`gemm_silu_and_mul`] runs the same kernels with a SwiGLU epilogue: given a feed-forward
//! layer's fused `[gate | up]` weight, it stores `silu(gate) · up` straight from the f32 sums (the
//! kernels read the weight's rows interleaved in blocks of 8, so each thread holds both halves of
//! its outputs), one launch and one `[m, n]` round trip through memory fewer than a GEMM followed
//! by an elementwise kernel.
//!
//! The wgmma kernels also fuse a pre-norm layer's residual add and RMSNorm ([`GemmFusion`]): an
//! output projection adds its product to the residual stream (`C += A · Bᵀ`) and writes the sums
//! of squares of the new rows per [`SQUARE_SUM_COLS`] columns; the next GEMM scales its rows of
//! the product by the RMSNorm's factor made from those sums, with the norm's gain folded into its
//! weight ([`crate::reference::fold_norm_gain`]). No norm kernel runs between them. A launch with
//! a fusion runs the tile's `_fused` instantiation, one without runs code that has none of it.
//!
//! [`plan`] picks the kernel (and split) for a shape and budget with a small roofline model
//! (compute, L2 fill and DRAM time per candidate tile shape, with the wave quantization of the
//! work over the budget's CTAs; DRAM time at the bandwidth the device's [`DeviceModel`] measured
//! for that many CTAs); [`gemm`] plans and launches, [`gemm_with`] launches a given kernel.
//!
//! # Requirements
//!
//! `k` and `n` must be multiples of 8 (rows of 16 bytes: TMA strides, 16-byte copies and bf16
//! pairs in the epilogue), and A, B, C and the bias must start on 16-byte boundaries. `m` is
//! free (1 to anything). Launches allocate nothing and take no host-device synchronization, so
//! they can be captured in a CUDA graph.
//!
//! ```no_run
//! use nexus_kernels::gemm::{self, GemmShape, GemmWorkspace};
//! use nexus_kernels::{CtaBudget, Gpu, PhaseContext};
//!
//! let gpu = Gpu::new(0)?;
//! let ctx = PhaseContext::new(gpu.clone(), gpu.new_stream()?, CtaBudget::all(&gpu));
//! let mut workspace = GemmWorkspace::new(&ctx)?;
//! let (m, n, k) = (16, 6144, 4096);
//! let x = ctx.stream().alloc_zeros::<half::bf16>(m * k)?;
//! let w = ctx.stream().alloc_zeros::<half::bf16>(n * k)?;
//! let mut y = ctx.stream().alloc_zeros::<half::bf16>(m * n)?;
//! gemm::gemm(&ctx, &x.as_view(), &w.as_view(), None, &mut y.as_view_mut(), GemmShape { m, n, k }, &mut workspace)?;
//! # Ok::<(), nexus_kernels::Error>(())
//! ```

use cudarc::driver::sys::{self, CUdevice_attribute};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr};
use half::bf16;

use crate::error::ensure_shape;
use crate::gpu::{BandwidthCurve, CtaBudget, DeviceModel, Launch, PhaseContext, PtxTarget};
use crate::tensor_map::TensorMap;
use crate::{Error, Result};

pub use crate::reference::GemmShape;

const MODULE: &str = "gemm";
/// K elements per pipeline stage (`BK` in the source): one 128-byte swizzled row per tile row.
const BK: usize = 64;
/// Required divisor of `k` and `n`: 8 bf16 = 16 bytes.
const ALIGN_ELEMS: usize = 8;
/// Required alignment of every buffer, in bytes.
const ALIGN_BYTES: u64 = 16;
/// Shared memory a CTA may have on Hopper; the wgmma kernels' stage ring (`RING_BYTES` in the
/// source) takes what their epilogue buffers, alignment slack and static arrays leave of it. And
/// their cap on stages.
const WGMMA_SMEM_BYTES: usize = 227 * 1024;
const WGMMA_MAX_STAGES: usize = 16;
/// Slack for the kernels' rounding of the dynamic ring up to a 1024-byte boundary (the 128-byte
/// swizzle's period).
const WGMMA_RING_ALIGN_BYTES: usize = 1024;
/// Shared memory left to a wgmma kernel's static arrays (barriers, row scales, the swapped tiles'
/// square sums; `STATIC_BYTES` in the source): ptxas reports 96-2704 bytes.
const WGMMA_STATIC_BYTES_SWAPPED: usize = 4096;
const WGMMA_STATIC_BYTES_PLAIN: usize = 2048;
/// Shared memory of a plain (not swapped) wgmma kernel's epilogue after the ring, per consumer
/// warp (`STAGING_BYTES_PER_WARP` in the source): 16 rows of 128 bytes.
const WGMMA_STAGING_BYTES_PER_WARP: usize = 16 * 128;
/// Threads of the register-streamed kernels (`StreamConfig::THREADS` in the source), and the bytes
/// of their partial sums per M-tile row: two units (double-buffered) of 8 K slices × 68 floats
/// (`PARTIAL_BYTES`; the launcher asks for more, to keep one CTA per SM).
const STREAM_THREADS: u32 = 512;
const STREAM_PARTIAL_BYTES_PER_ROW: usize = 2 * 8 * 68 * 4;
/// Threads of the mma kernels, and the largest `stages` argument they accept.
const MMA_THREADS: u32 = 256;
const MMA_MAX_STAGES: usize = 16;
/// Shared memory an mma kernel needs beyond its stages: alignment slack of the dynamic ring and
/// its static arrays.
const MMA_SMEM_EXTRA: usize = 128 + 256;
/// The most parts split-K cuts K into ([`GemmConfig::splits`]).
pub const MAX_SPLITS: usize = 4;
/// The largest tile (elements of C) a split-K launch may have: every work unit's partial sums
/// take a tile of floats in the [`GemmWorkspace`], which holds [`MAX_UNITS_PER_SM`] per SM.
const MAX_SPLIT_TILE: usize = 64 * 128;
/// Split-K work units per SM the [`GemmWorkspace`] has room for: a split may make more units than
/// the budget has CTAs, so that they spread evenly over it (24 tiles on 16 CTAs make 1.5 waves,
/// split in two they make 3).
pub const MAX_UNITS_PER_SM: usize = 4;

/// A kernel of `cuda/gemm.cu`: a tile shape and the instructions that compute it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GemmKernel {
    /// sm_90a: tiles of 128 rows of A × 256 rows of B; TMA + wgmma, two consumer warpgroups.
    /// The large-M workhorse.
    Wgmma128x256,
    /// sm_90a: 128 × 128 tiles, two consumer warpgroups.
    Wgmma128x128,
    /// sm_90a: 64 × 256 tiles, one consumer warpgroup (m64n256: math-bound, not latency-bound):
    /// M ≈ 64 at small budgets, where each CTA should stream as much weight as it can.
    Wgmma64x256,
    /// sm_90a: 64 × 128 tiles, one consumer warpgroup.
    Wgmma64x128,
    /// sm_90a: 64 × 64 tiles, one consumer warpgroup: small M with few weight rows per CTA.
    Wgmma64x64,
    /// sm_90a: 16 rows of A × 64 rows of B, computed transposed (the weight on wgmma's 64-row
    /// side, 16 activation rows on its N side): M ≤ 16, where the GEMM streams its weight.
    WgmmaSwap16x64,
    /// sm_90a: 16 rows of A × 128 rows of B, transposed like [`GemmKernel::WgmmaSwap16x64`], with
    /// two consumer warpgroups: twice the weight per stage and per CTA, for M ≤ 16 on budgets
    /// smaller than the 64-row tile count.
    WgmmaSwap16x128,
    /// sm_90a: 16 rows of A × 256 rows of B, transposed like [`GemmKernel::WgmmaSwap16x64`], with
    /// four consumer warpgroups: a swapped consumer's wgmmas run one at a time at their latency,
    /// so four of them keep four times the weight in flight through the tensor cores.
    WgmmaSwap16x256,
    /// sm_90a: 16 rows of A × 192 rows of B, transposed with three consumer warpgroups: 32 tiles
    /// of Llama-3.1-8B's 6144-row QKV weight, one wave on 32 SMs and two even ones on 16, where
    /// 24 tiles of 256 rows leave 8 CTAs idle or make one and a half waves.
    WgmmaSwap16x192,
    /// sm_90a: 32 rows of A × 256 rows of B, transposed with four consumer warpgroups like
    /// [`GemmKernel::WgmmaSwap16x256`] (wgmma m64n32): 17 ≤ M ≤ 32, where a 64-row tile spends
    /// half its math on padding and, at small budgets, streams its weight slower than the SM can
    /// read it.
    WgmmaSwap32x256,
    /// sm_90a: [`GemmKernel::Wgmma128x256`] in clusters of two CTAs (the M tiles 2p and 2p + 1
    /// of one N tile) that share each slice of B: one thread loads it once and TMA multicasts it
    /// into both CTAs' rings, so L2 serves a third fewer bytes per FLOP (32 KB a stage per SM
    /// instead of 48). Launched on an even number of CTAs; no split-K. Built to spare a decode lane
    /// beside a prefill the prefill's L2 traffic, it did not (H100: the decode GEMM beside it took
    /// 1.35-1.36x its time alone, beside the plain tile 1.37-1.43x; alone it runs 0.88-1.08x the
    /// plain tile's speed; `bench-results/nexus-vs-chunked-h100.md`), so it is not among
    /// [`GemmKernel::HOPPER`] and [`plan`] never picks it; the benches keep measuring it.
    WgmmaPair128x256,
    /// Any GPU from sm_80 on: 128 × 128 tiles; cp.async + ldmatrix + mma.sync, 8 warps.
    Mma128x128,
    /// Any GPU from sm_80 on: 64 × 64 tiles with a deep cp.async ring, for small M.
    Mma64x64,
    /// Any GPU from sm_80 on: 16 rows of A × 256 rows of B, computed transposed (the weight on
    /// mma.sync's m16 side, the activations on its n8 side, 8 warps of 32 weight rows): M ≤ 16,
    /// streaming 32 KB of weight per 64-deep K block through ldmatrix.
    MmaSwap16x256,
    /// Any GPU from sm_80 on: 8 rows of A × 64 rows of B with the weight loaded from memory
    /// straight into mma.sync's fragments (no shared memory on its way: staging it there costs two
    /// bytes of shared-memory traffic per byte, which bounds the other kernels at decode's M on few
    /// SMs), 16 warps a CTA splitting each unit's K and adding their sums in a fixed order: M ≤ 8.
    /// Measured, not planned ([`GemmKernel::STREAMS`]).
    MmaStream8x64,
    /// [`GemmKernel::MmaStream8x64`] with two n8 fragments of activation rows: M ≤ 16.
    MmaStream16x64,
}

/// What the launcher and the planner need to know of a kernel.
struct Spec {
    name: &'static str,
    /// Rows of A and rows of B per tile.
    bm: usize,
    bn: usize,
    family: Family,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    /// TMA + wgmma; `swap` puts B's rows on wgmma's M side; `fused` names the instantiation with
    /// the residual add and row norm ([`GemmFusion`]); `pair`: clusters of two CTAs sharing B.
    Wgmma { swap: bool, fused: &'static str, pair: bool },
    /// cp.async + mma.sync, with at most this many stages.
    Mma { max_stages: usize },
    /// mma.sync fed by global loads; `fused` as for `Wgmma`.
    Stream { fused: &'static str },
}

impl GemmKernel {
    /// The Hopper kernels, largest tiles first (the planner settles near-ties in this order).
    pub const HOPPER: [GemmKernel; 10] = [
        GemmKernel::Wgmma128x256,
        GemmKernel::Wgmma128x128,
        GemmKernel::Wgmma64x256,
        GemmKernel::Wgmma64x128,
        GemmKernel::Wgmma64x64,
        GemmKernel::WgmmaSwap16x64,
        GemmKernel::WgmmaSwap16x128,
        GemmKernel::WgmmaSwap16x192,
        GemmKernel::WgmmaSwap16x256,
        GemmKernel::WgmmaSwap32x256,
    ];
    /// The Hopper kernels in clusters of two CTAs that share B.
    pub const PAIRS: [GemmKernel; 1] = [GemmKernel::WgmmaPair128x256];
    /// The register-streamed kernels (every GPU from sm_80 on, with the fusions). Built for the
    /// decode lane's small budgets and not yet measured on a GPU: [`plan`] never picks them; the
    /// tests and benches run them.
    pub const STREAMS: [GemmKernel; 2] = [GemmKernel::MmaStream8x64, GemmKernel::MmaStream16x64];
    /// The kernels that run on every GPU from sm_80 on, largest tiles first.
    pub const PORTABLE: [GemmKernel; 3] = [GemmKernel::Mma128x128, GemmKernel::Mma64x64, GemmKernel::MmaSwap16x256];
    /// The portable kernels that accumulate every output in one order whatever the tile and M
    /// (the swapped one feeds the weight to the other operand of mma.sync and is left out).
    pub const BATCH_INVARIANT_PORTABLE: [GemmKernel; 2] = [GemmKernel::Mma128x128, GemmKernel::Mma64x64];
    /// The Hopper kernels that accumulate every output in one order, K block after K block
    /// with the same wgmma steps, whatever the tile and M: a row's result depends on that row of
    /// A alone, bit for bit (checked on the GPU by `tests/gpu/gemm.rs`). The swapped kernels
    /// spread K over four accumulators and are left out.
    pub const BATCH_INVARIANT_HOPPER: [GemmKernel; 5] = [
        GemmKernel::Wgmma128x256,
        GemmKernel::Wgmma128x128,
        GemmKernel::Wgmma64x256,
        GemmKernel::Wgmma64x128,
        GemmKernel::Wgmma64x64,
    ];

    fn spec(self) -> Spec {
        use Family::*;
        // A wgmma tile's fused instantiation is `NAME_fused` (cuda/gemm.cu).
        macro_rules! wgmma {
            ($name:literal, $bm:literal, $bn:literal, $swap:literal) => {
                wgmma!($name, $bm, $bn, $swap, false)
            };
            ($name:literal, $bm:literal, $bn:literal, $swap:literal, $pair:literal) => {
                ($name, $bm, $bn, Wgmma { swap: $swap, fused: concat!($name, "_fused"), pair: $pair })
            };
        }
        let (name, bm, bn, family) = match self {
            GemmKernel::Wgmma128x256 => wgmma!("gemm_wgmma_128x256", 128, 256, false),
            GemmKernel::Wgmma128x128 => wgmma!("gemm_wgmma_128x128", 128, 128, false),
            GemmKernel::Wgmma64x256 => wgmma!("gemm_wgmma_64x256", 64, 256, false),
            GemmKernel::Wgmma64x128 => wgmma!("gemm_wgmma_64x128", 64, 128, false),
            GemmKernel::Wgmma64x64 => wgmma!("gemm_wgmma_64x64", 64, 64, false),
            GemmKernel::WgmmaSwap16x64 => wgmma!("gemm_wgmma_swap_16x64", 16, 64, true),
            GemmKernel::WgmmaSwap16x128 => wgmma!("gemm_wgmma_swap_16x128", 16, 128, true),
            GemmKernel::WgmmaSwap16x192 => wgmma!("gemm_wgmma_swap_16x192", 16, 192, true),
            GemmKernel::WgmmaSwap16x256 => wgmma!("gemm_wgmma_swap_16x256", 16, 256, true),
            GemmKernel::WgmmaSwap32x256 => wgmma!("gemm_wgmma_swap_32x256", 32, 256, true),
            GemmKernel::WgmmaPair128x256 => wgmma!("gemm_wgmma_pair_128x256", 128, 256, false, true),
            GemmKernel::Mma128x128 => ("gemm_mma_128x128", 128, 128, Mma { max_stages: 4 }),
            GemmKernel::Mma64x64 => ("gemm_mma_64x64", 64, 64, Mma { max_stages: 12 }),
            GemmKernel::MmaSwap16x256 => ("gemm_mma_swap_16x256", 16, 256, Mma { max_stages: 8 }),
            GemmKernel::MmaStream8x64 => {
                ("gemm_mma_stream_8x64", 8, 64, Stream { fused: "gemm_mma_stream_8x64_fused" })
            }
            GemmKernel::MmaStream16x64 => {
                ("gemm_mma_stream_16x64", 16, 64, Stream { fused: "gemm_mma_stream_16x64_fused" })
            }
        };
        Spec { name, bm, bn, family }
    }

    /// The tile: (rows of A, rows of B), i.e. (rows, columns) of C.
    pub fn tile(self) -> (usize, usize) {
        let s = self.spec();
        (s.bm, s.bn)
    }

    /// Whether the kernel runs only on Hopper (the `compute_90a` PTX).
    pub fn needs_sm90a(self) -> bool {
        matches!(self.spec().family, Family::Wgmma { .. })
    }

    /// Whether a launch of the kernel may split K ([`GemmConfig::splits`]): the wgmma kernels
    /// whose tile's partial sums fit the [`GemmWorkspace`]'s room per work unit (64 × 128 floats).
    pub fn splits_k(self) -> bool {
        let (bm, bn) = self.tile();
        self.needs_sm90a() && !self.is_pair() && bm * bn <= MAX_SPLIT_TILE
    }

    /// Whether the kernel runs in clusters of two CTAs sharing B ([`GemmKernel::PAIRS`]).
    pub fn is_pair(self) -> bool {
        matches!(self.spec().family, Family::Wgmma { pair: true, .. })
    }

    /// The work units of `shape` unsplit: its output tiles, or pairs of them (two M tiles of one
    /// N tile, the last maybe half past M) for a pair kernel, which a cluster of two CTAs takes.
    pub fn units(self, shape: GemmShape) -> usize {
        let (bm, bn) = self.tile();
        let rows = if self.is_pair() { 2 * bm } else { bm };
        shape.m.div_ceil(rows) * shape.n.div_ceil(bn)
    }

    /// Whether the kernel can run a [`GemmFusion`] other than none: the wgmma and register-streamed
    /// ones.
    pub fn fuses_norms(self) -> bool {
        self.fused_name().is_some()
    }

    /// The kernel's names in the PTX module: plain, then fused where it has that.
    #[cfg(test)]
    pub(crate) fn ptx_names(self) -> Vec<&'static str> {
        std::iter::once(self.spec().name).chain(self.fused_name()).collect()
    }

    /// The name of the kernel's instantiation with the fusions.
    fn fused_name(self) -> Option<&'static str> {
        match self.spec().family {
            Family::Wgmma { fused, .. } | Family::Stream { fused } => Some(fused),
            Family::Mma { .. } => None,
        }
    }

    /// The kernel's name in the PTX module.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// The output tiles of `shape`.
    pub fn tiles(self, shape: GemmShape) -> usize {
        let (bm, bn) = self.tile();
        shape.m.div_ceil(bm) * shape.n.div_ceil(bn)
    }
}

/// What a launch runs: a kernel, and how many parts K is split into.
///
/// With `splits > 1` (split-K, wgmma kernels only) each output tile becomes `splits` work units,
/// one per range of K, so that a shape with fewer tiles than the budget has CTAs still keeps
/// every CTA streaming; the partial sums meet in the [`GemmWorkspace`] and the tile's last unit
/// adds them, always in the order of the ranges (the result does not depend on timing).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmConfig {
    /// The kernel to launch.
    pub kernel: GemmKernel,
    /// Parts K is split into: 1 (no split) to [`MAX_SPLITS`].
    pub splits: usize,
}

impl From<GemmKernel> for GemmConfig {
    /// The kernel without split-K.
    fn from(kernel: GemmKernel) -> Self {
        GemmConfig { kernel, splits: 1 }
    }
}

/// The kernel [`plan`] chose for a shape and budget, and why.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmPlan {
    /// The kernel to launch.
    pub kernel: GemmKernel,
    /// Parts K is split into (1: none).
    pub splits: usize,
    /// Output tiles of the shape.
    pub tiles: usize,
    /// CTAs launched: `min(budget, tiles × splits)`.
    pub ctas: u32,
    /// `ceil(tiles × splits / ctas)`: work units the busiest CTA computes.
    pub waves: usize,
    /// The model's time for the launch, in seconds (for ranking; not a prediction to trust).
    pub estimated_seconds: f64,
}

impl GemmPlan {
    /// The kernel and split to launch.
    pub fn config(&self) -> GemmConfig {
        GemmConfig { kernel: self.kernel, splits: self.splits }
    }
}

// Compute-side figures of the planning model, fitted on an H100 SXM to bench-results/gemm-h100.md
// (the model's times are within about 10% of the measured ones for M >= 256; small-M launches
// also pay a few microseconds of start-up the model leaves out). The H200 is the same silicon
// (clock, L2, tensor cores) with faster HBM, so they hold there too; DRAM bandwidth is not among
// them: it comes from the device's measured curve. Re-fit them from the benchmark if the choices
// look wrong.
/// SM clock under load.
const CLOCK_HZ: f64 = 1.75e9;
/// L2 → SM bandwidth of the whole GPU, and the most one SM takes per clock. The prefill-lane
/// table (bench-results/gemm-h100.md, 2026-12-06) has 128 x 128 tiles filling 10.0 TB/s on 116
/// CTAs (Llama-3.1-8B's output projection at M = 2048, 5 waves) at the speed of their math; with
/// the earlier 9 TB/s the model made them fill-bound there and picked 128 x 256 tiles, 3 waves
/// of which measured 15-18% slower on 104-116 CTAs.
const L2_BYTES_PER_S: f64 = 11e12;
const SM_FILL_BYTES_PER_CLOCK: f64 = 128.0;
/// Dense bf16 multiply-adds per SM and clock: wgmma, and mma.sync (the Ampere rate).
const WGMMA_MACS_PER_CLOCK: f64 = 2048.0;
/// Clocks from one wgmma m64nNk16 to the next that accumulates into the same registers:
/// `WGMMA_LATENCY + WGMMA_LATENCY_PER_N · N` (fitted: ~340 clocks per K block of the 64 x 16
/// swapped tile, ~420 of 64 x 64, ~460 of 64 x 128, each one chain of 4 dependent wgmmas).
const WGMMA_LATENCY: f64 = 80.0;
const WGMMA_LATENCY_PER_N: f64 = 0.3;
/// How much faster than one dependent chain of its 4 wgmmas a swapped (n16 or n32) kernel's K
/// block runs. It keeps 4 accumulator sets (n32: 2) so that the chains could overlap, but fitted
/// to the n16 tiles of the H200 table (bench-results/gemm-h200.md, every kernel at M = 1, 16, 64
/// and every budget) it is 0.85: they do not overlap, and a K block costs ~15% more (stage barriers, TMA issue). With the
/// earlier guess of 2 the planner took the swapped kernels where 64-row tiles streamed 1.2-1.6x
/// faster (the model's picks then averaged 1.12x slower than the best kernel of the table's
/// rows, 2.2x at worst; with 0.85, 1.01x and 1.14x).
const SWAP_CHAINS: f64 = 0.85;
const MMA_MACS_PER_CLOCK: f64 = 1024.0;
/// Split-K's fixed cost per wave of work units: a unit's partial sums' stores, fence and count,
/// and the last unit's read of them, during which its consumers stall, and so its ring and the
/// weight stream: added to the launch's time, not hidden under its DRAM time. Fitted on the H200
/// (bench-results/gemm-h200.md, eleventh round): where two measured plans of a decode GEMM
/// differ by more than 5% (25 pairs, one-wave and multi-wave splits against unsplit tiles), 4.5
/// us ranks all 25 as measured, 3 us 21, and the earlier 1.5 us counted under the DRAM time 10.
/// Kept when [`UNHIDDEN_OVERLAP`] went from 0.5 to 0.2: with 4 or 5 us fewer of the decode tables'
/// split decisions rank as measured in all (`split_decisions_replayed_on_the_measured_decode_tables`;
/// 4 us gains H200 rows and loses more H100 ones, 5 us the reverse and no longer splits the output
/// projection at M = 64 on 132 SMs of the H100 that `split_k_only_where_tiles_leave_ctas_idle` pins).
const SPLIT_SYNC_SECONDS: f64 = 4.5e-6;
/// The share of the shorter of a launch's compute and DRAM times that its ring does not hide. A
/// plain max(compute, DRAM) ranks every memory-bound candidate by the bandwidth curve alone, and
/// the curve differs by a few percent between CTA counts near saturation (this GPU's streaming
/// read: 4.10 TB/s at 96 SMs, 4.21 at 132): the batch-invariant plan of Llama-3.1-8B's gate/up
/// projection at M = 1 then took Wgmma64x128 (two waves on 132 CTAs, 72-75 us measured) over
/// Wgmma64x256 (one wave on 112, 62-64 us), whose DRAM time is 52 us and modelled compute 35 and
/// 23 us: a fifth of the shorter term added gives 59 and 56.6.
///
/// It was 0.5, fitted on that pair, which charged an unsplit tile whose modelled compute is close
/// to its DRAM time half of that again, so that split-K (whose units compute a fraction of K each)
/// looked faster than it measures where the unsplit tiles already read near the curve's top:
/// Llama-3.1-8B's QKV projection at M = 1 and 16 on 96-132 SMs took WgmmaSwap16x256 or 16x192 split
/// 4 (1.89-1.96 TB/s on the H100, bench-results/gemm-h100.md of 2026-12-07) where WgmmaSwap16x128
/// unsplit on 48 CTAs does 2.10-2.13, and WgmmaSwap16x128 split 2 (2.41-2.43 on the H200,
/// gemm-h200.md of 2026-12-02) where WgmmaSwap16x64 unsplit does 2.68-2.75. Fitting measured time =
/// a + max + f · min to the unsplit swapped-tile cells of each decode table gives f = 0.01-0.07 and
/// a = 4-7.5 us (the H200 table of 2026-12-02, older kernels: f < 0): a is the launch's fixed cost,
/// which a streaming read of the same bytes pays too (QKV's 50 MB on the H100: 4-5 us over the
/// curve's time at every budget) and which ranks no plan above another. 0.2 is near the least share
/// that keeps the decisions the tests pin (below 0.175 the H100 output projection at M = 1 on 132
/// SMs no longer splits, where split and unsplit measured level, 1.67-1.76 against 1.69-1.75 TB/s).
/// With it the decode tables' split decisions rank as measured on 219 of 245 rows (0.5: 182;
/// `split_decisions_replayed_on_the_measured_decode_tables`), the unsplit picks are as good or
/// better on every table, and no pick at M >= 256 moves.
const UNHIDDEN_OVERLAP: f64 = 0.2;
/// Estimates within this factor of each other count as a tie, settled by less math issued.
const TIE: f64 = 1.01;

/// Clocks of tensor-core work per 64-deep K block of one tile, and the efficiency reached.
fn math_clocks_per_k_block(kernel: GemmKernel, m: usize) -> f64 {
    let s = kernel.spec();
    match s.family {
        Family::Wgmma { swap, .. } => {
            // Each consumer warpgroup issues 4 wgmma m64nNk16 per K block. One occupies the
            // tensor cores for the larger of its math (64·N·16 MACs) and its shared-memory reads
            // (A 2 KB, B N·32 bytes, at 128 bytes per clock); the warpgroups share the SM. A
            // consumer's own wgmmas form a dependent chain (one accumulator) that advances one
            // wgmma per latency, which bounds the narrow tiles.
            let (rows, n) = if swap { (s.bn, s.bm) } else { (s.bm, s.bn) };
            let consumers = (rows / 64) as f64;
            let n = n as f64;
            let per_wgmma = (64.0 * n * 16.0 / WGMMA_MACS_PER_CLOCK).max(16.0 + n / 4.0);
            // Share of that rate reached: the 128 x 128 tile (two consumers) measured 0.5-0.55x
            // the 128 x 256 tile's time per wave on the prefill-lane table, whatever the budget.
            let efficiency = if n >= 256.0 {
                0.95
            } else if consumers >= 2.0 && !swap {
                0.90
            } else {
                0.85
            };
            let chains = if swap && n <= 32.0 { SWAP_CHAINS } else { 1.0 };
            let latency = WGMMA_LATENCY + WGMMA_LATENCY_PER_N * n;
            let chain = 4.0 * per_wgmma.max(latency) / chains;
            (consumers * 4.0 * per_wgmma / efficiency).max(chain)
        }
        Family::Mma { .. } => {
            // Warps skip m16 fragments wholly below M.
            let rows = s.bm.min(m.div_ceil(16) * 16) as f64;
            rows * s.bn as f64 * BK as f64 / (MMA_MACS_PER_CLOCK * 0.7)
        }
        // Every n8 fragment of the tile, whatever M: a unit's mma.sync over the tile.
        Family::Stream { .. } => (s.bm * s.bn * BK) as f64 / (MMA_MACS_PER_CLOCK * 0.7),
    }
}

/// Whether `kernel` is worth modelling at `m` rows of A: a swapped kernel only where one tile
/// holds all of them. Its M tiles over the same weight rows run side by side (M fastest in the
/// tile order), each streaming the whole weight through its own SM: on the H100 the swapped
/// tiles at twice their rows measured 0.78-0.87x the 64-row tiles (M = 32 on the 16-row tiles,
/// M = 64 on the 32-row one; bench-results/gemm-decode-h100.md), while the model, which counts
/// the weight's bytes once, ranked them first.
fn covers_m(kernel: GemmKernel, m: usize) -> bool {
    let s = kernel.spec();
    !matches!(s.family, Family::Wgmma { swap: true, .. } | Family::Stream { .. }) || m <= s.bm
}

/// Multiply-adds a tile issues per element of K (padding included): the tie-breaker of [`plan`].
fn tile_macs_per_k(kernel: GemmKernel, m: usize) -> f64 {
    let s = kernel.spec();
    let rows = match s.family {
        Family::Wgmma { .. } | Family::Stream { .. } => s.bm,
        // Warps skip m16 fragments wholly below M.
        Family::Mma { .. } => s.bm.min(m.div_ceil(16) * 16),
    };
    (rows * s.bn) as f64
}

/// The model's plan for `kernel` with K in `splits` parts and at most `budget` CTAs on a device
/// reading `dram` (see [`plan`]).
fn estimate(kernel: GemmKernel, shape: GemmShape, budget: u32, dram: &BandwidthCurve, splits: usize) -> GemmPlan {
    let GemmShape { m, n, k } = shape;
    let (bm, bn) = kernel.tile();
    let tiles = kernel.tiles(shape).max(1);
    let units = tiles * splits;
    let ctas = (units.min(budget.max(1) as usize)) as u32;
    let waves = units.div_ceil(ctas as usize);
    let k_blocks = k.div_ceil(BK).div_ceil(splits) as f64;
    // Each K block fills a stage with the tile's rows of A and B that exist (out-of-range rows
    // are zero-filled without reading memory).
    let fill_bytes = ((bm.min(m) + bn.min(n)) * BK * 2) as f64;
    let fill_rate = SM_FILL_BYTES_PER_CLOCK.min(L2_BYTES_PER_S / CLOCK_HZ / ctas as f64);
    let per_k_block = math_clocks_per_k_block(kernel, m).max(fill_bytes / fill_rate);
    let mut compute = waves as f64 * k_blocks * per_k_block / CLOCK_HZ;
    if splits > 1 {
        // Every unit stores its tile of partial sums and the last reads all of them (in L2).
        let partial_bytes = ((splits + 1) * bm * bn * 4) as f64;
        compute += waves as f64 * partial_bytes / SM_FILL_BYTES_PER_CLOCK / CLOCK_HZ;
    }
    let memory = dram_seconds(shape, units, ctas, dram);
    let mut estimated_seconds = compute.max(memory) + UNHIDDEN_OVERLAP * compute.min(memory);
    if splits > 1 {
        estimated_seconds += waves as f64 * SPLIT_SYNC_SECONDS;
    }
    GemmPlan { kernel, splits, tiles, ctas, waves, estimated_seconds }
}

/// The DRAM time of `shape`'s operands read as `units` work units on `ctas` CTAs. Full waves
/// stream at the bandwidth of all the launch's CTAs, a last partial wave at that of the CTAs it
/// keeps busy (the counter hands its units to the CTAs that finish first, the others leave): 112
/// tiles on 64 CTAs read 64 tiles' bytes at 64 CTAs' bandwidth, then 48 tiles' at 48 CTAs'.
fn dram_seconds(shape: GemmShape, units: usize, ctas: u32, dram: &BandwidthCurve) -> f64 {
    let unit_bytes = shape.bf16_bytes() as f64 / units as f64;
    let (full, rest) = (units / ctas as usize, units % ctas as usize);
    let mut seconds = (full * ctas as usize) as f64 * unit_bytes / dram.at(ctas);
    if rest > 0 {
        seconds += rest as f64 * unit_bytes / dram.at(rest as u32);
    }
    seconds
}

/// The splits worth modelling for `kernel` on `shape` with `budget` CTAs: 1, and for a kernel
/// that [splits K](GemmKernel::splits_k) whose tiles do not spread evenly over the budget (fewer
/// tiles than CTAs, or a last wave that leaves some idle), every split that gives each unit at
/// least one K block and makes at most [`MAX_UNITS_PER_SM`] units per CTA.
fn split_candidates(kernel: GemmKernel, shape: GemmShape, budget: u32) -> impl Iterator<Item = usize> {
    let tiles = kernel.tiles(shape).max(1);
    let budget = budget.max(1) as usize;
    let uneven = !tiles.is_multiple_of(budget);
    let most = if kernel.splits_k() && uneven {
        MAX_SPLITS.min(MAX_UNITS_PER_SM * budget / tiles).min(shape.k.div_ceil(BK))
    } else {
        1
    };
    1..=most.max(1)
}

/// Picks the kernel for `shape` under `budget` on `device` (its PTX build decides the candidates):
/// the candidate with the least modelled time, where a candidate's time is the larger of (a) its
/// waves (`ceil(tiles / ctas)`, DeepGEMM-style) × K blocks × the larger of a K block's tensor-core
/// time and its L2 fill time, and (b) the DRAM time of A, B and C at the bandwidth the device's
/// curve gives `ctas` CTAs, plus a fifth of the smaller of the two (the overlap the ring does not
/// achieve). Near-ties go to the candidate that issues less math (less padding). A swapped tile is
/// a candidate only where its rows hold all of M.
/// A wgmma candidate whose tiles are fewer than the budget is also modelled with K split in 2 to
/// [`MAX_SPLITS`] parts (work units = tiles × splits, in as many waves), paying for its partial
/// sums' round trip through L2 and a fixed synchronization cost.
pub fn plan(shape: GemmShape, budget: CtaBudget, device: &DeviceModel) -> GemmPlan {
    plan_ctas(shape, budget.get(), device)
}

/// [`plan`] restricted to kernels whose results are batch invariant: each row of C is the same,
/// bit for bit, whatever the other rows of A and whatever kernel of the family the plan picks
/// ([`GemmKernel::BATCH_INVARIANT_HOPPER`]; [`GemmKernel::BATCH_INVARIANT_PORTABLE`] elsewhere).
/// Decode-sized M then pays for 64-row tiles of padding math. Never splits K (the split, and so
/// the order of the sums, would follow the budget).
pub fn plan_batch_invariant(shape: GemmShape, budget: CtaBudget, device: &DeviceModel) -> GemmPlan {
    plan_batch_invariant_ctas(shape, budget.get(), device)
}

/// [`plan_batch_invariant`] for a budget of `budget` CTAs.
fn plan_batch_invariant_ctas(shape: GemmShape, budget: u32, device: &DeviceModel) -> GemmPlan {
    let candidates: &[GemmKernel] = match device.target() {
        PtxTarget::Sm90a => &GemmKernel::BATCH_INVARIANT_HOPPER,
        PtxTarget::Sm80 => &GemmKernel::BATCH_INVARIANT_PORTABLE,
    };
    plan_among(candidates, shape, budget, device.bandwidth(), false)
}

/// [`plan`] for a budget of `budget` CTAs.
fn plan_ctas(shape: GemmShape, budget: u32, device: &DeviceModel) -> GemmPlan {
    let candidates: &[GemmKernel] = match device.target() {
        PtxTarget::Sm90a => &GemmKernel::HOPPER,
        PtxTarget::Sm80 => &GemmKernel::PORTABLE,
    };
    plan_among(candidates, shape, budget, device.bandwidth(), true)
}

/// The model's best of `candidates` (not empty), with split-K where `split_k` allows it. Splits
/// are tried in increasing order, so a tie keeps the smaller one.
fn plan_among(
    candidates: &[GemmKernel],
    shape: GemmShape,
    budget: u32,
    dram: &BandwidthCurve,
    split_k: bool,
) -> GemmPlan {
    let mut best: Option<(GemmPlan, f64)> = None;
    let options = candidates.iter().filter(|&&kernel| covers_m(kernel, shape.m)).flat_map(|&kernel| {
        let splits = split_candidates(kernel, shape, budget).filter(move |&s| split_k || s == 1);
        splits.map(move |s| (kernel, s))
    });
    for (kernel, splits) in options {
        let p = estimate(kernel, shape, budget, dram, splits);
        let work = p.tiles as f64 * tile_macs_per_k(kernel, shape.m);
        best = match best {
            Some((b, b_work))
                if b.estimated_seconds * TIE < p.estimated_seconds
                    || (p.estimated_seconds * TIE >= b.estimated_seconds && b_work <= work) =>
            {
                Some((b, b_work))
            }
            _ => Some((p, work)),
        };
    }
    best.map_or_else(|| estimate(candidates[0], shape, budget, dram, 1), |(p, _)| p)
}

/// Device scratch of the GEMM launches: the tile counter their CTAs share. Make one per stream
/// (two GEMMs in flight at once must not share one) and pass it to every launch; launches then
/// allocate nothing and can be captured in a CUDA graph.
#[derive(Debug)]
pub struct GemmWorkspace {
    counter: CudaSlice<u32>,
    /// Split-K: a tile of partial sums per work unit (room for [`MAX_UNITS_PER_SM`] units of the
    /// largest split tile per SM), and an arrival count per output tile (zero between launches).
    partials: CudaSlice<f32>,
    tile_arrivals: CudaSlice<u32>,
    /// The device's opt-in shared memory per block, which sizes the mma kernels' rings.
    smem_per_block: usize,
}

impl GemmWorkspace {
    /// A workspace on `ctx`'s device (about 128 KB of split-K scratch per SM).
    pub fn new(ctx: &PhaseContext) -> Result<Self> {
        let stream = ctx.stream();
        // The tile counter and the count of CTAs done; zero between launches (see cuda/gemm.cu).
        let counter = stream.alloc_zeros::<u32>(2)?;
        let sms = ctx.gpu().sm_count() as usize;
        let partials = stream.alloc_zeros::<f32>(MAX_UNITS_PER_SM * sms * MAX_SPLIT_TILE)?;
        let tile_arrivals = stream.alloc_zeros::<u32>(MAX_UNITS_PER_SM * sms)?;
        let smem_per_block =
            ctx.gpu().context().attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        Ok(GemmWorkspace { counter, partials, tile_arrivals, smem_per_block: smem_per_block.max(0) as usize })
    }
}

/// `c = a · bᵀ (+ bias)` with `a: [m, k]`, `b: [n, k]`, `bias: [n]`, `c: [m, n]`, all bf16, on
/// at most the context's CTA budget, with the kernel [`plan`] picks. Under a dependent launch
/// ([`crate::LaunchOptions`]) the Hopper kernels read `b` before the previous kernel has
/// finished: `b` is a weight, which the kernels before this one must not write.
pub fn gemm(
    ctx: &PhaseContext,
    a: &CudaView<'_, bf16>,
    b: &CudaView<'_, bf16>,
    bias: Option<&CudaView<'_, bf16>>,
    c: &mut CudaViewMut<'_, bf16>,
    shape: GemmShape,
    workspace: &mut GemmWorkspace,
) -> Result<()> {
    let config = plan(shape, ctx.budget(), ctx.gpu().model()).config();
    gemm_with(ctx, config, GemmFusion::None, a, b, bias, c, shape, workspace)
}

/// Columns per sum of squares of [`GemmFusion`] (`SQ_COLS` in cuda/gemm.cu): a row of `n`
/// values has `n.div_ceil(SQUARE_SUM_COLS)` of them.
pub const SQUARE_SUM_COLS: usize = 64;

/// What a wgmma or register-streamed GEMM fuses around `A · Bᵀ (+ bias)`: a pre-norm layer's
/// residual add and the RMSNorm after it, so that no norm kernel runs between two GEMMs (see the
/// module docs). The square sums are f32, `[rows, cols.div_ceil(SQUARE_SUM_COLS)]`, each the sum
/// of the squares of one row's values in [`SQUARE_SUM_COLS`] columns, added in an order that
/// depends on the kernel family alone (the non-swapped tiles share one), not on M or the budget.
#[derive(Debug, Default)]
pub enum GemmFusion<'f, 'v> {
    /// `C = A · Bᵀ (+ bias)`.
    #[default]
    None,
    /// `C += A · Bᵀ (+ bias)`, the product rounded to bf16 before the add (as an output stored,
    /// then added to the residual), and the square sums of C's new rows to `square_sums`
    /// (`[m, n / 64]` rounded up). Not with the SwiGLU epilogue.
    AddToC { square_sums: &'f mut CudaViewMut<'v, f32> },
    /// Row `i` of the product scaled by `1 / sqrt(mean(A[i]²) + eps)` (before the bias and the
    /// SwiGLU), from A's square sums as [`GemmFusion::AddToC`] wrote them (`[m, k / 64]` rounded
    /// up): `rms_norm(A) · Bᵀ` where B holds the norm's gain
    /// ([`crate::reference::fold_norm_gain`]).
    RowNorm { square_sums: &'f CudaView<'v, f32>, eps: f32 },
}

/// [`gemm`] with a given kernel, and split of K (a [`GemmKernel`] alone: no split), and a
/// [`GemmFusion`]. Fails with [`Error::Unsupported`] for a Hopper kernel on another GPU, for a
/// fusion on a kernel without one ([`GemmKernel::fuses_norms`]), and for a split the kernel or the
/// workspace cannot take (a split of an mma kernel, more than [`MAX_SPLITS`] parts or than K
/// has blocks of 64, a tile larger than 64 × 128, more than [`MAX_UNITS_PER_SM`] work units per
/// SM of the device); with [`Error::Shape`] for square sums of the wrong length or an epsilon
/// that is not positive.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    ctx: &PhaseContext,
    config: impl Into<GemmConfig>,
    fusion: GemmFusion<'_, '_>,
    a: &CudaView<'_, bf16>,
    b: &CudaView<'_, bf16>,
    bias: Option<&CudaView<'_, bf16>>,
    c: &mut CudaViewMut<'_, bf16>,
    shape: GemmShape,
    workspace: &mut GemmWorkspace,
) -> Result<()> {
    let epilogue = if matches!(fusion, GemmFusion::AddToC { .. }) { Epilogue::Accumulate } else { Epilogue::Store };
    launch(ctx, config.into(), fusion, a, b, bias, c, shape, epilogue, workspace)
}

/// The SwiGLU of a feed-forward layer in one launch: `out = silu(a · gateᵀ) * (a · upᵀ)`, where
/// `gate_up: [n, k]` holds the gate rows, then the up rows (`n / 2` each, as
/// [`crate::reference::gemm_silu_and_mul`]), `a: [m, k]` and `out: [m, n / 2]`. `shape` is the
/// GEMM's, `n` included (a multiple of 16); the kernel [`plan`] picks for it runs with an epilogue
/// that applies SiLU and the product to its f32 sums, so the `[m, n]` intermediate is never
/// stored. Same requirements and errors as [`gemm`].
pub fn gemm_silu_and_mul(
    ctx: &PhaseContext,
    a: &CudaView<'_, bf16>,
    gate_up: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    shape: GemmShape,
    workspace: &mut GemmWorkspace,
) -> Result<()> {
    let config = plan(shape, ctx.budget(), ctx.gpu().model()).config();
    gemm_silu_and_mul_with(ctx, config, GemmFusion::None, a, gate_up, out, shape, workspace)
}

/// [`gemm_silu_and_mul`] with a given kernel and split of K, and a fusion, as [`gemm_with`]
/// ([`GemmFusion::AddToC`] fails with [`Error::Shape`]: the SwiGLU is not added to anything).
#[allow(clippy::too_many_arguments)]
pub fn gemm_silu_and_mul_with(
    ctx: &PhaseContext,
    config: impl Into<GemmConfig>,
    fusion: GemmFusion<'_, '_>,
    a: &CudaView<'_, bf16>,
    gate_up: &CudaView<'_, bf16>,
    out: &mut CudaViewMut<'_, bf16>,
    shape: GemmShape,
    workspace: &mut GemmWorkspace,
) -> Result<()> {
    ensure_shape!(
        !matches!(fusion, GemmFusion::AddToC { .. }),
        "gemm_silu_and_mul: the SwiGLU's output cannot be added to C"
    );
    launch(ctx, config.into(), fusion, a, gate_up, None, out, shape, Epilogue::SiluAndMul, workspace)
}

/// What a launch stores (`Epilogue` in cuda/gemm.cu).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Epilogue {
    /// `C = A · Bᵀ (+ bias)`, `[m, n]`.
    Store = 0,
    /// B is `[gate | up]`; `C = silu(A · gateᵀ) * (A · upᵀ)`, `[m, n / 2]`.
    SiluAndMul = 1,
    /// `C += A · Bᵀ (+ bias)`, `[m, n]`, and C's square sums ([`GemmFusion::AddToC`]).
    Accumulate = 2,
}

/// Rows of B the SiLU epilogue reads as one block (`gated_row` in cuda/gemm.cu): 8 gate rows, then
/// the 8 matching up rows.
const GATED_BLOCK: usize = 8;

#[allow(clippy::too_many_arguments)]
fn launch(
    ctx: &PhaseContext,
    config: GemmConfig,
    fusion: GemmFusion<'_, '_>,
    a: &CudaView<'_, bf16>,
    b: &CudaView<'_, bf16>,
    bias: Option<&CudaView<'_, bf16>>,
    c: &mut CudaViewMut<'_, bf16>,
    shape: GemmShape,
    epilogue: Epilogue,
    workspace: &mut GemmWorkspace,
) -> Result<()> {
    let GemmShape { m, n, k } = shape;
    ensure_shape!(k > 0 && k % ALIGN_ELEMS == 0, "gemm: k = {k} must be a positive multiple of {ALIGN_ELEMS}");
    ensure_shape!(n % ALIGN_ELEMS == 0, "gemm: n = {n} must be a multiple of {ALIGN_ELEMS}");
    let len = |rows: usize, cols: usize, what: &str| {
        rows.checked_mul(cols).ok_or_else(|| Error::Shape(format!("gemm: {what} of {rows} x {cols} overflows")))
    };
    ensure_shape!(a.len() == len(m, k, "A")?, "gemm: A has {} values, expected {m} x {k}", a.len());
    ensure_shape!(b.len() == len(n, k, "B")?, "gemm: B has {} values, expected {n} x {k}", b.len());
    let c_cols = match epilogue {
        Epilogue::Store | Epilogue::Accumulate => n,
        Epilogue::SiluAndMul => {
            ensure_shape!(
                n % (2 * GATED_BLOCK) == 0,
                "gemm_silu_and_mul: n = {n} (gate and up rows) must be a multiple of {}",
                2 * GATED_BLOCK
            );
            n / 2
        }
    };
    ensure_shape!(c.len() == len(m, c_cols, "C")?, "gemm: C has {} values, expected {m} x {c_cols}", c.len());
    if let Some(bias) = bias {
        ensure_shape!(bias.len() == n, "gemm: bias has {} values, expected {n}", bias.len());
    }
    let sums = |cols: usize| len(m, cols.div_ceil(SQUARE_SUM_COLS), "the square sums");
    match &fusion {
        GemmFusion::None => {}
        GemmFusion::AddToC { square_sums } => {
            ensure_shape!(
                square_sums.len() == sums(n)?,
                "gemm: the square sums of C have {} values, expected {m} x {}",
                square_sums.len(),
                n.div_ceil(SQUARE_SUM_COLS)
            );
        }
        GemmFusion::RowNorm { square_sums, eps } => {
            ensure_shape!(*eps > 0.0 && eps.is_finite(), "gemm: the row norm's epsilon {eps} must be positive");
            ensure_shape!(
                square_sums.len() == sums(k)?,
                "gemm: the square sums of A have {} values, expected {m} x {}",
                square_sums.len(),
                k.div_ceil(SQUARE_SUM_COLS)
            );
        }
    }
    let GemmConfig { kernel, splits } = config;
    let spec = kernel.spec();
    if kernel.needs_sm90a() && ctx.gpu().target() != PtxTarget::Sm90a {
        return Err(Error::Unsupported(format!("gemm: {} needs an sm_90a (Hopper) GPU", spec.name)));
    }
    if !matches!(fusion, GemmFusion::None) && !kernel.fuses_norms() {
        return Err(Error::Unsupported(format!("gemm: {} fuses no residual add or row norm", spec.name)));
    }
    let units = kernel.units(shape).saturating_mul(splits);
    if splits != 1 {
        let unsupported =
            |why: String| Err(Error::Unsupported(format!("gemm: {} split {splits} ways: {why}", spec.name)));
        if !kernel.splits_k() {
            return unsupported(format!(
                "only the wgmma kernels with tiles of at most {MAX_SPLIT_TILE} elements split K"
            ));
        }
        if splits == 0 || splits > MAX_SPLITS || splits > k.div_ceil(BK) {
            return unsupported(format!("splits must be 1 to {MAX_SPLITS} and at most K's {} blocks", k.div_ceil(BK)));
        }
        // The workspace holds a tile of the largest size and an arrival count per unit it has room for.
        if units > workspace.tile_arrivals.len() {
            return unsupported(format!(
                "{units} work units, more than the workspace's {} ({MAX_UNITS_PER_SM} per SM)",
                workspace.tile_arrivals.len()
            ));
        }
    }
    let to_i32 = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::Unsupported(format!("gemm: {what} = {v} does not fit in i32")))
    };
    let (m_i, n_i, k_i) = (to_i32(m, "m")?, to_i32(n, "n")?, to_i32(k, "k")?);
    to_i32(units, "the work unit count")?;
    if m == 0 || n == 0 {
        return Ok(());
    }

    let stream = ctx.stream();
    // The read guards of A and B stay alive until the launch is enqueued: TMA reads them through
    // the tensor maps, so this is what orders the launch for cudarc's stream tracking.
    let (a_ptr, _a_read) = a.device_ptr(stream);
    let (b_ptr, _b_read) = b.device_ptr(stream);
    let c_ptr = c.device_ptr(stream).0;
    let bias_ptr = bias.map(|v| v.device_ptr(stream).0);
    for (ptr, what) in [(Some(a_ptr), "A"), (Some(b_ptr), "B"), (Some(c_ptr), "C"), (bias_ptr, "bias")] {
        if let Some(ptr) = ptr {
            ensure_shape!(ptr % ALIGN_BYTES == 0, "gemm: {what} must start on a {ALIGN_BYTES}-byte boundary");
        }
    }

    // A pair kernel's CTAs come in clusters of two: an even grid, two CTAs a unit.
    let grid = if kernel.is_pair() {
        let budget = ctx.budget().get();
        if budget < 2 {
            return Err(Error::Unsupported(format!("gemm: {} needs a budget of at least 2 CTAs", spec.name)));
        }
        ctx.budget().grid(units.saturating_mul(2)) & !1
    } else {
        ctx.budget().grid(units)
    };
    let null: u64 = 0;
    let epilogue_i = epilogue as i32;
    match spec.family {
        Family::Mma { max_stages } => {
            let stage_bytes = (spec.bm + spec.bn) * BK * 2;
            let stages = (workspace.smem_per_block.saturating_sub(MMA_SMEM_EXTRA) / stage_bytes)
                .min(max_stages)
                .min(MMA_MAX_STAGES);
            if stages < 2 {
                return Err(Error::Unsupported(format!(
                    "gemm: {} needs {} bytes of shared memory per block; the device has {}",
                    spec.name,
                    2 * stage_bytes + MMA_SMEM_EXTRA,
                    workspace.smem_per_block
                )));
            }
            let stages_i = stages as i32;
            let smem = (stages * stage_bytes + MMA_SMEM_EXTRA) as u32;
            let (f, cfg) = ctx.kernel(MODULE, spec.name, grid, MMA_THREADS, smem)?;
            let mut launch = ctx.launch(&f);
            launch.arg(a).arg(b);
            push_bias(&mut launch, bias, &null);
            launch.arg(c).arg(&m_i).arg(&n_i).arg(&k_i).arg(&epilogue_i).arg(&stages_i).arg(&mut workspace.counter);
            // SAFETY: the arguments match `NEXUS_GEMM_MMA` in cuda/gemm.cu. A, B, C and the bias
            // hold exactly m·k, n·k, m·c_cols and n values (checked above; c_cols is what the
            // epilogue stores: n, or n / 2 with n a multiple of 16), 16-byte aligned with k and
            // n multiples of 8, and the kernel reads and writes only inside those shapes. The
            // counters are zero (made so, and reset by each launch's last CTA), and the shared
            // memory holds `stages` stages.
            unsafe { launch.launch(cfg) }?;
        }
        Family::Stream { fused } => {
            // More than half of what an SM may give a block, so that two never share an SM.
            let partials = spec.bm * STREAM_PARTIAL_BYTES_PER_ROW;
            let one_per_sm = workspace.smem_per_block / 2 + 1024;
            let smem = partials.max(one_per_sm);
            if smem > workspace.smem_per_block {
                return Err(Error::Unsupported(format!(
                    "gemm: {} needs {smem} bytes of shared memory per block; the device has {}",
                    spec.name, workspace.smem_per_block
                )));
            }
            let name = if matches!(fusion, GemmFusion::None) { spec.name } else { fused };
            let (f, cfg) = ctx.kernel(MODULE, name, grid, STREAM_THREADS, smem as u32)?;
            let mut launch = ctx.launch(&f);
            launch.arg(a).arg(b);
            push_bias(&mut launch, bias, &null);
            launch.arg(c).arg(&m_i).arg(&n_i).arg(&k_i).arg(&epilogue_i);
            let eps = push_fusion(&mut launch, fusion, &null);
            launch.arg(&eps);
            // SAFETY: the arguments match `NEXUS_GEMM_STREAM` in cuda/gemm.cu. A, B, C and the
            // bias hold exactly m·k, n·k, m·c_cols and n values (checked above; c_cols is n, or
            // n / 2 with n a multiple of 16 for the SiLU epilogue), 16-byte aligned with k and n
            // multiples of 8, and the kernel loads 16-byte pieces only inside A's and B's rows and
            // stores only inside [m, c_cols]. The square sums a fusion reads or writes hold m rows
            // of ceil(n / 64) (C's) or ceil(k / 64) (A's) floats (checked above; null pointers
            // otherwise). The shared memory holds the kernel's partial sums (`PARTIAL_BYTES`).
            unsafe { launch.launch(cfg) }?;
        }
        Family::Wgmma { swap, .. } => {
            let stage_bytes = (spec.bm + spec.bn) * BK * 2;
            let consumers = if swap { spec.bn } else { spec.bm } / 64;
            let staging = if swap { 0 } else { consumers * 4 * WGMMA_STAGING_BYTES_PER_WARP };
            let static_bytes = if swap { WGMMA_STATIC_BYTES_SWAPPED } else { WGMMA_STATIC_BYTES_PLAIN };
            let ring = WGMMA_SMEM_BYTES - staging - WGMMA_RING_ALIGN_BYTES - static_bytes;
            let stages = (ring / stage_bytes).min(WGMMA_MAX_STAGES);
            let smem = (stages * stage_bytes + staging + WGMMA_RING_ALIGN_BYTES) as u32;
            let threads = 128 * (1 + consumers as u32);
            let map_a = matrix_map(a_ptr, m, k, spec.bm)?;
            let map_b = match epilogue {
                Epilogue::Store | Epilogue::Accumulate => matrix_map(b_ptr, n, k, spec.bn)?,
                Epilogue::SiluAndMul if swap => gated_map(b_ptr, n, k, spec.bn)?,
                Epilogue::SiluAndMul => halves_map(b_ptr, n, k, spec.bn)?,
            };
            // The fused instantiation only where a fusion runs: it has more code and registers.
            let name = match (&fusion, kernel.fused_name()) {
                (GemmFusion::None, _) | (_, None) => spec.name,
                (_, Some(fused)) => fused,
            };
            let (f, cfg) = ctx.kernel(MODULE, name, grid, threads, smem)?;
            let mut launch = ctx.launch(&f);
            let splits_i = splits as i32;
            launch.arg(&map_a).arg(&map_b);
            push_bias(&mut launch, bias, &null);
            launch.arg(c).arg(&m_i).arg(&n_i).arg(&k_i).arg(&epilogue_i);
            let eps = push_fusion(&mut launch, fusion, &null);
            // The ring of weight requested before the wait for the previous kernel: all of it
            // under a dependent launch (it streams while that kernel drains), none otherwise (see
            // the kernel's producer).
            let early_stages = if ctx.launch_options().dependent_launch { stages as i32 } else { 0 };
            launch.arg(&eps).arg(&splits_i).arg(&early_stages);
            launch.arg(&mut workspace.partials).arg(&mut workspace.tile_arrivals).arg(&mut workspace.counter);
            // SAFETY: the arguments match `NEXUS_GEMM_WGMMA` in cuda/gemm.cu. The tensor maps
            // describe A ([m, k]) and B ([n, k], as the epilogue reads it) exactly, so TMA reads
            // nothing outside them; C and the bias hold m·c_cols and n values (checked above),
            // 16-byte aligned, and the kernel writes only inside [m, c_cols]. The square sums a
            // fusion reads or writes hold m rows of ceil(n / 64) (C's) or ceil(k / 64) (A's)
            // floats (checked above; null pointers otherwise). With a split, every
            // unit has at least one K block, and there are at most as many units (so tiles) as the
            // workspace has room for, each tile at most MAX_SPLIT_TILE: the partials hold a tile
            // for each unit and the arrival counts one per tile (checked above). The counters and
            // arrival counts are zero (made so, and reset by each launch's last CTA and each
            // tile's last unit).
            unsafe { launch.launch(cfg) }?;
        }
    }
    Ok(())
}

/// Pushes the square sums a fusion writes, then those it reads (null where it has none), and
/// returns the row norm's epsilon (0 without one), which the kernels take after them.
fn push_fusion<'a>(launch: &mut Launch<'a>, fusion: GemmFusion<'a, '_>, null: &'a u64) -> f32 {
    match fusion {
        GemmFusion::None => {
            launch.arg(null).arg(null);
            0.0
        }
        GemmFusion::AddToC { square_sums } => {
            launch.arg(square_sums).arg(null);
            0.0
        }
        GemmFusion::RowNorm { square_sums, eps } => {
            launch.arg(null).arg(square_sums);
            eps
        }
    }
}

fn push_bias<'a>(launch: &mut Launch<'a>, bias: Option<&'a CudaView<'_, bf16>>, null: &'a u64) {
    match bias {
        Some(bias) => launch.arg(bias),
        None => launch.arg(null),
    };
}

/// The tensor map of a row-major bf16 matrix `[rows, k]`, read in boxes of 64 of K × `box_rows`
/// rows (the kernels' stage tiles), out-of-range elements filled with zeros.
fn matrix_map(ptr: sys::CUdeviceptr, rows: usize, k: usize, box_rows: usize) -> Result<TensorMap> {
    TensorMap::bf16(ptr, [k as u64, rows as u64], &[(k * 2) as u64], [BK as u32, box_rows as u32])
}

/// The tensor map of a `[gate | up]` weight `[rows, k]` as the non-swapped wgmma kernels read it
/// for the SiLU epilogue: 3-D (64 of K, row, gate or up), in boxes of `box_rows / 2` rows of both
/// halves (the gate rows of a tile, then its up rows; rows past a half are zeros).
fn halves_map(ptr: sys::CUdeviceptr, rows: usize, k: usize, box_rows: usize) -> Result<TensorMap> {
    let (half, k) = ((rows / 2) as u64, k as u64);
    TensorMap::bf16(ptr, [k, half, 2], &[k * 2, half * k * 2], [BK as u32, (box_rows / 2) as u32, 2])
}

/// The tensor map of a `[gate | up]` weight `[rows, k]` as the swapped wgmma kernels read it for
/// the SiLU epilogue: 4-D (64 of K, 8 rows, gate or up, block of 8 rows), in boxes of
/// `box_rows / 16` blocks of both halves, so that a box lands as 8 gate rows, the 8 matching up
/// rows, and so on (`gated_row` in cuda/gemm.cu).
fn gated_map(ptr: sys::CUdeviceptr, rows: usize, k: usize, box_rows: usize) -> Result<TensorMap> {
    let g = GATED_BLOCK as u64;
    let (half, k) = ((rows / 2) as u64, k as u64);
    let boxes = [BK as u32, g as u32, 2, (box_rows / (2 * GATED_BLOCK)) as u32];
    TensorMap::bf16(ptr, [k, g, 2, half / g], &[k * 2, half * k * 2, g * k * 2], boxes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::measured::{h100, h200};

    /// A GPU of the H100's SMs and bandwidth that runs only the portable PTX.
    fn portable() -> DeviceModel {
        DeviceModel::new(PtxTarget::Sm80, 132, h100().bandwidth().clone())
    }

    fn shape(m: usize, n: usize, k: usize) -> GemmShape {
        GemmShape { m, n, k }
    }

    #[test]
    fn large_m_takes_the_largest_hopper_tile() {
        for device in [h100(), h200()] {
            let p = plan_ctas(shape(4096, 6144, 4096), 132, &device);
            assert_eq!(p.kernel, GemmKernel::Wgmma128x256);
            assert_eq!(p.ctas, 132);
        }
    }

    /// Decode-sized choices the H200 benchmark (bench-results/gemm-h200.md, eleventh round: every
    /// kernel at each budget, WgmmaSwap16x256 included) measured at least 1.1x faster than any
    /// other kernel: the four-consumer swapped tile wherever its tiles fill the budget's waves at
    /// M <= 16, the two-consumer one where 256-row tiles would leave CTAs idle, 64-row tiles at
    /// M = 64. Over all 288 rows of that table the unsplit picks reach 0.999 of the row's best
    /// kernel on average, 0.85 at worst (`picks_replayed_on_the_measured_decode_tables`). (m, n, k,
    /// budget, the kernel measured fastest.)
    #[test]
    fn measured_better_decode_choices_on_the_h200() {
        use GemmKernel::*;
        let cases = [
            (1, 6144, 4096, 8, WgmmaSwap16x256),
            (1, 6144, 4096, 32, WgmmaSwap16x256),
            (1, 6144, 4096, 64, WgmmaSwap16x128),
            (16, 6144, 4096, 24, WgmmaSwap16x256),
            (1, 28672, 4096, 16, WgmmaSwap16x256),
            (16, 28672, 4096, 32, WgmmaSwap16x256),
            (1, 4096, 14336, 24, WgmmaSwap16x256),
            (1, 7168, 5120, 64, WgmmaSwap16x128),
            (1, 7168, 5120, 96, WgmmaSwap16x128),
            (1, 5120, 13824, 48, WgmmaSwap16x128),
            (1, 22016, 2048, 32, WgmmaSwap16x256),
            (64, 6144, 4096, 48, Wgmma64x128),
            (64, 4096, 14336, 32, Wgmma64x128),
            (64, 28672, 4096, 16, Wgmma64x256),
            (64, 7168, 5120, 16, Wgmma64x256),
        ];
        // The table times each kernel unsplit: so is the choice checked here, among the kernels
        // it measured (the 16 x 192 and 32 x 256 swapped tiles came later).
        let measured: Vec<GemmKernel> =
            GemmKernel::HOPPER.into_iter().filter(|&k| k != WgmmaSwap16x192 && k != WgmmaSwap32x256).collect();
        assert_unsplit_picks(&measured, &h200(), &cases);
    }

    /// Checks that the unsplit plan among `candidates` on `device` picks the kernel each case
    /// names: (m, n, k, budget, kernel).
    fn assert_unsplit_picks(
        candidates: &[GemmKernel],
        device: &DeviceModel,
        cases: &[(usize, usize, usize, u32, GemmKernel)],
    ) {
        for &(m, n, k, b, want) in cases {
            let p = plan_among(candidates, shape(m, n, k), b, device.bandwidth(), false);
            assert_eq!(p.kernel, want, "m = {m}, {k} x {n}, budget {b}: {p:?}");
        }
    }

    /// Decode-sized choices the H100 benchmark (bench-results/gemm-decode-h100.md: every kernel at
    /// M = 1, 16, 32, 64 on Llama-3.1-8B's projections) measured at least 1.1x faster than any other
    /// kernel in two calls on two machines: the three-consumer swapped tile where its 32 tiles of
    /// the QKV weight (or 22 of the output and down ones) fill the budget's waves, the 32-row
    /// swapped tile for 17 <= M <= 32 on few SMs, and 64-row tiles where a swapped tile would need
    /// two M tiles. Over the first call's 128 rows the unsplit picks reach 0.994 of the row's best
    /// kernel on average, 0.92 at worst.
    #[test]
    fn measured_better_decode_choices_on_the_h100() {
        use GemmKernel::*;
        let cases = [
            (1, 6144, 4096, 16, WgmmaSwap16x192),
            (16, 6144, 4096, 32, WgmmaSwap16x192),
            (16, 4096, 4096, 24, WgmmaSwap16x192),
            (1, 4096, 14336, 24, WgmmaSwap16x192),
            (32, 6144, 4096, 8, WgmmaSwap32x256),
            (32, 4096, 4096, 16, WgmmaSwap32x256),
            (32, 28672, 4096, 16, WgmmaSwap32x256),
            (32, 4096, 14336, 24, WgmmaSwap32x256),
            (32, 6144, 4096, 48, Wgmma64x128),
            (32, 4096, 4096, 32, Wgmma64x128),
            (64, 6144, 4096, 64, Wgmma64x128),
            (64, 4096, 14336, 48, Wgmma64x128),
        ];
        assert_unsplit_picks(&GemmKernel::HOPPER, &h100(), &cases);
    }

    /// One row of a table of `cargo bench --bench gemm` that times every kernel of a set.
    struct TableRow {
        shape: GemmShape,
        budget: u32,
        /// The plan the planner of the run launched and its measured figure, where the table has
        /// them (the decode tables: "planner's pick", "planned TB/s").
        planned: Option<(GemmConfig, f64)>,
        /// Each kernel of the table, unsplit, and its measured figure (TB/s or TFLOP/s: the first
        /// number of its cell).
        measured: Vec<(GemmKernel, f64)>,
    }

    /// The rows of the section of `file` (in bench-results/) under the heading that starts with
    /// `heading`, and the bandwidth curve to replay them on: the table's own streaming-read column,
    /// or `device`'s where the table has none (the compute-bound tables).
    fn read_table(file: &str, heading: &str, device: &DeviceModel) -> (Vec<TableRow>, BandwidthCurve) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../bench-results").join(file);
        let text = std::fs::read_to_string(&path).unwrap();
        let cells =
            |line: &str| line.trim().trim_matches('|').split('|').map(|c| c.trim().to_owned()).collect::<Vec<_>>();
        let mut lines =
            text.lines().skip_while(|l| !l.starts_with(heading)).skip(1).skip_while(|l| !l.starts_with('|'));
        let header = cells(lines.next().unwrap());
        let rows: Vec<_> =
            lines.take_while(|l| l.starts_with('|')).filter(|l| !l.starts_with("| ---")).map(cells).collect();
        let column = |name: &str| header.iter().position(|h| h == name);
        let (m_col, budget_col) = (column("M").unwrap(), column("budget").unwrap());
        let curve = match column("stream read") {
            Some(stream_col) => {
                let mut points: Vec<(u32, f64)> = Vec::new();
                for row in &rows {
                    let budget: u32 = row[budget_col].parse().unwrap();
                    if !points.iter().any(|&(b, _)| b == budget) {
                        points.push((budget, row[stream_col].parse::<f64>().unwrap() * 1e12));
                    }
                }
                points.sort_by_key(|&(b, _)| b);
                // The curve starts at one CTA: unless the table has it, the per-CTA rate of its
                // smallest budget (not one card's figure: the tables come from two).
                let (least, rate) = points[0];
                if least > 1 {
                    points.insert(0, (1, rate / f64::from(least)));
                }
                BandwidthCurve::from_points(&points).unwrap()
            }
            None => device.bandwidth().clone(),
        };
        // "Wgmma64x128 TB/s", "Wgmma128x256 TFLOP/s (waves, last full)".
        let kernels: Vec<(GemmKernel, usize)> = GemmKernel::HOPPER
            .iter()
            .filter_map(|&k| {
                let name = format!("{k:?} ");
                header.iter().position(|h| h.starts_with(&name)).map(|c| (k, c))
            })
            .collect();
        let figure = |cell: &str| cell.split_whitespace().next().unwrap().parse::<f64>().unwrap();
        // "WgmmaSwap16x192 split 4", "Wgmma64x64".
        let config = |cell: &str| {
            let mut words = cell.split_whitespace();
            let name = words.next().unwrap();
            let kernel = GemmKernel::HOPPER.into_iter().find(|k| format!("{k:?}") == name)?;
            let splits = if words.next() == Some("split") { words.next().unwrap().parse().unwrap() } else { 1 };
            Some(GemmConfig { kernel, splits })
        };
        let planned = column("planner's pick").zip(column("planned TB/s"));
        let rows = rows
            .iter()
            .map(|row| {
                // "Llama-3.1-8B QKV (4096 x 6144)": K x N.
                let dims = row[0].rsplit('(').next().unwrap().trim_end_matches(')');
                let (k, n) = dims.split_once(" x ").unwrap();
                TableRow {
                    shape: shape(row[m_col].parse().unwrap(), n.trim().parse().unwrap(), k.trim().parse().unwrap()),
                    budget: row[budget_col].parse().unwrap(),
                    planned: planned.and_then(|(p, t)| Some((config(&row[p])?, figure(&row[t])))),
                    measured: kernels.iter().map(|&(k, c)| (k, figure(&row[c]))).collect(),
                }
            })
            .collect();
        (rows, curve)
    }

    /// The planner's unsplit picks replayed on a table of `cargo bench --bench gemm` that times every
    /// kernel of a set at each shape, M and budget (see [`read_table`]): per row, the measured
    /// figure of the kernel the model picks among the table's kernels, over the row's best kernel.
    /// Returns the mean and the worst over the rows.
    fn replay_table(file: &str, heading: &str, device: &DeviceModel) -> (f64, f64) {
        let (rows, curve) = read_table(file, heading, device);
        let (mut sum, mut worst) = (0.0, f64::INFINITY);
        for row in &rows {
            let candidates: Vec<GemmKernel> = row.measured.iter().map(|&(k, _)| k).collect();
            let picked = plan_among(&candidates, row.shape, row.budget, &curve, false).kernel;
            let best = row.measured.iter().map(|&(_, t)| t).fold(0.0, f64::max);
            let ratio = row.measured.iter().find(|&&(k, _)| k == picked).unwrap().1 / best;
            sum += ratio;
            worst = worst.min(ratio);
        }
        (sum / rows.len() as f64, worst)
    }

    /// The model's split decisions replayed on a decode table (see [`read_table`]): on each row
    /// whose planned launch split K, that launch against the row's best unsplit kernel (of those
    /// whose tile holds M), where the two measured more than 5% apart. The model agrees where it
    /// estimates the split below every such kernel exactly when the split measured faster. Returns
    /// the rows it agrees on and the rows compared.
    fn replay_split_decisions(file: &str, heading: &str, device: &DeviceModel) -> (usize, usize) {
        let (rows, curve) = read_table(file, heading, device);
        let (mut agree, mut compared) = (0, 0);
        for row in &rows {
            let Some((split, planned)) = row.planned.filter(|(c, _)| c.splits > 1) else { continue };
            let unsplit = || row.measured.iter().filter(|&&(k, _)| covers_m(k, row.shape.m));
            let best = unsplit().map(|&(_, t)| t).fold(0.0, f64::max);
            if (planned / best - 1.0).abs() <= 0.05 {
                continue;
            }
            let estimate_of = |config: GemmConfig| {
                estimate(config.kernel, row.shape, row.budget, &curve, config.splits).estimated_seconds
            };
            let fastest_unsplit = unsplit().map(|&(k, _)| estimate_of(k.into())).fold(f64::INFINITY, f64::min);
            compared += 1;
            if (estimate_of(split) < fastest_unsplit) == (planned > best) {
                agree += 1;
            }
        }
        (agree, compared)
    }

    /// The model against whole decode tables (every kernel at M = 1, 16, (32,) 64 and budgets 8-132)
    /// of both cards: the H200's eleventh round (288 rows, without the 16 x 192 and 32 x 256
    /// tiles), and the H100's third call of 2026-12-05 (Llama-3.1-8B and Qwen2.5-14B, 128 rows
    /// each). Where a refit of its constants loses measured ground, this says how much.
    #[test]
    fn picks_replayed_on_the_measured_decode_tables() {
        let tables = [
            ("gemm-h200.md", "### Decode-sized GEMMs, every kernel, final planner", 0.998, 0.85),
            ("gemm-decode-h100.md", "### Third call: Llama-3.1-8B", 0.99, 0.91),
            ("gemm-decode-h100.md", "### Third call: Qwen2.5-14B", 0.99, 0.91),
        ];
        for (file, heading, least_mean, least_worst) in tables {
            let (mean, worst) = replay_table(file, heading, &h200());
            assert!(mean >= least_mean && worst >= least_worst, "{file}, {heading}: mean {mean:.4}, worst {worst:.3}");
        }
    }

    /// Split-K against the best unsplit kernel on the decode tables that time every kernel beside
    /// the planned launch (`replay_split_decisions`: rows more than 5% apart): the H100's of
    /// 2026-12-07 (gemm-h100.md) and of 2026-12-05 (gemm-decode-h100.md, third call: Llama-3.1-8B,
    /// Qwen2.5-14B), the H200's final planner of the eleventh round, of 2026-12-02 and of the
    /// tenth round (gemm-h200.md). With [`UNHIDDEN_OVERLAP`] at 0.5 the model agreed on 22 of 33,
    /// 17 of 25, 6 of 25, 73 of 82, 45 of 60 and 19 of 20: it split where the unsplit tiles
    /// already read near the curve's top (Llama-3.1-8B's QKV and output, Qwen2.5-14B's QKV and
    /// output at 64-132 SMs on the H100), and measured slower there.
    #[test]
    fn split_decisions_replayed_on_the_measured_decode_tables() {
        let tables = [
            ("gemm-h100.md", "### Decode-sized GEMMs, every kernel (TB/s", &h100(), 30, 33),
            ("gemm-decode-h100.md", "### Third call: Llama-3.1-8B", &h100(), 24, 25),
            ("gemm-decode-h100.md", "### Third call: Qwen2.5-14B", &h100(), 21, 25),
            ("gemm-h200.md", "### Decode-sized GEMMs, every kernel, final planner", &h200(), 72, 82),
            ("gemm-h200.md", "## Decode-sized GEMMs, every kernel (TB/s", &h200(), 52, 60),
            ("gemm-h200.md", "### Decode-sized GEMMs, every kernel (TB/s", &h200(), 20, 20),
        ];
        for (file, heading, device, least, rows) in tables {
            let (agree, compared) = replay_split_decisions(file, heading, device);
            assert!(compared == rows && agree >= least, "{file}, {heading}: {agree} of {compared}");
        }
    }

    /// The model against the prefill lane's table (Llama-3.1-8B's projections at M = 2048 and
    /// 8192 on 88-116 SMs, the three wide tiles unsplit; H100, 2026-12-06, 64 rows). With the
    /// earlier constants (L2 at 9 TB/s, the 128 x 128 tile at 0.85 of its math rate) the picks
    /// reached 0.975 of the row's best on average and 0.845 at worst: 128 x 256 tiles in 3 waves
    /// where 5 of 128 x 128 measured 10-18% faster (output, down and QKV at M = 2048, 104-116 SMs).
    /// With the current constants (L2 at 11 TB/s, 0.90): 0.998 and 0.971; the 12 picks that
    /// changed measured 1.05-1.21x faster in a run of both planners (bench-results/gemm-h100.md,
    /// top section).
    #[test]
    fn picks_replayed_on_the_measured_prefill_lane_table() {
        let (mean, worst) = replay_table("gemm-h100.md", "### Prefill-lane GEMMs", &h100());
        assert!(mean >= 0.995 && worst >= 0.97, "mean {mean:.4}, worst {worst:.3}");
    }

    /// Split choices the H200 benchmark (bench-results/gemm-h200.md, eleventh round) measured
    /// both ways, more than 5% apart: the faster plan's estimate must be the lower one (what
    /// fitted [`SPLIT_SYNC_SECONDS`]). (m, n, k, budget, faster, slower, as kernel and split.)
    #[test]
    fn measured_split_choices_on_the_h200() {
        use GemmKernel::*;
        let cases = [
            // 24 tiles on 32 CTAs: one wave of 24 (1.92 TB/s) over three of 96 split units (1.55).
            (1, 6144, 4096, 32, (WgmmaSwap16x256, 1), (WgmmaSwap16x256, 4)),
            // 16 tiles on 24 CTAs: two waves of split units (1.98) over 16 CTAs streaming (1.65).
            (1, 4096, 14336, 24, (WgmmaSwap16x256, 3), (WgmmaSwap16x256, 1)),
            // 20 tiles on 16 CTAs: 60 split units (1.40) over 1.25 waves of tiles (1.12).
            (1, 5120, 13824, 16, (WgmmaSwap16x256, 3), (WgmmaSwap16x256, 1)),
            // 96 one-wave tiles (2.31) over 48 tiles split in two (2.11).
            (64, 6144, 4096, 132, (Wgmma64x64, 1), (Wgmma64x128, 2)),
            // Split on the two-consumer tile (3.53) over the four-consumer one in three (3.24).
            (1, 28672, 4096, 96, (WgmmaSwap16x128, 1), (WgmmaSwap16x256, 3)),
            // Llama-3.1-8B's QKV, where 96 tiles of 64 rows nearly fill the curve: unsplit over
            // the split the planner of the eleventh round took (2.41 TB/s over 2.28)...
            (1, 6144, 4096, 96, (WgmmaSwap16x64, 1), (WgmmaSwap16x256, 3)),
            // ... and the one of 2026-12-02 took (decode table of that day: M = 1 on 96 and 132
            // SMs 2.69 and 2.68 over 2.43, M = 16 2.75 and 2.73 over 2.41 and 2.42).
            (1, 6144, 4096, 96, (WgmmaSwap16x64, 1), (WgmmaSwap16x128, 2)),
            (1, 6144, 4096, 132, (WgmmaSwap16x64, 1), (WgmmaSwap16x128, 2)),
            (16, 6144, 4096, 96, (WgmmaSwap16x64, 1), (WgmmaSwap16x128, 2)),
            (16, 6144, 4096, 132, (WgmmaSwap16x64, 1), (WgmmaSwap16x128, 2)),
            // But on all SMs the three-consumer tile split in four beats 48 CTAs of the
            // two-consumer one (eighteenth session's table: 2.50 TB/s on 132 SMs, 2.34 on 48,
            // the same unsplit launch as on 132).
            (1, 6144, 4096, 132, (WgmmaSwap16x192, 4), (WgmmaSwap16x128, 1)),
        ];
        assert_split_choices(&h200(), &cases);
    }

    /// Checks that the faster plan of each case has the lower estimate on `device`: (m, n, k,
    /// budget, faster, slower, as kernel and split).
    fn assert_split_choices(device: &DeviceModel, cases: &[SplitChoice]) {
        for &(m, n, k, b, (fast, fast_splits), (slow, slow_splits)) in cases {
            let s = shape(m, n, k);
            let faster = estimate(fast, s, b, device.bandwidth(), fast_splits);
            let slower = estimate(slow, s, b, device.bandwidth(), slow_splits);
            assert!(faster.estimated_seconds < slower.estimated_seconds, "{faster:?} vs {slower:?}");
        }
    }

    type SplitChoice = (usize, usize, usize, u32, (GemmKernel, usize), (GemmKernel, usize));

    /// Split choices the H100 measured more than 5% apart in one run, each plan against the best
    /// unsplit kernel of its row: the faster plan's estimate must be the lower one.
    #[test]
    fn measured_split_choices_on_the_h100() {
        use GemmKernel::*;
        let cases = [
            // Llama-3.1-8B's QKV (bench-results/gemm-h100.md, decode table of 2026-12-07): 48
            // unsplit tiles of 128 rows (2.13 TB/s at 96 SMs, 2.11 at 132; M = 16: 2.10 at 132)
            // over the planned splits (1.89, 1.96; 1.96), and 96 of 64 rows (2.07, 2.05) too.
            (1, 6144, 4096, 96, (WgmmaSwap16x128, 1), (WgmmaSwap16x256, 4)),
            (1, 6144, 4096, 132, (WgmmaSwap16x128, 1), (WgmmaSwap16x192, 4)),
            (16, 6144, 4096, 132, (WgmmaSwap16x128, 1), (WgmmaSwap16x192, 4)),
            (1, 6144, 4096, 96, (WgmmaSwap16x64, 1), (WgmmaSwap16x256, 4)),
            (1, 6144, 4096, 132, (WgmmaSwap16x64, 1), (WgmmaSwap16x192, 4)),
            // Its down projection on 24 SMs: 32 tiles of 192 rows (1.91) over 16 of 256 split in
            // three (1.82), and its output projection at M = 64 on 96 SMs: 64 tiles (1.68) over
            // 32 of 128 rows split in three (1.51), also in the third call of 2026-12-05
            // (gemm-decode-h100.md: 1.62 over 1.47).
            (1, 4096, 14336, 24, (WgmmaSwap16x192, 1), (WgmmaSwap16x256, 3)),
            (64, 4096, 4096, 96, (Wgmma64x64, 1), (Wgmma64x128, 3)),
            // Qwen2.5-14B's QKV and output at M = 1 on 96 SMs (third call): 2.34 over 2.12, 2.10
            // over 1.91. Split still wins where the unsplit tiles cannot fill the budget: the
            // down projections on 64-132 SMs (Llama-3.1-8B at M = 1 on 96: 2.47 over 2.26).
            (1, 7168, 5120, 96, (WgmmaSwap16x128, 1), (WgmmaSwap16x256, 3)),
            (1, 5120, 5120, 96, (WgmmaSwap16x64, 1), (WgmmaSwap16x256, 4)),
            (1, 4096, 14336, 96, (WgmmaSwap16x256, 4), (WgmmaSwap16x64, 1)),
        ];
        assert_split_choices(&h100(), &cases);
    }

    /// Llama-3.1-8B's gate/up projection at M = 1 and all 132 SMs, batch invariant: Wgmma64x256
    /// (one wave on 112 CTAs) measured 62-64 us, Wgmma64x128 (two waves on 132) 72-75 us. The pick
    /// must not follow a step of a few percent in the curve between 112 and 132 CTAs, as this
    /// GPU's own streaming read shows (4.10 TB/s at 96, 4.21 at 132) while the reference curve
    /// does not.
    #[test]
    fn batch_invariant_gate_up_keeps_one_wave_whatever_the_curve_near_saturation() {
        let stepped =
            [(1, 0.11e12), (8, 1.0e12), (16, 1.84e12), (32, 3.08e12), (64, 4.09e12), (96, 4.10e12), (132, 4.21e12)];
        let stepped = DeviceModel::new(PtxTarget::Sm90a, 132, BandwidthCurve::from_points(&stepped).unwrap());
        for device in [h200(), stepped] {
            let p = plan_batch_invariant_ctas(shape(1, 28672, 4096), 132, &device);
            assert_eq!((p.kernel, p.waves), (GemmKernel::Wgmma64x256, 1), "{p:?}");
        }
    }

    /// Choices the H100 benchmark (bench-results/gemm-h100.md) showed the earlier constants got
    /// wrong: (m, n, k, budget, the kernel measured faster). The first two, measured on
    /// 2026-12-06 with the planner of either constants in one call (two runs each): 128 x 128
    /// tiles 874 / 932 us where 128 x 256 took 949 / 978, and 64 x 128 tiles on 128 CTAs 61.4 /
    /// 61.1 us where 128 x 128 on 64 took 72.7 / 72.7 (an older run had put these two the other
    /// way round).
    #[test]
    fn measured_better_choices() {
        let cases = [
            (4096, 4096, 14336, 96, GemmKernel::Wgmma128x128),
            (256, 4096, 14336, 132, GemmKernel::Wgmma64x128),
            (256, 4096, 14336, 48, GemmKernel::Wgmma128x256),
            (1024, 4096, 14336, 48, GemmKernel::Wgmma128x256),
            (4096, 6144, 4096, 132, GemmKernel::Wgmma128x256),
            (8192, 4096, 14336, 48, GemmKernel::Wgmma128x256),
        ];
        for (m, n, k, b, want) in cases {
            let p = plan_ctas(shape(m, n, k), b, &h100());
            assert_eq!(p.kernel, want, "{m} x {n} x {k} budget {b}: {p:?}");
        }
    }

    #[test]
    fn plans_use_the_budget_and_only_target_kernels() {
        for device in [h100(), h200(), portable()] {
            for m in [1, 16, 64, 256, 1024, 4096, 8192] {
                for (n, k) in [(6144, 4096), (28672, 4096), (4096, 14336), (8, 8)] {
                    for b in [1, 8, 16, 32, 48, 64, 96, 132] {
                        let s = shape(m, n, k);
                        let p = plan_ctas(s, b, &device);
                        let units = p.tiles * p.splits;
                        assert!(p.ctas <= b && p.ctas as usize <= units);
                        assert_eq!(p.waves, units.div_ceil(p.ctas as usize));
                        assert!(p.estimated_seconds > 0.0);
                        let family: &[GemmKernel] = match device.target() {
                            PtxTarget::Sm90a => &GemmKernel::HOPPER,
                            PtxTarget::Sm80 => &GemmKernel::PORTABLE,
                        };
                        assert!(family.contains(&p.kernel), "{p:?}");
                    }
                }
            }
        }
    }

    /// The decode-sized GEMM of Llama-3-8B's gate/up projection (M = 1, 4096 x 28672) streams its
    /// weight: its estimate is at least its DRAM time at the bandwidth the curve gives its CTAs,
    /// so the H200 plan is faster than the H100 one where the H200 reads faster (from 24 SMs on)
    /// and slower where it reads slower (up to 16: one SM reads 110 GB/s there, 125 on the H100).
    /// A compute-bound GEMM (M = 8192) gets the same plan on both (same SMs, same clock), and
    /// estimates that differ by the unhidden share of the difference of their DRAM times alone.
    #[test]
    fn estimates_follow_the_bandwidth_curve() {
        let (h100, h200) = (h100(), h200());
        let s = shape(1, 28672, 4096);
        let bytes = (2 * (s.m * s.k + s.n * s.k + s.m * s.n)) as f64;
        for b in [1, 8, 16, 24, 32, 64, 96, 132] {
            let (p100, p200) = (plan_ctas(s, b, &h100), plan_ctas(s, b, &h200));
            for (p, device) in [(p100, &h100), (p200, &h200)] {
                let memory = bytes / device.bandwidth().at(p.ctas);
                assert!(p.estimated_seconds >= memory * (1.0 - 1e-9), "budget {b}: {p:?} beats its DRAM time {memory}");
            }
            // From 24 SMs on, where the H200 reads faster, its plan is faster (the weight
            // stream sets this shape's time); below, the H100's SMs each read more.
            if b >= 24 {
                assert!(p200.estimated_seconds < p100.estimated_seconds, "budget {b}: {p200:?} vs {p100:?}");
            } else {
                assert!(p200.estimated_seconds > p100.estimated_seconds, "budget {b}: {p200:?} vs {p100:?}");
            }
        }
        for (n, k) in [(6144, 4096), (28672, 4096), (4096, 14336)] {
            let big = shape(8192, n, k);
            let (p100, p200) = (plan_ctas(big, 132, &h100), plan_ctas(big, 132, &h200));
            assert_eq!(p100.config(), p200.config(), "{n} x {k}");
            let units = p100.tiles * p100.splits;
            let dram = |d: &DeviceModel| dram_seconds(big, units, p100.ctas, d.bandwidth());
            let unhidden = UNHIDDEN_OVERLAP * (dram(&h100) - dram(&h200));
            let difference = p100.estimated_seconds - p200.estimated_seconds;
            assert!(
                unhidden > 0.0 && (difference - unhidden).abs() < 1e-9 * p200.estimated_seconds,
                "{n} x {k}: {p100:?} vs {p200:?}"
            );
        }
    }

    /// Over the benchmark's shapes and budgets, on both cards' curves, every plan is a Hopper
    /// kernel within its budget and tile count, its waves are the tiles it leaves per CTA, and its
    /// time is finite and no less than reading its operands at the bandwidth of its CTAs.
    #[test]
    fn picks_over_the_benchmark_grid_are_consistent() {
        for device in [h100(), h200()] {
            for (k, n) in [(4096, 6144), (4096, 28672), (14336, 4096)] {
                for m in [1, 16, 64, 256, 1024, 4096, 8192] {
                    for b in [8, 16, 32, 48, 64, 96, 132] {
                        let s = shape(m, n, k);
                        let p = plan_ctas(s, b, &device);
                        assert!(GemmKernel::HOPPER.contains(&p.kernel), "{p:?}");
                        let units = p.tiles * p.splits;
                        assert!(p.ctas as usize <= units && p.ctas <= b && p.ctas > 0, "{p:?}");
                        assert_eq!(p.waves, units.div_ceil(p.ctas as usize), "{p:?}");
                        let floor = s.bf16_bytes() as f64 / device.bandwidth().at(p.ctas);
                        assert!(p.estimated_seconds.is_finite() && p.estimated_seconds >= floor * 0.999, "{p:?}");
                    }
                }
            }
        }
    }

    /// The decode GEMMs whose N has fewer tiles than the SMs (Llama-3.1-8B's down and output
    /// projections: N = 4096) split K so that every CTA streams, within the workspace's room;
    /// shapes whose tiles fill the budget, and batch-invariant plans, never split.
    #[test]
    fn split_k_only_where_tiles_leave_ctas_idle() {
        for device in [h100(), h200()] {
            for m in [1, 16, 64] {
                for k in [4096, 14336] {
                    let s = shape(m, 4096, k);
                    let p = plan_ctas(s, 132, &device);
                    assert!(p.splits > 1 && p.ctas > 64, "m = {m}, k = {k}: {p:?}");
                    let unsplit = estimate(p.kernel, s, 132, device.bandwidth(), 1);
                    assert!(p.estimated_seconds < unsplit.estimated_seconds, "{p:?} vs {unsplit:?}");
                    let (bm, bn) = p.kernel.tile();
                    let room = MAX_UNITS_PER_SM * 132;
                    assert!(p.tiles * p.splits <= room && p.splits <= MAX_SPLITS && bm * bn <= MAX_SPLIT_TILE, "{p:?}");
                    let invariant = plan_batch_invariant_ctas(s, 132, &device);
                    assert_eq!(invariant.splits, 1, "{invariant:?}");
                }
            }
            for (m, n, k) in [(4096, 6144, 4096), (1024, 4096, 14336), (1, 28672, 4096), (64, 28672, 4096)] {
                let p = plan_ctas(shape(m, n, k), 132, &device);
                assert_eq!(p.splits, 1, "{m} x {n} x {k}: {p:?}");
            }
            // One K block cannot be split; nor can tiles that already fill the budget.
            assert_eq!(plan_ctas(shape(64, 4096, 64), 132, &device).splits, 1);
            assert_eq!(plan_ctas(shape(64, 4096, 14336), 32, &device).splits, 1);
        }
        for kernel in GemmKernel::HOPPER {
            for (m, n, k, budget) in [(1, 4096, 64, 132), (64, 4096, 128, 132), (16, 576, 4096, 8), (1, 8, 8, 1)] {
                let s = shape(m, n, k);
                for splits in split_candidates(kernel, s, budget) {
                    let (bm, bn) = kernel.tile();
                    assert!(splits <= k.div_ceil(BK) && splits <= MAX_SPLITS, "{kernel:?} {s:?}: {splits}");
                    let room = MAX_UNITS_PER_SM * budget as usize;
                    assert!(splits == 1 || (kernel.tiles(s) * splits <= room && bm * bn <= MAX_SPLIT_TILE));
                }
            }
        }
    }

    #[test]
    fn tiles_round_up() {
        assert_eq!(GemmKernel::Wgmma128x256.tiles(shape(129, 257, 64)), 4);
        assert_eq!(GemmKernel::WgmmaSwap16x64.tiles(shape(1, 8, 8)), 1);
    }

    #[test]
    fn pairs_make_units_of_two_m_tiles_and_are_not_planned() {
        // 3 M tiles of 128 rows make 2 pairs (the second half past M), times 2 N tiles.
        let s = shape(257, 512, 64);
        assert_eq!(GemmKernel::WgmmaPair128x256.tiles(s), 6);
        assert_eq!(GemmKernel::WgmmaPair128x256.units(s), 4);
        assert_eq!(GemmKernel::Wgmma128x256.units(s), 6);
        for kernel in GemmKernel::PAIRS {
            assert!(kernel.is_pair() && kernel.needs_sm90a() && kernel.fuses_norms() && !kernel.splits_k());
            assert!(!GemmKernel::HOPPER.contains(&kernel));
        }
        assert!(GemmKernel::HOPPER.iter().chain(&GemmKernel::PORTABLE).all(|k| !k.is_pair()));
    }
}
