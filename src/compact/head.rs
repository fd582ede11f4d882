//! What a method sees of one (layer, KV head) and what it returns: [`HeadInput`] (the span to
//! compress, with its reference queries), [`HeadContext`] (the rest of the head and the context's
//! own queries, for methods that score by attention), [`CompactedHead`] and [`HeadStats`].

use std::ops::Range;

use serde::Serialize;

use crate::cache::KvCache;

/// One (layer, KV head) to compress. Shapes: T rows, d = head_dim, n reference queries.
#[derive(Debug, Clone, Copy)]
pub struct HeadInput<'a> {
    /// Model layer of this head (for error messages and [`head_seed`]).
    pub layer: usize,
    /// KV head index within the layer.
    pub kv_head: usize,
    /// Head dimension d; every row below is d wide.
    pub d: usize,
    /// Keys of the span, row-major, already rotated (RoPE applied, as the cache stores them).
    pub keys: &'a [f32],            // [T, d] post-RoPE (as cached)
    /// Values of the span, row-major, row j paired with key j.
    pub values: &'a [f32],          // [T, d]
    /// Absolute token position of each row; strictly increasing.
    pub positions: &'a [u32],       // [T] absolute positions, increasing
    /// Additive logit bias per row left by an earlier compaction; None means all 0.
    pub bias: Option<&'a [f32]>,    // [T] existing logit bias (from an earlier compaction), else 0
    /// Reference queries the fit matches, post-RoPE; required by methods whose
    /// [`Compressor::needs_queries`](crate::compact::Compressor::needs_queries) is true.
    pub queries: Option<&'a [f32]>, // [n, d] reference queries of the G query heads of this KV head, group-major, post-RoPE
    /// Multiplier s of the logits s·q·kᵀ; must be finite and > 0.
    pub scale: f32,                 // attention logit scale (1/sqrt(d) for our models)
}

