//! HighestAttnKeys selection (spec §4.1): score every row by its attention over the reference
//! queries, keep the top t. Ties go to the lower position (project rule; the reference uses `topk`).

use super::fit::Elem;

/// Per-key score over the n queries (spec §4.1 table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Score {
    /// sqrt(mean_i A_ij²) — every AM config.
    Rms,
    /// max_i A_ij — KVzip-style baseline.
    Max,
    /// mean_i A_ij — H2O+/SnapKV-style baselines and `baseline`.
    Mean,
}

impl Score {
    /// `rms`, `max` or `mean`.
    pub fn parse(s: &str) -> crate::Result<Score> {
        match s {
            "rms" => Ok(Score::Rms),
            "max" => Ok(Score::Max),
            "mean" => Ok(Score::Mean),
            _ => Err(crate::Error::Invalid(format!("unknown key score {s:?} (expected rms, max or mean)"))),
        }
    }

    /// The name [`Score::parse`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            Score::Rms => "rms",
            Score::Max => "max",
            Score::Mean => "mean",
        }
    }
}

/// Optional 1-D pooling of the scores over positions (baselines only): kernel k, padding k/2,
/// stride 1, like torch's `max_pool1d` / `avg_pool1d` (avg counts the zero padding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Max over a window of the given kernel size (0 is treated as 1).
    Max(usize),
    /// Mean over a window of the given kernel size, padding counted as 0 (0 is treated as 1).
    Avg(usize),
}

/// Scores \[T\] from E [n, T] (row-major) and Z̃ \[n\], accumulated in f64: A_ij = E_ij / Z̃_i.
pub fn scores<T: Elem>(e: &[T], z: &[f64], n: usize, t_rows: usize, score: Score) -> Vec<f64> {
    struct Op<'a, T>(&'a [T], &'a [f64], usize, usize, Score);
    impl<T: Elem> pulp::WithSimd for Op<'_, T> {
        type Output = Vec<f64>;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _simd: S) -> Vec<f64> {
            scores_body(self.0, self.1, self.2, self.3, self.4)
        }
    }
    pulp::Arch::new().dispatch(Op(e, z, n, t_rows, score))
}

#[inline(always)]
fn scores_body<T: Elem>(e: &[T], z: &[f64], n: usize, t_rows: usize, score: Score) -> Vec<f64> {
    let mut acc = vec![0.0f64; t_rows];
    for i in 0..n {
        let inv = 1.0 / z[i];
        let row = &e[i * t_rows..(i + 1) * t_rows];
        match score {
            Score::Rms => {
                for (a, &x) in acc.iter_mut().zip(row) {
                    let v = x.to_f64() * inv;
                    *a += v * v;
                }
            }
            Score::Mean => {
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a += x.to_f64() * inv;
                }
            }
            Score::Max => {
                for (a, &x) in acc.iter_mut().zip(row) {
                    *a = a.max(x.to_f64() * inv);
                }
            }
        }
    }
    let nf = n.max(1) as f64;
    match score {
        Score::Rms => acc.iter_mut().for_each(|a| *a = (*a / nf).sqrt()),
        Score::Mean => acc.iter_mut().for_each(|a| *a /= nf),
        Score::Max => {}
    }
    acc
}

/// Apply [`Pooling`] to a score vector.
pub fn pool(scores: &[f64], pooling: Pooling) -> Vec<f64> {
    let n = scores.len();
    let (k, is_max) = match pooling {
        Pooling::Max(k) => (k.max(1), true),
        Pooling::Avg(k) => (k.max(1), false),
    };
    let pad = k / 2;
    (0..n)
        .map(|i| {
            let lo = i as isize - pad as isize;
            let mut best = f64::NEG_INFINITY;
            let mut sum = 0.0;
            for w in 0..k as isize {
                let p = lo + w;
                let v = if p < 0 || p >= n as isize { None } else { Some(scores[p as usize]) };
                if let Some(v) = v {
                    best = best.max(v);
                    sum += v;
                }
            }
            if is_max {
                best
            } else {
                sum / k as f64
            }
        })
        .collect()
}

/// Indices of the `t` largest `scores`, ties to the lower index, returned in increasing order.
/// NaN scores rank last.
pub fn top_t(scores: &[f64], t: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    let key = |i: usize| if scores[i].is_nan() { f64::NEG_INFINITY } else { scores[i] };
    idx.sort_by(|&a, &b| key(b).total_cmp(&key(a)).then(a.cmp(&b)));
    idx.truncate(t);
    idx.sort_unstable();
    idx
}
