//! The VOPR: the whole service simulated from one seed (TigerBeetle's Viewstamped Operation
//! Replicator, for this service).
//!
//! N real [`ShardCore`]s run on one thread in virtual time, around them a simulated driver
//! (the frame loop with its backpressure and backlog shedding, writers, timers that may fire
//! late), a simulated mesh (random delays and a capacity, the order per pair of shards kept
//! and no more),
//! simulated clients (pipelining, tighter SLOs, unknown models, wrong input sizes, slow
//! readers, abrupt disconnects, half-closes, malformed frames, LIST_MODELS) and simulated
//! executors speaking the link protocol (results late, lost or malformed, heartbeats missed,
//! crashes and reconnects, clock skew and drift). Everything is drawn from one seed, so a failure
//! replays exactly: [`Scenario::sample`] draws every knob, [`Scenario::describe`] prints them.
//! Replaying one seed (`vopr --seed N`) prints the shards' log lines; with `VOPR_TRACE=1` also
//! every input and every plan checked, and with `VOPR_DUMP=1` every shard's state at the end.
//!
//! Checked on every run: each request gets at most one reply, and exactly one on a
//! connection that stays open; no GPU is planned two batches at once; no batch is planned to
//! finish after a deadline of its requests (the scheduler's own model); the shards'
//! invariants after every input ([`ShardCore::check_invariants`]); what a connection and a
//! shard hold stays within the limits; and once the faults stop, the service serves again
//! (every probe request is answered OK) and ends holding nothing.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, OnceLock};

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use symphony_core::policy::deferred::Config;
use symphony_core::policy::{Knobs, ModelConfig, Plan, PolicyKind};
use symphony_core::profile::Profile;
use symphony_core::wire::executor::{
    self as exec, GpuInfo, Heartbeat, Hello, Join, ModelProfile, PlanStatus, ProfileWire, Register, ResultMsg,
};
use symphony_core::wire::{self, FrameDecoder, Kind, ModelRef, RequestRef, Status};
use symphony_shards::buffers::ReadBuffer;
use symphony_shards::config::{Limits, Timeouts};
use symphony_shards::executors::Executors;
use symphony_shards::shard::{
    Catalog, ConnectionKey, Effect, Effects, Input, Peer, ShardCore, ShardMsg, ShardParams, TimeoutsNs,
};
use symphony_shards::stats::Stats;
use symphony_shards::sync::gpu_table::GpuTable;

const MS: u64 = 1_000_000;
const TOKEN: &str = "vopr-token";
/// Bytes the simulated driver reads from a connection at once.
const READ_BYTES: usize = 64 << 10;
/// Frames the simulated driver hands over per turn (as the real one).
const FRAMES_PER_TURN: usize = 256;
/// How often a waiting reader looks again (the real one is woken; the simulation polls).
const POLL_NS: u64 = MS;

/// Per-mille rates of the faults, and how far they go (`default()`: none).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Per client: it disconnects abruptly partway.
    pub disconnect: u32,
    /// Per client: it half-closes after its last request.
    pub half_close: u32,
    /// Per client: it sends a malformed frame partway.
    pub malformed: u32,
    /// Per client: it reads its replies slowly.
    pub slow_reader: u32,
    /// Per request: an unknown model, a wrong input size, a tighter SLO.
    pub bad_request: u32,
    pub tighter_slo: u32,
    /// Per plan on an executor: its result comes late, never, or malformed.
    pub result_late: u32,
    pub result_lost: u32,
    pub result_malformed: u32,
    /// Per heartbeat period of an executor: it stops heartbeating for a while; it crashes.
    pub heartbeat_gap: u32,
    pub crash: u32,
    /// The most a timer fires late (a busy machine), and a mesh message takes.
    pub timer_late_ns: u64,
    pub mesh_delay_ns: u64,
    /// The most an executor's reported times are off (clock skew), and the most its clock
    /// drifts from there (parts per million of the time elapsed).
    pub skew_ns: u64,
    pub drift_ppm: u32,
}

/// A simulated external executor.
#[derive(Debug, Clone)]
pub struct ExecutorSpec {
    pub gpus: u32,
    /// Its profiles are the catalog's times this factor (per mille).
    pub slowdown_permille: u32,
}

/// Every knob of one run, drawn from its seed.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    pub shards: usize,
    pub embedded_gpus: u32,
    pub executors: Vec<ExecutorSpec>,
    pub models: Vec<ModelConfig>,
    pub input_bytes: Vec<Option<u32>>,
    pub policy: PolicyKind,
    pub limits: Limits,
    pub timeouts: Timeouts,
    pub clients: usize,
    pub requests_per_client: u32,
    pub pipeline_max: u32,
    /// Messages in flight between two shards past which the sender's front door stops.
    pub mesh_capacity: usize,
    pub faults: Faults,
    /// Faults stop here; the probes start a while after.
    pub faults_until_ns: u64,
}

impl Scenario {
    /// Draws every knob from `seed`.
    pub fn sample(seed: u64) -> Scenario {
        let mut rng = Pcg64::seed_from_u64(seed ^ 0x5f0e_c0de);
        let shards = rng.random_range(1..=4);
        let external = rng.random_range(0..=2usize);
        let embedded_gpus = if external == 0 {
            rng.random_range(1..=4)
        } else {
            rng.random_range(0..=2)
        };
        let executors = (0..external)
            .map(|_| ExecutorSpec {
                gpus: rng.random_range(1..=2),
                slowdown_permille: rng.random_range(1000..=1300),
            })
            .collect();
        let model_count = rng.random_range(1..=5);
        let mut models = Vec::new();
        let mut input_bytes = Vec::new();
        for index in 0..model_count {
            let slope_us = rng.random_range(100..=2000u64);
            let base_us = rng.random_range(500..=5000u64);
            // Room for a batch of one at the slowest executor's pace, and then some.
            let slo_ms = ((base_us + slope_us) * 4 / 1000).max(10) + rng.random_range(0..=100);
            let slo_ns = slo_ms * MS;
            let profile = Profile::parse_linear(&format!("sleep#{slope_us},{base_us},0,0"), slo_ns)
                .expect("a valid linear profile");
            models.push(ModelConfig {
                name: format!("m{index}"),
                profile,
                slo_ns,
            });
            input_bytes.push(rng.random_bool(0.3).then(|| rng.random_range(0..=64)));
        }
        let policy = [PolicyKind::Symphony, PolicyKind::SymphonyRef, PolicyKind::Eager][rng.random_range(0..3)];
        let limits = Limits {
            requests_per_shard: [64, 512, 65536][rng.random_range(0..3)],
            requests_per_connection: [8, 64, 16384][rng.random_range(0..3)],
            request_bytes_per_connection: [256, 64 << 20][rng.random_range(0..2)],
            request_bytes_per_shard: [1024, 1 << 30][rng.random_range(0..2)],
            write_buffer_bytes: [512, 1 << 20][rng.random_range(0..2)],
            routed_batch: rng.random_range(1..=64),
            ..Limits::default()
        };
        let timeouts = Timeouts {
            heartbeat_ms: rng.random_range(100..=1000),
            plan_ms: rng.random_range(50..=1000),
            handshake_ms: 2000,
            write_stall_ms: 10_000,
            // The driver's backlog rule (below) sheds a client's requests while it is behind.
            backlog_shed_ms: [0, 1, 5, 100][rng.random_range(0..4)],
        };
        let p = |rng: &mut Pcg64, max: u32| rng.random_range(0..=max);
        let faults = Faults {
            disconnect: p(&mut rng, 300),
            half_close: p(&mut rng, 300),
            malformed: p(&mut rng, 100),
            slow_reader: p(&mut rng, 300),
            bad_request: p(&mut rng, 50),
            tighter_slo: p(&mut rng, 100),
            result_late: p(&mut rng, 50),
            result_lost: p(&mut rng, 20),
            result_malformed: p(&mut rng, 5),
            heartbeat_gap: p(&mut rng, 10),
            crash: p(&mut rng, 5),
            timer_late_ns: rng.random_range(0..=2 * MS),
            mesh_delay_ns: rng.random_range(0..=MS),
            skew_ns: rng.random_range(0..=MS),
            // From a stream of its own: the knobs drawn before it stay those of earlier runs.
            drift_ppm: Pcg64::seed_from_u64(seed ^ 0xd21f_7000).random_range(0..=500),
        };
        Scenario {
            seed,
            shards,
            embedded_gpus,
            executors,
            models,
            input_bytes,
            policy,
            limits,
            timeouts,
            clients: rng.random_range(1..=8),
            requests_per_client: rng.random_range(1..=400),
            pipeline_max: rng.random_range(1..=64),
            mesh_capacity: rng.random_range(1..=32),
            faults,
            faults_until_ns: rng.random_range(200..=2000) * MS,
        }
    }

