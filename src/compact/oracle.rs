//! `kvcompact compact-head`: one head in, one compacted head out, through safetensors files, so
//! other implementations can use this crate as an oracle.
//!
//! IN (f32): `keys` \[T,d\], `values` \[T,d\], `queries` \[n,d\]; optional `bias` \[T\], `test_queries`
//! \[m,d\], `positions` (i64 \[T\], default 0..T) and `scale` ([] or \[1\], default 1/√d).
//! OUT: `indices` (i64 \[t\]), `keys` \[t,d\], `beta` \[t\], `values` \[t,d\]; with test queries also
//! `rel_l2` and `mass_err` (f32 \[1\]: means over the test queries, spec §14). Metadata records the
//! method, budget (rows, and the ratio or compression ratio it came from), seed, solver and the
//! full-precision metrics.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::am::{AmCompressor, BetaSolver, Precision};
use super::budget::Budget;
use super::registry::{self, Family, MethodOptions};
use super::{evaluate_head, Compressor, HeadEval, HeadInput, HeadStats};
use crate::tensor_file::{load_safetensors, save_safetensors, OutTensor, TensorData};
use crate::device::Device;
use crate::{Error, Result};

/// Options of `compact-head` (the CLI flags).
#[derive(Debug, Clone)]
pub struct OracleOptions {
    /// Any registry name but `qfilters` (needs filters) and `full`: the AM family (`am-omp`,
    /// `am-highest`, `am-omp-fast`, `am-omp-seeded`, `baseline` and the aliases of
    /// [`AmConfig::from_name`](super::am::AmConfig::from_name)) or an eviction baseline.
    pub method: String,
    /// Rows t to keep: a ratio, a kvpress compression ratio, or rows (≤ T: one head is given
    /// whole, so more rows than it has is refused rather than clamped).
    pub budget: Budget,
    /// Seed of the head's randomised steps (the reference β solver's power iteration).
    pub seed: u64,
    /// Bounded NNLS solver for B.
    pub nnls: BetaSolver,
    /// Guard off and the OMP QR path (spec §6.4 `--strict-parity`).
    pub strict_parity: bool,
    /// S and E in f64 (golden mode) instead of f32.
    pub golden_precision: bool,
    /// kvpress 0.5.5 semantics for an eviction baseline (`--kvpress`; [`Press`](super::evict::Press));
    /// refused for the Attention Matching family.
    pub kvpress: bool,
    /// Where the AM family's n×T work runs (`--device`); eviction methods run on the CPU only.
    pub device: Device,
}

impl Default for OracleOptions {
    fn default() -> Self {
        OracleOptions {
            method: "am-omp".into(),
            budget: Budget::default(),
            seed: 0,
            nnls: BetaSolver::Reference,
            strict_parity: false,
            golden_precision: false,
            kvpress: false,
            device: Device::Cpu,
        }
    }
}

/// What `compact-head` prints: `{"rel_l2": x, "mass_err": y, "seconds": s}` (the metrics are null
/// without test queries). `seconds` is the compaction alone (no file I/O, no evaluation).
#[derive(Debug, Clone, Serialize)]
pub struct OracleReport {
    /// Mean relative L2 error of the outputs over the test queries; None without them.
    pub rel_l2: Option<f64>,
    /// Mean mass error over the test queries; None without them.
    pub mass_err: Option<f64>,
    /// Wall-clock seconds of the compaction alone.
    pub seconds: f64,
    /// Rows kept, t (not printed).
    #[serde(skip)]
    pub kept: usize,
    /// Full per-head quality on the test queries (not printed).
    #[serde(skip)]
    pub eval: Option<HeadEval>,
    /// Timings and solver events of the compaction (not printed).
    #[serde(skip)]
    pub stats: HeadStats,
}

impl OracleReport {
    /// The one-line JSON object for stdout.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".into())
    }
}

fn bad(name: &str, file: &Path, msg: impl Into<String>) -> Error {
    Error::BadTensor { name: name.into(), file: file.into(), msg: msg.into() }
}

type Tensors = HashMap<String, (Vec<usize>, TensorData)>;

fn f32_tensor<'a>(map: &'a Tensors, name: &str, file: &Path) -> Result<Option<(&'a [usize], &'a [f32])>> {
    match map.get(name) {
        None => Ok(None),
        Some((shape, TensorData::F32(v))) => Ok(Some((shape.as_slice(), v.as_slice()))),
        Some(_) => Err(bad(name, file, "expected an F32 tensor")),
    }
}

