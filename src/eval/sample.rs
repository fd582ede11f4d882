//! One sample of the harness: prefill and full-cache references once, then every method at every
//! ratio — compress, install as a real ragged cache, teacher-force each question, record.

use std::time::Instant;

use super::metrics::{self, kl_to, nll, ref_dist, string_match, Record, RefDist};
use super::options::{EvalOptions, Plan};
use super::tasks::{Question, Sample};
use crate::cache::{HeadRows, KvCache};
use crate::compact::evict::kvzip::PREV_POSTFIX;
use crate::compact::evict::{keep_rows, select, KvZip, KvzipPrompts};
use crate::compact::registry::is_am;
use crate::compact::{compress_heads, head_seed, CompactedHead, Compressor, FullHead, HeadContext, HeadInput, Observed};
use crate::document::budgets::{global_budgets, global_key_scores};
use crate::document::{followup_tokens, generation_suffix, head_budgets, repeat_tokens, ContextLayout};
use crate::error::{Error, Result};
use crate::model::{Capture, Logits, Model, RunState, DEFAULT_MAX_BATCH};
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;

/// One question prepared for the model.
struct QPrep {
    ids: Vec<u32>,        // follow-up turn + answer prefix
    golds: Vec<Vec<u32>>, // reference answers' tokens
    answers: Vec<String>, // reference answers' text (string match)
    match_all: bool,      // accuracy = fraction of answers found, not whether any is
    max_new: usize,
}

/// Reference data of one question under the full cache.
struct QRef {
    full_answer: Vec<u32>,
    input: Vec<u32>,         // ids + full_answer[..-1]
    lp_full: Vec<RefDist>,   // [P] full-cache next-token distributions at every input position
    full_correct: Option<f64>,
    full_nll: f64,
}

/// The answer tokens of `answer` after `prefix`, as the tokenizer writes "prefix answer".
fn answer_tokens(tok: &Tokenizer, prefix: &str, answer: &str) -> Result<Vec<u32>> {
    if prefix.is_empty() {
        return tok.encode(answer, false);
    }
    let p = tok.encode(prefix, false)?;
    let full = tok.encode(&format!("{prefix} {answer}"), false)?;
    if full.len() > p.len() && full.starts_with(&p) {
        Ok(full[p.len()..].to_vec())
    } else {
        tok.encode(&format!(" {answer}"), false)
    }
}

fn prep_question(tok: &Tokenizer, chat: bool, q: &Question) -> Result<QPrep> {
    let mut ids = followup_tokens(tok, chat, &q.question)?;
    if !q.answer_prefix.is_empty() {
        ids.extend(tok.encode(&q.answer_prefix, false)?);
    }
    let golds = q.answers.iter().map(|a| answer_tokens(tok, &q.answer_prefix, a)).collect::<Result<Vec<_>>>()?;
    let answers: Vec<String> = q.answers.iter().filter(|a| !a.trim().is_empty()).cloned().collect();
    Ok(QPrep { ids, golds: golds.into_iter().filter(|g| !g.is_empty()).collect(), answers, match_all: q.match_all, max_new: q.max_new_tokens.max(1) })
}

/// Whether greedy decoding reproduces `gold` from logits rows `rows[k]` (predicting gold[k]).
fn greedy_matches(logits: &[f32], vocab: usize, first: usize, gold: &[u32]) -> bool {
    gold.iter().enumerate().all(|(k, &g)| {
        let row = &logits[(first + k) * vocab..(first + k + 1) * vocab];
        kvcompact_kernels::argmax(row) as u32 == g
    })
}

/// Everything a sample needs, computed once.
struct SampleCtx {
    layout: ContextLayout,
    full: KvCache,
    ctx_q: Vec<Vec<f32>>, // [L][T, nh*hd] context queries (post-RoPE)
    ctx_pos: Vec<u32>,    // [T]
    qs: Vec<QPrep>,
    refs: Vec<QRef>,
    test: Vec<Vec<f32>>,        // [L*nkv][m, d] test queries
    test_ref: Vec<metrics::HeadRef>, // [L*nkv] the original span's attention for them
    am_train: Vec<Vec<f32>>,    // [L*nkv][n, d] repeat-prefill queries (AM only)
    am_query_s: f64,
}

