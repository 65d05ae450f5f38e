//! KServe v2 over gRPC: Triton's `inference.GRPCInferenceService` (`proto/grpc_service.proto`,
//! compiled by prost) on hyper's HTTP/2, on every shard's own thread. tonic needs tokio; this
//! is the thin gRPC layer it would be: a method is the request path, each message a 5-byte
//! prefix (compressed flag, big-endian length) and its protobuf bytes, the status in the
//! trailers (`grpc-status`, `grpc-message`).
//!
//! A gRPC connection is a client connection like an HTTP one ([`Session`]): its slot, its
//! limits, and each inference a native REQUEST through the owning shard's scheduler with one
//! reply. HTTP/2 carries many calls at once on one connection (at most
//! `limits.grpc_streams_per_connection`); `ModelStreamInfer` carries many requests on one call, each
//! answered on the stream as its reply comes, in any order (by `id`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use glommio::channels::local_channel;
use glommio::sync::Semaphore;
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use prost::Message;
use symphony_core::wire::{self, Status};

use super::connection::{Connection, Receivers};
use super::kserve::{self, Failure, Session};
use super::tls::Stream;
use super::Shard;
use crate::shard::ConnectionKey;
use crate::tensors::TensorSpec;

/// The messages of `proto/grpc_service.proto` (the empty requests are never built here).
#[allow(clippy::all, missing_debug_implementations, dead_code)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/inference.rs"));
}

/// The service's path prefix: `/inference.GRPCInferenceService/{Method}`.
const SERVICE: &str = "/inference.GRPCInferenceService/";
/// Bytes of one message: the largest input a frame carries, and room for its framing.
const MESSAGE_LIMIT: usize = wire::INPUT_LIMIT + (64 << 10);

type Body = LocalBody;

/// A response body on this shard's thread (hyper's boxed bodies must be `Send`).
pub(super) struct LocalBody(Pin<Box<dyn hyper::body::Body<Data = Bytes, Error = Infallible>>>);

impl hyper::body::Body for LocalBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0.as_mut().poll_frame(cx)
    }
}

/// gRPC status codes.
mod code {
    pub const OK: u32 = 0;
    pub const INVALID_ARGUMENT: u32 = 3;
    pub const NOT_FOUND: u32 = 5;
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    pub const UNIMPLEMENTED: u32 = 12;
    pub const INTERNAL: u32 = 13;
    pub const UNAVAILABLE: u32 = 14;
}

/// A failed call: its status code and message.
#[derive(Debug)]
struct GrpcError(u32, String);

impl From<Failure> for GrpcError {
    fn from(Failure(status, message): Failure) -> GrpcError {
        let code = match status {
            StatusCode::BAD_REQUEST => code::INVALID_ARGUMENT,
            StatusCode::NOT_FOUND => code::NOT_FOUND,
            StatusCode::PAYLOAD_TOO_LARGE => code::RESOURCE_EXHAUSTED,
            StatusCode::SERVICE_UNAVAILABLE => code::UNAVAILABLE,
            _ => code::INTERNAL,
        };
        GrpcError(code, message)
    }
}

/// hyper's HTTP/2 spawns a task per stream: on this shard's executor.
#[derive(Debug, Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
    F::Output: 'static,
{
    fn execute(&self, future: F) {
        glommio::spawn_local(future).detach();
    }
}

/// Serves one gRPC connection until its peer closes it, the core ends it or the service
/// stops.
pub(super) async fn serve(
    shard: Rc<Shard>,
    key: ConnectionKey,
    stream: Stream,
    connection: Rc<Connection>,
    receivers: Receivers,
) {
    let session = Session::open(&shard, key, connection, receivers.notify);
    let calls = Rc::clone(&session);
    let service = hyper::service::service_fn(move |request| {
        let session = Rc::clone(&calls);
        async move { Ok::<_, Infallible>(answer(session, request).await) }
    });
    let streams = u32::try_from(shard.limits.grpc_streams_per_connection).unwrap_or(u32::MAX);
    let http = hyper::server::conn::http2::Builder::new(LocalExec)
        .max_concurrent_streams(streams)
        .serve_connection(kserve::Io(stream), service);
    session.run(key, http, receivers.stop_reading).await;
}

async fn answer(session: Rc<Session>, request: Request<Incoming>) -> Response<Body> {
    session.mark_active();
    let method = request.uri().path().strip_prefix(SERVICE).unwrap_or("").to_owned();
    if method == "ModelStreamInfer" {
        return stream_infer(session, request.into_body());
    }
    let result = match read_message(request.into_body()).await {
        Ok(message) => unary(&session, &method, &message).await,
        Err(error) => Err(error),
    };
    match result {
        Ok(reply) => call_response(vec![reply], None),
        Err(error) => call_response(Vec::new(), Some(error)),
    }
}

