//! A shard's executor links: plans out, results back, heartbeats, and what happens when an
//! executor is lost or a plan hangs.
//!
//! Each shard listens for links on a port of its own, so every shard sends its plans on its
//! own connection and gets its results there, with no cross-shard hop. The registry
//! (`crate::executors`) maps GPU table slots to executors; an executor's GPUs go online in
//! the table when its last link joins, and offline as soon as one shard loses it.
//!
//! Loss: a link that closes, breaks the protocol (any frame it must not send, a RESULT that
//! does not match its plan), stays silent past the heartbeat timeout or stops taking its
//! plans loses its executor on every shard (`ShardMsg::ExecutorLost`). Each shard then
//! re-plans the requests of its unfinished plans on that executor whose deadline still
//! allows one batch, and answers the others `executor lost`. A plan not reported by its
//! finish plus `plan_timeout_ms` is lost alone: its requests are re-planned or answered, and
//! its GPU leaves planning until that plan's RESULT comes after all; still unreported a
//! second plan timeout later, it loses its executor (which reconnects with a fresh session,
//! so a dropped RESULT does not take a GPU out for good). A link that has not joined within
//! the handshake timeout is closed.

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use symphony_core::policy::{Completion, Plan, Policy, Serving};
use symphony_core::request::Request;
use symphony_core::wire::executor::{self as exec, Heartbeat, PlanRequest, PlanStatus};
use symphony_core::wire::{self, ErrorCode, Frame, Kind, Status, WireError};

use super::handshake::{malformed, Refusal};
use super::{ConnectionKey, Effect, Effects, Peer, RequestKey, ShardCore, ShardMsg};
use crate::buffers::ReadBuffer;
use crate::executors::{for_log, NAME_LOG_LIMIT};

/// Bytes of an executor's message (a failed or refused batch) shown in a log line.
const MESSAGE_LOG_LIMIT: usize = 256;
/// Plans whose inputs come to this many bytes are handed over as sections (zero-copy).
pub const ZERO_COPY_MIN_BYTES: usize = 16 << 10;
/// The shortest period of the links' checks.
const LINK_CHECK_MIN_NS: u64 = 5_000_000;

/// A plan sent to an executor (embedded or on a link) and not answered yet.
#[derive(Debug)]
pub(super) struct InFlight {
    pub(super) model: u32,
    pub(super) gpu: u32,
    batch_size: u32,
    pub(super) ids: Vec<u64>,
    /// Unreported past this, the plan is lost (its finish plus the plan timeout).
    overdue_at_ns: u64,
}

impl InFlight {
    pub(super) fn of(plan: &Plan, ids: Vec<u64>, overdue_at_ns: u64) -> InFlight {
        InFlight {
            model: plan.model,
            gpu: plan.gpu,
            batch_size: plan.batch_size,
            ids,
            overdue_at_ns,
        }
    }

    pub(super) fn completion(&self, plan_id: u64, started_ns: u64, finished_ns: u64) -> Completion {
        Completion {
            plan_id,
            gpu: self.gpu,
            model: self.model,
            batch_size: self.batch_size,
            started_ns,
            finished_ns,
        }
    }
}

/// A connection on the link port: joined to an executor, or not yet.
#[derive(Debug)]
pub(super) struct LinkState {
    opened_ns: u64,
    /// The executor it joined for, while it is that executor's current link.
    executor: Option<u32>,
    /// It joined once (a link joins one executor, once).
    joined: bool,
    /// It failed (broke the protocol, timed out, its executor was lost): what it still
    /// sends is not read.
    failed: bool,
    /// Why it failed, for the log line when it closes.
    why: Option<String>,
    inflight: HashMap<u64, InFlight>,
    /// Plans that passed their timeout, by id: their GPU (it is out of planning until the
    /// RESULT comes after all) and when, still unreported, they lose the executor.
    overdue: HashMap<u64, (u32, u64)>,
    last_seen_ns: u64,
}

impl LinkState {
    pub(super) fn new(now_ns: u64) -> LinkState {
        LinkState {
            opened_ns: now_ns,
            executor: None,
            joined: false,
            failed: false,
            why: None,
            inflight: HashMap::new(),
            overdue: HashMap::new(),
            last_seen_ns: now_ns,
        }
    }

    pub(super) fn joined(&mut self, executor: u32, now_ns: u64) {
        self.executor = Some(executor);
        self.joined = true;
        self.last_seen_ns = now_ns;
    }

    pub(super) fn executor(&self) -> Option<u32> {
        self.executor
    }

    pub(super) fn inflight_count(&self) -> usize {
        self.inflight.len()
    }

