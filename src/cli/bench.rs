//! `kvcompact bench`: prefill and decode speed on the loaded weights, llama-bench style.

use std::time::Instant;

use anyhow::{bail, Result};

use kvcompact::device::Device;
use kvcompact::model::{Logits, Model, DEFAULT_MAX_BATCH};

use super::{enable_slim, model_dir, print_slim_cache, KvDtypeArg, ModelArg, SlimArg};

/// Measure prefill and decode speed on the loaded weights (medians over --reps).
#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArg,
    #[arg(long, default_value_t = 128)]
    pub prompt_tokens: usize,
    #[arg(long, default_value_t = 64)]
    pub gen_tokens: usize,
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Also measure batched decode (the server's step): this many sequences, each prefilled with
    /// the prompt, decoded together with `Model::decode_batch`; reports aggregate tok/s.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub slim: SlimArg,
    #[command(flatten)]
    pub kv: KvDtypeArg,
    #[command(flatten)]
    pub device: super::DeviceArg,
    /// With --device cuda: time each GPU kernel path against its CPU twin on synthetic data of
    /// real shapes (decode attention, compact-head), then exit; no model is loaded.
    #[arg(long, requires = "device")]
    pub kernels: bool,
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

/// Prefill `prompt_tokens` tokens (logits for the last position only, as llama-bench does),
/// then decode `gen_tokens` greedily; repeat, warm-up first, report medians and spread.
pub fn run(a: Args) -> Result<()> {
    if a.prompt_tokens == 0 || a.gen_tokens == 0 || a.reps == 0 {
        bail!("--prompt-tokens, --gen-tokens and --reps must be at least 1");
    }
    let device = a.device.device;
    device.check()?;
    if a.kernels {
        if device != Device::Cuda {
            bail!("--kernels compares the GPU with the CPU: add --device cuda");
        }
        return kernel_bench(a.reps.max(5) * 4, a.json);
    }
    if device != Device::Cpu && (a.slim.slim || a.batch > 1) {
        bail!("--device cuda runs one sequence's decode attention on the GPU: drop --slim and --batch");
    }
    let dir = model_dir(&a.model)?;
    let mut model = Model::load(&dir)?;
    model.set_kv_dtype(a.kv.kv_dtype)?; // first: slim refuses a bf16 cache before printing its report
    enable_slim(&mut model, &a.slim)?;
    let c = &model.config;
    if a.prompt_tokens + a.gen_tokens > c.max_position_embeddings {
        bail!("--prompt-tokens + --gen-tokens exceeds the model's context of {}", c.max_position_embeddings);
    }
    // Deterministic pseudo-random ids away from the special tokens at the start of the vocab.
    let mut rng = kvcompact::sampling::Rng::new(1);
    let lo = 256.min(c.vocab_size / 2) as u64;
    let prompt: Vec<u32> = (0..a.prompt_tokens).map(|_| (lo + rng.below(c.vocab_size as u64 - lo)) as u32).collect();
    let mut state = model.new_state(DEFAULT_MAX_BATCH.max(a.prompt_tokens.min(512)));
    state.use_device(device, c.n_layers)?;
    let mut cache = model.new_cache();
    let (mut pre, mut dec) = (Vec::new(), Vec::new());
    for rep in 0..=a.reps {
        cache.clear();
        let t0 = Instant::now();
        model.forward(&mut state, &mut cache, &prompt, Logits::Last)?;
        let tp = t0.elapsed().as_secs_f64();
        let mut next = kvcompact_kernels::argmax(&state.logits) as u32;
        let t1 = Instant::now();
        for _ in 0..a.gen_tokens {
            model.forward(&mut state, &mut cache, &[next], Logits::Last)?;
            next = kvcompact_kernels::argmax(&state.logits) as u32;
        }
        let td = t1.elapsed().as_secs_f64();
        if rep > 0 {
            // rep 0 warms the page cache and the allocator.
            pre.push(a.prompt_tokens as f64 / tp);
            dec.push(a.gen_tokens as f64 / td);
        }
    }
    let (pmin, pmax) = (pre.iter().cloned().fold(f64::MAX, f64::min), pre.iter().cloned().fold(0.0, f64::max));
    let (dmin, dmax) = (dec.iter().cloned().fold(f64::MAX, f64::min), dec.iter().cloned().fold(0.0, f64::max));
    let (pm, dm) = (median(&mut pre), median(&mut dec));
    let batch = if a.batch > 1 { Some(batched_decode(&model, &prompt, a.batch, a.gen_tokens, a.reps)?) } else { None };
    let threads = rayon::current_num_threads();
    let wbytes = model.weights.matrix_bytes();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": dir.display().to_string(), "dtype": model.weights.dtype().name(), "threads": threads,
                "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "reps": a.reps,
                "prefill_tok_s": pm, "prefill_min": pmin, "prefill_max": pmax,
                "decode_tok_s": dm, "decode_min": dmin, "decode_max": dmax,
                "weight_bytes": wbytes, "simd": kvcompact_kernels::simd_level(),
                "simd_level": kvcompact_kernels::simd_dispatch_level().name(), "cpu": kvcompact_kernels::cpu_model(),
                "kv_bytes": cache.bytes(), "kv_rows": cache.max_len(), "slim": kvcompact::model::slim_report(&model, &cache),
                "batch": a.batch, "batch_decode_tok_s": batch, "device": device.name(), "kv_dtype": model.kv_dtype().name()})
        );
    } else {
        print_slim_cache(&model, &cache);
        println!("cpu {} | simd {} (level {}) | threads {}", kvcompact_kernels::cpu_model(), kvcompact_kernels::simd_level(), kvcompact_kernels::simd_dispatch_level(), threads);
        println!(
            "model {} | weights {} ({:.0} MiB) | KV {} | decode attention on {}",
            dir.display(),
            model.weights.dtype().name(),
            wbytes as f64 / (1 << 20) as f64,
            model.kv_dtype().name(),
            device.name()
        );
        println!("prefill {} tokens: median {:.1} tok/s (min {:.1}, max {:.1}, {} reps)", a.prompt_tokens, pm, pmin, pmax, a.reps);
        println!("decode  {} tokens: median {:.1} tok/s (min {:.1}, max {:.1}) = {:.1} GB/s of weights", a.gen_tokens, dm, dmin, dmax, dm * wbytes as f64 / 1e9);
    }
    if let Some(b) = batch {
        if !a.json {
            println!("batched decode, {} sequences: median {:.1} tok/s aggregate ({:.2}x one sequence)", a.batch, b, b / dm);
        }
    }
    println!("bench prefill_tok_s={pm:.2} decode_tok_s={dm:.2}");
    Ok(())
}

