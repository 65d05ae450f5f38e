//! The executor process: connects to the scheduler, registers its GPUs and models, then runs
//! the plans each shard sends, each at its `exec_at`.
//!
//! Threads, not an async reactor: GPU work must never block a reactor, and an executor has
//! few connections. One reader thread per link (one link per scheduler shard) turns PLAN
//! frames into jobs for the worker thread of the plan's GPU; each worker keeps a
//! [`PlanFollower`] and starts each batch at its `exec_at` (converted to this machine's
//! clock with the offset, re-estimated from every heartbeat the scheduler answers), runs it
//! on its backend and writes the RESULT on the link the plan came from. A heartbeat thread
//! writes HEARTBEAT on every link from its JOIN on; the shards answer each, so a link silent
//! for `silence_limit` means the scheduler is gone.
//!
//! A session lasts from HELLO until a link is lost; [`run`] then registers again, with
//! back-off and jitter, keeping the backends and measured profiles, so a scheduler that
//! restarts gets its executors back without anyone restarting them. A peer that closes
//! never kills the process: writes to a closed socket fail with EPIPE (the binary keeps
//! SIGPIPE ignored for this command).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use symphony_shards::tls::{ClientTls, Stream};

use symphony_core::wire::executor::{
    self as exec, GpuInfo, Heartbeat, Hello, Join, Joined, ModelProfile, PlanStatus, Probe as ProbeMsg, ProbeReply,
    ProfileWire, Register, Registered, ResultMsg, Welcome,
};
use symphony_core::wire::{self, Decoded, FrameDecoder, Kind, WireError};

use crate::backend::{Backend, BackendKind, Batch, BatchOutput, ModelSpec, SimBackend};
use crate::clock::{estimate_offset, Clock, Offset, OffsetTracker, Probe, SharedOffset};
use crate::cpu::CpuBackend;
use crate::follower::{Due, PlanFollower, LATE_BOUND_NS_DEFAULT};

/// Clock probes at the handshake.
const PROBES: u32 = 16;
/// How long the handshake waits for each answer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    #[error("cannot reach a scheduler at {addrs}: {reason}")]
    Connect { addrs: String, reason: String },
    #[error("the scheduler refused this executor: {message} ({code:?})")]
    Refused { code: wire::ErrorCode, message: String },
    #[error("protocol error with the scheduler: {0}")]
    Protocol(String),
    #[error("the scheduler went away: {0}")]
    SchedulerGone(String),
    #[error("{0}")]
    Backend(String),
    /// The scheduler's certificate is not trusted or not for its name, or it does not speak
    /// TLS: a configuration to fix, not a fault to retry.
    #[error("TLS with the scheduler at {0}")]
    Tls(String),
}

impl From<WireError> for ExecutorError {
    fn from(error: WireError) -> ExecutorError {
        ExecutorError::Protocol(error.to_string())
    }
}

/// How to run an executor.
#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Front doors of the scheduler, tried in order.
    pub schedulers: Vec<String>,
    pub token: String,
    pub gpus: u32,
    pub backend: BackendKind,
    /// For the scheduler's logs.
    pub name: String,
    /// A plan that could only start later than this after its `exec_at` is refused.
    pub late_bound_ns: u64,
    pub heartbeat_interval: Duration,
    /// Backends that compute profile each model at start for batch sizes up to this (and
    /// the scheduler's own largest batch), `profile_repeat` measured runs each.
    pub profile_batch_max: u32,
    pub profile_repeat: u32,
    /// The longest wait between two registration attempts ([`run`]).
    pub reconnect_backoff_max: Duration,
    /// Runs this executor's clock fast (> 0) or slow (< 0) by this many parts per million:
    /// for tests of clock drift only.
    pub clock_skew_ppm: f64,
    /// TLS to the scheduler (its front door and links); `None`: plain text, the token
    /// readable on the network.
    pub tls: Option<symphony_shards::tls::ClientTls>,
    /// The sim backend's GPUs run at this speed against the scheduler's profiles (0.5:
    /// every batch takes twice its profile's time) and register the profiles they run.
    pub sim_speed: f64,
}

impl ExecutorConfig {
    pub fn new(schedulers: Vec<String>, token: String, gpus: u32, backend: BackendKind) -> ExecutorConfig {
        ExecutorConfig {
            schedulers,
            token,
            gpus,
            backend,
            name: std::env::var("HOSTNAME").unwrap_or_else(|_| "executor".to_string()),
            late_bound_ns: LATE_BOUND_NS_DEFAULT,
            heartbeat_interval: Duration::from_millis(100),
            profile_batch_max: 16,
            profile_repeat: 3,
            reconnect_backoff_max: Duration::from_secs(5),
            clock_skew_ppm: 0.0,
            tls: None,
            sim_speed: 1.0,
        }
    }
}

/// Counters of a running executor.
#[derive(Debug, Default)]
pub struct ExecutorStats {
    pub plans: AtomicU64,
    pub late: AtomicU64,
    pub failed: AtomicU64,
    pub requests: AtomicU64,
    /// How well plans were followed (plans that ran).
    pub following: Mutex<Following>,
}

/// Plan-following accuracy: start lateness and execution time against the profile.
#[derive(Debug)]
pub struct Following {
    /// Actual start minus `exec_at` (executor clock), microseconds; early starts count 0.
    pub lateness_us: hdrhistogram::Histogram<u64>,
    /// Measured execution time over the profile's `pre + l(b) + post`, in thousandths.
    pub exec_per_mille: hdrhistogram::Histogram<u64>,
}

