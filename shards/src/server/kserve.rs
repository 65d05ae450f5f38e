//! The KServe v2 front end (the Open Inference Protocol over HTTP/1.1, as Triton speaks it),
//! on every shard's own thread: hyper 1 drives each connection through its own IO traits on
//! glommio's sockets, no tokio. The gRPC front end (`grpc.rs`) shares its [`Session`] and its
//! tensor checks.
//!
//! An HTTP connection is a client connection like a native one: it takes a slot of the
//! shard's client table (the same `connections_per_shard` limit and eviction), and each
//! infer request becomes a native REQUEST frame handed to the shard's core, so it takes the
//! same path to its model's owning shard, under the same per-connection limits, and gets
//! exactly one REPLY. Instead of a socket writer, a pump reads the replies the core queues
//! on the connection and hands each to the request waiting for it, by its id.
//!
//! What is served (see `docs/protocol.md`): health (`/v2/health/live`, `/v2/health/ready`),
//! server metadata (`/v2`), model metadata, readiness, configuration and statistics
//! (`/v2/models/{m}[/versions/{v}]`, `.../ready`, `.../config`, `.../stats`), inference
//! (`.../infer`) with JSON tensors or the binary tensor extension, checked against the
//! tensors the model declares, and `GET /metrics`.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::channels::local_channel::{self, LocalReceiver, LocalSender};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use symphony_core::wire::{self, FrameDecoder, Kind, ModelRef, RequestRef, Status};

use super::connection::{Connection, Receivers, REFUSAL_WRITE_TIMEOUT};
use super::tls::Stream;
use super::Shard;
use crate::buffers::ReadBuffer;
use crate::shard::{ConnectionKey, Input, Peer};
use crate::tensors::TensorSpec;

/// The header that says how much of a body is JSON when binary tensors follow it.
pub const HEADER_LENGTH: &str = "inference-header-content-length";
/// The version every model has (the catalog has one of each).
pub(super) const MODEL_VERSION: &str = "1";
/// The protocol extensions served.
pub(super) const EXTENSIONS: [&str; 4] = [
    "binary_tensor_data",
    "schedule_policy",
    "model_configuration",
    "statistics",
];

type Body = Full<Bytes>;

/// A reply the core wrote for this connection, owned.
#[derive(Debug)]
pub(super) struct OwnedReply {
    pub(super) status: Status,
    pub(super) output: Vec<u8>,
}

/// Serves one HTTP connection until its peer closes it, the core ends it or the service
/// stops; then the core forgets it (what it still had queued is cancelled).
pub(super) async fn serve(
    shard: Rc<Shard>,
    key: ConnectionKey,
    stream: Stream,
    connection: Rc<Connection>,
    receivers: Receivers,
    only_metrics: bool,
) {
    let session = Session::open(&shard, key, connection, receivers.notify);
    let front = Rc::new(Front {
        shard: Rc::clone(&shard),
        session: Rc::clone(&session),
        only_metrics,
    });
    let service = hyper::service::service_fn(move |request| {
        let front = Rc::clone(&front);
        async move { Ok::<_, std::convert::Infallible>(front.answer(request).await) }
    });
    let http = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(Io(stream), service);
    session.run(key, http, receivers.stop_reading).await;
}

/// A KServe connection (HTTP or gRPC) as a client of the shard's core: its requests go in as
/// native REQUEST frames, and a pump hands each REPLY the core queues on the connection to
/// the request waiting for it, by id.
pub(super) struct Session {
    shard: Rc<Shard>,
    peer: Peer,
    connection: Rc<Connection>,
    /// Requests handed to the core and not answered yet, by their id on this connection.
    waiters: RefCell<HashMap<u64, LocalSender<OwnedReply>>>,
    next_id: Cell<u64>,
}

impl Session {
    /// Tells the core of the connection and starts its reply pump.
    pub(super) fn open(
        shard: &Rc<Shard>,
        key: ConnectionKey,
        connection: Rc<Connection>,
        notify: LocalReceiver<()>,
    ) -> Rc<Session> {
        let peer = Peer::Client(key);
        shard.handle(Input::Opened(peer));
        let session = Rc::new(Session {
            shard: Rc::clone(shard),
            peer,
            connection,
            waiters: RefCell::new(HashMap::new()),
            next_id: Cell::new(1),
        });
        glommio::spawn_local(pump(Rc::clone(&session), notify)).detach();
        session
    }

