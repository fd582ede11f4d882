//! `kvcompact compact`: prefill a context, compact its cache, save the compacted cache file.

use std::path::PathBuf;

use anyhow::{Context, Result};
use kvcompact::cache::save_cache;
use kvcompact::compact::{registry, BetaSolver, Budget};
use kvcompact::document::budgets::global_from_name;
use kvcompact::document::press_context;
use kvcompact::document::{compact_context, document_method, read_proportions, CompactOptions, ContextLayout, QuerySource};

use super::{model_dir, read_prompt, ModelArg, PromptArg};

/// Prefill a context, compact its KV cache (Attention Matching), save the compacted cache.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    /// The context (UTF-8 text) to prefill and compact.
    #[arg(long)]
    pub context: PathBuf,
    /// Compaction ratio: the article keeps ⌊T/R⌋ of its T rows per head (default 20).
    #[arg(long, conflicts_with_all = ["compression_ratio", "budget"])]
    pub ratio: Option<f64>,
    /// kvpress's form: the article keeps int(T·(1 − r)) rows per head (at least 1), r in [0, 1).
    #[arg(long, conflicts_with = "budget")]
    pub compression_ratio: Option<f64>,
    /// Rows per KV head the article keeps (all of them when it is shorter).
    #[arg(long)]
    pub budget: Option<usize>,
    /// Any registry name: the Attention Matching family (am-highest, am-omp, am-omp-fast, am-omp-seeded,
    /// baseline) fits β and values; eviction methods keep rows by their score.
    #[arg(long, default_value = "am-highest")]
    pub method: String,
    /// kvpress 0.5.5 semantics for an eviction baseline: the press of the same name compresses
    /// the whole prefilled context (template prefix included), as kvpress's pipeline does.
    /// observed-attention and kvzip always run this way.
    #[arg(long)]
    pub kvpress: bool,
    /// Reference queries: repeat, self-study, context, random or mix.
    #[arg(long, default_value = "repeat")]
    pub queries: String,
    /// Reference queries per KV head.
    #[arg(long, default_value_t = 4096)]
    pub n_queries: usize,
    /// Held-out queries per KV head for the error summary.
    #[arg(long, default_value_t = 256)]
    pub n_test: usize,
    /// Re-extract each layer's queries with the earlier layers already compacted.
    #[arg(long)]
    pub on_policy: bool,
    /// Prefill and compact the context in chunks of this many tokens (bounded memory).
    #[arg(long)]
    pub chunk_tokens: Option<usize>,
    /// Per-head budget proportions, a JSON object {"L{layer}H{kv_head}": p} (e.g. from
    /// `kvcompact budgets`).
    #[arg(long)]
    pub budgets: Option<PathBuf>,
    /// How the AM methods spread their rows over the heads without --budgets: global (one top-k
    /// of AM's key scores over every head, the same total; off-policy) or uniform (⌊T/R⌋ per head).
    #[arg(long, default_value = "global")]
    pub am_budgets: String,
    /// β solver: reference (clamped LS + projected gradient) or active-set (Lawson–Hanson).
    #[arg(long, default_value = "reference")]
    pub nnls: String,
    /// Treat the context as raw text instead of a user message in the chat template.
    #[arg(long)]
    pub raw: bool,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output: the compacted cache (safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also write each compressed head's problem (keys, values, positions, bias, reference and
    /// held-out queries, scale) to DIR/L{layer}H{kv_head}.safetensors, the input `compact-head` reads.
    #[arg(long, value_name = "DIR")]
    pub dump_heads: Option<PathBuf>,
    #[command(flatten)]
    pub device: super::DeviceArg,
}

