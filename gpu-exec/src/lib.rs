//! symphony-gpu-exec: the executor process (being built).
//!
//! Today this crate holds the executor's pure building blocks: the per-GPU plan follower
//! ([`follower`]) and the clock-offset estimate made at the handshake ([`clock`]). The
//! executor process itself (connection to the scheduler, the `sim`, `cpu` and `cuda`
//! backends, the profiler) is not built yet (see ARCHITECTURE.md and the issues "The
//! scheduler service" and "Executors that really compute").

pub mod clock;
pub mod follower;
