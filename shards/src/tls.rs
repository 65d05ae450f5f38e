//! TLS (rustls, with ring as its crypto provider): the service's certificate and key, the
//! ports they cover, and the blocking TLS stream the executors and the native client use.
//!
//! The service (`server`) terminates TLS on glommio's sockets with futures-rustls; this
//! module has what needs no glommio:
//!
//! - [`ServerTls`]: the certificate chain and key read from PEM files (`[tls]` in the
//!   config, `serve --tls-cert --tls-key`), checked when the config loads, as one rustls
//!   server config per ALPN set (none on the native and link ports, `http/1.1` on HTTP and
//!   metrics, `h2` on gRPC: gRPC clients insist on ALPN), and [`TlsPorts`], which ports use it.
//! - [`ClientTls`]: the certificates a client trusts (a PEM file: the service's own
//!   self-signed certificate or the CA that signed it) and the name it checks.
//! - [`Stream`]: a blocking TCP connection, plain or TLS, that two threads share as the
//!   plain socket is shared with `try_clone` (one reads while others write: the executor's
//!   link reader and its GPU workers, the client's receiver and sender). The TLS session sits
//!   behind a lock that no thread holds while it waits on the socket; writes are encrypted
//!   and sent in order under a second lock, so records never interleave.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig};

/// The ports TLS can cover, by the names `tls.ports` uses.
pub const PORT_NAMES: [&str; 5] = ["client", "links", "http", "grpc", "metrics"];

/// Which ports speak TLS (all of them by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsPorts {
    /// The native front door (clients, and executors' HELLO with the token).
    pub client: bool,
    /// The executors' links (JOIN carries the token).
    pub links: bool,
    pub http: bool,
    pub grpc: bool,
    pub metrics: bool,
}

impl TlsPorts {
    pub const ALL: TlsPorts = TlsPorts {
        client: true,
        links: true,
        http: true,
        grpc: true,
        metrics: true,
    };

    /// Whether the port of this name (one of [`PORT_NAMES`]) speaks TLS.
    pub fn covers(&self, name: &str) -> bool {
        match name {
            "client" => self.client,
            "links" => self.links,
            "http" => self.http,
            "grpc" => self.grpc,
            "metrics" => self.metrics,
            _ => false,
        }
    }

    /// From `tls.ports` names; an unknown name is an error naming the known ones.
    pub fn from_names(names: &[String]) -> Result<TlsPorts, String> {
        let mut ports = TlsPorts {
            client: false,
            links: false,
            http: false,
            grpc: false,
            metrics: false,
        };
        for name in names {
            let slot = match name.as_str() {
                "client" => &mut ports.client,
                "links" => &mut ports.links,
                "http" => &mut ports.http,
                "grpc" => &mut ports.grpc,
                "metrics" => &mut ports.metrics,
                _ => return Err(format!("port names among {}; got `{name}`", PORT_NAMES.join(", "))),
            };
            *slot = true;
        }
        Ok(ports)
    }
}

/// The service's TLS: its certificate, as rustls server configs, and the ports it covers.
#[derive(Clone)]
pub struct ServerTls {
    /// No ALPN: the native front door and the executor links.
    pub native: Arc<ServerConfig>,
    /// ALPN `http/1.1`: the KServe HTTP and metrics ports.
    pub http: Arc<ServerConfig>,
    /// ALPN `h2`: the gRPC port.
    pub grpc: Arc<ServerConfig>,
    pub ports: TlsPorts,
    /// Where the certificate came from (for the startup line).
    pub cert_file: String,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_file", &self.cert_file)
            .field("ports", &self.ports)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Reads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1) and checks
    /// that they belong together. Errors name the file and what is wrong with it.
    pub fn load(cert: &Path, key: &Path, ports: TlsPorts) -> Result<ServerTls, String> {
        let chain = read_certificates(cert)?;
        let key_der =
            PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: no private key read ({e})", key.display()))?;
        let config = |alpn: &[&[u8]]| -> Result<Arc<ServerConfig>, String> {
            let mut config = ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(chain.clone(), key_der.clone_key())
                .map_err(|e| format!("{} with {}: {e}", cert.display(), key.display()))?;
            config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
            Ok(Arc::new(config))
        };
        Ok(ServerTls {
            native: config(&[])?,
            http: config(&[b"http/1.1"])?,
            grpc: config(&[b"h2"])?,
            ports,
            cert_file: cert.display().to_string(),
        })
    }
}

