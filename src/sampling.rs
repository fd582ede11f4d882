//! Next-token choice: greedy at temperature 0, otherwise temperature + nucleus (top-p)
//! sampling from a seeded generator, so a run is reproducible from its seed.

/// xoshiro256** seeded through splitmix64: small, fast, and the same on every platform.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator whose whole stream is determined by `seed`.
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        };
        Rng { s: [next(), next(), next(), next()] }
    }

    /// The next 64 uniformly random bits.
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `n` values uniform in [-amp, amp) (seeded test and benchmark data).
    pub fn uniform_f32(&mut self, n: usize, amp: f32) -> Vec<f32> {
        (0..n).map(|_| (self.next_f64() * 2.0 - 1.0) as f32 * amp).collect()
    }

    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Picks the next token from logits: greedy, or temperature + top-p from its own seeded [`Rng`].
#[derive(Debug, Clone)]
pub struct Sampler {
    /// Softmax temperature; `<= 0` means greedy (argmax).
    pub temperature: f32,
    /// Nucleus mass kept; values `<= 0` or `>= 1` sample from the whole distribution.
    pub top_p: f32,
    rng: Rng,
    probs: Vec<(f32, u32)>, // scratch [vocab]
}

impl Sampler {
    /// A sampler with its generator seeded from `seed`.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Sampler {
        Sampler { temperature, top_p, rng: Rng::new(seed), probs: Vec::new() }
    }

    /// [`Sampler::new`], refusing a temperature that is negative or not finite and a top-p
    /// outside (0, 1] (one-line errors).
    pub fn checked(temperature: f32, top_p: f32, seed: u64) -> crate::Result<Sampler> {
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(crate::Error::Invalid(format!("temperature must be a finite number ≥ 0, got {temperature}")));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(crate::Error::Invalid(format!("top_p must be in (0, 1], got {top_p}")));
        }
        Ok(Sampler::new(temperature, top_p, seed))
    }

    /// True when `temperature <= 0` (no randomness is drawn).
    pub fn is_greedy(&self) -> bool {
        self.temperature <= 0.0
    }

    /// The next token id from one token's logits `[vocab]`; NaN logits are never chosen when
    /// sampling (greedy follows [`kvcompact_kernels::argmax`]).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.is_greedy() {
            return kvcompact_kernels::argmax(logits) as u32;
        }
        // Softmax at temperature T in f64 so tiny probabilities are not flushed before the cut.
        let inv_t = 1.0 / self.temperature as f64;
        let max = logits.iter().copied().filter(|x| !x.is_nan()).fold(f32::NEG_INFINITY, f32::max) as f64;
        self.probs.clear();
        let mut sum = 0.0f64;
        for (i, &l) in logits.iter().enumerate() {
            let p = if l.is_nan() { 0.0 } else { ((l as f64 - max) * inv_t).exp() };
            sum += p;
            self.probs.push((p as f32, i as u32));
        }
        let r = self.rng.next_f64();
        if self.top_p <= 0.0 || self.top_p >= 1.0 {
            let target = r * sum;
            let mut acc = 0.0f64;
            for &(p, i) in &self.probs {
                acc += p as f64;
                if acc > target {
                    return i;
                }
            }
            return self.probs.last().map(|x| x.1).unwrap_or(0);
        }
        // Nucleus: the smallest set of most likely tokens whose mass reaches top_p.
        // Stable order on ties (by id) keeps runs reproducible.
        self.probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let cut_mass = self.top_p as f64 * sum;
        let mut acc = 0.0f64;
        let mut last = self.probs.len() - 1;
        for (k, &(p, _)) in self.probs.iter().enumerate() {
            acc += p as f64;
            if acc >= cut_mass {
                last = k;
                break;
            }
        }
        let target = r * acc;
        let mut run = 0.0f64;
        for &(p, i) in &self.probs[..=last] {
            run += p as f64;
            if run > target {
                return i;
            }
        }
        self.probs[last].1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_seeded_sampling() {
        let logits = [0.0, 3.0, 1.0, 3.0];
        assert_eq!(Sampler::new(0.0, 0.9, 1).sample(&logits), 1);
        let draw = |seed| {
            let mut s = Sampler::new(1.0, 0.9, seed);
            (0..50).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        // top_p small enough keeps only the two tied best tokens.
        let mut s = Sampler::new(1.0, 0.5, 3);
        for _ in 0..100 {
            let t = s.sample(&logits);
            assert!(t == 1 || t == 3);
        }
    }

    #[test]
    fn rng_is_uniform_enough() {
        let mut r = Rng::new(42);
        let mut counts = [0usize; 4];
        for _ in 0..40_000 {
            counts[r.below(4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| (9_000..11_000).contains(&c)), "{counts:?}");
    }
}
