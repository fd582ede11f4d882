//! The sensitivity sweep that produces per-head budget proportions (spec §11, simplified).

use std::collections::HashMap;

use super::compact::{compact_context, CompactOptions};
use super::layout::ContextLayout;
use crate::compact::{Budget, Compressor};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// Per-head budget proportions `{"L{l}H{h}": p}` from a sensitivity sweep (spec §11, simplified):
/// compact the context uniformly at `ratio` and at `2·ratio`, and give each head budget in
/// proportion to how much its held-out attention error grows when its budget halves (half of
/// the total stays uniform, so no head is starved). The reference sweeps 51 ratios per head and
/// scores answer log-perplexity; this sweep costs two compactions and scores attention outputs.
/// Also returns the per-head held-out rel_l2 at `ratio` and at `2·ratio` (layer-major).
// The tuple is spelled out on purpose: an alias would hide what the three parts are.
#[allow(clippy::type_complexity)]
pub fn sensitivity_budgets(model: &Model, tok: &Tokenizer, layout: &ContextLayout, method: &dyn Compressor, opts: &CompactOptions) -> Result<(HashMap<String, f64>, Vec<f64>, Vec<f64>)> {
    let Budget::Ratio(ratio) = opts.budget else {
        return Err(Error::Invalid(format!("the sensitivity sweep doubles a ratio; got {}", opts.budget)));
    };
    let uniform = CompactOptions { budgets: None, ..opts.clone() };
    let (_, at_r) = compact_context(model, tok, layout, method, &uniform)?;
    let half = CompactOptions { budget: Budget::Ratio(ratio * 2.0), ..uniform };
    let (_, at_2r) = compact_context(model, tok, layout, method, &half)?;
    let sens: Vec<f64> = at_2r.head_rel_l2.iter().zip(&at_r.head_rel_l2).map(|(b, a)| (b - a).max(0.0)).collect();
    let h = sens.len() as f64;
    let total: f64 = sens.iter().sum();
    let nkv = model.config.n_kv_heads;
    let mut out = HashMap::new();
    for (i, s) in sens.iter().enumerate() {
        let p = if total > 0.0 { 0.5 / h + 0.5 * s / total } else { 1.0 / h };
        out.insert(format!("L{}H{}", i / nkv, i % nkv), p);
    }
    Ok((out, at_r.head_rel_l2, at_2r.head_rel_l2))
}
