//! CPU kernels for kvcompact, each with a naive scalar twin.
//!
//! | kernel | fast path | twin |
//! |---|---|---|
//! | [`dot`], [`axpy`] | AVX2+FMA, 4 f32x8 accumulators | [`dot_ref`], [`axpy_ref`] |
//! | [`rmsnorm`] | AVX2 sum of squares + vector scale | [`rmsnorm_ref`] |
//! | [`rope_rotate_half`] | AVX2, bit-identical to the twin | [`rope_rotate_half_ref`] |
//! | [`rope_dot`] (slim attention: score a pre-RoPE key) | AVX2+FMA, rotation in registers | [`rope_dot_ref`] |
//! | [`softmax_inplace`], [`exp_shift_sum`], [`silu_mul`] | AVX2 with a vector `exp` (<= 1 ulp); softmax and exp_shift_sum also AVX-512 (same exp, bit for bit per lane) | [`softmax_inplace_ref`], [`exp_shift_sum_ref`], [`silu_mul_ref`] |
//! | [`argmax`] | AVX2 max + compare/movemask, exact | [`argmax_ref`] |
//! | [`gemv()`], [`gemv_par`] | f32/bf16 AVX2+FMA (bf16 widened in registers), f16 F16C; all three AVX-512 (16 lanes) | [`gemv_ref`] |
//! | [`gemv_batch`], [`gemv_batch_multi_par`] (m vectors, each weight read once; bit-identical to [`gemv()`] per vector) | as [`gemv()`], row blocks kept in L1 | [`gemv_batch_ref`] |
//! | [`widen_rows`] | bf16 AVX2, f16 F16C (exact) | [`widen_rows_ref`] |
//! | [`attend_group`] | AVX2 or AVX-512 GQA decode attention, K/V read once per group | [`attend_group_ref`] |
//! | [`attend_group_kv`] (K/V rows stored bf16/f16: a bf16 KV cache; bit-identical to [`attend_group`] on the widened rows) | as [`attend_group`], each 8-row block widened in L1 | [`attend_group_kv_ref`] |
//! | [`gemv_multi_team`], [`gemv_batch_multi_team`] (one stage of a decode [`Team`]: workers kept awake for a whole token) | as [`gemv_multi_par`] | [`gemv_ref`] |
//!
//! **Dispatch rule.** The ISA is detected at run time, never at build time
//! (no `target-cpu=native`, no `-C target-feature`), and one level is used for
//! the whole process ([`dispatch`]: Scalar, V3 or V4; `KVCOMPACT_SIMD` or
//! [`force_simd_level`] can lower it). At V3, pulp's `V3` token (AVX2+FMA,
//! cached CPUID) selects the pulp kernels; F16C, which pulp's V3 does not
//! cover, is checked with `is_x86_feature_detected!` and used through
//! `std::arch` behind `#[target_feature]`. At V4 (AVX-512F/BW/VL/DQ), the
//! kernels in the table that name AVX-512 run `std::arch` code behind
//! `#[target_feature]`, the others their AVX2 version. At Scalar (or off
//! x86_64) every public function runs its `*_ref` twin. [`simd_level`]
//! reports what is used, [`cpu_model`] the CPU.
//!
//! **Numerics.** All accumulation is in f32 whatever the storage dtype
//! (bf16/f16 are widened exactly). Reductions use a fixed accumulator count
//! and order, so results depend only on the inputs and the dispatch level, not
//! on thread count or alignment; [`gemv_par`] is bit-identical to [`gemv()`].
//! Results of the SIMD path and of the scalar twin differ by rounding only;
//! they are not bit-portable between machines with different ISAs.

#![deny(missing_docs)]

pub mod activ;
pub mod attn;
pub mod dispatch;
pub mod gemv;
#[cfg(target_arch = "x86_64")]
mod gemv_v4;
pub mod norm;
pub mod rope;
mod simd;
pub mod team;
pub mod vecops;

pub use activ::{
    argmax, argmax_ref, exp_shift_sum, exp_shift_sum_ref, silu_mul, silu_mul_ref, softmax_inplace, softmax_inplace_ref,
};
pub use attn::{attend_group, attend_group_kv, attend_group_kv_ref, attend_group_ref};
pub use dispatch::{cpu_model, detected_simd_level, force_simd_level, simd_dispatch_level, SimdLevel, UnsupportedSimdLevel, SIMD_ENV};
pub use gemv::{gemv, gemv_batch, gemv_batch_multi_par, gemv_batch_multi_team, gemv_batch_ref, gemv_multi_par, gemv_multi_team, gemv_par, gemv_ref, GemvBatchTask, GemvTask, GEMV_PAR_MIN_BYTES, widen_rows, widen_rows_ref, WeightRef, GEMV_PAR_CHUNK_ROWS};
pub use norm::{rmsnorm, rmsnorm_ref};
pub use rope::{rope_dot, rope_dot_ref, rope_rotate_half, rope_rotate_half_ref};
pub use team::{team_scope, Team};
pub use vecops::{axpy, axpy_ref, dot, dot_ref};

/// What the kernels dispatch to now, with the features each level uses:
/// `"avx512+f16c"` (V4: AVX-512F/BW/VL/DQ), `"avx2+fma+f16c"`, `"avx2+fma"` (f16
/// weights then use the scalar twin) or `"scalar"`. See [`dispatch`] for how the
/// level is chosen and forced; [`SimdLevel`] is the level itself.
pub fn simd_level() -> &'static str {
    match simd_dispatch_level() {
        SimdLevel::V4 => "avx512+f16c",
        #[cfg(target_arch = "x86_64")]
        SimdLevel::V3 if simd::has_f16c() => "avx2+fma+f16c",
        SimdLevel::V3 => "avx2+fma",
        SimdLevel::Scalar => "scalar",
    }
}
