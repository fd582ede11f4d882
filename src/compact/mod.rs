//! KV compression methods, one (layer, KV head) at a time, all behind one trait.
//!
//! A method sees one head ([`HeadInput`], plus [`HeadContext`] for methods that score by
//! attention) and returns the rows it keeps ([`CompactedHead`]), sorted by position (spec §3.6).
//! The model-level drivers (`document`, `eval`) choose spans, budgets and queries, and call
//! [`compress_heads`] to run many heads in parallel. Every method is reachable by name through
//! [`registry`], the one door every front uses.
//!
//! | method | where | selection | β | values |
//! |---|---|---|---|---|
//! | `am-highest` (`am-hak`) | [`am`], [`am::highest`] | top-t of rms/max/mean attention | clamped LS + 2 PG, [e⁻³, e³] | least squares |
//! | `am-omp` | [`am`], [`am::omp`] | greedy pursuit on the mass matrix | clamped LS, [1e-12, e⁷], drop β < −7 | least squares |
//! | `baseline` | [`am`], [`am::highest`] | top-t of mean attention | none (β = prior bias) | V\[S\] |
//! | eviction baselines | [`evict`] (the frame + one file each) | top-t of a budget-independent score ([`Scorer`]) | prior bias | V\[S\] |
//! | `qfilters` | [`qfilters`] | −⟨k, f⟩ with calibrated filters | prior bias | V\[S\] |
//!
//! [`budget`] turns the three budget forms (ratio, kvpress compression ratio, rows) into rows;
//! [`oracle`] wraps one head in a safetensors file contract for other implementations;
//! [`quality`] measures a compressed head on held-out queries.
//!
//! Floors inside the room: [`budget`], [`head`] (data) ← [`method`] (traits) ← [`am`], [`evict`],
//! [`qfilters`] ← [`registry`] ← [`oracle`].

pub mod am;
pub mod budget;
pub mod evict;
pub mod head;
pub mod method;
pub mod oracle;
pub mod qfilters;
pub mod quality;
pub mod registry;

pub use am::{AmCompressor, AmConfig, BetaFit, BetaSolver, Precision, Score, Selector, ValueFit};
pub use budget::Budget;
pub use evict::{Evict, ExpectedAttention, H2o, KNorm, PyramidKv, RandomEvict, SnapKv, StreamingLlm, Tova};
pub use head::{head_seed, CompactedHead, FullHead, HeadContext, HeadInput, HeadStats, Observed};
pub use method::{compress_heads, Compressor, Protect, Scorer};
pub use quality::{evaluate_head, HeadEval};
pub use registry::{compressor_from_name, method_from_name, method_with, Family, MethodOptions, METHODS};
