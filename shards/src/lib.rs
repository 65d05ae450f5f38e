//! symphony-shards: the scheduler service.
//!
//! [`shard`] is a shard's logic as a state machine with no I/O (inputs in, effects out),
//! which both the glommio driver and the seeded simulation in `symphony-verify` run.
//! [`server`] runs `symphony serve`: glommio thread-per-core shards, each a TCP front door
//! and the owner of some models, routing requests over a channel mesh, planning with the
//! core's deferred scheduler on the shared lock-free GPU table ([`sync`], checked with loom in
//! `symphony-verify`) through [`shared_gpus`], and linked to external executors
//! ([`executors`] is their registry). [`runtime`] is the thin layer over glommio; [`config`]
//! the validated configuration with every limit; [`client`] a blocking client. See
//! ARCHITECTURE.md for the map and `docs/protocol.md` for the bytes.

pub mod buffers;
pub mod client;
pub mod config;
pub mod executors;
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "runtime")]
pub mod server;
pub mod shard;
pub mod shared_gpus;
pub mod stats;
pub mod sync;
pub mod tensors;
pub mod tls;
