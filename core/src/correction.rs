//! Online correction of a model's profile from measured batch durations (Clockwork's way):
//! per model and batch-size range, a sliding window of how long batches really ran against
//! what the start-up profile said, and the profile the scheduler plans with from then on:
//! each batch size's time times the high percentile of its range's ratios.
//!
//! Ranges are powers of two (1, 2, 3-4, 5-8, ...): batches of nearby sizes share their
//! error (a cold start, a slower GPU, contention). A range with too few measurements takes
//! the factor of the nearest range that has them; with none at all the profile is left as it
//! is. The corrected profile is never faster than the measurements say, and is forced
//! monotone like any profile.

use crate::profile::Profile;

/// Measurements kept per batch-size range (the sliding window).
pub const WINDOW: usize = 128;
/// Measurements a range needs before its factor counts.
pub const SAMPLES_MIN: usize = 8;
/// The percentile of the window's ratios planned with.
pub const PERCENTILE: f64 = 0.99;
/// A model's profile is recomputed after this many of its batches.
pub const RECOMPUTE_EVERY: u32 = 16;
/// Factors closer than this to the current ones do not change the profile.
const CHANGE_MIN: f64 = 0.01;
/// Bounds of a factor (a measurement far outside is a fault, not the model's speed).
const FACTOR_MIN: f64 = 0.25;
const FACTOR_MAX: f64 = 16.0;
/// Ranges: batch sizes up to 2^(RANGES - 1) and beyond in the last.
const RANGES: usize = 12;

/// The range of batch size `b`: 0 for 1, 1 for 2, 2 for 3-4, 3 for 5-8, ...
fn range_of(batch_size: u32) -> usize {
    let b = batch_size.max(1);
    ((u32::BITS - (b - 1).leading_zeros()) as usize).min(RANGES - 1)
}

/// The measurements of one model.
#[derive(Debug, Clone)]
pub struct Corrector {
    /// The profile measurements are compared with (the executor's start-up one).
    base: Profile,
    /// Per range: the last ratios measured / planned.
    ratios: Ratios,
    /// The factors of the profile in use, per range.
    factors: Vec<f64>,
    /// Times the profile was changed.
    pub updates: u64,
}

/// Per key (a batch-size range, an idle-gap bucket): a sliding window of the last ratios of
/// measured to planned times, oldest overwritten first, and the count since the factors were
/// last due.
#[derive(Debug, Clone)]
struct Ratios {
    windows: Vec<Vec<f64>>,
    next: Vec<usize>,
    since_recompute: u32,
    measured: u64,
}

impl Ratios {
    fn new(keys: usize) -> Ratios {
        Ratios {
            windows: (0..keys).map(|_| Vec::with_capacity(WINDOW)).collect(),
            next: vec![0; keys],
            since_recompute: 0,
            measured: 0,
        }
    }

    /// Records a batch of `key` that ran `measured_ns` against a planned `planned_ns`. Every
    /// `RECOMPUTE_EVERY` batches, with any key measured enough, returns each key's factor:
    /// its window's high percentile, or the nearest measured key's (`ties_up`: the higher
    /// key on a tie, else the lower).
    fn record(&mut self, key: usize, planned_ns: u64, measured_ns: u64, ties_up: bool) -> Option<Vec<f64>> {
        let ratio = (measured_ns as f64 / planned_ns.max(1) as f64).clamp(FACTOR_MIN, FACTOR_MAX);
        let window = &mut self.windows[key];
        if window.len() < WINDOW {
            window.push(ratio);
        } else {
            window[self.next[key]] = ratio;
        }
        self.next[key] = (self.next[key] + 1) % WINDOW;
        self.measured += 1;
        self.since_recompute += 1;
        if self.since_recompute < RECOMPUTE_EVERY {
            return None;
        }
        self.since_recompute = 0;
        let measured: Vec<Option<f64>> = self
            .windows
            .iter()
            .map(|w| (w.len() >= SAMPLES_MIN).then(|| percentile(w, PERCENTILE)))
            .collect();
        if measured.iter().all(Option::is_none) {
            return None;
        }
        let keys = measured.len();
        let tie = |other: usize| if ties_up { keys - other } else { other };
        Some(
            (0..keys)
                .map(|key| {
                    (0..keys)
                        .filter_map(|other| measured[other].map(|f| (key.abs_diff(other), tie(other), f)))
                        .min_by_key(|&(distance, tie, _)| (distance, tie))
                        .map_or(1.0, |(_, _, f)| f)
                })
                .collect(),
        )
    }
}

/// Whether `new` factors differ from `old` by more than `CHANGE_MIN` anywhere.
fn changed(new: &[f64], old: &[f64]) -> bool {
    new.iter()
        .zip(old)
        .any(|(new, old)| (new - old).abs() > CHANGE_MIN * old)
}

