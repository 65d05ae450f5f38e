//! The scheduler service: one glommio shard per core, each a front door and the owner of
//! some models, all planning on one shared GPU table.
//!
//! The path of a request (ARCHITECTURE.md): a client connection on any shard sends REQUEST
//! frames (`core::wire`, many per read); the shard validates each, looks the model up and
//! routes it to the model's owning shard (itself, or over the channel mesh in batches,
//! `mesh`). The owner runs the core's deferred scheduler for its models with real time
//! (glommio timers), claiming GPUs in the shared [`GpuTable`]. Each plan runs on an embedded
//! simulated executor (a task that waits until `exec_at`, then for the profile's time) or
//! goes to an external executor over this shard's link to it (`links`); its requests are
//! answered, dropped requests at once, and every reply goes back to the connection's shard,
//! which writes many reply frames per write.
//!
//! What faces the outside is bounded and cannot be made to panic (`connection`): every port
//! has a connection cap, every connection a write queue cap and a stall timeout, a client is
//! read only while it takes its replies (TCP backpressure), the mesh's overflow stops the
//! front doors that feed it, a half-closed client still gets its replies, links must JOIN in
//! time and with their registration's secret, and a plan an executor never reports is lost
//! after `plan_timeout_ms`. SIGINT/SIGTERM stop accepting, let planned batches finish and
//! answer the rest, on every shard before any shard exits.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpListener;
use symphony_core::policy::deferred::{Config, Deferred};
use symphony_core::policy::{Completion, ModelConfig, Output, Policy};
use symphony_core::request::Request;
use symphony_core::wire::{self, ErrorCode, ReplyRef, Status, Timings};

use crate::config::{Limits, ServeConfig, Timeouts};
use crate::executors::Executors;
use crate::runtime::{self, RuntimeError, ShardMemory};
use crate::shared_gpus::SharedGpus;
use crate::sync::gpu_table::GpuTable;

/// How often idle loops look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Connections of one port that may be closing beyond its cap (evicted, or being refused):
/// each still holds a descriptor for a moment.
pub(crate) const CONNECTIONS_CLOSING_LIMIT: usize = connection::EVICTING_LIMIT + connection::REFUSING_LIMIT;
/// The fewest link connections a shard is given when the descriptor limit is low.
pub(crate) const LINKS_LEAST: usize = 4;
/// After the drain's grace period, how long a shard still waits for the other shards'
/// answers to its routed requests before it exits.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("listening on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("a shard stopped before it was ready: {0}")]
    Startup(String),
}

mod buffers;
mod connection;
mod links;
mod mesh;
mod pending;
mod zerocopy;

use buffers::{ReadBuffer, Slice};
use connection::{Connection, Slots};
use links::Link;
use mesh::Mesh;
use pending::{PendingTable, RequestKey};

/// One model as every shard knows it.
#[derive(Debug)]
struct CatalogEntry {
    slo_ns: u64,
    owner: usize,
    /// Index in the owner's scheduler.
    local: u32,
    /// The size every input must have, if the model declares one.
    input_bytes: Option<u32>,
}

/// Read-only after start-up: the models by id and name, and who owns each.
#[derive(Debug)]
struct Catalog {
    models: Vec<CatalogEntry>,
    by_name: HashMap<String, u32>,
    /// Per shard: the global ids of the models it owns, in local order.
    owned: Vec<Vec<u32>>,
    /// The models as configured (what executors are told at the handshake).
    configs: Vec<ModelConfig>,
}

impl Catalog {
    fn new(models: &[ModelConfig], input_bytes: &[Option<u32>], shards: usize) -> Catalog {
        let mut owned = vec![Vec::new(); shards];
        let mut by_name = HashMap::with_capacity(models.len());
        let mut entries = Vec::with_capacity(models.len());
        for (index, m) in models.iter().enumerate() {
            // A stable placement: model i on shard i mod n.
            let owner = index % shards;
            owned[owner].push(index as u32);
            by_name.insert(m.name.clone(), index as u32);
            entries.push(CatalogEntry {
                slo_ns: m.slo_ns,
                owner,
                local: owned[owner].len() as u32 - 1,
                input_bytes: input_bytes.get(index).copied().flatten(),
            });
        }
        Catalog {
            models: entries,
            by_name,
            owned,
            configs: models.to_vec(),
        }
    }

    fn lookup(&self, model: &wire::ArchivedModelRef) -> Option<u32> {
        match model {
            wire::ArchivedModelRef::Id(id) => {
                let id = id.to_native();
                ((id as usize) < self.models.len()).then_some(id)
            }
            wire::ArchivedModelRef::Name(name) => self.by_name.get(name.as_str()).copied(),
        }
    }

    /// The MODELS answer.
    fn models_answer(&self, client_request_id: u64) -> wire::Models {
        wire::Models {
            client_request_id,
            models: self
                .configs
                .iter()
                .zip(&self.models)
                .enumerate()
                .map(|(id, (config, entry))| wire::ModelEntry {
                    id: id as u32,
                    name: config.name.clone(),
                    slo_us: config.slo_ns / 1000,
                    input_bytes: entry.input_bytes,
                    batch_size_max: config.profile.batch_size_max(),
                })
                .collect(),
        }
    }
}

