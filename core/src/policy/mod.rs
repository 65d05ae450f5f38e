//! The scheduling policies behind one event interface.
//!
//! A policy is a deterministic state machine. Events come in (an arrival, a timer, a GPU's
//! completion) with the current time; decisions go out into an [`Output`]: batch plans,
//! requests dropped because their SLO cannot be met, and plans preempted. The simulator and the
//! service run the same policies; only who calls them and where the time comes from differ.
//!
//! The family: [`deferred`] implements Symphony's deferred batch scheduler with every knob of
//! `docs/internals/scheduling.md` (its `immediately` condition is the eager baseline in the
//! same system); [`clockwork`], [`nexus`], [`shepherd`] and [`triton`] are the peers.

use crate::names::knob_names;
use crate::profile::Profile;
use crate::request::Request;

pub mod clockwork;
pub mod deferred;
pub mod nexus;
pub mod shepherd;
pub mod triton;

pub use crate::gpu_pool::GrantPolicy;
pub use crate::time::{MS, US};

/// A model as the scheduler knows it.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub name: String,
    pub profile: Profile,
    pub slo_ns: u64,
}

/// A batch plan: run these requests of one model on one GPU, starting at `exec_at_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub plan_id: u64,
    pub gpu: u32,
    pub model: u32,
    pub batch_size: u32,
    pub exec_at_ns: u64,
    /// `exec_at + pre + l(b) + post`: when the scheduler expects the GPU to be free again.
    pub finish_ns: u64,
    /// Start of this plan's requests in [`Output::plan_requests`].
    requests_start: u32,
}

/// A GPU finished a plan (or the executor reports it so).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub plan_id: u64,
    pub gpu: u32,
    pub model: u32,
    pub batch_size: u32,
    pub started_ns: u64,
    pub finished_ns: u64,
}

/// Decisions of one or more events. The caller consumes them and calls [`Output::clear`];
/// buffers keep their capacity, so a steady state allocates nothing.
#[derive(Debug, Default)]
pub struct Output {
    pub plans: Vec<Plan>,
    plan_requests: Vec<Request>,
    /// Requests answered "dropped": their SLO cannot be met.
    pub drops: Vec<Request>,
    /// Plans cancelled before they finished (Shepherd's preemption). Their requests went back
    /// to the policy's queues: they are not answered by the cancellation.
    pub preempted: Vec<u64>,
    next_plan_id: u64,
}

/// Decisions one event usually produces at most: `Output::new` reserves this much, so the
/// buffers rarely grow after start-up (they still grow, amortized, past it).
pub const OUTPUT_PLANS_RESERVED: usize = 256;
pub const OUTPUT_REQUESTS_RESERVED: usize = 8192;

impl Output {
    pub fn new() -> Output {
        Output {
            plans: Vec::with_capacity(OUTPUT_PLANS_RESERVED),
            plan_requests: Vec::with_capacity(OUTPUT_REQUESTS_RESERVED),
            drops: Vec::with_capacity(OUTPUT_REQUESTS_RESERVED),
            preempted: Vec::with_capacity(OUTPUT_PLANS_RESERVED),
            next_plan_id: 0,
        }
    }

    /// Emits a plan for `requests` (in batch order) and returns it.
    pub fn push_plan(
        &mut self,
        gpu: u32,
        model: u32,
        exec_at_ns: u64,
        finish_ns: u64,
        requests: impl IntoIterator<Item = Request>,
    ) -> Plan {
        assert!(finish_ns > exec_at_ns);
        let requests_start = self.plan_requests.len() as u32;
        self.plan_requests.extend(requests);
        let batch_size = self.plan_requests.len() as u32 - requests_start;
        assert!(batch_size > 0, "a plan carries at least one request");
        let plan = Plan {
            plan_id: self.next_plan_id,
            gpu,
            model,
            batch_size,
            exec_at_ns,
            finish_ns,
            requests_start,
        };
        self.next_plan_id += 1;
        self.plans.push(plan);
        plan
    }

