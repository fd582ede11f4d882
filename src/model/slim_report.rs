//! What a slim cache turned out to be, per layer, for the fronts' reports (`--json` output of
//! `generate` and `bench`).

use crate::cache::{KvCache, SlimMode};
use crate::model::Model;

/// The per-layer outcome of a slim cache (None for a normal cache), for JSON output.
pub fn slim_report(model: &Model, cache: &KvCache) -> serde_json::Value {
    let (Some(sw), Some(meta)) = (&model.slim, cache.slim_meta()) else {
        return serde_json::Value::Null;
    };
    let c = &model.config;
    // What bytes() would report for the same rows in a standard cache (keys, values, positions).
    let full = cache.max_len() * c.n_layers * c.n_kv_heads * (2 * c.head_dim * 4 + 4);
    serde_json::json!({
        "layers": sw.reports.iter().zip(&meta.modes).zip(&meta.val_err).map(|((r, m), e)| serde_json::json!({
            "layer": r.layer, "cond": r.cond, "max_abs_wkv": r.max_abs_wkv, "mode": m, "rebuild_rel_err": e,
            "reason": r.reason})).collect::<Vec<_>>(),
        "slim_layers": meta.modes.iter().filter(|&&m| m == SlimMode::Slim).count(),
        "validation_tokens": meta.val_tokens,
        "kv_bytes": cache.bytes(),
        "standard_kv_bytes": full,
    })
}
