//! The document store: compacted caches made once by `POST /v1/documents` and started from by
//! many chats. Each document is two files in the store directory — `<id>.safetensors` (the
//! compacted-cache file format, fingerprint-checked on load) and `<id>.json` (what the API
//! returns, plus the context's token ids) — both written to a temporary name and renamed, so a
//! crash never leaves half a document. Documents survive restarts; the most recently used ones
//! stay in RAM within a byte budget, the rest are read back on demand.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::cache::{load_cache, save_cache, KvCache, KvDtype, ModelId};
use crate::document::CompactReport;
use crate::error::{Error, Result};
use crate::model::Model;

/// What the API says about a document (`POST` / `GET /v1/documents`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DocumentInfo {
    /// `doc-` and 16 hex digits of the text's and parameters' hash.
    pub id: String,
    /// Always `"document"`.
    pub object: String,
    /// Context tokens (template and text).
    pub tokens: usize,
    /// KV bytes the full context would hold.
    pub kv_bytes_full: usize,
    /// KV bytes of the compacted cache.
    pub kv_bytes: usize,
    /// Seconds the compaction took (prefill, queries, fit).
    pub compact_seconds: f64,
    /// Held-out attention fidelity of the compaction.
    pub fidelity: Fidelity,
    /// Method and ratio used.
    pub method: String,
    /// Compaction ratio.
    pub ratio: f64,
    /// Unix seconds when it was made.
    pub created: u64,
}

/// Held-out errors of a compaction, averaged over heads.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Fidelity {
    /// Relative L2 error of attention outputs.
    pub rel_l2: f64,
    /// Attention-mass error.
    pub mass_err: f64,
}

/// The `.json` file beside a document's cache.
#[derive(Serialize, Deserialize)]
struct Record {
    info: DocumentInfo,
    /// Token ids of the context (the text behind the rows).
    context: Vec<u32>,
    /// Rendered with the chat template.
    chat: bool,
}

/// A document ready to start a sequence from.
#[derive(Clone)]
pub struct Loaded {
    /// The compacted cache (copied for each sequence).
    pub cache: Arc<KvCache>,
    /// Its context's token ids.
    pub context: Arc<Vec<u32>>,
    /// Rendered with the chat template.
    pub chat: bool,
}

/// The store (cheap to share: the engine inserts, routes read).
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    model: ModelId,
    kv_dtype: KvDtype, // documents read from their files are held in RAM as the sequences hold rows
    inner: Arc<Mutex<Inner>>,
    hot_budget: usize,
}

struct Inner {
    infos: HashMap<String, (DocumentInfo, bool)>,
    /// In RAM, most recently used last.
    hot: Vec<(String, Loaded)>,
}

