//! Identities of the AM linear algebra (spec §17.4): least-squares normal equations, KKT of the
//! bounded active-set NNLS (against an exhaustive oracle on small problems), the clamped-PG recipe
//! on a hand-computed case, the guards on rank-deficient systems, and the vector exp.

// Index loops mirror the formulas the assertions check.
#![allow(clippy::needless_range_loop)]

use faer::{Mat, MatRef};
use kvcompact::linalg::dense;
use kvcompact::linalg::expf::{exp_shifted_inplace, exp_shifted_ref, expf_poly};
use kvcompact::linalg::lstsq::{colpiv_truncated, lstsq, Guard, LstsqMethod};
use kvcompact::linalg::nnls::{nnls_active_set, nnls_active_set_gram, nnls_pg, nnls_pg_gram, power_start, VarState};
use kvcompact::sampling::Rng;
use proptest::prelude::*;

fn gauss(rng: &mut Rng) -> f64 {
    // Box–Muller; the tests only need "random", not a specific distribution.
    let u1 = rng.next_f64().max(1e-300);
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

fn rand_mat(rng: &mut Rng, m: usize, n: usize) -> Mat<f64> {
    Mat::from_fn(m, n, |_, _| gauss(rng))
}

/// Matrix with entries in (0, 1], like E columns (positive, often close to collinear).
fn rand_pos_mat(rng: &mut Rng, m: usize, n: usize) -> Mat<f64> {
    Mat::from_fn(m, n, |_, _| (-3.0 * rng.next_f64()).exp())
}

fn fro(a: MatRef<'_, f64>) -> f64 {
    (0..a.ncols()).map(|j| (0..a.nrows()).map(|i| a[(i, j)].powi(2)).sum::<f64>()).sum::<f64>().sqrt()
}

/// ‖Aᵀ(AX − B)‖_F, the normal-equation residual.
fn normal_residual(a: MatRef<'_, f64>, b: MatRef<'_, f64>, x: MatRef<'_, f64>) -> f64 {
    let r = a * x - b;
    fro((a.transpose() * r).as_ref())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// QR least squares satisfies AᵀA·X = AᵀB up to ε·m·‖A‖·(‖A‖‖X‖ + ‖B‖) (faer's own test_lstsq bound).
    #[test]
    fn lstsq_normal_equations(seed in any::<u64>(), n in 1usize..24, extra in 0usize..40, k in 1usize..4) {
        let mut rng = Rng::new(seed);
        let m = n + extra;
        let a = rand_mat(&mut rng, m, n);
        let b = rand_mat(&mut rng, m, k);
        let s = lstsq(a.as_ref(), b.as_ref(), Guard::Off).unwrap();
        prop_assert_eq!(s.method, LstsqMethod::Qr);
        let tol = 1e3 * f64::EPSILON * m as f64 * fro(a.as_ref()) * (fro(a.as_ref()) * fro(s.x.as_ref()) + fro(b.as_ref()));
        let res = normal_residual(a.as_ref(), b.as_ref(), s.x.as_ref());
        prop_assert!(res <= tol, "normal residual {res:e} > {tol:e}");
        prop_assert!(s.cond_est >= 1.0 && s.cond_est.is_finite());
    }

    /// Column-pivoted QR without truncation is the same least-squares solution (checks the
    /// permutation bookkeeping) and satisfies the normal equations.
    #[test]
    fn colpiv_matches_qr(seed in any::<u64>(), n in 1usize..16, extra in 0usize..20) {
        let mut rng = Rng::new(seed);
        let m = n + extra;
        let a = rand_mat(&mut rng, m, n);
        let b = rand_mat(&mut rng, m, 2);
        let (x, rank) = colpiv_truncated(a.as_ref(), b.as_ref(), 0.0).unwrap();
        prop_assert_eq!(rank, n);
        let q = lstsq(a.as_ref(), b.as_ref(), Guard::Off).unwrap();
        let diff = fro((x.as_ref() - q.x.as_ref()).as_ref());
        prop_assert!(diff <= 1e-8 * (1.0 + fro(q.x.as_ref())), "colpiv vs qr: {diff:e}");
    }

    /// Bounded active set: feasible, KKT at its own tolerance scale, and equal to the exhaustive
    /// oracle (every lo/hi/free pattern, t ≤ 7) on small problems.
    #[test]
    fn active_set_kkt_and_oracle(seed in any::<u64>(), t in 1usize..8, extra in 0usize..30, bounds in 0usize..4) {
        let mut rng = Rng::new(seed);
        let n = t + extra;
        let m = if seed % 2 == 0 { rand_mat(&mut rng, n, t) } else { rand_pos_mat(&mut rng, n, t) };
        let y: Vec<f64> = (0..n).map(|_| gauss(&mut rng) + 0.5).collect();
        let (lo, hi) = [(0.0, f64::INFINITY), (1e-12, 1096.6), (0.05, 20.0), (0.0, 0.3)][bounds];
        let r = nnls_active_set(m.as_ref(), &y, lo, hi).unwrap();
        prop_assert!(r.converged);
        let g = dense::gram(m.as_ref());
        let h = dense::mt_vec(m.as_ref(), &y);
        let scale = h.iter().fold(0.0f64, |a, v| a.max(v.abs())) + g.iter().fold(0.0f64, |a, v| a.max(v.abs())) * r.b.iter().fold(0.0f64, |a, v| a.max(v.abs()));
        let kkt_tol = 1e-9 * scale.max(1e-300);
        for j in 0..t {
            prop_assert!(r.b[j] >= lo && r.b[j] <= hi, "b[{j}] = {} outside [{lo}, {hi}]", r.b[j]);
            match r.state[j] {
                VarState::Lo => prop_assert!(r.w[j] <= kkt_tol, "w[{j}] = {:e} at lo", r.w[j]),
                VarState::Hi => prop_assert!(r.w[j] >= -kkt_tol, "w[{j}] = {:e} at hi", r.w[j]),
                VarState::Free => prop_assert!(r.w[j].abs() <= kkt_tol, "w[{j}] = {:e} free", r.w[j]),
            }
        }
        let oracle = exhaustive_box_ls(&g, &h, t, lo, hi);
        let f = |b: &[f64]| 0.5 * dense::dot(b, &dense::sym_vec(&g, t, b)) - dense::dot(&h, b);
        let (fa, fo) = (f(&r.b), f(&oracle));
        prop_assert!(fa <= fo + 1e-9 * (1.0 + fo.abs()), "active set f = {fa:e}, oracle f = {fo:e}");
        // G is positive definite here (n ≥ t random), so the optimum is unique.
        for j in 0..t {
            prop_assert!((r.b[j] - oracle[j]).abs() <= 1e-6 * (1.0 + oracle[j].abs()), "b[{j}] {} vs oracle {}", r.b[j], oracle[j]);
        }
    }

    /// Warm starts (as OMP uses them) reach the same optimum.
    #[test]
    fn active_set_warm_start(seed in any::<u64>(), t in 1usize..10) {
        let mut rng = Rng::new(seed);
        let n = t + 12;
        let m = rand_pos_mat(&mut rng, n, t);
        let y: Vec<f64> = (0..n).map(|_| 2.0 * rng.next_f64()).collect();
        let g = dense::gram(m.as_ref());
        let h = dense::mt_vec(m.as_ref(), &y);
        let cold = nnls_active_set_gram(&g, &h, 1e-12, 1096.6, n, None, None).unwrap();
        let warm_start: Vec<f64> = (0..t).map(|_| 3.0 * rng.next_f64()).collect();
        let warm = nnls_active_set_gram(&g, &h, 1e-12, 1096.6, n, None, Some(&warm_start)).unwrap();
        for j in 0..t {
            prop_assert!((cold.b[j] - warm.b[j]).abs() <= 1e-7 * (1.0 + cold.b[j].abs()));
        }
    }

    /// The Gram-form PG twin gives the same B as the M-form reference recipe.
    #[test]
    fn pg_gram_matches_pg(seed in any::<u64>(), t in 1usize..12, iters in 0usize..4) {
        let mut rng = Rng::new(seed);
        let n = t + 20;
        let m = rand_pos_mat(&mut rng, n, t);
        let y: Vec<f64> = (0..n).map(|_| 4.0 * rng.next_f64()).collect();
        let (lo, hi) = (0.049787068367863944, 20.085536923187668);
        let a = nnls_pg(m.as_ref(), &y, lo, hi, iters, seed).unwrap();
        let g = dense::gram(m.as_ref());
        let h = dense::mt_vec(m.as_ref(), &y);
        let ls = lstsq(m.as_ref(), MatRef::from_column_major_slice(&y, n, 1), Guard::Off).unwrap();
        let b0: Vec<f64> = (0..t).map(|i| ls.x[(i, 0)]).collect();
        let b = nnls_pg_gram(&g, &h, &b0, lo, hi, iters, seed);
        for j in 0..t {
            prop_assert!((a.b[j] - b[j]).abs() <= 1e-7 * (1.0 + a.b[j].abs()), "{} vs {}", a.b[j], b[j]);
        }
    }
}

/// Exact minimiser of ½bᵀGb − hᵀb on [lo, hi]^t by trying every lo/hi/free pattern (3^t).
fn exhaustive_box_ls(g: &[f64], h: &[f64], t: usize, lo: f64, hi: f64) -> Vec<f64> {
    let f = |b: &[f64]| 0.5 * dense::dot(b, &dense::sym_vec(g, t, b)) - dense::dot(h, b);
    let mut best = vec![lo; t];
    let mut best_f = f(&best);
    let pats = 3usize.pow(t as u32);
    for p in 0..pats {
        let mut code = p;
        let mut b = vec![0.0; t];
        let mut free = vec![];
        for (j, bj) in b.iter_mut().enumerate() {
            match code % 3 {
                0 => *bj = lo,
                1 => {
                    if !hi.is_finite() {
                        *bj = f64::NAN;
                    } else {
                        *bj = hi;
                    }
                }
                _ => free.push(j),
            }
            code /= 3;
        }
        if b.iter().any(|v| v.is_nan()) {
            continue;
        }
        if !free.is_empty() {
            let k = free.len();
            let mut gff = vec![0.0; k * k];
            let mut rhs = vec![0.0; k];
            for (a, &i) in free.iter().enumerate() {
                rhs[a] = h[i] - (0..t).filter(|j| !free.contains(j)).map(|j| g[i * t + j] * b[j]).sum::<f64>();
                for (c, &j) in free.iter().enumerate() {
                    gff[a * k + c] = g[i * t + j];
                }
            }
            if dense::cholesky_in_place(&mut gff, k, 1e-14).is_err() {
                continue;
            }
            dense::cholesky_solve(&gff, k, &mut rhs);
            if rhs.iter().any(|&z| !(z >= lo && z <= hi)) {
                continue;
            }
            for (a, &i) in free.iter().enumerate() {
                b[i] = rhs[a];
            }
        }
        let fb = f(&b);
        if fb < best_f {
            best_f = fb;
            best = b;
        }
    }
    best
}

/// Clamped PG on a hand-computed 3×2 case (spec §17.4).
///
/// M = [[1,0],[0,1],[1,1]], y = [1, 3, 2]. LS: MᵀM = [[2,1],[1,2]], Mᵀy = [3, 5] → B₀ = [1/3, 7/3].
/// Bounds [0.5, 2] clip it to [0.5, 2]. MᵀM has eigenvalues 3 and 1, so the power iteration from
/// any start not orthogonal to (1,1)/√2 gives L ≈ 3. One PG step with η = 1/L:
/// grad = MᵀM·B − Mᵀy = [3, 4.5] − [3, 5] = [0, −0.5] → B = [0.5, 2 + 0.5/L] → clipped to [0.5, 2].
/// With hi = 3 instead the clip gives [0.5, 7/3], grad = [1/3, 1/6], and one step gives
/// [0.5 − 1/(3L), 7/3 − 1/(6L)] → clipped to [0.5, 7/3 − 1/(6L)], L from the same seeded start.
#[test]
fn clamped_pg_hand_case() {
    let m = Mat::from_fn(3, 2, |i, j| [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]][i][j]);
    let y = [1.0, 3.0, 2.0];
    let r0 = nnls_pg(m.as_ref(), &y, 0.0, f64::INFINITY, 0, 7).unwrap();
    approx::assert_relative_eq!(r0.b[0], 1.0 / 3.0, epsilon = 1e-14);
    approx::assert_relative_eq!(r0.b[1], 7.0 / 3.0, epsilon = 1e-14);
    let r1 = nnls_pg(m.as_ref(), &y, 0.5, 2.0, 1, 7).unwrap();
    assert_eq!(r1.b, vec![0.5, 2.0]);
    // L from three power iterations on [[2,1],[1,2]] starting at the seeded u.
    let mut u = power_start(2, 7);
    for _ in 0..3 {
        let gu = [2.0 * u[0] + u[1], u[0] + 2.0 * u[1]];
        let nrm = (gu[0] * gu[0] + gu[1] * gu[1]).sqrt();
        u = vec![gu[0] / nrm, gu[1] / nrm];
    }
    let l = 2.0 * u[0] * u[0] + 2.0 * u[0] * u[1] + 2.0 * u[1] * u[1];
    // A Rayleigh quotient: between the eigenvalues 1 and 3 (3 iterations need not converge).
    assert!((1.0..=3.0 + 1e-12).contains(&l), "power iteration estimate {l}");
    let r2 = nnls_pg(m.as_ref(), &y, 0.5, 3.0, 1, 7).unwrap();
    approx::assert_relative_eq!(r2.step, 1.0 / l, max_relative = 1e-12);
    approx::assert_relative_eq!(r2.b[0], 0.5, epsilon = 1e-15);
    approx::assert_relative_eq!(r2.b[1], 7.0 / 3.0 - 1.0 / (6.0 * l), max_relative = 1e-12);
}

