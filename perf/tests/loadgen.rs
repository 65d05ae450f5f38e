//! The open-loop load generator (`perf::loadgen`) against a fake server written here from
//! `docs/protocol.md`: a std `TcpListener` on 127.0.0.1 that decodes requests with `core::wire`
//! and answers by model name:
//! - `drop-me`: `DROPPED` at once; `nope`: `UNKNOWN_MODEL` at once;
//! - `silent`: no reply;
//! - `close-me`: closes the connection;
//! - any other name: `OK` after 1 ms.
//!
//! A frame it cannot decode gets an ERROR frame and a closed connection.

use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use symphony_core::wire::{decode_request, ErrorCode, FrameDecoder, Kind, ModelRef, Status};
use symphony_core::workload::{Phase, Workload};
use symphony_perf::loadgen::{self, LoadError, LoadSpec, CONNECTIONS_LIMIT, REQUESTS_LIMIT};

#[path = "../../shards/tests/support/fake_server.rs"]
mod fake_server;

use fake_server::{error_frame, Out};

const OK_DELAY: Duration = Duration::from_millis(1);

fn serve(mut stream: TcpStream) {
    stream.set_nodelay(true).expect("nodelay");
    let write_stream = stream.try_clone().expect("clones");
    let (tx, rx) = mpsc::channel::<Out>();
    let writer = thread::spawn(move || fake_server::write_loop(write_stream, rx, Shutdown::Both));
    let decoder = FrameDecoder::default();
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    'read: loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buffer.extend_from_slice(&chunk[..n]);
        let mut frames = decoder.frames(&buffer);
        for frame in frames.by_ref() {
            let request = match frame {
                Ok(frame) if frame.kind == Kind::Request => decode_request(frame.payload),
                Ok(_) => {
                    let _ = tx.send(Out::Close(error_frame(ErrorCode::UnexpectedKind, "requests only")));
                    break 'read;
                }
                Err(error) => {
                    let code = error.error_code().expect("a decode error has a code");
                    let _ = tx.send(Out::Close(error_frame(code, &error.to_string())));
                    break 'read;
                }
            };
            let request = match request {
                Ok(request) => request,
                Err(error) => {
                    let _ = tx.send(Out::Close(error_frame(ErrorCode::Malformed, &error.to_string())));
                    break 'read;
                }
            };
            let now = Instant::now();
            let id = request.client_request_id;
            let name = match &request.model {
                ModelRef::Name(name) => name.as_str(),
                ModelRef::Id(_) => "",
            };
            let out = match name {
                "drop-me" => Out::At(now, fake_server::reply_frame(id, Status::Dropped, &[], 0)),
                "nope" => Out::At(now, fake_server::reply_frame(id, Status::UnknownModel, &[], 0)),
                "silent" => continue,
                "close-me" => Out::Close(Vec::new()),
                _ => Out::At(now + OK_DELAY, fake_server::reply_frame(id, Status::Ok, &[], 0)),
            };
            let closing = matches!(out, Out::Close(_));
            let _ = tx.send(out);
            if closing {
                break 'read;
            }
        }
        let consumed = frames.consumed();
        buffer.drain(..consumed);
    }
    drop(tx);
    let _ = writer.join();
    let _ = stream.shutdown(Shutdown::Both);
}

/// Two models: `fast` (answered OK after 1 ms) and a dropped one, `rps` each in warm-up, bench
/// and cool-down.
fn workload(yaml: &str) -> Workload {
    Workload::parse(yaml, Path::new("."), "inline").expect("a valid workload")
}

