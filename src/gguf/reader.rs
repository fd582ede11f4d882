//! GGUF v2/v3 parser (spec: ggml-org/ggml `docs/gguf.md`).
//!
//! The whole header is parsed and validated up front, so a [`GgufFile`] that exists is
//! trustworthy: every tensor has a supported type, a shape whose byte size fits in `usize`, and a
//! byte range inside the file that overlaps no other. Tensor accessors therefore cannot fail.
//! Counts read from the file are checked against the bytes that remain before anything is
//! allocated from them, so a lying header cannot make us allocate more than the file size.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use super::dequant::{dequantize_rows, GgmlType};
use super::GgufError;

const MAGIC: &[u8; 4] = b"GGUF";
/// Default data-section alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// ggml's GGML_MAX_DIMS.
pub const MAX_DIMS: usize = 4;
/// ggml's GGML_MAX_NAME (bytes, without the terminating NUL ggml stores).
pub const MAX_TENSOR_NAME: usize = 64;
/// Deeper nesting than this is certainly hostile; bounding it keeps the recursive parser's stack small.
const MAX_ARRAY_DEPTH: usize = 8;


/// A metadata value. Integers keep their stored width; read them through [`Value::as_u64`] /
/// [`Value::as_i64`], because real files store counts as u32 where the spec says u64.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Type id 0.
    U8(u8),
    /// Type id 1.
    I8(i8),
    /// Type id 2.
    U16(u16),
    /// Type id 3.
    I16(i16),
    /// Type id 4.
    U32(u32),
    /// Type id 5.
    I32(i32),
    /// Type id 6.
    F32(f32),
    /// Type id 7: any non-zero byte is `true`.
    Bool(bool),
    /// Type id 8: u64 byte length, then UTF-8 (checked).
    String(String),
    /// Element type id and the elements (all of that type; arrays may nest).
    Array(u32, Vec<Value>),
    /// Type id 10.
    U64(u64),
    /// Type id 11.
    I64(i64),
    /// Type id 12.
    F64(f64),
}

impl Value {
    /// Any integer type, if non-negative.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(x) => Some(x as u64),
            Value::U16(x) => Some(x as u64),
            Value::U32(x) => Some(x as u64),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        }
    }
    /// Any integer type that fits in i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Value::U64(x) => i64::try_from(x).ok(),
            Value::I8(x) => Some(x as i64),
            Value::I16(x) => Some(x as i64),
            Value::I32(x) => Some(x as i64),
            Value::I64(x) => Some(x),
            _ => self.as_u64().map(|x| x as i64),
        }
    }
    /// Either float type.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(x) => Some(x as f64),
            Value::F64(x) => Some(x),
            _ => None,
        }
    }
    /// Either float type, f64 rounded to f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Value::F32(x) => Some(x),
            Value::F64(x) => Some(x as f32),
            _ => None,
        }
    }
    /// A [`Value::Bool`].
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }
    /// A [`Value::String`].
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
    /// The elements of a [`Value::Array`].
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(_, v) => Some(v),
            _ => None,
        }
    }
    /// A short type name for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::F32(_) => "f32",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(..) => "array",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F64(_) => "f64",
        }
    }
}

/// One tensor-info record, validated.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// GGUF tensor name, e.g. `blk.0.attn_q.weight` (at most [`MAX_TENSOR_NAME`] bytes).
    pub name: String,
    /// GGUF order: `dims[0]` is the fastest-varying axis (columns, HF in_features).
    pub dims: Vec<u64>,
    /// Storage type of the data.
    pub ggml_type: GgmlType,
    /// Relative to the data section; a multiple of the alignment.
    pub offset: u64,
    /// Bytes the tensor occupies in the file.
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Product of the dims (1 for a 0-dim tensor).
    pub fn n_elements(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product()
    }
    /// Elements per row (`dims[0]`; 1 for a 0-dim tensor).
    pub fn n_cols(&self) -> usize {
        self.dims.first().map_or(1, |&d| d as usize)
    }
    /// Number of rows: the product of `dims[1..]` (1 for a 0- or 1-dim tensor).
    pub fn n_rows(&self) -> usize {
        self.dims.iter().skip(1).map(|&d| d as usize).product()
    }
    /// Row-major (HF / numpy) shape: the GGUF dims reversed.
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }
}

