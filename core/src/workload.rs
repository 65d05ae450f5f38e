//! Workloads: which models run, at what rates, in which phases, and the arrivals that follow.
//!
//! A workload file is the reference implementation's YAML format (`seed`, `gpus`, `models`, each
//! model with `framework`, `model`, `slo`, `gap` and `warmup`/`bench`/`cooldown` rate segments),
//! plus one extension: `gap: trace:PATH` replays the gaps of a real arrival trace (a CSV with a
//! `TIMESTAMP` column), time-scaled to each segment's rate. Parsing validates everything up front
//! and reports errors naming the file, the field (`models[3].gap`) and what was expected; after
//! that the types are trusted.
//!
//! [`Workload::generate_arrivals`] turns a workload into a sorted list of arrivals, a
//! deterministic function of the workload, a rate scale and a seed: every model draws from its
//! own PCG stream (see [`model_rng_seed`]), so adding a model never perturbs the others.
//!
//! This module is not a simulator and not a client: it knows nothing of queues, batches or
//! clocks. Times are `u64` nanoseconds from the start of the run (t = 0).

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Exp1};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::profile::{Profile, ProfileError};

/// The most models one workload may hold.
pub const MODELS_LIMIT: usize = 100_000;
/// The most GPUs one workload may ask for.
pub const GPUS_LIMIT: u64 = 65_536;
/// The most requests one segment of one model may produce (`rps * duration`, unscaled).
pub const SEGMENT_REQUESTS_LIMIT: f64 = 100_000_000.0;
/// The most segments (warm-up, bench and cool-down together) one model may have.
pub const SEGMENTS_PER_MODEL_LIMIT: usize = 100_000;
/// The longest a model's phases may last together, in seconds (about 116 days).
pub const MODEL_DURATION_LIMIT_S: f64 = 1e7;
/// The largest SLO, in milliseconds (one hour).
pub const SLO_LIMIT_MS: f64 = 3_600_000.0;
/// The range of a `gamma:K` shape. Below the minimum, almost every gap is zero and the rare
/// huge ones carry the mean: no longer a useful arrival process.
pub const GAMMA_SHAPE_MIN: f64 = 1e-3;
pub const GAMMA_SHAPE_MAX: f64 = 1e6;
/// The most rows one trace file may hold.
pub const TRACE_ROWS_LIMIT: usize = 10_000_000;

/// An error in a workload file or a file it refers to. Every message names the workload file,
/// the field, and what was expected.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("workload {file}: cannot read: {reason}")]
    Read { file: String, reason: String },
    /// YAML syntax, a missing or unknown key, a wrong type. `reason` is serde_yaml's message,
    /// which names the field path (`models[1]: missing field `slo``) and the line.
    #[error("workload {file}: {reason}")]
    Syntax { file: String, reason: String },
    #[error("workload {file}: `{field}`: expected {expected}, got {got}")]
    Invalid {
        file: String,
        field: String,
        expected: String,
        got: String,
    },
    #[error("workload {file}: `{field}`: {error}")]
    Profile {
        file: String,
        field: String,
        #[source]
        error: ProfileError,
    },
    #[error("workload {file}: `{field}`: trace {trace}: cannot read: {reason}")]
    TraceRead {
        file: String,
        field: String,
        trace: String,
        reason: String,
    },
    #[error("workload {file}: `{field}`: trace {trace}, line {line}: {reason}")]
    TraceLine {
        file: String,
        field: String,
        trace: String,
        line: usize,
        reason: String,
    },
}

/// A whole workload: every model, its profile, SLO, arrival process and rate phases.
#[derive(Debug, Clone)]
pub struct Workload {
    pub seed: u64,
    pub gpu_count: u32,
    /// The GPUs by speed (our extension, `gpu_classes`); empty: `gpu_count` GPUs that run
    /// every profile as given.
    pub gpu_classes: Vec<GpuClass>,
    pub models: Vec<ModelSpec>,
    /// The file it came from, for messages.
    pub source: String,
}

/// GPUs of one speed: `count` of them run every batch in its profile's time / `speed`
/// (2: twice as fast as the profile, 0.5: twice as slow).
#[derive(Debug, Clone, PartialEq)]
pub struct GpuClass {
    pub name: String,
    pub count: u32,
    pub speed: f64,
}

/// The most a class's speed may differ from the profile's, either way.
pub const GPU_SPEED_LIMIT: f64 = 100.0;

/// The speeds a GPU class may have (a workload's `gpu_classes`, the service's `[embedded]
/// classes`): within [`GPU_SPEED_LIMIT`] of the profile's either way.
pub fn gpu_speeds() -> std::ops::RangeInclusive<f64> {
    1.0 / GPU_SPEED_LIMIT..=GPU_SPEED_LIMIT
}

/// One model of a workload.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub name: String,
    pub profile: Profile,
    pub slo_ns: u64,
    pub gap: Gap,
    pub phases: Phases,
}

/// The distribution of the gaps between a model's arrivals. Every kind has mean `1 / rps`.
#[derive(Debug, Clone)]
pub enum Gap {
    /// Exactly `1 / rps`.
    Const,
    /// Exponential with rate `rps`: a Poisson process.
    Exp,
    /// Gamma with the given shape and scale `1 / (shape * rps)`; coefficient of variation
    /// `sqrt(1 / shape)`.
    Gamma { shape: f64 },
    /// The trace's own gaps, time-scaled so that their mean is `1 / rps`.
    Trace(Trace),
}

/// An arrival trace, replayed by `gap: trace:PATH`.
#[derive(Clone)]
pub struct Trace {
    pub path: PathBuf,
    /// Where replay starts: the first row at or after this many seconds into the trace (modulo
    /// the trace's span).
    pub offset_s: f64,
    /// Sorted arrival times relative to the first (earliest) row, ns. At least 2 rows, and the
    /// last is > 0.
    pub times_ns: Arc<[u64]>,
}

impl fmt::Debug for Trace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Trace")
            .field("path", &self.path)
            .field("offset_s", &self.offset_s)
            .field("rows", &self.times_ns.len())
            .field("span_ns", &self.span_ns())
            .finish()
    }
}

impl Trace {
    /// The time from the first row to the last.
    pub fn span_ns(&self) -> u64 {
        *self.times_ns.last().expect("a trace has at least 2 rows")
    }

    /// The mean gap between consecutive rows.
    pub fn mean_gap_ns(&self) -> f64 {
        assert!(self.times_ns.len() >= 2);
        self.span_ns() as f64 / (self.times_ns.len() - 1) as f64
    }

    /// The index of the row replay starts at.
    fn start_index(&self) -> usize {
        let offset_ns = (self.offset_s * 1e9).round() as u64 % self.span_ns();
        let index = self.times_ns.partition_point(|&t_ns| t_ns < offset_ns);
        assert!(index < self.times_ns.len());
        index
    }
}

/// A stretch of time at one request rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Segment {
    pub duration_ns: u64,
    pub rps: f64,
}

/// A model's rate over time: warm-up, then bench (the measured part), then cool-down, from
/// t = 0. `bench` is never empty; the others may be.
#[derive(Debug, Clone)]
pub struct Phases {
    pub warmup: Vec<Segment>,
    pub bench: Vec<Segment>,
    pub cooldown: Vec<Segment>,
}

/// Which part of a run a time belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Phase {
    Warmup,
    Bench,
    Cooldown,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Warmup => "warmup",
            Phase::Bench => "bench",
            Phase::Cooldown => "cooldown",
        }
    }
}

/// One request arriving: when, for which model, in which of that model's phases.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arrival {
    pub arrival_ns: u64,
    pub model_index: u32,
    pub phase: Phase,
}

