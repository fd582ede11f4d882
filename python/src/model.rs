//! `kvcompact.Model` and `kvcompact.Cache`: a loaded model and a KV cache, over the same library
//! calls as `kvcompact generate`, `compact` and `logits`, so a call gives the CLI's bits (and a
//! compacted cache saved from Python is the file `kvcompact compact` writes for the same args).

use std::path::PathBuf;

use kvc::cache::{load_cache, save_cache, KvCache, KvDtype, ModelId};
use kvc::compact::{registry, BetaSolver, Budget};
use kvc::document::budgets::global_from_name;
use kvc::document::{compact_context, document_method, generation_tokens, press_context, read_proportions, CompactOptions, ContextLayout, QuerySource};
use kvc::generate::{encode_prompt, generate, GenOptions};
use kvc::model::{Logits, DEFAULT_MAX_BATCH};
use kvc::sampling::Sampler;
use kvc::tokenizer::Tokenizer;
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2};
use pyo3::prelude::*;
use pyo3::types::PyTuple;

use crate::value_error;

/// Text, or token ids (any integer sequence).
#[derive(FromPyObject)]
pub enum Input {
    /// A string, tokenized by the model's tokenizer.
    Text(String),
    /// Token ids, run as given.
    Ids(Vec<i64>),
}

/// Token ids as the model takes them: non-empty, inside the vocabulary and the context.
fn token_ids(model: &kvc::model::Model, ids: &[i64]) -> PyResult<Vec<u32>> {
    let c = &model.config;
    if ids.is_empty() {
        return Err(value_error("no token ids"));
    }
    if ids.len() > c.max_position_embeddings {
        return Err(value_error(format!("{} token ids exceed the model's context of {} tokens", ids.len(), c.max_position_embeddings)));
    }
    ids.iter()
        .map(|&t| u32::try_from(t).ok().filter(|&u| (u as usize) < c.vocab_size).ok_or_else(|| value_error(format!("token id {t} is outside the vocabulary ({})", c.vocab_size))))
        .collect()
}

fn out_of<T: std::fmt::Display>(what: &str, i: i64, n: T) -> PyErr {
    value_error(format!("{what} {i} is out of range (the cache has {n})"))
}

/// A model loaded from an HF-format directory (safetensors), with its tokenizer.
///
/// Model(path=None, *, kv_dtype="f32"): None is the default model the CLI uses
/// (SmolLM2-135M-Instruct under $KVCOMPACT_HOME or ./models, fetched on first use). kv_dtype
/// "bf16" stores its caches' key and value rows as bf16, as the CLI's --kv-dtype bf16 does.
#[pyclass(frozen, module = "kvcompact._kvcompact")]
pub struct Model {
    model: kvc::model::Model,
    tok: Tokenizer,
    id: ModelId,
}

impl Model {
    fn same_model(&self, c: &Cache) -> PyResult<()> {
        if c.id.fingerprint != self.id.fingerprint {
            return Err(value_error(format!("this cache was made for a different model ({})", c.id.dir)));
        }
        Ok(())
    }

