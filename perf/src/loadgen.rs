//! An open-loop load generator for any server that speaks the wire protocol
//! (`docs/protocol.md`), driven by a workload file like the simulator.
//!
//! What it is: the arrivals of [`Workload::generate_arrivals`] (every phase) are sent at their
//! times, each to its model by name ([`ModelRef::Name`]), spread round robin over
//! `connections` connections of the blocking client ([`symphony_shards::client`]). Open loop:
//! a request is sent at its arrival time whatever happened to the earlier ones, so a slow
//! server sees the offered load, not a load it throttles (no coordinated omission on the send
//! side). Each connection has two threads:
//!
//! - the sender sleeps until its next arrival (spin-yields for the last ~50 µs), then encodes
//!   every request due by now into one buffer and writes it with one write, then sleeps at
//!   least [`WRITE_GATHER`] before the next write: many frames per write is what reaches high
//!   rates (one small write per frame tops out near 250,000 frames a second on loopback), and
//!   a sleeping sender leaves its core to the receivers. A request is thus sent up to about
//!   `WRITE_GATHER` plus a sleep's overshoot (~50 µs) after its arrival at high rates. If it
//!   falls behind it sends everything due at once (still open loop) and records how late it
//!   was (`send_lag_us_max`);
//! - the receiver reads replies in bulk and records each one once, matched by its id (the
//!   arrival's index): latency from the send (the sender's clock reading of the write that
//!   carried it) to the read that brought the reply, its status, and whether it came back `OK`
//!   within its model's SLO (a success).
//!
//! Every request is sent and awaited, but only requests whose arrival is in the bench phase
//! count toward the report, as in the simulator. After the last send a connection waits for
//! its outstanding replies for at most the largest SLO plus [`REPLY_GRACE_NS`]; what is still
//! missing then is `noreply`.
//!
//! Latency is measured from the actual send, so it excludes the generator's own lag; the lag is
//! reported on its own, and a run whose `send_lag_us_max` is not small next to the SLOs measured
//! the generator, not the server.
//!
//! What it is not: not a closed-loop benchmark, no retries, no reconnection (a connection that
//! fails is reported in `errors` and its unanswered requests count as `noreply`).

use std::io::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;
use symphony_core::prefetch::prefetch;
use symphony_core::wire::{ModelRef, Status, INPUT_LIMIT};
use symphony_core::workload::{Arrival, Phase, Workload};
use symphony_shards::client::{Client, ClientError, Receiver, Sender, WRITE_BUFFER_FLUSH_SIZE};

/// The most connections one run opens (each has two threads).
pub const CONNECTIONS_LIMIT: usize = 1024;
/// The most requests one run sends, all phases together (the run keeps 24 bytes per request):
/// 32 s at a million a second fit.
pub const REQUESTS_LIMIT: u64 = 64_000_000;
/// The largest input of one request.
pub const INPUT_BYTES_LIMIT: usize = 1024 * 1024;
/// The longest run, all phases together.
pub const DURATION_LIMIT_S: f64 = 86_400.0;
/// How long after its last send a connection waits for replies, on top of the largest SLO.
pub const REPLY_GRACE_NS: u64 = 2_000_000_000;
/// The largest latency the histogram resolves; larger ones are recorded as this.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// A sender spin-yields instead of sleeping when its next arrival is closer than this
/// (`thread::sleep` overshoots by about this much).
const SPIN_NS: u64 = 50_000;
/// A sender sleeps this long after each write, so the arrivals of that time go out in one
/// write (at low rates the next arrival is further away than this anyway).
pub const WRITE_GATHER: Duration = Duration::from_micros(100);
/// The longest single sleep, so an abort is seen soon.
const SLEEP_SLICE: Duration = Duration::from_millis(10);
/// A sender stops encoding into one write at this many bytes (the rest goes in the next).
const WRITE_BATCH_BYTES_MAX: usize = 512 * 1024;
/// Read and write timeouts: how often a blocked thread looks at the clock and the abort flag.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// t = 0 of the arrivals is this long after the threads start spawning, plus a little per
/// connection, so every sender is ready for the first arrival.
const START_DELAY: Duration = Duration::from_millis(20);
const START_DELAY_PER_CONNECTION: Duration = Duration::from_micros(200);
const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Significant figures of the latency histogram.
const LATENCY_SIGFIG: u8 = 3;
/// A receiver brings in the request of the reply this many replies ahead of the one it records.
const PREFETCH_AHEAD: usize = 8;

