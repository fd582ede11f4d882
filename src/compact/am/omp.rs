//! OMP key selection (spec §4.2, `omp.py::OMPCompaction`): greedy pursuit on the mass matrix.
//! Columns Φ = E [n, T], target m = Z̃ \[n\]; correlations are raw (c = Eᵀr, no abs, no
//! normalisation); after each pick B is refitted on the chosen columns and r = m − E\[:,S\]·B.
//!
//! Two solve paths, selectable (`OmpConfig::fast`):
//! - **reference**: every fit re-solves from scratch on M = E[:, S] (QR, as `_nnls_pg` does) —
//!   ⅔·n·t³ multiply-adds per head, the parity path;
//! - **fast** (default, spec §15 speed-up): keep G = MᵀM and h = Mᵀm up to date as keys are added
//!   (n·|S| per key) and solve with a Cholesky factor that grows by one row per key (O(|S|²)).
//!   Mathematically the same least-squares solution; it differs from QR by rounding, more so when M
//!   is ill-conditioned (κ² instead of κ). A Cholesky breakdown (a new column numerically in the
//!   span of the others) switches the head to the reference path and is counted.
//!
//! Correlations c = Eᵀr (raw, f64 accumulation). The reference path streams the whole E once per
//! iteration (n·T multiply-adds, memory-bound: ≈ 9 ms for a 4096×4096 f32 E on this machine). The
//! fast path uses `GramCorr`: c = Eᵀy − Σ_k B_k·(Eᵀe_k) from Gram columns computed in batches by a
//! GEMM, then **verifies** every candidate whose rigorous error bound reaches the k-th best with
//! an exact dot in the same order as the streaming pass — so it picks the same keys, bit for bit,
//! at a fraction of the memory traffic.

use faer::MatRef;
use rayon::prelude::*;

use super::fit::{BetaSolver, Elem, FitParams};
use crate::linalg::dense::{self, CholGrow};
use crate::linalg::{nnls_active_set, nnls_active_set_gram, nnls_pg, nnls_pg_gram};
use crate::Result;

/// `(k_choice, nnls_interval)` as a function of the keys selected so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OmpSchedule {
    /// The same pair at every step.
    Fixed {
        /// Keys picked per iteration (0 is treated as 1).
        k_choice: usize,
        /// Refit B every this many iterations, carrying the last B (new keys at `lo`) in between
        /// (0 is treated as 1).
        nnls_interval: usize,
    },
    /// `DEFAULT_PROGRESSIVE_SCHEDULE`: (1, 1) below 300 keys, (2, 2) below 1500, then (4, 2).
    Progressive,
}

impl OmpSchedule {
    /// `(k_choice, nnls_interval)` once `selected` keys are chosen; both ≥ 1.
    pub fn at(self, selected: usize) -> (usize, usize) {
        match self {
            OmpSchedule::Fixed { k_choice, nnls_interval } => (k_choice.max(1), nnls_interval.max(1)),
            OmpSchedule::Progressive => {
                if selected < 300 {
                    (1, 1)
                } else if selected < 1500 {
                    (2, 2)
                } else {
                    (4, 2)
                }
            }
        }
    }
}

/// OMP knobs; the default is the reference configuration with both speed-ups on and the drop
/// refinement run to convergence ([`DEFAULT_DROP_ROUNDS`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OmpConfig {
    /// Keys picked per iteration and refit interval (default [`OmpSchedule::Progressive`]).
    pub schedule: OmpSchedule,
    /// Drop keys with ln B < cutoff after t are chosen, exclude them for good, and select again
    /// (spec §4.2 step 7); `None` disables the refinement.
    pub drop_cutoff: Option<f64>,
    /// Refinement rounds that may drop keys: [`REFERENCE_DROP_ROUNDS`] (3) in the reference and
    /// under `--strict-parity`; [`DEFAULT_DROP_ROUNDS`] by default, so that the refinement runs
    /// until no kept key is below the cutoff (see there).
    pub max_drop_rounds: usize,
    /// Incremental Gram/Cholesky solves (spec §15) instead of a fresh QR per fit.
    pub fast: bool,
    /// Correlations from batched Gram columns with exact verification instead of a full pass over
    /// E per iteration: the same picks as the streaming pass (module docs), far less memory traffic.
    pub gram_corr: bool,
    /// Fraction of the budget first filled with the HighestAttnKeys rows (top RMS attention over
    /// the same reference queries); OMP then picks the rest (`am-omp-seeded`: 0.9). 0 is plain
    /// OMP. Why: OMP alone spends a head's rows on what the reference queries attend to in bulk
    /// and loses answers end to end (docs/amdiag.md §G, §H).
    pub seed_highest: f64,
}

