//! Per-head budgets: uniform, the spec §11 water-fill of given proportions, or one global top-k
//! of key scores over every head (issue 14's diagnosis, `docs/amdiag.md`), and the proportions file
//! (`{"L{layer}H{kv_head}": p}`). The sweep and solver that produce proportions are `influence.rs`.

use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;

use crate::cache::KvCache;
use crate::compact::HeadInput;
use crate::error::{Error, Result};

/// The names of AM's per-head allocations without proportions (`--am-budgets`; the first is the
/// default of `compact`, `eval`, `demo`, Python and the server).
pub const AM_BUDGETS: &[&str] = &["global", "uniform"];

/// Whether `name` (one of [`AM_BUDGETS`]) asks for the global allocation
/// ([`CompactOptions::global_budgets`](super::CompactOptions::global_budgets)).
pub fn global_from_name(name: &str) -> Result<bool> {
    match name {
        "global" => Ok(true),
        "uniform" => Ok(false),
        _ => Err(Error::Invalid(format!("am_budgets {name:?}: expected {}", AM_BUDGETS.join(" or ")))),
    }
}

/// Budgets per (layer, KV head) for an article of `t_article` rows compacted by `ratio`.
/// Uniform without proportions; otherwise the spec §11 water-fill with cap `max_ratio`.
pub fn head_budgets(n_layers: usize, n_kv: usize, t_article: usize, ratio: f64, props: Option<&HashMap<String, f64>>, max_ratio: f64) -> Result<Vec<usize>> {
    if !(ratio >= 1.0) || !ratio.is_finite() {
        return Err(Error::Invalid(format!("--ratio must be ≥ 1, got {ratio}")));
    }
    let t_keep = ((t_article as f64 / ratio).floor() as usize).clamp(1.min(t_article), t_article);
    let h_tot = n_layers * n_kv;
    let Some(props) = props else {
        return Ok(vec![t_keep; h_tot]);
    };
    let mut p = vec![f64::NAN; h_tot];
    for (k, &v) in props {
        let parsed = k
            .strip_prefix('L')
            .and_then(|r| r.split_once('H'))
            .and_then(|(l, h)| Some((l.parse::<usize>().ok()?, h.parse::<usize>().ok()?)));
        let Some((l, h)) = parsed else {
            return Err(Error::Invalid(format!("budget key {k:?} is not of the form L<layer>H<kv_head>")));
        };
        if l >= n_layers || h >= n_kv {
            return Err(Error::Invalid(format!("budget key {k} is outside the model ({n_layers} layers × {n_kv} KV heads)")));
        }
        if !(v >= 0.0) || !v.is_finite() {
            return Err(Error::Invalid(format!("budget {k} = {v} must be a finite proportion ≥ 0")));
        }
        p[l * n_kv + h] = v;
    }
    let listed: f64 = p.iter().filter(|x| !x.is_nan()).sum();
    if !(listed > 0.0) || !listed.is_finite() {
        return Err(Error::Invalid(format!("budget proportions must have a finite sum > 0, got {listed}")));
    }
    // Water-fill: cap every head at c, hand the excess to uncapped heads pro rata, repeat.
    let rho = t_keep as f64 / t_article.max(1) as f64;
    let cap = max_ratio / (rho * h_tot as f64);
    let mut q: Vec<f64> = p.iter().map(|&x| if x.is_nan() { 0.0 } else { x / listed }).collect();
    for _ in 0..h_tot {
        let excess: f64 = q.iter().filter(|&&x| x > cap).map(|x| x - cap).sum();
        if excess <= 1e-15 {
            break;
        }
        let free: f64 = q.iter().filter(|&&x| x < cap).sum();
        for x in q.iter_mut() {
            if *x > cap {
                *x = cap;
            } else if free > 0.0 && *x < cap {
                *x += excess * *x / free;
            }
        }
    }
    let total = (t_keep * h_tot) as f64;
    Ok(p.iter()
        .zip(&q)
        .map(|(&orig, &x)| if orig.is_nan() { t_keep } else { ((x * total).floor() as usize).min(t_article) })
        .collect())
}

