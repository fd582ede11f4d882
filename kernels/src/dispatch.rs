//! The run-time dispatch level: which instruction set the kernels use.
//!
//! The level is chosen once, at the first kernel call: the best level this CPU
//! supports ([`detected_simd_level`]), or a lower one named by the environment
//! variable `KVCOMPACT_SIMD` (`scalar`, `v3` or `v4`). A level the CPU lacks,
//! or an unknown name, is refused with a warning on stderr and the detected
//! level is used instead: a forced level can never select instructions the CPU
//! does not have. [`force_simd_level`] changes the level at run time (tests use
//! it to run every level the machine has); it refuses, with an error, a level
//! the CPU lacks.
//!
//! | level | needs | kernels |
//! |---|---|---|
//! | [`SimdLevel::Scalar`] | nothing | every `*_ref` twin |
//! | [`SimdLevel::V3`] | AVX2+FMA (pulp `V3`); F16C for f16 weights | 8-lane pulp kernels |
//! | [`SimdLevel::V4`] | V3 + F16C + AVX-512F/BW/VL/DQ | 16-lane `std::arch` kernels for GEMV (single, parallel, batched; f32/bf16/f16), decode attention and softmax; the V3 kernels for the rest |
//!
//! Results are deterministic for a given level (fixed accumulator counts and
//! reduction trees, independent of the thread count) but differ between
//! levels by rounding: switching the level changes low bits, never more than
//! the differential tests' tolerances against the scalar twins.

use core::sync::atomic::{AtomicU8, Ordering};

/// The environment variable read (once) to force a lower dispatch level.
pub const SIMD_ENV: &str = "KVCOMPACT_SIMD";

/// An instruction-set level of the run-time dispatch, ordered from the lowest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    /// The naive `*_ref` twins only (any CPU, any architecture).
    Scalar = 0,
    /// x86-64-v3: AVX2 + FMA (+ F16C for f16 weights), 8 f32 lanes.
    V3 = 1,
    /// x86-64-v4: V3 + AVX-512F/BW/VL/DQ, 16 f32 lanes.
    V4 = 2,
}

impl SimdLevel {
    /// Every level, lowest first.
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Scalar, SimdLevel::V3, SimdLevel::V4];

    /// `"scalar"`, `"v3"` or `"v4"` (the names `KVCOMPACT_SIMD` accepts).
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Scalar => "scalar",
            SimdLevel::V3 => "v3",
            SimdLevel::V4 => "v4",
        }
    }

    /// Parses a level name (case-insensitive; `avx2` and `avx512` are accepted as aliases).
    pub fn parse(s: &str) -> Option<SimdLevel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "scalar" | "none" => Some(SimdLevel::Scalar),
            "v3" | "avx2" => Some(SimdLevel::V3),
            "v4" | "avx512" => Some(SimdLevel::V4),
            _ => None,
        }
    }

    fn from_u8(v: u8) -> SimdLevel {
        match v {
            0 => SimdLevel::Scalar,
            1 => SimdLevel::V3,
            _ => SimdLevel::V4,
        }
    }
}

impl core::fmt::Display for SimdLevel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.name())
    }
}

/// [`force_simd_level`] was asked for a level this CPU does not support.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsupportedSimdLevel {
    /// The level asked for.
    pub requested: SimdLevel,
    /// The best level this CPU supports.
    pub detected: SimdLevel,
}

impl core::fmt::Display for UnsupportedSimdLevel {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "SIMD level {} is not supported by this CPU (best: {})", self.requested, self.detected)
    }
}

impl std::error::Error for UnsupportedSimdLevel {}

/// The best level this CPU supports (CPUID, cached by std and pulp).
pub fn detected_simd_level() -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        if pulp::x86::V3::try_new().is_none() {
            return SimdLevel::Scalar;
        }
        let v4 = is_x86_feature_detected!("f16c")
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512dq");
        if v4 {
            SimdLevel::V4
        } else {
            SimdLevel::V3
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    SimdLevel::Scalar
}

/// Not yet chosen.
const UNSET: u8 = u8::MAX;
static ACTIVE: AtomicU8 = AtomicU8::new(UNSET);

/// The level the kernels dispatch to now (chosen at the first call; see the module docs).
#[inline]
pub fn simd_dispatch_level() -> SimdLevel {
    match ACTIVE.load(Ordering::Relaxed) {
        UNSET => init_from_env(),
        v => SimdLevel::from_u8(v),
    }
}

/// The default level: `KVCOMPACT_SIMD` if set, valid and supported, else the detected one
/// (with a warning on stderr).
fn level_from_env() -> SimdLevel {
    let raw = std::env::var_os(SIMD_ENV).map(|v| v.to_string_lossy().into_owned());
    let (level, warning) = choose_level(raw.as_deref(), detected_simd_level());
    if let Some(w) = warning {
        eprintln!("warning: {w}");
    }
    level
}