impl Default for Following {
    fn default() -> Following {
        Following {
            lateness_us: hdrhistogram::Histogram::new_with_bounds(1, 60_000_000, 3).expect("bounds"),
            exec_per_mille: hdrhistogram::Histogram::new_with_bounds(1, 1_000_000, 3).expect("bounds"),
        }
    }
}

impl Following {
    /// One line for people.
    pub fn summary(&self) -> String {
        if self.lateness_us.is_empty() {
            return "no plan ran".to_string();
        }
        let l = &self.lateness_us;
        let e = &self.exec_per_mille;
        format!(
            "{} plans: start lateness p50 {} us, p99 {} us, max {} us; execution / profile p50 {:.2}, p99 {:.2}, max {:.2}",
            l.len(),
            l.value_at_quantile(0.5),
            l.value_at_quantile(0.99),
            l.max(),
            e.value_at_quantile(0.5) as f64 / 1000.0,
            e.value_at_quantile(0.99) as f64 / 1000.0,
            e.max() as f64 / 1000.0
        )
    }
}

/// A blocking frame connection (handshake and reader threads).
#[derive(Debug)]
struct FrameConn {
    stream: Stream,
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    decoder: FrameDecoder,
}

impl FrameConn {
    fn new(stream: Stream) -> FrameConn {
        FrameConn {
            stream,
            buffer: vec![0; 256 << 10],
            start: 0,
            end: 0,
            decoder: FrameDecoder::default(),
        }
    }

    fn send(&mut self, frame: &[u8]) -> Result<(), ExecutorError> {
        self.stream
            .write_all(frame)
            .and_then(|()| self.stream.flush())
            .map_err(|e| ExecutorError::SchedulerGone(e.to_string()))
    }

    /// The next frame: `(kind, start, end)` of its payload in `self.buffer`.
    fn next_frame(&mut self) -> Result<(Kind, usize, usize), ExecutorError> {
        loop {
            match self.decoder.decode(&self.buffer[self.start..self.end])? {
                Decoded::Frame(frame) => {
                    let payload_start = self.start + wire::FRAME_HEADER_SIZE;
                    let payload_end = payload_start + frame.payload.len();
                    self.start += frame.size();
                    return Ok((frame.kind, payload_start, payload_end));
                }
                Decoded::Incomplete { missing_min } => {
                    // Make room: move the partial frame to the front, grow for a large one.
                    self.buffer.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    if self.end + missing_min > self.buffer.len() {
                        self.buffer.resize(self.end + missing_min, 0);
                    }
                    let read = self
                        .stream
                        .read(&mut self.buffer[self.end..])
                        .map_err(|e| ExecutorError::SchedulerGone(e.to_string()))?;
                    if read == 0 {
                        return Err(ExecutorError::SchedulerGone("it closed the connection".to_string()));
                    }
                    self.end += read;
                }
            }
        }
    }

    /// The next frame, which must be `kind` (an ERROR frame is the scheduler's refusal).
    fn expect<T>(&mut self, kind: Kind) -> Result<T, ExecutorError>
    where
        T: rkyv::Archive,
        T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, wire::ValidationError>>
            + rkyv::Deserialize<T, rkyv::api::high::HighDeserializer<rkyv::rancor::Error>>,
    {
        let (got, start, end) = self.next_frame()?;
        let payload = &self.buffer[start..end];
        if got == Kind::Error {
            let error = wire::decode_error(payload)?;
            return Err(ExecutorError::Refused {
                code: error.code,
                message: error.message,
            });
        }
        if got != kind {
            return Err(ExecutorError::Protocol(format!("expected {kind}, got {got}")));
        }
        Ok(exec::decode::<T>(kind, payload)?)
    }
}

fn frame_of<T>(kind: Kind, value: &T) -> Result<Vec<u8>, ExecutorError>
where
    T: for<'a, 'b> rkyv::Serialize<
        rkyv::api::high::HighSerializer<&'b mut Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rkyv::rancor::Error>,
    >,
{
    let mut out = Vec::new();
    exec::encode(&mut out, kind, value)?;
    Ok(out)
}

/// The first scheduler address that accepts a connection: the connection (after its TLS
/// handshake when `tls` is set, checked against the host of the address as given), the
/// address and that address as given (its host names the scheduler's links too).
fn connect_any(schedulers: &[String], tls: Option<&ClientTls>) -> Result<(Stream, SocketAddr, String), ExecutorError> {
    let mut reasons = Vec::new();
    for addr in schedulers {
        let resolved = match addr.to_socket_addrs() {
            Ok(resolved) => resolved,
            Err(e) => {
                reasons.push(format!("{addr}: {e}"));
                continue;
            }
        };
        for socket_addr in resolved {
            match TcpStream::connect_timeout(&socket_addr, HANDSHAKE_TIMEOUT) {
                Ok(socket) => {
                    let stream = open(socket, addr, tls)?;
                    return Ok((stream, socket_addr, addr.clone()));
                }
                Err(e) => reasons.push(format!("{socket_addr}: {e}")),
            }
        }
    }
    Err(ExecutorError::Connect {
        addrs: schedulers.join(","),
        reason: reasons.join("; "),
    })
}

