#!/usr/bin/env bash
# AddressSanitizer over the code that uses `unsafe` (SIMD kernels, the memory-mapped weight and
# GGUF loaders) and the suites that drive it: kernels' unit and differential tests, the GGUF
# reader, the hostile-file property tests, the tiny golden models' forward pass, batched decode and
# Slim Attention. Nightly only (`-Zsanitizer`); run before each release of a kernel change.
# `scripts/asan.sh` — exits non-zero on any ASan report or test failure.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLCHAIN=${KVCOMPACT_ASAN_TOOLCHAIN:-nightly}
TARGET=$(rustc +"$TOOLCHAIN" -vV | sed -n 's/^host: //p')
# --target keeps the sanitizer off build scripts and proc macros; a separate target dir keeps the
# instrumented build away from the normal one.
export RUSTFLAGS="-Zsanitizer=address -Cdebug-assertions=on"
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:detect_stack_use_after_return=1"
common=(--release --target "$TARGET" --target-dir target/asan)
cargo +"$TOOLCHAIN" test "${common[@]}" -p kvcompact-kernels --lib --test differential
cargo +"$TOOLCHAIN" test "${common[@]}" -p kvcompact --lib \
  --test gguf --test hostile_props --test golden_tiny --test batch_decode --test slim --test cli_errors
echo "asan: clean"
