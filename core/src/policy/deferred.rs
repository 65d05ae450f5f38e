//! Symphony's deferred batch scheduler (spec sections 2 to 6), every knob selectable.
//!
//! Per model: an EDF queue split into `prefix | suffix` (section 3), a rate meter feeding the
//! target batch size (section 4), and one candidate batch with its schedulable window
//! (section 5). Across models: a [`GpuPool`] and the earliest-`invalid_after`-first hand-off of
//! freed GPUs to waiting candidates (section 6).
//!
//! The control plane runs once per event and model; the data plane is the queue walk. Nothing
//! here allocates in steady state: queues and the output keep their capacity.
//!
//! Our default configuration ([`PolicyKind::Symphony`]) adds two things to the reference
//! configuration ([`PolicyKind::SymphonyRef`]): it stops deferring once the measured demand
//! saturates the GPUs (`saturation_threshold`), and it defers less while other models contend
//! for the GPUs (`contention_margin`). See `docs/internals/scheduling.md`, section 8.

use std::collections::VecDeque;

use super::{
    ClassPlanning, Completion, Condition, DropPolicy, GrantPolicy, Knobs, ModelConfig, Output, Policy, PolicyKind,
    Serving,
};
use crate::correction::{CorrectionSummary, Corrector, IdleCorrector};
use crate::gpu_pool::{GpuClaim, GpuPool, GpuSource};
use crate::profile::{scale_ns, Profile};
use crate::rate::RateMeter;
use crate::request::Request;
use crate::timers::TimerQueue;

/// The deferred family's choices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Config {
    pub drop: DropPolicy,
    pub condition: Condition,
    pub grant: GrantPolicy,
    /// Ours (off in the reference configuration): when the measured demand reaches this
    /// fraction of the GPUs, stop deferring: condition `immediately` with `saturated_drop`.
    pub saturation_threshold: Option<f64>,
    pub saturated_drop: DropPolicy,
    /// Ours: when other models send requests too, defer less, by the time a long recent
    /// batch takes (scaled by how many GPUs they could contend for), so that a GPU taken by
    /// another model's deferred batch still frees in time for this one.
    pub contention_margin: bool,
    /// Ours: before the GPUs saturate, a model whose SLO is long beside the others keeps a
    /// smaller batch in window drop ([`kept_batch_sizes`]).
    pub long_slo_keep: bool,
    /// Ours: arrivals that join a waiting candidate move its hand-off rank earlier, to the
    /// `invalid_after` of the batch its queue would form (`Knobs::queue_rank`).
    pub queue_rank: bool,
}

impl Config {
    /// The configuration of `kind`, with `knobs`' overrides applied.
    pub fn of(kind: PolicyKind, knobs: &Knobs) -> Config {
        let base = match kind {
            PolicyKind::Symphony => Config {
                drop: DropPolicy::WindowDrop,
                condition: Condition::Frontrun,
                grant: GrantPolicy::LowestIndex,
                saturation_threshold: Some(knobs.saturation_threshold),
                saturated_drop: knobs.saturated_drop,
                contention_margin: true,
                long_slo_keep: true,
                queue_rank: knobs.queue_rank,
            },
            PolicyKind::SymphonyRef => Config {
                drop: DropPolicy::WindowDrop,
                condition: Condition::Frontrun,
                grant: GrantPolicy::EarliestFree,
                saturation_threshold: None,
                saturated_drop: DropPolicy::WindowDrop,
                contention_margin: false,
                long_slo_keep: false,
                queue_rank: false,
            },
            PolicyKind::Eager => Config {
                drop: DropPolicy::DropTimeout,
                condition: Condition::Immediately,
                grant: GrantPolicy::EarliestFree,
                saturation_threshold: None,
                saturated_drop: DropPolicy::DropTimeout,
                contention_margin: false,
                long_slo_keep: false,
                queue_rank: false,
            },
            other => panic!("{other} is not of the deferred family"),
        };
        Config {
            drop: knobs.drop.unwrap_or(base.drop),
            condition: knobs.condition.unwrap_or(base.condition),
            grant: knobs.grant.unwrap_or(base.grant),
            saturation_threshold: base.saturation_threshold,
            saturated_drop: base.saturated_drop,
            contention_margin: base.contention_margin,
            long_slo_keep: base.long_slo_keep,
            queue_rank: base.queue_rank,
        }
    }
}

/// A model's candidate batch and its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub batch_size: u32,
    /// `D`: the earliest deadline in the batch.
    pub deadline_ns: u64,
    /// When the batch wants to start, GPUs aside: `max(earliest, min(choice, latest))`.
    pub exec_at_ns: u64,
    /// `D - (pre + l(b) + post)`: past this the batch cannot start in time.
    pub invalid_after_ns: u64,
}

/// A queue's `tail_key` when it is not known: an arrival then reads the tail.
const UNKNOWN_TAIL: (u64, u64) = (u64::MAX, u64::MAX);

#[derive(Debug)]
struct ModelState {
    profile: Profile,
    slo_ns: u64,
    /// EDF order; `queue[..prefix_len]` is the prefix, the rest the suffix.
    queue: VecDeque<Request>,
    prefix_len: usize,
    /// The order key of the queue's last request, or [`UNKNOWN_TAIL`]: an arrival due after
    /// it is appended without reading the tail, whose line is long out of cache (a
    /// request a millisecond, of 1,000 models).
    tail_key: (u64, u64),
    meter: RateMeter,
    target_batch_size: u32,
    /// Ours: the batch window drop keeps, before and once the GPUs saturate ([`kept_batch_sizes`]).
    kept: u32,
    saturated_kept: u32,
    last_exec_at_ns: u64,
    /// Waiting for a GPU: its window opened but no GPU frees in time.
    waiting: Option<Window>,
    /// Has a measured rate above zero (counted in `rated_count`).
    rated: bool,
    /// Holds requests (counted in `active_count`).
    active: bool,
    /// GPU-seconds per second this model needs at its rate and target batch.
    demand: f64,
    /// Online correction of `profile` from measured batch times (`Knobs::correction`).
    /// Boxed, as the other rarely used state: a model's state is read on every arrival of
    /// 1,000 models, and a smaller one leaves more of them in cache.
    corrector: Option<Box<Corrector>>,
    /// And by the GPU's idle gap before a batch (`Knobs::correction_idle`).
    idle_corrector: Option<Box<IdleCorrector>>,
}

impl ModelState {
    /// Sets the target batch size (section 4) and what window drop keeps of it, before and
    /// once the GPUs saturate.
    fn set_target(&mut self, target: u32, slo_min_ns: u64, knobs: &Knobs) {
        self.target_batch_size = target;
        (self.kept, self.saturated_kept) = kept_batch_sizes(&self.profile, self.slo_ns, target, slo_min_ns, knobs);
    }
}

/// Symphony's deferred batch scheduler over one GPU source: the single-threaded pool in the
/// simulator, the table shared by all shards in the service.
#[derive(Debug)]
pub struct Deferred<G: GpuSource = GpuPool> {
    config: Config,
    knobs: Knobs,
    models: Vec<ModelState>,
    pool: G,
    timers: TimerQueue,
    /// Models waiting for a GPU, keyed by their hand-off rank: their candidate's
    /// `invalid_after`, or the earlier one their queues give ([`Deferred::rank_by_queue`]).
    waiting: TimerQueue,
    /// Ours (`contention_margin`): how many models have a measured rate above zero (they
    /// will want GPUs), and a decaying maximum of the execution time of granted batches.
    rated_count: u32,
    /// How many models hold requests now.
    active_count: u32,
    recent_exec_ns: u64,
    queued_count: usize,
    /// A hand-off claim failed (shared GPUs: every GPU free in time is claimed by or
    /// reserved for another shard): the waiting head waits for the next event (a hand-off,
    /// a timer, an arrival) instead of a hand-off time that has passed, which would spin.
    handoff_blocked: bool,
    /// Sum of the models' demands, GPU-seconds per second.
    demand_total: f64,
    /// Demand at or past `saturation_threshold` of the GPUs: deferral is switched off.
    saturated: bool,
    /// With `correction_idle`: when each GPU's last measured batch finished (by GPU index).
    gpu_finished_ns: Vec<Option<u64>>,
    /// The tightest SLO of any model ([`kept_batch_sizes`]).
    slo_min_ns: u64,
}

impl Deferred<GpuPool> {
    /// Over a pool of `gpu_count` GPUs of its own.
    pub fn new(config: Config, models: &[ModelConfig], gpu_count: u32, knobs: &Knobs) -> Deferred<GpuPool> {
        Deferred::with_source(config, models, GpuPool::new(gpu_count), knobs)
    }
}

