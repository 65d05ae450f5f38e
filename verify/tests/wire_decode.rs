//! Fuzz-style property tests of the wire decoder (`symphony_core::wire`): bytes from outside.
//!
//! Arbitrary bytes, and valid frames with bit flips and truncations, go through the frame
//! decoder and every access function. Nothing may panic, and every frame that is accepted must
//! round-trip: what was accessed in place equals what is copied out, and encoding that again
//! gives a frame that decodes to the same message. A stream of valid frames cut at random
//! points, as TCP may deliver it, decodes to the same messages. The steady-state hot path
//! (encode into a reused buffer, cut frames, access) allocates nothing.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use symphony_core::wire::{
    access_error, access_reply, access_request, check_request, decode_error, decode_reply, decode_request,
    encode_error, encode_reply, encode_request, Decoded, ErrorCode, Frame, FrameDecoder, Kind, ModelRef, Reply,
    Request, Status, Timings, WireError, FRAME_HEADER_SIZE, FRAME_MAGIC, PROTOCOL_VERSION,
};

// ---------------------------------------------------------------------------------------------
// Allocation counting, per thread (tests run on several threads at once).

thread_local! {
    static ALLOCATION_COUNT: Cell<u64> = const { Cell::new(0) };
}

struct CountingAllocator;

fn count_allocation() {
    // `try_with`: the counter may be gone while the thread is torn down.
    let _ = ALLOCATION_COUNT.try_with(|count| count.set(count.get() + 1));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// `GlobalAlloc` contract holds as it does for `System`; counting touches only a const-initialized
// thread-local `Cell` without a destructor, which never allocates.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: the caller's contract for `alloc` is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count_allocation();
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count_allocation();
        // SAFETY: `ptr` came from this allocator, that is from `System`; the rest is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator, that is from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocation_count() -> u64 {
    ALLOCATION_COUNT.with(Cell::get)
}

// ---------------------------------------------------------------------------------------------
// Checks of whatever the decoder accepts.

/// Runs every accepted payload through access, copy-out and re-encoding; panics (fails the
/// property) on any disagreement. Returns the message copied out, for callers that compare.
fn check_frame(frame: Frame<'_>) -> Option<Message> {
    // Every access function must refuse or accept any payload without panicking, whatever the
    // kind in the header says.
    let request = access_request(frame.payload);
    let reply = access_reply(frame.payload);
    let error = access_error(frame.payload);
    match frame.kind {
        Kind::Request => {
            let archived = request.ok()?;
            let _ = check_request(archived);
            let _ = archived.slo_us_tighter();
            let owned = decode_request(frame.payload).expect("an accessible request copies out");
            assert_eq!(*archived, owned);
            let mut bytes = Vec::new();
            encode_request(&mut bytes, &owned.borrowed()).expect("an accepted request encodes again");
            assert_eq!(decode_request(&bytes[FRAME_HEADER_SIZE..]), Ok(owned.clone()));
            Some(Message::Request(owned))
        }
        Kind::Reply => {
            let archived = reply.ok()?;
            let owned = decode_reply(frame.payload).expect("an accessible reply copies out");
            assert_eq!(*archived, owned);
            let mut bytes = Vec::new();
            encode_reply(&mut bytes, &owned.borrowed()).expect("an accepted reply encodes again");
            assert_eq!(decode_reply(&bytes[FRAME_HEADER_SIZE..]), Ok(owned.clone()));
            Some(Message::Reply(owned))
        }
        Kind::Error => {
            let archived = error.ok()?;
            let owned = decode_error(frame.payload).expect("an accessible error frame copies out");
            assert_eq!(*archived, owned);
            let mut bytes = Vec::new();
            encode_error(&mut bytes, owned.code, &owned.message).expect("an accepted error frame encodes again");
            let again = decode_error(&bytes[FRAME_HEADER_SIZE..]).expect("valid");
            assert_eq!(again.code, owned.code);
            assert!(
                owned.message.starts_with(&again.message),
                "only truncation may change the message"
            );
            Some(Message::Error(owned.code, again.message))
        }
        // The executor protocol: its access functions refuse or accept any payload, never
        // panic.
        _ => {
            use symphony_core::wire::executor as exec;
            let _ = exec::access_plan(frame.payload);
            let _ = exec::access_result(frame.payload);
            let _ = exec::access::<exec::Hello>(frame.kind, frame.payload);
            let _ = exec::access::<exec::Welcome>(frame.kind, frame.payload);
            if let Ok(register) = exec::access::<exec::Register>(frame.kind, frame.payload) {
                for m in register.models.iter() {
                    let _ = m.profile.to_profile();
                }
            }
            let _ = exec::access::<exec::Join>(frame.kind, frame.payload);
            None
        }
    }
}

