//! Start-up and the end: the shards are spawned and joined to the mesh, each shard's driver
//! is built around its core, and at stop each drains before any exits.

use std::cell::{Cell, RefCell};
use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use glommio::channels::channel_mesh::{Full, MeshBuilder};
use glommio::channels::local_channel;
use glommio::net::TcpListener;
use symphony_core::policy::deferred::Config;

use super::connection::{self, Slots};
use super::mesh::Mesh;
use super::{timer_loop, zerocopy, Shard, STOP_POLL};
use crate::config::{Limits, ServeConfig};
use crate::executors::Executors;
use crate::runtime::{self, RuntimeError, ShardMemory};
use crate::shard::{Catalog, Input, ShardCore, ShardMsg, ShardParams, TimeoutsNs};
use crate::stats::Stats;
use crate::sync::gpu_table::GpuTable;

/// After the drain's grace period, how long a shard still waits for the other shards'
/// answers to its routed requests before it exits.
const SHUTDOWN_LINGER: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("listening on {addr}: {reason}")]
    Listen { addr: String, reason: String },
    #[error("a shard stopped before it was ready: {0}")]
    Startup(String),
}

/// What a running service gives its caller.
#[derive(Debug)]
pub struct ServerHandle {
    local_addr: SocketAddr,
    http_addr: Option<SocketAddr>,
    metrics_addr: Option<SocketAddr>,
    grpc_addr: Option<SocketAddr>,
    executors: Arc<Executors>,
    link_addrs: Arc<std::sync::OnceLock<Vec<String>>>,
    stats: Arc<Stats>,
    shard_count: usize,
    memory: ShardMemory,
    limits: Limits,
    nofile: runtime::FdBudget,
    places: Vec<runtime::ShardPlace>,
    stop: Arc<AtomicBool>,
    joins: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl ServerHandle {
    /// The address every shard listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address of the KServe v2 HTTP front end (`None`: off).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The address of the KServe v2 gRPC front end (`None`: off).
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// The address of the metrics port (`None`: off).
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    /// External executors with every link joined and not lost.
    pub fn executors_online(&self) -> usize {
        self.executors.online_count()
    }

    /// Each shard's executor link address (empty without an executor token).
    pub fn executor_link_addrs(&self) -> Vec<String> {
        self.link_addrs.get().cloned().unwrap_or_default()
    }

    pub fn memory(&self) -> ShardMemory {
        self.memory
    }

    /// The limits the shards run with (connection caps lowered to the descriptor limit).
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Where each shard runs: its CPU and NUMA node, by shard.
    pub fn placements(&self) -> &[runtime::ShardPlace] {
        &self.places
    }

    /// The descriptor limit and what it allowed.
    pub fn fd_budget(&self) -> runtime::FdBudget {
        self.nofile
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The counters, to read after the service stopped (`wait` and `stop` take the handle).
    pub fn stats_handle(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    /// A flag that stops the service when set (for a signal handler).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.stop)
    }

    /// Stops accepting and ends every shard.
    pub fn stop(self) -> Result<(), ServeError> {
        self.stop.store(true, Ordering::Relaxed);
        self.wait()
    }

    /// Waits until the service stops (its stop flag is set).
    pub fn wait(self) -> Result<(), ServeError> {
        for (shard, join) in self.joins.into_iter().enumerate() {
            join.join().map_err(|e| RuntimeError::Join {
                shard,
                reason: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// Starts the service: `shards` pinned executors (default: the CPUs this process may run
/// on). Raises the soft descriptor limit to the hard one and lowers the connection caps to
/// what it allows.
pub fn start(config: &ServeConfig) -> Result<ServerHandle, ServeError> {
    let available = runtime::allowed_cpus().len().max(1);
    let shard_count = config.shards.unwrap_or(available).max(1);
    let memory = runtime::shard_memory(shard_count, runtime::memlock_limit_bytes())?;
    let cpus = runtime::shard_cpus(shard_count, config.cpus.as_deref())?;
    let accepts_executors = config.executor_token.is_some() && config.executor_gpus > 0;
    let nofile = runtime::fd_budget(shard_count, &config.limits, accepts_executors)?;
    let mut limits = config.limits;
    limits.connections_per_shard = nofile.connections_per_shard;
    limits.links_per_shard = nofile.links_per_shard;
    let catalog =
        Arc::new(Catalog::new(&config.models, &config.input_bytes, shard_count).with_tensors(&config.tensors));
    let table = Arc::new(GpuTable::with_offline(
        config.gpus as usize,
        config.executor_gpus as usize,
        shard_count,
    ));
    let executors = Arc::new(
        Executors::new(
            config.executor_token.clone(),
            Arc::clone(&table),
            config.gpus,
            config.executor_gpus,
            shard_count,
        )
        .with_embedded_factors(config.embedded_factors.clone()),
    );
    let link_addrs = Arc::new(std::sync::OnceLock::new());
    let mut shard_link_addrs = Vec::with_capacity(shard_count);
    let mesh = MeshBuilder::<ShardMsg, Full>::full(shard_count, config.limits.mesh_channel);
    let stop = Arc::new(AtomicBool::new(false));
    let drained = Arc::new(AtomicUsize::new(0));
    let stats = Arc::new(Stats::default());
    let epoch = Instant::now();
    let mut joins = Vec::with_capacity(shard_count);
    let mut listen = config.listen.clone();
    let mut http = config.http.resolve(&config.listen, crate::config::HTTP_PORT_DEFAULT);
    let mut metrics = config
        .metrics
        .resolve(&config.listen, crate::config::METRICS_PORT_DEFAULT);
    let mut grpc = config.grpc.resolve(&config.listen, crate::config::GRPC_PORT_DEFAULT);
    let registry = Arc::new(crate::metrics::Registry {
        shards: (0..shard_count).map(|_| std::sync::OnceLock::new()).collect(),
        catalog: Arc::clone(&catalog),
        table: Arc::clone(&table),
        executors: Arc::clone(&executors),
    });
    let mut local_addr = None;
    let mut http_addr = None;
    let mut metrics_addr = None;
    let mut grpc_addr = None;
    for (shard, &runtime::ShardPlace { cpu, .. }) in cpus.iter().enumerate() {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Bound, ServeError>>();
        let setup = ShardSetup {
            id: shard as u32,
            listen: listen.clone(),
            http: http.clone(),
            metrics: metrics.clone(),
            grpc: grpc.clone(),
            registry: Arc::clone(&registry),
            catalog: Arc::clone(&catalog),
            policy: Config::of(config.policy, &config.knobs),
            knobs: config.knobs.clone(),
            limits,
            timeouts: TimeoutsNs::of(&config.timeouts),
            table: Arc::clone(&table),
            mesh: mesh.clone(),
            stop: Arc::clone(&stop),
            drained: Arc::clone(&drained),
            stats: Arc::clone(&stats),
            epoch,
            embedded_gpus: config.gpus,
            embedded_exec: config.embedded_exec,
            executors: Arc::clone(&executors),
            link_addrs: Arc::clone(&link_addrs),
            zero_copy: config.zero_copy,
            tls: config.tls.clone(),
        };
        let join = runtime::spawn_shard(shard, cpu, memory, move || run_shard(setup, ready_tx))?;
        joins.push(join);
        match ready_rx.recv() {
            Ok(Ok(Bound {
                addr,
                link_addr,
                http: bound_http,
                metrics: bound_metrics,
                grpc: bound_grpc,
            })) => {
                // Shard 0 may have been given port 0: the others bind the port it got.
                listen = addr.to_string();
                local_addr.get_or_insert(addr);
                if let Some(bound_http) = bound_http {
                    http = Some(bound_http.to_string());
                    http_addr.get_or_insert(bound_http);
                }
                if let Some(bound_metrics) = bound_metrics {
                    metrics = Some(bound_metrics.to_string());
                    metrics_addr.get_or_insert(bound_metrics);
                }
                if let Some(bound_grpc) = bound_grpc {
                    grpc = Some(bound_grpc.to_string());
                    grpc_addr.get_or_insert(bound_grpc);
                }
                shard_link_addrs.extend(link_addr.map(|a| a.to_string()));
            }
            Ok(Err(e)) => {
                stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
            Err(_) => {
                stop.store(true, Ordering::Relaxed);
                return Err(ServeError::Startup(format!("shard {shard} exited during start-up")));
            }
        }
    }
    let _ = link_addrs.set(shard_link_addrs);
    Ok(ServerHandle {
        local_addr: local_addr.expect("at least one shard"),
        http_addr,
        metrics_addr,
        grpc_addr,
        executors,
        link_addrs,
        stats,
        shard_count,
        memory,
        limits,
        nofile,
        places: cpus,
        stop,
        joins,
    })
}

struct ShardSetup {
    id: u32,
    listen: String,
    /// The KServe v2 HTTP address (`None`: off).
    http: Option<String>,
    /// The metrics port's address (`None`: off).
    metrics: Option<String>,
    /// The KServe v2 gRPC address (`None`: off).
    grpc: Option<String>,
    registry: Arc<crate::metrics::Registry>,
    catalog: Arc<Catalog>,
    policy: Config,
    knobs: symphony_core::policy::Knobs,
    limits: Limits,
    timeouts: TimeoutsNs,
    table: Arc<GpuTable>,
    mesh: MeshBuilder<ShardMsg, Full>,
    stop: Arc<AtomicBool>,
    drained: Arc<AtomicUsize>,
    stats: Arc<Stats>,
    epoch: Instant,
    embedded_gpus: u32,
    embedded_exec: symphony_core::sim::ExecModel,
    executors: Arc<Executors>,
    link_addrs: Arc<std::sync::OnceLock<Vec<String>>>,
    zero_copy: bool,
    tls: Option<crate::tls::ServerTls>,
}

/// What a shard bound: the front door, its executor link port, its HTTP port.
struct Bound {
    addr: SocketAddr,
    link_addr: Option<SocketAddr>,
    http: Option<SocketAddr>,
    metrics: Option<SocketAddr>,
    grpc: Option<SocketAddr>,
}

type Ready = std::sync::mpsc::Sender<Result<Bound, ServeError>>;

async fn run_shard(setup: ShardSetup, ready: Ready) {
    let listener = match TcpListener::bind(setup.listen.as_str()) {
        Ok(listener) => listener,
        Err(e) => {
            let _ = ready.send(Err(ServeError::Listen {
                addr: setup.listen.clone(),
                reason: e.to_string(),
            }));
            return;
        }
    };
    let addr = listener.local_addr().expect("a bound listener has an address");
    // Executor links: a port of this shard's own, on the front door's host.
    let link_listener = if setup.executors.accepts_executors() {
        let link_listen = SocketAddr::new(addr.ip(), 0);
        match TcpListener::bind(link_listen) {
            Ok(listener) => Some(listener),
            Err(e) => {
                let _ = ready.send(Err(ServeError::Listen {
                    addr: link_listen.to_string(),
                    reason: e.to_string(),
                }));
                return;
            }
        }
    } else {
        None
    };
    let link_addr = link_listener
        .as_ref()
        .map(|l| l.local_addr().expect("a bound listener has an address"));
    let mut extra = Vec::new();
    for (what, at) in [
        ("HTTP", &setup.http),
        ("metrics", &setup.metrics),
        ("gRPC", &setup.grpc),
    ] {
        match at.as_deref().map(TcpListener::bind) {
            None => extra.push(None),
            Some(Ok(listener)) => extra.push(Some(listener)),
            Some(Err(e)) => {
                let _ = ready.send(Err(ServeError::Listen {
                    addr: format!("{} ({what})", at.as_deref().unwrap_or_default()),
                    reason: e.to_string(),
                }));
                return;
            }
        }
    }
    let grpc_listener = extra.pop().flatten();
    let metrics_listener = extra.pop().flatten();
    let http_listener = extra.pop().flatten();
    let bound = |l: &Option<TcpListener>| {
        l.as_ref()
            .map(|l| l.local_addr().expect("a bound listener has an address"))
    };
    let _ = ready.send(Ok(Bound {
        addr,
        link_addr,
        http: bound(&http_listener),
        metrics: bound(&metrics_listener),
        grpc: bound(&grpc_listener),
    }));
    let (senders, mut receivers) = match setup.mesh.join().await {
        Ok(joined) => joined,
        Err(_) => return,
    };
    let shard_count = senders.nr_consumers();
    let slo_max_ns = setup.catalog.models.iter().map(|m| m.slo_ns).max().unwrap_or(0);
    // Only links send zero-copy: no ring without executors.
    let zero_copy = match (link_listener.is_some() && setup.zero_copy).then(zerocopy::ZeroCopy::new) {
        Some(Ok(ring)) => Some(ring),
        Some(Err(error)) => {
            eprintln!(
                "symphony serve: shard {}: no zero-copy sends ({error}); plan inputs are copied",
                setup.id
            );
            None
        }
        None => None,
    };
    let core = ShardCore::new(ShardParams {
        id: setup.id,
        shard_count,
        catalog: setup.catalog,
        policy: setup.policy,
        knobs: setup.knobs,
        limits: setup.limits,
        timeouts: setup.timeouts,
        table: setup.table,
        embedded_gpus: setup.embedded_gpus,
        embedded_exec: setup.embedded_exec,
        executors: setup.executors,
        link_addrs: setup.link_addrs,
        zero_copy: zero_copy.is_some(),
        stats: Arc::clone(&setup.stats),
    });
    let _ = setup.registry.shards[setup.id as usize].set(Arc::clone(core.metrics()));
    let (wake, wake_rx) = local_channel::new_bounded(1);
    let shard = Rc::new(Shard {
        id: setup.id,
        epoch: setup.epoch,
        limits: setup.limits,
        timeouts: setup.timeouts,
        core: RefCell::new(core),
        spare_effects: RefCell::new(Vec::new()),
        clients: RefCell::new(Slots::new(setup.limits.connections_per_shard)),
        link_conns: RefCell::new(Slots::new(setup.limits.links_per_shard)),
        mesh: Rc::new(Mesh::new(senders)),
        wake,
        embedded: RefCell::new(BinaryHeap::new()),
        decision: RefCell::new(crate::stats::DecisionLatency::histogram()),
        decision_countdown: Cell::new(crate::stats::DECISION_SAMPLE_EVERY),
        work_ns: Cell::new(0),
        working: Cell::new(0),
        stop: setup.stop,
        stopped: Cell::new(false),
        drained: setup.drained,
        stats: setup.stats,
        slo_max_ns,
        zero_copy,
        zero_copy_refused: Cell::new(false),
        metrics: setup.registry,
        tls: setup.tls,
    });
    for (_, receiver) in receivers.streams() {
        let shard = Rc::clone(&shard);
        glommio::spawn_local(async move {
            while let Some(msg) = receiver.recv().await {
                shard.handle(Input::Shard(msg));
            }
        })
        .detach();
    }
    glommio::spawn_local(timer_loop(Rc::clone(&shard), wake_rx)).detach();
    if let Some(listener) = link_listener {
        glommio::spawn_local(connection::accept(Rc::clone(&shard), listener, connection::Port::Links)).detach();
    }
    if let Some(listener) = http_listener {
        glommio::spawn_local(connection::accept(Rc::clone(&shard), listener, connection::Port::Http)).detach();
    }
    if let Some(listener) = grpc_listener {
        glommio::spawn_local(connection::accept(Rc::clone(&shard), listener, connection::Port::Grpc)).detach();
    }
    if let Some(listener) = metrics_listener {
        glommio::spawn_local(connection::accept(
            Rc::clone(&shard),
            listener,
            connection::Port::Metrics,
        ))
        .detach();
    }
    connection::accept(Rc::clone(&shard), listener, connection::Port::Clients).await;
    drain(&shard, shard_count).await;
}

/// After stop: no new connections, new requests are answered "shutting down"; planned batches
/// finish and are answered; what is still queued when the grace period ends is answered
/// "shutting down". A shard then waits until every shard has answered its own requests and
/// the answers to the requests it routed have arrived (they may still be on the mesh), and
/// gives its writers a moment to flush.
async fn drain(shard: &Rc<Shard>, shard_count: usize) {
    shard.handle(Input::Stop);
    let grace_ns = shard.slo_max_ns + 1_000_000_000;
    let started_ns = shard.now_ns();
    loop {
        // Planned batches finish (the timer loop stopped with the stop flag).
        shard.run_due_embedded();
        if shard.core.borrow().held() == 0 {
            break;
        }
        if shard.now_ns() - started_ns > grace_ns {
            // The scheduler's timers stopped with the stop flag: answer what is left.
            shard.handle(Input::GraceOver);
            break;
        }
        let due = shard
            .core
            .borrow_mut()
            .next_wake_ns()
            .is_some_and(|t| t <= shard.now_ns());
        if due {
            shard.handle(Input::Timer);
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    shard.stats.decision.merge(&shard.decision.borrow());
    shard
        .stats
        .shard_work_ns
        .fetch_add(shard.work_ns.get(), std::sync::atomic::Ordering::Relaxed);
    shard.drained.fetch_add(1, Ordering::AcqRel);
    // Every shard answers within its grace period: wait that long and a little more.
    let linger_until_ns = started_ns + grace_ns + SHUTDOWN_LINGER.as_nanos() as u64;
    while (shard.drained.load(Ordering::Acquire) < shard_count || shard.core.borrow().awaiting_remote() > 0)
        && shard.now_ns() < linger_until_ns
    {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    // The writers flush what is queued (bounded: a client that does not read is not waited
    // for past the linger).
    let flush_until = Instant::now() + SHUTDOWN_LINGER;
    while shard.clients.borrow().queued_bytes() > 0 && Instant::now() < flush_until {
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    glommio::timer::sleep(STOP_POLL).await;
}
