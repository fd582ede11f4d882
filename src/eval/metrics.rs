//! Measures and result files.
//!
//! | metric | definition | per |
//! |---|---|---|
//! | `accuracy` | 1 if greedy decoding after the question and answer prefix reproduces one of the reference answers (its tokens, as the tokenizer writes prefix + " " + answer), else 0. Computed from one teacher-forced pass: greedy output starts with the reference iff each reference token is the argmax where it is predicted. | question |
//! | `answer_logppl` | mean NLL (nats/token) under the compressed cache of the answer the model gives with the full cache (greedy, after the prefix) — AM spec §14 | question |
//! | `kl` | mean over the continuation's positions (question, prefix and full-cache answer, teacher-forced) of KL(p_full ‖ p_compressed) of the next-token distribution, nats | question |
//! | `attn_rel_l2` | per (layer, KV head), mean over test queries of ‖o − ô‖/‖o‖ on the compressed span (AM spec §14), averaged over heads. Test queries: the continuation's queries under the full cache | sample |
//! | `mass_err` | the same for \|exp(lse_c − lse) − 1\| | sample |
//! | `kv_bytes` | bytes the whole cache holds after compression (keys, values, positions, bias) | sample |
//! | `compress_s` | wall time of the compression: scoring (or AM's reference-query pass and fit), selection and installation | sample |

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::compact::{CompactedHead, HeadInput};
use crate::error::{Error, Result};

/// Every metric name, in report order.
pub const METRICS: &[&str] = &["accuracy", "answer_logppl", "kl", "attn_rel_l2", "mass_err", "kv_bytes", "compress_s"];

/// One measurement (one question or one sample).
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Method name (`full` for the uncompressed cache).
    pub method: String,
    /// Compression ratio (article rows kept per head = ⌊T/ratio⌋).
    pub ratio: f64,
    /// Task name.
    pub task: String,
    /// Sample id ([`Sample::id`](super::tasks::Sample::id)).
    pub sample: String,
    /// One of [`METRICS`].
    pub metric: &'static str,
    /// The measurement, in the metric's unit (see the module docs).
    pub value: f64,
}

/// One aggregated row of results.json / results.csv.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ResultRow {
    /// Method name.
    pub method: String,
    /// Compression ratio.
    pub ratio: f64,
    /// Task name.
    pub task: String,
    /// One of [`METRICS`].
    pub metric: String,
    /// Mean of the finite record values.
    pub value: f64,
    /// Records averaged (non-finite values are skipped).
    pub n: usize,
    /// Lower end of the 95% bootstrap interval of `value` over contexts (NaN when it has fewer
    /// than two contexts).
    pub ci_low: f64,
    /// Upper end of the same interval.
    pub ci_high: f64,
}

/// The original span's attention for a fixed set of test queries, computed once per sample so
/// that each compressed head only costs its own (few) rows: o [m, d] and lse \[m\], in f64.
pub struct HeadRef {
    /// Head dimension d.
    pub d: usize,
    /// Attention output of each test query over the original span, row-major.
    pub o: Vec<f64>,   // [m, d]
    /// Log-sum-exp of each test query's logits over the span (−inf with no rows).
    pub lse: Vec<f64>, // [m]
}

/// Attention output (into `out` [d]) and log-sum-exp of q over rows (keys, values, bias), f64;
/// no rows gives lse = −inf (the same rule as `compact::evaluate_head`).
fn attend(q: &[f32], keys: &[f32], values: &[f32], bias: Option<&[f32]>, scale: f64, out: &mut [f64], logits: &mut Vec<f64>) -> f64 {
    let d = out.len();
    logits.clear();
    for (j, k) in keys.chunks(d).enumerate() {
        let dot: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
        logits.push(scale * dot + bias.map_or(0.0, |b| b[j] as f64));
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return mx;
    }
    let mut z = 0.0;
    for (j, &l) in logits.iter().enumerate() {
        let e = (l - mx).exp();
        z += e;
        for (o, &v) in out.iter_mut().zip(&values[j * d..(j + 1) * d]) {
            *o += e * v as f64;
        }
    }
    out.iter_mut().for_each(|o| *o /= z);
    mx + z.ln()
}

