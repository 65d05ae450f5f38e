//! What `GET /metrics` shows, in Prometheus' text format: per-shard counters and histograms,
//! each written by its own shard only and merged when scraped.
//!
//! **No lock and no allocation on the request path.** Every value is an `AtomicU64` that only
//! its shard writes, with a plain load and store (no read-modify-write: one writer), so
//! recording costs a few plain moves; a scrape, on any shard's thread, reads every shard's
//! values with relaxed loads and adds them up. A scrape can see one request counted in
//! `_count` and not yet in a bucket: each value is exact, their sum across values may lag by
//! what a shard does during the scrape.
//!
//! The owner of a model counts its requests' outcomes (`success`, `late`: answered after its
//! deadline, `dropped`, `failed`), queue and compute durations and the batch sizes of its
//! plans; the shard that wrote a reply counts it by status (the rejections a front door makes
//! before any owner sees the request included).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use symphony_core::wire::Status;

use crate::shard::Catalog;

/// Upper bounds of the duration buckets, in microseconds (the last bucket is `+Inf`).
pub const DURATION_BOUNDS_US: [u64; 14] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 5_000_000,
];
/// Upper bounds of the batch-size buckets.
pub const BATCH_BOUNDS: [u64; 11] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024];
/// The error codes the HTTP front end answers with, counted by code.
pub const HTTP_ERROR_CODES: [u16; 5] = [400, 404, 413, 500, 503];
/// Replies are counted by status code (`Status as usize`).
const STATUS_COUNT: usize = 8;
/// The statuses in code order, as metric labels.
const STATUS_LABELS: [&str; STATUS_COUNT] = [
    "ok",
    "dropped",
    "unknown_model",
    "malformed",
    "overloaded",
    "shutting_down",
    "executor_lost",
    "execution_failed",
];

