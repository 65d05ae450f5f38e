//! A shard's `TableView` (the look at the GPU table that rescans only after a change) agrees
//! with a full scan after any sequence of table operations by any shard, one at a time. (The
//! concurrent side, a view racing a release, is the loom models' `loom_gpu_table.rs`.)

use proptest::prelude::*;
use symphony_core::policy::GrantPolicy;
use symphony_shards::sync::gpu_table::{Claim, GpuTable, TableView};

const GPUS: u32 = 3;
const SHARDS: u16 = 2;

#[derive(Debug, Clone)]
enum Op {
    Claim {
        shard: u16,
        exec_at_ns: u64,
        policy: GrantPolicy,
    },
    Release {
        nth: usize,
        run_ns: u64,
    },
    Cancel {
        nth: usize,
    },
    Post {
        shard: u16,
        invalid_after_ns: u64,
    },
    Clear {
        shard: u16,
    },
    Decline {
        shard: u16,
    },
    Offline {
        gpu: u32,
    },
    Online {
        gpu: u32,
        free_at_ns: u64,
    },
    Look {
        shard: u16,
    },
}

fn op() -> impl Strategy<Value = Op> {
    let shard = 0..SHARDS;
    let policy = prop_oneof![
        Just(GrantPolicy::LowestIndex),
        Just(GrantPolicy::EarliestFree),
        Just(GrantPolicy::BestFit)
    ];
    prop_oneof![
        3 => (shard.clone(), 0..2_000u64, policy).prop_map(|(shard, exec_at_ns, policy)| Op::Claim { shard, exec_at_ns, policy }),
        3 => (0..4usize, 0..500u64).prop_map(|(nth, run_ns)| Op::Release { nth, run_ns }),
        1 => (0..4usize).prop_map(|nth| Op::Cancel { nth }),
        2 => (shard.clone(), 0..1_000u64).prop_map(|(shard, invalid_after_ns)| Op::Post { shard, invalid_after_ns }),
        1 => shard.clone().prop_map(|shard| Op::Clear { shard }),
        1 => shard.clone().prop_map(|shard| Op::Decline { shard }),
        1 => (0..GPUS).prop_map(|gpu| Op::Offline { gpu }),
        1 => (0..GPUS, 0..2_000u64).prop_map(|(gpu, free_at_ns)| Op::Online { gpu, free_at_ns }),
        3 => shard.prop_map(|shard| Op::Look { shard }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4000))]
    #[test]
    fn a_view_agrees_with_a_scan_after_every_operation(ops in prop::collection::vec(op(), 1..60)) {
        let table = GpuTable::new(GPUS as usize, SHARDS as usize);
        let views: Vec<TableView> = (0..SHARDS).map(|_| TableView::default()).collect();
        let mut held: Vec<Claim> = Vec::new();
        for op in ops {
            match op {
                Op::Claim { shard, exec_at_ns, policy } => {
                    held.extend(table.claim(shard, exec_at_ns, policy));
                }
                Op::Release { nth, run_ns } if !held.is_empty() => {
                    let claim = held.swap_remove(nth % held.len());
                    let finish_ns = claim.free_at_ns() + run_ns;
                    let _ = table.release(claim, finish_ns);
                }
                Op::Cancel { nth } if !held.is_empty() => {
                    let _ = table.cancel(held.swap_remove(nth % held.len()));
                }
                Op::Post { shard, invalid_after_ns } => table.post_waiter(shard, invalid_after_ns),
                Op::Clear { shard } => table.clear_waiter(shard),
                Op::Decline { shard } => {
                    if let Some(gpu) = table.reservation_of(shard) {
                        let _ = table.decline(shard, gpu);
                    }
                }
                // A claimed GPU goes offline only after its claimer's event (the table spins).
                Op::Offline { gpu } if held.iter().all(|claim| claim.gpu() != gpu) => {
                    table.set_offline(gpu);
                }
                Op::Online { gpu, free_at_ns } => {
                    let _ = table.set_online(gpu, free_at_ns);
                }
                Op::Look { shard } => {
                    views[shard as usize].min_free_at_ns(&table, shard);
                }
                _ => {}
            }
            // Claims and reservations close a GPU to the other shards without telling their
            // views (documented: a claim then finds it taken); every other change is seen.
            if held.is_empty() && (0..SHARDS).all(|shard| table.reservation_of(shard).is_none()) {
                for shard in 0..SHARDS {
                    prop_assert_eq!(
                        views[shard as usize].min_free_at_ns(&table, shard),
                        table.min_free_at_ns(shard),
                        "shard {}'s view", shard
                    );
                }
            }
        }
        for claim in held {
            let _ = table.cancel(claim);
        }
    }
}
