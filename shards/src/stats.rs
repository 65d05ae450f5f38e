//! The service's counters, shared by every shard.

/// Counters of the whole service (all shards), for tests and operators.
#[derive(Debug, Default)]
pub struct Stats {
    /// Request frames accepted from clients.
    pub requests: std::sync::atomic::AtomicU64,
    /// Queued requests removed because their client went away.
    pub cancelled: std::sync::atomic::AtomicU64,
    /// Requests answered `overloaded` (a shard's request table was full).
    pub overloaded: std::sync::atomic::AtomicU64,
    /// Batches planned (embedded and external executors).
    pub plans: std::sync::atomic::AtomicU64,
    /// GPUs a release reserved for another shard's waiting candidate (cross-shard EDF).
    pub handoffs: std::sync::atomic::AtomicU64,
    /// Plans sent to external executors.
    pub executor_plans: std::sync::atomic::AtomicU64,
    /// External executors lost (closed links, missed heartbeats, broken protocol).
    pub executors_lost: std::sync::atomic::AtomicU64,
    /// Requests of a lost executor's plans planned again.
    pub replanned: std::sync::atomic::AtomicU64,
    /// Plans an executor did not report within the plan timeout.
    pub plans_timed_out: std::sync::atomic::AtomicU64,
    /// Link writes sent zero-copy (io_uring SENDMSG_ZC), and their bytes.
    pub zero_copy_sends: std::sync::atomic::AtomicU64,
    pub zero_copy_bytes: std::sync::atomic::AtomicU64,
    /// Link writes that had to be copied instead (no ring, or the kernel refused).
    pub zero_copy_fallbacks: std::sync::atomic::AtomicU64,
    /// Connections refused at a port's limit (an ERROR `OVERLOADED`, then the close).
    pub connections_refused: std::sync::atomic::AtomicU64,
    /// Failed accepts (descriptors or memory exhausted), each followed by a back-off.
    pub accept_errors: std::sync::atomic::AtomicU64,
    /// Times a client connection was not read because of its limits or the mesh's backlog.
    pub backpressure_waits: std::sync::atomic::AtomicU64,
    /// Link connections closed for not joining within the handshake timeout.
    pub handshake_timeouts: std::sync::atomic::AtomicU64,
}