    fn layout(&self, input: Input, chat: bool) -> PyResult<ContextLayout> {
        match input {
            Input::Text(t) => ContextLayout::build(&self.tok, &t, chat).map_err(value_error),
            Input::Ids(_) if chat => Err(value_error("chat=True renders text with the chat template; give text, not token ids")),
            Input::Ids(ids) => Ok(ContextLayout { prefix: vec![], article: token_ids(&self.model, &ids)?, suffix: vec![], chat: false }),
        }
    }
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path = None, *, kv_dtype = "f32"))]
    fn new(py: Python<'_>, path: Option<PathBuf>, kv_dtype: &str) -> PyResult<Model> {
        let kv_dtype = KvDtype::parse(kv_dtype).map_err(value_error)?;
        py.detach(|| -> kvc::Result<Model> {
            let dir = match path {
                Some(p) => p,
                None => kvc::fetch::ensure_default_model(false)?,
            };
            let (mut model, tok) = kvc::generate::load(&dir)?;
            model.set_kv_dtype(kv_dtype)?;
            let id = model.cache_id();
            Ok(Model { model, tok, id })
        })
        .map_err(value_error)
    }

    /// The model's directory.
    #[getter]
    fn path(&self) -> PathBuf {
        self.model.dir.clone()
    }

    /// How this model's caches store key and value rows: "f32" or "bf16".
    #[getter]
    fn kv_dtype(&self) -> &'static str {
        self.model.kv_dtype().name()
    }

    /// Transformer layers.
    #[getter]
    fn n_layers(&self) -> usize {
        self.model.config.n_layers
    }

    /// KV heads per layer.
    #[getter]
    fn n_kv_heads(&self) -> usize {
        self.model.config.n_kv_heads
    }

    /// Floats per key or value row.
    #[getter]
    fn head_dim(&self) -> usize {
        self.model.config.head_dim
    }

    /// Vocabulary size (the logits' width).
    #[getter]
    fn vocab_size(&self) -> usize {
        self.model.config.vocab_size
    }

    /// Token ids of `text`, with the model's special tokens (BOS) unless special=False.
    #[pyo3(signature = (text, special = true))]
    fn tokenize(&self, text: &str, special: bool) -> PyResult<Vec<u32>> {
        self.tok.encode(text, special).map_err(value_error)
    }

    /// Text of token ids (special tokens kept).
    fn detokenize(&self, ids: Vec<i64>) -> PyResult<String> {
        let ids = token_ids(&self.model, &ids)?;
        self.tok.decode(&ids, false).map_err(value_error)
    }

    /// Prefill a context and return its full cache. Text is the article of a context laid out
    /// as `kvcompact compact` lays it out (with chat=True, a user turn of the chat template);
    /// token ids are run as given (chat must be False).
    #[pyo3(signature = (input, chat = false))]
    fn prefill(&self, py: Python<'_>, input: Input, chat: bool) -> PyResult<Cache> {
        let layout = self.layout(input, chat)?;
        let cache = py
            .detach(|| -> kvc::Result<KvCache> {
                let tokens = layout.tokens();
                let max = self.model.config.max_position_embeddings;
                if tokens.len() > max {
                    return Err(kvc::Error::Prompt(format!("the context has {} tokens, more than the model's {max} positions", tokens.len())));
                }
                let mut st = self.model.new_state(DEFAULT_MAX_BATCH);
                let mut cache = self.model.new_cache();
                self.model.forward(&mut st, &mut cache, &tokens, Logits::None)?;
                Ok(cache)
            })
            .map_err(value_error)?;
        let params = serde_json::json!({"method": "full", "context_tokens": layout.len()});
        Ok(Cache { cache, chat: layout.chat, layout: Some(layout), id: self.id.clone(), params, report: None })
    }

    /// Compact a context with any registry method, exactly as `kvcompact compact` does (same
    /// arguments, same cache bits). `source` is the context's text (laid out with the chat
    /// template unless chat=False, like the CLI's --raw) or a Cache from `prefill`, whose context
    /// is compacted. One budget form at most: ratio (default 20), compression_ratio (kvpress:
    /// int(T·(1 − r)) rows) or budget (rows per KV head). kvpress=True (always for
    /// observed-attention and kvzip) runs the kvpress press of an eviction name on the whole
    /// context, as `kvcompact compact --kvpress`. am_budgets: "global" (default; one top-k of
    /// AM's key scores over every head) or "uniform", as the CLI's --am-budgets; ignored with
    /// budgets (a proportions file).
    #[pyo3(signature = (source, *, method = "am-highest", ratio = None, compression_ratio = None, budget = None, queries = "repeat", n_queries = 4096, n_test = 256, on_policy = false, chunk_tokens = None, budgets = None, am_budgets = "global", nnls = "reference", chat = None, seed = 0, kvpress = false))]
    #[allow(clippy::too_many_arguments)]
    fn compact(
        &self,
        py: Python<'_>,
        source: &Bound<'_, PyAny>,
        method: &str,
        ratio: Option<f64>,
        compression_ratio: Option<f64>,
        budget: Option<usize>,
        queries: &str,
        n_queries: usize,
        n_test: usize,
        on_policy: bool,
        chunk_tokens: Option<usize>,
        budgets: Option<PathBuf>,
        am_budgets: &str,
        nnls: &str,
        chat: Option<bool>,
        seed: u64,
        kvpress: bool,
    ) -> PyResult<Cache> {
        let solver = BetaSolver::parse(nnls).map_err(value_error)?;
        let budgets = budgets.as_deref().map(read_proportions).transpose().map_err(value_error)?;
        let opts = CompactOptions {
            budget: Budget::from_forms(ratio, compression_ratio, budget).map_err(value_error)?.unwrap_or_default(),
            queries: QuerySource::parse(queries).map_err(value_error)?,
            n_queries,
            n_test: n_test.max(1),
            on_policy,
            chunk_tokens,
            global_budgets: budgets.is_none() && global_from_name(am_budgets).map_err(value_error)?,
            budgets,
            seed,
            ..Default::default()
        };
        opts.check().map_err(value_error)?;
        registry::family(method).map_err(value_error)?;
        let layout = if let Ok(c) = source.extract::<PyRef<'_, Cache>>() {
            self.same_model(&c)?;
            let layout = c.layout.clone().ok_or_else(|| value_error("this cache holds no context to compact (only caches from prefill do); give the text"))?;
            if chat.is_some_and(|x| x != layout.chat) {
                return Err(value_error(format!("the cache was prefilled with chat={}; chat cannot change here", layout.chat)));
            }
            layout
        } else {
            let text: String = source.extract().map_err(|_| value_error("source must be text (str) or a Cache from prefill"))?;
            // As the CLI: the chat template unless --raw, when the model has one.
            let chat = chat.unwrap_or(true) && self.tok.has_chat_template();
            ContextLayout::build(&self.tok, &text, chat).map_err(value_error)?
        };
        if registry::runs_as_press(method, kvpress) {
            // As `compact --kvpress`: the press compresses the whole context (no reference queries).
            let press = registry::press_from_name(method, seed).map_err(value_error)?;
            if opts.budgets.is_some() || on_policy || chunk_tokens.is_some() {
                return Err(value_error("budgets, on_policy and chunk_tokens shape Attention Matching's compaction; a kvpress press takes none of them"));
            }
            let (cache, report) = py.detach(|| press_context(&self.model, &self.tok, &layout, &press, opts.budget)).map_err(value_error)?;
            let params = report.cache_params(seed);
            let report = serde_json::to_string(&report).map_err(value_error)?;
            return Ok(Cache { cache, chat: layout.chat, layout: None, id: self.id.clone(), params, report: Some(report) });
        }
        let (cache, report) = py
            .detach(|| {
                let m = document_method(&self.model, method, solver, kvc::device::Device::Cpu)?;
                compact_context(&self.model, &self.tok, &layout, m.as_ref(), &opts)
            })
            .map_err(value_error)?;
        let params = opts.cache_params(method, solver, &layout);
        let report = serde_json::to_string(&report).map_err(value_error)?;
        Ok(Cache { cache, chat: layout.chat, layout: None, id: self.id.clone(), params, report: Some(report) })
    }

    /// Generate after `prompt`, as `kvcompact generate` does: with cache=None the prompt alone
    /// (chat=True wraps it as a user turn, after an optional system turn); with a cache, the
    /// prompt follows its context (a new user turn when the cache was made in chat mode). The
    /// cache is not changed. temperature 0 is greedy. Returns the generated text.
    #[pyo3(signature = (prompt, *, max_tokens = 64, cache = None, chat = false, system = None, temperature = 0.0, top_p = 0.9, seed = 0, ignore_eos = false))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        prompt: &str,
        max_tokens: usize,
        cache: Option<PyRef<'_, Cache>>,
        chat: bool,
        system: Option<&str>,
        temperature: f32,
        top_p: f32,
        seed: u64,
        ignore_eos: bool,
    ) -> PyResult<String> {
        if prompt.is_empty() {
            return Err(value_error("the prompt is empty"));
        }
        if let Some(c) = &cache {
            self.same_model(c)?;
        }
        let cached = cache.as_ref().map(|c| (&c.cache, c.chat));
        py.detach(|| -> kvc::Result<String> {
            let mut sampler = Sampler::checked(temperature, top_p, seed)?;
            let ids = generation_tokens(&self.model, &self.tok, prompt, chat, system, cached)?;
            let mut kv = cached.map_or_else(|| self.model.new_cache(), |(c, _)| c.clone().into_dtype(self.model.kv_dtype()));
            let mut st = self.model.new_state(DEFAULT_MAX_BATCH);
            let opts = GenOptions { max_tokens, stop_at_eos: !ignore_eos };
            let out = generate(&self.model, &mut st, &mut kv, &ids, &self.tok.eos_ids, &mut sampler, &opts, |_| Ok(()))?;
            self.tok.decode(&out.tokens, false)
        })
        .map_err(value_error)
    }

    /// Every position's logits (float32 [T, vocab]) of a raw prompt, as `kvcompact logits`
    /// writes them: text gets the model's special tokens (BOS); token ids are run as given.
    fn logits<'py>(&self, py: Python<'py>, input: Input) -> PyResult<Bound<'py, PyArray2<f32>>> {
        let ids = match input {
            Input::Text(t) => encode_prompt(&self.model, &self.tok, &t, false, 0).map_err(value_error)?,
            Input::Ids(v) => token_ids(&self.model, &v)?,
        };
        let logits = py
            .detach(|| -> kvc::Result<Vec<f32>> {
                let mut st = self.model.new_state(DEFAULT_MAX_BATCH);
                let mut cache = self.model.new_cache();
                self.model.forward(&mut st, &mut cache, &ids, Logits::All)?;
                Ok(std::mem::take(&mut st.logits))
            })
            .map_err(value_error)?;
        let vocab = self.model.config.vocab_size;
        Ok(Array2::from_shape_vec((ids.len(), vocab), logits).map_err(value_error)?.into_pyarray(py))
    }

    fn __repr__(&self) -> String {
        let c = &self.model.config;
        format!("Model({:?}: {} layers, {} KV heads of {})", self.model.dir.display().to_string(), c.n_layers, c.n_kv_heads, c.head_dim)
    }
}

