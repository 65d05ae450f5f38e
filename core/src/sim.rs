//! The deterministic virtual-time simulator: a workload's arrivals through one policy onto
//! fake GPUs, and the metrics of the measured (bench) phase.
//!
//! Fake GPUs run each plan for exactly its profile time (times the GPU's class factor when
//! the workload gives `gpu_classes`, and off it when an [`ExecModel`] says so). A plan emitted at `t` reaches its
//! executor at `t + d_ctrl + d_data*b` and starts at `max(exec_at, that, the GPU's previous
//! finish)`; replies take `d_resp`, so a request succeeds when
//! `finish + d_resp <= arrival + slo`. One seed gives one run, byte for byte.
//!
//! This is not the service: no sockets, no threads, no real time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;
use std::io;
use std::path::Path;

use rand::SeedableRng;
use rand_distr::Distribution;
use serde::Serialize;

use crate::autoscale::{Autoscale, Scaler, Slot};
use crate::policy::{self, Completion, Knobs, ModelConfig, Output, Policy, PolicyKind};
use crate::request::Request;
use crate::workload::{Arrival, Phase, Workload};

/// What one simulation runs.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub policy: PolicyKind,
    pub gpu_count: u32,
    pub seed: u64,
    /// Every model's rate is multiplied by this.
    pub rate_scale: f64,
    pub knobs: Knobs,
    /// Give Nexus the workload's bench rates (times `rate_scale`) up front, as the reference
    /// evaluated it, instead of letting it learn them.
    pub nexus_true_rates: bool,
    /// How the fake GPUs' batches run against their profile (exactly, by default).
    pub exec: ExecModel,
    /// GPUs that come and go with the load (`None`: `gpu_count` GPUs throughout). With an
    /// autoscaler `gpu_count` is the most there can be.
    pub autoscale: Option<Autoscale>,
    /// Each GPU's time factor against the profiles (`1 / speed` of its class; empty: all 1).
    pub gpu_factors: Vec<f64>,
}

/// How a simulated GPU runs a batch against its profile: exactly (the default), or slower
/// throughout, with noise, a cold start after idling, and a slow drift. Every batch's time is
/// its profile's `exec_ns(b)` times the product of the four factors.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ExecModel {
    /// Every batch runs this many times its profile (1: as profiled), unknown to the planner
    /// (unlike a `gpu_classes` speed).
    pub scale: f64,
    /// Log-normal noise: a factor `exp(N(0, sigma))` per batch (median 1; 0: none).
    pub noise_sigma: f64,
    /// A batch that starts after its GPU idled at least `cold_gap_ns` runs this many times
    /// its time (1: none).
    pub cold_factor: f64,
    pub cold_gap_ns: u64,
    /// The factor grows by this fraction per second of simulated time (0: none).
    pub drift_per_s: f64,
}

impl Default for ExecModel {
    fn default() -> ExecModel {
        ExecModel {
            scale: 1.0,
            noise_sigma: 0.0,
            cold_factor: 1.0,
            cold_gap_ns: 0,
            drift_per_s: 0.0,
        }
    }
}

impl ExecModel {
    /// Batches run exactly their profile's time.
    pub fn is_exact(&self) -> bool {
        *self == ExecModel::default()
    }

    /// Says what is out of range: scale 0.1 to 100, noise 0 to 2, cold factor 1 to 100,
    /// drift 0 to 1 per second.
    pub fn check(&self) -> Result<(), String> {
        if !(self.scale.is_finite() && (0.1..=100.0).contains(&self.scale)) {
            return Err(format!("the execution scale must be 0.1 to 100, got {}", self.scale));
        }
        if !(self.noise_sigma.is_finite() && (0.0..=2.0).contains(&self.noise_sigma)) {
            return Err(format!("the execution noise must be 0 to 2, got {}", self.noise_sigma));
        }
        if !(self.cold_factor.is_finite() && (1.0..=100.0).contains(&self.cold_factor)) {
            return Err(format!(
                "the cold-start factor must be 1 to 100, got {}",
                self.cold_factor
            ));
        }
        if !(self.drift_per_s.is_finite() && (0.0..=1.0).contains(&self.drift_per_s)) {
            return Err(format!("the drift must be 0 to 1 per second, got {}", self.drift_per_s));
        }
        Ok(())
    }

    /// The time a batch whose profile says `planned_ns` runs, starting at `start_ns` on a GPU
    /// that idled `idle_ns` before it (the simulator's fake GPUs and the service's embedded
    /// ones).
    pub fn run_ns(&self, planned_ns: u64, start_ns: u64, idle_ns: u64, rng: &mut rand_pcg::Pcg64) -> u64 {
        if self.is_exact() {
            return planned_ns;
        }
        let mut factor = self.scale;
        if self.noise_sigma > 0.0 {
            let normal: f64 = rand_distr::StandardNormal.sample(rng);
            factor *= (self.noise_sigma * normal).exp();
        }
        if idle_ns >= self.cold_gap_ns {
            factor *= self.cold_factor;
        }
        factor *= 1.0 + self.drift_per_s * start_ns as f64 / 1e9;
        (planned_ns as f64 * factor).round().max(1.0) as u64
    }
}

