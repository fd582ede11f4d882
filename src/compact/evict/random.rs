//! Random eviction (spec `baselines.md` §2): uniform scores from the head's seeded generator, so a
//! run is reproducible from its seed and every head draws an independent stream.

use crate::compact::head::{HeadContext, HeadInput};
use crate::compact::method::Scorer;
use crate::sampling::Rng;
use crate::Result;

/// Random eviction: uniform [0, 1) scores from the head's seed.
#[derive(Debug, Clone, Copy, Default)]
pub struct RandomEvict;

impl Scorer for RandomEvict {
    fn name(&self) -> &'static str {
        "random"
    }

    fn score_head(&self, input: &HeadInput, _ctx: &HeadContext, seed: u64) -> Result<Vec<f64>> {
        let mut rng = Rng::new(seed);
        Ok((0..input.rows()).map(|_| rng.next_f64()).collect())
    }
}

/// The 32-bit Mersenne Twister (MT19937) as torch's CPU generator runs it: `manual_seed(s)`
/// initialises it with the low 32 bits of s (Matsumoto–Nishimura `init_genrand`), and every
/// `torch.rand` float32 draw is `(next_u32() & 0xFF_FFFF) / 2^24` (24 mantissa bits).
#[derive(Debug, Clone)]
pub struct Mt19937 {
    state: Box<[u32; 624]>,
    index: usize,
}

impl Mt19937 {
    /// A generator seeded as `torch.Generator().manual_seed(seed)`.
    pub fn new(seed: u64) -> Mt19937 {
        let mut state = Box::new([0u32; 624]);
        state[0] = seed as u32;
        for j in 1..624 {
            let p = state[j - 1];
            state[j] = 1_812_433_253u32.wrapping_mul(p ^ (p >> 30)).wrapping_add(j as u32);
        }
        Mt19937 { state, index: 624 }
    }

    fn twist(&mut self) {
        let s = &mut self.state;
        for k in 0..624 {
            let y = (s[k] & 0x8000_0000) | (s[(k + 1) % 624] & 0x7fff_ffff);
            s[k] = s[(k + 397) % 624] ^ (y >> 1) ^ if y & 1 == 1 { 0x9908_b0df } else { 0 };
        }
        self.index = 0;
    }

    /// The next 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= 624 {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// The next `torch.rand` float32 value in [0, 1).
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 / (1u32 << 24) as f32
    }
}

/// kvpress `RandomPress(seed)` scores of KV head `kv_head` over a cache of `rows` rows: the press
/// draws `torch.rand(1, n_kv, rows)` from a generator re-seeded with `seed` on every layer, so
/// head h gets draws [h·rows, (h + 1)·rows) and every layer the same scores.
pub fn torch_rand_scores(seed: u64, kv_head: usize, rows: usize) -> Vec<f64> {
    let mut g = Mt19937::new(seed);
    for _ in 0..kv_head * rows {
        g.next_u32();
    }
    (0..rows).map(|_| g.next_f32() as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_stream_and_torch_rand() {
        // The reference MT19937 (seed 5489) gives 3499211612 first and 4123659995 at the 10000th draw.
        let mut g = Mt19937::new(5489);
        assert_eq!(g.next_u32(), 3_499_211_612);
        let mut g = Mt19937::new(5489);
        let x = (0..10_000).map(|_| g.next_u32()).last();
        assert_eq!(x, Some(4_123_659_995));
        // torch.manual_seed(42); torch.rand(3) = [0.8822692632675171, 0.9150039553642273, 0.38286375999450684]
        let s = torch_rand_scores(42, 0, 3);
        assert_eq!(s, vec![0.8822692632675171, 0.9150039553642273, 0.38286375999450684]);
        assert_eq!(torch_rand_scores(42, 1, 2)[..], torch_rand_scores(42, 0, 5)[2..4]);
    }
}
