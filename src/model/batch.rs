//! Batched decode: one token for each of m sequences in one step, each with its own cache.
//!
//! Every weight matrix is streamed once per step for all m sequences
//! ([`k::gemv_batch_multi_team`], on a [`k::Team`] kept awake for the step); attention stays per
//! sequence over its own ragged cache (with β). Each row's arithmetic is exactly the one-token path of [`Model::forward`] — the batched
//! GEMV reduces every (row, vector) with the single-vector kernel's function, norms, RoPE and
//! attention are per row — so a sequence's logits are bit-identical whatever else is in the
//! batch, and equal to decoding it alone.

use kvcompact_kernels as k;
use rayon::prelude::*;

use super::attention::attend_token;
use super::forward::{add_bias_rows, add_into, rmsnorm_rows, rope_heads, Model, RunState};
use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::model::weights::MatrixView;

impl Model {
    /// Decode `tokens[i]` on `caches[i]` for every i (one step of m sequences): appends each
    /// token's keys/values at its cache's logical position and leaves the logits of all m in
    /// `st.logits` [m, vocab]. `st` must hold at least m rows.
    pub fn decode_batch(&self, st: &mut RunState, caches: &mut [&mut KvCache], tokens: &[u32]) -> Result<()> {
        let c = &self.config;
        let m = tokens.len();
        if m != caches.len() {
            return Err(Error::Shape { op: "Model::decode_batch", expected: format!("{} caches", m), got: format!("{}", caches.len()) });
        }
        if m == 0 {
            st.logits.clear();
            return Ok(());
        }
        if m > st.max_batch {
            return Err(Error::Invalid(format!("decode_batch: {m} sequences exceed the run state's {} rows", st.max_batch)));
        }
        if let Some(&t) = tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(Error::Prompt(format!("token id {t} is outside the vocabulary ({})", c.vocab_size)));
        }
        for cache in caches.iter() {
            if cache.is_slim() {
                return Err(Error::Invalid("decode_batch: slim (K-only) caches are not batched".into()));
            }
            if (cache.n_layers, cache.n_kv_heads, cache.head_dim) != (c.n_layers, c.n_kv_heads, c.head_dim) {
                return Err(Error::Shape {
                    op: "Model::decode_batch",
                    expected: format!("caches of {} layers × {} KV heads × {}", c.n_layers, c.n_kv_heads, c.head_dim),
                    got: format!("{} × {} × {}", cache.n_layers, cache.n_kv_heads, cache.head_dim),
                });
            }
            if cache.next_pos() >= c.max_position_embeddings {
                return Err(Error::Prompt(format!("a sequence is at position {}, the end of the model's context", cache.next_pos())));
            }
        }
        self.embed(st, tokens);
        let half = c.head_dim / 2;
        for (i, cache) in caches.iter().enumerate() {
            let pos = cache.next_pos();
            st.positions[i] = pos as u32;
            let p = pos as f32;
            for j in 0..half {
                // The same f32 angle and single rounding as `prepare_positions`.
                let a = (p * self.inv_freq[j]) as f64;
                st.cos[i * half + j] = a.cos() as f32;
                st.sin[i * half + j] = a.sin() as f32;
            }
        }
        // The pool's threads stay awake for the whole step: every parallel stage is a team stage.
        k::team_scope(|team| {
            for l in 0..c.n_layers {
                self.layer_batch(l, st, caches, m, team);
            }
            for cache in caches.iter_mut() {
                cache.advance(1);
            }
            // Final norm and lm_head for every row.
            let d = c.hidden_size;
            rmsnorm_rows(&mut st.xn[..m * d], &st.x[..m * d], &self.weights.final_norm, d, c.rms_norm_eps);
            st.logits.clear();
            st.logits.resize(m * c.vocab_size, 0.0);
            let w = &self.weights.lm_head;
            k::gemv_batch_multi_team(team, &mut [self.batch_task(w, &st.xn[..m * d], &mut st.logits[..])]);
        });
        Ok(())
    }

    /// A batched `ys = W xs` for [`k::gemv_batch_multi_team`].
    fn batch_task<'a>(&'a self, wm: &MatrixView, xs: &'a [f32], ys: &'a mut [f32]) -> k::GemvBatchTask<'a> {
        k::GemvBatchTask { w: self.weights.view(wm), rows: wm.rows, cols: wm.cols, xs, ys }
    }

    /// Decoder layer `l` for one token of each of m sequences (rows of st.x [m, d]); row i
    /// belongs to `caches[i]` at position st.positions[i].
    fn layer_batch(&self, l: usize, st: &mut RunState, caches: &mut [&mut KvCache], m: usize, team: &k::Team<'_>) {
        let c = &self.config;
        let lw = &self.weights.layers[l];
        let (d, hd, ff) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (qd, kvd, half) = (c.q_dim(), c.kv_dim(), c.head_dim / 2);
        let (nh, nkv, group) = (c.n_heads, c.n_kv_heads, c.group_size());
        let eps = c.rms_norm_eps;

        // --- attention block ---
        rmsnorm_rows(&mut st.xn[..m * d], &st.x[..m * d], &lw.attn_norm, d, eps);
        {
            let xn = &st.xn[..m * d];
            k::gemv_batch_multi_team(team, &mut [
                self.batch_task(&lw.wq, xn, &mut st.q[..m * qd]),
                self.batch_task(&lw.wk, xn, &mut st.kv_k[..m * kvd]),
                self.batch_task(&lw.wv, xn, &mut st.kv_v[..m * kvd]),
            ]);
        }
        add_bias_rows(&mut st.q[..m * qd], lw.bq.as_deref());
        add_bias_rows(&mut st.kv_v[..m * kvd], lw.bv.as_deref());
        add_bias_rows(&mut st.kv_k[..m * kvd], lw.bk.as_deref());
        let (cos, sin) = (&st.cos[..m * half], &st.sin[..m * half]);
        rope_heads(&mut st.q[..m * qd], nh, hd, cos, sin, lw.q_norm.as_deref(), eps);
        rope_heads(&mut st.kv_k[..m * kvd], nkv, hd, cos, sin, lw.k_norm.as_deref(), eps);

        for (i, cache) in caches.iter_mut().enumerate() {
            cache.reserve(l, 1);
            let (kr, vr) = (&st.kv_k[i * kvd..(i + 1) * kvd], &st.kv_v[i * kvd..(i + 1) * kvd]);
            for h in 0..nkv {
                cache.append_strided(l, h, kr, vr, kvd, h * hd, &st.positions[i..i + 1]);
            }
        }
        // Attention per (sequence, KV head): the one-token kernel over that sequence's rows.
        let layers: Vec<_> = caches.iter().map(|cache| cache.layer(l)).collect();
        let scale = c.attn_scale();
        let window = c.sliding_window;
        let q = &st.q[..m * qd];
        let positions = &st.positions[..m];
        st.att_scratch.resize_with(st.att_scratch.len().max(m * nkv), Vec::new);
        let mut items: Vec<(&mut [f32], &mut Vec<f32>)> = st.att[..m * qd].chunks_mut(group * hd).zip(st.att_scratch.iter_mut()).collect();
        team.for_each_mut(&mut items, |idx, (out, scratch)| {
            let (i, g) = (idx / nkv, idx % nkv);
            let (stores, metas) = layers[i];
            let qs = &q[i * qd + g * group * hd..i * qd + (g + 1) * group * hd];
            attend_token(qs, &stores[g], &metas[g], metas[g].positions.len(), positions[i] as usize, window, hd, scale, out, scratch);
        });
        k::gemv_batch_multi_team(team, &mut [self.batch_task(&lw.wo, &st.att[..m * qd], &mut st.o[..m * d])]);
        add_bias_rows(&mut st.o[..m * d], lw.bo.as_deref());
        add_into(&mut st.x[..m * d], &st.o[..m * d]);

        // --- MLP block (SwiGLU) ---
        rmsnorm_rows(&mut st.xn[..m * d], &st.x[..m * d], &lw.ffn_norm, d, eps);
        {
            let xn = &st.xn[..m * d];
            k::gemv_batch_multi_team(team, &mut [
                self.batch_task(&lw.w_gate, xn, &mut st.gate[..m * ff]),
                self.batch_task(&lw.w_up, xn, &mut st.up[..m * ff]),
            ]);
        }
        add_bias_rows(&mut st.gate[..m * ff], lw.b_gate.as_deref());
        add_bias_rows(&mut st.up[..m * ff], lw.b_up.as_deref());
        st.gate[..m * ff].par_chunks_mut(ff).zip(st.up[..m * ff].par_chunks(ff)).for_each(|(g, u)| k::silu_mul(g, u));
        k::gemv_batch_multi_team(team, &mut [self.batch_task(&lw.w_down, &st.gate[..m * ff], &mut st.o[..m * d])]);
        add_bias_rows(&mut st.o[..m * d], lw.b_down.as_deref());
        add_into(&mut st.x[..m * d], &st.o[..m * d]);
    }
}
