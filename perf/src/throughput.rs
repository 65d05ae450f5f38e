//! The simulator's own speed: simulated requests per second of wall time on one core.
//!
//! Arrival generation is timed apart from the event loop, so the figure is the scheduler and
//! the fake GPUs, not the random number generator.

use std::time::Instant;

use serde::Serialize;
use symphony_core::policy::PolicyKind;
use symphony_core::sim::{simulate_with, SimConfig};
use symphony_core::workload::Workload;

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    pub policy: String,
    pub requests: u64,
    pub rate_scale: f64,
    pub gpu_count: u32,
    pub repeats: u32,
    pub generate_s: f64,
    /// The best of `repeats` runs of the whole simulation (generation included).
    pub simulate_s: f64,
    /// Requests per second of the event loop alone: requests / (simulate - generate).
    pub loop_requests_per_s: f64,
    /// Requests per second including arrival generation.
    pub total_requests_per_s: f64,
    pub bad_rate: f64,
    /// A hash of the summary, to see that repeated runs did the same work.
    pub result_hash: u64,
}

/// Times `repeats` simulations of `workload` under `policy` and keeps the fastest.
pub fn measure(workload: &Workload, policy: PolicyKind, rate_scale: f64, gpu_count: u32, repeats: u32) -> Throughput {
    assert!(repeats > 0);
    let mut config = SimConfig::of(workload, policy);
    config.rate_scale = rate_scale;
    config.gpu_count = gpu_count;
    let mut arrivals = Vec::new();
    let mut generate_s = f64::MAX;
    let mut simulate_s = f64::MAX;
    let mut summary = None;
    for _ in 0..repeats {
        let start = Instant::now();
        workload.generate_arrivals(rate_scale, config.seed, &mut arrivals);
        generate_s = generate_s.min(start.elapsed().as_secs_f64());
        let start = Instant::now();
        let report = simulate_with(workload, &config, &mut arrivals);
        simulate_s = simulate_s.min(start.elapsed().as_secs_f64());
        summary = Some(report.summary);
    }
    let summary = summary.expect("repeats > 0");
    let requests = arrivals.len() as u64;
    let json = serde_json::to_string(&summary).expect("summaries serialize");
    let result_hash = json.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let loop_s = (simulate_s - generate_s).max(1e-9);
    Throughput {
        policy: policy.name().to_string(),
        requests,
        rate_scale,
        gpu_count,
        repeats,
        generate_s,
        simulate_s,
        loop_requests_per_s: requests as f64 / loop_s,
        total_requests_per_s: requests as f64 / simulate_s,
        bad_rate: summary.bad_rate,
        result_hash,
    }
}
