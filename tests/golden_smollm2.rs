//! SmolLM2-135M-Instruct (f32, converted from the default GGUF) against HF transformers f32
//! loading the same GGUF: tokenization, logits at three positions per prompt (max |Δ| ≤ 2e-3)
//! and 64-step greedy continuations (identical tokens). Prompts: golden/smollm2/prompts/.

mod common;

use common::{default_model, golden, Golden};
use kvcompact::compare::compare;
use kvcompact::model::{Logits, Model, DEFAULT_MAX_BATCH};
use kvcompact::tokenizer::{Message, Tokenizer};

const TOL: f64 = 2e-3;

fn cases() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(golden("smollm2"))
        .expect("golden/smollm2 exists")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".safetensors").map(String::from))
        .collect();
    v.sort();
    assert!(v.len() >= 5, "expected ≥ 5 golden prompts, found {v:?}");
    v
}

fn prompt_text(case: &str) -> String {
    std::fs::read_to_string(golden(&format!("smollm2/prompts/{case}.txt"))).unwrap()
}

/// Check one prompt: tokens, logits at the golden positions (prefilled in segments that end at
/// those positions, which also exercises chunked prefill), then 64 greedy steps.
fn check_case(model: &Model, tok: &Tokenizer, case: &str) {
    let g = Golden::load(&golden(&format!("smollm2/{case}.safetensors")));
    let want_tokens = g.ids("tokens");
    let text = prompt_text(case);
    let chat_json = golden(&format!("smollm2/prompts/{case}.messages.json"));
    let ids = if chat_json.exists() {
        // The chat case: our rendering of the messages must equal transformers' rendering.
        let msgs: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(&chat_json).unwrap()).unwrap();
        let msgs: Vec<Message> = msgs
            .iter()
            .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let rendered = tok.render_chat(&msgs, true).unwrap();
        assert_eq!(rendered, text, "{case}: chat template rendering differs from transformers");
        tok.encode(&rendered, false).unwrap()
    } else {
        tok.encode(&text, true).unwrap()
    };
    assert_eq!(ids, want_tokens, "{case}: token ids differ from transformers");

    let positions: Vec<usize> = g.ids("logit_positions").iter().map(|&p| p as usize).collect();
    let want_logits = g.f32("logits");
    let vocab = model.config.vocab_size;
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let mut cache = model.new_cache();
    let mut done = 0;
    for (k, &p) in positions.iter().enumerate() {
        assert!(p >= done, "logit positions must be increasing");
        model.forward(&mut st, &mut cache, &ids[done..=p], Logits::Last).unwrap();
        done = p + 1;
        let r = compare(&format!("{case} logits@{p}"), &st.logits, &want_logits[k * vocab..(k + 1) * vocab], TOL);
        println!("{r}");
        r.assert_ok();
    }
    if done < ids.len() {
        model.forward(&mut st, &mut cache, &ids[done..], Logits::Last).unwrap();
    }

    let want = g.ids("greedy");
    let margins = g.f32("greedy_margin");
    let mut got = Vec::with_capacity(want.len());
    for _ in 0..want.len() {
        let next = kvcompact_kernels::argmax(&st.logits) as u32;
        got.push(next);
        model.forward(&mut st, &mut cache, &[next], Logits::Last).unwrap();
    }
    if let Some(i) = got.iter().zip(&want).position(|(a, b)| a != b) {
        panic!(
            "{case}: greedy token {i} is {} but transformers chose {} (its top1−top2 margin there: {}); got {:?}",
            got[i], want[i], margins[i], tok.decode(&got, false).unwrap()
        );
    }
    println!("{case}: {} prompt tokens, 64 greedy tokens identical: {:?}", ids.len(), tok.decode(&got, false).unwrap());
}

#[test]
fn smollm2_matches_transformers() {
    let dir = default_model();
    let model = Model::load(&dir).unwrap();
    let tok = Tokenizer::load(&dir, &model.config).unwrap();
    for case in cases() {
        check_case(&model, &tok, &case);
    }
}

#[test]
fn smollm2_sanity_paris() {
    // models-and-data.md §7: the minimum bar.
    let dir = default_model();
    let model = Model::load(&dir).unwrap();
    let tok = Tokenizer::load(&dir, &model.config).unwrap();
    let ids = tok.encode("The capital of France is", true).unwrap();
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
    let mut st = model.new_state(8);
    let mut cache = model.new_cache();
    let mut sampler = kvcompact::sampling::Sampler::new(0.0, 1.0, 0);
    let opts = kvcompact::generate::GenOptions { max_tokens: 64, stop_at_eos: true };
    let out = kvcompact::generate::generate(&model, &mut st, &mut cache, &ids, &tok.eos_ids, &mut sampler, &opts, |_| Ok(())).unwrap();
    let text = tok.decode(&out.tokens, false).unwrap();
    assert_eq!(text, " Paris.\n\nThe answer is: 2018-01-22 12:12:53.<|im_end|>");
    assert_eq!(out.stop, "eos");
}
