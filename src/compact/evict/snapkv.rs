//! SnapKV (arXiv 2404.14469; spec `baselines.md` §2): score the rows by the attention of an
//! observation window of the most recent queries, smoothed by pooling.
//!
//! 1. The window is the last `window` rows of the span (default 64); their queries (post-RoPE,
//!    recorded at prefill) are softmaxed over every row they see, causally.
//! 2. Mean over the window queries, then a 1-D average pool (kernel 5, stride 1, zero padding
//!    counted, as torch `avg_pool1d`) over the rows before the window, then the mean over the GQA
//!    group (kvpress `SnapKVPress`).
//! 3. The window rows are protected. When the budget is smaller than the window, the most recent
//!    rows win (the frame's rule; the spec does not say, and kvpress's tie with the maximum score
//!    leaves it to `topk`).
//!
//! Fallback without observed context queries: `HeadInput::queries` act as the window queries,
//! non-causal and normalised over the span.

use super::frame::{avg_pool, group_queries, span_attention};
use crate::compact::head::{HeadContext, HeadInput};
use crate::compact::method::{Protect, Scorer};
use crate::{Error, Result};

/// SnapKV scorer: pooled attention of the observation window's queries.
#[derive(Debug, Clone, Copy)]
pub struct SnapKv {
    /// Observation window w: the last w span rows, whose queries score the rest; protected (default 64).
    pub window: usize,
    /// Average-pool kernel over positions (default 5; 0 or 1 = no pooling).
    pub kernel: usize,
}

impl Default for SnapKv {
    fn default() -> Self {
        SnapKv { window: 64, kernel: 5 }
    }
}

impl SnapKv {
    /// Scores shared with PyramidKV.
    pub(crate) fn scores(&self, input: &HeadInput, ctx: &HeadContext) -> Result<Vec<f64>> {
        let t = input.rows();
        let w = self.window.min(t);
        let (heads, qpos) = group_queries(input, ctx).ok_or_else(|| Error::Invalid("snapkv: no queries (observed context queries or HeadInput::queries)".into()))?;
        let d = input.d;
        let prefix = t - w; // rows scored (before the window)
        let mut out = vec![0.0f64; t];
        for q in &heads {
            // The window queries: observed queries at the window rows' positions (all the given
            // queries in the fallback).
            let (wq, wpos): (Vec<f32>, Option<Vec<u32>>) = match &qpos {
                Some(p) => {
                    let win = &input.positions[prefix..];
                    let idx: Vec<usize> = (0..p.len()).filter(|&i| win.binary_search(&p[i]).is_ok()).collect();
                    let mut v = Vec::with_capacity(idx.len() * d);
                    for &i in &idx {
                        v.extend_from_slice(&q[i * d..(i + 1) * d]);
                    }
                    (v, Some(idx.iter().map(|&i| p[i]).collect()))
                }
                None => (q.clone(), None),
            };
            let nq = wq.len() / d;
            if nq == 0 {
                continue;
            }
            let mut mean = vec![0.0f64; t];
            span_attention(input, ctx, &wq, wpos.as_deref(), |_, wrow| {
                mean.iter_mut().zip(wrow).for_each(|(a, x)| *a += x);
            });
            let pooled = avg_pool(&mean[..prefix].iter().map(|x| x / nq as f64).collect::<Vec<_>>(), self.kernel);
            for (o, p) in out.iter_mut().zip(&pooled) {
                *o += p / heads.len() as f64;
            }
        }
        // Window rows: the maximum score, as kvpress pads them (they are protected anyway).
        let mx = out[..prefix].iter().copied().fold(0.0f64, f64::max);
        out[prefix..].iter_mut().for_each(|x| *x = mx);
        Ok(out)
    }
}

impl Scorer for SnapKv {
    fn name(&self) -> &'static str {
        "snapkv"
    }

    fn needs_queries(&self) -> bool {
        true
    }

    fn score_head(&self, input: &HeadInput, ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        self.scores(input, ctx)
    }

    fn protect(&self, _rows: usize, _budget: usize, _ctx: &HeadContext) -> Protect {
        Protect { sinks: 0, window: self.window }
    }
}
