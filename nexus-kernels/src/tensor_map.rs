//! `CUtensorMap`s of bf16 tensors in global memory, which the Hopper kernels' TMA copies read
//! boxes of (`TensorMap` in `cuda/common.cuh`). Encoded on the host and passed to a kernel by value
//! (a `__grid_constant__` parameter), so a launch needs no device allocation for them.
//!
//! A map is a function of its parameters alone (address, dims, strides, box), and the driver's
//! encoding took about 6 us on the GPU machine, more than a small launch: encoded maps are kept
//! by their parameters, so launches on the same buffers (every layer's weights and pools, the
//! activation arena) encode them once.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{LazyLock, Mutex};

use cudarc::driver::DeviceRepr;
use cudarc::driver::sys;

use crate::Result;
use crate::layout::PagedKvLayout;

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
        let key = MapKey::new(ptr, &dims, strides, &boxes);
        let mut maps = ENCODED.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(map) = maps.get(&key) {
            return Ok(*map);
        }
        let map = Self::encode(ptr, dims, strides, boxes)?;
        if maps.len() == MAX_ENCODED {
            maps.clear();
        }
        maps.insert(key, map);
        Ok(map)
    }

    fn encode<const N: usize>(ptr: sys::CUdeviceptr, dims: [u64; N], strides: &[u64], boxes: [u32; N]) -> Result<Self> {
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

/// Dims of a paged pool that one panel of a box covers: 64 bf16, one 128-byte swizzled row.
pub(crate) const PANEL_DIMS: usize = 64;

/// The tensor map of a K or V pool `[num_blocks, block_size, num_kv_heads, head_dim]` at `ptr`, as
/// the Hopper attention kernels read it: 4-D (64 dims, token row of the pool, panel of 64 dims, KV
/// head; the panels' stride below the rows', so that a box of several panels lands as panels of
/// rows), in boxes of `box_rows` rows of `box_panels` panels of one KV head.
pub(crate) fn pool_map(
    ptr: sys::CUdeviceptr,
    cache: PagedKvLayout,
    box_rows: usize,
    box_panels: usize,
) -> Result<TensorMap> {
    let (d, h) = (cache.head_dim as u64, cache.num_kv_heads as u64);
    let rows = (cache.num_blocks * cache.block_size) as u64;
    let panels = d / PANEL_DIMS as u64;
    let boxes = [PANEL_DIMS as u32, box_rows as u32, box_panels as u32, 1];
    TensorMap::bf16(ptr, [PANEL_DIMS as u64, rows, panels, h], &[h * d * 2, PANEL_DIMS as u64 * 2, d * 2], boxes)
}

/// The parameters of a map (ranks up to 5, as the driver's), by which encoded maps are kept.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct MapKey {
    ptr: sys::CUdeviceptr,
    rank: usize,
    dims: [u64; 5],
    strides: [u64; 4],
    boxes: [u32; 5],
}

impl MapKey {
    fn new(ptr: sys::CUdeviceptr, dims: &[u64], strides: &[u64], boxes: &[u32]) -> Self {
        let mut key = MapKey { ptr, rank: dims.len(), dims: [0; 5], strides: [0; 4], boxes: [0; 5] };
        key.dims[..dims.len()].copy_from_slice(dims);
        key.strides[..strides.len()].copy_from_slice(strides);
        key.boxes[..boxes.len()].copy_from_slice(boxes);
        key
    }
}

/// Encoded maps by their parameters; started over when full (more than the buffers of any model's
/// steps: weights, pools and the activations of a few batch sizes).
static ENCODED: LazyLock<Mutex<HashMap<MapKey, TensorMap>>> = LazyLock::new(|| Mutex::new(HashMap::new()));
const MAX_ENCODED: usize = 4096;
