//! The job log's text: run events become lines in GitLab's style — collapsible sections
//! (`section_start`/`section_end`) around VM start and each step, the guest's output as it
//! comes — and what the run brought back (JUnit reports, artifacts) is kept for the upload.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use crate::events::{Event, GuestReport, Reporter};
use crate::outcome::Outcome;

/// What the run brought back (from its last event).
#[derive(Debug, Default)]
pub struct Found {
    pub reports: Vec<GuestReport>,
    pub artifacts: Vec<PathBuf>,
}

/// Turns run events into job log text (GitLab's collapsible sections around each step).
pub struct TraceReporter {
    pub log: mpsc::UnboundedSender<Vec<u8>>,
    pub found: Arc<Mutex<Found>>,
    pub span: tracing::Span,
    pub picked_up: std::time::Instant,
}

impl std::fmt::Debug for TraceReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TraceReporter")
    }
}

impl TraceReporter {
    fn say(&self, s: String) {
        let _ = self.log.send(s.into_bytes());
    }
}

fn section_name(step: &str) -> String {
    if step == "script" {
        "step_script".into()
    } else {
        sanitize(step)
    }
}

impl Reporter for TraceReporter {
    fn on_event(&mut self, event: &Event) {
        match event {
            Event::Note { message } => self.say(format!("NOTE: {message}\n")),
            Event::ImageProgress { message, .. } => self.say(format!("image: {message}\n")),
            Event::VmBooting { id, accel } => self.say(format!(
                "section_start:{}:prepare_vm\r\x1b[0K\x1b[36;1mStarting a {} VM ({accel})\x1b[0;m\n",
                unix_now(),
                id.arch
            )),
            Event::VmBooted { facts, .. } => {
                self.span
                    .record("vm_id", tracing::field::display(&facts.vm_id));
                let _enter = self.span.enter();
                tracing::info!(
                    start = %facts.start,
                    boot_s = facts.boot_time.map(|d| d.as_secs_f64()).unwrap_or(0.0),
                    since_pickup_s = self.picked_up.elapsed().as_secs_f64(),
                    "VM ready"
                );
                self.say(format!(
                    "VM {} ready in {:.2} s ({}; kernel {}, QEMU {})\nsection_end:{}:prepare_vm\r\x1b[0K",
                    facts.vm_id,
                    facts.boot_time.unwrap_or_default().as_secs_f64(),
                    facts.start,
                    facts.kernel_version,
                    facts.qemu_version,
                    unix_now()
                ))
            }
            Event::StepStarted { step, .. } => self.say(format!(
                "section_start:{}:{}\r\x1b[0K\x1b[36;1mExecuting \"{}\" stage of the job script\x1b[0;m\n",
                unix_now(),
                section_name(step),
                section_name(step)
            )),
            Event::Output { bytes, .. } => {
                let _ = self.log.send(bytes.clone());
            }
            Event::StepFinished {
                step,
                outcome,
                duration,
                ..
            } => {
                if *outcome == Outcome::Skipped {
                    return;
                }
                let _enter = self.span.enter();
                tracing::info!(step = %step, outcome = %outcome, duration_s = duration.as_secs_f64(), "step finished");
                let mut s = String::new();
                if step == "after_script" && !outcome.is_success() {
                    s.push_str(&format!(
                        "\x1b[33;1mWARNING: after_script failed, but the job continues unaffected: {outcome}\x1b[0;m\n"
                    ));
                }
                s.push_str(&format!(
                    "section_end:{}:{}\r\x1b[0K",
                    unix_now(),
                    section_name(step)
                ));
                self.say(s);
            }
            Event::SuiteFinished {
                reports, artifacts, ..
            } => {
                let mut f = self.found.lock().expect("not poisoned");
                f.reports = reports.clone();
                f.artifacts = artifacts.clone();
            }
            Event::SuiteStarted { .. } => {}
        }
    }
}

/// A name safe for section names and directory names.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Seconds since the epoch (section markers carry it).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
