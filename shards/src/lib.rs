//! symphony-shards: the scheduler service (being built).
//!
//! Today this crate holds [`sync`], the lock-free structures the shards will share: the GPU
//! table that lets every shard claim and release GPUs without a lock or a central thread,
//! checked with loom in `symphony-verify`; and [`shared_gpus`], which lets the core's deferred
//! scheduler plan on that table unchanged. The glommio thread-per-core shards, the io_uring
//! front door, routing to each model's owning shard and the executor links are not built yet
//! (see ARCHITECTURE.md and the issue "The scheduler service").

pub mod client;
pub mod config;
pub mod executors;
#[cfg(feature = "runtime")]
pub mod runtime;
#[cfg(feature = "runtime")]
pub mod server;
pub mod shared_gpus;
pub mod sync;
