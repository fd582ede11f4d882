//! Decode attention on the GPU: one token's query heads over one layer's ragged per-KV-head rows
//! with β and GQA groups (twin of `kvcompact_kernels::attend_group`, tested in tests/cuda.rs).
//! [`decode_attention`] uploads, runs and downloads once (tests, bench); [`DeviceCache`] keeps a
//! mirror of a growing cache on the GPU so `generate --device cuda` uploads only new rows.

use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

use super::{dev_err, gpu, Inner};
use crate::{Error, Result};

/// Query heads per KV head and head_dim the kernel supports (`MAX_G`, `32·MAX_DPL` in kernels.cu).
pub const MAX_GROUP: usize = 8;
/// See [`MAX_GROUP`].
pub const MAX_HEAD_DIM: usize = 256;
const THREADS: u32 = 128;

/// One KV head's rows as the CPU cache holds them; rows before `start` are outside a sliding window.
#[derive(Clone, Copy)]
pub struct HeadRows<'a> {
    /// Keys, row-major.
    pub keys: &'a [f32], // [rows, hd]
    /// Values, row-major.
    pub values: &'a [f32], // [rows, hd]
    /// Logit bias β per row (None: zero).
    pub bias: Option<&'a [f32]>, // [rows]
    /// Absolute position of each row (the mirror uses it to notice a rewritten head).
    pub positions: &'a [u32], // [rows]
    /// First row the query sees.
    pub start: usize,
}

/// How K and V are stored on the GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvDtype {
    /// f32, as on the CPU (bit-for-bit inputs).
    F32,
    /// bfloat16 (round to nearest even), half the memory; widened to f32 in the kernel.
    Bf16,
}

fn check_shape(q: &[f32], n_kv: usize, group: usize, hd: usize) -> Result<()> {
    if group == 0 || group > MAX_GROUP || hd == 0 || hd > MAX_HEAD_DIM {
        return Err(Error::Device(format!(
            "cuda decode attention supports 1..={MAX_GROUP} query heads per KV head and head_dim 1..={MAX_HEAD_DIM} (got {group} and {hd})"
        )));
    }
    if q.len() != n_kv * group * hd {
        return Err(Error::Device(format!("cuda decode attention: q has {} values, expected {n_kv}×{group}×{hd}", q.len())));
    }
    Ok(())
}

/// Attention of q [n_kv·group·hd] (the group's query heads contiguous per KV head) over `heads`,
/// K/V stored as `dtype`; returns [n_kv·group·hd].
pub fn decode_attention(q: &[f32], heads: &[HeadRows], group: usize, hd: usize, scale: f32, dtype: KvDtype) -> Result<Vec<f32>> {
    check_shape(q, heads.len(), group, hd)?;
    let total: usize = heads.iter().map(|h| h.keys.len() / hd).sum();
    if total == 0 {
        return Ok(vec![0.0; q.len()]); // nothing to attend to (the kernel's answer too)
    }
    let (mut keys, mut values, mut bias) = (Vec::with_capacity(total * hd), Vec::with_capacity(total * hd), Vec::with_capacity(total));
    let (mut begin, mut end) = (Vec::new(), Vec::new());
    for h in heads {
        let rows = h.keys.len() / hd;
        begin.push((bias.len() + h.start.min(rows)) as u64);
        keys.extend_from_slice(h.keys);
        values.extend_from_slice(h.values);
        match h.bias {
            Some(b) => bias.extend_from_slice(b),
            None => bias.resize(bias.len() + rows, 0.0),
        }
        end.push(bias.len() as u64);
    }
    let g = gpu()?;
    let inner = g.lock();
    let s = &inner.stream;
    let up = |what: &str, e| dev_err(&format!("cuda decode attention: uploading {what}"), e);
    let q_d = s.clone_htod(q).map_err(|e| up("q", e))?;
    let bias_d = s.clone_htod(&bias).map_err(|e| up("bias", e))?;
    let begin_d = s.clone_htod(&begin).map_err(|e| up("rows", e))?;
    let end_d = s.clone_htod(&end).map_err(|e| up("rows", e))?;
    let mut out = s.alloc_zeros::<f32>(q.len()).map_err(|e| up("out", e))?;
    match dtype {
        KvDtype::F32 => {
            let k_d = s.clone_htod(&keys).map_err(|e| up("keys", e))?;
            let v_d = s.clone_htod(&values).map_err(|e| up("values", e))?;
            launch(&inner, "decode_attention_f32", &q_d, &k_d, &v_d, &bias_d, &begin_d, &end_d, heads.len(), group, hd, scale, &mut out)?;
        }
        KvDtype::Bf16 => {
            let to16 = |x: &[f32]| -> Vec<u16> { x.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect() };
            let k_d = s.clone_htod(&to16(&keys)).map_err(|e| up("keys", e))?;
            let v_d = s.clone_htod(&to16(&values)).map_err(|e| up("values", e))?;
            launch(&inner, "decode_attention_bf16", &q_d, &k_d, &v_d, &bias_d, &begin_d, &end_d, heads.len(), group, hd, scale, &mut out)?;
        }
    }
    let host = s.clone_dtoh(&out).map_err(|e| dev_err("cuda decode attention: download", e))?;
    s.synchronize().map_err(|e| dev_err("cuda decode attention", e))?;
    Ok(host)
}

