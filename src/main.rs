//! The `symphony` command line: thin glue over the workspace's crates.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use symphony_core::autoscale::{Autoscale, Signal};
use symphony_core::policy::{ClassPlanning, Condition, DropPolicy, GrantPolicy, Knobs, PolicyKind};
use symphony_core::sim::{self, SimConfig};
use symphony_core::workload::Workload;
use symphony_perf::sweep::{self, Find, SweepSpec};
use symphony_perf::{plot, throughput};

#[derive(Parser, Debug)]
#[command(
    name = "symphony",
    version,
    about = "Symphony: deferred batch scheduling for DNN inference serving"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Simulates one workload under one policy in virtual time and prints its bench metrics.
    Sim(SimArgs),
    /// Searches goodput (or the fewest GPUs) for several policies on several workloads.
    Sweep(SweepArgs),
    /// One long workload through several (policy, signal) pairs on a cluster whose GPUs come
    /// and go with the load: GPU-hours and bad rate, GPUs over time as an SVG.
    Autoscale(AutoscaleRunArgs),
    /// Measures the simulator's own speed (simulated requests per second, one core).
    PerfSim(PerfSimArgs),
    /// Runs the scheduler service: glommio shards, TCP front door, embedded simulated GPUs
    /// and/or external executors.
    Serve(ServeArgs),
    /// Runs an executor: connects to a scheduler and runs its plans on this machine's GPUs.
    Executor(ExecutorArgs),
    /// Measures a model's batch latency l(b) on a backend and writes a profile table.
    Profile(ProfileArgs),
    /// Sends one-off requests to a running service and prints the replies.
    Client(ClientArgs),
    /// Open-loop load from a workload file against a running service, with a final report.
    Loadgen(LoadgenArgs),
    /// Arrivals injected straight into the sans-IO shards (no sockets) at rising rates:
    /// prints each run and the knee, the largest rate the shards keep up with.
    Stress(StressArgs),
}

#[derive(clap::Args, Debug)]
struct StressArgs {
    /// Shard counts to sweep, comma-separated (one thread each).
    #[arg(long, value_delimiter = ',', default_value = "1")]
    shards: Vec<usize>,
    /// Model counts to sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    models: Vec<usize>,
    /// GPU counts to sweep, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1024")]
    gpus: Vec<u32>,
    /// The first rate tried, requests per second (doubled until a run fails, then bisected).
    #[arg(long, default_value_t = 50_000.0)]
    rate: f64,
    /// Bisection steps after the first failing rate.
    #[arg(long, default_value_t = 3)]
    steps: u32,
    /// Seconds of arrivals per run.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    #[arg(long, default_value = "symphony")]
    policy: PolicyKind,
}

#[derive(clap::Args, Debug)]
struct ClientArgs {
    /// The service, host:port.
    #[arg(long, default_value = "127.0.0.1:7070")]
    target: String,
    /// The model, by name (or by id with --model-id).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    model_id: Option<u32>,
    /// A tighter SLO than the model's, milliseconds.
    #[arg(long)]
    slo_ms: Option<f64>,
    /// Bytes of input (zeros).
    #[arg(long, default_value_t = 0)]
    input_bytes: usize,
    /// Requests to send (pipelined on one connection).
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Print the models the service serves (id, name, SLO, input size, largest batch) instead.
    #[arg(long, conflicts_with_all = ["model", "model_id"])]
    list_models: bool,
    /// Connect with TLS, trusting the certificates in this PEM file (a service with `[tls]`).
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
}

/// `symphony client`'s connection: plain, or TLS with `--tls-ca`.
fn client_connection(args: &ClientArgs) -> anyhow::Result<symphony_shards::client::Client> {
    let connected = match &args.tls_ca {
        None => symphony_shards::client::Client::connect(args.target.as_str()),
        Some(ca) => {
            let tls = symphony_shards::tls::ClientTls::load(ca, None).map_err(|e| anyhow::anyhow!("--tls-ca: {e}"))?;
            symphony_shards::client::Client::connect_tls(&args.target, &tls)
        }
    };
    connected.with_context(|| format!("connecting to {}", args.target))
}

