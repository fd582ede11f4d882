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

use crate::model::config::Config;
use crate::error::{Error, Result};
use crate::cache::{KvCache, KvDtype, SlimMode};
use crate::model::rope::rope_inv_freq;
use crate::model::slim::{SlimOptions, SlimWeights};
use crate::model::weights::{MatrixView, WDtype, Weights};

/// Default number of tokens per forward chunk.
pub const DEFAULT_MAX_BATCH: usize = 256;
/// Most weight rows per prefill GEMM tile (a bf16/f16 tile is widened to rows × in_features f32).
const GEMM_TILE_ROWS: usize = 256;

/// Weight rows per prefill GEMM tile of an `out`-row matrix: about an eighth of the rows (so that both
/// of two threads, or all of eight, get work on the small projections), a multiple of 16, at most
/// [`GEMM_TILE_ROWS`]. A function of `out` only: the split, and so the bits, never depend on the
/// thread count.
fn gemm_tile_rows(out: usize) -> usize {
    out.div_ceil(8).next_multiple_of(16).clamp(16, GEMM_TILE_ROWS)
}

/// Which logits a forward call should produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// None (prefilling context only).
    None,
    /// The last token's logits: `[vocab]`.
    Last,
    /// Every token's logits: `[n_tokens, vocab]`.
    All,
}

/// A loaded model: config, weights and RoPE table; immutable during forward passes, so one
/// model can serve many caches and [`RunState`]s.
pub struct Model {
    /// The normalised `config.json`.
    pub config: Config,
    /// The memory-mapped weights.
    pub weights: Weights,
    /// The directory the model was loaded from.
    pub dir: PathBuf,
    pub(super) inv_freq: Vec<f32>, // [head_dim/2] RoPE inverse frequencies after scaling
    /// Slim-attention weights, once [`Model::enable_slim`] has prepared them.
    pub slim: Option<SlimWeights>,
    kv_dtype: KvDtype,
}

/// Activation buffers for up to `max_batch` tokens; shapes use B = max_batch.
pub struct RunState {
    pub(super) max_batch: usize,
    pub(super) x: Vec<f32>,     // [B, d] residual stream
    pub(super) xn: Vec<f32>,    // [B, d] normalised residual
    pub(super) q: Vec<f32>,     // [B, nh*hd]
    pub(super) kv_k: Vec<f32>,  // [B, nkv*hd]
    pub(super) kv_v: Vec<f32>,  // [B, nkv*hd]
    pub(super) att: Vec<f32>,   // [B, nh*hd] attention output (before o_proj)
    pub(super) att_hm: Vec<f32>, // [nkv, B, G*hd] the same, head-major, as the blocked attention writes it
    pub(super) o: Vec<f32>,     // [B, d] o_proj / down_proj output
    pub(super) gate: Vec<f32>,  // [B, ff]
    pub(super) up: Vec<f32>,    // [B, ff]
    pub(super) cos: Vec<f32>,   // [B, hd/2] RoPE table of the chunk's positions
    pub(super) sin: Vec<f32>,   // [B, hd/2]
    pub(super) positions: Vec<u32>, // [B] absolute positions of the chunk's tokens
    pub(super) base: Vec<usize>,    // [nkv] rows each KV head held before the chunk was appended
    pub(super) wtiles: Vec<std::sync::Mutex<Vec<f32>>>, // per pool thread: [≤ GEMM_TILE_ROWS, in] widened weight tile (bf16/f16 GEMM), grown on demand
    pub(super) att_scratch: Vec<Vec<f32>>, // per (sequence, KV head) of a decode step: attention scores [G, rows], grown on demand
    pub(super) slim_s: Vec<f32>,    // [blocks, nh, block rows] slim decode softmax weights (grown on demand)
    pub(super) slim_part: Vec<f32>, // [blocks, nh·kv_dim + 2·nh] slim decode partial key sums, (max, sum) per head
    pub(super) slim_kbar: Vec<f32>, // [nh, kv_dim] slim decode weighted key sums
    /// Logits of the last forward call: `[vocab]` (Last) or `[n_tokens, vocab]` (All).
    pub logits: Vec<f32>,
    /// When set, what it enables is recorded on every forward call.
    pub capture: Option<Capture>,
    /// `--device cuda`: one-token decode attention runs on the GPU over a mirror of the cache
    /// (see [`RunState::use_device`]); everything else stays on the CPU.
    #[cfg(feature = "cuda")]
    pub(super) device_cache: Option<crate::cuda::attention::DeviceCache>,
    /// The first GPU failure of a forward call (that step fell back to the CPU); returned by
    /// [`Model::forward`].
    pub(super) device_error: Option<Error>,
}