/// A connection's key on its shard: slot and generation (a reused slot never gets an older
/// connection's replies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct ConnectionKey(u64);

impl ConnectionKey {
    fn new(slot: u32, generation: u32) -> ConnectionKey {
        ConnectionKey(u64::from(generation) << 32 | u64::from(slot))
    }

    fn slot(self) -> u32 {
        self.0 as u32
    }

    fn generation(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// Where a reply goes: a connection on a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Origin {
    shard: u32,
    connection: ConnectionKey,
    client_request_id: u64,
    received_ns: u64,
    /// Bytes of the request's input (counted against its connection until the reply).
    input_len: u32,
}

/// A request on its way to the owner of its model.
#[derive(Debug, Clone)]
struct Routed {
    origin: Origin,
    model: u32,
    deadline_ns: u64,
    /// Its input bytes (kept only when external executors may run it).
    input: Option<Slice>,
}

/// A reply on its way back to the connection's shard.
#[derive(Debug, Clone)]
struct RoutedReply {
    origin: Origin,
    status: Status,
    timings: Timings,
    /// The output, held from an executor link's receive buffer.
    output: Option<Slice>,
}

/// What shards send each other, in batches.
#[derive(Debug)]
enum ShardMsg {
    Requests(Vec<Routed>),
    Replies(Vec<RoutedReply>),
    /// A client connection closed: drop its queued requests.
    Disconnected {
        shard: u32,
        connection: ConnectionKey,
    },
    /// A release reserved a GPU for the receiver's waiting candidate.
    HandOff,
    /// An executor is gone: drop the link to it, re-plan or answer its plans' requests.
    ExecutorLost(u32),
}

/// The timeouts, in the units the shard uses.
#[derive(Debug, Clone, Copy)]
struct TimeoutsNs {
    heartbeat_ns: u64,
    plan_ns: u64,
    handshake: Duration,
    write_stall: Duration,
}

impl TimeoutsNs {
    fn of(t: &Timeouts) -> TimeoutsNs {
        TimeoutsNs {
            heartbeat_ns: t.heartbeat_ms * 1_000_000,
            plan_ns: t.plan_ms * 1_000_000,
            handshake: Duration::from_millis(t.handshake_ms),
            write_stall: Duration::from_millis(t.write_stall_ms),
        }
    }
}

/// Everything one shard owns.
struct Shard {
    id: u32,
    epoch: Instant,
    catalog: Arc<Catalog>,
    knobs_d_resp_ns: u64,
    limits: Limits,
    timeouts: TimeoutsNs,
    scheduler: RefCell<Deferred<SharedGpus>>,
    output: RefCell<Output>,
    pending: RefCell<PendingTable>,
    /// Client connections (front door).
    clients: RefCell<Slots>,
    /// Connections on the executor link port.
    link_conns: RefCell<Slots>,
    /// Requests this shard routed to other shards and has no reply for yet.
    awaiting_remote: Cell<usize>,
    /// Input bytes of the requests this shard's connections are owed replies for.
    owed_bytes: Cell<usize>,
    /// Per destination shard: requests and replies to send in the next batch.
    outbox_requests: RefCell<Vec<Vec<Routed>>>,
    outbox_replies: RefCell<Vec<Vec<RoutedReply>>>,
    mesh: Rc<Mesh>,
    wake: LocalSender<()>,
    stop: Arc<AtomicBool>,
    /// Shards done answering their own requests at shutdown.
    drained: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    /// Table slots `0..embedded_gpus` run on embedded simulated executors; the rest belong
    /// to external executors.
    embedded_gpus: u32,
    executors: Arc<Executors>,
    /// Every shard's executor link address, by shard (set once all shards listen).
    link_addrs: Arc<std::sync::OnceLock<Vec<String>>>,
    /// This shard's links, by executor id.
    links: RefCell<HashMap<u32, Rc<Link>>>,
    /// The plan message being encoded (its request list keeps its capacity).
    plan_msg: RefCell<wire::executor::PlanMsg>,
    /// Spare request-id lists of finished plans (no allocation per plan in steady state).
    id_lists: RefCell<Vec<Vec<u64>>>,
    /// The ring for zero-copy link sends (`None`: none could be set up, or no links).
    zero_copy: Option<zerocopy::ZeroCopy>,
    /// Whether the kernel refused a zero-copy send yet (said once).
    zero_copy_refused: Cell<bool>,
}

impl std::fmt::Debug for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shard").field("id", &self.id).finish_non_exhaustive()
    }
}

impl Shard {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// One line on stderr, naming the shard. Strings from peers reach it only through
    /// [`crate::executors::for_log`].
    fn log(&self, line: &str) {
        eprintln!("symphony serve: shard {}: {line}", self.id);
    }

    fn write_stall_timeout(&self) -> Duration {
        self.timeouts.write_stall
    }