#[derive(clap::Args, Debug)]
struct LoadgenArgs {
    /// The service, host:port.
    #[arg(long, default_value = "127.0.0.1:7070")]
    target: String,
    /// Workload file (its model names must exist on the service).
    #[arg(long)]
    workload: PathBuf,
    #[arg(long, default_value_t = 4)]
    connections: usize,
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    #[arg(long)]
    seed: Option<u64>,
    /// Bytes of input per request (zeros), or `model`: each model's network input size
    /// (mlp* 1024, resnet* 12288 bytes; others 0), for cpu and cuda executors.
    #[arg(long, default_value = "0")]
    input_bytes: String,
    /// Also write the report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ServeArgs {
    /// TOML configuration (default: the built-in example: 3 models, 8 simulated GPUs).
    #[arg(long, conflicts_with = "workload")]
    config: Option<PathBuf>,
    /// Serve a workload file's models and GPU count instead (as `symphony sim` would).
    #[arg(long)]
    workload: Option<PathBuf>,
    /// Address every shard listens on (overrides the config's `listen`).
    #[arg(long)]
    listen: Option<String>,
    /// KServe v2 (Triton's HTTP protocol) on ADDR, or `off` (overrides the config's `http`;
    /// default: port 8000 of the listen host, any free port when the listen port is 0).
    #[arg(long, value_name = "ADDR|off")]
    http: Option<String>,
    /// Prometheus metrics (`GET /metrics`) on ADDR, or `off` (overrides the config's
    /// `metrics`; default: port 8002 of the listen host, any free port when the listen port
    /// is 0). The HTTP port serves them too.
    #[arg(long, value_name = "ADDR|off")]
    metrics: Option<String>,
    /// KServe v2 over gRPC (Triton's `inference.GRPCInferenceService`) on ADDR, or `off`
    /// (overrides the config's `grpc`; default: port 8001 of the listen host, any free port
    /// when the listen port is 0).
    #[arg(long, value_name = "ADDR|off")]
    grpc: Option<String>,
    /// Shards, one per core (default: the config's, else every CPU).
    #[arg(long)]
    shards: Option<usize>,
    /// CPUs to pin the shards to, comma-separated (default: 0, 1, ...).
    #[arg(long, value_delimiter = ',')]
    cpus: Option<Vec<usize>>,
    /// Embedded simulated GPUs (overrides the config's `gpus`; 0 with external executors).
    #[arg(long)]
    gpus: Option<u32>,
    /// Accept external executors that present this token (overrides `executor_token`).
    #[arg(long)]
    executor_token: Option<String>,
    /// GPU slots for external executors (overrides `executor_gpus`; default 64 with a token).
    #[arg(long)]
    executor_gpus: Option<u32>,
    /// TLS on every port with this PEM certificate chain (overrides the config's `[tls]`;
    /// needs --tls-key).
    #[arg(long, value_name = "PEM", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "PEM", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ProfileArgs {
    /// cpu or cuda (GPU 0).
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// The model: mlp or resnet (or a name starting with mlp- / resnet-).
    #[arg(long)]
    model: String,
    /// Largest batch size measured (1..=B).
    #[arg(long, default_value_t = 32)]
    batch_max: u32,
    /// Measured runs per batch size (after one warm-up run).
    #[arg(long, default_value_t = 10)]
    repeat: u32,
    /// Where to write the table (batch,latency_us,std_us); the config's `profile = "table:FILE"`
    /// reads it.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ExecutorArgs {
    /// The scheduler's front door(s), host:port, comma-separated: tried in order.
    #[arg(long, value_delimiter = ',', required = true)]
    scheduler: Vec<String>,
    /// The scheduler's executor token.
    #[arg(long, required_unless_present = "token_file", conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the token (a mounted Secret: the token stays out of the process list);
    /// its surrounding whitespace is not part of it.
    #[arg(long, value_name = "PATH")]
    token_file: Option<PathBuf>,
    /// GPUs this executor runs.
    #[arg(long, default_value_t = 1)]
    gpus: u32,
    /// sim: runs each batch for its profile time and echoes inputs as outputs; cpu / cuda:
    /// real forward passes of the mlp*/resnet* models (profiled at start).
    #[arg(long, default_value = "sim")]
    backend: String,
    /// Largest batch the cpu backend profiles at start (also bounded by the scheduler's).
    #[arg(long, default_value_t = 16)]
    profile_batch_max: u32,
    /// Measured runs per batch size when profiling at start.
    #[arg(long, default_value_t = 3)]
    profile_repeat: u32,
    /// A name for the scheduler's logs (default: $HOSTNAME).
    #[arg(long)]
    name: Option<String>,
    /// Refuse a plan that could start only this many milliseconds after its exec_at.
    #[arg(long, default_value_t = 5.0)]
    late_bound_ms: f64,
    /// Heartbeat interval, milliseconds.
    #[arg(long, default_value_t = 100)]
    heartbeat_ms: u64,
    /// The longest wait between two attempts to register again after a lost link,
    /// milliseconds (the wait doubles from 100 ms, with jitter).
    #[arg(long, default_value_t = 5000)]
    reconnect_max_ms: u64,
    /// Connect with TLS, trusting the certificates in this PEM file (the scheduler's own
    /// certificate, or the CA that signed it). Without it the executor connects in plain text
    /// and its token crosses the network readable.
    #[arg(long, value_name = "PEM")]
    tls_ca: Option<PathBuf>,
    /// The name the scheduler's certificate must carry (default: the host of each address
    /// connected to).
    #[arg(long, value_name = "NAME", requires = "tls_ca")]
    tls_name: Option<String>,
    /// The sim backend's GPUs run at this speed against the scheduler's profiles (0.5: every
    /// batch takes twice its profile's time) and register those profiles, as a slower GPU
    /// would: for trying GPUs of different speeds without them.
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Testing only: run this executor's clock fast (> 0) or slow (< 0) by this many ppm.
    #[arg(long, default_value_t = 0.0, hide = true, allow_hyphen_values = true)]
    clock_skew_ppm: f64,
}

#[derive(clap::Args, Debug)]
struct SweepArgs {
    /// Workload files in the reference's YAML format.
    #[arg(required = true)]
    workloads: Vec<PathBuf>,
    /// Comma-separated policies.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "symphony,symphony-ref,eager,clockwork,nexus,shepherd,triton"
    )]
    policies: Vec<PolicyKind>,
    /// goodput: the largest common rate scale with bad rate <= 1 %; gpus: the fewest GPUs.
    #[arg(long, default_value = "goodput")]
    find: FindArg,
    /// GPUs for the goodput search (default: each workload's own).
    #[arg(long)]
    gpus: Option<u32>,
    /// Scale each workload to this total bench rate first (req/s).
    #[arg(long)]
    total_rps: Option<f64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Search once per arrival seed (comma-separated) and report each cell's median over
    /// them and its spread (`seeds.md`); --seed then does not apply.
    #[arg(long, value_delimiter = ',', conflicts_with = "seed")]
    seeds: Vec<u64>,
    /// Load points per curve in the plot (0: no plot).
    #[arg(long, default_value_t = 16)]
    curve_points: u32,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to write sweep.json, table.md and one SVG per workload.
    #[arg(long, default_value = "sweep-out")]
    out: PathBuf,
    #[command(flatten)]
    knobs: KnobArgs,
    #[command(flatten)]
    exec: ExecArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum FindArg {
    Goodput,
    Gpus,
}

#[derive(clap::Args, Debug)]
struct PerfSimArgs {
    workload: PathBuf,
    #[arg(long, default_value = "symphony")]
    policy: PolicyKind,
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    #[arg(long)]
    gpus: Option<u32>,
    #[arg(long, default_value_t = 3)]
    repeats: u32,
}

#[derive(clap::Args, Debug)]
struct SimArgs {
    /// Workload file in the reference's YAML format.
    workload: PathBuf,
    #[command(flatten)]
    policy: PolicyArgs,
    /// GPUs (default: the workload's).
    #[arg(long)]
    gpus: Option<u32>,
    /// Seed (default: the workload's).
    #[arg(long)]
    seed: Option<u64>,
    /// Multiply every model's rate by this.
    #[arg(long, default_value_t = 1.0)]
    rate_scale: f64,
    /// Write plans.csv, requests.csv and summary.json into this directory.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// Write the run second by second (arrivals, outcomes, GPUs) to this CSV file.
    #[arg(long)]
    timeline: Option<PathBuf>,
    #[command(flatten)]
    exec: ExecArgs,
    /// Let GPUs come and go with the load, following this signal: `desired` (ours: the GPUs
    /// the load needs with deferral) or `utilization` (the busy fraction, as a Kubernetes
    /// HPA); --gpus is then the most there can be (symphony, symphony-ref, eager, triton).
    #[arg(long)]
    autoscale: Option<Signal>,
    #[command(flatten)]
    scaling: ScalingArgs,
}

#[derive(clap::Args, Debug)]
struct AutoscaleRunArgs {
    /// A workload file whose rates change over time (workloads/autoscale/diurnal-8m.yaml,
    /// workloads/autoscale/azure-hour-16m.yaml).
    workload: PathBuf,
    /// POLICY:SIGNAL pairs, comma-separated; SIGNAL is desired, utilization or fixed (every
    /// slot throughout).
    #[arg(long, value_delimiter = ',', default_value = symphony_perf::autoscale::DEFAULT_RUNS)]
    runs: Vec<symphony_perf::autoscale::Run>,
    /// The most GPUs there can be (default: the workload's).
    #[arg(long)]
    gpus: Option<u32>,
    /// Seed (default: the workload's).
    #[arg(long)]
    seed: Option<u64>,
    /// Worker threads (default: the machine's cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Where to write table.md, timeline.csv and gpus.svg.
    #[arg(long, default_value = "autoscale-out")]
    out: PathBuf,
    #[command(flatten)]
    scaling: ScalingArgs,
    #[command(flatten)]
    knobs: KnobArgs,
    #[command(flatten)]
    exec: ExecArgs,
}