/// The level for a `KVCOMPACT_SIMD` value on a CPU whose best level is `detected`, and the
/// warning to print when the value is refused.
fn choose_level(raw: Option<&str>, detected: SimdLevel) -> (SimdLevel, Option<String>) {
    let Some(raw) = raw.filter(|r| !r.trim().is_empty()) else { return (detected, None) };
    match SimdLevel::parse(raw) {
        Some(l) if l <= detected => (l, None),
        Some(l) => (detected, Some(format!("{SIMD_ENV}={raw}: this CPU does not support {l}; using {detected}"))),
        None => (detected, Some(format!("{SIMD_ENV}={raw} is not one of scalar, v3, v4; using {detected}"))),
    }
}

#[cold]
fn init_from_env() -> SimdLevel {
    let l = level_from_env();
    // A concurrent first call or `force_simd_level` may have stored first; keep theirs.
    match ACTIVE.compare_exchange(UNSET, l as u8, Ordering::Relaxed, Ordering::Relaxed) {
        Ok(_) => l,
        Err(v) => SimdLevel::from_u8(v),
    }
}

/// Makes every later kernel call dispatch to `level` (`None`: back to the default of
/// `KVCOMPACT_SIMD` or detection). Refuses a level above [`detected_simd_level`], leaving the
/// current level unchanged. Process-wide: calls already running on other threads finish at the
/// level they started with, but a caller that compares results across calls should not change
/// the level concurrently (tests serialise on a lock).
pub fn force_simd_level(level: Option<SimdLevel>) -> Result<SimdLevel, UnsupportedSimdLevel> {
    let l = match level {
        None => level_from_env(),
        Some(l) => {
            let detected = detected_simd_level();
            if l > detected {
                return Err(UnsupportedSimdLevel { requested: l, detected });
            }
            l
        }
    };
    ACTIVE.store(l as u8, Ordering::Relaxed);
    Ok(l)
}

/// The CPU's brand string with its family and model numbers, e.g.
/// `"AMD EPYC 7B13 64-Core Processor (family 25, model 1)"` (virtual machines often report a
/// generic brand, so the numbers are kept). `"unknown"` off x86-64.
pub fn cpu_model() -> String {
    #[cfg(target_arch = "x86_64")]
    {
        use core::arch::x86_64::__cpuid;
        // SAFETY: CPUID is available on every x86-64 CPU; leaves above the reported maximum
        // are not queried. (`__cpuid` is a safe fn in newer std, an unsafe one in 1.89.)
        #[allow(unused_unsafe)]
        let (max_ext, sig) = unsafe { (__cpuid(0x8000_0000).eax, __cpuid(1).eax) };
        let mut brand = String::new();
        if max_ext >= 0x8000_0004 {
            let mut bytes = Vec::with_capacity(48);
            for leaf in 0x8000_0002u32..=0x8000_0004 {
                // SAFETY: as above, the leaf is at most max_ext.
                #[allow(unused_unsafe)]
                let r = unsafe { __cpuid(leaf) };
                for w in [r.eax, r.ebx, r.ecx, r.edx] {
                    bytes.extend_from_slice(&w.to_le_bytes());
                }
            }
            brand = String::from_utf8_lossy(&bytes).trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_string();
        }
        let base_family = (sig >> 8) & 0xf;
        let family = if base_family == 0xf { base_family + ((sig >> 20) & 0xff) } else { base_family };
        let model = if base_family == 0x6 || base_family == 0xf { ((sig >> 16) & 0xf) << 4 | ((sig >> 4) & 0xf) } else { (sig >> 4) & 0xf };
        if brand.is_empty() {
            brand = "x86-64".to_string();
        }
        format!("{brand} (family {family}, model {model})")
    }
    #[cfg(not(target_arch = "x86_64"))]
    String::from("unknown")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_value_lowers_the_level_and_never_raises_it() {
        use SimdLevel::*;
        assert_eq!(choose_level(None, V4), (V4, None));
        assert_eq!(choose_level(Some(" "), V3), (V3, None));
        assert_eq!(choose_level(Some("v3"), V4), (V3, None));
        assert_eq!(choose_level(Some("SCALAR"), V3), (Scalar, None));
        assert_eq!(choose_level(Some("v4"), V4), (V4, None));
        let (l, w) = choose_level(Some("v4"), V3);
        assert_eq!(l, V3);
        assert!(w.unwrap().contains("does not support v4"));
        let (l, w) = choose_level(Some("avx9"), Scalar);
        assert_eq!(l, Scalar);
        assert!(w.unwrap().contains("not one of"));
    }

    #[test]
    fn cpu_model_names_family_and_model() {
        let m = cpu_model();
        eprintln!("cpu_model = {m}");
        #[cfg(target_arch = "x86_64")]
        assert!(m.contains("(family ") && m.contains(", model "), "{m}");
    }
}
