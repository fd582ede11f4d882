//! Matrix-vector product over weights kept in their storage dtype (decode path),
//! and row widening to f32 (for prefill GEMM tiles).
//!
//! Every row is reduced by one function (`gemv_rows`) whatever the caller, so
//! [`gemv`] and [`gemv_par`] are bit-identical at any thread count.

use half::f16;
use rayon::prelude::*;

use crate::team::Team;

#[cfg(target_arch = "x86_64")]
use crate::gemv_v4 as k4;
#[cfg(target_arch = "x86_64")]
use crate::simd::{has_f16c, v3, v4, x86};

/// Borrowed row-major weight matrix `[rows, cols]`. bf16/f16 are the raw bits
/// as stored in the checkpoint; they are widened to f32 inside the kernels.
#[derive(Clone, Copy, Debug)]
pub enum WeightRef<'a> {
    /// f32 weights (AVX-512 or AVX2+FMA fast path).
    F32(&'a [f32]),
    /// bf16 bit patterns (AVX-512 or AVX2+FMA fast path, widened in registers).
    Bf16(&'a [u16]),
    /// IEEE f16 bit patterns (fast path needs AVX-512 or AVX2+FMA+F16C, else the scalar loop).
    F16(&'a [u16]),
}

impl WeightRef<'_> {
    /// Number of weights (elements, not bytes).
    pub fn len(&self) -> usize {
        match self {
            WeightRef::F32(w) => w.len(),
            WeightRef::Bf16(w) | WeightRef::F16(w) => w.len(),
        }
    }
    /// True when there are no weights.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// `"f32"`, `"bf16"` or `"f16"`.
    pub fn dtype_name(&self) -> &'static str {
        match self {
            WeightRef::F32(_) => "f32",
            WeightRef::Bf16(_) => "bf16",
            WeightRef::F16(_) => "f16",
        }
    }
    /// Storage bytes per weight (4 or 2).
    pub fn bytes_per_weight(&self) -> usize {
        match self {
            WeightRef::F32(_) => 4,
            WeightRef::Bf16(_) | WeightRef::F16(_) => 2,
        }
    }
}

/// bf16 bits -> f32 (exact: bf16 is the top half of an f32).
#[inline(always)]
pub(crate) fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits((b as u32) << 16)
}