impl<'a> HeadInput<'a> {
    /// Rows `rows` of (layer, kv_head) of `cache` as a method's input; attention scale 1/√d.
    pub fn from_cache(
        cache: &'a KvCache,
        layer: usize,
        kv_head: usize,
        rows: Range<usize>,
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
        if !self.keys.len().is_multiple_of(self.d) {
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
    /// Seconds spent choosing the kept rows (scoring included for eviction methods).
    pub select_seconds: f64,
    /// Seconds spent fitting β.
    pub beta_seconds: f64,
    /// Seconds spent fitting C_v.
    pub values_seconds: f64,
    /// Rows kept (below the budget only when OMP ran out of candidates, spec §4.2 step 3).
    pub kept: usize,
    /// β least-squares solves that needed the ridge fallback (rows < t or non-finite QR).
    pub beta_ridge_fallbacks: usize,
    /// Condition estimate of the final β fit's design M = E[:, S].
    pub beta_cond: f64,
    /// Kept keys whose B sits at the lower bound.
    pub beta_at_lo: usize,
    /// Kept keys whose B sits at the upper bound.
    pub beta_at_hi: usize,
    /// Condition estimate of the C_v design X (unpivoted QR).
    pub values_cond: f64,
    /// How C_v was obtained: "qr", "ridge-normal", "guard-ridge", "guard-direct", "direct", "identity".
    pub values_method: String,
    /// The §6.4 guard fired (κ, size or finiteness) for this head.
    pub guard_tripped: bool,
    /// OMP: selection iterations (drop rounds not counted).
    pub omp_iterations: usize,
    /// OMP: B fits, selection and drop rounds together.
    pub omp_solves: usize,
    /// OMP: refinement rounds that dropped keys with ln B below the cutoff (spec §4.2 step 7).
    pub omp_drop_rounds: usize,
    /// OMP: keys dropped over all refinement rounds.
    pub omp_dropped: usize,
    /// OMP fast path: incremental-Cholesky breakdowns that switched the head to QR solves.
    pub omp_fast_fallbacks: usize,
    /// OMP fast path: Gram-column GEMM batches.
    pub omp_gram_batches: usize,
    /// OMP fast path: candidate rows whose correlation was verified with an exact dot.
    pub omp_verified: usize,
    /// OMP fast path: full exact correlation passes (too many candidates to verify).
    pub omp_exact_passes: usize,
    /// Active-set sub-problems solved by a fallback.
    pub active_set_fallbacks: usize,
    /// Active-set runs that hit the iteration cap.
    pub active_set_unconverged: usize,
}

/// What a method keeps for one head: rows sorted by position (spec §3.6).
#[derive(Debug, Clone)]
pub struct CompactedHead {
    /// Input rows kept (indices into [`HeadInput`]'s T rows), strictly increasing.
    pub indices: Vec<usize>, // [t] rows of the input kept, increasing
    /// Keys of the kept rows C_k, row-major, copied unchanged from the input (post-RoPE).
    pub keys: Vec<f32>,      // [t, d]
    /// The rows' new additive logit bias, replacing the input's: b_j + ln B_j for fitted methods,
    /// the prior bias b_j (0 without one) for methods without β.
    pub beta: Vec<f32>,      // [t] full new bias (b_j + ln B_j); zeros for methods without β (prior bias b_j kept)
    /// Values C_v of the kept rows, row-major: fitted by least squares or copied from V.
    pub values: Vec<f32>,    // [t, d]
    /// Timings and solver events of this head.
    pub stats: HeadStats,    // timings per phase (select, beta, values), solver events (fallbacks, guard trips), cond estimates
}

impl CompactedHead {
    /// Rows kept, t.
    pub fn len(&self) -> usize {
        self.indices.len()
    }

    /// True when no row was kept (budget 0).
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }

    /// The kept rows' absolute positions.
    pub fn positions(&self, input: &HeadInput) -> Vec<u32> {
        self.indices.iter().map(|&i| input.positions[i]).collect()
    }
}

/// The whole cached head that the span is part of (template rows before and after included).
#[derive(Debug, Clone)]
pub struct FullHead<'a> {
    /// Every cached key of the head, row-major, post-RoPE.
    pub keys: &'a [f32],         // [N, d] post-RoPE
    /// Additive logit bias of every cached row; None means all 0.
    pub bias: Option<&'a [f32]>, // [N] additive logit bias, None = 0
    /// Absolute position of every cached row, increasing.
    pub positions: &'a [u32],    // [N] increasing
    /// The rows of the span (`HeadInput`'s rows) inside the N rows.
    pub span: Range<usize>,
}

/// Queries observed while the context was prefilled (post-RoPE, as `model::Capture` records them).
#[derive(Debug, Clone, Copy)]
pub struct Observed<'a> {
    /// Post-RoPE queries of every query head of the layer, one row per prefilled token.
    pub queries: &'a [f32],   // [m, n_heads * d] token-major, every query head of the layer
    /// Absolute position of each query row, increasing.
    pub positions: &'a [u32], // [m] increasing
    /// Query heads of the layer (all of them, not only this KV head's group).
    pub n_heads: usize,
}

impl Observed<'_> {
    /// Tokens observed, m.
    pub fn len(&self) -> usize {
        self.positions.len()
    }
    /// True when no query was observed.
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
    /// The whole cached head around the span (for scores over every cached row).
    pub full: Option<FullHead<'a>>,
    /// The layer's queries recorded during prefill (SnapKV/H2O/TOVA-style scores).
    pub observed: Option<Observed<'a>>,
    /// RoPE inverse frequencies [d/2] of the model ([`crate::model::rope_inv_freq`]).
    pub inv_freq: Option<&'a [f32]>,
    /// Logical length of the sequence: the position the next token gets.
    pub next_pos: usize,
    /// Query heads per KV head (G); 0 = unknown (taken from the queries when needed).
    pub group: usize,
}

/// Per-head seed derived from a run seed and the head's coordinates (splitmix64 mixing), so every
/// head gets an independent stream whatever order heads are processed in.
pub fn head_seed(seed: u64, layer: usize, kv_head: usize) -> u64 {
    let mut z = seed ^ ((layer as u64) << 32 | kv_head as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

