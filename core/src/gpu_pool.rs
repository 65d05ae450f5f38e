//! Where a policy's GPUs come from ([`GpuSource`]), and the single-threaded source: the GPU
//! pool of one scheduler, each GPU's `free_at` and the grant policies.
//!
//! This is the view a policy plans with: when each GPU's last planned batch ends. The service
//! shares the same facts across shards in a lock-free table (`symphony-shards::sync`), which
//! implements [`GpuSource`] too, so the deferred scheduler runs unchanged over either.

use crate::names::knob_names;

/// Which of the qualifying GPUs a grant takes (section 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantPolicy {
    LowestIndex,
    EarliestFree,
    BestFit,
}

knob_names!(
    GrantPolicy,
    "GPU grant policy",
    LowestIndex = "lowest-index",
    EarliestFree = "earliest-free",
    BestFit = "best-fit"
);

/// A GPU claimed for one plan: the plan may start no earlier than `free_at_ns`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuClaim {
    pub gpu: u32,
    pub free_at_ns: u64,
}

/// The GPUs a policy plans on. A claim is ended by exactly one `release` (with the plan's
/// finish) or `cancel` (no plan).
pub trait GpuSource: std::fmt::Debug {
    /// GPUs plans can go to now (online; at least 1: policies divide by it).
    fn gpu_count(&self) -> u32;
    /// The earliest time any GPU is free (a snapshot: a claim may still fail).
    fn min_free_at_ns(&self) -> u64;
    /// Claims a GPU with `free_at <= exec_at_ns`, chosen by `policy`; `None` when none
    /// qualifies (or, shared, another claimer was faster).
    fn claim(&mut self, exec_at_ns: u64, policy: GrantPolicy) -> Option<GpuClaim>;
    fn release(&mut self, claim: GpuClaim, finish_ns: u64);
    fn cancel(&mut self, claim: GpuClaim);
    /// Brings `gpu` into planning, free from `free_at_ns` (`Some`), or takes it out
    /// (`None`: no claim takes it until it is brought back). Returns false where the source
    /// does not change its GPUs this way (the service's table follows its executors instead).
    fn set_available(&mut self, gpu: u32, free_at_ns: Option<u64>) -> bool {
        let _ = (gpu, free_at_ns);
        false
    }
    /// The GPUs' speed classes, each a time factor against the profile (1: as profiled, 2:
    /// twice as slow), in class order. One class of factor 1 unless the source says more.
    fn class_factors(&self) -> &[f64] {
        &[1.0]
    }
    /// The class of `gpu` (an index into [`GpuSource::class_factors`]).
    fn class_of(&self, gpu: u32) -> usize {
        let _ = gpu;
        0
    }
    /// The earliest time an online GPU of `class` is free.
    fn min_free_at_in(&self, class: usize) -> u64 {
        let _ = class;
        self.min_free_at_ns()
    }
    /// Claims a GPU of `class` with `free_at <= exec_at_ns`.
    fn claim_in(&mut self, class: usize, exec_at_ns: u64, policy: GrantPolicy) -> Option<GpuClaim> {
        let _ = class;
        self.claim(exec_at_ns, policy)
    }
    /// What the online GPUs can do, in GPUs of factor 1 (the sum of `1 / factor`).
    fn capacity(&self) -> f64 {
        f64::from(self.gpu_count())
    }
}

/// A GPU slot out of planning: its `free_at` never comes.
const OFFLINE: u64 = u64::MAX;

#[derive(Debug, Clone)]
pub struct GpuPool {
    free_at_ns: Vec<u64>,
    min_free_at_ns: u64,
    online: u32,
    /// Distinct time factors (class order) and each GPU's class; one class of 1 by default.
    factors: Vec<f64>,
    class: Vec<u8>,
}

impl GpuPool {
    /// `gpu_count` GPUs, all online and free.
    pub fn new(gpu_count: u32) -> GpuPool {
        assert!(gpu_count > 0);
        GpuPool {
            free_at_ns: vec![0; gpu_count as usize],
            min_free_at_ns: 0,
            online: gpu_count,
            factors: vec![1.0],
            class: vec![0; gpu_count as usize],
        }
    }

    /// One GPU per entry of `factors` (its time against the profile: 2 is twice as slow);
    /// GPUs of equal factors form a class, classes in the order they first appear. Empty:
    /// `gpu_count` GPUs of factor 1.
    pub fn with_factors(gpu_count: u32, factors: &[f64]) -> GpuPool {
        let mut pool = GpuPool::new(gpu_count);
        if factors.is_empty() {
            return pool;
        }
        assert_eq!(factors.len(), gpu_count as usize, "a factor per GPU");
        pool.factors.clear();
        for (gpu, &factor) in factors.iter().enumerate() {
            assert!(factor.is_finite() && factor > 0.0, "GPU {gpu}: factor {factor}");
            let class = match pool.factors.iter().position(|&f| f == factor) {
                Some(class) => class,
                None => {
                    pool.factors.push(factor);
                    pool.factors.len() - 1
                }
            };
            assert!(class < 256, "at most 256 GPU classes");
            pool.class[gpu] = class as u8;
        }
        pool
    }

