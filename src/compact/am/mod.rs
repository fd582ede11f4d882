//! The Attention Matching family (spec §3–§6, §13): `am-highest`, `am-omp` and `baseline` share the
//! attention statistics, the β fit and the C_v fit; only the selection differs.
//!
//! Per head (spec §3):
//! 1. S = s·QKᵀ + 1bᵀ [n, T] (faer GEMM), μ = row max, E = exp(S − μ), Z̃ = Σ_j E (f64 sum),
//!    Y = (E·V) / Z̃ [n, d].
//! 2. Select S ⊂ rows ([`highest`] or [`omp`]), sorted by position.
//! 3. β: B = fit(M = E[:, S], y = Z̃) within [lo, hi] (reference recipe or active set), β = b_S + ln B
//!    in f32 (the prior bias stays in the new one: B multiplies exp(S_ij), which already holds b_j).
//! 4. C_v = argmin ‖X·C_v − Y‖ with X = softmax(s·Q·C_kᵀ + β), by QR, with the §6.4 guard.
//!
//! Precision: [`Precision::F32`] (default) runs the n×T work — S, E, Y, scores, OMP correlations —
//! on f32 storage with f64 sums; [`Precision::F64`] ("golden mode") keeps S and E in f64 so that a
//! float64 reference reproduces the selection. β, X and C_v are always fitted in f64.

use std::time::Instant;

pub mod fit;
pub mod highest;
pub mod omp;

use fit::{attention_stats, fit_b, fit_values, Elem};
use highest::{Pooling, Score as HScore};
use omp::{OmpConfig, OmpSchedule};

use crate::compact::{CompactedHead, Compressor, HeadInput, HeadStats};
use crate::{Error, Result};

pub use fit::{BetaFit, BetaSolver, FitParams, ValueFit, HIGHEST_BOUNDS, OMP_BOUNDS};
pub use highest::Score;

/// Storage precision of the n×T matrices (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 storage, f64 sums (default).
    F32,
    /// Golden mode: S and E in f64, for comparisons with a float64 reference.
    F64,
}

/// How the rows are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// HighestAttnKeys (spec §4.1): the top t rows by a per-key attention score.
    Highest {
        /// Per-key score over the reference queries.
        score: HScore,
        /// Optional pooling of the scores over positions (baselines only).
        pooling: Option<Pooling>,
    },
    /// Greedy pursuit on the mass matrix (spec §4.2).
    Omp(OmpConfig),
}

/// Every knob of the AM family. Start from [`AmConfig::from_name`].
#[derive(Debug, Clone, PartialEq)]
pub struct AmConfig {
    /// Canonical method name reported by [`Compressor::name`] (aliases resolved).
    pub name: &'static str,
    /// How the kept rows are chosen.
    pub selector: Selector,
    /// How β is obtained (fit with bounds, or the prior bias).
    pub beta: BetaFit,
    /// How C_v is obtained (least squares, or V\[S\]).
    pub values: ValueFit,
    /// The C_v conditioning guard of spec §6.4 (off = strict parity with the reference).
    pub guard: bool,
    /// Guard threshold on the estimated κ(X) (spec: 1e6).
    pub guard_cond_max: f64,
    /// Storage precision of the n×T matrices (S, E).
    pub precision: Precision,
    /// t = T returns the input rows unchanged (β = b, C_v = V) instead of fitting: nothing is being
    /// compressed, and a fit could only add rounding. Tests turn it off to exercise the fits.
    pub identity_shortcut: bool,
    /// Parallelise inside one head (row blocks of E, OMP correlation blocks, faer GEMMs) on the
    /// current rayon pool. Off by default: [`crate::compact::compress_heads`] parallelises over heads. The
    /// split is by rows/columns only, so results do not depend on the thread count.
    pub inner_par: bool,
}

