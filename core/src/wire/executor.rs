//! The executor protocol: frames between the scheduler's shards and executor processes.
//!
//! Same frame header and rkyv format features as the client protocol ([`super`]); the kinds
//! are 16 to 26 (`docs/protocol.md`, "Executor protocol"). The order of a session:
//!
//! ```text
//! executor                                  scheduler (any shard, the front-door port)
//!   HELLO {token, name, backend, gpus} ───▶
//!                                      ◀─── WELCOME {executor id, secret, link address per shard, models}
//!   PROBE {sequence, sent} ×N ─────────▶
//!                                      ◀─── PROBE_REPLY {sequence, sent, scheduler time} ×N
//!   REGISTER {clock offset, profiles} ─▶
//!                                      ◀─── REGISTERED {executor id}
//! then, once per shard, on that shard's link address:
//!   JOIN {token, executor id, secret, shard} ──▶
//!                                      ◀─── JOINED {shard}
//!                                      ◀─── PLAN {plan, request ids, input lengths} + inputs
//!   RESULT {plan, status, times, output lengths} + outputs ─▶
//!   HEARTBEAT {sent} ──────────────────▶ (every interval, from the JOIN on)
//!                                      ◀─── HEARTBEAT {scheduler time, echo of sent}
//! ```
//!
//! A refusal (wrong token, a model the executor does not run, no room for its GPUs) is an
//! ERROR frame with [`ErrorCode::Unauthorized`] or [`ErrorCode::Refused`], then the close.
//!
//! # Sectioned payloads
//!
//! PLAN and RESULT carry bulk bytes (inputs, outputs) beside their archive, not inside it:
//! the payload is `archive length (u32 LE) | archive | section`, and the archive gives each
//! request's length in the section, in order. The sender writes the bulk bytes straight from
//! where they lie (the client's receive buffer on the scheduler, the output buffer on the
//! executor) after the archive; nothing is re-serialized, and a receiver hands out slices of
//! its receive buffer. [`split_section`] and the `access_*` functions validate both parts.

use rkyv::rancor;
use rkyv::{Archive, Deserialize, Serialize};

use super::{ErrorCode, Kind, WireError, FRAME_HEADER_SIZE, FRAME_PAYLOAD_LIMIT};
use crate::profile::Profile;

/// Bytes of an executor token.
pub const TOKEN_LIMIT: usize = 256;
/// GPUs one executor registers.
pub const EXECUTOR_GPUS_LIMIT: usize = 4096;
/// Requests one plan carries.
pub const PLAN_REQUESTS_LIMIT: usize = 1 << 16;
/// Bytes of a registration's secret (WELCOME, JOIN).
pub const SECRET_BYTES: usize = 16;

/// One GPU of an executor.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct GpuInfo {
    /// The executor's own index for it (plans name it).
    pub index: u32,
    pub name: String,
    pub memory_bytes: u64,
}

/// Executor to scheduler, first frame of the control connection.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Hello {
    pub token: String,
    /// For logs: a host name or any label.
    pub name: String,
    /// `sim`, `cpu` or `cuda`.
    pub backend: String,
    pub gpus: Vec<GpuInfo>,
}

/// A latency profile on the wire: `latency_ns[b - 1] = l(b)`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ProfileWire {
    pub latency_ns: Vec<u64>,
    pub pre_ns: u64,
    pub post_ns: u64,
}

impl ProfileWire {
    pub fn of(profile: &Profile) -> ProfileWire {
        ProfileWire {
            latency_ns: (1..=profile.batch_size_max()).map(|b| profile.latency_ns(b)).collect(),
            pre_ns: profile.pre_ns(),
            post_ns: profile.post_ns(),
        }
    }

    /// The profile, or why it is unusable.
    pub fn to_profile(&self) -> Result<Profile, String> {
        profile_from(self.latency_ns.clone(), self.pre_ns, self.post_ns)
    }
}

impl ArchivedProfileWire {
    /// The profile, or why it is unusable (empty, too long, a latency out of range).
    pub fn to_profile(&self) -> Result<Profile, String> {
        let latency_ns = self.latency_ns.iter().map(|l| l.to_native()).collect();
        profile_from(latency_ns, self.pre_ns.to_native(), self.post_ns.to_native())
    }
}

/// Longest time a profile may give any part of a batch: an hour.
const PROFILE_TIME_LIMIT_NS: u64 = 3_600_000_000_000;