#[allow(clippy::too_many_arguments)]
fn launch<S: DeviceRepr>(
    inner: &Inner,
    kernel: &str,
    q: &CudaSlice<f32>,
    keys: &CudaSlice<S>,
    values: &CudaSlice<S>,
    bias: &CudaSlice<f32>,
    begin: &CudaSlice<u64>,
    end: &CudaSlice<u64>,
    n_kv: usize,
    group: usize,
    hd: usize,
    scale: f32,
    out: &mut CudaSlice<f32>,
) -> Result<()> {
    if n_kv == 0 {
        return Ok(());
    }
    let f = inner.func(kernel)?;
    let (g, d) = (group as i32, hd as i32);
    let shared = (THREADS / 32) * group as u32 * (hd as u32 + 2) * 4;
    let cfg = LaunchConfig { grid_dim: (n_kv as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: shared };
    let mut b = inner.stream.launch_builder(&f);
    b.arg(q).arg(keys).arg(values).arg(bias).arg(begin).arg(end).arg(&g).arg(&d).arg(&scale).arg(out);
    // SAFETY: the argument list matches the kernel's signature; every row index the kernel reads
    // is below the uploaded lengths (begin ≤ end ≤ rows, checked when they were built).
    unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| dev_err(&format!("cuda: launching {kernel}"), e))
}

/// A mirror of one sequence's f32 cache on the GPU, layer by layer: each head holds its rows at
/// [g·cap, g·cap + rows). Rows are assumed appended; a head whose row count shrank or whose last
/// mirrored row moved (compaction, eviction) is uploaded again whole.
pub struct DeviceCache {
    layers: Vec<Option<LayerMirror>>,
    /// Per-step buffers (query, row ranges, output), allocated once rather than per layer and token.
    step: Option<StepBuffers>,
}

struct StepBuffers {
    q: CudaSlice<f32>,     // [n_kv·group·hd]
    begin: CudaSlice<u64>, // [n_kv]
    end: CudaSlice<u64>,   // [n_kv]
    out: CudaSlice<f32>,   // [n_kv·group·hd]
}

struct LayerMirror {
    cap: usize,
    hd: usize,
    /// Per head: rows mirrored and the position of the last one.
    synced: Vec<(usize, Option<u32>)>,
    keys: CudaSlice<f32>,   // [n_kv, cap, hd]
    values: CudaSlice<f32>, // [n_kv, cap, hd]
    bias: CudaSlice<f32>,   // [n_kv, cap]
}

impl DeviceCache {
    /// An empty mirror for a model of `n_layers` layers (checks the GPU now).
    pub fn new(n_layers: usize) -> Result<DeviceCache> {
        gpu()?;
        Ok(DeviceCache { layers: (0..n_layers).map(|_| None).collect(), step: None })
    }

