//! symphony-shards: the scheduler service (not built yet).
//!
//! This crate will hold the thread-per-core glommio shards, the io_uring front door, routing
//! to each model's owning shard, the lock-free GPU table in `sync/` and the executor links
//! (see ARCHITECTURE.md and the issue "The scheduler service"). Today it is empty on purpose:
//! the scheduling policies it will run live in `symphony-core` and are exercised by the
//! virtual-time simulator.
