//! AVX-512 (V4) bodies of the GEMV row kernels: the 16-lane twins of the AVX2 `dot_rows`,
//! `RowsOp` and `BatchRowsOp` in `gemv.rs`, with the same structure, so the same guarantees
//! hold within the level: a row's arithmetic never depends on which rows it is paired with or
//! which thread reduces it, and bf16/f16 rows are bit-identical to f32 rows over the widened
//! weights. See `simd_v4.rs` for the safety rules.
//!
//! bf16 at 16 lanes is kept for that last property (`tests/runtime.rs` checks a bf16 model
//! against the same values stored as f32, within 1e-5), not for speed: on the Intel Xeon (KVM
//! guest, AVX-512 + AVX512_BF16 + AMX) it was developed on, it streamed the 49152×576 lm_head
//! shape (57 MB, L3-resident) 7-9 % slower than the AVX2 bf16 kernel, 1 thread
//! (`tests/throughput.rs gemv_lm_head_shape`: 25.0 against 27.5 GB/s), and equal on the
//! 16384×4096 and in-L2 shapes; two other 512-bit variants (even/odd lanes by mask and shift,
//! 4 rows per pass) were no better in a standalone harness. Worth re-measuring on a quiet
//! machine and on other AVX-512 classes.

use core::arch::x86_64::*;

use crate::simd::x86v4::{self as v4, V4};

/// Weight storage the V4 row kernel reads 16 lanes at a time as f32.
pub(crate) trait RowSource: Copy {
    type Elem: Copy;
    /// 16 weights -> f32x16, in registers.
    fn load16(t: V4, w: &[Self::Elem; 16]) -> __m512;
    /// `< 16` trailing weights, zero in the unused lanes (masked load, never past the slice).
    fn load_tail(t: V4, w: &[Self::Elem]) -> __m512;
    /// Software prefetch of the 64 weights at `p` (a hint: never faults, any address).
    fn prefetch(p: *const u8);
}

/// f32 weights.
#[derive(Clone, Copy)]
pub(crate) struct F32Src;
/// bf16 bits, widened by shift.
#[derive(Clone, Copy)]
pub(crate) struct Bf16Src;
/// IEEE f16 bits, widened by `vcvtph2ps`.
#[derive(Clone, Copy)]
pub(crate) struct F16Src;

impl RowSource for F32Src {
    type Elem = f32;
    #[inline(always)]
    fn load16(_: V4, w: &[f32; 16]) -> __m512 {
        // SAFETY: the token proves the V4 features.
        unsafe { v4::ld(w) }
    }
    #[inline(always)]
    fn load_tail(_: V4, w: &[f32]) -> __m512 {
        // SAFETY: the token proves the V4 features.
        unsafe { v4::ld_part(w) }
    }
    /// 256 bytes = the 4 cache lines of the block, into L1 (as the AVX2 kernel, per line).
    #[inline(always)]
    fn prefetch(p: *const u8) {
        // SAFETY: prefetch is a hint; it never faults, whatever the address.
        unsafe {
            for k in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(64 * k).cast());
            }
        }
    }
}

impl RowSource for Bf16Src {
    type Elem = u16;
    #[inline(always)]
    fn load16(_: V4, w: &[u16; 16]) -> __m512 {
        // SAFETY: the token proves the V4 features.
        unsafe { v4::widen_bf16(w) }
    }
    #[inline(always)]
    fn load_tail(_: V4, w: &[u16]) -> __m512 {
        // SAFETY: the token proves the V4 features.
        unsafe { v4::widen_bf16_part(w) }
    }
    /// 128 bytes = the 2 cache lines of the block, into L2 (as the AVX2 kernel, per line).
    #[inline(always)]
    fn prefetch(p: *const u8) {
        // SAFETY: prefetch is a hint; it never faults, whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T1>(p.cast());
            _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64).cast());
        }
    }
}

