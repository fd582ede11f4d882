//! kvcompact: a CPU reference implementation of KV-cache compression for Llama-family models.
//!
//! The crate is a house of rooms, each using only the rooms below it (see ARCHITECTURE.md):
//! - fronts: [`serve`] (the OpenAI-compatible server; the command line is the binary);
//! - workflows: [`eval`] (the harness), [`document`] (document-level compaction);
//! - methods: [`compact`] (the per-head trait, Attention Matching, the eviction baselines,
//!   Q-Filters, the method registry and the compact-head oracle);
//! - model: [`model`] (config, weights, forward pass, RoPE, Slim Attention), [`cache`] (the
//!   ragged KV cache and its file format), [`generate`], [`sampling`], [`tokenizer`];
//! - ground: [`linalg`], [`gguf`], [`fetch`], [`tensor_file`], [`compare`], [`error`],
//!   [`progress`]; the SIMD kernels are the `kvcompact-kernels` crate.

#![deny(missing_docs)]
// `!(x >= lo)` is how input checks here reject NaN along with out-of-range values; the
// `partial_cmp` form clippy suggests reads worse for that.
#![allow(clippy::neg_cmp_op_on_partial_ord)]

pub mod cache;
pub mod compact;
pub mod compare;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod document;
pub mod error;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod gguf;
pub mod linalg;
pub mod model;
pub mod progress;
pub mod sampling;
pub mod serve;
pub mod tensor_file;
pub mod tokenizer;

pub use error::{Error, Result};
