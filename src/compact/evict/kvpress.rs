//! kvpress semantics (spec `oracle.md` §2): each baseline as kvpress 0.5.5's press of the same
//! name computes it, checked against goldens made with the pinned kvpress (`golden/kvpress/`).
//!
//! [`Press`] is one [`Scorer`] for every press; `Evict(Press)` is its [`Compressor`](crate::compact::Compressor).
//! What changes against the paper-faithful default scorers (listed in `golden/kvpress/README.md`):
//! - **protection is a sentinel score**: the protected rows (SnapKV / PyramidKV's last `window`
//!   rows, TOVA's last row, Expected Attention's first `n_sink`) score max + 1, the maximum taken
//!   over the other rows of **every KV head of the layer** in [`Scorer::score_layer`] (of the head
//!   alone in [`Scorer::score_head`]), so the scores equal the press's `score()` tensor. K-norm,
//!   observed attention and random protect nothing. StreamingLLM keeps the frame's sinks (its
//!   kvpress scores depend on the budget; the kept rows are the same);
//! - **Expected Attention**: ε = 0, and the first `n_sink` rows are left out of the softmax;
//! - **PyramidKV**: kvpress's layer budgets ([`PyramidKv::kvpress_layer_budget`]);
//! - **random**: torch's generator (MT19937 seeded with the press's seed, re-seeded per layer);
//! - **observed-attention** and **kvzip** exist only here and in the registry.
//!
//! kvpress compresses the **whole** prefilled context (the chat template's prefix included) right
//! after it is prefilled; [`prefill`] → [`Prefilled::scores`] → [`keep`] → [`install`] does the
//! same on a fresh cache.

use rayon::prelude::*;

use super::frame::select;
use super::kvzip::{KvZip, KvzipPrompts};
use super::observed_attention::ObservedAttention;
use super::random::torch_rand_scores;
use super::{ExpectedAttention, KNorm, PyramidKv, SnapKv, StreamingLlm, Tova};
use crate::cache::{HeadRows, KvCache};
use crate::compact::head::{head_seed, FullHead, HeadContext, HeadInput, Observed};
use crate::compact::method::{Protect, Scorer};
use crate::model::{Capture, Logits, Model, DEFAULT_MAX_BATCH};
use crate::{Error, Result};

/// The press names [`Press::from_name`] accepts.
pub const PRESSES: &[&str] =
    &["streaming-llm", "snapkv", "pyramidkv", "tova", "knorm", "expected-attention", "observed-attention", "random", "kvzip"];

/// kvpress's `compute_n_kept`: rows kept of `t` at compression ratio `r`: max(1, int(t·(1 − r))),
/// 0 when r ≥ 1.
pub fn n_kept(t: usize, r: f64) -> usize {
    if r >= 1.0 {
        return 0;
    }
    ((t as f64 * (1.0 - r)) as usize).max(1)
}

/// One kvpress 0.5.5 press with its defaults.
#[derive(Debug, Clone)]
pub enum Press {
    /// `StreamingLLMPress(n_sink = 4)`.
    StreamingLlm(StreamingLlm),
    /// `SnapKVPress(window_size = 64, kernel_size = 5)`.
    SnapKv(SnapKv),
    /// `PyramidKVPress(window_size = 64, kernel_size = 5, beta = 20)`.
    PyramidKv(PyramidKv),
    /// `TOVAPress`.
    Tova,
    /// `KnormPress`.
    KNorm,
    /// `ExpectedAttentionPress(n_future_positions = 512, n_sink = 4, epsilon = 0)`.
    ExpectedAttention(ExpectedAttention),
    /// `ObservedAttentionPress`.
    ObservedAttention,
    /// `RandomPress(seed)`.
    Random {
        /// The press's `seed` (torch `manual_seed`).
        seed: u64,
    },
    /// `KVzipPress(n_sink = 4, chunk_size = 2048, layerwise = False)`.
    KvZip(KvZip),
}

