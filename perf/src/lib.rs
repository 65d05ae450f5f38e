//! symphony-perf: the benchmark suite.
//!
//! Goodput and GPU-count sweeps over workloads and policies ([`sweep`]), the autoscaling
//! experiment ([`autoscale`]), their SVG plots
//! ([`plot`]), the simulator's own speed ([`throughput`]), and an open-loop load generator for
//! a server speaking the wire protocol ([`loadgen`]), and the in-process stress of the
//! sans-IO shards ([`stress`]). Every report prints the parameters it
//! used; comparisons are ratios within one run.

pub mod autoscale;
pub mod loadgen;
pub mod plot;
pub mod stress;
pub mod sweep;
pub mod throughput;
pub mod virtual_door;
