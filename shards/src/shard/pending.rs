//! The requests a shard holds for the models it owns, from admission until their one reply.
//!
//! Keyed by slot and generation: the key is the scheduler's request id, and a slot reused
//! for a newer request bumps its generation, so a stale id (a late result of a lost plan)
//! never answers the newer request. Each client connection's requests are linked through
//! their slots, so a connection that closes finds its requests without a scan of the table
//! (connection churn is not CPU load on every shard).

use super::keys::{ConnectionKey, RequestKey, SlotKey};
use super::messages::Origin;
use crate::buffers::Slice;
use symphony_core::prefetch::prefetch;

/// No slot (the end of a connection's list).
const NONE: u32 = u32::MAX;

/// How many requests ahead of the one being removed [`PendingTable::prefetch_ahead`] asks
/// for: about what the CPU can have in flight, three lines each.
const PREFETCH_AHEAD: usize = 8;

/// A request the owner holds until it is answered.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Pending {
    pub(crate) origin: Origin,
    /// The model's index in this shard's scheduler.
    pub(crate) model: u32,
    pub(crate) deadline_ns: u64,
    pub(crate) input: Option<Slice>,
    /// Its client went away while it was in a plan in flight: it is not planned again.
    pub(crate) orphaned: bool,
}

// One cache line a request: answering a plan's requests reads each one's slot, long out of
// cache by then (its generation lives in `generations`, its links in `links`).
const _: () = assert!(std::mem::size_of::<Option<Pending>>() == 64);

/// A held slot's neighbours in its connection's list, apart from the requests: a removal
/// touches its neighbours' links, and these stay in cache where the requests would not.
#[derive(Debug, Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
}

/// Requests a shard holds.
#[derive(Debug)]
pub(crate) struct PendingTable {
    slots: Vec<Option<Pending>>,
    /// Per slot: the generation of the request it holds, or of the next one it will hold.
    generations: Vec<u32>,
    links: Vec<Link>,
    free: Vec<u32>,
    limit: usize,
    /// Per origin shard, per connection slot: the generation of the connection whose
    /// requests are listed and the first slot of its list (`NONE`: no request).
    heads: Vec<Vec<(u32, u32)>>,
}

impl PendingTable {
    pub(crate) fn new(limit: usize) -> PendingTable {
        PendingTable {
            slots: Vec::new(),
            generations: Vec::new(),
            links: Vec::new(),
            free: Vec::new(),
            limit,
            heads: Vec::new(),
        }
    }

    /// The list head of a connection, created empty if needed.
    fn head_mut(&mut self, shard: u32, connection: ConnectionKey) -> &mut (u32, u32) {
        let shard = shard as usize;
        if self.heads.len() <= shard {
            self.heads.resize_with(shard + 1, Vec::new);
        }
        let slots = &mut self.heads[shard];
        let slot = connection.slot() as usize;
        if slots.len() <= slot {
            slots.resize(slot + 1, (0, NONE));
        }
        let head = &mut slots[slot];
        if head.0 != connection.generation() {
            // A newer connection in this slot: the older one has no request left here.
            *head = (connection.generation(), NONE);
        }
        head
    }

    /// The first slot of a connection's list, `NONE` if it has no request here.
    fn head(&self, shard: u32, connection: ConnectionKey) -> u32 {
        match self
            .heads
            .get(shard as usize)
            .and_then(|slots| slots.get(connection.slot() as usize))
        {
            Some(&(generation, head)) if generation == connection.generation() => head,
            _ => NONE,
        }
    }

