//! Loom models of an executor's lifecycle against the GPU table
//! (`shards/src/sync/lifecycle.rs` over `shards/src/sync/gpu_table.rs`): a join bringing an
//! executor's GPUs online races a loss taking them offline, on two shards. Under every
//! interleaving, no GPU is left online without a live executor behind it. The shipped files
//! are compiled here with their `super::atomic` facade mapped to loom's atomics.
//!
//! The last model runs the same race with the join's re-check left out (a copy of the naive
//! protocol, written here) and asserts that loom finds the interleaving that leaves a ghost
//! GPU online: the check can fail.

mod atomic {
    pub(crate) use loom::sync::atomic::{fence, AtomicU64, Ordering};

    pub(crate) fn spin_wait() {
        loom::thread::yield_now();
    }
}

#[allow(dead_code)]
#[path = "../../shards/src/sync/gpu_table.rs"]
mod gpu_table;

#[allow(dead_code)]
#[path = "../../shards/src/sync/lifecycle.rs"]
mod lifecycle;

use gpu_table::GpuTable;
use lifecycle::Lifecycle;
use loom::sync::Arc;
use loom::thread;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = Some(3);
    builder.check(f);
}

#[test]
fn a_join_racing_a_loss_leaves_no_gpu_online() {
    model(|| {
        // Two executor GPUs, offline until the executor's last link joins.
        let table = Arc::new(GpuTable::with_offline(0, 2, 2));
        let life = Arc::new(Lifecycle::new());
        let joiner = {
            let (table, life) = (table.clone(), life.clone());
            thread::spawn(move || life.bring_online(&table, &[0, 1], 10).0)
        };
        let loser = {
            let (table, life) = (table.clone(), life.clone());
            thread::spawn(move || life.lose(&table, &[0, 1]))
        };
        let _online = joiner.join().unwrap();
        assert!(loser.join().unwrap(), "the first loss takes the GPUs");
        assert!(life.is_lost());
        assert!(!table.is_online(0) && !table.is_online(1), "a ghost GPU stayed online");
        assert_eq!(table.online_count(), 0);
    });
}

#[test]
fn a_hung_gpu_coming_back_racing_a_loss_stays_offline() {
    model(|| {
        let table = Arc::new(GpuTable::with_offline(0, 1, 2));
        let life = Arc::new(Lifecycle::new());
        assert!(life.bring_online(&table, &[0], 0).0);
        // Its plan hung: the GPU left planning.
        assert!(table.set_offline(0));
        let recovered = {
            let (table, life) = (table.clone(), life.clone());
            thread::spawn(move || life.bring_slot_online(&table, 0, 10).0)
        };
        let loser = {
            let (table, life) = (table.clone(), life.clone());
            thread::spawn(move || life.lose(&table, &[0]))
        };
        let _ = recovered.join().unwrap();
        assert!(loser.join().unwrap());
        assert!(!table.is_online(0), "a lost executor's GPU came back online");
    });
}

/// The naive join: check, then bring online, with no re-check after.
fn naive_bring_online(life: &Lifecycle, table: &GpuTable, slot: u32) {
    if !life.is_lost() {
        table.set_online(slot, 10);
    }
}

#[test]
fn without_the_recheck_loom_finds_the_ghost_gpu() {
    let found = std::panic::catch_unwind(|| {
        model(|| {
            let table = Arc::new(GpuTable::with_offline(0, 1, 2));
            let life = Arc::new(Lifecycle::new());
            let joiner = {
                let (table, life) = (table.clone(), life.clone());
                thread::spawn(move || naive_bring_online(&life, &table, 0))
            };
            let loser = {
                let (table, life) = (table.clone(), life.clone());
                thread::spawn(move || life.lose(&table, &[0]))
            };
            joiner.join().unwrap();
            loser.join().unwrap();
            assert!(!table.is_online(0), "ghost GPU");
        });
    });
    assert!(
        found.is_err(),
        "loom explored no interleaving that leaves the GPU online"
    );
}
