//! Q-Filters (spec `q-filters.md`): calibration, the filter file, scoring, and the streaming cache.
//!
//! - **Calibration** (§2, [`calibrate`](mod@calibrate)): run text through the model, record the post-RoPE queries of every query
//!   head at every layer, accumulate the uncentered second moment G = Σ q·qᵀ (f64) and m = Σ q, and
//!   keep a seeded reservoir of token rows. v₁ = top eigenvector of G (faer `self_adjoint_eigen`;
//!   [`power_iteration`] is the cross-check). Sign by majority vote on the reservoir: s = +1 when
//!   more than half the rows have ⟨q, v₁⟩ > 0. The stored filter is **f = −s·v₁** ("negated"
//!   convention, as `make_filters.py` stores it), averaged over each GQA group without
//!   renormalising.
//! - **File** (§3): safetensors, one f32 tensor `q_filters` [layers, kv_heads, head_dim] and
//!   metadata (convention, model fingerprint, corpus, tokens, sign rule, seed, tool version).
//! - **Scoring** (§4): score(k) = −⟨k, f⟩ on post-RoPE cached keys; keep the highest.
//! - **Streaming** (§5, [`streaming`]): [`StreamingCache`], a [`CachePolicy`](crate::generate::CachePolicy) that keeps at most `budget` rows per
//!   KV head during generation: the last `window` rows and the first `sinks` rows always, the rest
//!   by score. Rows keep their true positions; the logical counter is never touched.

pub mod calibrate;
pub mod filters;
pub mod streaming;

pub use calibrate::{
    calibrate, calibrate_model, corpus_from_texts, load_or_calibrate, majority_sign, power_iteration, self_generated_corpus, shipped_docs, top_eigen,
    Accumulator, CalibrateOptions, Calibrated, Corpus,
};
pub use filters::{spearman, QFilterScorer, QFilters, DEFAULT_FILTERS_FILE, SHIPPED_CORPUS, TENSOR};
pub use streaming::{streaming_policy, StreamingCache};
