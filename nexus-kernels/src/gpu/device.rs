//! Opening a device and loading the kernels' PTX into it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use cudarc::nvrtc::Ptx;

use super::model::{self, BandwidthCurve, DeviceModel};
use super::ptx;
use crate::{Error, Result};

/// Which PTX build a device runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PtxTarget {
    /// `compute_90a`: Hopper-only instructions (wgmma, TMA, setmaxnreg) allowed.
    Sm90a,
    /// `compute_80`: runs on every GPU from Ampere on.
    Sm80,
}

/// A GPU with the kernels loaded.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    target: PtxTarget,
    sm_count: u32,
    compute_capability: (i32, i32),
    exclusive_smem: u32,
    max_smem_per_block: u32,
    model: DeviceModel,
    modules: HashMap<&'static str, Arc<CudaModule>>,
    /// Functions already looked up, with their shared-memory limit raised.
    functions: Mutex<HashMap<(&'static str, &'static str), CudaFunction>>,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu")
            .field("ordinal", &self.ctx.ordinal())
            .field("compute_capability", &self.compute_capability)
            .field("sm_count", &self.sm_count)
            .field("target", &self.target)
            .finish()
    }
}

impl Gpu {
    /// Opens device `ordinal`, loads every kernel module built for it and measures its read
    /// bandwidth for [`Gpu::model`] (about 25 ms on an H100 or H200, with 256 MiB of device memory
    /// borrowed meanwhile). Fails with [`Error::NoGpu`] when there is no driver or device, or the
    /// device is older than sm_80.
    pub fn new(ordinal: usize) -> Result<Arc<Self>> {
        Self::open(ordinal, None)
    }

    /// [`Gpu::new`] with the kernels of `target` instead of the newest build the device runs:
    /// [`PtxTarget::Sm80`] on a Hopper runs the portable code paths (which is how the GPU tests
    /// check them there). A target the device cannot run is refused with [`Error::Unsupported`].
    pub fn with_target(ordinal: usize, target: PtxTarget) -> Result<Arc<Self>> {
        Self::open(ordinal, Some(target))
    }

    fn open(ordinal: usize, forced: Option<PtxTarget>) -> Result<Arc<Self>> {
        // SAFETY: this only tries to open the driver library; it calls nothing in it.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(Error::NoGpu("the CUDA driver library (libcuda.so) was not found".into()));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| Error::NoGpu(format!("cannot open device {ordinal}: {e}")))?;
        let compute_capability = ctx.compute_capability()?;
        let best = match compute_capability {
            (9, 0) => PtxTarget::Sm90a,
            (major, _) if major >= 8 => PtxTarget::Sm80,
            (major, minor) => {
                return Err(Error::NoGpu(format!(
                    "device {ordinal} is sm_{major}{minor}; the kernels need sm_80 (Ampere) or newer"
                )));
            }
        };
        let target = match forced {
            Some(PtxTarget::Sm90a) if best != PtxTarget::Sm90a => {
                let (major, minor) = compute_capability;
                return Err(Error::Unsupported(format!(
                    "device {ordinal} is sm_{major}{minor}; the sm_90a kernels run on sm_90 only"
                )));
            }
            Some(target) => target,
            None => best,
        };
        let attribute = |a| -> Result<u32> { Ok(ctx.attribute(a)? as u32) };
        let sm_count = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let smem_per_sm = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?;
        let max_smem_per_block = attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        // A CTA holding more than half of an SM's shared memory is alone on its SM.
        let exclusive_smem = smem_per_sm / 2 + 1;
        if exclusive_smem > max_smem_per_block {
            return Err(Error::NoGpu(format!(
                "device {ordinal} lets a CTA take {max_smem_per_block} of its SMs' {smem_per_sm} bytes of shared memory: \
                 too little to keep one CTA per SM"
            )));
        }
        keep_freed_memory(&ctx)?;
        let mut modules = HashMap::new();
        for module in ptx::modules(target) {
            let image = match module.cubin {
                Some(cubin) => Ptx::from_binary(cubin.to_vec()),
                None => Ptx::from_src(module.ptx),
            };
            modules.insert(module.name, ctx.load_module(image)?);
        }
        // The measurement launches through phase contexts, which hold the `Gpu`: open it with a
        // one-point curve first, then put the measured one in its place.
        let unmeasured = BandwidthCurve::from_points(&[(1, 1.0)])?;
        let mut gpu = Arc::new(Gpu {
            ctx,
            target,
            sm_count,
            compute_capability,
            exclusive_smem,
            max_smem_per_block,
            model: DeviceModel::new(target, sm_count, unmeasured),
            modules,
            functions: Mutex::new(HashMap::new()),
        });
        // Every kernel is loaded now: the driver loads a kernel lazily on its first launch, and
        // that load can serialize with whatever the other phase runs at the time.
        for module in ptx::modules(target) {
            for name in ptx::entries(module.ptx) {
                gpu.function(module.name, name)?;
            }
        }
        let bandwidth = model::measure_bandwidth(&gpu)?;
        // The measurement's contexts are gone, so nothing else holds the `Gpu` yet.
        let only = Arc::get_mut(&mut gpu)
            .ok_or_else(|| Error::Unsupported("the device was shared while its bandwidth was measured".into()))?;
        only.model = DeviceModel::new(target, sm_count, bandwidth);
        Ok(gpu)
    }

