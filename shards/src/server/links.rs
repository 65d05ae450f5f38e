//! Executor links: the handshake of an executor on the front door (HELLO, PROBE, REGISTER),
//! one link per shard and executor (JOIN), plans out, results back, heartbeats, and what
//! happens when an executor is lost or a plan hangs.
//!
//! The protocol is `symphony_core::wire::executor` (and `docs/protocol.md`). Each shard
//! listens for links on a port of its own, so every shard sends its plans on its own
//! connection and gets its results there, with no cross-shard hop. The registry
//! (`crate::executors`) maps GPU table slots to executors; an executor's GPUs go online in
//! the table when its last link joins, and offline as soon as one shard loses it.
//!
//! Trust: a JOIN needs the token and the secret its executor got in WELCOME, and a shard
//! takes one link per executor; a link that has not joined within the handshake timeout is
//! closed. Loss: a link that closes, breaks the protocol (any frame it must not send, a
//! RESULT that does not match its plan), stays silent past the heartbeat timeout or stops
//! taking its plans loses its executor on every shard (`ShardMsg::ExecutorLost`). Each
//! shard then re-plans the requests of its unfinished plans on that executor whose deadline
//! still allows one batch, and answers the others `executor lost`. A plan not reported by
//! its finish plus `plan_timeout_ms` is lost alone: its requests are re-planned or answered,
//! and its GPU leaves planning until that plan's RESULT comes after all.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_lite::io::AsyncReadExt;
use glommio::net::{TcpListener, TcpStream};
use symphony_core::policy::{Completion, Plan, Policy};
use symphony_core::profile::Profile;
use symphony_core::request::Request;
use symphony_core::wire::executor::{
    self as exec, Heartbeat, Hello, Join, Joined, ModelInfo, PlanRequest, PlanStatus, Probe, ProbeReply, ProfileWire,
    Register, Registered, Welcome,
};
use symphony_core::wire::{self, ErrorCode, FrameDecoder, Kind, Status};

use super::buffers::{ReadBuffer, READ_BUFFER_INITIAL_BYTES};
use super::connection::{self, frame_limit, Admission, Connection, Receivers};
use super::pending::RequestKey;
use super::{zerocopy, ConnectionKey, Shard, ShardMsg};
use crate::executors::{for_log, NAME_LOG_LIMIT};

type Refusal = (ErrorCode, String);

/// Bytes of an executor's message (a failed or refused batch) shown in a log line.
const MESSAGE_LOG_LIMIT: usize = 256;

fn malformed(error: wire::WireError) -> Refusal {
    (ErrorCode::Malformed, error.to_string())
}

fn refused(error: impl std::fmt::Display) -> Refusal {
    (ErrorCode::Refused, error.to_string())
}

/// Frames an executor sends on the front door before its links exist.
pub(super) fn is_control_kind(kind: Kind) -> bool {
    matches!(kind, Kind::ExecHello | Kind::ExecProbe | Kind::ExecRegister)
}

/// What a front-door connection knows of the executor behind it.
#[derive(Debug, Default)]
pub(super) struct Control {
    executor: Option<u32>,
    /// Its GPUs' own indices, from HELLO.
    locals: Vec<u32>,
    registered: bool,
}

/// A plan sent on a link and not answered yet.
#[derive(Debug)]
struct InFlight {
    model: u32,
    gpu: u32,
    batch_size: u32,
    ids: Vec<u64>,
    /// Unreported past this, the plan is lost (its finish plus the plan timeout).
    overdue_at_ns: u64,
}

/// One shard's link to one executor.
#[derive(Debug)]
pub(super) struct Link {
    executor: u32,
    conn: Rc<Connection>,
    inflight: RefCell<HashMap<u64, InFlight>>,
    /// Plans that passed their timeout, by id: their GPU (it is out of planning until the
    /// RESULT comes after all).
    overdue: RefCell<HashMap<u64, u32>>,
    last_seen_ns: Cell<u64>,
}

/// How sending a plan went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum PlanSent {
    Sent,
    /// The GPU's executor has no link here (lost): re-plan the requests.
    NoLink,
    /// The executor's link queue is full: it is lost; re-plan the requests.
    Overflow(u32),
}

