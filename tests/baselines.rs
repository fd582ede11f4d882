//! The eviction baselines (spec baselines.md §1–§2): each method's scoring on small cases checked
//! by hand (or by a naive loop written out here), the common frame (protected rows, ties, budget),
//! and the effect on a real cache (positions unique and sorted, lengths within budget, bytes
//! freed) through the registry and `document::compact_context` on a tiny model.

// Index loops and `a <= b + m - 1` bounds mirror the formulas the assertions check.
#![allow(clippy::needless_range_loop, clippy::int_plus_one)]

mod common;

use common::golden;
use kvcompact::compact::evict::{keep_rows, select, span_attention};
use kvcompact::compact::{
    method_from_name, method_with, Budget, Compressor, ExpectedAttention, FullHead, H2o, HeadContext, HeadInput, KNorm, MethodOptions,
    Observed, Protect, PyramidKv, RandomEvict, Scorer, SnapKv, StreamingLlm, Tova, METHODS,
};
use kvcompact::document::{compact_context, CompactOptions, ContextLayout, QuerySource};
use kvcompact::model::{Logits, Model};
use kvcompact::compact::qfilters::{QFilterScorer, QFilters};
use kvcompact::tokenizer::Tokenizer;

/// A head of T rows with d = 2: keys, values = keys, positions 0..T.
struct Head {
    keys: Vec<f32>,
    values: Vec<f32>,
    pos: Vec<u32>,
    d: usize,
}

impl Head {
    fn new(keys: &[[f32; 2]]) -> Head {
        let k: Vec<f32> = keys.iter().flatten().copied().collect();
        Head { values: k.clone(), keys: k, pos: (0..keys.len() as u32).collect(), d: 2 }
    }
    fn input<'a>(&'a self, queries: Option<&'a [f32]>) -> HeadInput<'a> {
        HeadInput { layer: 0, kv_head: 0, d: self.d, keys: &self.keys, values: &self.values, positions: &self.pos, bias: None, queries, scale: 1.0 }
    }
}

