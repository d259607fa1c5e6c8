//! Benchmark workloads: drawn lengths match the paper's table (DESIGN.md), the mixture is 60/40,
//! arrivals are Poisson and reproducible, or gamma with the asked burstiness, bad arguments are
//! refused; vLLM's random dataset stays within its bounds; JSONL datasets parse (or name the bad
//! line) and replay cycled or cut to the number of requests; an in-process replay under a cap on
//! the requests in flight never runs more.
//!
//! The table is copied here rather than read from the module's constants, so a typo there fails.

use nexus::runtime::bench::replay_requests;
use nexus::runtime::bench::workload::{
    Arrivals, DatasetEntry, Prompt, RandomLengths, Request, Summary, Workload, WorkloadSampler, dataset_requests,
    parse_jsonl, random_trace, synthetic_requests, trace,
};
use nexus::runtime::engine::scheduler::SchedulerConfig;
use nexus::runtime::engine::{Engine, EngineConfig, Schedule};
use nexus::runtime::model::LlamaModel;
use nexus::runtime::model::cpu::CpuBackend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::chaos::tiny_config;

const N: usize = 20_000;
/// Relative tolerance of the mean and the median.
const TOL_CENTER: f64 = 0.05;
/// Relative tolerance of p95 and p99.
const TOL_TAIL: f64 = 0.07;

/// The paper's table: input and output (mean, p50, p95, p99) in tokens.
fn table(w: Workload) -> ([f64; 4], [f64; 4]) {
    match w {
        Workload::LongData => ([5905.0, 5461.0, 9292.0, 9817.0], [180.0, 159.0, 339.0, 454.0]),
        Workload::Arxiv => ([3832.0, 3575.0, 6460.0, 6894.0], [200.0, 181.0, 357.0, 443.0]),
        Workload::ShareGpt => ([496.0, 432.0, 970.0, 1367.0], [97.0, 37.0, 383.0, 474.0]),
        Workload::Mixed => unreachable!("the mixture has no row of its own"),
    }
}

fn summary(values: impl Iterator<Item = usize>) -> Summary {
    Summary::of(&values.map(|v| v as f64).collect::<Vec<_>>()).expect("a non-empty sample of lengths")
}

fn check(what: &str, got: Summary, want: [f64; 4]) {
    let got_all = [got.mean, got.p50, got.p95, got.p99];
    let names = ["mean", "p50", "p95", "p99"];
    for i in 0..4 {
        let tol = if i < 2 { TOL_CENTER } else { TOL_TAIL };
        let rel = (got_all[i] - want[i]).abs() / want[i];
        assert!(
            rel <= tol,
            "{what} {}: got {:.1}, table {} ({:.1}% off, allowed {}%)",
            names[i],
            got_all[i],
            want[i],
            rel * 100.0,
            tol * 100.0
        );
    }
}

#[test]
fn lengths_match_the_table() {
    for (seed, w) in [Workload::LongData, Workload::Arxiv, Workload::ShareGpt].into_iter().enumerate() {
        let requests = trace(w, Arrivals::poisson(10.0), N, seed as u64).unwrap();
        assert_eq!(requests.len(), N);
        assert!(requests.iter().all(|r| r.input_len >= 1 && r.output_len >= 1));
        let input = summary(requests.iter().map(|r| r.input_len));
        let output = summary(requests.iter().map(|r| r.output_len));
        eprintln!("{w}: input {input:?}\n{w}: output {output:?}");
        let (want_in, want_out) = table(w);
        check(&format!("{w} input"), input, want_in);
        check(&format!("{w} output"), output, want_out);
    }
}

