//! GPU counts that follow the load: the simulator's autoscaler, and the signal the service
//! exports (`symphony_desired_gpus`).
//!
//! Every `interval` the scaler reads one of two signals and recommends a GPU count:
//!
//! - [`Signal::Desired`], ours: the GPUs the load needs with deferral, the policy's
//!   `demand_gpus` (each model's rate x its target batch's run time / that batch's size),
//!   divided by `target_busy` and rounded up ([`desired_gpus`], the same function the
//!   service's metric uses with a fill of 1).
//! - [`Signal::Utilization`], the usual one, as a Kubernetes HPA computes it: the online
//!   GPUs' busy fraction over the last `window`, `ceil(online x busy / target_busy)`, left
//!   alone while `busy / target_busy` is within the HPA's 10 % tolerance of 1.
//!
//! A recommendation above the GPUs provisioned starts new ones at once; they take plans
//! `startup` later (and are paid for from the moment they were asked for). Going down waits,
//! as an HPA's scale-down stabilization does: the count drops to the largest recommendation
//! of the last `leave_after`; GPUs still starting are cancelled first, then the online ones of
//! the highest index are drained: they take no new plan and leave when their last one ends.
//!
//! This is a pure state machine over slot indices; the simulator tells the policy which GPUs
//! it may plan on ([`crate::policy::Policy::set_gpu_available`]).

use std::collections::VecDeque;

use serde::Serialize;

use crate::names::knob_names;

/// What the autoscaler follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Signal {
    /// The policy's own demand (the deferred family's `demand_gpus`; ours).
    Desired,
    /// The GPUs' measured busy fraction, as an HPA targets CPU or GPU utilization.
    Utilization,
}

knob_names!(
    Signal,
    "autoscaling signal",
    Desired = "desired",
    Utilization = "utilization"
);

/// The HPA's tolerance: no change while the utilization ratio is within this of 1.
pub const HPA_TOLERANCE: f64 = 0.1;

/// The autoscaler's knobs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Autoscale {
    pub signal: Signal,
    /// Never fewer online or starting.
    pub min_gpus: u32,
    /// Online at time 0.
    pub initial_gpus: u32,
    /// From the ask to the first plan a new GPU can take.
    pub startup_ns: u64,
    /// Scale-down stabilization: the count drops to the largest recommendation of this long.
    pub leave_after_ns: u64,
    /// How often the signal is read.
    pub interval_ns: u64,
    /// The busy fraction both signals aim at.
    pub target_busy: f64,
    /// The utilization signal averages the busy fraction over this long.
    pub window_ns: u64,
}

impl Autoscale {
    /// The defaults of `symphony sim --autoscale`: a 30 s start-up, an HPA's 15 s sync period,
    /// a 60 s scale-down stabilization, 70 % busy, utilization over 30 s.
    pub fn new(signal: Signal) -> Autoscale {
        Autoscale {
            signal,
            min_gpus: 1,
            initial_gpus: 1,
            startup_ns: 30_000_000_000,
            leave_after_ns: 60_000_000_000,
            interval_ns: 15_000_000_000,
            target_busy: 0.7,
            window_ns: 30_000_000_000,
        }
    }

    /// Checks the knobs against `slots` GPU slots; says what is wrong.
    pub fn check(&self, slots: u32) -> Result<(), String> {
        if self.min_gpus == 0 {
            return Err("the autoscaler's minimum must be at least 1 GPU".into());
        }
        if self.min_gpus > slots {
            return Err(format!(
                "the autoscaler's minimum ({}) is above the GPU slots ({slots})",
                self.min_gpus
            ));
        }
        if !(self.min_gpus..=slots).contains(&self.initial_gpus) {
            return Err(format!(
                "the initial GPUs ({}) must be between the minimum ({}) and the slots ({slots})",
                self.initial_gpus, self.min_gpus
            ));
        }
        if self.interval_ns == 0 || self.window_ns == 0 {
            return Err("the autoscaler's interval and window must be longer than 0".into());
        }
        if !(self.target_busy.is_finite() && self.target_busy > 0.0 && self.target_busy <= 1.0) {
            return Err("the autoscaler's target busy fraction must be in (0, 1]".into());
        }
        Ok(())
    }
}

