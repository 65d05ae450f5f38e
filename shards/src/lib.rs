//! symphony-shards: the scheduler service.
//!
//! [`server`] runs `symphony serve`: glommio thread-per-core shards, each a TCP front door
//! and the owner of some models, routing requests over a channel mesh, planning with the
//! core's deferred scheduler on the shared lock-free GPU table ([`sync`], checked with loom in
//! `symphony-verify`) through [`shared_gpus`], and linked to external executors
//! ([`executors`] is their registry). [`runtime`] is the thin layer over glommio; [`config`]
//! the validated configuration with every limit; [`client`] a blocking client. See
//! ARCHITECTURE.md for the map and `docs/protocol.md` for the bytes.

pub mod client;
pub mod config;
pub mod executors;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "runtime")]
pub mod server;
pub mod shared_gpus;
pub mod sync;
