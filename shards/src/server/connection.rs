//! Connections of a shard: accepting them within their limits, reading client frames with
//! backpressure, and writing what the shard queues, with a stall timeout.
//!
//! Every port has a cap (`limits.connections_per_shard`, `limits.links_per_shard`). At the
//! cap a new connection takes the place of the oldest one that never sent a frame (which is
//! told why, with an ERROR `OVERLOADED`, and closed); when every connection has sent one, the
//! new one gets that ERROR itself. Accept errors (descriptors exhausted) back off instead of
//! spinning, so a shard keeps serving its connections, timers and mesh meanwhile.
//!
//! A client connection is read only while it is not over its limits: its queued replies
//! (`limits.write_buffer_bytes`, counting what the writer holds), its requests without a reply
//! (`limits.requests_per_connection`), and the mesh's backlog ([`super::mesh`]). Otherwise
//! the shard waits for the writer's progress: a client that never reads is pushed back on by
//! TCP, and costs a bounded amount of memory. A client that half-closes (EOF on the read side)
//! keeps its connection until every reply it is owed is written. A writer whose socket accepts
//! nothing for `write_stall_timeout_ms` ends the connection.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::{TcpListener, TcpStream};
use symphony_core::wire::{self, ErrorCode, FrameDecoder};

use super::tls::{self, Stream};
use super::{zerocopy, Shard, STOP_POLL};
use crate::buffers::{ReadBuffer, Slice, READ_BUFFER_INITIAL_BYTES};
use crate::shard::{ConnectionKey, Input, Peer, ShardCore};

/// A writer's buffer larger than this is given back once written (idle connections stay
/// small).
const WRITE_BUFFER_KEEP_BYTES: usize = 256 << 10;
/// Connections taken out to make room that may still be closing; past it the accept loop
/// waits a moment before it evicts more.
pub(super) const EVICTING_LIMIT: usize = 8;
/// Refusals being written at once (each holds a descriptor for at most a moment).
pub(super) const REFUSING_LIMIT: usize = 8;
/// Frames one connection handles before it lets the shard's other tasks run (a flood on a
/// few connections does not hold up a new client, its accept, timers or the mesh).
pub(super) const FRAMES_PER_TURN: usize = 256;

/// Why a turn of a connection's frames ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum TurnEnd {
    /// Every complete frame in the buffer was handled.
    Drained,
    /// The connection is at one of its limits: the rest waits.
    AtLimit,
    /// [`FRAMES_PER_TURN`] were handled: the other connections get theirs.
    TurnOver,
    /// A framing error, or a frame that ended the connection.
    Failed,
}
/// How long a refused connection's ERROR frame may take to write.
pub(super) const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_millis(200);
/// Accept errors back off from the first to the last of these.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(1);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(200);

/// The largest frame a connection reads.
pub(super) fn frame_limit() -> usize {
    wire::FRAME_HEADER_SIZE + wire::FRAME_PAYLOAD_LIMIT as usize
}

/// A connection's outgoing side and its state, shared by its reader, its writer and the
/// shard (which queues replies, plans and errors on it).
#[derive(Debug)]
pub(super) struct Connection {
    /// Frames waiting for the writer.
    pub(super) out: RefCell<Vec<u8>>,
    /// Bytes that belong in `out` at the given offsets but stay where they were read: the
    /// inputs of plan frames sent zero-copy (executor links only).
    pub(super) sections: RefCell<Vec<(usize, Slice)>>,
    section_bytes: Cell<usize>,
    /// Bytes the writer has taken from the queue and not written yet.
    writing: Cell<usize>,
    /// Wakes the writer; holds at most one token.
    notify: LocalSender<()>,
    /// Wakes a reader waiting for the writer or for replies; at most one token.
    wake: LocalSender<()>,
    /// Tells a reader blocked in `read` to stop (eviction, a dead writer).
    stop_reading: LocalSender<()>,
    /// Set when the connection must close after what is queued has been written.
    closing: Cell<bool>,
    /// The writer ended (an error, a stall, the close): nothing more is written.
    dead: Cell<bool>,
    /// Taken out to make room for a new connection.
    evicted: Cell<bool>,
    /// A frame was read from it (a connection that never sent one is evicted first).
    pub(super) active: Cell<bool>,
    /// The reader waits for room or for its replies (replies wake it).
    reader_waits: Cell<bool>,
    /// In the mesh's line of connections waiting for room.
    pub(super) mesh_waiting: Cell<bool>,
    /// Its turn came in that line: it handles one round of frames whatever the backlog.
    pub(super) mesh_turn: Cell<bool>,
    /// Accept order.
    serial: u64,
}