    pub(super) fn flights(&self) -> impl Iterator<Item = &InFlight> {
        self.inflight.values()
    }
}

impl ShardCore {
    pub(super) fn link_check_period_ns(&self) -> u64 {
        let shortest_ns = self.timeouts.heartbeat_ns.min(self.timeouts.plan_ns);
        (shortest_ns / 4).max(LINK_CHECK_MIN_NS)
    }

    /// One frame on a link: JOIN first, then RESULT and HEARTBEAT.
    pub(super) fn on_link_frame(
        &mut self,
        key: ConnectionKey,
        frame: Result<Frame<'_>, WireError>,
        buffer: &ReadBuffer,
        fx: &mut Effects,
    ) {
        let Some(link) = self.links.get_mut(&key) else {
            return;
        };
        if link.failed {
            return;
        }
        let joined = link.joined;
        let outcome = match frame {
            Ok(frame) if !joined && frame.kind == Kind::ExecJoin => self.on_join(key, frame.payload, fx),
            Ok(frame) if !joined => Err((
                ErrorCode::UnexpectedKind,
                format!("a link starts with EXEC_JOIN, not {}", frame.kind),
            )),
            Ok(frame) if frame.kind == Kind::ExecResult => self.on_result(key, frame.payload, buffer, fx),
            Ok(frame) if frame.kind == Kind::ExecHeartbeat => {
                link.last_seen_ns = self.now_ns;
                match exec::access::<Heartbeat>(Kind::ExecHeartbeat, frame.payload) {
                    Ok(beat) => {
                        let answer = Heartbeat {
                            sent_ns: self.now_ns,
                            echo_ns: beat.sent_ns.to_native(),
                        };
                        fx.write_with(Peer::Link(key), |out| exec::encode(out, Kind::ExecHeartbeat, &answer))
                            .map_err(malformed)
                    }
                    Err(e) => Err(malformed(e)),
                }
            }
            Ok(frame) if frame.kind == Kind::Error => {
                let message = wire::decode_error(frame.payload)
                    .map(|e| for_log(&e.message, NAME_LOG_LIMIT))
                    .unwrap_or_default();
                link.failed = true;
                link.why = Some(format!("it sent an ERROR frame ({message})"));
                fx.list.push(Effect::Close {
                    to: Peer::Link(key),
                    stop_reading: true,
                });
                Ok(())
            }
            Ok(frame) => Err((
                ErrorCode::UnexpectedKind,
                format!(
                    "an executor sends EXEC_RESULT and EXEC_HEARTBEAT on a link, not {}",
                    frame.kind
                ),
            )),
            Err(e) => Err((e.error_code().unwrap_or(ErrorCode::Malformed), e.to_string())),
        };
        if let Err((code, message)) = outcome {
            if let Some(link) = self.links.get_mut(&key) {
                link.failed = true;
                link.why = Some(format!(
                    "it broke the protocol: {}",
                    for_log(&message, MESSAGE_LOG_LIMIT)
                ));
            }
            fx.fail(Peer::Link(key), code, &message);
        }
    }

    /// Whether a link broke the protocol, timed out or lost its executor (its reader stops).
    pub fn link_failed(&self, key: ConnectionKey) -> bool {
        self.links.get(&key).is_some_and(|l| l.failed)
    }