fn softmax(x: &[f64]) -> Vec<f64> {
    let m = x.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = x.iter().map(|v| (v - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

fn dot2(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= tol * (1.0 + y.abs()), "row {i}: {x} vs {y}\n{a:?}\n{b:?}");
    }
}

#[test]
fn frame_protects_sinks_and_window_and_breaks_ties_low() {
    let s = [0.0, 5.0, 5.0, 1.0, 9.0, 2.0];
    assert_eq!(select(&s, 3, Protect::default()), vec![1, 2, 4]);
    assert_eq!(select(&s, 2, Protect::default()), vec![1, 4]);
    assert_eq!(select(&s, 3, Protect { sinks: 1, window: 1 }), vec![0, 4, 5]);
    assert_eq!(select(&s, 6, Protect { sinks: 9, window: 9 }), vec![0, 1, 2, 3, 4, 5]);
}

#[test]
fn streaming_llm_keeps_sinks_and_the_most_recent_rows() {
    let h = Head::new(&[[1.0, 0.0]; 10]);
    let m = method_from_name("streaming-llm").unwrap();
    assert_eq!(m.compress_head(&h.input(None), 6, 0).unwrap().indices, vec![0, 1, 2, 3, 8, 9]);
    assert_eq!(m.compress_head(&h.input(None), 3, 0).unwrap().indices, vec![0, 1, 2]);
    let two = kvcompact::compact::Evict(StreamingLlm { n_sink: 2 });
    assert_eq!(two.compress_head(&h.input(None), 5, 0).unwrap().indices, vec![0, 1, 7, 8, 9]);
}

#[test]
fn knorm_keeps_the_smallest_keys() {
    let h = Head::new(&[[3.0, 0.0], [0.0, 1.0], [1.2, 1.6], [4.0, 3.0]]); // norms 3, 1, 2, 5
    let s = KNorm.score_head(&h.input(None), &HeadContext::default(), 0).unwrap();
    assert_close(&s, &[-3.0, -1.0, -2.0, -5.0], 1e-6);
    let out = method_from_name("knorm").unwrap().compress_head(&h.input(None), 2, 0).unwrap();
    assert_eq!(out.indices, vec![1, 2]);
    // Kept rows carry their keys, values and β = 0.
    assert_eq!(out.keys, vec![0.0, 1.0, 1.2, 1.6]);
    assert_eq!(out.values, out.keys);
    assert_eq!(out.beta, vec![0.0, 0.0]);
}

#[test]
fn random_is_seeded_and_within_budget() {
    let h = Head::new(&[[1.0, 0.0]; 50]);
    let m = method_from_name("random").unwrap();
    let a = m.compress_head(&h.input(None), 10, 7).unwrap().indices;
    assert_eq!(a, m.compress_head(&h.input(None), 10, 7).unwrap().indices);
    assert_ne!(a, m.compress_head(&h.input(None), 10, 8).unwrap().indices);
    assert_eq!(a.len(), 10);
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    let s = RandomEvict.score_head(&h.input(None), &HeadContext::default(), 3).unwrap();
    assert!(s.iter().all(|x| (0.0..1.0).contains(x)));
}

#[test]
fn qfilters_score_is_minus_dot_with_the_filter() {
    // One layer, one KV head, d = 2, f = (1, 0): score(k) = −k₀.
    let f = QFilters { n_layers: 1, n_kv_heads: 1, head_dim: 2, filters: vec![1.0, 0.0], metadata: Default::default() };
    let sc = QFilterScorer::new(std::sync::Arc::new(f));
    let h = Head::new(&[[-2.0, 0.0], [1.0, 0.0], [0.0, 3.0]]);
    let s = sc.score_head(&h.input(None), &HeadContext::default(), 0).unwrap();
    assert_close(&s, &[2.0, -1.0, 0.0], 1e-9);
    assert_eq!(select(&s, 1, sc.protect(3, 1, &HeadContext::default())), vec![0]);
    // Through the registry.
    let m = method_with("qfilters", &MethodOptions { filters: Some(sc.filters.clone()), ..Default::default() }).unwrap();
    assert_eq!(m.compress_head(&h.input(None), 2, 0).unwrap().indices, vec![0, 2]);
    assert!(method_from_name("qfilters").is_err(), "qfilters needs filters");
}

/// Observed queries, token-major [m, n_heads * d] for one KV head of G = n_heads query heads.
fn observed(rows: &[[f32; 2]]) -> Vec<f32> {
    rows.iter().flatten().copied().collect()
}

#[test]
fn h2o_sums_causal_attention_over_the_queries_that_see_each_row() {
    let h = Head::new(&[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]]);
    let q = [[0.5f32, 0.2], [1.0, -1.0], [0.0, 2.0], [0.3, 0.3]];
    let qflat = observed(&q);
    let ctx = HeadContext { observed: Some(Observed { queries: &qflat, positions: &h.pos, n_heads: 1 }), group: 1, ..Default::default() };
    let s = H2o::default().score_head(&h.input(None), &ctx, 0).unwrap();
    // By hand: query i sees rows 0..=i; row j is seen by 4 − j queries.
    let mut want = [0.0f64; 4];
    for (i, qi) in q.iter().enumerate() {
        let logits: Vec<f64> = (0..=i).map(|j| dot2(qi, &h.keys[j * 2..j * 2 + 2])).collect();
        for (j, a) in softmax(&logits).iter().enumerate() {
            want[j] += a;
        }
    }
    for (j, w) in want.iter_mut().enumerate() {
        *w /= (4 - j) as f64;
    }
    assert_close(&s, &want, 1e-6);
    // Budget 2 → 1 recent row + 1 heavy hitter.
    assert_eq!(H2o::default().protect(4, 2, &ctx), Protect { sinks: 0, window: 1 });
    let out = kvcompact::compact::Evict(H2o::default()).compress_head_ctx(&h.input(None), &ctx, 2, 0).unwrap();
    let heavy = (0..3).max_by(|&a, &b| want[a].total_cmp(&want[b]).then(b.cmp(&a))).unwrap();
    assert_eq!(out.indices, vec![heavy, 3]);
}

