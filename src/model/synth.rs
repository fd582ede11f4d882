//! Synthetic Llama checkpoints with seeded random weights, for benchmarks at widths no small
//! real model has (e.g. full multi-head attention at d = 1024 for Slim Attention).
//!
//! Every weight is a real random value (uniform, variance 1/fan_in, norms 1): no zero pages,
//! so memory traffic and cache behaviour are those of a real checkpoint of the same shape.

use std::path::Path;

use crate::error::{Error, Result};
use crate::sampling::Rng;
use crate::tensor_file::{save_safetensors, OutTensor};

/// Shape and seed of a synthetic Llama checkpoint (recorded in its `config.json`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SynthSpec {
    /// `hidden_size` d; must split evenly into `heads` heads of even `head_dim`.
    pub hidden: usize,
    /// Query heads per layer.
    pub heads: usize,
    /// KV heads per layer; divides `heads` (equal to it for multi-head attention).
    pub kv_heads: usize,
    /// Number of decoder layers.
    pub layers: usize,
    /// MLP `intermediate_size`.
    pub ff: usize,
    /// Vocabulary size (embedding rows).
    pub vocab: usize,
    /// `max_position_embeddings`.
    pub max_pos: usize,
    /// Seed of the weight generator: same spec, same bytes.
    pub seed: u64,
}

/// Uniform values with variance `1 / fan_in` (or 1 when `fan_in` is 0).
fn random(n: usize, fan_in: usize, rng: &mut Rng) -> Vec<f32> {
    let a = if fan_in == 0 { 3f64.sqrt() } else { (3.0 / fan_in as f64).sqrt() };
    (0..n).map(|_| ((rng.next_f64() * 2.0 - 1.0) * a) as f32).collect()
}

/// Write `config.json` and `model.safetensors` (f32, tied embeddings) of a Llama model into
/// `dir`; returns the weight bytes written.
pub fn write_llama(dir: &Path, s: &SynthSpec) -> Result<usize> {
    if s.hidden == 0 || s.heads == 0 || s.kv_heads == 0 || !s.hidden.is_multiple_of(s.heads) || !s.heads.is_multiple_of(s.kv_heads) {
        return Err(Error::Invalid(format!(
            "synthetic model: hidden {} must split into {} heads, and heads into {} KV heads",
            s.hidden, s.heads, s.kv_heads
        )));
    }
    if !(s.hidden / s.heads).is_multiple_of(2) || s.layers == 0 || s.ff == 0 || s.vocab == 0 || s.max_pos == 0 {
        return Err(Error::Invalid("synthetic model: head_dim must be even and every size at least 1".into()));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let hd = s.hidden / s.heads;
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": s.hidden, "intermediate_size": s.ff, "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": hd,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": s.max_pos,
        "vocab_size": s.vocab, "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "float32", "kvcompact_synthetic": s,
    });
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).map_err(|e| Error::io(&path, e))?;

    let mut rng = Rng::new(s.seed);
    let (d, qd, kvd) = (s.hidden, s.heads * hd, s.kv_heads * hd);
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = vec![
        ("model.embed_tokens.weight".into(), vec![s.vocab, d], random(s.vocab * d, 0, &mut rng)),
        ("model.norm.weight".into(), vec![d], vec![1.0; d]),
    ];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", qd, d),
            ("self_attn.k_proj", kvd, d),
            ("self_attn.v_proj", kvd, d),
            ("self_attn.o_proj", d, qd),
            ("mlp.gate_proj", s.ff, d),
            ("mlp.up_proj", s.ff, d),
            ("mlp.down_proj", d, s.ff),
        ] {
            tensors.push((format!("{p}.{name}.weight"), vec![rows, cols], random(rows * cols, cols, &mut rng)));
        }
        tensors.push((format!("{p}.input_layernorm.weight"), vec![d], vec![1.0; d]));
        tensors.push((format!("{p}.post_attention_layernorm.weight"), vec![d], vec![1.0; d]));
    }
    let bytes = tensors.iter().map(|t| t.2.len() * 4).sum();
    let out: Vec<OutTensor> = tensors.iter().map(|(n, sh, v)| OutTensor::F32 { name: n, shape: sh.clone(), data: v }).collect();
    save_safetensors(&dir.join("model.safetensors"), &out, None)?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Logits, Model};

    #[test]
    fn synthetic_model_loads_and_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = SynthSpec { hidden: 32, heads: 4, kv_heads: 4, layers: 2, ff: 48, vocab: 50, max_pos: 64, seed: 3 };
        let bytes = write_llama(tmp.path(), &spec).unwrap();
        assert_eq!(bytes, 4 * (50 * 32 + 32 + 2 * (4 * 32 * 32 + 3 * 48 * 32 + 2 * 32)));
        let m = Model::load(tmp.path()).unwrap();
        let mut st = m.new_state(16);
        let mut c = m.new_cache();
        m.forward(&mut st, &mut c, &[3, 4, 5], Logits::Last).unwrap();
        assert!(st.logits.iter().all(|x| x.is_finite()) && st.logits.iter().any(|&x| x != 0.0));
        let bad = SynthSpec { heads: 5, ..spec };
        assert!(write_llama(tmp.path(), &bad).is_err());
    }
}
