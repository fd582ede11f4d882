//! The three budget forms (`--ratio R`, `--compression-ratio r`, `--budget N`) through the real
//! binary: `compact-head` and `compact` keep the rows each form names, one form at a time, and
//! out-of-range values are one-line errors. Also: a ratio gives the rows the documents' per-head
//! budgets have always given.

mod common;

use std::path::Path;

use common::{golden, kvc};
use kvcompact::compact::Budget;
use kvcompact::document::head_budgets;
use kvcompact::tensor_file::{load_safetensors, save_safetensors, OutTensor, TensorData};


fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// One line `error: …` naming every needle, exit 1.
#[track_caller]
fn expect_error(args: &[&str], needles: &[&str]) {
    let (code, _, err) = kvc(args);
    assert_eq!(code, 1, "{args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() == 1 && lines[0].starts_with("error: "), "{args:?}: {err}");
    for n in needles {
        assert!(lines[0].contains(n), "{args:?} should mention {n:?}: {err}");
    }
}

/// clap refuses two forms at once (its own usage error, exit 2).
#[track_caller]
fn expect_conflict(args: &[&str]) {
    let (code, _, err) = kvc(args);
    assert_eq!(code, 2, "{args:?}: {err}");
    assert!(err.contains("cannot be used with"), "{args:?}: {err}");
}

fn tensor(path: &Path, name: &str) -> Vec<u8> {
    match &load_safetensors(path).unwrap()[name].1 {
        TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

#[test]
fn budget_forms_through_compact_head() {
    let dir = tempfile::tempdir().unwrap();
    let (t, d, n) = (25usize, 8usize, 16usize);
    let keys: Vec<f32> = (0..t * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let values: Vec<f32> = (0..t * d).map(|i| (i as f32 * 0.11).cos()).collect();
    let queries: Vec<f32> = (0..n * d).map(|i| 2.0 * (i as f32 * 0.53).sin()).collect();
    let input = dir.path().join("in.safetensors");
    let tensors = [
        OutTensor::F32 { name: "keys", shape: vec![t, d], data: &keys },
        OutTensor::F32 { name: "values", shape: vec![t, d], data: &values },
        OutTensor::F32 { name: "queries", shape: vec![n, d], data: &queries },
    ];
    save_safetensors(&input, &tensors, None).unwrap();
    let run = |form: &[&str]| {
        let out = dir.path().join(format!("out{}.safetensors", form.join("")));
        let (code, _, err) = kvc(&[&["compact-head", "--input", s(&input), "--output", s(&out), "--method", "am-highest"], form].concat());
        assert_eq!(code, 0, "{form:?}: {err}");
        out
    };
    // 25 rows: int(25 · (1 − 0.56)) = 10 in f64 (11 in exact arithmetic), ⌊25 / 2.5⌋ = 10.
    let rows = run(&["--budget", "10"]);
    assert_eq!(load_safetensors(&rows).unwrap()["indices"].0, vec![10]);
    for form in [&["--compression-ratio", "0.56"][..], &["--ratio", "2.5"]] {
        let out = run(form);
        for name in ["indices", "keys", "beta", "values"] {
            assert_eq!(tensor(&out, name), tensor(&rows, name), "{form:?}: {name}");
        }
    }
    let out = dir.path().join("x.safetensors");
    let base = ["compact-head", "--input", s(&input), "--output", s(&out)];
    expect_conflict(&[&base[..], &["--budget", "4", "--ratio", "2"]].concat());
    expect_conflict(&[&base[..], &["--compression-ratio", "0.5", "--ratio", "2"]].concat());
    let (code, _, err) = kvc(&base);
    assert!(code == 2 && err.contains("--budget"), "no form: {err}");
    expect_error(&[&base[..], &["--compression-ratio", "1"]].concat(), &["compression ratio", "[0, 1)"]);
    expect_error(&[&base[..], &["--compression-ratio=-0.5"]].concat(), &["compression ratio"]);
    expect_error(&[&base[..], &["--ratio", "0.5"]].concat(), &["ratio must be", "0.5"]);
    expect_error(&[&base[..], &["--budget", "0"]].concat(), &["at least 1"]);
    expect_error(&[&base[..], &["--budget", "26"]].concat(), &["larger than", "25"]);
}

#[test]
fn budget_forms_through_compact() {
    let m = golden("tiny/llama-gqa");
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx.txt");
    std::fs::write(&ctx, "the quick brown fox jumps over the lazy dog and runs far away into the woods").unwrap();
    let out = dir.path().join("c.safetensors");
    // Uniform allocation: every head keeps exactly the budget (the global one is checked below).
    let base = ["compact", "--model", s(&m), "--context", s(&ctx), "--raw", "--n-queries", "32", "--out", s(&out), "--json", "--am-budgets", "uniform"];
    // Rows of head (0, 0) after compaction: the verbatim template rows plus the article's kept rows.
    let kept = |form: &[&str], want: &dyn Fn(usize) -> usize| {
        let (code, stdout, err) = kvc(&[&base[..], form].concat());
        assert_eq!(code, 0, "{form:?}: {err}");
        let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let (ctx_t, art) = (r["context_tokens"].as_u64().unwrap() as usize, r["article_tokens"].as_u64().unwrap() as usize);
        assert_eq!(load_safetensors(&out).unwrap()["layer0.head0.positions"].0, vec![ctx_t - art + want(art)], "{form:?}");
        r["budget"].clone()
    };
    assert_eq!(kept(&["--budget", "3"], &|_| 3), serde_json::json!({"budget": 3}));
    assert_eq!(kept(&["--compression-ratio", "0.3"], &|t| (t as f64 * (1.0 - 0.3)) as usize), serde_json::json!({"compression_ratio": 0.3}));
    assert_eq!(kept(&[], &|t| (t / 20).max(1)), serde_json::json!({"ratio": 20.0}));
    // The default global allocation spreads the same total over the heads.
    let rows_of = |args: &[&str]| {
        let (code, stdout, err) = kvc(args);
        assert_eq!(code, 0, "{err}");
        let r: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
        let t = load_safetensors(&out).unwrap();
        let counts: Vec<usize> = t.iter().filter(|(k, _)| k.ends_with(".positions")).map(|(_, v)| v.0[0]).collect();
        (counts, r["context_tokens"].as_u64().unwrap() as usize - r["article_tokens"].as_u64().unwrap() as usize)
    };
    let (uniform, tpl) = rows_of(&[&base[..], &["--budget", "3"]].concat());
    let global_args: Vec<&str> = base[..base.len() - 2].iter().copied().chain(["--budget", "3"]).collect();
    let (global, _) = rows_of(&global_args);
    assert!(uniform.iter().all(|&n| n == tpl + 3), "{uniform:?}");
    assert_eq!(global.iter().sum::<usize>(), uniform.iter().sum::<usize>(), "{global:?}");
    expect_conflict(&[&base[..], &["--budget", "3", "--ratio", "2"]].concat());
    expect_conflict(&[&base[..], &["--budget", "3", "--compression-ratio", "0.2"]].concat());
    expect_error(&[&base[..], &["--compression-ratio", "1.5"]].concat(), &["[0, 1)"]);
    let props = dir.path().join("p.json");
    std::fs::write(&props, r#"{"L0H0": 1.0}"#).unwrap();
    expect_error(&[&base[..], &["--budget", "3", "--budgets", s(&props)]].concat(), &["proportions take a ratio"]);
}

#[test]
fn budget_ratio_gives_the_documents_uniform_budgets() {
    for t in [0usize, 1, 7, 100, 1001, 4096] {
        for r in [1.0, 1.5, 2.0, 3.0, 7.0, 20.0, 64.0, 1e6] {
            let uniform = head_budgets(2, 3, t, r, None, 1.0).unwrap();
            assert_eq!(uniform, vec![Budget::Ratio(r).rows(t).unwrap(); 6], "T={t} R={r}");
        }
    }
}
