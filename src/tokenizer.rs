//! Text in and out: the `tokenizers` crate on the model's `tokenizer.json`, special tokens from
//! `tokenizer_config.json` / `generation_config.json`, and the chat template.
//!
//! Chat prompts are rendered from the model's own Jinja template (as HF `apply_chat_template`
//! does) with minijinja, so SmolLM2's default system line and any other template detail come out
//! exactly as the model was trained. Models without a stored template get a built-in one chosen
//! from the vocabulary: Llama 3 headers, Qwen's ChatML with its default system line, or ChatML.

use std::path::Path;

use serde_json::Value;

use crate::model::config::{Arch, Config};
use crate::error::{Error, Result};

/// ChatML with no default system message (SmolLM-style models without a stored template).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Qwen2.x: ChatML, with Qwen's default system message when none is given.
pub const QWEN_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Llama 3.x instruct headers (without the tool-calling and date preamble of 3.1+).
pub const LLAMA3_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// One chat turn, as the chat template sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Message {
    /// `"system"`, `"user"` or `"assistant"` (passed to the template verbatim).
    pub role: String,
    /// The turn's text.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }
}

/// A model's tokenizer, special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// BOS token text (`tokenizer_config.json`, else the config's `bos_token_id`); given to the
    /// chat template.
    pub bos_token: Option<String>,
    /// EOS token text from `tokenizer_config.json`; given to the chat template.
    pub eos_token: Option<String>,
    /// Ids that end generation (config, generation_config and the template's end token).
    pub eos_ids: Vec<u32>,
    chat_template: Option<String>,
}

impl Tokenizer {
    /// Load `tokenizer.json` (required) and the special tokens and chat template from the other
    /// files of the model directory, falling back to a built-in template.
    pub fn load(dir: &Path, cfg: &Config) -> Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Tokenizer(format!("{} not found", path.display())));
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let tc = read_json_opt(&dir.join("tokenizer_config.json"))?;
        let gc = read_json_opt(&dir.join("generation_config.json"))?;
        let token_str = |v: Option<&Value>| -> Option<String> {
            match v? {
                Value::String(s) => Some(s.clone()),
                Value::Object(o) => o.get("content").and_then(Value::as_str).map(String::from),
                _ => None,
            }
        };
        let bos_token = token_str(tc.as_ref().and_then(|t| t.get("bos_token")))
            .or_else(|| cfg.bos_token_id.and_then(|id| inner.id_to_token(id)));
        let eos_token = token_str(tc.as_ref().and_then(|t| t.get("eos_token")));
        let chat_template = match tc.as_ref().and_then(|t| t.get("chat_template")) {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(String::from),
            _ => None,
        };
        // transformers ≥ 4.43 may keep the template in its own file instead.
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => {
                let p = dir.join("chat_template.jinja");
                if p.exists() { Some(std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?) } else { None }
            }
        };
        let mut eos_ids = cfg.eos_token_ids.clone();
        if let Some(g) = gc.as_ref().and_then(|g| g.get("eos_token_id")) {
            match g {
                // An id beyond u32 is no token of any vocabulary: skip it rather than wrap it onto one.
                Value::Number(n) => eos_ids.extend(n.as_u64().and_then(|x| u32::try_from(x).ok())),
                Value::Array(a) => eos_ids.extend(a.iter().filter_map(Value::as_u64).filter_map(|x| u32::try_from(x).ok())),
                _ => {}
            }
        }
        if let Some(id) = eos_token.as_deref().and_then(|t| inner.token_to_id(t)) {
            eos_ids.push(id);
        }
        eos_ids.sort_unstable();
        eos_ids.dedup();
        let chat_template = chat_template.or_else(|| builtin_template(cfg.arch, &inner).map(String::from));
        Ok(Tokenizer { inner, bos_token, eos_token, eos_ids, chat_template })
    }

    /// Token ids of `text`. `add_special` adds whatever the tokenizer's post-processor adds
    /// (BOS for Llama 3; nothing for SmolLM2), exactly as HF `tokenizer(text)` does.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` leaves special tokens out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    /// Number of tokens, added tokens included (may differ from the config's `vocab_size`).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token given by its exact text (added tokens included), if it exists.
    pub fn token_to_id(&self, t: &str) -> Option<u32> {
        self.inner.token_to_id(t)
    }

    /// Whether [`Tokenizer::render_chat`] can work (stored or built-in template).
    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some()
    }

    /// Render a conversation with the model's chat template (HF `apply_chat_template`).
    pub fn render_chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Tokenizer("this model has no chat template; run without --chat".into()))?;
        render_template(tpl, messages, add_generation_prompt, self.bos_token.as_deref().unwrap_or(""), self.eos_token.as_deref().unwrap_or(""))
    }
}

/// Render a Jinja chat template as transformers does (Python string methods via pycompat,
/// `raise_exception` as an error).
pub fn render_template(tpl: &str, messages: &[Message], add_generation_prompt: bool, bos: &str, eos: &str) -> Result<String> {
    let mut env = minijinja::Environment::new();
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    // A template is code from a stranger's model directory: bound its work and its output so a
    // loop ends with an error instead of hanging or filling memory.
    env.set_fuel(Some(TEMPLATE_FUEL));
    env.add_template("chat", tpl).map_err(|e| Error::Tokenizer(one_line(format!("chat template: {e}"))))?;
    let ctx = minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos,
        eos_token => eos,
    };
    let mut out = CappedWriter { buf: Vec::new(), cap: TEMPLATE_MAX_OUTPUT };
    env.get_template("chat")
        .and_then(|t| t.render_captured_to(ctx, &mut out).map(|_| ()))
        .map_err(|e| {
            if out.buf.len() >= out.cap {
                Error::Tokenizer(format!("chat template: the rendered prompt exceeds {} MiB", TEMPLATE_MAX_OUTPUT >> 20))
            } else {
                Error::Tokenizer(one_line(format!("chat template: {e}")))
            }
        })?;
    String::from_utf8(out.buf).map_err(|_| Error::Tokenizer("chat template: rendered text is not UTF-8".into()))
}

