//! The registry of external executors, shared by every shard: who is connected, which GPU
//! slots of the table each one's GPUs occupy, the profiles it measured, and how far its
//! links to the shards are.
//!
//! Read on the hot path (a plan's GPU slot to its executor: one atomic load in
//! `slot_owner`), written only when executors come and go (`dashmap` for the entries, a
//! mutex for the free slots: both cold). The GPU table (`sync::gpu_table`) is what planning
//! sees; this maps its slots to executors and decides, once, when an executor's GPUs go
//! online (every shard's link joined) and offline (the first shard that loses it).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use dashmap::DashMap;
use symphony_core::profile::Profile;

/// No executor GPU in a slot.
const NO_OWNER: u64 = u64::MAX;

/// Why a registration step was refused; sent to the executor in an ERROR frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("this scheduler accepts no executors (no executor_token is configured)")]
    NoExecutors,
    #[error("wrong executor token")]
    WrongToken,
    #[error("no room for {wanted} GPUs: {free} of {slots} executor GPU slots are free (raise executor_gpus)")]
    NoRoom { wanted: usize, free: usize, slots: usize },
    #[error("executor {0} is not registered (or was lost)")]
    Unknown(u32),
    #[error("{0}")]
    Invalid(String),
}

/// One executor GPU: where it sits in the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExecutorGpu {
    pub executor: u32,
    /// The executor's own index.
    pub local: u32,
}

#[derive(Debug)]
struct Entry {
    name: String,
    /// Table slots of its GPUs, by the executor's index order.
    slots: Vec<u32>,
    /// Per model of the catalog: the profile it measured.
    profiles: Vec<Profile>,
    registered: bool,
    joined: usize,
    online: bool,
    lost: bool,
    /// Shards that let go of their link after the loss.
    released: usize,
}

/// What a link join did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOutcome {
    /// The profiles this executor measured, per catalog model.
    pub profiles: Vec<Profile>,
    /// Every shard has joined: the caller brings these slots online.
    pub bring_online: Option<Vec<u32>>,
}

/// Executors known to the service.
#[derive(Debug)]
pub struct Executors {
    token: Option<String>,
    shard_count: usize,
    /// The table's executor slots are `first_slot..first_slot + slot_owner.len()`.
    first_slot: u32,
    slot_owner: Box<[AtomicU64]>,
    free_slots: Mutex<Vec<u32>>,
    next_id: AtomicU32,
    entries: DashMap<u32, Entry>,
}

impl Executors {
    pub fn new(token: Option<String>, first_slot: u32, slots: u32, shard_count: usize) -> Executors {
        Executors {
            token,
            shard_count,
            first_slot,
            slot_owner: (0..slots).map(|_| AtomicU64::new(NO_OWNER)).collect(),
            // Lowest slots first (the grant policy prefers low indices).
            free_slots: Mutex::new((first_slot..first_slot + slots).rev().collect()),
            next_id: AtomicU32::new(1),
            entries: DashMap::new(),
        }
    }

    pub fn accepts_executors(&self) -> bool {
        self.token.is_some() && !self.slot_owner.is_empty()
    }

    /// Checks a token (HELLO and JOIN).
    pub fn authorize(&self, token: &str) -> Result<(), RegistryError> {
        let expected = self.token.as_deref().ok_or(RegistryError::NoExecutors)?;
        // Length and bytes compared in full whatever the first difference (no early exit).
        let same = expected.len() == token.len()
            && expected
                .bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        if same {
            Ok(())
        } else {
            Err(RegistryError::WrongToken)
        }
    }

