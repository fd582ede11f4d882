#!/usr/bin/env python3
"""Check a `kvcompact logits --out F.safetensors` dump against the transformers oracle on any prompt.

Usage:
  python golden/check_prompt.py MODEL RUST.safetensors (--text "..." | --file prompt.txt | --chat "user message"
                                                       | --messages messages.json) [--tol 2e-3]
MODEL is either an HF model directory (e.g. golden/tiny/llama-gqa) or a .gguf file (loaded with transformers' GGUF
loader; the SmolLM2 GGUF's sha256 is verified unless --any-gguf).

RUST.safetensors must hold `tokens` i64 [T] and `logits` f32 [T, vocab] (optionally `logit_positions` i64 [k] with
`logits` [k, vocab]). The oracle tokenises the same text with add_special_tokens=True (chat prompts are rendered with
the model's chat template, add_generation_prompt=True), runs one full f32 forward (eager attention) and prints:
tokens equal?, max |Δ| (and where), NMSE = Σ(a−b)²/Σa², argmax agreement, NaN/inf pattern.
If the token ids differ, the logits are compared on the Rust token ids (so the numeric check still means something).
Exit status: 0 = pass (tokens equal, max|Δ| <= tol, argmax equal except at near-ties), 1 = fail, 2 = usage error.
"""

import _common  # noqa: F401  (sets thread/offline env vars before torch is imported)

import argparse
import json
import sys
import time
from pathlib import Path

from _common import atomic_write_text, compare, setup_torch, sha256_file