#[inline(always)]
pub(crate) fn f16_to_f32(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

fn check(w: &WeightRef, rows: usize, cols: usize, x: &[f32], y: &[f32]) {
    let need = rows.checked_mul(cols).expect("gemv: rows*cols overflows");
    assert!(
        w.len() >= need,
        "gemv: {} weight has {} elements, need {rows}x{cols}",
        w.dtype_name(),
        w.len()
    );
    assert_eq!(x.len(), cols, "gemv: x length != cols");
    assert_eq!(y.len(), rows, "gemv: y length != rows");
}

/// Naive twin of [`gemv`]: one sequential f32 sum per row.
pub fn gemv_ref(w: WeightRef, rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    check(&w, rows, cols, x, y);
    for r in 0..rows {
        let mut s = 0.0f32;
        for c in 0..cols {
            let wv = match w {
                WeightRef::F32(w) => w[r * cols + c],
                WeightRef::Bf16(w) => bf16_to_f32(w[r * cols + c]),
                WeightRef::F16(w) => f16_to_f32(w[r * cols + c]),
            };
            s += wv * x[c];
        }
        y[r] = s;
    }
}

/// Rows `[row0, row0 + y.len())` of `W x` into `y`. The single place where a
/// row is reduced: the fast path is chosen per call, identically for every
/// chunk, and a row's arithmetic does not depend on which rows it is paired
/// with, so results never depend on how rows are split.
fn gemv_rows(w: WeightRef, row0: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    let lo = row0 * cols;
    let hi = (row0 + y.len()) * cols;
    if cols == 0 {
        y.fill(0.0);
        return;
    }
    match w {
        WeightRef::F32(w) => {
            let w = &w[lo..hi]; // [n_rows, cols]
            #[cfg(target_arch = "x86_64")]
            if let Some(t) = v4() {
                // SAFETY: the token proves the V4 features at run time.
                return unsafe { k4::rows::<k4::F32Src>(t, w, x, y) };
            }
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = v3() {
                return simd.vectorize(RowsOp { simd, w, x, y });
            }
            for (r, yr) in y.iter_mut().enumerate() {
                *yr = crate::vecops::dot_ref(&w[r * cols..(r + 1) * cols], x);
            }
        }
        WeightRef::Bf16(w) => {
            let w = &w[lo..hi]; // [n_rows, cols] bf16 bits
            #[cfg(target_arch = "x86_64")]
            if let Some(t) = v4() {
                // SAFETY: the token proves the V4 features at run time.
                return unsafe { k4::rows::<k4::Bf16Src>(t, w, x, y) };
            }
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = v3() {
                return simd.vectorize(RowsOp { simd, w: Bf16Bits(w), x, y });
            }
            for (r, yr) in y.iter_mut().enumerate() {
                let wr = &w[r * cols..(r + 1) * cols];
                *yr = wr.iter().zip(x).fold(0.0f32, |s, (&b, &xv)| s + bf16_to_f32(b) * xv);
            }
        }
        WeightRef::F16(w) => {
            let w = &w[lo..hi]; // [n_rows, cols] f16 bits
            #[cfg(target_arch = "x86_64")]
            if let Some(t) = v4() {
                // SAFETY: the token proves the V4 features at run time.
                return unsafe { k4::rows::<k4::F16Src>(t, w, x, y) };
            }
            #[cfg(target_arch = "x86_64")]
            if has_f16c() {
                for (r, yr) in y.iter_mut().enumerate() {
                    // SAFETY: has_f16c() checked AVX2+FMA+F16C at run time.
                    *yr = unsafe { x86::dot_f16_f16c(&w[r * cols..(r + 1) * cols], x) };
                }
                return;
            }
            for (r, yr) in y.iter_mut().enumerate() {
                let wr = &w[r * cols..(r + 1) * cols];
                *yr = wr.iter().zip(x).fold(0.0f32, |s, (&b, &xv)| s + f16_to_f32(b) * xv);
            }
        }
    }
}

/// bf16 bits, tagged so the row kernel knows how to widen them.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Bf16Bits<'a>(&'a [u16]);

/// Weight storage the AVX2 row kernel can read 8 lanes at a time as f32.
#[cfg(target_arch = "x86_64")]
trait RowSource: Copy {
    type Elem: Copy + Default;
    fn slice(&self) -> &[Self::Elem];
    /// 8 weights -> f32x8, in registers.
    fn load8(simd: x86::V3, w: &[Self::Elem; 8]) -> __m256;
    /// `< 8` trailing weights, zero in the unused lanes.
    fn load_tail(simd: x86::V3, w: &[Self::Elem]) -> __m256;
    /// Software prefetch of the 32 weights at `p` (a hint: never faults, any address).
    fn prefetch(p: *const u8);
}

#[cfg(target_arch = "x86_64")]
impl RowSource for &[f32] {
    type Elem = f32;
    #[inline(always)]
    fn slice(&self) -> &[f32] {
        self
    }
    #[inline(always)]
    fn load8(_: x86::V3, w: &[f32; 8]) -> __m256 {
        x86::ld(w)
    }
    #[inline(always)]
    fn load_tail(simd: x86::V3, w: &[f32]) -> __m256 {
        x86::ld_part(simd, w)
    }
    /// 128 bytes = two cache lines, into L1.
    #[inline(always)]
    fn prefetch(p: *const u8) {
        // SAFETY: prefetch is a hint; it never faults, whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.cast());
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64).cast());
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl RowSource for Bf16Bits<'_> {
    type Elem = u16;
    #[inline(always)]
    fn slice(&self) -> &[u16] {
        self.0
    }
    /// vpmovzxwd + vpslld: widened in registers, never through memory.
    #[inline(always)]
    fn load8(simd: x86::V3, w: &[u16; 8]) -> __m256 {
        x86::widen_bf16(simd, w)
    }
    #[inline(always)]
    fn load_tail(simd: x86::V3, w: &[u16]) -> __m256 {
        // Zero-pad the < 8 leftover weights once per row (not in the hot loop).
        let mut pad = [0u16; 8];
        pad[..w.len()].copy_from_slice(w);
        x86::widen_bf16(simd, &pad)
    }
    /// 64 bytes = one cache line, into L2 (measured faster than L1 for bf16).
    #[inline(always)]
    fn prefetch(p: *const u8) {
        // SAFETY: prefetch is a hint; it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(p.cast()) }
    }
}

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::{__m256, _mm_prefetch, _MM_HINT_T0, _MM_HINT_T1};

