//! Slim Attention (Graef & Wasielewski, arXiv 2503.05840): exact K-only caches for
//! multi-head-attention layers.
//!
//! Row-vector convention: K = X·W_K + b_K and V = X·W_V + b_V with W_K, W_V ∈ ℝ^{d×e}. When
//! e = d and W_K is invertible, X = (K − b_K)·W_K⁻¹, so
//!
//! ```text
//! V = (K − 1·b_Kᵀ)·W_KV + 1·b_Vᵀ,   W_KV = W_K⁻¹·W_V  (d×d)
//! ```
//!
//! and a layer need only cache its keys. Because softmax weights sum to one, the attention
//! output of head i is `(k̄ − b_K)·W_KV,i + b_V,i` with `k̄ = Σ_t s_t·k_raw,t` (the full-width,
//! pre-RoPE keys): decode computes that weighted sum first and multiplies by W_KV's column
//! block once (the paper's "option 2"). RoPE is applied to the cached raw keys on read.
//!
//! The runtime caches k0 = x·W_K *without* the bias (the spec caches k_raw = k0 + b_K): the
//! output is then k̄0·W_KV,i + b_V,i and scoring adds b_K on read. Same algebra, but it avoids
//! the f32 cancellation in k_raw − b_K, which cond(W_K) amplifies when |b_K| ≫ |x·W_K|.
//!
//! Exactness is limited by conditioning: rebuilding V costs about cond(W_K)·ε of the K-cache
//! storage dtype. So W_KV is solved in f64 (LU with partial pivoting, never an explicit
//! inverse), stored in f32, the K cache stays f32, and each layer is gated twice:
//! 1. at load, cond(W_K) ≤ `max_cond` (default 1e5, where an f32 cache still reaches ~1e-2
//!    worst case and real activations do much better);
//! 2. on the first prefill a cache sees, the relative Frobenius error of V rebuilt from that
//!    prefill's real keys (against the V computed from X) must be ≤ `max_rel_err`
//!    (default 1e-5). A layer that fails either keeps a normal K/V cache for the whole run.
//!    The check sees only that first prefill's tokens (a few hundred at most per chunk).

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::matmul::matmul;
use faer::{Accum, Conj, Mat, MatRef, Par};
use rayon::prelude::*;

use crate::model::config::Config;
use crate::error::{Error, Result};
use crate::model::weights::{MatrixView, Weights};

/// Default gate on cond(W_K) (spec: an f32 K cache tolerates cond up to about 1e5).
pub const DEFAULT_MAX_COND: f64 = 1e5;
/// Default gate on the relative error of V rebuilt from a prefill's real keys. The spec
/// suggests 1e-3; measured on the tiny golden MHA model, a layer whose V is rebuilt with error
/// 3.3e-4 moves the logits by 1.7e-3 (relative), while layers at ≤ 3e-6 keep them within
/// 4e-6. 1e-5 keeps slim layers exact to f32 working precision; loosen it to trade accuracy
/// for memory.
pub const DEFAULT_MAX_REL_ERR: f64 = 1e-5;

/// The two gates a layer must pass to run slim (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlimOptions {
    /// Layers whose W_K has a larger condition number keep a normal K/V cache.
    pub max_cond: f64,
    /// Layers whose V, rebuilt from the first prefill's keys, is off by more than this
    /// (relative Frobenius) keep a normal K/V cache.
    pub max_rel_err: f64,
}

impl Default for SlimOptions {
    fn default() -> Self {
        SlimOptions { max_cond: DEFAULT_MAX_COND, max_rel_err: DEFAULT_MAX_REL_ERR }
    }
}

/// The f64 solve of one layer.
#[derive(Debug, Clone)]
pub struct WkvSolve {
    /// Side of the square matrices (d_model).
    pub d: usize,
    /// W_KV = W_K⁻¹·W_V, [d, d] row-major (row-vector convention); empty when W_K is singular.
    pub w_kv: Vec<f64>,
    /// σ_max / σ_min of W_K (infinite when singular to f64 precision, cond ≥ 1e15).
    pub cond: f64,
    /// max |W_KV|.
    pub max_abs: f64,
    /// ‖W_K·W_KV − W_V‖_F / ‖W_V‖_F, in f64.
    pub residual: f64,
}

