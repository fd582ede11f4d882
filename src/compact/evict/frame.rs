//! The eviction frame (see [`super`]): protected rows, top scores, kept rows with their prior
//! bias; and the attention-over-the-span helpers shared by the attention-based scorers.

use std::ops::Range;
use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use crate::compact::head::{CompactedHead, HeadContext, HeadInput, HeadStats};
use crate::compact::method::{Compressor, Protect, Scorer};
use crate::Result;

/// The rows to keep: protected rows, then the top scores (ties to the lower row), sorted.
/// NaN scores rank below everything.
pub fn select(scores: &[f64], budget: usize, protect: Protect) -> Vec<usize> {
    let t = scores.len();
    let budget = budget.min(t);
    let sinks = protect.sinks.min(budget);
    let window = protect.window.min(budget - sinks).min(t - sinks);
    let mut keep: Vec<usize> = (0..sinks).chain(t - window..t).collect();
    let rest = budget - sinks - window;
    if rest > 0 {
        let key = |j: usize| if scores[j].is_nan() { f64::NEG_INFINITY } else { scores[j] };
        let mut cand: Vec<usize> = (sinks..t - window).collect();
        let cmp = |a: &usize, b: &usize| key(*b).total_cmp(&key(*a)).then(a.cmp(b));
        if rest < cand.len() {
            cand.select_nth_unstable_by(rest - 1, cmp);
            cand.truncate(rest);
        }
        keep.extend(cand);
    }
    keep.sort_unstable();
    keep
}

/// The kept rows of a span as a [`CompactedHead`]: keys, values and prior bias (0 without one).
pub fn keep_rows(input: &HeadInput, indices: &[usize]) -> CompactedHead {
    let d = input.d;
    let mut keys = Vec::with_capacity(indices.len() * d);
    let mut values = Vec::with_capacity(indices.len() * d);
    for &j in indices {
        keys.extend_from_slice(&input.keys[j * d..(j + 1) * d]);
        values.extend_from_slice(&input.values[j * d..(j + 1) * d]);
    }
    let beta = indices.iter().map(|&j| input.bias.map_or(0.0, |b| b[j])).collect();
    CompactedHead {
        indices: indices.to_vec(),
        keys,
        beta,
        values,
        stats: HeadStats { kept: indices.len(), values_method: "direct".into(), ..Default::default() },
    }
}

/// A [`Scorer`] as a [`Compressor`].
#[derive(Debug, Clone)]
pub struct Evict<S>(pub S);

impl<S: Scorer> Compressor for Evict<S> {
    fn name(&self) -> &'static str {
        self.0.name()
    }

    fn needs_queries(&self) -> bool {
        self.0.needs_queries()
    }

    fn compress_head(&self, input: &HeadInput, budget: usize, seed: u64) -> Result<CompactedHead> {
        self.compress_head_ctx(input, &HeadContext::default(), budget, seed)
    }

    fn compress_head_ctx(&self, input: &HeadInput, ctx: &HeadContext, budget: usize, seed: u64) -> Result<CompactedHead> {
        input.validate(budget, self.0.needs_queries() && ctx.observed.is_none())?;
        let t0 = Instant::now();
        let scores = self.0.score_head(input, ctx, seed)?;
        let keep = select(&scores, budget, self.0.protect(input.rows(), budget, ctx));
        let mut out = keep_rows(input, &keep);
        out.stats.select_seconds = t0.elapsed().as_secs_f64();
        Ok(out)
    }

    fn scorer(&self) -> Option<&dyn Scorer> {
        Some(&self.0)
    }

    fn head_budgets(&self, n_layers: usize, n_kv: usize, rows: usize, budget: usize) -> Vec<usize> {
        self.0.head_budgets(n_layers, n_kv, rows, budget)
    }
}

// ---------------------------------------------------------------------------------------------
// Attention over the span, shared by the attention-based scorers

/// The rows a softmax runs over: the full head if known, else the span itself.
struct Rows<'a> {
    keys: &'a [f32],         // [N, d]
    bias: Option<&'a [f32]>, // [N]
    positions: &'a [u32],    // [N]
    span: Range<usize>,
}

fn rows_of<'a>(input: &HeadInput<'a>, ctx: &HeadContext<'a>) -> Rows<'a> {
    match &ctx.full {
        Some(f) => Rows { keys: f.keys, bias: f.bias, positions: f.positions, span: f.span.clone() },
        None => Rows { keys: input.keys, bias: input.bias, positions: input.positions, span: 0..input.rows() },
    }
}

/// Queries per block of the logits GEMM ([block, N] f32 scratch).
const QBLOCK: usize = 128;