/// A request's slot: not sent yet.
const SLOT_UNSENT: u64 = 0;
/// A request's slot: its reply has been recorded. Any other value is its send time, ns.
const SLOT_REPLIED: u64 = u64::MAX;

/// One status per value of [`Status`], indexed by its wire value.
const STATUS_COUNT: usize = 8;

const _: () = {
    assert!(
        WRITE_BATCH_BYTES_MAX < WRITE_BUFFER_FLUSH_SIZE,
        "a batch must never flush by itself"
    );
    assert!(INPUT_BYTES_LIMIT < INPUT_LIMIT);
    assert!(CONNECTIONS_LIMIT as u64 <= REQUESTS_LIMIT);
    assert!(Status::ExecutionFailed as usize == STATUS_COUNT - 1);
    // Request ids are arrival indexes: they fit every index type on the way.
    assert!(REQUESTS_LIMIT <= u32::MAX as u64);
};

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The server, `host:port`.
    pub target: String,
    /// Models (names, SLOs) and arrival processes; its phases set the run's length.
    pub workload: Workload,
    /// Multiplies every model's rate.
    pub rate_scale: f64,
    /// The arrivals' seed (replaces the workload's).
    pub seed: u64,
    /// TCP connections; arrival `i` goes on connection `i % connections`.
    pub connections: usize,
    /// Bytes of input in every request (zeros).
    pub input_bytes: usize,
    /// Per workload model, bytes of input (zeros) instead of `input_bytes` (for models that
    /// compute: each needs its network's input size).
    pub model_input_bytes: Option<Vec<usize>>,
    /// A progress line on stderr once a second.
    pub progress: bool,
}

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("connections: {connections}, expected 1..={limit}")]
    Connections { connections: usize, limit: usize },
    #[error("rate scale: {rate_scale}, expected a finite number > 0")]
    RateScale { rate_scale: f64 },
    #[error("input bytes: {input_bytes}, expected at most {limit}")]
    InputTooLarge { input_bytes: usize, limit: usize },
    #[error("the workload runs {duration_s} s, over the limit of {limit_s} s")]
    TooLong { duration_s: f64, limit_s: f64 },
    #[error(
        "the workload at rate scale {rate_scale} makes {requests:.0} requests, over the limit of {limit}; \
         lower the rate scale"
    )]
    TooManyRequests { requests: f64, rate_scale: f64, limit: u64 },
    #[error("cannot resolve the target `{target}`: {reason}")]
    Resolve { target: String, reason: String },
    #[error("cannot connect to {addr} (connection {connection}): {source}")]
    Connect {
        addr: SocketAddr,
        connection: usize,
        #[source]
        source: ClientError,
    },
    #[error("cannot start a thread: {0}")]
    Spawn(#[source] std::io::Error),
}

/// Replies per status, bench phase only.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct StatusCounts {
    pub ok: u64,
    pub dropped: u64,
    pub unknown_model: u64,
    pub malformed: u64,
    pub overloaded: u64,
    pub shutting_down: u64,
    pub executor_lost: u64,
    pub execution_failed: u64,
}

impl StatusCounts {
    fn from_array(counts: &[u64; STATUS_COUNT]) -> StatusCounts {
        StatusCounts {
            ok: counts[Status::Ok as usize],
            dropped: counts[Status::Dropped as usize],
            unknown_model: counts[Status::UnknownModel as usize],
            malformed: counts[Status::Malformed as usize],
            overloaded: counts[Status::Overloaded as usize],
            shutting_down: counts[Status::ShuttingDown as usize],
            executor_lost: counts[Status::ExecutorLost as usize],
            execution_failed: counts[Status::ExecutionFailed as usize],
        }
    }
}

/// One model's bench-phase outcome.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ModelLoadReport {
    pub name: String,
    pub slo_ms: f64,
    /// Bench requests.
    pub total: u64,
    pub replies: u64,
    /// `OK` within the SLO.
    pub success: u64,
    /// `OK` after the SLO.
    pub late: u64,
    /// Replies with another status than `OK`.
    pub not_ok: u64,
    pub noreply: u64,
    /// `1 - success / total`, percent.
    pub bad_rate: f64,
}