/// A segment placed on the time line: `[start_ns, end_ns)`.
#[derive(Clone, Copy, Debug)]
struct Span {
    start_ns: u64,
    end_ns: u64,
    rps: f64,
    phase: Phase,
}

fn duration_ns(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| s.duration_ns).sum()
}

impl Phases {
    pub fn warmup_end_ns(&self) -> u64 {
        duration_ns(&self.warmup)
    }

    pub fn bench_end_ns(&self) -> u64 {
        self.warmup_end_ns() + duration_ns(&self.bench)
    }

    pub fn end_ns(&self) -> u64 {
        self.bench_end_ns() + duration_ns(&self.cooldown)
    }

    /// The phase whose span contains `t_ns`, or `None` at or past the end.
    pub fn phase_at(&self, t_ns: u64) -> Option<Phase> {
        if t_ns < self.warmup_end_ns() {
            Some(Phase::Warmup)
        } else if t_ns < self.bench_end_ns() {
            Some(Phase::Bench)
        } else if t_ns < self.end_ns() {
            Some(Phase::Cooldown)
        } else {
            None
        }
    }

    /// The (unscaled) rate at `t_ns`, or `None` at or past the end.
    pub fn rps_at(&self, t_ns: u64) -> Option<f64> {
        self.spans().find(|span| t_ns < span.end_ns).map(|span| span.rps)
    }

    /// The time-weighted mean rate of the bench phase.
    pub fn bench_mean_rps(&self) -> f64 {
        let duration = duration_ns(&self.bench) as f64;
        assert!(duration > 0.0);
        let requests: f64 = self.bench.iter().map(|s| s.rps * s.duration_ns as f64).sum();
        requests / duration
    }

    /// Every segment in time order, placed on the time line.
    fn spans(&self) -> impl Iterator<Item = Span> + '_ {
        let mut start_ns = 0u64;
        [
            (Phase::Warmup, &self.warmup),
            (Phase::Bench, &self.bench),
            (Phase::Cooldown, &self.cooldown),
        ]
        .into_iter()
        .flat_map(|(phase, segments)| segments.iter().map(move |s| (phase, *s)))
        .map(move |(phase, segment)| {
            let span = Span {
                start_ns,
                end_ns: start_ns + segment.duration_ns,
                rps: segment.rps,
                phase,
            };
            start_ns = span.end_ns;
            span
        })
    }
}

