//! Batch latency profiles: how long a batch of `b` requests of one model runs on a GPU.
//!
//! Two sources, one shape. The reference implementation's linear form
//! `sleep#slope_us,intercept_us,pre_us,post_us` gives `l(b) = slope*b + intercept`; a profile
//! table (`batch,latency_us,std_us` rows, as `symphony profile` writes it) gives measured
//! latencies, of which we plan with `mean + std`. Either way the result is a dense table
//! `l(1..=batch_size_max)` forced monotone (`l(b) >= l(b-1)`), plus per-batch `pre` and `post`
//! costs. This module is not a profiler: measuring belongs to `gpu-exec`.

use std::fmt;
use std::path::Path;

/// The largest batch any profile may describe. Bounds every per-batch table and loop.
pub const BATCH_SIZE_LIMIT: u32 = 1024;

/// An error in a profile string or table, naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error("profile `{text}`: expected `sleep#slope_us,intercept_us,pre_us,post_us` ({reason})")]
    Linear { text: String, reason: String },
    #[error("profile table {source_name}, line {line}: {reason}")]
    Table {
        source_name: String,
        line: usize,
        reason: String,
    },
    #[error("profile table {source_name}: cannot read: {reason}")]
    Io { source_name: String, reason: String },
}

/// A model's batch latency profile. All times in nanoseconds.
#[derive(Clone, PartialEq, Eq)]
pub struct Profile {
    /// `latency_ns[b - 1] = l(b)`, monotone non-decreasing, length `batch_size_max`.
    latency_ns: Vec<u64>,
    pre_ns: u64,
    post_ns: u64,
    /// `l(b) = intercept + slope * b` for every `b` of the table, when that holds exactly
    /// (checked when the profile is built): the hot paths compute `l(b)` instead of reading
    /// a table that does not stay in cache (a kilobyte or more per model, read at whatever
    /// batch size a queue has reached).
    linear: Option<Linear>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Linear {
    slope_ns: u64,
    intercept_ns: u64,
}

impl Linear {
    /// The line through the table's first two points, if every point lies on it.
    fn of(latency_ns: &[u64]) -> Option<Linear> {
        let first = *latency_ns.first()?;
        let slope_ns = latency_ns.get(1).map_or(0, |&second| second - first);
        let line = Linear {
            slope_ns,
            intercept_ns: first.checked_sub(slope_ns)?,
        };
        let on_line = (1u64..).zip(latency_ns).all(|(b, &l_ns)| {
            line.slope_ns
                .checked_mul(b)
                .and_then(|x| x.checked_add(line.intercept_ns))
                == Some(l_ns)
        });
        on_line.then_some(line)
    }
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Profile")
            .field("batch_size_max", &self.batch_size_max())
            .field("l1_ns", &self.latency_ns.first())
            .field("lmax_ns", &self.latency_ns.last())
            .field("pre_ns", &self.pre_ns)
            .field("post_ns", &self.post_ns)
            .finish()
    }
}

impl Profile {
    /// Builds a profile from per-batch latencies (index `b - 1`), forcing them monotone.
    pub fn from_latencies_ns(mut latency_ns: Vec<u64>, pre_ns: u64, post_ns: u64) -> Profile {
        assert!(!latency_ns.is_empty());
        assert!(latency_ns.len() <= BATCH_SIZE_LIMIT as usize);
        for i in 1..latency_ns.len() {
            latency_ns[i] = latency_ns[i].max(latency_ns[i - 1]);
        }
        Profile {
            linear: Linear::of(&latency_ns),
            latency_ns,
            pre_ns,
            post_ns,
        }
    }

