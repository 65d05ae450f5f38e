//! The KServe v2 HTTP front end of the spawned release binary: the real Python
//! `tritonclient` against it, and what a broken or hostile HTTP client gets.

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use support::{example_config, Serve};
use symphony_core::wire::{ModelRef, Status};

/// The example's models and `steady` (FP32 [16] to [4] like the example's `small`, SLO 1 s),
/// scheduled eagerly: these tests are of the front ends, and a deferred batch waits for most
/// of its SLO (and, on a machine busy with other tests, a late timer drops it: the
/// scheduler's business, tested elsewhere).
fn kserve_config(extra: &str) -> String {
    example_config(extra)
        + "\n[[models]]\nname = \"steady\"\nprofile = \"sleep#400,2000,0,0\"\nslo_ms = 1000\n\
           inputs = [{ name = \"INPUT0\", datatype = \"FP32\", shape = [16] }]\n\
           outputs = [{ name = \"OUTPUT0\", datatype = \"FP32\", shape = [4] }]\n\
           [policy]\nkind = \"eager\"\n"
}

/// `serve` with [`kserve_config`] (2 shards, 4 GPUs) and its HTTP front end on a free port.
fn serve_http() -> (Serve, SocketAddr) {
    let serve = Serve::start(&kserve_config("shards = 2\ngpus = 4"), &["--http", "127.0.0.1:0"]);
    let addr = logged_addr(&serve, "KServe v2 over HTTP at", "/v2");
    (serve, addr)
}

/// The address in serve's start-up line that says `what` (`http://ADDR{suffix}`).
fn logged_addr(serve: &Serve, what: &str, suffix: &str) -> SocketAddr {
    logged_url(serve, what, "http://", suffix)
}

/// The address in serve's start-up line that says `what`, between `scheme` and `suffix`.
fn logged_url(serve: &Serve, what: &str, scheme: &str, suffix: &str) -> SocketAddr {
    assert!(
        serve.wait_log(what, Duration::from_secs(10)),
        "no {what:?} in: {}",
        serve.log_text()
    );
    let line = serve.log_lines().into_iter().find(|l| l.contains(what)).unwrap();
    line.split(scheme)
        .nth(1)
        .and_then(|rest| rest.strip_suffix(suffix))
        .and_then(|addr| addr.parse().ok())
        .unwrap_or_else(|| panic!("an address in {line:?}"))
}

/// The Python that has `tritonclient` (`.ci/run` makes `.venv` at the checkout's root), or
/// `SYMPHONY_PYTHON`.
fn python() -> Option<PathBuf> {
    let path = std::env::var_os("SYMPHONY_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python"));
    let usable = Command::new(&path)
        .args(["-c", "import tritonclient.http, tritonclient.grpc, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    usable.then_some(path)
}

/// [`python`], or `None` after saying the test is skipped (outside CI: CI installs it with
/// `.ci/run`, and there its absence is a failure).
fn python_or_skip() -> Option<PathBuf> {
    let found = python();
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "no Python with tritonclient at .venv (see .ci/run)"
        );
        println!("skipped: no Python with tritonclient (python3 -m venv .venv && .venv/bin/pip install 'tritonclient[http,grpc]')");
    }
    found
}

#[test]
fn the_python_tritonclient_gets_health_metadata_and_inference_over_http() {
    let Some(python) = python_or_skip() else { return };
    let (mut serve, addr) = serve_http();
    client_script_passes(
        &python,
        "tests/kserve/tritonclient_http.py",
        &addr.to_string(),
        &mut serve,
        16,
    );
}

#[test]
fn the_python_tritonclient_speaks_grpc_unary_and_streaming() {
    let Some(python) = python_or_skip() else { return };
    // With the default limits, and with a stream's requests held to 2 at a time (the limit
    // reached by the stream's 9: the call must still answer every one, then end).
    for extra in ["", "[limits]\ngrpc_stream_requests = 2"] {
        let mut serve = Serve::start(
            &kserve_config(&format!("shards = 2\ngpus = 4\n{extra}")),
            &["--grpc", "127.0.0.1:0"],
        );
        let addr = logged_url(&serve, "KServe v2 over gRPC at", "grpc://", "");
        client_script_passes(
            &python,
            "tests/kserve/tritonclient_grpc.py",
            &addr.to_string(),
            &mut serve,
            21,
        );
    }
}

