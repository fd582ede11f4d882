//! Softmax, SiLU-gate, argmax.

#[cfg(target_arch = "x86_64")]
use crate::simd::{v3, v4, x86, x86v4};
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

/// Naive twin of [`softmax_inplace`]; uses libm `exp`.
pub fn softmax_inplace_ref(x: &mut [f32]) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        // empty, all -inf (fully masked) or all NaN: no mass anywhere.
        x.fill(0.0);
        return;
    }
    let mut s = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Numerically stable softmax in place: `x[i] = exp(x[i]-max) / sum`.
/// If the max is `-inf` (empty or fully masked row) the row becomes zeros,
/// never NaN. NaN entries are ignored by the max.
///
/// AVX2 path: vector exp (<= 1 ulp, see `simd::x86::exp_v3`) and an 8-lane
/// sum, so it matches [`softmax_inplace_ref`] to a few ulp per element. The
/// AVX-512 path uses the same exp (bit-identical per lane) and a 16-lane sum.
pub fn softmax_inplace(x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if v4().is_some() {
        // SAFETY: v4() proved the V4 features at run time.
        return unsafe { softmax_v4(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = v3() {
        struct Op<'a>(x86::V3, &'a mut [f32]);
        impl pulp::NullaryFnOnce for Op<'_> {
            type Output = ();
            #[inline(always)]
            fn call(self) {
                softmax_v3(self.0, self.1)
            }
        }
        return simd.vectorize(Op(simd, x));
    }
    softmax_inplace_ref(x)
}

/// Naive twin of [`exp_shift_sum`]; uses libm `exp`.
pub fn exp_shift_sum_ref(x: &mut [f32]) -> (f32, f32) {
    let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if m == f32::NEG_INFINITY {
        x.fill(0.0);
        return (m, 0.0);
    }
    let mut s = 0.0f32;
    for v in x.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    (m, s)
}

/// Unnormalised softmax for blockwise (flash-style) attention: `x[i] = exp(x[i] - max)`,
/// returning `(max, sum)`. Blocks are merged later by rescaling with `exp(max_b - max)`.
/// A row whose max is `-inf` becomes zeros and returns `(-inf, 0)`. Same exp and summation
/// as [`softmax_inplace`] (which is this followed by a scale by `1/sum`).
pub fn exp_shift_sum(x: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if v4().is_some() {
        // SAFETY: v4() proved the V4 features at run time.
        return unsafe { exp_shift_v4(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = v3() {
        struct Op<'a>(x86::V3, &'a mut [f32]);
        impl pulp::NullaryFnOnce for Op<'_> {
            type Output = (f32, f32);
            #[inline(always)]
            fn call(self) -> (f32, f32) {
                exp_shift_v3(self.0, self.1)
            }
        }
        return simd.vectorize(Op(simd, x));
    }
    exp_shift_sum_ref(x)
}

/// Max ignoring NaN: `max_ps(v, acc)` returns `acc` when `v` is NaN.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn max_no_nan_v3(simd: x86::V3, x: &[f32]) -> f32 {
    let avx = simd.avx;
    let (x8, xt) = pulp::as_arrays::<8, f32>(x);
    let (x16, x8r) = pulp::as_arrays::<2, [f32; 8]>(x8);
    let ninf = x86::splat(simd, f32::NEG_INFINITY);
    let (mut a0, mut a1) = (ninf, ninf);
    for [p, q] in x16 {
        a0 = avx._mm256_max_ps(x86::ld(p), a0);
        a1 = avx._mm256_max_ps(x86::ld(q), a1);
    }
    for p in x8r {
        a0 = avx._mm256_max_ps(x86::ld(p), a0);
    }
    let a = avx._mm256_max_ps(a0, a1);
    let mut m = pulp::Simd::reduce_max_f32s(simd, pulp::cast(a));
    for &v in xt {
        if v > m {
            m = v;
        }
    }
    m
}

/// AVX2 softmax body; also used row by row by the attention kernel.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn softmax_v3(simd: x86::V3, x: &mut [f32]) {
    let (m, s) = exp_shift_v3(simd, x);
    if m == f32::NEG_INFINITY {
        return;
    }
    let avx = simd.avx;
    let (x8, xt) = pulp::as_arrays_mut::<8, f32>(x);
    let inv = 1.0 / s;
    let vinv = x86::splat(simd, inv);
    for v in x8.iter_mut() {
        x86::st(v, avx._mm256_mul_ps(x86::ld(v), vinv));
    }
    for v in xt.iter_mut() {
        *v *= inv;
    }
}

