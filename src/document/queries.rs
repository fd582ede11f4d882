//! Reference queries (spec §8): produced by running extra "query tokens" after the context
//! through the model one layer at a time (the cheaper on-policy schedule of §8.5.5). The hidden
//! states H_ℓ of the query tokens at the input of layer ℓ give that layer's queries; H_{ℓ+1} is
//! layer ℓ run on H_ℓ against the layer-ℓ cache — the original rows (off-policy) or the already
//! compacted ones (on-policy). The query tokens' own keys are removed again after each layer.

use std::ops::Range;

use super::layout::followup_tokens;
use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::model::{Logits, Model, RunState, DEFAULT_MAX_BATCH};
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;

/// The instruction of the repeat-prefill query source (spec §8.1).
pub const REPEAT_INSTRUCTION: &str = "Repeat the previous context verbatim.";

/// Where reference queries come from (spec §8.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuerySource {
    /// "Repeat the previous context verbatim." then the article as the answer (teacher-forced).
    Repeat,
    /// The model's own questions and answers about the context, sampled with our `generate`.
    SelfStudy,
    /// The article positions of the context prefill itself, scored non-causally.
    Context,
    /// N(0, I) scaled to each query head's mean query norm (no RoPE).
    Random,
    /// Half repeat, half context.
    Mix,
}

impl QuerySource {
    /// `repeat`, `self-study`, `context`, `random` or `mix`.
    pub fn parse(s: &str) -> Result<QuerySource> {
        Ok(match s {
            "repeat" => QuerySource::Repeat,
            "self-study" => QuerySource::SelfStudy,
            "context" => QuerySource::Context,
            "random" => QuerySource::Random,
            "mix" => QuerySource::Mix,
            _ => return Err(Error::Invalid(format!("unknown query source {s:?} (repeat, self-study, context, random, mix)"))),
        })
    }
    /// The name [`QuerySource::parse`] accepts.
    pub fn name(self) -> &'static str {
        match self {
            QuerySource::Repeat => "repeat",
            QuerySource::SelfStudy => "self-study",
            QuerySource::Context => "context",
            QuerySource::Random => "random",
            QuerySource::Mix => "mix",
        }
    }
}

/// Seeded choice of `k` of `0..n`, returned sorted (spec §8.3: the same token indices serve
/// every layer and head). `exclude` rows are never chosen.
pub(super) fn subsample(n: usize, k: usize, rng: &mut Rng, exclude: &[usize]) -> Vec<usize> {
    let mut pool: Vec<usize> = (0..n).filter(|i| exclude.binary_search(i).is_err()).collect();
    if k < pool.len() {
        // Partial Fisher–Yates.
        for i in 0..k {
            let j = i + rng.below((pool.len() - i) as u64) as usize;
            pool.swap(i, j);
        }
        pool.truncate(k);
    }
    pool.sort_unstable();
    pool
}

/// Per-(layer, KV head) reference and test queries, group-major [G·m, d].
pub(super) struct Queries {
    pub(super) train: Vec<Vec<f32>>, // [n_layers * n_kv][n, d]
    pub(super) test: Vec<Vec<f32>>,  // [n_layers * n_kv][m, d]
}

/// Gather, for every KV head of one layer, the selected token rows of q [tokens, nh*hd] into
/// group-major matrices: head g gets [Q_{gG}[sel]; Q_{gG+1}[sel]; …].
pub(super) fn group_queries(q: &[f32], model: &Model, sel: &[usize], out: &mut [Vec<f32>]) {
    let c = &model.config;
    let (hd, qd, g) = (c.head_dim, c.q_dim(), c.group_size());
    for (kv, dst) in out.iter_mut().enumerate() {
        for r in 0..g {
            let head = kv * g + r;
            for &t in sel {
                dst.extend_from_slice(&q[t * qd + head * hd..t * qd + (head + 1) * hd]);
            }
        }
    }
}

/// Runs one layer over the query tokens (see [`compact_span`]).
pub(super) struct LayerRun<'a> {
    pub(super) model: &'a Model,
    pub(super) tokens: &'a [u32],
    pub(super) pos0: usize,
    pub(super) sel: &'a [usize],
    pub(super) test_sel: &'a [usize],
}