/// What a run measured (bench phase, unless a field says otherwise), and the parameters used.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LoadReport {
    pub target: String,
    pub workload: String,
    pub rate_scale: f64,
    pub seed: u64,
    pub connections: usize,
    pub input_bytes: usize,
    /// CPUs of this machine (the generator shares them with anything else running).
    pub cpu_count: usize,
    /// Requests of every phase, sent or not.
    pub requests: u64,
    /// Requests written to a connection, every phase.
    pub sent: u64,
    /// Replies recorded, every phase.
    pub received: u64,
    /// Requests never written (a connection failed before their time).
    pub unsent: u64,
    pub bench_s: f64,
    pub bench_requests: u64,
    /// Bench requests per second of bench.
    pub offered_rps: f64,
    /// Bench replies (any status) per second of bench.
    pub achieved_rps: f64,
    /// Bench successes per second of bench.
    pub success_rps: f64,
    /// Latency of bench replies (any status), send to reply, µs.
    pub latency_us_p50: u64,
    pub latency_us_p99: u64,
    pub latency_us_p999: u64,
    pub latency_us_max: u64,
    pub latency_us_mean: f64,
    pub statuses: StatusCounts,
    /// `OK` within the model's SLO.
    pub success: u64,
    /// `OK` after the model's SLO.
    pub late: u64,
    /// Bench requests without a reply when the run ended.
    pub noreply: u64,
    /// `1 - success / bench_requests`, percent.
    pub bad_rate: f64,
    /// The mean over models (with bench requests) of each model's bad rate, percent: the
    /// simulator's `bad_rate`.
    pub bad_rate_model_mean: f64,
    /// How late the sender was at worst: a write's clock reading minus the arrival time of the
    /// oldest request in it, µs, every phase.
    pub send_lag_us_max: u64,
    /// Replies with an id this run did not send on that connection.
    pub unexpected_replies: u64,
    /// Second replies to one request.
    pub duplicate_replies: u64,
    /// Connections that failed, and why.
    pub errors: Vec<String>,
    pub wall_s: f64,
    pub models: Vec<ModelLoadReport>,
    /// Latency of bench replies that were not `OK` (dropped, overloaded, ...), µs: how soon a
    /// request the service cannot serve is told so.
    pub not_ok_latency_us_p50: u64,
    pub not_ok_latency_us_p99: u64,
    pub not_ok_latency_us_max: u64,
    /// Every second of the run (every phase), by arrival time.
    pub timeline: Vec<SecondReport>,
}

/// The requests that arrived in one second of the run, and how they ended.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SecondReport {
    /// Seconds from the start of the run.
    pub second: u64,
    pub offered: u64,
    /// `OK` within the model's SLO.
    pub success: u64,
    /// `OK` after the SLO.
    pub late: u64,
    pub dropped: u64,
    pub overloaded: u64,
    /// Any other status.
    pub other: u64,
    pub noreply: u64,
}

/// Everything the threads share. Each request's slot is written by its connection's sender
/// (unsent to sent, with the send time) before the write that carries it, and by its receiver
/// (sent to replied) when the reply is recorded.
struct Shared<'a> {
    arrivals: &'a [Arrival],
    slots: Vec<AtomicU64>,
    connections: usize,
    models: Vec<ModelRef>,
    slo_ns: Vec<u64>,
    /// Per model: its requests' input.
    inputs: Vec<Vec<u8>>,
    origin: Instant,
    /// A connection waits this long for replies after its last send.
    grace_ns: u64,
    /// A sender whose writes are still blocked at this time gives up.
    send_stop_ns: u64,
    /// Per connection: when its sender finished, `u64::MAX` while it runs.
    sender_done_ns: Vec<AtomicU64>,
    sent: AtomicU64,
    received: AtomicU64,
    lag_ns_max: AtomicU64,
    abort: AtomicBool,
    errors: Mutex<Vec<String>>,
}