#[test]
fn input_and_output_are_drawn_independently() {
    // Pearson correlation of input and output lengths near 0 (|r| < 0.03 at 20000 draws is about
    // 4 standard errors).
    let requests = trace(Workload::LongData, Arrivals::poisson(1.0), N, 7).unwrap();
    let xs: Vec<f64> = requests.iter().map(|r| r.input_len as f64).collect();
    let ys: Vec<f64> = requests.iter().map(|r| r.output_len as f64).collect();
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (mx, my) = (mean(&xs), mean(&ys));
    let cov: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let vx: f64 = xs.iter().map(|x| (x - mx).powi(2)).sum();
    let vy: f64 = ys.iter().map(|y| (y - my).powi(2)).sum();
    let r = cov / (vx * vy).sqrt();
    assert!(r.abs() < 0.03, "correlation {r}");
}

#[test]
fn mixed_is_sixty_forty_sharegpt_long_data() {
    // The split, through the sampler that tells the source of each draw.
    let sampler = WorkloadSampler::new(Workload::Mixed).unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let sources: Vec<Workload> = (0..N).map(|_| sampler.sample(&mut rng).source).collect();
    let sharegpt = sources.iter().filter(|&&s| s == Workload::ShareGpt).count() as f64 / N as f64;
    let long_data = sources.iter().filter(|&&s| s == Workload::LongData).count() as f64 / N as f64;
    // Standard error of the share is sqrt(0.24 / 20000) = 0.35%; allow 1.5 points.
    assert!((sharegpt - 0.6).abs() < 0.015, "sharegpt share {sharegpt}");
    assert!((sharegpt + long_data - 1.0).abs() < 1e-12, "other sources drawn");

    // The means of the trace: the mixture of the table's means.
    let requests = trace(Workload::Mixed, Arrivals::poisson(5.0), N, 12).unwrap();
    let input = summary(requests.iter().map(|r| r.input_len));
    let output = summary(requests.iter().map(|r| r.output_len));
    eprintln!("mixed: input {input:?}\nmixed: output {output:?}");
    let (sg_in, sg_out) = table(Workload::ShareGpt);
    let (ld_in, ld_out) = table(Workload::LongData);
    for (what, got, want) in [
        ("input", input.mean, 0.6 * sg_in[0] + 0.4 * ld_in[0]),
        ("output", output.mean, 0.6 * sg_out[0] + 0.4 * ld_out[0]),
    ] {
        assert!((got - want).abs() / want <= TOL_CENTER, "mixed {what} mean {got:.1}, expected {want:.1}");
    }
    // Bimodal inputs: ShareGPT prompts never exceed 1764 tokens (p99 + (p99 - p95)) and about 7%
    // of long-data prompts fall below 1800, so about 37% of the mixture's prompts exceed 1800.
    let long = requests.iter().filter(|r| r.input_len > 1800).count() as f64 / N as f64;
    assert!((0.34..0.40).contains(&long), "share of prompts over 1800 tokens {long}");
}

#[test]
fn arrivals_are_poisson_and_reproducible() {
    for rate in [0.5, 4.0, 64.0] {
        let requests = trace(Workload::ShareGpt, Arrivals::poisson(rate), N, 3).unwrap();
        let mut last = 0.0;
        let mut gaps = Vec::with_capacity(N);
        for r in &requests {
            assert!(r.arrival_s > last, "arrivals not strictly increasing");
            gaps.push(r.arrival_s - last);
            last = r.arrival_s;
        }
        let mean = gaps.iter().sum::<f64>() / N as f64;
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (N - 1) as f64).sqrt();
        let cv = sd / mean;
        // Standard error of the mean gap is 1/sqrt(N) = 0.7% of it; of the CV about 1%.
        assert!((mean * rate - 1.0).abs() < 0.03, "rate {rate}: mean gap {mean}, expected {}", 1.0 / rate);
        assert!((cv - 1.0).abs() < 0.05, "rate {rate}: coefficient of variation {cv}");
        // Exponential, not merely CV 1: P(gap > mean) = 1/e.
        let above = gaps.iter().filter(|&&g| g > 1.0 / rate).count() as f64 / N as f64;
        assert!((above - (-1.0f64).exp()).abs() < 0.015, "rate {rate}: share of gaps above the mean {above}");
    }
    let a = trace(Workload::Mixed, Arrivals::poisson(2.0), 500, 99).unwrap();
    assert_eq!(a, trace(Workload::Mixed, Arrivals::poisson(2.0), 500, 99).unwrap());
    let b = trace(Workload::Mixed, Arrivals::poisson(2.0), 500, 100).unwrap();
    assert_ne!(a.iter().map(|r| r.arrival_s).collect::<Vec<_>>(), b.iter().map(|r| r.arrival_s).collect::<Vec<_>>());
    assert_ne!(a.iter().map(|r| r.input_len).collect::<Vec<_>>(), b.iter().map(|r| r.input_len).collect::<Vec<_>>());
}

