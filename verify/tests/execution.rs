//! Batches that do not run exactly their profile (the simulator's `ExecModel`), and the
//! deferred family's online correction of its profiles from measured batch times.

use std::path::Path;
use std::time::Duration;

use symphony_core::policy::{Knobs, PolicyKind};
use symphony_core::sim::{ExecModel, PlanStatus, SimConfig, SimReport};
use symphony_core::workload::Workload;
use symphony_verify::simulate_bounded;

/// Two models on two GPUs at a load that keeps the GPUs busy part of the time.
const WORKLOAD: &str = "\
seed: 0x5eed
gpus: 2
models:
- framework: sleep#1082,5204,0,0
  model: resnet
  slo: 100
  gap: exp
  warmup: [{duration: 0.3, rps: 300}]
  bench: [{duration: 2, rps: 300}]
  cooldown: [{duration: 0.3, rps: 300}]
- framework: sleep#400,2000,0,0
  model: small
  slo: 50
  gap: exp
  warmup: [{duration: 0.3, rps: 400}]
  bench: [{duration: 2, rps: 400}]
  cooldown: [{duration: 0.3, rps: 400}]
";

fn workload() -> Workload {
    Workload::parse(WORKLOAD, Path::new("."), "execution.yaml").expect("the test workload parses")
}

fn run(policy: PolicyKind, exec: ExecModel, correction: bool) -> SimReport {
    let workload = workload();
    let config = SimConfig {
        exec,
        knobs: Knobs {
            correction,
            ..Knobs::default()
        },
        ..SimConfig::of(&workload, policy)
    };
    simulate_bounded(&workload, &config, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"))
}

/// Batches `factor` times their profile after their GPU idled `gap_ns`.
fn cold(factor: f64, gap_ns: u64) -> ExecModel {
    ExecModel {
        cold_factor: factor,
        cold_gap_ns: gap_ns,
        ..ExecModel::default()
    }
}

/// Each finished plan's (batch size, ratio of its run time to its profile's).
fn ratios(report: &SimReport) -> Vec<(u32, f64)> {
    let models = symphony_core::sim::model_configs(&workload());
    report
        .plans
        .iter()
        .filter(|p| p.status == PlanStatus::Done)
        .map(|p| {
            let planned = models[p.model as usize].profile.exec_ns(p.batch_size);
            (p.batch_size, (p.finish_at_ns - p.exec_at_ns) as f64 / planned as f64)
        })
        .collect()
}

#[test]
fn batches_run_their_profile_exactly_by_default() {
    let report = run(PolicyKind::Symphony, ExecModel::default(), false);
    let measured = ratios(&report);
    assert!(measured.len() > 100);
    assert!(
        measured.iter().all(|&(_, r)| r == 1.0),
        "every batch takes its profile's time"
    );
}

#[test]
fn a_cold_start_slows_the_batches_after_an_idle_gap_and_noise_is_seeded() {
    let report = run(PolicyKind::Eager, cold(2.0, 1_000_000), false);
    let measured = ratios(&report);
    let slowed = measured.iter().filter(|&&(_, r)| (r - 2.0).abs() < 1e-6).count();
    let exact = measured.iter().filter(|&&(_, r)| (r - 1.0).abs() < 1e-6).count();
    // At this load a GPU often idles over 1 ms between batches, and sometimes runs one
    // right after another: both kinds, and nothing else.
    assert!(slowed > 0 && exact > 0, "{slowed} cold, {exact} warm");
    assert_eq!(slowed + exact, measured.len());

    let noisy = ExecModel {
        noise_sigma: 0.1,
        ..ExecModel::default()
    };
    let a = ratios(&run(PolicyKind::Eager, noisy, false));
    let b = ratios(&run(PolicyKind::Eager, noisy, false));
    assert_eq!(a, b, "the same seed, the same noise");
    let mut sorted: Vec<f64> = a.iter().map(|&(_, r)| r).collect();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    assert!((0.95..1.05).contains(&median), "median ratio {median}");
    assert!(sorted[sorted.len() * 99 / 100] > 1.15, "a tail above the profile");
}

#[test]
fn correction_changes_nothing_while_batches_run_their_profile() {
    for policy in [PolicyKind::Symphony, PolicyKind::SymphonyRef, PolicyKind::Eager] {
        let plain = run(policy, ExecModel::default(), false);
        let corrected = run(policy, ExecModel::default(), true);
        assert_eq!(plain.summary, corrected.summary, "{policy}");
        assert!(plain.corrections.is_empty());
        assert_eq!(corrected.corrections.len(), 2, "{policy}: one per model");
        assert!(corrected.corrections.iter().all(|c| c.updates == 0 && c.measured > 0));
    }
}

#[test]
fn correction_follows_gpus_slower_than_their_profile() {
    // Every batch runs 2.5 times its profile (a gap of 0: always "cold").
    let slower = cold(2.5, 0);
    let plain = run(PolicyKind::Symphony, slower, false);
    let corrected = run(PolicyKind::Symphony, slower, true);
    for c in &corrected.corrections {
        assert!(c.updates >= 1, "{c:?}");
        assert!(
            (c.factor_min - 2.5).abs() < 0.01 && (c.factor_max - 2.5).abs() < 0.01,
            "{c:?}"
        );
    }
    // Planned with the true times, fewer requests end late.
    let (late_plain, late_corrected) = (plain.summary.counts.late, corrected.summary.counts.late);
    println!(
        "late: {late_plain} with the start-up profile, {late_corrected} corrected; bad {:.2} % and {:.2} %",
        plain.summary.bad_rate, corrected.summary.bad_rate
    );
    assert!(late_corrected < late_plain, "{late_corrected} against {late_plain}");
    assert!(corrected.summary.bad_rate < plain.summary.bad_rate / 2.0);
}
