//! A blocking, pipelining client of the Symphony wire protocol (`docs/protocol.md`).
//!
//! What it is: std only (no glommio, no async): one TCP connection, requests encoded with
//! [`symphony_core::wire`] into a reused write buffer and written many frames per write,
//! replies read many frames per read into a reused receive buffer, cut out by [`FrameDecoder`]
//! and validated in place. It works against any server that speaks the protocol.
//!
//! - [`Client`] is the whole connection for one thread: [`Client::send`] any number of
//!   requests, [`Client::flush`], then [`Client::recv`] (owned [`Reply`]) or
//!   [`Client::recv_with`] (zero copy, `&ArchivedReply`) in arrival order; or [`Client::call`]
//!   for one request and its reply.
//! - [`Client::split`] gives a [`Sender`] and a [`Receiver`] for two threads (the load generator
//!   writes on one and reads on the other: open loop). Both halves hold the same socket
//!   (`TcpStream::try_clone`; with TLS, one session too: [`crate::tls::Stream`]).
//! - [`Client::connect_tls`] speaks TLS to a service with `[tls]` on its client port.
//!
//! Replies come in any order; match them by `client_request_id` (the caller chooses ids and keeps
//! them unique among its requests in flight). Bytes from the server are never trusted: a frame
//! that fails decoding or validation is a typed [`ClientError::Protocol`], an ERROR frame is
//! [`ClientError::Server`], a closed connection is [`ClientError::Closed`]; nothing here panics
//! on server bytes. After a protocol violation or an ERROR frame the client closes the
//! connection (sending an ERROR frame first on a violation, as the protocol asks), and every
//! later receive is [`ClientError::Failed`].
//!
//! Allocation: in steady state none per request. The write buffer keeps its capacity; the
//! receive buffer grows only to hold the largest frame seen (at most the 8 MiB frame cap plus
//! one read). [`Client::recv`] allocates the reply's output; [`Client::recv_with`] and
//! [`Receiver::recv_batch_with`] do not.
//!
//! [`Client::list_models`] asks the service for its models (LIST_MODELS).
//!
//! What it is not: no reconnection, no retries, no connection pool.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};

use crate::tls::{ClientTls, Stream};
use std::time::Duration;

use symphony_core::wire::{
    access_error, access_reply, decode_models, encode_error, encode_list_models, encode_request, ArchivedReply,
    Decoded, ErrorCode, FrameDecoder, Kind, ModelRef, Models, Reply, RequestRef, Timings, WireError, FRAME_HEADER_SIZE,
    FRAME_PAYLOAD_LIMIT,
};

/// Initial size of the receive buffer, and the least free space a read is given.
pub const READ_CHUNK_SIZE: usize = 64 * 1024;
/// [`Sender::send`] writes the buffer out first when it already holds this many bytes, so the
/// write buffer stays bounded even if the caller never flushes.
pub const WRITE_BUFFER_FLUSH_SIZE: usize = 1024 * 1024;
/// The receive buffer never grows past one whole frame of the largest size plus one read.
pub const READ_BUFFER_SIZE_MAX: usize = FRAME_HEADER_SIZE + FRAME_PAYLOAD_LIMIT as usize + READ_CHUNK_SIZE;
/// The least free space a read gets (smaller holes are grown first, not read into).
const READ_SIZE_MIN: usize = 4 * 1024;
/// How long the best-effort ERROR frame sent on a protocol violation may block.
const ERROR_FRAME_WRITE_TIMEOUT: Duration = Duration::from_millis(100);

