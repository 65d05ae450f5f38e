//! TLS on the spawned release binary (`[tls]` with a certificate made here): native clients
//! and executor processes over TLS, what a plain peer gets from a TLS port, and an executor
//! that never sends its token to a peer that does not complete TLS.

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{example_config, read_frames, request_frame, Serve};
use symphony_core::wire::{self, ErrorCode, Kind, ModelRef, Status};
use symphony_shards::client::Client;
use symphony_shards::tls::ClientTls;

const TOKEN: &str = "tls-test-token-0123456789";

/// `[tls]` for the certificate and key in `dir`.
fn tls_section(cert: &Path, key: &Path) -> String {
    format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\n", cert.display(), key.display())
}

/// Forwards connections on its own port to `to`, keeping every byte either way.
struct RecordingProxy {
    addr: String,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl RecordingProxy {
    fn start(to: String) -> RecordingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&seen);
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { break };
                let Ok(outbound) = TcpStream::connect(&to) else { break };
                for (from, into) in [
                    (inbound.try_clone().unwrap(), outbound.try_clone().unwrap()),
                    (outbound, inbound),
                ] {
                    let kept = Arc::clone(&kept);
                    std::thread::spawn(move || pump(from, into, &kept));
                }
            }
        });
        RecordingProxy { addr, seen }
    }

    fn saw(&self, needle: &[u8]) -> bool {
        let seen = self.seen.lock().unwrap();
        !seen.is_empty() && seen.windows(needle.len()).any(|w| w == needle)
    }

    fn bytes(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

fn pump(mut from: TcpStream, mut into: TcpStream, kept: &Mutex<Vec<u8>>) {
    let mut buf = [0u8; 16 << 10];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.lock().unwrap().extend_from_slice(&buf[..n]);
                if into.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = into.shutdown(std::net::Shutdown::Write);
}

/// A `symphony executor --backend sim` process; killed when dropped.
struct Executor(Child);

impl Executor {
    fn spawn(scheduler: &str, extra: &[&str]) -> Executor {
        let child = Command::new(env!("CARGO_BIN_EXE_symphony"))
            .args([
                "executor",
                "--scheduler",
                scheduler,
                "--token",
                TOKEN,
                "--backend",
                "sim",
            ])
            .args(["--heartbeat-ms", "20"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawns symphony executor");
        Executor(child)
    }

    /// Its exit within `timeout` and what it printed, or `None` if it still runs.
    fn exit_within(&mut self, timeout: Duration) -> Option<(std::process::ExitStatus, String)> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().unwrap() {
                let mut text = String::new();
                let _ = self.0.stderr.take().unwrap().read_to_string(&mut text);
                return Some((status, text));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tls_client(serve: &Serve, ca: &Path) -> Client {
    let tls = ClientTls::load(ca, None).unwrap();
    let client = Client::connect_tls(&serve.addr.to_string(), &tls).expect("a TLS connection");
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    client
}

/// Sends `count` requests of `resnet_a` (12 KiB inputs, so a batch of two or more is a
/// 16 KiB plan: a plain link would send it zero-copy) and checks each echoed reply.
fn echoes_come_back(client: &mut Client, count: u64) {
    let model = ModelRef::Name("resnet_a".to_string());
    for id in 0..count {
        let mut input = vec![0u8; 3 * 32 * 32 * 4];
        input[..8].copy_from_slice(&id.to_le_bytes());
        input[8..]
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i as u64 ^ id) as u8);
        client.send(id, &model, None, &input).unwrap();
        // Bursts of 8 every 20 ms: batches of several, well within two GPUs.
        if id % 8 == 7 {
            client.flush().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    client.flush().unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..count {
        let reply = client.recv().unwrap();
        assert_eq!(reply.status, Status::Ok, "{reply:?}");
        let id = reply.client_request_id;
        assert_eq!(reply.output[..8], id.to_le_bytes(), "the sim backend echoes the input");
        assert!(reply.output[8..]
            .iter()
            .enumerate()
            .all(|(i, &b)| b == (i as u64 ^ id) as u8));
        assert!(seen.insert(id), "one reply per request");
    }
}

/// External executors over TLS: one through a proxy that records every byte of its front
/// door connection (the token is never in it), a second directly; both join every shard's
/// TLS link and serve large inputs intact (a TLS link sends no zero-copy sections). A
/// native TLS client is served; a plain one is told, with an ERROR frame, that the port
/// speaks TLS only.
#[test]
fn executors_and_clients_over_tls_and_the_token_never_in_plain_text() {
    let dir = support::scratch("tls-executors");
    let (cert, key) = support::self_signed(&dir);
    let config = example_config(&format!(
        "shards = 2\ngpus = 0\nexecutor_token = \"{TOKEN}\"\n{}",
        tls_section(&cert, &key)
    ));
    let serve = Serve::start(&config, &[]);
    assert!(
        serve.wait_log("TLS with", Duration::from_secs(5)),
        "{}",
        serve.log_text()
    );
    let proxy = RecordingProxy::start(serve.addr.to_string());
    let ca = cert.display().to_string();
    // The proxy's address is 127.0.0.1: the certificate names it.
    let _proxied = Executor::spawn(&proxy.addr, &["--tls-ca", &ca]);
    let _direct = Executor::spawn(&format!("localhost:{}", serve.addr.port()), &["--tls-ca", &ca]);

    let deadline = Instant::now() + Duration::from_secs(20);
    while serve.log_text().matches(" online with ").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the executors never came online: {}",
            serve.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut client = tls_client(&serve, &cert);
    echoes_come_back(&mut client, 160);
    assert!(proxy.bytes() > 1000, "the proxied executor talked through the proxy");
    assert!(
        !proxy.saw(TOKEN.as_bytes()),
        "the token crossed the proxy in plain text"
    );

    // A plain client on the TLS port: an ERROR frame saying why, then the close.
    let mut plain = TcpStream::connect(serve.addr).unwrap();
    let mut frame = Vec::new();
    request_frame(&mut frame, 1, "small", &[0u8; 64]);
    plain.write_all(&frame).unwrap();
    let frames = read_frames(&mut plain, 1, Duration::from_secs(5));
    assert_eq!(frames.len(), 1, "an answer to the plain client");
    assert_eq!(frames[0].0, Kind::Error);
    let error = wire::decode_error(&frames[0].1).unwrap();
    assert_eq!(error.code, ErrorCode::Refused);
    assert!(error.message.contains("TLS only"), "{}", error.message);
}

/// An executor given `--tls-ca` and pointed at a peer that does not speak TLS: what it sends
/// is a TLS handshake, never the token, and it exits with an error that says TLS (a
/// configuration to fix, not a fault to retry).
#[test]
fn an_executor_never_sends_its_token_without_tls() {
    let dir = support::scratch("tls-plain-peer");
    let (cert, _key) = support::self_signed(&dir);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut executor = Executor::spawn(&addr, &["--tls-ca", &cert.display().to_string()]);
    let (mut peer, _) = listener.accept().unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut first = vec![0u8; 4096];
    let n = peer.read(&mut first).unwrap();
    first.truncate(n);
    assert_eq!(first.first(), Some(&0x16), "a TLS handshake record first");
    assert!(!first.windows(TOKEN.len()).any(|w| w == TOKEN.as_bytes()));
    // A plain service's answer to bytes it cannot frame.
    let mut answer = Vec::new();
    wire::encode_error(&mut answer, ErrorCode::BadMagic, "bad magic").unwrap();
    peer.write_all(&answer).unwrap();
    let (status, stderr) = executor
        .exit_within(Duration::from_secs(15))
        .expect("the executor stops on a TLS failure");
    assert!(!status.success());
    assert!(stderr.contains("TLS"), "{stderr}");
}

/// A config that would let the token cross a plain port is refused at start, naming the key.
#[test]
fn tls_that_leaves_the_token_ports_plain_is_refused() {
    let dir = support::scratch("tls-config");
    let (cert, key) = support::self_signed(&dir);
    let config = example_config(&format!(
        "gpus = 0\nexecutor_token = \"{TOKEN}\"\n{}ports = [\"http\", \"grpc\"]\n",
        tls_section(&cert, &key)
    ));
    let path: PathBuf = dir.join("serve.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_symphony"))
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("tls.ports"), "{stderr}");
}
