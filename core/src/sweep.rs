//! Searches over simulations: the goodput (largest load at a bad rate bound) and the fewest
//! GPUs for a load. Pure: the caller supplies the evaluation, usually a simulation.
//!
//! Both searches assume the bad rate grows with load and shrinks with GPUs. Near the edge a
//! simulation is noisy, so a bisection finds *a* crossing, not the only one; the step count is
//! fixed so results are reproducible.

/// The bad-rate bound of the goodput definition, percent.
pub const BAD_RATE_BOUND_PERCENT: f64 = 1.0;
/// Bisection steps of the goodput search after the bracket is found.
pub const GOODPUT_STEPS: u32 = 12;
/// The largest rate scale the goodput search tries.
pub const RATE_SCALE_LIMIT: f64 = 4096.0;
/// The most GPUs the GPU search tries.
pub const GPU_SEARCH_LIMIT: u32 = 65_536;

/// One evaluated point of a search.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Probe {
    pub rate_scale: f64,
    pub gpu_count: u32,
    pub bad_rate_percent: f64,
}

/// The largest rate scale whose bad rate stays within `bound_percent`, found by doubling from
/// `start_scale` to bracket the edge, then bisecting. `evaluate(scale)` returns the bad rate.
/// Returns 0 when even the smallest load tried fails.
pub fn find_goodput_scale(start_scale: f64, bound_percent: f64, mut evaluate: impl FnMut(f64) -> f64) -> f64 {
    assert!(start_scale > 0.0 && start_scale.is_finite());
    let mut ok = 0.0;
    let mut bad = start_scale;
    // Bracket: double while good, halve while bad.
    if evaluate(start_scale) <= bound_percent {
        ok = start_scale;
        bad = start_scale * 2.0;
        while bad <= RATE_SCALE_LIMIT && evaluate(bad) <= bound_percent {
            ok = bad;
            bad *= 2.0;
        }
        if bad > RATE_SCALE_LIMIT {
            return ok;
        }
    } else {
        let mut probe = start_scale / 2.0;
        for _ in 0..GOODPUT_STEPS {
            if evaluate(probe) <= bound_percent {
                ok = probe;
                break;
            }
            bad = probe;
            probe /= 2.0;
        }
        if ok == 0.0 {
            return 0.0;
        }
    }
    for _ in 0..GOODPUT_STEPS {
        let mid = (ok + bad) / 2.0;
        if evaluate(mid) <= bound_percent {
            ok = mid;
        } else {
            bad = mid;
        }
    }
    ok
}

/// The fewest GPUs whose bad rate stays within `bound_percent`; `None` past the limit.
/// `evaluate(gpus)` returns the bad rate.
pub fn find_fewest_gpus(bound_percent: f64, mut evaluate: impl FnMut(u32) -> f64) -> Option<u32> {
    let mut bad = 0u32;
    let mut ok = 1u32;
    while evaluate(ok) > bound_percent {
        bad = ok;
        ok = ok.checked_mul(2).filter(|&g| g <= GPU_SEARCH_LIMIT)?;
    }
    while ok - bad > 1 {
        let mid = bad + (ok - bad) / 2;
        if evaluate(mid) <= bound_percent {
            ok = mid;
        } else {
            bad = mid;
        }
    }
    Some(ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goodput_search_finds_a_step_edge() {
        let mut calls = 0;
        let scale = find_goodput_scale(1.0, 1.0, |s| {
            calls += 1;
            if s <= 1.37 {
                0.5
            } else {
                20.0
            }
        });
        assert!((scale - 1.37).abs() < 2.0 / 4096.0 * 2.0, "{scale}");
        assert!(calls < 30);
        // Starting above the edge halves down first.
        let scale = find_goodput_scale(8.0, 1.0, |s| if s <= 0.3 { 0.0 } else { 5.0 });
        assert!((scale - 0.3).abs() < 0.01, "{scale}");
        assert_eq!(find_goodput_scale(1.0, 1.0, |_| 50.0), 0.0);
    }

    #[test]
    fn gpu_search_finds_the_fewest() {
        for need in [1, 2, 3, 7, 8, 9, 100] {
            assert_eq!(find_fewest_gpus(1.0, |g| if g >= need { 0.0 } else { 9.0 }), Some(need));
        }
        assert_eq!(find_fewest_gpus(1.0, |_| 9.0), None);
    }
}
