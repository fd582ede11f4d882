//! GGUF (llama architecture) → HF directory: `model.safetensors` with HF names and `[out, in]`
//! shapes, `config.json`, `tokenizer.json`, `tokenizer_config.json`, `generation_config.json`.
//!
//! The tensors equal transformers' own GGUF loader output bit for bit: gguf-py dequantisation
//! (see [`super::dequant`]) plus its `reverse_permute` of the Q/K rows. llama.cpp's converter
//! interleaves each head's rotate-half pairs (GGUF row h·D + 2i + j holds HF row h·D + j·D/2 + i);
//! whole rows move, so we un-permute by reading source rows in HF order.
//!
//! Memory: tensors are dequantised one at a time straight into the output buffer of that tensor,
//! so peak use is the GGUF map plus the largest single tensor (the embedding, 113 MB in f32).

use std::borrow::Cow;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use serde_json::{json, Map, Value as Json};

use super::dequant::{dequantize_row, f32_to_bf16_bits};
use super::reader::{GgufFile, TensorInfo};
use super::tokenizer_json::tokenizer_json_from_gguf;
use super::GgufError;

/// Element type of the written `model.safetensors`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutDtype {
    /// The dequantised values as they are.
    F32,
    /// Round-to-nearest-even from the f32 dequantised values.
    Bf16,
}

impl OutDtype {
    fn elem_bytes(self) -> usize {
        match self {
            OutDtype::F32 => 4,
            OutDtype::Bf16 => 2,
        }
    }
    /// The `torch_dtype` string of `config.json`.
    pub fn torch_name(self) -> &'static str {
        match self {
            OutDtype::F32 => "float32",
            OutDtype::Bf16 => "bfloat16",
        }
    }
    fn st_dtype(self) -> safetensors::Dtype {
        match self {
            OutDtype::F32 => safetensors::Dtype::F32,
            OutDtype::Bf16 => safetensors::Dtype::BF16,
        }
    }
}

impl std::str::FromStr for OutDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(OutDtype::F32),
            "bf16" | "bfloat16" => Ok(OutDtype::Bf16),
            _ => Err(format!("unknown dtype {s:?} (expected f32 or bf16)")),
        }
    }
}

/// What [`convert_gguf`] wrote.
#[derive(Debug, Clone)]
pub struct ConvertSummary {
    /// Tensors written to `model.safetensors`.
    pub tensors: usize,
    /// Size of `model.safetensors` in bytes.
    pub model_bytes: u64,
    /// Bytes of all files written, `model.safetensors` included.
    pub bytes_written: u64,
    /// Wall-clock time of the whole conversion, opening the GGUF included.
    pub seconds: f64,
}

/// One output tensor and where it comes from.
#[derive(Debug, Clone)]
pub struct HfTensor {
    /// HF parameter name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// Source GGUF tensor name, e.g. `blk.0.attn_q.weight`.
    pub gguf_name: String,
    /// HF row-major shape (`[out, in]` for matrices) = the GGUF dims reversed.
    pub shape: Vec<usize>,
    /// Head count for llama's Q/K row un-permutation; `None` keeps the rows in order.
    pub unpermute_heads: Option<usize>,
}

/// Model hyper-parameters read from `llama.*` metadata and checked against each other.
#[derive(Debug, Clone)]
struct LlamaParams {
    n_layers: usize,
    hidden: usize,
    ffn: usize,
    n_head: usize,
    n_kv: usize,
    head_dim: usize,
    vocab: usize,
    context: usize,
    eps: f32,
    theta: f32,
    rope_scaling: Json,
    tied: bool,
}

fn conv_err(gguf: &GgufFile, msg: impl Into<String>) -> GgufError {
    GgufError::Convert {
        path: gguf.path().to_path_buf(),
        msg: msg.into(),
    }
}