    /// A request for a model this shard owns enters its scheduler, unless the shard holds its
    /// limit of requests or the model is swamped (saturated GPUs, and twice what its share of
    /// them can serve within its SLO queued already): then it is answered `overloaded` at
    /// once rather than queued to be dropped later.
    fn admit(self: &Rc<Self>, routed: Routed) {
        let now_ns = self.now_ns();
        let local = self.catalog.models[routed.model as usize].local;
        if self.scheduler.borrow().is_swamped(local) {
            self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
            self.reply(routed.origin, Status::Overloaded, self.timings(routed.origin, None));
            return;
        }
        let inserted = self
            .pending
            .borrow_mut()
            .insert(routed.origin, local, routed.deadline_ns, routed.input);
        let Some(key) = inserted else {
            self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
            self.reply(routed.origin, Status::Overloaded, self.timings(routed.origin, None));
            return;
        };
        let request = Request {
            id: key.id(),
            model: local,
            arrival_ns: now_ns,
            deadline_ns: routed.deadline_ns,
        };
        {
            let mut scheduler = self.scheduler.borrow_mut();
            let mut output = self.output.borrow_mut();
            scheduler.on_arrival(now_ns, request, &mut output);
        }
        self.drain_output();
    }

    /// Acts on the scheduler's decisions: drops are answered, plans go to the executors.
    fn drain_output(self: &Rc<Self>) {
        let mut output = self.output.borrow_mut();
        for request in &output.drops {
            if let Some(pending) = self.pending.borrow_mut().remove(RequestKey::of_id(request.id)) {
                self.reply(pending.origin, Status::Dropped, self.timings(pending.origin, None));
            }
        }
        let mut lost = Vec::new();
        let mut overflowed = Vec::new();
        for plan in &output.plans {
            self.stats.plans.fetch_add(1, Ordering::Relaxed);
            if plan.gpu >= self.embedded_gpus {
                match self.send_plan(plan, output.plan_requests(plan)) {
                    links::PlanSent::Sent => {}
                    links::PlanSent::NoLink => lost.extend(output.plan_requests(plan).iter().map(|r| r.id)),
                    links::PlanSent::Overflow(executor) => {
                        lost.extend(output.plan_requests(plan).iter().map(|r| r.id));
                        overflowed.push(executor);
                    }
                }
                continue;
            }
            let ids: Vec<u64> = output.plan_requests(plan).iter().map(|r| r.id).collect();
            let shard = Rc::clone(self);
            let plan = *plan;
            glommio::spawn_local(async move {
                shard.run_embedded(plan, ids).await;
            })
            .detach();
        }
        output.clear();
        drop(output);
        for executor in overflowed {
            self.executor_lost(
                executor,
                true,
                "its link's write queue is full: it does not take its plans",
            );
        }
        if !lost.is_empty() {
            // Planned on a GPU whose executor is gone (its slot went offline meanwhile).
            for id in lost {
                self.replan_or_lose(RequestKey::of_id(id));
            }
            return self.drain_output();
        }
        self.exchange_gpus();
        self.flush_outbox();
        // The scheduler's next timer may have moved earlier: wake its loop (one token).
        let _ = self.wake.try_send(());
    }

    /// An embedded simulated executor: the batch starts at `exec_at` and runs for its
    /// profile's time, then its requests are answered.
    async fn run_embedded(self: Rc<Self>, plan: symphony_core::policy::Plan, ids: Vec<u64>) {
        sleep_until(self.epoch, plan.exec_at_ns).await;
        let started_ns = self.now_ns();
        sleep_until(self.epoch, started_ns + (plan.finish_ns - plan.exec_at_ns)).await;
        let finished_ns = self.now_ns();
        for id in ids {
            if let Some(pending) = self.pending.borrow_mut().remove(RequestKey::of_id(id)) {
                let timings = self.timings(pending.origin, Some((started_ns, finished_ns)));
                self.reply(pending.origin, Status::Ok, timings);
            }
        }
        let completion = Completion {
            plan_id: plan.plan_id,
            gpu: plan.gpu,
            model: plan.model,
            batch_size: plan.batch_size,
            started_ns,
            finished_ns,
        };
        self.completed(finished_ns, &completion);
        self.drain_output();
    }

    /// Tells the scheduler a plan finished (the caller drains its output).
    fn completed(&self, now_ns: u64, completion: &Completion) {
        let mut scheduler = self.scheduler.borrow_mut();
        let mut output = self.output.borrow_mut();
        scheduler.on_completion(now_ns, completion, &mut output);
    }

    fn timings(&self, origin: Origin, ran: Option<(u64, u64)>) -> Timings {
        let us = |ns: u64| (ns / 1000).min(u64::from(u32::MAX)) as u32;
        let now_ns = self.now_ns();
        let (queued_us, exec_us) = match ran {
            Some((started_ns, finished_ns)) => (
                us(started_ns.saturating_sub(origin.received_ns)),
                us(finished_ns.saturating_sub(started_ns)),
            ),
            None => (0, 0),
        };
        Timings {
            queued_us,
            exec_us,
            total_us: us(now_ns.saturating_sub(origin.received_ns)),
        }
    }

    /// Sends a reply toward its connection: written here, or batched for its shard.
    fn reply(&self, origin: Origin, status: Status, timings: Timings) {
        if origin.shard == self.id {
            self.write_reply(origin, status, timings, &[]);
        } else {
            self.outbox_replies.borrow_mut()[origin.shard as usize].push(RoutedReply {
                origin,
                status,
                timings,
                output: None,
            });
        }
    }

