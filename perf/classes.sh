#!/usr/bin/env bash
# GPUs of two speeds, served: the 8 ResNet-like models of workloads/classes/resnet-8m-4fast-4slow.yaml
# (SLO 100 ms) on two executor processes of 4 GPUs each, one at the profile's speed and one
# at half of it (`symphony executor --speed 0.5`: its batches take twice the profile and the
# profile it registers says so), or with GPUS=embedded on 8 embedded GPUs of the same two
# speeds (`[embedded] classes`). For each class planning (`[policy] class_planning`), one run
# of the load generator at RATE_SCALE times the workload's 4,000 req/s, beside what
# `symphony sim` says for the same workload, rate and planning. One shard on CPU 0; the
# executors and the load generator share CPU 1.
# Usage: perf/classes.sh [RATE_SCALE] [PLANNINGS]   (default 0.9 "per-class slowest")
#        (SYMPHONY_PREBUILT=DIR: use DIR/symphony, no build; GPUS=embedded: no executors)
set -euo pipefail
cd "$(dirname "$0")/.."
scale="${1:-0.9}"
plannings="${2:-per-class slowest}"
gpus="${GPUS:-executors}"
workload=workloads/classes/resnet-8m-4fast-4slow.yaml
. perf/binary.sh
dir="$(mktemp -d)"
token="classes-$$"
port=7695
echo "classes: $workload at rate scale $scale ($(python3 -c "print(round(4000 * $scale))") req/s), 4 GPUs at speed 1 + 4 at speed 0.5 ($gpus);"
echo "  1 shard on CPU 0, executors and loadgen on CPU 1, 4 connections; binary $bin (checkout $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
for planning in $plannings; do
  {
    echo "listen = \"127.0.0.1:$port\""
    echo "http = \"off\""
    echo "grpc = \"off\""
    echo "metrics = \"off\""
    echo "shards = 1"
    if [ "$gpus" = embedded ]; then
      echo "gpus = 8"
    else
      echo "gpus = 0"
      echo "executor_token = \"$token\""
    fi
    for m in 0 1 2 3 4 5 6 7; do
      printf '[[models]]\nname = "m%s"\nprofile = "sleep#1082,5204,0,0"\nslo_ms = 100\n' "$m"
    done
    printf '[policy]\nclass_planning = "%s"\n' "$planning"
    if [ "$gpus" = embedded ]; then
      printf '[embedded]\nclasses = [{ count = 4, speed = 1.0 }, { count = 4, speed = 0.5 }]\n'
    fi
  } > "$dir/serve.toml"
  $bin serve --config "$dir/serve.toml" --cpus 0 > "$dir/serve-$planning.log" 2>&1 &
  serve=$!
  fast=""
  slow=""
  trap 'kill -INT $serve 2>/dev/null || true; kill $fast $slow 2>/dev/null || true' EXIT
  sleep 0.5
  if [ "$gpus" = embedded ]; then
    grep -o 'embedded simulated GPU(s)[^;]*' "$dir/serve-$planning.log" | sed 's/^/  /'
  else
    taskset -c 1 $bin executor --scheduler "127.0.0.1:$port" --token "$token" --gpus 4 --name fast 2>/dev/null &
    fast=$!
    taskset -c 1 $bin executor --scheduler "127.0.0.1:$port" --token "$token" --gpus 4 --speed 0.5 --name slow 2>/dev/null &
    slow=$!
    for _ in $(seq 100); do
      [ "$(grep -c ' online with ' "$dir/serve-$planning.log")" -ge 2 ] && break
      sleep 0.1
    done
    grep ' online with ' "$dir/serve-$planning.log" | sed 's/^/  /'
  fi
  served=$(taskset -c 1 $bin loadgen --target "127.0.0.1:$port" --workload "$workload" --rate-scale "$scale" \
    --connections 4 --json "$dir/report-$planning.json" 2>/dev/null | tail -1)
  simulated=$($bin sim "$workload" --rate-scale "$scale" --class-planning "$planning" | sed -n 1p)
  python3 - "$planning" "$dir/report-$planning.json" "$simulated" <<'PY'
import json, re, sys
planning, report, simulated = sys.argv[1], json.load(open(sys.argv[2])), sys.argv[3]
sim_bad = re.search(r"bad rate avg ([0-9.]+) %", simulated).group(1)
print(f"{planning:>10}: served {report['bench_requests']} requests in the bench phase, bad (mean over models) "
      f"{report['bad_rate_model_mean']:.3f} %, {report['noreply']} without a reply; simulated bad {sim_bad} %")
PY
  kill -INT "$serve" 2>/dev/null || true
  wait "$serve" 2>/dev/null || true
  if [ -n "$fast" ]; then
    kill "$fast" "$slow" 2>/dev/null || true
    wait "$fast" "$slow" 2>/dev/null || true
  fi
  trap - EXIT
done