/// A connected socket as a frame stream: no delay, the handshake's read timeout, and TLS
/// (named as `name_addr`'s host) when configured.
fn open(socket: TcpStream, name_addr: &str, tls: Option<&ClientTls>) -> Result<Stream, ExecutorError> {
    socket.set_nodelay(true).ok();
    socket
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .map_err(|e| ExecutorError::SchedulerGone(e.to_string()))?;
    Stream::open(socket, name_addr, tls).map_err(|e| match e.kind() {
        // Not trusted, not its name, or not TLS at all: fixed by configuration only.
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => {
            ExecutorError::Tls(format!("{name_addr}: {e}"))
        }
        _ => ExecutorError::Connect {
            addrs: name_addr.to_string(),
            reason: e.to_string(),
        },
    })
}

/// A plan for a worker: owned, with its inputs copied out of the receive buffer.
#[derive(Debug)]
struct Job {
    /// Unique among this worker's jobs (the backend's staging key); set on receipt.
    key: u64,
    link: usize,
    plan_id: u64,
    model: u32,
    exec_at_scheduler_ns: u64,
    input_lens: Vec<u32>,
    inputs: Vec<u8>,
}

/// The writing side of one link, shared by the workers and the heartbeat thread.
#[derive(Debug)]
struct LinkWriter {
    stream: Mutex<Stream>,
}

impl Job {
    /// Each request's input.
    fn views(&self) -> Vec<&[u8]> {
        let mut views = Vec::with_capacity(self.input_lens.len());
        let mut offset = 0usize;
        for &len in &self.input_lens {
            views.push(&self.inputs[offset..offset + len as usize]);
            offset += len as usize;
        }
        views
    }
}

impl LinkWriter {
    fn write(&self, frame: &[u8]) -> std::io::Result<()> {
        let mut stream = self.stream.lock().expect("link writer");
        stream.write_all(frame)?;
        stream.flush()
    }
}

/// What makes the executor stop.
#[derive(Debug)]
enum Event {
    LinkClosed { shard: usize, reason: String },
}

/// A connected, registered executor (one session: from HELLO until a link is lost).
#[derive(Debug)]
pub struct RunningExecutor {
    pub executor_id: u32,
    /// The offset measured at the handshake (heartbeats keep re-estimating it).
    pub offset: Offset,
    pub models: Vec<ModelSpec>,
    stats: Arc<ExecutorStats>,
    shared_offset: Arc<SharedOffset>,
    stop: Arc<AtomicBool>,
    events: Receiver<Event>,
    threads: Vec<std::thread::JoinHandle<()>>,
    workers: Vec<std::thread::JoinHandle<Box<dyn Backend>>>,
    writers: Vec<Arc<LinkWriter>>,
    /// What the next session reuses (with the backends the workers give back).
    profiles: Vec<ModelProfile>,
}

/// What a session is built from and gives back: the backends (with their device state) and
/// the profiles measured for the scheduler's models. A reconnecting executor reuses them,
/// so it does not profile again.
struct Prepared {
    models: Vec<ModelSpec>,
    backends: Vec<Box<dyn Backend>>,
    profiles: Vec<ModelProfile>,
}

impl Prepared {
    /// Whether these were made for the models a WELCOME lists.
    fn fits(&self, welcome: &Welcome) -> bool {
        self.models.len() == welcome.models.len()
            && self
                .models
                .iter()
                .zip(&welcome.models)
                .all(|(m, w)| m.id == w.id && m.name == w.name)
    }
}

impl RunningExecutor {
    pub fn stats(&self) -> &ExecutorStats {
        &self.stats
    }

    /// The counters, to read after `wait` consumed the executor.
    pub fn stats_handle(&self) -> Arc<ExecutorStats> {
        Arc::clone(&self.stats)
    }

    /// The clock offset as re-estimated from the heartbeats so far.
    pub fn current_offset(&self) -> Offset {
        self.shared_offset.load()
    }

    /// Runs until `stop` is set (Ok) or a link to the scheduler fails (Err).
    pub fn wait(self, stop: &AtomicBool) -> Result<(), ExecutorError> {
        self.wait_session(stop).0
    }