/// An [`ExecModel`] with its own random stream: what runs each batch of a service's embedded
/// GPUs.
#[derive(Debug, Clone)]
pub struct ExecRunner {
    pub model: ExecModel,
    rng: rand_pcg::Pcg64,
}

impl ExecRunner {
    pub fn new(model: ExecModel, seed: u64) -> ExecRunner {
        ExecRunner {
            model,
            rng: rand_pcg::Pcg64::seed_from_u64(seed ^ 0x5eed_e8ec),
        }
    }

    /// See [`ExecModel::run_ns`].
    pub fn run_ns(&mut self, planned_ns: u64, start_ns: u64, idle_ns: u64) -> u64 {
        self.model.run_ns(planned_ns, start_ns, idle_ns, &mut self.rng)
    }
}

impl SimConfig {
    /// The workload's own GPUs, seed and rates.
    pub fn of(workload: &Workload, policy: PolicyKind) -> SimConfig {
        SimConfig {
            policy,
            gpu_count: workload.gpu_count,
            seed: workload.seed,
            rate_scale: 1.0,
            knobs: Knobs::default(),
            nexus_true_rates: false,
            exec: ExecModel::default(),
            autoscale: None,
            gpu_factors: workload.gpu_factors(),
        }
    }
}

/// A request's fate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    NoReply,
    Success,
    Late,
    Dropped,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::NoReply => "noreply",
            Outcome::Success => "success",
            Outcome::Late => "late",
            Outcome::Dropped => "dropped",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStatus {
    Running,
    Done,
    Preempted,
}

/// A plan as it ran on its fake GPU.
#[derive(Debug, Clone, Copy)]
pub struct PlanRecord {
    pub plan_id: u64,
    pub gpu: u32,
    pub model: u32,
    pub batch_size: u32,
    pub emitted_ns: u64,
    /// Actual start (the plan's `exec_at` unless the GPU or the inputs were late).
    pub exec_at_ns: u64,
    /// Actual finish; for a preempted plan, when it was stopped.
    pub finish_at_ns: u64,
    pub planned_exec_at_ns: u64,
    pub status: PlanStatus,
    requests_start: u32,
}

/// Per-request facts, indexed by request id (= arrival index).
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord {
    pub model: u32,
    pub phase: Phase,
    pub arrival_ns: u64,
    pub deadline_ns: u64,
    pub outcome: Outcome,
    /// The plan that ran it to completion, if any.
    pub plan_id: Option<u64>,
    pub finish_ns: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Counts {
    pub total: u64,
    pub success: u64,
    pub dropped: u64,
    pub late: u64,
    pub noreply: u64,
}

impl Counts {
    fn add(&mut self, outcome: Outcome) {
        self.total += 1;
        match outcome {
            Outcome::Success => self.success += 1,
            Outcome::Dropped => self.dropped += 1,
            Outcome::Late => self.late += 1,
            Outcome::NoReply => self.noreply += 1,
        }
    }

    /// `1 - success/total` in percent; 0 with no requests.
    pub fn bad_rate_percent(&self) -> f64 {
        if self.total == 0 {
            return 0.0;
        }
        100.0 * (1.0 - self.success as f64 / self.total as f64)
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelSummary {
    pub name: String,
    #[serde(flatten)]
    pub counts: Counts,
    pub bad_rate: f64,
    pub mean_batch_size: f64,
}

/// The bench-phase metrics of one run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub policy: String,
    pub gpu_count: u32,
    pub seed: u64,
    pub rate_scale: f64,
    /// Offered load over the bench phase, requests per second.
    pub offered_rps: f64,
    #[serde(flatten)]
    pub counts: Counts,
    /// Average over models of each model's bad rate, percent.
    pub bad_rate: f64,
    /// The worst model's bad rate, percent.
    pub bad_rate_worst: f64,
    pub success_rps: f64,
    pub mean_batch_size: f64,
    /// `(batch size, plan count)` for plans that started in the bench phase.
    pub batch_size_histogram: Vec<(u32, u64)>,
    pub gpu_busy_fraction: Vec<f64>,
    /// GPUs that ran anything in the bench phase.
    pub gpus_used: u32,
    pub gpu_busy_s: f64,
    /// GPU-seconds paid for over the bench phase: online, starting or draining (a fixed
    /// cluster pays for all of its GPUs throughout).
    pub gpu_paid_s: f64,
    /// The most GPUs paid for at once in the bench phase.
    pub gpus_paid_peak: u32,
    /// What the autoscaler did, when there was one.
    pub autoscale: Option<AutoscaleSummary>,
    pub models: Vec<ModelSummary>,
}

/// What an autoscaler did over a whole run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AutoscaleSummary {
    pub config: Autoscale,
    /// GPUs asked for and GPUs let go.
    pub started: u64,
    pub drained: u64,
}

/// One second of a run: what was offered, how it fared (by arrival), and the GPUs.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Second {
    pub arrivals: u64,
    pub success: u64,
    /// Arrivals of this second not answered in time (late, dropped or no reply).
    pub bad: u64,
    /// GPU-seconds of batches run in this second.
    pub busy_gpus: f64,
    /// Mean GPUs taking plans, and paid for (online, starting or draining).
    pub online_gpus: f64,
    pub paid_gpus: f64,
    /// The autoscaler's last recommendation by the end of this second (0 without one).
    pub recommended: u32,
}

