//! KVzip (arXiv 2505.23416; kvpress `KVzipPress`, spec `baselines.md` §2 "later additions" and
//! `oracle.md` §2): score each context row by the attention it receives while the model
//! **repeats the context**, a query-agnostic reconstruction signal.
//!
//! As kvpress 0.5.5 runs it:
//! 1. The context (template prefix + text) is prefilled. Its rows after the template prefix are
//!    cut into chunks of `chunk_size` tokens; chunk i is "repeated" by running, after the
//!    context, `prompt + suffix + chunk` where the prompt is [`FIRST_PROMPT`] (or [`NEXT_PROMPT`]
//!    followed by the previous chunk's last 8 tokens) and the suffix is the chat template's end
//!    of user turn + assistant start ([`KvzipPrompts`]).
//! 2. Per layer and query head, the repeat pass's queries (post-RoPE) are softmaxed over a
//!    **subset** of the keys only: the first min(n_sink, chunk start) rows, the chunk's rows, and
//!    the repeat pass's own keys (causal among themselves). A chunk row's score is the maximum of
//!    its weight over the repeat queries and the GQA group ([`KvZip`] as a [`Scorer`]).
//! 3. Rows of the template prefix are not reconstructed and score 0; the first `n_sink` rows get
//!    the sentinel max + 1 over **all** layers. With `layerwise = false` (the default) the
//!    `int(L·n_kv·T·r)` lowest scores over the whole model are evicted, so heads keep different
//!    numbers of rows ([`KvZip::keep`]); kvpress masks them with a fake key, here they are freed.
//!
//! The repeat pass needs the model, so [`KvZip::scores`] drives it on a prefilled cache; used
//! through the per-head [`Scorer`] interface, the context must hold the repeat rows
//! (`HeadContext::full`) and their queries (`HeadContext::observed`).

use std::ops::Range;

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::cache::KvCache;
use crate::compact::head::{FullHead, HeadContext, HeadInput, Observed};
use crate::compact::method::{Protect, Scorer};
use crate::linalg::expf::row_softmax_stats;
use crate::model::{Capture, Logits, Model};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// kvpress's prompt before the first chunk's repetition.
pub const FIRST_PROMPT: &str = "\n\nRepeat the previous context exactly.";
/// kvpress's prompt before every later chunk's repetition (followed by the previous chunk's tail).
pub const NEXT_PROMPT: &str = "\n\nRepeat the part of the previous context exactly, starting with";
/// Tokens of the previous chunk repeated after [`NEXT_PROMPT`] (kvpress `prev_postfix_size`).
pub const PREV_POSTFIX: usize = 8;

/// The token ids of the repeat prompts: [`FIRST_PROMPT`], [`NEXT_PROMPT`] (both encoded without
/// special tokens) and the chat template's suffix (what follows the user's text up to the
/// assistant's turn, e.g. `<|im_end|>\n<|im_start|>assistant\n`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvzipPrompts {
    /// [`FIRST_PROMPT`]'s ids.
    pub first: Vec<u32>,
    /// [`NEXT_PROMPT`]'s ids.
    pub next: Vec<u32>,
    /// The chat template's suffix ids (`"\n"` for a model without a template, as kvpress).
    pub suffix: Vec<u32>,
}

impl KvzipPrompts {
    /// The prompts encoded with `tok`; `suffix` is the template's suffix (the caller renders it).
    pub fn new(tok: &Tokenizer, suffix: Vec<u32>) -> Result<KvzipPrompts> {
        Ok(KvzipPrompts { first: tok.encode(FIRST_PROMPT, false)?, next: tok.encode(NEXT_PROMPT, false)?, suffix })
    }
}

/// KVzip: the maximum attention a row receives while the context is repeated.
#[derive(Debug, Clone, Copy)]
pub struct KvZip {
    /// Leading rows always kept (sentinel score) and always in the repeat softmax (default 4).
    pub n_sink: usize,
    /// Context tokens repeated per pass (default 2048).
    pub chunk_size: usize,
    /// Evict the same share of every layer (kvpress `layerwise = True`) instead of the lowest
    /// scores over the whole model (default false).
    pub layerwise: bool,
}

impl Default for KvZip {
    fn default() -> Self {
        KvZip { n_sink: 4, chunk_size: 2048, layerwise: false }
    }
}

/// Row-major gather of `rows` of a [N, d] matrix.
fn gather(m: &[f32], d: usize, rows: impl Iterator<Item = usize>) -> Vec<f32> {
    rows.flat_map(|j| m[j * d..(j + 1) * d].iter().copied()).collect()
}

