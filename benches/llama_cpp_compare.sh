#!/usr/bin/env bash
# Side-by-side speed of kvcompact and llama.cpp's llama-bench on the default model, same dtype,
# same prompt length, same thread counts, interleaved in one run (performance.md §4).
# Optional; never part of CI. Builds llama.cpp from the PyPI sdist of llama-cpp-python into the
# git-ignored benches/peer/ (a cold build takes ≈ 8 min on 2 vCPUs).
#
#   benches/llama_cpp_compare.sh [REPS]      # default 5 repetitions per cell
#
# Prints one table (prefill tok/s at 128 tokens, decode tok/s over 64 tokens; medians) with
# ratios kvcompact ÷ llama.cpp, and writes benches/peer/compare.json.
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=${1:-5}
PEER=benches/peer
mkdir -p "$PEER"

# --- llama.cpp --------------------------------------------------------------------------------
BENCH="$PEER/build/bin/llama-bench"
QUANT="$PEER/build/bin/llama-quantize"
if [ ! -x "$BENCH" ] || [ ! -x "$QUANT" ]; then
  benches/build_llama_cpp.sh build OFF llama-bench llama-quantize
fi

# --- models -----------------------------------------------------------------------------------
cargo build --release -q
KVC=target/release/kvcompact
MODEL_DIR=$($KVC fetch-model | tail -1)
GGUF="$(dirname "$MODEL_DIR")/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$PEER/smollm2-f32.gguf" ] || "$QUANT" --allow-requantize "$GGUF" "$PEER/smollm2-f32.gguf" F32 >/dev/null
[ -f "$PEER/smollm2-bf16.gguf" ] || "$QUANT" --allow-requantize "$GGUF" "$PEER/smollm2-bf16.gguf" BF16 >/dev/null
[ -f "$PEER/smollm2-bf16/model.safetensors" ] || $KVC convert --gguf "$GGUF" --out "$PEER/smollm2-bf16" --dtype bf16 >/dev/null

# --- runs (interleaved so both tools see the same machine state) -------------------------------
OUT="$PEER/runs.jsonl"
: > "$OUT"
for dtype in f32 bf16; do
  if [ $dtype = f32 ]; then DIR="$MODEL_DIR"; else DIR="$PEER/smollm2-bf16"; fi
  for t in 1 2; do
    echo "== $dtype, $t thread(s)" >&2
    "$BENCH" -m "$PEER/smollm2-$dtype.gguf" -p 128 -n 64 -t $t -r "$REPS" -o json \
      | python3 -c "import json,sys; [print(json.dumps({'tool':'llama.cpp','dtype':'$dtype','threads':$t,'n_prompt':r['n_prompt'],'n_gen':r['n_gen'],'avg_ts':r['avg_ts'],'stddev_ts':r['stddev_ts'],'commit':r.get('build_commit')})) for r in json.load(sys.stdin)]" >> "$OUT"
    $KVC --threads $t bench --model "$DIR" --prompt-tokens 128 --gen-tokens 64 --reps "$REPS" --json \
      | python3 -c "import json,sys; r=json.loads(sys.stdin.readline()); print(json.dumps({'tool':'kvcompact','dtype':'$dtype','threads':$t,**r}))" >> "$OUT"
  done
done

python3 - "$OUT" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def peer(dtype, t, kind):
    for r in rows:
        if r['tool'] == 'llama.cpp' and r['dtype'] == dtype and r['threads'] == t:
            if kind == 'pp' and r['n_prompt'] > 0: return r['avg_ts']
            if kind == 'tg' and r['n_gen'] > 0: return r['avg_ts']
def ours(dtype, t):
    return next(r for r in rows if r['tool'] == 'kvcompact' and r['dtype'] == dtype and r['threads'] == t)
k0 = next(r for r in rows if r['tool'] == 'kvcompact')
print(f"cpu {k0.get('cpu', '?')} | kvcompact simd {k0.get('simd', '?')} ({k0.get('simd_level', '?')})")
print("| dtype | threads | prefill kvcompact | prefill llama.cpp | ratio | decode kvcompact | decode llama.cpp | ratio |")
print("|---|---|---|---|---|---|---|---|")
table = []
for dtype in ('f32', 'bf16'):
    for t in (1, 2):
        o = ours(dtype, t); pp = peer(dtype, t, 'pp'); tg = peer(dtype, t, 'tg')
        print(f"| {dtype} | {t} | {o['prefill_tok_s']:.1f} | {pp:.1f} | {o['prefill_tok_s']/pp:.2f} | {o['decode_tok_s']:.1f} | {tg:.1f} | {o['decode_tok_s']/tg:.2f} |")
        table.append({'dtype': dtype, 'threads': t, 'ours': o, 'llama_cpp_pp': pp, 'llama_cpp_tg': tg})
json.dump(table, open(sys.argv[1].replace('runs.jsonl', 'compare.json'), 'w'), indent=1)
PY
