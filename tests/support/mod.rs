//! What the outside tests share: `symphony serve` as a child process (the release binary
//! under `cargo test --release`), read from its stderr and `/proc`, and a fake executor that
//! speaks the executor protocol from `symphony_core::wire::executor` and misbehaves on
//! purpose.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use symphony_core::wire::executor::{
    self as exec, GpuInfo, Heartbeat, Hello, Join, Joined, ModelProfile, Probe, ProbeReply, ProfileWire, Register,
    Registered, ResultMsg, Welcome,
};
use symphony_core::wire::{self, Decoded, FrameDecoder, Kind, ModelRef, RequestRef};
use symphony_shards::client::Client;

pub const TOKEN: &str = "hostile-token";

/// One service at a time: each pins its shards to the CPUs, and on 2 cores two services
/// (and their clients) would make each other late.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A scratch directory of this test process.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("symphony-hostile-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Raises this process's soft descriptor limit to its hard limit (tests open thousands).
pub fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one valid `rlimit`.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// A self-signed certificate for `localhost` and 127.0.0.1 and its key, as PEM files in
/// `dir`: (certificate, key). Clients trust the certificate itself.
pub fn self_signed(dir: &std::path::Path) -> (PathBuf, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
        .expect("makes a certificate");
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

/// A config with the built-in example's three models (`resnet_a`, `resnet_b`: 100 ms SLO;
/// `small`: 50 ms) and `extra` TOML before them.
pub fn example_config(extra: &str) -> String {
    let example = symphony_shards::config::EXAMPLE_CONFIG;
    let models = &example[example.find("[[models]]").expect("the example has models")..];
    let models = &models[..models.find("[policy]").unwrap_or(models.len())];
    format!("listen = \"127.0.0.1:0\"\n{extra}\n{models}")
}

/// `symphony serve` as a child process; killed when dropped.
pub struct Serve {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    config_path: PathBuf,
    /// The scratch directory to remove when dropped (the last of a restarted line owns it).
    owns_dir: bool,
}

impl Serve {
    /// Serves `config` (TOML text) with `args` added to the command line.
    pub fn start(config: &str, args: &[&str]) -> Serve {
        Serve::start_limited(config, args, None)
    }

    /// As `start`, with the soft and hard RLIMIT_NOFILE of the child set to `nofile`.
    pub fn start_limited(config: &str, args: &[&str], nofile: Option<u64>) -> Serve {
        Serve::start_with_nofile(config, args, nofile.map(|n| (n, n)))
    }

    /// As `start`, with the child's RLIMIT_NOFILE set to `(soft, hard)`.
    pub fn start_with_nofile(config: &str, args: &[&str], nofile: Option<(u64, u64)>) -> Serve {
        let dir = scratch(&format!("serve-{}", unique()));
        let config_path = dir.join("serve.toml");
        std::fs::write(&config_path, config).unwrap();
        Serve::spawn(config_path, args, nofile)
    }

    fn spawn(config_path: PathBuf, args: &[&str], nofile: Option<(u64, u64)>) -> Serve {
        let mut command = Command::new(env!("CARGO_BIN_EXE_symphony"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .args(args)
            // A restart names its port: without this the HTTP and gRPC front ends and the
            // metrics would take 8000, 8001 and 8002, shared by every test at once. Tests of
            // them pass `--http 127.0.0.1:0` and the like.
            .args(off_unless_given(args, "--http"))
            .args(off_unless_given(args, "--metrics"))
            .args(off_unless_given(args, "--grpc"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some((soft, hard)) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: soft,
                        rlim_max: hard,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().expect("spawns symphony serve");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = listen_addr(&line) {
                    let _ = addr_tx.send(addr);
                }
                lines.lock().unwrap().push(line);
            }
        });
        let addr = match addr_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!("symphony serve did not start: {}", log.lock().unwrap().join("\n"));
            }
        };
        Serve {
            child,
            addr,
            log,
            config_path,
            owns_dir: true,
        }
    }

    /// Starts the same config again on the same address (after a kill).
    pub fn restart(&mut self, args: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let addr = self.addr.to_string();
        let mut all = vec!["--listen", addr.as_str()];
        all.extend_from_slice(args);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The port may take a moment to be free again.
            let attempt = std::panic::catch_unwind(|| Serve::spawn(self.config_path.clone(), &all, None));
            match attempt {
                Ok(serve) => {
                    self.owns_dir = false;
                    *self = serve;
                    return;
                }
                Err(panic) if Instant::now() > deadline => std::panic::resume_unwind(panic),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the process ended, if it did.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Panics, with the exit status and the log, if the process is gone.
    pub fn assert_alive(&mut self, after: &str) {
        if let Some(status) = self.exited() {
            use std::os::unix::process::ExitStatusExt;
            panic!(
                "symphony serve died after {after}: {status} (signal {:?})\n{}",
                status.signal(),
                self.log_text()
            );
        }
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn log_lines(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }

    /// Waits until a log line contains `needle`.
    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// A field of `/proc/PID/status` in bytes (`VmRSS`, `VmData`, `VmHWM`).
    pub fn status_bytes(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kib| kib * 1024)
    }

    pub fn rss_bytes(&self) -> u64 {
        self.status_bytes("VmRSS")
    }

    /// Open descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).map_or(0, |d| d.count())
    }

    pub fn client(&self) -> Client {
        let client = Client::connect(self.addr).expect("connects");
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        client
    }

    /// SIGTERM, then the exit status (killed after `timeout`).
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        // SAFETY: kill sends a signal to our own child.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.owns_dir {
            let _ = std::fs::remove_dir_all(self.config_path.parent().expect("a directory"));
        }
    }
}

