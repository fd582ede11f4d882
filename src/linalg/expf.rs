//! Vectorised `exp(x − shift)` over a row, with its sum — the inner loop of E = exp(S − μ)
//! (spec §3, step 2), which runs n·T times per head (16.7 M at n = T = 4096).
//!
//! libm's `expf` does not vectorise and costs ≈ 10 ns per call; the polynomial below (Cephes `expf`,
//! ≤ 2 ulp on the range that matters here) is compiled for the detected ISA through
//! [`pulp::Arch::dispatch`] (run-time dispatch, no `target-cpu`), so LLVM vectorises the plain loop.
//! The sum uses 8 independent f64 lanes in a fixed order: deterministic and exact enough for Z̃.

/// Naive twin of [`exp_shifted_inplace`]: libm `exp`, sequential f64 sum.
pub fn exp_shifted_ref(x: &mut [f32], shift: f32) -> f64 {
    let mut s = 0.0f64;
    for v in x.iter_mut() {
        *v = (*v - shift).exp();
        s += *v as f64;
    }
    s
}

/// `x[i] ← exp(x[i] − shift)`; returns Σ `x[i]` (after) accumulated in f64.
/// Arguments below −87.3 give exactly 0 (also for −inf), never a denormal or NaN.
pub fn exp_shifted_inplace(x: &mut [f32], shift: f32) -> f64 {
    // A struct with an `#[inline(always)]` body, not a closure: pulp only compiles the body for
    // the detected ISA when it is inlined into its target-feature wrapper (closures were not, and
    // ran 2× slower).
    struct Op<'a>(&'a mut [f32], f32);
    impl pulp::WithSimd for Op<'_> {
        type Output = f64;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _simd: S) -> f64 {
            exp_shifted_body(self.0, self.1)
        }
    }
    pulp::Arch::new().dispatch(Op(x, shift))
}

/// One row of E: `x[i] ← exp(x[i] + bias[i] − μ)` with μ = `max_i (x[i] + bias[i])`; returns
/// (μ, Σ exp) with the sum in f64. Same kernel as [`exp_shifted_inplace`], fused with the bias add
/// and a vectorised max so the row is read from L1 instead of memory.
pub fn row_softmax_stats(x: &mut [f32], bias: Option<&[f32]>) -> (f32, f64) {
    struct Op<'a>(&'a mut [f32], Option<&'a [f32]>);
    impl pulp::WithSimd for Op<'_> {
        type Output = (f32, f64);
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _simd: S) -> (f32, f64) {
            let (x, bias) = (self.0, self.1);
            if let Some(b) = bias {
                for (v, &bb) in x.iter_mut().zip(b) {
                    *v += bb;
                }
            }
            let mut m = [f32::NEG_INFINITY; 16];
            let mut chunks = x.chunks_exact(16);
            for ch in &mut chunks {
                for l in 0..16 {
                    m[l] = m[l].max(ch[l]);
                }
            }
            let mut mu = chunks.remainder().iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
            for v in m {
                mu = mu.max(v);
            }
            (mu, exp_shifted_body(x, mu))
        }
    }
    pulp::Arch::new().dispatch(Op(x, bias))
}

