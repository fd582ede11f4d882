//! Per-head budget proportions from influence curves and a swap solver (spec §11, "Making
//! `optimized_agnostic.json`"). The sweep measures, for every (layer, KV head) and every article
//! fraction in a grid, how much the reference answers' log-perplexity moves when that head alone
//! keeps that fraction while every other head keeps the base fraction. The solver then moves
//! budget, a small step at a time, from the head that misses it least to the head that gains most.
//!
//! Off-policy compaction makes each head's rows independent of the others' budgets (a head is
//! compacted from the full cache with the full cache's queries and its own seed), so one
//! compaction per fraction gives every head's variant; only the answer pass runs per (head,
//! fraction), and only from the head's layer on ([`Model::forward_from`]).

use std::ops::Range;

use super::answer::{answer, mean_nll};
use super::compact::{compact_context, CompactOptions};
use super::layout::ContextLayout;
use crate::cache::{HeadRows, KvCache};
use crate::compact::{Budget, Compressor};
use crate::error::{Error, Result};
use crate::model::{Logits, Model, DEFAULT_MAX_BATCH};

/// One calibration context: its layout and the questions asked after it.
#[derive(Debug, Clone)]
pub struct Calibration {
    /// The context.
    pub layout: ContextLayout,
    /// Each question as token ids (follow-up turn and answer prefix), with the greedy length of
    /// its reference answer.
    pub questions: Vec<(Vec<u32>, usize)>,
}

/// Options of [`influence_curves`].
#[derive(Debug, Clone)]
pub struct InfluenceOptions {
    /// Article fractions a swept head keeps, increasing, within [0, 1] (0: the head drops the
    /// article; 1: it keeps it whole). Must contain `base`.
    pub fractions: Vec<f64>,
    /// The fraction every other head keeps while one is swept (spec: 0.05).
    pub base: f64,
    /// How each fraction is compacted (queries, count, seed); its budget and budget options are
    /// replaced, and it must be off-policy and unchunked.
    pub compact: CompactOptions,
}

/// What the sweep measured. `delta[h][r]` is the mean over contexts of the change in the mean
/// reference-answer NLL (nats/token) when head h (layer-major) alone keeps `fractions[r]`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InfluenceCurves {
    /// The compaction method's name.
    pub method: String,
    /// Article fractions of the grid, increasing.
    pub fractions: Vec<f64>, // [R]
    /// The fraction every other head kept.
    pub base: f64,
    /// Mean reference-answer NLL with every head at `base`.
    pub base_nll: f64,
    /// Mean reference-answer NLL with the full cache.
    pub full_nll: f64,
    /// KV heads per layer (to name head h as `L{h / n_kv}H{h % n_kv}`).
    pub n_kv_heads: usize,
    /// Δ NLL per head and fraction.
    pub delta: Vec<Vec<f64>>, // [H][R]
    /// Calibration contexts and questions behind the means.
    pub contexts: usize,
    /// Questions over all contexts.
    pub questions: usize,
}

impl InfluenceOptions {
    fn check(&self) -> Result<usize> {
        let f = &self.fractions;
        if f.iter().any(|x| !(0.0..=1.0).contains(x)) || f.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Invalid(format!("influence fractions must be increasing and within [0, 1], got {f:?}")));
        }
        let base = f.iter().position(|&x| x == self.base).ok_or_else(|| Error::Invalid(format!("the base fraction {} must be one of the fractions {f:?}", self.base)))?;
        if !(self.base > 0.0) {
            return Err(Error::Invalid("the base fraction must be above 0".into()));
        }
        if self.compact.on_policy || self.compact.chunk_tokens.is_some() {
            return Err(Error::Invalid("the influence sweep compacts off-policy and unchunked (each head independent of the others)".into()));
        }
        Ok(base)
    }
}

