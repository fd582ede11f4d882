//! The common frame of the eviction baselines (spec `baselines.md` §1) and the extra inputs some
//! of them need.
//!
//! Every baseline is a [`Scorer`]: per (layer, KV head) it gives each row of the span a score,
//! higher = keep, that does not depend on the budget. [`select`] then applies the frame:
//! 1. protected rows first: the first `sinks` rows, then the last `window` rows (most recent
//!    first when the budget cannot hold them all);
//! 2. the rest of the budget goes to the highest scores, ties to the lower position;
//! 3. the kept rows are returned sorted by position, with their keys, values and prior bias
//!    (β = b, C_v = V[S]): [`keep_rows`].
//!
//! [`Evict`] turns a scorer into a [`Compressor`], so every method shares one interface; a harness
//! that compresses one context at many budgets can call [`Scorer::score_layer`] once and
//! [`select`] per budget (`Compressor::scorer`).
//!
//! Context ([`HeadContext`]): [`HeadInput`] holds only the span being compressed. Methods whose
//! score is an attention weight (H2O, SnapKV, TOVA, Expected Attention) need the softmax over
//! *every* row the query sees (template rows included) and the queries of the context tokens with
//! their positions (causal masking); the harness supplies both. Without them each method falls
//! back to `HeadInput::queries`, scored non-causally and normalised over the span (documented per
//! method), which is what `document::compact_context` can give.

use std::ops::Range;
use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::{CompactedHead, Compressor, HeadInput, HeadStats};
use crate::Result;

/// The whole cached head that the span is part of (template rows before and after included).
#[derive(Debug, Clone)]
pub struct FullHead<'a> {
    pub keys: &'a [f32],         // [N, d] post-RoPE
    pub bias: Option<&'a [f32]>, // [N] additive logit bias, None = 0
    pub positions: &'a [u32],    // [N] increasing
    /// The rows of the span (`HeadInput`'s rows) inside the N rows.
    pub span: Range<usize>,
}

/// Queries observed while the context was prefilled (post-RoPE, as `model::Capture` records them).
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    pub queries: &'a [f32],   // [m, n_heads * d] token-major, every query head of the layer
    pub positions: &'a [u32], // [m] increasing
    pub n_heads: usize,
}

impl Observed<'_> {
    pub fn len(&self) -> usize {
        self.positions.len()
    }
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
    /// Rows `rows` of query head `head`, gathered contiguously: [rows.len(), d].
    pub fn head_rows(&self, head: usize, d: usize, rows: Range<usize>) -> Vec<f32> {
        let stride = self.n_heads * d;
        let mut out = Vec::with_capacity(rows.len() * d);
        for t in rows {
            out.extend_from_slice(&self.queries[t * stride + head * d..t * stride + (head + 1) * d]);
        }
        out
    }
}

/// Extra inputs beyond [`HeadInput`]; every field is optional (see the module docs).
#[derive(Debug, Clone, Default)]
pub struct HeadContext<'a> {
    pub full: Option<FullHead<'a>>,
    pub observed: Option<Observed<'a>>,
    /// RoPE inverse frequencies [d/2] of the model ([`rope_inv_freq`]).
    pub inv_freq: Option<&'a [f32]>,
    /// Logical length of the sequence: the position the next token gets.
    pub next_pos: usize,
    /// Query heads per KV head (G); 0 = unknown (taken from the queries when needed).
    pub group: usize,
}

/// Rows protected from eviction (score +∞): the first `sinks` and the last `window` rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Protect {
    pub sinks: usize,
    pub window: usize,
}

/// A budget-independent row score (higher = keep). One file per method implements it.
pub trait Scorer: Send + Sync {
    fn name(&self) -> &'static str;
    /// The score needs queries: `HeadContext::observed` or, failing that, `HeadInput::queries`.
    fn needs_queries(&self) -> bool {
        false
    }
    /// Scores [T] of the span rows of one head.
    fn score_head(&self, input: &HeadInput, ctx: &HeadContext, seed: u64) -> Result<Vec<f64>>;
    /// Scores of every KV head of one layer (`inputs[h]` is KV head h). Default: each head on its
    /// own, in parallel; TOVA overrides it to share one score across the layer.
    fn score_layer(&self, inputs: &[HeadInput], ctxs: &[HeadContext], seeds: &[u64]) -> Result<Vec<Vec<f64>>> {
        inputs.par_iter().zip(ctxs.par_iter()).zip(seeds.par_iter()).map(|((i, c), &s)| self.score_head(i, c, s)).collect()
    }
    /// Protected rows for a span of `rows` rows kept to `budget`.
    fn protect(&self, _rows: usize, _budget: usize, _ctx: &HeadContext) -> Protect {
        Protect::default()
    }
    /// Per-(layer, KV head) budgets, layer-major; default uniform (PyramidKV overrides).
    fn head_budgets(&self, n_layers: usize, n_kv: usize, _rows: usize, budget: usize) -> Vec<usize> {
        vec![budget; n_layers * n_kv]
    }
}

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
/// positions `qpos` [m] only the rows at positions ≤ the query's (causal). `sink(i, w)` receives
/// query i's weights on the span rows, w [T] (0 for rows it cannot see), accumulated in f64.
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

// ---------------------------------------------------------------------------------------------
// RoPE helpers (rotate-half layout, as the model applies it)

/// RoPE inverse frequencies exactly as the forward pass uses them.
pub use crate::model::rope_inv_freq;

/// Rotate `x` [d] (rotate-half pairs (i, i + d/2)) by the RoPE angle of `pos`, or back by it
/// with `inverse`: pre-RoPE → post-RoPE and post → pre.
pub fn rope_rotate(x: &mut [f32], pos: u32, inv_freq: &[f32], inverse: bool) {
    let half = x.len() / 2;
    for j in 0..half.min(inv_freq.len()) {
        let a = (pos as f32 * inv_freq[j]) as f64;
        let (c, s) = (a.cos(), if inverse { -a.sin() } else { a.sin() });
        let (x0, x1) = (x[j] as f64, x[j + half] as f64);
        x[j] = (x0 * c - x1 * s) as f32;
        x[j + half] = (x1 * c + x0 * s) as f32;
    }
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

    #[test]
    fn rope_rotate_round_trips() {
        let inv = [1.0f32, 0.1, 0.01, 0.001];
        let x: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let mut y = x.clone();
        rope_rotate(&mut y, 37, &inv, false);
        assert!(x.iter().zip(&y).any(|(a, b)| (a - b).abs() > 1e-3));
        rope_rotate(&mut y, 37, &inv, true);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
