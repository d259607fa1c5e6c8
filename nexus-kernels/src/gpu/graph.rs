//! What a captured CUDA graph holds: a census of its nodes and edges, to check that a recording
//! keeps the dependent launches of its kernels (a memory or copy node between two kernels gives
//! the second an ordinary edge, which waits for the first to finish before it starts).

use cudarc::driver::sys::CUgraphNodeType::*;
use cudarc::driver::{CudaGraph, sys};

use crate::Result;

/// The nodes of a graph by type, and its edges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphCensus {
    pub kernels: usize,
    /// Memory copies and sets.
    pub copies: usize,
    /// Stream-ordered allocations and frees recorded as nodes.
    pub memory: usize,
    /// Nodes of any other type.
    pub other: usize,
    pub edges: usize,
    /// Edges that let their kernel start while the kernel before it drains.
    pub programmatic_edges: usize,
}

impl GraphCensus {
    /// Counts the nodes and edges of `graph` (as captured, before instantiation).
    pub fn of(graph: &CudaGraph) -> Result<Self> {
        let handle = graph.cu_graph();
        let mut census = GraphCensus::default();
        let mut count = 0usize;
        // SAFETY: null arrays ask for the count only; the graph lives as long as `graph`.
        unsafe { sys::cuGraphGetNodes(handle, std::ptr::null_mut(), &mut count) }.result()?;
        let mut nodes = vec![std::ptr::null_mut(); count];
        // SAFETY: `nodes` has room for `count` handles.
        unsafe { sys::cuGraphGetNodes(handle, nodes.as_mut_ptr(), &mut count) }.result()?;
        for &node in &nodes[..count] {
            let mut kind = CU_GRAPH_NODE_TYPE_EMPTY;
            // SAFETY: `node` is a node of the live graph.
            unsafe { sys::cuGraphNodeGetType(node, &mut kind) }.result()?;
            match kind {
                CU_GRAPH_NODE_TYPE_KERNEL => census.kernels += 1,
                CU_GRAPH_NODE_TYPE_MEMCPY | CU_GRAPH_NODE_TYPE_MEMSET => census.copies += 1,
                CU_GRAPH_NODE_TYPE_MEM_ALLOC | CU_GRAPH_NODE_TYPE_MEM_FREE => census.memory += 1,
                _ => census.other += 1,
            }
        }
        let mut count = 0usize;
        // SAFETY: as above.
        unsafe {
            sys::cuGraphGetEdges_v2(
                handle,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                &mut count,
            )
        }
        .result()?;
        let mut from: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); count];
        let mut to: Vec<sys::CUgraphNode> = vec![std::ptr::null_mut(); count];
        // SAFETY: CUgraphEdgeData is plain bytes, for which zeros are a valid value.
        let mut data = vec![unsafe { std::mem::zeroed::<sys::CUgraphEdgeData>() }; count];
        // SAFETY: the three arrays have room for `count` entries each.
        unsafe { sys::cuGraphGetEdges_v2(handle, from.as_mut_ptr(), to.as_mut_ptr(), data.as_mut_ptr(), &mut count) }
            .result()?;
        census.edges = count;
        let programmatic = sys::CUgraphDependencyType::CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC as u8;
        census.programmatic_edges = data[..count].iter().filter(|e| e.type_ == programmatic).count();
        Ok(census)
    }
}
