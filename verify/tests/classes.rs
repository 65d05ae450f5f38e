//! GPUs of different speeds (`gpu_classes`): the simulated GPUs run each batch at their
//! class's speed, and the deferred family plans each batch for the class of GPU it gets.

use std::path::Path;
use std::time::Duration;

use symphony_core::policy::{ClassPlanning, Knobs, PolicyKind};
use symphony_core::sim::{PlanStatus, SimConfig, SimReport};
use symphony_core::workload::Workload;
use symphony_verify::simulate_bounded;

fn shipped() -> Workload {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workloads/classes/resnet-8m-4fast-4slow.yaml");
    Workload::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn run(workload: &Workload, policy: PolicyKind, class_planning: ClassPlanning) -> SimReport {
    let config = SimConfig {
        knobs: Knobs {
            class_planning,
            ..Knobs::default()
        },
        ..SimConfig::of(workload, policy)
    };
    simulate_bounded(workload, &config, Duration::from_secs(60)).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn each_gpu_runs_every_batch_at_its_class_speed() {
    let workload = shipped();
    let factors = workload.gpu_factors();
    assert_eq!(factors, vec![1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 2.0]);
    for policy in [
        PolicyKind::Symphony,
        PolicyKind::Eager,
        PolicyKind::Triton,
        PolicyKind::Nexus,
    ] {
        let report = run(&workload, policy, ClassPlanning::PerClass);
        let mut on_slow = 0;
        for plan in report.plans.iter().filter(|p| p.status == PlanStatus::Done) {
            let profiled_ns = workload.models[plan.model as usize].profile.exec_ns(plan.batch_size);
            let factor = factors[plan.gpu as usize];
            let expected_ns = (profiled_ns as f64 * factor).ceil() as u64;
            assert_eq!(
                plan.finish_at_ns - plan.exec_at_ns,
                expected_ns,
                "{policy}: plan {} of {} on GPU {} (factor {factor})",
                plan.plan_id,
                plan.batch_size,
                plan.gpu
            );
            on_slow += u64::from(factor > 1.0);
        }
        assert!(on_slow > 0, "{policy}: the slow GPUs ran nothing");
    }
}

#[test]
fn planning_for_the_gpu_a_batch_gets_keeps_it_in_time_where_one_profile_does_not() {
    let workload = shipped();
    let bad = |planning| run(&workload, PolicyKind::Symphony, planning).summary.bad_rate;
    let per_class = bad(ClassPlanning::PerClass);
    let as_profiled = bad(ClassPlanning::AsProfiled);
    let slowest = bad(ClassPlanning::Slowest);
    assert!(
        per_class <= 1.0 && as_profiled >= 10.0 && slowest >= 5.0,
        "bad rate: per class {per_class:.3} %, every GPU as profiled {as_profiled:.3} %, every GPU as the slowest {slowest:.3} %"
    );
    // Eager dispatch and the reference configuration gain too (the reference is past its
    // goodput at this load either way).
    for (policy, bound) in [(PolicyKind::Eager, 1.0), (PolicyKind::SymphonyRef, 10.0)] {
        let per_class = run(&workload, policy, ClassPlanning::PerClass).summary.bad_rate;
        let as_profiled = run(&workload, policy, ClassPlanning::AsProfiled).summary.bad_rate;
        assert!(
            per_class <= bound && 2.0 * per_class < as_profiled,
            "{policy}: per class {per_class:.3} %, as profiled {as_profiled:.3} %"
        );
    }
}

#[test]
fn one_class_plans_exactly_as_no_classes() {
    let workload = shipped();
    let mut plain = workload.clone();
    plain.gpu_classes.clear();
    let mut one_class = workload.clone();
    for class in &mut one_class.gpu_classes {
        class.speed = 1.0;
    }
    for policy in [PolicyKind::Symphony, PolicyKind::SymphonyRef, PolicyKind::Triton] {
        let a = run(&plain, policy, ClassPlanning::PerClass).summary;
        let b = run(&one_class, policy, ClassPlanning::PerClass).summary;
        assert_eq!(a, b, "{policy}");
    }
}

#[test]
fn a_cluster_of_one_slow_class_is_planned_at_its_speed() {
    // Every GPU at half speed: one class, planned with its own factor, not the profile's.
    let mut workload = shipped();
    workload.gpu_classes = vec![symphony_core::workload::GpuClass {
        name: "slow".into(),
        count: 8,
        speed: 0.5,
    }];
    let config = |class_planning| SimConfig {
        rate_scale: 0.6,
        knobs: Knobs {
            class_planning,
            ..Knobs::default()
        },
        ..SimConfig::of(&workload, PolicyKind::Symphony)
    };
    let summary = |planning| {
        simulate_bounded(&workload, &config(planning), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"))
            .summary
    };
    let per_class = summary(ClassPlanning::PerClass);
    let as_profiled = summary(ClassPlanning::AsProfiled).bad_rate;
    assert!(
        per_class.bad_rate <= 1.0 && as_profiled >= 5.0,
        "bad rate: per class {:.3} %, as profiled {as_profiled:.3} %",
        per_class.bad_rate
    );
    // One class is the slowest: its windows and its grants are planned alike.
    assert_eq!(per_class, summary(ClassPlanning::Slowest));
}