    /// Parses the reference's linear form `sleep#slope_us,intercept_us,pre_us,post_us`.
    ///
    /// The linear form has no natural maximum batch: it is tabulated up to the largest `b`
    /// whose `pre + l(b) + post` still fits `exec_budget_ns` (at least 1, at most
    /// [`BATCH_SIZE_LIMIT`]). Pass the model's SLO: a batch that cannot finish within the SLO
    /// is never useful.
    pub fn parse_linear(text: &str, exec_budget_ns: u64) -> Result<Profile, ProfileError> {
        let err = |reason: &str| ProfileError::Linear {
            text: text.to_string(),
            reason: reason.to_string(),
        };
        let body = text
            .trim()
            .strip_prefix("sleep#")
            .ok_or_else(|| err("missing the `sleep#` prefix"))?;
        let fields: Vec<&str> = body.split(',').map(str::trim).collect();
        if fields.len() != 4 {
            return Err(err(&format!("found {} numbers, need 4", fields.len())));
        }
        let mut us = [0f64; 4];
        for (slot, field) in us.iter_mut().zip(&fields) {
            let value: f64 = field.parse().map_err(|_| err(&format!("`{field}` is not a number")))?;
            if !value.is_finite() || value < 0.0 {
                return Err(err(&format!("`{field}` must be a finite number >= 0")));
            }
            *slot = value;
        }
        let [slope_us, intercept_us, pre_us, post_us] = us;
        if slope_us == 0.0 && intercept_us == 0.0 {
            return Err(err("slope and intercept are both zero"));
        }
        let pre_ns = (pre_us * 1e3).round() as u64;
        let post_ns = (post_us * 1e3).round() as u64;
        let mut latency_ns = Vec::new();
        for b in 1..=BATCH_SIZE_LIMIT {
            let l_ns = ((slope_us * f64::from(b) + intercept_us) * 1e3).round() as u64;
            if b > 1 && pre_ns + l_ns + post_ns > exec_budget_ns {
                break;
            }
            latency_ns.push(l_ns);
        }
        Ok(Profile::from_latencies_ns(latency_ns, pre_ns, post_ns))
    }

