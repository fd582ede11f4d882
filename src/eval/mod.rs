//! `kvcompact eval`: rank every compression method on the same model, budget and tasks.
//!
//! For each generated sample ([`tasks`]), once:
//! 1. prefill the context (chat template, the context as a user message), recording every
//!    layer's post-RoPE queries (H2O, SnapKV, TOVA and Expected Attention score with them);
//! 2. per question, the full cache's greedy answer after the question and answer prefix, then
//!    one teacher-forced pass over question + prefix + that answer: the reference log-probs for
//!    KL, the full cache's accuracy and log-ppl, and the test queries for the per-head errors;
//! 3. for the Attention Matching methods, the repeat-prefill reference queries (spec §8.1: one
//!    pass of "Repeat the previous context verbatim." + the article after the context,
//!    off-policy), subsampled to `--n-queries` per KV head.
//!
//! Then per method: eviction methods score every head once ([`Scorer::score_layer`]) and select
//! at each ratio; AM methods fit at each ratio. The article span of every (layer, KV head) is
//! compressed to ⌊T/ratio⌋ rows (PyramidKV: its layer schedule; `--budgets`: the spec §11
//! water-fill), template rows stay, and the result is installed as a real ragged cache (evicted
//! rows are freed). Each question is then teacher-forced on that cache ([`metrics`] defines every
//! measure). Results go to results.json / results.csv (one row per method, ratio, task, metric),
//! plots/<metric>.svg|png, summary.md and tasks.jsonl.
//!
//! Everything is seeded; a run is deterministic given `--seed` except for the timings.

pub mod metrics;
pub mod plots;
pub mod tasks;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::compact::evict::{keep_rows, select};
use crate::compact::registry::{is_am, method_with, MethodOptions, METHODS};
use crate::compact::{compress_heads, head_seed, CompactedHead, Compressor, FullHead, HeadContext, HeadInput, Observed};
use crate::document::{followup_tokens, head_budgets, repeat_tokens, ContextLayout};
use crate::error::{Error, Result};
use crate::kv_cache::{HeadRows, KvCache};
use crate::model::{Capture, Logits, Model, RunState, DEFAULT_MAX_BATCH};
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;
use metrics::{kl_to, nll, ref_dist, Record, RefDist, ResultRow};
use tasks::{Question, Sample, TaskConfig};

/// Arguments of `kvcompact eval` (defined here so the harness owns its flags).
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// HF-format model directory (default: the default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Comma-separated methods (default: all): am-omp, am-highest, baseline, qfilters,
    /// streaming-llm, h2o, snapkv, pyramidkv, tova, knorm, expected-attention, random, full.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Comma-separated compression ratios (article rows kept per head = ⌊T/ratio⌋; default 2,5,10,20,50).
    #[arg(long, value_delimiter = ',')]
    pub ratios: Vec<f64>,
    /// Comma-separated tasks (default all): passkey, niah-multikey, variable-tracking, qa.
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Samples (contexts) per task (default 3; --quick 4). QA has one sample per document.
    #[arg(long)]
    pub samples: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Small CI run: passkey, ratios 10,20, methods am-highest, qfilters, knorm, streaming-llm,
    /// full, 4 samples of 512 tokens (each overridable), and the ordering checks.
    #[arg(long)]
    pub quick: bool,
    /// Context lengths in tokens for the synthetic tasks, cycled over samples (default 512, which
    /// keeps the default run within its time budget; the README table uses 512,1024). Capped to
    /// what the model's context holds.
    #[arg(long, value_delimiter = ',')]
    pub lengths: Vec<usize>,
    /// Needle depths in [0, 1], cycled over samples (default 0.5,0.1,0.9,0.3,0.7).
    #[arg(long, value_delimiter = ',')]
    pub depths: Vec<f64>,
    /// Needles per niah-multikey context.
    #[arg(long, default_value_t = 4)]
    pub keys: usize,
    /// Needles asked per niah-multikey context.
    #[arg(long, default_value_t = 2)]
    pub keys_asked: usize,
    /// Questions asked per QA document.
    #[arg(long, default_value_t = 3)]
    pub qa_questions: usize,
    /// QA documents: a JSON list of {title, document | document_file, questions: [{question,
    /// answer_prefix, answers, max_new_tokens}]} (default: the shipped documents in data/qa).
    #[arg(long)]
    pub qa_docs: Option<PathBuf>,
    /// Q-Filters file (default: <out>/qfilters.safetensors or <model>/qfilters.safetensors if
    /// present, else calibrated on the shipped corpus and saved as <out>/qfilters.safetensors).
    #[arg(long)]
    pub filters: Option<PathBuf>,
    /// Attention Matching reference queries per KV head (off-policy, shared by every AM method and ratio).
    #[arg(long, default_value_t = 1024)]
    pub n_queries: usize,
    /// Source of the AM reference queries: repeat, self-study, or ss-plus-repeat (half each).
    #[arg(long, default_value = "ss-plus-repeat")]
    pub am_queries: String,
    /// Tokens per self-study answer (three prompts: summary, questions, facts).
    #[arg(long, default_value_t = 48)]
    pub self_study_tokens: usize,
    /// Continuation tokens per question whose queries serve as test queries for the per-head errors.
    #[arg(long, default_value_t = 12)]
    pub n_test: usize,
    /// Per-head budget proportions (JSON {"L{l}H{h}": p}) applied to every method (spec §11).
    #[arg(long)]
    pub budgets: Option<PathBuf>,
    /// Treat contexts as raw text (no chat template).
    #[arg(long)]
    pub raw: bool,
    /// Fail (exit 1) when an ordering check does not hold (checks run with --quick or --check).
    #[arg(long)]
    pub check: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// A progress bar on stderr, hidden when `show` is false or stderr is not a terminal.