fn two_models(second: &str, bench_s: f64) -> Workload {
    workload(&format!(
        "seed: 7
gpus: 1
models:
- framework: sleep#1082,5204,0,0
  model: fast
  slo: 200
  gap: exp
  warmup: [{{duration: 0.2, rps: 1500}}]
  bench: [{{duration: {bench_s}, rps: 1500}}]
  cooldown: [{{duration: 0.1, rps: 1500}}]
- framework: sleep#1082,5204,0,0
  model: {second}
  slo: 200
  gap: const
  warmup: [{{duration: 0.2, rps: 500}}]
  bench: [{{duration: {bench_s}, rps: 500}}]
  cooldown: [{{duration: 0.1, rps: 500}}]
"
    ))
}

fn spec(target: String, workload: Workload) -> LoadSpec {
    LoadSpec {
        target,
        workload,
        rate_scale: 1.0,
        seed: 11,
        connections: 2,
        input_bytes: 16,
        model_input_bytes: None,
        progress: false,
    }
}

#[test]
fn open_loop_load_is_offered_achieved_and_measured() {
    let addr = fake_server::start(serve);
    let spec = spec(addr.to_string(), two_models("drop-me", 1.0));
    let mut arrivals = Vec::new();
    spec.workload
        .generate_arrivals(spec.rate_scale, spec.seed, &mut arrivals);
    let bench_fast = arrivals
        .iter()
        .filter(|a| a.phase == Phase::Bench && a.model_index == 0)
        .count() as u64;
    let bench_dropped = arrivals
        .iter()
        .filter(|a| a.phase == Phase::Bench && a.model_index == 1)
        .count() as u64;

    let start = Instant::now();
    let report = loadgen::run(&spec).expect("runs");
    let wall = start.elapsed();
    let json = serde_json::to_string_pretty(&report).expect("serializes");
    assert!(report.errors.is_empty(), "{json}");

    // Every request was sent and answered exactly once.
    assert_eq!(report.requests, arrivals.len() as u64);
    assert_eq!(report.sent, report.requests, "{json}");
    assert_eq!(report.received, report.requests, "{json}");
    assert_eq!((report.unsent, report.noreply), (0, 0), "{json}");
    assert_eq!((report.unexpected_replies, report.duplicate_replies), (0, 0), "{json}");

    // Only the bench phase counts; offered = achieved when every reply came.
    assert_eq!(report.bench_requests, bench_fast + bench_dropped);
    assert!((report.bench_s - 1.0).abs() < 1e-9);
    assert!((1800.0..2200.0).contains(&report.offered_rps), "{json}");
    assert!((report.achieved_rps - report.offered_rps).abs() < 1e-6, "{json}");
    assert_eq!(report.statuses.ok, bench_fast, "{json}");
    assert_eq!(report.statuses.dropped, bench_dropped, "{json}");

    // The dropped model is all bad, the other all good (1 ms against a 200 ms SLO).
    assert_eq!(report.success, bench_fast, "{json}");
    assert_eq!(report.late, 0, "{json}");
    let expected_bad = 100.0 * bench_dropped as f64 / report.bench_requests as f64;
    assert!((report.bad_rate - expected_bad).abs() < 1e-9, "{json}");
    assert!((20.0..30.0).contains(&report.bad_rate), "{json}");
    assert!((report.bad_rate_model_mean - 50.0).abs() < 1e-9, "{json}");
    assert_eq!(report.models[0].bad_rate, 0.0);
    assert_eq!(report.models[1].bad_rate, 100.0);
    assert!((report.success_rps - bench_fast as f64).abs() < 1e-6);

    // Three quarters of the replies waited 1 ms in the fake server: so did the median.
    assert!(report.latency_us_p50 >= 1000, "{json}");
    assert!(report.latency_us_p50 < 50_000, "{json}");
    assert!(report.latency_us_p50 <= report.latency_us_p99, "{json}");
    assert!(report.latency_us_p99 <= report.latency_us_p999, "{json}");
    assert!(report.latency_us_p999 <= report.latency_us_max, "{json}");
    assert!(report.send_lag_us_max < 200_000, "{json}");
    // 1.3 s of arrivals, and no waiting for replies that all came.
    assert!(wall < Duration::from_secs(4), "{wall:?}");
    assert!(json.contains("\"offered_rps\""));
}