fn profile_from(latency_ns: Vec<u64>, pre_ns: u64, post_ns: u64) -> Result<Profile, String> {
    let len = latency_ns.len();
    if len == 0 || len > crate::profile::BATCH_SIZE_LIMIT as usize {
        return Err(format!(
            "a profile has 1 to {} batch sizes, not {len}",
            crate::profile::BATCH_SIZE_LIMIT
        ));
    }
    if latency_ns.iter().any(|&l| l == 0 || l > PROFILE_TIME_LIMIT_NS)
        || pre_ns > PROFILE_TIME_LIMIT_NS
        || post_ns > PROFILE_TIME_LIMIT_NS
    {
        return Err("every latency is in (0, 1 hour]".to_string());
    }
    Ok(Profile::from_latencies_ns(latency_ns, pre_ns, post_ns))
}

/// One model of the scheduler's catalog, as told to an executor.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ModelInfo {
    /// The id plans name it by.
    pub id: u32,
    pub name: String,
    pub slo_us: u64,
    /// The profile the scheduler plans with until an executor sends a measured one.
    pub profile: ProfileWire,
}

/// Scheduler to executor: accepted; where each shard's link listens, and the models.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Welcome {
    pub executor_id: u32,
    /// This registration's own secret: every JOIN of it must carry it (a token holder
    /// cannot JOIN as another executor).
    pub secret: [u8; SECRET_BYTES],
    /// Index = shard: the address to JOIN that shard on.
    pub links: Vec<String>,
    pub models: Vec<ModelInfo>,
}

/// Executor to scheduler: a clock probe (`gpu_exec::clock`).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Probe {
    pub sequence: u32,
    pub sent_local_ns: u64,
}

/// Scheduler to executor: the probe, stamped with the scheduler's clock.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ProbeReply {
    pub sequence: u32,
    pub sent_local_ns: u64,
    pub scheduler_ns: u64,
}

/// A model the executor runs, with the profile it measured (or was given).
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct ModelProfile {
    pub model: u32,
    pub profile: ProfileWire,
}

/// Executor to scheduler: its clock offset and the models it runs.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Register {
    /// `scheduler clock - executor clock` (for logs; the executor converts times itself).
    pub offset_ns: i64,
    pub offset_error_ns: u64,
    pub models: Vec<ModelProfile>,
}

/// Scheduler to executor: registered; JOIN every shard now.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Registered {
    pub executor_id: u32,
}

/// Executor to shard: first frame of a link.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Join {
    pub token: String,
    pub executor_id: u32,
    /// The secret of the executor's WELCOME.
    pub secret: [u8; SECRET_BYTES],
    pub shard: u32,
}

/// Shard to executor: the link is up.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Joined {
    pub shard: u32,
}

/// One request of a plan; its input is the next `input_len` bytes of the section.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct PlanRequest {
    pub request_id: u64,
    pub input_len: u32,
}

/// Shard to executor: run this batch at `exec_at_ns` (scheduler clock) on `gpu`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct PlanMsg {
    pub plan_id: u64,
    /// The executor's GPU index.
    pub gpu: u32,
    pub model: u32,
    pub exec_at_ns: u64,
    /// When the scheduler expects it to finish (scheduler clock).
    pub finish_ns: u64,
    pub requests: Vec<PlanRequest>,
}

/// How a plan ended on the executor.
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
    Default,
)]
#[rkyv(as = PlanStatus)]
#[bytecheck(crate = rkyv::bytecheck)]
#[repr(u8)]
pub enum PlanStatus {
    /// Ran; every request has an output.
    #[default]
    Ok = 0,
    /// Not run: it could only start more than the late bound after `exec_at`.
    Late = 1,
    /// Not run or failed while running (an input the model refuses, a backend error).
    Failed = 2,
}

/// Executor to shard: one plan's outcome; outputs follow in the section, in request order.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[rkyv(derive(Debug))]
pub struct ResultMsg {
    pub plan_id: u64,
    pub status: PlanStatus,
    /// Scheduler clock (converted by the executor); 0 if it never started.
    pub started_ns: u64,
    pub finished_ns: u64,
    /// Per request, in plan order: bytes of its output in the section.
    pub output_lens: Vec<u32>,
    /// Indexes (in plan order, ascending) of requests whose input the model refused: answered
    /// `malformed`, output length 0.
    pub refused: Vec<u32>,
    /// For people, when not ok or something was refused.
    pub message: String,
}