/// The autoscaler's knobs (`symphony_core::autoscale`).
#[derive(clap::Args, Debug, Clone)]
struct ScalingArgs {
    /// Never fewer GPUs online or starting.
    #[arg(long, default_value_t = 1)]
    min_gpus: u32,
    /// GPUs online at the start (default: the minimum).
    #[arg(long)]
    initial_gpus: Option<u32>,
    /// Seconds from asking for a GPU to its first plan.
    #[arg(long, default_value_t = 30.0)]
    startup_s: f64,
    /// Scale-down stabilization: the count drops to the largest recommendation of this many
    /// seconds.
    #[arg(long, default_value_t = 60.0)]
    leave_after_s: f64,
    /// Seconds between two readings of the signal.
    #[arg(long, default_value_t = 15.0)]
    scale_interval_s: f64,
    /// The busy fraction both signals aim at.
    #[arg(long, default_value_t = 0.7)]
    target_busy: f64,
    /// The utilization signal averages the busy fraction over this many seconds.
    #[arg(long, default_value_t = 30.0)]
    busy_window_s: f64,
}

impl ScalingArgs {
    fn autoscale(&self, signal: Signal, slots: u32) -> anyhow::Result<Autoscale> {
        let seconds = |value: f64, flag: &str| -> anyhow::Result<u64> {
            anyhow::ensure!(
                value.is_finite() && (0.0..=86_400.0).contains(&value),
                "{flag} must be 0 to 86400 seconds"
            );
            Ok((value * 1e9).round() as u64)
        };
        let autoscale = Autoscale {
            signal,
            min_gpus: self.min_gpus,
            initial_gpus: self.initial_gpus.unwrap_or(self.min_gpus),
            startup_ns: seconds(self.startup_s, "--startup-s")?,
            leave_after_ns: seconds(self.leave_after_s, "--leave-after-s")?,
            interval_ns: seconds(self.scale_interval_s, "--scale-interval-s")?,
            target_busy: self.target_busy,
            window_ns: seconds(self.busy_window_s, "--busy-window-s")?,
        };
        autoscale.check(slots).map_err(|e| anyhow::anyhow!(e))?;
        Ok(autoscale)
    }
}

/// How the simulated GPUs run a batch against its profile (default: exactly).
#[derive(clap::Args, Debug, Clone)]
struct ExecArgs {
    /// Every batch runs this many times its profile (a GPU slower than its start-up
    /// profile says; the planner is not told).
    #[arg(long, default_value_t = 1.0)]
    exec_scale: f64,
    /// Log-normal noise on every batch's time: the sigma of its log (0.1: about 10 %).
    #[arg(long, default_value_t = 0.0)]
    exec_noise: f64,
    /// A batch that starts after its GPU idled --cold-gap-ms runs this many times longer.
    #[arg(long, default_value_t = 1.0)]
    cold_factor: f64,
    #[arg(long, default_value_t = 0.0)]
    cold_gap_ms: f64,
    /// Batches get slower by this fraction per second of simulated time.
    #[arg(long, default_value_t = 0.0)]
    drift_per_s: f64,
}

impl ExecArgs {
    fn exec_model(&self) -> anyhow::Result<sim::ExecModel> {
        anyhow::ensure!(
            self.cold_gap_ms.is_finite() && self.cold_gap_ms >= 0.0,
            "--cold-gap-ms must be a number of milliseconds >= 0"
        );
        let model = sim::ExecModel {
            scale: self.exec_scale,
            noise_sigma: self.exec_noise,
            cold_factor: self.cold_factor,
            cold_gap_ns: (self.cold_gap_ms * 1e6) as u64,
            drift_per_s: self.drift_per_s,
        };
        model
            .check()
            .map_err(|e| anyhow::anyhow!("--exec-scale, --exec-noise, --cold-factor, --drift-per-s: {e}"))?;
        Ok(model)
    }
}

#[derive(clap::Args, Debug, Clone)]
struct PolicyArgs {
    /// symphony, symphony-ref, eager, clockwork, nexus, shepherd or triton.
    #[arg(long, default_value = "symphony")]
    policy: PolicyKind,
    #[command(flatten)]
    knobs: KnobArgs,
}

#[derive(clap::Args, Debug, Clone)]
struct KnobArgs {
    /// Drop policy of the deferred family: window-drop, drop-timeout, window-fcfs.
    #[arg(long)]
    drop: Option<DropPolicy>,
    /// Schedulable condition: frontrun, latest, target-batch-size, target-queuing-delay, immediately.
    #[arg(long)]
    condition: Option<Condition>,
    /// GPU grant policy: lowest-index, earliest-free, best-fit.
    #[arg(long)]
    grant: Option<GrantPolicy>,
    /// symphony: demand (fraction of the GPUs) at which deferral stops.
    #[arg(long, default_value_t = 0.8)]
    saturation_threshold: f64,
    /// symphony: the drop policy once saturated.
    #[arg(long, default_value = "window-drop")]
    saturated_drop: DropPolicy,
    /// symphony: once saturated, window drop keeps this fraction of the target batch.
    #[arg(long, default_value_t = 0.6)]
    saturated_target_fraction: f64,
    /// symphony: a model whose SLO is --long-slo-ratio times the tightest keeps, in window
    /// drop, no more than the smallest batch whose time per request is within this fraction
    /// of its target batch's (0: off).
    #[arg(long, default_value_t = 0.12)]
    long_slo_keep_tolerance: f64,
    #[arg(long, default_value_t = 4.0)]
    long_slo_ratio: f64,
    /// symphony: rank a candidate waiting for a GPU by the batch it was formed with,
    /// not by the batch its queue would form now.
    #[arg(long)]
    no_queue_rank: bool,
    /// nexus: plan once with the workload's true bench rates (as the reference did) instead
    /// of learning them online.
    #[arg(long)]
    nexus_true_rates: bool,
    /// nexus: plan only the GPUs the load needs, leaving the rest idle (default: fill the cluster).
    #[arg(long)]
    nexus_no_fill: bool,
    /// The deferred family (symphony, symphony-ref, eager): plan with profiles corrected
    /// online from measured batch times (a sliding p99 per model and batch-size range).
    #[arg(long)]
    correct: bool,
    /// The deferred family: also correct by how long a batch's GPU idled before it (cold
    /// starts), a sliding p99 per idle-gap bucket.
    #[arg(long)]
    correct_idle: bool,
    /// The deferred family over a workload's `gpu_classes`: per-class (each batch planned for
    /// the class of GPU it would get), as-profiled (every GPU as if at speed 1) or slowest
    /// (every GPU with the slowest class's profile).
    #[arg(long, default_value = "per-class")]
    class_planning: ClassPlanning,
    /// symphony: how much less to defer while other models contend, in long recent batches.
    #[arg(long, default_value_t = 2.0)]
    contention_margin: f64,
    #[arg(long, default_value_t = 100)]
    d_ctrl_us: u64,
    #[arg(long, default_value_t = 50)]
    d_data_us: u64,
    #[arg(long, default_value_t = 2000)]
    d_resp_us: u64,
    #[arg(long, default_value_t = 100)]
    jitter_us: u64,
}