impl RowSource for F16Src {
    type Elem = u16;
    #[inline(always)]
    fn load16(_: V4, w: &[u16; 16]) -> __m512 {
        // SAFETY: the token proves the V4 features.
        unsafe { v4::widen_f16(w) }
    }
    #[inline(always)]
    fn load_tail(_: V4, w: &[u16]) -> __m512 {
        // SAFETY: the token proves the V4 features.
        unsafe { v4::widen_f16_part(w) }
    }
    #[inline(always)]
    fn prefetch(p: *const u8) {
        Bf16Src::prefetch(p)
    }
}

/// How far ahead of the current 64-weight block of each row the kernel prefetches (bytes): the
/// AVX2 kernel's distance (`gemv::PREFETCH_BYTES`, whose comment gives the reason: cover DRAM
/// latency at one core's bandwidth and cross 4 KiB pages ahead of the hardware prefetcher).
const PREFETCH_BYTES: usize = super::gemv::PREFETCH_BYTES;

/// `R` row dot products against the same `x`, sharing each `x` load. Per row: 4 f32x16 FMA
/// accumulators over 64-wide blocks, leftover 16-wide blocks into acc0, the masked tail into
/// acc1, then `hsum4` ((a0+a1)+(a2+a3), then a fixed lane tree). The per-row arithmetic is the
/// same for every `R`, so pairing rows never changes bits.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
fn dot_rows<S: RowSource, const R: usize>(t: V4, rows: [&[S::Elem]; R], x: &[f32]) -> [f32; R] {
    let n = x.len();
    let z = _mm512_setzero_ps();
    let mut acc = [[z; 4]; R];
    let (x16, xt) = pulp::as_arrays::<16, f32>(x);
    let (x64, x16r) = pulp::as_arrays::<4, [f32; 16]>(x16);
    let mut w16 = [(&[][..], &[][..]); R]; // per row: (16-blocks, tail)
    for r in 0..R {
        debug_assert_eq!(rows[r].len(), n);
        w16[r] = pulp::as_arrays::<16, S::Elem>(&rows[r][..n]);
    }
    let nb64 = x64.len();
    for (b, xv) in x64.iter().enumerate() {
        for r in 0..R {
            let wb = &w16[r].0[4 * b..4 * b + 4];
            S::prefetch(wb.as_ptr().cast::<u8>().wrapping_add(PREFETCH_BYTES));
            for k in 0..4 {
                acc[r][k] = _mm512_fmadd_ps(S::load16(t, &wb[k]), v4::ld(&xv[k]), acc[r][k]);
            }
        }
    }
    for (i, xv) in x16r.iter().enumerate() {
        for r in 0..R {
            let wv = &w16[r].0[4 * nb64 + i];
            acc[r][0] = _mm512_fmadd_ps(S::load16(t, wv), v4::ld(xv), acc[r][0]);
        }
    }
    if !xt.is_empty() {
        let xv = v4::ld_part(xt);
        for r in 0..R {
            acc[r][1] = _mm512_fmadd_ps(S::load_tail(t, w16[r].1), xv, acc[r][1]);
        }
    }
    let mut out = [0.0f32; R];
    for r in 0..R {
        out[r] = v4::hsum4(acc[r]);
    }
    out
}

/// V4 body of `gemv_rows`: `y[r] = <w[r*cols..], x>` for `w: [y.len(), cols]`, rows two at a
/// time (two independent DRAM streams, one `x` load per pair), as the AVX2 `RowsOp`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
pub(crate) fn rows<S: RowSource>(t: V4, w: &[S::Elem], x: &[f32], y: &mut [f32]) {
    let cols = x.len();
    let (y2, y1) = pulp::as_arrays_mut::<2, f32>(y);
    let (w2, w1) = w.split_at(2 * cols * y2.len());
    for (yp, wp) in y2.iter_mut().zip(w2.chunks_exact(2 * cols)) {
        let (a, b) = wp.split_at(cols);
        *yp = dot_rows::<S, 2>(t, [a, b], x);
    }
    if let Some(yl) = y1.first_mut() {
        *yl = dot_rows::<S, 1>(t, [&w1[..cols]], x)[0];
    }
}

