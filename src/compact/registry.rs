//! Every compression method by its CLI name (the list), as one [`Compressor`].
//!
//! | name | what | file |
//! |---|---|---|
//! | `am-omp`, `am-highest`, `baseline` | Attention Matching family | [`super::am`] |
//! | `qfilters` | −⟨k, f⟩ with calibrated filters | [`super::qfilters`] |
//! | `streaming-llm` | 4 sinks + most recent | [`super::evict::streaming_llm`] |
//! | `h2o` | accumulated causal attention, 50 % recent | [`super::evict::h2o`] |
//! | `snapkv` | last-64-query window, avg pool 5 | [`super::evict::snapkv`] |
//! | `pyramidkv` | SnapKV with linearly falling layer budgets (β = 20) | [`super::evict::pyramidkv`] |
//! | `tova` | last token's attention, averaged over the layer | [`super::evict::tova`] |
//! | `knorm` | −‖k‖ | [`super::evict::knorm`] |
//! | `expected-attention` | Gaussian future-query attention × ‖v‖ | [`super::evict::expected_attention`] |
//! | `random` | seeded uniform | [`super::evict::random`] |
//! | `observed-attention` | kvpress `ObservedAttentionPress`: causal attention received / (T − j) | [`super::evict::observed_attention`] |
//! | `kvzip` | kvpress `KVzipPress`: max attention received in "repeat the context" passes | [`super::evict::kvzip`] |
//!
//! With [`MethodOptions::kvpress`] an eviction name builds the kvpress 0.5.5 press of that name
//! ([`Press::from_name`]) instead of the paper-faithful default.
//!
//! `full` (no compression) is a name the evaluation understands, not a compressor.
//!
//! This is the one door: every command (`compact`, `compact-head`, `demo`, `budgets`,
//! `generate --max-cache-tokens`, `eval`) resolves `--method` here, so a name means the same
//! thing everywhere. A command that cannot yet run a family refuses it with [`require_am`]'s
//! message instead of calling the name unknown.

use std::sync::Arc;

use super::am::{AmCompressor, AmConfig};
use super::evict::{Evict, ExpectedAttention, H2o, KNorm, KvZip, ObservedAttention, Press, PyramidKv, RandomEvict, SnapKv, StreamingLlm, Tova};
use super::method::Compressor;
use super::qfilters::{QFilterScorer, QFilters};
use crate::{Error, Result};

/// Every method name `kvcompact eval` accepts, in the order results are reported.
pub const METHODS: &[&str] = &[
    "am-omp",
    "am-highest",
    "am-omp-seeded",
    "baseline",
    "qfilters",
    "streaming-llm",
    "h2o",
    "snapkv",
    "pyramidkv",
    "tova",
    "knorm",
    "expected-attention",
    "random",
    "observed-attention",
    "kvzip",
    "full",
];

/// The names that exist only with kvpress's semantics (`ObservedAttentionPress`, `KVzipPress`):
/// they score with a whole prefilled context (KVzip with its "repeat the context" pass), so a
/// whole-context command (`compact`, `Model.compact`) runs them as presses, and the evaluation
/// gives them the context's own queries (KVzip its repeat pass).
pub const PRESS_METHODS: &[&str] = &["observed-attention", "kvzip"];

/// The Attention Matching names, aliases included (see [`AmConfig::from_name`]).
pub const AM_METHODS: &[&str] = &["am-omp", "am-highest", "am-omp-fast", "am-omp-seeded", "baseline"];

/// What kind of method a name is; decides what a command can do with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Fitted β and values from reference queries (`am-*`, `baseline`).
    AttentionMatching,
    /// Keep rows by a budget-independent score (the baselines and `qfilters`).
    Eviction,
    /// No compression (a reference point of the evaluation).
    Full,
}

/// The family of a method name, or a one-line error listing every name.
pub fn family(name: &str) -> Result<Family> {
    if name == "full" {
        return Ok(Family::Full);
    }
    if AmConfig::from_name(name).is_ok() {
        return Ok(Family::AttentionMatching);
    }
    if METHODS.contains(&name) {
        return Ok(Family::Eviction);
    }
    Err(Error::Invalid(format!("unknown method {name:?} (expected one of {}, am-omp-fast)", METHODS.join(", "))))
}

/// Whether `name` is an Attention Matching method (fitted β / values, reference queries).
pub fn is_am(name: &str) -> bool {
    matches!(family(name), Ok(Family::AttentionMatching))
}