impl Store {
    /// Open (creating) `dir` and index the documents in it made for `model`; documents of other
    /// models are skipped with a warning. `hot_budget` bytes of caches stay in RAM.
    pub fn open(dir: &Path, model: &Model, hot_budget: usize) -> Result<Store> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let id = model.cache_id();
        let mut infos = HashMap::new();
        let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
        for entry in entries.flatten() {
            let p = entry.path();
            if p.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match read_record(&p) {
                Ok(r) if dir.join(format!("{}.safetensors", r.info.id)).exists() => {
                    infos.insert(r.info.id.clone(), (r.info, r.chat));
                }
                Ok(_) => tracing::warn!("{}: its cache file is missing; skipped", p.display()),
                Err(e) => tracing::warn!("{}: {e}; skipped", p.display()),
            }
        }
        Ok(Store { dir: dir.into(), model: id, kv_dtype: model.kv_dtype(), inner: Arc::new(Mutex::new(Inner { infos, hot: Vec::new() })), hot_budget })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Save a new document and keep it hot.
    #[allow(clippy::too_many_arguments)]
    pub fn insert(&self, model: &Model, cache: KvCache, chat: bool, method: &str, ratio: f64, report: &CompactReport, full_bytes: usize, context: Vec<u32>) -> Result<DocumentInfo> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for t in &context {
            h.update(t.to_le_bytes());
        }
        h.update(format!("|{method}|{ratio}|{}", report.queries).as_bytes());
        let hex: String = h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect();
        let id = format!("doc-{hex}");
        let info = DocumentInfo {
            id: id.clone(),
            object: "document".into(),
            tokens: context.len(),
            kv_bytes_full: full_bytes,
            kv_bytes: cache.bytes(),
            compact_seconds: report.total_seconds,
            fidelity: Fidelity { rel_l2: report.mean_rel_l2, mass_err: report.mean_mass_err },
            method: method.to_string(),
            ratio,
            created: super::api::now_secs(),
        };
        let params = serde_json::json!({"method": method, "ratio": ratio, "queries": report.queries, "document": id});
        save_cache(&self.cache_path(&id), &model.cache_id(), &cache, chat, &params)?;
        let record = Record { info: info.clone(), context: context.clone(), chat };
        let text = serde_json::to_string_pretty(&record).map_err(|e| Error::Invalid(e.to_string()))?;
        let json = self.dir.join(format!("{id}.json"));
        let tmp = crate::tensor_file::tmp_path(&json);
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &json).map_err(|e| Error::io(&json, e))?;
        let mut inner = self.lock();
        inner.infos.insert(id.clone(), (info.clone(), chat));
        let loaded = Loaded { cache: Arc::new(cache), context: Arc::new(context), chat };
        self.make_hot(&mut inner, &id, loaded);
        Ok(info)
    }

    fn cache_path(&self, id: &str) -> PathBuf {
        self.dir.join(format!("{id}.safetensors"))
    }

    /// Every document, oldest first.
    pub fn list(&self) -> Vec<DocumentInfo> {
        let mut v: Vec<DocumentInfo> = self.lock().infos.values().map(|(i, _)| i.clone()).collect();
        v.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        v
    }

    /// One document's info.
    pub fn info(&self, id: &str) -> Option<DocumentInfo> {
        self.lock().infos.get(id).map(|(i, _)| i.clone())
    }

    /// A document's cache, from RAM or read back from its file (checked against the model).
    pub fn get(&self, id: &str) -> Result<Option<Loaded>> {
        {
            let mut inner = self.lock();
            if !inner.infos.contains_key(id) {
                return Ok(None);
            }
            if let Some(k) = inner.hot.iter().position(|(h, _)| h == id) {
                let entry = inner.hot.remove(k);
                let loaded = entry.1.clone();
                inner.hot.push(entry);
                return Ok(Some(loaded));
            }
        }
        let loaded_file = load_cache(&self.cache_path(id), &self.model)?;
        let record = read_record(&self.dir.join(format!("{id}.json")))?;
        let loaded = Loaded { cache: Arc::new(loaded_file.cache.into_dtype(self.kv_dtype)), context: Arc::new(record.context), chat: record.chat };
        let mut inner = self.lock();
        self.make_hot(&mut inner, id, loaded.clone());
        Ok(Some(loaded))
    }

    /// Delete a document (its files and its RAM copy); false when there was none.
    pub fn delete(&self, id: &str) -> Result<bool> {
        let mut inner = self.lock();
        if inner.infos.remove(id).is_none() {
            return Ok(false);
        }
        inner.hot.retain(|(h, _)| h != id);
        for p in [self.cache_path(id), self.dir.join(format!("{id}.json"))] {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(Error::io(&p, e));
                }
            }
        }
        Ok(true)
    }

    /// Bytes of the documents held in RAM.
    pub fn hot_bytes(&self) -> usize {
        self.lock().hot.iter().map(|(_, l)| l.cache.bytes()).sum()
    }

    /// Drop the least recently used documents from RAM until at most `target` bytes of them stay
    /// there (they are read back from their files when asked for again); the bytes dropped.
    pub fn shed_hot(&self, target: usize) -> usize {
        let mut inner = self.lock();
        let mut total: usize = inner.hot.iter().map(|(_, l)| l.cache.bytes()).sum();
        let mut freed = 0;
        while total > target && !inner.hot.is_empty() {
            let (_, l) = inner.hot.remove(0);
            total -= l.cache.bytes();
            freed += l.cache.bytes();
        }
        freed
    }

    /// Put `loaded` last in the LRU and evict the least recently used beyond the budget (the
    /// newest always stays).
    fn make_hot(&self, inner: &mut Inner, id: &str, loaded: Loaded) {
        inner.hot.retain(|(h, _)| h != id);
        inner.hot.push((id.to_string(), loaded));
        let mut total: usize = inner.hot.iter().map(|(_, l)| l.cache.bytes()).sum();
        while total > self.hot_budget && inner.hot.len() > 1 {
            let (_, l) = inner.hot.remove(0);
            total -= l.cache.bytes();
        }
    }
}

fn read_record(p: &Path) -> Result<Record> {
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: not a document record: {e}", p.display())))
}
