//! Document-level compaction: prefill a context, draw reference queries from the model, compact
//! every (layer, KV head) of the context's article span, and install the result in the cache.
//!
//! Layout of a context (spec §9): `prefix` (template tokens before the article: system prompt,
//! user header), `article` (the span that is compacted) and `suffix` (end of turn). Prefix and
//! suffix rows stay verbatim with β = 0; new tokens continue at the logical length.
//!
//! Reference queries (spec §8) are produced by running extra "query tokens" after the context
//! through the model one layer at a time (the cheaper on-policy schedule of §8.5.5): the hidden
//! states H_ℓ of the query tokens at the input of layer ℓ give that layer's queries; H_{ℓ+1} is
//! layer ℓ run on H_ℓ against the layer-ℓ cache — the original rows (off-policy) or the already
//! compacted ones (on-policy). The query tokens' own keys are removed again after each layer.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use crate::compact::{compress_heads, evaluate_head, Compressor, HeadEval, HeadInput, HeadStats};
use crate::error::{Error, Result};
use crate::kv_cache::{HeadRows, KvCache};
use crate::model::{Logits, Model, RunState, DEFAULT_MAX_BATCH};
use crate::sampling::Rng;
use crate::tokenizer::{Message, Tokenizer};

/// The instruction of the repeat-prefill query source (spec §8.1).
pub const REPEAT_INSTRUCTION: &str = "Repeat the previous context verbatim.";

/// A context split into the template before the article, the article, and the template after.
#[derive(Debug, Clone)]
pub struct ContextLayout {
    pub prefix: Vec<u32>,
    pub article: Vec<u32>,
    pub suffix: Vec<u32>,
    /// Rendered with the chat template (the article is a user message).
    pub chat: bool,
}

impl ContextLayout {
    /// Tokenize `text` as the article; with `chat`, inside a user turn of the model's template.
    pub fn build(tok: &Tokenizer, text: &str, chat: bool) -> Result<ContextLayout> {
        if text.trim().is_empty() {
            return Err(Error::Prompt("the context is empty".into()));
        }
        let article = tok.encode(text, false)?;
        if !chat {
            // BOS (or whatever the tokenizer adds to an empty string) is the only prefix.
            let prefix = tok.encode("", true)?;
            return Ok(ContextLayout { prefix, article, suffix: vec![], chat });
        }
        const MARK: &str = "\u{1}KVCOMPACT-ARTICLE\u{1}";
        let rendered = tok.render_chat(&[Message::new("user", MARK)], false)?;
        let at = rendered
            .find(MARK)
            .ok_or_else(|| Error::Tokenizer("the chat template dropped the user message".into()))?;
        let prefix = tok.encode(&rendered[..at], false)?;
        let suffix = tok.encode(&rendered[at + MARK.len()..], false)?;
        Ok(ContextLayout { prefix, article, suffix, chat })
    }

    pub fn tokens(&self) -> Vec<u32> {
        [&self.prefix[..], &self.article[..], &self.suffix[..]].concat()
    }

    pub fn len(&self) -> usize {
        self.prefix.len() + self.article.len() + self.suffix.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of the article in a freshly prefilled cache.
    pub fn article_rows(&self) -> Range<usize> {
        self.prefix.len()..self.prefix.len() + self.article.len()
    }
}

/// Tokens that follow a context to ask `text`: a new user turn and the assistant header in chat
/// mode, or the raw text (after a blank line) otherwise.
pub fn followup_tokens(tok: &Tokenizer, chat: bool, text: &str) -> Result<Vec<u32>> {
    if !chat {
        return tok.encode(&format!("\n\n{text}"), false);
    }
    // The continuation is what the template adds when a turn is appended to a conversation.
    let a = Message::new("user", "A");
    let one = tok.render_chat(std::slice::from_ref(&a), false)?;
    let two = tok.render_chat(&[a, Message::new("user", text)], true)?;
    let cont = two
        .strip_prefix(&one)
        .ok_or_else(|| Error::Tokenizer("the chat template does not extend a conversation by appending".into()))?;
    tok.encode(cont, false)
}

/// Where reference queries come from (spec §8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuerySource {
    /// "Repeat the previous context verbatim." then the article as the answer (teacher-forced).
    Repeat,
    /// The model's own questions and answers about the context, sampled with our `generate`.
    SelfStudy,
    /// The article positions of the context prefill itself, scored non-causally.
    Context,
    /// N(0, I) scaled to each query head's mean query norm (no RoPE).
    Random,
    /// Half repeat, half context.
    Mix,
}

impl QuerySource {
    pub fn parse(s: &str) -> Result<QuerySource> {
        Ok(match s {
            "repeat" => QuerySource::Repeat,
            "self-study" => QuerySource::SelfStudy,
            "context" => QuerySource::Context,
            "random" => QuerySource::Random,
            "mix" => QuerySource::Mix,
            _ => return Err(Error::Invalid(format!("unknown query source {s:?} (repeat, self-study, context, random, mix)"))),
        })
    }
    pub fn name(self) -> &'static str {
        match self {
            QuerySource::Repeat => "repeat",
            QuerySource::SelfStudy => "self-study",
            QuerySource::Context => "context",
            QuerySource::Random => "random",
            QuerySource::Mix => "mix",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Article rows kept per head ≈ article_len / ratio.
    pub ratio: f64,
    pub queries: QuerySource,
    /// Reference queries per KV head (n in the spec; split evenly over the group's query heads).
    pub n_queries: usize,
    /// Held-out queries per KV head for the error summary.
    pub n_test: usize,
    pub on_policy: bool,
    /// Compact the article in chunks of this many tokens, prefilling one chunk at a time.
    pub chunk_tokens: Option<usize>,
    /// Per-head budget proportions `{"L{l}H{h}": p}` (spec §11).
    pub budgets: Option<HashMap<String, f64>>,
    /// Water-fill cap: no head keeps more than this fraction of the article (spec §11: 0.75 in
    /// the reference's main runs).
    pub max_ratio_per_head: f64,
    pub seed: u64,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            ratio: 20.0,
            queries: QuerySource::Repeat,
            n_queries: 4096,
            n_test: 256,
            on_policy: false,
            chunk_tokens: None,
            budgets: None,
            max_ratio_per_head: 1.0,
            seed: 0,
        }
    }
}

