//! Figures of the eval results, drawn with `plotters` and written as SVG and PNG.
//!
//! - `plots/<metric>.svg|png`: one panel per task; x = the budget point on a log axis, with a
//!   tick at each point labelled as in summary.md; one line per method, each point with its 95%
//!   bootstrap interval over contexts as an error bar (methods are moved apart a little along x,
//!   by a small factor on the log axis, so that the bars do not hide one another); the full cache
//!   is a dashed black reference line with its interval as a grey band. `kl`, `mass_err`,
//!   `kv_bytes` and `compress_s` have a log y axis (values ≤ 0 are left out there); `kv_bytes` is
//!   drawn in MiB.
//! - `plots/pareto.svg|png`: quality against the KV bytes actually held (MiB, log x), mean over
//!   tasks: answer log-ppl in one panel, accuracy in the other, one polyline per method through
//!   its budget points and the full cache as a black star. [`pareto_markdown`] is the same data
//!   as a table (written as `plots/pareto.md`).
//!
//! Every method keeps one colour ([`color`]) and one marker shape in every figure. Text is drawn
//! with DejaVu Sans embedded in the binary (`data/fonts/`, registered in plotters' ab_glyph font
//! table), so PNGs look the same on a machine with no fonts and nothing is loaded at run time;
//! the SVGs name the `sans-serif` family and leave the glyphs to the viewer. A PNG has twice the
//! pixel size of its SVG.
//!
//! This module turns result rows into figures (which data, titles, units); `render` draws them.

use std::path::Path;

use super::metrics::{fmt_point, fmt_ratio, ResultRow, MEAN_TASK};
use crate::error::{Error, Result};

mod render;

pub use render::Figure;
use render::{Panel, Pt, Reference, Series};

const MIB: f64 = 1024.0 * 1024.0;

/// Line colour of a method (fixed, so every plot uses the same).
pub fn color(method: &str) -> [u8; 3] {
    match method {
        "am-omp" => [214, 39, 40],
        "am-highest" => [255, 127, 14],
        "baseline" => [140, 86, 75],
        "qfilters" => [31, 119, 180],
        "streaming-llm" => [44, 160, 44],
        "h2o" => [148, 103, 189],
        "snapkv" => [227, 119, 194],
        "pyramidkv" => [127, 127, 127],
        "tova" => [188, 189, 34],
        "knorm" => [23, 190, 207],
        "expected-attention" => [120, 150, 230],
        "random" => [190, 170, 120],
        "full" => [0, 0, 0],
        _ => {
            let h = method.bytes().fold(7u32, |a, b| a.wrapping_mul(31).wrapping_add(b as u32));
            [(h & 0x7f) as u8 + 60, ((h >> 8) & 0x7f) as u8 + 60, ((h >> 16) & 0x7f) as u8 + 60]
        }
    }
}

/// Where a budget point sits on the log x axis: the ratio R, the ratio 1/(1 − r) a kvpress
/// compression ratio r stands for, or the rows N.
fn x_of(form: &str, v: f64) -> f64 {
    if form == "compression_ratio" {
        1.0 / (1.0 - v)
    } else {
        v
    }
}

/// Metrics drawn on a log y axis.
fn log_y(metric: &str) -> bool {
    matches!(metric, "kl" | "mass_err" | "kv_bytes" | "compress_s")
}

/// A metric's figure title, y-axis title (with its unit) and the factor from its stored unit to
/// the drawn one.
fn metric_text(metric: &str) -> (String, String, f64) {
    let (t, y, k) = match metric {
        "accuracy" => ("Accuracy: greedy answer reproduces a reference (higher is better)", "accuracy", 1.0),
        "answer_logppl" => ("Log-perplexity of the full-cache answers (lower is better)", "answer log-ppl (nats/token)", 1.0),
        "kl" => ("Next-token KL(full ‖ compressed) (lower is better)", "KL (nats)", 1.0),
        "attn_rel_l2" => ("Per-head attention output error ‖o − ô‖ / ‖o‖ (lower is better)", "relative L2 error", 1.0),
        "mass_err" => ("Per-head attention mass error |exp(lse′ − lse) − 1| (lower is better)", "mass error", 1.0),
        "kv_bytes" => ("KV cache held after compression", "KV cache (MiB)", 1.0 / MIB),
        "compress_s" => ("Compression time per context", "time (s)", 1.0),
        m => (m, m, 1.0),
    };
    (t.to_string(), y.to_string(), k)
}

