//! Activations of recorded decode steps, placed by the host in one buffer of the phase.
//!
//! A stream-ordered allocation made during a capture becomes a memory node of the graph, between
//! the kernel before it and the kernel that writes the new buffer, so that kernel's edge comes
//! from the node, not from the kernel before it, and a dependent launch has nothing to overlap.
//! So the activations of a decode step that is recorded come from an [`Arena`]: byte ranges of
//! one device buffer, handed out and taken back on the host as the forward pass makes and drops
//! its matrices, in the order of the stream (every kernel waits for the one before it before it
//! writes, so a range taken back may be handed out again at once, as the stream-ordered
//! allocator does).
//!
//! The eager run of a step, just before its recording, hands out the same ranges in the same
//! order (the same forward pass over the same buffers) and so measures how large the buffer must
//! be; what does not fit yet is allocated on the stream as usual, and the buffer grows before
//! the recording. A buffer that grew away stays alive with the graphs recorded over it.

use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex};

use nexus_kernels::bf16;
use nexus_kernels::cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use super::{kernel_error, lock};
use crate::{Error, Result};

/// Ranges are handed out in multiples of this many bytes (the alignment the kernels' vector
/// loads and tensor maps need, and cudaMalloc's).
const ALIGN: usize = 256;

/// First-fit placement of byte ranges in a buffer that may grow: the free ranges below the
/// highest range in use, sorted and merged.
#[derive(Debug, Default)]
struct Placement {
    free: Vec<(usize, usize)>,
    /// The end of the highest range in use.
    top: usize,
    /// The highest `top` since the last [`Placement::reset_peak`].
    peak: usize,
}

impl Placement {
    /// The offset of a new range of `len` bytes (a multiple of [`ALIGN`]): the first free range
    /// it fits, else on top.
    fn take(&mut self, len: usize) -> usize {
        if let Some(i) = self.free.iter().position(|&(_, free)| free >= len) {
            let (offset, free) = self.free[i];
            if free == len {
                self.free.remove(i);
            } else {
                self.free[i] = (offset + len, free - len);
            }
            return offset;
        }
        let offset = self.top;
        self.top += len;
        self.peak = self.peak.max(self.top);
        offset
    }

    /// Takes back the range at `offset` of `len` bytes.
    fn give_back(&mut self, offset: usize, len: usize) {
        let i = self.free.partition_point(|&(o, _)| o < offset);
        self.free.insert(i, (offset, len));
        // Merge with the next range, then with the previous one.
        if i + 1 < self.free.len() && offset + len == self.free[i + 1].0 {
            self.free[i].1 += self.free.remove(i + 1).1;
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == offset {
            self.free[i - 1].1 += self.free.remove(i).1;
        }
        if let Some(&(o, l)) = self.free.last()
            && o + l == self.top
        {
            self.top = o;
            self.free.pop();
        }
    }

    fn is_empty(&self) -> bool {
        self.top == 0
    }
}

#[derive(Debug, Default)]
struct State {
    placement: Placement,
    /// The buffer ranges are placed in, once a forward pass measured one.
    memory: Option<Arc<CudaSlice<u8>>>,
    /// Whether [`Arena::matrix_data`] hands out ranges (during the forward passes of a step
    /// being recorded, and of the eager run before it).
    open: bool,
}

/// The activation buffer of one phase (see the module documentation).
#[derive(Debug, Default)]
pub(super) struct Arena {
    state: Arc<Mutex<State>>,
}

/// A range of the arena held by a matrix.
#[derive(Debug)]
pub(super) struct Lease {
    state: Arc<Mutex<State>>,
    offset: usize,
    len: usize,
    /// The matrix's slice points into the arena's buffer (and must not be freed), rather than
    /// being allocated on the stream because the buffer was too small.
    in_buffer: bool,
}

/// A matrix's device memory: allocated on the stream, or a range of its phase's arena.
#[derive(Debug)]
pub(super) struct MatrixData {
    slice: ManuallyDrop<CudaSlice<bf16>>,
    lease: Option<Lease>,
}

impl MatrixData {
    /// Device memory of the stream's pool.
    pub(super) fn owned(slice: CudaSlice<bf16>) -> Self {
        MatrixData { slice: ManuallyDrop::new(slice), lease: None }
    }
}

impl Deref for MatrixData {
    type Target = CudaSlice<bf16>;

    fn deref(&self) -> &CudaSlice<bf16> {
        &self.slice
    }
}

impl DerefMut for MatrixData {
    fn deref_mut(&mut self) -> &mut CudaSlice<bf16> {
        &mut self.slice
    }
}

impl Drop for MatrixData {
    fn drop(&mut self) {
        // SAFETY: `slice` is not used again.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        match self.lease.take() {
            Some(lease) => {
                if lease.in_buffer {
                    // The arena's buffer owns the memory.
                    slice.leak();
                } else {
                    drop(slice);
                }
                lock(&lease.state).placement.give_back(lease.offset, lease.len);
            }
            None => drop(slice),
        }
    }
}

