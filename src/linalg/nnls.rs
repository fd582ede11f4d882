//! Bounded non-negative least squares `min ½‖M·B − y‖²  s.t.  lo ≤ B ≤ hi` (spec §5), two solvers:
//!
//! - [`nnls_pg`]: the reference recipe (`base.py::_nnls_pg`, spec §5.2) — unconstrained least
//!   squares, clip to [lo, hi], then `iters` projected-gradient steps with step 1/L, L from three
//!   power iterations on MᵀM started from a **seeded** vector (the reference uses an unseeded randn).
//!   This is not the constrained optimum; it is what the published numbers were made with.
//! - [`nnls_active_set`]: a true active-set solver (Lawson–Hanson 1974, ch. 23, in the Gram form of
//!   Bro & de Jong 1997, spec §5.4), generalised to two bounds: every variable is free, at lo or
//!   at hi, and the method stops at a KKT point of the box problem (BVLS-style, Stark & Parker 1995).
//!
//! Both have a Gram-form twin (`*_gram`) taking G = MᵀM [t, t] and h = Mᵀy, which is what the OMP
//! fast path maintains incrementally (spec §15). All in f64: the Gram form squares κ (§5.4.5).

use faer::{Mat, MatRef};

use super::dense;
use super::lstsq::{lstsq, Guard, LstsqMethod};
use crate::sampling::Rng;
use crate::{Error, Result};

/// Power iterations for the PG step size (reference: 3).
pub const POWER_ITERS: usize = 3;

/// Output of the reference recipe.
#[derive(Debug, Clone)]
pub struct PgFit {
    /// The fitted coefficients, each in [lo, hi].
    pub b: Vec<f64>, // [t] in [lo, hi]
    /// How the unconstrained start was solved (QR, or the ridge fallback).
    pub ls_method: LstsqMethod,
    /// Condition estimate of that solve ([`Lstsq::cond_est`](super::Lstsq::cond_est)).
    pub cond_est: f64,
    /// Step 1/L of the projected-gradient phase (0 when `iters` = 0).
    pub step: f64,
}

/// Seeded start of the power iteration: u_j = 2·U[0,1) − 1 from [`Rng`], normalised by ‖u‖ + 1e-12.
/// (Uniform rather than Gaussian so that the Python golden reproduces it bit for bit.)
pub fn power_start(t: usize, seed: u64) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let mut u: Vec<f64> = (0..t).map(|_| 2.0 * rng.next_f64() - 1.0).collect();
    let nu = u.iter().map(|x| x * x).sum::<f64>().sqrt() + 1e-12;
    u.iter_mut().for_each(|x| *x /= nu);
    u
}