pub(super) struct Env<'a> {
    pub(super) model: &'a Model,
    pub(super) tok: &'a Tokenizer,
    pub(super) chat: bool,
    pub(super) args: &'a EvalOptions,
    pub(super) plan: &'a Plan,
    pub(super) methods: Vec<(String, Option<Box<dyn Compressor>>)>,
    pub(super) inv_freq: Vec<f32>,
    pub(super) budgets: Option<std::collections::HashMap<String, f64>>,
}

/// Prefill, full-cache references, test and reference queries of one sample.
fn prepare(env: &Env, s: &Sample) -> Result<SampleCtx> {
    let (model, tok) = (env.model, env.tok);
    let c = &model.config;
    let (nl, nkv, hd, nh, g) = (c.n_layers, c.n_kv_heads, c.head_dim, c.n_heads, c.group_size());
    let qd = c.q_dim();
    let layout = ContextLayout::build(tok, &s.context, env.chat)?;
    let qs = s.questions.iter().map(|q| prep_question(tok, env.chat, q)).collect::<Result<Vec<_>>>()?;
    let room = qs.iter().map(|q| q.ids.len() + q.max_new.max(q.golds.iter().map(Vec::len).max().unwrap_or(0)) + 1).max().unwrap_or(0);
    if layout.len() + room > c.max_position_embeddings {
        return Err(Error::Prompt(format!("context {} + question {} tokens exceed the model's {} positions", layout.len(), room, c.max_position_embeddings)));
    }
    let ctx_len = layout.len();
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let mut full = model.new_cache();
    st.capture = Some(Capture::queries());
    model.forward(&mut st, &mut full, &layout.tokens(), Logits::None)?;
    let ctx_q = st.capture.take().map(|c| c.queries).unwrap_or_default();
    let ctx_pos: Vec<u32> = (0..ctx_len as u32).collect();

    // Full-cache answers, reference log-probs and test queries.
    let vocab = c.vocab_size;
    let mut refs = Vec::with_capacity(qs.len());
    let mut test: Vec<Vec<f32>> = vec![Vec::new(); nl * nkv];
    for q in &qs {
        // Greedy, stopping at (and keeping) the end-of-turn id.
        let full_answer = crate::document::answer(model, &mut st, &mut full, &q.ids, &tok.eos_ids, q.max_new)?;
        if full_answer.is_empty() {
            return Err(Error::Prompt("the full cache produced no answer".into()));
        }
        let input: Vec<u32> = q.ids.iter().chain(&full_answer[..full_answer.len() - 1]).copied().collect();
        st.capture = Some(Capture::queries());
        let r = model.forward(&mut st, &mut full, &input, Logits::All);
        full.truncate_to(ctx_len);
        r?;
        let cap = st.capture.take().unwrap_or_default();
        let lp_full: Vec<RefDist> = {
            use rayon::prelude::*;
            st.logits.par_chunks(vocab).map(ref_dist).collect()
        };
        let first = q.ids.len() - 1;
        let full_nll = full_answer.iter().enumerate().map(|(k, &t)| nll(&st.logits[(first + k) * vocab..(first + k + 1) * vocab], t)).sum::<f64>() / full_answer.len() as f64;
        let full_correct = if q.answers.is_empty() { None } else { Some(string_match(&tok.decode(&full_answer, true)?, &q.answers, q.match_all)) };
        // Test queries: up to n_test continuation tokens, evenly spaced, every query head.
        let p = input.len();
        let m = env.args.n_test.clamp(1, p);
        let sel: Vec<usize> = (0..m).map(|i| i * p / m).collect();
        for l in 0..nl {
            for kv in 0..nkv {
                for r in 0..g {
                    let head = kv * g + r;
                    for &t in &sel {
                        test[l * nkv + kv].extend_from_slice(&cap.queries[l][t * qd + head * hd..t * qd + (head + 1) * hd]);
                    }
                }
            }
        }
        refs.push(QRef { full_answer, input, lp_full, full_correct, full_nll });
    }

    // Attention Matching reference queries (off-policy): repeat-prefill and/or self-study
    // conversations run after the context; each source gets its share of --n-queries.
    let mut am_train = Vec::new();
    let mut am_query_s = 0.0;
    if env.methods.iter().any(|(n, m)| m.is_some() && is_am(n)) {
        let t0 = Instant::now();
        let mut sources: Vec<Vec<u32>> = Vec::new();
        let room = c.max_position_embeddings - ctx_len;
        if matches!(env.args.am_queries.as_str(), "self-study" | "ss-plus-repeat") {
            let mut ss = crate::document::self_study_tokens(model, tok, &full, env.chat, env.args.seed ^ s.seed, env.args.self_study_tokens)?;
            ss.truncate(room);
            sources.push(ss);
        }
        if matches!(env.args.am_queries.as_str(), "repeat" | "ss-plus-repeat") {
            let mut rep = repeat_tokens(tok, env.chat, &layout.article)?;
            rep.truncate(room);
            sources.push(rep);
        }
        if sources.is_empty() {
            return Err(Error::Invalid(format!("--am-queries {:?}: expected repeat, self-study or ss-plus-repeat", env.args.am_queries)));
        }
        am_train = vec![Vec::new(); nl * nkv];
        let share = env.args.n_queries / sources.len();
        for (si, src) in sources.iter().enumerate() {
            if src.is_empty() {
                continue;
            }
            st.capture = Some(Capture::queries());
            let r = model.forward(&mut st, &mut full, src, Logits::None);
            full.truncate_to(ctx_len);
            r?;
            let cap = st.capture.take().unwrap_or_default();
            let mut rng = Rng::new(env.args.seed ^ 0x5155_4552_5953 ^ s.seed ^ si as u64);
            let want = share.div_ceil(g).max(1).min(src.len());
            let mut pool: Vec<usize> = (0..src.len()).collect();
            for i in 0..want {
                let j = i + rng.below((pool.len() - i) as u64) as usize;
                pool.swap(i, j);
            }
            pool.truncate(want);
            pool.sort_unstable();
            for l in 0..nl {
                for kv in 0..nkv {
                    for r in 0..g {
                        let head = kv * g + r;
                        for &t in &pool {
                            am_train[l * nkv + kv].extend_from_slice(&cap.queries[l][t * qd + head * hd..t * qd + (head + 1) * hd]);
                        }
                    }
                }
            }
        }
        am_query_s = t0.elapsed().as_secs_f64();
    }
    let _ = nh;
    let mut sc = SampleCtx { layout, full, ctx_q, ctx_pos, qs, refs, test, test_ref: Vec::new(), am_train, am_query_s };
    use rayon::prelude::*;
    let test_ref: Vec<metrics::HeadRef> = (0..nl * nkv).into_par_iter().map(|i| metrics::head_reference(&span_input(model, &sc, i, None), &sc.test[i])).collect();
    sc.test_ref = test_ref;
    Ok(sc)
}