#[test]
fn bad_arguments_are_refused() {
    for rate in [0.0, -1.0, f64::NAN, f64::NEG_INFINITY] {
        assert!(trace(Workload::Arxiv, Arrivals::poisson(rate), 10, 0).is_err(), "rate {rate} accepted");
    }
    for burstiness in [0.0, -1.0, f64::NAN] {
        let arrivals = Arrivals { rate_per_s: 1.0, burstiness };
        assert!(trace(Workload::Arxiv, arrivals, 10, 0).is_err(), "burstiness {burstiness} accepted");
    }
    assert!(trace(Workload::Arxiv, Arrivals::poisson(1.0), 0, 0).is_err());
    assert_eq!(trace(Workload::Arxiv, Arrivals::poisson(1e-9), 1, 0).unwrap().len(), 1);
    assert!("longdata".parse::<Workload>().is_err());
    for w in Workload::ALL {
        assert_eq!(w.name().parse::<Workload>().unwrap(), w);
    }
}

#[test]
fn jsonl_datasets_parse_and_name_the_bad_line() {
    let good = "{\"prompt\": \"Hello there\", \"output_len\": 5}\n\n  \n{\"prompt_token_ids\": [1, 2, 3], \"output_len\": 2}\n";
    let entries = parse_jsonl(good).unwrap();
    assert_eq!(
        entries,
        [
            DatasetEntry { prompt: Prompt::Text("Hello there".into()), output_len: 5 },
            DatasetEntry { prompt: Prompt::TokenIds(vec![1, 2, 3]), output_len: 2 },
        ]
    );
    let ok = "{\"prompt\": \"a\", \"output_len\": 1}\n";
    for (bad_line, want) in [
        ("not json", "expected"),
        ("{\"prompt\": \"a\"}", "output_len"),
        ("{\"output_len\": 3}", "missing prompt"),
        ("{\"prompt\": \"a\", \"prompt_token_ids\": [1], \"output_len\": 3}", "not both"),
        ("{\"prompt_token_ids\": [], \"output_len\": 3}", "empty"),
        ("{\"prompt_token_ids\": [-1], \"output_len\": 3}", "-1"),
        ("{\"prompt\": \"a\", \"output_len\": 0}", "at least 1"),
        ("{\"prompt\": \"a\", \"output_len\": 3, \"max_tokens\": 3}", "max_tokens"),
    ] {
        // The bad line is the third: a blank line counts.
        let text = format!("{ok}\n{bad_line}\n{ok}");
        let message = parse_jsonl(&text).unwrap_err().to_string();
        assert!(message.contains("line 3:") && message.contains(want), "{bad_line}: {message}");
    }
    assert!(parse_jsonl("\n\n").unwrap_err().to_string().contains("no request"));
}

