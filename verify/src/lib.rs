//! symphony-verify: checks over whole runs.
//!
//! The tests live in `tests/`; this library holds the auditor they share (it checks a
//! simulation's plans and request outcomes against the rules every policy must keep) and
//! [`vopr`], the seeded whole-service simulation with faults (`cargo run --release -p
//! symphony-verify --bin vopr -- --help`).

pub mod vopr;

use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use symphony_core::policy::Knobs;
use symphony_core::sim::{simulate, Counts, Outcome, PlanRecord, PlanStatus, SimConfig, SimReport};
use symphony_core::workload::{Phase, Workload};

/// Runs [`simulate`] on a thread and gives up after `limit`, so a policy that livelocks or
/// panics fails a test with a message instead of hanging it. A run that times out keeps its
/// thread until the test process exits.
pub fn simulate_bounded(workload: &Workload, config: &SimConfig, limit: Duration) -> Result<SimReport, String> {
    let (tx, rx) = mpsc::channel();
    let (w, c) = (workload.clone(), config.clone());
    let handle = std::thread::Builder::new()
        .name(format!("sim-{}", config.policy))
        .spawn(move || {
            let _ = tx.send(simulate(&w, &c));
        })
        .map_err(|e| format!("cannot start the simulation thread: {e}"))?;
    match rx.recv_timeout(limit) {
        Ok(report) => Ok(report),
        Err(RecvTimeoutError::Timeout) => Err(format!(
            "policy {} did not finish the simulation within {limit:?} (seed {}, rate scale {}, {} GPUs): \
             it livelocks or is far too slow",
            config.policy, config.seed, config.rate_scale, config.gpu_count
        )),
        Err(RecvTimeoutError::Disconnected) => {
            let payload = handle.join().expect_err("the thread ended without a report");
            let message = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(no message)".to_string());
            Err(format!(
                "policy {} panicked in the simulation (seed {}, rate scale {}): {message}",
                config.policy, config.seed, config.rate_scale
            ))
        }
    }
}

