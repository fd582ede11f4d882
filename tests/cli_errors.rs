//! Bad input through the real binary: every case must print exactly one line starting with
//! `error:` that names the problem, exit with status 1, and never panic.

mod common;

use std::path::{Path, PathBuf};

use common::{golden, kvc};
use kvcompact::tensor_file::{load_safetensors, save_safetensors, OutTensor, TensorData};


/// Assert a one-line error mentioning every `needles` fragment.
#[track_caller]
fn expect_error(args: &[&str], needles: &[&str]) {
    let (code, _out, err) = kvc(args);
    assert_eq!(code, 1, "expected exit 1 for {args:?}, got {code}; stderr: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line for {args:?}, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "error for {args:?} should mention {n:?}: {err}");
    }
}

/// A copy of a tiny golden model in a temp dir, to break on purpose.
fn tiny_copy(name: &str) -> tempfile::TempDir {
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(golden(&format!("tiny/{name}"))).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), t.path().join(e.file_name())).unwrap();
    }
    t
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn rewrite_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Vec<usize>, TensorData)>)) {
    let path = dir.join("model.safetensors");
    let mut ts: Vec<(String, Vec<usize>, TensorData)> =
        load_safetensors(&path).unwrap().into_iter().map(|(n, (sh, d))| (n, sh, d)).collect();
    edit(&mut ts);
    let outs: Vec<OutTensor> = ts
        .iter()
        .map(|(n, sh, d)| match d {
            TensorData::F32(v) => OutTensor::F32 { name: n, shape: sh.clone(), data: v },
            TensorData::I64(v) => OutTensor::I64 { name: n, shape: sh.clone(), data: v },
        })
        .collect();
    save_safetensors(&path, &outs, None).unwrap();
}

#[test]
fn missing_model_dir() {
    expect_error(&["generate", "--model", "/nonexistent/model", "--prompt", "hi"], &["/nonexistent/model", "does not exist"]);
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let t = tiny_copy("llama-mha");
    let w = t.path().join("model.safetensors");
    let len = std::fs::metadata(&w).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&w).unwrap();
    f.set_len(len - 100).unwrap();
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &["model.safetensors", "truncated"]);

    std::fs::write(&w, b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!").unwrap();
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &["model.safetensors", "invalid safetensors"]);

    std::fs::write(&w, b"abc").unwrap();
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &["model.safetensors"]);

    std::fs::remove_file(&w).unwrap();
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &["no model.safetensors"]);
}

#[test]
fn bad_configs() {
    let t = tiny_copy("llama-mha");
    let c = t.path().join("config.json");
    let orig = std::fs::read_to_string(&c).unwrap();
    std::fs::write(&c, orig.replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt_neox\"")).unwrap();
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &["unsupported architecture", "gpt_neox"]);
    std::fs::write(&c, orig.replace("\"num_hidden_layers\"", "\"num_layers_renamed\"")).unwrap();
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &["config.json", "num_hidden_layers"]);
    std::fs::write(&c, "{ not json").unwrap();
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &["config.json", "not valid JSON"]);
}

#[test]
fn missing_tensor_wrong_shape_wrong_dtype_nan() {
    let t = tiny_copy("llama-mha");
    let name = "model.layers.2.self_attn.k_proj.weight";
    rewrite_weights(t.path(), |ts| ts.retain(|(n, _, _)| n != name));
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &[name, "not found"]);

    let t = tiny_copy("llama-mha");
    rewrite_weights(t.path(), |ts| {
        let e = ts.iter_mut().find(|(n, _, _)| n == name).unwrap();
        e.1 = vec![e.1[1], e.1[0]];
        if e.1[0] == e.1[1] {
            // Square: drop a row instead.
            let TensorData::F32(v) = &mut e.2 else { unreachable!() };
            v.truncate(v.len() - e.1[1]);
            e.1[0] -= 1;
        }
    });
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &[name, "expected shape", "model.safetensors"]);

    let t = tiny_copy("llama-mha");
    rewrite_weights(t.path(), |ts| {
        let e = ts.iter_mut().find(|(n, _, _)| n == name).unwrap();
        let TensorData::F32(v) = &e.2 else { unreachable!() };
        e.2 = TensorData::I64(v.iter().map(|&x| x as i64).collect());
    });
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &[name, "dtype", "I64"]);

    let t = tiny_copy("llama-mha");
    rewrite_weights(t.path(), |ts| {
        let e = ts.iter_mut().find(|(n, _, _)| n == name).unwrap();
        let TensorData::F32(v) = &mut e.2 else { unreachable!() };
        v[17] = f32::NAN;
    });
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &[name, "non-finite"]);
}

