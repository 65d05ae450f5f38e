//! Time units. Every time in the core is a `u64` of nanoseconds since the run's epoch.

/// Nanoseconds in a millisecond.
pub const MS: u64 = 1_000_000;
/// Nanoseconds in a microsecond.
pub const US: u64 = 1_000;