    pub fn plan_requests(&self, plan: &Plan) -> &[Request] {
        let start = plan.requests_start as usize;
        &self.plan_requests[start..start + plan.batch_size as usize]
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty() && self.drops.is_empty() && self.preempted.is_empty()
    }

    /// Forgets the decisions, keeps the capacity and the plan-id counter.
    pub fn clear(&mut self) {
        self.plans.clear();
        self.plan_requests.clear();
        self.drops.clear();
        self.preempted.clear();
    }
}

/// The event interface every policy implements.
pub trait Policy {
    /// A request arrived (already validated, its deadline absolute).
    fn on_arrival(&mut self, now_ns: u64, request: Request, out: &mut Output);
    /// Called when `now_ns >= next_timer_ns()`.
    fn on_timer(&mut self, now_ns: u64, out: &mut Output);
    /// A plan finished on its GPU.
    fn on_completion(&mut self, now_ns: u64, completion: &Completion, out: &mut Output);
    /// What the policy corrected in its profiles from measured batch times, per model (empty
    /// for one that plans with the profiles as given).
    fn corrections(&self) -> Vec<crate::correction::CorrectionSummary> {
        Vec::new()
    }
    /// The GPUs the current load needs (GPU-seconds per second, at the batch sizes the
    /// policy aims for), for an autoscaler; `None` for a policy that does not estimate it.
    fn demand_gpus(&self) -> Option<f64> {
        None
    }
    /// An autoscaler brought GPU `gpu` into planning, free from `free_at_ns` (`Some`), or took
    /// it out (`None`: no new plan goes to it; one granted before still runs). Returns false
    /// for a policy that plans on a fixed set of GPUs.
    fn set_gpu_available(&mut self, now_ns: u64, gpu: u32, free_at_ns: Option<u64>, out: &mut Output) -> bool {
        let _ = (now_ns, gpu, free_at_ns, out);
        false
    }
    /// When the policy next wants [`Policy::on_timer`], if ever.
    fn next_timer_ns(&mut self) -> Option<u64>;
    /// Requests the policy holds and has neither planned nor dropped.
    fn queued_count(&self) -> usize;
}

/// How a model's queue gives up on requests (section 3 of the spec).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropPolicy {
    /// May drop the head of the queue to keep a batch of the target size.
    WindowDrop,
    /// Target size 1: drops only what cannot finish even alone.
    DropTimeout,
    /// Keeps the target size, never drops: late requests ride along.
    WindowFcfs,
}

/// When, inside its window, a model's candidate batch is started (section 5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Condition {
    Frontrun,
    Latest,
    TargetBatchSize,
    TargetQueuingDelay,
    Immediately,
}

/// How the deferred family plans GPUs of different speeds (`gpu_classes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassPlanning {
    /// Each candidate batch is formed and timed for the class of GPU it would be granted.
    PerClass,
    /// Every GPU planned with the profile as given (as if all ran at speed 1).
    AsProfiled,
    /// Every GPU planned with the slowest class's profile (the service's rule meanwhile: the
    /// slowest registered executor's profile).
    Slowest,
}

knob_names!(
    ClassPlanning,
    "class planning",
    PerClass = "per-class",
    AsProfiled = "as-profiled",
    Slowest = "slowest"
);

knob_names!(
    DropPolicy,
    "drop policy",
    WindowDrop = "window-drop",
    DropTimeout = "drop-timeout",
    WindowFcfs = "window-fcfs"
);
knob_names!(
    Condition,
    "schedulable condition",
    Frontrun = "frontrun",
    Latest = "latest",
    TargetBatchSize = "target-batch-size",
    TargetQueuingDelay = "target-queuing-delay",
    Immediately = "immediately",
);