    /// Drives the connection (`http`, hyper's) until its peer ends it or the core stops its
    /// reader (a close, the drain), then closes the session.
    pub(super) async fn run<T>(
        &self,
        key: ConnectionKey,
        http: impl std::future::Future<Output = T>,
        stop_reading: LocalReceiver<()>,
    ) {
        futures_lite::future::or(
            async {
                let _ = http.await;
            },
            async {
                let _ = stop_reading.recv().await;
            },
        )
        .await;
        self.close(key);
    }

    /// The connection ended: the core forgets it (its queued requests are cancelled), the
    /// pump stops, and requests still waiting are told.
    pub(super) fn close(&self, key: ConnectionKey) {
        self.connection.mark_dead();
        self.connection.wake_writer();
        self.shard.handle(Input::Closed {
            peer: self.peer,
            writer_died: false,
        });
        super::connection::Port::Http
            .slots(&self.shard)
            .borrow_mut()
            .remove(key);
        self.waiters.borrow_mut().clear();
    }

    /// Hands a native REQUEST for `model` to the core and waits for its one reply.
    pub(super) async fn submit(&self, model: &str, slo_us: Option<u32>, input: &[u8]) -> Result<OwnedReply, Failure> {
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
        let (sender, receiver) = local_channel::new_bounded(1);
        self.waiters.borrow_mut().insert(id, sender);
        let decoder = FrameDecoder::default();
        let mut frames = decoder.frames(buffer.filled());
        let now_ns = self.shard.now_ns();
        let turn = self
            .shard
            .handle_frames(self.peer, &self.connection, &mut frames, &buffer, now_ns);
        self.shard.handle(Input::ReadDone);
        if turn == super::connection::TurnEnd::AtLimit {
            // The connection owes its limit of replies (`requests_per_connection`): the
            // frame was not taken.
            self.waiters.borrow_mut().remove(&id);
            return Err(Failure(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded: this connection has its limit of requests in flight; retry later".into(),
            ));
        }
        receiver
            .recv()
            .await
            .ok_or_else(|| Failure(StatusCode::SERVICE_UNAVAILABLE, "the connection is closing".into()))
    }

    /// Metrics of this shard's front end.
    pub(super) fn http_error(&self, code: u16) {
        self.shard.core.borrow().metrics().http_error(code);
    }

    pub(super) fn shard(&self) -> &Rc<Shard> {
        &self.shard
    }

    /// A request came (a connection that never sends one is evicted first).
    pub(super) fn mark_active(&self) {
        self.connection.active.set(true);
    }

    /// The model's index in the catalog, or the error Triton gives for an unknown one.
    pub(super) fn model(&self, name: &str) -> Result<usize, Failure> {
        let core = self.shard.core.borrow();
        core.catalog()
            .index_of(name)
            .map(|index| index as usize)
            .ok_or_else(|| {
                Failure(
                    StatusCode::NOT_FOUND,
                    format!("Request for unknown model: '{name}' is not found"),
                )
            })
    }
}

