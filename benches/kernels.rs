//! Kernel throughput (divan): GEMV per weight dtype in GB/s of weights, decode attention in GB/s
//! of K and V, dot and RMSNorm. Weights are real random values (never zero pages, which would
//! hit the shared zero page and look impossibly fast; performance.md §5).
//!
//! Run: `cargo bench --bench kernels` (add `-- --threads 1` to pin divan's own threads).
//! The first line names the CPU and the dispatch level; `KVCOMPACT_SIMD=v3` (or `scalar`) runs
//! the same benches at a lower level on the same machine, for a like-for-like comparison.
//! `read_bytes` is a plain streaming read of the same bytes as `gemv_f32`, for reference.

use divan::counter::BytesCount;
use divan::Bencher;
use kvcompact::sampling::Rng;
use kvcompact_kernels as k;

fn main() {
    println!("cpu {} | simd {} (level {})", k::cpu_model(), k::simd_level(), k::simd_dispatch_level());
    divan::main();
}

fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut r = Rng::new(seed);
    (0..n).map(|_| (r.next_f64() * 2.0 - 1.0) as f32).collect()
}

/// SmolLM2 shapes: q/o 576×576, gate/up 1536×576, down 576×1536, lm_head 49152×576, plus one
/// matrix larger than L3.
const GEMV_SHAPES: [(usize, usize); 4] = [(576, 576), (1536, 576), (49152, 576), (16384, 4096)];

#[divan::bench(args = GEMV_SHAPES)]
fn gemv_f32(b: Bencher, (rows, cols): (usize, usize)) {
    let w = random(rows * cols, 1);
    let x = random(cols, 2);
    let mut y = vec![0.0; rows];
    b.counter(BytesCount::new(rows * cols * 4)).bench_local(|| k::gemv(k::WeightRef::F32(&w), rows, cols, &x, &mut y));
}

/// A plain streaming read of `rows*cols` f32 (the bytes `gemv_f32` streams): a wrapping integer
/// sum over 8 independent lanes, compiled for the detected ISA through pulp (no FP dependency
/// chain), so it measures how fast this core can read, not how fast it can add.
#[divan::bench(args = GEMV_SHAPES)]
fn read_bytes(b: Bencher, (rows, cols): (usize, usize)) {
    let w: Vec<u32> = random(rows * cols, 1).iter().map(|v| v.to_bits()).collect();
    struct Sum<'a>(&'a [u32]);
    impl pulp::WithSimd for Sum<'_> {
        type Output = u32;
        #[inline(always)]
        fn with_simd<S: pulp::Simd>(self, _: S) -> u32 {
            let mut acc = [0u32; 16];
            let (blocks, tail) = pulp::as_arrays::<16, u32>(self.0);
            for blk in blocks {
                for l in 0..16 {
                    acc[l] = acc[l].wrapping_add(blk[l]);
                }
            }
            tail.iter().fold(acc.iter().fold(0u32, |a, &v| a.wrapping_add(v)), |a, &v| a.wrapping_add(v))
        }
    }
    let arch = pulp::Arch::new();
    b.counter(BytesCount::new(rows * cols * 4)).bench_local(|| arch.dispatch(Sum(divan::black_box(&w))));
}

/// [`read_bytes`] split into one contiguous part per rayon thread (all cores unless
/// RAYON_NUM_THREADS says otherwise): the multi-thread read roofline of decode.
#[divan::bench(args = GEMV_SHAPES)]
fn read_bytes_par(b: Bencher, (rows, cols): (usize, usize)) {
    use rayon::prelude::*;
    let w: Vec<u32> = random(rows * cols, 1).iter().map(|v| v.to_bits()).collect();
    let parts = rayon::current_num_threads().max(1);
    let chunk = (w.len().div_ceil(parts)).next_multiple_of(16);
    b.counter(BytesCount::new(rows * cols * 4)).bench_local(|| {
        w.par_chunks(chunk)
            .map(|c| {
                let mut acc = [0u32; 16];
                let (blocks, tail) = c.as_chunks::<16>();
                for blk in blocks {
                    for l in 0..16 {
                        acc[l] = acc[l].wrapping_add(blk[l]);
                    }
                }
                tail.iter().fold(acc.iter().fold(0u32, |a, &v| a.wrapping_add(v)), |a, &v| a.wrapping_add(v))
            })
            .reduce(|| 0u32, |a, b| a.wrapping_add(b))
    });
}

/// The decode GEMV on the rayon pool ([`k::gemv_par`]), f32 and bf16: compare with
/// [`read_bytes_par`].
#[divan::bench(args = GEMV_SHAPES)]
fn gemv_par_f32(b: Bencher, (rows, cols): (usize, usize)) {
    let w = random(rows * cols, 1);
    let x = random(cols, 2);
    let mut y = vec![0.0; rows];
    b.counter(BytesCount::new(rows * cols * 4)).bench_local(|| k::gemv_par(k::WeightRef::F32(&w), rows, cols, &x, &mut y));
}

