//! `kvcompact serve`: an OpenAI-compatible CPU server whose memory policy is compaction.
//!
//! - [`api`]: the OpenAI request/response types and error shape;
//! - [`routes`]: the HTTP routes (tokio + axum): parse, validate, render, stream;
//! - [`scheduler`]: the engine thread: continuous batching, one batched decode step for every
//!   decoding sequence, compaction under `--kv-budget-mib`;
//! - [`compactor`]: the worker thread that compacts one sequence at a time in the background;
//! - [`documents`]: the store of compacted documents (persistent, fingerprint-checked);
//! - [`metrics`]: Prometheus counters and histograms.
//!
//! Threads: the engine runs on the caller's thread (a rayon worker: model math stays on the
//! pool); the HTTP side runs on a small tokio runtime that only parses, queues and streams.

pub mod api;
pub mod compactor;
pub mod doc_worker;
pub mod documents;
pub mod metrics;
pub mod routes;
pub mod scheduler;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cache::KvDtype;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use documents::Store;
use metrics::Metrics;
use routes::{router, AppState};
use scheduler::{Engine, EngineConfig, FailPoint, Job};

/// Everything `kvcompact serve` is started with.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// HF-format model directory.
    pub model_dir: PathBuf,
    /// How the KV caches store their rows (sequences, compacted documents in RAM).
    pub kv_dtype: KvDtype,
    /// Address to bind (`127.0.0.1` by default; port 0 picks a free port, printed at start).
    pub addr: SocketAddr,
    /// Required bearer token (none: no authentication).
    pub api_key: Option<String>,
    /// Engine settings.
    pub engine: EngineConfig,
    /// Document store directory.
    pub store: PathBuf,
    /// Bytes of documents kept in RAM.
    pub documents_hot_bytes: usize,
    /// Largest request body accepted (413 above).
    pub body_limit: usize,
    /// Seconds in-flight requests get to finish after SIGTERM.
    pub grace_seconds: u64,
    /// Testing fail point (see [`AppState::fail_point`]); `kvcompact serve` reads it from the
    /// environment variable `KVCOMPACT_FAIL_POINT` (`[prefill:|decode:]MARKER`).
    pub fail_point: Option<FailPoint>,
}

/// Load the model, open the store, bind, print `listening on http://ADDR` on stdout, and serve
/// until SIGTERM or Ctrl-C (then drain: no new requests, in-flight ones finish).
pub fn run(opts: ServeOptions) -> Result<()> {
    // Shared by the engine and its compaction worker.
    let mut model = Model::load(&opts.model_dir)?;
    model.set_kv_dtype(opts.kv_dtype)?;
    let model = Arc::new(model);
    let tok = Arc::new(Tokenizer::load(&opts.model_dir, &model.config)?);
    crate::compact::registry::require_am(&opts.engine.policy, "serve")?;
    if !(opts.engine.ratio > 1.0) {
        return Err(Error::Invalid(format!("--ratio must be > 1, got {}", opts.engine.ratio)));
    }
    if opts.engine.max_batch == 0 || opts.engine.prefill_chunk == 0 {
        return Err(Error::Invalid("--max-batch and --prefill-chunk must be at least 1".into()));
    }
    let store = Store::open(&opts.store, &model, opts.documents_hot_bytes)?;
    let metrics = Arc::new(Metrics::new());
    let name = opts.model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let (jobs, inbox) = std::sync::mpsc::channel::<Job>();
    let state = AppState {
        jobs: jobs.clone(),
        tok: tok.clone(),
        model_name: name,
        max_context: model.config.max_position_embeddings,
        store: store.clone(),
        metrics: metrics.clone(),
        api_key: opts.api_key.clone(),
        policy: opts.engine.policy.clone(),
        fail_point: opts.fail_point.clone(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("kvcompact-http")
        .enable_all()
        .build()
        .map_err(|e| Error::Invalid(format!("starting the HTTP runtime: {e}")))?;
    let listener = rt.block_on(tokio::net::TcpListener::bind(opts.addr)).map_err(|e| Error::Invalid(format!("binding {}: {e}", opts.addr)))?;
    let local = listener.local_addr().map_err(|e| Error::Invalid(e.to_string()))?;
    let app = router(state, opts.body_limit);
    let drain = jobs.clone();
    let server = rt.spawn(async move {
        let shutdown = async move {
            shutdown_signal().await;
            tracing::info!("shutting down: draining in-flight requests");
            let _ = drain.send(Job::Drain);
        };
        axum::serve(listener, app).with_graceful_shutdown(shutdown).await
    });
    println!("kvcompact serve: listening on http://{local}");
    let _ = std::io::stdout().flush();
    drop(jobs);
    let engine = Engine::new(model, tok, opts.engine.clone(), store, metrics);
    engine.run(inbox);
    // The engine has drained; give the HTTP side the grace period to send the last bytes.
    let grace = Duration::from_secs(opts.grace_seconds);
    rt.block_on(async {
        let _ = tokio::time::timeout(grace, server).await;
    });
    rt.shutdown_timeout(Duration::from_millis(100));
    eprintln!("kvcompact serve: stopped");
    Ok(())
}

/// SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
