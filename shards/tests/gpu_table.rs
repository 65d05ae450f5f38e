//! The GPU table's single-threaded behaviour; the concurrent protocol is checked by the loom
//! models in `verify/tests/loom_gpu_table.rs`.

use symphony_core::policy::GrantPolicy;
use symphony_shards::sync::gpu_table::GpuTable;

#[test]
fn lowest_index_claims_in_order_and_respects_free_at() {
    let table = GpuTable::new(3, 2);
    let a = table.claim(0, 100, GrantPolicy::LowestIndex).unwrap();
    let b = table.claim(1, 100, GrantPolicy::LowestIndex).unwrap();
    assert_eq!((a.gpu(), b.gpu()), (0, 1));
    assert_eq!(table.release(a, 500), None);
    // GPU 0 frees at 500: a batch at 200 takes GPU 2, one at 600 takes GPU 0.
    let c = table.claim(0, 200, GrantPolicy::LowestIndex).unwrap();
    assert_eq!(c.gpu(), 2);
    let d = table.claim(0, 600, GrantPolicy::LowestIndex).unwrap();
    assert_eq!((d.gpu(), d.free_at_ns()), (0, 500));
    assert!(
        table.claim(1, 10_000, GrantPolicy::LowestIndex).is_none(),
        "all claimed"
    );
    let _ = (table.cancel(b), table.cancel(c), table.cancel(d));
}

#[test]
fn earliest_free_and_best_fit_pick_by_free_at() {
    let table = GpuTable::new(3, 1);
    for (gpu, finish) in [(0, 300), (1, 100), (2, 200)] {
        let claim = table.try_claim(0, gpu, 0).unwrap();
        let _ = table.release(claim, finish);
    }
    let e = table.claim(0, 250, GrantPolicy::EarliestFree).unwrap();
    assert_eq!(e.gpu(), 1);
    let f = table.claim(0, 250, GrantPolicy::BestFit).unwrap();
    assert_eq!(f.gpu(), 2);
    let _ = (table.cancel(e), table.cancel(f));
}

#[test]
fn release_hands_off_to_the_earliest_invalid_after() {
    let table = GpuTable::new(1, 3);
    let held = table.claim(0, 0, GrantPolicy::LowestIndex).unwrap();
    table.post_waiter(1, 900);
    table.post_waiter(2, 400);
    assert_eq!(table.release(held, 300), Some(2));
    assert!(
        table.claim(1, 1_000, GrantPolicy::LowestIndex).is_none(),
        "reserved for 2"
    );
    assert_eq!(table.reservation_of(2), Some(0));
    // Shard 2 declines: the GPU goes on to shard 1, which claims it when told.
    table.clear_waiter(2);
    assert_eq!(table.decline(2, 0), Some(1));
    assert_eq!(table.min_free_at_ns(1), 300);
    let claim = table.claim(1, 300, GrantPolicy::LowestIndex).unwrap();
    table.clear_waiter(1);
    assert_eq!(claim.free_at_ns(), 300);
    assert_eq!(table.release(claim, 350), None);
}

/// A plan that ends before the GPU's previous one is a planner bug: the table's assert
/// (on in release) stops it, and says which GPU and times.
#[test]
fn overlapping_release_is_a_bug() {
    let table = GpuTable::new(1, 1);
    let claim = table.try_claim(0, 0, 0).unwrap();
    assert_eq!(table.release(claim, 100), None);
    assert_eq!(table.free_at_ns(0), 100);
    let claim = table.try_claim(0, 0, 100).unwrap();
    let panic = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| table.release(claim, 50)))
        .expect_err("a release before the previous plan's end panics");
    let message = panic.downcast_ref::<String>().cloned().unwrap_or_default();
    assert_eq!(message, "a plan on GPU 0 ends at 50, before the previous one (100)");
}

#[test]
fn a_waiter_plans_from_the_earliest_free_at() {
    let table = GpuTable::new(2, 2);
    for gpu in 0..2 {
        let claim = table.try_claim(0, gpu, 0).unwrap();
        let _ = table.release(claim, 1_000 * u64::from(gpu + 1));
    }
    // Nothing frees by 10, so a claim for 10 fails; the waiter posts, and its next look
    // plans from the earliest free_at, which its claim then takes.
    assert!(table.claim(1, 10, GrantPolicy::LowestIndex).is_none());
    table.post_waiter(1, 5_000);
    assert_eq!(table.min_free_at_ns(1), 1_000);
    let claim = table.claim(1, 1_000, GrantPolicy::EarliestFree).unwrap();
    assert_eq!((claim.gpu(), claim.free_at_ns()), (0, 1_000));
    table.clear_waiter(1);
    assert_eq!(table.cancel(claim), None, "no waiter left to hand it to");
}

#[test]
fn a_lost_executor_never_comes_online() {
    use symphony_shards::sync::lifecycle::Lifecycle;
    let table = GpuTable::with_offline(0, 2, 1);
    let life = Lifecycle::new();
    assert!(life.bring_online(&table, &[0, 1], 5).0);
    assert_eq!(table.online_count(), 2);
    assert!(life.lose(&table, &[0, 1]));
    assert!(!life.lose(&table, &[0, 1]), "once");
    assert_eq!(table.online_count(), 0);
    assert!(!life.bring_online(&table, &[0, 1], 6).0);
    assert!(!life.bring_slot_online(&table, 0, 7).0);
    assert_eq!(table.online_count(), 0);
}