/// AVX2 body of [`exp_shift_sum`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn exp_shift_v3(simd: x86::V3, x: &mut [f32]) -> (f32, f32) {
    let avx = simd.avx;
    let m = max_no_nan_v3(simd, x);
    if m == f32::NEG_INFINITY {
        x.fill(0.0);
        return (m, 0.0);
    }
    let vm = x86::splat(simd, m);
    let (x8, xt) = pulp::as_arrays_mut::<8, f32>(x);
    let mut acc = avx._mm256_setzero_ps();
    for v in x8.iter_mut() {
        let e = x86::exp_v3(simd, avx._mm256_sub_ps(x86::ld(v), vm));
        x86::st(v, e);
        acc = avx._mm256_add_ps(acc, e);
    }
    if !xt.is_empty() {
        // Pad with -inf so the unused lanes contribute exp(-inf) = 0.
        let mut buf = [f32::NEG_INFINITY; 8];
        buf[..xt.len()].copy_from_slice(xt);
        let e = x86::exp_v3(simd, avx._mm256_sub_ps(x86::ld(&buf), vm));
        x86::st(&mut buf, e);
        xt.copy_from_slice(&buf[..xt.len()]);
        acc = avx._mm256_add_ps(acc, e);
    }
    (m, pulp::Simd::reduce_sum_f32s(simd, pulp::cast(acc)))
}

/// Max ignoring NaN, 16 lanes: `max(v, acc)` returns `acc` when `v` is NaN; the tail is
/// padded with `-inf`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
#[inline]
fn max_no_nan_v4(x: &[f32]) -> f32 {
    let (x16, xt) = pulp::as_arrays::<16, f32>(x);
    let (x32, x16r) = pulp::as_arrays::<2, [f32; 16]>(x16);
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let (mut a0, mut a1) = (ninf, ninf);
    for [p, q] in x32 {
        a0 = _mm512_max_ps(x86v4::ld(p), a0);
        a1 = _mm512_max_ps(x86v4::ld(q), a1);
    }
    for p in x16r {
        a0 = _mm512_max_ps(x86v4::ld(p), a0);
    }
    a1 = _mm512_max_ps(x86v4::ld_part_or(xt, f32::NEG_INFINITY), a1);
    x86v4::reduce_max(_mm512_max_ps(a0, a1))
}

/// AVX-512 softmax body (16 lanes); also used row by row by the V4 attention kernel. Same
/// steps as [`softmax_v3`]; only the order of the sum differs.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
pub(crate) fn softmax_v4(x: &mut [f32]) {
    let (m, s) = exp_shift_v4(x);
    if m == f32::NEG_INFINITY {
        return;
    }
    let inv = 1.0 / s;
    let vinv = _mm512_set1_ps(inv);
    let (x16, xt) = pulp::as_arrays_mut::<16, f32>(x);
    for v in x16.iter_mut() {
        x86v4::st(v, _mm512_mul_ps(x86v4::ld(v), vinv));
    }
    for v in xt.iter_mut() {
        *v *= inv;
    }
}

/// AVX-512 body of [`exp_shift_sum`]: one 16-lane sum (tail padded with `-inf`, whose exp is 0),
/// then a fixed lane tree.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx,avx2,fma,f16c")]
pub(crate) fn exp_shift_v4(x: &mut [f32]) -> (f32, f32) {
    let m = max_no_nan_v4(x);
    if m == f32::NEG_INFINITY {
        x.fill(0.0);
        return (m, 0.0);
    }
    let vm = _mm512_set1_ps(m);
    let (x16, xt) = pulp::as_arrays_mut::<16, f32>(x);
    let mut acc = _mm512_setzero_ps();
    for v in x16.iter_mut() {
        let e = x86v4::exp(_mm512_sub_ps(x86v4::ld(v), vm));
        x86v4::st(v, e);
        acc = _mm512_add_ps(acc, e);
    }
    if !xt.is_empty() {
        let e = x86v4::exp(_mm512_sub_ps(x86v4::ld_part_or(xt, f32::NEG_INFINITY), vm));
        x86v4::st_part(xt, e);
        acc = _mm512_add_ps(acc, e);
    }
    (m, x86v4::reduce_sum(acc))
}

