//! The background compaction worker: compacts one sequence's KV cache at a time off the engine
//! thread, so the other sequences keep decoding (and short requests keep being answered) while a
//! long one is compacted under `--kv-budget-mib`.
//!
//! The engine moves the sequence's cache here (not a copy: freeing memory is the point), skips
//! the sequence until the cache comes back, and polls for it every step. The worker runs
//! [`compact_older_rows`] with the options the engine always used, on its own rayon pool of the
//! engine's thread count (the same parallel splits, so the same bits as compacting inline), and
//! never on the engine's pool, whose threads would otherwise steal compaction work mid-step.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use crate::cache::KvCache;
use crate::compact::{registry, Budget};
use crate::document::{compact_older_rows, CompactOptions, CompactReport};
use crate::error::{Error, Result};
use crate::model::{Model, RunState, DEFAULT_MAX_BATCH};
use crate::tokenizer::Tokenizer;

/// One sequence to compact: everything [`compact_older_rows`] needs, the cache moved in.
pub struct Task {
    /// The engine's id of the sequence (the result is dropped when it has gone meanwhile).
    pub seq: u64,
    /// The sequence's cache (the engine holds none for it meanwhile).
    pub cache: KvCache,
    /// Every token of the sequence so far, for the repeat queries.
    pub tokens: Vec<u32>,
    /// Attention Matching method (a registry name).
    pub method: String,
    /// Compaction ratio.
    pub ratio: f64,
    /// The request's sampling seed (seeds the compaction too, as inline).
    pub seed: u64,
    /// The repeat instruction is rendered as a chat turn.
    pub chat: bool,
    /// Most recent rows left as they are.
    pub keep_recent: usize,
    /// The global allocation of rows over the heads ([`CompactOptions::global_budgets`]).
    pub global_budgets: bool,
}

/// How a task ended.
pub enum Outcome {
    /// The cache is compacted.
    Compacted(Box<CompactReport>),
    /// Compaction failed (the message); the cache is as far as it got, still valid.
    Failed(String),
    /// Compaction panicked; the cache may be half rewritten.
    Panicked,
}

/// A task back from the worker, with its cache.
pub struct Done {
    /// The sequence's id.
    pub seq: u64,
    /// The cache (compacted, unless the outcome says otherwise).
    pub cache: KvCache,
    /// How it went.
    pub outcome: Outcome,
}

/// The worker thread has gone (it catches panics, so this is not expected).
#[derive(Debug)]
pub struct Gone;

/// Handle to the worker thread: tasks in, results out. Dropping it lets the thread finish the
/// task it runs and exit; nothing waits for it (its sequence is gone by then).
pub struct Compactor {
    tasks: Sender<Box<Task>>,
    done: Receiver<Done>,
}

impl Compactor {
    /// Start the worker with a pool of `threads` threads. `hold`: testing hook
    /// (`KVCOMPACT_HOLD_COMPACTION`): each result is held back until that file exists.
    pub fn spawn(model: Arc<Model>, tok: Arc<Tokenizer>, threads: usize, hold: Option<PathBuf>) -> Result<Compactor> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("kvcompact-compact-{i}"))
            .build()
            .map_err(|e| Error::Invalid(format!("starting the compaction pool: {e}")))?;
        let (tasks, inbox) = channel::<Box<Task>>();
        let (out, done) = channel::<Done>();
        std::thread::Builder::new()
            .name("kvcompact-compactor".into())
            .spawn(move || {
                let mut state = model.new_state(DEFAULT_MAX_BATCH);
                for mut task in inbox {
                    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.install(|| compact(&model, &mut state, &tok, &mut task))));
                    let outcome = match run {
                        Ok(Ok(report)) => Outcome::Compacted(Box::new(report)),
                        Ok(Err(e)) => Outcome::Failed(e.to_string()),
                        Err(_) => Outcome::Panicked,
                    };
                    if let Some(gate) = &hold {
                        while !gate.exists() {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                    }
                    if out.send(Done { seq: task.seq, cache: task.cache, outcome }).is_err() {
                        return; // the engine has gone
                    }
                }
            })
            .map_err(|e| Error::Invalid(format!("starting the compaction worker: {e}")))?;
        Ok(Compactor { tasks, done })
    }

    /// Hand a task to the worker; it comes back unchanged when the worker has gone.
    pub fn submit(&self, task: Box<Task>) -> std::result::Result<(), Box<Task>> {
        self.tasks.send(task).map_err(|e| e.0)
    }

    /// A finished task, if one is there (never blocks).
    pub fn poll(&self) -> std::result::Result<Option<Done>, Gone> {
        match self.done.try_recv() {
            Ok(d) => Ok(Some(d)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Gone),
        }
    }
}

/// Compact all but the last `keep_recent` rows of the task's cache, earlier β carried, with the
/// options the engine's memory policy has always used.
pub fn compact(model: &Model, state: &mut RunState, tok: &Tokenizer, task: &mut Task) -> Result<CompactReport> {
    let method = registry::require_am(&task.method, "serve")?;
    let opts = CompactOptions { budget: Budget::Ratio(task.ratio), n_queries: 1024, n_test: 64, seed: task.seed, global_budgets: task.global_budgets, ..Default::default() };
    compact_older_rows(model, state, tok, &method, &mut task.cache, &task.tokens, task.keep_recent, 4096, task.chat, &opts)
}
