//! The forward pass: batched prefill and one-token decode over a [`KvCache`].
//!
//! [`Model`] is immutable (config + weights); [`RunState`] holds every activation buffer,
//! allocated once for a maximum batch of `max_batch` tokens (llama2.c's `RunState`); the cache
//! is passed in, so one model can serve many caches. Prompts longer than `max_batch` are run in
//! chunks of `max_batch` tokens, each attending to the cache the previous chunks filled — the
//! same path a chunked or compacted context takes.
//!
//! Numerics: weights stay in their stored dtype and are widened inside the kernels; every
//! product and sum accumulates in f32. Multi-token linears go through faer's GEMM (bf16/f16
//! weights widened one tile of rows at a time); one-token linears through the GEMV kernel.

use std::path::{Path, PathBuf};

use faer::{Accum, MatMut, MatRef, Par};
use kvcompact_kernels as k;
use rayon::prelude::*;

use crate::config::{Config, RopeScaling};
use crate::error::{Error, Result};
use crate::kv_cache::{HeadMeta, HeadStore, KvCache, SlimMode};
use crate::slim::{SlimOptions, SlimWeights};
use crate::weights::{MatrixView, WDtype, Weights};

/// Default number of tokens per forward chunk.
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Chunks of at least this many tokens use the blocked GEMM attention; fewer use the
/// per-token kernel (decode).
const BLOCK_ATTN_MIN_TOKENS: usize = 8;
/// Query tokens per attention block.
const ATTN_BLOCK_TOKENS: usize = 64;
/// Key rows per step of the flash-style prefill attention (S is [G·64, 256]).
const ATTN_KEY_BLOCK: usize = 256;
/// Weight rows widened per GEMM tile for bf16/f16 prefill (tile = rows × in_features f32).
const WIDEN_TILE_ROWS: usize = 256;

/// Which logits a forward call should produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (prefilling context only).
    None,
    /// The last token's logits: [vocab].
    Last,
    /// Every token's logits: [n_tokens, vocab].
    All,
}

pub struct Model {
    pub config: Config,
    pub weights: Weights,
    pub dir: PathBuf,
    inv_freq: Vec<f32>, // [head_dim/2] RoPE inverse frequencies after scaling
    /// Slim-attention weights, once [`Model::enable_slim`] has prepared them.
    pub slim: Option<SlimWeights>,
}

/// Activation buffers for up to `max_batch` tokens; shapes use B = max_batch.
pub struct RunState {
    max_batch: usize,
    x: Vec<f32>,     // [B, d] residual stream
    xn: Vec<f32>,    // [B, d] normalised residual
    q: Vec<f32>,     // [B, nh*hd]
    kv_k: Vec<f32>,  // [B, nkv*hd]
    kv_v: Vec<f32>,  // [B, nkv*hd]
    att: Vec<f32>,   // [B, nh*hd] attention output (before o_proj)
    att_hm: Vec<f32>, // [nkv, B, G*hd] the same, head-major, as the blocked attention writes it
    o: Vec<f32>,     // [B, d] o_proj / down_proj output
    gate: Vec<f32>,  // [B, ff]
    up: Vec<f32>,    // [B, ff]
    cos: Vec<f32>,   // [B, hd/2] RoPE table of the chunk's positions
    sin: Vec<f32>,   // [B, hd/2]
    positions: Vec<u32>, // [B] absolute positions of the chunk's tokens
    base: Vec<usize>,    // [nkv] rows each KV head held before the chunk was appended
    wtile: Vec<f32>, // [WIDEN_TILE_ROWS, max(d, ff)] widened weight tile (bf16/f16 GEMM)
    slim_s: Vec<f32>,    // [blocks, nh, block rows] slim decode softmax weights (grown on demand)
    slim_part: Vec<f32>, // [blocks, nh·kv_dim + 2·nh] slim decode partial key sums, (max, sum) per head
    slim_kbar: Vec<f32>, // [nh, kv_dim] slim decode weighted key sums
    /// Logits of the last forward call: [vocab] (Last) or [n_tokens, vocab] (All).
    pub logits: Vec<f32>,
    /// When set, what it enables is recorded on every forward call.
    pub capture: Option<Capture>,
}

/// Optional recordings of a forward pass, appended per call (tests, query extraction).
#[derive(Debug, Default, Clone)]
pub struct Capture {
    pub hidden_enabled: bool,
    pub queries_enabled: bool,
    pub hidden: Vec<Vec<f32>>,  // [n_layers][tokens, d] residual after each layer
    pub final_norm: Vec<f32>,   // [tokens, d]
    pub queries: Vec<Vec<f32>>, // [n_layers][tokens, nh*hd] post-RoPE (post q_norm) queries
}

impl Capture {
    pub fn hidden() -> Capture {
        Capture { hidden_enabled: true, ..Default::default() }
    }
    pub fn queries() -> Capture {
        Capture { queries_enabled: true, ..Default::default() }
    }
}

