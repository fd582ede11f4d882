//! Shared run-time dispatch helpers and SIMD building blocks.
//!
//! Everything here is either safe pulp code behind a `V3` token (which proves
//! AVX2+FMA at run time), `std::arch` F16C code behind `#[target_feature]`
//! that is only reachable after [`has_f16c`] returned true, or AVX-512 code
//! behind the [`x86v4::V4`] token (see that module). Every check also consults
//! the dispatch level ([`crate::dispatch`]), so a forced lower level turns the
//! faster paths off.

#[cfg(target_arch = "x86_64")]
use crate::dispatch::{simd_dispatch_level, SimdLevel};

/// pulp's AVX2+FMA token; `None` on CPUs (or targets) without it.
#[cfg(target_arch = "x86_64")]
pub(crate) use pulp::x86::V3;

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// The AVX2+FMA path, if the dispatch level is at least V3 (pulp caches the
/// CPUID answer; `V3::try_new` re-checks it, so a token is never forged).
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn v3() -> Option<V3> {
    if simd_dispatch_level() >= SimdLevel::V3 {
        V3::try_new()
    } else {
        None
    }
}

/// The AVX-512 path, if the dispatch level is V4.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn v4() -> Option<x86v4::V4> {
    if simd_dispatch_level() == SimdLevel::V4 {
        x86v4::V4::try_new()
    } else {
        None
    }
}

