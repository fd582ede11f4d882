//! GGUF reader, dequantisation and llama conversion, on synthetic files built here and on the
//! gguf-py reference in golden/gguf/ (see golden/gguf/gen_quant_ref.py).
//!
//! Every malformed input must come back as the expected `GgufError` variant; none may panic.

use std::path::{Path, PathBuf};

use kvcompact::gguf::{
    convert_gguf, dequant, hf_tensor_plan, hf_tensor_values, tokenizer_from_gguf, GgmlType,
    GgufError, GgufFile, OutDtype, Value,
};

// ------------------------------------------------------------------------------------------------
// A tiny GGUF writer with knobs for every kind of damage.

#[derive(Clone, Debug)]
enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// A string whose bytes are given raw (e.g. invalid UTF-8).
    RawStr(Vec<u8>),
    Arr(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
    /// Any type id followed by raw payload bytes.
    Raw(u32, Vec<u8>),
}

impl V {
    fn type_id(&self) -> u32 {
        match self {
            V::U8(_) => 0,
            V::I8(_) => 1,
            V::U16(_) => 2,
            V::I16(_) => 3,
            V::U32(_) => 4,
            V::I32(_) => 5,
            V::F32(_) => 6,
            V::Bool(_) => 7,
            V::Str(_) | V::RawStr(_) => 8,
            V::Arr(..) => 9,
            V::U64(_) => 10,
            V::I64(_) => 11,
            V::F64(_) => 12,
            V::Raw(t, _) => *t,
        }
    }
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            V::U8(x) => out.push(*x),
            V::I8(x) => out.push(*x as u8),
            V::U16(x) => out.extend(x.to_le_bytes()),
            V::I16(x) => out.extend(x.to_le_bytes()),
            V::U32(x) => out.extend(x.to_le_bytes()),
            V::I32(x) => out.extend(x.to_le_bytes()),
            V::F32(x) => out.extend(x.to_le_bytes()),
            V::Bool(x) => out.push(*x as u8),
            V::Str(s) => put_str(out, s.as_bytes()),
            V::RawStr(b) => put_str(out, b),
            V::Arr(t, items) => {
                out.extend(t.to_le_bytes());
                out.extend((items.len() as u64).to_le_bytes());
                for it in items {
                    it.encode(out);
                }
            }
            V::U64(x) => out.extend(x.to_le_bytes()),
            V::I64(x) => out.extend(x.to_le_bytes()),
            V::F64(x) => out.extend(x.to_le_bytes()),
            V::Raw(_, b) => out.extend(b),
        }
    }
}

fn put_str(out: &mut Vec<u8>, b: &[u8]) {
    out.extend((b.len() as u64).to_le_bytes());
    out.extend(b);
}

fn s(x: &str) -> V {
    V::Str(x.to_string())
}
fn strs(xs: &[&str]) -> V {
    V::Arr(8, xs.iter().map(|x| s(x)).collect())
}

#[derive(Clone, Debug)]
struct T {
    name: Vec<u8>,
    dims: Vec<u64>,
    type_id: u32,
    data: Vec<u8>,
    /// Offset written into the info record; `None` = where the data really is.
    offset: Option<u64>,
}

