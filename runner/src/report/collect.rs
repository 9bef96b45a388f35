//! What a report of one finished suite × arch run needs, collected from the event stream:
//! its steps, a bounded tail of its output, and the suite's end ([`RunRecord`]).

use std::time::{Duration, SystemTime};

use engine::bounded::TailBuffer;

use crate::events::{Event, GuestReport, RunId, StepRecord, VmFacts};
use crate::outcome::Outcome;

/// Everything known about one suite × arch run when it ends.
#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: RunId,
    pub outcome: Outcome,
    pub duration: Duration,
    pub facts: VmFacts,
    pub steps: Vec<StepRecord>,
    pub reports: Vec<GuestReport>,
    /// The tail of the guest's output over all steps.
    pub log_tail: String,
}

/// Guest output kept for a report's log tail (GitHub shows at most 64 KiB of a check run's
/// text anyway).
const LOG_TAIL_BYTES: usize = 60 * 1024;

/// What a run has reached, as far as a report cares.
#[derive(Debug)]
pub enum Milestone {
    Booted { at: SystemTime, vm_id: String },
    Finished(Box<RunRecord>),
}

/// Collects what a report of one run needs from the event stream: its steps and a bounded
/// tail of its output. Shared by GitHub's check-run reporter and `runner test --summary`.
#[derive(Debug)]
pub struct RunCollector {
    steps: Vec<StepRecord>,
    log: TailBuffer,
}

impl Default for RunCollector {
    fn default() -> Self {
        RunCollector {
            steps: Vec::new(),
            log: TailBuffer::new(LOG_TAIL_BYTES),
        }
    }
}

impl RunCollector {
    /// Takes in one event; returns a milestone when one was reached.
    pub fn on_event(&mut self, event: &Event) -> Option<Milestone> {
        match event {
            Event::VmBooted { facts, .. } => {
                return Some(Milestone::Booted {
                    at: SystemTime::now(),
                    vm_id: facts.vm_id.clone(),
                })
            }
            Event::StepStarted { step, .. } => {
                self.log.push(format!("\n--- step {step}\n").as_bytes());
            }
            Event::Output { bytes, .. } => self.log.push(bytes),
            Event::Note { message } => self.log.push(format!("runner: {message}\n").as_bytes()),
            Event::StepFinished { .. } => self.steps.extend(StepRecord::from_event(event)),
            Event::SuiteFinished {
                id,
                outcome,
                duration,
                facts,
                reports,
                ..
            } => {
                let run = RunRecord {
                    id: id.clone(),
                    outcome: outcome.clone(),
                    duration: *duration,
                    facts: facts.clone(),
                    steps: std::mem::take(&mut self.steps),
                    reports: reports.clone(),
                    log_tail: self.log.text(),
                };
                self.log = TailBuffer::new(LOG_TAIL_BYTES);
                return Some(Milestone::Finished(Box::new(run)));
            }
            Event::SuiteStarted { .. } | Event::ImageProgress { .. } | Event::VmBooting { .. } => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_turns_events_into_milestones() {
        let id = RunId {
            suite: "unit".into(),
            arch: engine::Arch::Riscv64,
        };
        let mut c = RunCollector::default();
        assert!(c
            .on_event(&Event::SuiteStarted {
                id: id.clone(),
                steps: 1
            })
            .is_none());
        let booted = c.on_event(&Event::VmBooted {
            id: id.clone(),
            facts: VmFacts {
                vm_id: "vm-1".into(),
                ..Default::default()
            },
        });
        assert!(matches!(booted, Some(Milestone::Booted { vm_id, .. }) if vm_id == "vm-1"));
        c.on_event(&Event::StepStarted {
            id: id.clone(),
            step: "t".into(),
            index: 0,
        });
        // More output than the tail keeps: only the end survives.
        c.on_event(&Event::Output {
            id: id.clone(),
            bytes: vec![b'x'; LOG_TAIL_BYTES * 2],
        });
        c.on_event(&Event::Output {
            id: id.clone(),
            bytes: b"the end\n".to_vec(),
        });
        c.on_event(&Event::StepFinished {
            id: id.clone(),
            step: "t".into(),
            outcome: Outcome::Passed,
            duration: Duration::from_secs(1),
            output_tail: String::new(),
        });
        let Some(Milestone::Finished(run)) = c.on_event(&Event::SuiteFinished {
            id: id.clone(),
            outcome: Outcome::Passed,
            duration: Duration::from_secs(2),
            facts: VmFacts::default(),
            reports: Vec::new(),
            artifacts: Vec::new(),
        }) else {
            panic!("no Finished milestone")
        };
        assert_eq!(run.steps.len(), 1);
        assert!(run.log_tail.len() <= LOG_TAIL_BYTES);
        assert!(run.log_tail.ends_with("the end\n"));
    }
}
