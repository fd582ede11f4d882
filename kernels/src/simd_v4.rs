//! AVX-512 (x86-64-v4) building blocks, through `std::arch`.
//!
//! pulp's `V4` token needs its `x86-v4` cargo feature, and cargo unifies features across the
//! workspace: turning it on would also switch faer and the crate's own `pulp::Arch` loops to
//! AVX-512 and change their bits. So the V4 kernels use `std::arch` directly:
//! - every function that executes AVX-512 instructions carries
//!   `#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]`
//!   (the same list everywhere, [`V4::try_new`] checks exactly these);
//! - such a function is safe to call from another one with the same features; from ordinary
//!   code it is called in an `unsafe` block right after [`super::v4`] returned a token, which
//!   proves the features at run time;
//! - trait methods cannot carry `#[target_feature]`, so the few that load weights take the
//!   [`V4`] token as their proof, are `#[inline(always)]`, and are only called from V4
//!   functions;
//! - memory is touched only through fixed-size arrays (`&[f32; 16]`) or through AVX-512 masked
//!   loads and stores whose mask covers exactly the slice (masked-off lanes never fault).

use core::arch::x86_64::*;

/// Proof that the CPU supports AVX-512F/BW/VL/DQ, AVX2, FMA and F16C. Constructed only by
/// [`V4::try_new`], after the run-time check.
#[derive(Clone, Copy, Debug)]
pub(crate) struct V4 {
    _private: (),
}

impl V4 {
    /// The token, if the CPU has every feature the V4 functions enable (std caches CPUID).
    #[inline]
    pub(crate) fn try_new() -> Option<V4> {
        let ok = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq")
            && is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        ok.then_some(V4 { _private: () })
    }
}

/// Mask of the first `n <= 16` lanes.
#[inline(always)]
pub(crate) fn mask16(n: usize) -> __mmask16 {
    debug_assert!(n <= 16);
    ((1u32 << n) - 1) as __mmask16
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn ld(a: &[f32; 16]) -> __m512 {
    // SAFETY: `a` is 16 readable floats.
    unsafe { _mm512_loadu_ps(a.as_ptr()) }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn st(out: &mut [f32; 16], v: __m512) {
    // SAFETY: `out` is 16 writable floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) }
}

/// Masked load of `a.len() <= 16` floats, `fill` in the unused lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn ld_part_or(a: &[f32], fill: f32) -> __m512 {
    // SAFETY: the mask covers exactly a.len() <= 16 lanes; masked-off lanes are not accessed.
    unsafe { _mm512_mask_loadu_ps(_mm512_set1_ps(fill), mask16(a.len()), a.as_ptr()) }
}

/// Masked load of `a.len() <= 16` floats, zero in the unused lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn ld_part(a: &[f32]) -> __m512 {
    // SAFETY: as in `ld_part_or`.
    unsafe { _mm512_maskz_loadu_ps(mask16(a.len()), a.as_ptr()) }
}

/// Masked store of the first `out.len() <= 16` lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn st_part(out: &mut [f32], v: __m512) {
    // SAFETY: the mask covers exactly out.len() <= 16 lanes.
    unsafe { _mm512_mask_storeu_ps(out.as_mut_ptr(), mask16(out.len()), v) }
}

/// bf16 -> f32 for 16 lanes, in registers: zero-extend u16 -> u32, shift left 16 (exact).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn widen_bf16(w: &[u16; 16]) -> __m512 {
    // SAFETY: `w` is 32 readable bytes.
    let h = unsafe { _mm256_loadu_si256(w.as_ptr().cast()) };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// bf16 -> f32 of `w.len() <= 16` weights, zero in the unused lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn widen_bf16_part(w: &[u16]) -> __m512 {
    // SAFETY: the mask covers exactly w.len() <= 16 u16 lanes (AVX512BW+VL masked load).
    let h = unsafe { _mm256_maskz_loadu_epi16(mask16(w.len()), w.as_ptr().cast()) };
    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
}

/// f16 -> f32 for 16 lanes (`vcvtph2ps`, exact).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn widen_f16(w: &[u16; 16]) -> __m512 {
    // SAFETY: `w` is 32 readable bytes.
    _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(w.as_ptr().cast()) })
}

/// f16 -> f32 of `w.len() <= 16` weights, zero in the unused lanes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn widen_f16_part(w: &[u16]) -> __m512 {
    // SAFETY: the mask covers exactly w.len() <= 16 u16 lanes.
    _mm512_cvtph_ps(unsafe { _mm256_maskz_loadu_epi16(mask16(w.len()), w.as_ptr().cast()) })
}