    /// Bytes of GPU memory the mirror holds.
    pub fn bytes(&self) -> usize {
        self.layers.iter().flatten().map(|m| (m.keys.len() + m.values.len() + m.bias.len()) * 4).sum()
    }

    /// Decode attention for `layer`: bring the mirror up to date with `heads`, then run the kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(&mut self, layer: usize, q: &[f32], heads: &[HeadRows], group: usize, hd: usize, scale: f32, out: &mut [f32]) -> Result<()> {
        check_shape(q, heads.len(), group, hd)?;
        let g = gpu()?;
        let inner = g.lock();
        let s = &inner.stream;
        let err = |e| dev_err("cuda decode attention (generate)", e);
        let need = heads.iter().map(|h| h.keys.len() / hd).max().unwrap_or(0).max(1);
        let DeviceCache { layers, step } = self;
        let slot = layers.get_mut(layer).ok_or_else(|| Error::Device(format!("cuda: no layer {layer} in the mirror")))?;
        if slot.as_ref().is_none_or(|m| m.cap < need || m.hd != hd || m.synced.len() != heads.len()) {
            let cap = need.next_power_of_two().max(256);
            let n = heads.len();
            *slot = Some(LayerMirror {
                cap,
                hd,
                synced: vec![(0, None); n],
                keys: s.alloc_zeros::<f32>(n * cap * hd).map_err(err)?,
                values: s.alloc_zeros::<f32>(n * cap * hd).map_err(err)?,
                bias: s.alloc_zeros::<f32>(n * cap).map_err(err)?,
            });
        }
        let m = slot.as_mut().expect("just set");
        let (mut begin, mut end) = (Vec::with_capacity(heads.len()), Vec::with_capacity(heads.len()));
        for (gi, h) in heads.iter().enumerate() {
            let rows = h.keys.len() / hd;
            let (done, last) = m.synced[gi];
            let intact = done <= rows && (done == 0 || last == h.positions.get(done - 1).copied());
            let from = if intact { done } else { 0 };
            if from < rows {
                let base = gi * m.cap;
                s.memcpy_htod(&h.keys[from * hd..], &mut m.keys.slice_mut((base + from) * hd..(base + rows) * hd)).map_err(err)?;
                s.memcpy_htod(&h.values[from * hd..], &mut m.values.slice_mut((base + from) * hd..(base + rows) * hd)).map_err(err)?;
                let zeros;
                let b = match h.bias {
                    Some(b) => &b[from..rows],
                    None => {
                        zeros = vec![0.0f32; rows - from];
                        &zeros[..]
                    }
                };
                s.memcpy_htod(b, &mut m.bias.slice_mut(base + from..base + rows)).map_err(err)?;
            }
            m.synced[gi] = (rows, rows.checked_sub(1).and_then(|i| h.positions.get(i).copied()));
            begin.push((gi * m.cap + h.start.min(rows)) as u64);
            end.push((gi * m.cap + rows) as u64);
        }
        if step.as_ref().is_none_or(|b| b.q.len() != q.len() || b.begin.len() != heads.len()) {
            *step = Some(StepBuffers {
                q: s.alloc_zeros::<f32>(q.len()).map_err(err)?,
                begin: s.alloc_zeros::<u64>(heads.len()).map_err(err)?,
                end: s.alloc_zeros::<u64>(heads.len()).map_err(err)?,
                out: s.alloc_zeros::<f32>(q.len()).map_err(err)?,
            });
        }
        let b = step.as_mut().expect("just set");
        s.memcpy_htod(q, &mut b.q).map_err(err)?;
        s.memcpy_htod(&begin, &mut b.begin).map_err(err)?;
        s.memcpy_htod(&end, &mut b.end).map_err(err)?;
        launch(&inner, "decode_attention_f32", &b.q, &m.keys, &m.values, &m.bias, &b.begin, &b.end, heads.len(), group, hd, scale, &mut b.out)?;
        s.memcpy_dtoh(&b.out, out).map_err(err)?;
        s.synchronize().map_err(err)?;
        Ok(())
    }
}
