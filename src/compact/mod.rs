//! KV compression methods: the per-(layer, KV head) interface and the Attention Matching family.
//!
//! A method sees one head at a time ([`HeadInput`]) and returns the rows it keeps
//! ([`CompactedHead`]), sorted by position (spec §3.6). The model-level driver (query generation,
//! span selection, budgets, writing the cache) lives elsewhere and calls [`compress_heads`] to run
//! many heads in parallel.
//!
//! | method | file | selection | β | values |
//! |---|---|---|---|---|
//! | `am-highest` (`am-hak`) | [`am`], [`highest`] | top-t of rms/max/mean attention | clamped LS + 2 PG, [e⁻³, e³] | least squares |
//! | `am-omp` | [`am`], [`omp`] | greedy pursuit on the mass matrix | clamped LS, [1e-12, e⁷], drop β < −7 | least squares |
//! | `baseline` | [`am`], [`highest`] | top-t of mean attention | none (β = prior bias) | V[S] |
//! | eviction baselines and `qfilters` | [`evict`] + one file each, [`registry`] | top-t of a budget-independent score ([`Scorer`]) | prior bias | V[S] |
//!
//! [`oracle`] wraps one head in a safetensors file contract for other implementations.

pub mod am;
pub mod highest;
pub mod omp;
pub mod oracle;

// Eviction baselines (spec baselines.md): the common frame, one file per method, the registry.
pub mod evict;
pub mod expected_attention;
pub mod h2o;
pub mod knorm;
pub mod pyramidkv;
pub mod random;
pub mod registry;
pub mod snapkv;
pub mod streaming_llm;
pub mod tova;

use rayon::prelude::*;
use serde::Serialize;

pub use am::{AmCompressor, AmConfig, BetaFit, BetaSolver, Precision, Score, Selector, ValueFit};
pub use evict::{Evict, FullHead, HeadContext, Observed, Protect, Scorer};
pub use expected_attention::ExpectedAttention;
pub use h2o::H2o;
pub use knorm::KNorm;
pub use pyramidkv::PyramidKv;
pub use random::RandomEvict;
pub use registry::{method_from_name, method_with, MethodOptions, METHODS};
pub use snapkv::SnapKv;
pub use streaming_llm::StreamingLlm;
pub use tova::Tova;

/// One (layer, KV head) to compress. Shapes: T rows, d = head_dim, n reference queries.
#[derive(Debug, Clone, Copy)]
pub struct HeadInput<'a> {
    pub layer: usize,
    pub kv_head: usize,
    pub d: usize,
    pub keys: &'a [f32],            // [T, d] post-RoPE (as cached)
    pub values: &'a [f32],          // [T, d]
    pub positions: &'a [u32],       // [T] absolute positions, increasing
    pub bias: Option<&'a [f32]>,    // [T] existing logit bias (from an earlier compaction), else 0
    pub queries: Option<&'a [f32]>, // [n, d] reference queries of the G query heads of this KV head, group-major, post-RoPE
    pub scale: f32,                 // attention logit scale (1/sqrt(d) for our models)
}

impl<'a> HeadInput<'a> {
    /// Rows `rows` of (layer, kv_head) of `cache` as a method's input; attention scale 1/√d.
    pub fn from_cache(
        cache: &'a crate::kv_cache::KvCache,
        layer: usize,
        kv_head: usize,
        rows: std::ops::Range<usize>,
        queries: Option<&'a [f32]>,
        scale: f32,
    ) -> HeadInput<'a> {
        let d = cache.head_dim;
        let (keys, values, bias, positions) = cache.head(layer, kv_head);
        HeadInput {
            layer,
            kv_head,
            d,
            keys: &keys[rows.start * d..rows.end * d],
            values: &values[rows.start * d..rows.end * d],
            positions: &positions[rows.clone()],
            bias: bias.map(|b| &b[rows]),
            queries,
            scale,
        }
    }
}

