//! Writes the committed seed corpora under `fuzz/seeds/<target>/` (rerun after a format change:
//! `cargo run --release --bin make_seeds` from `fuzz/`). The GGUF seed comes from
//! `tests/gguf.rs` (`KVCOMPACT_BLESS=1`), which owns the toy GGUF writer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use kvcompact::cache::file::save_cache;
use kvcompact::cache::HeadRows;
use kvcompact::model::synth::{write_llama, SynthSpec};
use kvcompact::tensor_file::{save_safetensors, OutTensor};
use kvcompact_fuzz::{join, tiny_model, tiny_spec};

fn seeds(target: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").join(target);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// Deterministic values in [-1, 1).
fn vals(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32).map(|i| ((i.wrapping_mul(2654435761) ^ seed.wrapping_mul(40503)) % 2000) as f32 / 1000.0 - 1.0).collect()
}

fn main() {
    // config: every tiny golden architecture.
    let tiny = ["llama-gqa", "llama-mha", "mistral", "qwen2-bias", "qwen3-qknorm"];
    for name in tiny {
        std::fs::copy(repo(&format!("golden/tiny/{name}/config.json")), seeds("config").join(format!("{name}.json"))).unwrap();
    }

    // model_dir: the tiny synthetic model, and a one-layer MHA variant.
    for (name, spec) in [("tiny", tiny_spec()), ("mha", SynthSpec { hidden: 8, heads: 2, kv_heads: 2, layers: 1, ff: 8, vocab: 8, max_pos: 8, seed: 3 })] {
        let dir = tempfile::tempdir().unwrap();
        write_llama(dir.path(), &spec).unwrap();
        let config = std::fs::read(dir.path().join("config.json")).unwrap();
        let weights = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        std::fs::write(seeds("model_dir").join(name), join(&config, &weights)).unwrap();
    }

    // cache_file: the tiny model's cache after a short prompt, whole and compacted (rows dropped,
    // a β per kept row).
    let model = tiny_model();
    let mut state = model.new_state(8);
    let mut cache = model.new_cache();
    model.forward_last(&mut state, &mut cache, &[1, 5, 9, 3, 7, 2]).unwrap();
    let id = model.cache_id();
    save_cache(&seeds("cache_file").join("full"), &id, &cache, false, &serde_json::json!({"method": "full"})).unwrap();
    for l in 0..cache.n_layers {
        for h in 0..cache.n_kv_heads {
            let (k, v, _, pos) = cache.head(l, h);
            let hd = cache.head_dim;
            let keep = [0usize, 3, 5];
            let rows = HeadRows {
                keys: keep.iter().flat_map(|&i| k[i * hd..(i + 1) * hd].to_vec()).collect(),
                values: keep.iter().flat_map(|&i| v[i * hd..(i + 1) * hd].to_vec()).collect(),
                positions: keep.iter().map(|&i| pos[i]).collect(),
                bias: Some(vec![0.5, -1.0, 0.25]),
            };
            cache.replace_head(l, h, rows).unwrap();
        }
    }
    save_cache(&seeds("cache_file").join("compacted"), &id, &cache, true, &serde_json::json!({"method": "am-highest", "ratio": 2.0})).unwrap();

    // compact_head: [method byte, budget byte] + an input file, with and without the optional arrays.
    let (t, d, n) = (12usize, 4usize, 6usize);
    let (keys, values, queries, test, bias) = (vals(t * d, 1), vals(t * d, 2), vals(n * d, 3), vals(3 * d, 4), vals(t, 5));
    let positions: Vec<i64> = (0..t as i64).map(|i| 2 * i).collect();
    let scale = [0.5f32];
    let full = vec![
        OutTensor::F32 { name: "keys", shape: vec![t, d], data: &keys },
        OutTensor::F32 { name: "values", shape: vec![t, d], data: &values },
        OutTensor::F32 { name: "queries", shape: vec![n, d], data: &queries },
        OutTensor::F32 { name: "test_queries", shape: vec![3, d], data: &test },
        OutTensor::F32 { name: "bias", shape: vec![t], data: &bias },
        OutTensor::I64 { name: "positions", shape: vec![t], data: &positions },
        OutTensor::F32 { name: "scale", shape: vec![1], data: &scale },
    ];
    for (name, tensors, method, budget) in [("full-omp", &full[..], 1u8, 4u8), ("minimal-highest", &full[..3], 0, 2), ("full-snapkv", &full[..], 6, 5)] {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.safetensors");
        save_safetensors(&p, tensors, Some(HashMap::new())).unwrap();
        let mut bytes = vec![method, budget];
        bytes.extend(std::fs::read(&p).unwrap());
        std::fs::write(seeds("compact_head").join(name), bytes).unwrap();
    }

    // chat_template: the tiny golden model's template, and the shapes of the real ones.
    let tc: serde_json::Value = serde_json::from_slice(&std::fs::read(repo("golden/tiny/llama-gqa/tokenizer_config.json")).unwrap()).unwrap();
    let mut templates = vec![("golden-tiny", tc["chat_template"].as_str().unwrap_or("").to_string())];
    templates.push(("loop", "{% for m in messages %}{% for i in range(3) %}{{ m.role }}:{{ m.content | trim }}{% endfor %}{% endfor %}".into()));
    templates.push(("raise", "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}".into()));
    templates.push(("macro", "{% macro f(x) %}{{ x.upper() }}{% endmacro %}{% for m in messages %}{{ f(m.content) }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}{{ bos_token }}{% endif %}".into()));
    for (name, tpl) in templates {
        std::fs::write(seeds("chat_template").join(name), join(tpl.as_bytes(), b"What is 2 + 2?")).unwrap();
    }

    // serve_request: [route byte] + body.
    let bodies: [(&str, u8, &str); 6] = [
        ("chat", 0, r#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":4}"#),
        ("chat-stream", 0, r#"{"messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hi"}]}],"max_tokens":3,"stream":true,"stream_options":{"include_usage":true},"stop":["x","y"],"temperature":0.7,"top_p":0.9,"seed":3}"#),
        ("completion", 1, r#"{"prompt":"Once upon","max_tokens":5,"ignore_eos":true}"#),
        ("completion-ids", 1, r#"{"prompt":[1,5,9],"max_tokens":2,"temperature":0}"#),
        ("document", 2, r#"{"text":"The code is 4417. The river is long and the city is old.","ratio":2}"#),
        ("chat-compaction", 3, r#"{"messages":[{"role":"user","content":"hello there"}],"max_tokens":4,"kvcompact":{"compaction":{"method":"am-highest","ratio":2}}}"#),
    ];
    for (name, route, body) in bodies {
        let mut b = vec![route];
        b.extend_from_slice(body.as_bytes());
        std::fs::write(seeds("serve_request").join(name), b).unwrap();
    }
    println!("seeds written under {}", Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds").display());
}
