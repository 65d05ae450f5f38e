//! The KServe v2 front end (the Open Inference Protocol over HTTP/1.1, as Triton speaks it),
//! on every shard's own thread: hyper 1 drives each connection through its own IO traits on
//! glommio's sockets, no tokio.
//!
//! An HTTP connection is a client connection like a native one: it takes a slot of the
//! shard's client table (the same `connections_per_shard` limit and eviction), and each
//! infer request becomes a native REQUEST frame handed to the shard's core, so it takes the
//! same path to its model's owning shard, under the same per-connection limits, and gets
//! exactly one REPLY. Instead of a socket writer, a pump reads the replies the core queues
//! on the connection and hands each to the request waiting for it. hyper serves one
//! request of a connection at a time, so at most one reply is ever waiting.
//!
//! What is served (see `docs/protocol.md`): health (`/v2/health/live`, `/v2/health/ready`),
//! server metadata (`/v2`), model metadata and readiness (`/v2/models/{m}[/versions/{v}]`,
//! `.../ready`) and inference (`.../infer`) with JSON tensors or the binary tensor extension.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use glommio::net::TcpStream;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use symphony_core::wire::{self, FrameDecoder, Kind, ModelRef, RequestRef, Status};

use super::connection::{Connection, Receivers, REFUSAL_WRITE_TIMEOUT};
use super::Shard;
use crate::buffers::ReadBuffer;
use crate::shard::{ConnectionKey, Input, Peer};

/// The header that says how much of a body is JSON when binary tensors follow it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// The version every model has (the catalog has one of each).
const MODEL_VERSION: &str = "1";
/// The default input and output tensors of a model (until the config declares them).
const INPUT_NAME: &str = "INPUT0";
const OUTPUT_NAME: &str = "OUTPUT0";
/// JSON around a request's tensors: an infer body may be this much larger than the largest
/// input a frame carries (JSON numbers take several bytes per element).
const JSON_BODY_FACTOR: usize = 8;
/// How long a refused connection's answer may take to write.
const REFUSAL_TIMEOUT: Duration = REFUSAL_WRITE_TIMEOUT;

type Body = Full<Bytes>;

/// A reply the core wrote for this connection, owned.
#[derive(Debug)]
struct OwnedReply {
    client_request_id: u64,
    status: Status,
    output: Vec<u8>,
}

