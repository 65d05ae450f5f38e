//! `symphony serve` end to end on loopback: the glommio shards with embedded simulated
//! executors, spoken to with raw protocol frames from std sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use symphony_core::wire::{self, FrameDecoder, Kind, ModelRef, RequestRef, Status};
use symphony_shards::config::ServeConfig;
use symphony_shards::server::{self, ServerHandle};

fn start(shards: usize) -> ServerHandle {
    let text = symphony_shards::config::EXAMPLE_CONFIG.replace("127.0.0.1:7070", "127.0.0.1:0");
    let mut config = ServeConfig::parse(&text, Path::new("."), "test").unwrap();
    config.shards = Some(shards);
    server::start(&config).expect("the service starts")
}

/// SO_LINGER 0: closing the socket sends a reset, not a FIN (which is a half-close).
fn reset_on_close(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads one valid `linger` for this open socket.
    unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(stream),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn request(buffer: &mut Vec<u8>, id: u64, model: ModelRef, input: &[u8]) {
    wire::encode_request(
        buffer,
        &RequestRef {
            client_request_id: id,
            model: &model,
            slo_us: None,
            input,
        },
    )
    .unwrap();
}

/// Reads frames until `count` replies came or the deadline passed; returns (id, status).
fn read_replies(stream: &mut TcpStream, count: usize) -> (Vec<(u64, Status)>, Vec<Kind>) {
    stream.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let decoder = FrameDecoder::default();
    let mut buffer = vec![0u8; 1 << 20];
    let mut filled = 0;
    let mut replies = Vec::new();
    let mut other_kinds = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while replies.len() < count && Instant::now() < deadline {
        match stream.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(_) => continue,
        }
        let mut frames = decoder.frames(&buffer[..filled]);
        for frame in &mut frames {
            let frame = frame.expect("the server sends valid frames");
            match frame.kind {
                Kind::Reply => {
                    let reply = wire::access_reply(frame.payload).unwrap();
                    replies.push((reply.client_request_id.to_native(), reply.status));
                }
                other => other_kinds.push(other),
            }
        }
        let consumed = frames.consumed();
        buffer.copy_within(consumed..filled, 0);
        filled -= consumed;
    }
    (replies, other_kinds)
}

#[test]
fn requests_to_several_models_get_one_reply_each() {
    let server = start(2);
    let mut stream = TcpStream::connect(server.local_addr()).unwrap();
    let mut buffer = Vec::new();
    let models = ["resnet_a", "resnet_b", "small"];
    for id in 0..300u64 {
        request(
            &mut buffer,
            id,
            ModelRef::Name(models[id as usize % 3].into()),
            &[1, 2, 3],
        );
    }
    request(&mut buffer, 1000, ModelRef::Id(2), &[]);
    request(&mut buffer, 1001, ModelRef::Name("nope".into()), &[]);
    request(&mut buffer, 1002, ModelRef::Id(99), &[]);
    stream.write_all(&buffer).unwrap();
    let (replies, others) = read_replies(&mut stream, 303);
    assert!(others.is_empty(), "{others:?}");
    assert_eq!(replies.len(), 303, "every request gets exactly one reply");
    let mut ids: Vec<u64> = replies.iter().map(|r| r.0).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 303, "no reply twice");
    for &(id, status) in &replies {
        let expected = if id >= 1001 { Status::UnknownModel } else { Status::Ok };
        assert_eq!(status, expected, "request {id}");
    }
    server.stop().unwrap();
}

#[test]
fn a_malformed_frame_gets_an_error_and_the_service_serves_others() {
    let server = start(2);
    let mut bad = TcpStream::connect(server.local_addr()).unwrap();
    bad.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let (_, kinds) = read_replies(&mut bad, 1);
    assert_eq!(kinds, vec![Kind::Error]);
    let mut rest = Vec::new();
    let _ = bad.read_to_end(&mut rest);
    // An oversized frame is refused from its header alone.
    let mut big = TcpStream::connect(server.local_addr()).unwrap();
    let header = wire::FrameHeader {
        kind: Kind::Request,
        payload_len: wire::FRAME_PAYLOAD_LIMIT + 1,
    };
    big.write_all(&header.to_bytes()).unwrap();
    let (_, kinds) = read_replies(&mut big, 1);
    assert_eq!(kinds, vec![Kind::Error]);
    let mut good = TcpStream::connect(server.local_addr()).unwrap();
    let mut buffer = Vec::new();
    request(&mut buffer, 7, ModelRef::Name("small".into()), &[]);
    good.write_all(&buffer).unwrap();
    let (replies, _) = read_replies(&mut good, 1);
    assert_eq!(replies, vec![(7, Status::Ok)]);
    server.stop().unwrap();
}