impl Shared<'_> {
    /// Nanoseconds since t = 0 of the arrivals (0 before it).
    fn now_ns(&self) -> u64 {
        let elapsed = Instant::now().saturating_duration_since(self.origin);
        u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX)
    }

    fn report_error(&self, message: String) {
        self.errors
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(message);
    }

    /// Brings in what recording the reply to request `id` reads (nothing for a bad id).
    fn prefetch(&self, id: u64) {
        let Ok(index) = usize::try_from(id) else {
            return;
        };
        if let (Some(slot), Some(arrival)) = (self.slots.get(index), self.arrivals.get(index)) {
            prefetch(slot);
            prefetch(arrival);
        }
    }

    /// The arrivals connection `connection` carries.
    fn expected(&self, connection: usize) -> u64 {
        let n = self.arrivals.len();
        if connection >= n {
            return 0;
        }
        ((n - connection).div_ceil(self.connections)) as u64
    }
}

/// What one connection's receiver recorded.
struct ConnectionStats {
    latency_us: Histogram<u32>,
    statuses: [u64; STATUS_COUNT],
    /// Per model: replies, success, late, not OK (bench phase).
    models: Vec<[u64; 4]>,
    bench_replies: u64,
    unexpected: u64,
    duplicate: u64,
    /// Bench replies that were not `OK`.
    not_ok_latency_us: Histogram<u32>,
    /// Per second of arrival time: success, late, dropped, overloaded, other.
    timeline: Vec<[u64; 5]>,
}

fn latency_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, LATENCY_SIGFIG).expect("constant bounds are valid")
}

/// The expected number of requests of every phase: the sum of rate × duration over segments.
pub fn expected_requests(workload: &Workload, rate_scale: f64) -> f64 {
    workload
        .models
        .iter()
        .flat_map(|m| m.phases.warmup.iter().chain(&m.phases.bench).chain(&m.phases.cooldown))
        .map(|s| s.rps * rate_scale * s.duration_ns as f64 / 1e9)
        .sum()
}

/// Checks a spec against the limits.
pub fn check(spec: &LoadSpec) -> Result<(), LoadError> {
    if spec.connections == 0 || spec.connections > CONNECTIONS_LIMIT {
        return Err(LoadError::Connections {
            connections: spec.connections,
            limit: CONNECTIONS_LIMIT,
        });
    }
    if !(spec.rate_scale.is_finite() && spec.rate_scale > 0.0) {
        return Err(LoadError::RateScale {
            rate_scale: spec.rate_scale,
        });
    }
    if let Some(bytes) = &spec.model_input_bytes {
        if let Some(&largest) = bytes.iter().max().filter(|&&b| b > INPUT_BYTES_LIMIT) {
            return Err(LoadError::InputTooLarge {
                input_bytes: largest,
                limit: INPUT_BYTES_LIMIT,
            });
        }
    }
    if spec.input_bytes > INPUT_BYTES_LIMIT {
        return Err(LoadError::InputTooLarge {
            input_bytes: spec.input_bytes,
            limit: INPUT_BYTES_LIMIT,
        });
    }
    let duration_s = spec.workload.end_ns() as f64 / 1e9;
    if duration_s > DURATION_LIMIT_S {
        return Err(LoadError::TooLong {
            duration_s,
            limit_s: DURATION_LIMIT_S,
        });
    }
    let requests = expected_requests(&spec.workload, spec.rate_scale);
    // The arrival process is random: leave room so a run near the limit does not fail late.
    if requests * 1.01 > REQUESTS_LIMIT as f64 {
        return Err(LoadError::TooManyRequests {
            requests,
            rate_scale: spec.rate_scale,
            limit: REQUESTS_LIMIT,
        });
    }
    Ok(())
}