impl Press {
    /// The press of a registry name with kvpress's defaults; `seed` is `RandomPress`'s seed.
    pub fn from_name(name: &str, seed: u64) -> Result<Press> {
        Ok(match name {
            "streaming-llm" => Press::StreamingLlm(StreamingLlm::default()),
            "snapkv" => Press::SnapKv(SnapKv::default()),
            "pyramidkv" => Press::PyramidKv(PyramidKv::default()),
            "tova" => Press::Tova,
            "knorm" => Press::KNorm,
            "expected-attention" => Press::ExpectedAttention(ExpectedAttention { epsilon: 0.0, ..ExpectedAttention::default() }),
            "observed-attention" => Press::ObservedAttention,
            "random" => Press::Random { seed },
            "kvzip" => Press::KvZip(KvZip::default()),
            "h2o" => return Err(Error::Invalid("kvpress has no H2O press; its prefill score is \"observed-attention\" (ObservedAttentionPress)".into())),
            _ => return Err(Error::Invalid(format!("{name:?} has no kvpress semantics (kvpress presses here: {})", PRESSES.join(", ")))),
        })
    }

    /// The rows of a span of `t` rows that get the sentinel score, as (leading, trailing) counts.
    /// `lead` counts rows of the whole head: with a span starting at row `start` only rows below
    /// `lead` are protected.
    fn sentinel_rows(&self, t: usize) -> (usize, usize) {
        match self {
            Press::SnapKv(s) => (0, s.window.min(t)),
            Press::PyramidKv(p) => (0, p.snap.window.min(t)),
            Press::Tova => (0, 1.min(t)),
            Press::ExpectedAttention(e) => (e.n_sink, 0),
            _ => (0, 0),
        }
    }

    /// Scores before the sentinel.
    fn raw(&self, input: &HeadInput, ctx: &HeadContext, seed: u64) -> Result<Vec<f64>> {
        match self {
            Press::StreamingLlm(s) => s.score_head(input, ctx, seed),
            Press::SnapKv(s) => s.score_head(input, ctx, seed),
            Press::PyramidKv(p) => p.score_head(input, ctx, seed),
            Press::Tova => Tova.score_head(input, ctx, seed),
            Press::KNorm => KNorm.score_head(input, ctx, seed),
            Press::ExpectedAttention(e) => e.scores(input, ctx, true),
            Press::ObservedAttention => ObservedAttention.score_head(input, ctx, seed),
            Press::Random { seed } => Ok(torch_rand_scores(*seed, input.kv_head, input.rows())),
            Press::KvZip(k) => k.score_head(input, ctx, seed),
        }
    }

    /// The sentinel rows of each head (span coordinates) and the value max + 1 over the others.
    fn apply_sentinel(&self, scores: &mut [Vec<f64>], starts: &[usize]) {
        let protected = |s: &Vec<f64>, start: usize| {
            let (lead, trail) = self.sentinel_rows(s.len());
            (lead.saturating_sub(start).min(s.len()), s.len() - trail)
        };
        if scores.iter().zip(starts).all(|(s, &st)| {
            let (a, b) = protected(s, st);
            a == 0 && b == s.len()
        }) {
            return;
        }
        let mx = scores
            .iter()
            .zip(starts)
            .flat_map(|(s, &st)| {
                let (a, b) = protected(s, st);
                s[a..b.max(a)].iter().copied()
            })
            .fold(f64::NEG_INFINITY, f64::max);
        let sentinel = if mx.is_finite() { mx + 1.0 } else { 1.0 };
        for (s, &st) in scores.iter_mut().zip(starts) {
            let (a, b) = protected(s, st);
            s[..a].iter_mut().for_each(|x| *x = sentinel);
            s[b.max(a)..].iter_mut().for_each(|x| *x = sentinel);
        }
    }
}

/// A span's first row inside the whole head (0 without `ctx.full`).
fn span_start(ctx: &HeadContext) -> usize {
    ctx.full.as_ref().map_or(0, |f| f.span.start)
}

