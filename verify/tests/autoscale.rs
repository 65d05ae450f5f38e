//! The simulator's autoscaler (`symphony_core::autoscale`): GPUs that come and go with the
//! load, as a user of `symphony sim --autoscale` and `symphony autoscale` relies on them.

use std::path::Path;
use std::time::Duration;

use symphony_core::autoscale::{Autoscale, Signal};
use symphony_core::policy::PolicyKind;
use symphony_core::sim::{GpuSpan, Outcome, PlanStatus, SimConfig, SimReport};
use symphony_core::workload::Workload;
use symphony_verify::simulate_bounded;

const S: u64 = 1_000_000_000;
const SLOTS: u32 = 12;

/// Four ResNet-like models: a minute low, a ramp over 40 s to six times the rate, a minute
/// there, a minute low again.
const WORKLOAD: &str = "\
seed: 0xa5ca1e
gpus: 12
models:
- {framework: 'sleep#1082,5204,0,0', model: m0, slo: 100, gap: exp, warmup: [{duration: 30, rps: 100}],
   bench: [{duration: 60, rps: 100}, {duration: 10, rps: 200}, {duration: 10, rps: 300}, {duration: 10, rps: 400}, {duration: 10, rps: 500}, {duration: 60, rps: 600}, {duration: 60, rps: 100}], cooldown: [{duration: 1, rps: 100}]}
- {framework: 'sleep#1082,5204,0,0', model: m1, slo: 100, gap: exp, warmup: [{duration: 30, rps: 100}],
   bench: [{duration: 60, rps: 100}, {duration: 10, rps: 200}, {duration: 10, rps: 300}, {duration: 10, rps: 400}, {duration: 10, rps: 500}, {duration: 60, rps: 600}, {duration: 60, rps: 100}], cooldown: [{duration: 1, rps: 100}]}
- {framework: 'sleep#1082,5204,0,0', model: m2, slo: 100, gap: exp, warmup: [{duration: 30, rps: 100}],
   bench: [{duration: 60, rps: 100}, {duration: 10, rps: 200}, {duration: 10, rps: 300}, {duration: 10, rps: 400}, {duration: 10, rps: 500}, {duration: 60, rps: 600}, {duration: 60, rps: 100}], cooldown: [{duration: 1, rps: 100}]}
- {framework: 'sleep#1082,5204,0,0', model: m3, slo: 100, gap: exp, warmup: [{duration: 30, rps: 100}],
   bench: [{duration: 60, rps: 100}, {duration: 10, rps: 200}, {duration: 10, rps: 300}, {duration: 10, rps: 400}, {duration: 10, rps: 500}, {duration: 60, rps: 600}, {duration: 60, rps: 100}], cooldown: [{duration: 1, rps: 100}]}
";

fn workload() -> Workload {
    Workload::parse(WORKLOAD, Path::new("."), "autoscale.yaml").expect("the test workload parses")
}

/// A quick autoscaler: 10 s start-up, a reading every 5 s, 20 s scale-down stabilization.
fn quick(signal: Signal) -> Autoscale {
    Autoscale {
        initial_gpus: 2,
        startup_ns: 10 * S,
        leave_after_ns: 20 * S,
        interval_ns: 5 * S,
        window_ns: 10 * S,
        ..Autoscale::new(signal)
    }
}