/// Per-layer summary: article-span errors on held-out queries, averaged over the layer's heads.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LayerSummary {
    pub layer: usize,
    pub rows_before: usize,
    pub rows_after: usize,
    pub mean_rel_l2: f64,
    pub max_rel_l2: f64,
    pub mean_mass_err: f64,
    pub guard_trips: usize,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CompactReport {
    pub method: String,
    pub queries: String,
    pub ratio: f64,
    pub on_policy: bool,
    pub context_tokens: usize,
    pub article_tokens: usize,
    pub chunks: usize,
    pub n_queries_per_kv_head: usize,
    /// Query tokens of the repeat source, when they had to be cut to fit the position range.
    pub repeat_truncated_to: Option<usize>,
    pub kv_bytes_before: usize,
    pub kv_bytes_after: usize,
    pub prefill_seconds: f64,
    pub query_seconds: f64,
    /// Sums over heads (per-thread time): attention statistics, selection, β fit, value fit.
    pub attn_seconds: f64,
    pub select_seconds: f64,
    pub beta_seconds: f64,
    pub values_seconds: f64,
    /// Wall time of the compaction calls.
    pub compact_seconds: f64,
    pub eval_seconds: f64,
    pub total_seconds: f64,
    pub layers: Vec<LayerSummary>,
    /// Held-out article-span rel_l2 per (layer, KV head), layer-major (mean over chunks).
    pub head_rel_l2: Vec<f64>,
    pub mean_rel_l2: f64,
    pub mean_mass_err: f64,
}

/// Budgets per (layer, KV head) for an article of `t_article` rows compacted by `ratio`.
/// Uniform without proportions; otherwise the spec §11 water-fill with cap `max_ratio`.
pub fn head_budgets(n_layers: usize, n_kv: usize, t_article: usize, ratio: f64, props: Option<&HashMap<String, f64>>, max_ratio: f64) -> Result<Vec<usize>> {
    if !(ratio >= 1.0) || !ratio.is_finite() {
        return Err(Error::Invalid(format!("--ratio must be ≥ 1, got {ratio}")));
    }
    let t_keep = ((t_article as f64 / ratio).floor() as usize).clamp(1.min(t_article), t_article);
    let h_tot = n_layers * n_kv;
    let Some(props) = props else {
        return Ok(vec![t_keep; h_tot]);
    };
    let mut p = vec![f64::NAN; h_tot];
    for (k, &v) in props {
        let parsed = k
            .strip_prefix('L')
            .and_then(|r| r.split_once('H'))
            .and_then(|(l, h)| Some((l.parse::<usize>().ok()?, h.parse::<usize>().ok()?)));
        let Some((l, h)) = parsed else {
            return Err(Error::Invalid(format!("budget key {k:?} is not of the form L<layer>H<kv_head>")));
        };
        if l >= n_layers || h >= n_kv {
            return Err(Error::Invalid(format!("budget key {k} is outside the model ({n_layers} layers × {n_kv} KV heads)")));
        }
        if !(v >= 0.0) || !v.is_finite() {
            return Err(Error::Invalid(format!("budget {k} = {v} must be a finite proportion ≥ 0")));
        }
        p[l * n_kv + h] = v;
    }
    let listed: f64 = p.iter().filter(|x| !x.is_nan()).sum();
    if !(listed > 0.0) {
        return Err(Error::Invalid("budget proportions sum to 0".into()));
    }
    // Water-fill: cap every head at c, hand the excess to uncapped heads pro rata, repeat.
    let rho = t_keep as f64 / t_article.max(1) as f64;
    let cap = max_ratio / (rho * h_tot as f64);
    let mut q: Vec<f64> = p.iter().map(|&x| if x.is_nan() { 0.0 } else { x / listed }).collect();
    for _ in 0..h_tot {
        let excess: f64 = q.iter().filter(|&&x| x > cap).map(|x| x - cap).sum();
        if excess <= 1e-15 {
            break;
        }
        let free: f64 = q.iter().filter(|&&x| x < cap).sum();
        for x in q.iter_mut() {
            if *x > cap {
                *x = cap;
            } else if free > 0.0 && *x < cap {
                *x += excess * *x / free;
            }
        }
    }
    let total = (t_keep * h_tot) as f64;
    Ok(p.iter()
        .zip(&q)
        .map(|(&orig, &x)| if orig.is_nan() { t_keep } else { ((x * total).floor() as usize).min(t_article) })
        .collect())
}