/// The one message of a unary call's body.
async fn read_message(body: Incoming) -> Result<Vec<u8>, GrpcError> {
    let bytes = Limited::new(body, MESSAGE_LIMIT + 5)
        .collect()
        .await
        .map_err(|e| GrpcError(code::RESOURCE_EXHAUSTED, format!("reading the call: {e}")))?
        .to_bytes();
    let mut messages = Vec::new();
    let rest = split_messages(&bytes, &mut messages)?;
    match (messages.len(), rest.is_empty()) {
        (1, true) => Ok(messages.pop().expect("one message")),
        _ => Err(GrpcError(
            code::INVALID_ARGUMENT,
            "a unary call carries exactly one whole message".into(),
        )),
    }
}

/// Takes the whole messages off the front of `bytes`; returns what is left (a partial one).
fn split_messages<'a>(mut bytes: &'a [u8], into: &mut Vec<Vec<u8>>) -> Result<&'a [u8], GrpcError> {
    while bytes.len() >= 5 {
        if bytes[0] != 0 {
            return Err(GrpcError(
                code::UNIMPLEMENTED,
                "compressed messages are not supported (send grpc-encoding identity)".into(),
            ));
        }
        let length = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
        if length > MESSAGE_LIMIT {
            return Err(GrpcError(
                code::RESOURCE_EXHAUSTED,
                format!("a message of {length} bytes is over the limit of {MESSAGE_LIMIT}"),
            ));
        }
        if bytes.len() < 5 + length {
            break;
        }
        into.push(bytes[5..5 + length].to_vec());
        bytes = &bytes[5 + length..];
    }
    Ok(bytes)
}

fn frame_message(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut framed = Vec::with_capacity(5 + body.len());
    framed.push(0);
    framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
    framed.extend_from_slice(&body);
    Bytes::from(framed)
}

fn trailers(error: Option<GrpcError>) -> HeaderMap {
    let mut trailers = HeaderMap::new();
    let (code, message) = match error {
        None => (code::OK, String::new()),
        Some(GrpcError(code, message)) => (code, message),
    };
    trailers.insert("grpc-status", HeaderValue::from(code));
    if !message.is_empty() {
        // Percent-encoded as gRPC asks, so any message is a valid header value.
        let encoded: String = message
            .bytes()
            .map(|b| match b {
                b' '..=b'~' if b != b'%' => (b as char).to_string(),
                other => format!("%{other:02X}"),
            })
            .collect();
        if let Ok(value) = HeaderValue::from_str(&encoded) {
            trailers.insert("grpc-message", value);
        }
    }
    trailers
}

/// A call's response: its messages, then the status in the trailers.
fn call_response(messages: Vec<Bytes>, error: Option<GrpcError>) -> Response<Body> {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = messages.into_iter().map(|m| Ok(Frame::data(m))).collect();
    frames.push(Ok(Frame::trailers(trailers(error))));
    grpc_response(LocalBody(Box::pin(StreamBody::new(futures_lite::stream::iter(frames)))))
}

