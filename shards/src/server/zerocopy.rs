//! Zero-copy sends for executor links: io_uring `SENDMSG_ZC` on a small ring of the shard's
//! own, beside glommio's (glommio 0.9 sends with a plain copying `send`).
//!
//! A plan whose inputs come to [`ZERO_COPY_MIN_BYTES`](crate::shard::ZERO_COPY_MIN_BYTES) or more is queued on its link as the
//! frame's header and archive (in the link's byte queue) plus the inputs as [`Slice`]s of the
//! clients' receive buffers. The link's writer hands the whole queue to [`ZeroCopy::send`]
//! as one `sendmsg` of many iovecs: the kernel reads the input bytes where the front door
//! read them. Nothing is copied in user space on the way.
//!
//! The kernel may read the pages after the send's result is posted, until its notification
//! (a second completion with `IORING_CQE_F_NOTIF`): an [`Outgoing`] (the queue's bytes and
//! slices) lives in the ring's table until then, so no buffer is reused or freed early.
//! Completions are read from the ring's shared memory without a system call: at each send,
//! and while a writer waits for its send's result (short timer sleeps, since glommio 0.9 has
//! no hook to wake on another ring; a send completes at once unless the socket is full).
//!
//! Where the ring cannot be set up, or the kernel refuses a zero-copy send (an old kernel,
//! `ENOMEM` when pinned pages exceed RLIMIT_MEMLOCK for a non-root user), the writer copies
//! the queue into one buffer and sends that instead; [`Stats`](crate::stats::Stats) counts both.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::time::Duration;

use io_uring::{cqueue, opcode, types, IoUring};

use crate::buffers::Slice;

/// Submission queue entries of the ring (completions: twice that, and the kernel keeps any
/// overflow); more sends in flight than this wait for room.
const RING_ENTRIES: u32 = 64;

/// Iovecs per `sendmsg` (the kernel's `UIO_MAXIOV`); a longer queue goes in several sends.
const IOV_MAX: usize = 1024;

/// Tries of one `io_uring_enter` that the kernel answers EINTR, EAGAIN or EBUSY.
const SUBMIT_RETRY_LIMIT: u32 = 16;

/// What one link write sends: `bytes` with `sections` spliced in, each at its offset (the
/// inputs of the plan frames queued in `bytes`, in order).
#[derive(Debug, Default)]
pub(super) struct Outgoing {
    pub(super) bytes: Vec<u8>,
    pub(super) sections: Vec<(usize, Slice)>,
}

impl Outgoing {
    pub(super) fn len(&self) -> usize {
        self.bytes.len() + self.sections.iter().map(|(_, s)| s.bytes().len()).sum::<usize>()
    }

    /// The pieces in stream order, starting `skip` bytes in.
    fn pieces(&self, mut skip: usize) -> impl Iterator<Item = &[u8]> {
        let mut cursor = 0;
        let mut pieces = Vec::with_capacity(self.sections.len() * 2 + 1);
        for (offset, slice) in &self.sections {
            pieces.push(&self.bytes[cursor..*offset]);
            pieces.push(slice.bytes());
            cursor = *offset;
        }
        pieces.push(&self.bytes[cursor..]);
        pieces.into_iter().filter_map(move |piece| {
            if skip >= piece.len() {
                skip -= piece.len();
                None
            } else {
                let rest = &piece[skip..];
                skip = 0;
                Some(rest)
            }
        })
    }

    /// Everything in one contiguous buffer (the copying fallback).
    pub(super) fn flatten(&self) -> Vec<u8> {
        let mut flat = Vec::with_capacity(self.len());
        for piece in self.pieces(0) {
            flat.extend_from_slice(piece);
        }
        flat
    }
}

/// A send the kernel may still read from: its message and what its iovecs point into.
struct InFlight {
    _message: Box<Message>,
    _outgoing: Rc<Outgoing>,
    result: Outcome,
    /// Whether the kernel's notification is still to come.
    notification: bool,
}

/// Where a send's result is: not posted yet, posted, or taken by its writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Pending,
    Posted(i32),
    Taken,
}

/// A `msghdr` and its iovecs (the header points into `iovecs`).
struct Message {
    header: libc::msghdr,
    iovecs: Vec<libc::iovec>,
}

/// How a zero-copy send ended.
#[derive(Debug)]
pub(super) enum Sent {
    /// All of it went, zero-copy.
    Done,
    /// The kernel refused zero-copy after `sent` bytes: send the rest another way.
    Refused { sent: usize, error: std::io::Error },
}

/// One shard's zero-copy ring.
pub(super) struct ZeroCopy {
    ring: RefCell<IoUring>,
    in_flight: RefCell<HashMap<u64, InFlight>>,
    next_id: Cell<u64>,
    /// Set when a submission failed: the ring is never used again.
    broken: Cell<bool>,
}

