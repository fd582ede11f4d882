//! The common frame of the eviction baselines (spec `baselines.md` §1) and the extra inputs some
//! of them need.
//!
//! Every baseline is a [`Scorer`](crate::compact::Scorer): per (layer, KV head) it gives each row of the span a score,
//! higher = keep, that does not depend on the budget. [`select`] then applies the frame:
//! 1. protected rows first: the first `sinks` rows, then the last `window` rows (most recent
//!    first when the budget cannot hold them all);
//! 2. the rest of the budget goes to the highest scores, ties to the lower position;
//! 3. the kept rows are returned sorted by position, with their keys, values and prior bias
//!    (β = b, C_v = V\[S\]): [`keep_rows`].
//!
//! [`Evict`] turns a scorer into a [`Compressor`](crate::compact::Compressor), so every method shares one interface; a harness
//! that compresses one context at many budgets can call [`Scorer::score_layer`](crate::compact::Scorer::score_layer) once and
//! [`select`] per budget (`Compressor::scorer`).
//!
//! kvpress semantics ([`kvpress`], spec `oracle.md` §2): [`Press`] reproduces each kvpress 0.5.5
//! press of the same name (sentinel-score protection, kvpress's PyramidKV budgets, Expected
//! Attention with ε = 0, torch's generator for random), and two methods only kvpress defines:
//! [`observed_attention`] (`ObservedAttentionPress`) and [`kvzip`] (`KVzipPress`, scored by a
//! repeat-the-context pass and selected across the whole model). `golden/kvpress/README.md` lists
//! every difference from the default scorers.
//!
//! Context ([`HeadContext`](crate::compact::HeadContext)): [`HeadInput`](crate::compact::HeadInput) holds only the span being compressed. Methods whose
//! score is an attention weight (H2O, SnapKV, TOVA, Expected Attention) need the softmax over
//! *every* row the query sees (template rows included) and the queries of the context tokens with
//! their positions (causal masking); the harness supplies both. Without them each method falls
//! back to `HeadInput::queries`, scored non-causally and normalised over the span (documented per
//! method), which is what `document::compact_context` can give.

pub mod expected_attention;
pub mod frame;
pub mod h2o;
pub mod knorm;
pub mod kvpress;
pub mod kvzip;
pub mod observed_attention;
pub mod pyramidkv;
pub mod random;
pub mod snapkv;
pub mod streaming_llm;
pub mod tova;

pub use expected_attention::ExpectedAttention;
pub use frame::{avg_pool, group_queries, keep_rows, log_sum_exp, select, span_attention, Evict};
pub use h2o::H2o;
pub use knorm::KNorm;
pub use kvpress::Press;
pub use kvzip::{KvZip, KvzipPrompts};
pub use observed_attention::ObservedAttention;
pub use pyramidkv::PyramidKv;
pub use random::{Mt19937, RandomEvict};
pub use snapkv::SnapKv;
pub use streaming_llm::StreamingLlm;
pub use tova::Tova;
