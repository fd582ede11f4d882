//! `kvcompact eval`: the harness's flags; the harness itself is `kvcompact::eval`.

use std::path::PathBuf;

use anyhow::Result;

use kvcompact::eval::EvalOptions;

use super::{model_dir, ModelArg};

/// Rank compression methods on the same tasks (accuracy, log-ppl, KL, per-head errors, bytes).
#[derive(clap::Args, Debug, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct Args {
    /// `merge`: join the output directories of a sharded sweep.
    #[command(subcommand)]
    pub cmd: Option<Sub>,
    /// HF-format model directory (default: the default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Comma-separated methods (default: am-omp, am-highest, am-omp-seeded, kvzip, snapkv, expected-attention,
    /// qfilters, streaming-llm, full; any of): am-omp, am-highest, am-omp-seeded, baseline, qfilters,
    /// streaming-llm, h2o, snapkv, pyramidkv, tova, knorm, expected-attention, random,
    /// observed-attention, kvzip, full.
    #[arg(long, value_delimiter = ',')]
    pub methods: Vec<String>,
    /// Comma-separated compression ratios (article rows kept per head = ⌊T/ratio⌋; default 10,20,50).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["compression_ratios", "row_budgets"])]
    pub ratios: Vec<f64>,
    /// kvpress's form instead: comma-separated compression ratios r in [0, 1); each head keeps
    /// int(T·(1 − r)) article rows.
    #[arg(long, value_delimiter = ',', conflicts_with = "row_budgets")]
    pub compression_ratios: Vec<f64>,
    /// Absolute budgets instead: comma-separated article rows kept per KV head.
    #[arg(long, value_delimiter = ',')]
    pub row_budgets: Vec<usize>,
    /// kvpress 0.5.5 semantics for every eviction baseline that has a press (h2o and qfilters
    /// have none and run as defined here).
    #[arg(long)]
    pub kvpress: bool,
    /// Comma-separated tasks: passkey, niah-multikey, niah-multivalue, niah-multiquery,
    /// variable-tracking, cwe, fwe, qa (default: passkey, niah-multikey, variable-tracking).
    #[arg(long, value_delimiter = ',')]
    pub tasks: Vec<String>,
    /// Samples (contexts) per task (default 20; --quick 4). QA has one sample per document.
    #[arg(long)]
    pub samples: Option<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory (required).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run only shard i of n (1-based; every n-th context), e.g. `--shard 2/4` on the second of
    /// four machines; `kvcompact eval merge` joins the shards' output directories.
    #[arg(long)]
    pub shard: Option<String>,
    /// Small CI run: passkey, ratios 10,20, methods am-highest, qfilters, knorm, streaming-llm,
    /// full, 4 samples of 512 tokens (each overridable), and the ordering checks.
    #[arg(long)]
    pub quick: bool,
    /// Context lengths in tokens for the synthetic tasks, cycled over samples (default 256,512:
    /// half the contexts at each). Capped to
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
    /// The default (4096) takes every token of the repeat pass up to articles of 1365 tokens (three
    /// query heads per KV head); fewer queries let the C_v fit overfit the heads given many rows.
    #[arg(long, default_value_t = kvcompact::eval::options::DEFAULT_N_QUERIES)]
    pub n_queries: usize,
    /// Source of the AM reference queries: repeat (default), self-study, or ss-plus-repeat (half each).
    #[arg(long, default_value = kvcompact::eval::options::DEFAULT_AM_QUERIES)]
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
    /// Per-head budgets of the AM methods without --budgets: global (one global top-k of AM's key
    /// score over every head's article rows, the allocation KVzip makes; same total) or uniform
    /// (⌊T/ratio⌋ rows per head).
    #[arg(long, default_value = "global")]
    pub am_budgets: String,
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

/// `kvcompact eval` subcommands.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Sub {
    /// Join the output directories of `kvcompact eval --shard i/n` runs (every shard of one
    /// sweep, each once) into one result, as a single run would have written it.
    Merge {
        /// Output directory of the merged result.
        #[arg(long)]
        out: PathBuf,
        /// The shards' output directories.
        #[arg(required = true)]
        shards: Vec<PathBuf>,
    },
}

impl Args {
    /// The library's options, field by field (`out` and `shard` checked).
    pub fn options(self) -> Result<EvalOptions> {
        let out = self.out.ok_or_else(|| anyhow::anyhow!("eval: --out DIR is required"))?;
        let shard = self.shard.as_deref().map(kvcompact::eval::parse_shard).transpose()?;
        Ok(EvalOptions {
            model: self.model,
            methods: self.methods,
            ratios: self.ratios,
            compression_ratios: self.compression_ratios,
            row_budgets: self.row_budgets,
            kvpress: self.kvpress,
            tasks: self.tasks,
            samples: self.samples,
            seed: self.seed,
            out,
            shard,
            quick: self.quick,
            lengths: self.lengths,
            depths: self.depths,
            keys: self.keys,
            keys_asked: self.keys_asked,
            qa_questions: self.qa_questions,
            qa_docs: self.qa_docs,
            filters: self.filters,
            n_queries: self.n_queries,
            am_queries: self.am_queries,
            self_study_tokens: self.self_study_tokens,
            n_test: self.n_test,
            budgets: self.budgets,
            am_budgets: self.am_budgets,
            raw: self.raw,
            check: self.check,
            no_progress: self.no_progress,
        })
    }
}

/// `kvcompact eval`.
pub fn run(a: Args) -> Result<()> {
    if let Some(Sub::Merge { out, shards }) = &a.cmd {
        return Ok(kvcompact::eval::merge(out, shards)?);
    }
    let dir = model_dir(&ModelArg { model: a.model.clone() })?;
    Ok(kvcompact::eval::run(&dir, &a.options()?)?)
}
