//! Clock offset between the scheduler and an executor, estimated at the handshake.
//!
//! The executor sends several timestamped probes; the scheduler stamps each with its own clock
//! and echoes it back. For one probe sent at `t0` and received back at `t1` (executor clock),
//! stamped `ts` by the scheduler, `offset = ts - (t0 + t1) / 2` with an error of at most half
//! the round trip. The probe with the least round trip wins (NTP's rule). Deadlines and
//! `exec_at` are on the scheduler's clock; the executor converts with [`Offset::to_local_ns`].

/// One probe, times in nanoseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub sent_local_ns: u64,
    pub scheduler_ns: u64,
    pub received_local_ns: u64,
}

/// `scheduler clock - executor clock`, and how far off it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offset {
    pub offset_ns: i64,
    /// Half the winning probe's round trip.
    pub error_bound_ns: u64,
}

impl Offset {
    /// A scheduler time on the executor's clock (saturating at 0).
    pub fn to_local_ns(self, scheduler_ns: u64) -> u64 {
        (i128::from(scheduler_ns) - i128::from(self.offset_ns)).max(0) as u64
    }

    /// An executor time on the scheduler's clock (saturating at 0).
    pub fn to_scheduler_ns(self, local_ns: u64) -> u64 {
        (i128::from(local_ns) + i128::from(self.offset_ns)).max(0) as u64
    }
}

/// The offset from the probe with the least round trip; `None` with no valid probe (a probe
/// received before it was sent is invalid and ignored).
pub fn estimate_offset(probes: &[Probe]) -> Option<Offset> {
    let best = probes
        .iter()
        .filter(|p| p.received_local_ns >= p.sent_local_ns)
        .min_by_key(|p| p.received_local_ns - p.sent_local_ns)?;
    let midpoint = (i128::from(best.sent_local_ns) + i128::from(best.received_local_ns)) / 2;
    Some(Offset {
        offset_ns: (i128::from(best.scheduler_ns) - midpoint) as i64,
        error_bound_ns: (best.received_local_ns - best.sent_local_ns) / 2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_round_trip_wins() {
        // The scheduler's clock is 1 s ahead. Probe 1 has a slow return leg (skewed), probe 2
        // is quick and symmetric.
        let probes = [
            Probe {
                sent_local_ns: 1_000,
                scheduler_ns: 1_000_000_000 + 1_100,
                received_local_ns: 3_000,
            },
            Probe {
                sent_local_ns: 10_000,
                scheduler_ns: 1_000_000_000 + 10_050,
                received_local_ns: 10_100,
            },
        ];
        let offset = estimate_offset(&probes).unwrap();
        assert_eq!(offset.offset_ns, 1_000_000_000);
        assert_eq!(offset.error_bound_ns, 50);
        assert_eq!(offset.to_local_ns(1_000_005_000), 5_000);
        assert_eq!(offset.to_scheduler_ns(5_000), 1_000_005_000);
    }

    #[test]
    fn no_valid_probe_no_offset() {
        assert_eq!(estimate_offset(&[]), None);
        let backwards = Probe {
            sent_local_ns: 10,
            scheduler_ns: 5,
            received_local_ns: 5,
        };
        assert_eq!(estimate_offset(&[backwards]), None);
    }
}
