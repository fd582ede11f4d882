//! What the Attention Matching methods share (spec §3–§6): the attention statistics of a head
//! against its reference queries, the β fit (bounded NNLS on the shifted exponentials) and the
//! C_v least-squares fit with its conditioning guard. The `highest` and `omp` selectors only
//! select rows; everything else is here.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::compact::head::{HeadInput, HeadStats};
use crate::device::Device;
use crate::linalg::expf;
use crate::linalg::lstsq::{self, Guard, LstsqMethod};
use crate::linalg::{nnls_active_set, nnls_pg};
use crate::{Error, Result};

/// Which bounded NNLS solves for B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSolver {
    /// Clamped least squares + projected gradient, seeded power iteration (spec §5.2; parity).
    Reference,
    /// Lawson–Hanson active set with both bounds, f64 Gram form (spec §5.4).
    ActiveSet,
}

impl BetaSolver {
    /// `reference` (alias `clamped-pg`) or `active-set` (alias `lawson-hanson`).
    pub fn parse(s: &str) -> Result<BetaSolver> {
        match s {
            "reference" | "clamped-pg" => Ok(BetaSolver::Reference),
            "active-set" | "lawson-hanson" => Ok(BetaSolver::ActiveSet),
            _ => Err(Error::Invalid(format!("unknown beta solver {s:?} (expected reference or active-set)"))),
        }
    }

    /// The canonical name [`BetaSolver::parse`] accepts: `reference` or `active-set`.
    pub fn name(self) -> &'static str {
        match self {
            BetaSolver::Reference => "reference",
            BetaSolver::ActiveSet => "active-set",
        }
    }
}

/// Bounds and solver of a β fit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FitParams {
    /// Which bounded NNLS solves for B.
    pub solver: BetaSolver,
    /// Lower bound on B = exp(β − b) (a mass multiplier, not a log); > 0 so that ln B is finite.
    pub lo: f64,
    /// Upper bound on B.
    pub hi: f64,
    /// Projected-gradient steps of the reference recipe (ignored by the active set).
    pub pg_iters: usize,
}

/// How β is obtained.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BetaFit {
    /// No fit: β = the prior bias b (0 for a fresh cache). `baseline`.
    Prior,
    /// β = b + ln B with B fitted to the attention mass within the given bounds (spec §5).
    Fit(FitParams),
}

/// How C_v is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueFit {
    /// C_v = V\[S\] (every eviction baseline).
    Direct,
    /// Least squares on the outputs (spec §6).
    LeastSquares,
}

/// β bounds of AM-HighestAttnKeys: [e⁻³, e³] (spec §5.3).
pub const HIGHEST_BOUNDS: (f64, f64) = (0.049_787_068_367_863_944, 20.085_536_923_187_668);
/// β bounds of AM-OMP: [1e-12, e⁷] (spec §5.3).
pub const OMP_BOUNDS: (f64, f64) = (1e-12, 1_096.633_158_428_458_6);

/// Storage type of the n×T matrices (f32, or f64 in golden mode).
pub trait Elem: faer::traits::ComplexField + Copy + Send + Sync + PartialOrd + bytemuck::Zeroable + 'static {
    /// Unit roundoff (2⁻²⁴ for f32, 2⁻⁵³ for f64): error bounds of sums computed in this type.
    const UNIT_ROUNDOFF: f64;
    /// Widen (or keep) an f32 input value.
    fn from_f32(x: f32) -> Self;
    /// Widen (or keep) to f64 for accumulation.
    fn to_f64(self) -> f64;
    /// Narrow (or keep) an f64 (exact for a value computed in this precision).
    fn from_f64(x: f64) -> Self;
    /// One row of E in place: add the bias, μ = max, `row ← exp(row − μ)`; returns (μ, Σ row) in f64.
    fn row_stats(row: &mut [Self], bias: Option<&[f32]>) -> (f64, f64);
}