/// Decodes all frames of `bytes` with `decoder`, checking the decoder's own bookkeeping.
fn check_bytes(decoder: FrameDecoder, bytes: &[u8]) {
    let mut frames = decoder.frames(bytes);
    let mut consumed = 0;
    let mut failed = false;
    for result in frames.by_ref() {
        match result {
            Ok(frame) => {
                assert!(frame.payload.len() <= decoder.payload_limit() as usize);
                consumed += frame.size();
                let _ = check_frame(frame);
            }
            Err(error) => {
                failed = true;
                let _ = error.error_code();
                let _ = error.to_string();
            }
        }
    }
    assert_eq!(frames.consumed(), consumed);
    assert!(consumed <= bytes.len());
    if !failed {
        // The iterator stopped on an incomplete frame: decoding the rest says the same.
        let missing_min = frames.missing_min();
        assert!(missing_min > 0);
        assert_eq!(
            decoder.decode(frames.remaining()),
            Ok(Decoded::Incomplete { missing_min })
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Generators of valid messages.

#[derive(Debug, Clone, PartialEq)]
enum Message {
    Request(Request),
    Reply(Reply),
    Error(ErrorCode, String),
}

fn model_ref() -> impl Strategy<Value = ModelRef> {
    prop_oneof![
        any::<u32>().prop_map(ModelRef::Id),
        "\\PC{0,40}".prop_map(ModelRef::Name),
    ]
}

fn status() -> impl Strategy<Value = Status> {
    prop::sample::select(vec![
        Status::Ok,
        Status::Dropped,
        Status::UnknownModel,
        Status::Malformed,
        Status::Overloaded,
        Status::ShuttingDown,
        Status::ExecutorLost,
        Status::ExecutionFailed,
    ])
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop::sample::select(vec![
        ErrorCode::BadMagic,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownKind,
        ErrorCode::Oversized,
        ErrorCode::ReservedNonzero,
        ErrorCode::Malformed,
        ErrorCode::UnexpectedKind,
        ErrorCode::Unauthorized,
        ErrorCode::Refused,
    ])
}

fn message() -> impl Strategy<Value = Message> {
    let bytes = || prop::collection::vec(any::<u8>(), 0..300);
    prop_oneof![
        (any::<u64>(), model_ref(), any::<Option<u32>>(), bytes()).prop_map(
            |(client_request_id, model, slo_us, input)| Message::Request(Request {
                client_request_id,
                model,
                slo_us,
                input
            })
        ),
        (any::<u64>(), status(), any::<(u32, u32, u32)>(), bytes()).prop_map(
            |(client_request_id, status, (queued_us, exec_us, total_us), output)| Message::Reply(Reply {
                client_request_id,
                status,
                timings: Timings {
                    queued_us,
                    exec_us,
                    total_us
                },
                output
            })
        ),
        (error_code(), "\\PC{0,60}").prop_map(|(code, message)| Message::Error(code, message)),
    ]
}

fn encode(message: &Message, out: &mut Vec<u8>) {
    match message {
        Message::Request(request) => encode_request(out, &request.borrowed()),
        Message::Reply(reply) => encode_reply(out, &reply.borrowed()),
        Message::Error(code, text) => encode_error(out, *code, text),
    }
    .expect("a small message encodes");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        check_bytes(FrameDecoder::default(), &bytes);
        check_bytes(FrameDecoder::new(64), &bytes);
        // Straight to the access functions, as if a header had announced these bytes.
        for kind in [Kind::Request, Kind::Reply, Kind::Error] {
            let _ = check_frame(Frame { kind, payload: &bytes });
        }
    }

    #[test]
    fn arbitrary_payload_behind_a_valid_header_never_panics(
        kind in prop::sample::select(vec![Kind::Request, Kind::Reply, Kind::Error]),
        payload in prop::collection::vec(any::<u8>(), 0..200),
    ) {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&FRAME_MAGIC.to_le_bytes());
        bytes.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(kind as u16).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&0u32.to_le_bytes());
        bytes.extend_from_slice(&payload);
        check_bytes(FrameDecoder::default(), &bytes);
    }

    #[test]
    fn valid_frames_with_bit_flips_and_truncation_never_panic(
        messages in prop::collection::vec(message(), 1..4),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..6),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut bytes = Vec::new();
        for message in &messages {
            encode(message, &mut bytes);
        }
        for (index, bit) in flips {
            let at = index.index(bytes.len());
            bytes[at] ^= 1 << bit;
        }
        let cut = cut.index(bytes.len() + 1);
        check_bytes(FrameDecoder::default(), &bytes[..cut]);
        check_bytes(FrameDecoder::default(), &bytes);
    }

    #[test]
    fn a_stream_cut_anywhere_decodes_to_the_messages_sent(
        messages in prop::collection::vec(message(), 1..12),
        chunk_sizes in prop::collection::vec(1usize..200, 1..40),
        offset in 0usize..8,
    ) {
        let mut stream = Vec::new();
        for message in &messages {
            encode(message, &mut stream);
        }
        // A receive buffer that starts at an arbitrary offset of its allocation and is filled
        // by reads of random sizes; complete frames are taken off its front after each read.
        let mut buffer = vec![0u8; offset];
        let mut received = Vec::new();
        let mut sent = 0;
        let mut chunks = chunk_sizes.iter().cycle();
        while sent < stream.len() {
            let chunk = (*chunks.next().expect("cycle")).min(stream.len() - sent);
            buffer.extend_from_slice(&stream[sent..sent + chunk]);
            sent += chunk;
            let mut frames = FrameDecoder::default().frames(&buffer[offset..]);
            for frame in frames.by_ref() {
                let frame = frame.expect("frames we encoded are valid");
                received.push(check_frame(frame).expect("messages we encoded are valid"));
            }
            let consumed = frames.consumed();
            buffer.drain(offset..offset + consumed);
        }
        prop_assert_eq!(buffer.len(), offset, "nothing left over");
        prop_assert_eq!(received, messages);
    }
}

