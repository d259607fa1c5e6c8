//! `nexus bench --plot`: one hand-written SVG. On top, p95 TTFT and p95 TBT against the arrival
//! rate, a line per schedule (runs at rate `inf` have no place on that axis and show only below).
//! Then, for each schedule (or the server), the distributions of TTFT and of ITL (our TBT) as
//! CDFs, a line per rate. Below, for each schedule run in-process, the SMs of its lanes against
//! time during one run (`--plot-timeline-rate`, the highest rate by default): a rectangle per
//! iteration as tall as its budget, decode (and chunked's mixed lane) drawn up from the bottom and
//! prefill down from the top, so that iterations of two lanes that ran at once show one above the
//! other, on disjoint SMs.

use std::fmt::Write as _;

use nexus_runtime::bench::metrics::Metric;
use nexus_runtime::bench::{ReplayReport, TimelineSummary};
use nexus_runtime::engine::scheduler::Lane;

use super::{ArmRuns, Results};

const WIDTH: f64 = 960.0;
const TITLE_HEIGHT: f64 = 30.0;
const LATENCY_HEIGHT: f64 = 320.0;
const TIMELINE_HEIGHT: f64 = 230.0;
const CDF_HEIGHT: f64 = 300.0;
/// The most points of a CDF's line: a run of many requests has tens of thousands of ITLs.
const CDF_POINTS: usize = 400;
const SCHEDULE_COLORS: [&str; 8] =
    ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"];

fn lane_color(lane: Lane) -> &'static str {
    match lane {
        Lane::Mixed => "#7f7f7f",
        Lane::Prefill => "#ff7f0e",
        Lane::Decode => "#1f77b4",
    }
}

/// `text` with the characters XML reserves escaped (workload paths and model names may hold them).
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A round step for about five ticks from 0 to `max`: 1, 2 or 5 times a power of ten.
fn tick_step(max: f64) -> f64 {
    let raw = if max.is_finite() && max > 0.0 { max / 5.0 } else { 0.2 };
    let magnitude = 10f64.powf(raw.log10().floor());
    let nice = match raw / magnitude {
        r if r < 1.5 => 1.0,
        r if r < 3.5 => 2.0,
        r if r < 7.5 => 5.0,
        _ => 10.0,
    };
    nice * magnitude
}

/// `max` rounded up to a whole tick step, so that an axis ends on a tick.
fn axis_max(max: f64) -> f64 {
    let step = tick_step(max);
    (max / step).ceil().max(1.0) * step
}

/// A drawing area of the SVG with its frame; maps data to pixels.
struct Panel {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
    x_max: f64,
    y_max: f64,
}

/// How a panel is framed: title, axis labels and the ranges of its axes (from 0).
struct Frame<'a> {
    title: &'a str,
    x_label: &'a str,
    x_max: f64,
    y_label: &'a str,
    y_max: f64,
}

impl Panel {
    /// Draws `frame` (title, axes, ticks with grid lines, axis labels) in the box of `width` by
    /// `height` at (`left`, `top`), and returns the area inside its axes.
    fn draw(svg: &mut String, left: f64, top: f64, width: f64, height: f64, frame: &Frame<'_>) -> Panel {
        let panel = Panel {
            left: left + 60.0,
            top: top + 28.0,
            width: width - 80.0,
            height: height - 68.0,
            x_max: frame.x_max,
            y_max: frame.y_max,
        };
        let (x0, y0, x1, y1) = (panel.left, panel.top + panel.height, panel.left + panel.width, panel.top);
        let _ =
            writeln!(svg, "<text x=\"{x0}\" y=\"{}\" font-weight=\"bold\">{}</text>", top + 18.0, escape(frame.title));
        let x_step = tick_step(frame.x_max);
        for i in 0..=(frame.x_max / x_step + 1e-9) as usize {
            let v = i as f64 * x_step;
            let x = panel.px(v);
            let _ = writeln!(
                svg,
                "<line x1=\"{x:.1}\" y1=\"{y0}\" x2=\"{x:.1}\" y2=\"{}\" stroke=\"black\"/>\
                 <text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                y0 + 4.0,
                y0 + 16.0,
                label(v, x_step)
            );
        }
        let y_step = tick_step(frame.y_max);
        for i in 0..=(frame.y_max / y_step + 1e-9) as usize {
            let v = i as f64 * y_step;
            let y = panel.py(v);
            let _ = writeln!(
                svg,
                "<line x1=\"{x0}\" y1=\"{y:.1}\" x2=\"{x1}\" y2=\"{y:.1}\" stroke=\"#e0e0e0\"/>\
                 <text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
                x0 - 6.0,
                y + 4.0,
                label(v, y_step)
            );
        }
        let _ = writeln!(
            svg,
            "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"black\"/>\
             <line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{y1}\" stroke=\"black\"/>\n\
             <text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
             <text transform=\"translate({},{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>",
            (x0 + x1) / 2.0,
            y0 + 32.0,
            escape(frame.x_label),
            left + 16.0,
            (y0 + y1) / 2.0,
            escape(frame.y_label)
        );
        panel
    }