/// Rank-deficient and tiny-column systems: the parity path falls back to the ridge only on
/// non-finite values; the guards never return huge values silently (spec §6.4, §16.2).
#[test]
fn guards_on_rank_deficient_systems() {
    let mut rng = Rng::new(3);
    let (m, n) = (40, 6);
    let mut a = rand_pos_mat(&mut rng, m, n);
    // Column 5 duplicates column 2: exactly rank-deficient.
    for i in 0..m {
        a[(i, 5)] = a[(i, 2)];
    }
    let b = rand_mat(&mut rng, m, 1);
    let off = lstsq(a.as_ref(), b.as_ref(), Guard::Off).unwrap();
    assert!(off.x.as_ref().norm_max().is_finite());
    assert!(off.cond_est > 1e10, "cond estimate {:e} should flag the duplicate column", off.cond_est);
    let cp = lstsq(a.as_ref(), b.as_ref(), Guard::ColPiv { cond_max: 1e6, rank_tol: 1e-10 }).unwrap();
    assert_eq!(cp.method, LstsqMethod::ColPivQr { rank: 5 });
    let rd = lstsq(a.as_ref(), b.as_ref(), Guard::Ridge { cond_max: 1e6, lambda_rel: 1e-6 }).unwrap();
    assert!(matches!(rd.method, LstsqMethod::RidgeAugmented { .. }));
    for s in [&cp, &rd] {
        assert!(s.x.as_ref().norm_max() < 1e3, "guarded solution too large: {:e}", s.x.as_ref().norm_max());
        // Same fit quality as the least-squares optimum (the residual is what matters).
        let r_best = fro((a.as_ref() * cp.x.as_ref() - b.as_ref()).as_ref());
        let r = fro((a.as_ref() * s.x.as_ref() - b.as_ref()).as_ref());
        assert!(r <= r_best * (1.0 + 1e-4), "guarded residual {r} vs {r_best}");
    }
    // A column at the β floor scale (1e-12): the unguarded QR returns enormous entries; the
    // ridge guard does not.
    let mut a2 = rand_pos_mat(&mut rng, m, n);
    for i in 0..m {
        a2[(i, 0)] = 1e-12 * rng.next_f64();
    }
    let b2 = rand_mat(&mut rng, m, 1);
    let raw = lstsq(a2.as_ref(), b2.as_ref(), Guard::Off).unwrap();
    assert!(raw.cond_est > 1e6);
    let g = lstsq(a2.as_ref(), b2.as_ref(), Guard::Ridge { cond_max: 1e6, lambda_rel: 1e-6 }).unwrap();
    assert!(raw.x.as_ref().norm_max() > 1e6 && g.x.as_ref().norm_max() < 1e3, "raw {:e} guarded {:e}", raw.x.as_ref().norm_max(), g.x.as_ref().norm_max());
    // Fewer rows than columns: the reference's ridge (minimum-norm-like) solution.
    let a3 = rand_mat(&mut rng, 3, 5);
    let b3 = rand_mat(&mut rng, 3, 1);
    let u = lstsq(a3.as_ref(), b3.as_ref(), Guard::Off).unwrap();
    assert!(matches!(u.method, LstsqMethod::RidgeNormal { .. }));
    let fit = fro((a3.as_ref() * u.x.as_ref() - b3.as_ref()).as_ref());
    assert!(fit < 1e-4, "underdetermined ridge should interpolate, residual {fit:e}");
}

