//! `kvcompact demo`: the main job side by side — one document, one KV budget, the full cache
//! against Attention Matching and against the best eviction method, on questions with known
//! answers.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use kvcompact::cache::KvCache;
use kvcompact::compact::evict::Press;
use kvcompact::compact::{registry, Budget};
use kvcompact::document::{answer, answer_nll, compact_context, followup_tokens, press_context, CompactOptions, ContextLayout, QuerySource};
use kvcompact::eval::metrics::string_match;
use kvcompact::model::{Logits, Model, RunState, DEFAULT_MAX_BATCH};
use kvcompact::tokenizer::Tokenizer;

use super::{demo_file, model_dir, read_prompt, ModelArg, PromptArg};

/// The main job: prefill a document, compact it with AM and with eviction baselines at the same
/// budget, and answer the same questions with each cache, marking every answer right or wrong.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Document (default: the shipped data/demo/directory.txt, a staff list with locker codes).
    #[arg(long)]
    pub context: Option<PathBuf>,
    /// Questions: a JSON list of {question, answer_prefix, answers} (or of plain strings, which
    /// are answered but not marked); default data/demo/directory-questions.json.
    #[arg(long)]
    pub questions: Option<PathBuf>,
    /// Compression ratio: every head keeps ⌊T/ratio⌋ of the document's rows, for every method.
    #[arg(long, default_value_t = 5.0)]
    pub ratio: f64,
    /// The Attention Matching method.
    #[arg(long, default_value = "am-omp")]
    pub method: String,
    /// Eviction methods at the same budget, each run as its kvpress press; the best of them (most
    /// correct answers, then the lowest log-ppl of the full cache's answers) is shown beside AM.
    #[arg(long, value_delimiter = ',', default_value = "snapkv,expected-attention,kvzip,streaming-llm")]
    pub baselines: Vec<String>,
    /// AM reference queries per KV head (4096: every token of the repeat pass for documents up
    /// to 1365 tokens).
    #[arg(long, default_value_t = 4096)]
    pub n_queries: usize,
    /// AM's per-head budgets: global (one top-k of its key scores over every head, the same
    /// total) or uniform (⌊T/ratio⌋ per head).
    #[arg(long, default_value = "global")]
    pub am_budgets: String,
    /// Greedy tokens per answer.
    #[arg(long, default_value_t = 12)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// One question: the shipped format, or a plain string (no answer prefix, not marked).
#[derive(Deserialize)]
#[serde(untagged)]
enum QuestionIn {
    Full {
        question: String,
        #[serde(default)]
        answer_prefix: String,
        #[serde(default)]
        answers: Vec<String>,
    },
    Plain(String),
}

struct Question {
    text: String,
    prefix: String,
    answers: Vec<String>,
    ids: Vec<u32>, // follow-up turn + answer prefix
}

/// One cache's answers to every question.
struct Answers {
    texts: Vec<String>,
    correct: Vec<Option<bool>>,
    nll: f64, // mean log-ppl of the full cache's answers under this cache
}

impl Answers {
    fn n_correct(&self) -> usize {
        self.correct.iter().filter(|c| **c == Some(true)).count()
    }
}

fn answer_all(model: &Model, tok: &Tokenizer, st: &mut RunState, cache: &mut KvCache, qs: &[Question], reference: Option<&[Vec<u32>]>, max_tokens: usize) -> Result<(Answers, Vec<Vec<u32>>)> {
    let (mut texts, mut correct, mut ids, mut nll) = (Vec::new(), Vec::new(), Vec::new(), 0.0);
    for (i, q) in qs.iter().enumerate() {
        let a = answer(model, st, cache, &q.ids, &tok.eos_ids, max_tokens)?;
        let text = tok.decode(&a, true)?.trim().replace('\n', " ");
        correct.push((!q.answers.is_empty()).then(|| string_match(&text, &q.answers, false) == 1.0));
        texts.push(text);
        let r = reference.map_or(&a, |r| &r[i]);
        nll += answer_nll(model, st, cache, &q.ids, r)?;
        ids.push(a);
    }
    Ok((Answers { texts, correct, nll: nll / qs.len() as f64 }, ids))
}