/// Solve W_K·W_KV = W_V in f64 for square HF linear weights `wk_t`, `wv_t` ([d, d], out × in,
/// i.e. W_Kᵀ and W_Vᵀ), and measure cond(W_K). Sequential (Par::Seq), so the result does not
/// depend on the thread count.
pub fn solve_wkv(wk_t: &[f32], wv_t: &[f32], d: usize) -> Result<WkvSolve> {
    if wk_t.len() != d * d || wv_t.len() != d * d {
        return Err(Error::Shape {
            op: "slim::solve_wkv",
            expected: format!("two [{d}, {d}] matrices"),
            got: format!("{} and {} values", wk_t.len(), wv_t.len()),
        });
    }
    if wk_t.iter().chain(wv_t).any(|x| !x.is_finite()) {
        return Err(Error::Invalid("slim attention: W_K or W_V holds NaN/Inf".into()));
    }
    // W_K[i, j] = wk_t[j, i] (in × out).
    let wk = Mat::<f64>::from_fn(d, d, |i, j| wk_t[j * d + i] as f64);
    let wv = Mat::<f64>::from_fn(d, d, |i, j| wv_t[j * d + i] as f64);

    let sv = singular_values(wk.as_ref());
    let (smax, smin) = (sv.first().copied().unwrap_or(0.0), sv.last().copied().unwrap_or(0.0));
    // Beyond 1/ε(f64) the matrix is singular to working precision.
    let cond = if smin > 0.0 && smax / smin < 1e15 { smax / smin } else { f64::INFINITY };
    if !cond.is_finite() {
        return Ok(WkvSolve { d, w_kv: Vec::new(), cond, max_abs: f64::INFINITY, residual: f64::INFINITY });
    }

    // LU with partial pivoting of W_K, then W_KV = U⁻¹·L⁻¹·P·W_V.
    let mut lu = wk.clone();
    let mut perm = vec![0usize; d];
    let mut perm_inv = vec![0usize; d];
    let mut x = wv.clone();
    {
        use faer::linalg::lu::partial_pivoting::{factor, solve};
        let req = StackReq::any_of(&[
            factor::lu_in_place_scratch::<usize, f64>(d, d, Par::Seq, Default::default()),
            solve::solve_in_place_scratch::<usize, f64>(d, d, Par::Seq),
        ]);
        let mut buf = MemBuffer::new(req);
        let stack = MemStack::new(&mut buf);
        let (_, p) = factor::lu_in_place(lu.as_mut(), &mut perm, &mut perm_inv, Par::Seq, stack, Default::default());
        solve::solve_in_place_with_conj(lu.as_ref(), lu.as_ref(), p, Conj::No, x.as_mut(), Par::Seq, stack);
    }

    // Residual ‖W_K·X − W_V‖ / ‖W_V‖.
    let mut r = wv.clone();
    matmul(r.as_mut(), Accum::Add, wk.as_ref(), x.as_ref(), -1.0f64, Par::Seq);
    let residual = r.norm_l2() / wv.norm_l2().max(f64::MIN_POSITIVE);
    let mut w_kv = vec![0.0f64; d * d];
    let mut max_abs = 0.0f64;
    for i in 0..d {
        for j in 0..d {
            let v = x[(i, j)];
            max_abs = max_abs.max(v.abs());
            w_kv[i * d + j] = v;
        }
    }
    Ok(WkvSolve { d, w_kv, cond, max_abs, residual })
}

/// Singular values of a square or rectangular matrix, largest first (f64, sequential).
pub fn singular_values(a: MatRef<'_, f64>) -> Vec<f64> {
    use faer::linalg::svd::{svd, svd_scratch, ComputeSvdVectors};
    let (m, n) = a.shape();
    let k = m.min(n);
    let mut s = faer::diag::Diag::<f64>::zeros(k);
    let req = svd_scratch::<f64>(m, n, ComputeSvdVectors::No, ComputeSvdVectors::No, Par::Seq, Default::default());
    let mut buf = MemBuffer::new(req);
    match svd(a, s.as_mut(), None, None, Par::Seq, MemStack::new(&mut buf), Default::default()) {
        Ok(()) => {
            let mut v: Vec<f64> = s.column_vector().iter().copied().collect();
            v.sort_by(|a, b| b.total_cmp(a));
            v
        }
        // No convergence: report a singular matrix, which disables slim for the layer.
        Err(_) => vec![0.0; k],
    }
}