/// The key score behind the global allocation, per head (layer-major): the maximum over the head's
/// reference queries `queries[i]` of each row's attention weight, normalised over every row the
/// head holds in `cache` (template rows included, as KVzip normalises, so a head whose queries
/// mostly attend to the sink scores low everywhere), kept for the rows `rows[i]`.
pub fn global_key_scores(cache: &KvCache, rows: &[Range<usize>], queries: &[Vec<f32>], scale: f32) -> Result<Vec<Vec<f64>>> {
    use crate::compact::am::fit::max_scores_blocked;
    use rayon::prelude::*;
    let nkv = cache.n_kv_heads;
    (0..rows.len())
        .into_par_iter()
        .map(|i| {
            let (l, h) = (i / nkv, i % nkv);
            let input = HeadInput::from_cache(cache, l, h, 0..cache.len(l, h), Some(&queries[i][..]), scale);
            Ok(max_scores_blocked(&input)?[rows[i].clone()].to_vec())
        })
        .collect()
}

/// Per-head budgets from one global selection (spec §11, last paragraph: the reference's
/// `global_highest_attention_keys`): the `per_head · heads` highest scores over every head's rows
/// are kept, and each head's budget is how many of them are its own. The total equals the uniform
/// one (capped at the rows there are); a head can get anything from 0 to all its rows. Ties go to
/// the lower (head, row); NaN scores rank last.
pub fn global_budgets(scores: &[Vec<f64>], per_head: usize) -> Vec<usize> {
    let mut flat: Vec<(usize, usize)> = scores.iter().enumerate().flat_map(|(h, s)| (0..s.len()).map(move |j| (h, j))).collect();
    let key = |&(h, j): &(usize, usize)| if scores[h][j].is_nan() { f64::NEG_INFINITY } else { scores[h][j] };
    let n = (per_head * scores.len()).min(flat.len());
    let mut counts = vec![0usize; scores.len()];
    if n == 0 {
        return counts;
    }
    let cmp = |a: &(usize, usize), b: &(usize, usize)| key(b).total_cmp(&key(a)).then(a.cmp(b));
    if n < flat.len() {
        flat.select_nth_unstable_by(n - 1, cmp);
    }
    for &(h, _) in &flat[..n] {
        counts[h] += 1;
    }
    counts
}

/// Read per-head budget proportions `{"L{layer}H{kv_head}": p}` from a JSON file.
pub fn read_proportions(path: &Path) -> Result<HashMap<String, f64>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Invalid(format!("{}: expected a JSON object of proportions {{\"L<layer>H<kv_head>\": p}}: {e}", path.display())))
}

/// Write proportions as pretty JSON with sorted keys, atomically (temporary file + rename).
pub fn write_proportions(path: &Path, props: &HashMap<String, f64>) -> Result<()> {
    let sorted: BTreeMap<_, _> = props.iter().collect();
    let text = serde_json::to_string_pretty(&sorted).map_err(|e| Error::Invalid(e.to_string()))?;
    let tmp = crate::tensor_file::tmp_path(path);
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::global_budgets;

    #[test]
    fn global_budgets_keep_the_total_and_follow_the_scores() {
        assert_eq!(global_budgets(&[vec![3.0, 1.0], vec![2.0, 0.0]], 1), vec![1, 1]);
        assert_eq!(global_budgets(&[vec![5.0, 4.0], vec![1.0, 0.0]], 1), vec![2, 0]);
        // Ties go to the lower (head, row); NaN ranks last; the total is capped at the rows.
        assert_eq!(global_budgets(&[vec![1.0, 1.0], vec![1.0, 1.0]], 1), vec![2, 0]);
        assert_eq!(global_budgets(&[vec![f64::NAN, 0.5], vec![0.1, 0.2]], 1), vec![1, 1]);
        assert_eq!(global_budgets(&[vec![1.0], vec![2.0]], 5), vec![1, 1]);
        assert_eq!(global_budgets(&[], 3), Vec::<usize>::new());
    }
}
