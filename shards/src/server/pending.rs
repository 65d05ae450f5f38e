//! The requests a shard holds for the models it owns, from admission until their one reply.
//!
//! Keyed by slot and generation: the key is the scheduler's request id, and a slot reused
//! for a newer request bumps its generation, so a stale id (a late result of a lost plan)
//! never answers the newer request. Each client connection's requests are linked through
//! their slots, so a connection that closes finds its requests without a scan of the table
//! (connection churn is not CPU load on every shard).

use std::collections::HashMap;

use super::buffers::Slice;
use super::{ConnectionKey, Origin};

/// A request's key in the table: its scheduler request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct RequestKey {
    pub(super) slot: u32,
    pub(super) generation: u32,
}

impl RequestKey {
    pub(super) fn id(self) -> u64 {
        u64::from(self.generation) << 32 | u64::from(self.slot)
    }

    pub(super) fn of_id(id: u64) -> RequestKey {
        RequestKey {
            slot: id as u32,
            generation: (id >> 32) as u32,
        }
    }
}

/// No slot (the end of a connection's list).
const NONE: u32 = u32::MAX;

/// A request the owner holds until it is answered.
#[derive(Debug)]
pub(super) struct Pending {
    pub(super) origin: Origin,
    /// The model's index in this shard's scheduler.
    pub(super) model: u32,
    pub(super) deadline_ns: u64,
    pub(super) input: Option<Slice>,
    generation: u32,
    /// Neighbours in its connection's list.
    prev: u32,
    next: u32,
}

/// Requests a shard holds.
#[derive(Debug)]
pub(super) struct PendingTable {
    slots: Vec<Option<Pending>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    limit: usize,
    /// Per client connection with requests here: the first slot of its list.
    by_connection: HashMap<(u32, ConnectionKey), u32>,
}

impl PendingTable {
    pub(super) fn new(limit: usize) -> PendingTable {
        PendingTable {
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            limit,
            by_connection: HashMap::new(),
        }
    }

    /// Holds a request; `None` when the table is at its limit.
    pub(super) fn insert(
        &mut self,
        origin: Origin,
        model: u32,
        deadline_ns: u64,
        input: Option<Slice>,
    ) -> Option<RequestKey> {
        let slot = match self.free.pop() {
            Some(slot) => slot,
            None if self.slots.len() < self.limit => {
                self.slots.push(None);
                self.generations.push(0);
                self.slots.len() as u32 - 1
            }
            None => return None,
        };
        let generation = self.generations[slot as usize];
        let head = self
            .by_connection
            .insert((origin.shard, origin.connection), slot)
            .unwrap_or(NONE);
        if head != NONE {
            self.slots[head as usize]
                .as_mut()
                .expect("a list links held slots")
                .prev = slot;
        }
        self.slots[slot as usize] = Some(Pending {
            origin,
            model,
            deadline_ns,
            input,
            generation,
            prev: NONE,
            next: head,
        });
        Some(RequestKey { slot, generation })
    }

    /// The request with key `key`, if it is still held.
    pub(super) fn get(&self, key: RequestKey) -> Option<&Pending> {
        self.slots
            .get(key.slot as usize)?
            .as_ref()
            .filter(|pending| pending.generation == key.generation)
    }

    /// The held requests of one client connection: `(key, model)`.
    pub(super) fn of_connection(&self, shard: u32, connection: ConnectionKey) -> Vec<(RequestKey, u32)> {
        let mut held = Vec::new();
        let mut slot = self.by_connection.get(&(shard, connection)).copied().unwrap_or(NONE);
        while slot != NONE {
            let pending = self.slots[slot as usize].as_ref().expect("a list links held slots");
            held.push((
                RequestKey {
                    slot,
                    generation: pending.generation,
                },
                pending.model,
            ));
            slot = pending.next;
        }
        held
    }

    pub(super) fn held(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes every held request (shutdown).
    pub(super) fn drain(&mut self) -> Vec<Origin> {
        let mut origins = Vec::new();
        for slot in 0..self.slots.len() {
            if let Some(pending) = self.slots[slot].take() {
                origins.push(pending.origin);
                self.generations[slot] = pending.generation.wrapping_add(1);
                self.free.push(slot as u32);
            }
        }
        self.by_connection.clear();
        origins
    }

    /// Takes the request with key `key` out, if it is still held.
    pub(super) fn remove(&mut self, key: RequestKey) -> Option<Pending> {
        let held = self.slots.get(key.slot as usize)?.as_ref()?;
        if held.generation != key.generation {
            return None;
        }
        let pending = self.slots[key.slot as usize].take().expect("checked");
        self.generations[key.slot as usize] = key.generation.wrapping_add(1);
        self.free.push(key.slot);
        // Unlink it from its connection's list.
        if pending.prev != NONE {
            self.slots[pending.prev as usize].as_mut().expect("linked").next = pending.next;
        } else {
            let list = (pending.origin.shard, pending.origin.connection);
            if pending.next == NONE {
                self.by_connection.remove(&list);
            } else {
                self.by_connection.insert(list, pending.next);
            }
        }
        if pending.next != NONE {
            self.slots[pending.next as usize].as_mut().expect("linked").prev = pending.prev;
        }
        Some(pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin(shard: u32, connection: u64, id: u64) -> Origin {
        Origin {
            shard,
            connection: ConnectionKey(connection),
            client_request_id: id,
            received_ns: 0,
            input_len: 0,
        }
    }

    #[test]
    fn connections_find_their_requests_and_keys_do_not_outlive_them() {
        let mut table = PendingTable::new(8);
        let a: Vec<RequestKey> = (0..3)
            .map(|i| table.insert(origin(0, 1, i), 0, 0, None).unwrap())
            .collect();
        let b = table.insert(origin(1, 1, 9), 0, 0, None).unwrap();
        assert_eq!(table.of_connection(0, ConnectionKey(1)).len(), 3);
        assert_eq!(table.of_connection(1, ConnectionKey(1)), vec![(b, 0)]);
        // Removing from the middle, the head and the tail keeps the list whole.
        for (step, key) in [a[1], a[2], a[0]].into_iter().enumerate() {
            assert!(table.remove(key).is_some());
            assert!(table.remove(key).is_none(), "once");
            assert_eq!(table.of_connection(0, ConnectionKey(1)).len(), 2 - step);
        }
        assert!(table.by_connection.len() == 1);
        // A reused slot has a new generation: the old key finds nothing.
        let c = table.insert(origin(0, 2, 1), 0, 0, None).unwrap();
        assert_eq!(c.slot, a[0].slot);
        assert!(table.get(a[0]).is_none());
        assert!(table.get(c).is_some());
        assert_eq!(RequestKey::of_id(c.id()), c);
        assert_eq!(table.held(), 2);
        assert_eq!(table.drain().len(), 2);
        assert!(table.of_connection(1, ConnectionKey(1)).is_empty());
    }

    #[test]
    fn the_limit_is_kept() {
        let mut table = PendingTable::new(2);
        assert!(table.insert(origin(0, 1, 0), 0, 0, None).is_some());
        assert!(table.insert(origin(0, 1, 1), 0, 0, None).is_some());
        assert!(table.insert(origin(0, 1, 2), 0, 0, None).is_none());
    }
}
