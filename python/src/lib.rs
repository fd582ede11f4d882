//! The `kvcompact` Python package's native module (`kvcompact._kvcompact`): thin wrappers over the
//! library, so a call gives the same bits as the CLI.
//!
//! Inputs are anything `numpy.asarray` reads (arrays of any memory layout, lists, objects with
//! `__array__` such as torch CPU tensors) holding floats (float16, float32, float64): they are
//! converted to C-contiguous float32 (what the CLI's files hold) before anything runs. Integer,
//! complex, bool or object arrays and arrays of the wrong ndim are refused. Errors are `ValueError`
//! with the library's one-line message. Heavy calls release the GIL.

mod model;

use kvc::compact::oracle::{compact_head as compact_head_rs, HeadArrays, OracleOptions};
use kvc::compact::registry;
use kvc::compact::{BetaSolver, Budget, HeadContext, HeadInput};
use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArrayDescrMethods, PyArrayDyn, PyArrayMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

pub(crate) fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string().replace('\n', " "))
}

/// `x` through `numpy.asarray`, checked to be an `ndim`-D array whose dtype kind is one of `kinds`
/// (numpy's letters: `f` float, `i` signed, `u` unsigned integer). `what` names the expected shape.
fn checked_array<'py>(py: Python<'py>, name: &str, x: &Bound<'py, PyAny>, ndim: usize, what: &str, kinds: &[u8]) -> PyResult<Bound<'py, PyUntypedArray>> {
    let np = py.import("numpy")?;
    let a = np.call_method1("asarray", (x,)).map_err(|e| value_error(format!("{name}: numpy.asarray cannot read it ({e})")))?;
    let arr = a.cast_into::<PyUntypedArray>().map_err(|_| value_error(format!("{name}: numpy.asarray did not return an array")))?;
    let kind = arr.dtype().kind();
    if !kinds.contains(&kind) {
        let want = if kinds.contains(&b'f') { "floats (float16, float32 or float64)" } else { "integers" };
        return Err(value_error(format!("{name} must hold {want}, got dtype {}", arr.dtype())));
    }
    if arr.ndim() != ndim {
        return Err(value_error(format!("{name} must be {ndim}-D {what}, got shape {:?}", arr.shape())));
    }
    Ok(arr)
}

/// An array-like of floats as row-major (C-order) f32 and its shape, exactly as
/// `numpy.ascontiguousarray(x, dtype=float32)` gives it, whatever the input's layout.
fn floats(py: Python<'_>, name: &str, x: &Bound<'_, PyAny>, ndim: usize, what: &str) -> PyResult<(Vec<f32>, Vec<usize>)> {
    let arr = checked_array(py, name, x, ndim, what, b"f")?;
    let np = py.import("numpy")?;
    let c = np.call_method1("ascontiguousarray", (arr, "float32"))?.cast_into::<PyArrayDyn<f32>>()?;
    let ro = c.readonly();
    let v = ro.as_array();
    // Iterating the view walks it in logical (row-major) order, whatever its strides.
    Ok((v.iter().copied().collect(), v.shape().to_vec()))
}

/// A 2-D float array-like as (row-major f32, rows, columns).
fn rows(py: Python<'_>, name: &str, x: &Bound<'_, PyAny>) -> PyResult<(Vec<f32>, usize, usize)> {
    let (v, shape) = floats(py, name, x, 2, "[rows, d]")?;
    Ok((v, shape[0], shape[1]))
}

/// A 1-D float array-like as f32.
fn vector(py: Python<'_>, name: &str, x: &Bound<'_, PyAny>) -> PyResult<Vec<f32>> {
    Ok(floats(py, name, x, 1, "[T]")?.0)
}

/// Absolute positions: a 1-D integer array-like, each in u32.
fn positions_arg(py: Python<'_>, x: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    let arr = checked_array(py, "positions", x, 1, "[T]", b"iu")?;
    let list: Vec<i128> = arr.call_method0("tolist")?.extract()?;
    list.iter().map(|&p| u32::try_from(p).map_err(|_| value_error(format!("positions: {p} is out of range (0 ..= {})", u32::MAX)))).collect()
}

/// A seed: any integer in 0 ..= 2⁶⁴ − 1 (a ValueError, not an OverflowError, outside).
fn seed_arg(seed: i128) -> PyResult<u64> {
    u64::try_from(seed).map_err(|_| value_error(format!("seed {seed} is out of range (0 ..= {})", u64::MAX)))
}

