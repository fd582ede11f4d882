//! `kvcompact bench --device cuda --kernels`: each GPU kernel path against its CPU twin on
//! synthetic data of real shapes (no model needed), side by side in one run: decode attention
//! (one layer, warm mirror, transfers of q and the output included) and compact-head's Attention
//! Matching (the whole head: the GPU builds the n×T matrices, selection and solves stay on the
//! CPU). Prints a table (or JSON) with medians, speedups and the CPU/GPU agreement.

use std::time::Instant;

use anyhow::Result;
use rayon::prelude::*;

use kvcompact::compact::am::AmConfig;
use kvcompact::compact::{evaluate_head, AmCompressor, Compressor, HeadInput};
use kvcompact::cuda::attention::{DeviceCache, HeadRows};
use kvcompact::device::Device;
use kvcompact::sampling::Rng;


fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up (the GPU's first call compiles or uploads)
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        f()?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    Ok(median(t))
}

/// One row of the report.
#[derive(serde::Serialize)]
struct Row {
    kernel: String,
    shape: String,
    cpu_ms: f64,
    gpu_ms: f64,
    speedup: f64,
    /// Decode attention: max |Δ| of the outputs; compact-head: Jaccard of the kept rows.
    agreement: f64,
    /// compact-head: held-out mean rel-L2, CPU and GPU.
    rel_l2: Option<(f64, f64)>,
}

/// Run the comparison; `reps` timed repetitions per decode-attention case (medians reported).
pub fn run(reps: usize, json: bool) -> Result<()> {
    let gpu = kvcompact::cuda::gpu()?;
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    // Decode attention: SmolLM2-135M's layer (3 KV heads × 3, d 64) and Llama-3-8B's (8 × 4, d 128).
    for &(n_kv, g, hd, len) in &[(3usize, 3usize, 64usize, 4096usize), (8, 4, 128, 4096), (8, 4, 128, 32768)] {
        let mut rng = Rng::new(len as u64 + hd as u64);
        let keys: Vec<Vec<f32>> = (0..n_kv).map(|_| rng.uniform_f32(len * hd, 1.0)).collect();
        let values: Vec<Vec<f32>> = (0..n_kv).map(|_| rng.uniform_f32(len * hd, 1.0)).collect();
        let bias: Vec<Vec<f32>> = (0..n_kv).map(|_| rng.uniform_f32(len, 1.0)).collect();
        let positions: Vec<u32> = (0..len as u32).collect();
        let q = rng.uniform_f32(n_kv * g * hd, 1.0);
        let scale = 1.0 / (hd as f32).sqrt();
        let mut cpu_out = vec![0.0f32; q.len()];
        let cpu_ms = time_ms(reps, || {
            cpu_out.par_chunks_mut(g * hd).enumerate().for_each_init(Vec::new, |scratch, (h, out)| {
                kvcompact_kernels::attend_group(&q[h * g * hd..(h + 1) * g * hd], &keys[h], &values[h], Some(&bias[h]), len, hd, scale, out, scratch);
            });
            Ok(())
        })?;
        let heads: Vec<HeadRows> = (0..n_kv).map(|h| HeadRows { keys: &keys[h], values: &values[h], bias: Some(&bias[h]), positions: &positions, start: 0 }).collect();
        let mut mirror = DeviceCache::new(1)?;
        let mut gpu_out = vec![0.0f32; q.len()];
        let gpu_ms = time_ms(reps, || Ok(mirror.attend(0, &q, &heads, g, hd, scale, &mut gpu_out)?))?;
        let diff = cpu_out.iter().zip(&gpu_out).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max);
        rows.push(Row { kernel: "decode attention".into(), shape: format!("{n_kv} KV heads × {g}, d {hd}, {len} rows"), cpu_ms, gpu_ms, speedup: cpu_ms / gpu_ms, agreement: diff, rel_l2: None });
    }
    // compact-head on a head of real size (T ≈ 1.9k rows, n ≈ 4k queries, d 64), t = T/10 and T/50.
    let (t_rows, n, d) = (1858usize, 4095usize, 64usize);
    let mut rng = Rng::new(42);
    let dirs = rng.uniform_f32(8 * d, 1.0);
    let keys: Vec<f32> = (0..t_rows * d).map(|i| dirs[((i / d) % 8) * d + i % d] * 2.0 + rng.uniform_f32(1, 1.0)[0] * 1.5).collect();
    let values = rng.uniform_f32(t_rows * d, 1.0);
    let positions: Vec<u32> = (0..t_rows as u32).collect();
    let queries = rng.uniform_f32(n * d, 2.0);
    let test = rng.uniform_f32(256 * d, 2.0);
    let input = HeadInput { layer: 0, kv_head: 0, d, keys: &keys, values: &values, positions: &positions, bias: None, queries: Some(&queries), scale: 1.0 / (d as f32).sqrt() };
    for name in ["am-highest", "am-omp"] {
        for div in [10usize, 50] {
            let budget = t_rows / div;
            let run_on = |dev: Device| -> Result<(f64, kvcompact::compact::CompactedHead)> {
                let mut cfg = AmConfig::from_name(name)?;
                cfg.inner_par = true;
                cfg.device = dev;
                let m = AmCompressor::new(cfg);
                m.compress_head(&input, budget, 0)?; // warm-up
                let t0 = Instant::now();
                let out = m.compress_head(&input, budget, 0)?;
                Ok((t0.elapsed().as_secs_f64() * 1e3, out))
            };
            let (cpu_ms, cpu) = run_on(Device::Cpu)?;
            let (gpu_ms, got) = run_on(Device::Cuda)?;
            let a: std::collections::BTreeSet<_> = cpu.indices.iter().collect();
            let b: std::collections::BTreeSet<_> = got.indices.iter().collect();
            let jac = a.intersection(&b).count() as f64 / a.union(&b).count().max(1) as f64;
            let (e_cpu, e_gpu) = (evaluate_head(&input, &cpu, &test).mean_rel_l2, evaluate_head(&input, &got, &test).mean_rel_l2);
            rows.push(Row { kernel: format!("compact-head {name}"), shape: format!("T {t_rows}, n {n}, d {d}, t = T/{div}"), cpu_ms, gpu_ms, speedup: cpu_ms / gpu_ms, agreement: jac, rel_l2: Some((e_cpu, e_gpu)) });
        }
    }
    if json {
        println!("{}", serde_json::json!({"gpu": gpu.name, "cpu_threads": threads, "simd": kvcompact_kernels::simd_level(), "cpu": kvcompact_kernels::cpu_model(), "rows": rows}));
        return Ok(());
    }
    println!("GPU {} | CPU {} ({} threads), simd {} | medians of {} reps (compact-head: one run after a warm-up)", gpu.name, kvcompact_kernels::cpu_model(), threads, kvcompact_kernels::simd_level(), reps);
    println!("| kernel | shape | CPU ms | GPU ms | GPU speedup | agreement |");
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let agree = match r.rel_l2 {
            Some((c, g)) => format!("kept rows Jaccard {:.3}; rel-L2 {c:.4} / {g:.4}", r.agreement),
            None => format!("max |Δ| {:.1e}", r.agreement),
        };
        println!("| {} | {} | {:.3} | {:.3} | {:.2}× | {agree} |", r.kernel, r.shape, r.cpu_ms, r.gpu_ms, r.speedup);
    }
    Ok(())
}