    /// Parses a profile table: a header line, then `batch,latency_us,std_us` rows.
    ///
    /// Batches must start at 1 and be consecutive; the planned latency is `mean + std`.
    /// `pre_us` and `post_us` may be given as `# pre_us=...` / `# post_us=...` comment lines.
    pub fn parse_table(text: &str, source_name: &str) -> Result<Profile, ProfileError> {
        let err = |line: usize, reason: String| ProfileError::Table {
            source_name: source_name.to_string(),
            line,
            reason,
        };
        let mut latency_ns = Vec::new();
        let (mut pre_ns, mut post_ns) = (0u64, 0u64);
        let mut header_seen = false;
        for (index, raw) in text.lines().enumerate() {
            let line_number = index + 1;
            let line = raw.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let comment = comment.trim();
                for (key, slot) in [("pre_us=", &mut pre_ns), ("post_us=", &mut post_ns)] {
                    if let Some(value) = comment.strip_prefix(key) {
                        let us: f64 = value
                            .trim()
                            .parse()
                            .map_err(|_| err(line_number, format!("`{key}` needs a number, got `{value}`")))?;
                        if !us.is_finite() || us < 0.0 {
                            return Err(err(line_number, format!("`{key}` must be >= 0")));
                        }
                        *slot = (us * 1e3).round() as u64;
                    }
                }
                continue;
            }
            if !header_seen {
                header_seen = true;
                let columns: Vec<&str> = line.split(',').map(str::trim).collect();
                if columns != ["batch", "latency_us", "std_us"] {
                    return Err(err(
                        line_number,
                        format!("expected the header `batch,latency_us,std_us`, got `{line}`"),
                    ));
                }
                continue;
            }
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            if fields.len() != 3 {
                return Err(err(
                    line_number,
                    format!("expected 3 fields `batch,latency_us,std_us`, got {}", fields.len()),
                ));
            }
            let batch: u32 = fields[0]
                .parse()
                .map_err(|_| err(line_number, format!("batch `{}` is not an integer", fields[0])))?;
            let expected = latency_ns.len() as u32 + 1;
            if batch != expected {
                return Err(err(
                    line_number,
                    format!("batch {batch} out of order: expected batch {expected}"),
                ));
            }
            if batch > BATCH_SIZE_LIMIT {
                return Err(err(
                    line_number,
                    format!("batch {batch} exceeds the limit {BATCH_SIZE_LIMIT}"),
                ));
            }
            let mut values = [0f64; 2];
            for (slot, (name, field)) in values
                .iter_mut()
                .zip([("latency_us", fields[1]), ("std_us", fields[2])])
            {
                let value: f64 = field
                    .parse()
                    .map_err(|_| err(line_number, format!("{name} `{field}` is not a number")))?;
                if !value.is_finite() || value < 0.0 {
                    return Err(err(line_number, format!("{name} `{field}` must be >= 0")));
                }
                *slot = value;
            }
            latency_ns.push(((values[0] + values[1]) * 1e3).round() as u64);
        }
        if latency_ns.is_empty() {
            return Err(err(0, "no rows: need at least the row for batch 1".to_string()));
        }
        if latency_ns.iter().all(|&l| l == 0) {
            return Err(err(0, "every latency is zero".to_string()));
        }
        Ok(Profile::from_latencies_ns(latency_ns, pre_ns, post_ns))
    }

    /// Reads and parses a profile table file.
    pub fn load_table(path: &Path) -> Result<Profile, ProfileError> {
        let source_name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ProfileError::Io {
            source_name: source_name.clone(),
            reason: e.to_string(),
        })?;
        Profile::parse_table(&text, &source_name)
    }

    /// Writes the table format that [`Profile::parse_table`] reads (std 0: the values planned with).
    pub fn to_table_string(&self) -> String {
        let mut text = format!(
            "# pre_us={}\n# post_us={}\nbatch,latency_us,std_us\n",
            self.pre_ns as f64 / 1e3,
            self.post_ns as f64 / 1e3
        );
        for (index, l_ns) in self.latency_ns.iter().enumerate() {
            text.push_str(&format!("{},{},0\n", index + 1, *l_ns as f64 / 1e3));
        }
        text
    }

    /// The largest batch this profile describes.
    pub fn batch_size_max(&self) -> u32 {
        self.latency_ns.len() as u32
    }

    /// `l(b)`: the GPU time of a batch of `b`, without `pre` and `post`.
    #[inline]
    pub fn latency_ns(&self, batch_size: u32) -> u64 {
        assert!(batch_size >= 1);
        match self.linear {
            Some(line) if batch_size as usize <= self.latency_ns.len() => {
                line.intercept_ns + line.slope_ns * u64::from(batch_size)
            }
            _ => self.latency_ns[batch_size as usize - 1],
        }
    }

    /// `pre + l(b) + post`: the whole execution time of a batch of `b`.
    #[inline]
    pub fn exec_ns(&self, batch_size: u32) -> u64 {
        self.pre_ns + self.latency_ns(batch_size) + self.post_ns
    }

    /// `pre + l(b) + post`, or `None` when `b` is past the profile's largest batch.
    #[inline]
    pub fn exec_ns_checked(&self, batch_size: u32) -> Option<u64> {
        if batch_size == 0 || batch_size as usize > self.latency_ns.len() {
            return None;
        }
        Some(self.exec_ns(batch_size))
    }

    pub fn pre_ns(&self) -> u64 {
        self.pre_ns
    }

    /// A profile no faster than either: per batch size the larger latency, the larger `pre`
    /// and `post`, up to the smaller largest batch (a batch must run on either GPU).
    pub fn slowest_with(&self, other: &Profile) -> Profile {
        self.combined(other, u64::max)
    }

    /// A profile no slower than either: per batch size the smaller latency, the smaller
    /// `pre` and `post`, up to the smaller largest batch (a batch must run on either GPU).
    pub fn fastest_with(&self, other: &Profile) -> Profile {
        self.combined(other, u64::min)
    }

    fn combined(&self, other: &Profile, pick: fn(u64, u64) -> u64) -> Profile {
        let batch_size_max = self.latency_ns.len().min(other.latency_ns.len());
        let latency_ns = self.latency_ns[..batch_size_max]
            .iter()
            .zip(&other.latency_ns)
            .map(|(&a, &b)| pick(a, b))
            .collect();
        Profile::from_latencies_ns(
            latency_ns,
            pick(self.pre_ns, other.pre_ns),
            pick(self.post_ns, other.post_ns),
        )
    }

    /// This profile on a GPU that takes `factor` times as long: every latency, `pre` and
    /// `post` times `factor`, rounded up to the nanosecond.
    pub fn scaled(&self, factor: f64) -> Profile {
        assert!(factor.is_finite() && factor > 0.0, "time factor {factor}");
        let scale = |ns: u64| scale_ns(ns, factor);
        Profile::from_latencies_ns(
            self.latency_ns.iter().map(|&ns| scale(ns)).collect(),
            scale(self.pre_ns),
            scale(self.post_ns),
        )
    }

    /// How many times longer than `base` a batch takes with this profile, at worst: the
    /// largest `exec(b) / base.exec(b)` over the batch sizes both describe. Planning with
    /// `base` scaled by it never assumes a batch faster than this profile says.
    pub fn time_factor_over(&self, base: &Profile) -> f64 {
        let batch_size_max = self.batch_size_max().min(base.batch_size_max());
        (1..=batch_size_max)
            .map(|b| self.exec_ns(b) as f64 / base.exec_ns(b).max(1) as f64)
            .fold(0.0, f64::max)
    }

    pub fn post_ns(&self) -> u64 {
        self.post_ns
    }

    /// The best throughput one GPU reaches with this model, in requests per second, and the
    /// batch that reaches it, given that a batch must finish within `exec_budget_ns`.
    pub fn peak_throughput_rps(&self, exec_budget_ns: u64) -> (f64, u32) {
        let mut best = (0.0, 1);
        for b in 1..=self.batch_size_max() {
            let exec_ns = self.exec_ns(b);
            if exec_ns > exec_budget_ns {
                break;
            }
            let rps = f64::from(b) * 1e9 / exec_ns as f64;
            if rps > best.0 {
                best = (rps, b);
            }
        }
        best
    }
}