impl Workload {
    /// Reads and parses a workload file. Trace and profile-table paths are relative to the
    /// file's directory.
    pub fn load(path: &Path) -> Result<Workload, WorkloadError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| WorkloadError::Read {
            file: source.clone(),
            reason: e.to_string(),
        })?;
        let base_dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        Workload::parse(&text, base_dir, &source)
    }

    /// Parses workload text. `base_dir` resolves relative paths; `source` names the text in
    /// messages.
    pub fn parse(text: &str, base_dir: &Path, source: &str) -> Result<Workload, WorkloadError> {
        let raw: RawWorkload = serde_yaml::from_str(text).map_err(|e| WorkloadError::Syntax {
            file: source.to_string(),
            reason: e.to_string(),
        })?;
        let invalid = |field: String, expected: &str, got: String| WorkloadError::Invalid {
            file: source.to_string(),
            field,
            expected: expected.to_string(),
            got,
        };

        if raw.gpus < 1 || raw.gpus > GPUS_LIMIT {
            return Err(invalid(
                "gpus".into(),
                &format!("an integer in 1..={GPUS_LIMIT}"),
                raw.gpus.to_string(),
            ));
        }
        if raw.models.is_empty() || raw.models.len() > MODELS_LIMIT {
            return Err(invalid(
                "models".into(),
                &format!("a list of 1..={MODELS_LIMIT} models"),
                format!("{} models", raw.models.len()),
            ));
        }

        let mut traces: HashMap<PathBuf, Arc<[u64]>> = HashMap::new();
        let mut names: HashMap<&str, usize> = HashMap::with_capacity(raw.models.len());
        let mut models = Vec::with_capacity(raw.models.len());
        for (index, model) in raw.models.iter().enumerate() {
            let field = |name: &str| format!("models[{index}].{name}");

            if model.model.trim().is_empty() {
                return Err(invalid(field("model"), "a non-empty name", "``".into()));
            }
            if let Some(first) = names.insert(model.model.as_str(), index) {
                return Err(invalid(
                    field("model"),
                    "a name unique among the models",
                    format!("`{}`, also the name of models[{first}]", model.model),
                ));
            }

            let slo_ms = model.slo;
            if !(slo_ms.is_finite() && slo_ms > 0.0 && slo_ms <= SLO_LIMIT_MS) {
                return Err(invalid(
                    field("slo"),
                    &format!("milliseconds, a number > 0 and <= {SLO_LIMIT_MS}"),
                    slo_ms.to_string(),
                ));
            }
            let slo_ns = ((slo_ms * 1e6).round() as u64).max(1);

            let framework = model.framework.trim();
            let profile = if let Some(table) = framework.strip_prefix("table:") {
                Profile::load_table(&base_dir.join(table.trim()))
            } else {
                Profile::parse_linear(framework, slo_ns)
            }
            .map_err(|error| WorkloadError::Profile {
                file: source.to_string(),
                field: field("framework"),
                error,
            })?;

            let gap = parse_gap(&model.gap)
                .map_err(|expected| invalid(field("gap"), expected, format!("`{}`", model.gap)))?;
            let gap = match gap {
                RawGap::Const => Gap::Const,
                RawGap::Exp => Gap::Exp,
                RawGap::Gamma { shape } => Gap::Gamma { shape },
                RawGap::Trace(path_text) => {
                    let offset_s = model.trace_offset_s.unwrap_or(0.0);
                    if !(offset_s.is_finite() && offset_s >= 0.0) {
                        return Err(invalid(
                            field("trace_offset_s"),
                            "seconds, a finite number >= 0",
                            offset_s.to_string(),
                        ));
                    }
                    let path = base_dir.join(path_text);
                    let times_ns = match traces.get(&path) {
                        Some(times_ns) => Arc::clone(times_ns),
                        None => {
                            let times_ns = load_trace(&path).map_err(|e| match e {
                                TraceError::Read(reason) => WorkloadError::TraceRead {
                                    file: source.to_string(),
                                    field: field("gap"),
                                    trace: path.display().to_string(),
                                    reason,
                                },
                                TraceError::Line { line, reason } => WorkloadError::TraceLine {
                                    file: source.to_string(),
                                    field: field("gap"),
                                    trace: path.display().to_string(),
                                    line,
                                    reason,
                                },
                            })?;
                            traces.insert(path.clone(), Arc::clone(&times_ns));
                            times_ns
                        }
                    };
                    Gap::Trace(Trace {
                        path,
                        offset_s,
                        times_ns,
                    })
                }
            };
            if model.trace_offset_s.is_some() && !matches!(gap, Gap::Trace(_)) {
                return Err(invalid(
                    field("trace_offset_s"),
                    "no `trace_offset_s` unless `gap` is `trace:PATH`",
                    format!("gap `{}`", model.gap),
                ));
            }

            if let Some(seconds) = model.segment_duration {
                if !(seconds.is_finite() && seconds > 0.0) {
                    return Err(invalid(
                        field("segment_duration"),
                        "seconds, a finite number > 0",
                        seconds.to_string(),
                    ));
                }
            }
            let phase_segments = |name: &str, raw: Option<&[RawSegment]>| {
                convert_segments(raw.unwrap_or(&[]), model.segment_duration, &|position| match position {
                    Some(position) => format!("models[{index}].{name}[{position}]"),
                    None => format!("models[{index}].{name}"),
                })
                .map_err(|(field, expected, got)| invalid(field, &expected, got))
            };
            let phases = Phases {
                warmup: phase_segments("warmup", model.warmup.as_deref())?,
                bench: phase_segments("bench", Some(&model.bench))?,
                cooldown: phase_segments("cooldown", model.cooldown.as_deref())?,
            };
            if phases.bench.is_empty() {
                return Err(invalid(
                    field("bench"),
                    "a non-empty list of segments",
                    "an empty list".into(),
                ));
            }
            let segment_count = phases.warmup.len() + phases.bench.len() + phases.cooldown.len();
            if segment_count > SEGMENTS_PER_MODEL_LIMIT {
                return Err(invalid(
                    index_field(index),
                    &format!("at most {SEGMENTS_PER_MODEL_LIMIT} segments"),
                    segment_count.to_string(),
                ));
            }
            let total_s: f64 = [&phases.warmup, &phases.bench, &phases.cooldown]
                .iter()
                .flat_map(|segments| segments.iter())
                .map(|s| s.duration_ns as f64 / 1e9)
                .sum();
            if total_s > MODEL_DURATION_LIMIT_S {
                return Err(invalid(
                    index_field(index),
                    &format!("phases lasting at most {MODEL_DURATION_LIMIT_S} s together"),
                    format!("{total_s} s"),
                ));
            }

            models.push(ModelSpec {
                name: model.model.clone(),
                profile,
                slo_ns,
                gap,
                phases,
            });
        }

        let mut gpu_classes = Vec::new();
        for (i, class) in raw.gpu_classes.iter().enumerate() {
            let field = |name: &str| format!("gpu_classes[{i}].{name}");
            if class.count == 0 || class.count > GPUS_LIMIT {
                return Err(invalid(
                    field("count"),
                    &format!("an integer in 1..={GPUS_LIMIT}"),
                    class.count.to_string(),
                ));
            }
            let speeds = gpu_speeds();
            if !speeds.contains(&class.speed) {
                return Err(invalid(
                    field("speed"),
                    &format!("a factor in [{}, {}]", speeds.start(), speeds.end()),
                    class.speed.to_string(),
                ));
            }
            gpu_classes.push(GpuClass {
                name: class.name.clone(),
                count: class.count as u32,
                speed: class.speed,
            });
        }
        let class_gpus: u64 = raw.gpu_classes.iter().map(|c| c.count).sum();
        if !raw.gpu_classes.is_empty() && class_gpus != raw.gpus {
            return Err(invalid(
                "gpu_classes".into(),
                &format!("classes whose counts add up to `gpus` ({})", raw.gpus),
                format!("{class_gpus} GPUs"),
            ));
        }
        let workload = Workload {
            seed: raw.seed.0,
            gpu_count: raw.gpus as u32,
            gpu_classes,
            models,
            source: source.to_string(),
        };
        for model in &workload.models {
            assert!(model.phases.bench_end_ns() > model.phases.warmup_end_ns());
        }
        Ok(workload)
    }

    /// `[min over models of warmup end, max over models of bench end]`.
    pub fn bench_window_ns(&self) -> (u64, u64) {
        let start_ns = self.models.iter().map(|m| m.phases.warmup_end_ns()).min();
        let end_ns = self.models.iter().map(|m| m.phases.bench_end_ns()).max();
        (start_ns.unwrap_or(0), end_ns.unwrap_or(0))
    }

    /// Each GPU's time factor, in GPU index order by class: `1 / speed` (empty without
    /// `gpu_classes`).
    pub fn gpu_factors(&self) -> Vec<f64> {
        self.gpu_classes
            .iter()
            .flat_map(|c| std::iter::repeat_n(1.0 / c.speed, c.count as usize))
            .collect()
    }

    /// The length of [`Workload::bench_window_ns`], seconds.
    pub fn bench_s(&self) -> f64 {
        let (start_ns, end_ns) = self.bench_window_ns();
        (end_ns - start_ns) as f64 / 1e9
    }

    /// The max over models of the end of cool-down.
    pub fn end_ns(&self) -> u64 {
        self.models.iter().map(|m| m.phases.end_ns()).max().unwrap_or(0)
    }

    /// The sum over models of the time-weighted mean rate of the bench phase.
    pub fn total_bench_rps(&self) -> f64 {
        self.models.iter().map(|m| m.phases.bench_mean_rps()).sum()
    }

    /// All arrivals of all models, every model's rps multiplied by `rate_scale`, sorted by
    /// `(arrival_ns, model_index)`. `seed` replaces the file's seed. Clears `out` first and
    /// reuses its capacity.
    ///
    /// Per model, from t = 0, phases in order: the first arrival falls uniformly in
    /// `[0, 1/rps)` after the start of the first segment with a rate above zero; each next one
    /// follows after a gap drawn with the rate of the segment that holds the previous arrival.
    /// A time that falls in a segment of rate zero is dropped: the model jumps to the start of
    /// the next segment and draws a gap from there. Generation stops at the end of cool-down.
    pub fn generate_arrivals(&self, rate_scale: f64, seed: u64, out: &mut Vec<Arrival>) {
        assert!(rate_scale.is_finite() && rate_scale >= 0.0, "rate_scale {rate_scale}");
        out.clear();
        let expected: f64 = self
            .models
            .iter()
            .flat_map(|m| m.phases.spans())
            .map(|span| span.rps * rate_scale * (span.end_ns - span.start_ns) as f64 / 1e9)
            .sum();
        // An estimate: the process is random. Capped so a huge scale cannot reserve wildly.
        out.reserve((expected * 1.02 + 64.0).min((1u64 << 26) as f64) as usize);

        let mut spans: Vec<Span> = Vec::new();
        for (model_index, model) in self.models.iter().enumerate() {
            spans.clear();
            spans.extend(model.phases.spans().map(|span| Span {
                rps: span.rps * rate_scale,
                ..span
            }));
            let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(model_rng_seed(seed, model_index));
            let mut gaps = UnitGaps::new(&model.gap);
            generate_model(&spans, model_index as u32, &mut gaps, &mut rng, out);
        }
        out.sort_unstable_by_key(|arrival| (arrival.arrival_ns, arrival.model_index));
    }
}

fn index_field(index: usize) -> String {
    format!("models[{index}]")
}

/// The seed of model `model_index`'s PCG stream for run seed `seed`:
/// `splitmix64(seed ^ splitmix64(model_index + 1))`. Every model gets a well-mixed, distinct
/// stream, independent of how many models there are.
pub fn model_rng_seed(seed: u64, model_index: usize) -> u64 {
    splitmix64(seed ^ splitmix64(model_index as u64 + 1))
}

/// The SplitMix64 finalizer (Steele, Lea, Flood 2014).
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Draws gaps of mean 1; the caller scales them by `1e9 / rps`.
enum UnitGaps<'a> {
    Const,
    Exp,
    Gamma(rand_distr::Gamma<f64>),
    Trace {
        times_ns: &'a [u64],
        index: usize,
        mean_gap_ns: f64,
    },
}