/// Seeded choice of `k` of `0..n`, returned sorted (spec §8.3: the same token indices serve
/// every layer and head). `exclude` rows are never chosen.
fn subsample(n: usize, k: usize, rng: &mut Rng, exclude: &[usize]) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..n).filter(|i| exclude.binary_search(i).is_err()).collect();
    if k < pool.len() {
        // Partial Fisher–Yates.
        for i in 0..k {
            let j = i + rng.below((pool.len() - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(k);
    }
    pool.sort_unstable();
    pool
}

/// Per-(layer, KV head) reference and test queries, group-major [G·m, d].
struct Queries {
    train: Vec<Vec<f32>>, // [n_layers * n_kv][n, d]
    test: Vec<Vec<f32>>,  // [n_layers * n_kv][m, d]
}

/// Gather, for every KV head of one layer, the selected token rows of q [tokens, nh*hd] into
/// group-major matrices: head g gets [Q_{gG}[sel]; Q_{gG+1}[sel]; …].
fn group_queries(q: &[f32], model: &Model, sel: &[usize], out: &mut [Vec<f32>]) {
    let c = &model.config;
    let (hd, qd, g) = (c.head_dim, c.q_dim(), c.group_size());
    for (kv, dst) in out.iter_mut().enumerate() {
        for r in 0..g {
            let head = kv * g + r;
            for &t in sel {
                dst.extend_from_slice(&q[t * qd + head * hd..t * qd + (head + 1) * hd]);
            }
        }
    }
}

/// The span being compacted: rows `rows[i]` of head i (layer-major), and the query tokens that
/// follow the context to produce reference queries.
struct Span {
    rows: Vec<Range<usize>>, // [n_layers * n_kv]
    query_tokens: Vec<u32>,
}

/// Run the query tokens through the model layer by layer after `cache`, compacting each layer's
/// span as it goes (on-policy) or after collecting every layer's queries (off-policy).
#[allow(clippy::too_many_arguments)]
fn compact_span(
    model: &Model,
    st: &mut RunState,
    cache: &mut KvCache,
    span: &Span,
    method: &dyn Compressor,
    budgets: &[usize],
    opts: &CompactOptions,
    extra: Option<&Queries>,
    evals: &mut [Vec<(HeadEval, bool)>],
    report: &mut CompactReport,
) -> Result<()> {
    let c = &model.config;
    let (nl, nkv, d, g, qd) = (c.n_layers, c.n_kv_heads, c.hidden_size, c.group_size(), c.q_dim());
    let pos0 = cache.next_pos();
    let nq = span.query_tokens.len();
    let mb = st.max_batch();
    let mut rng = Rng::new(opts.seed ^ 0x5155_4552_5953);
    // Token subsample: ceil(n / G) query tokens per query head, and a disjoint test set.
    let sel = subsample(nq, opts.n_queries.div_ceil(g).max(1), &mut rng, &[]);
    let mut test_sel = subsample(nq, opts.n_test.div_ceil(g).max(1), &mut rng, &sel);
    if test_sel.is_empty() {
        // Every query token is used for fitting; evaluate on them rather than on nothing.
        test_sel = subsample(nq, opts.n_test.div_ceil(g).max(1), &mut rng, &[]);
    }
    report.n_queries_per_kv_head = sel.len() * g + extra.map_or(0, |x| x.train[0].len() / c.head_dim);

    let tq = Instant::now();
    let mut hidden = vec![0.0f32; nq * d]; // [nq, d] query tokens' residual at the current layer
    for (ci, chunk) in span.query_tokens.chunks(mb).enumerate() {
        model.embed(st, chunk);
        hidden[ci * mb * d..(ci * mb + chunk.len()) * d].copy_from_slice(model.residual(st, chunk.len()));
    }
    let mut train: Vec<Vec<f32>> = vec![Vec::new(); nl * nkv];
    let mut test: Vec<Vec<f32>> = vec![Vec::new(); nl * nkv];
    report.query_seconds += tq.elapsed().as_secs_f64();

    let ctx = LayerRun { model, tokens: &span.query_tokens, pos0, sel: &sel, test_sel: &test_sel };
    if !opts.on_policy {
        let tq = Instant::now();
        for l in 0..nl {
            if nq > 0 {
                ctx.run(l, st, cache, &mut hidden, Some((&mut train, &mut test)));
            }
        }
        merge_extra(&mut train, &mut test, extra, 0..nl * nkv);
        report.query_seconds += tq.elapsed().as_secs_f64();
        let all: Vec<usize> = (0..nl * nkv).collect();
        compress_and_install(model, cache, span, method, budgets, opts, &all, &train, &test, evals, report)?;
    } else {
        for l in 0..nl {
            let tq = Instant::now();
            // Layer l's queries come from H_l, which already reflects the compacted layers < l.
            for (ci, chunk) in span.query_tokens.chunks(mb).enumerate() {
                let (at, n) = (ci * mb, chunk.len());
                model.prepare_positions(st, n, pos0 + at);
                model.residual(st, n).copy_from_slice(&hidden[at * d..(at + n) * d]);
                let q = model.layer_queries(l, st, n);
                debug_assert_eq!(q.len(), n * qd);
                group_queries(q, model, &local(&sel, at, n), &mut train[l * nkv..(l + 1) * nkv]);
                group_queries(q, model, &local(&test_sel, at, n), &mut test[l * nkv..(l + 1) * nkv]);
            }
            merge_extra(&mut train, &mut test, extra, l * nkv..(l + 1) * nkv);
            report.query_seconds += tq.elapsed().as_secs_f64();
            let heads: Vec<usize> = (l * nkv..(l + 1) * nkv).collect();
            compress_and_install(model, cache, span, method, budgets, opts, &heads, &train, &test, evals, report)?;
            let tq = Instant::now();
            if l + 1 < nl && nq > 0 {
                ctx.run(l, st, cache, &mut hidden, None);
            }
            report.query_seconds += tq.elapsed().as_secs_f64();
        }
    }
    Ok(())
}

/// Runs one layer over the query tokens (see [`compact_span`]).
struct LayerRun<'a> {
    model: &'a Model,
    tokens: &'a [u32],
    pos0: usize,
    sel: &'a [usize],
    test_sel: &'a [usize],
}

impl LayerRun<'_> {
    /// Layer l on the query tokens against the cache as it is now: H_l → H_{l+1} in `hidden`;
    /// with `collect`, the selected tokens' queries go to train/test. The query tokens' own
    /// rows are removed from the cache again.
    fn run(&self, l: usize, st: &mut RunState, cache: &mut KvCache, hidden: &mut [f32], collect: Option<(&mut [Vec<f32>], &mut [Vec<f32>])>) {
        let (model, mb) = (self.model, st.max_batch());
        let (d, nkv) = (model.config.hidden_size, model.config.n_kv_heads);
        let mut collect = collect;
        for (ci, chunk) in self.tokens.chunks(mb).enumerate() {
            let (at, n) = (ci * mb, chunk.len());
            model.prepare_positions(st, n, self.pos0 + at);
            model.residual(st, n).copy_from_slice(&hidden[at * d..(at + n) * d]);
            model.layer(l, st, cache, n);
            if let Some((train, test)) = collect.as_mut() {
                let q = model.last_queries(st, n);
                group_queries(q, model, &local(self.sel, at, n), &mut train[l * nkv..(l + 1) * nkv]);
                group_queries(q, model, &local(self.test_sel, at, n), &mut test[l * nkv..(l + 1) * nkv]);
            }
            hidden[at * d..(at + n) * d].copy_from_slice(model.residual(st, n));
        }
        cache.truncate_layer_to(l, self.pos0);
    }
}

