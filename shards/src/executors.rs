//! The registry of external executors, shared by every shard: who is connected, which GPU
//! slots of the table each one's GPUs occupy, the profiles it measured, its secret, and
//! which shards it has joined, and the GPU classes the shards plan with.
//!
//! Read on the hot path (a plan's GPU slot to its executor: one atomic load in
//! `slot_owner`), written only when executors come and go (`dashmap` for the entries, a
//! mutex for the free slots: both cold). The GPU table (`sync::gpu_table`) is what planning
//! sees; this maps its slots to executors and decides when an executor's GPUs go online
//! (every shard's link joined) and offline (the first shard that loses it, or a plan that
//! hung on one GPU). Online and offline go through the executor's [`Lifecycle`], so a join
//! racing a loss never leaves a GPU online without a live executor (loom:
//! `verify/tests/loom_lifecycle.rs`).
//!
//! A registration is bound to its executor: WELCOME gives it a random secret, and a JOIN
//! must carry it; each shard takes one link per executor. Executors of different speeds make
//! GPU classes ([`Executors::planning`]): the shards plan each batch for the class of GPU it
//! would be granted, and never assume a GPU faster than its executor measured.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dashmap::DashMap;
use symphony_core::policy::ModelConfig;
use symphony_core::profile::Profile;
use symphony_core::wire::executor::SECRET_BYTES;

use crate::sync::gpu_table::GpuTable;
use crate::sync::lifecycle::Lifecycle;

/// No executor GPU in a slot.
const NO_OWNER: u64 = u64::MAX;

/// Bytes of an executor's name kept (and shown in logs).
pub const NAME_LOG_LIMIT: usize = 64;

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
    #[error("this JOIN does not carry executor {0}'s secret")]
    WrongSecret(u32),
    #[error("executor {executor} already has a link on shard {shard}")]
    AlreadyJoined { executor: u32, shard: u32 },
    #[error("no secret could be drawn from the system's random source: {0}")]
    Random(String),
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
    /// Bounded and escaped for logs ([`for_log`]).
    name: String,
    secret: [u8; SECRET_BYTES],
    /// Table slots of its GPUs, by the executor's index order.
    slots: Vec<u32>,
    /// Per model of the catalog: the profile it measured.
    profiles: Vec<Profile>,
    registered: bool,
    /// Per shard: whether its link joined.
    joined: Vec<bool>,
    joined_count: usize,
    online: bool,
    lost: bool,
    /// Shards that let go of their link after the loss.
    released: usize,
    life: Arc<Lifecycle>,
}

/// What a link join did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinOutcome {
    /// The executor's name, for logs (bounded, escaped).
    pub name: String,
    /// When this was the last shard to join: the slots that went online (empty if the
    /// executor was lost meanwhile) and the shards the table handed GPUs to.
    pub online: Option<(Vec<u32>, Vec<u16>)>,
}

/// Executors known to the service.
#[derive(Debug)]
pub struct Executors {
    token: Option<String>,
    shard_count: usize,
    table: Arc<GpuTable>,
    /// The table's executor slots are `first_slot..first_slot + slot_owner.len()`.
    first_slot: u32,
    slot_owner: Box<[AtomicU64]>,
    /// Per executor slot: plans of any shard that hung on it (while > 0 it is offline).
    hung: Box<[AtomicU32]>,
    free_slots: Mutex<Vec<u32>>,
    next_id: AtomicU32,
    entries: DashMap<u32, Entry>,
    /// Per embedded GPU (table slots `0..first_slot`): the time factor it runs the catalog's
    /// profiles at (empty: all 1).
    embedded_factors: Vec<f64>,
}

/// `text` as it may appear in a log line: at most `limit` bytes (cut at a character), with
/// control characters and quotes escaped, so a peer's string can neither forge a line nor
/// drive the terminal.
pub fn for_log(text: &str, limit: usize) -> String {
    let mut out = String::with_capacity(text.len().min(limit) + 8);
    for c in text.chars() {
        let escaped: String = if c.is_control() || c == '"' || c == '\\' {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len() + escaped.len() > limit {
            out.push_str("...");
            break;
        }
        out.push_str(&escaped);
    }
    out
}

/// `SECRET_BYTES` from the system's random source.
fn draw_secret() -> Result<[u8; SECRET_BYTES], RegistryError> {
    use std::io::Read;
    let mut secret = [0u8; SECRET_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut secret))
        .map_err(|e| RegistryError::Random(e.to_string()))?;
    Ok(secret)
}

