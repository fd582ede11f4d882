//! Dense least squares `min ‖A X − B‖_F` in f64: Householder QR, with the reference's ridge fallback
//! and an optional conditioning guard (spec §5.2 steps 1–2, §6.2–6.4).
//!
//! Why a guard: an unpivoted QR assumes full column rank. With columns of size ≈ 1e-12 (keys at the
//! β floor) it returns entries near 1e13 without any error (spec §6.4, §16.2–16.3). faer's
//! `ColPivQr` does not truncate small pivots, so the truncation is done here.

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::qr::{col_pivoting, no_pivoting};
use faer::mat::AsMatMut;
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Conj, Mat, MatMut, MatRef, Par};

use super::dense;
use crate::{Error, Result};

/// Absolute ridge λ of the reference fallback (`base.py`): scale-free for probability matrices.
pub const REFERENCE_RIDGE_LAMBDA: f64 = 1e-6;

/// What to do when the QR solution is ill-conditioned (besides the always-on non-finite fallback).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Guard {
    /// Parity with the reference: QR, and the ridge normal equations with absolute
    /// λ = [`REFERENCE_RIDGE_LAMBDA`] only when rows < columns or QR gives a non-finite value.
    Off,
    /// As `Off`; when the estimated condition number exceeds `cond_max`, re-solve by column-pivoted
    /// QR truncated at pivots below `rank_tol·|R₀₀|` (basic solution: dropped columns get 0).
    ColPiv {
        /// Condition estimate above which the pivoted re-solve runs.
        cond_max: f64,
        /// Relative pivot threshold: columns whose |R_kk| ≤ `rank_tol·|R₀₀|` are dropped.
        rank_tol: f64,
    },
    /// As `Off`; when the estimated condition number exceeds `cond_max`, re-solve the augmented
    /// system `[A; √λ·I] X = [B; 0]` with λ = `lambda_rel`·‖A‖_F² / columns (spec §6.4).
    Ridge {
        /// Condition estimate above which the ridge re-solve runs.
        cond_max: f64,
        /// λ relative to the mean squared column norm ‖A‖_F² / columns.
        lambda_rel: f64,
    },
}

/// Which solve produced [`Lstsq::x`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LstsqMethod {
    /// Unpivoted Householder QR (also the result for a 0-column A).
    Qr,
    /// Reference fallback: Cholesky of `AᵀA + λI` (or `AAᵀ + λI` when rows < columns).
    RidgeNormal {
        /// The absolute λ ([`REFERENCE_RIDGE_LAMBDA`]).
        lambda: f64,
    },
    /// [`Guard::ColPiv`]'s truncated column-pivoted QR ([`colpiv_truncated`]).
    ColPivQr {
        /// Number of columns kept; the other `n − rank` entries of each column of X are 0.
        rank: usize,
    },
    /// [`Guard::Ridge`]'s augmented-system QR ([`ridge_augmented`]).
    RidgeAugmented {
        /// The absolute λ used, `lambda_rel·‖A‖_F² / columns`.
        lambda: f64,
    },
}

/// Result of [`lstsq()`]: the solution and how it was obtained.
#[derive(Debug, Clone)]
pub struct Lstsq {
    /// The solution X, finite, shape [n, k] for `a` [m, n] and `b` [m, k].
    pub x: Mat<f64>, // [cols(A), cols(B)]
    /// Which solve produced `x`.
    pub method: LstsqMethod,
    /// max|R_ii| / min|R_ii| of the unpivoted QR (a cheap lower bound on κ(A)); +inf when a pivot
    /// is 0 or QR was not attempted (rows < columns).
    pub cond_est: f64,
}

