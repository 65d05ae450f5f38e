//! `symphony stress` drives the real shard cores: every injected request is answered, across
//! shards too, and a run's report adds up.

use std::time::Duration;

use symphony_core::policy::PolicyKind;
use symphony_perf::stress::{self, StressConfig};

fn config(shards: usize, rate_rps: f64) -> StressConfig {
    StressConfig {
        shards,
        models: 100,
        gpus: 64,
        rate_rps,
        duration: Duration::from_millis(500),
        // Eager dispatch: a loaded test machine's late wake-ups drop nothing (what is tested
        // is that every injection reaches a shard core and is answered).
        policy: PolicyKind::Eager,
        ..StressConfig::front_door(shards, rate_rps)
    }
}

#[test]
fn every_injected_request_is_answered_on_one_shard_and_across_two() {
    for shards in [1, 2] {
        let report = stress::run(&config(shards, 4_000.0)).unwrap();
        // 4,000 req/s for half a second, in evenly spaced arrivals.
        assert!(
            (1_990..=2_000).contains(&report.injected),
            "{shards} shards: {} injected",
            report.injected
        );
        assert_eq!(report.replies, report.injected, "{shards} shards: one reply each");
        assert!(
            report.ok * 10 >= report.injected * 9,
            "{shards} shards: {} of {} OK",
            report.ok,
            report.injected
        );
        assert!(report.busy > Duration::ZERO && report.us_per_request() > 0.0);
    }
}

#[test]
fn a_run_that_falls_behind_does_not_hold() {
    // Far past what one core takes: injections fall behind by more than the limit.
    let report = stress::run(&StressConfig {
        duration: Duration::from_millis(300),
        ..config(1, 20_000_000.0)
    })
    .unwrap();
    assert!(report.late_max > stress::LATE_LIMIT, "late by {:?}", report.late_max);
    assert!(!report.holds());
}
