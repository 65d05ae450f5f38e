//! The service's configuration: a TOML file, or the built-in example that makes
//! `symphony serve` work with no arguments on any machine.
//!
//! Validated into [`ServeConfig`] at start-up; every error names the file and the field.

use std::path::{Path, PathBuf};

use crate::tensors::{ModelTensors, TensorSpec};
use crate::tls::{ServerTls, TlsPorts};
use serde::Deserialize;
use symphony_core::policy::{ClassPlanning, Condition, DropPolicy, GrantPolicy, Knobs, ModelConfig, PolicyKind};
use symphony_core::profile::Profile;
use symphony_core::sim::ExecModel;

/// The example served when no `--config` is given: three models on 8 simulated GPUs.
pub const EXAMPLE_CONFIG: &str = r#"# Symphony's built-in example: three models on 8 embedded simulated GPUs.
listen = "127.0.0.1:7070"
gpus = 8

[[models]]
name = "resnet_a"
profile = "sleep#1082,5204,0,0"
slo_ms = 100
inputs = [{ name = "input", datatype = "FP32", shape = [3, 32, 32] }]
outputs = [{ name = "output", datatype = "FP32", shape = [10] }]

[[models]]
name = "resnet_b"
profile = "sleep#1082,5204,0,0"
slo_ms = 100
inputs = [{ name = "input", datatype = "FP32", shape = [3, 32, 32] }]
outputs = [{ name = "output", datatype = "FP32", shape = [10] }]

[[models]]
name = "small"
profile = "sleep#400,2000,0,0"
slo_ms = 50
inputs = [{ name = "INPUT0", datatype = "FP32", shape = [16] }]
outputs = [{ name = "OUTPUT0", datatype = "FP32", shape = [4] }]

[policy]
kind = "symphony"
"#;

/// The least request byte budgets: one request of the largest input.
pub const REQUEST_BYTES_MIN: usize = symphony_core::wire::INPUT_LIMIT;
/// The least `limits.write_buffer_bytes`: room for a few small replies before the reader stops.
pub const WRITE_BUFFER_BYTES_MIN: usize = 64 << 10;
/// The least `limits.link_write_buffer_bytes`: one plan of the largest frame, twice.
pub const LINK_WRITE_BUFFER_BYTES_MIN: usize = 2 * (symphony_core::wire::FRAME_PAYLOAD_LIMIT as usize + 64);

/// The least `limits.http_body_bytes`: a small JSON request.
pub const HTTP_BODY_BYTES_MIN: usize = 1024;
/// Models one service may serve.
pub const MODELS_LIMIT: usize = 65_536;
/// Embedded simulated GPUs one service may run.
pub const EMBEDDED_GPUS_LIMIT: u32 = 65_536;
/// GPU slots of external executors when a token is set and `executor_gpus` is not.
pub const EXECUTOR_GPUS_DEFAULT: u32 = 64;
/// How long a link may stay silent before its executor counts as lost.
pub const HEARTBEAT_TIMEOUT_MS_DEFAULT: u64 = 1000;
/// How long after its planned finish an unreported plan counts as lost.
pub const PLAN_TIMEOUT_MS_DEFAULT: u64 = 1000;
/// How long a connection to a link port may take to JOIN.
pub const HANDSHAKE_TIMEOUT_MS_DEFAULT: u64 = 2000;
/// How long a connection with bytes to write may accept none before it is closed.
pub const WRITE_STALL_TIMEOUT_MS_DEFAULT: u64 = 10_000;
/// How long a shard may stay behind a client connection before it sheds its new requests.
pub const BACKLOG_SHED_MS_DEFAULT: u64 = 100;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {file}: cannot read: {reason}")]
    Read { file: String, reason: String },
    #[error("config {file}: {reason}")]
    Syntax { file: String, reason: String },
    #[error("config {file}: `{field}`: expected {expected}")]
    Invalid {
        file: String,
        field: String,
        expected: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_listen")]
    listen: String,
    /// The KServe v2 HTTP port: an address, or "off".
    http: Option<String>,
    /// The Prometheus metrics port: an address, or "off".
    metrics: Option<String>,
    /// The KServe v2 gRPC port: an address, or "off".
    grpc: Option<String>,
    shards: Option<usize>,
    cpus: Option<Vec<usize>>,
    #[serde(default)]
    gpus: u32,
    models: Vec<RawModel>,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    limits: Limits,
    executor_token: Option<String>,
    /// A file holding the token (a mounted Secret), relative to the config's directory.
    executor_token_file: Option<String>,
    executor_gpus: Option<u32>,
    heartbeat_timeout_ms: Option<u64>,
    plan_timeout_ms: Option<u64>,
    handshake_timeout_ms: Option<u64>,
    write_stall_timeout_ms: Option<u64>,
    backlog_shed_ms: Option<u64>,
    #[serde(default = "default_zero_copy")]
    zero_copy: bool,
    tls: Option<RawTls>,
    #[serde(default)]
    embedded: RawEmbedded,
}

