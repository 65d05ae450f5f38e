//! The wire protocol: frame headers, message types and their validation.
//!
//! What it is: the bytes that clients and the scheduler exchange over TCP (`docs/protocol.md`
//! is the specification; this module is its reference implementation). A frame is a fixed
//! 16-byte header written by hand, little-endian, followed by a payload that is an rkyv 0.8
//! archive of one message ([`Request`], [`Reply`], [`ErrorFrame`], [`ListModels`], [`Models`],
//! or one of the executor protocol's, [`executor`]).
//!
//! What it is not: there are no sockets, buffers of connections, threads or clocks here.
//! [`FrameDecoder`] cuts complete frames out of a byte slice the caller filled (a receive
//! buffer may hold many frames and a partial one at its end); the `encode_*` functions append
//! frames to a `Vec<u8>` the caller owns and reuses. The service (`symphony-shards`) moves the
//! bytes.
//!
//! # Format features
//!
//! rkyv's archived layout depends on cargo features. The workspace pins every one of them
//! (root `Cargo.toml`): `little_endian`, `unaligned`, `pointer_width_32`, and `bytecheck` for
//! validation, with default features off. So the layout depends neither on the host (a
//! big-endian or 32-bit machine produces the same bytes) nor on feature unification: rkyv
//! refuses to compile when another crate of the build asks for a contradicting feature
//! (`big_endian`, `aligned`, `pointer_width_16`/`_64`), so the format cannot drift silently.
//! `unaligned` makes every archived type alignment 1: frames sit back to back in receive
//! buffers at any offset and payloads are accessed in place, without copies. The tests pin the
//! encoded bytes of fixed messages (golden hex), so any drift fails a test.
//!
//! # Validation
//!
//! Every byte from outside is checked before use and a bad one is a typed [`WireError`], never
//! a panic: the header by [`FrameDecoder`] (magic, version, kind, payload cap, reserved), the
//! payload by rkyv's bytecheck in [`access_request`], [`access_reply`] and [`access_error`],
//! then the named limits of a request by [`check_request`] (after access, so the service knows
//! the `client_request_id` and can answer that request with [`Status::Malformed`]).
//!
//! # Limits
//!
//! [`FRAME_PAYLOAD_LIMIT`] (8 MiB) caps every payload; [`MODEL_NAME_LIMIT`] (256 bytes) caps a
//! model name; [`INPUT_LIMIT`] caps a request's input; [`ERROR_MESSAGE_LIMIT`] caps an error
//! frame's message (the encoder truncates).
//!
//! # Allocation
//!
//! Steady state, neither side allocates per frame: decoding and access borrow the caller's
//! bytes (rkyv's validator allocates only on failure, for the error); encoding appends to the
//! caller's `Vec<u8>` (it grows only while its capacity is short) and uses rkyv's per-thread
//! scratch arena, which is allocated once per thread and then reused. The borrowed forms
//! [`RequestRef`] and [`ReplyRef`] archive to exactly the same bytes as [`Request`] and
//! [`Reply`], so a sender never builds an owned `Vec` to send bytes it already holds. Only the
//! error paths allocate (the `reason` of [`WireError::Malformed`], owned messages).

use rkyv::rancor::{self, Fallible, Source};
use rkyv::ser::{Allocator, Writer};
use rkyv::string::{ArchivedString, StringResolver};
use rkyv::vec::{ArchivedVec, VecResolver};
use rkyv::{Archive, Deserialize, Place, Serialize};

/// The first 4 bytes of every frame: `u32` little-endian, so the bytes are `"SYMP"`.
pub const FRAME_MAGIC: u32 = 0x504D_5953;
/// The protocol version this module speaks; a frame with another version is refused.
pub const PROTOCOL_VERSION: u16 = 2;
/// Size of the frame header in bytes.
pub const FRAME_HEADER_SIZE: usize = 16;
/// Largest payload of one frame, in bytes (8 MiB). A receiver may configure a lower cap
/// ([`FrameDecoder::new`]), never a higher one.
pub const FRAME_PAYLOAD_LIMIT: u32 = 8 * 1024 * 1024;
/// Longest model name of a request, in bytes of UTF-8.
pub const MODEL_NAME_LIMIT: usize = 256;
/// Largest input of a request, in bytes. The frame cap binds first; the service may have
/// smaller per-model limits.
pub const INPUT_LIMIT: usize = FRAME_PAYLOAD_LIMIT as usize;
/// Longest message of an error frame, in bytes of UTF-8; [`encode_error`] truncates.
pub const ERROR_MESSAGE_LIMIT: usize = 1024;
/// Kinds of the executor protocol: 16 to 26 are defined ([`executor`]), the rest reserved.
pub const KIND_EXECUTOR_RESERVED: core::ops::RangeInclusive<u16> = 16..=63;

pub mod executor;

const _: () = {
    // rkyv's relative pointers and lengths are 32-bit: every offset inside a payload must fit.
    assert!(FRAME_PAYLOAD_LIMIT <= i32::MAX as u32);
    // A frame (header + payload) fits a u32 and a usize of any supported host.
    assert!((FRAME_PAYLOAD_LIMIT as u64) + (FRAME_HEADER_SIZE as u64) <= u32::MAX as u64);
    assert!(MODEL_NAME_LIMIT < FRAME_PAYLOAD_LIMIT as usize);
    assert!(ERROR_MESSAGE_LIMIT < FRAME_PAYLOAD_LIMIT as usize);
    assert!(INPUT_LIMIT <= FRAME_PAYLOAD_LIMIT as usize);
    assert!(*KIND_EXECUTOR_RESERVED.start() > Kind::Error as u16);
};

/// What a frame carries: the `kind` field of the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Kind {
    /// Client to scheduler: an inference [`Request`].
    Request = 1,
    /// Scheduler to client: the [`Reply`] to one request.
    Reply = 2,
    /// Either direction: an [`ErrorFrame`]; the sender closes the connection after it.
    Error = 3,
    /// Client to scheduler: [`ListModels`], a request for the model list.
    ListModels = 4,
    /// Scheduler to client: [`Models`], the answer to [`Kind::ListModels`].
    Models = 5,
    /// Executor protocol ([`executor`]): executor to scheduler, [`executor::Hello`].
    ExecHello = 16,
    /// [`executor::Welcome`].
    ExecWelcome = 17,
    /// [`executor::Probe`].
    ExecProbe = 18,
    /// [`executor::ProbeReply`].
    ExecProbeReply = 19,
    /// [`executor::Register`].
    ExecRegister = 20,
    /// [`executor::Registered`].
    ExecRegistered = 21,
    /// [`executor::Join`].
    ExecJoin = 22,
    /// [`executor::Joined`].
    ExecJoined = 23,
    /// [`executor::PlanMsg`], sectioned (inputs).
    ExecPlan = 24,
    /// [`executor::ResultMsg`], sectioned (outputs).
    ExecResult = 25,
    /// [`executor::Heartbeat`].
    ExecHeartbeat = 26,
}

impl Kind {
    /// The kind with this wire value, if it is defined.
    pub fn from_u16(value: u16) -> Option<Kind> {
        match value {
            1 => Some(Kind::Request),
            2 => Some(Kind::Reply),
            3 => Some(Kind::Error),
            4 => Some(Kind::ListModels),
            5 => Some(Kind::Models),
            16 => Some(Kind::ExecHello),
            17 => Some(Kind::ExecWelcome),
            18 => Some(Kind::ExecProbe),
            19 => Some(Kind::ExecProbeReply),
            20 => Some(Kind::ExecRegister),
            21 => Some(Kind::ExecRegistered),
            22 => Some(Kind::ExecJoin),
            23 => Some(Kind::ExecJoined),
            24 => Some(Kind::ExecPlan),
            25 => Some(Kind::ExecResult),
            26 => Some(Kind::ExecHeartbeat),
            _ => None,
        }
    }
}

impl core::fmt::Display for Kind {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let name = match self {
            Kind::Request => "REQUEST",
            Kind::Reply => "REPLY",
            Kind::Error => "ERROR",
            Kind::ListModels => "LIST_MODELS",
            Kind::Models => "MODELS",
            Kind::ExecHello => "EXEC_HELLO",
            Kind::ExecWelcome => "EXEC_WELCOME",
            Kind::ExecProbe => "EXEC_PROBE",
            Kind::ExecProbeReply => "EXEC_PROBE_REPLY",
            Kind::ExecRegister => "EXEC_REGISTER",
            Kind::ExecRegistered => "EXEC_REGISTERED",
            Kind::ExecJoin => "EXEC_JOIN",
            Kind::ExecJoined => "EXEC_JOINED",
            Kind::ExecPlan => "EXEC_PLAN",
            Kind::ExecResult => "EXEC_RESULT",
            Kind::ExecHeartbeat => "EXEC_HEARTBEAT",
        };
        f.write_str(name)
    }
}

