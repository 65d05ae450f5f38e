//! The autoscaling experiment: one long, time-varying workload through several (policy,
//! signal) pairs on a cluster whose GPUs come and go (`symphony_core::autoscale`), reported
//! as GPU-hours and bad rate over the measured part, and GPUs over time beside the offered
//! load.

use std::fmt;
use std::str::FromStr;

use symphony_core::autoscale::{Autoscale, Signal};
use symphony_core::policy::{Knobs, PolicyKind};
use symphony_core::sim::{simulate, ExecModel, Second, SimConfig, Summary};
use symphony_core::workload::Workload;

/// One run: a policy, and the signal its cluster follows (`None`: a fixed cluster of every
/// slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub policy: PolicyKind,
    pub signal: Option<Signal>,
}

/// The policies an autoscaler can resize: they plan on whichever GPUs are online.
pub const SCALABLE: &[PolicyKind] = &[
    PolicyKind::Symphony,
    PolicyKind::SymphonyRef,
    PolicyKind::Eager,
    PolicyKind::Triton,
];

/// The runs of `symphony autoscale` by default: ours with its signal, the usual eager
/// dispatch with utilization scaling, the reference configuration with our signal, the two
/// signals swapped, Triton with utilization scaling, and fixed clusters for scale.
pub const DEFAULT_RUNS: &str =
    "symphony:desired,eager:utilization,symphony-ref:desired,symphony:utilization,eager:desired,triton:utilization,symphony:fixed,eager:fixed";

impl FromStr for Run {
    type Err = String;

    fn from_str(text: &str) -> Result<Run, String> {
        let (policy, signal) = text
            .split_once(':')
            .ok_or_else(|| format!("run `{text}`: expected POLICY:SIGNAL, for example symphony:desired"))?;
        let policy: PolicyKind = policy.parse()?;
        let signal = match signal {
            "fixed" => None,
            other => Some(other.parse::<Signal>().map_err(|e| format!("{e} (or `fixed`)"))?),
        };
        if let Some(signal) = signal {
            check(policy, signal).map_err(|e| format!("run `{text}`: {e}"))?;
        }
        Ok(Run { policy, signal })
    }
}

/// Whether `policy` can run on a cluster scaled on `signal`: it must plan on a changing set
/// of GPUs ([`SCALABLE`]), and `desired` needs a policy that estimates its demand (the
/// deferred family; Triton's dispatcher does not).
pub fn check(policy: PolicyKind, signal: Signal) -> Result<(), String> {
    if !SCALABLE.contains(&policy) {
        return Err(format!(
            "{policy} plans on a fixed set of GPUs; the autoscaled policies are {}",
            SCALABLE.iter().map(|p| p.name()).collect::<Vec<_>>().join(", ")
        ));
    }
    if signal == Signal::Desired && policy == PolicyKind::Triton {
        return Err(format!(
            "{policy} estimates no demand for the `desired` signal; scale it on `utilization`"
        ));
    }
    Ok(())
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.signal {
            Some(signal) => write!(f, "{}:{}", self.policy, signal),
            None => write!(f, "{}:fixed", self.policy),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Spec {
    pub workload: Workload,
    pub runs: Vec<Run>,
    /// The most GPUs there can be (a fixed run has them all).
    pub slots: u32,
    /// The autoscaler's knobs; each run sets its own signal.
    pub autoscale: Autoscale,
    pub knobs: Knobs,
    pub exec: ExecModel,
    pub seed: u64,
    pub threads: usize,
}

/// One run's outcome.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub run: Run,
    pub summary: Summary,
    pub timeline: Vec<Second>,
}

/// Runs every run of `spec`, `spec.threads` at a time; results in the order of `spec.runs`.
pub fn run(spec: &Spec) -> Vec<Outcome> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..spec.threads.max(1).min(spec.runs.len()) {
            scope.spawn(|| loop {
                let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&run) = spec.runs.get(index) else { break };
                let config = SimConfig {
                    gpu_count: spec.slots,
                    seed: spec.seed,
                    knobs: spec.knobs.clone(),
                    exec: spec.exec,
                    autoscale: run.signal.map(|signal| Autoscale {
                        signal,
                        ..spec.autoscale
                    }),
                    ..SimConfig::of(&spec.workload, run.policy)
                };
                let report = simulate(&spec.workload, &config);
                let outcome = Outcome {
                    run,
                    summary: report.summary,
                    timeline: report.timeline,
                };
                results.lock().expect("no panics while held").push((index, outcome));
            });
        }
    });
    let mut results = results.into_inner().expect("no panics while held");
    results.sort_by_key(|(index, _)| *index);
    results.into_iter().map(|(_, outcome)| outcome).collect()
}