fn tensor(name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> T {
    T {
        name: name.as_bytes().to_vec(),
        dims: dims.to_vec(),
        type_id: ty.id(),
        data,
        offset: None,
    }
}

#[derive(Clone, Debug)]
struct G {
    magic: [u8; 4],
    version: u32,
    kvs: Vec<(Vec<u8>, V)>,
    tensors: Vec<T>,
    alignment: u64,
    kv_count: Option<u64>,
    tensor_count: Option<u64>,
}

impl G {
    fn new() -> G {
        G {
            magic: *b"GGUF",
            version: 3,
            kvs: vec![],
            tensors: vec![],
            alignment: 32,
            kv_count: None,
            tensor_count: None,
        }
    }
    fn kv(mut self, k: &str, v: V) -> G {
        self.kvs.push((k.as_bytes().to_vec(), v));
        self
    }
    fn t(mut self, t: T) -> G {
        self.tensors.push(t);
        self
    }
    fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(self.magic);
        out.extend(self.version.to_le_bytes());
        out.extend(
            self.tensor_count
                .unwrap_or(self.tensors.len() as u64)
                .to_le_bytes(),
        );
        out.extend(self.kv_count.unwrap_or(self.kvs.len() as u64).to_le_bytes());
        for (k, v) in &self.kvs {
            put_str(&mut out, k);
            out.extend(v.type_id().to_le_bytes());
            v.encode(&mut out);
        }
        let a = self.alignment as usize;
        let mut offsets = Vec::new();
        let mut at = 0usize;
        for t in &self.tensors {
            offsets.push(at);
            at = (at + t.data.len()).div_ceil(a) * a;
        }
        for (t, &o) in self.tensors.iter().zip(&offsets) {
            put_str(&mut out, &t.name);
            out.extend((t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend(d.to_le_bytes());
            }
            out.extend(t.type_id.to_le_bytes());
            out.extend(t.offset.unwrap_or(o as u64).to_le_bytes());
        }
        out.resize(out.len().div_ceil(a) * a, 0);
        let base = out.len();
        for (t, &o) in self.tensors.iter().zip(&offsets) {
            out.resize(base + o, 0);
            out.extend(&t.data);
        }
        out
    }
}

fn parse(b: Vec<u8>) -> Result<GgufFile, GgufError> {
    GgufFile::from_bytes(b, "test.gguf")
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Deterministic xorshift64* so the tests need no RNG crate.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A finite f16 scale (no inf/NaN: NaN payload propagation through a multiply is not part of the contract).
fn finite_f16(rng: &mut Rng) -> [u8; 2] {
    let mut h = rng.next() as u16;
    if (h >> 10) & 0x1f == 0x1f {
        h &= 0x83ff;
    }
    h.to_le_bytes()
}

/// Random quantised rows of `ty` with finite scales.
fn random_q_rows(rng: &mut Rng, ty: GgmlType, n_rows: usize, n_cols: usize) -> Vec<u8> {
    let n_blocks = n_rows * n_cols / 32;
    let mut out = Vec::new();
    for _ in 0..n_blocks {
        let mut b = rng.bytes(ty.type_size());
        b[0..2].copy_from_slice(&finite_f16(rng));
        if ty == GgmlType::Q4_1 {
            b[2..4].copy_from_slice(&finite_f16(rng));
        }
        out.extend(b);
    }
    out
}

/// A small valid file with one tensor of every type and metadata of every type.
fn all_types_file(version: u32) -> G {
    let mut rng = Rng(7);
    let f32v: Vec<f32> = (0..64).map(|_| rng.f32()).collect();
    let mut g = G::new()
        .kv("general.architecture", s("test"))
        .kv("u8", V::U8(1))
        .kv("i8", V::I8(-2))
        .kv("u16", V::U16(3))
        .kv("i16", V::I16(-4))
        .kv("u32", V::U32(5))
        .kv("i32", V::I32(-6))
        .kv("f32", V::F32(0.5))
        .kv("bool", V::Bool(true))
        .kv("str", s("héllo"))
        .kv("u64", V::U64(1 << 40))
        .kv("i64", V::I64(-(1 << 40)))
        .kv("f64", V::F64(0.25))
        .kv("arr", strs(&["x", "yz"]))
        .kv(
            "nested",
            V::Arr(
                9,
                vec![V::Arr(4, vec![V::U32(1), V::U32(2)]), V::Arr(4, vec![])],
            ),
        )
        .t(tensor("f32", &[32, 2], GgmlType::F32, f32_bytes(&f32v)))
        .t(tensor("f16", &[16, 2], GgmlType::F16, rng.bytes(64)))
        .t(tensor("bf16", &[8, 2, 2], GgmlType::BF16, rng.bytes(64)));
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let data = random_q_rows(&mut rng, ty, 2, 64);
        g = g.t(tensor(&format!("q_{}", ty.name()), &[64, 2], ty, data));
    }
    g.version = version;
    g
}

// ------------------------------------------------------------------------------------------------
// Reading valid files

#[test]
fn reads_every_value_and_tensor_type_v3_and_v2() {
    for version in [3, 2] {
        let f = parse(all_types_file(version).bytes()).expect("valid file");
        assert_eq!(f.version(), version);
        assert_eq!(f.get("u8"), Some(&Value::U8(1)));
        assert_eq!(f.get("i8").and_then(Value::as_i64), Some(-2));
        assert_eq!(f.get_u64("u16").unwrap(), Some(3));
        assert_eq!(f.get("i16").and_then(Value::as_i64), Some(-4));
        assert_eq!(f.get_u64("u32").unwrap(), Some(5));
        assert_eq!(f.get("i32").and_then(Value::as_i64), Some(-6));
        assert_eq!(f.get_f32("f32").unwrap(), Some(0.5));
        assert_eq!(f.get_bool("bool").unwrap(), Some(true));
        assert_eq!(f.get_str("str").unwrap(), Some("héllo"));
        assert_eq!(f.get_u64("u64").unwrap(), Some(1 << 40));
        assert_eq!(f.get("i64").and_then(Value::as_i64), Some(-(1 << 40)));
        assert_eq!(f.get("f64").and_then(Value::as_f64), Some(0.25));
        assert_eq!(f.get_str_array("arr").unwrap(), Some(vec!["x", "yz"]));
        let nested = f.get("nested").and_then(Value::as_array).unwrap();
        assert_eq!(nested.len(), 2);
        assert_eq!(
            nested[0]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect::<Vec<_>>(),
            [1, 2]
        );
        assert!(nested[1].as_array().unwrap().is_empty());
        // any-integer accessor refuses negatives and non-integers, by name
        assert!(matches!(f.get_u64("i8"), Err(GgufError::BadMetadata { key, .. }) if key == "i8"));
        assert!(f.get_u64("str").is_err());
        assert_eq!(f.get_u64("absent").unwrap(), None);

        assert_eq!(f.tensors().len(), 6);
        let names: Vec<_> = f.tensors().iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["f32", "f16", "bf16", "q_Q4_0", "q_Q4_1", "q_Q8_0"]);
        let bf = f.tensor("bf16").unwrap();
        assert_eq!(bf.shape(), [2, 2, 8]);
        assert_eq!((bf.n_cols(), bf.n_rows(), bf.n_elements()), (8, 4, 32));
        for t in f.tensors() {
            assert_eq!(t.offset % f.alignment(), 0);
            assert_eq!(f.tensor_data(t).len(), t.n_bytes);
            assert_eq!(
                t.n_bytes,
                t.ggml_type.row_bytes(t.n_cols()).unwrap() * t.n_rows()
            );
            assert_eq!(f.tensor_f32(t).len(), t.n_elements());
        }
        assert_eq!(f.data_offset() % 32, 0);
    }
}

#[test]
fn open_maps_files_from_disk_and_rejects_empty_and_missing() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a.gguf");
    std::fs::write(&p, all_types_file(3).bytes()).unwrap();
    let f = GgufFile::open(&p).unwrap();
    assert_eq!(f.path(), p.as_path());
    let t = f.tensor("f32").unwrap();
    let mut rng = Rng(7);
    let want: Vec<f32> = (0..64).map(|_| rng.f32()).collect();
    assert_eq!(f.tensor_f32(t), want);

    let empty = dir.path().join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    assert!(matches!(
        GgufFile::open(&empty),
        Err(GgufError::Truncated { .. })
    ));
    assert!(matches!(
        GgufFile::open(dir.path().join("missing.gguf")),
        Err(GgufError::Io { .. })
    ));
}

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("golden/gguf")
}