impl<'a> UnitGaps<'a> {
    fn new(gap: &'a Gap) -> UnitGaps<'a> {
        match gap {
            Gap::Const => UnitGaps::Const,
            Gap::Exp => UnitGaps::Exp,
            Gap::Gamma { shape } => {
                UnitGaps::Gamma(rand_distr::Gamma::new(*shape, 1.0 / *shape).expect("shape validated at parse"))
            }
            Gap::Trace(trace) => UnitGaps::Trace {
                times_ns: &trace.times_ns,
                index: trace.start_index(),
                mean_gap_ns: trace.mean_gap_ns(),
            },
        }
    }

    #[inline]
    fn sample<R: Rng>(&mut self, rng: &mut R) -> f64 {
        match self {
            UnitGaps::Const => 1.0,
            UnitGaps::Exp => Exp1.sample(rng),
            UnitGaps::Gamma(gamma) => gamma.sample(rng),
            UnitGaps::Trace {
                times_ns,
                index,
                mean_gap_ns,
            } => {
                // One cycle: the trace's n - 1 gaps, then one mean gap to wrap around. The
                // cycle's mean gap is exactly the trace's mean gap.
                let gap_ns = if *index + 1 < times_ns.len() {
                    let gap_ns = times_ns[*index + 1] - times_ns[*index];
                    *index += 1;
                    gap_ns as f64
                } else {
                    *index = 0;
                    *mean_gap_ns
                };
                gap_ns / *mean_gap_ns
            }
        }
    }
}

/// Time as whole nanoseconds plus a fraction in `[0, 1)`: exact at any horizon, and sums of
/// gaps far below a nanosecond still advance.
#[derive(Clone, Copy)]
struct Clock {
    t_ns: u64,
    frac_ns: f64,
}

impl Clock {
    #[inline]
    fn advance(&mut self, gap_ns: f64) {
        debug_assert!(gap_ns >= 0.0);
        let total = self.frac_ns + gap_ns;
        let whole = total.floor();
        self.t_ns = self.t_ns.saturating_add(whole as u64);
        self.frac_ns = total - whole;
    }
}

fn generate_model<R: Rng>(
    spans: &[Span],
    model_index: u32,
    gaps: &mut UnitGaps<'_>,
    rng: &mut R,
    out: &mut Vec<Arrival>,
) {
    let Some(end_ns) = spans.last().map(|span| span.end_ns) else {
        return;
    };
    let Some(first) = spans.iter().position(|span| span.rps > 0.0) else {
        return;
    };
    let mut cursor = first;
    let mut clock = Clock {
        t_ns: spans[first].start_ns,
        frac_ns: 0.0,
    };
    clock.advance(rng.random::<f64>() * 1e9 / spans[first].rps);
    let mut emit = true;
    while clock.t_ns < end_ns {
        while clock.t_ns >= spans[cursor].end_ns {
            cursor += 1;
        }
        let span = spans[cursor];
        assert!(span.start_ns <= clock.t_ns && clock.t_ns < span.end_ns);
        if span.rps <= 0.0 {
            clock = Clock {
                t_ns: span.end_ns,
                frac_ns: 0.0,
            };
            emit = false;
            continue;
        }
        if emit {
            out.push(Arrival {
                arrival_ns: clock.t_ns,
                model_index,
                phase: span.phase,
            });
        }
        emit = true;
        let gap_ns = gaps.sample(rng) * 1e9 / span.rps;
        assert!(gap_ns.is_finite());
        clock.advance(gap_ns);
    }
}

// ---- Parsing -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    seed: RawSeed,
    gpus: u64,
    #[serde(default)]
    gpu_classes: Vec<RawGpuClass>,
    models: Vec<RawModel>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGpuClass {
    name: String,
    count: u64,
    speed: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    framework: String,
    model: String,
    slo: f64,
    gap: String,
    #[serde(default)]
    trace_offset_s: Option<f64>,
    #[serde(default)]
    segment_duration: Option<f64>,
    #[serde(default)]
    warmup: Option<Vec<RawSegment>>,
    bench: Vec<RawSegment>,
    #[serde(default)]
    cooldown: Option<Vec<RawSegment>>,
}

/// A seed: a non-negative integer (YAML reads `0x...` as one), or a string holding one in
/// decimal or `0x` hex.
struct RawSeed(u64);

impl<'de> Deserialize<'de> for RawSeed {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawSeed, D::Error> {
        struct SeedVisitor;
        impl Visitor<'_> for SeedVisitor {
            type Value = RawSeed;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer in 0..2^64, decimal or 0x hex")
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<RawSeed, E> {
                Ok(RawSeed(value))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<RawSeed, E> {
                u64::try_from(value)
                    .map(RawSeed)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(value), &self))
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<RawSeed, E> {
                let text = value.trim().replace('_', "");
                let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => text.parse(),
                };
                parsed
                    .map(RawSeed)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(value), &self))
            }
        }
        deserializer.deserialize_any(SeedVisitor)
    }
}