/// The span input of head i (layer-major) of the prefilled cache.
fn span_input<'a>(model: &Model, sc: &'a SampleCtx, i: usize, queries: Option<&'a [f32]>) -> HeadInput<'a> {
    let nkv = model.config.n_kv_heads;
    HeadInput::from_cache(&sc.full, i / nkv, i % nkv, sc.layout.article_rows(), queries, model.config.attn_scale())
}

fn head_context<'a>(env: &'a Env, sc: &'a SampleCtx, i: usize) -> HeadContext<'a> {
    let c = &env.model.config;
    let nkv = c.n_kv_heads;
    let (l, h) = (i / nkv, i % nkv);
    let (keys, _, bias, positions) = sc.full.head(l, h);
    HeadContext {
        full: Some(FullHead { keys, bias, positions, span: sc.layout.article_rows() }),
        observed: sc.ctx_q.get(l).map(|q| Observed { queries: q, positions: &sc.ctx_pos, n_heads: c.n_heads }),
        inv_freq: Some(&env.inv_freq),
        next_pos: sc.layout.len(),
        group: c.group_size(),
    }
}

/// Install compressed spans into a copy of the full cache: [template before; kept; template after].
fn install(model: &Model, sc: &SampleCtx, heads: &[CompactedHead]) -> Result<KvCache> {
    let c = &model.config;
    let (nkv, hd) = (c.n_kv_heads, c.head_dim);
    let rows = sc.layout.article_rows();
    let mut cache = sc.full.clone();
    for (i, ch) in heads.iter().enumerate() {
        let (l, h) = (i / nkv, i % nkv);
        let (keys, values, _, positions) = sc.full.head(l, h);
        let n = positions.len() - rows.len() + ch.len();
        let mut new = HeadRows { keys: Vec::with_capacity(n * hd), values: Vec::with_capacity(n * hd), positions: Vec::with_capacity(n), bias: None };
        new.keys.extend_from_slice(&keys[..rows.start * hd]);
        new.values.extend_from_slice(&values[..rows.start * hd]);
        new.positions.extend_from_slice(&positions[..rows.start]);
        new.keys.extend_from_slice(&ch.keys);
        new.values.extend_from_slice(&ch.values);
        new.positions.extend(ch.indices.iter().map(|&k| positions[rows.start + k]));
        new.keys.extend_from_slice(&keys[rows.end * hd..]);
        new.values.extend_from_slice(&values[rows.end * hd..]);
        new.positions.extend_from_slice(&positions[rows.end..]);
        if ch.beta.iter().any(|&b| b != 0.0) {
            let mut b = vec![0.0f32; rows.start];
            b.extend_from_slice(&ch.beta);
            b.resize(n, 0.0);
            new.bias = Some(b);
        }
        cache.replace_head(l, h, new)?;
    }
    cache.check()?;
    Ok(cache)
}