    fn px(&self, x: f64) -> f64 {
        self.left + x / self.x_max * self.width
    }

    fn py(&self, y: f64) -> f64 {
        self.top + self.height - y / self.y_max * self.height
    }

    /// Coloured legend entries at the panel's top right, on a white box that keeps them
    /// readable over lines and rectangles.
    fn legend(&self, svg: &mut String, entries: &[(String, &str)]) {
        self.legend_at(svg, entries, self.top + 2.0);
    }

    /// Coloured legend entries at the panel's bottom right, where a CDF never is: its lines reach
    /// the long latencies near the top.
    fn legend_bottom(&self, svg: &mut String, entries: &[(String, &str)]) {
        self.legend_at(svg, entries, self.top + self.height - 8.0 - 16.0 * entries.len() as f64);
    }

    /// The legend with its box's top at `top`.
    fn legend_at(&self, svg: &mut String, entries: &[(String, &str)], top: f64) {
        let _ = writeln!(
            svg,
            "<rect x=\"{}\" y=\"{top}\" width=\"176\" height=\"{}\" fill=\"white\" fill-opacity=\"0.85\"/>",
            self.left + self.width - 176.0,
            6.0 + 16.0 * entries.len() as f64
        );
        for (i, (name, color)) in entries.iter().enumerate() {
            let (x, y) = (self.left + self.width - 170.0, top + 12.0 + 16.0 * i as f64);
            let _ = writeln!(
                svg,
                "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"10\" fill=\"{color}\"/>\
                 <text x=\"{}\" y=\"{y}\">{}</text>",
                y - 9.0,
                x + 16.0,
                escape(name)
            );
        }
    }
}

/// A tick label with no more decimals than `step` needs.
fn label(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{v:.decimals$}")
}

/// The SVG of `results` (see the module documentation).
pub(super) fn svg(results: &Results<'_>) -> String {
    let rate = results.plan.timeline_rate();
    let timelines: Vec<(String, &ReplayReport)> = results
        .arms
        .iter()
        .filter_map(|a| {
            let (_, report) = a.runs.iter().find(|(r, report)| *r == rate && report.timeline.is_some())?;
            Some((arm_name(results, a), report))
        })
        .collect();
    let cdf_top = TITLE_HEIGHT + LATENCY_HEIGHT;
    let timeline_top = cdf_top + CDF_HEIGHT * results.arms.len() as f64;
    let height = timeline_top + TIMELINE_HEIGHT * timelines.len() as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{height}\" font-family=\"sans-serif\" \
         font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"14\">{} on {}, {} requests per rate, {}</text>\n",
        escape(&results.plan.name()),
        escape(&results.target),
        results.plan.num_requests,
        escape(&results.plan.load_shape())
    );
    latency_panel(&mut svg, results, 0.0, "p95 TTFT", |r| r.ttft.p95 * 1e3);
    latency_panel(&mut svg, results, WIDTH / 2.0, "p95 TBT", |r| r.tbt.p95 * 1e3);
    for (i, arms) in results.arms.iter().enumerate() {
        let top = cdf_top + i as f64 * CDF_HEIGHT;
        let name = arm_name(results, arms);
        cdf_panel(&mut svg, 0.0, top, &format!("{name}: TTFT distribution"), "TTFT", Metric::Ttft, &arms.runs);
        cdf_panel(
            &mut svg,
            WIDTH / 2.0,
            top,
            &format!("{name}: ITL (TBT) distribution"),
            "ITL",
            Metric::Itl,
            &arms.runs,
        );
    }
    for (i, (name, report)) in timelines.into_iter().enumerate() {
        let top = timeline_top + i as f64 * TIMELINE_HEIGHT;
        timeline_panel(&mut svg, top, &name, rate, report, results.sm_count.unwrap_or(1));
    }
    svg.push_str("</svg>\n");
    svg
}

