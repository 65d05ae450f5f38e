//! The live service and the simulator agree: the same workload through `symphony sim` and
//! through the glommio service with embedded simulated executors, driven by the open-loop
//! load generator over loopback, gives bad rates within a few points at moderate load.

use std::path::Path;

use symphony_core::policy::PolicyKind;
use symphony_core::sim::{simulate, SimConfig};
use symphony_core::workload::Workload;
use symphony_perf::loadgen::{self, LoadSpec};
use symphony_shards::config::ServeConfig;
use symphony_shards::server;

/// Eight ResNet-like models at about 45 % of 8 GPUs, shortened phases to keep the test short.
const WORKLOAD: &str = r#"
seed: 11
gpus: 8
models:
- {framework: "sleep#1082,5204,0,0", model: m0, slo: 100, gap: exp, warmup: [{duration: 0.5, rps: 375}], bench: [{duration: 2, rps: 375}], cooldown: [{duration: 0.5, rps: 375}]}
- {framework: "sleep#1082,5204,0,0", model: m1, slo: 100, gap: exp, warmup: [{duration: 0.5, rps: 375}], bench: [{duration: 2, rps: 375}], cooldown: [{duration: 0.5, rps: 375}]}
- {framework: "sleep#1082,5204,0,0", model: m2, slo: 100, gap: "gamma:0.5", warmup: [{duration: 0.5, rps: 375}], bench: [{duration: 2, rps: 375}], cooldown: [{duration: 0.5, rps: 375}]}
- {framework: "sleep#1082,5204,0,0", model: m3, slo: 100, gap: "gamma:0.5", warmup: [{duration: 0.5, rps: 375}], bench: [{duration: 2, rps: 375}], cooldown: [{duration: 0.5, rps: 375}]}
- {framework: "sleep#400,2000,0,0", model: s0, slo: 50, gap: exp, warmup: [{duration: 0.5, rps: 600}], bench: [{duration: 2, rps: 600}], cooldown: [{duration: 0.5, rps: 600}]}
- {framework: "sleep#400,2000,0,0", model: s1, slo: 50, gap: exp, warmup: [{duration: 0.5, rps: 600}], bench: [{duration: 2, rps: 600}], cooldown: [{duration: 0.5, rps: 600}]}
"#;

#[test]
fn live_service_and_simulator_agree_at_moderate_load() {
    let workload = Workload::parse(WORKLOAD, Path::new("."), "live.yaml").unwrap();
    let simulated = simulate(&workload, &SimConfig::of(&workload, PolicyKind::Symphony)).summary;

    let mut config = ServeConfig::from_workload(&workload);
    config.listen = "127.0.0.1:0".to_string();
    // One shard leaves the other core of a 2-core machine to the load generator.
    config.shards = Some(1);
    let server = server::start(&config).expect("the service starts");
    let report = loadgen::run(&LoadSpec {
        target: server.local_addr().to_string(),
        workload: workload.clone(),
        rate_scale: 1.0,
        seed: workload.seed,
        connections: 2,
        input_bytes: 64,
        model_input_bytes: None,
        progress: false,
    })
    .expect("the load runs");
    server.stop().unwrap();

    assert_eq!(report.noreply, 0, "every request gets a reply");
    // The same arrivals: the same offered load.
    assert_eq!(report.bench_requests, simulated.counts.total);
    let live = report.bad_rate;
    let sim = simulated.counts.bad_rate_percent();
    println!("bad rate: live {live:.3} %, simulated {sim:.3} %");
    assert!(sim <= 1.0, "moderate load: the simulator serves it ({sim:.3} %)");
    assert!((live - sim).abs() <= 3.0, "live {live:.3} % vs simulated {sim:.3} %");
}
