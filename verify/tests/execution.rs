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

/// The H200's error as the issue measured it, modelled: every batch 1.4 times its profile, a
/// batch after 2 ms of idling 1.93 times more (2.7 in all), 10 % noise.
fn h200() -> ExecModel {
    ExecModel {
        scale: 1.4,
        cold_factor: 1.93,
        cold_gap_ns: 2_000_000,
        noise_sigma: 0.1,
        ..ExecModel::default()
    }
}

fn tight(exec: ExecModel, correction: bool, correction_idle: bool) -> SimReport {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workloads/exec/tight-8m.yaml");
    let workload = Workload::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let config = SimConfig {
        exec,
        rate_scale: 0.4,
        knobs: Knobs {
            correction,
            correction_idle,
            ..Knobs::default()
        },
        ..SimConfig::of(&workload, PolicyKind::Symphony)
    };
    simulate_bounded(&workload, &config, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn correcting_by_the_idle_gap_keeps_cold_starts_in_time_where_the_range_p99_does_not() {
    // Tight SLOs (25 and 50 ms), 1,600 req/s on 8 GPUs: light enough that GPUs idle.
    let fixed = tight(h200(), false, false).summary.bad_rate;
    let by_range = tight(h200(), true, false).summary.bad_rate;
    let by_idle = tight(h200(), false, true);
    assert!(
        by_idle.summary.bad_rate <= 1.0 && fixed >= 10.0 && by_range >= 10.0,
        "bad rate: start-up profile {fixed:.3} %, corrected by batch size {by_range:.3} %, by idle gap {:.3} %",
        by_idle.summary.bad_rate
    );
    // What it corrected is reported: warm batches near 1.4, cold ones near 2.7 (noise on top).
    let c = &by_idle.corrections[0];
    assert!(c.measured > 100 && c.updates >= 1, "{c:?}");
    assert!(c.factor_min < 2.0 && c.factor_max > 2.5, "{c:?}");
    // Where batches run exactly their profile it changes nothing.
    assert_eq!(
        tight(ExecModel::default(), false, true).summary,
        tight(ExecModel::default(), false, false).summary
    );
}