/// Reference attention of `queries` [m, d] over the span rows of `input`.
pub fn head_reference(input: &HeadInput, queries: &[f32]) -> HeadRef {
    let d = input.d;
    let m = queries.len() / d;
    let (mut o, mut lse) = (vec![0.0f64; m * d], vec![0.0f64; m]);
    let mut logits = Vec::new();
    for i in 0..m {
        lse[i] = attend(&queries[i * d..(i + 1) * d], input.keys, input.values, input.bias, input.scale as f64, &mut o[i * d..(i + 1) * d], &mut logits);
    }
    HeadRef { d, o, lse }
}

/// Mean relative L2 of outputs and mean mass error |exp(lse_c − lse) − 1| of a compressed head
/// against its reference (spec §14; the same definitions as `compact::evaluate_head`).
pub fn head_errors(r: &HeadRef, out: &CompactedHead, queries: &[f32], scale: f32) -> (f64, f64) {
    let d = r.d;
    let m = r.lse.len();
    if m == 0 {
        return (0.0, 0.0);
    }
    let mut oc = vec![0.0f64; d];
    let mut logits = Vec::new();
    let (mut rel, mut mass) = (0.0, 0.0);
    for i in 0..m {
        let lse_c = attend(&queries[i * d..(i + 1) * d], &out.keys, &out.values, Some(&out.beta), scale as f64, &mut oc, &mut logits);
        let o = &r.o[i * d..(i + 1) * d];
        let diff: f64 = o.iter().zip(&oc).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        let no = o.iter().map(|a| a * a).sum::<f64>().sqrt();
        rel += diff / (no + 1e-10);
        let dl = lse_c - r.lse[i];
        mass += if dl.abs() < 1e-10 { dl.abs() } else { (dl.exp() - 1.0).abs() };
    }
    (rel / m as f64, mass / m as f64)
}

/// Log-softmax of a logits row, in f64 sums, stored f32.
pub fn log_softmax(row: &[f32]) -> Vec<f32> {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
    row.iter().map(|&x| (x as f64 - lse) as f32).collect()
}

/// A reference next-token distribution: probabilities p (f32) and Σ p·log p (f64), so that
/// KL(p ‖ q) = Σ p log p − Σ p·x_q + lse(x_q) costs one pass over the other logits.
pub struct RefDist {
    /// Probabilities over the vocabulary.
    pub p: Vec<f32>,   // [vocab]
    /// Σ p·log p (the negative entropy, nats; ≤ 0).
    pub negent: f64,
}

/// The [`RefDist`] of a logits row \[vocab\].
pub fn ref_dist(logits: &[f32]) -> RefDist {
    let lp = log_softmax(logits);
    let p: Vec<f32> = lp.iter().map(|&x| (x as f64).exp() as f32).collect();
    let negent = lp.iter().zip(&p).map(|(&l, &q)| if q > 0.0 { q as f64 * l as f64 } else { 0.0 }).sum();
    RefDist { p, negent }
}

/// Log-sum-exp of a logits row: f32 exponentials of x − max (each in (0, 1], relative error
/// ~1e-7), summed in f64.
pub fn lse(row: &[f32]) -> f64 {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let s: f64 = row.chunks(64).map(|c| c.iter().map(|&x| (x - mx).exp()).sum::<f32>() as f64).sum();
    mx as f64 + s.ln()
}

/// KL(p ‖ q) in nats for the reference p and the logits of q.
pub fn kl_to(r: &RefDist, logits_q: &[f32]) -> f64 {
    let dot: f64 = r.p.iter().zip(logits_q).map(|(&a, &b)| a as f64 * b as f64).sum();
    (r.negent - dot + lse(logits_q)).max(0.0)
}

/// −log p(target) from a logits row.
pub fn nll(row: &[f32], target: u32) -> f64 {
    let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
    lse - row[target as usize] as f64
}

