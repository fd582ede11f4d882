//! The engine: one thread owns the model, every sequence and its KV cache, and steps them.
//!
//! Each step (spec `serving.md`, "Shape"):
//! 1. take new jobs from the channel (waiting when there is nothing to do);
//! 2. install a compacted cache that came back from the background worker; admit waiting requests
//!    while a batch slot is free and the KV budget holds their prompt — starting the compaction of
//!    the sequence with the most uncompacted rows when it does not and waiting for it, refusing
//!    with 429 only when compaction cannot free enough;
//! 3. run prefill chunks of the oldest prefilling sequences, up to `--prefill-chunk` tokens in all
//!    (each sequence's chunks are its own forward calls, cut where `generate` cuts them);
//! 4. run **one batched decode step** for every decoding sequence ([`Model::decode_batch`]),
//!    except one being compacted;
//! 5. hand each new token to its request; drop sequences whose client went away.
//!
//! A prefill chunk is never shared between sequences and the batched decode reduces every row
//! exactly as single-sequence decode does, so a request's tokens are the same bits whatever else
//! is in the batch, and equal to `kvcompact generate` with the same prompt and sampling.
//! The engine runs on a rayon worker; model math uses the pool, never the async runtime.
//!
//! Compaction under memory pressure runs on a worker thread of its own ([`super::compactor`]):
//! the sequence's cache is moved there, the sequence sits out of prefill and decode until the
//! compacted cache comes back, and everyone else keeps stepping. Its uncompacted bytes count as
//! held meanwhile, so admission never counts on memory that is not free yet.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::api::ApiError;
use super::compactor::{Compactor, Outcome, Task};
use super::doc_worker::{DocContext, DocJob, DocWorker};
use super::documents::Store;
use super::metrics::Metrics;
use crate::cache::KvCache;
use crate::model::{Logits, Model, RunState, DEFAULT_MAX_BATCH};
use crate::sampling::Sampler;
use crate::tokenizer::Tokenizer;

/// How the engine runs (from `kvcompact serve`'s flags).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Sequences decoded together at most.
    pub max_batch: usize,
    /// Bound on the real KV bytes of all sequences (None: unbounded).
    pub kv_budget_bytes: Option<usize>,
    /// Compaction method under memory pressure (an Attention Matching registry name).
    pub policy: String,
    /// Compaction ratio under memory pressure.
    pub ratio: f64,
    /// Most recent rows of a sequence never compacted.
    pub keep_recent: usize,
    /// Prefill tokens per step for one sequence (256 reproduces `generate` bit for bit).
    pub prefill_chunk: usize,
    /// Testing hook (`KVCOMPACT_HOLD_COMPACTION`): background compactions hold their result back
    /// AM spreads a compaction's rows over the heads by one global top-k of its key scores
    /// (`--am-budgets global`, the default) rather than ⌊T/R⌋ per head.
    pub global_budgets: bool,
    /// until this file exists, so a test can observe the engine while one is in flight.
    pub hold_compactions: Option<PathBuf>,
}

/// What a generation request asks the engine for.
pub struct GenJob {
    /// Prompt tokens (after the document's context, if any).
    pub prompt: Vec<u32>,
    /// A document's compacted cache to start from, and the document's tokens (the text behind
    /// its rows, for the repeat queries of later compactions).
    pub start: Option<(Arc<KvCache>, Arc<Vec<u32>>)>,
    /// The repeat instruction of later compactions is rendered as a chat turn.
    pub chat: bool,
    /// 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Sampling seed.
    pub seed: u64,
    /// Tokens to generate at most.
    pub max_tokens: usize,
    /// Do not stop at end-of-sequence tokens.
    pub ignore_eos: bool,
    /// Compaction method and ratio for this sequence (else the server's).
    pub compaction: Option<(String, f64)>,
    /// Where tokens go; a closed channel cancels the sequence.
    pub events: UnboundedSender<Event>,
    /// When the request arrived (for time to first token).
    pub arrived: Instant,
    /// Testing fail point: where this sequence panics (set only when the server was started with
    /// `KVCOMPACT_FAIL_POINT` and the prompt holds its marker; None in normal use).
    pub fail: Option<FailStage>,
}

/// Where a testing fail point panics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailStage {
    /// In the prefill of the marked prompt.
    Prefill,
    /// In the first batched decode step the sequence is part of (after its first token).
    Decode,
}

/// A testing fail point: requests whose prompt holds `marker` panic at `stage`, to exercise the
/// engine's panic isolation. Spelled `[prefill:|decode:]MARKER` (prefill when no stage is given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailPoint {
    /// The text that marks a prompt.
    pub marker: String,
    /// Where a marked request panics.
    pub stage: FailStage,
}

impl FailPoint {
    /// Parse `[prefill:|decode:]MARKER`; None for an empty marker (unset).
    pub fn parse(spec: &str) -> Option<FailPoint> {
        let (stage, marker) = match spec.split_once(':') {
            Some(("decode", m)) => (FailStage::Decode, m),
            Some(("prefill", m)) => (FailStage::Prefill, m),
            _ => (FailStage::Prefill, spec),
        };
        (!marker.is_empty()).then(|| FailPoint { marker: marker.to_string(), stage })
    }
}

/// What the engine sends back for a generation.
#[derive(Debug, Clone)]
pub enum Event {
    /// One generated token.
    Token(u32),
    /// Generation ended: `"eos"`, `"max_tokens"` or `"context_full"`.
    Done {
        /// Why it ended.
        stop: &'static str,
        /// Prompt tokens prefilled.
        prompt_tokens: usize,
        /// Tokens generated.
        completion_tokens: usize,
    },
    /// The request failed.
    Error(ApiError),
}

/// A message to the engine.
pub enum Job {
    /// Generate.
    Generate(Box<GenJob>),
    /// Compact and store a document.
    Document(Box<DocJob>),
    /// Stop admitting new work; finish what runs, then return.
    Drain,
}

/// One admitted sequence.
struct Seq {
    /// Names the sequence to the compaction worker.
    id: u64,
    job: Box<GenJob>,
    /// Empty while the worker holds the real one (`compacting`).
    cache: KvCache,
    /// Its cache is with the compaction worker: no prefill, no decode until it comes back.
    compacting: bool,
    sampler: Sampler,
    /// Every token of the sequence so far (prompt and generated), for repeat queries.
    tokens: Vec<u32>,
    /// Prompt tokens not yet prefilled.
    pending: usize,
    /// The token sampled last, not yet fed.
    next: Option<u32>,
    generated: usize,
    /// Rows appended since the last compaction (the longest head).
    fresh_rows: usize,
    last_token_at: Option<Instant>,
}

impl Seq {
    fn cancelled(&self) -> bool {
        self.job.events.is_closed()
    }
}

