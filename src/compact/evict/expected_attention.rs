//! Expected Attention (arXiv 2510.00636; spec `baselines.md` §2 and its Expected Attention note):
//! score each row by the attention that future queries are expected to give it.
//!
//! Per query head of the GQA group:
//! 1. μ, Σ: mean and covariance (1/m) of the **pre-RoPE** context queries, skipping positions
//!    < `n_sink` (post-RoPE queries recorded at prefill are rotated back by their position).
//! 2. R̄ = the RoPE rotation averaged over the `n_future` positions after the logical length T;
//!    μ′ = R̄μ, Σ′ = R̄ΣR̄ᵀ.
//! 3. z_j = s·⟨k_j, μ′⟩ + ½·s²·k_jᵀΣ′k_j + b_j (the Gaussian moment-generating function; s = 1/√d
//!    gives the spec's ⟨k, μ′⟩/√d + kᵀΣ′k/(2d)), over every row of the head (`HeadContext::full`).
//! 4. softmax over j, then the mean over the group; s_j = (softmax_j + ε)·‖v_j‖₂.
//!
//! The first `n_sink` rows are protected. Defaults n_future = 512, n_sink = 4, ε = 1e-2 (the
//! leaderboard entry). Fallback without observed queries or RoPE frequencies: μ′ and Σ′ are the
//! statistics of `HeadInput::queries` taken as future post-RoPE queries (no rotation averaging).

use crate::model::rope::rope_rotate;
use crate::compact::head::{HeadContext, HeadInput};
use crate::compact::method::{Protect, Scorer};
use crate::{Error, Result};

/// Expected Attention scorer: attention expected from Gaussian future queries, times ‖v_j‖₂.
#[derive(Debug, Clone, Copy)]
pub struct ExpectedAttention {
    /// Future positions after the logical length that the RoPE rotation is averaged over (default 512).
    pub n_future: usize,
    /// Context positions < n_sink are left out of the query statistics, and the first n_sink
    /// span rows are protected (default 4).
    pub n_sink: usize,
    /// Added to the expected attention before the ‖v_j‖₂ weighting (default 1e-2).
    pub epsilon: f64,
}

impl Default for ExpectedAttention {
    fn default() -> Self {
        ExpectedAttention { n_future: 512, n_sink: 4, epsilon: 1e-2 }
    }
}

/// Mean \[d\] and covariance [d, d] (row-major, 1/m) of the rows of `q` [m, d], in f64.
pub fn moments(q: &[f32], d: usize) -> (Vec<f64>, Vec<f64>) {
    let m = q.len() / d;
    let mut mu = vec![0.0f64; d];
    for r in q.chunks(d) {
        mu.iter_mut().zip(r).for_each(|(a, &x)| *a += x as f64);
    }
    mu.iter_mut().for_each(|a| *a /= m.max(1) as f64);
    let mut cov = vec![0.0f64; d * d];
    for r in q.chunks(d) {
        for a in 0..d {
            let xa = r[a] as f64 - mu[a];
            for b in 0..d {
                cov[a * d + b] += xa * (r[b] as f64 - mu[b]);
            }
        }
    }
    cov.iter_mut().for_each(|c| *c /= m.max(1) as f64);
    (mu, cov)
}

/// The RoPE rotation averaged over positions [from, from + n) as a dense [d, d] matrix (row-major):
/// per rotate-half pair (i, i + d/2), [[c̄, −s̄], [s̄, c̄]].
pub fn mean_rotation(d: usize, inv_freq: &[f32], from: usize, n: usize) -> Vec<f64> {
    let half = d / 2;
    let mut r = vec![0.0f64; d * d];
    for j in 0..half {
        let (mut c, mut s) = (0.0f64, 0.0f64);
        for p in from..from + n.max(1) {
            let a = (p as f32 * inv_freq[j]) as f64;
            c += a.cos();
            s += a.sin();
        }
        c /= n.max(1) as f64;
        s /= n.max(1) as f64;
        r[j * d + j] = c;
        r[j * d + j + half] = -s;
        r[(j + half) * d + j + half] = c;
        r[(j + half) * d + j] = s;
    }
    r
}

