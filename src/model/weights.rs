//! Weights: memory-mapped safetensors files and the typed views the forward pass reads.
//!
//! Matrices are used in place, in the dtype they are stored in (f32, bf16 or f16): a
//! [`MatrixView`] is only (file, byte offset, shape, dtype) and becomes a kernel
//! [`WeightRef`] borrowed from the map on demand, so nothing is copied at load. One-dimensional
//! tensors (norm weights, biases; a few KB) are widened to owned f32 vectors at load, because
//! they are read whole on every row.
//!
//! The schema is HF's tensor names (`model.layers.{i}.self_attn.q_proj.weight`, ...), resolved
//! through [`TensorStore`]; a missing tensor, a wrong shape or an unsupported dtype is an error
//! naming the tensor and its file.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use kvcompact_kernels::WeightRef;
use memmap2::Mmap;
use safetensors::Dtype;

use crate::model::config::Config;
use crate::error::{Error, Result};

pub use crate::tensor_file::WDtype;


/// Where one tensor lives: which mapped file, which bytes, what shape and dtype.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Index of the mapped file in the store (see [`TensorStore::file_path`]).
    pub file: usize,
    /// Element dtype as stored.
    pub dtype: Dtype,
    /// Shape as stored (row-major).
    pub shape: Vec<usize>,
    /// Absolute byte range inside the mapped file: start (inclusive).
    pub start: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

/// All safetensors files of a model directory, memory-mapped, and an index of their tensors.
pub struct TensorStore {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, TensorEntry>,
    /// Copies of matrices whose bytes are not aligned for their dtype inside the file
    /// (safetensors does not promise alignment); 4-byte aligned because stored as u32.
    realigned: Vec<Vec<u32>>,
}