/// Drop rounds of the reference (`omp.py`: the refinement is entered at most 3 times with drops;
/// whatever is still below the cutoff then stays, at β down to ln 1e-12 ≈ −27.6).
pub const REFERENCE_DROP_ROUNDS: usize = 3;

/// Drop rounds of the default (non-strict) configuration: the reference's refinement run to
/// convergence (no kept key below the cutoff), bounded so that a pathological head stays cheap.
/// Why: after 3 rounds keys can remain at the β floor; they make X = softmax(s·Q·C_kᵀ + β)
/// numerically rank-deficient (κ ≈ 4e15 on layer 0 of SmolLM2 at t = T/10), where the reference's
/// unpivoted QR returns C_v ≈ 3e13 and any bounded C_v (our guard) loses accuracy. Converged, the
/// same head keeps no floor key (11 rounds, κ ≈ 1e3): held-out rel_l2 0.077 and mass error 0.020
/// against the reference's 0.098 and 0.109 (golden/am_official). Heads whose refinement converges
/// within 3 rounds are unchanged.
pub const DEFAULT_DROP_ROUNDS: usize = 32;

impl Default for OmpConfig {
    fn default() -> Self {
        OmpConfig { schedule: OmpSchedule::Progressive, drop_cutoff: Some(-7.0), max_drop_rounds: DEFAULT_DROP_ROUNDS, fast: true, gram_corr: true, seed_highest: 0.0 }
    }
}

/// The selected rows (in selection order) and what happened on the way.
#[derive(Debug, Clone, Default)]
pub struct OmpOutcome {
    /// Selected rows of E, in selection order (≤ t; fewer when candidates ran out).
    pub selected: Vec<usize>,
    /// Selection iterations (drop rounds not counted).
    pub iterations: usize,
    /// B fits, selection and drop rounds together.
    pub solves: usize,
    /// Refinement rounds that dropped at least one key.
    pub drop_rounds: usize,
    /// Keys dropped (and excluded for good) over all rounds.
    pub dropped: usize,
    /// Cholesky breakdowns that switched the head to the reference (QR) path.
    pub fast_fallbacks: usize,
    /// Active-set sub-problems solved by a fallback.
    pub active_set_fallbacks: usize,
    /// Reference-path least-squares solves that were not a plain QR (ridge fallback).
    pub ridge_fallbacks: usize,
    /// Fast path: Gram-column GEMM batches.
    pub gram_batches: usize,
    /// Fast path: candidate rows verified with exact dots.
    pub verified: usize,
    /// Fast path: full exact correlation passes (fallback when too many candidates).
    pub exact_passes: usize,
}

/// Breakdown threshold of the growing Cholesky: the new column's part orthogonal to the current
/// span, squared, must exceed this fraction of its squared norm (|sin θ| > 1e-6).
const CHOL_REL_TOL: f64 = 1e-12;

/// c = Eᵀr \[T\] with f64 accumulation; `par` splits the columns into blocks (same bits either way,
/// each c_j is summed over the rows in the same order).
pub fn correlations<T: Elem>(e: &[T], r: &[f64], n: usize, t_rows: usize, c: &mut [f64], par: bool) {
    const BLOCK: usize = 1024;
    if par && t_rows > BLOCK {
        c.par_chunks_mut(BLOCK).enumerate().for_each(|(b, cb)| corr_block(e, r, n, t_rows, b * BLOCK, cb));
    } else {
        corr_block(e, r, n, t_rows, 0, c);
    }
}

fn corr_block<T: Elem>(e: &[T], r: &[f64], n: usize, t_rows: usize, j0: usize, c: &mut [f64]) {
    struct Op<'a, T>(&'a [T], &'a [f64], usize, usize, usize, &'a mut [f64]);
    impl<T: Elem> pulp::WithSimd for Op<'_, T> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _simd: S) {
            let Op(e, r, n, t_rows, j0, c) = self;
            c.iter_mut().for_each(|x| *x = 0.0);
            let w = c.len();
            for i in 0..n {
                let ri = r[i];
                if ri == 0.0 {
                    continue;
                }
                let row = &e[i * t_rows + j0..i * t_rows + j0 + w];
                for (cj, &x) in c.iter_mut().zip(row) {
                    *cj += ri * x.to_f64();
                }
            }
        }
    }
    pulp::Arch::new().dispatch(Op(e, r, n, t_rows, j0, c))
}