/// Template instructions one rendering may run (a long chat needs a few thousand per message).
const TEMPLATE_FUEL: u64 = 20_000_000;
/// Rendered bytes at most: far beyond any model's context, far below a machine's memory.
const TEMPLATE_MAX_OUTPUT: usize = 64 << 20;

/// Collects a rendering and refuses to grow past `cap` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    cap: usize,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + b.len() > self.cap {
            self.buf.resize(self.cap, 0);
            return Err(std::io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Template errors can quote several source lines; the project's errors are one line.
fn one_line(s: String) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Built-in template for a model that stores none, chosen from its vocabulary.
fn builtin_template(arch: Arch, tok: &tokenizers::Tokenizer) -> Option<&'static str> {
    if tok.token_to_id("<|start_header_id|>").is_some() {
        Some(LLAMA3_TEMPLATE)
    } else if tok.token_to_id("<|im_start|>").is_some() {
        Some(if arch == Arch::Qwen2 { QWEN_TEMPLATE } else { CHATML_TEMPLATE })
    } else {
        None
    }
}

fn read_json_opt(path: &Path) -> Result<Option<Value>> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::Tokenizer(format!("{}: not valid JSON: {e}", path.display())))
}

/// Emits the text of a growing token sequence piece by piece, holding back bytes that do not
/// yet form complete UTF-8 (byte-level BPE can split a character across tokens).
///
/// Each step decodes only the tokens since the last emitted piece plus one piece of context
/// (`prefix..`), so a long generation costs O(n), not O(n²); the context token keeps decoders
/// that treat a sequence's first token specially (a SentencePiece leading space) exact.
pub struct TextStream {
    ids: Vec<u32>,
    /// Start of the decoding window: the context before the unemitted tokens.
    prefix: usize,
    /// Tokens before this have been emitted.
    read: usize,
}

impl Default for TextStream {
    fn default() -> Self {
        Self::new()
    }
}

impl TextStream {
    /// A stream with no tokens yet.
    pub fn new() -> TextStream {
        TextStream { ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// Add a token; return the newly completed text, if any.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read], false)?;
        let text = tok.decode(&self.ids[self.prefix..], false)?;
        if text.ends_with('\u{FFFD}') || text.len() <= before.len() || !text.is_char_boundary(before.len()) || !text.starts_with(&before) {
            return Ok(String::new());
        }
        let new = text[before.len()..].to_string();
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streaming text equals decoding the whole sequence, multi-byte characters split across
    /// byte-level tokens included (the tiny golden tokenizer, and the default model's if present).
    #[test]
    fn text_stream_equals_whole_decode() {
        let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = "Grüße, 世界! Naïve café → 🦀🦀 ok. Zürich—Ωmega 😀 end\n  two  spaces";
        for dir in [repo.join("golden/tiny/llama-gqa"), repo.join("golden/tiny/mistral"), repo.join("models/smollm2-135m-instruct")] {
            if !dir.join("tokenizer.json").exists() {
                continue;
            }
            let cfg = Config::from_file(&dir.join("config.json")).unwrap();
            let tok = Tokenizer::load(&dir, &cfg).unwrap();
            let ids = tok.encode(&text.repeat(3), false).unwrap();
            let mut stream = TextStream::new();
            let mut out = String::new();
            for &id in &ids {
                out.push_str(&stream.push(&tok, id).unwrap());
            }
            assert_eq!(out, tok.decode(&ids, false).unwrap(), "{}", dir.display());
        }
    }

    fn conv() -> Vec<Message> {
        vec![Message::new("user", " Hi there ")]
    }

    #[test]
    fn builtin_templates_render_their_formats() {
        let l3 = render_template(LLAMA3_TEMPLATE, &conv(), true, "<|begin_of_text|>", "<|eot_id|>").unwrap();
        assert_eq!(
            l3,
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let q = render_template(QWEN_TEMPLATE, &conv(), true, "", "<|im_end|>").unwrap();
        assert_eq!(
            q,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n Hi there <|im_end|>\n<|im_start|>assistant\n"
        );
        let c = render_template(CHATML_TEMPLATE, &conv(), false, "", "").unwrap();
        assert_eq!(c, "<|im_start|>user\n Hi there <|im_end|>\n");
        // A system message replaces Qwen's default one.
        let sys = vec![Message::new("system", "S"), Message::new("user", "U")];
        let q = render_template(QWEN_TEMPLATE, &sys, false, "", "").unwrap();
        assert_eq!(q, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
    }

    #[test]
    fn template_errors_are_reported() {
        let e = render_template("{{ raise_exception('no system role') }}", &conv(), false, "", "").unwrap_err().to_string();
        assert!(e.contains("no system role"), "{e}");
        assert!(render_template("{% if %}", &conv(), false, "", "").is_err());
    }
}
