//! Receive buffers whose bytes outlive the read: a request's input stays where it was read
//! until its plan goes to an executor, an executor's output until its reply is written, and
//! both may cross to another shard, all without a copy of the bytes.
//!
//! A [`ReadBuffer`] is one `Arc<Vec<u8>>`; a [`Slice`] is a shared reference to a range of
//! it. While no slice of the buffer is alive the connection reuses it as a plain buffer;
//! when one is, the unread tail moves to a fresh buffer and the old one lives on until its
//! last slice is dropped (one allocation per read that kept bytes, none per request).

use std::sync::Arc;

/// Bytes of a receive buffer, shared.
#[derive(Debug, Clone)]
pub(super) struct Slice {
    buffer: Arc<Vec<u8>>,
    start: u32,
    len: u32,
}

impl Slice {
    pub(super) fn bytes(&self) -> &[u8] {
        &self.buffer[self.start as usize..(self.start + self.len) as usize]
    }
}

/// A connection's receive buffer: `filled` bytes read, not yet consumed.
#[derive(Debug)]
pub(super) struct ReadBuffer {
    buffer: Arc<Vec<u8>>,
    filled: usize,
    limit: usize,
}

impl ReadBuffer {
    /// `size` bytes to start with, growing up to `limit` for one large frame.
    pub(super) fn new(size: usize, limit: usize) -> ReadBuffer {
        ReadBuffer {
            buffer: Arc::new(vec![0; size]),
            filled: 0,
            limit,
        }
    }

    /// The bytes read and not consumed.
    pub(super) fn filled(&self) -> &[u8] {
        &self.buffer[..self.filled]
    }

    /// Room to read into; `None` when a frame fills the buffer at its limit.
    pub(super) fn spare(&mut self) -> Option<&mut [u8]> {
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

    pub(super) fn advance(&mut self, read: usize) {
        self.filled = (self.filled + read).min(self.buffer.len());
    }

    /// Drops the first `consumed` bytes (whole frames handled).
    pub(super) fn consume(&mut self, consumed: usize) {
        let consumed = consumed.min(self.filled);
        match Arc::get_mut(&mut self.buffer) {
            Some(buffer) => buffer.copy_within(consumed..self.filled, 0),
            None => {
                // Slices of this buffer live on: the tail moves to a fresh one.
                let mut fresh = vec![0; self.buffer.len()];
                fresh[..self.filled - consumed].copy_from_slice(&self.buffer[consumed..self.filled]);
                self.buffer = Arc::new(fresh);
            }
        }
        self.filled -= consumed;
    }

    /// A shared reference to `bytes`, which must lie in this buffer's filled part.
    pub(super) fn slice_of(&self, bytes: &[u8]) -> Slice {
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
}
