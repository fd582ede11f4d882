//! The model config: HF `config.json` read as loose JSON, then normalised into one typed
//! [`Config`] that the rest of the crate trusts (every field present, every value checked).
//!
//! Reading through `serde_json::Value` rather than a derive lets us accept both spellings that
//! transformers writes (v4 `rope_theta` + `rope_scaling`, v5 `rope_parameters`) and name the
//! offending field in one line when something is missing.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Architectures whose forward pass we implement. They differ only in small switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `model_type: "llama"` (optional `attention_bias` / `mlp_bias`).
    Llama,
    /// `model_type: "mistral"`: Llama without biases, with an optional sliding window.
    Mistral,
    /// q/k/v projections carry biases.
    Qwen2,
    /// RMSNorm over each head's q and k (q_norm / k_norm) before RoPE.
    Qwen3,
}

impl Arch {
    /// The HF `model_type` string of this architecture.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Mistral => "mistral",
            Arch::Qwen2 => "qwen2",
            Arch::Qwen3 => "qwen3",
        }
    }
}

/// How RoPE frequencies are modified (HF `rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_type` "default" or no scaling given).
    None,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear {
        /// Divisor of every inverse frequency (> 0).
        factor: f32,
    },
    /// Llama 3.x: low frequencies divided by `factor`, high kept, a smooth ramp between.
    Llama3 {
        /// Divisor of the low (long-wavelength) frequencies (> 0).
        factor: f32,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are fully divided.
        low_freq_factor: f32,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept
        /// (> `low_freq_factor`).
        high_freq_factor: f32,
        /// The context length the model was pre-trained with (tokens).
        original_max_position_embeddings: usize,
    },
}

