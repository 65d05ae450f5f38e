//! Goodput and fewest-GPU sweeps: every (workload, policy) pair searched on its own thread
//! from a small pool, with a live progress line on stderr.

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use symphony_core::policy::{Knobs, PolicyKind};
use symphony_core::sim::{simulate_with, SimConfig};
use symphony_core::sweep::{find_fewest_gpus, find_goodput_scale, BAD_RATE_BOUND_PERCENT};
use symphony_core::workload::Workload;

/// What a sweep searches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Find {
    /// The largest common rate scale whose average bad rate stays <= 1 %.
    Goodput,
    /// The fewest GPUs that keep the average bad rate <= 1 % at the given load.
    Gpus,
}

#[derive(Debug, Clone)]
pub struct SweepSpec {
    pub workloads: Vec<(PathBuf, Workload)>,
    pub policies: Vec<PolicyKind>,
    pub find: Find,
    /// GPUs for the goodput search (default: each workload's own).
    pub gpu_count: Option<u32>,
    /// Scale each workload to this total bench rate (default: its own rates).
    pub total_rps: Option<f64>,
    pub seed: Option<u64>,
    pub knobs: Knobs,
    /// Give Nexus the true rates up front (see `SimConfig::nexus_true_rates`).
    pub nexus_true_rates: bool,
    /// How the fake GPUs run batches against their profile: the same for every policy.
    pub exec: symphony_core::sim::ExecModel,
    /// Load points per policy on each plotted curve (0: no curves).
    pub curve_points: u32,
    pub threads: usize,
    pub progress: bool,
}

/// A point of a bad-rate curve.
#[derive(Debug, Clone, Serialize)]
pub struct CurvePoint {
    pub offered_rps: f64,
    pub bad_rate: f64,
}

/// The result for one (workload, policy).
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub workload: String,
    pub policy: String,
    pub gpu_count: u32,
    /// Goodput search: the largest rate scale within the bound, and its offered load.
    pub goodput_rate_scale: Option<f64>,
    pub goodput_rps: Option<f64>,
    /// GPU search: the fewest GPUs within the bound (None: more than the search limit).
    pub gpus_needed: Option<u32>,
    /// At the workload's own (or `total_rps`) load, on `gpu_count` GPUs.
    pub base_offered_rps: f64,
    pub base_bad_rate: f64,
    pub base_gpus_used: u32,
    pub base_gpu_busy_s: f64,
    pub base_mean_batch_size: f64,
    /// Each GPU's busy fraction over the bench phase, by GPU index.
    pub base_gpu_busy_fraction: Vec<f64>,
    pub curve: Vec<CurvePoint>,
    pub simulations: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SweepResult {
    pub find: String,
    pub bad_rate_bound_percent: f64,
    pub knobs: String,
    pub cells: Vec<Cell>,
}

/// Runs the sweep.
pub fn run(spec: &SweepSpec) -> SweepResult {
    let jobs: Vec<(usize, PolicyKind)> = (0..spec.workloads.len())
        .flat_map(|w| spec.policies.iter().map(move |&p| (w, p)))
        .collect();
    let next_job = AtomicUsize::new(0);
    let simulations = AtomicU64::new(0);
    let done_jobs = AtomicUsize::new(0);
    let cells = Mutex::new(Vec::new());
    let threads = spec.threads.clamp(1, jobs.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let index = next_job.fetch_add(1, Ordering::Relaxed);
                let Some(&(workload_index, policy)) = jobs.get(index) else {
                    break;
                };
                let cell = run_cell(spec, workload_index, policy, &simulations, &done_jobs, jobs.len());
                done_jobs.fetch_add(1, Ordering::Relaxed);
                cells.lock().expect("no panics hold the lock").push((index, cell));
            });
        }
    });
    if spec.progress {
        eprintln!();
    }
    let mut cells = cells.into_inner().expect("threads joined");
    cells.sort_by_key(|(index, _)| *index);
    SweepResult {
        find: match spec.find {
            Find::Goodput => "goodput",
            Find::Gpus => "gpus",
        }
        .to_string(),
        bad_rate_bound_percent: BAD_RATE_BOUND_PERCENT,
        knobs: format!("{:?}", spec.knobs),
        cells: cells.into_iter().map(|(_, c)| c).collect(),
    }
}

