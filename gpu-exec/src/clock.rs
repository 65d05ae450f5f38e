//! Clock offset between the scheduler and an executor, estimated at the handshake and then
//! continuously.
//!
//! The executor sends several timestamped probes; the scheduler stamps each with its own clock
//! and echoes it back. For one probe sent at `t0` and received back at `t1` (executor clock),
//! stamped `ts` by the scheduler, `offset = ts - (t0 + t1) / 2` with an error of at most half
//! the round trip. The probe with the least round trip wins (NTP's rule). Deadlines and
//! `exec_at` are on the scheduler's clock; the executor converts with [`Offset::to_local_ns`].
//!
//! Clocks drift (20 ppm uses up a 5 ms late bound in about four minutes), so the handshake's
//! estimate does not last: every heartbeat the scheduler answers is a probe too (its answer
//! echoes the executor's send time), and [`OffsetTracker`] keeps the least round trip among
//! the most recent ones only, so the estimate is never older than a few heartbeats.

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

/// The offset from a stream of probes (the handshake's, then heartbeat round trips).
///
/// Each probe bounds the offset to within half its round trip when it was taken; as it ages,
/// the clocks drift apart by up to [`DRIFT_PPM_BOUND`] of the time since. The estimate is
/// the probe whose bound is tightest now (NTP's rule with aging): a fresh probe with a short
/// round trip wins, a heartbeat that came back slowly (a busy scheduler) does not replace a
/// better older one, and an old one gives way as it ages. The most recent `window` probes
/// are kept, and the best of those that left the window.
#[derive(Debug)]
pub struct OffsetTracker {
    recent: std::collections::VecDeque<Probe>,
    window: usize,
    /// The best probe that left `recent` (by its bound when it left).
    older: Option<Probe>,
}

/// How fast two clocks may drift apart, at most, in parts per million (NTP assumes 500).
pub const DRIFT_PPM_BOUND: u64 = 500;

/// A probe's bound on the offset at local time `now_ns`: half its round trip, plus the drift
/// since it was taken.
fn bound_at(probe: &Probe, now_ns: u64) -> Option<u64> {
    let round_trip = probe.received_local_ns.checked_sub(probe.sent_local_ns)?;
    let age = now_ns.saturating_sub(probe.received_local_ns);
    Some(round_trip / 2 + age / 1_000_000 * DRIFT_PPM_BOUND + age % 1_000_000 * DRIFT_PPM_BOUND / 1_000_000)
}

impl OffsetTracker {
    /// Keeps the last `window` probes (at least 1) and the best older one.
    pub fn new(window: usize) -> OffsetTracker {
        OffsetTracker {
            recent: std::collections::VecDeque::with_capacity(window.max(1)),
            window: window.max(1),
            older: None,
        }
    }

    /// Adds a probe; the estimate at its receipt.
    pub fn record(&mut self, probe: Probe) -> Option<Offset> {
        let now_ns = probe.received_local_ns;
        if self.recent.len() == self.window {
            let left = self.recent.pop_front().expect("full");
            let better = match (&self.older, bound_at(&left, now_ns)) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(older), Some(bound)) => bound_at(older, now_ns).is_none_or(|b| bound < b),
            };
            if better {
                self.older = Some(left);
            }
        }
        self.recent.push_back(probe);
        self.estimate(now_ns)
    }

    /// The offset from the probe with the tightest bound at local time `now_ns`.
    pub fn estimate(&self, now_ns: u64) -> Option<Offset> {
        let (best, bound) = self
            .recent
            .iter()
            .chain(self.older.iter())
            .filter_map(|p| Some((p, bound_at(p, now_ns)?)))
            .min_by_key(|&(_, bound)| bound)?;
        let midpoint = (i128::from(best.sent_local_ns) + i128::from(best.received_local_ns)) / 2;
        Some(Offset {
            offset_ns: (i128::from(best.scheduler_ns) - midpoint) as i64,
            error_bound_ns: bound,
        })
    }
}