impl TensorStore {
    /// Open `model.safetensors`, or the shards listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<TensorStore> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index_path.exists() {
            shard_paths(dir, &index_path)?
        } else {
            return Err(Error::Safetensors {
                path: dir.into(),
                msg: "no model.safetensors or model.safetensors.index.json in the directory".into(),
            });
        };
        let mut store = TensorStore {
            dir: dir.into(),
            files: Vec::new(),
            index: HashMap::new(),
            realigned: Vec::new(),
        };
        for p in paths {
            store.add_file(&p)?;
        }
        Ok(store)
    }

    fn add_file(&mut self, path: &Path) -> Result<()> {
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only and we never write the file while it is mapped; files
        // we write ourselves are replaced by rename, never truncated in place.
        let mmap = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let mmap = if std::env::var("KVCOMPACT_HUGEPAGES").is_ok_and(|v| v == "0") {
            mmap
        } else {
            huge_copy(mmap).map_err(|e| Error::io(path, e))?
        };
        let (n, meta) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| {
            Error::Safetensors {
                path: path.into(),
                msg: match e {
                    safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                        "file size does not match its header (truncated?)".into()
                    }
                    e => e.to_string(),
                },
            }
        })?;
        let data_start = 8 + n;
        let file_idx = self.files.len();
        for (name, info) in meta.tensors() {
            if self.index.contains_key(&name) {
                return Err(Error::Safetensors {
                    path: path.into(),
                    msg: format!("tensor {name} appears in more than one shard"),
                });
            }
            self.index.insert(
                name,
                TensorEntry {
                    file: file_idx,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                },
            );
        }
        self.files.push((path.into(), mmap));
        Ok(())
    }

    /// The model directory the store was opened from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether a tensor of this HF name is in any of the files.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// Names of all tensors, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// Where a tensor lives; [`Error::MissingTensor`] if no file has it.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        self.index.get(name).ok_or_else(|| Error::MissingTensor {
            name: name.into(),
            dir: self.dir.clone(),
        })
    }

    /// Path of the file holding a tensor.
    pub fn file_path(&self, e: &TensorEntry) -> &Path {
        &self.files[e.file].0
    }

    /// A tensor's raw little-endian bytes as mapped (not necessarily aligned for its dtype).
    pub fn bytes(&self, e: &TensorEntry) -> &[u8] {
        &self.files[e.file].1[e.start..e.end]
    }

    fn check_shape(&self, name: &str, e: &TensorEntry, expected: &[usize]) -> Result<()> {
        if e.shape != expected {
            return Err(Error::ShapeMismatch {
                name: name.into(),
                file: self.file_path(e).into(),
                expected: expected.to_vec(),
                got: e.shape.clone(),
            });
        }
        Ok(())
    }

    fn float_dtype(&self, name: &str, e: &TensorEntry) -> Result<WDtype> {
        match e.dtype {
            Dtype::F32 => Ok(WDtype::F32),
            Dtype::BF16 => Ok(WDtype::Bf16),
            Dtype::F16 => Ok(WDtype::F16),
            other => Err(Error::UnsupportedDtype {
                name: name.into(),
                file: self.file_path(e).into(),
                dtype: format!("{other:?}"),
            }),
        }
    }

    /// A [rows, cols] matrix, checked, used in place (or realigned once if misaligned).
    pub fn matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<MatrixView> {
        let e = self.entry(name)?.clone();
        self.check_shape(name, &e, &[rows, cols])?;
        let dtype = self.float_dtype(name, &e)?;
        let bytes = self.bytes(&e);
        if let Some(i) = first_non_finite(bytes, dtype) {
            return Err(Error::BadTensor {
                name: name.into(),
                file: self.file_path(&e).into(),
                msg: format!("non-finite value (NaN or inf) at flat index {i}"),
            });
        }
        if (bytes.as_ptr() as usize).is_multiple_of(dtype.size()) {
            return Ok(MatrixView { src: Src::Mapped { file: e.file, start: e.start, end: e.end }, rows, cols, dtype });
        }
        tracing::warn!(tensor = name, "tensor bytes are misaligned in the file; copying it");
        let mut words = vec![0u32; bytes.len().div_ceil(4)];
        bytemuck::cast_slice_mut::<u32, u8>(&mut words)[..bytes.len()].copy_from_slice(bytes);
        self.realigned.push(words);
        Ok(MatrixView {
            src: Src::Realigned { idx: self.realigned.len() - 1, len: e.end - e.start },
            rows,
            cols,
            dtype,
        })
    }

    /// A 1-D tensor of `len` values widened to f32 (norm weights, biases).
    pub fn vector_f32(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let e = self.entry(name)?;
        self.check_shape(name, e, &[len])?;
        let dtype = self.float_dtype(name, e)?;
        let b = self.bytes(e);
        let v: Vec<f32> = match dtype {
            WDtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            WDtype::Bf16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            WDtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
        };
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::BadTensor {
                name: name.into(),
                file: self.file_path(e).into(),
                msg: format!("non-finite value {} at index {i}", v[i]),
            });
        }
        Ok(v)
    }

    /// The kernel view of a matrix. Borrowed from the map; no copy.
    pub fn view(&self, m: &MatrixView) -> WeightRef<'_> {
        let bytes: &[u8] = match m.src {
            Src::Mapped { file, start, end } => &self.files[file].1[start..end],
            Src::Realigned { idx, len } => &bytemuck::cast_slice::<u32, u8>(&self.realigned[idx])[..len],
        };
        match m.dtype {
            WDtype::F32 => WeightRef::F32(bytemuck::cast_slice(bytes)),
            WDtype::Bf16 => WeightRef::Bf16(bytemuck::cast_slice(bytes)),
            WDtype::F16 => WeightRef::F16(bytemuck::cast_slice(bytes)),
        }
    }
}

/// On Linux, the file's bytes copied into an anonymous read-only map advised for
/// transparent huge pages (2 MiB): decode streams every weight once per token, and with 4 KiB
/// page-cache pages the TLB misses and the hardware prefetcher's stop at every page boundary
/// cost ~10-15% of the bandwidth (measured on SmolLM2-135M decode). The copy is a few hundred
/// ms at load and the file map is dropped, so one copy stays resident — but it is private
/// memory (not shared between processes, not evictable), so it is only made when the file is
/// under a quarter of MemAvailable; `KVCOMPACT_HUGEPAGES=0` keeps the plain file map.
/// Elsewhere, or when the kernel refuses the advice, the file map itself.
fn huge_copy(file_map: Mmap) -> std::io::Result<Mmap> {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?.to_string();
            line.split_whitespace().nth(1)?.parse::<usize>().ok().map(|kib| kib * 1024)
        });
        if file_map.len() >= HUGE && available.is_some_and(|a| file_map.len() < a / 4) {
            let mut anon = memmap2::MmapOptions::new().len(file_map.len()).map_anon()?;
            if anon.advise(memmap2::Advice::HugePage).is_ok() {
                anon.copy_from_slice(&file_map);
                return anon.make_read_only();
            }
        }
    }
    Ok(file_map)
}

