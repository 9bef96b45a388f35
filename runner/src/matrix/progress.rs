//! Live progress of a matrix run: on a terminal, one indicatif line per running cell plus an
//! overall bar; elsewhere (CI logs, pipes) one plain line when a cell starts and when it
//! ends; with `--quiet`, nothing. Guest output is not streamed (cells run side by side);
//! it is in the reports.

use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::results::{human_secs, CellResult};
use crate::events::{Event, Reporter};
use crate::report::console::Status;

#[derive(Debug, Clone)]
pub struct Progress {
    status: Status,
    multi: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    total: usize,
}

impl Progress {
    pub fn new(status: Status, total: usize) -> Self {
        if status.quiet || !status.tty {
            return Progress {
                status,
                multi: None,
                overall: None,
                total,
            };
        }
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let overall = multi.add(ProgressBar::new(total as u64));
        overall.set_style(
            ProgressStyle::with_template("matrix [{bar:30}] {pos}/{len} cells {msg} [{elapsed}]")
                .expect("template")
                .progress_chars("=> "),
        );
        overall.enable_steady_tick(Duration::from_millis(250));
        Progress {
            status,
            multi: Some(multi),
            overall: Some(overall),
            total,
        }
    }

    /// A line for the user, printed above the bars.
    pub fn line(&self, msg: &str) {
        if self.status.quiet {
            return;
        }
        match &self.multi {
            Some(m) => {
                let _ = m.println(msg);
            }
            None => eprintln!("{msg}"),
        }
    }

    /// A cell (attempt) begins: its own line on a terminal.
    pub fn cell_started(&self, key: &str, attempt: u32) -> CellLine {
        let label = if attempt > 1 {
            format!("{key} (attempt {attempt})")
        } else {
            key.to_string()
        };
        let bar = self.multi.as_ref().map(|m| {
            let bar = m.insert_before(
                self.overall.as_ref().expect("with multi"),
                ProgressBar::new_spinner(),
            );
            bar.set_style(
                ProgressStyle::with_template("  {spinner} {prefix}: {msg} [{elapsed}]")
                    .expect("template"),
            );
            bar.set_prefix(label.clone());
            bar.set_message("starting");
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        if bar.is_none() {
            self.line(&format!("started {label}"));
        }
        CellLine { bar }
    }

    /// A cell is done (after its last attempt).
    pub fn cell_finished(&self, done: usize, cell: &CellResult) {
        let attempts = if cell.attempts > 1 {
            format!(" after {} attempts", cell.attempts)
        } else {
            String::new()
        };
        self.line(&format!(
            "[{done}/{}] {}: {}{attempts} in {}",
            self.total,
            cell.key,
            cell.status.label().to_uppercase(),
            human_secs(cell.duration_s)
        ));
        if let Some(o) = &self.overall {
            o.inc(1);
        }
    }

    pub fn finish(&self) {
        if let Some(o) = &self.overall {
            o.finish_and_clear();
        }
    }
}

/// One running cell's line; as a reporter it follows the cell's events.
#[derive(Debug)]
pub struct CellLine {
    bar: Option<ProgressBar>,
}

impl Drop for CellLine {
    fn drop(&mut self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

impl Reporter for CellLine {
    fn on_event(&mut self, event: &Event) {
        let Some(bar) = &self.bar else { return };
        match event {
            Event::ImageProgress { message, .. } => bar.set_message(message.clone()),
            Event::VmBooting { accel, .. } => bar.set_message(format!("booting ({accel})")),
            Event::StepStarted { step, .. } => bar.set_message(step.clone()),
            Event::StepFinished { step, outcome, .. } if !outcome.is_success() => {
                bar.set_message(format!("{step}: {outcome}"))
            }
            _ => {}
        }
    }
}
