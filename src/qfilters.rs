//! Q-Filters (spec `q-filters.md`): calibration, the filter file, scoring, and the streaming cache.
//!
//! - **Calibration** (§2): run text through the model, record the post-RoPE queries of every query
//!   head at every layer, accumulate the uncentered second moment G = Σ q·qᵀ (f64) and m = Σ q, and
//!   keep a seeded reservoir of token rows. v₁ = top eigenvector of G (faer `self_adjoint_eigen`;
//!   [`power_iteration`] is the cross-check). Sign by majority vote on the reservoir: s = +1 when
//!   more than half the rows have ⟨q, v₁⟩ > 0. The stored filter is **f = −s·v₁** ("negated"
//!   convention, as `make_filters.py` stores it), averaged over each GQA group without
//!   renormalising.
//! - **File** (§3): safetensors, one f32 tensor `q_filters` [layers, kv_heads, head_dim] and
//!   metadata (convention, model fingerprint, corpus, tokens, sign rule, seed, tool version).
//! - **Scoring** (§4): score(k) = −⟨k, f⟩ on post-RoPE cached keys; keep the highest.
//! - **Streaming** (§5): [`StreamingCache`], a [`CachePolicy`] that keeps at most `budget` rows per
//!   KV head during generation: the last `window` rows and the first `sinks` rows always, the rest
//!   by score. Rows keep their true positions; the logical counter is never touched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par, Side};
use rayon::prelude::*;

use crate::compact::evict::{select, HeadContext, Protect, Scorer};
use crate::compact::{HeadInput, KNorm, RandomEvict, StreamingLlm};
use crate::error::{Error, Result};
use crate::generate::CachePolicy;
use crate::kv_cache::{HeadRows, KvCache};
use crate::model::{Capture, Logits, Model, DEFAULT_MAX_BATCH};
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;

/// File name of a model's default filters, inside the model directory.
pub const DEFAULT_FILTERS_FILE: &str = "qfilters.safetensors";
/// Tensor name in the filter file.
pub const TENSOR: &str = "q_filters";

/// The calibration corpus shipped with kvcompact (original text written for the project): used
/// when no `--text` is given.
pub const SHIPPED_CORPUS: &[(&str, &str)] = &[
    ("data/calib/river-survey.txt", include_str!("../data/calib/river-survey.txt")),
    ("data/calib/bakery-ledger.txt", include_str!("../data/calib/bakery-ledger.txt")),
    ("data/calib/signal-boxes.txt", include_str!("../data/calib/signal-boxes.txt")),
    ("data/calib/tide-clock.txt", include_str!("../data/calib/tide-clock.txt")),
];

/// Arguments of `kvcompact qfilters calibrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct CalibrateArgs {
    /// HF-format model directory (default: the default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Text files to calibrate on (default: the corpus shipped in data/calib).
    #[arg(long, num_args = 1..)]
    pub text: Vec<PathBuf>,
    /// Sample the corpus from the model itself instead (spec §2: seeded, temperature 1.0, neutral
    /// prompts), `--samples` sequences of `--seq-len` tokens. Slow on CPU.
    #[arg(long, conflicts_with = "text")]
    pub self_generate: bool,
    /// Sequences used (at most).
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// Tokens per sequence (capped by the model's context).
    #[arg(long, default_value_t = 2048)]
    pub seq_len: usize,
    /// Reservoir rows per head for the majority sign vote.
    #[arg(long, default_value_t = 3000)]
    pub rows: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Cross-check every direction with power iteration (prints the worst disagreement).
    #[arg(long)]
    pub check_power: bool,
    /// Output: the filter file (safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// Calibrated filters of one model: f [layers, kv_heads, head_dim], negated convention.
#[derive(Debug, Clone)]
pub struct QFilters {
    pub n_layers: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    pub filters: Vec<f32>, // [n_layers, n_kv_heads, head_dim]
    pub metadata: HashMap<String, String>,
}

impl QFilters {
    /// The filter f of one (layer, KV head): [head_dim].
    pub fn filter(&self, layer: usize, kv_head: usize) -> &[f32] {
        let at = (layer * self.n_kv_heads + kv_head) * self.head_dim;
        &self.filters[at..at + self.head_dim]
    }