    /// An OK reply with `output`, bytes of `buffer` (a link's receive buffer): copied into
    /// the reply frame here, or held for the connection's shard.
    fn reply_output(&self, origin: Origin, timings: Timings, output: &[u8], buffer: &ReadBuffer) {
        if origin.shard == self.id {
            self.write_reply(origin, Status::Ok, timings, output);
        } else {
            self.outbox_replies.borrow_mut()[origin.shard as usize].push(RoutedReply {
                origin,
                status: Status::Ok,
                timings,
                output: (!output.is_empty()).then(|| buffer.hold(output)),
            });
        }
    }

    /// The one reply to a request of one of this shard's connections.
    fn write_reply(&self, origin: Origin, status: Status, timings: Timings, output: &[u8]) {
        // A closed connection's replies have nowhere to go (its slot may serve another by
        // now: the key's generation tells).
        let Some(connection) = self.clients.borrow().get(origin.connection) else {
            return;
        };
        let owed = connection.owed.get().saturating_sub(1);
        connection.owed.set(owed);
        let input_len = origin.input_len as usize;
        connection
            .owed_bytes
            .set(connection.owed_bytes.get().saturating_sub(input_len));
        self.owed_bytes.set(self.owed_bytes.get().saturating_sub(input_len));
        // A half-closed connection waits for its last reply, a full one for room.
        connection.wake_waiting_reader();
        if connection.is_dead() {
            return;
        }
        let reply = ReplyRef {
            client_request_id: origin.client_request_id,
            status,
            timings,
            output,
        };
        let mut out = connection.out.borrow_mut();
        if wire::encode_reply(&mut out, &reply).is_err() {
            // Only an output over the frame cap fails to encode: the request still gets its
            // one reply.
            let failed = ReplyRef {
                status: Status::ExecutionFailed,
                output: &[],
                ..reply
            };
            let _ = wire::encode_reply(&mut out, &failed);
        }
        drop(out);
        connection.wake_writer();
    }

    /// Cross-shard GPU waiting: posts the scheduler's most urgent waiting candidate, declines
    /// reservations it no longer wants, and tells the shards that releases handed GPUs to.
    fn exchange_gpus(self: &Rc<Self>) {
        let handoffs: Vec<u16> = {
            let mut scheduler = self.scheduler.borrow_mut();
            let waiting = scheduler.waiting_invalid_after_ns();
            let gpus = scheduler.gpus_mut();
            gpus.post(waiting);
            gpus.decline_unwanted();
            gpus.drain_handoffs().collect()
        };
        for shard in handoffs {
            self.stats.handoffs.fetch_add(1, Ordering::Relaxed);
            if u32::from(shard) == self.id {
                self.scheduler.borrow_mut().gpus_mut().note_handoff();
                let _ = self.wake.try_send(());
                continue;
            }
            self.mesh.send(shard as usize, ShardMsg::HandOff);
        }
    }

    /// Sends every batched cross-shard message, in order behind what is queued already.
    fn flush_outbox(self: &Rc<Self>) {
        let shard_count = self.outbox_requests.borrow().len();
        for dest in 0..shard_count {
            let requests = std::mem::take(&mut self.outbox_requests.borrow_mut()[dest]);
            let replies = std::mem::take(&mut self.outbox_replies.borrow_mut()[dest]);
            if !requests.is_empty() {
                self.mesh.send(dest, ShardMsg::Requests(requests));
            }
            if !replies.is_empty() {
                self.mesh.send(dest, ShardMsg::Replies(replies));
            }
        }
    }

    fn handle_msg(self: &Rc<Self>, msg: ShardMsg) {
        match msg {
            ShardMsg::Requests(requests) => {
                for routed in requests {
                    self.admit(routed);
                }
            }
            ShardMsg::Replies(replies) => {
                assert!(self.awaiting_remote.get() >= replies.len(), "a reply nobody waits for");
                self.awaiting_remote.set(self.awaiting_remote.get() - replies.len());
                for r in replies {
                    let output = r.output.as_ref().map_or(&[][..], Slice::bytes);
                    self.write_reply(r.origin, r.status, r.timings, output);
                }
            }
            ShardMsg::Disconnected { shard, connection } => self.cancel_connection(shard, connection),
            ShardMsg::HandOff => {
                self.scheduler.borrow_mut().gpus_mut().note_handoff();
                self.on_timer();
            }
            ShardMsg::ExecutorLost(executor) => self.executor_lost(executor, false, "another shard lost it"),
        }
        self.flush_outbox();
    }

