//! Rotary position embedding, HF "rotate half" layout (not interleaved pairs).

#[cfg(target_arch = "x86_64")]
use crate::simd::{v3, x86};

fn check(x: &[f32], cos: &[f32], sin: &[f32]) -> usize {
    let h = x.len() / 2;
    assert!(
        x.len().is_multiple_of(2) && cos.len() >= h && sin.len() >= h,
        "rope: head dim {} must be even and cos {} / sin {} >= d/2",
        x.len(),
        cos.len(),
        sin.len()
    );
    h
}

/// Naive twin of [`rope_rotate_half`].
pub fn rope_rotate_half_ref(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = check(x, cos, sin);
    for i in 0..h {
        let a = x[i];
        let b = x[i + h];
        x[i] = a * cos[i] - b * sin[i];
        x[i + h] = b * cos[i] + a * sin[i];
    }
}

/// Rotate one head in place. `x: [d]`, `cos, sin: [d/2]` (extra entries ignored).
/// For `i < h = d/2`: `(x[i], x[i+h]) <- (a*c - b*s, b*c + a*s)`.
/// The AVX2 path uses separate mul/sub/add (no FMA) so it is bit-identical
/// to [`rope_rotate_half_ref`].
pub fn rope_rotate_half(x: &mut [f32], cos: &[f32], sin: &[f32]) {
    let h = check(x, cos, sin);
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = v3() {
        struct Op<'a>(x86::V3, &'a mut [f32], &'a [f32], &'a [f32]);
        impl pulp::NullaryFnOnce for Op<'_> {
            type Output = ();
            #[inline(always)]
            fn call(self) {
                let Op(simd, x, cos, sin) = self;
                let h = x.len() / 2;
                let (lo, hi) = x.split_at_mut(h); // lo: [h] first half, hi: [h] second half
                let (lo8, lot) = pulp::as_arrays_mut::<8, f32>(lo);
                let (hi8, hit) = pulp::as_arrays_mut::<8, f32>(hi);
                let (c8, ct) = pulp::as_arrays::<8, f32>(&cos[..h]);
                let (s8, stl) = pulp::as_arrays::<8, f32>(&sin[..h]);
                for (((a, b), c), s) in lo8.iter_mut().zip(hi8.iter_mut()).zip(c8).zip(s8) {
                    let (na, nb) = rot(simd, x86::ld(a), x86::ld(b), x86::ld(c), x86::ld(s));
                    x86::st(a, na);
                    x86::st(b, nb);
                }
                if !lot.is_empty() {
                    let (na, nb) = rot(
                        simd,
                        x86::ld_part(simd, lot),
                        x86::ld_part(simd, hit),
                        x86::ld_part(simd, ct),
                        x86::ld_part(simd, stl),
                    );
                    x86::st_part(simd, lot, na);
                    x86::st_part(simd, hit, nb);
                }
            }
        }
        return simd.vectorize(Op(simd, x, cos, sin));
    }
    let _ = h;
    rope_rotate_half_ref(x, cos, sin)
}

/// One 8-lane rotation step, unfused so it rounds exactly like the scalar twin.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn rot(
    simd: x86::V3,
    a: core::arch::x86_64::__m256,
    b: core::arch::x86_64::__m256,
    c: core::arch::x86_64::__m256,
    s: core::arch::x86_64::__m256,
) -> (core::arch::x86_64::__m256, core::arch::x86_64::__m256) {
    let avx = simd.avx;
    let na = avx._mm256_sub_ps(avx._mm256_mul_ps(a, c), avx._mm256_mul_ps(b, s));
    let nb = avx._mm256_add_ps(avx._mm256_mul_ps(b, c), avx._mm256_mul_ps(a, s));
    (na, nb)
}

/// Naive twin of [`rope_dot`].
pub fn rope_dot_ref(q: &[f32], k: &[f32], cos: &[f32], sin: &[f32]) -> f32 {
    let h = check(k, cos, sin);
    assert_eq!(q.len(), k.len(), "rope_dot: q and k lengths differ");
    let mut s = 0.0f32;
    for i in 0..h {
        let (a, b) = (k[i], k[i + h]);
        s += q[i] * (a * cos[i] - b * sin[i]);
        s += q[i + h] * (b * cos[i] + a * sin[i]);
    }
    s
}

/// `<q, RoPE(k)>` with the rotation applied on read: `q, k: [d]`, `cos, sin: [d/2]` of k's
/// position. Slim attention caches pre-RoPE keys (V is rebuilt from them), so scoring rotates
/// each cached key as it is read instead of storing a rotated copy.
///
/// The AVX2 path rotates 8 pairs in registers and accumulates with FMA in two accumulators;
/// it differs from [`rope_dot_ref`] by rounding only.
pub fn rope_dot(q: &[f32], k: &[f32], cos: &[f32], sin: &[f32]) -> f32 {
    let h = check(k, cos, sin);
    assert_eq!(q.len(), k.len(), "rope_dot: q and k lengths differ");
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = v3() {
        struct Op<'a>(x86::V3, &'a [f32], &'a [f32], &'a [f32], &'a [f32]);
        impl pulp::NullaryFnOnce for Op<'_> {
            type Output = f32;
            #[inline(always)]
            fn call(self) -> f32 {
                let Op(simd, q, k, cos, sin) = self;
                let h = k.len() / 2;
                let (klo, khi) = k.split_at(h); // [h] each
                let (qlo, qhi) = q.split_at(h);
                let (kl8, klt) = pulp::as_arrays::<8, f32>(klo);
                let (kh8, kht) = pulp::as_arrays::<8, f32>(khi);
                let (ql8, qlt) = pulp::as_arrays::<8, f32>(qlo);
                let (qh8, qht) = pulp::as_arrays::<8, f32>(qhi);
                let (c8, ct) = pulp::as_arrays::<8, f32>(&cos[..h]);
                let (s8, stl) = pulp::as_arrays::<8, f32>(&sin[..h]);
                let z = simd.avx._mm256_setzero_ps();
                let (mut acc_lo, mut acc_hi) = (z, z);
                let mut step = |a, b, c, s, ql, qh| {
                    let (ra, rb) = rot(simd, a, b, c, s);
                    acc_lo = simd.fma._mm256_fmadd_ps(ql, ra, acc_lo);
                    acc_hi = simd.fma._mm256_fmadd_ps(qh, rb, acc_hi);
                };
                for i in 0..kl8.len() {
                    step(
                        x86::ld(&kl8[i]),
                        x86::ld(&kh8[i]),
                        x86::ld(&c8[i]),
                        x86::ld(&s8[i]),
                        x86::ld(&ql8[i]),
                        x86::ld(&qh8[i]),
                    );
                }
                if !klt.is_empty() {
                    step(
                        x86::ld_part(simd, klt),
                        x86::ld_part(simd, kht),
                        x86::ld_part(simd, ct),
                        x86::ld_part(simd, stl),
                        x86::ld_part(simd, qlt),
                        x86::ld_part(simd, qht),
                    );
                }
                x86::hsum4(simd, [acc_lo, acc_hi, z, z])
            }
        }
        return simd.vectorize(Op(simd, q, k, cos, sin));
    }
    let _ = h;
    rope_dot_ref(q, k, cos, sin)
}