    /// HELLO: a new executor id, checked for room for `gpus` GPUs.
    pub fn hello(&self, name: &str, gpus: usize) -> Result<u32, RegistryError> {
        let free = self.free_slots.lock().expect("free slots").len();
        if gpus == 0 || gpus > free {
            return Err(RegistryError::NoRoom {
                wanted: gpus,
                free,
                slots: self.slot_owner.len(),
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.entries.insert(
            id,
            Entry {
                name: name.to_string(),
                slots: Vec::new(),
                profiles: Vec::new(),
                registered: false,
                joined: 0,
                online: false,
                lost: false,
                released: 0,
            },
        );
        Ok(id)
    }

    /// REGISTER: takes table slots for the executor's GPUs (`locals`: its indices) and keeps
    /// its profiles.
    pub fn register(&self, id: u32, locals: &[u32], profiles: Vec<Profile>) -> Result<(), RegistryError> {
        let mut entry = self.entries.get_mut(&id).ok_or(RegistryError::Unknown(id))?;
        if entry.registered || entry.lost {
            return Err(RegistryError::Invalid(format!("executor {id} registers once")));
        }
        let mut free = self.free_slots.lock().expect("free slots");
        if locals.len() > free.len() || locals.is_empty() {
            return Err(RegistryError::NoRoom {
                wanted: locals.len(),
                free: free.len(),
                slots: self.slot_owner.len(),
            });
        }
        for &local in locals {
            let slot = free.pop().expect("checked");
            self.slot_owner[(slot - self.first_slot) as usize]
                .store(u64::from(id) << 32 | u64::from(local), Ordering::Release);
            entry.slots.push(slot);
        }
        entry.profiles = profiles;
        entry.registered = true;
        Ok(())
    }

    /// JOIN from `shard`'s link. When it is the last shard to join, the executor's slots are
    /// returned to bring online.
    pub fn join(&self, id: u32) -> Result<JoinOutcome, RegistryError> {
        let mut entry = self.entries.get_mut(&id).ok_or(RegistryError::Unknown(id))?;
        if !entry.registered || entry.lost {
            return Err(RegistryError::Unknown(id));
        }
        entry.joined += 1;
        let bring_online = (entry.joined == self.shard_count && !entry.online).then(|| {
            entry.online = true;
            entry.slots.clone()
        });
        Ok(JoinOutcome {
            profiles: entry.profiles.clone(),
            bring_online,
        })
    }

    /// The executor GPU in table slot `gpu`, if any.
    pub fn owner_of(&self, gpu: u32) -> Option<ExecutorGpu> {
        let index = gpu.checked_sub(self.first_slot)? as usize;
        let word = self.slot_owner.get(index)?.load(Ordering::Acquire);
        (word != NO_OWNER).then_some(ExecutorGpu {
            executor: (word >> 32) as u32,
            local: word as u32,
        })
    }

    /// The first shard to see executor `id` gone marks it lost and gets its slots, to take
    /// offline; later callers get `None`.
    /// An executor that no shard joined yet is forgotten at once (its slots are free again).
    pub fn mark_lost(&self, id: u32) -> Option<Vec<u32>> {
        let (slots, joined) = {
            let mut entry = self.entries.get_mut(&id)?;
            if entry.lost {
                return None;
            }
            entry.lost = true;
            (entry.slots.clone(), entry.joined)
        };
        if joined == 0 {
            self.forget(id);
        }
        Some(slots)
    }

    /// A shard let go of its link to lost executor `id` (or never had one). When every shard
    /// that joined has, the slots are free for another executor.
    pub fn release(&self, id: u32) {
        let done = {
            let Some(mut entry) = self.entries.get_mut(&id) else {
                return;
            };
            entry.released += 1;
            entry.lost && entry.released >= entry.joined.max(1)
        };
        if done {
            self.forget(id);
        }
    }

    fn forget(&self, id: u32) {
        if let Some((_, entry)) = self.entries.remove(&id) {
            let mut free = self.free_slots.lock().expect("free slots");
            for slot in entry.slots {
                self.slot_owner[(slot - self.first_slot) as usize].store(NO_OWNER, Ordering::Release);
                free.push(slot);
            }
            free.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    /// Whether executor `id` has every link joined and is not lost.
    pub fn is_online(&self, id: u32) -> bool {
        self.entries.get(&id).is_some_and(|e| e.online && !e.lost)
    }

    pub fn name_of(&self, id: u32) -> Option<String> {
        self.entries.get(&id).map(|e| e.name.clone())
    }

    /// Executors with every link joined and not lost.
    pub fn online_count(&self) -> usize {
        self.entries.iter().filter(|e| e.online && !e.lost).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile() -> Profile {
        Profile::from_latencies_ns(vec![1_000, 2_000], 0, 0)
    }

    #[test]
    fn tokens_are_checked_and_missing_tokens_refuse_all() {
        let executors = Executors::new(Some("secret".into()), 8, 4, 2);
        assert_eq!(executors.authorize("secret"), Ok(()));
        assert_eq!(executors.authorize("secreT"), Err(RegistryError::WrongToken));
        assert_eq!(executors.authorize("secret2"), Err(RegistryError::WrongToken));
        let closed = Executors::new(None, 8, 4, 2);
        assert_eq!(closed.authorize("secret"), Err(RegistryError::NoExecutors));
        assert!(!closed.accepts_executors());
    }

    #[test]
    fn gpus_go_online_when_every_shard_joined_and_slots_return_after_loss() {
        let executors = Executors::new(Some("t".into()), 8, 4, 2);
        let id = executors.hello("a", 3).unwrap();
        executors.register(id, &[0, 1, 2], vec![profile()]).unwrap();
        assert_eq!(executors.owner_of(8), Some(ExecutorGpu { executor: id, local: 0 }));
        assert_eq!(executors.owner_of(7), None);
        assert_eq!(executors.owner_of(11), None);
        assert_eq!(executors.join(id).unwrap().bring_online, None);
        assert_eq!(executors.join(id).unwrap().bring_online, Some(vec![8, 9, 10]));
        assert_eq!(executors.online_count(), 1);
        // No room for a second executor of 2 GPUs.
        assert!(matches!(
            executors.hello("b", 2),
            Err(RegistryError::NoRoom { free: 1, .. })
        ));
        // Lost: the first shard takes the slots offline, the second does not.
        assert_eq!(executors.mark_lost(id), Some(vec![8, 9, 10]));
        assert_eq!(executors.mark_lost(id), None);
        assert!(executors.join(id).is_err());
        executors.release(id);
        assert_eq!(executors.owner_of(8).map(|g| g.executor), Some(id));
        executors.release(id);
        assert_eq!(executors.owner_of(8), None);
        // Lost before any link joined: forgotten at once.
        let c = executors.hello("c", 2).unwrap();
        executors.register(c, &[0, 1], vec![profile()]).unwrap();
        assert_eq!(executors.mark_lost(c), Some(vec![8, 9]));
        assert_eq!(executors.owner_of(8), None);
        let b = executors.hello("b", 4).unwrap();
        executors.register(b, &[0, 1, 2, 3], vec![profile()]).unwrap();
        assert_eq!(executors.owner_of(8).map(|g| g.executor), Some(b));
    }
}
