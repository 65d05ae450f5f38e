//! PLACEHOLDER: being written.
use super::{Completion, Knobs, ModelConfig, Output, Policy};
use crate::request::Request;

#[derive(Debug)]
pub struct Shepherd;

impl Shepherd {
    pub fn new(_models: &[ModelConfig], _gpu_count: u32, _knobs: &Knobs) -> Shepherd {
        unimplemented!("shepherd is being written")
    }
}

impl Policy for Shepherd {
    fn on_arrival(&mut self, _now_ns: u64, _request: Request, _out: &mut Output) {}
    fn on_timer(&mut self, _now_ns: u64, _out: &mut Output) {}
    fn on_completion(&mut self, _now_ns: u64, _completion: &Completion, _out: &mut Output) {}
    fn next_timer_ns(&mut self) -> Option<u64> {
        None
    }
    fn queued_count(&self) -> usize {
        0
    }
}