/// The receivers of a new connection's channels, for its reader and writer.
pub(super) struct Receivers {
    pub(super) notify: LocalReceiver<()>,
    pub(super) wake: LocalReceiver<()>,
    pub(super) stop_reading: LocalReceiver<()>,
}

impl Connection {
    pub(super) fn new(serial: u64) -> (Rc<Connection>, Receivers) {
        let (notify, notify_rx) = local_channel::new_bounded(1);
        let (wake, wake_rx) = local_channel::new_bounded(1);
        let (stop_reading, stop_rx) = local_channel::new_bounded(1);
        let connection = Rc::new(Connection {
            out: RefCell::new(Vec::new()),
            sections: RefCell::new(Vec::new()),
            section_bytes: Cell::new(0),
            writing: Cell::new(0),
            notify,
            wake,
            stop_reading,
            closing: Cell::new(false),
            dead: Cell::new(false),
            evicted: Cell::new(false),
            active: Cell::new(false),
            reader_waits: Cell::new(false),
            mesh_waiting: Cell::new(false),
            mesh_turn: Cell::new(false),
            serial,
        });
        let receivers = Receivers {
            notify: notify_rx,
            wake: wake_rx,
            stop_reading: stop_rx,
        };
        (connection, receivers)
    }

    /// Bytes queued and not yet written (the writer's current buffer included).
    pub(super) fn queued_bytes(&self) -> usize {
        self.out.borrow().len() + self.section_bytes.get() + self.writing.get()
    }

    /// Queues a zero-copy section (its bytes go after `out`'s current end).
    pub(super) fn push_section(&self, slice: Slice) {
        let at = self.out.borrow().len();
        self.section_bytes.set(self.section_bytes.get() + slice.bytes().len());
        self.sections.borrow_mut().push((at, slice));
    }

    pub(super) fn is_dead(&self) -> bool {
        self.dead.get()
    }

    /// Wakes the writer (after queueing bytes).
    pub(super) fn wake_writer(&self) {
        let _ = self.notify.try_send(());
    }

    /// Wakes a reader that waits for room or for its replies.
    pub(super) fn wake_reader(&self) {
        let _ = self.wake.try_send(());
    }

    /// Wakes the reader if it waits (a reply went out).
    pub(super) fn wake_waiting_reader(&self) {
        if self.reader_waits.get() {
            self.wake_reader();
        }
    }

    /// Closes once what is queued is written.
    pub(super) fn close_after_writing(&self) {
        self.closing.set(true);
        self.wake_writer();
    }

    /// Stops the reader (it ends its connection).
    pub(super) fn stop_reader(&self) {
        let _ = self.stop_reading.try_send(());
    }

    /// The core closed it (a protocol error, the drain) or made room with it.
    pub(super) fn is_ending(&self) -> bool {
        self.closing.get() || self.evicted.get()
    }

    /// Nothing more goes out (an HTTP connection whose peer left): what the core queues
    /// for it from now on is dropped.
    pub(super) fn mark_dead(&self) {
        self.dead.set(true);
        self.out.borrow_mut().clear();
    }

    /// Queues an ERROR frame and closes after it; the reader stops.
    fn fail(&self, code: ErrorCode, message: &str) {
        let _ = wire::encode_error(&mut self.out.borrow_mut(), code, message);
        self.close_after_writing();
        self.stop_reader();
    }

    /// Takes the connection out to make room: an ERROR `OVERLOADED`, then the close.
    fn evict(&self, why: &str) {
        self.evicted.set(true);
        self.fail(ErrorCode::Overloaded, why);
    }
}

/// The connections of one port of a shard, by slot and generation.
#[derive(Debug)]
pub(super) struct Slots {
    entries: Vec<Option<Rc<Connection>>>,
    generations: Vec<u32>,
    open: usize,
    /// Evicted and not closed yet.
    evicting: usize,
    /// Refusals being written.
    pub(super) refusing: usize,
    limit: usize,
    next_serial: u64,
}

