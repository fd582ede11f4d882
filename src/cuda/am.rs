//! Attention Matching's n×T work on the GPU (twins: `compact::am::fit::attention_stats`,
//! `compact::am::highest::scores`, `compact::am::fit::design_x`; tested in tests/cuda.rs).
//!
//! The GPU builds the matrices (S = s·QKᵀ and Y = E·V by cuBLAS, the shifted exponentials, row
//! max and mass and the key scores by kernels.cu); the β NNLS and the C_v least squares stay on
//! the CPU, on the GPU-built E columns and X. Those solves are O(n·t²) QR factorisations in f64
//! with the conditioning guard of spec §6.4; forming Gram matrices on the GPU instead would square
//! κ — exactly what the guard exists to catch — for a part that is not where the time goes
//! (the n×T products are).

use cudarc::cublas::sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
use cudarc::cublas::{Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};

use super::{dev_err, gpu, Inner};
use crate::Result;

/// A float type the GPU path computes in (the AM `precision`: f32 or f64).
pub trait GpuFloat: DeviceRepr + ValidAsZeroBits + Copy + Default + 'static {
    /// Kernel name suffix.
    const SUFFIX: &'static str;
    /// From f32 (exact).
    fn of(x: f32) -> Self;
    /// To f64 (exact).
    fn wide(self) -> f64;
}

impl GpuFloat for f32 {
    const SUFFIX: &'static str = "f32";
    fn of(x: f32) -> Self {
        x
    }
    fn wide(self) -> f64 {
        self as f64
    }
}

impl GpuFloat for f64 {
    const SUFFIX: &'static str = "f64";
    fn of(x: f32) -> Self {
        x as f64
    }
    fn wide(self) -> f64 {
        self
    }
}

/// The key score Highest Attention Keys ranks by (kernel `kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreKind {
    /// √(mean_i A_ij²).
    Rms = 0,
    /// mean_i A_ij.
    Mean = 1,
    /// max_i A_ij.
    Max = 2,
}

/// What [`attention_stats`] returns (the fields of `compact::am::fit::AttnStats`, plus scores).
pub struct GpuStats<T> {
    /// Shifted exponentials E_ij = exp(S_ij − μ_i), row-major.
    pub e: Vec<T>, // [n, T]
    /// Row max of the logits.
    pub mu: Vec<f64>, // [n]
    /// Row mass Σ_j E_ij.
    pub z: Vec<f64>, // [n]
    /// Attention outputs A·V.
    pub y: Vec<f64>, // [n, d] row-major
    /// Key scores when asked for.
    pub scores: Option<Vec<f64>>, // [T]
}

/// One head's matrices for [`attention_stats_batch`].
#[derive(Clone, Copy)]
pub struct HeadMats<'a> {
    /// Reference queries.
    pub queries: &'a [f32], // [n, d]
    /// Keys.
    pub keys: &'a [f32], // [rows, d]
    /// Values.
    pub values: &'a [f32], // [rows, d]
    /// Prior logit bias per key (None: zero).
    pub bias: Option<&'a [f32]>, // [rows]
}

/// At most this many bytes of E [heads, n, rows] per batched call; larger batches are split.
const MAX_BATCH_BYTES: usize = 1 << 30;

/// S = scale·QKᵀ (+bias per key) → E, μ, Z; Y = E·V / Z; key scores of `score`, all in precision T.
/// q `[n, d]`, keys/values `[rows, d]`, bias `[rows]` (None: zero).
pub fn attention_stats<T: GpuFloat>(q: &[f32], keys: &[f32], values: &[f32], bias: Option<&[f32]>, d: usize, scale: f32, score: Option<ScoreKind>) -> Result<GpuStats<T>>
where
    cudarc::cublas::CudaBlas: Gemm<T>,
{
    let mut v = attention_stats_batch::<T>(&[HeadMats { queries: q, keys, values, bias }], d, scale, score)?;
    Ok(v.pop().expect("one head in, one out"))
}

