//! Typed keys: a slot in a table and the generation of its occupant, so a reused slot never
//! answers for an older occupant. The one place their 64-bit form is made.

/// A slot and its occupant's generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    pub slot: u32,
    pub generation: u32,
}

impl SlotKey {
    /// The key as one number (the scheduler's request id): generation above slot.
    pub const fn to_bits(self) -> u64 {
        (self.generation as u64) << 32 | self.slot as u64
    }

    pub const fn from_bits(bits: u64) -> SlotKey {
        SlotKey {
            slot: bits as u32,
            generation: (bits >> 32) as u32,
        }
    }
}

/// A connection of a shard (client or executor link).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnectionKey(pub SlotKey);

impl ConnectionKey {
    pub const fn new(slot: u32, generation: u32) -> ConnectionKey {
        ConnectionKey(SlotKey { slot, generation })
    }

    pub const fn slot(self) -> u32 {
        self.0.slot
    }

    pub const fn generation(self) -> u32 {
        self.0.generation
    }
}

/// A request a shard holds: its slot in the pending table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RequestKey(pub SlotKey);

impl RequestKey {
    /// The scheduler's request id.
    pub const fn id(self) -> u64 {
        self.0.to_bits()
    }

    pub const fn of_id(id: u64) -> RequestKey {
        RequestKey(SlotKey::from_bits(id))
    }

    pub const fn slot(self) -> u32 {
        self.0.slot
    }

    pub const fn generation(self) -> u32 {
        self.0.generation
    }
}

/// Which of a shard's ports a connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Peer {
    /// The front door (clients, and executors' control connections).
    Client(ConnectionKey),
    /// The executor link port.
    Link(ConnectionKey),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_survives_its_number() {
        let key = SlotKey {
            slot: 7,
            generation: u32::MAX,
        };
        assert_eq!(SlotKey::from_bits(key.to_bits()), key);
        assert_eq!(RequestKey::of_id(RequestKey(key).id()), RequestKey(key));
        assert_ne!(key.to_bits(), SlotKey { slot: 7, generation: 0 }.to_bits());
    }
}
