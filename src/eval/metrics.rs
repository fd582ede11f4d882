//! Measures and result files.
//!
//! | metric | definition | per |
//! |---|---|---|
//! | `accuracy` | RULER's string match on the greedy answer generated on the compressed cache after the question and answer prefix (at most the question's `max_new_tokens`, stopping at end of turn): 1 if a reference answer occurs in it (case-insensitive), or, for `match_all` questions, the fraction of the references that occur. When the teacher-forced pass shows that greedy decoding reproduces a reference's tokens, the generation is skipped (its text would contain the reference). | question |
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

/// One measurement (one question or one sample); records.jsonl holds one per line, and
/// `kvcompact eval merge` reads them back.
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

/// RULER's string match on a generated answer: with `all`, the fraction of `answers` that occur
/// in `text` (case-insensitive); otherwise 1 if any occurs.
pub fn string_match(text: &str, answers: &[String], all: bool) -> f64 {
    let t = text.to_lowercase();
    let hit = |a: &String| t.contains(&a.to_lowercase());
    if all {
        answers.iter().filter(|a| hit(a)).count() as f64 / answers.len().max(1) as f64
    } else {
        f64::from(u8::from(answers.iter().any(hit)))
    }
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

/// Bootstrap resamples behind every interval.
pub const BOOTSTRAP_RESAMPLES: usize = 2000;

/// The pseudo-task of the rows that average over the run's tasks (summary tables, Pareto view).
pub const MEAN_TASK: &str = "mean";

/// One (method, ratio, metric) cell of one task: per context, the sum and count of its values.
type Cells = BTreeMap<String, (f64, usize)>;

/// A cell's point estimate, value count and bootstrap replicates (empty under two contexts).
type Estimate = (f64, usize, Vec<f64>);

/// Point estimate and bootstrap replicates of one task's cell. Contexts are the resampled unit
/// (a cluster bootstrap: the questions of one context stay together), the estimate pools every
/// value of the drawn contexts, and the draws depend only on the task and its context ids, so
/// every method and ratio of a task sees the same resamples (their intervals are paired) and a
/// merged sharded run gives the same numbers as one run.
fn replicates(task: &str, cells: &Cells) -> Estimate {
    let per: Vec<(f64, usize)> = cells.values().copied().collect();
    let (s, n) = per.iter().fold((0.0, 0usize), |a, c| (a.0 + c.0, a.1 + c.1));
    let point = s / n as f64;
    if per.len() < 2 {
        return (point, n, Vec::new());
    }
    let salt = task.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    let mut rng = crate::sampling::Rng::new(salt ^ 0xB007_57A9);
    let k = per.len() as u64;
    let reps = (0..BOOTSTRAP_RESAMPLES)
        .map(|_| {
            let (mut s, mut n) = (0.0, 0usize);
            for _ in 0..k {
                let c = per[rng.below(k) as usize];
                s += c.0;
                n += c.1;
            }
            s / n as f64
        })
        .collect();
    (point, n, reps)
}

/// The 2.5% and 97.5% percentiles of `reps` (NaN, NaN when empty).
fn interval(mut reps: Vec<f64>) -> (f64, f64) {
    if reps.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    reps.sort_by(f64::total_cmp);
    let at = |q: f64| reps[((q * (reps.len() - 1) as f64).round() as usize).min(reps.len() - 1)];
    (at(0.025), at(0.975))
}

/// Mean of the records per (method, ratio, task, metric) with its 95% bootstrap interval over
/// contexts, plus a [`MEAN_TASK`] row per (method, ratio, metric) averaging the tasks that have
/// it (the interval from the same replicates, averaged across tasks). Stable order: methods and
/// metrics in the given orders, then ratio, then task (the mean last).
pub fn aggregate(records: &[Record], methods: &[String], tasks: &[String]) -> Vec<ResultRow> {
    // (method, metric, ratio bits) → per task → per context (sum, count).
    let mut acc: BTreeMap<(usize, usize, u64), BTreeMap<usize, Cells>> = BTreeMap::new();
    for r in records {
        let (Some(mi), Some(ti), Some(ki)) = (methods.iter().position(|m| *m == r.method), tasks.iter().position(|t| *t == r.task), METRICS.iter().position(|m| *m == r.metric))
        else {
            continue;
        };
        if !r.value.is_finite() {
            continue;
        }
        let e = acc.entry((mi, ki, r.ratio.to_bits())).or_default().entry(ti).or_default().entry(r.sample.clone()).or_insert((0.0, 0));
        e.0 += r.value;
        e.1 += 1;
    }
    let mut keys: Vec<(usize, usize, u64)> = acc.keys().copied().collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.cmp(&b.1)).then(f64::from_bits(a.2).total_cmp(&f64::from_bits(b.2))));
    let mut rows = Vec::new();
    for key @ (mi, ki, rb) in keys {
        let ratio = f64::from_bits(rb);
        let row = |task: String, value: f64, n: usize, ci: (f64, f64)| ResultRow { method: methods[mi].clone(), ratio, task, metric: METRICS[ki].to_string(), value, n, ci_low: ci.0, ci_high: ci.1 };
        let per_task: Vec<(usize, Estimate)> = acc[&key].iter().map(|(&ti, cells)| (ti, replicates(&tasks[ti], cells))).collect();
        for (ti, (point, n, reps)) in &per_task {
            rows.push(row(tasks[*ti].clone(), *point, *n, interval(reps.clone())));
        }
        let k = per_task.len() as f64;
        let point = per_task.iter().map(|t| t.1 .0).sum::<f64>() / k;
        let n = per_task.iter().map(|t| t.1 .1).sum();
        let reps = if per_task.iter().all(|t| !t.1 .2.is_empty()) {
            (0..BOOTSTRAP_RESAMPLES).map(|b| per_task.iter().map(|t| t.1 .2[b]).sum::<f64>() / k).collect()
        } else {
            Vec::new()
        };
        rows.push(row(MEAN_TASK.to_string(), point, n, interval(reps)));
    }
    rows
}