fn run_cell(
    spec: &SweepSpec,
    workload_index: usize,
    policy: PolicyKind,
    simulations: &AtomicU64,
    done_jobs: &AtomicUsize,
    job_count: usize,
) -> Cell {
    let (path, workload) = &spec.workloads[workload_index];
    let base_scale = match spec.total_rps {
        Some(total) => total / workload.total_bench_rps(),
        None => 1.0,
    };
    let mut config = SimConfig::of(workload, policy);
    config.knobs = spec.knobs.clone();
    config.nexus_true_rates = spec.nexus_true_rates;
    config.exec = spec.exec;
    config.gpu_count = spec.gpu_count.unwrap_or(workload.gpu_count);
    config.seed = spec.seed.unwrap_or(workload.seed);
    let mut arrivals = Vec::new();
    let mut count = 0u64;
    let name = workload_name(path);
    let mut evaluate = |rate_scale: f64, gpu_count: u32| {
        let mut c = config.clone();
        c.rate_scale = rate_scale;
        c.gpu_count = gpu_count;
        let summary = simulate_with(workload, &c, &mut arrivals).summary;
        count += 1;
        let total = simulations.fetch_add(1, Ordering::Relaxed) + 1;
        if spec.progress {
            eprint!(
                "\r\x1b[Ksweep: {}/{} searches done, {total} simulations; {name} {policy}: scale {rate_scale:.3} gpus {gpu_count} -> bad {:.2} %",
                done_jobs.load(Ordering::Relaxed),
                job_count,
                summary.bad_rate
            );
            let _ = std::io::stderr().flush();
        }
        summary
    };
    let base = evaluate(base_scale, config.gpu_count);
    let mut cell = Cell {
        workload: name.clone(),
        policy: policy.name().to_string(),
        gpu_count: config.gpu_count,
        goodput_rate_scale: None,
        goodput_rps: None,
        gpus_needed: None,
        base_offered_rps: base.offered_rps,
        base_bad_rate: base.bad_rate,
        base_gpus_used: base.gpus_used,
        base_gpu_busy_s: base.gpu_busy_s,
        base_mean_batch_size: base.mean_batch_size,
        base_gpu_busy_fraction: base.gpu_busy_fraction.clone(),
        curve: Vec::new(),
        simulations: 0,
    };
    match spec.find {
        Find::Goodput => {
            let gpus = config.gpu_count;
            let scale = find_goodput_scale(base_scale, BAD_RATE_BOUND_PERCENT, |s| evaluate(s, gpus).bad_rate);
            cell.goodput_rate_scale = Some(scale);
            cell.goodput_rps = Some(scale * workload.total_bench_rps());
            if spec.curve_points > 0 {
                // From a quarter of this workload's full-GPU bound to past it: the same
                // grid for every policy of the workload, so curves compare point by point.
                let bound_rps = load_bound_rps(workload, gpus);
                for i in 1..=spec.curve_points {
                    let offered = bound_rps * (0.25 + 0.95 * f64::from(i) / f64::from(spec.curve_points));
                    let s = evaluate(offered / workload.total_bench_rps(), gpus);
                    cell.curve.push(CurvePoint {
                        offered_rps: s.offered_rps,
                        bad_rate: s.bad_rate,
                    });
                }
            }
        }
        Find::Gpus => {
            cell.gpus_needed = find_fewest_gpus(BAD_RATE_BOUND_PERCENT, |g| evaluate(base_scale, g).bad_rate);
        }
    }
    cell.simulations = count;
    cell
}

