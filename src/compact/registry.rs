//! Every compression method by its CLI name (the list), as one [`Compressor`].
//!
//! | name | what | file |
//! |---|---|---|
//! | `am-omp`, `am-highest`, `baseline` | Attention Matching family | [`super::am`] |
//! | `qfilters` | −⟨k, f⟩ with calibrated filters | [`crate::qfilters`] |
//! | `streaming-llm` | 4 sinks + most recent | [`super::streaming_llm`] |
//! | `h2o` | accumulated causal attention, 50 % recent | [`super::h2o`] |
//! | `snapkv` | last-64-query window, avg pool 5 | [`super::snapkv`] |
//! | `pyramidkv` | SnapKV with linearly falling layer budgets (β = 20) | [`super::pyramidkv`] |
//! | `tova` | last token's attention, averaged over the layer | [`super::tova`] |
//! | `knorm` | −‖k‖ | [`super::knorm`] |
//! | `expected-attention` | Gaussian future-query attention × ‖v‖ | [`super::expected_attention`] |
//! | `random` | seeded uniform | [`super::random`] |
//!
//! `full` (no compression) is a name the evaluation understands, not a compressor.

use std::sync::Arc;

use super::evict::Evict;
use super::{
    AmCompressor, AmConfig, Compressor, ExpectedAttention, H2o, KNorm, PyramidKv, RandomEvict, SnapKv, StreamingLlm, Tova,
};
use crate::qfilters::{QFilterScorer, QFilters};
use crate::{Error, Result};

/// Every method name `kvcompact eval` accepts, in the order results are reported.
pub const METHODS: &[&str] = &[
    "am-omp",
    "am-highest",
    "baseline",
    "qfilters",
    "streaming-llm",
    "h2o",
    "snapkv",
    "pyramidkv",
    "tova",
    "knorm",
    "expected-attention",
    "random",
    "full",
];

/// Whether `name` is an Attention Matching method (fitted β / values, reference queries).
pub fn is_am(name: &str) -> bool {
    matches!(name, "am-omp" | "am-highest" | "baseline") || name.starts_with("am-")
}

/// Inputs some methods need to be built.
#[derive(Debug, Clone, Default)]
pub struct MethodOptions {
    /// Q-Filters filters (required by `qfilters`).
    pub filters: Option<Arc<QFilters>>,
}

/// Build a method from its name (`qfilters` needs [`method_with`] and filters).
pub fn method_from_name(name: &str) -> Result<Box<dyn Compressor>> {
    method_with(name, &MethodOptions::default())
}

/// Build a method from its name with the given options.
pub fn method_with(name: &str, opts: &MethodOptions) -> Result<Box<dyn Compressor>> {
    Ok(match name {
        "qfilters" => {
            let f = opts.filters.clone().ok_or_else(|| Error::Invalid("qfilters needs calibrated filters (kvcompact qfilters calibrate)".into()))?;
            Box::new(Evict(QFilterScorer::new(f)))
        }
        "streaming-llm" => Box::new(Evict(StreamingLlm::default())),
        "h2o" => Box::new(Evict(H2o::default())),
        "snapkv" => Box::new(Evict(SnapKv::default())),
        "pyramidkv" => Box::new(Evict(PyramidKv::default())),
        "tova" => Box::new(Evict(Tova)),
        "knorm" => Box::new(Evict(KNorm)),
        "expected-attention" => Box::new(Evict(ExpectedAttention::default())),
        "random" => Box::new(Evict(RandomEvict)),
        "full" => return Err(Error::Invalid("\"full\" keeps the whole cache; it is not a compressor".into())),
        _ => match AmConfig::from_name(name) {
            Ok(cfg) => Box::new(AmCompressor::new(cfg)),
            Err(_) => return Err(Error::Invalid(format!("unknown method {name:?} (expected one of {})", METHODS.join(", ")))),
        },
    })
}