    /// GPU `gpu`'s time factor against the profile.
    pub fn factor(&self, gpu: u32) -> f64 {
        self.factors[self.class[gpu as usize] as usize]
    }

    /// GPU slots, online or not.
    pub fn slots(&self) -> u32 {
        self.free_at_ns.len() as u32
    }

    /// GPUs online now.
    pub fn online_count(&self) -> u32 {
        self.online
    }

    pub fn is_online(&self, gpu: u32) -> bool {
        self.free_at_ns[gpu as usize] != OFFLINE
    }

    /// Takes `gpu` out of planning (an autoscaler let it go): no grant picks it. A plan
    /// granted on it before still runs. Returns false if it was offline already.
    pub fn set_offline(&mut self, gpu: u32) -> bool {
        if !self.is_online(gpu) {
            return false;
        }
        self.free_at_ns[gpu as usize] = OFFLINE;
        self.online -= 1;
        self.min_free_at_ns = self.free_at_ns.iter().copied().min().expect("gpus > 0");
        true
    }

    /// Brings `gpu` into planning, free from `free_at_ns`. Returns false if it was online.
    pub fn set_online(&mut self, gpu: u32, free_at_ns: u64) -> bool {
        if self.is_online(gpu) {
            return false;
        }
        assert!(free_at_ns != OFFLINE);
        self.free_at_ns[gpu as usize] = free_at_ns;
        self.online += 1;
        self.min_free_at_ns = self.min_free_at_ns.min(free_at_ns);
        true
    }

    #[inline]
    pub fn free_at_ns(&self, gpu: u32) -> u64 {
        self.free_at_ns[gpu as usize]
    }

    /// The earliest time any online GPU is free (`u64::MAX` with none online).
    #[inline]
    pub fn min_free_at_ns(&self) -> u64 {
        self.min_free_at_ns
    }

    /// Records that `gpu` is busy until `free_at_ns` (a plan was granted on it).
    #[inline]
    pub fn occupy(&mut self, gpu: u32, free_at_ns: u64) {
        let slot = &mut self.free_at_ns[gpu as usize];
        assert!(*slot != OFFLINE, "no plan is granted on an offline GPU");
        assert!(free_at_ns >= *slot, "plans on one GPU never overlap");
        *slot = free_at_ns;
        self.min_free_at_ns = self.free_at_ns.iter().copied().min().expect("gpus > 0");
    }

    /// The GPU a grant for a batch starting at `exec_at_ns` takes: one with
    /// `free_at <= exec_at`, chosen by `policy`; `None` when no GPU qualifies.
    #[inline]
    pub fn pick(&self, exec_at_ns: u64, policy: GrantPolicy) -> Option<u32> {
        pick(
            self.free_at_ns.iter().enumerate().map(|(i, &f)| (i as u32, f)),
            exec_at_ns,
            policy,
        )
    }
}

/// The grant selection (section 6), for the single-owner pool and the shared table alike:
/// among `gpus` (`(index, free_at)`, in index order) free by `exec_at_ns`, the lowest index,
/// the earliest free (ties: lowest index), or the best fit, the latest free (ties: lowest
/// index).
pub fn pick(gpus: impl Iterator<Item = (u32, u64)>, exec_at_ns: u64, policy: GrantPolicy) -> Option<u32> {
    let mut qualifying = gpus.filter(|&(_, free_at_ns)| free_at_ns <= exec_at_ns);
    let picked = match policy {
        GrantPolicy::LowestIndex => qualifying.next(),
        GrantPolicy::EarliestFree => qualifying.min_by_key(|&(i, f)| (f, i)),
        GrantPolicy::BestFit => qualifying.max_by_key(|&(i, f)| (f, std::cmp::Reverse(i))),
    };
    picked.map(|(i, _)| i)
}

impl GpuSource for GpuPool {
    fn gpu_count(&self) -> u32 {
        self.online.max(1)
    }

    fn min_free_at_ns(&self) -> u64 {
        self.min_free_at_ns
    }

    fn claim(&mut self, exec_at_ns: u64, policy: GrantPolicy) -> Option<GpuClaim> {
        let gpu = self.pick(exec_at_ns, policy)?;
        Some(GpuClaim {
            gpu,
            free_at_ns: self.free_at_ns(gpu),
        })
    }

    fn release(&mut self, claim: GpuClaim, finish_ns: u64) {
        self.occupy(claim.gpu, finish_ns);
    }

    fn cancel(&mut self, _claim: GpuClaim) {
        // Single owner: a claim reserved nothing.
    }

    fn class_factors(&self) -> &[f64] {
        &self.factors
    }

    fn class_of(&self, gpu: u32) -> usize {
        self.class[gpu as usize] as usize
    }

