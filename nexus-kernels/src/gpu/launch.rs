//! Kernel launches: through cudarc's launch builder, or, when the phase context asks for
//! programmatic dependent launch ([`LaunchOptions::dependent_launch`]), through the driver's
//! `cuLaunchKernelEx` with the programmatic stream serialization attribute, which cudarc's builder
//! cannot set.

use std::ffi::c_void;

use cudarc::driver::sys;
use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig,
    PushKernelArg,
};

use super::PtxTarget;
use crate::Result;
use crate::tensor_map::TensorMap;

/// How a phase context launches its kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LaunchOptions {
    /// Programmatic dependent launch (PDL): each kernel is launched with CUDA's programmatic
    /// stream serialization, so that its CTAs may start, and set up, while the previous kernel of
    /// the stream drains, instead of after that kernel has finished. A kernel launched this way
    /// waits on the device (`griddepcontrol.wait`) for the previous kernel to finish before it
    /// touches memory that kernel writes; every kernel of this crate does, so the results are
    /// the same, only the gaps between kernels shrink. One read comes before the wait on
    /// purpose: the Hopper GEMM starts streaming its B operand (the weight) while the previous
    /// kernel drains, so a dependently launched GEMM's B must not be written by the kernels
    /// before it in the stream (weights never are).
    ///
    /// It is ignored, and kernels are launched as usual, unless the device runs the sm_90a
    /// kernels (a Hopper GPU, not opened with [`PtxTarget::Sm80`]: the portable build has no
    /// wait to make it safe), and while cudarc's event tracking is on (see
    /// [`CudaContext::is_event_tracking`](cudarc::driver::CudaContext::is_event_tracking)):
    /// the launch then goes through cudarc's builder, which records its per-buffer events.
    ///
    /// Use it only on a context that has the GPU to itself (the CUDA backend of nexus-runtime:
    /// while a phase has every SM): a kernel launched early has its CTAs placed on whatever SMs
    /// are idle at that moment, which may be SMs another lane's budget counts on, and keeps them
    /// for its whole run, so lanes would no longer run on disjoint SMs.
    pub dependent_launch: bool,
}

impl LaunchOptions {
    /// Whether a launch goes through `cuLaunchKernelEx` with programmatic stream serialization,
    /// on a device running `target` with cudarc's event tracking on or off.
    fn is_dependent(self, target: PtxTarget, event_tracking: bool) -> bool {
        self.dependent_launch && target == PtxTarget::Sm90a && !event_tracking
    }
}

/// A kernel launch being put together: [`PhaseContext::launch`](super::PhaseContext::launch)
/// makes one, [`Launch::arg`] adds the kernel's parameters in order and [`Launch::launch`]
/// enqueues it.
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    stream: &'a CudaStream,
    function: &'a CudaFunction,
    params: Params<'a>,
}

#[derive(Debug)]
enum Params<'a> {
    /// cudarc's builder, which makes the launch wait for, and record, the events of its buffers
    /// when event tracking is on.
    Tracked(LaunchArgs<'a>),
    /// The parameters of a dependent launch, in order. The array of pointers the driver reads
    /// is made from them only at the launch, when none can move any more.
    Dependent(Vec<Param>),
}

/// A parameter of a dependent launch.
#[derive(Debug)]
enum Param {
    /// A buffer's device address, which the kernel receives by value.
    Address(sys::CUdeviceptr),
    /// A value (scalar or tensor map) that the caller lends for the life of the [`Launch`].
    Value(*const c_void),
}

impl Param {
    /// The pointer to the parameter's bytes that `cuLaunchKernelEx` reads.
    fn pointer(&self) -> *mut c_void {
        match self {
            Param::Address(address) => std::ptr::from_ref(address).cast_mut().cast(),
            Param::Value(value) => value.cast_mut(),
        }
    }
}

impl<'a> Launch<'a> {
    /// A launch of `function` on `stream`, through `cuLaunchKernelEx` with programmatic stream
    /// serialization when `options` ask for it and it applies (see [`LaunchOptions`]).
    pub(super) fn new(
        stream: &'a CudaStream,
        function: &'a CudaFunction,
        options: LaunchOptions,
        target: PtxTarget,
    ) -> Self {
        let params = if options.is_dependent(target, stream.context().is_event_tracking()) {
            Params::Dependent(Vec::new())
        } else {
            Params::Tracked(stream.launch_builder(function))
        };
        Launch { stream, function, params }
    }

    /// Adds the kernel's next parameter.
    pub(crate) fn arg(&mut self, arg: impl KernelArg<'a>) -> &mut Self {
        arg.push(self);
        self
    }

