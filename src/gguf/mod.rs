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

/// Every failure of GGUF reading and conversion. `path` is always the file (or output directory)
/// involved; file-controlled names and keys are shown escaped and truncated to one line.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// Opening or mapping the GGUF, or creating / writing / renaming an output, failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory the operation was on.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// A fixed-size field runs past the end of the file.
    #[error("{path}: truncated GGUF file: {} at byte {offset} needs {need} bytes, only {remaining} remain", shown(what))]
    Truncated {
        /// The GGUF file.
        path: PathBuf,
        /// The field being read, e.g. `tensor dim` or `u32 value of "key"`.
        what: String,
        /// Byte offset where the field starts.
        offset: u64,
        /// Bytes the field needs.
        need: u64,
        /// Bytes left in the file from `offset`.
        remaining: u64,
    },
    #[error("{path}: not a GGUF file (first bytes {found:02x?}, expected \"GGUF\")")]
    /// The first four bytes are not `GGUF`.
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Its first four bytes.
        found: Vec<u8>,
    },
    #[error("{path}: unsupported GGUF version {version} (supported: 2 and 3)")]
    /// The header's version is neither 2 nor 3.
    UnsupportedVersion {
        /// The GGUF file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    #[error("{path}: tensor {}: unsupported ggml type {type_id} (supported: F32, F16, BF16, Q4_0, Q4_1, Q8_0)", shown(tensor))]
    /// A tensor's ggml type is not one of [`GgmlType`].
    UnsupportedGgufType {
        /// The GGUF file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// The ggml `enum ggml_type` id found.
        type_id: u32,
    },
    #[error("{path}: metadata key {}: unknown value type {type_id}", shown(key))]
    /// A metadata value or array element has a GGUF value type id outside 0..=12.
    BadValueType {
        /// The GGUF file.
        path: PathBuf,
        /// The metadata key whose value it is.
        key: String,
        /// The value type id found.
        type_id: u32,
    },
    #[error("{path}: {} at byte {offset} is not valid UTF-8", shown(what))]
    /// A string (key, tensor name or string value) is not valid UTF-8.
    NotUtf8 {
        /// The GGUF file.
        path: PathBuf,
        /// The string being read, e.g. `metadata key` or `string value of "key"`.
        what: String,
        /// Byte offset of the string's bytes (just after its u64 length).
        offset: u64,
    },
    /// A length or count larger than the rest of the file could hold (lying or truncated file);
    /// checked before anything is allocated from it.
    #[error("{path}: {} at byte {offset} claims {count} items needing at least {need} bytes, only {remaining} remain", shown(what))]
    AbsurdCount {
        /// The GGUF file.
        path: PathBuf,
        /// What is counted: a string length, an array, the metadata or tensor count.
        what: String,
        /// Byte offset of the count itself.
        offset: u64,
        /// The count read.
        count: u64,
        /// Least bytes `count` items take (count × smallest encoding).
        need: u128,
        /// Bytes left in the file after the count.
        remaining: u64,
    },
    #[error("{path}: duplicate metadata key {}", shown(key))]
    /// Two metadata entries have the same key.
    DuplicateKey {
        /// The GGUF file.
        path: PathBuf,
        /// The repeated key.
        key: String,
    },
    #[error("{path}: duplicate tensor name {}", shown(name))]
    /// Two tensor-info records have the same name.
    DuplicateTensor {
        /// The GGUF file.
        path: PathBuf,
        /// The repeated tensor name.
        name: String,
    },
    /// Bad dims, name or offset in one tensor-info record.
    #[error("{path}: tensor {}: {}", shown(tensor), oneline(msg))]
    BadTensorInfo {
        /// The GGUF file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// What is wrong with the record.
        msg: String,
    },
    #[error(
        "{path}: tensor {}: data bytes {start}..{end} lie outside the file ({file_len} bytes)",
        shown(tensor)
    )]
    /// A tensor's data (or its byte size alone) does not fit in the file.
    TensorOutOfRange {
        /// The GGUF file.
        path: PathBuf,
        /// The tensor name.
        tensor: String,
        /// First byte of the data: absolute, except when the byte size alone exceeds the file
        /// (then relative to the data section, which is not placed yet).
        start: u128,
        /// One past the last byte, on the same basis as `start`.
        end: u128,
        /// File size in bytes.
        file_len: u64,
    },
    #[error(
        "{path}: tensors {} and {} overlap in the data section",
        shown(first),
        shown(second)
    )]
    /// Two tensors' data ranges overlap.
    TensorOverlap {
        /// The GGUF file.
        path: PathBuf,
        /// The tensor with the lower offset.
        first: String,
        /// The tensor that starts inside `first`'s range.
        second: String,
    },
    /// A metadata key that is missing, of the wrong type or out of range.
    #[error("{path}: metadata {}: {}", shown(key), oneline(msg))]
    BadMetadata {
        /// The GGUF file.
        path: PathBuf,
        /// The metadata key.
        key: String,
        /// What is wrong, e.g. `missing` or `expected a string, found u32`.
        msg: String,
    },
    #[error(
        "{path}: unsupported GGUF architecture {} (supported: llama)",
        shown(arch)
    )]
    /// `general.architecture` is not `llama`, the only one the converter handles.
    UnsupportedArchitecture {
        /// The GGUF file.
        path: PathBuf,
        /// The architecture found.
        arch: String,
    },
    /// The file parses but does not describe a model we can convert (missing/extra/misshaped tensor).
    #[error("{path}: cannot convert: {}", oneline(msg))]
    Convert {
        /// The GGUF file.
        path: PathBuf,
        /// What is missing or wrong.
        msg: String,
    },
    #[error("{path}: cannot build tokenizer: {}", oneline(msg))]
    /// The tokenizer metadata cannot be built into a byte-level BPE tokenizer (unsupported
    /// `tokenizer.ggml.model` or `pre`, missing tokens or merges, malformed merge, serialisation).
    Tokenizer {
        /// The GGUF file.
        path: PathBuf,
        /// What failed.
        msg: String,
    },
    #[error("{path}: cannot write: {}", oneline(msg))]
    /// The safetensors writer failed to write `model.safetensors`.
    Write {
        /// The output file.
        path: PathBuf,
        /// The writer's message.
        msg: String,
    },
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