/// Mean over the rows `keep` picks of value, ci_low and ci_high (NaN bounds when any row has
/// none); None when it picks no row with a finite value.
fn mean_of(rows: &[ResultRow], keep: impl Fn(&ResultRow) -> bool) -> Option<Pt> {
    let picked: Vec<&ResultRow> = rows.iter().filter(|r| keep(r) && r.value.is_finite()).collect();
    if picked.is_empty() {
        return None;
    }
    let n = picked.len() as f64;
    let mean = |f: &dyn Fn(&ResultRow) -> f64| picked.iter().map(|r| f(r)).sum::<f64>() / n;
    Some(Pt { x: f64::NAN, y: mean(&|r| r.value), lo: mean(&|r| r.ci_low), hi: mean(&|r| r.ci_high) })
}

/// The figure of one metric: a panel per task, x = the budget point (log), a line per method
/// with error bars, the full cache as a dashed reference line.
pub fn metric_figure(rows: &[ResultRow], metric: &str, methods: &[String], tasks: &[String], form: &str) -> Figure {
    let (mut title, y_desc, k) = metric_text(metric);
    let mine: Vec<&ResultRow> = rows.iter().filter(|r| r.metric == metric).collect();
    if mine.iter().any(|r| r.ci_low.is_finite() && r.ci_high > r.ci_low) {
        title.push_str(" — bars: 95% intervals over contexts");
    }
    let x_desc = match form {
        "compression_ratio" => "kvpress compression ratio r (log scale of 1/(1 − r))",
        "budget" => "rows kept per KV head (log scale)",
        _ => "compression ratio (log scale)",
    };
    let scaled = |r: &ResultRow| Pt { x: x_of(form, r.ratio), y: k * r.value, lo: k * r.ci_low, hi: k * r.ci_high };
    let mut panels = Vec::new();
    for task in tasks.iter().filter(|t| mine.iter().any(|r| r.task == **t)) {
        let here: Vec<&ResultRow> = mine.iter().copied().filter(|r| r.task == *task).collect();
        let mut points: Vec<f64> = here.iter().map(|r| r.ratio).filter(|r| x_of(form, *r) > 0.0).collect();
        points.sort_by(f64::total_cmp);
        points.dedup();
        let x_ticks = points.iter().map(|&r| (x_of(form, r), fmt_point(form, r).replace(" rows", ""))).collect();
        let series = methods
            .iter()
            .filter(|m| *m != "full")
            .map(|m| Series { method: m.clone(), pts: here.iter().filter(|r| r.method == *m && r.value.is_finite()).map(|r| scaled(r)).collect() })
            .filter(|se| !se.pts.is_empty())
            .collect();
        let reference = methods
            .iter()
            .any(|m| m == "full")
            .then(|| mean_of(rows, |r| r.method == "full" && r.task == *task && r.metric == metric))
            .flatten()
            .filter(|q| !log_y(metric) || q.y > 0.0)
            .map(|q| Reference::Line(Pt { y: k * q.y, lo: k * q.lo, hi: k * q.hi, ..q }));
        panels.push(Panel { title: task.clone(), x_desc: x_desc.into(), y_desc: y_desc.clone(), x_ticks: Some(x_ticks), log_y: log_y(metric), unit_y: metric == "accuracy", series, reference });
    }
    // The full cache is in the legend where it is drawn (not at KL 0 on a log axis).
    let legend = methods.iter().filter(|m| if *m == "full" { panels.iter().any(|p| p.reference.is_some()) } else { panels.iter().any(|p| p.series.iter().any(|se| se.method == **m)) }).cloned().collect();
    Figure { title, panels, legend, full_star: false }
}

/// The rows a mean over tasks is read from: eval's [`MEAN_TASK`] rows when present (their
/// intervals are the bootstrap intervals of the mean itself), else every task's rows, averaged.
fn over_tasks(rows: &[ResultRow]) -> std::borrow::Cow<'_, [ResultRow]> {
    if rows.iter().any(|r| r.task == MEAN_TASK) {
        std::borrow::Cow::Owned(rows.iter().filter(|r| r.task == MEAN_TASK).cloned().collect())
    } else {
        std::borrow::Cow::Borrowed(rows)
    }
}

/// One Pareto point of a method: KV MiB held and a metric, both means over tasks, at one budget
/// point (every point for `full`, whose rows are the same cache at each).
fn pareto_point(rows: &[ResultRow], method: &str, ratio: Option<f64>, metric: &str) -> Option<(f64, Pt)> {
    let at = |r: &ResultRow| r.method == method && ratio.is_none_or(|x| r.ratio == x);
    let bytes = mean_of(rows, |r| at(r) && r.metric == "kv_bytes")?;
    let q = mean_of(rows, |r| at(r) && r.metric == metric)?;
    Some((bytes.y / MIB, q))
}

