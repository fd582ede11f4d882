//! Differential tests: every fast kernel against its naive `*_ref` twin, plus
//! identities (softmax sums to 1, RoPE preserves pair norms, argmax ties).
//! Every check runs at each dispatch level the CPU supports (Scalar, V3, V4;
//! `common::each_level`), with the same tolerances at every level; the bounds
//! below hold for the 16-lane V4 reductions too (fewer terms per lane).
//!
//! Tolerances (ε = f32::EPSILON = 2^-23), derived from the standard bound for
//! a recursive sum of k terms, |err| <= k·ε·Σ|terms| (Higham §3.1):
//! - dot / gemv rows: the twin sums n terms sequentially (k = n); the fast path
//!   sums ~n/32 terms per lane plus a 5-level tree (k <= n/32 + 10). So
//!   |fast − ref| <= (n + n/32 + 10)·ε·Σ|a_i b_i|, and |fast − exact| <=
//!   (n/32 + 10)·ε·Σ|a_i b_i| against an f64 oracle (tight enough to catch
//!   one dropped or doubled element).
//! - axpy: FMA vs mul+add, <= 2ε·(|αx| + |y|) per element.
//! - rmsnorm: relative (n + 16)·ε per element (only the sum of squares differs).
//! - rope, argmax, widen_rows: exact (bit-identical).
//! - softmax: relative (n + 8)·ε per element + 1e-30 absolute (vector exp is
//!   <= 1 ulp, libm exp <= 1 ulp, sums differ by n·ε).
//! - silu_mul: relative 8ε per element + 1e-37 absolute.
//! - attend_group: |Δout| <= max|v|·(4·Δs + 2(n + 16)·ε) + 1e-30, where Δs =
//!   2·scale·(d + d/32 + 10)·ε·max_j Σ_t|q_t k_jt| bounds the logit error and
//!   a logit error δ perturbs each probability by a factor ≤ e^{2δ}.

mod common;

use common::each_level;
use kvcompact_kernels::*;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const EPS: f32 = f32::EPSILON;

fn len_strategy() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 1usize..=67, 2 => 68usize..=700, 1 => 4090usize..=4110]
}

fn vec_of(n: usize) -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(-2.0f32..2.0, n)
}

fn pair(n: usize) -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    (vec_of(n), vec_of(n))
}

fn dot_tol_ref(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len() as f32;
    let abs: f32 = a.iter().zip(b).map(|(x, y)| (x * y).abs()).sum();
    (n + n / 32.0 + 10.0) * EPS * abs + 1e-30
}

fn dot_f64(a: &[f32], b: &[f32]) -> (f64, f64) {
    let s: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let abs: f64 = a.iter().zip(b).map(|(&x, &y)| (x as f64 * y as f64).abs()).sum();
    (s, abs)
}

/// Deterministic xorshift for non-proptest fixtures.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-1, 1).
    fn f(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn to_bf16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect()
}
fn to_f16_bits(x: &[f32]) -> Vec<u16> {
    x.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect()
}

/// Forcing a level really switches the code path: at Scalar, gemv and attend_group are the
/// naive twins bit for bit; every level gives a different rounding of the same f32 GEMV and
/// decode attention (their accumulation orders differ), so no level silently runs another's code.
#[test]
fn forced_levels_run_different_paths() {
    let (rows, cols, n, d, g) = (64usize, 1000usize, 300usize, 64usize, 3usize);
    let mut rng = Rng(5);
    let w: Vec<f32> = (0..rows * cols).map(|_| rng.f()).collect();
    let x: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
    let qs: Vec<f32> = (0..g * d).map(|_| rng.f()).collect();
    let kv: Vec<f32> = (0..n * d).map(|_| rng.f() * 3.0).collect();
    let mut seen: Vec<(SimdLevel, Vec<u32>, Vec<u32>)> = Vec::new();
    each_level(|level| {
        let mut y = vec![0.0; rows];
        gemv(WeightRef::F32(&w), rows, cols, &x, &mut y);
        let mut out = vec![0.0; g * d];
        attend_group(&qs, &kv, &kv, None, n, d, 0.125, &mut out, &mut Vec::new());
        if level == SimdLevel::Scalar {
            let mut yr = vec![0.0; rows];
            gemv_ref(WeightRef::F32(&w), rows, cols, &x, &mut yr);
            assert_eq!(y, yr, "Scalar gemv is not the twin");
            let mut or = vec![0.0; g * d];
            attend_group_ref(&qs, &kv, &kv, None, n, d, 0.125, &mut or, &mut Vec::new());
            assert_eq!(out, or, "Scalar attend_group is not the twin");
        }
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        for (other, yo, oo) in &seen {
            assert_ne!(&bits(&y), yo, "gemv at {level} is bit-identical to {other}");
            assert_ne!(&bits(&out), oo, "attend_group at {level} is bit-identical to {other}");
        }
        seen.push((level, bits(&y), bits(&out)));
        Ok::<(), String>(())
    })
    .unwrap();
}

