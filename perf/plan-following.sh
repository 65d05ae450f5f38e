#!/usr/bin/env bash
# Plan-following accuracy with the cpu backend: one shard (CPU 0), one cpu executor (one
# worker thread = one "GPU"), the load generator; prints the load report and the executor's
# start lateness (actual start - exec_at) and execution time against the profile it measured.
# Usage: perf/plan-following.sh [RATE_SCALE]
set -euo pipefail
cd "$(dirname "$0")/.."
scale="${1:-1}"
bin=./target/release/symphony
cargo build --release 2>&1 | tail -1
log="$(mktemp -d)"
$bin serve --config perf/workloads/cpu-follow.toml --cpus 0 > "$log/serve.log" 2>&1 &
serve=$!
sleep 1
$bin executor --scheduler 127.0.0.1:7691 --token follow --gpus 1 --backend cpu > "$log/executor.log" 2>&1 &
executor=$!
for _ in $(seq 1 120); do grep -q "online" "$log/serve.log" && break; sleep 0.25; done
$bin loadgen --target 127.0.0.1:7691 --workload perf/workloads/cpu-follow.yaml --rate-scale "$scale" \
  --input-bytes model --connections 2 --json "$log/load.json" 2>/dev/null | tail -1
python3 -c 'import json,sys
for m in json.load(open(sys.argv[1]))["models"]:
    print("  %s: bad %.3f %% (late %d, not ok %d of %d)" % (m["name"], m["bad_rate"], m["late"], m["not_ok"], m["total"]))' "$log/load.json" || true
kill -INT "$executor" 2>/dev/null || true
wait "$executor" 2>/dev/null || true
kill -INT "$serve" 2>/dev/null || true
wait "$serve" 2>/dev/null || true
grep "plan following" "$log/executor.log"
