//! The `kvcompact` Python package's native module (`kvcompact._kvcompact`): thin wrappers over the
//! library, so a call gives the same bits as the CLI.
//!
//! Inputs are any array-like numpy accepts, of any float dtype and memory layout: they are converted
//! to C-contiguous float32 (what the CLI's files hold) before anything runs. Errors are
//! `ValueError` with the library's one-line message. Heavy calls release the GIL.

mod model;

use kvc::compact::oracle::{compact_head as compact_head_rs, HeadArrays, OracleOptions};
use kvc::compact::registry;
use kvc::compact::{BetaSolver, Budget, HeadContext, HeadInput};
use numpy::ndarray::Array2;
use numpy::{AllowTypeChange, IntoPyArray, PyArrayLike1, PyArrayLike2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub(crate) fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string().replace('\n', " "))
}

/// A 2-D array as C-contiguous f32 rows and its shape.
fn rows(a: &PyArrayLike2<'_, f32, AllowTypeChange>) -> (Vec<f32>, usize, usize) {
    let v = a.as_array();
    let (r, c) = v.dim();
    (v.iter().copied().collect(), r, c)
}

fn vector(a: &Option<PyArrayLike1<'_, f32, AllowTypeChange>>) -> Option<Vec<f32>> {
    a.as_ref().map(|x| x.as_array().iter().copied().collect())
}

/// Compact one attention head with any registry method — the `compact-head` oracle.
///
/// keys, values: [T, d]; queries: [n, d] reference queries. Rows kept, in exactly one form:
/// budget (rows t ≤ T), ratio (⌊T/R⌋) or compression_ratio (kvpress: int(T·(1 − r)), at least 1).
/// Returns a dict: indices (int64 [t]), keys [t, d], beta [t], values [t, d] (float32), and
/// rel_l2, mass_err (floats, None without test_queries), seconds.
#[pyfunction]
#[pyo3(signature = (keys, values, queries, budget = None, *, ratio = None, compression_ratio = None, method = "am-omp", bias = None, test_queries = None, positions = None, scale = None, seed = 0, nnls = "reference", strict_parity = false))]
#[allow(clippy::too_many_arguments)]
fn compact_head<'py>(
    py: Python<'py>,
    keys: PyArrayLike2<'py, f32, AllowTypeChange>,
    values: PyArrayLike2<'py, f32, AllowTypeChange>,
    queries: PyArrayLike2<'py, f32, AllowTypeChange>,
    budget: Option<usize>,
    ratio: Option<f64>,
    compression_ratio: Option<f64>,
    method: &str,
    bias: Option<PyArrayLike1<'py, f32, AllowTypeChange>>,
    test_queries: Option<PyArrayLike2<'py, f32, AllowTypeChange>>,
    positions: Option<Vec<i64>>,
    scale: Option<f32>,
    seed: u64,
    nnls: &str,
    strict_parity: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let budget = Budget::from_forms(ratio, compression_ratio, budget)
        .map_err(value_error)?
        .ok_or_else(|| value_error("give the rows to keep: budget, ratio or compression_ratio"))?;
    let (k, t_rows, d) = rows(&keys);
    let (v, vt, vd) = rows(&values);
    if (vt, vd) != (t_rows, d) {
        return Err(value_error(format!("values has shape [{vt}, {vd}], keys [{t_rows}, {d}]")));
    }
    let (q, _, qd) = rows(&queries);
    if qd != d {
        return Err(value_error(format!("queries have d = {qd}, keys d = {d}")));
    }
    let test = test_queries.as_ref().map(rows);
    if let Some((_, _, td)) = &test {
        if *td != d {
            return Err(value_error(format!("test_queries have d = {td}, keys d = {d}")));
        }
    }
    let b = vector(&bias);
    let pos: Option<Vec<u32>> = match positions {
        Some(p) => Some(p.iter().map(|&x| u32::try_from(x).map_err(|_| value_error(format!("position {x} is out of range")))).collect::<PyResult<_>>()?),
        None => None,
    };
    let opts = OracleOptions { method: method.to_string(), budget, seed, nnls: BetaSolver::parse(nnls).map_err(value_error)?, strict_parity, golden_precision: false };
    let r = py
        .detach(|| {
            let arrays = HeadArrays {
                d,
                keys: &k,
                values: &v,
                queries: &q,
                bias: b.as_deref(),
                test_queries: test.as_ref().map(|t| t.0.as_slice()),
                positions: pos.as_deref(),
                scale,
            };
            compact_head_rs(&arrays, &opts)
        })
        .map_err(value_error)?;
    let t = r.indices.len();
    let out = PyDict::new(py);
    out.set_item("indices", r.indices.iter().map(|&i| i as i64).collect::<Vec<i64>>().into_pyarray(py))?;
    out.set_item("keys", Array2::from_shape_vec((t, d), r.keys).map_err(value_error)?.into_pyarray(py))?;
    out.set_item("beta", r.beta.into_pyarray(py))?;
    out.set_item("values", Array2::from_shape_vec((t, d), r.values).map_err(value_error)?.into_pyarray(py))?;
    out.set_item("rel_l2", r.report.rel_l2)?;
    out.set_item("mass_err", r.report.mass_err)?;
    out.set_item("seconds", r.report.seconds)?;
    Ok(out)
}

