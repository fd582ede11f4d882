//! The OpenAI wire format the server speaks: request bodies, responses, stream chunks, errors.
//!
//! Requests are parsed from raw bytes here (not by an extractor) so that every malformed body
//! gets OpenAI's error shape with status 400 and a message naming the field.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

/// An error as OpenAI returns it: `{"error": {"message", "type", "param", "code"}}` with a status.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// One line for the client.
    pub message: String,
    /// OpenAI's error type (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// The offending request field, when there is one.
    pub param: Option<String>,
    /// A short machine-readable code.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), kind: "invalid_request_error", param: None, code: None }
    }
    /// 400 naming the field that is wrong.
    pub fn bad_param(param: &str, message: impl Into<String>) -> ApiError {
        ApiError { param: Some(param.to_string()), ..ApiError::bad_request(message) }
    }
    /// 401 `authentication_error`.
    pub fn unauthorized() -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: "Incorrect or missing API key: send `Authorization: Bearer <key>`".into(),
            kind: "authentication_error",
            param: None,
            code: Some("invalid_api_key"),
        }
    }
    /// 404 for a model or document that does not exist.
    pub fn not_found(kind_of: &str, name: &str) -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("The {kind_of} `{name}` does not exist"),
            kind: "invalid_request_error",
            param: Some(kind_of.to_string()),
            code: Some(if kind_of == "model" { "model_not_found" } else { "not_found" }),
        }
    }
    /// 429: the KV budget cannot hold the request even after compaction.
    pub fn out_of_memory(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::TOO_MANY_REQUESTS, message: message.into(), kind: "rate_limit_error", param: None, code: Some("kv_memory_exhausted") }
    }
    /// 503 while the server drains for shutdown.
    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: message.into(), kind: "server_error", param: None, code: Some("shutting_down") }
    }
    /// 500 for an internal fault (the server goes on).
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: message.into(), kind: "server_error", param: None, code: Some("internal_error") }
    }
    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, axum::Json(self.body())).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            resp.headers_mut().insert("retry-after", axum::http::HeaderValue::from_static("1"));
        }
        resp
    }
}

/// `"stop"`: one string or a list of up to four.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings as a list (empty strings dropped).
    pub fn list(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }
}

/// A message's content: a string, or a list of parts of which the text parts are used.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// Content parts (`{"type": "text", "text": ...}`); other part types are refused.
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Clone, Deserialize)]
pub struct ContentPart {
    /// The part's type; only `text` is supported.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a `text` part.
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer` (treated as system), `user` or `assistant`.
    pub role: String,
    /// The message text.
    pub content: Option<Content>,
}

/// kvcompact's extension object, `"kvcompact": {...}` in a request.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Extension {
    /// Start from this document's compacted cache (`POST /v1/documents`).
    pub document: Option<String>,
    /// How this sequence is compacted under memory pressure.
    pub compaction: Option<CompactionOverride>,
}

/// Per-request compaction method and ratio.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompactionOverride {
    /// A registry name of the Attention Matching family.
    pub method: Option<String>,
    /// Rows kept ≈ rows / ratio (> 1).
    pub ratio: Option<f64>,
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and length fields shared by chat and text completions, parsed from the same body
/// as the request (not flattened into it, so that a type error names its field).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Sampling {
    /// 0 is greedy (default 1, as OpenAI).
    pub temperature: Option<f32>,
    /// Nucleus mass in (0, 1] (default 1).
    pub top_p: Option<f32>,
    /// Generated tokens at most.
    pub max_tokens: Option<usize>,
    /// Newer name of `max_tokens` (chat).
    pub max_completion_tokens: Option<usize>,
    /// Sampling seed (default 0): the same request and seed give the same tokens.
    pub seed: Option<u64>,
    /// Stop strings: generation ends before the first one, which is not returned.
    pub stop: Option<Stop>,
    /// Stream the answer as server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Options of the stream.
    pub stream_options: Option<StreamOptions>,
    /// Number of choices; only 1 is supported.
    pub n: Option<usize>,
    /// Keep generating past end-of-sequence tokens (fixed-length runs, as vLLM and llama.cpp's
    /// server accept it).
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// Model name (`GET /v1/models`); optional.
    pub model: Option<String>,
    /// The conversation, rendered with the model's chat template.
    pub messages: Vec<ChatMessage>,
    /// kvcompact's extension.
    pub kvcompact: Option<Extension>,
}

/// `prompt` of a text completion: a string or a list holding one string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One prompt.
    One(String),
    /// A list of prompts; only one is supported.
    Many(Vec<String>),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    /// Model name; optional.
    pub model: Option<String>,
    /// Raw text (no chat template; the tokenizer's BOS is added).
    pub prompt: Prompt,
    /// kvcompact's extension (compaction override only: a document starts a chat).
    pub kvcompact: Option<Extension>,
}

/// `POST /v1/documents`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentRequest {
    /// The document text, prefilled as a user turn and compacted once.
    pub text: String,
    /// Attention Matching method (default: the server's `--policy`).
    pub method: Option<String>,
    /// Compaction ratio (default 10).
    pub ratio: Option<f64>,
    /// Reference query source (`repeat`, `self-study`, `context`, `random`, `mix`).
    pub queries: Option<String>,
}

/// Token counts of a completion.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    /// Prompt tokens prefilled for this request (a document's tokens not included).
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
}

/// Parse a JSON body into `T`, with OpenAI-shaped 400s for syntax and type errors.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad_request("The request body is empty: send a JSON object"));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = format!("Invalid request body: {inner}");
        if path.is_empty() || path == "." {
            ApiError::bad_request(msg)
        } else {
            ApiError::bad_param(&path, format!("{msg} (at `{path}`)"))
        }
    })
}

/// Seconds since the Unix epoch (the `created` field).
pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
