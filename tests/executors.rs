//! External executors end to end on loopback: `symphony serve` with no embedded GPU, executor
//! processes (`symphony executor --backend sim`) or in-process executors, a client sending to
//! several models. Covers replies and their timings, inputs reaching the executor (the sim
//! backend echoes them), an executor killed mid-run, missed heartbeats, a wrong token, broken
//! link frames, and executors of different speeds planned as GPU classes (against the spawned
//! release binary).

mod support;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use symphony_core::wire::executor::{self as exec, Join};
use symphony_core::wire::{self, ErrorCode, FrameDecoder, Kind, ModelRef, Status};
use symphony_gpu_exec::backend::BackendKind;
use symphony_gpu_exec::executor::{self, ExecutorConfig, ExecutorError};
use symphony_shards::client::Client;
use symphony_shards::config::ServeConfig;
use symphony_shards::server::{self, ServerHandle};

const TOKEN: &str = "test-token";

/// One test at a time: each runs a service pinned to the CPUs and executors that follow
/// plans to the millisecond; on 2 cores, parallel tests would make each other late.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn start_server(shards: usize, heartbeat_timeout_ms: u64) -> ServerHandle {
    let text = symphony_shards::config::EXAMPLE_CONFIG
        .replace("127.0.0.1:7070", "127.0.0.1:0")
        .replace(
            "gpus = 8",
            &format!("gpus = 0\nexecutor_token = \"{TOKEN}\"\nheartbeat_timeout_ms = {heartbeat_timeout_ms}"),
        );
    let mut config = ServeConfig::parse(&text, Path::new("."), "test").unwrap();
    config.shards = Some(shards);
    server::start(&config).expect("the service starts")
}

/// A `symphony executor` process; killed when dropped.
struct ExecutorProcess(Child);

impl ExecutorProcess {
    fn spawn(addr: &str, gpus: u32) -> ExecutorProcess {
        ExecutorProcess::spawn_with(addr, gpus, &[])
    }

