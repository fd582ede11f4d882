//! PyramidKV (arXiv 2406.02069; spec `baselines.md` §2 and its PyramidKV note): SnapKV scores with
//! budgets that fall linearly across layers.
//!
//! With n_kept the uniform budget and w the window: b = n_kept − w; layer ℓ keeps
//! w + (max − (max − min)·ℓ/(L−1)) rows, min = b/β, max = 2b − b/β, so the mean over layers is
//! n_kept. When that is not feasible (b ≤ 0, or max ≥ T − w) every layer keeps n_kept, i.e. uniform
//! SnapKV (kvpress's fallback). Defaults β = 20, w = 64, kernel 5.

use super::snapkv::SnapKv;
use crate::compact::head::{HeadContext, HeadInput};
use crate::compact::method::{Protect, Scorer};
use crate::Result;

/// PyramidKV: SnapKV scores with budgets falling linearly across layers.
#[derive(Debug, Clone, Copy)]
pub struct PyramidKv {
    /// Pyramid ratio β (not the AM logit bias): the last layer keeps w + b/β rows (default 20).
    pub beta: f64,
    /// The SnapKV scorer (window, kernel) behind the scores and protected window.
    pub snap: SnapKv,
}

impl Default for PyramidKv {
    fn default() -> Self {
        PyramidKv { beta: 20.0, snap: SnapKv::default() }
    }
}

impl PyramidKv {
    /// Rows kept by each layer for a span of `rows` rows and a uniform budget `budget`.
    pub fn layer_budgets(&self, n_layers: usize, rows: usize, budget: usize) -> Vec<usize> {
        let w = self.snap.window as f64;
        let b = budget as f64 - w;
        let min = b / self.beta;
        let max = 2.0 * b - min;
        if n_layers < 2 || b <= 0.0 || max >= rows as f64 - w {
            return vec![budget.min(rows); n_layers];
        }
        (0..n_layers)
            .map(|l| {
                let bl = max - (max - min) * l as f64 / (n_layers - 1) as f64;
                ((bl.round() + w) as usize).min(rows)
            })
            .collect()
    }
}

impl PyramidKv {
    /// Rows kept by layer `layer` as kvpress 0.5.5 `PyramidKVPress.get_layer_budget` computes them,
    /// for a context of `q_len` rows and `kept` = q_len·(1 − compression_ratio) **unrounded**:
    /// min = kept/β, max = 2·kept − min (the window is inside the pyramid, not added to it); when
    /// max ≥ q_len − w, max = q_len − w and min = 2·kept − max; unless q_len ≥ max ≥ min ≥ w, every
    /// layer keeps max(1, round(kept)) (uniform SnapKV). Otherwise round(max − layer·(max − min)/(L − 1)).
    /// `round` is Python's, half to even.
    pub fn kvpress_layer_budget(&self, n_layers: usize, layer: usize, q_len: usize, kept: f64) -> usize {
        let w = self.snap.window as f64;
        let q = q_len as f64;
        let max_capacity = w + kept;
        let mut min = (max_capacity - w) / self.beta;
        let mut max = (max_capacity - w) * 2.0 - min;
        if max >= q - w {
            max = q - w;
            min = (max_capacity - w) * 2.0 - max;
        }
        if !(q >= max && max >= min && min >= w) {
            return (kept.round_ties_even() as usize).max(1);
        }
        let steps = if n_layers > 1 { (max - min) / (n_layers - 1) as f64 } else { 0.0 };
        ((max - layer as f64 * steps).round_ties_even() as usize).min(q_len)
    }

    /// [`PyramidKv::kvpress_layer_budget`] for every layer, with kept = q_len·(1 − compression_ratio).
    pub fn kvpress_layer_budgets(&self, n_layers: usize, q_len: usize, compression_ratio: f64) -> Vec<usize> {
        let kept = q_len as f64 * (1.0 - compression_ratio);
        (0..n_layers).map(|l| self.kvpress_layer_budget(n_layers, l, q_len, kept)).collect()
    }
}

impl Scorer for PyramidKv {
    fn name(&self) -> &'static str {
        "pyramidkv"
    }

    fn needs_queries(&self) -> bool {
        true
    }

    fn score_head(&self, input: &HeadInput, ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        self.snap.scores(input, ctx)
    }

    fn protect(&self, _rows: usize, _budget: usize, _ctx: &HeadContext) -> Protect {
        Protect { sinks: 0, window: self.snap.window }
    }

    fn head_budgets(&self, n_layers: usize, n_kv: usize, rows: usize, budget: usize) -> Vec<usize> {
        self.layer_budgets(n_layers, rows, budget).into_iter().flat_map(|b| std::iter::repeat_n(b, n_kv)).collect()
    }
}