/// Adds `n` to a value only this shard writes.
#[inline]
fn bump(value: &AtomicU64, n: u64) {
    value.store(value.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

fn read(value: &AtomicU64) -> u64 {
    value.load(Ordering::Relaxed)
}

/// A histogram over fixed bounds: a count per bucket (the last one past every bound), the
/// sum of the values.
#[derive(Debug)]
pub struct Buckets<const N: usize> {
    counts: [AtomicU64; N],
    over: AtomicU64,
    sum: AtomicU64,
}

impl<const N: usize> Default for Buckets<N> {
    fn default() -> Self {
        Buckets {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            over: AtomicU64::new(0),
            sum: AtomicU64::new(0),
        }
    }
}

impl<const N: usize> Buckets<N> {
    /// Records `n` observations of `value`.
    #[inline]
    pub fn record(&self, bounds: &[u64; N], value: u64, n: u64) {
        let at = bounds.partition_point(|&bound| bound < value);
        bump(self.counts.get(at).unwrap_or(&self.over), n);
        bump(&self.sum, value.wrapping_mul(n));
    }
}

/// One model's values on its owning shard.
#[derive(Debug, Default)]
pub struct ModelMetrics {
    /// By outcome: success, late, dropped, failed.
    outcomes: [AtomicU64; 4],
    queue_us: Buckets<14>,
    compute_us: Buckets<14>,
    batch_size: Buckets<11>,
    /// Online correction (`[policy] correction`): batches measured, times the planned
    /// profile changed, and the largest factor it is planned at now (f64 bits; 0: none yet).
    corrected_batches: AtomicU64,
    corrections: AtomicU64,
    correction_factor: AtomicU64,
}

/// How one request of a model ended, for [`ModelMetrics`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success = 0,
    /// Executed, but answered after its deadline.
    Late = 1,
    Dropped = 2,
    /// The executor failed or was lost.
    Failed = 3,
}

const OUTCOME_LABELS: [&str; 4] = ["success", "late", "dropped", "failed"];

impl ModelMetrics {
    pub fn outcome(&self, outcome: Outcome, n: u64) {
        bump(&self.outcomes[outcome as usize], n);
    }

    /// A request that ran: from its receipt to its batch's start, and its batch's run.
    #[inline]
    pub fn ran(&self, queued_ns: u64, late: bool) {
        self.outcome(if late { Outcome::Late } else { Outcome::Success }, 1);
        self.queue_us.record(&DURATION_BOUNDS_US, queued_ns / 1000, 1);
    }

    /// A plan of `size` requests that ran for `compute_ns` (each request's compute time).
    pub fn plan(&self, size: u64, compute_ns: u64) {
        self.batch_size.record(&BATCH_BOUNDS, size, 1);
        self.compute_us.record(&DURATION_BOUNDS_US, compute_ns / 1000, size);
    }

    /// Where the model's online correction stands (its owner shard writes it after each
    /// measured batch).
    pub fn correction(&self, summary: &symphony_core::correction::CorrectionSummary) {
        self.corrected_batches.store(summary.measured, Ordering::Relaxed);
        self.corrections.store(summary.updates, Ordering::Relaxed);
        self.correction_factor
            .store(summary.factor_max.to_bits(), Ordering::Relaxed);
    }

    fn correction_factor(&self) -> f64 {
        match read(&self.correction_factor) {
            0 => 1.0,
            bits => f64::from_bits(bits),
        }
    }
}

/// One shard's values.
#[derive(Debug)]
pub struct ShardMetrics {
    /// Per model this shard owns, in its local order.
    pub models: Vec<ModelMetrics>,
    /// Replies this shard wrote to its connections, by status.
    replies: [AtomicU64; STATUS_COUNT],
    /// KServe HTTP requests this shard's front end answered with an error, by code
    /// ([`HTTP_ERROR_CODES`]).
    http_errors: [AtomicU64; HTTP_ERROR_CODES.len()],
    /// Per GPU: nanoseconds this shard's plans ran on it.
    gpu_busy_ns: Vec<AtomicU64>,
    /// The GPUs this shard's models' load needs with deferral (`f64` bits): the sum over
    /// its models of rate x exec(target batch) / target batch.
    demand_gpus: AtomicU64,
}

impl ShardMetrics {
    pub fn new(owned_models: usize, gpus: usize) -> ShardMetrics {
        ShardMetrics {
            models: (0..owned_models).map(|_| ModelMetrics::default()).collect(),
            replies: std::array::from_fn(|_| AtomicU64::new(0)),
            http_errors: std::array::from_fn(|_| AtomicU64::new(0)),
            gpu_busy_ns: (0..gpus).map(|_| AtomicU64::new(0)).collect(),
            demand_gpus: AtomicU64::new(0f64.to_bits()),
        }
    }

    #[inline]
    pub fn reply(&self, status: Status) {
        bump(&self.replies[status as usize], 1);
    }

    /// The HTTP front end answered `code` (counted if it is one of [`HTTP_ERROR_CODES`]).
    pub fn http_error(&self, code: u16) {
        if let Some(at) = HTTP_ERROR_CODES.iter().position(|&c| c == code) {
            bump(&self.http_errors[at], 1);
        }
    }

    pub fn gpu_busy(&self, gpu: u32, ns: u64) {
        if let Some(busy) = self.gpu_busy_ns.get(gpu as usize) {
            bump(busy, ns);
        }
    }

    pub fn set_demand_gpus(&self, gpus: f64) {
        self.demand_gpus.store(gpus.to_bits(), Ordering::Relaxed);
    }

    pub fn demand_gpus(&self) -> f64 {
        f64::from_bits(self.demand_gpus.load(Ordering::Relaxed))
    }
}

/// Service-wide values a scrape adds to the shards'.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub gpus: usize,
    pub gpus_online: usize,
    pub executors_online: usize,
    pub shards: usize,
    /// The speed classes the GPUs are planned in, fastest first (empty: no GPU at all).
    pub classes: Vec<ClassGauge>,
}

/// One GPU speed class as a scrape shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassGauge {
    /// Its time factor over the base profiles (1: as fast as the base).
    pub factor: f64,
    /// Its GPUs online now.
    pub online: usize,
}

