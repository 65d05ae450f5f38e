//! The VOPR in the test suite: a fixed set of seeds of the whole-service simulation
//! (`symphony_verify::vopr`), each with its own shards, models, limits, clients, executors and
//! faults. A failure names its seed; `cargo run --release -p symphony-verify --bin vopr --
//! --seed N` replays it with its knobs and the shards' log.

use symphony_verify::vopr::{self, Scenario};

/// Seeds run on every test run (about ten seconds in release on the CI machine).
const SEEDS: u64 = 150;

#[test]
fn the_service_keeps_its_promises_over_seeded_faults() {
    let mut requests = 0;
    let mut ok = 0;
    let mut losses = 0;
    for seed in 0..SEEDS {
        let scenario = Scenario::sample(seed);
        match vopr::run(&scenario, false) {
            Ok(outcome) => {
                requests += outcome.requests;
                ok += outcome.ok;
                losses += outcome.executor_losses;
            }
            Err(e) => panic!(
                "seed {seed} failed: {e}\n{}\nreplay: cargo run --release -p symphony-verify --bin vopr -- --seed {seed}",
                scenario.describe()
            ),
        }
    }
    // The runs did something: requests were served, and faults cost executors.
    assert!(requests > 10_000 && ok > requests / 4, "{requests} requests, {ok} ok");
    assert!(
        losses > 0,
        "no seed lost an executor: the faults are not reaching the service"
    );
}

/// Seed 895 found a GPU brought back after a hung plan planned over what other shards had
/// queued on it (the lane check); seed 0 finds a missing cancel on disconnect at once.
#[test]
fn a_seed_replays_exactly() {
    for seed in [0, 895] {
        let scenario = Scenario::sample(seed);
        let first = vopr::run(&scenario, false).expect("the seed passes");
        let again = vopr::run(&scenario, false).expect("the seed passes");
        assert_eq!(format!("{first:?}"), format!("{again:?}"), "seed {seed} ran two ways");
    }
}

/// One GPU, two models owned by two shards, more load than the GPU serves: candidates of
/// both shards wait for it, and each release hands it to the earliest `invalid_after`
/// across shards. Replaces a wall-clock test that could only assert shares within 1 : 20.
fn scarce_gpu(seed: u64) -> Scenario {
    let model = |name: &str| symphony_core::policy::ModelConfig {
        name: name.into(),
        profile: symphony_core::profile::Profile::parse_linear("sleep#200,8000,0,0", 60_000_000).unwrap(),
        slo_ns: 60_000_000,
    };
    Scenario {
        seed,
        shards: 2,
        embedded_gpus: 1,
        executors: Vec::new(),
        models: vec![model("a"), model("b")],
        input_bytes: vec![None, None],
        policy: symphony_core::policy::PolicyKind::Symphony,
        limits: symphony_shards::config::Limits::default(),
        timeouts: symphony_shards::config::Timeouts::default(),
        clients: 8,
        requests_per_client: 400,
        pipeline_max: 64,
        mesh_capacity: 32,
        faults: vopr::Faults::default(),
        faults_until_ns: 500_000_000,
    }
}

#[test]
fn shards_share_a_scarce_gpu_turn_by_turn() {
    for seed in 0..8 {
        let outcome = vopr::run(&scarce_gpu(seed), false).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let (a, b) = (outcome.ok_by_model[0], outcome.ok_by_model[1]);
        let (asked_a, asked_b) = (outcome.requests_by_model[0], outcome.requests_by_model[1]);
        assert!(outcome.ok < outcome.requests, "seed {seed}: the GPU was not overloaded");
        // Neither shard's model is starved: each has at least a quarter of its requests
        // served, and at least half the other's success rate (seeds 0 to 7 measure from even
        // to 74% : 36%, seed 4; the old wall-clock test allowed 1 : 20).
        let rate = |ok: u64, asked: u64| ok as f64 / asked.max(1) as f64;
        let (rate_a, rate_b) = (rate(a, asked_a), rate(b, asked_b));
        assert!(
            rate_a >= 0.25 && rate_b >= 0.25 && rate_a >= rate_b / 2.1 && rate_b >= rate_a / 2.1,
            "seed {seed}: a {a} of {asked_a} served, b {b} of {asked_b}"
        );
        assert!(outcome.handoffs > 0, "seed {seed}: no GPU was handed across shards");
    }
}