const _: () = {
    assert!(READ_SIZE_MIN <= READ_CHUNK_SIZE);
    assert!(READ_CHUNK_SIZE <= READ_BUFFER_SIZE_MAX);
    // A whole frame and a minimal read always fit the largest buffer.
    assert!(FRAME_HEADER_SIZE + FRAME_PAYLOAD_LIMIT as usize + READ_SIZE_MIN <= READ_BUFFER_SIZE_MAX);
};

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A socket error other than a closed connection or a timeout (connect refused, ...).
    #[error("i/o error: {0}")]
    Io(#[source] io::Error),
    /// The server closed the connection (or reset it). Requests without a reply have no
    /// outcome: they may or may not have run.
    #[error("connection closed by the server")]
    Closed,
    /// The read (or write) timeout set on the connection passed. Nothing was lost: call again.
    #[error("timed out")]
    Timeout,
    /// The server sent an ERROR frame (and closes the connection).
    #[error("server error {code:?}: {message}")]
    Server { code: ErrorCode, message: String },
    /// The server's bytes failed decoding or validation.
    #[error("protocol violation by the server: {0}")]
    Protocol(#[source] WireError),
    /// The server sent a valid frame of a kind a client does not accept (a REQUEST).
    #[error("the server sent a {kind} frame, which a client does not accept")]
    UnexpectedKind { kind: Kind },
    /// [`Client::call`] got a reply to another request than its own.
    #[error("reply to request {client_request_id}, which is not in flight")]
    UnexpectedReply { client_request_id: u64 },
    /// The request cannot be encoded (its input is over the frame cap); nothing was sent.
    #[error("cannot encode the request: {0}")]
    Encode(#[source] WireError),
    /// [`Client::call`] needs a connection with no other request in flight.
    #[error("{in_flight} requests in flight; `call` needs none")]
    Busy { in_flight: u64 },
    /// An earlier receive ended the connection (ERROR frame or protocol violation).
    #[error("the connection failed earlier; open a new one")]
    Failed,
}

fn io_error(error: io::Error) -> ClientError {
    match error.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout,
        io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe
        | io::ErrorKind::NotConnected
        | io::ErrorKind::UnexpectedEof => ClientError::Closed,
        _ => ClientError::Io(error),
    }
}

/// Copies a validated archived reply out.
pub fn reply_owned(reply: &ArchivedReply) -> Reply {
    Reply {
        client_request_id: reply.client_request_id.to_native(),
        status: reply.status,
        timings: Timings {
            queued_us: reply.timings.queued_us.to_native(),
            exec_us: reply.timings.exec_us.to_native(),
            total_us: reply.timings.total_us.to_native(),
        },
        output: reply.output.as_slice().to_vec(),
    }
}

// ---------------------------------------------------------------------------------------------
// Sender.

/// The writing half: encodes requests into a reused buffer and writes it out on [`flush`].
///
/// [`flush`]: Sender::flush
#[derive(Debug)]
pub struct Sender {
    stream: Stream,
    buffer: Vec<u8>,
    /// Bytes at the front of `buffer` already written (after a flush that timed out).
    written: usize,
}

impl Sender {
    fn new(stream: Stream) -> Sender {
        Sender {
            stream,
            buffer: Vec::with_capacity(READ_CHUNK_SIZE),
            written: 0,
        }
    }

    /// Encodes one request into the write buffer; nothing is written until [`Sender::flush`]
    /// (or until the buffer holds [`WRITE_BUFFER_FLUSH_SIZE`] bytes, when this writes the
    /// buffer out first). On error this request was not buffered.
    pub fn send(
        &mut self,
        client_request_id: u64,
        model: &ModelRef,
        slo_us: Option<u32>,
        input: &[u8],
    ) -> Result<(), ClientError> {
        if self.buffer.len() >= WRITE_BUFFER_FLUSH_SIZE {
            self.flush()?;
        }
        let request = RequestRef {
            client_request_id,
            model,
            slo_us,
            input,
        };
        encode_request(&mut self.buffer, &request).map_err(ClientError::Encode)?;
        Ok(())
    }

    /// Bytes encoded and not yet written.
    pub fn buffered_len(&self) -> usize {
        assert!(self.written <= self.buffer.len());
        self.buffer.len() - self.written
    }

    /// Writes every buffered frame, as few writes as the socket allows (one, normally). On
    /// [`ClientError::Timeout`] (a write timeout is set and the server does not read) the
    /// unwritten bytes stay buffered and the next flush resumes where this one stopped.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        while self.written < self.buffer.len() {
            match self.stream.write(&self.buffer[self.written..]) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => self.written += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(io_error(error)),
            }
        }
        assert_eq!(self.written, self.buffer.len());
        self.buffer.clear();
        self.written = 0;
        // TLS: the records of what was written may wait for the socket; a timeout here
        // leaves them queued in order, and the next flush sends them first.
        self.stream.flush().map_err(io_error)
    }

    /// A timeout for each write of [`Sender::flush`]; `None` blocks as long as needed.
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_write_timeout(timeout).map_err(ClientError::Io)
    }

    /// Closes the writing direction (the server sees the end of the stream after the frames
    /// already written). Buffered frames are not flushed.
    pub fn shutdown_write(&self) -> Result<(), ClientError> {
        self.stream.shutdown(Shutdown::Write).map_err(io_error)
    }
}

