//! Heap allocations over a served run: the glommio service in this process (shard threads,
//! connections, the frame loop, the writers, the timer loop with the embedded executors, the
//! mesh), the load generator in a process of its own (the release binary), so every
//! allocation this test process counts is the service's. Counted over the middle two seconds
//! of a steady load.
//!
//! The service's own code allocates nothing per request (the shard's whole path is counted
//! at zero in `perf/tests/no_alloc_shard.rs`); glommio's reactor allocates a little each time
//! its loop waits for I/O or a timer (a `Source` for its preemption timers, one for a socket
//! read that would block), so the count follows wall time and the loop's idle turns, not
//! the requests. The test shows it: five times the requests do not bring more allocations.
//! One allocation per request would add 200,000 in the busier window and fail it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use symphony_core::workload::Workload;
use symphony_shards::config::ServeConfig;
use symphony_shards::server;

#[path = "../perf/tests/counting/mod.rs"]
mod counting;

use counting::{ALLOCATIONS, COUNTING};

/// 50 light models on 64 GPUs, RPS req/s each (1 s warm-up, 3 s measured, 1 s cool-down).
const WORKLOAD: &str = r#"
seed: 5
gpus: 64
models:
MODELS
"#;

fn workload_text(rps: u32) -> String {
    let models: String = (0..50)
        .map(|i| {
            format!(
                "- {{framework: \"sleep#400,2000,0,0\", model: m{i}, slo: 100, gap: exp, warmup: [{{duration: 1, rps: RPS}}], bench: [{{duration: 3, rps: RPS}}], cooldown: [{{duration: 1, rps: RPS}}]}}\n"
            )
        })
        .collect();
    WORKLOAD.replace("MODELS\n", &models).replace("RPS", &rps.to_string())
}

/// Allocations counted, requests accepted and plans made in the counted window.
fn served(shards: usize, rps: u32) -> (u64, u64, u64) {
    let text = workload_text(rps);
    let workload = Workload::parse(&text, Path::new("."), "served.yaml").unwrap();
    let mut config = ServeConfig::from_workload(&workload);
    config.listen = "127.0.0.1:0".to_string();
    config.shards = Some(shards);
    let server = server::start(&config).expect("the service starts");
    let dir = std::env::temp_dir().join(format!("symphony-served-{}-{shards}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("served.yaml");
    std::fs::write(&file, &text).unwrap();
    let load = Command::new(env!("CARGO_BIN_EXE_symphony"))
        .args([
            "loadgen",
            "--target",
            &server.local_addr().to_string(),
            "--connections",
            "2",
            "--workload",
        ])
        .arg(&file)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the load generator starts");
    // The middle of the bench phase: connections open, buffers and tables grown.
    std::thread::sleep(Duration::from_millis(2_000));
    let counts = |server: &server::ServerHandle| {
        let stats = server.stats();
        (
            stats.requests.load(Ordering::SeqCst),
            stats.plans.load(Ordering::SeqCst),
        )
    };
    let before = counts(&server);
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(2_000));
    COUNTING.store(false, Ordering::SeqCst);
    let allocations = ALLOCATIONS.load(Ordering::SeqCst);
    let after = counts(&server);
    let output = load.wait_with_output().expect("the load generator ends");
    server.stop().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{report}");
    assert!(report.contains("noreply 0"), "every request answered: {report}");
    (allocations, after.0 - before.0, after.1 - before.1)
}

#[test]
fn allocations_follow_time_not_requests() {
    for shards in [1, 2] {
        let (quiet, quiet_requests, _) = served(shards, 400);
        let (busy, busy_requests, busy_plans) = served(shards, 2000);
        println!(
            "{shards} shard(s): {quiet} allocations over {quiet_requests} requests at 20,000 req/s; \
             {busy} over {busy_requests} requests ({busy_plans} plans) at 100,000 req/s: {:.3} a request",
            busy as f64 / busy_requests.max(1) as f64
        );
        assert!(
            busy_requests > 4 * quiet_requests,
            "the busy window saw the load: {busy_requests} against {quiet_requests} requests"
        );
        assert!(
            (busy as f64) < 1.5 * quiet as f64 + 1_000.0,
            "{shards} shard(s): {busy} allocations for {busy_requests} requests, against {quiet} for {quiet_requests}"
        );
    }
}