/// Question metrics on a (compressed) cache: (accuracy, answer_logppl, kl) per question.
///
/// Accuracy is RULER's string match on the greedy answer generated on this cache (at most the
/// question's `max_new_tokens`, stopping at end of turn). The teacher-forced pass over the
/// question and the full cache's answer already holds that greedy answer's start: greedy follows
/// the full answer for as long as each of its tokens is the argmax, so generation only continues
/// from the first token where they part (the cache keeps the question and the shared tokens from
/// that pass, computed in one batch rather than a token at a time). When greedy reproduces a
/// reference answer's tokens the match is 1 without generating at all.
fn question_metrics(env: &Env, st: &mut RunState, cache: &mut KvCache, sc: &SampleCtx) -> Result<Vec<(Option<f64>, f64, f64)>> {
    let model = env.model;
    let vocab = model.config.vocab_size;
    let ctx_len = cache.next_pos();
    let mut out = Vec::with_capacity(sc.qs.len());
    for (q, rf) in sc.qs.iter().zip(&sc.refs) {
        let r = model.forward(st, cache, &rf.input, Logits::All);
        if let Err(e) = r {
            cache.truncate_to(ctx_len);
            return Err(e);
        }
        let first = q.ids.len() - 1;
        let (logppl, kl) = {
            let logits = &st.logits;
            let logppl = rf.full_answer.iter().enumerate().map(|(k, &t)| nll(&logits[(first + k) * vocab..(first + k + 1) * vocab], t)).sum::<f64>() / rf.full_answer.len() as f64;
            use rayon::prelude::*;
            let kl = rf.lp_full.par_iter().enumerate().map(|(p, r)| kl_to(r, &logits[p * vocab..(p + 1) * vocab])).collect::<Vec<f64>>().iter().sum::<f64>() / rf.lp_full.len().max(1) as f64;
            (logppl, kl)
        };
        let mut correct = None;
        if !q.answers.is_empty() {
            let logits = &st.logits;
            let known = !q.match_all && q.golds.iter().any(|gd| rf.full_answer.starts_with(gd) && greedy_matches(logits, vocab, first, gd));
            correct = Some(if known {
                1.0
            } else {
                // Greedy's tokens while it follows the full answer, then the token where it parts.
                let mut greedy: Vec<u32> = Vec::with_capacity(q.max_new);
                let mut parted = false;
                for (k, &t) in rf.full_answer.iter().enumerate() {
                    let g = kvcompact_kernels::argmax(&logits[(first + k) * vocab..(first + k + 1) * vocab]) as u32;
                    greedy.push(g);
                    if g != t {
                        parted = true;
                        break;
                    }
                }
                if parted && !env.tok.eos_ids.contains(greedy.last().expect("one token at least")) && greedy.len() < q.max_new {
                    // Keep the question and the shared tokens, feed the parting token, go on.
                    cache.truncate_to(ctx_len + q.ids.len() + greedy.len() - 1);
                    let mut sampler = crate::sampling::Sampler::new(0.0, 1.0, 0);
                    let opts = crate::generate::GenOptions { max_tokens: q.max_new - greedy.len(), stop_at_eos: true };
                    let g = crate::generate::generate(model, st, cache, &greedy[greedy.len() - 1..], &env.tok.eos_ids, &mut sampler, &opts, |_| Ok(()));
                    cache.truncate_to(ctx_len);
                    greedy.extend(g?.tokens);
                }
                string_match(&env.tok.decode(&greedy, true)?, &q.answers, q.match_all)
            });
        }
        cache.truncate_to(ctx_len);
        out.push((correct, logppl, kl));
    }
    Ok(out)
}