impl ExpectedAttention {
    /// μ′ and Σ′ of each query head of the group: future post-RoPE query statistics.
    fn future_moments(&self, input: &HeadInput, ctx: &HeadContext) -> Result<Vec<(Vec<f64>, Vec<f64>)>> {
        let d = input.d;
        let g = ctx.group.max(1);
        if let (Some(o), Some(inv)) = (ctx.observed, ctx.inv_freq) {
            let from = o.positions.partition_point(|&p| (p as usize) < self.n_sink);
            if from < o.len() {
                let rbar = mean_rotation(d, inv, ctx.next_pos, self.n_future);
                return Ok((0..g)
                    .map(|r| {
                        let mut q = o.head_rows(input.kv_head * g + r, d, from..o.len());
                        for (row, &p) in q.chunks_mut(d).zip(&o.positions[from..]) {
                            rope_rotate(row, p, inv, true);
                        }
                        let (mu, cov) = moments(&q, d);
                        (mat_vec(&rbar, &mu, d), sandwich(&rbar, &cov, d))
                    })
                    .collect());
            }
        }
        let q = input.queries.ok_or_else(|| Error::Invalid("expected-attention: no queries (observed context queries or HeadInput::queries)".into()))?;
        let per = q.len() / d / g;
        Ok((0..g).map(|r| moments(&q[r * per * d..(r + 1) * per * d], d)).collect())
    }
}

fn mat_vec(a: &[f64], x: &[f64], d: usize) -> Vec<f64> {
    (0..d).map(|i| (0..d).map(|k| a[i * d + k] * x[k]).sum()).collect()
}

/// R Σ Rᵀ for [d, d] row-major matrices.
fn sandwich(r: &[f64], s: &[f64], d: usize) -> Vec<f64> {
    let mut rs = vec![0.0f64; d * d];
    for i in 0..d {
        for k in 0..d {
            let a = r[i * d + k];
            if a != 0.0 {
                for j in 0..d {
                    rs[i * d + j] += a * s[k * d + j];
                }
            }
        }
    }
    let mut out = vec![0.0f64; d * d];
    for i in 0..d {
        for j in 0..d {
            out[i * d + j] = (0..d).map(|k| rs[i * d + k] * r[j * d + k]).sum();
        }
    }
    out
}

impl ExpectedAttention {
    /// The scores of [`Scorer::score_head`]. With `skip_sinks` (kvpress), the first `n_sink` rows
    /// of the whole head are left out of the softmax (kvpress slices them off the keys before
    /// scoring) and their span rows score 0 (the caller protects them).
    pub(crate) fn scores(&self, input: &HeadInput, ctx: &HeadContext, skip_sinks: bool) -> Result<Vec<f64>> {
        let d = input.d;
        let t = input.rows();
        let s = input.scale as f64;
        // The softmax runs over the whole head when it is known.
        let (keys, bias, span) = match &ctx.full {
            Some(f) => (f.keys, f.bias, f.span.clone()),
            None => (input.keys, input.bias, 0..t),
        };
        let moms = self.future_moments(input, ctx)?;
        let mut attn = vec![0.0f64; t];
        let mut z = vec![0.0f64; keys.len() / d];
        let mut sk = vec![0.0f64; d];
        for (mu, cov) in &moms {
            for (j, k) in keys.chunks(d).enumerate() {
                let lin: f64 = k.iter().zip(mu).map(|(&a, b)| a as f64 * b).sum();
                for (a, row) in sk.iter_mut().zip(cov.chunks(d)) {
                    *a = row.iter().zip(k).map(|(c, &x)| c * x as f64).sum();
                }
                let quad: f64 = k.iter().zip(&sk).map(|(&a, b)| a as f64 * b).sum();
                z[j] = s * lin + 0.5 * s * s * quad + bias.map_or(0.0, |b| b[j] as f64);
            }
            let from = if skip_sinks { self.n_sink.min(z.len()) } else { 0 };
            let mx = z[from..].iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let tot: f64 = z[from..].iter().map(|x| (x - mx).exp()).sum();
            for (j, (a, &zj)) in attn.iter_mut().zip(&z[span.clone()]).enumerate() {
                if span.start + j >= from {
                    *a += (zj - mx).exp() / tot / moms.len() as f64;
                }
            }
        }
        Ok(attn
            .iter()
            .zip(input.values.chunks(d))
            .map(|(a, v)| (a + self.epsilon) * v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt())
            .collect())
    }
}

impl Scorer for ExpectedAttention {
    fn name(&self) -> &'static str {
        "expected-attention"
    }

    fn needs_queries(&self) -> bool {
        true
    }

    fn score_head(&self, input: &HeadInput, ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        self.scores(input, ctx, false)
    }

    fn protect(&self, _rows: usize, _budget: usize, _ctx: &HeadContext) -> Protect {
        Protect { sinks: self.n_sink, window: 0 }
    }
}