/// What a client of the service trusts, and the name it checks the certificate against.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    /// Checked instead of the host of the address connected to.
    name: Option<ServerName<'static>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the certificates in the PEM file `ca` (the service's own certificate, or the CA
    /// that signed it); `name`, when given, is the name the certificate must carry (else the
    /// host of the address connected to).
    pub fn load(ca: &Path, name: Option<&str>) -> Result<ClientTls, String> {
        let mut roots = RootCertStore::empty();
        for certificate in read_certificates(ca)? {
            roots
                .add(certificate)
                .map_err(|e| format!("{}: a certificate rustls cannot trust ({e})", ca.display()))?;
        }
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = match name {
            Some(name) => Some(ServerName::try_from(name.to_string()).map_err(|e| format!("TLS name `{name}`: {e}"))?),
            None => None,
        };
        Ok(ClientTls {
            config: Arc::new(config),
            name,
        })
    }

    /// The name checked for a connection to `addr` (`host:port`, `[v6]:port`).
    fn name_for(&self, addr: &str) -> io::Result<ServerName<'static>> {
        if let Some(name) = &self.name {
            return Ok(name.clone());
        }
        let host = match addr.rsplit_once(':') {
            Some((host, _port)) => host.trim_start_matches('[').trim_end_matches(']'),
            None => addr,
        };
        ServerName::try_from(host.to_string())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("TLS name `{host}`: {e}")))
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no PEM certificate in it", path.display()));
    }
    Ok(chain)
}

/// A TLS session shared by the clones of one [`Stream`].
#[derive(Debug)]
struct Shared {
    session: Mutex<ClientConnection>,
    /// Encrypted bytes not yet on the socket, in order. Held while writing: the write lock.
    out: Mutex<Vec<u8>>,
}

/// Bytes read from the socket and not yet handed to the session (a clone's own).
const RAW_CHUNK: usize = 32 << 10;

/// A blocking connection to the service, plain or TLS.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(TlsStream),
}

/// One clone of a TLS connection: the shared session and this clone's socket handle.
#[derive(Debug)]
pub struct TlsStream {
    shared: Arc<Shared>,
    socket: TcpStream,
    raw: Vec<u8>,
    start: usize,
    end: usize,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A thread that panicked while holding the session leaves it as it was; carrying on
    // surfaces as an I/O error at worst.
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn tls_error(error: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {error}"))
}

impl Stream {
    /// `socket`, plain, or after a TLS handshake with `tls` (checking the certificate against
    /// the name for `addr`). The handshake is bounded by the socket's read timeout, if set.
    pub fn open(socket: TcpStream, addr: &str, tls: Option<&ClientTls>) -> io::Result<Stream> {
        let Some(tls) = tls else {
            return Ok(Stream::Plain(socket));
        };
        let name = tls.name_for(addr)?;
        let mut session = ClientConnection::new(Arc::clone(&tls.config), name).map_err(tls_error)?;
        let mut socket = socket;
        while session.is_handshaking() {
            match session.complete_io(&mut socket) {
                Ok((0, 0)) if session.is_handshaking() => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the peer closed the connection during the TLS handshake",
                    ))
                }
                Ok(_) => {}
                Err(error) => return Err(handshake_error(error)),
            }
        }
        Ok(Stream::Tls(TlsStream {
            shared: Arc::new(Shared {
                session: Mutex::new(session),
                out: Mutex::new(Vec::new()),
            }),
            socket,
            raw: vec![0; RAW_CHUNK],
            start: 0,
            end: 0,
        }))
    }

    /// Whether it is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    fn socket(&self) -> &TcpStream {
        match self {
            Stream::Plain(socket) => socket,
            Stream::Tls(tls) => &tls.socket,
        }
    }

    /// Another handle on the same connection (one handle reads; any may write).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Plain(socket) => Stream::Plain(socket.try_clone()?),
            Stream::Tls(tls) => Stream::Tls(TlsStream {
                shared: Arc::clone(&tls.shared),
                socket: tls.socket.try_clone()?,
                raw: vec![0; RAW_CHUNK],
                start: 0,
                end: 0,
            }),
        })
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket().set_read_timeout(timeout)
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.socket().set_write_timeout(timeout)
    }

    pub fn set_nodelay(&self, nodelay: bool) -> io::Result<()> {
        self.socket().set_nodelay(nodelay)
    }

    /// Shuts the socket down; closing the writing side of a TLS connection sends its
    /// close_notify first.
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        if let Stream::Tls(tls) = self {
            if how != Shutdown::Read {
                let mut out = lock(&tls.shared.out);
                lock(&tls.shared.session).send_close_notify();
                let _ = tls.encrypt_and_send(&mut out);
            }
        }
        self.socket().shutdown(how)
    }
}