#[test]
fn lstsq_shape_error() {
    let a = Mat::<f64>::zeros(4, 2);
    let b = Mat::<f64>::zeros(3, 1);
    assert!(lstsq(a.as_ref(), b.as_ref(), Guard::Off).is_err());
    assert!(nnls_pg(a.as_ref(), &[0.0; 3], 0.0, 1.0, 0, 0).is_err());
    assert!(nnls_pg(a.as_ref(), &[0.0; 4], 1.0, 0.5, 0, 0).is_err(), "lo > hi must be rejected");
}

/// The vector exp against libm: ≤ 4 ulp relative on the range of E = exp(S − μ), exactly 0 below −87.3.
#[test]
fn expf_matches_libm() {
    let mut rng = Rng::new(11);
    let mut worst = 0.0f64;
    for _ in 0..200_000 {
        let x = -87.0 + 87.0 * rng.next_f64() as f32;
        let got = expf_poly(x) as f64;
        let want = (x as f64).exp();
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 4.0 * f32::EPSILON as f64, "worst relative error {worst:e}");
    assert_eq!(expf_poly(0.0), 1.0);
    assert_eq!(expf_poly(-100.0), 0.0);
    assert_eq!(expf_poly(f32::NEG_INFINITY), 0.0);
    for len in [0usize, 1, 7, 8, 9, 67] {
        let mut a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin() * 20.0).collect();
        let mut b = a.clone();
        let sa = exp_shifted_inplace(&mut a, 3.0);
        let sb = exp_shifted_ref(&mut b, 3.0);
        assert!((sa - sb).abs() <= 1e-6 * sb.abs().max(1e-30), "len {len}: sum {sa} vs {sb}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 4.0 * f32::EPSILON * y.abs(), "{x} vs {y}");
        }
    }
}

