//! GEMV throughput over a 16384 x 4096 weight (256 MiB f32, larger than L3).
//! Ignored by default; run with
//! `cargo test -p kvcompact-kernels --release --test throughput -- --ignored --nocapture`
//! (prefix `KVCOMPACT_SIMD=v3` to measure the AVX2 kernels on an AVX-512 machine).
//! Weights are written with real random values (never zero pages, see
//! performance.md §5). Reports the median of 7 timed runs after one warm-up.

use kvcompact_kernels::*;
use std::time::Instant;

const ROWS: usize = 16384;
const COLS: usize = 4096;

fn rand_vec(n: usize, mut s: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

type GemvFn<'a> = dyn Fn(WeightRef, &[f32], &mut [f32]) + 'a;

fn bench(label: &str, w: WeightRef, x: &[f32], f: &GemvFn) {
    let mut y = vec![0.0f32; ROWS];
    f(w, x, &mut y); // warm-up (page faults, caches)
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            f(w, x, &mut y);
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[3];
    let bytes = (ROWS * COLS * w.bytes_per_weight()) as f64;
    let gws = (ROWS * COLS) as f64 / med / 1e9;
    eprintln!(
        "{label:<22} {:>5}: median {:>7.2} ms  {:>6.2} GB/s  {:>5.2} G weights/s  (min {:.2} ms, max {:.2} ms)  y[7]={:.4}",
        w.dtype_name(),
        med * 1e3,
        bytes / med / 1e9,
        gws,
        times[0] * 1e3,
        times[6] * 1e3,
        y[7]
    );
}

#[test]
#[ignore]
fn gemv_throughput_16384x4096() {
    eprintln!("cpu {} | simd {} (level {})", cpu_model(), simd_level(), simd_dispatch_level());
    let w32 = rand_vec(ROWS * COLS, 0x9E37_79B9_7F4A_7C15);
    let wb: Vec<u16> = w32.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    let wh: Vec<u16> = w32.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    let x = rand_vec(COLS, 12345);
    let single = |w: WeightRef, x: &[f32], y: &mut [f32]| gemv(w, ROWS, COLS, x, y);
    for w in [WeightRef::F32(&w32), WeightRef::Bf16(&wb), WeightRef::F16(&wh)] {
        bench("gemv 1T", w, &x, &single);
    }
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let par = |w: WeightRef, x: &[f32], y: &mut [f32]| pool.install(|| gemv_par(w, ROWS, COLS, x, y));
        for w in [WeightRef::F32(&w32), WeightRef::Bf16(&wb), WeightRef::F16(&wh)] {
            bench(&format!("gemv_par {threads}T"), w, &x, &par);
        }
    }
}

/// The lm_head shape of SmolLM2-135M (49152 x 576: 113 MB f32, 57 MB bf16/f16), 1 thread,
/// median of 21 calls after a warm-up (each call a few ms).
#[test]
#[ignore]
fn gemv_lm_head_shape() {
    let (rows, cols) = (49152usize, 576usize);
    eprintln!("cpu {} | simd {} (level {})", cpu_model(), simd_level(), simd_dispatch_level());
    let w32 = rand_vec(rows * cols, 0x5EED);
    let wb: Vec<u16> = w32.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    let wh: Vec<u16> = w32.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    let x = rand_vec(cols, 99);
    let mut y = vec![0.0f32; rows];
    for w in [WeightRef::F32(&w32), WeightRef::Bf16(&wb), WeightRef::F16(&wh)] {
        gemv(w, rows, cols, &x, &mut y);
        let mut t: Vec<f64> = (0..21)
            .map(|_| {
                let s = Instant::now();
                gemv(w, rows, cols, &x, &mut y);
                s.elapsed().as_secs_f64()
            })
            .collect();
        t.sort_by(f64::total_cmp);
        let gb = (rows * cols * w.bytes_per_weight()) as f64 / 1e9;
        eprintln!("lm_head {:>5}: median {:.2} ms = {:.1} GB/s (best {:.1} GB/s)", w.dtype_name(), t[10] * 1e3, gb / t[10], gb / t[0]);
    }
}