/// What the service asks of a policy beyond the events of [`Policy`]: when a client goes
/// away (`cancel_all`), when executors register the profiles they measured (`profile`,
/// `set_profile`), when a front door decides whether to refuse a request at once
/// (`is_swamped`), and when GPUs are shared with other shards (`waiting_invalid_after_ns`,
/// `gpus_mut`). The deferred family implements it. The service calls nothing else of a
/// policy; the VOPR (`symphony-verify`) drives the same calls through the shard's core.
pub trait Serving: Policy {
    /// Where its GPUs come from (for a shard: its view of the shared table).
    type Gpus: crate::gpu_pool::GpuSource;
    /// The profile model `model` is planned with.
    fn profile(&self, model: u32) -> &Profile;
    /// Plans model `model` with `profile` from now on.
    fn set_profile(&mut self, model: u32, profile: Profile);
    /// Removes every queued request of `model` that `cancelled` names, in one pass; returns
    /// the ids removed. Planned requests are past recall.
    fn cancel_all(&mut self, now_ns: u64, model: u32, cancelled: impl Fn(u64) -> bool, out: &mut Output) -> Vec<u64>;
    /// Whether a new request of `model` has no chance (refuse it at once).
    fn is_swamped(&self, model: u32) -> bool;
    /// The smallest `invalid_after` of the candidates waiting for a GPU.
    fn waiting_invalid_after_ns(&mut self) -> Option<u64>;
    fn gpus_mut(&mut self) -> &mut Self::Gpus;
}

/// The policies one run can compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyKind {
    /// Our default: deferred batching that stops deferring as GPUs saturate.
    Symphony,
    /// The reference implementation's configuration: frontrun, window drop, earliest free GPU.
    SymphonyRef,
    /// Condition "immediately" with drop timeout: eager dispatch in the same system.
    Eager,
    Clockwork,
    Nexus,
    Shepherd,
    Triton,
}

knob_names!(
    PolicyKind,
    "policy",
    Symphony = "symphony",
    SymphonyRef = "symphony-ref",
    Eager = "eager",
    Clockwork = "clockwork",
    Nexus = "nexus",
    Shepherd = "shepherd",
    Triton = "triton",
);

/// Every tunable of every policy, with the spec's defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Knobs {
    /// Time to deliver a batch plan to an executor.
    pub d_ctrl_ns: u64,
    /// Time to move one request's input to the executor.
    pub d_data_ns: u64,
    /// Time to return a result to the client.
    pub d_resp_ns: u64,
    /// Timer slack kept before the latest start.
    pub jitter_ns: u64,
    /// Overrides of the deferred family's knobs (`None`: the policy's own choice).
    pub drop: Option<DropPolicy>,
    pub condition: Option<Condition>,
    pub grant: Option<GrantPolicy>,
    /// Ours: the fraction of the GPUs the measured demand must reach for `symphony` to stop
    /// deferring, and the drop policy it uses then.
    pub saturation_threshold: f64,
    pub saturated_drop: DropPolicy,
    /// Once saturated, window drop keeps this fraction of the target batch size.
    pub saturated_target_fraction: f64,
    /// Ours: a model whose SLO is at least `long_slo_ratio` times the tightest keeps, in window
    /// drop, no more than the smallest batch whose time per request is within this fraction
    /// of the target's (0 turns it off).
    pub long_slo_keep_tolerance: f64,
    pub long_slo_ratio: f64,
    /// Ours: a waiting candidate's hand-off rank follows its queue (the
    /// `invalid_after` of the batch its queue would form now), not the batch it was formed
    /// with (false: the rank it was formed with, as the reference).
    pub queue_rank: bool,
    /// The deferred family plans with profiles corrected online from measured batch times
    /// (`crate::correction`): off by default until the sweeps show it costs no workload.
    pub correction: bool,
    /// The deferred family also corrects by how long a batch's GPU idled before it
    /// (`crate::correction::IdleCorrector`: cold starts), planning each grant with the factor
    /// of its GPU's gap and timing windows with the largest. Off by default.
    pub correction_idle: bool,
    /// The deferred family over GPUs of several speeds: per class (default), or one profile.
    pub class_planning: ClassPlanning,
    /// Ours: the contention margin in units of a long recent batch (0 switches it off).
    pub contention_margin_factor: f64,
    /// Rate meter: sample length and window.
    pub rate_sample_ns: u64,
    pub rate_window_ns: u64,
    /// Clockwork keeps each GPU's queue filled this far ahead, with these batch sizes.
    pub clockwork_lookahead_ns: u64,
    pub clockwork_batch_sizes: Vec<u32>,
    /// Nexus re-plans every epoch (or earlier when a rate leaves its band).
    pub nexus_epoch_ns: u64,
    /// Give Nexus the workload's true rates up front instead of learning them online.
    pub nexus_true_rates: Option<Vec<f64>>,
    /// Ours, for a fixed cluster: Nexus plans for the largest load its GPUs can hold, keeping
    /// spare GPUs as headroom (false: the plan uses only the GPUs the measured load needs).
    pub nexus_fill_gpus: bool,
    /// Shepherd preempts a running batch for one at least `lambda` times larger.
    pub shepherd_lambda: f64,
    pub shepherd_preemption: bool,
    /// Triton dispatches a model's queue once its oldest request waited this long.
    pub triton_max_queue_delay_ns: u64,
    /// Triton's preferred batch sizes; empty: the largest `b` with `2 exec(b) <= slo`.
    pub triton_preferred_batch_sizes: Vec<u32>,
}