#[test]
fn datasets_cycle_or_cut_and_random_prompts_stay_in_range() {
    let entries: Vec<DatasetEntry> = (1..=3)
        .map(|n| DatasetEntry { prompt: Prompt::TokenIds(vec![n; n as usize]), output_len: n as usize })
        .collect();
    let cycled = dataset_requests(&entries, Arrivals::poisson(10.0), 7, 4).unwrap();
    let lengths: Vec<usize> = cycled.iter().map(|r| r.output_len).collect();
    assert_eq!(lengths, [1, 2, 3, 1, 2, 3, 1]);
    assert!(cycled.windows(2).all(|w| w[0].arrival_s < w[1].arrival_s));
    let cut = dataset_requests(&entries, Arrivals::poisson(10.0), 2, 4).unwrap();
    assert_eq!(cut.iter().map(|r| r.output_len).collect::<Vec<_>>(), [1, 2]);
    // The same seed gives the same arrivals.
    assert_eq!(cut[..], cycled[..2]);
    assert!(dataset_requests(&entries, Arrivals::poisson(0.0), 2, 4).is_err());
    assert!(dataset_requests(&entries, Arrivals::poisson(1.0), 0, 4).is_err());
    assert!(dataset_requests(&[], Arrivals::poisson(1.0), 2, 4).is_err());

    let shapes = trace(Workload::ShareGpt, Arrivals::poisson(5.0), 50, 8).unwrap();
    let requests = synthetic_requests(&shapes, 1000..30_000, 8).unwrap();
    for (r, shape) in requests.iter().zip(&shapes) {
        let Prompt::TokenIds(ids) = &r.prompt else { panic!("a text prompt") };
        assert_eq!((ids.len(), r.output_len, r.arrival_s), (shape.input_len, shape.output_len, shape.arrival_s));
        assert!(ids.iter().all(|id| (1000..30_000).contains(id)));
    }
    assert_eq!(requests, synthetic_requests(&shapes, 1000..30_000, 8).unwrap());
    assert!(synthetic_requests(&shapes, 5..5, 8).is_err());
}

/// The gaps between consecutive arrivals of `requests`, the first from 0.
fn gaps(requests: &[Request]) -> Vec<f64> {
    let mut last = 0.0;
    requests
        .iter()
        .map(|r| {
            let gap = r.arrival_s - last;
            last = r.arrival_s;
            gap
        })
        .collect()
}

#[test]
fn poisson_gaps_are_the_exponential_of_one_uniform_per_request() {
    // The draws the traces of published results were made with: one uniform for the gap, then the
    // lengths, request after request.
    let sampler = WorkloadSampler::new(Workload::Mixed).unwrap();
    let mut rng = StdRng::seed_from_u64(0);
    let mut now = 0.0;
    let want: Vec<Request> = (0..50)
        .map(|_| {
            now += -(1.0 - rng.random::<f64>()).ln() / 4.0;
            let s = sampler.sample(&mut rng);
            Request { arrival_s: now, input_len: s.input_len, output_len: s.output_len }
        })
        .collect();
    assert_eq!(trace(Workload::Mixed, Arrivals::poisson(4.0), 50, 0).unwrap(), want);
}

#[test]
fn gamma_gaps_have_the_asked_mean_and_burstiness() {
    let rate = 4.0;
    for burstiness in [0.25, 0.5, 2.0, 8.0] {
        let arrivals = Arrivals { rate_per_s: rate, burstiness };
        let requests = trace(Workload::ShareGpt, arrivals, N, 5).unwrap();
        let gaps = gaps(&requests);
        assert!(gaps.iter().all(|&g| g >= 0.0 && g.is_finite()));
        let mean = gaps.iter().sum::<f64>() / N as f64;
        let sd = (gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / (N - 1) as f64).sqrt();
        let (cv, want_cv) = (sd / mean, 1.0 / burstiness.sqrt());
        // The standard error of the mean gap is cv / sqrt(N): 1.4% of it at burstiness 0.25; that
        // of the CV stays under 3% of it for these shapes.
        assert!((mean * rate - 1.0).abs() < 0.05, "burstiness {burstiness}: mean gap {mean}, expected {}", 1.0 / rate);
        assert!((cv / want_cv - 1.0).abs() < 0.08, "burstiness {burstiness}: CV {cv}, expected {want_cv}");
        // Reproducible under the seed, another seed draws other gaps, and the lengths are the
        // Poisson trace's of the same seed.
        assert_eq!(requests, trace(Workload::ShareGpt, arrivals, N, 5).unwrap());
        let other = trace(Workload::ShareGpt, arrivals, 100, 6).unwrap();
        assert_ne!(gaps[..100], self::gaps(&other)[..]);
        let poisson = trace(Workload::ShareGpt, Arrivals::poisson(rate), 100, 5).unwrap();
        assert!(poisson.iter().zip(&requests).all(|(p, g)| (p.input_len, p.output_len) == (g.input_len, g.output_len)));
    }
}

