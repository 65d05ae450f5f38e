#!/usr/bin/env bash
# Scaling with cores: req/s through N shards (N in SHARDS, default 1 2 4 8 16) on CPUs
# 0..N-1, with N load generators on CPUs N..2N-1 (one core each), each offering RATE_SCALE
# times perf/workloads/frontdoor-1000m.yaml (1,000 models, 1,024 simulated GPUs, 100,000 req/s
# at scale 1), for every RATE_SCALE in RATES (default 1 5 10). A count of shards needing more
# than the machine's cores is skipped and said so. Prints one row per run: offered and
# achieved req/s (summed over the generators), the worst generator's bad rate, and the
# ratio of achieved req/s against one shard at the same scale in the same run. At most about
# 5 minutes on a 16-core machine (15 runs of about 12 s).
# Usage: perf/scale.sh            (SYMPHONY_PREBUILT=DIR: use DIR/symphony, no build;
#                                  SHARDS="1 2", RATES="1 2" to narrow it)
set -euo pipefail
cd "$(dirname "$0")/.."
. perf/binary.sh
shards_list="${SHARDS:-1 2 4 8 16}"
rates="${RATES:-1 5 10}"
cores=$(nproc)
workload=perf/workloads/frontdoor-1000m.yaml
dir="$(mktemp -d)"
echo "scale: shards {$shards_list} x rate scales {$rates} per generator on $cores cores; workload $workload;"
echo "  one load generator per shard, each on a core of its own, 2 connections each; binary $bin (checkout $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
printf '%6s %6s %12s %12s %10s %8s\n' shards scale offered achieved "worst bad%" "vs 1"
declare -A base
port=7800
for n in $shards_list; do
  if [ $((2 * n)) -gt "$cores" ]; then
    echo "  $n shards: skipped (needs $((2 * n)) cores, this machine has $cores)"
    continue
  fi
  for scale in $rates; do
    port=$((port + 1))
    cpus=$(seq -s, 0 $((n - 1)))
    $bin serve --workload "$workload" --listen 127.0.0.1:$port --shards "$n" --cpus "$cpus" > "$dir/serve.log" 2>&1 &
    serve=$!
    sleep 1
    pids=()
    for g in $(seq 0 $((n - 1))); do
      taskset -c $((n + g)) $bin loadgen --target 127.0.0.1:$port --workload "$workload" \
        --rate-scale "$scale" --connections 2 > "$dir/load-$g.out" 2> "$dir/load-$g.err" &
      pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || true; done
    kill -INT $serve 2>/dev/null || true
    wait $serve 2>/dev/null || true
    offered=0; achieved=0; worst=0
    for g in $(seq 0 $((n - 1))); do
      line=$(grep -m1 '^offered' "$dir/load-$g.out" || echo "offered 0 req/s, achieved 0 req/s | bad rate 100 %")
      o=$(echo "$line" | sed -E 's/.*offered ([0-9]+) req\/s.*/\1/')
      a=$(echo "$line" | sed -E 's/.*achieved ([0-9]+) req\/s.*/\1/')
      b=$(echo "$line" | sed -E 's/.*bad rate ([0-9.]+) %.*/\1/')
      offered=$((offered + o)); achieved=$((achieved + a))
      worst=$(python3 -c "print(max($worst, $b))")
    done
    if [ "$n" = "$(echo $shards_list | awk '{print $1}')" ]; then base[$scale]=$achieved; fi
    ratio=$(python3 -c "b=${base[$scale]:-0}; print(f'{$achieved / b:.2f}' if b else '-')")
    printf '%6s %6s %12s %12s %10s %8s\n' "$n" "$scale" "$offered" "$achieved" "$worst" "$ratio"
  done
done
rm -rf "$dir"