/// Fast correlations from Gram columns g_j = Eᵀe_j (see the module docs).
///
/// All terms are non-negative (E ≥ 0, B ≥ lo ≥ 0), so the GEMM's error on g̃_j is at most
/// γ·g_j with γ = (n+1)·u/(1 − (n+1)·u) whatever the summation order, and the error of
/// c̃_j = c0_j − Σ_k B_k g̃_{s_k,j} is at most γ·Σ_k B_k g̃_{s_k,j} (plus f64 rounding).
struct GramCorr<'a, T> {
    n: usize,
    t_rows: usize,
    e: &'a [T],       // [n, T] row-major
    c0: Vec<f64>,     // [T] Eᵀy (streaming pass, f64 accumulation)
    slot: Vec<usize>, // [T] index into `g` / `cols`, usize::MAX when not computed
    g: Vec<T>,        // [cached, T] row-major: g̃_j = Eᵀe_j
    cols: Vec<T>,     // [cached, n] row-major: column j of E (gathered once per batch)
    cached: usize,
    gamma: f64,
    batch: usize,
    /// Stop speculating once this many rows are cached (memory: (T + n)·4 bytes per row).
    max_cached: usize,
    par: bool,
    batches: usize,
    verified: usize,
    exact_passes: usize,
}

/// Gram rows per GEMM: the next pick is usually among the current top few dozen candidates
/// (measured on real and synthetic heads: ≈ 9 picks per batch of 32 at T = 4096, t = 205), so one
/// batch serves several iterations; 32 needed fewer GEMM flops in total than 16 or 64.
const GRAM_BATCH: usize = 32;

/// Candidate sets larger than this fall back to exact correlations for every row.
const MAX_VERIFY: usize = 512;

