//! kvcompact: a CPU reference implementation of KV-cache compression for Llama-family models.
//!
//! Layers of the crate, bottom up:
//! - [`config`]: the typed model config normalised from HF `config.json`;
//! - [`weights`]: memory-mapped safetensors and typed views of each weight matrix;
//! - [`gguf`]: GGUF reader and the GGUF → HF-directory converter; [`fetch`]: the default model;
//! - [`kv_cache`]: per-(layer, KV head) ragged storage with metadata kept apart;
//! - [`model`]: run state and the forward pass (prefill and decode);
//! - [`tokenizer`], [`sampling`]: text in and out, chat templates, greedy / top-p sampling;
//! - [`compare`]: the one tensor comparator used by every golden test.

pub mod compare;
pub mod compact;
pub mod config;
pub mod document;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod kv_cache;
pub mod linalg;
pub mod model;
pub mod qfilters;
pub mod sampling;
pub mod slim;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
