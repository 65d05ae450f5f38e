//! The latency profiler: measures `l(b)` of one model on one backend for `b = 1..=B` and
//! writes the core's profile table (`batch,latency_us,std_us`; the scheduler plans with
//! `mean + std`).
//!
//! Each batch size runs `warmup` times unmeasured, then `repeat` times measured; the table
//! gets the mean and the sample standard deviation. A least-squares line `l(b) = slope * b +
//! intercept` over the means is reported with its RMS error, for comparing with the linear
//! `sleep#slope,intercept` profiles of the workload files.

use std::time::Instant;

use symphony_core::profile::Profile;

use crate::backend::{Backend, BatchOutput};

/// What one profiling run measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// Per batch size `b` (index `b - 1`): mean and standard deviation, microseconds.
    pub mean_us: Vec<f64>,
    pub std_us: Vec<f64>,
    pub slope_us: f64,
    pub intercept_us: f64,
    /// RMS distance of the means from the fitted line.
    pub fit_rms_us: f64,
}

impl Measured {
    /// The core's table format.
    pub fn to_table(&self, comment: &str) -> String {
        let mut text = format!("# {comment}\nbatch,latency_us,std_us\n");
        for (index, (mean, std)) in self.mean_us.iter().zip(&self.std_us).enumerate() {
            text.push_str(&format!("{},{mean:.1},{std:.1}\n", index + 1));
        }
        text
    }

    /// The profile the scheduler plans with (`mean + std` per batch size).
    pub fn to_profile(&self) -> Profile {
        Profile::parse_table(&self.to_table("measured"), "measured").expect("a measured table parses")
    }
}

/// Measures `backend` running `model` on copies of `input` for `b = 1..=batch_max`.
pub fn measure(
    backend: &mut dyn Backend,
    model: u32,
    input: &[u8],
    batch_max: u32,
    warmup: u32,
    repeat: u32,
) -> Result<Measured, String> {
    assert!(batch_max >= 1 && repeat >= 1);
    let mut out = BatchOutput::default();
    let mut mean_us = Vec::with_capacity(batch_max as usize);
    let mut std_us = Vec::with_capacity(batch_max as usize);
    let mut samples = Vec::with_capacity(repeat as usize);
    for b in 1..=batch_max {
        let inputs = vec![input; b as usize];
        samples.clear();
        for round in 0..warmup + repeat {
            out.clear();
            let started = Instant::now();
            backend.run(model, &inputs, &mut out)?;
            let us = started.elapsed().as_secs_f64() * 1e6;
            if !out.refused.is_empty() {
                return Err(format!("the model refused the profiling input: {}", out.message));
            }
            if round >= warmup {
                samples.push(us);
            }
        }
        let n = samples.len() as f64;
        let mean = samples.iter().sum::<f64>() / n;
        let variance = if samples.len() > 1 {
            samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / (n - 1.0)
        } else {
            0.0
        };
        mean_us.push(mean);
        std_us.push(variance.sqrt());
    }
    let (slope_us, intercept_us, fit_rms_us) = fit_line(&mean_us);
    Ok(Measured {
        mean_us,
        std_us,
        slope_us,
        intercept_us,
        fit_rms_us,
    })
}

/// Least squares of `y[b - 1]` against `b`: `(slope, intercept, rms error)`.
pub fn fit_line(y: &[f64]) -> (f64, f64, f64) {
    let n = y.len() as f64;
    if y.len() < 2 {
        return (0.0, y.first().copied().unwrap_or(0.0), 0.0);
    }
    let xs = (1..=y.len()).map(|b| b as f64);
    let mean_x = xs.clone().sum::<f64>() / n;
    let mean_y = y.iter().sum::<f64>() / n;
    let sxy: f64 = xs.clone().zip(y).map(|(x, y)| (x - mean_x) * (y - mean_y)).sum();
    let sxx: f64 = xs.clone().map(|x| (x - mean_x).powi(2)).sum();
    let slope = sxy / sxx;
    let intercept = mean_y - slope * mean_x;
    let rms = (xs
        .zip(y)
        .map(|(x, y)| (y - (slope * x + intercept)).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    (slope, intercept, rms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{ModelSpec, SimBackend};

    #[test]
    fn a_line_is_fitted_exactly() {
        let (slope, intercept, rms) = fit_line(&[12.0, 14.0, 16.0, 18.0]);
        assert!((slope - 2.0).abs() < 1e-9 && (intercept - 10.0).abs() < 1e-9 && rms < 1e-9);
    }

    #[test]
    fn the_sim_backend_profiles_as_its_profile() {
        let spec = ModelSpec {
            id: 0,
            name: "m".to_string(),
            slo_ns: 1_000_000_000,
            // 1 ms + 0.5 ms per request.
            profile: Profile::from_latencies_ns(vec![1_500_000, 2_000_000, 2_500_000], 0, 0),
        };
        let mut backend = SimBackend::new(&[spec]);
        let measured = measure(&mut backend, 0, b"x", 3, 1, 3).unwrap();
        assert!((measured.slope_us - 500.0).abs() < 100.0, "{measured:?}");
        assert!((measured.intercept_us - 1000.0).abs() < 200.0, "{measured:?}");
        let profile = measured.to_profile();
        assert_eq!(profile.batch_size_max(), 3);
        assert!(profile.latency_ns(1) >= 1_500_000);
        assert!(measured.to_table("t").starts_with("# t\nbatch,latency_us,std_us\n1,"));
    }
}
