//! symphony-gpu-exec: the executor process.
//!
//! [`executor`] connects to the scheduler (`symphony executor`), registers its GPUs and
//! models with their profiles, and runs each plan at its `exec_at` on a [`backend`]: one
//! worker thread per GPU with a [`follower`], the clock offset from the handshake's probes
//! ([`clock`]). Backends today: `sim` (runs each batch for its profile time) and [`cpu`]
//! (real forward passes of the [`nets`] networks with ndarray). The `cuda` backend is not
//! built yet.

pub mod backend;
pub mod clock;
pub mod cpu;
pub mod cuda;
pub mod executor;
pub mod follower;
pub mod nets;
pub mod profiler;