/// A metadata count that must be a positive integer small enough to be a dimension.
fn dim_key(gguf: &GgufFile, key: &str, default: Option<u64>) -> Result<usize, GgufError> {
    let v = match gguf.get_u64(key)? {
        Some(v) => v,
        None => default.ok_or_else(|| GgufError::BadMetadata {
            path: gguf.path().to_path_buf(),
            key: key.into(),
            msg: "missing".into(),
        })?,
    };
    if v == 0 || v > 1 << 31 {
        return Err(GgufError::BadMetadata {
            path: gguf.path().to_path_buf(),
            key: key.into(),
            msg: format!("{v} is not a plausible size"),
        });
    }
    Ok(v as usize)
}

fn check_arch(gguf: &GgufFile) -> Result<(), GgufError> {
    let arch = gguf.architecture()?;
    if arch != "llama" {
        return Err(GgufError::UnsupportedArchitecture {
            path: gguf.path().to_path_buf(),
            arch: arch.into(),
        });
    }
    Ok(())
}

fn llama_params(gguf: &GgufFile) -> Result<LlamaParams, GgufError> {
    check_arch(gguf)?;
    let n_layers = dim_key(gguf, "llama.block_count", None)?;
    let hidden = dim_key(gguf, "llama.embedding_length", None)?;
    let ffn = dim_key(gguf, "llama.feed_forward_length", None)?;
    let n_head = dim_key(gguf, "llama.attention.head_count", None)?;
    let n_kv = dim_key(gguf, "llama.attention.head_count_kv", Some(n_head as u64))?;
    let default_hd = (hidden % n_head == 0).then_some((hidden / n_head) as u64);
    let head_dim = dim_key(gguf, "llama.attention.key_length", default_hd)?;
    let value_len = dim_key(gguf, "llama.attention.value_length", Some(head_dim as u64))?;
    let n_rot = dim_key(gguf, "llama.rope.dimension_count", Some(head_dim as u64))?;
    if value_len != head_dim || n_rot != head_dim || head_dim % 2 != 0 || n_head % n_kv != 0 {
        return Err(conv_err(
            gguf,
            format!(
                "unsupported attention shape: head_count {n_head}, head_count_kv {n_kv}, key_length {head_dim}, \
                 value_length {value_len}, rope.dimension_count {n_rot} (need equal, even head sizes and full rotary)"
            ),
        ));
    }
    let embd = gguf
        .tensor("token_embd.weight")
        .ok_or_else(|| conv_err(gguf, "tensor token_embd.weight is missing"))?;
    let vocab = match embd.dims.as_slice() {
        [h, v] if *h as usize == hidden => *v as usize,
        d => {
            return Err(conv_err(
                gguf,
                format!("token_embd.weight has dims {d:?}, expected [{hidden}, vocab]"),
            ))
        }
    };
    if let Some(v) = gguf.get_u64("llama.vocab_size")? {
        if v as usize != vocab {
            return Err(conv_err(
                gguf,
                format!("llama.vocab_size {v} != token_embd.weight rows {vocab}"),
            ));
        }
    }
    let context = dim_key(gguf, "llama.context_length", None)?;
    let eps = gguf
        .get_f32("llama.attention.layer_norm_rms_epsilon")?
        .ok_or_else(|| GgufError::BadMetadata {
            path: gguf.path().to_path_buf(),
            key: "llama.attention.layer_norm_rms_epsilon".into(),
            msg: "missing".into(),
        })?;
    let theta = gguf.get_f32("llama.rope.freq_base")?.unwrap_or(10000.0);
    if !(eps > 0.0 && eps.is_finite() && theta > 0.0 && theta.is_finite()) {
        return Err(conv_err(
            gguf,
            format!("implausible rms epsilon {eps} or rope freq_base {theta}"),
        ));
    }
    let rope_scaling = match gguf.get_str("llama.rope.scaling.type")? {
        None | Some("none") => Json::Null,
        Some("linear") => {
            let factor = gguf.get_f32("llama.rope.scaling.factor")?.unwrap_or(1.0);
            json!({"rope_type": "linear", "factor": f32_json(factor)})
        }
        Some(other) => {
            return Err(conv_err(
                gguf,
                format!("rope scaling type {other:?} is not supported"),
            ))
        }
    };
    if gguf.tensor("rope_freqs.weight").is_some() {
        return Err(conv_err(
            gguf,
            "Llama-3-style rope_freqs.weight is not supported",
        ));
    }
    let tied = gguf.tensor("output.weight").is_none();
    Ok(LlamaParams {
        n_layers,
        hidden,
        ffn,
        n_head,
        n_kv,
        head_dim,
        vocab,
        context,
        eps,
        theta,
        rope_scaling,
        tied,
    })
}

