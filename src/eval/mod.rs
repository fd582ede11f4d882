//! Evaluation harness (being written): `kvcompact eval` ranks every method on the same tasks.

use std::path::PathBuf;

/// Arguments of `kvcompact eval` (defined here so the harness owns its flags).
#[derive(clap::Args, Debug, Clone)]
pub struct EvalArgs {
    /// HF-format model directory (default: the default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

/// Run the evaluation described by `args` on the model in `model_dir`.
pub fn run(_model_dir: &std::path::Path, _args: &EvalArgs) -> crate::Result<()> {
    Err(crate::Error::Invalid("eval is not implemented yet".into()))
}