impl KnobArgs {
    fn knobs(&self) -> Knobs {
        Knobs {
            d_ctrl_ns: self.d_ctrl_us * 1000,
            d_data_ns: self.d_data_us * 1000,
            d_resp_ns: self.d_resp_us * 1000,
            jitter_ns: self.jitter_us * 1000,
            drop: self.drop,
            condition: self.condition,
            grant: self.grant,
            saturation_threshold: self.saturation_threshold,
            saturated_drop: self.saturated_drop,
            saturated_target_fraction: self.saturated_target_fraction,
            long_slo_keep_tolerance: self.long_slo_keep_tolerance,
            long_slo_ratio: self.long_slo_ratio,
            queue_rank: !self.no_queue_rank,
            contention_margin_factor: self.contention_margin,
            nexus_fill_gpus: !self.nexus_no_fill,
            correction: self.correct,
            correction_idle: self.correct_idle,
            class_planning: self.class_planning,
            ..Knobs::default()
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The commands that print results: a closed stdout (`symphony sim ... | head`) ends them
    // quietly, as for any Unix tool, instead of a panic on the next print. The network
    // commands keep SIGPIPE ignored (Rust's default): a peer that closes must never kill
    // `serve` or `executor`, only fail a write with EPIPE.
    if matches!(
        cli.command,
        Command::Sim(_)
            | Command::Sweep(_)
            | Command::Autoscale(_)
            | Command::PerfSim(_)
            | Command::Profile(_)
            | Command::Stress(_)
    ) {
        // SAFETY: resetting SIGPIPE to its default action before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            // The whole chain of causes, one line; no backtrace: this is an operating error.
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Sim(args) => run_sim(args),
        Command::Sweep(args) => run_sweep(args),
        Command::Autoscale(args) => run_autoscale(args),
        Command::PerfSim(args) => run_perf_sim(args),
        Command::Serve(args) => run_serve(args),
        Command::Executor(args) => run_executor(args),
        Command::Profile(args) => run_profile(args),
        Command::Client(args) => run_client(args),
        Command::Loadgen(args) => run_loadgen(args),
        Command::Stress(args) => run_stress(args),
    }
}

fn run_stress(args: StressArgs) -> anyhow::Result<()> {
    use symphony_perf::stress::{self, StressConfig};
    anyhow::ensure!(
        args.rate.is_finite() && args.rate > 0.0,
        "--rate must be a positive number"
    );
    anyhow::ensure!(
        args.seconds.is_finite() && args.seconds > 0.0 && args.seconds <= 600.0,
        "--seconds must be in (0, 600]"
    );
    anyhow::ensure!(
        args.shards.iter().all(|&s| (1..=256).contains(&s)),
        "--shards: 1 to 256 each"
    );
    anyhow::ensure!(args.models.iter().all(|&m| m >= 1), "--models: at least 1 each");
    for &g in &args.gpus {
        check_gpus(g)?;
    }
    println!(
        "stress: policy {} runs of {} s, a run holds with no injection over {} ms late, every request answered and at most {} % bad; commit {}",
        args.policy,
        args.seconds,
        stress::LATE_LIMIT.as_millis(),
        stress::BAD_RATE_LIMIT * 100.0,
        option_env!("SYMPHONY_COMMIT").unwrap_or("unknown")
    );
    println!(
        "reference (the authors' scheduler, one core here): {:.1} us per request, {:.0} req/s",
        stress::REFERENCE_US_PER_REQUEST,
        stress::REFERENCE_RPS
    );
    println!(
        "{:>6} {:>6} {:>6} {:>10} {:>10} {:>8} {:>10} {:>8} {:>6}",
        "shards", "models", "gpus", "rate", "injected", "bad %", "late max", "us/req", "holds"
    );
    let mut knees = Vec::new();
    for &shards in &args.shards {
        for &models in &args.models {
            for &gpus in &args.gpus {
                let base = StressConfig {
                    shards,
                    models,
                    gpus,
                    rate_rps: args.rate,
                    duration: std::time::Duration::from_secs_f64(args.seconds),
                    policy: args.policy,
                    ..StressConfig::front_door(shards, args.rate)
                };
                let knee = stress::knee(&base, args.steps, |config, r| {
                    println!(
                        "{:>6} {:>6} {:>6} {:>10.0} {:>10} {:>8.3} {:>8.2}ms {:>8.3} {:>6}",
                        config.shards,
                        config.models,
                        config.gpus,
                        config.rate_rps,
                        r.injected,
                        r.bad_rate() * 100.0,
                        r.late_max.as_secs_f64() * 1e3,
                        r.us_per_request(),
                        if r.holds() { "yes" } else { "no" }
                    );
                })
                .map_err(anyhow::Error::msg)?;
                knees.push((shards, models, gpus, knee.rate_rps));
            }
        }
    }
    for (shards, models, gpus, knee) in knees {
        match knee {
            Some(rate) => println!(
                "knee: {shards} shards, {models} models, {gpus} GPUs: {rate:.0} req/s ({:.2} of the reference's {:.0})",
                rate / stress::REFERENCE_RPS,
                stress::REFERENCE_RPS
            ),
            None => println!("knee: {shards} shards, {models} models, {gpus} GPUs: not even the first rate held"),
        }
    }
    Ok(())
}

fn run_client(args: ClientArgs) -> anyhow::Result<()> {
    use symphony_core::wire::ModelRef;
    if args.list_models {
        let mut client = client_connection(&args)?;
        let models = client.list_models()?;
        println!(
            "{:>5}  {:<32} {:>10} {:>12} {:>10}",
            "id", "name", "slo_ms", "input_bytes", "batch_max"
        );
        for m in &models.models {
            println!(
                "{:>5}  {:<32} {:>10.1} {:>12} {:>10}",
                m.id,
                m.name,
                m.slo_us as f64 / 1e3,
                m.input_bytes.map_or_else(|| "any".to_string(), |b| b.to_string()),
                m.batch_size_max
            );
        }
        return Ok(());
    }
    let model = match (args.model.clone(), args.model_id) {
        (Some(name), None) => ModelRef::Name(name),
        (None, Some(id)) => ModelRef::Id(id),
        _ => anyhow::bail!("name the model with exactly one of --model NAME or --model-id ID"),
    };
    anyhow::ensure!((1..=1_000_000).contains(&args.count), "--count must be 1 to 1000000");
    let slo_us = match args.slo_ms {
        Some(ms) => {
            anyhow::ensure!(
                ms.is_finite() && ms > 0.0 && ms * 1e3 <= f64::from(u32::MAX),
                "--slo-ms must be a positive number of milliseconds"
            );
            Some((ms * 1e3).round() as u32)
        }
        None => None,
    };
    let input = vec![0u8; args.input_bytes];
    let mut client = client_connection(&args)?;
    let started = std::time::Instant::now();
    for id in 0..u64::from(args.count) {
        client.send(id, &model, slo_us, &input)?;
    }
    client.flush()?;
    for _ in 0..args.count {
        let reply = client.recv()?;
        println!(
            "id {} status {:?} queued {} us exec {} us total {} us output {} bytes",
            reply.client_request_id,
            reply.status,
            reply.timings.queued_us,
            reply.timings.exec_us,
            reply.timings.total_us,
            reply.output.len()
        );
    }
    eprintln!(
        "{} replies in {:.1} ms",
        args.count,
        started.elapsed().as_secs_f64() * 1e3
    );
    Ok(())
}

fn run_loadgen(args: LoadgenArgs) -> anyhow::Result<()> {
    let workload = Workload::load(&args.workload)?;
    let (input_bytes, model_input_bytes) = if args.input_bytes == "model" {
        let sizes = workload
            .models
            .iter()
            .map(|m| symphony_gpu_exec::nets::Network::for_model(&m.name).map_or(0, |n| n.input_len() * 4))
            .collect();
        (0, Some(sizes))
    } else {
        let bytes = args
            .input_bytes
            .parse()
            .context("--input-bytes must be a number of bytes or `model`")?;
        (bytes, None)
    };
    let spec = symphony_perf::loadgen::LoadSpec {
        target: args.target.clone(),
        seed: args.seed.unwrap_or(workload.seed),
        workload,
        rate_scale: args.rate_scale,
        connections: args.connections,
        input_bytes,
        model_input_bytes,
        progress: true,
    };
    eprintln!(
        "loadgen: target {} workload {} rate scale {} connections {} input {} bytes seed {}",
        args.target,
        args.workload.display(),
        args.rate_scale,
        args.connections,
        args.input_bytes,
        spec.seed
    );
    let report = symphony_perf::loadgen::run(&spec)?;
    println!(
        "offered {:.0} req/s, achieved {:.0} req/s, success {:.0} req/s | latency p50 {} us p99 {} us p99.9 {} us max {} us | bad rate {:.3} % (noreply {}, late {}) | max send lag {} us",
        report.offered_rps,
        report.achieved_rps,
        report.success_rps,
        report.latency_us_p50,
        report.latency_us_p99,
        report.latency_us_p999,
        report.latency_us_max,
        report.bad_rate,
        report.noreply,
        report.late,
        report.send_lag_us_max
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// A model that declares no tensors and runs on a cpu network (`mlp*`, `resnet*`: see
/// `gpu-exec/src/nets.rs`) shows KServe clients that network's own: FP32 `input` of its shape,
/// FP32 `output` of its logits (unless its `input_bytes` says otherwise).
fn give_cpu_networks_their_tensors(config: &mut symphony_shards::config::ServeConfig) {
    use symphony_gpu_exec::nets::{Network, OUTPUTS};
    use symphony_shards::tensors::{ModelTensors, TensorSpec};
    for ((model, tensors), input_bytes) in config
        .models
        .iter()
        .zip(config.tensors.iter_mut())
        .zip(&config.input_bytes)
    {
        let Some(network) = Network::for_model(&model.name) else {
            continue;
        };
        let bytes = network.input_len() * 4;
        if tensors.declared || input_bytes.is_some_and(|b| b as usize != bytes) {
            continue;
        }
        *tensors = ModelTensors {
            inputs: vec![TensorSpec::new("input", "FP32", &network.input_shape())],
            outputs: vec![TensorSpec::new("output", "FP32", &[OUTPUTS as i64])],
            declared: false,
        };
    }
}

fn run_serve(args: ServeArgs) -> anyhow::Result<()> {
    use symphony_shards::config::ServeConfig;
    // Buffers of 128 KiB and more (receive buffers, write queues) come straight from mmap and
    // go back to the system when freed: a burst of large connections does not leave the
    // process holding their memory (glibc would otherwise raise this threshold as they free).
    // SAFETY: mallopt changes a glibc tunable; no allocation is in progress on another thread.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
    let mut config = match (&args.config, &args.workload) {
        (Some(path), _) => ServeConfig::load(path)?,
        (None, Some(path)) => ServeConfig::from_workload(&Workload::load(path)?),
        (None, None) => ServeConfig::example(),
    };
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(http) = &args.http {
        config.http = symphony_shards::config::Endpoint::parse(http)
            .map_err(|expected| anyhow::anyhow!("--http: expected {expected}"))?;
    }
    if let Some(grpc) = &args.grpc {
        config.grpc = symphony_shards::config::Endpoint::parse(grpc)
            .map_err(|expected| anyhow::anyhow!("--grpc: expected {expected}"))?;
    }
    if let Some(metrics) = &args.metrics {
        config.metrics = symphony_shards::config::Endpoint::parse(metrics)
            .map_err(|expected| anyhow::anyhow!("--metrics: expected {expected}"))?;
    }
    if let Some(shards) = args.shards {
        anyhow::ensure!(shards > 0, "--shards must be at least 1");
        config.shards = Some(shards);
    }
    if let Some(cpus) = args.cpus {
        config.cpus = Some(cpus);
    }
    config.apply_executor_overrides(args.gpus, args.executor_token, args.executor_gpus)?;
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.apply_tls_override(cert, key)?;
    }
    give_cpu_networks_their_tensors(&mut config);
    let server = symphony_shards::server::start(&config)?;
    let fds = server.fd_budget();
    if fds.lowered {
        eprintln!(
            "symphony serve: RLIMIT_NOFILE is {}: connections lowered to {} per shard and executor links to {} per shard (raise the limit for more)",
            fds.limit, fds.connections_per_shard, fds.links_per_shard
        );
    }
    let memory = server.memory();
    let limit = match memory.memlock_limit_bytes {
        u64::MAX => "unlimited".to_string(),
        bytes => format!("{} KiB", bytes >> 10),
    };
    eprintln!(
        "symphony serve: {} model(s) from {} on {}; {} shard(s), io_memory {} KiB and ring depth {} each (RLIMIT_MEMLOCK {limit}); {} embedded simulated GPU(s){}{}; policy {}. Ctrl-C stops.",
        config.models.len(),
        config.source,
        server.local_addr(),
        server.shard_count(),
        memory.io_memory_bytes >> 10,
        memory.ring_depth,
        config.gpus,
        speeds_of(&config.embedded_factors),
        if config.executor_gpus > 0 {
            format!(", room for {} executor GPU(s)", config.executor_gpus)
        } else {
            String::new()
        },
        config.policy,
    );
    let places: Vec<String> = server
        .placements()
        .iter()
        .enumerate()
        .map(|(shard, p)| match p.node {
            Some(node) => format!("shard {shard} on CPU {} (NUMA node {node})", p.cpu),
            None => format!("shard {shard} on CPU {} (NUMA node unknown)", p.cpu),
        })
        .collect();
    eprintln!("symphony serve: {}", places.join(", "));
    let ports = config.tls.as_ref().map(|tls| tls.ports);
    let secure = |on: fn(&symphony_shards::tls::TlsPorts) -> bool| ports.as_ref().is_some_and(on);
    if let Some(tls) = &config.tls {
        let names: Vec<&str> = symphony_shards::tls::PORT_NAMES
            .iter()
            .copied()
            .filter(|name| tls.ports.covers(name))
            .collect();
        eprintln!(
            "symphony serve: TLS with {} on the {} port(s); the rest are plain",
            tls.cert_file,
            names.join(", ")
        );
    }
    match server.http_addr() {
        Some(addr) => eprintln!(
            "symphony serve: KServe v2 over HTTP at {}://{addr}/v2",
            if secure(|p| p.http) { "https" } else { "http" }
        ),
        None => eprintln!("symphony serve: KServe v2 over HTTP is off"),
    }
    match server.grpc_addr() {
        Some(addr) => eprintln!(
            "symphony serve: KServe v2 over gRPC at {}://{addr}",
            if secure(|p| p.grpc) { "grpcs" } else { "grpc" }
        ),
        None => eprintln!("symphony serve: KServe v2 over gRPC is off"),
    }
    match server.metrics_addr() {
        Some(addr) => eprintln!(
            "symphony serve: Prometheus metrics at {}://{addr}/metrics",
            if secure(|p| p.metrics) { "https" } else { "http" }
        ),
        None => eprintln!("symphony serve: the metrics port is off"),
    }
    let stop = server.stop_flag();
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, std::sync::Arc::clone(&stop)).context("installing signal handlers")?;
    }
    let stats = server.stats_handle();
    server.wait()?;
    if let Some(d) = stats.decision.summary() {
        eprintln!(
            "symphony serve: arrival to decision (one request in {}): p50 {:.1} us, p99 {:.1} us, max {:.1} us over {} samples",
            symphony_shards::stats::DECISION_SAMPLE_EVERY,
            d.p50_ns as f64 / 1e3,
            d.p99_ns as f64 / 1e3,
            d.max_ns as f64 / 1e3,
            d.samples
        );
    }
    let requests = stats.requests.load(std::sync::atomic::Ordering::Relaxed);
    if requests > 0 {
        let work_s = stats.shard_work_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9;
        eprintln!(
            "symphony serve: shard work (inputs handled and their effects, not the reactor, system calls or waits): {work_s:.2} s, {:.3} us a request over {requests} requests",
            work_s * 1e6 / requests as f64
        );
    }
    eprintln!("symphony serve: stopped");
    Ok(())
}

/// The embedded GPUs' speeds for the start-up line, in runs of GPU index order (` at speeds 1
/// x4, 0.5 x4`); empty when they all run their profiles as given.
fn speeds_of(factors: &[f64]) -> String {
    let mut runs: Vec<(f64, usize)> = Vec::new();
    for &factor in factors {
        match runs.last_mut() {
            Some((f, count)) if *f == factor => *count += 1,
            _ => runs.push((factor, 1)),
        }
    }
    if runs.is_empty() {
        return String::new();
    }
    let runs: Vec<String> = runs.iter().map(|(f, n)| format!("{} x{n}", 1.0 / f)).collect();
    format!(" at speeds {}", runs.join(", "))
}

fn run_executor(args: ExecutorArgs) -> anyhow::Result<()> {
    use symphony_gpu_exec::executor::{self, ExecutorConfig};
    let backend = args.backend.parse().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        args.late_bound_ms.is_finite() && args.late_bound_ms >= 0.0,
        "--late-bound-ms must be a number of milliseconds >= 0"
    );
    anyhow::ensure!(
        (1..=60_000).contains(&args.heartbeat_ms),
        "--heartbeat-ms must be 1 to 60000"
    );
    let token = match (args.token, &args.token_file) {
        (Some(token), _) => token,
        (None, Some(path)) => symphony_shards::config::read_token_file(path).map_err(anyhow::Error::msg)?,
        (None, None) => anyhow::bail!("--token or --token-file is required"),
    };
    let mut config = ExecutorConfig::new(args.scheduler, token, args.gpus, backend);
    if let Some(ca) = &args.tls_ca {
        let tls = symphony_shards::tls::ClientTls::load(ca, args.tls_name.as_deref())
            .map_err(|e| anyhow::anyhow!("--tls-ca: {e}"))?;
        config.tls = Some(tls);
    }
    if let Some(name) = args.name {
        config.name = name;
    }
    config.late_bound_ns = (args.late_bound_ms * 1e6) as u64;
    anyhow::ensure!(
        (1..=1024).contains(&args.profile_batch_max) && (1..=1000).contains(&args.profile_repeat),
        "--profile-batch-max must be 1 to 1024 and --profile-repeat 1 to 1000"
    );
    config.profile_batch_max = args.profile_batch_max;
    config.profile_repeat = args.profile_repeat;
    if backend != symphony_gpu_exec::backend::BackendKind::Sim {
        eprintln!(
            "symphony executor: profiling every model on the {} backend ...",
            backend.name()
        );
    }
    config.heartbeat_interval = std::time::Duration::from_millis(args.heartbeat_ms);
    anyhow::ensure!(
        (100..=600_000).contains(&args.reconnect_max_ms),
        "--reconnect-max-ms must be 100 to 600000"
    );
    config.reconnect_backoff_max = std::time::Duration::from_millis(args.reconnect_max_ms);
    anyhow::ensure!(
        args.clock_skew_ppm.is_finite() && args.clock_skew_ppm.abs() < 100_000.0,
        "--clock-skew-ppm must be within +-100000"
    );
    config.clock_skew_ppm = args.clock_skew_ppm;
    let speeds = symphony_core::workload::gpu_speeds();
    anyhow::ensure!(
        speeds.contains(&args.speed),
        "--speed must be {} to {}",
        speeds.start(),
        speeds.end()
    );
    anyhow::ensure!(
        args.speed == 1.0 || backend == symphony_gpu_exec::backend::BackendKind::Sim,
        "--speed is for the sim backend (the {} backend measures its GPUs' own speed)",
        backend.name()
    );
    config.sim_speed = args.speed;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, std::sync::Arc::clone(&stop)).context("installing signal handlers")?;
    }
    let stats = std::sync::Arc::new(executor::ExecutorStats::default());
    let log = |line: &str| eprintln!("symphony executor: {line}");
    let outcome = executor::run(&config, &stop, std::sync::Arc::clone(&stats), &log);
    eprintln!(
        "symphony executor: plan following: {}",
        stats.following.lock().map_or_else(|_| String::new(), |f| f.summary())
    );
    outcome?;
    eprintln!("symphony executor: stopped");
    Ok(())
}

