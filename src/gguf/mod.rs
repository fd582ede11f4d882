//! GGUF import: a validating, memory-mapped GGUF v2/v3 reader ([`GgufFile`]), dequantisation
//! bit-identical to gguf-py's numpy code ([`dequant`]), and the GGUF → HF-directory converter
//! ([`convert_gguf`]) that writes `model.safetensors`, `config.json` and the tokenizer files.
//!
//! Every failure is a [`GgufError`] whose one-line `Display` names the file, and the tensor or
//! metadata key when one is involved. No input, however malformed, makes the reader panic.

use std::path::PathBuf;

pub mod convert;
pub mod dequant;
pub mod reader;
pub mod tokenizer_json;

pub use convert::{
    convert_gguf, converted_files, generation_config_json, hf_config_json, hf_tensor_plan,
    hf_tensor_values, tokenizer_config_json, ConvertSummary, HfTensor, OutDtype,
};
pub use dequant::GgmlType;
pub use reader::{GgufFile, TensorInfo, Value};
pub use tokenizer_json::{tokenizer_from_gguf, tokenizer_json_from_gguf};

#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A fixed-size field runs past the end of the file.
    #[error("{path}: truncated GGUF file: {} at byte {offset} needs {need} bytes, only {remaining} remain", shown(what))]
    Truncated {
        path: PathBuf,
        what: String,
        offset: u64,
        need: u64,
        remaining: u64,
    },
    #[error("{path}: not a GGUF file (first bytes {found:02x?}, expected \"GGUF\")")]
    BadMagic { path: PathBuf, found: Vec<u8> },
    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3)")]
    UnsupportedVersion { path: PathBuf, version: u32 },
    #[error("{path}: tensor {}: unsupported ggml type {type_id} (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)", shown(tensor))]
    UnsupportedGgufType {
        path: PathBuf,
        tensor: String,
        type_id: u32,
    },
    #[error("{path}: metadata key {}: unknown value type {type_id}", shown(key))]
    BadValueType {
        path: PathBuf,
        key: String,
        type_id: u32,
    },
    #[error("{path}: {} at byte {offset} is not valid UTF-8", shown(what))]
    NotUtf8 {
        path: PathBuf,
        what: String,
        offset: u64,
    },
    /// A length or count larger than the rest of the file could hold (lying or truncated file);
    /// checked before anything is allocated from it.
    #[error("{path}: {} at byte {offset} claims {count} items needing at least {need} bytes, only {remaining} remain", shown(what))]
    AbsurdCount {
        path: PathBuf,
        what: String,
        offset: u64,
        count: u64,
        need: u128,
        remaining: u64,
    },
    #[error("{path}: duplicate metadata key {}", shown(key))]
    DuplicateKey { path: PathBuf, key: String },
    #[error("{path}: duplicate tensor name {}", shown(name))]
    DuplicateTensor { path: PathBuf, name: String },
    /// Bad dims, name or offset in one tensor-info record.
    #[error("{path}: tensor {}: {}", shown(tensor), oneline(msg))]
    BadTensorInfo {
        path: PathBuf,
        tensor: String,
        msg: String,
    },
    #[error(
        "{path}: tensor {}: data bytes {start}..{end} lie outside the file ({file_len} bytes)",
        shown(tensor)
    )]
    TensorOutOfRange {
        path: PathBuf,
        tensor: String,
        start: u128,
        end: u128,
        file_len: u64,
    },
    #[error(
        "{path}: tensors {} and {} overlap in the data section",
        shown(first),
        shown(second)
    )]
    TensorOverlap {
        path: PathBuf,
        first: String,
        second: String,
    },
    /// A metadata key that is missing, of the wrong type or out of range.
    #[error("{path}: metadata {}: {}", shown(key), oneline(msg))]
    BadMetadata {
        path: PathBuf,
        key: String,
        msg: String,
    },
    #[error(
        "{path}: unsupported GGUF architecture {} (supported: llama)",
        shown(arch)
    )]
    UnsupportedArchitecture { path: PathBuf, arch: String },
    /// The file parses but does not describe a model we can convert (missing/extra/misshaped tensor).
    #[error("{path}: cannot convert: {}", oneline(msg))]
    Convert { path: PathBuf, msg: String },
    #[error("{path}: cannot build tokenizer: {}", oneline(msg))]
    Tokenizer { path: PathBuf, msg: String },
    #[error("{path}: cannot write: {}", oneline(msg))]
    Write { path: PathBuf, msg: String },
}

/// File-controlled text (names, keys) as it appears in an error: control characters escaped so
/// the message stays on one line, and at most 96 characters (a "name" may be megabytes long).
fn shown(s: &str) -> String {
    const MAX: usize = 96;
    let mut out = oneline(&s.chars().take(MAX).collect::<String>());
    if s.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

/// `s` with control characters escaped (`\n`, `\u{1}`), so an error is always one line.
fn oneline(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            let esc: Vec<char> = if c.is_control() {
                c.escape_default().collect()
            } else {
                vec![c]
            };
            esc
        })
        .collect()
}