impl HeadInput<'_> {
    /// Rows T (0 when d = 0; [`HeadInput::validate`] rejects that).
    pub fn rows(&self) -> usize {
        self.keys.len().checked_div(self.d).unwrap_or(0)
    }

    /// Reference queries n (0 without queries).
    pub fn n_queries(&self) -> usize {
        match self.queries {
            Some(q) => q.len().checked_div(self.d).unwrap_or(0),
            None => 0,
        }
    }

    /// Shape and value checks shared by every method: one-line errors naming what is wrong.
    pub fn validate(&self, budget: usize, needs_queries: bool) -> crate::Result<()> {
        use crate::Error;
        let op = "compress_head";
        let at = format!("layer {} kv_head {}", self.layer, self.kv_head);
        if self.d == 0 {
            return Err(Error::Invalid(format!("{op}: {at}: head_dim d is 0")));
        }
        if self.keys.len() % self.d != 0 {
            return Err(Error::Shape { op, expected: format!("keys [T, {}]", self.d), got: format!("{} values", self.keys.len()) });
        }
        let t_rows = self.rows();
        if self.values.len() != self.keys.len() {
            return Err(Error::Shape { op, expected: format!("values [{t_rows}, {}]", self.d), got: format!("{} values", self.values.len()) });
        }
        if self.positions.len() != t_rows {
            return Err(Error::Shape { op, expected: format!("positions [{t_rows}]"), got: format!("[{}]", self.positions.len()) });
        }
        if self.positions.windows(2).any(|w| w[0] >= w[1]) {
            return Err(Error::Invalid(format!("{op}: {at}: positions are not strictly increasing")));
        }
        if let Some(b) = self.bias {
            if b.len() != t_rows {
                return Err(Error::Shape { op, expected: format!("bias [{t_rows}]"), got: format!("[{}]", b.len()) });
            }
            if b.iter().any(|v| !v.is_finite()) {
                return Err(Error::Invalid(format!("{op}: {at}: bias has a NaN or infinite entry")));
            }
        }
        if budget > t_rows {
            return Err(Error::Invalid(format!("{op}: {at}: budget {budget} is larger than the {t_rows} rows")));
        }
        if !(self.scale.is_finite() && self.scale > 0.0) {
            return Err(Error::Invalid(format!("{op}: {at}: attention scale {} is not a positive number", self.scale)));
        }
        if self.keys.iter().chain(self.values).any(|v| !v.is_finite()) {
            return Err(Error::Invalid(format!("{op}: {at}: keys or values contain NaN or infinity")));
        }
        if needs_queries {
            let q = self.queries.ok_or_else(|| Error::Invalid(format!("{op}: {at}: this method needs reference queries")))?;
            if q.is_empty() {
                return Err(Error::Invalid(format!("{op}: {at}: reference queries are empty")));
            }
            if q.len() % self.d != 0 {
                return Err(Error::Shape { op, expected: format!("queries [n, {}]", self.d), got: format!("{} values (d mismatch?)", q.len()) });
            }
            if q.iter().any(|v| !v.is_finite()) {
                return Err(Error::Invalid(format!("{op}: {at}: queries contain NaN or infinity")));
            }
        }
        Ok(())
    }
}

