//! The front door: client frames (REQUEST, LIST_MODELS, an executor's control frames),
//! what each connection is owed, and what a closed connection leaves behind.

use std::sync::atomic::Ordering;

use symphony_core::wire::{self, ErrorCode, Frame, Kind, Status, WireError};

use super::handshake::{is_control_kind, Control};
use super::{ConnectionKey, Effects, Origin, Peer, Routed, ShardCore, ShardMsg};
use crate::buffers::ReadBuffer;

/// A client connection as the shard knows it.
#[derive(Debug, Default)]
pub(super) struct ClientState {
    generation: u32,
    /// Requests read and not answered yet, and their input bytes.
    pub(super) owed: u32,
    pub(super) owed_bytes: usize,
    /// Shards (bit `shard % 64`) it sent requests to.
    routed: u64,
    /// It broke the protocol or sent ERROR: what it still sends is not read.
    failed: bool,
    /// The shard is behind it ([`super::Input::Backlog`]): new requests are refused.
    shedding: bool,
    /// What the executor behind it said, if it is an executor's control connection.
    pub(super) control: Control,
}

/// The open client connections, by slot and generation.
#[derive(Debug, Default)]
pub(super) struct Clients {
    slots: Vec<Option<ClientState>>,
    /// Input bytes of the requests all of them are owed replies for.
    pub(super) owed_bytes: usize,
    /// Replies all of them are owed.
    owed: usize,
}

impl Clients {
    pub(super) fn open(&mut self, key: ConnectionKey) {
        let slot = key.slot() as usize;
        if self.slots.len() <= slot {
            self.slots.resize_with(slot + 1, || None);
        }
        assert!(self.slots[slot].is_none(), "slot {slot} opened twice");
        self.slots[slot] = Some(ClientState {
            generation: key.generation(),
            ..ClientState::default()
        });
    }

    pub(super) fn get(&self, key: ConnectionKey) -> Option<&ClientState> {
        self.slots
            .get(key.slot() as usize)?
            .as_ref()
            .filter(|c| c.generation == key.generation())
    }

    fn get_mut(&mut self, key: ConnectionKey) -> Option<&mut ClientState> {
        self.slots
            .get_mut(key.slot() as usize)?
            .as_mut()
            .filter(|c| c.generation == key.generation())
    }

    fn close(&mut self, key: ConnectionKey) -> Option<ClientState> {
        self.get(key)?;
        let state = self.slots[key.slot() as usize].take()?;
        self.owed -= state.owed as usize;
        self.owed_bytes -= state.owed_bytes;
        Some(state)
    }

    /// The shard fell behind the connection, or caught up ([`super::Input::Backlog`]).
    pub(super) fn set_shedding(&mut self, key: ConnectionKey, shedding: bool) {
        if let Some(client) = self.get_mut(key) {
            client.shedding = shedding;
        }
    }

    /// A request was read: it is owed a reply.
    fn owe(&mut self, key: ConnectionKey, input_len: usize) {
        let client = self.get_mut(key).expect("frames come from open connections");
        client.owed += 1;
        client.owed_bytes += input_len;
        self.owed += 1;
        self.owed_bytes += input_len;
    }

    /// A reply to `key`'s request is written; `false` if the connection is gone.
    pub(super) fn answered(&mut self, key: ConnectionKey, input_len: usize) -> bool {
        let Some(client) = self.get_mut(key) else {
            return false;
        };
        assert!(client.owed > 0, "a reply no request of its connection waits for");
        client.owed -= 1;
        client.owed_bytes -= input_len;
        self.owed -= 1;
        self.owed_bytes -= input_len;
        true
    }

    pub(super) fn check(&self) {
        let open = self.slots.iter().flatten();
        let owed: usize = open.clone().map(|c| c.owed as usize).sum();
        let owed_bytes: usize = open.map(|c| c.owed_bytes).sum();
        assert_eq!(
            (owed, owed_bytes),
            (self.owed, self.owed_bytes),
            "what clients are owed"
        );
    }
}

impl ShardCore {
    pub(super) fn on_client_frame(
        &mut self,
        key: ConnectionKey,
        frame: Result<Frame<'_>, WireError>,
        buffer: &ReadBuffer,
        fx: &mut Effects,
    ) {
        let peer = Peer::Client(key);
        match self.clients.get(key) {
            Some(client) if !client.failed => {}
            // A connection that failed is read no further; one not open is not ours.
            _ => return,
        }
        let outcome = match frame {
            Ok(frame) if frame.kind == Kind::Request => {
                self.on_request(key, frame.payload, buffer, fx);
                Ok(())
            }
            Ok(frame) if frame.kind == Kind::ListModels => self.on_list_models(key, frame.payload, fx),
            Ok(frame) if is_control_kind(frame.kind) => {
                let mut control = std::mem::take(&mut self.clients.get_mut(key).expect("open").control);
                let outcome = self.on_control(&mut control, peer, frame.kind, frame.payload, fx);
                self.clients.get_mut(key).expect("open").control = control;
                outcome
            }
            // The client is closing: no answer to an ERROR frame.
            Ok(frame) if frame.kind == Kind::Error => {
                self.clients.get_mut(key).expect("open").failed = true;
                fx.list.push(super::Effect::Close {
                    to: peer,
                    stop_reading: false,
                });
                Ok(())
            }
            Ok(frame) => Err((
                ErrorCode::UnexpectedKind,
                format!("a client sends REQUEST and LIST_MODELS frames, not {}", frame.kind),
            )),
            Err(e) => Err((e.error_code().unwrap_or(ErrorCode::Malformed), e.to_string())),
        };
        if let Err((code, message)) = outcome {
            self.clients.get_mut(key).expect("open").failed = true;
            fx.fail(peer, code, &message);
        }
    }