/// The selected token indices that fall in [at, at + n), relative to `at`.
fn local(sel: &[usize], at: usize, n: usize) -> Vec<usize> {
    sel.iter().filter(|&&t| t >= at && t < at + n).map(|&t| t - at).collect()
}

/// Append the extra (context / random) queries of heads `range` to the train and test sets.
fn merge_extra(train: &mut [Vec<f32>], test: &mut [Vec<f32>], extra: Option<&Queries>, range: Range<usize>) {
    if let Some(x) = extra {
        for i in range {
            train[i].extend_from_slice(&x.train[i]);
            test[i].extend_from_slice(&x.test[i]);
        }
    }
}

/// Compress the given heads' span rows, evaluate them on the held-out queries against the
/// original rows, and replace them in the cache: [before; compacted (β); after].
#[allow(clippy::too_many_arguments)]
fn compress_and_install(
    model: &Model,
    cache: &mut KvCache,
    span: &Span,
    method: &dyn Compressor,
    budgets: &[usize],
    opts: &CompactOptions,
    heads: &[usize],
    train: &[Vec<f32>],
    test: &[Vec<f32>],
    evals: &mut [Vec<(HeadEval, bool)>],
    report: &mut CompactReport,
) -> Result<()> {
    let c = &model.config;
    let (nkv, hd) = (c.n_kv_heads, c.head_dim);
    let cache_ro: &KvCache = cache;
    let input_of = |i: usize| -> HeadInput<'_> {
        HeadInput::from_cache(cache_ro, i / nkv, i % nkv, span.rows[i].clone(), Some(&train[i][..]), c.attn_scale())
    };
    let tc = Instant::now();
    let inputs: Vec<HeadInput> = heads.iter().map(|&i| input_of(i)).collect();
    let bud: Vec<usize> = heads.iter().map(|&i| budgets[i].min(span.rows[i].len())).collect();
    let out = compress_heads(method, &inputs, &bud, opts.seed)?;
    report.compact_seconds += tc.elapsed().as_secs_f64();
    let te = Instant::now();
    for ((&i, inp), ch) in heads.iter().zip(&inputs).zip(&out) {
        evals[i].push((evaluate_head(inp, ch, &test[i]), ch.stats.guard_tripped));
    }
    report.eval_seconds += te.elapsed().as_secs_f64();
    drop(inputs);

    for (&i, ch) in heads.iter().zip(out) {
        let (l, h) = (i / nkv, i % nkv);
        let s: &HeadStats = &ch.stats;
        report.attn_seconds += s.attn_seconds;
        report.select_seconds += s.select_seconds;
        report.beta_seconds += s.beta_seconds;
        report.values_seconds += s.values_seconds;
        let rows = span.rows[i].clone();
        let (keys, values, bias, positions) = cache.head(l, h);
        let n_new = positions.len() - rows.len() + ch.len();
        let mut new = HeadRows {
            keys: Vec::with_capacity(n_new * hd),
            values: Vec::with_capacity(n_new * hd),
            positions: Vec::with_capacity(n_new),
            bias: Some(Vec::with_capacity(n_new)),
        };
        let old_bias = |j: usize| bias.map_or(0.0, |b| b[j]);
        let mut nb = Vec::with_capacity(n_new);
        new.keys.extend_from_slice(&keys[..rows.start * hd]);
        new.values.extend_from_slice(&values[..rows.start * hd]);
        new.positions.extend_from_slice(&positions[..rows.start]);
        nb.extend((0..rows.start).map(old_bias));
        new.keys.extend_from_slice(&ch.keys);
        new.values.extend_from_slice(&ch.values);
        new.positions.extend(ch.indices.iter().map(|&k| positions[rows.start + k]));
        nb.extend_from_slice(&ch.beta);
        new.keys.extend_from_slice(&keys[rows.end * hd..]);
        new.values.extend_from_slice(&values[rows.end * hd..]);
        new.positions.extend_from_slice(&positions[rows.end..]);
        nb.extend((rows.end..positions.len()).map(old_bias));
        new.bias = Some(nb);
        cache.replace_head(l, h, new)?;
    }
    Ok(())
}

/// Context-prefill queries (spec §8.1) of the span's own tokens, and random queries scaled to
/// each query head's mean norm, subsampled per head; None for the repeat/self-study sources.
fn extra_queries(model: &Model, captured: &[Vec<f32>], opts: &CompactOptions, share: f64) -> Option<Queries> {
    let c = &model.config;
    let (nl, nkv, hd, qd, g) = (c.n_layers, c.n_kv_heads, c.head_dim, c.q_dim(), c.group_size());
    let src = opts.queries;
    if !matches!(src, QuerySource::Context | QuerySource::Mix | QuerySource::Random) || captured.is_empty() {
        return None;
    }
    let ntok = captured[0].len() / qd;
    let mut rng = Rng::new(opts.seed ^ 0xC0_4E7E_47);
    let want = ((opts.n_queries as f64 * share) as usize).div_ceil(g).max(1);
    let sel = subsample(ntok, want, &mut rng, &[]);
    let mut test_sel = subsample(ntok, opts.n_test.div_ceil(g).max(1), &mut rng, &sel);
    if test_sel.is_empty() {
        test_sel = sel.clone();
    }
    let mut train = vec![Vec::new(); nl * nkv];
    let mut test = vec![Vec::new(); nl * nkv];
    for l in 0..nl {
        let q = &captured[l];
        if src == QuerySource::Random {
            // N(0, I) per query head, scaled to that head's mean query norm (Llama has no q_norm).
            for kv in 0..nkv {
                for (set, n, dst) in [(&sel, sel.len(), &mut train[l * nkv + kv]), (&test_sel, test_sel.len(), &mut test[l * nkv + kv])] {
                    let _ = set;
                    for r in 0..g {
                        let head = kv * g + r;
                        let mean_norm = (0..ntok)
                            .map(|t| q[t * qd + head * hd..t * qd + (head + 1) * hd].iter().map(|x| x * x).sum::<f32>().sqrt() as f64)
                            .sum::<f64>()
                            / ntok as f64;
                        for _ in 0..n {
                            let v: Vec<f64> = (0..hd).map(|_| gaussian(&mut rng)).collect();
                            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                            dst.extend(v.iter().map(|x| (x / norm * mean_norm) as f32));
                        }
                    }
                }
            }
        } else {
            group_queries(q, model, &sel, &mut train[l * nkv..(l + 1) * nkv]);
            group_queries(q, model, &test_sel, &mut test[l * nkv..(l + 1) * nkv]);
        }
    }
    Some(Queries { train, test })
}