/// `R` rows × `V` vectors, every (row, vector) with exactly the arithmetic of [`dot_rows`]: its
/// four accumulators take the same products in the same order (accumulator k: the k-th
/// 16-block of every 64-block, then leftover 16-blocks into 0 and the masked tail into 1), then
/// `hsum4`. Only the loop nest differs: one k-slice at a time, so each weight load is shared by
/// `V` vectors and each `x` load by `R` rows (16 accumulators at R = V = 4), instead of one
/// weight load per FMA. It expects its rows in L1 (see [`batch_group`]).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
#[allow(clippy::needless_range_loop)] // k, r and v index several arrays at once
fn dot_block<S: RowSource, const R: usize, const V: usize>(t: V4, rows: [&[S::Elem]; R], xs: [&[f32]; V]) -> [[f32; V]; R] {
    let n = xs[0].len();
    let z = _mm512_setzero_ps();
    let mut acc = [[[z; 4]; V]; R];
    let mut w16 = [(&[][..], &[][..]); R];
    for r in 0..R {
        debug_assert_eq!(rows[r].len(), n);
        w16[r] = pulp::as_arrays::<16, S::Elem>(&rows[r][..n]);
    }
    let mut x16 = [(&[][..], &[][..]); V];
    for v in 0..V {
        x16[v] = pulp::as_arrays::<16, f32>(&xs[v][..n]);
    }
    let nb64 = n / 64;
    for k in 0..4 {
        let mut a = [[z; V]; R];
        for b in 0..nb64 {
            let i = 4 * b + k;
            let mut xv = [z; V];
            for v in 0..V {
                xv[v] = v4::ld(&x16[v].0[i]);
            }
            for r in 0..R {
                let w = S::load16(t, &w16[r].0[i]);
                for v in 0..V {
                    a[r][v] = _mm512_fmadd_ps(w, xv[v], a[r][v]);
                }
            }
        }
        for r in 0..R {
            for v in 0..V {
                acc[r][v][k] = a[r][v];
            }
        }
    }
    for i in 4 * nb64..n / 16 {
        for r in 0..R {
            let w = S::load16(t, &w16[r].0[i]);
            for v in 0..V {
                acc[r][v][0] = _mm512_fmadd_ps(w, v4::ld(&x16[v].0[i]), acc[r][v][0]);
            }
        }
    }
    if !n.is_multiple_of(16) {
        for r in 0..R {
            let w = S::load_tail(t, w16[r].1);
            for v in 0..V {
                acc[r][v][1] = _mm512_fmadd_ps(w, v4::ld_part(x16[v].1), acc[r][v][1]);
            }
        }
    }
    let mut out = [[0.0f32; V]; R];
    for r in 0..R {
        for v in 0..V {
            out[r][v] = v4::hsum4(acc[r][v]);
        }
    }
    out
}

