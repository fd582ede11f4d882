//! Slim Attention end to end on multi-head-attention Llama models: the tiny golden MHA model
//! and synthetic variants of it (biases on q/k/v/o, W_K with a prescribed condition number).
//!
//! - logits with a K-only cache equal the standard path within 1e-5 relative (prefill in one
//!   chunk, in chunks of 7 — the option-2 path — and of 16 — rebuilt values), and 64 greedy
//!   tokens are identical;
//! - the error grows with cond(W_K) like cond·ε(f32);
//! - the load-time gate (cond) and the first-prefill gate (rebuild error) fall back per layer;
//! - GQA / q-k-norm models are refused with a message that gives the numbers;
//! - 1 and 2 threads give the same bits; the cache holds K only.

mod common;

use std::path::{Path, PathBuf};

use common::golden;
use kvcompact::cache::SlimMode;
use kvcompact::model::{Logits, Model};
use kvcompact::model::slim::SlimOptions;
use kvcompact::tensor_file::{load_safetensors, save_safetensors, OutTensor, TensorData};

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 3 + (i * 37 + 11) % 380).collect()
}

/// Prefill `prompt` in chunks of `batch`, then feed `forced` one token at a time; the logits of
/// the prompt's last token and of every forced step: [1 + forced.len(), vocab].
fn run(m: &Model, prompt: &[u32], forced: &[u32], batch: usize) -> Vec<f32> {
    let mut st = m.new_state(batch);
    let mut cache = m.new_cache();
    m.forward(&mut st, &mut cache, prompt, Logits::Last).unwrap();
    let mut out = st.logits.clone();
    for &t in forced {
        m.forward(&mut st, &mut cache, &[t], Logits::Last).unwrap();
        out.extend_from_slice(&st.logits);
    }
    cache.check().unwrap();
    out
}

fn greedy(m: &Model, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut st = m.new_state(256);
    let mut cache = m.new_cache();
    let mut out = Vec::new();
    let mut next = kvcompact_kernels::argmax(m.forward_last(&mut st, &mut cache, prompt).unwrap()) as u32;
    for _ in 0..steps {
        out.push(next);
        next = kvcompact_kernels::argmax(m.forward_last(&mut st, &mut cache, &[next]).unwrap()) as u32;
    }
    out
}

fn slim_model(dir: &Path, opts: SlimOptions) -> Model {
    let mut m = Model::load(dir).unwrap();
    m.enable_slim(opts).unwrap();
    m
}

/// max |a − b| / max |b|.
fn rel_max(a: &[f32], b: &[f32]) -> f64 {
    let d = a.iter().zip(b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max);
    let s = b.iter().map(|y| y.abs() as f64).fold(0.0, f64::max);
    d / s
}