/// Mean NLL of `answer` where logits row k [vocab] predicts `answer[k]`, with the kernels' f32
/// exp (the sweep compares NLLs of near-identical caches; f32's ~1e-6 relative error in the
/// log-sum-exp is far below the differences it ranks). `logits` is overwritten.
fn fast_nll(logits: &mut [f32], vocab: usize, answer: &[u32]) -> f64 {
    let mut total = 0.0f64;
    for (k, &t) in answer.iter().enumerate() {
        let row = &mut logits[k * vocab..(k + 1) * vocab];
        let target = row[t as usize];
        let (max, sum) = kvcompact_kernels::exp_shift_sum(row);
        total += (max as f64 + (sum as f64).ln()) - target as f64;
    }
    total / answer.len().max(1) as f64
}

/// Rows of head (l, h) of `cache`, copied.
fn head_rows(cache: &KvCache, l: usize, h: usize) -> HeadRows {
    let (keys, values, bias, positions) = cache.head(l, h);
    HeadRows { keys: keys.to_vec(), values: values.to_vec(), positions: positions.to_vec(), bias: bias.map(<[f32]>::to_vec) }
}

/// `rows` without the rows whose positions fall in `span` (a head that keeps none of the article).
fn without_span(rows: &HeadRows, span: &Range<usize>, hd: usize) -> HeadRows {
    let keep: Vec<usize> = (0..rows.positions.len()).filter(|&j| !span.contains(&(rows.positions[j] as usize))).collect();
    HeadRows {
        keys: keep.iter().flat_map(|&j| rows.keys[j * hd..(j + 1) * hd].iter().copied()).collect(),
        values: keep.iter().flat_map(|&j| rows.values[j * hd..(j + 1) * hd].iter().copied()).collect(),
        positions: keep.iter().map(|&j| rows.positions[j]).collect(),
        bias: rows.bias.as_ref().map(|b| keep.iter().map(|&j| b[j]).collect()),
    }
}

