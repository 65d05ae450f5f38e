//! Micro-benchmarks of each stage a request crosses, for the budget table of
//! `docs/benchmarks.md`: frame decode and validation, model lookup, the shard's whole path for
//! a request of its own model (enqueue, window update, GPU claim, plan, completion, reply),
//! the same routed through a second shard, a GPU claim and release on the shared table, a
//! plan's encoding and a reply's.
//!
//!     cargo bench -p symphony-perf --bench stages -- --warm-up-time 1 --measurement-time 3

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use symphony_core::policy::{GrantPolicy, ModelConfig, PolicyKind};
use symphony_core::profile::Profile;
use symphony_core::wire::executor::{self as exec, PlanMsg, PlanRequest};
use symphony_core::wire::{self, FrameDecoder, Kind, ModelRef, ReplyRef, RequestRef, Status, Timings};
use symphony_perf::stress;
use symphony_perf::virtual_door::VirtualDoor;
use symphony_shards::config::Limits;
use symphony_shards::shard::{Catalog, ShardCore};
use symphony_shards::sync::gpu_table::GpuTable;

const MODELS: usize = 1000;
const GPUS: u32 = 1024;
/// Requests served before the front door's load is timed: a second of it, so the held
/// requests and the models' queues are at their steady size.
const HOT_WARMUP: u64 = 1_000_000;

fn models() -> Vec<ModelConfig> {
    let profile = Profile::parse_linear("sleep#400,2000,0,0", 100_000_000).unwrap();
    stress::uniform_models(MODELS, &profile, 100_000_000)
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
        .map(|m| stress::request_payload(7, &ModelRef::Id(m as u32)))
        .collect();
    let remote: Vec<Vec<u8>> = (0..MODELS)
        .filter(|m| m % 2 == 1)
        .map(|m| stress::request_payload(7, &ModelRef::Id(m as u32)))
        .collect();
    for (label, shards, payloads) in [
        ("the shard's whole path for a request of its own model", 1, &own),
        ("the same, routed to a second shard and its reply back", 2, &remote),
    ] {
        let mut door = VirtualDoor::new(cores(shards));
        let _ = door.serve(20_000, 10_000, 1, payloads);
        c.bench_function(label, |b| b.iter_custom(|iters| door.serve(iters, 10_000, 1, payloads)));
    }
    // The front door's load: a million requests a second by name, 64 frames to a read (about
    // 55,000 requests held at once, most of them out of cache when they are answered).
    let named: Vec<Vec<u8>> = (0..MODELS)
        .map(|m| stress::request_payload(7, &ModelRef::Name(format!("m{m}"))))
        .collect();
    let mut door = VirtualDoor::new(cores(1));
    let _ = door.serve(HOT_WARMUP, 1_000, 64, &named);
    c.bench_function(
        "the shard's whole path at 1,000,000 req/s, by name, 64 frames a read",
        |b| b.iter_custom(|iters| door.serve(iters, 1_000, 64, &named)),
    );
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
