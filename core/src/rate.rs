//! The arrival-rate meter: a sliding window of fixed samples (50 ms samples over 5 s).
//!
//! Virtual time only: the caller passes `now_ns`. The rate is the mean over the completed
//! samples in the window, so it is defined once the first sample has completed.

#[derive(Debug, Clone)]
pub struct RateMeter {
    sample_ns: u64,
    /// Counts of completed samples, a ring indexed by absolute sample index modulo its length.
    ring: Box<[u32]>,
    /// Absolute index of the sample now being counted.
    current_index: u64,
    current_count: u32,
    /// Sum of `ring` over the completed samples in the window.
    window_sum: u64,
    completed_count: u32,
}

impl RateMeter {
    pub fn new(sample_ns: u64, window_ns: u64) -> RateMeter {
        assert!(sample_ns > 0);
        assert!(window_ns >= sample_ns);
        let len = (window_ns / sample_ns) as usize;
        RateMeter {
            sample_ns,
            ring: vec![0; len].into_boxed_slice(),
            current_index: 0,
            current_count: 0,
            window_sum: 0,
            completed_count: 0,
        }
    }

    /// Counts one arrival at `now_ns`. Returns true when a sample boundary was crossed.
    #[inline]
    pub fn record(&mut self, now_ns: u64) -> bool {
        let rolled = self.advance(now_ns);
        self.current_count = self.current_count.saturating_add(1);
        rolled
    }

    /// Moves the window to `now_ns`. Returns true when a sample boundary was crossed.
    #[inline]
    pub fn advance(&mut self, now_ns: u64) -> bool {
        let index = now_ns / self.sample_ns;
        if index <= self.current_index {
            return false;
        }
        let len = self.ring.len() as u64;
        // Close the current sample, then any empty samples in between (at most one window's).
        let gap = (index - self.current_index).min(len + 1);
        for step in 0..gap {
            let closing = self.current_index + step;
            let count = if step == 0 { self.current_count } else { 0 };
            let slot = (closing % len) as usize;
            if self.completed_count as u64 == len {
                self.window_sum -= u64::from(self.ring[slot]);
            } else {
                self.completed_count += 1;
            }
            self.ring[slot] = count;
            self.window_sum += u64::from(count);
        }
        self.current_index = index;
        self.current_count = 0;
        true
    }

    /// Mean rate over the completed samples in the window, requests per second.
    #[inline]
    pub fn rate_rps(&self) -> Option<f64> {
        if self.completed_count == 0 {
            return None;
        }
        let seconds = f64::from(self.completed_count) * self.sample_ns as f64 / 1e9;
        Some(self.window_sum as f64 / seconds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    #[test]
    fn no_rate_before_the_first_sample_completes() {
        let mut m = RateMeter::new(50 * MS, 5_000 * MS);
        m.record(MS);
        assert_eq!(m.rate_rps(), None);
        m.advance(50 * MS);
        // One arrival in one 50 ms sample = 20 req/s.
        assert!((m.rate_rps().unwrap() - 20.0).abs() < 1e-9);
    }

    #[test]
    fn steady_rate_and_window_slides() {
        let mut m = RateMeter::new(50 * MS, 5_000 * MS);
        // 1000 req/s for 10 s: one arrival per ms.
        for t in 0..10_000 {
            m.record(t * MS);
        }
        m.advance(10_000 * MS);
        assert!((m.rate_rps().unwrap() - 1000.0).abs() < 1e-6);
        // Silence for 2.5 s: half the window is empty.
        m.advance(12_500 * MS);
        assert!((m.rate_rps().unwrap() - 500.0).abs() < 1e-6);
        // Long silence clears the window.
        m.advance(100_000 * MS);
        assert_eq!(m.rate_rps(), Some(0.0));
    }
}