/// How far ahead of the current 32-weight block of each row the row kernel
/// prefetches (bytes). Rows are contiguous, so this runs into the next rows;
/// far enough to cover DRAM latency at one core's bandwidth and to cross 4 KiB
/// pages ahead of the hardware prefetcher, which stops at page boundaries.
/// Measured: bf16 decode 1T 25 -> 40 tok/s, f32 21 -> 24.5 (SmolLM2-135M).
#[cfg(target_arch = "x86_64")]
pub(crate) const PREFETCH_BYTES: usize = 8192;

/// `R` row dot products against the same `x`, sharing each `x` load.
/// Per row: 4 f32x8 FMA accumulators over 32-wide blocks, leftover 8-wide
/// blocks into acc0, masked tail into acc1, then `hsum4`. The per-row
/// arithmetic is the same for every `R`, so pairing rows never changes bits.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn dot_rows<S: RowSource, const R: usize>(simd: x86::V3, rows: [&[S::Elem]; R], x: &[f32]) -> [f32; R] {
    let fma = simd.fma;
    let n = x.len();
    let z = simd.avx._mm256_setzero_ps();
    let mut acc = [[z; 4]; R];
    let (x8, xt) = pulp::as_arrays::<8, f32>(x);
    let (x32, x8r) = pulp::as_arrays::<4, [f32; 8]>(x8);
    let mut w8 = [(&[][..], &[][..]); R]; // per row: (full 8-blocks, tail)
    for r in 0..R {
        debug_assert_eq!(rows[r].len(), n);
        w8[r] = pulp::as_arrays::<8, S::Elem>(&rows[r][..n]);
    }
    let nb32 = x32.len();
    for (b, xv) in x32.iter().enumerate() {
        for r in 0..R {
            let wb = &w8[r].0[4 * b..4 * b + 4];
            S::prefetch(wb.as_ptr().cast::<u8>().wrapping_add(PREFETCH_BYTES));
            for k in 0..4 {
                acc[r][k] = fma._mm256_fmadd_ps(S::load8(simd, &wb[k]), x86::ld(&xv[k]), acc[r][k]);
            }
        }
    }
    for (i, xv) in x8r.iter().enumerate() {
        for r in 0..R {
            let wv = &w8[r].0[4 * nb32 + i];
            acc[r][0] = fma._mm256_fmadd_ps(S::load8(simd, wv), x86::ld(xv), acc[r][0]);
        }
    }
    if !xt.is_empty() {
        let xv = x86::ld_part(simd, xt);
        for r in 0..R {
            acc[r][1] = fma._mm256_fmadd_ps(S::load_tail(simd, w8[r].1), xv, acc[r][1]);
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = x86::hsum4(simd, acc[r]);
    }
    out
}

/// AVX2 body of [`gemv_rows`] for f32 or bf16 storage. Rows are taken two at
/// a time (two independent DRAM streams, one `x` load per pair).
#[cfg(target_arch = "x86_64")]
struct RowsOp<'a, S> {
    simd: x86::V3,
    w: S,              // [n_rows, cols]
    x: &'a [f32],      // [cols]
    y: &'a mut [f32],  // [n_rows]
}

#[cfg(target_arch = "x86_64")]
impl<S: RowSource> pulp::NullaryFnOnce for RowsOp<'_, S> {
    type Output = ();
    #[inline(always)]
    fn call(self) {
        let RowsOp { simd, w, x, y } = self;
        let cols = x.len();
        let w = w.slice();
        let (y2, y1) = pulp::as_arrays_mut::<2, f32>(y);
        let (w2, w1) = w.split_at(2 * cols * y2.len());
        for (yp, wp) in y2.iter_mut().zip(w2.chunks_exact(2 * cols)) {
            let (a, b) = wp.split_at(cols);
            *yp = dot_rows::<S, 2>(simd, [a, b], x);
        }
        if let Some(yl) = y1.first_mut() {
            *yl = dot_rows::<S, 1>(simd, [&w1[..cols]], x)[0];
        }
    }
}

