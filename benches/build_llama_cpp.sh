#!/usr/bin/env bash
# Build llama.cpp tools from the PyPI sdist of llama-cpp-python 0.3.36 (the peer of the side-by-side
# benchmarks) into the git-ignored benches/peer/BUILD_DIR. Sourced or run by the bench scripts:
#
#   benches/build_llama_cpp.sh BUILD_DIR SERVER(ON|OFF) TARGET...
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD="benches/peer/$1"; SERVER=$2; shift 2
PEER=benches/peer
mkdir -p "$PEER"
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null; then
  apt-get update -qq && apt-get install -y -qq cmake ninja-build
fi
if ! ls "$PEER"/llama_cpp_python-0.3.36.tar.gz >/dev/null 2>&1; then
  # pip may fail while preparing metadata; the downloaded archive is still usable.
  python3 -m pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$PEER" || true
fi
[ -d "$PEER/llama_cpp_python-0.3.36" ] || tar -xzf "$PEER"/llama_cpp_python-0.3.36.tar.gz -C "$PEER"
SRC="$PEER/llama_cpp_python-0.3.36/vendor/llama.cpp"
# GGML_NATIVE is fine for a peer measurement tool; kvcompact itself never builds native.
cmake -S "$SRC" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER="$SERVER"
cmake --build "$BUILD" --target "$@" -j 2
