//! symphony-perf: the benchmark suite.
//!
//! Goodput and GPU-count sweeps over workloads and policies ([`sweep`]), their SVG plots
//! ([`plot`]), and the simulator's own speed ([`throughput`]). Every report prints the
//! parameters it used; comparisons are ratios within one run.

pub mod plot;
pub mod sweep;
pub mod throughput;
