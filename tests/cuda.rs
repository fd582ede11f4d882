//! The GPU path (issue 16) against its CPU twins, and the kernels' compile checks.
//!
//! Every kernel check is written once over a [`Device`]; `device_tests!` makes a `cpu` and a
//! `cuda` test of it. Both compare with the same independent reference (f64 loops written here,
//! or the CPU path in f64), so the CPU twin proves the check can fail and the CUDA twin holds the
//! GPU to the same bar. Where there is no GPU (or no `--features cuda`) the CUDA twin prints
//! "skipped: no CUDA device" and passes — unless `KVCOMPACT_REQUIRE_GPU=1` (set by
//! `benches/gpu_check.sh`), where it fails, so a GPU run cannot pass by skipping.
//!
//! The compile checks run without a GPU: NVRTC (the run-time path, `--features cuda`) and `nvcc
//! --ptx` compile every kernel. They need the `nvidia-cuda-nvrtc` / `nvidia-cuda-nvcc` wheels that
//! `scripts/test` installs into `.venv`; with `KVCOMPACT_REQUIRE_CUDA_TOOLS=1` (set there) a
//! missing tool fails the test instead of skipping it.

mod common;

use kvcompact::cache::KvCache;
use kvcompact::compact::am::AmConfig;
use kvcompact::compact::{AmCompressor, Compressor, HeadInput};
use kvcompact::compare::compare;
use kvcompact::device::Device;
use kvcompact::model::{Logits, Model};
use kvcompact::sampling::Rng;

use common::{golden, jaccard, repo};

// ---------------------------------------------------------------------------------------------
// Device plumbing

/// True when the CUDA twin can run; prints why not (or fails under KVCOMPACT_REQUIRE_GPU=1).
fn gpu_or_skip() -> bool {
    match Device::Cuda.check() {
        Ok(()) => true,
        Err(e) => {
            assert!(std::env::var("KVCOMPACT_REQUIRE_GPU").as_deref() != Ok("1"), "KVCOMPACT_REQUIRE_GPU=1 but: {e}");
            eprintln!("skipped: no CUDA device ({e})");
            false
        }
    }
}

macro_rules! device_tests {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn cpu() {
                super::$name(kvcompact::device::Device::Cpu);
            }
            #[test]
            fn cuda() {
                if super::gpu_or_skip() {
                    super::$name(kvcompact::device::Device::Cuda);
                }
            }
        }
    )*};
}

device_tests!(
    decode_attention_f32,
    decode_attention_bf16,
    device_cache_follows_a_growing_and_rewritten_cache,
    attention_statistics,
    design_matrix,
    am_selects_the_same_rows,
    am_batched_over_heads,
    decode_on_a_tiny_model,
);


fn bf16_round(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect()
}

// ---------------------------------------------------------------------------------------------
// Decode attention

struct Head {
    keys: Vec<f32>,
    values: Vec<f32>,
    bias: Option<Vec<f32>>,
    positions: Vec<u32>,
    start: usize,
}

/// Three KV heads of 1, 37 and 700 rows; β on two, a sliding-window start on one.
fn heads(hd: usize, rng: &mut Rng) -> Vec<Head> {
    [(1usize, false, 0usize), (37, true, 0), (700, true, 123)]
        .iter()
        .map(|&(rows, with_bias, start)| Head {
            keys: rng.uniform_f32(rows * hd, 1.5),
            values: rng.uniform_f32(rows * hd, 1.0),
            bias: with_bias.then(|| rng.uniform_f32(rows, 2.0)),
            positions: (0..rows as u32).map(|p| 3 * p).collect(),
            start,
        })
        .collect()
}