/// `y[r] = sum_c W[r,c] * x[c]` for `W: [rows, cols]` (only the first
/// `rows*cols` weights are used), `x: [cols]`, `y: [rows]`; single thread.
///
/// Fast paths (by the dispatch level, [`crate::dispatch`]): at V4 all three
/// dtypes on AVX-512 (`std::arch`, 16 lanes); at V3 f32 and bf16 on AVX2+FMA
/// via pulp, f16 on F16C via `std::arch`; otherwise a scalar loop. Each row
/// uses 4 FMA accumulators (f32x16 at V4, f32x8 at V3) + masked tail in a
/// fixed order (rows go in pairs sharing the `x` loads, without changing any
/// row's arithmetic), so results are deterministic for a level but differ from
/// [`gemv_ref`] by rounding (|Δ| <= (cols + cols/32 + 10)·ε·Σ|w·x|). At each
/// level the bf16 and f16 results are bit-identical to the f32 kernel over the
/// widened weights (except f16 at V3 without F16C).
///
/// bf16 weights are widened to f32 (exact) and multiplied by the f32 `x`; the
/// AVX512_BF16 dot product (`vdpbf16ps`) is not used: it needs `x` in bf16 too,
/// and rounding `x` once to bf16 put the error at 4× the tolerance above on
/// 576-column rows (measured), while splitting `x` exactly into three bf16
/// parts stays within it but ran at half the speed of widening.
pub fn gemv(w: WeightRef, rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    check(&w, rows, cols, x, y);
    gemv_rows(w, 0, cols, x, y);
}

/// Former rows-per-task of [`gemv_par`]; the partition is now by weight bytes
/// (see [`gemv_multi_par`]). Kept so the public API does not change.
pub const GEMV_PAR_CHUNK_ROWS: usize = 64;

/// Below this many weight bytes in one [`gemv_multi_par`] call, the rows are
/// reduced on the calling thread: a fork/join costs more than it saves.
pub const GEMV_PAR_MIN_BYTES: usize = 96 * 1024;

/// Contiguous parts per thread in [`gemv_multi_par`] and the team stages: slack so
/// that claiming evens out the finish times. In a decode team 1, 2 and 4 measured
/// level and 8 or more slower (more row runs, more broken prefetch streams).
const GEMV_PARTS_PER_THREAD: usize = 4;

/// Same as [`gemv`], with rows split across the current rayon pool (see
/// [`gemv_multi_par`]). Each row is reduced exactly as in `gemv`, so the
/// output is bit-identical to `gemv` at any thread count.
pub fn gemv_par(w: WeightRef, rows: usize, cols: usize, x: &[f32], y: &mut [f32]) {
    gemv_multi_par(&mut [GemvTask { w, rows, cols, x, y }]);
}

/// One `y = W x` of a [`gemv_multi_par`] batch (same contract as [`gemv`]).
pub struct GemvTask<'a> {
    /// Row-major `[rows, cols]` weights; only the first `rows*cols` are used.
    pub w: WeightRef<'a>,
    /// Output length (rows of `w` used).
    pub rows: usize,
    /// Input length (columns of `w`).
    pub cols: usize,
    /// Input vector, `[cols]`.
    pub x: &'a [f32],
    /// Output vector, `[rows]`; overwritten.
    pub y: &'a mut [f32],
}

/// A run of rows of one task, assigned to one part.
struct Seg<'a> {
    part: usize,
    w: WeightRef<'a>,
    row0: usize,
    cols: usize,
    x: &'a [f32],
    y: &'a mut [f32],
}

/// Several independent GEMVs (e.g. the q/k/v projections of one token) in a
/// single fork/join. The rows of all tasks, in order, are cut into
/// `threads x 4` contiguous parts of about equal weight bytes, so each thread
/// streams long contiguous runs and a whole batch costs one rayon dispatch;
/// one thread, or less than [`GEMV_PAR_MIN_BYTES`] of weights, runs inline.
/// Every row is reduced by the same function whatever the partition, so the
/// outputs are bit-identical to [`gemv`] of each task at any thread count.
pub fn gemv_multi_par(tasks: &mut [GemvTask<'_>]) {
    gemv_multi(None, tasks)
}

/// [`gemv_multi_par`] on the threads of a decode [`Team`] (one stage, no rayon dispatch); the
/// same outputs, bit for bit.
pub fn gemv_multi_team(team: &Team<'_>, tasks: &mut [GemvTask<'_>]) {
    gemv_multi(Some(team), tasks)
}

/// Below this many weight bytes a [`Team`] stage runs on the calling thread: a stage costs
/// about a microsecond, a rayon fork/join tens.
const GEMV_TEAM_MIN_BYTES: usize = 32 * 1024;