/// Everything one run produced: the summary, and every plan and request for audits.
#[derive(Debug, Clone)]
pub struct SimReport {
    pub summary: Summary,
    pub plans: Vec<PlanRecord>,
    pub plan_requests: Vec<u32>,
    pub requests: Vec<RequestRecord>,
    pub model_names: Vec<String>,
    pub bench_window_ns: (u64, u64),
    /// What the policy corrected in its profiles from measured batch times (per model; empty
    /// when it does not correct).
    pub corrections: Vec<crate::correction::CorrectionSummary>,
    /// The whole run second by second (warm-up and cool-down included).
    pub timeline: Vec<Second>,
    /// With an autoscaler: when the policy could plan on each GPU (from its start-up's end,
    /// or from being wanted again while draining, to its drain)...
    pub gpu_available: Vec<GpuSpan>,
    /// ...and when each GPU was there to run batches (from its start-up's end to leaving).
    /// Open spans end at `u64::MAX`. Empty without an autoscaler: every GPU is there
    /// throughout.
    pub gpu_present: Vec<GpuSpan>,
}

/// A GPU over `[from_ns, to_ns)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuSpan {
    pub gpu: u32,
    pub from_ns: u64,
    pub to_ns: u64,
}

impl SimReport {
    pub fn plan_requests(&self, plan: &PlanRecord) -> &[u32] {
        let start = plan.requests_start as usize;
        &self.plan_requests[start..start + plan.batch_size as usize]
    }
}

/// The models of a workload as the scheduler knows them.
pub fn model_configs(workload: &Workload) -> Vec<ModelConfig> {
    workload
        .models
        .iter()
        .map(|m| ModelConfig {
            name: m.name.clone(),
            profile: m.profile.clone(),
            slo_ns: m.slo_ns,
        })
        .collect()
}

/// Runs one simulation.
pub fn simulate(workload: &Workload, config: &SimConfig) -> SimReport {
    let mut arrivals = Vec::new();
    simulate_with(workload, config, &mut arrivals)
}

/// Runs one simulation reusing `arrivals` as the arrival buffer.
pub fn simulate_with(workload: &Workload, config: &SimConfig, arrivals: &mut Vec<Arrival>) -> SimReport {
    assert!(config.gpu_count > 0);
    assert!(config.rate_scale >= 0.0);
    workload.generate_arrivals(config.rate_scale, config.seed, arrivals);
    let models = model_configs(workload);
    let mut knobs = std::borrow::Cow::Borrowed(&config.knobs);
    if config.nexus_true_rates {
        let rates = workload
            .models
            .iter()
            .map(|m| m.phases.bench_mean_rps() * config.rate_scale)
            .collect();
        knobs.to_mut().nexus_true_rates = Some(rates);
    }
    assert!(
        config.gpu_factors.is_empty() || config.gpu_factors.len() == config.gpu_count as usize,
        "a time factor per GPU, or none"
    );
    let mut policy = policy::build_on(config.policy, &models, config.gpu_count, &config.gpu_factors, &knobs);
    run_policy(workload, config, policy.as_mut(), arrivals)
}

/// Runs one simulation of a policy the caller built (for example over another
/// [`crate::gpu_pool::GpuSource`]); `config.policy` only names it in the summary.
pub fn simulate_policy(workload: &Workload, config: &SimConfig, policy: &mut dyn Policy) -> SimReport {
    let mut arrivals = Vec::new();
    workload.generate_arrivals(config.rate_scale, config.seed, &mut arrivals);
    run_policy(workload, config, policy, &arrivals)
}

fn run_policy(workload: &Workload, config: &SimConfig, policy: &mut dyn Policy, arrivals: &[Arrival]) -> SimReport {
    let models = model_configs(workload);
    let mut engine = Engine::new(workload, &models, config, arrivals.len());
    engine.run(policy, arrivals);
    let mut report = engine.report(workload, config);
    report.corrections = policy.corrections();
    report
}

