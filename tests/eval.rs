//! `kvcompact eval` on a tiny model: every file and plot is written, every method × ratio ×
//! task × metric row is present, runs are deterministic given the seed, and the task generators
//! put their answers where they say. The quick ordering checks on the default model are
//! ignored unless asked for (`cargo test --release --test eval -- --ignored`).

mod common;

use std::path::{Path, PathBuf};

use common::golden;
use kvcompact::eval::metrics::{ResultRow, METRICS};
use kvcompact::eval::tasks::{self, TaskConfig};
use kvcompact::eval::{run, EvalOptions};
use kvcompact::model::Model;
use kvcompact::tokenizer::Tokenizer;

fn args(out: &Path, model: PathBuf) -> EvalOptions {
    EvalOptions {
        model: Some(model),
        methods: vec![],
        ratios: vec![2.0, 4.0],
        compression_ratios: vec![],
        row_budgets: vec![],
        kvpress: false,
        tasks: vec![],
        samples: Some(1),
        seed: 3,
        out: out.to_path_buf(),
        quick: false,
        lengths: vec![90],
        depths: vec![],
        keys: 2,
        keys_asked: 1,
        qa_questions: 2,
        qa_docs: None,
        filters: None,
        n_queries: 64,
        am_queries: "ss-plus-repeat".into(),
        self_study_tokens: 8,
        n_test: 4,
        budgets: None,
        am_budgets: "global".into(),
        raw: false,
        check: false,
        no_progress: true,
        shard: None,
    }
}

/// A tiny QA file (the tiny models hold 256 positions).
fn tiny_qa(dir: &Path) -> PathBuf {
    let p = dir.join("qa.json");
    std::fs::write(
        &p,
        r#"[{"title": "boat", "document": "The boat Wren was built in 1902 by Ada Lark. It is painted green.",
             "questions": [{"question": "Who built the Wren?", "answer_prefix": "The Wren was built by", "answers": ["Ada Lark"], "max_new_tokens": 4},
                           {"question": "What colour is it?", "answer_prefix": "It is", "answers": ["green"], "max_new_tokens": 4}]}]"#,
    )
    .unwrap();
    p
}

fn rows(dir: &Path) -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap()).unwrap()
}

