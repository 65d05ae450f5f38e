//! The thin runtime layer over glommio (pinned to `=0.9.0`): one `LocalExecutor` per shard,
//! pinned to a CPU, with its io_uring memory sized to fit under `RLIMIT_MEMLOCK`.
//!
//! glommio locks `io_memory` (registered buffers) and its rings into RAM. Root processes are
//! exempt from the lock limit, but a service must not depend on that: every shard's share is
//! computed from the soft `RLIMIT_MEMLOCK` as if it were enforced, and start-up fails with a
//! clear message when the shards cannot fit.

use std::future::Future;

use glommio::{LocalExecutorBuilder, Placement};

/// The most `io_memory` a shard takes, and the least it can run with.
pub const IO_MEMORY_MAX_BYTES: usize = 2 << 20;
pub const IO_MEMORY_MIN_BYTES: usize = 256 << 10;
/// Entries of each io_uring ring.
pub const RING_DEPTH: usize = 128;
/// What the rings of one executor lock besides `io_memory` (three rings, sqes and cqes; an
/// upper estimate at `RING_DEPTH`).
const RING_LOCKED_BYTES: usize = 3 * RING_DEPTH * (64 + 2 * 16) + (64 << 10);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(
        "RLIMIT_MEMLOCK is {limit_bytes} bytes: {shards} shards need at least {needed_bytes} bytes of locked memory \
         ({} KiB of io_memory each plus their rings); raise the limit (ulimit -l) or use fewer shards (--shards)",
        IO_MEMORY_MIN_BYTES >> 10
    )]
    MemlockTooSmall {
        limit_bytes: u64,
        shards: usize,
        needed_bytes: u64,
    },
    #[error("`cpus` lists no CPU: name at least one of {allowed}, or leave it out for all of them")]
    NoCpus { allowed: String },
    #[error("cpu {cpu} is not one this process may run on (it may run on {allowed})")]
    NoSuchCpu { cpu: usize, allowed: String },
    #[error(
        "RLIMIT_NOFILE is {limit}: {shards} shards need at least {needed} descriptors \
         ({in_use} in use at start, {per_shard} per shard for its runtime and the least connections); \
         raise the limit (ulimit -n) or use fewer shards (--shards)"
    )]
    NoFileTooSmall {
        limit: u64,
        shards: usize,
        needed: u64,
        in_use: u64,
        per_shard: u64,
    },
    #[error("starting shard {shard}: {reason}")]
    Spawn { shard: usize, reason: String },
    #[error("shard {shard} failed: {reason}")]
    Join { shard: usize, reason: String },
}

/// The soft `RLIMIT_MEMLOCK` in bytes (`u64::MAX` when unlimited).
pub fn memlock_limit_bytes() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `getrlimit` writes one `rlimit` through the valid pointer we pass.
    let status = unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) };
    if status != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return u64::MAX;
    }
    limit.rlim_cur
}

/// How each shard's executor is built: `io_memory` and ring depth under the lock limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardMemory {
    pub io_memory_bytes: usize,
    pub ring_depth: usize,
    pub memlock_limit_bytes: u64,
}

/// Splits `memlock_limit_bytes` between `shards` executors.
pub fn shard_memory(shards: usize, memlock_limit_bytes: u64) -> Result<ShardMemory, RuntimeError> {
    assert!(shards > 0);
    let share = memlock_limit_bytes / shards as u64;
    let io_memory = share
        .saturating_sub(RING_LOCKED_BYTES as u64)
        .min(IO_MEMORY_MAX_BYTES as u64) as usize;
    if io_memory < IO_MEMORY_MIN_BYTES {
        return Err(RuntimeError::MemlockTooSmall {
            limit_bytes: memlock_limit_bytes,
            shards,
            needed_bytes: (shards * (IO_MEMORY_MIN_BYTES + RING_LOCKED_BYTES)) as u64,
        });
    }
    Ok(ShardMemory {
        io_memory_bytes: io_memory,
        ring_depth: RING_DEPTH,
        memlock_limit_bytes,
    })
}