fn run_profile(args: ProfileArgs) -> anyhow::Result<()> {
    use symphony_gpu_exec::backend::BackendKind;
    use symphony_gpu_exec::nets::{self, Network, Weights};
    let backend: BackendKind = args.backend.parse().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(
        backend != BackendKind::Sim,
        "symphony profile measures real backends: --backend cpu or cuda"
    );
    let network = Network::for_model(&args.model).with_context(|| {
        format!(
            "no network runs model `{}`: use mlp or resnet (or mlp-*, resnet-*)",
            args.model
        )
    })?;
    anyhow::ensure!(
        (1..=1024).contains(&args.batch_max) && (1..=10_000).contains(&args.repeat),
        "--batch-max must be 1 to 1024 and --repeat 1 to 10000"
    );
    let weights = Weights::from_seed(network, nets::seed_of(&args.model));
    let mut real: Box<dyn symphony_gpu_exec::backend::Backend> = match backend {
        BackendKind::Cuda => {
            Box::new(symphony_gpu_exec::cuda::CudaBackend::of_weights(0, &weights).map_err(anyhow::Error::msg)?)
        }
        _ => Box::new(symphony_gpu_exec::cpu::CpuBackend::of_weights(&weights)),
    };
    let input = nets::sample_input(network, 0);
    eprintln!(
        "symphony profile: {} on {} for b = 1..={}, 1 warm-up and {} measured runs each",
        args.model,
        backend.name(),
        args.batch_max,
        args.repeat
    );
    let measured = symphony_gpu_exec::profiler::measure(real.as_mut(), 0, &input, args.batch_max, 1, args.repeat)
        .map_err(anyhow::Error::msg)?;
    let table = measured.to_table(&format!(
        "symphony profile --backend {} --model {} --batch-max {} --repeat {}",
        backend.name(),
        args.model,
        args.batch_max,
        args.repeat
    ));
    match &args.out {
        Some(path) => std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?,
        None => print!("{table}"),
    }
    println!(
        "fit: l(b) = {:.1} us * b + {:.1} us (rms error {:.1} us); as a linear profile: sleep#{:.0},{:.0},0,0",
        measured.slope_us,
        measured.intercept_us,
        measured.fit_rms_us,
        measured.slope_us.max(0.0),
        measured.intercept_us.max(0.0)
    );
    Ok(())
}