/// Why bytes from outside (or a message to encode) were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The first 4 bytes are not [`FRAME_MAGIC`]: not our protocol, or the stream lost sync.
    #[error("bad magic {magic:#010x} (expected {FRAME_MAGIC:#010x})")]
    BadMagic { magic: u32 },
    /// The header's version is not [`PROTOCOL_VERSION`].
    #[error("unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { version: u16 },
    /// The header's kind is not a defined [`Kind`].
    #[error("unknown frame kind {kind}")]
    UnknownKind { kind: u16 },
    /// The header's payload length is over the cap.
    #[error("payload of {payload_len} bytes is over the cap of {limit} bytes")]
    Oversized { payload_len: u64, limit: u32 },
    /// The header's reserved field is not zero.
    #[error("reserved header field is {reserved:#x}, must be 0")]
    ReservedNonzero { reserved: u32 },
    /// The payload is not a valid archive of the message its kind announces.
    #[error("malformed {kind} payload: {reason}")]
    Malformed { kind: Kind, reason: String },
    /// A request's model name is longer than [`MODEL_NAME_LIMIT`].
    #[error("model name of {name_len} bytes is over the limit of {limit} bytes")]
    ModelNameTooLong { name_len: usize, limit: usize },
    /// A request's input is larger than [`INPUT_LIMIT`].
    #[error("input of {input_len} bytes is over the limit of {limit} bytes")]
    InputTooLarge { input_len: usize, limit: usize },
    /// rkyv could not serialize a message (cannot happen for messages under the caps).
    #[error("cannot encode {kind}: {reason}")]
    Encode { kind: Kind, reason: String },
}

impl WireError {
    /// The code to send in an [`ErrorFrame`] for this error, or `None` for an error of our own
    /// encoding. Request-limit errors map to [`ErrorCode::Malformed`], but the service answers
    /// them with a [`Reply`] of [`Status::Malformed`] instead, keeping the connection.
    pub fn error_code(&self) -> Option<ErrorCode> {
        match self {
            WireError::BadMagic { .. } => Some(ErrorCode::BadMagic),
            WireError::UnsupportedVersion { .. } => Some(ErrorCode::UnsupportedVersion),
            WireError::UnknownKind { .. } => Some(ErrorCode::UnknownKind),
            WireError::Oversized { .. } => Some(ErrorCode::Oversized),
            WireError::ReservedNonzero { .. } => Some(ErrorCode::ReservedNonzero),
            WireError::Malformed { .. } | WireError::ModelNameTooLong { .. } | WireError::InputTooLarge { .. } => {
                Some(ErrorCode::Malformed)
            }
            WireError::Encode { .. } => None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Frame header and decoder.

/// A validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: Kind,
    /// Bytes of payload after the header.
    pub payload_len: u32,
}

impl FrameHeader {
    /// The 16 header bytes: magic, version, kind, payload length, reserved (0), little-endian.
    pub fn to_bytes(&self) -> [u8; FRAME_HEADER_SIZE] {
        let mut bytes = [0u8; FRAME_HEADER_SIZE];
        bytes[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        bytes[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        bytes[8..12].copy_from_slice(&self.payload_len.to_le_bytes());
        // bytes[12..16]: reserved, zero.
        bytes
    }
}

/// Checks the header fields present in `bytes` (a whole header or only its beginning), in
/// byte order, so a stream that is not ours fails as soon as its first 4 bytes arrive.
/// Returns the header once all 16 bytes are present and valid.
fn check_header(bytes: &[u8], payload_limit: u32) -> Result<Option<FrameHeader>, WireError> {
    let present = bytes.len().min(FRAME_HEADER_SIZE);
    let mut h = [0u8; FRAME_HEADER_SIZE];
    h[..present].copy_from_slice(&bytes[..present]);

    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if present >= 4 && magic != FRAME_MAGIC {
        return Err(WireError::BadMagic { magic });
    }
    let version = u16::from_le_bytes([h[4], h[5]]);
    if present >= 6 && version != PROTOCOL_VERSION {
        return Err(WireError::UnsupportedVersion { version });
    }
    let kind_value = u16::from_le_bytes([h[6], h[7]]);
    let kind = Kind::from_u16(kind_value);
    if present >= 8 && kind.is_none() {
        return Err(WireError::UnknownKind { kind: kind_value });
    }
    let payload_len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    if present >= 12 && payload_len > payload_limit {
        return Err(WireError::Oversized {
            payload_len: u64::from(payload_len),
            limit: payload_limit,
        });
    }
    let reserved = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
    if present >= 16 && reserved != 0 {
        return Err(WireError::ReservedNonzero { reserved });
    }
    if present < FRAME_HEADER_SIZE {
        return Ok(None);
    }
    match kind {
        Some(kind) => Ok(Some(FrameHeader { kind, payload_len })),
        None => Err(WireError::UnknownKind { kind: kind_value }),
    }
}

/// One complete frame, borrowed from the bytes it was decoded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub kind: Kind,
    /// The archive; pass it to the `access_*` function of `kind`.
    pub payload: &'a [u8],
}

impl Frame<'_> {
    /// Bytes the frame occupies: header and payload.
    pub fn size(&self) -> usize {
        FRAME_HEADER_SIZE + self.payload.len()
    }
}

/// What [`FrameDecoder::decode`] found at the start of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A complete frame; it occupies the first `frame.size()` bytes.
    Frame(Frame<'a>),
    /// The bytes hold no complete frame yet; at least `missing_min` more bytes are needed
    /// (exactly that many once the header is complete).
    Incomplete { missing_min: usize },
}

/// Cuts frames out of received bytes. Holds only its payload cap: the bytes stay the caller's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameDecoder {
    payload_limit: u32,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder {
            payload_limit: FRAME_PAYLOAD_LIMIT,
        }
    }
}

impl FrameDecoder {
    /// A decoder refusing payloads over `payload_limit` bytes.
    ///
    /// # Panics
    ///
    /// If `payload_limit` is over [`FRAME_PAYLOAD_LIMIT`]: a configuration bug.
    pub fn new(payload_limit: u32) -> Self {
        assert!(payload_limit <= FRAME_PAYLOAD_LIMIT, "payload cap over the protocol's");
        FrameDecoder { payload_limit }
    }

    /// The payload cap in bytes.
    pub fn payload_limit(&self) -> u32 {
        self.payload_limit
    }

    /// The frame at the start of `bytes`, or how many bytes it still lacks. Header errors are
    /// reported as soon as the offending field has arrived. Never panics.
    pub fn decode<'a>(&self, bytes: &'a [u8]) -> Result<Decoded<'a>, WireError> {
        let Some(header) = check_header(bytes, self.payload_limit)? else {
            return Ok(Decoded::Incomplete {
                missing_min: FRAME_HEADER_SIZE - bytes.len(),
            });
        };
        let frame_size = FRAME_HEADER_SIZE + header.payload_len as usize;
        match bytes.get(FRAME_HEADER_SIZE..frame_size) {
            Some(payload) => Ok(Decoded::Frame(Frame {
                kind: header.kind,
                payload,
            })),
            None => Ok(Decoded::Incomplete {
                missing_min: frame_size - bytes.len(),
            }),
        }
    }

    /// The frames in `bytes`, one by one. After the iterator ends, [`Frames::consumed`] says how
    /// many bytes the yielded frames occupied (drop them from the receive buffer) and
    /// [`Frames::missing_min`] how many more bytes the next frame needs. After an error it
    /// yields nothing more: the connection is to be answered with an error frame and closed.
    pub fn frames<'a>(&self, bytes: &'a [u8]) -> Frames<'a> {
        Frames {
            decoder: *self,
            bytes,
            consumed: 0,
            missing_min: 0,
            failed: false,
        }
    }
}

/// Iterator over the complete frames of a byte slice; see [`FrameDecoder::frames`].
#[derive(Debug, Clone)]
pub struct Frames<'a> {
    decoder: FrameDecoder,
    bytes: &'a [u8],
    consumed: usize,
    missing_min: usize,
    failed: bool,
}

impl<'a> Frames<'a> {
    /// Bytes occupied by the frames yielded so far.
    pub fn consumed(&self) -> usize {
        self.consumed
    }

    /// Once the iterator has ended without error: at least how many more bytes the next frame
    /// needs (a header's worth when the bytes ended exactly at a frame boundary).
    pub fn missing_min(&self) -> usize {
        self.missing_min
    }

