//! The shards' whole path for client requests in virtual time, with no sockets and no
//! threads: REQUEST frames handed to shard 0 in turns (as one read brings them), every effect
//! carried out (plans run on the embedded GPUs and complete at their planned finish, messages
//! between shards delivered, replies encoded), the scheduler's timers fired when due. What it
//! times is the cores' own work per request, at any offered rate, the same on every run (the
//! criterion stages and `examples/hotpath.rs` measure with it).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::{Duration, Instant};

use symphony_core::wire::{Frame, Kind};
use symphony_shards::buffers::ReadBuffer;
use symphony_shards::shard::{ConnectionKey, Effect, Effects, Input, Peer, ShardCore, ShardMsg};

/// The `n`th of `len` payloads: each of them once in every `len` frames, in an order with
/// no stride (`step`, from [`scramble_step`], is prime to `len`; an offset per round).
fn scrambled(n: usize, len: usize, step: usize) -> usize {
    let round = n / len;
    (n % len * step + round * 7919) % len
}

/// A multiplier prime to `len` near its half.
fn scramble_step(len: usize) -> usize {
    (0..len)
        .map(|k| (len / 2 + 1 + k) | 1)
        .find(|&s| gcd(s, len) == 1)
        .unwrap_or(1)
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Shard cores served in virtual time by one client connection on shard 0.
pub struct VirtualDoor {
    cores: Vec<ShardCore>,
    clock_ns: u64,
    fx: Effects,
    /// Embedded plans in flight: (finish, shard, plan id, start).
    running: BinaryHeap<Reverse<(u64, usize, u64, u64)>>,
    mesh: VecDeque<(usize, ShardMsg)>,
    client: Peer,
    buffer: ReadBuffer,
    next_payload: usize,
    plans: u64,
    planned_requests: u64,
}

impl std::fmt::Debug for VirtualDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualDoor")
            .field("shards", &self.cores.len())
            .field("clock_ns", &self.clock_ns)
            .field("running", &self.running.len())
            .finish_non_exhaustive()
    }
}

impl VirtualDoor {
    /// `cores` (see [`crate::stress::embedded_cores`]) with a client connected to shard 0.
    pub fn new(mut cores: Vec<ShardCore>) -> VirtualDoor {
        let client = Peer::Client(ConnectionKey::new(0, 0));
        let mut fx = Effects::default();
        cores[0].handle(0, Input::Opened(client), &mut fx);
        VirtualDoor {
            cores,
            clock_ns: 0,
            fx,
            running: BinaryHeap::new(),
            mesh: VecDeque::new(),
            client,
            buffer: ReadBuffer::new(64, 64),
            next_payload: 0,
            plans: 0,
            planned_requests: 0,
        }
    }

    /// Serves `count` requests, one every `spacing_ns` of virtual time, `turn` frames to a
    /// read (handled at the read's time), the payloads (REQUEST frames without their header)
    /// in a scrambled order that visits each equally often (a client's requests come for
    /// its models in no order: a model's state is no nearer in memory to the last one's);
    /// returns the wall time it took.
    pub fn serve(&mut self, count: u64, spacing_ns: u64, turn: usize, payloads: &[Vec<u8>]) -> Duration {
        let turn = turn.max(1) as u64;
        let step = scramble_step(payloads.len());
        let started = Instant::now();
        let mut served = 0;
        while served < count {
            let frames = turn.min(count - served);
            self.clock_ns += spacing_ns * frames;
            let now = self.clock_ns;
            for _ in 0..frames {
                let frame = Frame {
                    kind: Kind::Request,
                    payload: &payloads[scrambled(self.next_payload, payloads.len(), step)],
                };
                self.next_payload += 1;
                let input = Input::Frame {
                    from: self.client,
                    frame: Ok(frame),
                    buffer: &self.buffer,
                };
                self.cores[0].handle(now, input, &mut self.fx);
            }
            served += frames;
            self.cores[0].handle(now, Input::ReadDone, &mut self.fx);
            self.apply(0);
            self.deliver(now);
            while let Some(&Reverse((finish, shard, plan_id, start))) = self.running.peek() {
                if finish > now {
                    break;
                }
                self.running.pop();
                let done = Input::EmbeddedDone {
                    plan_id,
                    started_ns: start,
                    finished_ns: finish,
                };
                self.cores[shard].handle(now, done, &mut self.fx);
                self.apply(shard);
            }
            for shard in 0..self.cores.len() {
                if self.cores[shard].next_wake_ns().is_some_and(|t| t <= now) {
                    self.cores[shard].handle(now, Input::Timer, &mut self.fx);
                    self.apply(shard);
                }
            }
            self.deliver(now);
        }
        started.elapsed()
    }

    /// Plans run so far, and the requests in them.
    pub fn plans(&self) -> (u64, u64) {
        (self.plans, self.planned_requests)
    }

    /// The messages between shards, until none is left.
    fn deliver(&mut self, now: u64) {
        while let Some((to, msg)) = self.mesh.pop_front() {
            self.cores[to].handle(now, Input::Shard(msg), &mut self.fx);
            self.apply(to);
        }
    }

    /// Carries out what `shard` decided: embedded plans start, messages queue; writes are
    /// dropped (their bytes were encoded already).
    fn apply(&mut self, shard: usize) {
        let mut list = std::mem::take(&mut self.fx.list);
        for effect in list.drain(..) {
            match effect {
                Effect::RunEmbedded(plan) => {
                    self.plans += 1;
                    self.planned_requests += u64::from(plan.batch_size);
                    self.running
                        .push(Reverse((plan.finish_ns, shard, plan.plan_id, plan.exec_at_ns)))
                }
                Effect::Send { shard: to, msg } => self.mesh.push_back((to, msg)),
                _ => {}
            }
        }
        self.fx.list = list;
        self.fx.clear();
    }
}
