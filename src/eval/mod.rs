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
//! water-fill; KVzip and, with `--am-budgets global` (default), the AM methods: the same total
//! spread over the heads by one global top-k of their scores), template rows stay, and the
//! result is installed as a real ragged cache (evicted rows are freed). Each question is then teacher-forced on that cache ([`metrics`] defines every
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
    // Every shard writes the whole task list (it is the same for all) and runs its own part.
    metrics::write(&args.out, "tasks.jsonl", &tasks::to_jsonl(&samples))?;
    if let Some((i, n)) = args.shard {
        samples = shard_of(samples, i, n);
    }

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

    let elapsed = t_all.elapsed().as_secs_f64();
    let run_info = serde_json::json!({
        "command": command_line(args), "model": model_dir.display().to_string(), "methods": plan.methods, "ratios": plan.ratios, "budget_form": plan.form, "kvpress": args.kvpress,
        "tasks": plan.tasks, "samples": plan.samples, "lengths": plan.lengths, "depths": plan.depths, "seed": args.seed,
        "n_queries": args.n_queries, "am_queries": args.am_queries, "am_budgets": args.am_budgets, "chat": chat, "checks_run": plan.checks,
        "shard": args.shard.map(|(i, n)| serde_json::json!([i, n])), "contexts": samples.len(),
        "skipped": skipped, "seconds": elapsed, "seconds_by_phase": timings,
    });
    let checks = report(&args.out, &records, &plan, run_info)?;
    if args.check && checks.iter().any(|c| !c.loose_pass) {
        return Err(Error::Invalid("an ordering check failed (see summary.md)".into()));
    }
    Ok(())
}

/// The samples of shard `i` of `n` (1-based): every n-th, so each shard gets its share of every
/// task and length.
pub fn shard_of<T>(samples: Vec<T>, i: usize, n: usize) -> Vec<T> {
    samples.into_iter().enumerate().filter(|(k, _)| k % n == i - 1).map(|(_, s)| s).collect()
}

/// Parse `--shard i/n` (1 ≤ i ≤ n).
pub fn parse_shard(s: &str) -> Result<(usize, usize)> {
    let bad = || Error::Invalid(format!("--shard {s:?}: expected i/n with 1 <= i <= n, e.g. 2/4"));
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n): (usize, usize) = (i.trim().parse().map_err(|_| bad())?, n.trim().parse().map_err(|_| bad())?);
    if i == 0 || i > n {
        return Err(bad());
    }
    Ok((i, n))
}

/// Everything after the runs: results.json/csv, records.jsonl, plots, summary.md (with the
/// ordering checks when the plan runs them) and run.json (`info` plus the checks). Returns the checks.
fn report(out: &Path, records: &[Record], plan: &Plan, mut info: serde_json::Value) -> Result<Vec<Check>> {
    let rows = metrics::aggregate(records, &plan.methods, &plan.tasks);
    metrics::write_results(out, &rows)?;
    let raw: String = records.iter().map(|r| serde_json::to_string(r).unwrap_or_default() + "\n").collect();
    metrics::write(out, "records.jsonl", &raw)?;
    plots::write_plots(out, &rows, &plan.methods, &plan.tasks, plan.form)?;
    let command = info["command"].as_str().unwrap_or("kvcompact eval").to_string();
    let mut summary = metrics::summary_markdown(&rows, &plan.methods, &plan.ratios, plan.form, &plan.tasks, &command);
    summary.push_str("**KV memory held against quality** (mean over tasks; plots/pareto.png)\n\n");
    summary.push_str(&plots::pareto_markdown(&rows, &plan.methods));
    summary.push('\n');
    let checks = if plan.checks { ordering_checks(&rows, plan) } else { Vec::new() };
    if !checks.is_empty() {
        summary.push_str("**ordering checks**\n\n");
        for c in &checks {
            summary.push_str(&format!("- {}\n", c.line()));
        }
    }
    let contexts = info["contexts"].as_u64().unwrap_or(0);
    let skipped = info["skipped"].as_array().map_or(0, Vec::len);
    let seconds = info["seconds"].as_f64().unwrap_or(0.0);
    let shard = match info["shard"].as_array() {
        Some(v) => format!(" (shard {}/{})", v[0], v[1]),
        None => String::new(),
    };
    summary.push_str(&format!("\n{contexts} contexts{shard} ({skipped} skipped), {} records, {seconds:.0} s total.\n", records.len()));
    metrics::write(out, "summary.md", &summary)?;
    info["checks"] = checks.iter().map(|c| c.json()).collect();
    metrics::write(out, "run.json", &serde_json::to_string_pretty(&info).unwrap_or_default())?;
    println!("{summary}");
    println!("wrote {}/results.json, results.csv, summary.md, plots/ ({seconds:.0} s)", out.display());
    Ok(checks)
}

/// The run.json fields every shard of one sweep must share.
const SWEEP_KEYS: &[&str] = &["model", "methods", "ratios", "budget_form", "kvpress", "tasks", "samples", "lengths", "depths", "seed", "n_queries", "am_queries", "am_budgets", "chat", "checks_run"];

