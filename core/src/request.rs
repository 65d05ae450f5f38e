//! Requests as the scheduler sees them: who, when, and by when.
//!
//! A request here is only its scheduling facts. Input bytes, client ids and connections belong
//! to the service (`symphony-shards`); the core orders and batches these small values.

/// One inference request, validated: the model exists and the deadline is absolute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Unique within one scheduler (the simulator uses the arrival index).
    pub id: u64,
    /// Index of the model in the scheduler's model table.
    pub model: u32,
    pub arrival_ns: u64,
    /// `D_r = arrival + slo - d_resp`: the batch must finish by then for the reply to be in time.
    pub deadline_ns: u64,
}

/// A request's deadline `D_r = arrival + slo - d_resp`: when its batch must finish for the
/// reply to reach the client within its SLO. The one place it is computed (the simulator,
/// the service and the audits all call it).
#[inline]
pub fn deadline_ns(arrival_ns: u64, slo_ns: u64, d_resp_ns: u64) -> u64 {
    arrival_ns.saturating_add(slo_ns).saturating_sub(d_resp_ns)
}

impl Request {
    /// The queue order: earliest deadline first, FIFO (by id) on ties.
    #[inline]
    pub fn order_key(&self) -> (u64, u64) {
        (self.deadline_ns, self.id)
    }
}
