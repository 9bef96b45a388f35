//! The terminal: indicatif spinners for image builds, boots and steps, live guest output,
//! and a final summary. On a non-terminal (CI logs, pipes) there are no spinners, only
//! plain status lines; with `--quiet`, only guest output and errors.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

use crate::events::{Event, Reporter, RunId};
use crate::outcome::Outcome;

/// How status goes to the user.
#[derive(Debug, Clone, Copy)]
pub struct Status {
    pub quiet: bool,
    pub tty: bool,
}

impl Status {
    pub fn new(quiet: bool) -> Self {
        Status {
            quiet,
            tty: std::io::stderr().is_terminal(),
        }
    }

    /// A status line on stderr (not in quiet mode).
    pub fn line(&self, msg: &str) {
        if !self.quiet {
            eprintln!("{msg}");
        }
    }

    /// An error line on stderr, always.
    pub fn error(&self, msg: &str) {
        eprintln!("runner: error: {msg}");
    }

    /// A spinner on a terminal; plain lines elsewhere; nothing when quiet.
    pub fn spinner(&self, msg: &str) -> Spinner {
        if self.quiet {
            return Spinner {
                bar: None,
                plain: false,
            };
        }
        if !self.tty {
            eprintln!("{msg}");
            return Spinner {
                bar: None,
                plain: true,
            };
        }
        let bar = ProgressBar::new_spinner();
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} [{elapsed}]").expect("template"),
        );
        bar.enable_steady_tick(Duration::from_millis(120));
        bar.set_message(msg.to_string());
        Spinner {
            bar: Some(bar),
            plain: false,
        }
    }
}

/// A progress indicator that degrades to plain lines.
#[derive(Debug)]
pub struct Spinner {
    bar: Option<ProgressBar>,
    plain: bool,
}

impl Spinner {
    pub fn set_message(&self, msg: String) {
        match &self.bar {
            Some(b) => b.set_message(msg),
            None if self.plain => eprintln!("{msg}"),
            None => {}
        }
    }

    pub fn finish_and_clear(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// Prints `f`'s output without tearing the spinner.
    pub fn suspend<R>(&self, f: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }
}

/// One finished suite for the summary.
#[derive(Debug)]
struct Finished {
    id: RunId,
    outcome: Outcome,
    duration: Duration,
    steps: Vec<(String, Outcome, Duration)>,
    boot: Option<Duration>,
    accel: String,
}

/// The console reporter.
#[derive(Debug)]
pub struct Console {
    status: Status,
    spinner: Option<Spinner>,
    steps: Vec<(String, Outcome, Duration)>,
    finished: Vec<Finished>,
    /// Whether the last output byte was a newline (so status lines start on a fresh line).
    at_line_start: bool,
    /// In single-command mode only the command's output is shown, no step headers.
    command_mode: bool,
}

impl Console {
    pub fn new(status: Status, command_mode: bool) -> Self {
        Console {
            status,
            spinner: None,
            steps: Vec::new(),
            finished: Vec::new(),
            at_line_start: true,
            command_mode,
        }
    }

    fn stop_spinner(&mut self) {
        if let Some(s) = self.spinner.take() {
            s.finish_and_clear();
        }
    }

    fn status_line(&mut self, msg: &str) {
        if self.status.quiet {
            return;
        }
        self.stop_spinner();
        if !self.at_line_start {
            eprintln!();
            self.at_line_start = true;
        }
        eprintln!("{msg}");
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

impl Reporter for Console {
    fn on_event(&mut self, event: &Event) {
        match event {
            Event::Note { message } => self.status_line(&format!("runner: {message}")),
            Event::SuiteStarted { id, steps } => {
                self.steps.clear();
                if !self.command_mode {
                    self.status_line(&format!(
                        "=== suite {} on {} ({steps} steps)",
                        id.suite, id.arch
                    ));
                }
            }
            Event::ImageProgress { id, message } => {
                let msg = format!("{}: {message}", id.arch);
                match &self.spinner {
                    Some(s) => s.set_message(msg),
                    None => self.spinner = Some(self.status.spinner(&msg)),
                }
            }
            Event::VmBooting { id, accel } => {
                self.stop_spinner();
                self.spinner = Some(
                    self.status
                        .spinner(&format!("booting {} VM ({accel})", id.arch)),
                );
            }
            Event::VmBooted { id, facts } => {
                self.stop_spinner();
                let boot = facts.boot_time.map(secs).unwrap_or_default();
                self.status_line(&format!(
                    "started {} VM {} in {boot} ({}; {}, {}, kernel {})",
                    id.arch,
                    facts.vm_id,
                    facts.start,
                    facts.accel,
                    facts.image,
                    facts.kernel_version
                ));
            }
            Event::StepStarted { step, index, .. } => {
                if !self.command_mode {
                    self.status_line(&format!("--- step {}: {step}", index + 1));
                }
            }
            Event::Output { bytes, .. } => {
                self.stop_spinner();
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(bytes);
                let _ = out.flush();
                if let Some(&last) = bytes.last() {
                    self.at_line_start = last == b'\n';
                }
            }
            Event::StepFinished {
                step,
                outcome,
                duration,
                ..
            } => {
                self.steps.push((step.clone(), outcome.clone(), *duration));
                if !self.command_mode {
                    let mark = if outcome.is_success() { "ok" } else { "FAIL" };
                    self.status_line(&format!(
                        "--- {mark}: {step}: {outcome} in {}",
                        secs(*duration)
                    ));
                }
            }
            Event::SuiteFinished {
                id,
                outcome,
                duration,
                facts,
                ..
            } => {
                self.stop_spinner();
                self.finished.push(Finished {
                    id: id.clone(),
                    outcome: outcome.clone(),
                    duration: *duration,
                    steps: std::mem::take(&mut self.steps),
                    boot: facts.boot_time,
                    accel: facts.accel.clone(),
                });
            }
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        self.stop_spinner();
        if self.status.quiet || self.finished.is_empty() {
            return Ok(());
        }
        if !self.at_line_start {
            eprintln!();
        }
        eprintln!("=== summary");
        for f in &self.finished {
            let passed = f.steps.iter().filter(|s| s.1 == Outcome::Passed).count();
            let boot = f
                .boot
                .map(|b| format!(", boot {}", secs(b)))
                .unwrap_or_default();
            eprintln!(
                "{:<9} {} on {}: {passed}/{} steps passed in {}{boot}{}",
                f.outcome.label().to_uppercase(),
                f.id.suite,
                f.id.arch,
                f.steps.len(),
                secs(f.duration),
                if f.accel.is_empty() {
                    String::new()
                } else {
                    format!(" [{}]", f.accel)
                },
            );
            if let Outcome::InfraError { message, .. } = &f.outcome {
                eprintln!("          {message}");
            }
            for (name, outcome, d) in &f.steps {
                if !outcome.is_success() {
                    eprintln!("          {name}: {outcome} ({})", secs(*d));
                }
            }
        }
        Ok(())
    }
}