#[test]
fn reads_gguf_py_written_reference_file() {
    let f =
        GgufFile::open(golden_dir().join("quant_ref.gguf")).expect("golden/gguf/quant_ref.gguf");
    assert_eq!(f.version(), 3);
    assert_eq!(f.alignment(), 64);
    assert_eq!(f.architecture().unwrap(), "quantref");
    assert_eq!(f.get("test.u8"), Some(&Value::U8(200)));
    assert_eq!(f.get("test.i8"), Some(&Value::I8(-100)));
    assert_eq!(f.get("test.u16"), Some(&Value::U16(60000)));
    assert_eq!(f.get("test.i16"), Some(&Value::I16(-30000)));
    assert_eq!(f.get("test.u32"), Some(&Value::U32(4_000_000_000)));
    assert_eq!(f.get("test.i32"), Some(&Value::I32(-2_000_000_000)));
    assert_eq!(f.get("test.f32"), Some(&Value::F32(0.1)));
    assert_eq!(f.get("test.bool"), Some(&Value::Bool(true)));
    assert_eq!(f.get_str("test.string").unwrap(), Some("héllo ✓"));
    assert_eq!(
        f.get("test.u64"),
        Some(&Value::U64(18_000_000_000_000_000_000))
    );
    assert_eq!(
        f.get("test.i64"),
        Some(&Value::I64(-9_000_000_000_000_000_000))
    );
    assert_eq!(f.get("test.f64"), Some(&Value::F64(2.5e-300)));
    assert_eq!(
        f.get_str_array("test.array_str").unwrap(),
        Some(vec!["a", "bc", ""])
    );
    let nested: Vec<Vec<i64>> = f
        .get("test.array_nested")
        .and_then(Value::as_array)
        .unwrap()
        .iter()
        .map(|a| {
            a.as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_i64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(nested, vec![vec![1, 2], vec![3], vec![4, 5, 6]]);
    let types: Vec<_> = f
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t.ggml_type, t.dims.clone()))
        .collect();
    assert_eq!(
        types,
        vec![
            ("t_f32", GgmlType::F32, vec![64, 3]),
            ("t_f16", GgmlType::F16, vec![32, 3, 2]),
            ("t_bf16", GgmlType::BF16, vec![64, 4]),
            ("t_q8_0", GgmlType::Q8_0, vec![96, 8]),
            ("t_q4_0", GgmlType::Q4_0, vec![64, 8]),
            ("t_q4_1", GgmlType::Q4_1, vec![64, 16]),
            ("t_q4_1_real", GgmlType::Q4_1, vec![128, 6]),
        ]
    );
}

// ------------------------------------------------------------------------------------------------
// Dequantisation