/// Either way on a link: still alive.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[rkyv(derive(Debug))]
pub struct Heartbeat {
    /// The sender's clock when it sent this heartbeat.
    pub sent_ns: u64,
    /// In a shard's answer: the `sent_ns` of the executor's heartbeat it answers (the
    /// executor re-estimates its clock offset from the pair, as from a probe); 0 from an
    /// executor.
    pub echo_ns: u64,
}

type HighSerializer<'a, 'b> =
    rkyv::api::high::HighSerializer<&'b mut Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rancor::Error>;

/// Appends a frame of `kind` holding `value`'s archive.
pub fn encode<T>(out: &mut Vec<u8>, kind: Kind, value: &T) -> Result<usize, WireError>
where
    T: for<'a, 'b> Serialize<HighSerializer<'a, 'b>>,
{
    super::encode_frame(out, kind, value)
}

/// Appends a sectioned frame: the archive of `value`, then the bytes `section` appends.
pub fn encode_sectioned<T>(
    out: &mut Vec<u8>,
    kind: Kind,
    value: &T,
    section: impl FnOnce(&mut Vec<u8>),
) -> Result<usize, WireError>
where
    T: for<'a, 'b> Serialize<HighSerializer<'a, 'b>>,
{
    encode_sectioned_parts(out, kind, value, |out| {
        section(out);
        0
    })
}

/// Appends a sectioned frame's header and archive only: the frame's section, `section_len`
/// bytes, must follow in the byte stream (the caller sends it from where it lies, without
/// copying it into `out`). Returns the whole frame's length.
pub fn encode_sectioned_head<T>(
    out: &mut Vec<u8>,
    kind: Kind,
    value: &T,
    section_len: usize,
) -> Result<usize, WireError>
where
    T: for<'a, 'b> Serialize<HighSerializer<'a, 'b>>,
{
    encode_sectioned_parts(out, kind, value, |_| section_len)
}

/// The archive, then `section`: it appends section bytes to `out` and returns how many more
/// follow outside it.
fn encode_sectioned_parts<T>(
    out: &mut Vec<u8>,
    kind: Kind,
    value: &T,
    section: impl FnOnce(&mut Vec<u8>) -> usize,
) -> Result<usize, WireError>
where
    T: for<'a, 'b> Serialize<HighSerializer<'a, 'b>>,
{
    let frame_start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_SIZE + 4]);
    if let Err(error) = rkyv::api::high::to_bytes_in::<_, rancor::Error>(value, &mut *out) {
        out.truncate(frame_start);
        return Err(WireError::Encode {
            kind,
            reason: error.to_string(),
        });
    }
    let archive_len = out.len() - frame_start - FRAME_HEADER_SIZE - 4;
    let outside = section(out);
    let payload_len = out.len() - frame_start - FRAME_HEADER_SIZE + outside;
    if payload_len > FRAME_PAYLOAD_LIMIT as usize {
        out.truncate(frame_start);
        return Err(WireError::Oversized {
            payload_len: payload_len as u64,
            limit: FRAME_PAYLOAD_LIMIT,
        });
    }
    let header = super::FrameHeader {
        kind,
        payload_len: payload_len as u32,
    };
    out[frame_start..frame_start + FRAME_HEADER_SIZE].copy_from_slice(&header.to_bytes());
    out[frame_start + FRAME_HEADER_SIZE..frame_start + FRAME_HEADER_SIZE + 4]
        .copy_from_slice(&(archive_len as u32).to_le_bytes());
    Ok(FRAME_HEADER_SIZE + payload_len)
}

/// Splits a sectioned payload into its archive and its section.
pub fn split_section(kind: Kind, payload: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let malformed = |reason: String| WireError::Malformed { kind, reason };
    let Some(len_bytes) = payload.get(..4) else {
        return Err(malformed(
            "a sectioned payload starts with its archive length".to_string(),
        ));
    };
    let archive_len = u32::from_le_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    let rest = &payload[4..];
    if archive_len > rest.len() {
        return Err(malformed(format!(
            "archive length {archive_len} exceeds the payload's {} bytes",
            rest.len()
        )));
    }
    Ok(rest.split_at(archive_len))
}