enum Bytes {
    Mmap(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mmap(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

/// A parsed and validated GGUF file; tensor data stays in the memory map until asked for.
pub struct GgufFile {
    path: PathBuf,
    bytes: Bytes,
    version: u32,
    metadata: Vec<(String, Value)>,
    meta_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata_keys", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .finish()
    }
}

impl GgufFile {
    /// Memory-map and validate `path`. The map is read-only; like every mmap reader we assume the
    /// file is not modified while open (the converter never truncates files in place for this reason).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, GgufError> {
        let path = path.as_ref();
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let bytes = if len == 0 {
            // mmap of an empty file is an error on some platforms; parse the empty buffer instead.
            Bytes::Owned(Vec::new())
        } else {
            // SAFETY: read-only map; see the doc comment about concurrent modification.
            Bytes::Mmap(unsafe { memmap2::Mmap::map(&file) }.map_err(io)?)
        };
        Self::parse(path.to_path_buf(), bytes)
    }

    /// Parse an in-memory GGUF image; `path` is used only in error messages.
    pub fn from_bytes(bytes: Vec<u8>, path: impl Into<PathBuf>) -> Result<GgufFile, GgufError> {
        Self::parse(path.into(), Bytes::Owned(bytes))
    }

    /// The path given to [`GgufFile::open`] or [`GgufFile::from_bytes`].
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// GGUF version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }
    /// Data-section alignment in bytes: `general.alignment`, else [`DEFAULT_ALIGNMENT`].
    pub fn alignment(&self) -> u64 {
        self.alignment
    }
    /// Absolute file offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }
    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }
    /// The metadata value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.meta_index.get(key).map(|&i| &self.metadata[i].1)
    }
    /// Tensor-info records in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }
    /// The tensor-info record named `name`, if present.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }
    /// The tensor's raw bytes (validated at open to lie inside the file).
    pub fn tensor_data(&self, t: &TensorInfo) -> &[u8] {
        let start = (self.data_offset + t.offset) as usize;
        self.bytes
            .as_slice()
            .get(start..start + t.n_bytes)
            .unwrap_or(&[])
    }

    /// The tensor dequantised to f32, row-major in file order (no Q/K un-permutation; see
    /// [`super::hf_tensor_values`] for HF layout).
    pub fn tensor_f32(&self, t: &TensorInfo) -> Vec<f32> {
        let mut out = vec![0f32; t.n_elements()];
        dequantize_rows(t.ggml_type, self.tensor_data(t), t.n_cols(), &mut out);
        out
    }

    fn meta_err(&self, key: &str, msg: impl Into<String>) -> GgufError {
        GgufError::BadMetadata {
            path: self.path.clone(),
            key: key.to_string(),
            msg: msg.into(),
        }
    }

    /// Any-integer accessor; `Ok(None)` when absent, an error when present with another type.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                self.meta_err(
                    key,
                    format!("expected a non-negative integer, found {}", v.type_name()),
                )
            }),
        }
    }
    /// As [`GgufFile::get_u64`], with a missing key an error too.
    pub fn require_u64(&self, key: &str) -> Result<u64, GgufError> {
        self.get_u64(key)?
            .ok_or_else(|| self.meta_err(key, "missing"))
    }
    /// Float accessor (f32 or f64).
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_f32().map(Some).ok_or_else(|| {
                self.meta_err(key, format!("expected a float, found {}", v.type_name()))
            }),
        }
    }
    /// String accessor; `Ok(None)` when absent, an error when present with another type.
    pub fn get_str(&self, key: &str) -> Result<Option<&str>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| {
                self.meta_err(key, format!("expected a string, found {}", v.type_name()))
            }),
        }
    }
    /// As [`GgufFile::get_str`], with a missing key an error too.
    pub fn require_str(&self, key: &str) -> Result<&str, GgufError> {
        self.get_str(key)?
            .ok_or_else(|| self.meta_err(key, "missing"))
    }
    /// Bool accessor; `Ok(None)` when absent, an error when present with another type.
    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| {
                self.meta_err(key, format!("expected a bool, found {}", v.type_name()))
            }),
        }
    }
    /// An array whose elements are all strings.
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(_, items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| self.meta_err(key, "expected an array of strings"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => {
                Err(self.meta_err(key, format!("expected an array, found {}", v.type_name())))
            }
        }
    }
    /// An array whose elements are all integers (any width).
    pub fn get_int_array(&self, key: &str) -> Result<Option<Vec<i64>>, GgufError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(_, items)) => items
                .iter()
                .map(|v| {
                    v.as_i64()
                        .ok_or_else(|| self.meta_err(key, "expected an array of integers"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => {
                Err(self.meta_err(key, format!("expected an array, found {}", v.type_name())))
            }
        }
    }
    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str, GgufError> {
        self.require_str("general.architecture")
    }

    fn parse(path: PathBuf, bytes: Bytes) -> Result<GgufFile, GgufError> {
        let buf = bytes.as_slice();
        let file_len = buf.len() as u64;
        let mut c = Cursor {
            buf,
            pos: 0,
            path: &path,
        };

        let magic = c.take(4, "magic")?;
        if magic != MAGIC {
            return Err(GgufError::BadMagic {
                path: path.clone(),
                found: magic.to_vec(),
            });
        }
        let version = c.u32("version")?;
        if version != 2 && version != 3 {
            return Err(GgufError::UnsupportedVersion {
                path: path.clone(),
                version,
            });
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        // Smallest possible records: kv = key len (8) + type (4) + a u8 value (1);
        // tensor info = name len (8) + n_dims (4) + type (4) + offset (8).
        // The cursor is at byte 24: the metadata count sits 8 bytes back, the tensor count 16.
        c.check_count(n_kv, 13, 8, || "metadata count".into())?;
        c.check_count(n_tensors, 24, 16, || "tensor count".into())?;

        let mut metadata = Vec::with_capacity(prealloc(n_kv));
        let mut meta_index = HashMap::with_capacity(prealloc(n_kv));
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let type_id = c.u32("metadata value type")?;
            let value = c.value(type_id, &key, 0)?;
            if meta_index.insert(key.clone(), metadata.len()).is_some() {
                return Err(GgufError::DuplicateKey {
                    path: path.clone(),
                    key,
                });
            }
            metadata.push((key, value));
        }

        let alignment = match meta_index.get("general.alignment").map(|&i| &metadata[i].1) {
            None => DEFAULT_ALIGNMENT,
            Some(v) => match v.as_u64() {
                Some(a) if a > 0 && a.is_power_of_two() && a <= 1 << 30 => a,
                _ => {
                    return Err(GgufError::BadMetadata {
                        path: path.clone(),
                        key: "general.alignment".into(),
                        msg: format!("must be a power-of-two integer, found {v:?}"),
                    })
                }
            },
        };

        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(prealloc(n_tensors));
        let mut tensor_index = HashMap::with_capacity(prealloc(n_tensors));
        for _ in 0..n_tensors {
            let name_at = c.pos as u64;
            let name = c.string("tensor name")?;
            let bad = |msg: String| GgufError::BadTensorInfo {
                path: path.clone(),
                tensor: name.clone(),
                msg,
            };
            if name.len() > MAX_TENSOR_NAME {
                return Err(bad(format!(
                    "name at byte {name_at} is {} bytes long (max {MAX_TENSOR_NAME})",
                    name.len()
                )));
            }
            let n_dims = c.u32("tensor n_dims")?;
            if n_dims as usize > MAX_DIMS {
                return Err(bad(format!("{n_dims} dimensions (max {MAX_DIMS})")));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dim")?);
            }
            let type_id = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            let ggml_type =
                GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedGgufType {
                    path: path.clone(),
                    tensor: name.clone(),
                    type_id,
                })?;
            // Element count and byte size, overflow-checked (ggml keeps them within i64).
            let mut n_elems: u64 = 1;
            for &d in &dims {
                n_elems = n_elems
                    .checked_mul(d)
                    .filter(|&n| n <= i64::MAX as u64)
                    .ok_or_else(|| bad(format!("dims {dims:?} overflow the element count")))?;
            }
            let n_cols = dims.first().copied().unwrap_or(1);
            let block = ggml_type.block_size() as u64;
            if n_cols % block != 0 {
                return Err(bad(format!(
                    "dims[0] = {n_cols} is not a multiple of the {} block size {block}",
                    ggml_type.name()
                )));
            }
            let n_bytes = (n_elems / block)
                .checked_mul(ggml_type.type_size() as u64)
                .filter(|&b| b <= file_len)
                .ok_or_else(|| GgufError::TensorOutOfRange {
                    path: path.clone(),
                    tensor: name.clone(),
                    start: offset as u128,
                    end: offset as u128 + (n_elems / block) as u128 * ggml_type.type_size() as u128,
                    file_len,
                })?;
            if offset % alignment != 0 {
                return Err(bad(format!(
                    "offset {offset} is not a multiple of the alignment {alignment}"
                )));
            }
            if tensor_index.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::DuplicateTensor {
                    path: path.clone(),
                    name,
                });
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ggml_type,
                offset,
                n_bytes: n_bytes as usize,
            });
        }

        let end_of_infos = c.pos as u64;
        let data_offset = end_of_infos.div_ceil(alignment) * alignment;

        // Every range inside the file (checked in u128: offsets are attacker-controlled u64s).
        for t in &tensors {
            let start = data_offset as u128 + t.offset as u128;
            let end = start + t.n_bytes as u128;
            if end > file_len as u128 {
                return Err(GgufError::TensorOutOfRange {
                    path: path.clone(),
                    tensor: t.name.clone(),
                    start,
                    end,
                    file_len,
                });
            }
        }
        // No two ranges overlap (zero-byte tensors occupy nothing).
        let mut order: Vec<usize> = (0..tensors.len())
            .filter(|&i| tensors[i].n_bytes > 0)
            .collect();
        order.sort_by_key(|&i| tensors[i].offset);
        for w in order.windows(2) {
            let (a, b) = (&tensors[w[0]], &tensors[w[1]]);
            if a.offset + a.n_bytes as u64 > b.offset {
                return Err(GgufError::TensorOverlap {
                    path: path.clone(),
                    first: a.name.clone(),
                    second: b.name.clone(),
                });
            }
        }
        debug_assert_eq!(
            tensors
                .iter()
                .map(|t| &t.name)
                .collect::<HashSet<_>>()
                .len(),
            tensors.len()
        );

        Ok(GgufFile {
            path,
            bytes,
            version,
            metadata,
            meta_index,
            tensors,
            tensor_index,
            alignment,
            data_offset,
        })
    }
}