/// Deterministic uniform values in [-1, 1).
fn fill(n: usize, mut s: u64) -> Vec<f64> {
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// A d×d orthogonal matrix (row-major): modified Gram-Schmidt on a seeded random matrix.
fn orthogonal(d: usize, seed: u64) -> Vec<f64> {
    let mut a = fill(d * d, seed);
    for i in 0..d {
        for j in 0..i {
            let dot: f64 = (0..d).map(|k| a[i * d + k] * a[j * d + k]).sum();
            for k in 0..d {
                a[i * d + k] -= dot * a[j * d + k];
            }
        }
        let norm = (0..d).map(|k| a[i * d + k] * a[i * d + k]).sum::<f64>().sqrt();
        (0..d).for_each(|k| a[i * d + k] /= norm);
    }
    a
}

/// d×d matrix U·diag(σ)·Vᵀ with σ geometric from `scale` down to `scale / cond`.
fn with_cond(d: usize, cond: f64, scale: f64, seed: u64) -> Vec<f32> {
    let (u, v) = (orthogonal(d, seed), orthogonal(d, seed ^ 0x5555));
    let sigma: Vec<f64> = (0..d).map(|i| scale * cond.powf(-(i as f64) / (d - 1) as f64)).collect();
    let mut w = vec![0.0f32; d * d];
    for r in 0..d {
        for c in 0..d {
            w[r * d + c] = (0..d).map(|k| u[r * d + k] * sigma[k] * v[c * d + k]).sum::<f64>() as f32;
        }
    }
    w
}

/// A copy of the tiny MHA model with attention biases (q/k/v/o) and, for each `(layer, cond)`,
/// a W_K of that condition number.
fn synthetic(tag: &str, conds: &[(usize, f64)]) -> (tempfile::TempDir, PathBuf) {
    let src = golden("tiny/llama-mha");
    let tmp = tempfile::Builder::new().prefix(&format!("slim-{tag}-")).tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["attention_bias"] = serde_json::Value::Bool(true);
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let d = 64;
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = load_safetensors(&src.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(n, (shape, data))| match data {
            TensorData::F32(v) => (n, shape, v),
            TensorData::I64(_) => panic!("unexpected integer tensor {n}"),
        })
        .collect();
    for l in 0..4 {
        for (p, seed) in [("q", 1u64), ("k", 2), ("v", 3), ("o", 4)] {
            let b: Vec<f32> = fill(d, 100 * l as u64 + seed).iter().map(|x| (0.3 * x) as f32).collect();
            tensors.push((format!("model.layers.{l}.self_attn.{p}_proj.bias"), vec![d], b));
        }
    }
    for &(l, cond) in conds {
        let name = format!("model.layers.{l}.self_attn.k_proj.weight");
        let t = tensors.iter_mut().find(|t| t.0 == name).unwrap();
        let fro = t.2.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        t.2 = with_cond(d, cond, 2.0 * fro / (d as f64).sqrt(), 77 + l as u64);
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let out: Vec<OutTensor> =
        tensors.iter().map(|(n, s, v)| OutTensor::F32 { name: n, shape: s.clone(), data: v }).collect();
    save_safetensors(&dir.join("model.safetensors"), &out, None).unwrap();
    (tmp, dir)
}

#[test]
fn slim_logits_match_standard_path() {
    let dir = golden("tiny/llama-mha");
    let std_model = Model::load(&dir).unwrap();
    let slim = slim_model(&dir, SlimOptions::default());
    let reports = &slim.slim.as_ref().unwrap().reports;
    // f64 solve: residual ≈ cond·ε(f64); layer 0 of this random model has cond ≈ 3e4.
    assert!(reports.iter().all(|r| r.slim && r.residual < r.cond * 1e-15), "{reports:?}");
    assert!(reports[0].cond > 1e4 && reports[1..].iter().all(|r| r.cond < 1e3), "{reports:?}");
    let all = tokens(90);
    let (prompt, forced) = all.split_at(60);
    let want = run(&std_model, prompt, forced, 256);

    // Layer 0 rebuilds V with a relative error of ~3e-4 (cond 3e4 × f32): the default gate
    // sends it back to a normal cache, the other three run K-only.
    let mut cache = slim.new_cache();
    slim.forward(&mut slim.new_state(256), &mut cache, prompt, Logits::None).unwrap();
    let meta = cache.slim_meta().unwrap();
    assert_eq!(meta.modes, [SlimMode::Full, SlimMode::Slim, SlimMode::Slim, SlimMode::Slim], "{:?}", meta.val_err);
    assert!(meta.val_err[0].unwrap() > 1e-4, "{:?}", meta.val_err);
    // With the gate open the conditioning shows in the logits — the gate is what keeps slim exact.
    let open = slim_model(&dir, SlimOptions { max_rel_err: 1.0, ..SlimOptions::default() });
    let err_open = rel_max(&run(&open, prompt, forced, 256), &want);
    println!("all four layers slim (gate open): max |Δlogit| / max |logit| = {err_open:.2e}");
    assert!(err_open > 1e-4);

    for batch in [256, 16, 7] {
        let got = run(&slim, prompt, forced, batch);
        let err = rel_max(&got, &want);
        println!("prefill chunks of {batch}: max |Δlogit| / max |logit| = {err:.2e}");
        assert!(err <= 1e-5, "chunks of {batch}: relative logit error {err:.3e} > 1e-5");
        assert!(got.iter().all(|x| x.is_finite()));
    }
    // The first prefill is the standard computation (V from X): identical bits.
    let a = run(&std_model, prompt, &[], 256);
    let b = run(&slim, prompt, &[], 256);
    assert_eq!(a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
}

#[test]
fn slim_greedy_tokens_identical_for_64_steps() {
    let dir = golden("tiny/llama-mha");
    let prompt = tokens(30);
    let want = greedy(&Model::load(&dir).unwrap(), &prompt, 64);
    let got = greedy(&slim_model(&dir, SlimOptions::default()), &prompt, 64);
    assert_eq!(got, want);
}

#[test]
fn biases_and_error_growing_with_condition_number() {
    // All four layers get W_K with the given cond; the gates are opened so every layer runs slim.
    let open = SlimOptions { max_cond: 1e12, max_rel_err: f64::INFINITY };
    let all = tokens(80);
    let (prompt, forced) = all.split_at(48);
    let mut errs = Vec::new();
    for cond in [1e1, 1e3, 1e5] {
        let (_tmp, dir) = synthetic("cond", &[(0, cond), (1, cond), (2, cond), (3, cond)]);
        let want = run(&Model::load(&dir).unwrap(), prompt, forced, 256);
        let m = slim_model(&dir, open);
        for r in &m.slim.as_ref().unwrap().reports {
            assert!((r.cond / cond - 1.0).abs() < 1e-3, "layer {} cond {:.4e}, built {cond:e}", r.layer, r.cond);
        }
        let got = run(&m, prompt, forced, 16);
        let err = rel_max(&got, &want);
        println!("cond(W_K) = {cond:.0e}: max |Δlogit| / max |logit| = {err:.2e} (cond·2^-24 = {:.1e})", cond * 2f64.powi(-24));
        // Four layers of f32 rebuilds: a small multiple of cond·u.
        assert!(err <= 16.0 * cond * 2f64.powi(-24) + 1e-6, "cond {cond:e}: error {err:.3e}");
        errs.push(err);
    }
    assert!(errs[0] <= 1e-5, "well-conditioned W_K with biases must stay within 1e-5: {:.3e}", errs[0]);
    assert!(errs[2] > 10.0 * errs[0], "error should grow with cond: {errs:?}");
}

#[test]
fn ill_conditioned_layer_falls_back_to_a_full_cache() {
    let (_tmp, dir) = synthetic("fallback", &[(2, 1e9)]);
    let m = slim_model(&dir, SlimOptions::default());
    let reports = &m.slim.as_ref().unwrap().reports;
    let slim: Vec<bool> = reports.iter().map(|r| r.slim).collect();
    assert_eq!(slim, [true, true, false, true], "{reports:?}");
    assert!(reports[2].reason.as_deref().unwrap().contains("cond(W_K)"), "{:?}", reports[2].reason);
    assert!(reports[2].cond > 1e8);

    let all = tokens(70);
    let (prompt, forced) = all.split_at(50);
    let want = run(&Model::load(&dir).unwrap(), prompt, forced, 256);
    let got = run(&m, prompt, forced, 256);
    let err = rel_max(&got, &want);
    assert!(err <= 1e-5, "relative logit error {err:.3e}");

    let mut st = m.new_state(256);
    let mut cache = m.new_cache();
    m.forward(&mut st, &mut cache, prompt, Logits::None).unwrap();
    let meta = cache.slim_meta().unwrap();
    // Layer 2: the load-time cond gate; layer 0 (cond 3e4 in the base model): the prefill gate.
    assert_eq!(meta.modes, [SlimMode::Full, SlimMode::Slim, SlimMode::Full, SlimMode::Slim]);
    assert!(meta.val_err[1].unwrap() < 1e-5 && meta.val_err[2].is_none());
    // Layers 0 and 2 hold keys and values per head; the slim layers K only.
    assert_eq!(cache.len(2, 0), 50);
    assert_eq!(cache.len(1, 3), 50);
    let full = {
        let plain = Model::load(&dir).unwrap();
        let mut c = plain.new_cache();
        plain.forward(&mut plain.new_state(256), &mut c, prompt, Logits::None).unwrap();
        c.bytes()
    };
    let per_layer_full = full / 4;
    let shared = 50 * (4 + 16 * 4); // positions + one RoPE row per token
    assert_eq!(cache.bytes(), 2 * per_layer_full + 2 * 50 * 64 * 4 + shared, "2 full layers + 2 K-only layers");
}

#[test]
fn activation_gate_falls_back_and_matches_bit_for_bit() {
    // max_rel_err = 0: every layer fails validation on the first prefill and keeps a normal cache.
    let dir = golden("tiny/llama-mha");
    let m = slim_model(&dir, SlimOptions { max_rel_err: 0.0, ..SlimOptions::default() });
    let all = tokens(50);
    let (prompt, forced) = all.split_at(30);
    let got = run(&m, prompt, forced, 256);
    let want = run(&Model::load(&dir).unwrap(), prompt, forced, 256);
    assert_eq!(got.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
    let mut cache = m.new_cache();
    m.forward(&mut m.new_state(256), &mut cache, prompt, Logits::None).unwrap();
    let meta = cache.slim_meta().unwrap();
    assert!(meta.modes.iter().all(|&x| x == SlimMode::Full));
    assert!(meta.val_err.iter().all(|e| e.unwrap() > 0.0));
    assert_eq!(cache.slim_bytes(), 0);
}

#[test]
fn slim_one_and_two_threads_identical() {
    let (_tmp, dir) = synthetic("threads", &[]);
    let all = tokens(60);
    let (prompt, forced) = all.split_at(40);
    let go = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let m = slim_model(&dir, SlimOptions::default());
            let mut v = run(&m, prompt, forced, 16);
            v.extend(run(&m, prompt, forced, 5));
            v
        })
    };
    let (a, b) = (go(1), go(2));
    assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "1- and 2-thread slim logits differ");
}

