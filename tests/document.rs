//! Document-level compaction on a tiny golden model: installation into the cache, identity at
//! ratio 1, cache files (round trip, refusal for another model), chunked and on-policy runs, and
//! the head-budget water-fill.

mod common;

use std::collections::HashMap;

use common::golden;
use kvcompact::compact::{compressor_from_name, Budget};
use kvcompact::cache::{load_cache, save_cache};
use kvcompact::document::{
    compact_context, followup_tokens, head_budgets, CompactOptions, ContextLayout, QuerySource,
};
use kvcompact::model::{Logits, Model};
use kvcompact::tokenizer::Tokenizer;

// Short: the tiny models' byte-level tokenizer and 256 positions must fit context + repeat.
const TEXT: &str = "The lighthouse at Kestrel Point was built in 1871 by Ada Brant; its lamp is seen 22 miles away.";

fn setup(name: &str) -> (Model, Tokenizer) {
    let dir = golden(&format!("tiny/{name}"));
    let m = Model::load(&dir).unwrap();
    let t = Tokenizer::load(&dir, &m.config).unwrap();
    (m, t)
}

fn next_logits(m: &Model, cache: &mut kvcompact::cache::KvCache, q: &[u32]) -> Vec<f32> {
    let mut st = m.new_state(64);
    m.forward(&mut st, cache, q, Logits::Last).unwrap();
    st.logits.clone()
}

#[test]
fn ratio_one_is_the_full_cache() {
    let (m, tok) = setup("llama-gqa");
    let layout = ContextLayout::build(&tok, TEXT, true).unwrap();
    assert!(!layout.prefix.is_empty() && !layout.suffix.is_empty());
    let method = compressor_from_name("am-highest").unwrap();
    let opts = CompactOptions { budget: Budget::Ratio(1.0), n_queries: 64, n_test: 16, ..Default::default() };
    let (mut small, report) = compact_context(&m, &tok, &layout, &method, &opts).unwrap();
    let mut full = m.new_cache();
    let mut st = m.new_state(64);
    // Prefill in the same pieces compact_context uses, so the arithmetic is identical.
    for part in [&layout.prefix, &layout.article, &layout.suffix] {
        m.forward(&mut st, &mut full, part, Logits::None).unwrap();
    }
    assert_eq!(small.next_pos(), full.next_pos());
    assert_eq!(small.total_rows(), full.total_rows());
    assert!(report.mean_rel_l2 < 1e-5, "{}", report.mean_rel_l2);
    let q = followup_tokens(&tok, true, "When was it built?").unwrap();
    let r = kvcompact::compare::compare("ratio 1 vs full", &next_logits(&m, &mut small, &q), &next_logits(&m, &mut full, &q), 0.0);
    r.assert_ok();
}

#[test]
fn compaction_installs_ragged_rows_with_beta_and_keeps_positions() {
    let (m, tok) = setup("llama-gqa");
    let layout = ContextLayout::build(&tok, TEXT, true).unwrap();
    let art = layout.article.len();
    for (name, on_policy, chunk) in [("am-highest", false, None), ("am-omp", true, None), ("baseline", false, Some(17))] {
        let method = compressor_from_name(name).unwrap();
        let opts = CompactOptions { budget: Budget::Ratio(4.0), n_queries: 128, n_test: 32, on_policy, chunk_tokens: chunk, ..Default::default() };
        let (mut c, report) = compact_context(&m, &tok, &layout, &method, &opts).unwrap();
        c.check().unwrap();
        assert_eq!(c.next_pos(), layout.len(), "{name}: logical length must stay the context length");
        let keep = match chunk {
            None => art / 4,
            Some(k) => layout.article.chunks(k).map(|p| (p.len() / 4).max(1)).sum(),
        };
        for l in 0..m.config.n_layers {
            for h in 0..m.config.n_kv_heads {
                let meta = c.meta(l, h);
                let n = layout.prefix.len() + layout.suffix.len() + keep;
                assert!(meta.len() <= n && meta.len() + 2 >= n.min(meta.len() + 2), "{name} L{l}H{h}: {} rows, expected ≈{n}", meta.len());
                // Template rows are kept verbatim at their positions with β = 0.
                assert_eq!(&meta.positions[..layout.prefix.len()], &(0..layout.prefix.len() as u32).collect::<Vec<_>>()[..]);
                let b = meta.bias.as_ref().unwrap();
                assert!(b[..layout.prefix.len()].iter().all(|&x| x == 0.0));
                assert_eq!(*meta.positions.last().unwrap() as usize, layout.len() - 1, "suffix rows keep their positions");
                if name == "baseline" {
                    assert!(b.iter().all(|&x| x == 0.0));
                }
            }
        }
        assert!(report.kv_bytes_after < report.kv_bytes_before / 2, "{name}: bytes {} → {}", report.kv_bytes_before, report.kv_bytes_after);
        let q = followup_tokens(&tok, true, "Who was the last keeper?").unwrap();
        assert!(next_logits(&m, &mut c, &q).iter().all(|x| x.is_finite()));
        assert_eq!(c.next_pos(), layout.len() + q.len(), "new tokens continue at the logical length");
    }
}

