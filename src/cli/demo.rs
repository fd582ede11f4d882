//! `kvcompact demo`: the main job side by side — a document's full cache against its compacted
//! cache, on the same questions.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};

use kvcompact::compact::registry;
use kvcompact::document::{answer, answer_nll, compact_context, followup_tokens, CompactOptions, ContextLayout};
use kvcompact::model::{Logits, DEFAULT_MAX_BATCH};

use super::{demo_file, model_dir, read_prompt, ModelArg, PromptArg};

/// The main job: prefill a document, compact it, and answer questions with the full and the compacted cache side by side.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Document (default: the shipped data/demo/article.txt).
    #[arg(long)]
    pub context: Option<PathBuf>,
    /// JSON list of questions (default: data/demo/questions.json).
    #[arg(long)]
    pub questions: Option<PathBuf>,
    #[arg(long, default_value_t = 20.0)]
    pub ratio: f64,
    #[arg(long, default_value = "am-highest")]
    pub method: String,
    #[arg(long, default_value_t = 4096)]
    pub n_queries: usize,
    #[arg(long, default_value_t = 48)]
    pub max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `kvcompact demo`.
pub fn run(a: Args) -> Result<()> {
    let ctx_path = a.context.clone().unwrap_or_else(|| demo_file("article.txt"));
    let q_path = a.questions.clone().unwrap_or_else(|| demo_file("questions.json"));
    let text = read_prompt(&PromptArg { prompt: None, prompt_file: Some(ctx_path.clone()) })?;
    let qtext = std::fs::read_to_string(&q_path).with_context(|| format!("reading {}", q_path.display()))?;
    let questions: Vec<String> = serde_json::from_str(&qtext).with_context(|| format!("{}: expected a JSON list of strings", q_path.display()))?;
    if questions.is_empty() {
        bail!("{}: no questions", q_path.display());
    }
    let method = registry::require_am(&a.method, "demo")?;
    let dir = model_dir(&a.model)?;
    let (model, tok) = kvcompact::generate::load(&dir)?;
    let chat = tok.has_chat_template();
    let layout = ContextLayout::build(&tok, &text, chat)?;
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let qids: Vec<Vec<u32>> = questions.iter().map(|q| followup_tokens(&tok, chat, q)).collect::<std::result::Result<_, _>>()?;
    let longest = qids.iter().map(Vec::len).max().unwrap_or(0);
    if layout.len() + longest + a.max_tokens > model.config.max_position_embeddings {
        bail!("the document and questions exceed the model's context of {} tokens", model.config.max_position_embeddings);
    }

    // Full cache.
    let t0 = Instant::now();
    let mut full = model.new_cache();
    model.forward(&mut st, &mut full, &layout.tokens(), Logits::None)?;
    let full_prefill = t0.elapsed().as_secs_f64();
    let full_bytes = full.bytes();
    let mut full_answers = Vec::new();
    for q in &qids {
        full_answers.push(answer(&model, &mut st, &mut full, q, &tok.eos_ids, a.max_tokens)?);
    }

    // Compacted cache.
    let opts = CompactOptions { budget: kvcompact::compact::Budget::Ratio(a.ratio), n_queries: a.n_queries, seed: a.seed, ..Default::default() };
    let (mut small, report) = compact_context(&model, &tok, &layout, &method, &opts)?;
    let mut small_answers = Vec::new();
    for q in &qids {
        small_answers.push(answer(&model, &mut st, &mut small, q, &tok.eos_ids, a.max_tokens)?);
    }
    // Fidelity: log-perplexity of the full cache's own answers under each cache.
    let (mut nll_full, mut nll_small, mut same) = (0.0, 0.0, 0usize);
    let mut rows = Vec::new();
    for (i, q) in qids.iter().enumerate() {
        let f = answer_nll(&model, &mut st, &mut full, q, &full_answers[i])?;
        let s = answer_nll(&model, &mut st, &mut small, q, &full_answers[i])?;
        nll_full += f;
        nll_small += s;
        same += usize::from(full_answers[i] == small_answers[i]);
        let strip = |ids: &[u32]| -> Result<String> {
            let t = tok.decode(ids, true)?;
            Ok(t.trim().replace('\n', " "))
        };
        rows.push(serde_json::json!({"question": questions[i], "full": strip(&full_answers[i])?, "compacted": strip(&small_answers[i])?,
            "nll_full": f, "nll_compacted": s}));
    }
    let n = qids.len() as f64;
    let summary = serde_json::json!({
        "model": dir.display().to_string(), "method": a.method, "ratio": a.ratio,
        "context_tokens": layout.len(), "article_tokens": layout.article.len(),
        "kv_bytes_full": full_bytes, "kv_bytes_compacted": report.kv_bytes_after,
        "full_prefill_s": full_prefill, "compaction_s": report.total_seconds,
        "heldout_rel_l2": report.mean_rel_l2, "heldout_mass_err": report.mean_mass_err,
        "answer_logppl_full": nll_full / n, "answer_logppl_compacted": nll_small / n,
        "identical_answers": same, "questions": rows,
    });
    if a.json {
        println!("{summary}");
        return Ok(());
    }
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    println!("document: {} ({} tokens, {} in the article) | model: {}", ctx_path.display(), layout.len(), layout.article.len(), dir.display());
    println!("method: {} at {}x | compaction took {:.1} s (prefill {:.1}, queries {:.1}, fit {:.1})", a.method, a.ratio, report.total_seconds, report.prefill_seconds, report.query_seconds, report.compact_seconds);
    println!("KV cache: full {:.2} MiB → compacted {:.2} MiB ({:.1}x smaller)", mib(full_bytes), mib(report.kv_bytes_after), full_bytes as f64 / report.kv_bytes_after.max(1) as f64);
    println!("fidelity: held-out attention rel. L2 error {:.3}, mass error {:.3}; log-ppl of the full cache's answers {:.3} (full) vs {:.3} (compacted); identical answers {}/{}",
        report.mean_rel_l2, report.mean_mass_err, nll_full / n, nll_small / n, same, qids.len());
    for r in &rows {
        println!("\nQ: {}\n  full:      {}\n  compacted: {}", r["question"].as_str().unwrap_or(""), r["full"].as_str().unwrap_or(""), r["compacted"].as_str().unwrap_or(""));
    }
    Ok(())
}
