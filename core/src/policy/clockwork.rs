//! Clockwork's INFER4 scheduler as a peer policy (spec section 8).
//!
//! Each GPU's queue is kept filled about `clockwork_lookahead_ns` (10 ms) ahead: once a GPU's
//! planned work ends within the lookahead, it takes the most urgent strategy across models.
//! A strategy is a (model, batch size) with its latest start `D_head - exec(b)`, batch sizes
//! from `clockwork_batch_sizes` (1, 2, 4, 8, 16). The chosen strategy is upgraded to the
//! largest allowed batch that the queue fills and that still meets the head's deadline; heads
//! that cannot finish even alone are dropped. It never waits for a batch to grow.
//!
//! Execution times are estimated as Clockwork's controller does: per model and batch size, the
//! 99th percentile of the last 10 measured times (with 10 samples, the largest), the profile's
//! until the first measurement (its `estimate_window_size = 10`, `estimate_percentile =
//! 0.99`); every plan is timed with the estimate.
//!
//! Faithful to: the lookahead, the strategy ranking, the upgrade, the drops, the estimates.
//! Simplified: the
//! strategies are ranked per model head rather than kept per request in a priority queue
//! (the head of an EDF queue always holds a model's most urgent strategy), and there is no
//! model loading (every model is resident on every GPU).

use std::collections::VecDeque;

use super::{Completion, Knobs, ModelConfig, Output, Policy};
use crate::gpu_pool::GpuPool;
use crate::request::Request;

/// Measurements one estimate keeps.
const ESTIMATE_WINDOW: usize = 10;

/// Clockwork's execution-time estimate of one model at one batch size.
#[derive(Debug, Clone)]
struct Estimate {
    /// The last measured times, a ring of `ESTIMATE_WINDOW`.
    recent_ns: [u64; ESTIMATE_WINDOW],
    recorded: usize,
    /// The 99th percentile of `recent_ns` (its largest: 10 samples), or the profile's time.
    current_ns: u64,
}

impl Estimate {
    fn of_profile(exec_ns: u64) -> Estimate {
        Estimate {
            recent_ns: [0; ESTIMATE_WINDOW],
            recorded: 0,
            current_ns: exec_ns,
        }
    }

    fn record(&mut self, measured_ns: u64) {
        self.recent_ns[self.recorded % ESTIMATE_WINDOW] = measured_ns;
        self.recorded += 1;
        let kept = &self.recent_ns[..self.recorded.min(ESTIMATE_WINDOW)];
        self.current_ns = kept.iter().copied().max().expect("one was just recorded");
    }
}

#[derive(Debug)]
pub struct Clockwork {
    knobs: Knobs,
    queues: Vec<VecDeque<Request>>,
    /// Allowed batch sizes per model, ascending, each within the profile.
    batch_sizes: Vec<Vec<u32>>,
    /// Per model, per allowed batch size (as in `batch_sizes`): the time it is planned with.
    estimates: Vec<Vec<Estimate>>,
    pool: GpuPool,
    queued_count: usize,
}

impl Clockwork {
    pub fn new(models: &[ModelConfig], gpu_count: u32, knobs: &Knobs) -> Clockwork {
        let batch_sizes = models
            .iter()
            .map(|m| {
                let max = m.profile.batch_size_max();
                let mut sizes: Vec<u32> = knobs
                    .clockwork_batch_sizes
                    .iter()
                    .copied()
                    .filter(|&b| b >= 1 && b <= max)
                    .collect();
                sizes.sort_unstable();
                sizes.dedup();
                if sizes.first() != Some(&1) {
                    sizes.insert(0, 1);
                }
                sizes
            })
            .collect();
        let estimates = models
            .iter()
            .zip(&batch_sizes)
            .map(|(m, sizes): (&ModelConfig, &Vec<u32>)| {
                sizes
                    .iter()
                    .map(|&b| Estimate::of_profile(m.profile.exec_ns(b)))
                    .collect()
            })
            .collect();
        Clockwork {
            knobs: knobs.clone(),
            queues: models.iter().map(|_| VecDeque::new()).collect(),
            batch_sizes,
            estimates,
            pool: GpuPool::new(gpu_count),
            queued_count: 0,
        }
    }

    /// Fills every GPU whose planned work ends within the lookahead.
    fn dispatch(&mut self, now_ns: u64, out: &mut Output) {
        if self.queued_count == 0 {
            return;
        }
        let horizon_ns = now_ns + self.knobs.clockwork_lookahead_ns;
        for gpu in 0..self.pool.slots() {
            while self.queued_count > 0 && self.pool.free_at_ns(gpu) <= horizon_ns {
                if !self.dispatch_one(gpu, now_ns, out) {
                    break;
                }
            }
        }
    }

