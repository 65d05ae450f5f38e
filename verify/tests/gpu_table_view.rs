//! A shard's `TableView` (its tree of the open GPUs' `free_at`, rebuilt only after another
//! shard's change) agrees with a full scan after any sequence of table operations by any
//! shard, one at a time: the same earliest `free_at`, and the same GPU for every claim, over
//! all GPUs and within a speed class. (The concurrent side, a view racing a release, is the
//! loom models' `loom_gpu_table.rs`.)

use proptest::prelude::*;
use symphony_core::policy::GrantPolicy;
use symphony_shards::sync::gpu_table::{Claim, GpuTable, TableView};

const GPUS: u32 = 3;
const SHARDS: u16 = 2;
/// Speed classes the GPUs are sorted into (a case may use fewer).
const CLASSES: usize = 2;

#[derive(Debug, Clone)]
enum Op {
    Claim {
        shard: u16,
        exec_at_ns: u64,
        policy: GrantPolicy,
    },
    ClaimIn {
        shard: u16,
        class: usize,
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
        3 => (shard.clone(), 0..2_000u64, policy.clone()).prop_map(|(shard, exec_at_ns, policy)| Op::Claim { shard, exec_at_ns, policy }),
        2 => (shard.clone(), 0..CLASSES, 0..2_000u64, policy).prop_map(|(shard, class, exec_at_ns, policy)| Op::ClaimIn { shard, class, exec_at_ns, policy }),
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
    /// Two tables take the same operations: on `viewed` every claim, release and cancel of a
    /// shard goes through its view (the tree of minimums), on `scanned` straight to the table
    /// (a scan of every GPU). They stay the same table only if each view claims the GPU the
    /// scan would, and a view's earliest `free_at` is the scan's whenever nothing is claimed
    /// or reserved.
    #[test]
    fn a_view_agrees_with_a_scan_after_every_operation(
        ops in prop::collection::vec(op(), 1..60),
        class_of in prop::collection::vec(0..CLASSES as u8, GPUS as usize),
        classed in any::<bool>(),
    ) {
        let viewed = GpuTable::new(GPUS as usize, SHARDS as usize);
        let scanned = GpuTable::new(GPUS as usize, SHARDS as usize);
        let class_of = if classed { class_of } else { vec![0; GPUS as usize] };
        let views: Vec<TableView> = (0..SHARDS)
            .map(|_| {
                let mut view = TableView::default();
                if classed {
                    view.set_classes(class_of.clone(), CLASSES);
                }
                view
            })
            .collect();
        // (claiming shard, its claim on `viewed`, the same on `scanned`)
        let mut held: Vec<(u16, Claim, Claim)> = Vec::new();
        for op in ops {
            match op {
                Op::Claim { shard, exec_at_ns, policy } => {
                    let by_view = views[shard as usize].claim(&viewed, shard, exec_at_ns, policy);
                    let by_scan = scanned.claim(shard, exec_at_ns, policy);
                    prop_assert_eq!(by_view.as_ref().map(Claim::gpu), by_scan.as_ref().map(Claim::gpu), "shard {}'s claim", shard);
                    if let (Some(a), Some(b)) = (by_view, by_scan) {
                        held.push((shard, a, b));
                    }
                }
                Op::ClaimIn { shard, class, exec_at_ns, policy } => {
                    let by_view = views[shard as usize].claim_in(&viewed, shard, class, exec_at_ns, policy);
                    let by_scan = scanned.claim_among(shard, exec_at_ns, policy, |gpu| class_of[gpu as usize] as usize == class);
                    prop_assert_eq!(by_view.as_ref().map(Claim::gpu), by_scan.as_ref().map(Claim::gpu), "shard {}'s claim in class {}", shard, class);
                    if let (Some(a), Some(b)) = (by_view, by_scan) {
                        held.push((shard, a, b));
                    }
                }
                Op::Release { nth, run_ns } if !held.is_empty() => {
                    let (shard, a, b) = held.swap_remove(nth % held.len());
                    let finish_ns = a.free_at_ns() + run_ns;
                    let to_a = views[shard as usize].release(&viewed, shard, a, finish_ns);
                    prop_assert_eq!(to_a, scanned.release(b, finish_ns));
                }
                Op::Cancel { nth } if !held.is_empty() => {
                    let (shard, a, b) = held.swap_remove(nth % held.len());
                    prop_assert_eq!(views[shard as usize].cancel(&viewed, shard, a), scanned.cancel(b));
                }
                Op::Post { shard, invalid_after_ns } => {
                    viewed.post_waiter(shard, invalid_after_ns);
                    scanned.post_waiter(shard, invalid_after_ns);
                }
                Op::Clear { shard } => {
                    viewed.clear_waiter(shard);
                    scanned.clear_waiter(shard);
                }
                Op::Decline { shard } => {
                    prop_assert_eq!(viewed.reservation_of(shard), scanned.reservation_of(shard));
                    if let Some(gpu) = viewed.reservation_of(shard) {
                        prop_assert_eq!(viewed.decline(shard, gpu), scanned.decline(shard, gpu));
                    }
                }
                // A claimed GPU goes offline only after its claimer's event (the table spins).
                Op::Offline { gpu } if held.iter().all(|(_, claim, _)| claim.gpu() != gpu) => {
                    prop_assert_eq!(viewed.set_offline(gpu), scanned.set_offline(gpu));
                }
                Op::Online { gpu, free_at_ns } => {
                    prop_assert_eq!(viewed.set_online(gpu, free_at_ns), scanned.set_online(gpu, free_at_ns));
                }
                Op::Look { shard } => {
                    views[shard as usize].min_free_at_ns(&viewed, shard);
                }
                _ => {}
            }
            // Claims and reservations close a GPU to the other shards without telling their
            // views (documented: a claim then finds it taken); every other change is seen.
            if held.is_empty() && (0..SHARDS).all(|shard| viewed.reservation_of(shard).is_none()) {
                for shard in 0..SHARDS {
                    let view = &views[shard as usize];
                    prop_assert_eq!(
                        view.min_free_at_ns(&viewed, shard),
                        scanned.min_free_at_ns(shard),
                        "shard {}'s view", shard
                    );
                    // Nothing held or reserved: every online GPU is open.
                    for class in 0..CLASSES {
                        let in_class = (0..GPUS).filter(|&g| class_of[g as usize] as usize == class);
                        let online: Vec<u32> = in_class.filter(|&g| scanned.is_online(g)).collect();
                        let min = online.iter().map(|&g| scanned.free_at_ns(g)).min().unwrap_or(u64::MAX);
                        prop_assert_eq!(view.min_free_at_in(&viewed, shard, class), min, "shard {}'s class {}", shard, class);
                        prop_assert_eq!(view.online_in(&viewed, shard, class), online.len() as u32);
                    }
                }
            }
        }
        for (_, a, b) in held {
            let _ = viewed.cancel(a);
            let _ = scanned.cancel(b);
        }
    }
}

/// With no GPU open to the shard (it holds every one), its view answers as the table does:
/// the earliest `free_at` of any online GPU, and no GPU online at all is `u64::MAX`.
#[test]
fn a_view_with_no_gpu_open_answers_with_the_online_ones() {
    let table = GpuTable::new(2, 1);
    let view = TableView::default();
    let a = view
        .claim(&table, 0, 0, GrantPolicy::LowestIndex)
        .expect("GPU 0 is free");
    let _ = view.release(&table, 0, a, 700);
    let a = view
        .claim(&table, 0, 700, GrantPolicy::LowestIndex)
        .expect("GPU 0 frees at 700");
    let b = view
        .claim(&table, 0, 700, GrantPolicy::LowestIndex)
        .expect("GPU 1 is free");
    assert_eq!((a.gpu(), b.gpu()), (0, 1));
    assert_eq!(view.min_free_at_ns(&table, 0), table.min_free_at_ns(0));
    assert_eq!(view.min_free_at_ns(&table, 0), 0, "GPU 1's free_at, held or not");
    let _ = view.cancel(&table, 0, a);
    let _ = view.cancel(&table, 0, b);
    assert!(table.set_offline(0) && table.set_offline(1));
    assert_eq!(view.min_free_at_ns(&table, 0), u64::MAX);
}
