#!/usr/bin/env python3
"""Golden token ids of transformers' own GGUF tokenizer, for tests/convert.rs.

Pinned: transformers 5.23.0, tokenizers 0.23.3, gguf 0.19.0 (the golden venv).
Usage:  python golden/gguf/gen_tokenizer_ids.py [path/to/SmolLM2-135M-Instruct.Q4_1.gguf]
            [--check-tokenizer-json path/to/tokenizer.json]
Writes golden/gguf/tokenizer_ids.json through a temporary file and a rename.
With --check-tokenizer-json it also asserts that the given tokenizer.json (e.g. the one
kvcompact's converter wrote) encodes and decodes every string exactly as transformers does.
"""
import argparse
import hashlib
import json
import os
import sys
import tempfile

import tokenizers
import transformers
from transformers import AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
PINNED = {"transformers": "5.23.0", "tokenizers": "0.23.3"}

STRINGS = [
    "The capital of France is",
    "Hello, world!",
    "1234567890 and 3.14159 and -42 and 1,000,000",
    "  leading spaces,   runs of   spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF",
    "Unicode: naïve café, Größe, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어",
    "Emoji 🤗🚀👍🏽 and symbols ∑∫√∞ ≠ ≤ ≥ © ® ™",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))",
    "for (int i = 0; i < n; ++i) { x[i] = y[i] * 2; }",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|><repo_name>kvcompact<file_sep>src/lib.rs<gh_stars>100",
    "don't won't I'm you're they've we'll she'd",
    "ALL CAPS and MiXeD cAsE wordsWithCamelCase snake_case_words",
    "URL https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct?x=1&y=2",
    "",
    " ",
    "a",
    "\u00a0non-breaking\u00a0space and zero\u200bwidth",
]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", nargs="?", default=os.path.join(ROOT, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--check-tokenizer-json")
    args = ap.parse_args()

    for mod, want in PINNED.items():
        got = sys.modules[mod].__version__
        if got != want:
            sys.exit(f"{mod} {got} installed, {want} pinned")
    gguf_sha = sha256_file(args.gguf)
    if gguf_sha != GGUF_SHA256:
        sys.exit(f"{args.gguf}: sha256 {gguf_sha}, expected {GGUF_SHA256}")

    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(args.gguf)), gguf_file=os.path.basename(args.gguf))
    cases = []
    for s in STRINGS:
        ids = tok(s, add_special_tokens=False)["input_ids"]
        with_special = tok(s)["input_ids"]
        assert ids == with_special, f"add_special_tokens changes {s!r}: BOS/EOS policy differs from the GGUF's"
        cases.append({"text": s, "ids": ids, "decoded": tok.decode(ids)})
    assert cases[0]["ids"] == [504, 3575, 282, 4649, 314], cases[0]["ids"]

    if args.check_tokenizer_json:
        mine = tokenizers.Tokenizer.from_file(args.check_tokenizer_json)
        bad = 0
        for c in cases:
            enc = mine.encode(c["text"], add_special_tokens=True).ids
            dec = mine.decode(enc, skip_special_tokens=False)
            if enc != c["ids"] or dec != c["decoded"]:
                bad += 1
                print(f"MISMATCH {c['text']!r}: {enc} vs {c['ids']}; {dec!r} vs {c['decoded']!r}")
        print(f"{args.check_tokenizer_json}: {len(cases) - bad}/{len(cases)} strings agree with transformers")
        if bad:
            sys.exit(1)

    with open(os.path.abspath(__file__), "rb") as f:
        script_sha = hashlib.sha256(f.read()).hexdigest()
    out = {
        "generator": "golden/gguf/gen_tokenizer_ids.py",
        "generator_sha256": script_sha,
        "versions": {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        "gguf": os.path.basename(args.gguf),
        "gguf_sha256": gguf_sha,
        "tokenizer": "AutoTokenizer.from_pretrained(dir, gguf_file=...), add_special_tokens=False",
        "cases": cases,
    }
    dst = os.path.join(HERE, "tokenizer_ids.json")
    fd, tmp = tempfile.mkstemp(dir=HERE, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, dst)
    print(f"wrote {dst}: {len(cases)} cases")


if __name__ == "__main__":
    main()
