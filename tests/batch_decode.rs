//! Batch invariance of the server's decode step: `Model::decode_batch` gives every sequence the
//! same logits, bit for bit, as decoding it alone with `Model::forward` — whatever else is in the
//! batch, in any order, at 1 and 2 threads, for caches of different lengths, a compacted cache
//! with β, and every tiny architecture (GQA, MHA, biases, q/k norm, sliding window).

mod common;

use common::golden;
use kvcompact::cache::KvCache;
use kvcompact::compact::{compressor_from_name, Budget};
use kvcompact::document::{compact_context, CompactOptions, ContextLayout};
use kvcompact::model::{Logits, Model};
use kvcompact::tokenizer::Tokenizer;

/// Prefill `prompt` into a fresh cache.
fn prefilled(m: &Model, prompt: &[u32]) -> KvCache {
    let mut st = m.new_state(64);
    let mut c = m.new_cache();
    m.forward(&mut st, &mut c, prompt, Logits::None).unwrap();
    c
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Decode `steps` tokens for each (cache, first token) alone, recording logits per step.
fn alone(m: &Model, caches: &[KvCache], firsts: &[u32], steps: usize) -> Vec<Vec<Vec<u32>>> {
    let mut st = m.new_state(64);
    caches
        .iter()
        .zip(firsts)
        .map(|(c, &t0)| {
            let mut c = c.clone();
            let mut t = t0;
            (0..steps)
                .map(|_| {
                    m.forward(&mut st, &mut c, &[t], Logits::Last).unwrap();
                    t = kvcompact_kernels::argmax(&st.logits) as u32;
                    bits(&st.logits)
                })
                .collect()
        })
        .collect()
}

/// The same sequences decoded together, in the order `order`, greedy, for `steps` steps.
fn together(m: &Model, caches: &[KvCache], firsts: &[u32], order: &[usize], steps: usize) -> Vec<Vec<Vec<u32>>> {
    let vocab = m.config.vocab_size;
    let mut st = m.new_state(16);
    let mut cs: Vec<KvCache> = order.iter().map(|&i| caches[i].clone()).collect();
    let mut toks: Vec<u32> = order.iter().map(|&i| firsts[i]).collect();
    let mut out = vec![Vec::new(); caches.len()];
    for _ in 0..steps {
        let mut refs: Vec<&mut KvCache> = cs.iter_mut().collect();
        m.decode_batch(&mut st, &mut refs, &toks).unwrap();
        for (k, &i) in order.iter().enumerate() {
            let row = &st.logits[k * vocab..(k + 1) * vocab];
            out[i].push(bits(row));
            toks[k] = kvcompact_kernels::argmax(row) as u32;
        }
    }
    out
}

fn check_model(name: &str) {
    let dir = golden(&format!("tiny/{name}"));
    let m = Model::load(&dir).unwrap();
    let v = m.config.vocab_size as u32;
    let prompt = |n: usize, s: u32| (0..n as u32).map(|i| (i * 7 + s) % v).collect::<Vec<u32>>();
    let mut caches = vec![prefilled(&m, &prompt(5, 1)), prefilled(&m, &prompt(37, 2)), prefilled(&m, &prompt(1, 3)), prefilled(&m, &prompt(90, 4))];
    // A compacted cache (rows with β, positions with gaps) in the same batch.
    let tok = Tokenizer::load(&dir, &m.config).unwrap();
    let layout = ContextLayout::build(&tok, "The river survey counted forty-one herons along the north bank in May.", false).unwrap();
    let method = compressor_from_name("am-highest").unwrap();
    let opts = CompactOptions { budget: Budget::Ratio(3.0), n_queries: 64, n_test: 8, ..Default::default() };
    let (compacted, _) = compact_context(&m, &tok, &layout, &method, &opts).unwrap();
    assert!((0..m.config.n_layers).any(|l| compacted.meta(l, 0).bias.is_some()), "{name}: the compacted cache should carry β");
    caches.push(compacted);
    let firsts: Vec<u32> = (0..caches.len() as u32).map(|i| (11 * i + 3) % v).collect();
    let steps = 6;
    let want = alone(&m, &caches, &firsts, steps);
    for order in [vec![0, 1, 2, 3, 4], vec![4, 2, 0, 3, 1], vec![3, 4]] {
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let got = pool.install(|| together(&m, &caches, &firsts, &order, steps));
            for &i in &order {
                for s in 0..steps {
                    assert!(got[i][s] == want[i][s], "{name}: sequence {i} step {s} differs in batch {order:?} at {threads} threads");
                }
            }
        }
    }
    // Alone in a batch of one is the same as well.
    let one = together(&m, &caches, &firsts, &[1], steps);
    assert!(one[1] == want[1], "{name}: batch of one");
}

#[test]
fn decode_batch_is_bit_identical_to_decoding_alone() {
    for name in ["llama-gqa", "llama-mha", "qwen2-bias", "qwen3-qknorm", "mistral"] {
        check_model(name);
    }
}

#[test]
fn decode_batch_refuses_bad_input() {
    let m = Model::load(&golden("tiny/llama-gqa")).unwrap();
    let mut st = m.new_state(2);
    let mut a = m.new_cache();
    let mut b = m.new_cache();
    let mut c = m.new_cache();
    let v = m.config.vocab_size as u32;
    let e = m.decode_batch(&mut st, &mut [&mut a, &mut b, &mut c], &[1, 2, 3]).unwrap_err().to_string();
    assert!(e.contains("exceed"), "{e}");
    let e = m.decode_batch(&mut st, &mut [&mut a], &[v]).unwrap_err().to_string();
    assert!(e.contains("vocabulary"), "{e}");
    let e = m.decode_batch(&mut st, &mut [&mut a, &mut b], &[1]).unwrap_err().to_string();
    assert!(e.contains("caches"), "{e}");
}
