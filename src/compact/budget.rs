//! [`Budget`]: how many rows a head keeps, in the three forms the fronts take — the AM paper's
//! ratio (`--ratio R`: T/R), kvpress's compression ratio (`--compression-ratio r`: int(T·(1 − r)))
//! and absolute rows (`--budget N`). Every front turns a form into rows through [`Budget::rows`].

use std::fmt;

use crate::error::{Error, Result};

/// How many rows of a span of T rows one (layer, KV head) keeps.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Budget {
    /// Keep ⌊T / R⌋ rows (R ≥ 1; the AM paper's "R× compaction").
    Ratio(f64),
    /// kvpress: keep int(T·(1 − r)) rows, r in [0, 1).
    CompressionRatio(f64),
    /// Keep N ≥ 1 rows per KV head (all of them when a span is shorter).
    #[serde(rename = "budget")]
    Rows(usize),
}

impl Default for Budget {
    fn default() -> Self {
        Budget::Ratio(20.0)
    }
}

impl Budget {
    /// The one form among the three optional flags; `None` when none is given (the caller's
    /// default applies). Two or more forms at once is an error.
    pub fn from_forms(ratio: Option<f64>, compression_ratio: Option<f64>, rows: Option<usize>) -> Result<Option<Budget>> {
        let forms = [ratio.map(Budget::Ratio), compression_ratio.map(Budget::CompressionRatio), rows.map(Budget::Rows)];
        let given: Vec<Budget> = forms.into_iter().flatten().collect();
        match given[..] {
            [] => Ok(None),
            [b] => b.check().map(|()| Some(b)),
            _ => Err(Error::Invalid("give one budget form: ratio, compression_ratio or budget, not several".into())),
        }
    }

    /// Refuse values outside the form's range, with a one-line message naming the form.
    pub fn check(&self) -> Result<()> {
        match *self {
            Budget::Ratio(r) if !(r >= 1.0 && r.is_finite()) => Err(Error::Invalid(format!("ratio must be a finite number ≥ 1, got {r}"))),
            Budget::CompressionRatio(r) if !(0.0..1.0).contains(&r) => Err(Error::Invalid(format!("compression ratio must be in [0, 1), got {r}"))),
            Budget::Rows(0) => Err(Error::Invalid("budget must be at least 1 row per KV head, got 0".into())),
            _ => Ok(()),
        }
    }

    /// Rows kept of a span of `t` rows: between 1 and `t` (0 only when `t` is 0).
    pub fn rows(&self, t: usize) -> Result<usize> {
        self.check()?;
        let kept = match *self {
            Budget::Ratio(r) => (t as f64 / r).floor() as usize,
            // As kvpress computes it: `int(q_len * (1 - compression_ratio))` in Python floats
            // (T·(1 − r) rounded once, then truncated), so 25 rows at 0.56 keep 10, not 11.
            Budget::CompressionRatio(r) => (t as f64 * (1.0 - r)) as usize,
            Budget::Rows(n) => n,
        };
        Ok(kept.clamp(1.min(t), t))
    }

    /// The compression ratio r a kvpress press gets for a span of `t` rows: r itself for
    /// [`Budget::CompressionRatio`]; otherwise the r whose kvpress row count int(t·(1 − r)) is
    /// exactly [`Budget::rows`]`(t)` (1 − n/t, moved by one ulp where f64 rounding would lose a
    /// row). Presses whose budget is not one count per head (PyramidKV's layer schedule, KVzip's
    /// global selection) see the same r a kvpress user would pass.
    pub fn compression_ratio(&self, t: usize) -> Result<f64> {
        if let Budget::CompressionRatio(r) = *self {
            self.check()?;
            return Ok(r);
        }
        let n = self.rows(t)?;
        if t == 0 || n >= t {
            return Ok(0.0);
        }
        let kept = |r: f64| (t as f64 * (1.0 - r)) as usize;
        let mut r = 1.0 - n as f64 / t as f64;
        // r is in (0, 1): stepping the bit pattern moves it by one ulp.
        while kept(r) < n {
            r = f64::from_bits(r.to_bits() - 1);
        }
        while kept(r) > n {
            r = f64::from_bits(r.to_bits() + 1);
        }
        Ok(r)
    }