#[test]
fn attention_over_the_full_head_includes_template_rows() {
    // Span = rows 1..3 of a 4-row head; the query at position 3 sees all 4 rows.
    let full = Head::new(&[[2.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.5]]);
    let span = Head { keys: full.keys[2..6].to_vec(), values: full.values[2..6].to_vec(), pos: vec![1, 2], d: 2 };
    let ctx = HeadContext { full: Some(FullHead { keys: &full.keys, bias: None, positions: &full.pos, span: 1..3 }), ..Default::default() };
    let q = [1.0f32, 0.5];
    let mut got = Vec::new();
    span_attention(&span.input(None), &ctx, &q, Some(&[3]), |_, w| got = w.to_vec());
    let all = softmax(&(0..4).map(|j| dot2(&q, &full.keys[j * 2..j * 2 + 2])).collect::<Vec<_>>());
    assert_close(&got, &all[1..3], 1e-6);
    // A query at position 1 does not see row 2.
    span_attention(&span.input(None), &ctx, &q, Some(&[1]), |_, w| got = w.to_vec());
    assert_eq!(got[1], 0.0);
}

#[test]
fn snapkv_uses_the_window_queries_then_pools() {
    // 6 rows; window 2 (rows 4, 5); observed queries at every position.
    let keys = [[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, -1.0], [0.5, 0.5], [1.0, 1.0]];
    let h = Head::new(&keys);
    let q = [[0.0f32, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0]];
    let qflat = observed(&q);
    let ctx = HeadContext { observed: Some(Observed { queries: &qflat, positions: &h.pos, n_heads: 1 }), group: 1, ..Default::default() };
    let snap = SnapKv { window: 2, kernel: 1 };
    let s = snap.score_head(&h.input(None), &ctx, 0).unwrap();
    let mut want = [0.0f64; 4];
    for i in 4..6 {
        let a = softmax(&(0..=i).map(|j| dot2(&q[i], &h.keys[j * 2..j * 2 + 2])).collect::<Vec<_>>());
        for j in 0..4 {
            want[j] += a[j] / 2.0;
        }
    }
    assert_close(&s[..4], &want, 1e-6);
    // Kernel 3: average pool with zero padding over the 4 scored rows.
    let pooled = SnapKv { window: 2, kernel: 3 }.score_head(&h.input(None), &ctx, 0).unwrap();
    let wp = [(want[0] + want[1]) / 3.0, (want[0] + want[1] + want[2]) / 3.0, (want[1] + want[2] + want[3]) / 3.0, (want[2] + want[3]) / 3.0];
    assert_close(&pooled[..4], &wp, 1e-6);
    // Budget 3: the 2 window rows + the best scored row.
    let out = kvcompact::compact::Evict(snap).compress_head_ctx(&h.input(None), &ctx, 3, 0).unwrap();
    let best = (0..4).max_by(|&a, &b| want[a].total_cmp(&want[b]).then(b.cmp(&a))).unwrap();
    assert_eq!(out.indices, vec![best, 4, 5]);
    // Budget below the window: the most recent rows.
    assert_eq!(kvcompact::compact::Evict(snap).compress_head_ctx(&h.input(None), &ctx, 1, 0).unwrap().indices, vec![5]);
}

#[test]
fn pyramidkv_budgets_fall_linearly_and_average_to_the_uniform_budget() {
    let p = PyramidKv::default(); // β = 20, w = 64
    // b = 36, min = 1.8, max = 70.2 → 70, 47, 25, 2 (+64).
    assert_eq!(p.layer_budgets(4, 1000, 100), vec![134, 111, 89, 66]);
    let b = p.layer_budgets(30, 4000, 400);
    assert!(b.windows(2).all(|w| w[0] >= w[1]));
    let mean = b.iter().sum::<usize>() as f64 / 30.0;
    assert!((mean - 400.0).abs() < 1.0, "{mean}");
    // Infeasible → uniform SnapKV.
    assert_eq!(p.layer_budgets(4, 1000, 50), vec![50; 4]);
    assert_eq!(p.layer_budgets(4, 200, 150), vec![150; 4]);
    // Per head, layer-major.
    let m = method_from_name("pyramidkv").unwrap();
    assert_eq!(m.head_budgets(4, 2, 1000, 100), vec![134, 134, 111, 111, 89, 89, 66, 66]);
    assert_eq!(method_from_name("snapkv").unwrap().head_budgets(2, 2, 1000, 100), vec![100; 4]);
}