impl Gauges {
    /// The online GPUs in GPUs of the base profiles' speed: each over its class's factor.
    pub fn capacity(&self) -> f64 {
        self.classes.iter().map(|c| c.online as f64 / c.factor).sum()
    }
}

/// The GPUs of this cluster that `demand` (GPU-seconds a second at the base profiles' speed)
/// needs, rounded up: on GPUs slower than the base a GPU does less than one base GPU's work,
/// so the count is taken at the online GPUs' mean speed (`online / capacity` base GPUs' time
/// for each), or as is while none is online.
pub fn desired_gpus(demand: f64, online: usize, capacity: f64) -> u32 {
    let scale = if online > 0 && capacity > 0.0 {
        online as f64 / capacity
    } else {
        1.0
    };
    // The simulator's autoscaler reads the same function (with its target busy fraction).
    symphony_core::autoscale::desired_gpus(demand * scale, 1.0)
}

/// Every shard's values and what the gauges read, for a scrape on any shard.
#[derive(Debug)]
pub struct Registry {
    /// By shard: set once the shard has started.
    pub shards: Vec<std::sync::OnceLock<std::sync::Arc<ShardMetrics>>>,
    pub catalog: std::sync::Arc<Catalog>,
    pub table: std::sync::Arc<crate::sync::gpu_table::GpuTable>,
    pub executors: std::sync::Arc<crate::executors::Executors>,
}

impl Registry {
    /// The exposition now (shards that have not started yet count as zero).
    pub fn render(&self) -> String {
        let shards: Vec<std::sync::Arc<ShardMetrics>> = self
            .shards
            .iter()
            .map(|s| {
                s.get()
                    .cloned()
                    .unwrap_or_else(|| std::sync::Arc::new(ShardMetrics::new(0, 0)))
            })
            .collect();
        let classes = self
            .executors
            .planning(&self.catalog.configs)
            .map(|planning| {
                let mut classes: Vec<ClassGauge> = planning
                    .class_factors
                    .iter()
                    .map(|&factor| ClassGauge { factor, online: 0 })
                    .collect();
                for (gpu, &class) in planning.class_of_slot.iter().enumerate() {
                    if self.table.is_online(gpu as u32) {
                        classes[class as usize].online += 1;
                    }
                }
                classes
            })
            .unwrap_or_default();
        let gauges = Gauges {
            gpus: self.table.gpu_count(),
            gpus_online: self.table.online_count(),
            executors_online: self.executors.online_count(),
            shards: self.shards.len(),
            classes,
        };
        render(&self.catalog, &shards, &gauges)
    }
}

/// One model's values now, for its statistics (`/v2/models/{m}/stats`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSnapshot {
    /// By outcome: success, late, dropped, failed.
    pub outcomes: [u64; 4],
    pub queue_count: u64,
    pub queue_sum_us: u64,
    pub compute_count: u64,
    pub compute_sum_us: u64,
    /// Plans run.
    pub batches: u64,
    /// Plans by batch size bucket: `(upper bound, plans)`; the last bound is `u64::MAX`.
    pub batch_sizes: Vec<(u64, u64)>,
}

impl<const N: usize> Buckets<N> {
    fn total(&self) -> u64 {
        self.counts.iter().map(read).sum::<u64>() + read(&self.over)
    }
}

impl Registry {
    /// Model `index`'s values on its owning shard (zero before that shard started).
    pub fn model(&self, index: usize) -> ModelSnapshot {
        let Some(entry) = self.catalog.models.get(index) else {
            return ModelSnapshot::default();
        };
        let Some(shard) = self.shards.get(entry.owner).and_then(|s| s.get()) else {
            return ModelSnapshot::default();
        };
        let Some(m) = shard.models.get(entry.local as usize) else {
            return ModelSnapshot::default();
        };
        let mut batch_sizes: Vec<(u64, u64)> = BATCH_BOUNDS
            .iter()
            .zip(&m.batch_size.counts)
            .map(|(&bound, count)| (bound, read(count)))
            .collect();
        batch_sizes.push((u64::MAX, read(&m.batch_size.over)));
        ModelSnapshot {
            outcomes: std::array::from_fn(|i| read(&m.outcomes[i])),
            queue_count: m.queue_us.total(),
            queue_sum_us: read(&m.queue_us.sum),
            compute_count: m.compute_us.total(),
            compute_sum_us: read(&m.compute_us.sum),
            batches: m.batch_size.total(),
            batch_sizes,
        }
    }
}