/// One slim layer's runtime weights.
#[derive(Debug, Clone)]
pub struct SlimLayer {
    /// W_KVᵀ in HF linear layout [e, d] (row j = column j of W_KV), f32, so head i's output
    /// is a GEMV over rows i·d_v..(i+1)·d_v.
    pub w_kv_t: Vec<f32>,
    /// The layer's k_proj bias (None without qkv biases); scoring adds it to the cached k0.
    pub b_k: Option<Vec<f32>>, // [e]
    /// The layer's v_proj bias (None without qkv biases); added to every rebuilt V row.
    pub b_v: Option<Vec<f32>>, // [e]
}

impl SlimLayer {
    /// V rows rebuilt from keys that include the bias: v = (k_raw − b_K)·W_KV + b_V for
    /// `k_raw` [n, e], written to `v` [n, e]. f32 GEMM.
    pub fn rebuild_values(&self, k_raw: &[f32], n: usize, v: &mut [f32], par: Par) {
        self.values(k_raw, n, v, par, true)
    }

    /// V rows from keys cached without the bias, k0 = x·W_K (what the runtime stores):
    /// v = k0·W_KV + b_V. Same algebra as [`SlimLayer::rebuild_values`] without the f32
    /// cancellation of k_raw − b_K when |b_K| ≫ |x·W_K|.
    pub fn values_from_unbiased(&self, k0: &[f32], n: usize, v: &mut [f32], par: Par) {
        self.values(k0, n, v, par, false)
    }

    /// [`SlimLayer::values_from_unbiased`] in fixed blocks of rows run in parallel (the result
    /// does not depend on the thread count).
    pub fn values_from_unbiased_par(&self, k0: &[f32], n: usize, v: &mut [f32]) {
        let e = self.w_kv_t.len().isqrt();
        v[..n * e]
            .par_chunks_mut(REBUILD_ROWS * e)
            .zip(k0[..n * e].par_chunks(REBUILD_ROWS * e))
            .for_each(|(vo, ki)| self.values(ki, ki.len() / e, vo, Par::Seq, false));
    }

    fn values(&self, k: &[f32], n: usize, v: &mut [f32], par: Par, subtract_bias: bool) {
        let e = self.w_kv_t.len().isqrt();
        let shifted: Vec<f32>;
        let k = match (&self.b_k, subtract_bias) {
            (Some(b), true) => {
                shifted = k[..n * e].chunks(e).flat_map(|row| row.iter().zip(b).map(|(a, b)| a - b)).collect();
                &shifted[..]
            }
            _ => k,
        };
        let km = MatRef::from_row_major_slice(&k[..n * e], n, e);
        let wt = MatRef::from_row_major_slice(&self.w_kv_t[..], e, e).transpose();
        let vm = faer::MatMut::from_row_major_slice_mut(&mut v[..n * e], n, e);
        matmul(vm, Accum::Replace, km, wt, 1.0f32, par);
        if let Some(b) = &self.b_v {
            v[..n * e].chunks_mut(e).for_each(|row| row.iter_mut().zip(b).for_each(|(a, b)| *a += b));
        }
    }
}

/// Rows per task when values are rebuilt in parallel: fixed, so the result does not depend on
/// the thread count.
const REBUILD_ROWS: usize = 64;

/// What the load-time preparation found for one layer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    /// Layer index.
    pub layer: usize,
    /// cond(W_K) (see [`WkvSolve::cond`]).
    pub cond: f64,
    /// max |W_KV| (see [`WkvSolve::max_abs`]).
    pub max_abs_wkv: f64,
    /// Relative f64 residual of the solve (see [`WkvSolve::residual`]).
    pub residual: f64,
    /// Whether the layer passed the load-time gate (the first prefill may still veto it).
    pub slim: bool,
    /// Why the load-time gate refused the layer; None when it passed.
    pub reason: Option<String>,
}

