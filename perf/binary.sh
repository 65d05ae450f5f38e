# Sourced by the perf scripts (after `cd` to the repository root): sets `bin` to the symphony
# binary: $SYMPHONY_PREBUILT/symphony when that is set (no build; its lib/ goes on
# LD_LIBRARY_PATH when there is one, as perf/gpu-bundle.sh lays it out), else a release
# build of this checkout.
if [ -n "${SYMPHONY_PREBUILT:-}" ]; then
  bin="$SYMPHONY_PREBUILT/symphony"
  if [ -d "$SYMPHONY_PREBUILT/lib" ]; then
    export LD_LIBRARY_PATH="$PWD/$SYMPHONY_PREBUILT/lib:${LD_LIBRARY_PATH:-}"
  fi
else
  bin=./target/release/symphony
  cargo build --release 2>&1 | tail -1
fi
