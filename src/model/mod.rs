//! The model: its normalised config, memory-mapped weights, and the forward pass.
//!
//! - [`config`]: HF `config.json` → [`Config`] (plain data, validated);
//! - [`weights`]: memory-mapped safetensors and typed views of every matrix;
//! - [`forward`]: [`Model`], [`RunState`], prefill and decode over a [`crate::cache::KvCache`];
//!   [`attention`]: decode, blocked prefill and slim attention over the ragged cache with β;
//!   [`batch`]: one decode step for many sequences (the server), bit-identical per sequence;
//! - [`rope`]: rotary embeddings; [`slim`]: Slim Attention's W_KV ([`slim_report`](mod@slim_report): per-layer
//!   outcome); [`synth`]: seeded checkpoints;
//! - [`identity`]: the dtype-independent fingerprint a cache file is checked against.

pub mod attention;
pub mod batch;
pub mod config;
pub mod forward;
pub mod identity;
pub mod rope;
pub mod slim;
pub mod slim_report;
pub mod synth;
pub mod weights;

pub use config::Config;
pub use forward::{Capture, Logits, Model, RunState, DEFAULT_MAX_BATCH};
pub use rope::rope_inv_freq;
pub use slim_report::slim_report;
