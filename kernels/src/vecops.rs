//! BLAS-1 style kernels: `dot`, `axpy`.

#[cfg(target_arch = "x86_64")]
use crate::simd::{v3, x86};

/// Naive twin of [`dot`]: one sequential f32 sum.
pub fn dot_ref(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: length mismatch");
    let mut s = 0.0f32;
    for i in 0..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Inner product `sum_i a[i]*b[i]`, accumulated in f32.
///
/// AVX2 path: 4 f32x8 FMA accumulators + masked tail, fixed reduction order,
/// so the result depends only on the inputs (not on threads or alignment).
/// It differs from [`dot_ref`] by rounding only (different summation order).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = v3() {
        struct Op<'a>(x86::V3, &'a [f32], &'a [f32]);
        impl pulp::NullaryFnOnce for Op<'_> {
            type Output = f32;
            #[inline(always)]
            fn call(self) -> f32 {
                x86::dot_v3(self.0, self.1, self.2)
            }
        }
        return simd.vectorize(Op(simd, a, b));
    }
    dot_ref(a, b)
}

/// Naive twin of [`axpy`]: separate multiply and add (two roundings).
pub fn axpy_ref(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: length mismatch");
    for i in 0..x.len() {
        y[i] += alpha * x[i];
    }
}

/// `y += alpha * x`. The AVX2 path fuses the multiply-add (one rounding), so
/// it differs from [`axpy_ref`] by at most about 1 ulp of `|alpha*x| + |y|`.
pub fn axpy(alpha: f32, x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "axpy: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = v3() {
        struct Op<'a>(x86::V3, f32, &'a [f32], &'a mut [f32]);
        impl pulp::NullaryFnOnce for Op<'_> {
            type Output = ();
            #[inline(always)]
            fn call(self) {
                x86::axpy_v3(self.0, self.1, self.2, self.3)
            }
        }
        return simd.vectorize(Op(simd, alpha, x, y));
    }
    axpy_ref(alpha, x, y)
}
