#!/usr/bin/env python3
"""Writes the two long, time-varying workloads of the autoscaling experiment.

    python3 perf/autoscale_workloads.py [TRACE_DIR] [OUT_DIR]

- workloads/autoscale/azure-hour-16m.yaml: the 16 models of mixed-16m (four classes, SLO 30 to 250 ms) whose
  rates follow the Azure LLM conversation trace's requests per minute over its hour
  (2023-11-16), each whole trace minute compressed to 10 s: 58 phases, 9 min 40 s measured.
- workloads/autoscale/diurnal-8m.yaml: the 8 ResNet-like models of resnet-8m, a day compressed to 10 minutes:
  the rate follows a cosine from 15 % of the peak at night to the peak at noon, 60 phases.

Arrivals inside a phase are Poisson (`gap: exp`). A two-minute warm-up at the first phase's
rate (every autoscaler settles there first, from its initial GPUs) and a 5 s cool-down at the
last one's frame the measured part. Deterministic: the same trace gives the same files.
"""
import collections
import math
import os
import sys

PHASES = 60
PHASE_S = 10
# Long enough for every autoscaler to settle at the first phase's load before the measurement.
WARMUP_S = 120


def per_minute(trace_csv):
    counts = collections.Counter()
    with open(trace_csv) as f:
        next(f)
        for line in f:
            stamp = line.split(",", 1)[0]
            counts[stamp[:16]] += 1  # YYYY-MM-DD HH:MM
    minutes = [counts[k] for k in sorted(counts)]
    # The trace's first and last minutes are partial: drop them, keep the 60 in between.
    full = minutes[1:-1]
    if len(full) < 30:
        sys.exit(f"{trace_csv}: {len(full)} whole minutes, need at least 30")
    return full


def model_line(framework, name, slo, rates):
    phases = ", ".join(f"{{duration: {PHASE_S}, rps: {r:.2f}}}" for r in rates)
    return (
        f"- {{framework: '{framework}', model: {name}, slo: {slo}, gap: exp,\n"
        f"   warmup: [{{duration: {WARMUP_S}, rps: {rates[0]:.2f}}}],\n"
        f"   bench: [{phases}],\n"
        f"   cooldown: [{{duration: 5, rps: {rates[-1]:.2f}}}]}}\n"
    )


def azure_hour(trace_dir):
    minutes = per_minute(os.path.join(trace_dir, "azure_llm_2023_conv.csv"))
    mean = sum(minutes) / len(minutes)
    classes = [
        ("sleep#150,700,0,0", "tiny", 30),
        ("sleep#400,2000,0,0", "small", 50),
        ("sleep#1082,5204,0,0", "resnet", 100),
        ("sleep#2500,12000,0,0", "large", 250),
    ]
    mean_rps = 200.0  # per model: 3,200 req/s over the hour, peak about 1.6 times that
    text = (
        "# 16 models in four classes (the profiles and SLOs of mixed-16m), Poisson arrivals whose\n"
        "# rate follows the Azure LLM conversation trace (traces/azure_llm_2023_conv.csv,\n"
        f"# 2023-11-16, requests per minute over its {len(minutes)} whole minutes), one trace minute per 10 s:\n"
        f"# {mean_rps * 16:.0f} req/s on average, {min(minutes) / mean * mean_rps * 16:.0f} to "
        f"{max(minutes) / mean * mean_rps * 16:.0f} by phase. Written by perf/autoscale_workloads.py.\n"
        "seed: 60\ngpus: 16\nmodels:\n"
    )
    for i in range(4):
        for framework, cls, slo in classes:
            rates = [mean_rps * m / mean for m in minutes]
            text += model_line(framework, f"{cls}_{i}", slo, rates)
    return text


def diurnal():
    peak_rps = 700.0  # per model: 5,600 req/s at noon, 840 at night
    rates = []
    for k in range(PHASES):
        t = (k + 0.5) / PHASES
        rates.append(peak_rps * (0.15 + 0.85 * (1 - math.cos(2 * math.pi * t)) / 2))
    text = (
        "# 8 ResNet-like models (l(b) = 1.082 ms * b + 5.204 ms, SLO 100 ms), Poisson arrivals, a\n"
        "# day compressed to 10 minutes: the rate follows a cosine from 15 % of the peak at night\n"
        f"# to the peak at noon, {peak_rps * 8:.0f} req/s in total, in 60 phases of 10 s.\n"
        "# Written by perf/autoscale_workloads.py.\n"
        "seed: 24\ngpus: 16\nmodels:\n"
    )
    for i in range(8):
        text += model_line("sleep#1082,5204,0,0", f"m{i}", 100, rates)
    return text


def main():
    trace_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "traces")
    out_dir = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "..", "workloads", "autoscale")
    for name, text in [("azure-hour-16m.yaml", azure_hour(trace_dir)), ("diurnal-8m.yaml", diurnal())]:
        with open(os.path.join(out_dir, name), "w") as f:
            f.write(text)
        print(os.path.join(out_dir, name))


if __name__ == "__main__":
    main()