    /// The bytes after the frames yielded so far.
    pub fn remaining(&self) -> &'a [u8] {
        &self.bytes[self.consumed..]
    }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, WireError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        match self.decoder.decode(self.remaining()) {
            Ok(Decoded::Frame(frame)) => {
                self.consumed += frame.size();
                assert!(self.consumed <= self.bytes.len());
                Some(Ok(frame))
            }
            Ok(Decoded::Incomplete { missing_min }) => {
                assert!(missing_min > 0);
                self.missing_min = missing_min;
                None
            }
            Err(error) => {
                self.failed = true;
                Some(Err(error))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Messages.

/// Which model a request is for: by id (the server's model index) or by name.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Hash)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub enum ModelRef {
    Id(u32),
    Name(String),
}

/// Client to scheduler: one inference.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct Request {
    /// Chosen by the client; echoed in the reply. Unique among the client's requests in flight
    /// on one connection.
    pub client_request_id: u64,
    pub model: ModelRef,
    /// A tighter SLO in microseconds; `None` or `Some(0)` mean the model's default. The
    /// scheduler uses the smaller of this and the model's SLO.
    pub slo_us: Option<u32>,
    /// The model's input, opaque to the scheduler.
    pub input: Vec<u8>,
}

/// How a request ended.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    rkyv::Portable,
    rkyv::bytecheck::CheckBytes,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
)]
#[rkyv(as = Status)]
#[bytecheck(crate = rkyv::bytecheck)]
#[repr(u8)]
pub enum Status {
    /// Executed; `output` holds the model's output.
    Ok = 0,
    /// Not executed: its SLO could not be met.
    Dropped = 1,
    /// Not executed: no model has this id or name.
    UnknownModel = 2,
    /// Not executed: the request broke a limit ([`check_request`]) or the model's input rules.
    Malformed = 3,
    /// Not executed: the scheduler's queues are full.
    Overloaded = 4,
    /// Not executed: the scheduler is shutting down.
    ShuttingDown = 5,
    /// The executor running its batch was lost; it may or may not have run.
    ExecutorLost = 6,
    /// The executor could not run its batch (a backend error, an input the model refuses,
    /// or inputs or an output too large for one frame).
    ExecutionFailed = 7,
}

/// Where a request's time went, in microseconds on the scheduler's clock, saturating at
/// `u32::MAX`; 0 where a part does not apply.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct Timings {
    /// From receipt to the start of its batch on the GPU (0 if it never started).
    pub queued_us: u32,
    /// Execution of its batch (0 if it never ran).
    pub exec_us: u32,
    /// From receipt to the reply being written.
    pub total_us: u32,
}

/// Scheduler to client: the one reply to one request.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct Reply {
    pub client_request_id: u64,
    pub status: Status,
    pub timings: Timings,
    /// The model's output when `status` is [`Status::Ok`]; empty otherwise.
    pub output: Vec<u8>,
}

/// What was wrong with a frame that made its receiver close the connection.
#[derive(
    Archive,
    Serialize,
    Deserialize,
    rkyv::Portable,
    rkyv::bytecheck::CheckBytes,
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
)]
#[rkyv(as = ErrorCode)]
#[bytecheck(crate = rkyv::bytecheck)]
#[repr(u8)]
pub enum ErrorCode {
    BadMagic = 0,
    UnsupportedVersion = 1,
    UnknownKind = 2,
    Oversized = 3,
    ReservedNonzero = 4,
    /// The payload failed validation.
    Malformed = 5,
    /// A valid frame of a kind this side does not accept (a client sending a REPLY).
    UnexpectedKind = 6,
    /// An executor's token is not the configured one (or none is configured).
    Unauthorized = 7,
    /// An executor's registration cannot be taken (a model it lacks, no room for its GPUs,
    /// an unknown executor id on a link).
    Refused = 8,
    /// The receiver has no room for this connection (its connection limit); the sender
    /// closes after this frame. Retry later, or on another front door.
    Overloaded = 9,
}

/// Either direction: why the sender is closing the connection.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct ErrorFrame {
    pub code: ErrorCode,
    /// For people; at most [`ERROR_MESSAGE_LIMIT`] bytes.
    pub message: String,
}

/// Client to scheduler: asks for the models the scheduler serves (answered with [`Models`]).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct ListModels {
    /// Chosen by the client; echoed in the answer.
    pub client_request_id: u64,
}

/// One model as a client sees it.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct ModelEntry {
    /// The id a request may use instead of the name ([`ModelRef::Id`]).
    pub id: u32,
    pub name: String,
    /// The model's SLO; a request may only tighten it.
    pub slo_us: u64,
    /// The size every input must have, when the model declares one (others are `MALFORMED`).
    pub input_bytes: Option<u32>,
    /// The largest batch the scheduler forms for this model.
    pub batch_size_max: u32,
}

/// Scheduler to client: every model, in id order.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug), compare(PartialEq))]
pub struct Models {
    pub client_request_id: u64,
    pub models: Vec<ModelEntry>,
}

impl ArchivedRequest {
    /// The tighter SLO in microseconds, `None` for the model's default (`None` or `Some(0)`).
    pub fn slo_us_tighter(&self) -> Option<u32> {
        self.slo_us
            .as_ref()
            .map(|slo_us| slo_us.to_native())
            .filter(|&slo_us| slo_us > 0)
    }
}

/// A [`Request`] that borrows its model and input: archives to the same bytes, so a sender
/// encodes without building an owned `Vec`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestRef<'a> {
    pub client_request_id: u64,
    pub model: &'a ModelRef,
    pub slo_us: Option<u32>,
    pub input: &'a [u8],
}

/// A [`Reply`] that borrows its output (for example from the executor's result frame):
/// archives to the same bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyRef<'a> {
    pub client_request_id: u64,
    pub status: Status,
    pub timings: Timings,
    pub output: &'a [u8],
}

/// An [`ErrorFrame`] that borrows its message.
#[derive(Debug, Clone, Copy)]
struct ErrorFrameRef<'a> {
    code: ErrorCode,
    message: &'a str,
}

impl Request {
    pub fn borrowed(&self) -> RequestRef<'_> {
        RequestRef {
            client_request_id: self.client_request_id,
            model: &self.model,
            slo_us: self.slo_us,
            input: &self.input,
        }
    }
}

impl Reply {
    pub fn borrowed(&self) -> ReplyRef<'_> {
        ReplyRef {
            client_request_id: self.client_request_id,
            status: self.status,
            timings: self.timings,
            output: &self.output,
        }
    }
}

// The borrowed forms resolve field by field into the derived archived types, serializing the
// out-of-line data in field order as the derive does; `borrowed_forms_encode_like_owned` checks
// the bytes are identical.

impl Archive for RequestRef<'_> {
    type Archived = ArchivedRequest;
    type Resolver = (ModelRefResolver, Option<()>, VecResolver);

    fn resolve(&self, resolver: Self::Resolver, out: Place<ArchivedRequest>) {
        let (model_resolver, slo_us_resolver, input_resolver) = resolver;
        rkyv::munge::munge!(let ArchivedRequest { client_request_id, model, slo_us, input } = out);
        self.client_request_id.resolve((), client_request_id);
        self.model.resolve(model_resolver, model);
        self.slo_us.resolve(slo_us_resolver, slo_us);
        ArchivedVec::resolve_from_slice(self.input, input_resolver, input);
    }
}

impl<S> Serialize<S> for RequestRef<'_>
where
    S: Fallible + Allocator + Writer + ?Sized,
    S::Error: Source,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        let model = self.model.serialize(serializer)?;
        let slo_us = self.slo_us.serialize(serializer)?;
        let input = ArchivedVec::<u8>::serialize_from_slice(self.input, serializer)?;
        Ok((model, slo_us, input))
    }
}

impl Archive for ReplyRef<'_> {
    type Archived = ArchivedReply;
    type Resolver = (StatusResolver, TimingsResolver, VecResolver);

    fn resolve(&self, resolver: Self::Resolver, out: Place<ArchivedReply>) {
        let (status_resolver, timings_resolver, output_resolver) = resolver;
        rkyv::munge::munge!(let ArchivedReply { client_request_id, status, timings, output } = out);
        self.client_request_id.resolve((), client_request_id);
        self.status.resolve(status_resolver, status);
        self.timings.resolve(timings_resolver, timings);
        ArchivedVec::resolve_from_slice(self.output, output_resolver, output);
    }
}

impl<S> Serialize<S> for ReplyRef<'_>
where
    S: Fallible + Allocator + Writer + ?Sized,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        let status = self.status.serialize(serializer)?;
        let timings = self.timings.serialize(serializer)?;
        let output = ArchivedVec::<u8>::serialize_from_slice(self.output, serializer)?;
        Ok((status, timings, output))
    }
}