/// What to do with a newly accepted connection.
pub(super) enum Admission {
    /// Serve it (a connection that never sent a frame may have been evicted for it).
    Serve(ConnectionKey, Rc<Connection>, Box<Receivers>),
    /// Over the limit with no idle connection to take out: refuse it with an error.
    Refuse,
    /// Over the limit while too many evicted connections are still closing: drop it.
    Drop,
}

impl Slots {
    pub(super) fn new(limit: usize) -> Slots {
        Slots {
            entries: Vec::new(),
            generations: Vec::new(),
            open: 0,
            evicting: 0,
            refusing: 0,
            limit,
            next_serial: 0,
        }
    }

    /// Bytes queued on all open connections and not written yet.
    pub(super) fn queued_bytes(&self) -> usize {
        self.entries
            .iter()
            .flatten()
            .filter(|c| !c.is_dead())
            .map(|c| c.queued_bytes())
            .sum()
    }

    /// Admits a new connection, evicting the oldest idle one at the limit.
    pub(super) fn admit(&mut self, why_evicted: &str) -> Admission {
        if self.open - self.evicting >= self.limit {
            if self.evicting >= EVICTING_LIMIT {
                return Admission::Drop;
            }
            let victim = self
                .entries
                .iter()
                .flatten()
                .filter(|c| !c.active.get() && !c.evicted.get())
                .min_by_key(|c| c.serial)
                .cloned();
            match victim {
                Some(victim) => {
                    victim.evict(why_evicted);
                    self.evicting += 1;
                }
                None => return Admission::Refuse,
            }
        }
        let serial = self.next_serial;
        self.next_serial += 1;
        let (connection, receivers) = Connection::new(serial);
        let slot = match self.entries.iter().position(Option::is_none) {
            Some(free) => free,
            None => {
                self.entries.push(None);
                self.generations.push(0);
                self.entries.len() - 1
            }
        };
        self.entries[slot] = Some(Rc::clone(&connection));
        self.open += 1;
        let key = ConnectionKey::new(slot as u32, self.generations[slot]);
        Admission::Serve(key, connection, Box::new(receivers))
    }

    /// The open connection with `key` (a reused slot never answers for an older one).
    pub(super) fn get(&self, key: ConnectionKey) -> Option<Rc<Connection>> {
        let slot = key.slot() as usize;
        if self.generations.get(slot) != Some(&key.generation()) {
            return None;
        }
        self.entries.get(slot)?.clone()
    }

    /// The connection closed: its slot is free, and its key will never match again.
    pub(super) fn remove(&mut self, key: ConnectionKey) {
        let slot = key.slot() as usize;
        if self.generations.get(slot) != Some(&key.generation()) {
            return;
        }
        if let Some(connection) = self.entries[slot].take() {
            self.open -= 1;
            if connection.evicted.get() {
                self.evicting -= 1;
            }
        }
        self.generations[slot] = self.generations[slot].wrapping_add(1);
    }
}

