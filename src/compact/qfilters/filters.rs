//! The filter file and the Q-Filters scorer: score(k) = −⟨k, f⟩ on post-RoPE keys.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use crate::compact::head::{HeadContext, HeadInput};
use crate::compact::method::{Protect, Scorer};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor_file::{load_safetensors, save_safetensors, OutTensor, TensorData};

/// File name of a model's default filters, inside the model directory.
pub const DEFAULT_FILTERS_FILE: &str = "qfilters.safetensors";
/// Tensor name in the filter file.
pub const TENSOR: &str = "q_filters";

/// The calibration corpus shipped with kvcompact (original text written for the project): used
/// when no `--text` is given.
pub const SHIPPED_CORPUS: &[(&str, &str)] = &[
    ("data/calib/river-survey.txt", include_str!("../../../data/calib/river-survey.txt")),
    ("data/calib/bakery-ledger.txt", include_str!("../../../data/calib/bakery-ledger.txt")),
    ("data/calib/signal-boxes.txt", include_str!("../../../data/calib/signal-boxes.txt")),
    ("data/calib/tide-clock.txt", include_str!("../../../data/calib/tide-clock.txt")),
];

/// Calibrated filters of one model: f [layers, kv_heads, head_dim], negated convention.
#[derive(Debug, Clone)]
pub struct QFilters {
    /// Model layers.
    pub n_layers: usize,
    /// KV heads per layer.
    pub n_kv_heads: usize,
    /// Head dimension d of each filter.
    pub head_dim: usize,
    /// One filter f = −s·v₁ per (layer, KV head), layer-major (see [`QFilters::filter`]).
    pub filters: Vec<f32>, // [n_layers, n_kv_heads, head_dim]
    /// Safetensors metadata: convention, model fingerprint, corpus, tokens, sign rule, seed, tool version.
    pub metadata: HashMap<String, String>,
}

impl QFilters {
    /// The filter f of one (layer, KV head): \[head_dim\].
    pub fn filter(&self, layer: usize, kv_head: usize) -> &[f32] {
        let at = (layer * self.n_kv_heads + kv_head) * self.head_dim;
        &self.filters[at..at + self.head_dim]
    }

    /// score(k) = −⟨k, f⟩ for every row of `keys` [T, d] (higher = keep).
    pub fn scores(&self, layer: usize, kv_head: usize, keys: &[f32]) -> Vec<f64> {
        let f = self.filter(layer, kv_head);
        keys.chunks(self.head_dim).map(|k| -k.iter().zip(f).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()).collect()
    }

    /// Write the filter file: tensor [`TENSOR`] [n_layers, n_kv_heads, head_dim] plus `metadata`.
    pub fn save(&self, path: &Path) -> Result<()> {
        let shape = vec![self.n_layers, self.n_kv_heads, self.head_dim];
        save_safetensors(path, &[OutTensor::F32 { name: TENSOR, shape, data: &self.filters }], Some(self.metadata.clone()))
    }

    /// Load filters and check them against `model`: shape, convention and fingerprint.
    pub fn load(path: &Path, model: &Model) -> Result<QFilters> {
        let bad = |msg: String| Error::Invalid(format!("{}: {msg}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors { path: path.into(), msg: e.to_string() })?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = load_safetensors(path)?;
        let (shape, data) = match tensors.get(TENSOR) {
            Some((s, TensorData::F32(v))) => (s.clone(), v.clone()),
            _ => return Err(bad(format!("no f32 tensor {TENSOR:?}"))),
        };
        let c = &model.config;
        if shape != [c.n_layers, c.n_kv_heads, c.head_dim] {
            return Err(bad(format!("{TENSOR} has shape {shape:?}, the model needs [{}, {}, {}]", c.n_layers, c.n_kv_heads, c.head_dim)));
        }
        match metadata.get("convention").map(String::as_str) {
            Some("negated") | None => {}
            Some(other) => return Err(bad(format!("filter convention {other:?} is not \"negated\" (f = −v₁⁺)"))),
        }
        if let Some(fp) = metadata.get("model_sha256") {
            if *fp != model.fingerprint() {
                return Err(bad("these filters were calibrated for a different model".into()));
            }
        }
        if data.iter().any(|x| !x.is_finite()) {
            return Err(bad("filters hold NaN or infinite values".into()));
        }
        Ok(QFilters { n_layers: c.n_layers, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim, filters: data, metadata })
    }
}

/// The Q-Filters scorer: −⟨k, f⟩ with optional protected sinks and window (kvpress protects none).
#[derive(Debug, Clone)]
pub struct QFilterScorer {
    /// The model's calibrated filters (shared).
    pub filters: Arc<QFilters>,
    /// Leading span rows always kept (default 0).
    pub sinks: usize,
    /// Trailing span rows always kept (default 0).
    pub window: usize,
}

impl QFilterScorer {
    /// A scorer over `filters` with no protected rows.
    pub fn new(filters: Arc<QFilters>) -> QFilterScorer {
        QFilterScorer { filters, sinks: 0, window: 0 }
    }
}

impl Scorer for QFilterScorer {
    fn name(&self) -> &'static str {
        "qfilters"
    }

    fn score_head(&self, input: &HeadInput, _ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        let f = &self.filters;
        if input.layer >= f.n_layers || input.kv_head >= f.n_kv_heads || input.d != f.head_dim {
            return Err(Error::Shape {
                op: "qfilters::score",
                expected: format!("layer < {}, kv_head < {}, d = {}", f.n_layers, f.n_kv_heads, f.head_dim),
                got: format!("layer {}, kv_head {}, d {}", input.layer, input.kv_head, input.d),
            });
        }
        Ok(f.scores(input.layer, input.kv_head, input.keys))
    }

    fn protect(&self, _rows: usize, _budget: usize, _ctx: &HeadContext) -> Protect {
        Protect { sinks: self.sinks, window: self.window }
    }
}

/// Spearman rank correlation of two equal-length vectors (average ranks for ties): the
/// attention-agreement check of spec §8 test 4.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(x: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
        let mut r = vec![0.0; x.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0;
            for k in i..=j {
                r[idx[k]] = avg;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma) * (x - ma)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb) * (y - mb)).sum();
    cov / (va * vb).sqrt().max(1e-300)
}
