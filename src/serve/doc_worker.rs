//! The documents worker: `POST /v1/documents` compacts its text here, off the engine thread, so
//! running sequences keep decoding (and new requests keep being admitted) while a document that
//! may take tens of seconds is prefilled and compacted.
//!
//! One document at a time, in arrival order, on the worker's own rayon pool of the engine's
//! thread count: the same parallel splits as compacting on the engine's pool, so the same bits.
//! A panic while compacting answers that request with a 500 and the worker goes on. The engine
//! counts documents not yet answered and does not finish a drain before they are.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::Duration;

use super::api::ApiError;
use super::documents::{DocumentInfo, Store};
use super::metrics::Metrics;
use crate::compact::{registry, Budget};
use crate::document::{compact_context, CompactOptions, ContextLayout, QuerySource};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::tokenizer::Tokenizer;

/// A document to compact and store.
pub struct DocJob {
    /// The text.
    pub text: String,
    /// Attention Matching method.
    pub method: String,
    /// Compaction ratio.
    pub ratio: f64,
    /// Reference query source.
    pub queries: QuerySource,
    /// The answer.
    pub reply: tokio::sync::oneshot::Sender<std::result::Result<DocumentInfo, ApiError>>,
}

/// What every document's compaction needs besides its job.
pub struct DocContext {
    /// The model (shared with the engine).
    pub model: Arc<Model>,
    /// Its tokenizer.
    pub tok: Arc<Tokenizer>,
    /// Where documents are stored.
    pub store: Store,
    /// The server's metrics (`compactions` counts documents too).
    pub metrics: Arc<Metrics>,
    /// [`CompactOptions::global_budgets`] of the server.
    pub global_budgets: bool,
    /// KV bytes of one token (one row in every layer and KV head), for `kv_bytes_full`.
    pub row_bytes: usize,
    /// Testing hook (`KVCOMPACT_HOLD_COMPACTION`): each document waits, compacted but neither
    /// stored nor answered, until this file exists.
    pub hold: Option<PathBuf>,
}

/// Handle to the worker thread. Dropping it lets the thread finish the queued documents and exit.
pub struct DocWorker {
    jobs: Sender<Box<DocJob>>,
    pending: Arc<AtomicUsize>,
}

impl DocWorker {
    /// Start the worker with a pool of `threads` threads.
    pub fn spawn(ctx: DocContext, threads: usize) -> Result<DocWorker> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kvcompact-doc-{i}"))
            .build()
            .map_err(|e| Error::Invalid(format!("starting the documents pool: {e}")))?;
        let (jobs, inbox) = channel::<Box<DocJob>>();
        let pending = Arc::new(AtomicUsize::new(0));
        let left = pending.clone();
        std::thread::Builder::new()
            .name("kvcompact-documents".into())
            .spawn(move || {
                for job in inbox {
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.install(|| document(&ctx, &job))));
                    let reply = match run {
                        Ok(r) => r,
                        Err(_) => {
                            tracing::error!("compacting a document panicked; the server goes on");
                            ctx.metrics.panics.inc();
                            Err(ApiError::internal("internal error while compacting the document (the server goes on)"))
                        }
                    };
                    let _ = job.reply.send(reply);
                    left.fetch_sub(1, Ordering::SeqCst);
                }
            })
            .map_err(|e| Error::Invalid(format!("starting the documents worker: {e}")))?;
        Ok(DocWorker { jobs, pending })
    }

    /// Queue a document; it comes back unchanged when the worker has gone.
    pub fn submit(&self, job: Box<DocJob>) -> std::result::Result<(), Box<DocJob>> {
        self.pending.fetch_add(1, Ordering::SeqCst);
        self.jobs.send(job).map_err(|e| {
            self.pending.fetch_sub(1, Ordering::SeqCst);
            e.0
        })
    }

    /// Documents queued or being compacted, not yet answered.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::SeqCst)
    }
}

/// Compact a document once and store it.
fn document(ctx: &DocContext, d: &DocJob) -> std::result::Result<DocumentInfo, ApiError> {
    let method = registry::require_am(&d.method, "serve").map_err(|e| ApiError::bad_param("method", e.to_string()))?;
    let chat = ctx.tok.has_chat_template();
    let layout = ContextLayout::build(&ctx.tok, &d.text, chat).map_err(|e| ApiError::bad_param("text", e.to_string()))?;
    let opts = CompactOptions { budget: Budget::Ratio(d.ratio), queries: d.queries, n_queries: 2048, global_budgets: ctx.global_budgets, ..Default::default() };
    let full_bytes = layout.len() * ctx.row_bytes;
    let (cache, report) = compact_context(&ctx.model, &ctx.tok, &layout, &method, &opts).map_err(|e| ApiError::bad_request(e.to_string()))?;
    if let Some(gate) = &ctx.hold {
        while !gate.exists() {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let info = ctx
        .store
        .insert(&ctx.model, cache, chat, &d.method, d.ratio, &report, full_bytes, layout.tokens())
        .map_err(|e| ApiError::internal(format!("storing the document: {e}")))?;
    ctx.metrics.compactions.inc();
    // The engine republishes this gauge after each of its steps; set it now so that the document
    // is visible in /metrics as soon as its request is answered, even while the engine idles.
    ctx.metrics.documents_hot_bytes.set(ctx.store.hot_bytes() as i64);
    Ok(info)
}