struct Engine<'a> {
    models: &'a [ModelConfig],
    knobs: &'a Knobs,
    requests: Vec<RequestRecord>,
    plans: Vec<PlanRecord>,
    plan_requests: Vec<u32>,
    gpu_busy_until_ns: Vec<u64>,
    /// The plan each GPU runs last, for preemption.
    gpu_last_plan: Vec<Option<u64>>,
    completions: BinaryHeap<Reverse<(u64, u64)>>,
    horizon_ns: u64,
    exec: ExecModel,
    /// The batches' noise (its own stream: the arrivals are the same with or without it).
    exec_rng: rand_pcg::Pcg64,
    /// Each GPU's time factor (empty: all 1).
    gpu_factors: Vec<f64>,
    scaler: Option<Scaler>,
    ledger: Ledger,
    /// When the last event was handled.
    end_ns: u64,
    /// Per slot, since when the policy may plan on it and since when it is there (open
    /// spans), and the closed spans.
    available_since: Vec<Option<u64>>,
    present_since: Vec<Option<u64>>,
    gpu_available: Vec<GpuSpan>,
    gpu_present: Vec<GpuSpan>,
}

const SECOND_NS: u64 = 1_000_000_000;

/// GPU time by second of the run, kept as it happens (the utilization signal reads it).
#[derive(Debug)]
struct Ledger {
    busy_ns: Vec<u64>,
    online_ns: Vec<u64>,
    paid_ns: Vec<u64>,
    /// The most GPUs paid for at any moment of each second.
    paid_max: Vec<u32>,
    recommended: Vec<u32>,
    since_ns: u64,
    online: u32,
    paid: u32,
}

impl Ledger {
    fn new(online: u32, paid: u32) -> Ledger {
        Ledger {
            busy_ns: Vec::new(),
            online_ns: Vec::new(),
            paid_ns: Vec::new(),
            paid_max: Vec::new(),
            recommended: Vec::new(),
            since_ns: 0,
            online,
            paid,
        }
    }

    /// Adds `weight` for every nanosecond of `[from_ns, to_ns)` to the seconds it covers.
    fn spread(seconds: &mut Vec<u64>, from_ns: u64, to_ns: u64, weight: u64) {
        if to_ns <= from_ns || weight == 0 {
            return;
        }
        let last = ((to_ns - 1) / SECOND_NS) as usize;
        if seconds.len() <= last {
            seconds.resize(last + 1, 0);
        }
        let mut at_ns = from_ns;
        while at_ns < to_ns {
            let second = at_ns / SECOND_NS;
            let end_ns = ((second + 1) * SECOND_NS).min(to_ns);
            seconds[second as usize] += (end_ns - at_ns) * weight;
            at_ns = end_ns;
        }
    }

    fn busy(&mut self, from_ns: u64, to_ns: u64) {
        Ledger::spread(&mut self.busy_ns, from_ns, to_ns, 1);
    }

    /// A preempted batch stopped at `stop_ns` instead of `finish_ns`.
    fn unbusy(&mut self, stop_ns: u64, finish_ns: u64) {
        let mut at_ns = stop_ns;
        while at_ns < finish_ns {
            let second = at_ns / SECOND_NS;
            let end_ns = ((second + 1) * SECOND_NS).min(finish_ns);
            self.busy_ns[second as usize] -= end_ns - at_ns;
            at_ns = end_ns;
        }
    }

    /// Accounts the GPUs online and paid up to `now_ns`, then sets them.
    fn set_gpus(&mut self, now_ns: u64, online: u32, paid: u32) {
        let since_ns = self.since_ns;
        Ledger::spread(&mut self.online_ns, since_ns, now_ns, u64::from(self.online));
        Ledger::spread(&mut self.paid_ns, since_ns, now_ns, u64::from(self.paid));
        let last = (now_ns / SECOND_NS) as usize;
        if self.paid_max.len() <= last {
            self.paid_max.resize(last + 1, 0);
        }
        for second in (since_ns / SECOND_NS) as usize..=last {
            self.paid_max[second] = self.paid_max[second].max(self.paid);
        }
        self.paid_max[last] = self.paid_max[last].max(paid);
        self.since_ns = now_ns;
        self.online = online;
        self.paid = paid;
    }

    fn recommend(&mut self, now_ns: u64, recommended: u32) {
        let second = (now_ns / SECOND_NS) as usize;
        if self.recommended.len() <= second {
            let last = self.recommended.last().copied().unwrap_or(0);
            self.recommended.resize(second + 1, last);
        }
        self.recommended[second] = recommended;
    }

    /// The online GPUs' busy fraction over the whole seconds of `[now - window, now)`.
    fn busy_fraction(&mut self, now_ns: u64, window_ns: u64) -> f64 {
        self.set_gpus(now_ns, self.online, self.paid);
        let end = (now_ns / SECOND_NS) as usize;
        let start = (now_ns.saturating_sub(window_ns) / SECOND_NS) as usize;
        let sum = |v: &[u64]| -> u64 { v.get(start..end.min(v.len())).map_or(0, |s| s.iter().sum()) };
        let online_ns = sum(&self.online_ns);
        if online_ns == 0 {
            return 0.0;
        }
        sum(&self.busy_ns) as f64 / online_ns as f64
    }
}

