//! The shipped workload files (`workloads/`, copies of `../shared/workloads`): each loads, and at half its
//! rates `symphony` runs it cleanly (the auditor passes) with a bad rate of at most 1 %.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use symphony_core::policy::{Knobs, PolicyKind};
use symphony_core::sim::SimConfig;
use symphony_core::workload::Workload;
use symphony_verify::{audit, simulate_bounded};

const WORKLOADS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../workloads");
const RATE_SCALE: f64 = 0.5;
const BAD_RATE_BOUND_PERCENT: f64 = 1.0;
const SIM_LIMIT: Duration = Duration::from_secs(120);

/// The shipped workload files, sorted.
fn workload_files() -> Option<Vec<PathBuf>> {
    let dir = Path::new(WORKLOADS_DIR);
    assert!(dir.is_dir(), "the repository ships {WORKLOADS_DIR}");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("the workloads directory is readable")
        .map(|entry| entry.expect("a readable entry").path())
        .filter(|path| matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{WORKLOADS_DIR} holds no workload files");
    Some(files)
}

fn name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[test]
fn every_shared_workload_loads() {
    let Some(files) = workload_files() else { return };
    let mut errors = Vec::new();
    for path in &files {
        match Workload::load(path) {
            Ok(workload) => {
                assert!(!workload.models.is_empty(), "{}: no models", name(path));
                assert!(
                    workload.total_bench_rps() > 0.0,
                    "{}: no load in the bench phase",
                    name(path)
                );
            }
            Err(error) => errors.push(format!("{}: {error}", name(path))),
        }
    }
    assert!(errors.is_empty(), "workloads that do not load:\n{}", errors.join("\n"));
}

#[test]
fn symphony_serves_every_shared_workload_at_half_rate() {
    let Some(files) = workload_files() else { return };
    let knobs = Knobs::default();
    let mut failures = Vec::new();
    for path in &files {
        let Ok(workload) = Workload::load(path) else {
            continue; // reported by `every_shared_workload_loads`
        };
        let config = SimConfig {
            rate_scale: RATE_SCALE,
            ..SimConfig::of(&workload, PolicyKind::Symphony)
        };
        let started = Instant::now();
        let report = match simulate_bounded(&workload, &config, SIM_LIMIT) {
            Ok(report) => report,
            Err(error) => {
                failures.push(format!("{}: {error}", name(path)));
                continue;
            }
        };
        let s = &report.summary;
        println!(
            "{}: {} bench requests, bad rate {:.3} % (worst model {:.3} %), {:.2} s",
            name(path),
            s.counts.total,
            s.bad_rate,
            s.bad_rate_worst,
            started.elapsed().as_secs_f64()
        );
        assert!(
            s.counts.total > 0,
            "{}: no bench requests at rate scale {RATE_SCALE}",
            name(path)
        );
        if let Err(violation) = audit(&report, &workload, &knobs) {
            failures.push(format!("{}: audit: {violation}", name(path)));
        }
        if s.bad_rate > BAD_RATE_BOUND_PERCENT {
            failures.push(format!(
                "{}: bad rate {:.3} % > {BAD_RATE_BOUND_PERCENT} % at rate scale {RATE_SCALE} \
                 (success {}, late {}, dropped {}, noreply {} of {}; worst model {:.3} %)",
                name(path),
                s.bad_rate,
                s.counts.success,
                s.counts.late,
                s.counts.dropped,
                s.counts.noreply,
                s.counts.total,
                s.bad_rate_worst
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "symphony at rate scale {RATE_SCALE}:\n{}",
        failures.join("\n")
    );
}