fn grpc_response(body: Body) -> Response<Body> {
    let mut response = Response::new(body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    response
}

/// A unary call's reply message, framed.
async fn unary(session: &Session, method: &str, message: &[u8]) -> Result<Bytes, GrpcError> {
    let malformed =
        |e: prost::DecodeError| GrpcError(code::INVALID_ARGUMENT, format!("not a valid {method} request: {e}"));
    Ok(match method {
        "ServerLive" => frame_message(&pb::ServerLiveResponse { live: true }),
        "ServerReady" => frame_message(&pb::ServerReadyResponse {
            ready: !session.stopping(),
        }),
        "ModelReady" => {
            let request = pb::ModelReadyRequest::decode(message).map_err(malformed)?;
            let known =
                session.model(&request.name).is_ok() && matches!(request.version.as_str(), "" | kserve::MODEL_VERSION);
            frame_message(&pb::ModelReadyResponse {
                ready: known && !session.stopping(),
            })
        }
        "ServerMetadata" => frame_message(&pb::ServerMetadataResponse {
            name: "symphony".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: kserve::EXTENSIONS.iter().map(|e| e.to_string()).collect(),
        }),
        "ModelMetadata" => {
            let request = pb::ModelMetadataRequest::decode(message).map_err(malformed)?;
            let index = session.model(&request.name)?;
            frame_message(&metadata(session, index))
        }
        "ModelInfer" => {
            let request = pb::ModelInferRequest::decode(message).map_err(malformed)?;
            frame_message(&infer(session, request).await?)
        }
        "ModelConfig" => {
            let request = pb::ModelConfigRequest::decode(message).map_err(malformed)?;
            let index = session.model(&request.name)?;
            frame_message(&pb::ModelConfigResponse {
                config: Some(config(session, index)),
            })
        }
        "ModelStatistics" => {
            let request = pb::ModelStatisticsRequest::decode(message).map_err(malformed)?;
            // No name: every model's.
            let indices = match request.name.as_str() {
                "" => (0..session.shard().core.borrow().catalog().models.len()).collect(),
                name => vec![session.model(name)?],
            };
            frame_message(&pb::ModelStatisticsResponse {
                model_stats: indices.into_iter().map(|index| statistics(session, index)).collect(),
            })
        }
        other => {
            return Err(GrpcError(
                code::UNIMPLEMENTED,
                format!("method '{other}' is not served (see docs/protocol.md)"),
            ))
        }
    })
}

fn metadata(session: &Session, index: usize) -> pb::ModelMetadataResponse {
    let shard = session.shard();
    let core = shard.core.borrow();
    let catalog = core.catalog();
    let list = |tensors: &[TensorSpec]| -> Vec<pb::model_metadata_response::TensorMetadata> {
        tensors
            .iter()
            .map(|t| pb::model_metadata_response::TensorMetadata {
                name: t.name.clone(),
                datatype: t.datatype.clone(),
                shape: std::iter::once(-1).chain(t.shape.iter().copied()).collect(),
            })
            .collect()
    };
    let tensors = &catalog.tensors[index];
    pb::ModelMetadataResponse {
        name: catalog.configs[index].name.clone(),
        versions: vec![kserve::MODEL_VERSION.into()],
        platform: "symphony".into(),
        inputs: list(&tensors.inputs),
        outputs: list(&tensors.outputs),
    }
}

/// The model configuration (the part of Triton's `ModelConfig` that applies): what
/// `perf_analyzer` reads.
fn config(session: &Session, index: usize) -> pb::ModelConfig {
    let shard = session.shard();
    let core = shard.core.borrow();
    let catalog = core.catalog();
    let data_type = |t: &TensorSpec| {
        pb::DataType::from_str_name(&t.config_type()).map_or(pb::DataType::TypeInvalid as i32, |d| d as i32)
    };
    let tensors = &catalog.tensors[index];
    let config = &catalog.configs[index];
    pb::ModelConfig {
        name: config.name.clone(),
        platform: "symphony".into(),
        backend: "symphony".into(),
        max_batch_size: i32::try_from(config.profile.batch_size_max()).unwrap_or(i32::MAX),
        input: tensors
            .inputs
            .iter()
            .map(|t| pb::ModelInput {
                name: t.name.clone(),
                data_type: data_type(t),
                dims: t.shape.clone(),
            })
            .collect(),
        output: tensors
            .outputs
            .iter()
            .map(|t| pb::ModelOutput {
                name: t.name.clone(),
                data_type: data_type(t),
                dims: t.shape.clone(),
            })
            .collect(),
    }
}

/// The statistics extension's entry for model `index`, as over HTTP.
fn statistics(session: &Session, index: usize) -> pb::ModelStatistics {
    let stats = kserve::ModelStats::of(session.shard(), index);
    let duration = |(count, ns): (u64, u64)| Some(pb::StatisticDuration { count, ns });
    pb::ModelStatistics {
        name: stats.name,
        version: kserve::MODEL_VERSION.into(),
        last_inference: 0,
        inference_count: stats.success,
        execution_count: stats.executions,
        inference_stats: Some(pb::InferStatistics {
            success: duration((stats.success, 0)),
            fail: duration((stats.fail, 0)),
            queue: duration(stats.queue),
            compute_input: duration((0, 0)),
            compute_infer: duration(stats.compute),
            compute_output: duration((0, 0)),
            cache_hit: None,
            cache_miss: None,
        }),
        batch_stats: stats
            .batches
            .iter()
            .map(|&(batch_size, plans)| pb::InferBatchStatistics {
                batch_size,
                compute_input: None,
                compute_infer: duration((plans, 0)),
                compute_output: None,
            })
            .collect(),
    }
}

/// One inference: the inputs checked against the model's declaration and packed, the
/// request through the scheduler, the outputs as `raw_output_contents`.
async fn infer(session: &Session, request: pb::ModelInferRequest) -> Result<pb::ModelInferResponse, GrpcError> {
    let index = session.model(&request.model_name)?;
    if !matches!(request.model_version.as_str(), "" | kserve::MODEL_VERSION) {
        return Err(GrpcError(
            code::NOT_FOUND,
            format!("Request for unknown model version: '{}'", request.model_version),
        ));
    }
    let tensors = session.shard().core.borrow().catalog().tensors[index].clone();
    let slo_us = match request
        .parameters
        .get("timeout")
        .and_then(|p| p.parameter_choice.as_ref())
    {
        None => None,
        Some(pb::infer_parameter::ParameterChoice::Int64Param(us)) if *us >= 0 => Some(*us as u64),
        Some(pb::infer_parameter::ParameterChoice::Uint64Param(us)) => Some(*us),
        Some(_) => {
            return Err(GrpcError(
                code::INVALID_ARGUMENT,
                "parameter 'timeout' must be a whole number of microseconds".into(),
            ))
        }
    }
    .map(|us| u32::try_from(us).unwrap_or(u32::MAX).max(1));
    if !request.raw_input_contents.is_empty() && request.raw_input_contents.len() != request.inputs.len() {
        return Err(GrpcError(
            code::INVALID_ARGUMENT,
            format!(
                "{} raw_input_contents for {} inputs",
                request.raw_input_contents.len(),
                request.inputs.len()
            ),
        ));
    }
    let mut packed: Vec<Option<Vec<u8>>> = vec![None; tensors.inputs.len()];
    let mut batched = false;
    for (at, tensor) in request.inputs.iter().enumerate() {
        let shape: Vec<u64> = tensor
            .shape
            .iter()
            .map(|&d| u64::try_from(d))
            .collect::<Result<_, _>>()
            .map_err(|_| {
                GrpcError(
                    code::INVALID_ARGUMENT,
                    format!("input '{}': a negative dimension", tensor.name),
                )
            })?;
        let (slot, elements, with_batch) =
            kserve::check_input(&tensors.inputs, &tensor.name, &tensor.datatype, &shape)?;
        batched |= with_batch;
        if packed[slot].is_some() {
            return Err(GrpcError(
                code::INVALID_ARGUMENT,
                format!("input '{}' is there twice", tensor.name),
            ));
        }
        let spec = &tensors.inputs[slot];
        let bytes = match request.raw_input_contents.get(at) {
            Some(raw) => raw.clone(),
            None => contents_bytes(spec, tensor.contents.as_ref())?,
        };
        if let Some(size) = spec.element_size() {
            if bytes.len() != elements * size {
                return Err(GrpcError(
                    code::INVALID_ARGUMENT,
                    format!(
                        "input '{}': {} bytes for {elements} {} elements",
                        spec.name,
                        bytes.len(),
                        spec.datatype
                    ),
                ));
            }
        }
        packed[slot] = Some(bytes);
    }
    let mut input = Vec::new();
    for (spec, bytes) in tensors.inputs.iter().zip(packed) {
        let bytes =
            bytes.ok_or_else(|| GrpcError(code::INVALID_ARGUMENT, format!("input '{}' is missing", spec.name)))?;
        input.extend_from_slice(&bytes);
    }
    let requested: Vec<usize> = if request.outputs.is_empty() {
        (0..tensors.outputs.len()).collect()
    } else {
        request
            .outputs
            .iter()
            .map(|o| {
                tensors
                    .outputs
                    .iter()
                    .position(|t| t.name == o.name)
                    .ok_or_else(|| GrpcError(code::INVALID_ARGUMENT, format!("unknown output '{}'", o.name)))
            })
            .collect::<Result<_, _>>()?
    };
    let reply = session.submit(&request.model_name, slo_us, &input).await?;
    if reply.status != Status::Ok {
        return Err(kserve::status_failure(reply.status, &request.model_name).into());
    }
    let produced = kserve::split_outputs(&tensors.outputs, &reply.output)?;
    let mut response = pb::ModelInferResponse {
        model_name: request.model_name.clone(),
        model_version: kserve::MODEL_VERSION.into(),
        id: request.id.clone(),
        ..Default::default()
    };
    for at in requested {
        let (spec, shape, bytes) = &produced[at];
        let mut shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        if batched {
            shape.insert(0, 1);
        }
        response.outputs.push(pb::model_infer_response::InferOutputTensor {
            name: spec.name.clone(),
            datatype: spec.datatype.clone(),
            shape,
            ..Default::default()
        });
        response.raw_output_contents.push(bytes.clone());
    }
    Ok(response)
}

/// A typed `contents` as the little-endian bytes the scheduler carries.
fn contents_bytes(spec: &TensorSpec, contents: Option<&pb::InferTensorContents>) -> Result<Vec<u8>, GrpcError> {
    let Some(c) = contents else {
        return Err(GrpcError(
            code::INVALID_ARGUMENT,
            format!("input '{}' has neither contents nor raw_input_contents", spec.name),
        ));
    };
    let mut out = Vec::new();
    macro_rules! put {
        ($values:expr, $t:ty) => {
            for &v in $values {
                out.extend_from_slice(&(v as $t).to_le_bytes());
            }
        };
    }
    match spec.datatype.as_str() {
        "BOOL" => out.extend(c.bool_contents.iter().map(|&b| u8::from(b))),
        "UINT8" => put!(&c.uint_contents, u8),
        "UINT16" => put!(&c.uint_contents, u16),
        "UINT32" => put!(&c.uint_contents, u32),
        "UINT64" => put!(&c.uint64_contents, u64),
        "INT8" => put!(&c.int_contents, i8),
        "INT16" => put!(&c.int_contents, i16),
        "INT32" => put!(&c.int_contents, i32),
        "INT64" => put!(&c.int64_contents, i64),
        "FP32" => put!(&c.fp32_contents, f32),
        "FP64" => put!(&c.fp64_contents, f64),
        "BYTES" => {
            for b in &c.bytes_contents {
                out.extend_from_slice(&(b.len() as u32).to_le_bytes());
                out.extend_from_slice(b);
            }
        }
        other => {
            return Err(GrpcError(
                code::INVALID_ARGUMENT,
                format!("input '{}': {other} needs raw_input_contents", spec.name),
            ))
        }
    }
    Ok(out)
}

/// `ModelStreamInfer`: each request on the call is served as it arrives; each reply goes out
/// on the stream when it comes (a failed request as an `error_message`); the call ends with
/// status OK once the client has closed its side and every request is answered.
fn stream_infer(session: Rc<Session>, body: Incoming) -> Response<Body> {
    // `limits.grpc_stream_requests` bounds the call's requests not yet answered and its answers
    // not yet taken by the client: past it the call's body is not read (HTTP/2 flow control
    // holds the client), so a client that sends and never reads holds bounded memory.
    let limit = session.shard().limits.grpc_stream_requests.max(1);
    let (sender, receiver) = local_channel::new_bounded::<Frame<Bytes>>(limit);
    let sender = Rc::new(sender);
    let room = Rc::new(Semaphore::new(limit as u64));
    glommio::spawn_local(async move {
        let mut body = body;
        let mut buffer: Vec<u8> = Vec::new();
        let mut failure = None;
        loop {
            let frame = match body.frame().await {
                None => break,
                Some(Err(e)) => {
                    failure = Some(GrpcError(code::INVALID_ARGUMENT, format!("reading the stream: {e}")));
                    break;
                }
                Some(Ok(frame)) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            buffer.extend_from_slice(&data);
            let mut messages = Vec::new();
            let rest = match split_messages(&buffer, &mut messages) {
                Ok(rest) => rest.to_vec(),
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            };
            buffer = rest;
            for message in messages {
                let Ok(permit) = room.acquire_static_permit(1).await else {
                    break;
                };
                let session = Rc::clone(&session);
                let sender = Rc::clone(&sender);
                glommio::spawn_local(async move {
                    let reply = match pb::ModelInferRequest::decode(message.as_slice()) {
                        Err(e) => pb::ModelStreamInferResponse {
                            error_message: format!("not a valid ModelInferRequest: {e}"),
                            infer_response: None,
                        },
                        Ok(request) => {
                            let id = request.id.clone();
                            match infer(&session, request).await {
                                Ok(response) => pb::ModelStreamInferResponse {
                                    error_message: String::new(),
                                    infer_response: Some(response),
                                },
                                Err(GrpcError(_, message)) => pb::ModelStreamInferResponse {
                                    error_message: message,
                                    infer_response: Some(pb::ModelInferResponse {
                                        id,
                                        ..Default::default()
                                    }),
                                },
                            }
                        }
                    };
                    let _ = sender.send(Frame::data(frame_message(&reply))).await;
                    drop(permit);
                })
                .detach();
            }
        }
        // Every request answered (each holds a unit until its answer is queued), then the status.
        let _ = room.acquire(limit as u64).await;
        let _ = sender.send(Frame::trailers(trailers(failure))).await;
    })
    .detach();
    let frames = futures_lite::stream::unfold(receiver, |receiver| async move {
        let frame = receiver.recv().await?;
        Some((Ok::<_, Infallible>(frame), receiver))
    });
    grpc_response(LocalBody(Box::pin(StreamBody::new(frames))))
}

impl Session {
    fn stopping(&self) -> bool {
        self.shard().stop.load(Ordering::Relaxed)
    }
}