impl<'a, T: Elem> GramCorr<'a, T> {
    fn new(e: &'a [T], y: &[f64], n: usize, t_rows: usize, par: bool) -> GramCorr<'a, T> {
        let mut c0 = vec![0.0f64; t_rows];
        correlations(e, y, n, t_rows, &mut c0, par);
        let nu = (n + 1) as f64 * T::UNIT_ROUNDOFF;
        GramCorr {
            n,
            t_rows,
            e,
            c0,
            slot: vec![usize::MAX; t_rows],
            g: Vec::new(),
            cols: Vec::new(),
            cached: 0,
            gamma: nu / (1.0 - nu),
            batch: GRAM_BATCH,
            max_cached: usize::MAX,
            par,
            batches: 0,
            verified: 0,
            exact_passes: 0,
        }
    }

    /// Column j of E, if its batch has been computed.
    fn col(&self, j: usize) -> Option<&[T]> {
        let s = self.slot[j];
        (s != usize::MAX).then(|| &self.cols[s * self.n..(s + 1) * self.n])
    }

    /// Compute g̃ for `need` (all of them) plus speculative `extra` rows, one GEMM for the batch.
    fn ensure(&mut self, need: &[usize], extra: impl Iterator<Item = usize>) {
        let mut rows: Vec<usize> = need.iter().copied().filter(|&j| self.slot[j] == usize::MAX).collect();
        if rows.is_empty() {
            return;
        }
        let room = if self.cached >= self.max_cached { 0 } else { self.batch };
        for j in extra {
            if rows.len() >= room.max(need.len()) {
                break;
            }
            if self.slot[j] == usize::MAX && !rows.contains(&j) {
                rows.push(j);
            }
        }
        let (n, tr, k) = (self.n, self.t_rows, rows.len());
        self.batches += 1;
        // Gather the batch's columns row by row (each row of E is touched once per batch).
        let base_c = self.cols.len();
        self.cols.resize(base_c + k * n, T::from_f32(0.0));
        {
            let cols = &mut self.cols[base_c..];
            for i in 0..n {
                let row = &self.e[i * tr..(i + 1) * tr];
                for (a, &j) in rows.iter().enumerate() {
                    cols[a * n + i] = row[j];
                }
            }
        }
        let base = self.g.len();
        self.g.resize(base + k * tr, T::from_f32(0.0));
        // g̃[rows] = (E[:, rows])ᵀ · E : [k, T] = [k, n] · [n, T].
        faer::linalg::matmul::matmul(
            faer::MatMut::from_row_major_slice_mut(&mut self.g[base..], k, tr),
            faer::Accum::Replace,
            faer::MatRef::from_row_major_slice(&self.cols[base_c..], k, n),
            faer::MatRef::from_row_major_slice(self.e, n, tr),
            T::from_f32(1.0),
            if self.par { faer::Par::rayon(0) } else { faer::Par::Seq },
        );
        for (a, &j) in rows.iter().enumerate() {
            self.slot[j] = self.cached + a;
        }
        self.cached += k;
    }

    fn g_row(&self, j: usize) -> &[T] {
        let s = self.slot[j];
        &self.g[s * self.t_rows..(s + 1) * self.t_rows]
    }

    /// Exact correlation of row j (cached column if available, else a strided read of E).
    fn exact(&self, j: usize, r: &[f64]) -> f64 {
        match self.col(j) {
            Some(c) => exact_dot(c, r),
            None => {
                let mut s = 0.0f64;
                for (i, &ri) in r.iter().enumerate() {
                    s += ri * self.e[i * self.t_rows + j].to_f64();
                }
                s
            }
        }
    }

    /// mass_j = Σ_k B_k g̃_{s_k, j} (≥ 0); the approximate correlation is c0 − mass.
    fn mass(&self, sel: &[usize], b: &[f64]) -> Vec<f64> {
        let mut mass = vec![0.0f64; self.t_rows];
        for (&s, &bs) in sel.iter().zip(b) {
            if bs != 0.0 && self.slot[s] != usize::MAX {
                for (m, &gv) in mass.iter_mut().zip(self.g_row(s)) {
                    *m += bs * gv.to_f64();
                }
            }
        }
        mass
    }

    /// The `k` best rows by exact correlation Eᵀr among those not `blocked`, ties to the lower
    /// index; `sel`/`b` is the set and weights that produced `r`. Every selected row with b > 0
    /// must have its g̃ computed.
    fn top(&mut self, sel: &[usize], b: &[f64], r: &[f64], blocked: &[bool], k: usize) -> Vec<usize> {
        let tr = self.t_rows;
        let mass = self.mass(sel, b);
        // Bound on |c̃ − c|: GEMM error, plus f64 rounding of the two sums.
        let bound = |j: usize| self.gamma * mass[j] * (1.0 + 1e-12) + 1e-13 * (self.c0[j].abs() + mass[j]);
        let approx = |j: usize| self.c0[j] - mass[j];
        let mut lbs: Vec<f64> = (0..tr).filter(|&j| !blocked[j]).map(|j| approx(j) - bound(j)).collect();
        if lbs.len() < k || k == 0 {
            return self.exact_top(r, blocked, k);
        }
        let kth = lbs.len() - k;
        lbs.select_nth_unstable_by(kth, |a, b| a.total_cmp(b));
        let floor = lbs[kth];
        let cand: Vec<usize> = (0..tr).filter(|&j| !blocked[j] && approx(j) + bound(j) >= floor).collect();
        if cand.len() > MAX_VERIFY {
            return self.exact_top(r, blocked, k);
        }
        self.verified += cand.len();
        let exact: Vec<(usize, f64)> = cand.iter().map(|&j| (j, self.exact(j, r))).collect();
        best_k(exact, k)
    }

    /// Exact correlations for every eligible row (fallback): one streaming pass.
    fn exact_top(&mut self, r: &[f64], blocked: &[bool], k: usize) -> Vec<usize> {
        self.exact_passes += 1;
        let mut c = vec![0.0f64; self.t_rows];
        correlations(self.e, r, self.n, self.t_rows, &mut c, self.par);
        best_k((0..self.t_rows).filter(|&j| !blocked[j]).map(|j| (j, c[j])).collect(), k)
    }

    /// Rows in decreasing order of the current approximate correlation (speculation order).
    fn order_hint(&self, sel: &[usize], b: &[f64], blocked: &[bool], limit: usize) -> Vec<usize> {
        let mass = self.mass(sel, b);
        let approx: Vec<f64> = self.c0.iter().zip(&mass).map(|(c, m)| c - m).collect();
        let mut idx: Vec<usize> = (0..self.t_rows).filter(|&j| !blocked[j]).collect();
        let lim = limit.min(idx.len());
        if lim == 0 {
            return vec![];
        }
        idx.select_nth_unstable_by(lim - 1, |&a, &b| approx[b].total_cmp(&approx[a]).then(a.cmp(&b)));
        idx.truncate(lim);
        idx.sort_by(|&a, &b| approx[b].total_cmp(&approx[a]).then(a.cmp(&b)));
        idx
    }
}

/// Σ_i x_i·r_i sequentially in f64 — the same rounding sequence as one lane of [`correlations`].
fn exact_dot<T: Elem>(x: &[T], r: &[f64]) -> f64 {
    let mut s = 0.0f64;
    for (&a, &b) in x.iter().zip(r) {
        s += b * a.to_f64();
    }
    s
}

/// Top `k` of (row, value) by value, ties to the lower row.
fn best_k(mut v: Vec<(usize, f64)>, k: usize) -> Vec<usize> {
    v.retain(|x| x.1.is_finite());
    v.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(k);
    v.into_iter().map(|x| x.0).collect()
}

/// Selection state shared by both solve paths.
struct State<'a, T: Elem> {
    e: &'a [T],     // [n, T]
    y: &'a [f64],   // [n] target Z̃
    n: usize,
    t_rows: usize,
    cap: usize,
    fit: FitParams,
    seed: u64,
    sel: Vec<usize>,      // selected rows, selection order
    cols: Vec<f64>,       // [n, cap] column-major: cols[k*n..] = E[:, sel[k]] in f64
    fast: bool,
    g: Vec<f64>,          // [cap, cap] row-major Gram of the selected columns (fast path)
    h: Vec<f64>,          // [cap] Mᵀy (fast path)
    chol: CholGrow,       // factor of g[..k, ..k] (fast path)
    out: OmpOutcome,
}