/// Naive twin of [`silu_mul`]; uses libm `exp`.
pub fn silu_mul_ref(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: length mismatch");
    for i in 0..gate.len() {
        let g = gate[i];
        gate[i] = g / (1.0 + (-g).exp()) * up[i];
    }
}

/// `gate[i] = silu(gate[i]) * up[i]`, `silu(x) = x / (1 + exp(-x))`.
/// AVX2 path differs from [`silu_mul_ref`] only through the vector exp.
pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "silu_mul: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = v3() {
        struct Op<'a>(x86::V3, &'a mut [f32], &'a [f32]);
        impl pulp::NullaryFnOnce for Op<'_> {
            type Output = ();
            #[inline(always)]
            fn call(self) {
                let Op(simd, gate, up) = self;
                let (g8, gt) = pulp::as_arrays_mut::<8, f32>(gate);
                let (u8_, ut) = pulp::as_arrays::<8, f32>(up);
                for (g, u) in g8.iter_mut().zip(u8_) {
                    x86::st(g, silu_mul8(simd, x86::ld(g), x86::ld(u)));
                }
                if !gt.is_empty() {
                    let r = silu_mul8(simd, x86::ld_part(simd, gt), x86::ld_part(simd, ut));
                    x86::st_part(simd, gt, r);
                }
            }
        }
        return simd.vectorize(Op(simd, gate, up));
    }
    silu_mul_ref(gate, up)
}

/// Same operation order as the scalar twin: `g / (1 + e^-g) * u`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn silu_mul8(simd: x86::V3, g: __m256, u: __m256) -> __m256 {
    let avx = simd.avx;
    // -g by flipping the sign bit (exact, like scalar negation).
    let neg = avx._mm256_xor_ps(g, x86::splat(simd, -0.0));
    let e = x86::exp_v3(simd, neg);
    let den = avx._mm256_add_ps(x86::splat(simd, 1.0), e);
    avx._mm256_mul_ps(avx._mm256_div_ps(g, den), u)
}

/// Naive twin of [`argmax`].
pub fn argmax_ref(x: &[f32]) -> usize {
    let mut best = 0usize;
    let mut bv = f32::NEG_INFINITY;
    let mut found = false;
    for (i, &v) in x.iter().enumerate() {
        if v.is_nan() {
            continue;
        }
        if !found || v > bv {
            best = i;
            bv = v;
            found = true;
        }
    }
    best
}

/// Index of the first maximum; NaN entries are ignored; empty or all-NaN -> 0.
/// Exact (no rounding involved), so it always equals [`argmax_ref`].
/// AVX2 path: one pass for the NaN-ignoring max, one compare+movemask pass
/// for the first index holding it.
pub fn argmax(x: &[f32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = v3() {
        struct Op<'a>(x86::V3, &'a [f32]);
        impl pulp::NullaryFnOnce for Op<'_> {
            type Output = usize;
            #[inline(always)]
            fn call(self) -> usize {
                let Op(simd, x) = self;
                let m = max_no_nan_v3(simd, x);
                let vm = x86::splat(simd, m);
                let (x8, xt) = pulp::as_arrays::<8, f32>(x);
                for (k, v) in x8.iter().enumerate() {
                    let eq = simd.avx._mm256_cmp_ps::<_CMP_EQ_OQ>(x86::ld(v), vm);
                    let bits = simd.avx._mm256_movemask_ps(eq);
                    if bits != 0 {
                        return 8 * k + bits.trailing_zeros() as usize;
                    }
                }
                let base = 8 * x8.len();
                xt.iter().position(|&v| v == m).map_or(0, |p| base + p)
            }
        }
        return simd.vectorize(Op(simd, x));
    }
    argmax_ref(x)
}
