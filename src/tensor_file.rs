//! Small tensors to and from safetensors files, owned (goldens, compacted caches, Q-Filters,
//! compact-head inputs and outputs), and the storage dtypes the runtime reads. Files are written
//! through a temporary file and a rename, so a reader never sees one half written.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::Dtype;

use crate::error::{Error, Result};

/// Storage dtype of a weight matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WDtype {
    /// IEEE single, 4 bytes.
    F32,
    /// bfloat16 (the top 16 bits of an f32), 2 bytes.
    Bf16,
    /// IEEE half, 2 bytes.
    F16,
}

impl WDtype {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            WDtype::F32 => 4,
            WDtype::Bf16 | WDtype::F16 => 2,
        }
    }
    /// Lower-case name: `f32`, `bf16` or `f16`.
    pub fn name(self) -> &'static str {
        match self {
            WDtype::F32 => "f32",
            WDtype::Bf16 => "bf16",
            WDtype::F16 => "f16",
        }
    }
}

/// A tensor to write with [`save_safetensors`].
pub enum OutTensor<'a> {
    /// An f32 tensor.
    F32 {
        /// Tensor name in the file.
        name: &'a str,
        /// Row-major shape; its product must equal `data.len()`.
        shape: Vec<usize>,
        /// Elements, row-major.
        data: &'a [f32],
    },
    /// An i64 tensor (token ids, positions, indices).
    I64 {
        /// Tensor name in the file.
        name: &'a str,
        /// Row-major shape; its product must equal `data.len()`.
        shape: Vec<usize>,
        /// Elements, row-major.
        data: &'a [i64],
    },
    /// bf16 or f16 raw bits.
    Half {
        /// Tensor name in the file.
        name: &'a str,
        /// Row-major shape; its product must equal `data.len()`.
        shape: Vec<usize>,
        /// Elements as raw 16-bit patterns, row-major.
        data: &'a [u16],
        /// [`WDtype::F16`] writes F16; any other value writes BF16.
        dtype: WDtype,
    },
}

struct RawView<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: &'a [u8],
}

impl safetensors::View for RawView<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// Write tensors (and string metadata) to `path` through a temporary file and a rename, so a
/// reader that has the old file mapped never sees it truncated.
pub fn save_safetensors(path: &Path, tensors: &[OutTensor], metadata: Option<HashMap<String, String>>) -> Result<()> {
    let views: Vec<(String, RawView)> = tensors
        .iter()
        .map(|t| match t {
            OutTensor::F32 { name, shape, data } => {
                (name.to_string(), RawView { dtype: Dtype::F32, shape: shape.clone(), bytes: bytemuck::cast_slice(data) })
            }
            OutTensor::I64 { name, shape, data } => {
                (name.to_string(), RawView { dtype: Dtype::I64, shape: shape.clone(), bytes: bytemuck::cast_slice(data) })
            }
            OutTensor::Half { name, shape, data, dtype } => {
                let dt = if *dtype == WDtype::F16 { Dtype::F16 } else { Dtype::BF16 };
                (name.to_string(), RawView { dtype: dt, shape: shape.clone(), bytes: bytemuck::cast_slice(data) })
            }
        })
        .collect();
    for (name, v) in &views {
        let n: usize = v.shape.iter().product();
        let esize = v.dtype.bitsize() / 8;
        if n * esize != v.bytes.len() {
            return Err(Error::Shape { op: "save_safetensors", expected: format!("{name}: {:?}", v.shape), got: format!("{} bytes", v.bytes.len()) });
        }
    }
    let tmp = tmp_path(path);
    let st_err = |msg: String| Error::Safetensors { path: path.into(), msg };
    let bytes = safetensors::serialize(views, metadata).map_err(|e| st_err(e.to_string()))?;
    let bytes = canonical_header(bytes).map_err(st_err)?;
    std::fs::write(&tmp, &bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// The same safetensors bytes with the JSON header's keys sorted (tensor names, and the metadata
/// map's keys), so that equal inputs give equal files: the metadata arrives as a `HashMap`, whose
/// iteration order changes from one process to the next. Offsets are absolute within the data
/// section, so reordering the header moves no data; it is padded with spaces to a multiple of 8
/// bytes as the format's writers do.
fn canonical_header(bytes: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    use std::collections::BTreeMap;
    let n = bytes.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()) as usize).ok_or("serialized file shorter than its header length")?;
    let header = bytes.get(8..8 + n).ok_or("serialized header runs past the end")?;
    let parsed: BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    let sorted: BTreeMap<&String, serde_json::Value> = parsed
        .iter()
        .map(|(k, v)| {
            // `__metadata__` is a string map; every other entry describes one tensor.
            let v = match (k.as_str(), v.as_object()) {
                ("__metadata__", Some(m)) => serde_json::to_value(m.iter().collect::<BTreeMap<_, _>>()).unwrap_or_else(|_| v.clone()),
                _ => v.clone(),
            };
            (k, v)
        })
        .collect();
    let mut text = serde_json::to_string(&sorted).map_err(|e| e.to_string())?.into_bytes();
    text.resize(text.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + text.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

/// `dir/.name.<pid>.tmp`, beside the destination so the rename stays on one filesystem.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Read a whole safetensors file into owned f32 / i64 vectors by name (for goldens and caches).
pub fn load_safetensors(path: &Path) -> Result<HashMap<String, (Vec<usize>, TensorData)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::Safetensors { path: path.into(), msg: e.to_string() })?;
    let mut out = HashMap::new();
    for (name, t) in st.tensors() {
        let b = t.data();
        let data = match t.dtype() {
            Dtype::F32 => TensorData::F32(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::I64 => TensorData::I64(b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
            Dtype::I32 => TensorData::I64(b.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect()),
            other => {
                return Err(Error::UnsupportedDtype { name, file: path.into(), dtype: format!("{other:?}") });
            }
        };
        out.insert(name, (t.shape().to_vec(), data));
    }
    Ok(out)
}

/// Owned elements of one tensor read by [`load_safetensors`], row-major.
#[derive(Debug, Clone)]
pub enum TensorData {
    /// An F32 tensor.
    F32(Vec<f32>),
    /// An I64 tensor, or an I32 one widened to i64.
    I64(Vec<i64>),
}