fn matrix<'a>(map: &'a Tensors, name: &str, file: &Path) -> Result<Option<(usize, usize, &'a [f32])>> {
    match f32_tensor(map, name, file)? {
        None => Ok(None),
        Some((shape, v)) if shape.len() == 2 => Ok(Some((shape[0], shape[1], v))),
        Some((shape, _)) => Err(bad(name, file, format!("expected a 2-D tensor, got shape {shape:?}"))),
    }
}

fn required<'a>(map: &'a Tensors, name: &str, file: &Path) -> Result<(usize, usize, &'a [f32])> {
    matrix(map, name, file)?.ok_or_else(|| Error::MissingTensor { name: name.into(), dir: file.into() })
}

/// One head's arrays for [`compact_head`] (row-major f32; what the input file holds).
#[derive(Debug, Clone, Copy)]
pub struct HeadArrays<'a> {
    /// Head dimension d.
    pub d: usize,
    /// Keys \[T, d\], post-RoPE.
    pub keys: &'a [f32],
    /// Values \[T, d\].
    pub values: &'a [f32],
    /// Reference queries \[n, d\] (n ≥ 1).
    pub queries: &'a [f32],
    /// Prior logit bias \[T\] (an earlier compaction's β), or none.
    pub bias: Option<&'a [f32]>,
    /// Held-out queries \[m, d\] for the error report, or none.
    pub test_queries: Option<&'a [f32]>,
    /// Absolute positions \[T\], strictly increasing (default 0..T).
    pub positions: Option<&'a [u32]>,
    /// Attention logit scale (default 1/√d).
    pub scale: Option<f32>,
}

/// What [`compact_head`] returns: the kept rows and the report.
#[derive(Debug, Clone)]
pub struct HeadResult {
    /// Rows of the input kept, increasing \[t\].
    pub indices: Vec<usize>,
    /// Kept keys \[t, d\].
    pub keys: Vec<f32>,
    /// Full new logit bias β \[t\].
    pub beta: Vec<f32>,
    /// Fitted values C_v \[t, d\].
    pub values: Vec<f32>,
    /// Errors on the test queries, timing and solver events.
    pub report: OracleReport,
}

/// Compact one head in memory: the computation behind `kvcompact compact-head` and the Python
/// package's `compact_head`, so both give the same bits. Shapes and values are checked first
/// (one-line errors naming the array).
pub fn compact_head(a: &HeadArrays, opts: &OracleOptions) -> Result<HeadResult> {
    let d = a.d;
    let bad = |name: &str, msg: String| Error::Invalid(format!("compact_head: {name}: {msg}"));
    if d == 0 || !a.keys.len().is_multiple_of(d) {
        return Err(bad("keys", format!("{} values do not form rows of d = {d}", a.keys.len())));
    }
    let t_rows = a.keys.len() / d;
    if a.values.len() != a.keys.len() {
        return Err(bad("values", format!("{} values, the keys have {}", a.values.len(), a.keys.len())));
    }
    if a.queries.is_empty() || !a.queries.len().is_multiple_of(d) {
        return Err(bad("queries", format!("{} values do not form one or more rows of d = {d}", a.queries.len())));
    }
    if let Some(b) = a.bias {
        if b.len() != t_rows {
            return Err(bad("bias", format!("expected {t_rows} values, got {}", b.len())));
        }
    }
    // One NaN or infinity poisons every score and fit downstream: refuse it where it enters.
    for (name, v) in [("keys", Some(a.keys)), ("values", Some(a.values)), ("queries", Some(a.queries)), ("bias", a.bias)] {
        if let Some(i) = v.and_then(|v| v.iter().position(|x| !x.is_finite())) {
            return Err(bad(name, format!("entry {i} is NaN or infinite")));
        }
    }
    if let Some(s) = a.scale.filter(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(bad("scale", format!("must be a finite number > 0, got {s}")));
    }
    if let Some(tq) = a.test_queries {
        if tq.len() % d != 0 {
            return Err(bad("test_queries", format!("{} values do not form rows of d = {d}", tq.len())));
        }
        // A NaN test query would make every error NaN, and the max folds would report 0.
        if let Some(i) = tq.iter().position(|x| !x.is_finite()) {
            return Err(bad("test_queries", format!("entry {i} is NaN or infinite")));
        }
    }
    let default_positions: Vec<u32>;
    let positions = match a.positions {
        Some(p) if p.len() != t_rows => return Err(bad("positions", format!("expected {t_rows} values, got {}", p.len()))),
        Some(p) => p,
        None => {
            default_positions = (0..t_rows as u32).collect();
            &default_positions
        }
    };
    if let Budget::Rows(n) = opts.budget {
        if n > t_rows {
            return Err(bad("budget", format!("{n} rows is larger than the {t_rows} rows of the head")));
        }
    }
    let budget = opts.budget.rows(t_rows)?;
    let scale = a.scale.unwrap_or(1.0 / (d as f32).sqrt());
    let head = HeadInput { layer: 0, kv_head: 0, d, keys: a.keys, values: a.values, positions, bias: a.bias, queries: Some(a.queries), scale };
    let test = a.test_queries;
    // Every registry name: the AM family with its solver knobs; an eviction method scores the span
    // with the reference queries (non-causal, normalised over the span: the fallback documented in
    // `evict`) and keeps rows with their prior bias and values.
    let method: Box<dyn Compressor> = match registry::family(&opts.method)? {
        Family::AttentionMatching if opts.kvpress => {
            return Err(Error::Invalid(format!("--kvpress applies to eviction baselines; {:?} is an Attention Matching method", opts.method)))
        }
        Family::AttentionMatching => {
            let mut cfg = registry::require_am(&opts.method, "compact-head")?.cfg.with_beta_solver(opts.nnls).strict_parity(opts.strict_parity);
            cfg.inner_par = true;
            if opts.golden_precision {
                cfg.precision = Precision::F64;
            }
            cfg.device = opts.device;
            Box::new(AmCompressor::new(cfg))
        }
        Family::Eviction if opts.device != Device::Cpu => return Err(registry::cpu_only(&opts.method)),
        Family::Eviction => registry::method_with(&opts.method, &MethodOptions { kvpress: opts.kvpress, seed: opts.seed, ..Default::default() })?,
        Family::Full => return Err(Error::Invalid("compact_head: \"full\" keeps the whole head; give a method that compacts".into())),
    };
    let t0 = Instant::now();
    let out = method.compress_head(&head, budget, opts.seed)?;
    let seconds = t0.elapsed().as_secs_f64();
    let eval = test.map(|tq| evaluate_head(&head, &out, tq));

    Ok(HeadResult {
        report: OracleReport {
            rel_l2: eval.as_ref().map(|e| e.mean_rel_l2),
            mass_err: eval.as_ref().map(|e| e.mean_mass_err),
            seconds,
            kept: out.indices.len(),
            eval,
            stats: out.stats,
        },
        indices: out.indices,
        keys: out.keys,
        beta: out.beta,
        values: out.values,
    })
}


