"""Shared helpers for the kvcompact golden-data generators (gen_tiny.py, gen_smollm2.py, check_prompt.py).

Import this module BEFORE torch / numpy / transformers: it pins the thread counts and forces offline mode.
"""

import os

# Must be set before numpy/torch/transformers are imported.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # 2 BLAS threads on 2 vCPUs are ~10x slower (spec §9)
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ["HF_HUB_OFFLINE"] = "1"  # never touch the HF hub
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import hashlib
import json
import tempfile
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent  # .../golden
MANIFEST = GOLDEN_DIR / "manifest.json"
TORCH_THREADS = 2  # goldens are generated with exactly this many intra-op threads


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def atomic_write_bytes(path, data: bytes) -> None:
    """Write via a temporary file in the same directory + os.replace (never truncates a file that may be mmapped)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def json_dumps(obj) -> str:
    """Deterministic JSON: sorted keys, 2-space indent, UTF-8 kept, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def atomic_write_json(path, obj) -> None:
    atomic_write_text(path, json_dumps(obj))


def lib_versions() -> dict:
    import numpy
    import safetensors
    import tokenizers
    import torch
    import transformers
    import gguf  # noqa: F401

    try:
        from importlib.metadata import version

        gguf_v = version("gguf")
        accel_v = version("accelerate")
    except Exception:  # pragma: no cover
        gguf_v = accel_v = "unknown"
    import platform

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "tokenizers": tokenizers.__version__,
        "gguf": gguf_v,
        "accelerate": accel_v,
    }


def setup_torch():
    import torch

    torch.set_num_threads(TORCH_THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    torch.use_deterministic_algorithms(True)
    return torch


def generator_info(script_path) -> dict:
    script_path = Path(script_path).resolve()
    return {
        "generator": script_path.name,
        "generator_sha256": sha256_file(script_path),
        "helpers_sha256": {"_common.py": sha256_file(GOLDEN_DIR / "_common.py")},
    }


def update_manifest(generator: str, entries: dict, extra_top: dict | None = None) -> None:
    """Replace every manifest entry produced by `generator` with `entries` (keys = paths relative to golden/)."""
    if MANIFEST.exists():
        man = json.loads(MANIFEST.read_text())
    else:
        man = {}
    files = {k: v for k, v in man.get("files", {}).items() if v.get("generator") != generator}
    files.update(entries)
    man["files"] = dict(sorted(files.items()))
    man["format_version"] = 1
    man["description"] = (
        "Golden data for kvcompact. Paths are relative to golden/. Regenerate with the commands in README.md; "
        "tolerances are per tensor (max_abs = max |rust - golden| over all elements; 'exact' = bitwise / equal ids)."
    )
    if extra_top:
        man.update(extra_top)
    atomic_write_json(MANIFEST, man)


def tensor_stats(a) -> dict:
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    return {"min": float(a.min()), "max": float(a.max()), "std": float(a.std())}


def compare(ref, got) -> dict:
    """Comparator used by check_prompt.py: max|Δ| and its index, NMSE = Σ(a−b)²/Σa², NaN/inf pattern."""
    import numpy as np

    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    assert ref.shape == got.shape, (ref.shape, got.shape)
    out = {}
    fin_r, fin_g = np.isfinite(ref), np.isfinite(got)
    out["nonfinite_ref"] = int((~fin_r).sum())
    out["nonfinite_got"] = int((~fin_g).sum())
    out["nonfinite_pattern_equal"] = bool(
        np.array_equal(fin_r, fin_g) and np.array_equal(np.isnan(ref), np.isnan(got))
        and np.array_equal(np.where(np.isinf(ref), np.sign(ref), 0), np.where(np.isinf(got), np.sign(got), 0))
    )
    both = fin_r & fin_g
    d = np.where(both, np.abs(ref - got), 0.0)
    idx = np.unravel_index(int(np.argmax(d)), d.shape)
    out["max_abs"] = float(d[idx])
    out["max_abs_index"] = [int(i) for i in idx]
    out["max_abs_pair"] = [float(ref[idx]), float(got[idx])]
    den = float((np.where(both, ref, 0.0) ** 2).sum())
    out["nmse"] = float((d**2).sum() / den) if den > 0 else float("nan")
    return out