/// The GPUs a demand of `demand_gpus` GPU-seconds per second needs when each is to be
/// `fill` busy, rounded up (the service's `symphony_desired_gpus` uses a fill of 1).
pub fn desired_gpus(demand_gpus: f64, fill: f64) -> u32 {
    if !(demand_gpus.is_finite() && demand_gpus > 0.0) || fill <= 0.0 {
        return 0;
    }
    // A hair under an integer is that integer: the demand is a sum of floats.
    (demand_gpus / fill - 1e-9).ceil().clamp(0.0, f64::from(u32::MAX)) as u32
}

/// The HPA's recommendation: `ceil(online x busy / target)`, or `online` within the tolerance.
pub fn utilization_gpus(online: u32, busy_fraction: f64, target_busy: f64) -> u32 {
    let ratio = busy_fraction / target_busy;
    if (ratio - 1.0).abs() <= HPA_TOLERANCE {
        return online;
    }
    (f64::from(online) * ratio - 1e-9).ceil().max(0.0) as u32
}

/// A GPU slot's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Off,
    /// Asked for; takes plans from `ready_ns`.
    Starting {
        ready_ns: u64,
    },
    On,
    /// Takes no new plan; leaves when its last one ends.
    Draining,
}

/// What one tick decided, by slot index.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Actions {
    /// Slots asked for (now [`Slot::Starting`]).
    pub started: Vec<u32>,
    /// Starting slots no longer wanted (now [`Slot::Off`]).
    pub cancelled: Vec<u32>,
    /// Online slots let go (now [`Slot::Draining`]: take them out of planning).
    pub drained: Vec<u32>,
    /// Draining slots wanted again (now [`Slot::On`]: back into planning).
    pub kept: Vec<u32>,
}

/// The autoscaler's state: a slot per GPU and the recent recommendations.
#[derive(Debug, Clone)]
pub struct Scaler {
    config: Autoscale,
    slots: Vec<Slot>,
    /// `(tick time, recommendation)` within the last `leave_after`.
    recent: VecDeque<(u64, u32)>,
    next_tick_ns: u64,
    started: u64,
    drained: u64,
}

impl Scaler {
    /// `slots` GPU slots, the first `initial_gpus` online.
    pub fn new(config: Autoscale, slots: u32) -> Result<Scaler, String> {
        config.check(slots)?;
        Ok(Scaler {
            config,
            slots: (0..slots)
                .map(|i| if i < config.initial_gpus { Slot::On } else { Slot::Off })
                .collect(),
            recent: VecDeque::new(),
            next_tick_ns: config.interval_ns,
            started: 0,
            drained: 0,
        })
    }

    pub fn config(&self) -> &Autoscale {
        &self.config
    }

    pub fn slot(&self, gpu: u32) -> Slot {
        self.slots[gpu as usize]
    }

    pub fn count(&self, wanted: impl Fn(Slot) -> bool) -> u32 {
        self.slots.iter().filter(|&&s| wanted(s)).count() as u32
    }

    pub fn online(&self) -> u32 {
        self.count(|s| s == Slot::On)
    }

    /// Slots that cost: online, starting or draining.
    pub fn paid(&self) -> u32 {
        self.count(|s| s != Slot::Off)
    }

    /// GPUs asked for and GPUs let go so far.
    pub fn started_total(&self) -> u64 {
        self.started
    }

    pub fn drained_total(&self) -> u64 {
        self.drained
    }

    pub fn next_tick_ns(&self) -> u64 {
        self.next_tick_ns
    }

    /// The earliest start-up that completes, if any.
    pub fn next_ready_ns(&self) -> Option<u64> {
        self.slots
            .iter()
            .filter_map(|s| match s {
                Slot::Starting { ready_ns } => Some(*ready_ns),
                _ => None,
            })
            .min()
    }

