//! The GPU table: which GPU is free when, shared by every shard, with no lock and no central
//! thread.
//!
//! A shard plans with the same rules as the single-threaded `symphony_core::gpu_pool`: a GPU
//! qualifies for a batch starting at `exec_at` when its `free_at <= exec_at`, and the grant
//! policy picks among the qualifying ones. Here many shards do it at once, so a GPU is taken
//! by a *claim* (a CAS on its state word) and given back by a *release* that publishes the
//! planned finish as its new `free_at`. When GPUs are scarce, shards *post* their most urgent
//! waiting candidate (`invalid_after`), and a release hands the GPU it frees to the posted
//! candidate with the smallest `invalid_after` across shards by *reserving* it for that shard.
//!
//! 5. **Offline and online** (`set_offline`, `set_online`): GPUs of external executors come
//!    and go. Taking a GPU offline CASes its state from FREE or RESERVED to OFFLINE (a
//!    CLAIMED GPU is released within its claimer's event, so the caller retries until it is
//!    not); no claim, post or hand-off ever takes an OFFLINE GPU. Bringing one online stores
//!    its `free_at` and CASes OFFLINE to FREE (Release), then hands it off like a release.
//!    A reservation lost to OFFLINE leaves its waiter posted: the next release serves it.
//!
//! This is not a scheduler: which batch to run is the shard's business (the core's policy).
//!
//! # Protocol
//!
//! Each GPU has a state word and a `free_at_ns` word:
//!
//! ```text
//! state = version (46 bits) | tag (2 bits: FREE, CLAIMED, RESERVED, OFFLINE) | owner shard (16 bits)
//! ```
//!
//! Every transition increments `version`, so a CAS from a state value read earlier fails if
//! anything happened in between (no ABA).
//!
//! 1. **Claim** (`claim`, `try_claim`): load the state (Acquire); it must be FREE, or RESERVED
//!    for this shard; load `free_at_ns` (Relaxed: see below); check `free_at <= exec_at`;
//!    CAS the state to CLAIMED by this shard (AcqRel). Success makes the caller the only
//!    writer of `free_at_ns` until it releases.
//! 2. **Release** (`release`): the owner stores the plan's finish into `free_at_ns`
//!    (Relaxed), then stores the state FREE (Release: a later claimer's Acquire load of this
//!    state makes the new `free_at_ns` visible, and its CAS from exactly this state value
//!    proves no newer `free_at_ns` was written since). Then it hands off (4).
//! 3. **Post** (`post_waiter`): a shard whose candidate finds no GPU stores its
//!    `invalid_after` into its waiter slot and issues a SeqCst fence; its next look at the
//!    GPUs (`min_free_at_ns`, then a claim, 1) loads every GPU state after the fence. With a
//!    GPU it withdraws the post (`clear_waiter`).
//! 4. **Hand-off** (`hand_off`, run by whoever frees a GPU): a SeqCst fence, then load every
//!    waiter slot, take the smallest `invalid_after`, and CAS the freed GPU from FREE to
//!    RESERVED for that shard. The caller then tells that shard (a message outside this
//!    module); the shard claims it (1: a GPU reserved for the claimer counts as free) or, no
//!    longer waiting, declines it (`decline`), which hands off again.
//!
//! **No waiting candidate is forgotten.** Steps 2 to 4 are the two halves of a Dekker pair:
//! the shard stores its waiter, fences, loads GPU states; the releaser stores a GPU state,
//! fences, loads the waiters. The two SeqCst fences are totally ordered: if the releaser's
//! fence comes second, its loads see the post (it reserves the GPU for the waiter, unless
//! another shard claimed the GPU first, and that shard's own release hands off again); if the
//! shard's fence comes second, its loads see the GPU free and it claims it. (Fences rather
//! than SeqCst accesses: loom models SeqCst fences exactly, SeqCst accesses only as AcqRel.)
//! The loom models in `verify/tests/loom_gpu_table.rs` check this, and that no GPU ever holds
//! two overlapping plans, with two and three threads; without either fence they fail.
//!
//! # Looking without scanning
//!
//! A shard looks at the GPUs (`min_free_at_ns`) on every window update, once per request,
//! while the GPUs change once per plan. Every change that can make a GPU open to a shard that
//! was not, or change an open GPU's `free_at` (release, cancel, reserve, decline, online,
//! offline), bumps the table's `changes` counter after its state store and before the
//! hand-off's fence; a shard's [`TableView`] (a tree of minimums over the `free_at` of the
//! GPUs open to it, which also picks its lowest-index and earliest-free claims) rescans only
//! when the counter moved past the shard's own changes since its last scan (its own release
//! or cancel updates one leaf). The counter takes part in the Dekker pair: a shard loads it after its post's
//! fence, so if the releaser's fence came first the shard sees the bump and rescans. A claim
//! and a reservation do not bump: they only close a GPU to the other shards (a reserved GPU
//! stays open, with the same `free_at`, to the shard it is reserved for). Until the next bump
//! another shard's view may still count that GPU, as a scan just before would have, and its
//! claim then finds the GPU taken, as after any lost race.