impl Shard {
    /// HELLO, PROBE and REGISTER on the front door.
    pub(super) fn on_control(
        self: &Rc<Self>,
        control: &mut Control,
        connection: &Rc<Connection>,
        kind: Kind,
        payload: &[u8],
    ) -> Result<(), Refusal> {
        let mut out = connection.out.borrow_mut();
        match kind {
            Kind::ExecHello => {
                if control.executor.is_some() {
                    return Err((ErrorCode::UnexpectedKind, "HELLO comes once".to_string()));
                }
                let hello = exec::access::<Hello>(kind, payload).map_err(malformed)?;
                self.executors
                    .authorize(hello.token.as_str())
                    .map_err(|e| (ErrorCode::Unauthorized, e.to_string()))?;
                let locals: Vec<u32> = hello.gpus.iter().map(|g| g.index.to_native()).collect();
                let mut sorted = locals.clone();
                sorted.sort_unstable();
                sorted.dedup();
                if sorted.len() != locals.len() || locals.len() > exec::EXECUTOR_GPUS_LIMIT {
                    return Err(refused(format!(
                        "1 to {} GPUs with distinct indices",
                        exec::EXECUTOR_GPUS_LIMIT
                    )));
                }
                let links = self
                    .link_addrs
                    .get()
                    .cloned()
                    .ok_or_else(|| refused("the scheduler is starting up; try again"))?;
                let (id, secret) = self
                    .executors
                    .hello(hello.name.as_str(), locals.len())
                    .map_err(refused)?;
                let models = self
                    .catalog
                    .configs
                    .iter()
                    .enumerate()
                    .map(|(index, m)| ModelInfo {
                        id: index as u32,
                        name: m.name.clone(),
                        slo_us: m.slo_ns / 1000,
                        profile: ProfileWire::of(&m.profile),
                    })
                    .collect();
                let welcome = Welcome {
                    executor_id: id,
                    secret,
                    links,
                    models,
                };
                exec::encode(&mut out, Kind::ExecWelcome, &welcome).map_err(malformed)?;
                control.executor = Some(id);
                control.locals = locals;
            }
            Kind::ExecProbe => {
                if control.executor.is_none() {
                    return Err((ErrorCode::UnexpectedKind, "PROBE after HELLO".to_string()));
                }
                let probe = exec::access::<Probe>(kind, payload).map_err(malformed)?;
                let reply = ProbeReply {
                    sequence: probe.sequence.to_native(),
                    sent_local_ns: probe.sent_local_ns.to_native(),
                    scheduler_ns: self.now_ns(),
                };
                exec::encode(&mut out, Kind::ExecProbeReply, &reply).map_err(malformed)?;
            }
            Kind::ExecRegister => {
                let Some(id) = control.executor.filter(|_| !control.registered) else {
                    return Err((ErrorCode::UnexpectedKind, "REGISTER once, after HELLO".to_string()));
                };
                let register = exec::access::<Register>(kind, payload).map_err(malformed)?;
                let configs = &self.catalog.configs;
                let mut profiles: Vec<Option<Profile>> = vec![None; configs.len()];
                for m in register.models.iter() {
                    let model = m.model.to_native() as usize;
                    let slot = profiles
                        .get_mut(model)
                        .ok_or_else(|| refused(format!("no model has id {model}")))?;
                    let profile = m
                        .profile
                        .to_profile()
                        .map_err(|e| refused(format!("model `{}`: {e}", configs[model].name)))?;
                    *slot = Some(profile);
                }
                if let Some(missing) = profiles.iter().position(Option::is_none) {
                    return Err(refused(format!(
                        "the executor does not run model `{}` (every executor runs every model)",
                        configs[missing].name
                    )));
                }
                let profiles = profiles.into_iter().flatten().collect();
                self.executors
                    .register(id, &control.locals, profiles)
                    .map_err(refused)?;
                exec::encode(&mut out, Kind::ExecRegistered, &Registered { executor_id: id }).map_err(malformed)?;
                control.registered = true;
            }
            _ => unreachable!("is_control_kind"),
        }
        drop(out);
        connection.wake_writer();
        Ok(())
    }

    /// The control connection closed: an executor that did not get every link up is gone.
    pub(super) fn control_closed(self: &Rc<Self>, control: &Control) {
        if let Some(id) = control.executor {
            if !self.executors.is_online(id) {
                self.executor_lost(id, true, "its handshake ended before every link joined");
            }
        }
    }