fn gemv_multi(team: Option<&Team<'_>>, tasks: &mut [GemvTask<'_>]) {
    let mut total = 0usize;
    for t in tasks.iter() {
        check(&t.w, t.rows, t.cols, t.x, t.y);
        total += t.rows * t.cols * t.w.bytes_per_weight();
    }
    let (threads, min_bytes) = match team {
        Some(t) => (t.size(), GEMV_TEAM_MIN_BYTES),
        None => (rayon::current_num_threads(), GEMV_PAR_MIN_BYTES),
    };
    if threads <= 1 || total < min_bytes {
        for t in tasks.iter_mut() {
            gemv_rows(t.w, 0, t.cols, t.x, t.y);
        }
        return;
    }
    let parts = threads * GEMV_PARTS_PER_THREAD;
    let mut segs: Vec<Seg<'_>> = Vec::with_capacity(parts + tasks.len());
    let mut done = 0usize; // bytes of the rows already assigned
    for t in tasks.iter_mut() {
        let row_bytes = t.cols * t.w.bytes_per_weight();
        let mut y: &mut [f32] = &mut *t.y;
        let mut row0 = 0usize;
        while !y.is_empty() {
            // Part of the next row, and the rows left before that part's end.
            let part = (done * parts / total.max(1)).min(parts - 1);
            let end = (part + 1) * total / parts; // byte offset where `part` ends
            let fit = if row_bytes == 0 { y.len() } else { (end - done).div_ceil(row_bytes) };
            let n = fit.clamp(1, y.len());
            let (head, tail) = y.split_at_mut(n);
            segs.push(Seg { part, w: t.w, row0, cols: t.cols, x: t.x, y: head });
            y = tail;
            row0 += n;
            done += n * row_bytes;
        }
    }
    let run = |group: &mut [Seg<'_>]| {
        for s in group.iter_mut() {
            gemv_rows(s.w, s.row0, s.cols, s.x, s.y);
        }
    };
    match team {
        Some(t) => {
            let mut groups: Vec<&mut [Seg<'_>]> = segs.chunk_by_mut(|a, b| a.part == b.part).collect();
            t.for_each_mut(&mut groups, |_, g| run(g));
        }
        None => segs.par_chunk_by_mut(|a, b| a.part == b.part).for_each(run),
    }
}

/// Naive twin of [`gemv_batch`]: [`gemv_ref`] of each vector.
pub fn gemv_batch_ref(w: WeightRef, rows: usize, cols: usize, xs: &[f32], ys: &mut [f32]) {
    let m = batch_check(&w, rows, cols, xs, ys);
    for v in 0..m {
        gemv_ref(w, rows, cols, &xs[v * cols..(v + 1) * cols], &mut ys[v * rows..(v + 1) * rows]);
    }
}

/// Checks of a batched GEMV; returns the number of vectors m.
fn batch_check(w: &WeightRef, rows: usize, cols: usize, xs: &[f32], ys: &[f32]) -> usize {
    let need = rows.checked_mul(cols).expect("gemv_batch: rows*cols overflows");
    assert!(w.len() >= need, "gemv_batch: {} weight has {} elements, need {rows}x{cols}", w.dtype_name(), w.len());
    assert!(cols > 0 || xs.is_empty(), "gemv_batch: cols is 0 but inputs were given");
    let m = match xs.len().checked_div(cols) {
        Some(m) => m,
        None => ys.len().checked_div(rows).unwrap_or(0), // cols = 0: the vectors are empty
    };
    assert_eq!(xs.len(), m * cols, "gemv_batch: xs length is not a multiple of cols");
    assert_eq!(ys.len(), m * rows, "gemv_batch: ys length != m*rows");
    m
}

/// Weight bytes per row block of [`gemv_batch`]: the block is reduced against every vector in
/// turn while it sits in L1 (32 KiB or more on every x86 core we know), so each weight is read
/// from memory once per call, not once per vector.
const BATCH_BLOCK_BYTES: usize = 16 * 1024;

/// Fewest vectors for which 2-byte weights take the blocked AVX-512 batch kernel. Below it the
/// step is bandwidth-bound and the pairs kernel is as fast or faster. SmolLM2 bf16 at 2 threads,
/// `kvcompact bench --batch m`, blocked against pairs, tok/s, two A/B rounds: m = 4 180–186
/// against 181–194; m = 6 216–219 against 208–212; m = 8 245–250 against 216–224. (f32 at m = 8:
/// level, 203–207 against 205–211, so f32 keeps the pairs kernel.)
const BLOCKED_MIN_VECTORS: usize = 6;

/// Rows `[row0, row0 + n_rows)` of `W x_v` for every vector v, into `out` [n_rows, m] (row-major
/// by weight row). Each (row, vector) is reduced by [`gemv_rows`], the function single-vector
/// GEMV uses, so every output is bit-identical to [`gemv`] of that vector alone.
#[allow(clippy::too_many_arguments)] // a private kernel body: shapes passed flat, as in gemv_rows
fn gemv_rows_batch(w: WeightRef, row0: usize, n_rows: usize, cols: usize, xs: &[f32], m: usize, out: &mut [f32], tmp: &mut Vec<f32>) {
    // AVX2: each pair of rows is reduced against every vector while it sits in L1, with the same
    // per-row function (`dot_rows`) as `gemv_rows`, so the bits are the same.
    #[cfg(target_arch = "x86_64")]
    if cols > 0 {
        let (lo, hi) = (row0 * cols, (row0 + n_rows) * cols);
        if let Some(t) = v4() {
            // SAFETY (all three): the token proves the V4 features at run time.
            return match w {
                WeightRef::F32(w) => unsafe { k4::batch_rows_pairs::<k4::F32Src>(t, &w[lo..hi], xs, m, out) },
                WeightRef::Bf16(w) if m >= BLOCKED_MIN_VECTORS => unsafe { k4::batch_rows_blocked::<k4::Bf16Src>(t, &w[lo..hi], xs, m, out) },
                WeightRef::F16(w) if m >= BLOCKED_MIN_VECTORS => unsafe { k4::batch_rows_blocked::<k4::F16Src>(t, &w[lo..hi], xs, m, out) },
                WeightRef::Bf16(w) => unsafe { k4::batch_rows_pairs::<k4::Bf16Src>(t, &w[lo..hi], xs, m, out) },
                WeightRef::F16(w) => unsafe { k4::batch_rows_pairs::<k4::F16Src>(t, &w[lo..hi], xs, m, out) },
            };
        }
        if let Some(simd) = v3() {
            match w {
                WeightRef::F32(w) => return simd.vectorize(BatchRowsOp { simd, w: &w[lo..hi], xs, m, out }),
                WeightRef::Bf16(w) => return simd.vectorize(BatchRowsOp { simd, w: Bf16Bits(&w[lo..hi]), xs, m, out }),
                WeightRef::F16(_) => {}
            }
        }
    }
    let block = (BATCH_BLOCK_BYTES / (cols * w.bytes_per_weight()).max(1)).max(2);
    let mut r = 0;
    while r < n_rows {
        let nb = block.min(n_rows - r);
        tmp.resize(nb, 0.0);
        for v in 0..m {
            gemv_rows(w, row0 + r, cols, &xs[v * cols..(v + 1) * cols], &mut tmp[..nb]);
            for (i, &t) in tmp[..nb].iter().enumerate() {
                out[(r + i) * m + v] = t;
            }
        }
        r += nb;
    }
}

/// AVX2 body of [`gemv_rows_batch`] for f32 or bf16 storage: rows two at a time (as
/// [`RowsOp`] pairs them), each pair against every vector.
#[cfg(target_arch = "x86_64")]
struct BatchRowsOp<'a, S> {
    simd: x86::V3,
    w: S,              // [n_rows, cols]
    xs: &'a [f32],     // [m, cols]
    m: usize,
    out: &'a mut [f32], // [n_rows, m]
}