/// The hot path of the service and a client, in steady state: encode frames into a reused
/// buffer, cut them out of a receive buffer, access them in place. No heap allocation.
#[test]
fn steady_state_encode_decode_access_allocates_nothing() {
    let model = ModelRef::Name("resnet50_v1".into());
    let input = vec![7u8; 4096];
    let output = vec![9u8; 1000];
    let mut out = Vec::with_capacity(1 << 20);
    let decoder = FrameDecoder::default();

    let round = |out: &mut Vec<u8>| -> usize {
        out.clear();
        for id in 0..100u64 {
            let request = symphony_core::wire::RequestRef {
                client_request_id: id,
                model: &model,
                slo_us: Some(10_000),
                input: &input,
            };
            encode_request(out, &request).expect("encodes");
            let reply = symphony_core::wire::ReplyRef {
                client_request_id: id,
                status: Status::Ok,
                timings: Timings {
                    queued_us: 1,
                    exec_us: 2,
                    total_us: 3,
                },
                output: &output,
            };
            encode_reply(out, &reply).expect("encodes");
        }
        let mut checked = 0;
        for frame in decoder.frames(out) {
            let frame = frame.expect("valid");
            match frame.kind {
                Kind::Request => {
                    let request = access_request(frame.payload).expect("valid");
                    assert!(check_request(request).is_ok());
                    checked += request.input.len();
                }
                Kind::Reply => checked += access_reply(frame.payload).expect("valid").output.len(),
                _ => unreachable!("only requests and replies were sent"),
            }
        }
        checked
    };

    // Warm up: rkyv's per-thread scratch arena is made on first use.
    assert_eq!(round(&mut out), 100 * (4096 + 1000));
    let before = allocation_count();
    for _ in 0..10 {
        assert_eq!(round(&mut out), 100 * (4096 + 1000));
    }
    let allocations = allocation_count() - before;
    assert_eq!(
        allocations, 0,
        "steady-state encode, decode and access allocated {allocations} times"
    );
}

/// The allocation counter counts: a test that cannot fail proves nothing.
#[test]
fn allocation_counter_sees_allocations() {
    let before = allocation_count();
    let boxed = std::hint::black_box(Box::new(5u64));
    assert_eq!(*boxed, 5);
    assert!(allocation_count() > before);
    // And a malformed payload allocates only for its error report.
    let error = access_request(&[0xff; 3]).expect_err("too short");
    assert!(matches!(
        error,
        WireError::Malformed {
            kind: Kind::Request,
            ..
        }
    ));
}
