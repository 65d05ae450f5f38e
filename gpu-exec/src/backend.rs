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
    /// Real forward passes on the CPU (`crate::cpu`).
    Cpu,
    /// The same networks on NVIDIA GPUs (`crate::cuda`).
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = String;

    fn from_str(s: &str) -> Result<BackendKind, String> {
        match s {
            "sim" => Ok(BackendKind::Sim),
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" => Ok(BackendKind::Cuda),
            other => Err(format!("unknown backend `{other}` (sim, cpu or cuda)")),
        }
    }
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Sim => "sim",
            BackendKind::Cpu => "cpu",
            BackendKind::Cuda => "cuda",
        }
    }
}

/// What a batch produced: one output per request, in order, or the request's refusal.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BatchOutput {
    /// The outputs, back to back.
    pub outputs: Vec<u8>,
    /// Per request: bytes of its output (0 for a refused one).
    pub lens: Vec<u32>,
    /// Indexes of requests whose input the model refused (answered `malformed`).
    pub refused: Vec<u32>,
    /// For people, when something was refused.
    pub message: String,
}

impl BatchOutput {
    pub fn clear(&mut self) {
        self.outputs.clear();
        self.lens.clear();
        self.refused.clear();
        self.message.clear();
    }

    /// The next request's output.
    pub fn push(&mut self, output: &[u8]) {
        self.outputs.extend_from_slice(output);
        self.lens.push(output.len() as u32);
    }

    /// The next request is refused, for `why`.
    pub fn refuse(&mut self, why: impl FnOnce() -> String) {
        self.refused.push(self.lens.len() as u32);
        self.lens.push(0);
        if self.message.is_empty() {
            self.message = why();
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

/// What a backend keeps per model, by model id.
#[derive(Debug)]
pub struct ByModel<T>(Vec<Option<T>>);

impl<T> ByModel<T> {
    /// `make` for every model; it returns `None` for a model the backend cannot run, and the
    /// build fails naming all of those (`backend`: the backend's name for the message).
    pub fn build(
        backend: &str,
        models: &[ModelSpec],
        mut make: impl FnMut(&ModelSpec) -> Result<Option<T>, String>,
    ) -> Result<ByModel<T>, String> {
        let len = models.iter().map(|m| m.id as usize + 1).max().unwrap_or(0);
        let mut by_id: Vec<Option<T>> = (0..len).map(|_| None).collect();
        let mut missing = Vec::new();
        for m in models {
            match make(m)? {
                Some(value) => by_id[m.id as usize] = Some(value),
                None => missing.push(m.name.as_str()),
            }
        }
        if !missing.is_empty() {
            return Err(format!(
                "the {backend} backend has no network for model(s) {} (it runs models named mlp* and \
                 resnet*, see gpu-exec/src/nets.rs)",
                missing.join(", ")
            ));
        }
        Ok(ByModel(by_id))
    }

    /// One model, id 0 (the profiler and tests).
    pub fn single(value: T) -> ByModel<T> {
        ByModel(vec![Some(value)])
    }

    pub fn get(&self, model: u32) -> Result<&T, String> {
        self.0
            .get(model as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| format!("no model has id {model}"))
    }
}

/// A batch named for staging: `key` is unique among the batches a worker hands its backend.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    pub key: u64,
    pub model: u32,
    pub inputs: &'a [&'a [u8]],
}

/// Runs batches on one GPU.
pub trait Backend: Send + std::fmt::Debug {
    /// Runs `model` on `inputs` (one per request, in order) into `out` (cleared by the
    /// caller): an output or a refusal per request. An error fails the whole batch.
    fn run(&mut self, model: u32, inputs: &[&[u8]], out: &mut BatchOutput) -> Result<(), String>;

    /// Runs `current` like [`run`](Backend::run) and, while the device computes it, may
    /// start moving `next` (the batch most likely to run next) to the device, so that its
    /// upload overlaps this batch. Whether `next` runs next is not promised: a backend
    /// uses what it staged only for a later batch with the same key. The default ignores
    /// `next` (nothing to overlap on the CPU).
    fn run_then_stage(
        &mut self,
        current: Batch<'_>,
        next: Option<Batch<'_>>,
        out: &mut BatchOutput,
    ) -> Result<(), String> {
        let _ = next;
        self.run(current.model, current.inputs, out)
    }
}

/// The simulated backend: a batch takes its profile's `pre + l(b) + post`, and each output
/// is the request's input (an echo, so a client can check its bytes made the whole trip).
#[derive(Debug)]
pub struct SimBackend {
    profiles: ByModel<Profile>,
}

impl SimBackend {
    pub fn new(models: &[ModelSpec]) -> SimBackend {
        let profiles = ByModel::build("sim", models, |m| Ok(Some(m.profile.clone()))).expect("sim runs every model");
        SimBackend { profiles }
    }
}

impl Backend for SimBackend {
    fn run(&mut self, model: u32, inputs: &[&[u8]], out: &mut BatchOutput) -> Result<(), String> {
        let profile = self.profiles.get(model)?;
        let batch = inputs.len() as u32;
        let exec_ns = profile
            .exec_ns_checked(batch)
            .ok_or_else(|| format!("batch of {batch} is over the profile's {}", profile.batch_size_max()))?;
        sleep_precise(Duration::from_nanos(exec_ns));
        for input in inputs {
            out.push(input);
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
        let mut out = BatchOutput::default();
        let started = Instant::now();
        backend.run(1, &[b"ab".as_slice(), b"c".as_slice()], &mut out).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(3));
        assert_eq!(out.outputs, b"abc");
        assert_eq!(out.lens, [2, 1]);
        assert!(backend.run(0, &[b"x".as_slice()], &mut out).is_err());
        let three = [b"x".as_slice(); 3];
        assert!(backend.run(1, &three, &mut out).is_err());
    }
}
