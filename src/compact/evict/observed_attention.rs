//! Observed attention (kvpress `ObservedAttentionPress`; spec `oracle.md` §2): keep the rows that
//! received the most attention while the context was prefilled.
//!
//! Score: the column sums of the causal prefill attention of the context's own queries, each
//! divided by the number of queries that could attend to the row (T − j for a fresh prefill),
//! then the mean over the GQA group — the same score as [`super::h2o`]'s prefill score, but with
//! **no protected rows** (H2O adds a recent window). kvpress needs the materialised attention
//! (`attn_implementation="eager"`); here it is recomputed from the observed queries.
//!
//! Fallback without observed context queries: `HeadInput::queries`, non-causal, normalised over
//! the span; the score is then the mean attention over those queries.

use super::h2o::observed_scores;
use crate::compact::head::{HeadContext, HeadInput};
use crate::compact::method::Scorer;
use crate::Result;

/// Observed-attention scorer: the causal attention each row received, normalised by 1/(T − j).
#[derive(Debug, Clone, Copy, Default)]
pub struct ObservedAttention;

impl Scorer for ObservedAttention {
    fn name(&self) -> &'static str {
        "observed-attention"
    }

    fn needs_queries(&self) -> bool {
        true
    }

    fn score_head(&self, input: &HeadInput, ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        observed_scores(input, ctx, "observed-attention")
    }
}
