//! What an evaluation runs: the options (one field per `kvcompact eval` flag) and the plan they
//! resolve to (defaults for a full or a `--quick` run, with the user's overrides).

use std::path::PathBuf;

use super::tasks;
use crate::compact::registry;
use crate::compact::Budget;
use crate::error::{Error, Result};

/// The default run's methods: both AM methods, the strongest eviction baselines of our earlier
/// runs (KVzip, SnapKV, Expected Attention, Q-Filters), StreamingLLM as the floor, and the full
/// cache — the sweep that fits 20 contexts per task at two lengths in about 30 minutes on 2
/// cores. `--methods` takes any of [`registry::METHODS`].
pub const DEFAULT_METHODS: &[&str] = &["am-omp", "am-highest", "am-omp-seeded", "kvzip", "snapkv", "expected-attention", "qfilters", "streaming-llm", "full"];

/// The default run's tasks: retrieval of one and of several needles, and chain tracking;
/// `niah-multivalue`, `niah-multiquery`, `cwe`, `fwe` and `qa` run when named.
pub const DEFAULT_TASKS: &[&str] = &["passkey", "niah-multikey", "variable-tracking"];

/// AM reference queries per KV head by default: every token of the repeat pass for articles up to
/// 4096 / 3 tokens on SmolLM2 (3 query heads per KV head). See AMDIAG.md (branch amdiag): with
/// 1024 half-self-study queries the C_v fit overfits heads that get many rows.
pub const DEFAULT_N_QUERIES: usize = 4096;

/// Source of the AM reference queries by default (repeat-prefill, spec §8.1's CPU default).
pub const DEFAULT_AM_QUERIES: &str = "repeat";

pub use crate::document::budgets::AM_BUDGETS;

/// Contexts per task in the default run (enough for ±0.2 intervals on a 0.5 accuracy).
pub const DEFAULT_SAMPLES: usize = 20;

/// What `kvcompact eval` runs (the CLI flags of the same names fill it; see `cli/eval.rs`).
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// HF-format model directory (default: the default model).
    pub model: Option<PathBuf>,
    /// Comma-separated methods (default: am-omp, am-highest, am-omp-seeded, kvzip, snapkv, expected-attention,
    /// qfilters, streaming-llm, full; any of): am-omp, am-highest, am-omp-seeded, baseline, qfilters,
    /// streaming-llm, h2o, snapkv, pyramidkv, tova, knorm, expected-attention, random,
    /// observed-attention, kvzip, full.
    pub methods: Vec<String>,
    /// Comma-separated compression ratios (article rows kept per head = ⌊T/ratio⌋; default 10,20,50).
    pub ratios: Vec<f64>,
    /// kvpress's budget form instead of ratios: compression ratios r in [0, 1), each head keeps
    /// int(T·(1 − r)) article rows.
    pub compression_ratios: Vec<f64>,
    /// Absolute budgets instead of ratios: article rows kept per KV head.
    pub row_budgets: Vec<usize>,
    /// kvpress 0.5.5 semantics for every eviction baseline that has a press (h2o and qfilters
    /// have none and run as defined here).
    pub kvpress: bool,
    /// Comma-separated tasks: passkey, niah-multikey, niah-multivalue, niah-multiquery,
    /// variable-tracking, cwe, fwe, qa (default: passkey, niah-multikey, variable-tracking).
    pub tasks: Vec<String>,
    /// Samples (contexts) per task (default 20; --quick 4). QA has one sample per document.
    pub samples: Option<usize>,
    /// Run seed: tasks, query subsampling and every method's per-head seed derive from it.
    pub seed: u64,
    /// Output directory.
    pub out: PathBuf,
    /// Small CI run: passkey, ratios 10,20, methods am-highest, qfilters, knorm, streaming-llm,
    /// full, 4 samples of 512 tokens (each overridable), and the ordering checks.
    pub quick: bool,
    /// Context lengths in tokens for the synthetic tasks, cycled over samples (default 256,512:
    /// half the contexts at each). Capped to
    /// what the model's context holds.
    pub lengths: Vec<usize>,
    /// Needle depths in [0, 1], cycled over samples (default 0.5,0.1,0.9,0.3,0.7).
    pub depths: Vec<f64>,
    /// Needles per niah-multikey context.
    pub keys: usize,
    /// Needles asked per niah-multikey context.
    pub keys_asked: usize,
    /// Questions asked per QA document.
    pub qa_questions: usize,
    /// QA documents: a JSON list of {title, document | document_file, questions: [{question,
    /// answer_prefix, answers, max_new_tokens}]} (default: the shipped documents in data/qa).
    pub qa_docs: Option<PathBuf>,
    /// Q-Filters file (default: `<out>/qfilters.safetensors` or `<model>/qfilters.safetensors` if
    /// present, else calibrated on the shipped corpus and saved as `<out>/qfilters.safetensors`).
    pub filters: Option<PathBuf>,
    /// Attention Matching reference queries per KV head (off-policy, shared by every AM method and ratio).
    pub n_queries: usize,
    /// Source of the AM reference queries: repeat (default), self-study, or ss-plus-repeat (half each).
    pub am_queries: String,
    /// Tokens per self-study answer (three prompts: summary, questions, facts).
    pub self_study_tokens: usize,
    /// Continuation tokens per question whose queries serve as test queries for the per-head errors.
    pub n_test: usize,
    /// Per-head budget proportions (JSON {"L{l}H{h}": p}) applied to every method (spec §11).
    pub budgets: Option<PathBuf>,
    /// Per-head budgets of the AM methods without `--budgets`: `global` (default) spreads the
    /// uniform total over the heads by one global top-k of AM's key score (the max attention a
    /// row gets from the reference queries, normalised over the whole context) — the allocation
    /// KVzip makes; `uniform` gives every head ⌊T/ratio⌋ rows.
    pub am_budgets: String,
    /// Treat contexts as raw text (no chat template).
    pub raw: bool,
    /// Fail (exit 1) when an ordering check does not hold (checks run with --quick or --check).
    pub check: bool,
    /// No progress bar.
    pub no_progress: bool,
    /// Run only shard i of n (1-based; every n-th context): `kvcompact eval merge` joins the
    /// shards' output directories.
    pub shard: Option<(usize, usize)>,
}

