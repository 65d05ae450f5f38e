//! The scheduler service's glommio driver: one shard per core, each a front door and the
//! owner of some models, all planning on one shared GPU table.
//!
//! Everything a shard decides is [`crate::shard::ShardCore`], a state machine with no I/O.
//! This module gives it its inputs and carries out its effects: sockets and the one frame
//! loop for clients and links (`connection`), the writers and the zero-copy ring
//! (`zerocopy`), the timers (the core's and the embedded executors', one loop with one
//! reused glommio timer), the channel mesh between shards (`mesh`), and start-up and the
//! drain (`startup`).
//!
//! The path of a request (ARCHITECTURE.md): a client connection on any shard sends REQUEST
//! frames (`core::wire`, many per read); the frame loop hands each to the shard's core, which
//! validates it, looks the model up and routes it to the model's owning shard (itself, or
//! over the mesh in batches). The owner runs the core's deferred scheduler for its models,
//! claiming GPUs in the shared [`GpuTable`](crate::sync::gpu_table::GpuTable). Each plan runs
//! on an embedded simulated executor (an event in the shard's timer loop: it starts at
//! `exec_at` and finishes the profile's time later) or goes to an external executor over this shard's link to it; every
//! reply goes back to the connection's shard, which writes many reply frames per write.
//!
//! What faces the outside is bounded and cannot be made to panic (`connection`): every port
//! has a connection cap, every connection a write queue cap and a stall timeout, a client is
//! read only while it takes its replies (TCP backpressure), the mesh's overflow stops the
//! front doors that feed it, and a half-closed client still gets its replies.
//! SIGINT/SIGTERM stop accepting, let planned batches finish and answer the rest, on every
//! shard before any shard exits.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::local_channel::{LocalReceiver, LocalSender};
use symphony_core::policy::Plan;

use crate::config::Limits;
use crate::shard::{Effect, Effects, Input, Peer, ShardCore, TimeoutsNs};

mod connection;
mod grpc;
mod kserve;
mod mesh;
mod startup;
mod tls;
mod zerocopy;

pub use crate::stats::Stats;
pub use startup::{start, ServeError, ServerHandle};

use connection::{Connection, Slots};
use mesh::Mesh;

/// A turn of frames reads the clock once per this many frames (a few microseconds apart).
const FRAMES_PER_CLOCK: usize = 8;
/// How often idle loops look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Connections of one port that may be closing beyond its cap (evicted, or being refused):
/// each still holds a descriptor for a moment.
pub(crate) const CONNECTIONS_CLOSING_LIMIT: usize = connection::EVICTING_LIMIT + connection::REFUSING_LIMIT;
/// The fewest link connections a shard is given when the descriptor limit is low.
pub(crate) const LINKS_LEAST: usize = 4;

/// Not started yet (an embedded plan's event before `exec_at`).
const NOT_STARTED: u64 = u64::MAX;

/// An embedded plan's next event: at `at_ns` it starts (`started_ns` is [`NOT_STARTED`]) or
/// finishes. Ordered by time, then plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct EmbeddedEvent {
    at_ns: u64,
    plan_id: u64,
    started_ns: u64,
    run_ns: u64,
}

