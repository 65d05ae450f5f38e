#!/usr/bin/env bash
# The whole GPU check, on one machine with an NVIDIA GPU (under 5 minutes on an H100):
# builds, runs the cuda tests for real, profiles both networks on GPU 0, then serves a short
# load through one cuda executor. Prints every figure; writes them under ${OUT:-gpu-check-out}.
#
#   perf/gpu-check.sh                          # builds with cargo, then checks
#   SYMPHONY_PREBUILT=DIR perf/gpu-check.sh    # a machine without Rust: the binaries that
#                                              # perf/gpu-bundle.sh put in DIR
#   GPU_CHECK_BACKEND=cpu perf/gpu-check.sh    # a rehearsal of the same steps without a GPU
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
backend="${GPU_CHECK_BACKEND:-cuda}"
started=$SECONDS
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/gpu.txt" || true

# cudarc (built for CUDA 12.8, loading its libraries at run time) looks for libcublas.so,
# libcublas.so.12, libnvrtc.so, ... on the loader's path. Where the toolkit is elsewhere or
# of another major version (CUDA 13 ships libcublas.so.13), point it at what is installed.
libs=$(mktemp -d)
for lib in cublas nvrtc; do
  if ! ldconfig -p 2>/dev/null | grep -qE "lib$lib\.so(\.12)? "; then
    # Not the toolkit's link-time stubs/ (its libcuda.so stub would hide the driver).
    found=$(find /usr/local /usr/lib /opt -name "lib$lib.so*" -not -path "*/stubs/*" 2>/dev/null | sort | tail -1 || true)
    if [ -n "$found" ]; then
      ln -sf "$found" "$libs/lib$lib.so"
      export LD_LIBRARY_PATH="$(dirname "$found"):${LD_LIBRARY_PATH:-}"
      echo "using $found for lib$lib"
    fi
  fi
done
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"

if [ -n "${SYMPHONY_PREBUILT:-}" ]; then
  bin="$SYMPHONY_PREBUILT"
  [ -d "$bin/lib" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$PWD/$bin/lib"
  echo "== prebuilt binaries from $bin"
  tests=("$bin/gpu-exec-tests")
else
  echo "== build"
  cargo build --release 2>&1 | tail -1
  bin=target/release
  mapfile -t tests < <(cargo test --release -p symphony-gpu-exec --no-run --message-format=json 2>/dev/null |
    grep -o '"executable":"[^"]*"' | cut -d'"' -f4)
fi
symphony="$bin/symphony"

echo "== cuda tests (they print 'skipped: no CUDA driver' where there is none)"
for t in "${tests[@]}"; do
  "$t" cuda --nocapture --test-threads=1 2>&1 | tee -a "$out/cuda-tests.txt" | grep -E "^test |skipped|result|overlapped|panicked"
done

echo "== profiles ($backend)"
for model in mlp resnet; do
  "$symphony" profile --backend "$backend" --model "$model" --batch-max 64 --repeat 20 \
    --out "$out/profile-$model.csv" | tee "$out/profile-$model-fit.txt"
done

echo "== serve a short load through one $backend executor"
rate="${GPU_CHECK_RATE:-1}"
cat > "$out/serve.toml" <<TOML
listen = "127.0.0.1:7690"
shards = 2
gpus = 0
executor_token = "gpu-check"
[[models]]
name = "mlp"
profile = "table:profile-mlp.csv"
slo_ms = 20
[[models]]
name = "resnet"
profile = "table:profile-resnet.csv"
slo_ms = 50
TOML
mlp_rps=$(awk "BEGIN { print int(2000 * $rate) }")
resnet_rps=$(awk "BEGIN { print int(1000 * $rate) }")
cat > "$out/load.yaml" <<YAML
seed: 5
gpus: 1
models:
- {framework: "sleep#100,100,0,0", model: mlp, slo: 20, gap: exp, warmup: [{duration: 1, rps: $mlp_rps}], bench: [{duration: 10, rps: $mlp_rps}], cooldown: [{duration: 1, rps: $mlp_rps}]}
- {framework: "sleep#100,100,0,0", model: resnet, slo: 50, gap: exp, warmup: [{duration: 1, rps: $resnet_rps}], bench: [{duration: 10, rps: $resnet_rps}], cooldown: [{duration: 1, rps: $resnet_rps}]}
YAML
"$symphony" serve --config "$out/serve.toml" > "$out/serve.log" 2>&1 &
serve=$!
sleep 2
"$symphony" executor --scheduler 127.0.0.1:7690 --token gpu-check --gpus 1 --backend "$backend" \
  --profile-batch-max 64 > "$out/executor.log" 2>&1 &
executor=$!
for _ in $(seq 1 120); do grep -q "online" "$out/serve.log" && break; sleep 0.5; done
"$symphony" loadgen --target 127.0.0.1:7690 --workload "$out/load.yaml" \
  --input-bytes model --json "$out/loadgen.json" | tee "$out/loadgen.txt"
kill -INT "$executor" "$serve" 2>/dev/null || true
wait "$executor" "$serve" 2>/dev/null || true
cat "$out/executor.log"
echo "== done in $((SECONDS - started)) s: $out"