/// Initial capacity for a collection of `count` file records: a [`Value`] is far larger than its
/// smallest encoding, so trusting even a bounds-checked count could allocate many times the file
/// size; past this cap the vector grows only as records are actually parsed.
fn prealloc(count: u64) -> usize {
    count.min(1 << 16) as usize
}

/// Bounds-checked little-endian reader over the file image.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> u64 {
        (self.buf.len() - self.pos) as u64
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], GgufError> {
        match self.buf.get(self.pos..).and_then(|rest| rest.get(..n)) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: self.pos as u64,
                need: n as u64,
                remaining: self.remaining(),
            }),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], GgufError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8, GgufError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, GgufError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Refuse `count` items of at least `min_size` bytes each if the rest of the file cannot hold
    /// them. `back` is how far before the current position the count itself was stored.
    fn check_count(
        &self,
        count: u64,
        min_size: u64,
        back: usize,
        what: impl FnOnce() -> String,
    ) -> Result<(), GgufError> {
        let need = count as u128 * min_size as u128;
        if need > self.remaining() as u128 {
            return Err(GgufError::AbsurdCount {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos.saturating_sub(back) as u64,
                count,
                need,
                remaining: self.remaining(),
            });
        }
        Ok(())
    }

    fn string(&mut self, what: &str) -> Result<String, GgufError> {
        let len = self.u64(what)?;
        self.check_count(len, 1, 8, || format!("{what} length"))?;
        let at = self.pos as u64;
        let bytes = self.take(len as usize, what)?;
        match std::str::from_utf8(bytes) {
            Ok(s) => Ok(s.to_owned()),
            Err(_) => Err(GgufError::NotUtf8 {
                path: self.path.to_path_buf(),
                what: what.to_string(),
                offset: at,
            }),
        }
    }

    /// Smallest encoding of one value of `type_id`, for bounding array counts.
    fn min_value_size(type_id: u32) -> Option<u64> {
        Some(match type_id {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => 8,
            9 => 12,
            _ => return None,
        })
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<Value, GgufError> {
        // Leaf reads name the key only on error, so the 50k-element token arrays cost no formatting.
        let leaf = match type_id {
            0 => self.u8("u8 value").map(Value::U8),
            1 => self.u8("i8 value").map(|x| Value::I8(x as i8)),
            2 => self.u16("u16 value").map(Value::U16),
            3 => self.u16("i16 value").map(|x| Value::I16(x as i16)),
            4 => self.u32("u32 value").map(Value::U32),
            5 => self.u32("i32 value").map(|x| Value::I32(x as i32)),
            6 => self.u32("f32 value").map(|x| Value::F32(f32::from_bits(x))),
            7 => self.u8("bool value").map(|x| Value::Bool(x != 0)),
            8 => self.string("string value").map(Value::String),
            10 => self.u64("u64 value").map(Value::U64),
            11 => self.u64("i64 value").map(|x| Value::I64(x as i64)),
            12 => self.u64("f64 value").map(|x| Value::F64(f64::from_bits(x))),
            9 => return self.array_value(key, depth),
            _ => {
                return Err(GgufError::BadValueType {
                    path: self.path.to_path_buf(),
                    key: key.to_string(),
                    type_id,
                })
            }
        };
        leaf.map_err(|e| with_key(e, key))
    }

    fn array_value(&mut self, key: &str, depth: usize) -> Result<Value, GgufError> {
        if depth >= MAX_ARRAY_DEPTH {
            return Err(GgufError::BadMetadata {
                path: self.path.to_path_buf(),
                key: key.to_string(),
                msg: format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"),
            });
        }
        let elem_type = self
            .u32("array element type")
            .map_err(|e| with_key(e, key))?;
        let min = Self::min_value_size(elem_type).ok_or_else(|| GgufError::BadValueType {
            path: self.path.to_path_buf(),
            key: key.to_string(),
            type_id: elem_type,
        })?;
        let count = self.u64("array count").map_err(|e| with_key(e, key))?;
        self.check_count(count, min, 8, || format!("array {key:?}"))?;
        let mut items = Vec::with_capacity(prealloc(count));
        for _ in 0..count {
            items.push(self.value(elem_type, key, depth + 1)?);
        }
        Ok(Value::Array(elem_type, items))
    }
}

/// Add the metadata key to a leaf-read error's description.
fn with_key(e: GgufError, key: &str) -> GgufError {
    match e {
        GgufError::Truncated {
            path,
            what,
            offset,
            need,
            remaining,
        } => GgufError::Truncated {
            path,
            what: format!("{what} of {key:?}"),
            offset,
            need,
            remaining,
        },
        GgufError::NotUtf8 { path, what, offset } => GgufError::NotUtf8 {
            path,
            what: format!("{what} of {key:?}"),
            offset,
        },
        GgufError::AbsurdCount {
            path,
            what,
            offset,
            count,
            need,
            remaining,
        } => GgufError::AbsurdCount {
            path,
            what: format!("{what} of {key:?}"),
            offset,
            count,
            need,
            remaining,
        },
        other => other,
    }
}
