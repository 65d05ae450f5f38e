//! symphony-gpu-exec: the executor process (not built yet).
//!
//! This crate will hold the plan follower and the backends (`sim`, `cpu`, `cuda` via cudarc)
//! and the latency profiler (see ARCHITECTURE.md). Today it is empty on purpose: the
//! simulator's fake GPUs in `symphony-core::sim` stand in for executors.