    fn min_free_at_in(&self, class: usize) -> u64 {
        if self.factors.len() == 1 {
            return self.min_free_at_ns;
        }
        self.free_at_ns
            .iter()
            .zip(&self.class)
            .filter(|&(_, &c)| c as usize == class)
            .map(|(&f, _)| f)
            .min()
            .unwrap_or(OFFLINE)
    }

    fn claim_in(&mut self, class: usize, exec_at_ns: u64, policy: GrantPolicy) -> Option<GpuClaim> {
        if self.factors.len() == 1 {
            return self.claim(exec_at_ns, policy);
        }
        let gpu = pick(
            self.free_at_ns
                .iter()
                .zip(&self.class)
                .enumerate()
                .filter(|&(_, (_, &c))| c as usize == class)
                .map(|(i, (&f, _))| (i as u32, f)),
            exec_at_ns,
            policy,
        )?;
        Some(GpuClaim {
            gpu,
            free_at_ns: self.free_at_ns(gpu),
        })
    }

    fn capacity(&self) -> f64 {
        if self.factors.len() == 1 {
            return f64::from(self.online.max(1)) / self.factors[0];
        }
        let capacity: f64 = (0..self.slots())
            .filter(|&g| self.is_online(g))
            .map(|g| 1.0 / self.factor(g))
            .sum();
        capacity.max(1e-9)
    }

    fn set_available(&mut self, gpu: u32, free_at_ns: Option<u64>) -> bool {
        match free_at_ns {
            Some(free_at_ns) => {
                self.set_online(gpu, free_at_ns);
            }
            None => {
                self.set_offline(gpu);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grant_policies_pick_as_specified() {
        let mut pool = GpuPool::new(4);
        pool.occupy(0, 50);
        pool.occupy(1, 10);
        pool.occupy(2, 30);
        pool.occupy(3, 90);
        assert_eq!(pool.min_free_at_ns(), 10);
        // Qualifying for exec_at 40: GPUs 1 (10) and 2 (30).
        assert_eq!(pool.pick(40, GrantPolicy::LowestIndex), Some(1));
        assert_eq!(pool.pick(40, GrantPolicy::EarliestFree), Some(1));
        assert_eq!(pool.pick(40, GrantPolicy::BestFit), Some(2));
        assert_eq!(pool.pick(60, GrantPolicy::LowestIndex), Some(0));
        assert_eq!(pool.pick(5, GrantPolicy::LowestIndex), None);
    }

    #[test]
    fn classes_pick_their_own_gpus() {
        let mut pool = GpuPool::with_factors(4, &[1.0, 2.0, 1.0, 2.0]);
        assert_eq!(pool.class_factors(), &[1.0, 2.0]);
        assert_eq!((pool.class_of(1), pool.class_of(2)), (1, 0));
        pool.occupy(0, 50);
        pool.occupy(2, 70);
        pool.occupy(1, 10);
        assert_eq!(pool.min_free_at_in(0), 50);
        assert_eq!(pool.min_free_at_in(1), 0, "GPU 3 is free");
        assert_eq!(pool.claim_in(0, 60, GrantPolicy::LowestIndex).map(|c| c.gpu), Some(0));
        assert_eq!(pool.claim_in(1, 5, GrantPolicy::LowestIndex).map(|c| c.gpu), Some(3));
        assert_eq!(pool.claim_in(0, 40, GrantPolicy::LowestIndex), None);
        assert!((pool.capacity() - 3.0).abs() < 1e-12, "1 + 1/2 + 1 + 1/2");
        assert_eq!(GpuPool::new(3).capacity(), 3.0);
    }

    #[test]
    fn offline_gpus_are_never_picked_and_come_back_free_when_told() {
        let mut pool = GpuPool::new(3);
        pool.occupy(0, 10);
        pool.occupy(1, 20);
        assert!(pool.set_offline(0));
        assert!(!pool.set_offline(0), "offline already");
        assert_eq!(pool.online_count(), 2);
        assert_eq!(GpuSource::gpu_count(&pool), 2);
        assert_eq!(pool.min_free_at_ns(), 0, "GPU 2 is free");
        assert!(pool.set_offline(2));
        assert_eq!(pool.min_free_at_ns(), 20);
        assert_eq!(pool.pick(1_000, GrantPolicy::LowestIndex), Some(1));
        assert!(pool.set_offline(1));
        assert_eq!(pool.min_free_at_ns(), u64::MAX, "nothing online");
        assert_eq!(pool.pick(u64::MAX - 1, GrantPolicy::EarliestFree), None);
        assert_eq!(GpuSource::gpu_count(&pool), 1, "policies divide by it");
        assert!(pool.set_online(2, 500));
        assert_eq!(pool.pick(499, GrantPolicy::LowestIndex), None);
        assert_eq!(pool.pick(500, GrantPolicy::LowestIndex), Some(2));
        assert_eq!(pool.slots(), 3);
    }
}
