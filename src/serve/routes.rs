//! HTTP routes: parse and validate OpenAI requests, render prompts, hand jobs to the engine,
//! and turn its events into JSON or server-sent events. Nothing here runs model math.

use std::convert::Infallible;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream;
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use super::api::{self, ApiError, ChatRequest, CompletionRequest, Content, DocumentRequest, Prompt, Sampling, Usage};
use super::documents::Store;
use super::metrics::Metrics;
use super::doc_worker::DocJob;
use super::scheduler::{Event, FailPoint, GenJob, Job};
use crate::document::{continuation_tokens, QuerySource};
use crate::tokenizer::{Message, TextStream, Tokenizer};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    /// The engine's inbox.
    pub jobs: Sender<Job>,
    /// The model's tokenizer (prompts in, text out).
    pub tok: Arc<Tokenizer>,
    /// The name clients use for the model (`GET /v1/models`).
    pub model_name: String,
    /// The model's context in tokens.
    pub max_context: usize,
    /// Compacted documents.
    pub store: Store,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Required bearer token, if any.
    pub api_key: Option<String>,
    /// Default Attention Matching method (documents, memory pressure).
    pub policy: String,
    /// Testing fail point (`KVCOMPACT_FAIL_POINT`): a completion prompt holding its marker makes
    /// the engine panic in that sequence's prefill or decode, to exercise the 500 path. None in
    /// normal use.
    pub fail_point: Option<FailPoint>,
}

/// Every route, with authentication, request counting and the OpenAI-shaped fallbacks.
pub fn router(state: AppState, body_limit: usize) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/documents", post(create_document).get(list_documents))
        .route("/v1/documents/{id}", get(get_document).delete(delete_document))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .merge(api)
        .fallback(|| async { ApiError { status: StatusCode::NOT_FOUND, ..ApiError::bad_request("Unknown route") }.into_response() })
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| ApiError::internal("internal error (the server goes on)").into_response()))
        .layer(axum::extract::DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

/// `Authorization: Bearer <key>`, compared in constant time.
async fn auth(State(st): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(key) = &st.api_key {
        use subtle::ConstantTimeEq;
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")).unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

/// Count requests by route and status.
async fn count(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    st.metrics.requests.with_label_values(&[route.as_str(), resp.status().as_str()]).inc();
    resp
}

/// The body, or the OpenAI-shaped error for a body that could not be read (413 when too large).
fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    b.map_err(|e| ApiError { status: e.status(), ..ApiError::bad_request(format!("Could not read the request body: {e}")) })
}

async fn models(State(st): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{"id": st.model_name, "object": "model", "created": 0, "owned_by": "kvcompact"}]}))
}

async fn metrics(State(st): State<AppState>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], st.metrics.render()).into_response()
}

/// A generation resolved from a request: what the engine needs and how to answer.
struct Plan {
    job: GenJob,
    rx: UnboundedReceiver<Event>,
    stops: Vec<String>,
    stream: bool,
    include_usage: bool,
}

/// Checks shared by chat and text completions; builds the engine job around `prompt`.
fn plan(st: &AppState, model: Option<&str>, s: &Sampling, prompt: Vec<u32>, start: Option<(Arc<crate::cache::KvCache>, Arc<Vec<u32>>)>, chat: bool, ext: Option<&api::Extension>) -> Result<Plan, ApiError> {
    if let Some(m) = model {
        if m != st.model_name {
            return Err(ApiError::not_found("model", m));
        }
    }
    if s.n.is_some_and(|n| n != 1) {
        return Err(ApiError::bad_param("n", "only n = 1 is supported"));
    }
    let temperature = s.temperature.unwrap_or(1.0);
    if !(temperature >= 0.0 && temperature.is_finite() && temperature <= 2.0) {
        return Err(ApiError::bad_param("temperature", "temperature must be a number in [0, 2]"));
    }
    let top_p = s.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_param("top_p", "top_p must be in (0, 1]"));
    }
    let context = start.as_ref().map_or(0, |(c, _)| c.next_pos());
    if prompt.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty after tokenization"));
    }
    if context + prompt.len() + 1 > st.max_context {
        return Err(ApiError::bad_param(
            "messages",
            format!("the prompt has {} tokens{}; the model's context is {} tokens", prompt.len(), if context > 0 { format!(" after {context} of document") } else { String::new() }, st.max_context),
        ));
    }
    let room = st.max_context - context - prompt.len();
    let max_tokens = s.max_completion_tokens.or(s.max_tokens).unwrap_or(room);
    if max_tokens == 0 {
        return Err(ApiError::bad_param("max_tokens", "max_tokens must be at least 1"));
    }
    let stops = s.stop.as_ref().map(|x| x.list()).unwrap_or_default();
    if stops.len() > 4 {
        return Err(ApiError::bad_param("stop", "at most 4 stop sequences"));
    }
    let compaction = match ext.and_then(|e| e.compaction.as_ref()) {
        Some(c) => {
            let method = c.method.clone().unwrap_or_else(|| st.policy.clone());
            crate::compact::registry::require_am(&method, "serve").map_err(|e| ApiError::bad_param("kvcompact.compaction.method", e.to_string()))?;
            let ratio = c.ratio.unwrap_or(5.0);
            if !(ratio > 1.0 && ratio.is_finite()) {
                return Err(ApiError::bad_param("kvcompact.compaction.ratio", "ratio must be a number > 1"));
            }
            Some((method, ratio))
        }
        None => None,
    };
    let (tx, rx) = unbounded_channel();
    let job = GenJob {
        prompt,
        start,
        chat,
        temperature,
        top_p,
        seed: s.seed.unwrap_or(0),
        max_tokens: max_tokens.min(room),
        ignore_eos: s.ignore_eos,
        compaction,
        events: tx,
        arrived: Instant::now(),
        fail: None,
    };
    Ok(Plan { job, rx, stops, stream: s.stream, include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage) })
}