fn read_questions(path: &PathBuf, tok: &Tokenizer, chat: bool) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let raw: Vec<QuestionIn> = serde_json::from_str(&text).with_context(|| format!("{}: expected a JSON list of {{question, answer_prefix, answers}} or of strings", path.display()))?;
    if raw.is_empty() {
        bail!("{}: no questions", path.display());
    }
    raw.into_iter()
        .map(|q| {
            let (text, prefix, answers) = match q {
                QuestionIn::Full { question, answer_prefix, answers } => (question, answer_prefix, answers),
                QuestionIn::Plain(s) => (s, String::new(), Vec::new()),
            };
            let mut ids = followup_tokens(tok, chat, &text)?;
            if !prefix.is_empty() {
                ids.extend(tok.encode(&prefix, false)?);
            }
            Ok(Question { text, prefix, answers, ids })
        })
        .collect()
}

/// `kvcompact demo`.
pub fn run(a: Args) -> Result<()> {
    let ctx_path = a.context.clone().unwrap_or_else(|| demo_file("directory.txt"));
    let q_path = a.questions.clone().unwrap_or_else(|| demo_file("directory-questions.json"));
    let text = read_prompt(&PromptArg { prompt: None, prompt_file: Some(ctx_path.clone()) })?;
    let am = registry::require_am(&a.method, "demo")?;
    // Eviction baselines run as kvpress runs them (its presses, scored on the context itself).
    let evictions: Vec<(String, Press)> = a
        .baselines
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| Ok((b.clone(), registry::press_from_name(b, a.seed).map_err(|e| anyhow::anyhow!("demo --baselines: {e}"))?)))
        .collect::<Result<_>>()?;
    let dir = model_dir(&a.model)?;
    let (model, tok) = kvcompact::generate::load(&dir)?;
    let chat = tok.has_chat_template();
    let layout = ContextLayout::build(&tok, &text, chat)?;
    let qs = read_questions(&q_path, &tok, chat)?;
    let longest = qs.iter().map(|q| q.ids.len()).max().unwrap_or(0);
    if layout.len() + longest + a.max_tokens > model.config.max_position_embeddings {
        bail!("the document and questions exceed the model's context of {} tokens", model.config.max_position_embeddings);
    }
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let t_all = Instant::now();

    // Full cache: its answers are the reference whose log-ppl every other cache is scored on.
    let t0 = Instant::now();
    let mut full = model.new_cache();
    model.forward(&mut st, &mut full, &layout.tokens(), Logits::None)?;
    let full_prefill = t0.elapsed().as_secs_f64();
    let full_bytes = full.bytes();
    let (full_ans, full_ids) = answer_all(&model, &tok, &mut st, &mut full, &qs, None, a.max_tokens)?;
    drop(full);

    let budget = Budget::Ratio(a.ratio);
    // AM, with its reference queries from repeat-prefill (the paper's default source).
    let global = kvcompact::document::budgets::global_from_name(&a.am_budgets)?;
    let opts = CompactOptions { budget, queries: QuerySource::Repeat, n_queries: a.n_queries, n_test: 64, seed: a.seed, global_budgets: global, ..Default::default() };
    let (mut small, am_report) = compact_context(&model, &tok, &layout, &am, &opts)?;
    let (am_ans, _) = answer_all(&model, &tok, &mut st, &mut small, &qs, Some(&full_ids), a.max_tokens)?;
    drop(small);

    // Every eviction method at the same budget: AM keeps the template's prefix rows whole and
    // 1/ratio of the document's, so each press keeps as many rows of the prefix and document
    // together (the same KV bytes, less AM's β).
    let rows = layout.prefix.len() + budget.rows(layout.article.len())?;
    let mut evicted = Vec::new();
    for (name, press) in &evictions {
        let (mut cache, report) = press_context(&model, &tok, &layout, press, Budget::Rows(rows))?;
        let (ans, _) = answer_all(&model, &tok, &mut st, &mut cache, &qs, Some(&full_ids), a.max_tokens)?;
        evicted.push((name.clone(), ans, report));
    }
    let best = evicted.iter().enumerate().max_by(|x, y| x.1 .1.n_correct().cmp(&y.1 .1.n_correct()).then(y.1 .1.nll.total_cmp(&x.1 .1.nll))).map(|(i, _)| i);
    let marked = qs.iter().filter(|q| !q.answers.is_empty()).count();
    let seconds = t_all.elapsed().as_secs_f64();

    let mark = |c: Option<bool>| match c {
        Some(true) => "correct",
        Some(false) => "wrong",
        None => "unmarked",
    };
    let per_cache = |ans: &Answers| -> Vec<serde_json::Value> { ans.texts.iter().zip(&ans.correct).map(|(t, c)| serde_json::json!({"answer": t, "mark": mark(*c)})).collect() };
    let summary = serde_json::json!({
        "model": dir.display().to_string(), "document": ctx_path.display().to_string(), "ratio": a.ratio,
        "context_tokens": layout.len(), "article_tokens": layout.article.len(), "questions": qs.iter().map(|q| serde_json::json!({"question": q.text, "answer_prefix": q.prefix, "expected": q.answers})).collect::<Vec<_>>(),
        "full": {"kv_bytes": full_bytes, "prefill_s": full_prefill, "correct": full_ans.n_correct(), "answers": per_cache(&full_ans), "answer_logppl": full_ans.nll},
        "am": {"method": a.method, "kv_bytes": am_report.kv_bytes_after, "compaction_s": am_report.total_seconds, "correct": am_ans.n_correct(), "answers": per_cache(&am_ans), "answer_logppl": am_ans.nll,
            "heldout_rel_l2": am_report.mean_rel_l2},
        "evictions": evicted.iter().map(|(n, ans, r)| serde_json::json!({"method": n, "kv_bytes": r.kv_bytes_after, "compaction_s": r.total_seconds, "correct": ans.n_correct(), "answers": per_cache(ans), "answer_logppl": ans.nll})).collect::<Vec<_>>(),
        "best_eviction": best.map(|i| evicted[i].0.clone()),
        "marked_questions": marked, "seconds": seconds,
    });
    if a.json {
        println!("{summary}");
        return Ok(());
    }
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    println!("document: {} ({} tokens) | model: {}", ctx_path.display(), layout.len(), dir.display());
    println!("budget: every head keeps {rows} rows of the {}-token prompt and document (AM: the template's {} and 1/{} of the document's {})", layout.prefix.len() + layout.article.len(), layout.prefix.len(), metrics_ratio(a.ratio), layout.article.len());
    println!();
    println!("{:<28} {:>9} {:>12} {:>9} {:>14}", "cache", "KV MiB", "compaction s", "correct", "answer log-ppl");
    let line = |name: &str, bytes: usize, secs: f64, ans: &Answers| {
        println!("{:<28} {:>9.2} {:>12.1} {:>6}/{:<2} {:>14.3}", name, mib(bytes), secs, ans.n_correct(), marked, ans.nll);
    };
    line("full cache", full_bytes, 0.0, &full_ans);
    line(&format!("{} (AM)", a.method), am_report.kv_bytes_after, am_report.total_seconds, &am_ans);
    for (i, (n, ans, r)) in evicted.iter().enumerate() {
        line(&format!("{n}{}", if Some(i) == best { " (best eviction)" } else { "" }), r.kv_bytes_after, r.total_seconds, ans);
    }
    let tick = |c: Option<bool>| match c {
        Some(true) => "✓",
        Some(false) => "✗",
        None => " ",
    };
    for (i, q) in qs.iter().enumerate() {
        println!("\nQ: {}{}", q.text, if q.answers.is_empty() { String::new() } else { format!("  (expected: {})", q.answers.join(" | ")) });
        println!("  {} full:     {} {}", tick(full_ans.correct[i]), q.prefix, full_ans.texts[i]);
        println!("  {} {:<8} {} {}", tick(am_ans.correct[i]), format!("{}:", "AM"), q.prefix, am_ans.texts[i]);
        if let Some(b) = best {
            let (n, ans, _) = &evicted[b];
            println!("  {} {n}: {} {}", tick(ans.correct[i]), q.prefix, ans.texts[i]);
        }
    }
    println!("\n{:.0} s in all (answer log-ppl: mean NLL of the full cache's answers under each cache, nats/token)", seconds);
    Ok(())
}

fn metrics_ratio(r: f64) -> String {
    kvcompact::eval::metrics::fmt_ratio(r)
}