/// The compaction the worker is running (one at a time).
struct InFlight {
    /// Which sequence (it may have been cancelled since).
    seq: u64,
    /// Bytes of the cache handed over: held until the result comes back.
    bytes: usize,
}

/// Whether the KV bytes fit a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// They fit now.
    Now,
    /// Not yet; a compaction in flight will free memory when it comes back, or a sequence still
    /// prefilling will be compacted once its prompt is in.
    Soon,
    /// Not, and nothing is left to compact.
    Never,
}

/// The engine state (see the module docs).
pub struct Engine {
    /// Shared with the compaction worker.
    model: Arc<Model>,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    store: Store,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Box<GenJob>>,
    running: Vec<Seq>,
    prefill_state: RunState,
    decode_state: RunState,
    /// Started at the first compaction.
    compactor: Option<Compactor>,
    in_flight: Option<InFlight>,
    /// Started at the first document.
    docs: Option<DocWorker>,
    /// The compaction pool gets as many threads as the engine's, for the same bits.
    threads: usize,
    next_id: u64,
    draining: bool,
}

impl Engine {
    /// An engine over `model`; nothing runs until [`Engine::run`].
    pub fn new(model: Arc<Model>, tok: Arc<Tokenizer>, cfg: EngineConfig, store: Store, metrics: Arc<Metrics>) -> Engine {
        let prefill_state = model.new_state(cfg.prefill_chunk.max(1));
        let decode_state = model.new_state(cfg.max_batch.max(1));
        let threads = rayon::current_num_threads();
        Engine {
            model,
            tok,
            cfg,
            store,
            metrics,
            waiting: VecDeque::new(),
            running: Vec::new(),
            prefill_state,
            decode_state,
            compactor: None,
            in_flight: None,
            docs: None,
            threads,
            next_id: 0,
            draining: false,
        }
    }

    /// Step until drained: returns after a [`Job::Drain`] once nothing is left, or when every
    /// sender of the channel is gone.
    pub fn run(mut self, jobs: Receiver<Job>) {
        loop {
            let idle = self.waiting.is_empty() && self.running.is_empty();
            if idle && self.draining && self.docs_pending() == 0 {
                return;
            }
            // Block while there is nothing to step: until a job comes when idle; briefly, to poll
            // for its result, while only a compaction (or admission waiting on it) is pending.
            // Otherwise only take what is already there.
            let runnable = self.running.iter().any(|s| !s.compacting);
            let wait = match (runnable, idle && self.in_flight.is_none()) {
                (true, _) => None,
                (false, true) => Some(Duration::from_millis(200)),
                (false, false) => Some(COMPACTION_POLL),
            };
            let first = match wait.map(|t| jobs.recv_timeout(t)) {
                Some(Ok(j)) => Some(j),
                None | Some(Err(RecvTimeoutError::Timeout)) => None,
                Some(Err(RecvTimeoutError::Disconnected)) => return,
            };
            for job in first.into_iter().chain(std::iter::from_fn(|| jobs.try_recv().ok())) {
                self.accept(job);
            }
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if step.is_err() {
                // Prefill and decode faults are caught per sequence inside the step; one that
                // escapes them (admission, bookkeeping) fails what was running, and we go on.
                tracing::error!("engine step panicked; failing {} running sequences", self.running.len());
                for s in self.running.drain(..) {
                    let _ = s.job.events.send(Event::Error(ApiError::internal("internal error while generating (the server goes on)")));
                }
                self.metrics.panics.inc();
            }
            self.publish_gauges();
        }
    }

    fn accept(&mut self, job: Job) {
        match job {
            Job::Drain => self.draining = true,
            Job::Generate(g) if self.draining => {
                let _ = g.events.send(Event::Error(ApiError::unavailable("the server is shutting down")));
            }
            Job::Generate(g) => self.waiting.push_back(g),
            Job::Document(d) if self.draining => {
                let _ = d.reply.send(Err(ApiError::unavailable("the server is shutting down")));
            }
            Job::Document(d) => self.submit_document(d),
        }
    }

    /// KV bytes held by every running sequence, a cache with the compaction worker included
    /// (until its result is back, even when its sequence has been cancelled).
    fn kv_bytes(&self) -> usize {
        self.running.iter().map(|s| s.cache.bytes()).sum::<usize>() + self.in_flight.as_ref().map_or(0, |f| f.bytes)
    }

    /// What the KV budget bounds: the running sequences' caches, the rows their prompts will
    /// still take ([`Engine::promised_bytes`]), and the documents kept in RAM.
    fn held_bytes(&self) -> usize {
        self.kv_bytes() + self.promised_bytes() + self.store.hot_bytes()
    }

    /// The rows admitted prompts have yet to prefill, in bytes. Admission promises them: without
    /// this, requests arriving together were all admitted against caches that were still empty,
    /// and the prefills then took the KV memory to twice the budget while a compaction ran.
    fn promised_bytes(&self) -> usize {
        self.running.iter().map(|s| s.pending).sum::<usize>() * self.row_bytes()
    }

    /// Bytes one more token costs a sequence: one row in every (layer, KV head).
    fn row_bytes(&self) -> usize {
        let c = &self.model.config;
        c.n_layers * c.n_kv_heads * KvCache::row_bytes(c.head_dim, self.model.kv_dtype())
    }

    /// Under a budget, before running sequences grow by `rows` tokens' rows: start freeing
    /// memory once the held bytes would pass the high-water mark, so that the rest of the budget
    /// absorbs what the sequences grow by while a compaction runs. They grow whatever the
    /// outcome: the budget can be passed by the rows decoded while compaction catches up.
    fn make_room(&mut self, rows: usize) {
        if let Some(budget) = self.cfg.kv_budget_bytes {
            let need = rows * self.row_bytes();
            let _ = self.free_until(high_water(budget).saturating_sub(need));
        }
    }

    fn step(&mut self) {
        self.poll_compactions();
        // Forget sequences whose client left: their memory is free at once (a cache with the
        // compaction worker when its result comes back).
        let before = self.running.len();
        self.running.retain(|s| !s.cancelled());
        self.metrics.cancelled.inc_by((before - self.running.len()) as u64);
        self.waiting.retain(|g| !g.events.is_closed());
        self.admit();
        self.prefill_some();
        self.decode_all();
    }