#[test]
fn stopping_answers_every_request_in_flight() {
    let server = start(2);
    let mut stream = TcpStream::connect(server.local_addr()).unwrap();
    let mut buffer = Vec::new();
    for id in 0..200u64 {
        request(
            &mut buffer,
            id,
            ModelRef::Name(["resnet_a", "small"][id as usize % 2].into()),
            &[],
        );
    }
    stream.write_all(&buffer).unwrap();
    // Stop once batches are planned (the rest still waits in the schedulers).
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.stats().plans.load(Ordering::Relaxed) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        server.stats().plans.load(Ordering::Relaxed) > 0,
        "batches were planned before the stop"
    );
    server.stop().unwrap();
    let (replies, _) = read_replies(&mut stream, 200);
    assert_eq!(replies.len(), 200, "every request is answered");
    // The drain lets planned batches finish and keeps planning what is queued within its
    // grace period (the largest SLO and a second): every request runs, none is cut off.
    let ok = replies.iter().filter(|&&(_, s)| s == Status::Ok).count();
    let cut_off = replies.iter().filter(|&&(_, s)| s == Status::ShuttingDown).count();
    assert!(ok > 0, "no planned batch finished OK: {replies:?}");
    assert_eq!(
        cut_off, 0,
        "{cut_off} requests were answered shutting-down within the grace period"
    );
}

#[test]
fn a_client_that_disconnects_does_not_disturb_others() {
    const GONE: u64 = 10;
    let server = start(2);
    {
        let mut gone = TcpStream::connect(server.local_addr()).unwrap();
        let mut buffer = Vec::new();
        for id in 0..GONE {
            request(&mut buffer, id, ModelRef::Name("resnet_b".into()), &[0; 32]);
        }
        gone.write_all(&buffer).unwrap();
        // Reset with its requests deferred (fewer than resnet_b's target batch: it waits tens of
        // ms for more): they leave
        // the scheduler before they use a GPU. (A FIN alone is a half-close: the client may
        // still read, so its requests are kept until a reply cannot be written.)
        let deadline = Instant::now() + Duration::from_secs(2);
        while server.stats().requests.load(Ordering::Relaxed) < GONE && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        reset_on_close(&gone);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.stats().cancelled.load(Ordering::Relaxed) < GONE && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    // All of them left the scheduler, and none reached a GPU (they were all still deferred).
    assert_eq!(
        server.stats().cancelled.load(Ordering::Relaxed),
        GONE,
        "a gone client's queued requests are removed"
    );
    assert_eq!(
        server.stats().plans.load(Ordering::Relaxed),
        0,
        "a gone client's request reached a GPU"
    );
    let mut stream = TcpStream::connect(server.local_addr()).unwrap();
    let mut buffer = Vec::new();
    for id in 0..50u64 {
        request(&mut buffer, id, ModelRef::Name("resnet_b".into()), &[]);
    }
    stream.write_all(&buffer).unwrap();
    let (replies, _) = read_replies(&mut stream, 50);
    assert_eq!(replies.len(), 50);
    assert!(replies.iter().all(|&(_, s)| s == Status::Ok));
    server.stop().unwrap();
}

/// Messages between two shards keep their order, even when the channel between them is
/// full: a connection's `Disconnected` never overtakes its `Requests`, so every request of
/// a client that went away leaves the schedulers (none is admitted after the cancel). The
/// reference configuration always defers (ours would stop deferring at this arrival rate
/// on one GPU, and plan some of the requests at once).
#[test]
fn a_full_mesh_keeps_messages_in_order() {
    let text = "listen = \"127.0.0.1:0\"\ngpus = 1\nshards = 2\n\
        [[models]]\nname = \"patient_a\"\nprofile = \"sleep#100,1000,0,0\"\nslo_ms = 30000\n\
        [[models]]\nname = \"patient_b\"\nprofile = \"sleep#100,1000,0,0\"\nslo_ms = 30000\n\
        [limits]\nmesh_channel = 2\nrouted_batch = 1\n\
        [policy]\nkind = \"symphony-ref\"\n";
    let config = ServeConfig::parse(text, Path::new("."), "test").unwrap();
    let server = server::start(&config).expect("the service starts");
    // Fewer than a full batch (1024) per model: none is planned for 30 s.
    let sent = 1600u64;
    for round in 0..3 {
        let mut gone = TcpStream::connect(server.local_addr()).unwrap();
        let mut buffer = Vec::new();
        // Half for each model: whichever shard took the connection, half are routed to the
        // other one, one message per request through a channel of two.
        for id in 0..sent {
            let model = ["patient_a", "patient_b"][id as usize % 2];
            request(&mut buffer, id, ModelRef::Name(model.into()), &[]);
        }
        gone.write_all(&buffer).unwrap();
        let target = (round + 1) * sent;
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.stats().requests.load(Ordering::Relaxed) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        // Reset at once, while requests are still on their way to the other shard.
        reset_on_close(&gone);
        drop(gone);
        // Every one of them is cancelled (they wait 30 s to batch, so none ran).
        let deadline = Instant::now() + Duration::from_secs(5);
        while server.stats().cancelled.load(Ordering::Relaxed) < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            server.stats().requests.load(Ordering::Relaxed),
            target,
            "round {round}: the service read every request"
        );
        assert_eq!(
            server.stats().cancelled.load(Ordering::Relaxed),
            target,
            "round {round}: requests of a gone client were admitted after its disconnect"
        );
    }
    server.stop().unwrap();
}