/// Runs the load and waits for the replies; see the module doc.
pub fn run(spec: &LoadSpec) -> Result<LoadReport, LoadError> {
    check(spec)?;
    let mut arrivals = Vec::new();
    spec.workload
        .generate_arrivals(spec.rate_scale, spec.seed, &mut arrivals);
    if arrivals.len() as u64 > REQUESTS_LIMIT {
        return Err(LoadError::TooManyRequests {
            requests: arrivals.len() as f64,
            rate_scale: spec.rate_scale,
            limit: REQUESTS_LIMIT,
        });
    }
    let addr = resolve(&spec.target)?;
    let mut clients = Vec::with_capacity(spec.connections);
    for connection in 0..spec.connections {
        let client = Client::connect(addr).map_err(|source| LoadError::Connect {
            addr,
            connection,
            source,
        })?;
        client
            .set_read_timeout(Some(POLL_INTERVAL))
            .and_then(|()| client.set_write_timeout(Some(POLL_INTERVAL)))
            .map_err(|source| LoadError::Connect {
                addr,
                connection,
                source,
            })?;
        clients.push(client);
    }

    let slo_ns_max = spec.workload.models.iter().map(|m| m.slo_ns).max().unwrap_or(0);
    let grace_ns = slo_ns_max.saturating_add(REPLY_GRACE_NS);
    let last_arrival_ns = arrivals.last().map_or(0, |a| a.arrival_ns);
    let wall_start = Instant::now();
    let shared = Shared {
        arrivals: &arrivals,
        slots: (0..arrivals.len()).map(|_| AtomicU64::new(SLOT_UNSENT)).collect(),
        connections: spec.connections,
        models: spec
            .workload
            .models
            .iter()
            .map(|m| ModelRef::Name(m.name.clone()))
            .collect(),
        slo_ns: spec.workload.models.iter().map(|m| m.slo_ns).collect(),
        inputs: (0..spec.workload.models.len())
            .map(|m| {
                let bytes = spec
                    .model_input_bytes
                    .as_ref()
                    .and_then(|b| b.get(m).copied())
                    .unwrap_or(spec.input_bytes);
                vec![0u8; bytes]
            })
            .collect(),
        origin: wall_start + START_DELAY + START_DELAY_PER_CONNECTION * spec.connections as u32,
        grace_ns,
        send_stop_ns: last_arrival_ns.saturating_add(grace_ns),
        sender_done_ns: (0..spec.connections).map(|_| AtomicU64::new(u64::MAX)).collect(),
        sent: AtomicU64::new(0),
        received: AtomicU64::new(0),
        lag_ns_max: AtomicU64::new(0),
        abort: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
    };

    let stats = thread::scope(|scope| -> Result<Vec<ConnectionStats>, LoadError> {
        let shared = &shared;
        let mut receivers = Vec::with_capacity(spec.connections);
        let mut spawn_error = None;
        for (connection, client) in clients.into_iter().enumerate() {
            let (sender, receiver) = client.split();
            let spawned = thread::Builder::new()
                .name(format!("loadgen-send-{connection}"))
                .spawn_scoped(scope, move || send_loop(shared, connection, sender))
                .and_then(|_| {
                    thread::Builder::new()
                        .name(format!("loadgen-recv-{connection}"))
                        .spawn_scoped(scope, move || receive_loop(shared, connection, receiver))
                });
            match spawned {
                Ok(handle) => receivers.push(handle),
                Err(error) => {
                    spawn_error = Some(error);
                    break;
                }
            }
        }
        if let Some(error) = spawn_error {
            shared.abort.store(true, Ordering::Relaxed);
            return Err(LoadError::Spawn(error));
        }
        if spec.progress {
            show_progress(shared, &receivers, spec.workload.end_ns());
        }
        Ok(receivers
            .into_iter()
            .map(|handle| handle.join().expect("a receiver thread panicked"))
            .collect())
    })?;
    let wall_s = wall_start.elapsed().as_secs_f64();
    Ok(summarize(spec, &shared, stats, wall_s))
}

fn resolve(target: &str) -> Result<SocketAddr, LoadError> {
    let resolve_error = |reason: String| LoadError::Resolve {
        target: target.to_string(),
        reason,
    };
    let mut addrs = target.to_socket_addrs().map_err(|e| resolve_error(e.to_string()))?;
    addrs.next().ok_or_else(|| resolve_error("no address".to_string()))
}