    /// Plans this shard's models with the slowest profile of the live executors.
    fn apply_planning_profiles(&self) {
        let Some(profiles) = self.executors.planning_profiles(self.catalog.configs.len()) else {
            return;
        };
        let mut scheduler = self.scheduler.borrow_mut();
        for (local, &global) in self.catalog.owned[self.id as usize].iter().enumerate() {
            scheduler.set_profile(local as u32, profiles[global as usize].clone());
        }
    }

    /// JOIN: the first frame of a link.
    fn on_join(self: &Rc<Self>, connection: &Rc<Connection>, payload: &[u8]) -> Result<Rc<Link>, Refusal> {
        let join = exec::access::<Join>(Kind::ExecJoin, payload).map_err(malformed)?;
        self.executors
            .authorize(join.token.as_str())
            .map_err(|e| (ErrorCode::Unauthorized, e.to_string()))?;
        if join.shard.to_native() != self.id {
            return Err(refused(format!(
                "a JOIN for shard {} reached shard {}",
                join.shard.to_native(),
                self.id
            )));
        }
        let executor = join.executor_id.to_native();
        let outcome = self
            .executors
            .join(executor, self.id, &join.secret, self.now_ns())
            .map_err(refused)?;
        let now_ns = self.now_ns();
        let link = Rc::new(Link {
            executor,
            conn: Rc::clone(connection),
            inflight: RefCell::new(HashMap::new()),
            overdue: RefCell::new(HashMap::new()),
            last_seen_ns: Cell::new(now_ns),
        });
        self.links.borrow_mut().insert(executor, Rc::clone(&link));
        self.apply_planning_profiles();
        exec::encode(
            &mut connection.out.borrow_mut(),
            Kind::ExecJoined,
            &Joined { shard: self.id },
        )
        .map_err(malformed)?;
        connection.wake_writer();
        if let Some((slots, handoffs)) = outcome.online {
            let mut scheduler = self.scheduler.borrow_mut();
            for shard in handoffs {
                scheduler.gpus_mut().push_handoff(shard);
            }
            drop(scheduler);
            if !slots.is_empty() {
                eprintln!(
                    "symphony serve: executor {executor} ({}) online with {} GPUs",
                    outcome.name,
                    slots.len()
                );
            }
        }
        glommio::spawn_local(heartbeat_watch(Rc::clone(self), Rc::clone(&link))).detach();
        self.on_timer();
        Ok(link)
    }

    /// Sends `plan` to the executor of its GPU.
    pub(super) fn send_plan(&self, plan: &Plan, requests: &[Request]) -> PlanSent {
        let Some(owner) = self.executors.owner_of(plan.gpu) else {
            return PlanSent::NoLink;
        };
        let Some(link) = self.links.borrow().get(&owner.executor).cloned() else {
            return PlanSent::NoLink;
        };
        if link.conn.is_dead() {
            return PlanSent::NoLink;
        }
        let mut msg = self.plan_msg.borrow_mut();
        msg.plan_id = plan.plan_id;
        msg.gpu = owner.local;
        msg.model = self.catalog.owned[self.id as usize][plan.model as usize];
        msg.exec_at_ns = plan.exec_at_ns;
        msg.finish_ns = plan.finish_ns;
        msg.requests.clear();
        let pending = self.pending.borrow();
        let input_of = |id: u64| {
            pending
                .get(RequestKey::of_id(id))
                .and_then(|p| p.input.as_ref())
                .map(|s| s.bytes())
        };
        msg.requests.extend(requests.iter().map(|r| PlanRequest {
            request_id: r.id,
            input_len: input_of(r.id).map_or(0, |bytes| bytes.len() as u32),
        }));
        let section_len: usize = msg.requests.iter().map(|r| r.input_len as usize).sum();
        // Room for the frame's head too (a few bytes per request).
        let frame_len = section_len + 64 + 12 * requests.len();
        if link.conn.queued_bytes() + frame_len > self.limits.link_write_buffer_bytes {
            return PlanSent::Overflow(owner.executor);
        }
        let mut out = link.conn.out.borrow_mut();
        let encoded = if section_len >= zerocopy::ZERO_COPY_MIN_BYTES && self.zero_copy.is_some() {
            // The inputs stay where they are held: the writer sends them from there
            // (zero-copy) right after this head.
            exec::encode_sectioned_head(&mut out, Kind::ExecPlan, &*msg, section_len).map(|_| {
                drop(out);
                for r in requests {
                    if let Some(input) = pending.get(RequestKey::of_id(r.id)).and_then(|p| p.input.as_ref()) {
                        link.conn.push_section(input.clone());
                    }
                }
            })
        } else {
            exec::encode_sectioned(&mut out, Kind::ExecPlan, &*msg, |out| {
                for r in requests {
                    if let Some(bytes) = input_of(r.id) {
                        out.extend_from_slice(bytes);
                    }
                }
            })
            .map(|_| ())
        };
        drop(pending);
        if encoded.is_err() {
            // The batch's inputs exceed one frame: its requests fail, the GPU idles.
            for r in requests {
                if let Some(pending) = self.pending.borrow_mut().remove(RequestKey::of_id(r.id)) {
                    self.reply(
                        pending.origin,
                        Status::ExecutionFailed,
                        self.timings(pending.origin, None),
                    );
                }
            }
            return PlanSent::Sent;
        }
        link.conn.wake_writer();
        let mut ids = self.id_lists.borrow_mut().pop().unwrap_or_default();
        ids.clear();
        ids.extend(requests.iter().map(|r| r.id));
        link.inflight.borrow_mut().insert(
            plan.plan_id,
            InFlight {
                model: plan.model,
                gpu: plan.gpu,
                batch_size: plan.batch_size,
                ids,
                overdue_at_ns: plan.finish_ns.saturating_add(self.timeouts.plan_ns),
            },
        );
        self.stats.executor_plans.fetch_add(1, Ordering::Relaxed);
        PlanSent::Sent
    }

