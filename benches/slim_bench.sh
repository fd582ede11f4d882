#!/usr/bin/env bash
# Slim Attention decode speed and KV memory vs the standard cache at 1k, 4k and 8k cached tokens,
# on a synthetic multi-head-attention Llama at a realistic width (d = 1024, 16 heads of 64,
# 8 layers, ff 2816, vocab 32000; seeded random weights, 542 MB f32). Interleaved per length so
# both modes see the same machine state. Optional; never part of CI.
#
#   benches/slim_bench.sh [REPS] [THREADS]     # defaults: 2 reps (after a warm-up), 2 threads
#
# Random square W_K at d = 1024 has cond 1.6e3–3.9e4, so V rebuilt in f32 is off by 2e-5–3e-4:
# every layer would fail the default 1e-5 gate. The bench opens it to the spec's 1e-3 so that
# all 8 layers run K-only (what is measured is speed and memory, not exactness).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-2}
THREADS=${2:-2}
cargo build --release -q
KVC=target/release/kvcompact
MODEL=models/synth-mha-d1024
[ -f "$MODEL/model.safetensors" ] || $KVC synth-model --out "$MODEL" >/dev/null
OUT=models/slim_bench.jsonl
: > "$OUT"
for n in 1024 4096 8192; do
  for mode in standard slim; do
    flags=""
    [ $mode = slim ] && flags="--slim --slim-max-rel-err 1e-3"
    echo "== $n cached tokens, $mode" >&2
    $KVC --threads "$THREADS" bench --model "$MODEL" --prompt-tokens $n --gen-tokens 32 --reps "$REPS" --json $flags 2>/dev/null \
      | python3 -c "import json,sys; r=json.loads(sys.stdin.readline()); print(json.dumps({'mode':'$mode','cached':$n,**r}))" >> "$OUT"
  done
done
python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
get = lambda n, m: next(r for r in rows if r['cached'] == n and r['mode'] == m)
print(f"threads {rows[0]['threads']}, {rows[0]['reps']} reps, decode of {rows[0]['gen_tokens']} tokens after the prefill")
print("| cached tokens | decode standard (tok/s) | decode slim (tok/s) | slim ÷ standard | KV standard (MiB) | KV slim (MiB) | slim layers |")
print("|---|---|---|---|---|---|---|")
for n in sorted({r['cached'] for r in rows}):
    s, k = get(n, 'standard'), get(n, 'slim')
    print(f"| {n} | {s['decode_tok_s']:.2f} | {k['decode_tok_s']:.2f} | {k['decode_tok_s']/s['decode_tok_s']:.2f} | "
          f"{s['kv_bytes']/2**20:.1f} | {k['kv_bytes']/2**20:.1f} | {k['slim']['slim_layers']}/8 |")
PY