impl AmConfig {
    /// `am-highest` | `am-hak` | `am-hak-basic` | `am-highestattnkeys`; `am-omp` | `am-omp-basic`;
    /// `am-omp-fast` (k = 4, ι = 2); `baseline` | `am-baseline`.
    pub fn from_name(name: &str) -> Result<AmConfig> {
        let base = AmConfig {
            name: "am-highest",
            selector: Selector::Highest { score: HScore::Rms, pooling: None },
            beta: BetaFit::Fit(FitParams { solver: BetaSolver::Reference, lo: HIGHEST_BOUNDS.0, hi: HIGHEST_BOUNDS.1, pg_iters: 2 }),
            values: ValueFit::LeastSquares,
            guard: true,
            guard_cond_max: 1e6,
            precision: Precision::F32,
            identity_shortcut: true,
            inner_par: false,
        };
        let omp_fit = BetaFit::Fit(FitParams { solver: BetaSolver::Reference, lo: OMP_BOUNDS.0, hi: OMP_BOUNDS.1, pg_iters: 0 });
        Ok(match name {
            "am-highest" | "am-hak" | "am-hak-basic" | "am-highestattnkeys" => base,
            "am-omp" | "am-omp-basic" => AmConfig { name: "am-omp", selector: Selector::Omp(OmpConfig::default()), beta: omp_fit, ..base },
            "am-omp-fast" => AmConfig {
                name: "am-omp-fast",
                selector: Selector::Omp(OmpConfig { schedule: OmpSchedule::Fixed { k_choice: 4, nnls_interval: 2 }, ..OmpConfig::default() }),
                beta: omp_fit,
                ..base
            },
            "baseline" | "am-baseline" => AmConfig {
                name: "baseline",
                selector: Selector::Highest { score: HScore::Mean, pooling: None },
                beta: BetaFit::Prior,
                values: ValueFit::Direct,
                ..base
            },
            _ => {
                return Err(Error::Invalid(format!(
                    "unknown compaction method {name:?} (expected am-highest, am-omp, am-omp-fast or baseline)"
                )))
            }
        })
    }

    /// Select the β solver (no effect on `baseline`).
    pub fn with_beta_solver(mut self, solver: BetaSolver) -> AmConfig {
        if let BetaFit::Fit(ref mut f) = self.beta {
            f.solver = solver;
        }
        self
    }

    /// Strict parity with the reference: guard off, and OMP on the reference path (a QR solve per
    /// fit, a streaming correlation pass per iteration, at most 3 drop rounds). Off restores the
    /// defaults (guard, fast paths, [`omp::DEFAULT_DROP_ROUNDS`]).
    pub fn strict_parity(mut self, on: bool) -> AmConfig {
        self.guard = !on;
        if let Selector::Omp(ref mut o) = self.selector {
            o.fast = !on;
            o.gram_corr = !on;
            o.max_drop_rounds = if on { omp::REFERENCE_DROP_ROUNDS } else { omp::DEFAULT_DROP_ROUNDS };
        }
        self
    }

    /// Key score of HighestAttnKeys selection (no effect on OMP).
    pub fn with_score(mut self, score: HScore) -> AmConfig {
        if let Selector::Highest { score: ref mut s, .. } = self.selector {
            *s = score;
        }
        self
    }

    /// OMP schedule (no effect on HighestAttnKeys).
    pub fn with_schedule(mut self, schedule: OmpSchedule) -> AmConfig {
        if let Selector::Omp(ref mut o) = self.selector {
            o.schedule = schedule;
        }
        self
    }
}

/// An AM-family method ready to run.
#[derive(Debug, Clone)]
pub struct AmCompressor {
    /// The method's knobs.
    pub cfg: AmConfig,
}

impl AmCompressor {
    /// Wrap a configuration.
    pub fn new(cfg: AmConfig) -> AmCompressor {
        AmCompressor { cfg }
    }
}

