#!/usr/bin/env bash
# The whole GPU check, on one machine with an NVIDIA GPU (under 5 minutes on an H100):
# builds, runs the cuda tests for real, profiles both networks on GPU 0, then serves a short
# load through one cuda executor. Prints every figure; writes them under ${OUT:-gpu-check-out}.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check-out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt" || true

echo "== build"
cargo build --release 2>&1 | tail -1

echo "== cuda tests (they print 'skipped: no CUDA driver' where there is none)"
cargo test --release -p symphony-gpu-exec cuda -- --nocapture 2>&1 | tee "$out/cuda-tests.txt" | grep -E "test |skipped|result"

echo "== profiles"
for model in mlp resnet; do
  ./target/release/symphony profile --backend cuda --model "$model" --batch-max 64 --repeat 20 \
    --out "$out/profile-$model.csv" | tee "$out/profile-$model-fit.txt"
done

echo "== serve a short load through one cuda executor"
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
cat > "$out/load.yaml" <<YAML
seed: 5
gpus: 1
models:
- {framework: "sleep#100,100,0,0", model: mlp, slo: 20, gap: exp, warmup: [{duration: 1, rps: 2000}], bench: [{duration: 10, rps: 2000}], cooldown: [{duration: 1, rps: 2000}]}
- {framework: "sleep#100,100,0,0", model: resnet, slo: 50, gap: exp, warmup: [{duration: 1, rps: 1000}], bench: [{duration: 10, rps: 1000}], cooldown: [{duration: 1, rps: 1000}]}
YAML
./target/release/symphony serve --config "$out/serve.toml" > "$out/serve.log" 2>&1 &
serve=$!
sleep 2
./target/release/symphony executor --scheduler 127.0.0.1:7690 --token gpu-check --gpus 1 --backend cuda \
  --profile-batch-max 64 > "$out/executor.log" 2>&1 &
executor=$!
for _ in $(seq 1 120); do grep -q "online" "$out/serve.log" && break; sleep 0.5; done
./target/release/symphony loadgen --target 127.0.0.1:7690 --workload "$out/load.yaml" \
  --input-bytes model --json "$out/loadgen.json" | tee "$out/loadgen.txt"
kill -INT "$executor" "$serve" 2>/dev/null || true
wait "$executor" "$serve" 2>/dev/null || true
cat "$out/executor.log"
echo "== done: $out"
