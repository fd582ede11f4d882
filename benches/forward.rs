//! End-to-end forward pass on the default model (prefill 128 tokens; one decode step at a
//! 128-token context). Needs the converted default model (`kvcompact fetch-model`); set
//! KVCOMPACT_MODEL to bench another directory. For side-by-side numbers with llama.cpp use
//! `kvcompact bench` and `benches/llama_cpp_compare.sh`.

use divan::Bencher;
use kvcompact::model::{Logits, Model};

fn main() {
    divan::main();
}

fn model() -> Model {
    let dir = std::env::var_os("KVCOMPACT_MODEL")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2-135m-instruct"));
    Model::load(&dir).unwrap_or_else(|e| panic!("{e}: run `cargo run --release -- fetch-model` first"))
}

fn prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 256 + (i * 7919) % (vocab as u32 - 256)).collect()
}

#[divan::bench(sample_count = 10)]
fn prefill_128(b: Bencher) {
    let m = model();
    let p = prompt(128, m.config.vocab_size);
    let mut st = m.new_state(256);
    b.bench_local(|| {
        let mut c = m.new_cache();
        m.forward(&mut st, &mut c, &p, Logits::Last).unwrap();
    });
}

#[divan::bench(sample_count = 20)]
fn decode_step_ctx128(b: Bencher) {
    let m = model();
    let p = prompt(128, m.config.vocab_size);
    let mut st = m.new_state(256);
    let mut c = m.new_cache();
    m.forward(&mut st, &mut c, &p, Logits::Last).unwrap();
    b.bench_local(|| {
        m.forward(&mut st, &mut c, &[300], Logits::Last).unwrap();
        c.truncate_to(128);
    });
}
