//! Lock-free structures the shards share, behind a std/loom facade.
//!
//! Everything here compiles without glommio. The files use `super::atomic` for their atomics;
//! this module maps it to `std`, and the loom models in `symphony-verify` (`tests/loom_*.rs`)
//! compile the same source files with `super::atomic` mapped to loom's atomics, so the code
//! that is checked is the code that runs.

pub(crate) mod atomic {
    pub(crate) use std::sync::atomic::{fence, AtomicU64, Ordering};

    /// One turn of a wait loop (loom's facade yields to the other modelled threads).
    pub(crate) fn spin_wait() {
        std::hint::spin_loop();
    }
}

pub mod gpu_table;
pub mod lifecycle;