fn message_text(c: &Option<Content>, i: usize) -> Result<String, ApiError> {
    match c {
        None => Ok(String::new()),
        Some(Content::Text(t)) => Ok(t.clone()),
        Some(Content::Parts(parts)) => {
            let mut out = String::new();
            for p in parts {
                if p.kind != "text" {
                    return Err(ApiError::bad_param(&format!("messages[{i}].content"), format!("content parts of type {:?} are not supported (text only)", p.kind)));
                }
                out.push_str(p.text.as_deref().unwrap_or(""));
            }
            Ok(out)
        }
    }
}

async fn chat(State(st): State<AppState>, b: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b = body(b)?;
        let req: ChatRequest = api::parse(&b)?;
        let sampling: Sampling = api::parse(&b)?;
        if req.messages.is_empty() {
            return Err(ApiError::bad_param("messages", "messages must not be empty"));
        }
        let mut msgs = Vec::with_capacity(req.messages.len());
        for (i, m) in req.messages.iter().enumerate() {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => return Err(ApiError::bad_param(&format!("messages[{i}].role"), format!("unknown role {other:?} (system, developer, user, assistant)"))),
            };
            msgs.push(Message::new(role, &message_text(&m.content, i)?));
        }
        let ext = req.kvcompact.as_ref();
        let chat = st.tok.has_chat_template();
        let (prompt, start) = match ext.and_then(|e| e.document.as_deref()) {
            Some(id) => {
                let doc = st.store.get(id).map_err(|e| ApiError::internal(e.to_string()))?.ok_or_else(|| ApiError::not_found("document", id))?;
                let ids = continuation_tokens(&st.tok, doc.chat, &msgs).map_err(|e| ApiError::bad_param("messages", e.to_string()))?;
                (ids, Some((doc.cache, doc.context)))
            }
            None => {
                let text = if chat { st.tok.render_chat(&msgs, true) } else { Ok(msgs.iter().map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")) };
                let text = text.map_err(|e| ApiError::bad_param("messages", e.to_string()))?;
                (st.tok.encode(&text, !chat).map_err(|e| ApiError::bad_param("messages", e.to_string()))?, None)
            }
        };
        plan(&st, req.model.as_deref(), &sampling, prompt, start, chat, ext)
    }
    .await;
    match r {
        Ok(p) => respond(st, p, true).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(st): State<AppState>, b: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let b = body(b)?;
        let req: CompletionRequest = api::parse(&b)?;
        let sampling: Sampling = api::parse(&b)?;
        let text = match &req.prompt {
            Prompt::One(t) => t.clone(),
            Prompt::Many(v) if v.len() == 1 => v[0].clone(),
            Prompt::Many(_) => return Err(ApiError::bad_param("prompt", "exactly one prompt is supported")),
        };
        if text.is_empty() {
            return Err(ApiError::bad_param("prompt", "the prompt is empty"));
        }
        if req.kvcompact.as_ref().is_some_and(|e| e.document.is_some()) {
            return Err(ApiError::bad_param("kvcompact.document", "documents start chats: use /v1/chat/completions"));
        }
        let ids = st.tok.encode(&text, true).map_err(|e| ApiError::bad_param("prompt", e.to_string()))?;
        let mut p = plan(&st, req.model.as_deref(), &sampling, ids, None, false, req.kvcompact.as_ref())?;
        p.job.fail = st.fail_point.as_ref().filter(|f| text.contains(&f.marker)).map(|f| f.stage);
        Ok(p)
    }
    .await;
    match r {
        Ok(p) => respond(st, p, false).await,
        Err(e) => e.into_response(),
    }
}