/// Slim-attention weights for a model: `layers[l]` is None where layer l keeps a normal cache.
#[derive(Debug, Clone)]
pub struct SlimWeights {
    /// The gates the layers were prepared with (the first-prefill gate is applied later).
    pub opts: SlimOptions,
    /// Per layer, its runtime weights, or None where the load-time gate refused it.
    pub layers: Vec<Option<SlimLayer>>,
    /// Per layer, what the load-time preparation found.
    pub reports: Vec<LayerReport>,
}

/// Refuse configurations where a K-only cache cannot be smaller or is not implemented.
pub fn check_applicable(c: &Config) -> Result<()> {
    let (h_kv, dk, d) = (c.n_kv_heads, c.head_dim, c.hidden_size);
    let cache = h_kv * (dk + dk);
    let kind = if c.n_kv_heads == c.n_heads { "MHA" } else if c.n_kv_heads == 1 { "MQA" } else { "GQA" };
    if cache <= d {
        return Err(Error::Invalid(format!(
            "slim attention not applicable: layer 0 caches h_kv·(d_k+d_v) = {h_kv}·({dk}+{dk}) = {cache} values per \
             token, which is ≤ d_model = {d} ({kind}). A K-only cache cannot be smaller. Use a normal KV cache \
             ({} bytes per token over {} layers in f32).",
            c.kv_bytes_per_token(),
            c.n_layers
        )));
    }
    if h_kv * dk != d {
        return Err(Error::Invalid(format!(
            "slim attention not supported: W_K is {d}×{} (h_kv·d_k = {h_kv}·{dk} ≠ d_model = {d}, {kind}); only \
             square W_K (multi-head attention with h·d_k = d_model) is implemented. Use a normal KV cache \
             ({} bytes per token over {} layers in f32).",
            h_kv * dk,
            c.kv_bytes_per_token(),
            c.n_layers
        )));
    }
    if c.qk_norm {
        return Err(Error::Invalid(
            "slim attention not applicable: the model normalises keys per head (q/k norm), so K is not linear in X \
             and V cannot be rebuilt from K. Use a normal KV cache."
                .into(),
        ));
    }
    Ok(())
}

/// Widen an HF linear weight [rows, cols] to f32.
fn widen(weights: &Weights, m: &MatrixView) -> Vec<f32> {
    let mut out = vec![0.0f32; m.rows * m.cols];
    kvcompact_kernels::widen_rows(weights.view(m), 0, m.rows, m.cols, &mut out);
    out
}

/// Solve every layer (layers in parallel, each sequential: bit-identical at any thread count)
/// and apply the load-time gate.
pub fn prepare(c: &Config, weights: &Weights, opts: SlimOptions) -> Result<SlimWeights> {
    check_applicable(c)?;
    let d = c.hidden_size;
    let solved: Vec<Result<(Option<SlimLayer>, LayerReport)>> = weights
        .layers
        .par_iter()
        .enumerate()
        .map(|(l, lw)| {
            let s = solve_wkv(&widen(weights, &lw.wk), &widen(weights, &lw.wv), d)?;
            let reason = if !s.cond.is_finite() {
                Some("W_K is singular".to_string())
            } else if s.cond > opts.max_cond {
                Some(format!("cond(W_K) = {:.3e} > {:.1e}", s.cond, opts.max_cond))
            } else {
                None
            };
            let layer = reason.is_none().then(|| {
                // Store W_KVᵀ: [e, d], row j = column j.
                let mut t = vec![0.0f32; d * d];
                for i in 0..d {
                    for j in 0..d {
                        t[j * d + i] = s.w_kv[i * d + j] as f32;
                    }
                }
                SlimLayer { w_kv_t: t, b_k: lw.bk.clone(), b_v: lw.bv.clone() }
            });
            let report = LayerReport {
                layer: l,
                cond: s.cond,
                max_abs_wkv: s.max_abs,
                residual: s.residual,
                slim: layer.is_some(),
                reason,
            };
            Ok((layer, report))
        })
        .collect();
    let mut layers = Vec::with_capacity(c.n_layers);
    let mut reports = Vec::with_capacity(c.n_layers);
    for r in solved {
        let (layer, report) = r?;
        layers.push(layer);
        reports.push(report);
    }
    Ok(SlimWeights { opts, layers, reports })
}