impl Corrector {
    pub fn new(base: Profile) -> Corrector {
        Corrector {
            base,
            ratios: Ratios::new(RANGES),
            factors: vec![1.0; RANGES],
            updates: 0,
        }
    }

    /// Batches measured.
    pub fn measured(&self) -> u64 {
        self.ratios.measured
    }

    /// The profile measurements are compared with.
    pub fn base(&self) -> &Profile {
        &self.base
    }

    /// A new base (an executor registered its own profile): the measurements so far were of
    /// another one and are dropped.
    pub fn rebase(&mut self, base: Profile) {
        let (updates, measured) = (self.updates, self.ratios.measured);
        *self = Corrector::new(base);
        self.updates = updates;
        self.ratios.measured = measured;
    }

    /// The factor planned with for batches of `batch_size` (1.0 before any correction).
    pub fn factor(&self, batch_size: u32) -> f64 {
        self.factors[range_of(batch_size)]
    }

    /// Records a batch of `batch_size` that ran `measured_ns`. Returns the profile to plan
    /// with from now on when it changed.
    pub fn record(&mut self, batch_size: u32, measured_ns: u64) -> Option<Profile> {
        let planned_ns = self.base.exec_ns_checked(batch_size)?;
        // A range without enough measurements takes the nearest one's (the smaller on a tie).
        let factors = self
            .ratios
            .record(range_of(batch_size), planned_ns, measured_ns, false)?;
        if !changed(&factors, &self.factors) {
            return None;
        }
        self.factors = factors;
        self.updates += 1;
        Some(self.corrected())
    }

    /// The base profile with each batch size's whole time (pre, run, post) scaled by its
    /// range's factor (`pre` and `post` kept: the scaled part is the run).
    pub fn corrected(&self) -> Profile {
        let (pre, post) = (self.base.pre_ns(), self.base.post_ns());
        let latency = (1..=self.base.batch_size_max())
            .map(|b| {
                let exec = self.base.exec_ns(b) as f64 * self.factor(b);
                (exec.round() as u64).saturating_sub(pre + post).max(1)
            })
            .collect();
        Profile::from_latencies_ns(latency, pre, post)
    }
}

/// What one model's corrector did, for reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CorrectionSummary {
    pub model: u32,
    /// Batches measured, and times the profile changed.
    pub measured: u64,
    pub updates: u64,
    /// The factors planned with at the end, smallest and largest over the ranges.
    pub factor_min: f64,
    pub factor_max: f64,
}

impl Corrector {
    pub fn summary(&self, model: u32) -> CorrectionSummary {
        let (min, max) = self
            .factors
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &f| (lo.min(f), hi.max(f)));
        CorrectionSummary {
            model,
            measured: self.ratios.measured,
            updates: self.updates,
            factor_min: min,
            factor_max: max,
        }
    }
}

/// The `p` quantile of `values` (nearest rank, the higher on a tie).
fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Profile {
        // 1 ms a request plus 4 ms, batches up to 16.
        Profile::from_latencies_ns((1..=16).map(|b| (b * 1_000_000 + 4_000_000) as u64).collect(), 0, 0)
    }

    #[test]
    fn ranges_are_powers_of_two() {
        let ranges: Vec<usize> = [1, 2, 3, 4, 5, 8, 9, 16, 17, 1024]
            .iter()
            .map(|&b| range_of(b))
            .collect();
        assert_eq!(ranges, [0, 1, 2, 2, 3, 3, 4, 4, 5, 10]);
    }

    #[test]
    fn exact_measurements_change_nothing() {
        let mut corrector = Corrector::new(base());
        for i in 0..200u32 {
            let b = 1 + i % 16;
            assert_eq!(corrector.record(b, base().exec_ns(b)), None);
        }
        assert_eq!(corrector.updates, 0);
        assert_eq!(corrector.factor(8), 1.0);
    }

    #[test]
    fn the_profile_follows_the_high_percentile_of_what_was_measured() {
        let mut corrector = Corrector::new(base());
        let mut latest = None;
        // Batches of 8 run 1.5 times their profile, one in ten of them 2 times.
        for i in 0..100u32 {
            let factor = if i % 10 == 0 { 2.0 } else { 1.5 };
            let measured = (base().exec_ns(8) as f64 * factor) as u64;
            if let Some(profile) = corrector.record(8, measured) {
                latest = Some(profile);
            }
        }
        let profile = latest.take().expect("corrected");
        assert_eq!(corrector.factor(8), 2.0, "p99 of the window");
        // Every range takes the only measured one's factor.
        assert_eq!(profile.exec_ns(8), 2 * base().exec_ns(8));
        assert_eq!(profile.exec_ns(1), 2 * base().exec_ns(1));
        // A window slides: 128 batches of 1.5 later, the 2.0s are gone.
        for _ in 0..WINDOW as u32 {
            if let Some(profile) = corrector.record(8, (base().exec_ns(8) as f64 * 1.5) as u64) {
                latest = Some(profile);
            }
        }
        assert_eq!(corrector.factor(8), 1.5);
        assert_eq!(latest.unwrap().exec_ns(8), base().exec_ns(8) * 3 / 2);
    }

    #[test]
    fn ranges_keep_their_own_factors() {
        let mut corrector = Corrector::new(base());
        for _ in 0..64 {
            corrector.record(1, base().exec_ns(1) * 3);
            corrector.record(16, base().exec_ns(16));
        }
        assert_eq!(corrector.factor(1), 3.0);
        assert_eq!(corrector.factor(16), 1.0);
        // Between them: the nearest measured range (2 is nearer 1; 12 is nearer 16).
        assert_eq!(corrector.factor(2), 3.0);
        assert_eq!(corrector.factor(12), 1.0);
        let profile = corrector.corrected();
        assert!(profile.exec_ns(2) >= profile.exec_ns(1), "monotone");
    }
}