    /// Admit waiting requests in order while a slot is free and the budget holds them.
    fn admit(&mut self) {
        while self.running.len() < self.cfg.max_batch {
            let Some(job) = self.waiting.front() else { break };
            let start_bytes = job.start.as_ref().map_or(0, |(c, _)| c.bytes());
            let need = start_bytes + (job.prompt.len() + 1) * self.row_bytes();
            if let Some(budget) = self.cfg.kv_budget_bytes {
                if need > budget {
                    let job = self.waiting.pop_front().expect("front exists");
                    let _ = job.events.send(Event::Error(ApiError::out_of_memory(format!(
                        "the prompt needs {:.1} MiB of KV cache, more than the server's whole budget of {:.1} MiB",
                        need as f64 / MIB,
                        budget as f64 / MIB
                    ))));
                    self.metrics.refused.inc();
                    continue;
                }
                let room = if self.held_bytes() + need > budget { self.free_until(budget - need) } else { Room::Now };
                match room {
                    Room::Now => {}
                    // A compaction in flight frees memory when it comes back: wait for it.
                    Room::Soon => break,
                    Room::Never => {
                        // Running sequences will end and free their memory: a request waits for
                        // them a while; with nothing running, or after the wait, it is refused.
                        let waited = self.waiting.front().map_or(Duration::ZERO, |j| j.arrived.elapsed());
                        if !self.running.is_empty() && waited < ADMIT_WAIT {
                            break;
                        }
                        let job = self.waiting.pop_front().expect("front exists");
                        let _ = job.events.send(Event::Error(ApiError::out_of_memory(format!(
                            "KV memory is full ({:.1} of {:.1} MiB held or promised to prompts) and compaction cannot free {:.1} MiB; retry later",
                            self.held_bytes() as f64 / MIB,
                            budget as f64 / MIB,
                            need as f64 / MIB
                        ))));
                        self.metrics.refused.inc();
                        continue;
                    }
                }
            }
            let mut job = self.waiting.pop_front().expect("front exists");
            // The sequence owns a copy; the document's shared cache is let go here, so a
            // document dropped from RAM under pressure is really freed.
            let (cache, mut tokens) = match job.start.take() {
                Some((c, t)) => ((*c).clone().into_dtype(self.model.kv_dtype()), (*t).clone()),
                None => (self.model.new_cache(), Vec::new()),
            };
            let max_pos = self.model.config.max_position_embeddings;
            if cache.next_pos() + job.prompt.len() + 1 > max_pos {
                let _ = job.events.send(Event::Error(ApiError::bad_param(
                    "messages",
                    format!("the prompt has {} tokens after {} of context; the model's context is {max_pos} tokens", job.prompt.len(), cache.next_pos()),
                )));
                continue;
            }
            let sampler = Sampler::new(job.temperature, job.top_p, job.seed);
            let pending = job.prompt.len();
            tokens.extend_from_slice(&job.prompt);
            self.metrics.prompt_tokens.inc_by(pending as u64);
            let id = self.next_id;
            self.next_id += 1;
            self.running.push(Seq { id, job, cache, compacting: false, sampler, tokens, pending, next: None, generated: 0, fresh_rows: 0, last_token_at: None });
        }
    }

    /// Free KV memory toward `target` held bytes: first documents kept in RAM (dropped at once;
    /// their files stay and are read back when asked for), then by compacting in the background
    /// the sequence with the most uncompacted rows (one compaction at a time).
    fn free_until(&mut self, target: usize) -> Room {
        if self.held_bytes() <= target {
            return Room::Now;
        }
        let shed = self.store.shed_hot(target.saturating_sub(self.kv_bytes() + self.promised_bytes()));
        if shed > 0 {
            self.metrics.documents_shed_bytes.inc_by(shed as u64);
            tracing::info!(bytes = shed, "dropped documents from RAM under memory pressure");
        }
        if self.held_bytes() <= target {
            return Room::Now;
        }
        if self.in_flight.is_some() {
            return Room::Soon;
        }
        let keep = self.cfg.keep_recent;
        loop {
            let candidate = self
                .running
                .iter()
                .enumerate()
                .filter(|(_, s)| s.pending == 0 && !s.compacting && s.fresh_rows > keep + 8)
                .max_by_key(|(_, s)| s.fresh_rows)
                .map(|(i, _)| i);
            let Some(i) = candidate else {
                // A sequence still prefilling will be compactable once its prompt is in: room
                // comes soon, so a request waits for it rather than being refused.
                let coming = self.running.iter().any(|s| s.pending > 0 && !s.compacting && s.fresh_rows + s.pending > keep + 8);
                return if coming { Room::Soon } else { Room::Never };
            };
            if self.start_compaction(i) {
                return Room::Soon;
            }
        }
    }

    /// Hand sequence `i`'s cache to the compaction worker (all but its last `keep_recent` rows
    /// are compacted, earlier β carried). False, with the sequence marked not to be picked
    /// again, when the worker cannot take it.
    fn start_compaction(&mut self, i: usize) -> bool {
        if self.compactor.is_none() {
            match Compactor::spawn(self.model.clone(), self.tok.clone(), self.threads, self.cfg.hold_compactions.clone()) {
                Ok(c) => self.compactor = Some(c),
                Err(e) => {
                    tracing::warn!("compaction under memory pressure is unavailable: {e}");
                    self.running[i].fresh_rows = 0;
                    return false;
                }
            }
        }
        let (method, ratio) = self.running[i].job.compaction.clone().unwrap_or_else(|| (self.cfg.policy.clone(), self.cfg.ratio));
        let s = &mut self.running[i];
        // Moved, not copied: the copy would cost the memory the compaction is meant to free.
        let cache = std::mem::replace(&mut s.cache, KvCache::new(0, 0, 0));
        let bytes = cache.bytes();
        let task = Box::new(Task { seq: s.id, cache, tokens: s.tokens.clone(), method, ratio, seed: s.job.seed, chat: s.job.chat, keep_recent: self.cfg.keep_recent, global_budgets: self.cfg.global_budgets });
        match self.compactor.as_ref().expect("started above").submit(task) {
            Ok(()) => {
                s.compacting = true;
                self.in_flight = Some(InFlight { seq: s.id, bytes });
                tracing::info!(seq = s.id, bytes, "compacting a sequence in the background under memory pressure");
                true
            }
            Err(task) => {
                tracing::warn!("the compaction worker has stopped; compaction under memory pressure is off until it restarts");
                s.cache = task.cache;
                s.fresh_rows = 0;
                self.compactor = None;
                false
            }
        }
    }

