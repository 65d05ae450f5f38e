//! `symphony stress`: arrivals injected straight into N sans-IO shards at a rate, with no
//! sockets, after the reference's `stress_rankmt`.
//!
//! Each shard is a [`ShardCore`] on a thread of its own, planning on the real lock-free GPU
//! table shared by all of them; between threads the shards' messages go over channels (the
//! service's mesh, without glommio), and each shard runs its embedded simulated executors
//! itself (a plan's completion comes at its planned finish, in real time). Every shard has one
//! client connection whose REQUEST frames are prepared ahead: the injector hands the shard a
//! frame when its arrival time comes (evenly spaced, models in turn, so most requests cross
//! to another shard when there are several) and records how late it was.
//!
//! A run **holds** when no injection was more than [`LATE_LIMIT`] late (the shard kept up)
//! and at most 1 % of the requests were answered other than OK. The time spent inside
//! `ShardCore::handle` per injected request is the scheduler's CPU cost (the driver's work:
//! sockets, encoding replies' frames into buffers, is not in it; the client's decoding is
//! not either). [`knee`] doubles the rate until a run fails, then bisects.

use std::collections::BinaryHeap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use symphony_core::policy::deferred::Config;
use symphony_core::policy::{Knobs, ModelConfig, Plan, PolicyKind};
use symphony_core::profile::Profile;
use symphony_core::wire::{self, Frame, FrameDecoder, Kind, ModelRef, RequestRef, Status};
use symphony_shards::buffers::ReadBuffer;
use symphony_shards::config::{Limits, Timeouts};
use symphony_shards::executors::Executors;
use symphony_shards::shard::{
    Catalog, ConnectionKey, Effect, Effects, Input, Peer, ShardCore, ShardMsg, ShardParams, TimeoutsNs,
};
use symphony_shards::stats::Stats;
use symphony_shards::sync::gpu_table::GpuTable;

/// An injection later than this fails the run: the shard did not keep up.
pub const LATE_LIMIT: Duration = Duration::from_millis(2);
/// The largest share of requests answered other than OK in a run that holds.
pub const BAD_RATE_LIMIT: f64 = 0.01;
/// The reference scheduler's figure on this machine (the measurement): microseconds
/// of CPU per request on one core, and the rate it holds.
pub const REFERENCE_US_PER_REQUEST: f64 = 2.5;
pub const REFERENCE_RPS: f64 = 400_000.0;

/// One stress run.
#[derive(Debug, Clone)]
pub struct StressConfig {
    pub shards: usize,
    pub models: usize,
    pub gpus: u32,
    /// Offered requests per second, over all shards.
    pub rate_rps: f64,
    pub duration: Duration,
    pub policy: PolicyKind,
    /// Every model's profile (the reference's linear form) and SLO.
    pub profile: String,
    pub slo_ms: u64,
}