    /// RESULT: answers the plan's requests with their outputs. Everything is checked before
    /// the plan leaves the link's table: a RESULT that does not match its plan breaks the
    /// protocol, and the caller loses the executor with the plan still in flight, so its
    /// requests are re-planned or answered.
    fn on_result(self: &Rc<Self>, link: &Link, payload: &[u8], buffer: &ReadBuffer) -> Result<(), Refusal> {
        let (result, section) = exec::access_result(payload).map_err(malformed)?;
        let now_ns = self.now_ns();
        link.last_seen_ns.set(now_ns);
        let plan_id = result.plan_id.to_native();
        let started_ns = result.started_ns.to_native();
        let finished_ns = result.finished_ns.to_native();
        {
            let inflight = link.inflight.borrow();
            let Some(flight) = inflight.get(&plan_id) else {
                drop(inflight);
                return self.on_overdue_result(link, plan_id, now_ns);
            };
            if result.status == PlanStatus::Ok {
                let n = flight.ids.len();
                if result.output_lens.len() != n {
                    return Err((
                        ErrorCode::Malformed,
                        format!(
                            "plan {plan_id} had {n} requests, its RESULT {} outputs",
                            result.output_lens.len()
                        ),
                    ));
                }
                let mut previous = None;
                for index in result.refused.iter().map(|i| i.to_native()) {
                    if index as usize >= n || previous.is_some_and(|p| p >= index) {
                        return Err((
                            ErrorCode::Malformed,
                            format!(
                                "plan {plan_id} refuses request index {index}: refused indexes are ascending, each below its {n} requests"
                            ),
                        ));
                    }
                    previous = Some(index);
                }
                if finished_ns < started_ns {
                    return Err((
                        ErrorCode::Malformed,
                        format!("plan {plan_id} finished at {finished_ns} ns, before it started at {started_ns} ns"),
                    ));
                }
            }
        }
        let flight = link.inflight.borrow_mut().remove(&plan_id).expect("checked above");
        match result.status {
            PlanStatus::Ok => {
                if !result.refused.is_empty() {
                    self.log(&format!(
                        "plan {plan_id}: {} request(s) refused by the model: {}",
                        result.refused.len(),
                        for_log(result.message.as_str(), MESSAGE_LOG_LIMIT)
                    ));
                }
                let mut refused = result.refused.iter().map(|i| i.to_native() as usize).peekable();
                let mut offset = 0usize;
                for (index, (&id, len)) in flight.ids.iter().zip(result.output_lens.iter()).enumerate() {
                    let len = len.to_native() as usize;
                    let output = &section[offset..offset + len];
                    offset += len;
                    let is_refused = refused.next_if_eq(&index).is_some();
                    let Some(pending) = self.pending.borrow_mut().remove(RequestKey::of_id(id)) else {
                        continue;
                    };
                    let timings = self.timings(pending.origin, Some((started_ns, finished_ns)));
                    if is_refused {
                        self.reply(pending.origin, Status::Malformed, timings);
                    } else {
                        self.reply_output(pending.origin, timings, output, buffer);
                    }
                }
                let completion = Completion {
                    plan_id,
                    gpu: flight.gpu,
                    model: flight.model,
                    batch_size: flight.batch_size,
                    started_ns,
                    finished_ns,
                };
                self.completed(now_ns, &completion);
            }
            PlanStatus::Late | PlanStatus::Failed => {
                // Late: it could not start in time, its SLO is lost. Failed: the backend said so.
                let status = if result.status == PlanStatus::Late {
                    Status::Dropped
                } else {
                    Status::ExecutionFailed
                };
                if status == Status::ExecutionFailed {
                    self.log(&format!(
                        "executor {} failed plan {plan_id}: {}",
                        link.executor,
                        for_log(result.message.as_str(), MESSAGE_LOG_LIMIT)
                    ));
                }
                for &id in &flight.ids {
                    if let Some(pending) = self.pending.borrow_mut().remove(RequestKey::of_id(id)) {
                        self.reply(pending.origin, status, self.timings(pending.origin, None));
                    }
                }
            }
        }
        self.id_lists.borrow_mut().push(flight.ids);
        self.drain_output();
        Ok(())
    }