    fn wait_session(mut self, stop: &AtomicBool) -> (Result<(), ExecutorError>, Prepared) {
        let outcome = loop {
            if stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            match self.events.recv_timeout(Duration::from_millis(50)) {
                Ok(Event::LinkClosed { shard, reason }) => {
                    break Err(ExecutorError::SchedulerGone(format!(
                        "the link to shard {shard}: {reason}"
                    )));
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break Ok(()),
            }
        };
        let backends = self.shutdown();
        let prepared = Prepared {
            models: std::mem::take(&mut self.models),
            backends,
            profiles: std::mem::take(&mut self.profiles),
        };
        (outcome, prepared)
    }

    /// Stops every thread; the workers give their backends back.
    fn shutdown(&mut self) -> Vec<Box<dyn Backend>> {
        self.stop.store(true, Ordering::Relaxed);
        for writer in &self.writers {
            let _ = writer
                .stream
                .lock()
                .expect("link writer")
                .shutdown(std::net::Shutdown::Both);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
        self.workers.drain(..).filter_map(|w| w.join().ok()).collect()
    }
}

/// Connects, registers and starts the threads: one session.
pub fn start(config: &ExecutorConfig) -> Result<RunningExecutor, ExecutorError> {
    check_backend(config)?;
    let clock = Clock::new(config.clock_skew_ppm);
    start_session(config, clock, None, Arc::new(ExecutorStats::default())).map_err(|(error, _)| error)
}

/// Before any session: the backend can run here (no CUDA driver is an error, never a panic).
fn check_backend(config: &ExecutorConfig) -> Result<(), ExecutorError> {
    if config.gpus == 0 {
        return Err(ExecutorError::Backend("an executor runs at least 1 GPU".to_string()));
    }
    if config.backend == BackendKind::Cuda {
        crate::cuda::driver_check().map_err(ExecutorError::Backend)?;
        let present = crate::cuda::device_count();
        if (config.gpus as usize) > present {
            return Err(ExecutorError::Backend(format!(
                "--gpus {} but the CUDA driver sees {present} GPU(s)",
                config.gpus
            )));
        }
    }
    Ok(())
}

/// Whether an error ends the executor instead of a reconnection: a wrong token, or a
/// backend that cannot run.
pub fn is_fatal(error: &ExecutorError) -> bool {
    matches!(
        error,
        ExecutorError::Refused {
            code: wire::ErrorCode::Unauthorized,
            ..
        } | ExecutorError::Backend(_)
            | ExecutorError::Tls(_)
    )
}

/// Runs sessions until `stop` is set: a lost link (the scheduler restarted, a network
/// fault, a loss the scheduler declared) is followed by a new registration after a back-off
/// that doubles from 100 ms to `config.reconnect_backoff_max`, with jitter, so executors
/// that lost one scheduler do not all come back at the same instant. Backends and measured
/// profiles are kept across sessions. Ends with an error only for [`is_fatal`] ones.
pub fn run(
    config: &ExecutorConfig,
    stop: &AtomicBool,
    stats: Arc<ExecutorStats>,
    log: &dyn Fn(&str),
) -> Result<(), ExecutorError> {
    check_backend(config)?;
    let clock = Clock::new(config.clock_skew_ppm);
    let mut prepared = None;
    let mut backoff = RECONNECT_BACKOFF_MIN;
    let mut jitter = Jitter::new();
    while !stop.load(Ordering::Relaxed) {
        match start_session(config, clock, prepared.take(), Arc::clone(&stats)) {
            Ok(running) => {
                log(&format!(
                    "executor {} with {} {} GPU(s), {} model(s); clock offset {} us (+- {} us)",
                    running.executor_id,
                    config.gpus,
                    config.backend.name(),
                    running.models.len(),
                    running.offset.offset_ns / 1000,
                    running.offset.error_bound_ns / 1000,
                ));
                backoff = RECONNECT_BACKOFF_MIN;
                let (outcome, back) = running.wait_session(stop);
                prepared = Some(back);
                match outcome {
                    Ok(()) => return Ok(()),
                    Err(error) => log(&format!("{error}; registering again")),
                }
            }
            Err((error, back)) => {
                prepared = back;
                if is_fatal(&error) {
                    return Err(error);
                }
                log(&format!(
                    "{error}; retrying in {} ms",
                    (backoff.as_millis() as u64).max(1)
                ));
            }
        }
        let wait = jitter.spread(backoff);
        let until = Instant::now() + wait;
        while !stop.load(Ordering::Relaxed) && Instant::now() < until {
            std::thread::sleep((until - Instant::now()).min(Duration::from_millis(20)));
        }
        backoff = (backoff * 2).min(config.reconnect_backoff_max.max(RECONNECT_BACKOFF_MIN));
    }
    Ok(())
}

/// The first reconnection waits this long (then twice as long each time).
const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Heartbeat round trips the clock offset is re-estimated from (the least round trip wins).
const OFFSET_WINDOW: usize = 8;

/// Jitter for back-offs: a xorshift seeded from the time and the process id.
struct Jitter(u64);

impl Jitter {
    fn new() -> Jitter {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()) << 32;
        Jitter(seed | 1)
    }

    /// `base` scaled by a factor in [0.5, 1.5).
    fn spread(&mut self, base: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let factor = 0.5 + (self.0 >> 11) as f64 / (1u64 << 53) as f64;
        base.mul_f64(factor)
    }
}

/// The handshake on a front door: HELLO, WELCOME and the clock probes.
struct Handshake {
    control: FrameConn,
    welcome: Welcome,
    offset: Offset,
    /// The probes the offset came from (the tracker starts from them).
    probes: Vec<Probe>,
    scheduler_addr: SocketAddr,
    /// The front door as given (its host is the name TLS checks on the links too).
    scheduler_name: String,
}

fn handshake(config: &ExecutorConfig, clock: Clock) -> Result<Handshake, ExecutorError> {
    let (stream, scheduler_addr, scheduler_name) = connect_any(&config.schedulers, config.tls.as_ref())?;
    let mut control = FrameConn::new(stream);
    let hello = Hello {
        token: config.token.clone(),
        name: config.name.clone(),
        backend: config.backend.name().to_string(),
        gpus: (0..config.gpus)
            .map(|index| GpuInfo {
                index,
                name: format!("{}-{index}", config.backend.name()),
                memory_bytes: 0,
            })
            .collect(),
    };
    control.send(&frame_of(Kind::ExecHello, &hello)?)?;
    let welcome: Welcome = control.expect(Kind::ExecWelcome)?;
    let mut probes = Vec::with_capacity(PROBES as usize);
    for sequence in 0..PROBES {
        let sent_local_ns = clock.now_ns();
        control.send(&frame_of(
            Kind::ExecProbe,
            &ProbeMsg {
                sequence,
                sent_local_ns,
            },
        )?)?;
        let reply: ProbeReply = control.expect(Kind::ExecProbeReply)?;
        if reply.sequence != sequence {
            return Err(ExecutorError::Protocol(format!(
                "probe {sequence} answered as {}",
                reply.sequence
            )));
        }
        probes.push(Probe {
            sent_local_ns,
            scheduler_ns: reply.scheduler_ns,
            received_local_ns: clock.now_ns(),
        });
    }
    let offset = estimate_offset(&probes).ok_or_else(|| ExecutorError::Protocol("no valid clock probe".to_string()))?;
    Ok(Handshake {
        control,
        welcome,
        offset,
        probes,
        scheduler_addr,
        scheduler_name,
    })
}

/// The backends and profiles for the models of a WELCOME: made here (profiling the models
/// on a backend that computes), or the ones of an earlier session if they fit.
fn prepare(config: &ExecutorConfig, welcome: &Welcome, earlier: Option<Prepared>) -> Result<Prepared, ExecutorError> {
    if let Some(earlier) = earlier.filter(|p| p.fits(welcome) && p.backends.len() == config.gpus as usize) {
        return Ok(earlier);
    }
    let mut models = Vec::with_capacity(welcome.models.len());
    for m in &welcome.models {
        let profile = m
            .profile
            .to_profile()
            .map_err(|e| ExecutorError::Protocol(format!("model `{}`: {e}", m.name)))?;
        // The sim backend runs, and registers, the profile at its speed.
        let profile = match config.backend {
            BackendKind::Sim if config.sim_speed != 1.0 => profile.scaled(1.0 / config.sim_speed),
            _ => profile,
        };
        models.push(ModelSpec {
            id: m.id,
            name: m.name.clone(),
            slo_ns: m.slo_us.saturating_mul(1000),
            profile,
        });
    }
    let mut backends: Vec<Box<dyn Backend>> = Vec::with_capacity(config.gpus as usize);
    for gpu in 0..config.gpus {
        backends.push(match config.backend {
            BackendKind::Sim => Box::new(SimBackend::new(&models)),
            BackendKind::Cpu => Box::new(CpuBackend::new(&models).map_err(ExecutorError::Backend)?),
            BackendKind::Cuda => {
                Box::new(crate::cuda::CudaBackend::new(gpu as usize, &models).map_err(ExecutorError::Backend)?)
            }
        });
    }
    // The profiles the scheduler will plan with: measured here for a backend that computes.
    let mut profiles = Vec::with_capacity(models.len());
    for m in &models {
        let profile = match config.backend {
            BackendKind::Sim => m.profile.clone(),
            BackendKind::Cpu | BackendKind::Cuda => {
                let network = crate::nets::Network::for_model(&m.name).expect("checked by the backend");
                let input = crate::nets::sample_input(network, 0);
                let batch_max = config.profile_batch_max.min(m.profile.batch_size_max()).max(1);
                let measured = crate::profiler::measure(
                    backends[0].as_mut(),
                    m.id,
                    &input,
                    batch_max,
                    1,
                    config.profile_repeat.max(1),
                )
                .map_err(ExecutorError::Backend)?;
                measured.to_profile()
            }
        };
        profiles.push(ModelProfile {
            model: m.id,
            profile: ProfileWire::of(&profile),
        });
    }
    Ok(Prepared {
        models,
        backends,
        profiles,
    })
}

/// One session: handshake, registration, a link per shard (heartbeats on each from its
/// JOIN on), then the reader, worker and heartbeat threads. On failure the backends come
/// back with the error, for the next attempt.
#[allow(clippy::type_complexity)]
fn start_session(
    config: &ExecutorConfig,
    clock: Clock,
    earlier: Option<Prepared>,
    stats: Arc<ExecutorStats>,
) -> Result<RunningExecutor, (ExecutorError, Option<Prepared>)> {
    let Handshake {
        mut control,
        welcome,
        offset,
        probes,
        scheduler_addr,
        scheduler_name,
    } = match handshake(config, clock) {
        Ok(handshake) => handshake,
        Err(error) => return Err((error, earlier)),
    };
    let prepared = prepare(config, &welcome, earlier).map_err(|e| (e, None))?;
    let register = Register {
        offset_ns: offset.offset_ns,
        offset_error_ns: offset.error_bound_ns,
        models: prepared.profiles.clone(),
    };
    let joined = (|| {
        control.send(&frame_of(Kind::ExecRegister, &register)?)?;
        let registered: Registered = control.expect(Kind::ExecRegistered)?;
        Ok::<u32, ExecutorError>(registered.executor_id)
    })();
    let executor_id = match joined {
        Ok(id) => id,
        Err(error) => return Err((error, Some(prepared))),
    };
    let stop = Arc::new(AtomicBool::new(false));
    // Heartbeats from each link's JOIN on: a scheduler with many shards must not lose the
    // executor while it is still joining the last ones.
    let beating: Arc<Mutex<Vec<Arc<LinkWriter>>>> = Arc::new(Mutex::new(Vec::new()));
    let heartbeat = {
        let (beating, stop) = (Arc::clone(&beating), Arc::clone(&stop));
        let interval = config.heartbeat_interval;
        std::thread::Builder::new()
            .name("heartbeat".to_string())
            .spawn(move || heartbeats(&beating, &stop, interval, clock))
            .map_err(|e| (ExecutorError::Backend(e.to_string()), None))?
    };
    let links = join_links(
        config,
        &welcome,
        executor_id,
        (scheduler_addr, &scheduler_name),
        &beating,
    );
    let link_conns = match links {
        Ok(links) => links,
        Err(error) => {
            stop.store(true, Ordering::Relaxed);
            let _ = heartbeat.join();
            return Err((error, Some(prepared)));
        }
    };
    drop(control);
    let writers: Vec<Arc<LinkWriter>> = beating.lock().expect("link writers").clone();
    let shared_offset = Arc::new(SharedOffset::new(offset));
    let mut tracker = OffsetTracker::new(OFFSET_WINDOW);
    for probe in probes {
        tracker.record(probe);
    }
    let tracker = Arc::new(Mutex::new(tracker));
    let (events_tx, events) = mpsc::channel();
    let silence_limit = (config.heartbeat_interval * 10).max(Duration::from_secs(1));
    let mut threads = vec![heartbeat];
    let mut workers = Vec::with_capacity(config.gpus as usize);
    let mut job_senders = Vec::with_capacity(config.gpus as usize);
    let mut job_receivers = Vec::with_capacity(config.gpus as usize);
    for _ in 0..config.gpus {
        let (tx, rx) = mpsc::channel::<Job>();
        job_senders.push(tx);
        job_receivers.push(rx);
    }
    let Prepared {
        models,
        backends,
        profiles,
    } = prepared;
    let planned: Arc<Vec<Option<symphony_core::profile::Profile>>> = Arc::new({
        let mut by_id = vec![None; models.iter().map(|m| m.id as usize + 1).max().unwrap_or(0)];
        for (m, p) in models.iter().zip(&profiles) {
            by_id[m.id as usize] = p.profile.to_profile().ok();
        }
        by_id
    });
    for (gpu, (backend, jobs)) in backends.into_iter().zip(job_receivers).enumerate() {
        let worker = Worker {
            planned: Arc::clone(&planned),
            gpu: gpu as u32,
            backend,
            jobs,
            writers: writers.clone(),
            offset: Arc::clone(&shared_offset),
            clock,
            late_bound_ns: config.late_bound_ns,
            stop: Arc::clone(&stop),
            stats: Arc::clone(&stats),
        };
        workers.push(
            std::thread::Builder::new()
                .name(format!("gpu-{gpu}"))
                .spawn(move || worker.run())
                .expect("spawns a GPU worker thread"),
        );
    }
    for (shard, link) in link_conns.into_iter().enumerate() {
        let _ = link.stream.set_read_timeout(Some(silence_limit));
        let reader = Reader {
            shard,
            link,
            jobs: job_senders.clone(),
            writer: Arc::clone(&writers[shard]),
            events: events_tx.clone(),
            stop: Arc::clone(&stop),
            clock,
            tracker: Arc::clone(&tracker),
            offset: Arc::clone(&shared_offset),
        };
        threads.push(
            std::thread::Builder::new()
                .name(format!("link-{shard}"))
                .spawn(move || reader.run())
                .expect("spawns a link reader thread"),
        );
    }
    Ok(RunningExecutor {
        executor_id,
        offset,
        models,
        stats,
        shared_offset,
        stop,
        events,
        threads,
        workers,
        writers,
        profiles,
    })
}

/// JOIN on every shard's link, each link's writer added to `beating` once joined.
fn join_links(
    config: &ExecutorConfig,
    welcome: &Welcome,
    executor_id: u32,
    (scheduler_addr, scheduler_name): (SocketAddr, &str),
    beating: &Mutex<Vec<Arc<LinkWriter>>>,
) -> Result<Vec<FrameConn>, ExecutorError> {
    let mut link_conns = Vec::with_capacity(welcome.links.len());
    for (shard, addr) in welcome.links.iter().enumerate() {
        let mut addr: SocketAddr = addr
            .parse()
            .map_err(|_| ExecutorError::Protocol(format!("shard {shard}'s link address `{addr}`")))?;
        if addr.ip().is_unspecified() {
            addr.set_ip(scheduler_addr.ip());
        }
        let socket = TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT).map_err(|e| ExecutorError::Connect {
            addrs: addr.to_string(),
            reason: e.to_string(),
        })?;
        // The certificate names the scheduler, as the front door connected to did.
        let mut link = FrameConn::new(open(socket, scheduler_name, config.tls.as_ref())?);
        let join = Join {
            token: config.token.clone(),
            executor_id,
            secret: welcome.secret,
            shard: shard as u32,
        };
        link.send(&frame_of(Kind::ExecJoin, &join)?)?;
        let joined: Joined = link.expect(Kind::ExecJoined)?;
        if joined.shard != shard as u32 {
            return Err(ExecutorError::Protocol(format!(
                "joined shard {} on shard {shard}'s link",
                joined.shard
            )));
        }
        let writer = link
            .stream
            .try_clone()
            .map_err(|e| ExecutorError::SchedulerGone(e.to_string()))?;
        beating.lock().expect("link writers").push(Arc::new(LinkWriter {
            stream: Mutex::new(writer),
        }));
        link_conns.push(link);
    }
    Ok(link_conns)
}

