//! The engine: one thread owns the model, every sequence and its KV cache, and steps them.
//!
//! Each step (spec `serving.md`, "Shape"):
//! 1. take new jobs from the channel (waiting when there is nothing to do);
//! 2. admit waiting requests while a batch slot is free and the KV budget holds their prompt —
//!    compacting the sequence with the most uncompacted rows when it does not, and refusing
//!    with 429 only when compaction cannot free enough;
//! 3. run prefill chunks of the oldest prefilling sequences, up to `--prefill-chunk` tokens in all
//!    (each sequence's chunks are its own forward calls, cut where `generate` cuts them);
//! 4. run **one batched decode step** for every decoding sequence ([`Model::decode_batch`]);
//! 5. hand each new token to its request; drop sequences whose client went away.
//!
//! A prefill chunk is never shared between sequences and the batched decode reduces every row
//! exactly as single-sequence decode does, so a request's tokens are the same bits whatever else
//! is in the batch, and equal to `kvcompact generate` with the same prompt and sampling.
//! The engine runs on a rayon worker; model math uses the pool, never the async runtime.

use std::collections::VecDeque;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::api::ApiError;
use super::documents::{DocumentInfo, Store};
use super::metrics::Metrics;
use crate::cache::KvCache;
use crate::compact::{registry, Budget};
use crate::document::{compact_context, compact_older_rows, CompactOptions, ContextLayout, QuerySource};
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
    /// Testing fail point: the engine step that prefills this sequence panics (set only when the
    /// server was started with `KVCOMPACT_FAIL_POINT` and the prompt holds that marker).
    pub fail: bool,
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

/// A document to compact once and store.
pub struct DocJob {
    /// The text, prefilled as a user turn.
    pub text: String,
    /// Attention Matching method.
    pub method: String,
    /// Compaction ratio.
    pub ratio: f64,
    /// Reference query source.
    pub queries: QuerySource,
    /// The answer.
    pub reply: tokio::sync::oneshot::Sender<Result<DocumentInfo, ApiError>>,
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
    job: Box<GenJob>,
    cache: KvCache,
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

/// The engine state (see the module docs).
pub struct Engine {
    model: Model,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    store: Store,
    metrics: Arc<Metrics>,
    waiting: VecDeque<Box<GenJob>>,
    running: Vec<Seq>,
    prefill_state: RunState,
    decode_state: RunState,
    /// Compactions run their query tokens in chunks of [`DEFAULT_MAX_BATCH`], as online
    /// compaction in `generate` does, whatever the prefill chunk.
    compact_state: RunState,
    draining: bool,
}

impl Engine {
    /// An engine over `model`; nothing runs until [`Engine::run`].
    pub fn new(model: Model, tok: Arc<Tokenizer>, cfg: EngineConfig, store: Store, metrics: Arc<Metrics>) -> Engine {
        let prefill_state = model.new_state(cfg.prefill_chunk.max(1));
        let decode_state = model.new_state(cfg.max_batch.max(1));
        let compact_state = model.new_state(DEFAULT_MAX_BATCH);
        Engine { model, tok, cfg, store, metrics, waiting: VecDeque::new(), running: Vec::new(), prefill_state, decode_state, compact_state, draining: false }
    }

    /// Step until drained: returns after a [`Job::Drain`] once nothing is left, or when every
    /// sender of the channel is gone.
    pub fn run(mut self, jobs: Receiver<Job>) {
        loop {
            let idle = self.waiting.is_empty() && self.running.is_empty();
            if idle && self.draining {
                return;
            }
            // Block while idle; otherwise only take what is already there.
            let first = if idle {
                match jobs.recv_timeout(Duration::from_millis(200)) {
                    Ok(j) => Some(j),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            } else {
                None
            };
            for job in first.into_iter().chain(std::iter::from_fn(|| jobs.try_recv().ok())) {
                self.accept(job);
            }
            let step = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step()));
            if step.is_err() {
                // A fault inside the model math: fail what was running, keep serving.
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
            Job::Document(d) => {
                let reply = self.document(&d);
                let _ = d.reply.send(reply);
            }
        }
    }

    /// KV bytes held by every running sequence.
    fn kv_bytes(&self) -> usize {
        self.running.iter().map(|s| s.cache.bytes()).sum()
    }