/// The archive of a frame of `kind`, validated in place.
pub fn access<T>(kind: Kind, payload: &[u8]) -> Result<&T::Archived, WireError>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, super::ValidationError>>,
{
    rkyv::access::<T::Archived, super::ValidationError>(payload).map_err(|error| WireError::Malformed {
        kind,
        reason: format!("{error:#}"),
    })
}

/// A PLAN frame: the plan and its requests' inputs, checked to add up to the section.
pub fn access_plan(payload: &[u8]) -> Result<(&ArchivedPlanMsg, &[u8]), WireError> {
    let (archive, section) = split_section(Kind::ExecPlan, payload)?;
    let plan = access::<PlanMsg>(Kind::ExecPlan, archive)?;
    if plan.requests.is_empty() || plan.requests.len() > PLAN_REQUESTS_LIMIT {
        return Err(WireError::Malformed {
            kind: Kind::ExecPlan,
            reason: format!("a plan has 1 to {PLAN_REQUESTS_LIMIT} requests"),
        });
    }
    let total: u64 = plan.requests.iter().map(|r| u64::from(r.input_len.to_native())).sum();
    if total != section.len() as u64 {
        return Err(WireError::Malformed {
            kind: Kind::ExecPlan,
            reason: format!("inputs add up to {total} bytes, the section has {}", section.len()),
        });
    }
    Ok((plan, section))
}

/// A RESULT frame: the outcome and its outputs, checked to add up to the section.
pub fn access_result(payload: &[u8]) -> Result<(&ArchivedResultMsg, &[u8]), WireError> {
    let (archive, section) = split_section(Kind::ExecResult, payload)?;
    let result = access::<ResultMsg>(Kind::ExecResult, archive)?;
    let total: u64 = result.output_lens.iter().map(|&l| u64::from(l.to_native())).sum();
    if total != section.len() as u64 {
        return Err(WireError::Malformed {
            kind: Kind::ExecResult,
            reason: format!("outputs add up to {total} bytes, the section has {}", section.len()),
        });
    }
    Ok((result, section))
}

/// Decodes one whole frame of `kind` from `bytes` (a test and cold-path helper).
pub fn decode<T>(kind: Kind, payload: &[u8]) -> Result<T, WireError>
where
    T: Archive,
    T::Archived: for<'a> rkyv::bytecheck::CheckBytes<rkyv::api::high::HighValidator<'a, super::ValidationError>>
        + Deserialize<T, rkyv::api::high::HighDeserializer<rancor::Error>>,
{
    let archived = access::<T>(kind, payload)?;
    rkyv::deserialize::<T, rancor::Error>(archived).map_err(|error| WireError::Malformed {
        kind,
        reason: error.to_string(),
    })
}

