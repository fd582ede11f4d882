"""The Python package against the CLI oracle: `kvcompact.compact_head` gives the bits of
`kvcompact compact-head` on the same head, whatever the input dtype and memory layout; bad input
raises ValueError with the library's message; `score_head` gives a baseline's raw scores."""

import json
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import kvcompact

REPO = Path(__file__).resolve().parents[2]
BIN = REPO / "target" / "release" / "kvcompact"


def write_safetensors(path, tensors):
    """A minimal safetensors writer (header JSON + little-endian data), enough for the oracle's inputs."""
    header, blobs, off = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        dt = {np.dtype("float32"): "F32", np.dtype("int64"): "I64"}[arr.dtype]
        b = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def read_safetensors(path):
    b = Path(path).read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        s, e = meta["data_offsets"]
        dt = {"F32": "<f4", "I64": "<i8"}[meta["dtype"]]
        out[name] = np.frombuffer(b[8 + n + s : 8 + n + e], dtype=dt).reshape(meta["shape"])
    return out


def head(seed=0, t=96, d=16, n=64, m=24):
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((t, d)).astype(np.float32)
    values = rng.standard_normal((t, d)).astype(np.float32)
    queries = (2.0 * rng.standard_normal((n, d))).astype(np.float32)
    test = (2.0 * rng.standard_normal((m, d))).astype(np.float32)
    bias = (0.1 * rng.standard_normal(t)).astype(np.float32)
    return keys, values, queries, test, bias


@pytest.mark.parametrize("method", ["am-omp", "am-highest", "baseline", "am-omp-fast", "am-omp-seeded"])
def test_compact_head_bit_identical_to_cli(tmp_path, method):
    keys, values, queries, test, bias = head(seed=3)
    budget, seed = 12, 5
    write_safetensors(tmp_path / "in.safetensors", {"keys": keys, "values": values, "queries": queries, "test_queries": test, "bias": bias})
    cmd = [str(BIN), "compact-head", "--input", str(tmp_path / "in.safetensors"), "--output", str(tmp_path / "out.safetensors"), "--method", method, "--budget", str(budget), "--seed", str(seed)]
    report = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    cli = read_safetensors(tmp_path / "out.safetensors")
    py = kvcompact.compact_head(keys, values, queries, budget, method=method, bias=bias, test_queries=test, seed=seed)
    assert py["indices"].dtype == np.int64 and py["keys"].dtype == np.float32
    for name in ("indices", "keys", "beta", "values"):
        assert py[name].shape == cli[name].shape, name
        assert py[name].tobytes() == cli[name].tobytes(), f"{method}: {name} differs from the CLI"
    assert py["rel_l2"] == pytest.approx(report["rel_l2"], rel=0, abs=0)
    assert py["mass_err"] == report["mass_err"]


class ArrayOnly:
    """A torch-like stand-in: numpy sees it only through `__array__` (as it sees a torch CPU tensor)."""

    def __init__(self, a):
        self._a = a

    def __array__(self, dtype=None, copy=None):
        return self._a if dtype is None else self._a.astype(dtype)


def strided(a):
    """A non-contiguous view holding `a`'s values: every other row and column of a bigger array."""
    big = np.full((a.shape[0] * 2, a.shape[1] * 2) if a.ndim == 2 else (a.shape[0] * 2,), 7.0, dtype=a.dtype)
    if a.ndim == 2:
        big[::2, 1::2] = a
        view = big[::2, 1::2]
    else:
        big[1::2] = a
        view = big[1::2]
    assert not view.flags.c_contiguous and np.array_equal(view, a)
    return view


# Each variant turns a float32 array into another form holding the same values (float16-exact inputs,
# so float16 loses nothing): all must give the bits of C-contiguous float32.
LAYOUTS = {
    "fortran": np.asfortranarray,
    "strided": strided,
    "float64": lambda a: a.astype(np.float64),
    "float16": lambda a: a.astype(np.float16),
    "fortran-float64": lambda a: np.asfortranarray(a.astype(np.float64)),
    "big-endian": lambda a: a.astype(">f4"),
    "array-only": ArrayOnly,
    "array-only-float64-strided": lambda a: ArrayOnly(strided(a.astype(np.float64))),
    "list": lambda a: a.tolist(),
}


