//! K-norm (arXiv 2406.11430; spec `baselines.md` §2, `q-filters.md` §1): keep the keys with the
//! smallest L2 norm, s_j = −‖k_j‖₂. RoPE is a rotation, so pre- and post-RoPE keys score the same.

use crate::compact::head::{HeadContext, HeadInput};
use crate::compact::method::Scorer;
use crate::Result;

/// K-norm scorer: s_j = −‖k_j‖₂ (small keys kept); needs no queries.
#[derive(Debug, Clone, Copy, Default)]
pub struct KNorm;

impl Scorer for KNorm {
    fn name(&self) -> &'static str {
        "knorm"
    }

    fn score_head(&self, input: &HeadInput, _ctx: &HeadContext, _seed: u64) -> Result<Vec<f64>> {
        Ok(input.keys.chunks(input.d).map(|k| -k.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt()).collect())
    }
}