/// Optional recordings of a forward pass, appended per call (tests, query extraction).
#[derive(Debug, Default, Clone)]
pub struct Capture {
    /// Record `hidden` and `final_norm`.
    pub hidden_enabled: bool,
    /// Record `queries`.
    pub queries_enabled: bool,
    /// Per layer, the residual stream after that layer, for every token run so far.
    pub hidden: Vec<Vec<f32>>,  // [n_layers][tokens, d] residual after each layer
    /// The final-RMSNorm output (the LM head's input) of every token run so far.
    pub final_norm: Vec<f32>,   // [tokens, d]
    /// Per layer, the attention queries of every token run so far.
    pub queries: Vec<Vec<f32>>, // [n_layers][tokens, nh*hd] post-RoPE (post q_norm) queries
}

impl Capture {
    /// A capture recording hidden states and final-norm outputs only.
    pub fn hidden() -> Capture {
        Capture { hidden_enabled: true, ..Default::default() }
    }
    /// A capture recording queries only.
    pub fn queries() -> Capture {
        Capture { queries_enabled: true, ..Default::default() }
    }
}

impl Model {
    /// Load `config.json` and the safetensors weights of a HF model directory.
    pub fn load(dir: &Path) -> Result<Model> {
        if !dir.is_dir() {
            return Err(Error::Invalid(format!("model directory {} does not exist", dir.display())));
        }
        let config = Config::from_file(&dir.join("config.json"))?;
        let weights = Weights::load(dir, &config)?;
        let inv_freq = rope_inv_freq(&config);
        Ok(Model { config, weights, dir: dir.into(), inv_freq, slim: None, kv_dtype: KvDtype::F32 })
    }

    /// Prepare Slim Attention (W_KV per layer in f64, load-time gates); from now on
    /// [`Model::new_cache`] returns K-only caches. Refuses models where it cannot apply.
    pub fn enable_slim(&mut self, opts: SlimOptions) -> Result<&SlimWeights> {
        if self.kv_dtype != KvDtype::F32 {
            return Err(Error::Invalid(format!("slim attention keeps f32 keys; it cannot be combined with a {} KV cache", self.kv_dtype.name())));
        }
        let sw = crate::model::slim::prepare(&self.config, &self.weights, opts)?;
        Ok(self.slim.insert(sw))
    }

    /// Store the rows of the caches [`Model::new_cache`] makes from now on as `dtype` (bf16
    /// halves the KV bytes; rows are rounded once when stored). Refused with slim attention.
    pub fn set_kv_dtype(&mut self, dtype: KvDtype) -> Result<()> {
        if self.slim.is_some() && dtype != KvDtype::F32 {
            return Err(Error::Invalid(format!("slim attention keeps f32 keys; it cannot be combined with a {} KV cache", dtype.name())));
        }
        self.kv_dtype = dtype;
        Ok(())
    }

    /// The dtype of the caches [`Model::new_cache`] makes.
    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// An empty cache shaped for this model: K-only (slim) once [`Model::enable_slim`] has run,
    /// else rows stored as [`Model::kv_dtype`].
    pub fn new_cache(&self) -> KvCache {
        let c = &self.config;
        if self.slim.is_some() {
            KvCache::new_slim(c.n_layers, c.n_kv_heads, c.head_dim)
        } else {
            KvCache::with_dtype(c.n_layers, c.n_kv_heads, c.head_dim, self.kv_dtype)
        }
    }

