//! The results of a matrix run as data: per cell and per test, with status, duration and
//! attempts. This is exactly what `results.json` holds (schema below), what the history
//! keeps, and what every report is written from.
//!
//! # `results.json`, schema `runner-matrix-results` version 1
//!
//! ```text
//! {
//!   "schema": "runner-matrix-results", "version": 1,
//!   "run": { "id", "started_at" (RFC 3339 UTC), "finished_at", "duration_s",
//!            "complete" (false: cancelled, partial), "runner_version",
//!            "jobs", "retries", "fail_on" },
//!   "cells": [ {
//!       "key": "suite/arch/image", "suite", "arch", "image",
//!       "status": passed | failed | flaky | timed_out | error | cancelled | skipped,
//!       "outcome": human text ("failed (exit 1)"), "message": error text or null,
//!       "duration_s" (last attempt), "total_s" (all attempts), "attempts",
//!       "accelerator", "qemu_version", "kernel_version",
//!       "tests": [ { "name", "kind": step | test, "status" (as above, minus cancelled),
//!                    "duration_s", "attempts", "message", "log_tail",
//!                    "change": null | new_failure | fixed | still_failing | flaky | new_test } ],
//!       "slowdown": null | { "previous_s", "current_s" },
//!       "trend_s": [durations of this cell in earlier runs, oldest first] } ],
//!   "comparison": null | { "previous_run", "previous_started_at",
//!       "counts": { "new_failure": n, "fixed": n, "still_failing": n, "flaky": n,
//!                   "new_test": n, "removed": n, "slowdown": n },
//!       "removed": [ { "cell", "test" } ] }
//! }
//! ```
//!
//! Fields are only ever added within a version; readers must ignore unknown fields.
//! Durations are seconds (floating point); test names are `step: NAME` for the suite's own
//! steps and `CLASSNAME.NAME` (or `SUITE.NAME`) for tests from the guest's JUnit reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const SCHEMA: &str = "runner-matrix-results";
pub const VERSION: u32 = 1;

/// How a cell or a test ended. Derived from [`crate::outcome::Outcome`], plus `Flaky`:
/// failed at first, passed on a re-run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Passed,
    Flaky,
    Skipped,
    Failed,
    TimedOut,
    Error,
    Cancelled,
}

impl Status {
    /// Did not pass: failed, timed out, or an infrastructure error.
    pub fn is_failing(self) -> bool {
        matches!(self, Status::Failed | Status::TimedOut | Status::Error)
    }

    pub fn label(self) -> &'static str {
        match self {
            Status::Passed => "passed",
            Status::Flaky => "flaky",
            Status::Skipped => "skipped",
            Status::Failed => "failed",
            Status::TimedOut => "timed out",
            Status::Error => "error",
            Status::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TestKind {
    /// A step of the suite (runner.toml).
    Step,
    /// A testcase from a JUnit report the guest produced.
    Test,
}

/// What changed for a test since the previous run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    /// Failing now, passing (or absent) last time: a regression.
    NewFailure,
    Fixed,
    StillFailing,
    Flaky,
    NewTest,
    Removed,
}

impl Change {
    pub const ALL: [Change; 6] = [
        Change::NewFailure,
        Change::Fixed,
        Change::StillFailing,
        Change::Flaky,
        Change::NewTest,
        Change::Removed,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Change::NewFailure => "new_failure",
            Change::Fixed => "fixed",
            Change::StillFailing => "still_failing",
            Change::Flaky => "flaky",
            Change::NewTest => "new_test",
            Change::Removed => "removed",
        }
    }

    /// "3 new failures", "1 fixed".
    pub fn count_text(self, n: usize) -> String {
        let plural = n != 1 && matches!(self, Change::NewFailure | Change::NewTest);
        format!("{n} {}{}", self.label(), if plural { "s" } else { "" })
    }

