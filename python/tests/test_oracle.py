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


@pytest.mark.parametrize("method", ["am-omp", "am-highest", "baseline", "am-omp-fast"])
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


def test_any_layout_and_float64_give_the_same_bits():
    keys, values, queries, test, _ = head(seed=7)
    base = kvcompact.compact_head(keys, values, queries, 10, test_queries=test, seed=1)
    # Fortran order, float64, and a strided view of a bigger array: converted to C float32 first.
    big = np.zeros((keys.shape[0] * 2, keys.shape[1]), dtype=np.float32)
    big[::2] = keys
    variants = [
        (np.asfortranarray(keys), np.asfortranarray(values), np.asfortranarray(queries)),
        (keys.astype(np.float64), values.astype(np.float64), queries.astype(np.float64)),
        (big[::2], values, queries.tolist()),
    ]
    for k, v, q in variants:
        r = kvcompact.compact_head(k, v, q, 10, test_queries=test, seed=1)
        for name in ("indices", "keys", "beta", "values"):
            assert r[name].tobytes() == base[name].tobytes(), name
        assert r["rel_l2"] == base["rel_l2"]


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
