//! Shepherd's Flex scheduler (Zhang et al., NSDI'23), the preemptive eager peer.
//!
//! What it is: one central EDF queue per model. A GPU that comes free runs the *largest
//! feasible batch* across all models: per model, the requests in deadline order while the
//! earliest deadline still holds for a batch of `|B| + 1`, i.e. the largest `b` with
//! `max(free_at, now + d_ctrl + d_data*b) + pre + l(b) + post <= D_first`; the largest such
//! batch wins (ties: earliest deadline, then lowest model index). On an arrival, an idle GPU
//! starts the best batch at once; if no GPU is idle, the smallest running batch is preempted
//! when the best batch that could replace it is at least `lambda` (3.03) times larger. The
//! preempted requests go back to their queue in deadline order and count as new arrivals (the
//! check repeats on the next smallest running batch).
//!
//! A property of the rule, not of this code: under sustained overload the queue head is always
//! nearly due (older requests were dropped), so the largest feasible batch shrinks to one and
//! throughput collapses (on one ResNet model, 8 GPUs: no misses at 6,800 req/s, 82 % bad at
//! 7,200 req/s with batch 1 everywhere). Goodput below the cliff is unaffected.
//!
//! Faithful to: the paper's Flex algorithm as its authors clarified it and as the Symphony
//! reference re-implements it (`BatchGen` with `|B| + 1` and the earliest deadline of the
//! batch; the candidate of a running batch's model includes that batch's own requests, so a
//! preemption re-runs them in the larger batch), with the drop loop *fixed*: heads that
//! cannot finish even alone are dropped from the earliest deadline on (the reference scanned
//! from the latest deadline and so dropped almost nothing until queues were full of misses;
//! see `reference-results.md`: a baseline is the best honest version of its peer).
//!
//! What it simplifies or adds:
//! - Pipelining (ours, allowed to every policy): a busy GPU picks its next batch
//!   `d_ctrl + d_data*b` before it frees (`b` = its current batch), so the batch starts the
//!   moment the GPU frees instead of idling while the plan and inputs travel. A GPU whose pick
//!   finds nothing becomes idle and takes the next arrival.
//! - Only a GPU's last plan is preemptable, and only while it is the GPU's sole outstanding
//!   plan (a GPU that already holds a pipelined successor is about to switch anyway). A plan
//!   that has not started yet frees its GPU at its start time, as the simulator does.
//! - The arrival path checks one GPU per round, the one with the smallest running batch
//!   (the reference checks every GPU; the smallest batch is the first any rule would pick),
//!   with at most one round per GPU per arrival: work per event is bounded and, since every
//!   preemption replaces a batch by one `lambda` times larger, it cannot livelock.
//! - Drops are decided for the GPU being scheduled (its start time), as in the reference.

use std::collections::VecDeque;

use super::{Completion, Knobs, ModelConfig, Output, Policy};
use crate::profile::Profile;
use crate::request::Request;
use crate::timers::TimerQueue;

#[derive(Debug)]
struct ModelState {
    profile: Profile,
    /// EDF order: `(deadline, id)`.
    queue: VecDeque<Request>,
}

/// The last plan emitted on a GPU, while it is outstanding.
#[derive(Debug, Clone, Copy)]
struct Running {
    plan_id: u64,
    model: u32,
    batch_size: u32,
    exec_at_ns: u64,
    /// The event that emitted it: a plan is never preempted by the event that made it.
    event: u64,
}

#[derive(Debug)]
struct GpuState {
    /// When the last plan emitted on this GPU finishes (its planned finish).
    free_at_ns: u64,
    /// Plans emitted here that have neither completed nor been preempted.
    outstanding: u32,
    /// Idle: its last pick found nothing, so the next arrival starts a batch here.
    idle: bool,
    /// The last plan emitted, until it completes or is preempted.
    last: Option<Running>,
    /// The requests of `last`, to return them on preemption.
    last_requests: Vec<Request>,
}

