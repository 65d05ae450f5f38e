//! Triton's dynamic batcher as a peer policy (spec section 8).
//!
//! Per model, a batch is dispatched to an idle GPU when the queue reaches the largest
//! preferred batch size, or when its oldest request has waited `triton_max_queue_delay_ns`.
//! An idle GPU serves the ready model whose oldest request is oldest. Triton knows no
//! deadlines; its queue policy can reject requests that time out, which we set to the SLO:
//! a request that cannot finish even alone is dropped at dispatch (the best honest version).
//!
//! Preferred sizes: `triton_preferred_batch_sizes`, or, when empty, the largest `b` with
//! `2 * exec(b) <= slo` (the size a Triton user would tune for this SLO). GPUs are "idle"
//! only once their batch finished: Triton does not pipeline batches ahead of completion.

use std::collections::VecDeque;

use super::{Completion, Knobs, ModelConfig, Output, Policy};
use crate::gpu_pool::GpuPool;
use crate::profile::Profile;
use crate::request::Request;
use crate::timers::TimerQueue;

#[derive(Debug)]
pub struct Triton {
    knobs: Knobs,
    profiles: Vec<Profile>,
    queues: Vec<VecDeque<Request>>,
    /// The largest preferred batch size per model.
    preferred_max: Vec<u32>,
    pool: GpuPool,
    /// Per model: when its oldest request reaches `max_queue_delay`.
    timers: TimerQueue,
    queued_count: usize,
}

impl Triton {
    pub fn new(models: &[ModelConfig], gpu_count: u32, knobs: &Knobs) -> Triton {
        Triton::on(models, GpuPool::new(gpu_count), knobs)
    }

    /// Over `pool`, whose GPUs may differ in speed: a batch occupies its GPU for the
    /// profile's time times that GPU's factor (Triton sees each GPU's completions).
    pub fn on(models: &[ModelConfig], pool: GpuPool, knobs: &Knobs) -> Triton {
        let preferred_max = models
            .iter()
            .map(|m| {
                let max = m.profile.batch_size_max();
                let preferred = knobs
                    .triton_preferred_batch_sizes
                    .iter()
                    .copied()
                    .filter(|&b| b >= 1 && b <= max)
                    .max();
                preferred.unwrap_or_else(|| {
                    (1..=max)
                        .filter(|&b| 2 * m.profile.exec_ns(b) <= m.slo_ns)
                        .max()
                        .unwrap_or(1)
                })
            })
            .collect();
        Triton {
            knobs: knobs.clone(),
            profiles: models.iter().map(|m| m.profile.clone()).collect(),
            queues: models.iter().map(|_| VecDeque::new()).collect(),
            preferred_max,
            pool,
            timers: TimerQueue::new(models.len()),
            queued_count: 0,
        }
    }

    fn ready(&self, index: usize, now_ns: u64) -> bool {
        let queue = &self.queues[index];
        match queue.front() {
            None => false,
            Some(oldest) => {
                queue.len() >= self.preferred_max[index] as usize
                    || oldest.arrival_ns + self.knobs.triton_max_queue_delay_ns <= now_ns
            }
        }
    }

    fn dispatch(&mut self, now_ns: u64, out: &mut Output) {
        while self.queued_count > 0 {
            let Some(gpu) = self.pool.pick(now_ns, super::GrantPolicy::LowestIndex) else {
                return;
            };
            let ready = (0..self.queues.len())
                .filter(|&i| self.ready(i, now_ns))
                .min_by_key(|&i| (self.queues[i][0].arrival_ns, i));
            let Some(index) = ready else { return };
            let profile = &self.profiles[index];
            let factor = self.pool.factor(gpu);
            let scaled = |exec_ns: u64| crate::profile::scale_ns(exec_ns, factor);
            let queue = &mut self.queues[index];
            // The queue policy's timeout: reject what cannot finish even alone.
            while let Some(head) = queue.front() {
                if head.deadline_ns >= now_ns + self.knobs.lead_ns(1) + scaled(profile.exec_ns(1)) {
                    break;
                }
                out.drops.push(queue.pop_front().expect("head exists"));
                self.queued_count -= 1;
            }
            let batch_size = queue.len().min(self.preferred_max[index] as usize) as u32;
            if batch_size > 0 {
                let exec_at_ns = now_ns + self.knobs.lead_ns(batch_size);
                let finish_ns = exec_at_ns + scaled(profile.exec_ns(batch_size));
                self.queued_count -= batch_size as usize;
                out.push_plan(
                    gpu,
                    index as u32,
                    exec_at_ns,
                    finish_ns,
                    queue.drain(..batch_size as usize),
                );
                self.pool.occupy(gpu, finish_ns);
            }
            self.arm(index);
        }
    }

    fn arm(&mut self, index: usize) {
        match self.queues[index].front() {
            Some(oldest) => self
                .timers
                .set(index as u32, oldest.arrival_ns + self.knobs.triton_max_queue_delay_ns),
            None => self.timers.cancel(index as u32),
        }
    }
}

impl Policy for Triton {
    fn on_arrival(&mut self, now_ns: u64, request: Request, out: &mut Output) {
        let index = request.model as usize;
        self.queues[index].push_back(request);
        self.queued_count += 1;
        if self.queues[index].len() == 1 {
            self.arm(index);
        }
        self.dispatch(now_ns, out);
    }

    fn on_timer(&mut self, now_ns: u64, out: &mut Output) {
        while self.timers.pop_due(now_ns).is_some() {}
        self.dispatch(now_ns, out);
        for index in 0..self.queues.len() {
            if self.timers.due_ns(index as u32).is_none() {
                self.arm(index);
            }
        }
    }

    fn on_completion(&mut self, now_ns: u64, _completion: &Completion, out: &mut Output) {
        self.dispatch(now_ns, out);
    }

    fn set_gpu_available(&mut self, now_ns: u64, gpu: u32, free_at_ns: Option<u64>, out: &mut Output) -> bool {
        match free_at_ns {
            Some(free_at_ns) => {
                self.pool.set_online(gpu, free_at_ns);
            }
            None => {
                self.pool.set_offline(gpu);
            }
        }
        self.dispatch(now_ns, out);
        true
    }

    fn next_timer_ns(&mut self) -> Option<u64> {
        // Ready models past their delay wait for a GPU completion, not a timer.
        let next_ns = self.timers.next_ns()?;
        let gpu_free = self.pool.min_free_at_ns();
        Some(next_ns.max(gpu_free))
    }

    fn queued_count(&self) -> usize {
        self.queued_count
    }
}
