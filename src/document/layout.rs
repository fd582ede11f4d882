//! A context as the template before the article, the article, and the template after (spec §9).
//! New tokens continue at the logical length after the suffix.

use std::ops::Range;

use crate::cache::KvCache;
use crate::error::{Error, Result};
use crate::generate::{encode_prompt, render_prompt};
use crate::model::Model;
use crate::tokenizer::{Message, Tokenizer};

/// A context split into the template before the article, the article, and the template after.
#[derive(Debug, Clone)]
pub struct ContextLayout {
    /// Template tokens before the article (BOS, chat header and user-turn opening); kept verbatim.
    pub prefix: Vec<u32>,
    /// The article's tokens: the span that is compacted.
    pub article: Vec<u32>,
    /// Template tokens after the article (end of the user turn; empty without chat); kept verbatim.
    pub suffix: Vec<u32>,
    /// Rendered with the chat template (the article is a user message).
    pub chat: bool,
}

impl ContextLayout {
    /// Tokenize `text` as the article; with `chat`, inside a user turn of the model's template.
    pub fn build(tok: &Tokenizer, text: &str, chat: bool) -> Result<ContextLayout> {
        if text.trim().is_empty() {
            return Err(Error::Prompt("the context is empty".into()));
        }
        let article = tok.encode(text, false)?;
        if !chat {
            // BOS (or whatever the tokenizer adds to an empty string) is the only prefix.
            let prefix = tok.encode("", true)?;
            return Ok(ContextLayout { prefix, article, suffix: vec![], chat });
        }
        const MARK: &str = "\u{1}KVCOMPACT-ARTICLE\u{1}";
        let rendered = tok.render_chat(&[Message::new("user", MARK)], false)?;
        let at = rendered
            .find(MARK)
            .ok_or_else(|| Error::Tokenizer("the chat template dropped the user message".into()))?;
        let prefix = tok.encode(&rendered[..at], false)?;
        let suffix = tok.encode(&rendered[at + MARK.len()..], false)?;
        Ok(ContextLayout { prefix, article, suffix, chat })
    }

    /// The whole context: prefix, article, suffix.
    pub fn tokens(&self) -> Vec<u32> {
        [&self.prefix[..], &self.article[..], &self.suffix[..]].concat()
    }

    /// Tokens of the whole context.
    pub fn len(&self) -> usize {
        self.prefix.len() + self.article.len() + self.suffix.len()
    }

    /// True when the context has no tokens at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Rows of the article in a freshly prefilled cache.
    pub fn article_rows(&self) -> Range<usize> {
        self.prefix.len()..self.prefix.len() + self.article.len()
    }
}

/// Tokens that follow a context to ask `text`: a new user turn and the assistant header in chat
/// mode, or the raw text (after a blank line) otherwise.
pub fn followup_tokens(tok: &Tokenizer, chat: bool, text: &str) -> Result<Vec<u32>> {
    if !chat {
        return tok.encode(&format!("\n\n{text}"), false);
    }
    // The continuation is what the template adds when a turn is appended to a conversation.
    let a = Message::new("user", "A");
    let one = tok.render_chat(std::slice::from_ref(&a), false)?;
    let two = tok.render_chat(&[a, Message::new("user", text)], true)?;
    let cont = two
        .strip_prefix(&one)
        .ok_or_else(|| Error::Tokenizer("the chat template does not extend a conversation by appending".into()))?;
    tok.encode(cont, false)
}

/// The tokens a generation feeds the model for `text`: after a cached context (`cached`: the
/// cache and whether it was made in chat mode) the follow-up turn ([`followup_tokens`], `chat`
/// and `system` unused); otherwise the prompt rendered with `chat` and `system`. Checked to leave
/// room for at least one generated token. What `kvcompact generate` and the Python package run.
pub fn generation_tokens(model: &Model, tok: &Tokenizer, text: &str, chat: bool, system: Option<&str>, cached: Option<(&KvCache, bool)>) -> Result<Vec<u32>> {
    let Some((cache, cache_chat)) = cached else {
        let rendered = render_prompt(tok, text, chat, system)?;
        return encode_prompt(model, tok, &rendered, chat, 1);
    };
    let ids = followup_tokens(tok, cache_chat, text)?;
    let max = model.config.max_position_embeddings;
    if cache.next_pos() + ids.len() + 1 > max {
        return Err(Error::Prompt(format!("the cached context plus the prompt exceed the model's context of {max} tokens")));
    }
    Ok(ids)
}

/// Tokens that continue a context with whole chat turns (`messages`, then the assistant header):
/// what the template adds when those turns are appended to a conversation whose first turn is
/// the context. Without a chat template, the messages' texts on their own lines.
pub fn continuation_tokens(tok: &Tokenizer, chat: bool, messages: &[Message]) -> Result<Vec<u32>> {
    if !chat {
        let text: Vec<&str> = messages.iter().map(|m| m.content.as_str()).collect();
        return tok.encode(&format!("\n\n{}", text.join("\n")), false);
    }
    let a = Message::new("user", "A");
    let one = tok.render_chat(std::slice::from_ref(&a), false)?;
    let all: Vec<Message> = std::iter::once(a).chain(messages.iter().cloned()).collect();
    let two = tok.render_chat(&all, true)?;
    let cont = two
        .strip_prefix(&one)
        .ok_or_else(|| Error::Tokenizer("the chat template does not extend a conversation by appending".into()))?;
    tok.encode(cont, false)
}