    /// A client went away: its requests still queued here leave the scheduler before they
    /// use a GPU (those already planned run; their replies are discarded).
    fn cancel_connection(self: &Rc<Self>, shard: u32, connection: ConnectionKey) {
        let held = self.pending.borrow().of_connection(shard, connection);
        if held.is_empty() {
            return;
        }
        let now_ns = self.now_ns();
        // One pass over each model's queue (a client may go with thousands of requests).
        let mut models: Vec<u32> = held.iter().map(|&(_, model)| model).collect();
        models.sort_unstable();
        models.dedup();
        let ids: std::collections::HashSet<u64> = held.iter().map(|(key, _)| key.id()).collect();
        for model in models {
            let cancelled = {
                let mut scheduler = self.scheduler.borrow_mut();
                let mut output = self.output.borrow_mut();
                scheduler.cancel_all(now_ns, model, |id| ids.contains(&id), &mut output)
            };
            for id in cancelled {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                if let Some(pending) = self.pending.borrow_mut().remove(RequestKey::of_id(id)) {
                    if shard != self.id {
                        // No reply will come: the origin shard stops waiting for one (its
                        // connection is gone, so nothing is written).
                        self.outbox_replies.borrow_mut()[shard as usize].push(RoutedReply {
                            origin: pending.origin,
                            status: Status::ShuttingDown,
                            timings: Timings::default(),
                            output: None,
                        });
                    }
                }
            }
        }
        self.drain_output();
    }

    /// A connection of this shard closed: the shards it sent requests to (this one
    /// included) drop those still queued. One that is owed nothing costs no message.
    fn disconnected(self: &Rc<Self>, connection: &Connection, key: ConnectionKey) {
        if connection.owed.get() == 0 {
            return;
        }
        let routed = connection.routed.get();
        self.cancel_connection(self.id, key);
        for dest in 0..self.mesh.shard_count() {
            if dest == self.id as usize || routed & (1 << (dest % 64)) == 0 {
                continue;
            }
            self.mesh.send(
                dest,
                ShardMsg::Disconnected {
                    shard: self.id,
                    connection: key,
                },
            );
        }
    }

    /// LIST_MODELS: every model, in id order.
    fn on_list_models(&self, connection: &Connection, payload: &[u8]) -> Result<(), (ErrorCode, String)> {
        let ask = wire::access_list_models(payload).map_err(|e| (ErrorCode::Malformed, e.to_string()))?;
        let answer = self.catalog.models_answer(ask.client_request_id.to_native());
        wire::encode_models(&mut connection.out.borrow_mut(), &answer).map_err(|e| {
            (
                ErrorCode::Malformed,
                format!("the model list does not fit a frame: {e}"),
            )
        })?;
        connection.wake_writer();
        Ok(())
    }

    /// One request frame from a client: validated, looked up, routed. Every request that
    /// decodes gets exactly one reply on its connection.
    fn on_request(self: &Rc<Self>, connection: &Connection, key: ConnectionKey, payload: &[u8], buffer: &ReadBuffer) {
        let request = match wire::access_request(payload) {
            Ok(request) => request,
            Err(e) => {
                // Which request it was is unknown: an ERROR frame, and the close.
                connection.fail(ErrorCode::Malformed, &e.to_string());
                return;
            }
        };
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let input_len = request.input.len() as u32;
        connection.owed.set(connection.owed.get() + 1);
        connection
            .owed_bytes
            .set(connection.owed_bytes.get() + input_len as usize);
        self.owed_bytes.set(self.owed_bytes.get() + input_len as usize);
        let received_ns = self.now_ns();
        let origin = Origin {
            shard: self.id,
            connection: key,
            client_request_id: request.client_request_id.to_native(),
            received_ns,
            input_len,
        };
        if wire::check_request(request).is_err() {
            self.write_reply(origin, Status::Malformed, self.timings(origin, None), &[]);
            return;
        }
        let Some(model) = self.catalog.lookup(&request.model) else {
            self.write_reply(origin, Status::UnknownModel, self.timings(origin, None), &[]);
            return;
        };
        let entry = &self.catalog.models[model as usize];
        if entry
            .input_bytes
            .is_some_and(|bytes| bytes as usize != request.input.len())
        {
            self.write_reply(origin, Status::Malformed, self.timings(origin, None), &[]);
            return;
        }
        let slo_ns = match request.slo_us_tighter() {
            Some(slo_us) => entry.slo_ns.min(u64::from(slo_us) * 1000),
            None => entry.slo_ns,
        };
        // Inputs matter only to external executors: otherwise they are not held.
        let input = (self.executors.accepts_executors() && !request.input.is_empty())
            .then(|| buffer.hold(request.input.as_slice()));
        let routed = Routed {
            origin,
            model,
            deadline_ns: (received_ns + slo_ns).saturating_sub(self.knobs_d_resp_ns),
            input,
        };
        if self.stop.load(Ordering::Relaxed) {
            self.write_reply(origin, Status::ShuttingDown, self.timings(origin, None), &[]);
        } else if entry.owner == self.id as usize {
            self.admit(routed);
        } else {
            connection.routed.set(connection.routed.get() | 1 << (entry.owner % 64));
            self.awaiting_remote.set(self.awaiting_remote.get() + 1);
            let mut outbox = self.outbox_requests.borrow_mut();
            let batch = &mut outbox[entry.owner];
            batch.push(routed);
            if batch.len() >= self.limits.routed_batch {
                drop(outbox);
                self.flush_outbox();
            }
        }
    }