/// Escapes a label value (backslash, quote, newline).
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Sums `f` over the shards' owners of each model, by global model id.
fn per_model<T: Copy + Default + std::ops::AddAssign>(
    catalog: &Catalog,
    shards: &[std::sync::Arc<ShardMetrics>],
    f: impl Fn(&ModelMetrics) -> T,
) -> Vec<T> {
    let mut values = vec![T::default(); catalog.models.len()];
    for (shard, metrics) in shards.iter().enumerate() {
        for (local, &global) in catalog.owned.get(shard).into_iter().flatten().enumerate() {
            if let Some(model) = metrics.models.get(local) {
                values[global as usize] += f(model);
            }
        }
    }
    values
}

/// One value per model: `name{model="..."} value` after the series' header.
fn per_model_series<T: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    catalog: &Catalog,
    values: &[T],
) {
    header(out, name, kind, help);
    for (config, value) in catalog.configs.iter().zip(values) {
        let model = label(&config.name);
        let _ = writeln!(out, "{name}{{model=\"{model}\"}} {value}");
    }
}

/// A bucket bound as a label: microseconds as exact decimal seconds, or a plain count.
fn bound_label(bound: u64, micros: bool) -> String {
    if !micros {
        return bound.to_string();
    }
    let text = format!("{}.{:06}", bound / 1_000_000, bound % 1_000_000);
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[allow(clippy::too_many_arguments)]
fn histogram<const N: usize>(
    out: &mut String,
    name: &str,
    help: &str,
    micros: bool,
    bounds: &[u64; N],
    catalog: &Catalog,
    shards: &[std::sync::Arc<ShardMetrics>],
    pick: impl Fn(&ModelMetrics) -> &Buckets<N>,
) {
    // Per model: the bucket counts, past the last bound, the sum (one pass over the shards).
    let mut merged = vec![([0u64; N], 0u64, 0u64); catalog.models.len()];
    for (shard, metrics) in shards.iter().enumerate() {
        for (local, &global) in catalog.owned.get(shard).into_iter().flatten().enumerate() {
            let (Some(model), Some(into)) = (metrics.models.get(local), merged.get_mut(global as usize)) else {
                continue;
            };
            let buckets = pick(model);
            for (total, count) in into.0.iter_mut().zip(&buckets.counts) {
                *total += read(count);
            }
            into.1 += read(&buckets.over);
            into.2 += read(&buckets.sum);
        }
    }
    header(out, name, "histogram", help);
    for (config, (counts, over, sum)) in catalog.configs.iter().zip(merged) {
        let model = label(&config.name);
        let mut cumulative = 0;
        for (bound, count) in bounds.iter().zip(counts) {
            cumulative += count;
            let le = bound_label(*bound, micros);
            let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"{le}\"}} {cumulative}");
        }
        cumulative += over;
        let _ = writeln!(out, "{name}_bucket{{model=\"{model}\",le=\"+Inf\"}} {cumulative}");
        let sum = if micros { sum as f64 / 1e6 } else { sum as f64 };
        let _ = writeln!(out, "{name}_sum{{model=\"{model}\"}} {sum}");
        let _ = writeln!(out, "{name}_count{{model=\"{model}\"}} {cumulative}");
    }
}

