//! One seed gives one run, byte for byte: the dump (`plans.csv`, `requests.csv`,
//! `summary.json`) of a workload and seed is identical across runs for every policy, another
//! seed gives other arrivals, and the dump's columns are exactly what users and scripts read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use symphony_core::policy::{Knobs, PolicyKind};
use symphony_core::sim::{write_dump, PlanStatus, SimConfig, SimReport};
use symphony_core::workload::Workload;
use symphony_verify::{audit, simulate_bounded};

/// Three models of different speeds and burstiness on two GPUs, loaded enough that some
/// requests are dropped or late under some policies: every outcome shows up in the dump.
const WORKLOAD: &str = "\
seed: 0xabcdabcd987
gpus: 2
models:
- framework: sleep#1082,5204,0,0
  model: resnet
  slo: 100
  gap: exp
  warmup: [{duration: 0.3, rps: 600}]
  bench: [{duration: 1, rps: 600}]
  cooldown: [{duration: 0.3, rps: 600}]
- framework: sleep#400,2000,0,0
  model: small
  slo: 40
  gap: gamma:0.1
  warmup: [{duration: 0.3, rps: 900}]
  bench: [{duration: 1, rps: 900}]
  cooldown: [{duration: 0.3, rps: 900}]
- framework: sleep#1500,8000,0,0
  model: big
  slo: 150
  gap: const
  segment_duration: 0.5
  warmup: [100]
  bench: [150, 250]
  cooldown: [250]
";

const SIM_LIMIT: Duration = Duration::from_secs(30);

const PLANS_HEADER: &str = "plan_id,gpu,model,batch_size,exec_at_ns,finish_at_ns";
const REQUESTS_HEADER: &str = "request_id,model,phase,arrival_ns,deadline_ns,outcome,plan_id,finish_ns";
const DUMP_FILES: [&str; 3] = ["plans.csv", "requests.csv", "summary.json"];

fn workload() -> Workload {
    Workload::parse(WORKLOAD, Path::new("."), "determinism.yaml").expect("the test workload parses")
}

fn all_policies() -> Vec<PolicyKind> {
    PolicyKind::NAMES
        .iter()
        .map(|name| name.parse().expect("every listed name parses"))
        .collect()
}

fn run(workload: &Workload, policy: PolicyKind, seed: u64) -> SimReport {
    let config = SimConfig {
        seed,
        ..SimConfig::of(workload, policy)
    };
    simulate_bounded(workload, &config, SIM_LIMIT).unwrap_or_else(|e| panic!("{e}"))
}

/// A fresh directory under the system temp dir, removed (with its files) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> TempDir {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("symphony-verify-{}-{n}-{label}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn dump(report: &SimReport, label: &str) -> (TempDir, HashMap<&'static str, Vec<u8>>) {
    let dir = TempDir::new(label);
    write_dump(report, &dir.0).expect("the dump is written");
    let files = DUMP_FILES
        .iter()
        .map(|&name| {
            let bytes = std::fs::read(dir.0.join(name)).unwrap_or_else(|e| panic!("{name} was not written: {e}"));
            (name, bytes)
        })
        .collect();
    (dir, files)
}

#[test]
fn same_seed_same_dump_for_every_policy() {
    let workload = workload();
    for policy in all_policies() {
        let first = run(&workload, policy, workload.seed);
        let second = run(&workload, policy, workload.seed);
        let (_a, files_a) = dump(&first, &format!("{policy}-a"));
        let (_b, files_b) = dump(&second, &format!("{policy}-b"));
        for name in DUMP_FILES {
            assert!(!files_a[name].is_empty(), "{policy}: {name} is empty");
            assert!(
                files_a[name] == files_b[name],
                "{policy}: {name} differs between two runs of the same workload and seed"
            );
        }
    }
}

#[test]
fn another_seed_gives_other_arrivals() {
    let workload = workload();
    for policy in all_policies() {
        let (_a, one) = dump(&run(&workload, policy, 1), &format!("{policy}-seed1"));
        let (_b, two) = dump(&run(&workload, policy, 2), &format!("{policy}-seed2"));
        assert!(
            one["requests.csv"] != two["requests.csv"],
            "{policy}: seeds 1 and 2 give the same requests.csv"
        );
    }
}

fn text(files: &HashMap<&'static str, Vec<u8>>, name: &str) -> String {
    String::from_utf8(files[name].clone()).unwrap_or_else(|_| panic!("{name} is not UTF-8"))
}

fn field<T: std::str::FromStr>(row: &[&str], index: usize, what: &str, line: &str) -> T {
    row[index]
        .parse()
        .unwrap_or_else(|_| panic!("{what} `{}` is not a number in `{line}`", row[index]))
}

