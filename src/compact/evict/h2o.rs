//! H2O, heavy-hitter oracle (arXiv 2306.14048; spec `baselines.md` §2): keep the rows that received
//! the most attention, plus a recent window.
//!
//! Prefill score (kvpress `ObservedAttentionPress`): the column sums of the causal attention
//! matrix of the context's own queries, each divided by the number of queries that could attend
//! to the row (those at a position ≥ the row's), then the mean over the GQA group. The softmax of
//! each query runs over every row it sees, template rows included (`HeadContext::full`).
//! Budget split: `recent_fraction` of the budget (default ½, the paper's equal heavy/recent split)
//! is the most recent rows; the rest goes to the heaviest hitters.
//!
//! Fallback without observed context queries: `HeadInput::queries`, non-causal, normalised over the
//! span; the score is then the mean attention over those queries.

use super::frame::{group_queries, span_attention};
use crate::compact::head::{HeadContext, HeadInput};
use crate::compact::method::{Protect, Scorer};
use crate::{Error, Result};

/// H2O scorer: observed attention per row, with part of the budget kept for recent rows.
#[derive(Debug, Clone, Copy)]
pub struct H2o {
    /// Share of the budget given to the most recent rows (spec default 0.5).
    pub recent_fraction: f64,
}

impl Default for H2o {
    fn default() -> Self {
        H2o { recent_fraction: 0.5 }
    }
}

impl Scorer for H2o {
    fn name(&self) -> &'static str {
        "h2o"
    }

    fn needs_queries(&self) -> bool {
        true
    }

    fn score_head(&self, input: &HeadInput, ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        observed_scores(input, ctx, "h2o")
    }

    fn protect(&self, _rows: usize, budget: usize, _ctx: &HeadContext) -> Protect {
        let heavy = ((budget as f64) * (1.0 - self.recent_fraction)).floor() as usize;
        Protect { sinks: 0, window: budget - heavy.min(budget) }
    }
}

/// The observed-attention score shared by H2O and `observed-attention` (kvpress
/// `ObservedAttentionPress`): per span row, the causal attention it received from the observed
/// context queries, summed and divided by the number of queries that could see it (T − j for a
/// fresh prefill), then the mean over the GQA group. `method` names the caller in errors.
pub(crate) fn observed_scores(input: &HeadInput, ctx: &HeadContext, method: &str) -> Result<Vec<f64>> {
    let t = input.rows();
    let (heads, qpos) = group_queries(input, ctx).ok_or_else(|| Error::Invalid(format!("{method}: no queries (observed context queries or HeadInput::queries)")))?;
    let mut acc = vec![0.0f64; t];
    let mut n_total = 0usize;
    for q in &heads {
        span_attention(input, ctx, q, qpos.as_deref(), |_, w| {
            acc.iter_mut().zip(w).for_each(|(a, x)| *a += x);
        });
        n_total += q.len() / input.d;
    }
    let g = heads.len().max(1) as f64;
    match qpos {
        // Causal: row j is seen by the queries at positions ≥ p_j.
        Some(p) => {
            for (j, a) in acc.iter_mut().enumerate() {
                let seen = p.len() - p.partition_point(|&x| x < input.positions[j]);
                *a = if seen > 0 { *a / (g * seen as f64) } else { 0.0 };
            }
        }
        None => acc.iter_mut().for_each(|a| *a /= n_total.max(1) as f64),
    }
    Ok(acc)
}