/// Attention weights of `queries` [m, d] over the span rows of a head. The softmax runs over every
/// row the query can see: the full head when `ctx.full` is set (else the span), and with
/// positions `qpos` \[m\] only the rows at positions ≤ the query's (causal). `sink(i, w)` receives
/// query i's weights on the span rows, w \[T\] (0 for rows it cannot see), accumulated in f64.
pub fn span_attention(input: &HeadInput, ctx: &HeadContext, queries: &[f32], qpos: Option<&[u32]>, mut sink: impl FnMut(usize, &[f64])) {
    let d = input.d;
    let rows = rows_of(input, ctx);
    let n = rows.positions.len();
    let m = queries.len() / d;
    if n == 0 || m == 0 {
        return;
    }
    let scale = input.scale;
    let mut logits = vec![0.0f32; QBLOCK.min(m) * n];
    let mut w = vec![0.0f64; rows.span.len()];
    let kt = MatRef::from_row_major_slice(rows.keys, n, d).transpose();
    for b0 in (0..m).step_by(QBLOCK) {
        let bl = QBLOCK.min(m - b0);
        // Causal: no query of the block sees past the rows visible to its latest query.
        let nb = match qpos {
            Some(p) => {
                let last = p[b0..b0 + bl].iter().copied().max().unwrap_or(0);
                rows.positions.partition_point(|&x| x <= last)
            }
            None => n,
        };
        if nb == 0 {
            w.iter_mut().for_each(|x| *x = 0.0);
            for i in 0..bl {
                sink(b0 + i, &w);
            }
            continue;
        }
        let qm = MatRef::from_row_major_slice(&queries[b0 * d..(b0 + bl) * d], bl, d);
        let lm = MatMut::from_row_major_slice_mut(&mut logits[..bl * nb], bl, nb);
        matmul(lm, Accum::Replace, qm, kt.subcols(0, nb), scale, Par::Seq);
        for i in 0..bl {
            let row = &mut logits[i * nb..(i + 1) * nb];
            // Visible rows: positions ≤ the query's (all without positions).
            let vis = match qpos {
                Some(p) => rows.positions.partition_point(|&x| x <= p[b0 + i]),
                None => n,
            }
            .min(nb);
            let mut mx = f32::NEG_INFINITY;
            for j in 0..vis {
                row[j] += rows.bias.map_or(0.0, |b| b[j]);
                mx = mx.max(row[j]);
            }
            let mut z = 0.0f64;
            for x in row[..vis].iter_mut() {
                *x = (*x - mx).exp();
                z += *x as f64;
            }
            w.iter_mut().for_each(|x| *x = 0.0);
            let hi = rows.span.end.min(vis);
            for j in rows.span.start..hi.max(rows.span.start) {
                w[j - rows.span.start] = row[j] as f64 / z;
            }
            sink(b0 + i, &w);
        }
    }
}

/// Log-sum-exp of each row of a logits vector, for tests: softmax(x)_j = exp(x_j − lse).
pub fn log_sum_exp(x: &[f64]) -> f64 {
    let mx = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return mx;
    }
    mx + x.iter().map(|v| (v - mx).exp()).sum::<f64>().ln()
}

/// The G query matrices of this KV head: from the observed context queries (with positions) when
/// present, else `HeadInput::queries` split group-major into G equal parts (no positions).
// The nested return type is spelled out on purpose: an alias would hide the shapes from callers.
#[allow(clippy::type_complexity)]
pub fn group_queries<'a>(input: &HeadInput<'a>, ctx: &HeadContext<'a>) -> Option<(Vec<Vec<f32>>, Option<Vec<u32>>)> {
    let d = input.d;
    if let Some(o) = ctx.observed {
        let g = ctx.group.max(1);
        let heads = (0..g).map(|r| o.head_rows(input.kv_head * g + r, d, 0..o.len())).collect();
        return Some((heads, Some(o.positions.to_vec())));
    }
    let q = input.queries?;
    let g = ctx.group.max(1);
    let per = q.len() / d / g;
    Some(((0..g).map(|r| q[r * per * d..(r + 1) * per * d].to_vec()).collect(), None))
}

/// 1-D average pooling with zero padding k/2, stride 1, same length; the padding counts in the
/// mean (torch `avg_pool1d` defaults, as kvpress uses it).
pub fn avg_pool(x: &[f64], kernel: usize) -> Vec<f64> {
    if kernel <= 1 {
        return x.to_vec();
    }
    let p = kernel / 2;
    let n = x.len();
    // torch pads both sides by p and outputs n + 2p − k + 1 values; with odd k that is n.
    (0..n)
        .map(|i| {
            let lo = i.saturating_sub(p);
            let hi = (i + kernel - p).min(n);
            x[lo..hi].iter().sum::<f64>() / kernel as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_protects_then_takes_top_scores() {
        let s = [0.5, 0.9, 0.1, 0.9, 0.3, 0.2, 0.8];
        assert_eq!(select(&s, 3, Protect::default()), vec![1, 3, 6]);
        // Ties go to the lower row.
        assert_eq!(select(&s, 1, Protect::default()), vec![1]);
        assert_eq!(select(&s, 3, Protect { sinks: 1, window: 1 }), vec![0, 1, 6]);
        // The window keeps its most recent rows when the budget is short.
        assert_eq!(select(&s, 2, Protect { sinks: 0, window: 4 }), vec![5, 6]);
        assert_eq!(select(&s, 10, Protect::default()), (0..7).collect::<Vec<_>>());
        assert!(select(&s, 0, Protect { sinks: 2, window: 2 }).is_empty());
        assert_eq!(select(&[f64::NAN, 1.0, 0.0], 2, Protect::default()), vec![1, 2]);
    }

    #[test]
    fn avg_pool_matches_torch_with_zero_padding() {
        let x = [1.0, 2.0, 3.0, 4.0, 5.0];
        let y = avg_pool(&x, 3);
        let want = [3.0 / 3.0, 6.0 / 3.0, 9.0 / 3.0, 12.0 / 3.0, 9.0 / 3.0];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12);
        }
        assert_eq!(avg_pool(&x, 5)[0], 6.0 / 5.0);
    }
}
