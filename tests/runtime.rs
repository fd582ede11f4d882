//! Runtime properties that need no oracle: sharded checkpoints load the same model, bf16/f16
//! weights are widened exactly (same values stored as f32 give the same logits), results are
//! bit-identical at 1 and 2 threads, prefill chunking does not change logits, and the KV cache
//! verbs keep positions and the logical counter right across a forward pass.

mod common;

use std::path::Path;

use common::golden;
use kvcompact::cache::{KvCache, KvDtype, KvRows};
use kvcompact::model::{Logits, Model};
use kvcompact::tensor_file::{load_safetensors, save_safetensors, OutTensor, TensorData, WDtype};

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

fn logits(dir: &Path, tokens: &[u32], max_batch: usize) -> Vec<f32> {
    let m = Model::load(dir).unwrap();
    let mut st = m.new_state(max_batch);
    let mut c = m.new_cache();
    m.forward(&mut st, &mut c, tokens, Logits::All).unwrap();
    st.logits.clone()
}

fn tokens(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 3 + (i * 37 + 11) % 380).collect()
}

#[test]
fn sharded_checkpoint_gives_identical_logits() {
    let src = golden("tiny/llama-gqa");
    let t = tempfile::tempdir().unwrap();
    copy_dir(&src, t.path());
    std::fs::remove_file(t.path().join("model.safetensors")).unwrap();
    let all = load_safetensors(&src.join("model.safetensors")).unwrap();
    let mut names: Vec<&String> = all.keys().collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        let outs: Vec<OutTensor> = part
            .iter()
            .map(|n| match &all[*n] {
                (sh, TensorData::F32(v)) => OutTensor::F32 { name: n, shape: sh.clone(), data: v },
                _ => unreachable!(),
            })
            .collect();
        save_safetensors(&t.path().join(file), &outs, None).unwrap();
        for n in part {
            map.insert(n.to_string(), serde_json::Value::String(file.into()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(t.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let toks = tokens(20);
    assert_eq!(logits(&src, &toks, 64), logits(t.path(), &toks, 64));
}

/// Store every matrix as bf16 (or f16) and, separately, the same rounded values as f32:
/// both directories must give the same logits up to f32 summation-order noise.
fn half_matches_f32(dtype: WDtype) {
    let src = golden("tiny/qwen2-bias");
    let all = load_safetensors(&src.join("model.safetensors")).unwrap();
    let (th, tf) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    copy_dir(&src, th.path());
    copy_dir(&src, tf.path());
    let mut halves: Vec<(String, Vec<usize>, Vec<u16>)> = Vec::new();
    let mut rounded: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    for (n, (sh, d)) in &all {
        let TensorData::F32(v) = d else { unreachable!() };
        let bits: Vec<u16> = match dtype {
            WDtype::Bf16 => v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect(),
            _ => v.iter().map(|&x| half::f16::from_f32(x).to_bits()).collect(),
        };
        let back: Vec<f32> = match dtype {
            WDtype::Bf16 => bits.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect(),
            _ => bits.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect(),
        };
        halves.push((n.clone(), sh.clone(), bits));
        rounded.push((n.clone(), sh.clone(), back));
    }
    let hs: Vec<OutTensor> = halves.iter().map(|(n, sh, b)| OutTensor::Half { name: n, shape: sh.clone(), data: b, dtype }).collect();
    save_safetensors(&th.path().join("model.safetensors"), &hs, None).unwrap();
    let fs: Vec<OutTensor> = rounded.iter().map(|(n, sh, v)| OutTensor::F32 { name: n, shape: sh.clone(), data: v }).collect();
    save_safetensors(&tf.path().join("model.safetensors"), &fs, None).unwrap();

    let m = Model::load(th.path()).unwrap();
    assert_eq!(m.weights.dtype(), dtype);
    let toks = tokens(33);
    // Both the GEMM (prefill) and GEMV (decode) paths.
    for batch in [64, 1] {
        let (a, b) = (logits(th.path(), &toks, batch), logits(tf.path(), &toks, batch));
        let r = kvcompact::compare::compare(&format!("{} vs f32 (batch {batch})", dtype.name()), &a, &b, 1e-5);
        println!("{r}");
        r.assert_ok();
    }
}

#[test]
fn bf16_weights_are_widened_exactly() {
    half_matches_f32(WDtype::Bf16);
}

#[test]
fn f16_weights_are_widened_exactly() {
    half_matches_f32(WDtype::F16);
}

fn same_bits_at_1_2_and_3_threads(dir: &Path, what: &str) {
    let toks = tokens(50);
    let run = |threads: usize, batch: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| logits(dir, &toks, batch))
    };
    for batch in [256, 1] {
        let a = run(1, batch);
        for t in [2, 3] {
            let b = run(t, batch);
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{what}, batch {batch}: 1- and {t}-thread logits differ");
        }
    }
}

#[test]
fn one_and_two_threads_give_identical_bits() {
    same_bits_at_1_2_and_3_threads(&golden("tiny/llama-mha"), "f32");
}

/// The bf16 prefill widens weight tiles on every thread; the tile split depends on the matrix
/// only, so the bits do not depend on the thread count either.
#[test]
fn bf16_one_and_two_threads_give_identical_bits() {
    let src = golden("tiny/llama-mha");
    let all = load_safetensors(&src.join("model.safetensors")).unwrap();
    let t = tempfile::tempdir().unwrap();
    copy_dir(&src, t.path());
    let halves: Vec<(String, Vec<usize>, Vec<u16>)> = all
        .iter()
        .map(|(n, (sh, d))| {
            let TensorData::F32(v) = d else { unreachable!() };
            (n.clone(), sh.clone(), v.iter().map(|&x| half::bf16::from_f32(x).to_bits()).collect())
        })
        .collect();
    let hs: Vec<OutTensor> = halves.iter().map(|(n, sh, b)| OutTensor::Half { name: n, shape: sh.clone(), data: b, dtype: WDtype::Bf16 }).collect();
    save_safetensors(&t.path().join("model.safetensors"), &hs, None).unwrap();
    same_bits_at_1_2_and_3_threads(t.path(), "bf16");
}

fn run_kv(dir: &Path, tokens: &[u32], dtype: KvDtype, threads: usize, max_batch: usize) -> (Vec<f32>, KvCache) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    pool.install(|| {
        let mut m = Model::load(dir).unwrap();
        m.set_kv_dtype(dtype).unwrap();
        let mut st = m.new_state(max_batch);
        let mut c = m.new_cache();
        m.forward(&mut st, &mut c, tokens, Logits::All).unwrap();
        (st.logits.clone(), c)
    })
}

fn row_bits(r: &KvRows) -> Vec<u32> {
    match r {
        KvRows::F32(v) => v.iter().map(|x| x.to_bits()).collect(),
        KvRows::Bf16(v) => v.iter().map(|&x| x as u32).collect(),
    }
}

/// A bf16 KV cache: rows are the f32 rows rounded once (layer 0, whose inputs do not depend on
/// the cache, stores exactly the f32 cache's rows rounded), conversion both ways is exact, the
/// bytes are K/V at 2 bytes plus the positions, the logits stay within bf16 rounding of the f32
/// cache's (and differ from them: the rounding happens), and the bits do not depend on the
/// thread count, in prefill and in one-token decode.
#[test]
fn bf16_kv_cache_rounds_rows_once() {
    let dir = golden("tiny/llama-gqa");
    let toks = tokens(45);
    let (l32, c32) = run_kv(&dir, &toks, KvDtype::F32, 1, 256);
    let (l16, c16) = run_kv(&dir, &toks, KvDtype::Bf16, 1, 256);
    c16.check().unwrap();
    assert_eq!(c16.dtype(), KvDtype::Bf16);
    let rounded = c32.clone().into_dtype(KvDtype::Bf16);
    for h in 0..c16.n_kv_heads {
        let (a, b) = (c16.store(0, h), rounded.store(0, h));
        assert_eq!(row_bits(&a.keys), row_bits(&b.keys), "layer 0 head {h} keys");
        assert_eq!(row_bits(&a.values), row_bits(&b.values), "layer 0 head {h} values");
    }
    let back = c16.clone().into_dtype(KvDtype::F32).into_dtype(KvDtype::Bf16);
    for l in 0..c16.n_layers {
        for h in 0..c16.n_kv_heads {
            assert_eq!(row_bits(&back.store(l, h).keys), row_bits(&c16.store(l, h).keys));
            assert_eq!(row_bits(&back.store(l, h).values), row_bits(&c16.store(l, h).values));
        }
    }
    let rows = c16.total_rows();
    assert_eq!(c16.bytes(), rows * (2 * c16.head_dim * 2 + 4));
    assert_eq!(c32.bytes(), rows * (2 * c32.head_dim * 4 + 4));
    // Measured on this model: max |Δ| 0.10, NMSE 3.5e-5 (random tiny weights amplify rounding).
    let r = kvcompact::compare::compare("bf16 KV vs f32 KV logits", &l16, &l32, 0.3);
    eprintln!("{r}");
    r.assert_ok();
    assert!(r.nmse < 2e-4 && r.max_abs > 0.0, "{r}");
    for (threads, batch) in [(2, 256), (3, 256), (1, 1), (2, 1), (3, 1)] {
        let (l, _) = run_kv(&dir, &toks, KvDtype::Bf16, threads, batch);
        let want = if batch == 1 { run_kv(&dir, &toks, KvDtype::Bf16, 1, 1).0 } else { l16.clone() };
        assert!(l.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "bf16 KV, batch {batch}: 1- and {threads}-thread logits differ");
    }
}

#[test]
fn chunked_prefill_matches_one_shot() {
    let dir = golden("tiny/llama-gqa");
    let toks = tokens(45);
    let whole = logits(&dir, &toks, 256);
    // Chunks of 1 use the GEMV kernel instead of GEMM: a different summation order, so the
    // budget is f32 noise over 4 layers (|logits| ≤ ~10), not bit equality.
    for batch in [1, 2, 13] {
        let r = kvcompact::compare::compare(&format!("chunks of {batch}"), &logits(&dir, &toks, batch), &whole, 1e-4);
        r.assert_ok();
    }
}

#[test]
fn cache_positions_and_rollback_after_forward() {
    let dir = golden("tiny/llama-gqa");
    let m = Model::load(&dir).unwrap();
    let mut st = m.new_state(8);
    let mut c = m.new_cache();
    let toks = tokens(20);
    m.forward(&mut st, &mut c, &toks[..12], Logits::None).unwrap();
    assert_eq!(c.next_pos(), 12);
    c.check().unwrap();
    for l in 0..m.config.n_layers {
        for h in 0..m.config.n_kv_heads {
            assert_eq!(c.meta(l, h).positions, (0..12).collect::<Vec<u32>>());
        }
    }
    // Continue, roll back to 12, continue again: the same logits both times.
    m.forward(&mut st, &mut c, &toks[12..], Logits::Last).unwrap();
    let first = st.logits.clone();
    c.truncate_to(12);
    assert_eq!((c.next_pos(), c.max_len()), (12, 12));
    m.forward(&mut st, &mut c, &toks[12..], Logits::Last).unwrap();
    assert_eq!(first, st.logits);
    assert_eq!(c.bytes(), 20 * m.config.n_layers * m.config.n_kv_heads * (2 * m.config.head_dim * 4 + 4));
}

/// `layer_queries` (the queries alone, as the last layer's query extraction and on-policy
/// compaction take them) gives the same bits as the queries a full `layer` call writes, for one
/// token and for a chunk, with a prefix already in the cache.
#[test]
fn layer_queries_equal_the_full_layer_s() {
    let dir = golden("tiny/qwen2-bias");
    let m = Model::load(&dir).unwrap();
    let toks = tokens(40);
    for n in [1usize, 23] {
        let mut st = m.new_state(64);
        let mut c = m.new_cache();
        m.forward(&mut st, &mut c, &toks[..17], Logits::None).unwrap();
        let chunk = &toks[17..17 + n];
        for l in 0..m.config.n_layers {
            m.embed(&mut st, chunk);
            m.prepare_positions(&mut st, n, 17);
            let x = m.residual(&mut st, n).to_vec();
            let alone = m.layer_queries(l, &mut st, n).to_vec();
            m.residual(&mut st, n).copy_from_slice(&x);
            m.layer(l, &mut st, &mut c, n);
            let full = m.last_queries(&st, n);
            assert!(alone.iter().zip(full).all(|(a, b)| a.to_bits() == b.to_bits()), "layer {l}, n {n}: queries differ");
            c.truncate_layer_to(l, 17);
        }
    }
}