    /// Install the compaction that came back from the worker, if any. A result for a sequence
    /// that has gone meanwhile is dropped; a failed compaction leaves the sequence as it was,
    /// not to be picked again; a panicked one fails its sequence (the cache may be half
    /// rewritten).
    fn poll_compactions(&mut self) {
        let Some(c) = &self.compactor else { return };
        let done = match c.poll() {
            Ok(Some(d)) => d,
            Ok(None) => return,
            Err(_) => {
                tracing::error!("the compaction worker has stopped");
                self.compactor = None;
                if let Some(f) = self.in_flight.take() {
                    if let Some(i) = self.running.iter().position(|s| s.id == f.seq) {
                        let s = self.running.remove(i);
                        let _ = s.job.events.send(Event::Error(ApiError::internal("internal error while compacting (the server goes on)")));
                    }
                }
                return;
            }
        };
        self.in_flight = None;
        let Some(i) = self.running.iter().position(|s| s.id == done.seq) else {
            tracing::info!(seq = done.seq, "dropped the compaction of a sequence whose client left");
            return;
        };
        let keep = self.cfg.keep_recent;
        let s = &mut self.running[i];
        s.compacting = false;
        match done.outcome {
            Outcome::Compacted(report) => {
                s.cache = done.cache;
                s.fresh_rows = keep;
                self.metrics.compactions.inc();
                self.metrics.bytes_freed.inc_by(report.kv_bytes_before.saturating_sub(report.kv_bytes_after) as u64);
                self.metrics.compact_seconds.observe(report.total_seconds);
                tracing::info!(seq = s.id, before = report.kv_bytes_before, after = report.kv_bytes_after, seconds = report.total_seconds, "compacted a sequence under memory pressure");
            }
            Outcome::Failed(e) => {
                tracing::warn!("compaction under memory pressure failed: {e}");
                s.cache = done.cache;
                s.fresh_rows = 0; // do not pick it again
            }
            Outcome::Panicked => {
                tracing::error!(seq = s.id, "compaction panicked; failing its sequence");
                let s = self.running.remove(i);
                let _ = s.job.events.send(Event::Error(ApiError::internal("internal error while compacting (the server goes on)")));
                self.metrics.panics.inc();
            }
        }
    }

