//! What deferral buys, as a user sees it: at moderate load the default policy packs work onto
//! low-index GPUs and spends far fewer GPU-seconds than eager dispatch, and at the edge of
//! capacity it still serves at least as much as eager dispatch and the reference
//! configuration.

use std::path::Path;

use symphony_core::policy::PolicyKind;
use symphony_core::sim::{simulate, SimConfig};
use symphony_core::sweep::{find_goodput_scale, BAD_RATE_BOUND_PERCENT};
use symphony_core::workload::Workload;

fn workload(name: &str) -> Workload {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workloads").join(name);
    Workload::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn moderate_load_uses_fewer_gpus_and_gpu_seconds() {
    // 8 models at 3000 req/s in all on 8 GPUs: about 45 % of what the GPUs can do.
    let w = workload("resnet-8m-poisson.yaml");
    let run = |policy| {
        let config = SimConfig {
            rate_scale: 0.75,
            ..SimConfig::of(&w, policy)
        };
        simulate(&w, &config).summary
    };
    let ours = run(PolicyKind::Symphony);
    let eager = run(PolicyKind::Eager);
    assert!(ours.bad_rate <= 1.0 && eager.bad_rate <= 1.0);
    assert!(
        ours.gpu_busy_s < 0.6 * eager.gpu_busy_s,
        "GPU-seconds: symphony {:.2}, eager {:.2}",
        ours.gpu_busy_s,
        eager.gpu_busy_s
    );
    let last = |fractions: &[f64]| *fractions.last().unwrap();
    assert!(
        last(&ours.gpu_busy_fraction) < 0.05,
        "symphony's last GPU: {:?}",
        ours.gpu_busy_fraction
    );
    assert!(
        last(&eager.gpu_busy_fraction) > 0.5,
        "eager spreads: {:?}",
        eager.gpu_busy_fraction
    );
    // Lowest index first: busy fractions fall with the GPU index.
    assert!(ours.gpu_busy_fraction[0] > ours.gpu_busy_fraction[5]);
}

#[test]
fn goodput_at_least_matches_eager_and_the_reference() {
    for name in ["resnet-8m-poisson.yaml", "resnet-32m-gamma0.1.yaml"] {
        let w = workload(name);
        let goodput = |policy| {
            find_goodput_scale(1.0, BAD_RATE_BOUND_PERCENT, |scale| {
                let config = SimConfig {
                    rate_scale: scale,
                    ..SimConfig::of(&w, policy)
                };
                simulate(&w, &config).summary.bad_rate
            })
        };
        let ours = goodput(PolicyKind::Symphony);
        for peer in [PolicyKind::Eager, PolicyKind::SymphonyRef] {
            let theirs = goodput(peer);
            assert!(
                ours >= theirs,
                "{name}: symphony {ours:.3} < {peer} {theirs:.3} (rate scale)"
            );
        }
    }
}
