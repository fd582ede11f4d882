//! `kvcompact demo`: the JSON report on a tiny model, its errors, and the shipped document's
//! questions answered by the default model with the full cache (the demo's premise).

mod common;


use common::{default_model, golden, kvc, repo};
use kvcompact::document::{answer, followup_tokens, ContextLayout};
use kvcompact::eval::metrics::string_match;
use kvcompact::model::{Logits, DEFAULT_MAX_BATCH};


#[test]
fn demo_reports_every_cache_at_one_budget() {
    let t = tempfile::tempdir().unwrap();
    let ctx = t.path().join("doc.txt");
    std::fs::write(&ctx, "The grass is green. The code for the gate is 4821. The sky is blue. The boat is called the Marigold. Here we go again. The hills are quiet.").unwrap();
    let qs = t.path().join("q.json");
    std::fs::write(&qs, r#"[{"question": "What is the code for the gate?", "answer_prefix": "The code is", "answers": ["4821"]}, "What colour is the sky?"]"#).unwrap();
    let model = golden("tiny/llama-gqa");
    let args = ["demo", "--model", model.to_str().unwrap(), "--context", ctx.to_str().unwrap(), "--questions", qs.to_str().unwrap(), "--ratio", "4", "--n-queries", "64", "--max-tokens", "4", "--baselines", "snapkv,kvzip,streaming-llm", "--json"];
    let (code, out, err) = kvc(&args);
    assert_eq!(code, 0, "{err}");
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["marked_questions"], 1, "a plain-string question is answered, not marked");
    let ev = r["evictions"].as_array().unwrap();
    assert_eq!(ev.len(), 3);
    let am_bytes = r["am"]["kv_bytes"].as_f64().unwrap();
    let full_bytes = r["full"]["kv_bytes"].as_f64().unwrap();
    assert!(am_bytes < full_bytes / 2.0, "{r}");
    for e in ev {
        // Same budget: as many rows as AM keeps, so the bytes agree up to AM's β (4 bytes a row).
        let b = e["kv_bytes"].as_f64().unwrap();
        assert!((b - am_bytes).abs() <= 0.1 * am_bytes, "{} holds {b} bytes, AM {am_bytes}", e["method"]);
        assert_eq!(e["answers"].as_array().unwrap().len(), 2);
        assert!(["correct", "wrong"].contains(&e["answers"][0]["mark"].as_str().unwrap()));
        assert_eq!(e["answers"][1]["mark"], "unmarked");
    }
    assert!(ev.iter().any(|e| e["method"] == r["best_eviction"]));
    // Deterministic: the same report again, timings aside.
    let (_, out2, _) = kvc(&args);
    let strip = |mut v: serde_json::Value| {
        v["seconds"] = 0.into();
        v["full"]["prefill_s"] = 0.into();
        v["am"]["compaction_s"] = 0.into();
        for e in v["evictions"].as_array_mut().unwrap() {
            e["compaction_s"] = 0.into();
        }
        v
    };
    assert_eq!(strip(r), strip(serde_json::from_str(out2.trim()).unwrap()));
}

#[test]
fn demo_refuses_bad_input_in_one_line() {
    let t = tempfile::tempdir().unwrap();
    let model = golden("tiny/llama-gqa");
    let bad = t.path().join("bad.json");
    std::fs::write(&bad, "{\"question\": 1}").unwrap();
    let ctx = t.path().join("doc.txt");
    std::fs::write(&ctx, "The grass is green.").unwrap();
    for (extra, needle) in [
        (vec!["--questions", bad.to_str().unwrap()], "expected a JSON list"),
        (vec!["--baselines", "am-omp"], "Attention Matching"),
        (vec!["--method", "snapkv"], "eviction method"),
    ] {
        let mut args = vec!["demo", "--model", model.to_str().unwrap(), "--context", ctx.to_str().unwrap()];
        args.extend(extra);
        let (code, _, err) = kvc(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{err}");
        assert!(lines[0].contains(needle), "{args:?}: {err}");
    }
}

/// The demo's premise: the default model answers every shipped question with the full cache.
#[test]
fn shipped_demo_questions_are_answered_by_the_full_cache() {
    let dir = default_model();
    let (model, tok) = kvcompact::generate::load(&dir).unwrap();
    let text = std::fs::read_to_string(repo().join("data/demo/directory.txt")).unwrap();
    let qs: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(repo().join("data/demo/directory-questions.json")).unwrap()).unwrap();
    let layout = ContextLayout::build(&tok, &text, true).unwrap();
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let mut cache = model.new_cache();
    model.forward(&mut st, &mut cache, &layout.tokens(), Logits::None).unwrap();
    for q in &qs {
        let mut ids = followup_tokens(&tok, true, q["question"].as_str().unwrap()).unwrap();
        ids.extend(tok.encode(q["answer_prefix"].as_str().unwrap(), false).unwrap());
        let a = answer(&model, &mut st, &mut cache, &ids, &tok.eos_ids, 12).unwrap();
        let text = tok.decode(&a, true).unwrap();
        let want: Vec<String> = q["answers"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
        assert_eq!(string_match(&text, &want, false), 1.0, "{}: {text:?}", q["question"]);
    }
}

/// `global_budgets`: the same total rows as the uniform split, spread unevenly over the heads.
#[test]
fn global_budgets_keep_the_total_and_move_rows_between_heads() {
    use kvcompact::compact::Budget;
    use kvcompact::document::{compact_context, CompactOptions, QuerySource};
    let dir = golden("tiny/llama-gqa");
    let (model, tok) = kvcompact::generate::load(&dir).unwrap();
    let text = "The grass is green. The code for the gate is 4821. The sky is blue. The boat is called the Marigold. Here we go again. The hills are quiet. The river runs to the sea.";
    let layout = ContextLayout::build(&tok, text, false).unwrap();
    let am = kvcompact::compact::registry::require_am("am-highest", "test").unwrap();
    let rows = |global: bool| {
        let opts = CompactOptions { budget: Budget::Ratio(4.0), queries: QuerySource::Repeat, n_queries: 256, n_test: 16, global_budgets: global, ..Default::default() };
        let (cache, _) = compact_context(&model, &tok, &layout, &am, &opts).unwrap();
        let c = &model.config;
        (0..c.n_layers * c.n_kv_heads).map(|i| cache.len(i / c.n_kv_heads, i % c.n_kv_heads)).collect::<Vec<usize>>()
    };
    let (uniform, global) = (rows(false), rows(true));
    assert_eq!(uniform.iter().sum::<usize>(), global.iter().sum::<usize>(), "{uniform:?} vs {global:?}");
    assert!(uniform.windows(2).all(|w| w[0] == w[1]));
    assert_ne!(uniform, global, "global scores should move rows between heads");
}
