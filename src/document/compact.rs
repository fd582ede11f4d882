//! [`compact_context`]: prefill a context, compact its article span head by head with any
//! [`Compressor`], evaluate each head on held-out queries, and install the result in the cache.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Instant;

use super::budgets::head_budgets;
use super::layout::ContextLayout;
use super::queries::{extra_queries, group_queries, local, merge_extra, repeat_tokens, self_study_tokens, subsample, LayerRun, QuerySource, Queries};
use crate::cache::{HeadRows, KvCache, KvDtype};
use crate::compact::registry::{self, Family, MethodOptions};
use crate::device::Device;
use crate::compact::{compress_heads, evaluate_head, qfilters, AmCompressor, BetaSolver, Budget, Compressor, HeadEval, HeadInput, HeadStats};
use crate::error::{Error, Result};
use crate::model::{Logits, Model, RunState, DEFAULT_MAX_BATCH};
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;

/// Options of [`compact_context`] (the `compact` command's flags); [`Default`] is ratio 20,
/// repeat queries, 4096 reference and 256 held-out queries per KV head, off-policy, one chunk.
#[derive(Debug, Clone)]
pub struct CompactOptions {
    /// Article rows kept per head ([`Budget::rows`] of the article, or of each chunk).
    pub budget: Budget,
    /// Where the reference queries come from.
    pub queries: QuerySource,
    /// Reference queries per KV head (n in the spec; split evenly over the group's query heads).
    pub n_queries: usize,
    /// Held-out queries per KV head for the error summary.
    pub n_test: usize,
    /// Extract layer l's queries after layers < l are compacted (spec §8), instead of all layers
    /// from the uncompacted cache.
    pub on_policy: bool,
    /// Compact the article in chunks of this many tokens, prefilling one chunk at a time.
    pub chunk_tokens: Option<usize>,
    /// Per-head budget proportions `{"L{l}H{h}": p}` (spec §11).
    pub budgets: Option<HashMap<String, f64>>,
    /// Water-fill cap: no head keeps more than this fraction of the article (spec §11: 0.75 in
    /// the reference's main runs).
    pub max_ratio_per_head: f64,
    /// Seed of the query subsampling, self-study sampling and every head's method seed.
    pub seed: u64,
    /// Spread the AM methods' rows over the heads by one global top-k of their key scores (max
    /// attention from the reference queries, normalised over the whole context) instead of
    /// ⌊T/ratio⌋ per head; the same total (issue 14's diagnosis, `docs/amdiag.md`). Off-policy
    /// only, and not with `budgets`; eviction methods ignore it.
    pub global_budgets: bool,
    /// Write every compressed head's input (keys, values, positions, bias, reference and held-out
    /// queries, scale) to `L{l}H{h}[.c{chunk}].safetensors` in this directory, in the format
    /// `compact-head` reads: the exact per-head problem, for an external implementation or a
    /// timing run against the official code.
    pub dump_heads: Option<std::path::PathBuf>,
}

impl Default for CompactOptions {
    fn default() -> Self {
        CompactOptions {
            budget: Budget::Ratio(20.0),
            queries: QuerySource::Repeat,
            n_queries: 4096,
            n_test: 256,
            on_policy: false,
            chunk_tokens: None,
            budgets: None,
            max_ratio_per_head: 1.0,
            seed: 0,
            global_budgets: false,
            dump_heads: None,
        }
    }
}

impl CompactOptions {
    /// Refuse options no compaction can run with (one-line errors), before any prefill.
    pub fn check(&self) -> Result<()> {
        self.budget.check()?;
        if self.budgets.is_some() && !matches!(self.budget, Budget::Ratio(_)) {
            // The water-fill (spec §11) is defined around a ratio's total.
            return Err(Error::Invalid(format!("per-head budget proportions take a ratio, not {}", self.budget)));
        }
        if self.n_queries == 0 {
            return Err(Error::Invalid("n_queries must be at least 1".into()));
        }
        if self.global_budgets && self.budgets.is_some() {
            return Err(Error::Invalid("give per-head budget proportions or the global allocation, not both".into()));
        }
        if self.chunk_tokens == Some(0) {
            return Err(Error::Invalid("chunk_tokens must be at least 1".into()));
        }
        Ok(())
    }