/// f64 softmax-attention reference: q [n_kv, g, hd] → [n_kv, g, hd].
fn attention_ref(q: &[f32], heads: &[Head], g: usize, hd: usize, scale: f32) -> Vec<f32> {
    let mut out = vec![0.0f32; q.len()];
    for (h, head) in heads.iter().enumerate() {
        let rows = head.keys.len() / hd;
        for qi in 0..g {
            let qv = &q[(h * g + qi) * hd..(h * g + qi + 1) * hd];
            let logits: Vec<f64> = (head.start..rows)
                .map(|r| {
                    let dot: f64 = (0..hd).map(|k| qv[k] as f64 * head.keys[r * hd + k] as f64).sum();
                    dot * scale as f64 + head.bias.as_ref().map_or(0.0, |b| b[r] as f64)
                })
                .collect();
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
            let z: f64 = w.iter().sum();
            for k in 0..hd {
                let o: f64 = w.iter().enumerate().map(|(i, wi)| wi * head.values[(head.start + i) * hd + k] as f64).sum();
                out[(h * g + qi) * hd + k] = (o / z) as f32;
            }
        }
    }
    out
}

/// Decode attention of q over `heads` on `dev` (the CPU twin is `kvcompact_kernels::attend_group`).
fn attend_on(dev: Device, q: &[f32], heads: &[Head], g: usize, hd: usize, scale: f32, bf16: bool) -> Vec<f32> {
    match dev {
        Device::Cpu => {
            let mut out = vec![0.0f32; q.len()];
            let mut scratch = Vec::new();
            for (h, head) in heads.iter().enumerate() {
                let rows = head.keys.len() / hd;
                let (keys, values) = if bf16 { (bf16_round(&head.keys), bf16_round(&head.values)) } else { (head.keys.clone(), head.values.clone()) };
                let bias = head.bias.as_ref().map(|b| &b[head.start..]);
                kvcompact_kernels::attend_group(
                    &q[h * g * hd..(h + 1) * g * hd],
                    &keys[head.start * hd..],
                    &values[head.start * hd..],
                    bias,
                    rows - head.start,
                    hd,
                    scale,
                    &mut out[h * g * hd..(h + 1) * g * hd],
                    &mut scratch,
                );
            }
            out
        }
        Device::Cuda => gpu::attend(q, heads, g, hd, scale, bf16),
    }
}

