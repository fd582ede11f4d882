//! Q-Filters calibration (spec §2): the query statistics of a corpus, the top eigenvector per
//! head, the majority sign vote, and the corpora (shipped text, files, or self-generated).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, Par, Side};
use rayon::prelude::*;

use super::filters::{QFilters, DEFAULT_FILTERS_FILE, SHIPPED_CORPUS};
use crate::error::{Error, Result};
use crate::model::{Capture, Logits, Model, DEFAULT_MAX_BATCH};
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;


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
    /// Empty statistics for `n_layers` × `n_heads` query heads of dimension `d`, with a reservoir
    /// of `reservoir_rows` tokens sampled with `seed`.
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

    /// Tokens added so far.
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
    /// Token id sequences, each run through the model from an empty cache.
    pub sequences: Vec<Vec<u32>>,
    /// One line for the filter file's `corpus` metadata (source names and a text hash, or the sampling setup).
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
    let bar = crate::progress::progress_bar(corpus.sequences.len() as u64, progress, "calibrating");
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
    metadata.insert("model_sha256".into(), model.fingerprint());
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

/// What `kvcompact qfilters calibrate` asks for (see the CLI flags for each field).
#[derive(Debug, Clone)]
pub struct CalibrateOptions {
    /// Text files to calibrate on (empty: the shipped corpus).
    pub text: Vec<PathBuf>,
    /// Sample the corpus from the model itself (spec §2) instead of reading text.
    pub self_generate: bool,
    /// Sequences used (at most).
    pub samples: usize,
    /// Tokens per sequence (capped by the model's context).
    pub seq_len: usize,
    /// Reservoir rows per head for the majority sign vote.
    pub rows: usize,
    /// Seed of the reservoir, the self-generated corpus and the power-iteration start.
    pub seed: u64,
    /// Cross-check every direction with power iteration.
    pub check_power: bool,
}

/// Filters calibrated by [`calibrate_model`], with what the run saw.
pub struct Calibrated {
    /// The calibrated filters, metadata filled in (not yet saved).
    pub filters: QFilters,
    /// Heads whose direction is poorly determined (printed as warnings).
    pub warnings: Vec<String>,
    /// Sequences of the corpus.
    pub sequences: usize,
    /// With `check_power`: the worst 1 − |cos| between power iteration and the eigensolver.
    pub power_worst: Option<f64>,
}

/// Build the corpus `opts` describes and calibrate `model` on it (`kvcompact qfilters calibrate`).
pub fn calibrate_model(model: &Model, tok: &Tokenizer, opts: &CalibrateOptions, progress: bool) -> Result<Calibrated> {
    let args = opts;
    let seq_len = args.seq_len.min(model.config.max_position_embeddings).max(1);
    let corpus = if args.self_generate {
        self_generated_corpus(model, tok, args.samples, seq_len, args.seed)?
    } else if args.text.is_empty() {
        corpus_from_texts(tok, &shipped_docs(), seq_len, args.samples)?
    } else {
        let docs = args
            .text
            .iter()
            .map(|p| std::fs::read_to_string(p).map(|t| (p.display().to_string(), t)).map_err(|e| Error::io(p, e)))
            .collect::<Result<Vec<_>>>()?;
        corpus_from_texts(tok, &docs, seq_len, args.samples)?
    };
    if corpus.sequences.is_empty() {
        return Err(Error::Invalid("qfilters calibrate: the corpus is empty".into()));
    }
    let (filters, warnings) = calibrate(model, &corpus, args.rows, args.seed, progress)?;
    let mut power_worst = None;
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
        power_worst = Some(worst);
    }
    Ok(Calibrated { filters, warnings, sequences: corpus.sequences.len(), power_worst })
}
