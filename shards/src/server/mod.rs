//! The scheduler service's glommio driver: one shard per core, each a front door and the
//! owner of some models, all planning on one shared GPU table.
//!
//! Everything a shard decides is [`crate::shard::ShardCore`], a state machine with no I/O.
//! This module gives it its inputs and carries out its effects: sockets and the one frame
//! loop for clients and links (`connection`), the writers and the zero-copy ring
//! (`zerocopy`), the timers, the channel mesh between shards (`mesh`), the embedded
//! executors' sleeps, and start-up and the drain (`startup`).
//!
//! The path of a request (ARCHITECTURE.md): a client connection on any shard sends REQUEST
//! frames (`core::wire`, many per read); the frame loop hands each to the shard's core, which
//! validates it, looks the model up and routes it to the model's owning shard (itself, or
//! over the mesh in batches). The owner runs the core's deferred scheduler for its models,
//! claiming GPUs in the shared [`GpuTable`](crate::sync::gpu_table::GpuTable). Each plan runs
//! on an embedded simulated executor (a task that waits until `exec_at`, then for the
//! profile's time) or goes to an external executor over this shard's link to it; every
//! reply goes back to the connection's shard, which writes many reply frames per write.
//!
//! What faces the outside is bounded and cannot be made to panic (`connection`): every port
//! has a connection cap, every connection a write queue cap and a stall timeout, a client is
//! read only while it takes its replies (TCP backpressure), the mesh's overflow stops the
//! front doors that feed it, and a half-closed client still gets its replies.
//! SIGINT/SIGTERM stop accepting, let planned batches finish and answer the rest, on every
//! shard before any shard exits.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::local_channel::{LocalReceiver, LocalSender};
use symphony_core::policy::Plan;

use crate::config::Limits;
use crate::shard::{Effect, Effects, Input, Peer, ShardCore, TimeoutsNs};

mod connection;
mod mesh;
mod startup;
mod zerocopy;

pub use crate::stats::Stats;
pub use startup::{start, ServeError, ServerHandle};

use connection::{Connection, Slots};
use mesh::Mesh;

/// How often idle loops look at the stop flag.
const STOP_POLL: Duration = Duration::from_millis(20);
/// Connections of one port that may be closing beyond its cap (evicted, or being refused):
/// each still holds a descriptor for a moment.
pub(crate) const CONNECTIONS_CLOSING_LIMIT: usize = connection::EVICTING_LIMIT + connection::REFUSING_LIMIT;
/// The fewest link connections a shard is given when the descriptor limit is low.
pub(crate) const LINKS_LEAST: usize = 4;

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
        {
            let now_ns = self.now_ns();
            let mut core = self.core.borrow_mut();
            if !self.stopped.get() && self.stop.load(Ordering::Relaxed) {
                self.stopped.set(true);
                core.handle(now_ns, Input::Stop, &mut fx);
            }
            core.handle(now_ns, input, &mut fx);
        }
        // No borrow of the core is held from here: glommio may run a spawned task at once,
        // and an effect may lead to another input.
        self.apply(&mut fx);
        fx.clear();
        self.spare_effects.borrow_mut().push(fx);
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
    /// profile's time, then the core is told.
    fn run_embedded(self: &Rc<Self>, plan: Plan) {
        let shard = Rc::clone(self);
        glommio::spawn_local(async move {
            sleep_until(shard.epoch, plan.exec_at_ns).await;
            let started_ns = shard.now_ns();
            sleep_until(shard.epoch, started_ns + (plan.finish_ns - plan.exec_at_ns)).await;
            let finished_ns = shard.now_ns();
            shard.handle(Input::EmbeddedDone {
                plan_id: plan.plan_id,
                started_ns,
                finished_ns,
            });
        })
        .detach();
    }
}

async fn sleep_until(epoch: Instant, at_ns: u64) {
    let now_ns = epoch.elapsed().as_nanos() as u64;
    if at_ns > now_ns {
        glommio::timer::sleep(Duration::from_nanos(at_ns - now_ns)).await;
    }
}

/// The core's timers: sleeps until its next wake-up time, or until new work wakes it.
async fn timer_loop(shard: Rc<Shard>, wake: LocalReceiver<()>) {
    while !shard.stop.load(Ordering::Relaxed) {
        let next_ns = shard.core.borrow_mut().next_wake_ns();
        let now_ns = shard.now_ns();
        let wait = match next_ns {
            Some(at_ns) if at_ns <= now_ns => {
                shard.handle(Input::Timer);
                continue;
            }
            Some(at_ns) => Duration::from_nanos(at_ns - now_ns).min(STOP_POLL),
            None => STOP_POLL,
        };
        futures_lite::future::or(glommio::timer::sleep(wait), async {
            let _ = wake.recv().await;
        })
        .await;
    }
}