impl KvZip {
    /// The chunks of context rows `[prefix_len, T)` and the token ids each repeat pass runs
    /// (kvpress `KVzipPress.prepare`): one chunk when the text fits in `chunk_size`.
    pub fn repeat_inputs(&self, prompts: &KvzipPrompts, context: &[u32], prefix_len: usize) -> Vec<(Range<usize>, Vec<u32>)> {
        let t = context.len();
        let start = prefix_len.min(t);
        let size = self.chunk_size.max(1);
        let chunks: Vec<Range<usize>> = if t - start > size {
            (start..t).step_by(size).map(|a| a..(a + size).min(t)).collect()
        } else {
            std::iter::once(start..t).collect()
        };
        let mut out = Vec::with_capacity(chunks.len());
        for (i, c) in chunks.iter().enumerate() {
            let mut ids = if i == 0 { prompts.first.clone() } else { prompts.next.clone() };
            if i > 0 {
                let prev = &chunks[i - 1];
                ids.extend_from_slice(&context[prev.end.saturating_sub(PREV_POSTFIX).max(prev.start)..prev.end]);
            }
            ids.extend_from_slice(&prompts.suffix);
            ids.extend_from_slice(&context[c.clone()]);
            out.push((c.clone(), ids));
        }
        out
    }

    /// KVzip scores \[L·n_kv\]\[T\] (layer-major) of a cache holding exactly the prefilled context
    /// `context` (positions 0..T): every repeat pass runs after it (queries captured), each
    /// layer's chunk rows are scored, and the cache is rolled back to T rows. Rows of the template
    /// prefix (`< prefix_len`) score 0; no sentinel is applied (see [`KvZip::keep`]).
    pub fn scores(&self, model: &Model, cache: &mut KvCache, context: &[u32], prefix_len: usize, prompts: &KvzipPrompts) -> Result<Vec<Vec<f64>>> {
        let c = &model.config;
        let (nl, nkv) = (c.n_layers, c.n_kv_heads);
        let t = context.len();
        if cache.next_pos() != t || (0..nl * nkv).any(|i| cache.len(i / nkv, i % nkv) != t) {
            return Err(Error::Invalid(format!("kvzip: the cache must hold exactly the {t} prefilled context rows")));
        }
        let inv_freq = crate::model::rope_inv_freq(c);
        let mut out = vec![vec![0.0f64; t]; nl * nkv];
        let mut st = model.new_state(crate::model::DEFAULT_MAX_BATCH);
        for (rows, ids) in self.repeat_inputs(prompts, context, prefix_len) {
            if rows.is_empty() {
                continue;
            }
            st.capture = Some(Capture::queries());
            let r = model.forward(&mut st, cache, &ids, Logits::None);
            let cap = st.capture.take().unwrap_or_default();
            if let Err(e) = r {
                cache.truncate_to(t);
                return Err(e);
            }
            let positions: Vec<u32> = (t as u32..(t + ids.len()) as u32).collect();
            let cache_ro: &KvCache = cache;
            let per_head: Vec<Vec<f64>> = (0..nl * nkv)
                .into_par_iter()
                .map(|i| {
                    let (l, h) = (i / nkv, i % nkv);
                    let (keys, _, bias, pos) = cache_ro.head(l, h);
                    let input = HeadInput::from_cache(cache_ro, l, h, rows.clone(), None, c.attn_scale());
                    let ctx = HeadContext {
                        full: Some(FullHead { keys, bias, positions: pos, span: rows.clone() }),
                        observed: Some(Observed { queries: &cap.queries[l], positions: &positions, n_heads: c.n_heads }),
                        inv_freq: Some(&inv_freq),
                        next_pos: cache_ro.next_pos(),
                        group: c.group_size(),
                    };
                    self.score_head(&input, &ctx, 0)
                })
                .collect::<Result<_>>()
                .inspect_err(|_| cache.truncate_to(t))?;
            cache.truncate_to(t);
            for (o, s) in out.iter_mut().zip(per_head) {
                o[rows.clone()].copy_from_slice(&s);
            }
        }
        Ok(out)
    }

    /// The rows kept per (layer, KV head), sorted, from [`KvZip::scores`] at compression ratio
    /// `r` (kvpress `compress_post`): the first `n_sink` rows get max + 1 over every score, then
    /// the `int(L·n_kv·T·r)` lowest scores of the whole model are evicted (per layer
    /// `int(n_kv·T·r)` with `layerwise`). Ties go to the lower flat index (layer, head, row);
    /// torch's `topk` leaves them unspecified.
    pub fn keep(&self, scores: &[Vec<f64>], n_kv: usize, r: f64) -> Vec<Vec<usize>> {
        let t = scores.first().map_or(0, Vec::len);
        let per_layer = (n_kv as f64 * t as f64 * r) as usize;
        let total = ((scores.len() * t) as f64 * r) as usize;
        self.keep_evicting(scores, n_kv, if self.layerwise { per_layer } else { total })
    }