/// Raw per-row scores (float64 [T], higher = keep) of an eviction baseline on one head, before
/// any protection or selection. Methods that score by attention use `queries` ([n, d], all the
/// query heads of the group, non-causally); `knorm`, `streaming-llm` and `random` need none.
#[pyfunction]
#[pyo3(signature = (method, keys, *, values = None, queries = None, bias = None, positions = None, scale = None, seed = 0))]
#[allow(clippy::too_many_arguments)]
fn score_head<'py>(
    py: Python<'py>,
    method: &str,
    keys: PyArrayLike2<'py, f32, AllowTypeChange>,
    values: Option<PyArrayLike2<'py, f32, AllowTypeChange>>,
    queries: Option<PyArrayLike2<'py, f32, AllowTypeChange>>,
    bias: Option<PyArrayLike1<'py, f32, AllowTypeChange>>,
    positions: Option<Vec<i64>>,
    scale: Option<f32>,
    seed: u64,
) -> PyResult<Bound<'py, numpy::PyArray1<f64>>> {
    let m = registry::method_from_name(method).map_err(value_error)?;
    let scorer = m.scorer().ok_or_else(|| value_error(format!("{method:?} fits β and values (Attention Matching); it has no row scores: use compact_head")))?;
    let (k, t_rows, d) = rows(&keys);
    let v = match &values {
        Some(x) => {
            let (v, vt, vd) = rows(x);
            if (vt, vd) != (t_rows, d) {
                return Err(value_error(format!("values has shape [{vt}, {vd}], keys [{t_rows}, {d}]")));
            }
            v
        }
        None => vec![0.0; k.len()],
    };
    let q = queries.as_ref().map(rows);
    if let Some((_, _, qd)) = &q {
        if *qd != d {
            return Err(value_error(format!("queries have d = {qd}, keys d = {d}")));
        }
    }
    let b = vector(&bias);
    let pos: Vec<u32> = match positions {
        Some(p) => p.iter().map(|&x| u32::try_from(x).map_err(|_| value_error(format!("position {x} is out of range")))).collect::<PyResult<_>>()?,
        None => (0..t_rows as u32).collect(),
    };
    let scale = scale.unwrap_or(1.0 / (d.max(1) as f32).sqrt());
    let scores = py
        .detach(|| {
            let input = HeadInput { layer: 0, kv_head: 0, d, keys: &k, values: &v, positions: &pos, bias: b.as_deref(), queries: q.as_ref().map(|x| x.0.as_slice()), scale };
            input.validate(0, scorer.needs_queries())?;
            scorer.score_head(&input, &HeadContext::default(), seed)
        })
        .map_err(value_error)?;
    Ok(scores.into_pyarray(py))
}

/// Every method name the registry knows (the same list `kvcompact eval` takes).
#[pyfunction]
fn methods() -> Vec<&'static str> {
    registry::METHODS.to_vec()
}

/// The native module.
#[pymodule]
fn _kvcompact(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(compact_head, m)?)?;
    m.add_function(wrap_pyfunction!(score_head, m)?)?;
    m.add_function(wrap_pyfunction!(methods, m)?)?;
    m.add_class::<model::Model>()?;
    m.add_class::<model::Cache>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