torch = setup_torch()
import numpy as np  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def load_oracle(model_path: Path, any_gguf: bool):
    if model_path.suffix == ".gguf":
        sha = sha256_file(model_path)
        print(f"model: GGUF {model_path} sha256 {sha}")
        if sha != SMOLLM2_GGUF_SHA256 and not any_gguf:
            raise SystemExit(f"unexpected GGUF sha256 (expected {SMOLLM2_GGUF_SHA256}); pass --any-gguf to allow")
        kw = dict(gguf_file=model_path.name)
        root = model_path.parent
    else:
        ms = model_path / "model.safetensors"
        print(f"model: dir {model_path}" + (f" (model.safetensors sha256 {sha256_file(ms)})" if ms.exists() else ""))
        kw = {}
        root = model_path
    tok = transformers.AutoTokenizer.from_pretrained(root, **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        root, dtype=torch.float32, attn_implementation="eager", **kw).eval()
    return tok, model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="HF model directory or .gguf file")
    ap.add_argument("rust", type=Path, help="safetensors written by `kvcompact logits --out`")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="prompt text (used verbatim)")
    src.add_argument("--file", type=Path, help="file holding the exact prompt bytes (UTF-8)")
    src.add_argument("--chat", help="a single user message, rendered with the chat template")
    src.add_argument("--messages", type=Path, help="JSON list of {role, content}, rendered with the chat template")
    ap.add_argument("--tol", type=float, default=2e-3,
                    help="max |Δ| budget (default 2e-3 = SmolLM2 budget; use 1e-4 for golden/tiny models)")
    ap.add_argument("--any-gguf", action="store_true", help="do not insist on the SmolLM2 GGUF sha256")
    ap.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = ap.parse_args()

    rust = load_file(str(args.rust))
    for k in ("tokens", "logits"):
        if k not in rust:
            print(f"error: {args.rust} has no tensor `{k}` (has {sorted(rust)})", file=sys.stderr)
            return 2
    r_tokens = rust["tokens"].astype(np.int64).reshape(-1)
    r_logits = rust["logits"].astype(np.float32)
    r_pos = rust["logit_positions"].astype(np.int64) if "logit_positions" in rust else np.arange(len(r_tokens))
    if r_logits.ndim != 2 or r_logits.shape[0] != len(r_pos):
        print(f"error: logits shape {r_logits.shape} does not match {len(r_pos)} positions", file=sys.stderr)
        return 2

    t0 = time.time()
    tok, model = load_oracle(args.model, args.any_gguf)
    if args.text is not None:
        text = args.text
    elif args.file is not None:
        text = args.file.read_text(encoding="utf-8")
    else:
        messages = ([{"role": "user", "content": args.chat}] if args.chat is not None
                    else json.loads(args.messages.read_text(encoding="utf-8")))
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    o_tokens = np.array(tok(text, add_special_tokens=True)["input_ids"], dtype=np.int64)
    print(f"oracle loaded in {time.time() - t0:.1f}s")

    report = {"T_oracle": int(len(o_tokens)), "T_rust": int(len(r_tokens))}
    tokens_equal = bool(np.array_equal(o_tokens, r_tokens))
    report["tokens_equal"] = tokens_equal
    print(f"tokens equal: {tokens_equal}  (oracle T={len(o_tokens)}, rust T={len(r_tokens)})")
    if not tokens_equal:
        n = min(len(o_tokens), len(r_tokens))
        diff = np.nonzero(o_tokens[:n] != r_tokens[:n])[0]
        first = int(diff[0]) if len(diff) else n
        report["first_token_mismatch"] = first
        lo = max(0, first - 3)
        print(f"  first mismatch at {first}: oracle {o_tokens[lo:first + 4].tolist()} "
              f"{[tok.decode([t]) for t in o_tokens[first:first + 3]]} vs rust {r_tokens[lo:first + 4].tolist()}")
        print("  comparing logits on the RUST token ids")
    eval_tokens = r_tokens

    vocab = model.config.vocab_size
    if r_logits.shape[1] != vocab:
        print(f"error: rust vocab {r_logits.shape[1]} != model vocab {vocab}", file=sys.stderr)
        return 2
    t0 = time.time()
    with torch.no_grad():
        o_logits = model(input_ids=torch.from_numpy(eval_tokens)[None]).logits[0].float().numpy()
    print(f"oracle forward: {time.time() - t0:.1f}s")
    o_sel = o_logits[r_pos]

    c = compare(o_sel, r_logits)
    pos, vid = c["max_abs_index"]
    print(f"max |Δ| = {c['max_abs']:.3e} at position {int(r_pos[pos])}, token id {vid} "
          f"(oracle {c['max_abs_pair'][0]:.6f}, rust {c['max_abs_pair'][1]:.6f});  tol {args.tol:g}")
    print(f"NMSE = {c['nmse']:.3e}")
    print(f"non-finite: oracle {c['nonfinite_ref']}, rust {c['nonfinite_got']}, pattern equal {c['nonfinite_pattern_equal']}")
    per_pos = np.abs(o_sel.astype(np.float64) - r_logits).max(axis=1)
    worst = np.argsort(-per_pos)[:5]
    print("worst positions (pos: max|Δ|): " + ", ".join(f"{int(r_pos[i])}: {per_pos[i]:.2e}" for i in worst))
    o_arg = o_sel.argmax(-1)
    r_arg = r_logits.argmax(-1)
    top2 = np.sort(o_sel, axis=-1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    disagree = np.nonzero(o_arg != r_arg)[0]
    near_tie = [int(i) for i in disagree if margin[i] <= 2 * args.tol]
    hard = [int(i) for i in disagree if margin[i] > 2 * args.tol]
    print(f"argmax agreement: {len(o_arg) - len(disagree)}/{len(o_arg)}"
          + (f"  (near-ties at positions {[int(r_pos[i]) for i in near_tie]})" if near_tie else "")
          + (f"  (REAL disagreements at positions {[int(r_pos[i]) for i in hard]})" if hard else ""))
    report.update(c)
    report.update(argmax_agree=int(len(o_arg) - len(disagree)), argmax_total=int(len(o_arg)),
                  argmax_disagree_positions=[int(r_pos[i]) for i in disagree], tol=args.tol)
    ok = tokens_equal and c["max_abs"] <= args.tol and not hard and c["nonfinite_pattern_equal"] \
        and c["nonfinite_got"] == 0
    report["pass"] = bool(ok)
    print("PASS" if ok else "FAIL")
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