/// A handshake error, said plainly (a plain peer answers a ClientHello with bytes that are
/// not TLS).
fn handshake_error(error: io::Error) -> io::Error {
    let plain_peer = error.kind() == io::ErrorKind::InvalidData;
    let message = if plain_peer {
        format!("TLS handshake failed: {error} (does the peer speak TLS on this port?)")
    } else {
        format!("TLS handshake failed: {error}")
    };
    io::Error::new(error.kind(), message)
}

impl TlsStream {
    /// Moves what the session has to send into `out` and writes `out` to the socket. On an
    /// error what was not written stays in `out`, in order, for the next write.
    fn encrypt_and_send(&self, out: &mut Vec<u8>) -> io::Result<()> {
        {
            let mut session = lock(&self.shared.session);
            while session.wants_write() {
                session.write_tls(out)?;
            }
        }
        send_pending(&self.socket, out)
    }
}

fn send_pending(mut socket: &TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    let mut at = 0;
    let result = loop {
        if at == out.len() {
            break Ok(());
        }
        match socket.write(&out[at..]) {
            Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => break Err(error),
        }
    };
    out.drain(..at);
    result
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let wants_write: Option<bool>;
            {
                let mut session = lock(&self.shared.session);
                match session.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                    // The socket closed without close_notify: the end, as for a plain socket.
                    Err(error) if error.kind() == io::ErrorKind::UnexpectedEof => return Ok(0),
                    Err(error) => return Err(error),
                }
                if self.start == self.end {
                    wants_write = None;
                } else {
                    let mut pending = &self.raw[self.start..self.end];
                    let before = pending.len();
                    session.read_tls(&mut pending)?;
                    self.start += before - pending.len();
                    session.process_new_packets().map_err(tls_error)?;
                    wants_write = Some(session.wants_write());
                }
            }
            if let Some(wants_write) = wants_write {
                if wants_write {
                    // An alert or a key update to answer, sent in order with the writers'. A
                    // writer holding the write lock may be blocked on a full socket until this
                    // thread reads: then it is left to that writer, which sends what the session
                    // holds before it lets go.
                    if let Ok(mut out) = self.shared.out.try_lock() {
                        self.encrypt_and_send(&mut out)?;
                    }
                }
                // What was fed may have made plaintext: it is read first.
                continue;
            }
            // Nothing to read and nothing fed: wait on the socket, with no lock held.
            self.start = 0;
            self.end = 0;
            let read = (&self.socket).read(&mut self.raw)?;
            if read == 0 {
                return Ok(0);
            }
            self.end = read;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = lock(&self.shared.out);
        // What an earlier write left (a timeout) goes first; until it is out, nothing of
        // `buf` is taken.
        send_pending(&self.socket, &mut out)?;
        let taken = {
            let mut session = lock(&self.shared.session);
            let taken = session.writer().write(buf)?;
            while session.wants_write() {
                session.write_tls(&mut *out)?;
            }
            taken
        };
        match send_pending(&self.socket, &mut out) {
            // `buf[..taken]` is encrypted and queued in order: it is written, as far as the
            // caller is concerned; what the socket did not take goes out with the next write
            // or flush.
            Ok(()) => Ok(taken),
            Err(error) if taken > 0 && is_retryable(&error) => Ok(taken),
            Err(error) => Err(error),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut out = lock(&self.shared.out);
        self.encrypt_and_send(&mut out)
    }
}