/// One shard's driver: its core and the I/O around it.
struct Shard {
    id: u32,
    epoch: Instant,
    limits: Limits,
    timeouts: TimeoutsNs,
    core: RefCell<ShardCore>,
    /// Effects buffers, reused (a handled input's effects may lead to another input).
    spare_effects: RefCell<Vec<Effects>>,
    /// Client connections (front door).
    clients: RefCell<Slots>,
    /// Connections on the executor link port.
    link_conns: RefCell<Slots>,
    mesh: Rc<Mesh>,
    /// Wakes the timer loop (one token).
    wake: LocalSender<()>,
    /// The embedded executors' plans, by their next event (no task or timer per plan: the
    /// timer loop runs them).
    embedded: RefCell<BinaryHeap<Reverse<EmbeddedEvent>>>,
    /// Sampled arrival-to-decision times ([`Stats::decision`]), merged at the drain's end.
    decision: RefCell<hdrhistogram::Histogram<u64>>,
    /// Requests until the next sample.
    decision_countdown: Cell<u32>,
    /// Nanoseconds spent in [`Shard::handle`] and [`Shard::handle_frames`] ([`Stats::shard_work_ns`],
    /// added at the drain's end).
    work_ns: Cell<u64>,
    /// How many of those calls are running (one inside another's effects is not counted
    /// again).
    working: Cell<u32>,
    stop: Arc<AtomicBool>,
    /// The core was told to stop.
    stopped: Cell<bool>,
    /// Shards done answering their own requests at shutdown.
    drained: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    /// The largest SLO of any model (the drain's grace period follows it).
    slo_max_ns: u64,
    /// The ring for zero-copy link sends (`None`: none could be set up, or no links).
    zero_copy: Option<zerocopy::ZeroCopy>,
    /// Whether the kernel refused a zero-copy send yet (said once).
    zero_copy_refused: Cell<bool>,
    /// Every shard's metrics, for `GET /metrics`.
    metrics: Arc<crate::metrics::Registry>,
    /// TLS on the ports it covers (`[tls]`); `None`: every port is plain.
    tls: Option<crate::tls::ServerTls>,
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
        Duration::from_nanos(self.timeouts.write_stall_ns)
    }

    /// Gives the core one input now and carries out what it decided.
    fn handle(self: &Rc<Self>, input: Input<'_>) {
        let mut fx = self.spare_effects.borrow_mut().pop().unwrap_or_default();
        let now_ns = self.now_ns();
        self.working.set(self.working.get() + 1);
        {
            let mut core = self.core.borrow_mut();
            self.tell_stop(&mut core, now_ns, &mut fx);
            core.handle(now_ns, input, &mut fx);
        }
        // No borrow of the core is held from here: glommio may run a spawned task at once,
        // and an effect may lead to another input.
        self.apply(&mut fx);
        fx.clear();
        self.spare_effects.borrow_mut().push(fx);
        self.add_work(now_ns);
    }

    /// Counts the time since `started_ns` as this shard's own work, unless inside another
    /// call that counts it.
    fn add_work(&self, started_ns: u64) {
        let working = self.working.get() - 1;
        self.working.set(working);
        if working == 0 {
            let work_ns = self.now_ns().saturating_sub(started_ns);
            self.work_ns.set(self.work_ns.get() + work_ns);
        }
    }

    /// The first input after the stop flag was set tells the core first.
    fn tell_stop(&self, core: &mut ShardCore, now_ns: u64, fx: &mut Effects) {
        if !self.stopped.get() && self.stop.load(Ordering::Relaxed) {
            self.stopped.set(true);
            core.handle(now_ns, Input::Stop, fx);
        }
    }

    /// One turn of a connection's frames, from `frames` (what its buffer holds), up to
    /// [`connection::FRAMES_PER_TURN`] and as far as its limits allow: all under one borrow of
    /// the core, into one set of effects carried out after the last frame (a frame's replies
    /// and messages go out a few microseconds later than one by one, in the same order). The
    /// clock is read once per [`FRAMES_PER_CLOCK`] frames (and kept monotone), and every
    /// [`crate::stats::DECISION_SAMPLE_EVERY`]th client request records the time since
    /// `read_ns`, the read that brought it.
    fn handle_frames(
        self: &Rc<Self>,
        peer: Peer,
        connection: &Connection,
        frames: &mut symphony_core::wire::Frames<'_>,
        buffer: &crate::buffers::ReadBuffer,
        read_ns: u64,
    ) -> connection::TurnEnd {
        use connection::TurnEnd;
        let mut fx = self.spare_effects.borrow_mut().pop().unwrap_or_default();
        let is_client = matches!(peer, Peer::Client(_));
        let started_ns = self.now_ns();
        self.working.set(self.working.get() + 1);
        let end = {
            let mut now_ns = started_ns;
            let mut core = self.core.borrow_mut();
            self.tell_stop(&mut core, now_ns, &mut fx);
            let mut handled = 0;
            loop {
                if connection::over_limits_of(&core, self, peer, connection) {
                    break TurnEnd::AtLimit;
                }
                if handled == connection::FRAMES_PER_TURN {
                    break TurnEnd::TurnOver;
                }
                let Some(frame) = frames.next() else {
                    break TurnEnd::Drained;
                };
                handled += 1;
                if handled % FRAMES_PER_CLOCK == 0 {
                    now_ns = now_ns.max(self.now_ns());
                }
                let framing_error = frame.is_err();
                let is_request = frame
                    .as_ref()
                    .is_ok_and(|f| f.kind == symphony_core::wire::Kind::Request);
                core.handle(
                    now_ns,
                    Input::Frame {
                        from: peer,
                        frame,
                        buffer,
                    },
                    &mut fx,
                );
                if is_client && is_request {
                    self.sample_decision(read_ns);
                }
                let failed = match peer {
                    Peer::Client(key) => core.client_failed(key),
                    Peer::Link(key) => core.link_failed(key),
                };
                if framing_error || failed {
                    break TurnEnd::Failed;
                }
            }
        };
        // No borrow of the core from here (as in `handle`).
        self.apply(&mut fx);
        fx.clear();
        self.spare_effects.borrow_mut().push(fx);
        self.add_work(started_ns);
        end
    }

    /// After a client frame was handled: every [`crate::stats::DECISION_SAMPLE_EVERY`]th
    /// one records the time since the read that brought it.
    fn sample_decision(&self, read_ns: u64) {
        let countdown = self.decision_countdown.get();
        if countdown > 1 {
            self.decision_countdown.set(countdown - 1);
            return;
        }
        self.decision_countdown.set(crate::stats::DECISION_SAMPLE_EVERY);
        let elapsed_ns = self
            .now_ns()
            .saturating_sub(read_ns)
            .clamp(1, crate::stats::DECISION_NS_MAX);
        self.decision.borrow_mut().saturating_record(elapsed_ns);
    }

    fn connection(&self, peer: Peer) -> Option<Rc<Connection>> {
        match peer {
            Peer::Client(key) => self.clients.borrow().get(key),
            Peer::Link(key) => self.link_conns.borrow().get(key),
        }
    }

    /// Carries out the core's effects, in order.
    fn apply(self: &Rc<Self>, fx: &mut Effects) {
        let mut overflowed: Vec<Peer> = Vec::new();
        let mut list = std::mem::take(&mut fx.list);
        for effect in &list {
            match effect {
                Effect::Write { to, bytes, sections } => {
                    let Some(connection) = self.connection(*to) else {
                        continue;
                    };
                    let (bytes, sections) = fx.write_parts(bytes, sections);
                    if let Peer::Link(_) = to {
                        let len = bytes.len() + sections.iter().map(|s| s.bytes().len()).sum::<usize>();
                        if overflowed.contains(to)
                            || connection.queued_bytes() + len > self.limits.link_write_buffer_bytes
                        {
                            if !overflowed.contains(to) {
                                overflowed.push(*to);
                            }
                            continue;
                        }
                    } else {
                        // A half-closed connection waits for its last reply, a full one for
                        // room.
                        connection.wake_waiting_reader();
                    }
                    if connection.is_dead() {
                        continue;
                    }
                    connection.out.borrow_mut().extend_from_slice(bytes);
                    for slice in sections {
                        connection.push_section(slice.clone());
                    }
                    connection.wake_writer();
                }
                Effect::Close { to, stop_reading } => {
                    if let Some(connection) = self.connection(*to) {
                        connection.close_after_writing();
                        if *stop_reading {
                            connection.stop_reader();
                        }
                    }
                }
                Effect::Send { shard, msg: _ } => debug_assert_ne!(*shard, self.id as usize),
                Effect::RunEmbedded(plan) => self.run_embedded(*plan),
                Effect::Log(line) => self.log(line),
            }
        }
        // The messages go last, in order (moved out of the list, which keeps its capacity).
        for effect in list.drain(..) {
            if let Effect::Send { shard, msg } = effect {
                self.mesh.send(shard, msg);
            }
        }
        fx.list = list;
        if fx.rearm {
            // The scheduler's next timer may have moved earlier: wake its loop.
            let _ = self.wake.try_send(());
        }
        for peer in overflowed {
            self.handle(Input::WriteOverflow(peer));
        }
    }

    /// An embedded simulated executor: the batch starts at `exec_at` and runs for its
    /// profile's time, then the core is told (the timer loop runs the events).
    fn run_embedded(&self, plan: Plan) {
        self.embedded.borrow_mut().push(Reverse(EmbeddedEvent {
            at_ns: plan.exec_at_ns,
            plan_id: plan.plan_id,
            started_ns: NOT_STARTED,
            run_ns: plan.finish_ns - plan.exec_at_ns,
        }));
        let _ = self.wake.try_send(());
    }

    /// Runs the embedded plans' events due by now; returns when the next one is due.
    fn run_due_embedded(self: &Rc<Self>) -> Option<u64> {
        loop {
            let now_ns = self.now_ns();
            let event = {
                let events = self.embedded.borrow();
                match events.peek() {
                    Some(Reverse(event)) if event.at_ns <= now_ns => *event,
                    Some(Reverse(event)) => return Some(event.at_ns),
                    None => return None,
                }
            };
            self.embedded.borrow_mut().pop();
            if event.started_ns == NOT_STARTED {
                self.embedded.borrow_mut().push(Reverse(EmbeddedEvent {
                    at_ns: now_ns + event.run_ns,
                    started_ns: now_ns,
                    ..event
                }));
            } else {
                self.handle(Input::EmbeddedDone {
                    plan_id: event.plan_id,
                    started_ns: event.started_ns,
                    finished_ns: now_ns,
                });
            }
        }
    }
}

/// The core's timers and the embedded plans' events: sleeps until the next of either, or
/// until new work wakes it, on one glommio timer reset each time (a new timer is an
/// allocation).
async fn timer_loop(shard: Rc<Shard>, wake: LocalReceiver<()>) {
    let mut timer = glommio::timer::Timer::new(STOP_POLL);
    while !shard.stop.load(Ordering::Relaxed) {
        let embedded_ns = shard.run_due_embedded();
        let next_ns = shard.core.borrow_mut().next_wake_ns();
        let now_ns = shard.now_ns();
        if next_ns.is_some_and(|at_ns| at_ns <= now_ns) {
            shard.handle(Input::Timer);
            continue;
        }
        let wait = match next_ns.into_iter().chain(embedded_ns).min() {
            Some(at_ns) => Duration::from_nanos(at_ns.saturating_sub(now_ns)).min(STOP_POLL),
            None => STOP_POLL,
        };
        timer.reset(wait);
        futures_lite::future::or(
            async {
                (&mut timer).await;
            },
            async {
                let _ = wake.recv().await;
            },
        )
        .await;
    }
}