/// The markdown table of `outcomes`: GPU-hours paid (and as a fraction of the fixed cluster
/// of every slot), mean and peak GPUs, GPU-hours busy, bad rates, batch sizes.
pub fn table(outcomes: &[Outcome], bench_s: f64) -> String {
    let mut text = String::from(
        "| run | GPU-hours paid | of all slots | mean / peak GPUs | GPU-hours busy | bad % (avg of models) | bad % (of requests) | worst model % | mean batch | GPUs started / let go |\n\
         | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for o in outcomes {
        let s = &o.summary;
        let all_slots_s = f64::from(s.gpu_count) * bench_s;
        let (started, drained) = s.autoscale.as_ref().map_or((0, 0), |a| (a.started, a.drained));
        text += &format!(
            "| {} | {:.3} | {:.2} | {:.1} / {} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {} / {} |\n",
            o.run,
            s.gpu_paid_s / 3600.0,
            s.gpu_paid_s / all_slots_s,
            s.gpu_paid_s / bench_s,
            s.gpus_paid_peak,
            s.gpu_busy_s / 3600.0,
            s.bad_rate,
            s.counts.bad_rate_percent(),
            s.bad_rate_worst,
            s.mean_batch_size,
            started,
            drained
        );
    }
    text
}

/// `second,offered,RUN paid,RUN busy,RUN bad,...`: every second of the longest run.
pub fn timeline_csv(outcomes: &[Outcome]) -> String {
    let mut text = String::from("second,offered");
    for o in outcomes {
        text += &format!(",{0} paid,{0} online,{0} busy,{0} recommended,{0} bad", o.run);
    }
    text.push('\n');
    let seconds = outcomes.iter().map(|o| o.timeline.len()).max().unwrap_or(0);
    for i in 0..seconds {
        let offered = outcomes
            .iter()
            .find_map(|o| o.timeline.get(i))
            .map_or(0, |s| s.arrivals);
        text += &format!("{i},{offered}");
        for o in outcomes {
            let s = o.timeline.get(i).copied().unwrap_or_default();
            text += &format!(
                ",{:.3},{:.3},{:.3},{},{}",
                s.paid_gpus, s.online_gpus, s.busy_gpus, s.recommended, s.bad
            );
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_parse_and_refuse_what_cannot_scale() {
        let run: Run = "symphony:desired".parse().unwrap();
        assert_eq!(run.signal, Some(Signal::Desired));
        assert_eq!(run.to_string(), "symphony:desired");
        assert_eq!("eager:fixed".parse::<Run>().unwrap().signal, None);
        let e = "clockwork:utilization".parse::<Run>().unwrap_err();
        assert!(e.contains("fixed set of GPUs"), "{e}");
        assert!("symphony".parse::<Run>().unwrap_err().contains("POLICY:SIGNAL"));
        assert!("symphony:hpa"
            .parse::<Run>()
            .unwrap_err()
            .contains("desired, utilization"));
        assert!("triton:desired"
            .parse::<Run>()
            .unwrap_err()
            .contains("estimates no demand"));
        assert!("triton:utilization".parse::<Run>().is_ok());
        for run in DEFAULT_RUNS.split(',') {
            run.parse::<Run>().unwrap();
        }
    }
}