/// [`attention_stats`] for many heads of the same shape (one layer's KV heads over one span) in
/// strided-batched GEMMs and one launch per kernel; split so E stays under 1 GiB per call.
pub fn attention_stats_batch<T: GpuFloat>(heads: &[HeadMats], d: usize, scale: f32, score: Option<ScoreKind>) -> Result<Vec<GpuStats<T>>>
where
    cudarc::cublas::CudaBlas: Gemm<T>,
{
    let Some(first) = heads.first() else { return Ok(Vec::new()) };
    let (n, rows) = (first.queries.len() / d.max(1), first.keys.len() / d.max(1));
    if n == 0 || rows == 0 {
        return Err(crate::Error::Invalid("cuda attention statistics need at least one query and one key row".into()));
    }
    if heads.iter().any(|h| h.queries.len() != n * d || h.keys.len() != rows * d || h.values.len() != rows * d || h.bias.is_some_and(|b| b.len() != rows)) {
        return Err(crate::Error::Invalid("cuda attention statistics: a batch needs heads of one shape (queries, keys, values, bias)".into()));
    }
    let group = (MAX_BATCH_BYTES / (n * rows * std::mem::size_of::<T>()).max(1)).max(1);
    let mut out = Vec::with_capacity(heads.len());
    for chunk in heads.chunks(group) {
        out.extend(stats_group::<T>(chunk, n, rows, d, scale, score)?);
    }
    Ok(out)
}

fn stats_group<T: GpuFloat>(heads: &[HeadMats], n: usize, rows: usize, d: usize, scale: f32, score: Option<ScoreKind>) -> Result<Vec<GpuStats<T>>>
where
    cudarc::cublas::CudaBlas: Gemm<T>,
{
    let h = heads.len();
    let widen = |parts: Vec<&[f32]>| -> Vec<T> { parts.into_iter().flat_map(|p| p.iter().map(|&v| T::of(v))).collect() };
    let q = widen(heads.iter().map(|x| x.queries).collect()); // [h, n, d]
    let k = widen(heads.iter().map(|x| x.keys).collect()); // [h, rows, d]
    let v = widen(heads.iter().map(|x| x.values).collect()); // [h, rows, d]
    let bias: Option<Vec<f32>> = heads.iter().any(|x| x.bias.is_some()).then(|| {
        heads.iter().flat_map(|x| x.bias.map_or_else(|| vec![0.0; rows], |b| b.to_vec())).collect() // [h, rows]
    });
    let g = gpu()?;
    let inner = g.lock();
    let s = &inner.stream;
    let err = |e| dev_err("cuda attention statistics", e);
    let q_d = s.clone_htod(&q).map_err(err)?;
    let k_d = s.clone_htod(&k).map_err(err)?;
    let v_d = s.clone_htod(&v).map_err(err)?;
    let mut e_d = s.alloc_zeros::<T>(h * n * rows).map_err(err)?;
    // Row-major S [n, rows] is column-major Sᵀ [rows, n] = K·Qᵀ (K row-major is Kᵀ column-major).
    let shapes = Batch { count: h, stride_a: rows * d, stride_b: n * d, stride_c: n * rows };
    gemm(&inner, CUBLAS_OP_T, CUBLAS_OP_N, rows, n, d, T::of(scale), &k_d, d, &q_d, d, &mut e_d, rows, shapes)?;
    let bias_d = match &bias {
        Some(b) => Some(s.clone_htod(b).map_err(err)?),
        None => None,
    };
    let mut mu_d = s.alloc_zeros::<f64>(h * n).map_err(err)?;
    let mut z_d = s.alloc_zeros::<f64>(h * n).map_err(err)?;
    row_softmax(&inner, &mut e_d, bias_d.as_ref(), Some(&mut mu_d), Some(&mut z_d), h * n, rows, n, false)?;
    // Row-major Y [n, d] is column-major [d, n] = Vᵀ·Eᵀ (both as column-major views).
    let mut y_d = s.alloc_zeros::<T>(h * n * d).map_err(err)?;
    let shapes = Batch { count: h, stride_a: rows * d, stride_b: n * rows, stride_c: n * d };
    gemm(&inner, CUBLAS_OP_N, CUBLAS_OP_N, d, n, rows, T::of(1.0), &v_d, d, &e_d, rows, &mut y_d, d, shapes)?;
    let scores = match score {
        Some(kind) => Some(column_scores_on(&inner, &e_d, &z_d, n, rows, h, kind)?),
        None => None,
    };
    let e: Vec<T> = s.clone_dtoh(&e_d).map_err(err)?;
    let mu: Vec<f64> = s.clone_dtoh(&mu_d).map_err(err)?;
    let z: Vec<f64> = s.clone_dtoh(&z_d).map_err(err)?;
    let yt: Vec<T> = s.clone_dtoh(&y_d).map_err(err)?;
    s.synchronize().map_err(err)?;
    Ok((0..h)
        .map(|i| {
            let zi = &z[i * n..(i + 1) * n];
            GpuStats {
                e: e[i * n * rows..(i + 1) * n * rows].to_vec(),
                mu: mu[i * n..(i + 1) * n].to_vec(),
                z: zi.to_vec(),
                y: yt[i * n * d..(i + 1) * n * d].iter().enumerate().map(|(k, v)| v.wide() / zi[k / d]).collect(),
                scores: scores.as_ref().map(|sc| sc[i * rows..(i + 1) * rows].to_vec()),
            }
        })
        .collect())
}