use symphony_core::policy::GrantPolicy;

use super::atomic::{fence, spin_wait, AtomicU64, Ordering};

/// Shard ids fit the owner field of a state word.
pub const SHARD_LIMIT: usize = 1 << OWNER_BITS;
/// GPUs one table holds.
pub const GPU_LIMIT: usize = 1 << 20;

const OWNER_BITS: u32 = 16;
const TAG_BITS: u32 = 2;
const OWNER_MASK: u64 = (1 << OWNER_BITS) - 1;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
const VERSION_SHIFT: u32 = OWNER_BITS + TAG_BITS;

const TAG_FREE: u64 = 0;
const TAG_CLAIMED: u64 = 1;
const TAG_RESERVED: u64 = 2;
const TAG_OFFLINE: u64 = 3;

/// A waiter slot with no candidate posted.
const NO_WAITER: u64 = u64::MAX;

/// Retries of a contended CAS before a claim gives up on one GPU and moves on.
const CAS_RETRY_LIMIT: u32 = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    version: u64,
    tag: u64,
    owner: u16,
}

impl State {
    fn unpack(word: u64) -> State {
        State {
            version: word >> VERSION_SHIFT,
            tag: (word >> OWNER_BITS) & TAG_MASK,
            owner: (word & OWNER_MASK) as u16,
        }
    }

    /// The state after this one, with a new tag and owner.
    fn next(self, tag: u64, owner: u16) -> u64 {
        let version = (self.version + 1) & (u64::MAX >> VERSION_SHIFT);
        (version << VERSION_SHIFT) | (tag << OWNER_BITS) | u64::from(owner)
    }
}

#[derive(Debug)]
struct Gpu {
    state: AtomicU64,
    free_at_ns: AtomicU64,
}

/// The right to plan on one GPU, from a successful claim until `release` or `cancel`.
/// Not `Clone`: one claim, one release.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a claimed GPU stays claimed until it is released or cancelled"]
pub struct Claim {
    gpu: u32,
    shard: u16,
    /// The state word the claim installed.
    word: u64,
    free_at_ns: u64,
}

impl Claim {
    pub fn gpu(&self) -> u32 {
        self.gpu
    }

    /// When the GPU's previous plan ends: the new plan may start no earlier.
    pub fn free_at_ns(&self) -> u64 {
        self.free_at_ns
    }
}

/// The shared table of GPUs and waiting candidates.
#[derive(Debug)]
pub struct GpuTable {
    gpus: Box<[Gpu]>,
    /// Per shard: the `invalid_after_ns` of its most urgent waiting candidate, or `NO_WAITER`.
    waiters: Box<[AtomicU64]>,
    /// GPUs not OFFLINE (for planning: the saturation measure divides by it).
    online: AtomicU64,
    /// Bumped by every change a [`TableView`] must see (module doc), on a line of its own.
    changes: Padded,
}

/// An atomic alone on its cache line (the GPU words beside it are read by every shard).
#[derive(Debug)]
#[repr(align(128))]
struct Padded(AtomicU64);

