//! A compacted-cache file from strangers, for the tiny model → load (fingerprint, shapes,
//! positions, β checked) → one decode step on it.
#![no_main]
use kvcompact::cache::file::load_cache;
use kvcompact_fuzz::{check_error, fresh_dir, tiny_model};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let model = tiny_model();
    let path = fresh_dir("cache").join("in.safetensors");
    std::fs::write(&path, data).expect("write the input");
    let mut loaded = match load_cache(&path, &model.cache_id()) {
        Ok(c) => c,
        Err(e) => return check_error(&e),
    };
    let mut state = model.new_state(1);
    match model.forward_last(&mut state, &mut loaded.cache, &[1]) {
        Ok(logits) => assert!(logits.iter().all(|x| x.is_finite()), "a checked cache gave non-finite logits"),
        Err(e) => check_error(&e),
    }
});
