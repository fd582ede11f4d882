"""`kvcompact.Model` and `kvcompact.Cache` against the CLI on the default model: greedy text,
compacted cache files and logits are the CLI's bits; caches round-trip through files; bad input
raises ValueError. Skipped when the default model (models/smollm2-135m-instruct) or the release
binary is absent. Kept short: one model load, a few-token context."""

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

import kvcompact
from test_oracle import BIN, REPO, read_safetensors

MODELS = REPO / "models"
DEFAULT = MODELS / "smollm2-135m-instruct"
CONTEXT = (
    "Alice has three apples. Bob gives her two more apples, and then she eats one. "
    "The apples are red and sweet, picked in the orchard near the river in early autumn."
)
QUESTION = "How many apples does Alice have?"

pytestmark = pytest.mark.skipif(
    not (DEFAULT / ".kvcompact-ok").is_file() or not BIN.is_file(),
    reason="needs the default model (kvcompact fetch-model) and the release binary",
)


@pytest.fixture(scope="module")
def model():
    # The CLI and Model(None) both find the default model under $KVCOMPACT_HOME: the same
    # directory string, so the same model identity in every cache file.
    os.environ["KVCOMPACT_HOME"] = str(MODELS)
    return kvcompact.Model()


def cli(*args):
    env = dict(os.environ, KVCOMPACT_HOME=str(MODELS))
    return subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, check=True, env=env).stdout


@pytest.fixture(scope="module")
def context_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("ctx") / "context.txt"
    p.write_text(CONTEXT)
    return p


@pytest.fixture(scope="module")
def compacted(model, context_file, tmp_path_factory):
    """One compaction through the CLI and the same through Python."""
    d = tmp_path_factory.mktemp("compact")
    cli("compact", "--context", context_file, "--compression-ratio", 0.5, "--n-queries", 256, "--seed", 3, "--out", d / "cli.safetensors", "--json")
    cache = model.compact(CONTEXT, compression_ratio=0.5, n_queries=256, seed=3)
    cache.save(d / "py.safetensors")
    return cache, d


def test_generate_greedy_equals_cli(model):
    prompt = "The capital of France is"
    want = json.loads(cli("generate", "--prompt", prompt, "--max-tokens", 12, "--json"))["text"]
    assert model.generate(prompt, max_tokens=12) == want
    assert model.generate(prompt, max_tokens=12, temperature=0.0, seed=5) == want


def test_compact_saves_the_cli_file(compacted):
    cache, d = compacted
    assert (d / "py.safetensors").read_bytes() == (d / "cli.safetensors").read_bytes()
    assert cache.params["compression_ratio"] == 0.5 and cache.params["method"] == "am-highest"
    assert cache.params["am_budgets"] == "global"


def test_compact_am_budgets(model):
    uniform = model.compact(CONTEXT, ratio=4, n_queries=64, am_budgets="uniform")
    assert uniform.params["am_budgets"] == "uniform"
    with pytest.raises(ValueError, match="am_budgets"):
        model.compact(CONTEXT, ratio=4, am_budgets="spread")


@pytest.mark.parametrize("method,kvpress", [("snapkv", True), ("kvzip", False), ("random", True)])
def test_compact_kvpress_saves_the_cli_file(model, context_file, tmp_path, method, kvpress):
    flag = ["--kvpress"] if kvpress else []
    cli("compact", "--context", context_file, "--method", method, *flag, "--budget", 12, "--seed", 7, "--out", tmp_path / "cli.safetensors")
    cache = model.compact(CONTEXT, method=method, budget=12, seed=7, kvpress=kvpress)
    cache.save(tmp_path / "py.safetensors")
    assert (tmp_path / "py.safetensors").read_bytes() == (tmp_path / "cli.safetensors").read_bytes()
    assert cache.params["kvpress"] is True and cache.params["budget"] == 12
    report = cache.report
    assert report["kvpress"] and report["method"] == method
    if method != "kvzip":  # KVzip's global selection keeps different counts per head
        assert set(report["kept_rows"]) == {12}
    assert cache.kv_bytes < cache.kv_bytes_full
    with pytest.raises(ValueError, match="Attention Matching"):
        model.compact(CONTEXT, method="am-omp", kvpress=True)
    with pytest.raises(ValueError, match="takes none"):
        model.compact(CONTEXT, method="snapkv", kvpress=True, on_policy=True)