/// One shard's last look at the table: which GPUs are open to it (free, or reserved for it)
/// and when each frees, as a tree of minimums over the GPUs' `free_at`, so the earliest
/// `free_at` and the claims of the lowest-index and earliest-free grants are answered in
/// O(log n) instead of a scan of every GPU. The view rescans the table only when its
/// `changes` moved past what this shard did itself: a change of its own (a release, a
/// cancel) updates one leaf when nobody else changed the table since the view was current.
/// A snapshot either way: a claim re-checks the GPU, and a claim that finds it taken rescans.
///
/// GPUs of several speed classes (`set_classes`) get a tree each, so a class's earliest
/// `free_at` and claims are as cheap; the answers for all GPUs combine the classes' trees.
#[derive(Debug)]
pub struct TableView {
    /// The table's `changes` the trees are current with (`u64::MAX`: never, or out of date).
    seen: std::cell::Cell<u64>,
    /// One tree per class, each `2 * size` nodes: leaves at `[size, size + gpus)` hold a
    /// GPU's `free_at` while it is open to this shard and in that class, `u64::MAX` while
    /// it is not (claimed, reserved for another shard, offline, another class, or no GPU);
    /// node `i` holds the minimum of nodes `2i` and `2i + 1`.
    tree: std::cell::RefCell<Vec<u64>>,
    /// Per class, the earliest `free_at` of any online GPU when the trees were built: the
    /// answer when none is open (every one claimed or reserved for another shard).
    online_min_ns: std::cell::RefCell<Vec<u64>>,
    /// Per class, the online GPUs when the trees were built.
    online_counts: std::cell::RefCell<Vec<u32>>,
    /// Each GPU's class (empty: every GPU in class 0), and how many classes there are.
    class_of: Vec<u8>,
    class_count: usize,
}

impl Default for TableView {
    fn default() -> TableView {
        TableView {
            seen: std::cell::Cell::new(u64::MAX),
            tree: std::cell::RefCell::new(Vec::new()),
            online_min_ns: std::cell::RefCell::new(vec![CLOSED]),
            online_counts: std::cell::RefCell::new(vec![0]),
            class_of: Vec::new(),
            class_count: 1,
        }
    }
}

/// A leaf of a GPU that is not open to the viewing shard.
const CLOSED: u64 = u64::MAX;

impl TableView {
    /// Sorts the GPUs into `class_count` classes by `class_of` (one entry per GPU of the
    /// table; empty: one class). The next look rebuilds the trees.
    pub fn set_classes(&mut self, class_of: Vec<u8>, class_count: usize) {
        assert!(class_count >= 1);
        assert!(
            class_of.iter().all(|&c| (c as usize) < class_count),
            "a class past the count"
        );
        self.class_of = class_of;
        self.class_count = class_count;
        self.seen.set(u64::MAX);
    }

    /// GPU `gpu`'s class.
    pub fn class_of(&self, gpu: u32) -> usize {
        self.class_of.get(gpu as usize).map_or(0, |&c| c as usize)
    }

    /// `table.min_free_at_ns(shard)`: the earliest `free_at` of the GPUs open to `shard`, or
    /// with none open, of any online GPU, as of the trees.
    pub fn min_free_at_ns(&self, table: &GpuTable, shard: u16) -> u64 {
        self.sync(table, shard);
        let open = match self.class_count {
            1 => self.root(0),
            classes => (0..classes).map(|c| self.root(c)).min().unwrap_or(CLOSED),
        };
        match open {
            CLOSED => self.online_min_ns.borrow().iter().copied().min().unwrap_or(CLOSED),
            open => open,
        }
    }

    /// As [`TableView::min_free_at_ns`], among the GPUs of `class`.
    pub fn min_free_at_in(&self, table: &GpuTable, shard: u16, class: usize) -> u64 {
        self.sync(table, shard);
        match self.root(class) {
            CLOSED => self.online_min_ns.borrow().get(class).copied().unwrap_or(CLOSED),
            open => open,
        }
    }

    /// The online GPUs of `class`, as of the trees.
    pub fn online_in(&self, table: &GpuTable, shard: u16, class: usize) -> u32 {
        self.sync(table, shard);
        self.online_counts.borrow().get(class).copied().unwrap_or(0)
    }

