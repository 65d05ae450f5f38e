//! Loom models of the shards' GPU table (`shards/src/sync/gpu_table.rs`) on the path the
//! service takes: a shard posts its waiting candidate (`post_waiter`), looks at the GPUs
//! (`min_free_at_ns` through its `TableView`, which rescans only after a change) and claims by
//! its grant policy through the view (`TableView::claim`: pick from the view, claim, and
//! look again if the GPU was taken); a release
//! reserves the GPU it frees for the earliest waiter and tells that shard, which claims it or
//! declines it on to the next (`decline`), under every interleaving loom explores, with two
//! and three threads.
//!
//! The table's source file is compiled here with its `super::atomic` facade mapped to loom's
//! atomics (the `atomic` module below), so the checked code is the shipped code. Each model
//! checks the two promises of the protocol: no GPU ever holds two overlapping plans, and no
//! waiting candidate is forgotten (once the threads are done and the shards told of their
//! hand-offs have acted, every waiter was served). Another model takes a GPU offline while a
//! shard plans on it: no plan starts on it once `set_offline` has returned. (Bringing an
//! executor's GPUs online racing its loss is `loom_lifecycle.rs`.)

mod atomic {
    pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};

    pub(crate) fn spin_wait() {
        loom::thread::yield_now();
    }
}

#[allow(dead_code)]
#[path = "../../shards/src/sync/gpu_table.rs"]
mod gpu_table;

use gpu_table::{GpuTable, TableView};
use loom::sync::{Arc, Mutex};
use loom::thread;
use symphony_core::policy::GrantPolicy;

/// Plans as they were made: (gpu, start, end).
type Log = Arc<Mutex<Vec<(u32, u64, u64)>>>;

const EXEC_NS: u64 = 10;

/// Bounded preemptions keep the models inside CI's time while covering the races that
/// matter (each protocol step is one or two atomic operations).
fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

/// Plans one batch on `claim`'s GPU and releases it; returns the shard handed the GPU.
fn plan_and_release(table: &GpuTable, log: &Log, claim: gpu_table::Claim, exec_at_ns: u64) -> Option<u16> {
    let start = exec_at_ns.max(claim.free_at_ns());
    log.lock().unwrap().push((claim.gpu(), start, start + EXEC_NS));
    table.release(claim, start + EXEC_NS)
}

/// A shard's view after a look at the GPUs (the look that found none in time, before it
/// posts): its next look rescans only if the table changed since.
fn looked(table: &GpuTable, shard: u16) -> TableView {
    let view = TableView::default();
    view.min_free_at_ns(table, shard);
    view
}

/// A shard's rounds: at each `exec_at`, a claim by `policy` when a GPU frees in time, its
/// plan and its release. Returns how many it planned.
fn claim_rounds(table: &GpuTable, log: &Log, shard: u16, exec_ats: [u64; 2], policy: GrantPolicy) -> u32 {
    let mut planned = 0;
    for exec_at_ns in exec_ats {
        if let Some(claim) = table.claim(shard, exec_at_ns, policy) {
            let _ = plan_and_release(table, log, claim, exec_at_ns);
            planned += 1;
        }
    }
    planned
}

/// What a shard with a waiting candidate does (`Deferred` over `SharedGpus`): post it, then
/// at its next look (through `view`) take the earliest `free_at` it may claim and claim from
/// there by its grant policy; with a GPU it withdraws the post. Returns the claim and the
/// shard's view.
fn post_then_claim(
    table: &GpuTable,
    shard: u16,
    invalid_after_ns: u64,
    policy: GrantPolicy,
    view: TableView,
) -> (Option<gpu_table::Claim>, TableView) {
    table.post_waiter(shard, invalid_after_ns);
    (claim_as_told(table, shard, &view, policy), view)
}

/// A shard's claim after a hand-off message (or its own timer): from the earliest `free_at`
/// it may claim (free GPUs, and those reserved for it), as its view shows it, picked by the
/// view.
fn claim_as_told(table: &GpuTable, shard: u16, view: &TableView, policy: GrantPolicy) -> Option<gpu_table::Claim> {
    let free_at_ns = view.min_free_at_ns(table, shard);
    if free_at_ns == u64::MAX {
        return None;
    }
    let claim = view.claim(table, shard, free_at_ns, policy)?;
    table.clear_waiter(shard);
    Some(claim)
}