    /// Activation buffers for chunks of up to `max_batch` tokens (at least 1); see
    /// [`DEFAULT_MAX_BATCH`].
    pub fn new_state(&self, max_batch: usize) -> RunState {
        let c = &self.config;
        let b = max_batch.max(1);
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
            wtiles: if self.weights.dtype() == WDtype::F32 { Vec::new() } else { (0..rayon::current_num_threads().max(1)).map(|_| Default::default()).collect() },
            att_scratch: Vec::new(),
            slim_s: Vec::new(),
            slim_part: Vec::new(),
            slim_kbar: Vec::new(),
            logits: Vec::with_capacity(c.vocab_size),
            capture: None,
            #[cfg(feature = "cuda")]
            device_cache: None,
            device_error: None,
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
        match state.device_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
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
        let mut run = |team: &k::Team<'_>| {
            for l in 0..self.config.n_layers {
                self.layer_on(l, st, cache, n, team);
            }
            cache.advance(n);
            self.head(st, n, want, team);
        };
        if n == 1 {
            // Decode: the pool's threads stay awake for the whole token (one dispatch, not five
            // per layer); each parallel stage is a team stage.
            k::team_scope(run);
        } else {
            run(&k::Team::solo());
        }
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
        if n == 1 {
            k::team_scope(|team| self.layer_on(l, st, cache, n, team));
        } else {
            self.layer_on(l, st, cache, n, &k::Team::solo());
        }
    }

    /// [`Model::layer`] with one-token stages run on `team` (multi-token chunks use the pool).
    fn layer_on(&self, l: usize, st: &mut RunState, cache: &mut KvCache, n: usize, team: &k::Team<'_>) {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (d, hd, ff) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd, half) = (c.q_dim(), c.kv_dim(), c.head_dim / 2);
        let (nh, nkv) = (c.n_heads, c.n_kv_heads);
        let eps = c.rms_norm_eps;

        // --- attention block ---
        rmsnorm_rows(&mut st.xn[..n * d], &st.x[..n * d], &lw.attn_norm, d, eps);
        if n == 1 {
            // One token: the three projections in one team stage.
            let xn = &st.xn[..d];
            k::gemv_multi_team(team, &mut [
                self.gemv_task(&lw.wq, xn, &mut st.q[..qd]),
                self.gemv_task(&lw.wk, xn, &mut st.kv_k[..kvd]),
                self.gemv_task(&lw.wv, xn, &mut st.kv_v[..kvd]),
            ]);
        } else {
            self.linear(&lw.wq, &st.xn[..n * d], n, &mut st.q[..n * qd], &st.wtiles);
            self.linear(&lw.wk, &st.xn[..n * d], n, &mut st.kv_k[..n * kvd], &st.wtiles);
            self.linear(&lw.wv, &st.xn[..n * d], n, &mut st.kv_v[..n * kvd], &st.wtiles);
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
            if n == 1 {
                if !self.attention_on_device(l, st, stores, metas) {
                    self.attention_token(st, stores, metas, team);
                }
            } else {
                self.attention(st, stores, metas, n);
            }
        }
        self.linear_on(team, &lw.wo, &st.att[..n * qd], n, &mut st.o[..n * d], &st.wtiles);
        add_bias_rows(&mut st.o[..n * d], lw.bo.as_deref());
        add_into(&mut st.x[..n * d], &st.o[..n * d]);

        // --- MLP block (SwiGLU) ---
        rmsnorm_rows(&mut st.xn[..n * d], &st.x[..n * d], &lw.ffn_norm, d, eps);
        if n == 1 {
            // One token: gate and up in one team stage.
            let xn = &st.xn[..d];
            k::gemv_multi_team(team, &mut [
                self.gemv_task(&lw.w_gate, xn, &mut st.gate[..ff]),
                self.gemv_task(&lw.w_up, xn, &mut st.up[..ff]),
            ]);
        } else {
            self.linear(&lw.w_gate, &st.xn[..n * d], n, &mut st.gate[..n * ff], &st.wtiles);
            self.linear(&lw.w_up, &st.xn[..n * d], n, &mut st.up[..n * ff], &st.wtiles);
        }
        add_bias_rows(&mut st.gate[..n * ff], lw.b_gate.as_deref());
        add_bias_rows(&mut st.up[..n * ff], lw.b_up.as_deref());
        st.gate[..n * ff]
            .par_chunks_mut(ff)
            .zip(st.up[..n * ff].par_chunks(ff))
            .for_each(|(g, u)| k::silu_mul(g, u));
        self.linear_on(team, &lw.w_down, &st.gate[..n * ff], n, &mut st.o[..n * d], &st.wtiles);
        add_bias_rows(&mut st.o[..n * d], lw.b_down.as_deref());
        add_into(&mut st.x[..n * d], &st.o[..n * d]);

        if let Some(cap) = st.capture.as_mut().filter(|c| c.hidden_enabled) {
            cap.hidden.resize(c.n_layers, Vec::new());
            cap.hidden[l].extend_from_slice(&st.x[..n * d]);
        }
    }

    /// Layers `from..` and the logits of rows `logits_from..n` ([n − logits_from, vocab]), for
    /// residual rows st.x [n, d] that are the input of layer `from` at positions set by
    /// [`Model::prepare_positions`]. After a change to the cache of layer `from` only these layers
    /// can see it, so the influence sweep re-runs just them. The rows' own keys and values are
    /// removed again; the counter is untouched.
    pub fn forward_from<'s>(&self, from: usize, st: &'s mut RunState, cache: &mut KvCache, n: usize, logits_from: usize) -> &'s [f32] {
        let pos0 = st.positions[0] as usize;
        let d = self.config.hidden_size;
        st.logits.clear();
        for l in from..self.config.n_layers {
            self.layer(l, st, cache, n);
            cache.truncate_layer_to(l, pos0);
        }
        // Only the wanted rows go through the lm_head (the largest matrix of a small model).
        let m = n - logits_from.min(n);
        st.x.copy_within(logits_from * d..n * d, 0);
        self.head(st, m, Logits::All, &k::Team::solo());
        &st.logits
    }

    /// Layer `l`'s queries for the residual rows st.x [n, d] (after q_norm and RoPE, as the
    /// attention would see them), without touching the cache: [n, nh*hd].
    pub fn layer_queries<'s>(&self, l: usize, st: &'s mut RunState, n: usize) -> &'s [f32] {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (d, qd, half) = (c.hidden_size, c.q_dim(), c.head_dim / 2);
        rmsnorm_rows(&mut st.xn[..n * d], &st.x[..n * d], &lw.attn_norm, d, c.rms_norm_eps);
        self.linear(&lw.wq, &st.xn[..n * d], n, &mut st.q[..n * qd], &st.wtiles);
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
    fn head(&self, st: &mut RunState, n: usize, want: Logits, team: &k::Team<'_>) {
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
        self.linear_on(team, &w.lm_head, xn, m, &mut st.logits[at..], &st.wtiles);
    }

    /// The residual stream rows st.x [n, d] (to save or restore hidden states between layers).
    pub fn residual<'s>(&self, st: &'s mut RunState, n: usize) -> &'s mut [f32] {
        &mut st.x[..n * self.config.hidden_size]
    }

    /// A one-token `y = W x` for [`k::gemv_multi_team`].
    fn gemv_task<'a>(&'a self, wm: &MatrixView, x: &'a [f32], y: &'a mut [f32]) -> k::GemvTask<'a> {
        k::GemvTask { w: self.weights.view(wm), rows: wm.rows, cols: wm.cols, x, y }
    }

    /// [`Model::linear`], with a one-token product run as a stage of `team` when it has helpers.
    fn linear_on(&self, team: &k::Team<'_>, wm: &MatrixView, x: &[f32], n: usize, y: &mut [f32], wtiles: &[std::sync::Mutex<Vec<f32>>]) {
        if n == 1 && team.size() > 1 {
            k::gemv_multi_team(team, &mut [self.gemv_task(wm, x, y)]);
        } else {
            self.linear(wm, x, n, y, wtiles);
        }
    }

    /// y[n, out] = x[n, in] · Wᵀ for W [out, in] in its stored dtype.
    fn linear(&self, wm: &MatrixView, x: &[f32], n: usize, y: &mut [f32], wtiles: &[std::sync::Mutex<Vec<f32>>]) {
        let (out, inp) = (wm.rows, wm.cols);
        debug_assert_eq!(x.len(), n * inp);
        debug_assert_eq!(y.len(), n * out);
        let wr = self.weights.view(wm);
        if n == 1 {
            k::gemv_par(wr, out, inp, x, y);
            return;
        }
        let xm = MatRef::from_row_major_slice(x, n, inp);
        // Tiles of weight rows run on the pool's threads, each multiplied (sequentially) into its
        // own output columns: every thread packs only its own weight panels, and bf16/f16 tiles
        // are widened there into the thread's own buffer. The split depends on `out` only, so
        // the bits do not depend on the thread count.
        let tr = gemm_tile_rows(out);
        let mut blocks = Vec::with_capacity(out.div_ceil(tr));
        let mut rest = MatMut::from_row_major_slice_mut(y, n, out);
        let mut r0 = 0;
        while r0 < out {
            let w = tr.min(out - r0);
            let (block, tail) = rest.split_at_col_mut(w);
            blocks.push((r0, w, block));
            rest = tail;
            r0 += w;
        }
        blocks.into_par_iter().for_each(|(r0, w, ym)| match wr {
            k::WeightRef::F32(ws) => {
                let wt = MatRef::from_row_major_slice(&ws[r0 * inp..(r0 + w) * inp], w, inp).transpose();
                faer::linalg::matmul::matmul(ym, Accum::Replace, xm, wt, 1.0f32, Par::Seq);
            }
            _ => {
                let slot = rayon::current_thread_index().unwrap_or(0) % wtiles.len().max(1);
                let mut guard = wtiles[slot].lock().unwrap_or_else(|p| p.into_inner());
                if guard.len() < w * inp {
                    guard.resize(w * inp, 0.0);
                }
                let tile = &mut guard[..w * inp];
                k::widen_rows(wr, r0, w, inp, tile);
                let wt = MatRef::from_row_major_slice(&*tile, w, inp).transpose();
                faer::linalg::matmul::matmul(ym, Accum::Replace, xm, wt, 1.0f32, Par::Seq);
            }
        });
    }
}