/// A candidate batch: `batch_size` requests of `model` whose earliest deadline is `deadline_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Candidate {
    model: u32,
    batch_size: u32,
    deadline_ns: u64,
}

impl Candidate {
    /// Flex's order: the larger batch wins; ties go to the earlier deadline, then the model.
    fn beats(&self, other: &Candidate) -> bool {
        (std::cmp::Reverse(self.batch_size), self.deadline_ns, self.model)
            < (std::cmp::Reverse(other.batch_size), other.deadline_ns, other.model)
    }
}

/// Shepherd's Flex scheduler over one GPU pool.
#[derive(Debug)]
pub struct Shepherd {
    knobs: Knobs,
    lambda: f64,
    preemption: bool,
    models: Vec<ModelState>,
    gpus: Vec<GpuState>,
    /// Per GPU: when to pick its next batch (pipelined before it frees).
    timers: TimerQueue,
    queued_count: usize,
    preemption_count: u64,
    /// Counts events, to tell plans emitted by the current one.
    event: u64,
}

impl Shepherd {
    pub fn new(models: &[ModelConfig], gpu_count: u32, knobs: &Knobs) -> Shepherd {
        assert!(gpu_count > 0);
        assert!(
            knobs.shepherd_lambda.is_finite() && knobs.shepherd_lambda >= 1.0,
            "lambda >= 1"
        );
        Shepherd {
            knobs: knobs.clone(),
            lambda: knobs.shepherd_lambda,
            preemption: knobs.shepherd_preemption,
            models: models
                .iter()
                .map(|m| ModelState {
                    profile: m.profile.clone(),
                    queue: VecDeque::with_capacity(4 * m.profile.batch_size_max() as usize),
                })
                .collect(),
            gpus: (0..gpu_count)
                .map(|_| GpuState {
                    free_at_ns: 0,
                    outstanding: 0,
                    idle: true,
                    last: None,
                    last_requests: Vec::with_capacity(64),
                })
                .collect(),
            timers: TimerQueue::new(gpu_count as usize),
            queued_count: 0,
            preemption_count: 0,
            event: 0,
        }
    }

    /// Plans preempted so far.
    pub fn preemption_count(&self) -> u64 {
        self.preemption_count
    }

    /// Drops model `index`'s heads that cannot finish even alone on a GPU free at
    /// `gpu_free_at_ns`, earliest deadline first (the fixed drop loop).
    fn drop_hopeless(&mut self, index: usize, now_ns: u64, gpu_free_at_ns: u64, out: &mut Output) {
        let model = &mut self.models[index];
        let finish_alone_ns = gpu_free_at_ns.max(now_ns + self.knobs.lead_ns(1)) + model.profile.exec_ns(1);
        while model.queue.front().is_some_and(|r| r.deadline_ns < finish_alone_ns) {
            out.drops.push(model.queue.pop_front().expect("front exists"));
            self.queued_count -= 1;
        }
    }

