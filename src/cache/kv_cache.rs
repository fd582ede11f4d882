//! The KV cache: storage and metadata kept apart, both per (layer, KV head).
//!
//! - [`HeadStore`] is dumb contiguous storage: keys and values of one (layer, KV head), each
//!   `[rows, head_dim]` row-major in the cache's [`KvDtype`] (f32, or bf16 to halve the bytes),
//!   keys post-RoPE (and post-k_norm). Rows are computed in f32 and rounded once when stored;
//!   readers widen them exactly, so a bf16 cache behaves as an f32 cache holding rounded rows.
//! - [`HeadMeta`] says what each row is: its absolute position and, once any compaction has
//!   happened, an additive logit bias β (0 for rows that were never compacted).
//! - [`KvCache`] holds both for every (layer, KV head) plus one logical position counter for the
//!   sequence: the RoPE position the next token gets. The counter is independent of the
//!   physical row counts, which may differ per head (ragged) after compaction or eviction.
//!
//! - A **slim** cache (Slim Attention, see [`crate::model::slim`]) stores, for each layer that runs
//!   slim, only the pre-RoPE keys of all KV heads side by side ([`SlimStore`], [rows, kv_dim]);
//!   the values are rebuilt from them. [`SlimMeta`] holds what those layers share: one position
//!   and one RoPE cos/sin row per token, and each layer's [`SlimMode`]. Layers that are not slim
//!   use the per-head storage above.
//!
//! Invariant (checked by [`KvCache::check`]): in every head, positions are strictly increasing
//! and all below `next_pos`; keys, values, positions (and bias, if present) have one entry per row.

use std::borrow::Cow;

use kvcompact_kernels::WeightRef;

use crate::error::{Error, Result};

/// Rows are reserved in chunks of this many so appends rarely reallocate.
const GROW_ROWS: usize = 256;

/// The element type a cache stores its key and value rows in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// 4 bytes per element: the rows exactly as the forward pass computed them.
    #[default]
    F32,
    /// 2 bytes per element: rounded to nearest even when stored, widened exactly when read.
    Bf16,
}

impl KvDtype {
    /// Bytes per stored element.
    pub fn bytes(self) -> usize {
        match self {
            KvDtype::F32 => 4,
            KvDtype::Bf16 => 2,
        }
    }
    /// `"f32"` or `"bf16"`.
    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::Bf16 => "bf16",
        }
    }
    /// Parse `f32` or `bf16`.
    pub fn parse(s: &str) -> Result<KvDtype> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" => Ok(KvDtype::F32),
            "bf16" => Ok(KvDtype::Bf16),
            other => Err(Error::Invalid(format!("unknown KV dtype {other:?}: use f32 or bf16"))),
        }
    }
}

impl std::str::FromStr for KvDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<KvDtype> {
        KvDtype::parse(s)
    }
}

/// Key (or value) rows of one head in the cache's dtype, row-major `[rows, head_dim]`.
#[derive(Debug, Clone, PartialEq)]
pub enum KvRows {
    /// f32 elements.
    F32(Vec<f32>),
    /// bf16 bit patterns.
    Bf16(Vec<u16>),
}

impl Default for KvRows {
    fn default() -> KvRows {
        KvRows::F32(Vec::new())
    }
}

#[inline]
fn to_bf16(x: f32) -> u16 {
    half::bf16::from_f32(x).to_bits()
}

