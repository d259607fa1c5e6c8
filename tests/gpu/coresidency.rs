//! The contract the Nexus scheduler stands on: a prefill-attention launch and a decode-attention
//! launch on two streams, with budgets adding up to at most the SM count, run on disjoint SMs at
//! the same time, and neither launches more CTAs than its budget.

use nexus::kernels::decode_attention::{self, DecodeOptions, DecodePlan};
use nexus::kernels::prefill_attention::{self, PrefillPlan};
use nexus::kernels::{AttentionBatch, CtaBudget, PagedKvLayout, PhaseContext, QkvLayout};
use rand::Rng;

use crate::common::*;

/// `{sm id, start ns, end ns}` of each CTA that ran.
fn spans(trace: &[u64], budget: u32) -> Vec<(u64, u64, u64)> {
    trace[..3 * budget as usize].chunks_exact(3).filter(|c| c[2] != 0).map(|c| (c[0], c[1], c[2])).collect()
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn prefill_and_decode_share_the_gpu_on_disjoint_sms() {
    let gpu = gpu();
    let sms = gpu.sm_count();
    let decode_budget = (sms / 4).max(1);
    let prefill_budget = sms - decode_budget;
    let prefill_ctx =
        PhaseContext::new(gpu.clone(), gpu.new_stream().unwrap(), CtaBudget::new(prefill_budget, &gpu).unwrap());
    let decode_ctx =
        PhaseContext::new(gpu.clone(), gpu.new_stream().unwrap(), CtaBudget::new(decode_budget, &gpu).unwrap());
    let mut rng = rng("coresidency");

    let layout = QkvLayout { num_heads: 32, num_kv_heads: 8, head_dim: 128 };
    let block_size = 16;
    // Prefill: one 8k-token prompt (milliseconds of work on most of the GPU). Decode: 32
    // sequences of 2k tokens. Their blocks are disjoint parts of one pool.
    let prompt = 8192usize;
    let (decode_seqs, decode_len) = (32usize, 2048usize);
    let prompt_blocks = prompt / block_size;
    let decode_blocks = decode_len / block_size;
    let num_blocks = prompt_blocks + decode_seqs * decode_blocks;
    let cache = PagedKvLayout { num_blocks, block_size, num_kv_heads: 8, head_dim: 128 };
    // A random tile repeated over the pool: values only need to be finite and varied here (the
    // kernels' numbers are checked against the references elsewhere).
    let tile = random_bf16(&mut rng, 1 << 20, 1.0);
    let pool: Vec<f32> = tile.iter().copied().cycle().take(cache.pool_len()).collect();
    let k = upload(&prefill_ctx, &pool);
    let v = upload(&prefill_ctx, &pool);

    let prefill_table: Vec<i32> = (0..prompt_blocks as i32).collect();
    let q_indptr = [0u32, prompt as u32];
    let kv_lens = [prompt as u32];
    let batch = AttentionBatch {
        q_indptr: &q_indptr,
        kv_lens: &kv_lens,
        block_tables: &prefill_table,
        max_blocks_per_seq: prompt_blocks,
    };
    let prefill_plan = PrefillPlan::new(&prefill_ctx, batch, layout, cache).unwrap();
    let prefill_qkv = upload(&prefill_ctx, &random_bf16(&mut rng, prompt * layout.row_len(), 1.0));
    let prefill_tables = prefill_ctx.stream().clone_htod(&prefill_table).unwrap();
    let mut prefill_out = poisoned(&prefill_ctx, prompt * 32 * 128);

    let decode_table: Vec<i32> = (0..(decode_seqs * decode_blocks) as i32).map(|b| prompt_blocks as i32 + b).collect();
    let decode_lens: Vec<u32> =
        (0..decode_seqs).map(|_| rng.random_range(decode_len as u32 - 100..=decode_len as u32)).collect();
    let decode_plan = DecodePlan::new(
        &decode_ctx,
        layout,
        cache,
        &decode_lens,
        &decode_table,
        decode_blocks,
        DecodeOptions::new(128),
    )
    .unwrap();
    let decode_qkv = upload(&decode_ctx, &random_bf16(&mut rng, decode_seqs * layout.row_len(), 1.0));
    let decode_tables = decode_ctx.stream().clone_htod(&decode_table).unwrap();
    let mut decode_out = poisoned(&decode_ctx, decode_seqs * 32 * 128);

    let mut prefill_trace = prefill_ctx.stream().alloc_zeros::<u64>(3 * prefill_budget as usize).unwrap();
    let mut decode_trace = decode_ctx.stream().alloc_zeros::<u64>(3 * decode_budget as usize).unwrap();
    prefill_ctx.stream().synchronize().unwrap();
    decode_ctx.stream().synchronize().unwrap();

    // Run each launch once untraced first: the driver loads a kernel lazily on its first launch,
    // and loading one while another kernel runs can serialize the two.
    for traced in [false, true] {
        prefill_attention::prefill_attention(
            &prefill_ctx,
            &prefill_plan,
            &prefill_qkv.as_view(),
            &k.as_view(),
            &v.as_view(),
            &prefill_tables.as_view(),
            1.0 / (128f32).sqrt(),
            &mut prefill_out.as_view_mut(),
            traced.then(|| prefill_trace.as_view_mut()).as_mut(),
        )
        .unwrap();
        decode_attention::decode_attention(
            &decode_ctx,
            &decode_plan,
            &decode_qkv.as_view(),
            &k.as_view(),
            &v.as_view(),
            &decode_tables.as_view(),
            &mut decode_out.as_view_mut(),
            traced.then(|| decode_trace.as_view_mut()).as_mut(),
        )
        .unwrap();
        prefill_ctx.stream().synchronize().unwrap();
        decode_ctx.stream().synchronize().unwrap();
    }
    let prefill = spans(&prefill_ctx.stream().clone_dtoh(&prefill_trace).unwrap(), prefill_budget);
    let decode = spans(&decode_ctx.stream().clone_dtoh(&decode_trace).unwrap(), decode_budget);
    assert!(!prefill.is_empty() && prefill.len() <= prefill_budget as usize, "prefill ran {} CTAs", prefill.len());
    assert!(!decode.is_empty() && decode.len() <= decode_budget as usize, "decode ran {} CTAs", decode.len());
    // Overlap in time: the decode launch ran while prefill CTAs were running.
    let prefill_span = (prefill.iter().map(|s| s.1).min().unwrap(), prefill.iter().map(|s| s.2).max().unwrap());
    let decode_span = (decode.iter().map(|s| s.1).min().unwrap(), decode.iter().map(|s| s.2).max().unwrap());
    eprintln!(
        "prefill: {} CTAs, {:.3} ms; decode: {} CTAs, {:.3} ms, starting {:.3} ms after prefill",
        prefill.len(),
        (prefill_span.1 - prefill_span.0) as f64 / 1e6,
        decode.len(),
        (decode_span.1 - decode_span.0) as f64 / 1e6,
        (decode_span.0 as f64 - prefill_span.0 as f64) / 1e6
    );
    eprintln!("prefill SMs: {:?}", prefill.iter().map(|s| s.0).collect::<Vec<_>>());
    eprintln!(
        "decode SMs and start offsets (us): {:?}",
        decode.iter().map(|s| (s.0, (s.1 as f64 - prefill_span.0 as f64) / 1e3)).collect::<Vec<_>>()
    );
    let prefill_sms: std::collections::HashSet<u64> = prefill.iter().map(|s| s.0).collect();
    let decode_sms: std::collections::HashSet<u64> = decode.iter().map(|s| s.0).collect();
    assert_eq!(prefill_sms.len(), prefill.len(), "two prefill CTAs shared an SM");
    assert_eq!(decode_sms.len(), decode.len(), "two decode CTAs shared an SM");
    assert!(
        prefill_sms.is_disjoint(&decode_sms),
        "prefill and decode shared SMs: {:?}",
        prefill_sms.intersection(&decode_sms)
    );
    assert!(
        decode_span.0 < prefill_span.1 && prefill_span.0 < decode_span.1,
        "the launches did not overlap: prefill {prefill_span:?}, decode {decode_span:?}"
    );
    // Both wrote every output.
    assert!(download(&prefill_ctx, &prefill_out).iter().all(|x| x.is_finite()));
    assert!(download(&decode_ctx, &decode_out).iter().all(|x| x.is_finite()));
}
