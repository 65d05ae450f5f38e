//! The scheduler service: one glommio shard per core, each a front door and the owner of
//! some models, all planning on one shared GPU table.
//!
//! The path of a request (ARCHITECTURE.md): a client connection on any shard sends REQUEST
//! frames (`core::wire`, many per read); the shard validates each, looks the model up and
//! routes it to the model's owning shard (itself, or over the channel mesh in batches: a full
//! channel is backpressure). The owner runs the core's deferred scheduler for its models with
//! real time (glommio timers), claiming GPUs in the shared [`GpuTable`]. Each plan runs on an
//! embedded simulated executor (a task that waits until `exec_at`, then for the profile's time);
//! its requests are answered OK, dropped requests at once, and every reply goes back to the
//! connection's shard, which writes many reply frames per write.
//!
//! External executors (`links`): each shard links to every executor, sends its plans with the
//! inputs as slices of the clients' receive buffers (zero-copy for 16 KiB and more:
//! `zerocopy`), and re-plans or answers the requests of an executor lost. Cross-shard
//! waiting: each shard posts its most urgent waiting candidate to the GPU table; a release
//! reserves the freed GPU for the earliest `invalid_after` across shards and tells that shard.
//! Not built: placing executor links near their GPUs (every shard has a link to each).
//! Built: a client that disconnects has its queued requests removed from every shard's
//! scheduler before they use a GPU; SIGINT/SIGTERM stop accepting, let planned batches finish
//! and answer the rest.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::channel_mesh::{Full, MeshBuilder, Senders};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};
use symphony_core::policy::deferred::{Config, Deferred};
use symphony_core::policy::{Completion, ModelConfig, Output, Policy};
use symphony_core::request::Request;
use symphony_core::wire::{self, ErrorCode, FrameDecoder, Kind, ReplyRef, Status, Timings};

use crate::config::{Limits, ServeConfig};
use crate::executors::Executors;
use crate::runtime::{self, RuntimeError, ShardMemory};
use crate::shared_gpus::SharedGpus;
use crate::sync::gpu_table::GpuTable;

/// Bytes a connection reads at once (frames beyond it wait for the next read).
const READ_BUFFER_BYTES: usize = 256 << 10;
/// How often idle loops look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);

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
mod links;
mod zerocopy;

use buffers::{ReadBuffer, Slice};
use links::Link;

/// One model as every shard knows it.
#[derive(Debug)]
struct CatalogEntry {
    slo_ns: u64,
    owner: usize,
    /// Index in the owner's scheduler.
    local: u32,
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
    fn new(models: &[ModelConfig], shards: usize) -> Catalog {
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
}

/// Where a reply goes: a connection on a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Origin {
    shard: u32,
    /// Slot and generation of the connection on its shard (a reused slot never gets an
    /// older connection's replies).
    connection: u64,
    client_request_id: u64,
    received_ns: u64,
}

/// A request on its way to the owner of its model.
#[derive(Debug, Clone)]
struct Routed {
    origin: Origin,
    model: u32,
    deadline_ns: u64,
    /// Its input bytes, in the client connection's receive buffer (kept only when external
    /// executors may run it).
    input: Option<Slice>,
}

/// A reply on its way back to the connection's shard.
#[derive(Debug, Clone)]
struct RoutedReply {
    origin: Origin,
    status: Status,
    timings: Timings,
    /// The output, in an executor link's receive buffer.
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
        connection: u64,
    },
    /// A release reserved a GPU for the receiver's waiting candidate.
    HandOff,
    /// An executor is gone: drop the link to it, re-plan or answer its plans' requests.
    ExecutorLost(u32),
}

/// A request the owner holds until it is answered.
#[derive(Debug, Clone)]
struct Pending {
    origin: Origin,
    /// The model's index in this shard's scheduler.
    model: u32,
    deadline_ns: u64,
    input: Option<Slice>,
    /// Bumped when the slot is reused, so a stale id never answers a newer request.
    generation: u32,
}