fn decode_attention_f32(dev: Device) {
    let (g, hd) = (3, 64);
    let mut rng = Rng::new(7);
    let hs = heads(hd, &mut rng);
    let q = rng.uniform_f32(hs.len() * g * hd, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let want = attention_ref(&q, &hs, g, hd, scale);
    let got = attend_on(dev, &q, &hs, g, hd, scale, false);
    // f32 sums over ≤ 700 rows of O(1) terms: a few 1e-7 relative; outputs are O(0.1).
    compare(&format!("decode attention f32 on {}", dev.name()), &got, &want, 2e-6).assert_ok();
}

fn decode_attention_bf16(dev: Device) {
    let (g, hd) = (4, 128);
    let mut rng = Rng::new(11);
    let mut hs = heads(hd, &mut rng);
    let q = rng.uniform_f32(hs.len() * g * hd, 1.0);
    let scale = 1.0 / (hd as f32).sqrt();
    let got = attend_on(dev, &q, &hs, g, hd, scale, true);
    // The reference sees the same bf16-rounded K/V the kernel reads.
    for h in hs.iter_mut() {
        h.keys = bf16_round(&h.keys);
        h.values = bf16_round(&h.values);
    }
    let want = attention_ref(&q, &hs, g, hd, scale);
    compare(&format!("decode attention bf16 storage on {}", dev.name()), &got, &want, 2e-6).assert_ok();
}

/// A sequence's cache grows a row per step, then is rewritten (compaction: fewer rows, new
/// positions and β) and grows again; every step's attention matches the reference.
fn device_cache_follows_a_growing_and_rewritten_cache(dev: Device) {
    let (g, hd, n_kv) = (2, 64, 2);
    let scale = 0.125;
    let mut rng = Rng::new(23);
    let mut hs: Vec<Head> = (0..n_kv).map(|_| Head { keys: vec![], values: vec![], bias: None, positions: vec![], start: 0 }).collect();
    let mut mirror = Mirror::new(dev);
    let step = |hs: &mut Vec<Head>, rng: &mut Rng, mirror: &mut Mirror, pos: u32| {
        for h in hs.iter_mut() {
            h.keys.extend(rng.uniform_f32(hd, 1.0));
            h.values.extend(rng.uniform_f32(hd, 1.0));
            if let Some(b) = h.bias.as_mut() {
                b.push(0.0);
            }
            h.positions.push(pos);
        }
        let q = rng.uniform_f32(n_kv * g * hd, 1.0);
        let want = attention_ref(&q, hs, g, hd, scale);
        let got = mirror.attend(&q, hs, g, hd, scale);
        compare(&format!("mirrored decode attention at position {pos} on {}", dev.name()), &got, &want, 2e-6).assert_ok();
    };
    for pos in 0..300 {
        step(&mut hs, &mut rng, &mut mirror, pos);
    }
    // Compaction: keep every 10th row, fit-like β, positions kept; then 20 more steps.
    for h in hs.iter_mut() {
        let keep: Vec<usize> = (0..h.positions.len()).step_by(10).collect();
        h.keys = keep.iter().flat_map(|&r| h.keys[r * hd..(r + 1) * hd].to_vec()).collect();
        h.values = keep.iter().flat_map(|&r| h.values[r * hd..(r + 1) * hd].to_vec()).collect();
        h.positions = keep.iter().map(|&r| h.positions[r]).collect();
        h.bias = Some(keep.iter().map(|_| rng.uniform_f32(1, 1.0)[0]).collect());
    }
    for pos in 300..320 {
        step(&mut hs, &mut rng, &mut mirror, pos);
    }
}

/// `DeviceCache` on the GPU; on the CPU the plain kernel (there is nothing to mirror).
struct Mirror {
    dev: Device,
    #[cfg(feature = "cuda")]
    cache: Option<kvcompact::cuda::attention::DeviceCache>,
}

impl Mirror {
    fn new(dev: Device) -> Mirror {
        Mirror {
            dev,
            #[cfg(feature = "cuda")]
            cache: (dev == Device::Cuda).then(|| kvcompact::cuda::attention::DeviceCache::new(1).unwrap()),
        }
    }
    fn attend(&mut self, q: &[f32], hs: &[Head], g: usize, hd: usize, scale: f32) -> Vec<f32> {
        #[cfg(feature = "cuda")]
        if let Some(c) = self.cache.as_mut() {
            let rows = gpu::rows(hs);
            let mut out = vec![0.0f32; q.len()];
            c.attend(0, q, &rows, g, hd, scale, &mut out).unwrap();
            return out;
        }
        attend_on(self.dev, q, hs, g, hd, scale, false)
    }
}

// ---------------------------------------------------------------------------------------------
// Attention Matching's n×T work

struct HeadData {
    d: usize,
    keys: Vec<f32>,
    values: Vec<f32>,
    positions: Vec<u32>,
    bias: Vec<f32>,
    queries: Vec<f32>,
    test: Vec<f32>,
}

fn head_data(t_rows: usize, n: usize, d: usize, seed: u64) -> HeadData {
    let mut rng = Rng::new(seed);
    // Keys with a few dominant directions, so attention is peaked as in real heads.
    let dirs = rng.uniform_f32(4 * d, 1.0);
    let keys: Vec<f32> = (0..t_rows).flat_map(|r| (0..d).map(move |k| (r, k)).collect::<Vec<_>>()).map(|(r, k)| dirs[(r % 4) * d + k] * 2.0 + rng.uniform_f32(1, 1.0)[0] * 1.5).collect();
    HeadData {
        d,
        keys,
        values: rng.uniform_f32(t_rows * d, 1.0),
        positions: (0..t_rows as u32).collect(),
        bias: rng.uniform_f32(t_rows, 0.5),
        queries: rng.uniform_f32(n * d, 2.0),
        test: rng.uniform_f32(64 * d, 2.0),
    }
}

impl HeadData {
    fn input(&self, with_bias: bool) -> HeadInput<'_> {
        HeadInput {
            layer: 0,
            kv_head: 0,
            d: self.d,
            keys: &self.keys,
            values: &self.values,
            positions: &self.positions,
            bias: with_bias.then_some(&self.bias[..]),
            queries: Some(&self.queries),
            scale: 1.0 / (self.d as f32).sqrt(),
        }
    }
}