impl Archive for ErrorFrameRef<'_> {
    type Archived = ArchivedErrorFrame;
    type Resolver = (ErrorCodeResolver, StringResolver);

    fn resolve(&self, resolver: Self::Resolver, out: Place<ArchivedErrorFrame>) {
        rkyv::munge::munge!(let ArchivedErrorFrame { code, message } = out);
        let (code_resolver, message_resolver) = resolver;
        self.code.resolve(code_resolver, code);
        ArchivedString::resolve_from_str(self.message, message_resolver, message);
    }
}

impl<S> Serialize<S> for ErrorFrameRef<'_>
where
    S: Fallible + Writer + ?Sized,
    S::Error: Source,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        let code = self.code.serialize(serializer)?;
        let message = ArchivedString::serialize_from_str(self.message, serializer)?;
        Ok((code, message))
    }
}

// ---------------------------------------------------------------------------------------------
// Encoding.

/// Appends one frame: header, then the archive of `value`. On error `out` is left as it was.
pub(crate) fn encode_frame<T>(out: &mut Vec<u8>, kind: Kind, value: &T) -> Result<usize, WireError>
where
    T: for<'a, 'b> Serialize<
        rkyv::api::high::HighSerializer<&'b mut Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
    >,
{
    let frame_start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_SIZE]);
    if let Err(error) = rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, &mut *out) {
        out.truncate(frame_start);
        return Err(WireError::Encode {
            kind,
            reason: error.to_string(),
        });
    }
    finish_frame(out, frame_start, kind)
}

/// [`encode_frame`] for the frames sent once per request (REQUEST, REPLY): archived with
/// rkyv's low-level API and a small scratch space on the stack, so no thread-local arena is
/// looked up; the same bytes (a value that would need more scratch space takes the general
/// path).
fn encode_frame_small<T>(out: &mut Vec<u8>, kind: Kind, value: &T) -> Result<usize, WireError>
where
    T: for<'a, 'b> Serialize<
            rkyv::api::high::HighSerializer<&'b mut Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>,
        > + for<'a, 'b> Serialize<
            rkyv::api::low::LowSerializer<&'b mut Vec<u8>, rkyv::ser::allocator::SubAllocator<'a>, rancor::Error>,
        >,
{
    let frame_start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_SIZE]);
    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); 64];
    let archived = rkyv::api::low::to_bytes_in_with_alloc::<_, _, rancor::Error>(
        value,
        &mut *out,
        rkyv::ser::allocator::SubAllocator::new(&mut scratch),
    );
    if archived.is_err() {
        out.truncate(frame_start);
        return encode_frame(out, kind, value);
    }
    finish_frame(out, frame_start, kind)
}

/// Writes the header of the frame whose archive follows `frame_start` in `out`, once the
/// archive is there: its size checked against the frame cap (else `out` is left as it was).
fn finish_frame(out: &mut Vec<u8>, frame_start: usize, kind: Kind) -> Result<usize, WireError> {
    let payload_len = out.len() - frame_start - FRAME_HEADER_SIZE;
    let payload_len = match u32::try_from(payload_len) {
        Ok(payload_len) if payload_len <= FRAME_PAYLOAD_LIMIT => payload_len,
        _ => {
            out.truncate(frame_start);
            return Err(WireError::Oversized {
                payload_len: payload_len as u64,
                limit: FRAME_PAYLOAD_LIMIT,
            });
        }
    };
    let header = FrameHeader { kind, payload_len };
    out[frame_start..frame_start + FRAME_HEADER_SIZE].copy_from_slice(&header.to_bytes());
    Ok(FRAME_HEADER_SIZE + payload_len as usize)
}

/// Refuses before serializing a slice that alone is over the frame cap (no 4 GiB copies).
fn check_len_for_frame(len: usize) -> Result<(), WireError> {
    if len > FRAME_PAYLOAD_LIMIT as usize {
        return Err(WireError::Oversized {
            payload_len: len as u64,
            limit: FRAME_PAYLOAD_LIMIT,
        });
    }
    Ok(())
}

/// Appends a REQUEST frame to `out`; returns the frame's size in bytes. Checks only the frame
/// cap ([`WireError::Oversized`]); the request limits are the receiver's ([`check_request`]).
pub fn encode_request(out: &mut Vec<u8>, request: &RequestRef<'_>) -> Result<usize, WireError> {
    check_len_for_frame(request.input.len())?;
    if let ModelRef::Name(name) = request.model {
        check_len_for_frame(name.len())?;
    }
    encode_frame_small(out, Kind::Request, request)
}

/// Appends a REPLY frame to `out`; returns the frame's size in bytes.
pub fn encode_reply(out: &mut Vec<u8>, reply: &ReplyRef<'_>) -> Result<usize, WireError> {
    check_len_for_frame(reply.output.len())?;
    encode_frame_small(out, Kind::Reply, reply)
}

/// Appends a LIST_MODELS frame to `out`.
pub fn encode_list_models(out: &mut Vec<u8>, client_request_id: u64) -> Result<usize, WireError> {
    encode_frame(out, Kind::ListModels, &ListModels { client_request_id })
}

/// Appends a MODELS frame to `out`.
pub fn encode_models(out: &mut Vec<u8>, models: &Models) -> Result<usize, WireError> {
    encode_frame(out, Kind::Models, models)
}

/// Appends an ERROR frame to `out`, the message truncated to [`ERROR_MESSAGE_LIMIT`] bytes (at a
/// character boundary); returns the frame's size in bytes.
pub fn encode_error(out: &mut Vec<u8>, code: ErrorCode, message: &str) -> Result<usize, WireError> {
    let mut message_len = message.len().min(ERROR_MESSAGE_LIMIT);
    while !message.is_char_boundary(message_len) {
        message_len -= 1;
    }
    encode_frame(
        out,
        Kind::Error,
        &ErrorFrameRef {
            code,
            message: &message[..message_len],
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Access (validated, in place) and deserialization.

/// The error type of validation: it keeps rkyv's account of what failed (which field, which
/// check) in release builds too, where `rancor::Error` keeps none. It allocates only when a
/// payload fails.
pub type ValidationError = rancor::BoxedError;

fn malformed(kind: Kind, error: impl core::fmt::Display) -> WireError {
    // The alternate form adds rkyv's trace: which field of which struct failed.
    WireError::Malformed {
        kind,
        reason: format!("{error:#}"),
    }
}

/// The request archived in `payload`, validated, in place (no copy, any alignment).
pub fn access_request(payload: &[u8]) -> Result<&ArchivedRequest, WireError> {
    rkyv::access::<ArchivedRequest, ValidationError>(payload).map_err(|error| WireError::Malformed {
        kind: Kind::Request,
        reason: explain_request(payload, &error.to_string()),
    })
}

/// Why a request payload failed validation, naming the field (the layout is
/// `docs/protocol.md`'s: a 30-byte root at the end). Only called on failure.
fn explain_request(payload: &[u8], checker: &str) -> String {
    const ROOT: usize = 30;
    if payload.len() < ROOT {
        return format!(
            "the payload is {} bytes; a request's root alone is {ROOT} ({checker})",
            payload.len()
        );
    }
    let root = payload.len() - ROOT;
    let r = &payload[root..];
    let read_i32 = |at: usize| i32::from_le_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]]) as i64;
    let read_u32 = |at: usize| u32::from_le_bytes([r[at], r[at + 1], r[at + 2], r[at + 3]]) as i64;
    if r[8] > 1 {
        return format!("field `model`: tag {} is neither 0 (Id) nor 1 (Name) ({checker})", r[8]);
    }
    if r[17] > 1 {
        return format!(
            "field `slo_us`: tag {} is neither 0 (none) nor 1 (some) ({checker})",
            r[17]
        );
    }
    let input_at = root as i64 + 22 + read_i32(22);
    let input_len = read_u32(26);
    if input_at < 0 || input_at + input_len > root as i64 {
        return format!(
            "field `input`: {input_len} bytes at payload offset {input_at} do not lie before the root at {root} ({checker})"
        );
    }
    if r[8] == 1 {
        return format!("field `model`: the name is not a valid string here ({checker})");
    }
    checker.to_string()
}

/// The reply archived in `payload`, validated, in place.
pub fn access_reply(payload: &[u8]) -> Result<&ArchivedReply, WireError> {
    rkyv::access::<ArchivedReply, ValidationError>(payload).map_err(|error| malformed(Kind::Reply, error))
}

/// The LIST_MODELS archived in `payload`, validated, in place.
pub fn access_list_models(payload: &[u8]) -> Result<&ArchivedListModels, WireError> {
    rkyv::access::<ArchivedListModels, ValidationError>(payload).map_err(|error| malformed(Kind::ListModels, error))
}

