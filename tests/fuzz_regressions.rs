//! The fuzz corpora on stable (issue 15): every committed seed (`fuzz/seeds/<target>/`) and every
//! input a fuzzer once crashed on (`fuzz/regressions/<target>/`) goes through the same reader as
//! the fuzz target of that name, and must load or give a one-line error — never panic.
//! `fuzz/run.sh` is the coverage-guided search; this file keeps what it found fixed.

use std::path::{Path, PathBuf};

use kvcompact::cache::file::load_cache;
use kvcompact::compact::budget::Budget;
use kvcompact::compact::oracle::{compact_head_file, OracleOptions};
use kvcompact::gguf::{convert_gguf, GgufFile, OutDtype};
use kvcompact::model::config::Config;
use kvcompact::model::synth::{write_llama, SynthSpec};
use kvcompact::model::Model;
use kvcompact::tokenizer::{render_template, Message};

/// Seeds and regression inputs of one target.
fn inputs(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for kind in ["seeds", "regressions"] {
        let Ok(rd) = std::fs::read_dir(root.join(kind).join(target)) else { continue };
        let mut files: Vec<PathBuf> = rd.flatten().map(|e| e.path()).filter(|p| p.is_file()).collect();
        files.sort();
        out.extend(files.into_iter().map(|p| {
            let b = std::fs::read(&p).unwrap();
            (p, b)
        }));
    }
    out
}

/// `[len: u16 LE][len bytes][rest]`, as the fuzz targets split their input.
fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    (&data[2..2 + n], &data[2 + n..])
}

fn one_line(p: &Path, e: &dyn std::fmt::Display) {
    let s = e.to_string();
    assert!(!s.trim().is_empty() && !s.contains('\n'), "{}: error is not one line: {s:?}", p.display());
}

/// The fuzz targets' tiny synthetic model (`fuzz/src/lib.rs` `tiny_spec`): cache seeds are bound
/// to its fingerprint.
fn tiny_model(dir: &Path) -> Model {
    let spec = SynthSpec { hidden: 16, heads: 4, kv_heads: 2, layers: 2, ff: 24, vocab: 32, max_pos: 64, seed: 7 };
    write_llama(dir, &spec).unwrap();
    Model::load(dir).unwrap()
}

#[test]
fn config_inputs() {
    let all = inputs("config");
    assert!(!all.is_empty(), "no config seeds");
    for (p, b) in all {
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&b) else { continue };
        if let Err(e) = Config::from_json(&v, &p) {
            one_line(&p, &e);
        }
    }
}

#[test]
fn gguf_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let all = inputs("gguf");
    assert!(!all.is_empty(), "no gguf seeds");
    for (p, b) in all {
        if let Err(e) = GgufFile::from_bytes(b, &p) {
            one_line(&p, &e);
            continue;
        }
        if let Err(e) = convert_gguf(&p, &dir.path().join("out"), OutDtype::F32) {
            one_line(&p, &e);
        }
    }
}

#[test]
fn model_dir_inputs() {
    let all = inputs("model_dir");
    assert!(!all.is_empty(), "no model_dir seeds");
    for (p, b) in all {
        let dir = tempfile::tempdir().unwrap();
        let (config, weights) = split(&b);
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), weights).unwrap();
        let model = match Model::load(dir.path()) {
            Ok(m) => m,
            Err(e) => {
                one_line(&p, &e);
                continue;
            }
        };
        let (mut state, mut cache) = (model.new_state(4), model.new_cache());
        if let Err(e) = model.forward_last(&mut state, &mut cache, &[0]) {
            one_line(&p, &e);
        }
    }
}

#[test]
fn cache_file_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("model"));
    let all = inputs("cache_file");
    assert!(!all.is_empty(), "no cache seeds");
    let mut loaded_any = false;
    for (p, _) in all {
        match load_cache(&p, &model.cache_id()) {
            Ok(mut c) => {
                loaded_any = true;
                let mut state = model.new_state(1);
                let logits = model.forward_last(&mut state, &mut c.cache, &[1]).unwrap();
                assert!(logits.iter().all(|x| x.is_finite()), "{}", p.display());
            }
            Err(e) => one_line(&p, &e),
        }
    }
    assert!(loaded_any, "no cache seed loads: the seeds are stale (fuzz/: cargo run --bin make_seeds)");
}

/// The fuzz target's budget byte: every form, edges included.
fn pick_budget(b: u8) -> Budget {
    let k = (b / 3) as usize;
    match b % 3 {
        0 => Budget::Rows(1 + k % 16),
        1 => Budget::Ratio(1.0 + k as f64 / 8.0),
        _ => Budget::CompressionRatio(k as f64 / 86.0),
    }
}

#[test]
fn compact_head_inputs() {
    const METHODS: [&str; 12] = ["am-highest", "am-omp", "am-omp-fast", "baseline", "streaming-llm", "h2o", "snapkv", "pyramidkv", "tova", "knorm", "expected-attention", "random"];
    let dir = tempfile::tempdir().unwrap();
    let all = inputs("compact_head");
    assert!(!all.is_empty(), "no compact_head seeds");
    for (p, b) in all {
        if b.len() < 2 {
            continue;
        }
        let (input, output) = (dir.path().join("in.safetensors"), dir.path().join("out.safetensors"));
        std::fs::write(&input, &b[2..]).unwrap();
        let opts = OracleOptions { method: METHODS[b[0] as usize % METHODS.len()].into(), budget: pick_budget(b[1]), ..OracleOptions::default() };
        match compact_head_file(&input, &output, &opts) {
            Ok(r) => assert!(r.rel_l2.is_none_or(f64::is_finite), "{}", p.display()),
            Err(e) => one_line(&p, &e),
        }
    }
}

#[test]
fn chat_template_inputs() {
    let all = inputs("chat_template");
    assert!(!all.is_empty(), "no chat_template seeds");
    for (p, b) in all {
        let (tpl, msg) = split(&b);
        let (Ok(tpl), Ok(msg)) = (std::str::from_utf8(tpl), std::str::from_utf8(msg)) else { continue };
        let messages = [Message::new("system", "You are terse."), Message::new("user", msg), Message::new("assistant", "ok")];
        if let Err(e) = render_template(tpl, &messages, true, "<s>", "</s>") {
            one_line(&p, &e);
        }
    }
}

/// A template that would loop for hours, and one that would print gigabytes, end in errors.
#[test]
fn runaway_chat_templates_end_with_an_error() {
    let m = [Message::new("user", "hi")];
    let spin = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}";
    let e = render_template(spin, &m, true, "", "").unwrap_err().to_string();
    assert!(e.contains("chat template") && !e.contains('\n'), "{e}");
    let flood = "{% for a in range(100000) %}{{ 'x' * 10000 }}{% endfor %}";
    let e = render_template(flood, &m, true, "", "").unwrap_err().to_string();
    assert!(e.contains("exceeds"), "{e}");
}

/// Found by `cache_file` fuzzing: a cache whose keys, values and β are finite but near f32's
/// limit loaded, and the next token's logits came out NaN. Such a file is now refused by name.
#[test]
fn cache_with_huge_magnitudes_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(&dir.path().join("model"));
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/regressions/cache_file/huge-magnitudes-nan-logits");
    let e = load_cache(&p, &model.cache_id()).err().expect("refused").to_string();
    assert!(e.contains("beyond any real cache") && !e.contains('\n'), "{e}");
}