impl Scorer for Press {
    fn name(&self) -> &'static str {
        match self {
            Press::StreamingLlm(_) => "streaming-llm",
            Press::SnapKv(_) => "snapkv",
            Press::PyramidKv(_) => "pyramidkv",
            Press::Tova => "tova",
            Press::KNorm => "knorm",
            Press::ExpectedAttention(_) => "expected-attention",
            Press::ObservedAttention => "observed-attention",
            Press::Random { .. } => "random",
            Press::KvZip(_) => "kvzip",
        }
    }

    fn needs_queries(&self) -> bool {
        !matches!(self, Press::StreamingLlm(_) | Press::KNorm | Press::Random { .. })
    }

    fn score_head(&self, input: &HeadInput, ctx: &HeadContext, seed: u64) -> Result<Vec<f64>> {
        let mut s = vec![self.raw(input, ctx, seed)?];
        self.apply_sentinel(&mut s, &[span_start(ctx)]);
        Ok(s.pop().unwrap_or_default())
    }

    fn score_layer(&self, inputs: &[HeadInput], ctxs: &[HeadContext], seeds: &[u64]) -> Result<Vec<Vec<f64>>> {
        let mut s: Vec<Vec<f64>> = match self {
            // The last query's attention averaged over every query head of the layer.
            Press::Tova => Tova.score_layer(inputs, ctxs, seeds)?,
            _ => inputs.par_iter().zip(ctxs.par_iter()).zip(seeds.par_iter()).map(|((i, c), &sd)| self.raw(i, c, sd)).collect::<Result<_>>()?,
        };
        let starts: Vec<usize> = ctxs.iter().map(span_start).collect();
        self.apply_sentinel(&mut s, &starts);
        Ok(s)
    }

    fn protect(&self, _rows: usize, _budget: usize, _ctx: &HeadContext) -> Protect {
        match self {
            Press::StreamingLlm(s) => Protect { sinks: s.n_sink, window: 0 },
            Press::KvZip(k) => Protect { sinks: k.n_sink, window: 0 },
            _ => Protect::default(),
        }
    }

    /// PyramidKV: kvpress's budgets with `budget` standing for T·(1 − r) (exact when that is an
    /// integer; [`keep`] uses the ratio itself). Every other press: uniform.
    fn head_budgets(&self, n_layers: usize, n_kv: usize, rows: usize, budget: usize) -> Vec<usize> {
        match self {
            Press::PyramidKv(p) => (0..n_layers).flat_map(|l| std::iter::repeat_n(p.kvpress_layer_budget(n_layers, l, rows, budget as f64), n_kv)).collect(),
            _ => vec![budget; n_layers * n_kv],
        }
    }
}

/// A context prefilled from an empty cache, with every layer's queries (post-RoPE) recorded: what
/// a press sees in kvpress's forward hook.
#[derive(Debug, Clone)]
pub struct Prefilled {
    /// The context's tokens, the template prefix included.
    pub tokens: Vec<u32>,
    /// The uncompressed cache: T rows at positions 0..T in every (layer, KV head).
    pub cache: KvCache,
    /// Per layer, the queries of every query head: [T, n_heads·head_dim] post-RoPE.
    pub queries: Vec<Vec<f32>>,
}

/// Prefill `tokens` from an empty cache, recording the queries.
pub fn prefill(model: &Model, tokens: &[u32]) -> Result<Prefilled> {
    if tokens.is_empty() {
        return Err(Error::Prompt("kvpress: the context is empty".into()));
    }
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let mut cache = model.new_cache();
    st.capture = Some(Capture::queries());
    model.forward(&mut st, &mut cache, tokens, Logits::None)?;
    let queries = st.capture.take().map(|c| c.queries).unwrap_or_default();
    Ok(Prefilled { tokens: tokens.to_vec(), cache, queries })
}

/// What KVzip needs beyond the prefill: the template prefix's length (its rows are not repeated)
/// and the repeat prompts.
#[derive(Debug, Clone)]
pub struct KvzipSetup {
    /// Rows of the chat template's prefix at the start of the context.
    pub prefix_len: usize,
    /// The repeat prompts' token ids.
    pub prompts: KvzipPrompts,
}

impl Prefilled {
    /// Rows T of the context.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True for an empty context (never, after [`prefill`]).
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The press's scores of every (layer, KV head), layer-major, each over the T context rows:
    /// the press's `score()` tensor, sentinels included (KVzip: its raw scores, no sentinel; it
    /// needs `kvzip` and runs its repeat passes on a copy of the cache).
    pub fn scores(&self, model: &Model, press: &Press, kvzip: Option<&KvzipSetup>) -> Result<Vec<Vec<f64>>> {
        if let Press::KvZip(k) = press {
            let setup = kvzip.ok_or_else(|| Error::Invalid("kvzip: needs the template prefix length and repeat prompts (KvzipSetup)".into()))?;
            let mut cache = self.cache.clone();
            return k.scores(model, &mut cache, &self.tokens, setup.prefix_len, &setup.prompts);
        }
        self.score_with(model, press, 0)
    }

