//! The shard as a state machine: everything a shard decides, with no I/O inside.
//!
//! A [`ShardCore`] owns what one shard of `symphony serve` knows: the catalog, the requests
//! it holds ([`pending`]), its models' deferred scheduler over the shared GPU table, the
//! front door's per-connection accounting, its outboxes to the other shards, its executor
//! links and the plans in flight on them and on its embedded GPUs. It has one entry point,
//! [`ShardCore::handle`]: an [`Input`] at a time given by the caller, and the decisions come
//! out as [`Effects`]: bytes to write to a connection, a close, a message to a shard, an
//! embedded plan to start, log lines. It reads no clock, spawns nothing and touches no
//! socket, so the glommio driver (`crate::server`) and the seeded whole-service simulation
//! (`symphony-verify`'s VOPR) run the same code. The shape is quinn-proto's; the dense
//! invariant checks (on in release) are TigerBeetle's.

pub mod catalog;
mod front_door;
mod handshake;
pub mod keys;
mod links;
pub mod messages;
mod pending;

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use symphony_core::policy::deferred::{Config, Deferred};
use symphony_core::policy::{Knobs, Output, Plan, Policy, Serving};
use symphony_core::request::Request;
use symphony_core::wire::{self, ErrorCode, Frame, ReplyRef, Status, Timings, WireError};

use crate::buffers::{ReadBuffer, Slice};
use crate::config::{Limits, Timeouts};
use crate::executors::Executors;
use crate::metrics::{Outcome, ShardMetrics};
use crate::shared_gpus::SharedGpus;
use crate::stats::Stats;
use crate::sync::gpu_table::GpuTable;

pub use catalog::Catalog;
pub use keys::{ConnectionKey, Peer, RequestKey, SlotKey};
pub use links::ZERO_COPY_MIN_BYTES;
pub use messages::{Origin, Routed, RoutedReply, ShardMsg};

use front_door::Clients;
use links::{InFlight, LinkState};
use pending::PendingTable;

/// Emptied message batches a shard keeps for reuse, of each kind.
const SPARE_BATCHES: usize = 64;

/// The timeouts, in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeoutsNs {
    pub heartbeat_ns: u64,
    pub plan_ns: u64,
    pub handshake_ns: u64,
    pub write_stall_ns: u64,
    pub backlog_shed_ns: u64,
}

impl TimeoutsNs {
    pub fn of(t: &Timeouts) -> TimeoutsNs {
        TimeoutsNs {
            heartbeat_ns: t.heartbeat_ms * 1_000_000,
            plan_ns: t.plan_ms * 1_000_000,
            handshake_ns: t.handshake_ms * 1_000_000,
            write_stall_ns: t.write_stall_ms * 1_000_000,
            backlog_shed_ns: t.backlog_shed_ms * 1_000_000,
        }
    }
}

/// What a shard is made of.
#[derive(Debug, Clone)]
pub struct ShardParams {
    pub id: u32,
    pub shard_count: usize,
    pub catalog: Arc<Catalog>,
    pub policy: Config,
    pub knobs: Knobs,
    pub limits: Limits,
    pub timeouts: TimeoutsNs,
    pub table: Arc<GpuTable>,
    /// Table slots `0..embedded_gpus` run on embedded executors; the rest are external.
    pub embedded_gpus: u32,
    pub executors: Arc<Executors>,
    /// Every shard's executor link address, by shard (set once all shards listen).
    pub link_addrs: Arc<OnceLock<Vec<String>>>,
    /// Whether large plan inputs are handed to the driver as sections (zero-copy sends).
    pub zero_copy: bool,
    pub stats: Arc<Stats>,
    /// How the embedded GPUs run a batch against its profile (`[embedded]`; exactly by
    /// default).
    pub embedded_exec: symphony_core::sim::ExecModel,
}