/// Key scores from a host E `[n, cols]` and Z `[n]` (the standalone twin of `highest::scores`).
pub fn column_scores<T: GpuFloat>(e: &[T], z: &[f64], n: usize, cols: usize, kind: ScoreKind) -> Result<Vec<f64>> {
    if n == 0 || cols == 0 || e.len() < n * cols || z.len() < n {
        return Err(crate::Error::Invalid(format!("cuda key scores: E has {} values and Z {} for n={n}, cols={cols}", e.len(), z.len())));
    }
    let g = gpu()?;
    let inner = g.lock();
    let err = |e| dev_err("cuda key scores", e);
    let e_d = inner.stream.clone_htod(&e[..n * cols]).map_err(err)?;
    let z_d = inner.stream.clone_htod(&z[..n]).map_err(err)?;
    column_scores_on(&inner, &e_d, &z_d, n, cols, 1, kind)
}

/// X = softmax_j(s·⟨q_i, c_j⟩ + β_j) [n, t] in f64, row-major (twin of `fit::design_x`, which
/// returns it column-major).
pub fn design_x(q: &[f32], keys: &[f32], beta: &[f32], d: usize, scale: f32) -> Result<Vec<f64>> {
    let (n, t) = (q.len() / d.max(1), beta.len());
    if n == 0 || t == 0 {
        return Err(crate::Error::Invalid("cuda design matrix needs at least one query and one key".into()));
    }
    let g = gpu()?;
    let inner = g.lock();
    let s = &inner.stream;
    let err = |e| dev_err("cuda design matrix", e);
    let wide = |x: &[f32]| -> Vec<f64> { x.iter().map(|&v| v as f64).collect() };
    let q_d = s.clone_htod(&wide(q)).map_err(err)?;
    let k_d = s.clone_htod(&wide(keys)).map_err(err)?;
    let b_d = s.clone_htod(beta).map_err(err)?;
    let mut x_d = s.alloc_zeros::<f64>(n * t).map_err(err)?;
    gemm(&inner, CUBLAS_OP_T, CUBLAS_OP_N, t, n, d, scale as f64, &k_d, d, &q_d, d, &mut x_d, t, Batch::ONE)?;
    row_softmax(&inner, &mut x_d, Some(&b_d), None, None, n, t, n, true)?;
    let x: Vec<f64> = s.clone_dtoh(&x_d).map_err(err)?;
    s.synchronize().map_err(err)?;
    Ok(x[..n * t].to_vec())
}