/// One connection's sender: every due request into one buffer, one write.
fn send_loop(shared: &Shared<'_>, connection: usize, mut sender: Sender) {
    let arrivals = shared.arrivals;
    let mut next = connection;
    let mut failure = None;
    'run: while next < arrivals.len() {
        if shared.abort.load(Ordering::Relaxed) {
            break;
        }
        let now_ns = shared.now_ns();
        let due_ns = arrivals[next].arrival_ns;
        if due_ns > now_ns {
            let wait_ns = due_ns - now_ns;
            if wait_ns > SPIN_NS {
                thread::sleep(Duration::from_nanos(wait_ns - SPIN_NS).min(SLEEP_SLICE));
            } else {
                thread::yield_now();
            }
            continue;
        }
        shared.lag_ns_max.fetch_max(now_ns - due_ns, Ordering::Relaxed);
        let mut count = 0u64;
        while next < arrivals.len()
            && arrivals[next].arrival_ns <= now_ns
            && sender.buffered_len() < WRITE_BATCH_BYTES_MAX
        {
            let model_index = arrivals[next].model_index as usize;
            let model = &shared.models[model_index];
            // The send time is stored before the write that carries the request, so the reply
            // cannot find the slot still unsent.
            shared.slots[next].store(now_ns.max(1), Ordering::Release);
            if let Err(error) = sender.send(next as u64, model, None, &shared.inputs[model_index]) {
                shared.slots[next].store(SLOT_UNSENT, Ordering::Release);
                failure = Some(error);
                break 'run;
            }
            next += shared.connections;
            count += 1;
        }
        assert!(count > 0);
        loop {
            match sender.flush() {
                Ok(()) => break,
                Err(ClientError::Timeout)
                    if shared.now_ns() < shared.send_stop_ns && !shared.abort.load(Ordering::Relaxed) => {}
                Err(error) => {
                    failure = Some(error);
                    break 'run;
                }
            }
        }
        shared.sent.fetch_add(count, Ordering::Relaxed);
        thread::sleep(WRITE_GATHER);
    }
    if let Some(error) = failure {
        shared.report_error(format!("connection {connection}: sending: {error}"));
    }
    shared.sender_done_ns[connection].store(shared.now_ns(), Ordering::Release);
}

/// One connection's receiver: records every reply until all came or the grace time is over.
fn receive_loop(shared: &Shared<'_>, connection: usize, mut receiver: Receiver) -> ConnectionStats {
    let expected = shared.expected(connection);
    let mut stats = ConnectionStats {
        latency_us: latency_histogram(),
        statuses: [0; STATUS_COUNT],
        models: vec![[0; 4]; shared.models.len()],
        bench_replies: 0,
        unexpected: 0,
        duplicate: 0,
        not_ok_latency_us: latency_histogram(),
        timeline: Vec::new(),
    };
    let mut replies = 0u64;
    // A read's replies, taken from the buffer first: the slots and arrivals they answer are
    // scattered over the whole run (a plan answers requests sent tens of milliseconds apart),
    // so each is fetched a few replies ahead of its recording instead of missing the cache in
    // turn (at 1,000,000 req/s those misses made a receiver fall behind its socket).
    let mut batch: Vec<(u64, Status)> = Vec::new();
    while replies < expected {
        let result = receiver.recv_batch_with(|reply| batch.push((reply.client_request_id.to_native(), reply.status)));
        // One clock reading per read: the replies of one batch arrived together.
        let now_ns = shared.now_ns();
        for &(id, _) in batch.iter().take(PREFETCH_AHEAD) {
            shared.prefetch(id);
        }
        let mut recorded = 0u64;
        for (i, &(id, status)) in batch.iter().enumerate() {
            if let Some(&(ahead, _)) = batch.get(i + PREFETCH_AHEAD) {
                shared.prefetch(ahead);
            }
            if record_reply(shared, connection, &mut stats, id, status, now_ns) {
                recorded += 1;
            }
        }
        batch.clear();
        replies += recorded;
        shared.received.fetch_add(recorded, Ordering::Relaxed);
        match result {
            Ok(_) | Err(ClientError::Timeout) => {}
            Err(error) => {
                shared.report_error(format!(
                    "connection {connection}: receiving: {error} ({} replies missing)",
                    expected - replies
                ));
                break;
            }
        }
        if shared.abort.load(Ordering::Relaxed) {
            break;
        }
        let done_ns = shared.sender_done_ns[connection].load(Ordering::Acquire);
        if done_ns != u64::MAX && shared.now_ns() > done_ns.saturating_add(shared.grace_ns) {
            break;
        }
    }
    stats
}