#[test]
fn tova_shares_the_last_tokens_attention_across_the_layer() {
    // Two KV heads (G = 1 each), same positions, different keys; the last query of each head.
    let h0 = Head::new(&[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]);
    let h1 = Head { keys: vec![0.0, 2.0, 2.0, 0.0, -1.0, 0.0], values: vec![0.0; 6], pos: vec![0, 1, 2], d: 2 };
    // Token-major [3 tokens, 2 heads × d].
    let q = [0.0f32, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.5];
    let mk = |_kv: usize| HeadContext { observed: Some(Observed { queries: &q, positions: &h0.pos, n_heads: 2 }), group: 1, ..Default::default() };
    let mut i0 = h0.input(None);
    let mut i1 = h1.input(None);
    i0.kv_head = 0;
    i1.kv_head = 1;
    let s = Tova.score_layer(&[i0, i1], &[mk(0), mk(1)], &[0, 0]).unwrap();
    let a0 = softmax(&(0..3).map(|j| dot2(&[1.0, 0.0], &h0.keys[j * 2..j * 2 + 2])).collect::<Vec<_>>());
    let a1 = softmax(&(0..3).map(|j| dot2(&[0.5, 0.5], &h1.keys[j * 2..j * 2 + 2])).collect::<Vec<_>>());
    let want: Vec<f64> = a0.iter().zip(&a1).map(|(x, y)| (x + y) / 2.0).collect();
    assert_close(&s[0], &want, 1e-6);
    assert_eq!(s[0], s[1], "every KV head gets the layer's score");
    // The last token is protected when it is in the span.
    assert_eq!(Tova.protect(3, 1, &HeadContext::default()), Protect { sinks: 0, window: 1 });
}

#[test]
fn expected_attention_scores_by_the_gaussian_logit_times_value_norm() {
    // Fallback path: the given queries are future post-RoPE queries; all equal → Σ = 0.
    let h = Head { keys: vec![1.0, 0.0, 0.0, 1.0, 2.0, 0.0, -1.0, 0.0], values: vec![1.0, 0.0, 0.0, 3.0, 0.5, 0.0, 1.0, 1.0], pos: vec![0, 1, 2, 3], d: 2 };
    let q = [1.0f32, 0.0, 1.0, 0.0];
    let ea = ExpectedAttention { n_future: 512, n_sink: 0, epsilon: 1e-2 };
    let s = ea.score_head(&h.input(Some(&q)), &HeadContext::default(), 0).unwrap();
    let z: Vec<f64> = (0..4).map(|j| h.keys[j * 2] as f64).collect(); // ⟨k, μ⟩ with μ = (1, 0), scale 1
    let a = softmax(&z);
    let vn = [1.0, 3.0, 0.5, 2f64.sqrt()];
    let want: Vec<f64> = (0..4).map(|j| (a[j] + 1e-2) * vn[j]).collect();
    assert_close(&s, &want, 1e-6);
    // With a covariance the quadratic term adds ½·s²·kᵀΣk: queries (1, 1) and (1, −1) → μ = (1, 0), Σ = diag(0, 1).
    let q2 = [1.0f32, 1.0, 1.0, -1.0];
    let s2 = ea.score_head(&h.input(Some(&q2)), &HeadContext::default(), 0).unwrap();
    let z2: Vec<f64> = (0..4).map(|j| h.keys[j * 2] as f64 + 0.5 * (h.keys[j * 2 + 1] as f64).powi(2)).collect();
    let a2 = softmax(&z2);
    assert_close(&s2, &(0..4).map(|j| (a2[j] + 1e-2) * vn[j]).collect::<Vec<_>>(), 1e-6);
    // Default: 4 sinks protected.
    assert_eq!(ExpectedAttention::default().protect(100, 10, &HeadContext::default()), Protect { sinks: 4, window: 0 });
}