/// Measure the influence curves of every head on `items` (spec §11). `progress` is called once
/// per (context, head) swept.
pub fn influence_curves(model: &Model, tok: &crate::tokenizer::Tokenizer, items: &[Calibration], method: &dyn Compressor, opts: &InfluenceOptions, mut progress: impl FnMut()) -> Result<InfluenceCurves> {
    let base_at = opts.check()?;
    if items.is_empty() {
        return Err(Error::Invalid("the influence sweep needs at least one calibration context".into()));
    }
    let c = &model.config;
    let (nl, nkv, hd, vocab) = (c.n_layers, c.n_kv_heads, c.head_dim, c.vocab_size);
    let (nh, nr) = (nl * nkv, opts.fractions.len());
    let mut delta = vec![vec![0.0f64; nr]; nh];
    let (mut base_sum, mut full_sum, mut n_questions, mut n_ctx) = (0.0, 0.0, 0usize, 0usize);
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    for item in items {
        let layout = &item.layout;
        let pos0 = layout.len();
        let span = layout.prefix.len()..layout.prefix.len() + layout.article.len();
        let mut full = model.new_cache();
        model.forward(&mut st, &mut full, &layout.tokens(), Logits::None)?;
        // Reference answers: the full cache's greedy answers; (input, first answer row, answer).
        let mut refs: Vec<(Vec<u32>, usize, Vec<u32>)> = Vec::new();
        for (ids, max_new) in &item.questions {
            let ans = answer(model, &mut st, &mut full, ids, &tok.eos_ids, *max_new)?;
            if ans.is_empty() || ids.is_empty() {
                continue;
            }
            let input: Vec<u32> = ids.iter().chain(&ans[..ans.len() - 1]).copied().collect();
            if input.len() > st.max_batch() {
                return Err(Error::Prompt(format!("a calibration question and answer of {} tokens exceed one batch of {}", input.len(), st.max_batch())));
            }
            refs.push((input, ids.len() - 1, ans));
        }
        if refs.is_empty() {
            continue;
        }
        // One cache per fraction: every head at that fraction (None: 0, dropped per head below).
        let mut caches: Vec<Option<KvCache>> = Vec::with_capacity(nr);
        for &f in &opts.fractions {
            let rows = (layout.article.len() as f64 * f).floor() as usize;
            caches.push(if f >= 1.0 {
                Some(full.clone())
            } else if rows == 0 {
                None
            } else {
                let o = CompactOptions { budget: Budget::Rows(rows), budgets: None, global_budgets: false, ..opts.compact.clone() };
                Some(compact_context(model, tok, layout, method, &o)?.0)
            });
        }
        let mut base = caches[base_at].take().ok_or_else(|| Error::Invalid("the base fraction keeps no row of this context; raise it".into()))?;
        // Each question's residual at every layer's input under the base cache, and its NLL.
        let mut hidden: Vec<Vec<Vec<f32>>> = Vec::with_capacity(refs.len()); // [Q][L][n*d]
        let mut base_nll = Vec::with_capacity(refs.len());
        let mut scratch: Vec<f32> = Vec::new();
        let mut run_from = |st: &mut crate::model::RunState, cache: &mut KvCache, l: usize, h_in: &[f32], (input, first, ans): &(Vec<u32>, usize, Vec<u32>)| {
            let n = input.len();
            model.prepare_positions(st, n, pos0);
            model.residual(st, n).copy_from_slice(h_in);
            scratch.clear();
            scratch.extend_from_slice(model.forward_from(l, st, cache, n, *first));
            fast_nll(&mut scratch, vocab, ans)
        };
        for r in &refs {
            let n = r.0.len();
            model.embed(&mut st, &r.0);
            model.prepare_positions(&mut st, n, pos0);
            let mut hs = Vec::with_capacity(nl);
            for l in 0..nl {
                hs.push(model.residual(&mut st, n).to_vec());
                model.layer(l, &mut st, &mut base, n);
                base.truncate_layer_to(l, pos0);
            }
            base_nll.push(run_from(&mut st, &mut base, 0, &hs[0], r));
            hidden.push(hs);
        }
        let ctx_base = base_nll.iter().sum::<f64>() / refs.len() as f64;
        base_sum += ctx_base;
        full_sum += refs.iter().map(|r| {
            let input = &r.0;
            let out = model.forward(&mut st, &mut full, input, Logits::All).map(|_| mean_nll(&st.logits, vocab, r.1, &r.2));
            full.truncate_to(pos0);
            out
        }).sum::<Result<f64>>()? / refs.len() as f64;
        n_questions += refs.len();
        n_ctx += 1;
        for (i, curve) in delta.iter_mut().enumerate() {
            let (l, h) = (i / nkv, i % nkv);
            let kept = head_rows(&base, l, h);
            for (ri, slot) in curve.iter_mut().enumerate() {
                if ri == base_at {
                    continue;
                }
                let rows = match &caches[ri] {
                    Some(cache) => head_rows(cache, l, h),
                    None => without_span(&kept, &span, hd),
                };
                base.replace_head(l, h, rows)?;
                let mut sum = 0.0;
                for (q, r) in refs.iter().enumerate() {
                    sum += run_from(&mut st, &mut base, l, &hidden[q][l], r) - base_nll[q];
                }
                *slot += sum / refs.len() as f64;
            }
            base.replace_head(l, h, kept)?;
            progress();
        }
    }
    if n_ctx == 0 {
        return Err(Error::Prompt("no calibration question got an answer from the full cache".into()));
    }
    let n_ctx_f = n_ctx as f64;
    for curve in delta.iter_mut() {
        curve.iter_mut().for_each(|x| *x /= n_ctx_f);
    }
    Ok(InfluenceCurves {
        method: method.name().into(),
        fractions: opts.fractions.clone(),
        base: opts.base,
        base_nll: base_sum / n_ctx_f,
        full_nll: full_sum / n_ctx_f,
        n_kv_heads: nkv,
        delta,
        contexts: n_ctx,
        questions: n_questions,
    })
}

/// Options of [`swap_solve`] (spec §11: step 0.001, loss averaged over overall fractions
/// {0.01, 0.02, 0.05, 0.1}, stop after 10 steps without improvement).
#[derive(Debug, Clone)]
pub struct SwapOptions {
    /// Overall article fractions (1 / ratio) the loss is averaged over.
    pub targets: Vec<f64>,
    /// Proportion moved per step.
    pub step: f64,
    /// Steps without a new best loss before the solver stops.
    pub patience: usize,
    /// Hard cap on steps.
    pub max_steps: usize,
}