/// The dispatch level: detection agrees with CPUID, the default is the detected level (unless
/// KVCOMPACT_SIMD lowers it), every supported level can be forced and reports its name, and a
/// level above the CPU's is refused without changing the current one.
#[test]
fn dispatch_levels_detect_force_and_report() {
    let detected = detected_simd_level();
    eprintln!("cpu = {}, detected = {detected}, default simd_level = {}", cpu_model(), simd_level());
    #[cfg(target_arch = "x86_64")]
    {
        let v3 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let v4 = v3
            && ["avx512f", "avx512bw", "avx512vl", "avx512dq", "f16c"].iter().all(|f| match *f {
                "avx512f" => is_x86_feature_detected!("avx512f"),
                "avx512bw" => is_x86_feature_detected!("avx512bw"),
                "avx512vl" => is_x86_feature_detected!("avx512vl"),
                "avx512dq" => is_x86_feature_detected!("avx512dq"),
                _ => is_x86_feature_detected!("f16c"),
            });
        assert_eq!(v4, detected == SimdLevel::V4, "V4 detection");
        if v3 {
            assert!(detected >= SimdLevel::V3, "AVX2+FMA present but detected {detected}");
        }
    }
    if std::env::var_os(SIMD_ENV).is_none() {
        // Under the lock: no other test is forcing a level.
        each_level(|_| Ok::<(), String>(())).unwrap();
        assert_eq!(simd_dispatch_level(), detected, "default level");
    }
    let mut seen = Vec::new();
    each_level(|level| {
        assert_eq!(simd_dispatch_level(), level);
        let name = simd_level();
        let want: &[&str] = match level {
            SimdLevel::Scalar => &["scalar"],
            SimdLevel::V3 => &["avx2+fma+f16c", "avx2+fma"],
            SimdLevel::V4 => &["avx512+f16c"],
        };
        assert!(want.contains(&name), "level {level} reports {name}");
        if level < SimdLevel::V4 {
            // A level the CPU lacks is refused and the current level stays.
            let above = SimdLevel::ALL[level as usize + 1..].iter().copied().find(|&l| l > detected);
            if let Some(l) = above {
                assert!(force_simd_level(Some(l)).is_err());
                assert_eq!(simd_dispatch_level(), level);
            }
        }
        seen.push(level);
        Ok::<(), String>(())
    })
    .unwrap();
    assert_eq!(seen, SimdLevel::ALL.iter().copied().filter(|&l| l <= detected).collect::<Vec<_>>());
    for (s, l) in [("scalar", SimdLevel::Scalar), ("V3", SimdLevel::V3), (" avx512 ", SimdLevel::V4)] {
        assert_eq!(SimdLevel::parse(s), Some(l));
    }
    assert_eq!(SimdLevel::parse("v5"), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn dot_matches_ref_and_f64((a, b) in len_strategy().prop_flat_map(pair)) {
        each_level(|_level| {
            let fast = dot(&a, &b);
            let slow = dot_ref(&a, &b);
            prop_assert!((fast - slow).abs() <= dot_tol_ref(&a, &b), "n={} fast={fast} ref={slow}", a.len());
            let (exact, abs) = dot_f64(&a, &b);
            let n = a.len() as f64;
            let tol = (n / 32.0 + 10.0) * EPS as f64 * abs + 1e-30;
            prop_assert!((fast as f64 - exact).abs() <= tol, "n={} fast={fast} exact={exact} tol={tol}", a.len());
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn axpy_matches_ref((x, y) in len_strategy().prop_flat_map(pair), alpha in -3.0f32..3.0) {
        each_level(|_level| {
            let mut yf = y.clone();
            let mut yr = y.clone();
            axpy(alpha, &x, &mut yf);
            axpy_ref(alpha, &x, &mut yr);
            for i in 0..x.len() {
                let tol = 2.0 * EPS * ((alpha * x[i]).abs() + y[i].abs()) + 1e-30;
                prop_assert!((yf[i] - yr[i]).abs() <= tol, "i={i} {} vs {}", yf[i], yr[i]);
            }
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn rmsnorm_matches_ref((x, w) in len_strategy().prop_flat_map(pair), eps in 1e-6f32..1e-4) {
        each_level(|_level| {
            let n = x.len();
            let mut of = vec![0.0; n];
            let mut or = vec![0.0; n];
            rmsnorm(&mut of, &x, &w, eps);
            rmsnorm_ref(&mut or, &x, &w, eps);
            for i in 0..n {
                let tol = (n as f32 + 16.0) * EPS * or[i].abs() + 1e-30;
                prop_assert!((of[i] - or[i]).abs() <= tol, "i={i} {} vs {}", of[i], or[i]);
            }
            // Identity: with unit weights, mean(out^2) = ms/(ms+eps) <= 1.
            let ones = vec![1.0f32; n];
            rmsnorm(&mut of, &x, &ones, eps);
            let ms: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
            let got: f64 = of.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / n as f64;
            prop_assert!((got - ms / (ms + eps as f64)).abs() <= 1e-5, "mean sq {got}");
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn rope_bit_identical_and_norm_preserving(
        half_d in 1usize..=67,
        pos in 0u32..5000,
        theta in prop_oneof![Just(10000.0f32), Just(100000.0f32)],
        seed in any::<u64>(),
    ) {
        each_level(|_level| {
            let d = 2 * half_d; // head dims 2..134, most not multiples of 8
            let mut rng = Rng(seed | 1);
            let x: Vec<f32> = (0..d).map(|_| rng.f() * 3.0).collect();
            let (cos, sin): (Vec<f32>, Vec<f32>) = (0..half_d)
                .map(|i| {
                    let ang = pos as f64 / (theta as f64).powf(2.0 * i as f64 / d as f64);
                    (ang.cos() as f32, ang.sin() as f32)
                })
                .unzip();
            let mut xf = x.clone();
            let mut xr = x.clone();
            rope_rotate_half(&mut xf, &cos, &sin);
            rope_rotate_half_ref(&mut xr, &cos, &sin);
            prop_assert_eq!(
                xf.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                xr.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            );
            for i in 0..half_d {
                let before = x[i] as f64 * x[i] as f64 + x[i + half_d] as f64 * x[i + half_d] as f64;
                let after = xf[i] as f64 * xf[i] as f64 + xf[i + half_d] as f64 * xf[i + half_d] as f64;
                prop_assert!((after - before).abs() <= 8.0 * EPS as f64 * before + 1e-12, "pair {i}: {before} -> {after}");
            }
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn rope_dot_matches_ref_and_rotated_dot(
        half_d in 1usize..=67,
        pos in 0u32..5000,
        seed in any::<u64>(),
    ) {
        each_level(|_level| {
            let d = 2 * half_d;
            let mut rng = Rng(seed | 1);
            let q: Vec<f32> = (0..d).map(|_| rng.f() * 3.0).collect();
            let k: Vec<f32> = (0..d).map(|_| rng.f() * 3.0).collect();
            let (cos, sin): (Vec<f32>, Vec<f32>) = (0..half_d)
                .map(|i| {
                    let ang = pos as f64 / 10000f64.powf(2.0 * i as f64 / d as f64);
                    (ang.cos() as f32, ang.sin() as f32)
                })
                .unzip();
            // Reference: rotate k explicitly, then an f64 dot; tolerance from the |terms| sum.
            let mut kr = k.clone();
            rope_rotate_half_ref(&mut kr, &cos, &sin);
            let (exact, abs) = dot_f64(&q, &kr);
            let tol = (3.0 * d as f64 + 10.0) * EPS as f64 * (abs + 3.0 * q.iter().zip(&k).map(|(a, b)| (a * b).abs() as f64).sum::<f64>()) + 1e-30;
            let fast = rope_dot(&q, &k, &cos, &sin) as f64;
            let slow = rope_dot_ref(&q, &k, &cos, &sin) as f64;
            prop_assert!((fast - exact).abs() <= tol, "fast {fast} exact {exact} tol {tol}");
            prop_assert!((slow - exact).abs() <= tol, "ref {slow} exact {exact} tol {tol}");
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn exp_shift_sum_matches_ref_and_softmax(x in len_strategy().prop_flat_map(vec_of)) {
        each_level(|_level| {
            let x: Vec<f32> = x.iter().map(|v| v * 20.0).collect();
            let (mut a, mut b, mut c) = (x.clone(), x.clone(), x.clone());
            let (ma, sa) = exp_shift_sum(&mut a);
            let (mb, sb) = exp_shift_sum_ref(&mut b);
            prop_assert_eq!(ma, mb);
            prop_assert!((sa - sb).abs() <= 1e-5 * sb, "sum {sa} vs {sb}");
            for (p, q) in a.iter().zip(&b) {
                prop_assert!((p - q).abs() <= 4.0 * EPS * q.abs() + 1e-30, "{p} vs {q}");
            }
            // softmax is exp_shift_sum scaled by 1/sum, bit for bit.
            softmax_inplace(&mut c);
            let inv = 1.0 / sa;
            prop_assert!(a.iter().zip(&c).all(|(p, q)| (p * inv).to_bits() == q.to_bits()));
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn softmax_matches_ref_and_sums_to_one(
        x in len_strategy().prop_flat_map(|n| proptest::collection::vec(-30.0f32..30.0, n)),
        offset in prop_oneof![Just(0.0f32), -60.0f32..10.0],
        width in prop_oneof![Just(1.0f32), 0.01f32..1.0],
        mask in proptest::collection::vec(any::<bool>(), 0..32),
    ) {
        each_level(|_level| {
            // Logits of varied spread and sign (a padding bug shows when max <= 0).
            let mut x: Vec<f32> = x.iter().map(|v| v * width + offset).collect();
            // Mask some entries with -inf (the attention masking case).
            for (i, &m) in mask.iter().enumerate() {
                if m && i + 1 < x.len() {
                    x[i] = f32::NEG_INFINITY;
                }
            }
            let n = x.len();
            let mut f = x.clone();
            let mut r = x.clone();
            softmax_inplace(&mut f);
            softmax_inplace_ref(&mut r);
            for i in 0..n {
                let tol = (n as f32 + 8.0) * EPS * r[i] + 1e-30;
                prop_assert!((f[i] - r[i]).abs() <= tol, "i={i} {} vs {}", f[i], r[i]);
                prop_assert!(f[i] >= 0.0);
                if x[i] == f32::NEG_INFINITY { prop_assert_eq!(f[i], 0.0); }
            }
            let s: f64 = f.iter().map(|&v| v as f64).sum();
            prop_assert!((s - 1.0).abs() <= 2.0 * (n as f64 + 8.0) * EPS as f64, "sum={s}");
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn silu_mul_matches_ref(
        (g, u) in len_strategy().prop_flat_map(|n| (
            proptest::collection::vec(-120.0f32..120.0, n),
            proptest::collection::vec(-4.0f32..4.0, n),
        )),
    ) {
        each_level(|_level| {
            let mut gf = g.clone();
            let mut gr = g.clone();
            silu_mul(&mut gf, &u);
            silu_mul_ref(&mut gr, &u);
            for i in 0..g.len() {
                let tol = 8.0 * EPS * gr[i].abs() + 1e-37;
                prop_assert!((gf[i] - gr[i]).abs() <= tol, "g={} u={}: {} vs {}", g[i], u[i], gf[i], gr[i]);
            }
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn argmax_matches_ref_with_ties_and_nans(
        x in len_strategy().prop_flat_map(|n| proptest::collection::vec(
            prop_oneof![8 => (-4i32..4).prop_map(|v| v as f32), 1 => Just(f32::NAN),
                        1 => Just(f32::NEG_INFINITY), 1 => Just(-0.0f32)], n)),
    ) {
        each_level(|_level| {
            prop_assert_eq!(argmax(&x), argmax_ref(&x));
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn gemv_all_dtypes_match_ref(
        rows in 1usize..=40,
        cols in prop_oneof![3 => 1usize..=67, 1 => 68usize..=300, 1 => Just(4099usize)],
        seed in any::<u64>(),
    ) {
        each_level(|_level| {
            let mut rng = Rng(seed | 1);
            let w32: Vec<f32> = (0..rows * cols).map(|_| rng.f()).collect();
            let x: Vec<f32> = (0..cols).map(|_| rng.f() * 2.0).collect();
            let wb = to_bf16_bits(&w32);
            let wh = to_f16_bits(&w32);
            for w in [WeightRef::F32(&w32), WeightRef::Bf16(&wb), WeightRef::F16(&wh)] {
                let mut yf = vec![0.0; rows];
                let mut yr = vec![0.0; rows];
                gemv(w, rows, cols, &x, &mut yf);
                gemv_ref(w, rows, cols, &x, &mut yr);
                // Widened weights, for the tolerance and the f32-equivalence check.
                let mut wide = vec![0.0; rows * cols];
                widen_rows(w, 0, rows, cols, &mut wide);
                let mut y32 = vec![0.0; rows];
                gemv(WeightRef::F32(&wide), rows, cols, &x, &mut y32);
                for r in 0..rows {
                    let row = &wide[r * cols..(r + 1) * cols];
                    prop_assert!((yf[r] - yr[r]).abs() <= dot_tol_ref(row, &x),
                        "{} row {r}: {} vs {}", w.dtype_name(), yf[r], yr[r]);
                    // bf16/f16 kernels widen exactly and reduce in the same order as f32.
                    if simd_level() != "avx2+fma" || !matches!(w, WeightRef::F16(_)) {
                        prop_assert_eq!(yf[r].to_bits(), y32[r].to_bits(), "{} row {}", w.dtype_name(), r);
                    }
                }
            }
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    #[test]
    fn attend_group_matches_ref(
        g in 1usize..=4,
        d in prop_oneof![3 => 1usize..=67, 1 => Just(64usize), 1 => Just(128usize), 1 => Just(130usize)],
        n in prop_oneof![1 => Just(0usize), 6 => 1usize..=67, 2 => 68usize..=600],
        extra_rows in 0usize..3,
        bias_kind in 0u8..4, // 0: none, 1: finite, 2: finite with some -inf, 3: all -inf
        seed in any::<u64>(),
    ) {
        each_level(|_level| {
            let mut rng = Rng(seed | 1);
            let rows = n + extra_rows;
            let qs: Vec<f32> = (0..g * d).map(|_| rng.f() * 2.0).collect();
            let keys: Vec<f32> = (0..rows * d).map(|_| rng.f() * 2.0).collect();
            let values: Vec<f32> = (0..rows * d).map(|_| rng.f() * 3.0).collect();
            let bias: Vec<f32> = (0..rows)
                .map(|j| match bias_kind {
                    1 => rng.f(),
                    2 if j % 3 == 1 => f32::NEG_INFINITY,
                    2 => rng.f() * 0.5,
                    3 => f32::NEG_INFINITY,
                    _ => 0.0,
                })
                .collect();
            let bias_opt = (bias_kind != 0).then_some(&bias[..]);
            let scale = 1.0 / (d as f32).sqrt();
            let mut of = vec![f32::NAN; g * d];
            let mut or = vec![f32::NAN; g * d];
            let mut scratch = Vec::new();
            attend_group(&qs, &keys, &values, bias_opt, n, d, scale, &mut of, &mut scratch);
            attend_group_ref(&qs, &keys, &values, bias_opt, n, d, scale, &mut or, &mut scratch);

            let vmax = values[..n * d].iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let mut qk = 0.0f32;
            for q in qs.chunks_exact(d) {
                for k in keys[..n * d].chunks_exact(d) {
                    qk = qk.max(q.iter().zip(k).map(|(a, b)| (a * b).abs()).sum());
                }
            }
            let ds = 2.0 * scale * (d as f32 + d as f32 / 32.0 + 10.0) * EPS * qk;
            let tol = vmax * (4.0 * ds + 2.0 * (n as f32 + 16.0) * EPS) + 1e-30;
            for i in 0..g * d {
                prop_assert!(of[i].is_finite(), "non-finite output {}", of[i]);
                prop_assert!((of[i] - or[i]).abs() <= tol, "i={i} {} vs {} tol {tol}", of[i], or[i]);
                if n == 0 || bias_kind == 3 {
                    prop_assert_eq!(of[i], 0.0);
                }
            }
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }

    /// K/V rows stored bf16 or f16 (a bf16 KV cache) give exactly what the f32 kernel gives on
    /// the widened rows, at every level, and the twin's result at Scalar.
    #[test]
    fn attend_group_kv_is_the_f32_kernel_on_widened_rows(
        g in 1usize..=4,
        d in prop_oneof![3 => 1usize..=67, 1 => Just(64usize), 1 => Just(128usize)],
        n in prop_oneof![1 => Just(0usize), 6 => 1usize..=67, 2 => 68usize..=400],
        with_bias in any::<bool>(),
        seed in any::<u64>(),
    ) {
        each_level(|level| {
            let mut rng = Rng(seed | 1);
            let qs: Vec<f32> = (0..g * d).map(|_| rng.f() * 2.0).collect();
            let k32: Vec<f32> = (0..n * d).map(|_| rng.f() * 2.0).collect();
            let v32: Vec<f32> = (0..n * d).map(|_| rng.f() * 3.0).collect();
            let bias: Vec<f32> = (0..n).map(|j| if j % 5 == 2 { f32::NEG_INFINITY } else { rng.f() }).collect();
            let bias_opt = with_bias.then_some(&bias[..]);
            let scale = 1.0 / (d as f32).sqrt();
            let (kb, vb, kh, vh) = (to_bf16_bits(&k32), to_bf16_bits(&v32), to_f16_bits(&k32), to_f16_bits(&v32));
            for (kr, vr) in [(WeightRef::Bf16(&kb), WeightRef::Bf16(&vb)), (WeightRef::F16(&kh), WeightRef::F16(&vh))] {
                let (mut kw, mut vw) = (vec![0.0f32; n * d], vec![0.0f32; n * d]);
                widen_rows_ref(kr, 0, n, d, &mut kw);
                widen_rows_ref(vr, 0, n, d, &mut vw);
                let mut want = vec![f32::NAN; g * d];
                attend_group(&qs, &kw, &vw, bias_opt, n, d, scale, &mut want, &mut Vec::new());
                let mut got = vec![f32::NAN; g * d];
                attend_group_kv(&qs, kr, vr, bias_opt, n, d, scale, &mut got, &mut Vec::new());
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                prop_assert_eq!(bits(&got), bits(&want), "{} rows at {}", kr.dtype_name(), level);
                if level == SimdLevel::Scalar {
                    let mut twin = vec![f32::NAN; g * d];
                    attend_group_kv_ref(&qs, kr, vr, bias_opt, n, d, scale, &mut twin, &mut Vec::new());
                    prop_assert_eq!(bits(&twin), bits(&want));
                }
            }
            Ok::<(), TestCaseError>(())
        }).map_err(TestCaseError::fail)?;
    }
}

#[test]
fn argmax_edge_cases() {
    each_level(|_level| {
        for f in [argmax, argmax_ref] {
            assert_eq!(f(&[]), 0);
            assert_eq!(f(&[f32::NAN, f32::NAN]), 0);
            assert_eq!(f(&[f32::NAN, 1.0, 3.0, 3.0, 2.0]), 2);
            assert_eq!(f(&[f32::NEG_INFINITY, f32::NEG_INFINITY]), 0);
            assert_eq!(f(&[f32::NAN, f32::NEG_INFINITY]), 1);
            // first max in the masked tail and in a later vector block
            let mut v = vec![0.0f32; 37];
            v[35] = 5.0;
            v[36] = 5.0;
            assert_eq!(f(&v), 35);
            v[9] = 5.0;
            assert_eq!(f(&v), 9);
            v[9] = f32::NAN;
            v[3] = f32::INFINITY;
            assert_eq!(f(&v), 3);
        }
        Ok::<(), String>(())
    })
    .unwrap();
}

#[test]
fn softmax_masked_and_empty_give_zeros() {
    each_level(|_level| {
        for f in [softmax_inplace, softmax_inplace_ref] {
            let mut e: Vec<f32> = vec![];
            f(&mut e);
            for n in [1, 7, 8, 9, 33] {
                let mut x = vec![f32::NEG_INFINITY; n];
                f(&mut x);
                assert!(x.iter().all(|&v| v == 0.0), "n={n}: {x:?}");
            }
            let mut x = vec![f32::NEG_INFINITY, 3.0, f32::NEG_INFINITY];
            f(&mut x);
            assert_eq!(x, vec![0.0, 1.0, 0.0]);
        }
        Ok::<(), String>(())
    })
    .unwrap();
}

#[test]
fn attend_group_empty_and_masked_are_zero() {
    each_level(|_level| {
        let d = 5;
        let qs = vec![0.3f32; 2 * d];
        let kv = vec![1.0f32; 4 * d];
        let mut scratch = vec![1.0; 3];
        for n in [0usize, 4] {
            let bias = [f32::NEG_INFINITY; 4];
            let b = (n > 0).then_some(&bias[..]);
            let mut out = vec![f32::NAN; 2 * d];
            attend_group(&qs, &kv, &kv, b, n, d, 0.5, &mut out, &mut scratch);
            assert!(out.iter().all(|&v| v == 0.0), "n={n}: {out:?}");
        }
        // One unmasked key: output is exactly that value row.
        let values: Vec<f32> = (0..4 * d).map(|i| i as f32).collect();
        let bias = [f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY];
        let mut out = vec![0.0; 2 * d];
        attend_group(&qs, &kv, &values, Some(&bias), 4, d, 0.5, &mut out, &mut scratch);
        assert_eq!(&out[..d], &values[2 * d..3 * d]);
        assert_eq!(&out[d..], &values[2 * d..3 * d]);
        Ok::<(), String>(())
    })
    .unwrap();
}

#[test]
fn widen_rows_exhaustive_bits() {
    each_level(|_level| {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        let n = all.len();
        // 65536 = 256 rows x 256 cols; also an offset, odd-length window.
        for (r0, nr, cols) in [(0usize, 256usize, 256usize), (3, 7, 6553)] {
            for w in [WeightRef::Bf16(&all), WeightRef::F16(&all)] {
                let len = nr * cols;
                assert!((r0 + nr) * cols <= n);
                let mut f = vec![0.0; len];
                let mut r = vec![0.0; len];
                widen_rows(w, r0, nr, cols, &mut f);
                widen_rows_ref(w, r0, nr, cols, &mut r);
                for i in 0..len {
                    if r[i].is_nan() {
                        assert!(f[i].is_nan(), "{} bits {:#06x}", w.dtype_name(), all[r0 * cols + i]);
                    } else {
                        assert_eq!(f[i].to_bits(), r[i].to_bits(), "{} bits {:#06x}", w.dtype_name(), all[r0 * cols + i]);
                    }
                }
            }
        }
        // bf16 widening is a pure shift: bit-exact even for NaNs.
        let mut f = vec![0.0; n];
        widen_rows(WeightRef::Bf16(&all), 0, 1, n, &mut f);
        for (i, v) in f.iter().enumerate() {
            assert_eq!(v.to_bits(), (i as u32) << 16);
        }
        Ok::<(), String>(())
    })
    .unwrap();
}

/// bf16 rounding: gemv over bf16 bits equals gemv_ref over the same bits
/// (within the dot tolerance) and is *not* the f32 result of the unrounded
/// weights, i.e. the kernel really reads the rounded weights.
#[test]
fn gemv_bf16_uses_stored_bits() {
    each_level(|_level| {
        let (rows, cols) = (37, 1029);
        let mut rng = Rng(7);
        let w32: Vec<f32> = (0..rows * cols).map(|_| rng.f()).collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
        let wb = to_bf16_bits(&w32);
        let mut yb = vec![0.0; rows];
        let mut yr = vec![0.0; rows];
        let mut y32 = vec![0.0; rows];
        gemv(WeightRef::Bf16(&wb), rows, cols, &x, &mut yb);
        gemv_ref(WeightRef::Bf16(&wb), rows, cols, &x, &mut yr);
        gemv(WeightRef::F32(&w32), rows, cols, &x, &mut y32);
        let wide: Vec<f32> = wb.iter().map(|&b| f32::from_bits((b as u32) << 16)).collect();
        let mut differs = 0;
        for r in 0..rows {
            let row = &wide[r * cols..(r + 1) * cols];
            assert!((yb[r] - yr[r]).abs() <= dot_tol_ref(row, &x), "row {r}");
            differs += (yb[r] != y32[r]) as usize;
        }
        assert!(differs > rows / 2, "bf16 result suspiciously equal to f32 result");
        Ok::<(), String>(())
    })
    .unwrap();
}

/// gemv_par in 1- and 2-thread pools is bit-identical to gemv (rows not a
/// multiple of the chunk, cols not a multiple of 8).
#[test]
fn gemv_par_bit_identical_across_thread_counts() {
    each_level(|_level| {
        let (rows, cols) = (1000, 579);
        let mut rng = Rng(42);
        let w32: Vec<f32> = (0..rows * cols).map(|_| rng.f()).collect();
        let x: Vec<f32> = (0..cols).map(|_| rng.f()).collect();
        let wb = to_bf16_bits(&w32);
        let wh = to_f16_bits(&w32);
        for w in [WeightRef::F32(&w32), WeightRef::Bf16(&wb), WeightRef::F16(&wh)] {
            let mut y0 = vec![0.0; rows];
            gemv(w, rows, cols, &x, &mut y0);
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let mut yp = vec![0.0; rows];
                pool.install(|| gemv_par(w, rows, cols, &x, &mut yp));
                let a: Vec<u32> = y0.iter().map(|v| v.to_bits()).collect();
                let b: Vec<u32> = yp.iter().map(|v| v.to_bits()).collect();
                assert_eq!(a, b, "{} with {threads} threads", w.dtype_name());
            }
        }
        Ok::<(), String>(())
    })
    .unwrap();
}

/// gemv_multi_par over tasks of mixed shapes and dtypes (some below the
/// parallel threshold, parts straddling task boundaries) is bit-identical to
/// gemv of each task, at 1, 2 and 3 threads.
#[test]
fn gemv_multi_par_bit_identical_to_gemv() {
    each_level(|_level| {
        let mut rng = Rng(9);
        let shapes = [(576usize, 579usize), (3, 579), (192, 579), (1, 8), (700, 33)];
        let w32: Vec<Vec<f32>> = shapes.iter().map(|&(r, c)| (0..r * c).map(|_| rng.f()).collect()).collect();
        let wb: Vec<Vec<u16>> = w32.iter().map(|w| to_bf16_bits(w)).collect();
        let xs: Vec<Vec<f32>> = shapes.iter().map(|&(_, c)| (0..c).map(|_| rng.f()).collect()).collect();
        let weight = |i: usize| if i.is_multiple_of(2) { WeightRef::F32(&w32[i]) } else { WeightRef::Bf16(&wb[i]) };
        let want: Vec<Vec<f32>> = (0..shapes.len())
            .map(|i| {
                let mut y = vec![0.0; shapes[i].0];
                gemv(weight(i), shapes[i].0, shapes[i].1, &xs[i], &mut y);
                y
            })
            .collect();
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let mut ys: Vec<Vec<f32>> = shapes.iter().map(|&(r, _)| vec![f32::NAN; r]).collect();
            let mut tasks: Vec<GemvTask> = ys
                .iter_mut()
                .enumerate()
                .map(|(i, y)| GemvTask { w: weight(i), rows: shapes[i].0, cols: shapes[i].1, x: &xs[i], y })
                .collect();
            pool.install(|| gemv_multi_par(&mut tasks));
            for i in 0..shapes.len() {
                let a: Vec<u32> = want[i].iter().map(|v| v.to_bits()).collect();
                let b: Vec<u32> = ys[i].iter().map(|v| v.to_bits()).collect();
                assert_eq!(a, b, "task {i} with {threads} threads");
            }
            // The same GEMVs as stages of a decode team, several stages in one scope.
            let mut ys: Vec<Vec<f32>> = shapes.iter().map(|&(r, _)| vec![f32::NAN; r]).collect();
            pool.install(|| {
                team_scope(|team| {
                    for (i, y) in ys.iter_mut().enumerate() {
                        gemv_multi_team(team, &mut [GemvTask { w: weight(i), rows: shapes[i].0, cols: shapes[i].1, x: &xs[i], y }]);
                    }
                })
            });
            for i in 0..shapes.len() {
                let a: Vec<u32> = want[i].iter().map(|v| v.to_bits()).collect();
                let b: Vec<u32> = ys[i].iter().map(|v| v.to_bits()).collect();
                assert_eq!(a, b, "team: task {i} with {threads} threads");
            }
        }
        Ok::<(), String>(())
    })
    .unwrap();
}

#[test]
fn weight_ref_metadata() {
    let a = [0.0f32; 6];
    let b = [0u16; 4];
    assert_eq!((WeightRef::F32(&a).len(), WeightRef::F32(&a).bytes_per_weight()), (6, 4));
    assert_eq!((WeightRef::Bf16(&b).len(), WeightRef::Bf16(&b).dtype_name()), (4, "bf16"));
    assert_eq!((WeightRef::F16(&b).bytes_per_weight(), WeightRef::F16(&b).dtype_name()), (2, "f16"));
    assert_eq!(WeightRef::F32(&a).dtype_name(), "f32");
}

/// The batched GEMV of the server: every (vector, row) bit-identical to `gemv` of that vector
/// alone — for every dtype, batch sizes 1…17, at 1, 2 and 3 threads, single- and multi-task —
/// and within the f32 rounding budget of the naive twin.
#[test]
fn gemv_batch_bit_identical_to_gemv_per_vector() {
    each_level(|_level| {
        let mut rng = Rng(21);
        let shapes = [(576usize, 579usize), (5, 64), (193, 67), (1, 8), (1500, 33), (7, 40), (3, 130)];
        let w32: Vec<Vec<f32>> = shapes.iter().map(|&(r, c)| (0..r * c).map(|_| rng.f()).collect()).collect();
        let wb: Vec<Vec<u16>> = w32.iter().map(|w| to_bf16_bits(w)).collect();
        let wh: Vec<Vec<u16>> = w32.iter().map(|w| w.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect()).collect();
        let weight = |i: usize, dt: usize| match dt {
            0 => WeightRef::F32(&w32[i]),
            1 => WeightRef::Bf16(&wb[i]),
            _ => WeightRef::F16(&wh[i]),
        };
        for m in [1usize, 2, 3, 8, 11, 17] {
            let xs: Vec<Vec<f32>> = shapes.iter().map(|&(_, c)| (0..m * c).map(|_| rng.f()).collect()).collect();
            for dt in 0..3 {
                // Reference: gemv of each vector alone.
                let want: Vec<Vec<f32>> = (0..shapes.len())
                    .map(|i| {
                        let (r, c) = shapes[i];
                        let mut y = vec![0.0; m * r];
                        for v in 0..m {
                            gemv(weight(i, dt), r, c, &xs[i][v * c..(v + 1) * c], &mut y[v * r..(v + 1) * r]);
                        }
                        y
                    })
                    .collect();
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
                for i in 0..shapes.len() {
                    let (r, c) = shapes[i];
                    let mut y = vec![f32::NAN; m * r];
                    gemv_batch(weight(i, dt), r, c, &xs[i], &mut y);
                    assert_eq!(bits(&want[i]), bits(&y), "gemv_batch shape {i} dtype {dt} m {m}");
                    let mut yr = vec![0.0; m * r];
                    gemv_batch_ref(weight(i, dt), r, c, &xs[i], &mut yr);
                    for (k, (a, b)) in y.iter().zip(&yr).enumerate() {
                        let (v, row) = (k / r, k % r);
                        let mag: f32 = (0..c).map(|j| (w32[i][row * c + j] * xs[i][v * c + j]).abs()).sum();
                        let tol = (c + c / 32 + 10) as f32 * f32::EPSILON / 2.0 * mag + 1e-30;
                        assert!((a - b).abs() <= tol, "twin: shape {i} dtype {dt} m {m} at {k}: {a} vs {b}");
                    }
                }
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    // The pool path, then the same GEMVs as one decode-team stage.
                    for team in [false, true] {
                        let mut ys: Vec<Vec<f32>> = shapes.iter().map(|&(r, _)| vec![f32::NAN; m * r]).collect();
                        let mut tasks: Vec<GemvBatchTask> = ys
                            .iter_mut()
                            .enumerate()
                            .map(|(i, y)| GemvBatchTask { w: weight(i, dt), rows: shapes[i].0, cols: shapes[i].1, xs: &xs[i], ys: y })
                            .collect();
                        if team {
                            pool.install(|| team_scope(|t| gemv_batch_multi_team(t, &mut tasks)));
                        } else {
                            pool.install(|| gemv_batch_multi_par(&mut tasks));
                        }
                        for i in 0..shapes.len() {
                            assert_eq!(bits(&want[i]), bits(&ys[i]), "shape {i} dtype {dt} m {m} threads {threads} team {team}");
                        }
                    }
                }
            }
        }
        Ok::<(), String>(())
    })
    .unwrap();
}