#[test]
fn bad_prompts() {
    let m = golden("tiny/llama-mha");
    let m = s(&m);
    expect_error(&["generate", "--model", m, "--prompt", ""], &["prompt is empty"]);
    let long = "word ".repeat(2000);
    expect_error(&["generate", "--model", m, "--prompt", &long], &["exceeds the model's context", "256"]);
    expect_error(&["logits", "--model", m, "--prompt", &long, "--out", "/tmp/never.safetensors"], &["exceeds the model's context"]);

    let t = tempfile::tempdir().unwrap();
    let f: PathBuf = t.path().join("p.txt");
    std::fs::write(&f, b"caf\xe9 au lait").unwrap();
    expect_error(&["generate", "--model", m, "--prompt-file", s(&f)], &["not valid UTF-8", "p.txt"]);
    expect_error(&["generate", "--model", m, "--prompt-file", "/nonexistent/prompt.txt"], &["/nonexistent/prompt.txt"]);
    std::fs::write(&f, b"").unwrap();
    expect_error(&["generate", "--model", m, "--prompt-file", s(&f)], &["prompt is empty"]);
    expect_error(&["generate", "--model", m, "--prompt", "hi", "--temperature=-1"], &["temperature"]);
    expect_error(&["--threads", "0", "generate", "--model", m, "--prompt", "hi"], &["threads"]);
}

#[test]
fn bad_gguf_files() {
    let t = tempfile::tempdir().unwrap();
    let g = t.path().join("x.gguf");
    std::fs::write(&g, b"GGUF\x03\x00\x00\x00\x01").unwrap();
    let out = t.path().join("out");
    expect_error(&["convert", "--gguf", s(&g), "--out", s(&out)], &["x.gguf"]);
    std::fs::write(&g, b"NOPE0000000000000000000000000000").unwrap();
    expect_error(&["convert", "--gguf", s(&g), "--out", s(&out)], &["x.gguf"]);
    expect_error(&["convert", "--gguf", "/nonexistent.gguf", "--out", s(&out)], &["/nonexistent.gguf"]);
}

#[test]
fn tiny_model_generates_and_writes_logits_via_cli() {
    let m = golden("tiny/llama-gqa");
    let (code, out, err) = kvc(&["generate", "--model", s(&m), "--prompt", "hello world", "--max-tokens", "5", "--json", "--ignore-eos"]);
    assert_eq!(code, 0, "{err}");
    let j: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(j["tokens"].as_array().unwrap().len(), 5);
    assert!(j["prefill_tok_s"].as_f64().unwrap() > 0.0 && j["decode_tok_s"].as_f64().unwrap() > 0.0);
    assert!(j["text"].is_string());

    let t = tempfile::tempdir().unwrap();
    let f = t.path().join("l.safetensors");
    let (code, _, err) = kvc(&["logits", "--model", s(&m), "--prompt", "hello world", "--out", s(&f)]);
    assert_eq!(code, 0, "{err}");
    let l = load_safetensors(&f).unwrap();
    let (tshape, _) = &l["tokens"];
    let (lshape, _) = &l["logits"];
    assert_eq!(lshape, &vec![tshape[0], 384]);
}