impl Compressor for AmCompressor {
    fn name(&self) -> &'static str {
        self.cfg.name
    }

    fn needs_queries(&self) -> bool {
        true
    }

    fn compress_head(&self, input: &HeadInput, budget: usize, seed: u64) -> Result<CompactedHead> {
        input.validate(budget, true)?;
        let t_rows = input.rows();
        if budget == 0 {
            return Ok(CompactedHead { indices: vec![], keys: vec![], beta: vec![], values: vec![], stats: HeadStats { values_method: "empty".into(), ..Default::default() } });
        }
        if budget == t_rows && self.cfg.identity_shortcut {
            return Ok(CompactedHead {
                indices: (0..t_rows).collect(),
                keys: input.keys.to_vec(),
                beta: input.bias.map_or_else(|| vec![0.0; t_rows], |b| b.to_vec()),
                values: input.values.to_vec(),
                stats: HeadStats { kept: t_rows, values_method: "identity".into(), ..Default::default() },
            });
        }
        match self.cfg.precision {
            Precision::F32 => run::<f32>(&self.cfg, input, budget, seed),
            Precision::F64 => run::<f64>(&self.cfg, input, budget, seed),
        }
    }
}

fn run<T: Elem>(cfg: &AmConfig, input: &HeadInput, budget: usize, seed: u64) -> Result<CompactedHead> {
    let d = input.d;
    let mut stats = HeadStats::default();
    let t0 = Instant::now();
    let st = attention_stats::<T>(input, cfg.inner_par)?;
    stats.attn_seconds = t0.elapsed().as_secs_f64();

    // 1. Selection, as increasing row indices.
    let t1 = Instant::now();
    let mut idx = match &cfg.selector {
        Selector::Highest { score, pooling } => {
            let mut sc = highest::scores(&st.e, &st.z, st.n, st.t_rows, *score);
            if let Some(p) = pooling {
                sc = highest::pool(&sc, *p);
            }
            highest::top_t(&sc, budget)
        }
        Selector::Omp(ocfg) => {
            let fit = match cfg.beta {
                BetaFit::Fit(f) => f,
                BetaFit::Prior => FitParams { solver: BetaSolver::Reference, lo: OMP_BOUNDS.0, hi: OMP_BOUNDS.1, pg_iters: 0 },
            };
            let out = omp::omp_select(&st.e, &st.z, st.n, st.t_rows, budget, ocfg, fit, seed, cfg.inner_par)?;
            stats.omp_iterations = out.iterations;
            stats.omp_solves = out.solves;
            stats.omp_drop_rounds = out.drop_rounds;
            stats.omp_dropped = out.dropped;
            stats.omp_fast_fallbacks = out.fast_fallbacks;
            stats.omp_gram_batches = out.gram_batches;
            stats.omp_verified = out.verified;
            stats.omp_exact_passes = out.exact_passes;
            stats.active_set_fallbacks += out.active_set_fallbacks;
            stats.beta_ridge_fallbacks += out.ridge_fallbacks;
            out.selected
        }
    };
    idx.sort_unstable();
    stats.select_seconds = t1.elapsed().as_secs_f64();
    stats.kept = idx.len();
    let t = idx.len();

    // 2. β = b_S + ln B (f32), from a fresh fit on the final set (spec §4.2 step 8).
    let t2 = Instant::now();
    let prior = |j: usize| input.bias.map_or(0.0f64, |b| b[j] as f64);
    let beta: Vec<f32> = match cfg.beta {
        BetaFit::Prior => idx.iter().map(|&j| prior(j) as f32).collect(),
        BetaFit::Fit(fit) => {
            let b = fit_b(&st, &idx, fit, seed, &mut stats)?;
            idx.iter().zip(&b).map(|(&j, &bj)| (prior(j) + bj.ln()) as f32).collect()
        }
    };
    stats.beta_seconds = t2.elapsed().as_secs_f64();

    let keys: Vec<f32> = idx.iter().flat_map(|&j| input.keys[j * d..(j + 1) * d].iter().copied()).collect();
    let direct: Vec<f32> = idx.iter().flat_map(|&j| input.values[j * d..(j + 1) * d].iter().copied()).collect();

    // 3. C_v.
    let t3 = Instant::now();
    let values = match cfg.values {
        ValueFit::Direct => {
            stats.values_method = "direct".into();
            direct
        }
        ValueFit::LeastSquares => fit_values(cfg.guard.then_some(cfg.guard_cond_max), cfg.inner_par, input, &st, &keys, &beta, direct, t, &mut stats)?,
    };
    stats.values_seconds = t3.elapsed().as_secs_f64();
    Ok(CompactedHead { indices: idx, keys, beta, values, stats })
}