def head16(seed=0, t=80, d=16, n=48, m=16):
    """head() rounded to float16 values (stored as float32)."""
    return tuple(x.astype(np.float16).astype(np.float32) for x in head(seed, t, d, n, m))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("method", ["am-highest", "am-omp", "snapkv"])
def test_compact_head_any_layout_and_float_dtype_gives_the_same_bits(layout, method):
    keys, values, queries, test, bias = head16(seed=7)
    assert keys.flags.c_contiguous and keys.dtype == np.float32
    base = kvcompact.compact_head(keys, values, queries, 10, method=method, bias=bias, test_queries=test, seed=1)
    f = LAYOUTS[layout]
    r = kvcompact.compact_head(f(keys), f(values), f(queries), 10, method=method, bias=f(bias), test_queries=f(test), seed=1)
    for name in ("indices", "keys", "beta", "values"):
        assert r[name].dtype == base[name].dtype and r[name].tobytes() == base[name].tobytes(), (layout, name)
    assert (r["rel_l2"], r["mass_err"]) == (base["rel_l2"], base["mass_err"])


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("method", ["knorm", "snapkv", "expected-attention", "tova"])
def test_score_head_any_layout_and_float_dtype_gives_the_same_bits(layout, method):
    keys, values, queries, _, bias = head16(seed=8)
    base = kvcompact.score_head(method, keys, values, queries, bias=bias)
    f = LAYOUTS[layout]
    r = kvcompact.score_head(method, f(keys), f(values), f(queries), bias=f(bias))
    assert r.dtype == np.float64 and r.tobytes() == base.tobytes(), layout


def test_float64_inputs_are_rounded_like_numpy_astype():
    # Not float16-exact: float64 → float32 must round exactly as numpy's astype does.
    keys, values, queries, test, _ = (x.astype(np.float64) * (1 + 1e-9) for x in head(seed=9))
    base = kvcompact.compact_head(*(x.astype(np.float32) for x in (keys, values, queries)), 10, test_queries=test.astype(np.float32))
    r = kvcompact.compact_head(np.asfortranarray(keys), values, queries, 10, test_queries=test)
    for name in ("indices", "keys", "beta", "values"):
        assert r[name].tobytes() == base[name].tobytes(), name


def bad_inputs():
    """(what, keyword overrides of compact_head's arrays, a word the message must hold)."""
    keys, values, queries, test, bias = head(seed=4)
    nan = lambda a, *i: (lambda c: (c.__setitem__(i, np.nan), c)[1])(a.copy())
    inf = lambda a, *i: (lambda c: (c.__setitem__(i, -np.inf), c)[1])(a.copy())
    return [
        ("int keys", {"keys": np.arange(keys.size).reshape(keys.shape)}, "keys must hold floats"),
        ("int32 values", {"values": values.astype(np.int32)}, "values must hold floats"),
        ("uint8 queries", {"queries": queries.astype(np.uint8)}, "queries must hold floats"),
        ("int bias", {"bias": np.zeros(len(bias), dtype=np.int64)}, "bias must hold floats"),
        ("complex keys", {"keys": keys.astype(np.complex64)}, "keys must hold floats"),
        ("complex test", {"test_queries": test + 0j}, "test_queries must hold floats"),
        ("bool queries", {"queries": queries > 0}, "queries must hold floats"),
        ("object keys", {"keys": np.array([["a"] * 4] * 3, dtype=object)}, "keys must hold floats"),
        ("string keys", {"keys": "keys"}, "keys must hold floats"),
        ("int list", {"queries": [[1, 2], [3, 4]]}, "queries must hold floats"),
        ("1-D keys", {"keys": keys[0]}, "keys must be 2-D"),
        ("3-D queries", {"queries": queries[None]}, "queries must be 2-D"),
        ("0-D values", {"values": np.float32(1.0)}, "values must be 2-D"),
        ("2-D bias", {"bias": bias[:, None]}, "bias must be 1-D"),
        ("1-D test", {"test_queries": test[0]}, "test_queries must be 2-D"),
        ("ragged list", {"queries": [[1.0, 2.0], [3.0]]}, "queries"),
        ("NaN keys", {"keys": nan(keys, 3, 1)}, "NaN"),
        ("NaN values", {"values": nan(values, 0, 0)}, "NaN"),
        ("NaN queries", {"queries": nan(queries, 5, 2)}, "NaN"),
        ("NaN bias", {"bias": nan(bias, 7)}, "NaN"),
        ("NaN test", {"test_queries": nan(test, 1, 1)}, "NaN"),
        ("inf keys", {"keys": inf(keys, 2, 2)}, "infinit"),
        ("float64 overflow", {"values": values.astype(np.float64) * 1e300}, "infinit"),
        ("NaN float16", {"queries": nan(queries.astype(np.float16), 0, 0)}, "NaN"),
        ("NaN array-only", {"keys": ArrayOnly(nan(keys, 1, 1))}, "NaN"),
    ], (keys, values, queries, test, bias)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("case", range(len(bad_inputs()[0])))