/// Compute-bound view: a 256 x 1024 weight (1 MiB f32) that stays in cache,
/// repeated; shows whether the kernel or DRAM is the limit.
#[test]
#[ignore]
fn gemv_in_cache_throughput() {
    let (rows, cols, reps) = (256usize, 1024usize, 400usize);
    let w32 = rand_vec(rows * cols, 77);
    let wb: Vec<u16> = w32.iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    let wh: Vec<u16> = w32.iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    let x = rand_vec(cols, 5);
    let mut y = vec![0.0f32; rows];
    for w in [WeightRef::F32(&w32), WeightRef::Bf16(&wb), WeightRef::F16(&wh)] {
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..reps {
                gemv(w, rows, cols, &x, &mut y);
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        eprintln!(
            "in-cache gemv {:>5}: {:>6.2} G weights/s (best of 5)",
            w.dtype_name(),
            (rows * cols * reps) as f64 / best / 1e9
        );
    }
}

/// DRAM read baseline for comparison: wrapping integer sum over the same
/// 256 MiB (auto-vectorised, no FP dependency chain).
#[test]
#[ignore]
fn dram_read_baseline() {
    let w32 = rand_vec(ROWS * COLS, 3);
    let bits: Vec<u32> = w32.iter().map(|v| v.to_bits()).collect();
    drop(w32);
    let mut times = Vec::new();
    let mut acc = 0u32;
    for _ in 0..8 {
        let t = Instant::now();
        acc = acc.wrapping_add(bits.iter().fold(0u32, |a, &b| a.wrapping_add(b)));
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let med = times[4];
    eprintln!("read baseline: median {:.2} GB/s (acc {acc})", (bits.len() * 4) as f64 / med / 1e9);
}

/// Decode attention for one GQA group (SmolLM2: g = 3, d = 64) at several
/// context lengths: K/V bytes streamed per second, fast vs naive twin.
#[test]
#[ignore]
fn attend_group_throughput() {
    let (g, d) = (3usize, 64usize);
    for n in [512usize, 2048, 8192] {
        let qs = rand_vec(g * d, 1);
        let keys = rand_vec(n * d, 2);
        let values = rand_vec(n * d, 3);
        let mut out = vec![0.0f32; g * d];
        let mut scratch = Vec::new();
        let reps = (1 << 22) / n;
        let mut run = |f: &dyn Fn(&mut [f32], &mut Vec<f32>)| {
            f(&mut out, &mut scratch);
            let mut best = f64::MAX;
            for _ in 0..5 {
                let t = Instant::now();
                for _ in 0..reps {
                    f(&mut out, &mut scratch);
                }
                best = best.min(t.elapsed().as_secs_f64() / reps as f64);
            }
            best
        };
        let scale = 0.125;
        let fast = run(&|o, s| attend_group(&qs, &keys, &values, None, n, d, scale, o, s));
        let slow = run(&|o, s| attend_group_ref(&qs, &keys, &values, None, n, d, scale, o, s));
        let bytes = (2 * n * d * 4) as f64;
        eprintln!(
            "attend_group g={g} d={d} n={n:>5}: {:>7.1} us ({:>5.1} GB/s K+V), ref {:>7.1} us",
            fast * 1e6,
            bytes / fast / 1e9,
            slow * 1e6
        );
    }
}

/// Fixed workload for `perf stat -e cycles:u,instructions:u` (wall time is
/// too noisy on a shared 2-vCPU box): 2000 calls of attend_group, n = 2048.
#[test]
#[ignore]
fn attend_group_fixed_work() {
    let (g, d, n) = (3usize, 64usize, 2048usize);
    let qs = rand_vec(g * d, 1);
    let keys = rand_vec(n * d, 2);
    let values = rand_vec(n * d, 3);
    let mut out = vec![0.0f32; g * d];
    let mut scratch = Vec::new();
    let mut acc = 0.0f32;
    for _ in 0..2000 {
        attend_group(&qs, &keys, &values, None, n, d, 0.125, &mut out, &mut scratch);
        acc += out[5];
    }
    eprintln!("checksum {acc}");
}

