//! The executor handshake: HELLO, PROBE and REGISTER on the front door, then JOIN as the
//! first frame of each link. The protocol is `symphony_core::wire::executor` (and
//! `docs/protocol.md`); the registry is `crate::executors`.
//!
//! Trust: HELLO and JOIN need the token, a JOIN the secret its executor got in WELCOME, and
//! a shard takes one link per executor.

use symphony_core::gpu_pool::GpuSource;
use symphony_core::policy::Serving;
use symphony_core::profile::Profile;
use symphony_core::wire::executor::{
    self as exec, Hello, Join, Joined, ModelInfo, Probe, ProbeReply, ProfileWire, Register, Registered, Welcome,
};
use symphony_core::wire::{self, ErrorCode, Kind};

use super::{ConnectionKey, Effects, Peer, ShardCore};

pub(super) type Refusal = (ErrorCode, String);

pub(super) fn malformed(error: wire::WireError) -> Refusal {
    (ErrorCode::Malformed, error.to_string())
}

pub(super) fn refused(error: impl std::fmt::Display) -> Refusal {
    (ErrorCode::Refused, error.to_string())
}

/// Frames an executor sends on the front door before its links exist.
pub(super) fn is_control_kind(kind: Kind) -> bool {
    matches!(kind, Kind::ExecHello | Kind::ExecProbe | Kind::ExecRegister)
}

/// What a front-door connection knows of the executor behind it.
#[derive(Debug, Default)]
pub(super) struct Control {
    pub(super) executor: Option<u32>,
    /// Its GPUs' own indices, from HELLO.
    locals: Vec<u32>,
    registered: bool,
}

impl ShardCore {
    /// HELLO, PROBE and REGISTER on the front door.
    pub(super) fn on_control(
        &mut self,
        control: &mut Control,
        peer: Peer,
        kind: Kind,
        payload: &[u8],
        fx: &mut Effects,
    ) -> Result<(), Refusal> {
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
                fx.write_with(peer, |out| exec::encode(out, Kind::ExecWelcome, &welcome))
                    .map_err(malformed)?;
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
                    scheduler_ns: self.now_ns,
                };
                fx.write_with(peer, |out| exec::encode(out, Kind::ExecProbeReply, &reply))
                    .map_err(malformed)?;
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
                fx.write_with(peer, |out| {
                    exec::encode(out, Kind::ExecRegistered, &Registered { executor_id: id })
                })
                .map_err(malformed)?;
                control.registered = true;
            }
            _ => unreachable!("is_control_kind"),
        }
        Ok(())
    }

    /// Plans this shard's models with the live executors' profiles: the fastest as the base,
    /// each executor's GPUs in the speed class of its time factor over it.
    pub(super) fn apply_planning_profiles(&mut self) {
        let Some(planning) = self.executors.planning(&self.catalog.configs) else {
            return;
        };
        for (local, &global) in self.catalog.owned[self.id as usize].iter().enumerate() {
            self.scheduler
                .set_profile(local as u32, planning.profiles[global as usize].clone());
        }
        self.scheduler
            .gpus_mut()
            .set_classes(planning.class_factors, planning.class_of_slot);
    }

    /// JOIN: the first frame of a link.
    pub(super) fn on_join(&mut self, key: ConnectionKey, payload: &[u8], fx: &mut Effects) -> Result<(), Refusal> {
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
            .join(executor, self.id, &join.secret, self.now_ns)
            .map_err(refused)?;
        let link = self.links.get_mut(&key).expect("frames come from open links");
        link.joined(executor, self.now_ns);
        self.link_of.insert(executor, key);
        self.apply_planning_profiles();
        fx.write_with(Peer::Link(key), |out| {
            exec::encode(out, Kind::ExecJoined, &Joined { shard: self.id })
        })
        .map_err(malformed)?;
        if let Some((slots, handoffs)) = outcome.online {
            for shard in handoffs {
                self.scheduler.gpus_mut().push_handoff(shard);
            }
            if let Some(&slot) = slots.first() {
                let gpus = self.scheduler.gpus();
                let factor = gpus.class_factors()[gpus.class_of(slot)];
                fx.log(format!(
                    "executor {executor} ({}) online with {} GPUs, planned at {factor:.2} times the base profiles ({} GPU classes)",
                    outcome.name,
                    slots.len(),
                    gpus.class_factors().len()
                ));
            }
        }
        self.run_timers();
        Ok(())
    }
}
