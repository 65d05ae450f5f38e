//! Executor links: the handshake of an executor on the front door (HELLO, PROBE, REGISTER),
//! one link per shard and executor (JOIN), plans out, results back, heartbeats, and what
//! happens when an executor is lost.
//!
//! The protocol is `symphony_core::wire::executor` (and `docs/protocol.md`). Each shard
//! listens for links on a port of its own, so every shard sends its plans on its own
//! connection and gets its results there, with no cross-shard hop. The registry
//! (`crate::executors`) maps GPU table slots to executors; an executor's GPUs go online in
//! the table when its last link joins, and offline as soon as one shard loses it.
//!
//! Loss: a link that closes, breaks the protocol or stays silent past the heartbeat timeout
//! loses its executor on every shard (`ShardMsg::ExecutorLost`). Each shard then re-plans
//! the requests of its unfinished plans on that executor whose deadline still allows one
//! batch, and answers the others `executor lost`.

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

use super::buffers::ReadBuffer;
use super::{accept_until_stop, new_connection, write_loop, zerocopy, Connection, Shard, ShardMsg, READ_BUFFER_BYTES};

type Refusal = (ErrorCode, String);

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
}

/// One shard's link to one executor.
#[derive(Debug)]
pub(super) struct Link {
    executor: u32,
    conn: Rc<Connection>,
    inflight: RefCell<HashMap<u64, InFlight>>,
    last_seen_ns: Cell<u64>,
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
                let id = self
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
        let _ = connection.notify.try_send(());
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
        let outcome = self.executors.join(executor).map_err(refused)?;
        {
            // This shard plans its models with the executor's measured profiles.
            let mut scheduler = self.scheduler.borrow_mut();
            for (local, &global) in self.catalog.owned[self.id as usize].iter().enumerate() {
                scheduler.set_profile(local as u32, outcome.profiles[global as usize].clone());
            }
        }
        let link = Rc::new(Link {
            executor,
            conn: Rc::clone(connection),
            inflight: RefCell::new(HashMap::new()),
            last_seen_ns: Cell::new(self.now_ns()),
        });
        self.links.borrow_mut().insert(executor, Rc::clone(&link));
        exec::encode(
            &mut connection.out.borrow_mut(),
            Kind::ExecJoined,
            &Joined { shard: self.id },
        )
        .map_err(malformed)?;
        let _ = connection.notify.try_send(());
        if let Some(slots) = outcome.bring_online {
            let now_ns = self.now_ns();
            let mut scheduler = self.scheduler.borrow_mut();
            for &slot in &slots {
                if let Some(shard) = scheduler.gpus().table().set_online(slot, now_ns) {
                    scheduler.gpus_mut().push_handoff(shard);
                }
            }
            drop(scheduler);
            let name = self.executors.name_of(executor).unwrap_or_default();
            eprintln!(
                "symphony serve: executor {executor} ({name}) online with {} GPUs",
                slots.len()
            );
        }
        glommio::spawn_local(heartbeat_watch(Rc::clone(self), Rc::clone(&link))).detach();
        self.on_timer();
        Ok(link)
    }

    /// Sends `plan` to the executor of its GPU. False when that executor has no link here
    /// (lost): the caller re-plans the requests.
    pub(super) fn send_plan(&self, plan: &Plan, requests: &[Request]) -> bool {
        let Some(owner) = self.executors.owner_of(plan.gpu) else {
            return false;
        };
        let Some(link) = self.links.borrow().get(&owner.executor).cloned() else {
            return false;
        };
        let mut msg = self.plan_msg.borrow_mut();
        msg.plan_id = plan.plan_id;
        msg.gpu = owner.local;
        msg.model = self.catalog.owned[self.id as usize][plan.model as usize];
        msg.exec_at_ns = plan.exec_at_ns;
        msg.finish_ns = plan.finish_ns;
        msg.requests.clear();
        let pending = self.pending.borrow();
        let input_of = |id: u64| pending.get(id).and_then(|p| p.input.as_ref()).map(|s| s.bytes());
        msg.requests.extend(requests.iter().map(|r| PlanRequest {
            request_id: r.id,
            input_len: input_of(r.id).map_or(0, |bytes| bytes.len() as u32),
        }));
        let section_len: usize = msg.requests.iter().map(|r| r.input_len as usize).sum();
        let mut out = link.conn.out.borrow_mut();
        let encoded = if section_len >= zerocopy::ZERO_COPY_MIN_BYTES && self.zero_copy.is_some() {
            // The inputs stay in the clients' receive buffers: the writer sends them from
            // there (zero-copy) right after this head.
            exec::encode_sectioned_head(&mut out, Kind::ExecPlan, &*msg, section_len).map(|_| {
                let at = out.len();
                let mut sections = link.conn.sections.borrow_mut();
                for r in requests {
                    if let Some(input) = pending.get(r.id).and_then(|p| p.input.as_ref()) {
                        sections.push((at, input.clone()));
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
        drop(out);
        drop(pending);
        if encoded.is_err() {
            // The batch's inputs exceed one frame: its requests fail, the GPU idles.
            for r in requests {
                if let Some(origin) = self.pending.borrow_mut().remove(r.id) {
                    self.reply(origin, Status::ExecutionFailed, self.timings(origin, None));
                }
            }
            return true;
        }
        let _ = link.conn.notify.try_send(());
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
            },
        );
        self.stats.executor_plans.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// RESULT: answers the plan's requests with their outputs (slices of the link's buffer).
    fn on_result(self: &Rc<Self>, link: &Link, payload: &[u8], buffer: &ReadBuffer) -> Result<(), Refusal> {
        let (result, section) = exec::access_result(payload).map_err(malformed)?;
        let now_ns = self.now_ns();
        link.last_seen_ns.set(now_ns);
        let plan_id = result.plan_id.to_native();
        let flight = link.inflight.borrow_mut().remove(&plan_id).ok_or_else(|| {
            (
                ErrorCode::Malformed,
                format!("a RESULT for plan {plan_id}, which is not in flight"),
            )
        })?;
        let started_ns = result.started_ns.to_native();
        let finished_ns = result.finished_ns.to_native().max(started_ns);
        match result.status {
            PlanStatus::Ok => {
                if result.output_lens.len() != flight.ids.len() {
                    return Err((
                        ErrorCode::Malformed,
                        format!(
                            "plan {plan_id} had {} requests, its RESULT {} outputs",
                            flight.ids.len(),
                            result.output_lens.len()
                        ),
                    ));
                }
                if !result.refused.is_empty() {
                    eprintln!(
                        "symphony serve: plan {plan_id}: {} request(s) refused by the model: {}",
                        result.refused.len(),
                        result.message.as_str()
                    );
                }
                let mut refused = result.refused.iter().map(|i| i.to_native() as usize).peekable();
                let mut offset = 0usize;
                for (index, (&id, len)) in flight.ids.iter().zip(result.output_lens.iter()).enumerate() {
                    let len = len.to_native() as usize;
                    let output = &section[offset..offset + len];
                    offset += len;
                    let Some(origin) = self.pending.borrow_mut().remove(id) else {
                        continue;
                    };
                    let timings = self.timings(origin, Some((started_ns, finished_ns)));
                    if refused.next_if_eq(&index).is_some() {
                        self.reply(origin, Status::Malformed, timings);
                    } else {
                        self.reply_output(origin, timings, output, buffer);
                    }
                }
            }
            PlanStatus::Late | PlanStatus::Failed => {
                // Late: it could not start in time, its SLO is lost. Failed: the backend said so.
                let status = if result.status == PlanStatus::Late {
                    Status::Dropped
                } else {
                    Status::ExecutionFailed
                };
                if status == Status::ExecutionFailed {
                    eprintln!(
                        "symphony serve: executor {} failed plan {plan_id}: {}",
                        link.executor,
                        result.message.as_str()
                    );
                }
                for &id in &flight.ids {
                    if let Some(origin) = self.pending.borrow_mut().remove(id) {
                        self.reply(origin, status, self.timings(origin, None));
                    }
                }
            }
        }
        if result.status == PlanStatus::Ok {
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
        self.id_lists.borrow_mut().push(flight.ids);
        self.drain_output();
        Ok(())
    }

    /// A request of a plan whose executor was lost: planned again if one batch still fits
    /// before its deadline, else answered `executor lost`.
    pub(super) fn replan_or_lose(self: &Rc<Self>, id: u64) {
        let now_ns = self.now_ns();
        let Some((model, deadline_ns)) = self.pending.borrow().get(id).map(|p| (p.model, p.deadline_ns)) else {
            return;
        };
        let fits = now_ns + self.scheduler.borrow().profile(model).exec_ns(1) <= deadline_ns;
        if fits && !self.stop.load(Ordering::Relaxed) {
            self.stats.replanned.fetch_add(1, Ordering::Relaxed);
            let request = Request {
                id,
                model,
                arrival_ns: now_ns,
                deadline_ns,
            };
            let mut scheduler = self.scheduler.borrow_mut();
            let mut output = self.output.borrow_mut();
            scheduler.on_arrival(now_ns, request, &mut output);
        } else if let Some(origin) = self.pending.borrow_mut().remove(id) {
            self.reply(origin, Status::ExecutorLost, self.timings(origin, None));
        }
    }

    /// Executor `executor` is gone: its GPUs leave the table (first shard only), this shard's
    /// link closes and its plans' requests are re-planned or answered; with `broadcast`, the
    /// other shards are told to do the same.
    pub(super) fn executor_lost(self: &Rc<Self>, executor: u32, broadcast: bool, why: &str) {
        if let Some(slots) = self.executors.mark_lost(executor) {
            self.stats.executors_lost.fetch_add(1, Ordering::Relaxed);
            let scheduler = self.scheduler.borrow();
            for &slot in &slots {
                scheduler.gpus().table().set_offline(slot);
            }
            drop(scheduler);
            eprintln!(
                "symphony serve: executor {executor} lost ({why}); its {} GPUs are offline",
                slots.len()
            );
        }
        let link = self.links.borrow_mut().remove(&executor);
        if let Some(link) = link {
            link.conn.closing.set(true);
            let _ = link.conn.notify.try_send(());
            let flights: Vec<InFlight> = link.inflight.borrow_mut().drain().map(|(_, f)| f).collect();
            for flight in flights {
                for &id in &flight.ids {
                    self.replan_or_lose(id);
                }
            }
            self.executors.release(executor);
        }
        if broadcast {
            for dest in 0..self.senders.nr_consumers() {
                if dest != self.id as usize {
                    self.send_msg(dest, ShardMsg::ExecutorLost(executor));
                }
            }
        }
        self.drain_output();
    }
}

/// Loses the link's executor when the link stays silent past the heartbeat timeout.
async fn heartbeat_watch(shard: Rc<Shard>, link: Rc<Link>) {
    let period = Duration::from_nanos(shard.heartbeat_timeout_ns / 4).max(Duration::from_millis(5));
    loop {
        glommio::timer::sleep(period).await;
        let current = shard
            .links
            .borrow()
            .get(&link.executor)
            .is_some_and(|l| Rc::ptr_eq(l, &link));
        if !current || shard.stop.load(Ordering::Relaxed) {
            return;
        }
        if shard.now_ns().saturating_sub(link.last_seen_ns.get()) > shard.heartbeat_timeout_ns {
            shard.executor_lost(link.executor, true, "missed its heartbeats");
            return;
        }
    }
}

/// Accepts executor links on this shard's link port until the service stops.
pub(super) async fn link_accept_loop(shard: Rc<Shard>, listener: TcpListener) {
    while let Some(stream) = accept_until_stop(&shard, &listener).await {
        glommio::spawn_local(serve_link(Rc::clone(&shard), stream)).detach();
    }
}

/// One link: JOIN, then RESULT and HEARTBEAT frames until it closes.
async fn serve_link(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    // The socket stays open while the writer holds its half.
    let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
    let (mut reader, writer) = futures_lite::io::split(stream);
    let (connection, notify_rx) = new_connection();
    let writer = write_loop(writer, Rc::clone(&connection), notify_rx, Some((fd, Rc::clone(&shard))));
    let writer_task = glommio::spawn_local(writer).detach();
    let decoder = FrameDecoder::default();
    let limit = wire::FRAME_HEADER_SIZE + wire::FRAME_PAYLOAD_LIMIT as usize;
    let mut buffer = ReadBuffer::new(READ_BUFFER_BYTES, limit);
    let mut link: Option<Rc<Link>> = None;
    let mut why = "its link closed";
    'read: while let Some(spare) = buffer.spare() {
        let read = match reader.read(spare).await {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        buffer.advance(read);
        let mut frames = decoder.frames(buffer.filled());
        for frame in &mut frames {
            let outcome = match (frame, link.as_ref()) {
                (Ok(frame), None) if frame.kind == Kind::ExecJoin => {
                    shard.on_join(&connection, frame.payload).map(|joined| {
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
                    joined.last_seen_ns.set(shard.now_ns());
                    let beat = Heartbeat {
                        sent_ns: shard.now_ns(),
                    };
                    exec::encode(&mut connection.out.borrow_mut(), Kind::ExecHeartbeat, &beat)
                        .map(|_| {
                            let _ = connection.notify.try_send(());
                        })
                        .map_err(malformed)
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
                let _ = wire::encode_error(&mut connection.out.borrow_mut(), code, &message);
                connection.closing.set(true);
                let _ = connection.notify.try_send(());
                why = "it broke the protocol";
                break 'read;
            }
        }
        let consumed = frames.consumed();
        buffer.consume(consumed);
        shard.flush_outbox();
    }
    if let Some(link) = link {
        shard.executor_lost(link.executor, true, why);
    }
    shard.flush_outbox();
    if !connection.closing.get() {
        connection.closing.set(true);
        let _ = connection.notify.try_send(());
    }
    drop(writer_task);
}
