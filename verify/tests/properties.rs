//! Property tests over whole simulations: random small workloads, written as workload YAML the
//! way a user would, run through every policy; every run must pass the auditor. And at light
//! load, `symphony` serves nearly everything in time, far more reliably than the reference
//! configuration (deferral alone drops requests when models' deferred batches collide on
//! few GPUs).

use std::path::Path;

use proptest::prelude::*;
use std::time::Duration;
use symphony_core::policy::{Knobs, PolicyKind};
use symphony_core::profile::Profile;

use symphony_core::sim::{Outcome, PlanStatus, SimConfig, SimReport};
use symphony_core::workload::Workload;
use symphony_verify::{audit, simulate_bounded};

/// One model of a generated workload.
#[derive(Debug, Clone)]
struct ModelGen {
    slope_us: u32,
    intercept_us: u32,
    slo_ms: u32,
    gap: &'static str,
    /// This model's share of the load, relative to the others.
    weight: f64,
}

/// A generated workload: its models, GPUs, target load and seed.
#[derive(Debug, Clone)]
struct WorkloadGen {
    models: Vec<ModelGen>,
    gpus: u32,
    /// Offered demand as a fraction of the GPUs' peak throughput (1.0: exactly full).
    load: f64,
    seed: u64,
}

const RPS_MIN: f64 = 10.0;
/// Keeps one case's simulations short: at most 6 * 4000 rps over 1.6 s.
const RPS_MAX: f64 = 4000.0;

fn profile_text(m: &ModelGen) -> String {
    format!("sleep#{},{},0,0", m.slope_us, m.intercept_us)
}

/// One GPU's best throughput for this model, requests per second, batches within the SLO.
fn peak_rps(profile: &Profile, slo_ns: u64) -> f64 {
    profile.peak_throughput_rps(slo_ns).0
}

impl WorkloadGen {
    /// The workload as YAML text, each model's rps set so that the demand is `load` of the
    /// GPUs' peak throughput, split by weight (clamped to `RPS_MIN..=RPS_MAX`).
    fn yaml(&self) -> String {
        let weight_sum: f64 = self.models.iter().map(|m| m.weight).sum();
        let mut text = format!("seed: {}\ngpus: {}\nmodels:\n", self.seed, self.gpus);
        for (index, m) in self.models.iter().enumerate() {
            let slo_ns = u64::from(m.slo_ms) * 1_000_000;
            let profile = Profile::parse_linear(&profile_text(m), slo_ns).expect("valid profile");
            let share = m.weight / weight_sum;
            let rps = (self.load * f64::from(self.gpus) * share * peak_rps(&profile, slo_ns)).clamp(RPS_MIN, RPS_MAX);
            text.push_str(&format!(
                "- framework: \"{}\"\n  model: m{index}\n  slo: {}\n  gap: \"{}\"\n  \
                 warmup: [{{duration: 0.3, rps: {rps:.4}}}]\n  \
                 bench: [{{duration: 1, rps: {rps:.4}}}]\n  \
                 cooldown: [{{duration: 0.3, rps: {rps:.4}}}]\n",
                profile_text(m),
                m.slo_ms,
                m.gap
            ));
        }
        text
    }

    fn workload(&self) -> Workload {
        let yaml = self.yaml();
        Workload::parse(&yaml, Path::new("."), "generated.yaml")
            .unwrap_or_else(|e| panic!("generated workload does not parse: {e}\n{yaml}"))
    }
}

/// Offered bench demand over the GPUs' peak throughput (1.0: every GPU busy at its best batch).
fn demand_fraction(workload: &Workload, rate_scale: f64) -> f64 {
    let gpu_units: f64 = workload
        .models
        .iter()
        .map(|m| m.phases.bench_mean_rps() * rate_scale / peak_rps(&m.profile, m.slo_ns))
        .sum();
    gpu_units / f64::from(workload.gpu_count)
}

fn model_gen() -> impl Strategy<Value = ModelGen> {
    (
        200u32..=2000,
        1000u32..=8000,
        30u32..=200,
        prop::sample::select(vec!["const", "exp", "gamma:0.1", "gamma:2"]),
        0.1f64..1.0,
    )
        .prop_map(|(slope_us, intercept_us, slo_ms, gap, weight)| ModelGen {
            slope_us,
            intercept_us,
            slo_ms,
            gap,
            weight,
        })
}