    /// What the KV budget bounds: the running sequences' caches and the documents kept in RAM.
    fn held_bytes(&self) -> usize {
        self.kv_bytes() + self.store.hot_bytes()
    }

    /// Bytes one more token costs a sequence: one row in every (layer, KV head).
    fn row_bytes(&self) -> usize {
        let c = &self.model.config;
        c.n_layers * c.n_kv_heads * KvCache::row_bytes(c.head_dim)
    }

    /// Under a budget, compact until `rows` more tokens' rows fit (as far as compaction can).
    fn make_room(&mut self, rows: usize) {
        if let Some(budget) = self.cfg.kv_budget_bytes {
            let need = rows * self.row_bytes();
            if self.held_bytes() + need > budget {
                self.free_until(budget.saturating_sub(need));
            }
        }
    }

    fn step(&mut self) {
        // Forget sequences whose client left: their memory is free at once.
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
                if self.held_bytes() + need > budget && !self.free_until(budget - need) {
                    // Running sequences will end and free their memory: a request waits for
                    // them a while; with nothing running, or after the wait, it is refused.
                    let waited = self.waiting.front().map_or(Duration::ZERO, |j| j.arrived.elapsed());
                    if !self.running.is_empty() && waited < ADMIT_WAIT {
                        break;
                    }
                    let job = self.waiting.pop_front().expect("front exists");
                    let _ = job.events.send(Event::Error(ApiError::out_of_memory(format!(
                        "KV memory is full ({:.1} of {:.1} MiB held) and compaction cannot free {:.1} MiB; retry later",
                        self.held_bytes() as f64 / MIB,
                        budget as f64 / MIB,
                        need as f64 / MIB
                    ))));
                    self.metrics.refused.inc();
                    continue;
                }
            }
            let mut job = self.waiting.pop_front().expect("front exists");
            // The sequence owns a copy; the document's shared cache is let go here, so a
            // document dropped from RAM under pressure is really freed.
            let (cache, mut tokens) = match job.start.take() {
                Some((c, t)) => ((*c).clone(), (*t).clone()),
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
            self.running.push(Seq { job, cache, sampler, tokens, pending, next: None, generated: 0, fresh_rows: 0, last_token_at: None });
        }
    }

    /// Free KV memory until the held bytes are at most `target`: first documents kept in RAM
    /// (their files stay; they are read back when asked for), then compact sequences, most
    /// uncompacted rows first. False when nothing compactable is left.
    fn free_until(&mut self, target: usize) -> bool {
        if self.held_bytes() > target {
            let shed = self.store.shed_hot(target.saturating_sub(self.kv_bytes()));
            if shed > 0 {
                self.metrics.documents_shed_bytes.inc_by(shed as u64);
                tracing::info!(bytes = shed, "dropped documents from RAM under memory pressure");
            }
        }
        loop {
            if self.held_bytes() <= target {
                return true;
            }
            let keep = self.cfg.keep_recent;
            let candidate = self
                .running
                .iter()
                .enumerate()
                .filter(|(_, s)| s.pending == 0 && s.fresh_rows > keep + 8)
                .max_by_key(|(_, s)| s.fresh_rows)
                .map(|(i, _)| i);
            let Some(i) = candidate else { return false };
            if let Err(e) = self.compact(i) {
                tracing::warn!("compaction under memory pressure failed: {e}");
                self.running[i].fresh_rows = 0; // do not pick it again
            }
        }
    }