    /// `table.claim(shard, exec_at_ns, policy)`, picked from the trees for the lowest-index
    /// and earliest-free grants (the same GPU a scan would pick); the best fit scans.
    pub fn claim(&self, table: &GpuTable, shard: u16, exec_at_ns: u64, policy: GrantPolicy) -> Option<Claim> {
        if policy == GrantPolicy::BestFit {
            return table.claim(shard, exec_at_ns, policy);
        }
        for _ in 0..2 {
            self.sync(table, shard);
            let gpu = self.pick(exec_at_ns, policy)?;
            if let Some(claim) = self.try_claim(table, shard, gpu, exec_at_ns) {
                return Some(claim);
            }
        }
        table.claim(shard, exec_at_ns, policy)
    }

    /// As [`TableView::claim`], among the GPUs of `class`.
    pub fn claim_in(
        &self,
        table: &GpuTable,
        shard: u16,
        class: usize,
        exec_at_ns: u64,
        policy: GrantPolicy,
    ) -> Option<Claim> {
        if policy != GrantPolicy::BestFit {
            for _ in 0..2 {
                self.sync(table, shard);
                let gpu = self.pick_in(class, exec_at_ns, policy)?;
                if let Some(claim) = self.try_claim(table, shard, gpu, exec_at_ns) {
                    return Some(claim);
                }
            }
        }
        table.claim_among(shard, exec_at_ns, policy, |gpu| self.class_of(gpu) == class)
    }

    /// Claims `gpu` as picked from the trees, closing its leaf; when it was taken since the
    /// view was current (a claim or a reservation of another shard does not bump
    /// `changes`), the next look rebuilds.
    fn try_claim(&self, table: &GpuTable, shard: u16, gpu: u32, exec_at_ns: u64) -> Option<Claim> {
        let claim = table.try_claim(shard, gpu, exec_at_ns);
        match claim {
            Some(_) => self.set(gpu, CLOSED),
            None => self.seen.set(u64::MAX),
        }
        claim
    }

    /// `table.release(claim, finish_ns)`, with the view kept current.
    pub fn release(&self, table: &GpuTable, shard: u16, claim: Claim, finish_ns: u64) -> Option<u16> {
        let gpu = claim.gpu;
        let freed = table.release_counted(claim, finish_ns);
        self.freed(shard, gpu, finish_ns, freed)
    }

    /// `table.cancel(claim)`, with the view kept current.
    pub fn cancel(&self, table: &GpuTable, shard: u16, claim: Claim) -> Option<u16> {
        let (gpu, free_at_ns) = (claim.gpu, claim.free_at_ns);
        let freed = table.cancel_counted(claim);
        self.freed(shard, gpu, free_at_ns, freed)
    }

    /// After this shard freed `gpu` from `free_at_ns` (`before`: the `changes` its bump
    /// replaced): if nobody else changed the table since the view was current and the GPU
    /// stays open to this shard, only its leaf changed. (Handed to another shard's waiting
    /// candidate, it is closed to this one: the next look rebuilds, as after any change of
    /// another shard's.)
    fn freed(&self, shard: u16, gpu: u32, free_at_ns: u64, (before, handed_to): (u64, Option<u16>)) -> Option<u16> {
        if before == self.seen.get() && handed_to.is_none_or(|to| to == shard) {
            self.seen.set(before + 1);
            self.set(gpu, free_at_ns);
        }
        handed_to
    }

    /// Rebuilds the trees from the table if the table changed since they were current.
    fn sync(&self, table: &GpuTable, shard: u16) {
        let changes = table.changes.0.load(Ordering::Acquire);
        if self.seen.get() == changes {
            return;
        }
        let mut tree = self.tree.borrow_mut();
        let size = table.gpus.len().next_power_of_two();
        tree.clear();
        tree.resize(self.class_count * 2 * size, CLOSED);
        let mut online_min_ns = self.online_min_ns.borrow_mut();
        online_min_ns.clear();
        online_min_ns.resize(self.class_count, CLOSED);
        let mut online_counts = self.online_counts.borrow_mut();
        online_counts.clear();
        online_counts.resize(self.class_count, 0);
        for (index, gpu) in table.gpus.iter().enumerate() {
            let state = State::unpack(gpu.state.load(Ordering::Acquire));
            if state.tag == TAG_OFFLINE {
                continue;
            }
            let class = self.class_of(index as u32);
            let free_at_ns = gpu.free_at_ns.load(Ordering::Relaxed);
            online_min_ns[class] = online_min_ns[class].min(free_at_ns);
            online_counts[class] += 1;
            if state.tag == TAG_FREE || (state.tag == TAG_RESERVED && state.owner == shard) {
                tree[class * 2 * size + size + index] = free_at_ns;
            }
        }
        for class_tree in tree.chunks_exact_mut(2 * size) {
            for node in (1..size).rev() {
                class_tree[node] = class_tree[2 * node].min(class_tree[2 * node + 1]);
            }
        }
        self.seen.set(changes);
    }