    /// How AM's rows are spread over the heads: "proportions" (given), "global" (off-policy
    /// only) or "uniform".
    pub fn budget_allocation(&self) -> &'static str {
        match (&self.budgets, self.global_budgets && !self.on_policy) {
            (Some(_), _) => "proportions",
            (None, true) => "global",
            (None, false) => "uniform",
        }
    }

    /// What a cache file made by [`compact_context`] records of how it was made: `method` as
    /// given, the budget form, the query settings, the β solver, the seed and the context's length.
    pub fn cache_params(&self, method: &str, nnls: BetaSolver, layout: &ContextLayout) -> serde_json::Value {
        let (form, value) = self.budget.entry();
        let mut p = serde_json::json!({"method": method, "queries": self.queries.name(), "n_queries": self.n_queries,
            "on_policy": self.on_policy, "chunk_tokens": self.chunk_tokens, "nnls": nnls.name(), "seed": self.seed,
            "context_tokens": layout.len(), "am_budgets": self.budget_allocation()});
        p[form] = value;
        p
    }
}

/// The compressor `kvcompact compact` (and the Python package's `Model.compact`) runs for the
/// registry name `name`: the Attention Matching family with β solver `nnls`, or an eviction
/// method that scores each head with the reference queries (non-causal, over the span) and keeps
/// rows with their prior bias and values. `qfilters` loads the model's filters or calibrates and
/// saves them next to the model.
pub fn document_method(model: &Model, name: &str, nnls: BetaSolver, device: Device) -> Result<Box<dyn Compressor>> {
    match registry::family(name)? {
        Family::Full => Err(Error::Invalid("\"full\" keeps the cache whole; give a method that compacts".into())),
        Family::AttentionMatching => {
            let mut cfg = registry::require_am(name, "compact")?.cfg.with_beta_solver(nnls);
            cfg.device = device;
            Ok(Box::new(AmCompressor::new(cfg)))
        }
        Family::Eviction if device != Device::Cpu => Err(registry::cpu_only(name)),
        Family::Eviction => {
            let filters = if name == "qfilters" {
                let cache = model.dir.join(qfilters::DEFAULT_FILTERS_FILE);
                Some(Arc::new(qfilters::load_or_calibrate(model, None, Some(&cache), true)?))
            } else {
                None
            };
            registry::method_with(name, &MethodOptions { filters, ..Default::default() })
        }
    }
}

/// Per-layer summary: article-span errors on held-out queries, averaged over the layer's heads.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LayerSummary {
    /// Layer index.
    pub layer: usize,
    /// Cache rows of the layer before compaction, summed over KV heads (context tokens × n_kv).
    pub rows_before: usize,
    /// Cache rows of the layer after compaction, summed over KV heads (prefix and suffix included).
    pub rows_after: usize,
    /// Mean over heads (and chunks) of each head's mean relative L2 output error.
    pub mean_rel_l2: f64,
    /// Max over heads (and chunks) of each head's max relative L2 output error.
    pub max_rel_l2: f64,
    /// Mean over heads (and chunks) of each head's mean mass error.
    pub mean_mass_err: f64,
    /// Head compactions in this layer whose C_v guard (spec §6.4) fired.
    pub guard_trips: usize,
}

/// What [`compact_context`] did: sizes, timings (seconds) and held-out errors.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CompactReport {
    /// The method's canonical name.
    pub method: String,
    /// The query source's name ([`QuerySource::name`]).
    pub queries: String,
    /// The budget asked for.
    pub budget: Budget,
    /// Whether queries were extracted on-policy.
    pub on_policy: bool,
    /// Tokens of the whole context: prefix + article + suffix.
    pub context_tokens: usize,
    /// Tokens of the article span that was compacted.
    pub article_tokens: usize,
    /// Article chunks compacted one after the other (1 without `chunk_tokens`).
    pub chunks: usize,
    /// Reference queries per KV head actually used (the last chunk's): token subsample × G plus extra queries.
    pub n_queries_per_kv_head: usize,
    /// Query tokens of the repeat source, when they had to be cut to fit the position range.
    pub repeat_truncated_to: Option<usize>,
    /// Bytes of the uncompacted cache: K and V (f32) plus positions (u32), no bias.
    pub kv_bytes_before: usize,
    /// Bytes of the compacted cache ([`KvCache::bytes`]: bias rows included).
    pub kv_bytes_after: usize,
    /// Wall time of the context prefill (all chunks).
    pub prefill_seconds: f64,
    /// Wall time of producing reference and held-out queries.
    pub query_seconds: f64,
    /// Attention-statistics seconds, summed over heads (per-thread time).
    pub attn_seconds: f64,
    /// Selection seconds, summed over heads (per-thread time).
    pub select_seconds: f64,
    /// β-fit seconds, summed over heads (per-thread time).
    pub beta_seconds: f64,
    /// C_v-fit seconds, summed over heads (per-thread time).
    pub values_seconds: f64,
    /// Wall time of the compaction calls.
    pub compact_seconds: f64,
    /// Wall time of the held-out evaluation of every head.
    pub eval_seconds: f64,
    /// Wall time of the global allocation's key scores ([`CompactOptions::global_budgets`]; 0
    /// without it).
    pub budget_seconds: f64,
    /// Wall time of the whole [`compact_context`] call.
    pub total_seconds: f64,
    /// One summary per layer, in layer order.
    pub layers: Vec<LayerSummary>,
    /// Held-out article-span rel_l2 per (layer, KV head), layer-major (mean over chunks).
    pub head_rel_l2: Vec<f64>,
    /// Mean over layers of [`LayerSummary::mean_rel_l2`].
    pub mean_rel_l2: f64,
    /// Mean over layers of [`LayerSummary::mean_mass_err`].
    pub mean_mass_err: f64,
}