/// Per-head timings and solver events (spec §6.4: guard trips are recorded, never silent).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeadStats {
    /// S = s·QKᵀ + b, exp, Z̃ and Y = AV.
    pub attn_seconds: f64,
    pub select_seconds: f64,
    pub beta_seconds: f64,
    pub values_seconds: f64,
    /// Rows kept (below the budget only when OMP ran out of candidates, spec §4.2 step 3).
    pub kept: usize,
    /// β least-squares solves that needed the ridge fallback (rows < t or non-finite QR).
    pub beta_ridge_fallbacks: usize,
    /// Condition estimate of the final β fit's design M = E[:, S].
    pub beta_cond: f64,
    /// Kept keys whose B sits at the lower / upper bound.
    pub beta_at_lo: usize,
    pub beta_at_hi: usize,
    /// Condition estimate of the C_v design X (unpivoted QR).
    pub values_cond: f64,
    /// How C_v was obtained: "qr", "ridge-normal", "guard-ridge", "guard-direct", "direct", "identity".
    pub values_method: String,
    /// The §6.4 guard fired (κ, size or finiteness) for this head.
    pub guard_tripped: bool,
    /// OMP: selection iterations, β solves, drop rounds and keys dropped.
    pub omp_iterations: usize,
    pub omp_solves: usize,
    pub omp_drop_rounds: usize,
    pub omp_dropped: usize,
    /// OMP fast path: incremental-Cholesky breakdowns that switched the head to QR solves.
    pub omp_fast_fallbacks: usize,
    /// OMP fast path: Gram-column GEMM batches, candidates verified exactly, full exact passes.
    pub omp_gram_batches: usize,
    pub omp_verified: usize,
    pub omp_exact_passes: usize,
    /// Active-set sub-problems solved by a fallback, and runs that hit the iteration cap.
    pub active_set_fallbacks: usize,
    pub active_set_unconverged: usize,
}

/// What a method keeps for one head: rows sorted by position (spec §3.6).
#[derive(Debug, Clone)]
pub struct CompactedHead {
    pub indices: Vec<usize>, // [t] rows of the input kept, increasing
    pub keys: Vec<f32>,      // [t, d]
    pub beta: Vec<f32>,      // [t] full new bias (b_j + ln B_j); zeros for methods without β (prior bias b_j kept)
    pub values: Vec<f32>,    // [t, d]
    pub stats: HeadStats,    // timings per phase (select, beta, values), solver events (fallbacks, guard trips), cond estimates
}

impl CompactedHead {
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The kept rows' absolute positions.
    pub fn positions(&self, input: &HeadInput) -> Vec<u32> {
        self.indices.iter().map(|&i| input.positions[i]).collect()
    }
}