/// A KV cache: per (layer, KV head) rows of keys, values, β and absolute positions.
/// From Model.prefill (full), Model.compact (compacted) or Cache.load.
#[pyclass(frozen, module = "kvcompact._kvcompact")]
pub struct Cache {
    cache: KvCache,
    /// Made in chat mode: a prompt after it is a new user turn.
    chat: bool,
    /// The context a prefill ran, so `Model.compact(cache)` can compact it; None otherwise.
    layout: Option<ContextLayout>,
    /// The model it belongs to (checked when it is used or loaded).
    id: ModelId,
    /// What the file records of how the cache was made.
    params: serde_json::Value,
    /// The compaction report (JSON), for caches from `Model.compact`.
    report: Option<String>,
}

#[pymethods]
impl Cache {
    /// One (layer, KV head)'s rows as a tuple of numpy arrays `(keys, values, positions, beta)`:
    /// keys and values float32 [n, head_dim] (a bf16 cache's rows widened exactly), positions
    /// int64 [n] (increasing), beta float32 [n] (zeros where no compaction fitted one).
    fn head<'py>(&self, py: Python<'py>, layer: i64, kv_head: i64) -> PyResult<Bound<'py, PyTuple>> {
        let (nl, nkv, hd) = (self.cache.n_layers, self.cache.n_kv_heads, self.cache.head_dim);
        let l = usize::try_from(layer).ok().filter(|&l| l < nl).ok_or_else(|| out_of("layer", layer, format!("{nl} layers")))?;
        let h = usize::try_from(kv_head).ok().filter(|&h| h < nkv).ok_or_else(|| out_of("kv_head", kv_head, format!("{nkv} KV heads")))?;
        let (store, meta) = (self.cache.store(l, h), self.cache.meta(l, h));
        let (keys, values, bias, positions) = (store.keys.to_f32(), store.values.to_f32(), meta.bias.as_deref(), &meta.positions);
        let n = positions.len();
        let keys = Array2::from_shape_vec((n, hd), keys.to_vec()).map_err(value_error)?.into_pyarray(py);
        let values = Array2::from_shape_vec((n, hd), values.to_vec()).map_err(value_error)?.into_pyarray(py);
        let positions = positions.iter().map(|&p| p as i64).collect::<Vec<i64>>().into_pyarray(py);
        let beta = bias.map_or_else(|| vec![0.0f32; n], <[f32]>::to_vec).into_pyarray(py);
        PyTuple::new(py, [keys.into_any(), values.into_any(), positions.into_any(), beta.into_any()])
    }

    /// How the cache stores key and value rows: "f32" or "bf16".
    #[getter]
    fn kv_dtype(&self) -> &'static str {
        self.cache.dtype().name()
    }

    /// Bytes the cache holds (keys, values, positions, β).
    #[getter]
    fn kv_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// Bytes the same context would hold uncompacted.
    #[getter]
    fn kv_bytes_full(&self) -> usize {
        self.cache.full_bytes()
    }

    /// Layers.
    #[getter]
    fn n_layers(&self) -> usize {
        self.cache.n_layers
    }

    /// KV heads per layer.
    #[getter]
    fn n_kv_heads(&self) -> usize {
        self.cache.n_kv_heads
    }

    /// Floats per key or value row.
    #[getter]
    fn head_dim(&self) -> usize {
        self.cache.head_dim
    }

    /// Rows of every (layer, KV head), summed.
    #[getter]
    fn rows(&self) -> usize {
        self.cache.total_rows()
    }

    /// Whether the context was laid out with the chat template.
    #[getter]
    fn chat(&self) -> bool {
        self.chat
    }

    /// How the cache was made (what its file records), as a dict.
    #[getter]
    fn params<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        py.import("json")?.call_method1("loads", (self.params.to_string(),))
    }

    /// The compaction report (sizes, timings, held-out errors per layer) as a dict; None for a
    /// cache that was not compacted here.
    #[getter]
    fn report<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        self.report.as_ref().map(|r| py.import("json")?.call_method1("loads", (r.as_str(),))).transpose()
    }

    /// The logical length: positions the context took (new tokens continue from here).
    fn __len__(&self) -> usize {
        self.cache.next_pos()
    }

    /// Save as a compacted-cache file (what `kvcompact compact --out` writes; `kvcompact
    /// generate --cache` reads it).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| save_cache(&path, &self.id, &self.cache, self.chat, &self.params)).map_err(value_error)
    }

    /// Load a cache file made for `model` (refused for any other model).
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf, model: PyRef<'_, Model>) -> PyResult<Cache> {
        let id = model.id.clone();
        let loaded = py.detach(|| load_cache(&path, &id)).map_err(value_error)?;
        Ok(Cache { cache: loaded.cache, chat: loaded.chat, layout: None, id, params: loaded.params, report: None })
    }

    fn __repr__(&self) -> String {
        format!(
            "Cache({} positions, {} layers × {} KV heads, {} rows, {} of {} bytes)",
            self.cache.next_pos(),
            self.cache.n_layers,
            self.cache.n_kv_heads,
            self.cache.total_rows(),
            self.cache.bytes(),
            self.cache.full_bytes()
        )
    }
}
