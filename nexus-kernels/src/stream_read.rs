//! The streaming read of `cuda/stream_read.cu`: every CTA of the budget, one per SM, reads its
//! share of a buffer with 16-byte loads kept several deep per thread and writes the XOR of the
//! words it read. At [`ReadDepth::Kernel`] (64 KB in flight per SM) it is how
//! [`Gpu::new`](crate::Gpu::new) measures the read bandwidth of each budget the planners predict our
//! kernels with ([`BandwidthCurve`](crate::gpu::BandwidthCurve)); at [`ReadDepth::Limit`] (192 KB)
//! it is the ceiling the benchmarks compare kernels with. The reference is
//! [`crate::reference::stream_read`].

use cudarc::driver::{CudaView, CudaViewMut, DevicePtr};

use crate::Result;
use crate::error::ensure_shape;
use crate::gpu::PhaseContext;

const MODULE: &str = "stream_read";
/// Threads per CTA (`THREADS` in the source).
const THREADS: u32 = 1024;
/// Words per 16-byte load: `data` must hold whole ones, starting on a 16-byte boundary.
const VEC_WORDS: usize = 4;
const ALIGN_BYTES: u64 = 16;

/// How many bytes each SM keeps in flight, which sets what a budget of few SMs reads: by Little's
/// law, bytes in flight over the loaded latency (~0.7 us) until HBM saturates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadDepth {
    /// 64 KB per SM (4 loads a thread), which on few SMs reads about what our streaming kernels
    /// reach: the planners' curve, which must predict them, not the hardware.
    Kernel,
    /// 192 KB per SM (12 loads a thread): what the SMs can read at all. On an H100 it read 1.4x
    /// as much as `Kernel` on 16 SMs and saturated HBM from 24 (`scripts/probe-stream-depth.py`).
    Limit,
}

/// Reads all of `data` on exactly the context's budget of CTAs and writes to `checksums[c]` the XOR
/// of the words CTA `c` read, as [`crate::reference::stream_read`] describes: `checksums` holds one
/// word per CTA of the budget; `data` holds whole 16-byte vectors (a multiple of 4 words) and starts
/// on a 16-byte boundary. Every CTA of the budget runs, even when `data` has fewer 16 KB chunks
/// than that (the idle ones write 0), so that a launch occupies exactly the budget's SMs.
pub fn stream_read(
    ctx: &PhaseContext,
    data: &CudaView<'_, u32>,
    checksums: &mut CudaViewMut<'_, u32>,
    depth: ReadDepth,
) -> Result<()> {
    ensure_shape!(
        data.len().is_multiple_of(VEC_WORDS),
        "stream_read: {} words are not whole 16-byte vectors",
        data.len()
    );
    let ctas = ctx.budget().get();
    ensure_shape!(
        checksums.len() == ctas as usize,
        "stream_read: {} checksums for a budget of {ctas} CTAs",
        checksums.len()
    );
    let stream = ctx.stream();
    ensure_shape!(
        data.device_ptr(stream).0 % ALIGN_BYTES == 0,
        "stream_read: data must start on a {ALIGN_BYTES}-byte boundary"
    );
    let vectors = (data.len() / VEC_WORDS) as u64;
    let name = match depth {
        ReadDepth::Kernel => "stream_read",
        ReadDepth::Limit => "stream_read_deep",
    };
    let (f, cfg) = ctx.kernel(MODULE, name, ctas, THREADS, 0)?;
    let mut launch = ctx.launch(&f);
    launch.arg(data).arg(&vectors).arg(checksums);
    // SAFETY: the arguments match `stream_read` and `stream_read_deep` in cuda/stream_read.cu. The
    // kernel reads the `vectors` 16-byte vectors of `data` (whole and aligned, checked above) and
    // writes `checksums[blockIdx.x]` for each of the grid's `ctas` CTAs, which `checksums` holds.
    unsafe { launch.launch(cfg) }?;
    Ok(())
}
