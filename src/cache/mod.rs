//! The KV cache: ragged per-(layer, KV head) storage with its metadata kept apart
//! ([`kv_cache`]), and the compacted-cache file format ([`file`](mod@file)).

pub mod file;
pub mod kv_cache;

pub use file::{load_cache, save_cache, LoadedCache, ModelId, CACHE_FORMAT};
pub use kv_cache::{HeadMeta, HeadRows, HeadStore, KvCache, KvDtype, KvRows, SlimMeta, SlimMode, SlimStore};