/// Serves one HTTP connection until its peer closes it, the core ends it or the service
/// stops; then the core forgets it (what it still had queued is cancelled).
pub(super) async fn serve(
    shard: Rc<Shard>,
    key: ConnectionKey,
    stream: TcpStream,
    connection: Rc<Connection>,
    receivers: Receivers,
    only_metrics: bool,
) {
    let peer = Peer::Client(key);
    let _ = stream.set_nodelay(true);
    shard.handle(Input::Opened(peer));
    // One request is served at a time: one reply at most is ever waiting.
    let (replies, waiting) = local_channel::new_bounded(1);
    glommio::spawn_local(pump(Rc::clone(&connection), receivers.notify, replies)).detach();
    let front = Rc::new(Front {
        shard: Rc::clone(&shard),
        peer,
        connection: Rc::clone(&connection),
        waiting,
        next_id: Cell::new(1),
        only_metrics,
    });
    let service = hyper::service::service_fn(move |request| {
        let front = Rc::clone(&front);
        async move { Ok::<_, std::convert::Infallible>(front.answer(request).await) }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(Io(stream), service);
    let stop_reading = receivers.stop_reading;
    futures_lite::future::or(
        async {
            let _ = http.await;
        },
        async {
            let _ = stop_reading.recv().await;
        },
    )
    .await;
    connection.mark_dead();
    shard.handle(Input::Closed {
        peer,
        writer_died: false,
    });
    super::connection::Port::Http.slots(&shard).borrow_mut().remove(key);
}

/// Hands the replies the core queues on `connection` to the request waiting for them.
async fn pump(connection: Rc<Connection>, notify: LocalReceiver<()>, replies: LocalSender<OwnedReply>) {
    let decoder = FrameDecoder::default();
    while notify.recv().await.is_some() {
        let bytes = std::mem::take(&mut *connection.out.borrow_mut());
        let mut frames = decoder.frames(&bytes);
        for frame in frames.by_ref() {
            let Ok(frame) = frame else { break };
            let reply = match frame.kind {
                Kind::Reply => match wire::access_reply(frame.payload) {
                    Ok(reply) => OwnedReply {
                        client_request_id: reply.client_request_id.to_native(),
                        status: reply.status,
                        output: reply.output.as_slice().to_vec(),
                    },
                    Err(_) => continue,
                },
                // An ERROR frame ends a client connection (the core closes it too).
                _ => continue,
            };
            // A reply nobody waits for any more (its HTTP peer left) is dropped.
            let _ = replies.try_send(reply);
        }
        connection.wake_waiting_reader();
        if connection.is_dead() || connection.is_ending() {
            break;
        }
    }
    connection.stop_reader();
}

/// One HTTP connection's side of the shard.
struct Front {
    shard: Rc<Shard>,
    peer: Peer,
    connection: Rc<Connection>,
    waiting: LocalReceiver<OwnedReply>,
    next_id: Cell<u64>,
    /// The metrics port: `GET /metrics` and nothing else.
    only_metrics: bool,
}

/// An HTTP error: status and message, answered as `{"error": message}`.
#[derive(Debug)]
struct Failure(StatusCode, String);

impl Failure {
    fn bad(message: impl Into<String>) -> Failure {
        Failure(StatusCode::BAD_REQUEST, message.into())
    }
}

impl Front {
    async fn answer(&self, request: Request<Incoming>) -> Response<Body> {
        self.connection.active.set(true);
        match self.route(request).await {
            Ok(response) => response,
            Err(Failure(status, message)) => {
                self.shard.core.borrow().metrics().http_error(status.as_u16());
                json_response(status, &json!({ "error": message }))
            }
        }
    }

    async fn route(&self, request: Request<Incoming>) -> Result<Response<Body>, Failure> {
        let path = request.uri().path().to_owned();
        let parts: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        let method = request.method().clone();
        let get = method == Method::GET;
        match parts.as_slice() {
            ["metrics"] if get => Ok(self.metrics()),
            _ if self.only_metrics => Err(Failure(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {method} {path} (this port serves GET /metrics)"),
            )),
            ["v2", "health", "live"] if get => Ok(empty(StatusCode::OK)),
            ["v2", "health", "ready"] if get => Ok(empty(if self.stopping() {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::OK
            })),
            ["v2"] if get => Ok(json_response(
                StatusCode::OK,
                &json!({
                    "name": "symphony",
                    "version": env!("CARGO_PKG_VERSION"),
                    "extensions": ["binary_tensor_data", "schedule_policy"],
                }),
            )),
            ["v2", "models", model, rest @ ..] => {
                let (model, rest) = (*model, versioned(rest)?);
                let index = self.model(model)?;
                match rest {
                    [] if get => Ok(json_response(StatusCode::OK, &self.metadata(index))),
                    ["ready"] if get => Ok(empty(if self.stopping() {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    })),
                    ["infer"] if method == Method::POST => self.infer(model, index, request).await,
                    _ => Err(Failure(
                        StatusCode::NOT_FOUND,
                        format!("no such endpoint: {method} {path}"),
                    )),
                }
            }
            _ => Err(Failure(
                StatusCode::NOT_FOUND,
                format!("no such endpoint: {method} {path}"),
            )),
        }
    }

    /// `GET /metrics`: every shard's values, merged now (Prometheus' text format 0.0.4).
    fn metrics(&self) -> Response<Body> {
        let text = self.shard.metrics.render();
        let mut response = Response::new(Full::new(Bytes::from(text)));
        response.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        response
    }

    fn stopping(&self) -> bool {
        self.shard.stop.load(Ordering::Relaxed)
    }

    /// The model's index in the catalog, or the error Triton gives for an unknown one.
    fn model(&self, name: &str) -> Result<usize, Failure> {
        let core = self.shard.core.borrow();
        let catalog = core.catalog();
        catalog.index_of(name).map(|index| index as usize).ok_or_else(|| {
            Failure(
                StatusCode::NOT_FOUND,
                format!("Request for unknown model: '{name}' is not found"),
            )
        })
    }

    fn metadata(&self, index: usize) -> Value {
        let core = self.shard.core.borrow();
        let catalog = core.catalog();
        let input_shape = match catalog.models[index].input_bytes {
            Some(bytes) => json!([bytes]),
            None => json!([-1]),
        };
        json!({
            "name": catalog.configs[index].name,
            "versions": [MODEL_VERSION],
            "platform": "symphony",
            "inputs": [{ "name": INPUT_NAME, "datatype": "UINT8", "shape": input_shape }],
            "outputs": [{ "name": OUTPUT_NAME, "datatype": "UINT8", "shape": [-1] }],
        })
    }

    async fn infer(&self, model: &str, index: usize, request: Request<Incoming>) -> Result<Response<Body>, Failure> {
        let header_length = match request.headers().get(HEADER_LENGTH) {
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .ok_or_else(|| Failure::bad(format!("{HEADER_LENGTH} is not a number")))?,
            ),
            None => None,
        };
        let limit = wire::INPUT_LIMIT * JSON_BODY_FACTOR;
        let body = Limited::new(request.into_body(), limit)
            .collect()
            .await
            .map_err(|e| Failure(StatusCode::PAYLOAD_TOO_LARGE, format!("reading the body: {e}")))?
            .to_bytes();
        let (head, mut binary) = match header_length {
            Some(n) if n <= body.len() => (&body[..n], &body[n..]),
            Some(n) => {
                return Err(Failure::bad(format!(
                    "{HEADER_LENGTH} {n} is past the body's {} bytes",
                    body.len()
                )))
            }
            None => (&body[..], &body[..0]),
        };
        let head: Value =
            serde_json::from_slice(head).map_err(|e| Failure::bad(format!("the request is not valid JSON: {e}")))?;
        let id = head.get("id").and_then(Value::as_str).map(str::to_owned);
        let parameters = head.get("parameters").and_then(Value::as_object);
        let slo_us = match parameters.and_then(|p| p.get("timeout")) {
            None => None,
            Some(timeout) => {
                let us = timeout
                    .as_u64()
                    .ok_or_else(|| Failure::bad("parameter 'timeout' must be a whole number of microseconds"))?;
                Some(u32::try_from(us).unwrap_or(u32::MAX).max(1))
            }
        };
        let inputs = head
            .get("inputs")
            .and_then(Value::as_array)
            .filter(|inputs| !inputs.is_empty())
            .ok_or_else(|| Failure::bad("the request has no 'inputs'"))?;
        let mut input = Vec::new();
        for tensor in inputs {
            pack_tensor(tensor, &mut binary, &mut input)?;
        }
        if !binary.is_empty() {
            return Err(Failure::bad(format!(
                "{} bytes of binary data belong to no input",
                binary.len()
            )));
        }
        let binary_output = wants_binary_output(&head);
        let reply = self.submit(model, slo_us, &input).await?;
        let output = match reply.status {
            Status::Ok => reply.output,
            status => {
                // The scheduler's answer (counted in `symphony_replies_total`).
                let Failure(code, message) = status_failure(status, model);
                return Ok(json_response(code, &json!({ "error": message })));
            }
        };
        let mut outputs = Map::new();
        outputs.insert("name".into(), json!(OUTPUT_NAME));
        outputs.insert("datatype".into(), json!("UINT8"));
        outputs.insert("shape".into(), json!([output.len()]));
        let mut header = json!({
            "model_name": self.shard.core.borrow().catalog().configs[index].name,
            "model_version": MODEL_VERSION,
        });
        if let Some(id) = id {
            header["id"] = json!(id);
        }
        if binary_output {
            outputs.insert("parameters".into(), json!({ "binary_data_size": output.len() }));
            header["outputs"] = json!([Value::Object(outputs)]);
            let mut body = serde_json::to_vec(&header).expect("a JSON value serializes");
            let json_length = body.len();
            body.extend_from_slice(&output);
            let mut response = Response::new(Full::new(Bytes::from(body)));
            let headers = response.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            headers.insert(HEADER_LENGTH, HeaderValue::from(json_length));
            Ok(response)
        } else {
            outputs.insert("data".into(), json!(output));
            header["outputs"] = json!([Value::Object(outputs)]);
            Ok(json_response(StatusCode::OK, &header))
        }
    }

    /// Hands a native REQUEST for `model` to the core and waits for its one reply.
    async fn submit(&self, model: &str, slo_us: Option<u32>, input: &[u8]) -> Result<OwnedReply, Failure> {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        let model = ModelRef::Name(model.to_owned());
        let mut frame = Vec::new();
        wire::encode_request(
            &mut frame,
            &RequestRef {
                client_request_id: id,
                model: &model,
                slo_us,
                input,
            },
        )
        .map_err(|e| {
            Failure(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request does not fit a frame: {e}"),
            )
        })?;
        let mut buffer = ReadBuffer::new(frame.len(), frame.len());
        let room = buffer.spare().expect("a buffer of the frame's size has room for it");
        room.copy_from_slice(&frame);
        buffer.advance(frame.len());
        let decoder = FrameDecoder::default();
        let mut frames = decoder.frames(buffer.filled());
        let now_ns = self.shard.now_ns();
        let _ = self
            .shard
            .handle_frames(self.peer, &self.connection, &mut frames, &buffer, now_ns);
        self.shard.handle(Input::ReadDone);
        loop {
            let Some(reply) = self.waiting.recv().await else {
                return Err(Failure(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the connection is closing".into(),
                ));
            };
            // An older request's reply (its HTTP request was abandoned) is skipped.
            if reply.client_request_id == id {
                return Ok(reply);
            }
        }
    }
}

/// The path after `/v2/models/{m}`, with an optional `/versions/{v}` taken off (every model
/// has version 1 only).
fn versioned<'a, 'b>(rest: &'b [&'a str]) -> Result<&'b [&'a str], Failure> {
    match rest {
        ["versions", version, rest @ ..] if *version == MODEL_VERSION => Ok(rest),
        ["versions", version, ..] => Err(Failure(
            StatusCode::NOT_FOUND,
            format!("Request for unknown model version: '{version}' (every model has version {MODEL_VERSION})"),
        )),
        rest => Ok(rest),
    }
}