    /// The driver context.
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A new stream on this device.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        Ok(self.ctx.new_stream()?)
    }

    /// The number of streaming multiprocessors: the largest CTA budget.
    pub fn sm_count(&self) -> u32 {
        self.sm_count
    }

    /// The PTX build this device runs.
    pub fn target(&self) -> PtxTarget {
        self.target
    }

    /// What the planners know of the device: its PTX build, SM count and the read bandwidth of
    /// each CTA budget, measured by [`Gpu::new`] with [`crate::stream_read`] at the depth of our
    /// kernels ([`crate::stream_read::ReadDepth::Kernel`]).
    pub fn model(&self) -> &DeviceModel {
        &self.model
    }

    /// `(major, minor)` compute capability.
    pub fn compute_capability(&self) -> (i32, i32) {
        self.compute_capability
    }

    /// Dynamic shared memory a launch reserves so that its CTAs are alone on their SMs.
    pub fn exclusive_smem(&self) -> u32 {
        self.exclusive_smem
    }

    /// The kernel `name` of module `module`, allowed the largest dynamic shared memory a CTA
    /// can have.
    pub(crate) fn function(&self, module: &'static str, name: &'static str) -> Result<CudaFunction> {
        let mut functions = self.functions.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(f) = functions.get(&(module, name)) {
            return Ok(f.clone());
        }
        let m = self
            .modules
            .get(module)
            .ok_or_else(|| Error::Unsupported(format!("no kernel module `{module}` for {:?}", self.target)))?;
        let f = m.load_function(name)?;
        // Static and dynamic shared memory together may not exceed the per-block limit.
        let static_smem = f.shared_size_bytes()?.max(0) as u32;
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            self.max_smem_per_block.saturating_sub(static_smem) as i32,
        )?;
        functions.insert((module, name), f.clone());
        Ok(f)
    }
}

/// One CTA of a kernel built with `-DNEXUS_TIMELINE` (`scripts/timeline-build.sh`; "Step
/// timeline" in `cuda/common.cuh`): its wait for the previous kernel, or its end.
#[derive(Clone, Copy, Debug)]
pub struct TimelineRecord {
    /// The module of the kernel.
    pub module: &'static str,
    /// Whether this records the CTA's end (`until` is then its time) rather than its wait.
    pub exit: bool,
    /// `%globaltimer` ns before and after the wait.
    pub from: u64,
    pub until: u64,
    pub sm: u32,
    pub block: u32,
    pub grid: u32,
}

impl Gpu {
    /// The [`TimelineRecord`]s of the kernels that ran since the last call, per module and kind in
    /// the order they were made, and the counts reset; empty for kernels built without the
    /// timeline (the committed PTX). Synchronizes `stream`, so call it when the step has finished.
    pub fn take_timeline(&self, stream: &Arc<CudaStream>) -> Result<Vec<TimelineRecord>> {
        let mut out = Vec::new();
        for (&module, m) in &self.modules {
            for (records, count, words) in [
                ("nexus_timeline", "nexus_timeline_count", 3),
                ("nexus_timeline_exits", "nexus_timeline_exit_count", 2),
            ] {
                let Ok(mut counter) = m.get_global(count, stream) else { continue };
                let mut n = [0u8; 4];
                stream.memcpy_dtoh(&counter, &mut n)?;
                stream.synchronize()?;
                stream.memcpy_htod(&[0u8; 4], &mut counter)?;
                let view = m.get_global(records, stream)?;
                let size = 8 * words;
                let n = (u32::from_le_bytes(n) as usize).min(view.len() / size);
                let mut bytes = vec![0u8; n * size];
                if n > 0 {
                    stream.memcpy_dtoh(&view.slice(..n * size), &mut bytes)?;
                }
                stream.synchronize()?;
                out.extend(bytes.chunks_exact(size).map(|r| TimelineRecord::from_words(module, r)));
            }
        }
        Ok(out)
    }
}

impl TimelineRecord {
    /// A record as the kernels write it: little-endian u64 words, {from, until, ids} for a wait
    /// and {time, ids} for an end, ids = `sm | block << 16 | grid << 40`.
    fn from_words(module: &'static str, record: &[u8]) -> Self {
        let words = record.len() / 8;
        let word = |i: usize| u64::from_le_bytes(record[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
        let ids = word(words - 1);
        TimelineRecord {
            module,
            exit: words == 2,
            from: word(0),
            until: word(words - 2),
            sm: (ids & 0xffff) as u32,
            block: ((ids >> 16) & 0xff_ffff) as u32,
            grid: (ids >> 40) as u32,
        }
    }
}

/// Makes the device's default memory pool, which every stream-ordered allocation (activations)
/// comes from, keep the memory freed into it: by default it returns it to the system at each
/// synchronization, and the allocations of the next step then map it again.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::sys;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut threshold = u64::MAX;
    // SAFETY: `pool` receives the device's default pool, which lives as long as the device; the
    // release threshold attribute takes a pointer to a u64.
    unsafe {
        sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()).result()?;
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .result()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_records_are_read_as_the_kernels_write_them() {
        let ids = 131u64 | (5 << 16) | (132 << 40);
        let wait: Vec<u8> = [1_000u64, 2_500, ids].iter().flat_map(|w| w.to_le_bytes()).collect();
        let r = TimelineRecord::from_words("gemm", &wait);
        assert!(!r.exit);
        assert_eq!((r.from, r.until, r.sm, r.block, r.grid), (1_000, 2_500, 131, 5, 132));
        let end: Vec<u8> = [9_000u64, ids].iter().flat_map(|w| w.to_le_bytes()).collect();
        let r = TimelineRecord::from_words("gemm", &end);
        assert!(r.exit);
        assert_eq!((r.from, r.until, r.sm, r.block, r.grid), (9_000, 9_000, 131, 5, 132));
    }
}