/// Writes a HEARTBEAT on every joined link each interval until `stop`.
fn heartbeats(beating: &Mutex<Vec<Arc<LinkWriter>>>, stop: &AtomicBool, interval: Duration, clock: Clock) {
    let mut frame = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        frame.clear();
        let beat = Heartbeat {
            sent_ns: clock.now_ns(),
            echo_ns: 0,
        };
        if exec::encode(&mut frame, Kind::ExecHeartbeat, &beat).is_ok() {
            let writers = beating.lock().expect("link writers").clone();
            for writer in &writers {
                let _ = writer.write(&frame);
            }
        }
        // In short steps, so a stop is not held up by a long interval.
        let next = Instant::now() + interval;
        while !stop.load(Ordering::Relaxed) && Instant::now() < next {
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(20)));
        }
    }
}

/// One link's reader: PLAN frames become jobs for the GPU workers.
struct Reader {
    shard: usize,
    link: FrameConn,
    jobs: Vec<Sender<Job>>,
    writer: Arc<LinkWriter>,
    events: Sender<Event>,
    stop: Arc<AtomicBool>,
    clock: Clock,
    /// Heartbeat round trips of every link, for the offset.
    tracker: Arc<Mutex<OffsetTracker>>,
    offset: Arc<SharedOffset>,
}