/// The next accepted connection, or `None` once the service stops. An accept error (no
/// descriptor left, no memory) backs off, doubling up to [`ACCEPT_BACKOFF_MAX`], and is
/// logged once per run of errors.
pub(super) async fn accept_until_stop(shard: &Shard, listener: &TcpListener, port: &str) -> Option<TcpStream> {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut failing = false;
    loop {
        let accepted = futures_lite::future::or(async { Some(listener.accept().await) }, async {
            while !shard.stop.load(Ordering::Relaxed) {
                glommio::timer::sleep(STOP_POLL).await;
            }
            None
        })
        .await?;
        match accepted {
            Ok(stream) => return Some(stream),
            Err(error) => {
                shard.stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                if !failing {
                    failing = true;
                    shard.log(&format!("accepting on the {port} port failed ({error}); backing off"));
                }
                glommio::timer::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Writes an ERROR `OVERLOADED` on a connection refused at the limit, then closes it.
pub(super) async fn refuse(stream: Stream, message: String) {
    let mut frame = Vec::new();
    let _ = wire::encode_error(&mut frame, ErrorCode::Overloaded, &message);
    let mut stream = stream;
    let _ = futures_lite::future::or(
        async {
            let _ = stream.write_all(&frame).await;
            let _ = stream.close().await;
        },
        glommio::timer::sleep(REFUSAL_WRITE_TIMEOUT),
    )
    .await;
}

/// A shard's ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Port {
    /// The front door: clients, and executors' control connections.
    Clients,
    /// Executor links.
    Links,
    /// KServe v2 over HTTP/1.1: clients too (they share the client slots and limits).
    Http,
    /// `GET /metrics` only (HTTP/1.1, the client slots and limits too).
    Metrics,
    /// KServe v2 over gRPC (HTTP/2, the client slots and limits too).
    Grpc,
}

impl Port {
    fn name(self) -> &'static str {
        match self {
            Port::Clients => "client",
            Port::Links => "executor link",
            Port::Http => "HTTP",
            Port::Metrics => "metrics",
            Port::Grpc => "gRPC",
        }
    }

    fn peer(self, key: ConnectionKey) -> Peer {
        match self {
            Port::Clients | Port::Http | Port::Metrics | Port::Grpc => Peer::Client(key),
            Port::Links => Peer::Link(key),
        }
    }

    pub(super) fn slots(self, shard: &Shard) -> &RefCell<Slots> {
        match self {
            Port::Clients | Port::Http | Port::Metrics | Port::Grpc => &shard.clients,
            Port::Links => &shard.link_conns,
        }
    }

    fn limit(self, shard: &Shard) -> usize {
        match self {
            Port::Clients | Port::Http | Port::Metrics | Port::Grpc => shard.limits.connections_per_shard,
            Port::Links => shard.limits.links_per_shard,
        }
    }
}

/// Accepts connections on `port` until the service stops.
pub(super) async fn accept(shard: Rc<Shard>, listener: TcpListener, port: Port) {
    while let Some(stream) = accept_until_stop(&shard, &listener, port.name()).await {
        let why = match port {
            Port::Clients | Port::Http | Port::Metrics | Port::Grpc => {
                "closed to make room for a new connection: this one sent nothing"
            }
            Port::Links => "closed to make room for a new link: this one never joined",
        };
        let admission = port.slots(&shard).borrow_mut().admit(why);
        match admission {
            Admission::Serve(key, connection, receivers) => {
                glommio::spawn_local(open_and_serve(
                    Rc::clone(&shard),
                    port,
                    key,
                    stream,
                    connection,
                    *receivers,
                ))
                .detach();
            }
            Admission::Refuse => refuse_later(&shard, stream, port),
            Admission::Drop => {
                shard.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
                drop(stream);
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// Serves an admitted connection on its port's protocol, after its TLS handshake on a TLS
/// port (a failed one frees the slot).
async fn open_and_serve(
    shard: Rc<Shard>,
    port: Port,
    key: ConnectionKey,
    socket: TcpStream,
    connection: Rc<Connection>,
    receivers: Receivers,
) {
    let handshake = Duration::from_nanos(shard.timeouts.handshake_ns);
    let Some(stream) = tls::open(&shard, port, socket, Some(&receivers.stop_reading), handshake).await else {
        port.slots(&shard).borrow_mut().remove(key);
        return;
    };
    match port {
        Port::Grpc => super::grpc::serve(shard, key, stream, connection, receivers).await,
        Port::Http | Port::Metrics => {
            super::kserve::serve(shard, key, stream, connection, receivers, port == Port::Metrics).await
        }
        Port::Clients | Port::Links => serve(shard, port, key, stream, connection, receivers).await,
    }
}

/// Refuses a connection over its port's limit, in a task of its own (a slow peer must not
/// hold up the accept loop). Past [`REFUSING_LIMIT`] refusals at once it is just closed.
fn refuse_later(shard: &Rc<Shard>, stream: TcpStream, port: Port) {
    shard.stats.connections_refused.fetch_add(1, Ordering::Relaxed);
    let slots = port.slots(shard);
    if slots.borrow().refusing >= REFUSING_LIMIT {
        return;
    }
    slots.borrow_mut().refusing += 1;
    let message = format!(
        "shard {} has {} {} connections, its limit; retry later or elsewhere",
        shard.id,
        port.limit(shard),
        port.name()
    );
    let shard = Rc::clone(shard);
    glommio::spawn_local(async move {
        // On a TLS port the refusal is said inside TLS, within the refusal's time.
        if let Some(stream) = tls::open(&shard, port, stream, None, REFUSAL_WRITE_TIMEOUT).await {
            if matches!(port, Port::Http | Port::Metrics) {
                super::kserve::refuse(stream, message).await;
            } else {
                refuse(stream, message).await;
            }
        }
        port.slots(&shard).borrow_mut().refusing -= 1;
    })
    .detach();
}

/// Why a client's read loop ended.
#[derive(Debug, PartialEq, Eq)]
enum ReadEnd {
    /// EOF on the read side: the client sent everything (it may still read).
    HalfClosed,
    /// Closed, reset, broken protocol, evicted or a dead writer.
    Closed,
}

/// Serves one connection, client or link: hands every frame it sends to the shard's core
/// until it closes or the core ends it, then (after a client's half-close) waits for the
/// replies it is owed.
async fn serve(
    shard: Rc<Shard>,
    port: Port,
    key: ConnectionKey,
    stream: Stream,
    connection: Rc<Connection>,
    receivers: Receivers,
) {
    let peer = port.peer(key);
    // The socket stays open while the writer holds its half. A TLS link sends no zero-copy
    // sections: what goes on the wire is the session's ciphertext.
    let fd = std::os::fd::AsRawFd::as_raw_fd(stream.socket());
    let tls = stream.is_tls();
    let link = (port == Port::Links && !tls).then(|| (fd, Rc::clone(&shard)));
    let (mut reader, writer) = futures_lite::io::split(stream);
    glommio::spawn_local(write_loop(
        writer,
        Rc::clone(&connection),
        receivers.notify,
        link,
        shard.write_stall_timeout(),
        tls,
    ))
    .detach();
    shard.handle(Input::Opened(peer));
    let wake = receivers.wake;
    let stop_reading = receivers.stop_reading;
    let decoder = FrameDecoder::default();
    let mut buffer = ReadBuffer::new(READ_BUFFER_INITIAL_BYTES, frame_limit());
    // Set once the read side reached EOF: what is buffered is still handled.
    let mut eof = false;
    // When the last read completed: a request's arrival, for the arrival-to-decision sample.
    let mut read_ns = shard.now_ns();
    let is_client = matches!(peer, Peer::Client(_));
    // When a read last left the socket empty (it did not fill the buffer), and whether the
    // shard has been behind this client for `backlog_shed_ms` since (the core sheds then).
    let mut drained_ns = read_ns;
    let mut behind = false;
    let shed_ns = shard.timeouts.backlog_shed_ns;
    let end = 'read: loop {
        // Backpressure: handle and read nothing while the client does not take its replies,
        // owes too many, or messages to other shards wait for room.
        while over_limits(&shard, peer, &connection) {
            if connection.is_dead() || connection.evicted.get() {
                break 'read ReadEnd::Closed;
            }
            shard.stats.backpressure_waits.fetch_add(1, Ordering::Relaxed);
            if !connection.mesh_turn.get() && shard.mesh.backlogged() {
                // In line for room: when the backlog clears, connections get a turn each in
                // the order they started waiting (none starves behind busier ones).
                shard.mesh.wait_for_room(&connection);
            }
            wait_woken(&connection, &wake).await;
        }
        if connection.is_dead() || connection.evicted.get() {
            break ReadEnd::Closed;
        }
        if is_client && shed_ns > 0 && (read_ns - drained_ns > shed_ns) != behind {
            behind = !behind;
            shard.handle(Input::Backlog { peer, behind });
        }
        // The frames read so far, as far as the limits allow (the rest wait in the buffer).
        let mut frames = decoder.frames(buffer.filled());
        let turn = shard.handle_frames(peer, &connection, &mut frames, &buffer, read_ns);
        let (at_limit, turn_over, failed) = (
            turn == TurnEnd::AtLimit,
            turn == TurnEnd::TurnOver,
            turn == TurnEnd::Failed,
        );
        let consumed = frames.consumed();
        buffer.consume(consumed);
        shard.handle(Input::ReadDone);
        if failed {
            break ReadEnd::Closed;
        }
        // A turn given while the mesh was backlogged lasts one round of frames.
        connection.mesh_turn.set(false);
        if at_limit {
            continue;
        }
        if turn_over {
            futures_lite::future::yield_now().await;
            continue;
        }
        if eof {
            break ReadEnd::HalfClosed;
        }
        let Some(spare) = buffer.spare() else {
            break ReadEnd::Closed;
        };
        let spare_len = spare.len();
        let read = futures_lite::future::or(async { Some(reader.read(spare).await) }, async {
            let _ = stop_reading.recv().await;
            None
        })
        .await;
        match read {
            Some(Ok(0)) => eof = true,
            Some(Ok(read)) => {
                read_ns = shard.now_ns();
                if read < spare_len {
                    drained_ns = read_ns;
                }
                buffer.advance(read);
                connection.active.set(true);
            }
            Some(Err(_)) | None => break ReadEnd::Closed,
        }
    };
    drop(buffer);
    if end == ReadEnd::HalfClosed {
        // Every reply it is owed is written before the close (each request gets one).
        while shard.core.borrow().client_owed(key).0 > 0 && !connection.is_dead() {
            wait_woken(&connection, &wake).await;
        }
    }
    // Replies still owed go nowhere now; its queued requests leave the schedulers before
    // they use a GPU (the core sees to it).
    shard.handle(Input::Closed {
        peer,
        writer_died: connection.is_dead(),
    });
    port.slots(&shard).borrow_mut().remove(key);
    connection.close_after_writing();
}

/// Waits until the connection's reader is woken (a reply, the writer's progress, its turn for
/// the mesh), or for at most [`STOP_POLL`].
async fn wait_woken(connection: &Connection, wake: &LocalReceiver<()>) {
    connection.reader_waits.set(true);
    futures_lite::future::or(
        async {
            let _ = wake.recv().await;
        },
        glommio::timer::sleep(STOP_POLL),
    )
    .await;
    connection.reader_waits.set(false);
}

/// Whether a client connection must not be handled further now: its replies wait to be
/// written, it owes its limit of replies, or the mesh has a backlog. Links are always read.
fn over_limits(shard: &Shard, peer: Peer, connection: &Connection) -> bool {
    over_limits_of(&shard.core.borrow(), shard, peer, connection)
}

/// [`over_limits`] with the core borrowed already.
pub(super) fn over_limits_of(core: &ShardCore, shard: &Shard, peer: Peer, connection: &Connection) -> bool {
    let Peer::Client(key) = peer else {
        return false;
    };
    let (owed, owed_bytes) = core.client_owed(key);
    connection.queued_bytes() >= shard.limits.write_buffer_bytes
        || owed as usize >= shard.limits.requests_per_connection
        || owed_bytes >= shard.limits.request_bytes_per_connection
        // Past the shard's budget, only a connection owed nothing is read (one request).
        || (owed_bytes > 0 && core.owed_bytes() >= shard.limits.request_bytes_per_shard)
        // A connection given its turn (`Mesh::wait_for_room`) takes it despite a new backlog.
        || (shard.mesh.backlogged() && !connection.mesh_turn.get())
}

/// Writes what is queued on `connection`, many frames per write, until it closes. A link
/// (`link`: its socket and shard) sends a queue that holds zero-copy sections with
/// io_uring's SENDMSG_ZC (`zerocopy`). A write that makes no progress for `stall` ends the
/// connection.
pub(super) async fn write_loop(
    mut writer: futures_lite::io::WriteHalf<Stream>,
    connection: Rc<Connection>,
    notify: LocalReceiver<()>,
    link: Option<(std::os::fd::RawFd, Rc<Shard>)>,
    stall: Duration,
    tls: bool,
) {
    let mut spare = Vec::new();
    while notify.recv().await.is_some() {
        std::mem::swap(&mut spare, &mut connection.out.borrow_mut());
        let sections = std::mem::take(&mut *connection.sections.borrow_mut());
        let section_bytes = connection.section_bytes.replace(0);
        connection.writing.set(spare.len() + section_bytes);
        let written = if !sections.is_empty() {
            let outgoing = zerocopy::Outgoing {
                bytes: std::mem::take(&mut spare),
                sections,
            };
            send_sections(&mut writer, link.as_ref(), outgoing, stall).await
        } else {
            write_within(&mut writer, &spare, stall, &connection.writing).await
        };
        connection.writing.set(0);
        // A TLS stream may hold the last records until flushed (a plain one holds nothing:
        // no flush, and no timer for it).
        let written = match written {
            Ok(()) if tls => flush_within(&mut writer, stall).await,
            other => other,
        };
        if written.is_err() {
            break;
        }
        // A buffer much larger than what it carried is given back (a burst is over); one in
        // steady use keeps its capacity.
        let carried = spare.len();
        spare.clear();
        if spare.capacity() > WRITE_BUFFER_KEEP_BYTES && carried < spare.capacity() / 8 {
            spare = Vec::new();
        }
        connection.wake_waiting_reader();
        if connection.closing.get() && connection.out.borrow().is_empty() && connection.sections.borrow().is_empty() {
            break;
        }
    }
    connection.dead.set(true);
    *connection.out.borrow_mut() = Vec::new();
    connection.sections.borrow_mut().clear();
    connection.section_bytes.set(0);
    connection.wake_reader();
    let _ = connection.stop_reading.try_send(());
    let _ = futures_lite::future::or(
        async {
            let _ = writer.close().await;
        },
        glommio::timer::sleep(REFUSAL_WRITE_TIMEOUT),
    )
    .await;
}

/// `bytes`, written in full; an error when a write stays blocked for `stall`. `left`
/// counts down what is still to write.
async fn write_within(
    writer: &mut futures_lite::io::WriteHalf<Stream>,
    bytes: &[u8],
    stall: Duration,
    left: &Cell<usize>,
) -> std::io::Result<()> {
    let mut at = 0;
    while at < bytes.len() {
        let written = futures_lite::future::or(writer.write(&bytes[at..]), async {
            glommio::timer::sleep(stall).await;
            Err(std::io::ErrorKind::TimedOut.into())
        })
        .await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        at += written;
        left.set(left.get().saturating_sub(written));
    }
    Ok(())
}

/// Flushes what the stream buffers; an error when that stays blocked for `stall`.
async fn flush_within(writer: &mut futures_lite::io::WriteHalf<Stream>, stall: Duration) -> std::io::Result<()> {
    futures_lite::future::or(writer.flush(), async {
        glommio::timer::sleep(stall).await;
        Err(std::io::ErrorKind::TimedOut.into())
    })
    .await
}

/// Sends a queue with sections: zero-copy where the shard has a ring, else (or for what the
/// kernel refused to send zero-copy) copied into one buffer.
async fn send_sections(
    writer: &mut futures_lite::io::WriteHalf<Stream>,
    link: Option<&(std::os::fd::RawFd, Rc<Shard>)>,
    outgoing: zerocopy::Outgoing,
    stall: Duration,
) -> std::io::Result<()> {
    let unused = Cell::new(0);
    let Some((fd, shard)) = link else {
        return write_within(writer, &outgoing.flatten(), stall, &unused).await;
    };
    let stats = &shard.stats;
    let (sent, outgoing) = match shard.zero_copy.as_ref().filter(|ring| !ring.is_broken()) {
        Some(ring) => {
            let outgoing = Rc::new(outgoing);
            let len = outgoing.len();
            let sent = futures_lite::future::or(ring.send(*fd, Rc::clone(&outgoing)), async {
                glommio::timer::sleep(stall).await;
                Err(std::io::ErrorKind::TimedOut.into())
            })
            .await?;
            match sent {
                zerocopy::Sent::Done => {
                    stats.zero_copy_sends.fetch_add(1, Ordering::Relaxed);
                    stats.zero_copy_bytes.fetch_add(len as u64, Ordering::Relaxed);
                    return Ok(());
                }
                zerocopy::Sent::Refused { sent, error } => {
                    if !shard.zero_copy_refused.replace(true) {
                        shard.log(&format!(
                            "the kernel refused a zero-copy send ({error}); such sends are copied"
                        ));
                    }
                    (sent, outgoing)
                }
            }
        }
        None => (0, Rc::new(outgoing)),
    };
    stats.zero_copy_fallbacks.fetch_add(1, Ordering::Relaxed);
    write_within(writer, &outgoing.flatten()[sent..], stall, &unused).await
}