def test_bad_arrays_are_value_errors_never_panics(case):
    cases, (keys, values, queries, test, bias) = bad_inputs()
    what, over, needle = cases[case]
    args = {"keys": keys, "values": values, "queries": queries, "test_queries": test, "bias": bias, **over}
    for method in ("am-highest", "snapkv"):
        with pytest.raises(ValueError) as e:
            kvcompact.compact_head(budget=8, method=method, **args)
        assert needle in str(e.value) and "\n" not in str(e.value), (what, str(e.value))
    if "test_queries" not in over:
        with pytest.raises(ValueError) as e:
            kvcompact.score_head("snapkv", args["keys"], args["values"], args["queries"], bias=args["bias"])
        assert needle in str(e.value), (what, str(e.value))


def test_bad_scalars_and_positions_are_value_errors():
    keys, values, queries, _, _ = head(seed=5)
    t = keys.shape[0]
    cases = [
        (lambda: kvcompact.compact_head(keys, values, queries, -3), "at least 1"),
        (lambda: kvcompact.compact_head(keys, values, queries, 8, positions=np.arange(t) * 0.5), "positions must hold integers"),
        (lambda: kvcompact.compact_head(keys, values, queries, 8, positions=np.arange(t) - 1), "out of range"),
        (lambda: kvcompact.compact_head(keys, values, queries, 8, positions=np.arange(t)[::-1].copy()), "increasing"),
        (lambda: kvcompact.compact_head(keys, values, queries, 8, positions=np.arange(t - 1)), "positions"),
        (lambda: kvcompact.compact_head(keys, values, queries, 8, positions=np.arange(t)[None]), "positions must be 1-D"),
        (lambda: kvcompact.compact_head(keys, values, queries, 8, scale=float("nan")), "scale"),
        (lambda: kvcompact.compact_head(keys, values, queries, 8, seed=-1), "seed -1 is out of range"),
        (lambda: kvcompact.compact_head(keys, values, queries, 8, seed=2**64), "out of range"),
        (lambda: kvcompact.score_head("random", keys, seed=-5), "seed -5 is out of range"),
        (lambda: kvcompact.score_head("knorm", keys, positions=[0.0] * t), "positions must hold integers"),
        (lambda: kvcompact.score_head("knorm", keys, values[:-1]), "values"),
        (lambda: kvcompact.score_head("snapkv", keys, values, queries[:, :-1]), "d ="),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError) as e:
            call()
        assert needle in str(e.value), (needle, str(e.value))
    # Positions as any integer array-like, including a big-endian one or a list.
    pos = np.arange(t, dtype=">u4") * 3
    a = kvcompact.compact_head(keys, values, queries, 8, method="streaming-llm", positions=pos)
    b = kvcompact.compact_head(keys, values, queries, 8, method="streaming-llm", positions=(np.arange(t) * 3).tolist())
    assert a["indices"].tobytes() == b["indices"].tobytes()


@pytest.mark.parametrize("method", ["streaming-llm", "snapkv", "pyramidkv", "tova", "knorm", "expected-attention", "observed-attention", "random"])
def test_kvpress_mode_gives_a_result_for_every_eviction_press(method):
    keys, values, queries, _, bias = head(seed=6)
    py = kvcompact.compact_head(keys, values, queries, 20, method=method, bias=bias, seed=3, kvpress=True)
    idx = py["indices"]
    assert len(idx) == 20 and (np.diff(idx) > 0).all(), method
    assert py["keys"].tobytes() == keys[idx].tobytes()
    s = kvcompact.score_head(method, keys, values, queries, seed=3, kvpress=True)
    assert s.shape == (keys.shape[0],) and np.isfinite(s).all(), method