impl<G: GpuSource> Deferred<G> {
    /// Plans model `model` with `profile` from now on; its target batch size follows.
    fn plan_with(&mut self, model: u32, profile: Profile) {
        let state = &mut self.models[model as usize];
        let rate_rps = state.meter.rate_rps();
        state.profile = profile;
        let target = target_batch_size(&state.profile, state.slo_ns, rate_rps, &self.knobs);
        state.set_target(target, self.slo_min_ns, &self.knobs);
    }

    /// Over the GPUs of `pool`.
    pub fn with_source(config: Config, models: &[ModelConfig], pool: G, knobs: &Knobs) -> Deferred<G> {
        let slo_min_ns = models.iter().map(|m| m.slo_ns).min().unwrap_or(0);
        let models = models
            .iter()
            .map(|m| {
                let mut state = ModelState {
                    profile: m.profile.clone(),
                    slo_ns: m.slo_ns,
                    queue: VecDeque::with_capacity(4 * m.profile.batch_size_max() as usize),
                    prefix_len: 0,
                    tail_key: UNKNOWN_TAIL,
                    meter: RateMeter::new(knobs.rate_sample_ns, knobs.rate_window_ns),
                    target_batch_size: 1,
                    kept: 1,
                    saturated_kept: 1,
                    last_exec_at_ns: 0,
                    waiting: None,
                    rated: false,
                    active: false,
                    demand: 0.0,
                    corrector: knobs.correction.then(|| Box::new(Corrector::new(m.profile.clone()))),
                    idle_corrector: knobs.correction_idle.then(Box::default),
                };
                state.set_target(target_batch_size(&m.profile, m.slo_ns, None, knobs), slo_min_ns, knobs);
                state
            })
            .collect::<Vec<_>>();
        Deferred {
            config,
            knobs: knobs.clone(),
            timers: TimerQueue::new(models.len()),
            waiting: TimerQueue::new(models.len()),
            rated_count: 0,
            active_count: 0,
            recent_exec_ns: 0,
            models,
            pool,
            queued_count: 0,
            handoff_blocked: false,
            demand_total: 0.0,
            saturated: false,
            gpu_finished_ns: Vec::new(),
            slo_min_ns,
        }
    }

    pub fn config(&self) -> Config {
        self.config
    }

    /// Where model `model`'s online correction stands: by batch-size range, else by idle
    /// gap (`None` with both off).
    pub fn correction_of(&self, model: u32) -> Option<CorrectionSummary> {
        let state = &self.models[model as usize];
        match (&state.corrector, &state.idle_corrector) {
            (Some(c), _) => Some(c.summary(model)),
            (None, Some(c)) => {
                let (factor_min, factor_max) = c.range();
                Some(CorrectionSummary {
                    model,
                    measured: c.measured(),
                    updates: c.updates,
                    factor_min,
                    factor_max,
                })
            }
            (None, None) => None,
        }
    }

    pub fn target_batch_size(&self, model: u32) -> u32 {
        self.models[model as usize].target_batch_size
    }

    /// Removes a queued request (its client went away) before it uses a GPU; returns whether
    /// it was still queued. Planned requests are past recall. The model's candidate is formed
    /// again without it.
    #[cfg(test)]
    pub fn cancel(&mut self, now_ns: u64, model: u32, request_id: u64, out: &mut Output) -> bool {
        let index = model as usize;
        let state = &mut self.models[index];
        let Some(position) = state.queue.iter().position(|r| r.id == request_id) else {
            return false;
        };
        state.queue.remove(position);
        state.tail_key = UNKNOWN_TAIL;
        if position < state.prefix_len {
            state.prefix_len -= 1;
        }
        self.queued_count -= 1;
        self.update(index, now_ns, out);
        true
    }

    /// The scheduler's invariants in full (the VOPR checks them after every input): the
    /// queued count is the sum of the queues, each queue is in deadline order with its prefix
    /// inside it, the active and rated counts match the models, and a waiting model is posted.
    pub fn check_invariants(&self) {
        let queued: usize = self.models.iter().map(|m| m.queue.len()).sum();
        assert_eq!(queued, self.queued_count, "queued_count against the queues");
        for (index, m) in self.models.iter().enumerate() {
            assert!(m.prefix_len <= m.queue.len(), "model {index}: prefix past its queue");
            if let Some(last) = m.queue.back() {
                assert!(
                    m.tail_key == UNKNOWN_TAIL || m.tail_key == last.order_key(),
                    "model {index}: tail key against its queue"
                );
            }
            assert!(
                m.queue
                    .iter()
                    .zip(m.queue.iter().skip(1))
                    .all(|(a, b)| a.order_key() <= b.order_key()),
                "model {index}: queue out of deadline order"
            );
        }
        let active = self.models.iter().filter(|m| m.active).count() as u32;
        let rated = self.models.iter().filter(|m| m.rated).count() as u32;
        assert_eq!(
            (active, rated),
            (self.active_count, self.rated_count),
            "active and rated counts"
        );
    }

    /// The GPU source (for a shard: its view of the shared table).
    pub fn gpus(&self) -> &G {
        &self.pool
    }

    /// Whether deferral is switched off because the GPUs are saturated (ours).
    pub fn is_saturated(&self) -> bool {
        self.saturated
    }

    fn drop_policy(&self) -> DropPolicy {
        if self.saturated {
            self.config.saturated_drop
        } else {
            self.config.drop
        }
    }

    fn condition(&self) -> Condition {
        if self.saturated {
            Condition::Immediately
        } else {
            self.config.condition
        }
    }

    /// A sample boundary passed for model `index`: new target batch size and demand.
    fn on_rate_sample(&mut self, index: usize) {
        let model = &mut self.models[index];
        let rate_rps = model.meter.rate_rps();
        let target = target_batch_size(&model.profile, model.slo_ns, rate_rps, &self.knobs);
        model.set_target(target, self.slo_min_ns, &self.knobs);
        let rated = rate_rps.is_some_and(|r| r > 0.0);
        if rated != model.rated {
            model.rated = rated;
            if rated {
                self.rated_count += 1;
            } else {
                self.rated_count -= 1;
            }
        }
        let b = model.target_batch_size;
        let demand = rate_rps.unwrap_or(0.0) * model.profile.exec_ns(b) as f64 / 1e9 / f64::from(b);
        self.demand_total += demand - model.demand;
        model.demand = demand;
        let Some(threshold) = self.config.saturation_threshold else {
            return;
        };
        self.saturated = self.demand_total >= threshold * self.pool.capacity();
    }

    /// The GPUs the current load needs with deferral: over the models, rate x the run time
    /// of its target batch / that batch's size (GPU-seconds a second).
    pub fn demand_gpus(&self) -> f64 {
        self.demand_total.max(0.0)
    }

    /// Sections 2 and 3: forms model `index`'s candidate batch for a GPU free at
    /// `gpu_free_at_ns`, dropping the heads that cannot be served. Returns `(b, D)`.
    ///
    /// `factor` scales the profile to the GPU class planned for (1: as profiled). With
    /// `may_drop` false nothing is dropped (another class is only being evaluated): a queue
    /// no batch of which fits gives `None`.
    fn form_batch(
        &mut self,
        index: usize,
        now_ns: u64,
        gpu_free_at_ns: u64,
        factor: f64,
        may_drop: bool,
        out: &mut Output,
    ) -> Option<(u32, u64)> {
        let drop = self.drop_policy();
        let knobs = &self.knobs;
        let ModelState {
            profile,
            queue,
            prefix_len,
            target_batch_size,
            kept,
            saturated_kept,
            ..
        } = &mut self.models[index];
        let batch_size_max = profile.batch_size_max() as usize;
        // fin(b) = max(now + d_ctrl + d_data*b, gpu_free_at) + pre + l(b) + post
        let fin = |b: usize| -> u64 {
            let b = b.min(batch_size_max) as u32;
            // Saturating: a source with no GPU at all says `u64::MAX` (nothing can be served).
            (now_ns + knobs.lead_ns(b))
                .max(gpu_free_at_ns)
                .saturating_add(scale_ns(profile.exec_ns(b), factor))
        };
        if queue.is_empty() {
            return None;
        }
        // The target batch, or less ([`kept_batch_sizes`]).
        let target = match drop {
            DropPolicy::DropTimeout => 1,
            DropPolicy::WindowDrop | DropPolicy::WindowFcfs if self.saturated => *saturated_kept as usize,
            DropPolicy::WindowDrop | DropPolicy::WindowFcfs if self.config.long_slo_keep => *kept as usize,
            DropPolicy::WindowDrop | DropPolicy::WindowFcfs => *target_batch_size as usize,
        };
        let mut b;
        if drop == DropPolicy::WindowFcfs {
            // Never drop the head: late requests ride along in order.
            *prefix_len = 0;
            b = target.min(queue.len()).min(batch_size_max);
        } else {
            // 1. Heads that do not fit a whole-suffix batch move to the prefix.
            while *prefix_len < queue.len() && queue[*prefix_len].deadline_ns < fin(queue.len() - *prefix_len) {
                *prefix_len += 1;
            }
            // 2. The target size, bounded by the suffix.
            b = target.min(queue.len() - *prefix_len).min(batch_size_max);
            if b == 0 && !may_drop {
                return None;
            }
            if b == 0 {
                // Every queued request failed even a batch of one: none can be served.
                self.queued_count -= queue.len();
                out.drops.extend(queue.drain(..));
                *prefix_len = 0;
                return None;
            }
            // 3. Prefix heads that miss a batch of `b` are dropped.
            while may_drop && *prefix_len > 0 && queue[0].deadline_ns < fin(b) {
                out.drops.push(queue.pop_front().expect("prefix is not empty"));
                *prefix_len -= 1;
                self.queued_count -= 1;
            }
        }
        // 4. The batch deadline: the head of the prefix, else of the suffix.
        let deadline_ns = queue[0].deadline_ns;
        // 5. Free lunch: grow while the deadline still holds.
        let limit = queue.len().min(batch_size_max);
        while b < limit && deadline_ns >= fin(b + 1) {
            b += 1;
        }
        debug_assert!(b >= 1);
        Some((b as u32, deadline_ns))
    }

