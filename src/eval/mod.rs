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
//! Then per method: eviction methods score every head once ([`Scorer::score_layer`](crate::compact::Scorer::score_layer)) and select
//! at each ratio; AM methods fit at each ratio. The article span of every (layer, KV head) is
//! compressed to ⌊T/ratio⌋ rows (PyramidKV: its layer schedule; `--budgets`: the spec §11
//! water-fill), template rows stay, and the result is installed as a real ragged cache (evicted
//! rows are freed). Each question is then teacher-forced on that cache ([`metrics`] defines every
//! measure). Results go to results.json / results.csv (one row per method, ratio, task, metric),
//! `plots/<metric>.svg|png` and `plots/pareto.svg|png|md` ([`plots`]), summary.md and tasks.jsonl.
//!
//! Everything is seeded; a run is deterministic given `--seed` except for the timings.

pub mod checks;
pub mod metrics;
pub mod options;
pub mod plots;
pub mod sample;
pub mod tasks;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::compact::registry::{self, method_with, Family, MethodOptions};

/// Eviction names with no kvpress press: `--kvpress` leaves them as defined here.
const NO_PRESS: &[&str] = &["h2o", "qfilters"];
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use checks::ordering_checks;
use metrics::Record;
use sample::{run_sample, Env};
use tasks::{Sample, TaskConfig};

pub use checks::Check;
pub use options::{EvalOptions, Plan};

/// Run the evaluation described by `args` on the model in `model_dir`.
pub fn run(model_dir: &Path, args: &EvalOptions) -> Result<()> {
    let t_all = Instant::now();
    let plan = Plan::from_args(args)?;
    std::fs::create_dir_all(&args.out).map_err(|e| Error::io(&args.out, e))?;
    let model = Model::load(model_dir)?;
    let tok = Tokenizer::load(model_dir, &model.config)?;
    let chat = !args.raw && tok.has_chat_template();
    let show = !args.no_progress;

    let filters = if plan.methods.iter().any(|m| m == "qfilters") {
        let t0 = Instant::now();
        let cache = args.out.join(crate::compact::qfilters::DEFAULT_FILTERS_FILE);
        let f = crate::compact::qfilters::load_or_calibrate(&model, args.filters.as_deref(), Some(&cache), show)?;
        eprintln!("Q-Filters ready in {:.1} s ({})", t0.elapsed().as_secs_f64(), f.metadata.get("corpus").map(String::as_str).unwrap_or("file"));
        Some(Arc::new(f))
    } else {
        None
    };
    let mopts = MethodOptions { filters, kvpress: false, seed: args.seed };
    // --kvpress: the press of every eviction name that has one; h2o and qfilters have none.
    let press = |m: &str| args.kvpress && matches!(registry::family(m), Ok(Family::Eviction)) && !NO_PRESS.contains(&m);
    if args.kvpress {
        let own: Vec<&String> = plan.methods.iter().filter(|m| NO_PRESS.contains(&m.as_str())).collect();
        if !own.is_empty() {
            eprintln!("--kvpress: {} ha{} no kvpress press and run{} as defined here", own.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", "), if own.len() == 1 { "s" } else { "ve" }, if own.len() == 1 { "s" } else { "" });
        }
    }
    let methods = plan
        .methods
        .iter()
        .map(|m| Ok((m.clone(), if m == "full" { None } else { Some(method_with(m, &MethodOptions { kvpress: press(m), ..mopts.clone() })?) })))
        .collect::<Result<Vec<_>>>()?;
    let budgets = args.budgets.as_deref().map(crate::document::budgets::read_proportions).transpose()?;
    let env = Env { model: &model, tok: &tok, chat, args, plan: &plan, methods, inv_freq: crate::model::rope_inv_freq(&model.config), budgets };

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
    let bar = crate::progress::progress_bar((samples.len() * per_sample) as u64, show, "eval");
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
    plots::write_plots(&args.out, &rows, &plan.methods, &plan.tasks, plan.form)?;
    let command = command_line(args);
    let mut summary = metrics::summary_markdown(&rows, &plan.methods, &plan.ratios, plan.form, &plan.tasks, &command);
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
        "command": command, "model": model_dir.display().to_string(), "methods": plan.methods, "ratios": plan.ratios, "budget_form": plan.form, "kvpress": args.kvpress,
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

fn command_line(a: &EvalOptions) -> String {
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
    if !a.compression_ratios.is_empty() {
        s.push_str(&format!(" --compression-ratios {}", a.compression_ratios.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(",")));
    }
    if !a.row_budgets.is_empty() {
        s.push_str(&format!(" --row-budgets {}", a.row_budgets.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(",")));
    }
    if a.kvpress {
        s.push_str(" --kvpress");
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