#[cfg(feature = "cuda")]
fn kernel_bench(reps: usize, json: bool) -> Result<()> {
    super::bench_gpu::run(reps, json)
}

#[cfg(not(feature = "cuda"))]
fn kernel_bench(_: usize, _: bool) -> Result<()> {
    unreachable!("Device::Cuda.check() refuses a build without the cuda feature")
}

/// Median aggregate tok/s of `m` sequences decoded together for `gen` steps (each first
/// prefilled with `prompt`); the first repetition warms up.
fn batched_decode(model: &Model, prompt: &[u32], m: usize, gen: usize, reps: usize) -> Result<f64> {
    if model.slim.is_some() {
        bail!("--batch does not combine with --slim");
    }
    let mut pst = model.new_state(DEFAULT_MAX_BATCH.max(prompt.len().min(512)));
    let mut st = model.new_state(m);
    let mut rates = Vec::new();
    for rep in 0..=reps {
        let mut caches = Vec::with_capacity(m);
        let mut next = Vec::with_capacity(m);
        for _ in 0..m {
            let mut c = model.new_cache();
            model.forward(&mut pst, &mut c, prompt, Logits::Last)?;
            next.push(kvcompact_kernels::argmax(&pst.logits) as u32);
            caches.push(c);
        }
        let vocab = model.config.vocab_size;
        let t = Instant::now();
        for _ in 0..gen {
            let mut refs: Vec<&mut kvcompact::cache::KvCache> = caches.iter_mut().collect();
            model.decode_batch(&mut st, &mut refs, &next)?;
            for (k, n) in next.iter_mut().enumerate() {
                *n = kvcompact_kernels::argmax(&st.logits[k * vocab..(k + 1) * vocab]) as u32;
            }
        }
        if rep > 0 {
            rates.push((m * gen) as f64 / t.elapsed().as_secs_f64());
        }
    }
    Ok(median(&mut rates))
}