/// Hands the replies the core queues on the session's connection to the requests waiting
/// for them.
async fn pump(session: Rc<Session>, notify: LocalReceiver<()>) {
    let decoder = FrameDecoder::default();
    let connection = Rc::clone(&session.connection);
    while notify.recv().await.is_some() {
        if connection.is_dead() {
            break;
        }
        let bytes = std::mem::take(&mut *connection.out.borrow_mut());
        for frame in decoder.frames(&bytes).by_ref() {
            let Ok(frame) = frame else { break };
            // An ERROR frame ends a client connection (the core closes it too).
            if frame.kind != Kind::Reply {
                continue;
            }
            let Ok(reply) = wire::access_reply(frame.payload) else {
                continue;
            };
            let id = reply.client_request_id.to_native();
            // A reply nobody waits for any more (its peer left) is dropped.
            if let Some(waiter) = session.waiters.borrow_mut().remove(&id) {
                let _ = waiter.try_send(OwnedReply {
                    status: reply.status,
                    output: reply.output.as_slice().to_vec(),
                });
            }
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
    session: Rc<Session>,
    /// The metrics port: `GET /metrics` and nothing else.
    only_metrics: bool,
}

/// An HTTP error: status and message, answered as `{"error": message}`.
#[derive(Debug)]
pub(super) struct Failure(pub(super) StatusCode, pub(super) String);

impl Failure {
    fn bad(message: impl Into<String>) -> Failure {
        Failure(StatusCode::BAD_REQUEST, message.into())
    }
}

impl Front {
    async fn answer(&self, request: Request<Incoming>) -> Response<Body> {
        self.session.mark_active();
        match self.route(request).await {
            Ok(response) => response,
            Err(Failure(status, message)) => {
                self.session.http_error(status.as_u16());
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
                    "extensions": EXTENSIONS,
                }),
            )),
            ["v2", "models", "stats"] if get => {
                let count = self.shard.core.borrow().catalog().models.len();
                let stats: Vec<Value> = (0..count).map(|index| self.stats(index)).collect();
                Ok(json_response(StatusCode::OK, &json!({ "model_stats": stats })))
            }
            ["v2", "models", model, rest @ ..] => {
                let (model, rest) = (*model, versioned(rest)?);
                let index = self.model(model)?;
                match rest {
                    [] if get => Ok(json_response(StatusCode::OK, &self.metadata(index))),
                    ["config"] if get => Ok(json_response(StatusCode::OK, &self.config(index))),
                    ["stats"] if get => Ok(json_response(
                        StatusCode::OK,
                        &json!({ "model_stats": [self.stats(index)] }),
                    )),
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

    fn model(&self, name: &str) -> Result<usize, Failure> {
        self.session.model(name)
    }

    fn metadata(&self, index: usize) -> Value {
        let core = self.shard.core.borrow();
        let catalog = core.catalog();
        // Every model batches: the shapes carry a leading batch dimension of any size, as
        // Triton shows a model with max_batch_size > 0.
        let list = |tensors: &[TensorSpec]| -> Vec<Value> {
            tensors
                .iter()
                .map(|t| {
                    let mut shape = vec![-1];
                    shape.extend_from_slice(&t.shape);
                    json!({ "name": t.name, "datatype": t.datatype, "shape": shape })
                })
                .collect()
        };
        let tensors = &catalog.tensors[index];
        json!({
            "name": catalog.configs[index].name,
            "versions": [MODEL_VERSION],
            "platform": "symphony",
            "inputs": list(&tensors.inputs),
            "outputs": list(&tensors.outputs),
        })
    }

    /// The model configuration extension: what `perf_analyzer` and clients read.
    fn config(&self, index: usize) -> Value {
        let core = self.shard.core.borrow();
        let catalog = core.catalog();
        let list = |tensors: &[TensorSpec]| -> Vec<Value> {
            tensors
                .iter()
                .map(|t| json!({ "name": t.name, "data_type": t.config_type(), "dims": t.shape }))
                .collect()
        };
        let config = &catalog.configs[index];
        let tensors = &catalog.tensors[index];
        json!({
            "name": config.name,
            "platform": "symphony",
            "backend": "symphony",
            "max_batch_size": config.profile.batch_size_max(),
            "input": list(&tensors.inputs),
            "output": list(&tensors.outputs),
            // Batches form server-side, deferred to each model's schedulable window.
            "dynamic_batching": {},
            "parameters": { "slo_us": { "string_value": (config.slo_ns / 1000).to_string() } },
        })
    }

    /// The statistics extension's entry for model `index`.
    fn stats(&self, index: usize) -> Value {
        let stats = ModelStats::of(&self.shard, index);
        let batch_stats: Vec<Value> = stats
            .batches
            .iter()
            .map(|&(batch_size, plans)| json!({ "batch_size": batch_size, "compute_infer": { "count": plans, "ns": 0 } }))
            .collect();
        let duration = |(count, ns): (u64, u64)| json!({ "count": count, "ns": ns });
        json!({
            "name": stats.name,
            "version": MODEL_VERSION,
            "last_inference": 0,
            "inference_count": stats.success,
            "execution_count": stats.executions,
            "inference_stats": {
                "success": duration((stats.success, 0)),
                "fail": duration((stats.fail, 0)),
                "queue": duration(stats.queue),
                "compute_input": duration((0, 0)),
                "compute_infer": duration(stats.compute),
                "compute_output": duration((0, 0)),
            },
            "batch_stats": batch_stats,
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
        let limit = self.shard.limits.http_body_bytes;
        let body = Limited::new(request.into_body(), limit)
            .collect()
            .await
            .map_err(|e| {
                Failure(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("reading the body: {e} (limits.http_body_bytes: {limit})"),
                )
            })?
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
        let tensors = self.shard.core.borrow().catalog().tensors[index].clone();
        let (input, batched) = pack_inputs(&tensors.inputs, inputs, &mut binary)?;
        if !binary.is_empty() {
            return Err(Failure::bad(format!(
                "{} bytes of binary data belong to no input",
                binary.len()
            )));
        }
        let requested = requested_outputs(&tensors.outputs, &head)?;
        let reply = self.session.submit(model, slo_us, &input).await?;
        let output = match reply.status {
            Status::Ok => reply.output,
            status => {
                // The scheduler's answer (counted in `symphony_replies_total`).
                let Failure(code, message) = status_failure(status, model);
                return Ok(json_response(code, &json!({ "error": message })));
            }
        };
        let produced = split_outputs(&tensors.outputs, &output)?;
        let mut header = json!({
            "model_name": self.shard.core.borrow().catalog().configs[index].name,
            "model_version": MODEL_VERSION,
        });
        if let Some(id) = id {
            header["id"] = json!(id);
        }
        let mut listed = Vec::new();
        let mut blobs: Vec<u8> = Vec::new();
        for (at, binary) in requested {
            let (spec, shape, bytes) = &produced[at];
            let mut shape = shape.clone();
            if batched {
                shape.insert(0, 1);
            }
            let mut entry = json!({ "name": spec.name, "datatype": spec.datatype, "shape": shape });
            if binary {
                entry["parameters"] = json!({ "binary_data_size": bytes.len() });
                blobs.extend_from_slice(bytes);
            } else {
                entry["data"] = unpack(spec, bytes)?;
            }
            listed.push(entry);
        }
        header["outputs"] = Value::Array(listed);
        let mut body = serde_json::to_vec(&header).expect("a JSON value serializes");
        if blobs.is_empty() {
            return Ok(json_response(StatusCode::OK, &header));
        }
        let json_length = body.len();
        body.extend_from_slice(&blobs);
        let mut response = Response::new(Full::new(Bytes::from(body)));
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        headers.insert(HEADER_LENGTH, HeaderValue::from(json_length));
        Ok(response)
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
pub(super) fn status_failure(status: Status, model: &str) -> Failure {
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

/// The declared outputs the response carries, in order, each with whether it goes as
/// binary data: the request's `outputs` (by name), else every declared output; binary when
/// the output asks (`parameters.binary_data`) or the request does
/// (`parameters.binary_data_output`).
fn requested_outputs(declared: &[TensorSpec], head: &Value) -> Result<Vec<(usize, bool)>, Failure> {
    let whole = head
        .pointer("/parameters/binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let Some(asked) = head.get("outputs").and_then(Value::as_array) else {
        return Ok((0..declared.len()).map(|at| (at, whole)).collect());
    };
    asked
        .iter()
        .map(|output| {
            let name = output.get("name").and_then(Value::as_str).unwrap_or("");
            let at = declared
                .iter()
                .position(|t| t.name == name)
                .ok_or_else(|| Failure::bad(format!("unknown output '{name}'")))?;
            let binary = output
                .pointer("/parameters/binary_data")
                .and_then(Value::as_bool)
                .unwrap_or(whole);
            Ok((at, binary))
        })
        .collect()
}

/// The request's inputs checked against the declared ones (name, datatype, shape with an
/// optional leading batch dimension of 1) and packed in declared order; whether they had
/// the batch dimension.
fn pack_inputs(declared: &[TensorSpec], inputs: &[Value], binary: &mut &[u8]) -> Result<(Vec<u8>, bool), Failure> {
    let mut packed: Vec<Option<Vec<u8>>> = vec![None; declared.len()];
    let mut batched = false;
    for tensor in inputs {
        let name = tensor.get("name").and_then(Value::as_str).unwrap_or("");
        let shape: Vec<u64> = tensor
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|dims| dims.iter().map(Value::as_u64).collect::<Option<Vec<u64>>>())
            .ok_or_else(|| Failure::bad(format!("input '{name}': a 'shape' of whole numbers")))?;
        let datatype = tensor.get("datatype").and_then(Value::as_str).unwrap_or("");
        let (at, elements, with_batch) = check_input(declared, name, datatype, &shape)?;
        batched |= with_batch;
        let spec = &declared[at];
        if packed[at].is_some() {
            return Err(Failure::bad(format!("input '{name}' is there twice")));
        }
        let mut out = Vec::new();
        pack_tensor(tensor, spec, elements, binary, &mut out)?;
        packed[at] = Some(out);
    }
    let mut input = Vec::new();
    for (spec, bytes) in declared.iter().zip(packed) {
        let bytes = bytes.ok_or_else(|| Failure::bad(format!("input '{}' is missing", spec.name)))?;
        input.extend_from_slice(&bytes);
    }
    Ok((input, batched))
}

/// Checks one request input against the declared ones: its name, its datatype, its shape
/// (the declared one, optionally after a batch dimension of 1). Returns the declared input's
/// index, the elements of one item and whether the batch dimension was there.
pub(super) fn check_input(
    declared: &[TensorSpec],
    name: &str,
    datatype: &str,
    shape: &[u64],
) -> Result<(usize, usize, bool), Failure> {
    let at = declared
        .iter()
        .position(|t| t.name == name)
        .ok_or_else(|| Failure::bad(format!("unknown input '{name}'")))?;
    let spec = &declared[at];
    if datatype != spec.datatype {
        return Err(Failure::bad(format!(
            "input '{name}': datatype {datatype}, the model takes {}",
            spec.datatype
        )));
    }
    let (item, batched) = if shape.len() == spec.shape.len() + 1 {
        if shape[0] != 1 {
            return Err(Failure::bad(format!(
                "input '{name}': a batch of {} in one request; send one item per request (the scheduler batches them)",
                shape[0]
            )));
        }
        (&shape[1..], true)
    } else {
        (shape, false)
    };
    if !spec.accepts(item) {
        return Err(Failure::bad(format!(
            "input '{name}': shape {} does not fit the model's {}",
            json!(shape),
            json!(spec.shape)
        )));
    }
    let elements = item
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d as usize))
        .filter(|&n| n <= wire::INPUT_LIMIT)
        .ok_or_else(|| Failure::bad(format!("input '{name}': shape {} is too large", json!(shape))))?;
    Ok((at, elements, batched))
}

/// Appends one input's bytes (little-endian, row-major): its binary data (taken off the
/// front of `binary`) or its JSON `data`.
fn pack_tensor(
    tensor: &Value,
    spec: &TensorSpec,
    elements: usize,
    binary: &mut &[u8],
    out: &mut Vec<u8>,
) -> Result<(), Failure> {
    let name = &spec.name;
    let datatype = spec.datatype.as_str();
    let size = spec.element_size();
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
            "input '{name}': {} elements of data for {elements}",
            values.len()
        )));
    }
    for value in values {
        pack_element(name, datatype, value, out)?;
    }
    Ok(())
}

/// One output as produced: its declaration, its concrete per-item shape, its bytes.
pub(super) type Produced<'a> = (&'a TensorSpec, Vec<u64>, Vec<u8>);

