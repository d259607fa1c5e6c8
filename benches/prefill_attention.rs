//! Paged prefill attention throughput (TFLOP/s) across CTA budgets: causal prefill of one
//! sequence of 1k, 4k, 8k and 16k tokens, and a 2048-token chunk over 2k and 8k cached tokens;
//! 32/8 heads, head dim 128, block size 16 (`NEXUS_BENCH_BLOCK_SIZE=n` for another) with a
//! shuffled block table; random bf16 data, inputs
//! rotated over copies larger than L2. FLOPs are `4·H_q·d·(C·P + C(C+1)/2)` for a chunk of C
//! tokens over a prefix of P (torch SDPA's figures for the same shapes come from
//! `scripts/bench-torch-sdpa.py`).
//!
//! The default kernel for the block size (on Hopper a wgmma one: the plain kernel for blocks of 16
//! and 32, the pipelined one from 64) is swept over the budgets, with its TFLOP/s per CTA (one per
//! SM) to show how it scales; every other compiled kernel for head dim 128 is measured with all
//! SMs (summary table only), to compare variants in the same run.
//!
//! `cargo bench --bench prefill_attention`; with `NEXUS_BENCH_OUT=dir` the summary table is also
//! written to `dir/prefill_attention.md`; `NEXUS_BENCH_ONLY=text` runs only the cases named
//! `<shape>/<kernel>/budget <SMs>` that contain `text` (e.g. `causal 8k/wgmma_d128/budget 132`).

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use half::bf16;
use nexus::kernels::prefill_attention::{PrefillPlan, prefill_attention};
use nexus::kernels::{AttentionBatch, PagedKvLayout, QkvLayout};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const LAYOUT: QkvLayout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };

/// A chunk of `chunk` tokens over `prefix` cached ones.
struct Shape {
    name: &'static str,
    prefix: usize,
    chunk: usize,
}

const SHAPES: [Shape; 6] = [
    Shape { name: "causal 1k", prefix: 0, chunk: 1024 },
    Shape { name: "causal 4k", prefix: 0, chunk: 4096 },
    Shape { name: "causal 8k", prefix: 0, chunk: 8192 },
    Shape { name: "causal 16k", prefix: 0, chunk: 16384 },
    Shape { name: "chunk 2k over 2k", prefix: 2048, chunk: 2048 },
    Shape { name: "chunk 2k over 8k", prefix: 8192, chunk: 2048 },
];

/// One copy of the inputs.
struct Inputs {
    qkv: CudaSlice<bf16>,
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
}

fn random(rng: &mut StdRng, n: usize) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect()
}

fn main() {
    let (gpu, stream) = open();
    let mut c = criterion();
    let block_size = block_size(KERNEL_BENCH_BLOCK_SIZE);
    let title = format!(
        "Paged prefill attention, 32/8 heads, d=128, block {block_size} (TFLOP/s = 4·H·d·(C·P + C(C+1)/2) / time)"
    );
    let report = Report::new(&title, &["shape", "kernel", "budget", "ms", "TFLOP/s", "TFLOP/s per CTA"]);
    let mut rng = StdRng::seed_from_u64(0x5eed);
    for shape in &SHAPES {
        let kv_len = shape.prefix + shape.chunk;
        let blocks = kv_len.div_ceil(block_size);
        let cache = PagedKvLayout { num_blocks: blocks, block_size, num_kv_heads: 8, head_dim: 128 };
        let mut table: Vec<i32> = (0..blocks as i32).collect();
        table.shuffle(&mut rng);
        let (q_indptr, kv_lens) = ([0, shape.chunk as u32], [kv_len as u32]);
        let batch =
            AttentionBatch { q_indptr: &q_indptr, kv_lens: &kv_lens, block_tables: &table, max_blocks_per_seq: blocks };

        let bytes = 2 * (shape.chunk * LAYOUT.row_len() + 2 * cache.pool_len());
        let copies = copies_for(bytes);
        let host_qkv = random(&mut rng, shape.chunk * LAYOUT.row_len());
        let host_k = random(&mut rng, cache.pool_len());
        let host_v = random(&mut rng, cache.pool_len());
        let inputs: Vec<Inputs> = (0..copies)
            .map(|_| Inputs {
                qkv: stream.clone_htod(&host_qkv).expect("upload"),
                k: stream.clone_htod(&host_k).expect("upload"),
                v: stream.clone_htod(&host_v).expect("upload"),
            })
            .collect();
        let tables = stream.clone_htod(&table).expect("upload");
        let mut out = stream.alloc_zeros::<bf16>(shape.chunk * LAYOUT.num_heads * LAYOUT.head_dim).expect("alloc");
        let scale = 1.0 / (LAYOUT.head_dim as f32).sqrt();

        let setup = phase(&gpu, &stream, nexus::kernels::CtaBudget::all(&gpu));
        let mut plan = PrefillPlan::new(&setup, batch, LAYOUT, cache).expect("plan");
        // The default kernel first (the one the engine launches for this block size), then the others.
        let default = plan.kernel();
        let others: Vec<&str> = plan.kernels().into_iter().filter(|&k| k != default).collect();
        let all = nexus::kernels::CtaBudget::all(&gpu);
        let runs = budgets(&gpu).into_iter().map(|b| (default, b)).chain(others.into_iter().map(|k| (k, all)));
        for (kernel, budget) in runs {
            let short = kernel.trim_start_matches("prefill_attention_");
            if !selected(&format!("{}/{short}/budget {}", shape.name, budget.get())) {
                continue;
            }
            plan.set_kernel(kernel).expect("kernel");
            let plan = &plan;
            let ctx = phase(&gpu, &stream, budget);
            let mut launch = |i: u64| {
                let x = &inputs[i as usize % copies];
                prefill_attention(
                    &ctx,
                    plan,
                    &x.qkv.as_view(),
                    &x.k.as_view(),
                    &x.v.as_view(),
                    &tables.as_view(),
                    scale,
                    &mut out.as_view_mut(),
                    None,
                )
                .expect("prefill_attention");
            };
            if kernel == default {
                c.bench_function(&format!("prefill_attention/{}/budget {}", shape.name, budget.get()), |b| {
                    b.iter_custom(|iters| time_gpu(&stream, iters, &mut launch))
                });
            }
            let t = median_gpu_time(&stream, &mut launch);
            let tflops = plan.flops() / t.as_secs_f64() / 1e12;
            report.add(vec![
                shape.name.to_string(),
                short.to_string(),
                budget.get().to_string(),
                format!("{:.3}", t.as_secs_f64() * 1e3),
                format!("{tflops:.1}"),
                format!("{:.2}", tflops / f64::from(plan.ctas(budget))),
            ]);
        }
    }
    report.finish(&gpu, "prefill_attention");
    c.final_summary();
}