#[divan::bench(args = GEMV_SHAPES)]
fn gemv_par_bf16(b: Bencher, (rows, cols): (usize, usize)) {
    let w: Vec<u16> = random(rows * cols, 3).iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    let x = random(cols, 4);
    let mut y = vec![0.0; rows];
    b.counter(BytesCount::new(rows * cols * 2)).bench_local(|| k::gemv_par(k::WeightRef::Bf16(&w), rows, cols, &x, &mut y));
}

#[divan::bench(args = GEMV_SHAPES)]
fn gemv_bf16(b: Bencher, (rows, cols): (usize, usize)) {
    let w: Vec<u16> = random(rows * cols, 3).iter().map(|&v| half::bf16::from_f32(v).to_bits()).collect();
    let x = random(cols, 4);
    let mut y = vec![0.0; rows];
    b.counter(BytesCount::new(rows * cols * 2)).bench_local(|| k::gemv(k::WeightRef::Bf16(&w), rows, cols, &x, &mut y));
}

#[divan::bench(args = GEMV_SHAPES)]
fn gemv_f16(b: Bencher, (rows, cols): (usize, usize)) {
    let w: Vec<u16> = random(rows * cols, 5).iter().map(|&v| half::f16::from_f32(v).to_bits()).collect();
    let x = random(cols, 6);
    let mut y = vec![0.0; rows];
    b.counter(BytesCount::new(rows * cols * 2)).bench_local(|| k::gemv(k::WeightRef::F16(&w), rows, cols, &x, &mut y));
}

/// Batched GEMV (the server's batched decode step): m vectors against one 1536×576 f32 weight
/// (gate/up), bytes counted once per call as the weight is streamed once.
#[divan::bench(args = [1, 4, 8])]
fn gemv_batch_f32(b: Bencher, m: usize) {
    let (rows, cols) = (1536, 576);
    let w = random(rows * cols, 15);
    let xs = random(m * cols, 16);
    let mut ys = vec![0.0; m * rows];
    b.counter(BytesCount::new(rows * cols * 4)).bench_local(|| k::gemv_batch(k::WeightRef::F32(&w), rows, cols, &xs, &mut ys));
}

/// Batched GEMV over the lm_head shape (49152×576, 57 MB of bf16 / 113 MB of f32: out of every
/// cache), m vectors; bytes counted once per call.
fn batch_lm_head(b: Bencher, m: usize, bf16: bool) {
    let (rows, cols) = (49152, 576);
    let w32 = random(rows * cols, 25);
    let wb: Vec<u16> = w32.iter().map(|x| (x.to_bits() >> 16) as u16).collect();
    let (w, bytes) = if bf16 { (k::WeightRef::Bf16(&wb), 2) } else { (k::WeightRef::F32(&w32), 4) };
    let xs = random(m * cols, 26);
    let mut ys = vec![0.0; m * rows];
    b.counter(BytesCount::new(rows * cols * bytes)).bench_local(|| k::gemv_batch(w, rows, cols, &xs, &mut ys));
}

/// [`batch_lm_head`], bf16 weights.
#[divan::bench(args = [1, 8])]
fn gemv_batch_lm_head_bf16(b: Bencher, m: usize) {
    batch_lm_head(b, m, true)
}

/// [`batch_lm_head`], f32 weights.
#[divan::bench(args = [1, 8])]
fn gemv_batch_lm_head_f32(b: Bencher, m: usize) {
    batch_lm_head(b, m, false)
}

/// One GQA group (3 query heads, d = 64) against n cached keys: the decode attention step.
#[divan::bench(args = [1024, 4096, 8192])]
fn attend_group_decode(b: Bencher, n: usize) {
    let (g, d) = (3, 64);
    let q = random(g * d, 7);
    let keys = random(n * d, 8);
    let values = random(n * d, 9);
    let bias = random(n, 10);
    let mut out = vec![0.0; g * d];
    let mut scratch = Vec::new();
    b.counter(BytesCount::new(2 * n * d * 4)).bench_local(|| {
        k::attend_group(&q, &keys, &values, Some(&bias), n, d, 0.125, &mut out, &mut scratch)
    });
}

#[divan::bench(args = [64, 576, 4096])]
fn dot(b: Bencher, n: usize) {
    let (x, y) = (random(n, 11), random(n, 12));
    b.counter(BytesCount::new(2 * n * 4)).bench_local(|| k::dot(divan::black_box(&x), divan::black_box(&y)));
}

#[divan::bench(args = [576, 4096])]
fn rmsnorm(b: Bencher, n: usize) {
    let (x, w) = (random(n, 13), random(n, 14));
    let mut out = vec![0.0; n];
    b.counter(BytesCount::new(3 * n * 4)).bench_local(|| k::rmsnorm(&mut out, &x, &w, 1e-5));
}