/// `limits.grpc_streams_per_connection` reached: with a limit of 2, a third call on the same
/// connection waits until one of the first two ends, then it is served.
#[test]
fn a_grpc_connection_holds_its_limit_of_streams() {
    let Some(python) = python_or_skip() else { return };
    let mut serve = Serve::start(
        &kserve_config("shards = 2\ngpus = 4\n[limits]\ngrpc_streams_per_connection = 2"),
        &["--grpc", "127.0.0.1:0"],
    );
    let addr = logged_url(&serve, "KServe v2 over gRPC at", "grpc://", "");
    client_script_passes(
        &python,
        "tests/kserve/grpc_stream_limit.py",
        &addr.to_string(),
        &mut serve,
        4,
    );
}

/// Every front end with `[tls]`: the real tritonclient over HTTPS (binary and JSON) and gRPC
/// with TLS (unary and streaming) trusting the service's certificate (made here), `/metrics`
/// over HTTPS counting what it sent; plain HTTP to the TLS port answered 400 with the reason;
/// a client that does not trust the certificate stopped.
#[test]
fn the_python_tritonclient_speaks_https_and_grpc_over_tls() {
    let Some(python) = python_or_skip() else { return };
    let dir = support::scratch("kserve-tls");
    let (cert, key) = support::self_signed(&dir);
    let tls = format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\n", cert.display(), key.display());
    let mut serve = Serve::start(
        &kserve_config(&format!("shards = 2\ngpus = 4\n{tls}")),
        &[
            "--http",
            "127.0.0.1:0",
            "--grpc",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let http = logged_url(&serve, "KServe v2 over HTTP at", "https://", "/v2").to_string();
    let grpc = logged_url(&serve, "KServe v2 over gRPC at", "grpcs://", "").to_string();
    let metrics = logged_url(&serve, "Prometheus metrics at", "https://", "/metrics").to_string();
    let ca = cert.display().to_string();
    client_script_passes_with(
        &python,
        "tests/kserve/tritonclient_tls.py",
        &[&http, &grpc, &metrics, &ca],
        &mut serve,
        10,
    );
}

/// Runs a client script against `addr`: it passes, says `ok` `checks` times, and the service
/// is alive after it.
fn client_script_passes(python: &PathBuf, script: &str, addr: &str, serve: &mut Serve, checks: usize) {
    client_script_passes_with(python, script, &[addr], serve, checks);
}

/// [`client_script_passes`] with the script's arguments.
fn client_script_passes_with(python: &PathBuf, script: &str, args: &[&str], serve: &mut Serve, checks: usize) {
    let (passed, stdout, stderr) = run_python(python, script, args);
    println!("{stdout}");
    assert!(
        passed,
        "{script} failed:\n{stdout}\n{stderr}\nserve: {}",
        serve.log_text()
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("ok ")).count(),
        checks,
        "{stdout}"
    );
    serve.assert_alive(script);
}

/// One valid request body for `steady` (FP32 [16]).
const SMALL_INPUT: &str =
    r#"{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":[0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15]}]}"#;

/// Runs a client script against `addr`, killed past `PYTHON_TIMEOUT`: (passed, stdout,
/// stderr).
fn run_python(python: &PathBuf, script: &str, args: &[&str]) -> (bool, String, String) {
    const PYTHON_TIMEOUT: Duration = Duration::from_secs(120);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(script);
    let mut child = Command::new(python)
        .arg(script)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let passed = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.success();
        }
        if started.elapsed() > PYTHON_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    let _ = child.stdout.take().unwrap().read_to_string(&mut stdout);
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    (passed, stdout, stderr)
}