    pub fn label(self) -> &'static str {
        match self {
            Change::NewFailure => "new failure",
            Change::Fixed => "fixed",
            Change::StillFailing => "still failing",
            Change::Flaky => "flaky",
            Change::NewTest => "new test",
            Change::Removed => "removed",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TestResult {
    pub name: String,
    pub kind: TestKind,
    pub status: Status,
    pub duration_s: f64,
    pub attempts: u32,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub log_tail: Option<String>,
    #[serde(default)]
    pub change: Option<Change>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slowdown {
    pub previous_s: f64,
    pub current_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CellResult {
    pub key: String,
    pub suite: String,
    pub arch: String,
    pub image: String,
    pub status: Status,
    pub outcome: String,
    #[serde(default)]
    pub message: Option<String>,
    pub duration_s: f64,
    #[serde(default)]
    pub total_s: f64,
    pub attempts: u32,
    #[serde(default)]
    pub accelerator: String,
    #[serde(default)]
    pub qemu_version: String,
    #[serde(default)]
    pub kernel_version: String,
    #[serde(default)]
    pub tests: Vec<TestResult>,
    #[serde(default)]
    pub slowdown: Option<Slowdown>,
    #[serde(default)]
    pub trend_s: Vec<f64>,
}

impl CellResult {
    /// Tests per status, for the grid.
    pub fn counts(&self) -> BTreeMap<Status, usize> {
        let mut m = BTreeMap::new();
        for t in &self.tests {
            *m.entry(t.status).or_default() += 1;
        }
        m
    }

    /// Whether the cell ran to the end (its test list is complete and comparable).
    pub fn completed(&self) -> bool {
        matches!(self.status, Status::Passed | Status::Failed | Status::Flaky)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    pub id: String,
    pub started_at: String,
    pub finished_at: String,
    pub duration_s: f64,
    /// False when the run was cancelled: some cells never ran.
    pub complete: bool,
    pub runner_version: String,
    pub jobs: usize,
    pub retries: u32,
    pub fail_on: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemovedTest {
    pub cell: String,
    pub test: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Comparison {
    pub previous_run: Option<String>,
    pub previous_started_at: Option<String>,
    pub counts: BTreeMap<String, usize>,
    pub removed: Vec<RemovedTest>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResults {
    pub schema: String,
    pub version: u32,
    pub run: RunInfo,
    pub cells: Vec<CellResult>,
    #[serde(default)]
    pub comparison: Option<Comparison>,
}

impl RunResults {
    pub fn cell(&self, key: &str) -> Option<&CellResult> {
        self.cells.iter().find(|c| c.key == key)
    }

    /// Every test with a change of this kind, as (cell, test).
    pub fn changed(&self, change: Change) -> Vec<(&CellResult, &TestResult)> {
        self.cells
            .iter()
            .flat_map(|c| c.tests.iter().map(move |t| (c, t)))
            .filter(|(_, t)| t.change == Some(change))
            .collect()
    }

    pub fn count(&self, change: Change) -> usize {
        if change == Change::Removed {
            return self.comparison.as_ref().map_or(0, |c| c.removed.len());
        }
        self.changed(change).len()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("results serialise")
    }

    /// Reads a results file; `None` names why it is not one of ours (foreign or newer).
    pub fn from_json(text: &str) -> Result<RunResults, String> {
        #[derive(Deserialize)]
        struct Head {
            schema: Option<String>,
            version: Option<u32>,
        }
        let head: Head = serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        if head.schema.as_deref() != Some(SCHEMA) {
            return Err(format!("not a {SCHEMA} file"));
        }
        if head.version != Some(VERSION) {
            return Err(format!(
                "schema version {} (this runner reads {VERSION})",
                head.version.map_or("?".into(), |v| v.to_string())
            ));
        }
        serde_json::from_str(text).map_err(|e| format!("malformed: {e}"))
    }
}

/// Seconds as a short human string: "4.2s", "3m07s".
pub fn human_secs(s: f64) -> String {
    if s < 60.0 {
        format!("{s:.1}s")
    } else {
        let whole = s.round() as u64;
        format!("{}m{:02}s", whole / 60, whole % 60)
    }
}