#[test]
fn eval_writes_every_method_task_metric_and_plot_deterministically() {
    let t = tempfile::tempdir().unwrap();
    let model = golden("tiny/llama-gqa");
    let out1 = t.path().join("a");
    let mut a = args(&out1, model.clone());
    a.qa_docs = Some(tiny_qa(t.path()));
    // niah-multikey's needles do not fit the tiny models' 256 positions (its generator is tested below).
    let task_list = ["passkey", "variable-tracking", "qa"];
    a.tasks = task_list.iter().map(|s| s.to_string()).collect();
    a.methods = kvcompact::compact::METHODS.iter().map(|s| s.to_string()).collect();
    run(&model, &a).unwrap();
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out1.join("run.json")).unwrap()).unwrap();
    assert_eq!(info["skipped"].as_array().unwrap().len(), 0, "{info}");
    for f in ["results.json", "results.csv", "summary.md", "tasks.jsonl", "run.json", "records.jsonl", "qfilters.safetensors"] {
        assert!(out1.join(f).exists(), "{f} missing");
    }
    for m in METRICS {
        for ext in ["svg", "png"] {
            let p = out1.join("plots").join(format!("{m}.{ext}"));
            let bytes = std::fs::read(&p).unwrap_or_else(|_| panic!("{} missing", p.display()));
            assert!(bytes.len() > 200, "{} is empty", p.display());
        }
    }
    assert!(!golden("tiny/llama-gqa/qfilters.safetensors").exists(), "eval must not write into the model directory");
    let r = rows(&out1);
    for method in kvcompact::compact::METHODS {
        for ratio in [2.0, 4.0] {
            for task in task_list {
                for metric in METRICS {
                    let row = r.iter().find(|x| x["method"] == *method && x["ratio"] == ratio && x["task"] == *task && x["metric"] == *metric);
                    let row = row.unwrap_or_else(|| panic!("no row for {method} {ratio} {task} {metric}"));
                    assert!(row["n"].as_u64().unwrap() >= 1);
                    assert!(row["value"].as_f64().unwrap().is_finite());
                }
            }
        }
    }
    // Sanity of the measures: the full cache has KL 0 and the most bytes; compression frees bytes.
    let get = |m: &str, ratio: f64, task: &str, metric: &str| {
        r.iter().find(|x| x["method"] == m && x["ratio"] == ratio && x["task"] == task && x["metric"] == metric).unwrap()["value"].as_f64().unwrap()
    };
    assert_eq!(get("full", 2.0, "passkey", "kl"), 0.0);
    for m in ["knorm", "am-omp", "snapkv", "pyramidkv"] {
        assert!(get(m, 4.0, "passkey", "kv_bytes") < get(m, 2.0, "passkey", "kv_bytes"));
        assert!(get(m, 2.0, "passkey", "kv_bytes") < get("full", 2.0, "passkey", "kv_bytes"));
        assert!(get(m, 2.0, "passkey", "kl") >= 0.0);
    }
    // CSV has the same rows.
    let csv = std::fs::read_to_string(out1.join("results.csv")).unwrap();
    assert_eq!(csv.lines().next().unwrap(), "method,ratio,task,metric,value,n,ci_low,ci_high");
    assert_eq!(csv.lines().count(), r.len() + 1);

    // Same seed → same results (timings aside).
    let out2 = t.path().join("b");
    let mut b = a.clone();
    b.out = out2.clone();
    run(&model, &b).unwrap();
    let strip = |v: Vec<serde_json::Value>| v.into_iter().filter(|x| x["metric"] != "compress_s").collect::<Vec<_>>();
    assert_eq!(strip(rows(&out1)), strip(rows(&out2)));
    assert_eq!(std::fs::read_to_string(out1.join("tasks.jsonl")).unwrap(), std::fs::read_to_string(out2.join("tasks.jsonl")).unwrap());
}

#[test]
fn quick_mode_runs_on_a_tiny_model() {
    let t = tempfile::tempdir().unwrap();
    let model = golden("tiny/qwen2-bias");
    let mut a = args(t.path(), model.clone());
    a.quick = true;
    a.ratios = vec![];
    a.samples = Some(2);
    a.lengths = vec![100];
    run(&model, &a).unwrap();
    let r: Vec<ResultRow> = serde_json::from_str::<Vec<serde_json::Value>>(&std::fs::read_to_string(t.path().join("results.json")).unwrap())
        .unwrap()
        .into_iter()
        .map(|x| ResultRow {
            method: x["method"].as_str().unwrap().into(),
            ratio: x["ratio"].as_f64().unwrap(),
            task: x["task"].as_str().unwrap().into(),
            metric: x["metric"].as_str().unwrap().into(),
            value: x["value"].as_f64().unwrap(),
            n: x["n"].as_u64().unwrap() as usize,
            // null (no interval from one context) reads as NaN.
            ci_low: x["ci_low"].as_f64().unwrap_or(f64::NAN),
            ci_high: x["ci_high"].as_f64().unwrap_or(f64::NAN),
        })
        .collect();
    let ratios: std::collections::BTreeSet<u64> = r.iter().map(|x| x.ratio as u64).collect();
    assert_eq!(ratios.into_iter().collect::<Vec<_>>(), vec![10, 20]);
    assert!(r.iter().all(|x| x.task == "passkey" || x.task == "mean"));
    // Two contexts: every passkey accuracy cell has an interval around its value.
    for x in r.iter().filter(|x| x.metric == "accuracy") {
        assert!(x.ci_low <= x.value && x.value <= x.ci_high, "{x:?}");
    }
    let summary = std::fs::read_to_string(t.path().join("summary.md")).unwrap();
    assert!(summary.contains("ordering checks"), "{summary}");
}