/// The machine's CPUs grouped by NUMA node, node by node, as hwloc sees them; `None` when the
/// topology cannot be read.
pub fn numa_cpus() -> Option<Vec<Vec<usize>>> {
    cpus_by_node(&hwlocality::Topology::new().ok()?)
}

/// The CPUs by NUMA node of a synthetic topology in hwloc's description (for example
/// `"node:2 core:4 pu:1"`: two nodes of four single-threaded cores), as placement sees a
/// machine with that shape.
pub fn synthetic_numa_cpus(description: &str) -> Result<Vec<Vec<usize>>, String> {
    let topology = hwlocality::Topology::builder()
        .from_synthetic(description)
        .map_err(|e| format!("synthetic topology `{description}`: {e}"))?
        .build()
        .map_err(|e| format!("synthetic topology `{description}`: {e}"))?;
    cpus_by_node(&topology).ok_or_else(|| format!("synthetic topology `{description}` has no NUMA node with CPUs"))
}

fn cpus_by_node(topology: &hwlocality::Topology) -> Option<Vec<Vec<usize>>> {
    use hwlocality::object::types::ObjectType;
    let nodes: Vec<Vec<usize>> = topology
        .objects_with_type(ObjectType::NUMANode)
        .filter_map(|node| {
            node.cpuset()
                .map(|set| set.iter_set().map(usize::from).collect::<Vec<_>>())
        })
        .filter(|cpus| !cpus.is_empty())
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

/// Where one shard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardPlace {
    pub cpu: usize,
    /// Its NUMA node (its index in hwloc's order), when the topology was read.
    pub node: Option<usize>,
}

/// Places `shards` shards on the `allowed` CPUs one NUMA node before the next (`nodes`:
/// hwloc's CPUs by node), so shards that talk most share a node; past the last CPU they wrap
/// around. Without nodes (or none of their CPUs allowed), the allowed CPUs in order.
pub fn place_shards(shards: usize, nodes: Option<&[Vec<usize>]>, allowed: &[usize]) -> Vec<ShardPlace> {
    let by_node: Vec<ShardPlace> = nodes
        .unwrap_or_default()
        .iter()
        .enumerate()
        .flat_map(|(node, cpus)| {
            cpus.iter()
                .filter(|cpu| allowed.contains(cpu))
                .map(move |&cpu| ShardPlace { cpu, node: Some(node) })
        })
        .collect();
    let order = if by_node.is_empty() {
        allowed.iter().map(|&cpu| ShardPlace { cpu, node: None }).collect()
    } else {
        by_node
    };
    if order.is_empty() {
        return vec![ShardPlace { cpu: 0, node: None }; shards];
    }
    order.iter().copied().cycle().take(shards).collect()
}

/// The CPUs this process may run on (its affinity mask: a container or `taskset` may give
/// it CPUs that are not numbered from 0), in ascending order.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is an empty set; sched_getaffinity writes at most
    // `size_of::<cpu_set_t>()` bytes into it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let status = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if status != 0 {
        let count = std::thread::available_parallelism().map_or(1, |n| n.get());
        return (0..count).collect();
    }
    // SAFETY: CPU_ISSET reads the set we own, for indices below its capacity.
    (0..libc::CPU_SETSIZE as usize)
        .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
        .collect()
}

/// The CPUs shards are pinned to: `cpus` if given (checked against the CPUs this process
/// may run on), else those CPUs one NUMA node before the next (hwloc), so shards that talk
/// most share a node; without a readable topology, the allowed CPUs in order.
pub fn shard_cpus(shards: usize, cpus: Option<&[usize]>) -> Result<Vec<ShardPlace>, RuntimeError> {
    let allowed = allowed_cpus();
    let describe = || allowed.iter().map(usize::to_string).collect::<Vec<_>>().join(",");
    let nodes = numa_cpus();
    let node_of = |cpu: usize| nodes.as_ref()?.iter().position(|n| n.contains(&cpu));
    let chosen: Vec<ShardPlace> = match cpus {
        Some([]) => return Err(RuntimeError::NoCpus { allowed: describe() }),
        Some(list) => list
            .iter()
            .copied()
            .cycle()
            .take(shards)
            .map(|cpu| ShardPlace {
                cpu,
                node: node_of(cpu),
            })
            .collect(),
        None => place_shards(shards, nodes.as_deref(), &allowed),
    };
    for placement in &chosen {
        if !allowed.contains(&placement.cpu) {
            return Err(RuntimeError::NoSuchCpu {
                cpu: placement.cpu,
                allowed: describe(),
            });
        }
    }
    Ok(chosen)
}

