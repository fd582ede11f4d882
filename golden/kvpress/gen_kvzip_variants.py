"""KVzip's two code paths the main goldens do not reach (contexts < 2048 tokens, layerwise = False): the chunked
repeat (`chunk_size=64`, so the 'names' context repeats in six chunks, each after "Repeat the part of the previous
context exactly, starting with" + the previous chunk's last 8 tokens) and the per-layer eviction
(`layerwise=True`). Same pipeline, model and recording as gen_kvpress.py (imported from it); one context.

    /work/venvs/kvpress/bin/python golden/kvpress/gen_kvzip_variants.py           # writes kvzip_variants.*
    /work/venvs/kvpress/bin/python golden/kvpress/gen_kvzip_variants.py --check   # regenerate, compare bytes
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gen_kvpress as g  # noqa: E402  (sets the offline mode and thread pins first)

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
from importlib.metadata import version  # noqa: E402

from safetensors.numpy import save as st_save  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

CONTEXT = "names"
VARIANTS = {
    "kvzip-chunk64": (lambda r: g.KVzipPress(compression_ratio=r, chunk_size=64), "sdpa", True),
    "kvzip-layerwise": (lambda r: g.KVzipPress(compression_ratio=r, layerwise=True), "sdpa", False),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="regenerate in a temp dir and compare with the committed file")
    args = ap.parse_args()
    g._common.setup_torch()
    g.hf_logging.disable_progress_bar()
    out_dir = Path(tempfile.mkdtemp(prefix="kvzip-check-")) if args.check else HERE
    tok = AutoTokenizer.from_pretrained(str(g.MODEL_DIR))
    models = {"sdpa": g.load_model("sdpa")}
    pipe = g.KVPressTextGenerationPipeline(model=models["sdpa"], tokenizer=tok)
    spec = next(s for s in g.CONTEXTS if s["name"] == CONTEXT)
    tensors, info = {}, {"answers": {}}
    for name, press in VARIANTS.items():
        # run_context reads KVzip's kept rows from its masks only under the name "kvzip".
        g.PRESSES.clear()
        g.PRESSES["kvzip"] = press
        t, i = g.run_context(models, tok, pipe, spec)
        for k, v in t.items():
            tensors[k.replace("kvzip/", f"{name}/") if k.split("/")[0] in ("kept", "answer") else k.replace("scores/kvzip", f"scores/{name}")] = v
        info.update({k: v for k, v in i.items() if k != "answers"})
        info["answers"].update({k.replace("kvzip/", f"{name}/"): v for k, v in i["answers"].items()})
    meta = {"kvpress_golden": json.dumps({"context": CONTEXT, "ratios": g.RATIOS, **info}, sort_keys=True)}
    path = out_dir / "kvzip_variants.safetensors"
    g._common.atomic_write_bytes(path, st_save(dict(sorted(tensors.items())), metadata=meta))
    digest = g._common.sha256_file(path)
    if args.check:
        same = g._common.sha256_file(HERE / path.name) == digest
        print("identical" if same else "DIFFERENT")
        sys.exit(0 if same else 1)
    manifest = {
        "description": "kvpress 0.5.5 KVzip goldens for the chunked repeat and layerwise eviction; see README.md",
        "command": "/work/venvs/kvpress/bin/python golden/kvpress/gen_kvzip_variants.py",
        "generator_sha256": g._common.sha256_file(Path(__file__)),
        "imports": {"gen_kvpress.py": g._common.sha256_file(HERE / "gen_kvpress.py")},
        "model": {"dir": "models/smollm2-135m-instruct", "dtype": "float32",
                  "model.safetensors_sha256": g._common.sha256_file(g.MODEL_DIR / "model.safetensors")},
        "versions": {"python": platform.python_version(), **{p: version(p) for p in
                     ["torch", "transformers", "kvpress", "safetensors", "numpy", "tokenizers"]}},
        "torch_threads": g._common.TORCH_THREADS,
        "context": CONTEXT,
        "ratios": g.RATIOS,
        "presses": {n: repr(make(g.RATIOS[0])) + f" [attn_implementation={attn}]" for n, (make, attn, _) in VARIANTS.items()},
        "layout": "as manifest.json's layout (kept/<press>/<ratio>, answer/<press>/<ratio>, scores/kvzip-chunk64)",
        "files": {path.name: digest},
    }
    g._common.atomic_write_json(HERE / "kvzip_variants.manifest.json", manifest)


if __name__ == "__main__":
    main()