/// An upper bound on what `gpu_count` GPUs can serve of this workload's mix: every GPU at the
/// best single-model throughput any of its models allows within its SLO.
pub fn load_bound_rps(workload: &Workload, gpu_count: u32) -> f64 {
    let best = workload
        .models
        .iter()
        .map(|m| m.profile.peak_throughput_rps(m.slo_ns).0)
        .fold(0.0, f64::max);
    best * f64::from(gpu_count)
}

pub fn workload_name(path: &std::path::Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// The workloads of `cells`, in the order they first appear.
fn workload_names(cells: &[Cell]) -> Vec<&str> {
    let mut workloads: Vec<&str> = Vec::new();
    for cell in cells {
        if !workloads.contains(&cell.workload.as_str()) {
            workloads.push(&cell.workload);
        }
    }
    workloads
}

/// A markdown table: one row per workload, one column per policy, `value` in each cell.
fn grid(workloads: &[&str], policies: &[PolicyKind], value: impl Fn(&str, PolicyKind) -> String) -> String {
    let mut text = String::from("| workload |");
    for p in policies {
        text.push_str(&format!(" {} |", p.name()));
    }
    text.push_str("\n| --- |");
    for _ in policies {
        text.push_str(" ---: |");
    }
    text.push('\n');
    for &w in workloads {
        text.push_str(&format!("| {w} |"));
        for &p in policies {
            text.push_str(&format!(" {} |", value(w, p)));
        }
        text.push('\n');
    }
    text
}

/// The result as a markdown table: one row per workload, one column per policy.
pub fn table(result: &SweepResult, policies: &[PolicyKind]) -> String {
    grid(&workload_names(&result.cells), policies, |w, p| {
        let cell = result.cells.iter().find(|c| c.workload == w && c.policy == p.name());
        match (cell, result.find.as_str()) {
            (Some(c), "goodput") => c.goodput_rps.map_or("-".into(), |g| format!("{g:.0}")),
            (Some(c), _) => c.gpus_needed.map_or("> limit".into(), |g| g.to_string()),
            (None, _) => "-".into(),
        }
    })
}

/// At the base load: bad rate, GPUs used and GPU-seconds busy per policy.
pub fn base_table(result: &SweepResult) -> String {
    let mut text = String::from(
        "| workload | policy | offered req/s | bad rate % | GPUs used | GPU-s busy | mean batch | busy % by GPU index |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |\n",
    );
    for c in &result.cells {
        text.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {} of {} | {:.2} | {:.1} | {} |\n",
            c.workload,
            c.policy,
            c.base_offered_rps,
            c.base_bad_rate,
            c.base_gpus_used,
            c.gpu_count,
            c.base_gpu_busy_s,
            c.base_mean_batch_size,
            c.base_gpu_busy_fraction
                .iter()
                .map(|f| format!("{:.0}", 100.0 * f))
                .collect::<Vec<_>>()
                .join(" ")
        ));
    }
    text
}

/// One sweep per arrival seed, as one table: per (workload, policy) the median over the seeds
/// and, in parentheses, the smallest and largest.
pub fn median_table(results: &[(u64, SweepResult)], policies: &[PolicyKind]) -> String {
    let Some((_, first)) = results.first() else {
        return String::new();
    };
    let goodput = first.find == "goodput";
    grid(&workload_names(&first.cells), policies, |w, p| {
        let mut values: Vec<f64> = results
            .iter()
            .filter_map(|(_, r)| r.cells.iter().find(|c| c.workload == w && c.policy == p.name()))
            .filter_map(|c| {
                if goodput {
                    c.goodput_rps
                } else {
                    c.gpus_needed.map(f64::from)
                }
            })
            .collect();
        if values.len() < results.len() {
            return "-".to_string();
        }
        values.sort_by(f64::total_cmp);
        let mid = values.len() / 2;
        // An even count: the mean of the middle two.
        let median = if values.len() % 2 == 0 {
            (values[mid - 1] + values[mid]) / 2.0
        } else {
            values[mid]
        };
        format!("{median:.0} ({:.0} to {:.0})", values[0], values[values.len() - 1])
    })
}