@pytest.mark.parametrize("method", ["snapkv", "tova", "random"])
def test_kvpress_compact_head_bit_identical_to_cli(tmp_path, method):
    keys, values, queries, _, bias = head(seed=7)
    write_safetensors(tmp_path / "in.safetensors", {"keys": keys, "values": values, "queries": queries, "bias": bias})
    cmd = [str(BIN), "compact-head", "--input", str(tmp_path / "in.safetensors"), "--output", str(tmp_path / "out.safetensors"), "--method", method, "--budget", "17", "--seed", "4", "--kvpress"]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    cli = read_safetensors(tmp_path / "out.safetensors")
    py = kvcompact.compact_head(keys, values, queries, 17, method=method, bias=bias, seed=4, kvpress=True)
    for name in ("indices", "keys", "beta", "values"):
        assert py[name].tobytes() == cli[name].tobytes(), f"{method}: {name} differs from the CLI"


def test_kvpress_refusals_are_value_errors():
    keys, values, queries, _, _ = head(seed=6)
    with pytest.raises(ValueError, match="observed-attention"):
        kvcompact.compact_head(keys, values, queries, 8, method="h2o", kvpress=True)
    with pytest.raises(ValueError, match="observed-attention"):
        kvcompact.score_head("h2o", keys, values, queries, kvpress=True)
    with pytest.raises(ValueError, match="eviction baselines"):
        kvcompact.compact_head(keys, values, queries, 8, method="am-highest", kvpress=True)
    with pytest.raises(ValueError, match="repeat"):
        kvcompact.compact_head(keys, values, queries, 8, method="kvzip", kvpress=True)


def test_signature_follows_the_spec():
    # compact_head(keys, values, queries, budget, method="am-highest", bias=None, test_queries=None,
    # seed=0, nnls="reference", kvpress=False): positional in that order; the default is am-highest.
    keys, values, queries, test, bias = head(seed=10)
    by_kw = kvcompact.compact_head(keys, values, queries, budget=9, method="am-highest", bias=bias, test_queries=test, seed=2, nnls="reference", kvpress=False)
    by_pos = kvcompact.compact_head(keys, values, queries, 9, "am-highest", bias, test, 2, "reference", False)
    default = kvcompact.compact_head(keys, values, queries, 9, bias=bias, test_queries=test, seed=2)
    for name in ("indices", "keys", "beta", "values"):
        assert by_kw[name].tobytes() == by_pos[name].tobytes() == default[name].tobytes(), name
    assert kvcompact.score_head("snapkv", keys, values, queries).tobytes() == kvcompact.score_head("snapkv", keys, values=values, queries=queries).tobytes()


