#!/usr/bin/env bash
# The memory experiment (serving.md): how many concurrent ~2k-token conversations kvcompact serve and
# llama.cpp's llama-server each hold in the same KV memory. Optional; never part of CI.
#
#   benches/serve_memory.sh [BUDGET_MIB] [CLIENTS] [THREADS] [RATIOS] [KV_DTYPE] [PEER]
#   # defaults: 256  4,8,12,16,24,32  2  10,20  f32  yes   (PEER=no skips llama-server)
#
# kvcompact: `serve --kv-budget-mib BUDGET --ratio R --kv-dtype KV_DTYPE` (compaction under pressure). llama-server:
# the same bytes as its default f16 KV cache, -c = BUDGET / (bytes per token), one slot per client.
# A trial passes when every client gets its whole stream (benches/serve_memory.py); for kvcompact
# each row also has peak_running / peak_kv_mib, polled from /metrics: how many sequences were
# really resident at once (served is not held: a server that admits slowly finishes early clients
# before late ones arrive). Prints the largest N that passed per server; raw rows in benches/peer/serve_memory.jsonl. The answer-quality
# cost of compaction at each ratio is the eval's log-ppl (README results table), not measured here.
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=${1:-256}
CLIENTS=${2:-4,8,12,16,24,32}
THREADS=${3:-2}
RATIOS=${4:-10,20}
KV_DTYPE=${5:-f32}
RUN_PEER=${6:-yes}
PEER=benches/peer
SERVER="$PEER/build-server/bin/llama-server"
[ -x "$SERVER" ] || benches/build_llama_cpp.sh build-server ON llama-server llama-quantize
cargo build --release -q
KVC=target/release/kvcompact
MODEL_DIR=$($KVC fetch-model | tail -1)
[ -f "$PEER/smollm2-f32.gguf" ] || { echo "run benches/serve_bench.sh once first (it makes $PEER/smollm2-f32.gguf)" >&2; exit 1; }
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
OUT="$PEER/serve_memory.jsonl"
: > "$OUT"
MAXC=$(echo "$CLIENTS" | tr ',' '\n' | sort -n | tail -1)
wait_port() { for _ in $(seq 1 300); do curl -sf "$1/health" >/dev/null && return 0; sleep 0.1; done; return 1; }
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); budget $BUDGET MiB; threads $THREADS"

for R in $(echo "$RATIOS" | tr ',' ' '); do
  $KVC --threads "$THREADS" serve --model "$MODEL_DIR" --port 18080 --max-batch "$MAXC" --kv-budget-mib "$BUDGET" \
    --ratio "$R" --kv-dtype "$KV_DTYPE" --store "$PEER/store" > "$PEER/kvc-memory.log" 2>&1 &
  PID=$!
  wait_port http://127.0.0.1:18080
  $PY benches/serve_memory.py http://127.0.0.1:18080 --clients "$CLIENTS" --label "kvcompact-ratio$R-$KV_DTYPE" --out "$OUT" --stop-at-failure
  kill -TERM $PID; wait $PID || true
done

# llama-server: its f16 KV holds BUDGET MiB / bytes_per_token tokens; each client gets a slot of c / N.
BPT=$($PY -c "import json,sys; c=json.load(open(sys.argv[1]+'/config.json')); hd=c.get('head_dim') or c['hidden_size']//c['num_attention_heads']; print(2*c['num_hidden_layers']*c.get('num_key_value_heads',c['num_attention_heads'])*hd*2)" "$MODEL_DIR")
CTX=$(( BUDGET * 1048576 / BPT ))
echo "llama-server: f16 KV $BPT bytes/token → -c $CTX for $BUDGET MiB"
for N in $(echo "$CLIENTS" | tr ',' ' '); do
  [ "$RUN_PEER" = yes ] || break
  "$SERVER" -m "$PEER/smollm2-f32.gguf" --port 18081 -t "$THREADS" -tb "$THREADS" -np "$N" -c "$CTX" --no-webui > "$PEER/llama-memory.log" 2>&1 &
  PID=$!
  wait_port http://127.0.0.1:18081
  ROW=$($PY benches/serve_memory.py http://127.0.0.1:18081 --clients "$N" --model smollm2 --label llama-server-f16kv --out "$OUT")
  echo "$ROW"
  kill -TERM $PID; wait $PID || true
  echo "$ROW" | grep -q '"passed": true' || break
done

$PY - "$OUT" "$BUDGET" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
best = {}
for r in rows:
    if r["passed"]:
        best[r["label"]] = max(best.get(r["label"], 0), r["clients"])
print(f"\nconcurrent ~2k-token conversations held in {sys.argv[2]} MiB of KV memory:")
for label in dict.fromkeys(r["label"] for r in rows):
    print(f"  {label}: {best.get(label, 0)}")
PYEOF