pub trait Compressor: Send + Sync {
    fn name(&self) -> &'static str;
    /// Whether compress_head needs HeadInput::queries.
    fn needs_queries(&self) -> bool;
    fn compress_head(&self, input: &HeadInput, budget: usize, seed: u64) -> crate::Result<CompactedHead>;
    /// [`Compressor::compress_head`] with extra context (the whole head, the context's own
    /// queries, RoPE frequencies) for methods that use it; the default ignores it.
    fn compress_head_ctx(&self, input: &HeadInput, _ctx: &HeadContext, budget: usize, seed: u64) -> crate::Result<CompactedHead> {
        self.compress_head(input, budget, seed)
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

/// Build a method from its CLI name: `am-highest` (aliases `am-hak`, `am-hak-basic`), `am-omp`
/// (`am-omp-basic`), `am-omp-fast`, `baseline` (`am-baseline`). Knobs are public fields of
/// [`AmConfig`]; start from [`AmConfig::from_name`] to change them.
pub fn compressor_from_name(name: &str) -> crate::Result<AmCompressor> {
    Ok(AmCompressor::new(AmConfig::from_name(name)?))
}

/// Per-head seed derived from a run seed and the head's coordinates (splitmix64 mixing), so every
/// head gets an independent stream whatever order heads are processed in.
pub fn head_seed(seed: u64, layer: usize, kv_head: usize) -> u64 {
    let mut z = seed ^ ((layer as u64) << 32 | kv_head as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
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
    heads
        .par_iter()
        .zip(budgets.par_iter())
        .map(|(h, &b)| method.compress_head(h, b, head_seed(seed, h.layer, h.kv_head)))
        .collect()
}

/// Per-head quality on held-out queries (spec §14).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeadEval {
    pub queries: usize,
    /// ‖o − ô‖ / (‖o‖ + 1e-10), mean and max over queries.
    pub mean_rel_l2: f64,
    pub max_rel_l2: f64,
    /// |exp(lse_c − lse) − 1| (|Δlse| when |Δlse| < 1e-10), mean and max over queries.
    pub mean_mass_err: f64,
    pub max_mass_err: f64,
    /// mean over queries of mean_d (o − ô)².
    pub mean_mse: f64,
    /// mean over queries of cos(o, ô) (eps 1e-8).
    pub mean_cos: f64,
}

/// Attention output and log-sum-exp of `q` [d] against rows (`keys` [r, d], `values` [r, d],
/// additive `bias` [r]) in f64. No rows gives (0, −inf): spec §7 rule 6, never NaN.
fn attend_f64(q: &[f32], keys: &[f32], values: &[f32], bias: Option<&[f32]>, scale: f64, d: usize, out: &mut [f64], logits: &mut Vec<f64>) -> f64 {
    let r = keys.len() / d;
    logits.clear();
    for j in 0..r {
        let k = &keys[j * d..(j + 1) * d];
        let dot: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
        logits.push(scale * dot + bias.map_or(0.0, |b| b[j] as f64));
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let mut z = 0.0;
    for (j, &l) in logits.iter().enumerate() {
        let e = (l - mx).exp();
        z += e;
        let v = &values[j * d..(j + 1) * d];
        for (o, &vv) in out.iter_mut().zip(v) {
            *o += e * vv as f64;
        }
    }
    out.iter_mut().for_each(|o| *o /= z);
    mx + z.ln()
}

/// Per-head quality on held-out queries (spec §14): mean over queries of relative L2 of outputs and mass error |exp(lse_c − lse) − 1|, plus max.
///
/// `test_queries` [m, d] (group-major like the reference queries). o uses (K, V, prior bias b), ô
/// uses (C_k, C_v, β). Everything in f64; a malformed `test_queries` (length not a multiple of d)
/// uses its whole rows only.
pub fn evaluate_head(input: &HeadInput, out: &CompactedHead, test_queries: &[f32]) -> HeadEval {
    let d = input.d.max(1);
    let m = test_queries.len() / d;
    let scale = input.scale as f64;
    let per_query: Vec<(f64, f64, f64, f64)> = (0..m)
        .into_par_iter()
        .map_init(
            || (vec![0.0f64; d], vec![0.0f64; d], Vec::new()),
            |(o, oc, logits), i| {
                let q = &test_queries[i * d..(i + 1) * d];
                let lse = attend_f64(q, input.keys, input.values, input.bias, scale, d, o, logits);
                let lse_c = attend_f64(q, &out.keys, &out.values, Some(&out.beta), scale, d, oc, logits);
                let diff2: f64 = o.iter().zip(oc.iter()).map(|(a, b)| (a - b) * (a - b)).sum();
                let no = o.iter().map(|a| a * a).sum::<f64>().sqrt();
                let nc = oc.iter().map(|a| a * a).sum::<f64>().sqrt();
                let rel = diff2.sqrt() / (no + 1e-10);
                let dl = lse_c - lse;
                let mass = if dl.is_nan() {
                    f64::NAN
                } else if dl.abs() < 1e-10 {
                    dl.abs()
                } else {
                    (dl.exp() - 1.0).abs()
                };
                let cos = o.iter().zip(oc.iter()).map(|(a, b)| a * b).sum::<f64>() / (no * nc).max(1e-8);
                (rel, mass, diff2 / d as f64, cos)
            },
        )
        .collect();
    let mf = m.max(1) as f64;
    HeadEval {
        queries: m,
        mean_rel_l2: per_query.iter().map(|x| x.0).sum::<f64>() / mf,
        max_rel_l2: per_query.iter().map(|x| x.0).fold(0.0, f64::max),
        mean_mass_err: per_query.iter().map(|x| x.1).sum::<f64>() / mf,
        max_mass_err: per_query.iter().map(|x| x.1).fold(0.0, f64::max),
        mean_mse: per_query.iter().map(|x| x.2).sum::<f64>() / mf,
        mean_cos: per_query.iter().map(|x| x.3).sum::<f64>() / mf,
    }
}