/// The reply's output bytes as the declared outputs. An empty output (the simulated backend
/// computes nothing) becomes zeros of each declared shape (`-1` as 1); real bytes are split
/// in declared order, a `-1` dimension taking what is left when one output has one.
pub(super) fn split_outputs<'a>(declared: &'a [TensorSpec], output: &[u8]) -> Result<Vec<Produced<'a>>, Failure> {
    let concrete = |spec: &TensorSpec| -> Vec<u64> { spec.shape.iter().map(|&d| d.max(1) as u64).collect() };
    if output.is_empty() {
        return Ok(declared
            .iter()
            .map(|spec| {
                let shape = concrete(spec);
                let elements: u64 = shape.iter().product();
                let bytes = vec![0u8; elements as usize * spec.element_size().unwrap_or(4)];
                (spec, shape, bytes)
            })
            .collect());
    }
    let unfit = || {
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!(
                "the executor's output ({} bytes) does not fit the model's declared outputs",
                output.len()
            ),
        )
    };
    if let [spec] = declared {
        if let Some(fixed) = spec.fixed_bytes() {
            return if fixed == output.len() {
                Ok(vec![(spec, concrete(spec), output.to_vec())])
            } else {
                Err(unfit())
            };
        }
        let open = spec.shape.iter().filter(|&&d| d < 0).count();
        let (Some(size), 1) = (spec.element_size(), open) else {
            return Err(unfit());
        };
        let known: u64 = spec.shape.iter().filter(|&&d| d >= 0).map(|&d| d as u64).product();
        let per = known as usize * size;
        if per == 0 || output.len() % per != 0 {
            return Err(unfit());
        }
        let shape = spec
            .shape
            .iter()
            .map(|&d| if d < 0 { (output.len() / per) as u64 } else { d as u64 })
            .collect();
        return Ok(vec![(spec, shape, output.to_vec())]);
    }
    let mut at = 0;
    let mut split = Vec::new();
    for spec in declared {
        let size = spec.fixed_bytes().ok_or_else(unfit)?;
        let bytes = output.get(at..at + size).ok_or_else(unfit)?;
        split.push((spec, concrete(spec), bytes.to_vec()));
        at += size;
    }
    if at != output.len() {
        return Err(unfit());
    }
    Ok(split)
}