/// Text of a generation as it grows: detokenized incrementally, end-of-sequence ids left out,
/// cut before the first stop string; the tail that could still become a stop string is held
/// back until it cannot.
struct TextOut {
    stream: TextStream,
    text: String,
    sent: usize,
    stops: Vec<String>,
    hold: usize,
    stopped: bool,
}

impl TextOut {
    fn new(stops: Vec<String>) -> TextOut {
        let hold = stops.iter().map(|s| s.len()).max().unwrap_or(1).saturating_sub(1);
        TextOut { stream: TextStream::new(), text: String::new(), sent: 0, stops, hold, stopped: false }
    }

    /// Add a token; the new text that may be sent now.
    fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        if self.stopped || tok.eos_ids.contains(&id) {
            return String::new();
        }
        self.text.push_str(&self.stream.push(tok, id).unwrap_or_default());
        // A stop cannot start in text already sent (the last `hold` bytes are always held back),
        // so only the unsent tail is searched: linear in the generation, not quadratic.
        let tail = &self.text[self.sent..];
        if let Some(at) = self.stops.iter().filter_map(|s| tail.find(s.as_str())).min().map(|i| self.sent + i) {
            self.text.truncate(at);
            self.stopped = true;
            return self.flush();
        }
        let mut end = self.text.len().saturating_sub(self.hold).max(self.sent);
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }

    /// Everything not sent yet.
    fn flush(&mut self) -> String {
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }
}

fn finish_reason(stop: &str) -> &'static str {
    match stop {
        "max_tokens" | "context_full" => "length",
        _ => "stop",
    }
}

/// Submit the plan and answer: one JSON object, or a stream of chunks ending in `[DONE]`.
async fn respond(st: AppState, p: Plan, chat: bool) -> Response {
    let Plan { job, mut rx, stops, stream, include_usage } = p;
    let prompt_tokens = job.prompt.len();
    if st.jobs.send(Job::Generate(Box::new(job))).is_err() {
        return ApiError::unavailable("the engine has stopped").into_response();
    }
    // The first event decides the status: an admission error answers with its own status.
    let first = match rx.recv().await {
        Some(Event::Error(e)) => return e.into_response(),
        Some(e) => e,
        None => return ApiError::internal("the engine dropped the request").into_response(),
    };
    let id = format!("{}-{:016x}", if chat { "chatcmpl" } else { "cmpl" }, rand_id());
    let created = api::now_secs();
    let model = st.model_name.clone();
    let mut out = TextOut::new(stops);
    if !stream {
        let mut ev = Some(first);
        let mut completion_tokens = 0;
        let reason;
        loop {
            let e = match ev.take() {
                Some(e) => e,
                None => match rx.recv().await {
                    Some(e) => e,
                    None => return ApiError::internal("the engine dropped the request").into_response(),
                },
            };
            match e {
                Event::Token(t) => {
                    completion_tokens += 1;
                    out.push(&st.tok, t);
                    if out.stopped {
                        reason = "stop";
                        break;
                    }
                }
                Event::Done { stop, completion_tokens: n, .. } => {
                    completion_tokens = n;
                    reason = finish_reason(stop);
                    break;
                }
                Event::Error(e) => return e.into_response(),
            }
        }
        drop(rx); // cancels the sequence if a stop string ended it early
        let text = out.text;
        let usage = Usage { prompt_tokens, completion_tokens, total_tokens: prompt_tokens + completion_tokens };
        let choice = if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": null})
        } else {
            json!({"index": 0, "text": text, "finish_reason": reason, "logprobs": null})
        };
        let object = if chat { "chat.completion" } else { "text_completion" };
        return Json(json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice], "usage": usage})).into_response();
    }
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let (usage_id, usage_model) = (id.clone(), model.clone());
    let chunk = move |content: Option<String>, reason: Option<&str>, role: bool| -> Value {
        let choice = if chat {
            let mut delta = serde_json::Map::new();
            if role {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(c) = content {
                delta.insert("content".into(), json!(c));
            }
            json!({"index": 0, "delta": delta, "finish_reason": reason, "logprobs": null})
        } else {
            json!({"index": 0, "text": content.unwrap_or_default(), "finish_reason": reason, "logprobs": null})
        };
        json!({"id": id, "object": object, "created": created, "model": model, "choices": [choice]})
    };
    struct S {
        rx: UnboundedReceiver<Event>,
        pending: Option<Event>,
        out: TextOut,
        tok: Arc<Tokenizer>,
        queue: std::collections::VecDeque<String>,
        done: bool,
        completion_tokens: usize,
    }
    let mut queue = std::collections::VecDeque::new();
    if chat {
        queue.push_back(chunk(Some(String::new()), None, true).to_string());
    }
    let state = S { rx, pending: Some(first), out, tok: st.tok.clone(), queue, done: false, completion_tokens: 0 };
    let events = stream::unfold((state, chunk), move |(mut s, chunk)| {
        let (usage_id, usage_model) = (usage_id.clone(), usage_model.clone());
        async move {
        loop {
            if let Some(data) = s.queue.pop_front() {
                return Some((Ok::<_, Infallible>(SseEvent::default().data(data)), (s, chunk)));
            }
            if s.done {
                return None;
            }
            let ev = match s.pending.take() {
                Some(e) => Some(e),
                None => s.rx.recv().await,
            };
            let finish = |s: &mut S, reason: &str| {
                let rest = s.out.flush();
                if !rest.is_empty() {
                    s.queue.push_back(chunk(Some(rest), None, false).to_string());
                }
                s.queue.push_back(chunk(None, Some(reason), false).to_string());
                if include_usage {
                    let u = Usage { prompt_tokens, completion_tokens: s.completion_tokens, total_tokens: prompt_tokens + s.completion_tokens };
                    s.queue.push_back(json!({"id": usage_id, "object": object, "created": created, "model": usage_model, "choices": [], "usage": u}).to_string());
                }
                s.queue.push_back("[DONE]".to_string());
                s.done = true;
            };
            match ev {
                Some(Event::Token(t)) => {
                    s.completion_tokens += 1;
                    let piece = s.out.push(&s.tok, t);
                    if !piece.is_empty() {
                        s.queue.push_back(chunk(Some(piece), None, false).to_string());
                    }
                    if s.out.stopped {
                        s.rx.close(); // the engine drops the sequence at its next step
                        finish(&mut s, "stop");
                    }
                }
                Some(Event::Done { stop, completion_tokens, .. }) => {
                    s.completion_tokens = completion_tokens;
                    finish(&mut s, finish_reason(stop));
                }
                Some(Event::Error(e)) => {
                    s.queue.push_back(e.body().to_string());
                    s.queue.push_back("[DONE]".to_string());
                    s.done = true;
                }
                None => {
                    s.queue.push_back(ApiError::internal("the engine dropped the request").body().to_string());
                    s.queue.push_back("[DONE]".to_string());
                    s.done = true;
                }
            }
        }
        }
    });
    Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

fn rand_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    (api::now_secs() << 20) ^ n
}