#[cfg(target_arch = "x86_64")]
impl<S: RowSource> pulp::NullaryFnOnce for BatchRowsOp<'_, S> {
    type Output = ();
    #[inline(always)]
    fn call(self) {
        let BatchRowsOp { simd, w, xs, m, out } = self;
        let cols = xs.len() / m;
        let w = w.slice();
        let n_rows = w.len() / cols;
        let pairs = n_rows / 2;
        for p in 0..pairs {
            let (a, b) = w[2 * p * cols..(2 * p + 2) * cols].split_at(cols);
            for v in 0..m {
                let [ya, yb] = dot_rows::<S, 2>(simd, [a, b], &xs[v * cols..(v + 1) * cols]);
                out[2 * p * m + v] = ya;
                out[(2 * p + 1) * m + v] = yb;
            }
        }
        if n_rows % 2 == 1 {
            let a = &w[(n_rows - 1) * cols..n_rows * cols];
            for v in 0..m {
                out[(n_rows - 1) * m + v] = dot_rows::<S, 1>(simd, [a], &xs[v * cols..(v + 1) * cols])[0];
            }
        }
    }
}

/// `ys[v] = W xs[v]` for m vectors at once (`xs` [m, cols], `ys` [m, rows], both row-major),
/// single thread: the batched decode step of a server, where each weight row is streamed from
/// memory once for all m sequences. Bit-identical to [`gemv`] of each vector alone (and so to
/// single-sequence decode), whatever m and whatever the other vectors are.
pub fn gemv_batch(w: WeightRef, rows: usize, cols: usize, xs: &[f32], ys: &mut [f32]) {
    let m = batch_check(&w, rows, cols, xs, ys);
    if m == 0 {
        return;
    }
    let mut out = vec![0.0f32; rows * m];
    gemv_rows_batch(w, 0, rows, cols, xs, m, &mut out, &mut Vec::new());
    scatter(&out, 0, rows, m, ys);
}

