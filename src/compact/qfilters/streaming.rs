//! The streaming eviction cache (spec §5): a [`CachePolicy`] that keeps at most a budget of rows
//! per KV head during generation, by any [`Scorer`].

use std::path::Path;
use std::sync::Arc;

use super::calibrate::load_or_calibrate;
use super::filters::{QFilterScorer, DEFAULT_FILTERS_FILE};
use crate::cache::{HeadRows, KvCache};
use crate::compact::evict::{select, KNorm, RandomEvict, StreamingLlm};
use crate::compact::head::{head_seed, HeadContext, HeadInput};
use crate::compact::method::{Protect, Scorer};
use crate::error::{Error, Result};
use crate::generate::CachePolicy;
use crate::model::Model;


/// A streaming eviction policy for generation (spec §5, a superset of `QFiltersCache`): after
/// every step, a head holding `budget + evict_every` rows or more is cut back to `budget`: the
/// first `sinks` and last `window` rows stay, the rest are ranked by the scorer. Rows keep their
/// true positions, and the logical counter is untouched.
///
/// Invariants after every step: rows ≤ budget + evict_every − 1 per head; the last `window` rows
/// are the most recent ones; positions unique and sorted.
pub struct StreamingCache {
    /// Ranks the rows between the sinks and the window; called with no queries and an empty
    /// [`HeadContext`].
    pub scorer: Box<dyn Scorer>,
    /// Rows per KV head after an eviction; > window + sinks.
    pub budget: usize,
    /// Most recent rows always kept.
    pub window: usize,
    /// Leading rows always kept.
    pub sinks: usize,
    /// Evict once a head reaches budget + evict_every rows, so evict_every rows at once (≥ 1; default 1).
    pub evict_every: usize,
    /// Run seed; each eviction uses [`head_seed`] of it xor the logical position (default 0).
    pub seed: u64,
    /// Eviction rounds run so far (per head).
    pub evictions: usize,
}

impl StreamingCache {
    /// A policy evicting every step (`evict_every` 1, seed 0); errors unless budget > window + sinks.
    pub fn new(scorer: Box<dyn Scorer>, budget: usize, window: usize, sinks: usize) -> Result<StreamingCache> {
        if budget == 0 || budget <= window + sinks {
            return Err(Error::Invalid(format!(
                "--max-cache-tokens {budget} must be larger than --window {window} plus --sinks {sinks}"
            )));
        }
        Ok(StreamingCache { scorer, budget, window, sinks, evict_every: 1, seed: 0, evictions: 0 })
    }

    /// Let the cache grow to budget + m − 1 rows, then evict m at once (m ≥ 1).
    pub fn with_evict_every(mut self, m: usize) -> StreamingCache {
        self.evict_every = m.max(1);
        self
    }

    /// Cut one head back to the budget if it is over the threshold.
    pub fn evict_head(&self, cache: &mut KvCache, layer: usize, head: usize, scale: f32) -> Result<bool> {
        let n = cache.len(layer, head);
        if n < self.budget + self.evict_every {
            return Ok(false);
        }
        let d = cache.head_dim;
        let (keys, values, bias, positions) = cache.head(layer, head);
        let older = self.sinks..n - self.window;
        let input = HeadInput {
            layer,
            kv_head: head,
            d,
            keys: &keys[older.start * d..older.end * d],
            values: &values[older.start * d..older.end * d],
            positions: &positions[older.clone()],
            bias: bias.map(|b| &b[older.clone()]),
            queries: None,
            scale,
        };
        let seed = head_seed(self.seed ^ cache.next_pos() as u64, layer, head);
        let scores = self.scorer.score_head(&input, &HeadContext::default(), seed)?;
        let keep_older = select(&scores, self.budget - self.sinks - self.window, Protect::default());
        let rows: Vec<usize> = (0..self.sinks).chain(keep_older.iter().map(|&j| j + older.start)).chain(n - self.window..n).collect();
        let mut new = HeadRows {
            keys: Vec::with_capacity(rows.len() * d),
            values: Vec::with_capacity(rows.len() * d),
            positions: Vec::with_capacity(rows.len()),
            bias: bias.map(|_| Vec::with_capacity(rows.len())),
        };
        for &j in &rows {
            new.keys.extend_from_slice(&keys[j * d..(j + 1) * d]);
            new.values.extend_from_slice(&values[j * d..(j + 1) * d]);
            new.positions.push(positions[j]);
            if let (Some(nb), Some(b)) = (new.bias.as_mut(), bias) {
                nb.push(b[j]);
            }
        }
        cache.replace_head(layer, head, new)?;
        Ok(true)
    }
}

impl CachePolicy for StreamingCache {
    fn after_step(&mut self, model: &Model, cache: &mut KvCache, _tokens: &[u32]) -> Result<()> {
        let scale = model.config.attn_scale();
        let mut any = false;
        for l in 0..cache.n_layers {
            for h in 0..cache.n_kv_heads {
                any |= self.evict_head(cache, l, h, scale)?;
            }
        }
        self.evictions += usize::from(any);
        Ok(())
    }
}

/// The streaming policy behind `generate --method M --max-cache-tokens N --window W --sinks S`:
/// `qfilters` (filters from `filters`, else [`load_or_calibrate`], caching them as
/// `<model dir>/qfilters.safetensors`), `knorm`, `streaming-llm`
/// (recency: with S sinks this is StreamingLLM) or `random`.
pub fn streaming_policy(method: &str, filters: Option<&Path>, model: &Model, max_cache_tokens: usize, window: usize, sinks: usize) -> Result<Box<dyn CachePolicy>> {
    let scorer: Box<dyn Scorer> = match method {
        "qfilters" => {
            let cache = model.dir.join(DEFAULT_FILTERS_FILE);
            Box::new(QFilterScorer::new(Arc::new(load_or_calibrate(model, filters, Some(&cache), true)?)))
        },
        "knorm" => Box::new(KNorm),
        "streaming-llm" => Box::new(StreamingLlm { n_sink: 0 }),
        "random" => Box::new(RandomEvict),
        _ => {
            return Err(Error::Invalid(format!(
                "no streaming cache for method {method:?} (qfilters, knorm, streaming-llm or random)"
            )))
        }
    };
    Ok(Box::new(StreamingCache::new(scorer, max_cache_tokens, window, sinks)?))
}