/// Scores [heads, cols] from E [heads, n, cols] and Z [heads, n] already on the GPU.
fn column_scores_on<T: GpuFloat>(inner: &Inner, e: &CudaSlice<T>, z: &CudaSlice<f64>, n: usize, cols: usize, heads: usize, kind: ScoreKind) -> Result<Vec<f64>> {
    let err = |e| dev_err("cuda key scores", e);
    let total = heads * cols;
    let mut out = inner.stream.alloc_zeros::<f64>(total).map_err(err)?;
    let f = inner.func(&format!("column_scores_{}", T::SUFFIX))?;
    let (ni, ci, hi, ki) = (n as i32, cols as i32, heads as i32, kind as i32);
    let cfg = LaunchConfig { grid_dim: (total.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = inner.stream.launch_builder(&f);
    b.arg(e).arg(z).arg(&ni).arg(&ci).arg(&hi).arg(&ki).arg(&mut out);
    // SAFETY: matches column_scores_*; e holds heads·n·cols values, z heads·n, out heads·cols.
    unsafe { b.launch(cfg) }.map_err(err)?;
    let v: Vec<f64> = inner.stream.clone_dtoh(&out).map_err(err)?;
    inner.stream.synchronize().map_err(err)?;
    Ok(v)
}

#[allow(clippy::too_many_arguments)]
fn row_softmax<T: GpuFloat>(
    inner: &Inner,
    s: &mut CudaSlice<T>,
    bias: Option<&CudaSlice<f32>>,
    mu: Option<&mut CudaSlice<f64>>,
    z: Option<&mut CudaSlice<f64>>,
    n: usize,
    cols: usize,
    rows_per_head: usize,
    normalize: bool,
) -> Result<()> {
    if n == 0 || cols == 0 {
        return Ok(());
    }
    let f = inner.func(&format!("row_softmax_{}", T::SUFFIX))?;
    let (ci, rph, norm) = (cols as i32, rows_per_head.max(1) as i32, normalize as i32);
    let null = 0u64; // a null device pointer: the kernel skips what it is not given
    let cfg = LaunchConfig { grid_dim: (n as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut b = inner.stream.launch_builder(&f);
    b.arg(s);
    match bias {
        Some(x) => b.arg(x),
        None => b.arg(&null),
    };
    match mu {
        Some(x) => b.arg(x),
        None => b.arg(&null),
    };
    match z {
        Some(x) => b.arg(x),
        None => b.arg(&null),
    };
    b.arg(&ci).arg(&rph).arg(&norm);
    // SAFETY: matches row_softmax_*; s holds n·cols values, bias (n / rows_per_head)·cols, mu and z
    // n (or null).
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| dev_err("cuda row softmax", e))
}

/// How many products a [`gemm`] call makes and the element strides between their operands.
#[derive(Clone, Copy)]
struct Batch {
    count: usize,
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
}

impl Batch {
    const ONE: Batch = Batch { count: 1, stride_a: 0, stride_b: 0, stride_c: 0 };
}

/// Column-major C_i [m, n] = alpha·op(A_i)·op(B_i) for each of `batch.count` products, with
/// cuBLAS's strided-batched GEMM (the operands of product i start i·stride elements in).
#[allow(clippy::too_many_arguments)]
fn gemm<T: GpuFloat>(
    inner: &Inner,
    ta: cudarc::cublas::sys::cublasOperation_t,
    tb: cudarc::cublas::sys::cublasOperation_t,
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: &CudaSlice<T>,
    lda: usize,
    b: &CudaSlice<T>,
    ldb: usize,
    c: &mut CudaSlice<T>,
    ldc: usize,
    batch: Batch,
) -> Result<()>
where
    cudarc::cublas::CudaBlas: Gemm<T>,
{
    if m == 0 || n == 0 || batch.count == 0 {
        return Ok(());
    }
    let big = |x: usize| i32::try_from(x).map_err(|_| crate::Error::Device(format!("cuda GEMM dimension {x} exceeds i32")));
    let long = |x: usize| i64::try_from(x).map_err(|_| crate::Error::Device(format!("cuda GEMM stride {x} exceeds i64")));
    let gemm = GemmConfig { transa: ta, transb: tb, m: big(m)?, n: big(n)?, k: big(k)?, alpha, lda: big(lda.max(1))?, ldb: big(ldb.max(1))?, beta: T::default(), ldc: big(ldc.max(1))? };
    let cfg = StridedBatchedConfig { gemm, batch_size: big(batch.count)?, stride_a: long(batch.stride_a)?, stride_b: long(batch.stride_b)?, stride_c: long(batch.stride_c)? };
    // SAFETY: each buffer holds count·stride (at least the m·k, k·n, m·n of one product) values.
    unsafe { inner.blas.gemm_strided_batched(cfg, a, b, c) }.map_err(|e| dev_err("cuBLAS GEMM", e))
}
