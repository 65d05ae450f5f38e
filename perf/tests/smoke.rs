//! Smoke runs of the benchmarks, so they cannot rot: tiny sizes, checked for sense, not speed.

use std::path::Path;

use symphony_core::policy::{Knobs, PolicyKind};
use symphony_core::workload::Workload;
use symphony_perf::sweep::{self, Find, SweepSpec};
use symphony_perf::{plot, throughput};

fn workload() -> Workload {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workloads/resnet-8m-poisson.yaml");
    Workload::load(&path).unwrap()
}

/// A goodput search of `policies` on `w` with 2 GPUs, default knobs and exact times, no curves.
fn goodput_on_two_gpus(w: Workload, policies: Vec<PolicyKind>) -> SweepSpec {
    SweepSpec {
        workloads: vec![("resnet-8m-poisson.yaml".into(), w)],
        policies,
        find: Find::Goodput,
        gpu_count: Some(2),
        total_rps: None,
        seed: None,
        knobs: Knobs::default(),
        nexus_true_rates: false,
        exec: Default::default(),
        curve_points: 0,
        threads: 2,
        progress: false,
    }
}

#[test]
fn throughput_smoke_is_repeatable() {
    let w = workload();
    let a = throughput::measure(&w, PolicyKind::Symphony, 0.2, 8, 1);
    let b = throughput::measure(&w, PolicyKind::Symphony, 0.2, 8, 2);
    assert!(a.requests > 1000);
    assert_eq!(a.result_hash, b.result_hash, "the same work each time");
    assert!(a.loop_requests_per_s > 0.0 && a.loop_requests_per_s.is_finite());
}

#[test]
fn sweep_smoke_finds_goodput_and_gpus_and_draws() {
    let w = workload();
    let mut spec = SweepSpec {
        curve_points: 3,
        ..goodput_on_two_gpus(w, vec![PolicyKind::Symphony, PolicyKind::Clockwork])
    };
    let result = sweep::run(&spec);
    assert_eq!(result.cells.len(), 2);
    for cell in &result.cells {
        let goodput = cell.goodput_rps.unwrap();
        // Two GPUs of this model serve at most about 2 * 876 req/s.
        assert!(goodput > 300.0 && goodput < 1800.0, "{}: {goodput}", cell.policy);
        assert_eq!(cell.curve.len(), 3);
    }
    let table = sweep::table(&result, &spec.policies);
    assert!(table.contains("| resnet-8m-poisson |"), "{table}");
    let dir = std::env::temp_dir().join(format!("symphony-perf-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let plots = plot::draw(&result, &dir).unwrap();
    assert_eq!(plots.len(), 1);
    let _ = std::fs::remove_dir_all(&dir);

    spec.find = Find::Gpus;
    spec.total_rps = Some(1000.0);
    spec.curve_points = 0;
    let result = sweep::run(&spec);
    for cell in &result.cells {
        let gpus = cell.gpus_needed.unwrap();
        // 1000 req/s needs at least 2 of these GPUs, and 8 are plenty.
        assert!((2..=8).contains(&gpus), "{}: {gpus}", cell.policy);
    }
}

/// Every policy of a sweep meets the same execution times: with noise on every batch, the
/// policy that defers to the last moment with no slack loses goodput, and one that never
/// plans ahead (Triton's dynamic batcher) keeps most of it.
#[test]
fn a_sweep_gives_every_policy_the_same_noisy_times() {
    let mut spec = goodput_on_two_gpus(workload(), vec![PolicyKind::SymphonyRef, PolicyKind::Triton]);
    let exact = sweep::run(&spec);
    spec.exec.noise_sigma = 0.15;
    let noisy = sweep::run(&spec);
    let goodput = |result: &sweep::SweepResult, policy: &str| {
        result
            .cells
            .iter()
            .find(|c| c.policy == policy)
            .unwrap()
            .goodput_rps
            .unwrap_or(0.0)
    };
    let (ref_exact, ref_noisy) = (goodput(&exact, "symphony-ref"), goodput(&noisy, "symphony-ref"));
    let (triton_exact, triton_noisy) = (goodput(&exact, "triton"), goodput(&noisy, "triton"));
    println!("symphony-ref {ref_exact:.0} -> {ref_noisy:.0}, triton {triton_exact:.0} -> {triton_noisy:.0}");
    assert!(ref_noisy < 0.5 * ref_exact, "{ref_noisy} against {ref_exact}");
    assert!(
        triton_noisy > 0.7 * triton_exact,
        "{triton_noisy} against {triton_exact}"
    );
}