impl StressConfig {
    /// 1,000 light models on 1,024 GPUs (the front door's benchmark workload's shape).
    pub fn front_door(shards: usize, rate_rps: f64) -> StressConfig {
        StressConfig {
            shards,
            models: 1000,
            gpus: 1024,
            rate_rps,
            duration: Duration::from_secs(2),
            policy: PolicyKind::Symphony,
            profile: "sleep#400,2000,0,0".into(),
            slo_ms: 100,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct StressReport {
    pub injected: u64,
    pub replies: u64,
    pub ok: u64,
    /// The latest injection, behind its arrival time.
    pub late_max: Duration,
    /// Time inside `ShardCore::handle`, all shards.
    pub busy: Duration,
    pub wall: Duration,
}

impl StressReport {
    pub fn bad_rate(&self) -> f64 {
        if self.injected == 0 {
            return 0.0;
        }
        1.0 - self.ok as f64 / self.injected as f64
    }

    /// The scheduler's CPU per injected request.
    pub fn us_per_request(&self) -> f64 {
        self.busy.as_secs_f64() * 1e6 / self.injected.max(1) as f64
    }

    /// Whether the shards kept up: no injection late past [`LATE_LIMIT`], every request
    /// answered, and at most [`BAD_RATE_LIMIT`] of them other than OK.
    pub fn holds(&self) -> bool {
        self.late_max <= LATE_LIMIT && self.replies == self.injected && self.bad_rate() <= BAD_RATE_LIMIT
    }
}

/// `count` models named `m0`, `m1`, ... with one profile and SLO (the stress's, the
/// benchmarks' and the allocation counts' model sets).
pub fn uniform_models(count: usize, profile: &Profile, slo_ns: u64) -> Vec<ModelConfig> {
    (0..count)
        .map(|i| ModelConfig {
            name: format!("m{i}"),
            profile: profile.clone(),
            slo_ns,
        })
        .collect()
}

/// A REQUEST frame's payload (the frame without its header) for `model`, with no input and
/// the model's own SLO.
pub fn request_payload(client_request_id: u64, model: &ModelRef) -> Vec<u8> {
    let mut frame = Vec::new();
    let request = RequestRef {
        client_request_id,
        model,
        slo_us: None,
        input: &[],
    };
    wire::encode_request(&mut frame, &request).expect("a request with no input fits a frame");
    frame.split_off(wire::FRAME_HEADER_SIZE)
}

/// Runs `config` once.
pub fn run(config: &StressConfig) -> Result<StressReport, String> {
    let shard_count = config.shards.max(1);
    let slo_ns = config.slo_ms * 1_000_000;
    let profile = Profile::parse_linear(&config.profile, slo_ns).map_err(|e| e.to_string())?;
    let models = uniform_models(config.models.max(1), &profile, slo_ns);
    let limits = Limits {
        requests_per_connection: usize::MAX / 2,
        request_bytes_per_connection: usize::MAX / 2,
        ..Limits::default()
    };
    let cores = embedded_cores(&models, config.gpus, shard_count, config.policy, limits);
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..shard_count).map(|_| mpsc::channel::<ShardMsg>()).unzip();
    let epoch = Instant::now() + Duration::from_millis(20);
    // Shards done with their own requests; each serves the others until all are.
    let finished = AtomicUsize::new(0);
    let reports: Vec<Result<StressReport, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = receivers
            .into_iter()
            .zip(cores)
            .enumerate()
            .map(|(id, (inbox, core))| {
                let outboxes = senders.clone();
                let finished = &finished;
                scope.spawn(move || ShardRun::new(core, id, shard_count, config, outboxes, inbox, epoch).run(finished))
            })
            .collect();
        drop(senders);
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a shard thread panicked".into())))
            .collect()
    });
    let mut total = StressReport::default();
    for report in reports {
        let r = report?;
        total.injected += r.injected;
        total.replies += r.replies;
        total.ok += r.ok;
        total.late_max = total.late_max.max(r.late_max);
        total.busy += r.busy;
        total.wall = total.wall.max(r.wall);
    }
    Ok(total)
}

/// `shards` shard cores serving `models` on `gpus` embedded GPUs of one shared table, with
/// no external executors (the stress, the benchmarks and the allocation count build them
/// so).
pub fn embedded_cores(
    models: &[ModelConfig],
    gpus: u32,
    shards: usize,
    policy: PolicyKind,
    limits: Limits,
) -> Vec<ShardCore> {
    let catalog = Arc::new(Catalog::new(models, &[], shards));
    let table = Arc::new(GpuTable::with_offline(gpus as usize, 0, shards));
    let executors = Arc::new(Executors::new(None, Arc::clone(&table), gpus, 0, shards));
    let link_addrs = Arc::new(OnceLock::new());
    let stats = Arc::new(Stats::default());
    let knobs = Knobs::default();
    (0..shards)
        .map(|id| {
            ShardCore::new(ShardParams {
                id: id as u32,
                shard_count: shards,
                catalog: Arc::clone(&catalog),
                policy: Config::of(policy, &knobs),
                knobs: knobs.clone(),
                limits,
                timeouts: TimeoutsNs::of(&Timeouts::default()),
                table: Arc::clone(&table),
                embedded_gpus: gpus,
                embedded_exec: symphony_core::sim::ExecModel::default(),
                executors: Arc::clone(&executors),
                link_addrs: Arc::clone(&link_addrs),
                zero_copy: false,
                stats: Arc::clone(&stats),
            })
        })
        .collect()
}