impl Elem for f32 {
    const UNIT_ROUNDOFF: f64 = 5.960_464_477_539_063e-8;
    #[inline(always)]
    fn from_f32(x: f32) -> f32 {
        x
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn from_f64(x: f64) -> f32 {
        x as f32
    }
    fn row_stats(row: &mut [f32], bias: Option<&[f32]>) -> (f64, f64) {
        let (mu, z) = expf::row_softmax_stats(row, bias);
        (mu as f64, z)
    }
}

impl Elem for f64 {
    const UNIT_ROUNDOFF: f64 = 1.110_223_024_625_156_5e-16;
    #[inline(always)]
    fn from_f32(x: f32) -> f64 {
        x as f64
    }
    #[inline(always)]
    fn to_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn from_f64(x: f64) -> f64 {
        x
    }
    fn row_stats(row: &mut [f64], bias: Option<&[f32]>) -> (f64, f64) {
        if let Some(b) = bias {
            for (v, &bb) in row.iter_mut().zip(b) {
                *v += bb as f64;
            }
        }
        let mu = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (mu, expf::exp_shifted_inplace_f64(row, mu))
    }
}

/// Attention statistics of one head against its reference queries (spec §1, §3 steps 1–2).
pub struct AttnStats<T> {
    /// Reference queries n.
    pub n: usize,
    /// Span rows T.
    pub t_rows: usize,
    /// Shifted exponentials of the logits S = s·QKᵀ + 1bᵀ, row-major; each row's max entry is 1.
    pub e: Vec<T>,    // [n, T] row-major: E_ij = exp(S_ij − μ_i)
    /// Row max of the logits, the shift of row i of E.
    pub mu: Vec<f64>, // [n] μ_i = max_j S_ij
    /// Shifted partition function of each query (the target mass of the β fit).
    pub z: Vec<f64>,  // [n] Z̃_i = Σ_j E_ij
    /// Attention outputs of the full span (the target of the C_v fit), A = E / Z̃ row-wise.
    pub y: Vec<f64>,  // [n, d] row-major: Y = A·V
}

/// faer parallelism for a head: the current rayon pool when `inner` (see
/// [`AmConfig::inner_par`](super::AmConfig::inner_par)), else sequential.
pub fn faer_par(inner: bool) -> Par {
    if inner {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// Compute [`AttnStats`] for `input` (queries required). GEMMs through faer in precision `T`.
pub fn attention_stats<T: Elem>(input: &HeadInput, inner_par: bool) -> Result<AttnStats<T>> {
    let d = input.d;
    let t_rows = input.rows();
    let q = input.queries.ok_or_else(|| Error::Invalid("attention_stats: reference queries are required".into()))?;
    let n = q.len() / d;
    let par = faer_par(inner_par);
    let qv: Vec<T> = q.iter().map(|&x| T::from_f32(x)).collect(); // [n, d]
    let kv: Vec<T> = input.keys.iter().map(|&x| T::from_f32(x)).collect(); // [T, d]
    let vv: Vec<T> = input.values.iter().map(|&x| T::from_f32(x)).collect(); // [T, d]
    let mut e: Vec<T> = crate::linalg::dense::zeros_large(n * t_rows); // [n, T]
    matmul(
        MatMut::from_row_major_slice_mut(&mut e, n, t_rows),
        Accum::Replace,
        MatRef::from_row_major_slice(&qv, n, d),
        MatRef::from_row_major_slice(&kv, t_rows, d).transpose(),
        T::from_f32(input.scale),
        par,
    );
    let mut mu = vec![0.0f64; n];
    let mut z = vec![0.0f64; n];
    let row_op = |(row, (mu_i, z_i)): (&mut [T], (&mut f64, &mut f64))| {
        (*mu_i, *z_i) = T::row_stats(row, input.bias);
    };
    if inner_par {
        e.par_chunks_mut(t_rows.max(1)).zip(mu.par_iter_mut().zip(z.par_iter_mut())).for_each(row_op);
    } else {
        e.chunks_mut(t_rows.max(1)).zip(mu.iter_mut().zip(z.iter_mut())).for_each(row_op);
    }
    let mut yt = vec![T::from_f32(0.0); n * d]; // [n, d] = E·V
    matmul(
        MatMut::from_row_major_slice_mut(&mut yt, n, d),
        Accum::Replace,
        MatRef::from_row_major_slice(&e, n, t_rows),
        MatRef::from_row_major_slice(&vv, t_rows, d),
        T::from_f32(1.0),
        par,
    );
    let y: Vec<f64> = yt.iter().enumerate().map(|(k, v)| v.to_f64() / z[k / d]).collect();
    Ok(AttnStats { n, t_rows, e, mu, z, y })
}

/// The `max` key score of HighestAttnKeys selection (max_i A_ij, A = E / Z̃) straight from `input`,
/// in blocks of queries, without E [n, T] or Y: the same bits as [`attention_stats`] followed by
/// `scores(.., Score::Max)` (each block is the same f32 GEMM and row kernel), at half the work
/// and a block-sized buffer. The global budget allocation ranks every head's rows by it.
pub fn max_scores_blocked(input: &HeadInput) -> Result<Vec<f64>> {
    const BLOCK: usize = 64;
    let d = input.d;
    let t_rows = input.rows();
    let q = input.queries.ok_or_else(|| Error::Invalid("max_scores_blocked: reference queries are required".into()))?;
    let n = q.len() / d.max(1);
    let mut acc = vec![0.0f64; t_rows]; // [T]
    if n == 0 {
        return Ok(acc);
    }
    let mut e = vec![0.0f32; BLOCK.min(n) * t_rows]; // [block, T]
    for qb in q[..n * d].chunks(BLOCK * d) {
        let b = qb.len() / d;
        let e = &mut e[..b * t_rows];
        matmul(
            MatMut::from_row_major_slice_mut(e, b, t_rows),
            Accum::Replace,
            MatRef::from_row_major_slice(qb, b, d),
            MatRef::from_row_major_slice(input.keys, t_rows, d).transpose(),
            input.scale,
            Par::Seq,
        );
        for row in e.chunks_mut(t_rows.max(1)) {
            let (_, z) = f32::row_stats(row, input.bias);
            let inv = 1.0 / z;
            for (a, &x) in acc.iter_mut().zip(row.iter()) {
                *a = a.max(x as f64 * inv);
            }
        }
    }
    Ok(acc)
}

/// M = E[:, idx] [n, |idx|] in f64 (column-major).
pub fn gather_columns<T: Elem>(st: &AttnStats<T>, idx: &[usize]) -> Mat<f64> {
    let mut m = Mat::<f64>::zeros(st.n, idx.len());
    for i in 0..st.n {
        let row = &st.e[i * st.t_rows..(i + 1) * st.t_rows];
        for (c, &j) in idx.iter().enumerate() {
            m[(i, c)] = row[j].to_f64();
        }
    }
    m
}

/// B on M = E[:, idx], y = Z̃ with `fit`; updates the β stats.
pub fn fit_b<T: Elem>(st: &AttnStats<T>, idx: &[usize], fit: FitParams, seed: u64, stats: &mut HeadStats) -> Result<Vec<f64>> {
    let m = gather_columns(st, idx);
    let b = match fit.solver {
        BetaSolver::Reference => {
            let r = nnls_pg(m.as_ref(), &st.z, fit.lo, fit.hi, fit.pg_iters, seed)?;
            if r.ls_method != LstsqMethod::Qr {
                stats.beta_ridge_fallbacks += 1;
            }
            stats.beta_cond = r.cond_est;
            r.b
        }
        BetaSolver::ActiveSet => {
            let r = nnls_active_set(m.as_ref(), &st.z, fit.lo, fit.hi)?;
            stats.active_set_fallbacks += r.fallbacks;
            if !r.converged {
                stats.active_set_unconverged += 1;
            }
            stats.beta_cond = crate::linalg::lstsq::lstsq(m.as_ref(), MatRef::from_column_major_slice(&st.z, st.n, 1), Guard::Off)
                .map(|s| s.cond_est)
                .unwrap_or(f64::INFINITY);
            r.b
        }
    };
    stats.beta_at_lo = b.iter().filter(|&&x| x <= fit.lo).count();
    stats.beta_at_hi = b.iter().filter(|&&x| x >= fit.hi).count();
    Ok(b)
}

/// X = softmax_j(s·⟨q_i, c_j⟩ + β_j) [n, t] in f64 (column-major, as the QR wants it).
/// The logits are produced row-major so that the softmax runs along contiguous rows.
pub fn design_x(q: &[f32], keys: &[f32], beta: &[f32], d: usize, scale: f32, par: Par) -> Mat<f64> {
    let n = q.len() / d;
    let t = beta.len();
    let q64: Vec<f64> = q.iter().map(|&x| x as f64).collect(); // [n, d]
    let k64: Vec<f64> = keys.iter().map(|&x| x as f64).collect(); // [t, d]
    let mut logits = vec![0.0f64; n * t]; // [n, t] row-major
    matmul(
        MatMut::from_row_major_slice_mut(&mut logits, n, t),
        Accum::Replace,
        MatRef::from_row_major_slice(&q64, n, d),
        MatRef::from_row_major_slice(&k64, t, d).transpose(),
        scale as f64,
        par,
    );
    for row in logits.chunks_mut(t.max(1)) {
        expf::softmax_row_f64(row, Some(beta));
    }
    MatRef::from_row_major_slice(&logits, n, t).to_owned()
}

/// [`design_x`] on the GPU (`--features cuda`).
#[cfg(feature = "cuda")]
fn gpu_design_x(q: &[f32], keys: &[f32], beta: &[f32], d: usize, scale: f32) -> Result<Mat<f64>> {
    let x = crate::cuda::am::design_x(q, keys, beta, d, scale)?; // [n, t] row-major
    Ok(MatRef::from_row_major_slice(&x, q.len() / d, beta.len()).to_owned())
}

#[cfg(not(feature = "cuda"))]
fn gpu_design_x(_: &[f32], _: &[f32], _: &[f32], _: usize, _: f32) -> Result<Mat<f64>> {
    Err(crate::device::Device::Cuda.check().expect_err("no cuda feature"))
}

/// C_v by least squares with the §6.4 guard (`guard` = Some(κ threshold)): trip on κ(X) > cond_max,
/// max|C_v| > 1e3·max|V| or a non-finite/failed solve → ridge [X; √λI] with λ = 1e-6·‖X‖_F²/t →
/// if that still trips, C_v = V\[S\]. Every trip is recorded in `stats`.
#[allow(clippy::too_many_arguments)]
pub fn fit_values<T: Elem>(
    guard: Option<f64>,
    inner_par: bool,
    device: Device,
    input: &HeadInput,
    st: &AttnStats<T>,
    keys: &[f32],
    beta: &[f32],
    direct: Vec<f32>,
    t: usize,
    stats: &mut HeadStats,
) -> Result<Vec<f32>> {
    let d = input.d;
    let q = input.queries.ok_or_else(|| Error::Invalid("fit_values: reference queries are required".into()))?;
    let n = st.n;
    let x = match device {
        Device::Cpu => design_x(q, keys, beta, d, input.scale, faer_par(inner_par)),
        Device::Cuda => gpu_design_x(q, keys, beta, d, input.scale)?,
    };
    let ymat = MatRef::from_row_major_slice(&st.y, n, d).to_owned();
    let vmax = input.values.iter().fold(0.0f32, |a, &v| a.max(v.abs())) as f64;
    let too_big = |c: &Mat<f64>| (0..d).any(|k| (0..t).any(|j| !c[(j, k)].is_finite() || c[(j, k)].abs() > 1e3 * vmax.max(f64::MIN_POSITIVE)));
    let to_f32 = |c: &Mat<f64>| -> Vec<f32> { (0..t).flat_map(|j| (0..d).map(move |k| (j, k))).map(|(j, k)| c[(j, k)] as f32).collect() };
    let first = lstsq::lstsq(x.as_ref(), ymat.as_ref(), Guard::Off);
    if let Ok(ref s) = first {
        stats.values_cond = s.cond_est;
        stats.values_method = match s.method {
            LstsqMethod::RidgeNormal { .. } => "ridge-normal".into(),
            _ => "qr".into(),
        };
    }
    let Some(cond_max) = guard else {
        return Ok(to_f32(&first?.x));
    };
    let trips = match &first {
        Ok(s) => (s.method == LstsqMethod::Qr && s.cond_est > cond_max) || too_big(&s.x),
        Err(_) => true,
    };
    if !trips {
        return Ok(to_f32(&first?.x));
    }
    stats.guard_tripped = true;
    let fro2: f64 = (0..t).map(|j| crate::linalg::dense::dot(&crate::linalg::dense::col_vec(x.as_ref(), j), &crate::linalg::dense::col_vec(x.as_ref(), j))).sum();
    let lambda = 1e-6 * fro2 / t.max(1) as f64;
    match lstsq::ridge_augmented(x.as_ref(), ymat.as_ref(), lambda) {
        Ok(c) if !too_big(&c) => {
            stats.values_method = "guard-ridge".into();
            Ok(to_f32(&c))
        }
        _ => {
            stats.values_method = "guard-direct".into();
            Ok(direct)
        }
    }
}
