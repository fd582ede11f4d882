//! `kvcompact logits`: every position's logits of a raw prompt, for golden comparisons.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;

use kvcompact::generate::encode_prompt;
use kvcompact::model::{Logits, DEFAULT_MAX_BATCH};
use kvcompact::tensor_file::{save_safetensors, OutTensor};

use super::{model_dir, read_prompt, KvDtypeArg, ModelArg, PromptArg};

/// Write the tokens and every position's logits of a raw (untemplated) prompt.
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    #[command(flatten)]
    pub prompt: PromptArg,
    /// Output safetensors file: `tokens` i64 [T], `logits` f32 [T, vocab].
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub kv: KvDtypeArg,
}

/// `kvcompact logits`.
pub fn run(a: Args) -> Result<()> {
    let text = read_prompt(&a.prompt)?;
    let dir = model_dir(&a.model)?;
    let (mut model, tok) = kvcompact::generate::load(&dir)?;
    model.set_kv_dtype(a.kv.kv_dtype)?;
    let ids = encode_prompt(&model, &tok, &text, false, 0)?;
    let mut state = model.new_state(DEFAULT_MAX_BATCH);
    let mut cache = model.new_cache();
    let t0 = Instant::now();
    model.forward(&mut state, &mut cache, &ids, Logits::All)?;
    let secs = t0.elapsed().as_secs_f64();
    let tokens: Vec<i64> = ids.iter().map(|&t| t as i64).collect();
    let vocab = model.config.vocab_size;
    save_safetensors(
        &a.out,
        &[
            OutTensor::I64 { name: "tokens", shape: vec![tokens.len()], data: &tokens },
            OutTensor::F32 { name: "logits", shape: vec![ids.len(), vocab], data: &state.logits },
        ],
        None,
    )?;
    eprintln!("wrote {} ({} tokens × {} logits) in {:.2} s", a.out.display(), ids.len(), vocab, secs);
    Ok(())
}
