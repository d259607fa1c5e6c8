//! Bandwidth of the row-wise kernels of a forward step (`cuda/elementwise.cu`) across CTA budgets:
//! the fused residual add + RMSNorm, the plain RMSNorm, RoPE with the KV-cache write and the
//! embedding gather, at the hidden sizes and heads of Llama-3.1-8B (4096, 32/8 d128), Qwen2.5-3B
//! (2048, 16/2 d128) and SmolLM2 (576, 9/3 d64), for a decode batch (1 and 64 rows) and prefill
//! chunks (2048 and 8192 rows). Inputs are random bf16 rotated over copies adding up to 256 MB, so
//! that no prefill-sized launch finds them in L2; at most 64 copies, so a decode batch's few KB of
//! rows stay in L2, as in a decode step, where the kernel before has just written them. Bytes are
//! what a kernel must move: the fused norm reads `x` and the residual and writes both the residual
//! and its output (4 row-sized passes); the plain norm reads and writes one each; RoPE reads the
//! QKV rows, writes back their Q and K heads and writes K and V into the pools; the gather reads
//! and writes one each. Next to each figure: the streaming read at the same budget, measured in the
//! same run (`stream_read_curve`).
//!
//! `cargo bench --bench elementwise`; `NEXUS_BENCH_ONLY=text` runs only the cases whose name
//! contains `text`; with `NEXUS_BENCH_OUT=dir` the summary table is also written to
//! `dir/elementwise.md`.

mod common;

use std::sync::Arc;

use common::*;
use cudarc::driver::{CudaSlice, CudaStream};
use half::bf16;
use nexus::kernels::elementwise::{embedding, fused_add_rms_norm, rms_norm, rope_and_write_kv};
use nexus::kernels::{PagedKvLayout, QkvLayout, RopeConfig, RopeScaling, RopeStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// (model, hidden size, heads)
const MODELS: [(&str, usize, QkvLayout); 3] = [
    ("llama-3.1-8b", 4096, QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 }),
    ("qwen2.5-3b", 2048, QkvLayout { num_heads: 16, num_kv_heads: 2, head_dim: 128 }),
    ("smollm2", 576, QkvLayout { num_heads: 9, num_kv_heads: 3, head_dim: 64 }),
];

/// Rows of a step: decode batches, then prefill chunks.
const ROWS: [usize; 4] = [1, 64, 2048, 8192];

const BLOCK_SIZE: usize = 16;

/// `copies` random bf16 buffers of `len` values each.
fn random_copies(stream: &Arc<CudaStream>, rng: &mut StdRng, len: usize, copies: usize) -> Vec<CudaSlice<bf16>> {
    let values: Vec<bf16> = (0..len).map(|_| bf16::from_f32(rng.random_range(-2.0f32..2.0))).collect();
    (0..copies)
        .map(|i| {
            // Each copy starts elsewhere in the pattern, so no two hold the same values.
            let mut v = values.clone();
            v.rotate_left(i * 4099 % len.max(1));
            stream.clone_htod(&v).expect("upload")
        })
        .collect()
}