/// One shard's thread: its core, its injector, its embedded executors.
struct ShardRun<'a> {
    core: ShardCore,
    id: usize,
    shards: usize,
    config: &'a StressConfig,
    outboxes: Vec<mpsc::Sender<ShardMsg>>,
    inbox: mpsc::Receiver<ShardMsg>,
    epoch: Instant,
    fx: Effects,
    /// Embedded plans in flight: (finish, plan id, start), earliest first.
    running: BinaryHeap<std::cmp::Reverse<(u64, u64, u64)>>,
    report: StressReport,
}

impl<'a> ShardRun<'a> {
    fn new(
        core: ShardCore,
        id: usize,
        shards: usize,
        config: &'a StressConfig,
        outboxes: Vec<mpsc::Sender<ShardMsg>>,
        inbox: mpsc::Receiver<ShardMsg>,
        epoch: Instant,
    ) -> ShardRun<'a> {
        ShardRun {
            core,
            id,
            shards,
            config,
            outboxes,
            inbox,
            epoch,
            fx: Effects::default(),
            running: BinaryHeap::new(),
            report: StressReport::default(),
        }
    }

    fn now_ns(&self) -> u64 {
        Instant::now().saturating_duration_since(self.epoch).as_nanos() as u64
    }

    fn handle(&mut self, input: Input<'_>) {
        let started = Instant::now();
        let now_ns = started.saturating_duration_since(self.epoch).as_nanos() as u64;
        self.fx.clear();
        self.core.handle(now_ns, input, &mut self.fx);
        self.report.busy += started.elapsed();
        self.apply();
    }

    /// The driver's part: replies counted, messages sent, embedded plans started.
    fn apply(&mut self) {
        let list = std::mem::take(&mut self.fx.list);
        for effect in &list {
            match effect {
                Effect::Write { bytes, .. } => {
                    for frame in FrameDecoder::default().frames(&self.fx.bytes[bytes.clone()]).flatten() {
                        if frame.kind == Kind::Reply {
                            self.report.replies += 1;
                            if wire::decode_reply(frame.payload).is_ok_and(|r| r.status == Status::Ok) {
                                self.report.ok += 1;
                            }
                        }
                    }
                }
                Effect::RunEmbedded(plan) => self.start(*plan),
                Effect::Close { .. } | Effect::Log(_) | Effect::Send { .. } => {}
            }
        }
        let mut list = list;
        for effect in list.drain(..) {
            if let Effect::Send { shard, msg } = effect {
                // A shard that finished early has gone: its replies are counted already.
                let _ = self.outboxes[shard].send(msg);
            }
        }
        self.fx.list = list;
    }

    fn start(&mut self, plan: Plan) {
        let start = plan.exec_at_ns.max(self.now_ns());
        let finish = start + (plan.finish_ns - plan.exec_at_ns);
        self.running.push(std::cmp::Reverse((finish, plan.plan_id, start)));
    }

    fn run(mut self, finished: &AtomicUsize) -> Result<StressReport, String> {
        let key = ConnectionKey::new(0, 0);
        let peer = Peer::Client(key);
        while Instant::now() < self.epoch {
            std::hint::spin_loop();
        }
        self.handle(Input::Opened(peer));
        // Each shard offers its share of the rate; its arrivals interleave with the others'.
        let interval_ns = (1e9 * self.shards as f64 / self.config.rate_rps.max(1.0)) as u64;
        let offset_ns = interval_ns * self.id as u64 / self.shards as u64;
        let duration_ns = self.config.duration.as_nanos() as u64;
        let arrivals = duration_ns / interval_ns.max(1);
        // The prepared frames: one per model this shard's client asks for, round robin.
        let models = self.config.models.max(1);
        let payloads: Vec<Vec<u8>> = (0..models)
            .map(|m| request_payload(m as u64, &ModelRef::Id(m as u32)))
            .collect();
        let buffer = ReadBuffer::new(64, 64);
        let mut next = 0u64;
        let slo_ns = self.config.slo_ms * 1_000_000;
        let drain_until_ns = duration_ns + slo_ns + 1_000_000_000;
        let mut since_read_done = 0;
        let mut counted = false;
        loop {
            let now_ns = self.now_ns();
            // Injections due now, as a driver hands over the frames of one read.
            while next < arrivals {
                let at_ns = offset_ns + next * interval_ns;
                if at_ns > now_ns {
                    break;
                }
                let late = Duration::from_nanos(now_ns - at_ns);
                self.report.late_max = self.report.late_max.max(late);
                let model = (next as usize + self.id) % models;
                let payloads = &payloads;
                self.handle(Input::Frame {
                    from: peer,
                    frame: Ok(Frame {
                        kind: Kind::Request,
                        payload: &payloads[model],
                    }),
                    buffer: &buffer,
                });
                self.report.injected += 1;
                next += 1;
                since_read_done += 1;
                if since_read_done == 64 {
                    since_read_done = 0;
                    self.handle(Input::ReadDone);
                }
            }
            if since_read_done > 0 {
                since_read_done = 0;
                self.handle(Input::ReadDone);
            }
            if counted {
                // Done with its own: it only serves the other shards' requests now.
                std::thread::yield_now();
            }
            while let Ok(msg) = self.inbox.try_recv() {
                self.handle(Input::Shard(msg));
            }
            let now_ns = self.now_ns();
            while let Some(&std::cmp::Reverse((finish, plan_id, start))) = self.running.peek() {
                if finish > now_ns {
                    break;
                }
                self.running.pop();
                self.handle(Input::EmbeddedDone {
                    plan_id,
                    started_ns: start,
                    finished_ns: finish,
                });
            }
            if self.core.next_wake_ns().is_some_and(|at| at <= self.now_ns()) {
                self.handle(Input::Timer);
            }
            let done = next == arrivals && self.report.replies == self.report.injected && self.core.held() == 0;
            if done && !counted {
                counted = true;
                finished.fetch_add(1, Ordering::AcqRel);
            }
            if (counted && finished.load(Ordering::Acquire) == self.shards) || now_ns > drain_until_ns {
                break;
            }
        }
        self.report.wall = self.epoch.elapsed();
        Ok(self.report)
    }
}

