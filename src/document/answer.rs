//! Answering questions about a cached context, rolling the cache back afterwards.

use crate::cache::KvCache;
use crate::error::Result;
use crate::model::{Logits, Model, RunState};

/// Greedy answer (at most `max_tokens`, stopping at end of turn) to `question_ids` asked after
/// the context in `cache`; the cache is rolled back to the context afterwards.
pub fn answer(model: &Model, st: &mut RunState, cache: &mut KvCache, question_ids: &[u32], eos: &[u32], max_tokens: usize) -> Result<Vec<u32>> {
    let ctx = cache.next_pos();
    let mut sampler = crate::sampling::Sampler::new(0.0, 1.0, 0);
    let opts = crate::generate::GenOptions { max_tokens, stop_at_eos: true };
    let out = crate::generate::generate(model, st, cache, question_ids, eos, &mut sampler, &opts, |_| Ok(()));
    cache.truncate_to(ctx);
    Ok(out?.tokens)
}

/// Mean negative log-likelihood (nats/token) of `answer_ids` teacher-forced after
/// `question_ids` on the context in `cache` (rolled back afterwards): the "log-perplexity of
/// the full-cache answers" of spec §14.
pub fn answer_nll(model: &Model, st: &mut RunState, cache: &mut KvCache, question_ids: &[u32], answer_ids: &[u32]) -> Result<f64> {
    if answer_ids.is_empty() {
        return Ok(0.0);
    }
    let ctx = cache.next_pos();
    let input: Vec<u32> = question_ids.iter().chain(&answer_ids[..answer_ids.len() - 1]).copied().collect();
    let r = model.forward(st, cache, &input, Logits::All);
    cache.truncate_to(ctx);
    r?;
    Ok(mean_nll(&st.logits, model.config.vocab_size, question_ids.len() - 1, answer_ids))
}

/// Mean negative log-likelihood (nats/token) of `answer_ids`, where logits row `first + k`
/// (`[vocab]`) predicts `answer_ids[k]`.
pub fn mean_nll(logits: &[f32], vocab: usize, first: usize, answer_ids: &[u32]) -> f64 {
    let mut total = 0.0f64;
    for (k, &tgt) in answer_ids.iter().enumerate() {
        let row = &logits[(first + k) * vocab..(first + k + 1) * vocab];
        let mx = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = mx + row.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
        total += lse - row[tgt as usize] as f64;
    }
    total / answer_ids.len().max(1) as f64
}