    /// [`KvZip::keep`] with the count of evicted rows given: `n_evict` per layer with
    /// `layerwise`, over the whole model otherwise (the evaluation asks for an exact total).
    pub fn keep_evicting(&self, scores: &[Vec<f64>], n_kv: usize, n_evict: usize) -> Vec<Vec<usize>> {
        let t = scores.first().map_or(0, Vec::len);
        let mut s: Vec<Vec<f64>> = scores.to_vec();
        let amax = s.iter().flatten().copied().fold(f64::NEG_INFINITY, f64::max);
        for h in s.iter_mut() {
            let n = self.n_sink.min(h.len());
            h[..n].iter_mut().for_each(|x| *x = amax + 1.0);
        }
        let mut evicted = vec![vec![false; t]; s.len()];
        let mut evict = |heads: Range<usize>, n: usize| {
            let mut flat: Vec<(usize, usize)> = heads.flat_map(|i| (0..t).map(move |j| (i, j))).collect();
            let key = |&(i, j): &(usize, usize)| s[i][j];
            let cmp = |a: &(usize, usize), b: &(usize, usize)| key(a).total_cmp(&key(b)).then(a.cmp(b));
            let n = n.min(flat.len());
            if n == 0 {
                return;
            }
            if n < flat.len() {
                flat.select_nth_unstable_by(n - 1, cmp);
            }
            for &(i, j) in &flat[..n] {
                evicted[i][j] = true;
            }
        };
        if self.layerwise {
            for l in 0..s.len() / n_kv.max(1) {
                evict(l * n_kv..(l + 1) * n_kv, n_evict);
            }
        } else {
            evict(0..s.len(), n_evict);
        }
        evicted.iter().map(|e| (0..t).filter(|&j| !e[j]).collect()).collect()
    }
}

impl Scorer for KvZip {
    fn name(&self) -> &'static str {
        "kvzip"
    }

    fn needs_queries(&self) -> bool {
        true
    }

    /// The maximum over the repeat queries (`ctx.observed`, positions after the span) and the GQA
    /// group of each span row's weight, softmaxed over [sinks, span, the repeat rows] of
    /// `ctx.full` (causal among the repeat rows).
    fn score_head(&self, input: &HeadInput, ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        let d = input.d;
        let (Some(full), Some(o)) = (&ctx.full, ctx.observed.filter(|o| !o.is_empty())) else {
            return Err(Error::Invalid("kvzip: needs the repeat-the-context pass (KvZip::scores runs it on a prefilled cache)".into()));
        };
        let p0 = o.positions[0];
        let rep = full.positions.partition_point(|&p| p < p0);
        let m = o.len();
        if full.positions.len() - rep != m || full.span.end > rep {
            return Err(Error::Invalid(format!(
                "kvzip: the head must end with the {m} rows of the repeat pass, after the span (found {} rows from position {p0})",
                full.positions.len() - rep
            )));
        }
        let sink = self.n_sink.min(full.span.start);
        let span = full.span.clone();
        let n_sub = sink + span.len() + m;
        let rows: Vec<usize> = (0..sink).chain(span.clone()).chain(rep..rep + m).collect();
        let keys = gather(full.keys, d, rows.iter().copied());
        let bias: Option<Vec<f32>> = full.bias.map(|b| rows.iter().map(|&j| b[j]).collect());
        let g = ctx.group.max(1);
        let mut best = vec![0.0f64; span.len()];
        let mut logits = vec![0.0f32; m * n_sub];
        let kt = MatRef::from_row_major_slice(&keys, n_sub, d).transpose();
        for r in 0..g {
            let q = o.head_rows(input.kv_head * g + r, d, 0..m);
            let qm = MatRef::from_row_major_slice(&q, m, d);
            matmul(MatMut::from_row_major_slice_mut(&mut logits, m, n_sub), Accum::Replace, qm, kt, input.scale, Par::Seq);
            for i in 0..m {
                // Query i sees the sinks, the span and the repeat rows 0..=i.
                let vis = sink + span.len() + i + 1;
                let row = &mut logits[i * n_sub..i * n_sub + vis];
                let (_, z) = row_softmax_stats(row, bias.as_ref().map(|b| &b[..vis]));
                for (b, &x) in best.iter_mut().zip(&row[sink..sink + span.len()]) {
                    *b = b.max(x as f64 / z);
                }
            }
        }
        Ok(best)
    }

    fn protect(&self, _rows: usize, _budget: usize, _ctx: &HeadContext) -> Protect {
        Protect { sinks: self.n_sink, window: 0 }
    }
}