/// What the client is told for a request that did not run.
fn status_failure(status: Status, model: &str) -> Failure {
    let (code, message) = match status {
        Status::Dropped => (
            StatusCode::SERVICE_UNAVAILABLE,
            "dropped: its SLO cannot be met".to_owned(),
        ),
        Status::Overloaded => (
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded: the scheduler's queues are full; retry later".to_owned(),
        ),
        Status::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_owned()),
        Status::UnknownModel => (
            StatusCode::NOT_FOUND,
            format!("Request for unknown model: '{model}' is not found"),
        ),
        Status::Malformed => (
            StatusCode::BAD_REQUEST,
            format!("the input does not fit model '{model}'"),
        ),
        Status::ExecutorLost => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the executor running its batch was lost".to_owned(),
        ),
        Status::ExecutionFailed => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "the executor could not run its batch".to_owned(),
        ),
        Status::Ok => (StatusCode::OK, String::new()),
    };
    Failure(code, message)
}

/// Whether the response carries its outputs as binary data: asked for the whole request
/// (`parameters.binary_data_output`) or for an output (`outputs[i].parameters.binary_data`).
fn wants_binary_output(head: &Value) -> bool {
    let whole = head
        .pointer("/parameters/binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let any = head.get("outputs").and_then(Value::as_array).is_some_and(|outputs| {
        outputs
            .iter()
            .any(|o| o.pointer("/parameters/binary_data").and_then(Value::as_bool) == Some(true))
    });
    whole || any
}