    /// Section 5: the window of a candidate `(b, D)` formed at `now_ns`.
    fn window(&self, index: usize, now_ns: u64, batch_size: u32, deadline_ns: u64, factor: f64) -> Window {
        let knobs = &self.knobs;
        let model = &self.models[index];
        let profile = &model.profile;
        let exec_ns = scale_ns(profile.exec_ns(batch_size), factor);
        let earliest_ns = now_ns + knobs.lead_ns(batch_size);
        let latest_ns = deadline_ns.saturating_sub(knobs.jitter_ns + exec_ns);
        // No larger batch exists: nothing to wait for.
        let frontrun_ns = profile
            .exec_ns_checked(batch_size + 1)
            .map_or(earliest_ns, |exec_next_ns| {
                deadline_ns.saturating_sub(knobs.jitter_ns + scale_ns(exec_next_ns, factor) + knobs.d_data_ns)
            });
        let choice_ns = match self.condition() {
            Condition::Frontrun => frontrun_ns,
            Condition::Latest => latest_ns,
            Condition::TargetBatchSize if batch_size >= model.target_batch_size => earliest_ns,
            Condition::TargetBatchSize => frontrun_ns,
            Condition::TargetQueuingDelay => match model.meter.rate_rps() {
                Some(rate_rps) if rate_rps > 0.0 => {
                    let gap_ns = f64::from(model.target_batch_size) / rate_rps * 1e9;
                    model.last_exec_at_ns.saturating_add(gap_ns as u64)
                }
                _ => frontrun_ns,
            },
            Condition::Immediately => earliest_ns,
        };
        let margin_ns = if self.config.contention_margin {
            let rated_others = self.rated_count.saturating_sub(u32::from(model.rated));
            let active_others = self.active_count.saturating_sub(u32::from(model.active));
            let others = rated_others.max(active_others);
            let gpus = self.pool.gpu_count();
            let scaled = self.recent_exec_ns as f64 * self.knobs.contention_margin_factor;
            (scaled * f64::from(others.min(gpus)) / f64::from(gpus)) as u64
        } else {
            0
        };
        Window {
            batch_size,
            deadline_ns,
            exec_at_ns: earliest_ns.max(choice_ns.min(latest_ns).saturating_sub(margin_ns)),
            invalid_after_ns: deadline_ns.saturating_sub(exec_ns),
        }
    }

    /// Recomputes model `index`'s candidate after any change, granting GPUs while its window
    /// is open, and re-arms its timer.
    fn update(&mut self, index: usize, now_ns: u64, out: &mut Output) {
        // The control plane's cheap preconditions (on in release).
        assert!(self.models[index].prefix_len <= self.models[index].queue.len());
        assert!(
            self.models[index].queue.len() <= self.queued_count,
            "queued_count counts every queue"
        );
        if self.pool.class_factors().len() > 1 && self.knobs.class_planning == ClassPlanning::PerClass {
            return self.update_classes(index, now_ns, out);
        }
        let factor = self.plan_factor() * self.idle_factor(index, None);
        loop {
            let min_free_at_ns = self.pool.min_free_at_ns();
            let Some((b, deadline_ns)) = self.form_batch(index, now_ns, min_free_at_ns, factor, true, out) else {
                self.set_waiting(index, None);
                self.timers.cancel(index as u32);
                self.set_active(index, false);
                return;
            };
            let window = self.window(index, now_ns, b, deadline_ns, factor);
            let lead_ns = self.knobs.lead_ns(b);
            if min_free_at_ns > window.exec_at_ns {
                // No GPU frees in time: wait for the hand-off, and recompute when the batch
                // can no longer start in time.
                self.wait_for_handoff(index, window, now_ns);
                return;
            }
            self.set_waiting(index, None);
            let request_at_ns = window.exec_at_ns - lead_ns;
            if request_at_ns > now_ns {
                self.timers.set(index as u32, request_at_ns);
                return;
            }
            let Some(claim) = self.pool.claim(window.exec_at_ns, self.config.grant) else {
                // Shared GPUs: another claimer was faster than the snapshot. Wait.
                self.wait_for_handoff(index, window, now_ns);
                return;
            };
            self.grant(index, claim, now_ns, out);
        }
    }

    /// The factor every GPU is planned with when classes are not planned apart: 1 (the
    /// profile as given), the slowest class's, or, per class with a single class, its own.
    fn plan_factor(&self) -> f64 {
        let factors = self.pool.class_factors();
        match self.knobs.class_planning {
            ClassPlanning::AsProfiled => 1.0,
            ClassPlanning::Slowest => factors.iter().copied().fold(f64::MIN, f64::max),
            ClassPlanning::PerClass => factors[0],
        }
    }

    /// With idle correction, model `index`'s factor for a batch whose GPU idles `idle_ns`
    /// first (`None`: not known yet, the largest); 1 without.
    fn idle_factor(&self, index: usize, idle_ns: Option<u64>) -> f64 {
        match (&self.models[index].idle_corrector, idle_ns) {
            (None, _) => 1.0,
            (Some(c), Some(idle_ns)) => c.factor(idle_ns),
            (Some(c), None) => c.factor_max(),
        }
    }

    /// The factor a plan granted on `gpu` is planned with.
    fn gpu_factor(&self, gpu: u32) -> f64 {
        match self.knobs.class_planning {
            ClassPlanning::PerClass => self.pool.class_factors()[self.pool.class_of(gpu)],
            ClassPlanning::Slowest | ClassPlanning::AsProfiled => self.plan_factor(),
        }
    }

