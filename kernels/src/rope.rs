//! Rotary position embedding, HF "rotate half" layout (not interleaved pairs).

#[cfg(target_arch = "x86_64")]
use crate::simd::{v3, x86};

fn check(x: &[f32], cos: &[f32], sin: &[f32]) -> usize {
    let h = x.len() / 2;
    assert!(
        x.len() % 2 == 0 && cos.len() >= h && sin.len() >= h,
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