    /// Prefill chunks of the sequences still prefilling, oldest first, up to `--prefill-chunk`
    /// tokens in all per step (at least one chunk): a burst of short prompts is prefilled in one
    /// or two steps instead of one per step. Each sequence's chunks are its own forward calls —
    /// never fused with another sequence's — and a sequence's first token is sampled when its
    /// prompt is done.
    fn prefill_some(&mut self) {
        let chunk = self.cfg.prefill_chunk.max(1);
        let (mut spent, mut i) = (0, 0);
        while i < self.running.len() {
            let pending = self.running[i].pending;
            if pending == 0 || self.running[i].compacting {
                i += 1;
                continue;
            }
            let n = chunk.min(pending);
            if spent > 0 && spent + n > chunk {
                break;
            }
            spent += n;
            let before = self.running.len();
            // A fault in one sequence's prefill fails that sequence only (decode: `decode_all`).
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.prefill_chunk_of(i))).is_err() {
                tracing::error!("prefill of one sequence panicked; failing it alone");
                let s = self.running.remove(i);
                let _ = s.job.events.send(Event::Error(ApiError::internal("internal error while generating (the server goes on)")));
                self.metrics.panics.inc();
                continue;
            }
            if self.running.len() == before {
                i += 1; // else sequence i ended (or failed) and the next one moved into its place
            }
        }
    }

    /// The next prefill chunk of sequence `i`: at most `--prefill-chunk` tokens, cut at the same
    /// boundaries as `Model::forward` cuts a whole prompt, so the bits match `generate`.
    fn prefill_chunk_of(&mut self, i: usize) {
        if self.running[i].job.fail == Some(FailStage::Prefill) {
            panic!("fail point KVCOMPACT_FAIL_POINT reached in prefill");
        }
        let chunk = self.cfg.prefill_chunk.max(1);
        // The chunk's rows are already counted as promised: only the high-water mark is checked.
        self.make_room(0);
        let s = &mut self.running[i];
        let done = s.job.prompt.len() - s.pending;
        let n = chunk.min(s.pending);
        let last = n == s.pending;
        let want = if last { Logits::Last } else { Logits::None };
        let r = self.model.forward(&mut self.prefill_state, &mut s.cache, &s.job.prompt[done..done + n], want);
        if let Err(e) = r {
            let _ = s.job.events.send(Event::Error(ApiError::bad_request(e.to_string())));
            self.running.remove(i);
            return;
        }
        s.pending -= n;
        s.fresh_rows += n;
        if last {
            let logits = std::mem::take(&mut self.prefill_state.logits);
            self.emit(i, &logits);
            self.prefill_state.logits = logits;
        }
    }

    /// One batched decode step over every sequence that has a token to feed.
    ///
    /// A fault in the step fails only the sequence that causes it: every cache of the batch is
    /// rolled back to its length before the step, then each sequence is decoded alone to find
    /// the culprit(s). The others go on with the logits of their solo step, which are the same
    /// bits as the batched ones (batch invariance), so their tokens do not change.
    fn decode_all(&mut self) {
        let ready = |s: &Seq| s.next.is_some() && !s.compacting;
        let n = self.running.iter().filter(|s| ready(s)).count();
        if n == 0 {
            return;
        }
        // Before choosing the batch: this may hand one of them to the compaction worker.
        self.make_room(n);
        let ids: Vec<usize> = (0..self.running.len()).filter(|&i| ready(&self.running[i])).collect();
        if ids.is_empty() {
            return;
        }
        self.metrics.batch_size.observe(ids.len() as f64);
        let vocab = self.model.config.vocab_size;
        let saved: Vec<usize> = ids.iter().map(|&i| self.running[i].cache.next_pos()).collect();
        let batch = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.decode_rows(&ids)));
        // Per sequence of the batch: its logits row, or the error that fails it.
        let (logits, failed) = match batch {
            Ok(Ok(())) => (std::mem::take(&mut self.decode_state.logits), vec![None; ids.len()]),
            Ok(Err(e)) => {
                tracing::error!("batched decode step failed ({e}); decoding its {} sequences one by one", ids.len());
                self.rollback(&ids, &saved);
                self.decode_alone(&ids, &saved, vocab)
            }
            Err(_) => {
                tracing::error!("batched decode step panicked; decoding its {} sequences one by one", ids.len());
                self.rollback(&ids, &saved);
                let (logits, failed) = self.decode_alone(&ids, &saved, vocab);
                if failed.iter().all(Option::is_none) {
                    // Not reproduced alone: nobody is failed, but the panic is counted.
                    tracing::warn!("the batched decode panic did not recur for any sequence alone");
                    self.metrics.panics.inc();
                }
                (logits, failed)
            }
        };
        // Emit in reverse so that removing finished or failed sequences keeps the earlier
        // indices valid.
        for (k, &i) in ids.iter().enumerate().rev() {
            if let Some(err) = &failed[k] {
                let s = self.running.remove(i);
                let _ = s.job.events.send(Event::Error(err.clone()));
                continue;
            }
            let s = &mut self.running[i];
            let fed = s.next.take().expect("filtered");
            s.tokens.push(fed);
            s.fresh_rows += 1;
            self.emit(i, &logits[k * vocab..(k + 1) * vocab]);
        }
        self.decode_state.logits = logits;
    }

    /// Feed the pending token of every sequence in `ids` (ascending) in one batched step; the
    /// logits are left in `decode_state.logits`, one row per sequence.
    fn decode_rows(&mut self, ids: &[usize]) -> crate::Result<()> {
        let tokens: Vec<u32> = ids.iter().map(|&i| self.running[i].next.expect("a token to feed")).collect();
        let mut caches: Vec<&mut KvCache> = Vec::with_capacity(ids.len());
        let mut k = 0;
        for (i, s) in self.running.iter_mut().enumerate() {
            if k < ids.len() && ids[k] == i {
                caches.push(&mut s.cache);
                k += 1;
            }
        }
        self.model.decode_batch(&mut self.decode_state, &mut caches, &tokens)?;
        // After the step, so that the rollback has appended rows and advanced counters to undo.
        if ids.iter().any(|&i| self.running[i].job.fail == Some(FailStage::Decode)) {
            panic!("fail point KVCOMPACT_FAIL_POINT reached in decode");
        }
        Ok(())
    }

    /// Undo a failed decode step: drop every row at or after each cache's saved length and
    /// reset its counter. Exact whether the step stopped mid-layer (rows in some layers, counter
    /// not advanced) or after the end: every row it appended sits at the saved position, past
    /// all older rows, so truncation removes exactly those.
    fn rollback(&mut self, ids: &[usize], saved: &[usize]) {
        for (&i, &pos) in ids.iter().zip(saved) {
            self.running[i].cache.truncate_to(pos);
        }
    }

    /// Decode each sequence of `ids` alone (after a failed batched step): the logits rows of
    /// those that succeed, and for each one that fails, the error to end it with (its cache
    /// rolled back as well).
    fn decode_alone(&mut self, ids: &[usize], saved: &[usize], vocab: usize) -> (Vec<f32>, Vec<Option<ApiError>>) {
        let mut logits = vec![0.0f32; ids.len() * vocab];
        let mut failed = vec![None; ids.len()];
        for (k, &i) in ids.iter().enumerate() {
            let one = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.decode_rows(&[i])));
            let err = match one {
                Ok(Ok(())) => {
                    logits[k * vocab..(k + 1) * vocab].copy_from_slice(&self.decode_state.logits[..vocab]);
                    continue;
                }
                Ok(Err(e)) => ApiError::internal(e.to_string()),
                Err(_) => {
                    tracing::error!("decode of one sequence panicked alone; failing it");
                    self.metrics.panics.inc();
                    ApiError::internal("internal error while generating (the server goes on)")
                }
            };
            self.running[i].cache.truncate_to(saved[k]);
            failed[k] = Some(err);
        }
        (logits, failed)
    }

    /// Sample sequence i's next token from `logits`, send it, and end the sequence when it is
    /// done (the same stopping rules, in the same order, as `generate`).
    fn emit(&mut self, i: usize, logits: &[f32]) {
        let max_pos = self.model.config.max_position_embeddings;
        let eos = &self.tok.eos_ids;
        let s = &mut self.running[i];
        let next = s.sampler.sample(logits);
        s.generated += 1;
        let now = Instant::now();
        match s.last_token_at {
            None => self.metrics.ttft.observe((now - s.job.arrived).as_secs_f64()),
            Some(t) => self.metrics.itl.observe((now - t).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        self.metrics.generated_tokens.inc();
        let gone = s.job.events.send(Event::Token(next)).is_err();
        let stop = if !s.job.ignore_eos && eos.contains(&next) {
            Some("eos")
        } else if s.generated >= s.job.max_tokens {
            Some("max_tokens")
        } else if s.cache.next_pos() >= max_pos {
            Some("context_full")
        } else {
            None
        };
        if gone {
            self.metrics.cancelled.inc();
            self.running.remove(i);
        } else if let Some(stop) = stop {
            let _ = s.job.events.send(Event::Done { stop, prompt_tokens: s.job.prompt.len(), completion_tokens: s.generated });
            self.running.remove(i);
        } else {
            s.next = Some(next);
        }
    }

    /// Hand a document to the documents worker (started at the first one); decoding goes on
    /// while it is compacted.
    fn submit_document(&mut self, d: Box<DocJob>) {
        if self.docs.is_none() {
            let ctx = DocContext {
                model: self.model.clone(),
                tok: self.tok.clone(),
                store: self.store.clone(),
                metrics: self.metrics.clone(),
                global_budgets: self.cfg.global_budgets,
                row_bytes: self.row_bytes(),
                hold: self.cfg.hold_compactions.clone(),
            };
            match DocWorker::spawn(ctx, self.threads) {
                Ok(w) => self.docs = Some(w),
                Err(e) => {
                    let _ = d.reply.send(Err(ApiError::internal(e.to_string())));
                    return;
                }
            }
        }
        if let Err(d) = self.docs.as_ref().expect("started above").submit(d) {
            let _ = d.reply.send(Err(ApiError::internal("the documents worker has stopped")));
        }
    }

    /// Documents queued or being compacted, not yet answered.
    fn docs_pending(&self) -> usize {
        self.docs.as_ref().map_or(0, |w| w.pending())
    }

    fn publish_gauges(&self) {
        self.metrics.kv_bytes.set(self.kv_bytes() as i64);
        self.metrics.queue_depth.set(self.waiting.len() as i64);
        self.metrics.running.set(self.running.len() as i64);
        self.metrics.documents_hot_bytes.set(self.store.hot_bytes() as i64);
        self.metrics.compactions_in_flight.set(self.in_flight.is_some() as i64);
    }
}

const MIB: f64 = (1u64 << 20) as f64;

/// Background compaction starts when the held bytes would pass this share of the budget (7/8):
/// the last eighth absorbs what running sequences grow by, and small requests, while it runs.
fn high_water(budget: usize) -> usize {
    budget / 8 * 7
}

/// How often an engine with nothing else to do looks for a compaction's result.
const COMPACTION_POLL: Duration = Duration::from_millis(20);

/// How long an admitted-later request waits for running sequences to free KV memory before it
/// is refused with 429.
const ADMIT_WAIT: Duration = Duration::from_secs(10);

/// The prefill chunk that reproduces `kvcompact generate` bit for bit.
pub const DEFAULT_PREFILL_CHUNK: usize = DEFAULT_MAX_BATCH;

#[cfg(test)]
mod tests {
    //! The engine driven step by step on the tiny golden model (no HTTP): panic isolation in
    //! the batched decode step and its rollback; compaction in the background.
    use super::*;
    use crate::cache::KvDtype;
    use crate::compact::{registry, Budget};
    use crate::document::{compact_context, compact_older_rows, CompactOptions, ContextLayout, QuerySource};
    use std::path::Path;
    use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

    fn tiny() -> (Model, Arc<Tokenizer>) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/tiny/llama-gqa");
        let model = Model::load(&dir).unwrap();
        let tok = Arc::new(Tokenizer::load(&dir, &model.config).unwrap());
        (model, tok)
    }

    fn config() -> EngineConfig {
        EngineConfig { max_batch: 8, kv_budget_bytes: None, policy: "am-highest".into(), ratio: 4.0, keep_recent: 8, prefill_chunk: DEFAULT_PREFILL_CHUNK, hold_compactions: None, global_budgets: true }
    }

    fn engine(cfg: EngineConfig, store: &Path) -> Engine {
        let (model, tok) = tiny();
        let store = Store::open(store, &model, 0).unwrap();
        Engine::new(Arc::new(model), tok, cfg, store, Arc::new(Metrics::new()))
    }

    fn job(tok: &Tokenizer, text: &str, max_tokens: usize, seed: u64, fail: Option<FailStage>) -> (Job, UnboundedReceiver<Event>) {
        let (events, rx) = unbounded_channel();
        let g = GenJob {
            prompt: tok.encode(text, true).unwrap(),
            start: None,
            chat: false,
            temperature: 0.8,
            top_p: 0.95,
            seed,
            max_tokens,
            ignore_eos: true,
            compaction: None,
            events,
            arrived: Instant::now(),
            fail,
        };
        (Job::Generate(Box::new(g)), rx)
    }

    /// Step until `done` (bounded, so a bug fails instead of hanging); like `Engine::run`, pause
    /// briefly while only a compaction is pending.
    fn step_until(e: &mut Engine, done: impl Fn(&Engine) -> bool) {
        let t0 = Instant::now();
        while !done(e) {
            assert!(t0.elapsed() < Duration::from_secs(300), "the engine did not get there");
            e.step();
            if !e.running.iter().any(|s| !s.compacting) {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Step until nothing is waiting or running.
    fn run_out(e: &mut Engine) {
        step_until(e, |e| e.waiting.is_empty() && e.running.is_empty() && e.in_flight.is_none());
    }

    /// The tokens a request received and how it ended.
    fn outcome(rx: &mut UnboundedReceiver<Event>) -> (Vec<u32>, Event) {
        let mut toks = Vec::new();
        loop {
            match rx.try_recv().expect("the request ended") {
                Event::Token(t) => toks.push(t),
                end => return (toks, end),
            }
        }
    }

    const PROMPTS: [&str; 3] = ["The harbour lantern was lit at dusk", "Seven ships sailed north", "A quiet morning on Pier Street"];

    #[test]
    fn a_decode_panic_fails_only_its_sequence() {
        let dir = tempfile::tempdir().unwrap();
        // Alone: the reference tokens of two healthy requests.
        let mut alone = engine(config(), dir.path());
        let tok = alone.tok.clone();
        let mut refs = Vec::new();
        for (k, p) in [PROMPTS[0], PROMPTS[2]].into_iter().enumerate() {
            let (j, mut rx) = job(&tok, p, 20, k as u64, None);
            alone.accept(j);
            run_out(&mut alone);
            let (toks, end) = outcome(&mut rx);
            assert!(matches!(end, Event::Done { stop: "max_tokens", .. }), "{end:?}");
            refs.push(toks);
        }
        // Together, with a faulty request between them: all three enter the same batched step.
        let mut e = engine(config(), dir.path());
        let (a, mut rx_a) = job(&tok, PROMPTS[0], 20, 0, None);
        let (f, mut rx_f) = job(&tok, PROMPTS[1], 20, 7, Some(FailStage::Decode));
        let (b, mut rx_b) = job(&tok, PROMPTS[2], 20, 1, None);
        for j in [a, f, b] {
            e.accept(j);
        }
        run_out(&mut e);
        let (toks_f, end_f) = outcome(&mut rx_f);
        assert_eq!(toks_f.len(), 1, "the faulty request gets its prefill token, then fails");
        match end_f {
            Event::Error(err) => assert_eq!(err.status.as_u16(), 500),
            other => panic!("expected an error, got {other:?}"),
        }
        assert_eq!(outcome(&mut rx_a).0, refs[0]);
        assert_eq!(outcome(&mut rx_b).0, refs[1]);
        assert_eq!(e.metrics.panics.get(), 1);
        assert_eq!(e.metrics.batch_size.get_sample_sum() as usize, 3 + 18 * 2, "one step of three, then pairs");
        // The engine goes on serving.
        let (c, mut rx_c) = job(&tok, PROMPTS[0], 20, 0, None);
        e.accept(c);
        run_out(&mut e);
        assert_eq!(outcome(&mut rx_c).0, refs[0]);
    }

    fn bits(x: &[f32]) -> Vec<u32> {
        x.iter().map(|v| v.to_bits()).collect()
    }

    /// Same rows (bit for bit), positions, β and counter.
    fn assert_same(a: &KvCache, b: &KvCache) {
        assert_eq!(a.next_pos(), b.next_pos());
        for l in 0..a.n_layers {
            for h in 0..a.n_kv_heads {
                let (ka, va, ba, pa) = a.head(l, h);
                let (kb, vb, bb, pb) = b.head(l, h);
                assert_eq!(pa, pb, "positions of layer {l} head {h}");
                assert_eq!(bits(ka), bits(kb), "keys of layer {l} head {h}");
                assert_eq!(bits(va), bits(vb), "values of layer {l} head {h}");
                assert_eq!(ba.map(bits), bb.map(bits), "β of layer {l} head {h}");
            }
        }
    }

    #[test]
    fn rollback_of_a_failed_step_is_exact() {
        let (model, tok) = tiny();
        let prompt = tok.encode(&PROMPTS.concat().repeat(3), true).unwrap();
        let mut st = model.new_state(DEFAULT_MAX_BATCH);
        let mut cache = model.new_cache();
        model.forward(&mut st, &mut cache, &prompt, Logits::None).unwrap();
        // A compacted cache: rows with β, positions with gaps.
        let method = registry::require_am("am-highest", "test").unwrap();
        let opts = CompactOptions { budget: Budget::Ratio(4.0), n_queries: 64, n_test: 8, seed: 3, ..Default::default() };
        compact_older_rows(&model, &mut st, &tok, &method, &mut cache, &prompt, 8, 4096, false, &opts).unwrap();
        let before = cache.clone();
        let pos = cache.next_pos();
        let mut dec = model.new_state(4);
        // A whole step (rows in every layer, counter advanced), undone.
        model.decode_batch(&mut dec, &mut [&mut cache], &[5]).unwrap();
        cache.truncate_to(pos);
        assert_same(&cache, &before);
        // A step stopped mid-way: rows in the first layers only, counter not advanced.
        let hd = model.config.head_dim;
        for l in 0..model.config.n_layers / 2 {
            for h in 0..model.config.n_kv_heads {
                cache.append(l, h, &vec![1.0; hd], &vec![2.0; hd], &[pos as u32]);
            }
        }
        cache.truncate_to(pos);
        assert_same(&cache, &before);
        cache.check().unwrap();
        // And the next step gives the bits it gives on the untouched cache.
        let mut twin = before.clone();
        model.decode_batch(&mut dec, &mut [&mut cache], &[9]).unwrap();
        let got = dec.logits.clone();
        model.decode_batch(&mut dec, &mut [&mut twin], &[9]).unwrap();
        assert_eq!(bits(&got), bits(&dec.logits));
    }

    #[test]
    fn fail_point_spelling() {
        assert_eq!(FailPoint::parse("<<x>>"), Some(FailPoint { marker: "<<x>>".into(), stage: FailStage::Prefill }));
        assert_eq!(FailPoint::parse("decode:<<x>>"), Some(FailPoint { marker: "<<x>>".into(), stage: FailStage::Decode }));
        assert_eq!(FailPoint::parse("prefill:a:b"), Some(FailPoint { marker: "a:b".into(), stage: FailStage::Prefill }));
        assert_eq!(FailPoint::parse("decode:"), None);
        assert_eq!(FailPoint::parse(""), None);
    }

    /// Also for a bf16 KV cache: compaction runs on the widened rows and the result is stored
    /// back as bf16, the same bits inline and on the worker.
    #[test]
    fn background_compaction_equals_the_inline_one() {
        for dtype in [KvDtype::F32, KvDtype::Bf16] {
            let (mut model, tok) = tiny();
            model.set_kv_dtype(dtype).unwrap();
            let tokens = tok.encode(&PROMPTS.concat().repeat(2), true).unwrap();
            let mut cache = model.new_cache();
            model.forward(&mut model.new_state(DEFAULT_MAX_BATCH), &mut cache, &tokens, Logits::None).unwrap();
            // What the engine ran inline before compaction moved to the worker.
            let mut inline = cache.clone();
            let method = registry::require_am("am-highest", "serve").unwrap();
            let opts = CompactOptions { budget: Budget::Ratio(4.0), n_queries: 1024, n_test: 64, seed: 11, global_budgets: true, ..Default::default() };
            let report = compact_older_rows(&model, &mut model.new_state(DEFAULT_MAX_BATCH), &tok, &method, &mut inline, &tokens, 8, 4096, false, &opts).unwrap();
            assert!(inline.bytes() < cache.bytes());
            assert_eq!((inline.dtype(), report.kv_bytes_before, report.kv_bytes_after), (dtype, cache.bytes(), inline.bytes()));
            let worker = Compactor::spawn(Arc::new(model), tok, rayon::current_num_threads(), None).unwrap();
            let task = Box::new(Task { seq: 42, cache, tokens, method: "am-highest".into(), ratio: 4.0, seed: 11, chat: false, keep_recent: 8, global_budgets: true });
            assert!(worker.submit(task).is_ok());
            let t0 = Instant::now();
            let done = loop {
                if let Some(d) = worker.poll().unwrap() {
                    break d;
                }
                assert!(t0.elapsed() < Duration::from_secs(300), "no result from the worker");
                std::thread::sleep(Duration::from_millis(5));
            };
            assert_eq!(done.seq, 42);
            assert!(matches!(done.outcome, Outcome::Compacted(_)));
            assert_eq!(done.cache.dtype(), dtype);
            let f32_of = |c: &KvCache| c.clone().into_dtype(KvDtype::F32);
            assert_same(&f32_of(&done.cache), &f32_of(&inline));
        }
    }

    /// Tokens of a request that ran alone on an engine with `cfg`.
    fn alone(cfg: EngineConfig, store: &Path, text: &str, max_tokens: usize, seed: u64) -> Vec<u32> {
        let mut e = engine(cfg, store);
        let (j, mut rx) = job(&e.tok.clone(), text, max_tokens, seed, None);
        e.accept(j);
        run_out(&mut e);
        let (toks, end) = outcome(&mut rx);
        assert!(matches!(end, Event::Done { .. }), "{end:?}");
        toks
    }

    #[test]
    fn the_engine_steps_while_a_compaction_runs() {
        let dir = tempfile::tempdir().unwrap();
        let gate = dir.path().join("release");
        let probe = engine(config(), dir.path());
        let (tok, row) = (probe.tok.clone(), probe.row_bytes());
        let (long, short, medium) = (PROMPTS.concat(), "Ships", PROMPTS[0]);
        let long_len = tok.encode(&long, true).unwrap().len();
        // The long request passes the high-water mark 30 tokens into its generation; the short
        // one fits beside it even before its compaction is back, the medium one does not.
        let budget = (long_len + 30) * row * 8 / 7 + row;
        let cfg = EngineConfig { kv_budget_bytes: Some(budget), ..config() };
        let free_rows = (budget - high_water(budget)) / row;
        let (short_len, medium_len) = (tok.encode(short, true).unwrap().len(), tok.encode(medium, true).unwrap().len());
        assert!(short_len + 1 < free_rows && medium_len + 1 > free_rows, "{short_len} {medium_len} {free_rows}");
        let ref_long = alone(cfg.clone(), dir.path(), &long, 60, 1);
        let ref_short = alone(cfg.clone(), dir.path(), short, 6, 2);
        let ref_medium = alone(cfg.clone(), dir.path(), medium, 6, 3);

        let mut e = engine(EngineConfig { hold_compactions: Some(gate.clone()), ..cfg.clone() }, dir.path());
        let (l, mut rx_l) = job(&tok, &long, 60, 1, None);
        e.accept(l);
        step_until(&mut e, |e| e.in_flight.is_some());
        let held = e.in_flight.as_ref().unwrap().bytes;
        assert!(e.running[0].compacting && e.kv_bytes() == held, "the cache with the worker counts as held");
        // Answered while the compaction is held in flight.
        let (sj, mut rx_s) = job(&tok, short, 6, 2, None);
        e.accept(sj);
        step_until(&mut e, |e| e.waiting.is_empty() && e.running.len() == 1);
        assert_eq!(outcome(&mut rx_s).0, ref_short);
        assert!(e.in_flight.is_some() && e.metrics.compactions.get() == 0);
        // Waits (not refused) while memory is promised but not free.
        let (mj, mut rx_m) = job(&tok, medium, 6, 3, None);
        e.accept(mj);
        for _ in 0..20 {
            e.step();
        }
        assert!(e.waiting.len() == 1 && rx_m.try_recv().is_err(), "the medium request waits for the compaction");
        std::fs::write(&gate, b"").unwrap();
        run_out(&mut e);
        assert_eq!(outcome(&mut rx_m).0, ref_medium);
        assert_eq!(outcome(&mut rx_l).0, ref_long, "the long request's tokens do not depend on what ran beside it");
        assert_eq!(e.metrics.compactions.get(), 1);
        assert_eq!(e.metrics.refused.get(), 0);
        assert!(e.metrics.bytes_freed.get() > 0);
    }

    #[test]
    fn a_cancelled_sequence_s_compaction_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let gate = dir.path().join("release");
        let probe = engine(config(), dir.path());
        let (tok, row) = (probe.tok.clone(), probe.row_bytes());
        let long = PROMPTS.concat();
        let budget = (tok.encode(&long, true).unwrap().len() + 20) * row * 8 / 7 + row;
        let mut e = engine(EngineConfig { kv_budget_bytes: Some(budget), hold_compactions: Some(gate.clone()), ..config() }, dir.path());
        let (l, rx_l) = job(&tok, &long, 60, 1, None);
        e.accept(l);
        step_until(&mut e, |e| e.in_flight.is_some());
        let held = e.in_flight.as_ref().unwrap().bytes;
        drop(rx_l); // the client leaves
        e.step();
        assert!(e.running.is_empty());
        assert_eq!(e.kv_bytes(), held, "held until the worker gives the cache back");
        std::fs::write(&gate, b"").unwrap();
        step_until(&mut e, |e| e.in_flight.is_none());
        assert_eq!(e.kv_bytes(), 0);
        assert_eq!(e.metrics.compactions.get(), 0);
    }

    /// A document is compacted on the documents worker while a sequence decodes: the sequence
    /// finishes (with its solo tokens) while the document is held in flight, and the stored
    /// cache is the same bits as
    /// `compact_context` on the engine's pool.
    #[test]
    fn sequences_decode_while_a_document_is_compacted() {
        let dir = tempfile::tempdir().unwrap();
        let gate = dir.path().join("release");
        let text = PROMPTS.concat();
        let reference = alone(config(), dir.path(), PROMPTS[1], 12, 4);
        let mut e = engine(EngineConfig { hold_compactions: Some(gate.clone()), ..config() }, dir.path());
        let (reply, mut rx_doc) = tokio::sync::oneshot::channel();
        e.accept(Job::Document(Box::new(DocJob { text: text.clone(), method: "am-highest".into(), ratio: 4.0, queries: QuerySource::Repeat, reply })));
        assert_eq!(e.docs_pending(), 1);
        let (g, mut rx) = job(&e.tok, PROMPTS[1], 12, 4, None);
        e.accept(g);
        run_out(&mut e);
        assert_eq!(outcome(&mut rx).0, reference, "decoded beside the document, with the solo tokens");
        assert!(rx_doc.try_recv().is_err() && e.docs_pending() == 1, "the document is still held");
        std::fs::write(&gate, b"").unwrap();
        let t0 = Instant::now();
        while e.docs_pending() > 0 {
            assert!(t0.elapsed() < Duration::from_secs(120), "the document was never answered");
            std::thread::sleep(Duration::from_millis(5));
        }
        let info = rx_doc.try_recv().expect("answered").expect("compacted");
        assert_eq!(e.metrics.compactions.get(), 1);
        let stored = e.store.get(&info.id).unwrap().expect("stored");
        let chat = e.tok.has_chat_template();
        let layout = ContextLayout::build(&e.tok, &text, chat).unwrap();
        let method = registry::require_am("am-highest", "test").unwrap();
        let opts = CompactOptions { budget: Budget::Ratio(4.0), n_queries: 2048, global_budgets: true, ..Default::default() };
        let (inline, _) = compact_context(&e.model, &e.tok, &layout, &method, &opts).unwrap();
        assert_same(&stored.cache, &inline);
    }

    /// A drain waits for the documents still being compacted: `run` returns only after the
    /// held document is released and answered.
    #[test]
    fn a_drain_waits_for_pending_documents() {
        let dir = tempfile::tempdir().unwrap();
        let gate = dir.path().join("release");
        let e = engine(EngineConfig { hold_compactions: Some(gate.clone()), ..config() }, dir.path());
        let (jobs, inbox) = std::sync::mpsc::channel();
        let (reply, mut rx_doc) = tokio::sync::oneshot::channel();
        jobs.send(Job::Document(Box::new(DocJob { text: PROMPTS[2].into(), method: "am-highest".into(), ratio: 4.0, queries: QuerySource::Repeat, reply }))).unwrap();
        jobs.send(Job::Drain).unwrap();
        let engine = std::thread::spawn(move || e.run(inbox));
        std::thread::sleep(Duration::from_millis(500));
        assert!(!engine.is_finished() && rx_doc.try_recv().is_err(), "the drain returned before the document was answered");
        std::fs::write(&gate, b"").unwrap();
        engine.join().unwrap();
        assert!(rx_doc.try_recv().expect("answered before the engine returned").is_ok());
        drop(jobs);
    }

    /// Prompts arriving together are admitted against what they will take, not against their
    /// still-empty caches: with room for two, the third waits, the held-or-promised bytes never
    /// pass the budget while they prefill, and all three finish.
    #[test]
    fn prompts_arriving_together_are_admitted_within_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let probe = engine(config(), dir.path());
        let (tok, row) = (probe.tok.clone(), probe.row_bytes());
        let text = PROMPTS.concat();
        let len = tok.encode(&text, true).unwrap().len();
        let budget = (2 * (len + 1) + 4) * row;
        let mut e = engine(EngineConfig { kv_budget_bytes: Some(budget), ..config() }, dir.path());
        let mut rxs = Vec::new();
        for seed in 0..3 {
            let (j, rx) = job(&tok, &text, 4, seed, None);
            e.accept(j);
            rxs.push(rx);
        }
        e.admit();
        assert_eq!(e.running.len(), 2, "the third prompt waits for room");
        assert!(e.held_bytes() <= budget);
        let t0 = Instant::now();
        while !(e.waiting.is_empty() && e.running.is_empty() && e.in_flight.is_none()) {
            assert!(t0.elapsed() < Duration::from_secs(60), "the requests did not finish");
            e.step();
            assert!(e.kv_bytes() <= budget, "{} bytes held, budget {budget}", e.kv_bytes());
        }
        for rx in &mut rxs {
            assert!(matches!(outcome(rx).1, Event::Done { .. }));
        }
    }
}