impl<'a> Engine<'a> {
    fn new(workload: &Workload, models: &'a [ModelConfig], config: &'a SimConfig, arrival_count: usize) -> Engine<'a> {
        let slo_max_ns = models.iter().map(|m| m.slo_ns).max().unwrap_or(0);
        Engine {
            models,
            knobs: &config.knobs,
            requests: Vec::with_capacity(arrival_count),
            plans: Vec::with_capacity(arrival_count / 4 + 16),
            plan_requests: Vec::with_capacity(arrival_count),
            gpu_busy_until_ns: vec![0; config.gpu_count as usize],
            gpu_last_plan: vec![None; config.gpu_count as usize],
            completions: BinaryHeap::with_capacity(config.gpu_count as usize * 4),
            horizon_ns: workload.end_ns() + 4 * slo_max_ns + 1_000_000_000,
            exec: config.exec,
            exec_rng: rand_pcg::Pcg64::seed_from_u64(config.seed ^ 0x5eed_e8ec),
            gpu_factors: config.gpu_factors.clone(),
            scaler: config
                .autoscale
                .map(|a| Scaler::new(a, config.gpu_count).unwrap_or_else(|e| panic!("autoscaler: {e}"))),
            ledger: Ledger::new(config.gpu_count, config.gpu_count),
            end_ns: 0,
            available_since: vec![None; config.gpu_count as usize],
            present_since: vec![None; config.gpu_count as usize],
            gpu_available: Vec::new(),
            gpu_present: Vec::new(),
        }
    }

    /// Tells the policy which GPUs it may plan on at the start.
    fn start_scaler(&mut self, policy: &mut dyn Policy, out: &mut Output) {
        let Some(scaler) = &self.scaler else { return };
        let slots = self.gpu_busy_until_ns.len() as u32;
        for gpu in 0..slots {
            if scaler.slot(gpu) == Slot::Off {
                assert!(
                    policy.set_gpu_available(0, gpu, None, out),
                    "this policy plans on a fixed set of GPUs: it cannot be autoscaled"
                );
            } else {
                self.available_since[gpu as usize] = Some(0);
                self.present_since[gpu as usize] = Some(0);
            }
        }
        self.ledger = Ledger::new(scaler.online(), scaler.paid());
    }

    /// The autoscaler's next event: a tick or a start-up completing.
    fn next_scale_ns(&self) -> Option<u64> {
        let scaler = self.scaler.as_ref()?;
        Some(match scaler.next_ready_ns() {
            Some(ready_ns) => ready_ns.min(scaler.next_tick_ns()),
            None => scaler.next_tick_ns(),
        })
    }

    /// GPUs whose start-up ended join; at a tick, the signal is read and acted on.
    fn scale(&mut self, now_ns: u64, policy: &mut dyn Policy, out: &mut Output) {
        let scaler = self.scaler.as_mut().expect("scale events come from a scaler");
        let mut joined = scaler.take_ready(now_ns);
        for &gpu in &joined {
            self.present_since[gpu as usize] = Some(now_ns);
        }
        let mut drained = Vec::new();
        if scaler.next_tick_ns() <= now_ns {
            let window_ns = scaler.config().window_ns;
            let busy = self.ledger.busy_fraction(now_ns, window_ns);
            let recommended = scaler.recommend(policy.demand_gpus(), busy);
            self.ledger.recommend(now_ns, recommended);
            let actions = scaler.tick(now_ns, recommended);
            joined.extend(actions.kept);
            drained = actions.drained;
        }
        self.ledger.set_gpus(now_ns, scaler.online(), scaler.paid());
        // Joined or wanted again: into planning, free once its last batch ends.
        for gpu in joined {
            let free_at_ns = now_ns.max(self.gpu_busy_until_ns[gpu as usize]);
            policy.set_gpu_available(now_ns, gpu, Some(free_at_ns), out);
            self.available_since[gpu as usize] = Some(now_ns);
        }
        for gpu in drained {
            policy.set_gpu_available(now_ns, gpu, None, out);
            let from_ns = self.available_since[gpu as usize].take().expect("an online GPU drains");
            self.gpu_available.push(GpuSpan {
                gpu,
                from_ns,
                to_ns: now_ns,
            });
            self.leave_if_drained(now_ns, gpu);
        }
    }

    /// A draining GPU whose last batch ended leaves.
    fn leave_if_drained(&mut self, now_ns: u64, gpu: u32) {
        let Some(scaler) = self.scaler.as_mut() else { return };
        if scaler.slot(gpu) == Slot::Draining && self.gpu_busy_until_ns[gpu as usize] <= now_ns {
            scaler.left(gpu);
            let from_ns = self.present_since[gpu as usize]
                .take()
                .expect("a draining GPU is there");
            self.gpu_present.push(GpuSpan {
                gpu,
                from_ns,
                to_ns: now_ns,
            });
            self.ledger.set_gpus(now_ns, scaler.online(), scaler.paid());
        }
    }

    fn run(&mut self, policy: &mut dyn Policy, arrivals: &[Arrival]) {
        let mut out = Output::new();
        let mut next_arrival = 0usize;
        let mut now_ns = 0u64;
        let mut steps_at_now = 0u64;
        self.start_scaler(policy, &mut out);
        loop {
            let arrival_ns = arrivals.get(next_arrival).map(|a| a.arrival_ns);
            let completion_ns = self.completions.peek().map(|Reverse((t, _))| *t);
            let timer_ns = policy.next_timer_ns().map(|t| t.max(now_ns));
            // The autoscaler ticks only while there is work left (else the run never ends).
            let scale_ns = match arrival_ns.or(completion_ns).or(timer_ns) {
                Some(_) => self.next_scale_ns(),
                None => None,
            };
            let Some(next_ns) = [arrival_ns, completion_ns, timer_ns, scale_ns]
                .into_iter()
                .flatten()
                .min()
            else {
                break;
            };
            if next_ns > self.horizon_ns {
                break;
            }
            assert!(next_ns >= now_ns, "time never goes back");
            if next_ns == now_ns {
                steps_at_now += 1;
                assert!(steps_at_now < 10_000_000, "policy makes no progress at {now_ns} ns");
            } else {
                steps_at_now = 0;
            }
            now_ns = next_ns;
            self.end_ns = now_ns;
            if completion_ns == Some(now_ns) {
                let Reverse((_, plan_id)) = self.completions.pop().expect("peeked");
                if let Some(completion) = self.complete(plan_id) {
                    policy.on_completion(now_ns, &completion, &mut out);
                    self.leave_if_drained(now_ns, completion.gpu);
                }
            } else if scale_ns == Some(now_ns) {
                self.scale(now_ns, policy, &mut out);
            } else if arrival_ns == Some(now_ns) {
                let arrival = arrivals[next_arrival];
                let model = &self.models[arrival.model_index as usize];
                let request = Request {
                    id: next_arrival as u64,
                    model: arrival.model_index,
                    arrival_ns: arrival.arrival_ns,
                    deadline_ns: crate::request::deadline_ns(arrival.arrival_ns, model.slo_ns, self.knobs.d_resp_ns),
                };
                self.requests.push(RequestRecord {
                    model: arrival.model_index,
                    phase: arrival.phase,
                    arrival_ns: arrival.arrival_ns,
                    deadline_ns: request.deadline_ns,
                    outcome: Outcome::NoReply,
                    plan_id: None,
                    finish_ns: None,
                });
                next_arrival += 1;
                policy.on_arrival(now_ns, request, &mut out);
            } else {
                policy.on_timer(now_ns, &mut out);
            }
            if !out.is_empty() {
                self.apply(now_ns, &out);
                out.clear();
            }
        }
    }

    /// Executes a policy's decisions on the fake GPUs.
    fn apply(&mut self, now_ns: u64, out: &Output) {
        for &plan_id in &out.preempted {
            let plan = &mut self.plans[plan_id as usize];
            assert_eq!(plan.status, PlanStatus::Running, "only running plans are preempted");
            plan.status = PlanStatus::Preempted;
            let stop_ns = now_ns.max(plan.exec_at_ns);
            self.ledger.unbusy(stop_ns, plan.finish_at_ns);
            plan.finish_at_ns = stop_ns;
            if self.gpu_last_plan[plan.gpu as usize] == Some(plan_id) {
                self.gpu_busy_until_ns[plan.gpu as usize] = stop_ns;
            }
        }
        for &request in &out.drops {
            let record = &mut self.requests[request.id as usize];
            assert_eq!(record.outcome, Outcome::NoReply, "one reply per request");
            record.outcome = Outcome::Dropped;
        }
        for plan in &out.plans {
            assert_eq!(plan.plan_id as usize, self.plans.len(), "plan ids are dense");
            let profile = &self.models[plan.model as usize].profile;
            let arrive_ns = now_ns + self.knobs.lead_ns(plan.batch_size);
            let start_ns = plan
                .exec_at_ns
                .max(arrive_ns)
                .max(self.gpu_busy_until_ns[plan.gpu as usize]);
            let idle_ns = start_ns - self.gpu_busy_until_ns[plan.gpu as usize].min(start_ns);
            let factor = self.gpu_factors.get(plan.gpu as usize).copied().unwrap_or(1.0);
            let profiled_ns = crate::profile::scale_ns(profile.exec_ns(plan.batch_size), factor);
            let run_ns = self.exec.run_ns(profiled_ns, start_ns, idle_ns, &mut self.exec_rng);
            let finish_ns = start_ns + run_ns;
            self.ledger.busy(start_ns, finish_ns);
            self.gpu_busy_until_ns[plan.gpu as usize] = finish_ns;
            self.gpu_last_plan[plan.gpu as usize] = Some(plan.plan_id);
            let requests_start = self.plan_requests.len() as u32;
            for request in out.plan_requests(plan) {
                assert_eq!(request.model, plan.model);
                assert!(
                    request.arrival_ns <= now_ns,
                    "no plan holds a request before it arrives"
                );
                self.plan_requests.push(request.id as u32);
            }
            self.plans.push(PlanRecord {
                plan_id: plan.plan_id,
                gpu: plan.gpu,
                model: plan.model,
                batch_size: plan.batch_size,
                emitted_ns: now_ns,
                exec_at_ns: start_ns,
                finish_at_ns: finish_ns,
                planned_exec_at_ns: plan.exec_at_ns,
                status: PlanStatus::Running,
                requests_start,
            });
            self.completions.push(Reverse((finish_ns, plan.plan_id)));
        }
    }

    fn complete(&mut self, plan_id: u64) -> Option<Completion> {
        let plan = &mut self.plans[plan_id as usize];
        if plan.status != PlanStatus::Running {
            return None;
        }
        plan.status = PlanStatus::Done;
        let plan = *plan;
        let start = plan.requests_start as usize;
        for &id in &self.plan_requests[start..start + plan.batch_size as usize] {
            let record = &mut self.requests[id as usize];
            assert_eq!(record.outcome, Outcome::NoReply, "one reply per request");
            record.outcome = if plan.finish_at_ns <= record.deadline_ns {
                Outcome::Success
            } else {
                Outcome::Late
            };
            record.plan_id = Some(plan_id);
            record.finish_ns = Some(plan.finish_at_ns);
        }
        Some(Completion {
            plan_id,
            gpu: plan.gpu,
            model: plan.model,
            batch_size: plan.batch_size,
            started_ns: plan.exec_at_ns,
            finished_ns: plan.finish_at_ns,
        })
    }

    fn report(mut self, workload: &Workload, config: &SimConfig) -> SimReport {
        let bench_window_ns = workload.bench_window_ns();
        let mut summary = summarize(workload, config, &self.requests, &self.plans, bench_window_ns);
        let timeline = self.timeline(workload.end_ns());
        let (bench_start, bench_end) = (
            (bench_window_ns.0 / SECOND_NS) as usize,
            (bench_window_ns.1.div_ceil(SECOND_NS) as usize).min(timeline.len()),
        );
        let bench = timeline.get(bench_start..bench_end).unwrap_or(&[]);
        summary.gpu_paid_s = bench.iter().map(|s| s.paid_gpus).sum();
        summary.gpus_paid_peak = self
            .ledger
            .paid_max
            .get(bench_start..bench_end)
            .map_or(0, |m| m.iter().copied().max().unwrap_or(0));
        summary.autoscale = self.scaler.as_ref().map(|scaler| AutoscaleSummary {
            config: *scaler.config(),
            started: scaler.started_total(),
            drained: scaler.drained_total(),
        });
        let close = |open: &[Option<u64>], spans: &mut Vec<GpuSpan>| {
            for (gpu, from_ns) in open.iter().enumerate() {
                if let Some(from_ns) = *from_ns {
                    spans.push(GpuSpan {
                        gpu: gpu as u32,
                        from_ns,
                        to_ns: u64::MAX,
                    });
                }
            }
        };
        close(&self.available_since, &mut self.gpu_available);
        close(&self.present_since, &mut self.gpu_present);
        SimReport {
            timeline,
            gpu_available: self.gpu_available,
            gpu_present: self.gpu_present,
            summary,
            plans: self.plans,
            plan_requests: self.plan_requests,
            requests: self.requests,
            model_names: self.models.iter().map(|m| m.name.clone()).collect(),
            bench_window_ns,
            corrections: Vec::new(),
        }
    }
}

