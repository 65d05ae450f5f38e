#!/usr/bin/env bash
# The front door's rate on this machine: one shard on CPU 0, the load generator on CPU 1,
# perf/workloads/frontdoor-1000m.yaml (1,000 models on 1,024 simulated GPUs, 100,000 req/s at
# rate scale 1) with its measured phase stretched to SECONDS, for every rate scale given.
# Prints, per run, the load generator's report and the CPU time (user + system, from /proc)
# of the service and of the load generator per request over the whole run.
# Usage: perf/frontdoor.sh [SECONDS] SCALE...   (default: 4 s, scales 1 3 5)
#        SYMPHONY_PREBUILT=DIR: use DIR/symphony, no build; CONNECTIONS=N (default 2);
#        WORKLOAD=FILE (default perf/workloads/frontdoor-1000m.yaml; its measured phase must
#        be 4 s, as in perf/workloads/frontdoor-mixed-1000m.yaml)
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-4}"
shift || true
scales="${*:-1 3 5}"
connections="${CONNECTIONS:-2}"
. perf/binary.sh
dir="$(mktemp -d)"
trap 'rm -rf "$dir"' EXIT
workload="${WORKLOAD:-perf/workloads/frontdoor-1000m.yaml}"
sed -E "s/bench: \[\{duration: 4,/bench: [{duration: $seconds,/" "$workload" > "$dir/load.yaml"
tick=$(getconf CLK_TCK)
echo "frontdoor: 1 shard on CPU 0, loadgen on CPU 1 with $connections connections; workload $workload;"
echo "  1 s warm-up, $seconds s measured, 1 s cool-down; rate scales {$scales}; binary $bin (checkout $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
port=7900
for scale in $scales; do
  port=$((port + 1))
  $bin serve --workload "$dir/load.yaml" --listen 127.0.0.1:$port --shards 1 --cpus 0 > "$dir/serve.log" 2>&1 &
  serve=$!
  for _ in $(seq 1 100); do grep -q "Ctrl-C stops" "$dir/serve.log" && break; sleep 0.1; done
  before=$(awk '{ print $14 + $15 }' "/proc/$serve/stat")
  /usr/bin/time -f "%U %S" -o "$dir/load.time" taskset -c 1 $bin loadgen --target 127.0.0.1:$port \
    --workload "$dir/load.yaml" --rate-scale "$scale" --connections "$connections" --json "$dir/load.json" \
    > "$dir/load.out" 2> "$dir/load.err" || echo "  loadgen failed: $(tail -2 "$dir/load.err")"
  load_cpu=$(awk -v hz="$tick" 'END { printf "%d", ($1 + $2) * hz }' "$dir/load.time")
  after=$(awk '{ print $14 + $15 }' "/proc/$serve/stat")
  kill -INT $serve 2>/dev/null || true
  wait $serve 2>/dev/null || true
  echo "scale $scale: $(grep -m1 '^offered' "$dir/load.out" || tail -1 "$dir/load.out")"
  grep -m1 "arrival to decision" "$dir/serve.log" | sed 's/^symphony serve: /  /' || true
  grep -m1 "shard work" "$dir/serve.log" | sed "s/^symphony serve: /  /" || true
  requests=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["requests"])' "$dir/load.json" 2>/dev/null || echo 0)
  awk -v s="$((after - before))" -v l="$load_cpu" -v hz="$tick" -v n="$requests" 'BEGIN {
    if (n > 0) printf "  %d requests; service CPU %.2f s, %.3f us a request; load generator CPU %.2f s, %.3f us a request\n",
      n, s / hz, s / hz * 1e6 / n, l / hz, l / hz * 1e6 / n }'
done