#[test]
fn dequant_is_bit_identical_to_gguf_py() {
    let f = GgufFile::open(golden_dir().join("quant_ref.gguf")).unwrap();
    let st_bytes = std::fs::read(golden_dir().join("quant_ref.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
    assert_eq!(st.len(), f.tensors().len());
    for t in f.tensors() {
        let want = st.tensor(&t.name).unwrap();
        assert_eq!(want.dtype(), safetensors::Dtype::F32);
        assert_eq!(want.shape(), t.shape().as_slice(), "{}", t.name);
        let want: Vec<u32> = want
            .data()
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let got: Vec<u32> = f.tensor_f32(t).iter().map(|x| x.to_bits()).collect();
        let bad: Vec<_> = got
            .iter()
            .zip(&want)
            .enumerate()
            .filter(|(_, (a, b))| a != b)
            .take(5)
            .collect();
        assert!(
            bad.is_empty(),
            "{} ({}): first mismatches (index, (got, want)) {bad:x?}",
            t.name,
            t.ggml_type.name()
        );
    }
}

#[test]
fn q4_1_product_is_exact_so_only_the_add_rounds() {
    // d (f16, 11 significant bits) · q (4 bits) fits in f32's 24 bits, so numpy's `(d * q) + m`
    // rounds once, and equals a fused multiply-add. Checked over every finite f16 and every q.
    for h in 0..=u16::MAX {
        let d = dequant::f16_to_f32(h);
        if !d.is_finite() {
            continue;
        }
        for q in 0..16u8 {
            assert_eq!(
                (d * q as f32) as f64,
                d as f64 * q as f64,
                "d bits {h:#06x}, q {q}"
            );
        }
    }
    let mut rng = Rng(99);
    for _ in 0..500 {
        let blk = random_q_rows(&mut rng, GgmlType::Q4_1, 1, 32);
        let d = dequant::f16_to_f32(u16::from_le_bytes([blk[0], blk[1]]));
        let m = dequant::f16_to_f32(u16::from_le_bytes([blk[2], blk[3]]));
        let mut out = [0f32; 32];
        dequant::dequantize_row(GgmlType::Q4_1, &blk, &mut out);
        for j in 0..16 {
            let (lo, hi) = ((blk[4 + j] & 0x0f) as f32, (blk[4 + j] >> 4) as f32);
            assert_eq!(out[j].to_bits(), (d * lo + m).to_bits());
            assert_eq!(out[j + 16].to_bits(), d.mul_add(hi, m).to_bits());
        }
    }
}

#[test]
fn parallel_rows_equal_row_by_row() {
    let mut rng = Rng(3);
    for ty in [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q8_0,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::F32,
    ] {
        let (rows, cols) = (67, 96);
        let rb = ty.row_bytes(cols).unwrap();
        let src = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q8_0 => {
                random_q_rows(&mut rng, ty, rows, cols)
            }
            _ => rng.bytes(rb * rows),
        };
        let mut par = vec![0f32; rows * cols];
        dequant::dequantize_rows(ty, &src, cols, &mut par);
        for r in 0..rows {
            let mut one = vec![0f32; cols];
            dequant::dequantize_row(ty, &src[r * rb..(r + 1) * rb], &mut one);
            let a: Vec<u32> = one.iter().map(|x| x.to_bits()).collect();
            let b: Vec<u32> = par[r * cols..(r + 1) * cols]
                .iter()
                .map(|x| x.to_bits())
                .collect();
            assert_eq!(a, b, "{} row {r}", ty.name());
        }
    }
}

#[test]
fn q_formats_follow_the_nibble_layout() {
    // d = 1.0 (0x3c00), m = 0.5 (0x3800); qs[j] = j | (15 - j) << 4.
    let mut blk = vec![0x00, 0x3c, 0x00, 0x38];
    blk.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
    let mut out = [0f32; 32];
    dequant::dequantize_row(GgmlType::Q4_1, &blk, &mut out);
    for j in 0..16 {
        assert_eq!(out[j], j as f32 + 0.5);
        assert_eq!(out[j + 16], (15 - j) as f32 + 0.5);
    }
    let mut q40 = vec![0x00, 0x3c];
    q40.extend(&blk[4..]);
    dequant::dequantize_row(GgmlType::Q4_0, &q40, &mut out);
    for j in 0..16 {
        assert_eq!(out[j], j as f32 - 8.0);
        assert_eq!(out[j + 16], (15 - j) as f32 - 8.0);
    }
    let mut q80 = vec![0x00, 0x40]; // d = 2.0
    q80.extend((0..32).map(|j| (j as i8 - 16) as u8));
    dequant::dequantize_row(GgmlType::Q8_0, &q80, &mut out);
    for (j, x) in out.iter().enumerate() {
        assert_eq!(*x, 2.0 * (j as f32 - 16.0));
    }
}

// ------------------------------------------------------------------------------------------------
// Toy llama: Q/K un-permutation and conversion

const HIDDEN: usize = 64;
const N_HEAD: usize = 2;
const N_KV: usize = 1;
const HEAD_DIM: usize = 32;
const FFN: usize = 64;
const VOCAB: usize = 8;

/// llama.cpp `convert_hf_to_gguf.py` `permute`: GGUF row h·D + 2i + j ← HF row h·D + j·D/2 + i.
fn llama_cpp_permute<R: Clone>(hf_rows: &[R], n_head: usize) -> Vec<R> {
    let d = hf_rows.len() / n_head;
    (0..hf_rows.len())
        .map(|g| {
            let (h, c) = (g / d, g % d);
            let (i, j) = (c / 2, c % 2);
            hf_rows[h * d + j * (d / 2) + i].clone()
        })
        .collect()
}

fn toy_tokenizer_kvs(g: G) -> G {
    g.kv("tokenizer.ggml.model", s("gpt2"))
        .kv("tokenizer.ggml.pre", s("smollm"))
        .kv(
            "tokenizer.ggml.tokens",
            strs(&[
                "<|endoftext|>",
                "<|im_start|>",
                "<|im_end|>",
                "a",
                "b",
                "ab",
                "Ġ",
                "Ġab",
            ]),
        )
        .kv(
            "tokenizer.ggml.token_type",
            V::Arr(
                5,
                [3, 3, 3, 1, 1, 1, 1, 1]
                    .iter()
                    .map(|&t| V::I32(t))
                    .collect(),
            ),
        )
        .kv("tokenizer.ggml.merges", strs(&["a b", "Ġ ab"]))
        .kv("tokenizer.ggml.bos_token_id", V::U32(1))
        .kv("tokenizer.ggml.eos_token_id", V::U32(2))
        .kv("tokenizer.ggml.padding_token_id", V::U32(2))
        .kv("tokenizer.ggml.unknown_token_id", V::U32(0))
        .kv("tokenizer.ggml.add_bos_token", V::Bool(false))
        .kv("tokenizer.chat_template", s("{{ messages }}"))
}

/// HF-layout weights of the toy model, rows of f32.
struct ToyWeights {
    tensors: Vec<(String, String, Vec<Vec<f32>>)>, // (gguf name, hf name, HF rows)
}

fn toy_weights(rng: &mut Rng, n_layers: usize, with_output: bool) -> ToyWeights {
    let mut m = |rows: usize, cols: usize| -> Vec<Vec<f32>> {
        (0..rows)
            .map(|_| (0..cols).map(|_| rng.f32()).collect())
            .collect()
    };
    let mut t = vec![
        (
            "token_embd.weight".to_string(),
            "model.embed_tokens.weight".to_string(),
            m(VOCAB, HIDDEN),
        ),
        (
            "output_norm.weight".into(),
            "model.norm.weight".into(),
            m(1, HIDDEN),
        ),
    ];
    if with_output {
        t.push((
            "output.weight".into(),
            "lm_head.weight".into(),
            m(VOCAB, HIDDEN),
        ));
    }
    for l in 0..n_layers {
        let p = |g: &str, h: &str| {
            (
                format!("blk.{l}.{g}.weight"),
                format!("model.layers.{l}.{h}.weight"),
            )
        };
        for (g, h, rows, cols) in [
            ("attn_norm", "input_layernorm", 1, HIDDEN),
            ("attn_q", "self_attn.q_proj", N_HEAD * HEAD_DIM, HIDDEN),
            ("attn_k", "self_attn.k_proj", N_KV * HEAD_DIM, HIDDEN),
            ("attn_v", "self_attn.v_proj", N_KV * HEAD_DIM, HIDDEN),
            ("attn_output", "self_attn.o_proj", HIDDEN, N_HEAD * HEAD_DIM),
            ("ffn_norm", "post_attention_layernorm", 1, HIDDEN),
            ("ffn_gate", "mlp.gate_proj", FFN, HIDDEN),
            ("ffn_up", "mlp.up_proj", FFN, HIDDEN),
            ("ffn_down", "mlp.down_proj", HIDDEN, FFN),
        ] {
            let (gn, hn) = p(g, h);
            t.push((gn, hn, m(rows, cols)));
        }
    }
    ToyWeights { tensors: t }
}

fn toy_header(n_layers: u32) -> G {
    let g = G::new()
        .kv("general.architecture", s("llama"))
        .kv("llama.block_count", V::U64(n_layers as u64)) // u64 here: counts go through the any-integer accessor
        .kv("llama.context_length", V::U32(128))
        .kv("llama.embedding_length", V::U32(HIDDEN as u32))
        .kv("llama.feed_forward_length", V::U32(FFN as u32))
        .kv("llama.attention.head_count", V::U32(N_HEAD as u32))
        .kv("llama.attention.head_count_kv", V::U32(N_KV as u32))
        .kv("llama.rope.freq_base", V::F32(10000.0))
        .kv("llama.rope.dimension_count", V::U32(HEAD_DIM as u32))
        .kv("llama.attention.layer_norm_rms_epsilon", V::F32(1e-6));
    toy_tokenizer_kvs(g)
}

/// Toy llama GGUF with every tensor in F32: Q/K rows permuted the llama.cpp way.
fn toy_llama_f32(w: &ToyWeights, n_layers: u32) -> G {
    let mut g = toy_header(n_layers);
    for (gn, _, rows) in &w.tensors {
        let rows = if gn.ends_with("attn_q.weight") {
            llama_cpp_permute(rows, N_HEAD)
        } else if gn.ends_with("attn_k.weight") {
            llama_cpp_permute(rows, N_KV)
        } else {
            rows.clone()
        };
        let cols = rows[0].len() as u64;
        let dims = if rows.len() == 1 {
            vec![cols]
        } else {
            vec![cols, rows.len() as u64]
        };
        let flat: Vec<f32> = rows.concat();
        g = g.t(tensor(gn, &dims, GgmlType::F32, f32_bytes(&flat)));
    }
    g
}

#[test]
fn qk_unpermute_round_trips_toy_llama_f32() {
    let w = toy_weights(&mut Rng(11), 2, false);
    let f = parse(toy_llama_f32(&w, 2).bytes()).unwrap();
    let plan = hf_tensor_plan(&f).unwrap();
    assert_eq!(plan.len(), w.tensors.len());
    for (gn, hn, rows) in &w.tensors {
        let t = plan
            .iter()
            .find(|t| &t.name == hn)
            .unwrap_or_else(|| panic!("{hn} not planned"));
        assert_eq!(&t.gguf_name, gn);
        let want_shape = if rows.len() == 1 {
            vec![rows[0].len()]
        } else {
            vec![rows.len(), rows[0].len()]
        };
        assert_eq!(t.shape, want_shape, "{hn}");
        assert_eq!(hf_tensor_values(&f, t).unwrap(), rows.concat(), "{hn}");
    }
    // Without un-permuting, Q would come back in the interleaved GGUF order.
    let q = plan
        .iter()
        .find(|t| t.name == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.unpermute_heads, Some(N_HEAD));
    let raw = f.tensor_f32(f.tensor("blk.0.attn_q.weight").unwrap());
    assert_ne!(
        raw,
        w.tensors.iter().find(|t| t.1 == q.name).unwrap().2.concat()
    );
}

#[test]
fn qk_unpermute_moves_whole_quantised_rows() {
    // Q and K as Q8_0: whole 68-byte rows move; values must equal dequantising the HF-order rows.
    let mut rng = Rng(5);
    let w = toy_weights(&mut rng, 1, false);
    let mut g = toy_header(1);
    let row_bytes = GgmlType::Q8_0.row_bytes(HIDDEN).unwrap();
    let mut hf_q_rows = Vec::new();
    for (gn, _, rows) in &w.tensors {
        let heads = if gn.ends_with("attn_q.weight") {
            Some(N_HEAD)
        } else if gn.ends_with("attn_k.weight") {
            Some(N_KV)
        } else {
            None
        };
        let cols = rows[0].len() as u64;
        let dims = if rows.len() == 1 {
            vec![cols]
        } else {
            vec![cols, rows.len() as u64]
        };
        match heads {
            Some(nh) => {
                let q = random_q_rows(&mut rng, GgmlType::Q8_0, rows.len(), HIDDEN);
                let hf_rows: Vec<Vec<u8>> = q.chunks(row_bytes).map(|r| r.to_vec()).collect();
                if nh == N_HEAD {
                    hf_q_rows = hf_rows.clone();
                }
                g = g.t(tensor(
                    gn,
                    &dims,
                    GgmlType::Q8_0,
                    llama_cpp_permute(&hf_rows, nh).concat(),
                ));
            }
            None => g = g.t(tensor(gn, &dims, GgmlType::F32, f32_bytes(&rows.concat()))),
        }
    }
    let f = parse(g.bytes()).unwrap();
    let plan = hf_tensor_plan(&f).unwrap();
    let q = plan
        .iter()
        .find(|t| t.name == "model.layers.0.self_attn.q_proj.weight")
        .unwrap();
    let got = hf_tensor_values(&f, q).unwrap();
    // Independent oracle: x = q · d per block, d via `half`.
    let want: Vec<f32> = hf_q_rows
        .iter()
        .flat_map(|row| {
            row.chunks(34).flat_map(|b| {
                let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                b[2..34]
                    .iter()
                    .map(move |&q| q as i8 as f32 * d)
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    assert_eq!(got, want);
}

#[test]
fn convert_toy_llama_writes_hf_directory() {
    let w = toy_weights(&mut Rng(21), 2, false);
    let dir = tempfile::tempdir().unwrap();
    let gguf = dir.path().join("toy.gguf");
    std::fs::write(&gguf, toy_llama_f32(&w, 2).bytes()).unwrap();
    let out = dir.path().join("out/nested");

    for dtype in [OutDtype::F32, OutDtype::Bf16] {
        let sum = convert_gguf(&gguf, &out, dtype).unwrap();
        assert_eq!(sum.tensors, w.tensors.len());
        let st_bytes = std::fs::read(out.join("model.safetensors")).unwrap();
        assert_eq!(sum.model_bytes, st_bytes.len() as u64);
        let st = safetensors::SafeTensors::deserialize(&st_bytes).unwrap();
        assert_eq!(st.len(), w.tensors.len());
        assert!(
            st.tensor("lm_head.weight").is_err(),
            "tied model must not write lm_head"
        );
        for (_, hn, rows) in &w.tensors {
            let t = st.tensor(hn).unwrap();
            let want = rows.concat();
            match dtype {
                OutDtype::F32 => {
                    assert_eq!(t.dtype(), safetensors::Dtype::F32);
                    assert_eq!(t.data(), f32_bytes(&want).as_slice(), "{hn}");
                }
                OutDtype::Bf16 => {
                    assert_eq!(t.dtype(), safetensors::Dtype::BF16);
                    let want: Vec<u8> = want
                        .iter()
                        .flat_map(|x| half::bf16::from_f32(*x).to_bits().to_le_bytes())
                        .collect();
                    assert_eq!(t.data(), want.as_slice(), "{hn}");
                }
            }
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
        assert_eq!(cfg["model_type"], "llama");
        assert_eq!(cfg["hidden_size"], HIDDEN);
        assert_eq!(cfg["num_attention_heads"], N_HEAD);
        assert_eq!(cfg["num_key_value_heads"], N_KV);
        assert_eq!(cfg["head_dim"], HEAD_DIM);
        assert_eq!(cfg["num_hidden_layers"], 2);
        assert_eq!(cfg["vocab_size"], VOCAB);
        assert_eq!(cfg["rms_norm_eps"], 1e-6);
        assert_eq!(cfg["rope_theta"], 10000.0);
        assert_eq!(cfg["rope_scaling"], serde_json::Value::Null);
        assert_eq!(cfg["tie_word_embeddings"], true);
        assert_eq!(
            cfg["torch_dtype"],
            if dtype == OutDtype::F32 {
                "float32"
            } else {
                "bfloat16"
            }
        );
        // the crate's own config reader accepts it
        kvcompact::model::config::Config::from_file(&out.join("config.json")).unwrap();

        let tc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(tc["bos_token"], "<|im_start|>");
        assert_eq!(tc["eos_token"], "<|im_end|>");
        assert_eq!(tc["unk_token"], "<|endoftext|>");
        assert_eq!(tc["add_bos_token"], false);
        assert_eq!(tc["chat_template"], "{{ messages }}");
        assert_eq!(tc["model_max_length"], 128);
        let gc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("generation_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            (gc["bos_token_id"].as_u64(), gc["eos_token_id"].as_u64()),
            (Some(1), Some(2))
        );

        let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let enc = tok.encode("ab ab<|im_end|>", true).unwrap();
        assert_eq!(enc.get_ids(), [5, 7, 2]);
        // no temp files left behind
        let leftovers: Vec<_> = std::fs::read_dir(&out)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.') || n.ends_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[test]
fn untied_output_becomes_lm_head() {
    let w = toy_weights(&mut Rng(8), 1, true);
    let f = parse(toy_llama_f32(&w, 1).bytes()).unwrap();
    let plan = hf_tensor_plan(&f).unwrap();
    let lm = plan.iter().find(|t| t.name == "lm_head.weight").unwrap();
    assert_eq!(
        hf_tensor_values(&f, lm).unwrap(),
        w.tensors
            .iter()
            .find(|t| t.1 == lm.name)
            .unwrap()
            .2
            .concat()
    );
    let cfg = kvcompact::gguf::hf_config_json(&f, OutDtype::F32).unwrap();
    assert_eq!(cfg["tie_word_embeddings"], false);
}

#[test]
fn conversion_errors_name_the_problem() {
    let w = toy_weights(&mut Rng(1), 1, false);
    // another architecture
    let mut g = toy_llama_f32(&w, 1);
    g.kvs[0].1 = s("qwen2");
    let f = parse(g.bytes()).unwrap();
    let e = hf_tensor_plan(&f).unwrap_err();
    assert!(
        matches!(&e, GgufError::UnsupportedArchitecture { arch, .. } if arch == "qwen2"),
        "{e}"
    );
    assert!(
        e.to_string().contains("unsupported GGUF architecture"),
        "{e}"
    );
    // a missing tensor
    let mut g = toy_llama_f32(&w, 1);
    g.tensors.retain(|t| t.name != b"blk.0.ffn_up.weight");
    let e = hf_tensor_plan(&parse(g.bytes()).unwrap()).unwrap_err();
    assert!(
        matches!(e, GgufError::Convert { .. }) && e.to_string().contains("blk.0.ffn_up.weight"),
        "{e}"
    );
    // an unexpected tensor
    let g = toy_llama_f32(&w, 1).t(tensor(
        "blk.7.attn_q.weight",
        &[32],
        GgmlType::F32,
        vec![0; 128],
    ));
    let e = hf_tensor_plan(&parse(g.bytes()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("blk.7.attn_q.weight"), "{e}");
    // a misshaped tensor
    let mut g = toy_llama_f32(&w, 1);
    let t = g
        .tensors
        .iter_mut()
        .find(|t| t.name == b"blk.0.attn_k.weight")
        .unwrap();
    t.dims = vec![32, 64];
    let e = hf_tensor_plan(&parse(g.bytes()).unwrap()).unwrap_err();
    assert!(e.to_string().contains("blk.0.attn_k.weight"), "{e}");
    // a non-BPE tokenizer
    let mut g = toy_llama_f32(&w, 1);
    for (k, v) in g.kvs.iter_mut() {
        if k == b"tokenizer.ggml.model" {
            *v = s("llama");
        }
    }
    let e = tokenizer_from_gguf(&parse(g.bytes()).unwrap()).unwrap_err();
    assert!(matches!(e, GgufError::Tokenizer { .. }), "{e}");
    // convert_gguf writes nothing when the model is rejected
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    let mut g = toy_llama_f32(&w, 1);
    g.kvs[0].1 = s("gpt2");
    std::fs::write(&p, g.bytes()).unwrap();
    assert!(convert_gguf(&p, &dir.path().join("out"), OutDtype::F32).is_err());
    assert!(!dir.path().join("out").exists());
}

// ------------------------------------------------------------------------------------------------
// Malformed input: each case gets its variant, nothing panics.

#[test]
fn truncated_at_every_length() {
    let full = all_types_file(3).bytes();
    assert!(parse(full.clone()).is_ok());
    for n in 0..full.len() {
        match parse(full[..n].to_vec()) {
            Ok(_) => panic!("truncated to {n} of {} bytes parsed", full.len()),
            Err(GgufError::Truncated { .. }) | Err(GgufError::AbsurdCount { .. }) if n > 0 => {}
            Err(GgufError::TensorOutOfRange { .. }) if n >= 24 => {}
            Err(GgufError::Truncated { offset: 0, .. }) if n == 0 => {}
            Err(e) => panic!("truncated to {n}: unexpected {e:?}"),
        }
    }
    // the header fields themselves report plain truncation
    for n in [0, 3, 7, 15, 23] {
        assert!(
            matches!(parse(full[..n].to_vec()), Err(GgufError::Truncated { .. })),
            "{n}"
        );
    }
}

#[test]
fn bad_magic() {
    let mut b = all_types_file(3).bytes();
    b[..4].copy_from_slice(b"GGML");
    assert!(matches!(parse(b), Err(GgufError::BadMagic { .. })));
}

#[test]
fn version_1_and_unknown_versions_rejected() {
    for v in [0, 1, 4, 0x0300_0000] {
        let e = parse(all_types_file(v).bytes()).unwrap_err();
        assert!(
            matches!(e, GgufError::UnsupportedVersion { version, .. } if version == v),
            "{e}"
        );
    }
}

#[test]
fn unknown_ggml_type_is_named() {
    let mut g = all_types_file(3);
    g.tensors[3].type_id = 14; // Q6_K
    let e = parse(g.bytes()).unwrap_err();
    assert!(
        matches!(&e, GgufError::UnsupportedGgufType { tensor, type_id: 14, .. } if tensor == "q_Q4_0"),
        "{e:?}"
    );
    assert!(
        e.to_string().contains("q_Q4_0") && e.to_string().contains("test.gguf"),
        "{e}"
    );
}

#[test]
fn block_types_need_dims0_multiple_of_32() {
    for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
        let g = G::new().t(tensor("w", &[48, 2], ty, vec![0; 200]));
        let e = parse(g.bytes()).unwrap_err();
        assert!(
            matches!(&e, GgufError::BadTensorInfo { tensor, .. } if tensor == "w"),
            "{e}"
        );
    }
    // 48 is fine for plain types
    assert!(parse(
        G::new()
            .t(tensor("w", &[48, 2], GgmlType::F16, vec![0; 192]))
            .bytes()
    )
    .is_ok());
}

#[test]
fn overlapping_out_of_range_and_misaligned_offsets() {
    let base = || {
        G::new()
            .t(tensor("a", &[32], GgmlType::F32, vec![0; 128]))
            .t(tensor("b", &[32], GgmlType::F32, vec![0; 128]))
    };
    let mut g = base();
    g.tensors[1].offset = Some(96); // inside a's 128 bytes
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::TensorOverlap { .. })
    ));
    let mut g = base();
    g.tensors[1].offset = Some(0); // same start
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::TensorOverlap { .. })
    ));
    let mut g = base();
    g.tensors[1].offset = Some(1 << 20);
    let e = parse(g.bytes()).unwrap_err();
    assert!(
        matches!(&e, GgufError::TensorOutOfRange { tensor, .. } if tensor == "b"),
        "{e}"
    );
    let mut g = base();
    g.tensors[1].offset = Some(u64::MAX - 31); // aligned, and start + size overflows u64
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::TensorOutOfRange { .. })
    ));
    let mut g = base();
    g.tensors[1].offset = Some(130);
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::BadTensorInfo { .. })
    ));
    // data section shorter than the last tensor
    let mut b = base().bytes();
    b.truncate(b.len() - 1);
    assert!(matches!(parse(b), Err(GgufError::TensorOutOfRange { .. })));
    // huge dims: element count overflows
    let g = G::new().t(tensor("big", &[1 << 32, 1 << 32, 4], GgmlType::F32, vec![]));
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::BadTensorInfo { .. })
    ));
    let g = G::new().t(tensor("big", &[1 << 40], GgmlType::F32, vec![]));
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::TensorOutOfRange { .. })
    ));
}