    /// The form's name as a flag (`ratio`, `compression_ratio`, `budget`) and its value, for
    /// records such as a cache file's parameters.
    pub fn entry(&self) -> (&'static str, serde_json::Value) {
        match *self {
            Budget::Ratio(r) => ("ratio", r.into()),
            Budget::CompressionRatio(r) => ("compression_ratio", r.into()),
            Budget::Rows(n) => ("budget", n.into()),
        }
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Ratio(r) => write!(f, "{r}x"),
            Budget::CompressionRatio(r) => write!(f, "compression ratio {r}"),
            Budget::Rows(n) => write!(f, "{n} rows per head"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_compression_ratio_is_python_int_of_the_f64_product() {
        // (T, r, int(T * (1 - r)) as CPython prints it); the last three differ from exact
        // arithmetic (11, 4, 2) because 1 − r is rounded before the product.
        let cases = [(10, 0.3, 7), (100, 0.7, 30), (3, 0.5, 1), (1000, 0.1, 900), (7, 0.0, 7), (49, 0.2, 39), (4096, 0.875, 512), (29, 0.1, 26), (25, 0.56, 10), (20, 0.8, 3), (10, 0.8, 1)];
        for (t, r, want) in cases {
            assert_eq!(Budget::CompressionRatio(r).rows(t).unwrap(), want, "T={t} r={r}");
        }
        // Python gives 0 here (0.9999999999999998); a head keeps at least one row.
        assert_eq!(Budget::CompressionRatio(0.9).rows(10).unwrap(), 1);
        assert_eq!(Budget::CompressionRatio(0.5).rows(1).unwrap(), 1);
        assert_eq!(Budget::CompressionRatio(0.5).rows(0).unwrap(), 0);
    }

    #[test]
    fn budget_compression_ratio_round_trips_every_row_count() {
        for t in [1usize, 2, 3, 7, 10, 29, 100, 511, 1858, 4096] {
            for n in 1..=t.min(300) {
                let r = Budget::Rows(n).compression_ratio(t).unwrap();
                assert!((0.0..1.0).contains(&r), "T={t} n={n}: r={r}");
                assert_eq!(Budget::CompressionRatio(r).rows(t).unwrap(), n, "T={t} n={n}: r={r}");
            }
        }
        assert_eq!(Budget::Ratio(20.0).compression_ratio(100).unwrap(), 0.95);
        assert_eq!(Budget::CompressionRatio(0.3).compression_ratio(10).unwrap(), 0.3);
        assert_eq!(Budget::Rows(40).compression_ratio(10).unwrap(), 0.0);
    }

    #[test]
    fn budget_ratio_and_rows() {
        assert_eq!(Budget::Ratio(20.0).rows(100).unwrap(), 5);
        assert_eq!(Budget::Ratio(3.0).rows(10).unwrap(), 3);
        assert_eq!(Budget::Ratio(1.0).rows(10).unwrap(), 10);
        assert_eq!(Budget::Ratio(50.0).rows(10).unwrap(), 1);
        assert_eq!(Budget::Ratio(2.0).rows(0).unwrap(), 0);
        assert_eq!(Budget::Rows(4).rows(10).unwrap(), 4);
        assert_eq!(Budget::Rows(40).rows(10).unwrap(), 10);
    }

    #[test]
    fn budget_out_of_range_values_are_one_line_errors() {
        for (b, needle) in [
            (Budget::Ratio(0.5), "ratio must be"),
            (Budget::Ratio(f64::NAN), "ratio must be"),
            (Budget::Ratio(f64::INFINITY), "ratio must be"),
            (Budget::CompressionRatio(1.0), "[0, 1)"),
            (Budget::CompressionRatio(-0.1), "[0, 1)"),
            (Budget::CompressionRatio(f64::NAN), "[0, 1)"),
            (Budget::Rows(0), "at least 1"),
        ] {
            let e = b.rows(10).unwrap_err().to_string();
            assert!(e.contains(needle) && !e.contains('\n'), "{b:?}: {e}");
        }
    }

    #[test]
    fn budget_forms_are_exclusive() {
        assert_eq!(Budget::from_forms(None, None, None).unwrap(), None);
        assert_eq!(Budget::from_forms(None, Some(0.5), None).unwrap(), Some(Budget::CompressionRatio(0.5)));
        assert_eq!(Budget::from_forms(None, None, Some(8)).unwrap(), Some(Budget::Rows(8)));
        assert!(Budget::from_forms(Some(2.0), None, Some(8)).unwrap_err().to_string().contains("one budget form"));
        assert!(Budget::from_forms(Some(2.0), Some(0.5), None).is_err());
        assert!(Budget::from_forms(None, Some(1.5), None).unwrap_err().to_string().contains("[0, 1)"));
    }

    #[test]
    fn budget_records_its_form() {
        assert_eq!(Budget::CompressionRatio(0.3).entry(), ("compression_ratio", serde_json::json!(0.3)));
        assert_eq!(serde_json::to_value(Budget::Rows(8)).unwrap(), serde_json::json!({"budget": 8}));
        assert_eq!(serde_json::to_value(Budget::Ratio(20.0)).unwrap(), serde_json::json!({"ratio": 20.0}));
    }
}