    /// A RESULT for a plan that is not in flight: if it is one that timed out, its GPU has
    /// reported and may be planned on again (its requests were answered already); any other
    /// plan id breaks the protocol.
    fn on_overdue_result(self: &Rc<Self>, link: &Link, plan_id: u64, now_ns: u64) -> Result<(), Refusal> {
        let Some(gpu) = link.overdue.borrow_mut().remove(&plan_id) else {
            return Err((
                ErrorCode::Malformed,
                format!("a RESULT for plan {plan_id}, which is not in flight"),
            ));
        };
        let (online, handoff) = self.executors.gpu_recovered(gpu, now_ns);
        if online {
            self.log(&format!(
                "GPU {gpu} of executor {} reported its late plan {plan_id}: back in planning",
                link.executor
            ));
            if let Some(shard) = handoff {
                self.scheduler.borrow_mut().gpus_mut().push_handoff(shard);
            }
            self.on_timer();
        }
        Ok(())
    }

    /// Plans of `link` past their timeout are lost: their requests are re-planned or
    /// answered, and their GPUs leave planning until they report.
    fn check_overdue(self: &Rc<Self>, link: &Link) {
        let now_ns = self.now_ns();
        let overdue: Vec<u64> = link
            .inflight
            .borrow()
            .iter()
            .filter(|(_, flight)| flight.overdue_at_ns < now_ns)
            .map(|(&plan_id, _)| plan_id)
            .collect();
        if overdue.is_empty() {
            return;
        }
        for plan_id in overdue {
            let flight = link.inflight.borrow_mut().remove(&plan_id).expect("listed above");
            self.stats.plans_timed_out.fetch_add(1, Ordering::Relaxed);
            link.overdue.borrow_mut().insert(plan_id, flight.gpu);
            if self.executors.gpu_hung(flight.gpu) {
                self.log(&format!(
                    "plan {plan_id} on GPU {} of executor {} is {} ms past its finish: the GPU is out of planning until it reports",
                    flight.gpu,
                    link.executor,
                    self.timeouts.plan_ns / 1_000_000
                ));
            }
            for &id in &flight.ids {
                self.replan_or_lose(RequestKey::of_id(id));
            }
            self.id_lists.borrow_mut().push(flight.ids);
        }
        self.drain_output();
    }

    /// A request of a plan whose executor was lost: planned again if one batch still fits
    /// before its deadline, else answered `executor lost`.
    pub(super) fn replan_or_lose(self: &Rc<Self>, key: RequestKey) {
        let now_ns = self.now_ns();
        let Some((model, deadline_ns)) = self.pending.borrow().get(key).map(|p| (p.model, p.deadline_ns)) else {
            return;
        };
        let fits = now_ns + self.scheduler.borrow().profile(model).exec_ns(1) <= deadline_ns;
        if fits && !self.stop.load(Ordering::Relaxed) {
            self.stats.replanned.fetch_add(1, Ordering::Relaxed);
            let request = Request {
                id: key.id(),
                model,
                arrival_ns: now_ns,
                deadline_ns,
            };
            let mut scheduler = self.scheduler.borrow_mut();
            let mut output = self.output.borrow_mut();
            scheduler.on_arrival(now_ns, request, &mut output);
        } else if let Some(pending) = self.pending.borrow_mut().remove(key) {
            self.reply(pending.origin, Status::ExecutorLost, self.timings(pending.origin, None));
        }
    }