    /// The tree of `class` (empty when the trees were never built).
    fn class_tree(tree: &[u64], class_count: usize, class: usize) -> &[u64] {
        let len = tree.len() / class_count;
        tree.get(class * len..(class + 1) * len).unwrap_or(&[])
    }

    /// The root of `class`'s tree: the earliest `free_at` of its GPUs open to this shard.
    fn root(&self, class: usize) -> u64 {
        let tree = self.tree.borrow();
        Self::class_tree(&tree, self.class_count, class)
            .get(1)
            .copied()
            .unwrap_or(CLOSED)
    }

    /// Sets a GPU's leaf and the minimums above it (nothing when the trees were never built).
    fn set(&self, gpu: u32, free_at_ns: u64) {
        let mut tree = self.tree.borrow_mut();
        let len = tree.len() / self.class_count;
        let size = len / 2;
        if gpu as usize >= size {
            return;
        }
        let class = self.class_of(gpu);
        let tree = &mut tree[class * len..(class + 1) * len];
        let mut node = size + gpu as usize;
        tree[node] = free_at_ns;
        while node > 1 {
            node /= 2;
            let min = tree[2 * node].min(tree[2 * node + 1]);
            if tree[node] == min {
                break;
            }
            tree[node] = min;
        }
    }

    /// The GPU the grant takes among the open ones free by `exec_at_ns`: the lowest index or
    /// the earliest free (ties: the lowest index), over every class.
    fn pick(&self, exec_at_ns: u64, policy: GrantPolicy) -> Option<u32> {
        if self.class_count == 1 {
            return self.pick_in(0, exec_at_ns, policy);
        }
        let picks = (0..self.class_count).filter_map(|c| self.pick_in(c, exec_at_ns, policy));
        match policy {
            GrantPolicy::EarliestFree => {
                let tree = self.tree.borrow();
                let size = tree.len() / self.class_count / 2;
                picks.min_by_key(|&gpu| {
                    let class_tree = Self::class_tree(&tree, self.class_count, self.class_of(gpu));
                    (class_tree[size + gpu as usize], gpu)
                })
            }
            _ => picks.min(),
        }
    }

    /// [`TableView::pick`] among the GPUs of `class`: the leftmost qualifying leaf, or the
    /// leftmost minimum.
    fn pick_in(&self, class: usize, exec_at_ns: u64, policy: GrantPolicy) -> Option<u32> {
        let tree = self.tree.borrow();
        let tree = Self::class_tree(&tree, self.class_count, class);
        let size = tree.len() / 2;
        if size == 0 || tree[1] > exec_at_ns {
            return None;
        }
        let mut node = 1;
        while node < size {
            let left = 2 * node;
            node = match policy {
                GrantPolicy::LowestIndex if tree[left] <= exec_at_ns => left,
                GrantPolicy::EarliestFree if tree[left] <= tree[left + 1] => left,
                _ => left + 1,
            };
        }
        Some((node - size) as u32)
    }
}

impl GpuTable {
    /// `gpu_count` GPUs, all online and free.
    pub fn new(gpu_count: usize, shard_count: usize) -> GpuTable {
        GpuTable::with_offline(gpu_count, 0, shard_count)
    }

