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
    #[error("cpu {cpu} does not exist: this machine has CPUs 0 to {}", available - 1)]
    NoSuchCpu { cpu: usize, available: usize },
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
    use hwlocality::object::types::ObjectType;
    let topology = hwlocality::Topology::new().ok()?;
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

/// The CPUs shards are pinned to: `cpus` if given (checked), else one NUMA node's CPUs before
/// the next node's (hwloc), so shards that talk most share a node; without a readable topology,
/// CPUs 0, 1, ...
pub fn shard_cpus(shards: usize, cpus: Option<&[usize]>) -> Result<Vec<usize>, RuntimeError> {
    let available = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chosen: Vec<usize> = match cpus {
        Some(list) => list.iter().copied().cycle().take(shards).collect(),
        None => {
            let by_node: Vec<usize> = numa_cpus().map(|nodes| nodes.concat()).unwrap_or_default();
            if by_node.is_empty() {
                (0..shards).map(|shard| shard % available).collect()
            } else {
                by_node.iter().copied().cycle().take(shards).collect()
            }
        }
    };
    for &cpu in &chosen {
        if cpu >= available {
            return Err(RuntimeError::NoSuchCpu { cpu, available });
        }
    }
    Ok(chosen)
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
            shard_cpus(1, None).unwrap()[0],
            nodes[0][0],
            "the first node's CPUs come first"
        );
    }

    #[test]
    fn cpus_are_checked() {
        assert_eq!(shard_cpus(1, None).unwrap(), vec![0]);
        assert!(shard_cpus(1, Some(&[100_000])).is_err());
    }
}
