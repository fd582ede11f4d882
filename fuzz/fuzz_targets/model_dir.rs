//! A model directory from strangers: `[config len][config.json][model.safetensors]` → load →
//! one prefill and one decode step. Loads or errs in one line; never panics or over-allocates.
#![no_main]
use kvcompact::model::Model;
use kvcompact_fuzz::{check_error, fresh_dir, split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (config, weights) = split(data);
    let dir = fresh_dir("model");
    std::fs::write(dir.join("config.json"), config).expect("write config");
    std::fs::write(dir.join("model.safetensors"), weights).expect("write weights");
    let model = match Model::load(&dir) {
        Ok(m) => m,
        Err(e) => return check_error(&e),
    };
    let mut state = model.new_state(4);
    let mut cache = model.new_cache();
    let n = model.config.max_position_embeddings.min(3);
    let prompt: Vec<u32> = (0..n as u32).map(|i| i % model.config.vocab_size as u32).collect();
    for tokens in [&prompt[..], &[0u32][..]] {
        match model.forward_last(&mut state, &mut cache, tokens) {
            Ok(logits) => assert_eq!(logits.len(), model.config.vocab_size),
            Err(e) => return check_error(&e),
        }
    }
});