/// A shard that no longer waits and was told of a hand-off gives back what is reserved for
/// it (`SharedGpus::decline_unwanted`); returns the shards the GPUs went on to.
fn decline_all(table: &GpuTable, shard: u16) -> Vec<u16> {
    let mut told = Vec::new();
    while let Some(gpu) = table.reservation_of(shard) {
        match table.decline(shard, gpu) {
            Some(next) => told.push(next),
            None => break,
        }
    }
    told
}

fn assert_no_overlap(log: &Log) {
    let mut plans = log.lock().unwrap().clone();
    plans.sort_unstable();
    for pair in plans.windows(2) {
        let ((gpu_a, _, end_a), (gpu_b, start_b, _)) = (pair[0], pair[1]);
        assert!(
            gpu_a != gpu_b || end_a <= start_b,
            "overlapping plans on GPU {gpu_a}: {plans:?}"
        );
    }
}

#[test]
fn concurrent_claims_never_overlap() {
    model(|| {
        let table = Arc::new(GpuTable::new(1, 2));
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let threads: Vec<_> = (0..2u16)
            .map(|shard| {
                let (table, log) = (table.clone(), log.clone());
                thread::spawn(move || claim_rounds(&table, &log, shard, [0, 100], GrantPolicy::LowestIndex))
            })
            .collect();
        let planned: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(planned >= 1, "someone got the free GPU");
        assert_no_overlap(&log);
    });
}

#[test]
fn pick_then_claim_over_two_gpus_never_overlaps() {
    for policy in [GrantPolicy::EarliestFree, GrantPolicy::BestFit] {
        model(move || {
            let table = Arc::new(GpuTable::new(2, 2));
            let log: Log = Arc::new(Mutex::new(Vec::new()));
            let threads: Vec<_> = (0..2u16)
                .map(|shard| {
                    let (table, log) = (table.clone(), log.clone());
                    thread::spawn(move || claim_rounds(&table, &log, shard, [0, 20], policy))
                })
                .collect();
            let planned: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
            // Two GPUs free at 0: each shard's first claim finds one.
            assert!(planned >= 2, "{policy}: {planned} plans");
            assert_no_overlap(&log);
        });
    }
}

#[test]
fn a_waiter_is_never_forgotten_by_a_release() {
    model(|| {
        let table = Arc::new(GpuTable::new(1, 2));
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let held = table.claim(0, 0, GrantPolicy::LowestIndex).unwrap();
        let releaser = {
            let (table, log) = (table.clone(), log.clone());
            thread::spawn(move || plan_and_release(&table, &log, held, 0))
        };
        let waiter = {
            let table = table.clone();
            thread::spawn(move || {
                let view = looked(&table, 1);
                post_then_claim(&table, 1, 500, GrantPolicy::EarliestFree, view)
            })
        };
        let handed_to = releaser.join().unwrap();
        let (claim, view) = waiter.join().unwrap();
        match claim {
            Some(claim) => {
                assert_eq!(table.reservation_of(1), None);
                let _ = plan_and_release(&table, &log, claim, 0);
            }
            None => {
                // The waiter's look came too early: the release saw its post.
                assert_eq!(handed_to, Some(1), "the release must hand the GPU to the waiter");
                assert_eq!(table.reservation_of(1), Some(0));
                let claim = claim_as_told(&table, 1, &view, GrantPolicy::EarliestFree).expect("told, it claims");
                let _ = plan_and_release(&table, &log, claim, 0);
            }
        }
        assert_no_overlap(&log);
    });
}

