//! Paged decode attention bandwidth (TB/s of K/V read) across CTA budgets: batch × context
//! 1×4096, 1×32768, 32×2048, 64×4096 and 128×1024, with the heads of Llama-3.1-8B (32/8 d128),
//! Qwen2.5-3B (16/2 d128), Qwen2.5-14B (40/8 d128) and SmolLM2 (9/3 d64), block size 16
//! (`NEXUS_BENCH_BLOCK_SIZE=n` for another), shuffled
//! block tables over a pool of random bf16 data; the pool holds at least 256 MB (several
//! block-table copies of the batch, rotated) so no launch finds its K/V in L2. Bytes are `Σ 2·L·H_kv·d·2`; the plan (split-KV chunk, work lists) is made
//! once per budget outside the timing, as a serving engine does once per step. Next to each figure:
//! the streaming read at the same budget, measured in the same run (`StreamRead::curve`: reads of
//! 256 MB), the kernel's share of it and of the all-SM streaming read, and a streaming read of the
//! kernel's own bytes at that budget (one launch of that size: its fixed costs as the kernel's);
//! and the time of `decode_attention_rope`
//! (the same attention with the new tokens' RoPE and KV write inside) on the same plan.
//!
//! `cargo bench --bench decode_attention`; `NEXUS_BENCH_ONLY=text` runs only the cases whose name
//! (as criterion prints it) contains `text`; with `NEXUS_BENCH_OUT=dir` the summary table is also
//! written to `dir/decode_attention.md`.

mod common;

use common::*;
use cudarc::driver::CudaSlice;
use half::bf16;
use nexus::kernels::decode_attention::{DecodeOptions, DecodePlan, decode_attention, decode_attention_rope};
use nexus::kernels::{PagedKvLayout, QkvLayout, RopeConfig, RopeScaling, RopeStyle};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// Llama-3.1-8B, Qwen2.5-3B, Qwen2.5-14B, SmolLM2.
const LAYOUTS: [(&str, QkvLayout); 4] = [
    ("32/8 d128", QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 }),
    ("16/2 d128", QkvLayout { num_heads: 16, num_kv_heads: 2, head_dim: 128 }),
    ("40/8 d128", QkvLayout { num_heads: 40, num_kv_heads: 8, head_dim: 128 }),
    ("9/3 d64", QkvLayout { num_heads: 9, num_kv_heads: 3, head_dim: 64 }),
];

/// (sequences, context tokens)
const SHAPES: [(usize, usize); 5] = [(1, 4096), (1, 32768), (32, 2048), (64, 4096), (128, 1024)];

/// Random bf16 in [-1, 1): a 64 MiB pattern copied over the pools (the values do not matter to
/// the caches, only the addresses do).
fn fill_random(stream: &std::sync::Arc<cudarc::driver::CudaStream>, pool: &mut CudaSlice<bf16>, pattern: &[bf16]) {
    let n = pool.len();
    let mut at = 0;
    while at < n {
        let len = pattern.len().min(n - at);
        stream.memcpy_htod(&pattern[..len], &mut pool.slice_mut(at..at + len)).expect("upload");
        at += len;
    }
}