/// Requests a shard holds, keyed by slot and generation (the scheduler's request id).
#[derive(Debug)]
struct PendingTable {
    slots: Vec<Option<Pending>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    limit: usize,
}

impl PendingTable {
    fn new(limit: usize) -> PendingTable {
        PendingTable {
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            limit,
        }
    }

    fn insert(&mut self, origin: Origin, model: u32, deadline_ns: u64, input: Option<Slice>) -> Option<u64> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.slots.len() < self.limit => {
                self.slots.push(None);
                self.generations.push(0);
                self.slots.len() as u32 - 1
            }
            None => return None,
        };
        let generation = self.generations[slot as usize];
        self.slots[slot as usize] = Some(Pending {
            origin,
            model,
            deadline_ns,
            input,
            generation,
        });
        Some(u64::from(generation) << 32 | u64::from(slot))
    }

    /// The request with scheduler id `id`, if it is still held.
    fn get(&self, id: u64) -> Option<&Pending> {
        let slot = (id & u64::from(u32::MAX)) as usize;
        let generation = (id >> 32) as u32;
        self.slots
            .get(slot)?
            .as_ref()
            .filter(|pending| pending.generation == generation)
    }

    /// The held requests of one client connection: `(request id, model)`.
    fn of_connection(&self, shard: u32, connection: u64) -> Vec<(u64, u32)> {
        self.slots
            .iter()
            .enumerate()
            .filter_map(|(slot, pending)| {
                let p = pending.as_ref()?;
                (p.origin.shard == shard && p.origin.connection == connection)
                    .then_some((u64::from(p.generation) << 32 | slot as u64, p.model))
            })
            .collect()
    }

    fn held(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes every held request (shutdown).
    fn drain(&mut self) -> Vec<Origin> {
        let mut origins = Vec::new();
        for slot in 0..self.slots.len() {
            if let Some(pending) = self.slots[slot].take() {
                origins.push(pending.origin);
                self.generations[slot] = pending.generation.wrapping_add(1);
                self.free.push(slot as u32);
            }
        }
        origins
    }

    fn remove(&mut self, id: u64) -> Option<Origin> {
        let slot = (id & u64::from(u32::MAX)) as usize;
        let generation = (id >> 32) as u32;
        let pending = self.slots.get_mut(slot)?;
        if pending.as_ref().is_some_and(|p| p.generation == generation) {
            let origin = pending.take().map(|p| p.origin);
            self.generations[slot] = generation.wrapping_add(1);
            self.free.push(slot as u32);
            origin
        } else {
            None
        }
    }
}

/// A client connection's outgoing side.
#[derive(Debug)]
struct Connection {
    /// Reply frames waiting for the writer.
    out: RefCell<Vec<u8>>,
    /// Bytes that belong in `out` at the given offsets but stay where they were read: the
    /// inputs of plan frames sent zero-copy (executor links only).
    sections: RefCell<Vec<(usize, Slice)>>,
    /// Wakes the writer; holds at most one token.
    notify: LocalSender<()>,
    /// Set when the connection must close after what is queued has been written.
    closing: Cell<bool>,
}