/// Index of the first NaN/inf in little-endian `bytes` of `dtype` (an all-ones exponent).
/// Scanned in parallel: the pages are about to be read by the first forward pass anyway.
fn first_non_finite(bytes: &[u8], dtype: WDtype) -> Option<usize> {
    use rayon::prelude::*;
    let size = dtype.size();
    let chunk = 1 << 16; // elements per task
    bytes.par_chunks(chunk * size).enumerate().find_map_first(|(ci, c)| {
        let bad = match dtype {
            WDtype::F32 => c.chunks_exact(4).position(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7F80_0000 == 0x7F80_0000),
            WDtype::Bf16 => c.chunks_exact(2).position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7F80 == 0x7F80),
            WDtype::F16 => c.chunks_exact(2).position(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7C00 == 0x7C00),
        };
        bad.map(|i| ci * chunk + i)
    })
}

fn shard_paths(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let bad = |msg: String| Error::Safetensors { path: index_path.into(), msg };
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("missing \"weight_map\" object".into()))?;
    let mut files: BTreeMap<String, ()> = BTreeMap::new();
    for (name, f) in map {
        let f = f.as_str().ok_or_else(|| bad(format!("weight_map entry for {name} is not a file name")))?;
        if f.contains('/') || f.contains('\\') || f.starts_with('.') {
            return Err(bad(format!("shard name {f:?} must be a plain file name")));
        }
        files.insert(f.to_string(), ());
    }
    if files.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok(files.into_keys().map(|f| dir.join(f)).collect())
}

#[derive(Debug, Clone, Copy)]
enum Src {
    Mapped { file: usize, start: usize, end: usize },
    Realigned { idx: usize, len: usize },
}

/// A weight matrix [rows, cols], row-major, stored as `dtype`; resolve with [`TensorStore::view`].
#[derive(Debug, Clone, Copy)]
pub struct MatrixView {
    src: Src,
    /// Number of rows (HF "out" features).
    pub rows: usize,
    /// Number of columns (HF "in" features).
    pub cols: usize,
    /// Storage dtype (f32, bf16 or f16).
    pub dtype: WDtype,
}

impl MatrixView {
    /// Storage size in bytes, `rows * cols * dtype.size()`.
    pub fn bytes(&self) -> usize {
        self.rows * self.cols * self.dtype.size()
    }
}

/// One decoder layer. Shapes use the config's names: d = hidden_size, hd = head_dim,
/// nh/nkv = query/KV heads, ff = intermediate_size. Matrices are HF [out, in].
pub struct LayerWeights {
    /// RMSNorm weight before attention (`input_layernorm`).
    pub attn_norm: Vec<f32>, // [d]
    /// Query projection (`q_proj`).
    pub wq: MatrixView,      // [nh*hd, d]
    /// Key projection (`k_proj`).
    pub wk: MatrixView,      // [nkv*hd, d]
    /// Value projection (`v_proj`).
    pub wv: MatrixView,      // [nkv*hd, d]
    /// Attention output projection (`o_proj`).
    pub wo: MatrixView,      // [d, nh*hd]
    /// Query bias; present iff [`Config::qkv_bias`].
    pub bq: Option<Vec<f32>>, // [nh*hd]
    /// Key bias; present iff [`Config::qkv_bias`].
    pub bk: Option<Vec<f32>>, // [nkv*hd]
    /// Value bias; present iff [`Config::qkv_bias`].
    pub bv: Option<Vec<f32>>, // [nkv*hd]
    /// Output-projection bias; present iff [`Config::o_bias`].
    pub bo: Option<Vec<f32>>, // [d]
    /// Per-head RMSNorm weight on q before RoPE; present iff [`Config::qk_norm`].
    pub q_norm: Option<Vec<f32>>, // [hd] (Qwen3)
    /// Per-head RMSNorm weight on k before RoPE; present iff [`Config::qk_norm`].
    pub k_norm: Option<Vec<f32>>, // [hd] (Qwen3)
    /// RMSNorm weight before the MLP (`post_attention_layernorm`).
    pub ffn_norm: Vec<f32>,  // [d]
    /// MLP gate projection (SiLU branch).
    pub w_gate: MatrixView,  // [ff, d]
    /// MLP up projection.
    pub w_up: MatrixView,    // [ff, d]
    /// MLP down projection.
    pub w_down: MatrixView,  // [d, ff]
    /// Gate bias; present iff [`Config::mlp_bias`].
    pub b_gate: Option<Vec<f32>>, // [ff]
    /// Up bias; present iff [`Config::mlp_bias`].
    pub b_up: Option<Vec<f32>>,   // [ff]
    /// Down bias; present iff [`Config::mlp_bias`].
    pub b_down: Option<Vec<f32>>, // [d]
}