    /// Whether a connection broke the protocol or said ERROR (its reader stops).
    pub fn client_failed(&self, key: ConnectionKey) -> bool {
        self.clients.get(key).is_some_and(|c| c.failed)
    }

    /// LIST_MODELS: every model, in id order.
    fn on_list_models(
        &mut self,
        key: ConnectionKey,
        payload: &[u8],
        fx: &mut Effects,
    ) -> Result<(), (ErrorCode, String)> {
        let ask = wire::access_list_models(payload).map_err(|e| (ErrorCode::Malformed, e.to_string()))?;
        let answer = self.catalog.models_answer(ask.client_request_id.to_native());
        fx.write_with(Peer::Client(key), |out| wire::encode_models(out, &answer))
            .map_err(|e| {
                (
                    ErrorCode::Malformed,
                    format!("the model list does not fit a frame: {e}"),
                )
            })
    }

    /// One request frame from a client: validated, looked up, routed. Every request that
    /// decodes gets exactly one reply on its connection.
    fn on_request(&mut self, key: ConnectionKey, payload: &[u8], buffer: &ReadBuffer, fx: &mut Effects) {
        let request = match wire::access_request(payload) {
            Ok(request) => request,
            Err(e) => {
                // Which request it was is unknown: an ERROR frame, and the close.
                self.clients.get_mut(key).expect("open").failed = true;
                fx.fail(Peer::Client(key), ErrorCode::Malformed, &e.to_string());
                return;
            }
        };
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let input_len = request.input.len() as u32;
        self.clients.owe(key, input_len as usize);
        let received_ns = self.now_ns;
        let origin = Origin {
            shard: self.id,
            connection: key,
            client_request_id: request.client_request_id.to_native(),
            received_ns,
            input_len,
        };
        let refuse = |core: &mut ShardCore, status: Status, fx: &mut Effects| {
            let timings = core.timings(origin, None);
            core.write_reply(origin, status, timings, &[], fx);
        };
        if wire::check_request(request).is_err() {
            return refuse(self, Status::Malformed, fx);
        }
        let Some(model) = self.catalog.lookup(&request.model) else {
            return refuse(self, Status::UnknownModel, fx);
        };
        let entry = &self.catalog.models[model as usize];
        if entry
            .input_bytes
            .is_some_and(|bytes| bytes as usize != request.input.len())
        {
            return refuse(self, Status::Malformed, fx);
        }
        if self.stopping {
            return refuse(self, Status::ShuttingDown, fx);
        }
        if self.clients.get(key).is_some_and(|c| c.shedding) {
            self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
            self.stats.shed.fetch_add(1, Ordering::Relaxed);
            return refuse(self, Status::Overloaded, fx);
        }
        let slo_ns = match request.slo_us_tighter() {
            Some(slo_us) => entry.slo_ns.min(u64::from(slo_us) * 1000),
            None => entry.slo_ns,
        };
        let owner = entry.owner;
        // Inputs matter only to external executors: otherwise they are not held.
        let input = (self.executors.accepts_executors() && !request.input.is_empty())
            .then(|| buffer.hold(request.input.as_slice()));
        let routed = Routed {
            origin,
            model,
            deadline_ns: symphony_core::request::deadline_ns(received_ns, slo_ns, self.d_resp_ns),
            input,
        };
        if owner == self.id as usize {
            self.admit(routed, fx);
            return;
        }
        self.clients.get_mut(key).expect("open").routed |= 1 << (owner % 64);
        self.awaiting_remote += 1;
        let batch = &mut self.outbox_requests[owner];
        batch.push(routed);
        if batch.len() >= self.limits.routed_batch {
            let requests = self.take_requests(owner);
            fx.send(owner, ShardMsg::Requests(requests));
        }
    }

    /// A client connection closed: what it was owed leaves the shard's budget, an executor
    /// that did not get every link up is gone, and the shards it sent requests to (this one
    /// included) drop those still queued. One that is owed nothing costs no message.
    pub(super) fn client_closed(&mut self, key: ConnectionKey, fx: &mut Effects) {
        let Some(client) = self.clients.close(key) else {
            return;
        };
        if let Some(id) = client.control.executor {
            if !self.executors.is_online(id) {
                self.executor_lost(id, true, "its handshake ended before every link joined", fx);
            }
        }
        if client.owed == 0 {
            return;
        }
        self.cancel_connection(self.id, key);
        for dest in 0..self.shard_count {
            if dest == self.id as usize || client.routed & (1 << (dest % 64)) == 0 {
                continue;
            }
            // Behind its requests still in the outbox.
            if !self.outbox_requests[dest].is_empty() {
                let requests = self.take_requests(dest);
                fx.send(dest, ShardMsg::Requests(requests));
            }
            fx.send(
                dest,
                ShardMsg::Disconnected {
                    shard: self.id,
                    connection: key,
                },
            );
        }
    }
}