#[test]
fn requests_without_replies_are_noreply_after_the_grace_time() {
    let addr = fake_server::start(serve);
    let workload = workload(
        "seed: 1
gpus: 1
models:
- framework: sleep#1082,5204,0,0
  model: silent
  slo: 10
  gap: const
  bench: [{duration: 0.2, rps: 100}]
- framework: sleep#1082,5204,0,0
  model: nope
  slo: 10
  gap: const
  bench: [{duration: 0.2, rps: 100}]
",
    );
    let start = Instant::now();
    let report = loadgen::run(&spec(addr.to_string(), workload)).expect("runs");
    let wall = start.elapsed();
    assert_eq!(report.bench_requests, 40);
    assert_eq!(report.sent, 40);
    assert_eq!(report.noreply, 20);
    assert_eq!(report.models[0].noreply, 20);
    assert_eq!(report.statuses.unknown_model, 20);
    assert_eq!(report.success, 0);
    assert_eq!(report.bad_rate, 100.0);
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    // The wait: the largest SLO plus 2 s after the last send, not forever.
    assert!(wall >= Duration::from_secs(2), "{wall:?}");
    assert!(wall < Duration::from_secs(5), "{wall:?}");
}

#[test]
fn a_connection_the_server_closes_is_reported_not_fatal() {
    let addr = fake_server::start(serve);
    let workload = workload(
        "seed: 1
gpus: 1
models:
- framework: sleep#1082,5204,0,0
  model: fast
  slo: 100
  gap: const
  bench: [{duration: 0.5, rps: 400}]
- framework: sleep#1082,5204,0,0
  model: close-me
  slo: 100
  gap: const
  bench: [{duration: 0.5, rps: 4}]
",
    );
    let report = loadgen::run(&spec(addr.to_string(), workload)).expect("runs");
    assert!(!report.errors.is_empty(), "no error reported");
    assert!(report.noreply > 0);
    assert!(report.noreply <= report.bench_requests);
    assert!(report.bad_rate > 0.0);
    assert_eq!(report.bench_requests, 202);
}

#[test]
fn limits_and_bad_targets_are_refused_up_front() {
    let base = spec("127.0.0.1:1".to_string(), two_models("drop-me", 1.0));
    let refused = |change: &dyn Fn(&mut LoadSpec)| {
        let mut spec = base.clone();
        change(&mut spec);
        loadgen::run(&spec).expect_err("refused")
    };
    assert!(matches!(refused(&|s| s.connections = 0), LoadError::Connections { .. }));
    let error = refused(&|s| s.connections = CONNECTIONS_LIMIT + 1);
    assert!(matches!(
        error,
        LoadError::Connections {
            connections: 1025,
            limit: 1024
        }
    ));
    assert!(error.to_string().contains("1..=1024"), "{error}");
    assert!(matches!(refused(&|s| s.rate_scale = 0.0), LoadError::RateScale { .. }));
    assert!(matches!(
        refused(&|s| s.rate_scale = f64::NAN),
        LoadError::RateScale { .. }
    ));
    let over_the_limit = 2.0 * REQUESTS_LIMIT as f64 / loadgen::expected_requests(&base.workload, 1.0);
    let error = refused(&|s| s.rate_scale = over_the_limit);
    assert!(matches!(error, LoadError::TooManyRequests { .. }), "{error}");
    assert!(matches!(
        refused(&|s| s.input_bytes = 1 << 30),
        LoadError::InputTooLarge { .. }
    ));
    assert!(matches!(
        refused(&|s| s.target = "no port here".to_string()),
        LoadError::Resolve { .. }
    ));

    // Nothing listens on a port just freed.
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    let addr = listener.local_addr().expect("has an address");
    drop(listener);
    let error = refused(&|s| s.target = addr.to_string());
    assert!(matches!(error, LoadError::Connect { connection: 0, .. }), "{error}");
}
