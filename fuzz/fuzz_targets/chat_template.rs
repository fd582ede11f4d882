//! A chat template from strangers (`tokenizer_config.json`'s `chat_template`):
//! `[template len][template][user message]` → render. A template that loops, recurses or
//! raises must end with a one-line error, not hang or exhaust memory.
#![no_main]
use kvcompact::tokenizer::{render_template, Message};
use kvcompact_fuzz::{check_error, split};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (tpl, msg) = split(data);
    let (Ok(tpl), Ok(msg)) = (std::str::from_utf8(tpl), std::str::from_utf8(msg)) else { return };
    let messages = [Message::new("system", "You are terse."), Message::new("user", msg), Message::new("assistant", "ok")];
    for add_generation_prompt in [false, true] {
        if let Err(e) = render_template(tpl, &messages, add_generation_prompt, "<s>", "</s>") {
            check_error(&e);
        }
    }
});
