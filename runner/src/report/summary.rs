//! The markdown summary of one suite × arch run: a title, the counts, failing and slowest
//! tests, the steps and the VM's facts. One rendering for every place a person reads it: a
//! GitHub check run's `output.summary` and `runner test --summary FILE` (made for GitHub
//! Actions' `$GITHUB_STEP_SUMMARY`, so that Actions mode and App mode read the same).

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use super::cases::{cases, Case};
use super::collect::{Milestone, RunCollector, RunRecord};
use crate::events::{Event, Reporter};
use crate::outcome::{InfraKind, Outcome};
use crate::text::{cell, truncate};

/// Failing tests listed in the summary, and slowest tests shown.
const LIST_FAILING: usize = 50;
const LIST_SLOWEST: usize = 10;
/// Longest infrastructure error message shown.
const MAX_ERROR: usize = 4000;

/// A run's summary: its one-line title and the markdown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    pub title: String,
    pub markdown: String,
}

/// The headline for `outcome`. An infrastructure error says it was not the tests' fault.
pub fn headline(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Passed => "passed".into(),
        Outcome::Skipped => "skipped".into(),
        Outcome::Failed { .. } => outcome.to_string(),
        Outcome::TimedOut => "timed out (the VM was stopped)".into(),
        Outcome::Cancelled => {
            "cancelled (the runner service stopped or the run was superseded)".into()
        }
        Outcome::InfraError { kind, message } => {
            let what = match kind {
                InfraKind::Config => "bad configuration",
                InfraKind::Host => "the host lacks something",
                InfraKind::Image => "base image unusable",
                InfraKind::Boot => "the VM did not boot",
                InfraKind::Agent => "the VM failed after boot",
                InfraKind::Io => "host I/O failed",
            };
            let first = message.lines().next().unwrap_or_default();
            format!("infrastructure error, not a test failure: {what}: {first}")
        }
    }
}

/// A duration as a person reads it in a table.
pub fn secs(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Renders `run`, whose test cases are `all`. `mask` hides secrets in everything the guest
/// wrote; it is applied before any cutting or escaping, so no part of a secret survives.
pub fn render(run: &RunRecord, all: &[Case], mask: &dyn Fn(&str) -> String) -> Summary {
    let headline = headline(&run.outcome);
    let failing: Vec<&Case> = all.iter().filter(|c| c.failed).collect();
    let skipped = all.iter().filter(|c| c.skipped).count();
    let passed = all.len() - failing.len() - skipped;
    let arch = run.id.arch.name();

    let title = if all.is_empty() {
        format!("{} on {arch}: {headline}", run.id.suite)
    } else if failing.is_empty() {
        format!(
            "{} on {arch}: {headline} — {} tests passed",
            run.id.suite, passed
        )
    } else {
        format!(
            "{} on {arch}: {headline} — {} of {} tests failed",
            run.id.suite,
            failing.len(),
            all.len()
        )
    };

    let mut s = String::new();
    let _ = writeln!(s, "## {}\n", cell(&title));
    if let Outcome::InfraError { message, .. } = &run.outcome {
        let _ = writeln!(
            s,
            "The run did not get to a verdict on the tests: the runner or its VM failed.\n\n```text\n{}\n```\n",
            truncate(&mask(message), MAX_ERROR).replace("```", "'''")
        );
    }
    if all.is_empty() {
        // No JUnit report: the steps are the tests.
        let count = |f: fn(&Outcome) -> bool| run.steps.iter().filter(|st| f(&st.outcome)).count();
        let _ = writeln!(
            s,
            "| steps | passed | failed | skipped | duration |\n|---:|---:|---:|---:|---:|\n| {} | {} | {} | {} | {} |\n",
            run.steps.len(),
            count(|o| *o == Outcome::Passed),
            count(|o| !o.is_success()),
            count(|o| *o == Outcome::Skipped),
            secs(run.duration)
        );
    } else {
        let _ = writeln!(
            s,
            "| tests | passed | failed | skipped | duration |\n|---:|---:|---:|---:|---:|\n| {} | {passed} | {} | {skipped} | {} |\n",
            all.len(),
            failing.len(),
            secs(run.duration)
        );
    }
    if !failing.is_empty() {
        let _ = writeln!(s, "### Failing tests\n");
        for c in failing.iter().take(LIST_FAILING) {
            let _ = writeln!(s, "- `{}` — {}", cell(&c.name), cell(&mask(&c.message)));
        }
        if failing.len() > LIST_FAILING {
            let _ = writeln!(s, "- … and {} more", failing.len() - LIST_FAILING);
        }
        s.push('\n');
    }
    if !run.steps.is_empty() {
        let _ = writeln!(
            s,
            "### Steps\n\n| step | result | duration |\n|---|---|---:|"
        );
        for st in &run.steps {
            let _ = writeln!(
                s,
                "| `{}` | {} | {} |",
                cell(&st.name),
                cell(&st.outcome.to_string()),
                secs(st.duration)
            );
        }
        s.push('\n');
    }
    let mut timed: Vec<&Case> = all.iter().filter(|c| c.time.is_some()).collect();
    timed.sort_by_key(|c| std::cmp::Reverse(c.time));
    if !timed.is_empty() {
        let _ = writeln!(s, "### Slowest tests\n\n| test | time |\n|---|---:|");
        for c in timed.iter().take(LIST_SLOWEST) {
            let _ = writeln!(
                s,
                "| `{}` | {} |",
                cell(&c.name),
                secs(c.time.unwrap_or_default())
            );
        }
        s.push('\n');
    }
    let f = &run.facts;
    let _ = writeln!(
        s,
        "### Environment\n\n| | |\n|---|---|\n| architecture | {arch} |"
    );
    for (k, v) in [
        ("image", f.image.as_str()),
        ("accelerator", f.accel.as_str()),
        ("QEMU", f.qemu_version.as_str()),
        ("guest kernel", f.kernel_version.as_str()),
        ("VM start", f.start.as_str()),
        ("VM id", f.vm_id.as_str()),
    ] {
        if !v.is_empty() {
            let _ = writeln!(s, "| {k} | {} |", cell(v));
        }
    }
    if let Some(b) = f.boot_time {
        let _ = writeln!(s, "| boot time | {} |", secs(b));
    }
    Summary { title, markdown: s }
}

/// `runner test --summary FILE`: one section per suite × architecture, appended to FILE.
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
}

impl Reporter for MarkdownSummary {
    fn on_event(&mut self, event: &Event) {
        if let Some(Milestone::Finished(run)) = self.collector.on_event(event) {
            // Nothing to mask: the CLI has no secrets of its own, and the guest's output is
            // the user's own.
            let summary = render(&run, &cases(&run.reports), &|t| t.to_string());
            self.sections.push(summary.markdown);
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
