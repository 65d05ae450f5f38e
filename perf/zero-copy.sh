#!/usr/bin/env bash
# Zero-copy plan sends against copied ones, in one run: the same load of large inputs
# (12 KiB a request, so every plan frame is over 16 KiB) through one shard and one external
# sim executor, with `zero_copy = true` and then `false`, ROUNDS times alternating. Prints the
# load reports and the scheduler process's CPU time per request (user + system, from /proc).
# Usage: perf/zero-copy.sh [RATE] [ROUNDS]   (SYMPHONY_PREBUILT=DIR: use DIR/symphony, no build)
set -euo pipefail
cd "$(dirname "$0")/.."
rate="${1:-3000}"
rounds="${2:-2}"
. perf/binary.sh
dir="$(mktemp -d)"
cat > "$dir/load.yaml" <<YAML
seed: 9
gpus: 8
models:
- {framework: "sleep#100,1000,0,0", model: big, slo: 50, gap: exp, warmup: [{duration: 1, rps: $rate}], bench: [{duration: 8, rps: $rate}], cooldown: [{duration: 1, rps: $rate}]}
YAML
tick=$(getconf CLK_TCK)
echo "zero-copy bench: rate $rate req/s, 12288-byte inputs, 1 shard on CPU 0, 1 sim executor with 8 GPUs, $rounds rounds"
for round in $(seq 1 "$rounds"); do
  for zc in true false; do
    cat > "$dir/serve.toml" <<TOML
listen = "127.0.0.1:7692"
shards = 1
gpus = 0
executor_token = "zc"
zero_copy = $zc
[[models]]
name = "big"
profile = "sleep#100,1000,0,0"
slo_ms = 50
TOML
    $bin serve --config "$dir/serve.toml" --cpus 0 > "$dir/serve.log" 2>&1 &
    serve=$!
    sleep 0.5
    $bin executor --scheduler 127.0.0.1:7692 --token zc --gpus 8 --backend sim > "$dir/executor.log" 2>&1 &
    executor=$!
    for _ in $(seq 1 120); do grep -q "online" "$dir/serve.log" && break; sleep 0.25; done
    before=$(awk '{ print $14 + $15 }' "/proc/$serve/stat")
    report=$($bin loadgen --target 127.0.0.1:7692 --workload "$dir/load.yaml" --input-bytes 12288 \
      --connections 2 --json "$dir/load.json" 2>/dev/null | tail -1)
    after=$(awk '{ print $14 + $15 }' "/proc/$serve/stat")
    kill -INT "$executor" "$serve" 2>/dev/null || true
    wait "$executor" "$serve" 2>/dev/null || true
    requests=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["requests"])' "$dir/load.json")
    echo "round $round zero_copy=$zc: $report"
    awk -v t="$((after - before))" -v hz="$tick" -v n="$requests" \
      'BEGIN { printf "  scheduler CPU %.2f s for %d requests: %.1f us a request\n", t / hz, n, t / hz * 1e6 / n }'
  done
done
