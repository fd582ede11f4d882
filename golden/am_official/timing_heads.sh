#!/usr/bin/env bash
# Timing side note on larger heads than golden/am's (T = 853, n = 1020): dump real SmolLM2 heads of a
# ≈2k-token article (T = 2001, n = 4098 reference queries per KV head) with `compact --dump-heads`,
# then time the official code against `compact-head` on golden/am's five heads and three of the
# dumped ones (layers 10, 20, 29), one thread each. Not part of CI.
#
#   golden/am_official/timing_heads.sh SRC [OUT_JSON]
#     SRC: a checkout of adamzweiger/compaction at 2e59cc8 (see README.md, "Regenerate")
#
# Needs the venv of README.md (/work/venvs/kvpress: torch 2.15.0 CPU, safetensors).
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=$1
OUT=${2:-golden/am_official/timing.json}
PY=${PYTHON:-/work/venvs/kvpress/bin/python}
cargo build --release -q
KVC=target/release/kvcompact
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
cat data/demo/article.txt data/qa/ferry-timetable.txt > "$TMP/article2k.txt"
"$KVC" compact --context "$TMP/article2k.txt" --ratio 20 --method am-highest --out "$TMP/c.safetensors" \
  --dump-heads "$TMP/heads2k" --json > /dev/null
OMP_NUM_THREADS=1 "$PY" golden/am_official/timing.py "$SRC" "$KVC" --out "$OUT" --heads \
  golden/am/L00H0.safetensors golden/am/L10H1.safetensors golden/am/L20H2.safetensors golden/am/L29H0.safetensors \
  golden/am/L29H2.safetensors "$TMP/heads2k/L10H1.safetensors" "$TMP/heads2k/L20H2.safetensors" "$TMP/heads2k/L29H0.safetensors"