    /// [`Deferred::update`] over GPUs of several speeds: the candidate is formed for each
    /// class with that class's profile and earliest free GPU, and among the classes where a
    /// GPU frees in time and the batch still meets its deadline, the one whose window opens
    /// first is planned for (the most urgent: deferring to a faster class's later window
    /// risks finding its GPUs taken by then, measured to cost the reference configuration 42
    /// to 66 % of its goodput); with none, the candidate waits for a hand-off. Heads are
    /// dropped only when even the class that would finish a batch of one first cannot serve
    /// them.
    fn update_classes(&mut self, index: usize, now_ns: u64, out: &mut Output) {
        let classes = self.pool.class_factors().len();
        let idle = self.idle_factor(index, None);
        loop {
            let lead_1 = self.knobs.lead_ns(1);
            let exec_1 = self.models[index].profile.exec_ns(1);
            let (best, best_free_ns) = (0..classes)
                .map(|c| (c, self.pool.min_free_at_in(c)))
                .min_by_key(|&(c, free_ns)| {
                    let factor = self.pool.class_factors()[c] * idle;
                    (now_ns + lead_1).max(free_ns).saturating_add(scale_ns(exec_1, factor))
                })
                .expect("at least one class");
            let best_factor = self.pool.class_factors()[best] * idle;
            let Some((b, deadline_ns)) = self.form_batch(index, now_ns, best_free_ns, best_factor, true, out) else {
                self.set_waiting(index, None);
                self.timers.cancel(index as u32);
                self.set_active(index, false);
                return;
            };
            let prefix_len = self.models[index].prefix_len;
            let mut chosen: Option<(usize, Window)> = None;
            let mut wait_for = self.window(index, now_ns, b, deadline_ns, best_factor);
            for class in 0..classes {
                let factor = self.pool.class_factors()[class] * idle;
                let free_ns = self.pool.min_free_at_in(class);
                let formed = if class == best {
                    Some((b, deadline_ns))
                } else {
                    let formed = self.form_batch(index, now_ns, free_ns, factor, false, out);
                    self.models[index].prefix_len = prefix_len;
                    formed
                };
                let Some((b_c, deadline_c)) = formed else { continue };
                let window = self.window(index, now_ns, b_c, deadline_c, factor);
                let exec_ns = scale_ns(self.models[index].profile.exec_ns(b_c), factor);
                let finish_ns = window.exec_at_ns.max(free_ns).saturating_add(exec_ns);
                if free_ns > window.exec_at_ns || finish_ns > deadline_c {
                    if window.invalid_after_ns > wait_for.invalid_after_ns {
                        wait_for = window;
                    }
                    continue;
                }
                if chosen.is_none_or(|(_, w)| window.exec_at_ns < w.exec_at_ns) {
                    chosen = Some((class, window));
                }
            }
            let Some((class, window)) = chosen else {
                // No class frees a GPU in time: wait for the hand-off, and recompute when
                // the batch can no longer start in time on any.
                self.wait_for_handoff(index, wait_for, now_ns);
                return;
            };
            let lead_ns = self.knobs.lead_ns(window.batch_size);
            self.set_waiting(index, None);
            let request_at_ns = window.exec_at_ns - lead_ns;
            if request_at_ns > now_ns {
                self.timers.set(index as u32, request_at_ns);
                return;
            }
            let Some(claim) = self.pool.claim_in(class, window.exec_at_ns, self.config.grant) else {
                self.wait_for_handoff(index, window, now_ns);
                return;
            };
            self.grant(index, claim, now_ns, out);
        }
    }

    /// Section 6, on a grant: re-forms the batch with the GPU's real `free_at` (and its
    /// class's profile), pops it and emits the plan.
    fn grant(&mut self, index: usize, claim: GpuClaim, now_ns: u64, out: &mut Output) {
        let gpu = claim.gpu;
        let gpu_free_at_ns = claim.free_at_ns.max(now_ns);
        // The gap the GPU idles before this batch, about: from its last planned finish to a
        // start one lead from now.
        let idle_ns = (now_ns + self.knobs.lead_ns(1)).saturating_sub(claim.free_at_ns);
        let factor = self.gpu_factor(gpu) * self.idle_factor(index, Some(idle_ns));
        let Some((b, deadline_ns)) = self.form_batch(index, now_ns, gpu_free_at_ns, factor, true, out) else {
            self.pool.cancel(claim); // An empty batch returns the GPU at once.
            return;
        };
        let window = self.window(index, now_ns, b, deadline_ns, factor);
        let exec_ns = scale_ns(self.models[index].profile.exec_ns(b), factor);
        let exec_at_ns = window.exec_at_ns.max(gpu_free_at_ns);
        let finish_ns = exec_at_ns + exec_ns;
        // A decaying maximum: the long batches of the last few dozen are what can block.
        self.recent_exec_ns = exec_ns.max(self.recent_exec_ns - self.recent_exec_ns / 32);
        let model = &mut self.models[index];
        let taken = b as usize;
        model.prefix_len = model.prefix_len.saturating_sub(taken);
        model.last_exec_at_ns = exec_at_ns;
        self.queued_count -= taken;
        let plan = out.push_plan(gpu, index as u32, exec_at_ns, finish_ns, model.queue.drain(..taken));
        debug_assert!(plan.exec_at_ns >= now_ns + self.knobs.lead_ns(b));
        self.pool.release(claim, finish_ns);
    }

    /// No GPU frees in time for model `index`'s candidate: it waits for a hand-off, and is
    /// formed again when it can no longer start in time.
    fn wait_for_handoff(&mut self, index: usize, window: Window, now_ns: u64) {
        let lead_ns = self.knobs.lead_ns(window.batch_size);
        self.set_waiting(index, Some(window));
        self.timers.set(
            index as u32,
            window.invalid_after_ns.saturating_sub(lead_ns).max(now_ns + 1),
        );
    }

    /// Waiting model `index`'s hand-off rank after an arrival joined it: the
    /// `invalid_after` of a batch of its whole queue (as large as the profile allows), when
    /// that is earlier than its rank. Its window, formed with a smaller batch, ranks it later
    /// than its queue's deadline allows: the GPUs then go first to the models formed again
    /// moments ago with a request or two, in small batches, while the long queues wait until
    /// their heads are dropped (`docs/internals/scheduling.md`, section 8.3).
    fn rank_by_queue(&mut self, index: usize) {
        let model = &self.models[index];
        let batch_size = model.queue.len().min(model.profile.batch_size_max() as usize) as u32;
        let exec_ns = scale_ns(model.profile.exec_ns(batch_size), self.plan_factor());
        let rank_ns = model.queue[0].deadline_ns.saturating_sub(exec_ns);
        if self.waiting.due_ns(index as u32).is_some_and(|due_ns| rank_ns < due_ns) {
            self.waiting.set(index as u32, rank_ns);
        }
    }

    fn set_active(&mut self, index: usize, active: bool) {
        let model = &mut self.models[index];
        if model.active != active {
            model.active = active;
            if active {
                self.active_count += 1;
            } else {
                self.active_count -= 1;
            }
        }
    }

    fn set_waiting(&mut self, index: usize, window: Option<Window>) {
        self.models[index].waiting = window;
        match window {
            Some(w) => self.waiting.set(index as u32, w.invalid_after_ns),
            None => self.waiting.cancel(index as u32),
        }
    }

    /// The waiting candidate a freed GPU goes to: the earliest rank.
    fn waiting_head(&mut self) -> Option<(u32, Window)> {
        let (_, model) = self.waiting.peek()?;
        Some((model, self.models[model as usize].waiting.expect("listed models wait")))
    }

    /// When the next GPU frees early enough for the waiting head to be granted it.
    fn hand_off_at_ns(&mut self) -> Option<u64> {
        if self.handoff_blocked {
            return None;
        }
        let (head, window) = self.waiting_head()?;
        // Arrivals behind the head join without re-forming the candidate: the batch granted
        // may be as large as the queue, so hand off early enough for all its inputs.
        let model = &self.models[head as usize];
        let batch_size = window
            .batch_size
            .max(model.queue.len().min(model.profile.batch_size_max() as usize) as u32);
        Some(
            self.pool
                .min_free_at_ns()
                .saturating_sub(self.knobs.lead_ns(batch_size)),
        )
    }
}

/// Section 4: the target batch size from the observed rate (`None`: no rate yet).
///
/// Both of the section's cases are one test: with `n = rate * l(b) / b` GPUs needed, a batch
/// fits when `l(b) * (1 + 1/n) = l(b) + b / rate` (more than one GPU) or `l(b) + b / rate`
/// (one GPU at most) stays within the budget less `d_data * b`. That grows with `b` (the
/// profile is monotone), as does the no-rate test `l(b)`, so the largest fitting `b` is found
/// by bisection: this runs at every rate sample of every model, and a linear profile is
/// tabulated up to `BATCH_SIZE_LIMIT` (1,024) batch sizes.
pub fn target_batch_size(profile: &Profile, slo_ns: u64, rate_rps: Option<f64>, knobs: &Knobs) -> u32 {
    let budget_ns = slo_ns.saturating_sub(knobs.d_ctrl_ns + knobs.d_resp_ns) as f64;
    match rate_rps {
        None => {
            // The largest b with l(b) <= slo/2 - d_resp - pre - post.
            let bound_ns = (slo_ns / 2).saturating_sub(knobs.d_resp_ns + profile.pre_ns() + profile.post_ns());
            largest_fitting(profile.batch_size_max(), |b| profile.latency_ns(b) <= bound_ns)
        }
        Some(rate_rps) => {
            let ns_per_request = 1e9 / rate_rps.max(1e-9);
            largest_fitting(profile.batch_size_max(), |b| {
                let exec_ns = profile.exec_ns(b) as f64;
                let data_ns = (knobs.d_data_ns * u64::from(b)) as f64;
                exec_ns + f64::from(b) * ns_per_request <= budget_ns - data_ns
            })
        }
    }
}