/// The f64 vector exp against libm: ≤ 3 ulp relative over the whole finite-result range (libm is
/// itself within 1 ulp), exactly 0 below −708.3 and +inf above 709.7; the row softmax against its
/// libm twin. A wrong polynomial coefficient or reduction constant fails by orders of magnitude.
#[test]
fn exp_f64_matches_libm() {
    use kvcompact::linalg::expf::{exp_f64_poly, softmax_row_f64, softmax_row_f64_ref};
    let mut rng = Rng::new(12);
    let mut worst = 0.0f64;
    for k in 0..400_000 {
        // Half the samples on the softmax range [−60, 0], half on the whole range.
        let x = if k % 2 == 0 { -60.0 * rng.next_f64() } else { -708.0 + 1417.0 * rng.next_f64() };
        let (got, want) = (exp_f64_poly(x), x.exp());
        worst = worst.max((got - want).abs() / want);
    }
    assert!(worst < 3.0 * f64::EPSILON, "worst relative error {worst:e}");
    assert_eq!(exp_f64_poly(0.0), 1.0);
    assert_eq!(exp_f64_poly(-709.0), 0.0);
    assert_eq!(exp_f64_poly(f64::NEG_INFINITY), 0.0);
    assert_eq!(exp_f64_poly(710.0), f64::INFINITY);
    for len in [1usize, 3, 4, 5, 8, 9, 67, 217] {
        let mut a: Vec<f64> = (0..len).map(|i| (i as f64 * 0.37).sin() * 30.0).collect();
        let bias: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos() * 3.0).collect();
        let mut b = a.clone();
        softmax_row_f64(&mut a, Some(&bias));
        softmax_row_f64_ref(&mut b, Some(&bias));
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 8.0 * f64::EPSILON * y.abs(), "len {len}: {x} vs {y}");
        }
    }
}