/// `[tls]`: a PEM certificate chain and key (paths relative to the config's directory), and
/// the ports that speak TLS (all by default).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: String,
    key: String,
    ports: Option<Vec<String>>,
}

fn default_zero_copy() -> bool {
    true
}

/// Where one of the extra front ends listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// Its default port on the `listen` host; any free port when `listen`'s port is 0 (so
    /// that a service started on free ports, as tests and side-by-side runs do, takes no
    /// fixed one).
    Default,
    /// Not served.
    Off,
    /// At this address (`host:port`).
    At(String),
}

impl Endpoint {
    /// `off`, or a `host:port`.
    pub fn parse(text: &str) -> Result<Endpoint, String> {
        let text = text.trim();
        if text == "off" {
            return Ok(Endpoint::Off);
        }
        match text.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => Ok(Endpoint::At(text.to_string())),
            _ => Err(format!("\"off\" or host:port, not {text:?}")),
        }
    }

    /// The address to bind, given the native `listen` address and this front end's
    /// default port; `None` when off.
    pub fn resolve(&self, listen: &str, default_port: u16) -> Option<String> {
        match self {
            Endpoint::Off => None,
            Endpoint::At(addr) => Some(addr.clone()),
            Endpoint::Default => {
                let (host, port) = listen.rsplit_once(':').unwrap_or((listen, ""));
                let port = if port == "0" { 0 } else { default_port };
                Some(format!("{host}:{port}"))
            }
        }
    }
}

/// The executor token in the file at `path` (a mounted Secret), its surrounding whitespace
/// trimmed; an error that says what is wrong with the file otherwise.
pub fn read_token_file(path: &Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("a readable token file, not {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("a token in {}, not an empty file", path.display()));
    }
    Ok(token.to_string())
}

/// Triton's port for KServe v2 over HTTP.
pub const HTTP_PORT_DEFAULT: u16 = 8000;
/// Triton's port for KServe v2 over gRPC.
pub const GRPC_PORT_DEFAULT: u16 = 8001;
/// Triton's port for Prometheus metrics.
pub const METRICS_PORT_DEFAULT: u16 = 8002;

fn default_listen() -> String {
    "127.0.0.1:7070".to_string()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    profile: String,
    slo_ms: f64,
    input_bytes: Option<u32>,
    /// Its tensors as the KServe v2 front end shows and checks them.
    inputs: Option<Vec<TensorSpec>>,
    outputs: Option<Vec<TensorSpec>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    kind: Option<String>,
    drop: Option<String>,
    condition: Option<String>,
    grant: Option<String>,
    d_ctrl_us: Option<u64>,
    d_data_us: Option<u64>,
    d_resp_us: Option<u64>,
    jitter_us: Option<u64>,
    /// Plan with profiles corrected online from measured batch times.
    correction: Option<bool>,
    /// And by the GPU's idle gap before each batch (cold starts).
    correction_idle: Option<bool>,
    /// GPUs of different speeds (executors' or `[embedded] classes`): per-class, slowest or as-profiled.
    class_planning: Option<String>,
}

/// `[embedded]`: how the embedded simulated GPUs run a batch against its profile (the
/// simulator's `ExecModel`; every field 0 or absent: exactly).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbedded {
    /// GPUs of different speeds, in GPU index order: their counts must add up to `gpus`.
    classes: Option<Vec<RawGpuClass>>,
    exec_scale: Option<f64>,
    exec_noise: Option<f64>,
    cold_factor: Option<f64>,
    cold_gap_ms: Option<f64>,
    drift_per_s: Option<f64>,
}

/// One `[embedded] classes` entry: `count` embedded GPUs that run every batch in its
/// profile's time / `speed`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpuClass {
    count: u32,
    speed: f64,
}