    /// Any scorer's [`Scorer::score_layer`] over the whole context, every layer (layer-major
    /// result), with the context's queries, the whole head and RoPE as the eval harness gives
    /// them; head (l, h) gets seed [`head_seed`]`(seed, l, h)`. [`Prefilled::scores`] uses it for
    /// every press but KVzip; with a default scorer it shows what the paper-faithful scores keep
    /// on the same context.
    pub fn score_with(&self, model: &Model, scorer: &dyn Scorer, seed: u64) -> Result<Vec<Vec<f64>>> {
        let c = &model.config;
        let (nl, nkv) = (c.n_layers, c.n_kv_heads);
        let t = self.len();
        let inv_freq = crate::model::rope_inv_freq(c);
        let positions: Vec<u32> = (0..t as u32).collect();
        let per_layer: Vec<Vec<Vec<f64>>> = (0..nl)
            .into_par_iter()
            .map(|l| {
                let inputs: Vec<HeadInput> = (0..nkv).map(|h| HeadInput::from_cache(&self.cache, l, h, 0..t, None, c.attn_scale())).collect();
                let ctxs: Vec<HeadContext> = (0..nkv)
                    .map(|h| {
                        let (keys, _, bias, pos) = self.cache.head(l, h);
                        HeadContext {
                            full: Some(FullHead { keys, bias, positions: pos, span: 0..t }),
                            observed: self.queries.get(l).map(|q| Observed { queries: q, positions: &positions, n_heads: c.n_heads }),
                            inv_freq: Some(&inv_freq),
                            next_pos: t,
                            group: c.group_size(),
                        }
                    })
                    .collect();
                let seeds: Vec<u64> = (0..nkv).map(|h| head_seed(seed, l, h)).collect();
                scorer.score_layer(&inputs, &ctxs, &seeds)
            })
            .collect::<Result<_>>()?;
        Ok(per_layer.into_iter().flatten().collect())
    }
}

/// The rows each (layer, KV head) keeps, sorted, from [`Prefilled::scores`] at compression ratio
/// `r`: the top `n_kept(T, r)` scores (PyramidKV: kvpress's layer budget; KVzip: its global
/// selection), ties to the lower row (torch's `topk` leaves ties unspecified).
pub fn keep(press: &Press, scores: &[Vec<f64>], n_layers: usize, n_kv: usize, r: f64) -> Vec<Vec<usize>> {
    if r <= 0.0 {
        // kvpress returns the cache untouched at ratio 0.
        return scores.iter().map(|s| (0..s.len()).collect()).collect();
    }
    if let Press::KvZip(k) = press {
        return k.keep(scores, n_kv, r);
    }
    let t = scores.first().map_or(0, Vec::len);
    let budgets: Vec<usize> = match press {
        Press::PyramidKv(p) => p.kvpress_layer_budgets(n_layers, t, r).into_iter().flat_map(|b| std::iter::repeat_n(b, n_kv)).collect(),
        _ => vec![n_kept(t, r); n_layers * n_kv],
    };
    let protect = press.protect(t, 0, &HeadContext::default());
    scores.iter().zip(budgets).map(|(s, b)| select(s, b.min(t), protect)).collect()
}

/// Replace every head of `cache` by its kept rows (`kept[l·n_kv + h]`, sorted row indices): keys,
/// values, positions and bias of those rows. The logical length is unchanged.
pub fn install(cache: &mut KvCache, kept: &[Vec<usize>]) -> Result<()> {
    let (nkv, hd) = (cache.n_kv_heads, cache.head_dim);
    if kept.len() != cache.n_layers * nkv {
        return Err(Error::Shape { op: "kvpress install", expected: format!("{} heads", cache.n_layers * nkv), got: format!("{}", kept.len()) });
    }
    for (i, rows) in kept.iter().enumerate() {
        let (l, h) = (i / nkv, i % nkv);
        let (keys, values, bias, positions) = cache.head(l, h);
        if rows.iter().any(|&j| j >= positions.len()) {
            return Err(Error::Invalid(format!("kvpress install: layer {l} head {h}: a kept row is out of range")));
        }
        let new = HeadRows {
            keys: rows.iter().flat_map(|&j| keys[j * hd..(j + 1) * hd].iter().copied()).collect(),
            values: rows.iter().flat_map(|&j| values[j * hd..(j + 1) * hd].iter().copied()).collect(),
            positions: rows.iter().map(|&j| positions[j]).collect(),
            bias: bias.map(|b| rows.iter().map(|&j| b[j]).collect()),
        };
        cache.replace_head(l, h, new)?;
    }
    Ok(())
}