#[test]
fn other_query_sources_run() {
    let (m, tok) = setup("qwen2-bias");
    let layout = ContextLayout::build(&tok, TEXT, true).unwrap();
    let method = compressor_from_name("am-highest").unwrap();
    for src in [QuerySource::Context, QuerySource::Random, QuerySource::Mix, QuerySource::SelfStudy] {
        let opts = CompactOptions { budget: Budget::Ratio(3.0), queries: src, n_queries: 96, n_test: 24, ..Default::default() };
        let (c, r) = compact_context(&m, &tok, &layout, &method, &opts).unwrap_or_else(|e| panic!("{src:?}: {e}"));
        c.check().unwrap();
        assert!(r.n_queries_per_kv_head > 0, "{src:?}");
        assert!(r.mean_rel_l2.is_finite(), "{src:?}");
    }
}

/// The tiny GQA model and TEXT compacted 5× in chat mode (what the cache-file tests save).
fn compacted_gqa() -> (Model, kvcompact::cache::KvCache) {
    let (m, tok) = setup("llama-gqa");
    let layout = ContextLayout::build(&tok, TEXT, true).unwrap();
    let method = compressor_from_name("am-highest").unwrap();
    let opts = CompactOptions { budget: Budget::Ratio(5.0), n_queries: 64, n_test: 16, ..Default::default() };
    let (c, _) = compact_context(&m, &tok, &layout, &method, &opts).unwrap();
    (m, c)
}

#[test]
fn cache_file_round_trip_and_refusal() {
    let (m, c) = compacted_gqa();
    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("c.safetensors");
    save_cache(&f, &m.cache_id(), &c, true, &serde_json::json!({"method": "am-highest"})).unwrap();
    let back = load_cache(&f, &m.cache_id()).unwrap();
    assert!(back.chat);
    assert_eq!(back.params["method"], "am-highest");
    assert_eq!(back.cache.next_pos(), c.next_pos());
    for l in 0..m.config.n_layers {
        for h in 0..m.config.n_kv_heads {
            assert_eq!(back.cache.meta(l, h).positions, c.meta(l, h).positions);
            assert_eq!(back.cache.meta(l, h).bias, c.meta(l, h).bias);
            assert_eq!(back.cache.store(l, h).keys, c.store(l, h).keys);
            assert_eq!(back.cache.store(l, h).values, c.store(l, h).values);
        }
    }
    let (other, _) = setup("llama-mha");
    let e = load_cache(&f, &other.cache_id()).err().expect("a cache for another model must be refused").to_string();
    assert!(e.contains("different model"), "{e}");
}

/// Same cache, same parameters → same bytes: the metadata map's order must not leak into the
/// file (it did while the header was written in `HashMap` order).
#[test]
fn cache_file_bytes_are_deterministic() {
    let (m, c) = compacted_gqa();
    let t = tempfile::tempdir().unwrap();
    let params = serde_json::json!({"method": "am-highest", "ratio": 5.0});
    let files: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            let f = t.path().join(format!("c{i}.safetensors"));
            save_cache(&f, &m.cache_id(), &c, true, &params).unwrap();
            std::fs::read(&f).unwrap()
        })
        .collect();
    for (i, b) in files.iter().enumerate().skip(1) {
        assert!(*b == files[0], "save {i} wrote different bytes than save 0");
    }
    load_cache(&t.path().join("c3.safetensors"), &m.cache_id()).unwrap();
}

