//! Copies the cudarc safe API has no call for.

use cudarc::driver::sys::{self, CUmemorytype};
use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
};

use crate::error::ensure_shape;
use crate::{Error, Result};

/// Copies the host matrix `src: [rows, cols]` into the first `cols` columns of the first `rows`
/// rows of the device matrix `dst: [_, dst_cols]`, in one copy on `stream` (the other columns
/// keep their values). This is how a block table of this step's width goes into a table of a
/// recorded graph's width without sending the unused columns.
pub fn copy_rows_htod<T: DeviceRepr>(
    stream: &CudaStream,
    src: &[T],
    cols: usize,
    dst: &mut CudaSlice<T>,
    dst_cols: usize,
) -> Result<()> {
    ensure_shape!(cols > 0 && cols <= dst_cols, "copy_rows_htod: {cols} columns into {dst_cols}");
    ensure_shape!(src.len().is_multiple_of(cols), "copy_rows_htod: {} values are not rows of {cols}", src.len());
    let rows = src.len() / cols;
    ensure_shape!(
        rows * dst_cols <= dst.len(),
        "copy_rows_htod: {rows} rows of {dst_cols} do not fit in {} values",
        dst.len()
    );
    if rows == 0 {
        return Ok(());
    }
    let size = size_of::<T>();
    stream.context().bind_to_thread()?;
    let (dst_ptr, _record) = dst.device_ptr_mut(stream);
    let copy = sys::CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: CUmemorytype::CU_MEMORYTYPE_HOST,
        srcHost: src.as_ptr().cast(),
        srcDevice: 0,
        srcArray: std::ptr::null_mut(),
        srcPitch: cols * size,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: CUmemorytype::CU_MEMORYTYPE_DEVICE,
        dstHost: std::ptr::null_mut(),
        dstDevice: dst_ptr,
        dstArray: std::ptr::null_mut(),
        dstPitch: dst_cols * size,
        WidthInBytes: cols * size,
        Height: rows,
    };
    // SAFETY: the source is `rows × cols` values of host memory borrowed for the call (the copy
    // from pageable memory is staged before the call returns); the destination rectangle, rows of
    // `cols` values at a pitch of `dst_cols`, lies inside `dst` (checked above).
    unsafe { sys::cuMemcpy2DAsync_v2(&copy, stream.cu_stream()) }.result().map_err(Error::from)
}

/// Starts copying `src` into the first `src.len()` values of the page-locked `dst` on `stream`,
/// without waiting for it: the caller orders its reads after the copy (with an event recorded
/// after it). cudarc's copies to page-locked memory copy the whole destination, which holds more
/// than one step's values here.
pub fn copy_to_pinned<T: DeviceRepr + ValidAsZeroBits>(
    stream: &CudaStream,
    src: &CudaView<'_, T>,
    dst: &mut PinnedHostSlice<T>,
) -> Result<()> {
    ensure_shape!(src.len() <= dst.len(), "copy_to_pinned: {} values into {}", src.len(), dst.len());
    if src.is_empty() {
        return Ok(());
    }
    // Waits for cudarc's own copies into `dst`, if any, and gives its address.
    let host = dst.as_mut_ptr()?;
    stream.context().bind_to_thread()?;
    let (src_ptr, _record) = src.device_ptr(stream);
    // SAFETY: `dst` is page-locked and holds at least `src.len()` values (checked above), `src`
    // is that many values of device memory; the copy is ordered on `stream` after the work that
    // writes `src`.
    unsafe { sys::cuMemcpyDtoHAsync_v2(host.cast(), src_ptr, src.len() * size_of::<T>(), stream.cu_stream()) }
        .result()
        .map_err(Error::from)
}