/// One thing that happened to a shard.
#[derive(Debug)]
pub enum Input<'a> {
    /// A connection was accepted on one of the shard's ports.
    Opened(Peer),
    /// One frame (or the framing error that ends the connection) read from a connection;
    /// `buffer` holds it, so inputs and outputs can be kept without a copy.
    Frame {
        from: Peer,
        frame: Result<Frame<'a>, WireError>,
        buffer: &'a ReadBuffer,
    },
    /// The frames of one read are handled: batched messages to other shards go out.
    ReadDone,
    /// The shard fell behind a client connection (`behind`: its reads have filled the
    /// receive buffer for `backlog_shed_ms`), or caught up: while behind, its new requests
    /// are answered `OVERLOADED`.
    Backlog { peer: Peer, behind: bool },
    /// A connection's reader ended (for a half-closed client: after its last reply);
    /// `writer_died`: its writer failed or stalled first.
    Closed { peer: Peer, writer_died: bool },
    /// What the shard wrote to a link would pass `link_write_buffer_bytes`: the link's
    /// executor does not take its plans.
    WriteOverflow(Peer),
    /// A message from another shard.
    Shard(ShardMsg),
    /// The wake-up time ([`ShardCore::next_wake_ns`]) came, or new work may have moved it.
    Timer,
    /// An embedded executor ran a plan.
    EmbeddedDone {
        plan_id: u64,
        started_ns: u64,
        finished_ns: u64,
    },
    /// The service stops: new requests are answered "shutting down".
    Stop,
    /// The drain's grace period is over: what is still held is answered "shutting down".
    GraceOver,
}

/// One decision for the driver, in order.
#[derive(Debug)]
pub enum Effect {
    /// Queue `bytes` of [`Effects::bytes`] on the connection, then the slices `sections` of
    /// [`Effects::sections`] (zero-copy plan inputs). A write to a client connection may
    /// be a reply its reader waits for.
    Write {
        to: Peer,
        bytes: Range<usize>,
        sections: Range<usize>,
    },
    /// Close the connection once what is queued is written; `stop_reading`: its reader
    /// stops at once (a refusal or a broken protocol).
    Close { to: Peer, stop_reading: bool },
    /// A message to another shard (the mesh keeps the order per destination).
    Send { shard: usize, msg: ShardMsg },
    /// Run a plan on an embedded executor: at `exec_at_ns`, for `finish_ns - exec_at_ns`;
    /// then give [`Input::EmbeddedDone`]. Both are the plan's own unless `[embedded]` makes
    /// batches miss their profile: then the batch's run time, after the previous batch this
    /// shard ran on that GPU.
    RunEmbedded(Plan),
    /// A line for the log (peers' strings in it are bounded and escaped).
    Log(String),
}

/// What one [`ShardCore::handle`] call decided. Reused from call to call: no allocation
/// per request in steady state.
#[derive(Debug, Default)]
pub struct Effects {
    pub list: Vec<Effect>,
    pub bytes: Vec<u8>,
    pub sections: Vec<Slice>,
    /// The scheduler ran: its next timer may have moved earlier.
    pub rearm: bool,
}

impl Effects {
    pub fn clear(&mut self) {
        self.list.clear();
        self.bytes.clear();
        self.sections.clear();
        self.rearm = false;
    }

    /// Bytes encoded by `encode` into [`Effects::bytes`], queued for `to` (merged into the
    /// previous write when that one is to the same peer and has no sections).
    fn write_with<T, E>(&mut self, to: Peer, encode: impl FnOnce(&mut Vec<u8>) -> Result<T, E>) -> Result<(), E> {
        let start = self.bytes.len();
        if let Err(e) = encode(&mut self.bytes) {
            self.bytes.truncate(start);
            return Err(e);
        }
        let end = self.bytes.len();
        if let Some(Effect::Write {
            to: last,
            bytes,
            sections,
        }) = self.list.last_mut()
        {
            if *last == to && sections.start == sections.end && bytes.end == start {
                bytes.end = end;
                return Ok(());
            }
        }
        let at = self.sections.len();
        self.list.push(Effect::Write {
            to,
            bytes: start..end,
            sections: at..at,
        });
        Ok(())
    }

    /// An ERROR frame, then the close; the reader stops.
    fn fail(&mut self, to: Peer, code: ErrorCode, message: &str) {
        let _ = self.write_with(to, |out| wire::encode_error(out, code, message));
        self.list.push(Effect::Close { to, stop_reading: true });
    }

    fn send(&mut self, shard: usize, msg: ShardMsg) {
        self.list.push(Effect::Send { shard, msg });
    }

    fn log(&mut self, line: String) {
        self.list.push(Effect::Log(line));
    }

    /// The bytes and sections of a write.
    pub fn write_parts(&self, bytes: &Range<usize>, sections: &Range<usize>) -> (&[u8], &[Slice]) {
        (&self.bytes[bytes.clone()], &self.sections[sections.clone()])
    }
}

