//! Dependent launches (programmatic dependent launch, Hopper): a kernel started while the
//! previous one drains must still read what that one wrote. A chain of layers (RMSNorm, then a
//! GEMM of the normalized rows), every kernel reading its predecessor's output from a buffer
//! poisoned with NaN beforehand, runs eagerly and replayed from a CUDA graph; each layer is
//! compared with the reference applied to the GPU's own input of that layer, so a read that came
//! too early (NaN, or a partly written tile) fails at the layer where it happened.

use cudarc::driver::CudaSlice;
use half::bf16;
use nexus::kernels::gemm::{self, GemmShape, GemmWorkspace};
use nexus::kernels::{CtaBudget, Gpu, GraphCensus, LaunchOptions, PhaseContext, elementwise, reference};

use crate::common::*;

const HIDDEN: usize = 2048;
const LAYERS: usize = 6;

struct Chain {
    norm_weight: CudaSlice<bf16>,
    weights: Vec<CudaSlice<bf16>>,
    /// Layer l reads `inputs[l]`, normalizes it into `normed[l]` and multiplies that into
    /// `inputs[l + 1]`.
    inputs: Vec<CudaSlice<bf16>>,
    normed: Vec<CudaSlice<bf16>>,
    workspace: GemmWorkspace,
    rows: usize,
}

impl Chain {
    fn run(&mut self, ctx: &PhaseContext) -> nexus::kernels::Result<()> {
        let shape = GemmShape { m: self.rows, n: HIDDEN, k: HIDDEN };
        for l in 0..LAYERS {
            let (done, rest) = self.inputs.split_at_mut(l + 1);
            elementwise::rms_norm(
                ctx,
                &done[l].as_view(),
                &self.norm_weight.as_view(),
                1e-5,
                &mut self.normed[l].as_view_mut(),
            )?;
            gemm::gemm(
                ctx,
                &self.normed[l].as_view(),
                &self.weights[l].as_view(),
                None,
                &mut rest[0].as_view_mut(),
                shape,
                &mut self.workspace,
            )?;
        }
        Ok(())
    }

    /// Every buffer a kernel writes back to NaN.
    fn poison(&mut self, ctx: &PhaseContext) {
        let nan = vec![bf16::NAN; self.rows * HIDDEN];
        for buf in self.inputs[1..].iter_mut().chain(self.normed.iter_mut()) {
            ctx.stream().memcpy_htod(&nan, buf).expect("poison");
        }
    }

    /// Each layer against the reference on the GPU's own input of that layer.
    fn check(&self, ctx: &PhaseContext, norm_weight: &[f32], weights: &[Vec<f32>], what: &str) {
        let shape = GemmShape { m: self.rows, n: HIDDEN, k: HIDDEN };
        for (l, weight) in weights.iter().enumerate() {
            let input = download(ctx, &self.inputs[l]);
            let normed = download(ctx, &self.normed[l]);
            let mut want = vec![0f32; input.len()];
            reference::rms_norm(&input, norm_weight, 1e-5, &mut want).expect("reference rms_norm");
            assert_close(&format!("{what}: layer {l} norm"), &normed, &want, 1e-2, 1e-2);
            let output = download(ctx, &self.inputs[l + 1]);
            let mut want = vec![0f32; output.len()];
            reference::gemm(&normed, weight, None, &mut want, shape).expect("reference gemm");
            assert_close(&format!("{what}: layer {l} gemm"), &output, &want, 1e-2, 2e-3 * (HIDDEN as f32).sqrt());
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn dependent_launches_read_what_the_previous_kernel_wrote() {
    // A device of its own: dependent launches need cudarc's event tracking off, which is a
    // setting of the whole context.
    let gpu = Gpu::new(0).expect("open GPU 0");
    // SAFETY: this test's buffers are used on its one stream only.
    unsafe { gpu.context().disable_event_tracking() };
    let ctx = PhaseContext::new(gpu.clone(), gpu.new_stream().expect("stream"), CtaBudget::all(&gpu))
        .with_launch_options(LaunchOptions { dependent_launch: true });
    let mut rng = rng("dependent_launches_read_what_the_previous_kernel_wrote");
    let norm_weight: Vec<f32> = random_bf16(&mut rng, HIDDEN, 0.5).iter().map(|w| 1.0 + w).collect();
    // Weights of spread 1/sqrt(K): the layers keep their scale.
    let weights: Vec<Vec<f32>> = (0..LAYERS).map(|_| random_bf16(&mut rng, HIDDEN * HIDDEN, 0.04)).collect();
    // Decode-sized rows (the swapped wgmma kernels, split along K) and a prefill-sized block.
    for rows in [1, 4, 64, 256] {
        let mut chain = Chain {
            norm_weight: upload(&ctx, &norm_weight),
            weights: weights.iter().map(|w| upload(&ctx, w)).collect(),
            inputs: std::iter::once(upload(&ctx, &random_bf16(&mut rng, rows * HIDDEN, 1.0)))
                .chain((0..LAYERS).map(|_| poisoned(&ctx, rows * HIDDEN)))
                .collect(),
            normed: (0..LAYERS).map(|_| poisoned(&ctx, rows * HIDDEN)).collect(),
            workspace: GemmWorkspace::new(&ctx).expect("workspace"),
            rows,
        };
        chain.run(&ctx).expect("chain");
        chain.check(&ctx, &norm_weight, &weights, &format!("{rows} rows, eager"));

        let (graph, ()) = ctx.capture(|| chain.run(&ctx)).expect("capture");
        let census = GraphCensus::of(&graph).expect("census");
        println!("{rows} rows: {census:?}");
        let kernels = 2 * LAYERS;
        assert_eq!(
            census,
            GraphCensus { kernels, edges: kernels - 1, programmatic_edges: kernels - 1, ..GraphCensus::default() },
            "{rows} rows: the graph must keep a programmatic edge between each pair of kernels"
        );
        for replay in 0..3 {
            chain.poison(&ctx);
            graph.launch().expect("replay");
            chain.check(&ctx, &norm_weight, &weights, &format!("{rows} rows, replay {replay}"));
        }
    }
}