/// Named limits of one service; each produces an error reply, a refusal or backpressure,
/// never unbounded growth. `docs/protocol.md` ("Limits") lists them for clients.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open client connections per shard (front door). At the limit a new connection takes
    /// the place of the oldest one that never sent a frame; if every one has, the new one
    /// gets an ERROR `OVERLOADED` and is closed.
    pub connections_per_shard: usize,
    /// Connections per shard on its executor link port, joined or not. At the limit a new
    /// one takes the place of the oldest that has not joined, or is refused.
    pub links_per_shard: usize,
    /// Requests one shard holds (queued or running); past it, replies are `overloaded`. A
    /// deferring scheduler holds each request for most of its SLO: a million requests a
    /// second with 100 ms SLOs is about 60,000 held.
    pub requests_per_shard: usize,
    /// Requests one connection may have without a reply; at it the shard reads no more from
    /// that connection until replies go out (TCP backpressure).
    pub requests_per_connection: usize,
    /// Input bytes of the requests one connection has without a reply; at it the shard reads
    /// no more from that connection until replies go out. With `request_bytes_per_shard`, it
    /// bounds the inputs a shard holds (and the outputs an echoing executor returns).
    pub request_bytes_per_connection: usize,
    /// Input bytes of the requests a shard's connections have without a reply, together;
    /// past it only a connection owed nothing is read.
    pub request_bytes_per_shard: usize,
    /// Bytes queued for writing on one client connection; at it the shard reads no more from
    /// that connection until the client reads (TCP backpressure). Replies already owed are
    /// still queued, so the queue may pass it by those.
    pub write_buffer_bytes: usize,
    /// Bytes of plans queued on one executor link; a plan that would pass it loses the
    /// executor (it is not taking its plans).
    pub link_write_buffer_bytes: usize,
    /// Requests one cross-shard message carries.
    pub routed_batch: usize,
    /// Messages a cross-shard channel holds; when it is full the sending shard queues its
    /// messages in order and stops reading its sockets until the channel has room.
    pub mesh_channel: usize,
    /// Bytes of one KServe HTTP request body (JSON takes several bytes per element); past it
    /// the request is answered 413 and its body not read further.
    pub http_body_bytes: usize,
    /// Calls one gRPC connection may have open at once (HTTP/2 streams); a client waits for
    /// one to end before it opens more.
    pub grpc_streams_per_connection: usize,
    /// Requests of one `ModelStreamInfer` call not yet answered, with answers the client has
    /// not taken yet; at it the call's requests are not read until answers go out.
    pub grpc_stream_requests: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            connections_per_shard: 1024,
            links_per_shard: 256,
            requests_per_shard: 1 << 18,
            requests_per_connection: 1 << 16,
            request_bytes_per_connection: 64 << 20,
            request_bytes_per_shard: 1 << 30,
            write_buffer_bytes: 1 << 20,
            link_write_buffer_bytes: 64 << 20,
            routed_batch: 1024,
            mesh_channel: 32,
            http_body_bytes: 8 * symphony_core::wire::INPUT_LIMIT,
            grpc_streams_per_connection: 256,
            grpc_stream_requests: 1024,
        }
    }
}

/// The service's timeouts, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A link silent this long loses its executor.
    pub heartbeat_ms: u64,
    /// A plan not reported this long after its planned finish is lost: its requests are
    /// re-planned or answered and its GPU leaves planning until the executor reports it.
    pub plan_ms: u64,
    /// A connection to a link port that has not JOINed within this is closed.
    pub handshake_ms: u64,
    /// A connection (client or link) with bytes to write that accepts none for this long is
    /// closed (a link's executor is lost).
    pub write_stall_ms: u64,
    /// A client connection whose every read has filled the receive buffer for this long (the
    /// shard is behind it: more waits in the socket) has its new requests answered
    /// `OVERLOADED` until a read drains the socket. 0: never.
    pub backlog_shed_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Timeouts {
        Timeouts {
            heartbeat_ms: HEARTBEAT_TIMEOUT_MS_DEFAULT,
            plan_ms: PLAN_TIMEOUT_MS_DEFAULT,
            handshake_ms: HANDSHAKE_TIMEOUT_MS_DEFAULT,
            write_stall_ms: WRITE_STALL_TIMEOUT_MS_DEFAULT,
            backlog_shed_ms: BACKLOG_SHED_MS_DEFAULT,
        }
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub source: String,
    pub listen: String,
    /// Where the KServe v2 HTTP front end listens ([`Endpoint::Default`]: Triton's port
    /// 8000 on the `listen` host).
    pub http: Endpoint,
    /// Where `GET /metrics` is served besides the HTTP port ([`Endpoint::Default`]:
    /// Triton's 8002 on the `listen` host).
    pub metrics: Endpoint,
    /// Where the KServe v2 gRPC front end listens ([`Endpoint::Default`]: Triton's 8001
    /// on the `listen` host).
    pub grpc: Endpoint,
    pub shards: Option<usize>,
    pub cpus: Option<Vec<usize>>,
    /// Embedded simulated GPUs (executors in this process); 0 with external executors only.
    pub gpus: u32,
    /// GPU slots for external executors (0 without an executor token).
    pub executor_gpus: u32,
    pub timeouts: Timeouts,
    /// Plans with 16 KiB of inputs or more go to executors with zero-copy sends (io_uring
    /// SENDMSG_ZC); `false` copies them into the link's buffer instead.
    pub zero_copy: bool,
    pub models: Vec<ModelConfig>,
    /// Per model (same order as `models`): the size every input must have, if declared.
    pub input_bytes: Vec<Option<u32>>,
    /// Per model (same order): its declared tensors (defaults where it declares none).
    pub tensors: Vec<ModelTensors>,
    pub policy: PolicyKind,
    pub knobs: Knobs,
    pub limits: Limits,
    pub executor_token: Option<String>,
    /// TLS on the ports it covers (`[tls]`, `serve --tls-cert --tls-key`); `None`: plain.
    pub tls: Option<crate::tls::ServerTls>,
    /// How the embedded GPUs run batches against their profile (`[embedded]`; exactly by
    /// default).
    pub embedded_exec: ExecModel,
    /// Per embedded GPU, the time factor it runs the profiles at (`[embedded] classes`, a
    /// workload's `gpu_classes`; empty: all 1).
    pub embedded_factors: Vec<f64>,
}

