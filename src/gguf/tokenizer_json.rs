//! `tokenizer.json` from GGUF tokenizer metadata (byte-level BPE, `tokenizer.ggml.model == "gpt2"`).
//!
//! Built with the `tokenizers` crate itself and serialised with its pretty printer, so the file
//! is exactly what Python `tokenizers` 0.23 `Tokenizer.save()` writes for the same pieces (for
//! SmolLM2 it is byte-identical to the spec's Route B `tokenizer.json`).
//!
//! Pieces, following llama.cpp's pre-tokenizer names (`tokenizer.ggml.pre`):
//! - `smollm`: `Digits(individual_digits)` then `ByteLevel(add_prefix_space=false, use_regex=true)`;
//! - `gpt2` / `default` / absent: `ByteLevel` with the GPT-2 regex alone;
//! - the Llama-3 family: transformers' Llama-3 split regex, then `ByteLevel(use_regex=false)`;
//! - ByteLevel decoder, ByteLevel post-processor with `trim_offsets=false`;
//! - tokens of type 3 (control) are special added tokens, type 4 (user-defined) plain added tokens.

use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::reader::GgufFile;
use super::GgufError;

/// llama.cpp token types (`enum llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// transformers' `_LLAMA3_SPLIT` (integrations/gguf/gguf_tokenizer_mapping.py).
const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// GPT-2's byte → printable-char table (`bytes_to_unicode`).
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u8 {
        let printable =
            (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        table[b as usize] = if printable {
            b as char
        } else {
            let c = char::from_u32(256 + n).unwrap_or('\u{fffd}');
            n += 1;
            c
        };
    }
    table
}

fn tok_err(gguf: &GgufFile, msg: impl Into<String>) -> GgufError {
    GgufError::Tokenizer {
        path: gguf.path().to_path_buf(),
        msg: msg.into(),
    }
}

/// Build the tokenizer a GGUF file describes.
pub fn tokenizer_from_gguf(gguf: &GgufFile) -> Result<Tokenizer, GgufError> {
    let model = gguf.get_str("tokenizer.ggml.model")?.unwrap_or("");
    if model != "gpt2" {
        return Err(tok_err(
            gguf,
            format!(
                "tokenizer.ggml.model {model:?} is not supported (only byte-level BPE, \"gpt2\")"
            ),
        ));
    }
    let tokens = gguf
        .get_str_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| tok_err(gguf, "tokenizer.ggml.tokens is missing"))?;
    let merges = gguf
        .get_str_array("tokenizer.ggml.merges")?
        .ok_or_else(|| tok_err(gguf, "tokenizer.ggml.merges is missing"))?;
    let token_types = gguf
        .get_int_array("tokenizer.ggml.token_type")?
        .unwrap_or_default();
    if !token_types.is_empty() && token_types.len() != tokens.len() {
        return Err(tok_err(
            gguf,
            format!(
                "{} token types for {} tokens",
                token_types.len(),
                tokens.len()
            ),
        ));
    }
    if tokens.len() > u32::MAX as usize {
        return Err(tok_err(gguf, "more than 2^32 tokens"));
    }

    // Every real byte-level token is spelled in the byte alphabet; a token with other characters
    // (e.g. a literal space) is respelled byte by byte, as transformers does.
    let spelling = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let key = if in_alphabet(t) {
                (*t).to_string()
            } else {
                t.bytes().map(|b| spelling[b as usize]).collect()
            };
            (key, i as u32)
        })
        .collect();
    let merges: Vec<(String, String)> = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    tok_err(
                        gguf,
                        format!("merge {m:?} is not two symbols separated by a space"),
                    )
                })
        })
        .collect::<Result<_, _>>()?;

    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| tok_err(gguf, format!("BPE model: {e}")))?;
    let mut tok = Tokenizer::new(bpe);

    let pre = gguf.get_str("tokenizer.ggml.pre")?;
    let byte_level =
        |use_regex: bool| -> PreTokenizerWrapper { ByteLevel::new(false, true, use_regex).into() };
    let pre_tokenizer: PreTokenizerWrapper = match pre {
        Some("smollm") => Sequence::new(vec![Digits::new(true).into(), byte_level(true)]).into(),
        None | Some("default") | Some("gpt2") | Some("gpt-2") => byte_level(true),
        Some("llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "falcon3" | "dbrx") => {
            let split = Split::new(SplitPattern::Regex(LLAMA3_SPLIT.into()), SplitDelimiterBehavior::Isolated, false)
                .map_err(|e| tok_err(gguf, format!("split regex: {e}")))?;
            Sequence::new(vec![split.into(), byte_level(false)]).into()
        }
        Some(other) => {
            return Err(tok_err(
                gguf,
                format!("tokenizer.ggml.pre {other:?} is not supported (supported: smollm, gpt2, llama-bpe)"),
            ))
        }
    };
    tok.with_pre_tokenizer(Some(pre_tokenizer));
    tok.with_decoder(Some(ByteLevelDecoder::default()));
    tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));

    let typed = |want: i64| -> Vec<&str> {
        tokens
            .iter()
            .zip(&token_types)
            .filter(|&(t, &ty)| ty == want && in_alphabet(t))
            .map(|(t, _)| *t)
            .collect()
    };
    let special: Vec<AddedToken> = typed(TOKEN_TYPE_CONTROL)
        .into_iter()
        .map(|t| AddedToken::from(t, true).normalized(false))
        .collect();
    if !special.is_empty() {
        tok.add_special_tokens(special)
            .map_err(|e| tok_err(gguf, e.to_string()))?;
    }
    let user: Vec<AddedToken> = typed(TOKEN_TYPE_USER_DEFINED)
        .into_iter()
        .map(|t| AddedToken::from(t, false).normalized(false))
        .collect();
    if !user.is_empty() {
        tok.add_tokens(user)
            .map_err(|e| tok_err(gguf, e.to_string()))?;
    }
    Ok(tok)
}

/// The `tokenizer.json` text (pretty, as Python `Tokenizer.save` writes it).
pub fn tokenizer_json_from_gguf(gguf: &GgufFile) -> Result<String, GgufError> {
    tokenizer_from_gguf(gguf)?
        .to_string(true)
        .map_err(|e| tok_err(gguf, format!("serialise: {e}")))
}