fn is_retryable(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.read(buf),
            Stream::Tls(tls) => tls.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(socket) => socket.write(buf),
            Stream::Tls(tls) => tls.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(socket) => socket.flush(),
            Stream::Tls(tls) => tls.flush(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A self-signed certificate for `localhost` and 127.0.0.1, written to a fresh folder.
    fn certificate(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let made = rcgen::generate_simple_self_signed(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("a certificate");
        std::fs::create_dir_all(dir).unwrap();
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("symphony-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// An echo server over rustls' own blocking stream, on a thread.
    fn echo_server(tls: &ServerTls) -> (std::net::SocketAddr, std::thread::JoinHandle<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Arc::clone(&tls.native);
        let server = std::thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            let session = rustls::ServerConnection::new(config).unwrap();
            let mut stream = rustls::StreamOwned::new(session, socket);
            let mut buf = vec![0u8; 64 << 10];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stream.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        (addr, server)
    }

    #[test]
    fn one_clone_reads_while_another_writes_in_order() {
        let dir = temp_dir("duplex");
        let (cert, key) = certificate(&dir);
        let server = ServerTls::load(&cert, &key, TlsPorts::ALL).unwrap();
        let (addr, echo) = echo_server(&server);
        let client = ClientTls::load(&cert, None).unwrap();
        let socket = TcpStream::connect(addr).unwrap();
        let mut reader = Stream::open(socket, &addr.to_string(), Some(&client)).unwrap();
        assert!(reader.is_tls());
        let writer = reader.try_clone().unwrap();
        // Two writer threads, each a run of numbered 1 KiB chunks, while this thread reads:
        // every chunk comes back whole (records never interleave) and the total matches.
        let chunks = 400usize;
        let writers: Vec<_> = (0..2u8)
            .map(|id| {
                let mut writer = writer.try_clone().unwrap();
                std::thread::spawn(move || {
                    for _ in 0..chunks {
                        writer.write_all(&[id; 1024]).unwrap();
                    }
                    writer.flush().unwrap();
                })
            })
            .collect();
        let mut got = vec![0u8; 2 * chunks * 1024];
        reader.read_exact(&mut got).unwrap();
        for writer in writers {
            writer.join().unwrap();
        }
        for chunk in got.chunks(1024) {
            assert!(chunk.iter().all(|&b| b == chunk[0]), "a write was split by another");
        }
        let ones = got.chunks(1024).filter(|c| c[0] == 1).count();
        assert_eq!(ones, chunks);
        writer.shutdown(Shutdown::Write).unwrap();
        assert_eq!(reader.read(&mut [0u8; 16]).unwrap(), 0, "close_notify reads as the end");
        echo.join().unwrap();
    }

    #[test]
    fn a_wrong_name_or_an_untrusted_certificate_fails_the_handshake() {
        let dir = temp_dir("names");
        let (cert, key) = certificate(&dir);
        let server = ServerTls::load(&cert, &key, TlsPorts::ALL).unwrap();
        let (addr, echo) = echo_server(&server);
        let client = ClientTls::load(&cert, Some("elsewhere.example")).unwrap();
        let socket = TcpStream::connect(addr).unwrap();
        let error = Stream::open(socket, &addr.to_string(), Some(&client)).unwrap_err();
        assert!(error.to_string().contains("TLS handshake failed"), "{error}");
        echo.join().unwrap();

        let other = temp_dir("other");
        let (other_cert, _) = certificate(&other);
        let (addr, echo) = echo_server(&server);
        let stranger = ClientTls::load(&other_cert, None).unwrap();
        let socket = TcpStream::connect(addr).unwrap();
        let error = Stream::open(socket, &addr.to_string(), Some(&stranger)).unwrap_err();
        assert!(error.to_string().contains("certificate"), "{error}");
        echo.join().unwrap();
    }

    #[test]
    fn bad_files_are_named_in_the_error() {
        let dir = temp_dir("files");
        let (cert, key) = certificate(&dir);
        let missing = dir.join("missing.pem");
        let error = ServerTls::load(&missing, &key, TlsPorts::ALL).unwrap_err();
        assert!(error.contains("missing.pem"), "{error}");
        // The key file given as the certificate: no certificate in it.
        let error = ServerTls::load(&key, &key, TlsPorts::ALL).unwrap_err();
        assert!(error.contains("no PEM certificate"), "{error}");
        // Another certificate's key: they do not belong together.
        let other = temp_dir("files-other");
        let (_, other_key) = certificate(&other);
        assert!(ServerTls::load(&cert, &other_key, TlsPorts::ALL).is_err());
        assert_eq!(
            TlsPorts::from_names(&["grpc".to_string(), "http".to_string()]).unwrap(),
            TlsPorts {
                client: false,
                links: false,
                http: true,
                grpc: true,
                metrics: false
            }
        );
        assert!(TlsPorts::from_names(&["https".to_string()])
            .unwrap_err()
            .contains("client, links"));
    }
}