#[test]
fn slim_refusals_and_cli() {
    let gqa = golden("tiny/llama-gqa");
    let mha = golden("tiny/llama-mha");
    expect_error(
        &["generate", "--model", s(&gqa), "--prompt", "hi", "--slim"],
        &["slim attention not applicable", "h_kv·(d_k+d_v)", "(GQA)", "bytes per token"],
    );
    expect_error(&["bench", "--model", s(&gqa), "--slim", "--reps", "1"], &["slim attention not applicable"]);
    expect_error(
        &["generate", "--model", s(&mha), "--prompt", "hi", "--slim", "--max-cache-tokens", "8"],
        &["--slim cannot be combined"],
    );
    expect_error(&["generate", "--model", s(&mha), "--prompt", "hi", "--slim", "--slim-max-cond", "nan"], &["--slim-max-cond"]);
    expect_error(&["generate", "--model", s(&mha), "--prompt", "hi", "--slim", "--kv-dtype", "bf16"], &["slim attention", "bf16 KV cache"]);
    expect_error(
        &["generate", "--model", s(&mha), "--prompt", "hi", "--kv-dtype", "bf16", "--max-cache-tokens", "8", "--method", "streaming-llm"],
        &["streaming eviction", "--kv-dtype"],
    );
    // A working slim run reports its layers and bytes in JSON.
    let (code, out, err) = kvc(&["generate", "--model", s(&mha), "--prompt", "hello there", "--max-tokens", "4", "--slim", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["slim"]["layers"].as_array().unwrap().len(), 4);
    assert!(v["slim"]["kv_bytes"].as_u64().unwrap() < v["slim"]["standard_kv_bytes"].as_u64().unwrap());
    assert!(err.contains("slim layer  0: cond(W_K)"), "{err}");
}

/// Issue 15's size holes, as regression tests: a layer count no file can back, head sizes whose
/// product wraps, and NaN test queries in a compact-head input — each a one-line error, exit 1.
#[test]
fn hostile_sizes_and_nan_test_queries() {
    let t = tiny_copy("llama-gqa");
    let c = t.path().join("config.json");
    let orig: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&c).unwrap()).unwrap();
    // Before: "memory allocation of 721279627820400 bytes failed", exit 134.
    let mut v = orig.clone();
    v["num_hidden_layers"] = serde_json::json!(1099511627775u64);
    std::fs::write(&c, v.to_string()).unwrap();
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &["not found"]);
    // Before: q_dim wrapped to 0 in release builds and the shape checks passed.
    let mut v = orig.clone();
    v["num_attention_heads"] = serde_json::json!(1u64 << 39);
    v["num_key_value_heads"] = serde_json::json!(1u64 << 39);
    v["head_dim"] = serde_json::json!(1u64 << 39);
    std::fs::write(&c, v.to_string()).unwrap();
    expect_error(&["generate", "--model", s(t.path()), "--prompt", "hi"], &["config.json", "overflows"]);

    // Before: NaN test queries gave "rel_l2 0.0" and exit 0.
    let dir = tempfile::tempdir().unwrap();
    let (tt, d, n) = (12usize, 4usize, 6usize);
    let keys: Vec<f32> = (0..tt * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let values: Vec<f32> = (0..tt * d).map(|i| (i as f32 * 0.11).cos()).collect();
    let queries: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.53).sin()).collect();
    let mut test = queries.clone();
    test[5] = f32::NAN;
    let input = dir.path().join("in.safetensors");
    save_safetensors(
        &input,
        &[
            OutTensor::F32 { name: "keys", shape: vec![tt, d], data: &keys },
            OutTensor::F32 { name: "values", shape: vec![tt, d], data: &values },
            OutTensor::F32 { name: "queries", shape: vec![n, d], data: &queries },
            OutTensor::F32 { name: "test_queries", shape: vec![n, d], data: &test },
        ],
        None,
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    expect_error(&["compact-head", "--input", s(&input), "--output", s(&out), "--budget", "4"], &["test_queries", "NaN"]);
}