fn main() {
    let (gpu, stream) = open();
    let mut c = criterion();
    let max_bytes = LAYOUTS
        .iter()
        .flat_map(|(_, l)| SHAPES.iter().map(move |&(seqs, ctx)| seqs * ctx * 4 * l.num_kv_heads * l.head_dim))
        .max()
        .unwrap_or(0);
    let reads = StreamRead::new(&gpu, &stream, max_bytes, &budgets(&gpu));
    let stream_read = reads.curve();
    let all_sms = stream_read.at(gpu.sm_count()) / 1e12;
    let of_all = format!("% of {all_sms:.2} (all-SM stream)");
    let block_size = block_size(KERNEL_BENCH_BLOCK_SIZE);
    let title = format!("Paged decode attention, block {block_size} (TB/s = K/V bytes Σ 2·L·H_kv·d·2 / time)");
    let report = Report::new(
        &title,
        &[
            "heads",
            "batch x ctx",
            "budget",
            "us",
            "TB/s",
            "stream read at this budget",
            "% of stream",
            "stream read of the same bytes",
            "% of it",
            &of_all,
            "chunk",
            "items",
            "CTAs",
            "us with RoPE inside",
        ],
    );
    let mut rng = StdRng::seed_from_u64(0xdec0de);
    let pattern: Vec<bf16> = (0..32 << 20).map(|_| bf16::from_f32(rng.random_range(-1.0f32..1.0))).collect();
    for (name, layout) in LAYOUTS {
        for (seqs, ctx_len) in SHAPES {
            let blocks_per_seq = ctx_len.div_ceil(block_size);
            let blocks = seqs * blocks_per_seq;
            let block_bytes = 2 * block_size * layout.num_kv_heads * layout.head_dim * 2; // K + V
            let copies = copies_for(blocks * block_bytes);
            let cache = PagedKvLayout {
                num_blocks: blocks * copies,
                block_size,
                num_kv_heads: layout.num_kv_heads,
                head_dim: layout.head_dim,
            };
            // Copy i of the batch uses blocks [i·blocks, (i+1)·blocks), shuffled.
            let tables: Vec<Vec<i32>> = (0..copies)
                .map(|i| {
                    let mut t: Vec<i32> = ((i * blocks) as i32..((i + 1) * blocks) as i32).collect();
                    t.shuffle(&mut rng);
                    t
                })
                .collect();
            let mut k = stream.alloc_zeros::<bf16>(cache.pool_len()).expect("alloc");
            let mut v = stream.alloc_zeros::<bf16>(cache.pool_len()).expect("alloc");
            fill_random(&stream, &mut k, &pattern);
            fill_random(&stream, &mut v, &pattern[1..]);
            let qkv = stream.clone_htod(&pattern[..seqs * layout.row_len()]).expect("upload");
            let dev_tables: Vec<CudaSlice<i32>> =
                tables.iter().map(|t| stream.clone_htod(t).expect("upload")).collect();
            let mut out = stream.alloc_zeros::<bf16>(seqs * layout.num_heads * layout.head_dim).expect("alloc");
            let kv_lens = vec![ctx_len as u32; seqs];
            let shape = format!("{seqs}x{ctx_len}");

            for budget in budgets(&gpu) {
                let case = format!("decode_attention/{name}/{shape}/budget {}", budget.get());
                if !selected(&case) {
                    continue;
                }
                let ctx = phase(&gpu, &stream, budget);
                let plans: Vec<DecodePlan> = tables
                    .iter()
                    .map(|t| {
                        DecodePlan::new(
                            &ctx,
                            layout,
                            cache,
                            &kv_lens,
                            t,
                            blocks_per_seq,
                            DecodeOptions::new(layout.head_dim),
                        )
                        .expect("plan")
                    })
                    .collect();
                let mut launch = |i: u64| {
                    let copy = i as usize % copies;
                    decode_attention(
                        &ctx,
                        &plans[copy],
                        &qkv.as_view(),
                        &k.as_view(),
                        &v.as_view(),
                        &dev_tables[copy].as_view(),
                        &mut out.as_view_mut(),
                        None,
                    )
                    .expect("decode_attention");
                };
                c.bench_function(&case, |b| b.iter_custom(|iters| time_gpu(&stream, iters, &mut launch)));
                let t = median_gpu_time(&stream, &mut launch).as_secs_f64();
                // Llama-3.1-8B's RoPE (rotate-half, theta 500000, no scaling: the arithmetic is
                // the same for every scaling).
                let rope = RopeConfig { theta: 500_000.0, style: RopeStyle::RotateHalf, scaling: RopeScaling::None };
                let mut launch_rope = |i: u64| {
                    let copy = i as usize % copies;
                    decode_attention_rope(
                        &ctx,
                        &plans[copy],
                        &qkv.as_view(),
                        rope,
                        &mut k.as_view_mut(),
                        &mut v.as_view_mut(),
                        &dev_tables[copy].as_view(),
                        &mut out.as_view_mut(),
                        None,
                    )
                    .expect("decode_attention_rope");
                };
                let t_rope = median_gpu_time(&stream, &mut launch_rope).as_secs_f64();
                let tbs = plans[0].kv_bytes() as f64 / t / 1e12;
                let ceiling = stream_read.at(budget.get()) / 1e12;
                let same_bytes = reads.bytes_per_second(budget, plans[0].kv_bytes()) / 1e12;
                report.add(vec![
                    name.to_string(),
                    shape.clone(),
                    budget.get().to_string(),
                    format!("{:.1}", t * 1e6),
                    format!("{tbs:.2}"),
                    format!("{ceiling:.2}"),
                    format!("{:.0}%", 100.0 * tbs / ceiling),
                    format!("{same_bytes:.2}"),
                    format!("{:.0}%", 100.0 * tbs / same_bytes),
                    format!("{:.0}%", 100.0 * tbs / all_sms),
                    plans[0].chunk_tokens().map_or("-".into(), |c| c.to_string()),
                    plans[0].num_items().to_string(),
                    plans[0].grid().to_string(),
                    format!("{:.1}", t_rope * 1e6),
                ]);
            }
        }
    }
    report.finish(&gpu, "decode_attention");
    c.final_summary();
}
