//! What shards send each other over the mesh, in batches, and what travels with a request.

use symphony_core::wire::{Status, Timings};

use super::keys::ConnectionKey;
use crate::buffers::Slice;

/// Where a reply goes: a connection on a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin {
    pub shard: u32,
    pub connection: ConnectionKey,
    pub client_request_id: u64,
    pub received_ns: u64,
    /// Bytes of the request's input (counted against its connection until the reply).
    pub input_len: u32,
}

/// A request on its way to the owner of its model.
#[derive(Debug, Clone)]
pub struct Routed {
    pub origin: Origin,
    pub model: u32,
    pub deadline_ns: u64,
    /// Its input bytes (kept only when external executors may run it).
    pub input: Option<Slice>,
}

/// A reply on its way back to the connection's shard.
#[derive(Debug, Clone)]
pub struct RoutedReply {
    pub origin: Origin,
    pub status: Status,
    pub timings: Timings,
    /// The output, held from an executor link's receive buffer.
    pub output: Option<Slice>,
}

/// What shards send each other. Between two shards messages keep their order: a
/// connection's `Disconnected` never overtakes its `Requests`.
#[derive(Debug)]
pub enum ShardMsg {
    Requests(Vec<Routed>),
    /// Replies to requests the receiver routed. One with no connection to write to (its
    /// client is gone) still ends the receiver's wait for it.
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
