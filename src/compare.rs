//! The one tensor comparator every golden test uses.
//!
//! It reports the evidence, not just a verdict: max |Δ| and where, the NMSE
//! (Σ(a−b)² / Σb², scale-aware like llama.cpp's test-backend-ops), the NaN/±inf pattern of both
//! sides, and the first mismatching pairs. A non-finite value on one side that the other side
//! does not have at the same index (with the same sign for inf) always fails.

use std::fmt;

/// The evidence of one [`compare`]: statistics over the common prefix of `got` and `want`.
/// `Display` prints it on one line.
#[derive(Debug, Clone)]
pub struct Report {
    /// Label given to [`compare`], printed first.
    pub name: String,
    /// Length of the reference `want`.
    pub n: usize,
    /// Largest |got − want| over indices where both are finite (0 if there are none).
    pub max_abs: f64,
    /// Index of `max_abs` (0 if there are no finite pairs).
    pub max_abs_idx: usize,
    /// (got, want) at `max_abs_idx`.
    pub max_abs_pair: (f32, f32),
    /// Σ(got − want)² / Σwant² over the finite pairs; the bare Σ(got − want)² when Σwant² = 0.
    pub nmse: f64,
    /// Indices where the NaN/inf pattern differs.
    pub pattern_mismatches: usize,
    /// NaN/±inf count in all of `got`.
    pub got_nonfinite: usize,
    /// NaN/±inf count in all of `want`.
    pub want_nonfinite: usize,
    /// `Some((got.len(), want.len()))` when the lengths differ (always a failure).
    pub length_mismatch: Option<(usize, usize)>,
    /// First pairs (index, got, want), at most 5, whose |Δ| exceeds `tol` or whose NaN/inf
    /// pattern differs.
    pub first_bad: Vec<(usize, f32, f32)>,
    /// Absolute tolerance on `max_abs` for the verdict.
    pub tol: f64,
}

/// Compare `got` against the reference `want`, with an absolute tolerance for the verdict.
pub fn compare(name: &str, got: &[f32], want: &[f32], tol: f64) -> Report {
    let mut r = Report {
        name: name.into(),
        n: want.len(),
        max_abs: 0.0,
        max_abs_idx: 0,
        max_abs_pair: (0.0, 0.0),
        nmse: 0.0,
        pattern_mismatches: 0,
        got_nonfinite: got.iter().filter(|x| !x.is_finite()).count(),
        want_nonfinite: want.iter().filter(|x| !x.is_finite()).count(),
        length_mismatch: (got.len() != want.len()).then_some((got.len(), want.len())),
        first_bad: Vec::new(),
        tol,
    };
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (i, (&a, &b)) in got.iter().zip(want).enumerate() {
        if !a.is_finite() || !b.is_finite() {
            let same = (a.is_nan() && b.is_nan()) || (a.is_infinite() && a == b);
            if !same {
                r.pattern_mismatches += 1;
                if r.first_bad.len() < 5 {
                    r.first_bad.push((i, a, b));
                }
            }
            continue;
        }
        let diff = (a as f64 - b as f64).abs();
        num += diff * diff;
        den += (b as f64) * (b as f64);
        if diff > r.max_abs {
            r.max_abs = diff;
            r.max_abs_idx = i;
            r.max_abs_pair = (a, b);
        }
        if diff > tol && r.first_bad.len() < 5 {
            r.first_bad.push((i, a, b));
        }
    }
    r.nmse = if den > 0.0 { num / den } else { num };
    r
}

impl Report {
    /// The verdict: equal lengths, the same NaN/inf pattern, and `max_abs ≤ tol`.
    pub fn ok(&self) -> bool {
        self.length_mismatch.is_none() && self.pattern_mismatches == 0 && self.max_abs <= self.tol
    }

    /// Panic with the full report unless it passes (for tests).
    #[track_caller]
    pub fn assert_ok(&self) {
        assert!(self.ok(), "{self}");
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} [{}]: n={} max|Δ|={:.3e} at {} (got {}, want {}) NMSE={:.3e} nonfinite got/want={}/{} pattern-mismatch={} tol={:.1e}",
            self.name,
            if self.ok() { "ok" } else { "FAIL" },
            self.n,
            self.max_abs,
            self.max_abs_idx,
            self.max_abs_pair.0,
            self.max_abs_pair.1,
            self.nmse,
            self.got_nonfinite,
            self.want_nonfinite,
            self.pattern_mismatches,
            self.tol
        )?;
        if let Some((g, w)) = self.length_mismatch {
            write!(f, " LENGTH got {g} want {w}")?;
        }
        if !self.first_bad.is_empty() {
            write!(f, " first bad (i, got, want): {:?}", self.first_bad)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_max_nmse_and_patterns() {
        let r = compare("x", &[1.0, 2.0, 3.5], &[1.0, 2.0, 3.0], 0.1);
        assert!(!r.ok());
        assert_eq!((r.max_abs, r.max_abs_idx), (0.5, 2));
        assert!((r.nmse - 0.25 / 14.0).abs() < 1e-12);
        assert!(compare("x", &[1.0, 2.0, 3.05], &[1.0, 2.0, 3.0], 0.1).ok());
        // NaN where the reference is finite fails even with a huge tolerance.
        let r = compare("x", &[f32::NAN, 1.0], &[0.0, 1.0], 1e9);
        assert!(!r.ok() && r.pattern_mismatches == 1);
        // Matching infinities are fine; opposite signs are not.
        assert!(compare("x", &[f32::INFINITY], &[f32::INFINITY], 0.0).ok());
        assert!(!compare("x", &[f32::NEG_INFINITY], &[f32::INFINITY], 0.0).ok());
        assert!(!compare("x", &[1.0], &[1.0, 2.0], 1.0).ok());
    }
}