/// Idle-gap buckets of [`IdleCorrector`]: a batch whose GPU idled under 0.5 ms, 2 ms, 8 ms,
/// 32 ms before it, or longer.
const IDLE_BOUNDS_NS: [u64; 4] = [500_000, 2_000_000, 8_000_000, 32_000_000];
const IDLE_BUCKETS: usize = IDLE_BOUNDS_NS.len() + 1;

fn idle_bucket(idle_ns: u64) -> usize {
    IDLE_BOUNDS_NS.iter().take_while(|&&bound| idle_ns >= bound).count()
}

/// Online correction keyed on how long a batch's GPU idled before it (a cold start after
/// idling is the error that [`Corrector`]'s batch-size ranges cannot tell apart): per idle
/// bucket, a sliding window of measured / profiled times, and its high percentile as the
/// factor a batch expected to start after such a gap is planned with.
#[derive(Debug, Clone)]
pub struct IdleCorrector {
    ratios: Ratios,
    factors: Vec<f64>,
    pub updates: u64,
}

impl Default for IdleCorrector {
    fn default() -> IdleCorrector {
        IdleCorrector {
            ratios: Ratios::new(IDLE_BUCKETS),
            factors: vec![1.0; IDLE_BUCKETS],
            updates: 0,
        }
    }
}

impl IdleCorrector {
    /// Batches measured.
    pub fn measured(&self) -> u64 {
        self.ratios.measured
    }

    /// The factor for a batch whose GPU idles `idle_ns` before it.
    pub fn factor(&self, idle_ns: u64) -> f64 {
        self.factors[idle_bucket(idle_ns)]
    }

    /// The largest factor of any gap (for timing a batch before its GPU is known).
    pub fn factor_max(&self) -> f64 {
        self.factors.iter().copied().fold(1.0, f64::max)
    }

    /// The smallest and largest factors in use.
    pub fn range(&self) -> (f64, f64) {
        self.factors
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &f| (lo.min(f), hi.max(f)))
    }

    /// A batch that ran `measured_ns` against a profiled `planned_ns`, after its GPU idled
    /// `idle_ns`. Returns true when the factors changed.
    pub fn record(&mut self, idle_ns: u64, planned_ns: u64, measured_ns: u64) -> bool {
        // A bucket without enough measurements takes the nearest one's, the longer gap on a
        // tie (the safer guess).
        let Some(factors) = self.ratios.record(idle_bucket(idle_ns), planned_ns, measured_ns, true) else {
            return false;
        };
        if !changed(&factors, &self.factors) {
            return false;
        }
        self.factors = factors;
        self.updates += 1;
        true
    }
}

#[cfg(test)]
mod idle_tests {
    use super::*;

    #[test]
    fn each_idle_gap_gets_its_own_factor_and_an_empty_bucket_its_nearest() {
        let mut c = IdleCorrector::default();
        assert_eq!(c.factor(0), 1.0);
        // Batches after 10 ms of idling run 2.7 times their profile, back-to-back ones 1.4.
        for i in 0..64u64 {
            let (idle_ns, ratio) = if i % 2 == 0 { (10_000_000, 2.7) } else { (100_000, 1.4) };
            c.record(idle_ns, 1_000_000, (1_000_000.0 * ratio) as u64);
        }
        assert!((c.factor(0) - 1.4).abs() < 1e-9);
        assert!((c.factor(10_000_000) - 2.7).abs() < 1e-9);
        // 0.5 to 2 ms: no data, the nearest is under 0.5 ms; 2 to 8 ms: 8 to 32 ms is nearer.
        assert!((c.factor(1_000_000) - 1.4).abs() < 1e-9);
        assert!((c.factor(4_000_000) - 2.7).abs() < 1e-9);
        assert!((c.factor(u64::MAX) - 2.7).abs() < 1e-9);
        assert!((c.factor_max() - 2.7).abs() < 1e-9);
        assert_eq!(c.measured(), 64);
        assert!(c.updates >= 1);
    }
}