// ---------------------------------------------------------------------------------------------
// Receiver.

/// The reading half: reads many frames per read, yields replies in arrival order.
#[derive(Debug)]
pub struct Receiver {
    stream: Stream,
    /// `buffer[start..end]` holds received bytes not yet consumed; the vector's whole length is
    /// usable space.
    buffer: Vec<u8>,
    start: usize,
    end: usize,
    decoder: FrameDecoder,
    failed: bool,
}

impl Receiver {
    fn new(stream: Stream) -> Receiver {
        Receiver {
            stream,
            buffer: vec![0u8; READ_CHUNK_SIZE],
            start: 0,
            end: 0,
            decoder: FrameDecoder::default(),
            failed: false,
        }
    }

    /// A timeout for each read; `None` blocks as long as needed. A receive that times out
    /// returns [`ClientError::Timeout`] and loses nothing.
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.stream.set_read_timeout(timeout).map_err(ClientError::Io)
    }

    /// The next reply, copied out.
    pub fn recv(&mut self) -> Result<Reply, ClientError> {
        self.recv_with(reply_owned)
    }

    /// The next reply, validated in place and handed to `f` (no copy, no allocation).
    pub fn recv_with<R>(&mut self, f: impl FnOnce(&ArchivedReply) -> R) -> Result<R, ClientError> {
        let mut f = Some(f);
        let mut result = None;
        let mut once = |reply: &ArchivedReply| {
            if let Some(f) = f.take() {
                result = Some(f(reply));
            }
        };
        loop {
            let (count, missing_min) = self.take_buffered(1, &mut once)?;
            if count == 1 {
                break;
            }
            self.fill(missing_min)?;
        }
        result.ok_or(ClientError::Failed)
    }

    /// Blocks until at least one reply has arrived, then hands `f` every complete reply
    /// received so far (all that one read brought, typically), in arrival order; returns how
    /// many. A bad frame after good ones is reported by the next call.
    pub fn recv_batch_with(&mut self, mut f: impl FnMut(&ArchivedReply)) -> Result<usize, ClientError> {
        loop {
            let (count, missing_min) = self.take_buffered(usize::MAX, &mut f)?;
            if count > 0 {
                return Ok(count);
            }
            self.fill(missing_min)?;
        }
    }

    /// Hands `f` up to `limit` complete replies from the buffer. Returns how many, and when it
    /// stopped for lack of bytes, how many more the next frame needs at least (0 otherwise).
    /// A bad or ERROR frame stops it: reported now if no reply was handed over, else left in
    /// the buffer for the next call.
    fn take_buffered(
        &mut self,
        limit: usize,
        f: &mut impl FnMut(&ArchivedReply),
    ) -> Result<(usize, usize), ClientError> {
        if self.failed {
            return Err(ClientError::Failed);
        }
        let mut count = 0;
        while count < limit {
            assert!(self.start <= self.end && self.end <= self.buffer.len());
            let frame = match self.decoder.decode(&self.buffer[self.start..self.end]) {
                Ok(Decoded::Frame(frame)) => frame,
                Ok(Decoded::Incomplete { missing_min }) => {
                    assert!(missing_min > 0);
                    return Ok((count, missing_min));
                }
                Err(error) => {
                    let code = error.error_code();
                    return self.stop(count, code, ClientError::Protocol(error));
                }
            };
            let frame_size = frame.size();
            let stop = match frame.kind {
                Kind::Reply => match access_reply(frame.payload) {
                    Ok(reply) => {
                        f(reply);
                        None
                    }
                    Err(error) => Some((Some(ErrorCode::Malformed), ClientError::Protocol(error))),
                },
                Kind::Error => match access_error(frame.payload) {
                    Ok(error) => Some((
                        None,
                        ClientError::Server {
                            code: error.code,
                            message: error.message.as_str().to_owned(),
                        },
                    )),
                    Err(error) => Some((Some(ErrorCode::Malformed), ClientError::Protocol(error))),
                },
                kind => Some((Some(ErrorCode::UnexpectedKind), ClientError::UnexpectedKind { kind })),
            };
            if let Some((code, error)) = stop {
                return self.stop(count, code, error);
            }
            self.start += frame_size;
            count += 1;
        }
        Ok((count, 0))
    }

    /// Ends a batch at a frame that ends the connection: the replies before it go to the caller
    /// first, the frame stays buffered and ends the connection on the next call.
    fn stop(
        &mut self,
        count: usize,
        code: Option<ErrorCode>,
        error: ClientError,
    ) -> Result<(usize, usize), ClientError> {
        if count > 0 {
            return Ok((count, 0));
        }
        Err(self.fail(code, error))
    }

    /// Closes the connection after an ERROR frame or a protocol violation. On a violation
    /// the server is told why first (best effort, bounded by a short write timeout; it is
    /// shared with the [`Sender`], whose connection ends here anyway).
    fn fail(&mut self, code: Option<ErrorCode>, error: ClientError) -> ClientError {
        self.failed = true;
        if let Some(code) = code {
            let mut frame = Vec::new();
            if encode_error(&mut frame, code, &error.to_string()).is_ok()
                && self.stream.set_write_timeout(Some(ERROR_FRAME_WRITE_TIMEOUT)).is_ok()
            {
                let _ = self.stream.write_all(&frame);
            }
        }
        let _ = self.stream.shutdown(Shutdown::Both);
        error
    }

    /// The next frame, which must be a MODELS answer (no reply may come before it).
    fn recv_models(&mut self) -> Result<Models, ClientError> {
        loop {
            if self.failed {
                return Err(ClientError::Failed);
            }
            let frame = match self.decoder.decode(&self.buffer[self.start..self.end]) {
                Ok(Decoded::Frame(frame)) => frame,
                Ok(Decoded::Incomplete { missing_min }) => {
                    self.fill(missing_min)?;
                    continue;
                }
                Err(error) => {
                    let code = error.error_code();
                    return Err(self.fail(code, ClientError::Protocol(error)));
                }
            };
            let frame_size = frame.size();
            let outcome = match frame.kind {
                Kind::Models => {
                    decode_models(frame.payload).map_err(|e| (Some(ErrorCode::Malformed), ClientError::Protocol(e)))
                }
                Kind::Error => Err(match access_error(frame.payload) {
                    Ok(error) => (
                        None,
                        ClientError::Server {
                            code: error.code,
                            message: error.message.as_str().to_owned(),
                        },
                    ),
                    Err(error) => (Some(ErrorCode::Malformed), ClientError::Protocol(error)),
                }),
                kind => Err((Some(ErrorCode::UnexpectedKind), ClientError::UnexpectedKind { kind })),
            };
            return match outcome {
                Ok(models) => {
                    self.start += frame_size;
                    Ok(models)
                }
                Err((code, error)) => Err(self.fail(code, error)),
            };
        }
    }

    /// Reads once, after making room for at least `missing_min` more bytes.
    fn fill(&mut self, missing_min: usize) -> Result<(), ClientError> {
        assert!(missing_min > 0);
        // Move the partial frame (usually less than one frame) to the front.
        if self.start > 0 {
            self.buffer.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let free = self.buffer.len() - self.end;
        if free < missing_min || free < READ_SIZE_MIN {
            let wanted = (self.end + missing_min.max(READ_SIZE_MIN)).max(self.buffer.len() * 2);
            let size = wanted.min(READ_BUFFER_SIZE_MAX);
            // The decoder caps a frame at FRAME_HEADER_SIZE + FRAME_PAYLOAD_LIMIT bytes.
            assert!(size >= self.end + missing_min);
            self.buffer.resize(size, 0);
        }
        loop {
            match self.stream.read(&mut self.buffer[self.end..]) {
                Ok(0) => return Err(ClientError::Closed),
                Ok(n) => {
                    self.end += n;
                    assert!(self.end <= self.buffer.len());
                    return Ok(());
                }
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(io_error(error)),
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client.

/// One connection for one thread: pipelined sends, replies in arrival order.
#[derive(Debug)]
pub struct Client {
    sender: Sender,
    receiver: Receiver,
    peer: SocketAddr,
    /// Requests sent and not yet answered (sends minus replies received).
    in_flight: u64,
    /// The id [`Client::call`] uses next.
    call_id_next: u64,
}

impl Client {
    /// Connects, with `TCP_NODELAY` on (frames are batched by the caller, not by Nagle).
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Client, ClientError> {
        let stream = TcpStream::connect(addr).map_err(ClientError::Io)?;
        Client::from_stream(stream)
    }

    /// Connects with TLS to a service with `[tls]` on its client port, checking its
    /// certificate against `tls` (and the host of `addr`, unless `tls` names another).
    pub fn connect_tls(addr: &str, tls: &ClientTls) -> Result<Client, ClientError> {
        let socket = TcpStream::connect(addr).map_err(ClientError::Io)?;
        socket.set_nodelay(true).map_err(ClientError::Io)?;
        let peer = socket.peer_addr().map_err(ClientError::Io)?;
        let stream = Stream::open(socket, addr, Some(tls)).map_err(ClientError::Io)?;
        Client::from_parts(stream, peer)
    }

    /// Wraps a connected stream (sets `TCP_NODELAY`).
    pub fn from_stream(stream: TcpStream) -> Result<Client, ClientError> {
        stream.set_nodelay(true).map_err(ClientError::Io)?;
        let peer = stream.peer_addr().map_err(ClientError::Io)?;
        Client::from_parts(Stream::Plain(stream), peer)
    }

    fn from_parts(stream: Stream, peer: SocketAddr) -> Result<Client, ClientError> {
        let read_stream = stream.try_clone().map_err(ClientError::Io)?;
        Ok(Client {
            sender: Sender::new(stream),
            receiver: Receiver::new(read_stream),
            peer,
            in_flight: 0,
            call_id_next: 0,
        })
    }

    /// The server's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Requests sent (buffered included) and not yet answered.
    pub fn in_flight(&self) -> u64 {
        self.in_flight
    }

    /// A timeout for each read; see [`Receiver::set_read_timeout`].
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.receiver.set_read_timeout(timeout)
    }

    /// A timeout for each write; see [`Sender::set_write_timeout`].
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> Result<(), ClientError> {
        self.sender.set_write_timeout(timeout)
    }

    /// Buffers one request; see [`Sender::send`]. `slo_us`: a tighter SLO, `None` for the
    /// model's own.
    pub fn send(
        &mut self,
        client_request_id: u64,
        model: &ModelRef,
        slo_us: Option<u32>,
        input: &[u8],
    ) -> Result<(), ClientError> {
        self.sender.send(client_request_id, model, slo_us, input)?;
        self.in_flight += 1;
        Ok(())
    }

    /// Writes every buffered request; see [`Sender::flush`].
    pub fn flush(&mut self) -> Result<(), ClientError> {
        self.sender.flush()
    }

    /// Flushes, then returns the next reply in arrival order, copied out.
    pub fn recv(&mut self) -> Result<Reply, ClientError> {
        self.recv_with(reply_owned)
    }

    /// Flushes, then hands the next reply to `f`, validated in place (zero copy).
    pub fn recv_with<R>(&mut self, f: impl FnOnce(&ArchivedReply) -> R) -> Result<R, ClientError> {
        self.sender.flush()?;
        let result = self.receiver.recv_with(f)?;
        self.in_flight = self.in_flight.saturating_sub(1);
        Ok(result)
    }

    /// One request and its reply. Needs no other request in flight (else
    /// [`ClientError::Busy`]); the id is chosen here.
    pub fn call(&mut self, model: &ModelRef, slo_us: Option<u32>, input: &[u8]) -> Result<Reply, ClientError> {
        if self.in_flight > 0 {
            return Err(ClientError::Busy {
                in_flight: self.in_flight,
            });
        }
        let id = self.call_id_next;
        self.call_id_next = self.call_id_next.wrapping_add(1);
        self.send(id, model, slo_us, input)?;
        let reply = self.recv()?;
        if reply.client_request_id != id {
            return Err(ClientError::UnexpectedReply {
                client_request_id: reply.client_request_id,
            });
        }
        Ok(reply)
    }

    /// The models the service serves (LIST_MODELS): names, ids, SLOs, input sizes. Needs no
    /// request in flight (else [`ClientError::Busy`]).
    pub fn list_models(&mut self) -> Result<Models, ClientError> {
        if self.in_flight > 0 {
            return Err(ClientError::Busy {
                in_flight: self.in_flight,
            });
        }
        let id = self.call_id_next;
        self.call_id_next = self.call_id_next.wrapping_add(1);
        encode_list_models(&mut self.sender.buffer, id).map_err(ClientError::Encode)?;
        self.sender.flush()?;
        let models = self.receiver.recv_models()?;
        if models.client_request_id != id {
            return Err(ClientError::UnexpectedReply {
                client_request_id: models.client_request_id,
            });
        }
        Ok(models)
    }

    /// The two halves, for a writing thread and a reading thread. Buffered requests stay in
    /// the [`Sender`].
    pub fn split(self) -> (Sender, Receiver) {
        (self.sender, self.receiver)
    }
}