/// The batches window drop keeps for a model of `target`, before and once the GPUs saturate
/// (section 3 keeps the target itself; these are ours). Once saturated, a fraction of the
/// target (`saturated_target_fraction`), so a model that fell behind drops a few heads rather
/// than spiralling into tiny batches. And for a model whose SLO is `long_slo_ratio` times the
/// tightest or more, in both, no more than the smallest batch whose time per request is within
/// `long_slo_keep_tolerance` of the target's: where GPUs are contended, the
/// earliest-`invalid_after` hand-off serves the tight models first and a long-SLO model's
/// heads wait until the kept batch no longer fits them; a batch nearly as cheap per request
/// serves them instead of dropping them (`docs/internals/scheduling.md`, section 8.1).
pub fn kept_batch_sizes(profile: &Profile, slo_ns: u64, target: u32, slo_min_ns: u64, knobs: &Knobs) -> (u32, u32) {
    let fraction = ((f64::from(target) * knobs.saturated_target_fraction).ceil() as u32).max(1);
    let long_slo = slo_ns as f64 >= knobs.long_slo_ratio * slo_min_ns as f64;
    if knobs.long_slo_keep_tolerance <= 0.0 || !long_slo {
        return (target, fraction);
    }
    let capped = target.min(profile.batch_size_max());
    let per_request = |b: u32| profile.exec_ns(b) as f64 / f64::from(b);
    let bound = (1.0 + knobs.long_slo_keep_tolerance) * per_request(capped);
    let near = (1..capped).find(|&b| per_request(b) <= bound).unwrap_or(capped);
    (target.min(near), fraction.min(near))
}

