//! A served request allocates nothing in steady state on its shard: REQUEST frames in through
//! `ShardCore::handle`, plans to the embedded executors, completions, replies out, with a
//! counting allocator over the whole path (the core's decisions, the pending table, the
//! plans' bookkeeping, the replies' encoding), not only the policy's.
//!
//! The harness is a driver in virtual time that allocates nothing itself once warm (its
//! queues are reserved ahead). With two shards, routed requests and replies cross in
//! batches; a shard reuses the emptied batches it receives for the ones it sends.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::Ordering;

use symphony_core::policy::PolicyKind;
use symphony_core::profile::Profile;
use symphony_core::wire::{self, Frame, FrameDecoder, Kind, ModelRef, Status};
use symphony_perf::stress;
use symphony_shards::buffers::ReadBuffer;
use symphony_shards::config::Limits;
use symphony_shards::shard::{ConnectionKey, Effect, Effects, Input, Peer, ShardMsg};

mod counting;

use counting::{ALLOCATIONS, COUNTING};

const MS: u64 = 1_000_000;

/// What a served run counted: requests and allocations in its counted window, OK replies over
/// the whole run.
#[derive(Debug)]
struct Counted {
    requests: u64,
    ok_replies_whole_run: u64,
    allocations: u64,
}

/// `shards` shard cores in virtual time, 50 models on 64 GPUs, one client per shard sending a
/// request every `gap_ns` (models in turn); allocations counted from `count_from_ns` on.
fn serve(shards: usize, gap_ns: u64, end_ns: u64, count_from_ns: u64) -> Counted {
    let slo_ns = 100 * MS;
    let profile = Profile::parse_linear("sleep#400,2000,0,0", slo_ns).unwrap();
    let models = stress::uniform_models(50, &profile, slo_ns);
    let mut cores = stress::embedded_cores(&models, 64, shards, PolicyKind::Symphony, Limits::default());
    // The prepared request frames (payloads), one per model.
    let payloads: Vec<Vec<u8>> = (0..models.len())
        .map(|m| stress::request_payload(m as u64, &ModelRef::Id(m as u32)))
        .collect();
    let buffer = ReadBuffer::new(64, 64);
    let client = Peer::Client(ConnectionKey::new(0, 0));
    let mut fx = Effects::default();
    // The driver's queues, reserved ahead: embedded plans (finish, shard, plan, start) and
    // messages between shards (to, message).
    let mut running: BinaryHeap<Reverse<(u64, usize, u64, u64)>> = BinaryHeap::with_capacity(1 << 16);
    let mut mesh: VecDeque<(usize, ShardMsg)> = VecDeque::with_capacity(1 << 16);
    let mut counted = Counted {
        requests: 0,
        ok_replies_whole_run: 0,
        allocations: 0,
    };
    let mut next_arrival_ns = 0;
    let mut sent = 0u64;
    let apply = |shard: usize,
                 fx: &mut Effects,
                 running: &mut BinaryHeap<Reverse<(u64, usize, u64, u64)>>,
                 mesh: &mut VecDeque<(usize, ShardMsg)>,
                 ok: &mut u64| {
        let mut list = std::mem::take(&mut fx.list);
        for effect in list.drain(..) {
            match effect {
                Effect::Write { bytes, .. } => {
                    for frame in FrameDecoder::default().frames(&fx.bytes[bytes]).flatten() {
                        let reply = wire::access_reply(frame.payload).unwrap();
                        *ok += u64::from(frame.kind == Kind::Reply && reply.status == Status::Ok);
                    }
                }
                Effect::RunEmbedded(plan) => {
                    running.push(Reverse((plan.finish_ns, shard, plan.plan_id, plan.exec_at_ns)));
                }
                Effect::Send { shard: to, msg } => mesh.push_back((to, msg)),
                Effect::Close { .. } | Effect::Log(_) => {}
            }
        }
        fx.list = list;
        fx.clear();
    };
    for (id, core) in cores.iter_mut().enumerate() {
        core.handle(0, Input::Opened(client), &mut fx);
        apply(id, &mut fx, &mut running, &mut mesh, &mut counted.ok_replies_whole_run);
    }
    loop {
        let completion_ns = running.peek().map(|Reverse(r)| r.0);
        let timer = cores
            .iter_mut()
            .enumerate()
            .filter_map(|(id, c)| c.next_wake_ns().map(|t| (t, id)))
            .min();
        let arrival = (next_arrival_ns < end_ns).then_some(next_arrival_ns);
        let now_ns = [completion_ns, timer.map(|t| t.0), arrival].into_iter().flatten().min();
        let Some(now_ns) = now_ns else { break };
        if now_ns > end_ns + 2 * slo_ns {
            break;
        }
        COUNTING.store(now_ns >= count_from_ns, Ordering::Relaxed);
        // The shard that handled this step's input; its effects are carried out below.
        let handled = if let Some((to, msg)) = mesh.pop_front() {
            cores[to].handle(now_ns, Input::Shard(msg), &mut fx);
            to
        } else if completion_ns == Some(now_ns) {
            let Reverse((finish, shard, plan_id, start)) = running.pop().unwrap();
            let done = Input::EmbeddedDone {
                plan_id,
                started_ns: start,
                finished_ns: finish,
            };
            cores[shard].handle(now_ns, done, &mut fx);
            shard
        } else if arrival == Some(now_ns) {
            let shard = (sent % shards as u64) as usize;
            let model = (sent / shards as u64 + sent) as usize % payloads.len();
            let frame = Frame {
                kind: Kind::Request,
                payload: &payloads[model],
            };
            let input = Input::Frame {
                from: client,
                frame: Ok(frame),
                buffer: &buffer,
            };
            cores[shard].handle(now_ns, input, &mut fx);
            cores[shard].handle(now_ns, Input::ReadDone, &mut fx);
            counted.requests += u64::from(now_ns >= count_from_ns);
            sent += 1;
            next_arrival_ns += gap_ns;
            shard
        } else {
            let (_, shard) = timer.expect("the step's time is a timer's");
            cores[shard].handle(now_ns, Input::Timer, &mut fx);
            shard
        };
        apply(
            handled,
            &mut fx,
            &mut running,
            &mut mesh,
            &mut counted.ok_replies_whole_run,
        );
        COUNTING.store(false, Ordering::Relaxed);
    }
    counted.allocations = ALLOCATIONS.swap(0, Ordering::Relaxed);
    counted
}

#[test]
fn a_served_request_allocates_nothing_on_its_shard() {
    // The counter counts (the only test of this binary: nothing else allocates meanwhile).
    ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    let probe = std::hint::black_box(Vec::<u64>::with_capacity(8));
    COUNTING.store(false, Ordering::Relaxed);
    drop(probe);
    assert_eq!(
        ALLOCATIONS.swap(0, Ordering::Relaxed),
        1,
        "the counting allocator counts"
    );
    // 20,000 req/s on one shard for 4 s; counted over the last 2 s, once every table grew.
    let one = serve(1, 50_000, 4_000 * MS, 2_000 * MS);
    assert!(one.requests > 35_000, "{one:?}");
    assert!(one.ok_replies_whole_run > 0, "{one:?}");
    assert_eq!(one.allocations, 0, "one shard allocated while serving: {one:?}");
    // Two shards: half the requests cross, in batches that go back and forth.
    let two = serve(2, 50_000, 4_000 * MS, 2_000 * MS);
    assert!(two.requests > 35_000 && two.ok_replies_whole_run > 0, "{two:?}");
    assert_eq!(two.allocations, 0, "two shards allocated while serving: {two:?}");
}
