//! Micro-benchmarks of each stage a request crosses, for the budget table of
//! `docs/benchmarks.md`: frame decode and validation, model lookup, the shard's whole path for
//! a request of its own model (enqueue, window update, GPU claim, plan, completion, reply),
//! the same routed through a second shard, a GPU claim and release on the shared table, a
//! plan's encoding and a reply's.
//!
//!     cargo bench -p symphony-perf --bench stages -- --warm-up-time 1 --measurement-time 3

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use symphony_core::policy::{GrantPolicy, ModelConfig, PolicyKind};
use symphony_core::profile::Profile;
use symphony_core::wire::executor::{self as exec, PlanMsg, PlanRequest};
use symphony_core::wire::{self, Frame, FrameDecoder, Kind, ModelRef, ReplyRef, RequestRef, Status, Timings};
use symphony_perf::stress;
use symphony_shards::buffers::ReadBuffer;
use symphony_shards::config::Limits;
use symphony_shards::shard::{Catalog, ConnectionKey, Effect, Effects, Input, Peer, ShardCore, ShardMsg};
use symphony_shards::sync::gpu_table::GpuTable;

const MODELS: usize = 1000;
const GPUS: u32 = 1024;

fn models() -> Vec<ModelConfig> {
    let profile = Profile::parse_linear("sleep#400,2000,0,0", 100_000_000).unwrap();
    (0..MODELS)
        .map(|i| ModelConfig {
            name: format!("m{i}"),
            profile: profile.clone(),
            slo_ns: 100_000_000,
        })
        .collect()
}

fn request_frame(model: &ModelRef) -> Vec<u8> {
    let mut frame = Vec::new();
    let request = RequestRef {
        client_request_id: 7,
        model,
        slo_us: None,
        input: &[],
    };
    wire::encode_request(&mut frame, &request).unwrap();
    frame
}

fn cores(shards: usize) -> Vec<ShardCore> {
    stress::embedded_cores(&models(), GPUS, shards, PolicyKind::Symphony, Limits::default())
}

/// Serves `count` requests through `shards` cores in virtual time (one every 10 us, models in
/// turn, all entering shard 0), with every effect carried out; returns the wall time.
fn serve(cores: &mut [ShardCore], clock: &mut u64, count: u64, payloads: &[Vec<u8>]) -> Duration {
    let client = Peer::Client(ConnectionKey::new(0, 0));
    let buffer = ReadBuffer::new(64, 64);
    let mut fx = Effects::default();
    let mut running: BinaryHeap<Reverse<(u64, usize, u64, u64)>> = BinaryHeap::new();
    let mut mesh: VecDeque<(usize, ShardMsg)> = VecDeque::new();
    let started = Instant::now();
    let apply = |shard: usize, fx: &mut Effects, running: &mut BinaryHeap<_>, mesh: &mut VecDeque<_>| {
        let mut list = std::mem::take(&mut fx.list);
        for effect in list.drain(..) {
            match effect {
                Effect::RunEmbedded(plan) => {
                    running.push(Reverse((plan.finish_ns, shard, plan.plan_id, plan.exec_at_ns)))
                }
                Effect::Send { shard: to, msg } => mesh.push_back((to, msg)),
                _ => {}
            }
        }
        fx.list = list;
        fx.clear();
    };
    for n in 0..count {
        *clock += 10_000;
        let now = *clock;
        let payload = &payloads[n as usize % payloads.len()];
        let frame = Frame {
            kind: Kind::Request,
            payload,
        };
        cores[0].handle(
            now,
            Input::Frame {
                from: client,
                frame: Ok(frame),
                buffer: &buffer,
            },
            &mut fx,
        );
        cores[0].handle(now, Input::ReadDone, &mut fx);
        apply(0, &mut fx, &mut running, &mut mesh);
        while let Some((to, msg)) = mesh.pop_front() {
            cores[to].handle(now, Input::Shard(msg), &mut fx);
            apply(to, &mut fx, &mut running, &mut mesh);
        }
        while let Some(&Reverse((finish, shard, plan_id, start))) = running.peek() {
            if finish > now {
                break;
            }
            running.pop();
            let done = Input::EmbeddedDone {
                plan_id,
                started_ns: start,
                finished_ns: finish,
            };
            cores[shard].handle(now, done, &mut fx);
            apply(shard, &mut fx, &mut running, &mut mesh);
        }
        for (shard, core) in cores.iter_mut().enumerate() {
            if core.next_wake_ns().is_some_and(|t| t <= now) {
                core.handle(now, Input::Timer, &mut fx);
                apply(shard, &mut fx, &mut running, &mut mesh);
            }
        }
        while let Some((to, msg)) = mesh.pop_front() {
            cores[to].handle(now, Input::Shard(msg), &mut fx);
            apply(to, &mut fx, &mut running, &mut mesh);
        }
    }
    started.elapsed()
}

