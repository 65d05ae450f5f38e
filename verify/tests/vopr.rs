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
