//! Rotary position embeddings: HF's inverse frequencies (with linear and Llama-3 scaling) and a
//! single-vector rotation used by the methods that move keys between positions. The forward pass
//! applies RoPE in rotate-half layout with the kernels' `rope_rotate_half`.

use crate::model::config::{Config, RopeScaling};

/// HF's RoPE inverse frequencies, in f32 as transformers computes them, after scaling.
pub fn rope_inv_freq(c: &Config) -> Vec<f32> {
    let dim = c.head_dim;
    let base = c.rope_theta as f64;
    let mut inv: Vec<f32> = (0..dim / 2)
        .map(|i| {
            let e = (2 * i) as f32 / dim as f32;
            (1.0f64 / base.powf(e as f64)) as f32
        })
        .collect();
    match c.rope_scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor; // low frequency: fully interpolated
                } else if wavelen >= high_wavelen {
                    // medium: blend between interpolated and original
                    let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
    }
    inv
}

/// Rotate `x` `[d]` (rotate-half pairs (i, i + d/2)) by the RoPE angle of `pos`, or back by it
/// with `inverse`: pre-RoPE → post-RoPE and post → pre.
pub fn rope_rotate(x: &mut [f32], pos: u32, inv_freq: &[f32], inverse: bool) {
    let half = x.len() / 2;
    for j in 0..half.min(inv_freq.len()) {
        let a = (pos as f32 * inv_freq[j]) as f64;
        let (c, s) = (a.cos(), if inverse { -a.sin() } else { a.sin() });
        let (x0, x1) = (x[j] as f64, x[j + half] as f64);
        x[j] = (x0 * c - x1 * s) as f32;
        x[j + half] = (x1 * c + x0 * s) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use serde_json::json;

    fn cfg(scaling: serde_json::Value) -> Config {
        let v = json!({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 1, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "max_position_embeddings": 256, "vocab_size": 10,
            "rope_scaling": scaling});
        Config::from_json(&v, Path::new("c.json")).unwrap()
    }

    #[test]
    fn rope_inverse_frequencies_follow_hf() {
        let plain = rope_inv_freq(&cfg(serde_json::Value::Null));
        assert_eq!(plain.len(), 8);
        assert_eq!(plain[0], 1.0);
        approx::assert_relative_eq!(plain[1], 10000f32.powf(-2.0 / 16.0), max_relative = 1e-6);
        let lin = rope_inv_freq(&cfg(json!({"rope_type": "linear", "factor": 2.0})));
        for (a, b) in plain.iter().zip(&lin) {
            assert_eq!(*a / 2.0, *b);
        }
        // llama3: high frequencies untouched, lowest divided by the factor, medium in between.
        let l3 = rope_inv_freq(&cfg(json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})));
        assert_eq!(l3[0], plain[0]);
        assert_eq!(l3[7], plain[7] / 8.0);
        assert!(l3.iter().zip(&plain).any(|(a, b)| a < b && *a > b / 8.0));
    }

    #[test]
    fn rope_rotate_round_trips() {
        let inv = [1.0f32, 0.1, 0.01, 0.001];
        let x: Vec<f32> = (0..8).map(|i| i as f32 - 3.5).collect();
        let mut y = x.clone();
        rope_rotate(&mut y, 37, &inv, false);
        assert!(x.iter().zip(&y).any(|(a, b)| (a - b).abs() > 1e-3));
        rope_rotate(&mut y, 37, &inv, true);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