fn run_sweep(args: SweepArgs) -> anyhow::Result<()> {
    let mut workloads = Vec::new();
    for path in &args.workloads {
        workloads.push((path.clone(), Workload::load(path)?));
    }
    anyhow::ensure!(!args.policies.is_empty(), "--policies names no policy");
    if let Some(gpus) = args.gpus {
        check_gpus(gpus)?;
    }
    for (path, workload) in &workloads {
        anyhow::ensure!(
            workload.total_bench_rps() > 0.0,
            "{}: the bench phase offers no load (every bench rps is 0): nothing to search",
            path.display()
        );
        if !workload.gpu_classes.is_empty() {
            anyhow::ensure!(
                matches!(args.find, FindArg::Goodput) && args.gpus.is_none_or(|g| g == workload.gpu_count),
                "{}: its `gpu_classes` fix the GPUs: --find gpus and another --gpus do not apply",
                path.display()
            );
        }
    }
    if let Some(total) = args.total_rps {
        anyhow::ensure!(
            total.is_finite() && total > 0.0,
            "--total-rps must be a positive number"
        );
    }
    let find = match args.find {
        FindArg::Goodput => Find::Goodput,
        FindArg::Gpus => Find::Gpus,
    };
    let spec = SweepSpec {
        workloads,
        policies: args.policies.clone(),
        find,
        gpu_count: args.gpus,
        total_rps: args.total_rps,
        seed: args.seed,
        knobs: args.knobs.knobs(),
        nexus_true_rates: args.knobs.nexus_true_rates,
        exec: args.exec.exec_model()?,
        curve_points: if find == Find::Goodput { args.curve_points } else { 0 },
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        progress: true,
    };
    if !spec.exec.is_exact() {
        eprintln!("sweep: every policy's batches run {:?}", spec.exec);
    }
    eprintln!(
        "sweep: find {:?}, {} workload(s) x {} policies, gpus {}, total rps {}, seed {}, {} thread(s), bad-rate bound {} %",
        find,
        spec.workloads.len(),
        spec.policies.len(),
        args.gpus.map_or("each workload's".to_string(), |g| g.to_string()),
        args.total_rps.map_or("each workload's".to_string(), |r| r.to_string()),
        args.seed.map_or("each workload's".to_string(), |s| s.to_string()),
        spec.threads,
        symphony_core::sweep::BAD_RATE_BOUND_PERCENT,
    );
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    if !args.seeds.is_empty() {
        let mut results = Vec::new();
        for &seed in &args.seeds {
            eprintln!("sweep: seed {seed}");
            let spec = SweepSpec {
                seed: Some(seed),
                curve_points: 0,
                ..spec.clone()
            };
            let result = sweep::run(&spec);
            println!("Seed {seed}\n\n{}", sweep::table(&result, &args.policies));
            results.push((seed, result));
        }
        let seeds: Vec<String> = args.seeds.iter().map(u64::to_string).collect();
        let table = format!(
            "Median over seeds {} (smallest to largest)\n\n{}",
            seeds.join(", "),
            sweep::median_table(&results, &args.policies)
        );
        println!("{table}");
        std::fs::write(args.out.join("seeds.md"), table)?;
        eprintln!("wrote seeds.md into {}", args.out.display());
        return Ok(());
    }
    let result = sweep::run(&spec);
    let table = sweep::table(&result, &args.policies);
    let base = sweep::base_table(&result);
    let heading = match find {
        Find::Goodput => "Goodput (req/s at average bad rate <= 1 %)",
        Find::Gpus => "Fewest GPUs (average bad rate <= 1 %)",
    };
    println!("{heading}\n\n{table}\nAt the base load:\n\n{base}");
    std::fs::write(
        args.out.join("table.md"),
        format!("{heading}\n\n{table}\nAt the base load:\n\n{base}"),
    )?;
    std::fs::write(
        args.out.join("sweep.json"),
        serde_json::to_string_pretty(&result)? + "\n",
    )?;
    let plots = plot::draw(&result, &args.out).map_err(|e| anyhow::anyhow!("drawing the plots: {e}"))?;
    eprintln!(
        "wrote sweep.json, table.md and {} plot(s) into {}",
        plots.len(),
        args.out.display()
    );
    Ok(())
}

