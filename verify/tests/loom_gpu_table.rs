//! Loom models of the shards' GPU table (`shards/src/sync/gpu_table.rs`): claim, release and
//! hand-off under every interleaving loom explores, with two and three threads.
//!
//! The table's source file is compiled here with its `super::atomic` facade mapped to loom's
//! atomics (the `atomic` module below), so the checked code is the shipped code. Each model
//! checks the two promises of the protocol: no GPU ever holds two overlapping plans, and no
//! waiting candidate is forgotten (once the threads are done, a posted waiter never sits
//! beside a free GPU nobody reserved for it). A third model takes a GPU offline while another
//! shard plans on it: no plan starts on it once `set_offline` has returned.

mod atomic {
    pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};

    pub(crate) fn spin_wait() {
        loom::thread::yield_now();
    }
}

#[allow(dead_code)]
#[path = "../../shards/src/sync/gpu_table.rs"]
mod gpu_table;

use gpu_table::GpuTable;
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
                thread::spawn(move || {
                    // Two rounds each: claim whenever the GPU frees in time, plan, release.
                    let mut planned = 0;
                    for exec_at_ns in [0, 100] {
                        if let Some(claim) = table.claim(shard, exec_at_ns, GrantPolicy::LowestIndex) {
                            let _ = plan_and_release(&table, &log, claim, exec_at_ns);
                            planned += 1;
                        }
                    }
                    planned
                })
            })
            .collect();
        let planned: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert!(planned >= 1, "someone got the free GPU");
        assert_no_overlap(&log);
    });
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
            thread::spawn(move || table.post_and_claim(1, 500))
        };
        let handed_to = releaser.join().unwrap();
        let claimed = waiter.join().unwrap();
        match claimed {
            Some(claim) => {
                assert_eq!(table.reservation_of(1), None);
                let _ = plan_and_release(&table, &log, claim, 0);
            }
            None => {
                assert_eq!(handed_to, Some(1), "the release must hand the GPU to the waiter");
                assert_eq!(table.reservation_of(1), Some(0));
                let claim = table.claim_reserved(1, 0).unwrap();
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
                thread::spawn(move || table.post_and_claim(shard, invalid_after_ns))
            })
            .collect();
        let _ = releaser.join().unwrap();
        let claims: Vec<_> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
        // One GPU: at most one waiter claimed it directly.
        assert!(claims.iter().filter(|c| c.is_some()).count() <= 1);
        let reserved: Vec<u16> = [1u16, 2]
            .into_iter()
            .filter(|&s| table.reservation_of(s).is_some())
            .collect();
        let direct = claims.iter().flatten().count();
        // Not forgotten: the GPU was claimed by a waiter or reserved for one.
        assert_eq!(
            direct + reserved.len(),
            1,
            "claims {claims:?}, reserved for {reserved:?}"
        );
        // Serve the rest in turn, as the shards would when told: every waiter gets the GPU.
        let mut served = Vec::new();
        for claim in claims.into_iter().flatten() {
            served.push(claim.gpu());
            let handed = plan_and_release(&table, &log, claim, 0);
            assert!(handed.is_some(), "the other waiter is still posted");
        }
        for _ in 0..2 {
            let Some(shard) = [1u16, 2].into_iter().find(|&s| table.reservation_of(s).is_some()) else {
                break;
            };
            let claim = table.claim_reserved(shard, 0).unwrap();
            served.push(claim.gpu());
            let _ = plan_and_release(&table, &log, claim, 0);
        }
        assert_eq!(served.len(), 2, "both waiters were served");
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