#[test]
fn bad_arguments_are_named() {
    let t = tempfile::tempdir().unwrap();
    let model = golden("tiny/llama-gqa");
    let mut a = args(t.path(), model.clone());
    a.methods = vec!["knorm".into(), "nope".into()];
    assert!(run(&model, &a).unwrap_err().to_string().contains("nope"));
    let mut a = args(t.path(), model.clone());
    a.tasks = vec!["sudoku".into()];
    assert!(run(&model, &a).unwrap_err().to_string().contains("sudoku"));
    let mut a = args(t.path(), model.clone());
    a.ratios = vec![0.5];
    assert!(run(&model, &a).unwrap_err().to_string().contains("0.5"));
}

#[test]
fn eval_takes_kvpress_and_every_budget_form() {
    let t = tempfile::tempdir().unwrap();
    let model = golden("tiny/llama-gqa");
    let methods = ["snapkv", "observed-attention", "kvzip", "h2o", "full"];
    let base = |out: &Path| {
        let mut a = args(out, model.clone());
        a.methods = methods.iter().map(|s| s.to_string()).collect();
        a.tasks = vec!["passkey".into()];
        a.ratios = vec![];
        a
    };
    // kvpress's form, with kvpress's presses.
    let out = t.path().join("cr");
    let mut a = base(&out);
    a.compression_ratios = vec![0.5, 0.75];
    a.kvpress = true;
    run(&model, &a).unwrap();
    let r = rows(&out);
    let get = |r: &[serde_json::Value], m: &str, point: f64, metric: &str| {
        r.iter().find(|x| x["method"] == m && x["ratio"] == point && x["metric"] == metric).unwrap_or_else(|| panic!("no row {m} {point} {metric}"))["value"].as_f64().unwrap()
    };
    for m in methods {
        for metric in METRICS {
            for p in [0.5, 0.75] {
                assert!(get(&r, m, p, metric).is_finite(), "{m} {p} {metric}");
            }
        }
        if m != "full" {
            assert!(get(&r, m, 0.75, "kv_bytes") < get(&r, m, 0.5, "kv_bytes"), "{m}");
            assert!(get(&r, m, 0.5, "kv_bytes") < get(&r, "full", 0.5, "kv_bytes"), "{m}");
        }
    }
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!((info["budget_form"].as_str(), info["kvpress"].as_bool()), (Some("compression_ratio"), Some(true)));
    assert!(info["command"].as_str().unwrap().contains("--compression-ratios 0.5,0.75 --kvpress"), "{}", info["command"]);
    let summary = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(summary.contains("| r=0.5 |") && summary.contains("| r=0.75 |"), "{summary}");
    // Every method at the same kvpress budget holds the same bytes (KVzip spreads the same
    // total over its heads; h2o keeps its own budget split but the same count).
    let full = get(&r, "full", 0.5, "kv_bytes");
    for m in ["snapkv", "observed-attention", "kvzip", "h2o"] {
        // KVzip's int(L·n_kv·T·r) may round to one row more or less than L·n_kv·int(T·(1 − r)).
        let (x, y) = (get(&r, m, 0.5, "kv_bytes"), get(&r, "snapkv", 0.5, "kv_bytes"));
        assert!((x - y).abs() <= 1e-3 * y, "{m}: {x} vs snapkv {y}");
        assert!(get(&r, m, 0.5, "kv_bytes") < full);
    }

    // Rows per KV head.
    let out = t.path().join("rows");
    let mut a = base(&out);
    a.row_budgets = vec![8, 16];
    run(&model, &a).unwrap();
    let r = rows(&out);
    assert!(get(&r, "kvzip", 8.0, "kv_bytes") < get(&r, "kvzip", 16.0, "kv_bytes"));
    assert!(std::fs::read_to_string(out.join("summary.md")).unwrap().contains("| 8 rows |"));

    // One form at a time; per-head proportions need ratios.
    let mut a = base(&t.path().join("bad"));
    a.row_budgets = vec![8];
    a.compression_ratios = vec![0.5];
    assert!(run(&model, &a).unwrap_err().to_string().contains("one budget form"));
    let mut a = base(&t.path().join("bad"));
    a.compression_ratios = vec![1.5];
    assert!(run(&model, &a).unwrap_err().to_string().contains("[0, 1)"));
}