/// Compact one attention head with any registry method — the `compact-head` oracle.
///
/// keys, values: [T, d]; queries: [n, d] reference queries. Rows kept, in exactly one form:
/// budget (rows t ≤ T), ratio (⌊T/R⌋) or compression_ratio (kvpress: int(T·(1 − r)), at least 1).
/// Returns a dict: indices (int64 [t]), keys [t, d], beta [t], values [t, d] (float32), and
/// rel_l2, mass_err (floats, None without test_queries), seconds.
#[pyfunction]
#[pyo3(signature = (keys, values, queries, budget = None, method = "am-highest", bias = None, test_queries = None, seed = 0, nnls = "reference", kvpress = false, *, ratio = None, compression_ratio = None, positions = None, scale = None, strict_parity = false))]
#[allow(clippy::too_many_arguments)]
fn compact_head<'py>(
    py: Python<'py>,
    keys: &Bound<'py, PyAny>,
    values: &Bound<'py, PyAny>,
    queries: &Bound<'py, PyAny>,
    budget: Option<i64>,
    method: &str,
    bias: Option<&Bound<'py, PyAny>>,
    test_queries: Option<&Bound<'py, PyAny>>,
    seed: i128,
    nnls: &str,
    kvpress: bool,
    ratio: Option<f64>,
    compression_ratio: Option<f64>,
    positions: Option<&Bound<'py, PyAny>>,
    scale: Option<f32>,
    strict_parity: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let seed = seed_arg(seed)?;
    let budget = budget.map(|b| usize::try_from(b).map_err(|_| value_error(format!("budget {b}: rows to keep must be at least 1")))).transpose()?;
    let budget = Budget::from_forms(ratio, compression_ratio, budget)
        .map_err(value_error)?
        .ok_or_else(|| value_error("give the rows to keep: budget, ratio or compression_ratio"))?;
    let (k, t_rows, d) = rows(py, "keys", keys)?;
    let (v, vt, vd) = rows(py, "values", values)?;
    if (vt, vd) != (t_rows, d) {
        return Err(value_error(format!("values has shape [{vt}, {vd}], keys [{t_rows}, {d}]")));
    }
    let (q, _, qd) = rows(py, "queries", queries)?;
    if qd != d {
        return Err(value_error(format!("queries have d = {qd}, keys d = {d}")));
    }
    let test = test_queries.map(|x| rows(py, "test_queries", x)).transpose()?;
    if let Some((_, _, td)) = &test {
        if *td != d {
            return Err(value_error(format!("test_queries have d = {td}, keys d = {d}")));
        }
    }
    let b = bias.map(|x| vector(py, "bias", x)).transpose()?;
    let pos = positions.map(|x| positions_arg(py, x)).transpose()?;
    let opts = OracleOptions { method: method.to_string(), budget, seed, nnls: BetaSolver::parse(nnls).map_err(value_error)?, strict_parity, golden_precision: false, kvpress, ..Default::default() };
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
#[pyo3(signature = (method, keys, values = None, queries = None, *, bias = None, positions = None, scale = None, seed = 0, kvpress = false))]
#[allow(clippy::too_many_arguments)]
fn score_head<'py>(
    py: Python<'py>,
    method: &str,
    keys: &Bound<'py, PyAny>,
    values: Option<&Bound<'py, PyAny>>,
    queries: Option<&Bound<'py, PyAny>>,
    bias: Option<&Bound<'py, PyAny>>,
    positions: Option<&Bound<'py, PyAny>>,
    scale: Option<f32>,
    seed: i128,
    kvpress: bool,
) -> PyResult<Bound<'py, numpy::PyArray1<f64>>> {
    let seed = seed_arg(seed)?;
    let m = registry::method_with(method, &registry::MethodOptions { kvpress, seed, ..Default::default() }).map_err(value_error)?;
    let scorer = m.scorer().ok_or_else(|| value_error(format!("{method:?} fits β and values (Attention Matching); it has no row scores: use compact_head")))?;
    let (k, t_rows, d) = rows(py, "keys", keys)?;
    let v = match values {
        Some(x) => {
            let (v, vt, vd) = rows(py, "values", x)?;
            if (vt, vd) != (t_rows, d) {
                return Err(value_error(format!("values has shape [{vt}, {vd}], keys [{t_rows}, {d}]")));
            }
            v
        }
        None => vec![0.0; k.len()],
    };
    let q = queries.map(|x| rows(py, "queries", x)).transpose()?;
    if let Some((_, _, qd)) = &q {
        if *qd != d {
            return Err(value_error(format!("queries have d = {qd}, keys d = {d}")));
        }
    }
    let b = bias.map(|x| vector(py, "bias", x)).transpose()?;
    let pos: Vec<u32> = match positions {
        Some(x) => positions_arg(py, x)?,
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

/// Every method name the registry knows (`kvcompact eval`'s list), `full` included.
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