/// Scratch for [`qr_lstsq_in_place`] with an `a` of shape [m, n] and `k` right-hand sides.
pub fn qr_lstsq_scratch(m: usize, n: usize, k: usize, par: Par) -> StackReq {
    let bs = no_pivoting::factor::recommended_block_size::<f64>(m, n);
    StackReq::all_of(&[
        faer::linalg::temp_mat_scratch::<f64>(bs, m.min(n)),
        StackReq::any_of(&[
            no_pivoting::factor::qr_in_place_scratch::<f64>(m, n, bs, par, Default::default()),
            no_pivoting::solve::solve_lstsq_in_place_scratch::<f64>(m, n, bs, k, par),
        ]),
    ])
}

/// Low level: Householder QR least squares without pivoting.
///
/// `a` [m, n] (m ≥ n) is overwritten by its QR factors; `b` [m, k] holds X in its first n rows on
/// return. Returns the condition estimate max|R_ii| / min|R_ii| (+inf for a zero pivot). No
/// allocation; `stack` must satisfy [`qr_lstsq_scratch`].
pub fn qr_lstsq_in_place(a: MatMut<'_, f64>, b: MatMut<'_, f64>, par: Par, stack: &mut MemStack) -> f64 {
    let (m, n) = (a.nrows(), a.ncols());
    debug_assert!(m >= n && b.nrows() == m);
    let bs = no_pivoting::factor::recommended_block_size::<f64>(m, n);
    let (mut q_coeff, stack) = faer::linalg::temp_mat_zeroed::<f64, _, _>(bs, m.min(n), stack);
    let mut q_coeff = q_coeff.as_mat_mut();
    let mut a = a;
    no_pivoting::factor::qr_in_place(a.rb_mut(), q_coeff.rb_mut(), par, stack, Default::default());
    no_pivoting::solve::solve_lstsq_in_place_with_conj(a.rb(), q_coeff.rb(), a.rb(), Conj::No, b, par, stack);
    diag_cond(a.rb())
}

