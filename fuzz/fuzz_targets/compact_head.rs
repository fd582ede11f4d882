//! The `compact-head` input file → compaction with a method and budget picked by the first two
//! bytes → the output file. Bad arrays get one-line errors; good ones give finite outputs.
#![no_main]
use kvcompact::compact::budget::Budget;
use kvcompact::compact::oracle::{compact_head_file, OracleOptions};
use kvcompact_fuzz::{check_error, fresh_dir};
use libfuzzer_sys::fuzz_target;

const METHODS: [&str; 12] = ["am-highest", "am-omp", "am-omp-fast", "baseline", "streaming-llm", "h2o", "snapkv", "pyramidkv", "tova", "knorm", "expected-attention", "random"];

/// Every budget form, edges included (ratio 1, compression ratio 0).
fn pick_budget(b: u8) -> Budget {
    let k = (b / 3) as usize;
    match b % 3 {
        0 => Budget::Rows(1 + k % 16),
        1 => Budget::Ratio(1.0 + k as f64 / 8.0),
        _ => Budget::CompressionRatio(k as f64 / 86.0),
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let method = METHODS[data[0] as usize % METHODS.len()];
    let budget = pick_budget(data[1]);
    let dir = fresh_dir("head");
    let (input, output) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    std::fs::write(&input, &data[2..]).expect("write the input");
    let opts = OracleOptions { method: method.to_string(), budget, ..OracleOptions::default() };
    match compact_head_file(&input, &output, &opts) {
        Ok(r) => {
            if let Budget::Rows(n) = budget {
                assert!(r.kept <= n, "{method} kept {} rows for a budget of {n}", r.kept);
            }
            if let Some(e) = r.rel_l2 {
                assert!(e.is_finite(), "{method}: rel_l2 {e} on finite inputs");
            }
        }
        Err(e) => check_error(&e),
    }
});