fn main() {
    let (gpu, stream) = open();
    let mut c = criterion();
    let budgets = budgets(&gpu);
    let stream_read = stream_read_curve(&gpu, &stream, &budgets);
    let report = Report::new(
        "Row-wise kernels (TB/s = bytes the kernel must move / time)",
        &["kernel", "model", "rows", "budget", "us", "TB/s", "stream read at this budget", "% of stream"],
    );
    let mut rng = StdRng::seed_from_u64(0xe1e);
    let eps = 1e-5;
    for (model, hidden, layout) in MODELS {
        let weight = random_copies(&stream, &mut rng, hidden, 1).remove(0);
        let rope = RopeConfig { theta: 500000.0, style: RopeStyle::RotateHalf, scaling: RopeScaling::None };
        for rows in ROWS {
            let row_bytes = rows * hidden * 2;
            let copies = copies_for(2 * row_bytes);
            let xs = random_copies(&stream, &mut rng, rows * hidden, copies);
            let mut residuals = random_copies(&stream, &mut rng, rows * hidden, copies);
            let mut outs = random_copies(&stream, &mut rng, rows * hidden, copies);

            let qkv_len = rows * layout.row_len();
            let rope_copies = copies_for(qkv_len * 2);
            let mut qkvs = random_copies(&stream, &mut rng, qkv_len, rope_copies);
            // Each copy's rows go to slots of their own, shuffled over the pool (as blocks are).
            let cache = PagedKvLayout {
                num_blocks: (rows * rope_copies).div_ceil(BLOCK_SIZE),
                block_size: BLOCK_SIZE,
                num_kv_heads: layout.num_kv_heads,
                head_dim: layout.head_dim,
            };
            let mut all_slots: Vec<u32> = (0..(rows * rope_copies) as u32).collect();
            all_slots.shuffle(&mut rng);
            let host_slots: Vec<&[u32]> = all_slots.chunks(rows).collect();
            let slots: Vec<CudaSlice<u32>> =
                host_slots.iter().map(|s| stream.clone_htod(*s).expect("upload")).collect();
            let positions: Vec<u32> = (0..rows).map(|_| rng.random_range(0..32768)).collect();
            let positions = stream.clone_htod(&positions).expect("upload");
            let mut k_cache = stream.alloc_zeros::<bf16>(cache.pool_len()).expect("alloc");
            let mut v_cache = stream.alloc_zeros::<bf16>(cache.pool_len()).expect("alloc");

            let vocab = 32768;
            let table = random_copies(&stream, &mut rng, vocab * hidden, 1).remove(0);
            let token_lists: Vec<CudaSlice<u32>> = (0..copies)
                .map(|_| {
                    let t: Vec<u32> = (0..rows).map(|_| rng.random_range(0..vocab as u32)).collect();
                    stream.clone_htod(&t).expect("upload")
                })
                .collect();

            let rope_bytes =
                rows * 2 * (layout.row_len() + (layout.num_heads + 3 * layout.num_kv_heads) * layout.head_dim);
            let kernels: [(&str, usize); 4] = [
                ("fused_add_rms_norm", 4 * row_bytes),
                ("rms_norm", 2 * row_bytes),
                ("rope_and_write_kv", rope_bytes),
                ("embedding", 2 * row_bytes),
            ];
            for (kernel, bytes) in kernels {
                for &budget in &budgets {
                    let case = format!("{kernel}/{model}/{rows} rows/budget {}", budget.get());
                    if !selected(&case) {
                        continue;
                    }
                    let ctx = phase(&gpu, &stream, budget);
                    let mut launch = |i: u64| {
                        let at = i as usize;
                        match kernel {
                            "fused_add_rms_norm" => {
                                let (x, r, o) = (at % copies, at % copies, (at + 1) % copies);
                                let out = &mut outs[o].as_view_mut();
                                fused_add_rms_norm(
                                    &ctx,
                                    &xs[x].as_view(),
                                    &mut residuals[r].as_view_mut(),
                                    &weight.as_view(),
                                    eps,
                                    out,
                                )
                            }
                            "rms_norm" => {
                                let out = &mut outs[(at + 1) % copies].as_view_mut();
                                rms_norm(&ctx, &xs[at % copies].as_view(), &weight.as_view(), eps, out)
                            }
                            "rope_and_write_kv" => {
                                let copy = at % rope_copies;
                                rope_and_write_kv(
                                    &ctx,
                                    &mut qkvs[copy].as_view_mut(),
                                    &positions.as_view(),
                                    layout,
                                    rope,
                                    &slots[copy].as_view(),
                                    host_slots[copy],
                                    &mut k_cache.as_view_mut(),
                                    &mut v_cache.as_view_mut(),
                                    cache,
                                )
                            }
                            _ => {
                                let out = &mut outs[at % copies].as_view_mut();
                                embedding(&ctx, &table.as_view(), hidden, &token_lists[at % copies].as_view(), out)
                            }
                        }
                        .expect(kernel);
                    };
                    c.bench_function(&case, |b| b.iter_custom(|iters| time_gpu(&stream, iters, &mut launch)));
                    let t = median_gpu_time(&stream, &mut launch).as_secs_f64();
                    let tbs = bytes as f64 / t / 1e12;
                    let ceiling = stream_read.at(budget.get()) / 1e12;
                    report.add(vec![
                        kernel.to_string(),
                        model.to_string(),
                        rows.to_string(),
                        budget.get().to_string(),
                        format!("{:.1}", t * 1e6),
                        format!("{tbs:.2}"),
                        format!("{ceiling:.2}"),
                        format!("{:.0}%", 100.0 * tbs / ceiling),
                    ]);
                }
            }
        }
    }
    report.finish(&gpu, "elementwise");
    c.final_summary();
}