/// The Prometheus text exposition of every shard's values and the service's gauges.
pub fn render(catalog: &Catalog, shards: &[std::sync::Arc<ShardMetrics>], gauges: &Gauges) -> String {
    let mut out = String::with_capacity(4096 + catalog.models.len() * 4096);
    header(
        &mut out,
        "symphony_requests_total",
        "counter",
        "Requests of a model by outcome: success (within its deadline), late (answered after it), dropped (its SLO could not be met), failed (its executor failed or was lost).",
    );
    for (outcome, name) in OUTCOME_LABELS.iter().enumerate() {
        let values = per_model(catalog, shards, |m| read(&m.outcomes[outcome]));
        for (config, value) in catalog.configs.iter().zip(values) {
            let model = label(&config.name);
            let _ = writeln!(
                out,
                "symphony_requests_total{{model=\"{model}\",outcome=\"{name}\"}} {value}"
            );
        }
    }
    header(
        &mut out,
        "symphony_replies_total",
        "counter",
        "Replies written to clients by status, front-door rejections (unknown model, malformed, overloaded, shutting down) included.",
    );
    for (status, name) in STATUS_LABELS.iter().enumerate() {
        let value: u64 = shards.iter().map(|s| read(&s.replies[status])).sum();
        let _ = writeln!(out, "symphony_replies_total{{status=\"{name}\"}} {value}");
    }
    header(
        &mut out,
        "symphony_http_errors_total",
        "counter",
        "KServe HTTP requests answered with an error by the front end, by HTTP status (a request the scheduler answered is counted in symphony_replies_total instead).",
    );
    for (at, code) in HTTP_ERROR_CODES.iter().enumerate() {
        let value: u64 = shards.iter().map(|s| read(&s.http_errors[at])).sum();
        let _ = writeln!(out, "symphony_http_errors_total{{code=\"{code}\"}} {value}");
    }
    per_model_series(
        &mut out,
        "symphony_profile_corrections_total",
        "counter",
        "Times a model's planned profile was corrected from measured batch times ([policy] correction; 0 while it is off).",
        catalog,
        &per_model(catalog, shards, |m| read(&m.corrections)),
    );
    per_model_series(
        &mut out,
        "symphony_profile_corrected_batches_total",
        "counter",
        "Batches of a model whose measured time the online correction took in.",
        catalog,
        &per_model(catalog, shards, |m| read(&m.corrected_batches)),
    );
    per_model_series(
        &mut out,
        "symphony_profile_correction_factor",
        "gauge",
        "The largest factor a model's profile is planned at now, over its batch-size ranges or idle gaps (1: as profiled).",
        catalog,
        &per_model(catalog, shards, |m| m.correction_factor()),
    );
    histogram(
        &mut out,
        "symphony_queue_duration_seconds",
        "From a request's receipt to the start of its batch.",
        true,
        &DURATION_BOUNDS_US,
        catalog,
        shards,
        |m| &m.queue_us,
    );
    histogram(
        &mut out,
        "symphony_compute_duration_seconds",
        "Run time of the batch a request ran in.",
        true,
        &DURATION_BOUNDS_US,
        catalog,
        shards,
        |m| &m.compute_us,
    );
    histogram(
        &mut out,
        "symphony_batch_size",
        "Requests in each batch a model ran.",
        false,
        &BATCH_BOUNDS,
        catalog,
        shards,
        |m| &m.batch_size,
    );
    header(
        &mut out,
        "symphony_gpus",
        "gauge",
        "GPU slots: embedded and for executors.",
    );
    let _ = writeln!(out, "symphony_gpus {}", gauges.gpus);
    header(&mut out, "symphony_gpus_online", "gauge", "GPUs plans can go to now.");
    let _ = writeln!(out, "symphony_gpus_online {}", gauges.gpus_online);
    header(
        &mut out,
        "symphony_executors_online",
        "gauge",
        "External executors joined and not lost.",
    );
    let _ = writeln!(out, "symphony_executors_online {}", gauges.executors_online);
    header(&mut out, "symphony_shards", "gauge", "Shards of the scheduler.");
    let _ = writeln!(out, "symphony_shards {}", gauges.shards);
    header(
        &mut out,
        "symphony_gpu_busy_seconds_total",
        "counter",
        "Time plans ran on each GPU; its rate is the GPU's busy fraction.",
    );
    let gpus = shards.iter().map(|s| s.gpu_busy_ns.len()).max().unwrap_or(0);
    for gpu in 0..gpus {
        let ns: u64 = shards.iter().filter_map(|s| s.gpu_busy_ns.get(gpu)).map(read).sum();
        let _ = writeln!(
            out,
            "symphony_gpu_busy_seconds_total{{gpu=\"{gpu}\"}} {}",
            ns as f64 / 1e9
        );
    }
    type ClassValue = fn(&ClassGauge) -> f64;
    let per_class: [(&str, &str, ClassValue); 2] = [
        (
            "symphony_gpu_class_factor",
            "Each GPU speed class's time factor over the base profiles (the fastest per model; 1: as fast), fastest class first.",
            |c| c.factor,
        ),
        (
            "symphony_gpu_class_online",
            "GPUs online in each speed class.",
            |c| c.online as f64,
        ),
    ];
    for (name, help, value) in per_class {
        header(&mut out, name, "gauge", help);
        for (class, c) in gauges.classes.iter().enumerate() {
            let _ = writeln!(out, "{name}{{class=\"{class}\"}} {}", value(c));
        }
    }
    let capacity = gauges.capacity();
    header(
        &mut out,
        "symphony_gpu_capacity",
        "gauge",
        "The online GPUs in GPUs of the base profiles' speed (each over its class's factor): what symphony_demand_gpus is measured against.",
    );
    let _ = writeln!(out, "symphony_gpu_capacity {capacity}");
    let demand: f64 = shards.iter().map(|s| s.demand_gpus()).sum();
    header(
        &mut out,
        "symphony_desired_gpus",
        "gauge",
        "GPUs the current load needs with deferral, at the online GPUs' mean speed, rounded up (symphony_demand_gpus x symphony_gpus_online / symphony_gpu_capacity): the signal for an autoscaler.",
    );
    let desired = desired_gpus(demand, gauges.gpus_online, capacity);
    let _ = writeln!(out, "symphony_desired_gpus {desired}");
    header(
        &mut out,
        "symphony_demand_gpus",
        "gauge",
        "GPU-seconds a second the current load needs with deferral, at the base profiles' speed: each model's rate x its target batch's run time / that batch's size, summed.",
    );
    let _ = writeln!(out, "symphony_demand_gpus {demand}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn desired_gpus_are_counted_at_the_online_gpus_mean_speed() {
        // 4 GPUs at the base's speed and 4 at half of it: 6 base GPUs of capacity. A demand
        // of 4.5 base GPUs needs 4.5 x 8 / 6 = 6 of these GPUs, 4.6 needs 6.13: 7.
        let gauges = Gauges {
            gpus_online: 8,
            classes: vec![
                ClassGauge { factor: 1.0, online: 4 },
                ClassGauge { factor: 2.0, online: 4 },
            ],
            ..Gauges::default()
        };
        assert_eq!(gauges.capacity(), 6.0);
        assert_eq!(desired_gpus(4.5, 8, gauges.capacity()), 6);
        assert_eq!(desired_gpus(4.6, 8, gauges.capacity()), 7);
        // One speed: as the demand says; none online: as the demand says.
        assert_eq!(desired_gpus(4.6, 8, 8.0), 5);
        assert_eq!(desired_gpus(4.6, 0, 0.0), 5);
    }

    #[test]
    fn bounds_are_exact_decimal_labels() {
        assert_eq!(bound_label(100, true), "0.0001");
        assert_eq!(bound_label(2_500, true), "0.0025");
        assert_eq!(bound_label(1_000_000, true), "1");
        assert_eq!(bound_label(5_000_000, true), "5");
        assert_eq!(bound_label(64, false), "64");
    }

    #[test]
    fn a_value_lands_in_the_first_bucket_whose_bound_is_not_below_it() {
        let buckets = Buckets::<11>::default();
        for (value, n) in [(1, 1), (2, 1), (3, 2), (1024, 1), (5000, 4)] {
            buckets.record(&BATCH_BOUNDS, value, n);
        }
        let counts: Vec<u64> = buckets.counts.iter().map(read).collect();
        assert_eq!(counts, [1, 1, 2, 0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(read(&buckets.over), 4);
        assert_eq!(read(&buckets.sum), 1 + 2 + 6 + 1024 + 20_000);
    }
}