fn cfg() -> TaskConfig {
    TaskConfig { lengths: vec![300, 600], depths: vec![0.0, 0.5, 1.0], keys: 4, keys_asked: 2, qa_questions: 3, qa_docs: tasks::shipped_qa().unwrap() }
}

#[test]
fn task_generators_hide_their_answers_at_the_right_places() {
    let dir = common::repo().join("golden/tiny/llama-gqa");
    let m = Model::load(&dir).unwrap();
    let tok = Tokenizer::load(&dir, &m.config).unwrap();
    let c = cfg();
    let pk = tasks::generate("passkey", 3, 1, &c, &tok).unwrap();
    assert_eq!(pk.len(), 3);
    for (i, s) in pk.iter().enumerate() {
        let key = &s.questions[0].answers[0];
        assert_eq!(key.len(), 5);
        assert_eq!(s.context.matches(key.as_str()).count(), 2, "the needle states the key twice");
        let n = tok.encode(&s.context, false).unwrap().len();
        assert!(n <= c.lengths[i % 2] && n + 40 >= c.lengths[i % 2], "length {n} vs target {}", c.lengths[i % 2]);
        // Depth 0 puts the needle first, depth 1 last.
        let h = s.context.find('\n').unwrap();
        let at = (s.context.find("The pass key is").unwrap() - h) as f64 / (s.context.len() - h) as f64;
        let want = c.depths[i % 3];
        assert!((at - want).abs() < 0.2, "depth {at} vs {want}");
    }
    // Different seeds give different keys; the same seed the same samples.
    let pk2 = tasks::generate("passkey", 3, 2, &c, &tok).unwrap();
    assert_ne!(pk[0].questions[0].answers, pk2[0].questions[0].answers);
    assert_eq!(tasks::to_jsonl(&pk), tasks::to_jsonl(&tasks::generate("passkey", 3, 1, &c, &tok).unwrap()));

    for s in tasks::generate("niah-multikey", 2, 1, &c, &tok).unwrap() {
        assert_eq!(s.questions.len(), 2);
        assert_eq!(s.context.matches("One of the special magic numbers for").count(), 4);
        for q in &s.questions {
            let key = q.question.split("for ").nth(1).unwrap().split(' ').next().unwrap();
            assert!(s.context.contains(&format!("special magic numbers for {key} is: {}.", q.answers[0])), "{key}");
        }
    }
    for s in tasks::generate("variable-tracking", 2, 1, &c, &tok).unwrap() {
        let q = &s.questions[0];
        let var = q.answer_prefix.split(' ').nth(1).unwrap();
        // VAR B = VAR A. and VAR A = value. are both in the text, A before B.
        let b_line = s.context.find(&format!("VAR {var} = VAR ")).unwrap();
        let a = &s.context[b_line + 4 + var.len() + 7..b_line + 4 + var.len() + 12];
        let a_line = s.context.find(&format!("VAR {a} = {}.", q.answers[0])).unwrap();
        assert!(a_line < b_line);
    }
    for s in tasks::generate("niah-multivalue", 2, 1, &c, &tok).unwrap() {
        let q = &s.questions[0];
        assert!(q.match_all && q.answers.len() == 4);
        let key = q.answer_prefix.split("for ").nth(1).unwrap().split(' ').next().unwrap();
        for v in &q.answers {
            assert_eq!(s.context.matches(&format!("special magic numbers for {key} is: {v}.")).count(), 1, "{v}");
        }
    }
    for s in tasks::generate("niah-multiquery", 2, 1, &c, &tok).unwrap() {
        let q = &s.questions[0];
        assert!(q.match_all && q.answers.len() == 2 && q.answers[0] != q.answers[1]);
        assert_eq!(s.context.matches("One of the special magic numbers for").count(), 4);
        let keys: Vec<&str> = q.answer_prefix.trim_start_matches("The special magic numbers for ").trim_end_matches(" are").split(" and ").collect();
        for (k, v) in keys.iter().zip(&q.answers) {
            assert!(s.context.contains(&format!("special magic numbers for {k} is: {v}.")), "{k} {v}");
        }
    }
    for s in tasks::generate("cwe", 2, 1, &c, &tok).unwrap() {
        let q = &s.questions[0];
        assert!(q.match_all && q.answers.len() == 3);
        let words: Vec<&str> = s.context.lines().skip(1).filter_map(|l| l.split(". ").nth(1)).collect();
        let count = |w: &str| words.iter().filter(|x| **x == w).count();
        let least_common = q.answers.iter().map(|a| count(a)).min().unwrap();
        assert!(least_common >= 2, "{:?}", q.answers);
        assert!(words.iter().filter(|w| !q.answers.iter().any(|a| a == *w)).all(|w| count(w) < least_common));
        assert!(tok.encode(&s.context, false).unwrap().len() <= 600);
    }
    for s in tasks::generate("fwe", 2, 1, &c, &tok).unwrap() {
        let q = &s.questions[0];
        assert!(q.match_all && q.answers.len() == 3);
        let words: Vec<&str> = s.context.lines().nth(1).unwrap().split(' ').collect();
        let count = |w: &str| words.iter().filter(|x| **x == w).count();
        let third = q.answers.iter().map(|a| count(a)).min().unwrap();
        assert!(third >= 2);
        // No word outside the answer is more frequent than the answer's least frequent.
        assert!(words.iter().filter(|w| !q.answers.iter().any(|a| a == *w)).all(|w| count(w) <= third));
    }
    let qa = tasks::generate("qa", 10, 1, &c, &tok).unwrap();
    assert_eq!(qa.len(), c.qa_docs.len(), "one sample per document");
    assert!(qa.iter().all(|s| s.questions.len() == 3));
}

