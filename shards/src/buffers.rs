//! Receive buffers whose bytes outlive the read: a request's input stays where it was read
//! until its plan goes to an executor, an executor's output until its reply is written, and
//! both may cross to another shard, all without a copy of the bytes.
//!
//! A [`ReadBuffer`] is one `Arc<Vec<u8>>`; a [`Slice`] is a shared reference to a range of
//! it. While no slice of the buffer is alive the connection reuses it as a plain buffer;
//! when one is, the unread tail moves to a fresh buffer and the old one lives on until its
//! last slice is dropped.
//!
//! **Memory held per request is bounded by its own size.** A slice shares the receive
//! buffer only when it is at least a quarter of it ([`ReadBuffer::hold`]); a smaller one is
//! copied into an allocation of its own size. So a buffer that lives on for its slices is at
//! most four times the largest of them, and one tiny request cannot pin a buffer that grew
//! for an 8 MiB frame. Buffers start small ([`READ_BUFFER_INITIAL_BYTES`]: an idle connection
//! costs little), double only while one frame fills them (up to the frame limit) and shrink
//! back after a large frame. A stream of small frames keeps its 4 KiB buffer (60 to 80
//! frames per read): letting reads that fill their room grow it to 64 or 256 KiB did not
//! lower the served CPU per request at 1,000,000 req/s and made the read-to-decision p99
//! milliseconds (a read's last frames wait for its first ones), `docs/benchmarks.md`.

use std::sync::Arc;

/// Bytes of a receive buffer, shared.
#[derive(Debug, Clone)]
pub struct Slice {
    buffer: Arc<Vec<u8>>,
    start: u32,
    len: u32,
}

/// A new connection's receive buffer.
pub const READ_BUFFER_INITIAL_BYTES: usize = 4 << 10;
/// A buffer grown past this for a large frame shrinks back to it once that frame is
/// consumed.
pub const READ_BUFFER_STEADY_BYTES: usize = 256 << 10;
/// A slice shares its receive buffer only if it is at least `1 / SHARE_FRACTION` of it.
const SHARE_FRACTION: usize = 4;

impl Slice {
    pub fn bytes(&self) -> &[u8] {
        &self.buffer[self.start as usize..(self.start + self.len) as usize]
    }

    /// Bytes of memory this slice keeps alive (its whole buffer, shared or not).
    #[cfg(test)]
    pub fn held_bytes(&self) -> usize {
        self.buffer.capacity()
    }
}

/// A connection's receive buffer: `filled` bytes read, not yet consumed.
#[derive(Debug)]
pub struct ReadBuffer {
    buffer: Arc<Vec<u8>>,
    filled: usize,
    limit: usize,
}

impl ReadBuffer {
    /// `size` bytes to start with, growing up to `limit` for one large frame.
    pub fn new(size: usize, limit: usize) -> ReadBuffer {
        assert!(size > 0 && size <= limit);
        ReadBuffer {
            buffer: Arc::new(vec![0; size]),
            filled: 0,
            limit,
        }
    }

    /// The bytes read and not consumed.
    pub fn filled(&self) -> &[u8] {
        &self.buffer[..self.filled]
    }

    /// Room to read into; `None` when a frame fills the buffer at its limit.
    pub fn spare(&mut self) -> Option<&mut [u8]> {
        let len = self.buffer.len();
        if self.filled == len {
            if len >= self.limit {
                return None;
            }
            let grown = (len * 2).min(self.limit);
            self.replace(grown);
        }
        if Arc::get_mut(&mut self.buffer).is_none() {
            self.replace(self.buffer.len());
        }
        let filled = self.filled;
        Arc::get_mut(&mut self.buffer).map(|buffer| &mut buffer[filled..])
    }

    pub fn advance(&mut self, read: usize) {
        self.filled = (self.filled + read).min(self.buffer.len());
    }

    /// Drops the first `consumed` bytes (whole frames handled). A buffer grown past the
    /// steady size for a large frame shrinks back once what is left fits.
    pub fn consume(&mut self, consumed: usize) {
        let consumed = consumed.min(self.filled);
        let left = self.filled - consumed;
        let shrink = self.buffer.len() > READ_BUFFER_STEADY_BYTES && left <= READ_BUFFER_STEADY_BYTES / 2;
        match Arc::get_mut(&mut self.buffer) {
            Some(buffer) if !shrink => buffer.copy_within(consumed..self.filled, 0),
            _ => {
                // Slices of this buffer live on (or it is too large now): the tail moves to
                // a fresh buffer of the size it needs, not of the old one's.
                let size = self
                    .buffer
                    .len()
                    .min(READ_BUFFER_STEADY_BYTES.max(left.next_power_of_two()));
                let mut fresh = vec![0; size.max(left).max(1)];
                fresh[..left].copy_from_slice(&self.buffer[consumed..self.filled]);
                self.buffer = Arc::new(fresh);
            }
        }
        self.filled = left;
    }

