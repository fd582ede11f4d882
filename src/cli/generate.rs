//! `kvcompact generate`: stream text after a prompt, optionally from a compacted cache or with
//! a bounded cache (online compaction or streaming eviction).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};

use kvcompact::compact::registry::{self, Family};
use kvcompact::document::generation_tokens;
use kvcompact::generate::GenOptions;
use kvcompact::model::DEFAULT_MAX_BATCH;
use kvcompact::sampling::Sampler;
use kvcompact::tokenizer::TextStream;

use super::{enable_slim, model_dir, print_slim_cache, read_prompt, KvDtypeArg, ModelArg, PromptArg, SlimArg};

/// Generate text after a prompt, streaming it; ends with prefill and decode tokens/s.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub prompt: PromptArg,
    /// Wrap the prompt as a user message in the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (default: the template's own, if any).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep generating past end-of-sequence tokens (for fixed-length comparisons).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object instead of streaming text.
    #[arg(long)]
    pub json: bool,
    /// Start from a compacted cache saved by `kvcompact compact`; the prompt is then a question
    /// about that context (a new user turn when the cache was made in chat mode).
    #[arg(long)]
    pub cache: Option<PathBuf>,
    /// Bound the cache during generation: when a head holds this many rows, compress it.
    #[arg(long)]
    pub max_cache_tokens: Option<usize>,
    /// With --max-cache-tokens: how the cache is bounded. Attention Matching (am-highest,
    /// am-omp, ...) compacts all but the last --keep-recent rows by --ratio; qfilters and
    /// streaming-llm evict down to the budget, always keeping the last --window rows.
    #[arg(long, default_value = "am-highest")]
    pub method: String,
    /// Rows never compacted (online Attention Matching).
    #[arg(long, default_value_t = 20)]
    pub keep_recent: usize,
    /// Online Attention Matching: compacted rows keep about 1/ratio of the rows.
    #[arg(long, default_value_t = 5.0)]
    pub ratio: f64,
    /// Streaming eviction (qfilters, streaming-llm): recent rows always kept.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Streaming eviction: the first rows always kept (attention sinks).
    #[arg(long, default_value_t = 0)]
    pub sinks: usize,
    /// Q-Filters file (from `kvcompact qfilters calibrate`).
    #[arg(long)]
    pub filters: Option<PathBuf>,
    #[command(flatten)]
    pub slim: SlimArg,
    #[command(flatten)]
    pub kv: KvDtypeArg,
    #[command(flatten)]
    pub device: super::DeviceArg,
}

/// `kvcompact generate`.
pub fn run(a: Args) -> Result<()> {
    a.device.device.check()?;
    let mut sampler = Sampler::checked(a.temperature, a.top_p, a.seed)?;
    let text = read_prompt(&a.prompt)?;
    let dir = model_dir(&a.model)?;
    let (mut model, tok) = kvcompact::generate::load(&dir)?;
    if a.slim.slim && (a.cache.is_some() || a.max_cache_tokens.is_some()) {
        bail!("--slim cannot be combined with --cache or --max-cache-tokens: compaction and eviction work per KV head, while a slim layer's values are rebuilt from the keys of all heads");
    }
    model.set_kv_dtype(a.kv.kv_dtype)?; // first: slim refuses a bf16 cache before printing its report
    enable_slim(&mut model, &a.slim)?;
    let mut state = model.new_state(DEFAULT_MAX_BATCH);
    if a.slim.slim && a.device.device != kvcompact::device::Device::Cpu {
        bail!("--slim runs on the CPU only (drop --device cuda)");
    }
    state.use_device(a.device.device, model.config.n_layers)?;
    let (mut cache, cached_chat) = match &a.cache {
        Some(path) => {
            let loaded = kvcompact::cache::load_cache(path, &model.cache_id())?;
            (loaded.cache.into_dtype(model.kv_dtype()), Some(loaded.chat))
        }
        None => (model.new_cache(), None),
    };
    let ids = generation_tokens(&model, &tok, &text, a.chat, a.system.as_deref(), cached_chat.map(|c| (&cache, c)))?;
    let opts = GenOptions { max_tokens: a.max_tokens, stop_at_eos: !a.ignore_eos };
    let mut stream = TextStream::new();
    let stdout = std::io::stdout();
    let am_method;
    let mut online = None;
    let mut streaming = None;
    if let Some(n) = a.max_cache_tokens {
        if registry::family(&a.method)? == Family::AttentionMatching {
            am_method = registry::require_am(&a.method, "generate")?;
            let chat = a.chat || a.cache.is_some();
            let copts = kvcompact::document::CompactOptions { budget: kvcompact::compact::Budget::Ratio(a.ratio), seed: a.seed, ..Default::default() };
            online = Some(kvcompact::document::OnlineCompaction::new(&tok, &am_method, n, a.keep_recent, chat, copts)?);
        } else {
            if model.kv_dtype() != kvcompact::cache::KvDtype::F32 {
                bail!("--method {} (streaming eviction) reads f32 rows: drop --kv-dtype or use an Attention Matching method", a.method);
            }
            streaming = Some(kvcompact::compact::qfilters::streaming_policy(&a.method, a.filters.as_deref(), &model, n, a.window, a.sinks)?);
        }
    }
    let policy: Option<&mut dyn kvcompact::generate::CachePolicy> = match (online.as_mut(), streaming.as_mut()) {
        (Some(o), _) => Some(o),
        (None, Some(s)) => Some(s.as_mut()),
        _ => None,
    };
    let out = kvcompact::generate::generate_with_policy(&model, &mut state, &mut cache, &ids, &tok.eos_ids, &mut sampler, &opts, policy, |id| {
        if !a.json {
            let piece = stream.push(&tok, id)?;
            let mut lock = stdout.lock();
            let _ = lock.write_all(piece.as_bytes());
            let _ = lock.flush();
        }
        Ok(())
    })?;
    let text = tok.decode(&out.tokens, false)?;
    if a.json {
        let j = serde_json::json!({
            "tokens": out.tokens,
            "text": text,
            "prompt_tokens": out.prompt_tokens,
            "prefill_tok_s": out.prefill_tok_s(),
            "decode_tok_s": out.decode_tok_s(),
            "stop": out.stop,
            "kv_bytes": cache.bytes(),
            "slim": kvcompact::model::slim_report(&model, &cache),
        });
        println!("{j}");
    } else {
        println!();
        print_slim_cache(&model, &cache);
        if let Some(o) = &online {
            let secs: f64 = o.reports.iter().map(|r| r.total_seconds).sum();
            eprintln!("online compactions: {} ({:.1} s); cache now {} rows per head at most, logical length {}", o.reports.len(), secs, cache.max_len(), cache.next_pos());
        }
        eprintln!(
            "prefill: {} tokens, {:.1} tok/s | decode: {} tokens, {:.1} tok/s | stop: {}",
            out.prompt_tokens,
            out.prefill_tok_s(),
            out.tokens.len(),
            out.decode_tok_s(),
            out.stop
        );
    }
    Ok(())
}