#[test]
fn shipped_qa_answers_appear_in_their_documents() {
    for d in tasks::shipped_qa().unwrap() {
        assert!(d.questions.len() >= 8, "{}", d.title);
        let text = d.document.to_lowercase();
        for q in &d.questions {
            assert!(!q.answer_prefix.is_empty() && !q.answers.is_empty());
            // At least one reference (or, for paraphrases, its key words) is in the text.
            let found = q.answers.iter().any(|a| {
                let a = a.to_lowercase().replace(['€', '£'], "");
                text.contains(a.trim()) || a.split_whitespace().filter(|w| w.len() > 3).all(|w| text.contains(w))
            });
            assert!(found, "{}: {:?} not in the document", d.title, q.answers);
        }
    }
}

/// The quick run on the default model, with the ordering checks enforced loosely (CI target
/// ≤ 3 min). Needs the default model.
#[test]
#[ignore = "needs the default model (cargo run --release -- fetch-model) and ~3 min"]
fn quick_orderings_on_the_default_model() {
    let dir = std::env::var_os("KVCOMPACT_MODEL").map(PathBuf::from).unwrap_or_else(common::default_model);
    let t = tempfile::tempdir().unwrap();
    let mut a = args(t.path(), dir.clone());
    a.quick = true;
    a.ratios = vec![];
    a.samples = None;
    a.lengths = vec![];
    a.n_queries = 1024;
    a.self_study_tokens = 64;
    a.check = true;
    a.keys = 4;
    a.keys_asked = 2;
    a.qa_questions = 4;
    run(&dir, &a).unwrap();
}