/// The resolved run: defaults (full or quick) with the user's overrides.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Method names, each known to the registry, in reporting order.
    pub methods: Vec<String>,
    /// The budget points of the sweep, all of one form (`--ratios`, `--compression-ratios` or
    /// `--row-budgets`).
    pub points: Vec<Budget>,
    /// Each point's value (R, r or N): the `ratio` column of the results, which is the point's
    /// key whatever its form.
    pub ratios: Vec<f64>,
    /// The points' form: "ratio", "compression_ratio" or "budget" ([`Budget::entry`]).
    pub form: &'static str,
    /// Task names, each in [`tasks::TASKS`].
    pub tasks: Vec<String>,
    /// Samples per task, ≥ 1.
    pub samples: usize,
    /// Context lengths in tokens, each > 0 (before capping to the model's context).
    pub lengths: Vec<usize>,
    /// Needle depths, each in [0, 1].
    pub depths: Vec<f64>,
    /// Run the ordering checks (`--quick` or `--check`).
    pub checks: bool,
}

impl Plan {
    /// Resolve `a` against the full or quick defaults, rejecting unknown methods and tasks and
    /// out-of-range ratios, depths and lengths.
    pub fn from_args(a: &EvalOptions) -> Result<Plan> {
        let or = |v: &Vec<String>, d: &[&str]| if v.is_empty() { d.iter().map(|s| s.to_string()).collect() } else { v.clone() };
        let (dm, dr, dt, dl): (&[&str], &[f64], &[&str], &[usize]) = if a.quick {
            (&["am-highest", "qfilters", "knorm", "streaming-llm", "full"], &[10.0, 20.0], &["passkey"], &[512])
        } else {
            (DEFAULT_METHODS, &[10.0, 20.0, 50.0], DEFAULT_TASKS, &[256, 512])
        };
        let methods = or(&a.methods, dm);
        for m in &methods {
            registry::family(m)?;
        }
        let tasks = or(&a.tasks, dt);
        for t in &tasks {
            if !tasks::TASKS.contains(&t.as_str()) {
                return Err(Error::Invalid(format!("unknown task {t:?} (expected one of {})", tasks::TASKS.join(", "))));
            }
        }
        let given = [!a.ratios.is_empty(), !a.compression_ratios.is_empty(), !a.row_budgets.is_empty()];
        if given.iter().filter(|g| **g).count() > 1 {
            return Err(Error::Invalid("give one budget form: --ratios, --compression-ratios or --row-budgets, not several".into()));
        }
        let points: Vec<Budget> = if !a.compression_ratios.is_empty() {
            a.compression_ratios.iter().map(|&r| Budget::CompressionRatio(r)).collect()
        } else if !a.row_budgets.is_empty() {
            a.row_budgets.iter().map(|&n| Budget::Rows(n)).collect()
        } else if !a.ratios.is_empty() {
            a.ratios.iter().map(|&r| Budget::Ratio(r)).collect()
        } else {
            dr.iter().map(|&r| Budget::Ratio(r)).collect()
        };
        for p in &points {
            p.check()?;
        }
        if !AM_BUDGETS.contains(&a.am_budgets.as_str()) {
            return Err(Error::Invalid(format!("--am-budgets {:?}: expected {}", a.am_budgets, AM_BUDGETS.join(" or "))));
        }
        if a.budgets.is_some() && !matches!(points[0], Budget::Ratio(_)) {
            return Err(Error::Invalid("--budgets (per-head proportions) takes --ratios".into()));
        }
        let form = points[0].entry().0;
        let ratios: Vec<f64> = points.iter().map(|p| p.entry().1.as_f64().unwrap_or(f64::NAN)).collect();
        let depths = if a.depths.is_empty() { vec![0.5, 0.1, 0.9, 0.3, 0.7] } else { a.depths.clone() };
        if depths.iter().any(|d| !(0.0..=1.0).contains(d)) {
            return Err(Error::Invalid("--depths must lie in [0, 1]".into()));
        }
        let lengths = if a.lengths.is_empty() { dl.to_vec() } else { a.lengths.clone() };
        if lengths.contains(&0) {
            return Err(Error::Invalid("--lengths must be positive".into()));
        }
        Ok(Plan { methods, points, ratios, form, tasks, samples: a.samples.unwrap_or(if a.quick { 4 } else { DEFAULT_SAMPLES }).max(1), lengths, depths, checks: a.quick || a.check })
    }
}