/// The f32 as the shortest decimal that round-trips, so 1e-5f32 is written `1e-5`, not
/// `9.999999747378752e-6`.
fn f32_json(x: f32) -> Json {
    let f: f64 = format!("{x}").parse().unwrap_or(x as f64);
    json!(f)
}

/// Map every GGUF tensor to its HF name and shape, checking the set is exactly one Llama.
pub fn hf_tensor_plan(gguf: &GgufFile) -> Result<Vec<HfTensor>, GgufError> {
    let p = llama_params(gguf)?;
    let (h, q, kv, f) = (
        p.hidden as u64,
        (p.n_head * p.head_dim) as u64,
        (p.n_kv * p.head_dim) as u64,
        p.ffn as u64,
    );
    let per_layer: [(&str, &str, Vec<u64>, Option<usize>); 9] = [
        ("attn_norm", "input_layernorm", vec![h], None),
        ("attn_q", "self_attn.q_proj", vec![h, q], Some(p.n_head)),
        ("attn_k", "self_attn.k_proj", vec![h, kv], Some(p.n_kv)),
        ("attn_v", "self_attn.v_proj", vec![h, kv], None),
        ("attn_output", "self_attn.o_proj", vec![q, h], None),
        ("ffn_norm", "post_attention_layernorm", vec![h], None),
        ("ffn_gate", "mlp.gate_proj", vec![h, f], None),
        ("ffn_up", "mlp.up_proj", vec![h, f], None),
        ("ffn_down", "mlp.down_proj", vec![f, h], None),
    ];
    // GGUF name → (HF name, expected GGUF dims, Q/K heads). Resolved per tensor rather than by
    // listing every expected name: block_count comes from the file and may be absurd.
    let expect = |name: &str| -> Option<(String, Vec<u64>, Option<usize>)> {
        match name {
            "token_embd.weight" => Some((
                "model.embed_tokens.weight".into(),
                vec![h, p.vocab as u64],
                None,
            )),
            "output_norm.weight" => Some(("model.norm.weight".into(), vec![h], None)),
            "output.weight" => Some(("lm_head.weight".into(), vec![h, p.vocab as u64], None)),
            _ => {
                let (layer, rest) = name.strip_prefix("blk.")?.split_once('.')?;
                let l: usize = layer
                    .parse()
                    .ok()
                    .filter(|l: &usize| *l < p.n_layers && l.to_string() == layer)?;
                let leaf = rest.strip_suffix(".weight")?;
                let (_, hf, dims, heads) = per_layer.iter().find(|e| e.0 == leaf)?;
                Some((
                    format!("model.layers.{l}.{hf}.weight"),
                    dims.clone(),
                    *heads,
                ))
            }
        }
    };

    let mut plan = Vec::with_capacity(gguf.tensors().len());
    for t in gguf.tensors() {
        let Some((hf, dims, heads)) = expect(&t.name) else {
            return Err(conv_err(
                gguf,
                format!(
                    "unexpected tensor {} for a {}-layer llama",
                    t.name, p.n_layers
                ),
            ));
        };
        if t.dims != dims {
            return Err(conv_err(
                gguf,
                format!("tensor {} has dims {:?}, expected {dims:?}", t.name, t.dims),
            ));
        }
        plan.push(HfTensor {
            name: hf,
            gguf_name: t.name.clone(),
            shape: t.shape(),
            unpermute_heads: heads,
        });
    }
    // Names are unique and map one-to-one, so a short count means something is missing; the
    // search stops at the first gap, i.e. within the layers the file actually has.
    let want = 2 + usize::from(!p.tied) + 9 * p.n_layers;
    if plan.len() < want {
        let fixed = [
            "token_embd.weight".to_string(),
            "output_norm.weight".to_string(),
        ];
        let layered = (0..p.n_layers).flat_map(|l| {
            per_layer
                .iter()
                .map(move |e| format!("blk.{l}.{}.weight", e.0))
        });
        if let Some(missing) = fixed
            .into_iter()
            .chain(layered)
            .find(|n| gguf.tensor(n).is_none())
        {
            return Err(conv_err(
                gguf,
                format!(
                    "tensor {missing} is missing ({} of {want} llama tensors present)",
                    plan.len()
                ),
            ));
        }
    }
    // embed, layers in order, norm, lm_head: readable, and independent of the file's order.
    let rank = |n: &str| -> (u8, usize, String) {
        if n == "model.embed_tokens.weight" {
            (0, 0, String::new())
        } else if let Some(rest) = n.strip_prefix("model.layers.") {
            let (i, tail) = rest.split_once('.').unwrap_or((rest, ""));
            (1, i.parse().unwrap_or(usize::MAX), tail.to_string())
        } else {
            (2, 0, n.to_string())
        }
    };
    plan.sort_by_cached_key(|t| rank(&t.name));
    Ok(plan)
}

