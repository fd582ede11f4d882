//! The two method traits: [`Compressor`] (one head in, the kept or fitted rows out) and
//! [`Scorer`] (a budget-independent row score, turned into a compressor by
//! [`crate::compact::evict::Evict`]); and [`compress_heads`], which runs many heads in parallel.

use rayon::prelude::*;

use super::head::{head_seed, CompactedHead, HeadContext, HeadInput};
use crate::Result;

/// The interface every compression method implements (one file per method).
pub trait Compressor: Send + Sync {
    /// Canonical method name (aliases resolved), as reports show it.
    fn name(&self) -> &'static str;
    /// Whether compress_head needs HeadInput::queries.
    fn needs_queries(&self) -> bool;
    /// Keep `budget` ≤ T rows of one head. `seed` is the head's own seed (see [`head_seed`]);
    /// deterministic given the input and seed.
    fn compress_head(&self, input: &HeadInput, budget: usize, seed: u64) -> crate::Result<CompactedHead>;
    /// [`Compressor::compress_head`] with extra context (the whole head, the context's own
    /// queries, RoPE frequencies) for methods that use it; the default ignores it.
    fn compress_head_ctx(&self, input: &HeadInput, _ctx: &HeadContext, budget: usize, seed: u64) -> crate::Result<CompactedHead> {
        self.compress_head(input, budget, seed)
    }
    /// Compress many heads at once ([`compress_heads`] asks this first): a method that shares
    /// work across heads (Attention Matching on the GPU: batched GEMMs over heads of one shape)
    /// returns Some; the default, None, runs [`Compressor::compress_head`] per head in parallel.
    /// `seeds[i]` is head i's seed, as `compress_head` would get it.
    fn compress_batch(&self, _heads: &[HeadInput], _budgets: &[usize], _seeds: &[u64]) -> Option<crate::Result<Vec<CompactedHead>>> {
        None
    }
    /// The budget-independent scorer behind an eviction method (a harness can score once and
    /// select at many budgets); None for methods that fit (Attention Matching).
    fn scorer(&self) -> Option<&dyn Scorer> {
        None
    }
    /// Budgets per (layer, KV head), layer-major, for spans of `rows` rows whose uniform budget is
    /// `budget`; uniform by default (PyramidKV falls across layers).
    fn head_budgets(&self, n_layers: usize, n_kv: usize, _rows: usize, budget: usize) -> Vec<usize> {
        vec![budget; n_layers * n_kv]
    }
}

/// Rows protected from eviction (score +∞): the first `sinks` and the last `window` rows.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Protect {
    /// Leading rows always kept (attention sinks).
    pub sinks: usize,
    /// Trailing (most recent) rows always kept, after the sinks; the most recent win when the
    /// budget is short.
    pub window: usize,
}

/// A budget-independent row score (higher = keep). One file per method implements it.
pub trait Scorer: Send + Sync {
    /// Canonical method name (aliases resolved), as reports show it.
    fn name(&self) -> &'static str;
    /// The score needs queries: `HeadContext::observed` or, failing that, `HeadInput::queries`.
    fn needs_queries(&self) -> bool {
        false
    }
    /// Scores \[T\] of the span rows of one head.
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

/// Compress many heads in parallel on the current rayon pool (one task per head; each head runs
/// sequentially inside, so results are bit-identical for any thread count). `budgets[i]` is the
/// budget of `heads[i]`; head i uses seed [`head_seed`]`(seed, layer, kv_head)`.
pub fn compress_heads(
    method: &dyn Compressor,
    heads: &[HeadInput<'_>],
    budgets: &[usize],
    seed: u64,
) -> crate::Result<Vec<CompactedHead>> {
    if heads.len() != budgets.len() {
        return Err(crate::Error::Shape {
            op: "compress_heads",
            expected: format!("{} budgets", heads.len()),
            got: format!("{}", budgets.len()),
        });
    }
    let seeds: Vec<u64> = heads.iter().map(|h| head_seed(seed, h.layer, h.kv_head)).collect();
    if let Some(r) = method.compress_batch(heads, budgets, &seeds) {
        return r;
    }
    heads.par_iter().zip(budgets.par_iter()).zip(seeds.par_iter()).map(|((h, &b), &s)| method.compress_head(h, b, s)).collect()
}