pub fn progress_bar(len: u64, show: bool, msg: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>24} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(msg.to_string());
    bar
}

/// The resolved run: defaults (full or quick) with the user's overrides.
#[derive(Debug, Clone)]
pub struct Plan {
    pub methods: Vec<String>,
    pub ratios: Vec<f64>,
    pub tasks: Vec<String>,
    pub samples: usize,
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    pub checks: bool,
}

impl Plan {
    pub fn from_args(a: &EvalArgs) -> Result<Plan> {
        let or = |v: &Vec<String>, d: &[&str]| if v.is_empty() { d.iter().map(|s| s.to_string()).collect() } else { v.clone() };
        let (dm, dr, dt, dl): (&[&str], &[f64], &[&str], &[usize]) = if a.quick {
            (&["am-highest", "qfilters", "knorm", "streaming-llm", "full"], &[10.0, 20.0], &["passkey"], &[512])
        } else {
            (METHODS, &[2.0, 5.0, 10.0, 20.0, 50.0], tasks::TASKS, &[512])
        };
        let methods = or(&a.methods, dm);
        for m in &methods {
            if !METHODS.contains(&m.as_str()) && !is_am(m) {
                return Err(Error::Invalid(format!("unknown method {m:?} (expected one of {})", METHODS.join(", "))));
            }
        }
        let tasks = or(&a.tasks, dt);
        for t in &tasks {
            if !tasks::TASKS.contains(&t.as_str()) {
                return Err(Error::Invalid(format!("unknown task {t:?} (expected one of {})", tasks::TASKS.join(", "))));
            }
        }
        let ratios = if a.ratios.is_empty() { dr.to_vec() } else { a.ratios.clone() };
        if let Some(r) = ratios.iter().find(|r| !(r.is_finite() && **r >= 1.0)) {
            return Err(Error::Invalid(format!("--ratios: {r} is not a compression ratio ≥ 1")));
        }
        let depths = if a.depths.is_empty() { vec![0.5, 0.1, 0.9, 0.3, 0.7] } else { a.depths.clone() };
        if depths.iter().any(|d| !(0.0..=1.0).contains(d)) {
            return Err(Error::Invalid("--depths must lie in [0, 1]".into()));
        }
        let lengths = if a.lengths.is_empty() { dl.to_vec() } else { a.lengths.clone() };
        if lengths.contains(&0) {
            return Err(Error::Invalid("--lengths must be positive".into()));
        }
        Ok(Plan { methods, ratios, tasks, samples: a.samples.unwrap_or(if a.quick { 4 } else { 3 }).max(1), lengths, depths, checks: a.quick || a.check })
    }
}

/// One question prepared for the model.
struct QPrep {
    ids: Vec<u32>,        // follow-up turn + answer prefix
    golds: Vec<Vec<u32>>, // reference answers' tokens
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
    Ok(QPrep { ids, golds: golds.into_iter().filter(|g| !g.is_empty()).collect(), max_new: q.max_new_tokens.max(1) })
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

struct Env<'a> {
    model: &'a Model,
    tok: &'a Tokenizer,
    chat: bool,
    args: &'a EvalArgs,
    plan: &'a Plan,
    methods: Vec<(String, Option<Box<dyn Compressor>>)>,
    inv_freq: Vec<f32>,
    budgets: Option<std::collections::HashMap<String, f64>>,
}

