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

use fit::{fit_b, fit_values, Elem};
use highest::{Pooling, Score as HScore};
use omp::{OmpConfig, OmpSchedule};

use crate::compact::{CompactedHead, Compressor, HeadInput, HeadStats};
use crate::device::Device;
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
    /// Where the n×T work (S, E, Y, key scores, X) runs; the solves stay on the CPU
    /// ([`crate::cuda::am`] says why). Results agree with the CPU within the tolerances of
    /// tests/cuda.rs, not bit for bit.
    pub device: Device,
}

impl AmConfig {
    /// `am-highest` | `am-hak` | `am-hak-basic` | `am-highestattnkeys`; `am-omp` | `am-omp-basic`;
    /// `am-omp-fast` (k = 4, ι = 2); `am-omp-seeded` (90% of the rows by HighestAttnKeys, then OMP);
    /// `baseline` | `am-baseline`.
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
            device: Device::Cpu,
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
            "am-omp-seeded" => AmConfig {
                name: "am-omp-seeded",
                selector: Selector::Omp(OmpConfig { seed_highest: 0.9, ..OmpConfig::default() }),
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
                    "unknown compaction method {name:?} (expected am-highest, am-omp, am-omp-fast, am-omp-seeded or baseline)"
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

    /// On the GPU, the statistics of all heads of one shape come from batched GEMMs; the rest of
    /// each head (selection, β, C_v) then runs in parallel on the CPU as usual.
    fn compress_batch(&self, heads: &[HeadInput], budgets: &[usize], seeds: &[u64]) -> Option<Result<Vec<CompactedHead>>> {
        if self.cfg.device != Device::Cuda || heads.len() < 2 {
            return None;
        }
        Some(match self.cfg.precision {
            Precision::F32 => self.batch::<f32>(heads, budgets, seeds),
            Precision::F64 => self.batch::<f64>(heads, budgets, seeds),
        })
    }
}

impl AmCompressor {
    fn batch<T: Elem>(&self, heads: &[HeadInput], budgets: &[usize], seeds: &[u64]) -> Result<Vec<CompactedHead>> {
        use rayon::prelude::*;
        // Heads with nothing to fit (empty budget, identity) take the per-head path; the others are
        // grouped by shape, one batched call per group.
        let mut groups: std::collections::BTreeMap<(usize, usize, usize, u32), Vec<usize>> = Default::default();
        for (i, (h, &b)) in heads.iter().zip(budgets).enumerate() {
            h.validate(b, true)?;
            if b > 0 && !(b == h.rows() && self.cfg.identity_shortcut) {
                let n = h.queries.map_or(0, |q| q.len() / h.d.max(1));
                groups.entry((n, h.rows(), h.d, h.scale.to_bits())).or_default().push(i);
            }
        }
        let mut pre: Vec<Option<(Stats<T>, f64)>> = (0..heads.len()).map(|_| None).collect();
        for idx in groups.values() {
            let t0 = Instant::now();
            let members: Vec<&HeadInput> = idx.iter().map(|&i| &heads[i]).collect();
            let got = gpu_stats_batch::<T>(&members, wanted_score(&self.cfg), self.cfg.precision)?;
            let secs = t0.elapsed().as_secs_f64() / idx.len() as f64;
            for (&i, st) in idx.iter().zip(got) {
                pre[i] = Some((st, secs));
            }
        }
        heads
            .par_iter()
            .zip(budgets.par_iter().zip(seeds.par_iter()))
            .zip(pre.into_par_iter())
            .map(|((h, (&b, &seed)), p)| match p {
                Some(((st, sc), secs)) => finish(&self.cfg, h, b, seed, st, sc, secs),
                None => self.compress_head(h, b, seed),
            })
            .collect()
    }
}

/// Step 1's output: the attention statistics, with the key scores when the GPU computed them.
type Stats<T> = (fit::AttnStats<T>, Option<Vec<f64>>);

/// The key score the selector ranks by, when it is Highest Attention Keys (the GPU computes it
/// beside E).
fn wanted_score(cfg: &AmConfig) -> Option<Score> {
    match cfg.selector {
        Selector::Highest { score, .. } => Some(score),
        Selector::Omp(_) => None,
    }
}

fn run<T: Elem>(cfg: &AmConfig, input: &HeadInput, budget: usize, seed: u64) -> Result<CompactedHead> {
    let t0 = Instant::now();
    let (st, gpu_scores) = attention_stats_on::<T>(cfg.device, input, cfg.inner_par, wanted_score(cfg), cfg.precision)?;
    finish(cfg, input, budget, seed, st, gpu_scores, t0.elapsed().as_secs_f64())
}

/// Steps 2–4 (selection, β, C_v) from the attention statistics of step 1.
fn finish<T: Elem>(cfg: &AmConfig, input: &HeadInput, budget: usize, seed: u64, st: fit::AttnStats<T>, gpu_scores: Option<Vec<f64>>, attn_seconds: f64) -> Result<CompactedHead> {
    let d = input.d;
    let mut stats = HeadStats { attn_seconds, ..Default::default() };

    // 1. Selection, as increasing row indices.
    let t1 = Instant::now();
    let mut idx = match &cfg.selector {
        Selector::Highest { score, pooling } => {
            let mut sc = match gpu_scores {
                Some(sc) => sc,
                None => highest::scores(&st.e, &st.z, st.n, st.t_rows, *score),
            };
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
            let n_seed = ((ocfg.seed_highest.clamp(0.0, 1.0) * budget as f64) as usize).min(budget);
            let seeds = if n_seed > 0 { highest::top_t(&highest::scores(&st.e, &st.z, st.n, st.t_rows, HScore::Rms), n_seed) } else { Vec::new() };
            let out = omp::omp_select(&st.e, &st.z, st.n, st.t_rows, budget, ocfg, fit, seed, cfg.inner_par, &seeds)?;
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
        ValueFit::LeastSquares => fit_values(cfg.guard.then_some(cfg.guard_cond_max), cfg.inner_par, cfg.device, input, &st, &keys, &beta, direct, t, &mut stats)?,
    };
    stats.values_seconds = t3.elapsed().as_secs_f64();
    Ok(CompactedHead { indices: idx, keys, beta, values, stats })
}

/// [`attention_stats`] on `device`, with the Highest Attention Keys scores when `score` is set
/// (computed beside E on the GPU; None on the CPU, where [`super::highest::scores`] runs after).
fn attention_stats_on<T: Elem>(device: Device, input: &HeadInput, inner_par: bool, score: Option<Score>, precision: Precision) -> Result<Stats<T>> {
    match device {
        Device::Cpu => Ok((fit::attention_stats::<T>(input, inner_par)?, None)),
        Device::Cuda => gpu_attention_stats(input, score, precision),
    }
}

fn gpu_attention_stats<T: Elem>(input: &HeadInput, score: Option<Score>, precision: Precision) -> Result<Stats<T>> {
    Ok(gpu_stats_batch::<T>(&[input], score, precision)?.pop().expect("one head in, one out"))
}

/// The statistics of heads of one shape (n, T, d, scale) on the GPU, in one batched call.
#[cfg(feature = "cuda")]
fn gpu_stats_batch<T: Elem>(inputs: &[&HeadInput], score: Option<Score>, precision: Precision) -> Result<Vec<Stats<T>>> {
    use crate::cuda::am::{attention_stats_batch, HeadMats, ScoreKind};
    let Some(first) = inputs.first() else { return Ok(Vec::new()) };
    let mats = inputs
        .iter()
        .map(|h| {
            let queries = h.queries.ok_or_else(|| crate::Error::Invalid("attention_stats: reference queries are required".into()))?;
            Ok(HeadMats { queries, keys: h.keys, values: h.values, bias: h.bias })
        })
        .collect::<Result<Vec<_>>>()?;
    let kind = score.map(|s| match s {
        Score::Rms => ScoreKind::Rms,
        Score::Mean => ScoreKind::Mean,
        Score::Max => ScoreKind::Max,
    });
    let (d, scale) = (first.d, first.scale);
    let n = mats[0].queries.len() / d;
    let t_rows = first.rows();
    let wrap = |e: Vec<T>, mu, z, y, sc| (fit::AttnStats { n, t_rows, e, mu, z, y }, sc);
    Ok(match precision {
        Precision::F32 => attention_stats_batch::<f32>(&mats, d, scale, kind)?.into_iter().map(|g| wrap(g.e.into_iter().map(T::from_f32).collect(), g.mu, g.z, g.y, g.scores)).collect(),
        Precision::F64 => attention_stats_batch::<f64>(&mats, d, scale, kind)?.into_iter().map(|g| wrap(g.e.into_iter().map(T::from_f64).collect(), g.mu, g.z, g.y, g.scores)).collect(),
    })
}

#[cfg(not(feature = "cuda"))]
fn gpu_stats_batch<T: Elem>(_: &[&HeadInput], _: Option<Score>, _: Precision) -> Result<Vec<Stats<T>>> {
    Err(crate::device::Device::Cuda.check().expect_err("no cuda feature"))
}
