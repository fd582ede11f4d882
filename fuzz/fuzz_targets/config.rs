//! `config.json` bytes → parse → normalised `Config` (every derived size checked).
#![no_main]
use std::path::Path;

use kvcompact::model::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    match Config::from_json(&v, Path::new("config.json")) {
        Ok(c) => {
            // What a loaded config promises: its derived sizes fit.
            let _ = (c.q_dim(), c.kv_dim(), c.kv_bytes_per_token(), c.group_size(), c.attn_scale());
        }
        Err(e) => kvcompact_fuzz::check_error(&e),
    }
});