/// Opens an [`Arena`] for the forward passes of one recording; closes it when dropped.
#[derive(Debug)]
pub(super) struct OpenArena<'a>(&'a Arena);

impl Drop for OpenArena<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).open = false;
    }
}

impl Arena {
    /// Hands out ranges to [`Arena::matrix_data`] until the returned guard drops. Every range of
    /// an earlier opening must have been given back, so that the same forward pass gets the same
    /// ranges.
    pub(super) fn open(&self) -> Result<OpenArena<'_>> {
        let mut state = lock(&self.state);
        if !state.placement.is_empty() {
            return Err(Error::invalid("a recording began while activations of the last one were alive"));
        }
        state.placement.peak = 0;
        state.open = true;
        Ok(OpenArena(self))
    }

    /// Makes the buffer hold what the forward passes since the last [`Arena::open`] used at
    /// most, and returns it (for the graphs recorded over it to keep alive).
    pub(super) fn fit(&self, stream: &Arc<CudaStream>) -> Result<Arc<CudaSlice<u8>>> {
        let mut state = lock(&self.state);
        let peak = state.placement.peak.max(ALIGN);
        match &state.memory {
            Some(memory) if memory.len() >= peak => Ok(memory.clone()),
            _ => {
                let memory = Arc::new(stream.alloc_zeros::<u8>(peak).map_err(kernel_error)?);
                state.memory = Some(memory.clone());
                Ok(memory)
            }
        }
    }

    /// Memory for `len` bf16 values: a range of the buffer while the arena is open (allocated on
    /// `stream` while the buffer is too small), `None` while it is closed.
    pub(super) fn matrix_data(&self, stream: &Arc<CudaStream>, len: usize) -> Result<Option<MatrixData>> {
        let mut state = lock(&self.state);
        if !state.open {
            return Ok(None);
        }
        let bytes = (len * size_of::<bf16>()).max(1).next_multiple_of(ALIGN);
        let offset = state.placement.take(bytes);
        let lease = |in_buffer| Lease { state: self.state.clone(), offset, len: bytes, in_buffer };
        let slice = match &state.memory {
            Some(memory) if offset + bytes <= memory.len() => {
                let (base, _) = memory.device_ptr(stream);
                // SAFETY: the range lies inside the buffer, which outlives the matrix (the phase
                // holds it, and so does every graph recorded over it), and no other live matrix
                // holds any of it. The slice is leaked, never freed, when the matrix drops.
                let slice = unsafe { stream.upgrade_device_ptr::<bf16>(base + offset as u64, len) };
                return Ok(Some(MatrixData { slice: ManuallyDrop::new(slice), lease: Some(lease(true)) }));
            }
            // SAFETY: any bit pattern is a valid bf16, and no value is read before a kernel or a
            // copy writes it.
            _ => unsafe { stream.alloc::<bf16>(len) }.map_err(kernel_error)?,
        };
        Ok(Some(MatrixData { slice: ManuallyDrop::new(slice), lease: Some(lease(false)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_reuses_and_merges_ranges() {
        let mut p = Placement::default();
        let a = p.take(256);
        let b = p.take(512);
        let c = p.take(256);
        assert_eq!((a, b, c, p.top), (0, 256, 768, 1024));
        p.give_back(b, 512);
        // A smaller range fits the hole, at its start.
        assert_eq!(p.take(256), 256);
        p.give_back(256, 256);
        p.give_back(a, 256);
        assert_eq!(p.free, vec![(0, 768)], "the hole merged with its neighbour");
        p.give_back(c, 256);
        assert!(p.is_empty() && p.free.is_empty(), "{p:?}");
        assert_eq!(p.peak, 1024);
    }

    #[test]
    fn the_same_sequence_gets_the_same_ranges() {
        // A forward pass's pattern: a residual kept across layers, temporaries made and dropped.
        let run = |p: &mut Placement| {
            let mut offsets = Vec::new();
            let mut x = (p.take(1024), 1024);
            for layer in 0..4 {
                let t = p.take(256 * (layer + 1));
                let y = p.take(1024);
                offsets.extend([t, y]);
                p.give_back(t, 256 * (layer + 1));
                p.give_back(x.0, x.1);
                x = (y, 1024);
            }
            p.give_back(x.0, x.1);
            offsets
        };
        let mut p = Placement::default();
        let first = run(&mut p);
        assert!(p.is_empty());
        assert_eq!(run(&mut p), first);
        assert!(p.peak < 1024 * 3 + 256 * 4, "ranges were reused: peak {}", p.peak);
    }
}
