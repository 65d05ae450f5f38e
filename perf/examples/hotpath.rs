//! The shard's CPU per request at the front door's load, in virtual time (no sockets): 1,000
//! models on 1,024 embedded GPUs, requests by name, a given rate and frames per read. For
//! comparing two builds of the hot path on a noisy host: the work is the same on every run,
//! so run it under `perf stat -e instructions,cycles` or compare the printed ns per request.
//!
//!     cargo run --release -p symphony-perf --example hotpath -- [RATE] [SECONDS] [FRAMES_PER_READ]

use symphony_core::policy::PolicyKind;
use symphony_core::profile::Profile;
use symphony_core::wire::ModelRef;
use symphony_perf::stress;
use symphony_perf::virtual_door::VirtualDoor;
use symphony_shards::config::Limits;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: f64| args.get(i).map_or(default, |a| a.parse().expect("a number"));
    let rate = arg(0, 1_000_000.0);
    let seconds = arg(1, 3.0);
    let turn = arg(2, 64.0) as usize;
    let slo_ns = 100_000_000;
    let profile = Profile::parse_linear("sleep#400,2000,0,0", slo_ns).expect("a valid profile");
    let models = stress::uniform_models(1000, &profile, slo_ns);
    let payloads: Vec<Vec<u8>> = models
        .iter()
        .map(|m| stress::request_payload(7, &ModelRef::Name(m.name.clone())))
        .collect();
    let cores = stress::embedded_cores(&models, 1024, 1, PolicyKind::Symphony, Limits::default());
    let mut door = VirtualDoor::new(cores);
    let spacing_ns = (1e9 / rate) as u64;
    let warmup = rate as u64;
    let count = (rate * seconds) as u64;
    println!("hotpath: {rate} req/s by name over 1000 models, 1024 GPUs, {turn} frames a read; 1 s warm-up, {seconds} s timed");
    let _ = door.serve(warmup, spacing_ns, turn, &payloads);
    let (plans_before, planned_before) = door.plans();
    let took = door.serve(count, spacing_ns, turn, &payloads);
    let (plans, planned) = door.plans();
    let (plans, planned) = (plans - plans_before, planned - planned_before);
    println!(
        "{plans} plans, {:.1} requests a plan",
        planned as f64 / plans.max(1) as f64
    );
    println!(
        "{count} requests in {:.3} s: {:.1} ns a request",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e9 / count as f64
    );
}