/// The Attention Matching method `name` for `command`, which fits with reference queries; an
/// eviction name or `full` is refused with a one-line error that says where it does run.
pub fn require_am(name: &str, command: &str) -> Result<AmCompressor> {
    match family(name)? {
        Family::AttentionMatching => compressor_from_name(name),
        Family::Eviction => Err(Error::Invalid(format!(
            "`kvcompact {command}` runs the Attention Matching methods ({}); {name:?} is an eviction method: `kvcompact eval --methods {name}` runs it",
            AM_METHODS.join(", ")
        ))),
        Family::Full => Err(Error::Invalid(format!("`kvcompact {command}` compacts a cache; \"full\" keeps it whole"))),
    }
}


/// Inputs some methods need to be built.
#[derive(Debug, Clone, Default)]
pub struct MethodOptions {
    /// Q-Filters filters (required by `qfilters`).
    pub filters: Option<Arc<QFilters>>,
    /// kvpress semantics: an eviction name builds kvpress 0.5.5's press of that name
    /// ([`Press::from_name`]); `h2o` and `qfilters` have none and are refused.
    pub kvpress: bool,
    /// `RandomPress`'s seed under `kvpress`.
    pub seed: u64,
}

/// The kvpress 0.5.5 press of an eviction name (kvpress's defaults; `seed` is `RandomPress`'s);
/// an Attention Matching name, `full`, `h2o` or `qfilters` is a one-line error.
pub fn press_from_name(name: &str, seed: u64) -> Result<Press> {
    match family(name)? {
        Family::Eviction => Press::from_name(name, seed),
        Family::AttentionMatching => Err(Error::Invalid(format!("--kvpress applies to eviction baselines; {name:?} is an Attention Matching method"))),
        Family::Full => Err(Error::Invalid("\"full\" keeps the whole cache; it is not a compressor".into())),
    }
}

/// Whether a whole-context command (`compact`, `Model.compact`) runs `name` as a kvpress press
/// ([`crate::document::press_context`]): every eviction name under `kvpress`, and
/// [`PRESS_METHODS`] always (they exist only with kvpress's semantics).
pub fn runs_as_press(name: &str, kvpress: bool) -> bool {
    kvpress || PRESS_METHODS.contains(&name)
}

/// Build a method from its name (`qfilters` needs [`method_with`] and filters).
pub fn method_from_name(name: &str) -> Result<Box<dyn Compressor>> {
    method_with(name, &MethodOptions::default())
}

/// Build a method from its name with the given options.
pub fn method_with(name: &str, opts: &MethodOptions) -> Result<Box<dyn Compressor>> {
    if opts.kvpress {
        return Ok(Box::new(Evict(press_from_name(name, opts.seed)?)));
    }
    Ok(match name {
        "qfilters" => {
            let f = opts.filters.clone().ok_or_else(|| Error::Invalid("qfilters needs calibrated filters (kvcompact qfilters calibrate)".into()))?;
            Box::new(Evict(QFilterScorer::new(f)))
        }
        "streaming-llm" => Box::new(Evict(StreamingLlm::default())),
        "h2o" => Box::new(Evict(H2o::default())),
        "snapkv" => Box::new(Evict(SnapKv::default())),
        "pyramidkv" => Box::new(Evict(PyramidKv::default())),
        "tova" => Box::new(Evict(Tova)),
        "knorm" => Box::new(Evict(KNorm)),
        "expected-attention" => Box::new(Evict(ExpectedAttention::default())),
        "random" => Box::new(Evict(RandomEvict)),
        "observed-attention" => Box::new(Evict(ObservedAttention)),
        "kvzip" => Box::new(Evict(Press::KvZip(KvZip::default()))),
        "full" => return Err(Error::Invalid("\"full\" keeps the whole cache; it is not a compressor".into())),
        _ => match AmConfig::from_name(name) {
            Ok(cfg) => Box::new(AmCompressor::new(cfg)),
            Err(_) => return Err(family(name).err().unwrap_or_else(|| Error::Invalid(format!("unknown method {name:?}")))),
        },
    })
}

/// The error for `--device cuda` with a method that has no GPU path (every eviction baseline).
pub fn cpu_only(name: &str) -> Error {
    Error::Device(format!("--device cuda runs the Attention Matching methods (am-highest, am-omp, am-omp-fast, am-omp-seeded, baseline); {name} runs on the CPU only"))
}

/// Build a method from its CLI name: `am-highest` (aliases `am-hak`, `am-hak-basic`), `am-omp`
/// (`am-omp-basic`), `am-omp-fast`, `am-omp-seeded`, `baseline` (`am-baseline`). Knobs are public fields of
/// [`AmConfig`]; start from [`AmConfig::from_name`] to change them.
pub fn compressor_from_name(name: &str) -> Result<AmCompressor> {
    Ok(AmCompressor::new(AmConfig::from_name(name)?))
}