impl KvRows {
    /// No rows, stored as `dtype`.
    pub fn new(dtype: KvDtype) -> KvRows {
        match dtype {
            KvDtype::F32 => KvRows::F32(Vec::new()),
            KvDtype::Bf16 => KvRows::Bf16(Vec::new()),
        }
    }
    /// f32 rows stored as `dtype` (rounded to nearest even for bf16; moved, not copied, for f32).
    pub fn from_f32(data: Vec<f32>, dtype: KvDtype) -> KvRows {
        match dtype {
            KvDtype::F32 => KvRows::F32(data),
            KvDtype::Bf16 => KvRows::Bf16(data.iter().map(|&x| to_bf16(x)).collect()),
        }
    }
    /// The storage dtype.
    pub fn dtype(&self) -> KvDtype {
        match self {
            KvRows::F32(_) => KvDtype::F32,
            KvRows::Bf16(_) => KvDtype::Bf16,
        }
    }
    /// Number of elements (rows × head_dim).
    pub fn len(&self) -> usize {
        match self {
            KvRows::F32(v) => v.len(),
            KvRows::Bf16(v) => v.len(),
        }
    }
    /// True when no element is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn capacity(&self) -> usize {
        match self {
            KvRows::F32(v) => v.capacity(),
            KvRows::Bf16(v) => v.capacity(),
        }
    }
    fn reserve_exact(&mut self, extra: usize) {
        match self {
            KvRows::F32(v) => v.reserve_exact(extra),
            KvRows::Bf16(v) => v.reserve_exact(extra),
        }
    }
    /// Append f32 elements, rounded to the storage dtype.
    pub fn extend_from_f32(&mut self, x: &[f32]) {
        match self {
            KvRows::F32(v) => v.extend_from_slice(x),
            KvRows::Bf16(v) => v.extend(x.iter().map(|&x| to_bf16(x))),
        }
    }
    /// Keep the first `len` elements.
    pub fn truncate(&mut self, len: usize) {
        match self {
            KvRows::F32(v) => v.truncate(len),
            KvRows::Bf16(v) => v.truncate(len),
        }
    }
    /// Elements `range` as f32: borrowed for f32, widened (exactly) for bf16.
    pub fn range_f32(&self, range: std::ops::Range<usize>) -> Cow<'_, [f32]> {
        match self {
            KvRows::F32(v) => Cow::Borrowed(&v[range]),
            KvRows::Bf16(v) => {
                let mut out = vec![0.0f32; range.len()];
                kvcompact_kernels::widen_rows(WeightRef::Bf16(&v[range.clone()]), 0, 1, range.len(), &mut out);
                Cow::Owned(out)
            }
        }
    }
    /// Elements `range` as f32: borrowed for f32, widened (exactly) into `buf` for bf16, so a
    /// loop reuses one buffer.
    pub fn range_f32_in<'b>(&'b self, range: std::ops::Range<usize>, buf: &'b mut Vec<f32>) -> &'b [f32] {
        match self {
            KvRows::F32(v) => &v[range],
            KvRows::Bf16(v) => {
                buf.resize(range.len(), 0.0);
                kvcompact_kernels::widen_rows(WeightRef::Bf16(&v[range.clone()]), 0, 1, range.len(), buf);
                &buf[..]
            }
        }
    }
    /// Elements `range` as the kernels take them.
    pub fn range_weights(&self, range: std::ops::Range<usize>) -> WeightRef<'_> {
        match self {
            KvRows::F32(v) => WeightRef::F32(&v[range]),
            KvRows::Bf16(v) => WeightRef::Bf16(&v[range]),
        }
    }
    /// Every element as f32: borrowed for f32, widened (exactly) for bf16.
    pub fn to_f32(&self) -> Cow<'_, [f32]> {
        self.range_f32(0..self.len())
    }
    /// The same elements stored as `dtype`.
    pub fn to_dtype(&self, dtype: KvDtype) -> KvRows {
        if dtype == self.dtype() {
            return self.clone();
        }
        KvRows::from_f32(self.to_f32().into_owned(), dtype)
    }
}

/// Key and value rows of one (layer, KV head); what each row is lives in its [`HeadMeta`].
#[derive(Debug, Clone, Default)]
pub struct HeadStore {
    /// Post-RoPE (and post-k_norm) keys, row-major.
    pub keys: KvRows,   // [rows, head_dim]
    /// Values, row-major, one per key row.
    pub values: KvRows, // [rows, head_dim]
}