/// Run the evaluation described by `args` on the model in `model_dir`.
pub fn run(model_dir: &Path, args: &EvalArgs) -> Result<()> {
    let t_all = Instant::now();
    let plan = Plan::from_args(args)?;
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let model = Model::load(model_dir)?;
    let tok = Tokenizer::load(model_dir, &model.config)?;
    let chat = !args.raw && tok.has_chat_template();
    let show = !args.no_progress;

    let filters = if plan.methods.iter().any(|m| m == "qfilters") {
        let t0 = Instant::now();
        let cache = args.out.join(crate::qfilters::DEFAULT_FILTERS_FILE);
        let f = crate::qfilters::load_or_calibrate(&model, args.filters.as_deref(), Some(&cache), show)?;
        eprintln!("Q-Filters ready in {:.1} s ({})", t0.elapsed().as_secs_f64(), f.metadata.get("corpus").map(String::as_str).unwrap_or("file"));
        Some(Arc::new(f))
    } else {
        None
    };
    let mopts = MethodOptions { filters };
    let methods = plan
        .methods
        .iter()
        .map(|m| Ok((m.clone(), if m == "full" { None } else { Some(method_with(m, &mopts)?) })))
        .collect::<Result<Vec<_>>>()?;
    let budgets = match &args.budgets {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            Some(serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?)
        }
        None => None,
    };
    let env = Env { model: &model, tok: &tok, chat, args, plan: &plan, methods, inv_freq: crate::compact::evict::rope_inv_freq(&model.config), budgets };

    // Tasks.
    let max_len = model.config.max_position_embeddings;
    let lengths: Vec<usize> = plan.lengths.iter().map(|&l| l.min(max_len.saturating_sub(96).max(16))).collect();
    let qa_docs = match &args.qa_docs {
        Some(p) => tasks::load_qa(p)?,
        None => tasks::shipped_qa()?,
    };
    let tcfg = TaskConfig { lengths, depths: plan.depths.clone(), keys: args.keys, keys_asked: args.keys_asked, qa_questions: args.qa_questions, qa_docs };
    let mut samples: Vec<Sample> = Vec::new();
    for t in &plan.tasks {
        samples.extend(tasks::generate(t, plan.samples, args.seed, &tcfg, &tok)?);
    }
    metrics::write(&args.out, "tasks.jsonl", &tasks::to_jsonl(&samples))?;

    let per_sample = env.methods.len() * plan.ratios.len();
    let bar = progress_bar((samples.len() * per_sample) as u64, show, "eval");
    let mut records: Vec<Record> = Vec::new();
    let mut skipped = Vec::new();
    let mut timings = std::collections::BTreeMap::new();
    let quiet_bar = bar.is_hidden();
    for (k, s) in samples.iter().enumerate() {
        bar.set_message(s.id.clone());
        let t0 = Instant::now();
        match run_sample(&env, s, &bar, &mut records, &mut timings) {
            Ok(()) => {
                if quiet_bar && show {
                    eprintln!("[{}/{}] {} done in {:.0} s ({:.0} s elapsed)", k + 1, samples.len(), s.id, t0.elapsed().as_secs_f64(), t_all.elapsed().as_secs_f64());
                }
            }
            Err(Error::Prompt(msg)) => {
                bar.println(format!("skipped {}: {msg}", s.id));
                skipped.push(s.id.clone());
                bar.inc(per_sample as u64);
            }
            Err(e) => return Err(e),
        }
    }
    bar.finish_and_clear();

    let rows = metrics::aggregate(&records, &plan.methods, &plan.tasks);
    metrics::write_results(&args.out, &rows)?;
    let raw: String = records.iter().map(|r| serde_json::to_string(r).unwrap_or_default() + "\n").collect();
    metrics::write(&args.out, "records.jsonl", &raw)?;
    plots::write_plots(&args.out, &rows, &plan.methods, &plan.tasks)?;
    let command = command_line(args);
    let mut summary = metrics::summary_markdown(&rows, &plan.methods, &plan.ratios, &plan.tasks, &command);
    let checks = if plan.checks { ordering_checks(&rows, &plan) } else { Vec::new() };
    if !checks.is_empty() {
        summary.push_str("**ordering checks**\n\n");
        for c in &checks {
            summary.push_str(&format!("- {}\n", c.line()));
        }
    }
    let elapsed = t_all.elapsed().as_secs_f64();
    summary.push_str(&format!("\n{} samples ({} skipped), {} records, {:.0} s total.\n", samples.len(), skipped.len(), records.len(), elapsed));
    metrics::write(&args.out, "summary.md", &summary)?;
    let run_info = serde_json::json!({
        "command": command, "model": model_dir.display().to_string(), "methods": plan.methods, "ratios": plan.ratios,
        "tasks": plan.tasks, "samples": plan.samples, "lengths": plan.lengths, "depths": plan.depths, "seed": args.seed,
        "n_queries": args.n_queries, "am_queries": args.am_queries, "chat": chat, "skipped": skipped, "seconds": elapsed, "seconds_by_phase": timings,
        "checks": checks.iter().map(|c| c.json()).collect::<Vec<_>>(),
    });
    metrics::write(&args.out, "run.json", &serde_json::to_string_pretty(&run_info).unwrap_or_default())?;
    println!("{summary}");
    println!("wrote {}/results.json, results.csv, summary.md, plots/ in {elapsed:.0} s", args.out.display());
    if args.check && checks.iter().any(|c| !c.loose_pass) {
        return Err(Error::Invalid("an ordering check failed (see summary.md)".into()));
    }
    Ok(())
}