fn run(policy: PolicyKind, autoscale: Option<Autoscale>) -> SimReport {
    let workload = workload();
    let config = SimConfig {
        gpu_count: SLOTS,
        autoscale,
        ..SimConfig::of(&workload, policy)
    };
    simulate_bounded(&workload, &config, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

fn within(spans: &[GpuSpan], gpu: u32, from_ns: u64, to_ns: u64) -> bool {
    spans
        .iter()
        .any(|s| s.gpu == gpu && s.from_ns <= from_ns && to_ns <= s.to_ns)
}

/// Mean GPUs paid for over `[from_s, to_s)` of the run.
fn paid(report: &SimReport, from_s: usize, to_s: usize) -> f64 {
    let seconds = &report.timeline[from_s..to_s];
    seconds.iter().map(|s| s.paid_gpus).sum::<f64>() / seconds.len() as f64
}

#[test]
fn no_batch_runs_on_a_gpu_that_is_not_there_and_every_request_is_answered() {
    let runs = [
        (PolicyKind::Symphony, Signal::Desired),
        (PolicyKind::SymphonyRef, Signal::Desired),
        (PolicyKind::Eager, Signal::Utilization),
        (PolicyKind::Triton, Signal::Utilization),
    ];
    for (policy, signal) in runs {
        let report = run(policy, Some(quick(signal)));
        let a = report.summary.autoscale.as_ref().expect("an autoscaled run says so");
        assert!(a.started > 0 && a.drained > 0, "{policy}:{signal}: {a:?}");
        for plan in report.plans.iter().filter(|p| p.status == PlanStatus::Done) {
            assert!(
                within(&report.gpu_available, plan.gpu, plan.emitted_ns, plan.emitted_ns),
                "{policy}:{signal}: plan {} went to GPU {} at {} ns, when the policy could not plan on it",
                plan.plan_id,
                plan.gpu,
                plan.emitted_ns
            );
            assert!(
                within(&report.gpu_present, plan.gpu, plan.exec_at_ns, plan.finish_at_ns),
                "{policy}:{signal}: plan {} ran on GPU {} over [{}, {}) ns, when it was not there",
                plan.plan_id,
                plan.gpu,
                plan.exec_at_ns,
                plan.finish_at_ns
            );
        }
        let unanswered = report.requests.iter().filter(|r| r.outcome == Outcome::NoReply).count();
        assert_eq!(unanswered, 0, "{policy}:{signal}: requests left without a reply");
        // Paid for from the ask: a GPU that came up after the start was paid while starting.
        let present_s: f64 = report
            .gpu_present
            .iter()
            .map(|s| (s.to_ns.min(report.timeline.len() as u64 * S) - s.from_ns) as f64 / 1e9)
            .sum();
        let paid_s: f64 = report.timeline.iter().map(|s| s.paid_gpus).sum();
        assert!(
            paid_s > present_s,
            "{policy}:{signal}: paid {paid_s:.1} GPU-s, present {present_s:.1}"
        );
    }
}

#[test]
fn the_gpus_follow_the_load_up_and_down() {
    for (policy, signal) in [
        (PolicyKind::Symphony, Signal::Desired),
        (PolicyKind::Symphony, Signal::Utilization),
    ] {
        let report = run(policy, Some(quick(signal)));
        // Seconds: warm-up 0-30, low 30-90, ramp 90-130, high 130-190, low 190-250.
        let low = paid(&report, 60, 90);
        let high = paid(&report, 160, 190);
        let low_again = paid(&report, 230, 250);
        assert!(
            high >= 2.0 * low && low_again <= 0.6 * high,
            "{policy}:{signal}: mean GPUs paid low {low:.2}, high {high:.2}, low again {low_again:.2}"
        );
        assert!(
            report.summary.bad_rate <= 1.0,
            "{policy}:{signal}: bad rate {:.3} %",
            report.summary.bad_rate
        );
    }
}

/// The paper's second claim in miniature: with its own signal, deferral pays for far fewer
/// GPU-hours than eager dispatch scaled on utilization, both within the 1 % bound.
#[test]
fn our_signal_pays_for_fewer_gpu_hours_than_eager_dispatch_scaled_on_utilization() {
    let ours = run(PolicyKind::Symphony, Some(quick(Signal::Desired))).summary;
    let usual = run(PolicyKind::Eager, Some(quick(Signal::Utilization))).summary;
    assert!(
        ours.bad_rate <= 1.0 && usual.bad_rate <= 1.0,
        "bad rates {:.3} % and {:.3} %",
        ours.bad_rate,
        usual.bad_rate
    );
    assert!(
        ours.gpu_paid_s < 0.75 * usual.gpu_paid_s,
        "symphony:desired paid {:.0} GPU-s, eager:utilization {:.0}",
        ours.gpu_paid_s,
        usual.gpu_paid_s
    );
}

#[test]
fn a_fixed_cluster_pays_for_every_gpu_and_its_timeline_adds_up() {
    let report = run(PolicyKind::Symphony, None);
    let s = &report.summary;
    assert!(s.autoscale.is_none() && report.gpu_present.is_empty());
    let bench_s = workload().bench_s();
    assert!(
        (s.gpu_paid_s - f64::from(SLOTS) * bench_s).abs() < 1e-6,
        "paid {} GPU-s",
        s.gpu_paid_s
    );
    assert_eq!(s.gpus_paid_peak, SLOTS);
    let arrivals: u64 = report.timeline.iter().map(|t| t.arrivals).sum();
    assert_eq!(arrivals, report.requests.len() as u64, "every arrival in its second");
    // Busy seconds by the timeline over the bench phase = the summary's (same plans).
    let busy: f64 = report.timeline[30..250].iter().map(|t| t.busy_gpus).sum();
    assert!(
        (busy - s.gpu_busy_s).abs() < 1e-6 * s.gpu_busy_s.max(1.0),
        "timeline {busy} GPU-s busy, summary {}",
        s.gpu_busy_s
    );
}