/// `kvcompact compact`.
pub fn run(a: Args) -> Result<()> {
    let text = read_prompt(&PromptArg { prompt: None, prompt_file: Some(a.context.clone()) })?;
    let solver = BetaSolver::parse(&a.nnls)?;
    let budgets = a.budgets.as_deref().map(read_proportions).transpose()?;
    let opts = CompactOptions {
        budget: Budget::from_forms(a.ratio, a.compression_ratio, a.budget)?.unwrap_or_default(),
        queries: QuerySource::parse(&a.queries)?,
        n_queries: a.n_queries,
        n_test: a.n_test.max(1),
        on_policy: a.on_policy,
        chunk_tokens: a.chunk_tokens,
        global_budgets: budgets.is_none() && global_from_name(&a.am_budgets)?,
        budgets,
        seed: a.seed,
        dump_heads: a.dump_heads.clone(),
        ..Default::default()
    };
    // Bad options and unknown names fail before the model loads (or is fetched).
    opts.check()?;
    a.device.device.check()?;
    if a.device.device != kvcompact::device::Device::Cpu && (a.kvpress || registry::family(&a.method)? != registry::Family::AttentionMatching) {
        return Err(registry::cpu_only(&a.method).into());
    }
    registry::family(&a.method)?;
    if registry::runs_as_press(&a.method, a.kvpress) {
        if a.dump_heads.is_some() {
            anyhow::bail!("--dump-heads writes per-head problems; {} runs as a kvpress press over the whole context, which has none", a.method);
        }
        return run_press(&a, opts.budget);
    }
    if let Some(d) = &a.dump_heads {
        std::fs::create_dir_all(d).with_context(|| format!("--dump-heads {}", d.display()))?;
    }
    let dir = model_dir(&a.model)?;
    let (model, tok) = kvcompact::generate::load(&dir)?;
    let method = document_method(&model, &a.method, solver, a.device.device)?;
    let chat = !a.raw && tok.has_chat_template();
    let layout = ContextLayout::build(&tok, &text, chat)?;
    eprintln!(
        "compacting {} context tokens ({} article) with {} at {}, {} queries ({}{})",
        layout.len(), layout.article.len(), a.method, opts.budget, a.queries, a.n_queries,
        if a.on_policy { ", on-policy" } else { "" }
    );
    let (cache, report) = compact_context(&model, &tok, &layout, method.as_ref(), &opts)?;
    // Shared with the Python package, so both write the same bytes for the same arguments.
    let params = opts.cache_params(&a.method, solver, &layout);
    save_cache(&a.out, &model.cache_id(), &cache, chat, &params)?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    println!("layer  rows(before→after)  rel_l2 mean / max   mass_err mean  guard");
    for l in &report.layers {
        println!("{:>5}  {:>7} → {:<7}  {:>9.4} / {:<7.4}  {:>13.4}  {:>5}", l.layer, l.rows_before, l.rows_after, l.mean_rel_l2, l.max_rel_l2, l.mean_mass_err, l.guard_trips);
    }
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    println!(
        "KV bytes: {:.2} MiB → {:.2} MiB ({:.1}x smaller) | held-out rel_l2 {:.4}, mass_err {:.4}",
        mib(report.kv_bytes_before), mib(report.kv_bytes_after),
        report.kv_bytes_before as f64 / report.kv_bytes_after.max(1) as f64, report.mean_rel_l2, report.mean_mass_err
    );
    println!(
        "time: total {:.2} s = prefill {:.2} + queries {:.2} + budgets {:.2} + compaction {:.2} (per-head sums: attention {:.2}, select {:.2}, beta {:.2}, values {:.2}) + eval {:.2}",
        report.total_seconds, report.prefill_seconds, report.query_seconds, report.budget_seconds, report.compact_seconds,
        report.attn_seconds, report.select_seconds, report.beta_seconds, report.values_seconds, report.eval_seconds
    );
    println!("saved {}", a.out.display());
    Ok(())
}

/// `compact` through a kvpress press ([`press_context`]).
fn run_press(a: &Args, budget: Budget) -> Result<()> {
    let press = registry::press_from_name(&a.method, a.seed)?;
    if a.budgets.is_some() || a.on_policy || a.chunk_tokens.is_some() {
        anyhow::bail!("--budgets, --on-policy and --chunk-tokens shape Attention Matching's compaction; a kvpress press takes none of them");
    }
    let text = read_prompt(&PromptArg { prompt: None, prompt_file: Some(a.context.clone()) })?;
    let dir = model_dir(&a.model)?;
    let (model, tok) = kvcompact::generate::load(&dir)?;
    let chat = !a.raw && tok.has_chat_template();
    let layout = ContextLayout::build(&tok, &text, chat)?;
    eprintln!("compressing {} context tokens ({} article) with kvpress's {} at {budget}", layout.len(), layout.article.len(), a.method);
    let (cache, report) = press_context(&model, &tok, &layout, &press, budget)?;
    save_cache(&a.out, &model.cache_id(), &cache, chat, &report.cache_params(a.seed))?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(());
    }
    let mib = |b: usize| b as f64 / (1u64 << 20) as f64;
    let (lo, hi) = report.kept_rows.iter().fold((usize::MAX, 0), |(lo, hi), &n| (lo.min(n), hi.max(n)));
    println!(
        "kept {lo}–{hi} of {} rows per head (compression ratio {:.4}) | KV bytes: {:.2} MiB → {:.2} MiB ({:.1}x smaller)",
        report.compressed_tokens, report.compression_ratio, mib(report.kv_bytes_before), mib(report.kv_bytes_after),
        report.kv_bytes_before as f64 / report.kv_bytes_after.max(1) as f64
    );
    println!("time: total {:.2} s = prefill {:.2} + scores {:.2}", report.total_seconds, report.prefill_seconds, report.score_seconds);
    println!("saved {}", a.out.display());
    Ok(())
}