/// `ns` on a GPU whose time factor is `factor`, rounded up (exactly `ns` at 1): how every
/// scaled time is computed (planned batches, scaled profiles, the embedded GPUs' runs).
#[inline]
pub fn scale_ns(ns: u64, factor: f64) -> u64 {
    if factor == 1.0 {
        ns
    } else {
        (ns as f64 * factor).ceil() as u64
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_line_is_computed_and_anything_else_read_from_the_table() {
        let cases = [
            (Profile::parse_linear("sleep#400,2000,0,0", 100_000_000).unwrap(), true),
            (Profile::parse_linear("sleep#0.1,0.35,1,2", 1_000_000).unwrap(), true),
            // 0.4 ns a request, rounded to whole nanoseconds: not a line any more.
            (Profile::parse_linear("sleep#0.0004,1,0,0", 1_000_000).unwrap(), false),
            (Profile::parse_linear("sleep#0,5,0,0", 1_000_000).unwrap(), true),
            (Profile::from_latencies_ns(vec![7], 1, 1), true),
            (Profile::from_latencies_ns(vec![10, 20, 30, 41], 0, 0), false),
            // Forced monotone onto a line: 10, 20, 30.
            (Profile::from_latencies_ns(vec![10, 20, 30], 0, 0), true),
            (Profile::from_latencies_ns(vec![5, 20, 35], 0, 0), false),
        ];
        for (profile, linear) in cases {
            assert_eq!(profile.linear.is_some(), linear, "{profile:?}");
            let max = profile.batch_size_max();
            for b in 1..=max {
                assert_eq!(
                    profile.latency_ns(b),
                    profile.latency_ns[b as usize - 1],
                    "{profile:?} at {b}"
                );
                assert_eq!(profile.exec_ns_checked(b), Some(profile.exec_ns(b)));
            }
            assert_eq!(profile.exec_ns_checked(0), None);
            assert_eq!(profile.exec_ns_checked(max + 1), None);
        }
    }

    #[test]
    fn the_slowest_of_two_profiles_is_no_faster_than_either() {
        let a = Profile::from_latencies_ns(vec![10, 20, 30], 5, 0);
        let b = Profile::from_latencies_ns(vec![15, 16], 0, 7);
        let s = a.slowest_with(&b);
        assert_eq!(s.batch_size_max(), 2);
        for batch in 1..=2 {
            assert!(s.exec_ns(batch) >= a.exec_ns(batch) && s.exec_ns(batch) >= b.exec_ns(batch));
        }
        assert_eq!(
            (s.latency_ns(1), s.latency_ns(2), s.pre_ns(), s.post_ns()),
            (15, 20, 5, 7)
        );
    }

    #[test]
    fn the_fastest_of_two_profiles_and_the_factor_over_it() {
        let a = Profile::from_latencies_ns(vec![10, 20, 30], 5, 0);
        let b = Profile::from_latencies_ns(vec![15, 16], 0, 7);
        let f = a.fastest_with(&b);
        assert_eq!(
            (
                f.batch_size_max(),
                f.latency_ns(1),
                f.latency_ns(2),
                f.pre_ns(),
                f.post_ns()
            ),
            (2, 10, 16, 0, 0)
        );
        // exec: a 15, 25; b 22, 23; fastest 10, 16. a is 25 / 16 times slower at b = 2.
        assert_eq!(a.time_factor_over(&f), 25.0 / 16.0);
        assert_eq!(b.time_factor_over(&f), 22.0 / 10.0);
        assert_eq!(f.time_factor_over(&f), 1.0);
        let slow = a.scaled(2.5);
        assert_eq!((slow.latency_ns(3), slow.pre_ns()), (75, 13));
        // exec 38, 63, 88 against 15, 25, 35: the worst is the rounded-up pre at b = 1.
        assert_eq!(slow.time_factor_over(&a), 38.0 / 15.0);
        // Planning with the base scaled by the factor is never faster than the profile.
        for p in [&a, &b] {
            let factor = p.time_factor_over(&f);
            for batch in 1..=f.batch_size_max() {
                assert!(f.exec_ns(batch) as f64 * factor >= p.exec_ns(batch) as f64);
            }
        }
    }

    use super::*;

    #[test]
    fn linear_matches_hand_computed_values() {
        // l(b) = 1.082 ms * b + 5.204 ms; SLO 100 ms caps the table where pre+l(b)+post > 100 ms.
        let p = Profile::parse_linear("sleep#1082,5204,0,0", 100_000_000).unwrap();
        assert_eq!(p.latency_ns(1), 6_286_000);
        assert_eq!(p.latency_ns(75), 86_354_000);
        // 1.082*87 + 5.204 = 99.338 fits, 1.082*88 + 5.204 = 100.42 does not.
        assert_eq!(p.batch_size_max(), 87);
        assert_eq!(p.exec_ns_checked(88), None);
        let q = Profile::parse_linear("sleep#1000,2000,300,400", 1_000_000_000).unwrap();
        assert_eq!(q.exec_ns(3), 300_000 + 5_000_000 + 400_000);
    }

    #[test]
    fn linear_rejects_bad_text_with_the_reason() {
        for (text, needle) in [
            ("1082,5204,0,0", "prefix"),
            ("sleep#1082,5204,0", "found 3"),
            ("sleep#1082,abc,0,0", "`abc` is not a number"),
            ("sleep#-1,5,0,0", ">= 0"),
            ("sleep#0,0,0,0", "both zero"),
        ] {
            let message = Profile::parse_linear(text, 100_000_000).unwrap_err().to_string();
            assert!(message.contains(needle), "{message}");
        }
    }

    #[test]
    fn table_uses_mean_plus_std_and_is_forced_monotone() {
        let text = "# pre_us=10\nbatch,latency_us,std_us\n1,1000,100\n2,900,50\n3,1500,0\n";
        let p = Profile::parse_table(text, "t.csv").unwrap();
        assert_eq!(p.latency_ns(1), 1_100_000);
        assert_eq!(p.latency_ns(2), 1_100_000, "950 us forced up to l(1)");
        assert_eq!(p.latency_ns(3), 1_500_000);
        assert_eq!(p.exec_ns(1), 1_110_000);
        let back = Profile::parse_table(&p.to_table_string(), "again").unwrap();
        assert_eq!(back, p);
    }

    #[test]
    fn table_errors_name_the_line() {
        let e = Profile::parse_table("batch,latency_us,std_us\n1,10,0\n3,20,0\n", "x.csv")
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.csv, line 3") && e.contains("expected batch 2"), "{e}");
        let e = Profile::parse_table("b,l\n", "y.csv").unwrap_err().to_string();
        assert!(e.contains("header"), "{e}");
    }

    #[test]
    fn peak_throughput_of_the_resnet_profile() {
        let p = Profile::parse_linear("sleep#1082,5204,0,0", 100_000_000).unwrap();
        let (rps, b) = p.peak_throughput_rps(100_000_000);
        // Throughput b / (1.082 b + 5.204) ms grows with b: the largest batch wins.
        assert_eq!(b, 87);
        assert!((rps - 87.0 / 0.099338).abs() < 1.0);
    }
}
