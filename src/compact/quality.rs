//! Per-head quality of a compressed head on held-out queries (spec §14), in f64.

use rayon::prelude::*;
use serde::Serialize;

use super::head::{CompactedHead, HeadInput};

/// Per-head quality on held-out queries (spec §14).
#[derive(Debug, Clone, Default, Serialize)]
pub struct HeadEval {
    /// Held-out queries m evaluated (whole rows of `test_queries`).
    pub queries: usize,
    /// ‖o − ô‖ / (‖o‖ + 1e-10), mean over queries.
    pub mean_rel_l2: f64,
    /// Relative L2 error of the output, max over queries.
    pub max_rel_l2: f64,
    /// |exp(lse_c − lse) − 1| (|Δlse| when |Δlse| < 1e-10), mean over queries.
    pub mean_mass_err: f64,
    /// Mass error, max over queries.
    pub max_mass_err: f64,
    /// mean over queries of mean_d (o − ô)².
    pub mean_mse: f64,
    /// mean over queries of cos(o, ô) (eps 1e-8).
    pub mean_cos: f64,
}

/// Attention output and log-sum-exp of `q` [d] against rows (`keys` [r, d], `values` [r, d],
/// additive `bias` [r]) in f64. No rows gives (0, −inf): spec §7 rule 6, never NaN.
// The kernel of the naive twin [`evaluate_head_ref`]: one query, sequential sums, libm exp.
#[allow(clippy::too_many_arguments)]
fn attend_f64(q: &[f32], keys: &[f32], values: &[f32], bias: Option<&[f32]>, scale: f64, d: usize, out: &mut [f64], logits: &mut Vec<f64>) -> f64 {
    let r = keys.len() / d;
    logits.clear();
    for j in 0..r {
        let k = &keys[j * d..(j + 1) * d];
        let dot: f64 = q.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
        logits.push(scale * dot + bias.map_or(0.0, |b| b[j] as f64));
    }
    out.iter_mut().for_each(|o| *o = 0.0);
    let mx = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if mx == f64::NEG_INFINITY {
        return f64::NEG_INFINITY;
    }
    let mut z = 0.0;
    for (j, &l) in logits.iter().enumerate() {
        let e = (l - mx).exp();
        z += e;
        let v = &values[j * d..(j + 1) * d];
        for (o, &vv) in out.iter_mut().zip(v) {
            *o += e * vv as f64;
        }
    }
    out.iter_mut().for_each(|o| *o /= z);
    mx + z.ln()
}

/// Per-head quality on held-out queries (spec §14): mean over queries of relative L2 of outputs and mass error |exp(lse_c − lse) − 1|, plus max.
///
/// `test_queries` [m, d] (group-major like the reference queries). o uses (K, V, prior bias b), ô
/// uses (C_k, C_v, β). Everything in f64; a malformed `test_queries` (length not a multiple of d)
/// uses its whole rows only. Blocks of queries run as f64 GEMMs (logits, then P·V) in parallel;
/// [`evaluate_head_ref`] is the one-query-at-a-time twin, equal to rounding.
pub fn evaluate_head(input: &HeadInput, out: &CompactedHead, test_queries: &[f32]) -> HeadEval {
    const BLOCK: usize = 32;
    let d = input.d.max(1);
    let m = test_queries.len() / d;
    let scale = input.scale as f64;
    let full = Rows64::new(input.keys, input.values, input.bias, d);
    let comp = Rows64::new(&out.keys, &out.values, Some(&out.beta), d);
    let per_query: Vec<(f64, f64, f64, f64)> = test_queries[..m * d]
        .par_chunks(BLOCK * d)
        .flat_map_iter(|qb| {
            let (o, lse) = full.attend(qb, scale);
            let (oc, lse_c) = comp.attend(qb, scale);
            (0..qb.len() / d).map(move |i| query_metrics(&o[i * d..(i + 1) * d], &oc[i * d..(i + 1) * d], lse[i], lse_c[i])).collect::<Vec<_>>()
        })
        .collect();
    summarize(m, &per_query)
}