impl Reader {
    fn run(mut self) {
        let reason = loop {
            let (kind, start, end) = match self.link.next_frame() {
                Ok(frame) => frame,
                Err(e) => break e.to_string(),
            };
            let payload = &self.link.buffer[start..end];
            match kind {
                Kind::ExecPlan => {
                    if let Err(e) = on_plan(&self.jobs, &self.writer, self.shard, payload) {
                        break e;
                    }
                }
                Kind::ExecHeartbeat => self.on_heartbeat(start, end),
                Kind::Error => {
                    break match wire::decode_error(payload) {
                        Ok(error) => format!("it sent an error: {} ({:?})", error.message, error.code),
                        Err(e) => e.to_string(),
                    };
                }
                other => break format!("unexpected {other} on a link"),
            }
        };
        if !self.stop.load(Ordering::Relaxed) {
            let _ = self.events.send(Event::LinkClosed {
                shard: self.shard,
                reason,
            });
        }
    }

    /// A shard's answer to a heartbeat: a clock probe (it echoes our send time).
    fn on_heartbeat(&self, start: usize, end: usize) {
        let received_local_ns = self.clock.now_ns();
        let Ok(beat) = exec::access::<Heartbeat>(Kind::ExecHeartbeat, &self.link.buffer[start..end]) else {
            return;
        };
        let sent_local_ns = beat.echo_ns.to_native();
        if sent_local_ns == 0 || sent_local_ns > received_local_ns {
            return;
        }
        let probe = Probe {
            sent_local_ns,
            scheduler_ns: beat.sent_ns.to_native(),
            received_local_ns,
        };
        if let Some(offset) = self.tracker.lock().expect("offset tracker").record(probe) {
            self.offset.store(offset);
        }
    }
}

