//! The ordering checks of `--quick` / `--check`: the targets as loose, reportable tests.

use super::metrics::{self, ResultRow};
use crate::compact::registry::is_am;
use super::options::Plan;

/// One ordering check of the targets.
#[derive(Debug, Clone)]
pub struct Check {
    /// What is compared, e.g. "passkey accuracy: qfilters vs knorm".
    pub name: String,
    /// Compression ratio the two values were measured at.
    pub ratio: f64,
    /// The value of the method expected to win (left of "vs").
    pub lhs: f64,
    /// The value of the method it is compared with.
    pub rhs: f64,
    /// Strict: lhs beats rhs (higher accuracy, or lower answer_logppl).
    pub strict_pass: bool,
    /// Loose: lhs beats or ties rhs within the tolerance (what CI and `--check` require).
    pub loose_pass: bool,
}

impl Check {
    /// One human-readable line for summary.md: name, ratio, both values and the verdict.
    pub fn line(&self) -> String {
        format!(
            "{} at {}×: {:.3} vs {:.3} → {}",
            self.name,
            metrics::fmt_ratio(self.ratio),
            self.lhs,
            self.rhs,
            if self.strict_pass { "beats" } else if self.loose_pass { "ties within tolerance" } else { "FAILS" }
        )
    }
    /// The check as a JSON object for run.json.
    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"check": self.name, "ratio": self.ratio, "lhs": self.lhs, "rhs": self.rhs, "strict": self.strict_pass, "loose": self.loose_pass})
    }
}

/// The targets, where the run has the data: Q-Filters vs K-norm and StreamingLLM on
/// passkey accuracy (10×, 20×; loose = within one question), and the best AM method vs every
/// eviction method on answer_logppl averaged over tasks (10×, 20×, 50×; loose = within 0.05 nats).
pub fn ordering_checks(rows: &[ResultRow], plan: &Plan) -> Vec<Check> {
    let mut out = Vec::new();
    if plan.form != "ratio" {
        // The targets are stated at ratios.
        return out;
    }
    let has = |m: &str| plan.methods.iter().any(|x| x == m);
    for &ratio in plan.ratios.iter().filter(|r| [10.0, 20.0].contains(*r)) {
        let n = rows.iter().find(|r| r.method == "qfilters" && r.ratio == ratio && r.task == "passkey" && r.metric == "accuracy").map_or(1, |r| r.n);
        for other in ["knorm", "streaming-llm"] {
            if !has("qfilters") || !has(other) {
                continue;
            }
            if let (Some(a), Some(b)) = (metrics::value(rows, "qfilters", ratio, "passkey", "accuracy"), metrics::value(rows, other, ratio, "passkey", "accuracy")) {
                out.push(Check { name: format!("passkey accuracy: qfilters vs {other}"), ratio, lhs: a, rhs: b, strict_pass: a > b, loose_pass: a + 1.0 / n as f64 + 1e-9 >= b });
            }
        }
    }
    let ams: Vec<&String> = plan.methods.iter().filter(|m| is_am(m) && m.as_str() != "baseline").collect();
    let evictions: Vec<&String> = plan.methods.iter().filter(|m| !is_am(m) && m.as_str() != "full").collect();
    for &ratio in plan.ratios.iter().filter(|r| [10.0, 20.0, 50.0].contains(*r)) {
        let best_am = ams.iter().filter_map(|m| metrics::mean_over_tasks(rows, m, ratio, "answer_logppl").map(|v| (v, *m))).min_by(|a, b| a.0.total_cmp(&b.0));
        let Some((am, am_name)) = best_am else { continue };
        for e in &evictions {
            if let Some(v) = metrics::mean_over_tasks(rows, e, ratio, "answer_logppl") {
                out.push(Check { name: format!("answer_logppl: {am_name} vs {e}"), ratio, lhs: am, rhs: v, strict_pass: am < v, loose_pass: am <= v + 0.05 });
            }
        }
    }
    out
}