/// `R` consecutive rows starting at row `r0` against every vector, into `out` [n_rows, m]: the
/// first vector by [`dot_rows`] (its prefetch runs ahead into the rows after these), the rest
/// 4, then 2, then 1 at a time by [`dot_block`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
fn batch_group<S: RowSource, const R: usize>(t: V4, w: &[S::Elem], r0: usize, xs: &[f32], m: usize, out: &mut [f32]) {
    let cols = xs.len() / m;
    let rows: [&[S::Elem]; R] = core::array::from_fn(|r| &w[(r0 + r) * cols..(r0 + r + 1) * cols]);
    let x = |v: usize| &xs[v * cols..(v + 1) * cols];
    // The first vector streams the rows in from memory in `rows`' own order and prefetch (the
    // k-slice order of `dot_block` waits on memory there); the others then find them in L1.
    let mut v = 0;
    if m > 0 {
        let mut r = 0;
        while r + 2 <= R {
            let [ya, yb] = dot_rows::<S, 2>(t, [rows[r], rows[r + 1]], x(0));
            out[(r0 + r) * m] = ya;
            out[(r0 + r + 1) * m] = yb;
            r += 2;
        }
        if r < R {
            out[(r0 + r) * m] = dot_rows::<S, 1>(t, [rows[r]], x(0))[0];
        }
        v = 1;
    }
    while v < m {
        if m - v >= 4 {
            let y = dot_block::<S, R, 4>(t, rows, [x(v), x(v + 1), x(v + 2), x(v + 3)]);
            for r in 0..R {
                out[(r0 + r) * m + v..(r0 + r) * m + v + 4].copy_from_slice(&y[r]);
            }
            v += 4;
        } else if m - v >= 2 {
            let y = dot_block::<S, R, 2>(t, rows, [x(v), x(v + 1)]);
            for r in 0..R {
                out[(r0 + r) * m + v..(r0 + r) * m + v + 2].copy_from_slice(&y[r]);
            }
            v += 2;
        } else {
            let y = dot_block::<S, R, 1>(t, rows, [x(v)]);
            for r in 0..R {
                out[(r0 + r) * m + v] = y[r][0];
            }
            v += 1;
        }
    }
}

/// V4 body of `gemv_rows_batch` for bf16/f16 weights at 6 or more vectors: rows four at a time,
/// the first vector streamed by [`dot_rows`], the others four at a time by [`dot_block`]; every
/// output bit-identical to [`rows`] of its vector alone; `xs: [m, cols]`, `out: [n_rows, m]`.
/// Each 16-weight widening is shared by four vectors (see `gemv::BLOCKED_MIN_VECTORS` for the
/// measurements).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
pub(crate) fn batch_rows_blocked<S: RowSource>(t: V4, w: &[S::Elem], xs: &[f32], m: usize, out: &mut [f32]) {
    let cols = xs.len() / m;
    let n_rows = w.len() / cols;
    let mut r0 = 0;
    while r0 < n_rows {
        let step = match n_rows - r0 {
            1 => 1,
            2 | 3 => 2,
            _ => 4,
        };
        match step {
            1 => batch_group::<S, 1>(t, w, r0, xs, m, out),
            2 => batch_group::<S, 2>(t, w, r0, xs, m, out),
            _ => batch_group::<S, 4>(t, w, r0, xs, m, out),
        }
        r0 += step;
    }
}

/// V4 body of `gemv_rows_batch` for f32 weights: rows two at a time (as [`rows`] pairs them), each pair against
/// every vector while it sits in L1; `xs: [m, cols]`, `out: [n_rows, m]`. For f32 at any m and
/// bf16/f16 below 6 vectors: there it is as fast as [`batch_rows_blocked`] or faster.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
pub(crate) fn batch_rows_pairs<S: RowSource>(t: V4, w: &[S::Elem], xs: &[f32], m: usize, out: &mut [f32]) {
    let cols = xs.len() / m;
    let n_rows = w.len() / cols;
    let pairs = n_rows / 2;
    for p in 0..pairs {
        let (a, b) = w[2 * p * cols..(2 * p + 2) * cols].split_at(cols);
        for v in 0..m {
            let [ya, yb] = dot_rows::<S, 2>(t, [a, b], &xs[v * cols..(v + 1) * cols]);
            out[2 * p * m + v] = ya;
            out[(2 * p + 1) * m + v] = yb;
        }
    }
    if n_rows % 2 == 1 {
        let a = &w[(n_rows - 1) * cols..n_rows * cols];
        for v in 0..m {
            out[(n_rows - 1) * m + v] = dot_rows::<S, 1>(t, [a], &xs[v * cols..(v + 1) * cols])[0];
        }
    }
}
