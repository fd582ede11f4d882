//! Tiny random-weight models (golden/tiny/*) against HF transformers f32: logits at every
//! position, every layer's output, the final norm, and a 24-step greedy decode with its logits.
//! Tolerance: max |Δ| ≤ 1e-4 (golden/manifest.json).

mod common;

use common::{golden, Golden};
use kvcompact::compare::compare;
use kvcompact::model::{Capture, Logits, Model};

const TOL: f64 = 1e-4;
const MODELS: [&str; 5] = ["llama-mha", "llama-gqa", "qwen2-bias", "qwen3-qknorm", "mistral"];

fn check_prefill(name: &str, max_batch: usize) {
    let dir = golden(&format!("tiny/{name}"));
    let g = Golden::load(&dir.join("golden.safetensors"));
    let model = Model::load(&dir).unwrap();
    let tokens = g.ids("tokens");
    let mut st = model.new_state(max_batch);
    st.capture = Some(Capture::hidden());
    let mut cache = model.new_cache();
    model.forward(&mut st, &mut cache, &tokens, Logits::All).unwrap();
    let cap = st.capture.take().unwrap();
    let mut reports = vec![compare(&format!("{name} logits (batch {max_batch})"), &st.logits, g.f32("logits"), TOL)];
    for l in 0..model.config.n_layers {
        reports.push(compare(&format!("{name} hidden.{l}"), &cap.hidden[l], g.f32(&format!("hidden.{l}")), TOL));
    }
    reports.push(compare(&format!("{name} final_norm"), &cap.final_norm, g.f32("final_norm"), TOL));
    for r in &reports {
        println!("{r}");
    }
    for r in &reports {
        r.assert_ok();
    }
    cache.check().unwrap();
    assert_eq!(cache.next_pos(), tokens.len());
}

fn check_greedy(name: &str) {
    let dir = golden(&format!("tiny/{name}"));
    let g = Golden::load(&dir.join("golden.safetensors"));
    let model = Model::load(&dir).unwrap();
    let tokens = g.ids("tokens");
    let want = g.ids("greedy");
    let want_logits = g.f32("greedy_logits");
    let vocab = model.config.vocab_size;
    let mut st = model.new_state(16);
    let mut cache = model.new_cache();
    model.forward(&mut st, &mut cache, &tokens, Logits::Last).unwrap();
    let mut got = Vec::new();
    for step in 0..want.len() {
        let r = compare(&format!("{name} greedy step {step} logits"), &st.logits, &want_logits[step * vocab..(step + 1) * vocab], TOL);
        r.assert_ok();
        let next = kvcompact_kernels::argmax(&st.logits) as u32;
        got.push(next);
        model.forward(&mut st, &mut cache, &[next], Logits::Last).unwrap();
    }
    assert_eq!(got, want, "{name}: greedy tokens differ from transformers");
}

#[test]
fn tiny_models_match_transformers_prefill() {
    for m in MODELS {
        check_prefill(m, 256);
    }
}

#[test]
fn tiny_models_match_transformers_in_small_chunks() {
    // 40 tokens in chunks of 7: later chunks attend to the cache the earlier ones filled.
    for m in MODELS {
        check_prefill(m, 7);
    }
}

#[test]
fn tiny_models_match_transformers_greedy_decode() {
    for m in MODELS {
        check_greedy(m);
    }
}