impl RunState {
    /// Tokens one forward chunk can hold.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Run one-token decode attention on `device` from now on (the CPU: the default). With CUDA,
    /// the GPU checks first; the cache is mirrored there as it grows (f32, as on the CPU).
    pub fn use_device(&mut self, device: crate::device::Device, n_layers: usize) -> Result<()> {
        device.check()?;
        #[cfg(feature = "cuda")]
        {
            self.device_cache = match device {
                crate::device::Device::Cpu => None,
                crate::device::Device::Cuda => Some(crate::cuda::attention::DeviceCache::new(n_layers)?),
            };
        }
        let _ = n_layers;
        Ok(())
    }
}

/// RMSNorm every row of x [n, d] into out [n, d].
pub(super) fn rmsnorm_rows(out: &mut [f32], x: &[f32], weight: &[f32], d: usize, eps: f32) {
    out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, xi)| k::rmsnorm(o, xi, weight, eps));
}

/// Add a bias [m] to every row of y [n, m].
pub(super) fn add_bias_rows(y: &mut [f32], bias: Option<&[f32]>) {
    if let Some(b) = bias {
        for row in y.chunks_mut(b.len()) {
            row.iter_mut().zip(b).for_each(|(a, b)| *a += b);
        }
    }
}

pub(super) fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
}

/// For rows [n, heads*hd] (token-major): optional per-head RMSNorm (Qwen3 q/k norm), then
/// rotate-half RoPE with token i's cos/sin row.
pub(super) fn rope_heads(x: &mut [f32], heads: usize, hd: usize, cos: &[f32], sin: &[f32], norm: Option<&[f32]>, eps: f32) {
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