    /// Compact all but the last `keep_recent` rows of sequence `i`, earlier β carried.
    fn compact(&mut self, i: usize) -> crate::Result<()> {
        let (method, ratio) = self.running[i].job.compaction.clone().unwrap_or_else(|| (self.cfg.policy.clone(), self.cfg.ratio));
        let method = registry::require_am(&method, "serve")?;
        let s = &mut self.running[i];
        let before = s.cache.bytes();
        let opts = CompactOptions { budget: Budget::Ratio(ratio), n_queries: 1024, n_test: 64, seed: s.job.seed, ..Default::default() };
        let report = compact_older_rows(&self.model, &mut self.compact_state, &self.tok, &method, &mut s.cache, &s.tokens, self.cfg.keep_recent, 4096, s.job.chat, &opts)?;
        s.fresh_rows = self.cfg.keep_recent;
        self.metrics.compactions.inc();
        self.metrics.bytes_freed.inc_by(before.saturating_sub(s.cache.bytes()) as u64);
        self.metrics.compact_seconds.observe(report.total_seconds);
        tracing::info!(seq = i, before, after = s.cache.bytes(), seconds = report.total_seconds, "compacted a sequence under memory pressure");
        Ok(())
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
            if pending == 0 {
                i += 1;
                continue;
            }
            let n = chunk.min(pending);
            if spent > 0 && spent + n > chunk {
                break;
            }
            spent += n;
            let before = self.running.len();
            // A fault in one sequence's prefill fails that sequence only; a fault in the shared
            // decode step still fails every running one (see `run`).
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
        if self.running[i].job.fail {
            panic!("fail point KVCOMPACT_FAIL_POINT reached");
        }
        let chunk = self.cfg.prefill_chunk.max(1);
        self.make_room(chunk.min(self.running[i].pending));
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
    fn decode_all(&mut self) {
        let ids: Vec<usize> = (0..self.running.len()).filter(|&i| self.running[i].next.is_some()).collect();
        if ids.is_empty() {
            return;
        }
        self.make_room(ids.len());
        let tokens: Vec<u32> = ids.iter().map(|&i| self.running[i].next.expect("filtered")).collect();
        let result = {
            let mut caches: Vec<&mut KvCache> = Vec::with_capacity(ids.len());
            let mut k = 0;
            for (i, s) in self.running.iter_mut().enumerate() {
                if k < ids.len() && ids[k] == i {
                    caches.push(&mut s.cache);
                    k += 1;
                }
            }
            self.model.decode_batch(&mut self.decode_state, &mut caches, &tokens)
        };
        self.metrics.batch_size.observe(ids.len() as f64);
        if let Err(e) = result {
            for &i in ids.iter().rev() {
                let _ = self.running[i].job.events.send(Event::Error(ApiError::internal(e.to_string())));
                self.running.remove(i);
            }
            return;
        }
        let vocab = self.model.config.vocab_size;
        let logits = std::mem::take(&mut self.decode_state.logits);
        // Emit in reverse so that removing finished sequences keeps the earlier indices valid.
        for (k, &i) in ids.iter().enumerate().rev() {
            let s = &mut self.running[i];
            let fed = s.next.take().expect("filtered");
            s.tokens.push(fed);
            s.fresh_rows += 1;
            self.emit(i, &logits[k * vocab..(k + 1) * vocab]);
        }
        self.decode_state.logits = logits;
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

    /// Compact a document once and store it (runs between steps; decoding waits meanwhile).
    fn document(&mut self, d: &DocJob) -> Result<DocumentInfo, ApiError> {
        let method = registry::require_am(&d.method, "serve").map_err(|e| ApiError::bad_param("method", e.to_string()))?;
        let chat = self.tok.has_chat_template();
        let layout = ContextLayout::build(&self.tok, &d.text, chat).map_err(|e| ApiError::bad_param("text", e.to_string()))?;
        let opts = CompactOptions { budget: Budget::Ratio(d.ratio), queries: d.queries, n_queries: 2048, ..Default::default() };
        let full_bytes = layout.len() * self.row_bytes();
        let (cache, report) = compact_context(&self.model, &self.tok, &layout, &method, &opts).map_err(|e| ApiError::bad_request(e.to_string()))?;
        let info = self
            .store
            .insert(&self.model, cache, chat, &d.method, d.ratio, &report, full_bytes, layout.tokens())
            .map_err(|e| ApiError::internal(format!("storing the document: {e}")))?;
        self.metrics.compactions.inc();
        Ok(info)
    }

    fn publish_gauges(&self) {
        self.metrics.kv_bytes.set(self.kv_bytes() as i64);
        self.metrics.queue_depth.set(self.waiting.len() as i64);
        self.metrics.running.set(self.running.len() as i64);
        self.metrics.documents_hot_bytes.set(self.store.hot_bytes() as i64);
    }
}

const MIB: f64 = (1u64 << 20) as f64;

/// How long an admitted-later request waits for running sequences to free KV memory before it
/// is refused with 429.
const ADMIT_WAIT: Duration = Duration::from_secs(10);

/// The prefill chunk that reproduces `kvcompact generate` bit for bit.
pub const DEFAULT_PREFILL_CHUNK: usize = DEFAULT_MAX_BATCH;