/// A PLAN: a job for its GPU's worker, or a failed RESULT for a GPU this executor lacks.
fn on_plan(jobs: &[Sender<Job>], writer: &LinkWriter, shard: usize, payload: &[u8]) -> Result<(), String> {
    let (plan, section) = exec::access_plan(payload).map_err(|e| e.to_string())?;
    let plan_id = plan.plan_id.to_native();
    let gpu = plan.gpu.to_native() as usize;
    let Some(jobs) = jobs.get(gpu) else {
        let message = format!("this executor has no GPU {gpu}");
        return write_result(writer, plan_id, PlanStatus::Failed, (0, 0), None, &message).map_err(|e| e.to_string());
    };
    let job = Job {
        key: 0,
        link: shard,
        plan_id,
        model: plan.model.to_native(),
        exec_at_scheduler_ns: plan.exec_at_ns.to_native(),
        input_lens: plan.requests.iter().map(|r| r.input_len.to_native()).collect(),
        inputs: section.to_vec(),
    };
    jobs.send(job).map_err(|_| "the GPU worker stopped".to_string())
}

/// Writes a RESULT: with `batch`'s outputs when `status` is ok, else `message`.
fn write_result(
    writer: &LinkWriter,
    plan_id: u64,
    status: PlanStatus,
    (started_ns, finished_ns): (u64, u64),
    batch: Option<&BatchOutput>,
    message: &str,
) -> std::io::Result<()> {
    let ok = status == PlanStatus::Ok;
    let result = ResultMsg {
        plan_id,
        status,
        started_ns,
        finished_ns,
        output_lens: batch.filter(|_| ok).map(|b| b.lens.clone()).unwrap_or_default(),
        refused: batch.filter(|_| ok).map(|b| b.refused.clone()).unwrap_or_default(),
        message: batch
            .filter(|b| ok && !b.message.is_empty())
            .map_or_else(|| message.to_string(), |b| b.message.clone()),
    };
    let section = batch.filter(|_| ok).map_or(&[][..], |b| b.outputs.as_slice());
    let mut frame = Vec::with_capacity(64 + section.len());
    if exec::encode_sectioned(&mut frame, Kind::ExecResult, &result, |out| {
        out.extend_from_slice(section)
    })
    .is_err()
    {
        // Outputs over one frame: the plan fails instead.
        frame.clear();
        let failed = ResultMsg {
            status: PlanStatus::Failed,
            output_lens: Vec::new(),
            refused: Vec::new(),
            message: "the batch's outputs exceed one frame".to_string(),
            ..result
        };
        exec::encode_sectioned(&mut frame, Kind::ExecResult, &failed, |_| {})
            .map_err(|e| std::io::Error::other(e.to_string()))?;
    }
    writer.write(&frame)
}