/// `kvcompact eval merge`: join the shards of one sweep (each a `kvcompact eval --shard i/n`
/// output directory) into `out`, as one run over every context would have written it (the
/// intervals resample the same contexts; timings are the shards' sum).
pub fn merge(out: &Path, shards: &[std::path::PathBuf]) -> Result<()> {
    if shards.is_empty() {
        return Err(Error::Invalid("eval merge: give the shards' output directories".into()));
    }
    let mut infos = Vec::new();
    let mut records = Vec::new();
    for d in shards {
        let p = d.join("run.json");
        let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
        let info: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: {e}", p.display())))?;
        records.extend(metrics::read_records(&d.join("records.jsonl"))?);
        infos.push((d, info));
    }
    let (d0, first) = &infos[0];
    let n = first["shard"][1].as_u64().ok_or_else(|| Error::Invalid(format!("{}: not a shard (run with --shard i/n)", d0.display())))?;
    let mut seen = vec![false; n as usize];
    for (d, info) in &infos {
        for k in SWEEP_KEYS {
            if info[k] != first[k] {
                return Err(Error::Invalid(format!("{} and {} are not shards of one sweep: {k} differs ({} vs {})", d0.display(), d.display(), first[k], info[k])));
            }
        }
        let (i, m) = (info["shard"][0].as_u64().unwrap_or(0), info["shard"][1].as_u64().unwrap_or(0));
        if m != n || i == 0 || i > n {
            return Err(Error::Invalid(format!("{}: shard {i}/{m} does not belong to a sweep of {n} shards", d.display())));
        }
        if std::mem::replace(&mut seen[i as usize - 1], true) {
            return Err(Error::Invalid(format!("{}: shard {i}/{n} given twice", d.display())));
        }
    }
    let missing: Vec<String> = seen.iter().enumerate().filter(|(_, s)| !**s).map(|(i, _)| format!("{}/{n}", i + 1)).collect();
    if !missing.is_empty() {
        return Err(Error::Invalid(format!("eval merge: shard{} {} missing", if missing.len() == 1 { "" } else { "s" }, missing.join(", "))));
    }
    let strs = |v: &serde_json::Value| -> Vec<String> { v.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect()).unwrap_or_default() };
    let nums = |v: &serde_json::Value| -> Vec<f64> { v.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default() };
    let form: &'static str = match first["budget_form"].as_str() {
        Some("compression_ratio") => "compression_ratio",
        Some("budget") => "budget",
        _ => "ratio",
    };
    let ratios = nums(&first["ratios"]);
    let points = ratios
        .iter()
        .map(|&v| match form {
            "compression_ratio" => crate::compact::Budget::CompressionRatio(v),
            "budget" => crate::compact::Budget::Rows(v as usize),
            _ => crate::compact::Budget::Ratio(v),
        })
        .collect();
    let plan = Plan {
        methods: strs(&first["methods"]),
        points,
        ratios,
        form,
        tasks: strs(&first["tasks"]),
        samples: first["samples"].as_u64().unwrap_or(1) as usize,
        lengths: nums(&first["lengths"]).into_iter().map(|x| x as usize).collect(),
        depths: nums(&first["depths"]),
        checks: first["checks_run"].as_bool().unwrap_or(false),
    };
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let tasks_file = d0.join("tasks.jsonl");
    if tasks_file.exists() {
        std::fs::copy(&tasks_file, out.join("tasks.jsonl")).map_err(|e| Error::io(&tasks_file, e))?;
    }
    let shard_cmd = first["command"].as_str().unwrap_or("kvcompact eval");
    let base: Vec<&str> = shard_cmd.split(' ').collect();
    let mut cmd = Vec::new();
    let mut k = 0;
    while k < base.len() {
        if base[k] == "--shard" {
            k += 2;
            continue;
        }
        cmd.push(base[k]);
        k += 1;
    }
    let dirs: Vec<String> = shards.iter().map(|d| d.display().to_string()).collect();
    let mut info = first.clone();
    info["command"] = format!("{} --shard i/{n} (i = 1..{n}), then kvcompact eval merge --out {} {}", cmd.join(" "), out.display(), dirs.join(" ")).into();
    info["shard"] = serde_json::Value::Null;
    info["merged"] = dirs.into();
    info["contexts"] = infos.iter().map(|(_, i)| i["contexts"].as_u64().unwrap_or(0)).sum::<u64>().into();
    info["seconds"] = infos.iter().map(|(_, i)| i["seconds"].as_f64().unwrap_or(0.0)).sum::<f64>().into();
    info["skipped"] = infos.iter().flat_map(|(_, i)| i["skipped"].as_array().cloned().unwrap_or_default()).collect::<Vec<_>>().into();
    let mut phases = serde_json::Map::new();
    for (_, i) in &infos {
        for (k, v) in i["seconds_by_phase"].as_object().into_iter().flatten() {
            let e = phases.entry(k.clone()).or_insert(0.0.into());
            *e = (e.as_f64().unwrap_or(0.0) + v.as_f64().unwrap_or(0.0)).into();
        }
    }
    info["seconds_by_phase"] = phases.into();
    report(out, &records, &plan, info)?;
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
    if a.n_queries != options::DEFAULT_N_QUERIES {
        s.push_str(&format!(" --n-queries {}", a.n_queries));
    }
    if a.am_queries != options::DEFAULT_AM_QUERIES {
        s.push_str(&format!(" --am-queries {}", a.am_queries));
    }
    if a.am_budgets != "global" {
        s.push_str(&format!(" --am-budgets {}", a.am_budgets));
    }
    if let Some(p) = &a.budgets {
        s.push_str(&format!(" --budgets {}", p.display()));
    }
    if let Some((i, n)) = a.shard {
        s.push_str(&format!(" --shard {i}/{n}"));
    }
    s.push_str(&format!(" --seed {} --out {}", a.seed, a.out.display()));
    s
}
