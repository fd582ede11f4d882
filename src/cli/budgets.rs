//! `kvcompact budgets`: per-head budget proportions for a model from influence curves and the
//! swap solver (spec §11), calibrated on generated task contexts.

use std::path::PathBuf;

use anyhow::{Context, Result};

use kvcompact::compact::registry;
use kvcompact::document::influence::{influence_curves, proportions_map, swap_solve, Calibration, InfluenceOptions, SwapOptions};
use kvcompact::document::{followup_tokens, write_proportions, CompactOptions, ContextLayout};
use kvcompact::eval::tasks::{self, TaskConfig};

use super::ModelArg;

/// Per-head budget proportions {"L{layer}H{kv_head}": p} for a model: sweep every head over a grid
/// of fractions on calibration contexts (answer log-ppl when that head alone keeps more or less),
/// then move budget greedily to where it lowers the predicted log-ppl most.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Calibration tasks (the eval's generators).
    #[arg(long, value_delimiter = ',', default_value = "passkey,niah-multikey,variable-tracking")]
    pub tasks: Vec<String>,
    /// Contexts per task.
    #[arg(long, default_value_t = 2)]
    pub samples: usize,
    /// Context lengths in tokens, cycled over the samples.
    #[arg(long, value_delimiter = ',', default_value = "512")]
    pub lengths: Vec<usize>,
    /// Seed of the calibration contexts (the eval's default is 0: keep them apart).
    #[arg(long, default_value_t = 1000)]
    pub seed: u64,
    /// Attention Matching method whose compactions are swept (the spec uses HighestAttnKeys).
    #[arg(long, default_value = "am-highest")]
    pub method: String,
    #[arg(long, default_value_t = 4096)]
    pub n_queries: usize,
    /// Article fractions one head keeps while the others keep --base (0 and 1 allowed).
    #[arg(long, value_delimiter = ',', default_value = "0,0.01,0.02,0.05,0.1,0.2,0.35,0.5,1")]
    pub fractions: Vec<f64>,
    /// Fraction every other head keeps during the sweep (one of --fractions).
    #[arg(long, default_value_t = 0.05)]
    pub base: f64,
    /// Overall fractions (1/ratio) the solver's loss averages over.
    #[arg(long, value_delimiter = ',', default_value = "0.01,0.02,0.05,0.1")]
    pub targets: Vec<f64>,
    /// Proportion moved per solver step.
    #[arg(long, default_value_t = 0.001)]
    pub step: f64,
    /// Solver steps without improvement before it stops.
    #[arg(long, default_value_t = 10)]
    pub patience: usize,
    /// Output JSON file of proportions {"L{layer}H{kv_head}": p} (for `--budgets`).
    #[arg(long)]
    pub out: PathBuf,
    /// Also write the measured curves (JSON) here.
    #[arg(long)]
    pub curves: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `kvcompact budgets`.
pub fn run(a: Args) -> Result<()> {
    let method = registry::require_am(&a.method, "budgets")?;
    if a.samples == 0 || a.lengths.is_empty() {
        anyhow::bail!("--samples and --lengths must not be empty");
    }
    let dir = super::model_dir(&a.model)?;
    let (model, tok) = kvcompact::generate::load(&dir)?;
    let chat = tok.has_chat_template();
    let cfg = TaskConfig {
        lengths: a.lengths.clone(),
        depths: vec![0.5, 0.1, 0.9, 0.3, 0.7],
        keys: 4,
        keys_asked: 2,
        qa_questions: 3,
        qa_docs: if a.tasks.iter().any(|t| t == "qa") { tasks::shipped_qa()? } else { Vec::new() },
    };
    let mut items = Vec::new();
    for task in &a.tasks {
        for s in tasks::generate(task, a.samples, a.seed, &cfg, &tok)? {
            let layout = ContextLayout::build(&tok, &s.context, chat)?;
            let mut questions = Vec::new();
            for q in &s.questions {
                let mut ids = followup_tokens(&tok, chat, &q.question)?;
                if !q.answer_prefix.is_empty() {
                    ids.extend(tok.encode(&q.answer_prefix, false)?);
                }
                questions.push((ids, q.max_new_tokens.max(1)));
            }
            items.push(Calibration { layout, questions });
        }
    }
    let opts = InfluenceOptions {
        fractions: a.fractions.clone(),
        base: a.base,
        compact: CompactOptions { n_queries: a.n_queries, n_test: 16, ..Default::default() },
    };
    let nkv = model.config.n_kv_heads;
    let heads = model.config.n_layers * nkv;
    let bar = kvcompact::progress::progress_bar((items.len() * heads) as u64, !a.quiet, "influence sweep");
    let t0 = std::time::Instant::now();
    let (mut done, n_items) = (0usize, items.len());
    let curves = influence_curves(&model, &tok, &items, &method, &opts, || {
        bar.inc(1);
        done += 1;
        if done % heads == 0 && bar.is_hidden() && !a.quiet {
            eprintln!("context {}/{n_items} swept ({:.0} s)", done / heads, t0.elapsed().as_secs_f64());
        }
    })?;
    bar.finish_and_clear();
    let sweep_s = t0.elapsed().as_secs_f64();
    if let Some(path) = &a.curves {
        std::fs::write(path, serde_json::to_string_pretty(&curves)?).with_context(|| format!("writing {}", path.display()))?;
    }
    let solved = swap_solve(&curves, &SwapOptions { targets: a.targets.clone(), step: a.step, patience: a.patience, ..Default::default() })?;
    let props = proportions_map(&solved.proportions, nkv);
    write_proportions(&a.out, &props)?;
    println!(
        "influence sweep: {} contexts, {} questions, {} heads × {} fractions in {sweep_s:.0} s; answer NLL full {:.3}, every head at {}: {:.3}",
        curves.contexts,
        curves.questions,
        heads,
        curves.fractions.len(),
        curves.full_nll,
        curves.base,
        curves.base_nll
    );
    println!("swap solver: {} steps; predicted Δ NLL (sum over heads, mean over targets) uniform {:+.3} → {:+.3}", solved.steps, solved.uniform_loss, solved.loss);
    let mut rank: Vec<usize> = (0..heads).collect();
    rank.sort_by(|&x, &y| solved.proportions[y].total_cmp(&solved.proportions[x]).then(x.cmp(&y)));
    let show = |i: usize| format!("L{}H{} {:.2}×", i / nkv, i % nkv, solved.proportions[i] * heads as f64);
    println!("largest shares (× uniform): {}", rank.iter().take(8).map(|&i| show(i)).collect::<Vec<_>>().join(", "));
    println!("smallest shares: {}", rank.iter().rev().take(4).map(|&i| show(i)).collect::<Vec<_>>().join(", "));
    println!("wrote {} ({} heads)", a.out.display(), props.len());
    Ok(())
}