    fn on_timer(self: &Rc<Self>) {
        let now_ns = self.now_ns();
        {
            let mut scheduler = self.scheduler.borrow_mut();
            let mut output = self.output.borrow_mut();
            scheduler.on_timer(now_ns, &mut output);
        }
        self.drain_output();
    }
}

async fn sleep_until(epoch: Instant, at_ns: u64) {
    let now_ns = epoch.elapsed().as_nanos() as u64;
    if at_ns > now_ns {
        glommio::timer::sleep(Duration::from_nanos(at_ns - now_ns)).await;
    }
}

/// The scheduler's timers: sleeps until the next one, or until new work wakes it.
async fn timer_loop(shard: Rc<Shard>, wake: LocalReceiver<()>) {
    while !shard.stop.load(Ordering::Relaxed) {
        let next_ns = shard.scheduler.borrow_mut().next_timer_ns();
        let now_ns = shard.now_ns();
        match next_ns {
            Some(at_ns) if at_ns <= now_ns => shard.on_timer(),
            Some(at_ns) => {
                let wait = Duration::from_nanos(at_ns - now_ns).min(STOP_POLL);
                futures_lite::future::or(glommio::timer::sleep(wait), async {
                    let _ = wake.recv().await;
                })
                .await;
            }
            None => {
                futures_lite::future::or(glommio::timer::sleep(STOP_POLL), async {
                    let _ = wake.recv().await;
                })
                .await;
            }
        }
    }
}

/// Counters of the whole service (all shards), for tests and operators.
#[derive(Debug, Default)]
pub struct Stats {
    /// Request frames accepted from clients.
    pub requests: std::sync::atomic::AtomicU64,
    /// Queued requests removed because their client went away.
    pub cancelled: std::sync::atomic::AtomicU64,
    /// Requests answered `overloaded` (a shard's request table was full).
    pub overloaded: std::sync::atomic::AtomicU64,
    /// Batches planned (embedded and external executors).
    pub plans: std::sync::atomic::AtomicU64,
    /// GPUs a release reserved for another shard's waiting candidate (cross-shard EDF).
    pub handoffs: std::sync::atomic::AtomicU64,
    /// Plans sent to external executors.
    pub executor_plans: std::sync::atomic::AtomicU64,
    /// External executors lost (closed links, missed heartbeats, broken protocol).
    pub executors_lost: std::sync::atomic::AtomicU64,
    /// Requests of a lost executor's plans planned again.
    pub replanned: std::sync::atomic::AtomicU64,
    /// Plans an executor did not report within the plan timeout.
    pub plans_timed_out: std::sync::atomic::AtomicU64,
    /// Link writes sent zero-copy (io_uring SENDMSG_ZC), and their bytes.
    pub zero_copy_sends: std::sync::atomic::AtomicU64,
    pub zero_copy_bytes: std::sync::atomic::AtomicU64,
    /// Link writes that had to be copied instead (no ring, or the kernel refused).
    pub zero_copy_fallbacks: std::sync::atomic::AtomicU64,
    /// Connections refused at a port's limit (an ERROR `OVERLOADED`, then the close).
    pub connections_refused: std::sync::atomic::AtomicU64,
    /// Failed accepts (descriptors or memory exhausted), each followed by a back-off.
    pub accept_errors: std::sync::atomic::AtomicU64,
    /// Times a client connection was not read because of its limits or the mesh's backlog.
    pub backpressure_waits: std::sync::atomic::AtomicU64,
    /// Link connections closed for not joining within the handshake timeout.
    pub handshake_timeouts: std::sync::atomic::AtomicU64,
}