/// Source (GGUF) row of HF row `r`: identity, or llama's un-permutation for `heads` heads of
/// `rows / heads` rows each (HF row h·D + j·D/2 + i = GGUF row h·D + 2i + j).
fn source_row(r: usize, n_rows: usize, heads: Option<usize>) -> usize {
    match heads {
        Some(nh) if nh > 0 && n_rows.is_multiple_of(nh) && (n_rows / nh).is_multiple_of(2) => {
            let d = n_rows / nh;
            let (head, c) = (r / d, r % d);
            let (j, i) = (c / (d / 2), c % (d / 2));
            head * d + 2 * i + j
        }
        _ => r,
    }
}

fn info<'a>(gguf: &'a GgufFile, t: &HfTensor) -> Result<&'a TensorInfo, GgufError> {
    gguf.tensor(&t.gguf_name)
        .ok_or_else(|| conv_err(gguf, format!("tensor {} is missing", t.gguf_name)))
}

/// One source row of raw bytes (ranges were validated at open; an empty slice cannot occur).
fn src_row(data: &[u8], row: usize, row_bytes: usize) -> &[u8] {
    data.get(row * row_bytes..(row + 1) * row_bytes)
        .unwrap_or(&[])
}

/// Dequantised values of one output tensor, HF row-major order.
pub fn hf_tensor_values(gguf: &GgufFile, t: &HfTensor) -> Result<Vec<f32>, GgufError> {
    let ti = info(gguf, t)?;
    let (n_cols, n_rows) = (ti.n_cols(), ti.n_rows());
    let rb = ti.ggml_type.row_bytes(n_cols).unwrap_or(0);
    let data = gguf.tensor_data(ti);
    let mut out = vec![0f32; n_cols * n_rows];
    if n_cols > 0 {
        out.par_chunks_mut(n_cols)
            .enumerate()
            .with_min_len(8)
            .for_each(|(r, dst)| {
                let s = src_row(data, source_row(r, n_rows, t.unpermute_heads), rb);
                dequantize_row(ti.ggml_type, s, dst);
            });
    }
    Ok(out)
}

/// The output tensor's little-endian bytes in `dtype`.
fn hf_tensor_bytes(gguf: &GgufFile, t: &HfTensor, ti: &TensorInfo, dtype: OutDtype) -> Vec<u8> {
    let (n_cols, n_rows) = (ti.n_cols(), ti.n_rows());
    let rb = ti.ggml_type.row_bytes(n_cols).unwrap_or(0);
    let data = gguf.tensor_data(ti);
    let eb = dtype.elem_bytes();
    let mut out = vec![0u8; n_cols * n_rows * eb];
    if n_cols == 0 {
        return out;
    }
    out.par_chunks_mut(n_cols * eb)
        .enumerate()
        .with_min_len(8)
        .for_each_init(
            || vec![0f32; n_cols],
            |row, (r, dst)| {
                let s = src_row(data, source_row(r, n_rows, t.unpermute_heads), rb);
                dequantize_row(ti.ggml_type, s, row);
                match dtype {
                    OutDtype::F32 => {
                        for (o, x) in dst.chunks_exact_mut(4).zip(row.iter()) {
                            o.copy_from_slice(&x.to_le_bytes());
                        }
                    }
                    OutDtype::Bf16 => {
                        for (o, x) in dst.chunks_exact_mut(2).zip(row.iter()) {
                            o.copy_from_slice(&f32_to_bf16_bits(*x).to_le_bytes());
                        }
                    }
                }
            },
        );
    out
}