impl HeadStore {
    /// An empty store of `dtype`.
    pub fn new(dtype: KvDtype) -> HeadStore {
        HeadStore { keys: KvRows::new(dtype), values: KvRows::new(dtype) }
    }
}

/// What each row of a [`HeadStore`] is: its position and its logit bias.
#[derive(Debug, Clone, Default)]
pub struct HeadMeta {
    /// Absolute RoPE position of each row, strictly increasing, all below the cache's `next_pos`.
    pub positions: Vec<u32>,    // [rows] absolute RoPE position of each row, increasing
    /// Additive logit bias β per row (set by compaction); `None` means all zero.
    pub bias: Option<Vec<f32>>, // [rows] additive logit bias β; None means all zero
}

impl HeadMeta {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.positions.len()
    }
    /// True when the head holds no rows.
    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }
}

/// Everything a compaction method hands back for one (layer, KV head): rows to install.
#[derive(Debug, Clone)]
pub struct HeadRows {
    /// Post-RoPE keys, row-major.
    pub keys: Vec<f32>,         // [rows, head_dim]
    /// Values, row-major.
    pub values: Vec<f32>,       // [rows, head_dim]
    /// Absolute position of each row, strictly increasing and below the cache's `next_pos`.
    pub positions: Vec<u32>,    // [rows]
    /// Additive logit bias β per row; `None` means all zero.
    pub bias: Option<Vec<f32>>, // [rows]
}

/// How one layer of a slim cache holds its rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SlimMode {
    /// Not decided yet: the first prefill validates the layer on its real keys.
    Pending,
    /// Pre-RoPE keys only ([`SlimStore`]); values rebuilt from them.
    Slim,
    /// A normal per-head K/V cache (the layer failed a slim gate).
    Full,
}

/// K-only storage of one slim layer.
#[derive(Debug, Clone, Default)]
pub struct SlimStore {
    /// Pre-RoPE keys of every KV head of the layer, row-major, one row per token.
    pub k_raw: Vec<f32>, // [rows, kv_dim] k0 = x·W_K (no bias, no RoPE), all KV heads side by side
}

/// Metadata shared by the slim layers of a cache. A slim layer's rows are the first
/// `k_raw.len() / kv_dim` entries of `positions` (all slim layers hold the same tokens).
#[derive(Debug, Clone, Default)]
pub struct SlimMeta {
    /// Absolute position of each token held by the slim layers, strictly increasing.
    pub positions: Vec<u32>,       // [rows] absolute position of each token, increasing
    /// RoPE row per token: `head_dim/2` cos then `head_dim/2` sin at its position.
    pub rope: Vec<f32>,            // [rows, head_dim] cos (first half) | sin (second half) at that position
    /// How each layer holds its rows.
    pub modes: Vec<SlimMode>,      // [n_layers]
    /// Per layer, the relative error of V rebuilt from K on the first prefill (`None`: not validated).
    pub val_err: Vec<Option<f64>>, // [n_layers] rel. error of V rebuilt on the first prefill
    /// Number of tokens the validation used (of the last layer decided).
    pub val_tokens: usize,         // tokens that validation used
}

/// The KV cache of one sequence: per-(layer, KV head) rows, the slim layers' K-only rows, and
/// the logical position counter (see the module docs).
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Number of transformer layers.
    pub n_layers: usize,
    /// KV heads per layer.
    pub n_kv_heads: usize,
    /// Floats per key / value row.
    pub head_dim: usize,
    dtype: KvDtype,
    store: Vec<HeadStore>, // [n_layers * n_kv_heads]
    meta: Vec<HeadMeta>,   // [n_layers * n_kv_heads]
    slim_store: Vec<SlimStore>, // [n_layers] when slim, else empty
    slim_meta: Option<SlimMeta>,
    next_pos: usize,
}

