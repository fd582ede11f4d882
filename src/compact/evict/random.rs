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