/// A tensor that is dequantised only when the safetensors writer asks for its bytes, so the
/// whole model never sits in memory at once.
struct LazyTensor<'a> {
    gguf: &'a GgufFile,
    t: &'a HfTensor,
    ti: &'a TensorInfo,
    dtype: OutDtype,
}

impl safetensors::View for LazyTensor<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.st_dtype()
    }
    fn shape(&self) -> &[usize] {
        &self.t.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Owned(hf_tensor_bytes(self.gguf, self.t, self.ti, self.dtype))
    }
    fn data_len(&self) -> usize {
        self.ti.n_elements() * self.dtype.elem_bytes()
    }
}

/// The HF `LlamaConfig` of the GGUF's model.
pub fn hf_config_json(gguf: &GgufFile, dtype: OutDtype) -> Result<Json, GgufError> {
    let p = llama_params(gguf)?;
    let mut c = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "head_dim": p.head_dim,
        "hidden_act": "silu",
        "hidden_size": p.hidden,
        "initializer_range": 0.02,
        "intermediate_size": p.ffn,
        "max_position_embeddings": p.context,
        "mlp_bias": false,
        "num_attention_heads": p.n_head,
        "num_hidden_layers": p.n_layers,
        "num_key_value_heads": p.n_kv,
        "pretraining_tp": 1,
        "rms_norm_eps": f32_json(p.eps),
        "rope_scaling": p.rope_scaling,
        "rope_theta": f32_json(p.theta),
        "tie_word_embeddings": p.tied,
        "torch_dtype": dtype.torch_name(),
        "use_cache": true,
        "vocab_size": p.vocab,
    });
    if let Json::Object(m) = &mut c {
        insert_special_ids(gguf, m)?;
    }
    Ok(c)
}

/// `generation_config.json`: the special ids generation needs.
pub fn generation_config_json(gguf: &GgufFile) -> Result<Json, GgufError> {
    let mut m = Map::new();
    insert_special_ids(gguf, &mut m)?;
    Ok(Json::Object(m))
}

/// bos/eos/pad ids from the GGUF tokenizer metadata, under their HF config names.
fn insert_special_ids(gguf: &GgufFile, m: &mut Map<String, Json>) -> Result<(), GgufError> {
    for (key, name) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
        ("tokenizer.ggml.padding_token_id", "pad_token_id"),
    ] {
        if let Some(id) = gguf.get_u64(key)? {
            m.insert(name.into(), json!(id));
        }
    }
    Ok(())
}

/// `tokenizer_config.json`: chat template, special-token strings, BOS/EOS policy, max length.
pub fn tokenizer_config_json(gguf: &GgufFile) -> Result<Json, GgufError> {
    let tokens = gguf
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.as_array())
        .unwrap_or(&[]);
    let token = |key: &str| -> Result<Json, GgufError> {
        Ok(match gguf.get_u64(key)? {
            None => Json::Null,
            Some(id) => match tokens.get(id as usize).and_then(|v| v.as_str()) {
                Some(s) => json!(s),
                None => {
                    return Err(GgufError::BadMetadata {
                        path: gguf.path().to_path_buf(),
                        key: key.into(),
                        msg: format!(
                            "token id {id} is outside the vocabulary ({} tokens)",
                            tokens.len()
                        ),
                    })
                }
            },
        })
    };
    let mut m = Map::new();
    m.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    m.insert("bos_token".into(), token("tokenizer.ggml.bos_token_id")?);
    m.insert("eos_token".into(), token("tokenizer.ggml.eos_token_id")?);
    m.insert(
        "pad_token".into(),
        token("tokenizer.ggml.padding_token_id")?,
    );
    m.insert(
        "unk_token".into(),
        token("tokenizer.ggml.unknown_token_id")?,
    );
    m.insert(
        "add_bos_token".into(),
        json!(gguf
            .get_bool("tokenizer.ggml.add_bos_token")?
            .unwrap_or(false)),
    );
    m.insert(
        "add_eos_token".into(),
        json!(gguf
            .get_bool("tokenizer.ggml.add_eos_token")?
            .unwrap_or(false)),
    );
    m.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(t) = gguf.get_str("tokenizer.chat_template")? {
        m.insert("chat_template".into(), json!(t));
    }
    let ctx = gguf.get_u64(&format!("{}.context_length", gguf.architecture()?))?;
    if let Some(ctx) = ctx {
        m.insert("model_max_length".into(), json!(ctx));
    }
    Ok(Json::Object(m))
}