/// E, μ, Z, Y and the key scores on `dev` in f32 against the CPU path in f64 (golden precision).
fn attention_statistics(dev: Device) {
    use kvcompact::compact::am::fit::attention_stats;
    use kvcompact::compact::am::highest::{scores, Score};
    let h = head_data(300, 200, 64, 5);
    let input = h.input(true);
    let want = attention_stats::<f64>(&input, false).unwrap();
    for score in [Score::Rms, Score::Mean, Score::Max] {
        let (e, mu, z, y, sc) = stats_on(dev, &input, score);
        let want_sc = scores(&want.e, &want.z, want.n, want.t_rows, score);
        let f = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let tag = format!("{} on {}", score.name(), dev.name());
        // E entries are ≤ 1 (each row's max is 1): f32 rounding of s·q·k (|S| ≲ 30) and exp.
        compare(&format!("E {tag}"), &f(&e), &f(&want.e), 2e-5).assert_ok();
        compare(&format!("mu {tag}"), &f(&mu), &f(&want.mu), 2e-5).assert_ok();
        let zr: Vec<f64> = z.iter().zip(&want.z).map(|(a, b)| a / b - 1.0).collect();
        compare(&format!("Z relative {tag}"), &f(&zr), &vec![0.0; zr.len()], 2e-5).assert_ok();
        compare(&format!("Y {tag}"), &f(&y), &f(&want.y), 2e-5).assert_ok();
        compare(&format!("scores {tag}"), &f(&sc), &f(&want_sc), 2e-6).assert_ok();
    }
}