/// The largest `b` in `1..=max` with `fits(b)`, for a `fits` that holds up to some size and
/// not past it; 1 when none fits.
fn largest_fitting(max: u32, fits: impl Fn(u32) -> bool) -> u32 {
    let (mut low, mut high) = (1, max + 1); // fits below `low` (or low = 1), not from `high`
    while low < high {
        let mid = low + (high - low) / 2;
        if fits(mid) {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    (low - 1).max(1)
}

impl<G: GpuSource> Serving for Deferred<G> {
    type Gpus = G;

    /// The profile model `model` is planned with.
    fn profile(&self, model: u32) -> &Profile {
        &self.models[model as usize].profile
    }

    /// Plans model `model` with `profile` from now on (an executor measured it). The target
    /// batch size follows; queued requests are formed again at the next event.
    fn set_profile(&mut self, model: u32, profile: Profile) {
        if let Some(corrector) = self.models[model as usize].corrector.as_mut() {
            // Measurements so far were against another profile.
            corrector.rebase(profile.clone());
        }
        self.plan_with(model, profile);
    }

    /// Removes every queued request of `model` whose id `cancelled` says, in one pass (a
    /// client that went away with many requests); returns the ids removed. The model's
    /// candidate is formed again without them.
    fn cancel_all(&mut self, now_ns: u64, model: u32, cancelled: impl Fn(u64) -> bool, out: &mut Output) -> Vec<u64> {
        let index = model as usize;
        let state = &mut self.models[index];
        let mut removed = Vec::new();
        let mut position = 0;
        let prefix_len = state.prefix_len;
        let mut prefix_removed = 0;
        state.queue.retain(|r| {
            let keep = !cancelled(r.id);
            if !keep {
                removed.push(r.id);
                prefix_removed += usize::from(position < prefix_len);
            }
            position += 1;
            keep
        });
        state.prefix_len -= prefix_removed;
        state.tail_key = UNKNOWN_TAIL;
        self.queued_count -= removed.len();
        if !removed.is_empty() {
            self.update(index, now_ns, out);
        }
        removed
    }

    /// Whether model `model` holds, while the GPUs are saturated, twice the requests its
    /// share of the GPUs (all of them over the models that hold requests) could serve within
    /// its SLO at its largest batch: a new request of it then has no chance, and a front door
    /// may refuse it at once (`OVERLOADED`) instead of queueing it to be dropped later.
    fn is_swamped(&self, model: u32) -> bool {
        if !self.saturated {
            return false;
        }
        let state = &self.models[model as usize];
        let batch_size_max = state.profile.batch_size_max();
        let exec_ns = state.profile.exec_ns(batch_size_max).max(1);
        let rounds = (state.slo_ns / exec_ns).max(1);
        let share = f64::from(self.pool.gpu_count()) / f64::from(self.active_count.max(1));
        let servable = share.max(1.0) * (rounds * u64::from(batch_size_max)) as f64;
        state.queue.len() as f64 >= 2.0 * servable
    }

    /// The earliest hand-off rank of the candidates waiting for a GPU (their `invalid_after`,
    /// or the earlier one their queues give: [`Deferred::rank_by_queue`]), if
    /// any: what a shard posts to the shared GPU table so other shards' releases hand it a GPU.
    fn waiting_invalid_after_ns(&mut self) -> Option<u64> {
        self.waiting.peek().map(|(invalid_after_ns, _)| invalid_after_ns)
    }

    fn gpus_mut(&mut self) -> &mut G {
        &mut self.pool
    }
}

impl<G: GpuSource> Policy for Deferred<G> {
    fn on_arrival(&mut self, now_ns: u64, request: Request, out: &mut Output) {
        let index = request.model as usize;
        let model = &mut self.models[index];
        if model.meter.record(now_ns) {
            self.on_rate_sample(index);
        }
        let model = &mut self.models[index];
        // EDF insertion: almost always an append. A request due before some of the prefix
        // (a tighter SLO, a re-planned request) joins the prefix, so the queue stays in
        // deadline order and a batch's first request is its earliest deadline.
        let key = request.order_key();
        let mut position = model.queue.len();
        if key < model.tail_key {
            while position > 0 && model.queue[position - 1].order_key() > key {
                position -= 1;
            }
        }
        if position < model.prefix_len {
            model.prefix_len += 1;
        }
        if position == model.queue.len() {
            model.tail_key = key;
            model.queue.push_back(request);
        } else {
            model.queue.insert(position, request);
        }
        // A waiting candidate is re-formed at its hand-off or when it goes stale; an arrival
        // behind its head changes neither, so it only joins the queue (the control plane
        // runs once per batch, not once per request).
        let joins_only = model.waiting.is_some() && position > 0;
        self.queued_count += 1;
        self.set_active(index, true);
        if joins_only {
            if self.config.queue_rank {
                self.rank_by_queue(index);
            }
            return;
        }
        self.update(index, now_ns, out);
    }

    fn on_timer(&mut self, now_ns: u64, out: &mut Output) {
        self.handoff_blocked = false;
        while let Some(key) = self.timers.pop_due(now_ns) {
            self.update(key as usize, now_ns, out);
        }
        // Hand freed GPUs to waiting candidates, earliest `invalid_after` first. Each round
        // grants a GPU or empties the head's queue, so the loop ends.
        while let Some(at_ns) = self.hand_off_at_ns() {
            if at_ns > now_ns {
                break;
            }
            let (head, window) = self.waiting_head().expect("hand-off has a head");
            self.set_waiting(head as usize, None);
            let start_ns = self
                .pool
                .min_free_at_ns()
                .max(now_ns + self.knobs.lead_ns(window.batch_size));
            let Some(claim) = self.pool.claim(start_ns, self.config.grant) else {
                // Shared GPUs: taken since the snapshot. The head waits on; its next chance
                // is a later event (a single-owner pool never gets here).
                self.set_waiting(head as usize, Some(window));
                self.handoff_blocked = true;
                break;
            };
            self.grant(head as usize, claim, now_ns, out);
            self.update(head as usize, now_ns, out);
        }
    }

    fn on_completion(&mut self, _now_ns: u64, completion: &Completion, _out: &mut Output) {
        // The pool already knows each plan's planned finish. With correction on, what the
        // batch really took corrects the profile its model plans with next.
        let model = completion.model;
        if self.models[model as usize].idle_corrector.is_some() {
            let gpu = completion.gpu as usize;
            if self.gpu_finished_ns.len() <= gpu {
                self.gpu_finished_ns.resize(gpu + 1, None);
            }
            let previous = self.gpu_finished_ns[gpu].replace(completion.finished_ns);
            let idle_ns = previous.map_or(u64::MAX, |f| completion.started_ns.saturating_sub(f));
            let planned_ns = {
                let state = &self.models[model as usize];
                (state.profile.exec_ns(completion.batch_size) as f64 * self.gpu_factor(completion.gpu)) as u64
            };
            let measured_ns = completion.finished_ns.saturating_sub(completion.started_ns);
            let state = &mut self.models[model as usize];
            state
                .idle_corrector
                .as_mut()
                .expect("checked")
                .record(idle_ns, planned_ns, measured_ns);
        }
        if self.models[model as usize].corrector.is_none() {
            return;
        }
        let measured_ns = completion.finished_ns.saturating_sub(completion.started_ns);
        // Against the profile it was planned with: a slow class's batch is not an error.
        let factor = self.gpu_factor(completion.gpu);
        let measured_ns = if factor == 1.0 {
            measured_ns
        } else {
            (measured_ns as f64 / factor).round() as u64
        };
        let Some(corrector) = self.models[model as usize].corrector.as_mut() else {
            return;
        };
        if let Some(profile) = corrector.record(completion.batch_size, measured_ns) {
            self.plan_with(model, profile);
        }
    }

    fn corrections(&self) -> Vec<CorrectionSummary> {
        (0..self.models.len() as u32)
            .filter_map(|m| self.correction_of(m))
            .collect()
    }

    fn demand_gpus(&self) -> Option<f64> {
        Some(Deferred::demand_gpus(self))
    }

    fn set_gpu_available(&mut self, now_ns: u64, gpu: u32, free_at_ns: Option<u64>, out: &mut Output) -> bool {
        if !self.pool.set_available(gpu, free_at_ns) {
            return false;
        }
        // A GPU that joined goes to the waiting candidates (a hand-off); one that left is
        // simply never granted again.
        self.on_timer(now_ns, out);
        true
    }

    fn next_timer_ns(&mut self) -> Option<u64> {
        match (self.timers.next_ns(), self.hand_off_at_ns()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn queued_count(&self) -> usize {
        self.queued_count
    }
}

#[cfg(test)]
mod tests {
    //! The equations of `docs/internals/scheduling.md` against hand-computed numbers.
    //! Profile: l(b) = 1 ms * b + 5 ms, no pre/post; SLO 100 ms; the spec's default delays
    //! (d_ctrl 0.1 ms, d_data 0.05 ms per request, d_resp 2 ms, jitter 0.1 ms).
    use super::*;
    use crate::policy::{MS, US};

    fn model() -> ModelConfig {
        ModelConfig {
            name: "m".into(),
            profile: Profile::parse_linear("sleep#1000,5000,0,0", 100 * MS).unwrap(),
            slo_ns: 100 * MS,
        }
    }

    fn deferred(drop: DropPolicy, condition: Condition, gpus: u32) -> Deferred {
        let config = Config {
            drop,
            condition,
            grant: GrantPolicy::LowestIndex,
            saturation_threshold: None,
            saturated_drop: DropPolicy::WindowDrop,
            contention_margin: false,
            long_slo_keep: false,
            queue_rank: false,
        };
        Deferred::new(config, &[model()], gpus, &Knobs::default())
    }

    fn request(id: u64, deadline_ns: u64) -> Request {
        Request {
            id,
            model: 0,
            arrival_ns: 0,
            deadline_ns,
        }
    }

    /// r0 due at 10 ms, nine more due at 60 ms, all queued at t = 0.
    fn load_queue(d: &mut Deferred) {
        d.models[0].queue.push_back(request(0, 10 * MS));
        for id in 1..10 {
            d.models[0].queue.push_back(request(id, 60 * MS));
        }
        d.queued_count = 10;
    }

    /// Section 4 as the paper states it, every batch size tried in turn.
    fn target_batch_size_by_scan(profile: &Profile, slo_ns: u64, rate_rps: f64, knobs: &Knobs) -> u32 {
        let budget_ns = slo_ns.saturating_sub(knobs.d_ctrl_ns + knobs.d_resp_ns) as f64;
        let rate_per_ns = rate_rps / 1e9;
        let mut target = 1;
        for b in 1..=profile.batch_size_max() {
            let exec_ns = profile.exec_ns(b) as f64;
            let data_ns = (knobs.d_data_ns * u64::from(b)) as f64;
            let gpus_needed = rate_per_ns * exec_ns / f64::from(b);
            let fits = if gpus_needed > 1.0 {
                exec_ns * (1.0 + 1.0 / gpus_needed) <= budget_ns - data_ns
            } else {
                exec_ns + f64::from(b) / rate_per_ns + data_ns <= budget_ns
            };
            if fits {
                target = b;
            }
        }
        target
    }

    proptest::proptest! {
        #[test]
        fn the_bisection_finds_what_a_scan_of_every_batch_size_finds(
            slope_us in 0.0f64..3_000.0,
            intercept_us in 0.0f64..20_000.0,
            pre_us in 0.0f64..2_000.0,
            slo_ms in 1u64..500,
            rate_rps in 0.01f64..2_000_000.0,
        ) {
            let slo_ns = slo_ms * MS;
            let Ok(profile) = Profile::parse_linear(&format!("sleep#{slope_us},{intercept_us},{pre_us},0"), slo_ns) else {
                return Ok(());
            };
            let knobs = Knobs::default();
            proptest::prop_assert_eq!(
                target_batch_size(&profile, slo_ns, Some(rate_rps), &knobs),
                target_batch_size_by_scan(&profile, slo_ns, rate_rps, &knobs)
            );
        }
    }

    #[test]
    fn a_long_slo_model_keeps_a_batch_nearly_as_cheap() {
        let k = Knobs::default();
        // l(b) = 2.5 ms * b + 12 ms; target 44: 2.773 ms a request. Within 12 %: 3.105 ms,
        // first reached at b = 20 (2.5 + 12 / 20 = 3.1). The fraction keeps ceil(0.6 * 44) = 27.
        let large = Profile::parse_linear("sleep#2500,12000,0,0", 250 * MS).unwrap();
        assert_eq!(kept_batch_sizes(&large, 250 * MS, 44, 30 * MS, &k), (20, 20));
        // Not 4 times the tightest SLO, or the tolerance off: the target, and the fraction.
        assert_eq!(kept_batch_sizes(&large, 250 * MS, 44, 100 * MS, &k), (44, 27));
        let off = Knobs {
            long_slo_keep_tolerance: 0.0,
            ..k.clone()
        };
        assert_eq!(kept_batch_sizes(&large, 250 * MS, 44, 30 * MS, &off), (44, 27));
        // A small target: the fraction is the smaller once saturated.
        assert_eq!(kept_batch_sizes(&large, 250 * MS, 5, 30 * MS, &k), (5, 3));
    }

    #[test]
    fn target_batch_size_follows_section_4() {
        let p = model().profile;
        let k = Knobs::default();
        // No rate: l(b) <= 100/2 - 2 = 48 ms -> b + 5 <= 48 -> 43.
        assert_eq!(target_batch_size(&p, 100 * MS, None, &k), 43);
        // 200 req/s needs < 1 GPU: (b + 5) + b/0.2 + 0.05 b <= 97.9 -> 6.05 b <= 92.9 -> 15.
        assert_eq!(target_batch_size(&p, 100 * MS, Some(200.0), &k), 15);
        // 2000 req/s, n = 2 (b + 5)/b > 1: (b + 5)(1 + 1/n) = b + 5 + b/2 <= 97.9 - 0.05 b
        // -> 1.55 b <= 92.9 -> 59.
        assert_eq!(target_batch_size(&p, 100 * MS, Some(2000.0), &k), 59);
    }

    #[test]
    fn window_drop_drops_the_head_to_keep_the_batch() {
        let mut d = deferred(DropPolicy::WindowDrop, Condition::Frontrun, 1);
        load_queue(&mut d);
        let mut out = Output::new();
        // Step 1: fin(10) = 0.1 + 0.5 + 15 = 15.6 ms > 10 ms: r0 to the prefix; fin(9) = 14.55
        // holds for 60 ms. Step 2: b = min(43, 9) = 9. Step 3: r0 misses fin(9): dropped.
        let (b, deadline_ns) = d.form_batch(0, 0, 0, 1.0, true, &mut out).unwrap();
        assert_eq!((b, deadline_ns), (9, 60 * MS));
        assert_eq!(out.drops.iter().map(|r| r.id).collect::<Vec<_>>(), vec![0]);
        assert_eq!(d.queued_count, 9);
        // Section 5: frontrun = 60 - 0.1 - l(10) - 0.05 = 44.85 ms; latest = 60 - 0.1 - 14.
        let w = d.window(0, 0, b, deadline_ns, 1.0);
        assert_eq!(w.exec_at_ns, 44_850 * US);
        assert_eq!(w.invalid_after_ns, 46 * MS);
    }

    #[test]
    fn drop_timeout_keeps_the_head_and_takes_a_free_lunch() {
        let mut d = deferred(DropPolicy::DropTimeout, Condition::Frontrun, 1);
        load_queue(&mut d);
        let mut out = Output::new();
        // b = 1, r0 fits alone (fin(1) = 6.15 ms); free lunch on D = 10 ms:
        // fin(4) = 0.3 + 9 = 9.3 fits, fin(5) = 0.35 + 10 = 10.35 does not.
        assert_eq!(d.form_batch(0, 0, 0, 1.0, true, &mut out).unwrap(), (4, 10 * MS));
        assert!(out.drops.is_empty());
        // The GPU frees at 5 ms: fin(1) = 5 + 6 = 11 ms misses r0's 10 ms: dropped.
        assert_eq!(d.form_batch(0, 0, 5 * MS, 1.0, true, &mut out).unwrap().1, 60 * MS);
        assert_eq!(out.drops.len(), 1);
    }

    #[test]
    fn a_request_due_before_the_prefix_goes_first() {
        let mut d = deferred(DropPolicy::DropTimeout, Condition::Latest, 1);
        load_queue(&mut d);
        let mut out = Output::new();
        // r0 (due 10 ms) cannot ride a whole-queue batch: it is the prefix.
        d.form_batch(0, 0, 0, 1.0, true, &mut out).unwrap();
        assert_eq!(d.models[0].prefix_len, 1);
        // A tighter SLO: due at 8 ms, before the prefix's head.
        d.on_arrival(0, request(10, 8 * MS), &mut out);
        let queued: Vec<u64> = d.models[0].queue.iter().map(|r| r.deadline_ns).collect();
        let mut sorted = queued.clone();
        sorted.sort_unstable();
        assert_eq!(queued, sorted, "the queue stays in deadline order");
        assert_eq!(d.models[0].queue[0].id, 10);
        assert_eq!(d.models[0].prefix_len, 2);
        // Every plan finishes by the deadline of each of its requests.
        d.on_timer(100 * MS, &mut out);
        for plan in &out.plans {
            for r in out.plan_requests(plan) {
                assert!(plan.finish_ns <= r.deadline_ns, "{plan:?} misses request {}", r.id);
            }
        }
    }

    /// A shared source whose claims always lose the race.
    #[derive(Debug)]
    struct AlwaysTaken;

    impl GpuSource for AlwaysTaken {
        fn gpu_count(&self) -> u32 {
            1
        }
        fn min_free_at_ns(&self) -> u64 {
            0
        }
        fn claim(&mut self, _exec_at_ns: u64, _policy: GrantPolicy) -> Option<crate::gpu_pool::GpuClaim> {
            None
        }
        fn release(&mut self, _claim: crate::gpu_pool::GpuClaim, _finish_ns: u64) {}
        fn cancel(&mut self, _claim: crate::gpu_pool::GpuClaim) {}
    }

    #[test]
    fn a_hand_off_that_loses_its_claim_waits_for_the_next_event() {
        let config = Config {
            drop: DropPolicy::WindowDrop,
            condition: Condition::Immediately,
            grant: GrantPolicy::LowestIndex,
            saturation_threshold: None,
            saturated_drop: DropPolicy::WindowDrop,
            contention_margin: false,
            long_slo_keep: false,
            queue_rank: false,
        };
        let mut d = Deferred::with_source(config, &[model()], AlwaysTaken, &Knobs::default());
        let mut out = Output::new();
        d.on_arrival(0, request(0, 60 * MS), &mut out);
        let now_ns = MS;
        d.on_timer(now_ns, &mut out);
        assert!(out.plans.is_empty());
        // The GPU looked free but the claim failed: the next wake-up is a later event, not
        // a time already past (which would spin the service's timer loop).
        let next = d.next_timer_ns().expect("the waiting candidate's own timer");
        assert!(next > now_ns, "next timer {next} ns, now {now_ns} ns");
    }

    #[test]
    fn cancel_removes_a_queued_request_and_reforms_the_batch() {
        let mut d = deferred(DropPolicy::WindowDrop, Condition::Frontrun, 1);
        let mut out = Output::new();
        d.on_arrival(0, request(0, 98 * MS), &mut out);
        d.on_arrival(0, request(1, 98 * MS), &mut out);
        assert!(d.cancel(MS, 0, 0, &mut out));
        assert!(!d.cancel(MS, 0, 0, &mut out), "only once");
        assert_eq!(d.queued_count(), 1);
        // The one left is planned alone at its frontrun: 98 - 0.1 - 7 - 0.05 = 90.85 ms.
        let at_ns = d.next_timer_ns().unwrap();
        d.on_timer(at_ns, &mut out);
        assert_eq!(out.plans.len(), 1);
        assert_eq!(out.plan_requests(&out.plans[0])[0].id, 1);
        assert_eq!(out.plans[0].exec_at_ns, 90_850 * US);
    }

    #[test]
    fn cancel_all_removes_in_one_pass_what_cancel_would() {
        let mut d = deferred(DropPolicy::WindowDrop, Condition::Frontrun, 1);
        let mut out = Output::new();
        for id in 0..6 {
            d.on_arrival(0, request(id, 98 * MS), &mut out);
        }
        let removed = d.cancel_all(MS, 0, |id| id % 2 == 0, &mut out);
        assert_eq!(removed, vec![0, 2, 4]);
        assert_eq!(d.queued_count(), 3);
        assert!(d.cancel_all(MS, 0, |id| id % 2 == 0, &mut out).is_empty(), "only once");
        assert!(!d.cancel(MS, 0, 2, &mut out));
        assert!(d.cancel(MS, 0, 3, &mut out));
    }

    #[test]
    fn only_a_saturated_model_holding_twice_its_share_is_swamped() {
        let mut d = deferred(DropPolicy::WindowDrop, Condition::Frontrun, 1);
        let b_max = d.models[0].profile.batch_size_max();
        let rounds = (d.models[0].slo_ns / d.models[0].profile.exec_ns(b_max)).max(1);
        // One GPU, one active model: it can serve `rounds * b_max` within its SLO.
        let twice = 2 * rounds * u64::from(b_max);
        for id in 0..twice {
            d.models[0].queue.push_back(request(id, 98 * MS));
        }
        d.set_active(0, true);
        assert!(!d.is_swamped(0), "not saturated: every request is kept");
        d.saturated = true;
        assert!(d.is_swamped(0));
        d.models[0].queue.pop_back();
        assert!(!d.is_swamped(0), "below twice what it can serve");
    }

    #[test]
    fn window_fcfs_never_drops() {
        let mut d = deferred(DropPolicy::WindowFcfs, Condition::Frontrun, 1);
        load_queue(&mut d);
        let mut out = Output::new();
        assert_eq!(d.form_batch(0, 0, 0, 1.0, true, &mut out).unwrap(), (10, 10 * MS));
        assert!(out.drops.is_empty());
        // latest = 10 - 0.1 - 15 < 0: start at earliest = 0.1 + 0.5 ms.
        assert_eq!(d.window(0, 0, 10, 10 * MS, 1.0).exec_at_ns, 600 * US);
    }

    #[test]
    fn unservable_queue_is_dropped_whole() {
        let mut d = deferred(DropPolicy::WindowDrop, Condition::Frontrun, 1);
        d.models[0].queue.push_back(request(0, 3 * MS));
        d.models[0].queue.push_back(request(1, 4 * MS));
        d.queued_count = 2;
        let mut out = Output::new();
        assert_eq!(d.form_batch(0, 0, 0, 1.0, true, &mut out), None);
        assert_eq!(out.drops.len(), 2);
        assert_eq!(d.queued_count, 0);
    }

    #[test]
    fn schedulable_conditions_pick_their_point_in_the_window() {
        // b = 3, D = 80 ms, now = 10 ms: earliest = 10.25, latest = 80 - 0.1 - 8 = 71.9,
        // frontrun = 80 - 0.1 - 9 - 0.05 = 70.85.
        let cases = [
            (Condition::Frontrun, 70_850 * US),
            (Condition::Latest, 71_900 * US),
            (Condition::Immediately, 10_250 * US),
            // Target 43 not reached: like frontrun.
            (Condition::TargetBatchSize, 70_850 * US),
        ];
        for (condition, exec_at_ns) in cases {
            let d = deferred(DropPolicy::WindowDrop, condition, 1);
            assert_eq!(
                d.window(0, 10 * MS, 3, 80 * MS, 1.0).exec_at_ns,
                exec_at_ns,
                "{condition}"
            );
        }
    }

    #[test]
    fn one_request_is_planned_at_its_frontrun() {
        let mut d = deferred(DropPolicy::WindowDrop, Condition::Frontrun, 2);
        let mut out = Output::new();
        d.on_arrival(0, request(0, 98 * MS), &mut out);
        assert!(out.is_empty());
        // frontrun = 98 - 0.1 - 7 - 0.05 = 90.85 ms; asks for a GPU 0.15 ms before.
        assert_eq!(d.next_timer_ns(), Some(90_700 * US));
        d.on_timer(90_700 * US, &mut out);
        assert_eq!(out.plans.len(), 1);
        let plan = out.plans[0];
        assert_eq!((plan.gpu, plan.batch_size), (0, 1));
        assert_eq!((plan.exec_at_ns, plan.finish_ns), (90_850 * US, 96_850 * US));
        assert_eq!(d.queued_count(), 0);
    }

    #[test]
    fn a_busy_gpu_makes_candidates_wait_and_hands_off_earliest_deadline_first() {
        // Two models on one GPU: the one whose batch goes stale first gets the GPU first.
        let models = [model(), model()];
        let config = Config {
            drop: DropPolicy::DropTimeout,
            condition: Condition::Immediately,
            grant: GrantPolicy::LowestIndex,
            saturation_threshold: None,
            saturated_drop: DropPolicy::DropTimeout,
            contention_margin: false,
            long_slo_keep: false,
            queue_rank: false,
        };
        let mut d = Deferred::new(config, &models, 1, &Knobs::default());
        let mut out = Output::new();
        d.on_arrival(0, request(0, 90 * MS), &mut out);
        assert_eq!(out.plans.len(), 1, "immediately: planned at once");
        let busy_until_ns = out.plans[0].finish_ns;
        out.clear();
        let late = Request {
            model: 1,
            ..request(1, 80 * MS)
        };
        let early = Request {
            model: 0,
            ..request(2, 60 * MS)
        };
        d.on_arrival(MS, late, &mut out);
        d.on_arrival(MS, early, &mut out);
        assert!(out.plans.is_empty(), "the only GPU is busy");
        let hand_off_ns = d.next_timer_ns().unwrap();
        assert_eq!(hand_off_ns, busy_until_ns - Knobs::default().lead_ns(1));
        d.on_timer(hand_off_ns, &mut out);
        assert_eq!(out.plans.len(), 1);
        assert_eq!(out.plans[0].model, 0, "earliest invalid_after first");
        assert_eq!(out.plans[0].exec_at_ns, busy_until_ns);
    }

    /// Feeds model `index` one arrival every `gap_ns` from 0 to `until_ns` (meter only).
    #[test]
    fn a_waiting_candidates_rank_follows_its_queue() {
        // Ours: two models on one GPU (saturated: 1,000 req/s each needs about 1.1 GPUs, so a
        // request is dispatched at once and the next ones wait for the GPU). Model 0
        // waits with a batch of one due at 300 ms (invalid_after = 300 - 6 = 294 ms); model 1
        // with one due at 250 ms (244 ms) ranks ahead of it. Then 60 arrivals join model 0
        // behind its head: a batch of its queue, 61, runs 66 ms, so its rank is 300 - 66 =
        // 234 ms, ahead of model 1, and the freed GPU goes to it. Ranked by the batch it was
        // formed with (the reference), model 1 gets the GPU.
        for (queue_rank, first) in [(true, 0), (false, 1)] {
            let knobs = Knobs {
                queue_rank,
                ..Knobs::default()
            };
            let config = Config::of(PolicyKind::Symphony, &knobs);
            let mut d = Deferred::new(config, &[model(), model()], 1, &knobs);
            meter_steady_rate(&mut d, 0, MS, 2_000 * MS);
            meter_steady_rate(&mut d, 1, MS, 2_000 * MS);
            assert!(d.is_saturated());
            let t0 = 2_100 * MS;
            let mut out = Output::new();
            d.on_arrival(
                t0,
                Request {
                    model: 0,
                    ..request(0, t0 + 90 * MS)
                },
                &mut out,
            );
            assert_eq!(out.plans.len(), 1, "saturated: dispatched at once");
            let busy_until_ns = out.plans[0].finish_ns;
            out.clear();
            d.on_arrival(
                t0 + MS,
                Request {
                    model: 0,
                    ..request(1, t0 + 300 * MS)
                },
                &mut out,
            );
            d.on_arrival(
                t0 + MS,
                Request {
                    model: 1,
                    ..request(2, t0 + 250 * MS)
                },
                &mut out,
            );
            for id in 3..63 {
                d.on_arrival(
                    t0 + 2 * MS,
                    Request {
                        model: 0,
                        ..request(id, t0 + 400 * MS)
                    },
                    &mut out,
                );
            }
            assert!(out.plans.is_empty() && out.drops.is_empty(), "the only GPU is busy");
            let hand_off_ns = d.next_timer_ns().unwrap();
            assert!(hand_off_ns < busy_until_ns);
            d.on_timer(hand_off_ns, &mut out);
            assert_eq!(out.plans[0].model, first, "queue rank {queue_rank}");
        }
    }

    fn meter_steady_rate(d: &mut Deferred, index: usize, gap_ns: u64, until_ns: u64) {
        let mut t = 0;
        while t <= until_ns {
            if d.models[index].meter.record(t) {
                d.on_rate_sample(index);
            }
            t += gap_ns;
        }
    }

    #[test]
    fn target_queuing_delay_waits_one_target_batch_of_arrivals() {
        let mut d = deferred(DropPolicy::WindowDrop, Condition::TargetQueuingDelay, 1);
        // 1000 req/s: target (n = (b + 5)/b > 1): (b + 5)(1 + b/(b + 5)) = 2b + 5 <= 97.9 - 0.05 b
        // -> 2.05 b <= 92.9 -> 45.
        meter_steady_rate(&mut d, 0, MS, 2_000 * MS);
        assert_eq!(d.target_batch_size(0), 45);
        d.models[0].last_exec_at_ns = 1_000 * MS;
        // choice = last_exec_at + 45 / 1000 s = 1045 ms; within [earliest, latest] for D = 1100.
        let w = d.window(0, 1_010 * MS, 3, 1_100 * MS, 1.0);
        assert_eq!(w.exec_at_ns, 1_045 * MS);
    }

    #[test]
    fn saturation_switches_deferral_off_at_the_threshold() {
        // Ours: demand = r * exec(t)/t GPU-seconds per second; saturated when the sum reaches
        // 0.8 of the GPUs. One model on 2 GPUs at 1000 req/s and t = 45: 1000 * 0.050 / 45
        // = 1.11 GPU < 1.6; at 2000 req/s, t = 59: 2000 * 0.064 / 59 = 2.17 GPUs >= 1.6.
        let config = Config::of(PolicyKind::Symphony, &Knobs::default());
        let mut d = Deferred::new(config, &[model()], 2, &Knobs::default());
        meter_steady_rate(&mut d, 0, MS, 2_000 * MS);
        assert!(!d.is_saturated());
        assert_eq!(d.condition(), Condition::Frontrun);
        let mut d = Deferred::new(config, &[model()], 2, &Knobs::default());
        meter_steady_rate(&mut d, 0, MS / 2, 2_000 * MS);
        assert_eq!(d.target_batch_size(0), 59);
        assert!(d.is_saturated());
        assert_eq!(d.condition(), Condition::Immediately);
        // Once saturated, window drop keeps ceil(0.6 * 59) = 36 of the target. The head is due
        // at 2043 ms: fin(36) = 2000 + 0.1 + 0.05 * 36 + 5 + 36 = 2042.9 ms fits, fin(37) =
        // 2043.95 ms does not, so the free lunch stops at 36; the full target of 59 would drop
        // the head instead (fin(59) = 2067 ms) and grow on the later deadlines behind it.
        d.models[0].queue.push_back(request(0, 2_043 * MS));
        for id in 1..100 {
            d.models[0].queue.push_back(request(id, 2_200 * MS));
        }
        d.queued_count = 100;
        let mut out = Output::new();
        let (b, deadline_ns) = d.form_batch(0, 2_000 * MS, 2_000 * MS, 1.0, true, &mut out).unwrap();
        assert_eq!((b, deadline_ns), (36, 2_043 * MS), "the reduced target, head kept");
        assert!(out.drops.is_empty());
    }

    #[test]
    fn contention_margin_pulls_the_window_by_a_long_recent_batch() {
        // Ours: margin = 2 * E * min(others, G) / G with E the decaying max of batch times.
        let config = Config::of(PolicyKind::Symphony, &Knobs::default());
        let mut d = Deferred::new(config, &[model(), model()], 1, &Knobs::default());
        let w = d.window(0, 10 * MS, 3, 80 * MS, 1.0);
        assert_eq!(w.exec_at_ns, 70_850 * US, "no other model: the frontrun of the spec");
        d.recent_exec_ns = 12 * MS;
        d.set_active(1, true);
        // frontrun 70.85 ms - 2 * 12 ms * min(1, 1)/1 = 46.85 ms.
        let w = d.window(0, 10 * MS, 3, 80 * MS, 1.0);
        assert_eq!(w.exec_at_ns, 46_850 * US);
    }
}