/// Read records.jsonl back (the rows `kvcompact eval` wrote; `path` names the file in errors).
pub fn read_records(path: &Path) -> Result<Vec<Record>> {
    #[derive(serde::Deserialize)]
    struct Line {
        method: String,
        ratio: f64,
        task: String,
        sample: String,
        metric: String,
        value: Option<f64>,
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, l) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let r: Line = serde_json::from_str(l).map_err(|e| Error::Invalid(format!("{}:{}: {e}", path.display(), i + 1)))?;
        let Some(&metric) = METRICS.iter().find(|m| **m == r.metric) else {
            return Err(Error::Invalid(format!("{}:{}: unknown metric {:?}", path.display(), i + 1, r.metric)));
        };
        // serde_json writes a non-finite value as null; aggregation skips it either way.
        out.push(Record { method: r.method, ratio: r.ratio, task: r.task, sample: r.sample, metric, value: r.value.unwrap_or(f64::NAN) });
    }
    Ok(out)
}

/// Write results.json (a list of row objects) and results.csv (same columns) into `dir`.
pub fn write_results(dir: &Path, rows: &[ResultRow]) -> Result<()> {
    let json = serde_json::to_string_pretty(rows).map_err(|e| Error::Invalid(format!("results.json: {e}")))?;
    write(dir, "results.json", &json)?;
    let mut csv = csv::Writer::from_writer(Vec::new());
    let err = |e: csv::Error| Error::Invalid(format!("results.csv: {e}"));
    csv.write_record(["method", "ratio", "task", "metric", "value", "n", "ci_low", "ci_high"]).map_err(err)?;
    // An interval that does not exist (one context) is an empty field, as in results.json's null.
    let opt = |v: f64| if v.is_finite() { v.to_string() } else { String::new() };
    for r in rows {
        csv.write_record([r.method.clone(), r.ratio.to_string(), r.task.clone(), r.metric.clone(), r.value.to_string(), r.n.to_string(), opt(r.ci_low), opt(r.ci_high)]).map_err(err)?;
    }
    let bytes = csv.into_inner().map_err(|e| Error::Invalid(format!("results.csv: {e}")))?;
    write(dir, "results.csv", &String::from_utf8_lossy(&bytes))
}

/// Write `text` to `dir/name` (the directory must exist).
pub fn write(dir: &Path, name: &str, text: &str) -> Result<()> {
    let p = dir.join(name);
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))
}

