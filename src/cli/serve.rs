//! `kvcompact serve`: the OpenAI-compatible server (see `kvcompact::serve`).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Result};
use kvcompact::serve::scheduler::{EngineConfig, FailPoint, DEFAULT_PREFILL_CHUNK};
use kvcompact::serve::ServeOptions;

use super::{model_dir, KvDtypeArg, ModelArg};

/// Serve the model over an OpenAI-compatible HTTP API with continuous batching; KV memory is
/// bounded by compaction.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub kv: KvDtypeArg,
    /// Address to bind (loopback by default).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    /// Port (0 picks a free one; the address is printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` (or set KVCOMPACT_API_KEY).
    #[arg(long, env = "KVCOMPACT_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Sequences decoded together at most.
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Bound on the KV bytes of all sequences, in MiB; compaction keeps them under it.
    #[arg(long)]
    pub kv_budget_mib: Option<f64>,
    /// Compaction method under memory pressure and for documents (Attention Matching).
    #[arg(long, default_value = "am-highest")]
    pub policy: String,
    /// Compaction ratio under memory pressure.
    #[arg(long, default_value_t = 5.0)]
    pub ratio: f64,
    /// How AM spreads a compaction's rows over the heads: global (one top-k of its key scores
    /// over every head, the same total) or uniform (⌊T/R⌋ per head).
    #[arg(long, default_value = "global")]
    pub am_budgets: String,
    /// Most recent rows of a sequence never compacted.
    #[arg(long, default_value_t = 64)]
    pub keep_recent: usize,
    /// Prefill tokens per step and sequence (256 gives the same bits as `generate`).
    #[arg(long, default_value_t = DEFAULT_PREFILL_CHUNK)]
    pub prefill_chunk: usize,
    /// Document store directory (default: <model dir>/../store, or $KVCOMPACT_HOME/store).
    #[arg(long)]
    pub store: Option<PathBuf>,
    /// MiB of compacted documents kept in RAM.
    #[arg(long, default_value_t = 256)]
    pub documents_mib: usize,
    /// Largest request body in MiB (413 above).
    #[arg(long, default_value_t = 8)]
    pub max_body_mib: usize,
}

/// `kvcompact serve`.
pub fn run(a: Args) -> Result<()> {
    // Bad flags fail before the model loads (or is fetched).
    let global_budgets = kvcompact::document::budgets::global_from_name(&a.am_budgets)?;
    let dir = model_dir(&a.model)?;
    let kv_budget_bytes = match a.kv_budget_mib {
        Some(m) if !(m > 0.0 && m.is_finite()) => bail!("--kv-budget-mib must be a positive number"),
        Some(m) => Some((m * (1u64 << 20) as f64) as usize),
        None => None,
    };
    let store = match (a.store, std::env::var_os("KVCOMPACT_HOME")) {
        (Some(s), _) => s,
        (None, Some(home)) => PathBuf::from(home).join("store"),
        (None, None) => dir.parent().map_or_else(|| PathBuf::from("store"), |p| p.join("store")),
    };
    let opts = ServeOptions {
        model_dir: dir,
        kv_dtype: a.kv.kv_dtype,
        addr: SocketAddr::new(a.host, a.port),
        api_key: a.api_key.filter(|k| !k.is_empty()),
        engine: EngineConfig {
            max_batch: a.max_batch,
            kv_budget_bytes,
            policy: a.policy,
            ratio: a.ratio,
            keep_recent: a.keep_recent,
            prefill_chunk: a.prefill_chunk,
            global_budgets,
            // Tests set it to hold a compaction in flight (tests/serve); empty means unset.
            hold_compactions: std::env::var_os("KVCOMPACT_HOLD_COMPACTION").filter(|p| !p.is_empty()).map(PathBuf::from),
        },
        store,
        documents_hot_bytes: a.documents_mib << 20,
        body_limit: a.max_body_mib << 20,
        grace_seconds: 30,
        // Tests set it to reach the engine's panic paths (tests/serve); empty means unset.
        fail_point: std::env::var("KVCOMPACT_FAIL_POINT").ok().and_then(|m| FailPoint::parse(&m)),
    };
    Ok(kvcompact::serve::run(opts)?)
}