/// One item of a phase list: a plain rps (lasting `segment_duration`) or
/// `{duration: seconds, rps: number}`.
enum RawSegment {
    Rate(f64),
    Span(RawSpan),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpan {
    duration: f64,
    rps: f64,
}

impl<'de> Deserialize<'de> for RawSegment {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<RawSegment, D::Error> {
        struct SegmentVisitor;
        impl<'de> Visitor<'de> for SegmentVisitor {
            type Value = RawSegment;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an rps number or a map `{duration: seconds, rps: number}`")
            }
            fn visit_u64<E: de::Error>(self, value: u64) -> Result<RawSegment, E> {
                Ok(RawSegment::Rate(value as f64))
            }
            fn visit_i64<E: de::Error>(self, value: i64) -> Result<RawSegment, E> {
                Ok(RawSegment::Rate(value as f64))
            }
            fn visit_f64<E: de::Error>(self, value: f64) -> Result<RawSegment, E> {
                Ok(RawSegment::Rate(value))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<RawSegment, A::Error> {
                RawSpan::deserialize(de::value::MapAccessDeserializer::new(map)).map(RawSegment::Span)
            }
        }
        deserializer.deserialize_any(SegmentVisitor)
    }
}

enum RawGap<'a> {
    Const,
    Exp,
    Gamma { shape: f64 },
    Trace(&'a str),
}

const GAP_EXPECTED: &str = "`const`, `exp`, `gamma:K` (K a shape in [0.001, 1e6]) or `trace:PATH`";

fn parse_gap(text: &str) -> Result<RawGap<'_>, &'static str> {
    let text = text.trim();
    match text {
        "const" => return Ok(RawGap::Const),
        "exp" => return Ok(RawGap::Exp),
        _ => {}
    }
    if let Some(shape) = text.strip_prefix("gamma:") {
        let shape: f64 = shape.trim().parse().map_err(|_| GAP_EXPECTED)?;
        if !(GAMMA_SHAPE_MIN..=GAMMA_SHAPE_MAX).contains(&shape) {
            return Err(GAP_EXPECTED);
        }
        return Ok(RawGap::Gamma { shape });
    }
    if let Some(path) = text.strip_prefix("trace:") {
        let path = path.trim();
        if path.is_empty() {
            return Err(GAP_EXPECTED);
        }
        return Ok(RawGap::Trace(path));
    }
    Err(GAP_EXPECTED)
}

/// Checks and converts one phase list. Errors are `(field, expected, got)`.
fn convert_segments(
    raw: &[RawSegment],
    segment_duration_s: Option<f64>,
    field: &dyn Fn(Option<usize>) -> String,
) -> Result<Vec<Segment>, (String, String, String)> {
    let mut segments = Vec::with_capacity(raw.len());
    for (position, item) in raw.iter().enumerate() {
        let (duration_s, rps) = match item {
            RawSegment::Span(span) => (span.duration, span.rps),
            RawSegment::Rate(rps) => match segment_duration_s {
                Some(duration_s) => (duration_s, *rps),
                None => {
                    return Err((
                        field(Some(position)),
                        "a map `{duration: seconds, rps: number}`, or a model-level \
                         `segment_duration` for a plain rps"
                            .into(),
                        format!("the plain rps {rps} and no `segment_duration`"),
                    ))
                }
            },
        };
        if !(duration_s.is_finite() && duration_s > 0.0 && duration_s <= MODEL_DURATION_LIMIT_S) {
            return Err((
                format!("{}.duration", field(Some(position))),
                format!("seconds, a number > 0 and <= {MODEL_DURATION_LIMIT_S}"),
                duration_s.to_string(),
            ));
        }
        let duration_ns = (duration_s * 1e9).round() as u64;
        if duration_ns == 0 {
            return Err((
                format!("{}.duration", field(Some(position))),
                "seconds, at least one nanosecond".into(),
                duration_s.to_string(),
            ));
        }
        if !(rps.is_finite() && rps >= 0.0) {
            return Err((
                format!("{}.rps", field(Some(position))),
                "a finite number >= 0".into(),
                rps.to_string(),
            ));
        }
        let requests = rps * duration_s;
        if requests > SEGMENT_REQUESTS_LIMIT {
            return Err((
                field(Some(position)),
                format!("rps * duration <= {SEGMENT_REQUESTS_LIMIT} requests"),
                format!("{rps} rps * {duration_s} s = {requests} requests"),
            ));
        }
        segments.push(Segment { duration_ns, rps });
    }
    Ok(segments)
}

// ---- Traces --------------------------------------------------------------------------------

enum TraceError {
    Read(String),
    Line { line: usize, reason: String },
}

fn load_trace(path: &Path) -> Result<Arc<[u64]>, TraceError> {
    let text = std::fs::read_to_string(path).map_err(|e| TraceError::Read(e.to_string()))?;
    parse_trace(&text)
}

/// Parses a CSV with a `TIMESTAMP` column (`YYYY-MM-DD HH:MM:SS[.fraction]`, UTC assumed) into
/// sorted times relative to the earliest row. Line numbers are 1-based and count the header.
fn parse_trace(text: &str) -> Result<Arc<[u64]>, TraceError> {
    let line_error = |line: usize, reason: String| TraceError::Line { line, reason };
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(index, line)| (index + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty());
    let Some((header_line, header)) = lines.next() else {
        return Err(line_error(1, "empty file: expected a header with `TIMESTAMP`".into()));
    };
    let column = header
        .split(',')
        .position(|name| name.trim().trim_matches('"') == "TIMESTAMP")
        .ok_or_else(|| {
            line_error(
                header_line,
                format!("expected a header with a `TIMESTAMP` column, got `{header}`"),
            )
        })?;

    let mut times_ns: Vec<i128> = Vec::new();
    for (line_number, line) in lines {
        if times_ns.len() >= TRACE_ROWS_LIMIT {
            return Err(line_error(line_number, format!("more than {TRACE_ROWS_LIMIT} rows")));
        }
        let field = line.split(',').nth(column).ok_or_else(|| {
            line_error(
                line_number,
                format!("expected a `TIMESTAMP` value in column {}", column + 1),
            )
        })?;
        let t_ns = parse_timestamp_ns(field).map_err(|reason| {
            line_error(
                line_number,
                format!(
                    "`{}`: expected `YYYY-MM-DD HH:MM:SS[.fraction]` ({reason})",
                    field.trim()
                ),
            )
        })?;
        times_ns.push(t_ns);
    }
    if times_ns.len() < 2 {
        return Err(line_error(
            0,
            format!("expected at least 2 rows, got {}", times_ns.len()),
        ));
    }
    times_ns.sort_unstable();
    let first_ns = times_ns[0];
    let span_ns = times_ns[times_ns.len() - 1] - first_ns;
    if span_ns == 0 {
        return Err(line_error(0, "every row has the same time: the trace spans 0 s".into()));
    }
    if u64::try_from(span_ns).is_err() {
        return Err(line_error(0, "the trace spans more than 2^64 ns".into()));
    }
    let relative: Arc<[u64]> = times_ns.iter().map(|&t| (t - first_ns) as u64).collect();
    assert!(relative.windows(2).all(|w| w[0] <= w[1]));
    Ok(relative)
}

/// `YYYY-MM-DD HH:MM:SS[.fraction]` (or `T` between date and time) to ns since the Unix epoch,
/// taking the time as UTC. Fraction digits past the ninth are dropped.
fn parse_timestamp_ns(text: &str) -> Result<i128, String> {
    let text = text.trim().trim_matches('"');
    let (date, time) = text.split_once([' ', 'T']).ok_or("no space between date and time")?;
    let number = |part: &str, name: &str, digits: std::ops::RangeInclusive<usize>| {
        if !digits.contains(&part.len()) || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("bad {name} `{part}`"));
        }
        part.parse::<u32>().map_err(|_| format!("bad {name} `{part}`"))
    };

    let mut date_parts = date.split('-');
    let (Some(year), Some(month), Some(day), None) = (
        date_parts.next(),
        date_parts.next(),
        date_parts.next(),
        date_parts.next(),
    ) else {
        return Err(format!("date `{date}` is not YYYY-MM-DD"));
    };
    let year = number(year, "year", 4..=4)?;
    let month = number(month, "month", 1..=2)?;
    let day = number(day, "day", 1..=2)?;
    if !(1..=12).contains(&month) {
        return Err(format!("month {month} out of 1..=12"));
    }
    if day < 1 || day > days_in_month(year, month) {
        return Err(format!("day {day} out of range for {year}-{month:02}"));
    }

    let mut time_parts = time.trim().split(':');
    let (Some(hour), Some(minute), Some(second), None) = (
        time_parts.next(),
        time_parts.next(),
        time_parts.next(),
        time_parts.next(),
    ) else {
        return Err(format!("time `{time}` is not HH:MM:SS"));
    };
    let (second, fraction) = match second.split_once('.') {
        Some((whole, fraction)) => (whole, Some(fraction)),
        None => (second, None),
    };
    let hour = number(hour, "hour", 1..=2)?;
    let minute = number(minute, "minute", 1..=2)?;
    let second = number(second, "second", 1..=2)?;
    if hour > 23 || minute > 59 || second > 59 {
        return Err(format!("time {hour}:{minute}:{second} out of range"));
    }
    let mut nanos: i128 = 0;
    if let Some(fraction) = fraction {
        if fraction.is_empty() || !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("bad fraction `{fraction}`"));
        }
        for position in 0..9 {
            let digit = fraction.as_bytes().get(position).map_or(0, |b| b - b'0');
            nanos = nanos * 10 + i128::from(digit);
        }
    }

    let days = days_from_civil(i64::from(year), month, day);
    let seconds = i128::from(days) * 86_400 + i128::from(hour) * 3_600 + i128::from(minute) * 60 + i128::from(second);
    Ok(seconds * 1_000_000_000 + nanos)
}