/// Write `input` (and the held-out `test_queries`, `[m, d]`) as a `compact-head` input file:
/// `keys` and `values` (`[T, d]`), `positions` (i64, `[T]`), `queries` (`[n, d]`), `test_queries`,
/// `bias` (`[T]`) when the head has one, and `scale` (`[1]`). `used`: the budget (rows) and method seed the head was compacted
/// with, recorded as metadata `budget` and `seed`; [`compact_head_file`] with them reruns exactly
/// this head's compaction.
pub fn write_head_input(path: &Path, input: &HeadInput, test_queries: &[f32], used: Option<(usize, u64)>) -> Result<()> {
    let (t, d) = (input.rows(), input.d);
    let positions: Vec<i64> = input.positions.iter().map(|&p| p as i64).collect();
    let queries = input.queries.unwrap_or(&[]);
    let scale = [input.scale];
    let mut tensors = vec![
        OutTensor::F32 { name: "keys", shape: vec![t, d], data: input.keys },
        OutTensor::F32 { name: "values", shape: vec![t, d], data: input.values },
        OutTensor::I64 { name: "positions", shape: vec![t], data: &positions },
        OutTensor::F32 { name: "queries", shape: vec![queries.len() / d.max(1), d], data: queries },
        OutTensor::F32 { name: "test_queries", shape: vec![test_queries.len() / d.max(1), d], data: test_queries },
        OutTensor::F32 { name: "scale", shape: vec![1], data: &scale },
    ];
    if let Some(b) = input.bias {
        tensors.push(OutTensor::F32 { name: "bias", shape: vec![t], data: b });
    }
    let mut meta = HashMap::from([
        ("layer".to_string(), input.layer.to_string()),
        ("kv_head".to_string(), input.kv_head.to_string()),
        ("generator".to_string(), format!("kvcompact {} compact --dump-heads", env!("CARGO_PKG_VERSION"))),
    ]);
    if let Some((budget, seed)) = used {
        meta.insert("budget".to_string(), budget.to_string());
        meta.insert("seed".to_string(), seed.to_string());
    }
    save_safetensors(path, &tensors, Some(meta))
}
/// Run one compaction from `input` to `output` (see the module docs).
pub fn compact_head_file(input: &Path, output: &Path, opts: &OracleOptions) -> Result<OracleReport> {
    let map = load_safetensors(input)?;
    let (t_rows, d, keys) = required(&map, "keys", input)?;
    let (vt, vd, values) = required(&map, "values", input)?;
    if (vt, vd) != (t_rows, d) {
        return Err(bad("values", input, format!("shape [{vt}, {vd}] differs from keys [{t_rows}, {d}]")));
    }
    let (n, qd, queries) = required(&map, "queries", input)?;
    if qd != d {
        return Err(bad("queries", input, format!("head_dim {qd} differs from the keys' {d}")));
    }
    if n == 0 {
        return Err(bad("queries", input, "no reference queries (n = 0)"));
    }
    let bias = match f32_tensor(&map, "bias", input)? {
        None => None,
        Some((shape, v)) if shape == [t_rows] => Some(v),
        Some((shape, _)) => return Err(bad("bias", input, format!("expected shape [{t_rows}], got {shape:?}"))),
    };
    let test = match matrix(&map, "test_queries", input)? {
        None => None,
        Some((_, td, v)) if td == d => Some(v),
        Some((_, td, _)) => return Err(bad("test_queries", input, format!("head_dim {td} differs from the keys' {d}"))),
    };
    // A NaN test query would make every error NaN, and the max folds would report 0: refuse it.
    if let Some(i) = test.and_then(|v| v.iter().position(|x| !x.is_finite())) {
        return Err(bad("test_queries", input, format!("entry {i} is NaN or infinite")));
    }
    let positions: Vec<u32> = match map.get("positions") {
        None => (0..t_rows as u32).collect(),
        Some((shape, TensorData::I64(p))) if shape.as_slice() == [t_rows] => {
            p.iter().map(|&x| u32::try_from(x).map_err(|_| bad("positions", input, format!("position {x} out of range")))).collect::<Result<_>>()?
        }
        Some(_) => return Err(bad("positions", input, format!("expected an integer tensor of shape [{t_rows}]"))),
    };
    let scale = match f32_tensor(&map, "scale", input)? {
        None => 1.0 / (d as f32).sqrt(),
        Some((_, v)) if v.len() == 1 => v[0],
        Some((shape, _)) => return Err(bad("scale", input, format!("expected a scalar, got shape {shape:?}"))),
    };
    let arrays = HeadArrays { d, keys, values, queries, bias, test_queries: test, positions: Some(&positions), scale: Some(scale) };
    let r = compact_head(&arrays, opts)?;
    let method_name = match registry::family(&opts.method)? {
        Family::AttentionMatching => registry::require_am(&opts.method, "compact-head")?.cfg.name.to_string(),
        _ => opts.method.clone(),
    };
    let (out, eval, seconds) = (&r, &r.report.eval, r.report.seconds);

    let t = out.indices.len();
    let indices: Vec<i64> = out.indices.iter().map(|&i| i as i64).collect();
    let rel = eval.as_ref().map(|e| [e.mean_rel_l2 as f32]);
    let mass = eval.as_ref().map(|e| [e.mean_mass_err as f32]);
    let mut tensors = vec![
        OutTensor::I64 { name: "indices", shape: vec![t], data: &indices },
        OutTensor::F32 { name: "keys", shape: vec![t, d], data: &out.keys },
        OutTensor::F32 { name: "beta", shape: vec![t], data: &out.beta },
        OutTensor::F32 { name: "values", shape: vec![t, d], data: &out.values },
    ];
    if let (Some(r), Some(m)) = (rel.as_ref(), mass.as_ref()) {
        tensors.push(OutTensor::F32 { name: "rel_l2", shape: vec![1], data: r });
        tensors.push(OutTensor::F32 { name: "mass_err", shape: vec![1], data: m });
    }
    let mut meta = HashMap::new();
    meta.insert("method".to_string(), method_name.to_string());
    // The rows asked for, and the form they came from when it was not rows.
    meta.insert("budget".to_string(), opts.budget.rows(t_rows)?.to_string());
    if let (form @ ("ratio" | "compression_ratio"), v) = opts.budget.entry() {
        meta.insert(form.to_string(), v.to_string());
    }
    meta.insert("seed".to_string(), opts.seed.to_string());
    meta.insert("nnls".to_string(), opts.nnls.name().to_string());
    meta.insert("strict_parity".to_string(), opts.strict_parity.to_string());
    meta.insert("kvpress".to_string(), opts.kvpress.to_string());
    meta.insert("seconds".to_string(), format!("{seconds}"));
    meta.insert("generator".to_string(), format!("kvcompact {} compact-head", env!("CARGO_PKG_VERSION")));
    if let Some(e) = &eval {
        meta.insert("rel_l2".to_string(), format!("{:e}", e.mean_rel_l2));
        meta.insert("mass_err".to_string(), format!("{:e}", e.mean_mass_err));
        meta.insert("test_queries".to_string(), e.queries.to_string());
    }
    save_safetensors(output, &tensors, Some(meta))?;
    Ok(r.report)
}
