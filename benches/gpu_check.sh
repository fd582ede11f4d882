#!/usr/bin/env bash
# The GPU check of the cuda feature (issue 16); meant to finish in well under 8 minutes on a
# machine with an NVIDIA GPU:
#   1. build kvcompact and the tests/cuda.rs binary with --features cuda — or take both from
#      $KVCOMPACT_PREBUILT (made by `benches/gpu_check.sh --prebuild DIR` on a machine with cargo
#      and crates.io, for a GPU machine that has neither; they need a glibc at least as new);
#   2. find NVRTC and cuBLAS (a CUDA toolkit, or the nvidia-* pip wheels of a PyTorch install)
#      and put their directories on LD_LIBRARY_PATH;
#   3. run tests/cuda.rs with KVCOMPACT_REQUIRE_GPU=1: every CUDA twin must run — none may skip;
#   4. `kvcompact bench --device cuda --kernels`: GPU against CPU on decode attention and compact-head;
#   5. write the report to $REPORT (default: $OUT/gpu_check.md when $OUT is set, else ./gpu_check.md).
# Exit status 0 only when the tests pass.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"

if [ "${1:-}" = "--prebuild" ]; then
  DIR="${2:?usage: benches/gpu_check.sh --prebuild DIR}"
  mkdir -p "$DIR"
  cargo build --release --features cuda --quiet || exit 1
  TEST_BIN="$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == "cuda"][-1])')"
  cp target/release/kvcompact "$DIR/kvcompact" && cp "$TEST_BIN" "$DIR/cuda-tests" || exit 1
  strip "$DIR/kvcompact" "$DIR/cuda-tests"
  echo "prebuilt into $DIR: $(du -sh "$DIR" | cut -f1)"
  exit 0
fi

REPORT="${REPORT:-${OUT:+$OUT/}gpu_check.md}"
T0=$(date +%s)
log() { echo "$@" | tee -a "$REPORT"; }
: > "$REPORT"
log "# kvcompact GPU check — $(date -u +%Y-%m-%dT%H:%MZ)"
log ""
log "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); host $(uname -srm)"
log '```'
(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv 2>&1 || echo "nvidia-smi not found") | tee -a "$REPORT"
log '```'

# 1. Binaries.
if [ -n "${KVCOMPACT_PREBUILT:-}" ]; then
  BIN="$KVCOMPACT_PREBUILT/kvcompact"; TEST_BIN="$KVCOMPACT_PREBUILT/cuda-tests"
  log "binaries: prebuilt ($KVCOMPACT_PREBUILT)"
else
  cargo build --release --features cuda --quiet || { log "BUILD FAILED"; exit 1; }
  BIN="$ROOT/target/release/kvcompact"
  TEST_BIN="$(cargo test --release --features cuda --test cuda --no-run --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys; print([m["executable"] for m in map(json.loads, sys.stdin) if m.get("executable") and m["target"]["name"] == "cuda"][-1])')"
  log "binaries: built here with --features cuda ($(( $(date +%s) - T0 )) s)"
fi

# 2. Libraries: the driver's libcuda is found by the loader; NVRTC and cuBLAS may not be.
LIBDIRS=""
for f in $(find /usr/local /usr/lib /opt "$HOME" "$ROOT/.venv" -maxdepth 8 \( -name 'libnvrtc.so*' -o -name 'libcublas.so*' \) 2>/dev/null); do
  d="$(dirname "$f")"
  case ":$LIBDIRS:" in *":$d:"*) ;; *) LIBDIRS="${LIBDIRS:+$LIBDIRS:}$d" ;; esac
done
export LD_LIBRARY_PATH="${LIBDIRS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "library directories added: ${LIBDIRS:-none found}"

# 3. The CUDA twins, all required to run.
log ""
log "## tests/cuda.rs (KVCOMPACT_REQUIRE_GPU=1)"
log '```'
KVCOMPACT_REQUIRE_GPU=1 KVCOMPACT_REPO="$ROOT" KVCOMPACT_CUDA_CACHE="${TMPDIR:-/tmp}/kvcompact-cuda-cache" \
  timeout 300 "$TEST_BIN" --test-threads 1 2>&1 | tail -40 | tee -a "$REPORT"
TEST_RC=${PIPESTATUS[0]}
log '```'
log "tests exit status: $TEST_RC"

# 4. GPU against CPU.
log ""
log "## kvcompact bench --device cuda --kernels"
timeout 240 "$BIN" bench --device cuda --kernels --reps 5 2>&1 | tee -a "$REPORT"
log ""
log "total $(( $(date +%s) - T0 )) s"
exit "$TEST_RC"