#[test]
fn hand_off_serves_waiters_and_forgets_none_with_three_threads() {
    model(|| {
        let table = Arc::new(GpuTable::new(1, 3));
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let held = table.claim(0, 0, GrantPolicy::LowestIndex).unwrap();
        let releaser = {
            let (table, log) = (table.clone(), log.clone());
            thread::spawn(move || plan_and_release(&table, &log, held, 0))
        };
        let waiters: Vec<_> = [(1u16, 200u64), (2, 100)]
            .into_iter()
            .map(|(shard, invalid_after_ns)| {
                let table = table.clone();
                thread::spawn(move || {
                    // One waiter looked before it posted, one did not (a stale view in
                    // both threads takes too long to explore for the test run).
                    let view = if shard == 1 {
                        looked(&table, shard)
                    } else {
                        TableView::default()
                    };
                    post_then_claim(&table, shard, invalid_after_ns, GrantPolicy::LowestIndex, view)
                })
            })
            .collect();
        let mut told: Vec<u16> = releaser.join().unwrap().into_iter().collect();
        let (claims, views): (Vec<_>, Vec<_>) = waiters.into_iter().map(|w| w.join().unwrap()).unzip();
        // One GPU: at most one waiter claimed it directly.
        assert!(claims.iter().filter(|c| c.is_some()).count() <= 1);
        let mut served: Vec<u16> = Vec::new();
        for (shard, claim) in [1u16, 2].into_iter().zip(claims) {
            if let Some(claim) = claim {
                served.push(shard);
                told.extend(plan_and_release(&table, &log, claim, 0));
            }
        }
        // The shards told of hand-offs act, in turn: every waiter gets the GPU.
        while let Some(shard) = told.pop() {
            if served.contains(&shard) {
                told.extend(decline_all(&table, shard));
                continue;
            }
            let view = &views[shard as usize - 1];
            let claim = claim_as_told(&table, shard, view, GrantPolicy::LowestIndex).expect("told, it claims");
            served.push(shard);
            told.extend(plan_and_release(&table, &log, claim, 0));
        }
        served.sort_unstable();
        assert_eq!(served, vec![1, 2], "both waiters were served");
        assert_no_overlap(&log);
    });
}

#[test]
fn a_declined_reservation_goes_on_to_the_next_waiter() {
    model(|| {
        let table = Arc::new(GpuTable::new(1, 3));
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        let held = table.claim(0, 0, GrantPolicy::LowestIndex).unwrap();
        table.post_waiter(1, 100);
        table.post_waiter(2, 200);
        let releaser = {
            let (table, log) = (table.clone(), log.clone());
            thread::spawn(move || plan_and_release(&table, &log, held, 0))
        };
        // Shard 1's candidate goes (its requests were dropped): it withdraws its post and
        // gives back anything already reserved for it.
        let changes_its_mind = {
            let table = table.clone();
            thread::spawn(move || {
                table.clear_waiter(1);
                decline_all(&table, 1)
            })
        };
        let mut told: Vec<u16> = releaser.join().unwrap().into_iter().collect();
        told.extend(changes_its_mind.join().unwrap());
        let mut served = None;
        while let Some(shard) = told.pop() {
            if shard == 1 {
                // Not waiting any more: told of a hand-off, it declines it.
                told.extend(decline_all(&table, 1));
                continue;
            }
            let claim =
                claim_as_told(&table, shard, &TableView::default(), GrantPolicy::LowestIndex).expect("told, it claims");
            served = Some(shard);
            let _ = plan_and_release(&table, &log, claim, 0);
        }
        assert_eq!(served, Some(2), "the GPU went on to the next waiter");
        assert_eq!(table.reservation_of(1), None);
        assert_no_overlap(&log);
    });
}

#[test]
fn an_offline_gpu_gets_no_new_plan() {
    model(|| {
        let table = Arc::new(GpuTable::new(1, 2));
        let log: Log = Arc::new(Mutex::new(Vec::new()));
        // Set once the offline shard's `set_offline` returned; plans made after it are bugs.
        let offline_done = Arc::new(loom::sync::atomic::AtomicBool::new(false));
        let planner = {
            let (table, log, offline_done) = (table.clone(), log.clone(), offline_done.clone());
            thread::spawn(move || {
                for exec_at_ns in [0, 100] {
                    if let Some(claim) = table.claim(0, exec_at_ns, GrantPolicy::LowestIndex) {
                        assert!(
                            !offline_done.load(loom::sync::atomic::Ordering::SeqCst),
                            "a claim succeeded on an offline GPU"
                        );
                        let _ = plan_and_release(&table, &log, claim, exec_at_ns);
                    }
                }
            })
        };
        assert!(table.set_offline(0));
        offline_done.store(true, loom::sync::atomic::Ordering::SeqCst);
        assert_eq!(table.online_count(), 0);
        assert_eq!(table.min_free_at_ns(1), u64::MAX);
        planner.join().unwrap();
        assert!(!table.is_online(0));
        assert!(!table.set_offline(0), "offline once");
        // Back online: claimable again.
        let _ = table.set_online(0, 500);
        assert!(table.claim(1, 500, GrantPolicy::LowestIndex).is_some());
        assert_no_overlap(&log);
    });
}
