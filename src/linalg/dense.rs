//! Small dense f64 kernels for t×t systems (Gram matrices, Cholesky factors).
//!
//! Matrices here are row-major `[k, k]` slices (`a[i * k + j]`). t is at most a few hundred, so plain
//! loops in a fixed order are fast enough and give the same bits on every thread count.

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

/// In-place lower Cholesky `A = L Lᵀ` of a symmetric positive-definite `a` [k, k] (row-major; only
/// the lower triangle is read, the strict upper triangle is zeroed).
///
/// Fails with the pivot index when a pivot falls to `rel_tol` times the original diagonal entry or
/// below (numerically rank-deficient): the caller then falls back to QR or a ridge.
pub fn cholesky_in_place(a: &mut [f64], k: usize, rel_tol: f64) -> Result<(), usize> {
    debug_assert_eq!(a.len(), k * k);
    for j in 0..k {
        let mut d = a[j * k + j];
        let diag0 = d;
        for p in 0..j {
            d -= a[j * k + p] * a[j * k + p];
        }
        if !(d > rel_tol * diag0.abs()) || !d.is_finite() || d <= 0.0 {
            return Err(j);
        }
        let ljj = d.sqrt();
        a[j * k + j] = ljj;
        for i in j + 1..k {
            let mut s = a[i * k + j];
            for p in 0..j {
                s -= a[i * k + p] * a[j * k + p];
            }
            a[i * k + j] = s / ljj;
        }
        for i in 0..j {
            a[i * k + j] = 0.0;
        }
    }
    Ok(())
}

/// Solve `L x = b` in place (`l` [k, k] lower, row-major).
pub fn solve_lower(l: &[f64], k: usize, b: &mut [f64]) {
    for i in 0..k {
        let mut s = b[i];
        for p in 0..i {
            s -= l[i * k + p] * b[p];
        }
        b[i] = s / l[i * k + i];
    }
}

/// Solve `Lᵀ x = b` in place (`l` [k, k] lower, row-major).
pub fn solve_lower_t(l: &[f64], k: usize, b: &mut [f64]) {
    for i in (0..k).rev() {
        let mut s = b[i];
        for p in i + 1..k {
            s -= l[p * k + i] * b[p];
        }
        b[i] = s / l[i * k + i];
    }
}

/// Solve `(L Lᵀ) x = b` in place.
pub fn cholesky_solve(l: &[f64], k: usize, b: &mut [f64]) {
    solve_lower(l, k, b);
    solve_lower_t(l, k, b);
}

/// Gram matrix `MᵀM` [t, t] (row-major) of `m` [n, t], through faer's GEMM (sequential, so the bits
/// do not depend on the thread count).
pub fn gram(m: MatRef<'_, f64>) -> Vec<f64> {
    let t = m.ncols();
    let mut g = Mat::<f64>::zeros(t, t);
    matmul(g.as_mut(), Accum::Replace, m.transpose(), m, 1.0, Par::Seq);
    let mut out = vec![0.0; t * t];
    for i in 0..t {
        for j in 0..t {
            // Symmetrise: the two triangles of a GEMM result can differ in the last bit.
            out[i * t + j] = 0.5 * (g[(i, j)] + g[(j, i)]);
        }
    }
    out
}

/// Column j of `m` as a contiguous slice (borrowed when `m` is column-major, else copied).
pub fn col_vec<'a>(m: MatRef<'a, f64>, j: usize) -> std::borrow::Cow<'a, [f64]> {
    match m.col(j).try_as_col_major() {
        Some(c) => std::borrow::Cow::Borrowed(c.as_slice()),
        None => std::borrow::Cow::Owned((0..m.nrows()).map(|i| m[(i, j)]).collect()),
    }
}

/// Dot product with four accumulators in a fixed order (deterministic, vectorisable).
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let mut acc = [0.0f64; 4];
    let mut i = 0;
    while i + 4 <= n {
        for l in 0..4 {
            acc[l] += a[i + l] * b[i + l];
        }
        i += 4;
    }
    let mut s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    while i < n {
        s += a[i] * b[i];
        i += 1;
    }
    s
}

/// `Mᵀy` `[t]` for `m` [n, t].
pub fn mt_vec(m: MatRef<'_, f64>, y: &[f64]) -> Vec<f64> {
    (0..m.ncols()).map(|j| dot(&col_vec(m, j), y)).collect()
}

/// `M x` `[n]` for `m` [n, t].
pub fn m_vec(m: MatRef<'_, f64>, x: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; m.nrows()];
    for (j, &xj) in x.iter().enumerate() {
        if xj == 0.0 {
            continue;
        }
        for (o, c) in out.iter_mut().zip(col_vec(m, j).iter()) {
            *o += c * xj;
        }
    }
    out
}

