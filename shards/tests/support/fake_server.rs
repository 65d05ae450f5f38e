//! A fake protocol peer for tests of clients: a std listener that hands each connection to a
//! test's `serve` function, frame builders, and a writer thread that sends replies at their
//! due times (all due at once in one write) or closes. Shared by `shards/tests/client.rs`
//! and `perf/tests/loadgen.rs` (included with `#[path]`).

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::Instant;

use symphony_core::wire::{encode_error, encode_reply, ErrorCode, ReplyRef, Status, Timings};

/// What the writer thread does next.
pub enum Out {
    /// Write these bytes at this time (replies due at once are written together).
    At(Instant, Vec<u8>),
    /// Write these bytes now, then shut the connection down.
    Close(Vec<u8>),
}

/// Listens on loopback and runs `serve` on a thread per connection.
pub fn start(serve: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binds");
    let addr = listener.local_addr().expect("has an address");
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            thread::spawn(move || serve(stream));
        }
    });
    addr
}

pub fn reply_frame(id: u64, status: Status, output: &[u8], total_us: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let reply = ReplyRef {
        client_request_id: id,
        status,
        timings: Timings {
            queued_us: 0,
            exec_us: 0,
            total_us,
        },
        output,
    };
    encode_reply(&mut out, &reply).expect("encodes");
    out
}

pub fn error_frame(code: ErrorCode, message: &str) -> Vec<u8> {
    let mut out = Vec::new();
    encode_error(&mut out, code, message).expect("encodes");
    out
}

/// Writes what `rx` schedules, in due order; `Out::Close` ends with `shutdown(close)`.
pub fn write_loop(mut stream: TcpStream, rx: mpsc::Receiver<Out>, close: Shutdown) {
    let mut pending: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut sequence = 0u64;
    let mut batch = Vec::new();
    loop {
        let now = Instant::now();
        batch.clear();
        while pending.peek().is_some_and(|Reverse((due, _, _))| *due <= now) {
            let Some(Reverse((_, _, bytes))) = pending.pop() else {
                break;
            };
            batch.extend_from_slice(&bytes);
        }
        if !batch.is_empty() && stream.write_all(&batch).is_err() {
            return;
        }
        let message = match pending.peek() {
            Some(Reverse((due, _, _))) => match rx.recv_timeout(due.saturating_duration_since(now)) {
                Ok(message) => message,
                Err(mpsc::RecvTimeoutError::Timeout) => continue,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    thread::sleep(due.saturating_duration_since(now));
                    continue;
                }
            },
            None => match rx.recv() {
                Ok(message) => message,
                Err(_) => return,
            },
        };
        match message {
            Out::At(due, bytes) => {
                sequence += 1;
                pending.push(Reverse((due, sequence, bytes)));
            }
            Out::Close(bytes) => {
                let _ = stream.write_all(&bytes);
                let _ = stream.shutdown(close);
                return;
            }
        }
    }
}
