//! `CUtensorMap`s of bf16 tensors in global memory, which the Hopper kernels' TMA copies read
//! boxes of (`TensorMap` in `cuda/common.cuh`). Encoded on the host and passed to a kernel by value
//! (a `__grid_constant__` parameter), so a launch needs no device allocation for them.

use std::ffi::c_void;
use std::sync::Mutex;

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

/// The tensor maps of the K and V pools a plan ran on, by pool addresses, encoded on first use:
/// one plan serves every layer, and encoding two maps per launch costs more host time than the
/// launch.
pub(crate) struct PoolMapCache {
    cache: PagedKvLayout,
    box_rows: usize,
    box_panels: usize,
    maps: Mutex<Vec<PoolMaps>>,
}

/// The tensor maps of one layer's K and V pools.
#[derive(Clone, Copy)]
struct PoolMaps {
    k_ptr: u64,
    v_ptr: u64,
    k: TensorMap,
    v: TensorMap,
}

/// The most pool pairs a cache keeps the maps of (more than any model's layers; past it the cache
/// starts over).
const MAX_POOL_MAPS: usize = 512;

impl PoolMapCache {
    /// An empty cache of maps of pools laid out as `cache`, in boxes as [`pool_map`]'s.
    pub(crate) fn new(cache: PagedKvLayout, box_rows: usize, box_panels: usize) -> Self {
        PoolMapCache { cache, box_rows, box_panels, maps: Mutex::new(Vec::new()) }
    }

    /// The maps of the pools at `k_ptr` and `v_ptr`.
    pub(crate) fn get(&self, k_ptr: u64, v_ptr: u64) -> Result<(TensorMap, TensorMap)> {
        let mut maps = self.maps.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(m) = maps.iter().find(|m| m.k_ptr == k_ptr && m.v_ptr == v_ptr) {
            return Ok((m.k, m.v));
        }
        let map = |ptr| pool_map(ptr, self.cache, self.box_rows, self.box_panels);
        let m = PoolMaps { k_ptr, v_ptr, k: map(k_ptr)?, v: map(v_ptr)? };
        if maps.len() == MAX_POOL_MAPS {
            maps.clear();
        }
        maps.push(m);
        Ok((m.k, m.v))
    }
}