/// `G x` `[k]` for a row-major `g` [k, k].
pub fn sym_vec(g: &[f64], k: usize, x: &[f64]) -> Vec<f64> {
    (0..k).map(|i| g[i * k..(i + 1) * k].iter().zip(x).map(|(a, b)| a * b).sum()).collect()
}

/// A lower Cholesky factor that grows by one row and column at a time (OMP fast path, spec §15).
///
/// Appending column j of M to the selected set S costs O(|S|²) once its cross products
/// `g = M_Sᵀ m_j` and `m_jᵀ m_j` are known, instead of a fresh O(n·|S|²) factorisation.
#[derive(Debug, Clone)]
pub struct CholGrow {
    cap: usize,
    k: usize,
    l: Vec<f64>, // [cap, cap] row-major; the leading [k, k] block is the factor
}

impl CholGrow {
    /// An empty factor with room for `cap` columns (allocates [cap, cap]).
    pub fn new(cap: usize) -> CholGrow {
        CholGrow { cap, k: 0, l: vec![0.0; cap * cap] }
    }

    /// Number of columns appended so far (the factor is [len, len]).
    pub fn len(&self) -> usize {
        self.k
    }

    /// No column appended yet.
    pub fn is_empty(&self) -> bool {
        self.k == 0
    }

    /// Append a column with cross products `g` `[len]` against the current set and squared norm `gjj`.
    /// Fails (leaving the factor unchanged) when the new column is numerically in the span of the
    /// others: its orthogonal part squared is ≤ `rel_tol·gjj`; also when the factor is full or
    /// `g.len() != len`.
    // `()` is the whole story (the column was rejected; callers only test `is_err()`), and a typed
    // error would change the public signature.
    #[allow(clippy::result_unit_err)]
    pub fn push(&mut self, g: &[f64], gjj: f64, rel_tol: f64) -> Result<(), ()> {
        let k = self.k;
        if k >= self.cap || g.len() != k {
            return Err(());
        }
        let cap = self.cap;
        let mut row = g.to_vec();
        for i in 0..k {
            let mut s = row[i];
            for (lp, rp) in self.l[i * cap..i * cap + i].iter().zip(&row[..i]) {
                s -= lp * rp;
            }
            row[i] = s / self.l[i * cap + i];
        }
        let d = gjj - row.iter().map(|x| x * x).sum::<f64>();
        if !(d > rel_tol * gjj.abs()) || !d.is_finite() {
            return Err(());
        }
        self.l[k * cap..k * cap + k].copy_from_slice(&row);
        self.l[k * cap + k] = d.sqrt();
        self.k += 1;
        Ok(())
    }

    /// Solve `(L Lᵀ) x = b` in place for the current size.
    pub fn solve(&self, b: &mut [f64]) {
        let (k, cap) = (self.k, self.cap);
        for i in 0..k {
            let mut s = b[i];
            for (lp, bp) in self.l[i * cap..i * cap + i].iter().zip(&b[..i]) {
                s -= lp * bp;
            }
            b[i] = s / self.l[i * cap + i];
        }
        for i in (0..k).rev() {
            let mut s = b[i];
            for (p, bp) in b.iter().enumerate().take(k).skip(i + 1) {
                s -= self.l[p * cap + i] * bp;
            }
            b[i] = s / self.l[i * cap + i];
        }
    }

    /// max L_ii² / min L_ii²: a cheap lower bound on κ(MᵀM) of the current set.
    pub fn cond_est(&self) -> f64 {
        let (mut lo, mut hi) = (f64::INFINITY, 0.0f64);
        for i in 0..self.k {
            let v = self.l[i * self.cap + i].abs();
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if self.k == 0 {
            1.0
        } else {
            (hi / lo).powi(2)
        }
    }
}

/// `vec![zero; len]` for a large matrix that is written right away, backed by transparent huge
/// pages where the kernel offers them on request (Linux THP "madvise" mode). A 4096 × 4096 f32 E
/// is 16 Mi: with 4 KiB pages its first write takes ≈ 16 k page faults, a measurable share of
/// a head's compaction; with 2 MiB pages, 32. The advice changes nothing else: contents, layout
/// and deallocation are those of an ordinary `Vec`.
pub fn zeros_large<T: Copy + bytemuck::Zeroable>(len: usize) -> Vec<T> {
    let v: Vec<T> = bytemuck::zeroed_vec(len); // alloc_zeroed: large blocks come untouched from mmap
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = len * std::mem::size_of::<T>();
        if bytes >= 2 * HUGE {
            let start = v.as_ptr() as usize;
            let lo = start.next_multiple_of(HUGE);
            let hi = (start + bytes) / HUGE * HUGE;
            if hi > lo {
                // SAFETY: [lo, hi) lies inside the allocation `v` owns; MADV_HUGEPAGE is advice on
                // how to back those pages and never changes their contents. A refusal is harmless.
                unsafe {
                    libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
    v
}