fn norm(x: &[f64]) -> f64 {
    x.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn clip(b: &mut [f64], lo: f64, hi: f64) {
    for v in b.iter_mut() {
        *v = v.max(lo).min(hi);
    }
}

fn check_bounds(lo: f64, hi: f64) -> Result<()> {
    if !(lo.is_finite() && lo >= 0.0 && hi > lo) || hi.is_nan() {
        return Err(Error::Invalid(format!("nnls: bounds must satisfy 0 <= lo < hi, got lo={lo}, hi={hi}")));
    }
    Ok(())
}

/// Reference recipe on `m` [n, t], `y` `[n]` (spec §5.2). `seed` fixes the power-iteration start.
pub fn nnls_pg(m: MatRef<'_, f64>, y: &[f64], lo: f64, hi: f64, iters: usize, seed: u64) -> Result<PgFit> {
    check_bounds(lo, hi)?;
    let (n, t) = (m.nrows(), m.ncols());
    if y.len() != n {
        return Err(Error::Shape { op: "nnls_pg", expected: format!("y of length {n}"), got: format!("{}", y.len()) });
    }
    let ymat = MatRef::from_column_major_slice(y, n, 1);
    let ls = lstsq(m, ymat, Guard::Off)?;
    let mut b: Vec<f64> = (0..t).map(|i| ls.x[(i, 0)]).collect();
    clip(&mut b, lo, hi);
    let mut step = 0.0;
    if iters > 0 && t > 0 {
        // Power iteration on MᵀM, exactly as the reference orders it.
        let mut u = power_start(t, seed);
        for _ in 0..POWER_ITERS {
            let mut v = dense::m_vec(m, &u);
            let nv = norm(&v);
            if nv == 0.0 {
                break;
            }
            v.iter_mut().for_each(|x| *x /= nv);
            u = dense::mt_vec(m, &v);
            let nu = norm(&u);
            if nu == 0.0 {
                break;
            }
            u.iter_mut().for_each(|x| *x /= nu);
        }
        let mu = dense::m_vec(m, &u);
        let sigma = dense::dot(&mu, &mu).sqrt().max(1e-6);
        let l = (sigma * sigma).max(1e-6);
        step = 1.0 / l;
        for _ in 0..iters {
            let mut r = dense::m_vec(m, &b);
            r.iter_mut().zip(y).for_each(|(ri, yi)| *ri -= yi);
            let grad = dense::mt_vec(m, &r);
            for (bj, gj) in b.iter_mut().zip(&grad) {
                *bj -= step * gj;
            }
            clip(&mut b, lo, hi);
        }
    }
    Ok(PgFit { b, ls_method: ls.method, cond_est: ls.cond_est, step })
}

/// Gram-form twin of the PG phase: start from the unconstrained solution `b0` `[t]`, clip, then
/// `iters` steps using G = MᵀM (`g` [t, t] row-major) and h = Mᵀy. Same maths as [`nnls_pg`]
/// (Mᵀ(MB − y) = GB − h; the power iteration's direction Mᵀ(Mu) = Gu), O(t²) per step.
pub fn nnls_pg_gram(g: &[f64], h: &[f64], b0: &[f64], lo: f64, hi: f64, iters: usize, seed: u64) -> Vec<f64> {
    let t = h.len();
    let mut b = b0.to_vec();
    clip(&mut b, lo, hi);
    if iters == 0 || t == 0 {
        return b;
    }
    let mut u = power_start(t, seed);
    for _ in 0..POWER_ITERS {
        let gu = dense::sym_vec(g, t, &u);
        let quad = dense::dot(&u, &gu);
        let ngu = norm(&gu);
        if quad <= 0.0 || ngu == 0.0 {
            break;
        }
        u = gu.iter().map(|x| x / ngu).collect();
    }
    let sigma = dense::dot(&u, &dense::sym_vec(g, t, &u)).max(0.0).sqrt().max(1e-6);
    let step = 1.0 / (sigma * sigma).max(1e-6);
    for _ in 0..iters {
        let gb = dense::sym_vec(g, t, &b);
        for j in 0..t {
            b[j] -= step * (gb[j] - h[j]);
        }
        clip(&mut b, lo, hi);
    }
    b
}

/// Where a variable of the box problem sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VarState {
    /// Held at the lower bound `lo`.
    Lo,
    /// Held at the upper bound `hi`.
    Hi,
    /// Strictly inside (lo, hi), solved for.
    Free,
}

/// Output of the active-set solver.
#[derive(Debug, Clone)]
pub struct ActiveSet {
    /// The solution, each entry in [lo, hi].
    pub b: Vec<f64>, // [t] in [lo, hi]
    /// w = h − G·b = −∇f at the solution `[t]`: KKT is w ≤ τ at lo, w ≥ −τ at hi, |w| ≤ τ if free.
    pub w: Vec<f64>,
    /// Where each variable ended `[t]`.
    pub state: Vec<VarState>,
    /// The KKT tolerance τ used (see [`nnls_active_set_gram`]).
    pub tol: f64,
    /// Outer iterations run (one variable freed each), at most 3t + 10.
    pub outer_iterations: usize,
    /// The loop stopped because no variable (other than ones skipped as degenerate) violated
    /// KKT by more than τ, not at the iteration cap.
    pub converged: bool,
    /// Sub-problems whose Cholesky failed and were solved by QR on M (or a tiny ridge on G).
    pub fallbacks: usize,
}

/// Active-set solver on `m` [n, t], `y` `[n]`: builds G = MᵀM and h = Mᵀy in f64 and calls
/// [`nnls_active_set_gram`], with QR on M as the fallback for singular sub-problems.
pub fn nnls_active_set(m: MatRef<'_, f64>, y: &[f64], lo: f64, hi: f64) -> Result<ActiveSet> {
    let n = m.nrows();
    if y.len() != n {
        return Err(Error::Shape { op: "nnls_active_set", expected: format!("y of length {n}"), got: format!("{}", y.len()) });
    }
    let g = dense::gram(m);
    let h = dense::mt_vec(m, y);
    nnls_active_set_gram(&g, &h, lo, hi, n, Some((m, y)), None)
}

