//! RMSNorm (Llama / HF `LlamaRMSNorm` order of operations).

#[cfg(target_arch = "x86_64")]
use crate::simd::{v3, x86};

fn check(out: &[f32], x: &[f32], weight: &[f32]) {
    assert!(
        out.len() == x.len() && weight.len() == x.len(),
        "rmsnorm: out {} x {} weight {} must be equal",
        out.len(),
        x.len(),
        weight.len()
    );
}

/// `1/sqrt(mean + eps)` from a sum of squares; shared so both paths round alike.
#[inline(always)]
fn inv_rms(sum_sq: f32, n: usize, eps: f32) -> f32 {
    1.0 / (sum_sq / n.max(1) as f32 + eps).sqrt()
}

/// Naive twin of [`rmsnorm`].
pub fn rmsnorm_ref(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    check(out, x, weight);
    let mut ss = 0.0f32;
    for &v in x {
        ss += v * v;
    }
    let inv = inv_rms(ss, x.len(), eps);
    for i in 0..x.len() {
        out[i] = weight[i] * (x[i] * inv);
    }
}

/// `out[i] = weight[i] * (x[i] * rsqrt(mean(x^2) + eps))`, HF order: normalise
/// first, then scale by the weight. Only the sum of squares differs from
/// [`rmsnorm_ref`] (4-accumulator order); the elementwise part is bit-identical.
pub fn rmsnorm(out: &mut [f32], x: &[f32], weight: &[f32], eps: f32) {
    check(out, x, weight);
    #[cfg(target_arch = "x86_64")]
    if let Some(simd) = v3() {
        struct Op<'a>(x86::V3, &'a mut [f32], &'a [f32], &'a [f32], f32);
        impl pulp::NullaryFnOnce for Op<'_> {
            type Output = ();
            #[inline(always)]
            fn call(self) {
                let Op(simd, out, x, w, eps) = self;
                let inv = inv_rms(x86::dot_v3(simd, x, x), x.len(), eps);
                let vinv = x86::splat(simd, inv);
                let (x8, xt) = pulp::as_arrays::<8, f32>(x);
                let (w8, wt) = pulp::as_arrays::<8, f32>(w);
                let (o8, ot) = pulp::as_arrays_mut::<8, f32>(out);
                for ((xv, wv), ov) in x8.iter().zip(w8).zip(o8.iter_mut()) {
                    let nx = simd.avx._mm256_mul_ps(x86::ld(xv), vinv);
                    x86::st(ov, simd.avx._mm256_mul_ps(x86::ld(wv), nx));
                }
                if !xt.is_empty() {
                    let nx = simd.avx._mm256_mul_ps(x86::ld_part(simd, xt), vinv);
                    let r = simd.avx._mm256_mul_ps(x86::ld_part(simd, wt), nx);
                    x86::st_part(simd, ot, r);
                }
            }
        }
        return simd.vectorize(Op(simd, out, x, weight, eps));
    }
    rmsnorm_ref(out, x, weight, eps)
}