    /// Plans the most urgent strategy on `gpu`. Returns false when no request is left.
    fn dispatch_one(&mut self, gpu: u32, now_ns: u64, out: &mut Output) -> bool {
        let free_at_ns = self.pool.free_at_ns(gpu);
        let start_ns = |b: u32, knobs: &Knobs| free_at_ns.max(now_ns + knobs.lead_ns(b));
        // (latest start, model, batch size, its estimated time)
        let mut best: Option<(u64, usize, u32, u64)> = None;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            let estimates = &self.estimates[index];
            // Drop heads that cannot finish even alone (batch size 1 is always allowed).
            let exec_1_ns = estimates[0].current_ns;
            while let Some(head) = queue.front() {
                if head.deadline_ns >= start_ns(1, &self.knobs) + exec_1_ns {
                    break;
                }
                out.drops.push(queue.pop_front().expect("head exists"));
                self.queued_count -= 1;
            }
            let Some(head) = queue.front() else { continue };
            // Upgrade: the largest allowed batch the queue fills that meets the head's deadline.
            let (mut batch_size, mut exec_ns) = (1, exec_1_ns);
            for (&b, estimate) in self.batch_sizes[index].iter().zip(estimates) {
                let fits = start_ns(b, &self.knobs) + estimate.current_ns <= head.deadline_ns;
                if b as usize <= queue.len() && fits {
                    (batch_size, exec_ns) = (b, estimate.current_ns);
                }
            }
            let latest_start_ns = head.deadline_ns - exec_ns;
            if best.is_none_or(|(urgency, ..)| latest_start_ns < urgency) {
                best = Some((latest_start_ns, index, batch_size, exec_ns));
            }
        }
        let Some((_, index, batch_size, exec_ns)) = best else {
            return false;
        };
        let exec_at_ns = start_ns(batch_size, &self.knobs);
        let finish_ns = exec_at_ns + exec_ns;
        self.queued_count -= batch_size as usize;
        out.push_plan(
            gpu,
            index as u32,
            exec_at_ns,
            finish_ns,
            self.queues[index].drain(..batch_size as usize),
        );
        self.pool.occupy(gpu, finish_ns);
        true
    }
}

impl Policy for Clockwork {
    fn on_arrival(&mut self, now_ns: u64, request: Request, out: &mut Output) {
        let queue = &mut self.queues[request.model as usize];
        let mut position = queue.len();
        while position > 0 && queue[position - 1].order_key() > request.order_key() {
            position -= 1;
        }
        queue.insert(position, request);
        self.queued_count += 1;
        self.dispatch(now_ns, out);
    }

    fn on_timer(&mut self, now_ns: u64, out: &mut Output) {
        self.dispatch(now_ns, out);
    }

    /// A measured batch time joins its model's and batch size's estimate.
    fn on_completion(&mut self, _now_ns: u64, completion: &Completion, _out: &mut Output) {
        let index = completion.model as usize;
        let sizes = &self.batch_sizes[index];
        if let Ok(position) = sizes.binary_search(&completion.batch_size) {
            let measured_ns = completion.finished_ns.saturating_sub(completion.started_ns);
            self.estimates[index][position].record(measured_ns);
        }
    }

    fn next_timer_ns(&mut self) -> Option<u64> {
        // The next GPU whose planned work comes within the lookahead.
        (self.queued_count > 0).then(|| {
            self.pool
                .min_free_at_ns()
                .saturating_sub(self.knobs.clockwork_lookahead_ns)
        })
    }

    fn queued_count(&self) -> usize {
        self.queued_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::MS;

    fn request(id: u64, now_ns: u64) -> Request {
        Request {
            id,
            model: 0,
            arrival_ns: now_ns,
            deadline_ns: now_ns + 98 * MS,
        }
    }

    /// Plans are timed with the largest of the last 10 measured times of their batch size,
    /// the profile's until one is measured.
    #[test]
    fn plans_are_timed_with_the_measured_estimate() {
        let profile = crate::profile::Profile::from_latencies_ns(vec![5 * MS, 6 * MS], 0, 0);
        let models = [ModelConfig {
            name: "m".to_string(),
            profile,
            slo_ns: 100 * MS,
        }];
        let knobs = Knobs {
            clockwork_batch_sizes: vec![1, 2],
            ..Knobs::default()
        };
        let mut clockwork = Clockwork::new(&models, 1, &knobs);
        let mut out = Output::default();
        let mut now_ns = 0;
        let planned = |clockwork: &mut Clockwork, now_ns: u64, id: u64, out: &mut Output| {
            out.clear();
            clockwork.on_arrival(now_ns, request(id, now_ns), out);
            let plan = out.plans[0];
            plan.finish_ns - plan.exec_at_ns
        };
        assert_eq!(planned(&mut clockwork, now_ns, 0, &mut out), 5 * MS);
        // Batches of one measured at 7, then 9, then 8 ms: planned at the largest.
        let measured = |now_ns: u64, measured_ns: u64| Completion {
            plan_id: 0,
            gpu: 0,
            model: 0,
            batch_size: 1,
            started_ns: now_ns,
            finished_ns: now_ns + measured_ns,
        };
        for measured_ns in [7 * MS, 9 * MS, 8 * MS] {
            clockwork.on_completion(now_ns, &measured(now_ns, measured_ns), &mut out);
        }
        now_ns += 100 * MS;
        assert_eq!(planned(&mut clockwork, now_ns, 1, &mut out), 9 * MS);
        // Ten more at 6 ms push the 9 out of the window.
        for _ in 0..10 {
            clockwork.on_completion(now_ns, &measured(now_ns, 6 * MS), &mut out);
        }
        now_ns += 100 * MS;
        assert_eq!(planned(&mut clockwork, now_ns, 2, &mut out), 6 * MS);
    }
}
