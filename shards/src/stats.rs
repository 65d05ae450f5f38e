//! The service's counters, shared by every shard.

use std::sync::Mutex;

use hdrhistogram::Histogram;

/// The longest arrival-to-decision time recorded (longer ones are recorded as this).
pub const DECISION_NS_MAX: u64 = 60_000_000_000;
/// A shard records every this many requests' arrival-to-decision time.
pub const DECISION_SAMPLE_EVERY: u32 = 16;

/// Counters of the whole service (all shards), for tests and operators.
#[derive(Debug, Default)]
pub struct Stats {
    /// Request frames accepted from clients.
    pub requests: std::sync::atomic::AtomicU64,
    /// Queued requests removed because their client went away.
    pub cancelled: std::sync::atomic::AtomicU64,
    /// Requests answered `overloaded` (a shard's request table was full, the model was
    /// swamped, or the shard was behind the connection).
    pub overloaded: std::sync::atomic::AtomicU64,
    /// Of those, requests shed because the shard was behind their connection.
    pub shed: std::sync::atomic::AtomicU64,
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
    /// Connections to a TLS port closed before serving: a failed or timed-out TLS handshake,
    /// or plain text (told so in its protocol).
    pub tls_handshake_failures: std::sync::atomic::AtomicU64,
    /// Sampled arrival-to-decision times, merged from every shard as it stops.
    pub decision: DecisionLatency,
    /// Nanoseconds the shards spent handling their inputs and carrying out the effects, added
    /// by each shard as it stops: their own work, without the reactor's, the system calls'
    /// or the waits (a shard's process time counts those too).
    pub shard_work_ns: std::sync::atomic::AtomicU64,
}

/// The scheduling overhead a request sees: from the read that brought its frame to the end
/// of its handling by the shard's core (for a model of this shard, its scheduler's decision:
/// queued in a window, planned, dropped or refused; for another shard's, its hand-off to the
/// mesh). Each shard samples every [`DECISION_SAMPLE_EVERY`]th request into a histogram of
/// its own (no allocation, no sharing) and merges it here when it stops.
#[derive(Debug)]
pub struct DecisionLatency {
    merged: Mutex<Histogram<u64>>,
}

/// Percentiles of the sampled arrival-to-decision times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecisionSummary {
    pub samples: u64,
    pub p50_ns: u64,
    pub p99_ns: u64,
    pub max_ns: u64,
}

impl DecisionLatency {
    /// An empty histogram for a shard's samples (1 ns to [`DECISION_NS_MAX`], 3 digits).
    pub fn histogram() -> Histogram<u64> {
        Histogram::new_with_bounds(1, DECISION_NS_MAX, 3).expect("valid bounds")
    }

    /// Adds a shard's samples.
    pub fn merge(&self, shard: &Histogram<u64>) {
        let mut merged = self.merged.lock().unwrap_or_else(|e| e.into_inner());
        // Same bounds on both sides: the add cannot fail.
        let _ = merged.add(shard);
    }

    /// What the stopped shards sampled (`None`: no sample yet).
    pub fn summary(&self) -> Option<DecisionSummary> {
        let merged = self.merged.lock().unwrap_or_else(|e| e.into_inner());
        (!merged.is_empty()).then(|| DecisionSummary {
            samples: merged.len(),
            p50_ns: merged.value_at_quantile(0.5),
            p99_ns: merged.value_at_quantile(0.99),
            max_ns: merged.max(),
        })
    }
}

impl Default for DecisionLatency {
    fn default() -> DecisionLatency {
        DecisionLatency {
            merged: Mutex::new(DecisionLatency::histogram()),
        }
    }
}