    /// The largest `b <= available` with `max(free_at, now + lead(b)) + exec(b) <= deadline`,
    /// or 0 if even a batch of one misses.
    fn largest_feasible(
        &self,
        index: usize,
        now_ns: u64,
        gpu_free_at_ns: u64,
        deadline_ns: u64,
        available: usize,
    ) -> u32 {
        let profile = &self.models[index].profile;
        let fits = |b: u32| gpu_free_at_ns.max(now_ns + self.knobs.lead_ns(b)) + profile.exec_ns(b) <= deadline_ns;
        let limit = available.min(profile.batch_size_max() as usize) as u32;
        if limit == 0 || !fits(1) {
            return 0;
        }
        // The finish time grows with b: binary search the last b that fits.
        let (mut lo, mut hi) = (1u32, limit);
        while lo < hi {
            let mid = lo + (hi - lo).div_ceil(2);
            if fits(mid) {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        lo
    }

    /// Model `index`'s largest feasible batch on a GPU free at `gpu_free_at_ns`, after
    /// dropping hopeless heads. `extra` are requests of this model that would rejoin the
    /// queue (a running batch considered for preemption), in EDF order.
    fn candidate(
        &mut self,
        index: usize,
        now_ns: u64,
        gpu_free_at_ns: u64,
        extra: &[Request],
        out: &mut Output,
    ) -> Option<Candidate> {
        self.drop_hopeless(index, now_ns, gpu_free_at_ns, out);
        let queue = &self.models[index].queue;
        let deadline_ns = match (queue.front(), extra.first()) {
            (Some(a), Some(b)) => a.deadline_ns.min(b.deadline_ns),
            (Some(a), None) | (None, Some(a)) => a.deadline_ns,
            (None, None) => return None,
        };
        let available = queue.len() + extra.len();
        let batch_size = self.largest_feasible(index, now_ns, gpu_free_at_ns, deadline_ns, available);
        (batch_size > 0).then_some(Candidate {
            model: index as u32,
            batch_size,
            deadline_ns,
        })
    }

    /// Picks the largest feasible batch across all models for `gpu` and runs it; marks the
    /// GPU idle if there is none. Returns whether a plan was emitted.
    fn dispatch(&mut self, gpu: u32, now_ns: u64, out: &mut Output) -> bool {
        let gpu_free_at_ns = self.gpus[gpu as usize].free_at_ns.max(now_ns);
        let mut best: Option<Candidate> = None;
        for index in 0..self.models.len() {
            if self.models[index].queue.is_empty() {
                continue;
            }
            if let Some(c) = self.candidate(index, now_ns, gpu_free_at_ns, &[], out) {
                if best.is_none_or(|b| c.beats(&b)) {
                    best = Some(c);
                }
            }
        }
        match best {
            Some(c) => {
                self.emit(gpu, c.model as usize, c.batch_size, now_ns, out);
                true
            }
            None => {
                self.gpus[gpu as usize].idle = true;
                self.timers.cancel(gpu);
                false
            }
        }
    }

    /// Runs the first `batch_size` requests of model `index` on `gpu`.
    fn emit(&mut self, gpu: u32, index: usize, batch_size: u32, now_ns: u64, out: &mut Output) {
        let lead_ns = self.knobs.lead_ns(batch_size);
        let state = &mut self.gpus[gpu as usize];
        let model = &mut self.models[index];
        let exec_at_ns = state.free_at_ns.max(now_ns + lead_ns);
        let finish_ns = exec_at_ns + model.profile.exec_ns(batch_size);
        debug_assert!(
            model.queue[0].deadline_ns >= finish_ns,
            "Flex only runs feasible batches"
        );
        let plan = out.push_plan(
            gpu,
            index as u32,
            exec_at_ns,
            finish_ns,
            model.queue.drain(..batch_size as usize),
        );
        self.queued_count -= batch_size as usize;
        state.last_requests.clear();
        state.last_requests.extend_from_slice(out.plan_requests(&plan));
        state.last = Some(Running {
            plan_id: plan.plan_id,
            model: index as u32,
            batch_size,
            exec_at_ns,
            event: self.event,
        });
        state.free_at_ns = finish_ns;
        state.outstanding += 1;
        state.idle = false;
        // Pipelining: pick the next batch so that it can start when this one ends.
        self.timers.set(gpu, finish_ns - lead_ns);
    }

    /// The idle GPU that frees first (lowest index on ties).
    fn idle_gpu(&self) -> Option<u32> {
        self.gpus
            .iter()
            .enumerate()
            .filter(|(_, g)| g.idle)
            .min_by_key(|&(i, g)| (g.free_at_ns, i))
            .map(|(i, _)| i as u32)
    }

    /// Starts batches on idle GPUs while any is idle and a batch is feasible.
    fn fill_idle(&mut self, now_ns: u64, out: &mut Output) {
        while self.queued_count > 0 {
            let Some(gpu) = self.idle_gpu() else { return };
            if !self.dispatch(gpu, now_ns, out) {
                return; // Nothing feasible: every queue is empty now.
            }
        }
    }

    /// The preemptable GPU with the smallest running batch (ties: the latest start, which
    /// wastes the least work; then the lowest index). Plans emitted by this very event are
    /// not candidates: one event never undoes its own decision.
    fn smallest_running(&self) -> Option<u32> {
        self.gpus
            .iter()
            .enumerate()
            .filter(|(_, g)| g.outstanding == 1 && !g.idle)
            .filter_map(|(i, g)| g.last.map(|r| (i, r)))
            .filter(|(_, r)| r.event != self.event)
            .min_by_key(|&(i, r)| (r.batch_size, std::cmp::Reverse(r.exec_at_ns), i))
            .map(|(i, _)| i as u32)
    }

    /// Flex's arrival rule when no GPU is idle: preempt the smallest running batch if a batch
    /// at least `lambda` times larger could replace it. Preempted requests are new arrivals:
    /// the check repeats, at most once per GPU.
    fn consider_preemption(&mut self, arrived_model: u32, now_ns: u64, out: &mut Output) {
        let mut changed_model = arrived_model;
        for _ in 0..self.gpus.len() {
            let Some(gpu) = self.smallest_running() else { return };
            let running = self.gpus[gpu as usize].last.expect("a running plan");
            // A preempted plan frees its GPU now, or at its start if it has not started.
            let free_at_ns = now_ns.max(running.exec_at_ns);
            let mut best: Option<Candidate> = None;
            let extra = std::mem::take(&mut self.gpus[gpu as usize].last_requests);
            let models = if changed_model == running.model {
                [running.model, u32::MAX]
            } else {
                [changed_model, running.model]
            };
            for index in models.into_iter().filter(|&m| m != u32::MAX) {
                let own = if index == running.model { &extra[..] } else { &[] };
                if let Some(c) = self.candidate(index as usize, now_ns, free_at_ns, own, out) {
                    if best.is_none_or(|b| c.beats(&b)) {
                        best = Some(c);
                    }
                }
            }
            self.gpus[gpu as usize].last_requests = extra;
            let Some(best) = best else { return };
            if (best.batch_size as f64) < self.lambda * running.batch_size as f64 {
                return;
            }
            self.preempt(gpu, free_at_ns, out);
            let emitted = self.dispatch(gpu, now_ns, out);
            debug_assert!(emitted, "the replacement batch is feasible");
            changed_model = running.model;
        }
    }

    /// Cancels `gpu`'s last plan and returns its requests to their queue in EDF order.
    fn preempt(&mut self, gpu: u32, free_at_ns: u64, out: &mut Output) {
        let state = &mut self.gpus[gpu as usize];
        let running = state.last.take().expect("a running plan");
        out.preempted.push(running.plan_id);
        state.outstanding -= 1;
        state.free_at_ns = free_at_ns;
        let queue = &mut self.models[running.model as usize].queue;
        for request in state.last_requests.drain(..) {
            let position = queue.partition_point(|r| r.order_key() < request.order_key());
            queue.insert(position, request);
        }
        self.queued_count += running.batch_size as usize;
        self.preemption_count += 1;
    }
}

impl Policy for Shepherd {
    fn on_arrival(&mut self, now_ns: u64, request: Request, out: &mut Output) {
        self.event += 1;
        let model = request.model;
        let queue = &mut self.models[model as usize].queue;
        // EDF insertion: almost always an append.
        let mut position = queue.len();
        while position > 0 && queue[position - 1].order_key() > request.order_key() {
            position -= 1;
        }
        queue.insert(position, request);
        self.queued_count += 1;
        if self.idle_gpu().is_some() {
            self.fill_idle(now_ns, out);
        } else if self.preemption {
            self.consider_preemption(model, now_ns, out);
        }
    }

    fn on_timer(&mut self, now_ns: u64, out: &mut Output) {
        while let Some(gpu) = self.timers.pop_due(now_ns) {
            self.dispatch(gpu, now_ns, out);
        }
    }

    fn on_completion(&mut self, now_ns: u64, completion: &Completion, out: &mut Output) {
        let state = &mut self.gpus[completion.gpu as usize];
        state.outstanding = state.outstanding.saturating_sub(1);
        if state.last.is_some_and(|r| r.plan_id == completion.plan_id) {
            state.last = None;
            state.last_requests.clear();
        }
        // Normally the pipelined pick already ran; an idle GPU takes what is left.
        let idle = state.idle;
        if idle {
            self.fill_idle(now_ns, out);
        }
    }

    fn next_timer_ns(&mut self) -> Option<u64> {
        self.timers.next_ns()
    }

    fn queued_count(&self) -> usize {
        self.queued_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{PolicyKind, MS};
    use crate::sim::{simulate, Outcome, PlanStatus, SimConfig, SimReport};
    use crate::workload::Workload;
    use std::path::Path;

    fn resnet(slo_ms: u64) -> ModelConfig {
        ModelConfig {
            name: "resnet".into(),
            profile: Profile::parse_linear("sleep#1082,5204,0,0", slo_ms * MS).unwrap(),
            slo_ns: slo_ms * MS,
        }
    }

    fn request(id: u64, model: u32, arrival_ns: u64, slo_ns: u64, knobs: &Knobs) -> Request {
        Request {
            id,
            model,
            arrival_ns,
            deadline_ns: crate::request::deadline_ns(arrival_ns, slo_ns, knobs.d_resp_ns),
        }
    }

    /// Every request has one outcome, plans on a GPU never overlap and start as planned.
    fn check_report(report: &SimReport) {
        for r in &report.requests {
            assert_ne!(r.outcome, Outcome::NoReply, "every request gets one reply");
        }
        let gpu_count = report.summary.gpu_count;
        for gpu in 0..gpu_count {
            let mut plans: Vec<_> = report.plans.iter().filter(|p| p.gpu == gpu).collect();
            plans.sort_by_key(|p| (p.exec_at_ns, p.plan_id));
            for pair in plans.windows(2) {
                assert!(
                    pair[1].exec_at_ns >= pair[0].finish_at_ns,
                    "overlap on gpu {gpu}: {:?}",
                    pair
                );
            }
            for p in &plans {
                assert_eq!(p.exec_at_ns, p.planned_exec_at_ns, "plans start when planned");
                assert!(p.batch_size >= 1);
            }
        }
    }

    fn workload(models: usize, gpus: u32, rps: f64, gap: &str) -> Workload {
        let mut yaml = format!("seed: 7\ngpus: {gpus}\nmodels:\n");
        for m in 0..models {
            yaml.push_str(&format!(
                "- {{framework: \"sleep#1082,5204,0,0\", model: m{m}, slo: 100, gap: {gap}, warmup: [{{duration: 1, rps: {rps}}}], bench: [{{duration: 2, rps: {rps}}}], cooldown: [{{duration: 1, rps: {rps}}}]}}\n"
            ));
        }
        Workload::parse(&yaml, Path::new("."), "inline").unwrap()
    }

    #[test]
    fn light_load_is_served_and_audited() {
        let w = workload(2, 2, 200.0, "exp");
        let report = simulate(&w, &SimConfig::of(&w, PolicyKind::Shepherd));
        check_report(&report);
        assert!(report.summary.bad_rate < 0.1, "bad rate {}", report.summary.bad_rate);
    }

    #[test]
    fn overload_drops_but_never_loses_requests() {
        let w = workload(4, 2, 1500.0, "gamma:0.1");
        let report = simulate(&w, &SimConfig::of(&w, PolicyKind::Shepherd));
        check_report(&report);
        assert!(report.summary.counts.dropped > 0);
        let preempted = report
            .plans
            .iter()
            .filter(|p| p.status == PlanStatus::Preempted)
            .count();
        assert!(preempted > 0, "bursts cause preemptions");
        // Preempted requests were re-planned or dropped: outcomes are final above.
    }

    /// A tiny driver: runs the policy's events in time order on exact fake GPUs.
    struct Driver {
        out: Output,
        plans: Vec<(super::super::Plan, Vec<Request>)>,
        done: Vec<bool>,
        replies: usize,
    }

    impl Driver {
        fn new() -> Driver {
            Driver {
                out: Output::new(),
                plans: Vec::new(),
                done: Vec::new(),
                replies: 0,
            }
        }

        fn collect(&mut self) -> (usize, usize) {
            let (mut planned, mut dropped) = (0, 0);
            for &id in &self.out.preempted {
                self.done[id as usize] = true;
                self.replies -= self.plans[id as usize].0.batch_size as usize;
            }
            for plan in &self.out.plans {
                let requests = self.out.plan_requests(plan).to_vec();
                planned += requests.len();
                self.replies += requests.len();
                self.plans.push((*plan, requests));
                self.done.push(false);
            }
            dropped += self.out.drops.len();
            self.replies += self.out.drops.len();
            self.out.clear();
            (planned, dropped)
        }

        /// Completes every plan finishing at or before `t`, in finish order.
        fn complete_until(&mut self, policy: &mut Shepherd, t: u64) {
            loop {
                let timer = policy.next_timer_ns();
                let next_plan = (0..self.plans.len())
                    .filter(|&i| !self.done[i])
                    .min_by_key(|&i| self.plans[i].0.finish_ns);
                let plan_t = next_plan.map(|i| self.plans[i].0.finish_ns);
                let next = [timer, plan_t].into_iter().flatten().min();
                match next {
                    Some(at) if at <= t => {
                        if plan_t == Some(at) {
                            let i = next_plan.unwrap();
                            self.done[i] = true;
                            let p = self.plans[i].0;
                            let c = Completion {
                                plan_id: p.plan_id,
                                gpu: p.gpu,
                                model: p.model,
                                batch_size: p.batch_size,
                                started_ns: p.exec_at_ns,
                                finished_ns: p.finish_ns,
                            };
                            policy.on_completion(at, &c, &mut self.out);
                        } else {
                            policy.on_timer(at, &mut self.out);
                        }
                        self.collect();
                    }
                    _ => return,
                }
            }
        }
    }

    #[test]
    fn preempts_a_small_batch_for_a_much_larger_one_and_never_otherwise() {
        let knobs = Knobs::default();
        let slo_ns = 100 * MS;
        let models = [resnet(100), resnet(100)];
        let mut policy = Shepherd::new(&models, 1, &knobs);
        let mut d = Driver::new();
        // One request of model 0 starts at once on the idle GPU.
        policy.on_arrival(0, request(0, 0, 0, slo_ns, &knobs), &mut d.out);
        assert_eq!(d.collect(), (1, 0));
        // Two requests of model 1: a batch of 2 < 3.03 x 1: no preemption.
        for id in 1..=2 {
            policy.on_arrival(MS, request(id, 1, MS, slo_ns, &knobs), &mut d.out);
            let _ = d.collect();
            assert!(d.out.preempted.is_empty());
        }
        assert_eq!(policy.preemption_count(), 0);
        assert_eq!(policy.queued_count(), 2);
        // A third: 3 < 3.03: still none.
        policy.on_arrival(MS, request(3, 1, MS, slo_ns, &knobs), &mut d.out);
        let _ = d.collect();
        assert_eq!(policy.preemption_count(), 0);
        // A fourth: 4 >= 3.03 x 1: preempt and run the 4.
        policy.on_arrival(2 * MS, request(4, 1, 2 * MS, slo_ns, &knobs), &mut d.out);
        let preempted = d.out.preempted.clone();
        let (planned, _) = d.collect();
        assert_eq!(preempted, vec![0]);
        assert_eq!(planned, 4);
        assert_eq!(policy.preemption_count(), 1);
        // The preempted request of model 0 is queued again, not lost.
        assert_eq!(policy.queued_count(), 1);
        let batch = d.plans.last().unwrap();
        assert_eq!(batch.0.model, 1);
        assert!(batch.0.exec_at_ns >= 2 * MS + knobs.lead_ns(4));
        // Run to the end: the re-queued request is served after the batch of 4.
        d.complete_until(&mut policy, 1_000 * MS);
        assert_eq!(policy.queued_count(), 0);
        assert_eq!(d.replies, 5, "each request ends in exactly one live plan or drop");
        let served: Vec<u64> = d
            .plans
            .iter()
            .filter(|(p, _)| !preempted.contains(&p.plan_id))
            .flat_map(|(_, r)| r.iter().map(|r| r.id))
            .collect();
        let mut sorted = served.clone();
        sorted.sort();
        assert_eq!(sorted, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn no_preemption_when_disabled_and_largest_batch_wins_on_completion() {
        let knobs = Knobs {
            shepherd_preemption: false,
            ..Knobs::default()
        };
        let slo_ns = 100 * MS;
        let models = [resnet(100), resnet(100)];
        let mut policy = Shepherd::new(&models, 1, &knobs);
        let mut d = Driver::new();
        policy.on_arrival(0, request(0, 0, 0, slo_ns, &knobs), &mut d.out);
        d.collect();
        // Model 0: 2 more; model 1: 5 (later deadlines). No preemption.
        let mut id = 1;
        for _ in 0..2 {
            policy.on_arrival(MS, request(id, 0, MS, slo_ns, &knobs), &mut d.out);
            id += 1;
        }
        for _ in 0..5 {
            policy.on_arrival(2 * MS, request(id, 1, 2 * MS, slo_ns, &knobs), &mut d.out);
            id += 1;
        }
        d.collect();
        assert_eq!(policy.preemption_count(), 0);
        assert_eq!(d.plans.len(), 1);
        // The pipelined pick before the first batch ends takes model 1's batch of 5.
        d.complete_until(&mut policy, d.plans[0].0.finish_ns);
        assert_eq!(d.plans[1].0.model, 1);
        assert_eq!(d.plans[1].0.batch_size, 5);
        // Pipelined: picked `lead(1)` ahead, so it starts `d_data * 4` after the GPU frees.
        assert_eq!(d.plans[1].0.exec_at_ns, d.plans[0].0.finish_ns + 4 * knobs.d_data_ns);
        d.complete_until(&mut policy, 1_000 * MS);
        assert_eq!(policy.queued_count(), 0);
        assert_eq!(d.replies, 8);
    }

    #[test]
    fn hopeless_heads_are_dropped_from_the_earliest_deadline() {
        let knobs = Knobs::default();
        let models = [resnet(100)];
        let mut policy = Shepherd::new(&models, 1, &knobs);
        let mut d = Driver::new();
        // Occupy the GPU with a long batch: 40 requests at t=0.
        for id in 0..40 {
            policy.on_arrival(0, request(id, 0, 0, 100 * MS, &knobs), &mut d.out);
            d.collect();
        }
        assert_eq!(policy.preemption_count(), 3, "1 -> 4 -> 13 -> 40");
        assert_eq!(d.plans.last().unwrap().0.batch_size, 40);
        // A request with a 10 ms SLO cannot finish before the GPU frees: dropped at the pick,
        // while a normal one behind it is served.
        let tight = Request {
            id: 100,
            model: 0,
            arrival_ns: MS,
            deadline_ns: 11 * MS,
        };
        policy.on_arrival(MS, tight, &mut d.out);
        policy.on_arrival(MS, request(101, 0, MS, 100 * MS, &knobs), &mut d.out);
        d.collect();
        d.complete_until(&mut policy, 1_000 * MS);
        assert_eq!(policy.queued_count(), 0);
        assert_eq!(d.replies, 42);
        let served_101 = d.plans.iter().any(|(_, r)| r.iter().any(|r| r.id == 101));
        assert!(served_101);
        assert!(!d.plans.iter().any(|(_, r)| r.iter().any(|r| r.id == 100)));
    }
}