    /// Holds a request; `None` when the table is at its limit.
    pub(crate) fn insert(
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
                self.links.push(Link { prev: NONE, next: NONE });
                self.slots.len() as u32 - 1
            }
            None => return None,
        };
        // The next inserts' slots, freed a while ago: their misses overlap this request's
        // work (the slot, its generation and its links are all written).
        for &next in self.free.iter().rev().take(2) {
            prefetch(&self.slots[next as usize]);
            prefetch(&self.generations[next as usize]);
            prefetch(&self.links[next as usize]);
        }
        let generation = self.generations[slot as usize];
        let list = self.head_mut(origin.shard, origin.connection);
        let head = std::mem::replace(&mut list.1, slot);
        if head != NONE {
            self.links[head as usize].prev = slot;
        }
        self.links[slot as usize] = Link { prev: NONE, next: head };
        self.slots[slot as usize] = Some(Pending {
            origin,
            model,
            deadline_ns,
            input,
            orphaned: false,
        });
        Some(RequestKey(SlotKey { slot, generation }))
    }

    /// The request with key `key`, if it is still held.
    pub(crate) fn get(&self, key: RequestKey) -> Option<&Pending> {
        if !self.holds(key) {
            return None;
        }
        self.slots[key.slot() as usize].as_ref()
    }

    /// Asks the CPU to bring into cache what removing `ids[index]` and the requests after it
    /// will touch, to be called before each removal of a plan's requests in order: a plan's
    /// requests are answered together, each slot long out of cache, so their misses overlap
    /// instead of queueing. Two stages, [`PREFETCH_AHEAD`] and half of it ahead: the slot,
    /// its generation and its links first, then (the links in cache by then) its neighbours'
    /// links. (Prefetching a whole plan at once asks for more lines than the CPU can have in
    /// flight: most are dropped.) A hint only: no effect on what the table holds.
    pub(crate) fn prefetch_ahead(&self, ids: &[u64], index: usize) {
        let first = if index == 0 { 0 } else { index + PREFETCH_AHEAD };
        for &id in ids.iter().take(index + PREFETCH_AHEAD + 1).skip(first) {
            let slot = RequestKey::of_id(id).slot() as usize;
            if let (Some(cell), Some(generation), Some(link)) =
                (self.slots.get(slot), self.generations.get(slot), self.links.get(slot))
            {
                prefetch(cell);
                prefetch(generation);
                prefetch(link);
            }
        }
        if let Some(&id) = ids.get(index + PREFETCH_AHEAD / 2) {
            if let Some(link) = self.links.get(RequestKey::of_id(id).slot() as usize) {
                for neighbour in [link.prev, link.next] {
                    if let Some(link) = self.links.get(neighbour as usize) {
                        prefetch(link);
                    }
                }
            }
        }
    }

    /// Whether the request with key `key` is still held.
    fn holds(&self, key: RequestKey) -> bool {
        let slot = key.slot() as usize;
        self.generations.get(slot) == Some(&key.generation()) && self.slots[slot].is_some()
    }

    /// The request with key `key`, to change, if it is still held.
    pub(crate) fn get_mut(&mut self, key: RequestKey) -> Option<&mut Pending> {
        if !self.holds(key) {
            return None;
        }
        self.slots[key.slot() as usize].as_mut()
    }

    /// The held requests of one client connection: `(key, model)`.
    pub(crate) fn of_connection(&self, shard: u32, connection: ConnectionKey) -> Vec<(RequestKey, u32)> {
        let mut held = Vec::new();
        let mut slot = self.head(shard, connection);
        while slot != NONE {
            let pending = self.slots[slot as usize].as_ref().expect("a list links held slots");
            held.push((
                RequestKey(SlotKey {
                    slot,
                    generation: self.generations[slot as usize],
                }),
                pending.model,
            ));
            slot = self.links[slot as usize].next;
        }
        held
    }

    pub(crate) fn held(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Takes every held request (shutdown).
    pub(crate) fn drain(&mut self) -> Vec<Origin> {
        let mut origins = Vec::new();
        for slot in 0..self.slots.len() {
            if let Some(pending) = self.slots[slot].take() {
                origins.push(pending.origin);
                self.generations[slot] = self.generations[slot].wrapping_add(1);
                self.free.push(slot as u32);
            }
        }
        self.heads.clear();
        origins
    }

    /// Takes the request with key `key` out, if it is still held.
    pub(crate) fn remove(&mut self, key: RequestKey) -> Option<Pending> {
        if !self.holds(key) {
            return None;
        }
        let slot = key.slot();
        let pending = self.slots[slot as usize].take().expect("checked");
        self.generations[slot as usize] = key.generation().wrapping_add(1);
        self.free.push(slot);
        // Unlink it from its connection's list.
        let Link { prev, next } = self.links[slot as usize];
        if prev != NONE {
            self.links[prev as usize].next = next;
        } else if self.head(pending.origin.shard, pending.origin.connection) == slot {
            // The head of its connection's list (a list whose connection slot was reused since
            // is left as it is: the newer connection has a list of its own).
            self.head_mut(pending.origin.shard, pending.origin.connection).1 = next;
        }
        if next != NONE {
            self.links[next as usize].prev = prev;
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
            connection: ConnectionKey(SlotKey::from_bits(connection)),
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
        assert_eq!(table.of_connection(0, ConnectionKey::new(1, 0)).len(), 3);
        assert_eq!(table.of_connection(1, ConnectionKey::new(1, 0)), vec![(b, 0)]);
        // Removing from the middle, the head and the tail keeps the list whole.
        for (step, key) in [a[1], a[2], a[0]].into_iter().enumerate() {
            assert!(table.remove(key).is_some());
            assert!(table.remove(key).is_none(), "once");
            assert_eq!(table.of_connection(0, ConnectionKey::new(1, 0)).len(), 2 - step);
        }
        assert_eq!(table.head(0, ConnectionKey::new(1, 0)), NONE);
        // A reused slot has a new generation: the old key finds nothing.
        let c = table.insert(origin(0, 2, 1), 0, 0, None).unwrap();
        assert_eq!(c.slot(), a[0].slot());
        assert!(table.get(a[0]).is_none());
        assert!(table.get(c).is_some());
        assert_eq!(RequestKey::of_id(c.id()), c);
        assert_eq!(table.held(), 2);
        assert_eq!(table.drain().len(), 2);
        assert!(table.of_connection(1, ConnectionKey::new(1, 0)).is_empty());
    }

    #[test]
    fn a_reused_connection_slot_keeps_the_lists_apart() {
        let mut table = PendingTable::new(8);
        let old = ConnectionKey::new(3, 5);
        let new = ConnectionKey::new(3, 6);
        let a = table.insert(origin_key(0, old, 1), 0, 0, None).unwrap();
        let b = table.insert(origin_key(0, old, 2), 0, 0, None).unwrap();
        // The slot serves a newer connection while the old one's requests are still held.
        let c = table.insert(origin_key(0, new, 1), 0, 0, None).unwrap();
        assert_eq!(table.of_connection(0, new), vec![(c, 0)]);
        assert!(table.of_connection(0, old).is_empty());
        // The old requests leave without disturbing the new list.
        assert!(table.remove(b).is_some());
        assert!(table.remove(a).is_some());
        assert_eq!(table.of_connection(0, new), vec![(c, 0)]);
        let d = table.insert(origin_key(0, new, 2), 0, 0, None).unwrap();
        assert_eq!(table.of_connection(0, new).len(), 2);
        assert!(table.remove(c).is_some() && table.remove(d).is_some());
        assert!(table.of_connection(0, new).is_empty());
    }

    fn origin_key(shard: u32, connection: ConnectionKey, id: u64) -> Origin {
        Origin {
            connection,
            ..origin(shard, 0, id)
        }
    }

    #[test]
    fn the_limit_is_kept() {
        let mut table = PendingTable::new(2);
        assert!(table.insert(origin(0, 1, 0), 0, 0, None).is_some());
        assert!(table.insert(origin(0, 1, 1), 0, 0, None).is_some());
        assert!(table.insert(origin(0, 1, 2), 0, 0, None).is_none());
    }
}