/// A lying header count is reported at its own byte: the tensor count at 8, the metadata count at 16.
#[test]
fn header_counts_are_reported_at_their_offsets() {
    let mut b = G::new().kv("key", V::U8(1)).bytes();
    b[8..16].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(matches!(parse(b), Err(GgufError::AbsurdCount { offset: 8, .. })));
    let mut b = G::new().kv("key", V::U8(1)).bytes();
    b[16..24].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(matches!(parse(b), Err(GgufError::AbsurdCount { offset: 16, .. })));
}

#[test]
fn lying_counts_are_refused_before_allocating() {
    // string length
    let mut g = G::new().kv("k", s("v"));
    g.kvs[0].1 = V::Raw(8, u64::MAX.to_le_bytes().to_vec());
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::AbsurdCount {
            count: u64::MAX,
            ..
        })
    ));
    // key length
    let mut b = G::new().kv("key", V::U8(1)).bytes();
    b[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
    assert!(matches!(parse(b), Err(GgufError::AbsurdCount { .. })));
    // array count
    let mut payload = 4u32.to_le_bytes().to_vec();
    payload.extend((1u64 << 40).to_le_bytes());
    let g = G::new().kv("arr", V::Raw(9, payload));
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::AbsurdCount { .. })
    ));
    // array of strings whose count fits the bytes but not 8 bytes per string
    let mut payload = 8u32.to_le_bytes().to_vec();
    payload.extend(100u64.to_le_bytes());
    payload.extend([0u8; 200]);
    let g = G::new().kv("arr", V::Raw(9, payload));
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::AbsurdCount { .. })
    ));
    // tensor and kv counts
    let mut g = all_types_file(3);
    g.tensor_count = Some(u64::MAX);
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::AbsurdCount { .. })
    ));
    let mut g = all_types_file(3);
    g.kv_count = Some(1 << 60);
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::AbsurdCount { .. })
    ));
    // tensor name length
    let mut g = G::new().t(tensor("w", &[4], GgmlType::F32, vec![0; 16]));
    g.tensors[0].name = vec![b'x'; 65];
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::BadTensorInfo { .. })
    ));
}