/// Checks a whole run against the rules every policy must keep, independently of how the
/// simulator computed it: outcomes are recomputed from the workload's SLOs and `knobs.d_resp_ns`,
/// execution times from the profiles. Returns the first violation found, with the ids and times
/// needed to find it again.
///
/// The rules:
/// - every request has exactly one outcome: `success`/`late` iff it belongs to exactly one done
///   plan, `dropped`/`noreply` iff it belongs to none; no request is in two plans that were not
///   preempted (only a preempted plan gives its requests back);
/// - `success` iff `finish + d_resp <= arrival + slo`, `late` otherwise; a request's `plan_id`
///   and `finish_ns` are set exactly when it ran, and equal its done plan's id and finish;
/// - no GPU runs two plans at once: `[exec_at, finish_at)` never overlap on one GPU;
/// - a done plan runs exactly `profile.exec_ns(b)`, a preempted one at most that long;
///   `b` is in `1..=batch_size_max`, and every request of a plan is of the plan's model;
/// - a plan is neither emitted nor started before each of its requests arrives;
/// - a plan starts no earlier than `emitted + d_ctrl + d_data*b`;
/// - the summary's counts are those of the bench-phase requests.
pub fn audit(report: &SimReport, workload: &Workload, knobs: &Knobs) -> Result<(), String> {
    let models = &workload.models;
    let requests = &report.requests;
    let gpu_count = report.summary.gpu_count;

    // Requests on their own: ids are arrival order, deadlines and phases follow the workload.
    let mut previous_arrival_ns = 0u64;
    for (id, r) in requests.iter().enumerate() {
        let Some(model) = models.get(r.model as usize) else {
            return Err(format!(
                "request {id}: model index {} but the workload has {} models",
                r.model,
                models.len()
            ));
        };
        if r.arrival_ns < previous_arrival_ns {
            return Err(format!(
                "request {id}: arrives at {} ns, before request {} (at {previous_arrival_ns} ns): \
                 ids must follow arrival order",
                r.arrival_ns,
                id - 1
            ));
        }
        previous_arrival_ns = r.arrival_ns;
        let deadline_ns = symphony_core::request::deadline_ns(r.arrival_ns, model.slo_ns, knobs.d_resp_ns);
        if r.deadline_ns != deadline_ns {
            return Err(format!(
                "request {id} ({}): deadline {} ns, expected arrival {} + slo {} - d_resp {} = {} ns",
                model.name, r.deadline_ns, r.arrival_ns, model.slo_ns, knobs.d_resp_ns, deadline_ns
            ));
        }
        if model.phases.phase_at(r.arrival_ns) != Some(r.phase) {
            return Err(format!(
                "request {id} ({}): phase {} but arrival {} ns lies in {:?} of that model",
                model.name,
                r.phase.as_str(),
                r.arrival_ns,
                model.phases.phase_at(r.arrival_ns).map(Phase::as_str)
            ));
        }
    }

    // Plans: ids, sizes, models, timing; and which plans each request belongs to.
    let mut done_plan_of: Vec<Option<u64>> = vec![None; requests.len()];
    let mut live_plan_of: Vec<Option<u64>> = vec![None; requests.len()];
    for (index, plan) in report.plans.iter().enumerate() {
        let id = plan.plan_id;
        if id != index as u64 {
            return Err(format!("plan at index {index} has id {id}: plan ids must be dense"));
        }
        if plan.gpu >= gpu_count {
            return Err(format!("plan {id}: gpu {} but the run has {gpu_count} GPUs", plan.gpu));
        }
        let Some(model) = models.get(plan.model as usize) else {
            return Err(format!("plan {id}: model index {} out of range", plan.model));
        };
        let b = plan.batch_size;
        let b_max = model.profile.batch_size_max();
        if !(1..=b_max).contains(&b) {
            return Err(format!(
                "plan {id} ({}): batch size {b} outside 1..={b_max}",
                model.name
            ));
        }
        let exec_ns = model.profile.exec_ns(b);
        let ran_ns = plan.finish_at_ns.checked_sub(plan.exec_at_ns).ok_or_else(|| {
            format!(
                "plan {id}: finishes at {} ns, before it starts at {} ns",
                plan.finish_at_ns, plan.exec_at_ns
            )
        })?;
        match plan.status {
            PlanStatus::Done | PlanStatus::Running if ran_ns != exec_ns => {
                return Err(format!(
                    "plan {id} ({}, b={b}, {:?}): ran {ran_ns} ns from {} to {} ns, profile says {exec_ns} ns",
                    model.name, plan.status, plan.exec_at_ns, plan.finish_at_ns
                ));
            }
            PlanStatus::Preempted if ran_ns > exec_ns => {
                return Err(format!(
                    "plan {id} ({}, b={b}, preempted): ran {ran_ns} ns, longer than a whole run of {exec_ns} ns",
                    model.name
                ));
            }
            _ => {}
        }
        let earliest_ns = plan.emitted_ns + knobs.lead_ns(b);
        if plan.exec_at_ns < earliest_ns {
            return Err(format!(
                "plan {id} ({}, b={b}): starts at {} ns, before emitted {} + d_ctrl {} + d_data {} * {b} = {earliest_ns} ns",
                model.name, plan.exec_at_ns, plan.emitted_ns, knobs.d_ctrl_ns, knobs.d_data_ns
            ));
        }
        let members = report.plan_requests(plan);
        if members.len() != b as usize {
            return Err(format!(
                "plan {id}: batch size {b} but {} requests listed",
                members.len()
            ));
        }
        for (position, &rid) in members.iter().enumerate() {
            let Some(r) = requests.get(rid as usize) else {
                return Err(format!(
                    "plan {id}: request id {rid} but the run has {} requests",
                    requests.len()
                ));
            };
            if members[..position].contains(&rid) {
                return Err(format!("plan {id}: request {rid} listed twice"));
            }
            if r.model != plan.model {
                return Err(format!(
                    "plan {id} of model {} holds request {rid} of model {}",
                    model.name, models[r.model as usize].name
                ));
            }
            if plan.emitted_ns < r.arrival_ns {
                return Err(format!(
                    "plan {id}: emitted at {} ns, before its request {rid} arrives at {} ns",
                    plan.emitted_ns, r.arrival_ns
                ));
            }
            if plan.exec_at_ns < r.arrival_ns {
                return Err(format!(
                    "plan {id}: starts at {} ns, before its request {rid} arrives at {} ns",
                    plan.exec_at_ns, r.arrival_ns
                ));
            }
            if plan.status != PlanStatus::Preempted {
                if let Some(other) = live_plan_of[rid as usize].replace(id) {
                    return Err(format!(
                        "request {rid} is in plan {other} and plan {id}, and neither was preempted"
                    ));
                }
            }
            if plan.status == PlanStatus::Done {
                if let Some(other) = done_plan_of[rid as usize].replace(id) {
                    return Err(format!("request {rid} ran to completion twice: plans {other} and {id}"));
                }
            }
        }
    }

    // Outcomes against the done plans.
    for (id, r) in requests.iter().enumerate() {
        let model = &models[r.model as usize];
        match done_plan_of[id] {
            Some(plan_id) => {
                let plan = &report.plans[plan_id as usize];
                if r.plan_id != Some(plan_id) || r.finish_ns != Some(plan.finish_at_ns) {
                    return Err(format!(
                        "request {id}: ran in plan {plan_id} finishing at {} ns, but records plan {:?}, finish {:?}",
                        plan.finish_at_ns, r.plan_id, r.finish_ns
                    ));
                }
                let in_time = plan.finish_at_ns + knobs.d_resp_ns <= r.arrival_ns + model.slo_ns;
                let expected = if in_time { Outcome::Success } else { Outcome::Late };
                if r.outcome != expected {
                    return Err(format!(
                        "request {id} ({}): outcome {}, expected {} (finish {} + d_resp {} vs arrival {} + slo {})",
                        model.name,
                        r.outcome.as_str(),
                        expected.as_str(),
                        plan.finish_at_ns,
                        knobs.d_resp_ns,
                        r.arrival_ns,
                        model.slo_ns
                    ));
                }
            }
            None => {
                if !matches!(r.outcome, Outcome::Dropped | Outcome::NoReply) {
                    return Err(format!(
                        "request {id} ({}): outcome {} but it is in no done plan",
                        model.name,
                        r.outcome.as_str()
                    ));
                }
                if r.plan_id.is_some() || r.finish_ns.is_some() {
                    return Err(format!(
                        "request {id}: in no done plan, yet records plan {:?}, finish {:?}",
                        r.plan_id, r.finish_ns
                    ));
                }
            }
        }
    }

    // One plan at a time per GPU.
    let mut by_gpu: Vec<Vec<&PlanRecord>> = vec![Vec::new(); gpu_count as usize];
    for plan in &report.plans {
        if plan.finish_at_ns > plan.exec_at_ns {
            by_gpu[plan.gpu as usize].push(plan);
        }
    }
    for (gpu, plans) in by_gpu.iter_mut().enumerate() {
        plans.sort_by_key(|p| (p.exec_at_ns, p.finish_at_ns, p.plan_id));
        for pair in plans.windows(2) {
            let (a, b) = (pair[0], pair[1]);
            if b.exec_at_ns < a.finish_at_ns {
                return Err(format!(
                    "gpu {gpu} runs two plans at once: plan {} ({:?}) [{}, {}) and plan {} ({:?}) [{}, {})",
                    a.plan_id,
                    a.status,
                    a.exec_at_ns,
                    a.finish_at_ns,
                    b.plan_id,
                    b.status,
                    b.exec_at_ns,
                    b.finish_at_ns
                ));
            }
        }
    }

    // The summary counts what the requests say.
    let mut total = Counts::default();
    let mut per_model = vec![Counts::default(); models.len()];
    for r in requests.iter().filter(|r| r.phase == Phase::Bench) {
        for counts in [&mut total, &mut per_model[r.model as usize]] {
            counts.total += 1;
            match r.outcome {
                Outcome::Success => counts.success += 1,
                Outcome::Late => counts.late += 1,
                Outcome::Dropped => counts.dropped += 1,
                Outcome::NoReply => counts.noreply += 1,
            }
        }
    }
    if report.summary.counts != total {
        return Err(format!(
            "summary counts {:?}, but the bench-phase requests give {total:?}",
            report.summary.counts
        ));
    }
    for (index, counts) in per_model.iter().enumerate() {
        let Some(summary) = report.summary.models.get(index) else {
            return Err(format!(
                "summary lists {} models, workload has {}",
                report.summary.models.len(),
                models.len()
            ));
        };
        if summary.counts != *counts || summary.name != models[index].name {
            return Err(format!(
                "summary of model {index} `{}`: {:?}, but its bench-phase requests give `{}` {counts:?}",
                summary.name, summary.counts, models[index].name
            ));
        }
    }
    Ok(())
}
