//! Shared pieces of the fuzz targets: a scratch directory per process, a tiny model built once,
//! the input split, and the invariant every target checks — an error is one non-empty line.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use kvcompact::model::synth::{write_llama, SynthSpec};
use kvcompact::model::Model;

/// A directory of this process's own (fuzz targets write the input where a reader wants a path).
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a scratch directory")).path()
}

/// A fresh subdirectory of [`scratch`], emptied first.
pub fn fresh_dir(name: &str) -> PathBuf {
    let d = scratch().join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("scratch subdirectory");
    d
}

/// Shape of the tiny synthetic model the cache and model-directory targets use: every code
/// path of a real one (GQA, RoPE, tied embeddings) at a few kilobytes.
pub fn tiny_spec() -> SynthSpec {
    SynthSpec { hidden: 16, heads: 4, kv_heads: 2, layers: 2, ff: 24, vocab: 32, max_pos: 64, seed: 7 }
}

/// The tiny model, written and loaded once per process.
pub fn tiny_model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let dir = scratch().join("tiny-model");
        write_llama(&dir, &tiny_spec()).expect("write the tiny model");
        Model::load(&dir).expect("load the tiny model")
    })
}

/// Split `data` as `[len: u16 LE][len bytes][rest]` (short inputs give what they have).
pub fn split(data: &[u8]) -> (&[u8], &[u8]) {
    if data.len() < 2 {
        return (data, &[]);
    }
    let n = (u16::from_le_bytes([data[0], data[1]]) as usize).min(data.len() - 2);
    (&data[2..2 + n], &data[2 + n..])
}

/// Join two parts the way [`split`] reads them (for seeds).
pub fn join(a: &[u8], b: &[u8]) -> Vec<u8> {
    let n = u16::try_from(a.len()).expect("first part under 64 KiB");
    let mut v = n.to_le_bytes().to_vec();
    v.extend_from_slice(a);
    v.extend_from_slice(b);
    v
}

/// The invariant: an error message is one non-empty line (a panic would already have crashed).
pub fn check_error(e: &dyn std::fmt::Display) {
    let s = e.to_string();
    assert!(!s.trim().is_empty(), "empty error message");
    assert!(!s.contains('\n'), "error message spans lines: {s:?}");
}