/// One GPU: follows its plans and runs them on its backend.
struct Worker {
    /// By model id: the profile the scheduler plans with (what execution is measured against).
    planned: Arc<Vec<Option<symphony_core::profile::Profile>>>,
    gpu: u32,
    backend: Box<dyn Backend>,
    jobs: Receiver<Job>,
    writers: Vec<Arc<LinkWriter>>,
    offset: Arc<SharedOffset>,
    clock: Clock,
    late_bound_ns: u64,
    stop: Arc<AtomicBool>,
    stats: Arc<ExecutorStats>,
}

impl Worker {
    fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Follows plans until the session stops; gives the backend back.
    fn run(mut self) -> Box<dyn Backend> {
        self.follow();
        self.backend
    }

    fn follow(&mut self) {
        let mut follower = PlanFollower::new(self.late_bound_ns);
        let mut batch = BatchOutput::default();
        let mut received_jobs = 0u64;
        while !self.stop.load(Ordering::Relaxed) {
            let now_ns = self.now_ns();
            let wait = follower.next_due_ns().map_or(Duration::from_millis(50), |due| {
                self.clock
                    .real_duration(due.saturating_sub(now_ns))
                    .min(Duration::from_millis(50))
            });
            let received = if wait.is_zero() {
                self.jobs.try_recv().map_err(|e| match e {
                    mpsc::TryRecvError::Empty => RecvTimeoutError::Timeout,
                    mpsc::TryRecvError::Disconnected => RecvTimeoutError::Disconnected,
                })
            } else {
                self.jobs.recv_timeout(wait)
            };
            match received {
                Ok(mut job) => {
                    job.key = received_jobs;
                    received_jobs += 1;
                    let exec_at_ns = self.offset.load().to_local_ns(job.exec_at_scheduler_ns);
                    if let Err(refused) = follower.push(job, exec_at_ns, self.now_ns()) {
                        self.late(refused.plan, refused.late_by_ns);
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {}
            }
            // The channel is empty here: the follower holds every plan known, and the one it
            // would start next is staged while this one runs.
            while let Some(due) = follower.pop_due(self.now_ns()) {
                match due {
                    Due::Start(job) => self.execute(job, follower.peek(), &mut batch),
                    Due::Late { plan, late_by_ns } => self.late(plan, late_by_ns),
                }
            }
        }
    }

    fn late(&self, job: Job, late_by_ns: u64) {
        self.stats.late.fetch_add(1, Ordering::Relaxed);
        let message = format!(
            "GPU {} could start it only {:.1} ms after exec_at",
            self.gpu,
            late_by_ns as f64 / 1e6
        );
        let _ = write_result(
            &self.writers[job.link],
            job.plan_id,
            PlanStatus::Late,
            (0, 0),
            None,
            &message,
        );
    }

    fn execute(&mut self, job: Job, next: Option<&Job>, batch: &mut BatchOutput) {
        let inputs = job.views();
        let next_inputs = next.map(Job::views);
        let current = Batch {
            key: job.key,
            model: job.model,
            inputs: &inputs,
        };
        let next = next.zip(next_inputs.as_deref()).map(|(next, inputs)| Batch {
            key: next.key,
            model: next.model,
            inputs,
        });
        batch.clear();
        let started_ns = self.now_ns();
        let outcome = self.backend.run_then_stage(current, next, batch);
        let finished_ns = self.now_ns();
        if outcome.is_ok() {
            let exec_at_ns = self.offset.load().to_local_ns(job.exec_at_scheduler_ns);
            let predicted_ns = self
                .planned
                .get(job.model as usize)
                .and_then(Option::as_ref)
                .and_then(|p| p.exec_ns_checked(inputs.len() as u32));
            let mut following = self.stats.following.lock().expect("stats");
            let _ = following
                .lateness_us
                .record(started_ns.saturating_sub(exec_at_ns) / 1000 + 1);
            if let Some(predicted_ns) = predicted_ns.filter(|&p| p > 0) {
                let per_mille = (finished_ns - started_ns) as u128 * 1000 / predicted_ns as u128;
                let _ = following.exec_per_mille.record((per_mille as u64).clamp(1, 1_000_000));
            }
        }
        let offset = self.offset.load();
        let times = (offset.to_scheduler_ns(started_ns), offset.to_scheduler_ns(finished_ns));
        self.stats.plans.fetch_add(1, Ordering::Relaxed);
        self.stats.requests.fetch_add(inputs.len() as u64, Ordering::Relaxed);
        let writer = &self.writers[job.link];
        let _ = match outcome {
            Ok(()) if batch.lens.len() == inputs.len() => {
                write_result(writer, job.plan_id, PlanStatus::Ok, times, Some(batch), "")
            }
            Ok(()) => write_result(
                writer,
                job.plan_id,
                PlanStatus::Failed,
                times,
                None,
                "the backend returned a wrong number of outputs",
            ),
            Err(message) => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                write_result(writer, job.plan_id, PlanStatus::Failed, times, None, &message)
            }
        };
    }
}
