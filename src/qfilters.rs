//! Q-Filters (being written): calibration, scoring and the streaming cache.

use std::path::PathBuf;

/// Arguments of `kvcompact qfilters calibrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// HF-format model directory (default: the default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub out: PathBuf,
}

pub fn calibrate_cmd(_model_dir: &std::path::Path, _args: &CalibrateArgs) -> crate::Result<()> {
    Err(crate::Error::Invalid("qfilters calibrate is not implemented yet".into()))
}