/// Everything one shard owns.
struct Shard {
    id: u32,
    epoch: Instant,
    catalog: Arc<Catalog>,
    knobs_d_resp_ns: u64,
    limits: Limits,
    scheduler: RefCell<Deferred<SharedGpus>>,
    output: RefCell<Output>,
    pending: RefCell<PendingTable>,
    connections: RefCell<Vec<Option<Rc<Connection>>>>,
    /// Per connection slot: bumped when the slot is reused.
    connection_generations: RefCell<Vec<u32>>,
    open_connections: Cell<usize>,
    /// Requests this shard routed to other shards and has no reply for yet.
    awaiting_remote: Cell<usize>,
    /// Per destination shard: requests and replies to send in the next batch.
    outbox_requests: RefCell<Vec<Vec<Routed>>>,
    outbox_replies: RefCell<Vec<Vec<RoutedReply>>>,
    senders: Senders<ShardMsg>,
    wake: LocalSender<()>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    /// Table slots `0..embedded_gpus` run on embedded simulated executors; the rest belong
    /// to external executors.
    embedded_gpus: u32,
    executors: Arc<Executors>,
    /// Every shard's executor link address, by shard (set once all shards listen).
    link_addrs: Arc<std::sync::OnceLock<Vec<String>>>,
    /// This shard's links, by executor id.
    links: RefCell<HashMap<u32, Rc<Link>>>,
    heartbeat_timeout_ns: u64,
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