/// `compact-head --kvpress`: an eviction baseline runs as its kvpress press; H2O (no kvpress press),
/// the Attention Matching family and kvzip (needs its repeat pass) are one-line errors, exit 1.
#[test]
fn compact_head_kvpress_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (tt, d, n) = (40usize, 4usize, 6usize);
    let keys: Vec<f32> = (0..tt * d).map(|i| (i as f32 * 0.37).sin()).collect();
    let values: Vec<f32> = (0..tt * d).map(|i| (i as f32 * 0.11).cos()).collect();
    let queries: Vec<f32> = (0..n * d).map(|i| (i as f32 * 0.53).sin()).collect();
    let input = dir.path().join("in.safetensors");
    save_safetensors(
        &input,
        &[
            OutTensor::F32 { name: "keys", shape: vec![tt, d], data: &keys },
            OutTensor::F32 { name: "values", shape: vec![tt, d], data: &values },
            OutTensor::F32 { name: "queries", shape: vec![n, d], data: &queries },
        ],
        None,
    )
    .unwrap();
    let out = dir.path().join("out.safetensors");
    let head = ["compact-head", "--input", s(&input), "--output", s(&out), "--budget", "8", "--kvpress", "--method"];
    let with = |m: &'static str| head.iter().copied().chain([m]).collect::<Vec<&str>>();
    for m in ["snapkv", "knorm", "observed-attention", "random"] {
        let (code, _, err) = kvc(&with(m));
        assert_eq!(code, 0, "{m}: {err}");
        let map = load_safetensors(&out).unwrap();
        assert_eq!(map["indices"].0, vec![8], "{m}");
    }
    expect_error(&with("h2o"), &["observed-attention"]);
    expect_error(&with("am-omp"), &["--kvpress applies to eviction baselines"]);
    expect_error(&with("kvzip"), &["kvzip", "repeat"]);
    expect_error(&with("qfilters"), &["qfilters"]);
}

#[test]
fn compact_kvpress_flag() {
    let dir = tempfile::tempdir().unwrap();
    let ctx = dir.path().join("ctx.txt");
    std::fs::write(&ctx, "The lighthouse at Kestrel Point was built in 1871 by Ada Brant; its lamp is seen 22 miles away.").unwrap();
    let out = dir.path().join("c.safetensors");
    let model = golden("tiny/llama-gqa");
    let base = ["compact", "--model", s(&model), "--context", s(&ctx), "--out", s(&out)];
    let with = |extra: &[&'static str]| base.iter().copied().chain(extra.iter().copied()).collect::<Vec<&str>>();
    for extra in [&["--kvpress", "--method", "snapkv", "--budget", "3", "--json"][..], &["--method", "kvzip", "--compression-ratio", "0.5", "--json"]] {
        let (code, stdout, err) = kvc(&with(extra));
        assert_eq!(code, 0, "{extra:?}: {err}");
        let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{extra:?}: {e}: {stdout}"));
        assert_eq!(report["kvpress"], true, "{extra:?}");
        assert!(report["kv_bytes_after"].as_u64().unwrap() < report["kv_bytes_before"].as_u64().unwrap(), "{extra:?}");
        // The file is an ordinary compacted cache: generation continues from it.
        let (code, _, err) = kvc(&["generate", "--model", s(&model), "--cache", s(&out), "--prompt", "Who built it?", "--max-tokens", "2"]);
        assert_eq!(code, 0, "{extra:?}: generate from the cache: {err}");
    }
    expect_error(&with(&["--kvpress", "--method", "am-omp"]), &["--kvpress applies to eviction baselines"]);
    expect_error(&with(&["--kvpress", "--method", "h2o"]), &["observed-attention"]);
    expect_error(&with(&["--kvpress", "--method", "snapkv", "--on-policy"]), &["kvpress press takes none"]);
}

#[test]
fn device_cuda_without_a_gpu() {
    if kvcompact::device::Device::Cuda.check().is_ok() {
        eprintln!("skipped: this machine has a CUDA device (tests/cuda.rs covers it)");
        return;
    }
    let tiny = golden("tiny/llama-gqa");
    let model = s(&tiny);
    let ctx = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ctx.path(), "A short context.").unwrap();
    // Without `--features cuda` the line says to rebuild; with it, what is missing on this machine.
    let why = if cfg!(feature = "cuda") { "--device cuda: no CUDA driver" } else { "built without CUDA support" };
    expect_error(&["generate", "--model", model, "--prompt", "hi", "--device", "cuda"], &[why]);
    expect_error(&["bench", "--model", model, "--device", "cuda"], &[why]);
    expect_error(&["compact", "--model", model, "--context", s(ctx.path()), "--out", "/tmp/kvcompact-never-written.safetensors", "--device", "cuda"], &[why]);
    expect_error(&["compact-head", "--input", "/nonexistent.safetensors", "--output", "/tmp/kvcompact-never-written.safetensors", "--ratio", "4", "--device", "cuda"], &[why]);
}