#[test]
fn per_head_errors_match_compact_evaluate_head() {
    use kvcompact::compact::{evaluate_head, method_from_name, HeadInput};
    use kvcompact::eval::metrics::{head_errors, head_reference};
    let mut rng = kvcompact::sampling::Rng::new(5);
    let (t, d, m) = (40, 8, 12);
    let mut r = |n: usize| (0..n).map(|_| rng.next_f64() as f32 * 2.0 - 1.0).collect::<Vec<f32>>();
    let (keys, values, q, bias) = (r(t * d), r(t * d), r(m * d), r(t));
    let pos: Vec<u32> = (0..t as u32).collect();
    let input = HeadInput { layer: 0, kv_head: 0, d, keys: &keys, values: &values, positions: &pos, bias: Some(&bias), queries: Some(&q), scale: 0.35 };
    for name in ["knorm", "am-highest"] {
        let out = method_from_name(name).unwrap().compress_head(&input, 10, 0).unwrap();
        let e = evaluate_head(&input, &out, &q);
        let (rel, mass) = head_errors(&head_reference(&input, &q), &out, &q, 0.35);
        assert!((rel - e.mean_rel_l2).abs() < 1e-12 && (mass - e.mean_mass_err).abs() < 1e-12, "{name}: {rel} {mass} vs {e:?}");
    }
}

#[test]
fn shards_merge_into_the_single_run() {
    let t = tempfile::tempdir().unwrap();
    let model = golden("tiny/llama-gqa");
    let base = |out: &Path| {
        let mut a = args(out, model.clone());
        a.methods = vec!["knorm".into(), "am-highest".into(), "full".into()];
        a.tasks = vec!["passkey".into(), "variable-tracking".into()];
        a.samples = Some(3);
        a
    };
    let whole = t.path().join("whole");
    run(&model, &base(&whole)).unwrap();
    let mut dirs = Vec::new();
    for i in 1..=2 {
        let d = t.path().join(format!("s{i}"));
        let mut a = base(&d);
        a.shard = Some((i, 2));
        run(&model, &a).unwrap();
        let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(d.join("run.json")).unwrap()).unwrap();
        // Six contexts, every other one per shard.
        assert_eq!(info["contexts"], 3, "{info}");
        dirs.push(d);
    }
    let merged = t.path().join("merged");
    kvcompact::eval::merge(&merged, &dirs).unwrap();
    let strip = |v: Vec<serde_json::Value>| v.into_iter().filter(|x| x["metric"] != "compress_s").collect::<Vec<_>>();
    let (one, two) = (strip(rows(&whole)), strip(rows(&merged)));
    assert!(one.iter().any(|x| x["ci_low"].is_f64()), "three contexts per task give intervals");
    assert_eq!(one.len(), two.len());
    for (a, b) in one.iter().zip(&two) {
        assert_eq!(a, b, "merged shards equal the single run, intervals included");
    }
    assert!(std::fs::read_to_string(merged.join("summary.md")).unwrap().contains("eval merge"));
    // Errors: a missing shard, a shard twice, shards of different sweeps.
    let e = kvcompact::eval::merge(&t.path().join("m2"), &dirs[..1]).unwrap_err().to_string();
    assert!(e.contains("2/2 missing"), "{e}");
    let e = kvcompact::eval::merge(&t.path().join("m3"), &[dirs[0].clone(), dirs[0].clone()]).unwrap_err().to_string();
    assert!(e.contains("given twice"), "{e}");
    let other = t.path().join("other");
    let mut a = base(&other);
    a.seed = 99;
    a.shard = Some((2, 2));
    run(&model, &a).unwrap();
    let e = kvcompact::eval::merge(&t.path().join("m4"), &[dirs[0].clone(), other]).unwrap_err().to_string();
    assert!(e.contains("seed differs"), "{e}");
    let e = kvcompact::eval::merge(&t.path().join("m5"), &[whole]).unwrap_err().to_string();
    assert!(e.contains("not a shard"), "{e}");
    assert!(kvcompact::eval::parse_shard("3/2").is_err() && kvcompact::eval::parse_shard("0/2").is_err() && kvcompact::eval::parse_shard("x").is_err());
    assert_eq!(kvcompact::eval::parse_shard("2/4").unwrap(), (2, 4));
}