/// The MODELS archived in `payload`, copied out.
pub fn decode_models(payload: &[u8]) -> Result<Models, WireError> {
    let archived =
        rkyv::access::<ArchivedModels, ValidationError>(payload).map_err(|error| malformed(Kind::Models, error))?;
    rkyv::deserialize::<Models, rancor::Error>(archived).map_err(|error| malformed(Kind::Models, error))
}

/// The error frame archived in `payload`, validated, in place.
pub fn access_error(payload: &[u8]) -> Result<&ArchivedErrorFrame, WireError> {
    rkyv::access::<ArchivedErrorFrame, ValidationError>(payload).map_err(|error| malformed(Kind::Error, error))
}

/// The named limits of a validated request: model name and input size. A request that fails
/// here is answered with [`Status::Malformed`] (the connection stays open).
pub fn check_request(request: &ArchivedRequest) -> Result<(), WireError> {
    if let ArchivedModelRef::Name(name) = &request.model {
        if name.len() > MODEL_NAME_LIMIT {
            return Err(WireError::ModelNameTooLong {
                name_len: name.len(),
                limit: MODEL_NAME_LIMIT,
            });
        }
    }
    if request.input.len() > INPUT_LIMIT {
        return Err(WireError::InputTooLarge {
            input_len: request.input.len(),
            limit: INPUT_LIMIT,
        });
    }
    Ok(())
}

/// Validates and copies out a request (for tests and clients; the service uses access).
pub fn decode_request(payload: &[u8]) -> Result<Request, WireError> {
    let archived = access_request(payload)?;
    rkyv::deserialize::<Request, rancor::Error>(archived).map_err(|error| malformed(Kind::Request, error))
}

/// Validates and copies out a reply.
pub fn decode_reply(payload: &[u8]) -> Result<Reply, WireError> {
    let archived = access_reply(payload)?;
    rkyv::deserialize::<Reply, rancor::Error>(archived).map_err(|error| malformed(Kind::Reply, error))
}