/// A workload's `gpu_classes` fix its GPUs: `--gpus` may only repeat their count.
fn check_classes(workload: &Workload, gpus: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        workload.gpu_classes.is_empty() || gpus == workload.gpu_count,
        "{}: its `gpu_classes` give {} GPUs; --gpus {gpus} does not apply",
        workload.source,
        workload.gpu_count
    );
    Ok(())
}

fn check_gpus(gpus: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        (1..=symphony_core::workload::GPUS_LIMIT).contains(&u64::from(gpus)),
        "--gpus must be between 1 and {}, got {gpus}",
        symphony_core::workload::GPUS_LIMIT
    );
    Ok(())
}

fn run_perf_sim(args: PerfSimArgs) -> anyhow::Result<()> {
    let workload = Workload::load(&args.workload)?;
    anyhow::ensure!(args.repeats > 0, "--repeats must be at least 1");
    let gpus = args.gpus.unwrap_or(workload.gpu_count);
    check_gpus(gpus)?;
    anyhow::ensure!(
        args.rate_scale.is_finite() && args.rate_scale >= 0.0,
        "--rate-scale must be a finite number >= 0"
    );
    eprintln!(
        "perf-sim: workload {} policy {} rate scale {} gpus {} repeats {} (best of), commit {}",
        args.workload.display(),
        args.policy,
        args.rate_scale,
        gpus,
        args.repeats,
        option_env!("SYMPHONY_COMMIT").unwrap_or("unknown")
    );
    let t = throughput::measure(&workload, args.policy, args.rate_scale, gpus, args.repeats);
    println!("{}", serde_json::to_string_pretty(&t)?);
    Ok(())
}