#[inline(always)]
fn exp_shifted_body(x: &mut [f32], shift: f32) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = x.chunks_exact_mut(8);
    for ch in &mut chunks {
        for l in 0..8 {
            let e = expf_poly(ch[l] - shift);
            ch[l] = e;
            acc[l] += e as f64;
        }
    }
    for (l, v) in chunks.into_remainder().iter_mut().enumerate() {
        let e = expf_poly(*v - shift);
        *v = e;
        acc[l] += e as f64;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// Cephes `expf`: range reduction by ln 2 in two parts, degree-6 polynomial, scale by 2ⁿ through
/// the exponent bits. Branch-free so that it vectorises.
#[inline(always)]
pub fn expf_poly(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const C1: f32 = 0.693_359_4;
    const C2: f32 = -2.121_944_4e-4;
    let under = x < -87.3;
    let xc = x.clamp(-87.3, 88.3);
    let n = (xc * LOG2E + 0.5).floor();
    let r = xc - n * C1 - n * C2;
    let z = r * r;
    let mut y = 1.987_569_1e-4f32;
    y = y * r + 1.398_199_9e-3;
    y = y * r + 8.333_452e-3;
    y = y * r + 4.166_579_6e-2;
    y = y * r + 1.666_666_5e-1;
    y = y * r + 0.5; // Cephes 5.0000001201e-1, which is exactly 0.5 in f32
    y = y * z + r + 1.0;
    let pow2 = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let v = y * pow2;
    if under {
        0.0
    } else {
        v
    }
}

/// f64 `exp` without libm: Cody–Waite reduction x = n·ln 2 + r (|r| ≤ ln 2 / 2, n·ln2_hi exact),
/// Taylor series of degree 13 for e^r (truncation < 4e-18 relative), scale by 2ⁿ through the
/// exponent bits. Within 2 ulp of the true value on [−708.3, 709.7]; below that it gives exactly 0
/// (the true value is subnormal or 0), above it +inf. Branch-free, so loops over it vectorise.
#[inline(always)]
pub fn exp_f64_poly(x: f64) -> f64 {
    const LOG2E: f64 = std::f64::consts::LOG2_E;
    // ln 2 split so that n·LN2_HI is exact for |n| < 2¹¹ (LN2_HI has 32 trailing zero bits).
    const LN2_HI: f64 = f64::from_bits(0x3fe6_2e42_fee0_0000); // 6.93147180369123816490e-01
    const LN2_LO: f64 = f64::from_bits(0x3dea_39ef_3579_3c76); // 1.90821492927058770002e-10
    let under = x < -708.3;
    let over = x > 709.7;
    let xc = x.clamp(-708.3, 709.7);
    let n = (xc * LOG2E).round_ties_even();
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    // Horner from 1/13! down to 1/1!, then + 1.
    let mut y = 1.0 / 6_227_020_800.0;
    y = y * r + 1.0 / 479_001_600.0;
    y = y * r + 1.0 / 39_916_800.0;
    y = y * r + 1.0 / 3_628_800.0;
    y = y * r + 1.0 / 362_880.0;
    y = y * r + 1.0 / 40_320.0;
    y = y * r + 1.0 / 5_040.0;
    y = y * r + 1.0 / 720.0;
    y = y * r + 1.0 / 120.0;
    y = y * r + 1.0 / 24.0;
    y = y * r + 1.0 / 6.0;
    y = y * r + 0.5;
    y = y * r + 1.0;
    y = y * r + 1.0;
    // 2ⁿ for n in [−1022, 1023]: the reduction keeps n inside it.
    let pow2 = f64::from_bits(((n as i64 + 1023) as u64) << 52);
    let v = y * pow2;
    if under {
        0.0
    } else if over {
        f64::INFINITY
    } else {
        v
    }
}

/// One row of a softmax in f64, in place: `x[i] ← exp(x[i] + bias[i] − max) / Σ` (bias None: 0),
/// with [`exp_f64_poly`] compiled for the detected ISA. The sum runs over 4 lanes in a fixed order.
pub fn softmax_row_f64(x: &mut [f64], bias: Option<&[f32]>) {
    struct Op<'a>(&'a mut [f64], Option<&'a [f32]>);
    impl pulp::WithSimd for Op<'_> {
        type Output = ();
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _simd: S) {
            let (x, bias) = (self.0, self.1);
            if let Some(b) = bias {
                for (v, &bb) in x.iter_mut().zip(b) {
                    *v += bb as f64;
                }
            }
            let mut m = [f64::NEG_INFINITY; 8];
            let mut chunks = x.chunks_exact(8);
            for ch in &mut chunks {
                for l in 0..8 {
                    m[l] = m[l].max(ch[l]);
                }
            }
            let mx = m.iter().chain(chunks.remainder()).fold(f64::NEG_INFINITY, |a, &v| a.max(v));
            let inv = 1.0 / exp_shift_sum_f64_body(x, mx);
            x.iter_mut().for_each(|v| *v *= inv);
        }
    }
    pulp::Arch::new().dispatch(Op(x, bias))
}

/// `x[i] ← exp(x[i] − shift)` in f64 with [`exp_f64_poly`]; returns Σ over 4 lanes in a fixed order.
pub fn exp_shift_sum_f64(x: &mut [f64], shift: f64) -> f64 {
    struct Op<'a>(&'a mut [f64], f64);
    impl pulp::WithSimd for Op<'_> {
        type Output = f64;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _simd: S) -> f64 {
            exp_shift_sum_f64_body(self.0, self.1)
        }
    }
    pulp::Arch::new().dispatch(Op(x, shift))
}

#[inline(always)]
fn exp_shift_sum_f64_body(x: &mut [f64], mx: f64) -> f64 {
    let mut acc = [0.0f64; 4];
    let mut chunks = x.chunks_exact_mut(4);
    for ch in &mut chunks {
        for l in 0..4 {
            let e = exp_f64_poly(ch[l] - mx);
            ch[l] = e;
            acc[l] += e;
        }
    }
    for (l, v) in chunks.into_remainder().iter_mut().enumerate() {
        let e = exp_f64_poly(*v - mx);
        *v = e;
        acc[l] += e;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}

/// Naive twin of [`softmax_row_f64`]: libm `exp`, sequential sum.
pub fn softmax_row_f64_ref(x: &mut [f64], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        x.iter_mut().zip(b).for_each(|(v, &bb)| *v += bb as f64);
    }
    let mx = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let mut s = 0.0;
    for v in x.iter_mut() {
        *v = (*v - mx).exp();
        s += *v;
    }
    x.iter_mut().for_each(|v| *v /= s);
}

/// f64 twin for the golden-precision path: libm `exp`, 4-lane f64 sum.
pub fn exp_shifted_inplace_f64(x: &mut [f64], shift: f64) -> f64 {
    let mut acc = [0.0f64; 4];
    for (i, v) in x.iter_mut().enumerate() {
        *v = (*v - shift).exp();
        acc[i % 4] += *v;
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3])
}