impl Default for SwapOptions {
    fn default() -> Self {
        SwapOptions { targets: vec![0.01, 0.02, 0.05, 0.1], step: 0.001, patience: 10, max_steps: 1_000_000 }
    }
}

/// What [`swap_solve`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Solved {
    /// Proportions per head (layer-major), summing to 1.
    pub proportions: Vec<f64>, // [H]
    /// Predicted loss (sum over heads of Δ NLL, mean over targets) with uniform proportions.
    pub uniform_loss: f64,
    /// Predicted loss with the solved proportions.
    pub loss: f64,
    /// Steps taken.
    pub steps: usize,
}

/// The curves made non-increasing in the fraction (a head never loses by keeping more rows; the
/// measured curves can wiggle by noise), as a piecewise-linear function.
struct Curves<'a> {
    x: &'a [f64],
    y: Vec<Vec<f64>>, // [H][R]
}

impl Curves<'_> {
    fn new(c: &InfluenceCurves) -> Curves<'_> {
        let y = c
            .delta
            .iter()
            .map(|d| {
                let mut m = d.clone();
                for k in (0..m.len().saturating_sub(1)).rev() {
                    m[k] = m[k].max(m[k + 1]);
                }
                m
            })
            .collect();
        Curves { x: &c.fractions, y }
    }

    /// Δ of head h at fraction f, interpolated; held constant outside the grid.
    fn at(&self, h: usize, f: f64) -> f64 {
        let (x, y) = (self.x, &self.y[h]);
        let k = x.partition_point(|&v| v <= f);
        if k == 0 {
            return y[0];
        }
        if k == x.len() {
            return y[x.len() - 1];
        }
        let t = (f - x[k - 1]) / (x[k] - x[k - 1]);
        y[k - 1] + t * (y[k] - y[k - 1])
    }

    /// Head h's loss at proportion p, averaged over the target fractions.
    fn head_loss(&self, h: usize, p: f64, targets: &[f64]) -> f64 {
        let hn = self.y.len() as f64;
        targets.iter().map(|&t| self.at(h, (p * t * hn).min(1.0))).sum::<f64>() / targets.len() as f64
    }
}

/// The greedy swap solver of spec §11 on `curves`: start uniform; each step moves `step` of
/// proportion from the head whose loss rises least when it gives it up to the head whose loss
/// falls most when it receives it; keep the best proportions seen; stop after `patience` steps
/// without a new best. Deterministic (ties go to the lower head index).
pub fn swap_solve(curves: &InfluenceCurves, o: &SwapOptions) -> Result<Solved> {
    let nh = curves.delta.len();
    if nh == 0 || o.targets.is_empty() || o.targets.iter().any(|&t| !(t > 0.0 && t <= 1.0)) || !(o.step > 0.0 && o.step < 1.0) {
        return Err(Error::Invalid("the swap solver needs heads, targets in (0, 1] and a step in (0, 1)".into()));
    }
    let cv = Curves::new(curves);
    let mut p = vec![1.0 / nh as f64; nh];
    let mut loss_h: Vec<f64> = (0..nh).map(|h| cv.head_loss(h, p[h], &o.targets)).collect();
    let uniform_loss: f64 = loss_h.iter().sum();
    let (mut best, mut best_p, mut stall, mut steps) = (uniform_loss, p.clone(), 0usize, 0usize);
    while stall < o.patience && steps < o.max_steps {
        let mut recv: Option<(usize, f64, f64)> = None; // (head, new loss, gain)
        let mut give: Option<(usize, f64, f64)> = None; // (head, new loss, cost)
        for h in 0..nh {
            let up = cv.head_loss(h, p[h] + o.step, &o.targets);
            if recv.is_none_or(|(_, _, g)| loss_h[h] - up > g) {
                recv = Some((h, up, loss_h[h] - up));
            }
            if p[h] >= o.step {
                let down = cv.head_loss(h, p[h] - o.step, &o.targets);
                if give.is_none_or(|(_, _, c)| down - loss_h[h] < c) {
                    give = Some((h, down, down - loss_h[h]));
                }
            }
        }
        let (Some((r, r_loss, _)), Some((g, g_loss, _))) = (recv, give) else { break };
        if r == g {
            break;
        }
        p[r] += o.step;
        p[g] -= o.step;
        loss_h[r] = r_loss;
        loss_h[g] = g_loss;
        steps += 1;
        let total: f64 = loss_h.iter().sum();
        if total < best - 1e-12 {
            (best, best_p, stall) = (total, p.clone(), 0);
        } else {
            stall += 1;
        }
    }
    let s: f64 = best_p.iter().map(|x| x.max(0.0)).sum();
    let proportions = best_p.iter().map(|x| x.max(0.0) / s).collect();
    Ok(Solved { proportions, uniform_loss, loss: best, steps })
}