/// Write `bytes` to `dir/name` through a temporary sibling and a rename, so a file that is
/// memory-mapped elsewhere is replaced, never truncated.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<u64, GgufError> {
    let dst = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source: std::io::Error| GgufError::Io { path, source }
    };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        drop(f);
        std::fs::rename(&tmp, &dst).map_err(io(&dst))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| bytes.len() as u64)
}

fn json_bytes(v: &Json) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).unwrap_or_else(|_| "{}".into());
    s.push('\n');
    s.into_bytes()
}

/// Convert a llama GGUF into an HF model directory (created if needed). Existing files of the
/// same names are replaced atomically.
pub fn convert_gguf(
    gguf_path: &Path,
    out_dir: &Path,
    dtype: OutDtype,
) -> Result<ConvertSummary, GgufError> {
    let start = Instant::now();
    let gguf = GgufFile::open(gguf_path)?;
    // Everything that can fail on bad metadata runs before the first byte is written.
    let plan = hf_tensor_plan(&gguf)?;
    let config = hf_config_json(&gguf, dtype)?;
    let tok_config = tokenizer_config_json(&gguf)?;
    let gen_config = generation_config_json(&gguf)?;
    let tokenizer = tokenizer_json_from_gguf(&gguf)?;

    std::fs::create_dir_all(out_dir).map_err(|source| GgufError::Io {
        path: out_dir.to_path_buf(),
        source,
    })?;
    let infos: Vec<&TensorInfo> = plan
        .iter()
        .map(|t| info(&gguf, t))
        .collect::<Result<_, _>>()?;
    let views = plan.iter().zip(&infos).map(|(t, ti)| {
        (
            t.name.clone(),
            LazyTensor {
                gguf: &gguf,
                t,
                ti,
                dtype,
            },
        )
    });
    let model_path = out_dir.join("model.safetensors");
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    // serialize_to_file writes a sibling temp file and renames it into place.
    safetensors::serialize_to_file(views, Some(metadata), &model_path).map_err(|e| {
        GgufError::Write {
            path: model_path.clone(),
            msg: e.to_string(),
        }
    })?;
    let model_bytes = std::fs::metadata(&model_path)
        .map_err(|source| GgufError::Io {
            path: model_path.clone(),
            source,
        })?
        .len();
    // The writer's temp file is created 0600; give the model the usual 0644 like the JSON files.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&model_path, std::fs::Permissions::from_mode(0o644)).map_err(
            |source| GgufError::Io {
                path: model_path.clone(),
                source,
            },
        )?;
    }

    let mut written = model_bytes;
    written += write_atomic(out_dir, "tokenizer.json", tokenizer.as_bytes())?;
    written += write_atomic(out_dir, "tokenizer_config.json", &json_bytes(&tok_config))?;
    written += write_atomic(out_dir, "generation_config.json", &json_bytes(&gen_config))?;
    // config.json last: its presence is what HF-directory loaders key on.
    written += write_atomic(out_dir, "config.json", &json_bytes(&config))?;

    Ok(ConvertSummary {
        tensors: plan.len(),
        model_bytes,
        bytes_written: written,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Output paths [`convert_gguf`] writes into `out_dir`.
pub fn converted_files(out_dir: &Path) -> Vec<PathBuf> {
    [
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ]
    .iter()
    .map(|n| out_dir.join(n))
    .collect()
}