async fn create_document(State(st): State<AppState>, b: Result<Bytes, BytesRejection>) -> Response {
    let r = async {
        let req: DocumentRequest = api::parse(&body(b)?)?;
        if req.text.trim().is_empty() {
            return Err(ApiError::bad_param("text", "the document text is empty"));
        }
        let method = req.method.clone().unwrap_or_else(|| st.policy.clone());
        crate::compact::registry::require_am(&method, "serve").map_err(|e| ApiError::bad_param("method", e.to_string()))?;
        let ratio = req.ratio.unwrap_or(10.0);
        if !(ratio >= 1.0 && ratio.is_finite()) {
            return Err(ApiError::bad_param("ratio", "ratio must be a number ≥ 1"));
        }
        let queries = QuerySource::parse(req.queries.as_deref().unwrap_or("repeat")).map_err(|e| ApiError::bad_param("queries", e.to_string()))?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        st.jobs.send(Job::Document(Box::new(DocJob { text: req.text, method, ratio, queries, reply: tx }))).map_err(|_| ApiError::unavailable("the engine has stopped"))?;
        rx.await.map_err(|_| ApiError::internal("the engine dropped the document"))?
    }
    .await;
    match r {
        Ok(info) => Json(info).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn list_documents(State(st): State<AppState>) -> Json<Value> {
    Json(json!({"object": "list", "data": st.store.list()}))
}

async fn get_document(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    match st.store.info(&id) {
        Some(i) => Json(i).into_response(),
        None => ApiError::not_found("document", &id).into_response(),
    }
}

async fn delete_document(State(st): State<AppState>, Path(id): Path<String>) -> Response {
    match st.store.delete(&id) {
        Ok(true) => Json(json!({"id": id, "object": "document.deleted", "deleted": true})).into_response(),
        Ok(false) => ApiError::not_found("document", &id).into_response(),
        Err(e) => ApiError::internal(e.to_string()).into_response(),
    }
}