#[test]
fn slim_cache_holds_half_the_bytes_and_rolls_back() {
    let dir = golden("tiny/llama-mha");
    // Gate open so that all four layers are K-only.
    let m = slim_model(&dir, SlimOptions { max_rel_err: 1.0, ..SlimOptions::default() });
    let plain = Model::load(&dir).unwrap();
    let prompt = tokens(100);
    let mut c_slim = m.new_cache();
    let mut c_full = plain.new_cache();
    m.forward(&mut m.new_state(256), &mut c_slim, &prompt, Logits::None).unwrap();
    plain.forward(&mut plain.new_state(256), &mut c_full, &prompt, Logits::None).unwrap();
    // Standard: 4 layers × 4 heads × (2·16 floats + a position); slim: 4 layers × 64 floats,
    // plus one position and RoPE row per token shared by all layers.
    assert_eq!(c_full.bytes(), 100 * 4 * 4 * (2 * 16 * 4 + 4));
    assert_eq!(c_slim.bytes(), 100 * (4 * 64 * 4 + 4 + 16 * 4));
    assert_eq!(c_slim.max_len(), 100);
    assert_eq!(c_slim.total_rows(), c_full.total_rows());
    // Roll back to a prefix and continue: same logits as a fresh slim run on the prefix.
    c_slim.truncate_to(60);
    c_slim.check().unwrap();
    let mut st = m.new_state(256);
    m.forward(&mut st, &mut c_slim, &prompt[60..61], Logits::Last).unwrap();
    let a = st.logits.clone();
    let mut c2 = m.new_cache();
    m.forward(&mut st, &mut c2, &prompt[..60], Logits::None).unwrap();
    m.forward(&mut st, &mut c2, &prompt[60..61], Logits::Last).unwrap();
    assert_eq!(a, st.logits);
}

