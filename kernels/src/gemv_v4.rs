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

/// V4 body of `gemv_rows_batch`: rows two at a time (as [`rows`] pairs them), each pair against
/// every vector while it sits in L1; `xs: [m, cols]`, `out: [n_rows, m]`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
pub(crate) fn batch_rows<S: RowSource>(t: V4, w: &[S::Elem], xs: &[f32], m: usize, out: &mut [f32]) {
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
