//! TOVA, token omission via attention (arXiv 2401.06104; spec `baselines.md` §2): keep the rows the
//! last token attends to most.
//!
//! Score: the attention weights of the last query (the last context token, softmaxed over every
//! row it sees), averaged over **all query heads of the layer** and broadcast to every KV head, so
//! all heads of a layer keep the same positions ([`Scorer::score_layer`]). The last token is
//! protected when it is part of the span. Decode-time TOVA (evict the argmin each step) is the
//! same score applied one row at a time.
//!
//! Single-head use ([`Scorer::score_head`], no layer view) averages over the head's own GQA group;
//! without observed context queries the last query of each head in `HeadInput::queries` is used.

use rayon::prelude::*;

use super::frame::span_attention;
use crate::compact::head::{HeadContext, HeadInput};
use crate::compact::method::{Protect, Scorer};
use crate::{Error, Result};

/// TOVA scorer: the last query's attention, one shared score per layer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Tova;

impl Tova {
    /// Sum over this KV head's query heads of the last query's weights on the span rows, and the
    /// number of query heads summed.
    fn group_sum(input: &HeadInput, ctx: &HeadContext) -> Result<(Vec<f64>, usize)> {
        let d = input.d;
        let t = input.rows();
        let g = ctx.group.max(1);
        let mut acc = vec![0.0f64; t];
        let add = |acc: &mut Vec<f64>, q: &[f32], pos: Option<u32>| {
            let p = pos.map(|p| [p]);
            span_attention(input, ctx, q, p.as_ref().map(|x| &x[..]), |_, w| acc.iter_mut().zip(w).for_each(|(a, x)| *a += x));
        };
        if let Some(o) = ctx.observed.filter(|o| !o.is_empty()) {
            let last = o.len() - 1;
            for r in 0..g {
                let q = o.head_rows(input.kv_head * g + r, d, last..last + 1);
                add(&mut acc, &q, Some(o.positions[last]));
            }
            return Ok((acc, g));
        }
        let q = input.queries.ok_or_else(|| Error::Invalid("tova: no queries (observed context queries or HeadInput::queries)".into()))?;
        let per = q.len() / d / g;
        if per == 0 {
            return Err(Error::Invalid("tova: fewer queries than query heads".into()));
        }
        for r in 0..g {
            let at = (r * per + per - 1) * d;
            add(&mut acc, &q[at..at + d], None);
        }
        Ok((acc, g))
    }
}

impl Scorer for Tova {
    fn name(&self) -> &'static str {
        "tova"
    }

    fn needs_queries(&self) -> bool {
        true
    }

    fn score_head(&self, input: &HeadInput, ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        let (acc, g) = Tova::group_sum(input, ctx)?;
        Ok(acc.into_iter().map(|x| x / g as f64).collect())
    }

    fn score_layer(&self, inputs: &[HeadInput], ctxs: &[HeadContext], seeds: &[u64]) -> Result<Vec<Vec<f64>>> {
        // One shared score needs the same span positions in every head (a fresh prefill);
        // otherwise (ragged heads) each head is scored on its own.
        let same = inputs.windows(2).all(|w| w[0].positions == w[1].positions);
        if !same || inputs.is_empty() {
            return inputs.par_iter().zip(ctxs).zip(seeds).map(|((i, c), &s)| self.score_head(i, c, s)).collect();
        }
        let sums: Vec<(Vec<f64>, usize)> = inputs.par_iter().zip(ctxs.par_iter()).map(|(i, c)| Tova::group_sum(i, c)).collect::<Result<_>>()?;
        let heads: usize = sums.iter().map(|s| s.1).sum();
        let t = inputs[0].rows();
        let mut mean = vec![0.0f64; t];
        for (s, _) in &sums {
            mean.iter_mut().zip(s).for_each(|(a, x)| *a += x);
        }
        mean.iter_mut().for_each(|x| *x /= heads.max(1) as f64);
        Ok(vec![mean; inputs.len()])
    }

    fn protect(&self, rows: usize, _budget: usize, ctx: &HeadContext) -> Protect {
        // The last token is protected when it is the span's last row.
        let last_in_span = match &ctx.full {
            Some(f) => f.span.end == f.positions.len(),
            None => rows > 0,
        };
        Protect { sinks: 0, window: usize::from(last_in_span) }
    }
}
