//! The compacted-cache file: a safetensors file with, per (layer, KV head),
//! `layer{l}.head{h}.{keys,values,beta,positions}`, and the model's identity, logical length,
//! chat flag and method parameters as metadata. A cache is only loaded into the model it was
//! made for (checked by fingerprint).

use std::collections::HashMap;
use std::path::Path;

use super::kv_cache::{HeadRows, KvCache};
use crate::error::{Error, Result};
use crate::tensor_file::{load_safetensors, save_safetensors, OutTensor, TensorData};


/// Format tag of compacted cache files.
pub const CACHE_FORMAT: &str = "kvcompact-cache-v1";

/// Largest |key| or |value| a loaded cache may hold. Real caches stay below ~1e3 and the
/// official AM recipe's worst fitted values reach ~1e13; above ~1e16 the f32 residual stream's
/// RMS norm overflows after one attention output.
pub const MAX_ROW_ABS: f32 = 1e15;
/// Largest |β|: fitted biases live in [ln 1e-12, 7] ≈ [−27.6, 7]; priors are logits.
pub const MAX_BETA_ABS: f32 = 1e4;

/// What a cache file records of the model it was made for, and checks when it is loaded
/// ([`crate::model::Model::cache_id`] builds it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelId {
    /// Dtype-independent fingerprint of the config and weights.
    pub fingerprint: String,
    /// Where the model was loaded from (shown when a cache is refused).
    pub dir: String,
    /// Number of transformer layers; must match the cache's.
    pub n_layers: usize,
    /// KV heads per layer; must match the cache's.
    pub n_kv_heads: usize,
    /// Floats per key / value row; must match the cache's.
    pub head_dim: usize,
    /// The model's context: a cache's logical length may not exceed it.
    pub max_positions: usize,
}

/// Save a (compacted) cache: per head `layer{l}.head{h}.{keys,values,beta,positions}` and the
/// model identity, logical length, chat flag and method parameters as metadata.
pub fn save_cache(path: &Path, model: &ModelId, cache: &KvCache, chat: bool, params: &serde_json::Value) -> Result<()> {
    let (nl, nkv, hd) = (cache.n_layers, cache.n_kv_heads, cache.head_dim);
    let mut names = Vec::new();
    let mut betas = Vec::new();
    let mut poss = Vec::new();
    for l in 0..nl {
        for h in 0..nkv {
            names.push(format!("layer{l}.head{h}"));
            let m = cache.meta(l, h);
            betas.push(m.bias.clone().unwrap_or_else(|| vec![0.0; m.len()]));
            poss.push(m.positions.iter().map(|&p| p as i64).collect::<Vec<i64>>());
        }
    }
    let keys: Vec<String> = names.iter().map(|n| format!("{n}.keys")).collect();
    let vals: Vec<String> = names.iter().map(|n| format!("{n}.values")).collect();
    let bets: Vec<String> = names.iter().map(|n| format!("{n}.beta")).collect();
    let psn: Vec<String> = names.iter().map(|n| format!("{n}.positions")).collect();
    // Rows as f32 (a bf16 cache widened exactly; loading and converting back gives the same bits).
    let wide: Vec<std::borrow::Cow<[f32]>> =
        (0..nl * nkv).flat_map(|i| {
            let s = cache.store(i / nkv, i % nkv);
            [s.keys.to_f32(), s.values.to_f32()]
        }).collect();
    let mut out = Vec::new();
    for i in 0..nl * nkv {
        let (l, h) = (i / nkv, i % nkv);
        let n = cache.len(l, h);
        out.push(OutTensor::F32 { name: &keys[i], shape: vec![n, hd], data: &wide[2 * i] });
        out.push(OutTensor::F32 { name: &vals[i], shape: vec![n, hd], data: &wide[2 * i + 1] });
        out.push(OutTensor::F32 { name: &bets[i], shape: vec![n], data: &betas[i] });
        out.push(OutTensor::I64 { name: &psn[i], shape: vec![n], data: &poss[i] });
    }
    let mut meta = HashMap::new();
    meta.insert("format".into(), CACHE_FORMAT.into());
    meta.insert("model_fingerprint".into(), model.fingerprint.clone());
    meta.insert("model_dir".into(), model.dir.clone());
    meta.insert("n_layers".into(), nl.to_string());
    meta.insert("n_kv_heads".into(), nkv.to_string());
    meta.insert("head_dim".into(), hd.to_string());
    meta.insert("logical_len".into(), cache.next_pos().to_string());
    meta.insert("chat".into(), chat.to_string());
    meta.insert("params".into(), params.to_string());
    meta.insert("kvcompact_version".into(), env!("CARGO_PKG_VERSION").into());
    save_safetensors(path, &out, Some(meta))
}