    /// When the probes may start: the faults' last consequences are over by then (a lost
    /// plan's two timeouts, a missed heartbeat's loss, a reconnect).
    pub fn probe_at_ns(&self) -> u64 {
        let slo_max_ns = self.models.iter().map(|m| m.slo_ns).max().unwrap_or(0);
        self.faults_until_ns
            + 3 * self.timeouts.heartbeat_ms * MS
            + 2 * self.timeouts.plan_ms * MS
            + slo_max_ns
            + 1000 * MS
    }

    /// Every knob, on a few lines.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "seed {}: {} shards, {} embedded GPUs, executors {:?}, policy {}",
            self.seed,
            self.shards,
            self.embedded_gpus,
            self.executors
                .iter()
                .map(|e| (e.gpus, e.slowdown_permille))
                .collect::<Vec<_>>(),
            self.policy.name()
        );
        for (m, bytes) in self.models.iter().zip(&self.input_bytes) {
            let _ = writeln!(
                out,
                "  model {}: slo {} ms, l(1) {} us, input {:?}",
                m.name,
                m.slo_ns / MS,
                m.profile.exec_ns(1) / 1000,
                bytes
            );
        }
        let _ = writeln!(
            out,
            "  clients {} x {} requests, pipeline <= {}, mesh capacity {}, faults until {} ms",
            self.clients,
            self.requests_per_client,
            self.pipeline_max,
            self.mesh_capacity,
            self.faults_until_ns / MS
        );
        let _ = writeln!(out, "  limits {:?}", self.limits);
        let _ = writeln!(out, "  timeouts {:?}", self.timeouts);
        let _ = write!(out, "  faults {:?}", self.faults);
        out
    }
}

/// What one run did.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub requests: u64,
    pub replies: u64,
    pub ok: u64,
    /// Requests and OK replies per model (probes included).
    pub requests_by_model: Vec<u64>,
    pub ok_by_model: Vec<u64>,
    /// GPUs a release reserved for another shard's waiting candidate.
    pub handoffs: u64,
    pub plans: u64,
    pub executor_losses: u64,
    pub events: u64,
    /// Virtual time the run covered.
    pub simulated_ns: u64,
}

/// Who is at the other end of a simulated connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owner {
    Client(usize),
    /// An executor's control connection (front door).
    Control(usize),
    /// An executor's link to a shard.
    Link(usize, usize),
}

#[derive(Debug)]
struct Conn {
    shard: usize,
    peer: Peer,
    owner: Owner,
    /// Bytes the peer sent and the shard has not read.
    to_server: Vec<u8>,
    /// The shard's receive buffer.
    buffer: ReadBuffer,
    /// Bytes the shard wrote and the peer has not read.
    to_peer: Vec<u8>,
    /// The peer sent its last byte (a half-close).
    eof: bool,
    /// The core asked for the close.
    server_closing: bool,
    /// The shard was told it closed (`Input::Closed`).
    server_gone: bool,
    /// The peer is gone.
    peer_gone: bool,
    read_scheduled: bool,
    peer_read_scheduled: bool,
    /// When a read last took everything the peer had sent, and whether the shard was told it
    /// is behind this client (`Input::Backlog`, the real driver's rule).
    drained_ns: u64,
    behind: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Stay,
    Disconnect(u32),
    Malformed(u32),
    HalfClose,
}

#[derive(Debug)]
struct Client {
    conn: usize,
    next_id: u64,
    /// Requests without a reply, with their model.
    outstanding: HashMap<u64, usize>,
    replied: std::collections::HashSet<u64>,
    to_send: u32,
    sent: u32,
    pipeline: u32,
    slow: bool,
    fate: Fate,
    /// It broke off (disconnected or sent garbage): replies are no longer owed.
    broken: bool,
    done: bool,
    /// A probe: every reply must be OK.
    probe: bool,
    decoder_buf: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
enum ExecState {
    Down,
    Hello,
    Registering,
    Joining(usize),
    Up,
}

#[derive(Debug)]
struct SimExecutor {
    spec: ExecutorSpec,
    profiles: Vec<Profile>,
    state: ExecState,
    /// Bumped by every crash: what an older incarnation scheduled is void.
    incarnation: u32,
    control: Option<usize>,
    links: Vec<Option<usize>>,
    executor_id: u32,
    secret: [u8; exec::SECRET_BYTES],
    /// Per GPU: when it is free.
    gpu_free: Vec<u64>,
    /// Heartbeats paused until.
    silent_until: u64,
    skew_ns: i64,
    drift_ppm: i64,
    inbox: Vec<Vec<u8>>,
}

#[derive(Debug)]
enum Event {
    Timer(usize),
    Embedded {
        shard: usize,
        plan_id: u64,
        started_ns: u64,
        finished_ns: u64,
    },
    Mesh {
        from: usize,
        to: usize,
    },
    ServerRead(usize),
    /// The shard's reader of a connection ends.
    ServerClosed(usize),
    PeerRead(usize),
    ClientAct(usize),
    ExecutorConnect(usize, u32),
    Heartbeat(usize, u32),
    Result {
        executor: usize,
        incarnation: u32,
        shard: usize,
        frame: Vec<u8>,
    },
    Probe,
}

/// A GPU as the checks see it: (0, 0, table slot) embedded, or (1 + executor, its
/// incarnation, its GPU index).
type Lane = (u32, u32, u32);

/// One run of a scenario.
struct World<'a> {
    scenario: &'a Scenario,
    rng: Pcg64,
    now: u64,
    seq: u64,
    events: BTreeMap<(u64, u64), Event>,
    cores: Vec<ShardCore>,
    timer_at: Vec<Option<u64>>,
    /// Per shard: timers handled at one instant (a wake-up time that never moves spins).
    spins: Vec<(u64, u32)>,
    next_slot: Vec<u32>,
    conns: Vec<Conn>,
    by_peer: HashMap<(usize, Peer), usize>,
    clients: Vec<Client>,
    executors: Vec<SimExecutor>,
    /// Per (from, to): messages with their delivery times.
    mesh: Vec<Vec<VecDeque<(u64, ShardMsg)>>>,
    fx: Effects,
    /// Per GPU lane (table slot, or executor, incarnation and GPU): the planned
    /// `[exec_at, finish)` of its plans, by start.
    lanes: HashMap<Lane, BTreeMap<u64, (u64, u64)>>,
    outcome: Outcome,
    stats: Arc<Stats>,
    /// Per owner shard: client connections (origin shard, key) whose queued requests it
    /// cancelled; none of their requests may be planned after.
    gone: std::collections::HashSet<(usize, u32, ConnectionKey)>,
    /// The first check that failed inside an effect (reported at the next step).
    failure: Option<String>,
    log: Vec<String>,
    verbose: bool,
    probes_sent: bool,
    end_ns: u64,
}