/// Everything one shard owns and decides.
#[derive(Debug)]
pub struct ShardCore {
    id: u32,
    shard_count: usize,
    /// What `GET /metrics` shows of this shard (written here only).
    metrics: Arc<ShardMetrics>,
    catalog: Arc<Catalog>,
    d_resp_ns: u64,
    limits: Limits,
    timeouts: TimeoutsNs,
    scheduler: Deferred<SharedGpus>,
    output: Output,
    pending: PendingTable,
    /// The front door's connections and what each is owed.
    clients: Clients,
    /// Requests this shard routed to other shards and has no reply for yet.
    awaiting_remote: usize,
    /// Per destination shard: requests and replies to send in the next batch.
    outbox_requests: Vec<Vec<Routed>>,
    outbox_replies: Vec<Vec<RoutedReply>>,
    /// Emptied batches from other shards, reused for this shard's next ones (traffic both
    /// ways allocates no batch in steady state); at most [`SPARE_BATCHES`] each, none larger
    /// than `routed_batch`.
    spare_requests: Vec<Vec<Routed>>,
    spare_replies: Vec<Vec<RoutedReply>>,
    embedded_gpus: u32,
    /// Plans running on embedded executors, by plan id.
    embedded: HashMap<u64, InFlight>,
    /// `[embedded]`'s run times (`None`: each batch runs its profile's time), and when each
    /// embedded GPU is free of this shard's batches.
    embedded_runner: Option<symphony_core::sim::ExecRunner>,
    embedded_busy_until_ns: Vec<u64>,
    executors: Arc<Executors>,
    link_addrs: Arc<OnceLock<Vec<String>>>,
    /// Connections on the link port, joined or not.
    links: HashMap<ConnectionKey, LinkState>,
    /// Each executor's current link here.
    link_of: HashMap<u32, ConnectionKey>,
    /// When links are next checked for heartbeats, overdue plans and handshakes.
    next_link_check_ns: u64,
    /// Requests of plans in flight (embedded and on links).
    inflight_requests: usize,
    /// The plan message being encoded (its request list keeps its capacity).
    plan_msg: wire::executor::PlanMsg,
    /// Spare request-id lists of finished plans (no allocation per plan in steady state).
    id_lists: Vec<Vec<u64>>,
    zero_copy: bool,
    stopping: bool,
    /// The time of the input being handled.
    now_ns: u64,
    /// The scheduler ran during this input: its output is acted on at the end.
    touched: bool,
    stats: Arc<Stats>,
}

impl ShardCore {
    pub fn new(params: ShardParams) -> ShardCore {
        let owned: Vec<_> = params.catalog.owned[params.id as usize]
            .iter()
            .map(|&global| params.catalog.configs[global as usize].clone())
            .collect();
        // A shard that owns no model still serves as a front door; its scheduler is idle.
        let scheduler_models = if owned.is_empty() {
            vec![params.catalog.configs[0].clone()]
        } else {
            owned
        };
        let gpu_count = params.table.gpu_count();
        let scheduler = Deferred::with_source(
            params.policy,
            &scheduler_models,
            SharedGpus::new(params.table, params.id as u16),
            &params.knobs,
        );
        let mut core = ShardCore {
            id: params.id,
            shard_count: params.shard_count,
            d_resp_ns: params.knobs.d_resp_ns,
            limits: params.limits,
            timeouts: params.timeouts,
            scheduler,
            output: Output::new(),
            pending: PendingTable::new(params.limits.requests_per_shard),
            clients: Clients::default(),
            awaiting_remote: 0,
            outbox_requests: vec![Vec::new(); params.shard_count],
            outbox_replies: vec![Vec::new(); params.shard_count],
            spare_requests: Vec::new(),
            spare_replies: Vec::new(),
            embedded_gpus: params.embedded_gpus,
            embedded: HashMap::new(),
            embedded_runner: (!params.embedded_exec.is_exact())
                .then(|| symphony_core::sim::ExecRunner::new(params.embedded_exec, u64::from(params.id))),
            embedded_busy_until_ns: vec![0; params.embedded_gpus as usize],
            executors: params.executors,
            link_addrs: params.link_addrs,
            links: HashMap::new(),
            link_of: HashMap::new(),
            next_link_check_ns: 0,
            inflight_requests: 0,
            plan_msg: wire::executor::PlanMsg::default(),
            id_lists: Vec::new(),
            zero_copy: params.zero_copy,
            stopping: false,
            now_ns: 0,
            touched: false,
            stats: params.stats,
            metrics: Arc::new(ShardMetrics::new(
                params.catalog.owned.get(params.id as usize).map_or(0, Vec::len),
                gpu_count,
            )),
            catalog: params.catalog,
        };
        // Embedded GPUs of several speeds are planned by class from the start (executors
        // that join later replan).
        if core.executors.embedded_factor(0).is_some() {
            core.apply_planning_profiles();
        }
        core
    }