/// Bytes of one element of `datatype`; `None` for BYTES (length-prefixed) or an unknown one.
fn element_size(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" | "FP16" | "BF16" => 2,
        "UINT32" | "INT32" | "FP32" => 4,
        "UINT64" | "INT64" | "FP64" => 8,
        _ => return None,
    })
}

/// Appends one input tensor's bytes (little-endian, row-major) to `out`: its binary data
/// (taken off the front of `binary`) or its JSON `data`, checked against its shape.
fn pack_tensor(tensor: &Value, binary: &mut &[u8], out: &mut Vec<u8>) -> Result<(), Failure> {
    let name = tensor.get("name").and_then(Value::as_str).unwrap_or("");
    if name.is_empty() {
        return Err(Failure::bad("an input has no 'name'"));
    }
    let datatype = tensor
        .get("datatype")
        .and_then(Value::as_str)
        .ok_or_else(|| Failure::bad(format!("input '{name}' has no 'datatype'")))?;
    let shape = tensor
        .get("shape")
        .and_then(Value::as_array)
        .ok_or_else(|| Failure::bad(format!("input '{name}' has no 'shape'")))?;
    let mut elements: usize = 1;
    for dim in shape {
        let dim = dim.as_u64().ok_or_else(|| {
            Failure::bad(format!(
                "input '{name}': shape {} is not of whole numbers",
                Value::Array(shape.clone())
            ))
        })?;
        elements = elements
            .checked_mul(dim as usize)
            .filter(|&n| n <= wire::INPUT_LIMIT)
            .ok_or_else(|| {
                Failure::bad(format!(
                    "input '{name}': shape {} is too large",
                    Value::Array(shape.clone())
                ))
            })?;
    }
    let size = element_size(datatype);
    if datatype != "BYTES" && size.is_none() {
        return Err(Failure::bad(format!("input '{name}': unknown datatype '{datatype}'")));
    }
    if let Some(length) = tensor.pointer("/parameters/binary_data_size") {
        let length = length
            .as_u64()
            .ok_or_else(|| Failure::bad(format!("input '{name}': binary_data_size is not a number")))?
            as usize;
        if length > binary.len() {
            return Err(Failure::bad(format!(
                "input '{name}': binary_data_size {length} is past the {} bytes of binary data left",
                binary.len()
            )));
        }
        if let Some(size) = size {
            if length != elements * size {
                return Err(Failure::bad(format!(
                    "input '{name}': {length} bytes of binary data for {elements} {datatype} elements"
                )));
            }
        }
        let (data, rest) = binary.split_at(length);
        out.extend_from_slice(data);
        *binary = rest;
        return Ok(());
    }
    let data = tensor
        .get("data")
        .ok_or_else(|| Failure::bad(format!("input '{name}' has neither 'data' nor binary data")))?;
    let mut values = Vec::new();
    flatten(data, &mut values);
    if values.len() != elements {
        return Err(Failure::bad(format!(
            "input '{name}': {} elements of data for shape {}",
            values.len(),
            Value::Array(shape.clone())
        )));
    }
    for value in values {
        pack_element(name, datatype, value, out)?;
    }
    Ok(())
}

