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
// Hot inner helper: the scratch buffers are passed in so the parallel map can reuse them.
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
/// uses its whole rows only.
pub fn evaluate_head(input: &HeadInput, out: &CompactedHead, test_queries: &[f32]) -> HeadEval {
    let d = input.d.max(1);
    let m = test_queries.len() / d;
    let scale = input.scale as f64;
    let per_query: Vec<(f64, f64, f64, f64)> = (0..m)
        .into_par_iter()
        .map_init(
            || (vec![0.0f64; d], vec![0.0f64; d], Vec::new()),
            |(o, oc, logits), i| {
                let q = &test_queries[i * d..(i + 1) * d];
                let lse = attend_f64(q, input.keys, input.values, input.bias, scale, d, o, logits);
                let lse_c = attend_f64(q, &out.keys, &out.values, Some(&out.beta), scale, d, oc, logits);
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
            },
        )
        .collect();
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
