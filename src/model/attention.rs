//! Attention inside one layer: the per-token decode kernel, the flash-style blocked prefill over
//! the ragged per-(layer, KV head) cache with β, and Slim Attention's K-only variant.
//!
//! Every path sees a head's rows through `positions` (causal mask and sliding window by absolute
//! position, not by row index) and adds the per-row logit bias β when a compacted head has one.

use faer::{Accum, MatMut, MatRef, Par};
use kvcompact_kernels as k;
use rayon::prelude::*;

use super::forward::{Model, RunState};
use crate::cache::{HeadMeta, HeadStore, KvCache, KvRows, SlimMode};

/// Chunks of at least this many tokens use the blocked GEMM attention; fewer use the
/// per-token kernel (decode).
const BLOCK_ATTN_MIN_TOKENS: usize = 8;
/// Query tokens per attention block.
const ATTN_BLOCK_TOKENS: usize = 64;
/// Key rows per step of the flash-style prefill attention (S is [G·64, 256]).
const ATTN_KEY_BLOCK: usize = 256;

impl Model {
    /// Causal attention of the chunk's queries st.q [n, nh·hd] over one layer's heads into
    /// st.att: token i sees its head's rows up to st.base[g] + i (everything cached earlier has a
    /// smaller position), minus any sliding window.
    pub(super) fn attention(&self, st: &mut RunState, stores: &[HeadStore], metas: &[HeadMeta], n: usize) {
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
            let qs = &q[i * qd + g * group * hd..i * qd + (g + 1) * group * hd];
            attend_token(qs, &stores[g], &metas[g], base[g] + i + 1, pos0 + i, window, hd, scale, out, scratch);
        });
    }

    /// One token's attention (st.q [nh·hd] → st.att), one team item per KV head: the same
    /// per-head kernel and visible rows as [`Model::attention`] at n = 1.
    pub(super) fn attention_token(&self, st: &mut RunState, stores: &[HeadStore], metas: &[HeadMeta], team: &k::Team<'_>) {
        let c = &self.config;
        let (hd, qd, group) = (c.head_dim, c.q_dim(), c.group_size());
        let scale = c.attn_scale();
        let window = c.sliding_window;
        let pos = st.positions[0] as usize;
        let q = &st.q[..qd];
        let base = &st.base[..];
        st.att_scratch.resize_with(st.att_scratch.len().max(stores.len()), Vec::new);
        let mut items: Vec<(&mut [f32], &mut Vec<f32>)> = st.att[..qd].chunks_mut(group * hd).zip(st.att_scratch.iter_mut()).collect();
        team.for_each_mut(&mut items, |g, (out, scratch)| {
            let qs = &q[g * group * hd..(g + 1) * group * hd];
            attend_token(qs, &stores[g], &metas[g], base[g] + 1, pos, window, hd, scale, out, scratch);
        });
    }

    /// One token's attention on the GPU when [`RunState::use_device`] chose CUDA; false (the CPU
    /// runs it) otherwise or when the GPU call failed (the error is kept for `forward`).
    #[cfg(feature = "cuda")]
    pub(super) fn attention_on_device(&self, l: usize, st: &mut RunState, stores: &[HeadStore], metas: &[HeadMeta]) -> bool {
        use crate::cuda::attention::HeadRows;
        let Some(dev) = st.device_cache.as_mut() else { return false };
        let c = &self.config;
        let (hd, qd) = (c.head_dim, c.q_dim());
        let qpos = st.positions[0] as usize;
        let mut heads: Vec<HeadRows> = Vec::with_capacity(stores.len());
        for (s, m) in stores.iter().zip(metas) {
            // The device path reads f32 rows; a bf16 cache decodes on the CPU.
            let (KvRows::F32(keys), KvRows::F32(values)) = (&s.keys, &s.values) else { return false };
            heads.push(HeadRows { keys, values, bias: m.bias.as_deref(), positions: &m.positions, start: window_start(c.sliding_window, qpos, &m.positions) });
        }
        match dev.attend(l, &st.q[..qd], &heads, c.group_size(), hd, c.attn_scale(), &mut st.att[..qd]) {
            Ok(()) => true,
            Err(e) => {
                st.device_error.get_or_insert(e);
                false
            }
        }
    }

    #[cfg(not(feature = "cuda"))]
    pub(super) fn attention_on_device(&self, _: usize, _: &mut RunState, _: &[HeadStore], _: &[HeadMeta]) -> bool {
        false
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
        // Per query row: running max, running sum, visible key rows [start, visible).
        type RowStats = (f32, f32, usize, usize);
        // Per task: the block's queries, scores, per-row stats, and widened K and V blocks (bf16 caches).
        type Scratch = (Vec<f32>, Vec<f32>, Vec<RowStats>, (Vec<f32>, Vec<f32>));
        st.att_hm[..nkv * n * row_w].par_chunks_mut(n * row_w).enumerate().for_each(|(g, head_out)| {
            head_out.par_chunks_mut(ATTN_BLOCK_TOKENS * row_w).enumerate().for_each_init(
                || (Vec::new(), Vec::new(), Vec::new(), (Vec::new(), Vec::new())),
                |(qbuf, sbuf, stats, (kbuf, vbuf)): &mut Scratch, (bi, out)| {
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
                        let kblk = stores[g].keys.range_f32_in(k0 * hd..k1 * hd, kbuf);
                        let keys = MatRef::from_row_major_slice(kblk, w, hd);
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
                        let vblk = stores[g].values.range_f32_in(k0 * hd..k1 * hd, vbuf);
                        let vals = MatRef::from_row_major_slice(vblk, w, hd);
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
    pub(super) fn decide_slim(&self, l: usize, st: &RunState, cache: &mut KvCache, n: usize) -> bool {
        let sw = self.slim.as_ref().expect("a slim cache implies slim weights (checked in forward)");
        let Some(layer) = sw.layers[l].as_ref() else {
            cache.set_slim_mode(l, SlimMode::Full, None, n);
            return false;
        };
        let kvd = self.config.kv_dim();
        let mut v = vec![0.0f32; n * kvd];
        layer.values_from_unbiased_par(&st.kv_k[..n * kvd], n, &mut v);
        let err = crate::model::slim::rel_fro(&v, &st.kv_v[..n * kvd]);
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
    pub(super) fn attention_slim(&self, l: usize, st: &mut RunState, cache: &KvCache, n: usize) {
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
                    HeadStore { keys: KvRows::F32(keys), values: KvRows::F32(values) }
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
}

/// First visible row for a query at `qpos` under a sliding window (rows are position-sorted).
/// One token's attention for the G query heads `qs` [G·hd] of one KV head over that head's first
/// `visible` rows (its own row included), minus the sliding window: the per-token kernel that
/// decode uses, alone ([`Model::forward`]) or batched ([`Model::decode_batch`]) — one function, so
/// both give the same bits.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_token(qs: &[f32], store: &HeadStore, meta: &HeadMeta, visible: usize, qpos: usize, window: Option<usize>, hd: usize, scale: f32, out: &mut [f32], scratch: &mut Vec<f32>) {
    let start = window_start(window, qpos, &meta.positions[..visible]);
    let keys = store.keys.range_weights(start * hd..visible * hd);
    let values = store.values.range_weights(start * hd..visible * hd);
    let bias = meta.bias.as_deref().map(|b| &b[start..visible]);
    k::attend_group_kv(qs, keys, values, bias, visible - start, hd, scale, out, scratch);
}

pub(super) fn window_start(window: Option<usize>, qpos: usize, positions: &[u32]) -> usize {
    match window {
        Some(w) if qpos >= w => positions.partition_point(|&p| (p as usize) + w <= qpos),
        _ => 0,
    }
}