fn ring_broken() -> std::io::Error {
    std::io::Error::other("the zero-copy ring was retired after a failed submission")
}

impl std::fmt::Debug for ZeroCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZeroCopy")
            .field("in_flight", &self.in_flight.borrow().len())
            .finish()
    }
}

impl ZeroCopy {
    /// A ring for this thread, or why there is none.
    pub(super) fn new() -> std::io::Result<ZeroCopy> {
        let ring = IoUring::new(RING_ENTRIES)?;
        let mut probe = io_uring::Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        if !probe.is_supported(opcode::SendMsgZc::CODE) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "this kernel's io_uring has no SENDMSG_ZC (Linux 6.1 or later has)",
            ));
        }
        Ok(ZeroCopy {
            ring: RefCell::new(ring),
            in_flight: RefCell::new(HashMap::new()),
            next_id: Cell::new(0),
            broken: Cell::new(false),
        })
    }

    /// Sends all of `outgoing` on socket `fd`, zero-copy, in order; returns when every byte
    /// is sent (the notifications may come later: the ring keeps `outgoing` until then).
    pub(super) async fn send(&self, fd: RawFd, outgoing: Rc<Outgoing>) -> std::io::Result<Sent> {
        let total = outgoing.len();
        let mut sent = 0;
        while sent < total {
            let id = match self.submit(fd, &outgoing, sent).await {
                Ok(id) => id,
                // The ring is retired: the rest goes out copied.
                Err(error) => return Ok(Sent::Refused { sent, error }),
            };
            let result = self.result_of(id).await;
            if result < 0 {
                let error = std::io::Error::from_raw_os_error(-result);
                return match -result {
                    libc::ENOMEM | libc::ENOBUFS | libc::EOPNOTSUPP | libc::EINVAL => Ok(Sent::Refused { sent, error }),
                    _ => Err(error),
                };
            }
            if result == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            sent += result as usize;
        }
        Ok(Sent::Done)
    }

    /// Sends in flight (still holding their buffers).
    #[cfg(test)]
    pub(super) fn in_flight(&self) -> usize {
        self.reap();
        self.in_flight.borrow().len()
    }

    /// Queues and submits one `sendmsg` of `outgoing` from byte `skip` on.
    async fn submit(&self, fd: RawFd, outgoing: &Rc<Outgoing>, skip: usize) -> std::io::Result<u64> {
        let iovecs: Vec<libc::iovec> = outgoing
            .pieces(skip)
            .take(IOV_MAX)
            .map(|piece| libc::iovec {
                iov_base: piece.as_ptr() as *mut libc::c_void,
                iov_len: piece.len(),
            })
            .collect();
        // SAFETY: an all-zero msghdr is a valid empty one.
        let mut message = Box::new(Message {
            header: unsafe { std::mem::zeroed() },
            iovecs,
        });
        message.header.msg_iov = message.iovecs.as_mut_ptr();
        message.header.msg_iovlen = message.iovecs.len() as _;
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let entry = opcode::SendMsgZc::new(types::Fd(fd), &message.header)
            .flags(libc::MSG_NOSIGNAL as u32 | libc::MSG_WAITALL as u32)
            .build()
            .user_data(id);
        self.in_flight.borrow_mut().insert(
            id,
            InFlight {
                _message: message,
                _outgoing: Rc::clone(outgoing),
                result: Outcome::Pending,
                notification: true,
            },
        );
        let mut backoff = Duration::from_micros(20);
        loop {
            if self.broken.get() {
                // Never submit on a ring whose submission failed (below).
                self.in_flight.borrow_mut().remove(&id);
                return Err(ring_broken());
            }
            let pushed = {
                let mut ring = self.ring.borrow_mut();
                // SAFETY: the message and every buffer its iovecs point into live in
                // `in_flight` until the kernel's last completion for this id is read.
                let pushed = unsafe { ring.submission().push(&entry) }.is_ok();
                pushed
            };
            match self.submit_queued() {
                Ok(()) if pushed => return Ok(id),
                Ok(()) => {}
                Err(error) if pushed => {
                    // The entry sits in the submission queue with a raw descriptor that may
                    // be closed and reused: this ring never submits again (`broken`), and
                    // the entry's buffers stay in `in_flight`, so nothing it points to is
                    // ever freed under it. Sends of this shard are copied from now on.
                    self.broken.set(true);
                    return Err(error);
                }
                Err(error) => {
                    self.broken.set(true);
                    self.in_flight.borrow_mut().remove(&id);
                    return Err(error);
                }
            }
            // The submission queue is full: wait for room.
            self.reap();
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(1));
        }
    }

    /// Submits what the submission queue holds, retrying what the kernel asks to retry.
    fn submit_queued(&self) -> std::io::Result<()> {
        for _ in 0..SUBMIT_RETRY_LIMIT {
            let submitted = self.ring.borrow_mut().submit();
            match submitted {
                Ok(_) => return Ok(()),
                Err(error) if matches!(error.raw_os_error(), Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {
                    // EBUSY/EAGAIN: completions must be read first.
                    self.reap();
                }
                Err(error) => return Err(error),
            }
        }
        Err(std::io::Error::other("io_uring submit kept failing"))
    }

    /// Whether a failed submission retired this ring (its sends fall back to copies).
    pub(super) fn is_broken(&self) -> bool {
        self.broken.get()
    }

    /// Waits for the result of send `id`.
    async fn result_of(&self, id: u64) -> i32 {
        let mut backoff = Duration::from_micros(10);
        loop {
            if let Some(result) = self.take_result(id) {
                return result;
            }
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(1));
        }
    }

    /// The result of send `id` if posted (the entry stays while a notification is due).
    fn take_result(&self, id: u64) -> Option<i32> {
        self.reap();
        let mut in_flight = self.in_flight.borrow_mut();
        let entry = in_flight
            .get_mut(&id)
            .expect("a submitted send stays until its result is taken");
        let Outcome::Posted(result) = entry.result else {
            return None;
        };
        entry.result = Outcome::Taken;
        if !entry.notification {
            in_flight.remove(&id);
        }
        Some(result)
    }

    /// Reads the completions posted so far (no system call): results for their writers,
    /// notifications free their buffers.
    fn reap(&self) {
        let mut ring = self.ring.borrow_mut();
        let mut in_flight = self.in_flight.borrow_mut();
        for cqe in ring.completion() {
            let id = cqe.user_data();
            let Some(entry) = in_flight.get_mut(&id) else {
                continue;
            };
            if cqueue::notif(cqe.flags()) {
                entry.notification = false;
            } else {
                entry.result = Outcome::Posted(cqe.result());
                // Without IORING_CQE_F_MORE no notification follows.
                entry.notification = cqueue::more(cqe.flags());
            }
            if entry.result == Outcome::Taken && !entry.notification {
                in_flight.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffers::ReadBuffer;
    use futures_lite::io::AsyncReadExt;
    use glommio::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    /// A queue of head bytes with input slices spliced in arrives byte for byte, zero-copy,
    /// and the ring lets go of every buffer once the kernel has notified.
    #[test]
    fn sections_arrive_in_order_and_buffers_are_released() {
        glommio::LocalExecutorBuilder::default()
            .io_memory(256 << 10)
            .ring_depth(32)
            .spawn(|| async {
                let ring = match ZeroCopy::new() {
                    Ok(ring) => ring,
                    Err(error) => {
                        println!("skipped: no zero-copy sends here ({error})");
                        return;
                    }
                };
                // Two receive buffers' worth of inputs (1 MiB in all, so the socket fills
                // and the send completes in parts), spliced between head bytes.
                let mut inputs = ReadBuffer::new(1 << 20, 1 << 20);
                let filled = inputs.spare().unwrap();
                for (i, byte) in filled.iter_mut().enumerate() {
                    *byte = (i % 251) as u8;
                }
                inputs.advance(1 << 20);
                let whole = inputs.filled();
                let first = inputs.slice_of(&whole[..300_000]);
                let second = inputs.slice_of(&whole[300_000..]);
                let outgoing = Rc::new(Outgoing {
                    bytes: b"head-one|head-two|tail".to_vec(),
                    sections: vec![(9, first), (18, second)],
                });
                let mut expected = b"head-one|".to_vec();
                expected.extend_from_slice(&whole[..300_000]);
                expected.extend_from_slice(b"head-two|");
                expected.extend_from_slice(&whole[300_000..]);
                expected.extend_from_slice(b"tail");
                assert_eq!(outgoing.len(), expected.len());
                assert_eq!(outgoing.flatten(), expected);

                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let reader = glommio::spawn_local(async move {
                    let mut stream = listener.accept().await.unwrap();
                    let mut received = Vec::new();
                    stream.read_to_end(&mut received).await.unwrap();
                    received
                });
                let stream = TcpStream::connect(addr).await.unwrap();
                let sent = ring.send(stream.as_raw_fd(), Rc::clone(&outgoing)).await.unwrap();
                assert!(matches!(sent, Sent::Done), "{sent:?}");
                drop(stream);
                assert_eq!(reader.await, expected);
                // The notifications free the buffers (the queue's last reference is ours).
                for _ in 0..1000 {
                    if ring.in_flight() == 0 {
                        break;
                    }
                    glommio::timer::sleep(Duration::from_millis(1)).await;
                }
                assert_eq!(ring.in_flight(), 0);
                assert_eq!(Rc::strong_count(&outgoing), 1);
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