impl Engine<'_> {
    /// The run second by second, over the workload's whole seconds (arrivals end there).
    fn timeline(&mut self, workload_end_ns: u64) -> Vec<Second> {
        let (online, paid) = (self.ledger.online, self.ledger.paid);
        self.ledger.set_gpus(self.end_ns.max(workload_end_ns), online, paid);
        let seconds = ((workload_end_ns / SECOND_NS) as usize).max(1);
        let mut timeline = vec![Second::default(); seconds];
        for r in &self.requests {
            let Some(second) = timeline.get_mut((r.arrival_ns / SECOND_NS) as usize) else {
                continue;
            };
            second.arrivals += 1;
            if r.outcome == Outcome::Success {
                second.success += 1;
            } else {
                second.bad += 1;
            }
        }
        let at = |v: &[u64], i: usize| v.get(i).copied().unwrap_or(0) as f64 / SECOND_NS as f64;
        let mut recommended = 0;
        for (i, second) in timeline.iter_mut().enumerate() {
            second.busy_gpus = at(&self.ledger.busy_ns, i);
            second.online_gpus = at(&self.ledger.online_ns, i);
            second.paid_gpus = at(&self.ledger.paid_ns, i);
            recommended = self.ledger.recommended.get(i).copied().unwrap_or(recommended);
            second.recommended = recommended;
        }
        timeline
    }
}