fn gaussian(rng: &mut Rng) -> f64 {
    // Box–Muller on two uniforms in (0, 1].
    let u1 = 1.0 - rng.next_f64();
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Query tokens that follow the context for the repeat source: a new user turn with the repeat
/// instruction, the assistant header, then the article itself as the answer.
pub fn repeat_tokens(tok: &Tokenizer, chat: bool, article: &[u32]) -> Result<Vec<u32>> {
    let mut t = followup_tokens(tok, chat, REPEAT_INSTRUCTION)?;
    t.extend_from_slice(article);
    Ok(t)
}

/// Self-study query tokens: the model answers a few prompts about the context, one after the
/// other in one conversation (sampled at T = 0.7, top-p 0.8, spec §8.1), on a copy of the cache.
pub fn self_study_tokens(model: &Model, tok: &Tokenizer, cache: &KvCache, chat: bool, seed: u64, max_answer: usize) -> Result<Vec<u32>> {
    const PROMPTS: [&str; 3] = [
        "Summarize the text above.",
        "Write three questions about the text above, then answer each of them.",
        "List the names, numbers and dates that appear in the text above, with what each refers to.",
    ];
    let mut c = cache.clone();
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let mut sampler = crate::sampling::Sampler::new(0.7, 0.8, seed);
    let mut all = Vec::new();
    let room = model.config.max_position_embeddings.saturating_sub(cache.next_pos());
    for p in PROMPTS {
        let q = followup_tokens(tok, chat, p)?;
        // Share what is left of the context window between the remaining prompts.
        let left = room.saturating_sub(all.len());
        let budget = (left / PROMPTS.len()).saturating_sub(q.len() + 1).min(max_answer);
        if budget < 4 {
            break;
        }
        let opts = crate::generate::GenOptions { max_tokens: budget, stop_at_eos: true };
        let out = crate::generate::generate(model, &mut st, &mut c, &q, &tok.eos_ids, &mut sampler, &opts, |_| Ok(()))?;
        // The last sampled token was never fed; feed it so the cache matches the token list.
        if let Some(&last) = out.tokens.last() {
            model.forward(&mut st, &mut c, &[last], Logits::None)?;
        }
        all.extend_from_slice(&q);
        all.extend_from_slice(&out.tokens);
    }
    if all.is_empty() {
        return Err(Error::Prompt("self-study: no room left in the model's context for questions and answers; use --chunk-tokens or another --queries".into()));
    }
    Ok(all)
}

/// Prefill `layout`, compact its article with `method`, and return the compacted cache.
pub fn compact_context(model: &Model, tok: &Tokenizer, layout: &ContextLayout, method: &dyn Compressor, opts: &CompactOptions) -> Result<(KvCache, CompactReport)> {
    let t_all = Instant::now();
    let c = &model.config;
    let (nl, nkv) = (c.n_layers, c.n_kv_heads);
    if layout.article.is_empty() {
        return Err(Error::Prompt("the context has no article tokens to compact".into()));
    }
    if layout.len() > c.max_position_embeddings {
        return Err(Error::Prompt(format!(
            "the context has {} tokens, more than the model's {} positions",
            layout.len(),
            c.max_position_embeddings
        )));
    }
    let mut report = CompactReport {
        method: method.name().into(),
        queries: opts.queries.name().into(),
        ratio: opts.ratio,
        on_policy: opts.on_policy,
        context_tokens: layout.len(),
        article_tokens: layout.article.len(),
        kv_bytes_before: layout.len() * c.kv_bytes_per_token() + layout.len() * nl * nkv * 4,
        ..Default::default()
    };
    let chunk = opts.chunk_tokens.unwrap_or(layout.article.len()).max(1);
    let chunks: Vec<&[u32]> = layout.article.chunks(chunk).collect();
    report.chunks = chunks.len();
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let mut cache = model.new_cache();
    let mut evals: Vec<Vec<(HeadEval, bool)>> = vec![Vec::new(); nl * nkv];
    let capture_ctx = matches!(opts.queries, QuerySource::Context | QuerySource::Mix | QuerySource::Random);
    let tp = Instant::now();
    model.forward(&mut st, &mut cache, &layout.prefix, Logits::None).or_else(|e| if layout.prefix.is_empty() { Ok(()) } else { Err(e) })?;
    report.prefill_seconds += tp.elapsed().as_secs_f64();
    for (ci, part) in chunks.iter().enumerate() {
        let last = ci + 1 == chunks.len();
        // Prefill the chunk (plus the template end after the last one when not chunked, so
        // queries see the whole context as the reference does).
        let tp = Instant::now();
        let before: Vec<usize> = (0..nl * nkv).map(|i| cache.len(i / nkv, i % nkv)).collect();
        if capture_ctx {
            st.capture = Some(crate::model::Capture::queries());
        }
        model.forward(&mut st, &mut cache, part, Logits::None)?;
        let captured = st.capture.take().map(|c| c.queries).unwrap_or_default();
        let tail = if last && chunks.len() == 1 { &layout.suffix[..] } else { &[][..] };
        if !tail.is_empty() {
            model.forward(&mut st, &mut cache, tail, Logits::None)?;
        }
        report.prefill_seconds += tp.elapsed().as_secs_f64();

        let rows: Vec<Range<usize>> = before.iter().map(|&b| b..b + part.len()).collect();
        let tq = Instant::now();
        let query_tokens = match opts.queries {
            QuerySource::Repeat | QuerySource::Mix => {
                let mut t = repeat_tokens(tok, layout.chat, part)?;
                // A long article repeated after itself can overflow the position range; the
                // repeat then stops where the positions run out (queries come from its start).
                let room = c.max_position_embeddings.saturating_sub(cache.next_pos());
                if t.len() > room {
                    report.repeat_truncated_to = Some(room);
                    t.truncate(room);
                }
                t
            }
            QuerySource::SelfStudy => self_study_tokens(model, tok, &cache, layout.chat, opts.seed, 192)?,
            QuerySource::Context | QuerySource::Random => Vec::new(),
        };
        if cache.next_pos() + query_tokens.len() > c.max_position_embeddings {
            return Err(Error::Prompt(format!(
                "context plus query tokens ({} + {}) exceed the model's {} positions; use --chunk-tokens",
                cache.next_pos(),
                query_tokens.len(),
                c.max_position_embeddings
            )));
        }
        let share = if opts.queries == QuerySource::Mix { 0.5 } else { 1.0 };
        let extra = extra_queries(model, &captured, opts, share);
        report.query_seconds += tq.elapsed().as_secs_f64();
        let budgets = head_budgets(nl, nkv, part.len(), opts.ratio, opts.budgets.as_ref(), opts.max_ratio_per_head)?;
        let mut sub = opts.clone();
        if opts.queries == QuerySource::Mix {
            sub.n_queries = opts.n_queries / 2;
        }
        let span = Span { rows, query_tokens };
        compact_span(model, &mut st, &mut cache, &span, method, &budgets, &sub, extra.as_ref(), &mut evals, &mut report)?;
    }
    if chunks.len() > 1 && !layout.suffix.is_empty() {
        // Chunked: the template end is appended after the compacted chunks (spec §10 leaves it
        // out; we keep it so the cache ends where a conversation expects it).
        model.forward(&mut st, &mut cache, &layout.suffix, Logits::None)?;
    }
    cache.check()?;
    report.kv_bytes_after = cache.bytes();
    // Per-layer summary over heads (and chunks).
    for l in 0..nl {
        let es: Vec<&HeadEval> = (0..nkv).flat_map(|h| evals[l * nkv + h].iter().map(|(e, _)| e)).collect();
        let trips = (0..nkv).flat_map(|h| evals[l * nkv + h].iter()).filter(|(_, g)| *g).count();
        let n = es.len().max(1) as f64;
        report.layers.push(LayerSummary {
            layer: l,
            rows_before: layout.len() * nkv,
            rows_after: (0..nkv).map(|h| cache.len(l, h)).sum(),
            mean_rel_l2: es.iter().map(|e| e.mean_rel_l2).sum::<f64>() / n,
            max_rel_l2: es.iter().map(|e| e.max_rel_l2).fold(0.0, f64::max),
            mean_mass_err: es.iter().map(|e| e.mean_mass_err).sum::<f64>() / n,
            guard_trips: trips,
        });
    }
    report.head_rel_l2 = evals
        .iter()
        .map(|v| v.iter().map(|(e, _)| e.mean_rel_l2).sum::<f64>() / v.len().max(1) as f64)
        .collect();
    let nlf = nl as f64;
    report.mean_rel_l2 = report.layers.iter().map(|l| l.mean_rel_l2).sum::<f64>() / nlf;
    report.mean_mass_err = report.layers.iter().map(|l| l.mean_mass_err).sum::<f64>() / nlf;
    report.total_seconds = t_all.elapsed().as_secs_f64();
    Ok((cache, report))
}

// ---------------------------------------------------------------------------------------------
// Compacted cache files

/// Format tag of compacted cache files.
pub const CACHE_FORMAT: &str = "kvcompact-cache-v1";

/// A fingerprint of a model that does not depend on its storage dtype: the normalised config,
/// every tensor's name and shape, and bf16-rounded samples of a few weight rows.
pub fn model_fingerprint(model: &Model) -> String {
    use sha2::{Digest, Sha256};
    let c = &model.config;
    let mut h = Sha256::new();
    h.update(format!(
        "{}|{}|{}|{}|{}|{}|{}|{}|{}|{:?}|{}",
        c.arch.name(),
        c.hidden_size,
        c.intermediate_size,
        c.n_layers,
        c.n_heads,
        c.n_kv_heads,
        c.head_dim,
        c.vocab_size,
        c.rope_theta,
        c.rope_scaling,
        c.tie_word_embeddings
    ));
    let w = &model.weights;
    let mut names: Vec<&str> = w.store.names().collect();
    names.sort_unstable();
    for n in names {
        h.update(n.as_bytes());
    }
    let mut row = vec![0.0f32; c.hidden_size];
    let emb = w.view(&w.embed);
    for r in [0, 1, c.vocab_size / 2, c.vocab_size - 1] {
        kvcompact_kernels::widen_rows(emb, r, 1, c.hidden_size, &mut row);
        for x in &row {
            h.update(half::bf16::from_f32(*x).to_bits().to_le_bytes());
        }
    }
    if let Some(l) = w.layers.last() {
        let mut r = vec![0.0f32; l.wq.cols];
        kvcompact_kernels::widen_rows(w.view(&l.wq), 0, 1, l.wq.cols, &mut r);
        for x in &r {
            h.update(half::bf16::from_f32(*x).to_bits().to_le_bytes());
        }
    }
    let d = h.finalize();
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Save a (compacted) cache: per head `layer{l}.head{h}.{keys,values,beta,positions}` and the
/// model identity, logical length, chat flag and method parameters as metadata.
pub fn save_cache(path: &Path, model: &Model, cache: &KvCache, chat: bool, params: &serde_json::Value) -> Result<()> {
    use crate::weights::{save_safetensors, OutTensor};
    let (nl, nkv, hd) = (cache.n_layers, cache.n_kv_heads, cache.head_dim);
    let mut names = Vec::new();
    let mut betas = Vec::new();
    let mut poss = Vec::new();
    for l in 0..nl {
        for h in 0..nkv {
            names.push(format!("layer{l}.head{h}"));
            let m = cache.meta(l, h);
            betas.push(m.bias.clone().unwrap_or_else(|| vec![0.0; m.len()]));
            poss.push(m.positions.iter().map(|&p| p as i64).collect::<Vec<i64>>());
        }
    }
    let keys: Vec<String> = names.iter().map(|n| format!("{n}.keys")).collect();
    let vals: Vec<String> = names.iter().map(|n| format!("{n}.values")).collect();
    let bets: Vec<String> = names.iter().map(|n| format!("{n}.beta")).collect();
    let psn: Vec<String> = names.iter().map(|n| format!("{n}.positions")).collect();
    let mut out = Vec::new();
    for i in 0..nl * nkv {
        let (l, h) = (i / nkv, i % nkv);
        let s = cache.store(l, h);
        let n = cache.len(l, h);
        out.push(OutTensor::F32 { name: &keys[i], shape: vec![n, hd], data: &s.keys });
        out.push(OutTensor::F32 { name: &vals[i], shape: vec![n, hd], data: &s.values });
        out.push(OutTensor::F32 { name: &bets[i], shape: vec![n], data: &betas[i] });
        out.push(OutTensor::I64 { name: &psn[i], shape: vec![n], data: &poss[i] });
    }
    let mut meta = HashMap::new();
    meta.insert("format".into(), CACHE_FORMAT.into());
    meta.insert("model_fingerprint".into(), model_fingerprint(model));
    meta.insert("model_dir".into(), model.dir.display().to_string());
    meta.insert("n_layers".into(), nl.to_string());
    meta.insert("n_kv_heads".into(), nkv.to_string());
    meta.insert("head_dim".into(), hd.to_string());
    meta.insert("logical_len".into(), cache.next_pos().to_string());
    meta.insert("chat".into(), chat.to_string());
    meta.insert("params".into(), params.to_string());
    meta.insert("kvcompact_version".into(), env!("CARGO_PKG_VERSION").into());
    save_safetensors(path, &out, Some(meta))
}

/// A cache loaded from a file, with what it says about itself.
pub struct LoadedCache {
    pub cache: KvCache,
    pub chat: bool,
    pub params: serde_json::Value,
}

/// Load a cache saved by [`save_cache`], refusing one made for a different model.
pub fn load_cache(path: &Path, model: &Model) -> Result<LoadedCache> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Invalid(format!("{}: {msg}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors { path: path.into(), msg: e.to_string() })?;
    let md = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| md.get(k).cloned().ok_or_else(|| bad(format!("not a kvcompact cache (no {k:?} metadata)")));
    if get("format")? != CACHE_FORMAT {
        return Err(bad(format!("unknown cache format {:?}", get("format")?)));
    }
    let fp = get("model_fingerprint")?;
    if fp != model_fingerprint(model) {
        return Err(bad(format!(
            "this cache was made for a different model ({}); load that model with --model",
            md.get("model_dir").map(String::as_str).unwrap_or("unknown")
        )));
    }
    let c = &model.config;
    let num = |k: &str| -> Result<usize> { get(k)?.parse::<usize>().map_err(|_| bad(format!("metadata {k} is not a number"))) };
    let (nl, nkv, hd, logical) = (num("n_layers")?, num("n_kv_heads")?, num("head_dim")?, num("logical_len")?);
    if (nl, nkv, hd) != (c.n_layers, c.n_kv_heads, c.head_dim) {
        return Err(bad("cache shape does not match the model".into()));
    }
    if logical > c.max_position_embeddings {
        return Err(bad(format!("logical length {logical} exceeds the model's context")));
    }
    let tensors = crate::weights::load_safetensors(path)?;
    let mut cache = KvCache::new(nl, nkv, hd);
    cache.advance(logical);
    for l in 0..nl {
        for h in 0..nkv {
            let n = format!("layer{l}.head{h}");
            let f = |suffix: &str| -> Result<Vec<f32>> {
                match tensors.get(&format!("{n}.{suffix}")) {
                    Some((_, crate::weights::TensorData::F32(v))) => Ok(v.clone()),
                    _ => Err(bad(format!("missing or non-f32 tensor {n}.{suffix}"))),
                }
            };
            let positions: Vec<u32> = match tensors.get(&format!("{n}.positions")) {
                Some((_, crate::weights::TensorData::I64(v))) => v
                    .iter()
                    .map(|&p| u32::try_from(p).map_err(|_| bad(format!("{n}.positions has an invalid position {p}"))))
                    .collect::<Result<_>>()?,
                _ => return Err(bad(format!("missing or non-integer tensor {n}.positions"))),
            };
            let (keys, values, beta) = (f("keys")?, f("values")?, f("beta")?);
            if keys.iter().chain(&values).chain(&beta).any(|x| !x.is_finite()) {
                return Err(bad(format!("{n} holds NaN or infinite values")));
            }
            cache.replace_head(l, h, HeadRows { keys, values, positions, bias: Some(beta) }).map_err(|e| bad(e.to_string()))?;
        }
    }
    cache.check()?;
    let chat = md.get("chat").is_some_and(|v| v == "true");
    let params = md.get("params").and_then(|p| serde_json::from_str(p).ok()).unwrap_or(serde_json::Value::Null);
    Ok(LoadedCache { cache, chat, params })
}

// ---------------------------------------------------------------------------------------------
// Answering questions about a cached context

/// Greedy answer (at most `max_tokens`, stopping at end of turn) to `question_ids` asked after
/// the context in `cache`; the cache is rolled back to the context afterwards.
pub fn answer(model: &Model, st: &mut RunState, cache: &mut KvCache, question_ids: &[u32], eos: &[u32], max_tokens: usize) -> Result<Vec<u32>> {
    let ctx = cache.next_pos();
    let mut sampler = crate::sampling::Sampler::new(0.0, 1.0, 0);
    let opts = crate::generate::GenOptions { max_tokens, stop_at_eos: true };
    let out = crate::generate::generate(model, st, cache, question_ids, eos, &mut sampler, &opts, |_| Ok(()));
    cache.truncate_to(ctx);
    Ok(out?.tokens)
}

/// Mean negative log-likelihood (nats/token) of `answer_ids` teacher-forced after
/// `question_ids` on the context in `cache` (rolled back afterwards): the "log-perplexity of
/// the full-cache answers" of spec §14.
pub fn answer_nll(model: &Model, st: &mut RunState, cache: &mut KvCache, question_ids: &[u32], answer_ids: &[u32]) -> Result<f64> {
    if answer_ids.is_empty() {
        return Ok(0.0);
    }
    let ctx = cache.next_pos();
    let input: Vec<u32> = question_ids.iter().chain(&answer_ids[..answer_ids.len() - 1]).copied().collect();
    let r = model.forward(st, cache, &input, Logits::All);
    cache.truncate_to(ctx);
    r?;
    let v = model.config.vocab_size;
    let first = question_ids.len() - 1;
    let mut total = 0.0f64;
    for (k, &tgt) in answer_ids.iter().enumerate() {
        let row = &st.logits[(first + k) * v..(first + k + 1) * v];
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        total += lse - row[tgt as usize] as f64;
    }
    Ok(total / answer_ids.len() as f64)
}

// ---------------------------------------------------------------------------------------------
// Online compaction during generation (spec §12)

/// Compacts all but the most recent rows of every head whenever the physical cache reaches
/// `max_cache_tokens` rows: rows [0, len − keep_recent) are replaced by about 1/ratio as many,
/// with earlier β carried as the prior bias (β_new = b + ln B). Reference queries come from
/// repeating the tokens behind the compacted rows (the most recent `max_cache_tokens` of them).
pub struct OnlineCompaction<'a> {
    pub tok: &'a Tokenizer,
    pub method: &'a dyn Compressor,
    pub max_cache_tokens: usize,
    pub keep_recent: usize,
    pub chat: bool,
    pub opts: CompactOptions,
    /// Reports of the compactions done so far.
    pub reports: Vec<CompactReport>,
    state: Option<RunState>,
}

impl<'a> OnlineCompaction<'a> {
    pub fn new(tok: &'a Tokenizer, method: &'a dyn Compressor, max_cache_tokens: usize, keep_recent: usize, chat: bool, opts: CompactOptions) -> Result<Self> {
        if keep_recent + 2 > max_cache_tokens {
            return Err(Error::Invalid(format!(
                "--keep-recent {keep_recent} must leave room below --max-cache-tokens {max_cache_tokens}"
            )));
        }
        if !(opts.ratio > 1.0) {
            return Err(Error::Invalid(format!("online compaction needs --ratio > 1, got {}", opts.ratio)));
        }
        Ok(OnlineCompaction { tok, method, max_cache_tokens, keep_recent, chat, opts, reports: Vec::new(), state: None })
    }
}

impl crate::generate::CachePolicy for OnlineCompaction<'_> {
    fn after_step(&mut self, model: &Model, cache: &mut KvCache, tokens: &[u32]) -> Result<()> {
        if cache.max_len() < self.max_cache_tokens {
            return Ok(());
        }
        let t0 = Instant::now();
        let c = &model.config;
        let (nl, nkv) = (c.n_layers, c.n_kv_heads);
        let rows: Vec<Range<usize>> = (0..nl * nkv).map(|i| 0..cache.len(i / nkv, i % nkv).saturating_sub(self.keep_recent)).collect();
        // The text behind the compacted rows: every position before the protected window.
        let cut = cache.next_pos().saturating_sub(self.keep_recent).min(tokens.len());
        let from = cut.saturating_sub(self.max_cache_tokens);
        let mut query_tokens = repeat_tokens(self.tok, self.chat, &tokens[from..cut])?;
        let room = c.max_position_embeddings.saturating_sub(cache.next_pos());
        query_tokens.truncate(room);
        let budgets: Vec<usize> = rows.iter().map(|r| ((r.len() as f64 / self.opts.ratio) as usize).max(1).min(r.len())).collect();
        let mut report = CompactReport { method: self.method.name().into(), queries: "repeat".into(), ratio: self.opts.ratio, ..Default::default() };
        report.kv_bytes_before = cache.bytes();
        let st = self.state.get_or_insert_with(|| model.new_state(DEFAULT_MAX_BATCH));
        let mut evals: Vec<Vec<(HeadEval, bool)>> = vec![Vec::new(); nl * nkv];
        let span = Span { rows, query_tokens };
        compact_span(model, st, cache, &span, self.method, &budgets, &self.opts, None, &mut evals, &mut report)?;
        cache.check()?;
        report.kv_bytes_after = cache.bytes();
        let es: Vec<&HeadEval> = evals.iter().flatten().map(|(e, _)| e).collect();
        report.mean_rel_l2 = es.iter().map(|e| e.mean_rel_l2).sum::<f64>() / es.len().max(1) as f64;
        report.mean_mass_err = es.iter().map(|e| e.mean_mass_err).sum::<f64>() / es.len().max(1) as f64;
        report.total_seconds = t0.elapsed().as_secs_f64();
        tracing::info!(rows = cache.max_len(), seconds = report.total_seconds, "online compaction");
        self.reports.push(report);
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Non-uniform head budgets

/// Per-head budget proportions `{"L{l}H{h}": p}` from a sensitivity sweep (spec §11, simplified):
/// compact the context uniformly at `ratio` and at `2·ratio`, and give each head budget in
/// proportion to how much its held-out attention error grows when its budget halves (half of
/// the total stays uniform, so no head is starved). The reference sweeps 51 ratios per head and
/// scores answer log-perplexity; this sweep costs two compactions and scores attention outputs.
pub fn sensitivity_budgets(model: &Model, tok: &Tokenizer, layout: &ContextLayout, method: &dyn Compressor, opts: &CompactOptions) -> Result<(HashMap<String, f64>, Vec<f64>, Vec<f64>)> {
    let uniform = CompactOptions { budgets: None, ..opts.clone() };
    let (_, at_r) = compact_context(model, tok, layout, method, &uniform)?;
    let half = CompactOptions { ratio: opts.ratio * 2.0, ..uniform };
    let (_, at_2r) = compact_context(model, tok, layout, method, &half)?;
    let sens: Vec<f64> = at_2r.head_rel_l2.iter().zip(&at_r.head_rel_l2).map(|(b, a)| (b - a).max(0.0)).collect();
    let h = sens.len() as f64;
    let total: f64 = sens.iter().sum();
    let nkv = model.config.n_kv_heads;
    let mut out = HashMap::new();
    for (i, s) in sens.iter().enumerate() {
        let p = if total > 0.0 { 0.5 / h + 0.5 * s / total } else { 1.0 / h };
        out.insert(format!("L{}H{}", i / nkv, i % nkv), p);
    }
    Ok((out, at_r.head_rel_l2, at_2r.head_rel_l2))
}