/// The current offset, shared by the threads that convert times (readers write it).
#[derive(Debug)]
pub struct SharedOffset {
    offset_ns: std::sync::atomic::AtomicI64,
    error_bound_ns: std::sync::atomic::AtomicU64,
}

impl SharedOffset {
    pub fn new(offset: Offset) -> SharedOffset {
        SharedOffset {
            offset_ns: std::sync::atomic::AtomicI64::new(offset.offset_ns),
            error_bound_ns: std::sync::atomic::AtomicU64::new(offset.error_bound_ns),
        }
    }

    /// The latest estimate (its two fields are each current; a torn pair only mixes two
    /// estimates a heartbeat apart).
    pub fn load(&self) -> Offset {
        Offset {
            offset_ns: self.offset_ns.load(std::sync::atomic::Ordering::Relaxed),
            error_bound_ns: self.error_bound_ns.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    pub fn store(&self, offset: Offset) {
        self.offset_ns
            .store(offset.offset_ns, std::sync::atomic::Ordering::Relaxed);
        self.error_bound_ns
            .store(offset.error_bound_ns, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The executor's clock: nanoseconds since it started, optionally running at a skewed rate
/// (`skew_ppm`, for tests of clock drift; 0 in service).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: std::time::Instant,
    rate: f64,
}

impl Clock {
    pub fn new(skew_ppm: f64) -> Clock {
        Clock {
            epoch: std::time::Instant::now(),
            rate: 1.0 + skew_ppm * 1e-6,
        }
    }

    pub fn now_ns(&self) -> u64 {
        let elapsed = self.epoch.elapsed().as_nanos() as u64;
        if self.rate == 1.0 {
            elapsed
        } else {
            (elapsed as f64 * self.rate) as u64
        }
    }

    /// How long `local_ns` of this clock take in real time.
    pub fn real_duration(&self, local_ns: u64) -> std::time::Duration {
        std::time::Duration::from_nanos((local_ns as f64 / self.rate) as u64)
    }
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
    fn the_tracker_follows_a_drifting_clock() {
        // The executor's clock runs 2000 ppm slow: the true offset grows by 2 us per ms.
        let mut tracker = OffsetTracker::new(4);
        let mut last = None;
        for i in 0..100u64 {
            let scheduler_ns = i * 100_000_000;
            let local_ns = scheduler_ns - scheduler_ns / 500;
            let probe = Probe {
                sent_local_ns: local_ns - 20_000,
                scheduler_ns,
                received_local_ns: local_ns + 20_000,
            };
            last = tracker.record(probe);
        }
        // After 9.9 s the true offset is 19.8 ms; the estimate is within a few heartbeats.
        let offset = last.unwrap();
        let truth = 9_900_000_000i64 / 500;
        assert!((offset.offset_ns - truth).abs() <= 4 * 200_000, "{offset:?} vs {truth}");
    }

    #[test]
    fn a_slow_round_trip_does_not_replace_a_good_estimate() {
        // A tight handshake probe (true offset 1 s), then heartbeats whose answers came back
        // slowly and lopsided (the scheduler was busy): the tight probe keeps winning while
        // its drift allowance is below their half round trips.
        let mut tracker = OffsetTracker::new(4);
        tracker.record(Probe {
            sent_local_ns: 1_000_000,
            scheduler_ns: 1_001_010_000,
            received_local_ns: 1_020_000,
        });
        for i in 1..=20u64 {
            let sent = 1_000_000 + i * 100_000_000;
            let offset = tracker
                .record(Probe {
                    sent_local_ns: sent,
                    scheduler_ns: 1_000_000_000 + sent + 19_000_000,
                    received_local_ns: sent + 20_000_000,
                })
                .unwrap();
            assert!((offset.offset_ns - 1_000_000_000).abs() <= 10_000, "{i}: {offset:?}");
        }
    }

    #[test]
    fn a_skewed_clock_runs_at_its_rate() {
        let clock = Clock::new(-500_000.0);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let now = clock.now_ns();
        assert!((9_000_000..20_000_000).contains(&now), "{now}");
        assert_eq!(clock.real_duration(1_000_000), std::time::Duration::from_millis(2));
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