    /// Starting slots whose start-up is over by `now_ns` go online; returns them.
    pub fn take_ready(&mut self, now_ns: u64) -> Vec<u32> {
        let mut ready = Vec::new();
        for (gpu, slot) in self.slots.iter_mut().enumerate() {
            if matches!(*slot, Slot::Starting { ready_ns } if ready_ns <= now_ns) {
                *slot = Slot::On;
                ready.push(gpu as u32);
            }
        }
        ready
    }

    /// A draining slot's last plan ended: it leaves.
    pub fn left(&mut self, gpu: u32) {
        assert_eq!(self.slots[gpu as usize], Slot::Draining, "only a draining GPU leaves");
        self.slots[gpu as usize] = Slot::Off;
    }

    /// The signal's recommendation at a tick: `demand_gpus` for [`Signal::Desired`], the
    /// online GPUs' busy fraction over the window for [`Signal::Utilization`].
    pub fn recommend(&self, demand_gpus: Option<f64>, busy_fraction: f64) -> u32 {
        let wanted = match self.config.signal {
            Signal::Desired => desired_gpus(demand_gpus.unwrap_or(0.0), self.config.target_busy),
            Signal::Utilization => utilization_gpus(self.online(), busy_fraction, self.config.target_busy),
        };
        wanted.clamp(self.config.min_gpus, self.slots.len() as u32)
    }