impl<'a, T: Elem> State<'a, T> {
    fn k(&self) -> usize {
        self.sel.len()
    }

    fn col(&self, k: usize) -> &[f64] {
        &self.cols[k * self.n..(k + 1) * self.n]
    }

    /// Append row j to the selected set (column, Gram row, Cholesky row); `col` is column j of E
    /// when already gathered (else it is read from E with stride T).
    fn push(&mut self, j: usize, col: Option<&[T]>) {
        let (n, k) = (self.n, self.k());
        match col {
            Some(c) => {
                for (dst, &v) in self.cols[k * n..(k + 1) * n].iter_mut().zip(c) {
                    *dst = v.to_f64();
                }
            }
            None => {
                for i in 0..n {
                    self.cols[k * n + i] = self.e[i * self.t_rows + j].to_f64();
                }
            }
        }
        self.sel.push(j);
        if self.fast {
            let cap = self.cap;
            let newc = &self.cols[k * n..(k + 1) * n];
            let gk: Vec<f64> = (0..k).map(|p| dense::dot(&self.cols[p * n..(p + 1) * n], newc)).collect();
            let gkk = dense::dot(newc, newc);
            self.h[k] = dense::dot(newc, self.y);
            for (p, &gp) in gk.iter().enumerate() {
                self.g[k * cap + p] = gp;
                self.g[p * cap + k] = gp;
            }
            self.g[k * cap + k] = gkk;
            if self.chol.push(&gk, gkk, CHOL_REL_TOL).is_err() {
                self.fast = false;
                self.out.fast_fallbacks += 1;
            }
        }
    }

    /// Keep only the selection slots in `keep` (in order): columns, Gram, h, and a rebuilt factor.
    fn retain(&mut self, keep: &[usize]) {
        let (n, cap) = (self.n, self.cap);
        let old_g = self.g.clone();
        let old_h = self.h.clone();
        let sel: Vec<usize> = keep.iter().map(|&s| self.sel[s]).collect();
        for (dst, &src) in keep.iter().enumerate() {
            if dst != src {
                self.cols.copy_within(src * n..(src + 1) * n, dst * n);
            }
        }
        self.sel = sel;
        if self.fast {
            self.chol = CholGrow::new(cap);
            for (a, &sa) in keep.iter().enumerate() {
                self.h[a] = old_h[sa];
                for (b, &sb) in keep.iter().enumerate() {
                    self.g[a * cap + b] = old_g[sa * cap + sb];
                }
                let row: Vec<f64> = (0..a).map(|b| self.g[a * cap + b]).collect();
                if self.chol.push(&row, self.g[a * cap + a], CHOL_REL_TOL).is_err() {
                    self.fast = false;
                    self.out.fast_fallbacks += 1;
                    break;
                }
            }
        }
    }