pub(super) fn run_sample(env: &Env, s: &Sample, bar: &indicatif::ProgressBar, records: &mut Vec<Record>, timings: &mut std::collections::BTreeMap<String, f64>) -> Result<()> {
    let model = env.model;
    let c = &model.config;
    let (nl, nkv) = (c.n_layers, c.n_kv_heads);
    let t_prep = Instant::now();
    let sc = prepare(env, s)?;
    *timings.entry("prepare (prefill, full answers, AM queries)".into()).or_default() += t_prep.elapsed().as_secs_f64();
    *timings.entry("AM reference queries".into()).or_default() += sc.am_query_s;
    let t_art = sc.layout.article.len();
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let seed = env.args.seed ^ s.seed;
    let mut push = |method: &str, ratio: f64, metric: &'static str, value: f64| {
        records.push(Record { method: method.to_string(), ratio, task: s.task.clone(), sample: s.id.clone(), metric, value });
    };
    let mut am_scores: Option<Vec<Vec<f64>>> = None;
    for (name, method) in &env.methods {
        let Some(method) = method else {
            // The full cache: the same numbers at every ratio (a flat reference line).
            for &ratio in &env.plan.ratios {
                for rf in &sc.refs {
                    if let Some(a) = rf.full_correct {
                        push(name, ratio, "accuracy", a);
                    }
                    push(name, ratio, "answer_logppl", rf.full_nll);
                    push(name, ratio, "kl", 0.0);
                }
                push(name, ratio, "attn_rel_l2", 0.0);
                push(name, ratio, "mass_err", 0.0);
                push(name, ratio, "kv_bytes", sc.full.bytes() as f64);
                push(name, ratio, "compress_s", 0.0);
                bar.inc(1);
            }
            continue;
        };
        bar.set_message(format!("{} {name}", s.id));
        let t_method = Instant::now();
        let heads: Vec<usize> = (0..nl * nkv).collect();
        // Eviction methods: score every head once.
        let t_score = Instant::now();
        let kvzip = method.scorer().is_some_and(|s| s.name() == "kvzip");
        let scores: Option<Vec<Vec<f64>>> = match method.scorer() {
            // KVzip scores with its repeat pass after the whole context.
            Some(_) if kvzip => {
                let prompts = KvzipPrompts::new(env.tok, generation_suffix(env.tok, sc.layout.chat)?)?;
                // Repeat in shorter chunks when one pass would run past the model's positions
                // (KVzip's own chunking, which kvpress uses to bound memory).
                let overhead = prompts.first.len().max(prompts.next.len() + PREV_POSTFIX) + prompts.suffix.len();
                let room = c.max_position_embeddings.saturating_sub(sc.layout.len() + overhead);
                if room == 0 {
                    return Err(Error::Prompt("kvzip: no positions left for the repeat pass".into()));
                }
                let k = KvZip { chunk_size: KvZip::default().chunk_size.min(room), ..KvZip::default() };
                let mut cache = sc.full.clone();
                Some(k.scores(model, &mut cache, &sc.layout.tokens(), sc.layout.prefix.len(), &prompts)?)
            }
            Some(scorer) => {
                // Layers in parallel (each layer's heads in parallel inside score_layer).
                use rayon::prelude::*;
                let per_layer: Vec<Vec<Vec<f64>>> = (0..nl)
                    .into_par_iter()
                    .map(|l| {
                        let idx: Vec<usize> = (l * nkv..(l + 1) * nkv).collect();
                        let inputs: Vec<HeadInput> = idx.iter().map(|&i| span_input(model, &sc, i, None)).collect();
                        let ctxs: Vec<HeadContext> = idx.iter().map(|&i| head_context(env, &sc, i)).collect();
                        let seeds: Vec<u64> = idx.iter().map(|&i| head_seed(seed, i / nkv, i % nkv)).collect();
                        scorer.score_layer(&inputs, &ctxs, &seeds)
                    })
                    .collect::<Result<_>>()?;
                Some(per_layer.into_iter().flatten().collect())
            }
            None => None,
        };
        let score_s = t_score.elapsed().as_secs_f64();
        for (&ratio, point) in env.plan.ratios.iter().zip(&env.plan.points) {
            let t0 = Instant::now();
            let b = point.rows(t_art)?;
            let budgets = match &env.budgets {
                Some(p) => head_budgets(nl, nkv, t_art, ratio, Some(p), 1.0)?,
                None => method.head_budgets(nl, nkv, t_art, b),
            };
            let compacted: Vec<CompactedHead> = match &scores {
                Some(all) if kvzip => {
                    // KVzip's global selection over every head's article rows: the same total
                    // as b rows per head, spread as its scores say.
                    let rows = sc.layout.article_rows();
                    let span: Vec<Vec<f64>> = all.iter().map(|s| s[rows.clone()].to_vec()).collect();
                    let k = KvZip { n_sink: KvZip::default().n_sink.saturating_sub(rows.start), ..KvZip::default() };
                    let keep = k.keep_evicting(&span, nkv, span.len() * (t_art - b.min(t_art)));
                    heads.iter().map(|&i| keep_rows(&span_input(model, &sc, i, None), &keep[i])).collect()
                }
                Some(all) => {
                    let scorer = method.scorer().expect("scores come from a scorer");
                    heads
                        .iter()
                        .map(|&i| {
                            let input = span_input(model, &sc, i, None);
                            let ctx = head_context(env, &sc, i);
                            let keep = select(&all[i], budgets[i], scorer.protect(t_art, budgets[i], &ctx));
                            keep_rows(&input, &keep)
                        })
                        .collect()
                }
                None => {
                    // AM: one global selection spreads the same total over the heads (the
                    // allocation KVzip makes), unless --budgets or --am-budgets uniform says otherwise.
                    let budgets = if env.budgets.is_none() && env.args.am_budgets == "global" {
                        if am_scores.is_none() {
                            let rows = vec![sc.layout.article_rows(); nl * nkv];
                            am_scores = Some(global_key_scores(&sc.full, &rows, &sc.am_train, c.attn_scale())?);
                        }
                        global_budgets(am_scores.as_ref().expect("just computed"), b)
                    } else {
                        budgets
                    };
                    let inputs: Vec<HeadInput> = heads.iter().map(|&i| span_input(model, &sc, i, Some(&sc.am_train[i][..]))).collect();
                    compress_heads(method.as_ref(), &inputs, &budgets, seed)?
                }
            };
            let mut cache = install(model, &sc, &compacted)?;
            let compress_s = t0.elapsed().as_secs_f64() + if scores.is_some() { score_s } else { sc.am_query_s };
            // Per-head errors on the continuation's queries.
            let errs: Vec<(f64, f64)> = {
                use rayon::prelude::*;
                heads.par_iter().map(|&i| metrics::head_errors(&sc.test_ref[i], &compacted[i], &sc.test[i], c.attn_scale())).collect()
            };
            let rel: f64 = errs.iter().map(|e| e.0).sum();
            let mass: f64 = errs.iter().map(|e| e.1).sum();
            push(name, ratio, "attn_rel_l2", rel / heads.len() as f64);
            push(name, ratio, "mass_err", mass / heads.len() as f64);
            push(name, ratio, "kv_bytes", cache.bytes() as f64);
            push(name, ratio, "compress_s", compress_s);
            for (acc, logppl, kl) in question_metrics(env, &mut st, &mut cache, &sc)? {
                if let Some(a) = acc {
                    push(name, ratio, "accuracy", a);
                }
                push(name, ratio, "answer_logppl", logppl);
                push(name, ratio, "kl", kl);
            }
            bar.inc(1);
        }
        *timings.entry(name.clone()).or_default() += t_method.elapsed().as_secs_f64();
    }
    Ok(())
}