/// Fixed-order sum of 16 lanes: (low 8 + high 8), then the 8-lane tree of pulp's V3
/// `reduce_sum_f32s` ((low 4 + high 4), then pairs). Same order everywhere, so a row's result
/// never depends on where it sits.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn reduce_sum(v: __m512) -> f32 {
    let s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
    let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    let r = _mm_add_ss(h, _mm_shuffle_ps::<0b0001>(h, h));
    _mm_cvtss_f32(r)
}

/// Sum of 4 accumulators, ((a0+a1)+(a2+a3)), then [`reduce_sum`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn hsum4(a: [__m512; 4]) -> f32 {
    let s = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    reduce_sum(s)
}

/// Max of 16 lanes (exact; ignores nothing: callers keep NaN out of the accumulator).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn reduce_max(v: __m512) -> f32 {
    let s = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
    let q = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps::<1>(s));
    let h = _mm_max_ps(q, _mm_movehl_ps(q, q));
    let r = _mm_max_ss(h, _mm_shuffle_ps::<0b0001>(h, h));
    _mm_cvtss_f32(r)
}

// exp(x): the algorithm and constants of `x86::exp_v3`, operation for operation, so each lane
// is bit-identical to the 8-lane version (every step is an IEEE lane-wise operation).
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_HI: f32 = super::x86::EXP_HI;
const EXP_LO: f32 = super::x86::EXP_LO;
const P: [f32; 6] = [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 0.5];

/// Vector `e^x` for 16 lanes, bit-identical per lane to `x86::exp_v3` (max error 1 ulp; edges:
/// very negative -> 0, large -> +inf, NaN -> NaN).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
pub(crate) fn exp(x: __m512) -> __m512 {
    let xc = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        xc,
        _mm512_set1_ps(LOG2E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), xc);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    // n in [-150, 128]: 2^n applied as two normal factors (one final rounding for subnormals).
    let ni = _mm512_cvtps_epi32(n);
    let n1 = _mm512_srai_epi32::<1>(ni);
    let n2 = _mm512_sub_epi32(ni, n1);
    let bias = _mm512_set1_epi32(127);
    let s1 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n1, bias)));
    let s2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(n2, bias)));
    let mut res = _mm512_mul_ps(_mm512_mul_ps(y, s1), s2);
    let big = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, _mm512_set1_ps(EXP_HI));
    res = _mm512_mask_blend_ps(big, res, _mm512_set1_ps(f32::INFINITY));
    let small = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(EXP_LO));
    res = _mm512_mask_blend_ps(small, res, _mm512_setzero_ps());
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_mask_blend_ps(nan, res, x)
}

/// Applies [`exp`] to `x` (any length; 16 lanes at a time, masked tail).
#[cfg(test)]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
pub(crate) fn exp_slice(x: &[f32], y: &mut [f32]) {
    for (xs, ys) in x.chunks(16).zip(y.chunks_mut(16)) {
        st_part(ys, exp(ld_part(xs)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// exp for 16 lanes is bit-identical to the 8-lane exp_v3 over every 97th f32 bit pattern
    /// of the clamped range plus the edges (exp_v3 itself is checked against f64 in simd.rs).
    #[test]
    fn exp_v4_bit_identical_to_v3() {
        let (Some(_), Some(v3)) = (V4::try_new(), pulp::x86::V3::try_new()) else {
            eprintln!("skipped: no AVX-512 on this CPU");
            return;
        };
        let mut xs: Vec<f32> = (0u32..0x8000_0000)
            .step_by(97)
            .flat_map(|b| [f32::from_bits(b), f32::from_bits(b | 0x8000_0000)])
            .filter(|x| (-110.0..=100.0).contains(x))
            .collect();
        xs.extend([f32::NEG_INFINITY, f32::INFINITY, f32::NAN, EXP_HI, EXP_LO, -0.0, 0.0]);
        let mut y4 = vec![0.0; xs.len()];
        // SAFETY: V4::try_new() succeeded.
        unsafe { exp_slice(&xs, &mut y4) };
        struct Op<'a>(pulp::x86::V3, &'a [f32], &'a mut [f32]);
        impl pulp::NullaryFnOnce for Op<'_> {
            type Output = ();
            #[inline(always)]
            fn call(self) {
                let Op(simd, x, y) = self;
                for (xs, ys) in x.chunks(8).zip(y.chunks_mut(8)) {
                    super::super::x86::st_part(simd, ys, super::super::x86::exp_v3(simd, super::super::x86::ld_part(simd, xs)));
                }
            }
        }
        let mut y3 = vec![0.0; xs.len()];
        v3.vectorize(Op(v3, &xs, &mut y3));
        for (i, (a, b)) in y4.iter().zip(&y3).enumerate() {
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "x={:e}: {a:e} vs {b:e}", xs[i]);
        }
    }
}