#[test]
fn expected_attention_rotation_average_of_zero_positions_is_identity() {
    use kvcompact::compact::evict::expected_attention::mean_rotation;
    let r = mean_rotation(4, &[1.0, 0.01], 0, 1);
    assert_eq!(r, vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
    // Averaged over many turns, a fast pair shrinks and a slow one barely moves.
    let r = mean_rotation(4, &[1.0, 1e-4], 100, 512);
    assert!(r[0].abs() < 0.05 && r[5] > 0.99);
}

#[test]
fn keep_rows_carries_prior_bias() {
    let h = Head::new(&[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]);
    let bias = [0.5f32, -1.0, 2.0];
    let mut inp = h.input(None);
    inp.bias = Some(&bias);
    let out = keep_rows(&inp, &[0, 2]);
    assert_eq!(out.beta, vec![0.5, 2.0]);
    assert_eq!(out.positions(&inp), vec![0, 2]);
}

fn tiny() -> (Model, Tokenizer) {
    let dir = golden("tiny/llama-gqa");
    let m = Model::load(&dir).unwrap();
    let t = Tokenizer::load(&dir, &m.config).unwrap();
    (m, t)
}

/// Filters of the right shape for a model (a fixed pattern; no calibration needed).
fn some_filters(m: &Model) -> std::sync::Arc<QFilters> {
    let c = &m.config;
    let n = c.n_layers * c.n_kv_heads * c.head_dim;
    std::sync::Arc::new(QFilters {
        n_layers: c.n_layers,
        n_kv_heads: c.n_kv_heads,
        head_dim: c.head_dim,
        filters: (0..n).map(|i| ((i * 7919) % 13) as f32 / 13.0 - 0.5).collect(),
        metadata: Default::default(),
    })
}

#[test]
fn every_method_compacts_a_real_cache_within_budget_and_frees_bytes() {
    let (m, tok) = tiny();
    let text = "The lighthouse at Kestrel Point was built in 1871 by Ada Brant; its lamp is seen 22 miles away.";
    let layout = ContextLayout::build(&tok, text, true).unwrap();
    let mut full = m.new_cache();
    let mut st = m.new_state(64);
    m.forward(&mut st, &mut full, &layout.tokens(), Logits::None).unwrap();
    let opts = MethodOptions { filters: Some(some_filters(&m)), ..Default::default() };
    let art = layout.article.len();
    let template = layout.prefix.len() + layout.suffix.len();
    for name in METHODS.iter().filter(|n| **n != "full") {
        if kvcompact::compact::registry::runs_as_press(name, false) {
            // `compact` runs these through press_context: checked after the loop.
            continue;
        }
        let method = method_with(name, &opts).unwrap();
        let co = CompactOptions { budget: Budget::Ratio(4.0), queries: QuerySource::Context, n_queries: 64, n_test: 16, ..Default::default() };
        let (c, report) = compact_context(&m, &tok, &layout, method.as_ref(), &co).unwrap();
        c.check().unwrap();
        assert_eq!(c.next_pos(), layout.len(), "{name}: the logical length stays");
        let uniform = art / 4;
        let budgets = method.head_budgets(m.config.n_layers, m.config.n_kv_heads, art, uniform);
        for l in 0..m.config.n_layers {
            for h in 0..m.config.n_kv_heads {
                let meta = c.meta(l, h);
                assert!(meta.positions.windows(2).all(|w| w[0] < w[1]), "{name} L{l}H{h}: positions unique and sorted");
                assert!(meta.len() <= template + budgets[l * m.config.n_kv_heads + h], "{name} L{l}H{h}: {} rows over budget", meta.len());
                assert!(meta.len() >= template + 1, "{name} L{l}H{h}: kept nothing");
            }
        }
        assert!(report.kv_bytes_after < full.bytes(), "{name}: {} bytes, full {}", report.kv_bytes_after, full.bytes());
        // The compacted cache still answers (no NaN).
        let mut cc = c.clone();
        m.forward(&mut st, &mut cc, &[10, 20, 30], Logits::Last).unwrap();
        assert!(st.logits.iter().all(|x| x.is_finite()), "{name}");
    }
    // The kvpress-only names, as `compact` runs them: the whole context (prefix + article) at the
    // same number of rows per head, the end of turn after it.
    for name in kvcompact::compact::registry::PRESS_METHODS {
        let press = kvcompact::compact::registry::press_from_name(name, 0).unwrap();
        let b = (layout.prefix.len() + art) / 4;
        let (c, report) = kvcompact::document::press_context(&m, &tok, &layout, &press, Budget::Rows(b)).unwrap();
        c.check().unwrap();
        assert_eq!(c.next_pos(), layout.len(), "{name}: the logical length stays");
        let total: usize = (0..m.config.n_layers).flat_map(|l| (0..m.config.n_kv_heads).map(move |h| (l, h))).map(|(l, h)| c.meta(l, h).len()).sum();
        let heads = m.config.n_layers * m.config.n_kv_heads;
        assert_eq!(total, heads * (b + layout.suffix.len()), "{name}: {b} rows per head on average, plus the end of turn");
        for l in 0..m.config.n_layers {
            for h in 0..m.config.n_kv_heads {
                assert!(c.meta(l, h).positions.windows(2).all(|w| w[0] < w[1]), "{name} L{l}H{h}: positions unique and sorted");
            }
        }
        assert!(report.kv_bytes_after < full.bytes(), "{name}");
        let mut cc = c.clone();
        m.forward(&mut st, &mut cc, &[10, 20, 30], Logits::Last).unwrap();
        assert!(st.logits.iter().all(|x| x.is_finite()), "{name}");
    }
}

#[test]
fn eviction_methods_keep_prior_bias_and_values_unchanged() {
    let (m, tok) = tiny();
    let layout = ContextLayout::build(&tok, "A small text about rivers, boats and the sea, told twice over for length.", true).unwrap();
    for name in ["knorm", "streaming-llm", "h2o", "snapkv", "tova", "expected-attention", "random"] {
        let method = method_from_name(name).unwrap();
        let co = CompactOptions { budget: Budget::Ratio(3.0), queries: QuerySource::Context, n_queries: 48, n_test: 8, ..Default::default() };
        let (c, _) = compact_context(&m, &tok, &layout, method.as_ref(), &co).unwrap();
        let mut full = m.new_cache();
        // Same chunking as compact_context (prefix, article, suffix), so rows are bit-identical.
        let mut st = m.new_state(kvcompact::model::DEFAULT_MAX_BATCH);
        for part in [&layout.prefix, &layout.article, &layout.suffix] {
            m.forward(&mut st, &mut full, part, Logits::None).unwrap();
        }
        for l in 0..m.config.n_layers {
            for h in 0..m.config.n_kv_heads {
                let meta = c.meta(l, h);
                assert!(meta.bias.as_ref().is_none_or(|b| b.iter().all(|&x| x == 0.0)), "{name}: eviction has β = 0");
                // Every kept row is the original row at its position.
                let (fk, fv, _, fp) = full.head(l, h);
                let (sk, sv, _, _) = c.head(l, h);
                let d = c.head_dim;
                for (r, &p) in meta.positions.iter().enumerate() {
                    let j = fp.iter().position(|&x| x == p).unwrap();
                    assert_eq!(&sk[r * d..(r + 1) * d], &fk[j * d..(j + 1) * d]);
                    assert_eq!(&sv[r * d..(r + 1) * d], &fv[j * d..(j + 1) * d]);
                }
            }
        }
    }
}

#[test]
fn registry_knows_every_method_and_rejects_unknown_names() {
    for name in METHODS.iter().filter(|n| !["full", "qfilters"].contains(n)) {
        assert_eq!(method_from_name(name).unwrap().name(), *name);
    }
    assert!(method_from_name("full").is_err());
    let e = method_from_name("nope").err().unwrap().to_string();
    assert!(e.contains("am-omp") && e.contains("expected-attention"), "{e}");
}

#[test]
fn rope_helpers_undo_the_models_rotation() {
    // At layer 0 the pre-RoPE query of a token does not depend on its position, so rotating the
    // captured post-RoPE queries back must give the same vector at every position. Every tiny
    // model (default, llama3-scaled, theta 1e6) is checked.
    use kvcompact::model::rope::{rope_inv_freq, rope_rotate};
    for name in ["llama-gqa", "llama-mha", "mistral", "qwen2-bias", "qwen3-qknorm"] {
        let m = Model::load(&golden(&format!("tiny/{name}"))).unwrap();
        let c = &m.config;
        let inv = rope_inv_freq(c);
        let mut cache = m.new_cache();
        let mut st = m.new_state(64);
        st.capture = Some(kvcompact::model::Capture::queries());
        m.forward(&mut st, &mut cache, &[42; 150], Logits::None).unwrap();
        let q = &st.capture.as_ref().unwrap().queries[0];
        let (hd, qd) = (c.head_dim, c.q_dim());
        let mut first: Option<Vec<f32>> = None;
        for p in [0usize, 1, 17, 149] {
            let mut v = q[p * qd..p * qd + hd].to_vec();
            rope_rotate(&mut v, p as u32, &inv, true);
            match &first {
                None => first = Some(v),
                Some(f) => {
                    for (a, b) in f.iter().zip(&v) {
                        assert!((a - b).abs() < 1e-4 * (1.0 + a.abs()), "{name} position {p}: {a} vs {b}");
                    }
                }
            }
        }
    }
}