fn days_in_month(year: u32, month: u32) -> u32 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = i64::from((month + 9) % 12);
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHIPPED_WORKLOADS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../workloads");
    const SHIPPED_TRACES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../traces");

    fn parse(text: &str) -> Result<Workload, WorkloadError> {
        Workload::parse(text, Path::new("."), "test.yaml")
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    /// A fresh scratch directory for files a test writes.
    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("symphony-workload-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn one_model(gap: &str, bench: &str) -> String {
        format!(
            "seed: 1\ngpus: 1\nmodels:\n- {{framework: \"sleep#1082,5204,0,0\", model: m, \
             slo: 100, gap: \"{gap}\", bench: {bench}}}\n"
        )
    }

    #[test]
    fn gpu_classes_give_each_gpu_its_factor_and_must_add_up() {
        let with = |classes: &str| one_model("exp", "[{duration: 1, rps: 1}]").replace("gpus: 1\n", classes);
        let w = parse(&with(
            "gpus: 3\ngpu_classes: [{name: h100, count: 1, speed: 1}, {name: a10, count: 2, speed: 0.5}]\n",
        ))
        .unwrap();
        assert_eq!(w.gpu_classes.len(), 2);
        assert_eq!(w.gpu_factors(), vec![1.0, 2.0, 2.0]);
        assert!(parse(&with("gpus: 3\n")).unwrap().gpu_factors().is_empty());
        let e = error(&with("gpus: 4\ngpu_classes: [{name: a, count: 3, speed: 1}]\n"));
        assert!(
            e.contains("`gpu_classes`") && e.contains("add up to `gpus` (4)") && e.contains("3 GPUs"),
            "{e}"
        );
        let e = error(&with("gpus: 1\ngpu_classes: [{name: a, count: 1, speed: 0}]\n"));
        assert!(e.contains("gpu_classes[0].speed"), "{e}");
        let e = error(&with("gpus: 1\ngpu_classes: [{name: a, count: 1}]\n"));
        assert!(e.contains("speed"), "{e}");
    }

    fn count_model(arrivals: &[Arrival], model_index: u32) -> usize {
        arrivals.iter().filter(|a| a.model_index == model_index).count()
    }

    fn check_sorted_and_phased(workload: &Workload, arrivals: &[Arrival]) {
        assert!(arrivals
            .windows(2)
            .all(|w| (w[0].arrival_ns, w[0].model_index) <= (w[1].arrival_ns, w[1].model_index)));
        for arrival in arrivals {
            let phases = &workload.models[arrival.model_index as usize].phases;
            assert_eq!(phases.phase_at(arrival.arrival_ns), Some(arrival.phase));
            assert!(phases.rps_at(arrival.arrival_ns).unwrap() > 0.0);
        }
    }

    #[test]
    fn parses_every_shared_workload() {
        let entries = std::fs::read_dir(SHIPPED_WORKLOADS).expect("the repository ships workloads/");
        let autoscale = std::fs::read_dir(Path::new(SHIPPED_WORKLOADS).join("autoscale"))
            .expect("the repository ships workloads/autoscale/");
        let classes = std::fs::read_dir(Path::new(SHIPPED_WORKLOADS).join("classes"))
            .expect("the repository ships workloads/classes/");
        let exec =
            std::fs::read_dir(Path::new(SHIPPED_WORKLOADS).join("exec")).expect("the repository ships workloads/exec/");
        let mut paths: Vec<PathBuf> = entries
            .chain(autoscale)
            .chain(classes)
            .chain(exec)
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
            .collect();
        paths.sort();
        assert!(!paths.is_empty());
        let mut arrivals = Vec::new();
        for path in &paths {
            let workload = Workload::load(path).unwrap_or_else(|e| panic!("{e}"));
            assert!(!workload.models.is_empty());
            workload.generate_arrivals(1.0, workload.seed, &mut arrivals);
            assert!(!arrivals.is_empty(), "{}", path.display());
            check_sorted_and_phased(&workload, &arrivals);
            assert!(arrivals.last().unwrap().arrival_ns < workload.end_ns());
        }
    }

    #[test]
    fn reference_example_in_detail() {
        let path = Path::new(SHIPPED_WORKLOADS).join("reference-example.yaml");
        let workload = Workload::load(&path).unwrap();
        assert_eq!(workload.seed, 0x0abc_dabc_d987);
        assert_eq!(workload.gpu_count, 8);
        assert_eq!(workload.models[0].name, "resnet_0");
        assert_eq!(workload.models[0].slo_ns, 100_000_000);
        assert!(matches!(workload.models[0].gap, Gap::Const));
        assert!(matches!(workload.models[1].gap, Gap::Gamma { shape } if shape == 0.1));
        let seg = |s: u64, rps: f64| Segment {
            duration_ns: s * 1_000_000_000,
            rps,
        };
        let p0 = &workload.models[0].phases;
        assert_eq!(p0.warmup, vec![seg(5, 100.0)]);
        assert_eq!(
            p0.bench,
            vec![seg(5, 200.0), seg(5, 300.0), seg(5, 400.0), seg(5, 500.0)]
        );
        assert_eq!(p0.cooldown, vec![seg(5, 500.0)]);
        let p1 = &workload.models[1].phases;
        assert_eq!(p1.bench, vec![seg(3, 200.0), seg(12, 300.0), seg(5, 400.0)]);
        assert_eq!(workload.bench_window_ns(), (5_000_000_000, 25_000_000_000));
        assert_eq!(workload.end_ns(), 30_000_000_000);
        assert!((workload.total_bench_rps() - (350.0 + 310.0)).abs() < 1e-9);
    }

    #[test]
    fn seed_forms() {
        let text = |seed: &str| one_model("exp", "[{duration: 1, rps: 1}]").replace("seed: 1", seed);
        assert_eq!(parse(&text("seed: 0xabcdabcd987")).unwrap().seed, 0x0abc_dabc_d987);
        assert_eq!(parse(&text("seed: \"0xff\"")).unwrap().seed, 255);
        assert_eq!(parse(&text("seed: '42'")).unwrap().seed, 42);
        assert_eq!(parse(&text("seed: 18446744073709551615")).unwrap().seed, u64::MAX);
        let e = error(&text("seed: -1"));
        assert!(e.contains("seed") && e.contains("0x hex"), "{e}");
        let e = error(&text("seed: \"0xzz\""));
        assert!(e.contains("seed"), "{e}");
    }

    #[test]
    fn segment_forms_and_segment_duration() {
        let text = "seed: 3\ngpus: 2\nmodels:\n- framework: sleep#1000,2000,0,0\n  model: a\n  \
                    slo: 50.5\n  gap: exp\n  segment_duration: 0.5\n  warmup: [10]\n  \
                    bench: [20, {duration: 2, rps: 0}, 30.5]\n";
        let workload = parse(text).unwrap();
        let model = &workload.models[0];
        assert_eq!(model.slo_ns, 50_500_000);
        assert_eq!(
            model.phases.warmup,
            vec![Segment {
                duration_ns: 500_000_000,
                rps: 10.0
            }]
        );
        assert_eq!(
            model.phases.bench,
            vec![
                Segment {
                    duration_ns: 500_000_000,
                    rps: 20.0
                },
                Segment {
                    duration_ns: 2_000_000_000,
                    rps: 0.0
                },
                Segment {
                    duration_ns: 500_000_000,
                    rps: 30.5
                },
            ]
        );
        assert!(model.phases.cooldown.is_empty(), "absent is empty");
        assert_eq!(model.phases.end_ns(), 3_500_000_000);
        // 20 * 0.5 + 0 * 2 + 30.5 * 0.5 over 3 s.
        assert!((workload.total_bench_rps() - 25.25 / 3.0).abs() < 1e-9);

        // A plain rps without `segment_duration` is an error naming the item.
        let e = error(&one_model("exp", "[{duration: 1, rps: 5}, 7]"));
        assert!(
            e.contains("models[0].bench[1]") && e.contains("segment_duration"),
            "{e}"
        );
        // Bad values name the field and the value.
        let e = error(&one_model("exp", "[{duration: 0, rps: 5}]"));
        assert!(e.contains("models[0].bench[0].duration") && e.contains("> 0"), "{e}");
        let e = error(&one_model("exp", "[{duration: 1, rps: -5}]"));
        assert!(e.contains("models[0].bench[0].rps") && e.contains(">= 0"), "{e}");
        let e = error(&one_model("exp", "[]"));
        assert!(e.contains("models[0].bench") && e.contains("non-empty"), "{e}");
        let e = error(&one_model("exp", "[{duration: 1000, rps: 1000000}]"));
        assert!(e.contains("models[0].bench[0]") && e.contains("100000000"), "{e}");
        let e = error(&one_model("exp", "[{duration: 1, rps: 5, foo: 1}]"));
        assert!(
            e.contains("models[0].bench[0]") && e.contains("unknown field `foo`"),
            "{e}"
        );
    }

    #[test]
    fn error_messages_name_file_field_and_expectation() {
        // Missing field.
        let text = one_model("exp", "[{duration: 1, rps: 1}]").replace("slo: 100, ", "");
        let e = error(&text);
        assert!(e.contains("test.yaml") && e.contains("models[0]"), "{e}");
        assert!(e.contains("missing field `slo`"), "{e}");
        // Bad gap.
        let e = error(&one_model("gamma:x", "[{duration: 1, rps: 1}]"));
        assert!(e.contains("test.yaml") && e.contains("models[0].gap"), "{e}");
        assert!(e.contains("gamma:K") && e.contains("`gamma:x`"), "{e}");
        let e = error(&one_model("gamma:0", "[{duration: 1, rps: 1}]"));
        assert!(e.contains("models[0].gap"), "{e}");
        let e = error(&one_model("poisson", "[{duration: 1, rps: 1}]"));
        assert!(e.contains("models[0].gap") && e.contains("`poisson`"), "{e}");
        // Unknown key, top level and in a model.
        let e = error(&format!("colour: red\n{}", one_model("exp", "[{duration: 1, rps: 1}]")));
        assert!(e.contains("unknown field `colour`"), "{e}");
        let text = one_model("exp", "[{duration: 1, rps: 1}]").replace("gap:", "colour: 1, gap:");
        let e = error(&text);
        assert!(e.contains("models[0]") && e.contains("unknown field `colour`"), "{e}");
        // Other checks.
        let e = error(&one_model("exp", "[{duration: 1, rps: 1}]").replace("gpus: 1", "gpus: 0"));
        assert!(e.contains("`gpus`"), "{e}");
        let e = error(&one_model("exp", "[{duration: 1, rps: 1}]").replace("slo: 100", "slo: 0"));
        assert!(e.contains("models[0].slo"), "{e}");
        let e = error(&one_model("exp", "[{duration: 1, rps: 1}]").replace("sleep#", "nap#"));
        assert!(e.contains("models[0].framework") && e.contains("sleep#"), "{e}");
        let e = error(&one_model("exp", "[{duration: 1, rps: 1}]").replace("gap:", "trace_offset_s: 3, gap:"));
        assert!(e.contains("models[0].trace_offset_s"), "{e}");
        let two = format!(
            "{}{}",
            one_model("exp", "[{duration: 1, rps: 1}]"),
            "- {framework: \"sleep#1,1,0,0\", model: m, slo: 1, gap: exp, bench: [{duration: 1, rps: 1}]}\n"
        );
        let e = error(&two);
        assert!(e.contains("models[1].model") && e.contains("models[0]"), "{e}");
        let e = error("seed: 1\ngpus: 1\nmodels: []\n");
        assert!(e.contains("`models`"), "{e}");
        let e = Workload::load(Path::new("/nonexistent/w.yaml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/w.yaml") && e.contains("cannot read"), "{e}");
    }

    #[test]
    fn trace_errors_name_the_file_and_line() {
        let dir = scratch_dir("trace-errors");
        let e = Workload::parse(
            &one_model("trace:missing.csv", "[{duration: 1, rps: 1}]"),
            &dir,
            "w.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("w.yaml") && e.contains("models[0].gap"), "{e}");
        assert!(e.contains("missing.csv") && e.contains("cannot read"), "{e}");

        std::fs::write(
            dir.join("bad.csv"),
            "TIMESTAMP,x\n2023-11-16 18:17:03.9,1\n2023-11-16 18:17:04.x,2\n",
        )
        .unwrap();
        let e = Workload::parse(&one_model("trace:bad.csv", "[{duration: 1, rps: 1}]"), &dir, "w.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bad.csv, line 3") && e.contains("18:17:04.x"), "{e}");

        std::fs::write(dir.join("nohead.csv"), "time,x\n2023-11-16 18:17:03.9,1\n").unwrap();
        let e = Workload::parse(
            &one_model("trace:nohead.csv", "[{duration: 1, rps: 1}]"),
            &dir,
            "w.yaml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("nohead.csv, line 1") && e.contains("TIMESTAMP"), "{e}");

        std::fs::write(
            dir.join("feb.csv"),
            "TIMESTAMP\n2023-02-29 00:00:00\n2023-03-01 00:00:00\n",
        )
        .unwrap();
        let e = Workload::parse(&one_model("trace:feb.csv", "[{duration: 1, rps: 1}]"), &dir, "w.yaml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("feb.csv, line 2") && e.contains("day 29"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn timestamps_parse_to_unix_ns() {
        assert_eq!(
            parse_timestamp_ns("2023-11-16 18:17:03.9799600").unwrap(),
            1_700_158_623_979_960_000
        );
        assert_eq!(parse_timestamp_ns("1970-01-01 00:00:00").unwrap(), 0);
        assert_eq!(
            parse_timestamp_ns("2000-03-01T00:00:00.5").unwrap(),
            951_868_800_500_000_000
        );
        assert_eq!(
            parse_timestamp_ns("2024-02-29 23:59:59.1234567891").unwrap(),
            1_709_251_199_123_456_789
        );
        for bad in [
            "2023-11-16",
            "2023-13-01 00:00:00",
            "2023-11-16 24:00:00",
            "2023-11-16 1:2:3.",
            "23-11-16 00:00:00",
        ] {
            assert!(parse_timestamp_ns(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rates_match_for_const_exp_and_gamma() {
        let mut arrivals = Vec::new();
        for (gap, tolerance) in [("const", 0.001), ("exp", 0.02), ("gamma:0.1", 0.05), ("gamma:4", 0.02)] {
            let workload = parse(&one_model(gap, "[{duration: 100, rps: 1000}]")).unwrap();
            workload.generate_arrivals(1.0, 7, &mut arrivals);
            let count = arrivals.len() as f64;
            assert!((count / 100_000.0 - 1.0).abs() < tolerance, "{gap}: {count}");
            check_sorted_and_phased(&workload, &arrivals);
        }
    }

    #[test]
    fn gamma_coefficient_of_variation() {
        let mut arrivals = Vec::new();
        for (shape, low, high) in [(0.1, 2.6, 3.8), (1.0, 0.9, 1.1), (4.0, 0.45, 0.55)] {
            let gap = format!("gamma:{shape}");
            let workload = parse(&one_model(&gap, "[{duration: 200, rps: 1000}]")).unwrap();
            workload.generate_arrivals(1.0, 11, &mut arrivals);
            let gaps: Vec<f64> = arrivals
                .windows(2)
                .map(|w| (w[1].arrival_ns - w[0].arrival_ns) as f64)
                .collect();
            let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
            let variance = gaps.iter().map(|g| (g - mean).powi(2)).sum::<f64>() / gaps.len() as f64;
            let cv = variance.sqrt() / mean;
            assert!(cv > low && cv < high, "gamma:{shape}: cv {cv}");
        }
    }

    #[test]
    fn deterministic_per_seed_and_scaled_by_rate_scale() {
        let text = format!(
            "{}{}",
            one_model("exp", "[{duration: 10, rps: 500}]"),
            "- {framework: \"sleep#1,1,0,0\", model: n, slo: 10, gap: \"gamma:0.5\", \
             bench: [{duration: 10, rps: 300}]}\n"
        );
        let workload = parse(&text).unwrap();
        let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
        workload.generate_arrivals(1.0, 5, &mut a);
        workload.generate_arrivals(1.0, 5, &mut b);
        workload.generate_arrivals(1.0, 6, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(count_model(&a, 0) > 4_500 && count_model(&a, 1) > 2_500);

        // Reuse clears the output.
        workload.generate_arrivals(2.0, 5, &mut b);
        let ratio = b.len() as f64 / a.len() as f64;
        assert!((1.9..2.1).contains(&ratio), "{ratio}");
        // Model 0's stream does not depend on model 1.
        let alone = parse(&one_model("exp", "[{duration: 10, rps: 500}]")).unwrap();
        alone.generate_arrivals(1.0, 5, &mut c);
        let model0: Vec<Arrival> = a.iter().copied().filter(|x| x.model_index == 0).collect();
        assert_eq!(model0, c);
        workload.generate_arrivals(0.0, 5, &mut c);
        assert!(c.is_empty());
    }

    #[test]
    fn phases_at_boundaries_and_zero_rate_segments() {
        let text = one_model(
            "const",
            "[{duration: 2, rps: 100}, {duration: 1, rps: 0}, {duration: 1, rps: 10}]",
        )
        .replace(
            "bench:",
            "warmup: [{duration: 1, rps: 0}, {duration: 1, rps: 50}], cooldown: [{duration: 1, rps: 20}], bench:",
        );
        let workload = parse(&text).unwrap();
        let phases = &workload.models[0].phases;
        let s = 1_000_000_000u64;
        assert_eq!(phases.warmup_end_ns(), 2 * s);
        assert_eq!(phases.bench_end_ns(), 6 * s);
        assert_eq!(phases.end_ns(), 7 * s);
        assert_eq!(phases.phase_at(0), Some(Phase::Warmup));
        assert_eq!(phases.phase_at(2 * s - 1), Some(Phase::Warmup));
        assert_eq!(phases.phase_at(2 * s), Some(Phase::Bench));
        assert_eq!(phases.phase_at(6 * s - 1), Some(Phase::Bench));
        assert_eq!(phases.phase_at(6 * s), Some(Phase::Cooldown));
        assert_eq!(phases.phase_at(7 * s - 1), Some(Phase::Cooldown));
        assert_eq!(phases.phase_at(7 * s), None);
        assert_eq!(phases.rps_at(0), Some(0.0));
        assert_eq!(phases.rps_at(s), Some(50.0));
        assert_eq!(phases.rps_at(4 * s + 1), Some(0.0));
        assert_eq!(phases.rps_at(5 * s), Some(10.0));
        assert_eq!(phases.rps_at(7 * s), None);
        assert_eq!(Phase::Cooldown.as_str(), "cooldown");

        let mut arrivals = Vec::new();
        workload.generate_arrivals(1.0, 1, &mut arrivals);
        check_sorted_and_phased(&workload, &arrivals);
        let in_range = |from: u64, to: u64| {
            arrivals
                .iter()
                .filter(|a| (from * s..to * s).contains(&a.arrival_ns))
                .count()
        };
        assert_eq!(in_range(0, 1), 0, "zero-rate warm-up start");
        assert!((49..=51).contains(&in_range(1, 2)));
        assert!((199..=201).contains(&in_range(2, 4)));
        assert_eq!(in_range(4, 5), 0, "zero-rate bench segment");
        assert!((9..=11).contains(&in_range(5, 6)));
        assert!((19..=21).contains(&in_range(6, 7)));
        assert_eq!(arrivals.first().unwrap().phase, Phase::Warmup);
        assert_eq!(arrivals.last().unwrap().phase, Phase::Cooldown);
    }

    /// Writes a small trace with unsorted rows and bursts.
    fn write_synthetic_trace(dir: &Path) -> PathBuf {
        let mut text = String::from("id,TIMESTAMP\n");
        // Times in ms, deliberately out of order: a burst of 5 every second for 100 s.
        let mut rows: Vec<u64> = (0..100u64)
            .flat_map(|second| (0..5u64).map(move |k| second * 1000 + k * 3))
            .collect();
        rows.reverse();
        for (i, ms) in rows.iter().enumerate() {
            text.push_str(&format!(
                "{i},2023-11-16 10:{:02}:{:02}.{:03}\n",
                ms / 60_000,
                (ms / 1000) % 60,
                ms % 1000
            ));
        }
        let path = dir.join("synthetic.csv");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn trace_replay_rate_and_offset() {
        let dir = scratch_dir("trace-replay");
        write_synthetic_trace(&dir);
        let text = |offset_s: f64| {
            one_model("trace:synthetic.csv", "[{duration: 200, rps: 500}]")
                .replace("gap:", &format!("trace_offset_s: {offset_s}, gap:"))
        };
        let workload = Workload::parse(&text(0.0), &dir, "w.yaml").unwrap();
        let Gap::Trace(trace) = &workload.models[0].gap else {
            panic!("not a trace");
        };
        assert_eq!(trace.times_ns.len(), 500);
        assert_eq!(trace.times_ns[0], 0);
        assert_eq!(trace.times_ns[1], 3_000_000);
        assert_eq!(trace.span_ns(), 99_012_000_000);
        let mut a = Vec::new();
        workload.generate_arrivals(1.0, 3, &mut a);
        let rate = a.len() as f64 / 200.0;
        assert!((rate / 500.0 - 1.0).abs() < 0.02, "{rate}");
        // The burst shape survives: most gaps are far below the mean.
        let short = a
            .windows(2)
            .filter(|w| w[1].arrival_ns - w[0].arrival_ns < 500_000)
            .count();
        assert!(short as f64 > 0.7 * a.len() as f64, "{short}");

        let shifted = Workload::parse(&text(50.004), &dir, "w.yaml").unwrap();
        let mut b = Vec::new();
        shifted.generate_arrivals(1.0, 3, &mut b);
        let gaps = |x: &[Arrival]| -> Vec<u64> {
            x.windows(2)
                .map(|w| w[1].arrival_ns - w[0].arrival_ns)
                .take(20)
                .collect()
        };
        assert_ne!(gaps(&a), gaps(&b));
        // An offset past the span wraps.
        let wrapped = Workload::parse(&text(50.004 + 99.012), &dir, "w.yaml").unwrap();
        let mut c = Vec::new();
        wrapped.generate_arrivals(1.0, 3, &mut c);
        assert_eq!(b, c);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn azure_trace_replay_rate() {
        let trace = Path::new(SHIPPED_TRACES).join("azure_llm_2023_conv.csv");
        let mut text = one_model(&format!("trace:{}", trace.display()), "[{duration: 300, rps: 200}]");
        text.push_str(&format!(
            "- {{framework: \"sleep#1,1,0,0\", model: n, slo: 10, gap: \"trace:{}\", \
             trace_offset_s: 1800, bench: [{{duration: 300, rps: 200}}]}}\n",
            trace.display()
        ));
        let workload = parse(&text).unwrap();
        let (Gap::Trace(t0), Gap::Trace(t1)) = (&workload.models[0].gap, &workload.models[1].gap) else {
            panic!("not traces");
        };
        assert!(Arc::ptr_eq(&t0.times_ns, &t1.times_ns), "one parse per file");
        let mut arrivals = Vec::new();
        workload.generate_arrivals(1.0, 9, &mut arrivals);
        for model in 0..2 {
            let rate = count_model(&arrivals, model) as f64 / 300.0;
            assert!((rate / 200.0 - 1.0).abs() < 0.05, "model {model}: {rate}");
        }
    }
}
