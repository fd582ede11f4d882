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

/// A progress bar on stderr, hidden when `show` is false or stderr is not a terminal.
pub fn progress_bar(len: u64, show: bool, msg: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !show || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg:>12} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(msg.to_string());
    bar
}