#[test]
fn budgets_water_fill() {
    // Uniform without proportions.
    assert_eq!(head_budgets(2, 2, 100, 10.0, None, 1.0).unwrap(), vec![10; 4]);
    // Proportions: total ≈ 40 rows; a head asking for everything is capped at the article.
    let mut p = HashMap::new();
    p.insert("L0H0".to_string(), 0.7);
    p.insert("L0H1".to_string(), 0.1);
    p.insert("L1H0".to_string(), 0.1);
    p.insert("L1H1".to_string(), 0.1);
    let b = head_budgets(2, 2, 100, 10.0, Some(&p), 0.25).unwrap();
    assert!(b[0] <= 25, "{b:?}");
    assert!(b.iter().sum::<usize>() <= 40 && b.iter().sum::<usize>() >= 37, "{b:?}");
    assert!(b[1] == b[2] && b[2] == b[3] && b[1] > 4, "excess handed to the uncapped heads: {b:?}");
    p.insert("L7H0".to_string(), 0.1);
    assert!(head_budgets(2, 2, 100, 10.0, Some(&p), 1.0).is_err());
    assert!(head_budgets(2, 2, 100, 0.5, None, 1.0).is_err());
}

#[test]
fn online_compaction_bounds_the_cache_during_generation() {
    let (m, tok) = setup("llama-gqa");
    let method = compressor_from_name("am-highest").unwrap();
    let opts = CompactOptions { budget: Budget::Ratio(4.0), n_queries: 64, n_test: 16, ..Default::default() };
    let mut policy = kvcompact::document::OnlineCompaction::new(&tok, &method, 40, 8, false, opts).unwrap();
    let prompt = tok.encode("The lighthouse", true).unwrap();
    let mut st = m.new_state(32);
    let mut cache = m.new_cache();
    let mut sampler = kvcompact::sampling::Sampler::new(0.0, 1.0, 0);
    let gopts = kvcompact::generate::GenOptions { max_tokens: 60, stop_at_eos: false };
    let out = kvcompact::generate::generate_with_policy(&m, &mut st, &mut cache, &prompt, &[], &mut sampler, &gopts, Some(&mut policy), |_| Ok(())).unwrap();
    assert_eq!(out.tokens.len(), 60);
    assert!(policy.reports.len() >= 2, "expected repeated compactions, got {}", policy.reports.len());
    // Physical rows stay bounded while the logical length keeps growing.
    assert!(cache.max_len() < 40, "{}", cache.max_len());
    assert_eq!(cache.next_pos(), prompt.len() + 59);
    cache.check().unwrap();
    // Re-compacted rows carry their earlier β into the new one: some bias is non-zero.
    assert!(cache.meta(0, 0).bias.as_ref().unwrap().iter().any(|&b| b != 0.0));
    assert!(kvcompact::document::OnlineCompaction::new(&tok, &method, 10, 9, false, CompactOptions::default()).is_err());
}