/// Validates and copies out an error frame.
pub fn decode_error(payload: &[u8]) -> Result<ErrorFrame, WireError> {
    let archived = access_error(payload)?;
    rkyv::deserialize::<ErrorFrame, rancor::Error>(archived).map_err(|error| malformed(Kind::Error, error))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode_request_owned(request: &Request) -> Vec<u8> {
        let mut out = Vec::new();
        let size = encode_request(&mut out, &request.borrowed()).expect("encodes");
        assert_eq!(size, out.len());
        out
    }

    fn single_frame(bytes: &[u8]) -> Frame<'_> {
        match FrameDecoder::default().decode(bytes) {
            Ok(Decoded::Frame(frame)) => {
                assert_eq!(frame.size(), bytes.len());
                frame
            }
            other => panic!("expected one frame, got {other:?}"),
        }
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn sample_requests() -> Vec<Request> {
        vec![
            Request {
                client_request_id: 0,
                model: ModelRef::Id(0),
                slo_us: None,
                input: vec![],
            },
            Request {
                client_request_id: u64::MAX,
                model: ModelRef::Id(u32::MAX),
                slo_us: Some(0),
                input: vec![7],
            },
            Request {
                client_request_id: 42,
                model: ModelRef::Name(String::new()),
                slo_us: Some(1),
                input: vec![1; 3],
            },
            Request {
                client_request_id: 43,
                model: ModelRef::Name("bert".into()),
                slo_us: Some(u32::MAX),
                input: (0..=255).collect(),
            },
            Request {
                client_request_id: 44,
                model: ModelRef::Name("resnet50".into()), // exactly the inline capacity
                slo_us: None,
                input: vec![0xff; 1000],
            },
            Request {
                client_request_id: 45,
                model: ModelRef::Name("ünïcödé-model-name".into()),
                slo_us: Some(25_000),
                input: vec![0; 9],
            },
        ]
    }

    const STATUSES: [Status; 8] = [
        Status::Ok,
        Status::Dropped,
        Status::UnknownModel,
        Status::Malformed,
        Status::Overloaded,
        Status::ShuttingDown,
        Status::ExecutorLost,
        Status::ExecutionFailed,
    ];

    const ERROR_CODES: [ErrorCode; 10] = [
        ErrorCode::BadMagic,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownKind,
        ErrorCode::Oversized,
        ErrorCode::ReservedNonzero,
        ErrorCode::Malformed,
        ErrorCode::UnexpectedKind,
        ErrorCode::Unauthorized,
        ErrorCode::Refused,
        ErrorCode::Overloaded,
    ];

    #[test]
    fn request_round_trips() {
        for request in sample_requests() {
            let bytes = encode_request_owned(&request);
            let frame = single_frame(&bytes);
            assert_eq!(frame.kind, Kind::Request);
            let archived = access_request(frame.payload).expect("valid");
            assert_eq!(*archived, request);
            assert_eq!(archived.input.as_slice(), request.input.as_slice());
            assert_eq!(archived.slo_us_tighter(), request.slo_us.filter(|&s| s > 0));
            assert_eq!(check_request(archived), Ok(()));
            assert_eq!(decode_request(frame.payload).expect("valid"), request);
        }
    }

    #[test]
    fn reply_round_trips_every_status() {
        for (index, status) in STATUSES.into_iter().enumerate() {
            let reply = Reply {
                client_request_id: index as u64 * 1_000_003,
                status,
                timings: Timings {
                    queued_us: 1,
                    exec_us: 2 + index as u32,
                    total_us: u32::MAX,
                },
                output: if status == Status::Ok {
                    vec![9; index * 7]
                } else {
                    vec![]
                },
            };
            let mut bytes = Vec::new();
            encode_reply(&mut bytes, &reply.borrowed()).expect("encodes");
            let frame = single_frame(&bytes);
            assert_eq!(frame.kind, Kind::Reply);
            let archived = access_reply(frame.payload).expect("valid");
            assert_eq!(*archived, reply);
            assert_eq!(archived.status, status);
            assert_eq!(decode_reply(frame.payload).expect("valid"), reply);
        }
    }

    #[test]
    fn error_round_trips_every_code() {
        for code in ERROR_CODES {
            let message = format!("{code:?} happened");
            let mut bytes = Vec::new();
            encode_error(&mut bytes, code, &message).expect("encodes");
            let frame = single_frame(&bytes);
            assert_eq!(frame.kind, Kind::Error);
            let archived = access_error(frame.payload).expect("valid");
            assert_eq!(archived.code, code);
            assert_eq!(archived.message.as_str(), message);
            assert_eq!(
                decode_error(frame.payload).expect("valid"),
                ErrorFrame { code, message }
            );
        }
    }

    #[test]
    fn error_message_is_truncated_at_a_char_boundary() {
        // 'é' is 2 bytes: 1023 bytes of 'a' then 'é' would cut the 'é' at the limit.
        let message = format!("{}é and more", "a".repeat(ERROR_MESSAGE_LIMIT - 1));
        let mut bytes = Vec::new();
        encode_error(&mut bytes, ErrorCode::Malformed, &message).expect("encodes");
        let decoded = decode_error(single_frame(&bytes).payload).expect("valid");
        assert_eq!(decoded.message, "a".repeat(ERROR_MESSAGE_LIMIT - 1));
    }

    /// Size of the archived request root with a `ModelRef::Id` (no out-of-line name).
    const REQUEST_ROOT_SIZE: usize = core::mem::size_of::<ArchivedRequest>();

    #[test]
    fn input_up_to_the_cap_encodes_and_one_more_byte_does_not() {
        let model = ModelRef::Id(3);
        let input = vec![0xa5; FRAME_PAYLOAD_LIMIT as usize - REQUEST_ROOT_SIZE];
        let request = RequestRef {
            client_request_id: 1,
            model: &model,
            slo_us: None,
            input: &input,
        };
        let mut out = Vec::new();
        let size = encode_request(&mut out, &request).expect("a payload exactly at the cap encodes");
        assert_eq!(size, FRAME_HEADER_SIZE + FRAME_PAYLOAD_LIMIT as usize);
        let frame = single_frame(&out);
        let archived = access_request(frame.payload).expect("valid");
        assert_eq!(archived.input.as_slice(), input.as_slice());
        assert_eq!(check_request(archived), Ok(()));

        let input = vec![0xa5; input.len() + 1];
        let request = RequestRef {
            input: &input,
            ..request
        };
        let mut out = vec![1, 2, 3];
        let error = encode_request(&mut out, &request).expect_err("one byte over the cap");
        assert_eq!(
            error,
            WireError::Oversized {
                payload_len: FRAME_PAYLOAD_LIMIT as u64 + 1,
                limit: FRAME_PAYLOAD_LIMIT
            }
        );
        assert_eq!(out, [1, 2, 3], "a failed encode leaves the buffer as it was");
    }

    #[test]
    fn many_frames_in_one_buffer_and_a_partial_one() {
        let requests = sample_requests();
        let mut buffer = Vec::new();
        let mut frame_sizes = Vec::new();
        for request in &requests {
            frame_sizes.push(encode_request(&mut buffer, &request.borrowed()).expect("encodes"));
        }
        encode_error(&mut buffer, ErrorCode::UnexpectedKind, "bye").expect("encodes");
        let complete_len = buffer.len();
        // A partial frame: the first request's frame without its last 5 bytes.
        let partial = encode_request_owned(&requests[0]);
        buffer.extend_from_slice(&partial[..partial.len() - 5]);

        let mut frames = FrameDecoder::default().frames(&buffer);
        for (request, frame_size) in requests.iter().zip(&frame_sizes) {
            let frame = frames.next().expect("a frame").expect("valid header");
            assert_eq!(frame.kind, Kind::Request);
            assert_eq!(frame.size(), *frame_size);
            assert_eq!(*access_request(frame.payload).expect("valid"), *request);
        }
        let frame = frames.next().expect("a frame").expect("valid header");
        assert_eq!(decode_error(frame.payload).expect("valid").message, "bye");
        assert!(frames.next().is_none(), "the partial frame is not yielded");
        assert_eq!(frames.consumed(), complete_len);
        assert_eq!(frames.missing_min(), 5);
        assert_eq!(frames.remaining(), &partial[..partial.len() - 5]);

        // Every cut inside the partial frame asks for exactly what is missing once the header is
        // complete, and for at least the rest of the header before.
        for cut in 0..partial.len() {
            match FrameDecoder::default().decode(&partial[..cut]) {
                Ok(Decoded::Incomplete { missing_min }) if cut >= FRAME_HEADER_SIZE => {
                    assert_eq!(missing_min, partial.len() - cut)
                }
                Ok(Decoded::Incomplete { missing_min }) => assert_eq!(missing_min, FRAME_HEADER_SIZE - cut),
                other => panic!("cut at {cut}: {other:?}"),
            }
        }
        // An empty buffer needs a header.
        let mut frames = FrameDecoder::default().frames(&[]);
        assert!(frames.next().is_none());
        assert_eq!((frames.consumed(), frames.missing_min()), (0, FRAME_HEADER_SIZE));
    }

    #[test]
    fn payload_at_an_odd_offset_is_accessed_in_place() {
        let request = &sample_requests()[5];
        let mut odd_root_seen = false;
        // Offsets 0..8 put the archived root at every address residue modulo 8.
        for offset in 0..8 {
            let mut buffer = vec![0u8; offset];
            encode_request(&mut buffer, &request.borrowed()).expect("encodes");
            let frame = single_frame(&buffer[offset..]);
            let archived = access_request(frame.payload).expect("unaligned access works");
            assert_eq!(*archived, *request);
            odd_root_seen |= (archived as *const ArchivedRequest as usize) % 2 == 1;
            // Zero copy: the archived input is a slice of the buffer itself.
            assert!(buffer.as_ptr_range().contains(&archived.input.as_slice().as_ptr()));
        }
        assert!(odd_root_seen);
        assert_eq!(core::mem::align_of::<ArchivedRequest>(), 1);
        assert_eq!(core::mem::align_of::<ArchivedReply>(), 1);
        assert_eq!(core::mem::align_of::<ArchivedErrorFrame>(), 1);
    }

    fn header_bytes(magic: u32, version: u16, kind: u16, payload_len: u32, reserved: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&magic.to_le_bytes());
        bytes.extend_from_slice(&version.to_le_bytes());
        bytes.extend_from_slice(&kind.to_le_bytes());
        bytes.extend_from_slice(&payload_len.to_le_bytes());
        bytes.extend_from_slice(&reserved.to_le_bytes());
        bytes
    }

    #[test]
    fn header_errors() {
        fn decode(bytes: &[u8]) -> Result<Decoded<'_>, WireError> {
            FrameDecoder::default().decode(bytes)
        }
        assert_eq!(
            decode(&header_bytes(0x5054_5448, 1, 1, 0, 0)),
            Err(WireError::BadMagic { magic: 0x5054_5448 })
        );
        // "GET " is refused as soon as 4 bytes arrive.
        assert_eq!(
            decode(b"GET "),
            Err(WireError::BadMagic {
                magic: u32::from_le_bytes(*b"GET ")
            })
        );
        // Version 1 (before the executor messages carried their secret) is refused.
        assert_eq!(
            decode(&header_bytes(FRAME_MAGIC, 1, 1, 0, 0)),
            Err(WireError::UnsupportedVersion { version: 1 })
        );
        assert_eq!(
            decode(&header_bytes(FRAME_MAGIC, 3, 1, 0, 0)),
            Err(WireError::UnsupportedVersion { version: 3 })
        );
        assert_eq!(
            decode(&header_bytes(FRAME_MAGIC, 0, 1, 0, 0)),
            Err(WireError::UnsupportedVersion { version: 0 })
        );
        for kind in [0, 6, 15, 27, 63, u16::MAX] {
            assert_eq!(
                decode(&header_bytes(FRAME_MAGIC, PROTOCOL_VERSION, kind, 0, 0)),
                Err(WireError::UnknownKind { kind })
            );
        }
        assert_eq!(
            decode(&header_bytes(
                FRAME_MAGIC,
                PROTOCOL_VERSION,
                1,
                FRAME_PAYLOAD_LIMIT + 1,
                0
            )),
            Err(WireError::Oversized {
                payload_len: FRAME_PAYLOAD_LIMIT as u64 + 1,
                limit: FRAME_PAYLOAD_LIMIT
            })
        );
        assert_eq!(
            FrameDecoder::new(100).decode(&header_bytes(FRAME_MAGIC, PROTOCOL_VERSION, 2, 101, 0)[..12]),
            Err(WireError::Oversized {
                payload_len: 101,
                limit: 100
            }),
            "a lower configured cap applies, before the header is complete"
        );
        assert_eq!(
            decode(&header_bytes(FRAME_MAGIC, PROTOCOL_VERSION, 1, 0, 1 << 31)),
            Err(WireError::ReservedNonzero { reserved: 1 << 31 })
        );
        // A valid header with a zero-length payload is a frame (whose access then fails).
        let bytes = header_bytes(FRAME_MAGIC, PROTOCOL_VERSION, 3, 0, 0);
        let frame = single_frame(&bytes);
        assert!(matches!(
            access_error(frame.payload),
            Err(WireError::Malformed { kind: Kind::Error, .. })
        ));
        // Errors map to the codes of the error frame.
        assert_eq!(WireError::BadMagic { magic: 0 }.error_code(), Some(ErrorCode::BadMagic));
        assert_eq!(
            WireError::ReservedNonzero { reserved: 1 }.error_code(),
            Some(ErrorCode::ReservedNonzero)
        );
    }

    #[test]
    fn errors_stop_the_frame_iterator() {
        let mut buffer = encode_request_owned(&sample_requests()[0]);
        let first_len = buffer.len();
        buffer.extend_from_slice(&header_bytes(FRAME_MAGIC, PROTOCOL_VERSION, 9, 0, 0));
        buffer.extend_from_slice(&encode_request_owned(&sample_requests()[1]));
        let mut frames = FrameDecoder::default().frames(&buffer);
        assert!(frames.next().expect("first").is_ok());
        assert_eq!(frames.next(), Some(Err(WireError::UnknownKind { kind: 9 })));
        assert_eq!(frames.next(), None);
        assert_eq!(frames.consumed(), first_len);
    }

    #[test]
    fn payload_validation_errors_are_malformed() {
        let bytes = encode_request_owned(&sample_requests()[3]);
        let payload = single_frame(&bytes).payload;
        // Truncations of the payload never validate (the root moves, pointers leave the range).
        for cut in 0..payload.len() {
            assert!(
                matches!(
                    access_request(&payload[..cut]),
                    Err(WireError::Malformed {
                        kind: Kind::Request,
                        ..
                    })
                ),
                "cut {cut}"
            );
        }
        // A bad enum tag: the ModelRef tag is the 9th byte of the root.
        let mut bad = payload.to_vec();
        let root = bad.len() - REQUEST_ROOT_SIZE;
        bad[root + 8] = 7;
        assert!(matches!(access_request(&bad), Err(WireError::Malformed { .. })));
        // A status out of range in a reply.
        let mut reply = Vec::new();
        encode_reply(
            &mut reply,
            &Reply {
                client_request_id: 1,
                status: Status::Ok,
                timings: Timings::default(),
                output: vec![],
            }
            .borrowed(),
        )
        .expect("encodes");
        let reply_root = reply.len() - core::mem::size_of::<ArchivedReply>();
        reply[reply_root + 8] = 8;
        assert!(matches!(
            access_reply(&reply[FRAME_HEADER_SIZE..]),
            Err(WireError::Malformed { kind: Kind::Reply, .. })
        ));
        // Invalid UTF-8 in an inline model name.
        let name = encode_request_owned(&Request {
            client_request_id: 1,
            model: ModelRef::Name("abc".into()),
            slo_us: None,
            input: vec![],
        });
        let mut name = name[FRAME_HEADER_SIZE..].to_vec();
        let root = name.len() - REQUEST_ROOT_SIZE;
        name[root + 9] = 0xc3; // a lead byte followed by 'b'
        assert!(matches!(access_request(&name), Err(WireError::Malformed { .. })));
    }

    #[test]
    fn request_limits_are_checked_after_access() {
        let long_name = "m".repeat(MODEL_NAME_LIMIT + 1);
        let request = Request {
            client_request_id: 5,
            model: ModelRef::Name(long_name),
            slo_us: None,
            input: vec![],
        };
        let bytes = encode_request_owned(&request);
        let archived = access_request(single_frame(&bytes).payload).expect("structurally valid");
        assert_eq!(
            archived.client_request_id.to_native(),
            5,
            "the id is known, so the service can reply"
        );
        assert_eq!(
            check_request(archived),
            Err(WireError::ModelNameTooLong {
                name_len: MODEL_NAME_LIMIT + 1,
                limit: MODEL_NAME_LIMIT
            })
        );
        let at_limit = Request {
            model: ModelRef::Name("m".repeat(MODEL_NAME_LIMIT)),
            ..request
        };
        let bytes = encode_request_owned(&at_limit);
        assert_eq!(
            check_request(access_request(single_frame(&bytes).payload).expect("valid")),
            Ok(())
        );
    }

    #[test]
    fn borrowed_forms_encode_like_owned() {
        for request in sample_requests() {
            let derived = rkyv::to_bytes::<rancor::Error>(&request).expect("derive encodes");
            let bytes = encode_request_owned(&request);
            assert_eq!(&bytes[FRAME_HEADER_SIZE..], derived.as_slice());
        }
        for (status, output_len) in STATUSES.into_iter().zip([0, 20, 100_000].into_iter().cycle()) {
            let reply = Reply {
                client_request_id: 7,
                status,
                timings: Timings {
                    queued_us: 1,
                    exec_us: 2,
                    total_us: 3,
                },
                output: vec![4; output_len],
            };
            let derived = rkyv::to_bytes::<rancor::Error>(&reply).expect("derive encodes");
            // After other bytes, as a reply is written behind others.
            let mut bytes = vec![9; 13];
            encode_reply(&mut bytes, &reply.borrowed()).expect("encodes");
            assert_eq!(
                &bytes[13 + FRAME_HEADER_SIZE..],
                derived.as_slice(),
                "{output_len} bytes of output"
            );
            let frame = single_frame(&bytes[13..]);
            assert_eq!(access_reply(frame.payload).expect("valid").output.len(), output_len);
        }
        for message in ["", "short", "a message longer than eight bytes"] {
            let error = ErrorFrame {
                code: ErrorCode::Oversized,
                message: message.into(),
            };
            let derived = rkyv::to_bytes::<rancor::Error>(&error).expect("derive encodes");
            let mut bytes = Vec::new();
            encode_error(&mut bytes, error.code, message).expect("encodes");
            assert_eq!(&bytes[FRAME_HEADER_SIZE..], derived.as_slice());
        }
    }

    /// The archived layout that `docs/protocol.md` documents byte by byte.
    #[test]
    fn archived_layout() {
        use core::mem::{offset_of, size_of};
        use rkyv::option::ArchivedOption;
        assert_eq!(size_of::<ArchivedVec<u8>>(), 8);
        assert_eq!(size_of::<ArchivedString>(), 8);
        assert_eq!(size_of::<ArchivedOption<rkyv::Archived<u32>>>(), 5);
        assert_eq!(size_of::<ArchivedModelRef>(), 9);
        assert_eq!(size_of::<Status>(), 1);
        assert_eq!(size_of::<ErrorCode>(), 1);
        assert_eq!(size_of::<ArchivedTimings>(), 12);
        assert_eq!(offset_of!(ArchivedTimings, queued_us), 0);
        assert_eq!(offset_of!(ArchivedTimings, exec_us), 4);
        assert_eq!(offset_of!(ArchivedTimings, total_us), 8);

        assert_eq!(size_of::<ArchivedRequest>(), 30);
        assert_eq!(offset_of!(ArchivedRequest, client_request_id), 0);
        assert_eq!(offset_of!(ArchivedRequest, model), 8);
        assert_eq!(offset_of!(ArchivedRequest, slo_us), 17);
        assert_eq!(offset_of!(ArchivedRequest, input), 22);

        assert_eq!(size_of::<ArchivedReply>(), 29);
        assert_eq!(offset_of!(ArchivedReply, client_request_id), 0);
        assert_eq!(offset_of!(ArchivedReply, status), 8);
        assert_eq!(offset_of!(ArchivedReply, timings), 9);
        assert_eq!(offset_of!(ArchivedReply, output), 21);

        assert_eq!(size_of::<ArchivedErrorFrame>(), 9);
        assert_eq!(offset_of!(ArchivedErrorFrame, code), 0);
        assert_eq!(offset_of!(ArchivedErrorFrame, message), 1);

        // The archived discriminants are the declared ones.
        for status in STATUSES {
            let reply = Reply {
                client_request_id: 0,
                status,
                timings: Timings::default(),
                output: vec![],
            };
            let mut bytes = Vec::new();
            encode_reply(&mut bytes, &reply.borrowed()).expect("encodes");
            assert_eq!(bytes[FRAME_HEADER_SIZE + 8], status as u8);
        }
        for code in ERROR_CODES {
            let mut bytes = Vec::new();
            encode_error(&mut bytes, code, "").expect("encodes");
            assert_eq!(bytes[FRAME_HEADER_SIZE], code as u8);
        }
    }

    // A second encoder, written from `docs/protocol.md` alone as a client in another language
    // would write it, without rkyv. It must produce the same bytes as rkyv for every message.

    fn doc_string(out: &mut Vec<u8>, field_pos: usize, text: &str, text_pos: usize) {
        if text.len() <= 8 {
            let mut inline = [0xffu8; 8];
            inline[..text.len()].copy_from_slice(text.as_bytes());
            out.extend_from_slice(&inline);
        } else {
            let len = text.len() as u32;
            out.extend_from_slice(&(0x80 | (len & 0x3f) | ((len >> 6) << 8)).to_le_bytes());
            out.extend_from_slice(&(text_pos as i32 - field_pos as i32).to_le_bytes());
        }
    }

    fn doc_vec(out: &mut Vec<u8>, field_pos: usize, bytes_pos: usize, len: usize) {
        out.extend_from_slice(&(bytes_pos as i32 - field_pos as i32).to_le_bytes());
        out.extend_from_slice(&(len as u32).to_le_bytes());
    }

    fn doc_frame(kind: u16, payload: Vec<u8>) -> Vec<u8> {
        let mut frame = Vec::new();
        frame.extend_from_slice(b"SYMP");
        frame.extend_from_slice(&2u16.to_le_bytes());
        frame.extend_from_slice(&kind.to_le_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        frame.extend_from_slice(&[0; 4]);
        frame.extend_from_slice(&payload);
        frame
    }

    fn doc_request(request: &Request) -> Vec<u8> {
        let mut out = Vec::new();
        // Out-of-line data in field order: the model name (if longer than 8 bytes), the input.
        let name_pos = out.len();
        if let ModelRef::Name(name) = &request.model {
            if name.len() > 8 {
                out.extend_from_slice(name.as_bytes());
            }
        }
        let input_pos = out.len();
        out.extend_from_slice(&request.input);
        // The root, 30 bytes, at the end.
        let root = out.len();
        out.extend_from_slice(&request.client_request_id.to_le_bytes());
        match &request.model {
            ModelRef::Id(id) => {
                out.push(0);
                out.extend_from_slice(&id.to_le_bytes());
                out.extend_from_slice(&[0; 4]);
            }
            ModelRef::Name(name) => {
                out.push(1);
                doc_string(&mut out, root + 9, name, name_pos);
            }
        }
        match request.slo_us {
            None => out.extend_from_slice(&[0; 5]),
            Some(slo_us) => {
                out.push(1);
                out.extend_from_slice(&slo_us.to_le_bytes());
            }
        }
        doc_vec(&mut out, root + 22, input_pos, request.input.len());
        assert_eq!(out.len() - root, 30);
        doc_frame(1, out)
    }

    fn doc_reply(reply: &Reply) -> Vec<u8> {
        let mut out = reply.output.clone();
        let root = out.len();
        out.extend_from_slice(&reply.client_request_id.to_le_bytes());
        out.push(reply.status as u8);
        for us in [reply.timings.queued_us, reply.timings.exec_us, reply.timings.total_us] {
            out.extend_from_slice(&us.to_le_bytes());
        }
        doc_vec(&mut out, root + 21, 0, reply.output.len());
        assert_eq!(out.len() - root, 29);
        doc_frame(2, out)
    }

    fn doc_error(code: ErrorCode, message: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if message.len() > 8 {
            out.extend_from_slice(message.as_bytes());
        }
        let root = out.len();
        out.push(code as u8);
        doc_string(&mut out, root + 1, message, 0);
        doc_frame(3, out)
    }

    fn doc_models(models: &Models) -> Vec<u8> {
        let mut out = Vec::new();
        // Each model's name (if over 8 bytes), then the array of 29-byte entries, the root.
        let names: Vec<usize> = models
            .models
            .iter()
            .map(|m| {
                let at = out.len();
                if m.name.len() > 8 {
                    out.extend_from_slice(m.name.as_bytes());
                }
                at
            })
            .collect();
        let array = out.len();
        for (i, (m, at)) in models.models.iter().zip(names).enumerate() {
            let pos = array + 29 * i;
            out.extend_from_slice(&m.id.to_le_bytes());
            doc_string(&mut out, pos + 4, &m.name, at);
            out.extend_from_slice(&m.slo_us.to_le_bytes());
            match m.input_bytes {
                None => out.extend_from_slice(&[0; 5]),
                Some(bytes) => {
                    out.push(1);
                    out.extend_from_slice(&bytes.to_le_bytes());
                }
            }
            out.extend_from_slice(&m.batch_size_max.to_le_bytes());
        }
        let root = out.len();
        out.extend_from_slice(&models.client_request_id.to_le_bytes());
        doc_vec(&mut out, root + 8, array, models.models.len());
        doc_frame(5, out)
    }

    #[test]
    fn the_model_list_is_as_protocol_md_says() {
        let models = Models {
            client_request_id: 77,
            models: vec![
                ModelEntry {
                    id: 0,
                    name: "resnet50_v1".into(),
                    slo_us: 100_000,
                    input_bytes: Some(12_288),
                    batch_size_max: 75,
                },
                ModelEntry {
                    id: 1,
                    name: "bert".into(),
                    slo_us: 25_000,
                    input_bytes: None,
                    batch_size_max: 8,
                },
            ],
        };
        let mut bytes = Vec::new();
        encode_models(&mut bytes, &models).unwrap();
        assert_eq!(doc_models(&models), bytes);
        let frame = single_frame(&bytes);
        assert_eq!(decode_models(frame.payload).unwrap(), models);
        let mut ask = Vec::new();
        encode_list_models(&mut ask, 77).unwrap();
        assert_eq!(ask, doc_frame(4, 77u64.to_le_bytes().to_vec()));
        let frame = single_frame(&ask);
        assert_eq!(
            access_list_models(frame.payload).unwrap().client_request_id.to_native(),
            77
        );
    }

    #[test]
    fn protocol_md_describes_the_bytes_exactly() {
        let mut requests = sample_requests();
        requests.push(Request {
            client_request_id: 46,
            model: ModelRef::Name("n".repeat(MODEL_NAME_LIMIT)), // a length over 63 uses the high bits
            slo_us: Some(3),
            input: vec![],
        });
        for request in &requests {
            assert_eq!(doc_request(request), encode_request_owned(request), "{request:?}");
        }
        for status in STATUSES {
            for output in [vec![], vec![1, 2, 3]] {
                let reply = Reply {
                    client_request_id: 3,
                    status,
                    timings: Timings {
                        queued_us: 5,
                        exec_us: 6,
                        total_us: 70_000,
                    },
                    output,
                };
                let mut bytes = Vec::new();
                encode_reply(&mut bytes, &reply.borrowed()).expect("encodes");
                assert_eq!(doc_reply(&reply), bytes);
            }
        }
        for message in ["", "12345678", "123456789", &"x".repeat(1000)] {
            let mut bytes = Vec::new();
            encode_error(&mut bytes, ErrorCode::UnexpectedKind, message).expect("encodes");
            assert_eq!(doc_error(ErrorCode::UnexpectedKind, message), bytes);
        }
    }

    #[test]
    fn out_of_line_data_out_of_field_order_is_refused() {
        // protocol.md: out-of-line data must come in field order. Swap name and input.
        let name = "a-long-model-name";
        let input = [1u8, 2, 3];
        let mut out = Vec::new();
        out.extend_from_slice(&input);
        out.extend_from_slice(name.as_bytes());
        let root = out.len();
        out.extend_from_slice(&1u64.to_le_bytes());
        out.push(1);
        doc_string(&mut out, root + 9, name, input.len());
        out.extend_from_slice(&[0; 5]);
        doc_vec(&mut out, root + 22, 0, input.len());
        assert!(matches!(access_request(&out), Err(WireError::Malformed { .. })));
        // The same bytes in field order are accepted.
        let mut out = Vec::new();
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(&input);
        let root = out.len();
        out.extend_from_slice(&1u64.to_le_bytes());
        out.push(1);
        doc_string(&mut out, root + 9, name, 0);
        out.extend_from_slice(&[0; 5]);
        doc_vec(&mut out, root + 22, name.len(), input.len());
        let archived = access_request(&out).expect("field order is valid");
        assert_eq!(archived.input.as_slice(), input);
    }

    /// The encoded bytes of fixed messages. If this fails, the wire format changed: that needs
    /// a new `PROTOCOL_VERSION` and a new `docs/protocol.md`, not a new golden string.
    #[test]
    fn golden_bytes() {
        let name = ModelRef::Name("resnet50_v1".into());
        let id = ModelRef::Id(3);
        let short_name = ModelRef::Name("bert".into());
        let requests = [
            (
                RequestRef {
                    client_request_id: 7,
                    model: &name,
                    slo_us: Some(25_000),
                    input: &[0xde, 0xad, 0xbe, 0xef],
                },
                // The worked example of docs/protocol.md.
                "53594d50020001002d00000000000000\
                 7265736e657435305f7631deadbeef\
                 0700000000000000018b000000e8ffffff01a8610000e6ffffff04000000",
            ),
            (
                RequestRef {
                    client_request_id: 8,
                    model: &id,
                    slo_us: None,
                    input: &[1, 2, 3],
                },
                "53594d50020001002100000000000000\
                 010203\
                 08000000000000000003000000000000000000000000e7ffffff03000000",
            ),
            (
                RequestRef {
                    client_request_id: 9,
                    model: &short_name,
                    slo_us: Some(0),
                    input: &[],
                },
                "53594d50020001001e00000000000000\
                 09000000000000000162657274ffffffff0100000000eaffffff00000000",
            ),
        ];
        for (request, golden) in requests {
            let mut bytes = Vec::new();
            encode_request(&mut bytes, &request).expect("encodes");
            assert_eq!(hex(&bytes), golden);
            assert_eq!(
                decode_request(single_frame(&bytes).payload).expect("valid").borrowed(),
                request
            );
        }

        let replies = [
            (
                ReplyRef {
                    client_request_id: 7,
                    status: Status::Ok,
                    timings: Timings {
                        queued_us: 1200,
                        exec_us: 3400,
                        total_us: 4700,
                    },
                    output: &[0x01, 0x02],
                },
                "53594d50020002001f00000000000000\
                 0102\
                 070000000000000000b0040000480d00005c120000e9ffffff02000000",
            ),
            (
                ReplyRef {
                    client_request_id: 8,
                    status: Status::Dropped,
                    timings: Timings {
                        queued_us: 900,
                        exec_us: 0,
                        total_us: 950,
                    },
                    output: &[],
                },
                "53594d50020002001d00000000000000\
                 0800000000000000018403000000000000b6030000ebffffff00000000",
            ),
        ];
        for (reply, golden) in replies {
            let mut bytes = Vec::new();
            encode_reply(&mut bytes, &reply).expect("encodes");
            assert_eq!(hex(&bytes), golden);
            assert_eq!(
                decode_reply(single_frame(&bytes).payload).expect("valid").borrowed(),
                reply
            );
        }

        let mut bytes = Vec::new();
        encode_error(&mut bytes, ErrorCode::UnknownKind, "unknown frame kind 9").expect("encodes");
        assert_eq!(
            hex(&bytes),
            "53594d50020003001d00000000000000\
             756e6b6e6f776e206672616d65206b696e642039\
             0294000000ebffffff"
        );
    }
}