/// Mean of the records per (method, ratio, task, metric), in a stable order: methods and metrics
/// in the given orders, then ratio, then task.
pub fn aggregate(records: &[Record], methods: &[String], tasks: &[String]) -> Vec<ResultRow> {
    let mut acc: BTreeMap<(usize, u64, usize, usize), (f64, usize)> = BTreeMap::new();
    for r in records {
        let (Some(mi), Some(ti), Some(ki)) = (methods.iter().position(|m| *m == r.method), tasks.iter().position(|t| *t == r.task), METRICS.iter().position(|m| *m == r.metric))
        else {
            continue;
        };
        if !r.value.is_finite() {
            continue;
        }
        let e = acc.entry((mi, r.ratio.to_bits(), ti, ki)).or_insert((0.0, 0));
        e.0 += r.value;
        e.1 += 1;
    }
    let mut rows: Vec<(usize, usize, f64, usize, ResultRow)> = acc
        .into_iter()
        .map(|((mi, rb, ti, ki), (s, n))| {
            let ratio = f64::from_bits(rb);
            (mi, ki, ratio, ti, ResultRow { method: methods[mi].clone(), ratio, task: tasks[ti].clone(), metric: METRICS[ki].to_string(), value: s / n as f64, n, ci_low: f64::NAN, ci_high: f64::NAN })
        })
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.total_cmp(&b.2)).then(a.3.cmp(&b.3)));
    rows.into_iter().map(|x| x.4).collect()
}

/// Write results.json (a list of row objects) and results.csv (same columns) into `dir`.
pub fn write_results(dir: &Path, rows: &[ResultRow]) -> Result<()> {
    let json = serde_json::to_string_pretty(rows).map_err(|e| Error::Invalid(format!("results.json: {e}")))?;
    write(dir, "results.json", &json)?;
    let mut csv = csv::Writer::from_writer(Vec::new());
    let err = |e: csv::Error| Error::Invalid(format!("results.csv: {e}"));
    csv.write_record(["method", "ratio", "task", "metric", "value", "n"]).map_err(err)?;
    for r in rows {
        csv.write_record([r.method.clone(), r.ratio.to_string(), r.task.clone(), r.metric.clone(), r.value.to_string(), r.n.to_string()]).map_err(err)?;
    }
    let bytes = csv.into_inner().map_err(|e| Error::Invalid(format!("results.csv: {e}")))?;
    write(dir, "results.csv", &String::from_utf8_lossy(&bytes))
}

/// Write `text` to `dir/name` (the directory must exist).
pub fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
}

/// Look up one aggregated value.
pub fn value(rows: &[ResultRow], method: &str, ratio: f64, task: &str, metric: &str) -> Option<f64> {
    rows.iter().find(|r| r.method == method && r.ratio == ratio && r.task == task && r.metric == metric).map(|r| r.value)
}