def test_compact_of_a_prefilled_cache_is_the_compaction_of_its_text(model, compacted, tmp_path):
    _, d = compacted
    full = model.prefill(CONTEXT, chat=True)
    assert len(full) == full.rows // (full.n_layers * full.n_kv_heads)
    assert full.kv_bytes == full.kv_bytes_full
    model.compact(full, compression_ratio=0.5, n_queries=256, seed=3).save(tmp_path / "c.safetensors")
    assert (tmp_path / "c.safetensors").read_bytes() == (d / "cli.safetensors").read_bytes()


def test_generate_after_a_cache_equals_cli(model, compacted):
    cache, d = compacted
    want = json.loads(cli("generate", "--cache", d / "cli.safetensors", "--prompt", QUESTION, "--max-tokens", 8, "--json"))["text"]
    before = [a.copy() for a in cache.head(3, 1)]
    assert model.generate(QUESTION, cache=cache, max_tokens=8) == want
    assert all(np.array_equal(a, b) for a, b in zip(cache.head(3, 1), before)), "generate must not change the cache"


def test_cache_head_shapes_and_beta(model, compacted):
    cache, _ = compacted
    r = cache.report
    t_art = r["article_tokens"]
    keep = int(t_art * (1 - 0.5))
    assert len(cache) == r["context_tokens"]
    assert cache.kv_bytes < cache.kv_bytes_full
    assert (cache.n_layers, cache.n_kv_heads, cache.head_dim) == (model.n_layers, model.n_kv_heads, model.head_dim)
    n_template = r["context_tokens"] - t_art
    for layer, h in [(0, 0), (model.n_layers - 1, model.n_kv_heads - 1)]:
        x = cache.head(layer, h)
        assert isinstance(x, tuple) and len(x) == 4
        keys, values, positions, beta = x
        n = len(positions)  # the global allocation gives each head its own share of the rows
        assert n >= n_template
        assert keys.shape == values.shape == (n, model.head_dim)
        assert keys.dtype == values.dtype == beta.dtype == np.float32 and positions.dtype == np.int64
        assert beta.shape == positions.shape == (n,)
        assert np.all(np.diff(positions) > 0) and positions[-1] == len(cache) - 1
        assert np.all(np.isfinite(beta))
    # Over all heads, the article keeps what ⌊T·(1 − r)⌋ rows per head add up to.
    kept = sum(len(cache.head(l, h)[2]) - n_template for l in range(model.n_layers) for h in range(model.n_kv_heads))
    assert kept == keep * model.n_layers * model.n_kv_heads
    # Template rows stay verbatim with β = 0; Attention Matching fits β on the article's rows.
    beta = cache.head(0, 0)[3]
    assert np.count_nonzero(beta == 0.0) >= n_template and np.any(beta != 0.0)


def test_save_load_round_trip(model, compacted, tmp_path):
    cache, d = compacted
    back = kvcompact.Cache.load(d / "py.safetensors", model)
    assert len(back) == len(cache) and back.kv_bytes == cache.kv_bytes and back.chat == cache.chat
    for name, a, b in zip(("keys", "values", "positions", "beta"), cache.head(7, 2), back.head(7, 2)):
        assert a.dtype == b.dtype and np.array_equal(a, b), name
    back.save(tmp_path / "again.safetensors")
    assert (tmp_path / "again.safetensors").read_bytes() == (d / "py.safetensors").read_bytes()