/// max|R_ii| / min|R_ii| over the leading min(m, n) diagonal.
fn diag_cond(r: MatRef<'_, f64>) -> f64 {
    let size = r.nrows().min(r.ncols());
    if size == 0 {
        return 1.0;
    }
    let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
    for i in 0..size {
        let v = r[(i, i)].abs();
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo == 0.0 || !lo.is_finite() || !hi.is_finite() {
        f64::INFINITY
    } else {
        hi / lo
    }
}

fn all_finite(x: MatRef<'_, f64>) -> bool {
    (0..x.ncols()).all(|j| (0..x.nrows()).all(|i| x[(i, j)].is_finite()))
}

/// High level: solve `min ‖A X − B‖_F` (`a` [m, n], `b` [m, k]) → X [n, k], with the fallbacks of
/// `guard`. Never returns a non-finite X: if every route fails the result is an error.
pub fn lstsq(a: MatRef<'_, f64>, b: MatRef<'_, f64>, guard: Guard) -> Result<Lstsq> {
    let (m, n, k) = (a.nrows(), a.ncols(), b.ncols());
    if b.nrows() != m {
        return Err(Error::Shape { op: "lstsq", expected: format!("B with {m} rows"), got: format!("{} rows", b.nrows()) });
    }
    if n == 0 {
        return Ok(Lstsq { x: Mat::zeros(0, k), method: LstsqMethod::Qr, cond_est: 1.0 });
    }
    let mut cond_est = f64::INFINITY;
    let mut sol: Option<Lstsq> = None;
    if m >= n {
        let (x, c) = qr_solve(a, b);
        cond_est = c;
        if all_finite(x.as_ref()) {
            sol = Some(Lstsq { x, method: LstsqMethod::Qr, cond_est });
        }
    }
    let sol = match sol {
        Some(s) => s,
        None => {
            let x = ridge_normal(a, b, REFERENCE_RIDGE_LAMBDA)?;
            Lstsq { x, method: LstsqMethod::RidgeNormal { lambda: REFERENCE_RIDGE_LAMBDA }, cond_est }
        }
    };
    match guard {
        Guard::Off => Ok(sol),
        Guard::ColPiv { cond_max, rank_tol } if sol.method != LstsqMethod::Qr || cond_est > cond_max => {
            let (x, rank) = colpiv_truncated(a, b, rank_tol)?;
            Ok(Lstsq { x, method: LstsqMethod::ColPivQr { rank }, cond_est })
        }
        Guard::Ridge { cond_max, lambda_rel } if sol.method != LstsqMethod::Qr || cond_est > cond_max => {
            let fro2: f64 = (0..n).map(|j| dense::dot(&dense::col_vec(a, j), &dense::col_vec(a, j))).sum();
            let lambda = lambda_rel * fro2 / n as f64;
            let x = ridge_augmented(a, b, lambda)?;
            Ok(Lstsq { x, method: LstsqMethod::RidgeAugmented { lambda }, cond_est })
        }
        _ => Ok(sol),
    }
}

/// Unpivoted QR solve on copies of `a` and `b`; returns (X [n, k], cond estimate).
fn qr_solve(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> (Mat<f64>, f64) {
    let (m, n, k) = (a.nrows(), a.ncols(), b.ncols());
    let mut qr = a.to_owned();
    let mut rhs = b.to_owned();
    let mut buf = MemBuffer::new(qr_lstsq_scratch(m, n, k, Par::Seq));
    let cond = qr_lstsq_in_place(qr.as_mut(), rhs.as_mut(), Par::Seq, MemStack::new(&mut buf));
    (rhs.as_ref().get(..n, ..).to_owned(), cond)
}

/// Reference fallback: ridge normal equations with absolute `lambda`, by Cholesky.
/// rows ≥ cols: X = (AᵀA + λI)⁻¹ AᵀB; rows < cols: X = Aᵀ (AAᵀ + λI)⁻¹ B.
pub fn ridge_normal(a: MatRef<'_, f64>, b: MatRef<'_, f64>, lambda: f64) -> Result<Mat<f64>> {
    let (m, n, k) = (a.nrows(), a.ncols(), b.ncols());
    let fail = || Error::Invalid(format!("lstsq: ridge fallback failed on a {m}x{n} system (non-finite input or singular)"));
    if m >= n {
        let mut g = dense::gram(a);
        for i in 0..n {
            g[i * n + i] += lambda;
        }
        dense::cholesky_in_place(&mut g, n, 0.0).map_err(|_| fail())?;
        let mut x = Mat::<f64>::zeros(n, k);
        for c in 0..k {
            let mut rhs = dense::mt_vec(a, &dense::col_vec(b, c));
            dense::cholesky_solve(&g, n, &mut rhs);
            for i in 0..n {
                x[(i, c)] = rhs[i];
            }
        }
        if !all_finite(x.as_ref()) {
            return Err(fail());
        }
        Ok(x)
    } else {
        let mut kk = dense::gram(a.transpose());
        for i in 0..m {
            kk[i * m + i] += lambda;
        }
        dense::cholesky_in_place(&mut kk, m, 0.0).map_err(|_| fail())?;
        let mut x = Mat::<f64>::zeros(n, k);
        for c in 0..k {
            let mut alpha = dense::col_vec(b, c).into_owned();
            dense::cholesky_solve(&kk, m, &mut alpha);
            let xc = dense::m_vec(a.transpose(), &alpha);
            for i in 0..n {
                x[(i, c)] = xc[i];
            }
        }
        if !all_finite(x.as_ref()) {
            return Err(fail());
        }
        Ok(x)
    }
}

/// Ridge by QR of the augmented system `[A; √λ·I] X = [B; 0]` (no squaring of κ).
pub fn ridge_augmented(a: MatRef<'_, f64>, b: MatRef<'_, f64>, lambda: f64) -> Result<Mat<f64>> {
    let (m, n, k) = (a.nrows(), a.ncols(), b.ncols());
    let mut aug = Mat::<f64>::zeros(m + n, n);
    aug.as_mut().get_mut(..m, ..).copy_from(a);
    let s = lambda.max(0.0).sqrt();
    for i in 0..n {
        aug[(m + i, i)] = s;
    }
    let mut rhs = Mat::<f64>::zeros(m + n, k);
    rhs.as_mut().get_mut(..m, ..).copy_from(b);
    let (x, _) = qr_solve(aug.as_ref(), rhs.as_ref());
    if !all_finite(x.as_ref()) {
        return Err(Error::Invalid(format!("lstsq: augmented ridge (lambda {lambda:e}) gave non-finite values on a {m}x{n} system")));
    }
    Ok(x)
}

/// Column-pivoted QR, truncated at pivots `|R_kk| ≤ rank_tol·|R_00|`: the basic least-squares
/// solution on the numerically independent columns, 0 on the others. Returns (X [n, k], rank).
pub fn colpiv_truncated(a: MatRef<'_, f64>, b: MatRef<'_, f64>, rank_tol: f64) -> Result<(Mat<f64>, usize)> {
    let (m, n, k) = (a.nrows(), a.ncols(), b.ncols());
    if m < n {
        // Pad with zero rows: same solution set, and the factorisation needs m ≥ n.
        let mut ap = Mat::<f64>::zeros(n, n);
        ap.as_mut().get_mut(..m, ..).copy_from(a);
        let mut bp = Mat::<f64>::zeros(n, k);
        bp.as_mut().get_mut(..m, ..).copy_from(b);
        return colpiv_truncated(ap.as_ref(), bp.as_ref(), rank_tol);
    }
    let size = n;
    let bs = no_pivoting::factor::recommended_block_size::<f64>(m, n);
    let par = Par::Seq;
    let req = StackReq::all_of(&[
        faer::linalg::temp_mat_scratch::<f64>(bs, size),
        StackReq::any_of(&[
            col_pivoting::factor::qr_in_place_scratch::<usize, f64>(m, n, bs, par, Default::default()),
            faer::linalg::householder::apply_block_householder_sequence_transpose_on_the_left_in_place_scratch::<f64>(m, bs, k),
            faer::perm::permute_rows_in_place_scratch::<usize, f64>(n, k),
        ]),
    ]);
    let mut buf = MemBuffer::new(req);
    let stack = MemStack::new(&mut buf);
    let (mut q_coeff, stack) = faer::linalg::temp_mat_zeroed::<f64, _, _>(bs, size, stack);
    let mut q_coeff = q_coeff.as_mat_mut();
    let mut qr = a.to_owned();
    let mut fwd = vec![0usize; n];
    let mut inv = vec![0usize; n];
    let (_, perm) =
        col_pivoting::factor::qr_in_place(qr.as_mut(), q_coeff.rb_mut(), &mut fwd, &mut inv, par, stack, Default::default());
    let mut rhs = b.to_owned();
    faer::linalg::householder::apply_block_householder_sequence_transpose_on_the_left_in_place_with_conj(
        qr.as_ref(),
        q_coeff.rb(),
        Conj::Yes,
        rhs.as_mut(),
        par,
        stack,
    );
    let r00 = qr[(0, 0)].abs();
    let rank = (0..size).take_while(|&i| qr[(i, i)].abs() > rank_tol * r00 && qr[(i, i)].is_finite()).count();
    for c in 0..k {
        for i in (0..rank).rev() {
            let mut s = rhs[(i, c)];
            for p in i + 1..rank {
                s -= qr[(i, p)] * rhs[(p, c)];
            }
            rhs[(i, c)] = s / qr[(i, i)];
        }
        for i in rank..n {
            rhs[(i, c)] = 0.0;
        }
    }
    let mut x = rhs.as_ref().get(..n, ..).to_owned();
    faer::perm::permute_rows_in_place(x.as_mut(), perm.inverse(), stack);
    if !all_finite(x.as_ref()) {
        return Err(Error::Invalid(format!("lstsq: column-pivoted QR gave non-finite values on a {m}x{n} system")));
    }
    Ok((x, rank))
}