    /// A request for a model this shard owns enters its scheduler.
    fn admit(self: &Rc<Self>, routed: Routed) {
        let now_ns = self.now_ns();
        let local = self.catalog.models[routed.model as usize].local;
        let inserted = self
            .pending
            .borrow_mut()
            .insert(routed.origin, local, routed.deadline_ns, routed.input);
        let Some(id) = inserted else {
            self.reply(routed.origin, Status::Overloaded, self.timings(routed.origin, None));
            return;
        };
        let request = Request {
            id,
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
            if let Some(origin) = self.pending.borrow_mut().remove(request.id) {
                self.reply(origin, Status::Dropped, self.timings(origin, None));
            }
        }
        let mut lost = Vec::new();
        for plan in &output.plans {
            self.stats.plans.fetch_add(1, Ordering::Relaxed);
            if plan.gpu >= self.embedded_gpus {
                if !self.send_plan(plan, output.plan_requests(plan)) {
                    lost.extend(output.plan_requests(plan).iter().map(|r| r.id));
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
        if !lost.is_empty() {
            // Planned on a GPU whose executor is gone (its slot went offline meanwhile).
            for id in lost {
                self.replan_or_lose(id);
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
            if let Some(origin) = self.pending.borrow_mut().remove(id) {
                let timings = self.timings(origin, Some((started_ns, finished_ns)));
                self.reply(origin, Status::Ok, timings);
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

    /// An OK reply with `output`, a slice of `buffer` (a link's receive buffer): copied into
    /// the reply frame here, or passed by reference to the connection's shard.
    fn reply_output(&self, origin: Origin, timings: Timings, output: &[u8], buffer: &ReadBuffer) {
        if origin.shard == self.id {
            self.write_reply(origin, Status::Ok, timings, output);
        } else {
            self.outbox_replies.borrow_mut()[origin.shard as usize].push(RoutedReply {
                origin,
                status: Status::Ok,
                timings,
                output: (!output.is_empty()).then(|| buffer.slice_of(output)),
            });
        }
    }

    fn write_reply(&self, origin: Origin, status: Status, timings: Timings, output: &[u8]) {
        let slot = (origin.connection & u64::from(u32::MAX)) as usize;
        let generation = (origin.connection >> 32) as u32;
        if self.connection_generations.borrow().get(slot) != Some(&generation) {
            return; // That connection closed; its slot may serve another by now.
        }
        let connection = self.connections.borrow().get(slot).and_then(|c| c.clone());
        // A closed connection's replies have nowhere to go.
        let Some(connection) = connection else { return };
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
        let _ = connection.notify.try_send(());
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
            self.send_msg(shard as usize, ShardMsg::HandOff);
        }
    }

    /// Sends one message to shard `dest`; a full channel makes a task wait for room
    /// (backpressure, never loss). A closed one means the service is stopping.
    fn send_msg(self: &Rc<Self>, dest: usize, msg: ShardMsg) {
        if let Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(msg))) =
            self.senders.try_send_to(dest, msg)
        {
            let this = Rc::clone(self);
            glommio::spawn_local(async move {
                let _ = this.senders.send_to(dest, msg).await;
            })
            .detach();
        }
    }

    /// Sends every batched cross-shard message (a full channel makes the task wait: that is
    /// the backpressure).
    fn flush_outbox(self: &Rc<Self>) {
        let shard_count = self.outbox_requests.borrow().len();
        for dest in 0..shard_count {
            let requests = std::mem::take(&mut self.outbox_requests.borrow_mut()[dest]);
            let replies = std::mem::take(&mut self.outbox_replies.borrow_mut()[dest]);
            for msg in [
                (!requests.is_empty()).then_some(ShardMsg::Requests(requests)),
                (!replies.is_empty()).then_some(ShardMsg::Replies(replies)),
            ]
            .into_iter()
            .flatten()
            {
                self.send_msg(dest, msg);
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
                self.awaiting_remote
                    .set(self.awaiting_remote.get().saturating_sub(replies.len()));
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
    }

    /// A client went away: its requests still queued here leave the scheduler before they
    /// use a GPU (those already planned run; their replies are discarded).
    fn cancel_connection(self: &Rc<Self>, shard: u32, connection: u64) {
        let held = self.pending.borrow().of_connection(shard, connection);
        if held.is_empty() {
            return;
        }
        let now_ns = self.now_ns();
        for (id, model) in held {
            let cancelled = {
                let mut scheduler = self.scheduler.borrow_mut();
                let mut output = self.output.borrow_mut();
                scheduler.cancel(now_ns, model, id, &mut output)
            };
            if cancelled {
                self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                if let Some(origin) = self.pending.borrow_mut().remove(id) {
                    if shard != self.id {
                        // No reply will come: the origin shard stops waiting for one (its
                        // connection is gone, so nothing is written).
                        self.outbox_replies.borrow_mut()[shard as usize].push(RoutedReply {
                            origin,
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

    /// Tells every shard (this one included) that a connection of this shard closed.
    fn disconnected(self: &Rc<Self>, connection: u64) {
        self.cancel_connection(self.id, connection);
        for dest in 0..self.outbox_requests.borrow().len() {
            if dest == self.id as usize {
                continue;
            }
            let msg = ShardMsg::Disconnected {
                shard: self.id,
                connection,
            };
            self.send_msg(dest, msg);
        }
    }

    /// One request frame from a client: validated, looked up, routed.
    fn on_request(
        self: &Rc<Self>,
        connection: u64,
        payload: &[u8],
        buffer: &ReadBuffer,
    ) -> Result<(), (ErrorCode, String)> {
        let request = wire::access_request(payload).map_err(|e| (ErrorCode::Malformed, e.to_string()))?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let received_ns = self.now_ns();
        let origin = Origin {
            shard: self.id,
            connection,
            client_request_id: request.client_request_id.to_native(),
            received_ns,
        };
        if wire::check_request(request).is_err() {
            self.write_reply(origin, Status::Malformed, self.timings(origin, None), &[]);
            return Ok(());
        }
        let Some(model) = self.catalog.lookup(&request.model) else {
            self.write_reply(origin, Status::UnknownModel, self.timings(origin, None), &[]);
            return Ok(());
        };
        let entry = &self.catalog.models[model as usize];
        let slo_ns = match request.slo_us_tighter() {
            Some(slo_us) => entry.slo_ns.min(u64::from(slo_us) * 1000),
            None => entry.slo_ns,
        };
        // Inputs matter only to external executors: otherwise the receive buffer is not held.
        let input = (self.executors.accepts_executors() && !request.input.is_empty())
            .then(|| buffer.slice_of(request.input.as_slice()));
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
            self.awaiting_remote.set(self.awaiting_remote.get() + 1);
            let mut outbox = self.outbox_requests.borrow_mut();
            let batch = &mut outbox[entry.owner];
            batch.push(routed);
            if batch.len() >= self.limits.routed_batch {
                drop(outbox);
                self.flush_outbox();
            }
        }
        Ok(())
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

/// Reads frames from a client until it closes or breaks the protocol.
async fn serve_connection(
    shard: Rc<Shard>,
    key: u64,
    stream: TcpStream,
    connection: Rc<Connection>,
    notify_rx: LocalReceiver<()>,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = futures_lite::io::split(stream);
    let writer_task = glommio::spawn_local(write_loop(writer, Rc::clone(&connection), notify_rx, None)).detach();
    let decoder = FrameDecoder::default();
    let limit = wire::FRAME_HEADER_SIZE + wire::FRAME_PAYLOAD_LIMIT as usize;
    let mut buffer = ReadBuffer::new(READ_BUFFER_BYTES, limit);
    // Set when this connection is an executor's control connection (it sent HELLO).
    let mut control = links::Control::default();
    // `None`: a frame larger than the frame cap fills the buffer (the decoder refuses such a
    // header first, so this is a safety net).
    'read: while let Some(spare) = buffer.spare() {
        let read = match reader.read(spare).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        buffer.advance(read);
        let mut frames = decoder.frames(buffer.filled());
        for frame in &mut frames {
            let outcome = match frame {
                Ok(frame) if frame.kind == Kind::Request => shard.on_request(key, frame.payload, &buffer),
                Ok(frame) if links::is_control_kind(frame.kind) => {
                    shard.on_control(&mut control, &connection, frame.kind, frame.payload)
                }
                Ok(frame) => Err((
                    ErrorCode::UnexpectedKind,
                    format!("a client sends REQUEST frames, not {}", frame.kind),
                )),
                Err(e) => Err((e.error_code().unwrap_or(ErrorCode::Malformed), e.to_string())),
            };
            if let Err((code, message)) = outcome {
                let _ = wire::encode_error(&mut connection.out.borrow_mut(), code, &message);
                connection.closing.set(true);
                let _ = connection.notify.try_send(());
                shard.flush_outbox();
                break 'read;
            }
        }
        let consumed = frames.consumed();
        buffer.consume(consumed);
        shard.flush_outbox();
    }
    shard.control_closed(&control);
    // Replies still owed on this connection go nowhere now; its queued requests are dropped
    // from the schedulers before they use a GPU.
    let slot = (key & u64::from(u32::MAX)) as usize;
    shard.connections.borrow_mut()[slot] = None;
    let mut generations = shard.connection_generations.borrow_mut();
    generations[slot] = generations[slot].wrapping_add(1);
    drop(generations);
    shard.open_connections.set(shard.open_connections.get() - 1);
    shard.disconnected(key);
    if !connection.closing.get() {
        connection.closing.set(true);
        let _ = connection.notify.try_send(());
    }
    drop(writer_task);
}

/// A connection's outgoing side and the receiver its writer waits on.
fn new_connection() -> (Rc<Connection>, LocalReceiver<()>) {
    let (notify, notify_rx) = local_channel::new_bounded(1);
    let connection = Rc::new(Connection {
        out: RefCell::new(Vec::with_capacity(64 << 10)),
        sections: RefCell::new(Vec::new()),
        notify,
        closing: Cell::new(false),
    });
    (connection, notify_rx)
}

/// Writes what is queued on `connection`, many frames per write, until it closes. A link
/// (`link`: its socket and shard) sends a queue that holds zero-copy sections with
/// io_uring's SENDMSG_ZC (`zerocopy`).
async fn write_loop(
    mut writer: futures_lite::io::WriteHalf<TcpStream>,
    connection: Rc<Connection>,
    notify_rx: LocalReceiver<()>,
    link: Option<(std::os::fd::RawFd, Rc<Shard>)>,
) {
    let mut spare = Vec::with_capacity(64 << 10);
    while notify_rx.recv().await.is_some() {
        std::mem::swap(&mut spare, &mut connection.out.borrow_mut());
        let sections = std::mem::take(&mut *connection.sections.borrow_mut());
        if !sections.is_empty() {
            let outgoing = zerocopy::Outgoing {
                bytes: std::mem::replace(&mut spare, Vec::with_capacity(64 << 10)),
                sections,
            };
            if send_sections(&mut writer, link.as_ref(), outgoing).await.is_err() {
                break;
            }
        } else if !spare.is_empty() && writer.write_all(&spare).await.is_err() {
            break;
        }
        spare.clear();
        if connection.closing.get() && connection.out.borrow().is_empty() {
            break;
        }
    }
    let _ = writer.close().await;
}

/// Sends a queue with sections: zero-copy where the shard has a ring, else (or for what the
/// kernel refused to send zero-copy) copied into one buffer.
async fn send_sections(
    writer: &mut futures_lite::io::WriteHalf<TcpStream>,
    link: Option<&(std::os::fd::RawFd, Rc<Shard>)>,
    outgoing: zerocopy::Outgoing,
) -> std::io::Result<()> {
    let Some((fd, shard)) = link else {
        return writer.write_all(&outgoing.flatten()).await;
    };
    let stats = &shard.stats;
    let sent = match &shard.zero_copy {
        Some(ring) => {
            let outgoing = Rc::new(outgoing);
            let len = outgoing.len();
            match ring.send(*fd, Rc::clone(&outgoing)).await? {
                zerocopy::Sent::Done => {
                    stats.zero_copy_sends.fetch_add(1, Ordering::Relaxed);
                    stats.zero_copy_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    return Ok(());
                }
                zerocopy::Sent::Refused { sent, error } => {
                    if !shard.zero_copy_refused.replace(true) {
                        eprintln!(
                            "symphony serve: shard {}: the kernel refused a zero-copy send ({error}); such sends are copied",
                            shard.id
                        );
                    }
                    (sent, outgoing)
                }
            }
        }
        None => (0, Rc::new(outgoing)),
    };
    stats.zero_copy_fallbacks.fetch_add(1, Ordering::Relaxed);
    let (sent, outgoing) = sent;
    writer.write_all(&outgoing.flatten()[sent..]).await
}

/// The next accepted connection, or `None` once the service stops.
async fn accept_until_stop(shard: &Shard, listener: &TcpListener) -> Option<TcpStream> {
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            while !shard.stop.load(Ordering::Relaxed) {
                glommio::timer::sleep(STOP_POLL).await;
            }
            None
        })
        .await;
        if let Ok(stream) = accepted? {
            return Some(stream);
        }
    }
}

/// Accepts clients until the service stops.
async fn accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    while let Some(stream) = accept_until_stop(&shard, &listener).await {
        if shard.open_connections.get() >= shard.limits.connections_per_shard {
            drop(stream); // Over the limit: closed at once.
            continue;
        }
        let (connection, notify_rx) = new_connection();
        let key = {
            let mut connections = shard.connections.borrow_mut();
            let mut generations = shard.connection_generations.borrow_mut();
            let slot = match connections.iter().position(Option::is_none) {
                Some(free) => {
                    connections[free] = Some(Rc::clone(&connection));
                    free
                }
                None => {
                    connections.push(Some(Rc::clone(&connection)));
                    generations.push(0);
                    connections.len() - 1
                }
            };
            u64::from(generations[slot]) << 32 | slot as u64
        };
        shard.open_connections.set(shard.open_connections.get() + 1);
        glommio::spawn_local(serve_connection(Rc::clone(&shard), key, stream, connection, notify_rx)).detach();
    }
}

/// Counters of the whole service (all shards), for tests and operators.
#[derive(Debug, Default)]
pub struct Stats {
    /// Request frames accepted from clients.
    pub requests: std::sync::atomic::AtomicU64,
    /// Queued requests removed because their client went away.
    pub cancelled: std::sync::atomic::AtomicU64,
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
    /// Link writes sent zero-copy (io_uring SENDMSG_ZC), and their bytes.
    pub zero_copy_sends: std::sync::atomic::AtomicU64,
    pub zero_copy_bytes: std::sync::atomic::AtomicU64,
    /// Link writes that had to be copied instead (no ring, or the kernel refused).
    pub zero_copy_fallbacks: std::sync::atomic::AtomicU64,
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

/// Starts the service: `shards` pinned executors (default: the machine's CPUs).
pub fn start(config: &ServeConfig) -> Result<ServerHandle, ServeError> {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shard_count = config.shards.unwrap_or(available).max(1);
    let memory = runtime::shard_memory(shard_count, runtime::memlock_limit_bytes())?;
    let cpus = runtime::shard_cpus(shard_count, config.cpus.as_deref())?;
    let catalog = Arc::new(Catalog::new(&config.models, shard_count));
    let table = Arc::new(GpuTable::with_offline(
        config.gpus as usize,
        config.executor_gpus as usize,
        shard_count,
    ));
    let executors = Arc::new(Executors::new(
        config.executor_token.clone(),
        config.gpus,
        config.executor_gpus,
        shard_count,
    ));
    let link_addrs = Arc::new(std::sync::OnceLock::new());
    let mut shard_link_addrs = Vec::with_capacity(shard_count);
    let mesh = MeshBuilder::<ShardMsg, Full>::full(shard_count, config.limits.mesh_channel);
    let stop = Arc::new(AtomicBool::new(false));
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
            limits: config.limits,
            table: Arc::clone(&table),
            mesh: mesh.clone(),
            stop: Arc::clone(&stop),
            stats: Arc::clone(&stats),
            epoch,
            embedded_gpus: config.gpus,
            executors: Arc::clone(&executors),
            link_addrs: Arc::clone(&link_addrs),
            heartbeat_timeout_ns: config.heartbeat_timeout_ms * 1_000_000,
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
    table: Arc<GpuTable>,
    mesh: MeshBuilder<ShardMsg, Full>,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
    epoch: Instant,
    embedded_gpus: u32,
    executors: Arc<Executors>,
    link_addrs: Arc<std::sync::OnceLock<Vec<String>>>,
    heartbeat_timeout_ns: u64,
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
        scheduler: RefCell::new(scheduler),
        output: RefCell::new(Output::new()),
        pending: RefCell::new(PendingTable::new(setup.limits.requests_per_shard)),
        connections: RefCell::new(Vec::new()),
        connection_generations: RefCell::new(Vec::new()),
        open_connections: Cell::new(0),
        awaiting_remote: Cell::new(0),
        outbox_requests: RefCell::new(vec![Vec::new(); shard_count]),
        outbox_replies: RefCell::new(vec![Vec::new(); shard_count]),
        senders,
        wake,
        stop: setup.stop,
        stats: setup.stats,
        embedded_gpus: setup.embedded_gpus,
        executors: setup.executors,
        link_addrs: setup.link_addrs,
        links: RefCell::new(HashMap::new()),
        heartbeat_timeout_ns: setup.heartbeat_timeout_ns,
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
        glommio::spawn_local(links::link_accept_loop(Rc::clone(&shard), listener)).detach();
    }
    accept_loop(Rc::clone(&shard), listener).await;
    drain(&shard).await;
}

/// After stop: no new connections, new requests are answered "shutting down"; planned batches
/// finish and are answered; what is still queued when the grace period ends is answered
/// "shutting down"; then the writers get a moment to flush.
async fn drain(shard: &Rc<Shard>) {
    let grace_ns = shard.catalog.models.iter().map(|m| m.slo_ns).max().unwrap_or(0) + 1_000_000_000;
    let started_ns = shard.now_ns();
    loop {
        let held = shard.pending.borrow().held();
        if held == 0 && shard.awaiting_remote.get() == 0 {
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
    glommio::timer::sleep(STOP_POLL).await;
}