    /// A tick at `now_ns` with the signal's recommendation; the next tick is one interval on.
    pub fn tick(&mut self, now_ns: u64, recommended: u32) -> Actions {
        let mut actions = Actions::default();
        self.next_tick_ns = now_ns + self.config.interval_ns;
        self.recent.push_back((now_ns, recommended));
        while let Some(&(at_ns, _)) = self.recent.front() {
            if at_ns + self.config.leave_after_ns > now_ns {
                break;
            }
            self.recent.pop_front();
        }
        let provisioned = self.count(|s| matches!(s, Slot::On | Slot::Starting { .. }));
        if recommended > provisioned {
            let mut missing = recommended - provisioned;
            // A draining GPU is the fastest to get back: it is still there.
            for (gpu, slot) in self.slots.iter_mut().enumerate() {
                if missing > 0 && *slot == Slot::Draining {
                    *slot = Slot::On;
                    actions.kept.push(gpu as u32);
                    missing -= 1;
                }
            }
            let ready_ns = now_ns + self.config.startup_ns;
            for (gpu, slot) in self.slots.iter_mut().enumerate() {
                if missing > 0 && *slot == Slot::Off {
                    *slot = Slot::Starting { ready_ns };
                    actions.started.push(gpu as u32);
                    self.started += 1;
                    missing -= 1;
                }
            }
            return actions;
        }
        let keep = self
            .recent
            .iter()
            .map(|&(_, r)| r)
            .max()
            .unwrap_or(recommended)
            .max(self.config.min_gpus);
        let mut excess = provisioned.saturating_sub(keep);
        for (gpu, slot) in self.slots.iter_mut().enumerate().rev() {
            if excess > 0 && matches!(slot, Slot::Starting { .. }) {
                *slot = Slot::Off;
                actions.cancelled.push(gpu as u32);
                excess -= 1;
            }
        }
        for (gpu, slot) in self.slots.iter_mut().enumerate().rev() {
            if excess > 0 && *slot == Slot::On {
                *slot = Slot::Draining;
                actions.drained.push(gpu as u32);
                self.drained += 1;
                excess -= 1;
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn config(signal: Signal) -> Autoscale {
        Autoscale {
            initial_gpus: 2,
            ..Autoscale::new(signal)
        }
    }

    #[test]
    fn the_signals_round_as_documented() {
        assert_eq!(desired_gpus(0.0, 0.7), 0);
        assert_eq!(desired_gpus(2.1, 0.7), 3);
        assert_eq!(desired_gpus(2.0999999999, 0.7), 3, "a float hair under 3");
        assert_eq!(desired_gpus(2.2, 0.7), 4);
        assert_eq!(desired_gpus(3.0, 1.0), 3);
        assert_eq!(desired_gpus(f64::NAN, 1.0), 0);
        // HPA: 4 GPUs at 35 % for a 70 % target -> 2; at 75 % -> within tolerance, 4.
        assert_eq!(utilization_gpus(4, 0.35, 0.7), 2);
        assert_eq!(utilization_gpus(4, 0.75, 0.7), 4);
        assert_eq!(utilization_gpus(4, 1.0, 0.7), 6);
    }

    #[test]
    fn up_at_once_after_the_startup_and_down_only_after_the_stabilization() {
        let mut scaler = Scaler::new(config(Signal::Desired), 8).unwrap();
        assert_eq!((scaler.online(), scaler.paid()), (2, 2));
        let up = scaler.tick(15 * S, 5);
        assert_eq!(up.started, vec![2, 3, 4]);
        assert_eq!(scaler.paid(), 5, "paid from the ask");
        assert_eq!(scaler.next_ready_ns(), Some(45 * S));
        assert!(scaler.take_ready(44 * S).is_empty());
        assert_eq!(scaler.take_ready(45 * S), vec![2, 3, 4]);
        assert_eq!(scaler.online(), 5);
        // Down to 1: the largest recommendation of the last 60 s still says 5.
        assert_eq!(scaler.tick(60 * S, 1), Actions::default());
        assert_eq!(scaler.tick(70 * S, 1), Actions::default());
        // At 75 s the 5 of 15 s has aged out; the highest-index GPUs drain, to the minimum 1.
        let down = scaler.tick(75 * S, 1);
        assert_eq!(down.drained, vec![4, 3, 2, 1]);
        assert_eq!(scaler.online(), 1);
        assert_eq!(scaler.paid(), 5, "draining GPUs are paid until their last plan ends");
        scaler.left(4);
        scaler.left(3);
        // Wanted again: the draining ones come back first, then a new one starts.
        let again = scaler.tick(90 * S, 4);
        assert_eq!(again.kept, vec![1, 2]);
        assert_eq!(again.started, vec![3]);
        assert_eq!(scaler.started_total(), 4);
        assert_eq!(scaler.drained_total(), 4);
    }

    #[test]
    fn starting_gpus_no_longer_wanted_are_cancelled_before_online_ones_drain() {
        let mut scaler = Scaler::new(
            Autoscale {
                leave_after_ns: 0,
                ..config(Signal::Utilization)
            },
            8,
        )
        .unwrap();
        scaler.tick(15 * S, 4);
        let down = scaler.tick(30 * S, 1);
        assert_eq!(down.cancelled, vec![3, 2]);
        assert_eq!(down.drained, vec![1]);
        assert_eq!(scaler.paid(), 2);
    }

    #[test]
    fn recommendations_stay_within_the_minimum_and_the_slots() {
        let scaler = Scaler::new(config(Signal::Desired), 8).unwrap();
        assert_eq!(scaler.recommend(Some(100.0), 0.0), 8);
        assert_eq!(scaler.recommend(Some(0.0), 0.0), 1);
        assert_eq!(scaler.recommend(None, 0.0), 1);
        let hpa = Scaler::new(config(Signal::Utilization), 8).unwrap();
        assert_eq!(hpa.recommend(None, 1.0), 3, "2 x 1.0 / 0.7");
        assert!(Scaler::new(
            Autoscale {
                min_gpus: 0,
                ..config(Signal::Desired)
            },
            8
        )
        .is_err());
        assert!(Scaler::new(
            Autoscale {
                initial_gpus: 9,
                ..config(Signal::Desired)
            },
            8
        )
        .is_err());
        assert!(Scaler::new(
            Autoscale {
                target_busy: 0.0,
                ..config(Signal::Desired)
            },
            8
        )
        .is_err());
    }
}