/// What a running service gives its caller.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    executors: Arc<Executors>,
    link_addrs: Arc<std::sync::OnceLock<Vec<String>>>,
    stats: Arc<Stats>,
    shard_count: usize,
    memory: ShardMemory,
    limits: Limits,
    nofile: runtime::FdBudget,
    stop: Arc<AtomicBool>,
    joins: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl ServerHandle {
    /// The address every shard listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// External executors with every link joined and not lost.
    pub fn executors_online(&self) -> usize {
        self.executors.online_count()
    }

    /// Each shard's executor link address (empty without an executor token).
    pub fn executor_link_addrs(&self) -> Vec<String> {
        self.link_addrs.get().cloned().unwrap_or_default()
    }

    pub fn memory(&self) -> ShardMemory {
        self.memory
    }

    /// The limits the shards run with (connection caps lowered to the descriptor limit).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The descriptor limit and what it allowed.
    pub fn fd_budget(&self) -> runtime::FdBudget {
        self.nofile
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// A flag that stops the service when set (for a signal handler).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Stops accepting and ends every shard.
    pub fn stop(self) -> Result<(), ServeError> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }

    /// Waits until the service stops (its stop flag is set).
    pub fn wait(self) -> Result<(), ServeError> {
        for (shard, join) in self.joins.into_iter().enumerate() {
            join.join().map_err(|e| RuntimeError::Join {
                shard,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// Starts the service: `shards` pinned executors (default: the CPUs this process may run
/// on). Raises the soft descriptor limit to the hard one and lowers the connection caps to
/// what it allows.
pub fn start(config: &ServeConfig) -> Result<ServerHandle, ServeError> {
    let available = runtime::allowed_cpus().len().max(1);
    let shard_count = config.shards.unwrap_or(available).max(1);
    let memory = runtime::shard_memory(shard_count, runtime::memlock_limit_bytes())?;
    let cpus = runtime::shard_cpus(shard_count, config.cpus.as_deref())?;
    let accepts_executors = config.executor_token.is_some() && config.executor_gpus > 0;
    let nofile = runtime::fd_budget(shard_count, &config.limits, accepts_executors)?;
    let mut limits = config.limits;
    limits.connections_per_shard = nofile.connections_per_shard;
    limits.links_per_shard = nofile.links_per_shard;
    let catalog = Arc::new(Catalog::new(&config.models, &config.input_bytes, shard_count));
    let table = Arc::new(GpuTable::with_offline(
        config.gpus as usize,
        config.executor_gpus as usize,
        shard_count,
    ));
    let executors = Arc::new(Executors::new(
        config.executor_token.clone(),
        Arc::clone(&table),
        config.gpus,
        config.executor_gpus,
        shard_count,
    ));
    let link_addrs = Arc::new(std::sync::OnceLock::new());
    let mut shard_link_addrs = Vec::with_capacity(shard_count);
    let mesh = MeshBuilder::<ShardMsg, Full>::full(shard_count, config.limits.mesh_channel);
    let stop = Arc::new(AtomicBool::new(false));
    let drained = Arc::new(AtomicUsize::new(0));
    let stats = Arc::new(Stats::default());
    let epoch = Instant::now();
    let mut joins = Vec::with_capacity(shard_count);
    let mut listen = config.listen.clone();
    let mut local_addr = None;
    for (shard, &cpu) in cpus.iter().enumerate() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(SocketAddr, Option<SocketAddr>), ServeError>>();
        let setup = ShardSetup {
            id: shard as u32,
            listen: listen.clone(),
            catalog: Arc::clone(&catalog),
            models: config.models.clone(),
            policy: Config::of(config.policy, &config.knobs),
            knobs: config.knobs.clone(),
            limits,
            timeouts: TimeoutsNs::of(&config.timeouts),
            table: Arc::clone(&table),
            mesh: mesh.clone(),
            stop: Arc::clone(&stop),
            drained: Arc::clone(&drained),
            stats: Arc::clone(&stats),
            epoch,
            embedded_gpus: config.gpus,
            executors: Arc::clone(&executors),
            link_addrs: Arc::clone(&link_addrs),
            zero_copy: config.zero_copy,
        };
        let join = runtime::spawn_shard(shard, cpu, memory, move || run_shard(setup, ready_tx))?;
        joins.push(join);
        match ready_rx.recv() {
            Ok(Ok((addr, link_addr))) => {
                // Shard 0 may have been given port 0: the others bind the port it got.
                listen = addr.to_string();
                local_addr.get_or_insert(addr);
                shard_link_addrs.extend(link_addr.map(|a| a.to_string()));
            }
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                return Err(ServeError::Startup(format!("shard {shard} exited during start-up")));
            }
        }
    }
    let _ = link_addrs.set(shard_link_addrs);
    Ok(ServerHandle {
        local_addr: local_addr.expect("at least one shard"),
        executors,
        link_addrs,
        stats,
        shard_count,
        memory,
        limits,
        nofile,
        stop,
        joins,
    })
}

struct ShardSetup {
    id: u32,
    listen: String,
    catalog: Arc<Catalog>,
    models: Vec<ModelConfig>,
    policy: Config,
    knobs: symphony_core::policy::Knobs,
    limits: Limits,
    timeouts: TimeoutsNs,
    table: Arc<GpuTable>,
    mesh: MeshBuilder<ShardMsg, Full>,
    stop: Arc<AtomicBool>,
    drained: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    epoch: Instant,
    embedded_gpus: u32,
    executors: Arc<Executors>,
    link_addrs: Arc<std::sync::OnceLock<Vec<String>>>,
    zero_copy: bool,
}

type Ready = std::sync::mpsc::Sender<Result<(SocketAddr, Option<SocketAddr>), ServeError>>;

async fn run_shard(setup: ShardSetup, ready: Ready) {
    let listener = match TcpListener::bind(setup.listen.as_str()) {
        Ok(listener) => listener,
        Err(e) => {
            let _ = ready.send(Err(ServeError::Listen {
                addr: setup.listen.clone(),
                reason: e.to_string(),
            }));
            return;
        }
    };
    let addr = listener.local_addr().expect("a bound listener has an address");
    // Executor links: a port of this shard's own, on the front door's host.
    let link_listener = if setup.executors.accepts_executors() {
        let link_listen = SocketAddr::new(addr.ip(), 0);
        match TcpListener::bind(link_listen) {
            Ok(listener) => Some(listener),
            Err(e) => {
                let _ = ready.send(Err(ServeError::Listen {
                    addr: link_listen.to_string(),
                    reason: e.to_string(),
                }));
                return;
            }
        }
    } else {
        None
    };
    let link_addr = link_listener
        .as_ref()
        .map(|l| l.local_addr().expect("a bound listener has an address"));
    let _ = ready.send(Ok((addr, link_addr)));
    let (senders, mut receivers) = match setup.mesh.join().await {
        Ok(joined) => joined,
        Err(_) => return,
    };
    let shard_count = senders.nr_consumers();
    let owned: Vec<ModelConfig> = setup.catalog.owned[setup.id as usize]
        .iter()
        .map(|&global| setup.models[global as usize].clone())
        .collect();
    // A shard that owns no model still serves as a front door; its scheduler is idle.
    let scheduler_models = if owned.is_empty() {
        vec![setup.models[0].clone()]
    } else {
        owned
    };
    let scheduler = Deferred::with_source(
        setup.policy,
        &scheduler_models,
        SharedGpus::new(setup.table, setup.id as u16),
        &setup.knobs,
    );
    let (wake, wake_rx) = local_channel::new_bounded(1);
    // Only links send zero-copy: no ring without executors.
    let zero_copy = match (link_listener.is_some() && setup.zero_copy).then(zerocopy::ZeroCopy::new) {
        Some(Ok(ring)) => Some(ring),
        Some(Err(error)) => {
            eprintln!(
                "symphony serve: shard {}: no zero-copy sends ({error}); plan inputs are copied",
                setup.id
            );
            None
        }
        None => None,
    };
    let shard = Rc::new(Shard {
        id: setup.id,
        epoch: setup.epoch,
        catalog: setup.catalog,
        knobs_d_resp_ns: setup.knobs.d_resp_ns,
        limits: setup.limits,
        timeouts: setup.timeouts,
        scheduler: RefCell::new(scheduler),
        output: RefCell::new(Output::new()),
        pending: RefCell::new(PendingTable::new(setup.limits.requests_per_shard)),
        clients: RefCell::new(Slots::new(setup.limits.connections_per_shard)),
        link_conns: RefCell::new(Slots::new(setup.limits.links_per_shard)),
        awaiting_remote: Cell::new(0),
        owed_bytes: Cell::new(0),
        outbox_requests: RefCell::new(vec![Vec::new(); shard_count]),
        outbox_replies: RefCell::new(vec![Vec::new(); shard_count]),
        mesh: Rc::new(Mesh::new(senders)),
        wake,
        stop: setup.stop,
        drained: setup.drained,
        stats: setup.stats,
        embedded_gpus: setup.embedded_gpus,
        executors: setup.executors,
        link_addrs: setup.link_addrs,
        links: RefCell::new(HashMap::new()),
        plan_msg: RefCell::new(wire::executor::PlanMsg::default()),
        id_lists: RefCell::new(Vec::new()),
        zero_copy,
        zero_copy_refused: Cell::new(false),
    });
    for (_, receiver) in receivers.streams() {
        let shard = Rc::clone(&shard);
        glommio::spawn_local(async move {
            while let Some(msg) = receiver.recv().await {
                shard.handle_msg(msg);
            }
        })
        .detach();
    }
    glommio::spawn_local(timer_loop(Rc::clone(&shard), wake_rx)).detach();
    if let Some(listener) = link_listener {
        glommio::spawn_local(links::accept_links(Rc::clone(&shard), listener)).detach();
    }
    connection::accept_clients(Rc::clone(&shard), listener).await;
    drain(&shard, shard_count).await;
}

/// After stop: no new connections, new requests are answered "shutting down"; planned batches
/// finish and are answered; what is still queued when the grace period ends is answered
/// "shutting down". A shard then waits until every shard has answered its own requests and
/// the answers to the requests it routed have arrived (they may still be on the mesh), and
/// gives its writers a moment to flush.
async fn drain(shard: &Rc<Shard>, shard_count: usize) {
    let grace_ns = shard.catalog.models.iter().map(|m| m.slo_ns).max().unwrap_or(0) + 1_000_000_000;
    let started_ns = shard.now_ns();
    loop {
        if shard.pending.borrow().held() == 0 {
            break;
        }
        if shard.now_ns() - started_ns > grace_ns {
            // The scheduler's timers stopped with the stop flag: answer what is left.
            let left = shard.pending.borrow_mut().drain();
            for origin in left {
                shard.reply(origin, Status::ShuttingDown, shard.timings(origin, None));
            }
            shard.flush_outbox();
            break;
        }
        if shard
            .scheduler
            .borrow_mut()
            .next_timer_ns()
            .is_some_and(|t| t <= shard.now_ns())
        {
            shard.on_timer();
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    shard.drained.fetch_add(1, Ordering::AcqRel);
    // Every shard answers within its grace period: wait that long and a little more.
    let linger_until_ns = started_ns + grace_ns + SHUTDOWN_LINGER.as_nanos() as u64;
    while (shard.drained.load(Ordering::Acquire) < shard_count || shard.awaiting_remote.get() > 0)
        && shard.now_ns() < linger_until_ns
    {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    // The writers flush what is queued (bounded: a client that does not read is not waited
    // for past the linger).
    let flush_until = Instant::now() + SHUTDOWN_LINGER;
    while shard.clients.borrow().queued_bytes() > 0 && Instant::now() < flush_until {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    glommio::timer::sleep(STOP_POLL).await;
}