/// Look up one aggregated row.
pub fn row<'a>(rows: &'a [ResultRow], method: &str, ratio: f64, task: &str, metric: &str) -> Option<&'a ResultRow> {
    rows.iter().find(|r| r.method == method && r.ratio == ratio && r.task == task && r.metric == metric)
}

/// Look up one aggregated value.
pub fn value(rows: &[ResultRow], method: &str, ratio: f64, task: &str, metric: &str) -> Option<f64> {
    row(rows, method, ratio, task, metric).map(|r| r.value)
}

/// Mean of a metric over the tasks that have it (the cross-task summary: the [`MEAN_TASK`] row).
pub fn mean_over_tasks(rows: &[ResultRow], method: &str, ratio: f64, metric: &str) -> Option<f64> {
    value(rows, method, ratio, MEAN_TASK, metric)
}

/// A value with its interval when it has one: `0.850 [0.700, 0.950]`.
pub fn fmt_ci(r: &ResultRow, prec: usize) -> String {
    if r.ci_low.is_finite() && r.ci_high.is_finite() {
        format!("{:.prec$} [{:.prec$}, {:.prec$}]", r.value, r.ci_low, r.ci_high)
    } else {
        format!("{:.prec$}", r.value)
    }
}

/// Markdown summary tables: per metric, methods × budget points (mean over tasks, and per task
/// for accuracy); accuracy and answer log-ppl cells carry their 95% bootstrap intervals; `form`
/// is the points' budget form ([`fmt_point`]).
pub fn summary_markdown(rows: &[ResultRow], methods: &[String], ratios: &[f64], form: &str, tasks: &[String], command: &str) -> String {
    let mut s = String::new();
    s.push_str(&format!("Reproduce with:\n\n```\n{command}\n```\n\nIntervals: 95% bootstrap over contexts ({BOOTSTRAP_RESAMPLES} resamples).\n\n"));
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
    // `scale` converts units (bytes → MiB); `ci` writes the interval.
    let table = |s: &mut String, title: &str, task: &str, metric: &str, prec: usize, scale: f64, ci: bool| {
        header(s, title);
        for m in methods {
            s.push_str(&format!("| {m} |"));
            for &r in ratios {
                match row(rows, m, r, task, metric) {
                    Some(x) if ci => s.push_str(&format!(" {} |", fmt_ci(x, prec))),
                    Some(x) => s.push_str(&format!(" {:.prec$} |", x.value * scale)),
                    None => s.push_str(" – |"),
                }
            }
            s.push('\n');
        }
        s.push('\n');
    };
    for t in tasks {
        if rows.iter().any(|r| r.task == *t && r.metric == "accuracy") {
            table(&mut s, &format!("accuracy, {t}"), t, "accuracy", 2, 1.0, true);
        }
    }
    let task_list = tasks.join(", ");
    if rows.iter().filter(|r| r.metric == "accuracy").map(|r| &r.task).any(|t| t != MEAN_TASK) {
        table(&mut s, &format!("accuracy (mean over the tasks with answers among {task_list})"), MEAN_TASK, "accuracy", 2, 1.0, true);
    }
    table(&mut s, &format!("answer_logppl (nats/token, mean over {task_list}; lower is better)"), MEAN_TASK, "answer_logppl", 3, 1.0, true);
    table(&mut s, &format!("kl (nats, mean over {task_list})"), MEAN_TASK, "kl", 3, 1.0, false);
    table(&mut s, "attn_rel_l2 (mean over heads and tasks)", MEAN_TASK, "attn_rel_l2", 3, 1.0, false);
    table(&mut s, "mass_err (mean over heads and tasks)", MEAN_TASK, "mass_err", 3, 1.0, false);
    table(&mut s, "kv_bytes (MiB, mean over tasks)", MEAN_TASK, "kv_bytes", 2, 1.0 / (1024.0 * 1024.0), false);
    table(&mut s, "compress_s (seconds per context, mean over tasks)", MEAN_TASK, "compress_s", 2, 1.0, false);
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

    fn rec(m: &str, task: &str, sample: &str, v: f64) -> Record {
        Record { method: m.into(), ratio: 10.0, task: task.into(), sample: sample.into(), metric: "accuracy", value: v }
    }

    #[test]
    fn bootstrap_interval_brackets_the_mean_and_narrows_with_contexts() {
        // 20 contexts, 0.5 accuracy: the interval holds 0.5 and is about ±0.22 wide (binomial).
        let few: Vec<Record> = (0..20).map(|i| rec("a", "t", &format!("s{i}"), (i % 2) as f64)).collect();
        let r = &aggregate(&few, &["a".into()], &["t".into()])[0];
        assert_eq!(r.value, 0.5);
        assert!(r.ci_low < 0.5 && r.ci_high > 0.5, "{r:?}");
        assert!((0.15..0.3).contains(&(0.5 - r.ci_low)), "{r:?}");
        let many: Vec<Record> = (0..200).map(|i| rec("a", "t", &format!("s{i}"), (i % 2) as f64)).collect();
        let m = &aggregate(&many, &["a".into()], &["t".into()])[0];
        assert!(m.ci_high - m.ci_low < (r.ci_high - r.ci_low) / 2.0, "{m:?} vs {r:?}");
        // Constant values: a zero-width interval.
        let flat: Vec<Record> = (0..5).map(|i| rec("a", "t", &format!("s{i}"), 1.0)).collect();
        let f = &aggregate(&flat, &["a".into()], &["t".into()])[0];
        assert_eq!((f.ci_low, f.ci_high), (1.0, 1.0));
    }

    #[test]
    fn bootstrap_resamples_contexts_and_ignores_record_order() {
        // Two questions in one context move together: context s0 has both right, s1 both wrong.
        let mut recs = vec![rec("a", "t", "s0", 1.0), rec("a", "t", "s0", 1.0), rec("a", "t", "s1", 0.0), rec("a", "t", "s1", 0.0), rec("a", "t", "s2", 1.0), rec("a", "t", "s2", 0.0)];
        let one = aggregate(&recs, &["a".into()], &["t".into()]);
        recs.reverse();
        let two = aggregate(&recs, &["a".into()], &["t".into()]);
        assert_eq!(one, two);
        assert_eq!(one[0].n, 6);
        // Every resample is a mean of whole contexts: 0, 1/4, 1/3, 1/2, … never below 0 or above 1.
        assert!(one[0].ci_low >= 0.0 && one[0].ci_high <= 1.0);
        // Same task and contexts: another method gets the same resamples (paired intervals).
        let b: Vec<Record> = recs.iter().map(|r| Record { method: "b".into(), ..r.clone() }).collect();
        let both = aggregate(&[recs.clone(), b].concat(), &["a".into(), "b".into()], &["t".into()]);
        assert_eq!((both[0].ci_low, both[0].ci_high), (both[2].ci_low, both[2].ci_high));
    }

    #[test]
    fn records_round_trip_through_jsonl() {
        let dir = std::env::temp_dir().join(format!("kvc-records-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let recs = [rec("a", "t", "s0", 1.0), Record { metric: "kl", value: f64::NAN, ..rec("a", "t", "s1", 0.0) }];
        let text: String = recs.iter().map(|r| serde_json::to_string(r).unwrap() + "\n").collect();
        std::fs::write(dir.join("records.jsonl"), text).unwrap();
        let back = read_records(&dir.join("records.jsonl")).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!((back[0].metric, back[0].value), ("accuracy", 1.0));
        assert!(back[1].value.is_nan());
        std::fs::write(dir.join("bad.jsonl"), "{\"method\": 1}\n").unwrap();
        let e = read_records(&dir.join("bad.jsonl")).unwrap_err().to_string();
        assert!(e.contains("bad.jsonl:1") && !e.contains('\n'), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

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
        // Each (method, ratio) has its task row and the mean row.
        assert_eq!(rows.len(), 6);
        assert_eq!((rows[0].method.as_str(), rows[0].ratio, rows[0].value, rows[0].n), ("a", 2.0, 4.0, 2));
        assert_eq!((rows[1].task.as_str(), rows[1].value), (MEAN_TASK, 4.0));
        assert_eq!(rows[4].method, "b");
        // One context: no interval.
        assert!(rows[0].ci_low.is_nan() && rows[0].ci_high.is_nan());
    }
}