#[test]
fn non_utf8_key_and_value() {
    let mut g = G::new().kv("ok", V::U8(1));
    g.kvs[0].0 = vec![b'k', 0xff, 0xfe];
    assert!(matches!(parse(g.bytes()), Err(GgufError::NotUtf8 { .. })));
    let g = G::new().kv("k", V::RawStr(vec![0xc3, 0x28]));
    let e = parse(g.bytes()).unwrap_err();
    assert!(
        matches!(&e, GgufError::NotUtf8 { what, .. } if what.contains("\"k\"")),
        "{e}"
    );
    let mut g = G::new().t(tensor("w", &[4], GgmlType::F32, vec![0; 16]));
    g.tensors[0].name = vec![0x80];
    assert!(matches!(parse(g.bytes()), Err(GgufError::NotUtf8 { .. })));
}

#[test]
fn duplicates_bad_value_types_depth_dims_and_alignment() {
    let g = G::new()
        .t(tensor("w", &[4], GgmlType::F32, vec![0; 16]))
        .t(tensor("w", &[4], GgmlType::F32, vec![0; 16]));
    assert!(
        matches!(parse(g.bytes()), Err(GgufError::DuplicateTensor { name, .. }) if name == "w")
    );
    let g = G::new().kv("k", V::U8(1)).kv("k", V::U8(2));
    assert!(matches!(parse(g.bytes()), Err(GgufError::DuplicateKey { key, .. }) if key == "k"));
    let g = G::new().kv("k", V::Raw(13, vec![0; 8]));
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::BadValueType { type_id: 13, .. })
    ));
    let g = G::new().kv("k", V::Arr(77, vec![]));
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::BadValueType { type_id: 77, .. })
    ));
    let mut deep = V::Arr(0, vec![]);
    for _ in 0..20 {
        deep = V::Arr(9, vec![deep]);
    }
    let g = G::new().kv("deep", deep);
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::BadMetadata { .. })
    ));
    let g = G::new().t(tensor("w", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4]));
    assert!(matches!(
        parse(g.bytes()),
        Err(GgufError::BadTensorInfo { .. })
    ));
    for bad in [V::U32(0), V::U32(3), V::I32(-32), s("32")] {
        let g = G::new().kv("general.alignment", bad);
        assert!(matches!(
            parse(g.bytes()),
            Err(GgufError::BadMetadata { .. })
        ));
    }
    // a valid non-default alignment is honoured
    let mut g = G::new()
        .kv("general.alignment", V::U32(64))
        .t(tensor("a", &[8], GgmlType::F32, vec![1; 32]))
        .t(tensor("b", &[8], GgmlType::F32, vec![2; 32]));
    g.alignment = 64;
    let f = parse(g.bytes()).unwrap();
    assert_eq!(
        (
            f.alignment(),
            f.data_offset() % 64,
            f.tensor("b").unwrap().offset
        ),
        (64, 0, 64)
    );
}

