//! The plan follower: one per GPU, it starts each batch at its `exec_at`, in order.
//!
//! Plans arrive ahead of time (about `d_ctrl + d_data*b` before they are due) and not always
//! in start order. The follower keeps them in a min-heap by start time, converted to the
//! executor's clock, and hands out each one when it is due. A plan that could only start more
//! than `late_bound_ns` after its `exec_at` is refused (on arrival) or failed (when popped):
//! running it would push every later plan on this GPU late too, and its requests are better
//! answered as failed at once. Pure: time is an argument; the executor's loop owns the timer.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

/// The reference implementation refuses plans 20 ms late; ours defaults to 5 ms.
pub const LATE_BOUND_NS_DEFAULT: u64 = 5_000_000;

/// What the follower does with a plan that is due.
#[derive(Debug, PartialEq, Eq)]
pub enum Due<P> {
    /// Start it now.
    Start(P),
    /// It is more than the bound late: answer its requests as failed.
    Late { plan: P, late_by_ns: u64 },
}

/// A plan refused on arrival: it is already more than the bound late.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused<P> {
    pub plan: P,
    pub late_by_ns: u64,
}

#[derive(Debug)]
struct Entry<P> {
    exec_at_ns: u64,
    sequence: u64,
    plan: P,
}

impl<P> PartialEq for Entry<P> {
    fn eq(&self, other: &Self) -> bool {
        (self.exec_at_ns, self.sequence) == (other.exec_at_ns, other.sequence)
    }
}
impl<P> Eq for Entry<P> {}
impl<P> PartialOrd for Entry<P> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<P> Ord for Entry<P> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.exec_at_ns, self.sequence).cmp(&(other.exec_at_ns, other.sequence))
    }
}

/// One GPU's queue of plans, earliest start first (FIFO among equal starts).
#[derive(Debug)]
pub struct PlanFollower<P> {
    heap: BinaryHeap<Reverse<Entry<P>>>,
    late_bound_ns: u64,
    next_sequence: u64,
}

impl<P> PlanFollower<P> {
    pub fn new(late_bound_ns: u64) -> PlanFollower<P> {
        PlanFollower {
            heap: BinaryHeap::new(),
            late_bound_ns,
            next_sequence: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Queues `plan` to start at `exec_at_ns` (executor clock), or refuses it when `now_ns`
    /// is already more than the bound past that.
    pub fn push(&mut self, plan: P, exec_at_ns: u64, now_ns: u64) -> Result<(), Refused<P>> {
        let late_by_ns = now_ns.saturating_sub(exec_at_ns);
        if late_by_ns > self.late_bound_ns {
            return Err(Refused { plan, late_by_ns });
        }
        self.heap.push(Reverse(Entry {
            exec_at_ns,
            sequence: self.next_sequence,
            plan,
        }));
        self.next_sequence += 1;
        Ok(())
    }

    /// The plan that would start next (staged ahead by backends that can).
    pub fn peek(&self) -> Option<&P> {
        self.heap.peek().map(|Reverse(entry)| &entry.plan)
    }

    /// When the earliest plan is due (arm the timer for this).
    pub fn next_due_ns(&self) -> Option<u64> {
        self.heap.peek().map(|Reverse(entry)| entry.exec_at_ns)
    }

    /// The earliest plan if it is due at `now_ns`. Call when the GPU is idle: a plan popped
    /// after the GPU was busy past the bound comes back as `Due::Late`.
    pub fn pop_due(&mut self, now_ns: u64) -> Option<Due<P>> {
        if self.next_due_ns()? > now_ns {
            return None;
        }
        let Reverse(entry) = self.heap.pop().expect("peeked");
        let late_by_ns = now_ns - entry.exec_at_ns;
        Some(if late_by_ns > self.late_bound_ns {
            Due::Late {
                plan: entry.plan,
                late_by_ns,
            }
        } else {
            Due::Start(entry.plan)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_start_in_exec_at_order_whatever_their_arrival_order() {
        let mut f = PlanFollower::new(LATE_BOUND_NS_DEFAULT);
        f.push("b", 2_000, 0).unwrap();
        f.push("a", 1_000, 0).unwrap();
        f.push("c", 2_000, 10).unwrap();
        assert_eq!(f.next_due_ns(), Some(1_000));
        assert_eq!(f.peek(), Some(&"a"));
        assert_eq!(f.pop_due(999), None);
        assert_eq!(f.pop_due(1_000), Some(Due::Start("a")));
        assert_eq!(f.peek(), Some(&"b"));
        assert_eq!(f.pop_due(2_500), Some(Due::Start("b")), "FIFO among equal starts");
        assert_eq!(f.pop_due(2_500), Some(Due::Start("c")));
        assert!(f.is_empty());
    }

    #[test]
    fn late_plans_are_refused_or_failed_past_the_bound() {
        let mut f = PlanFollower::new(5_000_000);
        assert_eq!(
            f.push("stale", 1_000_000, 7_000_000),
            Err(Refused {
                plan: "stale",
                late_by_ns: 6_000_000
            })
        );
        f.push("ok", 10_000_000, 7_000_000).unwrap();
        f.push("slipped", 11_000_000, 7_000_000).unwrap();
        assert_eq!(
            f.pop_due(14_000_000),
            Some(Due::Start("ok")),
            "4 ms late is within 5 ms"
        );
        // The GPU ran "ok" for 6 ms: "slipped" would start 9 ms late.
        assert_eq!(
            f.pop_due(20_000_000),
            Some(Due::Late {
                plan: "slipped",
                late_by_ns: 9_000_000
            })
        );
    }
}
