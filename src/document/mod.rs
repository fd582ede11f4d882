//! Document-level compaction: prefill a context, draw reference queries from the model, compact
//! every (layer, KV head) of the context's article span, and install the result in the cache.
//!
//! - [`layout`]: a context as `prefix` (template tokens before the article), `article` (the span
//!   that is compacted) and `suffix` (end of turn); prefix and suffix rows stay verbatim (β = 0);
//! - [`queries`]: where reference queries come from (repeat, self-study, context, random, mix) and
//!   the layer-by-layer runner that extracts them, off- or on-policy (spec §8);
//! - [`compact`]: [`compact_context`], span compaction and installation into the cache;
//! - [`budgets`]: per-head budgets (uniform, the spec §11 water-fill, or one global top-k);
//!   [`influence`]: the influence-curve sweep and swap solver that make budget proportions;
//! - [`answer`](mod@answer): greedy answers and answer log-likelihoods on a cached context;
//! - [`press`]: [`press_context`], a whole context through one kvpress press (`--kvpress`);
//! - [`online`]: compaction during generation, as a [`crate::generate::CachePolicy`].
//!
//! The compacted-cache file format lives in [`crate::cache::file`].

pub mod answer;
pub mod budgets;
pub mod compact;
pub mod influence;
pub mod layout;
pub mod online;
pub mod press;
pub mod queries;

pub use answer::{answer, answer_nll};
pub use budgets::{head_budgets, read_proportions, write_proportions};
pub use compact::{compact_context, document_method, CompactOptions, CompactReport, LayerSummary};
pub use layout::{continuation_tokens, followup_tokens, generation_tokens, ContextLayout};
pub use online::{compact_older_rows, OnlineCompaction};
pub use press::{generation_suffix, press_context, PressReport};
pub use queries::{repeat_tokens, self_study_tokens, QuerySource, REPEAT_INSTRUCTION};