impl Default for Knobs {
    fn default() -> Knobs {
        Knobs {
            d_ctrl_ns: 100 * US,
            d_data_ns: 50 * US,
            d_resp_ns: 2 * MS,
            jitter_ns: 100 * US,
            drop: None,
            condition: None,
            grant: None,
            correction: false,
            correction_idle: false,
            class_planning: ClassPlanning::PerClass,
            saturation_threshold: 0.8,
            saturated_drop: DropPolicy::WindowDrop,
            saturated_target_fraction: 0.6,
            long_slo_keep_tolerance: 0.12,
            long_slo_ratio: 4.0,
            queue_rank: true,
            contention_margin_factor: 2.0,
            rate_sample_ns: 50 * MS,
            rate_window_ns: 5_000 * MS,
            clockwork_lookahead_ns: 10 * MS,
            clockwork_batch_sizes: vec![1, 2, 4, 8, 16],
            nexus_epoch_ns: 30_000 * MS,
            nexus_true_rates: None,
            nexus_fill_gpus: true,
            shepherd_lambda: 3.03,
            shepherd_preemption: true,
            triton_max_queue_delay_ns: 5 * MS,
            triton_preferred_batch_sizes: Vec::new(),
        }
    }
}

impl Knobs {
    /// The time a batch of `b` needs before it can start: plan delivery plus its inputs.
    #[inline]
    pub fn lead_ns(&self, batch_size: u32) -> u64 {
        self.d_ctrl_ns + self.d_data_ns * u64::from(batch_size)
    }
}

/// Builds a policy over `models` and `gpu_count` GPUs.
pub fn build(kind: PolicyKind, models: &[ModelConfig], gpu_count: u32, knobs: &Knobs) -> Box<dyn Policy> {
    build_on(kind, models, gpu_count, &[], knobs)
}

/// Builds a policy over `models` and `gpu_count` GPUs whose time factors against the
/// profiles are `factors` (one per GPU; empty: all 1). The deferred family and Triton know
/// each GPU's speed; Clockwork, Nexus and Shepherd plan every GPU with the profile as given.
pub fn build_on(
    kind: PolicyKind,
    models: &[ModelConfig],
    gpu_count: u32,
    factors: &[f64],
    knobs: &Knobs,
) -> Box<dyn Policy> {
    assert!(gpu_count > 0);
    assert!(!models.is_empty());
    let pool = crate::gpu_pool::GpuPool::with_factors(gpu_count, factors);
    match kind {
        PolicyKind::Symphony | PolicyKind::SymphonyRef | PolicyKind::Eager => Box::new(
            deferred::Deferred::with_source(deferred::Config::of(kind, knobs), models, pool, knobs),
        ),
        PolicyKind::Triton => Box::new(triton::Triton::on(models, pool, knobs)),
        PolicyKind::Clockwork => Box::new(clockwork::Clockwork::new(models, gpu_count, knobs)),
        PolicyKind::Nexus => Box::new(nexus::Nexus::new(models, gpu_count, knobs)),
        PolicyKind::Shepherd => Box::new(shepherd::Shepherd::new(models, gpu_count, knobs)),
    }
}