/// The leaves of a nested JSON array, in row-major order.
fn flatten<'a>(value: &'a Value, out: &mut Vec<&'a Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|item| flatten(item, out)),
        leaf => out.push(leaf),
    }
}

fn pack_element(name: &str, datatype: &str, value: &Value, out: &mut Vec<u8>) -> Result<(), Failure> {
    let wrong = || Failure::bad(format!("input '{name}': {value} is not a {datatype}"));
    macro_rules! int {
        ($t:ty) => {{
            let v = value
                .as_i64()
                .and_then(|v| <$t>::try_from(v).ok())
                .or_else(|| value.as_u64().and_then(|v| <$t>::try_from(v).ok()))
                .ok_or_else(wrong)?;
            out.extend_from_slice(&v.to_le_bytes());
        }};
    }
    match datatype {
        "BOOL" => out.push(u8::from(value.as_bool().ok_or_else(wrong)?)),
        "UINT8" => int!(u8),
        "UINT16" => int!(u16),
        "UINT32" => int!(u32),
        "UINT64" => int!(u64),
        "INT8" => int!(i8),
        "INT16" => int!(i16),
        "INT32" => int!(i32),
        "INT64" => int!(i64),
        "FP32" => out.extend_from_slice(&(value.as_f64().ok_or_else(wrong)? as f32).to_le_bytes()),
        "FP64" => out.extend_from_slice(&value.as_f64().ok_or_else(wrong)?.to_le_bytes()),
        "BYTES" => {
            let s = value.as_str().ok_or_else(wrong)?;
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        _ => {
            return Err(Failure::bad(format!(
                "input '{name}': {datatype} data cannot be given as JSON; send it as binary data"
            )))
        }
    }
    Ok(())
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = status;
    response
}

fn json_response(status: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("a JSON value serializes");
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

/// Answers a connection refused at the client limit with a 503 and closes it.
pub(super) async fn refuse(stream: TcpStream, message: String) {
    let body = json!({ "error": message }).to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n{CONTENT_LENGTH}: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = stream;
    let _ = futures_lite::future::or(
        async {
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.close().await;
        },
        glommio::timer::sleep(REFUSAL_TIMEOUT),
    )
    .await;
}

/// glommio's socket under hyper's IO traits.
struct Io(TcpStream);

impl hyper::rt::Read for Io {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        // Read into a stack buffer and copy: hyper's cursor is uninitialized memory, and a
        // copy of an HTTP read costs nothing next to the JSON around it.
        let mut chunk = [0u8; 16 << 10];
        let want = chunk.len().min(buf.remaining());
        match Pin::new(&mut self.0).poll_read(cx, &mut chunk[..want]) {
            Poll::Ready(Ok(n)) => {
                buf.put_slice(&chunk[..n]);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_close(cx)
    }
}