/// Run-time check for the F16C path (dispatch level at least V3). pulp's V3
/// does not include F16C, so the f16 kernels use `std::arch` directly; std
/// caches the answer.
#[cfg(target_arch = "x86_64")]
#[inline]
pub(crate) fn has_f16c() -> bool {
    simd_dispatch_level() >= SimdLevel::V3
        && is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

#[cfg(not(target_arch = "x86_64"))]
#[inline]
pub(crate) fn has_f16c() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
#[path = "simd_v4.rs"]
pub(crate) mod x86v4;

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use super::*;
    pub(crate) use super::V3;

    // Loads/stores through `pulp::cast` of a fixed-size array: safe, and
    // LLVM lowers them to single unaligned vector moves.
    #[inline(always)]
    pub(crate) fn ld(a: &[f32; 8]) -> __m256 {
        pulp::cast(*a)
    }
    #[inline(always)]
    pub(crate) fn st(out: &mut [f32; 8], v: __m256) {
        *out = pulp::cast(v);
    }
    /// Masked load of `a.len() < 8` floats, zero in the unused lanes.
    #[inline(always)]
    pub(crate) fn ld_part(simd: V3, a: &[f32]) -> __m256 {
        debug_assert!(a.len() <= 8);
        pulp::cast(pulp::Simd::partial_load_f32s(simd, a))
    }
    /// Masked store of the first `out.len() < 8` lanes.
    #[inline(always)]
    pub(crate) fn st_part(simd: V3, out: &mut [f32], v: __m256) {
        debug_assert!(out.len() <= 8);
        pulp::Simd::partial_store_f32s(simd, out, pulp::cast(v))
    }
    #[inline(always)]
    pub(crate) fn splat(simd: V3, v: f32) -> __m256 {
        simd.avx._mm256_set1_ps(v)
    }

    /// bf16 -> f32 for 8 lanes, in registers: zero-extend u16 -> u32, shift left 16.
    /// Exact (bf16 is the top half of an f32).
    #[inline(always)]
    pub(crate) fn widen_bf16(simd: V3, w: &[u16; 8]) -> __m256 {
        let h: __m128i = pulp::cast(*w);
        let u = simd.avx2._mm256_cvtepu16_epi32(h);
        simd.avx._mm256_castsi256_ps(simd.avx2._mm256_slli_epi32::<16>(u))
    }

    /// Fixed-order horizontal sum of 4 accumulators: ((a0+a1)+(a2+a3)) then
    /// pulp's lane tree. Same order everywhere so rows are reproducible.
    #[inline(always)]
    pub(crate) fn hsum4(simd: V3, a: [__m256; 4]) -> f32 {
        let s01 = simd.avx._mm256_add_ps(a[0], a[1]);
        let s23 = simd.avx._mm256_add_ps(a[2], a[3]);
        let s = simd.avx._mm256_add_ps(s01, s23);
        pulp::Simd::reduce_sum_f32s(simd, pulp::cast(s))
    }

    /// `sum a[i]*b[i]` with 4 independent f32x8 FMA accumulators (hides the
    /// 4-cycle FMA latency), then full 8-lane blocks into acc0, then a masked
    /// tail. Requires `a.len() == b.len()` (checked by callers).
    #[inline(always)]
    pub(crate) fn dot_v3(simd: V3, a: &[f32], b: &[f32]) -> f32 {
        debug_assert_eq!(a.len(), b.len());
        let (a8, at) = pulp::as_arrays::<8, f32>(a);
        let (b8, bt) = pulp::as_arrays::<8, f32>(&b[..a.len()]);
        let (a32, a8r) = pulp::as_arrays::<4, [f32; 8]>(a8);
        let (b32, b8r) = pulp::as_arrays::<4, [f32; 8]>(b8);
        let z = simd.avx._mm256_setzero_ps();
        let mut acc = [z; 4];
        for (x, y) in a32.iter().zip(b32) {
            for k in 0..4 {
                acc[k] = simd.fma._mm256_fmadd_ps(ld(&x[k]), ld(&y[k]), acc[k]);
            }
        }
        for (x, y) in a8r.iter().zip(b8r) {
            acc[0] = simd.fma._mm256_fmadd_ps(ld(x), ld(y), acc[0]);
        }
        if !at.is_empty() {
            acc[1] = simd.fma._mm256_fmadd_ps(ld_part(simd, at), ld_part(simd, bt), acc[1]);
        }
        hsum4(simd, acc)
    }

    /// `y += alpha * x` with FMA (one rounding per element).
    #[inline(always)]
    pub(crate) fn axpy_v3(simd: V3, alpha: f32, x: &[f32], y: &mut [f32]) {
        debug_assert_eq!(x.len(), y.len());
        let va = splat(simd, alpha);
        let (x8, xt) = pulp::as_arrays::<8, f32>(x);
        let (y8, yt) = pulp::as_arrays_mut::<8, f32>(y);
        for (xv, yv) in x8.iter().zip(y8.iter_mut()) {
            let r = simd.fma._mm256_fmadd_ps(va, ld(xv), ld(yv));
            st(yv, r);
        }
        if !xt.is_empty() {
            let r = simd.fma._mm256_fmadd_ps(va, ld_part(simd, xt), ld_part(simd, yt));
            st_part(simd, yt, r);
        }
    }

    // exp(x) constants. Range reduction x = n*ln2 + r, |r| <= ln2/2, with ln2
    // split in a short-mantissa high part (n*LN2_HI is exact) and a low part.
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4; // 0x3f318000, 9 significant bits
    const LN2_LO: f32 = -2.121_944_4e-4; // ln2 - LN2_HI
    /// Above ln(f32::MAX) the result is +inf.
    pub(crate) const EXP_HI: f32 = 88.722_83;
    /// Below ln(2^-150) the f32 result rounds to 0.
    pub(crate) const EXP_LO: f32 = -103.972_08;
    // Minimax coefficients for (e^r - 1 - r)/r^2 on [-ln2/2, ln2/2]
    // (the classic Cephes `expf` set, public domain).
    const P0: f32 = 1.987_569_1e-4;
    const P1: f32 = 1.398_199_9e-3;
    const P2: f32 = 8.333_452e-3;
    const P3: f32 = 4.166_579_6e-2;
    const P4: f32 = 1.666_666_5e-1;
    const P5: f32 = 0.5; // Cephes' 5.0000001201e-1 rounds to 0.5 in f32

    /// Vector `e^x` for 8 lanes, max error 1 ulp vs the f64 exp rounded to f32
    /// over the whole finite range (measured by `exp_v3_ulp_error`), exact
    /// handling of the edges: `-inf`/very negative -> 0, large -> +inf, NaN -> NaN.
    /// Subnormal results keep a single final rounding because 2^n is applied
    /// as two normal factors 2^(n/2) * 2^(n - n/2).
    #[inline(always)]
    pub(crate) fn exp_v3(simd: V3, x: __m256) -> __m256 {
        let (avx, avx2, fma) = (simd.avx, simd.avx2, simd.fma);
        let xc = avx._mm256_min_ps(avx._mm256_max_ps(x, splat(simd, EXP_LO)), splat(simd, EXP_HI));
        let n = avx._mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            avx._mm256_mul_ps(xc, splat(simd, LOG2E)),
        );
        let r = fma._mm256_fnmadd_ps(n, splat(simd, LN2_HI), xc);
        let r = fma._mm256_fnmadd_ps(n, splat(simd, LN2_LO), r);
        let mut p = splat(simd, P0);
        for c in [P1, P2, P3, P4, P5] {
            p = fma._mm256_fmadd_ps(p, r, splat(simd, c));
        }
        let r2 = avx._mm256_mul_ps(r, r);
        let y = avx._mm256_add_ps(fma._mm256_fmadd_ps(p, r2, r), splat(simd, 1.0));
        // n in [-150, 128]: split so each power of two is a normal float.
        let ni = avx._mm256_cvtps_epi32(n);
        let n1 = avx2._mm256_srai_epi32::<1>(ni);
        let n2 = avx2._mm256_sub_epi32(ni, n1);
        let bias = avx._mm256_set1_epi32(127);
        let s1 = avx._mm256_castsi256_ps(avx2._mm256_slli_epi32::<23>(avx2._mm256_add_epi32(n1, bias)));
        let s2 = avx._mm256_castsi256_ps(avx2._mm256_slli_epi32::<23>(avx2._mm256_add_epi32(n2, bias)));
        let mut res = avx._mm256_mul_ps(avx._mm256_mul_ps(y, s1), s2);
        let big = avx._mm256_cmp_ps::<_CMP_GT_OQ>(x, splat(simd, EXP_HI));
        res = avx._mm256_blendv_ps(res, splat(simd, f32::INFINITY), big);
        let small = avx._mm256_cmp_ps::<_CMP_LT_OQ>(x, splat(simd, EXP_LO));
        res = avx._mm256_blendv_ps(res, avx._mm256_setzero_ps(), small);
        let nan = avx._mm256_cmp_ps::<_CMP_UNORD_Q>(x, x);
        avx._mm256_blendv_ps(res, x, nan)
    }

    // ---- F16C (std::arch; pulp's V3 token does not cover f16c) ----

    /// f16 row dot product, same accumulator structure as [`dot_v3`].
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C (check [`super::has_f16c`]).
    #[target_feature(enable = "avx,avx2,fma,f16c")]
    pub(crate) unsafe fn dot_f16_f16c(w: &[u16], x: &[f32]) -> f32 {
        debug_assert_eq!(w.len(), x.len());
        let n = w.len().min(x.len());
        let wp = w.as_ptr();
        let xp = x.as_ptr();
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (k, a) in acc.iter_mut().enumerate() {
                let o = i + 8 * k;
                debug_assert!(o + 8 <= n);
                let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(o).cast()));
                *a = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(o)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(wp.add(i).cast()));
            acc[0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xp.add(i)), acc[0]);
            i += 8;
        }
        if i < n {
            // Tail of < 8 lanes: zero-padded copies (once per row, not in the hot loop).
            let mut wt = [0u16; 8];
            let mut xt = [0f32; 8];
            wt[..n - i].copy_from_slice(&w[i..n]);
            xt[..n - i].copy_from_slice(&x[i..n]);
            let wv = _mm256_cvtph_ps(_mm_loadu_si128(wt.as_ptr().cast()));
            acc[1] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xt.as_ptr()), acc[1]);
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        // Same lane tree as pulp's reduce_sum_f32s: (lo128 + hi128), then pairs.
        let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
        let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let r = _mm_add_ss(h, _mm_shuffle_ps::<0b0001>(h, h));
        _mm_cvtss_f32(r)
    }

    /// Widen f16 bits to f32 (exact).
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C (check [`super::has_f16c`]).
    #[target_feature(enable = "avx,avx2,fma,f16c")]
    pub(crate) unsafe fn widen_f16_f16c(w: &[u16], out: &mut [f32]) {
        debug_assert_eq!(w.len(), out.len());
        let n = w.len().min(out.len());
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(w.as_ptr().add(i).cast()));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
            i += 8;
        }
        for k in i..n {
            out[k] = half::f16::from_bits(w[k]).to_f32();
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::x86::*;
    use super::*;
    use core::arch::x86_64::__m256;

    struct ExpOp<'a>(V3, &'a [f32], &'a mut [f32]);
    impl pulp::NullaryFnOnce for ExpOp<'_> {
        type Output = ();
        #[inline(always)]
        fn call(self) {
            let ExpOp(simd, x, y) = self;
            for (xs, ys) in x.chunks(8).zip(y.chunks_mut(8)) {
                let v: __m256 = ld_part(simd, xs);
                st_part(simd, ys, exp_v3(simd, v));
            }
        }
    }

    fn exp_vec(x: &[f32]) -> Option<Vec<f32>> {
        let simd = v3()?;
        let mut y = vec![0.0; x.len()];
        simd.vectorize(ExpOp(simd, x, &mut y));
        Some(y)
    }

    /// ulp distance between two non-negative finite floats (or equal infs).
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    /// Sweep every 97th f32 bit pattern in [EXP_LO, EXP_HI] (23M inputs,
    /// all binades) against the f64 exp rounded to f32. Bound: <= 1 ulp,
    /// subnormal results included (with STEP = 3, 747M inputs, max was 1 ulp).
    #[test]
    fn exp_v3_ulp_error() {
        const STEP: usize = 97;
        let mut xs = Vec::new();
        for bits in (0u32..0x8000_0000).step_by(STEP) {
            for sign in [0u32, 0x8000_0000] {
                let x = f32::from_bits(bits | sign);
                if (EXP_LO..=EXP_HI).contains(&x) {
                    xs.push(x);
                }
            }
        }
        xs.extend([EXP_LO, EXP_HI, 0.0, -0.0, 1.0, -1.0, -87.33655, -88.0, 88.0]);
        let Some(ys) = exp_vec(&xs) else { return };
        let mut worst = (0u32, 0.0f32);
        for (&x, &y) in xs.iter().zip(&ys) {
            let want = (x as f64).exp() as f32;
            let u = ulps(y, want);
            if u > worst.0 {
                worst = (u, x);
            }
        }
        eprintln!("exp_v3: {} inputs, max error {} ulp at x = {:e}", xs.len(), worst.0, worst.1);
        assert!(worst.0 <= 1, "exp_v3 error {} ulp at x={:e}", worst.0, worst.1);
    }

    #[test]
    fn exp_v3_edges() {
        let xs = [
            f32::NEG_INFINITY,
            -1e30,
            -104.0,
            EXP_HI,
            88.72285,
            100.0,
            f32::INFINITY,
            f32::NAN,
        ];
        let Some(ys) = exp_vec(&xs) else { return };
        assert_eq!(ys[0], 0.0);
        assert_eq!(ys[1], 0.0);
        assert_eq!(ys[2], 0.0);
        assert!(ys[3].is_finite() && ys[3] > 3.4e38);
        assert_eq!(ys[4], f32::INFINITY);
        assert_eq!(ys[5], f32::INFINITY);
        assert_eq!(ys[6], f32::INFINITY);
        assert!(ys[7].is_nan());
    }
}