/// Records one reply; false if it answers no request of this connection in flight.
fn record_reply(
    shared: &Shared<'_>,
    connection: usize,
    stats: &mut ConnectionStats,
    id: u64,
    status: Status,
    now_ns: u64,
) -> bool {
    let index = match usize::try_from(id) {
        Ok(index) if index < shared.arrivals.len() && index % shared.connections == connection => index,
        _ => {
            stats.unexpected += 1;
            return false;
        }
    };
    let sent_ns = shared.slots[index].load(Ordering::Acquire);
    match sent_ns {
        SLOT_UNSENT => {
            stats.unexpected += 1;
            return false;
        }
        SLOT_REPLIED => {
            stats.duplicate += 1;
            return false;
        }
        _ => shared.slots[index].store(SLOT_REPLIED, Ordering::Relaxed),
    }
    let arrival = shared.arrivals[index];
    let latency_ns = now_ns.saturating_sub(sent_ns);
    let model = arrival.model_index as usize;
    let second = (arrival.arrival_ns / 1_000_000_000) as usize;
    if stats.timeline.len() <= second {
        stats.timeline.resize(second + 1, [0; 5]);
    }
    let column = match status {
        Status::Ok if latency_ns <= shared.slo_ns[model] => 0,
        Status::Ok => 1,
        Status::Dropped => 2,
        Status::Overloaded => 3,
        _ => 4,
    };
    stats.timeline[second][column] += 1;
    if arrival.phase != Phase::Bench {
        return true;
    }
    stats.latency_us.saturating_record(latency_ns / 1000);
    if status != Status::Ok {
        stats.not_ok_latency_us.saturating_record(latency_ns / 1000);
    }
    stats.bench_replies += 1;
    stats.statuses[status as usize] += 1;
    let counts = &mut stats.models[model];
    counts[0] += 1;
    if status == Status::Ok {
        if latency_ns <= shared.slo_ns[model] {
            counts[1] += 1;
        } else {
            counts[2] += 1;
        }
    } else {
        counts[3] += 1;
    }
    true
}

/// Prints a progress line once a second until every receiver has finished.
fn show_progress<T>(shared: &Shared<'_>, receivers: &[thread::ScopedJoinHandle<'_, T>], end_ns: u64) {
    let mut last_print = Instant::now();
    let mut last_received = 0u64;
    while !receivers.iter().all(|handle| handle.is_finished()) {
        thread::sleep(POLL_INTERVAL);
        let elapsed = last_print.elapsed();
        if elapsed < PROGRESS_INTERVAL {
            continue;
        }
        let sent = shared.sent.load(Ordering::Relaxed);
        let received = shared.received.load(Ordering::Relaxed);
        let rate = (received - last_received) as f64 / elapsed.as_secs_f64();
        eprint!(
            "\r\x1b[Kloadgen: {:.1}/{:.1} s, sent {sent}, received {received}, in flight {}, {rate:.0} replies/s, \
             send lag max {} us",
            shared.now_ns() as f64 / 1e9,
            end_ns as f64 / 1e9,
            sent.saturating_sub(received),
            shared.lag_ns_max.load(Ordering::Relaxed) / 1000,
        );
        let _ = std::io::stderr().flush();
        last_print = Instant::now();
        last_received = received;
    }
    eprintln!();
}

