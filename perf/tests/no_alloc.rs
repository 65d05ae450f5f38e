//! The decision path allocates nothing in steady state: after a warm-up, a policy handles
//! arrivals, timers and completions without one heap allocation.
//!
//! A counting global allocator (this test binary's own) counts allocations while a flag is
//! set; the driver below is a minimal event loop with no recording of its own.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::atomic::Ordering;

use symphony_core::policy::{self, Completion, Knobs, Output, PolicyKind};
use symphony_core::request::Request;
use symphony_core::sim::model_configs;
use symphony_core::workload::Workload;

mod counting;

use counting::{ALLOCATIONS, COUNTING};

const WORKLOAD: &str = r#"
seed: 7
gpus: 8
models:
- {framework: "sleep#1082,5204,0,0", model: a, slo: 100, gap: exp, warmup: [{duration: 6, rps: 1500}], bench: [{duration: 6, rps: 1500}]}
- {framework: "sleep#1082,5204,0,0", model: b, slo: 100, gap: "gamma:0.5", warmup: [{duration: 6, rps: 1500}], bench: [{duration: 6, rps: 1500}]}
- {framework: "sleep#400,2000,0,0", model: c, slo: 50, gap: exp, warmup: [{duration: 6, rps: 2000}], bench: [{duration: 6, rps: 2000}]}
"#;

/// `(finish_ns, plan_id, gpu, model, batch_size)` of a plan in flight.
type PendingCompletion = (u64, u64, u32, u32, u32);

/// Runs `kind` over the workload; returns the allocations counted after the first half of
/// time, and how many events (arrivals, timers, completions) were handled in that window.
fn allocations_in_steady_state(kind: PolicyKind) -> (u64, u64) {
    let workload = Workload::parse(WORKLOAD, std::path::Path::new("."), "inline").unwrap();
    let models = model_configs(&workload);
    let knobs = Knobs::default();
    let mut policy = policy::build(kind, &models, workload.gpu_count, &knobs);
    let mut arrivals = Vec::new();
    workload.generate_arrivals(1.0, workload.seed, &mut arrivals);
    let steady_from_ns = workload.end_ns() / 2;
    let mut out = Output::new();
    let mut completions: BinaryHeap<Reverse<PendingCompletion>> = BinaryHeap::with_capacity(1024);
    let mut next = 0;
    let mut now_ns = 0;
    let mut counted_events = 0;
    ALLOCATIONS.store(0, Ordering::Relaxed);
    loop {
        let arrival_ns = arrivals.get(next).map(|a| a.arrival_ns);
        let completion_ns = completions.peek().map(|Reverse(c)| c.0);
        let timer_ns = policy.next_timer_ns().map(|t| t.max(now_ns));
        let Some(t) = [arrival_ns, completion_ns, timer_ns].into_iter().flatten().min() else {
            break;
        };
        now_ns = t;
        let counting = now_ns >= steady_from_ns;
        counted_events += u64::from(counting);
        COUNTING.store(counting, Ordering::Relaxed);
        if completion_ns == Some(t) {
            let Reverse((finish_ns, plan_id, gpu, model, batch_size)) = completions.pop().unwrap();
            let completion = Completion {
                plan_id,
                gpu,
                model,
                batch_size,
                started_ns: finish_ns - models[model as usize].profile.exec_ns(batch_size),
                finished_ns: finish_ns,
            };
            policy.on_completion(t, &completion, &mut out);
        } else if arrival_ns == Some(t) {
            let a = arrivals[next];
            next += 1;
            let slo_ns = models[a.model_index as usize].slo_ns;
            let request = Request {
                id: next as u64,
                model: a.model_index,
                arrival_ns: a.arrival_ns,
                deadline_ns: symphony_core::request::deadline_ns(a.arrival_ns, slo_ns, knobs.d_resp_ns),
            };
            policy.on_arrival(t, request, &mut out);
        } else {
            policy.on_timer(t, &mut out);
        }
        for plan in &out.plans {
            completions.push(Reverse((
                plan.finish_ns,
                plan.plan_id,
                plan.gpu,
                plan.model,
                plan.batch_size,
            )));
        }
        out.clear();
        COUNTING.store(false, Ordering::Relaxed);
    }
    (ALLOCATIONS.load(Ordering::Relaxed), counted_events)
}

#[test]
fn the_deferred_family_allocates_nothing_in_steady_state() {
    // The counter counts: one allocation while counting is one (the only test of this
    // binary, so nothing else allocates meanwhile on another thread).
    ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let probe = std::hint::black_box(Vec::<u64>::with_capacity(16));
    COUNTING.store(false, Ordering::Relaxed);
    drop(probe);
    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), 1, "the counting allocator counts");
    for kind in [PolicyKind::Symphony, PolicyKind::SymphonyRef, PolicyKind::Eager] {
        let (allocations, counted_events) = allocations_in_steady_state(kind);
        // The window holds the steady half of the run: tens of thousands of events.
        assert!(
            counted_events > 10_000,
            "{kind}: only {counted_events} events were counted"
        );
        assert_eq!(allocations, 0, "{kind} allocated on the decision path");
    }
}
