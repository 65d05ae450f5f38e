//! A shard's view of the shared GPU table as the core's [`GpuSource`], so the deferred
//! scheduler of `symphony-core` runs unchanged on a shard.
//!
//! Claims are kept here between `claim` and `release` (the table's `Claim` is a linear token;
//! the core sees only the GPU and its `free_at`). A release that hands a GPU off to another
//! shard's waiting candidate is queued in `handoffs`; the shard's loop sends those messages.

use std::sync::Arc;

use symphony_core::gpu_pool::{GpuClaim, GpuSource};
use symphony_core::policy::GrantPolicy;

use crate::sync::gpu_table::{Claim, GpuTable};

#[derive(Debug)]
pub struct SharedGpus {
    table: Arc<GpuTable>,
    shard: u16,
    /// The table's claim token per GPU this shard holds.
    claims: Vec<Option<Claim>>,
    /// Shards that were handed a GPU by this shard's releases, to be told.
    handoffs: Vec<u16>,
}

impl SharedGpus {
    pub fn new(table: Arc<GpuTable>, shard: u16) -> SharedGpus {
        let gpu_count = table.gpu_count();
        SharedGpus {
            table,
            shard,
            claims: (0..gpu_count).map(|_| None).collect(),
            handoffs: Vec::with_capacity(gpu_count),
        }
    }

    pub fn table(&self) -> &GpuTable {
        &self.table
    }

    /// The shards to tell that a GPU was reserved for them, since the last call.
    pub fn drain_handoffs(&mut self) -> std::vec::Drain<'_, u16> {
        self.handoffs.drain(..)
    }

    fn take(&mut self, claim: GpuClaim) -> Claim {
        let token = self.claims[claim.gpu as usize]
            .take()
            .expect("a GPU is released once per claim");
        assert_eq!(token.free_at_ns(), claim.free_at_ns);
        token
    }
}

impl GpuSource for SharedGpus {
    fn gpu_count(&self) -> u32 {
        self.table.gpu_count() as u32
    }

    fn min_free_at_ns(&self) -> u64 {
        self.table.min_free_at_ns(self.shard)
    }

    fn claim(&mut self, exec_at_ns: u64, policy: GrantPolicy) -> Option<GpuClaim> {
        let token = self.table.claim(self.shard, exec_at_ns, policy)?;
        let claim = GpuClaim {
            gpu: token.gpu(),
            free_at_ns: token.free_at_ns(),
        };
        let slot = &mut self.claims[claim.gpu as usize];
        assert!(slot.is_none(), "GPU {} claimed twice", claim.gpu);
        *slot = Some(token);
        Some(claim)
    }

    fn release(&mut self, claim: GpuClaim, finish_ns: u64) {
        let token = self.take(claim);
        if let Some(shard) = self.table.release(token, finish_ns) {
            self.handoffs.push(shard);
        }
    }

    fn cancel(&mut self, claim: GpuClaim) {
        let token = self.take(claim);
        if let Some(shard) = self.table.cancel(token) {
            self.handoffs.push(shard);
        }
    }
}
