#!/usr/bin/env bash
# Run every fuzz target in turn: `fuzz/run.sh [SECONDS] [TARGET ...]` (default 600 s each, all
# targets). Needs a nightly toolchain and cargo-fuzz (installed if missing); the normal build
# stays on stable. Debug assertions are on, so an overflow in size arithmetic is a crash too.
# The working corpus grows in fuzz/corpus/<target> (ignored), starting from the committed seeds in
# fuzz/seeds/<target>; a crash lands in fuzz/artifacts/<target>/ and must become a regression test
# under tests/ that runs on stable (see tests/fuzz_regressions.rs).
set -euo pipefail
cd "$(dirname "$0")"
SECONDS_EACH=${1:-600}
shift || true
ALL=(gguf config model_dir cache_file compact_head chat_template serve_request)
TARGETS=("${@:-${ALL[@]}}")
TOOLCHAIN=${KVCOMPACT_FUZZ_TOOLCHAIN:-nightly}

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
cargo +"$TOOLCHAIN" fuzz build --debug-assertions
mkdir -p logs
status=0
for t in "${TARGETS[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t: ${SECONDS_EACH}s"
  # 2 GiB RSS, 1 GiB per allocation, 10 s per input: anything above is a finding, not a wait.
  if ! cargo +"$TOOLCHAIN" fuzz run --debug-assertions "$t" "corpus/$t" "seeds/$t" -- \
      -max_total_time="$SECONDS_EACH" -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 \
      -print_final_stats=1 >"logs/$t.log" 2>&1; then
    status=1
  fi
  runs=$(grep -E '^stat::number_of_executed_units' "logs/$t.log" | awk '{print $2}' || true)
  cov=$(grep -oE 'cov: [0-9]+' "logs/$t.log" | tail -1 || true)
  crashes=$(find "artifacts/$t" -type f 2>/dev/null | wc -l)
  echo "   executions ${runs:-?}, ${cov:-cov: ?}, findings in artifacts/$t: $crashes (log: fuzz/logs/$t.log)"
  [[ "$crashes" == 0 ]] || status=1
done
exit $status
