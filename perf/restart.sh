#!/usr/bin/env bash
# Restart under load: `symphony serve` (no embedded GPU) with two `symphony executor` processes
# of 4 sim GPUs each, the resnet-8m workload at RATE_SCALE; the scheduler is killed (SIGKILL)
# KILL_AT s into a load run and started again at once on the same address. Prints how long the
# executors took to register again (nobody restarts them), what the interrupted run saw, and a
# full load run after the restart. ROUNDS restarts in a row.
# Usage: perf/restart.sh [RATE_SCALE] [KILL_AT] [ROUNDS]   (SYMPHONY_PREBUILT=DIR: use DIR/symphony)
set -euo pipefail
cd "$(dirname "$0")/.."
scale="${1:-0.75}"
kill_at="${2:-4}"
rounds="${3:-2}"
. perf/binary.sh
dir="$(mktemp -d)"
addr=127.0.0.1:7698
workload=workloads/resnet-8m-poisson.yaml
serve() {
  $bin serve --listen "$addr" --workload "$workload" --gpus 0 --executor-token restart \
    --executor-gpus 8 > "$dir/serve-$1.log" 2>&1 &
  echo $!
}
online() {  # waits until both executors are online in serve log $1; prints the wait in s
  local start; start=$(date +%s.%N)
  for _ in $(seq 1 400); do
    [ "$(grep -c ' online ' "$dir/serve-$1.log" || true)" -ge 2 ] && break
    sleep 0.05
  done
  printf "%.2f" "$(echo "$(date +%s.%N) - $start" | bc)"
}
echo "restart under load: $workload at rate scale $scale, 2 sim executors of 4 GPUs, serve killed $kill_at s into a run, $rounds rounds; binary $bin (checkout $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
pid=$(serve 0)
sleep 0.5
for e in 1 2; do
  $bin executor --scheduler "$addr" --token restart --gpus 4 --backend sim --heartbeat-ms 50 \
    > "$dir/executor-$e.log" 2>&1 &
  eval "executor_$e=\$!"
done
trap 'kill -9 $pid $executor_1 $executor_2 2>/dev/null || true' EXIT
echo "executors online after start: $(online 0) s"
for round in $(seq 1 "$rounds"); do
  $bin loadgen --target "$addr" --workload "$workload" --rate-scale "$scale" --json "$dir/cut-$round.json" \
    > "$dir/cut-$round.txt" 2>/dev/null &
  loadgen=$!
  sleep "$kill_at"
  kill -9 "$pid"
  wait "$pid" 2>/dev/null || true
  pid=$(serve "$round")
  back=$(online "$round")
  wait "$loadgen" || true
  for e in 1 2; do
    eval "kill -0 \$executor_$e" 2>/dev/null || { echo "executor $e died"; exit 1; }
  done
  echo "round $round: both executors online again $back s after the restart (serve started at once)"
  cut=$(python3 - "$dir/cut-$round.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['sent']} sent, {r['received']} answered ({r['statuses']['ok']} OK in the bench phase), "
      f"{len(r['errors'])} connection errors (the kill cut its connections)")
PY
)
  echo "  the interrupted run: $cut"
  after=$($bin loadgen --target "$addr" --workload "$workload" --rate-scale "$scale" 2>/dev/null | tail -1)
  echo "  the run after: $after"
done