impl Model {
    pub fn load(dir: &Path) -> Result<Model> {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!("model directory {} does not exist", dir.display())));
        }
        let config = Config::from_file(&dir.join("config.json"))?;
        let weights = Weights::load(dir, &config)?;
        let inv_freq = rope_inv_freq(&config);
        Ok(Model { config, weights, dir: dir.into(), inv_freq, slim: None })
    }

    /// Prepare Slim Attention (W_KV per layer in f64, load-time gates); from now on
    /// [`Model::new_cache`] returns K-only caches. Refuses models where it cannot apply.
    pub fn enable_slim(&mut self, opts: SlimOptions) -> Result<&SlimWeights> {
        let sw = crate::slim::prepare(&self.config, &self.weights, opts)?;
        Ok(self.slim.insert(sw))
    }

    pub fn new_cache(&self) -> KvCache {
        let c = &self.config;
        if self.slim.is_some() {
            KvCache::new_slim(c.n_layers, c.n_kv_heads, c.head_dim)
        } else {
            KvCache::new(c.n_layers, c.n_kv_heads, c.head_dim)
        }
    }

    pub fn new_state(&self, max_batch: usize) -> RunState {
        let c = &self.config;
        let b = max_batch.max(1);
        let wide = if self.weights.dtype() == WDtype::F32 { 0 } else { WIDEN_TILE_ROWS * c.hidden_size.max(c.intermediate_size).max(c.q_dim()) };
        RunState {
            max_batch: b,
            x: vec![0.0; b * c.hidden_size],
            xn: vec![0.0; b * c.hidden_size],
            q: vec![0.0; b * c.q_dim()],
            kv_k: vec![0.0; b * c.kv_dim()],
            kv_v: vec![0.0; b * c.kv_dim()],
            att: vec![0.0; b * c.q_dim()],
            att_hm: vec![0.0; b * c.q_dim()],
            o: vec![0.0; b * c.hidden_size],
            gate: vec![0.0; b * c.intermediate_size],
            up: vec![0.0; b * c.intermediate_size],
            cos: vec![0.0; b * c.head_dim / 2],
            sin: vec![0.0; b * c.head_dim / 2],
            positions: vec![0; b],
            base: vec![0; c.n_kv_heads],
            wtile: vec![0.0; wide],
            slim_s: Vec::new(),
            slim_part: Vec::new(),
            slim_kbar: Vec::new(),
            logits: Vec::with_capacity(c.vocab_size),
            capture: None,
        }
    }

    /// Run `tokens` through the model, appending their keys/values to `cache` at positions
    /// `cache.next_pos()..`, and leave the requested logits in `state.logits`.
    pub fn forward(&self, state: &mut RunState, cache: &mut KvCache, tokens: &[u32], want: Logits) -> Result<()> {
        let c = &self.config;
        if tokens.is_empty() {
            return Err(Error::Prompt("no tokens to run".into()));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Prompt(format!("token id {t} is outside the vocabulary ({})", c.vocab_size)));
        }
        let end = cache.next_pos() + tokens.len();
        if end > c.max_position_embeddings {
            return Err(Error::Prompt(format!(
                "{} tokens at position {} exceed the model's context of {} positions (max_position_embeddings)",
                tokens.len(),
                cache.next_pos(),
                c.max_position_embeddings
            )));
        }
        if (cache.n_layers, cache.n_kv_heads, cache.head_dim) != (c.n_layers, c.n_kv_heads, c.head_dim) {
            return Err(Error::Shape {
                op: "Model::forward",
                expected: format!("cache of {} layers × {} KV heads × {}", c.n_layers, c.n_kv_heads, c.head_dim),
                got: format!("{} × {} × {}", cache.n_layers, cache.n_kv_heads, cache.head_dim),
            });
        }
        if cache.is_slim() && self.slim.is_none() {
            return Err(Error::Invalid("a slim (K-only) cache needs a model with slim attention enabled".into()));
        }
        state.logits.clear();
        let n_chunks = tokens.len().div_ceil(state.max_batch);
        for (ci, chunk) in tokens.chunks(state.max_batch).enumerate() {
            let last = ci + 1 == n_chunks;
            let chunk_want = match want {
                Logits::All => Logits::All,
                Logits::Last if last => Logits::Last,
                _ => Logits::None,
            };
            self.forward_chunk(state, cache, chunk, chunk_want);
        }
        Ok(())
    }

    /// Convenience: logits of the last token.
    pub fn forward_last<'s>(&self, state: &'s mut RunState, cache: &mut KvCache, tokens: &[u32]) -> Result<&'s [f32]> {
        self.forward(state, cache, tokens, Logits::Last)?;
        Ok(&state.logits)
    }

    fn forward_chunk(&self, st: &mut RunState, cache: &mut KvCache, tokens: &[u32], want: Logits) {
        let n = tokens.len();
        let pos0 = cache.next_pos();
        self.embed(st, tokens);
        self.prepare_positions(st, n, pos0);
        if cache.is_slim() {
            let half = self.config.head_dim / 2;
            cache.slim_push_positions(&st.positions[..n], &st.cos[..n * half], &st.sin[..n * half]);
        }
        for l in 0..self.config.n_layers {
            self.layer(l, st, cache, n);
        }
        cache.advance(n);
        self.head(st, n, want);
    }

    /// Embedding rows of `tokens` into the residual stream st.x [n, d], widened to f32.
    pub fn embed(&self, st: &mut RunState, tokens: &[u32]) {
        let d = self.config.hidden_size;
        let emb = self.weights.view(&self.weights.embed);
        for (i, &t) in tokens.iter().enumerate() {
            k::widen_rows(emb, t as usize, 1, d, &mut st.x[i * d..(i + 1) * d]);
        }
    }

    /// Set the chunk's positions pos0..pos0+n and their RoPE cos/sin rows, shared by every
    /// layer and head.
    pub fn prepare_positions(&self, st: &mut RunState, n: usize, pos0: usize) {
        let half = self.config.head_dim / 2;
        for i in 0..n {
            st.positions[i] = (pos0 + i) as u32;
            let p = (pos0 + i) as f32;
            for j in 0..half {
                // f32 product as HF computes it; cos/sin of that angle rounded once.
                let a = (p * self.inv_freq[j]) as f64;
                st.cos[i * half + j] = a.cos() as f32;
                st.sin[i * half + j] = a.sin() as f32;
            }
        }
    }

    /// Decoder layer `l` on the residual rows st.x [n, d] at the positions set by
    /// [`Model::prepare_positions`], appending their keys/values to the cache's layer `l`
    /// (the logical counter is not advanced: the caller does that once per chunk).
    pub fn layer(&self, l: usize, st: &mut RunState, cache: &mut KvCache, n: usize) {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (d, hd, ff) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd, half) = (c.q_dim(), c.kv_dim(), c.head_dim / 2);
        let (nh, nkv) = (c.n_heads, c.n_kv_heads);
        let eps = c.rms_norm_eps;

        // --- attention block ---
        rmsnorm_rows(&mut st.xn[..n * d], &st.x[..n * d], &lw.attn_norm, d, eps);
        if n == 1 {
            // One token: the three projections in one fork/join.
            let xn = &st.xn[..d];
            k::gemv_multi_par(&mut [
                self.gemv_task(&lw.wq, xn, &mut st.q[..qd]),
                self.gemv_task(&lw.wk, xn, &mut st.kv_k[..kvd]),
                self.gemv_task(&lw.wv, xn, &mut st.kv_v[..kvd]),
            ]);
        } else {
            self.linear(&lw.wq, &st.xn[..n * d], n, &mut st.q[..n * qd], &mut st.wtile);
            self.linear(&lw.wk, &st.xn[..n * d], n, &mut st.kv_k[..n * kvd], &mut st.wtile);
            self.linear(&lw.wv, &st.xn[..n * d], n, &mut st.kv_v[..n * kvd], &mut st.wtile);
        }
        add_bias_rows(&mut st.q[..n * qd], lw.bq.as_deref());
        add_bias_rows(&mut st.kv_v[..n * kvd], lw.bv.as_deref());
        // Slim layers cache k0 = x·W_K (before the bias and RoPE); decide a pending layer first.
        let slim = match cache.slim_mode(l) {
            Some(SlimMode::Pending) => self.decide_slim(l, st, cache, n),
            mode => mode == Some(SlimMode::Slim),
        };
        if slim {
            cache.slim_append(l, &st.kv_k[..n * kvd]);
        }
        add_bias_rows(&mut st.kv_k[..n * kvd], lw.bk.as_deref());
        let (cos, sin) = (&st.cos[..n * half], &st.sin[..n * half]);
        rope_heads(&mut st.q[..n * qd], nh, hd, cos, sin, lw.q_norm.as_deref(), eps);
        rope_heads(&mut st.kv_k[..n * kvd], nkv, hd, cos, sin, lw.k_norm.as_deref(), eps);
        if let Some(cap) = st.capture.as_mut().filter(|c| c.queries_enabled) {
            cap.queries.resize(c.n_layers, Vec::new());
            cap.queries[l].extend_from_slice(&st.q[..n * qd]);
        }

        if slim {
            self.attention_slim(l, st, cache, n);
        } else {
            // Append this chunk's keys/values to each KV head; remember where the chunk starts.
            cache.reserve(l, n);
            for h in 0..nkv {
                st.base[h] = cache.len(l, h);
                cache.append_strided(l, h, &st.kv_k[..n * kvd], &st.kv_v[..n * kvd], kvd, h * hd, &st.positions[..n]);
            }
            let (stores, metas) = cache.layer(l);
            self.attention(st, stores, metas, n);
        }
        self.linear(&lw.wo, &st.att[..n * qd], n, &mut st.o[..n * d], &mut st.wtile);
        add_bias_rows(&mut st.o[..n * d], lw.bo.as_deref());
        add_into(&mut st.x[..n * d], &st.o[..n * d]);

        // --- MLP block (SwiGLU) ---
        rmsnorm_rows(&mut st.xn[..n * d], &st.x[..n * d], &lw.ffn_norm, d, eps);
        if n == 1 {
            // One token: gate and up in one fork/join.
            let xn = &st.xn[..d];
            k::gemv_multi_par(&mut [
                self.gemv_task(&lw.w_gate, xn, &mut st.gate[..ff]),
                self.gemv_task(&lw.w_up, xn, &mut st.up[..ff]),
            ]);
        } else {
            self.linear(&lw.w_gate, &st.xn[..n * d], n, &mut st.gate[..n * ff], &mut st.wtile);
            self.linear(&lw.w_up, &st.xn[..n * d], n, &mut st.up[..n * ff], &mut st.wtile);
        }
        add_bias_rows(&mut st.gate[..n * ff], lw.b_gate.as_deref());
        add_bias_rows(&mut st.up[..n * ff], lw.b_up.as_deref());
        st.gate[..n * ff]
            .par_chunks_mut(ff)
            .zip(st.up[..n * ff].par_chunks(ff))
            .for_each(|(g, u)| k::silu_mul(g, u));
        self.linear(&lw.w_down, &st.gate[..n * ff], n, &mut st.o[..n * d], &mut st.wtile);
        add_bias_rows(&mut st.o[..n * d], lw.b_down.as_deref());
        add_into(&mut st.x[..n * d], &st.o[..n * d]);

        if let Some(cap) = st.capture.as_mut().filter(|c| c.hidden_enabled) {
            cap.hidden.resize(c.n_layers, Vec::new());
            cap.hidden[l].extend_from_slice(&st.x[..n * d]);
        }
    }

    /// Causal attention of the chunk's queries st.q [n, nh·hd] over one layer's heads into
    /// st.att: token i sees its head's rows up to st.base[g] + i (everything cached earlier has a
    /// smaller position), minus any sliding window.
    fn attention(&self, st: &mut RunState, stores: &[HeadStore], metas: &[HeadMeta], n: usize) {
        if n >= BLOCK_ATTN_MIN_TOKENS {
            return self.attention_blocks(st, stores, metas, n);
        }
        let c = &self.config;
        let (hd, qd, nkv, group) = (c.head_dim, c.q_dim(), c.n_kv_heads, c.group_size());
        let scale = c.attn_scale();
        let window = c.sliding_window;
        let pos0 = st.positions[0] as usize;
        let q = &st.q[..n * qd];
        let base = &st.base[..];
        st.att[..n * qd].par_chunks_mut(group * hd).enumerate().for_each_init(Vec::new, |scratch, (idx, out)| {
            let (i, g) = (idx / nkv, idx % nkv);
            let visible = base[g] + i + 1;
            let start = window_start(window, pos0 + i, &metas[g].positions[..visible]);
            let rows = visible - start;
            let keys = &stores[g].keys[start * hd..visible * hd];
            let values = &stores[g].values[start * hd..visible * hd];
            let bias = metas[g].bias.as_deref().map(|b| &b[start..visible]);
            let qs = &q[i * qd + g * group * hd..i * qd + (g + 1) * group * hd];
            k::attend_group(qs, keys, values, bias, rows, hd, scale, out, scratch);
        });
    }

    /// Multi-token causal attention, flash style: per KV head, blocks of [`ATTN_BLOCK_TOKENS`]
    /// query tokens (all G query heads of the group together) sweep the visible keys in blocks of
    /// [`ATTN_KEY_BLOCK`] rows: S = scale·Q_blk·K_blkᵀ (+β), masked, unnormalised softmax
    /// ([`k::exp_shift_sum`]), running max/sum per query row with rescaling, O += P·V_blk, and one
    /// division at the end. S is [G·64, 256], never [T, T] nor [64, T]. One task per (KV head,
    /// query block) with a fixed block order inside, so results do not depend on the thread count.
    fn attention_blocks(&self, st: &mut RunState, stores: &[HeadStore], metas: &[HeadMeta], n: usize) {
        let c = &self.config;
        let (hd, qd, nkv, group) = (c.head_dim, c.q_dim(), c.n_kv_heads, c.group_size());
        let scale = c.attn_scale();
        let window = c.sliding_window;
        let pos0 = st.positions[0] as usize;
        let q = &st.q[..n * qd];
        let base = &st.base[..];
        let row_w = group * hd; // one token's G query heads
        st.att_hm[..nkv * n * row_w].par_chunks_mut(n * row_w).enumerate().for_each(|(g, head_out)| {
            head_out.par_chunks_mut(ATTN_BLOCK_TOKENS * row_w).enumerate().for_each_init(
                || (Vec::new(), Vec::new(), Vec::new()),
                |(qbuf, sbuf, stats): &mut (Vec<f32>, Vec<f32>, Vec<(f32, f32, usize, usize)>), (bi, out)| {
                    let t0 = bi * ATTN_BLOCK_TOKENS;
                    let nt = out.len() / row_w;
                    let rows_q = nt * group;
                    let cols = base[g] + t0 + nt; // rows visible to the block's last token
                    qbuf.clear();
                    for ti in 0..nt {
                        let at = (t0 + ti) * qd + g * row_w;
                        qbuf.extend_from_slice(&q[at..at + row_w]);
                    }
                    // Per query row: running max, running sum, and its visible key range.
                    stats.clear();
                    for r in 0..rows_q {
                        let ti = r / group;
                        let visible = base[g] + t0 + ti + 1;
                        let start = window_start(window, pos0 + t0 + ti, &metas[g].positions[..visible]);
                        stats.push((f32::NEG_INFINITY, 0.0, start, visible));
                    }
                    let first = stats.iter().map(|s| s.2).min().unwrap_or(0);
                    out.fill(0.0);
                    let qm = MatRef::from_row_major_slice(&qbuf[..], rows_q, hd);
                    let bias = metas[g].bias.as_deref();
                    let mut k0 = first / ATTN_KEY_BLOCK * ATTN_KEY_BLOCK;
                    while k0 < cols {
                        let k1 = (k0 + ATTN_KEY_BLOCK).min(cols);
                        let w = k1 - k0;
                        sbuf.resize(rows_q * w, 0.0);
                        let keys = MatRef::from_row_major_slice(&stores[g].keys[k0 * hd..k1 * hd], w, hd);
                        let sm = MatMut::from_row_major_slice_mut(&mut sbuf[..], rows_q, w);
                        faer::linalg::matmul::matmul(sm, Accum::Replace, qm, keys.transpose(), scale, Par::Seq);
                        for (r, srow) in sbuf.chunks_mut(w).enumerate() {
                            let (m_run, l_run, start, visible) = stats[r];
                            // This row's visible part of the key block, in block coordinates.
                            let (a, b) = (start.clamp(k0, k1) - k0, visible.clamp(k0, k1) - k0);
                            if let Some(bb) = bias {
                                srow[a..b].iter_mut().zip(&bb[k0 + a..k0 + b]).for_each(|(x, bb)| *x += bb);
                            }
                            srow[..a].fill(f32::NEG_INFINITY);
                            srow[b..].fill(f32::NEG_INFINITY);
                            let (m_blk, l_blk) = k::exp_shift_sum(srow);
                            if m_blk == f32::NEG_INFINITY {
                                continue; // nothing visible here: srow is zeros, O unchanged
                            }
                            let m_new = m_run.max(m_blk);
                            let (keep, take) = ((m_run - m_new).exp(), (m_blk - m_new).exp());
                            if keep != 1.0 {
                                out[r * hd..(r + 1) * hd].iter_mut().for_each(|o| *o *= keep);
                            }
                            if take != 1.0 {
                                srow.iter_mut().for_each(|p| *p *= take);
                            }
                            stats[r].0 = m_new;
                            stats[r].1 = l_run * keep + l_blk * take;
                        }
                        let vals = MatRef::from_row_major_slice(&stores[g].values[k0 * hd..k1 * hd], w, hd);
                        let pm = MatRef::from_row_major_slice(&sbuf[..], rows_q, w);
                        let om = MatMut::from_row_major_slice_mut(&mut *out, rows_q, hd);
                        faer::linalg::matmul::matmul(om, Accum::Add, pm, vals, 1.0f32, Par::Seq);
                        k0 = k1;
                    }
                    for (r, orow) in out.chunks_mut(hd).enumerate() {
                        let l = stats[r].1;
                        let inv = if l > 0.0 { 1.0 / l } else { 0.0 };
                        orow.iter_mut().for_each(|o| *o *= inv);
                    }
                },
            );
        });
        // Head-major [nkv, n, G·hd] → token-major att [n, nh·hd].
        let att_hm = &st.att_hm;
        st.att[..n * qd].par_chunks_mut(qd).enumerate().for_each(|(i, row)| {
            for g in 0..nkv {
                let src = &att_hm[(g * n + i) * row_w..(g * n + i + 1) * row_w];
                row[g * row_w..(g + 1) * row_w].copy_from_slice(src);
            }
        });
    }

    /// First prefill of a slim cache at layer `l`: keep the layer slim if it passed the load gate
    /// and V rebuilt from this chunk's keys k0 = x·W_K (st.kv_k, before bias and RoPE) matches the
    /// V computed from X (st.kv_v) within `max_rel_err`; otherwise it keeps a normal K/V cache from now on.
    fn decide_slim(&self, l: usize, st: &RunState, cache: &mut KvCache, n: usize) -> bool {
        let sw = self.slim.as_ref().expect("a slim cache implies slim weights (checked in forward)");
        let Some(layer) = sw.layers[l].as_ref() else {
            cache.set_slim_mode(l, SlimMode::Full, None, n);
            return false;
        };
        let kvd = self.config.kv_dim();
        let mut v = vec![0.0f32; n * kvd];
        layer.values_from_unbiased_par(&st.kv_k[..n * kvd], n, &mut v);
        let err = crate::slim::rel_fro(&v, &st.kv_v[..n * kvd]);
        let ok = err <= sw.opts.max_rel_err; // false for NaN
        cache.set_slim_mode(l, if ok { SlimMode::Slim } else { SlimMode::Full }, Some(err), n);
        if !ok {
            tracing::info!(layer = l, rel_err = err, tokens = n, "slim attention: layer keeps a normal K/V cache");
        }
        ok
    }

    /// Attention of a slim layer whose pre-RoPE keys (this chunk's included) are in the cache.
    ///
    /// - Chunks of ≥ [`BLOCK_ATTN_MIN_TOKENS`] (prefill): per-head rotated keys and values are
    ///   materialised for the blocked attention — earlier rows rebuilt from the cache, the chunk's
    ///   own rows straight from X (so a first prefill is exactly the standard path).
    /// - Fewer tokens (decode), the paper's option 2: per head, logits with b_K added and RoPE
    ///   applied on read, softmax s, then k̄0 = s·K0 over the full key width, and the head's
    ///   output k̄0·W_KV,h + b_V,h. Done flash-decoding style in row blocks, so K streams from
    ///   memory once per token, in order.
    fn attention_slim(&self, l: usize, st: &mut RunState, cache: &KvCache, n: usize) {
        let c = &self.config;
        let (hd, qd, kvd, nh, nkv, half) = (c.head_dim, c.q_dim(), c.kv_dim(), c.n_heads, c.n_kv_heads, c.head_dim / 2);
        let group = c.group_size();
        let layer = self.slim.as_ref().and_then(|s| s.layers[l].as_ref()).expect("slim layer has weights");
        let (k_raw, meta) = cache.slim_layer(l);
        let rows = k_raw.len() / kvd;
        let base = rows - n;
        if n >= BLOCK_ATTN_MIN_TOKENS {
            let mut v_old = vec![0.0f32; base * kvd];
            layer.values_from_unbiased_par(&k_raw[..base * kvd], base, &mut v_old);
            let (kv_k, kv_v) = (&st.kv_k, &st.kv_v);
            let stores: Vec<HeadStore> = (0..nkv)
                .into_par_iter()
                .map(|g| {
                    let (mut keys, mut values) = (Vec::with_capacity(rows * hd), Vec::with_capacity(rows * hd));
                    for r in 0..base {
                        let at = keys.len();
                        keys.extend_from_slice(&k_raw[r * kvd + g * hd..r * kvd + (g + 1) * hd]);
                        if let Some(b) = &layer.b_k {
                            keys[at..].iter_mut().zip(&b[g * hd..(g + 1) * hd]).for_each(|(k, b)| *k += b);
                        }
                        let rope = &meta.rope[r * hd..(r + 1) * hd];
                        k::rope_rotate_half(&mut keys[at..], &rope[..half], &rope[half..]);
                        values.extend_from_slice(&v_old[r * kvd + g * hd..r * kvd + (g + 1) * hd]);
                    }
                    for i in 0..n {
                        keys.extend_from_slice(&kv_k[i * kvd + g * hd..i * kvd + (g + 1) * hd]);
                        values.extend_from_slice(&kv_v[i * kvd + g * hd..i * kvd + (g + 1) * hd]);
                    }
                    HeadStore { keys, values }
                })
                .collect();
            let metas: Vec<HeadMeta> =
                (0..nkv).map(|_| HeadMeta { positions: meta.positions[..rows].to_vec(), bias: None }).collect();
            st.base[..nkv].fill(base);
            return self.attention_blocks(st, &stores, &metas, n);
        }

        let scale = c.attn_scale();
        let pos0 = st.positions[0] as usize;
        // Rows per block: about 512 KiB of keys, so a block read for the scores is still in L2
        // for the weighted sum. Depends only on the model, so results do not depend on threads.
        let rb = ((1usize << 19) / (kvd * 4)).clamp(32, 1024);
        let RunState { q, att, slim_s, slim_kbar, slim_part, .. } = st;
        for i in 0..n {
            let visible = base + i + 1;
            let start = window_start(c.sliding_window, pos0 + i, &meta.positions[..visible]);
            let m = visible - start;
            let nb = m.div_ceil(rb);
            let qi = &q[i * qd..(i + 1) * qd];
            // Flash-decoding over row blocks: per block, scores of every head (rows read in order,
            // RoPE applied on read), unnormalised softmax (max, sum), and the partial weighted
            // sum P_b·K_b [nh, kvd]; the blocks are merged below in a fixed order.
            slim_s.resize(nb * nh * rb, 0.0);
            slim_part.resize(nb * (nh * kvd + 2 * nh), 0.0);
            slim_part.par_chunks_mut(nh * kvd + 2 * nh).zip(slim_s.par_chunks_mut(nh * rb)).enumerate().for_each_init(
                || vec![0.0f32; hd],
                |kb, (b, (part, sblk))| {
                    let r0 = start + b * rb;
                    let r1 = (r0 + rb).min(visible);
                    let len = r1 - r0;
                    for t in 0..len {
                        let r = r0 + t;
                        let rope = &meta.rope[r * hd..(r + 1) * hd];
                        let row = &k_raw[r * kvd..(r + 1) * kvd];
                        for h in 0..nh {
                            let col = (h / group) * hd;
                            let mut key = &row[col..col + hd];
                            if let Some(b) = layer.b_k.as_deref() {
                                kb.iter_mut().zip(key).zip(&b[col..col + hd]).for_each(|((o, k), b)| *o = k + b);
                                key = &kb[..];
                            }
                            sblk[h * len + t] = scale * k::rope_dot(&qi[h * hd..(h + 1) * hd], key, &rope[..half], &rope[half..]);
                        }
                    }
                    let (acc, stats) = part.split_at_mut(nh * kvd);
                    for h in 0..nh {
                        let (mx, sum) = k::exp_shift_sum(&mut sblk[h * len..(h + 1) * len]);
                        stats[2 * h] = mx;
                        stats[2 * h + 1] = sum;
                    }
                    let pm = MatRef::from_row_major_slice(&sblk[..nh * len], nh, len);
                    let km = MatRef::from_row_major_slice(&k_raw[r0 * kvd..r1 * kvd], len, kvd);
                    let om = MatMut::from_row_major_slice_mut(acc, nh, kvd);
                    faer::linalg::matmul::matmul(om, Accum::Replace, pm, km, 1.0f32, Par::Seq);
                },
            );
            // Merge the blocks per head (k̄0_h = Σ_b e^{max_b − M}·P_b K_b / Σ_b e^{max_b − M}·sum_b),
            // then the head's output k̄0_h·W_KV,h + b_V,h: a GEMV over W_KVᵀ's rows h·hd..(h+1)·hd.
            slim_kbar.resize(nh * kvd, 0.0);
            let parts = &slim_part[..];
            let stride = nh * kvd + 2 * nh;
            att[i * qd..(i + 1) * qd].par_chunks_mut(hd).zip(slim_kbar.par_chunks_mut(kvd)).enumerate().for_each(
                |(h, (out, x))| {
                    let stat = |b: usize| (parts[b * stride + nh * kvd + 2 * h], parts[b * stride + nh * kvd + 2 * h + 1]);
                    let mx = (0..nb).map(|b| stat(b).0).fold(f32::NEG_INFINITY, f32::max);
                    let total: f32 = (0..nb).map(|b| (stat(b).0 - mx).exp() * stat(b).1).sum();
                    x.fill(0.0);
                    for b in 0..nb {
                        let w = (stat(b).0 - mx).exp() / total;
                        k::axpy(w, &parts[b * stride + h * kvd..b * stride + (h + 1) * kvd], x);
                    }
                    let w = &layer.w_kv_t[h * hd * kvd..(h + 1) * hd * kvd];
                    k::gemv(k::WeightRef::F32(w), hd, kvd, x, out);
                    if let Some(bv) = &layer.b_v {
                        out.iter_mut().zip(&bv[h * hd..(h + 1) * hd]).for_each(|(a, b)| *a += b);
                    }
                },
            );
        }
    }

    /// Layer `l`'s queries for the residual rows st.x [n, d] (after q_norm and RoPE, as the
    /// attention would see them), without touching the cache: [n, nh*hd].
    pub fn layer_queries<'s>(&self, l: usize, st: &'s mut RunState, n: usize) -> &'s [f32] {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (d, qd, half) = (c.hidden_size, c.q_dim(), c.head_dim / 2);
        rmsnorm_rows(&mut st.xn[..n * d], &st.x[..n * d], &lw.attn_norm, d, c.rms_norm_eps);
        self.linear(&lw.wq, &st.xn[..n * d], n, &mut st.q[..n * qd], &mut st.wtile);
        add_bias_rows(&mut st.q[..n * qd], lw.bq.as_deref());
        let (cos, sin) = (&st.cos[..n * half], &st.sin[..n * half]);
        rope_heads(&mut st.q[..n * qd], c.n_heads, c.head_dim, cos, sin, lw.q_norm.as_deref(), c.rms_norm_eps);
        &st.q[..n * qd]
    }

    /// The queries written by the last [`Model::layer`] call: [n, nh*hd].
    pub fn last_queries<'s>(&self, st: &'s RunState, n: usize) -> &'s [f32] {
        &st.q[..n * self.config.q_dim()]
    }

    /// Final norm and lm_head for the rows whose logits are wanted (appended to st.logits).
    fn head(&self, st: &mut RunState, n: usize, want: Logits) {
        let c = &self.config;
        let w = &self.weights;
        let d = c.hidden_size;
        let eps = c.rms_norm_eps;
        let capture_norm = st.capture.as_ref().is_some_and(|c| c.hidden_enabled);
        let rows = match want {
            Logits::None if !capture_norm => return,
            Logits::None => 0..0,
            Logits::Last => n - 1..n,
            Logits::All => 0..n,
        };
        let norm_rows = if capture_norm { 0..n } else { rows.clone() };
        rmsnorm_rows(
            &mut st.xn[norm_rows.start * d..norm_rows.end * d],
            &st.x[norm_rows.start * d..norm_rows.end * d],
            &w.final_norm,
            d,
            eps,
        );
        if let Some(cap) = st.capture.as_mut().filter(|c| c.hidden_enabled) {
            cap.final_norm.extend_from_slice(&st.xn[..n * d]);
        }
        let m = rows.len();
        if m == 0 {
            return;
        }
        let vocab = c.vocab_size;
        let at = st.logits.len();
        st.logits.resize(at + m * vocab, 0.0);
        let xn = &st.xn[rows.start * d..rows.end * d];
        self.linear(&w.lm_head, xn, m, &mut st.logits[at..], &mut st.wtile);
    }

    /// The residual stream rows st.x [n, d] (to save or restore hidden states between layers).
    pub fn residual<'s>(&self, st: &'s mut RunState, n: usize) -> &'s mut [f32] {
        &mut st.x[..n * self.config.hidden_size]
    }

    /// A one-token `y = W x` for [`k::gemv_multi_par`].
    fn gemv_task<'a>(&'a self, wm: &MatrixView, x: &'a [f32], y: &'a mut [f32]) -> k::GemvTask<'a> {
        k::GemvTask { w: self.weights.view(wm), rows: wm.rows, cols: wm.cols, x, y }
    }

    /// y[n, out] = x[n, in] · Wᵀ for W [out, in] in its stored dtype.
    fn linear(&self, wm: &MatrixView, x: &[f32], n: usize, y: &mut [f32], wtile: &mut [f32]) {
        let (out, inp) = (wm.rows, wm.cols);
        debug_assert_eq!(x.len(), n * inp);
        debug_assert_eq!(y.len(), n * out);
        let wr = self.weights.view(wm);
        if n == 1 {
            k::gemv_par(wr, out, inp, x, y);
            return;
        }
        let par = Par::rayon(0);
        let xm = MatRef::from_row_major_slice(x, n, inp);
        match wr {
            k::WeightRef::F32(ws) => {
                let wt = MatRef::from_row_major_slice(ws, out, inp).transpose();
                let ym = MatMut::from_row_major_slice_mut(y, n, out);
                faer::linalg::matmul::matmul(ym, Accum::Replace, xm, wt, 1.0f32, par);
            }
            _ => {
                // Widen a tile of weight rows, multiply into the matching output columns.
                let mut r0 = 0;
                while r0 < out {
                    let tr = WIDEN_TILE_ROWS.min(out - r0);
                    let tile = &mut wtile[..tr * inp];
                    k::widen_rows(wr, r0, tr, inp, tile);
                    let wt = MatRef::from_row_major_slice(&*tile, tr, inp).transpose();
                    let ym = MatMut::from_row_major_slice_mut(&mut *y, n, out).subcols_mut(r0, tr);
                    faer::linalg::matmul::matmul(ym, Accum::Replace, xm, wt, 1.0f32, par);
                    r0 += tr;
                }
            }
        }
    }
}