/// Proportions (layer-major) as the budgets file's map `{"L{l}H{h}": p}`.
pub fn proportions_map(p: &[f64], n_kv: usize) -> std::collections::HashMap<String, f64> {
    p.iter().enumerate().map(|(i, &x)| (format!("L{}H{}", i / n_kv, i % n_kv), x)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn curves(delta: Vec<Vec<f64>>) -> InfluenceCurves {
        InfluenceCurves { method: "t".into(), fractions: vec![0.0, 0.05, 0.1, 0.2, 1.0], base: 0.05, base_nll: 1.0, full_nll: 0.5, n_kv_heads: 1, delta, contexts: 1, questions: 1 }
    }

    #[test]
    fn the_solver_moves_budget_to_the_head_that_needs_it() {
        // Head 0 loses a lot below its base share and gains a lot above it; head 1 barely cares.
        let c = curves(vec![vec![2.0, 0.0, -1.0, -1.5, -1.6], vec![0.02, 0.0, 0.0, 0.0, 0.0]]);
        let s = swap_solve(&c, &SwapOptions { targets: vec![0.05], step: 0.01, ..Default::default() }).unwrap();
        assert!((s.proportions.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        assert!(s.proportions[0] > 0.7, "{:?}", s.proportions);
        assert!(s.loss < s.uniform_loss);
        // Equal heads stay uniform: no move beats the start.
        let e = curves(vec![vec![1.0, 0.0, -0.5, -0.6, -0.7]; 3]);
        let s = swap_solve(&e, &SwapOptions { targets: vec![0.05], step: 0.01, ..Default::default() }).unwrap();
        assert!(s.proportions.iter().all(|&x| (x - 1.0 / 3.0).abs() < 1e-12), "{:?}", s.proportions);
        assert_eq!(s.loss, s.uniform_loss);
    }

    #[test]
    fn curves_are_made_monotone_and_interpolated() {
        let c = curves(vec![vec![1.0, 0.0, 0.3, -0.2, -0.1]]);
        let cv = Curves::new(&c);
        assert_eq!(cv.y[0], vec![1.0, 0.3, 0.3, -0.1, -0.1]);
        assert!((cv.at(0, 0.025) - 0.65).abs() < 1e-12);
        assert_eq!(cv.at(0, 2.0), -0.1);
    }

    #[test]
    fn bad_options_are_refused() {
        let c = curves(vec![vec![0.0; 5]]);
        assert!(swap_solve(&c, &SwapOptions { targets: vec![], ..Default::default() }).is_err());
        assert!(swap_solve(&c, &SwapOptions { step: 0.0, ..Default::default() }).is_err());
        let o = InfluenceOptions { fractions: vec![0.0, 0.1], base: 0.05, compact: CompactOptions::default() };
        assert!(o.check().is_err());
        let o = InfluenceOptions { fractions: vec![0.1, 0.05], base: 0.05, compact: CompactOptions::default() };
        assert!(o.check().is_err());
    }
}