/// All weights of a model: views into the maps plus small owned vectors.
pub struct Weights {
    /// The mapped files every [`MatrixView`] here points into.
    pub store: TensorStore,
    /// Token embedding table (`embed_tokens`), one row per token id.
    pub embed: MatrixView, // [vocab, d]
    /// The decoder layers, `[n_layers]`.
    pub layers: Vec<LayerWeights>,
    /// RMSNorm weight applied before the LM head (`model.norm`).
    pub final_norm: Vec<f32>, // [d]
    /// Output projection to vocabulary logits.
    pub lm_head: MatrixView,  // [vocab, d]; the embedding itself when tied
}

impl Weights {
    /// Open the model directory's safetensors and check every tensor `cfg` calls for
    /// (shape, dtype, no NaN/inf).
    pub fn load(dir: &Path, cfg: &Config) -> Result<Weights> {
        let mut st = TensorStore::open_dir(dir)?;
        let (d, hd, ff) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
        let (qd, kvd) = (cfg.q_dim(), cfg.kv_dim());
        let embed = st.matrix("model.embed_tokens.weight", cfg.vocab_size, d)?;
        // Not sized by the config: a huge num_hidden_layers then fails at the first missing
        // tensor with a one-line error instead of an allocation abort.
        let mut layers = Vec::new();
        for i in 0..cfg.n_layers {
            let p = format!("model.layers.{i}");
            let opt = |st: &TensorStore, on: bool, name: String, len: usize| -> Result<Option<Vec<f32>>> {
                if on { st.vector_f32(&name, len).map(Some) } else { Ok(None) }
            };
            layers.push(LayerWeights {
                attn_norm: st.vector_f32(&format!("{p}.input_layernorm.weight"), d)?,
                wq: st.matrix(&format!("{p}.self_attn.q_proj.weight"), qd, d)?,
                wk: st.matrix(&format!("{p}.self_attn.k_proj.weight"), kvd, d)?,
                wv: st.matrix(&format!("{p}.self_attn.v_proj.weight"), kvd, d)?,
                wo: st.matrix(&format!("{p}.self_attn.o_proj.weight"), d, qd)?,
                bq: opt(&st, cfg.qkv_bias, format!("{p}.self_attn.q_proj.bias"), qd)?,
                bk: opt(&st, cfg.qkv_bias, format!("{p}.self_attn.k_proj.bias"), kvd)?,
                bv: opt(&st, cfg.qkv_bias, format!("{p}.self_attn.v_proj.bias"), kvd)?,
                bo: opt(&st, cfg.o_bias, format!("{p}.self_attn.o_proj.bias"), d)?,
                q_norm: opt(&st, cfg.qk_norm, format!("{p}.self_attn.q_norm.weight"), hd)?,
                k_norm: opt(&st, cfg.qk_norm, format!("{p}.self_attn.k_norm.weight"), hd)?,
                ffn_norm: st.vector_f32(&format!("{p}.post_attention_layernorm.weight"), d)?,
                w_gate: st.matrix(&format!("{p}.mlp.gate_proj.weight"), ff, d)?,
                w_up: st.matrix(&format!("{p}.mlp.up_proj.weight"), ff, d)?,
                w_down: st.matrix(&format!("{p}.mlp.down_proj.weight"), d, ff)?,
                b_gate: opt(&st, cfg.mlp_bias, format!("{p}.mlp.gate_proj.bias"), ff)?,
                b_up: opt(&st, cfg.mlp_bias, format!("{p}.mlp.up_proj.bias"), ff)?,
                b_down: opt(&st, cfg.mlp_bias, format!("{p}.mlp.down_proj.bias"), d)?,
            });
        }
        let final_norm = st.vector_f32("model.norm.weight", d)?;
        // Tied models may still carry a copy of lm_head; the embedding is authoritative then.
        let lm_head = if cfg.tie_word_embeddings {
            embed
        } else {
            st.matrix("lm_head.weight", cfg.vocab_size, d)?
        };
        Ok(Weights { store: st, embed, layers, final_norm, lm_head })
    }

    /// The kernel view of a matrix (see [`TensorStore::view`]).
    pub fn view(&self, m: &MatrixView) -> WeightRef<'_> {
        self.store.view(m)
    }

    /// Bytes of all matrices as stored (what decode streams per token, plus the embedding row).
    pub fn matrix_bytes(&self) -> usize {
        let per_layer: usize = self
            .layers
            .iter()
            .map(|l| l.wq.bytes() + l.wk.bytes() + l.wv.bytes() + l.wo.bytes() + l.w_gate.bytes() + l.w_up.bytes() + l.w_down.bytes())
            .sum();
        per_layer + self.lm_head.bytes()
    }

    /// The storage dtype of the big matrices (that of q_proj in layer 0).
    pub fn dtype(&self) -> WDtype {
        self.layers.first().map(|l| l.wq.dtype).unwrap_or(self.embed.dtype)
    }
}
