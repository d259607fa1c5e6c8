//! `CUtensorMap`s of bf16 tensors in global memory, which the Hopper kernels' TMA copies read
//! boxes of (`TensorMap` in `cuda/common.cuh`). Encoded on the host and passed to a kernel by value
//! (a `__grid_constant__` parameter), so a launch needs no device allocation for them.

use std::ffi::c_void;

use cudarc::driver::DeviceRepr;
use cudarc::driver::sys;

use crate::Result;

/// A tiled tensor map of a bf16 tensor: its dims (innermost first, elements), the byte strides of
/// every dim but the innermost, and the box a copy moves, with TMA's 128-byte swizzle (so a box's
/// innermost extent is at most 64 elements) and zeros for elements outside the tensor.
#[derive(Clone, Copy)]
#[repr(transparent)]
pub(crate) struct TensorMap(sys::CUtensorMap);

// SAFETY: a CUtensorMap is plain bytes that a kernel receives by value (128 bytes, as the
// `TensorMap` parameters in cuda/).
unsafe impl DeviceRepr for TensorMap {}

impl TensorMap {
    /// A map that no kernel may read: the parameter value for a kernel built without TMA (sm_80).
    pub(crate) fn unused() -> Self {
        TensorMap(sys::CUtensorMap { opaque: [0; 16] })
    }

    /// The map of the bf16 tensor at `ptr` with `dims` (innermost first) and byte `strides` of
    /// dims 1.. (`strides.len() == dims.len() - 1`), read in boxes of `boxes` elements.
    /// The driver checks the rest (alignment, ranges) and its refusal is returned as an error.
    pub(crate) fn bf16<const N: usize>(
        ptr: sys::CUdeviceptr,
        dims: [u64; N],
        strides: &[u64],
        boxes: [u32; N],
    ) -> Result<Self> {
        assert_eq!(strides.len() + 1, N, "a tensor map has one stride per dim but the first");
        let mut map = sys::CUtensorMap { opaque: [0; 16] };
        let element_strides = [1u32; N];
        // SAFETY: the call only encodes `map` on the host; every array it reads lives on this
        // stack frame and has the length the rank N implies (strides: N - 1, checked above).
        unsafe {
            sys::cuTensorMapEncodeTiled(
                &mut map,
                sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                N as u32,
                ptr as *mut c_void,
                dims.as_ptr(),
                strides.as_ptr(),
                boxes.as_ptr(),
                element_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
        }
        .result()?;
        Ok(TensorMap(map))
    }
}
