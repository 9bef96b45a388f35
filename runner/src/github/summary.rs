//! `runner test --summary FILE`: the markdown a check run shows, one section per suite ×
//! architecture, appended to FILE — made for GitHub Actions' `$GITHUB_STEP_SUMMARY`, so that
//! Actions mode and App mode report the same way.

use std::io::Write as _;
use std::path::PathBuf;

use super::report::{self, SuiteLines};
use super::reporter::{Milestone, RunCollector};
use crate::events::{Event, Reporter};

#[derive(Debug)]
pub struct MarkdownSummary {
    path: PathBuf,
    collector: RunCollector,
    sections: Vec<String>,
}

impl MarkdownSummary {
    pub fn new(path: PathBuf) -> Self {
        MarkdownSummary {
            path,
            collector: RunCollector::default(),
            sections: Vec::new(),
        }
    }

    /// The markdown written so far (for tests).
    pub fn sections(&self) -> &[String] {
        &self.sections
    }
}

impl Reporter for MarkdownSummary {
    fn on_event(&mut self, event: &Event) {
        if let Some(Milestone::Finished(run)) = self.collector.on_event(event) {
            let r = report::render(&run, "runner.toml", &SuiteLines::default(), &|_| false, &[]);
            self.sections.push(r.output.summary);
        }
    }

    /// Appends (GitHub concatenates the summaries of a job's steps). A summary that cannot be
    /// written is reported but does not change the run's exit code: the tests ran.
    fn finish(&mut self) -> std::io::Result<()> {
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            for s in &self.sections {
                writeln!(f, "{s}")?;
            }
            Ok(())
        };
        if let Err(e) = write() {
            eprintln!(
                "runner: error: cannot write the summary {}: {e}",
                self.path.display()
            );
        }
        Ok(())
    }
}