/// A cache loaded from a file, with what it says about itself.
pub struct LoadedCache {
    /// The cache, checked, with its logical length (`next_pos`) restored.
    pub cache: KvCache,
    /// Whether the cached context was built with the chat template (`false` if unrecorded).
    pub chat: bool,
    /// The compaction method's parameters as saved (`Null` if missing or unparsable).
    pub params: serde_json::Value,
}

/// Load a cache saved by [`save_cache`], refusing one made for a different model.
pub fn load_cache(path: &Path, model: &ModelId) -> Result<LoadedCache> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bad = |msg: String| Error::Invalid(format!("{}: {msg}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors { path: path.into(), msg: e.to_string() })?;
    let md = meta.metadata().clone().unwrap_or_default();
    let get = |k: &str| md.get(k).cloned().ok_or_else(|| bad(format!("not a kvcompact cache (no {k:?} metadata)")));
    if get("format")? != CACHE_FORMAT {
        return Err(bad(format!("unknown cache format {:?}", get("format")?)));
    }
    let fp = get("model_fingerprint")?;
    if fp != model.fingerprint {
        return Err(bad(format!(
            "this cache was made for a different model ({}); load that model with --model",
            md.get("model_dir").map(String::as_str).unwrap_or("unknown")
        )));
    }
    let num = |k: &str| -> Result<usize> { get(k)?.parse::<usize>().map_err(|_| bad(format!("metadata {k} is not a number"))) };
    let (nl, nkv, hd, logical) = (num("n_layers")?, num("n_kv_heads")?, num("head_dim")?, num("logical_len")?);
    if (nl, nkv, hd) != (model.n_layers, model.n_kv_heads, model.head_dim) {
        return Err(bad("cache shape does not match the model".into()));
    }
    if logical > model.max_positions {
        return Err(bad(format!("logical length {logical} exceeds the model's context")));
    }
    let tensors = load_safetensors(path)?;
    let mut cache = KvCache::new(nl, nkv, hd);
    cache.advance(logical);
    for l in 0..nl {
        for h in 0..nkv {
            let n = format!("layer{l}.head{h}");
            let f = |suffix: &str| -> Result<Vec<f32>> {
                match tensors.get(&format!("{n}.{suffix}")) {
                    Some((_, TensorData::F32(v))) => Ok(v.clone()),
                    _ => Err(bad(format!("missing or non-f32 tensor {n}.{suffix}"))),
                }
            };
            let positions: Vec<u32> = match tensors.get(&format!("{n}.positions")) {
                Some((_, TensorData::I64(v))) => v
                    .iter()
                    .map(|&p| u32::try_from(p).map_err(|_| bad(format!("{n}.positions has an invalid position {p}"))))
                    .collect::<Result<_>>()?,
                _ => return Err(bad(format!("missing or non-integer tensor {n}.positions"))),
            };
            let (keys, values, beta) = (f("keys")?, f("values")?, f("beta")?);
            if keys.iter().chain(&values).chain(&beta).any(|x| !x.is_finite()) {
                return Err(bad(format!("{n} holds NaN or infinite values")));
            }
            // Finite is not enough: keys of 1e38 overflow the attention logits and values of 1e38
            // the residual stream, so the next token's logits come out NaN (found by fuzzing).
            for (what, v, limit) in [("keys", &keys, MAX_ROW_ABS), ("values", &values, MAX_ROW_ABS), ("beta", &beta, MAX_BETA_ABS)] {
                if let Some(x) = v.iter().find(|x| x.abs() > limit) {
                    return Err(bad(format!("{n}.{what} holds {x:e}, beyond any real cache (|x| ≤ {limit:e}): the file is corrupt")));
                }
            }
            cache.replace_head(l, h, HeadRows { keys, values, positions, bias: Some(beta) }).map_err(|e| bad(e.to_string()))?;
        }
    }
    cache.check()?;
    let chat = md.get("chat").is_some_and(|v| v == "true");
    let params = md.get("params").and_then(|p| serde_json::from_str(p).ok()).unwrap_or(serde_json::Value::Null);
    Ok(LoadedCache { cache, chat, params })
}