    /// `online` GPUs free now, then `offline` slots for GPUs that come later (`set_online`).
    pub fn with_offline(online: usize, offline: usize, shard_count: usize) -> GpuTable {
        let gpu_count = online + offline;
        assert!(gpu_count > 0 && gpu_count <= GPU_LIMIT);
        assert!(shard_count > 0 && shard_count <= SHARD_LIMIT);
        let offline_word = State::unpack(0).next(TAG_OFFLINE, 0);
        GpuTable {
            gpus: (0..gpu_count)
                .map(|index| Gpu {
                    state: AtomicU64::new(if index < online { 0 } else { offline_word }),
                    free_at_ns: AtomicU64::new(0),
                })
                .collect(),
            waiters: (0..shard_count).map(|_| AtomicU64::new(NO_WAITER)).collect(),
            online: AtomicU64::new(online as u64),
            changes: Padded(AtomicU64::new(0)),
        }
    }

    /// Tells every [`TableView`] to rescan. Called after the state store of a change and
    /// before the hand-off's fence (module doc).
    fn changed(&self) -> u64 {
        self.changes.0.fetch_add(1, Ordering::AcqRel)
    }

    /// Slots in the table, online or not.
    pub fn gpu_count(&self) -> usize {
        self.gpus.len()
    }

    /// GPUs online now.
    pub fn online_count(&self) -> usize {
        self.online.load(Ordering::Relaxed) as usize
    }

    pub fn is_online(&self, gpu: u32) -> bool {
        State::unpack(self.gpus[gpu as usize].state.load(Ordering::Acquire)).tag != TAG_OFFLINE
    }

    /// Takes `gpu` out of planning (its executor is gone). Returns false if it was offline
    /// already. Spins while another shard holds a claim on it (claims last one event).
    pub fn set_offline(&self, gpu: u32) -> bool {
        let slot = &self.gpus[gpu as usize];
        loop {
            let word = slot.state.load(Ordering::Acquire);
            let state = State::unpack(word);
            match state.tag {
                TAG_OFFLINE => return false,
                TAG_CLAIMED => {
                    spin_wait();
                    continue;
                }
                _ => {}
            }
            let offline = state.next(TAG_OFFLINE, 0);
            if slot
                .state
                .compare_exchange(word, offline, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.online.fetch_sub(1, Ordering::Relaxed);
                self.changed();
                return true;
            }
        }
    }