    /// `bytes` (which must lie in this buffer's filled part) kept beyond this read: a shared
    /// reference when it is a large part of the buffer, else a copy of its own size, so that
    /// what a held slice keeps alive stays within a small multiple of its own length.
    pub fn hold(&self, bytes: &[u8]) -> Slice {
        if bytes.len() * SHARE_FRACTION >= self.buffer.len() {
            return self.slice_of(bytes);
        }
        Slice {
            buffer: Arc::new(bytes.to_vec()),
            start: 0,
            len: bytes.len() as u32,
        }
    }

    /// A shared reference to `bytes`, which must lie in this buffer's filled part.
    pub(crate) fn slice_of(&self, bytes: &[u8]) -> Slice {
        let base = self.buffer.as_ptr() as usize;
        let start = (bytes.as_ptr() as usize).wrapping_sub(base);
        assert!(
            start <= self.filled && bytes.len() <= self.filled - start,
            "a slice of another buffer"
        );
        Slice {
            buffer: Arc::clone(&self.buffer),
            start: start as u32,
            len: bytes.len() as u32,
        }
    }

    /// Moves the filled bytes to a new buffer of `size` bytes.
    fn replace(&mut self, size: usize) {
        let mut fresh = vec![0; size];
        fresh[..self.filled].copy_from_slice(&self.buffer[..self.filled]);
        self.buffer = Arc::new(fresh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_survive_the_buffer_moving_on() {
        let mut buffer = ReadBuffer::new(8, 32);
        let spare = buffer.spare().unwrap();
        spare[..6].copy_from_slice(b"abcdef");
        buffer.advance(6);
        let kept = buffer.slice_of(&buffer.filled()[1..3]);
        buffer.consume(4);
        assert_eq!(buffer.filled(), b"ef");
        // The buffer is shared: reading goes to a fresh one, the slice still reads "bc".
        let spare = buffer.spare().unwrap();
        spare[..2].copy_from_slice(b"gh");
        buffer.advance(2);
        assert_eq!(buffer.filled(), b"efgh");
        assert_eq!(kept.bytes(), b"bc");
        drop(kept);
        // Full at 8: grows to 16, then 32, then refuses.
        let spare = buffer.spare().unwrap();
        assert_eq!(spare.len(), 4);
        buffer.advance(4);
        assert_eq!(buffer.spare().unwrap().len(), 8);
        buffer.advance(8);
        assert_eq!(buffer.spare().unwrap().len(), 16);
        buffer.advance(16);
        assert!(buffer.spare().is_none());
    }

    #[test]
    fn tiny_slices_after_a_large_frame_hold_only_their_own_bytes() {
        let limit = 8 << 20;
        let mut buffer = ReadBuffer::new(READ_BUFFER_INITIAL_BYTES, limit);
        // One large frame: the buffer grows to hold it; its slice shares the buffer.
        let large = 5 << 20;
        let mut read = 0;
        while read < large {
            let spare = buffer.spare().unwrap();
            let n = spare.len().min(large - read);
            spare[..n].fill(1);
            buffer.advance(n);
            read += n;
        }
        let big = buffer.hold(buffer.filled());
        assert!(big.held_bytes() >= large && big.held_bytes() <= 2 * large);
        buffer.consume(large);
        // Then tiny requests, one per read: each holds a few bytes, not the big buffer.
        let mut held = Vec::new();
        for i in 0..100u8 {
            let spare = buffer.spare().unwrap();
            assert!(spare.len() <= READ_BUFFER_STEADY_BYTES, "the buffer shrank back");
            spare[..8].fill(i);
            buffer.advance(8);
            let slice = buffer.hold(buffer.filled());
            assert_eq!(slice.bytes(), [i; 8]);
            assert!(
                slice.held_bytes() <= 4 * 8,
                "a tiny slice holds {} bytes",
                slice.held_bytes()
            );
            held.push(slice);
            buffer.consume(8);
        }
        assert_eq!(big.bytes().len(), large);
        // A slice of a quarter of the buffer or more shares it (no copy).
        let spare = buffer.spare().unwrap();
        let quarter = spare.len() / 2;
        spare[..quarter].fill(9);
        buffer.advance(quarter);
        let shared = buffer.hold(buffer.filled());
        assert!(shared.held_bytes() <= 4 * quarter + READ_BUFFER_STEADY_BYTES);
    }
}