impl LayerRun<'_> {
    /// Layer l on the query tokens against the cache as it is now: H_l → H_{l+1} in `hidden`;
    /// with `collect`, the selected tokens' queries go to train/test. The query tokens' own
    /// rows are removed from the cache again.
    // `collect` is the (train, test) pair of per-head buffers; an alias would only hide that.
    #[allow(clippy::type_complexity)]
    pub(super) fn run(&self, l: usize, st: &mut RunState, cache: &mut KvCache, hidden: &mut [f32], collect: Option<(&mut [Vec<f32>], &mut [Vec<f32>])>) {
        let (model, mb) = (self.model, st.max_batch());
        let (d, nkv) = (model.config.hidden_size, model.config.n_kv_heads);
        let mut collect = collect;
        // The last layer's output is never used: only its queries are, and they need neither its
        // attention nor its MLP (the same bits as `last_queries` after a full layer).
        if l + 1 == model.config.n_layers {
            if let Some((train, test)) = collect.as_mut() {
                for (ci, chunk) in self.tokens.chunks(mb).enumerate() {
                    let (at, n) = (ci * mb, chunk.len());
                    model.prepare_positions(st, n, self.pos0 + at);
                    model.residual(st, n).copy_from_slice(&hidden[at * d..(at + n) * d]);
                    let q = model.layer_queries(l, st, n);
                    group_queries(q, model, &local(self.sel, at, n), &mut train[l * nkv..(l + 1) * nkv]);
                    group_queries(q, model, &local(self.test_sel, at, n), &mut test[l * nkv..(l + 1) * nkv]);
                }
                return;
            }
        }
        for (ci, chunk) in self.tokens.chunks(mb).enumerate() {
            let (at, n) = (ci * mb, chunk.len());
            model.prepare_positions(st, n, self.pos0 + at);
            model.residual(st, n).copy_from_slice(&hidden[at * d..(at + n) * d]);
            model.layer(l, st, cache, n);
            if let Some((train, test)) = collect.as_mut() {
                let q = model.last_queries(st, n);
                group_queries(q, model, &local(self.sel, at, n), &mut train[l * nkv..(l + 1) * nkv]);
                group_queries(q, model, &local(self.test_sel, at, n), &mut test[l * nkv..(l + 1) * nkv]);
            }
            hidden[at * d..(at + n) * d].copy_from_slice(model.residual(st, n));
        }
        cache.truncate_layer_to(l, self.pos0);
    }
}

/// The selected token indices that fall in [at, at + n), relative to `at`.
pub(super) fn local(sel: &[usize], at: usize, n: usize) -> Vec<usize> {
    sel.iter().filter(|&&t| t >= at && t < at + n).map(|&t| t - at).collect()
}

/// Append the extra (context / random) queries of heads `range` to the train and test sets.
pub(super) fn merge_extra(train: &mut [Vec<f32>], test: &mut [Vec<f32>], extra: Option<&Queries>, range: Range<usize>) {
    if let Some(x) = extra {
        for i in range {
            train[i].extend_from_slice(&x.train[i]);
            test[i].extend_from_slice(&x.test[i]);
        }
    }
}