/// Active-set solver in Gram form: `g` [t, t] row-major = MᵀM, `h` `[t]` = Mᵀy, `n_rows` = n (only for
/// the tolerance), `m` optionally (M, y) for a QR fallback, `warm` an optional starting point
/// (projected onto the box; variables strictly inside start free).
///
/// Tolerance (spec §5.4): τ = 10·ε·max(n, t)·max_j |h′_j| with h′ = h − lo·G·1 (the shifted problem).
pub fn nnls_active_set_gram(
    g: &[f64],
    h: &[f64],
    lo: f64,
    hi: f64,
    n_rows: usize,
    m: Option<(MatRef<'_, f64>, &[f64])>,
    warm: Option<&[f64]>,
) -> Result<ActiveSet> {
    check_bounds(lo, hi)?;
    let t = h.len();
    if g.len() != t * t {
        return Err(Error::Shape { op: "nnls_active_set_gram", expected: format!("G of {t}x{t}"), got: format!("{} entries", g.len()) });
    }
    if g.iter().chain(h).any(|v| !v.is_finite()) {
        return Err(Error::Invalid("nnls_active_set: non-finite Gram matrix or right-hand side".into()));
    }
    let ones = vec![lo; t];
    let g_lo = dense::sym_vec(g, t, &ones);
    let hmax = h.iter().zip(&g_lo).map(|(a, b)| (a - b).abs()).fold(0.0f64, f64::max);
    let tol = 10.0 * f64::EPSILON * (n_rows.max(t) as f64) * hmax;

    let mut b = vec![lo; t];
    let mut state = vec![VarState::Lo; t];
    if let Some(w0) = warm {
        for j in 0..t.min(w0.len()) {
            let v = w0[j];
            if v.is_finite() && v > lo && v < hi {
                b[j] = v;
                state[j] = VarState::Free;
            } else if v >= hi {
                b[j] = hi;
                state[j] = VarState::Hi;
            }
        }
        // A warm start must be a solution of its own free sub-problem: re-solve and repair.
        inner_loop(g, h, lo, hi, &mut b, &mut state, m, &mut 0);
    }
    let mut fallbacks = 0usize;
    let mut blocked = vec![false; t];
    let max_outer = 3 * t + 10;
    let mut outer = 0;
    let mut converged = false;
    while outer < max_outer {
        let w = neg_grad(g, h, &b);
        // Most violated bound constraint.
        let mut best: Option<(usize, f64)> = None;
        for j in 0..t {
            if blocked[j] {
                continue;
            }
            let viol = match state[j] {
                VarState::Lo => w[j],
                VarState::Hi => -w[j],
                VarState::Free => continue,
            };
            if viol > tol && best.is_none_or(|(_, v)| viol > v) {
                best = Some((j, viol));
            }
        }
        let Some((jstar, _)) = best else {
            converged = true;
            break;
        };
        outer += 1;
        let before = (b.clone(), state.clone());
        state[jstar] = VarState::Free;
        inner_loop(g, h, lo, hi, &mut b, &mut state, m, &mut fallbacks);
        if state[jstar] != VarState::Free && b == before.0 && state == before.1 {
            // Degenerate step (rounding): j* went straight back. Skip it until something changes.
            blocked[jstar] = true;
        } else {
            blocked.iter_mut().for_each(|x| *x = false);
        }
    }
    let w = neg_grad(g, h, &b);
    Ok(ActiveSet { b, w, state, tol, outer_iterations: outer, converged, fallbacks })
}

fn neg_grad(g: &[f64], h: &[f64], b: &[f64]) -> Vec<f64> {
    let gb = dense::sym_vec(g, h.len(), b);
    h.iter().zip(&gb).map(|(a, c)| a - c).collect()
}

/// Lawson–Hanson inner loop generalised to two bounds: solve the free sub-problem with the bound
/// variables fixed; if the solution leaves the box, step back to the box boundary along the segment
/// and move the variables that hit a bound out of the free set; repeat.
#[allow(clippy::too_many_arguments)]
fn inner_loop(
    g: &[f64],
    h: &[f64],
    lo: f64,
    hi: f64,
    b: &mut [f64],
    state: &mut [VarState],
    m: Option<(MatRef<'_, f64>, &[f64])>,
    fallbacks: &mut usize,
) {
    let t = h.len();
    for _ in 0..(3 * t + 10) {
        let free: Vec<usize> = (0..t).filter(|&j| state[j] == VarState::Free).collect();
        if free.is_empty() {
            return;
        }
        let z = solve_free(g, h, b, &free, m, fallbacks);
        if free.iter().zip(&z).all(|(_, &zj)| zj > lo && zj < hi) {
            for (&j, &zj) in free.iter().zip(&z) {
                b[j] = zj;
            }
            return;
        }
        // Largest step α ∈ [0, 1) along z − b that stays in the box.
        let mut alpha = 1.0f64;
        let mut arg = free[0];
        for (&j, &zj) in free.iter().zip(&z) {
            let a = if zj <= lo {
                (b[j] - lo) / (b[j] - zj)
            } else if zj >= hi {
                (hi - b[j]) / (zj - b[j])
            } else {
                continue;
            };
            let a = if a.is_finite() { a.clamp(0.0, 1.0) } else { 0.0 };
            if a < alpha {
                alpha = a;
                arg = j;
            }
        }
        for (&j, &zj) in free.iter().zip(&z) {
            b[j] += alpha * (zj - b[j]);
        }
        // Variables at (or numerically past) a bound leave the free set; the blocking one always does.
        let span = (hi - lo).clamp(f64::MIN_POSITIVE, 1.0);
        for (&j, &zj) in free.iter().zip(&z) {
            let at_lo = b[j] <= lo + 1e-14 * span || (j == arg && zj <= lo);
            let at_hi = b[j] >= hi - 1e-14 * hi.abs().min(1e300) || (j == arg && zj >= hi);
            if at_lo {
                b[j] = lo;
                state[j] = VarState::Lo;
            } else if at_hi {
                b[j] = hi;
                state[j] = VarState::Hi;
            }
        }
    }
}

/// Solve G_FF z = h_F − G_{F,B̄}·b_B̄ (bound variables fixed at their values). Cholesky first; if
/// it fails, QR on M[:, F] when M is known, else a ridge of 1e-12·max diag.
fn solve_free(
    g: &[f64],
    h: &[f64],
    b: &[f64],
    free: &[usize],
    m: Option<(MatRef<'_, f64>, &[f64])>,
    fallbacks: &mut usize,
) -> Vec<f64> {
    let t = h.len();
    let k = free.len();
    let is_free = {
        let mut f = vec![false; t];
        free.iter().for_each(|&j| f[j] = true);
        f
    };
    let mut rhs: Vec<f64> = free
        .iter()
        .map(|&i| {
            let mut s = h[i];
            for j in 0..t {
                if !is_free[j] {
                    s -= g[i * t + j] * b[j];
                }
            }
            s
        })
        .collect();
    let mut gff = vec![0.0; k * k];
    for (a, &i) in free.iter().enumerate() {
        for (c, &j) in free.iter().enumerate() {
            gff[a * k + c] = g[i * t + j];
        }
    }
    let mut l = gff.clone();
    if dense::cholesky_in_place(&mut l, k, 1e-14).is_ok() {
        dense::cholesky_solve(&l, k, &mut rhs);
        if rhs.iter().all(|v| v.is_finite()) {
            return rhs;
        }
    }
    *fallbacks += 1;
    if let Some((mm, y)) = m {
        // min ‖M_F z − (y − M_B̄ b_B̄)‖ by QR (with the guard's pivoted truncation if needed).
        let n = mm.nrows();
        let mut r = y.to_vec();
        for j in 0..t {
            if !is_free[j] && b[j] != 0.0 {
                let c = dense::col_vec(mm, j);
                for i in 0..n {
                    r[i] -= c[i] * b[j];
                }
            }
        }
        let mf = Mat::<f64>::from_fn(n, k, |i, c| mm[(i, free[c])]);
        let guard = Guard::ColPiv { cond_max: 1e12, rank_tol: 1e-12 };
        if let Ok(sol) = lstsq(mf.as_ref(), MatRef::from_column_major_slice(&r, n, 1), guard) {
            return (0..k).map(|i| sol.x[(i, 0)]).collect();
        }
    }
    let dmax = (0..k).map(|i| gff[i * k + i]).fold(0.0f64, f64::max);
    for i in 0..k {
        gff[i * k + i] += 1e-12 * dmax.max(f64::MIN_POSITIVE);
    }
    let mut rhs2: Vec<f64> = free
        .iter()
        .map(|&i| h[i] - (0..t).filter(|&j| !is_free[j]).map(|j| g[i * t + j] * b[j]).sum::<f64>())
        .collect();
    if dense::cholesky_in_place(&mut gff, k, 0.0).is_ok() {
        dense::cholesky_solve(&gff, k, &mut rhs2);
        if rhs2.iter().all(|v| v.is_finite()) {
            return rhs2;
        }
    }
    // Nothing worked: stay where we are (the outer loop's KKT test then stops or blocks).
    free.iter().map(|&j| b[j]).collect()
}
