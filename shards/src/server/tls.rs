//! TLS on a shard's ports: the handshake of an accepted connection (futures-rustls on
//! glommio's socket), and [`Stream`], the socket every connection task reads and writes,
//! plain or TLS.
//!
//! The handshake runs in the connection's own task, never in the accept loop, within
//! `handshake_timeout_ms`; a connection evicted meanwhile stops it. A peer that speaks plain
//! text to a TLS port is told so in its own protocol when its first byte shows it (not a TLS
//! handshake record): an ERROR frame on the native and link ports, an HTTP 400 on the HTTP
//! and metrics ports, nothing on gRPC (an HTTP/2 preface gets a closed connection).

use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_lite::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel::LocalReceiver;
use glommio::net::TcpStream;
use symphony_core::wire::{self, ErrorCode};

use super::connection::{Port, REFUSAL_WRITE_TIMEOUT};
use super::Shard;
use crate::tls::ServerTls;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// A connection's socket: plain, or TLS terminated here.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<futures_rustls::server::TlsStream<TcpStream>>),
}

impl Stream {
    /// Whether it is encrypted (a TLS link sends no zero-copy sections: the bytes on the
    /// wire are the session's, not the receive buffer's).
    pub(super) fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    pub(super) fn socket(&self) -> &TcpStream {
        match self {
            Stream::Plain(socket) => socket,
            Stream::Tls(tls) => tls.get_ref().0,
        }
    }
}

/// Whether `port` speaks TLS under `tls`.
pub(super) fn covers(tls: &ServerTls, port: Port) -> bool {
    match port {
        Port::Clients => tls.ports.client,
        Port::Links => tls.ports.links,
        Port::Http => tls.ports.http,
        Port::Metrics => tls.ports.metrics,
        Port::Grpc => tls.ports.grpc,
    }
}

/// The accepted `socket` as the connection's stream: as it is on a plain port, after the TLS
/// handshake on a TLS port. `None` when the handshake failed, timed out or the connection
/// was evicted first (the caller frees its slot).
pub(super) async fn open(
    shard: &Rc<Shard>,
    port: Port,
    socket: TcpStream,
    stop: Option<&LocalReceiver<()>>,
    timeout: Duration,
) -> Option<Stream> {
    let _ = socket.set_nodelay(true);
    let Some(tls) = shard.tls.as_ref().filter(|tls| covers(tls, port)) else {
        return Some(Stream::Plain(socket));
    };
    let config = match port {
        Port::Http | Port::Metrics => Arc::clone(&tls.http),
        Port::Grpc => Arc::clone(&tls.grpc),
        Port::Clients | Port::Links => Arc::clone(&tls.native),
    };
    let handshake = async {
        let mut first = [0u8; 1];
        match socket.peek(&mut first).await {
            Ok(1) if first[0] != TLS_HANDSHAKE => return Err(Some(socket)),
            Ok(1) => {}
            _ => return Err(None),
        }
        futures_rustls::TlsAcceptor::from(config)
            .accept(socket)
            .await
            .map_err(|_| None)
    };
    let outcome = futures_lite::future::or(async { Some(handshake.await) }, async {
        futures_lite::future::or(
            async {
                match stop {
                    Some(stop) => {
                        let _ = stop.recv().await;
                    }
                    None => futures_lite::future::pending::<()>().await,
                }
            },
            glommio::timer::sleep(timeout),
        )
        .await;
        None
    })
    .await;
    match outcome {
        Some(Ok(stream)) => Some(Stream::Tls(Box::new(stream))),
        Some(Err(plain)) => {
            shard.stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
            if let Some(socket) = plain {
                tell_plain_peer(socket, port).await;
            }
            None
        }
        None => {
            shard.stats.tls_handshake_failures.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Tells a peer that sent plain text to a TLS port what is wrong, in its own protocol.
async fn tell_plain_peer(mut socket: TcpStream, port: Port) {
    let message = "this port speaks TLS only: connect with TLS (see the README's TLS section)";
    let answer = match port {
        Port::Clients | Port::Links => {
            let mut frame = Vec::new();
            let _ = wire::encode_error(&mut frame, ErrorCode::Refused, message);
            frame
        }
        Port::Http | Port::Metrics => {
            let body = serde_json::json!({ "error": message }).to_string();
            format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            )
            .into_bytes()
        }
        Port::Grpc => return,
    };
    let _ = futures_lite::future::or(
        async {
            let _ = socket.write_all(&answer).await;
            let _ = socket.close().await;
        },
        glommio::timer::sleep(REFUSAL_WRITE_TIMEOUT),
    )
    .await;
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(socket) => Pin::new(socket).poll_read(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(socket) => Pin::new(socket).poll_write(cx, buf),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(socket) => Pin::new(socket).poll_flush(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_flush(cx),
        }
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(socket) => Pin::new(socket).poll_close(cx),
            Stream::Tls(tls) => Pin::new(tls.as_mut()).poll_close(cx),
        }
    }
}
