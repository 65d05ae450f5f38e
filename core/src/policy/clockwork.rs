//! Clockwork's INFER4 scheduler as a peer policy (spec section 8).
//!
//! Each GPU's queue is kept filled about `clockwork_lookahead_ns` (10 ms) ahead: once a GPU's
//! planned work ends within the lookahead, it takes the most urgent strategy across models.
//! A strategy is a (model, batch size) with its latest start `D_head - exec(b)`, batch sizes
//! from `clockwork_batch_sizes` (1, 2, 4, 8, 16). The chosen strategy is upgraded to the
//! largest allowed batch that the queue fills and that still meets the head's deadline; heads
//! that cannot finish even alone are dropped. It never waits for a batch to grow.
//!
//! Faithful to: the lookahead, the strategy ranking, the upgrade, the drops. Simplified: the
//! strategies are ranked per model head rather than kept per request in a priority queue
//! (the head of an EDF queue always holds a model's most urgent strategy), and there is no
//! model loading (every model is resident on every GPU).

use std::collections::VecDeque;

use super::{Completion, Knobs, ModelConfig, Output, Policy};
use crate::gpu_pool::GpuPool;
use crate::profile::Profile;
use crate::request::Request;

#[derive(Debug)]
pub struct Clockwork {
    knobs: Knobs,
    profiles: Vec<Profile>,
    queues: Vec<VecDeque<Request>>,
    /// Allowed batch sizes per model, ascending, each within the profile.
    batch_sizes: Vec<Vec<u32>>,
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
        Clockwork {
            knobs: knobs.clone(),
            profiles: models.iter().map(|m| m.profile.clone()).collect(),
            queues: models.iter().map(|_| VecDeque::new()).collect(),
            batch_sizes,
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
        let mut best: Option<(u64, usize, u32)> = None;
        for (index, queue) in self.queues.iter_mut().enumerate() {
            let profile = &self.profiles[index];
            // Drop heads that cannot finish even alone.
            while let Some(head) = queue.front() {
                if head.deadline_ns >= start_ns(1, &self.knobs) + profile.exec_ns(1) {
                    break;
                }
                out.drops.push(queue.pop_front().expect("head exists"));
                self.queued_count -= 1;
            }
            let Some(head) = queue.front() else { continue };
            // Upgrade: the largest allowed batch the queue fills that meets the head's deadline.
            let mut batch_size = 1;
            for &b in &self.batch_sizes[index] {
                if b as usize <= queue.len() && start_ns(b, &self.knobs) + profile.exec_ns(b) <= head.deadline_ns {
                    batch_size = b;
                }
            }
            let latest_start_ns = head.deadline_ns - profile.exec_ns(batch_size);
            if best.is_none_or(|(urgency, _, _)| latest_start_ns < urgency) {
                best = Some((latest_start_ns, index, batch_size));
            }
        }
        let Some((_, index, batch_size)) = best else {
            return false;
        };
        let exec_at_ns = start_ns(batch_size, &self.knobs);
        let finish_ns = exec_at_ns + self.profiles[index].exec_ns(batch_size);
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

    fn on_completion(&mut self, _now_ns: u64, _completion: &Completion, _out: &mut Output) {}

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