    /// Executor `executor` is gone: its GPUs leave the table (first shard only), this shard's
    /// link closes and its plans' requests are re-planned or answered; with `broadcast`, the
    /// other shards are told to do the same.
    pub(super) fn executor_lost(self: &Rc<Self>, executor: u32, broadcast: bool, why: &str) {
        if let Some(gpus) = self.executors.mark_lost(executor) {
            self.stats.executors_lost.fetch_add(1, Ordering::Relaxed);
            let name = self.executors.name_of(executor).unwrap_or_default();
            eprintln!("symphony serve: executor {executor} ({name}) lost ({why}); its {gpus} GPUs are offline");
        }
        let link = self.links.borrow_mut().remove(&executor);
        if let Some(link) = link {
            // Told why, so it reconnects at once.
            link.conn
                .fail(ErrorCode::Refused, &format!("executor {executor} was lost: {why}"));
            let flights: Vec<InFlight> = link.inflight.borrow_mut().drain().map(|(_, f)| f).collect();
            for flight in flights {
                for &id in &flight.ids {
                    self.replan_or_lose(RequestKey::of_id(id));
                }
            }
            link.overdue.borrow_mut().clear();
            self.executors.release(executor);
        }
        // Planning may be faster now that the executor is gone.
        self.apply_planning_profiles();
        if broadcast {
            for dest in 0..self.mesh.shard_count() {
                if dest != self.id as usize {
                    self.mesh.send(dest, ShardMsg::ExecutorLost(executor));
                }
            }
        }
        self.drain_output();
    }

    /// Whether `link` is this shard's current link to its executor.
    fn is_current(&self, link: &Rc<Link>) -> bool {
        self.links
            .borrow()
            .get(&link.executor)
            .is_some_and(|l| Rc::ptr_eq(l, link))
    }
}

/// Loses the link's executor when the link stays silent past the heartbeat timeout, and
/// times out its plans.
async fn heartbeat_watch(shard: Rc<Shard>, link: Rc<Link>) {
    let shortest_ns = shard.timeouts.heartbeat_ns.min(shard.timeouts.plan_ns);
    let period = Duration::from_nanos(shortest_ns / 4).max(Duration::from_millis(5));
    loop {
        glommio::timer::sleep(period).await;
        if !shard.is_current(&link) || shard.stop.load(Ordering::Relaxed) {
            return;
        }
        if shard.now_ns().saturating_sub(link.last_seen_ns.get()) > shard.timeouts.heartbeat_ns {
            shard.executor_lost(link.executor, true, "missed its heartbeats");
            return;
        }
        shard.check_overdue(&link);
    }
}

/// Accepts executor links on this shard's link port until the service stops.
pub(super) async fn accept_links(shard: Rc<Shard>, listener: TcpListener) {
    while let Some(stream) = connection::accept_until_stop(&shard, &listener, "executor link").await {
        let why = "closed to make room for a new link: this one never joined";
        let admission = shard.link_conns.borrow_mut().admit(why);
        match admission {
            Admission::Serve(key, connection, receivers) => {
                glommio::spawn_local(serve_link(Rc::clone(&shard), key, stream, connection, *receivers)).detach();
            }
            Admission::Refuse => connection::refuse_later(&shard, stream, true),
            Admission::Drop => {
                drop(stream);
                glommio::timer::sleep(Duration::from_millis(1)).await;
            }
        }
    }
}