impl ServeConfig {
    /// Command-line overrides of the GPU fields, checked as the file's are.
    pub fn apply_executor_overrides(
        &mut self,
        gpus: Option<u32>,
        executor_token: Option<String>,
        executor_gpus: Option<u32>,
    ) -> Result<(), ConfigError> {
        if let Some(gpus) = gpus {
            self.gpus = gpus;
        }
        if let Some(token) = executor_token {
            self.executor_token = Some(token);
            if self.executor_gpus == 0 {
                self.executor_gpus = EXECUTOR_GPUS_DEFAULT;
            }
        }
        if let Some(slots) = executor_gpus {
            self.executor_gpus = slots;
        }
        self.check_gpus("command line", "--")
    }

    pub fn example() -> ServeConfig {
        ServeConfig::parse(EXAMPLE_CONFIG, Path::new("."), "built-in example").expect("the example is valid")
    }

    /// Serves a workload file's models (profiles, SLOs) on its GPU count, with the default
    /// policy: the same models `symphony sim` simulates, for comparing the two.
    pub fn from_workload(workload: &symphony_core::workload::Workload) -> ServeConfig {
        let mut config = ServeConfig::example();
        config.source = workload.source.clone();
        config.gpus = workload.gpu_count;
        config.models = symphony_core::sim::model_configs(workload);
        config.embedded_factors = workload.gpu_factors();
        config.input_bytes = vec![None; config.models.len()];
        config.tensors = vec![ModelTensors::default_for(None); config.models.len()];
        config
    }