/// Context-prefill queries (spec §8.1) of the span's own tokens, and random queries scaled to
/// each query head's mean norm, subsampled per head; None for the repeat/self-study sources.
pub(super) fn extra_queries(model: &Model, captured: &[Vec<f32>], src: QuerySource, n_queries: usize, n_test: usize, seed: u64, share: f64) -> Option<Queries> {
    let c = &model.config;
    let (nl, nkv, hd, qd, g) = (c.n_layers, c.n_kv_heads, c.head_dim, c.q_dim(), c.group_size());
    if !matches!(src, QuerySource::Context | QuerySource::Mix | QuerySource::Random) || captured.is_empty() {
        return None;
    }
    let ntok = captured[0].len() / qd;
    let mut rng = Rng::new(seed ^ 0xC04E_7E47);
    let want = ((n_queries as f64 * share) as usize).div_ceil(g).max(1);
    let sel = subsample(ntok, want, &mut rng, &[]);
    let mut test_sel = subsample(ntok, n_test.div_ceil(g).max(1), &mut rng, &sel);
    if test_sel.is_empty() {
        test_sel = sel.clone();
    }
    let mut train = vec![Vec::new(); nl * nkv];
    let mut test = vec![Vec::new(); nl * nkv];
    for l in 0..nl {
        let q = &captured[l];
        if src == QuerySource::Random {
            // N(0, I) per query head, scaled to that head's mean query norm (Llama has no q_norm).
            for kv in 0..nkv {
                for (set, n, dst) in [(&sel, sel.len(), &mut train[l * nkv + kv]), (&test_sel, test_sel.len(), &mut test[l * nkv + kv])] {
                    let _ = set;
                    for r in 0..g {
                        let head = kv * g + r;
                        let mean_norm = (0..ntok)
                            .map(|t| q[t * qd + head * hd..t * qd + (head + 1) * hd].iter().map(|x| x * x).sum::<f32>().sqrt() as f64)
                            .sum::<f64>()
                            / ntok as f64;
                        for _ in 0..n {
                            let v: Vec<f64> = (0..hd).map(|_| gaussian(&mut rng)).collect();
                            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
                            dst.extend(v.iter().map(|x| (x / norm * mean_norm) as f32));
                        }
                    }
                }
            }
        } else {
            group_queries(q, model, &sel, &mut train[l * nkv..(l + 1) * nkv]);
            group_queries(q, model, &test_sel, &mut test[l * nkv..(l + 1) * nkv]);
        }
    }
    Some(Queries { train, test })
}

fn gaussian(rng: &mut Rng) -> f64 {
    // Box–Muller on two uniforms in (0, 1].
    let u1 = 1.0 - rng.next_f64();
    let u2 = rng.next_f64();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Query tokens that follow the context for the repeat source: a new user turn with the repeat
/// instruction, the assistant header, then the article itself as the answer.
pub fn repeat_tokens(tok: &Tokenizer, chat: bool, article: &[u32]) -> Result<Vec<u32>> {
    let mut t = followup_tokens(tok, chat, REPEAT_INSTRUCTION)?;
    t.extend_from_slice(article);
    Ok(t)
}

/// Self-study query tokens: the model answers a few prompts about the context, one after the
/// other in one conversation (sampled at T = 0.7, top-p 0.8, spec §8.1), on a copy of the cache.
pub fn self_study_tokens(model: &Model, tok: &Tokenizer, cache: &KvCache, chat: bool, seed: u64, max_answer: usize) -> Result<Vec<u32>> {
    const PROMPTS: [&str; 3] = [
        "Summarize the text above.",
        "Write three questions about the text above, then answer each of them.",
        "List the names, numbers and dates that appear in the text above, with what each refers to.",
    ];
    let mut c = cache.clone();
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let mut sampler = crate::sampling::Sampler::new(0.7, 0.8, seed);
    let mut all = Vec::new();
    let room = model.config.max_position_embeddings.saturating_sub(cache.next_pos());
    for p in PROMPTS {
        let q = followup_tokens(tok, chat, p)?;
        // Share what is left of the context window between the remaining prompts.
        let left = room.saturating_sub(all.len());
        let budget = (left / PROMPTS.len()).saturating_sub(q.len() + 1).min(max_answer);
        if budget < 4 {
            break;
        }
        let opts = crate::generate::GenOptions { max_tokens: budget, stop_at_eos: true };
        let out = crate::generate::generate(model, &mut st, &mut c, &q, &tok.eos_ids, &mut sampler, &opts, |_| Ok(()))?;
        // The last sampled token was never fed; feed it so the cache matches the token list.
        if let Some(&last) = out.tokens.last() {
            model.forward(&mut st, &mut c, &[last], Logits::None)?;
        }
        all.extend_from_slice(&q);
        all.extend_from_slice(&out.tokens);
    }
    if all.is_empty() {
        return Err(Error::Prompt("self-study: no room left in the model's context for questions and answers; use --chunk-tokens or another --queries".into()));
    }
    Ok(all)
}

