//! Online compaction during generation (spec §12).

use std::ops::Range;
use std::time::Instant;

use super::compact::{compact_span, CompactOptions, CompactReport, Span};
use super::queries::repeat_tokens;
use crate::cache::{KvCache, KvDtype};
use crate::compact::{Budget, Compressor, HeadEval};
use crate::error::{Error, Result};
use crate::model::{Model, RunState, DEFAULT_MAX_BATCH};
use crate::tokenizer::Tokenizer;


/// Compacts all but the most recent rows of every head whenever the physical cache reaches
/// `max_cache_tokens` rows: rows [0, len − keep_recent) are replaced by about 1/ratio as many,
/// with earlier β carried as the prior bias (β_new = b + ln B). Reference queries come from
/// repeating the tokens behind the compacted rows (the most recent `max_cache_tokens` of them).
pub struct OnlineCompaction<'a> {
    /// Tokenizer for the repeat query tokens.
    pub tok: &'a Tokenizer,
    /// The compression method applied to each head.
    pub method: &'a dyn Compressor,
    /// Compact when the longest head reaches this many rows.
    pub max_cache_tokens: usize,
    /// Most recent rows of each head left out of the compaction; keep_recent + 2 ≤ max_cache_tokens.
    pub keep_recent: usize,
    /// Render the repeat instruction with the chat template.
    pub chat: bool,
    /// Ratio (> 1), query counts, on-policy flag and seed of each compaction; the query source,
    /// per-head budgets and chunking are not used.
    pub opts: CompactOptions,
    /// Reports of the compactions done so far.
    pub reports: Vec<CompactReport>,
    state: Option<RunState>,
}

impl<'a> OnlineCompaction<'a> {
    /// Check the limits (room below `max_cache_tokens`, ratio > 1) and build the policy.
    pub fn new(tok: &'a Tokenizer, method: &'a dyn Compressor, max_cache_tokens: usize, keep_recent: usize, chat: bool, opts: CompactOptions) -> Result<Self> {
        if keep_recent + 2 > max_cache_tokens {
            return Err(Error::Invalid(format!(
                "--keep-recent {keep_recent} must leave room below --max-cache-tokens {max_cache_tokens}"
            )));
        }
        // A ratio above 1 shrinks every compaction's span, so the cache falls below the bound.
        if !matches!(opts.budget, Budget::Ratio(r) if r > 1.0) {
            return Err(Error::Invalid(format!("online compaction needs a ratio > 1, got {}", opts.budget)));
        }
        Ok(OnlineCompaction { tok, method, max_cache_tokens, keep_recent, chat, opts, reports: Vec::new(), state: None })
    }
}

impl crate::generate::CachePolicy for OnlineCompaction<'_> {
    fn after_step(&mut self, model: &Model, cache: &mut KvCache, tokens: &[u32]) -> Result<()> {
        if cache.max_len() < self.max_cache_tokens {
            return Ok(());
        }
        let st = self.state.get_or_insert_with(|| model.new_state(DEFAULT_MAX_BATCH));
        let report = compact_older_rows(model, st, self.tok, self.method, cache, tokens, self.keep_recent, self.max_cache_tokens, self.chat, &self.opts)?;
        tracing::info!(rows = cache.max_len(), seconds = report.total_seconds, "online compaction");
        self.reports.push(report);
        Ok(())
    }
}

/// Compact rows [0, len − `keep_recent`) of every head of `cache` to about 1/ratio as many,
/// earlier β carried as the prior bias. Reference queries repeat the tokens behind the compacted
/// rows (`tokens` holds the sequence by position; at most the last `max_query_tokens` of them).
/// What online compaction and the server's memory policy both run.
#[allow(clippy::too_many_arguments)]
pub fn compact_older_rows(
    model: &Model,
    st: &mut RunState,
    tok: &Tokenizer,
    method: &dyn Compressor,
    cache: &mut KvCache,
    tokens: &[u32],
    keep_recent: usize,
    max_query_tokens: usize,
    chat: bool,
    opts: &CompactOptions,
) -> Result<CompactReport> {
    if cache.dtype() != KvDtype::F32 {
        // Compaction reads f32 rows: compact a widened copy (exact), then store it back in the
        // cache's dtype (the fitted rows rounded once), also when compaction fails.
        let (dtype, before) = (cache.dtype(), cache.bytes());
        let mut work = std::mem::replace(cache, KvCache::new(0, 0, 0)).into_dtype(KvDtype::F32);
        let run = compact_older_rows(model, st, tok, method, &mut work, tokens, keep_recent, max_query_tokens, chat, opts);
        *cache = work.into_dtype(dtype);
        let mut report = run?;
        report.kv_bytes_before = before;
        report.kv_bytes_after = cache.bytes();
        return Ok(report);
    }
    let t0 = Instant::now();
    let c = &model.config;
    let (nl, nkv) = (c.n_layers, c.n_kv_heads);
    let rows: Vec<Range<usize>> = (0..nl * nkv).map(|i| 0..cache.len(i / nkv, i % nkv).saturating_sub(keep_recent)).collect();
    // The text behind the compacted rows: every position before the protected window.
    let cut = cache.next_pos().saturating_sub(keep_recent).min(tokens.len());
    let from = cut.saturating_sub(max_query_tokens);
    let mut query_tokens = repeat_tokens(tok, chat, &tokens[from..cut])?;
    let room = c.max_position_embeddings.saturating_sub(cache.next_pos());
    query_tokens.truncate(room);
    let budgets: Vec<usize> = rows.iter().map(|r| opts.budget.rows(r.len())).collect::<Result<_>>()?;
    let mut report = CompactReport { method: method.name().into(), queries: "repeat".into(), budget: opts.budget, ..Default::default() };
    report.kv_bytes_before = cache.bytes();
    let mut evals: Vec<Vec<(HeadEval, bool)>> = vec![Vec::new(); nl * nkv];
    let span = Span { rows, query_tokens };
    compact_span(model, st, cache, &span, method, &budgets, opts, None, &mut evals, &mut report)?;
    cache.check()?;
    report.kv_bytes_after = cache.bytes();
    let es: Vec<&HeadEval> = evals.iter().flatten().map(|(e, _)| e).collect();
    report.mean_rel_l2 = es.iter().map(|e| e.mean_rel_l2).sum::<f64>() / es.len().max(1) as f64;
    report.mean_mass_err = es.iter().map(|e| e.mean_mass_err).sum::<f64>() / es.len().max(1) as f64;
    report.total_seconds = t0.elapsed().as_secs_f64();
    Ok(report)
}
