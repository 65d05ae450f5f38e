//! When an external executor's GPUs may be planned on: online only while the executor is
//! live, whatever the order in which a join and a loss reach the GPU table.
//!
//! An executor's GPUs go online in the [`GpuTable`] when its last link joins (on one shard)
//! and offline when it is lost (first seen on any shard, maybe another one, at the same
//! time). Both are several table operations, so without care a join racing a loss can leave
//! a GPU online with no executor behind it: the loss takes the GPUs offline before the join
//! brought them online, and the join then brings them online. [`Lifecycle`] orders the two.
//!
//! # Protocol
//!
//! One state word per executor: bit [`LOST`] (set once, never cleared).
//!
//! 1. **Bring online** ([`Lifecycle::bring_online`], the last joiner): if LOST is set, stop.
//!    Else `set_online` every slot (CAS on each slot's state word), then a SeqCst fence,
//!    then load the state: if LOST is set now, `set_offline` every slot again.
//! 2. **Lose** ([`Lifecycle::lose`], any shard): set LOST (`fetch_or`, AcqRel); only the
//!    first caller goes on: a SeqCst fence, then `set_offline` every slot.
//!
//! **No GPU stays online after a loss.** The two fences are totally ordered. If the
//! joiner's fence comes first, the loser's `set_offline` (after its own fence) sees every
//! slot the joiner brought online and takes it offline. If the loser's fence comes first,
//! the joiner's load after its fence sees LOST and takes the slots offline itself. Either
//! way every slot ends offline; `set_offline` of a slot that is offline already does nothing.
//! The same holds for one slot brought back after a hung plan ([`Lifecycle::bring_slot_online`]).
//! `verify/tests/loom_lifecycle.rs` checks it under every interleaving, and that without the
//! joiner's re-check a GPU is left online.

use super::atomic::{fence, AtomicU64, Ordering};
use super::gpu_table::GpuTable;

/// Set once the executor is lost.
const LOST: u64 = 1;

/// One executor's online state.
#[derive(Debug, Default)]
pub struct Lifecycle {
    state: AtomicU64,
}

impl Lifecycle {
    pub fn new() -> Lifecycle {
        Lifecycle::default()
    }

    pub fn is_lost(&self) -> bool {
        self.state.load(Ordering::Acquire) & LOST != 0
    }

    /// Brings `slots` online, free from `now_ns`, unless the executor is lost (before or
    /// meanwhile). Returns whether they are online, and the shards the table handed them off
    /// to (the caller tells them).
    pub fn bring_online(&self, table: &GpuTable, slots: &[u32], now_ns: u64) -> (bool, Vec<u16>) {
        if self.is_lost() {
            return (false, Vec::new());
        }
        let handoffs: Vec<u16> = slots
            .iter()
            .filter_map(|&slot| table.set_online(slot, now_ns))
            .collect();
        fence(Ordering::SeqCst);
        if self.state.load(Ordering::Relaxed) & LOST != 0 {
            for &slot in slots {
                table.set_offline(slot);
            }
            return (false, Vec::new());
        }
        (true, handoffs)
    }

    /// One slot back online (its hung plan finished), unless the executor is lost.
    pub fn bring_slot_online(&self, table: &GpuTable, slot: u32, now_ns: u64) -> (bool, Option<u16>) {
        let (online, handoffs) = self.bring_online(table, &[slot], now_ns);
        (online, handoffs.first().copied())
    }

    /// Marks the executor lost and takes `slots` offline; true for the first caller only.
    pub fn lose(&self, table: &GpuTable, slots: &[u32]) -> bool {
        if self.state.fetch_or(LOST, Ordering::AcqRel) & LOST != 0 {
            return false;
        }
        fence(Ordering::SeqCst);
        for &slot in slots {
            table.set_offline(slot);
        }
        true
    }
}