/// `[flag, "off"]` unless `args` has `flag`.
fn off_unless_given(args: &[&str], flag: &'static str) -> Vec<&'static str> {
    if args.contains(&flag) {
        Vec::new()
    } else {
        vec![flag, "off"]
    }
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The address in serve's start-up line: "... on 127.0.0.1:PORT; ...".
fn listen_addr(line: &str) -> Option<SocketAddr> {
    let rest = line.strip_prefix("symphony serve: ")?;
    let at = rest.find(" on ")? + 4;
    let rest = &rest[at..];
    rest[..rest.find(';')?].parse().ok()
}

/// One request frame.
pub fn request_frame(out: &mut Vec<u8>, id: u64, model: &str, input: &[u8]) {
    let model = ModelRef::Name(model.to_string());
    wire::encode_request(
        out,
        &RequestRef {
            client_request_id: id,
            model: &model,
            slo_us: None,
            input,
        },
    )
    .unwrap();
}

/// Sets SO_LINGER to 0: closing the socket then sends RST instead of FIN.
pub fn linger_zero(stream: &TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads one valid `linger` for this open socket.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// Reads frames until `count` have come, the peer closes or `timeout` passes: `(kind,
/// payload)` each.
pub fn read_frames(stream: &mut TcpStream, count: usize, timeout: Duration) -> Vec<(Kind, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let decoder = FrameDecoder::default();
    let mut buffer = Vec::new();
    let mut frames = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    while frames.len() < count {
        loop {
            match decoder.decode(&buffer) {
                Ok(Decoded::Frame(frame)) => {
                    let size = frame.size();
                    frames.push((frame.kind, frame.payload.to_vec()));
                    buffer.drain(..size);
                    if frames.len() == count {
                        return frames;
                    }
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(e) => panic!("undecodable frame from the service: {e}"),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => break,
            Err(_) => break,
        }
    }
    frames
}

/// Whether the peer closed `stream` (EOF or reset) within `timeout`, skipping any frames.
pub fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut chunk) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                return false
            }
            Err(_) => return true,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// A fake executor.

/// What a fake executor does with each plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behavior {
    /// Answers at the plan's finish with each input as its output.
    Echo,
    /// Never answers (heartbeats go on).
    Never,
    /// Answers OK with no output at all, whatever the batch size.
    WrongCount,
    /// Answers OK with an echo and refuses an index past the batch.
    RefuseOutOfRange,
    /// Answers OK with an echo and a finish before its start.
    FinishBeforeStart,
    /// Never reads its links (plans pile up in the sockets); heartbeats go on.
    Unread,
}

/// A plan as a fake executor received it.
#[derive(Debug, Clone, Copy)]
pub struct SeenPlan {
    pub plan_id: u64,
    pub gpu: u32,
    pub model: u32,
    pub exec_at_ns: u64,
    pub finish_ns: u64,
    pub requests: usize,
}

/// An executor written in the test from the protocol: handshake, one link per shard,
/// heartbeats, and plans handled by its [`Behavior`].
pub struct FakeExecutor {
    pub executor_id: u32,
    pub welcome: Welcome,
    pub plans: Arc<Mutex<Vec<SeenPlan>>>,
    links: Vec<TcpStream>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// How a fake executor registers.
#[derive(Debug, Clone)]
pub struct FakeSpec {
    pub name: String,
    pub gpus: u32,
    /// The profile it registers for every model (`None`: the one WELCOME gave).
    pub profile: Option<ProfileWire>,
    pub behavior: Behavior,
    pub heartbeats: bool,
}

impl FakeSpec {
    pub fn new(behavior: Behavior) -> FakeSpec {
        FakeSpec {
            name: "fake".to_string(),
            gpus: 1,
            profile: None,
            behavior,
            heartbeats: true,
        }
    }
}

fn frame<T>(kind: Kind, value: &T) -> Vec<u8>
where
    T: for<'a, 'b> rkyv::Serialize<
        rkyv::api::high::HighSerializer<&'b mut Vec<u8>, rkyv::ser::allocator::ArenaHandle<'a>, rkyv::rancor::Error>,
    >,
{
    let mut out = Vec::new();
    exec::encode(&mut out, kind, value).unwrap();
    out
}

/// The next frame of `kind` from a blocking stream, or the error frame's text.
pub fn expect_frame(stream: &mut TcpStream, kind: Kind) -> Result<Vec<u8>, String> {
    let frames = read_frames(stream, 1, Duration::from_secs(10));
    let Some((got, payload)) = frames.into_iter().next() else {
        return Err("no frame (closed or timed out)".to_string());
    };
    if got == Kind::Error {
        let error = wire::decode_error(&payload).map_err(|e| e.to_string())?;
        return Err(format!("ERROR {:?}: {}", error.code, error.message));
    }
    if got != kind {
        return Err(format!("expected {kind}, got {got}"));
    }
    Ok(payload)
}

/// HELLO and WELCOME on a new control connection.
pub fn hello(addr: SocketAddr, spec: &FakeSpec) -> Result<(TcpStream, Welcome), String> {
    let mut control = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let hello = Hello {
        token: TOKEN.to_string(),
        name: spec.name.clone(),
        backend: "fake".to_string(),
        gpus: (0..spec.gpus)
            .map(|index| GpuInfo {
                index,
                name: format!("fake-{index}"),
                memory_bytes: 0,
            })
            .collect(),
    };
    control.write_all(&frame(Kind::ExecHello, &hello)).unwrap();
    let payload = expect_frame(&mut control, Kind::ExecWelcome)?;
    let welcome: Welcome = exec::decode(Kind::ExecWelcome, &payload).map_err(|e| e.to_string())?;
    Ok((control, welcome))
}

impl FakeExecutor {
    /// Registers and joins every shard of the service at `addr`.
    pub fn join(addr: SocketAddr, spec: FakeSpec) -> Result<FakeExecutor, String> {
        let epoch = Instant::now();
        let local_ns = move || epoch.elapsed().as_nanos() as u64;
        let (mut control, welcome) = hello(addr, &spec)?;
        let sent = local_ns();
        control
            .write_all(&frame(
                Kind::ExecProbe,
                &Probe {
                    sequence: 0,
                    sent_local_ns: sent,
                },
            ))
            .unwrap();
        let reply: ProbeReply =
            exec::decode(Kind::ExecProbeReply, &expect_frame(&mut control, Kind::ExecProbeReply)?).unwrap();
        let received = local_ns();
        // scheduler = local + offset.
        let offset_ns = reply.scheduler_ns as i64 - ((sent + received) / 2) as i64;
        let register = Register {
            offset_ns,
            offset_error_ns: (received - sent) / 2,
            models: welcome
                .models
                .iter()
                .map(|m| ModelProfile {
                    model: m.id,
                    profile: spec.profile.clone().unwrap_or_else(|| m.profile.clone()),
                })
                .collect(),
        };
        control.write_all(&frame(Kind::ExecRegister, &register)).unwrap();
        let registered: Registered =
            exec::decode(Kind::ExecRegistered, &expect_frame(&mut control, Kind::ExecRegistered)?).unwrap();
        let executor_id = registered.executor_id;
        let mut links = Vec::new();
        for (shard, link_addr) in welcome.links.iter().enumerate() {
            let mut link_addr: SocketAddr = link_addr.parse().map_err(|_| format!("link address {link_addr}"))?;
            if link_addr.ip().is_unspecified() {
                link_addr.set_ip(addr.ip());
            }
            let mut link = TcpStream::connect(link_addr).map_err(|e| e.to_string())?;
            link.set_nodelay(true).unwrap();
            let join = Join {
                token: TOKEN.to_string(),
                executor_id,
                secret: welcome.secret,
                shard: shard as u32,
            };
            link.write_all(&frame(Kind::ExecJoin, &join)).unwrap();
            let joined: Joined = exec::decode(Kind::ExecJoined, &expect_frame(&mut link, Kind::ExecJoined)?).unwrap();
            assert_eq!(joined.shard, shard as u32);
            links.push(link);
        }
        drop(control);
        let stop = Arc::new(AtomicBool::new(false));
        let plans = Arc::new(Mutex::new(Vec::new()));
        let writers: Vec<Arc<Mutex<TcpStream>>> = links
            .iter()
            .map(|l| Arc::new(Mutex::new(l.try_clone().unwrap())))
            .collect();
        let mut threads = Vec::new();
        for (link, writer) in links.iter().zip(&writers) {
            let mut reader = link.try_clone().unwrap();
            let writer = Arc::clone(writer);
            let (stop, plans, behavior) = (Arc::clone(&stop), Arc::clone(&plans), spec.behavior);
            threads.push(std::thread::spawn(move || {
                link_loop(&mut reader, &writer, &stop, &plans, behavior, offset_ns, local_ns)
            }));
        }
        if spec.heartbeats {
            let stop = Arc::clone(&stop);
            let writers = writers.clone();
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let beat = frame(
                        Kind::ExecHeartbeat,
                        &Heartbeat {
                            sent_ns: local_ns(),
                            echo_ns: 0,
                        },
                    );
                    for writer in &writers {
                        let _ = writer.lock().unwrap().write_all(&beat);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }));
        }
        Ok(FakeExecutor {
            executor_id,
            welcome,
            plans,
            links,
            stop,
            threads,
        })
    }

    pub fn plans(&self) -> Vec<SeenPlan> {
        self.plans.lock().unwrap().clone()
    }

    /// Closes every link as a killed process would, with unread plans: a FIN and then a
    /// reset (`fin_first`), or a reset alone (SO_LINGER 0).
    pub fn kill(mut self, fin_first: bool) {
        self.stop.store(true, Ordering::Relaxed);
        for link in &self.links {
            if fin_first {
                let _ = link.shutdown(Shutdown::Write);
            } else {
                linger_zero(link);
            }
        }
        if fin_first {
            std::thread::sleep(Duration::from_millis(10));
        }
        for link in &self.links {
            linger_zero(link);
            let _ = link.shutdown(Shutdown::Both);
        }
        self.links.clear();
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for FakeExecutor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for link in &self.links {
            let _ = link.shutdown(Shutdown::Both);
        }
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn link_loop(
    reader: &mut TcpStream,
    writer: &Mutex<TcpStream>,
    stop: &AtomicBool,
    plans: &Mutex<Vec<SeenPlan>>,
    behavior: Behavior,
    offset_ns: i64,
    local_ns: impl Fn() -> u64,
) {
    let decoder = FrameDecoder::default();
    let mut buffer: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 256 << 10];
    // Answers due: (local time, frame).
    let mut due: Vec<(u64, Vec<u8>)> = Vec::new();
    reader.set_read_timeout(Some(Duration::from_millis(2))).unwrap();
    while !stop.load(Ordering::Relaxed) {
        if behavior == Behavior::Unread {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        let now = local_ns();
        due.retain(|(at, frame)| {
            if *at <= now {
                let _ = writer.lock().unwrap().write_all(frame);
                false
            } else {
                true
            }
        });
        match reader.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => return,
        }
        loop {
            let (kind, payload_range, size) = match decoder.decode(&buffer) {
                Ok(Decoded::Frame(frame)) => {
                    let start = wire::FRAME_HEADER_SIZE;
                    (frame.kind, start..start + frame.payload.len(), frame.size())
                }
                Ok(Decoded::Incomplete { .. }) => break,
                Err(_) => return,
            };
            if kind == Kind::ExecPlan {
                let payload = &buffer[payload_range];
                let (plan, section) = exec::access_plan(payload).expect("a valid plan");
                let seen = SeenPlan {
                    plan_id: plan.plan_id.to_native(),
                    gpu: plan.gpu.to_native(),
                    model: plan.model.to_native(),
                    exec_at_ns: plan.exec_at_ns.to_native(),
                    finish_ns: plan.finish_ns.to_native(),
                    requests: plan.requests.len(),
                };
                plans.lock().unwrap().push(seen);
                let lens: Vec<u32> = plan.requests.iter().map(|r| r.input_len.to_native()).collect();
                let to_local = |scheduler_ns: u64| (scheduler_ns as i64 - offset_ns).max(0) as u64;
                let mut result = ResultMsg {
                    plan_id: seen.plan_id,
                    status: exec::PlanStatus::Ok,
                    started_ns: seen.exec_at_ns,
                    finished_ns: seen.finish_ns,
                    output_lens: lens.clone(),
                    refused: Vec::new(),
                    message: String::new(),
                };
                let mut outputs = section.to_vec();
                match behavior {
                    Behavior::Echo => {}
                    Behavior::Never | Behavior::Unread => {
                        buffer.drain(..size);
                        continue;
                    }
                    Behavior::WrongCount => {
                        result.output_lens.clear();
                        outputs.clear();
                    }
                    Behavior::RefuseOutOfRange => result.refused = vec![lens.len() as u32 + 3],
                    Behavior::FinishBeforeStart => {
                        result.started_ns = seen.finish_ns;
                        result.finished_ns = seen.exec_at_ns.saturating_sub(1);
                    }
                }
                let mut out = Vec::new();
                exec::encode_sectioned(&mut out, Kind::ExecResult, &result, |o| o.extend_from_slice(&outputs)).unwrap();
                due.push((to_local(seen.finish_ns), out));
            }
            buffer.drain(..size);
        }
    }
}