/// The budget points a method has rows at, in order.
fn points_of(rows: &[ResultRow], method: &str) -> Vec<f64> {
    let mut v: Vec<f64> = rows.iter().filter(|r| r.method == method).map(|r| r.ratio).collect();
    v.sort_by(f64::total_cmp);
    v.dedup();
    v
}

/// The Pareto figure: x = KV MiB held (log), y = answer log-ppl and accuracy (one panel each,
/// accuracy only when it has rows), means over tasks; one polyline per method through its budget
/// points and the full cache as a black star.
///
/// Means over tasks come from eval's [`MEAN_TASK`] rows (bootstrap intervals of the mean); rows
/// without them (a hand-made list) are averaged, and the interval is then drawn as the mean of
/// the tasks' interval ends — not the interval of the mean, but the same order of width.
pub fn pareto_figure(rows: &[ResultRow], methods: &[String]) -> Figure {
    let rows = &over_tasks(rows)[..];
    let mut panels = Vec::new();
    for (metric, title, y_desc) in [("answer_logppl", "Answer log-ppl against memory", "answer log-ppl (nats/token), lower is better"), ("accuracy", "Accuracy against memory", "accuracy, higher is better")] {
        if !rows.iter().any(|r| r.metric == metric) {
            continue;
        }
        let series = methods
            .iter()
            .filter(|m| *m != "full")
            .map(|m| {
                let pts = points_of(rows, m).into_iter().filter_map(|ratio| pareto_point(rows, m, Some(ratio), metric)).map(|(x, q)| Pt { x, ..q }).collect();
                Series { method: m.clone(), pts }
            })
            .filter(|se| !se.pts.is_empty())
            .collect();
        let reference = methods.iter().any(|m| m == "full").then(|| pareto_point(rows, "full", None, metric)).flatten().map(|(x, q)| Reference::Star(Pt { x, ..q }));
        panels.push(Panel { title: title.into(), x_desc: "KV cache held (MiB, log scale)".into(), y_desc: y_desc.into(), x_ticks: None, log_y: false, unit_y: metric == "accuracy", series, reference });
    }
    let legend = methods.iter().filter(|m| if *m == "full" { panels.iter().any(|p| p.reference.is_some()) } else { panels.iter().any(|p| p.series.iter().any(|se| se.method == **m)) }).cloned().collect();
    let bars = rows.iter().any(|r| (r.metric == "answer_logppl" || r.metric == "accuracy") && r.ci_low.is_finite() && r.ci_high > r.ci_low);
    let title = format!("Quality against the KV memory held (mean over tasks{})", if bars { "; bars: 95% intervals" } else { "" });
    Figure { title, panels, legend, full_star: true }
}

/// The Pareto data as a markdown table: one row per (method, budget point), methods in the given
/// order and each method's points by KV bytes held (the full cache once: its rows are the same
/// cache at every point). Columns: method, point (the budget value as stored), KV MiB, answer
/// log-ppl and accuracy, each a mean over tasks (as in [`pareto_figure`]); a mean with a finite
/// interval is written `1.234 [1.100, 1.370]`.
pub fn pareto_markdown(rows: &[ResultRow], methods: &[String]) -> String {
    let rows = &over_tasks(rows)[..];
    let mut s = String::from("| method | point | KV MiB | answer log-ppl | accuracy |\n|---|---:|---:|---:|---:|\n");
    let cell = |q: Option<Pt>, prec: usize| match q {
        None => "–".to_string(),
        Some(q) if q.lo.is_finite() && q.hi.is_finite() => format!("{:.prec$} [{:.prec$}, {:.prec$}]", q.y, q.lo, q.hi),
        Some(q) => format!("{:.prec$}", q.y),
    };
    for m in methods {
        let points: Vec<Option<f64>> = if m == "full" { vec![None] } else { points_of(rows, m).into_iter().map(Some).collect() };
        let mut lines: Vec<(f64, String)> = Vec::new();
        for p in points {
            let at = |r: &ResultRow| r.method == *m && p.is_none_or(|x| r.ratio == x);
            let metric = |name: &str| mean_of(rows, |r| at(r) && r.metric == name);
            let bytes = metric("kv_bytes").map(|q| q.y / MIB);
            let (logppl, acc) = (metric("answer_logppl"), metric("accuracy"));
            if bytes.is_none() && logppl.is_none() && acc.is_none() {
                continue;
            }
            let point = p.map_or("–".to_string(), fmt_ratio);
            let mib = bytes.map_or("–".to_string(), |b| format!("{b:.3}"));
            lines.push((bytes.unwrap_or(f64::INFINITY), format!("| {m} | {point} | {mib} | {} | {} |\n", cell(logppl, 3), cell(acc, 2))));
        }
        lines.sort_by(|a, b| a.0.total_cmp(&b.0));
        s.extend(lines.into_iter().map(|l| l.1));
    }
    s
}