    /// Sends `plan` to the executor of its GPU; gives `ids` back if the executor has no
    /// live link here.
    pub(super) fn send_plan(
        &mut self,
        plan: &Plan,
        requests: &[Request],
        ids: Vec<u64>,
        fx: &mut Effects,
    ) -> Result<(), Vec<u64>> {
        let Some(owner) = self.executors.owner_of(plan.gpu) else {
            return Err(ids);
        };
        let Some(&key) = self.link_of.get(&owner.executor) else {
            return Err(ids);
        };
        let msg = &mut self.plan_msg;
        msg.plan_id = plan.plan_id;
        msg.gpu = owner.local;
        msg.model = self.catalog.owned[self.id as usize][plan.model as usize];
        msg.exec_at_ns = plan.exec_at_ns;
        msg.finish_ns = plan.finish_ns;
        msg.requests.clear();
        let pending = &self.pending;
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
        let to = Peer::Link(key);
        let encoded = if section_len >= ZERO_COPY_MIN_BYTES && self.zero_copy {
            // The inputs stay where they are held: the driver sends them from there
            // (zero-copy) right after this head.
            let start = fx.bytes.len();
            let head = exec::encode_sectioned_head(&mut fx.bytes, Kind::ExecPlan, &*msg, section_len);
            if head.is_ok() {
                let first = fx.sections.len();
                for r in requests {
                    if let Some(input) = pending.get(RequestKey::of_id(r.id)).and_then(|p| p.input.as_ref()) {
                        fx.sections.push(input.clone());
                    }
                }
                fx.list.push(Effect::Write {
                    to,
                    bytes: start..fx.bytes.len(),
                    sections: first..fx.sections.len(),
                });
            } else {
                fx.bytes.truncate(start);
            }
            head.map(|_| ())
        } else {
            fx.write_with(to, |out| {
                exec::encode_sectioned(out, Kind::ExecPlan, &*msg, |out| {
                    for r in requests {
                        if let Some(bytes) = input_of(r.id) {
                            out.extend_from_slice(bytes);
                        }
                    }
                })
                .map(|_| ())
            })
        };
        if encoded.is_err() {
            // The batch's inputs exceed one frame: its requests fail, the GPU idles.
            for r in requests {
                if let Some(pending) = self.pending.remove(RequestKey::of_id(r.id)) {
                    self.record_failed(&pending, 1);
                    let timings = self.timings(pending.origin, None);
                    self.reply(pending.origin, Status::ExecutionFailed, timings, fx);
                }
            }
            self.id_lists.push(ids);
            return Ok(());
        }
        self.inflight_requests += ids.len();
        let overdue_at_ns = plan.finish_ns.saturating_add(self.timeouts.plan_ns);
        let link = self.links.get_mut(&key).expect("link_of names open links");
        link.inflight
            .insert(plan.plan_id, InFlight::of(plan, ids, overdue_at_ns));
        self.stats.executor_plans.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// RESULT: answers the plan's requests with their outputs. Everything is checked before
    /// the plan leaves the link's table: a RESULT that does not match its plan breaks the
    /// protocol, and the caller loses the executor with the plan still in flight, so its
    /// requests are re-planned or answered.
    fn on_result(
        &mut self,
        key: ConnectionKey,
        payload: &[u8],
        buffer: &ReadBuffer,
        fx: &mut Effects,
    ) -> Result<(), Refusal> {
        let (result, section) = exec::access_result(payload).map_err(malformed)?;
        let now_ns = self.now_ns;
        let link = self.links.get_mut(&key).expect("checked by the caller");
        link.last_seen_ns = now_ns;
        let plan_id = result.plan_id.to_native();
        let started_ns = result.started_ns.to_native();
        let finished_ns = result.finished_ns.to_native();
        let Some(flight) = link.inflight.get(&plan_id) else {
            return self.on_overdue_result(key, plan_id, fx);
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
        let executor = link.executor.unwrap_or_default();
        let flight = link.inflight.remove(&plan_id).expect("checked above");
        self.inflight_requests -= flight.ids.len();
        match result.status {
            PlanStatus::Ok => {
                if !result.refused.is_empty() {
                    fx.log(format!(
                        "plan {plan_id}: {} request(s) refused by the model: {}",
                        result.refused.len(),
                        for_log(result.message.as_str(), MESSAGE_LOG_LIMIT)
                    ));
                }
                self.record_plan(&flight, started_ns, finished_ns);
                let mut refused = result.refused.iter().map(|i| i.to_native() as usize).peekable();
                let mut offset = 0usize;
                for (index, (&id, len)) in flight.ids.iter().zip(result.output_lens.iter()).enumerate() {
                    let len = len.to_native() as usize;
                    let output = &section[offset..offset + len];
                    offset += len;
                    let is_refused = refused.next_if_eq(&index).is_some();
                    self.pending.prefetch_ahead(&flight.ids, index);
                    let Some(pending) = self.pending.remove(RequestKey::of_id(id)) else {
                        continue;
                    };
                    let timings = self.timings(pending.origin, Some((started_ns, finished_ns)));
                    if is_refused {
                        self.record_failed(&pending, 1);
                        self.reply(pending.origin, Status::Malformed, timings, fx);
                    } else {
                        self.record_ran(&pending, started_ns, finished_ns);
                        self.reply_output(pending.origin, timings, output, buffer, fx);
                    }
                }
                let completion = flight.completion(plan_id, started_ns, finished_ns);
                self.scheduler.on_completion(now_ns, &completion, &mut self.output);
                self.note_correction(completion.model);
                self.touched = true;
            }
            PlanStatus::Late | PlanStatus::Failed => {
                // Late: it could not start in time, its SLO is lost. Failed: the backend said so.
                let status = if result.status == PlanStatus::Late {
                    Status::Dropped
                } else {
                    Status::ExecutionFailed
                };
                if status == Status::ExecutionFailed {
                    fx.log(format!(
                        "executor {executor} failed plan {plan_id}: {}",
                        for_log(result.message.as_str(), MESSAGE_LOG_LIMIT)
                    ));
                }
                for &id in &flight.ids {
                    if let Some(pending) = self.pending.remove(RequestKey::of_id(id)) {
                        if status == Status::Dropped {
                            self.record_dropped(&pending);
                        } else {
                            self.record_failed(&pending, 1);
                        }
                        let timings = self.timings(pending.origin, None);
                        self.reply(pending.origin, status, timings, fx);
                    }
                }
            }
        }
        self.id_lists.push(flight.ids);
        Ok(())
    }

    /// A RESULT for a plan that is not in flight: if it is one that timed out, its GPU has
    /// reported and may be planned on again (its requests were answered already); any other
    /// plan id breaks the protocol.
    fn on_overdue_result(&mut self, key: ConnectionKey, plan_id: u64, fx: &mut Effects) -> Result<(), Refusal> {
        let link = self.links.get_mut(&key).expect("checked by the caller");
        let Some((gpu, _)) = link.overdue.remove(&plan_id) else {
            return Err((
                ErrorCode::Malformed,
                format!("a RESULT for plan {plan_id}, which is not in flight"),
            ));
        };
        let executor = link.executor.unwrap_or_default();
        let (online, handoff) = self.executors.gpu_recovered(gpu, self.now_ns);
        if online {
            fx.log(format!(
                "GPU {gpu} of executor {executor} reported its late plan {plan_id}: back in planning"
            ));
            if let Some(shard) = handoff {
                self.scheduler.gpus_mut().push_handoff(shard);
            }
            self.run_timers();
        }
        Ok(())
    }

    /// The links' periodic check: silent links lose their executor, plans past their timeout
    /// are lost, links that have not joined in time are closed.
    pub(super) fn check_links(&mut self, fx: &mut Effects) {
        let now_ns = self.now_ns;
        let mut silent = Vec::new();
        let mut unjoined = Vec::new();
        let mut overdue = Vec::new();
        for (&key, link) in &self.links {
            if link.failed {
                continue;
            }
            match link.executor {
                Some(executor) if now_ns.saturating_sub(link.last_seen_ns) > self.timeouts.heartbeat_ns => {
                    silent.push((executor, "missed its heartbeats"));
                }
                // A plan still unreported a second plan timeout later: the executor has lost
                // it, or its GPU is stuck. Its session ends (it reconnects afresh), so the GPU
                // is not out of planning for good.
                Some(executor) if link.overdue.values().any(|&(_, lose_at_ns)| lose_at_ns < now_ns) => {
                    silent.push((executor, "a plan went unreported for twice the plan timeout"));
                }
                Some(_) => overdue.extend(
                    link.inflight
                        .iter()
                        .filter(|(_, flight)| flight.overdue_at_ns < now_ns)
                        .map(|(&plan_id, _)| (key, plan_id)),
                ),
                None if !link.joined && now_ns.saturating_sub(link.opened_ns) > self.timeouts.handshake_ns => {
                    unjoined.push(key);
                }
                None => {}
            }
        }
        // The same order on every run (the map's order is not).
        silent.sort_unstable();
        unjoined.sort_unstable();
        overdue.sort_unstable();
        for (executor, why) in silent {
            self.executor_lost(executor, true, why, fx);
        }
        for key in unjoined {
            self.stats.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
            let link = self.links.get_mut(&key).expect("listed above");
            link.failed = true;
            fx.fail(
                Peer::Link(key),
                ErrorCode::Refused,
                &format!(
                    "no EXEC_JOIN within {} ms of connecting",
                    self.timeouts.handshake_ns / 1_000_000
                ),
            );
        }
        for (key, plan_id) in overdue {
            self.plan_overdue(key, plan_id, fx);
        }
    }

    /// A plan past its timeout is lost: its requests are re-planned or answered, and its GPU
    /// leaves planning until it reports.
    fn plan_overdue(&mut self, key: ConnectionKey, plan_id: u64, fx: &mut Effects) {
        let Some(link) = self.links.get_mut(&key) else {
            return;
        };
        let Some(flight) = link.inflight.remove(&plan_id) else {
            return;
        };
        link.overdue
            .insert(plan_id, (flight.gpu, self.now_ns.saturating_add(self.timeouts.plan_ns)));
        let executor = link.executor.unwrap_or_default();
        self.inflight_requests -= flight.ids.len();
        self.stats.plans_timed_out.fetch_add(1, Ordering::Relaxed);
        if self.executors.gpu_hung(flight.gpu) {
            fx.log(format!(
                "plan {plan_id} on GPU {} of executor {executor} is {} ms past its finish: the GPU is out of planning until it reports",
                flight.gpu,
                self.timeouts.plan_ns / 1_000_000
            ));
        }
        for &id in &flight.ids {
            self.replan_or_lose(RequestKey::of_id(id), fx);
        }
        self.id_lists.push(flight.ids);
    }

    /// A request of a plan whose executor was lost: planned again if one batch still fits
    /// before its deadline, else answered `executor lost`.
    pub(super) fn replan_or_lose(&mut self, key: RequestKey, fx: &mut Effects) {
        let now_ns = self.now_ns;
        let Some((model, deadline_ns, orphaned)) = self.pending.get(key).map(|p| (p.model, p.deadline_ns, p.orphaned))
        else {
            return;
        };
        if orphaned {
            // Its client went away: it leaves now, and uses no GPU again.
            let pending = self.pending.remove(key).expect("held");
            self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
            self.forget(pending.origin);
            return;
        }
        let fits = now_ns + self.scheduler.profile(model).exec_ns(1) <= deadline_ns;
        if fits && !self.stopping {
            self.stats.replanned.fetch_add(1, Ordering::Relaxed);
            let request = Request {
                id: key.id(),
                model,
                arrival_ns: now_ns,
                deadline_ns,
            };
            self.scheduler.on_arrival(now_ns, request, &mut self.output);
            self.touched = true;
        } else if let Some(pending) = self.pending.remove(key) {
            self.record_failed(&pending, 1);
            let timings = self.timings(pending.origin, None);
            self.reply(pending.origin, Status::ExecutorLost, timings, fx);
        }
    }

    /// Executor `executor` is gone: its GPUs leave the table (first shard only), this shard's
    /// link closes and its plans' requests are re-planned or answered; with `broadcast`, the
    /// other shards are told to do the same.
    pub(super) fn executor_lost(&mut self, executor: u32, broadcast: bool, why: &str, fx: &mut Effects) {
        if let Some(gpus) = self.executors.mark_lost(executor) {
            self.stats.executors_lost.fetch_add(1, Ordering::Relaxed);
            let name = self.executors.name_of(executor).unwrap_or_default();
            fx.log(format!(
                "executor {executor} ({name}) lost ({why}); its {gpus} GPUs are offline"
            ));
        }
        if let Some(key) = self.link_of.remove(&executor) {
            let link = self.links.get_mut(&key).expect("link_of names open links");
            link.executor = None;
            // In plan order: the same re-plans on every run.
            let mut flights: Vec<(u64, InFlight)> = link.inflight.drain().collect();
            flights.sort_unstable_by_key(|&(plan_id, _)| plan_id);
            link.overdue.clear();
            if !link.failed {
                link.failed = true;
                // Told why, so it reconnects at once.
                fx.fail(
                    Peer::Link(key),
                    ErrorCode::Refused,
                    &format!("executor {executor} was lost: {why}"),
                );
            }
            for (_, flight) in flights {
                self.inflight_requests -= flight.ids.len();
                for &id in &flight.ids {
                    self.replan_or_lose(RequestKey::of_id(id), fx);
                }
                self.id_lists.push(flight.ids);
            }
            self.executors.release(executor);
        }
        // Planning may be faster now that the executor is gone.
        self.apply_planning_profiles();
        if broadcast {
            for dest in 0..self.shard_count {
                if dest != self.id as usize {
                    fx.send(dest, ShardMsg::ExecutorLost(executor));
                }
            }
        }
        self.touched = true;
    }

    /// A link's reader ended: if it was its executor's current link, the executor is lost.
    pub(super) fn link_closed(&mut self, key: ConnectionKey, writer_died: bool, fx: &mut Effects) {
        let Some(link) = self.links.get(&key) else {
            return;
        };
        if let Some(executor) = link.executor {
            let why = match (&link.why, writer_died) {
                (Some(why), _) => why.clone(),
                (None, true) => "it stopped taking its plans (its link's writes failed or stalled)".to_string(),
                (None, false) => "its link closed".to_string(),
            };
            self.executor_lost(executor, true, &why, fx);
        }
        self.links.remove(&key);
    }

    /// The plans queued on a link would pass its write buffer's limit.
    pub(super) fn link_overflowed(&mut self, key: ConnectionKey, fx: &mut Effects) {
        if let Some(executor) = self.links.get(&key).and_then(LinkState::executor) {
            self.executor_lost(
                executor,
                true,
                "its link's write queue is full: it does not take its plans",
                fx,
            );
        }
    }
}