/// out [n_rows, m] (weight-row-major) into rows `[row0, row0 + n_rows)` of ys [m, rows].
fn scatter(out: &[f32], row0: usize, rows: usize, m: usize, ys: &mut [f32]) {
    for (i, chunk) in out.chunks_exact(m).enumerate() {
        for (v, &x) in chunk.iter().enumerate() {
            ys[v * rows + row0 + i] = x;
        }
    }
}

/// One `ys = W xs` of a [`gemv_batch_multi_par`] call (same contract as [`gemv_batch`]).
pub struct GemvBatchTask<'a> {
    /// Row-major `[rows, cols]` weights; only the first `rows*cols` are used.
    pub w: WeightRef<'a>,
    /// Output length per vector (rows of `w` used).
    pub rows: usize,
    /// Input length per vector (columns of `w`).
    pub cols: usize,
    /// Input vectors, `[m, cols]`.
    pub xs: &'a [f32],
    /// Output vectors, `[m, rows]`; overwritten.
    pub ys: &'a mut [f32],
}

/// Several batched GEMVs in one fork/join, rows split across the pool by weight bytes as in
/// [`gemv_multi_par`]. Every output is bit-identical to [`gemv`] of its vector alone, at any
/// thread count and any batch size.
pub fn gemv_batch_multi_par(tasks: &mut [GemvBatchTask<'_>]) {
    gemv_batch_multi(None, tasks)
}

/// [`gemv_batch_multi_par`] on the threads of a decode [`Team`]; the same outputs, bit for bit.
pub fn gemv_batch_multi_team(team: &Team<'_>, tasks: &mut [GemvBatchTask<'_>]) {
    gemv_batch_multi(Some(team), tasks)
}

fn gemv_batch_multi(team: Option<&Team<'_>>, tasks: &mut [GemvBatchTask<'_>]) {
    let mut total = 0usize;
    let mut ms = Vec::with_capacity(tasks.len());
    for t in tasks.iter() {
        ms.push(batch_check(&t.w, t.rows, t.cols, t.xs, t.ys));
        total += t.rows * t.cols * t.w.bytes_per_weight();
    }
    let (threads, min_bytes) = match team {
        Some(t) => (t.size(), GEMV_TEAM_MIN_BYTES),
        None => (rayon::current_num_threads(), GEMV_PAR_MIN_BYTES),
    };
    if threads <= 1 || total < min_bytes {
        for (t, &m) in tasks.iter_mut().zip(&ms) {
            if m > 0 {
                let mut out = vec![0.0f32; t.rows * m];
                gemv_rows_batch(t.w, 0, t.rows, t.cols, t.xs, m, &mut out, &mut Vec::new());
                scatter(&out, 0, t.rows, m, t.ys);
            }
        }
        return;
    }
    // (task, first row, rows) per part, cut at equal weight bytes like gemv_multi_par.
    let parts = threads * GEMV_PARTS_PER_THREAD;
    let mut segs: Vec<(usize, usize, usize, usize)> = Vec::with_capacity(parts + tasks.len()); // (part, task, row0, n)
    let mut done = 0usize;
    for (ti, t) in tasks.iter().enumerate() {
        let row_bytes = t.cols * t.w.bytes_per_weight();
        let mut row0 = 0usize;
        while row0 < t.rows {
            let part = (done * parts / total.max(1)).min(parts - 1);
            let end = (part + 1) * total / parts;
            let fit = if row_bytes == 0 { t.rows - row0 } else { (end - done).div_ceil(row_bytes) };
            let n = fit.clamp(1, t.rows - row0);
            segs.push((part, ti, row0, n));
            row0 += n;
            done += n * row_bytes;
        }
    }
    let view: Vec<(WeightRef, usize, &[f32], usize)> = tasks.iter().zip(&ms).map(|(t, &m)| (t.w, t.cols, t.xs, m)).collect();
    type Part = Vec<(usize, usize, Vec<f32>)>; // (task, row0, out [n, m]) per segment of one part
    type SegRow = (usize, usize, usize, usize); // (part, task, row0, n)
    let run = |group: &[SegRow]| -> Part {
        let mut tmp = Vec::new();
        group
            .iter()
            .map(|&(_, ti, row0, n)| {
                let (w, cols, xs, m) = view[ti];
                let mut out = vec![0.0f32; n * m];
                gemv_rows_batch(w, row0, n, cols, xs, m, &mut out, &mut tmp);
                (ti, row0, out)
            })
            .collect()
    };
    let results: Vec<Part> = match team {
        Some(t) => {
            let mut jobs: Vec<(&[SegRow], Part)> = segs.chunk_by(|a, b| a.0 == b.0).map(|g| (g, Vec::new())).collect();
            t.for_each_mut(&mut jobs, |_, (g, out)| *out = run(g));
            jobs.into_iter().map(|(_, out)| out).collect()
        }
        None => segs.par_chunk_by(|a, b| a.0 == b.0).map(run).collect(),
    };
    for (ti, row0, out) in results.into_iter().flatten() {
        let t = &mut tasks[ti];
        if ms[ti] > 0 {
            scatter(&out, row0, t.rows, ms[ti], t.ys);
        }
    }
}