/// One link: JOIN (within the handshake timeout), then RESULT and HEARTBEAT frames until
/// it closes.
async fn serve_link(
    shard: Rc<Shard>,
    key: ConnectionKey,
    stream: TcpStream,
    connection: Rc<Connection>,
    receivers: Receivers,
) {
    let _ = stream.set_nodelay(true);
    // The socket stays open while the writer holds its half.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let (mut reader, writer) = futures_lite::io::split(stream);
    let writer = connection::write_loop(
        writer,
        Rc::clone(&connection),
        receivers.notify,
        Some((fd, Rc::clone(&shard))),
        shard.write_stall_timeout(),
    );
    glommio::spawn_local(writer).detach();
    let stop_reading = receivers.stop_reading;
    let decoder = FrameDecoder::default();
    let mut buffer = ReadBuffer::new(READ_BUFFER_INITIAL_BYTES, frame_limit());
    let mut link: Option<Rc<Link>> = None;
    let join_by = std::time::Instant::now() + shard.timeouts.handshake;
    let mut why = "its link closed".to_string();
    'read: while let Some(spare) = buffer.spare() {
        let joined = link.is_some();
        let read = futures_lite::future::or(
            async { Ok(reader.read(spare).await) },
            futures_lite::future::or(
                async {
                    let _ = stop_reading.recv().await;
                    Err(false)
                },
                async {
                    if joined {
                        std::future::pending::<()>().await;
                    }
                    glommio::timer::sleep(join_by.saturating_duration_since(std::time::Instant::now())).await;
                    Err(true)
                },
            ),
        )
        .await;
        let read = match read {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(read)) => read,
            Err(false) => {
                why = if connection.is_dead() {
                    "it stopped taking its plans (its link's writes failed or stalled)".to_string()
                } else {
                    why
                };
                break;
            }
            Err(true) => {
                shard.stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                connection.fail(
                    ErrorCode::Refused,
                    &format!(
                        "no EXEC_JOIN within {} ms of connecting",
                        shard.timeouts.handshake.as_millis()
                    ),
                );
                break;
            }
        };
        buffer.advance(read);
        let mut frames = decoder.frames(buffer.filled());
        for frame in &mut frames {
            let outcome = match (frame, link.as_ref()) {
                (Ok(frame), None) if frame.kind == Kind::ExecJoin => {
                    shard.on_join(&connection, frame.payload).map(|joined| {
                        connection.active.set(true);
                        link = Some(joined);
                    })
                }
                (Ok(frame), None) => Err((
                    ErrorCode::UnexpectedKind,
                    format!("a link starts with EXEC_JOIN, not {}", frame.kind),
                )),
                (Ok(frame), Some(joined)) if frame.kind == Kind::ExecResult => {
                    let joined = Rc::clone(joined);
                    shard.on_result(&joined, frame.payload, &buffer)
                }
                (Ok(frame), Some(joined)) if frame.kind == Kind::ExecHeartbeat => {
                    let now_ns = shard.now_ns();
                    joined.last_seen_ns.set(now_ns);
                    match exec::access::<Heartbeat>(Kind::ExecHeartbeat, frame.payload) {
                        Ok(beat) => {
                            let answer = Heartbeat {
                                sent_ns: now_ns,
                                echo_ns: beat.sent_ns.to_native(),
                            };
                            exec::encode(&mut connection.out.borrow_mut(), Kind::ExecHeartbeat, &answer)
                                .map(|_| connection.wake_writer())
                                .map_err(malformed)
                        }
                        Err(e) => Err(malformed(e)),
                    }
                }
                (Ok(frame), _) if frame.kind == Kind::Error => {
                    let message = wire::decode_error(frame.payload)
                        .map(|e| for_log(&e.message, NAME_LOG_LIMIT))
                        .unwrap_or_default();
                    why = format!("it sent an ERROR frame ({message})");
                    connection.close_after_writing();
                    break 'read;
                }
                (Ok(frame), Some(_)) => Err((
                    ErrorCode::UnexpectedKind,
                    format!(
                        "an executor sends EXEC_RESULT and EXEC_HEARTBEAT on a link, not {}",
                        frame.kind
                    ),
                )),
                (Err(e), _) => Err((e.error_code().unwrap_or(ErrorCode::Malformed), e.to_string())),
            };
            if let Err((code, message)) = outcome {
                why = format!("it broke the protocol: {}", for_log(&message, MESSAGE_LOG_LIMIT));
                connection.fail(code, &message);
                break 'read;
            }
        }
        let consumed = frames.consumed();
        buffer.consume(consumed);
        shard.flush_outbox();
    }
    if let Some(link) = link {
        if shard.is_current(&link) {
            shard.executor_lost(link.executor, true, &why);
        }
    }
    shard.flush_outbox();
    shard.link_conns.borrow_mut().remove(key);
    connection.close_after_writing();
}