    /// Fit B on the current set with the configured solver; `warm` is the previous B (extended).
    fn solve(&mut self, warm: Option<&[f64]>) -> Result<Vec<f64>> {
        self.out.solves += 1;
        let k = self.k();
        let (lo, hi) = (self.fit.lo, self.fit.hi);
        if self.fast {
            let cap = self.cap;
            let g: Vec<f64> = (0..k).flat_map(|a| (0..k).map(move |b| (a, b))).map(|(a, b)| self.g[a * cap + b]).collect();
            let h = &self.h[..k];
            return Ok(match self.fit.solver {
                BetaSolver::Reference => {
                    let mut b0 = h.to_vec();
                    self.chol.solve(&mut b0);
                    nnls_pg_gram(&g, h, &b0, lo, hi, self.fit.pg_iters, self.seed)
                }
                BetaSolver::ActiveSet => {
                    let r = nnls_active_set_gram(&g, h, lo, hi, self.n, None, warm)?;
                    self.out.active_set_fallbacks += r.fallbacks;
                    r.b
                }
            });
        }
        let m = MatRef::from_column_major_slice(&self.cols[..k * self.n], self.n, k);
        Ok(match self.fit.solver {
            BetaSolver::Reference => {
                let r = nnls_pg(m, self.y, lo, hi, self.fit.pg_iters, self.seed)?;
                if r.ls_method != crate::linalg::LstsqMethod::Qr {
                    self.out.ridge_fallbacks += 1;
                }
                r.b
            }
            BetaSolver::ActiveSet => {
                let r = nnls_active_set(m, self.y, lo, hi)?;
                self.out.active_set_fallbacks += r.fallbacks;
                r.b
            }
        })
    }

    /// r = y − M·B.
    fn residual(&self, b: &[f64], r: &mut [f64]) {
        r.copy_from_slice(self.y);
        for (k, &bk) in b.iter().enumerate() {
            for (ri, &c) in r.iter_mut().zip(self.col(k)) {
                *ri -= c * bk;
            }
        }
    }
}

