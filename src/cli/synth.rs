//! `kvcompact synth-model`: a Llama checkpoint with seeded random weights, for benchmarks at
//! widths no small real model has (e.g. multi-head attention for `--slim`).

use std::path::PathBuf;

use anyhow::Result;

/// Write a Llama checkpoint with seeded random weights.
#[derive(clap::Args)]
pub struct Args {
    /// Output directory (config.json + model.safetensors, f32).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 1024)]
    pub hidden: usize,
    #[arg(long, default_value_t = 16)]
    pub heads: usize,
    /// KV heads (default: --heads, i.e. multi-head attention).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    #[arg(long, default_value_t = 2816)]
    pub ff: usize,
    #[arg(long, default_value_t = 32000)]
    pub vocab: usize,
    #[arg(long, default_value_t = 16384)]
    pub max_pos: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `kvcompact synth-model`.
pub fn run(a: Args) -> Result<()> {
    let spec = kvcompact::model::synth::SynthSpec {
        hidden: a.hidden,
        heads: a.heads,
        kv_heads: a.kv_heads.unwrap_or(a.heads),
        layers: a.layers,
        ff: a.ff,
        vocab: a.vocab,
        max_pos: a.max_pos,
        seed: a.seed,
    };
    let bytes = kvcompact::model::synth::write_llama(&a.out, &spec)?;
    eprintln!("wrote {:.1} MB of f32 weights", bytes as f64 / 1e6);
    println!("{}", a.out.display());
    Ok(())
}