def test_errors_are_value_errors():
    keys, values, queries, test, bias = head(seed=1)
    with pytest.raises(ValueError, match="values"):
        kvcompact.compact_head(keys, values[:-1], queries, 8)
    with pytest.raises(ValueError, match="d ="):
        kvcompact.compact_head(keys, values, queries[:, :-1], 8)
    bad = test.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="test_queries"):
        kvcompact.compact_head(keys, values, queries, 8, test_queries=bad)
    nanq = queries.copy()
    nanq[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        kvcompact.compact_head(keys, values, nanq, 8)
    with pytest.raises(ValueError, match="budget"):
        kvcompact.compact_head(keys, values, queries, keys.shape[0] + 1)
    with pytest.raises(ValueError, match="unknown method"):
        kvcompact.compact_head(keys, values, queries, 8, method="nope")
    with pytest.raises(ValueError, match="nnls|beta solver"):
        kvcompact.compact_head(keys, values, queries, 8, nnls="magic")
    with pytest.raises(ValueError, match="bias"):
        kvcompact.compact_head(keys, values, queries, 8, bias=bias[:-1])
    with pytest.raises(ValueError, match="no row scores"):
        kvcompact.score_head("am-omp", keys)
    with pytest.raises(ValueError, match="queries"):
        kvcompact.score_head("snapkv", keys)


def test_score_head_baselines():
    keys, values, queries, _, _ = head(seed=2)
    kn = kvcompact.score_head("knorm", keys)
    assert kn.dtype == np.float64 and kn.shape == (keys.shape[0],)
    np.testing.assert_allclose(kn, -np.linalg.norm(keys.astype(np.float64), axis=1), rtol=1e-6)
    assert kvcompact.score_head("random", keys, seed=4).tobytes() == kvcompact.score_head("random", keys, seed=4).tobytes()
    for m in ("snapkv", "h2o", "tova", "expected-attention"):
        s = kvcompact.score_head(m, keys, values=values, queries=queries)
        assert s.shape == (keys.shape[0],) and np.isfinite(s).all(), m
    assert set(kvcompact.methods()) >= {"am-omp", "am-highest", "snapkv", "knorm", "full"}


@pytest.mark.parametrize("method", ["snapkv", "knorm", "streaming-llm", "h2o", "tova", "expected-attention", "random", "pyramidkv"])
def test_every_eviction_method_through_compact_head(tmp_path, method):
    keys, values, queries, test, bias = head(seed=11)
    budget = 20
    py = kvcompact.compact_head(keys, values, queries, budget, method=method, bias=bias, test_queries=test, seed=2)
    idx = py["indices"]
    assert len(idx) == budget and (np.diff(idx) > 0).all()
    # Eviction keeps rows: keys and values are the originals, β the prior bias.
    assert py["keys"].tobytes() == keys[idx].tobytes()
    assert py["values"].tobytes() == values[idx].tobytes()
    assert py["beta"].tobytes() == bias[idx].tobytes()
    write_safetensors(tmp_path / "in.safetensors", {"keys": keys, "values": values, "queries": queries, "bias": bias})
    cmd = [str(BIN), "compact-head", "--input", str(tmp_path / "in.safetensors"), "--output", str(tmp_path / "out.safetensors"), "--method", method, "--budget", str(budget), "--seed", "2"]
    subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert read_safetensors(tmp_path / "out.safetensors")["indices"].tobytes() == idx.tobytes()


def test_qfilters_and_full_are_refused_by_compact_head():
    keys, values, queries, _, _ = head(seed=1)
    with pytest.raises(ValueError, match="filters"):
        kvcompact.compact_head(keys, values, queries, 8, method="qfilters")
    with pytest.raises(ValueError, match="full"):
        kvcompact.compact_head(keys, values, queries, 8, method="full")


def test_budget_forms_match_the_cli(tmp_path):
    # 25 rows: compression ratio 0.56 keeps int(25 * (1 - 0.56)) = 10 (exact arithmetic says 11),
    # ratio 2.5 keeps 25 / 2.5 = 10; both are the bits of budget=10 and of the CLI's flags.
    keys, values, queries, test, bias = head(seed=13, t=25)
    by_rows = kvcompact.compact_head(keys, values, queries, 10, method="am-highest", seed=1)
    write_safetensors(tmp_path / "in.safetensors", {"keys": keys, "values": values, "queries": queries})
    for flag, kw in [("--compression-ratio", {"compression_ratio": 0.56}), ("--ratio", {"ratio": 2.5})]:
        py = kvcompact.compact_head(keys, values, queries, method="am-highest", seed=1, **kw)
        cmd = [str(BIN), "compact-head", "--input", str(tmp_path / "in.safetensors"), "--output", str(tmp_path / "out.safetensors"), "--method", "am-highest", flag, str(next(iter(kw.values()))), "--seed", "1"]
        subprocess.run(cmd, capture_output=True, text=True, check=True)
        cli = read_safetensors(tmp_path / "out.safetensors")
        for name in ("indices", "keys", "beta", "values"):
            assert py[name].tobytes() == by_rows[name].tobytes() == cli[name].tobytes(), (flag, name)
    with pytest.raises(ValueError, match="one budget form"):
        kvcompact.compact_head(keys, values, queries, 10, ratio=2.0)
    with pytest.raises(ValueError, match="budget, ratio or compression_ratio"):
        kvcompact.compact_head(keys, values, queries)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        kvcompact.compact_head(keys, values, queries, compression_ratio=1.0)
    with pytest.raises(ValueError, match="ratio must be"):
        kvcompact.compact_head(keys, values, queries, ratio=0.9)
    with pytest.raises(ValueError, match="at least 1"):
        kvcompact.compact_head(keys, values, queries, 0)
