//! The generation loop shared by the CLI and the tests: prefill the prompt, then decode one
//! token at a time, timing both phases separately.

use std::time::Instant;

use std::path::Path;

use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::model::{Logits, Model, RunState};
use crate::sampling::Sampler;
use crate::tokenizer::{Message, Tokenizer};

/// Load the model in `dir` and its tokenizer.
pub fn load(dir: &Path) -> Result<(Model, Tokenizer)> {
    let model = Model::load(dir)?;
    let tok = Tokenizer::load(dir, &model.config)?;
    Ok((model, tok))
}

/// The text `generate` feeds the model: with `chat`, an optional system turn, `text` as a user
/// turn and the assistant header, rendered with the model's chat template; otherwise `text`.
pub fn render_prompt(tok: &Tokenizer, text: &str, chat: bool, system: Option<&str>) -> Result<String> {
    if !chat {
        return Ok(text.to_string());
    }
    let mut msgs = Vec::new();
    if let Some(s) = system {
        msgs.push(Message::new("system", s));
    }
    msgs.push(Message::new("user", text));
    tok.render_chat(&msgs, true)
}

/// Tokenize a rendered prompt (adding the model's special tokens unless `chat`, whose template
/// already holds them) and check that it fits the model's context with `reserve` positions left.
pub fn encode_prompt(model: &Model, tok: &Tokenizer, text: &str, chat: bool, reserve: usize) -> Result<Vec<u32>> {
    let ids = tok.encode(text, !chat)?;
    if ids.is_empty() {
        return Err(Error::Invalid("the prompt is empty after tokenization".into()));
    }
    let max = model.config.max_position_embeddings;
    if ids.len() + reserve > max {
        return Err(Error::Invalid(format!(
            "the prompt has {} tokens; with {} to generate it exceeds the model's context of {} tokens",
            ids.len(),
            reserve,
            max
        )));
    }
    Ok(ids)
}

/// Limits of one [`generate`] call.
#[derive(Debug, Clone)]
pub struct GenOptions {
    /// Most tokens to generate (0: run nothing, not even the prompt).
    pub max_tokens: usize,
    /// Stop at an end-of-sequence id (the model's); goldens turn this off to compare N steps.
    pub stop_at_eos: bool,
}

/// What one [`generate`] call produced, with its timings.
#[derive(Debug, Clone, Default)]
pub struct GenOutput {
    /// Generated ids (the EOS id, if one ended generation, included).
    pub tokens: Vec<u32>,
    /// Length of the prompt passed in (not counting what the cache already held).
    pub prompt_tokens: usize,
    /// Wall-clock seconds of the prompt's forward pass (and the policy call after it).
    pub prefill_secs: f64,
    /// Wall-clock seconds of the decode loop (sampling, callbacks and policy calls included).
    pub decode_secs: f64,
    /// Why generation stopped: "eos", "max_tokens" or "context_full".
    pub stop: &'static str,
}

impl GenOutput {
    /// Prompt tokens per second of prefill (0 if no time was measured).
    pub fn prefill_tok_s(&self) -> f64 {
        rate(self.prompt_tokens, self.prefill_secs)
    }
    /// Decode rate over the tokens that needed a decode step (the first comes from prefill).
    pub fn decode_tok_s(&self) -> f64 {
        rate(self.tokens.len().saturating_sub(1), self.decode_secs)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 { n as f64 / secs } else { 0.0 }
}

/// A cache manager consulted during generation (streaming eviction, online compaction).
pub trait CachePolicy {
    /// Called after the prompt and after every decode step, once the new rows are in `cache`;
    /// `tokens` is the whole sequence so far (prompt and generated). May shrink the cache in
    /// place; the logical counter must not move.
    fn after_step(&mut self, model: &Model, cache: &mut KvCache, tokens: &[u32]) -> Result<()>;
}

/// Generate after `prompt` (appended to whatever `cache` already holds). `on_token` sees each
/// new id as it is chosen (for streaming); returning an error stops generation with it.
#[allow(clippy::too_many_arguments)]
pub fn generate(
    model: &Model,
    state: &mut RunState,
    cache: &mut KvCache,
    prompt: &[u32],
    eos_ids: &[u32],
    sampler: &mut Sampler,
    opts: &GenOptions,
    on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenOutput> {
    generate_with_policy(model, state, cache, prompt, eos_ids, sampler, opts, None, on_token)
}

/// [`generate`] with a [`CachePolicy`] applied after the prompt and after every step.
#[allow(clippy::too_many_arguments)]
pub fn generate_with_policy(
    model: &Model,
    state: &mut RunState,
    cache: &mut KvCache,
    prompt: &[u32],
    eos_ids: &[u32],
    sampler: &mut Sampler,
    opts: &GenOptions,
    mut policy: Option<&mut dyn CachePolicy>,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenOutput> {
    if prompt.is_empty() {
        return Err(Error::Prompt("the prompt is empty".into()));
    }
    let max_pos = model.config.max_position_embeddings;
    let mut out = GenOutput { prompt_tokens: prompt.len(), stop: "max_tokens", ..Default::default() };
    if opts.max_tokens == 0 {
        return Ok(out);
    }
    let mut seq: Vec<u32> = prompt.to_vec();
    let t0 = Instant::now();
    model.forward(state, cache, prompt, Logits::Last)?;
    if let Some(p) = policy.as_deref_mut() {
        p.after_step(model, cache, &seq)?;
    }
    out.prefill_secs = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    loop {
        let next = sampler.sample(&state.logits);
        out.tokens.push(next);
        on_token(next)?;
        if opts.stop_at_eos && eos_ids.contains(&next) {
            out.stop = "eos";
            break;
        }
        if out.tokens.len() >= opts.max_tokens {
            break;
        }
        if cache.next_pos() >= max_pos {
            out.stop = "context_full";
            break;
        }
        model.forward(state, cache, &[next], Logits::Last)?;
        seq.push(next);
        if let Some(p) = policy.as_deref_mut() {
            p.after_step(model, cache, &seq)?;
        }
    }
    out.decode_secs = t1.elapsed().as_secs_f64();
    Ok(out)
}