/// One HTTP/1.1 exchange on a fresh connection: (status, body).
fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

fn post(path: &str, body: &str) -> Vec<u8> {
    post_on(path, body, "connection: close\r\n")
}

/// A POST with extra header lines (`connection: close`, or nothing to keep it alive).
fn post_on(path: &str, body: &str, headers: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\n{headers}content-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn bad_http_requests_get_typed_errors_and_the_service_lives_on() {
    let (mut serve, addr) = serve_http();
    let (status, body) = exchange(
        addr,
        b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert_eq!((status, body.as_str()), (200, ""));
    let infer = "/v2/models/steady/infer";
    let tensor = SMALL_INPUT;
    let (status, body) = exchange(addr, &post(infer, tensor));
    assert_eq!(status, 200, "{body}");
    // The simulated backend computes nothing: the declared output, zeros, batch dimension
    // and all.
    assert!(body.contains(r#""model_name":"steady""#), "{body}");
    assert!(
        body.contains(r#""datatype":"FP32","name":"OUTPUT0","shape":[1,4]"#),
        "{body}"
    );
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("not JSON", post(infer, "{nope"), 400, "not valid JSON"),
        ("no inputs", post(infer, "{}"), 400, "no 'inputs'"),
        (
            "too few elements",
            post(infer, r#"{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,16],"data":[1,2]}]}"#),
            400,
            "2 elements of data for 16",
        ),
        (
            "another datatype",
            post(infer, r#"{"inputs":[{"name":"INPUT0","datatype":"UINT8","shape":[1,16],"data":[1]}]}"#),
            400,
            "datatype UINT8, the model takes FP32",
        ),
        (
            "another shape",
            post(infer, r#"{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1,15],"data":[1]}]}"#),
            400,
            "does not fit the model's [16]",
        ),
        (
            "a batch in one request",
            post(infer, r#"{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[2,16],"data":[1]}]}"#),
            400,
            "send one item per request",
        ),
        (
            "an input the model does not have",
            post(infer, r#"{"inputs":[{"name":"X","datatype":"FP32","shape":[16],"data":[1]}]}"#),
            400,
            "unknown input 'X'",
        ),
        (
            "a value that is not a number",
            post(infer, r#"{"inputs":[{"name":"INPUT0","datatype":"FP32","shape":[1],"data":["a"]}]}"#),
            400,
            "does not fit",
        ),
        ("an unknown model", post("/v2/models/nope/infer", tensor), 404, "unknown model"),
        (
            "binary data past the body",
            format!(
                "POST {infer} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ninference-header-content-length: 999\r\ncontent-length: 2\r\n\r\n{{}}"
            )
            .into_bytes(),
            400,
            "past the body",
        ),
        ("an unknown endpoint", post("/v3/what", ""), 404, "no such endpoint"),
    ];
    for (what, request, want, needle) in cases {
        let (status, body) = exchange(addr, &request);
        assert_eq!(status, want, "{what}: {body}");
        assert!(body.contains("\"error\"") && body.contains(needle), "{what}: {body}");
    }
    // Not HTTP at all: hyper answers 400 and closes; the service is unharmed.
    let (status, _) = exchange(addr, b"\x00\x01garbage\r\n\r\n");
    assert_eq!(status, 400);
    let (status, _) = exchange(addr, &post(infer, tensor));
    assert_eq!(status, 200);
    serve.assert_alive("bad HTTP requests");
}

/// `name{labels} value` lines of a scrape, by `name{labels}`.
fn scrape(addr: SocketAddr) -> std::collections::HashMap<String, f64> {
    let (status, body) = exchange(addr, b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    assert_eq!(status, 200, "{body}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("a sample line: {l:?}"));
            (
                key.to_string(),
                value.parse().unwrap_or_else(|_| panic!("a number in {l:?}")),
            )
        })
        .collect()
}

/// Embedded GPUs that run every batch twice as slowly as its profile (`[embedded]
/// cold_factor = 2`, a gap of 0): with `[policy] correction` the scheduler learns it and the
/// scrape shows the factor it plans at; without, nothing is corrected.
#[test]
fn embedded_gpus_that_run_slow_are_corrected_and_the_scrape_says_so() {
    for correction in [true, false] {
        let config = kserve_config("shards = 1\ngpus = 2")
            + &format!("correction = {correction}\n[embedded]\ncold_factor = 2.0\n");
        let serve = Serve::start(&config, &["--metrics", "127.0.0.1:0"]);
        let metrics = logged_addr(&serve, "Prometheus metrics at", "/metrics");
        let mut client = serve.client();
        let model = ModelRef::Name("steady".into());
        // One at a time: a batch of one each.
        for id in 0..40 {
            client.send(id, &model, None, &[0u8; 64]).unwrap();
            assert_eq!(client.recv().unwrap().status, Status::Ok);
        }
        let m = scrape(metrics);
        let get = |key: &str| *m.get(key).unwrap_or_else(|| panic!("no {key} in the scrape"));
        let corrections = get("symphony_profile_corrections_total{model=\"steady\"}");
        let measured = get("symphony_profile_corrected_batches_total{model=\"steady\"}");
        let factor = get("symphony_profile_correction_factor{model=\"steady\"}");
        // The batches' own compute times say twice the profile's 2.4 ms (a late timer only
        // adds to it).
        let compute_s = get("symphony_compute_duration_seconds_sum{model=\"steady\"}");
        assert!(
            compute_s >= 40.0 * 0.0048 * 0.99,
            "compute {compute_s} s for 40 batches"
        );
        if correction {
            // At least the slowdown; a p99 over 40 batches is their slowest, so one late timer
            // on a busy machine raises it further.
            assert!(
                measured == 40.0 && corrections >= 2.0 && factor >= 1.9,
                "measured {measured}, corrections {corrections}, factor {factor}"
            );
        } else {
            assert_eq!((measured, corrections, factor), (0.0, 0.0, 1.0));
        }
    }
}

/// Embedded GPUs of two speeds (`[embedded] classes`): the scrape shows each class's factor
/// and GPUs, their capacity in GPUs of the base's speed, and the desired GPUs counted at the
/// online GPUs' mean speed: 1 GPU at speed 1 and 3 at 1/8 do the work of 1.375 base GPUs, so
/// a demand of more than 0.344 base GPUs needs more than one of these 4 (4 / 1.375 = 2.9
/// each), where the base count says 1.
#[test]
fn a_scrape_shows_the_gpu_classes_and_counts_desired_gpus_at_their_speed() {
    let config = kserve_config("shards = 1\ngpus = 4")
        + "[embedded]\nclasses = [{ count = 1, speed = 1.0 }, { count = 3, speed = 0.125 }]\n";
    let serve = Serve::start(&config, &["--metrics", "127.0.0.1:0"]);
    let metrics = logged_addr(&serve, "Prometheus metrics at", "/metrics");
    let mut client = serve.client();
    let model = ModelRef::Name("steady".into());
    // A steady load for the rate meter: 600 requests at about 2,000 a second (0.4 ms of the
    // base GPU each: a demand near 0.8).
    for id in 0..600 {
        client.send(id, &model, None, &[0u8; 64]).unwrap();
        if id % 2 == 1 {
            client.flush().unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    client.flush().unwrap();
    for _ in 0..600 {
        assert_eq!(client.recv().unwrap().status, Status::Ok);
    }
    let m = scrape(metrics);
    let get = |key: &str| *m.get(key).unwrap_or_else(|| panic!("no {key} in the scrape"));
    assert_eq!(get("symphony_gpu_class_factor{class=\"0\"}"), 1.0);
    assert_eq!(get("symphony_gpu_class_factor{class=\"1\"}"), 8.0);
    assert_eq!(get("symphony_gpu_class_online{class=\"0\"}"), 1.0);
    assert_eq!(get("symphony_gpu_class_online{class=\"1\"}"), 3.0);
    assert_eq!(get("symphony_gpu_capacity"), 1.375);
    let demand = get("symphony_demand_gpus");
    assert!(demand > 0.344, "the load was measured: {demand} base GPUs");
    assert_eq!(
        get("symphony_desired_gpus"),
        (demand * 4.0 / 1.375 - 1e-9).ceil(),
        "demand {demand} base GPUs"
    );
}

#[test]
fn a_scrape_of_metrics_counts_what_was_sent_by_outcome_model_and_batch() {
    let serve = Serve::start(
        &kserve_config("shards = 2\ngpus = 4"),
        &["--http", "127.0.0.1:0", "--metrics", "127.0.0.1:0"],
    );
    let http = logged_addr(&serve, "KServe v2 over HTTP at", "/v2");
    let metrics = logged_addr(&serve, "Prometheus metrics at", "/metrics");
    let infer = "/v2/models/steady/infer";
    let tensor = SMALL_INPUT;
    let hopeless = &format!(r#"{{"parameters":{{"timeout":10}},{}"#, &SMALL_INPUT[1..]);
    // At once (deferral holds each for most of its SLO), each on its own connection.
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let calls: Vec<_> = (0..30)
            .map(|_| scope.spawn(move || exchange(http, &post(infer, tensor)).0))
            .collect();
        calls.into_iter().map(|c| c.join().unwrap()).collect()
    });
    assert_eq!(statuses, [200; 30]);
    for _ in 0..5 {
        assert_eq!(exchange(http, &post(infer, hopeless)).0, 503);
    }
    for _ in 0..3 {
        assert_eq!(exchange(http, &post("/v2/models/nope/infer", tensor)).0, 404);
    }
    let mut client = serve.client();
    let model = ModelRef::Name("steady".into());
    for id in 0..10 {
        client.send(id, &model, None, &[0u8; 64]).unwrap();
    }
    for _ in 0..10 {
        assert_eq!(client.recv().unwrap().status, Status::Ok);
    }
    let m = scrape(metrics);
    let get = |key: &str| *m.get(key).unwrap_or_else(|| panic!("no {key} in the scrape"));
    let ran = |model: &str| {
        get(&format!(
            "symphony_requests_total{{model=\"{model}\",outcome=\"success\"}}"
        )) + get(&format!(
            "symphony_requests_total{{model=\"{model}\",outcome=\"late\"}}"
        ))
    };
    assert_eq!(ran("steady"), 40.0, "30 over HTTP, 10 native");
    assert_eq!(
        get("symphony_requests_total{model=\"steady\",outcome=\"dropped\"}"),
        5.0
    );
    assert_eq!(get("symphony_replies_total{status=\"ok\"}"), 40.0);
    assert_eq!(get("symphony_replies_total{status=\"dropped\"}"), 5.0);
    assert_eq!(get("symphony_http_errors_total{code=\"404\"}"), 3.0);
    assert_eq!(get("symphony_queue_duration_seconds_count{model=\"steady\"}"), 40.0);
    assert_eq!(get("symphony_compute_duration_seconds_count{model=\"steady\"}"), 40.0);
    assert_eq!(
        get("symphony_queue_duration_seconds_bucket{model=\"steady\",le=\"+Inf\"}"),
        40.0
    );
    // Every batch of `steady` is counted once; together they hold its 40 requests.
    assert_eq!(get("symphony_batch_size_sum{model=\"steady\"}"), 40.0);
    assert!(get("symphony_batch_size_count{model=\"steady\"}") >= 1.0);
    assert_eq!(get("symphony_gpus"), 4.0);
    let busy: f64 = (0..4)
        .map(|g| get(&format!("symphony_gpu_busy_seconds_total{{gpu=\"{g}\"}}")))
        .sum();
    assert!(busy > 0.0, "the GPUs ran plans");
    assert!(m.contains_key("symphony_desired_gpus"));
    // The HTTP port serves the same; the metrics port serves nothing else.
    assert!(scrape(http).contains_key("symphony_gpus"));
    let (status, _) = exchange(metrics, b"GET /v2 HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n");
    assert_eq!(status, 404);
}

/// One exchange on a kept-alive connection: (status, body), reading exactly the body.
fn keepalive_exchange(stream: &mut TcpStream, request: &[u8]) -> (u16, String) {
    stream.write_all(request).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "the connection closed mid-answer");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[test]
fn http_connections_past_the_limit_are_refused_with_503_and_the_open_ones_served() {
    let mut serve = Serve::start(
        &kserve_config("gpus = 2\nshards = 1\n[limits]\nconnections_per_shard = 4"),
        &["--http", "127.0.0.1:0"],
    );
    let addr = logged_addr(&serve, "KServe v2 over HTTP at", "/v2");
    let live = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n\r\n";
    // Four connections, each with a request answered: open, and none idle to evict.
    let mut open: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut stream = TcpStream::connect(addr).unwrap();
            stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            assert_eq!(keepalive_exchange(&mut stream, live).0, 200);
            stream
        })
        .collect();
    let (status, body) = exchange(
        addr,
        b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"error\"") && body.contains("limit"), "{body}");
    // The open connections are still served, inference included.
    for stream in &mut open {
        let (status, body) = keepalive_exchange(stream, &post_on("/v2/models/steady/infer", SMALL_INPUT, ""));
        assert_eq!(status, 200, "{body}");
    }
    serve.assert_alive("connections past the limit");
}

#[test]
fn an_http_body_past_its_limit_is_answered_413() {
    let serve = Serve::start(
        &kserve_config("shards = 1\ngpus = 2\n[limits]\nhttp_body_bytes = 2048"),
        &["--http", "127.0.0.1:0"],
    );
    let addr = logged_addr(&serve, "KServe v2 over HTTP at", "/v2");
    // Just under the limit: served; past it: 413, and the service goes on.
    let data = vec!["1"; 16].join(",");
    let padded = format!(
        r#"{{"id":"{}","inputs":[{{"name":"INPUT0","datatype":"FP32","shape":[16],"data":[{data}]}}]}}"#,
        "x".repeat(1800)
    );
    assert!(padded.len() < 2048);
    let (status, body) = exchange(addr, &post("/v2/models/steady/infer", &padded));
    assert_eq!(status, 200, "{body}");
    let big = padded.replace(&"x".repeat(1800), &"x".repeat(3000));
    let (status, body) = exchange(addr, &post("/v2/models/steady/infer", &big));
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("limits.http_body_bytes"), "{body}");
    assert_eq!(exchange(addr, &post("/v2/models/steady/infer", SMALL_INPUT)).0, 200);
}

#[test]
fn a_model_named_for_a_cpu_network_shows_that_networks_tensors() {
    let config = "listen = \"127.0.0.1:0\"\ngpus = 1\n\
        [[models]]\nname = \"mlp-a\"\nprofile = \"sleep#100,100,0,0\"\nslo_ms = 100\n\
        [[models]]\nname = \"other\"\nprofile = \"sleep#100,100,0,0\"\nslo_ms = 100\n";
    let serve = Serve::start(config, &["--http", "127.0.0.1:0"]);
    let addr = logged_addr(&serve, "KServe v2 over HTTP at", "/v2");
    let get = |path: &str| {
        exchange(
            addr,
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
    };
    let (status, body) = get("/v2/models/mlp-a");
    assert_eq!(status, 200);
    assert!(
        body.contains(r#""inputs":[{"datatype":"FP32","name":"input","shape":[-1,256]}]"#)
            && body.contains(r#""outputs":[{"datatype":"FP32","name":"output","shape":[-1,10]}]"#),
        "{body}"
    );
    // A model of no network keeps the defaults: one UINT8 input and output of any length.
    let (_, body) = get("/v2/models/other");
    assert!(
        body.contains(r#"{"datatype":"UINT8","name":"INPUT0","shape":[-1,-1]}"#),
        "{body}"
    );
}