/// What the plot calls an arm: its schedule, or what `--url` benchmarked.
fn arm_name(results: &Results<'_>, arm: &ArmRuns) -> String {
    arm.arm.name.clone().unwrap_or_else(|| results.target.clone())
}

/// `metric` (ms) of every run against its rate, a line per arm, in the panel at `left`.
fn latency_panel(svg: &mut String, results: &Results<'_>, left: f64, name: &str, metric: fn(&ReplayReport) -> f64) {
    let lines: Vec<(String, Vec<(f64, f64)>)> = results
        .arms
        .iter()
        .map(|a| {
            // A rate whose requests all failed has no latency to draw, nor has `inf` a place.
            let mut points: Vec<(f64, f64)> = a
                .runs
                .iter()
                .map(|(rate, r)| (*rate, metric(r)))
                .filter(|p| p.0.is_finite() && p.1.is_finite())
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            (arm_name(results, a), points)
        })
        .collect();
    let max_rate = results.plan.args.rate.iter().copied().filter(|r| r.is_finite()).fold(0.0, f64::max);
    let max_ms = lines.iter().flat_map(|l| l.1.iter().map(|p| p.1)).fold(0.0, f64::max);
    let at_once = results.plan.args.rate.iter().any(|r| r.is_infinite());
    let frame = Frame {
        title: &format!("{name} against the arrival rate{}", if at_once { " (inf: see the CDFs)" } else { "" }),
        x_label: "arrival rate (req/s)",
        x_max: axis_max(max_rate),
        y_label: &format!("{name} (ms)"),
        y_max: axis_max(max_ms),
    };
    let panel = Panel::draw(svg, left, TITLE_HEIGHT, WIDTH / 2.0, LATENCY_HEIGHT, &frame);
    let mut legend = Vec::new();
    for (i, (line, points)) in lines.into_iter().enumerate() {
        let color = SCHEDULE_COLORS[i % SCHEDULE_COLORS.len()];
        polyline(svg, &panel, &points, color);
        for &(x, y) in &points {
            let _ =
                writeln!(svg, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>", panel.px(x), panel.py(y));
        }
        legend.push((line, color));
    }
    panel.legend(svg, &legend);
}

/// A line through `points` (data coordinates) in `panel`.
fn polyline(svg: &mut String, panel: &Panel, points: &[(f64, f64)], color: &str) {
    let coords: Vec<String> = points.iter().map(|&(x, y)| format!("{:.1},{:.1}", panel.px(x), panel.py(y))).collect();
    let _ = writeln!(
        svg,
        "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
        coords.join(" ")
    );
}

/// The empirical CDF of `values` in milliseconds, as at most [`CDF_POINTS`] + 1 points (value,
/// share of the values at or below it), ascending; every value's point when there are few.
fn cdf_points(values: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted: Vec<f64> = values.iter().map(|v| v * 1e3).collect();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let steps = CDF_POINTS.min(n - 1);
    // Evenly spaced ranks from the first to the last, so that both ends are drawn.
    let ranks = (0..=steps).map(|k| (k * (n - 1)).checked_div(steps).unwrap_or(0));
    ranks.map(|i| (sorted[i], (i + 1) as f64 / n as f64)).collect()
}

/// The CDF of `metric` in each of `runs`, a line per rate, in the panel at (`left`, `top`). The
/// x axis ends at the largest p99 of the runs, so that one slow outlier does not squash every
/// line; longer values run along its right edge.
fn cdf_panel(
    svg: &mut String,
    left: f64,
    top: f64,
    title: &str,
    name: &str,
    metric: Metric,
    runs: &[(f64, ReplayReport)],
) {
    let lines: Vec<(f64, Vec<(f64, f64)>)> =
        runs.iter().map(|(rate, r)| (*rate, cdf_points(&r.samples(metric)))).collect();
    let p99 = |points: &[(f64, f64)]| points.iter().find(|p| p.1 >= 0.99).map_or(0.0, |p| p.0);
    let x_max = axis_max(lines.iter().map(|l| p99(&l.1)).fold(0.0, f64::max));
    let frame = Frame {
        title,
        x_label: &format!("{name} (ms; longer at the right edge)"),
        x_max,
        y_label: "share of the values at or below",
        y_max: 1.0,
    };
    let panel = Panel::draw(svg, left, top, WIDTH / 2.0, CDF_HEIGHT, &frame);
    let mut legend = Vec::new();
    for (i, (rate, points)) in lines.into_iter().enumerate() {
        let color = SCHEDULE_COLORS[i % SCHEDULE_COLORS.len()];
        let clamped: Vec<(f64, f64)> = points.iter().map(|&(x, y)| (x.min(x_max), y)).collect();
        polyline(svg, &panel, &clamped, color);
        legend.push((format!("{rate} req/s"), color));
    }
    panel.legend_bottom(svg, &legend);
}

/// The SMs of each lane against time during `report`'s run, in the panel at `top`.
fn timeline_panel(svg: &mut String, top: f64, name: &str, rate: f64, report: &ReplayReport, sm_count: u32) {
    let timeline = report.timeline.as_deref().unwrap_or_default();
    let overlap = TimelineSummary::of(timeline).map_or(f64::NAN, |s| s.overlap_fraction());
    let overlap = if overlap.is_finite() {
        format!("; two lanes in flight {:.0}% of the busy time", overlap * 1e2)
    } else {
        String::new()
    };
    let end = timeline.iter().map(|it| it.end_s).fold(0.0, f64::max);
    let sms = f64::from(sm_count);
    let frame = Frame {
        title: &format!("{name} at {rate} req/s: each lane's SMs per iteration{overlap}"),
        x_label: "time since the first arrival (s)",
        x_max: axis_max(end),
        y_label: "SMs",
        y_max: sms,
    };
    let panel = Panel::draw(svg, 0.0, top, WIDTH, TIMELINE_HEIGHT, &frame);
    let mut lanes: Vec<Lane> = timeline.iter().map(|it| it.lane).collect();
    lanes.sort();
    lanes.dedup();
    // Back-to-back iterations of a lane at one budget closer than half a pixel make one
    // rectangle: at a GPU's pace thousands of them share a pixel, and drawn one by one their
    // anti-aliased edges stripe the band.
    let half_pixel_s = 0.5 * panel.x_max / panel.width;
    let mut rects: Vec<(Lane, u32, f64, f64)> = Vec::new();
    for &lane in &lanes {
        let mut its: Vec<_> = timeline.iter().filter(|it| it.lane == lane).collect();
        its.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
        for it in its {
            match rects.last_mut() {
                Some(last) if last.0 == lane && last.1 == it.budget && it.start_s - last.3 < half_pixel_s => {
                    last.3 = last.3.max(it.end_s);
                }
                _ => rects.push((lane, it.budget, it.start_s.max(0.0), it.end_s)),
            }
        }
    }
    for (lane, budget, start, end) in rects {
        // Prefill hangs from the top, every other lane stands on the bottom.
        let budget = f64::from(budget).min(sms);
        let (low, high) = if lane == Lane::Prefill { (sms - budget, sms) } else { (0.0, budget) };
        let _ = writeln!(
            svg,
            "<rect x=\"{:.2}\" y=\"{:.1}\" width=\"{:.2}\" height=\"{:.1}\" fill=\"{}\"/>",
            panel.px(start),
            panel.py(high),
            (panel.px(end) - panel.px(start)).max(0.0),
            panel.py(low) - panel.py(high),
            lane_color(lane)
        );
    }
    // The legend goes in the title's row, clear of the rectangles.
    for (i, &lane) in lanes.iter().enumerate() {
        let x = WIDTH - 20.0 - 110.0 * (lanes.len() - i) as f64;
        let _ = writeln!(
            svg,
            "<rect x=\"{x}\" y=\"{}\" width=\"12\" height=\"10\" fill=\"{}\"/>\
             <text x=\"{}\" y=\"{}\">{} lane</text>",
            top + 9.0,
            lane_color(lane),
            x + 16.0,
            top + 18.0,
            lane.name()
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use nexus_runtime::bench::{RequestResult, RequestTimes, TimelineIteration};
    use nexus_runtime::model::backend::StepKind;

    use super::*;

    #[test]
    fn axes_end_on_round_ticks() {
        assert_eq!((tick_step(132.0), tick_step(8.0), tick_step(0.3)), (20.0, 2.0, 0.05));
        assert_eq!((axis_max(13.1), axis_max(0.0), axis_max(40.0)), (14.0, 0.2, 40.0));
        assert_eq!((label(0.25, 0.05), label(120.0, 20.0)), ("0.25".to_owned(), "120".to_owned()));
        assert_eq!(escape("a<b & \"c\">"), "a&lt;b &amp; &quot;c&quot;&gt;");
    }

    #[test]
    fn cdfs_keep_both_ends_and_at_most_their_points() {
        assert!(cdf_points(&[]).is_empty());
        assert_eq!(cdf_points(&[0.003, 0.001, 0.002]), [(1.0, 1.0 / 3.0), (2.0, 2.0 / 3.0), (3.0, 1.0)]);
        let many: Vec<f64> = (0..10_000).map(|i| f64::from(i) / 1024.0).collect();
        let points = cdf_points(&many);
        assert_eq!(points.len(), CDF_POINTS + 1);
        assert_eq!((points[0], points[CDF_POINTS]), ((0.0, 1e-4), (9999.0 / 1024.0 * 1e3, 1.0)));
        assert!(points.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 < w[1].1));
    }

    #[test]
    fn a_timeline_draws_back_to_back_iterations_as_one_band_and_prefill_from_the_top() {
        let it = |lane, budget, start_s: f64, end_s: f64| TimelineIteration {
            lane,
            kind: if lane == Lane::Decode { StepKind::Decode } else { StepKind::Prefill },
            budget,
            seqs: 1,
            tokens: 1,
            start_s,
            end_s,
            host_s: 0.0,
            predicted_s: None,
        };
        let times = RequestTimes { sent_s: 0.0, tokens: vec![0.1], end_s: 0.1, output_tokens: 1, prompt_tokens: None };
        let request = RequestResult { prompt_len: Some(1), requested_len: 1, outcome: Ok(times) };
        let mut report = ReplayReport::new(vec![request], 1.0, None).unwrap();
        // Decode alone, then beside a prefill (touching: one band each), then alone again after
        // a gap that shows.
        report.timeline = Some(vec![
            it(Lane::Decode, 132, 0.0, 1.0),
            it(Lane::Decode, 68, 1.0, 2.0),
            it(Lane::Prefill, 64, 1.0, 4.0),
            it(Lane::Decode, 68, 2.0, 4.0),
            it(Lane::Decode, 132, 6.0, 8.0),
        ]);
        let mut svg = String::new();
        timeline_panel(&mut svg, 0.0, "nexus 64/68", 4.0, &report, 132);
        let bands: Vec<&str> = svg.lines().filter(|l| l.starts_with("<rect") && !l.contains("<text")).collect();
        assert_eq!(bands.len(), 4, "{bands:#?}");
        assert!(svg.contains("two lanes in flight 50% of the busy time"), "{svg}");
        // The prefill band hangs from the top of the SM axis, 64 of its 132 SMs tall.
        let prefill = bands.iter().find(|l| l.contains(lane_color(Lane::Prefill))).unwrap();
        let panel_height = TIMELINE_HEIGHT - 68.0;
        assert!(prefill.contains(&format!("y=\"{:.1}\"", 28.0)), "{prefill}");
        assert!(prefill.contains(&format!("height=\"{:.1}\"", 64.0 / 132.0 * panel_height)), "{prefill}");
    }
}