    fn spawn_with(addr: &str, gpus: u32, extra: &[&str]) -> ExecutorProcess {
        let child = Command::new(env!("CARGO_BIN_EXE_symphony"))
            .args(["executor", "--scheduler", addr, "--token", TOKEN, "--backend", "sim"])
            .args(["--gpus", &gpus.to_string(), "--heartbeat-ms", "20"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawns symphony executor");
        ExecutorProcess(child)
    }
}

impl Drop for ExecutorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// An in-process executor of one GPU for `server`.
fn one_gpu_executor(server: &ServerHandle, token: &str, backend: BackendKind) -> ExecutorConfig {
    ExecutorConfig::new(vec![server.local_addr().to_string()], token.to_string(), 1, backend)
}

/// Waits until `n` executors are online (their GPUs in the table).
fn wait_online(server: &ServerHandle, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.executors_online() < n {
        assert!(Instant::now() < deadline, "{n} executors never came online");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn models() -> [ModelRef; 3] {
    [
        ModelRef::Name("resnet_a".to_string()),
        ModelRef::Name("resnet_b".to_string()),
        ModelRef::Name("small".to_string()),
    ]
}

#[test]
fn executor_processes_serve_several_models_with_their_inputs() {
    let _serial = serial();
    let server = start_server(2, 1000);
    let addr = server.local_addr().to_string();
    let _a = ExecutorProcess::spawn(&addr, 2);
    let _b = ExecutorProcess::spawn(&addr, 1);
    wait_online(&server, 2);
    let mut client = Client::connect(server.local_addr()).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let models = models();
    // 300 requests at about 1000 a second: well within 3 GPUs.
    let count = 300u64;
    for id in 0..count {
        let input = format!("input-{id}").into_bytes();
        client.send(id, &models[(id % 3) as usize], None, &input).unwrap();
        if id % 10 == 9 {
            client.flush().unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    client.flush().unwrap();
    let mut seen = HashMap::new();
    for _ in 0..count {
        let reply = client.recv().unwrap();
        assert_eq!(reply.status, Status::Ok, "{reply:?}");
        // The sim backend echoes: the input crossed client -> shard -> executor -> back.
        assert_eq!(reply.output, format!("input-{}", reply.client_request_id).into_bytes());
        let t = reply.timings;
        assert!(t.exec_us > 0 && t.queued_us + t.exec_us <= t.total_us + 1, "{t:?}");
        // A batch of the small model takes at least its intercept (2 ms), a resnet 5.2 ms.
        let floor_us = if reply.client_request_id % 3 == 2 { 2_000 } else { 5_000 };
        assert!(t.exec_us >= floor_us, "{t:?}");
        assert!(
            seen.insert(reply.client_request_id, ()).is_none(),
            "one reply per request"
        );
    }
    assert_eq!(seen.len(), count as usize);
    let stats = server.stats();
    assert!(stats.executor_plans.load(Ordering::Relaxed) > 0);
    assert_eq!(stats.executors_lost.load(Ordering::Relaxed), 0);
    server.stop().unwrap();
}

/// GPUs of two speeds, one 4 times slower than the profile: each batch is planned for the
/// class of GPU it is granted, so a model whose SLO only the fast GPU can meet (a batch of one
/// takes 12 ms there, 48 ms on the slow one, and 38 ms are left after the reply's 2 ms) is
/// served on it, where planning every GPU as the slowest drops all of it. A model with time
/// to spare is served either way, some of it on the slow GPU, as slowly as it runs. `gpus` is
/// the config's GPU part; `start` brings the slow
/// GPU's executor up, if any, and waits until the service plans two classes.
fn tight_model_served_per_class(gpus: &str, start: impl Fn(&support::Serve) -> Vec<ExecutorProcess>) {
    for (planning, tight_served) in [("slowest", false), ("per-class", true)] {
        let config = format!(
            "listen = \"127.0.0.1:0\"\nshards = 1\n{gpus}\n\
             [[models]]\nname = \"tight\"\nprofile = \"sleep#2000,10000,0,0\"\nslo_ms = 40\n\
             [[models]]\nname = \"loose\"\nprofile = \"sleep#2000,10000,0,0\"\nslo_ms = 2000\n\
             [policy]\nclass_planning = \"{planning}\"\n"
        );
        let serve = support::Serve::start(&config, &[]);
        let _executors = start(&serve);
        let mut client = serve.client();
        let tight = ModelRef::Name("tight".to_string());
        let loose = ModelRef::Name("loose".to_string());
        // 40 of each at about 100 a second: well within the two GPUs.
        let count = 80u64;
        for id in 0..count {
            let model = if id % 2 == 0 { &tight } else { &loose };
            client.send(id, model, None, format!("in-{id}").as_bytes()).unwrap();
            client.flush().unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        let (mut tight_ok, mut loose_ok, mut loose_exec_us_max) = (0, 0, 0);
        for _ in 0..count {
            let reply = client.recv().unwrap();
            let is_tight = reply.client_request_id % 2 == 0;
            match reply.status {
                Status::Ok if is_tight => {
                    // In time: run on the fast GPU (the slow one takes 48 ms).
                    assert!(reply.timings.total_us <= 40_000, "{planning}: {reply:?}");
                    assert!(reply.timings.exec_us < 40_000, "{planning}: {reply:?}");
                    tight_ok += 1;
                }
                Status::Ok => {
                    loose_ok += 1;
                    loose_exec_us_max = loose_exec_us_max.max(reply.timings.exec_us);
                }
                Status::Dropped if is_tight => {}
                other => panic!("{planning}: request {} answered {other:?}", reply.client_request_id),
            }
        }
        assert_eq!(loose_ok, count / 2, "{planning}: the loose model is served either way");
        // The slow GPU takes its batches (a batch of one: 48 ms) and runs them 4 times as long.
        assert!(
            loose_exec_us_max >= 44_000,
            "{planning}: loose batches ran {loose_exec_us_max} us at most"
        );
        if tight_served {
            assert_eq!(tight_ok, count / 2, "{planning}: the tight model on the fast GPU");
        } else {
            assert_eq!(tight_ok, 0, "{planning}: every GPU planned 4 times slower");
        }
    }
}

/// Executors of different speeds (the sim backend's `--speed`, whose GPU runs and registers
/// its profile at that speed) make two GPU classes.
#[test]
fn a_model_only_the_fast_executor_can_serve_in_time_is_served_on_it() {
    let _serial = serial();
    tight_model_served_per_class(&format!("gpus = 0\nexecutor_token = \"{TOKEN}\""), |serve| {
        let addr = serve.addr.to_string();
        let executors = vec![
            ExecutorProcess::spawn(&addr, 1),
            ExecutorProcess::spawn_with(&addr, 1, &["--speed", "0.25"]),
        ];
        // Whichever joins second sees both: the base is the fast one's profile.
        assert!(
            serve.wait_log("(2 GPU classes)", Duration::from_secs(20)),
            "two classes: {}",
            serve.log_text()
        );
        executors
    });
}

/// Embedded GPUs of different speeds (`[embedded] classes`) are planned the same way.
#[test]
fn a_model_only_the_fast_embedded_gpu_can_serve_in_time_is_served_on_it() {
    let _serial = serial();
    tight_model_served_per_class(
        "gpus = 2\n[embedded]\nclasses = [{ count = 1, speed = 1.0 }, { count = 1, speed = 0.25 }]",
        |serve| {
            assert!(
                serve.wait_log("at speeds 1 x1, 0.25 x1", Duration::from_secs(5)),
                "{}",
                serve.log_text()
            );
            Vec::new()
        },
    );
}

#[test]
fn an_executor_killed_mid_run_loses_no_request() {
    let _serial = serial();
    let server = start_server(2, 300);
    let addr = server.local_addr().to_string();
    let mut victim = ExecutorProcess::spawn(&addr, 2);
    let _survivor = ExecutorProcess::spawn(&addr, 2);
    wait_online(&server, 2);
    let client = Client::connect(server.local_addr()).unwrap();
    let (mut sender, mut receiver) = client.split();
    receiver.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let total = 3000u64;
    let writer = std::thread::spawn(move || {
        // About 1500 requests a second for 2 s, in bursts of 15 every 10 ms.
        let models = models();
        let start = Instant::now();
        for id in 0..total {
            sender.send(id, &models[(id % 3) as usize], None, b"x").unwrap();
            if id % 15 == 14 {
                sender.flush().unwrap();
                let due = start + Duration::from_millis(10 * (id + 1) / 15);
                std::thread::sleep(due.saturating_duration_since(Instant::now()));
            }
        }
        sender.flush().unwrap();
        sender
    });
    std::thread::sleep(Duration::from_millis(700));
    victim.0.kill().unwrap();
    let killed_at = Instant::now();
    let mut statuses: HashMap<u64, Status> = HashMap::new();
    let mut ok_after_kill = 0;
    for _ in 0..total {
        let reply = receiver.recv().expect("every request is answered");
        assert!(
            matches!(reply.status, Status::Ok | Status::Dropped | Status::ExecutorLost),
            "{reply:?}"
        );
        if reply.status == Status::Ok && killed_at.elapsed() > Duration::from_millis(600) {
            ok_after_kill += 1;
        }
        assert!(
            statuses.insert(reply.client_request_id, reply.status).is_none(),
            "request {} answered twice",
            reply.client_request_id
        );
    }
    let _sender = writer.join().unwrap();
    assert_eq!(statuses.len(), total as usize);
    let stats = server.stats();
    assert_eq!(stats.executors_lost.load(Ordering::Relaxed), 1);
    // The survivor goes on serving after the loss was noticed.
    assert!(ok_after_kill > 100, "only {ok_after_kill} ok replies after the kill");
    let ok = statuses.values().filter(|s| **s == Status::Ok).count();
    assert!(ok as f64 > 0.8 * total as f64, "{ok} of {total} ok");
    server.stop().unwrap();
}

#[test]
fn an_executor_that_stops_heartbeating_is_lost_and_told_so() {
    let _serial = serial();
    let server = start_server(1, 200);
    let mut config = one_gpu_executor(&server, TOKEN, BackendKind::Sim);
    // Slower than the server's timeout: the server drops the links.
    config.heartbeat_interval = Duration::from_secs(30);
    let running = executor::start(&config).unwrap();
    wait_online(&server, 1);
    let stop = AtomicBool::new(false);
    let outcome = running.wait(&stop);
    assert!(matches!(outcome, Err(ExecutorError::SchedulerGone(_))), "{outcome:?}");
    assert_eq!(server.stats().executors_lost.load(Ordering::Relaxed), 1);
    assert_eq!(server.executors_online(), 0);
    // Its slot is free again: a new executor registers.
    let running = executor::start(&one_gpu_executor(&server, TOKEN, BackendKind::Sim)).unwrap();
    wait_online(&server, 1);
    let stop = Arc::new(AtomicBool::new(true));
    running.wait(&stop).unwrap();
    server.stop().unwrap();
}

#[test]
fn a_wrong_token_is_refused() {
    let _serial = serial();
    let server = start_server(1, 1000);
    let config = one_gpu_executor(&server, "not-the-token", BackendKind::Sim);
    match executor::start(&config) {
        Err(ExecutorError::Refused { code, message }) => {
            assert_eq!(code, ErrorCode::Unauthorized);
            assert!(message.contains("token"), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(server.executors_online(), 0);
    // The front door still serves clients (no GPU: the request waits, then is dropped).
    let mut client = Client::connect(server.local_addr()).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reply = client.call(&ModelRef::Name("small".into()), None, b"").unwrap();
    assert_eq!(reply.status, Status::Dropped);
    server.stop().unwrap();
}

#[test]
fn a_service_without_a_token_refuses_executors() {
    let _serial = serial();
    let text = symphony_shards::config::EXAMPLE_CONFIG.replace("127.0.0.1:7070", "127.0.0.1:0");
    let config = ServeConfig::parse(&text, Path::new("."), "test").unwrap();
    let server = server::start(&config).unwrap();
    let config = one_gpu_executor(&server, TOKEN, BackendKind::Sim);
    match executor::start(&config) {
        Err(ExecutorError::Refused { code, .. }) => assert_eq!(code, ErrorCode::Unauthorized),
        other => panic!("expected a refusal, got {other:?}"),
    }
    server.stop().unwrap();
}

/// Reads one frame from a raw socket.
fn read_frame(stream: &mut TcpStream) -> (Kind, Vec<u8>) {
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(Ok(frame)) = FrameDecoder::default().frames(&buffer).next() {
            return (frame.kind, frame.payload.to_vec());
        }
        let n = stream.read(&mut chunk).expect("a frame before the timeout");
        assert!(n > 0, "closed before a frame");
        buffer.extend_from_slice(&chunk[..n]);
    }
}

#[test]
fn links_refuse_unknown_executors_and_bad_frames() {
    let _serial = serial();
    let server = start_server(1, 1000);
    // A valid executor to learn the link address from its WELCOME.
    let running = executor::start(&one_gpu_executor(&server, TOKEN, BackendKind::Sim)).unwrap();
    wait_online(&server, 1);
    let link_addr = server.executor_link_addrs()[0].clone();
    // JOIN for an executor id nobody registered.
    let mut stream = TcpStream::connect(&link_addr).unwrap();
    let mut frame = Vec::new();
    let join = Join {
        token: TOKEN.to_string(),
        executor_id: 999,
        secret: [0; 16],
        shard: 0,
    };
    exec::encode(&mut frame, Kind::ExecJoin, &join).unwrap();
    stream.write_all(&frame).unwrap();
    let (kind, payload) = read_frame(&mut stream);
    assert_eq!(kind, Kind::Error);
    assert_eq!(wire::decode_error(&payload).unwrap().code, ErrorCode::Refused);
    // Garbage on a new link: an error frame, the connection closed.
    let mut stream = TcpStream::connect(&link_addr).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let (kind, payload) = read_frame(&mut stream);
    assert_eq!(kind, Kind::Error);
    assert_eq!(wire::decode_error(&payload).unwrap().code, ErrorCode::BadMagic);
    // The real executor is untouched.
    assert_eq!(server.executors_online(), 1);
    let mut client = Client::connect(server.local_addr()).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let reply = client.call(&ModelRef::Name("small".into()), None, b"hi").unwrap();
    assert_eq!((reply.status, reply.output.as_slice()), (Status::Ok, b"hi".as_slice()));
    let stop = AtomicBool::new(true);
    running.wait(&stop).unwrap();
    server.stop().unwrap();
}

/// Two outputs of little-endian f32 logits agree within 1e-4 (relative).
fn logits_close(got: &[u8], want: &[u8]) -> bool {
    got.len() == want.len()
        && got.chunks_exact(4).zip(want.chunks_exact(4)).all(|(a, b)| {
            let (a, b) = (
                f32::from_le_bytes(a.try_into().unwrap()),
                f32::from_le_bytes(b.try_into().unwrap()),
            );
            (a - b).abs() <= 1e-4 * b.abs().max(1.0)
        })
}

#[test]
fn cpu_executors_answer_real_inferences() {
    use symphony_gpu_exec::backend::{Backend, BatchOutput};
    use symphony_gpu_exec::cpu::CpuBackend;
    use symphony_gpu_exec::nets::{self, Network, Weights};
    let _serial = serial();
    let text = format!(
        r#"listen = "127.0.0.1:0"
gpus = 0
executor_token = "{TOKEN}"
[[models]]
name = "mlp"
profile = "sleep#20,300,0,0"
slo_ms = 50
[[models]]
name = "resnet"
profile = "sleep#1000,100,0,0"
slo_ms = 100
"#
    );
    let mut config = ServeConfig::parse(&text, Path::new("."), "test").unwrap();
    config.shards = Some(2);
    let server = server::start(&config).unwrap();
    let mut executor_config = one_gpu_executor(&server, TOKEN, BackendKind::Cpu);
    executor_config.profile_batch_max = 4;
    executor_config.profile_repeat = 1;
    // This test checks what is computed, not timing: on 2 busy cores a cpu batch can run
    // past its profile and push the next plan past the default 5 ms late bound.
    executor_config.late_bound_ns = 50_000_000;
    let running = executor::start(&executor_config).unwrap();
    wait_online(&server, 1);
    let mut client = Client::connect(server.local_addr()).unwrap();
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // What the network computes, straight from the backend.
    let expected = |name: &str, input: &[u8]| {
        let mut backend = CpuBackend::of_weights(&Weights::for_model(name).unwrap());
        let mut out = BatchOutput::default();
        backend.run(0, &[input], &mut out).unwrap();
        out.outputs
    };
    let mut sent = Vec::new();
    for id in 0..12u64 {
        let (network, name) = if id % 3 == 2 {
            (Network::ResNet, "resnet")
        } else {
            (Network::Mlp, "mlp")
        };
        // Request 5 carries a truncated input: refused alone, its batch runs.
        let mut input = nets::sample_input(network, id);
        if id == 5 {
            input.truncate(100);
        }
        client
            .send(id, &ModelRef::Name(name.to_string()), None, &input)
            .unwrap();
        sent.push((network, name, input));
    }
    client.flush().unwrap();
    for _ in 0..sent.len() {
        let reply = client.recv().unwrap();
        let (_, name, input) = &sent[reply.client_request_id as usize];
        if reply.client_request_id == 5 {
            assert_eq!(reply.status, Status::Malformed, "{reply:?}");
            continue;
        }
        assert_eq!(reply.status, Status::Ok, "{reply:?}");
        assert_eq!(reply.output.len(), 40);
        // Batched with others or alone, the logits are those of this input.
        let want = expected(name, input);
        let close = logits_close(&reply.output, &want);
        assert!(close, "request {}: logits differ", reply.client_request_id);
    }
    // Six resnet inputs at once (12 KiB each): one plan of 72 KiB, its inputs sent zero-copy
    // from the client's receive buffer, and still the right logits.
    let resnet = ModelRef::Name("resnet".to_string());
    let inputs: Vec<Vec<u8>> = (100..106u64)
        .map(|id| nets::sample_input(Network::ResNet, id))
        .collect();
    for (id, input) in (100..106u64).zip(&inputs) {
        client.send(id, &resnet, None, input).unwrap();
    }
    client.flush().unwrap();
    for _ in 0..inputs.len() {
        let reply = client.recv().unwrap();
        assert_eq!(reply.status, Status::Ok, "{reply:?}");
        let want = expected("resnet", &inputs[(reply.client_request_id - 100) as usize]);
        let close = logits_close(&reply.output, &want);
        assert!(close, "request {}: logits differ", reply.client_request_id);
    }
    let stats = server.stats();
    let (sends, bytes) = (
        stats.zero_copy_sends.load(Ordering::Relaxed),
        stats.zero_copy_bytes.load(Ordering::Relaxed),
    );
    assert!(sends > 0, "plans of 16 KiB of inputs or more go out zero-copy");
    assert!(bytes >= 16 << 10, "{bytes} bytes sent zero-copy");
    assert_eq!(stats.zero_copy_fallbacks.load(Ordering::Relaxed), 0);
    let stop = AtomicBool::new(true);
    running.wait(&stop).unwrap();
    server.stop().unwrap();
}