def test_budget_forms_keep_their_rows(model):
    text = "One two three four five six seven eight nine ten."
    for kw, rows in [({"budget": 3}, lambda t: 3), ({"ratio": 4}, lambda t: t // 4), ({"compression_ratio": 0.3}, lambda t: int(t * (1 - 0.3)))]:
        c = model.compact(text, method="snapkv", n_queries=32, chat=False, **kw)
        t_art = c.report["article_tokens"]
        n_template = c.report["context_tokens"] - t_art
        _, _, positions, _ = c.head(0, 0)
        assert positions.shape == (n_template + rows(t_art),), kw


def test_logits_equal_cli(model, tmp_path):
    text = "hello world, this is a test"
    cli("logits", "--prompt", text, "--out", tmp_path / "l.safetensors")
    want = read_safetensors(tmp_path / "l.safetensors")
    got = model.logits(text)
    assert got.dtype == np.float32 and got.shape == (len(want["tokens"]), model.vocab_size)
    assert model.tokenize(text) == want["tokens"].tolist()
    assert got.tobytes() == want["logits"].tobytes()
    assert np.array_equal(model.logits(np.asarray(want["tokens"])), got)


def test_bf16_kv_equals_cli_and_halves_the_bytes(model, compacted, tmp_path):
    m16 = kvcompact.Model(kv_dtype="bf16")
    assert (m16.kv_dtype, model.kv_dtype) == ("bf16", "f32")
    text = "hello world, this is a test"
    cli("logits", "--prompt", text, "--out", tmp_path / "l.safetensors", "--kv-dtype", "bf16")
    got = m16.logits(text)
    assert got.tobytes() == read_safetensors(tmp_path / "l.safetensors")["logits"].tobytes()
    assert not np.array_equal(got, model.logits(text))
    prompt = "The capital of France is"
    assert m16.generate(prompt, max_tokens=12) == json.loads(cli("generate", "--prompt", prompt, "--max-tokens", 12, "--kv-dtype", "bf16", "--json"))["text"]
    full, full16 = model.prefill(CONTEXT), m16.prefill(CONTEXT)
    assert (full.kv_dtype, full16.kv_dtype) == ("f32", "bf16")
    rows = full.rows
    assert full16.rows == rows and full16.kv_bytes == full.kv_bytes - rows * 2 * model.head_dim * 2
    k32, k16 = full.head(0, 0)[0], full16.head(0, 0)[0]
    # Layer 0's keys do not depend on the cache: the bf16 rows are the f32 rows rounded.
    assert k16.dtype == np.float32 and np.array_equal(k16.view(np.uint32) & 0xFFFF, np.zeros_like(k16.view(np.uint32)))
    assert np.abs(k16 - k32).max() <= np.abs(k32).max() * 2.0**-8
    # A compacted (f32) cache answers through a bf16 model as the CLI does.
    cache, d = compacted
    want = json.loads(cli("generate", "--cache", d / "cli.safetensors", "--prompt", QUESTION, "--max-tokens", 8, "--kv-dtype", "bf16", "--json"))["text"]
    assert m16.generate(QUESTION, max_tokens=8, cache=cache) == want


def test_value_errors(model, compacted, tmp_path):
    cache, d = compacted
    cases = [
        (lambda: kvcompact.Model(tmp_path / "no-model"), "no-model"),
        (lambda: kvcompact.Model(kv_dtype="fp8"), "fp8"),
        (lambda: model.compact(CONTEXT, method="nope"), "nope"),
        (lambda: model.compact(CONTEXT, method="full"), "full"),
        (lambda: model.compact(CONTEXT, ratio=4, budget=3), "one budget form"),
        (lambda: model.compact(CONTEXT, compression_ratio=1.0), "[0, 1)"),
        (lambda: model.compact(CONTEXT, budget=0), "at least 1"),
        (lambda: model.compact(CONTEXT, ratio=0.5), "ratio"),
        (lambda: model.compact(cache), "no context"),
        (lambda: model.compact(CONTEXT, queries="telepathy"), "telepathy"),
        (lambda: cache.head(model.n_layers, 0), "layer"),
        (lambda: cache.head(0, -1), "kv_head"),
        (lambda: kvcompact.Cache.load(tmp_path / "missing.safetensors", model), "missing"),
        (lambda: model.generate(""), "empty"),
        (lambda: model.generate("hi", temperature=-1.0), "temperature"),
        (lambda: model.logits([10**9]), "vocabulary"),
        (lambda: model.logits([]), "no token ids"),
        (lambda: model.prefill([1, 2], chat=True), "token ids"),
    ]
    for call, needle in cases:
        with pytest.raises(ValueError, match=None) as e:
            call()
        assert needle in str(e.value) and "\n" not in str(e.value), (needle, str(e.value))
    (tmp_path / "junk.safetensors").write_bytes(b"not a cache")
    with pytest.raises(ValueError):
        kvcompact.Cache.load(tmp_path / "junk.safetensors", model)