    /// Brings `gpu` into planning, free from `free_at_ns` (a GPU online already is left as it
    /// is). Returns the shard it was handed off to, if any: the caller tells it.
    pub fn set_online(&self, gpu: u32, free_at_ns: u64) -> Option<u16> {
        let slot = &self.gpus[gpu as usize];
        let word = slot.state.load(Ordering::Acquire);
        let state = State::unpack(word);
        if state.tag != TAG_OFFLINE {
            return None;
        }
        // Only the registering shard brings an OFFLINE slot online: nobody else writes it.
        slot.free_at_ns.store(free_at_ns, Ordering::Relaxed);
        let freed = state.next(TAG_FREE, 0);
        if slot
            .state
            .compare_exchange(word, freed, Ordering::Release, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        self.online.fetch_add(1, Ordering::Relaxed);
        self.changed();
        self.hand_off(gpu)
    }

    /// A snapshot of when `gpu` frees (planning input; a claim re-checks it).
    pub fn free_at_ns(&self, gpu: u32) -> u64 {
        self.gpus[gpu as usize].free_at_ns.load(Ordering::Acquire)
    }

    /// The earliest `free_at` among GPUs `shard` could claim now (free, or reserved for it);
    /// when every online GPU is claimed or reserved for another shard, the earliest `free_at`
    /// of any online GPU (a planning estimate: the claim will wait for a hand-off);
    /// `u64::MAX` when no GPU is online (nothing can be planned).
    pub fn min_free_at_ns(&self, shard: u16) -> u64 {
        let mut open = u64::MAX;
        let mut online = u64::MAX;
        for gpu in self.gpus.iter() {
            let state = State::unpack(gpu.state.load(Ordering::Acquire));
            if state.tag == TAG_OFFLINE {
                continue;
            }
            let free_at_ns = gpu.free_at_ns.load(Ordering::Relaxed);
            online = online.min(free_at_ns);
            if state.tag == TAG_FREE || (state.tag == TAG_RESERVED && state.owner == shard) {
                open = open.min(free_at_ns);
            }
        }
        if open == u64::MAX {
            online
        } else {
            open
        }
    }

    /// Claims a GPU with `free_at <= exec_at_ns` for `shard`, chosen by `policy` among those
    /// free or reserved for this shard. `None` when none qualifies right now.
    pub fn claim(&self, shard: u16, exec_at_ns: u64, policy: GrantPolicy) -> Option<Claim> {
        self.claim_among(shard, exec_at_ns, policy, |_| true)
    }

    /// As [`GpuTable::claim`], among the GPUs `among` accepts (a speed class).
    pub fn claim_among(
        &self,
        shard: u16,
        exec_at_ns: u64,
        policy: GrantPolicy,
        among: impl Fn(u32) -> bool,
    ) -> Option<Claim> {
        match policy {
            GrantPolicy::LowestIndex => (0..self.gpus.len() as u32)
                .filter(|&gpu| among(gpu))
                .find_map(|gpu| self.try_claim(shard, gpu, exec_at_ns)),
            GrantPolicy::EarliestFree | GrantPolicy::BestFit => {
                // Pick by a snapshot, then claim; if another shard won the race, pick again.
                for _ in 0..CAS_RETRY_LIMIT {
                    let gpu = self.pick_by_free_at(shard, exec_at_ns, policy, &among)?;
                    if let Some(claim) = self.try_claim(shard, gpu, exec_at_ns) {
                        return Some(claim);
                    }
                }
                None
            }
        }
    }

    fn pick_by_free_at(
        &self,
        shard: u16,
        exec_at_ns: u64,
        policy: GrantPolicy,
        among: &impl Fn(u32) -> bool,
    ) -> Option<u32> {
        let open = self.gpus.iter().enumerate().filter_map(|(index, gpu)| {
            let state = State::unpack(gpu.state.load(Ordering::Acquire));
            let open = state.tag == TAG_FREE || (state.tag == TAG_RESERVED && state.owner == shard);
            (open && among(index as u32)).then(|| (index as u32, gpu.free_at_ns.load(Ordering::Relaxed)))
        });
        // The one grant selection, the single-owner pool's too.
        symphony_core::gpu_pool::pick(open, exec_at_ns, policy)
    }

    /// Claims `gpu` for `shard` if it is free (or reserved for `shard`) and frees by
    /// `exec_at_ns`.
    pub fn try_claim(&self, shard: u16, gpu: u32, exec_at_ns: u64) -> Option<Claim> {
        let slot = &self.gpus[gpu as usize];
        let mut word = slot.state.load(Ordering::Acquire);
        for _ in 0..CAS_RETRY_LIMIT {
            let state = State::unpack(word);
            let open = state.tag == TAG_FREE || (state.tag == TAG_RESERVED && state.owner == shard);
            if !open {
                return None;
            }
            // Relaxed: the Acquire load of `word` saw the Release that published this value,
            // and the CAS below succeeds only if `word` is still current.
            let free_at_ns = slot.free_at_ns.load(Ordering::Relaxed);
            if free_at_ns > exec_at_ns {
                return None;
            }
            let claimed = state.next(TAG_CLAIMED, shard);
            match slot
                .state
                .compare_exchange(word, claimed, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return Some(Claim {
                        gpu,
                        shard,
                        word: claimed,
                        free_at_ns,
                    })
                }
                Err(current) => word = current,
            }
        }
        None
    }

    /// Ends `claim`: the GPU runs the claimer's plan until `finish_ns` and is free again for
    /// planning from then on. Returns the shard the GPU was handed off to, if any: the caller
    /// must tell it.
    pub fn release(&self, claim: Claim, finish_ns: u64) -> Option<u16> {
        self.release_counted(claim, finish_ns).1
    }

    /// [`GpuTable::release`], with the value of `changes` its bump replaced (see `free`).
    fn release_counted(&self, claim: Claim, finish_ns: u64) -> (u64, Option<u16>) {
        assert!(
            finish_ns >= claim.free_at_ns,
            "a plan on GPU {} ends at {finish_ns}, before the previous one ({})",
            claim.gpu,
            claim.free_at_ns
        );
        self.free(claim, finish_ns)
    }

    /// Ends `claim` without a plan: the GPU keeps its `free_at`.
    pub fn cancel(&self, claim: Claim) -> Option<u16> {
        self.cancel_counted(claim).1
    }

