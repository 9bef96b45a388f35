//! The event stream from a run to its reporters (console, JUnit, the markdown summary, the
//! GitLab job log, GitHub check runs, the matrix).
//! One producer — the suite executor — and any number of consumers; reporters never reach
//! back into the run.

use std::path::PathBuf;
use std::time::Duration;

use engine::Arch;

use crate::outcome::Outcome;

/// Which suite on which architecture an event belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RunId {
    pub suite: String,
    pub arch: Arch,
}

/// Facts about the VM a suite ran in, for reports.
#[derive(Debug, Clone, Default)]
pub struct VmFacts {
    pub image: String,
    pub accel: String,
    pub qemu_version: String,
    pub kernel_version: String,
    pub vm_id: String,
    pub boot_time: Option<Duration>,
    /// How the VM started: cold boot, or resumed from a saved state.
    pub start: String,
}

/// A JUnit report produced inside the guest and brought back.
#[derive(Debug, Clone)]
pub struct GuestReport {
    /// Its path in the guest, relative to /workspace.
    pub path: String,
    pub xml: String,
}

#[derive(Debug, Clone)]
pub enum Event {
    /// Something the user should know that is not a failure (e.g. KVM fallback).
    Note {
        message: String,
    },
    SuiteStarted {
        id: RunId,
        steps: usize,
    },
    ImageProgress {
        id: RunId,
        message: String,
    },
    VmBooting {
        id: RunId,
        accel: String,
    },
    VmBooted {
        id: RunId,
        facts: VmFacts,
    },
    StepStarted {
        id: RunId,
        step: String,
        index: usize,
    },
    /// Live output of the running step (raw bytes, as the guest wrote them).
    Output {
        id: RunId,
        bytes: Vec<u8>,
    },
    StepFinished {
        id: RunId,
        step: String,
        outcome: Outcome,
        duration: Duration,
        /// The tail of the step's output, bounded.
        output_tail: String,
    },
    SuiteFinished {
        id: RunId,
        outcome: Outcome,
        duration: Duration,
        facts: VmFacts,
        reports: Vec<GuestReport>,
        artifacts: Vec<PathBuf>,
    },
}

/// A finished step as `Event::StepFinished` reported it, for reporters that keep them.
#[derive(Debug, Clone)]
pub struct StepRecord {
    pub name: String,
    pub outcome: Outcome,
    pub duration: Duration,
    pub output_tail: String,
}

impl StepRecord {
    /// The record of a `StepFinished` event; `None` for any other event.
    pub fn from_event(event: &Event) -> Option<StepRecord> {
        match event {
            Event::StepFinished {
                step,
                outcome,
                duration,
                output_tail,
                ..
            } => Some(StepRecord {
                name: step.clone(),
                outcome: outcome.clone(),
                duration: *duration,
                output_tail: output_tail.clone(),
            }),
            _ => None,
        }
    }
}

/// A consumer of events.
pub trait Reporter: Send {
    fn on_event(&mut self, event: &Event);
    /// Called once after the last event; writes files, prints summaries.
    fn finish(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Fans events out to every reporter.
#[derive(Default)]
pub struct Reporters {
    list: Vec<Box<dyn Reporter>>,
}

impl std::fmt::Debug for Reporters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reporters({})", self.list.len())
    }
}

impl Reporters {
    pub fn add(&mut self, r: Box<dyn Reporter>) {
        self.list.push(r);
    }

    pub fn emit(&mut self, event: Event) {
        for r in &mut self.list {
            r.on_event(&event);
        }
    }

    pub fn finish(&mut self) -> std::io::Result<()> {
        let mut first_err = None;
        for r in &mut self.list {
            if let Err(e) = r.finish() {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}