fn workload_gen(load: std::ops::Range<f64>) -> impl Strategy<Value = WorkloadGen> {
    (prop::collection::vec(model_gen(), 1..=6), 1u32..=8, load, any::<u64>()).prop_map(|(models, gpus, load, seed)| {
        WorkloadGen {
            models,
            gpus,
            load,
            seed,
        }
    })
}

fn all_policies() -> Vec<PolicyKind> {
    PolicyKind::NAMES
        .iter()
        .map(|name| name.parse().expect("every listed name parses"))
        .collect()
}

/// Far more than any of these runs needs (they take milliseconds); a policy that livelocks fails.
const SIM_LIMIT: Duration = Duration::from_secs(20);

fn try_run(workload: &Workload, policy: PolicyKind, rate_scale: f64) -> Result<SimReport, String> {
    let config = SimConfig {
        rate_scale,
        ..SimConfig::of(workload, policy)
    };
    simulate_bounded(workload, &config, SIM_LIMIT)
}

fn run(workload: &Workload, policy: PolicyKind, rate_scale: f64) -> SimReport {
    try_run(workload, policy, rate_scale).unwrap_or_else(|e| panic!("{e}"))
}

proptest! {
    #![proptest_config(ProptestConfig {
        // `PROPTEST_CASES=N` runs more (or fewer) cases than the default 32.
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32),
        max_shrink_iters: 256,
        max_shrink_time: 60_000,
        failure_persistence: None,
        // Fixed, so CI is reproducible; `PROPTEST_RNG_SEED=N` explores other cases.
        rng_seed: proptest::test_runner::RngSeed::Fixed(
            std::env::var("PROPTEST_RNG_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(0x5eed_0001),
        ),
        ..ProptestConfig::default()
    })]

    /// From light load to twice what the GPUs can do, every policy keeps every rule.
    #[test]
    fn every_policy_passes_the_audit(spec in workload_gen(0.05..2.0)) {
        let workload = spec.workload();
        let knobs = Knobs::default();
        for policy in all_policies() {
            let report = try_run(&workload, policy, 1.0)
                .map_err(|e| TestCaseError::fail(format!("{e}\nworkload:\n{}", spec.yaml())))?;
            prop_assert!(!report.requests.is_empty());
            // "A request is never silently lost": every one is answered by the end of the run.
            let unanswered = report.requests.iter().filter(|r| r.outcome == Outcome::NoReply).count();
            prop_assert!(
                unanswered == 0,
                "policy {policy}: {unanswered} of {} requests never answered\nworkload:\n{}",
                report.requests.len(),
                spec.yaml()
            );
            if let Err(violation) = audit(&report, &workload, &knobs) {
                prop_assert!(
                    false,
                    "policy {policy}, load {:.2}: {violation}\nworkload:\n{}",
                    demand_fraction(&workload, 1.0),
                    spec.yaml()
                );
            }
        }
    }
}

/// Regression: two identical ResNet-like models on one GPU at about 21 % of its capacity.
/// Both defer their batches to their latest start; when the two windows fall together the
/// GPU serves one and the other's heads are dropped, while `eager`, `clockwork` and `triton`
/// serve every request of this very run.
#[test]
fn symphony_serves_two_light_models_on_one_gpu() {
    let yaml = "seed: 2\ngpus: 1\nmodels:\n\
        - {framework: \"sleep#1000,5000,0,0\", model: a, slo: 100, gap: exp,\n   \
           warmup: [{duration: 0.3, rps: 100}], bench: [{duration: 1, rps: 100}], cooldown: [{duration: 0.3, rps: 100}]}\n\
        - {framework: \"sleep#1000,5000,0,0\", model: b, slo: 100, gap: exp,\n   \
           warmup: [{duration: 0.3, rps: 100}], bench: [{duration: 1, rps: 100}], cooldown: [{duration: 0.3, rps: 100}]}\n";
    let workload = Workload::parse(yaml, Path::new("."), "two-light-models.yaml").expect("parses");
    assert!(demand_fraction(&workload, 1.0) < 0.3);
    let eager = run(&workload, PolicyKind::Eager, 1.0);
    assert_eq!(
        eager.summary.counts.success, eager.summary.counts.total,
        "eager serves everything here"
    );
    let report = run(&workload, PolicyKind::Symphony, 1.0);
    audit(&report, &workload, &Knobs::default()).expect("audit");
    let s = &report.summary;
    assert!(
        s.bad_rate <= 1.0,
        "symphony: bad rate {:.2} % at {:.0} % of one GPU (success {}, dropped {}, late {} of {})",
        s.bad_rate,
        100.0 * demand_fraction(&workload, 1.0),
        s.counts.success,
        s.counts.dropped,
        s.counts.late,
        s.counts.total
    );
}

