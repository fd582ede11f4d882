//! Property tests for hostile files (issue 15 item 4), on stable: arbitrary `config.json` values
//! and arbitrary small safetensors headers either load or give a one-line error — never a panic
//! or an abort. Seeded by proptest; each case is cheap, so many run in the normal suite.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use kvcompact::model::config::Config;
use kvcompact::model::Model;
use proptest::prelude::*;
use serde_json::{json, Value};

/// Integers that stress the size arithmetic: small, boundary and huge.
fn size() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..70).prop_map(|x| json!(x)),
        Just(json!(1u64 << 20)),
        Just(json!((1u64 << 32) + 1)),
        Just(json!(1u64 << 39)),
        Just(json!((1u64 << 40) - 1)),
        Just(json!(u64::MAX)),
        Just(json!(-1)),
        Just(json!(2.5)),
        Just(json!("64")),
        Just(Value::Null),
    ]
}

fn config() -> impl Strategy<Value = Value> {
    (
        size(),
        size(),
        size(),
        size(),
        size(),
        size(),
        size(),
        size(),
        prop_oneof![Just(json!(1e-5)), Just(json!(0.0)), Just(json!(-1.0)), Just(json!("x")), Just(Value::Null)],
        prop_oneof![Just(json!(10000.0)), Just(json!(0.5)), Just(json!(1e308)), Just(Value::Null)],
        prop_oneof![Just(json!("llama")), Just(json!("qwen2")), Just(json!("qwen3")), Just(json!("mistral")), Just(json!("bert"))],
    )
        .prop_map(|(h, i, l, nh, nkv, hd, v, mp, eps, theta, arch)| {
            json!({"model_type": arch, "hidden_size": h, "intermediate_size": i, "num_hidden_layers": l,
                "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": hd, "vocab_size": v,
                "max_position_embeddings": mp, "rms_norm_eps": eps, "rope_theta": theta})
        })
}

/// One line, no panic message.
fn one_line(e: &impl std::fmt::Display) -> bool {
    let s = e.to_string();
    !s.is_empty() && !s.contains('\n')
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn any_config_loads_or_errs(v in config()) {
        let r = catch_unwind(|| Config::from_json(&v, Path::new("config.json")));
        prop_assert!(r.is_ok(), "Config::from_json panicked on {v}");
        if let Ok(Err(e)) = &r {
            prop_assert!(one_line(e), "{e}");
        }
        if let Ok(Ok(c)) = &r {
            // A config that loads has sizes that fit.
            prop_assert!(c.n_heads.checked_mul(c.head_dim).is_some());
            prop_assert!(c.n_layers.checked_mul(c.kv_dim()).and_then(|x| x.checked_mul(8)).is_some());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// A model directory whose model.safetensors is a mutated copy of a real one (header bytes
    /// flipped, length fields rewritten, the file truncated) loads and runs, or errs — never panics.
    #[test]
    fn mutated_safetensors_load_or_err(at in 0usize..400, byte in any::<u8>(), cut in prop::option::of(0usize..2000), len in prop::option::of(any::<u64>())) {
        let src = common::golden("tiny/llama-gqa");
        let t = tempfile::tempdir().unwrap();
        for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
            if src.join(f).exists() {
                std::fs::copy(src.join(f), t.path().join(f)).unwrap();
            }
        }
        let mut bytes = std::fs::read(src.join("model.safetensors")).unwrap();
        if let Some(n) = len {
            bytes[..8].copy_from_slice(&n.to_le_bytes());
        }
        let at = at.min(bytes.len() - 1);
        bytes[at] ^= byte;
        if let Some(c) = cut {
            bytes.truncate(c.min(bytes.len()));
        }
        std::fs::write(t.path().join("model.safetensors"), &bytes).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            let m = Model::load(t.path())?;
            let mut st = m.new_state(4);
            let mut c = m.new_cache();
            m.forward(&mut st, &mut c, &[1, 2, 3], kvcompact::model::Logits::Last)
        }));
        prop_assert!(r.is_ok(), "panicked at byte {at} ^ {byte}, cut {cut:?}, len {len:?}");
        if let Ok(Err(e)) = r {
            prop_assert!(one_line(&e), "{e}");
        }
    }
}
