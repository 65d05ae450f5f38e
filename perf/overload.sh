#!/usr/bin/env bash
# The overload promise, measured: 8 ResNet-like models on 8 embedded simulated GPUs (the
# shipped resnet-8m set, SLO 100 ms), offered their goodput for WARM s, then OVERLOAD times it
# for BENCH s, then 0.75 times it for COOL s. One shard on CPU 0, the load generator on CPU 1.
# Prints the parameters, the second-by-second outcome, the latency of the replies that were
# not OK, and the serve process's peak resident memory (sampled every 0.25 s from /proc).
# Usage: perf/overload.sh [GOODPUT_RPS] [OVERLOAD] [BENCH_S]
#        (SYMPHONY_PREBUILT=DIR: use DIR/symphony, no build)
set -euo pipefail
cd "$(dirname "$0")/.."
goodput="${1:-6500}"
overload="${2:-10}"
bench_s="${3:-30}"
warm_s=10
cool_s=10
. perf/binary.sh
dir="$(mktemp -d)"
per_model=$(python3 -c "print($goodput / 8)")
high=$(python3 -c "print($goodput * $overload / 8)")
low=$(python3 -c "print($goodput * 0.75 / 8)")
{
  echo "seed: 0x5eed"
  echo "gpus: 8"
  echo "models:"
  for m in 0 1 2 3 4 5 6 7; do
    echo "- {framework: \"sleep#1082,5204,0,0\", model: m$m, slo: 100, gap: exp, warmup: [{duration: $warm_s, rps: $per_model}], bench: [{duration: $bench_s, rps: $high}], cooldown: [{duration: $cool_s, rps: $low}]}"
  done
} > "$dir/overload.yaml"
echo "overload: goodput $goodput req/s for $warm_s s, then ${overload}x ($((goodput * overload)) req/s) for $bench_s s, then 0.75x for $cool_s s;"
echo "  8 models (l(b) = 1.082 ms * b + 5.204 ms, SLO 100 ms), 8 embedded GPUs, 1 shard on CPU 0, loadgen on CPU 1, 4 connections; binary $bin (checkout $(git rev-parse --short HEAD 2>/dev/null || echo unknown))"
$bin serve --workload "$dir/overload.yaml" --listen 127.0.0.1:7693 --shards 1 --cpus 0 > "$dir/serve.log" 2>&1 &
serve=$!
trap 'kill -INT $serve 2>/dev/null || true' EXIT
sleep 0.5
(
  peak=0
  while kill -0 "$serve" 2>/dev/null; do
    rss=$(awk '/VmRSS/ { print $2 }' "/proc/$serve/status" 2>/dev/null || echo 0)
    [ "${rss:-0}" -gt "$peak" ] && peak=$rss
    echo "$peak" > "$dir/rss_peak_kib"
    sleep 0.25
  done
) &
sampler=$!
base_rss=$(awk '/VmRSS/ { print $2 }' "/proc/$serve/status")
taskset -c 1 $bin loadgen --target 127.0.0.1:7693 --workload "$dir/overload.yaml" --connections 4 \
  --json "$dir/report.json" 2>/dev/null | tail -1
kill -INT "$serve" 2>/dev/null || true
wait "$serve" 2>/dev/null || true
wait "$sampler" 2>/dev/null || true
trap - EXIT
python3 - "$dir/report.json" "$warm_s" "$bench_s" "$base_rss" "$(cat "$dir/rss_peak_kib")" <<'PY'
import json, statistics, sys
report = json.load(open(sys.argv[1]))
warm, bench = int(sys.argv[2]), int(sys.argv[3])
base_kib, peak_kib = int(sys.argv[4]), int(sys.argv[5])
t = report["timeline"]
print(f"{'second':>6} {'phase':>8} {'offered':>8} {'success':>8} {'late':>6} {'dropped':>8} {'overloaded':>10} {'other':>6} {'noreply':>7} {'bad %':>7}")
for s in t:
    phase = "warm" if s["second"] < warm else ("overload" if s["second"] < warm + bench else "after")
    bad = 100.0 * (1 - s["success"] / s["offered"]) if s["offered"] else 0.0
    print(f"{s['second']:>6} {phase:>8} {s['offered']:>8} {s['success']:>8} {s['late']:>6} {s['dropped']:>8} {s['overloaded']:>10} {s['other']:>6} {s['noreply']:>7} {bad:>7.2f}")
# The first and last second of a phase are partial (arrivals start at t = 0 of each second).
peak = statistics.median(s["success"] for s in t[1:warm])
during = [s["success"] for s in t[warm + 1:warm + bench]]
after = t[warm + bench:warm + bench + 2]
replies = sum(s["success"] + s["late"] + s["dropped"] + s["overloaded"] + s["other"] for s in t)
print(f"peak goodput (median success/s of the warm seconds): {peak:.0f} req/s")
print(f"goodput under overload: min {min(during)}, median {statistics.median(during):.0f} req/s = {100 * min(during) / peak:.1f} % / {100 * statistics.median(during) / peak:.1f} % of peak")
print("bad rate in the seconds after the overload: " + ", ".join(f"{100.0 * (1 - s['success'] / s['offered']):.2f} %" for s in after if s["offered"]))
print(f"every request answered once: {report['requests']} sent, {replies} replies, {report['noreply']} without a reply (bench), {report['duplicate_replies']} duplicates")
print(f"replies that were not OK (bench): p50 {report['not_ok_latency_us_p50'] / 1000:.1f} ms, p99 {report['not_ok_latency_us_p99'] / 1000:.1f} ms, max {report['not_ok_latency_us_max'] / 1000:.1f} ms (SLO 100 ms)")
print(f"serve resident memory: {base_kib // 1024} MiB at start, peak {peak_kib // 1024} MiB; max send lag {report['send_lag_us_max'] / 1000:.1f} ms")
PY