/// Regression: a light three-model run on one GPU that once livelocked `symphony` inside one
/// timer event (the hand-off kept re-granting a candidate that went straight back to waiting).
#[test]
fn symphony_finishes_a_light_three_model_run() {
    let yaml = "seed: 14025590181829015225\ngpus: 1\nmodels:\n\
        - {framework: \"sleep#1291,3998,0,0\", model: m0, slo: 71, gap: \"gamma:0.1\",\n   \
           warmup: [{duration: 0.3, rps: 31.5953}], bench: [{duration: 1, rps: 31.5953}], cooldown: [{duration: 0.3, rps: 31.5953}]}\n\
        - {framework: \"sleep#1103,1356,0,0\", model: m1, slo: 127, gap: \"gamma:2\",\n   \
           warmup: [{duration: 0.3, rps: 53.5321}], bench: [{duration: 1, rps: 53.5321}], cooldown: [{duration: 0.3, rps: 53.5321}]}\n\
        - {framework: \"sleep#994,1118,0,0\", model: m2, slo: 34, gap: exp,\n   \
           warmup: [{duration: 0.3, rps: 72.3140}], bench: [{duration: 1, rps: 72.3140}], cooldown: [{duration: 0.3, rps: 72.3140}]}\n";
    let workload = Workload::parse(yaml, Path::new("."), "three-light-models.yaml").expect("parses");
    for policy in all_policies() {
        let report = run(&workload, policy, 1.0);
        audit(&report, &workload, &Knobs::default()).unwrap_or_else(|e| panic!("{policy}: {e}"));
    }
}

/// A fixed, moderately loaded run used to show that the auditor catches each kind of violation.
fn reference_run() -> (Workload, SimReport) {
    let spec = WorkloadGen {
        models: vec![
            ModelGen {
                slope_us: 1082,
                intercept_us: 5204,
                slo_ms: 100,
                gap: "exp",
                weight: 1.0,
            },
            ModelGen {
                slope_us: 400,
                intercept_us: 2000,
                slo_ms: 50,
                gap: "gamma:0.1",
                weight: 1.0,
            },
        ],
        gpus: 2,
        load: 0.9,
        seed: 42,
    };
    let workload = spec.workload();
    let report = run(&workload, PolicyKind::Symphony, 1.0);
    audit(&report, &workload, &Knobs::default()).expect("the unmodified run is clean");
    (workload, report)
}

fn expect_violation(workload: &Workload, report: &SimReport, needle: &str) {
    match audit(report, workload, &Knobs::default()) {
        Ok(()) => panic!("the auditor missed a violation (expected one mentioning `{needle}`)"),
        Err(message) => assert!(message.contains(needle), "expected `{needle}` in: {message}"),
    }
}