/// The dump read back as a user's script would: exact headers, one row per done plan and per
/// request, plan times that match the profiles, outcomes that match the summary.
#[test]
fn dump_columns_read_back() {
    let workload = workload();
    let profiles: HashMap<&str, _> = workload.models.iter().map(|m| (m.name.as_str(), &m.profile)).collect();
    for policy in all_policies() {
        let report = run(&workload, policy, workload.seed);
        audit(&report, &workload, &Knobs::default()).unwrap_or_else(|e| panic!("{policy}: {e}"));
        let (_dir, files) = dump(&report, &format!("{policy}-columns"));

        // plans.csv: the done plans, each running exactly its profile time.
        let plans = text(&files, "plans.csv");
        let mut lines = plans.lines();
        assert_eq!(lines.next(), Some(PLANS_HEADER), "{policy}: plans.csv header");
        let mut plan_finish: HashMap<u64, (String, u64)> = HashMap::new();
        for line in lines {
            let row: Vec<&str> = line.split(',').collect();
            assert_eq!(row.len(), 6, "{policy}: plans.csv row `{line}`");
            let plan_id: u64 = field(&row, 0, "plan_id", line);
            let gpu: u32 = field(&row, 1, "gpu", line);
            let model = row[2];
            let batch_size: u32 = field(&row, 3, "batch_size", line);
            let exec_at_ns: u64 = field(&row, 4, "exec_at_ns", line);
            let finish_at_ns: u64 = field(&row, 5, "finish_at_ns", line);
            assert!(gpu < workload.gpu_count, "{policy}: `{line}` names gpu {gpu}");
            let profile = profiles
                .get(model)
                .unwrap_or_else(|| panic!("{policy}: `{line}` names an unknown model"));
            assert!(
                (1..=profile.batch_size_max()).contains(&batch_size),
                "{policy}: `{line}`: batch size out of range"
            );
            assert_eq!(
                finish_at_ns - exec_at_ns,
                profile.exec_ns(batch_size),
                "{policy}: `{line}` runs other than its profile time"
            );
            assert!(
                plan_finish.insert(plan_id, (model.to_string(), finish_at_ns)).is_none(),
                "{policy}: plan {plan_id} listed twice"
            );
        }
        let done = report.plans.iter().filter(|p| p.status == PlanStatus::Done).count();
        assert_eq!(plan_finish.len(), done, "{policy}: plans.csv lists every done plan");
        assert!(done > 0, "{policy}: ran nothing");

        // requests.csv: every request once, in id order; plan and finish exactly for served ones.
        let requests = text(&files, "requests.csv");
        let mut lines = requests.lines();
        assert_eq!(lines.next(), Some(REQUESTS_HEADER), "{policy}: requests.csv header");
        let mut counted: HashMap<&str, u64> = HashMap::new();
        let mut rows = 0usize;
        for (index, line) in lines.enumerate() {
            let row: Vec<&str> = line.split(',').collect();
            assert_eq!(row.len(), 8, "{policy}: requests.csv row `{line}`");
            rows += 1;
            let id: usize = field(&row, 0, "request_id", line);
            assert_eq!(id, index, "{policy}: request ids in order");
            assert!(
                profiles.contains_key(row[1]),
                "{policy}: `{line}` names an unknown model"
            );
            let phase = row[2];
            assert!(
                ["warmup", "bench", "cooldown"].contains(&phase),
                "{policy}: phase in `{line}`"
            );
            let arrival_ns: u64 = field(&row, 3, "arrival_ns", line);
            let deadline_ns: u64 = field(&row, 4, "deadline_ns", line);
            assert!(deadline_ns > arrival_ns, "{policy}: `{line}`");
            let outcome = row[5];
            match outcome {
                "success" | "late" => {
                    let plan_id: u64 = field(&row, 6, "plan_id", line);
                    let finish_ns: u64 = field(&row, 7, "finish_ns", line);
                    let (model, plan_finish_ns) = plan_finish
                        .get(&plan_id)
                        .unwrap_or_else(|| panic!("{policy}: `{line}` names a plan not in plans.csv"));
                    assert_eq!(model, row[1], "{policy}: `{line}` ran in another model's plan");
                    assert_eq!(
                        finish_ns, *plan_finish_ns,
                        "{policy}: `{line}` finish differs from its plan's"
                    );
                    assert_eq!(outcome == "success", finish_ns <= deadline_ns, "{policy}: `{line}`");
                }
                "dropped" | "noreply" => {
                    assert_eq!((row[6], row[7]), ("", ""), "{policy}: `{line}` has a plan but no reply");
                }
                other => panic!("{policy}: unknown outcome `{other}` in `{line}`"),
            }
            if phase == "bench" {
                *counted.entry(outcome).or_default() += 1;
                *counted.entry("total").or_default() += 1;
            }
        }
        assert_eq!(rows, report.requests.len(), "{policy}: one row per request");

        // summary.json: the documented keys, and counts equal to the bench rows.
        let summary: serde_json::Value = serde_json::from_slice(&files["summary.json"]).expect("summary.json is JSON");
        for key in ["total", "success", "dropped", "late", "noreply", "bad_rate", "models"] {
            assert!(
                summary.get(key).is_some(),
                "{policy}: summary.json lacks `{key}`: {summary}"
            );
        }
        for key in ["total", "success", "dropped", "late", "noreply"] {
            assert_eq!(
                summary[key].as_u64(),
                Some(counted.get(key).copied().unwrap_or(0)),
                "{policy}: summary.json `{key}` against requests.csv's bench rows"
            );
        }
        let bad_rate = summary["bad_rate"].as_f64().expect("bad_rate is a number");
        assert!((0.0..=100.0).contains(&bad_rate), "{policy}: bad_rate {bad_rate}");
        let models = summary["models"].as_array().expect("models is a list");
        let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap_or("?")).collect();
        assert_eq!(names, ["resnet", "small", "big"], "{policy}: summary.json models");
    }
}
