//! CTA budgets and the phase context a launch runs in.

use std::num::NonZeroU32;
use std::sync::Arc;

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaFunction, CudaGraph, CudaStream, LaunchConfig};

use super::Gpu;
use super::launch::{Launch, LaunchOptions};
use crate::{Error, Result};

/// The most CTAs a launch may use. Every kernel is persistent and sized for one resident CTA
/// per SM, so a budget of `n` occupies at most `n` SMs: two launches on two streams whose budgets
/// add up to at most the SM count run side by side on disjoint SMs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CtaBudget(NonZeroU32);

impl CtaBudget {
    /// A budget of `ctas`, which must be between 1 and the device's SM count.
    pub fn new(ctas: u32, gpu: &Gpu) -> Result<Self> {
        match NonZeroU32::new(ctas) {
            Some(n) if ctas <= gpu.sm_count() => Ok(CtaBudget(n)),
            _ => Err(Error::Unsupported(format!("CTA budget {ctas} is not between 1 and the {} SMs", gpu.sm_count()))),
        }
    }

    /// Every SM of the device.
    pub fn all(gpu: &Gpu) -> Self {
        CtaBudget(NonZeroU32::new(gpu.sm_count()).unwrap_or(NonZeroU32::MIN))
    }

    /// The number of CTAs.
    pub fn get(self) -> u32 {
        self.0.get()
    }

    /// The grid of a launch with `work_items` independent items: never more CTAs than the budget
    /// or than there is work, and at least one.
    pub(crate) fn grid(self, work_items: usize) -> u32 {
        (work_items.min(self.get() as usize) as u32).max(1)
    }
}

/// Where a phase's launches go: a device, a stream, a CTA budget and how kernels are launched
/// ([`LaunchOptions`]). The scheduler hands one to each phase's forward pass, and every launch
/// inside it uses it.
#[derive(Clone, Debug)]
pub struct PhaseContext {
    gpu: Arc<Gpu>,
    stream: Arc<CudaStream>,
    budget: CtaBudget,
    launch_options: LaunchOptions,
}

impl PhaseContext {
    /// A context launching on `stream` with at most `budget` CTAs per kernel, with the default
    /// [`LaunchOptions`].
    pub fn new(gpu: Arc<Gpu>, stream: Arc<CudaStream>, budget: CtaBudget) -> Self {
        PhaseContext { gpu, stream, budget, launch_options: LaunchOptions::default() }
    }

    /// The same stream and launch options with another budget.
    pub fn with_budget(&self, budget: CtaBudget) -> Self {
        PhaseContext { budget, ..self.clone() }
    }

    /// The same stream and budget, launching with `options` (see
    /// [`LaunchOptions::dependent_launch`] for when to turn on dependent launches).
    pub fn with_launch_options(&self, options: LaunchOptions) -> Self {
        PhaseContext { launch_options: options, ..self.clone() }
    }

    /// The device.
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The stream launches go to.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The CTA budget of each launch.
    pub fn budget(&self) -> CtaBudget {
        self.budget
    }

    /// How kernels are launched.
    pub fn launch_options(&self) -> LaunchOptions {
        self.launch_options
    }

    /// Records what `launches` puts on this context's stream into a CUDA graph instead of running
    /// it, and returns the graph (launch it with [`CudaGraph::launch`]) with `launches`' result.
    ///
    /// Inside, only kernel launches, device-to-device copies and stream-ordered allocations and
    /// frees of this stream are allowed: buffers allocated and dropped inside become the graph's
    /// own memory, buffers from outside are used at the addresses they had. The stream is
    /// synchronized first, and cudarc's per-buffer events are off during the capture (they would
    /// be captured too), so no other thread may use this device's buffers meanwhile.
    pub fn capture<T, E: From<Error>>(
        &self,
        launches: impl FnOnce() -> std::result::Result<T, E>,
    ) -> std::result::Result<(CudaGraph, T), E> {
        let context = self.gpu.context();
        self.stream.synchronize().map_err(Error::from)?;
        let tracking = context.is_event_tracking();
        // SAFETY: the stream is idle and, as documented, no other thread uses the device's
        // buffers during the capture, so no buffer needs the events cudarc would record.
        unsafe { context.disable_event_tracking() };
        let captured = self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(Error::from)
            .map(|()| {
                let value = launches();
                // The capture must end even when `launches` failed.
                (value, self.stream.end_capture(CUgraphInstantiate_flags(0)))
            });
        if tracking {
            // SAFETY: as above; the capture is over.
            unsafe { context.enable_event_tracking() };
        }
        let (value, graph) = captured?;
        let value = value?;
        let graph =
            graph.map_err(Error::from)?.ok_or_else(|| Error::Unsupported("the captured graph is empty".into()))?;
        Ok((graph, value))
    }

    /// The function and launch configuration of a persistent kernel: `grid` CTAs (already
    /// bounded by the budget) of `threads` threads, with at least `smem` bytes of dynamic shared
    /// memory and never less than [`Gpu::exclusive_smem`], so that each CTA has its SM alone.
    pub(crate) fn kernel(
        &self,
        module: &'static str,
        name: &'static str,
        grid: u32,
        threads: u32,
        smem: u32,
    ) -> Result<(CudaFunction, LaunchConfig)> {
        debug_assert!(grid <= self.budget.get());
        let f = self.gpu.function(module, name)?;
        let cfg = LaunchConfig {
            grid_dim: (grid, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: smem.max(self.gpu.exclusive_smem()),
        };
        Ok((f, cfg))
    }

    /// A launch of `f` (from [`PhaseContext::kernel`]) on this context's stream, with its launch
    /// options.
    pub(crate) fn launch<'a>(&'a self, f: &'a CudaFunction) -> Launch<'a> {
        Launch::new(&self.stream, f, self.launch_options, self.gpu.target())
    }
}
