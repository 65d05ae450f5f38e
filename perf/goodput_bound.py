#!/usr/bin/env python3
"""An upper bound on the goodput any scheduler reaches with N identical models of Poisson
arrivals on G GPUs (the shipped resnet-*-poisson workloads: l(b) = 1.082 ms * b + 5.204 ms,
SLO 100 ms, the spec's delays), to tell where a goodput target is out of reach.

A batch's requests must all have arrived within W(b) = SLO - d_resp - d_ctrl - d_data * b -
l(b) of its first one (the first's deadline, less the time to start and run the batch).
Taking, from the first request not yet served, every request of the next W(b) is the most
any schedule can put in one batch, even one that knows the arrivals: with Poisson arrivals of
rate r that is 1 + r * W(b) requests on average, so the mean batch b* solves b = 1 + r * W(b)
(capped by the profile's largest batch). A request then costs at least l(b*) / b* of GPU time
(more when batch sizes vary: l(b) / b is convex), and serving 99 % of R req/s needs
0.99 * R * l(b*) / b* GPUs busy every moment. The bound is the largest R for which that is at
most G: it assumes perfect packing and no idle GPU, so real schedulers stay below it.

Whatever the arrivals (bursts included), no batch is larger than the largest b with
W(b) >= 0, so no GPU serves more than b / l(b) requests a second at that b: the second bound,
G * b / l(b) / 0.99, holds for the bursty workloads too.

Usage: perf/goodput_bound.py [--gpus G] [MODELS...]   (default: 8 GPUs; 1, 8 and 32 models)
"""

import argparse

SLOPE_MS, INTERCEPT_MS = 1.082, 5.204
SLO_MS, D_RESP_MS, D_CTRL_MS, D_DATA_MS = 100.0, 2.0, 0.1, 0.05
SERVED = 0.99


def latency_ms(b):
    return SLOPE_MS * b + INTERCEPT_MS


def window_ms(b):
    return SLO_MS - D_RESP_MS - D_CTRL_MS - D_DATA_MS * b - latency_ms(b)


def batch_max():
    """The profile's largest batch: its run fits the SLO (`Profile::parse_linear`)."""
    return int((SLO_MS - INTERCEPT_MS) / SLOPE_MS)


def mean_batch(rate_per_ms):
    """The largest real b with b <= 1 + r * W(b) (the right side falls as b grows)."""
    low, high = 1.0, float(batch_max())
    if high <= 1 + rate_per_ms * window_ms(high):
        return high
    for _ in range(100):
        mid = (low + high) / 2
        if mid <= 1 + rate_per_ms * max(window_ms(mid), 0.0):
            low = mid
        else:
            high = mid
    return low


def largest_batch():
    """The largest b whose requests can all arrive within their first one's deadline."""
    return max(b for b in range(1, batch_max() + 1) if window_ms(b) >= 0)


def any_arrivals_bound(gpus):
    b = largest_batch()
    return gpus * b / latency_ms(b) * 1000.0 / SERVED, b


def bound(models, gpus):
    low, high = 1.0, 1e6
    for _ in range(100):
        total = (low + high) / 2
        b = mean_batch(total / models / 1000.0)
        busy = SERVED * total * latency_ms(b) / b / 1000.0
        if busy <= gpus:
            low = total
        else:
            high = total
    return low, mean_batch(low / models / 1000.0)


def main():
    parser = argparse.ArgumentParser(
        description="An upper bound on any scheduler's goodput: N identical Poisson models of the "
        "shipped ResNet profile (1.082 ms x b + 5.204 ms, SLO 100 ms) on G GPUs, and one for any arrivals.")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs (default: 8)")
    parser.add_argument("models", type=int, nargs="*", default=[1, 8, 32],
                        help="model counts, one bound each (default: 1 8 32)")
    args = parser.parse_args()
    if args.gpus < 1 or any(m < 1 for m in args.models):
        parser.error("GPUs and model counts are at least 1")
    gpus = args.gpus
    print(f"goodput bound: N Poisson models of l(b) = {SLOPE_MS} ms * b + {INTERCEPT_MS} ms, SLO {SLO_MS:.0f} ms, "
          f"{gpus} GPUs, {SERVED:.0%} served, perfect packing")
    for models in args.models:
        total, b = bound(models, gpus)
        print(f"{models:>4} models: at most {total:,.0f} req/s (mean batch at most {b:.1f})")
    total, b = any_arrivals_bound(gpus)
    print(f"any arrivals, any number of models: at most {total:,.0f} req/s (no batch over {b})")


if __name__ == "__main__":
    main()