    /// score(k) = −⟨k, f⟩ for every row of `keys` [T, d] (higher = keep).
    pub fn scores(&self, layer: usize, kv_head: usize, keys: &[f32]) -> Vec<f64> {
        let f = self.filter(layer, kv_head);
        keys.chunks(self.head_dim).map(|k| -k.iter().zip(f).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>()).collect()
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        use crate::weights::{save_safetensors, OutTensor};
        let shape = vec![self.n_layers, self.n_kv_heads, self.head_dim];
        save_safetensors(path, &[OutTensor::F32 { name: TENSOR, shape, data: &self.filters }], Some(self.metadata.clone()))
    }

    /// Load filters and check them against `model`: shape, convention and fingerprint.
    pub fn load(path: &Path, model: &Model) -> Result<QFilters> {
        let bad = |msg: String| Error::Invalid(format!("{}: {msg}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors { path: path.into(), msg: e.to_string() })?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let tensors = crate::weights::load_safetensors(path)?;
        let (shape, data) = match tensors.get(TENSOR) {
            Some((s, crate::weights::TensorData::F32(v))) => (s.clone(), v.clone()),
            _ => return Err(bad(format!("no f32 tensor {TENSOR:?}"))),
        };
        let c = &model.config;
        if shape != [c.n_layers, c.n_kv_heads, c.head_dim] {
            return Err(bad(format!("{TENSOR} has shape {shape:?}, the model needs [{}, {}, {}]", c.n_layers, c.n_kv_heads, c.head_dim)));
        }
        match metadata.get("convention").map(String::as_str) {
            Some("negated") | None => {}
            Some(other) => return Err(bad(format!("filter convention {other:?} is not \"negated\" (f = −v₁⁺)"))),
        }
        if let Some(fp) = metadata.get("model_sha256") {
            if *fp != crate::document::model_fingerprint(model) {
                return Err(bad("these filters were calibrated for a different model".into()));
            }
        }
        if data.iter().any(|x| !x.is_finite()) {
            return Err(bad("filters hold NaN or infinite values".into()));
        }
        Ok(QFilters { n_layers: c.n_layers, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim, filters: data, metadata })
    }
}

/// The Q-Filters scorer: −⟨k, f⟩ with optional protected sinks and window (kvpress protects none).
#[derive(Debug, Clone)]
pub struct QFilterScorer {
    pub filters: Arc<QFilters>,
    pub sinks: usize,
    pub window: usize,
}

impl QFilterScorer {
    pub fn new(filters: Arc<QFilters>) -> QFilterScorer {
        QFilterScorer { filters, sinks: 0, window: 0 }
    }
}

impl Scorer for QFilterScorer {
    fn name(&self) -> &'static str {
        "qfilters"
    }

    fn score_head(&self, input: &HeadInput, _ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        let f = &self.filters;
        if input.layer >= f.n_layers || input.kv_head >= f.n_kv_heads || input.d != f.head_dim {
            return Err(Error::Shape {
                op: "qfilters::score",
                expected: format!("layer < {}, kv_head < {}, d = {}", f.n_layers, f.n_kv_heads, f.head_dim),
                got: format!("layer {}, kv_head {}, d {}", input.layer, input.kv_head, input.d),
            });
        }
        Ok(f.scores(input.layer, input.kv_head, input.keys))
    }

    fn protect(&self, _rows: usize, _budget: usize, _ctx: &HeadContext) -> Protect {
        Protect { sinks: self.sinks, window: self.window }
    }
}

// ---------------------------------------------------------------------------------------------
// Calibration

/// Running statistics of one model's post-RoPE queries.
pub struct Accumulator {
    n_layers: usize,
    n_heads: usize,
    d: usize,
    gram: Vec<Vec<f64>>, // [n_layers * n_heads][d, d] Σ q·qᵀ
    sum: Vec<Vec<f64>>,  // [n_layers * n_heads][d] Σ q
    tokens: usize,
    cap: usize,
    reservoir: Vec<Vec<Vec<half::f16>>>, // [slot][layer][n_heads * d]
    rng: Rng,
}

impl Accumulator {
    pub fn new(n_layers: usize, n_heads: usize, d: usize, reservoir_rows: usize, seed: u64) -> Accumulator {
        Accumulator {
            n_layers,
            n_heads,
            d,
            gram: vec![vec![0.0; d * d]; n_layers * n_heads],
            sum: vec![vec![0.0; d]; n_layers * n_heads],
            tokens: 0,
            cap: reservoir_rows,
            reservoir: Vec::new(),
            rng: Rng::new(seed ^ 0x5146_494C_5445_5253),
        }
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    /// Add one forward pass worth of queries: `queries[l]` is [tokens, n_heads * d] post-RoPE.
    pub fn add(&mut self, queries: &[Vec<f32>]) {
        let (nh, d) = (self.n_heads, self.d);
        let qd = nh * d;
        let n = queries.first().map_or(0, |q| q.len() / qd);
        if n == 0 {
            return;
        }
        self.gram.par_iter_mut().zip(self.sum.par_iter_mut()).enumerate().for_each(|(i, (g, s))| {
            let (l, h) = (i / nh, i % nh);
            let q = &queries[l];
            let mut a = Mat::<f64>::zeros(n, d);
            for t in 0..n {
                for k in 0..d {
                    let x = q[t * qd + h * d + k] as f64;
                    a[(t, k)] = x;
                    s[k] += x;
                }
            }
            let mut gm = Mat::<f64>::from_fn(d, d, |r, c| g[r * d + c]);
            matmul(gm.as_mut(), Accum::Add, a.transpose(), a.as_ref(), 1.0, Par::Seq);
            for r in 0..d {
                for c in 0..d {
                    g[r * d + c] = gm[(r, c)];
                }
            }
        });
        // Reservoir (algorithm R) over the token stream: one slot holds a token's rows at every
        // layer and head, so the same tokens serve every head.
        for t in 0..n {
            let seen = self.tokens + t;
            let slot = if seen < self.cap {
                self.reservoir.push(Vec::new());
                Some(seen)
            } else {
                let j = self.rng.below(seen as u64 + 1) as usize;
                (j < self.cap).then_some(j)
            };
            if let Some(s) = slot {
                self.reservoir[s] = queries.iter().map(|q| q[t * qd..(t + 1) * qd].iter().map(|&x| half::f16::from_f32(x)).collect()).collect();
            }
        }
        self.tokens += n;
    }

    /// Directions, signs and the GQA average: the filters, plus one report line per warning.
    pub fn finish(&self, n_kv_heads: usize) -> Result<(Vec<f32>, Vec<String>)> {
        let (nl, nh, d) = (self.n_layers, self.n_heads, self.d);
        if self.tokens == 0 {
            return Err(Error::Invalid("qfilters calibrate: no tokens were seen".into()));
        }
        let g = nh / n_kv_heads.max(1);
        let per_head: Vec<(Vec<f64>, Vec<String>)> = (0..nl * nh)
            .into_par_iter()
            .map(|i| {
                let (l, h) = (i / nh, i % nh);
                let mut warn = Vec::new();
                let (v, l1, l2) = top_eigen(&self.gram[i], d)?;
                if l2 > 0.0 && l1 / l2 < 1.05 {
                    warn.push(format!("layer {l} head {h}: λ1/λ2 = {:.3} < 1.05 (direction poorly determined)", l1 / l2));
                }
                let rows: Vec<f64> = self
                    .reservoir
                    .iter()
                    .map(|slot| slot[l][h * d..(h + 1) * d].iter().zip(&v).map(|(x, b)| x.to_f64() * b).sum())
                    .collect();
                let s = majority_sign(&rows);
                let paper = if dot(&self.sum[i], &v) >= 0.0 { 1.0 } else { -1.0 };
                if s != paper {
                    warn.push(format!("layer {l} head {h}: majority sign and sgn(⟨m, v₁⟩) disagree"));
                }
                Ok((v.iter().map(|x| -s * x).collect(), warn))
            })
            .collect::<Result<_>>()?;
        let mut filters = vec![0.0f32; nl * n_kv_heads * d];
        let mut warnings = Vec::new();
        for (i, (f, w)) in per_head.iter().enumerate() {
            let (l, h) = (i / nh, i % nh);
            let kv = h / g;
            for k in 0..d {
                filters[(l * n_kv_heads + kv) * d + k] += (f[k] / g as f64) as f32;
            }
            warnings.extend(w.iter().cloned());
        }
        Ok((filters, warnings))
    }

    /// The per-(layer, query head) second-moment matrices [d, d] (tests and cross-checks).
    pub fn gram(&self, layer: usize, head: usize) -> &[f64] {
        &self.gram[layer * self.n_heads + head]
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// +1 when more than half of the projections are positive, else −1 (the official rule).
pub fn majority_sign(proj: &[f64]) -> f64 {
    let pos = proj.iter().filter(|&&p| p > 0.0).count();
    if 2 * pos > proj.len() {
        1.0
    } else {
        -1.0
    }
}

/// Top eigenvector of a symmetric [d, d] row-major matrix and its two largest eigenvalues.
pub fn top_eigen(g: &[f64], d: usize) -> Result<(Vec<f64>, f64, f64)> {
    let m = Mat::<f64>::from_fn(d, d, |r, c| 0.5 * (g[r * d + c] + g[c * d + r]));
    let e = m.self_adjoint_eigen(Side::Lower).map_err(|e| Error::Invalid(format!("qfilters: eigendecomposition failed: {e:?}")))?;
    let s = e.S().column_vector();
    let u = e.U();
    let v: Vec<f64> = (0..d).map(|r| u[(r, d - 1)]).collect();
    let l2 = if d > 1 { s[d - 2] } else { 0.0 };
    Ok((v, s[d - 1], l2))
}

/// Power iteration on a symmetric [d, d] matrix from a seeded start: at most `iters` steps,
/// stopping when ‖Δv‖ < 1e-10 (after fixing the sign); the cross-check of §2 step 4.
pub fn power_iteration(g: &[f64], d: usize, seed: u64, iters: usize) -> Vec<f64> {
    let mut rng = Rng::new(seed);
    let mut v: Vec<f64> = (0..d).map(|_| rng.next_f64() - 0.5).collect();
    normalize(&mut v);
    for _ in 0..iters {
        let mut w: Vec<f64> = (0..d).map(|r| (0..d).map(|c| g[r * d + c] * v[c]).sum()).collect();
        normalize(&mut w);
        if dot(&w, &v) < 0.0 {
            w.iter_mut().for_each(|x| *x = -*x);
        }
        let delta = w.iter().zip(&v).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        v = w;
        if delta < 1e-10 {
            break;
        }
    }
    v
}

fn normalize(v: &mut [f64]) {
    let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-300);
    v.iter_mut().for_each(|x| *x /= n);
}

/// A calibration corpus: token sequences and a description for the metadata.
pub struct Corpus {
    pub sequences: Vec<Vec<u32>>,
    pub description: String,
}

/// Split documents into sequences of at most `seq_len` tokens (each document starts a new
/// sequence; a document's tail shorter than a quarter of `seq_len` joins nothing and is dropped
/// unless it is the document's only piece), at most `max_seqs` of them.
pub fn corpus_from_texts(tok: &Tokenizer, docs: &[(String, String)], seq_len: usize, max_seqs: usize) -> Result<Corpus> {
    use sha2::{Digest, Sha256};
    let mut sequences = Vec::new();
    let mut h = Sha256::new();
    for (_, text) in docs {
        h.update(text.as_bytes());
        let ids = tok.encode(text, false)?;
        let pieces: Vec<&[u32]> = ids.chunks(seq_len.max(1)).collect();
        let np = pieces.len();
        for (k, p) in pieces.into_iter().enumerate() {
            if k > 0 && k + 1 == np && p.len() < seq_len / 4 {
                continue;
            }
            sequences.push(p.to_vec());
        }
    }
    sequences.truncate(max_seqs);
    let names: Vec<&str> = docs.iter().map(|d| d.0.as_str()).collect();
    let hash: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
    Ok(Corpus { sequences, description: format!("text: {} (sha256 {hash}…)", names.join(", ")) })
}

/// The spec's self-generated corpus: `n` sequences of `seq_len` tokens sampled at temperature 1.0
/// from neutral prompts, seeded.
pub fn self_generated_corpus(model: &Model, tok: &Tokenizer, n: usize, seq_len: usize, seed: u64) -> Result<Corpus> {
    const PROMPTS: [&str; 5] = ["The", "Once upon a time", "In this article we", "Chapter 1\n\n", "Today"];
    let mut sequences = Vec::new();
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    for i in 0..n {
        let prompt = tok.encode(PROMPTS[i % PROMPTS.len()], true)?;
        let mut cache = model.new_cache();
        let mut sampler = crate::sampling::Sampler::new(1.0, 1.0, seed.wrapping_add(i as u64));
        let opts = crate::generate::GenOptions { max_tokens: seq_len.saturating_sub(prompt.len()).max(1), stop_at_eos: false };
        let out = crate::generate::generate(model, &mut st, &mut cache, &prompt, &[], &mut sampler, &opts, |_| Ok(()))?;
        sequences.push([prompt, out.tokens].concat());
    }
    Ok(Corpus { sequences, description: format!("self-generated: {n} × {seq_len} tokens, temperature 1.0, seed {seed}, prompts {PROMPTS:?}") })
}

/// Calibrate filters for `model` on `corpus` (spec §2).
pub fn calibrate(model: &Model, corpus: &Corpus, rows: usize, seed: u64, progress: bool) -> Result<(QFilters, Vec<String>)> {
    let c = &model.config;
    let mut acc = Accumulator::new(c.n_layers, c.n_heads, c.head_dim, rows, seed);
    let mut st = model.new_state(DEFAULT_MAX_BATCH);
    let bar = crate::eval::progress_bar(corpus.sequences.len() as u64, progress, "calibrating");
    for seq in &corpus.sequences {
        let seq = &seq[..seq.len().min(c.max_position_embeddings)];
        if seq.is_empty() {
            continue;
        }
        let mut cache = model.new_cache();
        st.capture = Some(Capture::queries());
        model.forward(&mut st, &mut cache, seq, Logits::None)?;
        let cap = st.capture.take().unwrap_or_default();
        acc.add(&cap.queries);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (filters, warnings) = acc.finish(c.n_kv_heads)?;
    let mut metadata = HashMap::new();
    metadata.insert("convention".into(), "negated".into());
    metadata.insert("model_sha256".into(), crate::document::model_fingerprint(model));
    metadata.insert("corpus".into(), corpus.description.clone());
    metadata.insert("n_tokens".into(), acc.tokens().to_string());
    metadata.insert("n_sequences".into(), corpus.sequences.len().to_string());
    metadata.insert("sign_rule".into(), "majority".into());
    metadata.insert("reservoir_rows".into(), rows.to_string());
    metadata.insert("seed".into(), seed.to_string());
    metadata.insert("tool_version".into(), format!("kvcompact {}", env!("CARGO_PKG_VERSION")));
    Ok((QFilters { n_layers: c.n_layers, n_kv_heads: c.n_kv_heads, head_dim: c.head_dim, filters, metadata }, warnings))
}

/// The shipped corpus as one document (the essays joined by blank lines), so that sequences run
/// to 2048 positions as long contexts do (spec §7 pitfall 5).
pub fn shipped_docs() -> Vec<(String, String)> {
    let names: Vec<&str> = SHIPPED_CORPUS.iter().map(|x| x.0).collect();
    let text: Vec<&str> = SHIPPED_CORPUS.iter().map(|x| x.1.trim()).collect();
    vec![(names.join(" + "), text.join("\n\n"))]
}

/// Filters for `model`: from `path` if given; else from `cache_to` or
/// `<model dir>/qfilters.safetensors` when one exists and matches the model; else calibrated on
/// the shipped corpus (sequences of up to 2048 tokens) and saved to `cache_to` (if given).
pub fn load_or_calibrate(model: &Model, path: Option<&Path>, cache_to: Option<&Path>, progress: bool) -> Result<QFilters> {
    if let Some(p) = path {
        return QFilters::load(p, model);
    }
    let default = model.dir.join(DEFAULT_FILTERS_FILE);
    for p in cache_to.into_iter().chain(std::iter::once(default.as_path())) {
        if p.exists() {
            if let Ok(f) = QFilters::load(p, model) {
                return Ok(f);
            }
        }
    }
    let tok = Tokenizer::load(&model.dir, &model.config)?;
    let seq_len = 2048.min(model.config.max_position_embeddings);
    let corpus = corpus_from_texts(&tok, &shipped_docs(), seq_len, 20)?;
    let t0 = Instant::now();
    let (f, _) = calibrate(model, &corpus, 3000, 0, progress)?;
    tracing::info!("calibrated Q-Filters on the shipped corpus in {:.1} s", t0.elapsed().as_secs_f64());
    if let Some(p) = cache_to {
        if let Err(e) = f.save(p) {
            tracing::warn!("could not save the filters to {}: {e}", p.display());
        }
    }
    Ok(f)
}

/// `kvcompact qfilters calibrate`.
pub fn calibrate_cmd(model_dir: &Path, args: &CalibrateArgs) -> Result<()> {
    let t0 = Instant::now();
    let model = Model::load(model_dir)?;
    let tok = Tokenizer::load(model_dir, &model.config)?;
    let seq_len = args.seq_len.min(model.config.max_position_embeddings).max(1);
    let corpus = if args.self_generate {
        self_generated_corpus(&model, &tok, args.samples, seq_len, args.seed)?
    } else if args.text.is_empty() {
        corpus_from_texts(&tok, &shipped_docs(), seq_len, args.samples)?
    } else {
        let docs = args
            .text
            .iter()
            .map(|p| std::fs::read_to_string(p).map(|t| (p.display().to_string(), t)).map_err(|e| Error::io(p, e)))
            .collect::<Result<Vec<_>>>()?;
        corpus_from_texts(&tok, &docs, seq_len, args.samples)?
    };
    if corpus.sequences.is_empty() {
        return Err(Error::Invalid("qfilters calibrate: the corpus is empty".into()));
    }
    let (f, warnings) = calibrate(&model, &corpus, args.rows, args.seed, true)?;
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if args.check_power {
        // Recompute the Gram matrices on the same corpus for the cross-check (cheap next to the
        // forward passes' cost, which is paid again here).
        let c = &model.config;
        let mut acc = Accumulator::new(c.n_layers, c.n_heads, c.head_dim, 1, args.seed);
        let mut st = model.new_state(DEFAULT_MAX_BATCH);
        for seq in &corpus.sequences {
            let mut cache = model.new_cache();
            st.capture = Some(Capture::queries());
            model.forward(&mut st, &mut cache, seq, Logits::None)?;
            acc.add(&st.capture.take().unwrap_or_default().queries);
        }
        let mut worst = 0.0f64;
        for l in 0..c.n_layers {
            for h in 0..c.n_heads {
                let g = acc.gram(l, h);
                let (v, _, _) = top_eigen(g, c.head_dim)?;
                let p = power_iteration(g, c.head_dim, args.seed, 1000);
                worst = worst.max(1.0 - dot(&v, &p).abs());
            }
        }
        println!("power iteration vs eigen: worst 1 − |cos| = {worst:.2e}");
    }
    f.save(&args.out)?;
    println!(
        "wrote {} [{}, {}, {}] from {} tokens ({} sequences) in {:.1} s",
        args.out.display(),
        f.n_layers,
        f.n_kv_heads,
        f.head_dim,
        f.metadata.get("n_tokens").map(String::as_str).unwrap_or("?"),
        corpus.sequences.len(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Streaming cache

/// A streaming eviction policy for generation (spec §5, a superset of `QFiltersCache`): after
/// every step, a head holding `budget + evict_every` rows or more is cut back to `budget`: the
/// first `sinks` and last `window` rows stay, the rest are ranked by the scorer. Rows keep their
/// true positions, and the logical counter is untouched.
///
/// Invariants after every step: rows ≤ budget + evict_every − 1 per head; the last `window` rows
/// are the most recent ones; positions unique and sorted.
pub struct StreamingCache {
    pub scorer: Box<dyn Scorer>,
    pub budget: usize,
    pub window: usize,
    pub sinks: usize,
    pub evict_every: usize,
    pub seed: u64,
    /// Eviction rounds run so far (per head).
    pub evictions: usize,
}

impl StreamingCache {
    pub fn new(scorer: Box<dyn Scorer>, budget: usize, window: usize, sinks: usize) -> Result<StreamingCache> {
        if budget == 0 || budget <= window + sinks {
            return Err(Error::Invalid(format!(
                "--max-cache-tokens {budget} must be larger than --window {window} plus --sinks {sinks}"
            )));
        }
        Ok(StreamingCache { scorer, budget, window, sinks, evict_every: 1, seed: 0, evictions: 0 })
    }

    /// Let the cache grow to budget + m − 1 rows, then evict m at once (m ≥ 1).
    pub fn with_evict_every(mut self, m: usize) -> StreamingCache {
        self.evict_every = m.max(1);
        self
    }

    /// Cut one head back to the budget if it is over the threshold.
    pub fn evict_head(&self, cache: &mut KvCache, layer: usize, head: usize, scale: f32) -> Result<bool> {
        let n = cache.len(layer, head);
        if n < self.budget + self.evict_every {
            return Ok(false);
        }
        let d = cache.head_dim;
        let (keys, values, bias, positions) = cache.head(layer, head);
        let older = self.sinks..n - self.window;
        let input = HeadInput {
            layer,
            kv_head: head,
            d,
            keys: &keys[older.start * d..older.end * d],
            values: &values[older.start * d..older.end * d],
            positions: &positions[older.clone()],
            bias: bias.map(|b| &b[older.clone()]),
            queries: None,
            scale,
        };
        let seed = crate::compact::head_seed(self.seed ^ cache.next_pos() as u64, layer, head);
        let scores = self.scorer.score_head(&input, &HeadContext::default(), seed)?;
        let keep_older = select(&scores, self.budget - self.sinks - self.window, Protect::default());
        let rows: Vec<usize> = (0..self.sinks).chain(keep_older.iter().map(|&j| j + older.start)).chain(n - self.window..n).collect();
        let mut new = HeadRows {
            keys: Vec::with_capacity(rows.len() * d),
            values: Vec::with_capacity(rows.len() * d),
            positions: Vec::with_capacity(rows.len()),
            bias: bias.map(|_| Vec::with_capacity(rows.len())),
        };
        for &j in &rows {
            new.keys.extend_from_slice(&keys[j * d..(j + 1) * d]);
            new.values.extend_from_slice(&values[j * d..(j + 1) * d]);
            new.positions.push(positions[j]);
            if let (Some(nb), Some(b)) = (new.bias.as_mut(), bias) {
                nb.push(b[j]);
            }
        }
        cache.replace_head(layer, head, new)?;
        Ok(true)
    }
}

impl CachePolicy for StreamingCache {
    fn after_step(&mut self, model: &Model, cache: &mut KvCache, _tokens: &[u32]) -> Result<()> {
        let scale = model.config.attn_scale();
        let mut any = false;
        for l in 0..cache.n_layers {
            for h in 0..cache.n_kv_heads {
                any |= self.evict_head(cache, l, h, scale)?;
            }
        }
        self.evictions += usize::from(any);
        Ok(())
    }
}

/// The streaming policy behind `generate --method M --max-cache-tokens N --window W --sinks S`:
/// `qfilters` (filters from `filters`, else [`load_or_calibrate`], caching them as
/// `<model dir>/qfilters.safetensors`), `knorm`, `streaming-llm`
/// (recency: with S sinks this is StreamingLLM) or `random`.
pub fn streaming_policy(method: &str, filters: Option<&Path>, model: &Model, max_cache_tokens: usize, window: usize, sinks: usize) -> Result<Box<dyn CachePolicy>> {
    let scorer: Box<dyn Scorer> = match method {
        "qfilters" => {
            let cache = model.dir.join(DEFAULT_FILTERS_FILE);
            Box::new(QFilterScorer::new(Arc::new(load_or_calibrate(model, filters, Some(&cache), true)?)))
        },
        "knorm" => Box::new(KNorm),
        "streaming-llm" => Box::new(StreamingLlm { n_sink: 0 }),
        "random" => Box::new(RandomEvict),
        _ => {
            return Err(Error::Invalid(format!(
                "no streaming cache for method {method:?} (qfilters, knorm, streaming-llm or random)"
            )))
        }
    };
    Ok(Box::new(StreamingCache::new(scorer, max_cache_tokens, window, sinks)?))
}

/// Spearman rank correlation of two equal-length vectors (average ranks for ties): the
/// attention-agreement check of spec §8 test 4.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    fn ranks(x: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
        let mut r = vec![0.0; x.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && x[idx[j + 1]] == x[idx[i]] {
                j += 1;
            }
            let avg = (i + j) as f64 / 2.0;
            for k in i..=j {
                r[idx[k]] = avg;
            }
            i = j + 1;
        }
        r
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let n = a.len() as f64;
    let (ma, mb) = (ra.iter().sum::<f64>() / n, rb.iter().sum::<f64>() / n);
    let cov: f64 = ra.iter().zip(&rb).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = ra.iter().map(|x| (x - ma) * (x - ma)).sum();
    let vb: f64 = rb.iter().map(|y| (y - mb) * (y - mb)).sum();
    cov / (va * vb).sqrt().max(1e-300)
}
