//! Messages between shards: glommio's channel mesh (bounded channels, one per ordered pair of
//! shards, created at start-up) with an ordered overflow queue per destination.
//!
//! A message goes straight into its channel when the channel has room and nothing is
//! queued before it. Otherwise it waits in the destination's queue, behind every earlier
//! message, and one task per destination moves the queue into the channel as room comes:
//! messages between two shards keep their order (a connection's `Disconnected` never
//! overtakes its `Requests`). While any queue is non-empty the shard's client connections
//! stop reading ([`Mesh::backlogged`]): a slow owner shard slows the front doors that feed
//! it, which is backpressure on the clients' sockets, not memory. What still enters a queue
//! then (replies of requests already admitted, executor losses, hand-offs) is bounded by the
//! requests the shards hold.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

use glommio::channels::channel_mesh::Senders;

use super::connection::Connection;
use crate::shard::ShardMsg;

/// The sending side of one shard's mesh.
pub(super) struct Mesh {
    senders: Senders<ShardMsg>,
    /// Per destination: messages waiting for room in its channel, oldest first.
    queues: RefCell<Vec<VecDeque<ShardMsg>>>,
    /// Per destination: whether its flushing task runs.
    flushing: RefCell<Vec<bool>>,
    /// Messages in all queues.
    queued: Cell<usize>,
    /// Flushing tasks running (each may hold one message it waits to send).
    flushers: Cell<usize>,
    /// Client connections waiting for the backlog to clear, in the order they started.
    waiting: RefCell<VecDeque<Rc<Connection>>>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("queued", &self.queued.get()).finish()
    }
}

impl Mesh {
    pub(super) fn new(senders: Senders<ShardMsg>) -> Mesh {
        let shards = senders.nr_consumers();
        Mesh {
            senders,
            queues: RefCell::new((0..shards).map(|_| VecDeque::new()).collect()),
            flushing: RefCell::new(vec![false; shards]),
            queued: Cell::new(0),
            flushers: Cell::new(0),
            waiting: RefCell::new(VecDeque::new()),
        }
    }

    /// Puts `connection` in line for room (once); when the backlog clears every connection in
    /// line gets one turn, in order.
    pub(super) fn wait_for_room(&self, connection: &Rc<Connection>) {
        if !connection.mesh_waiting.replace(true) {
            self.waiting.borrow_mut().push_back(Rc::clone(connection));
        }
    }

    /// Whether messages wait for room (client connections do not read meanwhile).
    pub(super) fn backlogged(&self) -> bool {
        self.queued.get() > 0 || self.flushers.get() > 0
    }

    /// Sends `msg` to shard `dest`, after every message sent there before it. A closed
    /// channel means the service is stopping: the message is dropped.
    pub(super) fn send(self: &Rc<Self>, dest: usize, msg: ShardMsg) {
        let mut queues = self.queues.borrow_mut();
        // Straight into the channel only if nothing for `dest` is queued or on its way (the
        // flushing task may hold the last queued message while it waits for room).
        if queues[dest].is_empty() && !self.flushing.borrow()[dest] {
            match self.senders.try_send_to(dest, msg) {
                Ok(()) => return,
                Err(glommio::GlommioError::WouldBlock(glommio::ResourceType::Channel(msg))) => {
                    queues[dest].push_back(msg);
                }
                Err(_) => return,
            }
        } else {
            queues[dest].push_back(msg);
        }
        self.queued.set(self.queued.get() + 1);
        drop(queues);
        let start = !std::mem::replace(&mut self.flushing.borrow_mut()[dest], true);
        if start {
            self.flushers.set(self.flushers.get() + 1);
            let mesh = Rc::clone(self);
            // No borrow is held here: glommio may run a spawned task at once.
            glommio::spawn_local(async move { mesh.flush(dest).await }).detach();
        }
    }

    /// Moves `dest`'s queue into its channel, in order, waiting for room.
    async fn flush(&self, dest: usize) {
        loop {
            let next = self.queues.borrow_mut()[dest].pop_front();
            let Some(msg) = next else { break };
            self.queued.set(self.queued.get() - 1);
            if self.senders.send_to(dest, msg).await.is_err() {
                // Stopping: what is queued has nowhere to go.
                let dropped = std::mem::take(&mut self.queues.borrow_mut()[dest]);
                self.queued.set(self.queued.get() - dropped.len());
                break;
            }
        }
        self.flushing.borrow_mut()[dest] = false;
        self.flushers.set(self.flushers.get() - 1);
        if !self.backlogged() {
            let waiting = std::mem::take(&mut *self.waiting.borrow_mut());
            for connection in waiting {
                connection.mesh_waiting.set(false);
                connection.mesh_turn.set(true);
                connection.wake_reader();
            }
        }
    }
}