/// Naive twin of [`widen_rows`].
pub fn widen_rows_ref(w: WeightRef, row_start: usize, n_rows: usize, cols: usize, out: &mut [f32]) {
    let (lo, hi) = widen_check(&w, row_start, n_rows, cols, out);
    match w {
        WeightRef::F32(w) => out.copy_from_slice(&w[lo..hi]),
        WeightRef::Bf16(w) => {
            for (o, &b) in out.iter_mut().zip(&w[lo..hi]) {
                *o = bf16_to_f32(b);
            }
        }
        WeightRef::F16(w) => {
            for (o, &b) in out.iter_mut().zip(&w[lo..hi]) {
                *o = f16_to_f32(b);
            }
        }
    }
}

fn widen_check(
    w: &WeightRef,
    row_start: usize,
    n_rows: usize,
    cols: usize,
    out: &[f32],
) -> (usize, usize) {
    let lo = row_start * cols;
    let hi = (row_start + n_rows) * cols;
    assert!(
        w.len() >= hi,
        "widen_rows: rows [{row_start}, {}) x {cols} out of range of {} weights",
        row_start + n_rows,
        w.len()
    );
    assert_eq!(out.len(), n_rows * cols, "widen_rows: out length != n_rows*cols");
    (lo, hi)
}

/// Copy rows `[row_start, row_start+n_rows)` of `W: [rows, cols]`, widened to
/// f32, into `out: [n_rows, cols]` (f32 GEMM tiles for prefill). Widening is
/// exact, so this is bit-identical to [`widen_rows_ref`] (NaN payloads aside).
pub fn widen_rows(w: WeightRef, row_start: usize, n_rows: usize, cols: usize, out: &mut [f32]) {
    let (lo, hi) = widen_check(&w, row_start, n_rows, cols, out);
    match w {
        WeightRef::F32(w) => out.copy_from_slice(&w[lo..hi]),
        WeightRef::Bf16(wb) => {
            #[cfg(target_arch = "x86_64")]
            if let Some(simd) = v3() {
                struct Op<'a>(x86::V3, &'a [u16], &'a mut [f32]);
                impl pulp::NullaryFnOnce for Op<'_> {
                    type Output = ();
                    #[inline(always)]
                    fn call(self) {
                        let Op(simd, w, out) = self;
                        let (w8, wt) = pulp::as_arrays::<8, u16>(w);
                        let (o8, ot) = pulp::as_arrays_mut::<8, f32>(out);
                        for (wv, ov) in w8.iter().zip(o8.iter_mut()) {
                            x86::st(ov, x86::widen_bf16(simd, wv));
                        }
                        for (o, &b) in ot.iter_mut().zip(wt) {
                            *o = bf16_to_f32(b);
                        }
                    }
                }
                return simd.vectorize(Op(simd, &wb[lo..hi], out));
            }
            widen_rows_ref(w, row_start, n_rows, cols, out)
        }
        WeightRef::F16(wh) => {
            #[cfg(target_arch = "x86_64")]
            if has_f16c() {
                // SAFETY: has_f16c() checked AVX2+FMA+F16C at run time.
                unsafe { x86::widen_f16_f16c(&wh[lo..hi], out) };
                return;
            }
            let _ = wh;
            widen_rows_ref(w, row_start, n_rows, cols, out)
        }
    }
}