fn command_line(a: &EvalArgs) -> String {
    let mut s = String::from("kvcompact eval");
    if let Some(m) = &a.model {
        s.push_str(&format!(" --model {}", m.display()));
    }
    if a.quick {
        s.push_str(" --quick");
    }
    let list = |v: &[String]| v.join(",");
    if !a.methods.is_empty() {
        s.push_str(&format!(" --methods {}", list(&a.methods)));
    }
    if !a.ratios.is_empty() {
        s.push_str(&format!(" --ratios {}", a.ratios.iter().map(|r| metrics::fmt_ratio(*r)).collect::<Vec<_>>().join(",")));
    }
    if !a.tasks.is_empty() {
        s.push_str(&format!(" --tasks {}", list(&a.tasks)));
    }
    if let Some(n) = a.samples {
        s.push_str(&format!(" --samples {n}"));
    }
    if !a.lengths.is_empty() {
        s.push_str(&format!(" --lengths {}", a.lengths.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(",")));
    }
    if a.n_queries != 1024 {
        s.push_str(&format!(" --n-queries {}", a.n_queries));
    }
    if a.am_queries != "ss-plus-repeat" {
        s.push_str(&format!(" --am-queries {}", a.am_queries));
    }
    s.push_str(&format!(" --seed {} --out {}", a.seed, a.out.display()));
    s
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
        let full_correct = (!q.golds.is_empty()).then(|| f64::from(u8::from(q.golds.iter().any(|gd| full_answer.starts_with(gd)))));
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
fn question_metrics(model: &Model, st: &mut RunState, cache: &mut KvCache, sc: &SampleCtx) -> Result<Vec<(Option<f64>, f64, f64)>> {
    let vocab = model.config.vocab_size;
    let ctx_len = cache.next_pos();
    let mut out = Vec::with_capacity(sc.qs.len());
    for (q, rf) in sc.qs.iter().zip(&sc.refs) {
        let r = model.forward(st, cache, &rf.input, Logits::All);
        cache.truncate_to(ctx_len);
        r?;
        let logits = &st.logits;
        let first = q.ids.len() - 1;
        let logppl = rf.full_answer.iter().enumerate().map(|(k, &t)| nll(&logits[(first + k) * vocab..(first + k + 1) * vocab], t)).sum::<f64>() / rf.full_answer.len() as f64;
        let kl = {
            use rayon::prelude::*;
            rf.lp_full.par_iter().enumerate().map(|(p, r)| kl_to(r, &logits[p * vocab..(p + 1) * vocab])).collect::<Vec<f64>>().iter().sum::<f64>()
                / rf.lp_full.len().max(1) as f64
        };
        let mut correct = None;
        if !q.golds.is_empty() {
            let mut ok = false;
            let mut others = Vec::new();
            for gd in &q.golds {
                if rf.full_answer.starts_with(gd) {
                    ok |= greedy_matches(logits, vocab, first, gd);
                } else {
                    others.push(gd);
                }
            }
            for gd in others {
                if ok {
                    break;
                }
                let input: Vec<u32> = q.ids.iter().chain(&gd[..gd.len() - 1]).copied().collect();
                let r = model.forward(st, cache, &input, Logits::All);
                cache.truncate_to(ctx_len);
                r?;
                ok = greedy_matches(&st.logits, vocab, first, gd);
            }
            correct = Some(f64::from(u8::from(ok)));
        }
        out.push((correct, logppl, kl));
    }
    Ok(out)
}

fn run_sample(env: &Env, s: &Sample, bar: &indicatif::ProgressBar, records: &mut Vec<Record>, timings: &mut std::collections::BTreeMap<String, f64>) -> Result<()> {
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
        let scores: Option<Vec<Vec<f64>>> = match method.scorer() {
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
        for &ratio in &env.plan.ratios {
            let t0 = Instant::now();
            let budgets = match &env.budgets {
                Some(p) => head_budgets(nl, nkv, t_art, ratio, Some(p), 1.0)?,
                None => {
                    let b = ((t_art as f64 / ratio).floor() as usize).clamp(1, t_art);
                    method.head_budgets(nl, nkv, t_art, b)
                }
            };
            let compacted: Vec<CompactedHead> = match &scores {
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
            for (acc, logppl, kl) in question_metrics(model, &mut st, &mut cache, &sc)? {
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

/// One ordering check of the targets.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: String,
    pub ratio: f64,
    pub lhs: f64,
    pub rhs: f64,
    /// Strict: lhs beats rhs. Loose: within the tolerance (CI).
    pub strict_pass: bool,
    pub loose_pass: bool,
}

impl Check {
    fn line(&self) -> String {
        format!(
            "{} at {}×: {:.3} vs {:.3} → {}",
            self.name,
            metrics::fmt_ratio(self.ratio),
            self.lhs,
            self.rhs,
            if self.strict_pass { "beats" } else if self.loose_pass { "ties within tolerance" } else { "FAILS" }
        )
    }
    fn json(&self) -> serde_json::Value {
        serde_json::json!({"check": self.name, "ratio": self.ratio, "lhs": self.lhs, "rhs": self.rhs, "strict": self.strict_pass, "loose": self.loose_pass})
    }
}

/// The targets, where the run has the data: Q-Filters vs K-norm and StreamingLLM on
/// passkey accuracy (10×, 20×; loose = within one question), and the best AM method vs every
/// eviction method on answer_logppl averaged over tasks (10×, 20×, 50×; loose = within 0.05 nats).
pub fn ordering_checks(rows: &[ResultRow], plan: &Plan) -> Vec<Check> {
    let mut out = Vec::new();
    let has = |m: &str| plan.methods.iter().any(|x| x == m);
    for &ratio in plan.ratios.iter().filter(|r| [10.0, 20.0].contains(*r)) {
        let n = rows.iter().find(|r| r.method == "qfilters" && r.ratio == ratio && r.task == "passkey" && r.metric == "accuracy").map_or(1, |r| r.n);
        for other in ["knorm", "streaming-llm"] {
            if !has("qfilters") || !has(other) {
                continue;
            }
            if let (Some(a), Some(b)) = (metrics::value(rows, "qfilters", ratio, "passkey", "accuracy"), metrics::value(rows, other, ratio, "passkey", "accuracy")) {
                out.push(Check { name: format!("passkey accuracy: qfilters vs {other}"), ratio, lhs: a, rhs: b, strict_pass: a > b, loose_pass: a + 1.0 / n as f64 + 1e-9 >= b });
            }
        }
    }
    let ams: Vec<&String> = plan.methods.iter().filter(|m| is_am(m) && m.as_str() != "baseline").collect();
    let evictions: Vec<&String> = plan.methods.iter().filter(|m| !is_am(m) && m.as_str() != "full").collect();
    for &ratio in plan.ratios.iter().filter(|r| [10.0, 20.0, 50.0].contains(*r)) {
        let best_am = ams.iter().filter_map(|m| metrics::mean_over_tasks(rows, m, ratio, "answer_logppl").map(|v| (v, *m))).min_by(|a, b| a.0.total_cmp(&b.0));
        let Some((am, am_name)) = best_am else { continue };
        for e in &evictions {
            if let Some(v) = metrics::mean_over_tasks(rows, e, ratio, "answer_logppl") {
                out.push(Check { name: format!("answer_logppl: {am_name} vs {e}"), ratio, lhs: am, rhs: v, strict_pass: am < v, loose_pass: am <= v + 0.05 });
            }
        }
    }
    out
}