#[test]
fn random_lengths_stay_within_their_bounds_and_fill_them() {
    for (input_len, output_len, ratio, input, output) in
        [(100, 20, 0.5, 50..=150, 10..=30), (64, 3, 0.0, 64..=64, 3..=3), (8, 2, 0.9, 1..=16, 1..=4)]
    {
        let lengths = RandomLengths::new(input_len, output_len, ratio).unwrap();
        assert_eq!((lengths.input_range(), lengths.output_range()), (input.clone(), output.clone()));
        let requests = random_trace(lengths, Arrivals::poisson(10.0), N, 2).unwrap();
        let ins: Vec<usize> = requests.iter().map(|r| r.input_len).collect();
        let outs: Vec<usize> = requests.iter().map(|r| r.output_len).collect();
        for (what, drawn, bounds) in [("input", &ins, &input), ("output", &outs, &output)] {
            assert!(drawn.iter().all(|l| bounds.contains(l)), "{what} outside {bounds:?}");
            // Uniform over the bounds: both ends are drawn, and the mean is the middle.
            assert!(drawn.contains(bounds.start()) && drawn.contains(bounds.end()), "{what}: ends of {bounds:?}");
            let mean = drawn.iter().sum::<usize>() as f64 / N as f64;
            let middle = (bounds.start() + bounds.end()) as f64 / 2.0;
            assert!((mean - middle).abs() <= 0.02 * middle, "{what}: mean {mean}, middle {middle}");
        }
        assert_eq!(requests, random_trace(lengths, Arrivals::poisson(10.0), N, 2).unwrap());
    }
}

#[test]
fn a_cap_on_requests_in_flight_holds_the_others_back() {
    // Eight requests at once, four output tokens each, at most three in flight.
    let scheduler = SchedulerConfig { max_num_seqs: 16, max_num_batched_tokens: 256 };
    let config =
        EngineConfig { num_blocks: 64, block_size: 4, scheduler, max_model_len: None, schedule: Schedule::Chunked };
    let model = LlamaModel::random(&CpuBackend, &tiny_config(), 3).unwrap();
    let mut engine = Engine::new(CpuBackend, model, vec![], config).unwrap();
    let shapes: Vec<Request> = (0..8).map(|i| Request { arrival_s: 0.0, input_len: 3 + i, output_len: 4 }).collect();
    let requests = synthetic_requests(&shapes, 1..64, 1).unwrap();
    for cap in [1, 3] {
        let (times, report) = replay_requests(&mut engine, &requests, None, Some(cap), || {}).unwrap();
        assert_eq!((report.completed, report.peak_concurrency()), (8, cap), "cap {cap}");
        // The engine never held more sequences than the cap.
        let timeline = report.timeline.as_deref().unwrap();
        assert!(timeline.iter().all(|it| it.seqs <= cap), "cap {cap}: {timeline:?}");
        // Requests go in arrival order, the (cap + 1)-th once the first of the others ended.
        assert!(times.windows(2).all(|w| w[0].sent_s <= w[1].sent_s), "cap {cap}");
        let first_end = times[..cap].iter().map(|t| t.sent_s + t.end_s).fold(f64::INFINITY, f64::min);
        assert!(times[cap].sent_s >= first_end - 1e-9, "cap {cap}: {times:?}");
        // Times count from sending: no request waited for its first token behind the others.
        assert!(times[..cap].iter().all(|t| t.sent_s == 0.0));
    }
    // Without a cap, all eight run at once.
    let (_, report) = replay_requests(&mut engine, &requests, None, None, || {}).unwrap();
    assert_eq!(report.peak_concurrency(), 8);
    assert!(replay_requests(&mut engine, &requests, None, Some(0), || {}).is_err());
}
