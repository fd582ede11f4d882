//! `kvcompact convert`: a GGUF file into an HF-layout model directory.

use std::path::PathBuf;

use anyhow::Result;
use clap::ValueEnum;

/// Storage dtype of the converted weights.
#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    /// 32-bit floats (exact dequantisation).
    F32,
    /// bfloat16 (half the bytes).
    Bf16,
}

/// Convert a GGUF file into an HF-layout model directory.
#[derive(clap::Args)]
pub struct Args {
    #[arg(long)]
    pub gguf: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: DtypeArg,
}

/// `kvcompact convert`.
pub fn run(a: Args) -> Result<()> {
    let dtype = match a.dtype {
        DtypeArg::F32 => kvcompact::gguf::OutDtype::F32,
        DtypeArg::Bf16 => kvcompact::gguf::OutDtype::Bf16,
    };
    let s = kvcompact::gguf::convert_gguf(&a.gguf, &a.out, dtype)?;
    eprintln!("converted {} tensors: {:.1} MB of weights in {:.1} s", s.tensors, s.model_bytes as f64 / 1e6, s.seconds);
    println!("{}", a.out.display());
    Ok(())
}
