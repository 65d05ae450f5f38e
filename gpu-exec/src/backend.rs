//! What runs a batch: the backends of an executor.
//!
//! A backend instance belongs to one GPU (one worker thread) and runs one batch at a time.
//! Inputs and outputs are the request and reply bytes; each backend documents its layout.

use std::time::{Duration, Instant};

use symphony_core::profile::Profile;

/// The backends `symphony executor --backend` knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// Runs each batch for its profile's time and echoes the inputs as outputs.
    Sim,
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<BackendKind, String> {
        match s {
            "sim" => Ok(BackendKind::Sim),
            other => Err(format!("unknown backend `{other}` (this build has: sim)")),
        }
    }
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Sim => "sim",
        }
    }
}

/// A model as the scheduler announced it (WELCOME).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelSpec {
    pub id: u32,
    pub name: String,
    pub slo_ns: u64,
    /// The scheduler's profile for it.
    pub profile: Profile,
}

/// Runs batches on one GPU.
pub trait Backend: Send + std::fmt::Debug {
    /// Runs `model` on `inputs` (one per request, in order), appending each output to
    /// `outputs` and its length to `output_lens`. An error fails the whole batch.
    fn run(
        &mut self,
        model: u32,
        inputs: &[&[u8]],
        outputs: &mut Vec<u8>,
        output_lens: &mut Vec<u32>,
    ) -> Result<(), String>;
}

/// The simulated backend: a batch takes its profile's `pre + l(b) + post`, and each output
/// is the request's input (an echo, so a client can check its bytes made the whole trip).
#[derive(Debug)]
pub struct SimBackend {
    profiles: Vec<Option<Profile>>,
}

impl SimBackend {
    pub fn new(models: &[ModelSpec]) -> SimBackend {
        let len = models.iter().map(|m| m.id as usize + 1).max().unwrap_or(0);
        let mut profiles = vec![None; len];
        for m in models {
            profiles[m.id as usize] = Some(m.profile.clone());
        }
        SimBackend { profiles }
    }
}

impl Backend for SimBackend {
    fn run(
        &mut self,
        model: u32,
        inputs: &[&[u8]],
        outputs: &mut Vec<u8>,
        output_lens: &mut Vec<u32>,
    ) -> Result<(), String> {
        let profile = self
            .profiles
            .get(model as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| format!("no model has id {model}"))?;
        let batch = inputs.len() as u32;
        let exec_ns = profile
            .exec_ns_checked(batch)
            .ok_or_else(|| format!("batch of {batch} is over the profile's {}", profile.batch_size_max()))?;
        sleep_precise(Duration::from_nanos(exec_ns));
        for input in inputs {
            outputs.extend_from_slice(input);
            output_lens.push(input.len() as u32);
        }
        Ok(())
    }
}

/// Sleeps `duration`, the last stretch spinning so the end is within microseconds.
pub fn sleep_precise(duration: Duration) {
    let end = Instant::now() + duration;
    const SPIN: Duration = Duration::from_micros(200);
    if duration > SPIN {
        std::thread::sleep(duration - SPIN);
    }
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sim_echoes_and_takes_its_profile_time() {
        let spec = ModelSpec {
            id: 1,
            name: "m".to_string(),
            slo_ns: 100_000_000,
            profile: Profile::from_latencies_ns(vec![2_000_000, 3_000_000], 0, 0),
        };
        let mut backend = SimBackend::new(&[spec]);
        let (mut outputs, mut lens) = (Vec::new(), Vec::new());
        let started = Instant::now();
        backend
            .run(1, &[b"ab".as_slice(), b"c".as_slice()], &mut outputs, &mut lens)
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(3));
        assert_eq!(outputs, b"abc");
        assert_eq!(lens, [2, 1]);
        assert!(backend.run(0, &[b"x".as_slice()], &mut outputs, &mut lens).is_err());
        let three = [b"x".as_slice(); 3];
        assert!(backend.run(1, &three, &mut outputs, &mut lens).is_err());
    }
}
