//! symphony-core: the pure heart of Symphony.
//!
//! Profiles, workloads, request queues, the deferred batch scheduler and its peers, the
//! virtual-time simulator and its metrics. Everything here is a deterministic function of its
//! inputs: no clock reads, no threads, no sockets, no async, no global RNG. Time (`u64`
//! nanoseconds) and seeds are arguments. The service (`symphony-shards`) drives the same policies
//! with real time.

mod names;

pub mod autoscale;
pub mod correction;
pub mod gpu_pool;
pub mod policy;
pub mod prefetch;
pub mod profile;
pub mod rate;
pub mod request;
pub mod sim;
pub mod sweep;
pub mod time;
pub mod timers;
pub mod wire;
pub mod workload;