fn summarize(
    workload: &Workload,
    config: &SimConfig,
    requests: &[RequestRecord],
    plans: &[PlanRecord],
    (bench_start_ns, bench_end_ns): (u64, u64),
) -> Summary {
    let model_count = workload.models.len();
    let mut per_model = vec![Counts::default(); model_count];
    let mut total = Counts::default();
    for r in requests.iter().filter(|r| r.phase == Phase::Bench) {
        per_model[r.model as usize].add(r.outcome);
        total.add(r.outcome);
    }
    let bench_s = (bench_end_ns - bench_start_ns) as f64 / 1e9;
    let mut histogram = std::collections::BTreeMap::<u32, u64>::new();
    let mut model_batches = vec![(0u64, 0u64); model_count];
    let mut gpu_busy_ns = vec![0u64; config.gpu_count as usize];
    for plan in plans {
        let overlap_ns = plan
            .finish_at_ns
            .min(bench_end_ns)
            .saturating_sub(plan.exec_at_ns.max(bench_start_ns));
        gpu_busy_ns[plan.gpu as usize] += overlap_ns;
        let in_bench = (bench_start_ns..bench_end_ns).contains(&plan.exec_at_ns);
        if plan.status == PlanStatus::Done && in_bench {
            *histogram.entry(plan.batch_size).or_default() += 1;
            let entry = &mut model_batches[plan.model as usize];
            entry.0 += 1;
            entry.1 += u64::from(plan.batch_size);
        }
    }
    let mean = |(count, sum): (u64, u64)| if count == 0 { 0.0 } else { sum as f64 / count as f64 };
    let models: Vec<ModelSummary> = workload
        .models
        .iter()
        .zip(&per_model)
        .zip(&model_batches)
        .map(|((spec, counts), &batches)| ModelSummary {
            name: spec.name.clone(),
            bad_rate: counts.bad_rate_percent(),
            counts: counts.clone(),
            mean_batch_size: mean(batches),
        })
        .collect();
    let measured: Vec<f64> = models
        .iter()
        .filter(|m| m.counts.total > 0)
        .map(|m| m.bad_rate)
        .collect();
    let bad_rate = if measured.is_empty() {
        0.0
    } else {
        measured.iter().sum::<f64>() / measured.len() as f64
    };
    let bad_rate_worst = measured.iter().copied().fold(0.0, f64::max);
    let all_batches = model_batches.iter().fold((0, 0), |acc, &(c, s)| (acc.0 + c, acc.1 + s));
    Summary {
        policy: config.policy.name().to_string(),
        gpu_count: config.gpu_count,
        seed: config.seed,
        rate_scale: config.rate_scale,
        offered_rps: total.total as f64 / bench_s,
        success_rps: total.success as f64 / bench_s,
        counts: total,
        bad_rate,
        bad_rate_worst,
        mean_batch_size: mean(all_batches),
        batch_size_histogram: histogram.into_iter().collect(),
        gpu_busy_fraction: gpu_busy_ns.iter().map(|&ns| ns as f64 / 1e9 / bench_s).collect(),
        gpus_used: gpu_busy_ns.iter().filter(|&&ns| ns > 0).count() as u32,
        gpu_busy_s: gpu_busy_ns.iter().sum::<u64>() as f64 / 1e9,
        gpu_paid_s: 0.0,
        gpus_paid_peak: 0,
        autoscale: None,
        models,
    }
}