    /// [`GpuTable::cancel`], with the value of `changes` its bump replaced (see `free`).
    fn cancel_counted(&self, claim: Claim) -> (u64, Option<u16>) {
        let free_at_ns = claim.free_at_ns;
        self.free(claim, free_at_ns)
    }

    /// Frees a claimed GPU from `free_at_ns` and hands it off; returns the value of
    /// `changes` its bump replaced (a view that was current with it is current again after
    /// this one change) and the shard it was handed to.
    fn free(&self, claim: Claim, free_at_ns: u64) -> (u64, Option<u16>) {
        let slot = &self.gpus[claim.gpu as usize];
        let word = slot.state.load(Ordering::Relaxed);
        assert_eq!(word, claim.word, "only the claimer changes a claimed GPU");
        slot.free_at_ns.store(free_at_ns, Ordering::Relaxed);
        let freed = State::unpack(word).next(TAG_FREE, 0);
        slot.state.store(freed, Ordering::Release);
        let before = self.changed();
        (before, self.hand_off(claim.gpu))
    }

    /// Gives up a reservation made for `shard` (its candidate no longer waits): the GPU is
    /// free again and is handed to the next waiter, whose shard is returned.
    pub fn decline(&self, shard: u16, gpu: u32) -> Option<u16> {
        let slot = &self.gpus[gpu as usize];
        let word = slot.state.load(Ordering::Acquire);
        let state = State::unpack(word);
        if state.tag != TAG_RESERVED || state.owner != shard {
            return None;
        }
        let freed = state.next(TAG_FREE, 0);
        if slot
            .state
            .compare_exchange(word, freed, Ordering::Release, Ordering::Relaxed)
            .is_err()
        {
            return None;
        }
        self.changed();
        self.hand_off(gpu)
    }

    /// Step 3: posts `shard`'s most urgent waiting candidate and fences, so that the caller's
    /// next look at the GPUs (`min_free_at_ns`, then a claim) sees every GPU freed before a
    /// release could have missed the post.
    pub fn post_waiter(&self, shard: u16, invalid_after_ns: u64) {
        assert!(invalid_after_ns != NO_WAITER);
        self.waiters[shard as usize].store(invalid_after_ns, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Withdraws `shard`'s waiting candidate.
    pub fn clear_waiter(&self, shard: u16) {
        self.waiters[shard as usize].store(NO_WAITER, Ordering::Relaxed);
    }

    /// The GPU reserved for `shard`, if any (for a shard that was not told, or lost the
    /// message).
    pub fn reservation_of(&self, shard: u16) -> Option<u32> {
        self.gpus
            .iter()
            .position(|gpu| {
                let state = State::unpack(gpu.state.load(Ordering::Acquire));
                state.tag == TAG_RESERVED && state.owner == shard
            })
            .map(|index| index as u32)
    }

    /// Step 4: reserves the freed `gpu` for the posted waiter with the smallest
    /// `invalid_after`. Returns that shard; `None` when no one waits or the GPU was claimed.
    fn hand_off(&self, gpu: u32) -> Option<u16> {
        let slot = &self.gpus[gpu as usize];
        for _ in 0..CAS_RETRY_LIMIT {
            // The releaser's half of the Dekker pair with `post_waiter` (module doc): the
            // store that freed the GPU, and the bump of `changes`, are ordered before the
            // loads of the waiter slots.
            fence(Ordering::SeqCst);
            let (shard, _) = self
                .waiters
                .iter()
                .enumerate()
                .map(|(shard, waiter)| (shard as u16, waiter.load(Ordering::Relaxed)))
                .filter(|&(_, invalid_after_ns)| invalid_after_ns != NO_WAITER)
                .min_by_key(|&(shard, invalid_after_ns)| (invalid_after_ns, shard))?;
            let word = slot.state.load(Ordering::Acquire);
            let state = State::unpack(word);
            if state.tag != TAG_FREE {
                // Claimed (its release hands off again) or already reserved.
                return None;
            }
            let reserved = state.next(TAG_RESERVED, shard);
            if slot
                .state
                .compare_exchange(word, reserved, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                // The waiter is served: its slot is cleared by the shard when it claims. No
                // bump: a reservation closes the GPU to the other shards only (see `changes`).
                return Some(shard);
            }
        }
        None
    }
}