/// Relative Frobenius error ‖â − a‖/‖a‖ in f64.
pub fn rel_fro(approx: &[f32], exact: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in approx.iter().zip(exact) {
        let (a, b) = (*a as f64, *b as f64);
        num += (a - b) * (a - b);
        den += b * b;
    }
    if den == 0.0 {
        if num == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (num / den).sqrt()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic fill in [-1, 1).
    fn fill(n: usize, mut s: u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn applicability_checks_give_the_reason() {
        let cfg = |arch: &str, heads: usize, kv: usize, hd: usize| {
            let v = serde_json::json!({"model_type": arch, "hidden_size": 64, "intermediate_size": 128,
                "num_hidden_layers": 2, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
                "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 64, "vocab_size": 10});
            Config::from_json(&v, std::path::Path::new("config.json")).unwrap()
        };
        assert!(check_applicable(&cfg("llama", 4, 4, 16)).is_ok());
        let gqa = check_applicable(&cfg("llama", 4, 2, 16)).unwrap_err().to_string();
        assert!(gqa.contains("= 2·(16+16) = 64 values per token, which is ≤ d_model = 64 (GQA)"), "{gqa}");
        let wide = check_applicable(&cfg("llama", 4, 2, 24)).unwrap_err().to_string();
        assert!(wide.contains("only square W_K"), "{wide}");
        let qk = check_applicable(&cfg("qwen3", 4, 4, 16)).unwrap_err().to_string();
        assert!(qk.contains("q/k norm"), "{qk}");
    }

    #[test]
    fn solve_reproduces_w_v_and_reports_cond() {
        let d = 48;
        let (wk, wv) = (fill(d * d, 7), fill(d * d, 11));
        let s = solve_wkv(&wk, &wv, d).unwrap();
        assert!(s.residual < 1e-12, "residual {}", s.residual);
        assert!(s.cond > 1.0 && s.cond.is_finite());
        // Diagonal W_K: cond is the ratio of the extreme diagonal entries.
        let mut diag = vec![0.0f32; d * d];
        for i in 0..d {
            diag[i * d + i] = if i == 3 { 1e-3 } else { 1.0 + i as f32 / d as f32 };
        }
        let s = solve_wkv(&diag, &wv, d).unwrap();
        let want = (1.0 + (d - 1) as f32 / d as f32) as f64 / 1e-3f32 as f64;
        assert!((s.cond / want - 1.0).abs() < 1e-9, "cond {} want {want}", s.cond);
        // A zero row makes W_K singular: no solve, infinite cond.
        let mut sing = wk.clone();
        sing[5 * d..6 * d].fill(0.0);
        assert!(solve_wkv(&sing, &wv, d).unwrap().cond.is_infinite());
    }

    #[test]
    fn rebuilt_values_match_projection_with_biases() {
        let d = 32;
        let n = 20;
        let (wk, wv, x) = (fill(d * d, 3), fill(d * d, 5), fill(n * d, 9));
        let (bk, bv) = (fill(d, 13), fill(d, 17));
        let s = solve_wkv(&wk, &wv, d).unwrap();
        let mut t = vec![0.0f32; d * d];
        for i in 0..d {
            for j in 0..d {
                t[j * d + i] = s.w_kv[i * d + j] as f32;
            }
        }
        let layer = SlimLayer { w_kv_t: t, b_k: Some(bk.clone()), b_v: Some(bv.clone()) };
        // K and V from X in f64, rounded to f32 like a cache would hold them.
        let proj = |w: &[f32], b: &[f32]| -> Vec<f32> {
            let mut out = vec![0.0f32; n * d];
            for r in 0..n {
                for o in 0..d {
                    let s: f64 = (0..d).map(|i| x[r * d + i] as f64 * w[o * d + i] as f64).sum();
                    out[r * d + o] = (s + b[o] as f64) as f32;
                }
            }
            out
        };
        let (k, v) = (proj(&wk, &bk), proj(&wv, &bv));
        let mut vh = vec![0.0f32; n * d];
        layer.rebuild_values(&k, n, &mut vh, Par::Seq);
        let err = rel_fro(&vh, &v);
        let bound = s.cond * 1e-6;
        assert!(err < bound, "rel err {err} above cond·1e-6 = {bound}");
    }
}
