//! `kvcompact compact-head`: one head from a safetensors file, the oracle contract for other
//! implementations (see `kvcompact::compact::oracle`).

use std::path::PathBuf;

use anyhow::Result;

use kvcompact::compact::oracle::{compact_head_file, OracleOptions};
use kvcompact::compact::{BetaSolver, Budget};

/// Compact one head from a safetensors file (the oracle contract for other implementations).
#[derive(clap::Args)]
#[command(group(clap::ArgGroup::new("rows").required(true).args(["budget", "ratio", "compression_ratio"])))]
pub struct Args {
    /// keys [T,d], values [T,d], queries [n,d] (f32); optional bias [T] and test_queries [m,d].
    #[arg(long)]
    pub input: PathBuf,
    /// indices i64 [t], keys [t,d], beta [t], values [t,d] (+ errors when test queries are given).
    #[arg(long)]
    pub output: PathBuf,
    /// Any registry name but qfilters (it needs filters) and full: the Attention Matching family
    /// or an eviction baseline.
    #[arg(long, default_value = "am-omp")]
    pub method: String,
    /// Rows to keep (≤ T).
    #[arg(long)]
    pub budget: Option<usize>,
    /// Keep ⌊T / R⌋ rows (R ≥ 1).
    #[arg(long)]
    pub ratio: Option<f64>,
    /// kvpress: keep int(T·(1 − r)) rows (at least 1), r in [0, 1).
    #[arg(long)]
    pub compression_ratio: Option<f64>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// reference (clamped LS + projected gradient) or active-set (Lawson–Hanson).
    #[arg(long, default_value = "reference")]
    pub nnls: String,
    /// No conditioning guard; the reference's exact solver path.
    #[arg(long)]
    pub strict_parity: bool,
    /// kvpress 0.5.5 semantics for an eviction baseline (the press of the same name).
    #[arg(long)]
    pub kvpress: bool,
    #[command(flatten)]
    pub device: super::DeviceArg,
}

/// `kvcompact compact-head`.
pub fn run(a: Args) -> Result<()> {
    a.device.device.check()?;
    // clap's group lets exactly one form through.
    let budget = Budget::from_forms(a.ratio, a.compression_ratio, a.budget)?.unwrap_or_default();
    let opts = OracleOptions {
        method: a.method,
        budget,
        seed: a.seed,
        nnls: BetaSolver::parse(&a.nnls)?,
        strict_parity: a.strict_parity,
        kvpress: a.kvpress,
        device: a.device.device,
        ..Default::default()
    };
    let r = compact_head_file(&a.input, &a.output, &opts)?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
