//! `kvcompact qfilters calibrate`: the per-head filter directions of a model.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::{Args, Subcommand};
use kvcompact::compact::qfilters::{calibrate_model, CalibrateOptions};

use super::{model_dir, ModelArg};

/// `kvcompact qfilters …`.
#[derive(Subcommand)]
pub enum Cmd {
    /// Calibrate filters from post-RoPE queries on text: writes `q_filters` [layers, kv_heads, head_dim].
    Calibrate(CalibrateArgs),
}

/// Calibrate filters from post-RoPE queries on text: writes `q_filters` [layers, kv_heads, head_dim].
#[derive(Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// HF-format model directory (default: the default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Text files to calibrate on (default: the corpus shipped in data/calib).
    #[arg(long, num_args = 1..)]
    pub text: Vec<PathBuf>,
    /// Sample the corpus from the model itself instead (spec §2: seeded, temperature 1.0, neutral
    /// prompts), `--samples` sequences of `--seq-len` tokens. Slow on CPU.
    #[arg(long, conflicts_with = "text")]
    pub self_generate: bool,
    /// Sequences used (at most).
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Tokens per sequence (capped by the model's context).
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Reservoir rows per head for the majority sign vote.
    #[arg(long, default_value_t = 3000)]
    pub rows: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Cross-check every direction with power iteration (prints the worst disagreement).
    #[arg(long)]
    pub check_power: bool,
    /// Output: the filter file (safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// `kvcompact qfilters`.
pub fn run(cmd: Cmd) -> Result<()> {
    let Cmd::Calibrate(args) = cmd;
    let dir = model_dir(&ModelArg { model: args.model.clone() })?;
    let t0 = Instant::now();
    let (model, tok) = kvcompact::generate::load(&dir)?;
    let opts = CalibrateOptions {
        text: args.text.clone(),
        self_generate: args.self_generate,
        samples: args.samples,
        seq_len: args.seq_len,
        rows: args.rows,
        seed: args.seed,
        check_power: args.check_power,
    };
    let cal = calibrate_model(&model, &tok, &opts, true)?;
    for w in &cal.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(worst) = cal.power_worst {
        println!("power iteration vs eigen: worst 1 − |cos| = {worst:.2e}");
    }
    let f = &cal.filters;
    f.save(&args.out)?;
    println!(
        "wrote {} [{}, {}, {}] from {} tokens ({} sequences) in {:.1} s",
        args.out.display(),
        f.n_layers,
        f.n_kv_heads,
        f.head_dim,
        f.metadata.get("n_tokens").map(String::as_str).unwrap_or("?"),
        cal.sequences,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
