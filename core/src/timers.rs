//! A keyed timer queue: at most one pending deadline per key (per model, per GPU).
//!
//! Policies re-arm a key's timer after almost every event, usually to a nearby time. Rather
//! than deleting from a heap, [`TimerQueue::set`] pushes a new entry and remembers the key's
//! current due time; entries that no longer match are stale and skipped when they surface.
//! When stale entries pile up the heap is rebuilt, so its size stays bounded by the key count.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

const NONE_NS: u64 = u64::MAX;

#[derive(Debug, Clone)]
pub struct TimerQueue {
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    due_ns: Vec<u64>,
}

impl TimerQueue {
    pub fn new(key_count: usize) -> TimerQueue {
        TimerQueue {
            heap: BinaryHeap::with_capacity(4 * key_count + 64),
            due_ns: vec![NONE_NS; key_count],
        }
    }

    /// Arms `key` to fire at `at_ns`, replacing its previous deadline.
    #[inline]
    pub fn set(&mut self, key: u32, at_ns: u64) {
        assert!(at_ns != NONE_NS);
        let slot = &mut self.due_ns[key as usize];
        if *slot == at_ns {
            return;
        }
        *slot = at_ns;
        if self.heap.len() == self.heap.capacity() {
            // Full of mostly stale entries: compact rather than grow (no allocation).
            self.rebuild();
        }
        self.heap.push(Reverse((at_ns, key)));
    }

    #[inline]
    pub fn cancel(&mut self, key: u32) {
        self.due_ns[key as usize] = NONE_NS;
    }

    pub fn due_ns(&self, key: u32) -> Option<u64> {
        let due = self.due_ns[key as usize];
        (due != NONE_NS).then_some(due)
    }

    /// The earliest armed deadline.
    #[inline]
    pub fn next_ns(&mut self) -> Option<u64> {
        while let Some(&Reverse((at_ns, key))) = self.heap.peek() {
            if self.due_ns[key as usize] == at_ns {
                return Some(at_ns);
            }
            self.heap.pop();
        }
        None
    }

    /// The earliest armed `(deadline, key)`, left armed.
    #[inline]
    pub fn peek(&mut self) -> Option<(u64, u32)> {
        let at_ns = self.next_ns()?;
        let &Reverse((_, key)) = self.heap.peek().expect("next_ns saw an entry");
        Some((at_ns, key))
    }

    /// Disarms and returns one key whose deadline is at or before `now_ns`, earliest first.
    #[inline]
    pub fn pop_due(&mut self, now_ns: u64) -> Option<u32> {
        let at_ns = self.next_ns()?;
        if at_ns > now_ns {
            return None;
        }
        let Reverse((_, key)) = self.heap.pop().expect("next_ns saw an entry");
        self.due_ns[key as usize] = NONE_NS;
        Some(key)
    }

    fn rebuild(&mut self) {
        self.heap.clear();
        for (key, &at_ns) in self.due_ns.iter().enumerate() {
            if at_ns != NONE_NS {
                self.heap.push(Reverse((at_ns, key as u32)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rearming_replaces_and_order_is_by_time() {
        let mut t = TimerQueue::new(3);
        t.set(0, 50);
        t.set(1, 20);
        t.set(0, 10); // replaces 50
        t.set(2, 30);
        t.cancel(2);
        assert_eq!(t.next_ns(), Some(10));
        assert_eq!(t.pop_due(5), None);
        assert_eq!(t.pop_due(100), Some(0));
        assert_eq!(t.pop_due(100), Some(1));
        assert_eq!(t.pop_due(100), None, "50 was replaced, 2 was cancelled");
    }

    #[test]
    fn heap_stays_bounded_under_rearming() {
        let mut t = TimerQueue::new(2);
        for i in 0..10_000u64 {
            t.set((i % 2) as u32, 1_000_000 - i);
        }
        assert!(t.heap.len() <= t.heap.capacity());
        assert!(t.heap.capacity() < 4 * 2 + 64 + 64, "never grew");
        assert_eq!(t.next_ns(), Some(1_000_000 - 9_999));
    }
}