fn run_sim(args: SimArgs) -> anyhow::Result<()> {
    let workload = Workload::load(&args.workload)?;
    let mut config = SimConfig::of(&workload, args.policy.policy);
    config.knobs = args.policy.knobs.knobs();
    config.nexus_true_rates = args.policy.knobs.nexus_true_rates;
    config.gpu_count = args.gpus.unwrap_or(workload.gpu_count);
    config.seed = args.seed.unwrap_or(workload.seed);
    config.rate_scale = args.rate_scale;
    config.exec = args.exec.exec_model()?;
    check_gpus(config.gpu_count)?;
    check_classes(&workload, config.gpu_count)?;
    anyhow::ensure!(
        args.rate_scale.is_finite() && args.rate_scale >= 0.0,
        "--rate-scale must be a finite number >= 0"
    );
    if let Some(signal) = args.autoscale {
        symphony_perf::autoscale::check(config.policy, signal).map_err(|e| anyhow::anyhow!("--autoscale: {e}"))?;
        config.autoscale = Some(args.scaling.autoscale(signal, config.gpu_count)?);
    }
    let report = sim::simulate(&workload, &config);
    let s = &report.summary;
    println!(
        "policy {} gpus {} seed {} offered {:.0} req/s: total {} success {} dropped {} late {} noreply {} | bad rate avg {:.3} % worst {:.3} % | mean batch {:.1} | gpus used {} busy {:.2} gpu-s",
        s.policy, s.gpu_count, s.seed, s.offered_rps, s.counts.total, s.counts.success, s.counts.dropped, s.counts.late, s.counts.noreply,
        s.bad_rate, s.bad_rate_worst, s.mean_batch_size, s.gpus_used, s.gpu_busy_s
    );
    println!(
        "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "model", "total", "success", "dropped", "late", "noreply", "bad %", "mean batch"
    );
    for m in &s.models {
        println!(
            "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8.3} {:>10.1}",
            m.name,
            m.counts.total,
            m.counts.success,
            m.counts.dropped,
            m.counts.late,
            m.counts.noreply,
            m.bad_rate,
            m.mean_batch_size
        );
    }
    let busy: Vec<String> = s
        .gpu_busy_fraction
        .iter()
        .map(|f| format!("{:.0}", 100.0 * f))
        .collect();
    println!("busy % by GPU index: {}", busy.join(" "));
    if !workload.gpu_classes.is_empty() {
        let classes: Vec<String> = workload
            .gpu_classes
            .iter()
            .map(|c| format!("{} x{} at speed {}", c.name, c.count, c.speed))
            .collect();
        println!(
            "GPU classes (in GPU index order): {}; planned {}",
            classes.join(", "),
            config.knobs.class_planning
        );
    }
    if !config.exec.is_exact() {
        println!("execution: {:?}", config.exec);
    }
    for c in &report.corrections {
        println!(
            "correction {}: {} batches measured, profile changed {} times, planned at {:.2} to {:.2} times the profile",
            report.model_names[c.model as usize], c.measured, c.updates, c.factor_min, c.factor_max
        );
    }
    if let Some(a) = &s.autoscale {
        println!(
            "autoscale {}: {:.4} GPU-hours paid over the bench phase (mean {:.2} GPUs, peak {}), {} GPUs started, {} let go; {:?}",
            a.config.signal,
            s.gpu_paid_s / 3600.0,
            s.gpu_paid_s / workload.bench_s(),
            s.gpus_paid_peak,
            a.started,
            a.drained,
            a.config
        );
    }
    println!("knobs: {:?}", config.knobs);
    if let Some(path) = &args.timeline {
        let outcome = symphony_perf::autoscale::Outcome {
            run: symphony_perf::autoscale::Run {
                policy: config.policy,
                signal: args.autoscale,
            },
            summary: report.summary.clone(),
            timeline: report.timeline.clone(),
        };
        std::fs::write(path, symphony_perf::autoscale::timeline_csv(&[outcome]))
            .with_context(|| format!("writing the timeline to {}", path.display()))?;
    }
    if let Some(dir) = &args.dump {
        sim::write_dump(&report, dir).with_context(|| format!("writing the dump to {}", dir.display()))?;
    }
    Ok(())
}

fn run_autoscale(args: AutoscaleRunArgs) -> anyhow::Result<()> {
    let workload = Workload::load(&args.workload)?;
    let slots = args.gpus.unwrap_or(workload.gpu_count);
    check_gpus(slots)?;
    check_classes(&workload, slots)?;
    anyhow::ensure!(!args.runs.is_empty(), "--runs names no run");
    let spec = symphony_perf::autoscale::Spec {
        runs: args.runs.clone(),
        slots,
        autoscale: args.scaling.autoscale(Signal::Desired, slots)?,
        knobs: args.knobs.knobs(),
        exec: args.exec.exec_model()?,
        seed: args.seed.unwrap_or(workload.seed),
        threads: args
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())),
        workload,
    };
    let bench_s = spec.workload.bench_s();
    let name = args
        .workload
        .file_stem()
        .map_or_else(|| "workload".into(), |s| s.to_string_lossy().into_owned());
    println!(
        "autoscale {name}: {} runs on up to {slots} GPUs, seed {}, bench {bench_s:.0} s; {:?}; exec {:?}",
        spec.runs.len(),
        spec.seed,
        spec.autoscale,
        spec.exec
    );
    let started = std::time::Instant::now();
    let outcomes = symphony_perf::autoscale::run(&spec);
    let table = symphony_perf::autoscale::table(&outcomes, bench_s);
    println!("{table}");
    println!(
        "({} simulations in {:.1} s)",
        outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let header = format!(
        "autoscale {name}: up to {slots} GPUs, seed {}, bench {bench_s:.0} s, {:?}, knobs {:?}, exec {:?}\n\n",
        spec.seed, spec.autoscale, spec.knobs, spec.exec
    );
    std::fs::write(args.out.join("table.md"), header + &table)?;
    std::fs::write(
        args.out.join("timeline.csv"),
        symphony_perf::autoscale::timeline_csv(&outcomes),
    )?;
    let svg = args.out.join("gpus.svg");
    plot::draw_gpus_over_time(&outcomes, &name, spec.workload.bench_window_ns().0 as f64 / 1e9, &svg)
        .map_err(|e| anyhow::anyhow!("drawing {}: {e}", svg.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}