/// Rows (keys, values [r, d], bias [r]) widened to f64 once per head for [`evaluate_head`].
struct Rows64 {
    k: Vec<f64>,            // [r, d]
    v: Vec<f64>,            // [r, d]
    bias: Option<Vec<f64>>, // [r]
    r: usize,
    d: usize,
}

impl Rows64 {
    fn new(keys: &[f32], values: &[f32], bias: Option<&[f32]>, d: usize) -> Rows64 {
        let r = keys.len() / d;
        let wide = |x: &[f32]| x[..r * d].iter().map(|&v| v as f64).collect::<Vec<f64>>();
        Rows64 { k: wide(keys), v: wide(values), bias: bias.map(|b| b[..r].iter().map(|&v| v as f64).collect()), r, d }
    }

    /// Outputs [b, d] and log-sum-exps [b] of the query block `q` [b, d]; no rows (or every
    /// logit −inf) gives (0, −inf) for that query, as [`attend_f64`] does.
    fn attend(&self, q: &[f32], scale: f64) -> (Vec<f64>, Vec<f64>) {
        use faer::linalg::matmul::matmul;
        use faer::{Accum, MatMut, MatRef, Par};
        let (r, d) = (self.r, self.d);
        let b = q.len() / d;
        let q64: Vec<f64> = q.iter().map(|&x| x as f64).collect(); // [b, d]
        let mut p = vec![0.0f64; b * r]; // [b, r] logits, then probabilities
        let mut out = vec![0.0f64; b * d]; // [b, d]
        let mut lse = vec![f64::NEG_INFINITY; b];
        if r == 0 {
            return (out, lse);
        }
        matmul(
            MatMut::from_row_major_slice_mut(&mut p, b, r),
            Accum::Replace,
            MatRef::from_row_major_slice(&q64, b, d),
            MatRef::from_row_major_slice(&self.k, r, d).transpose(),
            scale,
            Par::Seq,
        );
        let mut dead = vec![false; b];
        for (i, row) in p.chunks_mut(r).enumerate() {
            if let Some(bias) = &self.bias {
                row.iter_mut().zip(bias).for_each(|(x, &bb)| *x += bb);
            }
            let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            if mx == f64::NEG_INFINITY {
                row.iter_mut().for_each(|x| *x = 0.0);
                dead[i] = true;
                continue;
            }
            let z = crate::linalg::expf::exp_shift_sum_f64(row, mx);
            lse[i] = mx + z.ln();
            let inv = 1.0 / z;
            row.iter_mut().for_each(|x| *x *= inv);
        }
        matmul(
            MatMut::from_row_major_slice_mut(&mut out, b, d),
            Accum::Replace,
            MatRef::from_row_major_slice(&p, b, r),
            MatRef::from_row_major_slice(&self.v, r, d),
            1.0,
            Par::Seq,
        );
        for (i, _) in dead.iter().enumerate().filter(|(_, &x)| x) {
            out[i * d..(i + 1) * d].iter_mut().for_each(|x| *x = 0.0);
        }
        (out, lse)
    }
}

/// rel L2, mass error, MSE and cosine of one query's outputs (full `o`, compacted `oc`).
fn query_metrics(o: &[f64], oc: &[f64], lse: f64, lse_c: f64) -> (f64, f64, f64, f64) {
    let d = o.len().max(1);
    let diff2: f64 = o.iter().zip(oc.iter()).map(|(a, b)| (a - b) * (a - b)).sum();
    let no = o.iter().map(|a| a * a).sum::<f64>().sqrt();
    let nc = oc.iter().map(|a| a * a).sum::<f64>().sqrt();
    let rel = diff2.sqrt() / (no + 1e-10);
    let dl = lse_c - lse;
    let mass = if dl.is_nan() {
        f64::NAN
    } else if dl.abs() < 1e-10 {
        dl.abs()
    } else {
        (dl.exp() - 1.0).abs()
    };
    let cos = o.iter().zip(oc.iter()).map(|(a, b)| a * b).sum::<f64>() / (no * nc).max(1e-8);
    (rel, mass, diff2 / d as f64, cos)
}