/// Compares in full whatever the first difference (no early exit).
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Executors {
    /// Executor GPUs take table slots `first_slot..first_slot + slots` of `table`.
    pub fn new(
        token: Option<String>,
        table: Arc<GpuTable>,
        first_slot: u32,
        slots: u32,
        shard_count: usize,
    ) -> Executors {
        assert!(first_slot as usize + slots as usize <= table.gpu_count());
        Executors {
            token,
            shard_count,
            table,
            first_slot,
            slot_owner: (0..slots).map(|_| AtomicU64::new(NO_OWNER)).collect(),
            hung: (0..slots).map(|_| AtomicU32::new(0)).collect(),
            // Lowest slots first (the grant policy prefers low indices).
            free_slots: Mutex::new((first_slot..first_slot + slots).rev().collect()),
            next_id: AtomicU32::new(1),
            entries: DashMap::new(),
            embedded_factors: Vec::new(),
        }
    }

    /// The embedded GPUs run the catalog's profiles at these time factors, one per GPU (a
    /// workload's `gpu_classes`, `[embedded] classes`).
    pub fn with_embedded_factors(mut self, factors: Vec<f64>) -> Executors {
        assert!(
            factors.is_empty() || factors.len() == self.first_slot as usize,
            "a factor per embedded GPU"
        );
        assert!(factors.iter().all(|f| f.is_finite() && *f > 0.0));
        self.embedded_factors = factors;
        self
    }

    /// The time factor embedded GPU `gpu` runs the catalog's profiles at (`None`: exactly).
    pub fn embedded_factor(&self, gpu: u32) -> Option<f64> {
        self.embedded_factors.get(gpu as usize).copied()
    }

    pub fn accepts_executors(&self) -> bool {
        self.token.is_some() && !self.slot_owner.is_empty()
    }

    /// Checks a token (HELLO and JOIN).
    pub fn authorize(&self, token: &str) -> Result<(), RegistryError> {
        let expected = self.token.as_deref().ok_or(RegistryError::NoExecutors)?;
        if same_bytes(expected.as_bytes(), token.as_bytes()) {
            Ok(())
        } else {
            Err(RegistryError::WrongToken)
        }
    }

    /// HELLO: a new executor id and its secret, checked for room for `gpus` GPUs.
    pub fn hello(&self, name: &str, gpus: usize) -> Result<(u32, [u8; SECRET_BYTES]), RegistryError> {
        let free = self.free_slots.lock().expect("free slots").len();
        if gpus == 0 || gpus > free {
            return Err(RegistryError::NoRoom {
                wanted: gpus,
                free,
                slots: self.slot_owner.len(),
            });
        }
        let secret = draw_secret()?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.entries.insert(
            id,
            Entry {
                name: for_log(name, NAME_LOG_LIMIT),
                secret,
                slots: Vec::new(),
                profiles: Vec::new(),
                registered: false,
                joined: vec![false; self.shard_count],
                joined_count: 0,
                online: false,
                lost: false,
                released: 0,
                life: Arc::new(Lifecycle::new()),
            },
        );
        Ok((id, secret))
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

    /// JOIN of executor `id` from `shard`'s link, with the secret of its WELCOME. The last
    /// shard to join brings the executor's GPUs online in the table, `now_ns` free.
    pub fn join(
        &self,
        id: u32,
        shard: u32,
        secret: &[u8; SECRET_BYTES],
        now_ns: u64,
    ) -> Result<JoinOutcome, RegistryError> {
        let (name, online) = {
            let mut entry = self.entries.get_mut(&id).ok_or(RegistryError::Unknown(id))?;
            if !entry.registered || entry.lost {
                return Err(RegistryError::Unknown(id));
            }
            if !same_bytes(&entry.secret, secret) {
                return Err(RegistryError::WrongSecret(id));
            }
            let Some(joined) = entry.joined.get_mut(shard as usize) else {
                return Err(RegistryError::Invalid(format!("there is no shard {shard}")));
            };
            if *joined {
                return Err(RegistryError::AlreadyJoined { executor: id, shard });
            }
            *joined = true;
            entry.joined_count += 1;
            let last = entry.joined_count == self.shard_count && !entry.online;
            if last {
                entry.online = true;
            }
            let online = last.then(|| (entry.slots.clone(), Arc::clone(&entry.life)));
            (entry.name.clone(), online)
        };
        // Outside the entry's lock: the lifecycle orders this against a concurrent loss.
        let online = online.map(|(slots, life)| {
            let (up, handoffs) = life.bring_online(&self.table, &slots, now_ns);
            if up {
                (slots, handoffs)
            } else {
                (Vec::new(), Vec::new())
            }
        });
        Ok(JoinOutcome { name, online })
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

    /// The first shard to see executor `id` gone marks it lost and takes its GPUs offline
    /// (returns how many); later callers get `None`. An executor that no shard joined yet
    /// is forgotten at once (its slots are free again).
    pub fn mark_lost(&self, id: u32) -> Option<usize> {
        let (slots, joined, life) = {
            let mut entry = self.entries.get_mut(&id)?;
            if entry.lost {
                return None;
            }
            entry.lost = true;
            (entry.slots.clone(), entry.joined_count, Arc::clone(&entry.life))
        };
        life.lose(&self.table, &slots);
        if joined == 0 {
            self.forget(id);
        }
        Some(slots.len())
    }

    /// A plan on table slot `gpu` did not report in time: while any plan hangs there, the
    /// GPU is out of planning. True when this took it offline.
    pub fn gpu_hung(&self, gpu: u32) -> bool {
        let Some(index) = gpu.checked_sub(self.first_slot) else {
            return false;
        };
        let Some(hung) = self.hung.get(index as usize) else {
            return false;
        };
        hung.fetch_add(1, Ordering::AcqRel) == 0 && self.table.set_offline(gpu)
    }

    /// A hung plan on slot `gpu` reported after all: when it was the last one, the GPU is
    /// planned on again unless its executor is lost, free from `now_ns` or from the end of
    /// what was planned on it before it hung, whichever is later (those plans may still be
    /// queued on it). Returns the shard the table handed the GPU to, if any.
    pub fn gpu_recovered(&self, gpu: u32, now_ns: u64) -> (bool, Option<u16>) {
        let Some(index) = gpu.checked_sub(self.first_slot) else {
            return (false, None);
        };
        let Some(hung) = self.hung.get(index as usize) else {
            return (false, None);
        };
        let before = hung
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .unwrap_or(0);
        if before != 1 {
            return (false, None);
        }
        let Some(owner) = self.owner_of(gpu) else {
            return (false, None);
        };
        let Some(life) = self.entries.get(&owner.executor).map(|e| Arc::clone(&e.life)) else {
            return (false, None);
        };
        let free_at_ns = now_ns.max(self.table.free_at_ns(gpu));
        life.bring_slot_online(&self.table, gpu, free_at_ns)
    }

    /// A shard let go of its link to lost executor `id` (or never had one). When every shard
    /// that joined has, the slots are free for another executor.
    pub fn release(&self, id: u32) {
        let done = {
            let Some(mut entry) = self.entries.get_mut(&id) else {
                return;
            };
            entry.released += 1;
            entry.lost && entry.released >= entry.joined_count.max(1)
        };
        if done {
            self.forget(id);
        }
    }

    fn forget(&self, id: u32) {
        if let Some((_, entry)) = self.entries.remove(&id) {
            let mut free = self.free_slots.lock().expect("free slots");
            for slot in entry.slots {
                let index = (slot - self.first_slot) as usize;
                self.slot_owner[index].store(NO_OWNER, Ordering::Release);
                self.hung[index].store(0, Ordering::Release);
                free.push(slot);
            }
            free.sort_unstable_by(|a, b| b.cmp(a));
        }
    }

    /// Whether executor `id` has every link joined and is not lost.
    pub fn is_online(&self, id: u32) -> bool {
        self.entries.get(&id).is_some_and(|e| e.online && !e.lost)
    }

    /// The executor's name as logs show it (bounded, escaped).
    pub fn name_of(&self, id: u32) -> Option<String> {
        self.entries.get(&id).map(|e| e.name.clone())
    }

    /// Executors with every link joined and not lost.
    pub fn online_count(&self) -> usize {
        self.entries.iter().filter(|e| e.online && !e.lost).count()
    }

    /// How the shards plan the table's GPUs from the executors' measured profiles: with none
    /// registered, the catalog's profiles in one class (`None` when there are no embedded
    /// GPUs either: nothing to plan, the last planning stands).
    ///
    /// Per catalog model the base profile is the fastest of every live executor's (and of the
    /// catalog's, which the embedded GPUs run): per batch size the smallest latency. Each
    /// executor's GPUs run at a time factor over the base, the largest ratio of its profile
    /// to the base over every model and batch size, so planning a GPU with the base scaled by
    /// its factor never assumes a batch faster than its executor measured. Executors whose
    /// factors lie within [`CLASS_TOLERANCE`] of each other share a class (measured
    /// profiles of one kind of GPU differ by a few percent), planned at the largest factor of
    /// its members. The scheduler plans each batch for the class it would be granted
    /// (`symphony_core::policy::ClassPlanning`).
    pub fn planning(&self, catalog: &[ModelConfig]) -> Option<Planning> {
        let mut members: Vec<(Vec<u32>, Vec<Profile>)> = self
            .entries
            .iter()
            .filter(|e| e.registered && !e.lost && e.profiles.len() == catalog.len())
            .map(|e| (e.slots.clone(), e.profiles.clone()))
            .collect();
        if members.is_empty() && self.first_slot == 0 {
            return None;
        }
        // The embedded GPUs: the table's first slots, running the catalog's profiles at their
        // factors.
        let mut embedded: Vec<(f64, Vec<u32>)> = Vec::new();
        for slot in 0..self.first_slot {
            let factor = self.embedded_factor(slot).unwrap_or(1.0);
            match embedded.iter_mut().find(|(f, _)| *f == factor) {
                Some((_, slots)) => slots.push(slot),
                None => embedded.push((factor, vec![slot])),
            }
        }
        for (factor, slots) in embedded {
            let profiles = catalog.iter().map(|m| m.profile.scaled(factor)).collect();
            members.push((slots, profiles));
        }
        let mut profiles = members[0].1.clone();
        for (_, theirs) in &members[1..] {
            for (base, p) in profiles.iter_mut().zip(theirs) {
                *base = base.fastest_with(p);
            }
        }
        let mut factored: Vec<(f64, Vec<u32>)> = members
            .into_iter()
            .map(|(slots, theirs)| {
                let factor = theirs
                    .iter()
                    .zip(&profiles)
                    .map(|(p, base)| p.time_factor_over(base))
                    .fold(1.0, f64::max);
                (factor, slots)
            })
            .collect();
        factored.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut class_factors: Vec<f64> = Vec::new();
        let mut class_of_slot = vec![0u8; self.table.gpu_count()];
        let mut class_floor = 0.0;
        for (factor, slots) in factored {
            let opens_class = class_factors.is_empty()
                || (factor > class_floor * CLASS_TOLERANCE && class_factors.len() < CLASS_LIMIT);
            if opens_class {
                class_floor = factor;
                class_factors.push(factor);
            }
            let class = class_factors.len() - 1;
            class_factors[class] = class_factors[class].max(factor);
            for slot in slots {
                class_of_slot[slot as usize] = class as u8;
            }
        }
        Some(Planning {
            profiles,
            class_factors,
            class_of_slot,
        })
    }
}

/// Executors whose time factors lie within this ratio of a class's fastest share that class.
pub const CLASS_TOLERANCE: f64 = 1.05;
/// GPU classes one table is planned with (a class index is a byte); executors past it join
/// the slowest class.
pub const CLASS_LIMIT: usize = 256;

/// How the shards plan the table's GPUs (see [`Executors::planning`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Planning {
    /// Per catalog model: the base profile.
    pub profiles: Vec<Profile>,
    /// Per class, fastest first: its time factor over the base profiles (at least 1).
    pub class_factors: Vec<f64>,
    /// Per table slot: its class.
    pub class_of_slot: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn profile(ns: u64) -> Profile {
        Profile::from_latencies_ns(vec![ns, 2 * ns], 0, 0)
    }

    fn registry(table: &Arc<GpuTable>, shards: usize) -> Executors {
        Executors::new(Some("t".into()), Arc::clone(table), 8, 4, shards)
    }

    #[test]
    fn tokens_are_checked_and_missing_tokens_refuse_all() {
        let table = Arc::new(GpuTable::with_offline(8, 4, 2));
        let executors = Executors::new(Some("secret".into()), Arc::clone(&table), 8, 4, 2);
        assert_eq!(executors.authorize("secret"), Ok(()));
        assert_eq!(executors.authorize("secreT"), Err(RegistryError::WrongToken));
        assert_eq!(executors.authorize("secret2"), Err(RegistryError::WrongToken));
        let closed = Executors::new(None, table, 8, 4, 2);
        assert_eq!(closed.authorize("secret"), Err(RegistryError::NoExecutors));
        assert!(!closed.accepts_executors());
    }

    #[test]
    fn gpus_go_online_when_every_shard_joined_and_slots_return_after_loss() {
        let table = Arc::new(GpuTable::with_offline(8, 4, 2));
        let executors = registry(&table, 2);
        let (id, secret) = executors.hello("a", 3).unwrap();
        executors.register(id, &[0, 1, 2], vec![profile(1_000)]).unwrap();
        assert_eq!(executors.owner_of(8), Some(ExecutorGpu { executor: id, local: 0 }));
        assert_eq!(executors.owner_of(7), None);
        assert_eq!(executors.owner_of(11), None);
        assert_eq!(executors.join(id, 0, &secret, 5).unwrap().online, None);
        // A second JOIN on one shard, or one without the secret, is refused.
        assert_eq!(
            executors.join(id, 0, &secret, 5),
            Err(RegistryError::AlreadyJoined { executor: id, shard: 0 })
        );
        assert_eq!(executors.join(id, 1, &[0; 16], 5), Err(RegistryError::WrongSecret(id)));
        let (slots, _) = executors.join(id, 1, &secret, 5).unwrap().online.unwrap();
        assert_eq!(slots, vec![8, 9, 10]);
        assert_eq!(table.online_count(), 8 + 3);
        assert_eq!(executors.online_count(), 1);
        // No room for a second executor of 2 GPUs.
        assert!(matches!(
            executors.hello("b", 2),
            Err(RegistryError::NoRoom { free: 1, .. })
        ));
        // Lost: the first shard takes the slots offline, the second does not.
        assert_eq!(executors.mark_lost(id), Some(3));
        assert_eq!(table.online_count(), 8);
        assert_eq!(executors.mark_lost(id), None);
        assert!(executors.join(id, 0, &secret, 5).is_err());
        executors.release(id);
        assert_eq!(executors.owner_of(8).map(|g| g.executor), Some(id));
        executors.release(id);
        assert_eq!(executors.owner_of(8), None);
        // Lost before any link joined: forgotten at once.
        let (c, _) = executors.hello("c", 2).unwrap();
        executors.register(c, &[0, 1], vec![profile(1_000)]).unwrap();
        assert_eq!(executors.mark_lost(c), Some(2));
        assert_eq!(executors.owner_of(8), None);
        let (b, _) = executors.hello("b", 4).unwrap();
        executors.register(b, &[0, 1, 2, 3], vec![profile(1_000)]).unwrap();
        assert_eq!(executors.owner_of(8).map(|g| g.executor), Some(b));
    }

    #[test]
    fn a_hung_gpu_leaves_planning_until_its_last_hung_plan_reports() {
        let table = Arc::new(GpuTable::with_offline(0, 4, 1));
        let executors = Executors::new(Some("t".into()), Arc::clone(&table), 0, 4, 1);
        let (id, secret) = executors.hello("a", 2).unwrap();
        executors.register(id, &[0, 1], vec![profile(1_000)]).unwrap();
        executors.join(id, 0, &secret, 0).unwrap();
        assert_eq!(table.online_count(), 2);
        assert!(executors.gpu_hung(0));
        assert!(!executors.gpu_hung(0), "offline already");
        assert!(!table.is_online(0) && table.is_online(1));
        assert!(!executors.gpu_recovered(0, 10).0, "one plan still hangs");
        assert!(executors.gpu_recovered(0, 10).0);
        assert!(table.is_online(0));
        // A lost executor's GPU does not come back.
        assert!(executors.gpu_hung(1));
        executors.mark_lost(id);
        assert!(!executors.gpu_recovered(1, 20).0);
        assert_eq!(table.online_count(), 0);
    }

    #[test]
    fn executors_of_different_speeds_make_classes_over_the_fastest_profile() {
        // Two embedded GPUs (slots 0, 1) running the catalog's profile, four executor slots.
        let table = Arc::new(GpuTable::with_offline(2, 4, 1));
        let executors = Executors::new(Some("t".into()), Arc::clone(&table), 2, 4, 1);
        let catalog = [ModelConfig {
            name: "m".to_string(),
            profile: profile(2_000),
            slo_ns: 100_000_000,
        }];
        let embedded_only = executors.planning(&catalog).unwrap();
        assert_eq!(
            (embedded_only.class_factors, embedded_only.class_of_slot),
            (vec![1.0], vec![0; 6])
        );
        let (fast, _) = executors.hello("fast", 1).unwrap();
        executors.register(fast, &[0], vec![profile(1_000)]).unwrap();
        let (slow, _) = executors.hello("slow", 2).unwrap();
        executors.register(slow, &[0, 1], vec![profile(5_000)]).unwrap();
        // Within 5 % of the fast one: the same class, planned at the larger factor.
        let (close, _) = executors.hello("close", 1).unwrap();
        executors.register(close, &[0], vec![profile(1_040)]).unwrap();
        let planning = executors.planning(&catalog).unwrap();
        assert_eq!(planning.profiles[0].exec_ns(1), 1_000);
        assert_eq!(planning.class_factors, [1.04, 2.0, 5.0]);
        // Slots: embedded 0, 1 (catalog: 2x); executors take free slots lowest first.
        assert_eq!(planning.class_of_slot, [1, 1, 0, 2, 2, 0]);
        executors.mark_lost(fast);
        executors.mark_lost(close);
        let planning = executors.planning(&catalog).unwrap();
        assert_eq!(planning.profiles[0].exec_ns(1), 2_000);
        assert_eq!(planning.class_factors, [1.0, 2.5]);
        assert_eq!(planning.class_of_slot[..2], [0, 0]);
        assert_eq!(planning.class_of_slot[3..5], [1, 1]);
    }

    #[test]
    fn embedded_gpus_of_two_speeds_are_two_classes() {
        let table = Arc::new(GpuTable::new(3, 1));
        let executors = Executors::new(None, Arc::clone(&table), 3, 0, 1).with_embedded_factors(vec![1.0, 3.0, 1.0]);
        let catalog = [ModelConfig {
            name: "m".to_string(),
            profile: profile(2_000),
            slo_ns: 100_000_000,
        }];
        let planning = executors.planning(&catalog).unwrap();
        assert_eq!(planning.profiles[0].exec_ns(1), 2_000);
        assert_eq!(planning.class_factors, [1.0, 3.0]);
        assert_eq!(planning.class_of_slot, [0, 1, 0]);
        assert_eq!(executors.embedded_factor(1), Some(3.0));
    }

    #[test]
    fn names_reach_logs_bounded_and_escaped() {
        assert_eq!(for_log("gpu-box-1", 64), "gpu-box-1");
        let evil = format!("a\nFAKE\x1b[2J{}", "x".repeat(1000));
        let shown = for_log(&evil, 64);
        assert!(shown.len() <= 64 + 3, "{shown}");
        assert!(!shown.contains('\n') && !shown.contains('\x1b'), "{shown}");
        assert!(shown.starts_with("a\\nFAKE\\u{1b}[2J"), "{shown}");
    }
}