/// Descriptors one shard needs besides its connections: its io_uring rings, eventfds and
/// timers, its listeners and zero-copy ring (an upper estimate).
const FDS_PER_SHARD_RUNTIME: u64 = 24;
/// Descriptors kept free for the process (logs, a config file, a profile table).
const FDS_SPARE: u64 = 32;

/// What the descriptor limit allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdBudget {
    /// The soft RLIMIT_NOFILE after start-up raised it to the hard limit.
    pub limit: u64,
    /// The connection caps the shards run with (the configured ones, or lower).
    pub connections_per_shard: usize,
    pub links_per_shard: usize,
    /// Whether the caps were lowered to fit the limit.
    pub lowered: bool,
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and returns the soft limit now.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one valid `rlimit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    if limit.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        limit.rlim_cur
    }
}

/// Descriptors this process has open now.
fn fds_in_use() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(16, |dir| dir.count() as u64)
}

/// Raises the descriptor limit and fits the connection caps under it: every shard's
/// connections on both ports (and the evicted and refused ones still closing) must have a
/// descriptor, so accepting never fails for want of one while the caps hold.
pub fn fd_budget(shards: usize, limits: &crate::config::Limits, links: bool) -> Result<FdBudget, RuntimeError> {
    use crate::server::{CONNECTIONS_CLOSING_LIMIT, LINKS_LEAST};
    let limit = raise_nofile_limit();
    let in_use = fds_in_use();
    let shards_u64 = shards as u64;
    let per_shard_fixed = FDS_PER_SHARD_RUNTIME + CONNECTIONS_CLOSING_LIMIT as u64 * if links { 2 } else { 1 };
    let links_wanted = if links { limits.links_per_shard as u64 } else { 0 };
    let least = 1 + if links { LINKS_LEAST as u64 } else { 0 };
    let reserve = in_use + FDS_SPARE;
    let needed = reserve + shards_u64 * (per_shard_fixed + least);
    if limit < needed {
        return Err(RuntimeError::NoFileTooSmall {
            limit,
            shards,
            needed,
            in_use,
            per_shard: per_shard_fixed + least,
        });
    }
    let per_shard = (limit - reserve) / shards_u64 - per_shard_fixed;
    let wanted = limits.connections_per_shard as u64 + links_wanted;
    if wanted <= per_shard {
        return Ok(FdBudget {
            limit,
            connections_per_shard: limits.connections_per_shard,
            links_per_shard: limits.links_per_shard,
            lowered: false,
        });
    }
    // Scale both caps down in proportion, keeping the least of each.
    let links_cap = if links {
        (links_wanted * per_shard / wanted).max(LINKS_LEAST as u64)
    } else {
        limits.links_per_shard as u64
    };
    let clients_cap = (per_shard - if links { links_cap } else { 0 }).max(1);
    Ok(FdBudget {
        limit,
        connections_per_shard: clients_cap.min(limits.connections_per_shard as u64) as usize,
        links_per_shard: links_cap.min(limits.links_per_shard as u64) as usize,
        lowered: true,
    })
}

/// Starts one pinned executor running `main(shard)`; returns its join handle.
pub fn spawn_shard<F, Fut, T>(
    shard: usize,
    cpu: usize,
    memory: ShardMemory,
    main: F,
) -> Result<glommio::ExecutorJoinHandle<T>, RuntimeError>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = T> + 'static,
    T: Send + 'static,
{
    LocalExecutorBuilder::new(Placement::Fixed(cpu))
        .name(&format!("shard-{shard}"))
        .io_memory(memory.io_memory_bytes)
        .ring_depth(memory.ring_depth)
        .spawn(main)
        .map_err(|e| RuntimeError::Spawn {
            shard,
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_shards_fit_eight_mib() {
        let m = shard_memory(2, 8 << 20).unwrap();
        assert_eq!(m.io_memory_bytes, IO_MEMORY_MAX_BYTES);
        let m = shard_memory(16, 8 << 20).unwrap();
        assert!(m.io_memory_bytes >= IO_MEMORY_MIN_BYTES && m.io_memory_bytes < IO_MEMORY_MAX_BYTES);
        let e = shard_memory(64, 8 << 20).unwrap_err().to_string();
        assert!(e.contains("RLIMIT_MEMLOCK") && e.contains("64 shards"), "{e}");
    }

    #[test]
    fn hwloc_sees_every_cpu_once() {
        let nodes = numa_cpus().expect("hwloc reads this machine's topology");
        let mut cpus = nodes.concat();
        cpus.sort_unstable();
        cpus.dedup();
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(cpus.len() >= available, "hwloc sees every usable CPU: {nodes:?}");
        assert_eq!(
            shard_cpus(1, None).unwrap()[0].cpu,
            nodes[0][0],
            "the first node's CPUs come first"
        );
    }

    /// The nodes each shard lands on.
    fn nodes_of(places: &[ShardPlace]) -> Vec<Option<usize>> {
        places.iter().map(|p| p.node).collect()
    }

    #[test]
    fn shards_fill_a_numa_node_before_the_next_on_synthetic_machines() {
        // Two nodes of four cores: CPUs 0-3 on node 0, 4-7 on node 1.
        let two = synthetic_numa_cpus("node:2 core:4 pu:1").unwrap();
        assert_eq!(two, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        let all: Vec<usize> = (0..8).collect();
        let places = place_shards(6, Some(&two), &all);
        assert_eq!(places.iter().map(|p| p.cpu).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(
            nodes_of(&places),
            vec![Some(0), Some(0), Some(0), Some(0), Some(1), Some(1)]
        );
        // Four nodes of two cores, the process allowed only CPUs 2-7 (a container): node 0
        // has none of them, so shards start on node 1 and fill it first.
        let four = synthetic_numa_cpus("node:4 core:2 pu:1").unwrap();
        assert_eq!(four.len(), 4);
        let allowed: Vec<usize> = (2..8).collect();
        let places = place_shards(5, Some(&four), &allowed);
        assert_eq!(places.iter().map(|p| p.cpu).collect::<Vec<_>>(), vec![2, 3, 4, 5, 6]);
        assert_eq!(nodes_of(&places), vec![Some(1), Some(1), Some(2), Some(2), Some(3)]);
        // More shards than CPUs wrap around, node order kept.
        let places = place_shards(10, Some(&two), &all);
        assert_eq!(places[8], ShardPlace { cpu: 0, node: Some(0) });
        // Hyper-threads: a core's two PUs are neighbours in its node.
        let smt = synthetic_numa_cpus("node:2 core:2 pu:2").unwrap();
        assert_eq!(smt, vec![vec![0, 1, 2, 3], vec![4, 5, 6, 7]]);
        assert!(synthetic_numa_cpus("no such level:3").is_err());
        // No topology: the allowed CPUs in order, node unknown.
        assert_eq!(
            place_shards(2, None, &[5, 7]),
            vec![ShardPlace { cpu: 5, node: None }, ShardPlace { cpu: 7, node: None }]
        );
    }

    #[test]
    fn cpus_are_checked() {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        assert_eq!(shard_cpus(1, None).unwrap()[0].cpu, allowed[0]);
        assert!(shard_cpus(1, Some(&[100_000])).is_err());
        assert!(
            shard_cpus(1, Some(&[])).is_err(),
            "an empty list is an error, not a panic"
        );
    }

    #[test]
    fn connection_caps_fit_the_descriptor_limit() {
        let limits = crate::config::Limits::default();
        let budget = fd_budget(2, &limits, true).unwrap();
        assert!(budget.limit >= 1024);
        let used = 2 * (budget.connections_per_shard + budget.links_per_shard) as u64;
        assert!(used <= budget.limit, "{budget:?}");
    }
}