#[test]
fn gqa_and_qk_norm_models_are_refused() {
    let mut m = Model::load(&golden("tiny/llama-gqa")).unwrap();
    let c = &m.config;
    let want = format!(
        "slim attention not applicable: layer 0 caches h_kv·(d_k+d_v) = {0}·({1}+{1}) = {2} values per token, which is ≤ d_model = {3} (GQA)",
        c.n_kv_heads,
        c.head_dim,
        2 * c.n_kv_heads * c.head_dim,
        c.hidden_size
    );
    let err = m.enable_slim(SlimOptions::default()).unwrap_err().to_string();
    assert!(err.starts_with(&want), "{err}");
    assert!(m.slim.is_none());
    let mut q = Model::load(&golden("tiny/qwen3-qknorm")).unwrap();
    let err = q.enable_slim(SlimOptions::default()).unwrap_err().to_string();
    assert!(err.starts_with("slim attention not"), "{err}");
}

#[test]
fn default_model_is_refused_with_the_numbers() {
    let mut m = Model::load(&common::default_model()).unwrap();
    let err = m.enable_slim(SlimOptions::default()).unwrap_err().to_string();
    assert!(
        err.starts_with(
            "slim attention not applicable: layer 0 caches h_kv·(d_k+d_v) = 3·(64+64) = 384 values per token, which is ≤ d_model = 576 (GQA). A K-only cache cannot be smaller."
        ),
        "{err}"
    );
}


#[test]
fn long_context_decode_merges_row_blocks() {
    // kv_dim 256 → 512-row blocks in the slim decode; 700 cached rows span two blocks.
    let tmp = tempfile::tempdir().unwrap();
    let spec = kvcompact::model::synth::SynthSpec { hidden: 256, heads: 4, kv_heads: 4, layers: 2, ff: 64, vocab: 64, max_pos: 1024, seed: 5 };
    kvcompact::model::synth::write_llama(tmp.path(), &spec).unwrap();
    let plain = Model::load(tmp.path()).unwrap();
    let open = SlimOptions { max_cond: 1e12, max_rel_err: f64::INFINITY };
    let m = slim_model(tmp.path(), open);
    let cond = m.slim.as_ref().unwrap().reports.iter().map(|r| r.cond).fold(0.0, f64::max);
    let all: Vec<u32> = (0..712u32).map(|i| 3 + (i * 37 + 11) % 60).collect();
    let (prompt, forced) = all.split_at(700);
    let want = run(&plain, prompt, forced, 256);
    let got = run(&m, prompt, forced, 256);
    let err = rel_max(&got, &want);
    println!("2 layers, max cond {cond:.2e}: max |Δlogit| / max |logit| = {err:.2e}");
    assert!(err <= 16.0 * cond * 2f64.powi(-24), "error {err:.3e} vs cond {cond:.3e}");
    let go = |threads: usize| {
        rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(|| run(&m, prompt, forced, 256))
    };
    assert!(go(1).iter().zip(&go(2)).all(|(x, y)| x.to_bits() == y.to_bits()), "1- and 2-thread slim logits differ");
}
