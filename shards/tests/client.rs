//! The blocking client (`shards::client`) against a fake server written here from
//! `docs/protocol.md`: a std `TcpListener` on 127.0.0.1 that decodes requests with `core::wire`
//! and answers by model name, after a delay the request chooses, or misbehaves on purpose.
//!
//! Models of the fake server:
//! - any other name: `OK`, output = input, after `u32::from_le_bytes(input[0..4])` µs (0 if the
//!   input is shorter);
//! - `nope`: `UNKNOWN_MODEL`; `drop-me`: `DROPPED` (both at once);
//! - `big`: `OK` with a 3 MiB output;
//! - `silent`: no reply at all;
//! - `error-me`: an ERROR frame, then close;
//! - `close-me`: half of a reply frame, then close; `hangup`: close;
//! - `garbage-me`: bytes that are not a frame, then close;
//! - `bad-status`: a reply whose status byte is 9 (invalid);
//! - `request-me`: a REQUEST frame (a kind no client accepts).
//!
//! A frame the fake server cannot decode gets an ERROR frame and a closed connection.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use symphony_core::wire::{
    decode_error, decode_request, encode_request, Decoded, ErrorCode, FrameDecoder, Kind, ModelRef, RequestRef, Status,
};
use symphony_shards::client::{Client, ClientError};

mod support {
    pub mod fake_server;
}

use support::fake_server::{self, error_frame, reply_frame, Out};

const BIG_OUTPUT_SIZE: usize = 3 * 1024 * 1024;

fn serve(stream: TcpStream) {
    stream.set_nodelay(true).expect("nodelay");
    let write_stream = stream.try_clone().expect("clones");
    let (tx, rx) = mpsc::channel::<Out>();
    let writer = thread::spawn(move || fake_server::write_loop(write_stream, rx, Shutdown::Write));
    read_loop(stream, &tx);
    drop(tx);
    let _ = writer.join();
}

fn read_loop(mut stream: TcpStream, tx: &mpsc::Sender<Out>) {
    let decoder = FrameDecoder::default();
    let mut buffer = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buffer.extend_from_slice(&chunk[..n]);
        let mut frames = decoder.frames(&buffer);
        let mut closing = false;
        for frame in frames.by_ref() {
            let out = match frame {
                Err(error) => Some(Out::Close(error_frame(
                    error.error_code().expect("a decode error has a code"),
                    &error.to_string(),
                ))),
                Ok(frame) if frame.kind != Kind::Request => Some(Out::Close(error_frame(
                    ErrorCode::UnexpectedKind,
                    "a server accepts only REQUEST frames",
                ))),
                Ok(frame) => match decode_request(frame.payload) {
                    Err(error) => Some(Out::Close(error_frame(ErrorCode::Malformed, &error.to_string()))),
                    Ok(request) => answer(&request.model, request.client_request_id, &request.input),
                },
            };
            match out {
                Some(out @ Out::Close(_)) => {
                    let _ = tx.send(out);
                    closing = true;
                    break;
                }
                Some(out) => {
                    let _ = tx.send(out);
                }
                None => {}
            }
        }
        if closing {
            // Drain what the client still sends, so closing does not reset the connection
            // before the client has read our last bytes.
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
            return;
        }
        let consumed = frames.consumed();
        buffer.drain(..consumed);
    }
}

fn answer(model: &ModelRef, id: u64, input: &[u8]) -> Option<Out> {
    let now = Instant::now();
    let name = match model {
        ModelRef::Name(name) => name.as_str(),
        ModelRef::Id(_) => "",
    };
    let out = match name {
        "nope" => Out::At(now, reply_frame(id, Status::UnknownModel, &[], 0)),
        "drop-me" => Out::At(now, reply_frame(id, Status::Dropped, &[], 0)),
        "big" => Out::At(now, reply_frame(id, Status::Ok, &vec![7u8; BIG_OUTPUT_SIZE], 0)),
        "silent" => return None,
        "error-me" => Out::Close(error_frame(ErrorCode::Malformed, "the fake server was asked to fail")),
        "close-me" => {
            let frame = reply_frame(id, Status::Ok, b"some output", 0);
            Out::Close(frame[..frame.len() / 2].to_vec())
        }
        "hangup" => Out::Close(Vec::new()),
        "garbage-me" => Out::Close(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec()),
        "bad-status" => {
            let mut frame = reply_frame(id, Status::Ok, &[], 0);
            // Empty output: the root starts right after the header; status is at root + 8.
            frame[16 + 8] = 9;
            Out::At(now, frame)
        }
        "request-me" => {
            let mut frame = Vec::new();
            let request = RequestRef {
                client_request_id: id,
                model,
                slo_us: None,
                input: &[],
            };
            encode_request(&mut frame, &request).expect("encodes");
            Out::At(now, frame)
        }
        _ => {
            let delay_us = match input.get(..4) {
                Some(bytes) => u32::from_le_bytes(bytes.try_into().expect("4 bytes")),
                None => 0,
            };
            let due = now + Duration::from_micros(u64::from(delay_us));
            Out::At(due, reply_frame(id, Status::Ok, input, delay_us))
        }
    };
    Some(out)
}