/// Runs `scenario`; an error says which check failed and when. Panics (a shard's own
/// invariants) are the caller's to catch.
pub fn run(scenario: &Scenario, verbose: bool) -> Result<Outcome, String> {
    let mut world = World::new(scenario, verbose);
    world.run()
}

impl<'a> World<'a> {
    fn new(scenario: &'a Scenario, verbose: bool) -> World<'a> {
        let shard_count = scenario.shards;
        let external_gpus: u32 = scenario.executors.iter().map(|e| e.gpus).sum::<u32>() * 2;
        let catalog = Arc::new(Catalog::new(&scenario.models, &scenario.input_bytes, shard_count));
        let table = Arc::new(GpuTable::with_offline(
            scenario.embedded_gpus as usize,
            external_gpus as usize,
            shard_count,
        ));
        let executors = Arc::new(Executors::new(
            (!scenario.executors.is_empty()).then(|| TOKEN.to_string()),
            Arc::clone(&table),
            scenario.embedded_gpus,
            external_gpus,
            shard_count,
        ));
        let link_addrs = Arc::new(OnceLock::new());
        let _ = link_addrs.set((0..shard_count).map(|s| format!("sim:{s}")).collect());
        let stats = Arc::new(Stats::default());
        let knobs = Knobs::default();
        let cores = (0..shard_count)
            .map(|id| {
                ShardCore::new(ShardParams {
                    id: id as u32,
                    shard_count,
                    catalog: Arc::clone(&catalog),
                    policy: Config::of(scenario.policy, &knobs),
                    knobs: knobs.clone(),
                    limits: scenario.limits,
                    timeouts: TimeoutsNs::of(&scenario.timeouts),
                    table: Arc::clone(&table),
                    embedded_gpus: scenario.embedded_gpus,
                    embedded_exec: symphony_core::sim::ExecModel::default(),
                    executors: Arc::clone(&executors),
                    link_addrs: Arc::clone(&link_addrs),
                    zero_copy: true,
                    stats: Arc::clone(&stats),
                })
            })
            .collect();
        let probe_at = scenario.probe_at_ns();
        World {
            scenario,
            rng: Pcg64::seed_from_u64(scenario.seed),
            now: 0,
            seq: 0,
            events: BTreeMap::new(),
            cores,
            timer_at: vec![None; shard_count],
            spins: vec![(0, 0); shard_count],
            next_slot: vec![0; shard_count],
            conns: Vec::new(),
            by_peer: HashMap::new(),
            clients: Vec::new(),
            executors: Vec::new(),
            mesh: (0..shard_count)
                .map(|_| (0..shard_count).map(|_| VecDeque::new()).collect())
                .collect(),
            fx: Effects::default(),
            lanes: HashMap::new(),
            outcome: Outcome {
                ok_by_model: vec![0; scenario.models.len()],
                requests_by_model: vec![0; scenario.models.len()],
                ..Outcome::default()
            },
            stats,
            gone: std::collections::HashSet::new(),
            failure: None,
            log: Vec::new(),
            verbose,
            probes_sent: false,
            end_ns: probe_at + 120_000 * MS,
        }
    }

    fn faulty(&self) -> bool {
        self.now < self.scenario.faults_until_ns
    }

    /// A fault with `permille` chance, while faults are on.
    fn chance(&mut self, permille: u32) -> bool {
        self.faulty() && self.rng.random_range(0..1000) < permille
    }

    fn at(&mut self, time: u64, event: Event) {
        self.seq += 1;
        self.events.insert((time.max(self.now), self.seq), event);
    }

    fn run(&mut self) -> Result<Outcome, String> {
        let s = self.scenario;
        for index in 0..s.executors.len() {
            let spec = s.executors[index].clone();
            let profiles = s
                .models
                .iter()
                .map(|m| slowed(&m.profile, spec.slowdown_permille, m.slo_ns))
                .collect();
            let skew = self.rng.random_range(0..=s.faults.skew_ns) as i64;
            self.executors.push(SimExecutor {
                gpu_free: vec![0; spec.gpus as usize],
                spec,
                profiles,
                state: ExecState::Down,
                incarnation: 0,
                control: None,
                links: vec![None; s.shards],
                executor_id: 0,
                secret: [0; exec::SECRET_BYTES],
                silent_until: 0,
                skew_ns: if self.rng.random_bool(0.5) { skew } else { -skew },
                drift_ppm: self
                    .rng
                    .random_range(-i64::from(s.faults.drift_ppm)..=i64::from(s.faults.drift_ppm)),
                inbox: Vec::new(),
            });
            self.at(0, Event::ExecutorConnect(index, 0));
        }
        // Clients start once executors had time to join.
        let start = if s.executors.is_empty() { 0 } else { 50 * MS };
        for _ in 0..s.clients {
            let fate = match self.rng.random_range(0..1000) {
                r if r < s.faults.disconnect => Fate::Disconnect(self.rng.random_range(0..=s.requests_per_client)),
                r if r < s.faults.disconnect + s.faults.malformed => {
                    Fate::Malformed(self.rng.random_range(0..=s.requests_per_client))
                }
                r if r < s.faults.disconnect + s.faults.malformed + s.faults.half_close => Fate::HalfClose,
                _ => Fate::Stay,
            };
            let slow = self.rng.random_range(0..1000) < s.faults.slow_reader;
            let pipeline = self.rng.random_range(1..=s.pipeline_max);
            let client = self.new_client(s.requests_per_client, pipeline, slow, fate, None);
            let when = start + self.rng.random_range(0..=s.faults_until_ns);
            self.at(when, Event::ClientAct(client));
        }
        let probe_at = s.probe_at_ns();
        self.at(probe_at, Event::Probe);
        // Once every client is done, the shards get time to settle before the last checks.
        let slo_max_ns = s.models.iter().map(|m| m.slo_ns).max().unwrap_or(0);
        let settle_ns = 2 * slo_max_ns + s.timeouts.plan_ms * MS + 2 * s.timeouts.heartbeat_ms * MS;
        let mut settling = false;
        while let Some(((time, _), event)) = self.events.pop_first() {
            if time > self.end_ns {
                break;
            }
            self.now = time;
            self.outcome.events += 1;
            self.step(event)?;
            if !settling && self.probes_sent && self.clients.iter().all(|c| c.done || c.broken) {
                settling = true;
                self.end_ns = self.now + settle_ns;
            }
        }
        if !settling {
            return Err(format!(
                "the clients were not done by {} ms (the run's cap)",
                self.end_ns / MS
            ));
        }
        self.now = self.now.max(self.end_ns);
        self.finish()?;
        self.outcome.simulated_ns = self.now;
        Ok(self.outcome.clone())
    }

    fn new_client(&mut self, to_send: u32, pipeline: u32, slow: bool, fate: Fate, probe: Option<usize>) -> usize {
        let shard = probe.unwrap_or_else(|| self.rng.random_range(0..self.scenario.shards));
        let probe = probe.is_some();
        let index = self.clients.len();
        let conn = self.open(shard, false, Owner::Client(index));
        self.clients.push(Client {
            conn,
            next_id: 0,
            outstanding: HashMap::new(),
            replied: std::collections::HashSet::new(),
            to_send,
            sent: 0,
            pipeline,
            slow,
            fate,
            broken: false,
            done: false,
            probe,
            decoder_buf: Vec::new(),
        });
        index
    }

    /// A new connection on `shard`'s front door or link port.
    fn open(&mut self, shard: usize, link: bool, owner: Owner) -> usize {
        let slot = self.next_slot[shard];
        self.next_slot[shard] += 1;
        let key = ConnectionKey::new(slot, 0);
        let peer = if link { Peer::Link(key) } else { Peer::Client(key) };
        let index = self.conns.len();
        self.conns.push(Conn {
            shard,
            peer,
            owner,
            to_server: Vec::new(),
            buffer: ReadBuffer::new(4 << 10, wire::FRAME_HEADER_SIZE + wire::FRAME_PAYLOAD_LIMIT as usize),
            to_peer: Vec::new(),
            eof: false,
            server_closing: false,
            server_gone: false,
            peer_gone: false,
            read_scheduled: false,
            peer_read_scheduled: false,
            drained_ns: self.now,
            behind: false,
        });
        self.by_peer.insert((shard, peer), index);
        self.handle(shard, Input::Opened(peer));
        index
    }

    /// Gives shard `shard` one input and carries out its effects.
    fn handle(&mut self, shard: usize, input: Input<'_>) {
        let mut fx = std::mem::take(&mut self.fx);
        fx.clear();
        match &input {
            Input::Shard(ShardMsg::Disconnected {
                shard: origin,
                connection,
            }) => {
                self.gone.insert((shard, *origin, *connection));
            }
            Input::Closed {
                peer: Peer::Client(key),
                ..
            } => {
                self.gone.insert((shard, shard as u32, *key));
            }
            _ => {}
        }
        if self.verbose && std::env::var_os("VOPR_TRACE").is_some() {
            let text = format!("{input:?}");
            eprintln!(
                "{:>10.3} ms shard {shard} <- {}",
                self.now as f64 / 1e6,
                &text[..text.len().min(300)]
            );
        }
        self.cores[shard].handle(self.now, input, &mut fx);
        self.cores[shard].check_invariants();
        self.apply(shard, &mut fx);
        self.fx = fx;
        self.arm_timer(shard);
    }

    fn arm_timer(&mut self, shard: usize) {
        let Some(next) = self.cores[shard].next_wake_ns() else {
            return;
        };
        if self.timer_at[shard].is_some_and(|at| at <= next) {
            return;
        }
        self.timer_at[shard] = Some(next);
        let late = if self.faulty() {
            self.rng.random_range(0..=self.scenario.faults.timer_late_ns)
        } else {
            0
        };
        self.at(next.max(self.now) + late, Event::Timer(shard));
    }

    fn apply(&mut self, shard: usize, fx: &mut Effects) {
        let list = std::mem::take(&mut fx.list);
        let mut overflowed = Vec::new();
        for effect in list {
            match effect {
                Effect::Write { to, bytes, sections } => {
                    let Some(&conn) = self.by_peer.get(&(shard, to)) else {
                        continue;
                    };
                    let (bytes, sections) = fx.write_parts(&bytes, &sections);
                    let c = &mut self.conns[conn];
                    if c.peer_gone || c.server_gone {
                        continue;
                    }
                    let len = bytes.len() + sections.iter().map(|s| s.bytes().len()).sum::<usize>();
                    if matches!(to, Peer::Link(_))
                        && c.to_peer.len() + len > self.scenario.limits.link_write_buffer_bytes
                    {
                        overflowed.push(to);
                        continue;
                    }
                    let start = c.to_peer.len();
                    c.to_peer.extend_from_slice(bytes);
                    for s in sections {
                        c.to_peer.extend_from_slice(s.bytes());
                    }
                    if let (Peer::Link(_), Owner::Link(e, _)) = (to, c.owner) {
                        let written = c.to_peer[start..].to_vec();
                        if let Err(message) = self.check_link_plans(shard, e, &written) {
                            self.fail_later(message);
                        }
                    }
                    self.schedule_peer_read(conn);
                }
                Effect::Close { to, .. } => {
                    let Some(&conn) = self.by_peer.get(&(shard, to)) else {
                        continue;
                    };
                    if !self.conns[conn].server_closing {
                        self.conns[conn].server_closing = true;
                        let when = self.now + self.rng.random_range(0..=MS);
                        self.at(when, Event::ServerClosed(conn));
                    }
                }
                Effect::Send { shard: to, msg } => {
                    let last = self.mesh[shard][to].back().map_or(0, |&(t, _)| t);
                    let when = (self.now + self.rng.random_range(0..=self.scenario.faults.mesh_delay_ns)).max(last);
                    self.mesh[shard][to].push_back((when, msg));
                    self.at(when, Event::Mesh { from: shard, to });
                }
                Effect::RunEmbedded(plan) => self.run_embedded(shard, plan),
                Effect::Log(line) => {
                    if self.verbose {
                        eprintln!("{:>10.3} ms shard {shard}: {line}", self.now as f64 / 1e6);
                    }
                    self.log.push(line);
                }
            }
        }
        for peer in overflowed {
            self.handle(shard, Input::WriteOverflow(peer));
        }
    }

    /// Checks a plan of `shard` as it is sent: against its lane, its requests' deadlines,
    /// and the clients that went away.
    fn check_plan(
        &mut self,
        shard: usize,
        lane: Lane,
        plan_id: u64,
        exec_at: u64,
        finish: u64,
        ids: &[u64],
    ) -> Result<(), String> {
        let mut deadlines = Vec::with_capacity(ids.len());
        for &id in ids {
            let Some((origin, deadline)) = self.cores[shard].request(id) else {
                return Err(format!(
                    "plan {plan_id} of shard {shard} has request {id}, which the shard does not hold"
                ));
            };
            if self.gone.contains(&(shard, origin.shard, origin.connection)) {
                return Err(format!(
                    "plan {plan_id} of shard {shard} has request {} of a client (shard {}'s connection {:?}) that went away before",
                    origin.client_request_id, origin.shard, origin.connection
                ));
            }
            deadlines.push(deadline);
        }
        self.outcome.plans += 1;
        if self.verbose && std::env::var_os("VOPR_TRACE").is_some() {
            eprintln!(
                "{:>10.3} ms plan {plan_id} on {lane:?}: {exec_at}..{finish}, {} requests",
                self.now as f64 / 1e6,
                deadlines.len()
            );
        }
        let plans = self.lanes.entry(lane).or_default();
        let before = plans.range(..=exec_at).next_back().map(|(_, &p)| p);
        let after = plans.range(exec_at..).next().map(|(&start, &(id, _))| (start, id));
        if let Some((other, end)) = before.filter(|&(_, end)| end > exec_at) {
            return Err(format!(
                "plan {plan_id} on GPU {lane:?} starts at {exec_at} ns, before plan {other} there finishes at {end} ns"
            ));
        }
        if let Some((start, other)) = after.filter(|&(start, _)| start < finish) {
            return Err(format!(
                "plan {plan_id} on GPU {lane:?} runs to {finish} ns, past the start of plan {other} at {start} ns"
            ));
        }
        plans.insert(exec_at, (plan_id, finish));
        if let Some(&deadline) = deadlines.iter().min() {
            if finish > deadline {
                return Err(format!(
                    "plan {plan_id} on GPU {lane:?} (batch of {}) is planned to run from {exec_at} to {finish} ns, after its request's deadline {deadline} ns",
                    deadlines.len()
                ));
            }
        }
        Ok(())
    }

    /// The plans among frames `bytes` that shard `shard` sends to executor `e`, checked.
    fn check_link_plans(&mut self, shard: usize, e: usize, bytes: &[u8]) -> Result<(), String> {
        let decoder = FrameDecoder::default();
        for frame in decoder.frames(bytes) {
            let frame = frame.map_err(|err| format!("shard {shard} wrote a bad frame to a link: {err}"))?;
            if frame.kind != Kind::ExecPlan {
                continue;
            }
            let (plan, _) =
                exec::access_plan(frame.payload).map_err(|err| format!("a PLAN that does not decode: {err}"))?;
            let ids: Vec<u64> = plan.requests.iter().map(|r| r.request_id.to_native()).collect();
            let lane = (1 + e as u32, self.executors[e].incarnation, plan.gpu.to_native());
            let (plan_id, exec_at, finish) = (
                plan.plan_id.to_native(),
                plan.exec_at_ns.to_native(),
                plan.finish_ns.to_native(),
            );
            self.check_plan(shard, lane, plan_id, exec_at, finish, &ids)?;
        }
        Ok(())
    }

    fn run_embedded(&mut self, shard: usize, plan: Plan) {
        let ids: Vec<u64> = self.cores[shard]
            .embedded_requests(plan.plan_id)
            .unwrap_or_default()
            .to_vec();
        let lane = (0, 0, plan.gpu);
        if let Err(e) = self.check_plan(shard, lane, plan.plan_id, plan.exec_at_ns, plan.finish_ns, &ids) {
            self.fail_later(e);
        }
        let late = if self.faulty() {
            self.rng.random_range(0..=self.scenario.faults.timer_late_ns)
        } else {
            0
        };
        let started_ns = plan.exec_at_ns.max(self.now) + late;
        let finished_ns = started_ns + (plan.finish_ns - plan.exec_at_ns);
        self.at(
            finished_ns,
            Event::Embedded {
                shard,
                plan_id: plan.plan_id,
                started_ns,
                finished_ns,
            },
        );
    }

    /// A check failed inside an effect: reported at the next step.
    fn fail_later(&mut self, message: String) {
        let at = self.now;
        self.failure.get_or_insert_with(|| format!("at {at} ns: {message}"));
    }

    fn schedule_read(&mut self, conn: usize, delay: u64) {
        if !self.conns[conn].read_scheduled {
            self.conns[conn].read_scheduled = true;
            self.at(self.now + delay, Event::ServerRead(conn));
        }
    }

    fn schedule_peer_read(&mut self, conn: usize) {
        if self.conns[conn].peer_read_scheduled {
            return;
        }
        self.conns[conn].peer_read_scheduled = true;
        let slow = matches!(self.conns[conn].owner, Owner::Client(c) if self.clients[c].slow);
        let delay = if slow {
            self.rng.random_range(5 * MS..=50 * MS)
        } else {
            self.rng.random_range(0..=100_000)
        };
        self.at(self.now + delay, Event::PeerRead(conn));
    }

    fn step(&mut self, event: Event) -> Result<(), String> {
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        match event {
            Event::Timer(shard) => {
                if self.timer_at[shard].is_some_and(|at| at <= self.now) {
                    self.timer_at[shard] = None;
                    self.handle(shard, Input::Timer);
                    let spins = &mut self.spins[shard];
                    if spins.0 == self.now {
                        spins.1 += 1;
                        if spins.1 > 10_000 {
                            return Err(format!(
                                "at {} ns shard {shard} spins: its wake-up time stays {:?} after 10000 timers",
                                self.now,
                                self.cores[shard].next_wake_ns()
                            ));
                        }
                    } else {
                        *spins = (self.now, 0);
                    }
                }
            }
            Event::Embedded {
                shard,
                plan_id,
                started_ns,
                finished_ns,
            } => self.handle(
                shard,
                Input::EmbeddedDone {
                    plan_id,
                    started_ns,
                    finished_ns,
                },
            ),
            Event::Mesh { from, to } => {
                let (_, msg) = self.mesh[from][to].pop_front().expect("a message per event");
                self.handle(to, Input::Shard(msg));
            }
            Event::ServerRead(conn) => {
                self.conns[conn].read_scheduled = false;
                self.server_read(conn);
            }
            Event::ServerClosed(conn) => self.server_closed(conn),
            Event::PeerRead(conn) => {
                self.conns[conn].peer_read_scheduled = false;
                self.peer_read(conn)?;
            }
            Event::ClientAct(client) => self.client_act(client),
            Event::ExecutorConnect(e, incarnation) => self.executor_connect(e, incarnation),
            Event::Heartbeat(e, incarnation) => self.heartbeat(e, incarnation),
            Event::Result {
                executor,
                incarnation,
                shard,
                frame,
            } => {
                if self.executors[executor].incarnation == incarnation {
                    if let Some(conn) = self.executors[executor].links[shard] {
                        self.peer_send(conn, &frame);
                    }
                }
            }
            Event::Probe => self.probe(),
        }
        self.check_limits()
    }

    /// What connections and shards hold, against the limits.
    fn check_limits(&self) -> Result<(), String> {
        let limits = &self.scenario.limits;
        for c in &self.conns {
            if let Peer::Client(key) = c.peer {
                let (owed, _) = self.cores[c.shard].client_owed(key);
                if owed as usize > limits.requests_per_connection {
                    return Err(format!(
                        "a connection on shard {} is owed {owed} replies, past requests_per_connection {}",
                        c.shard, limits.requests_per_connection
                    ));
                }
            }
        }
        for core in &self.cores {
            if core.held() > limits.requests_per_shard {
                return Err(format!("shard {} holds {} requests", core.id(), core.held()));
            }
        }
        Ok(())
    }

    /// The shard's side of a connection closed (the core asked, or the peer went).
    fn server_closed(&mut self, conn: usize) {
        let c = &mut self.conns[conn];
        if c.server_gone {
            return;
        }
        c.server_gone = true;
        let (shard, peer) = (c.shard, c.peer);
        self.handle(
            shard,
            Input::Closed {
                peer,
                writer_died: false,
            },
        );
        // The peer reads what was written, then sees the close.
        self.schedule_peer_read(conn);
    }

    /// Whether the driver would read no further from a client connection now.
    fn over_limits(&self, conn: usize) -> bool {
        let c = &self.conns[conn];
        let Peer::Client(key) = c.peer else {
            return false;
        };
        let limits = &self.scenario.limits;
        let core = &self.cores[c.shard];
        let (owed, owed_bytes) = core.client_owed(key);
        let backlogged = self.mesh[c.shard].iter().any(|q| q.len() > self.scenario.mesh_capacity);
        c.to_peer.len() >= limits.write_buffer_bytes
            || owed as usize >= limits.requests_per_connection
            || owed_bytes >= limits.request_bytes_per_connection
            || (owed_bytes > 0 && core.owed_bytes() >= limits.request_bytes_per_shard)
            || backlogged
    }

    /// The simulated driver's frame loop for one connection.
    fn server_read(&mut self, conn: usize) {
        if self.conns[conn].server_gone || self.conns[conn].server_closing {
            return;
        }
        if self.over_limits(conn) {
            self.schedule_read(conn, POLL_NS);
            return;
        }
        let c = &mut self.conns[conn];
        if !c.to_server.is_empty() {
            if let Some(spare) = c.buffer.spare() {
                let n = spare.len().min(c.to_server.len()).min(READ_BYTES);
                spare[..n].copy_from_slice(&c.to_server[..n]);
                c.buffer.advance(n);
                c.to_server.drain(..n);
            }
        }
        if c.to_server.is_empty() {
            c.drained_ns = self.now;
        }
        let shed_ns = self.scenario.timeouts.backlog_shed_ms * 1_000_000;
        let behind = shed_ns > 0 && self.now - c.drained_ns > shed_ns;
        if matches!(c.peer, Peer::Client(_)) && behind != c.behind {
            c.behind = behind;
            let (shard, peer) = (c.shard, c.peer);
            self.handle(shard, Input::Backlog { peer, behind });
        }
        let c = &mut self.conns[conn];
        let (shard, peer) = (c.shard, c.peer);
        let buffer = std::mem::replace(&mut c.buffer, ReadBuffer::new(1, 1));
        let decoder = FrameDecoder::default();
        let mut frames = decoder.frames(buffer.filled());
        let mut handled = 0;
        let mut stop = false;
        let mut more = false;
        loop {
            if self.over_limits(conn) || handled == FRAMES_PER_TURN {
                more = true;
                break;
            }
            let Some(frame) = frames.next() else { break };
            handled += 1;
            let framing_error = frame.is_err();
            self.handle(
                shard,
                Input::Frame {
                    from: peer,
                    frame,
                    buffer: &buffer,
                },
            );
            let failed = match peer {
                Peer::Client(key) => self.cores[shard].client_failed(key),
                Peer::Link(key) => self.cores[shard].link_failed(key),
            };
            if framing_error || failed {
                stop = true;
                break;
            }
        }
        let consumed = frames.consumed();
        let mut buffer = buffer;
        buffer.consume(consumed);
        self.conns[conn].buffer = buffer;
        self.handle(shard, Input::ReadDone);
        if stop {
            return;
        }
        let c = &self.conns[conn];
        if more || !c.to_server.is_empty() {
            self.schedule_read(conn, 10_000);
        } else if c.eof {
            self.half_closed(conn);
        }
    }

    /// A half-closed client: its connection closes once it is owed nothing.
    fn half_closed(&mut self, conn: usize) {
        let c = &self.conns[conn];
        if c.server_gone {
            return;
        }
        let Peer::Client(key) = c.peer else {
            return self.server_closed(conn);
        };
        if self.cores[c.shard].client_owed(key).0 == 0 {
            self.server_closed(conn);
        } else {
            self.seq += 1;
            // Polled (the real reader is woken by the reply).
            let when = self.now + POLL_NS;
            self.events.insert((when, self.seq), Event::ServerRead(conn));
            self.conns[conn].read_scheduled = true;
        }
    }

    /// The peer sends bytes.
    fn peer_send(&mut self, conn: usize, bytes: &[u8]) {
        let c = &mut self.conns[conn];
        if c.peer_gone || c.eof {
            return;
        }
        c.to_server.extend_from_slice(bytes);
        let delay = self.rng.random_range(0..=50_000);
        self.schedule_read(conn, delay);
    }

    /// The peer goes: abruptly (`reset`: unread bytes are lost) or after a half-close.
    fn peer_close(&mut self, conn: usize, reset: bool) {
        let c = &mut self.conns[conn];
        if reset {
            c.peer_gone = true;
            c.to_server.clear();
            if !c.server_gone {
                let when = self.now + self.rng.random_range(0..=MS);
                self.at(when, Event::ServerClosed(conn));
            }
        } else {
            c.eof = true;
            self.schedule_read(conn, 0);
        }
    }

    /// The peer reads what the shard wrote.
    fn peer_read(&mut self, conn: usize) -> Result<(), String> {
        let c = &mut self.conns[conn];
        if c.peer_gone {
            c.to_peer.clear();
            return Ok(());
        }
        let bytes = std::mem::take(&mut c.to_peer);
        let closed = c.server_gone;
        match c.owner {
            Owner::Client(client) => self.client_read(client, &bytes, closed),
            Owner::Control(e) => {
                self.executor_read(e, conn, None, &bytes, closed);
                Ok(())
            }
            Owner::Link(e, shard) => {
                self.executor_read(e, conn, Some(shard), &bytes, closed);
                Ok(())
            }
        }
    }

    fn client_act(&mut self, index: usize) {
        let s = self.scenario;
        let client = &self.clients[index];
        if client.broken || client.done {
            return;
        }
        let conn = client.conn;
        if self.conns[conn].server_gone || self.conns[conn].server_closing {
            return;
        }
        let mut frames = Vec::new();
        let mut break_off = None;
        loop {
            let client = &mut self.clients[index];
            if client.sent >= client.to_send || client.outstanding.len() as u32 >= client.pipeline {
                break;
            }
            match client.fate {
                Fate::Disconnect(at) if client.sent >= at => {
                    break_off = Some(true);
                    break;
                }
                Fate::Malformed(at) if client.sent >= at => {
                    break_off = Some(false);
                    break;
                }
                _ => {}
            }
            let id = client.next_id;
            client.next_id += 1;
            client.sent += 1;
            if !client.probe && self.rng.random_range(0..1000) < 20 {
                let _ = wire::encode_list_models(&mut frames, id);
                // MODELS answers it; it is not a REQUEST.
                continue;
            }
            let probe = self.clients[index].probe;
            let model_index = if probe {
                (id as usize) % s.models.len()
            } else {
                self.rng.random_range(0..s.models.len())
            };
            let bad = !probe && self.rng.random_range(0..1000) < s.faults.bad_request;
            let model = if bad && self.rng.random_bool(0.5) {
                ModelRef::Name("no-such-model".into())
            } else if self.rng.random_bool(0.5) {
                ModelRef::Id(model_index as u32)
            } else {
                ModelRef::Name(s.models[model_index].name.clone())
            };
            let mut len = s.input_bytes[model_index].unwrap_or_else(|| self.rng.random_range(0..=32)) as usize;
            if bad && s.input_bytes[model_index].is_some() && self.rng.random_bool(0.5) {
                len += 1;
            }
            let input = vec![id as u8; len];
            let slo_us = (!probe && self.rng.random_range(0..1000) < s.faults.tighter_slo)
                .then(|| self.rng.random_range(0..=(s.models[model_index].slo_ns / 1000) as u32));
            let request = RequestRef {
                client_request_id: id,
                model: &model,
                slo_us,
                input: &input,
            };
            wire::encode_request(&mut frames, &request).expect("a small request encodes");
            self.clients[index].outstanding.insert(id, model_index);
            self.outcome.requests += 1;
            self.outcome.requests_by_model[model_index] += 1;
        }
        self.peer_send(conn, &frames);
        match break_off {
            Some(true) => {
                self.clients[index].broken = true;
                self.peer_close(conn, true);
                return;
            }
            Some(false) => {
                self.clients[index].broken = true;
                // A frame of a kind no client sends, or bytes that are no frame at all.
                let mut garbage = Vec::new();
                if self.rng.random_bool(0.5) {
                    let _ = exec::encode(&mut garbage, Kind::ExecJoined, &exec::Joined { shard: 0 });
                } else {
                    garbage.extend((0..64).map(|_| self.rng.random::<u8>()));
                }
                self.peer_send(conn, &garbage);
                return;
            }
            None => {}
        }
        let client = &self.clients[index];
        if client.sent >= client.to_send {
            if client.fate == Fate::HalfClose && !self.conns[conn].eof {
                self.peer_close(conn, false);
            }
            return;
        }
        let think = self.rng.random_range(0..=5 * MS);
        self.at(self.now + think, Event::ClientAct(index));
    }

    fn client_read(&mut self, index: usize, bytes: &[u8], closed: bool) -> Result<(), String> {
        let mut buf = std::mem::take(&mut self.clients[index].decoder_buf);
        buf.extend_from_slice(bytes);
        let decoder = FrameDecoder::default();
        let mut frames = decoder.frames(&buf);
        let mut wants_more = false;
        for frame in &mut frames {
            let frame = frame.map_err(|e| format!("client {index} got a bad frame: {e}"))?;
            let client = &mut self.clients[index];
            match frame.kind {
                Kind::Reply => {
                    let reply = wire::decode_reply(frame.payload).map_err(|e| format!("client {index}: {e}"))?;
                    let id = reply.client_request_id;
                    let Some(model) = client.outstanding.remove(&id) else {
                        return Err(format!(
                            "client {index} got a reply to request {id}, which {}",
                            if client.replied.contains(&id) {
                                "had its reply already"
                            } else {
                                "it never sent"
                            }
                        ));
                    };
                    client.replied.insert(id);
                    if client.probe && self.verbose {
                        eprintln!(
                            "{:>10.3} ms probe {index} request {id}: {:?}",
                            self.now as f64 / 1e6,
                            reply.status
                        );
                    }
                    self.outcome.replies += 1;
                    if reply.status == Status::Ok {
                        self.outcome.ok += 1;
                        self.outcome.ok_by_model[model] += 1;
                    } else if client.probe {
                        return Err(format!(
                            "probe request {id} (model m{}) after the faults stopped was answered {:?}",
                            id as usize % self.scenario.models.len(),
                            reply.status
                        ));
                    }
                    wants_more = true;
                }
                Kind::Models => {}
                Kind::Error => {
                    if !client.broken {
                        let e = wire::decode_error(frame.payload).map(|e| e.message).unwrap_or_default();
                        return Err(format!("client {index}, which sent nothing wrong, got ERROR: {e}"));
                    }
                }
                other => return Err(format!("client {index} got a {other} frame")),
            }
        }
        let consumed = frames.consumed();
        buf.drain(..consumed);
        self.clients[index].decoder_buf = buf;
        let client = &self.clients[index];
        let conn = client.conn;
        if closed {
            if !client.broken && !client.outstanding.is_empty() {
                return Err(format!(
                    "client {index}'s connection closed with {} requests unanswered (e.g. {:?})",
                    client.outstanding.len(),
                    client.outstanding.keys().min()
                ));
            }
            self.clients[index].done = true;
            return Ok(());
        }
        if client.sent >= client.to_send && client.outstanding.is_empty() && !client.broken {
            // Everything answered: it goes.
            let half_closed = client.fate == Fate::HalfClose;
            self.clients[index].done = true;
            if !half_closed {
                self.peer_close(conn, true);
            }
        } else if wants_more && client.sent < client.to_send {
            self.at(self.now, Event::ClientAct(index));
        }
        Ok(())
    }

    /// The probes, once the faults are over and the other clients are done: one client per
    /// shard in turn, each asking every model once, one request at a time, so nothing
    /// contends with them and each must be answered OK.
    fn probe(&mut self) {
        let busy = self.clients.iter().any(|c| !(c.done || c.broken));
        if busy {
            self.at(self.now + 50 * MS, Event::Probe);
            return;
        }
        let shard = self.clients.iter().filter(|c| c.probe).count();
        if shard == self.scenario.shards {
            self.probes_sent = true;
            return;
        }
        let models = self.scenario.models.len() as u32;
        let client = self.new_client(models, 1, false, Fate::Stay, Some(shard));
        self.at(self.now, Event::ClientAct(client));
        self.at(self.now, Event::Probe);
    }

    fn executor_connect(&mut self, e: usize, incarnation: u32) {
        if self.executors[e].incarnation != incarnation || self.executors[e].state != ExecState::Down {
            return;
        }
        let shard = self.rng.random_range(0..self.scenario.shards);
        let conn = self.open(shard, false, Owner::Control(e));
        let ex = &mut self.executors[e];
        ex.control = Some(conn);
        ex.state = ExecState::Hello;
        let hello = Hello {
            token: TOKEN.to_string(),
            name: format!("sim-{e}"),
            backend: "sim".to_string(),
            gpus: (0..ex.spec.gpus)
                .map(|index| GpuInfo {
                    index,
                    name: "sim".into(),
                    memory_bytes: 1 << 30,
                })
                .collect(),
        };
        let mut frame = Vec::new();
        exec::encode(&mut frame, Kind::ExecHello, &hello).expect("HELLO encodes");
        self.peer_send(conn, &frame);
    }

    /// An executor crashes (or gives up on a lost link): every connection goes, and it comes
    /// back as a new executor a while later.
    fn executor_crash(&mut self, e: usize) {
        let ex = &mut self.executors[e];
        if ex.state == ExecState::Down {
            return;
        }
        ex.state = ExecState::Down;
        ex.incarnation += 1;
        ex.gpu_free.iter_mut().for_each(|f| *f = 0);
        let conns: Vec<usize> = ex
            .control
            .take()
            .into_iter()
            .chain(ex.links.iter_mut().filter_map(Option::take))
            .collect();
        let incarnation = ex.incarnation;
        for conn in conns {
            self.peer_close(conn, true);
        }
        let back = self.now + self.rng.random_range(10 * MS..=300 * MS);
        self.at(back, Event::ExecutorConnect(e, incarnation));
    }

    fn heartbeat(&mut self, e: usize, incarnation: u32) {
        if self.executors[e].incarnation != incarnation {
            return;
        }
        let period = self.scenario.timeouts.heartbeat_ms * MS / 4;
        if self.chance(self.scenario.faults.crash) {
            return self.executor_crash(e);
        }
        if self.chance(self.scenario.faults.heartbeat_gap) {
            let gap = self.scenario.timeouts.heartbeat_ms * MS * 2;
            self.executors[e].silent_until = self.now + gap;
        }
        if self.now >= self.executors[e].silent_until {
            let mut frame = Vec::new();
            let beat = Heartbeat {
                sent_ns: self.now,
                echo_ns: 0,
            };
            exec::encode(&mut frame, Kind::ExecHeartbeat, &beat).expect("a heartbeat encodes");
            let links: Vec<usize> = self.executors[e].links.iter().flatten().copied().collect();
            for conn in links {
                self.peer_send(conn, &frame);
            }
        }
        self.at(self.now + period, Event::Heartbeat(e, incarnation));
    }

    fn executor_read(&mut self, e: usize, conn: usize, link_shard: Option<usize>, bytes: &[u8], closed: bool) {
        let mine = self.executors[e].control == Some(conn)
            || link_shard.is_some_and(|s| self.executors[e].links[s] == Some(conn));
        if !mine {
            return;
        }
        let mut buf = std::mem::take(&mut self.executors[e].inbox);
        buf.push(bytes.to_vec());
        let all: Vec<u8> = buf.concat();
        let decoder = FrameDecoder::default();
        let mut frames = decoder.frames(&all);
        let mut crash = false;
        let mut outgoing: Vec<(usize, Vec<u8>)> = Vec::new();
        for frame in &mut frames {
            let Ok(frame) = frame else {
                crash = true;
                break;
            };
            match frame.kind {
                Kind::ExecWelcome => {
                    let Ok(welcome) = exec::decode::<exec::Welcome>(frame.kind, frame.payload) else {
                        crash = true;
                        break;
                    };
                    let ex = &mut self.executors[e];
                    ex.executor_id = welcome.executor_id;
                    ex.secret = welcome.secret;
                    ex.state = ExecState::Registering;
                    let register = Register {
                        offset_ns: 0,
                        offset_error_ns: 0,
                        models: ex
                            .profiles
                            .iter()
                            .enumerate()
                            .map(|(model, p)| ModelProfile {
                                model: model as u32,
                                profile: ProfileWire::of(p),
                            })
                            .collect(),
                    };
                    let mut out = Vec::new();
                    exec::encode(&mut out, Kind::ExecRegister, &register).expect("REGISTER encodes");
                    outgoing.push((conn, out));
                }
                Kind::ExecRegistered => {
                    self.executors[e].state = ExecState::Joining(0);
                    for shard in 0..self.scenario.shards {
                        let link = self.open(shard, true, Owner::Link(e, shard));
                        self.executors[e].links[shard] = Some(link);
                        let join = Join {
                            token: TOKEN.to_string(),
                            executor_id: self.executors[e].executor_id,
                            secret: self.executors[e].secret,
                            shard: shard as u32,
                        };
                        let mut out = Vec::new();
                        exec::encode(&mut out, Kind::ExecJoin, &join).expect("JOIN encodes");
                        outgoing.push((link, out));
                    }
                }
                Kind::ExecJoined => {
                    if let ExecState::Joining(n) = self.executors[e].state {
                        let n = n + 1;
                        if n == self.scenario.shards {
                            self.executors[e].state = ExecState::Up;
                            let incarnation = self.executors[e].incarnation;
                            self.at(self.now, Event::Heartbeat(e, incarnation));
                        } else {
                            self.executors[e].state = ExecState::Joining(n);
                        }
                    }
                }
                Kind::ExecPlan => {
                    let Some(shard) = link_shard else {
                        crash = true;
                        break;
                    };
                    if let Err(message) = self.executor_plan(e, shard, frame.payload) {
                        self.fail_later(message);
                    }
                }
                Kind::ExecHeartbeat | Kind::ExecProbeReply => {}
                // Refused, lost, timed out: it starts over.
                _ => {
                    crash = true;
                    break;
                }
            }
        }
        let consumed = frames.consumed();
        self.executors[e].inbox = vec![all[consumed..].to_vec()];
        for (conn, bytes) in outgoing {
            self.peer_send(conn, &bytes);
        }
        if crash || closed {
            self.executor_crash(e);
        }
    }

    /// A PLAN on executor `e`'s link to `shard`: checked, then run on its GPU.
    fn executor_plan(&mut self, e: usize, shard: usize, payload: &[u8]) -> Result<(), String> {
        let (plan, _inputs) =
            exec::access_plan(payload).map_err(|err| format!("a PLAN that does not decode: {err}"))?;
        let plan_id = plan.plan_id.to_native();
        let gpu = plan.gpu.to_native() as usize;
        let model = plan.model.to_native() as usize;
        let exec_at = plan.exec_at_ns.to_native();
        let ids: Vec<u64> = plan.requests.iter().map(|r| r.request_id.to_native()).collect();
        let incarnation = self.executors[e].incarnation;
        let ex = &self.executors[e];
        if gpu >= ex.gpu_free.len() || model >= ex.profiles.len() {
            return Err(format!(
                "plan {plan_id} names GPU {gpu} and model {model} of executor {e}"
            ));
        }
        let run_ns = ex.profiles[model].exec_ns(ids.len() as u32);
        let start = exec_at.max(self.now).max(ex.gpu_free[gpu]);
        let end = start + run_ns;
        self.executors[e].gpu_free[gpu] = end;
        // The executor's clock: off by its skew, and drifting.
        let skew = self.executors[e].skew_ns + self.executors[e].drift_ppm * self.now as i64 / 1_000_000;
        let shift = |t: u64| t.saturating_add_signed(skew);
        if self.chance(self.scenario.faults.result_lost) {
            return Ok(());
        }
        let mut result = ResultMsg {
            plan_id,
            status: PlanStatus::Ok,
            started_ns: shift(start),
            finished_ns: shift(end),
            output_lens: vec![4; ids.len()],
            refused: Vec::new(),
            message: String::new(),
        };
        if self.chance(self.scenario.faults.result_malformed) {
            result.output_lens.push(4);
        } else if self.chance(5) {
            result.status = PlanStatus::Failed;
            result.output_lens.clear();
            result.message = "a simulated failure".into();
        }
        let outputs = result.output_lens.iter().map(|&l| l as usize).sum::<usize>();
        let mut frame = Vec::new();
        exec::encode_sectioned(&mut frame, Kind::ExecResult, &result, |out| {
            out.extend(std::iter::repeat_n(7u8, outputs));
        })
        .expect("a RESULT encodes");
        let mut when = end;
        if self.chance(self.scenario.faults.result_late) {
            when += self.rng.random_range(0..=2 * self.scenario.timeouts.plan_ms * MS);
        }
        self.at(
            when,
            Event::Result {
                executor: e,
                incarnation,
                shard,
                frame,
            },
        );
        Ok(())
    }

    /// At the end: every open client was answered in full, nothing is held, probes ran.
    fn finish(&mut self) -> Result<(), String> {
        if std::env::var_os("VOPR_DUMP").is_some() {
            for core in &self.cores {
                eprintln!("{core:#?}");
            }
        }
        if let Some(failure) = self.failure.take() {
            return Err(failure);
        }
        if !self.probes_sent {
            return Err("the run ended before its probes".into());
        }
        for (index, client) in self.clients.iter().enumerate() {
            if client.broken {
                continue;
            }
            if client.sent < client.to_send || !client.outstanding.is_empty() {
                let c = &self.conns[client.conn];
                let owed = match c.peer {
                    Peer::Client(key) => self.cores[c.shard].client_owed(key),
                    Peer::Link(_) => (0, 0),
                };
                return Err(format!(
                    "client {index}{} sent {} of {} requests and has {} without a reply at the end (e.g. {:?}); \
                     its connection on shard {}: owed {owed:?}, {} bytes unread by the shard, {} buffered, {} unread by it, \
                     eof {}, closing {}, gone {}/{}; the shard holds {} ({} queued, {} plans in flight), wakes at {:?}",
                    if client.probe { " (a probe)" } else { "" },
                    client.sent,
                    client.to_send,
                    client.outstanding.len(),
                    client.outstanding.keys().min(),
                    c.shard,
                    c.to_server.len(),
                    c.buffer.filled().len(),
                    c.to_peer.len(),
                    c.eof,
                    c.server_closing,
                    c.server_gone,
                    c.peer_gone,
                    self.cores[c.shard].held(),
                    self.cores[c.shard].queued(),
                    self.cores[c.shard].plans_in_flight(),
                    self.cores[c.shard].next_wake_ns()
                ));
            }
        }
        for core in &self.cores {
            if core.held() > 0 || core.awaiting_remote() > 0 || core.plans_in_flight() > 0 {
                return Err(format!(
                    "shard {} ends holding {} requests, awaiting {} replies, {} plans in flight",
                    core.id(),
                    core.held(),
                    core.awaiting_remote(),
                    core.plans_in_flight()
                ));
            }
        }
        self.outcome.handoffs = self.stats.handoffs.load(std::sync::atomic::Ordering::Relaxed);
        self.outcome.executor_losses = self.log.iter().filter(|l| l.contains(") lost (")).count() as u64;
        Ok(())
    }
}

/// `profile` with every time scaled by `permille / 1000`, within `budget_ns`.
fn slowed(profile: &Profile, permille: u32, budget_ns: u64) -> Profile {
    let scale = |ns: u64| ns * u64::from(permille) / 1000;
    let latency: Vec<u64> = (1..=profile.batch_size_max())
        .map(|b| scale(profile.exec_ns(b)))
        .take_while(|&ns| ns <= budget_ns)
        .collect();
    let latency = if latency.is_empty() {
        vec![scale(profile.exec_ns(1))]
    } else {
        latency
    };
    Profile::from_latencies_ns(latency, 0, 0)
}