impl RunState {
    /// Tokens one forward chunk can hold.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }
}

/// HF's RoPE inverse frequencies, in f32 as transformers computes them, after scaling.
pub fn rope_inv_freq(c: &Config) -> Vec<f32> {
    let dim = c.head_dim;
    let base = c.rope_theta as f64;
    let mut inv: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            (1.0f64 / base.powf(e as f64)) as f32
        })
        .collect();
    match c.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor; // low frequency: fully interpolated
                } else if wavelen >= high_wavelen {
                    // medium: blend between interpolated and original
                    let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
    }
    inv
}

/// First visible row for a query at `qpos` under a sliding window (rows are position-sorted).
fn window_start(window: Option<usize>, qpos: usize, positions: &[u32]) -> usize {
    match window {
        Some(w) if qpos >= w => positions.partition_point(|&p| (p as usize) + w <= qpos),
        _ => 0,
    }
}

/// RMSNorm every row of x [n, d] into out [n, d].
fn rmsnorm_rows(out: &mut [f32], x: &[f32], weight: &[f32], d: usize, eps: f32) {
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xi)| k::rmsnorm(o, xi, weight, eps));
}

/// Add a bias [m] to every row of y [n, m].
fn add_bias_rows(y: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in y.chunks_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// For rows [n, heads*hd] (token-major): optional per-head RMSNorm (Qwen3 q/k norm), then
/// rotate-half RoPE with token i's cos/sin row.
fn rope_heads(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32], norm: Option<&[f32]>, eps: f32) {
    let half = hd / 2;
    x.par_chunks_mut(heads * hd).enumerate().for_each(|(i, row)| {
        let (c, s) = (&cos[i * half..(i + 1) * half], &sin[i * half..(i + 1) * half]);
        let mut tmp = [0.0f32; 512];
        for head in row.chunks_mut(hd) {
            if let Some(nw) = norm {
                if hd <= tmp.len() {
                    tmp[..hd].copy_from_slice(head);
                    k::rmsnorm(head, &tmp[..hd], nw, eps);
                } else {
                    let t = head.to_vec();
                    k::rmsnorm(head, &t, nw, eps);
                }
            }
            k::rope_rotate_half(head, c, s);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cfg(scaling: serde_json::Value) -> Config {
        let v = json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 256, "vocab_size": 10,
            "rope_scaling": scaling});
        Config::from_json(&v, Path::new("c.json")).unwrap()
    }

    #[test]
    fn rope_inverse_frequencies_follow_hf() {
        let plain = rope_inv_freq(&cfg(serde_json::Value::Null));
        assert_eq!(plain.len(), 8);
        assert_eq!(plain[0], 1.0);
        approx::assert_relative_eq!(plain[1], 10000f32.powf(-2.0 / 16.0), max_relative = 1e-6);
        let lin = rope_inv_freq(&cfg(json!({"rope_type": "linear", "factor": 2.0})));
        for (a, b) in plain.iter().zip(&lin) {
            assert_eq!(*a / 2.0, *b);
        }
        // llama3: high frequencies untouched, lowest divided by the factor, medium in between.
        let l3 = rope_inv_freq(&cfg(json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})));
        assert_eq!(l3[0], plain[0]);
        assert_eq!(l3[7], plain[7] / 8.0);
        assert!(l3.iter().zip(&plain).any(|(a, b)| a < b && *a > b / 8.0));
    }
}