    /// Enqueues the kernel on the stream.
    ///
    /// # Safety
    ///
    /// As cudarc's [`LaunchArgs::launch`]: the parameters must be those of the kernel, in order
    /// and of its types, and the kernel must access only memory inside the buffers passed (and
    /// write only those it may). Launched dependently, it must also wait for the previous kernel
    /// of the stream before it touches memory that kernel writes, as every kernel of this crate
    /// does.
    pub(crate) unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<()> {
        let params = match &mut self.params {
            Params::Tracked(args) => {
                // SAFETY: the caller's, as documented above.
                unsafe { args.launch(cfg) }?;
                return Ok(());
            }
            Params::Dependent(params) => params,
        };
        self.stream.context().bind_to_thread()?;
        let mut pointers: Vec<*mut c_void> = params.iter().map(Param::pointer).collect();
        let mut value = sys::CUlaunchAttributeValue { pad: [0; 64] };
        value.programmaticStreamSerializationAllowed = 1;
        let mut attribute = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
            pad: [0; 4],
            value,
        };
        let config = sys::CUlaunchConfig {
            gridDimX: cfg.grid_dim.0,
            gridDimY: cfg.grid_dim.1,
            gridDimZ: cfg.grid_dim.2,
            blockDimX: cfg.block_dim.0,
            blockDimY: cfg.block_dim.1,
            blockDimZ: cfg.block_dim.2,
            sharedMemBytes: cfg.shared_mem_bytes,
            hStream: self.stream.cu_stream(),
            attrs: &mut attribute,
            numAttrs: 1,
        };
        // SAFETY: `config`, its one attribute and `pointers` live until the call returns, and the
        // driver copies the parameters before it does. Each pointer points either into `params`,
        // which is not touched during the call, or to a value the caller lent for `'a`. The rest
        // is the caller's, as documented above.
        unsafe {
            sys::cuLaunchKernelEx(&config, self.function.cu_function(), pointers.as_mut_ptr(), std::ptr::null_mut())
        }
        .result()?;
        Ok(())
    }
}

/// Something a kernel takes as a parameter: a buffer (the kernel receives its device address) or
/// a scalar or tensor map (received by value).
pub(crate) trait KernelArg<'a> {
    /// Adds this argument to `launch`'s parameters.
    fn push(self, launch: &mut Launch<'a>);
}

/// Buffers: cudarc's builder takes them as they are (to wait for and record their events);
/// a dependent launch takes their address. That launch only happens with event tracking off, so
/// getting the address waits for nothing, and the guard it comes with records nothing.
macro_rules! buffer_args {
    ($([$($generics:tt)*] $buffer:ty => $address:ident),* $(,)?) => {$(
        impl<'a, $($generics)*> KernelArg<'a> for $buffer {
            fn push(self, launch: &mut Launch<'a>) {
                match &mut launch.params {
                    Params::Tracked(args) => {
                        args.arg(self);
                    }
                    Params::Dependent(params) => params.push(Param::Address(self.$address(launch.stream).0)),
                }
            }
        }
    )*};
}

buffer_args!(
    ['b: 'a, T] &'b CudaSlice<T> => device_ptr,
    ['b: 'a, T] &'b mut CudaSlice<T> => device_ptr_mut,
    ['b: 'a, 'c: 'b, T] &'b CudaView<'c, T> => device_ptr,
    ['b: 'a, 'c: 'b, T] &'b mut CudaViewMut<'c, T> => device_ptr_mut,
);

/// Values passed by value. They are listed rather than covered by a blanket impl over
/// [`DeviceRepr`](cudarc::driver::DeviceRepr), which would overlap the buffers' impls.
macro_rules! value_args {
    ($($value:ty),* $(,)?) => {$(
        impl<'a, 'b: 'a> KernelArg<'a> for &'b $value {
            fn push(self, launch: &mut Launch<'a>) {
                match &mut launch.params {
                    Params::Tracked(args) => {
                        args.arg(self);
                    }
                    Params::Dependent(params) => params.push(Param::Value(std::ptr::from_ref(self).cast())),
                }
            }
        }
    )*};
}

value_args!(i32, u32, f32, u64, TensorMap);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependent_launch_is_off_by_default() {
        assert!(!LaunchOptions::default().dependent_launch);
        assert!(!LaunchOptions::default().is_dependent(PtxTarget::Sm90a, false));
    }

    #[test]
    fn dependent_launch_needs_the_hopper_build_and_no_event_tracking() {
        let on = LaunchOptions { dependent_launch: true };
        assert!(on.is_dependent(PtxTarget::Sm90a, false));
        assert!(!on.is_dependent(PtxTarget::Sm80, false));
        assert!(!on.is_dependent(PtxTarget::Sm90a, true));
    }
}
