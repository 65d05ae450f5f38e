#!/usr/bin/env bash
# Builds what perf/gpu-check.sh needs on a GPU machine that has no Rust toolchain, into DIR
# (default .gpu-bundle, ignored by git): the release `symphony`, the gpu-exec test binary,
# both stripped, and the hwloc/udev libraries they link (lib/).
#
#   perf/gpu-bundle.sh [DIR]; then, there: SYMPHONY_PREBUILT=DIR perf/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-.gpu-bundle}"
rm -rf "$dir"
mkdir -p "$dir/lib"
cargo build --release 2>&1 | tail -1
test_bin=$(cargo test --release -p symphony-gpu-exec --no-run --message-format=json 2>/dev/null |
  grep -o '"executable":"[^"]*"' | cut -d'"' -f4 | grep symphony_gpu_exec | head -1)
cp target/release/symphony "$dir/symphony"
cp "$test_bin" "$dir/gpu-exec-tests"
strip "$dir/symphony" "$dir/gpu-exec-tests"
for lib in $(ldd "$dir/symphony" | awk '/libhwloc|libudev/ { print $3 }'); do
  cp -L "$lib" "$dir/lib/"
done
du -sh "$dir"/* "$dir"/lib/*
