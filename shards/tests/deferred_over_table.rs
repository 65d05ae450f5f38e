//! The core's deferred scheduler planning on the shared GPU table gives, with one shard, the
//! very plans it gives on its own single-threaded pool: the shard runs the simulated code.

use std::path::Path;
use std::sync::Arc;

use symphony_core::policy::deferred::{Config, Deferred};
use symphony_core::policy::{Knobs, PolicyKind};
use symphony_core::sim::{model_configs, simulate, simulate_policy, SimConfig};
use symphony_core::workload::Workload;
use symphony_shards::shared_gpus::SharedGpus;
use symphony_shards::sync::gpu_table::GpuTable;

#[test]
fn one_shard_on_the_table_plans_exactly_as_on_the_pool() {
    for (name, rate_scale) in [
        ("resnet-8m-poisson.yaml", 0.75),
        ("resnet-8m-poisson.yaml", 1.6),
        ("resnet-32m-gamma0.1.yaml", 1.2),
        ("azure-conv-4m.yaml", 1.0),
    ] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../workloads").join(name);
        let workload = Workload::load(&path).unwrap();
        for kind in [PolicyKind::Symphony, PolicyKind::SymphonyRef, PolicyKind::Eager] {
            let config = SimConfig {
                rate_scale,
                ..SimConfig::of(&workload, kind)
            };
            let on_pool = simulate(&workload, &config);
            let table = Arc::new(GpuTable::new(workload.gpu_count as usize, 1));
            let knobs = Knobs::default();
            let mut on_table = Deferred::with_source(
                Config::of(kind, &knobs),
                &model_configs(&workload),
                SharedGpus::new(table, 0),
                &knobs,
            );
            let report = simulate_policy(&workload, &config, &mut on_table);
            assert_eq!(report.summary, on_pool.summary, "{name} x{rate_scale} {kind}");
            assert_eq!(report.plans.len(), on_pool.plans.len());
            for (a, b) in report.plans.iter().zip(&on_pool.plans) {
                assert_eq!(
                    (a.gpu, a.model, a.batch_size, a.exec_at_ns, a.finish_at_ns),
                    (b.gpu, b.model, b.batch_size, b.exec_at_ns, b.finish_at_ns),
                    "{name} x{rate_scale} {kind}: plan {}",
                    a.plan_id
                );
            }
        }
    }
}