/// Writes `plans.csv`, `requests.csv` and `summary.json` into `dir` (created if missing).
pub fn write_dump(report: &SimReport, dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let mut plans = String::with_capacity(report.plans.len() * 48);
    plans.push_str("plan_id,gpu,model,batch_size,exec_at_ns,finish_at_ns\n");
    for plan in report.plans.iter().filter(|p| p.status == PlanStatus::Done) {
        let _ = writeln!(
            plans,
            "{},{},{},{},{},{}",
            plan.plan_id,
            plan.gpu,
            report.model_names[plan.model as usize],
            plan.batch_size,
            plan.exec_at_ns,
            plan.finish_at_ns
        );
    }
    std::fs::write(dir.join("plans.csv"), plans)?;
    let mut requests = String::with_capacity(report.requests.len() * 64);
    requests.push_str("request_id,model,phase,arrival_ns,deadline_ns,outcome,plan_id,finish_ns\n");
    for (id, r) in report.requests.iter().enumerate() {
        let _ = write!(
            requests,
            "{},{},{},{},{},{},",
            id,
            report.model_names[r.model as usize],
            r.phase.as_str(),
            r.arrival_ns,
            r.deadline_ns,
            r.outcome.as_str()
        );
        if let (Some(plan_id), Some(finish_ns)) = (r.plan_id, r.finish_ns) {
            let _ = write!(requests, "{plan_id},{finish_ns}");
        } else {
            requests.push(',');
        }
        requests.push('\n');
    }
    std::fs::write(dir.join("requests.csv"), requests)?;
    let json = serde_json::to_string_pretty(&report.summary).map_err(io::Error::other)?;
    std::fs::write(dir.join("summary.json"), json + "\n")?;
    Ok(())
}