fn stages(c: &mut Criterion) {
    let name = ModelRef::Name("m417".into());
    let frame = request_frame(&name);
    c.bench_function("decode and validate a REQUEST frame", |b| {
        let decoder = FrameDecoder::default();
        b.iter(|| {
            let frame = decoder.frames(black_box(&frame)).next().unwrap().unwrap();
            let request = wire::access_request(frame.payload).unwrap();
            black_box(wire::check_request(request).is_ok())
        })
    });
    let catalog = Catalog::new(&models(), &[], 1);
    let payload = &frame[wire::FRAME_HEADER_SIZE..];
    let request = wire::access_request(payload).unwrap();
    c.bench_function("look a model up by name (1000 models)", |b| {
        b.iter(|| black_box(catalog.lookup(black_box(&request.model))))
    });
    // A shard's own models (1 shard) and models of the other shard (2 shards, every request
    // entering shard 0 for a model shard 1 owns).
    let own: Vec<Vec<u8>> = (0..MODELS)
        .map(|m| request_frame(&ModelRef::Id(m as u32))[wire::FRAME_HEADER_SIZE..].to_vec())
        .collect();
    let remote: Vec<Vec<u8>> = (0..MODELS)
        .filter(|m| m % 2 == 1)
        .map(|m| request_frame(&ModelRef::Id(m as u32))[wire::FRAME_HEADER_SIZE..].to_vec())
        .collect();
    for (label, shards, payloads) in [
        ("the shard's whole path for a request of its own model", 1, &own),
        ("the same, routed to a second shard and its reply back", 2, &remote),
    ] {
        let mut group = cores(shards);
        let mut fx = Effects::default();
        group[0].handle(0, Input::Opened(Peer::Client(ConnectionKey::new(0, 0))), &mut fx);
        let mut clock = 0;
        let _ = serve(&mut group, &mut clock, 20_000, payloads);
        c.bench_function(label, |b| {
            b.iter_custom(|iters| serve(&mut group, &mut clock, iters, payloads))
        });
    }
    let table = GpuTable::new(GPUS as usize, 1);
    let mut finish = 0;
    c.bench_function("claim and release a GPU on the shared table (1024 GPUs)", |b| {
        b.iter(|| {
            let claim = table.claim(0, finish, GrantPolicy::EarliestFree).unwrap();
            finish = claim.free_at_ns() + 1;
            black_box(table.release(claim, finish))
        })
    });
    c.bench_function("the earliest free_at on the shared table (1024 GPUs)", |b| {
        b.iter(|| black_box(table.min_free_at_ns(0)))
    });
    let plan = PlanMsg {
        plan_id: 9,
        gpu: 3,
        model: 417,
        exec_at_ns: 1_000_000,
        finish_ns: 3_000_000,
        requests: (0..16)
            .map(|i| PlanRequest {
                request_id: i,
                input_len: 0,
            })
            .collect(),
    };
    let mut out = Vec::with_capacity(4096);
    c.bench_function("encode a plan of 16 requests", |b| {
        b.iter(|| {
            out.clear();
            black_box(exec::encode_sectioned(&mut out, Kind::ExecPlan, &plan, |_| {}).unwrap())
        })
    });
    let reply = ReplyRef {
        client_request_id: 7,
        status: Status::Ok,
        timings: Timings::default(),
        output: &[],
    };
    c.bench_function("encode a reply", |b| {
        b.iter(|| {
            out.clear();
            black_box(wire::encode_reply(&mut out, &reply).unwrap())
        })
    });
}

criterion_group!(benches, stages);
criterion_main!(benches);