fn name(name: &str) -> ModelRef {
    ModelRef::Name(name.to_string())
}

fn echo_input(delay_us: u32, fill: u8) -> Vec<u8> {
    let mut input = delay_us.to_le_bytes().to_vec();
    input.extend_from_slice(&[fill; 10]);
    input
}

fn connect(addr: SocketAddr) -> Client {
    let client = Client::connect(addr).expect("connects");
    // No test may hang: every receive below has a bound.
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("sets timeout");
    client
}

#[test]
fn pipelined_requests_get_their_replies_out_of_order() {
    let addr = fake_server::start(serve);
    let mut client = connect(addr);
    let model = name("resnet50_v1");
    let count = 64u64;
    let mut inputs = Vec::new();
    for id in 0..count {
        // Later requests are answered sooner.
        let input = echo_input((count - id) as u32 * 300, id as u8);
        client.send(id, &model, Some(25_000), &input).expect("buffers");
        inputs.push(input);
    }
    assert_eq!(client.in_flight(), count);
    client.flush().expect("writes");
    let mut order = Vec::new();
    let mut seen = vec![false; count as usize];
    for _ in 0..count {
        let reply = client.recv().expect("a reply");
        let id = reply.client_request_id;
        assert!(id < count, "id {id}");
        assert!(!seen[id as usize], "two replies to {id}");
        seen[id as usize] = true;
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(reply.output, inputs[id as usize], "output of {id}");
        assert_eq!(reply.timings.total_us, (count - id) as u32 * 300);
        order.push(id);
    }
    assert_eq!(client.in_flight(), 0);
    assert!(seen.iter().all(|&s| s));
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "replies came back in request order: {order:?}"
    );
    assert!(order[0] >= count / 2, "the first reply was to request {}", order[0]);
}

#[test]
fn statuses_come_through_and_the_connection_stays_usable() {
    let addr = fake_server::start(serve);
    let mut client = connect(addr);
    let reply = client.call(&name("nope"), None, b"x").expect("a reply");
    assert_eq!(reply.status, Status::UnknownModel);
    assert!(reply.output.is_empty());
    let reply = client.call(&name("drop-me"), Some(1), &[]).expect("a reply");
    assert_eq!(reply.status, Status::Dropped);
    let reply = client.call(&ModelRef::Id(3), None, &echo_input(0, 5)).expect("a reply");
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(reply.output, echo_input(0, 5));

    // Zero copy: the archived reply, in place.
    client.send(99, &name("drop-me"), None, &[]).expect("buffers");
    let (id, status) = client
        .recv_with(|reply| (reply.client_request_id.to_native(), reply.status))
        .expect("a reply");
    assert_eq!((id, status), (99, Status::Dropped));
}

#[test]
fn a_reply_larger_than_the_receive_buffer_arrives_whole() {
    let addr = fake_server::start(serve);
    let mut client = connect(addr);
    for _ in 0..2 {
        let reply = client.call(&name("big"), None, &[]).expect("a reply");
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(reply.output.len(), BIG_OUTPUT_SIZE);
        assert!(reply.output.iter().all(|&b| b == 7));
    }
    let reply = client.call(&name("echo"), None, &echo_input(0, 1)).expect("a reply");
    assert_eq!(reply.output, echo_input(0, 1));
}

#[test]
fn an_error_frame_is_a_server_error_after_the_replies_before_it() {
    let addr = fake_server::start(serve);
    let mut client = connect(addr);
    client.send(1, &name("echo"), None, &echo_input(0, 1)).expect("buffers");
    client.send(2, &name("echo"), None, &echo_input(0, 2)).expect("buffers");
    client.send(3, &name("error-me"), None, &[]).expect("buffers");
    let mut ids = vec![
        client.recv().expect("reply 1").client_request_id,
        client.recv().expect("reply 2").client_request_id,
    ];
    ids.sort_unstable();
    assert_eq!(ids, [1, 2]);
    match client.recv() {
        Err(ClientError::Server { code, message }) => {
            assert_eq!(code, ErrorCode::Malformed);
            assert_eq!(message, "the fake server was asked to fail");
        }
        other => panic!("expected a server error, got {other:?}"),
    }
    assert!(matches!(client.recv(), Err(ClientError::Failed)));
}

#[test]
fn a_server_closing_mid_frame_or_between_frames_is_closed() {
    let addr = fake_server::start(serve);
    let mut client = connect(addr);
    client.send(1, &name("close-me"), None, &[]).expect("buffers");
    match client.recv() {
        Err(ClientError::Closed) => {}
        other => panic!("expected Closed, got {other:?}"),
    }

    let mut client = connect(addr);
    let reply = client.call(&name("echo"), None, &[]).expect("a reply");
    assert_eq!(reply.status, Status::Ok);
    match client.call(&name("hangup"), None, &[]) {
        Err(ClientError::Closed) => {}
        other => panic!("expected Closed, got {other:?}"),
    }
}