impl KvCache {
    /// An empty normal (non-slim) f32 cache with `next_pos` 0.
    pub fn new(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> KvCache {
        KvCache::with_dtype(n_layers, n_kv_heads, head_dim, KvDtype::F32)
    }

    /// An empty normal (non-slim) cache storing its rows as `dtype`.
    pub fn with_dtype(n_layers: usize, n_kv_heads: usize, head_dim: usize, dtype: KvDtype) -> KvCache {
        let n = n_layers * n_kv_heads;
        KvCache {
            n_layers,
            n_kv_heads,
            head_dim,
            dtype,
            store: vec![HeadStore::new(dtype); n],
            meta: vec![HeadMeta::default(); n],
            slim_store: Vec::new(),
            slim_meta: None,
            next_pos: 0,
        }
    }

    /// A cache whose layers may run slim (each decided on the first prefill).
    pub fn new_slim(n_layers: usize, n_kv_heads: usize, head_dim: usize) -> KvCache {
        let mut c = KvCache::new(n_layers, n_kv_heads, head_dim);
        c.slim_store = vec![SlimStore::default(); n_layers];
        c.slim_meta = Some(SlimMeta {
            modes: vec![SlimMode::Pending; n_layers],
            val_err: vec![None; n_layers],
            ..Default::default()
        });
        c
    }

    /// The dtype its key and value rows are stored in.
    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// The same cache with its rows stored as `dtype` (rounded to nearest even when narrowing;
    /// exact when widening). Slim layers keep their f32 pre-RoPE keys.
    pub fn into_dtype(mut self, dtype: KvDtype) -> KvCache {
        if dtype != self.dtype {
            self.dtype = dtype;
            for s in &mut self.store {
                *s = HeadStore { keys: s.keys.to_dtype(dtype), values: s.values.to_dtype(dtype) };
            }
        }
        self
    }

    /// True for a cache made by [`KvCache::new_slim`] (even if no layer ended up slim).
    pub fn is_slim(&self) -> bool {
        self.slim_meta.is_some()
    }

    /// The layer's slim mode, or None for a normal cache.
    pub fn slim_mode(&self, layer: usize) -> Option<SlimMode> {
        self.slim_meta.as_ref().map(|m| m.modes[layer])
    }

    /// The slim layers' shared metadata, or None for a normal cache.
    pub fn slim_meta(&self) -> Option<&SlimMeta> {
        self.slim_meta.as_ref()
    }

    /// Record a layer's decision (and the validation error it was based on).
    pub fn set_slim_mode(&mut self, layer: usize, mode: SlimMode, err: Option<f64>, tokens: usize) {
        let m = self.slim_meta.as_mut().expect("set_slim_mode on a slim cache");
        m.modes[layer] = mode;
        m.val_err[layer] = err;
        m.val_tokens = tokens;
    }

    /// Register a chunk's tokens with the slim layers: positions `[n]` and their RoPE rows
    /// (`cos`, `sin`: `[n, head_dim/2]`). Called once per chunk, before the layers append keys.
    pub fn slim_push_positions(&mut self, positions: &[u32], cos: &[f32], sin: &[f32]) {
        let half = self.head_dim / 2;
        let m = self.slim_meta.as_mut().expect("slim_push_positions on a slim cache");
        m.positions.extend_from_slice(positions);
        for i in 0..positions.len() {
            m.rope.extend_from_slice(&cos[i * half..(i + 1) * half]);
            m.rope.extend_from_slice(&sin[i * half..(i + 1) * half]);
        }
    }

    /// Append pre-RoPE key rows [n, kv_dim] to a slim layer.
    pub fn slim_append(&mut self, layer: usize, k_raw: &[f32]) {
        let kvd = self.n_kv_heads * self.head_dim;
        let s = &mut self.slim_store[layer].k_raw;
        if s.capacity() < s.len() + k_raw.len() {
            let rows = (s.len() + k_raw.len()).div_ceil(kvd).div_ceil(GROW_ROWS) * GROW_ROWS;
            s.reserve_exact(rows * kvd - s.len());
        }
        s.extend_from_slice(k_raw);
    }

    /// A slim layer's pre-RoPE keys [rows, kv_dim] and the shared metadata.
    pub fn slim_layer(&self, layer: usize) -> (&[f32], &SlimMeta) {
        (&self.slim_store[layer].k_raw, self.slim_meta.as_ref().expect("slim_layer on a slim cache"))
    }

    fn slim_rows(&self, layer: usize) -> usize {
        match self.slim_mode(layer) {
            Some(SlimMode::Slim) => self.slim_store[layer].k_raw.len() / (self.n_kv_heads * self.head_dim),
            _ => 0,
        }
    }

    #[inline]
    fn idx(&self, layer: usize, head: usize) -> usize {
        debug_assert!(layer < self.n_layers && head < self.n_kv_heads);
        layer * self.n_kv_heads + head
    }

    /// The RoPE position the next appended token receives (the sequence's logical length).
    pub fn next_pos(&self) -> usize {
        self.next_pos
    }

    /// Physical rows held by one (layer, KV head).
    pub fn len(&self, layer: usize, head: usize) -> usize {
        self.meta[self.idx(layer, head)].len() + self.slim_rows(layer)
    }

    /// Largest physical row count over all heads.
    pub fn max_len(&self) -> usize {
        let slim = (0..self.n_layers).map(|l| self.slim_rows(l)).max().unwrap_or(0);
        self.meta.iter().map(HeadMeta::len).max().unwrap_or(0).max(slim)
    }

    /// True when no head and no slim layer holds a row (`next_pos` may still be non-zero).
    pub fn is_empty(&self) -> bool {
        self.meta.iter().all(HeadMeta::is_empty) && self.slim_store.iter().all(|s| s.k_raw.is_empty())
    }

    /// Positions and bias of one (layer, KV head)'s per-head rows (empty for a slim layer).
    pub fn meta(&self, layer: usize, head: usize) -> &HeadMeta {
        &self.meta[self.idx(layer, head)]
    }

    /// Keys and values of one (layer, KV head)'s per-head rows (empty for a slim layer).
    pub fn store(&self, layer: usize, head: usize) -> &HeadStore {
        &self.store[self.idx(layer, head)]
    }

    /// Keys and values (`[rows, head_dim]`), bias and positions (`[rows]`) of a head of an f32
    /// cache: what compaction methods read. Compaction works on f32 caches (the entry points
    /// convert a bf16 cache with [`KvCache::into_dtype`] and round the result back).
    ///
    /// # Panics
    /// On a cache not stored as f32: read [`KvCache::store`] (or convert) instead.
    // A plain tuple of borrowed slices; a named type would add a public item for one call site.
    #[allow(clippy::type_complexity)]
    pub fn head(&self, layer: usize, head: usize) -> (&[f32], &[f32], Option<&[f32]>, &[u32]) {
        let i = self.idx(layer, head);
        let (s, m) = (&self.store[i], &self.meta[i]);
        match (&s.keys, &s.values) {
            (KvRows::F32(k), KvRows::F32(v)) => (k, v, m.bias.as_deref(), &m.positions),
            _ => panic!("KvCache::head reads f32 rows; this cache stores {} (convert it with into_dtype)", self.dtype.name()),
        }
    }

    /// The heads of one layer: storage and metadata slices, indexed by KV head.
    pub fn layer(&self, layer: usize) -> (&[HeadStore], &[HeadMeta]) {
        let r = layer * self.n_kv_heads..(layer + 1) * self.n_kv_heads;
        (&self.store[r.clone()], &self.meta[r])
    }

    /// Make room for `extra` more rows in every head of `layer` (amortised, chunked).
    pub fn reserve(&mut self, layer: usize, extra: usize) {
        let hd = self.head_dim;
        for h in 0..self.n_kv_heads {
            let i = self.idx(layer, h);
            let need = self.meta[i].len() + extra;
            let s = &mut self.store[i];
            if s.keys.capacity() < need * hd {
                let rows = need.div_ceil(GROW_ROWS) * GROW_ROWS;
                s.keys.reserve_exact(rows * hd - s.keys.len());
                s.values.reserve_exact(rows * hd - s.values.len());
            }
        }
    }

    /// Append rows to one head: `keys`/`values` are `[n, head_dim]`, `positions` `[n]`, new rows
    /// get bias 0. Positions must continue the head's increasing order.
    pub fn append(&mut self, layer: usize, head: usize, keys: &[f32], values: &[f32], positions: &[u32]) {
        debug_assert_eq!(keys.len(), positions.len() * self.head_dim);
        debug_assert_eq!(values.len(), positions.len() * self.head_dim);
        self.append_strided(layer, head, keys, values, self.head_dim, 0, positions);
    }

    /// Append n rows taken from token-major buffers [n, row_stride] (all KV heads side by side),
    /// this head's slice starting at column `col`. Avoids a gather copy in the forward pass.
    #[allow(clippy::too_many_arguments)]
    pub fn append_strided(&mut self, layer: usize, head: usize, k_rows: &[f32], v_rows: &[f32], row_stride: usize, col: usize, positions: &[u32]) {
        let hd = self.head_dim;
        let i = self.idx(layer, head);
        let m = &mut self.meta[i];
        debug_assert!(m.positions.last().zip(positions.first()).is_none_or(|(a, b)| a < b));
        m.positions.extend_from_slice(positions);
        if let Some(b) = m.bias.as_mut() {
            b.resize(m.positions.len(), 0.0);
        }
        let s = &mut self.store[i];
        for r in 0..positions.len() {
            let at = r * row_stride + col;
            s.keys.extend_from_f32(&k_rows[at..at + hd]);
            s.values.extend_from_f32(&v_rows[at..at + hd]);
        }
    }

    /// Advance the logical counter after a forward pass has appended `n` tokens.
    pub fn advance(&mut self, n: usize) {
        self.next_pos += n;
    }

    /// Replace one head's rows wholesale (compaction / eviction). The logical counter is kept.
    pub fn replace_head(&mut self, layer: usize, head: usize, rows: HeadRows) -> Result<()> {
        let hd = self.head_dim;
        let n = rows.positions.len();
        if rows.keys.len() != n * hd || rows.values.len() != n * hd || rows.bias.as_ref().is_some_and(|b| b.len() != n) {
            return Err(Error::Shape {
                op: "KvCache::replace_head",
                expected: format!("{n} rows of head_dim {hd}"),
                got: format!("keys {}, values {}, bias {:?}", rows.keys.len(), rows.values.len(), rows.bias.as_ref().map(Vec::len)),
            });
        }
        if rows.positions.windows(2).any(|w| w[0] >= w[1]) || rows.positions.last().is_some_and(|&p| p as usize >= self.next_pos) {
            return Err(Error::Invalid(format!(
                "KvCache::replace_head: positions must be strictly increasing and below {}",
                self.next_pos
            )));
        }
        if self.slim_mode(layer) == Some(SlimMode::Slim) {
            return Err(Error::Invalid(format!(
                "KvCache::replace_head: layer {layer} is a slim (K-only) layer; its heads cannot be replaced one by one"
            )));
        }
        let i = self.idx(layer, head);
        self.store[i] = HeadStore { keys: KvRows::from_f32(rows.keys, self.dtype), values: KvRows::from_f32(rows.values, self.dtype) };
        self.meta[i] = HeadMeta { positions: rows.positions, bias: rows.bias };
        Ok(())
    }

    /// Drop every row whose position is ≥ `pos` and set the logical counter to `pos`
    /// (roll back to a shared prefix, e.g. after answering one question about a document).
    pub fn truncate_to(&mut self, pos: usize) {
        for l in 0..self.n_layers {
            self.truncate_layer_to(l, pos);
        }
        if let Some(m) = self.slim_meta.as_mut() {
            let keep = m.positions.partition_point(|&p| (p as usize) < pos);
            m.positions.truncate(keep);
            m.rope.truncate(keep * self.head_dim);
        }
        self.next_pos = self.next_pos.min(pos);
    }

    /// Drop the rows of one layer whose position is ≥ `pos` (the logical counter is untouched):
    /// used when extra tokens were run through a single layer and must not stay in its cache.
    pub fn truncate_layer_to(&mut self, layer: usize, pos: usize) {
        let hd = self.head_dim;
        for h in 0..self.n_kv_heads {
            let i = self.idx(layer, h);
            let m = &mut self.meta[i];
            let keep = m.positions.partition_point(|&p| (p as usize) < pos);
            m.positions.truncate(keep);
            if let Some(b) = m.bias.as_mut() {
                b.truncate(keep);
            }
            self.store[i].keys.truncate(keep * hd);
            self.store[i].values.truncate(keep * hd);
        }
        if let Some(m) = self.slim_meta.as_ref() {
            let kvd = self.n_kv_heads * hd;
            let s = &mut self.slim_store[layer].k_raw;
            let rows = s.len() / kvd;
            let keep = m.positions[..rows].partition_point(|&p| (p as usize) < pos);
            s.truncate(keep * kvd);
        }
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        self.truncate_to(0);
    }

    /// Bytes one row of one (layer, KV head) costs without β: key and value in `dtype`, u32
    /// position.
    pub fn row_bytes(head_dim: usize, dtype: KvDtype) -> usize {
        2 * head_dim * dtype.bytes() + 4
    }

    /// Bytes held for keys, values (in the cache's dtype), positions and biases (what the cache really costs); for
    /// slim layers the pre-RoPE keys, plus one position and RoPE row per token they share.
    pub fn bytes(&self) -> usize {
        let rows: usize = self.meta.iter().map(HeadMeta::len).sum();
        let bias_rows: usize = self.meta.iter().filter_map(|m| m.bias.as_ref()).map(Vec::len).sum();
        rows * Self::row_bytes(self.head_dim, self.dtype) + bias_rows * 4 + self.slim_bytes()
    }

    /// Bytes the same context would hold uncompacted: one row per logical position in every
    /// (layer, KV head), without β.
    pub fn full_bytes(&self) -> usize {
        self.next_pos() * self.n_layers * self.n_kv_heads * Self::row_bytes(self.head_dim, self.dtype)
    }

    /// The slim part of [`KvCache::bytes`]: K-only rows, and the shared positions / RoPE rows
    /// when any layer is slim.
    pub fn slim_bytes(&self) -> usize {
        let k: usize = self.slim_store.iter().map(|s| s.k_raw.len() * 4).sum();
        let shared = match &self.slim_meta {
            Some(m) if m.modes.contains(&SlimMode::Slim) => m.positions.len() * 4 + m.rope.len() * 4,
            _ => 0,
        };
        k + shared
    }

    /// Total rows over all (layer, KV head).
    pub fn total_rows(&self) -> usize {
        let slim: usize = (0..self.n_layers).map(|l| self.slim_rows(l) * self.n_kv_heads).sum();
        self.meta.iter().map(HeadMeta::len).sum::<usize>() + slim
    }

    /// Verify the invariants; used by tests and after loading a cache from disk.
    pub fn check(&self) -> Result<()> {
        let hd = self.head_dim;
        for (i, (s, m)) in self.store.iter().zip(&self.meta).enumerate() {
            let (layer, head) = (i / self.n_kv_heads, i % self.n_kv_heads);
            let n = m.len();
            let bad = |msg: String| Err(Error::Invalid(format!("KV cache layer {layer} head {head}: {msg}")));
            if s.keys.len() != n * hd || s.values.len() != n * hd {
                return bad(format!("{n} positions but {} key and {} value floats", s.keys.len(), s.values.len()));
            }
            if s.keys.dtype() != self.dtype || s.values.dtype() != self.dtype {
                return bad(format!("rows stored as {} in a {} cache", s.keys.dtype().name(), self.dtype.name()));
            }
            if m.bias.as_ref().is_some_and(|b| b.len() != n) {
                return bad("bias length differs from row count".into());
            }
            if m.positions.windows(2).any(|w| w[0] >= w[1]) {
                return bad("positions are not strictly increasing".into());
            }
            if m.positions.last().is_some_and(|&p| p as usize >= self.next_pos) {
                return bad(format!("a position is ≥ the logical length {}", self.next_pos));
            }
        }
        if let Some(m) = &self.slim_meta {
            let kvd = self.n_kv_heads * hd;
            let bad = |msg: String| Err(Error::Invalid(format!("slim KV cache: {msg}")));
            if m.rope.len() != m.positions.len() * hd {
                return bad("RoPE rows differ from positions".into());
            }
            if m.positions.windows(2).any(|w| w[0] >= w[1]) {
                return bad("positions are not strictly increasing".into());
            }
            for (l, s) in self.slim_store.iter().enumerate() {
                if s.k_raw.len() % kvd != 0 || s.k_raw.len() / kvd > m.positions.len() {
                    return bad(format!("layer {l} holds {} key floats for {} positions", s.k_raw.len(), m.positions.len()));
                }
                if m.modes[l] != SlimMode::Slim && !s.k_raw.is_empty() {
                    return bad(format!("layer {l} is not slim but holds K-only rows"));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(n: usize, hd: usize, start: u32) -> (Vec<f32>, Vec<f32>, Vec<u32>) {
        let k = (0..n * hd).map(|i| i as f32).collect();
        let v = (0..n * hd).map(|i| -(i as f32)).collect();
        (k, v, (start..start + n as u32).collect())
    }

    #[test]
    fn append_truncate_replace_keep_invariants() {
        let mut c = KvCache::new(2, 3, 4);
        for l in 0..2 {
            c.reserve(l, 5);
            for h in 0..3 {
                let (k, v, p) = rows(5, 4, 0);
                c.append(l, h, &k, &v, &p);
            }
        }
        c.advance(5);
        c.check().unwrap();
        assert_eq!((c.len(1, 2), c.next_pos(), c.total_rows()), (5, 5, 30));
        assert_eq!(c.bytes(), 30 * (2 * 4 * 4 + 4));

        // Compact one head to 2 rows with a bias; others stay. The counter does not move.
        let kept = HeadRows { keys: vec![1.0; 8], values: vec![2.0; 8], positions: vec![1, 3], bias: Some(vec![0.5, -0.5]) };
        c.replace_head(0, 1, kept).unwrap();
        assert_eq!((c.len(0, 1), c.len(0, 0), c.next_pos()), (2, 5, 5));
        // New tokens continue at the logical position and get bias 0.
        let (k, v, _) = rows(1, 4, 0);
        c.append(0, 1, &k, &v, &[5]);
        c.advance(1);
        assert_eq!(c.meta(0, 1).bias.as_deref(), Some(&[0.5, -0.5, 0.0][..]));
        assert_eq!(c.meta(0, 1).positions, vec![1, 3, 5]);
        c.check().unwrap();

        c.truncate_to(3);
        assert_eq!((c.len(0, 1), c.len(0, 0), c.next_pos()), (1, 3, 3));
        assert_eq!(c.meta(0, 1).bias.as_deref(), Some(&[0.5][..]));
        c.check().unwrap();
    }

    #[test]
    fn replace_head_rejects_bad_rows() {
        let mut c = KvCache::new(1, 1, 2);
        c.advance(4);
        let unsorted = HeadRows { keys: vec![0.0; 4], values: vec![0.0; 4], positions: vec![2, 1], bias: None };
        assert!(c.replace_head(0, 0, unsorted).is_err());
        let future = HeadRows { keys: vec![0.0; 2], values: vec![0.0; 2], positions: vec![4], bias: None };
        assert!(c.replace_head(0, 0, future).is_err());
        let short = HeadRows { keys: vec![0.0; 3], values: vec![0.0; 4], positions: vec![0, 1], bias: None };
        assert!(c.replace_head(0, 0, short).is_err());
    }
}