/// The auditor is not vacuous: each rule, broken on purpose in a real run, is reported.
#[test]
fn audit_catches_broken_runs() {
    let (workload, clean) = reference_run();
    let done: Vec<usize> = (0..clean.plans.len())
        .filter(|&i| clean.plans[i].status == PlanStatus::Done)
        .collect();
    assert!(done.len() > 10, "the reference run runs plans");
    let first = done[0];
    let first_request = clean.plan_requests(&clean.plans[first])[0] as usize;

    // A request answered "success" whose batch finished past its SLO.
    let mut r = clean.clone();
    r.requests[first_request].outcome = Outcome::Late;
    expect_violation(&workload, &r, "expected success");

    // A request that ran but is reported dropped.
    let mut r = clean.clone();
    r.requests[first_request].outcome = Outcome::Dropped;
    expect_violation(&workload, &r, "outcome dropped");

    // A request reported served that no plan ran.
    let mut r = clean.clone();
    let unserved = (0..r.requests.len())
        .find(|&i| r.requests[i].plan_id.is_none())
        .expect("some request is dropped at this load");
    r.requests[unserved].outcome = Outcome::Success;
    expect_violation(&workload, &r, "in no done plan");

    // A plan that ran shorter than its profile.
    let mut r = clean.clone();
    r.plans[first].finish_at_ns -= 1;
    expect_violation(&workload, &r, "profile says");

    // A plan that starts before its plan and inputs can reach the GPU.
    let mut r = clean.clone();
    r.plans[first].emitted_ns = r.plans[first].exec_at_ns;
    expect_violation(&workload, &r, "d_ctrl");

    // Two plans at once on one GPU: push a plan later until it overlaps the next on its GPU
    // (its requests' finish times and outcomes follow it, so only the overlap is wrong).
    let mut r = clean.clone();
    let mut on_gpu: Vec<usize> = done
        .iter()
        .copied()
        .filter(|&i| r.plans[i].gpu == r.plans[first].gpu)
        .collect();
    on_gpu.sort_by_key(|&i| r.plans[i].exec_at_ns);
    assert!(on_gpu.len() >= 2, "the first plan's GPU runs another plan");
    let (a, b) = (on_gpu[0], on_gpu[1]);
    let shift = r.plans[b].exec_at_ns - r.plans[a].finish_at_ns + 1;
    r.plans[a].exec_at_ns += shift;
    r.plans[a].finish_at_ns += shift;
    let finish_ns = r.plans[a].finish_at_ns;
    for id in r.plan_requests(&r.plans[a]).to_vec() {
        let request = &mut r.requests[id as usize];
        request.finish_ns = Some(finish_ns);
        request.outcome = if finish_ns <= request.deadline_ns {
            Outcome::Success
        } else {
            Outcome::Late
        };
    }
    expect_violation(&workload, &r, "two plans at once");

    // A request run by two plans.
    let mut r = clean.clone();
    let same_model = done[1..]
        .iter()
        .copied()
        .find(|&i| r.plans[i].model == r.plans[first].model)
        .expect("a second plan of the same model");
    let start = r
        .plan_requests
        .iter()
        .position(|&id| id == r.plan_requests(&r.plans[same_model])[0])
        .expect("listed");
    r.plan_requests[start] = first_request as u32;
    let message = audit(&r, &workload, &Knobs::default()).expect_err("double run must be caught");
    assert!(message.contains(&format!("request {first_request}")), "{message}");

    // Summary counts that do not match the requests.
    let mut r = clean.clone();
    r.summary.counts.success += 1;
    expect_violation(&workload, &r, "summary counts");

    // Audited against a tighter SLO than it ran with: outcomes no longer match.
    let mut tight = workload.clone();
    for m in &mut tight.models {
        m.slo_ns /= 2;
    }
    assert!(audit(&clean, &tight, &Knobs::default()).is_err());
}

/// Light load (2 % to 30 % of the GPUs' peak throughput), 400 random workloads drawn from a
/// fixed seed. Deferral to the last moment makes independent models' batches collide on few
/// GPUs; our contention margin makes that rare. Measured when written: `symphony` above 1 %
/// bad (over all requests) in 1 of 400 workloads, worst 1.92 %; `symphony-ref` in 35. The
/// bounds leave room for changes elsewhere but fail if the margin stops working.
#[test]
fn symphony_serves_light_load() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(Config::default(), TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]));
    let strategy = workload_gen(0.02..0.3);
    let cases = 400;
    let (mut ours_over, mut reference_over, mut ours_worst) = (0, 0, 0.0f64);
    for _ in 0..cases {
        let spec = strategy.new_tree(&mut runner).expect("generates").current();
        let workload = spec.workload();
        let demand = demand_fraction(&workload, 1.0);
        // The minimum rate per model can push a tiny-share model past the range: scale down.
        let rate_scale = if demand < 0.3 { 1.0 } else { 0.29 / demand };
        let ours = run(&workload, PolicyKind::Symphony, rate_scale);
        audit(&ours, &workload, &Knobs::default()).expect("audit");
        let bad = ours.summary.counts.bad_rate_percent();
        ours_worst = ours_worst.max(bad);
        if bad > 1.0 {
            ours_over += 1;
        }
        let reference = run(&workload, PolicyKind::SymphonyRef, rate_scale);
        if reference.summary.counts.bad_rate_percent() > 1.0 {
            reference_over += 1;
        }
    }
    println!(
        "light load, {cases} workloads: symphony over 1 % bad in {ours_over} (worst {ours_worst:.2} %), symphony-ref in {reference_over}"
    );
    assert!(
        ours_over * 100 <= cases * 3,
        "symphony over 1 % bad in {ours_over} of {cases} light workloads"
    );
    assert!(
        ours_worst <= 10.0,
        "symphony's worst light-load bad rate {ours_worst:.2} %"
    );
    assert!(
        ours_over * 5 < reference_over,
        "the margin must beat the reference: {ours_over} vs {reference_over}"
    );
}