/// Mean of a metric over the tasks that have it (the cross-task summary).
pub fn mean_over_tasks(rows: &[ResultRow], method: &str, ratio: f64, metric: &str) -> Option<f64> {
    let v: Vec<f64> = rows.iter().filter(|r| r.method == method && r.ratio == ratio && r.metric == metric).map(|r| r.value).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Markdown summary tables: per metric, methods × budget points (mean over tasks, and per task
/// for accuracy); `form` is the points' budget form ([`fmt_point`]).
pub fn summary_markdown(rows: &[ResultRow], methods: &[String], ratios: &[f64], form: &str, tasks: &[String], command: &str) -> String {
    let mut s = String::new();
    s.push_str(&format!("Reproduce with:\n\n```\n{command}\n```\n\n"));
    let header = |s: &mut String, title: &str| {
        s.push_str(&format!("**{title}**\n\n| method |"));
        for r in ratios {
            s.push_str(&format!(" {} |", fmt_point(form, *r)));
        }
        s.push_str("\n|---|");
        for _ in ratios {
            s.push_str("---:|");
        }
        s.push('\n');
    };
    let table = |s: &mut String, title: &str, f: &dyn Fn(&str, f64) -> Option<f64>, prec: usize| {
        header(s, title);
        for m in methods {
            s.push_str(&format!("| {m} |"));
            for &r in ratios {
                match f(m, r) {
                    Some(v) => s.push_str(&format!(" {v:.prec$} |")),
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');
    };
    for t in tasks {
        if rows.iter().any(|r| r.task == *t && r.metric == "accuracy") {
            table(&mut s, &format!("accuracy, {t}"), &|m, r| value(rows, m, r, t, "accuracy"), 2);
        }
    }
    let task_list = tasks.join(", ");
    table(&mut s, &format!("answer_logppl (nats/token, mean over {task_list}; lower is better)"), &|m, r| mean_over_tasks(rows, m, r, "answer_logppl"), 3);
    table(&mut s, &format!("kl (nats, mean over {task_list})"), &|m, r| mean_over_tasks(rows, m, r, "kl"), 3);
    table(&mut s, "attn_rel_l2 (mean over heads and tasks)", &|m, r| mean_over_tasks(rows, m, r, "attn_rel_l2"), 3);
    table(&mut s, "mass_err (mean over heads and tasks)", &|m, r| mean_over_tasks(rows, m, r, "mass_err"), 3);
    table(&mut s, "kv_bytes (MiB, mean over tasks)", &|m, r| mean_over_tasks(rows, m, r, "kv_bytes").map(|b| b / (1024.0 * 1024.0)), 2);
    table(&mut s, "compress_s (seconds per context, mean over tasks)", &|m, r| mean_over_tasks(rows, m, r, "compress_s"), 2);
    s
}

/// A budget point as written in reports, by its form ([`crate::compact::Budget::entry`]):
/// `10×` (ratio), `r=0.5` (kvpress's compression ratio) or `64 rows` (rows per KV head).
pub fn fmt_point(form: &str, v: f64) -> String {
    match form {
        "compression_ratio" => format!("r={v}"),
        "budget" => format!("{} rows", fmt_ratio(v)),
        _ => format!("{}×", fmt_ratio(v)),
    }
}

/// A ratio as written in reports: `10` for whole numbers, `2.5` otherwise.
pub fn fmt_ratio(r: f64) -> String {
    if r.fract() == 0.0 {
        format!("{}", r as i64)
    } else {
        format!("{r}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_is_zero_for_equal_and_positive_otherwise() {
        let a = [1.0f32, 2.0, 3.0];
        assert!(kl_to(&ref_dist(&a), &a).abs() < 1e-7);
        // By hand: p = softmax(a), q = softmax(reversed).
        let p: Vec<f64> = log_softmax(&a).iter().map(|&x| (x as f64).exp()).collect();
        let lq = log_softmax(&[3.0, 2.0, 1.0]);
        let want: f64 = (0..3).map(|i| p[i] * ((p[i]).ln() - lq[i] as f64)).sum();
        assert!((kl_to(&ref_dist(&a), &[3.0, 2.0, 1.0]) - want).abs() < 1e-6);
        let p = log_softmax(&[0.0, 0.0]);
        assert!((p[0] as f64 - 0.5f64.ln()).abs() < 1e-6);
        assert!((nll(&[0.0, 0.0], 1) - 2f64.ln()).abs() < 1e-9);
    }

    #[test]
    fn aggregate_means_and_orders() {
        let rec = |m: &str, r: f64, v: f64| Record { method: m.into(), ratio: r, task: "t".into(), sample: "s".into(), metric: "kl", value: v };
        let rows = aggregate(&[rec("b", 2.0, 1.0), rec("a", 5.0, 2.0), rec("a", 2.0, 3.0), rec("a", 2.0, 5.0)], &["a".into(), "b".into()], &["t".into()]);
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].method.as_str(), rows[0].ratio, rows[0].value, rows[0].n), ("a", 2.0, 4.0, 2));
        assert_eq!(rows[2].method, "b");
    }
}
