//! The command line's rooms: one file per command, each with its clap `Args` and its `run`.
//! Commands parse, call the library, and print; what they compute lives in the library so that
//! the server and the Python package can call the same functions.

pub mod bench;
#[cfg(feature = "cuda")]
pub mod bench_gpu;
pub mod budgets;
pub mod compact;
pub mod compact_head;
pub mod convert;
pub mod demo;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod logits;
pub mod qfilters;
pub mod serve;
pub mod synth;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use kvcompact::cache::{KvCache, KvDtype};
use kvcompact::model::Model;

/// `--model DIR`, shared by every command that loads a model.
#[derive(Args)]
pub struct ModelArg {
    /// HF-format model directory (default: SmolLM2-135M-Instruct, fetched on first use).
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// `--prompt TEXT` or `--prompt-file F`.
#[derive(Args)]
#[group(required = true, multiple = false)]
pub struct PromptArg {
    /// Prompt text.
    #[arg(long)]
    pub prompt: Option<String>,
    /// File holding the prompt (UTF-8).
    #[arg(long)]
    pub prompt_file: Option<PathBuf>,
}

/// `--device cpu|cuda` (`generate`, `compact`, `compact-head`, `bench`).
#[derive(Args, Clone, Copy)]
pub struct DeviceArg {
    /// Where the GPU-capable work runs: `cuda` puts decode attention (generate, bench) and
    /// Attention Matching's n×T products (compact, compact-head) on the GPU. Needs a build with
    /// `--features cuda` and an NVIDIA GPU; otherwise a one-line error.
    #[arg(long, value_enum, default_value_t = kvcompact::device::Device::Cpu)]
    pub device: kvcompact::device::Device,
}

/// `--kv-dtype f32|bf16` (`generate`, `logits`, `bench`, `serve`).
#[derive(Args, Clone, Copy)]
pub struct KvDtypeArg {
    /// How the KV cache stores key and value rows: f32, or bf16 (half the bytes; each row
    /// rounded once when stored, attention still in f32). `serve` and `generate` with the same
    /// value give the same tokens.
    #[arg(long, default_value = "f32")]
    pub kv_dtype: KvDtype,
}

/// `--slim` and its two gates (`generate`, `bench`).
#[derive(Args, Clone, Copy)]
pub struct SlimArg {
    /// Slim Attention: cache keys only and rebuild values from them (multi-head-attention
    /// models; refused with the numbers otherwise). Exact to f32 working precision per layer.
    #[arg(long)]
    pub slim: bool,
    /// With --slim: layers whose cond(W_K) exceeds this keep a normal K/V cache.
    #[arg(long, default_value_t = kvcompact::model::slim::DEFAULT_MAX_COND, requires = "slim")]
    pub slim_max_cond: f64,
    /// With --slim: layers whose values, rebuilt from the first prefill's keys, differ from the
    /// true values by more than this (relative Frobenius) keep a normal K/V cache.
    #[arg(long, default_value_t = kvcompact::model::slim::DEFAULT_MAX_REL_ERR, requires = "slim")]
    pub slim_max_rel_err: f64,
}

/// The model directory: `--model`, or the default model (fetched first if absent).
pub fn model_dir(m: &ModelArg) -> Result<PathBuf> {
    match &m.model {
        Some(d) => Ok(d.clone()),
        None => Ok(kvcompact::fetch::ensure_default_model(false)?),
    }
}

/// The prompt text from `--prompt` or `--prompt-file`, refusing an empty or non-UTF-8 one.
pub fn read_prompt(p: &PromptArg) -> Result<String> {
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

/// The shipped demo files live in the repository; found relative to the working directory or,
/// failing that, to where this binary was built.
pub fn demo_file(name: &str) -> PathBuf {
    let local = PathBuf::from("data/demo").join(name);
    if local.exists() {
        return local;
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("data/demo").join(name)
}

/// `--slim`: prepare W_KV per layer (refusing models where slim cannot apply) and print the
/// load-time report to stderr.
pub fn enable_slim(model: &mut Model, a: &SlimArg) -> Result<()> {
    if !a.slim {
        return Ok(());
    }
    if !(a.slim_max_cond >= 1.0) || !(a.slim_max_rel_err >= 0.0) {
        bail!("--slim-max-cond must be ≥ 1 and --slim-max-rel-err ≥ 0");
    }
    let t0 = Instant::now();
    let opts = kvcompact::model::slim::SlimOptions { max_cond: a.slim_max_cond, max_rel_err: a.slim_max_rel_err };
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

/// stderr summary of a slim cache: which layers run K-only, what they were validated on, bytes.
pub fn print_slim_cache(model: &Model, cache: &KvCache) {
    let v = kvcompact::model::slim_report(model, cache);
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