/// A normalised, validated model config (see the module docs). All sizes are positive.
#[derive(Debug, Clone)]
pub struct Config {
    /// Which forward-pass variant to run.
    pub arch: Arch,
    /// Residual stream width `d`.
    pub hidden_size: usize,
    /// MLP inner width (gate/up rows, down columns).
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub n_layers: usize,
    /// Query heads per layer.
    pub n_heads: usize,
    /// KV heads per layer; divides `n_heads` (equal to it without GQA).
    pub n_kv_heads: usize,
    /// Floats per head; even. `hidden_size / n_heads` unless the config gives `head_dim`.
    pub head_dim: usize,
    /// RMSNorm epsilon (> 0).
    pub rms_norm_eps: f32,
    /// RoPE base (> 1; 10000 when the config gives none).
    pub rope_theta: f32,
    /// How RoPE frequencies are scaled.
    pub rope_scaling: RopeScaling,
    /// The model's context length (tokens).
    pub max_position_embeddings: usize,
    /// Rows of the embedding table and of the LM head.
    pub vocab_size: usize,
    /// The LM head is the embedding table (a stored `lm_head.weight` is then ignored).
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections (Qwen2 always; Llama and Qwen3 when `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama and Qwen3 when `attention_bias`).
    pub o_bias: bool,
    /// Biases on gate/up/down (Llama `mlp_bias`).
    pub mlp_bias: bool,
    /// Per-head RMSNorm on q and k (Qwen3).
    pub qk_norm: bool,
    /// Keys further back than this many positions are invisible (Mistral v0.1 style).
    pub sliding_window: Option<usize>,
    /// Beginning-of-sequence token (the first id if the config lists several).
    pub bos_token_id: Option<u32>,
    /// Every token that ends generation (possibly empty).
    pub eos_token_ids: Vec<u32>,
}

impl Config {
    /// Query heads per KV head (GQA group size; 1 for multi-head attention).
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }
    /// Width of all query heads together, `n_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.n_heads * self.head_dim
    }
    /// Width of all KV heads together, `n_kv_heads * head_dim` (one K or V row of a token).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }
    /// Attention logit scale 1/√head_dim (all supported architectures use it).
    pub fn attn_scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }
    /// f32 KV-cache bytes one token costs across all layers and heads.
    pub fn kv_bytes_per_token(&self) -> usize {
        2 * self.n_layers * self.n_kv_heads * self.head_dim * 4
    }

    /// Read and normalise a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Config> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.into(),
            msg: format!("not valid JSON: {e}"),
        })?;
        Self::from_json(&v, path)
    }

    /// Normalise a parsed `config.json`. `path` is only used in error messages.
    pub fn from_json(v: &Value, path: &Path) -> Result<Config> {
        let err = |msg: String| Error::Config { path: path.into(), msg };
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| err("missing field \"model_type\"".into()))?;
        let arch = match model_type {
            "llama" => Arch::Llama,
            "mistral" => Arch::Mistral,
            "qwen2" => Arch::Qwen2,
            "qwen3" => Arch::Qwen3,
            other => {
                return Err(Error::UnknownArchitecture {
                    path: path.into(),
                    arch: other.to_string(),
                })
            }
        };
        let usize_field = |name: &str| -> Result<usize> {
            match v.get(name) {
                None | Some(Value::Null) => Err(err(format!("missing field {name:?}"))),
                Some(x) => x
                    .as_u64()
                    .filter(|&n| n > 0 && n < (1 << 40))
                    .map(|n| n as usize)
                    .ok_or_else(|| err(format!("field {name:?} must be a positive integer, got {x}"))),
            }
        };
        let opt_usize = |name: &str| -> Result<Option<usize>> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(_) => usize_field(name).map(Some),
            }
        };
        let opt_bool = |name: &str| -> Result<Option<bool>> {
            match v.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Bool(b)) => Ok(Some(*b)),
                Some(x) => Err(err(format!("field {name:?} must be a boolean, got {x}"))),
            }
        };
        let opt_f64 = |obj: &Value, name: &str| -> Result<Option<f64>> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(x) => x
                    .as_f64()
                    .filter(|f| f.is_finite())
                    .map(Some)
                    .ok_or_else(|| err(format!("field {name:?} must be a finite number, got {x}"))),
            }
        };

        let hidden_size = usize_field("hidden_size")?;
        let intermediate_size = usize_field("intermediate_size")?;
        let n_layers = usize_field("num_hidden_layers")?;
        let n_heads = usize_field("num_attention_heads")?;
        let n_kv_heads = opt_usize("num_key_value_heads")?.unwrap_or(n_heads);
        let head_dim = match opt_usize("head_dim")? {
            Some(h) => h,
            None => {
                if hidden_size % n_heads != 0 {
                    return Err(err(format!(
                        "hidden_size {hidden_size} is not divisible by num_attention_heads {n_heads} and head_dim is not given"
                    )));
                }
                hidden_size / n_heads
            }
        };
        if n_heads % n_kv_heads != 0 {
            return Err(err(format!(
                "num_attention_heads {n_heads} is not a multiple of num_key_value_heads {n_kv_heads}"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(err(format!("head_dim {head_dim} must be even for RoPE")));
        }
        let vocab_size = usize_field("vocab_size")?;
        let max_position_embeddings = usize_field("max_position_embeddings")?;
        let rms_norm_eps = opt_f64(v, "rms_norm_eps")?
            .ok_or_else(|| err("missing field \"rms_norm_eps\"".into()))?;
        if !(rms_norm_eps > 0.0) {
            return Err(err(format!("rms_norm_eps must be positive, got {rms_norm_eps}")));
        }

        let act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" && act != "swish" {
            return Err(err(format!("hidden_act {act:?} is not supported (only silu)")));
        }

        // RoPE: transformers v5 writes `rope_parameters` {rope_type, rope_theta, ...};
        // v4 writes `rope_theta` at top level and an optional `rope_scaling` object.
        let rope_params = match v.get("rope_parameters") {
            Some(p @ Value::Object(_)) => Some(p),
            _ => None,
        };
        let scaling_obj = rope_params.or(match v.get("rope_scaling") {
            Some(p @ Value::Object(_)) => Some(p),
            _ => None,
        });
        let rope_theta = opt_f64(v, "rope_theta")?
            .or(match rope_params {
                Some(p) => opt_f64(p, "rope_theta")?,
                None => None,
            })
            .unwrap_or(10000.0);
        if !(rope_theta > 1.0) {
            return Err(err(format!("rope_theta must be > 1, got {rope_theta}")));
        }
        let rope_scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(s) => {
                let ty = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(Value::as_str)
                    .unwrap_or("default");
                let factor = || -> Result<f32> {
                    let f = opt_f64(s, "factor")?
                        .ok_or_else(|| err(format!("rope scaling {ty:?} needs \"factor\"")))?;
                    if !(f > 0.0) {
                        return Err(err(format!("rope scaling factor must be positive, got {f}")));
                    }
                    Ok(f as f32)
                };
                match ty {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: factor()? },
                    "llama3" => {
                        let need = |name: &str| -> Result<f64> {
                            opt_f64(s, name)?
                                .ok_or_else(|| err(format!("llama3 rope scaling needs {name:?}")))
                        };
                        let low = need("low_freq_factor")? as f32;
                        let high = need("high_freq_factor")? as f32;
                        if !(high > low) {
                            return Err(err(format!(
                                "llama3 rope scaling needs high_freq_factor > low_freq_factor, got {high} and {low}"
                            )));
                        }
                        let orig = need("original_max_position_embeddings")?;
                        if !(orig >= 1.0) {
                            return Err(err("original_max_position_embeddings must be >= 1".into()));
                        }
                        RopeScaling::Llama3 {
                            factor: factor()?,
                            low_freq_factor: low,
                            high_freq_factor: high,
                            original_max_position_embeddings: orig as usize,
                        }
                    }
                    other => {
                        return Err(err(format!(
                            "rope scaling type {other:?} is not supported (default, linear, llama3)"
                        )))
                    }
                }
            }
        };

        let attention_bias = opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Llama => (attention_bias, attention_bias),
            Arch::Qwen3 => (attention_bias, attention_bias),
            Arch::Mistral => (false, false),
        };
        let mlp_bias = arch == Arch::Llama && opt_bool("mlp_bias")?.unwrap_or(false);

        let sliding_window = match arch {
            Arch::Mistral => opt_usize("sliding_window")?,
            // Qwen declares a window but only uses it when `use_sliding_window` is set.
            Arch::Qwen2 | Arch::Qwen3 => {
                if opt_bool("use_sliding_window")?.unwrap_or(false) {
                    return Err(err(
                        "use_sliding_window = true is not supported for qwen models".into(),
                    ));
                }
                None
            }
            Arch::Llama => None,
        };

        let token_ids = |name: &str| -> Result<Vec<u32>> {
            let as_id = |x: &Value| {
                x.as_u64()
                    .filter(|&n| n <= u32::MAX as u64)
                    .map(|n| n as u32)
                    .ok_or_else(|| err(format!("field {name:?} must hold token ids, got {x}")))
            };
            match v.get(name) {
                None | Some(Value::Null) => Ok(vec![]),
                Some(Value::Array(a)) => a.iter().map(as_id).collect(),
                Some(x) => Ok(vec![as_id(x)?]),
            }
        };
        // Every size the runtime derives must fit in usize: checked here once, so that later
        // products (q_dim, kv_dim, weight and KV bytes) can neither wrap nor overflow.
        let mul = |what: &str, a: usize, b: usize| a.checked_mul(b).ok_or_else(|| err(format!("{what} ({a} × {b}) overflows")));
        let q_dim = mul("num_attention_heads × head_dim", n_heads, head_dim)?;
        let kv_dim = mul("num_key_value_heads × head_dim", n_kv_heads, head_dim)?;
        let per_layer = [
            mul("q_proj size", q_dim, hidden_size)?,
            mul("k_proj size", kv_dim, hidden_size)?.checked_mul(2).ok_or_else(|| err("k/v_proj size overflows".into()))?,
            mul("o_proj size", hidden_size, q_dim)?,
            mul("mlp size", hidden_size, intermediate_size)?.checked_mul(3).ok_or_else(|| err("mlp size overflows".into()))?,
        ]
        .iter()
        .try_fold(0usize, |acc, &x| acc.checked_add(x))
        .ok_or_else(|| err("a layer's weight count overflows".into()))?;
        let embed = mul("vocab_size × hidden_size", vocab_size, hidden_size)?;
        mul("num_hidden_layers × a layer's weights", n_layers, per_layer)?
            .checked_add(embed.checked_mul(2).ok_or_else(|| err("embedding size overflows".into()))?)
            .and_then(|w| w.checked_mul(4))
            .ok_or_else(|| err("the model's weight bytes overflow".into()))?;
        mul("KV bytes per token", n_layers, kv_dim)?.checked_mul(8).ok_or_else(|| err("KV bytes per token overflow".into()))?;
        let bos_token_id = token_ids("bos_token_id")?.first().copied();
        let eos_token_ids = token_ids("eos_token_id")?;

        Ok(Config {
            arch,
            hidden_size,
            intermediate_size,
            n_layers,
            n_heads,
            n_kv_heads,
            head_dim,
            rms_norm_eps: rms_norm_eps as f32,
            rope_theta: rope_theta as f32,
            rope_scaling,
            max_position_embeddings,
            vocab_size,
            tie_word_embeddings: opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: arch == Arch::Qwen3,
            sliding_window,
            bos_token_id,
            eos_token_ids,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
               "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
               "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
               "vocab_size": 49152, "tie_word_embeddings": true, "eos_token_id": 2, "bos_token_id": 1})
    }

    #[test]
    fn smollm2_config_normalises() {
        let c = Config::from_json(&base(), Path::new("c.json")).unwrap();
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.group_size(), 3);
        assert_eq!(c.kv_bytes_per_token(), 46080);
        assert_eq!(c.eos_token_ids, vec![2]);
        assert!(c.tie_word_embeddings && !c.qkv_bias && !c.qk_norm);
    }

    #[test]
    fn v5_rope_parameters_are_read() {
        let mut v = base();
        v.as_object_mut().unwrap().remove("rope_theta");
        v["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let c = Config::from_json(&v, Path::new("c.json")).unwrap();
        assert_eq!(c.rope_theta, 500000.0);
        assert!(matches!(c.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let mut v = base();
        v["model_type"] = json!("gpt2");
        let e = Config::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("unsupported architecture \"gpt2\""), "{e}");

        let mut v = base();
        v.as_object_mut().unwrap().remove("hidden_size");
        let e = Config::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("missing field \"hidden_size\""), "{e}");

        let mut v = base();
        v["num_key_value_heads"] = json!(4);
        let e = Config::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("not a multiple"), "{e}");

        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let e = Config::from_json(&v, Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("\"yarn\" is not supported"), "{e}");
    }
}