fn summarize(m: usize, per_query: &[(f64, f64, f64, f64)]) -> HeadEval {
    let mf = m.max(1) as f64;
    HeadEval {
        queries: m,
        mean_rel_l2: per_query.iter().map(|x| x.0).sum::<f64>() / mf,
        max_rel_l2: per_query.iter().map(|x| x.0).fold(0.0, f64::max),
        mean_mass_err: per_query.iter().map(|x| x.1).sum::<f64>() / mf,
        max_mass_err: per_query.iter().map(|x| x.1).fold(0.0, f64::max),
        mean_mse: per_query.iter().map(|x| x.2).sum::<f64>() / mf,
        mean_cos: per_query.iter().map(|x| x.3).sum::<f64>() / mf,
    }
}

/// Naive twin of [`evaluate_head`]: one query at a time, sequential f64 dot products, libm `exp`.
pub fn evaluate_head_ref(input: &HeadInput, out: &CompactedHead, test_queries: &[f32]) -> HeadEval {
    let d = input.d.max(1);
    let m = test_queries.len() / d;
    let scale = input.scale as f64;
    let per_query: Vec<(f64, f64, f64, f64)> = (0..m)
        .map(|i| {
            let (mut o, mut oc, mut logits) = (vec![0.0f64; d], vec![0.0f64; d], Vec::new());
            let q = &test_queries[i * d..(i + 1) * d];
            let lse = attend_f64(q, input.keys, input.values, input.bias, scale, d, &mut o, &mut logits);
            let lse_c = attend_f64(q, &out.keys, &out.values, Some(&out.beta), scale, d, &mut oc, &mut logits);
            query_metrics(&o, &oc, lse, lse_c)
        })
        .collect();
    summarize(m, &per_query)
}

#[cfg(test)]
mod tests {
    use super::{evaluate_head, evaluate_head_ref};
    use crate::compact::{CompactedHead, HeadInput, HeadStats};
    use crate::sampling::Rng;

    /// The blocked GEMM evaluation equals the one-query-at-a-time twin to rounding, with a prior
    /// bias, a β with −inf entries (a query block whose compacted logits are all −inf), query counts
    /// that are not a multiple of the block, and a compacted head with no rows.
    #[test]
    fn blocked_evaluation_matches_its_twin() {
        let mut rng = Rng::new(5);
        let mut g = |n: usize, s: f64| (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * s) as f32).collect::<Vec<f32>>();
        let (t_rows, d) = (301, 16);
        let (keys, values, bias) = (g(t_rows * d, 1.5), g(t_rows * d, 1.0), g(t_rows, 2.0));
        let positions: Vec<u32> = (0..t_rows as u32).collect();
        let input = HeadInput { layer: 0, kv_head: 0, d, keys: &keys, values: &values, positions: &positions, bias: Some(&bias), queries: None, scale: 0.25 };
        for (t, m, dead) in [(37usize, 70usize, false), (5, 33, true), (0, 9, false), (37, 1, false)] {
            let mut beta = g(t, 3.0);
            if dead {
                beta.iter_mut().for_each(|b| *b = f32::NEG_INFINITY);
            }
            let out = CompactedHead { indices: (0..t).collect(), keys: keys[..t * d].to_vec(), beta, values: g(t * d, 1.0), stats: HeadStats::default() };
            let q = g(m * d, 2.0);
            let (a, b) = (evaluate_head(&input, &out, &q), evaluate_head_ref(&input, &out, &q));
            assert_eq!(a.queries, b.queries);
            for (x, y) in [(a.mean_rel_l2, b.mean_rel_l2), (a.max_rel_l2, b.max_rel_l2), (a.mean_mass_err, b.mean_mass_err), (a.max_mass_err, b.max_mass_err), (a.mean_mse, b.mean_mse), (a.mean_cos, b.mean_cos)] {
                assert!((x - y).abs() <= 1e-12 * y.abs().max(1.0), "t {t} m {m}: {x} vs {y}");
            }
        }
    }
}
