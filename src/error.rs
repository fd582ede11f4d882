//! The library's one error type. Every variant says what failed and where (tensor, file, op),
//! so the CLI can print it as a single line.

use std::path::PathBuf;

use crate::gguf::GgufError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: invalid config: {msg}")]
    Config { path: PathBuf, msg: String },
    #[error("{path}: unsupported architecture {arch:?} (supported: llama, mistral, qwen2, qwen3)")]
    UnknownArchitecture { path: PathBuf, arch: String },
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("tensor {name} not found in {dir}")]
    MissingTensor { name: String, dir: PathBuf },
    #[error("tensor {name} in {file}: expected shape {expected:?}, found {got:?}")]
    ShapeMismatch {
        name: String,
        file: PathBuf,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    #[error("tensor {name} in {file}: unsupported dtype {dtype} (expected F32, BF16 or F16)")]
    UnsupportedDtype {
        name: String,
        file: PathBuf,
        dtype: String,
    },
    #[error("tensor {name} in {file}: {msg}")]
    BadTensor {
        name: String,
        file: PathBuf,
        msg: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("prompt: {0}")]
    Prompt(String),
    #[error("{op}: expected {expected}, got {got}")]
    Shape {
        op: &'static str,
        expected: String,
        got: String,
    },
    #[error("{0}")]
    Gguf(#[from] GgufError),
    #[error("fetch: {0}")]
    Fetch(String),
    #[error("{what}: sha256 mismatch: expected {expected}, got {got}")]
    Checksum {
        what: String,
        expected: String,
        got: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