#[test]
fn bad_server_bytes_are_typed_errors_not_panics() {
    let addr = fake_server::start(serve);

    let mut client = connect(addr);
    match client.call(&name("garbage-me"), None, &[]) {
        Err(ClientError::Protocol(error)) => {
            assert_eq!(error.error_code(), Some(ErrorCode::BadMagic), "{error}");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }
    assert!(matches!(client.recv(), Err(ClientError::Failed)));

    let mut client = connect(addr);
    match client.call(&name("bad-status"), None, &[]) {
        Err(ClientError::Protocol(error)) => {
            assert_eq!(error.error_code(), Some(ErrorCode::Malformed), "{error}");
        }
        other => panic!("expected a protocol error, got {other:?}"),
    }

    let mut client = connect(addr);
    match client.call(&name("request-me"), None, &[]) {
        Err(ClientError::UnexpectedKind { kind }) => assert_eq!(kind, Kind::Request),
        other => panic!("expected an unexpected kind, got {other:?}"),
    }
}

#[test]
fn a_read_timeout_loses_nothing() {
    let addr = fake_server::start(serve);
    let mut client = connect(addr);
    client
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("sets timeout");
    client.send(1, &name("silent"), None, &[]).expect("buffers");
    let start = Instant::now();
    assert!(matches!(client.recv(), Err(ClientError::Timeout)));
    assert!(start.elapsed() >= Duration::from_millis(40));
    // A reply that comes after timeouts still comes through whole.
    client
        .send(2, &name("echo"), None, &echo_input(120_000, 3))
        .expect("buffers");
    let reply = loop {
        match client.recv() {
            Ok(reply) => break reply,
            Err(ClientError::Timeout) => assert!(start.elapsed() < Duration::from_secs(10)),
            Err(error) => panic!("{error}"),
        }
    };
    assert_eq!(reply.client_request_id, 2);
    assert_eq!(reply.output, echo_input(120_000, 3));
}

#[test]
fn call_needs_an_idle_connection_and_refuses_oversized_input() {
    let addr = fake_server::start(serve);
    let mut client = connect(addr);
    client.send(1, &name("echo"), None, &[]).expect("buffers");
    assert!(matches!(
        client.call(&name("echo"), None, &[]),
        Err(ClientError::Busy { in_flight: 1 })
    ));
    assert_eq!(client.recv().expect("a reply").client_request_id, 1);

    let input = vec![0u8; 8 * 1024 * 1024 + 1];
    assert!(matches!(
        client.send(2, &name("echo"), None, &input),
        Err(ClientError::Encode(_))
    ));
    assert_eq!(client.in_flight(), 0);
    let reply = client.call(&name("echo"), None, &[]).expect("still usable");
    assert_eq!(reply.status, Status::Ok);
}

#[test]
fn split_halves_pipeline_many_requests_from_two_threads() {
    let addr = fake_server::start(serve);
    let client = connect(addr);
    let (mut sender, mut receiver) = client.split();
    let count = 20_000u64;
    let models = [name("resnet50_v1"), name("drop-me"), name("bert")];
    let writer = thread::spawn(move || {
        let mut id = 0;
        while id < count {
            // Many frames per write.
            for _ in 0..500 {
                sender.send(id, &models[(id % 3) as usize], None, &[]).expect("buffers");
                id += 1;
            }
            sender.flush().expect("writes");
        }
        sender
    });
    let mut seen = vec![false; count as usize];
    let mut received = 0u64;
    let mut dropped = 0u64;
    let mut batches = 0u64;
    while received < count {
        let got = receiver
            .recv_batch_with(|reply| {
                let id = reply.client_request_id.to_native();
                assert!(id < count);
                assert!(!seen[id as usize], "two replies to {id}");
                seen[id as usize] = true;
                let expected = if id % 3 == 1 { Status::Dropped } else { Status::Ok };
                assert_eq!(reply.status, expected);
                dropped += u64::from(reply.status == Status::Dropped);
            })
            .expect("replies");
        assert!(got > 0);
        received += got as u64;
        batches += 1;
    }
    assert_eq!(received, count);
    assert_eq!(dropped, (count + 1) / 3);
    assert!(batches < count, "one reply per read: {batches} reads");
    let sender = writer.join().expect("writer");
    sender.shutdown_write().expect("shuts down");
    assert!(matches!(receiver.recv(), Err(ClientError::Closed)));
}

#[test]
fn the_fake_server_answers_an_undecodable_frame_with_an_error_frame() {
    // The fake server follows the protocol too: otherwise the tests above prove little.
    let addr = fake_server::start(serve);
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("sets timeout");
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("writes");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).expect("reads to the close");
    let frame = match FrameDecoder::default().decode(&bytes) {
        Ok(Decoded::Frame(frame)) => frame,
        other => panic!("expected a frame, got {other:?}"),
    };
    assert_eq!(frame.kind, Kind::Error);
    assert_eq!(frame.size(), bytes.len());
    let error = decode_error(frame.payload).expect("a valid error frame");
    assert_eq!(error.code, ErrorCode::BadMagic);
}
