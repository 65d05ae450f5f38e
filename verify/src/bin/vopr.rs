//! `vopr`: runs the seeded whole-service simulation over many seeds and prints the replay
//! command of any that fails.

use std::panic::{self, AssertUnwindSafe};
use std::time::Instant;

use clap::Parser;
use symphony_verify::vopr::{self, Scenario};

/// The whole service (real shard cores, simulated mesh, clients and executors with faults),
/// one seed at a time. Every seed prints its knobs when it fails, and replays exactly.
#[derive(Debug, Parser)]
#[command(name = "vopr")]
struct Args {
    /// How many seeds to run, from `--first`.
    #[arg(long, default_value_t = 100)]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Run this one seed, printing its knobs and its shards' log lines.
    #[arg(long)]
    seed: Option<u64>,
    /// Keep going past a failing seed (and count them).
    #[arg(long)]
    keep_going: bool,
}

/// One seed: its outcome, or why it failed (a check, or a panic in a shard's invariants).
fn run_one(seed: u64, verbose: bool) -> Result<vopr::Outcome, String> {
    let scenario = Scenario::sample(seed);
    match panic::catch_unwind(AssertUnwindSafe(|| vopr::run(&scenario, verbose))) {
        Ok(result) => result,
        Err(panic) => Err(format!(
            "a shard panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
    }
}

fn main() {
    let args = Args::parse();
    if let Some(seed) = args.seed {
        println!("{}", Scenario::sample(seed).describe());
        match run_one(seed, true) {
            Ok(outcome) => println!("seed {seed}: ok: {outcome:?}"),
            Err(e) => {
                println!("seed {seed}: FAILED: {e}");
                std::process::exit(1);
            }
        }
        return;
    }
    // Panics are reported with their seed; the default hook's message would repeat them.
    panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    let mut failed = 0u64;
    let (mut requests, mut simulated_ns) = (0u64, 0u64);
    println!(
        "vopr: seeds {}..{} ({} seeds); a failing seed replays with --seed N",
        args.first,
        args.first + args.seeds,
        args.seeds
    );
    let mut last_line = Instant::now();
    for seed in args.first..args.first + args.seeds {
        match run_one(seed, false) {
            Ok(outcome) => {
                requests += outcome.requests;
                simulated_ns += outcome.simulated_ns;
            }
            Err(e) => {
                failed += 1;
                println!("seed {seed}: FAILED: {e}");
                println!("{}", Scenario::sample(seed).describe());
                println!("replay: cargo run --release -p symphony-verify --bin vopr -- --seed {seed}");
                if !args.keep_going {
                    std::process::exit(1);
                }
            }
        }
        if last_line.elapsed().as_secs() >= 5 {
            last_line = Instant::now();
            println!(
                "vopr: {} of {} seeds, {failed} failed, {:.0} s",
                seed - args.first + 1,
                args.seeds,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "vopr: {} seeds, {failed} failed, {requests} simulated requests ({:.0} per second of wall time), {:.0} s simulated in {secs:.1} s",
        args.seeds,
        requests as f64 / secs.max(1e-9),
        simulated_ns as f64 / 1e9
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
