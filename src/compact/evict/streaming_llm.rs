//! StreamingLLM (arXiv 2309.17453; spec `baselines.md` §2): keep the first `n_sink` rows (attention
//! sinks) and the most recent rows; prune everything in between.
//!
//! Score s_j = j (recency) with the first `n_sink` rows protected, so the frame's top-k keeps the
//! sinks plus the last n_kept − n_sink rows. Kept rows keep their original positions (kvpress's
//! default; the paper re-assigns positions inside the cache, which needs re-rotation and is not
//! done here).

use crate::compact::head::{HeadContext, HeadInput};
use crate::compact::method::{Protect, Scorer};
use crate::Result;

/// StreamingLLM scorer: the first `n_sink` rows plus the most recent rows.
#[derive(Debug, Clone, Copy)]
pub struct StreamingLlm {
    /// Protected leading rows (spec default 4).
    pub n_sink: usize,
}

impl Default for StreamingLlm {
    fn default() -> Self {
        StreamingLlm { n_sink: 4 }
    }
}

impl Scorer for StreamingLlm {
    fn name(&self) -> &'static str {
        "streaming-llm"
    }

    fn score_head(&self, input: &HeadInput, _ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        Ok((0..input.rows()).map(|j| j as f64).collect())
    }

    fn protect(&self, _rows: usize, _budget: usize, _ctx: &HeadContext) -> Protect {
        Protect { sinks: self.n_sink, window: 0 }
    }
}