/// Run OMP on E [n, T] (row-major) and target Z̃ \[n\]; returns up to `t` rows in selection order.
/// `seed_rows` (at most `t`) are selected first, in one step, before the greedy picks (empty:
/// plain OMP). The β of the final set is refitted by the caller (project rule, spec §4.2 step 8).
#[allow(clippy::too_many_arguments)]
pub fn omp_select<T: Elem>(
    e: &[T],
    z: &[f64],
    n: usize,
    t_rows: usize,
    t: usize,
    cfg: &OmpConfig,
    fit: FitParams,
    seed: u64,
    par: bool,
    seed_rows: &[usize],
) -> Result<OmpOutcome> {
    let cap = t;
    let mut st = State {
        e,
        y: z,
        n,
        t_rows,
        cap,
        fit,
        seed,
        sel: Vec::with_capacity(t),
        cols: vec![0.0; n * cap],
        fast: cfg.fast,
        g: if cfg.fast { vec![0.0; cap * cap] } else { Vec::new() },
        h: if cfg.fast { vec![0.0; cap] } else { Vec::new() },
        chol: CholGrow::new(if cfg.fast { cap } else { 0 }),
        out: OmpOutcome::default(),
    };
    let mut selected = vec![false; t_rows];
    let mut excluded = vec![false; t_rows];
    let mut r = z.to_vec();
    let mut c = vec![0.0f64; t_rows];
    // The B that produced r (aligned with st.sel); empty while r = y.
    let mut b_r: Vec<f64> = Vec::new();
    let mut gram = if cfg.gram_corr {
        let mut g = GramCorr::new(e, z, n, t_rows, par);
        // Speculate up to 4t rows, and at most ≈ 256 MiB of cached rows (needed rows are always computed).
        let row_bytes = (t_rows + n) * std::mem::size_of::<T>();
        g.max_cached = (4 * t + GRAM_BATCH).min((256usize << 20) / row_bytes.max(1));
        Some(g)
    } else {
        None
    };
    let mut prev_b: Option<Vec<f64>> = None;
    let mut iteration = 0usize;
    let mut entries = 0usize;
    if !seed_rows.is_empty() {
        // The seeded rows enter together, as one progressive step would, then one fit.
        let picks: Vec<usize> = seed_rows.iter().copied().take(t).collect();
        if let Some(g) = gram.as_mut() {
            g.ensure(&picks, std::iter::empty());
        }
        for &j in &picks {
            selected[j] = true;
            st.push(j, gram.as_ref().and_then(|g| g.col(j)));
        }
        let b = st.solve(None)?;
        st.residual(&b, &mut r);
        b_r = b.clone();
        prev_b = Some(b);
    }
    loop {
        if st.k() < t {
            let (k_choice, interval) = cfg.schedule.at(st.k());
            let remaining = t_rows - st.k() - excluded.iter().filter(|&&x| x).count();
            let k_sel = k_choice.min(remaining).min(t - st.k());
            if k_sel == 0 {
                break;
            }
            let picks = match gram.as_mut() {
                Some(g) => {
                    let blocked: Vec<bool> = selected.iter().zip(&excluded).map(|(a, b)| *a || *b).collect();
                    let picks = g.top(&st.sel, &b_r, &r, &blocked, k_sel);
                    // Gram columns of the picks (needed from the next iteration on), with the
                    // next-best candidates computed speculatively in the same GEMM.
                    if picks.iter().any(|&j| g.slot[j] == usize::MAX) {
                        let mut blocked2 = blocked.clone();
                        picks.iter().for_each(|&j| blocked2[j] = true);
                        let hint = g.order_hint(&st.sel, &b_r, &blocked2, g.batch);
                        g.ensure(&picks, hint.into_iter());
                    }
                    picks
                }
                None => {
                    correlations(e, &r, n, t_rows, &mut c, par);
                    top_candidates(&c, &selected, &excluded, k_sel)
                }
            };
            if picks.is_empty() {
                break;
            }
            let prev_k = st.k();
            for &j in &picks {
                selected[j] = true;
                st.push(j, gram.as_ref().and_then(|g| g.col(j)));
            }
            let solve_now = prev_b.is_none() || iteration.is_multiple_of(interval);
            let b = if solve_now {
                let warm = prev_b.as_ref().map(|p| {
                    let mut w = p.clone();
                    w.resize(st.k(), fit.lo);
                    w
                });
                st.solve(warm.as_deref())?
            } else {
                let mut b = prev_b.clone().unwrap_or_default();
                b.truncate(prev_k);
                b.resize(st.k(), fit.lo);
                b
            };
            st.residual(&b, &mut r);
            b_r = b.clone();
            prev_b = Some(b);
            iteration += 1;
            st.out.iterations += 1;
        } else if let Some(cut) = cfg.drop_cutoff {
            entries += 1;
            if entries > cfg.max_drop_rounds {
                break;
            }
            let b = st.solve(prev_b.as_deref())?;
            let keep: Vec<usize> = (0..st.k()).filter(|&s| !(b[s].ln() < cut)).collect();
            if keep.len() == st.k() {
                break;
            }
            for s in 0..st.k() {
                if !keep.contains(&s) {
                    let j = st.sel[s];
                    selected[j] = false;
                    excluded[j] = true;
                }
            }
            st.out.dropped += st.k() - keep.len();
            st.out.drop_rounds += 1;
            let warm: Vec<f64> = keep.iter().map(|&s| b[s]).collect();
            st.retain(&keep);
            let b = st.solve(Some(&warm))?;
            st.residual(&b, &mut r);
            b_r = b;
            prev_b = None;
            iteration += 1;
        } else {
            break;
        }
    }
    let mut out = st.out;
    if let Some(g) = gram {
        out.gram_batches = g.batches;
        out.verified = g.verified;
        out.exact_passes = g.exact_passes;
    }
    out.selected = st.sel;
    Ok(out)
}

/// The `k` largest finite correlations among rows neither selected nor excluded; ties to the lower
/// row index.
fn top_candidates(c: &[f64], selected: &[bool], excluded: &[bool], k: usize) -> Vec<usize> {
    let mut best: Vec<usize> = Vec::with_capacity(k + 1);
    let better = |a: usize, b: usize| c[a] > c[b] || (c[a] == c[b] && a < b);
    for j in 0..c.len() {
        if selected[j] || excluded[j] || !c[j].is_finite() {
            continue;
        }
        if best.len() == k && !better(j, best[k - 1]) {
            continue;
        }
        let pos = best.iter().position(|&b| better(j, b)).unwrap_or(best.len());
        best.insert(pos, j);
        best.truncate(k);
    }
    best
}
