//! `kvcompact budgets`: non-uniform per-head budgets from a sensitivity sweep on a context.

use std::path::PathBuf;

use anyhow::Result;

use kvcompact::compact::registry;
use kvcompact::document::{sensitivity_budgets, write_proportions, CompactOptions, ContextLayout};

use super::{demo_file, model_dir, read_prompt, ModelArg, PromptArg};

/// Compute non-uniform per-head budgets for a model by a sensitivity sweep on a context.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// Context to run the sweep on (default: the shipped demo document).
    #[arg(long)]
    pub context: Option<PathBuf>,
    #[arg(long, default_value_t = 20.0)]
    pub ratio: f64,
    #[arg(long, default_value = "am-highest")]
    pub method: String,
    #[arg(long, default_value_t = 2048)]
    pub n_queries: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output JSON file of proportions {"L{layer}H{kv_head}": p}.
    #[arg(long)]
    pub out: PathBuf,
}

/// `kvcompact budgets`.
pub fn run(a: Args) -> Result<()> {
    let ctx = a.context.clone().unwrap_or_else(|| demo_file("article.txt"));
    let text = read_prompt(&PromptArg { prompt: None, prompt_file: Some(ctx) })?;
    let method = registry::require_am(&a.method, "budgets")?;
    let dir = model_dir(&a.model)?;
    let (model, tok) = kvcompact::generate::load(&dir)?;
    let layout = ContextLayout::build(&tok, &text, tok.has_chat_template())?;
    let opts = CompactOptions { budget: kvcompact::compact::Budget::Ratio(a.ratio), n_queries: a.n_queries, seed: a.seed, ..Default::default() };
    let (props, at_r, at_2r) = sensitivity_budgets(&model, &tok, &layout, &method, &opts)?;
    write_proportions(&a.out, &props)?;
    let nkv = model.config.n_kv_heads;
    let mut rank: Vec<usize> = (0..at_r.len()).collect();
    rank.sort_by(|&x, &y| props[&format!("L{}H{}", y / nkv, y % nkv)].total_cmp(&props[&format!("L{}H{}", x / nkv, x % nkv)]));
    println!("most sensitive heads (rel_l2 at {}x → {}x):", a.ratio, 2.0 * a.ratio);
    for &i in rank.iter().take(8) {
        let key = format!("L{}H{}", i / nkv, i % nkv);
        println!("  {key:>7}: {:.4} → {:.4}  proportion {:.4}", at_r[i], at_2r[i], props[&key]);
    }
    println!("wrote {} ({} heads)", a.out.display(), props.len());
    Ok(())
}