#[test]
fn random_corruption_never_panics() {
    let w = toy_weights(&mut Rng(2), 1, false);
    let files = [all_types_file(3).bytes(), toy_llama_f32(&w, 1).bytes()];
    let mut rng = Rng(0x5eed);
    let (mut ok, mut err) = (0, 0);
    // KVCOMPACT_FUZZ_ITERS=200000 for a longer local run.
    let iters = std::env::var("KVCOMPACT_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    for i in 0..iters {
        let mut b = files[i % 2].clone();
        for _ in 0..1 + rng.below(4) {
            let at = if rng.below(2) == 0 {
                rng.below(b.len().min(600))
            } else {
                rng.below(b.len())
            };
            b[at] = match rng.below(4) {
                0 => 0xff,
                1 => 0,
                _ => rng.next() as u8,
            };
        }
        if rng.below(8) == 0 {
            let n = rng.below(b.len());
            b.truncate(n);
        }
        match parse(b) {
            Ok(f) => {
                ok += 1;
                for t in f.tensors() {
                    let _ = f.tensor_f32(t);
                }
                if let Ok(plan) = hf_tensor_plan(&f) {
                    for t in &plan {
                        let _ = hf_tensor_values(&f, t);
                    }
                }
                let _ = tokenizer_from_gguf(&f);
                let _ = kvcompact::gguf::tokenizer_config_json(&f);
            }
            Err(e) => {
                err += 1;
                let msg = e.to_string();
                assert!(
                    msg.starts_with("test.gguf: ") && !msg.contains('\n'),
                    "{msg}"
                );
            }
        }
    }
    assert!(ok > 0 && err > 0, "ok {ok}, err {err}");
}