fn write_figure(fig: &Figure, dir: &Path, stem: &str) -> Result<()> {
    let svg = dir.join(format!("{stem}.svg"));
    std::fs::write(&svg, fig.svg()?).map_err(|e| Error::io(&svg, e))?;
    fig.write_png(&dir.join(format!("{stem}.png")))
}

/// Write `plots/<metric>.svg` and `.png` for every metric that has rows, and, when there are
/// `kv_bytes` and `answer_logppl` rows, `plots/pareto.svg`, `.png` and `.md` (the
/// [`pareto_markdown`] table). Returns the metrics written.
pub fn write_plots(dir: &Path, rows: &[ResultRow], methods: &[String], tasks: &[String], form: &str) -> Result<Vec<String>> {
    let pdir = dir.join("plots");
    std::fs::create_dir_all(&pdir).map_err(|e| Error::io(&pdir, e))?;
    let mut written = Vec::new();
    for metric in super::metrics::METRICS {
        if !rows.iter().any(|r| r.metric == *metric) {
            continue;
        }
        write_figure(&metric_figure(rows, metric, methods, tasks, form), &pdir, metric)?;
        written.push(metric.to_string());
    }
    let has = |m: &str| rows.iter().any(|r| r.metric == m);
    if has("kv_bytes") && has("answer_logppl") {
        write_figure(&pareto_figure(rows, methods), &pdir, "pareto")?;
        super::metrics::write(&pdir, "pareto.md", &pareto_markdown(rows, methods))?;
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two methods and the full cache, two tasks, three ratios, four metrics, with intervals.
    fn synthetic() -> (Vec<ResultRow>, Vec<String>, Vec<String>) {
        let methods: Vec<String> = ["am-omp", "snapkv", "full"].iter().map(|s| s.to_string()).collect();
        let tasks: Vec<String> = ["passkey", "qa"].iter().map(|s| s.to_string()).collect();
        let mut rows = Vec::new();
        let row = |m: &str, ratio: f64, t: &str, metric: &str, value: f64, half: f64| ResultRow {
            method: m.into(),
            ratio,
            task: t.into(),
            metric: metric.into(),
            value,
            n: 4,
            ci_low: value - half,
            ci_high: value + half,
        };
        for (mi, m) in methods.iter().enumerate() {
            for ratio in [2.0f64, 4.0, 8.0] {
                for (ti, t) in tasks.iter().enumerate() {
                    let full = m == "full";
                    let r = if full { 1.0 } else { ratio };
                    let worse = (r.ln() * (1.0 + mi as f64)) * 0.3 + 0.1 * ti as f64;
                    rows.push(row(m, ratio, t, "answer_logppl", 1.0 + worse, 0.05 + 0.02 * ti as f64));
                    rows.push(row(m, ratio, t, "accuracy", (0.95 - 0.4 * worse).clamp(0.0, 1.0), 0.1));
                    rows.push(row(m, ratio, t, "kl", if full { 0.0 } else { 0.02 * worse }, if full { 0.0 } else { 0.004 }));
                    rows.push(row(m, ratio, t, "kv_bytes", 4.0 * MIB / r + 0.1 * MIB, 0.0));
                }
            }
        }
        // One exact interval to read back: am-omp at 2×, passkey 1.0 [0.9, 1.1] and qa 1.5 [1.3, 1.7].
        for r in rows.iter_mut().filter(|r| r.method == "am-omp" && r.ratio == 2.0 && r.metric == "answer_logppl") {
            (r.value, r.ci_low, r.ci_high) = if r.task == "passkey" { (1.0, 0.9, 1.1) } else { (1.5, 1.3, 1.7) };
        }
        (rows, methods, tasks)
    }

    fn png_size(bytes: &[u8]) -> (u32, u32) {
        assert_eq!(&bytes[..8], &[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]);
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let reader = decoder.read_info().expect("a PNG that decodes");
        let info = reader.info();
        (info.width, info.height)
    }

    #[test]
    fn figures_render_as_svg_and_png() {
        let (rows, methods, tasks) = synthetic();
        let dir = tempfile::tempdir().unwrap();
        let written = write_plots(dir.path(), &rows, &methods, &tasks, "ratio").unwrap();
        assert_eq!(written, ["accuracy", "answer_logppl", "kl", "kv_bytes"]);
        for stem in ["accuracy", "answer_logppl", "kl", "kv_bytes", "pareto"] {
            let svg = std::fs::read_to_string(dir.path().join(format!("plots/{stem}.svg"))).unwrap();
            assert!(svg.starts_with("<svg") && svg.contains("am-omp") && svg.contains("snapkv"), "{stem}.svg");
            // The full cache's KL is 0: not drawable on the log axis, so not in that legend.
            assert_eq!(svg.contains("full cache"), stem != "kl", "{stem}.svg");
            let fig = if stem == "pareto" { pareto_figure(&rows, &methods) } else { metric_figure(&rows, stem, &methods, &tasks, "ratio") };
            let (w, h) = fig.size();
            assert_eq!(png_size(&std::fs::read(dir.path().join(format!("plots/{stem}.png"))).unwrap()), (2 * w, 2 * h), "{stem}.png");
        }
        // Panel titles and budget-point ticks.
        let svg = std::fs::read_to_string(dir.path().join("plots/answer_logppl.svg")).unwrap();
        assert!(svg.contains("passkey") && svg.contains("qa") && svg.contains("4×"), "{svg}");
        let md = std::fs::read_to_string(dir.path().join("plots/pareto.md")).unwrap();
        assert_eq!(md, pareto_markdown(&rows, &methods));
    }

    #[test]
    fn other_budget_forms_and_missing_intervals_render() {
        let (mut rows, methods, tasks) = synthetic();
        for r in &mut rows {
            (r.ci_low, r.ci_high) = (f64::NAN, f64::NAN);
        }
        for form in ["compression_ratio", "budget"] {
            let rows: Vec<ResultRow> = rows.iter().map(|r| ResultRow { ratio: if form == "budget" { 64.0 / r.ratio } else { 1.0 - 1.0 / r.ratio }, ..r.clone() }).collect();
            let svg = metric_figure(&rows, "kl", &methods, &tasks, form).svg().unwrap();
            assert!(svg.contains(if form == "budget" { "\n16\n" } else { "r=0.5" }), "{form}");
        }
        assert!(!pareto_markdown(&rows, &methods).contains('['));
    }

    #[test]
    fn sparse_results_still_render() {
        let (rows, methods, tasks) = synthetic();
        let dir = tempfile::tempdir().unwrap();
        // No rows: nothing written, no Pareto figure.
        assert!(write_plots(dir.path(), &[], &methods, &tasks, "ratio").unwrap().is_empty());
        assert!(!dir.path().join("plots/pareto.svg").exists());
        // One budget point of one method; only the full cache; values a log axis cannot show.
        let one: Vec<ResultRow> = rows.iter().filter(|r| r.ratio == 4.0 && r.method != "snapkv").cloned().collect();
        let full: Vec<ResultRow> = rows.iter().filter(|r| r.method == "full").cloned().collect();
        let zeros: Vec<ResultRow> = rows.iter().map(|r| ResultRow { value: 0.0, ci_low: -1.0, ci_high: 1.0, ..r.clone() }).collect();
        for (name, rows) in [("one", one), ("full", full), ("zeros", zeros)] {
            assert_eq!(write_plots(&dir.path().join(name), &rows, &methods, &tasks, "ratio").unwrap().len(), 4, "{name}");
            assert!(dir.path().join(name).join("plots/pareto.png").exists(), "{name}");
        }
    }

    #[test]
    fn pareto_markdown_has_means_and_intervals() {
        let (rows, methods, _) = synthetic();
        let md = pareto_markdown(&rows, &methods);
        let lines: Vec<&str> = md.lines().collect();
        assert_eq!(lines[0], "| method | point | KV MiB | answer log-ppl | accuracy |");
        // 3 points each for two methods, the full cache once.
        assert_eq!(lines.len(), 2 + 3 + 3 + 1, "{md}");
        // am-omp at 2×: mean 1.25 over the tasks, interval [mean of lows, mean of highs].
        let am2 = lines.iter().find(|l| l.starts_with("| am-omp | 2 |")).unwrap();
        assert!(am2.contains("| 2.100 | 1.250 [1.100, 1.400] |"), "{am2}");
        // Sorted by bytes within a method: 8× (least) first.
        assert!(lines[2].starts_with("| am-omp | 8 |"), "{md}");
        assert!(lines[8].starts_with("| full | – | 4.100 |"), "{md}");
    }
}