fn summarize(spec: &LoadSpec, shared: &Shared<'_>, stats: Vec<ConnectionStats>, wall_s: f64) -> LoadReport {
    let model_count = spec.workload.models.len();
    let mut latency_us = latency_histogram();
    let mut statuses = [0u64; STATUS_COUNT];
    let mut models = vec![[0u64; 4]; model_count];
    let mut bench_replies = 0;
    let mut unexpected_replies = 0;
    let mut duplicate_replies = 0;
    let mut not_ok_latency_us = latency_histogram();
    let seconds = (spec.workload.end_ns() / 1_000_000_000 + 1) as usize;
    let mut timeline: Vec<SecondReport> = (0..seconds)
        .map(|second| SecondReport {
            second: second as u64,
            ..SecondReport::default()
        })
        .collect();
    for connection in &stats {
        latency_us
            .add(&connection.latency_us)
            .expect("histograms with the same bounds add");
        not_ok_latency_us
            .add(&connection.not_ok_latency_us)
            .expect("histograms with the same bounds add");
        for (second, counts) in connection.timeline.iter().enumerate() {
            if let Some(t) = timeline.get_mut(second) {
                t.success += counts[0];
                t.late += counts[1];
                t.dropped += counts[2];
                t.overloaded += counts[3];
                t.other += counts[4];
            }
        }
        for (total, count) in statuses.iter_mut().zip(connection.statuses) {
            *total += count;
        }
        for (total, counts) in models.iter_mut().zip(&connection.models) {
            for (t, c) in total.iter_mut().zip(counts) {
                *t += c;
            }
        }
        bench_replies += connection.bench_replies;
        unexpected_replies += connection.unexpected;
        duplicate_replies += connection.duplicate;
    }

    let mut totals = vec![0u64; model_count];
    let mut noreplies = vec![0u64; model_count];
    let mut unsent = 0;
    for (arrival, slot) in shared.arrivals.iter().zip(&shared.slots) {
        let slot = slot.load(Ordering::Relaxed);
        unsent += u64::from(slot == SLOT_UNSENT);
        if let Some(t) = timeline.get_mut((arrival.arrival_ns / 1_000_000_000) as usize) {
            t.offered += 1;
            t.noreply += u64::from(slot != SLOT_REPLIED);
        }
        if arrival.phase == Phase::Bench {
            totals[arrival.model_index as usize] += 1;
            noreplies[arrival.model_index as usize] += u64::from(slot != SLOT_REPLIED);
        }
    }
    let bad_rate = |success: u64, total: u64| {
        if total == 0 {
            0.0
        } else {
            100.0 * (1.0 - success as f64 / total as f64)
        }
    };
    let model_reports: Vec<ModelLoadReport> = spec
        .workload
        .models
        .iter()
        .enumerate()
        .map(|(index, model)| {
            let [replies, success, late, not_ok] = models[index];
            ModelLoadReport {
                name: model.name.clone(),
                slo_ms: model.slo_ns as f64 / 1e6,
                total: totals[index],
                replies,
                success,
                late,
                not_ok,
                noreply: noreplies[index],
                bad_rate: bad_rate(success, totals[index]),
            }
        })
        .collect();
    let measured: Vec<f64> = model_reports
        .iter()
        .filter(|m| m.total > 0)
        .map(|m| m.bad_rate)
        .collect();
    let bad_rate_model_mean = if measured.is_empty() {
        0.0
    } else {
        measured.iter().sum::<f64>() / measured.len() as f64
    };

    let bench_requests: u64 = totals.iter().sum();
    let success: u64 = model_reports.iter().map(|m| m.success).sum();
    let (bench_start_ns, bench_end_ns) = spec.workload.bench_window_ns();
    let bench_s = (bench_end_ns.saturating_sub(bench_start_ns) as f64 / 1e9).max(1e-9);
    let mut errors = shared
        .errors
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    errors.sort();
    LoadReport {
        target: spec.target.clone(),
        workload: spec.workload.source.clone(),
        rate_scale: spec.rate_scale,
        seed: spec.seed,
        connections: spec.connections,
        input_bytes: spec.input_bytes,
        cpu_count: thread::available_parallelism().map_or(1, |n| n.get()),
        requests: shared.arrivals.len() as u64,
        sent: shared.sent.load(Ordering::Relaxed),
        received: shared.received.load(Ordering::Relaxed),
        unsent,
        bench_s,
        bench_requests,
        offered_rps: bench_requests as f64 / bench_s,
        achieved_rps: bench_replies as f64 / bench_s,
        success_rps: success as f64 / bench_s,
        latency_us_p50: latency_us.value_at_quantile(0.5),
        latency_us_p99: latency_us.value_at_quantile(0.99),
        latency_us_p999: latency_us.value_at_quantile(0.999),
        latency_us_max: latency_us.max(),
        latency_us_mean: latency_us.mean(),
        statuses: StatusCounts::from_array(&statuses),
        success,
        late: model_reports.iter().map(|m| m.late).sum(),
        noreply: noreplies.iter().sum(),
        bad_rate: bad_rate(success, bench_requests),
        bad_rate_model_mean,
        send_lag_us_max: shared.lag_ns_max.load(Ordering::Relaxed) / 1000,
        unexpected_replies,
        duplicate_replies,
        errors,
        wall_s,
        models: model_reports,
        not_ok_latency_us_p50: not_ok_latency_us.value_at_quantile(0.5),
        not_ok_latency_us_p99: not_ok_latency_us.value_at_quantile(0.99),
        not_ok_latency_us_max: not_ok_latency_us.max(),
        timeline,
    }
}