/// Whether an error code means "do not retry with the same settings".
pub fn is_refusal(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Unauthorized | ErrorCode::Refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FrameDecoder;

    fn one_frame(bytes: &[u8]) -> (Kind, &[u8]) {
        let frame = FrameDecoder::default().frames(bytes).next().unwrap().unwrap();
        (frame.kind, frame.payload)
    }

    #[test]
    fn plan_round_trips_with_inputs_in_the_section() {
        let plan = PlanMsg {
            plan_id: 7,
            gpu: 1,
            model: 2,
            exec_at_ns: 1_000,
            finish_ns: 5_000,
            requests: vec![
                PlanRequest {
                    request_id: 10,
                    input_len: 3,
                },
                PlanRequest {
                    request_id: 11,
                    input_len: 0,
                },
                PlanRequest {
                    request_id: 12,
                    input_len: 2,
                },
            ],
        };
        let mut out = Vec::new();
        encode_sectioned(&mut out, Kind::ExecPlan, &plan, |out| out.extend_from_slice(b"abcde")).unwrap();
        let (kind, payload) = one_frame(&out);
        assert_eq!(kind, Kind::ExecPlan);
        let (archived, section) = access_plan(payload).unwrap();
        assert_eq!(archived.plan_id.to_native(), 7);
        assert_eq!(archived.requests[2].request_id.to_native(), 12);
        assert_eq!(section, b"abcde");
    }

    #[test]
    fn a_head_with_its_section_sent_after_it_is_the_same_frame() {
        let plan = PlanMsg {
            plan_id: 9,
            requests: vec![PlanRequest {
                request_id: 1,
                input_len: 5,
            }],
            ..PlanMsg::default()
        };
        let mut copied = Vec::new();
        let len = encode_sectioned(&mut copied, Kind::ExecPlan, &plan, |out| {
            out.extend_from_slice(b"abcde")
        })
        .unwrap();
        let mut head = Vec::new();
        let head_len = encode_sectioned_head(&mut head, Kind::ExecPlan, &plan, 5).unwrap();
        assert_eq!((len, head_len), (copied.len(), copied.len()));
        head.extend_from_slice(b"abcde");
        assert_eq!(head, copied);
        // A section over the frame cap is refused before anything is sent.
        let mut out = Vec::new();
        let too_long = crate::wire::FRAME_PAYLOAD_LIMIT as usize;
        assert!(matches!(
            encode_sectioned_head(&mut out, Kind::ExecPlan, &plan, too_long),
            Err(WireError::Oversized { .. })
        ));
        assert!(out.is_empty());
    }

    #[test]
    fn a_section_that_does_not_add_up_is_malformed() {
        let plan = PlanMsg {
            requests: vec![PlanRequest {
                request_id: 1,
                input_len: 4,
            }],
            ..PlanMsg::default()
        };
        let mut out = Vec::new();
        encode_sectioned(&mut out, Kind::ExecPlan, &plan, |out| out.extend_from_slice(b"abc")).unwrap();
        let (_, payload) = one_frame(&out);
        assert!(matches!(access_plan(payload), Err(WireError::Malformed { .. })));
        // An archive length past the payload.
        assert!(matches!(
            split_section(Kind::ExecPlan, &[255, 0, 0, 0, 1]),
            Err(WireError::Malformed { .. })
        ));
        assert!(split_section(Kind::ExecPlan, &[1]).is_err());
        // An empty plan.
        let mut out = Vec::new();
        encode_sectioned(&mut out, Kind::ExecPlan, &PlanMsg::default(), |_| {}).unwrap();
        let (_, payload) = one_frame(&out);
        assert!(access_plan(payload).is_err());
    }

    #[test]
    fn result_and_hello_round_trip() {
        let result = ResultMsg {
            plan_id: 3,
            status: PlanStatus::Late,
            started_ns: 0,
            finished_ns: 0,
            output_lens: vec![1, 1],
            refused: Vec::new(),
            message: "late by 9 ms".to_string(),
        };
        let mut out = Vec::new();
        encode_sectioned(&mut out, Kind::ExecResult, &result, |out| out.extend_from_slice(b"xy")).unwrap();
        let (_, payload) = one_frame(&out);
        let (archived, section) = access_result(payload).unwrap();
        assert_eq!(archived.status, PlanStatus::Late);
        assert_eq!(archived.message.as_str(), "late by 9 ms");
        assert_eq!(section, b"xy");

        let hello = Hello {
            token: "t".to_string(),
            name: "host".to_string(),
            backend: "sim".to_string(),
            gpus: vec![GpuInfo {
                index: 0,
                name: "sim-0".to_string(),
                memory_bytes: 1 << 30,
            }],
        };
        let mut out = Vec::new();
        encode(&mut out, Kind::ExecHello, &hello).unwrap();
        let (kind, payload) = one_frame(&out);
        assert_eq!(kind, Kind::ExecHello);
        assert_eq!(decode::<Hello>(kind, payload).unwrap(), hello);
    }

    #[test]
    fn profiles_cross_the_wire() {
        let profile = Profile::parse_linear("sleep#1000,5000,10,20", 100_000_000).unwrap();
        let wire = ProfileWire::of(&profile);
        let mut out = Vec::new();
        encode(&mut out, Kind::ExecRegister, &wire).unwrap();
        let (_, payload) = one_frame(&out);
        let archived = access::<ProfileWire>(Kind::ExecRegister, payload).unwrap();
        assert_eq!(archived.to_profile().unwrap(), profile);
        let empty = ProfileWire {
            latency_ns: Vec::new(),
            pre_ns: 0,
            post_ns: 0,
        };
        let mut out = Vec::new();
        encode(&mut out, Kind::ExecRegister, &empty).unwrap();
        let (_, payload) = one_frame(&out);
        assert!(access::<ProfileWire>(Kind::ExecRegister, payload)
            .unwrap()
            .to_profile()
            .is_err());
    }

    // A second encoder of the executor messages, written from `docs/protocol.md` alone (its
    // "Executor messages, byte by byte"): it must produce rkyv's bytes exactly.

    /// A payload being written: out-of-line data first, in field order, then the root.
    #[derive(Default)]
    struct Doc {
        out: Vec<u8>,
    }

    impl Doc {
        /// Writes `bytes` out of line; returns where they start.
        fn data(&mut self, bytes: &[u8]) -> usize {
            let at = self.out.len();
            self.out.extend_from_slice(bytes);
            at
        }

        /// A string's out-of-line bytes if it has any (more than 8 bytes).
        fn string_data(&mut self, text: &str) -> usize {
            if text.len() > 8 {
                self.data(text.as_bytes())
            } else {
                self.out.len()
            }
        }
    }

    /// The 8-byte string field at `field_pos`, its bytes (if out of line) at `data_pos`.
    fn string_field(text: &str, field_pos: usize, data_pos: usize) -> Vec<u8> {
        let mut field = Vec::new();
        if text.len() <= 8 {
            field.extend_from_slice(text.as_bytes());
            field.resize(8, 0xff);
        } else {
            let len = text.len() as u32;
            field.extend_from_slice(&(0x80 | (len & 0x3f) | ((len >> 6) << 8)).to_le_bytes());
            field.extend_from_slice(&(data_pos as i32 - field_pos as i32).to_le_bytes());
        }
        field
    }

    /// The 8-byte vector field at `field_pos`: its array of `len` elements at `data_pos`.
    fn vec_field(len: usize, field_pos: usize, data_pos: usize) -> Vec<u8> {
        let mut field = (data_pos as i32 - field_pos as i32).to_le_bytes().to_vec();
        field.extend_from_slice(&(len as u32).to_le_bytes());
        field
    }

    /// A vector of strings: each string's bytes (those over 8 bytes), then the array of
    /// 8-byte fields. Returns the array's position.
    fn doc_strings(doc: &mut Doc, strings: &[String]) -> usize {
        let data: Vec<usize> = strings.iter().map(|s| doc.string_data(s)).collect();
        let array = doc.out.len();
        for (i, (s, at)) in strings.iter().zip(data).enumerate() {
            let field = string_field(s, array + 8 * i, at);
            doc.out.extend_from_slice(&field);
        }
        array
    }

    /// `ProfileWire` as a 24-byte root or element at `pos`, its array already at `array`.
    fn profile_bytes(p: &ProfileWire, pos: usize, array: usize) -> Vec<u8> {
        let mut b = vec_field(p.latency_ns.len(), pos, array);
        b.extend_from_slice(&p.pre_ns.to_le_bytes());
        b.extend_from_slice(&p.post_ns.to_le_bytes());
        b
    }

    fn doc_u64s(doc: &mut Doc, values: &[u64]) -> usize {
        let at = doc.out.len();
        for v in values {
            doc.out.extend_from_slice(&v.to_le_bytes());
        }
        at
    }

    fn doc_welcome(w: &Welcome) -> Vec<u8> {
        let mut doc = Doc::default();
        // Field order: links (strings, then their array), then models (each model's name
        // and latency array, then the array of 44-byte models).
        let links = doc_strings(&mut doc, &w.links);
        let mut model_data = Vec::new();
        for m in &w.models {
            let name = doc.string_data(&m.name);
            let latencies = doc_u64s(&mut doc, &m.profile.latency_ns);
            model_data.push((name, latencies));
        }
        let models = doc.out.len();
        for (i, (m, (name, latencies))) in w.models.iter().zip(model_data).enumerate() {
            let at = models + 44 * i;
            doc.out.extend_from_slice(&m.id.to_le_bytes());
            doc.out.extend_from_slice(&string_field(&m.name, at + 4, name));
            doc.out.extend_from_slice(&m.slo_us.to_le_bytes());
            let profile = profile_bytes(&m.profile, at + 20, latencies);
            doc.out.extend_from_slice(&profile);
        }
        let root = doc.out.len();
        doc.out.extend_from_slice(&w.executor_id.to_le_bytes());
        doc.out.extend_from_slice(&w.secret);
        doc.out.extend_from_slice(&vec_field(w.links.len(), root + 20, links));
        doc.out.extend_from_slice(&vec_field(w.models.len(), root + 28, models));
        assert_eq!(doc.out.len() - root, 36);
        doc.out
    }

    fn doc_hello(h: &Hello) -> Vec<u8> {
        let mut doc = Doc::default();
        let token = doc.string_data(&h.token);
        let name = doc.string_data(&h.name);
        let backend = doc.string_data(&h.backend);
        let gpu_names: Vec<usize> = h.gpus.iter().map(|g| doc.string_data(&g.name)).collect();
        let gpus = doc.out.len();
        for (i, (g, at)) in h.gpus.iter().zip(gpu_names).enumerate() {
            let pos = gpus + 20 * i;
            doc.out.extend_from_slice(&g.index.to_le_bytes());
            doc.out.extend_from_slice(&string_field(&g.name, pos + 4, at));
            doc.out.extend_from_slice(&g.memory_bytes.to_le_bytes());
        }
        let root = doc.out.len();
        for (k, (text, at)) in [(&h.token, token), (&h.name, name), (&h.backend, backend)]
            .into_iter()
            .enumerate()
        {
            doc.out.extend_from_slice(&string_field(text, root + 8 * k, at));
        }
        doc.out.extend_from_slice(&vec_field(h.gpus.len(), root + 24, gpus));
        doc.out
    }

    fn doc_register(r: &Register) -> Vec<u8> {
        let mut doc = Doc::default();
        let latencies: Vec<usize> = r
            .models
            .iter()
            .map(|m| doc_u64s(&mut doc, &m.profile.latency_ns))
            .collect();
        let models = doc.out.len();
        for (i, (m, at)) in r.models.iter().zip(latencies).enumerate() {
            let pos = models + 28 * i;
            doc.out.extend_from_slice(&m.model.to_le_bytes());
            let profile = profile_bytes(&m.profile, pos + 4, at);
            doc.out.extend_from_slice(&profile);
        }
        let root = doc.out.len();
        doc.out.extend_from_slice(&r.offset_ns.to_le_bytes());
        doc.out.extend_from_slice(&r.offset_error_ns.to_le_bytes());
        doc.out.extend_from_slice(&vec_field(r.models.len(), root + 16, models));
        doc.out
    }

    fn doc_join(j: &Join) -> Vec<u8> {
        let mut doc = Doc::default();
        let token = doc.string_data(&j.token);
        let root = doc.out.len();
        doc.out.extend_from_slice(&string_field(&j.token, root, token));
        doc.out.extend_from_slice(&j.executor_id.to_le_bytes());
        doc.out.extend_from_slice(&j.secret);
        doc.out.extend_from_slice(&j.shard.to_le_bytes());
        doc.out
    }

    fn doc_result(r: &ResultMsg) -> Vec<u8> {
        let mut doc = Doc::default();
        let lens = doc.out.len();
        for l in &r.output_lens {
            doc.out.extend_from_slice(&l.to_le_bytes());
        }
        let refused = doc.out.len();
        for i in &r.refused {
            doc.out.extend_from_slice(&i.to_le_bytes());
        }
        let message = doc.string_data(&r.message);
        let root = doc.out.len();
        doc.out.extend_from_slice(&r.plan_id.to_le_bytes());
        doc.out.push(r.status as u8);
        doc.out.extend_from_slice(&r.started_ns.to_le_bytes());
        doc.out.extend_from_slice(&r.finished_ns.to_le_bytes());
        doc.out
            .extend_from_slice(&vec_field(r.output_lens.len(), root + 25, lens));
        doc.out
            .extend_from_slice(&vec_field(r.refused.len(), root + 33, refused));
        doc.out.extend_from_slice(&string_field(&r.message, root + 41, message));
        assert_eq!(doc.out.len() - root, 49);
        doc.out
    }

    fn doc_plan(p: &PlanMsg) -> Vec<u8> {
        let mut doc = Doc::default();
        let requests = doc.out.len();
        for r in &p.requests {
            doc.out.extend_from_slice(&r.request_id.to_le_bytes());
            doc.out.extend_from_slice(&r.input_len.to_le_bytes());
        }
        let root = doc.out.len();
        doc.out.extend_from_slice(&p.plan_id.to_le_bytes());
        doc.out.extend_from_slice(&p.gpu.to_le_bytes());
        doc.out.extend_from_slice(&p.model.to_le_bytes());
        doc.out.extend_from_slice(&p.exec_at_ns.to_le_bytes());
        doc.out.extend_from_slice(&p.finish_ns.to_le_bytes());
        doc.out
            .extend_from_slice(&vec_field(p.requests.len(), root + 32, requests));
        doc.out
    }

    fn rkyv_bytes<T>(value: &T) -> Vec<u8>
    where
        T: for<'a, 'b> Serialize<HighSerializer<'a, 'b>>,
    {
        let mut frame = Vec::new();
        encode(&mut frame, Kind::ExecJoin, value).unwrap();
        frame[FRAME_HEADER_SIZE..].to_vec()
    }

    #[test]
    fn protocol_md_describes_the_executor_messages_exactly() {
        let profile = |n: usize| ProfileWire {
            latency_ns: (1..=n as u64).map(|b| b * 1_000 + 7).collect(),
            pre_ns: 11,
            post_ns: 13,
        };
        let welcome = Welcome {
            executor_id: 7,
            secret: *b"0123456789abcdef",
            links: vec!["127.0.0.1:40001".to_string(), "[::1]:9".to_string(), String::new()],
            models: vec![
                ModelInfo {
                    id: 0,
                    name: "resnet50_v1".to_string(),
                    slo_us: 100_000,
                    profile: profile(3),
                },
                ModelInfo {
                    id: 1,
                    name: "bert".to_string(),
                    slo_us: 25_000,
                    profile: profile(1),
                },
            ],
        };
        assert_eq!(doc_welcome(&welcome), rkyv_bytes(&welcome));
        let hello = Hello {
            token: "a-long-executor-token".to_string(),
            name: "gpu-box".to_string(),
            backend: "cuda".to_string(),
            gpus: (0..3)
                .map(|index| GpuInfo {
                    index,
                    name: format!("NVIDIA H200 #{index}"),
                    memory_bytes: 141 << 30,
                })
                .collect(),
        };
        assert_eq!(doc_hello(&hello), rkyv_bytes(&hello));
        let register = Register {
            offset_ns: -123_456_789,
            offset_error_ns: 40_000,
            models: vec![
                ModelProfile {
                    model: 0,
                    profile: profile(4),
                },
                ModelProfile {
                    model: 1,
                    profile: profile(2),
                },
            ],
        };
        assert_eq!(doc_register(&register), rkyv_bytes(&register));
        for token in ["t", "a-token-of-more-than-eight-bytes"] {
            let join = Join {
                token: token.to_string(),
                executor_id: 3,
                secret: [0xa5; SECRET_BYTES],
                shard: 1,
            };
            assert_eq!(doc_join(&join), rkyv_bytes(&join));
        }
        for message in ["", "refused: 12288 bytes, expected 1024"] {
            let result = ResultMsg {
                plan_id: 99,
                status: PlanStatus::Ok,
                started_ns: 5,
                finished_ns: 9,
                output_lens: vec![40, 0, 40],
                refused: vec![1],
                message: message.to_string(),
            };
            assert_eq!(doc_result(&result), rkyv_bytes(&result));
        }
        let plan = PlanMsg {
            plan_id: 1,
            gpu: 2,
            model: 3,
            exec_at_ns: 4,
            finish_ns: 5,
            requests: vec![
                PlanRequest {
                    request_id: 6,
                    input_len: 7,
                },
                PlanRequest {
                    request_id: 8,
                    input_len: 9,
                },
            ],
        };
        assert_eq!(doc_plan(&plan), rkyv_bytes(&plan));
        // The fixed-size messages: their fields, back to back.
        let beat = Heartbeat { sent_ns: 1, echo_ns: 2 };
        assert_eq!(rkyv_bytes(&beat), [1u64.to_le_bytes(), 2u64.to_le_bytes()].concat());
        let probe = Probe {
            sequence: 3,
            sent_local_ns: 4,
        };
        assert_eq!(
            rkyv_bytes(&probe),
            [&3u32.to_le_bytes()[..], &4u64.to_le_bytes()].concat()
        );
        let reply = ProbeReply {
            sequence: 3,
            sent_local_ns: 4,
            scheduler_ns: 5,
        };
        assert_eq!(
            rkyv_bytes(&reply),
            [&3u32.to_le_bytes()[..], &4u64.to_le_bytes(), &5u64.to_le_bytes()].concat()
        );
        assert_eq!(rkyv_bytes(&Registered { executor_id: 9 }), 9u32.to_le_bytes());
        assert_eq!(rkyv_bytes(&Joined { shard: 2 }), 2u32.to_le_bytes());
    }
}
