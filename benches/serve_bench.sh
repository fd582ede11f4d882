#!/usr/bin/env bash
# kvcompact serve vs llama.cpp's llama-server, same model (SmolLM2-135M-Instruct), same dtype, same
# threads, interleaved in one run (serving.md, "Measuring it"). Optional; never part of CI.
# Builds llama-server from the same llama-cpp-python sdist as benches/llama_cpp_compare.sh into the
# git-ignored benches/peer/ (a cold build takes several minutes on 2 vCPUs).
#
#   benches/serve_bench.sh [CLIENTS] [TOKENS] [THREADS]    # defaults: 1,2,4,8,16  128  2
#
# Prints one table (aggregate generated tok/s, p50/p99 TTFT and inter-token latency, peak RSS) per
# dtype with the ratio kvcompact ÷ llama-server, and the CPU model; raw rows in benches/peer/serve.jsonl.
set -euo pipefail
cd "$(dirname "$0")/.."
CLIENTS=${1:-1,2,4,8,16}
TOKENS=${2:-128}
THREADS=${3:-2}
PEER=benches/peer
mkdir -p "$PEER"

SERVER="$PEER/build-server/bin/llama-server"
QUANT="$PEER/build-server/bin/llama-quantize"
if [ ! -x "$SERVER" ] || [ ! -x "$QUANT" ]; then
  benches/build_llama_cpp.sh build-server ON llama-server llama-quantize
fi

cargo build --release -q
KVC=target/release/kvcompact
MODEL_DIR=$($KVC fetch-model | tail -1)
GGUF="$(dirname "$MODEL_DIR")/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$PEER/smollm2-f32.gguf" ] || "$QUANT" --allow-requantize "$GGUF" "$PEER/smollm2-f32.gguf" F32 >/dev/null
[ -f "$PEER/smollm2-bf16.gguf" ] || "$QUANT" --allow-requantize "$GGUF" "$PEER/smollm2-bf16.gguf" BF16 >/dev/null
[ -f "$PEER/smollm2-bf16/model.safetensors" ] || $KVC convert --gguf "$GGUF" --out "$PEER/smollm2-bf16" --dtype bf16 >/dev/null
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
MAXC=$(echo "$CLIENTS" | tr ',' '\n' | sort -n | tail -1)
OUT="$PEER/serve.jsonl"
: > "$OUT"

wait_port() { for _ in $(seq 1 200); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.1; done; return 1; }

for dtype in f32 bf16; do
  if [ $dtype = f32 ]; then DIR="$MODEL_DIR"; else DIR="$PEER/smollm2-bf16"; fi
  # kvcompact serve (the model directory's name is the model id).
  $KVC --threads "$THREADS" serve --model "$DIR" --port 18080 --max-batch "$MAXC" --store "$PEER/store" > "$PEER/kvc.log" 2>&1 &
  PID=$!
  wait_port http://127.0.0.1:18080
  $PY benches/serve_bench.py http://127.0.0.1:18080 --clients "$CLIENTS" --tokens "$TOKENS" --pid $PID \
    --model "$(basename "$DIR")" --label "kvcompact-$dtype" --out "$OUT" >/dev/null
  kill -TERM $PID; wait $PID || true
  # llama-server: one slot per client, each with the context a stream needs.
  "$SERVER" -m "$PEER/smollm2-$dtype.gguf" --port 18081 -t "$THREADS" -tb "$THREADS" -np "$MAXC" -c $((MAXC * 512)) \
    --no-webui > "$PEER/llama-server.log" 2>&1 &
  PID=$!
  wait_port http://127.0.0.1:18081
  $PY benches/serve_bench.py http://127.0.0.1:18081 --clients "$CLIENTS" --tokens "$TOKENS" --pid $PID \
    --model smollm2 --label "llama-server-$dtype" --out "$OUT" >/dev/null
  kill -TERM $PID; wait $PID || true
done

$PY - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("CPU:", rows[0]["cpu"])
for dtype in ("f32", "bf16"):
    ours = {r["clients"]: r for r in rows if r["label"] == f"kvcompact-{dtype}"}
    peer = {r["clients"]: r for r in rows if r["label"] == f"llama-server-{dtype}"}
    print(f"\n{dtype}: | clients | kvcompact tok/s | llama-server tok/s | ratio | TTFT p50/p99 s (ours; peer) | ITL p50/p99 ms (ours; peer) | peak RSS MiB (ours; peer) |")
    print("|---|---|---|---|---|---|---|")
    for c in sorted(ours):
        o, p = ours[c], peer.get(c, {})
        pt = p.get("agg_tok_s", float("nan"))
        print(f"| {c} | {o['agg_tok_s']:.1f} | {pt:.1f} | {o['agg_tok_s']/pt:.2f} | {o['ttft_p50_s']:.2f}/{o['ttft_p99_s']:.2f}; {p.get('ttft_p50_s', float('nan')):.2f}/{p.get('ttft_p99_s', float('nan')):.2f} | {o['itl_p50_ms']:.0f}/{o['itl_p99_ms']:.0f}; {p.get('itl_p50_ms', float('nan')):.0f}/{p.get('itl_p99_ms', float('nan')):.0f} | {o.get('peak_rss_mib') or 0:.0f}; {p.get('peak_rss_mib') or 0:.0f} |")
    if 1 in ours and 8 in ours:
        print(f"kvcompact 8 streams ÷ 1 stream: {ours[8]['agg_tok_s'] / ours[1]['agg_tok_s']:.2f}x")
EOF
