//! [`press_context`]: a whole context through one kvpress press, as kvpress's pipeline runs it —
//! prefill the context (template prefix + article) from an empty cache, score every row with the
//! press, keep the press's rows, free the rest, then prefill the template's end of turn on the
//! compressed cache (kvpress prefills it with the question, after compression).
//!
//! `kvcompact compact --kvpress` and the Python `Model.compact(kvpress=True)` run it; so do
//! `observed-attention` and `kvzip` in every mode, which exist only with kvpress's semantics
//! (`registry::PRESS_METHODS`; [`runs_as_press`](crate::compact::registry::runs_as_press)
//! decides, [`press_from_name`](crate::compact::registry::press_from_name) builds the press).
//! Unlike [`super::compact_context`] there are no reference queries and no held-out errors: a press scores with the context's own queries (KVzip with its repeat pass),
//! and the template prefix is compressed with the article, as kvpress does.

use std::time::Instant;

use crate::cache::KvCache;
use crate::compact::evict::kvpress::{self, KvzipSetup, Press};
use crate::compact::evict::KvzipPrompts;
use crate::compact::Budget;
use crate::error::{Error, Result};
use crate::model::{Logits, Model, DEFAULT_MAX_BATCH};
use crate::tokenizer::{Message, Tokenizer};

use super::layout::ContextLayout;

/// What [`press_context`] did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PressReport {
    /// The press's registry name.
    pub method: String,
    /// Always true: the press ran with kvpress 0.5.5's semantics.
    pub kvpress: bool,
    /// The budget asked for.
    pub budget: Budget,
    /// The compression ratio the press got ([`Budget::compression_ratio`] of `compressed_tokens`).
    pub compression_ratio: f64,
    /// Tokens of the whole context: prefix + article + suffix.
    pub context_tokens: usize,
    /// Tokens the press compressed: the template prefix and the article.
    pub compressed_tokens: usize,
    /// Rows kept of the compressed tokens, per (layer, KV head), layer-major.
    pub kept_rows: Vec<usize>,
    /// Bytes of the uncompressed cache: K and V (f32) plus positions (u32).
    pub kv_bytes_before: usize,
    /// Bytes of the compressed cache ([`KvCache::bytes`]), end of turn included.
    pub kv_bytes_after: usize,
    /// Wall time of the context prefill.
    pub prefill_seconds: f64,
    /// Wall time of the scores (KVzip: its repeat passes included).
    pub score_seconds: f64,
    /// Wall time of the whole call.
    pub total_seconds: f64,
}

impl PressReport {
    /// What a cache file made by [`press_context`] records of how it was made (the CLI and the
    /// Python package write the same): the method, `kvpress: true`, the budget form, the
    /// compression ratio the press got, the seed and the context's length.
    pub fn cache_params(&self, seed: u64) -> serde_json::Value {
        let (form, value) = self.budget.entry();
        let mut p = serde_json::json!({"method": self.method, "kvpress": true, "press_compression_ratio": self.compression_ratio,
            "seed": seed, "context_tokens": self.context_tokens});
        p[form] = value;
        p
    }
}

/// The template's text after the user's content up to the assistant's turn, as kvpress's
/// pipeline splits it (KVzip repeats the context after it); `"\n"` without a chat template.
pub fn generation_suffix(tok: &Tokenizer, chat: bool) -> Result<Vec<u32>> {
    if !chat {
        return tok.encode("\n", false);
    }
    const MARK: &str = "\u{1}KVCOMPACT-CONTENT\u{1}";
    let rendered = tok.render_chat(&[Message::new("user", MARK)], true)?;
    let at = rendered.find(MARK).ok_or_else(|| Error::Tokenizer("the chat template dropped the user message".into()))?;
    tok.encode(&rendered[at + MARK.len()..], false)
}

/// Compress `layout`'s context with `press` at `budget` (a count per head of the prefix and the
/// article together; PyramidKV and KVzip take the matching compression ratio), kvpress's way.
pub fn press_context(model: &Model, tok: &Tokenizer, layout: &ContextLayout, press: &Press, budget: Budget) -> Result<(KvCache, PressReport)> {
    let t_all = Instant::now();
    budget.check()?;
    let c = &model.config;
    let (nl, nkv) = (c.n_layers, c.n_kv_heads);
    if layout.article.is_empty() {
        return Err(Error::Prompt("the context has no article tokens to compact".into()));
    }
    if layout.len() > c.max_position_embeddings {
        return Err(Error::Prompt(format!("the context has {} tokens, more than the model's {} positions", layout.len(), c.max_position_embeddings)));
    }
    let tokens: Vec<u32> = [&layout.prefix[..], &layout.article[..]].concat();
    let t = tokens.len();
    let r = budget.compression_ratio(t)?;
    let kvzip = match press {
        Press::KvZip(k) => {
            let setup = KvzipSetup { prefix_len: layout.prefix.len(), prompts: KvzipPrompts::new(tok, generation_suffix(tok, layout.chat)?)? };
            let passes = k.repeat_inputs(&setup.prompts, &tokens, setup.prefix_len);
            let longest = passes.iter().map(|(_, ids)| ids.len()).max().unwrap_or(0);
            if t + longest > c.max_position_embeddings {
                return Err(Error::Prompt(format!(
                    "kvzip: the context and its repeat pass ({t} + {longest} tokens) exceed the model's {} positions",
                    c.max_position_embeddings
                )));
            }
            Some(setup)
        }
        _ => None,
    };

    let tp = Instant::now();
    let pre = kvpress::prefill(model, &tokens)?;
    let prefill_seconds = tp.elapsed().as_secs_f64();
    let ts = Instant::now();
    let scores = pre.scores(model, press, kvzip.as_ref())?;
    let score_seconds = ts.elapsed().as_secs_f64();
    let kept = kvpress::keep(press, &scores, nl, nkv, r);
    let mut cache = pre.cache;
    kvpress::install(&mut cache, &kept)?;
    if !layout.suffix.is_empty() {
        let mut st = model.new_state(DEFAULT_MAX_BATCH);
        model.forward(&mut st, &mut cache, &layout.suffix, Logits::None)?;
    }
    cache.check()?;
    let report = PressReport {
        method: crate::compact::Scorer::name(press).to_string(),
        kvpress: true,
        budget,
        compression_ratio: r,
        context_tokens: layout.len(),
        compressed_tokens: t,
        kept_rows: kept.iter().map(Vec::len).collect(),
        kv_bytes_before: layout.len() * c.kv_bytes_per_token() + layout.len() * nl * nkv * 4,
        kv_bytes_after: cache.bytes(),
        prefill_seconds,
        score_seconds,
        total_seconds: t_all.elapsed().as_secs_f64(),
    };
    Ok((cache, report))
}