    pub fn load(path: &Path) -> Result<ServeConfig, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        ServeConfig::parse(&text, &base_dir, &file)
    }

    pub fn parse(text: &str, base_dir: &Path, source: &str) -> Result<ServeConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            file: source.to_string(),
            reason: e.to_string().trim().to_string(),
        })?;
        let invalid = |field: &str, expected: String| ConfigError::Invalid {
            file: source.to_string(),
            field: field.to_string(),
            expected,
        };
        if raw.models.is_empty() || raw.models.len() > MODELS_LIMIT {
            return Err(invalid("models", format!("1 to {MODELS_LIMIT} models")));
        }
        let mut timeouts = Timeouts::default();
        for (field, value, slot, range) in [
            (
                "heartbeat_timeout_ms",
                raw.heartbeat_timeout_ms,
                &mut timeouts.heartbeat_ms,
                50..=600_000,
            ),
            (
                "plan_timeout_ms",
                raw.plan_timeout_ms,
                &mut timeouts.plan_ms,
                10..=3_600_000,
            ),
            (
                "handshake_timeout_ms",
                raw.handshake_timeout_ms,
                &mut timeouts.handshake_ms,
                50..=600_000,
            ),
            (
                "write_stall_timeout_ms",
                raw.write_stall_timeout_ms,
                &mut timeouts.write_stall_ms,
                100..=3_600_000,
            ),
            (
                "backlog_shed_ms",
                raw.backlog_shed_ms,
                &mut timeouts.backlog_shed_ms,
                0..=60_000,
            ),
        ] {
            if let Some(ms) = value {
                if !range.contains(&ms) {
                    return Err(invalid(field, format!("{} to {}", range.start(), range.end())));
                }
                *slot = ms;
            }
        }
        if raw.shards == Some(0) {
            return Err(invalid("shards", "at least 1".to_string()));
        }
        if raw.cpus.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid(
                "cpus",
                "a list of at least one CPU (or no `cpus` key)".to_string(),
            ));
        }
        let mut models = Vec::with_capacity(raw.models.len());
        let mut input_bytes = Vec::with_capacity(raw.models.len());
        let mut tensors = Vec::with_capacity(raw.models.len());
        for (index, m) in raw.models.iter().enumerate() {
            let field = |name: &str| format!("models[{index}].{name}");
            if m.name.is_empty() || m.name.len() > symphony_core::wire::MODEL_NAME_LIMIT {
                return Err(invalid(
                    &field("name"),
                    format!("1 to {} bytes", symphony_core::wire::MODEL_NAME_LIMIT),
                ));
            }
            if models.iter().any(|other: &ModelConfig| other.name == m.name) {
                return Err(invalid(&field("name"), format!("a unique name, `{}` is taken", m.name)));
            }
            if !(m.slo_ms.is_finite() && m.slo_ms > 0.0 && m.slo_ms <= 3_600_000.0) {
                return Err(invalid(
                    &field("slo_ms"),
                    "a number of milliseconds in (0, 3600000]".to_string(),
                ));
            }
            let slo_ns = (m.slo_ms * 1e6).round() as u64;
            let profile = match m.profile.strip_prefix("table:") {
                Some(path) => Profile::load_table(&base_dir.join(path)),
                None => Profile::parse_linear(&m.profile, slo_ns),
            }
            .map_err(|e| invalid(&field("profile"), e.to_string()))?;
            if m.input_bytes
                .is_some_and(|bytes| bytes as usize > symphony_core::wire::INPUT_LIMIT)
            {
                return Err(invalid(
                    &field("input_bytes"),
                    format!("at most {} bytes (the frame cap)", symphony_core::wire::INPUT_LIMIT),
                ));
            }
            input_bytes.push(m.input_bytes);
            tensors.push(
                ModelTensors::declared(m.inputs.clone(), m.outputs.clone(), m.input_bytes)
                    .map_err(|(side, expected)| invalid(&field(side), expected))?,
            );
            models.push(ModelConfig {
                name: m.name.clone(),
                profile,
                slo_ns,
            });
        }
        let p = &raw.policy;
        fn knob(value: &Option<String>) -> Option<&str> {
            value.as_deref().map(str::trim).filter(|v| !v.is_empty())
        }
        let policy: PolicyKind = knob(&p.kind)
            .unwrap_or("symphony")
            .parse()
            .map_err(|e: String| invalid("policy.kind", e))?;
        if !matches!(
            policy,
            PolicyKind::Symphony | PolicyKind::SymphonyRef | PolicyKind::Eager
        ) {
            return Err(invalid(
                "policy.kind",
                "symphony, symphony-ref or eager (the peers run in the simulator only)".to_string(),
            ));
        }
        let mut knobs = Knobs::default();
        if let Some(v) = knob(&p.drop) {
            knobs.drop = Some(v.parse::<DropPolicy>().map_err(|e| invalid("policy.drop", e))?);
        }
        if let Some(v) = knob(&p.condition) {
            knobs.condition = Some(v.parse::<Condition>().map_err(|e| invalid("policy.condition", e))?);
        }
        if let Some(v) = knob(&p.grant) {
            knobs.grant = Some(v.parse::<GrantPolicy>().map_err(|e| invalid("policy.grant", e))?);
        }
        if let Some(v) = knob(&p.class_planning) {
            knobs.class_planning = v
                .parse::<ClassPlanning>()
                .map_err(|e| invalid("policy.class_planning", e))?;
        }
        knobs.correction = p.correction.unwrap_or(false);
        knobs.correction_idle = p.correction_idle.unwrap_or(false);
        let e = &raw.embedded;
        let cold_gap_ms = e.cold_gap_ms.unwrap_or(0.0);
        if !(cold_gap_ms.is_finite() && cold_gap_ms >= 0.0) {
            return Err(invalid("embedded.cold_gap_ms", "milliseconds >= 0".to_string()));
        }
        let embedded_exec = ExecModel {
            scale: e.exec_scale.unwrap_or(1.0),
            noise_sigma: e.exec_noise.unwrap_or(0.0),
            cold_factor: e.cold_factor.unwrap_or(1.0),
            cold_gap_ns: (cold_gap_ms * 1e6) as u64,
            drift_per_s: e.drift_per_s.unwrap_or(0.0),
        };
        embedded_exec.check().map_err(|e| invalid("embedded", e))?;
        let mut embedded_factors = Vec::new();
        for class in e.classes.iter().flatten() {
            let speeds = symphony_core::workload::gpu_speeds();
            if class.count == 0 || !speeds.contains(&class.speed) {
                return Err(invalid(
                    "embedded.classes",
                    format!(
                        "classes of at least 1 GPU at a speed of {} to {}",
                        speeds.start(),
                        speeds.end()
                    ),
                ));
            }
            embedded_factors.extend(std::iter::repeat_n(1.0 / class.speed, class.count as usize));
        }
        for (value, slot) in [
            (p.d_ctrl_us, &mut knobs.d_ctrl_ns),
            (p.d_data_us, &mut knobs.d_data_ns),
            (p.d_resp_us, &mut knobs.d_resp_ns),
            (p.jitter_us, &mut knobs.jitter_ns),
        ] {
            if let Some(us) = value {
                *slot = us.saturating_mul(1000);
            }
        }
        let limits = raw.limits;
        for (field, value, least) in [
            ("limits.connections_per_shard", limits.connections_per_shard, 1),
            ("limits.links_per_shard", limits.links_per_shard, 1),
            ("limits.requests_per_shard", limits.requests_per_shard, 1),
            ("limits.requests_per_connection", limits.requests_per_connection, 1),
            (
                "limits.request_bytes_per_connection",
                limits.request_bytes_per_connection,
                REQUEST_BYTES_MIN,
            ),
            (
                "limits.request_bytes_per_shard",
                limits.request_bytes_per_shard,
                REQUEST_BYTES_MIN,
            ),
            ("limits.routed_batch", limits.routed_batch, 1),
            ("limits.mesh_channel", limits.mesh_channel, 2),
            ("limits.http_body_bytes", limits.http_body_bytes, HTTP_BODY_BYTES_MIN),
            (
                "limits.grpc_streams_per_connection",
                limits.grpc_streams_per_connection,
                1,
            ),
            ("limits.grpc_stream_requests", limits.grpc_stream_requests, 1),
            (
                "limits.write_buffer_bytes",
                limits.write_buffer_bytes,
                WRITE_BUFFER_BYTES_MIN,
            ),
            (
                "limits.link_write_buffer_bytes",
                limits.link_write_buffer_bytes,
                LINK_WRITE_BUFFER_BYTES_MIN,
            ),
        ] {
            if value < least {
                return Err(invalid(field, format!("at least {least}")));
            }
        }
        let executor_token = match (&raw.executor_token, &raw.executor_token_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "executor_token_file",
                    "no executor_token beside it (one of the two)".to_string(),
                ))
            }
            (_, Some(path)) => {
                Some(read_token_file(&base_dir.join(path)).map_err(|e| invalid("executor_token_file", e))?)
            }
            (token, None) => token.clone(),
        };
        let executor_gpus = match (&executor_token, raw.executor_gpus) {
            (Some(_), None) => EXECUTOR_GPUS_DEFAULT,
            (_, gpus) => gpus.unwrap_or(0),
        };
        let http = match raw.http.as_deref() {
            None => Endpoint::Default,
            Some(text) => Endpoint::parse(text).map_err(|expected| invalid("http", expected))?,
        };
        let metrics = match raw.metrics.as_deref() {
            None => Endpoint::Default,
            Some(text) => Endpoint::parse(text).map_err(|expected| invalid("metrics", expected))?,
        };
        let grpc = match raw.grpc.as_deref() {
            None => Endpoint::Default,
            Some(text) => Endpoint::parse(text).map_err(|expected| invalid("grpc", expected))?,
        };
        let tls = match &raw.tls {
            None => None,
            Some(tls) => {
                let ports = match &tls.ports {
                    None => TlsPorts::ALL,
                    Some(names) => TlsPorts::from_names(names).map_err(|e| invalid("tls.ports", e))?,
                };
                Some(
                    ServerTls::load(&base_dir.join(&tls.cert), &base_dir.join(&tls.key), ports)
                        .map_err(|e| invalid("tls", format!("a readable certificate and its key: {e}")))?,
                )
            }
        };
        let config = ServeConfig {
            source: source.to_string(),
            listen: raw.listen,
            http,
            metrics,
            grpc,
            shards: raw.shards,
            cpus: raw.cpus,
            gpus: raw.gpus,
            executor_gpus,
            timeouts,
            zero_copy: raw.zero_copy,
            models,
            input_bytes,
            tensors,
            policy,
            knobs,
            limits,
            executor_token,
            tls,
            embedded_exec,
            embedded_factors,
        };
        config.check_gpus(source, "")?;
        Ok(config)
    }

    /// The GPU fields together: embedded GPUs, the executor token and its slots. `source` and
    /// `prefix` name where they came from (`--` for the command line).
    fn check_gpus(&self, source: &str, prefix: &str) -> Result<(), ConfigError> {
        let invalid = |field: &str, expected: String| ConfigError::Invalid {
            file: source.to_string(),
            field: format!(
                "{prefix}{}",
                if prefix.is_empty() {
                    field.to_string()
                } else {
                    field.replace('_', "-")
                }
            ),
            expected,
        };
        let token_limit = symphony_core::wire::executor::TOKEN_LIMIT;
        if self.gpus > EMBEDDED_GPUS_LIMIT {
            return Err(invalid(
                "gpus",
                format!("0 to {EMBEDDED_GPUS_LIMIT} embedded simulated GPUs"),
            ));
        }
        if self
            .executor_token
            .as_ref()
            .is_some_and(|t| t.is_empty() || t.len() > token_limit)
        {
            return Err(invalid("executor_token", format!("1 to {token_limit} bytes")));
        }
        if self.executor_token.is_none() && self.executor_gpus > 0 {
            return Err(invalid("executor_gpus", "an executor token as well".to_string()));
        }
        if self.executor_gpus > EMBEDDED_GPUS_LIMIT {
            return Err(invalid("executor_gpus", format!("at most {EMBEDDED_GPUS_LIMIT}")));
        }
        if !self.embedded_factors.is_empty() && self.embedded_factors.len() != self.gpus as usize {
            return Err(invalid(
                "gpus",
                format!(
                    "the {} GPUs that `[embedded] classes` (or the workload's gpu_classes) give",
                    self.embedded_factors.len()
                ),
            ));
        }
        if self.gpus == 0 && self.executor_gpus == 0 {
            return Err(invalid(
                "gpus",
                "at least 1 embedded GPU, or an executor token for external executors".to_string(),
            ));
        }
        // With TLS on, the executor token never crosses a plain link: executors present it on
        // the native port (HELLO) and on the links (JOIN).
        let plain_token_port = self
            .tls
            .as_ref()
            .is_some_and(|tls| self.executor_token.is_some() && !(tls.ports.client && tls.ports.links));
        if plain_token_port {
            return Err(ConfigError::Invalid {
                file: source.to_string(),
                field: "tls.ports".to_string(),
                expected: "`client` and `links` among them while an executor token is set (the token crosses both)"
                    .to_string(),
            });
        }
        Ok(())
    }

    /// `serve --tls-cert --tls-key`: TLS on every port with this certificate and key (over
    /// a `[tls]` of the file), checked as the file's is.
    pub fn apply_tls_override(&mut self, cert: &Path, key: &Path) -> Result<(), ConfigError> {
        let tls = ServerTls::load(cert, key, TlsPorts::ALL).map_err(|e| ConfigError::Invalid {
            file: "command line".to_string(),
            field: "--tls-cert/--tls-key".to_string(),
            expected: format!("a readable certificate and its key: {e}"),
        })?;
        self.tls = Some(tls);
        self.check_gpus("command line", "--")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_is_valid() {
        let c = ServeConfig::example();
        assert_eq!(c.models.len(), 3);
        assert_eq!(c.gpus, 8);
        assert_eq!(c.policy, PolicyKind::Symphony);
    }

    #[test]
    fn correction_and_the_embedded_gpus_execution_are_configured_and_checked() {
        let models = "[[models]]\nname = \"m\"\nprofile = \"sleep#100,100,0,0\"\nslo_ms = 100\n";
        let parse = |extra: &str| ServeConfig::parse(&format!("gpus = 2\n{models}{extra}"), Path::new("."), "t");
        let plain = parse("").unwrap();
        assert!(!plain.knobs.correction && plain.embedded_exec.is_exact());
        assert_eq!(plain.knobs.class_planning, ClassPlanning::PerClass);
        let slowest = parse("[policy]\nclass_planning = \"slowest\"\n").unwrap();
        assert_eq!(slowest.knobs.class_planning, ClassPlanning::Slowest);
        let e = parse("[policy]\nclass_planning = \"fastest\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("policy.class_planning"), "{e}");
        let set =
            parse("[policy]\ncorrection = true\ncorrection_idle = true\n[embedded]\nexec_noise = 0.1\ncold_factor = 2\ncold_gap_ms = 5\n")
                .unwrap();
        assert!(set.knobs.correction && set.knobs.correction_idle);
        assert_eq!(
            set.embedded_exec,
            ExecModel {
                scale: 1.0,
                noise_sigma: 0.1,
                cold_factor: 2.0,
                cold_gap_ns: 5_000_000,
                drift_per_s: 0.0
            }
        );
        let e = parse("[embedded]\ncold_factor = 0.5\n").unwrap_err().to_string();
        assert!(
            e.contains("`embedded`") && e.contains("cold-start factor must be 1 to 100"),
            "{e}"
        );
        let e = parse("[embedded]\ncold_gap_ms = -1\n").unwrap_err().to_string();
        assert!(e.contains("embedded.cold_gap_ms"), "{e}");
        let e = parse("[embedded]\nwarp = 1\n").unwrap_err().to_string();
        assert!(e.contains("warp"), "{e}");
        let classes =
            parse("[embedded]\nclasses = [{ count = 1, speed = 1.0 }, { count = 1, speed = 0.25 }]\n").unwrap();
        assert_eq!(classes.embedded_factors, [1.0, 4.0]);
        let e = parse("[embedded]\nclasses = [{ count = 3, speed = 1.0 }]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`gpus`") && e.contains("the 3 GPUs"), "{e}");
        let e = parse("[embedded]\nclasses = [{ count = 2, speed = 0 }]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("embedded.classes"), "{e}");
    }

    #[test]
    fn the_executor_token_may_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("symphony-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("token"), "s3cret\n").unwrap();
        std::fs::write(dir.join("empty"), "  \n").unwrap();
        let models = "[[models]]\nname = \"m\"\nprofile = \"sleep#100,100,0,0\"\nslo_ms = 100\n";
        let config = ServeConfig::parse(
            &format!("gpus = 0\nexecutor_token_file = \"token\"\n{models}"),
            &dir,
            "t",
        )
        .unwrap();
        assert_eq!(config.executor_token.as_deref(), Some("s3cret"));
        assert_eq!(config.executor_gpus, EXECUTOR_GPUS_DEFAULT);
        let empty = ServeConfig::parse(&format!("executor_token_file = \"empty\"\n{models}"), &dir, "t");
        assert!(empty.unwrap_err().to_string().contains("not an empty file"));
        let missing = ServeConfig::parse(&format!("executor_token_file = \"nope\"\n{models}"), &dir, "t");
        assert!(missing.unwrap_err().to_string().contains("a readable token file"));
        let both = ServeConfig::parse(
            &format!("executor_token = \"a\"\nexecutor_token_file = \"token\"\n{models}"),
            &dir,
            "t",
        );
        assert!(both.unwrap_err().to_string().contains("one of the two"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tls_reads_its_files_beside_the_config_and_guards_the_token() {
        let dir = std::env::temp_dir().join(format!("symphony-tls-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        std::fs::write(dir.join("tls.crt"), made.cert.pem()).unwrap();
        std::fs::write(dir.join("tls.key"), made.signing_key.serialize_pem()).unwrap();
        let models = "[[models]]\nname = \"m\"\nprofile = \"sleep#100,100,0,0\"\nslo_ms = 100\n";
        let parse = |head: &str| ServeConfig::parse(&format!("{head}\n{models}"), &dir, "t");
        let tls = "[tls]\ncert = \"tls.crt\"\nkey = \"tls.key\"\n";
        let config = parse(&format!("gpus = 1\nexecutor_token = \"t\"\n{tls}")).unwrap();
        assert_eq!(config.tls.as_ref().unwrap().ports, TlsPorts::ALL);
        assert!(parse("gpus = 1").unwrap().tls.is_none());
        // Only the KServe ports: fine without a token, refused with one.
        let some = format!("{tls}ports = [\"http\", \"grpc\"]\n");
        let ports = parse(&format!("gpus = 1\n{some}")).unwrap().tls.unwrap().ports;
        assert!(ports.http && ports.grpc && !ports.client && !ports.links && !ports.metrics);
        let error = parse(&format!("gpus = 1\nexecutor_token = \"t\"\n{some}")).unwrap_err();
        assert!(error.to_string().contains("tls.ports"), "{error}");
        let error = parse(&format!("gpus = 1\n{tls}ports = [\"web\"]\n")).unwrap_err();
        assert!(error.to_string().contains("port names among"), "{error}");
        let error = parse("gpus = 1\n[tls]\ncert = \"nope.crt\"\nkey = \"tls.key\"\n").unwrap_err();
        assert!(error.to_string().contains("nope.crt"), "{error}");
        // The command line's certificate with a token: all ports, accepted.
        let mut plain = parse("gpus = 1\nexecutor_token = \"t\"").unwrap();
        plain
            .apply_tls_override(&dir.join("tls.crt"), &dir.join("tls.key"))
            .unwrap();
        assert!(plain.tls.is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn zero_copy_sends_are_on_unless_turned_off() {
        let text = "gpus = 1\n[[models]]\nname = \"m\"\nprofile = \"sleep#1,1,0,0\"\nslo_ms = 10\n";
        assert!(ServeConfig::parse(text, Path::new("."), "t").unwrap().zero_copy);
        let off = format!("zero_copy = false\n{text}");
        assert!(!ServeConfig::parse(&off, Path::new("."), "t").unwrap().zero_copy);
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            ("gpus = 1\nmodels = []\n", "`models`"),
            ("gpus = 0\n[[models]]\nname = \"a\"\nprofile = \"sleep#1,1,0,0\"\nslo_ms = 10\n", "`gpus`"),
            (
                "gpus = 1\nexecutor_gpus = 4\n[[models]]\nname = \"a\"\nprofile = \"sleep#1,1,0,0\"\nslo_ms = 10\n",
                "`executor_gpus`",
            ),
            ("gpus = 1\n[[models]]\nname = \"a\"\nprofile = \"bad\"\nslo_ms = 10\n", "`models[0].profile`"),
            ("gpus = 1\n[[models]]\nname = \"a\"\nprofile = \"sleep#1,1,0,0\"\nslo_ms = -1\n", "`models[0].slo_ms`"),
            (
                "gpus = 1\n[[models]]\nname = \"a\"\nprofile = \"sleep#1,1,0,0\"\nslo_ms = 10\n[policy]\nkind = \"nexus\"\n",
                "`policy.kind`",
            ),
            ("gpus = 1\nbogus = 3\n", "bogus"),
        ];
        for (text, needle) in cases {
            let e = ServeConfig::parse(text, Path::new("."), "c.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains("c.toml") && e.contains(needle), "{e}");
        }
    }
}