    /// This shard's values for `GET /metrics`.
    pub fn metrics(&self) -> &Arc<ShardMetrics> {
        &self.metrics
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Handles one input at `now_ns` (nanoseconds on the service's clock); the decisions
    /// are appended to `fx`.
    pub fn handle(&mut self, now_ns: u64, input: Input<'_>, fx: &mut Effects) {
        self.now_ns = now_ns;
        let mut flush = true;
        match input {
            Input::Opened(Peer::Client(key)) => self.clients.open(key),
            Input::Opened(Peer::Link(key)) => {
                self.links.insert(key, LinkState::new(now_ns));
                self.next_link_check_ns = self.next_link_check_ns.min(now_ns + self.link_check_period_ns());
            }
            Input::Frame { from, frame, buffer } => {
                flush = false;
                match from {
                    Peer::Client(key) => self.on_client_frame(key, frame, buffer, fx),
                    Peer::Link(key) => self.on_link_frame(key, frame, buffer, fx),
                }
            }
            Input::ReadDone => {}
            Input::Backlog {
                peer: Peer::Client(key),
                behind,
            } => self.clients.set_shedding(key, behind),
            Input::Backlog {
                peer: Peer::Link(_), ..
            } => {}
            Input::Closed {
                peer: Peer::Client(key),
                ..
            } => self.client_closed(key, fx),
            Input::Closed {
                peer: Peer::Link(key),
                writer_died,
            } => self.link_closed(key, writer_died, fx),
            Input::WriteOverflow(Peer::Link(key)) => self.link_overflowed(key, fx),
            // A client's replies are written whatever its queue holds (its reads stop).
            Input::WriteOverflow(Peer::Client(_)) => {}
            Input::Shard(msg) => self.handle_msg(msg, fx),
            Input::Timer => self.on_timer(fx),
            Input::EmbeddedDone {
                plan_id,
                started_ns,
                finished_ns,
            } => self.embedded_done(plan_id, started_ns, finished_ns, fx),
            Input::Stop => self.stopping = true,
            Input::GraceOver => {
                for origin in self.pending.drain() {
                    let timings = self.timings(origin, None);
                    self.reply(origin, Status::ShuttingDown, timings, fx);
                }
            }
        }
        if self.touched {
            self.touched = false;
            self.drain_output(fx);
            self.exchange_gpus(fx);
            self.metrics.set_demand_gpus(self.scheduler.demand_gpus());
            fx.rearm = true;
            flush = true;
        }
        if flush {
            self.flush_outbox(fx);
        }
        self.check_counts();
    }

    /// When the shard next needs [`Input::Timer`]: the scheduler's next timer, and the
    /// links' next check while it has links.
    pub fn next_wake_ns(&mut self) -> Option<u64> {
        let scheduler = self.scheduler.next_timer_ns();
        let links = (!self.links.is_empty()).then_some(self.next_link_check_ns);
        match (scheduler, links) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The models every shard knows.
    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// What a client connection is owed: replies and their requests' input bytes.
    pub fn client_owed(&self, key: ConnectionKey) -> (u32, usize) {
        self.clients.get(key).map_or((0, 0), |c| (c.owed, c.owed_bytes))
    }

    /// Input bytes of the requests this shard's connections are owed replies for.
    pub fn owed_bytes(&self) -> usize {
        self.clients.owed_bytes
    }

    /// Requests this shard holds for its models.
    pub fn held(&self) -> usize {
        self.pending.held()
    }

    /// Requests this shard routed elsewhere and has no reply for yet.
    pub fn awaiting_remote(&self) -> usize {
        self.awaiting_remote
    }

    /// Requests queued in the scheduler (neither planned nor dropped).
    pub fn queued(&self) -> usize {
        self.scheduler.queued_count()
    }

    /// Where a request this shard holds (by its scheduler id) came from, and its deadline.
    pub fn request(&self, id: u64) -> Option<(Origin, u64)> {
        self.pending
            .get(RequestKey::of_id(id))
            .map(|p| (p.origin, p.deadline_ns))
    }

    /// The requests of a plan running on an embedded executor.
    pub fn embedded_requests(&self, plan_id: u64) -> Option<&[u64]> {
        self.embedded.get(&plan_id).map(|f| f.ids.as_slice())
    }

    /// Plans in flight on this shard's embedded executors and links.
    pub fn plans_in_flight(&self) -> usize {
        self.embedded.len() + self.links.values().map(LinkState::inflight_count).sum::<usize>()
    }

    /// The shard's invariants, checked in full (the simulation calls it after every input;
    /// [`ShardCore::handle`] checks the counting ones every time).
    pub fn check_invariants(&self) {
        self.check_counts();
        self.scheduler.check_invariants();
        let mut inflight = 0;
        for flight in self
            .embedded
            .values()
            .chain(self.links.values().flat_map(LinkState::flights))
        {
            inflight += flight.ids.len();
        }
        assert_eq!(
            inflight, self.inflight_requests,
            "shard {}: requests in flight",
            self.id
        );
        let pending_inflight = self
            .embedded
            .values()
            .chain(self.links.values().flat_map(LinkState::flights))
            .flat_map(|f| f.ids.iter())
            .filter(|&&id| self.pending.get(RequestKey::of_id(id)).is_some())
            .count();
        assert_eq!(
            self.pending.held(),
            self.scheduler.queued_count() + pending_inflight,
            "shard {}: every held request is queued or in a plan in flight",
            self.id
        );
        self.clients.check();
        for (executor, key) in &self.link_of {
            assert_eq!(
                self.links.get(key).and_then(LinkState::executor),
                Some(*executor),
                "shard {}: executor {executor}'s link",
                self.id
            );
        }
    }

    /// The counting invariants, cheap enough for every input.
    fn check_counts(&self) {
        assert!(
            self.pending.held() <= self.scheduler.queued_count() + self.inflight_requests,
            "shard {}: {} held, {} queued, {} in flight",
            self.id,
            self.pending.held(),
            self.scheduler.queued_count(),
            self.inflight_requests
        );
        assert!(self.pending.held() <= self.limits.requests_per_shard);
        assert!(
            self.output.plans.is_empty() && self.output.drops.is_empty(),
            "output acted on"
        );
    }

    /// A request for a model this shard owns enters its scheduler, unless the shard holds its
    /// limit of requests or the model is swamped (saturated GPUs, and twice what its share of
    /// them can serve within its SLO queued already): then it is answered `overloaded` at
    /// once rather than queued to be dropped later.
    fn admit(&mut self, routed: Routed, fx: &mut Effects) {
        let local = self.catalog.models[routed.model as usize].local;
        let inserted = if self.scheduler.is_swamped(local) {
            None
        } else {
            self.pending
                .insert(routed.origin, local, routed.deadline_ns, routed.input)
        };
        let Some(key) = inserted else {
            self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
            let timings = self.timings(routed.origin, None);
            self.reply(routed.origin, Status::Overloaded, timings, fx);
            return;
        };
        let request = Request {
            id: key.id(),
            model: local,
            arrival_ns: self.now_ns,
            deadline_ns: routed.deadline_ns,
        };
        self.scheduler.on_arrival(self.now_ns, request, &mut self.output);
        self.touched = true;
    }

    /// Acts on the scheduler's decisions: drops are answered, plans go to the executors.
    fn drain_output(&mut self, fx: &mut Effects) {
        loop {
            let mut output = std::mem::take(&mut self.output);
            for request in &output.drops {
                if let Some(pending) = self.pending.remove(RequestKey::of_id(request.id)) {
                    self.record_dropped(&pending);
                    let timings = self.timings(pending.origin, None);
                    self.reply(pending.origin, Status::Dropped, timings, fx);
                }
            }
            let mut lost = Vec::new();
            for plan in &output.plans {
                self.stats.plans.fetch_add(1, Ordering::Relaxed);
                let requests = output.plan_requests(plan);
                let mut ids = self.id_lists.pop().unwrap_or_default();
                ids.clear();
                ids.extend(requests.iter().map(|r| r.id));
                if plan.gpu >= self.embedded_gpus {
                    if let Err(ids) = self.send_plan(plan, requests, ids, fx) {
                        // Planned on a GPU whose executor is gone (its slot went offline
                        // meanwhile): its requests are planned again or answered.
                        lost.extend_from_slice(&ids);
                        self.id_lists.push(ids);
                    }
                    continue;
                }
                let batch_size = ids.len() as u32;
                self.inflight_requests += ids.len();
                self.embedded.insert(plan.plan_id, InFlight::of(plan, ids, u64::MAX));
                let mut run = *plan;
                let factor = self.executors.embedded_factor(plan.gpu);
                if self.embedded_runner.is_some() || factor.is_some() {
                    // What the GPU takes: the catalog's profile at its speed (else the plan's
                    // own time, planned for it), then the execution model's error.
                    let true_ns = match factor {
                        Some(factor) => {
                            let global = self.catalog.owned[self.id as usize][plan.model as usize];
                            let exec_ns = self.catalog.configs[global as usize].profile.exec_ns(batch_size);
                            symphony_core::profile::scale_ns(exec_ns, factor)
                        }
                        None => plan.finish_ns - plan.exec_at_ns,
                    };
                    let busy_ns = &mut self.embedded_busy_until_ns[plan.gpu as usize];
                    let start_ns = plan.exec_at_ns.max(*busy_ns);
                    let idle_ns = start_ns - (*busy_ns).min(start_ns);
                    let run_ns = match self.embedded_runner.as_mut() {
                        Some(runner) => runner.run_ns(true_ns, start_ns, idle_ns),
                        None => true_ns,
                    };
                    *busy_ns = start_ns + run_ns;
                    run.exec_at_ns = start_ns;
                    run.finish_ns = start_ns + run_ns;
                }
                fx.list.push(Effect::RunEmbedded(run));
            }
            output.clear();
            self.output = output;
            if lost.is_empty() {
                return;
            }
            for id in lost {
                self.replan_or_lose(RequestKey::of_id(id), fx);
            }
        }
    }

    /// An embedded plan ran: its requests are answered and the scheduler told.
    fn embedded_done(&mut self, plan_id: u64, started_ns: u64, finished_ns: u64, fx: &mut Effects) {
        let Some(flight) = self.embedded.remove(&plan_id) else {
            debug_assert!(false, "an embedded plan that is not in flight");
            return;
        };
        self.inflight_requests -= flight.ids.len();
        self.record_plan(&flight, started_ns, finished_ns);
        for (index, &id) in flight.ids.iter().enumerate() {
            self.pending.prefetch_ahead(&flight.ids, index);
            if let Some(pending) = self.pending.remove(RequestKey::of_id(id)) {
                self.record_ran(&pending, started_ns, finished_ns);
                let timings = self.timings(pending.origin, Some((started_ns, finished_ns)));
                self.reply(pending.origin, Status::Ok, timings, fx);
            }
        }
        let completion = flight.completion(plan_id, started_ns, finished_ns);
        self.id_lists.push(flight.ids);
        self.scheduler.on_completion(self.now_ns, &completion, &mut self.output);
        self.note_correction(completion.model);
        self.touched = true;
    }

    /// After a measured batch of `model`: where its online correction stands, for /metrics.
    pub(super) fn note_correction(&self, model: u32) {
        if let (Some(summary), Some(metrics)) = (
            self.scheduler.correction_of(model),
            self.metrics.models.get(model as usize),
        ) {
            metrics.correction(&summary);
        }
    }

    /// A plan ran from `started_ns` to `finished_ns`: its GPU's busy time, its batch size.
    fn record_plan(&self, flight: &InFlight, started_ns: u64, finished_ns: u64) {
        let ran_ns = finished_ns.saturating_sub(started_ns);
        self.metrics.gpu_busy(flight.gpu, ran_ns);
        if let Some(model) = self.metrics.models.get(flight.model as usize) {
            model.plan(flight.ids.len() as u64, ran_ns);
        }
    }

    fn record_dropped(&self, pending: &pending::Pending) {
        if let Some(model) = self.metrics.models.get(pending.model as usize) {
            model.outcome(Outcome::Dropped, 1);
        }
    }

    /// Requests whose executor failed or was lost (a refused input too).
    fn record_failed(&self, pending: &pending::Pending, n: u64) {
        if let Some(model) = self.metrics.models.get(pending.model as usize) {
            model.outcome(Outcome::Failed, n);
        }
    }

    /// A held request ran from `started_ns` to `finished_ns`: its owner's metrics.
    fn record_ran(&self, pending: &pending::Pending, started_ns: u64, finished_ns: u64) {
        if let Some(model) = self.metrics.models.get(pending.model as usize) {
            model.ran(
                started_ns.saturating_sub(pending.origin.received_ns),
                finished_ns > pending.deadline_ns,
            );
        }
    }

    fn timings(&self, origin: Origin, ran: Option<(u64, u64)>) -> Timings {
        let us = |ns: u64| (ns / 1000).min(u64::from(u32::MAX)) as u32;
        let (queued_us, exec_us) = match ran {
            Some((started_ns, finished_ns)) => {
                // An executor's times come through its clock offset, whose error can put its
                // finish a few microseconds after the result arrived here: the parts are held
                // within the whole, so queued + exec <= total always.
                let finished_ns = finished_ns.min(self.now_ns);
                let started_ns = started_ns.min(finished_ns);
                (
                    us(started_ns.saturating_sub(origin.received_ns)),
                    us(finished_ns.saturating_sub(started_ns)),
                )
            }
            None => (0, 0),
        };
        Timings {
            queued_us,
            exec_us,
            total_us: us(self.now_ns.saturating_sub(origin.received_ns)),
        }
    }

    /// Sends a reply toward its connection: written here, or batched for its shard.
    fn reply(&mut self, origin: Origin, status: Status, timings: Timings, fx: &mut Effects) {
        if origin.shard == self.id {
            self.write_reply(origin, status, timings, &[], fx);
        } else {
            self.outbox_replies[origin.shard as usize].push(RoutedReply {
                origin,
                status,
                timings,
                output: None,
            });
        }
    }

    /// An OK reply with `output`, bytes of `buffer` (a link's receive buffer): copied into
    /// the reply frame here, or held for the connection's shard.
    fn reply_output(&mut self, origin: Origin, timings: Timings, output: &[u8], buffer: &ReadBuffer, fx: &mut Effects) {
        if origin.shard == self.id {
            self.write_reply(origin, Status::Ok, timings, output, fx);
        } else {
            self.outbox_replies[origin.shard as usize].push(RoutedReply {
                origin,
                status: Status::Ok,
                timings,
                output: (!output.is_empty()).then(|| buffer.hold(output)),
            });
        }
    }

    /// The one reply to a request of one of this shard's connections.
    fn write_reply(&mut self, origin: Origin, status: Status, timings: Timings, output: &[u8], fx: &mut Effects) {
        // A closed connection's replies have nowhere to go (its slot may serve another by
        // now: the key's generation tells).
        if !self.clients.answered(origin.connection, origin.input_len as usize) {
            return;
        }
        self.metrics.reply(status);
        let reply = ReplyRef {
            client_request_id: origin.client_request_id,
            status,
            timings,
            output,
        };
        let to = Peer::Client(origin.connection);
        if fx.write_with(to, |out| wire::encode_reply(out, &reply)).is_err() {
            // Only an output over the frame cap fails to encode: the request still gets its
            // one reply.
            let failed = ReplyRef {
                status: Status::ExecutionFailed,
                output: &[],
                ..reply
            };
            let _ = fx.write_with(to, |out| wire::encode_reply(out, &failed));
        }
    }

    /// Cross-shard GPU waiting: posts the scheduler's most urgent waiting candidate, declines
    /// reservations it no longer wants, and tells the shards that releases handed GPUs to.
    fn exchange_gpus(&mut self, fx: &mut Effects) {
        let waiting = self.scheduler.waiting_invalid_after_ns();
        let gpus = self.scheduler.gpus_mut();
        gpus.post(waiting);
        gpus.decline_unwanted();
        let handoffs = gpus.take_handoffs();
        for &shard in &handoffs {
            self.stats.handoffs.fetch_add(1, Ordering::Relaxed);
            if u32::from(shard) == self.id {
                // Its own scheduler claims it at its next timer, which is now.
                self.scheduler.gpus_mut().note_handoff();
                fx.rearm = true;
                continue;
            }
            fx.send(shard as usize, ShardMsg::HandOff);
        }
        self.scheduler.gpus_mut().return_handoffs(handoffs);
    }

    /// Sends every batched cross-shard message.
    fn flush_outbox(&mut self, fx: &mut Effects) {
        for dest in 0..self.shard_count {
            if !self.outbox_requests[dest].is_empty() {
                let requests = self.take_requests(dest);
                fx.send(dest, ShardMsg::Requests(requests));
            }
            if !self.outbox_replies[dest].is_empty() {
                let spare = self.spare_replies.pop().unwrap_or_default();
                let replies = std::mem::replace(&mut self.outbox_replies[dest], spare);
                fx.send(dest, ShardMsg::Replies(replies));
            }
        }
    }

    /// The batch of requests for `dest`, replaced by a spare one.
    pub(super) fn take_requests(&mut self, dest: usize) -> Vec<Routed> {
        let spare = self.spare_requests.pop().unwrap_or_default();
        std::mem::replace(&mut self.outbox_requests[dest], spare)
    }

    fn handle_msg(&mut self, msg: ShardMsg, fx: &mut Effects) {
        match msg {
            ShardMsg::Requests(mut requests) => {
                for routed in requests.drain(..) {
                    self.admit(routed, fx);
                }
                if self.spare_requests.len() < SPARE_BATCHES && requests.capacity() <= self.limits.routed_batch {
                    self.spare_requests.push(requests);
                }
            }
            ShardMsg::Replies(mut replies) => {
                assert!(self.awaiting_remote >= replies.len(), "a reply nobody waits for");
                self.awaiting_remote -= replies.len();
                for r in replies.drain(..) {
                    let output = r.output.as_ref().map_or(&[][..], Slice::bytes);
                    self.write_reply(r.origin, r.status, r.timings, output, fx);
                }
                if self.spare_replies.len() < SPARE_BATCHES && replies.capacity() <= self.limits.routed_batch {
                    self.spare_replies.push(replies);
                }
            }
            ShardMsg::Disconnected { shard, connection } => self.cancel_connection(shard, connection),
            ShardMsg::HandOff => {
                self.scheduler.gpus_mut().note_handoff();
                self.run_timers();
            }
            ShardMsg::ExecutorLost(executor) => self.executor_lost(executor, false, "another shard lost it", fx),
        }
    }

    /// A client went away: its requests still queued here leave the scheduler before they
    /// use a GPU; those in plans in flight run (their replies are discarded) and are not
    /// planned again if their executor is lost.
    fn cancel_connection(&mut self, shard: u32, connection: ConnectionKey) {
        let held = self.pending.of_connection(shard, connection);
        if held.is_empty() {
            return;
        }
        // One pass over each model's queue (a client may go with thousands of requests).
        let mut models: Vec<u32> = held.iter().map(|&(_, model)| model).collect();
        models.sort_unstable();
        models.dedup();
        let ids: std::collections::HashSet<u64> = held.iter().map(|(key, _)| key.id()).collect();
        for model in models {
            let cancelled = self
                .scheduler
                .cancel_all(self.now_ns, model, |id| ids.contains(&id), &mut self.output);
            for id in cancelled {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                if let Some(pending) = self.pending.remove(RequestKey::of_id(id)) {
                    self.forget(pending.origin);
                }
            }
        }
        // The rest are in plans in flight: they run, but are not planned again.
        for (key, _) in held {
            if let Some(pending) = self.pending.get_mut(key) {
                pending.orphaned = true;
            }
        }
        self.touched = true;
    }

    /// A request of a client that went away leaves without a reply: its connection's shard
    /// stops waiting for one (nothing is written).
    fn forget(&mut self, origin: Origin) {
        if origin.shard != self.id {
            self.outbox_replies[origin.shard as usize].push(RoutedReply {
                origin,
                status: Status::ShuttingDown,
                timings: Timings::default(),
                output: None,
            });
        }
    }

    /// Runs the scheduler's timers that are due.
    fn run_timers(&mut self) {
        self.scheduler.on_timer(self.now_ns, &mut self.output);
        self.touched = true;
    }

    fn on_timer(&mut self, fx: &mut Effects) {
        if !self.links.is_empty() && self.now_ns >= self.next_link_check_ns {
            self.next_link_check_ns = self.now_ns + self.link_check_period_ns();
            self.check_links(fx);
        }
        if self.scheduler.next_timer_ns().is_some_and(|at| at <= self.now_ns) {
            self.run_timers();
        }
    }
}
