//! A shard's view of the shared GPU table as the core's [`GpuSource`], so the deferred
//! scheduler of `symphony-core` runs unchanged on a shard.
//!
//! Claims are kept here between `claim` and `release` (the table's `Claim` is a linear token;
//! the core sees only the GPU and its `free_at`). A release that hands a GPU off to another
//! shard's waiting candidate is queued in `handoffs`; the shard's loop sends those messages.
//!
//! Cross-shard waiting: after each event the shard posts its scheduler's most urgent waiting
//! candidate (`post`). A GPU reserved for this shard counts in `min_free_at_ns` and is
//! claimable, so the scheduler's own hand-off takes it at its next timer (the hand-off message
//! wakes it); one reserved but no longer wanted is declined (`decline_unwanted`) and goes on to
//! the next waiter.

use std::sync::Arc;

use symphony_core::gpu_pool::{GpuClaim, GpuSource};
use symphony_core::policy::GrantPolicy;

use crate::sync::gpu_table::{Claim, GpuTable, TableView};

#[derive(Debug)]
pub struct SharedGpus {
    table: Arc<GpuTable>,
    shard: u16,
    /// The table's claim token per GPU this shard holds.
    claims: Vec<Option<Claim>>,
    /// Shards that were handed a GPU by this shard's releases, to be told.
    handoffs: Vec<u16>,
    /// What this shard has posted as its most urgent waiting candidate.
    posted: Option<u64>,
    /// A hand-off came since the last scan for unwanted reservations.
    maybe_reserved: bool,
    /// The last look at the table, rescanned only after a change.
    view: TableView,
    /// The GPUs' speed classes, each a time factor over the profiles planned with (one
    /// class of 1 until executors of different speeds register: `set_classes`).
    class_factors: Vec<f64>,
}

impl SharedGpus {
    pub fn new(table: Arc<GpuTable>, shard: u16) -> SharedGpus {
        let gpu_count = table.gpu_count();
        SharedGpus {
            table,
            shard,
            claims: (0..gpu_count).map(|_| None).collect(),
            handoffs: Vec::with_capacity(gpu_count),
            posted: None,
            maybe_reserved: false,
            view: TableView::default(),
            class_factors: vec![1.0],
        }
    }

    /// Plans the GPUs as `class_factors.len()` speed classes, each GPU of the table in
    /// class `class_of[gpu]` (see `Executors::planning`).
    pub fn set_classes(&mut self, class_factors: Vec<f64>, class_of: Vec<u8>) {
        assert!(!class_factors.is_empty());
        assert!(class_factors.iter().all(|f| f.is_finite() && *f > 0.0));
        assert_eq!(class_of.len(), self.table.gpu_count(), "a class per GPU");
        if class_factors == self.class_factors
            && (0..class_of.len()).all(|g| self.view.class_of(g as u32) == class_of[g] as usize)
        {
            return;
        }
        self.view.set_classes(class_of, class_factors.len());
        self.class_factors = class_factors;
    }

    pub fn table(&self) -> &GpuTable {
        &self.table
    }

    /// Queues a hand-off made outside a release (a GPU brought online) to be told.
    pub fn push_handoff(&mut self, shard: u16) {
        self.handoffs.push(shard);
    }

    /// Posts (or withdraws) this shard's most urgent waiting candidate when it changed.
    pub fn post(&mut self, invalid_after_ns: Option<u64>) {
        if invalid_after_ns == self.posted {
            return;
        }
        self.posted = invalid_after_ns;
        match invalid_after_ns {
            Some(at_ns) => self.table.post_waiter(self.shard, at_ns),
            None => self.table.clear_waiter(self.shard),
        }
    }

    /// Notes that a GPU may have been reserved for this shard (a hand-off message came).
    pub fn note_handoff(&mut self) {
        self.maybe_reserved = true;
    }

    /// Gives back a GPU reserved for this shard that it no longer waits for; the GPU goes on
    /// to the next waiter (queued in `handoffs`). Scans the table only after a hand-off.
    pub fn decline_unwanted(&mut self) {
        if self.posted.is_some() || !self.maybe_reserved {
            return;
        }
        self.maybe_reserved = false;
        while let Some(gpu) = self.table.reservation_of(self.shard) {
            match self.table.decline(self.shard, gpu) {
                Some(next) => self.handoffs.push(next),
                None => break,
            }
        }
    }

    /// The shards to tell that a GPU was reserved for them, since the last call; give the
    /// list back emptied ([`SharedGpus::return_handoffs`]) to keep its capacity.
    pub fn take_handoffs(&mut self) -> Vec<u16> {
        std::mem::take(&mut self.handoffs)
    }

    /// The list [`SharedGpus::take_handoffs`] gave, told and emptied.
    pub fn return_handoffs(&mut self, mut handoffs: Vec<u16>) {
        handoffs.clear();
        if self.handoffs.is_empty() {
            self.handoffs = handoffs;
        }
    }

    /// Keeps a claim's token until its release or cancel.
    fn hold(&mut self, token: Claim) -> GpuClaim {
        let claim = GpuClaim {
            gpu: token.gpu(),
            free_at_ns: token.free_at_ns(),
        };
        let slot = &mut self.claims[claim.gpu as usize];
        assert!(slot.is_none(), "GPU {} claimed twice", claim.gpu);
        *slot = Some(token);
        claim
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
    /// GPUs online (at least 1: the policy divides by it), not the table's slots.
    fn gpu_count(&self) -> u32 {
        self.table.online_count().max(1) as u32
    }

    fn min_free_at_ns(&self) -> u64 {
        self.view.min_free_at_ns(&self.table, self.shard)
    }

    fn claim(&mut self, exec_at_ns: u64, policy: GrantPolicy) -> Option<GpuClaim> {
        let token = self.view.claim(&self.table, self.shard, exec_at_ns, policy)?;
        Some(self.hold(token))
    }

    fn release(&mut self, claim: GpuClaim, finish_ns: u64) {
        let token = self.take(claim);
        if let Some(shard) = self.view.release(&self.table, self.shard, token, finish_ns) {
            self.handoffs.push(shard);
        }
    }

    fn cancel(&mut self, claim: GpuClaim) {
        let token = self.take(claim);
        if let Some(shard) = self.view.cancel(&self.table, self.shard, token) {
            self.handoffs.push(shard);
        }
    }

    fn class_factors(&self) -> &[f64] {
        &self.class_factors
    }

    fn class_of(&self, gpu: u32) -> usize {
        self.view.class_of(gpu)
    }

    fn min_free_at_in(&self, class: usize) -> u64 {
        self.view.min_free_at_in(&self.table, self.shard, class)
    }

    fn claim_in(&mut self, class: usize, exec_at_ns: u64, policy: GrantPolicy) -> Option<GpuClaim> {
        let token = self.view.claim_in(&self.table, self.shard, class, exec_at_ns, policy)?;
        Some(self.hold(token))
    }

    /// Online GPUs over their classes' factors (GPUs of factor 1).
    fn capacity(&self) -> f64 {
        if let [factor] = self.class_factors[..] {
            return f64::from(self.gpu_count()) / factor;
        }
        let capacity: f64 = self
            .class_factors
            .iter()
            .enumerate()
            .map(|(class, factor)| f64::from(self.view.online_in(&self.table, self.shard, class)) / factor)
            .sum();
        capacity.max(1e-9)
    }
}