type Stats = (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

fn stats_on(dev: Device, input: &HeadInput, score: kvcompact::compact::am::highest::Score) -> Stats {
    use kvcompact::compact::am::fit::attention_stats;
    use kvcompact::compact::am::highest::scores;
    match dev {
        Device::Cpu => {
            let st = attention_stats::<f32>(input, false).unwrap();
            let sc = scores(&st.e, &st.z, st.n, st.t_rows, score);
            (st.e.iter().map(|&x| x as f64).collect(), st.mu, st.z, st.y, sc)
        }
        Device::Cuda => gpu::stats(input, score),
    }
}

/// X = softmax(s·Q·Cᵀ + β) in f64 on `dev` against the CPU's `design_x`.
fn design_matrix(dev: Device) {
    let h = head_data(40, 150, 64, 9);
    let scale = 1.0 / 8.0;
    let want = kvcompact::compact::am::fit::design_x(&h.queries, &h.keys, &h.bias[..40], 64, scale, faer::Par::Seq);
    let got = match dev {
        Device::Cpu => kvcompact::compact::am::fit::design_x(&h.queries, &h.keys, &h.bias[..40], 64, scale, faer::Par::Seq),
        Device::Cuda => gpu::design_x(&h.queries, &h.keys, &h.bias[..40], 64, scale),
    };
    let (n, t) = (150, 40);
    let diff = (0..n).flat_map(|i| (0..t).map(move |j| (i, j))).map(|(i, j)| (got[(i, j)] - want[(i, j)]).abs()).fold(0.0f64, f64::max);
    assert!(diff < 1e-12, "X on {}: max |Δ| {diff:e} (f64 both sides)", dev.name());
    let rows_sum_to_one = (0..n).all(|i| ((0..t).map(|j| got[(i, j)]).sum::<f64>() - 1.0).abs() < 1e-12);
    assert!(rows_sum_to_one, "X on {}: rows must be softmax rows", dev.name());
}

/// am-highest and am-omp compress a head on `dev`: the same rows as the CPU (up to near-ties),
/// and the same held-out error within 2%.
fn am_selects_the_same_rows(dev: Device) {
    let h = head_data(600, 512, 64, 13);
    let input = h.input(true);
    for name in ["am-highest", "am-omp"] {
        let cpu = AmCompressor::new(AmConfig::from_name(name).unwrap()).compress_head(&input, 60, 0).unwrap();
        let mut cfg = AmConfig::from_name(name).unwrap();
        cfg.device = dev;
        let got = AmCompressor::new(cfg).compress_head(&input, 60, 0).unwrap();
        let overlap = jaccard(&got.indices, &cpu.indices);
        assert!(overlap >= 0.9, "{name} on {}: kept rows overlap {overlap:.3} with the CPU's", dev.name());
        let e_cpu = kvcompact::compact::evaluate_head(&input, &cpu, &h.test).mean_rel_l2;
        let e_got = kvcompact::compact::evaluate_head(&input, &got, &h.test).mean_rel_l2;
        assert!((e_got - e_cpu).abs() <= 0.02 * e_cpu.max(1e-6), "{name} on {}: held-out rel-L2 {e_got:.5} vs CPU {e_cpu:.5}", dev.name());
        assert!(got.beta.iter().chain(&got.values).all(|x| x.is_finite()), "{name} on {}: non-finite fit", dev.name());
    }
}

/// `compress_heads` over heads of two shapes (with and without β, an identity budget and an
/// empty one among them): on the GPU the statistics of each shape come from one batched call
/// (`Compressor::compress_batch`); every head matches its own CPU compression.
fn am_batched_over_heads(dev: Device) {
    use kvcompact::compact::{compress_heads, head_seed};
    let data: Vec<HeadData> = (0..6).map(|i| if i < 4 { head_data(300, 256, 64, 100 + i) } else { head_data(120, 256, 64, 100 + i) }).collect();
    let inputs: Vec<HeadInput> = data
        .iter()
        .enumerate()
        .map(|(i, h)| HeadInput { layer: i / 3, kv_head: i % 3, ..h.input(i % 2 == 0) })
        .collect();
    let budgets = [30, 60, 300, 0, 12, 40];
    for name in ["am-highest", "am-omp"] {
        let mut cfg = AmConfig::from_name(name).unwrap();
        cfg.device = dev;
        let got = compress_heads(&AmCompressor::new(cfg), &inputs, &budgets, 9).unwrap();
        let cpu = AmCompressor::new(AmConfig::from_name(name).unwrap());
        for (i, (h, g)) in inputs.iter().zip(&got).enumerate() {
            let want = cpu.compress_head(h, budgets[i], head_seed(9, h.layer, h.kv_head)).unwrap();
            assert_eq!(g.indices.len(), want.indices.len(), "{name} head {i} on {}", dev.name());
            if want.indices.is_empty() {
                continue;
            }
            let overlap = jaccard(&g.indices, &want.indices);
            assert!(overlap >= 0.9, "{name} head {i} on {}: kept rows overlap {overlap:.3}", dev.name());
            let (e_got, e_want) = (kvcompact::compact::evaluate_head(h, g, &data[i].test).mean_rel_l2, kvcompact::compact::evaluate_head(h, &want, &data[i].test).mean_rel_l2);
            assert!((e_got - e_want).abs() <= 0.02 * e_want.max(1e-6), "{name} head {i} on {}: rel-L2 {e_got:.5} vs CPU {e_want:.5}", dev.name());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The model: one-token decode attention on the device, teacher-forced, logits against the CPU.

fn decode_on_a_tiny_model(dev: Device) {
    for arch in ["llama-gqa", "llama-mha", "qwen3-qknorm"] {
        let m = Model::load(&golden(&format!("tiny/{arch}"))).unwrap();
        let v = m.config.vocab_size as u32;
        let prompt: Vec<u32> = (0..40u32).map(|i| (i * 13 + 5) % v).collect();
        let forced: Vec<u32> = (0..24u32).map(|i| (i * 29 + 7) % v).collect();
        let run = |dev: Device| -> Vec<f32> {
            let mut st = m.new_state(16);
            st.use_device(dev, m.config.n_layers).unwrap();
            let mut cache: KvCache = m.new_cache();
            m.forward(&mut st, &mut cache, &prompt, Logits::Last).unwrap();
            let mut all = st.logits.clone();
            for &t in &forced {
                m.forward(&mut st, &mut cache, &[t], Logits::Last).unwrap();
                all.extend_from_slice(&st.logits);
            }
            all
        };
        let want = run(Device::Cpu);
        let got = run(dev);
        compare(&format!("{arch}: logits with decode attention on {}", dev.name()), &got, &want, 1e-4).assert_ok();
    }
}

// ---------------------------------------------------------------------------------------------
// The GPU side of each check (only with --features cuda; without it the CUDA twins skip before
// reaching here).

#[cfg(feature = "cuda")]
mod gpu {
    use super::Head;
    use kvcompact::compact::am::highest::Score;
    use kvcompact::compact::HeadInput;
    use kvcompact::cuda::am::{self, ScoreKind};
    use kvcompact::cuda::attention::{decode_attention, HeadRows, KvDtype};

    pub fn rows(hs: &[Head]) -> Vec<HeadRows<'_>> {
        hs.iter().map(|h| HeadRows { keys: &h.keys, values: &h.values, bias: h.bias.as_deref(), positions: &h.positions, start: h.start }).collect()
    }

    pub fn attend(q: &[f32], hs: &[Head], g: usize, hd: usize, scale: f32, bf16: bool) -> Vec<f32> {
        decode_attention(q, &rows(hs), g, hd, scale, if bf16 { KvDtype::Bf16 } else { KvDtype::F32 }).unwrap()
    }

    pub fn stats(input: &HeadInput, score: Score) -> super::Stats {
        let kind = match score {
            Score::Rms => ScoreKind::Rms,
            Score::Mean => ScoreKind::Mean,
            Score::Max => ScoreKind::Max,
        };
        let g = am::attention_stats::<f32>(input.queries.unwrap(), input.keys, input.values, input.bias, input.d, input.scale, Some(kind)).unwrap();
        (g.e.iter().map(|&x| x as f64).collect(), g.mu, g.z, g.y, g.scores.unwrap())
    }

    pub fn design_x(q: &[f32], keys: &[f32], beta: &[f32], d: usize, scale: f32) -> faer::Mat<f64> {
        let x = am::design_x(q, keys, beta, d, scale).unwrap();
        faer::MatRef::from_row_major_slice(&x, q.len() / d, beta.len()).to_owned()
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu {
    use super::Head;
    use kvcompact::compact::am::highest::Score;
    use kvcompact::compact::HeadInput;
    pub fn attend(_: &[f32], _: &[Head], _: usize, _: usize, _: f32, _: bool) -> Vec<f32> {
        unreachable!("the CUDA twins skip without --features cuda")
    }
    pub fn stats(_: &HeadInput, _: Score) -> super::Stats {
        unreachable!("the CUDA twins skip without --features cuda")
    }
    pub fn design_x(_: &[f32], _: &[f32], _: &[f32], _: usize, _: f32) -> faer::Mat<f64> {
        unreachable!("the CUDA twins skip without --features cuda")
    }
}

// ---------------------------------------------------------------------------------------------
// Without a GPU: `--device cuda` is a one-line error, never a panic.

#[test]
fn device_cuda_without_a_gpu_is_a_one_line_error() {
    let Err(e) = Device::Cuda.check() else {
        eprintln!("skipped: this machine has a CUDA device");
        return;
    };
    let msg = e.to_string();
    assert!(msg.starts_with("--device cuda: ") && !msg.contains('\n'), "{msg:?}");
    // The error is remembered: asking again gives the same line, quickly.
    assert_eq!(Device::Cuda.check().unwrap_err().to_string(), msg);
    let m = Model::load(&golden("tiny/llama-gqa")).unwrap();
    let mut st = m.new_state(4);
    assert_eq!(st.use_device(Device::Cuda, m.config.n_layers).unwrap_err().to_string(), msg);
    let mut cfg = AmConfig::from_name("am-highest").unwrap();
    cfg.device = Device::Cuda;
    let h = head_data(50, 40, 16, 3);
    let err = AmCompressor::new(cfg).compress_head(&h.input(false), 5, 0).unwrap_err().to_string();
    assert_eq!(err, msg);
}

// ---------------------------------------------------------------------------------------------
// Compile checks (no GPU needed)

fn tools_required() -> bool {
    std::env::var("KVCOMPACT_REQUIRE_CUDA_TOOLS").as_deref() == Ok("1")
}

/// Each kernel of `KERNELS` is an `.entry` of the PTX.
fn assert_entries(ptx: &str, how: &str) {
    #[cfg(feature = "cuda")]
    let names = kvcompact::cuda::KERNELS;
    #[cfg(not(feature = "cuda"))]
    let names = ["decode_attention_f32", "decode_attention_bf16", "row_softmax_f32", "row_softmax_f64", "column_scores_f32", "column_scores_f64"];
    for k in names {
        assert!(ptx.contains(&format!(".entry {k}(")), "{how}: no .entry {k} in the PTX");
    }
}

#[cfg(feature = "cuda")]
#[test]
fn nvrtc_compiles_every_kernel() {
    // The run-time path: the same source and options `Gpu::open` uses, for two architectures.
    for arch in ["compute_80", "compute_90"] {
        match kvcompact::cuda::compile_ptx(arch) {
            Ok(ptx) => assert_entries(&ptx, &format!("NVRTC {arch}")),
            Err(e) if e.to_string().contains("not found") && !tools_required() => {
                eprintln!("skipped: {e} (scripts/test installs nvidia-cuda-nvrtc into .venv)");
                return;
            }
            Err(e) => panic!("NVRTC {arch}: {e}"),
        }
    }
}

/// `nvcc` from `KVCOMPACT_NVCC`, else the nvidia-cuda-nvcc wheel in `.venv`, else PATH.
fn find_nvcc() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("KVCOMPACT_NVCC") {
        return Some(p.into());
    }
    let lib = repo().join(".venv/lib");
    let wheel = std::fs::read_dir(&lib).ok()?.flatten().map(|py| py.path().join("site-packages/nvidia/cu13/bin/nvcc")).find(|p| p.exists());
    wheel.or_else(|| std::process::Command::new("nvcc").arg("--version").output().ok().filter(|o| o.status.success()).map(|_| "nvcc".into()))
}

#[test]
fn nvcc_compiles_every_kernel() {
    let Some(nvcc) = find_nvcc() else {
        assert!(!tools_required(), "nvcc not found: KVCOMPACT_REQUIRE_CUDA_TOOLS=1 needs the nvidia-cuda-nvcc wheel in .venv (scripts/test installs it) or KVCOMPACT_NVCC");
        eprintln!("skipped: nvcc not found (scripts/test installs nvidia-cuda-nvcc into .venv)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for arch in ["compute_80", "compute_90"] {
        let out = dir.path().join(format!("{arch}.ptx"));
        let run = std::process::Command::new(&nvcc)
            .args(["--ptx", &format!("-arch={arch}"), "-Werror", "all-warnings", "-o"])
            .arg(&out)
            .arg(repo().join("src/cuda/kernels.cu"))
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", nvcc.display()));
        assert!(run.status.success(), "nvcc --ptx -arch={arch} failed:\n{}", String::from_utf8_lossy(&run.stderr));
        assert_entries(&std::fs::read_to_string(&out).unwrap(), &format!("nvcc {arch}"));
    }
}