/// The influence sweep measures a curve per head on a real context (zero at the base fraction,
/// finite elsewhere), and the solver's proportions drive a real compaction.
#[test]
fn influence_curves_and_swap_solver_make_budgets() {
    use kvcompact::document::influence::{influence_curves, proportions_map, swap_solve, Calibration, InfluenceOptions, SwapOptions};
    let (m, tok) = setup("llama-mha");
    let layout = ContextLayout::build(&tok, TEXT, true).unwrap();
    let method = compressor_from_name("am-highest").unwrap();
    let q = kvcompact::document::followup_tokens(&tok, true, "What is it?").unwrap();
    let items = vec![Calibration { layout: layout.clone(), questions: vec![(q, 4)] }];
    let compact = CompactOptions { n_queries: 64, n_test: 16, ..Default::default() };
    let opts = InfluenceOptions { fractions: vec![0.0, 0.2, 0.5, 1.0], base: 0.2, compact: compact.clone() };
    let mut calls = 0;
    let curves = influence_curves(&m, &tok, &items, &method, &opts, || calls += 1).unwrap();
    let heads = m.config.n_layers * m.config.n_kv_heads;
    assert_eq!((curves.delta.len(), calls, curves.contexts, curves.questions), (heads, heads, 1, 1));
    assert!(curves.delta.iter().all(|d| d.len() == 4 && d[1] == 0.0 && d.iter().all(|x| x.is_finite())));
    // Dropping or keeping a whole head moves the answer somewhere.
    assert!(curves.delta.iter().any(|d| d[0] != 0.0 && d[3] != 0.0), "{:?}", curves.delta);
    assert!(curves.base_nll.is_finite() && curves.full_nll.is_finite());
    let s = swap_solve(&curves, &SwapOptions { targets: vec![0.2], step: 0.01, ..Default::default() }).unwrap();
    assert!((s.proportions.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    assert!(s.loss <= s.uniform_loss);
    let with = CompactOptions { budget: Budget::Ratio(5.0), budgets: Some(proportions_map(&s.proportions, m.config.n_kv_heads)), ..compact };
    let (c, _) = compact_context(&m, &tok, &layout, &method, &with).unwrap();
    c.check().unwrap();
    // On-policy compaction is refused: a head's rows would depend on the other heads' budgets.
    let bad = InfluenceOptions { compact: CompactOptions { on_policy: true, ..CompactOptions::default() }, ..opts };
    assert!(influence_curves(&m, &tok, &items, &method, &bad, || {}).is_err());
}

/// `compact` runs every registry name: an eviction method keeps rows of the article span (their
/// keys, values and positions unchanged, no β) at the budget, and the cache stays consistent.
#[test]
fn compact_context_with_eviction_methods() {
    let (m, tok) = setup("llama-gqa");
    let layout = ContextLayout::build(&tok, TEXT, true).unwrap();
    let opts = CompactOptions { budget: Budget::Ratio(4.0), n_queries: 64, n_test: 16, ..Default::default() };
    let art = layout.article.len();
    for name in ["snapkv", "knorm", "streaming-llm", "tova", "random"] {
        let method = kvcompact::compact::method_from_name(name).unwrap();
        let (c, r) = compact_context(&m, &tok, &layout, method.as_ref(), &opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        c.check().unwrap();
        assert_eq!(r.method, name);
        let keep = art / 4;
        for l in 0..m.config.n_layers {
            for h in 0..m.config.n_kv_heads {
                let meta = c.meta(l, h);
                assert_eq!(meta.len(), layout.prefix.len() + keep + layout.suffix.len(), "{name} L{l}H{h}");
                assert!(meta.bias.as_ref().is_none_or(|b| b.iter().all(|&x| x == 0.0)), "{name}: eviction adds no β");
            }
        }
    }
}

/// `dump_heads` writes each head's exact problem: `compact-head` on a dumped file, with the
/// budget and seed recorded in its metadata, gives the same keys, β and values bits as the
/// compacted cache holds for that head's article rows.
#[test]
fn dumped_heads_rerun_to_the_same_bits() {
    use kvcompact::compact::oracle::{compact_head_file, OracleOptions};
    use kvcompact::tensor_file::{load_safetensors, TensorData};
    let (m, tok) = setup("llama-gqa");
    let layout = ContextLayout::build(&tok, TEXT, true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dump = dir.path().join("heads");
    std::fs::create_dir_all(&dump).unwrap();
    let method = compressor_from_name("am-highest").unwrap();
    let opts = CompactOptions { budget: Budget::Ratio(4.0), n_queries: 128, n_test: 32, seed: 7, dump_heads: Some(dump.clone()), ..Default::default() };
    let (c, _) = compact_context(&m, &tok, &layout, &method, &opts).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    let f32s = |map: &HashMap<String, (Vec<usize>, TensorData)>, name: &str| match &map[name].1 {
        TensorData::F32(v) => v.clone(),
        _ => panic!("{name} is not f32"),
    };
    let d = m.config.head_dim;
    let mut checked = 0;
    for l in 0..m.config.n_layers {
        for h in 0..m.config.n_kv_heads {
            let file = dump.join(format!("L{l:02}H{h}.safetensors"));
            // The safetensors header: 8-byte length, then JSON with __metadata__.
            let raw = std::fs::read(&file).unwrap();
            let n = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
            let header: serde_json::Value = serde_json::from_slice(&raw[8..8 + n]).unwrap();
            let meta = &header["__metadata__"];
            let budget: usize = meta["budget"].as_str().unwrap().parse().unwrap();
            let seed: u64 = meta["seed"].as_str().unwrap().parse().unwrap();
            let out = dir.path().join("out.safetensors");
            let o = OracleOptions { method: "am-highest".into(), budget: Budget::Rows(budget), seed, ..Default::default() };
            compact_head_file(&file, &out, &o).unwrap();
            let got = load_safetensors(&out).unwrap();
            let (keys, values, bias, _) = c.head(l, h);
            let rows = layout.prefix.len()..layout.prefix.len() + budget;
            assert_eq!(bits(&f32s(&got, "keys")), bits(&keys[rows.start * d..rows.end * d]), "L{l}H{h} keys");
            assert_eq!(bits(&f32s(&got, "values")), bits(&values[rows.start * d..rows.end * d]), "L{l}H{h} values");
            assert_eq!(bits(&f32s(&got, "beta")), bits(&bias.unwrap()[rows]), "L{l}H{h} beta");
            checked += 1;
        }
    }
    assert_eq!(checked, m.config.n_layers * m.config.n_kv_heads);
}