/// The span being compacted: rows `rows[i]` of head i (layer-major), and the query tokens that
/// follow the context to produce reference queries.
pub(super) struct Span {
    pub(super) rows: Vec<Range<usize>>, // [n_layers * n_kv]
    pub(super) query_tokens: Vec<u32>,
}

/// Per-head budgets from one global top-k of the span rows' key scores
/// ([`super::budgets::global_key_scores`]) with the same total as `budgets`.
fn global_head_budgets(model: &Model, cache: &KvCache, span: &Span, budgets: &[usize], train: &[Vec<f32>]) -> Result<Vec<usize>> {
    let scores = super::budgets::global_key_scores(cache, &span.rows, train, model.config.attn_scale())?;
    let per_head = budgets.iter().sum::<usize>() / budgets.len().max(1);
    Ok(super::budgets::global_budgets(&scores, per_head))
}

/// Run the query tokens through the model layer by layer after `cache`, compacting each layer's
/// span as it goes (on-policy) or after collecting every layer's queries (off-policy).
#[allow(clippy::too_many_arguments)]
pub(super) fn compact_span(
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
        let tb = Instant::now();
        let global = (opts.global_budgets && opts.budgets.is_none() && method.scorer().is_none()).then(|| global_head_budgets(model, cache, span, budgets, &train)).transpose()?;
        report.budget_seconds += tb.elapsed().as_secs_f64();
        compress_and_install(model, cache, span, method, global.as_deref().unwrap_or(budgets), opts, &all, &train, &test, evals, report)?;
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

/// Compress the span of heads `heads` (layer-major indices), evaluate each on its held-out queries
/// against the original rows, and replace them in the cache: [before; compacted (β); after].
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
    if let Some(dir) = &opts.dump_heads {
        for ((&i, inp), &b) in heads.iter().zip(&inputs).zip(&bud) {
            let chunk = evals[i].len();
            let name = if chunk == 0 { format!("L{:02}H{}.safetensors", i / nkv, i % nkv) } else { format!("L{:02}H{}.c{chunk}.safetensors", i / nkv, i % nkv) };
            let seed = crate::compact::head_seed(opts.seed, inp.layer, inp.kv_head);
            crate::compact::oracle::write_head_input(&dir.join(name), inp, &test[i], Some((b, seed)))?;
        }
    }
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

/// Prefill `layout`, compact its article with `method`, and return the compacted cache.
pub fn compact_context(model: &Model, tok: &Tokenizer, layout: &ContextLayout, method: &dyn Compressor, opts: &CompactOptions) -> Result<(KvCache, CompactReport)> {
    let t_all = Instant::now();
    opts.check()?;
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
        budget: opts.budget,
        on_policy: opts.on_policy,
        context_tokens: layout.len(),
        article_tokens: layout.article.len(),
        kv_bytes_before: layout.len() * nl * nkv * KvCache::row_bytes(c.head_dim, model.kv_dtype()),
        ..Default::default()
    };
    let chunk = opts.chunk_tokens.unwrap_or(layout.article.len()).max(1);
    let chunks: Vec<&[u32]> = layout.article.chunks(chunk).collect();
    report.chunks = chunks.len();
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    // Compaction reads f32 rows; the result is stored in the model's KV dtype at the end.
    let mut cache = model.new_cache().into_dtype(KvDtype::F32);
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
        let extra = extra_queries(model, &captured, opts.queries, opts.n_queries, opts.n_test, opts.seed, share);
        report.query_seconds += tq.elapsed().as_secs_f64();
        let budgets = match (&opts.budgets, opts.budget) {
            (Some(p), Budget::Ratio(r)) => head_budgets(nl, nkv, part.len(), r, Some(p), opts.max_ratio_per_head)?,
            _ => vec![opts.budget.rows(part.len())?; nl * nkv],
        };
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
    let cache = cache.into_dtype(model.kv_dtype());
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

