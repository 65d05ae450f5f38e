#!/usr/bin/env bash
# Two builds of the front door, interleaved on the same host (this machine's speed moves
# within minutes, so only runs next to each other compare): RUNS rounds of
# `perf/frontdoor.sh SECONDS SCALE` with DIR_A/symphony, then DIR_B/symphony, one line per
# run (bad rate, the shards' own work per request, the process's CPU per request), then each
# build's shard work per request, sorted, and the ratio of the medians (B over A).
# Usage: perf/frontdoor-ab.sh DIR_A DIR_B [SECONDS] [SCALE] [RUNS]   (default 4 s, 10, 4)
#        WORKLOAD=FILE and CONNECTIONS=N as for perf/frontdoor.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 2 ]; then
  echo "usage: perf/frontdoor-ab.sh DIR_A DIR_B [SECONDS] [SCALE] [RUNS]" >&2
  exit 2
fi
a="$1"; b="$2"; seconds="${3:-4}"; scale="${4:-10}"; runs="${5:-4}"
for dir in "$a" "$b"; do
  [ -x "$dir/symphony" ] || { echo "frontdoor-ab: no executable $dir/symphony" >&2; exit 2; }
done
echo "frontdoor-ab: A = $a, B = $b; $runs rounds of perf/frontdoor.sh $seconds $scale, A then B"
work="$(mktemp)"
trap 'rm -f "$work"' EXIT
for round in $(seq 1 "$runs"); do
  for side in A B; do
    dir="$a"; [ "$side" = B ] && dir="$b"
    out="$(SYMPHONY_PREBUILT="$dir" perf/frontdoor.sh "$seconds" "$scale" 2>&1)"
    bad="$(grep -oE 'bad rate [0-9.]+ %' <<< "$out" | head -1)"
    shard="$(grep -oE '[0-9.]+ us a request over' <<< "$out" | grep -oE '^[0-9.]+' | head -1)"
    cpu="$(grep -oE 'service CPU [0-9.]+ s, [0-9.]+ us a request' <<< "$out" | grep -oE '[0-9.]+ us' | head -1)"
    echo "round $round $side: ${bad:-no report}, shard work ${shard:-?} us a request, service CPU ${cpu:-?} a request"
    [ -n "$shard" ] && echo "$side $shard" >> "$work"
  done
done
median() { sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for side in A B; do
  echo "$side shard work, us a request: $(awk -v s="$side" '$1 == s { print $2 }' "$work" | sort -n | tr '\n' ' ')"
done
ma="$(awk '$1 == "A" { print $2 }' "$work" | median)"
mb="$(awk '$1 == "B" { print $2 }' "$work" | median)"
awk -v a="$ma" -v b="$mb" 'BEGIN { if (a > 0) printf "median shard work: A %.3f, B %.3f us a request, B/A %.2f\n", a, b, b / a }'