/// An output's bytes as JSON `data`.
fn unpack(spec: &TensorSpec, bytes: &[u8]) -> Result<Value, Failure> {
    macro_rules! each {
        ($t:ty, $n:expr) => {
            bytes
                .chunks_exact($n)
                .map(|c| json!(<$t>::from_le_bytes(c.try_into().expect("chunks_exact"))))
                .collect()
        };
    }
    let values: Vec<Value> = match spec.datatype.as_str() {
        "BOOL" => bytes.iter().map(|&b| json!(b != 0)).collect(),
        "UINT8" => bytes.iter().map(|&b| json!(b)).collect(),
        "INT8" => bytes.iter().map(|&b| json!(b as i8)).collect(),
        "UINT16" => each!(u16, 2),
        "INT16" => each!(i16, 2),
        "UINT32" => each!(u32, 4),
        "INT32" => each!(i32, 4),
        "UINT64" => each!(u64, 8),
        "INT64" => each!(i64, 8),
        "FP32" => each!(f32, 4),
        "FP64" => each!(f64, 8),
        other => {
            return Err(Failure::bad(format!(
                "output '{}': {other} data cannot be given as JSON; ask for it as binary data",
                spec.name
            )))
        }
    };
    Ok(Value::Array(values))
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

/// A model's statistics as the statistics extension reports them (over HTTP and gRPC), from
/// its owning shard's metrics.
pub(super) struct ModelStats {
    pub(super) name: String,
    /// Requests that ran (in time or late).
    pub(super) success: u64,
    /// Requests dropped or failed.
    pub(super) fail: u64,
    /// Batches run.
    pub(super) executions: u64,
    /// (count, total ns) of queue and compute durations.
    pub(super) queue: (u64, u64),
    pub(super) compute: (u64, u64),
    /// (batch size, batches) in power-of-two buckets: each size is its bucket's upper bound.
    pub(super) batches: Vec<(u64, u64)>,
}

impl ModelStats {
    pub(super) fn of(shard: &Shard, index: usize) -> ModelStats {
        let snapshot = shard.metrics.model(index);
        let name = shard.core.borrow().catalog().configs[index].name.clone();
        let [success, late, dropped, failed] = snapshot.outcomes;
        let ns = |us: u64| us.saturating_mul(1000);
        let last_bound = crate::metrics::BATCH_BOUNDS[crate::metrics::BATCH_BOUNDS.len() - 1];
        ModelStats {
            name,
            success: success + late,
            fail: dropped + failed,
            executions: snapshot.batches,
            queue: (snapshot.queue_count, ns(snapshot.queue_sum_us)),
            compute: (snapshot.compute_count, ns(snapshot.compute_sum_us)),
            batches: snapshot
                .batch_sizes
                .iter()
                .filter(|&&(_, plans)| plans > 0)
                .map(|&(bound, plans)| (if bound == u64::MAX { last_bound + 1 } else { bound }, plans))
                .collect(),
        }
    }
}

/// Answers a connection refused at the client limit with a 503 and closes it.
pub(super) async fn refuse(stream: Stream, message: String) {
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
        glommio::timer::sleep(REFUSAL_WRITE_TIMEOUT),
    )
    .await;
}

/// A connection's stream (glommio's socket, or TLS over it) under hyper's IO traits.
pub(super) struct Io(pub(super) Stream);

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