#[test]
fn error_display_is_one_line_naming_file_and_tensor() {
    let mut g = all_types_file(3);
    g.tensors[1].offset = Some(1 << 30);
    let e = GgufFile::from_bytes(g.bytes(), "/models/x.gguf").unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("/models/x.gguf: ") && msg.contains("tensor f16") && !msg.contains('\n'),
        "{msg}"
    );
    // and it converts into the crate error
    let crate_err: kvcompact::Error = e.into();
    assert_eq!(crate_err.to_string(), msg);
}

/// The GGUF fuzz target's seed (`fuzz/seeds/gguf/toy-llama.gguf`) is this one-layer toy model,
/// which the converter accepts end to end; `KVCOMPACT_BLESS=1` rewrites it after a format change.
#[test]
fn gguf_fuzz_seed_is_the_toy_model() {
    let bytes = toy_llama_f32(&toy_weights(&mut Rng(31), 1, false), 1).bytes();
    let seed = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/gguf/toy-llama.gguf");
    if std::env::var_os("KVCOMPACT_BLESS").is_some() {
        std::fs::create_dir_all(seed.parent().unwrap()).unwrap();
        std::fs::write(&seed, &bytes).unwrap();
    }
    assert_eq!(std::fs::read(&seed).expect("the committed seed"), bytes, "stale fuzz seed; rerun with KVCOMPACT_BLESS=1");
    let dir = tempfile::tempdir().unwrap();
    convert_gguf(&seed, &dir.path().join("out"), OutDtype::F32).unwrap();
}