/// A knee search: every run (its rate and report), in order, and the largest rate that held.
#[derive(Debug, Clone)]
pub struct Knee {
    pub runs: Vec<(f64, StressReport)>,
    pub rate_rps: Option<f64>,
}

/// The largest rate that holds for `base` (its `rate_rps` is the first try): doubles until a
/// run fails, then bisects `steps` times.
pub fn knee(
    base: &StressConfig,
    steps: u32,
    mut progress: impl FnMut(&StressConfig, &StressReport),
) -> Result<Knee, String> {
    let mut runs = Vec::new();
    let mut good: Option<f64> = None;
    let mut bad: Option<f64> = None;
    let mut rate = base.rate_rps;
    for _ in 0..20 {
        let config = StressConfig {
            rate_rps: rate,
            ..base.clone()
        };
        let report = run(&config)?;
        progress(&config, &report);
        let holds = report.holds();
        runs.push((rate, report));
        if holds {
            good = Some(rate);
            rate *= 2.0;
        } else {
            bad = Some(rate);
            break;
        }
    }
    for _ in 0..steps {
        let (Some(low), Some(high)) = (good, bad) else { break };
        let rate = (low + high) / 2.0;
        let config = StressConfig {
            rate_rps: rate,
            ..base.clone()
        };
        let report = run(&config)?;
        progress(&config, &report);
        if report.holds() {
            good = Some(rate);
        } else {
            bad = Some(rate);
        }
        runs.push((rate, report));
    }
    Ok(Knee { runs, rate_rps: good })
}
