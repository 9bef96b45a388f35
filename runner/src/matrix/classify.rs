//! Against the previous run: what changed for every test (new failure, fixed, still
//! failing, flaky, new test, removed), which cells slowed down, and what that means for the
//! exit status under `--fail-on`.
//!
//! The rules, for a test of a cell in this run:
//! - cells that did not run (cancelled, skipped) are not compared at all;
//! - flaky now → **flaky**, whatever it was before;
//! - failing now (failed, timed out, error) → **still failing** if it failed last time,
//!   else **new failure** — also when it did not exist last time, or when there is no
//!   previous run: a failure nobody has seen before is what the nightly is for;
//! - passing now → **fixed** if it failed last time, **new test** if the previous run had
//!   no such test (not reported on the very first run, where every test would be new);
//! - in the previous run but not in this one → **removed**, but only when the cell ran to
//!   the end this time (an error cell did not *remove* its tests). A `(setup)` failure that
//!   went away is **fixed**.
//!
//! A cell is a slowdown when both runs ran to the end and its last attempt took more than
//! `slowdown_percent` longer *and* at least `slowdown_min` more than last time.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::attempt::SETUP_TEST;
use super::results::{Change, Comparison, RemovedTest, RunResults, Slowdown, Status};
use super::spec::{FailOn, HistorySettings};
use crate::exit;

/// Fills in `change` on every test, the slowdowns, and `results.comparison`.
pub fn classify(results: &mut RunResults, previous: Option<&RunResults>, h: &HistorySettings) {
    let mut removed = Vec::new();
    for cell in &mut results.cells {
        if matches!(cell.status, Status::Cancelled | Status::Skipped) {
            continue;
        }
        let prev_cell = previous.and_then(|p| p.cell(&cell.key));
        // By name: cells may hold thousands of tests.
        let before: HashMap<&str, Status> = prev_cell
            .map(|c| {
                c.tests
                    .iter()
                    .map(|t| (t.name.as_str(), t.status))
                    .collect()
            })
            .unwrap_or_default();
        for t in &mut cell.tests {
            let was = before.get(t.name.as_str()).copied();
            t.change = change_of(t.status, was, previous.is_some());
        }
        if let Some(pc) = prev_cell {
            if cell.completed() {
                let now: HashSet<String> = cell.tests.iter().map(|t| t.name.clone()).collect();
                for old in &pc.tests {
                    if now.contains(&old.name) {
                        continue;
                    }
                    if old.name == SETUP_TEST {
                        // Not a test that went away: the cell's setup works again. Recorded
                        // as a passing (setup) so the fix is visible in every report.
                        if old.status.is_failing() {
                            cell.tests.push(super::results::TestResult {
                                name: SETUP_TEST.into(),
                                kind: old.kind,
                                status: Status::Passed,
                                duration_s: 0.0,
                                attempts: 1,
                                message: None,
                                log_tail: None,
                                change: Some(Change::Fixed),
                            });
                        }
                        continue;
                    }
                    removed.push(RemovedTest {
                        cell: cell.key.clone(),
                        test: old.name.clone(),
                    });
                }
                if pc.completed() {
                    cell.slowdown = slowdown(pc.duration_s, cell.duration_s, h);
                }
            }
        }
    }
    // Whole cells that are no longer in the matrix: their tests are removed.
    if let Some(p) = previous {
        for pc in &p.cells {
            if results.cell(&pc.key).is_none() {
                removed.extend(pc.tests.iter().map(|t| RemovedTest {
                    cell: pc.key.clone(),
                    test: t.name.clone(),
                }));
            }
        }
    }
    let mut comparison = Comparison {
        previous_run: previous.map(|p| p.run.id.clone()),
        previous_started_at: previous.map(|p| p.run.started_at.clone()),
        counts: BTreeMap::new(),
        removed,
    };
    results.comparison = None;
    for c in Change::ALL {
        let n = if c == Change::Removed {
            comparison.removed.len()
        } else {
            results.changed(c).len()
        };
        comparison.counts.insert(c.key().into(), n);
    }
    let slow = results
        .cells
        .iter()
        .filter(|c| c.slowdown.is_some())
        .count();
    comparison.counts.insert("slowdown".into(), slow);
    results.comparison = Some(comparison);
}

/// The change of one test: its status now, its status last time (`None`: no such test),
/// and whether there was a previous run at all.
pub fn change_of(now: Status, before: Option<Status>, had_previous: bool) -> Option<Change> {
    if now == Status::Flaky {
        return Some(Change::Flaky);
    }
    if now.is_failing() {
        return Some(match before {
            Some(b) if b.is_failing() => Change::StillFailing,
            _ => Change::NewFailure,
        });
    }
    // A skipped test did not run (an earlier step failed, or the VM never booted): it
    // cannot have been fixed.
    if now == Status::Skipped {
        return None;
    }
    match before {
        Some(b) if b.is_failing() => Some(Change::Fixed),
        Some(_) => None,
        None if had_previous => Some(Change::NewTest),
        None => None,
    }
}

fn slowdown(previous_s: f64, current_s: f64, h: &HistorySettings) -> Option<Slowdown> {
    let grew = current_s - previous_s;
    let limit = previous_s * f64::from(h.slowdown_percent) / 100.0;
    (grew > limit && grew >= h.slowdown_min.as_secs_f64()).then_some(Slowdown {
        previous_s,
        current_s,
    })
}

/// The exit status of a finished (not cancelled) run under `fail_on`.
pub fn exit_status(results: &RunResults, fail_on: FailOn) -> i32 {
    let failed = match fail_on {
        FailOn::Never => false,
        FailOn::Regression => results.count(Change::NewFailure) > 0,
        FailOn::Failure => results.cells.iter().any(|c| c.status.is_failing()),
    };
    if failed {
        exit::TEST_FAILED
    } else {
        exit::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matrix::results::{CellResult, RunInfo, TestKind, TestResult};
    use std::time::Duration;

    fn test(name: &str, status: Status) -> TestResult {
        TestResult {
            name: name.into(),
            kind: TestKind::Test,
            status,
            duration_s: 1.0,
            attempts: 1,
            message: None,
            log_tail: None,
            change: None,
        }
    }

    fn cell(key: &str, status: Status, duration_s: f64, tests: Vec<TestResult>) -> CellResult {
        CellResult {
            key: key.into(),
            suite: "s".into(),
            arch: "riscv64".into(),
            image: "debian-13".into(),
            status,
            outcome: status.label().into(),
            message: None,
            duration_s,
            total_s: duration_s,
            attempts: 1,
            accelerator: "tcg".into(),
            qemu_version: String::new(),
            kernel_version: String::new(),
            tests,
            slowdown: None,
            trend_s: Vec::new(),
        }
    }

    fn run(id: &str, cells: Vec<CellResult>) -> RunResults {
        RunResults {
            schema: crate::matrix::results::SCHEMA.into(),
            version: 1,
            run: RunInfo {
                id: id.into(),
                started_at: String::new(),
                finished_at: String::new(),
                duration_s: 0.0,
                complete: true,
                runner_version: String::new(),
                jobs: 1,
                retries: 0,
                fail_on: "regression".into(),
            },
            cells,
            comparison: None,
        }
    }

    #[test]
    fn change_table() {
        use Change::{Fixed, NewFailure, NewTest, StillFailing};
        use Status::{Error, Failed, Passed, Skipped, TimedOut};
        // (now, before, had a previous run, expected change)
        let cases = [
            (Failed, Some(Passed), true, Some(NewFailure)), // regression
            (Error, Some(Passed), true, Some(NewFailure)),  // infra error counts too
            (Failed, None, true, Some(NewFailure)),         // a new test that fails
            (Failed, None, false, Some(NewFailure)),        // first run: still a failure
            (Failed, Some(Status::Flaky), true, Some(NewFailure)), // flaky before, broken now
            (Passed, Some(Failed), true, Some(Fixed)),      // fixed
            (Passed, Some(TimedOut), true, Some(Fixed)),    // a timeout fixed
            (Failed, Some(Failed), true, Some(StillFailing)), // already red: no page
            (TimedOut, Some(Failed), true, Some(StillFailing)),
            (Status::Flaky, Some(Passed), true, Some(Change::Flaky)), // flaky, whatever before
            (Status::Flaky, Some(Failed), true, Some(Change::Flaky)),
            (Passed, None, true, Some(NewTest)), // new test
            (Passed, None, false, None),         // first run: nothing is "new"
            (Passed, Some(Passed), true, None),  // unchanged
            (Skipped, Some(Passed), true, None),
            (Skipped, Some(Failed), true, None), // did not run: not fixed
            (Skipped, None, true, None),
        ];
        for (now, before, had, want) in cases {
            assert_eq!(
                change_of(now, before, had),
                want,
                "{now:?} {before:?} {had}"
            );
        }
    }

    #[test]
    fn classification_against_a_previous_run() {
        use Status::*;
        let h = HistorySettings::default();
        let previous = run(
            "yesterday",
            vec![
                cell(
                    "a",
                    Failed,
                    10.0,
                    vec![
                        test("regress", Passed),
                        test("fix", Failed),
                        test("still", Failed),
                        test("gone", Passed),
                    ],
                ),
                cell("b", Error, 1.0, vec![test(SETUP_TEST, Error)]),
                cell("dropped", Passed, 1.0, vec![test("t", Passed)]),
            ],
        );
        let mut now = run(
            "today",
            vec![
                cell(
                    "a",
                    Failed,
                    10.5,
                    vec![
                        test("regress", Failed),
                        test("fix", Passed),
                        test("still", Failed),
                        test("flake", Flaky),
                        test("fresh", Passed),
                    ],
                ),
                cell("b", Passed, 2.0, vec![test("t", Passed)]),
            ],
        );
        classify(&mut now, Some(&previous), &h);
        let change = |c: &str, t: &str| {
            now.cell(c)
                .unwrap()
                .tests
                .iter()
                .find(|x| x.name == t)
                .unwrap()
                .change
        };
        assert_eq!(change("a", "regress"), Some(Change::NewFailure));
        assert_eq!(change("a", "fix"), Some(Change::Fixed));
        assert_eq!(change("a", "still"), Some(Change::StillFailing));
        assert_eq!(change("a", "flake"), Some(Change::Flaky));
        assert_eq!(change("a", "fresh"), Some(Change::NewTest));
        assert_eq!(change("b", SETUP_TEST), Some(Change::Fixed));
        let removed: Vec<_> = now
            .comparison
            .as_ref()
            .unwrap()
            .removed
            .iter()
            .map(|r| format!("{}:{}", r.cell, r.test))
            .collect();
        assert_eq!(removed, ["a:gone", "dropped:t"]);
        let counts = &now.comparison.as_ref().unwrap().counts;
        assert_eq!(counts["new_failure"], 1);
        assert_eq!(counts["removed"], 2);
        assert_eq!(exit_status(&now, FailOn::Regression), 1);
    }

    #[test]
    fn an_error_cell_does_not_remove_its_tests() {
        use Status::*;
        let previous = run("p", vec![cell("a", Passed, 5.0, vec![test("t", Passed)])]);
        let mut now = run(
            "n",
            vec![cell("a", Error, 1.0, vec![test(SETUP_TEST, Error)])],
        );
        classify(&mut now, Some(&previous), &HistorySettings::default());
        assert!(now.comparison.as_ref().unwrap().removed.is_empty());
        assert_eq!(now.cells[0].tests[0].change, Some(Change::NewFailure));
    }

    #[test]
    fn slowdown_needs_both_percent_and_seconds() {
        let h = HistorySettings {
            keep: 3,
            slowdown_percent: 25,
            slowdown_min: Duration::from_secs(10),
        };
        // (previous, current, slowdown?)
        let cases = [
            (40.0, 60.0, true),    // +50 %, +20 s
            (4.0, 8.0, false),     // +100 % but only +4 s
            (100.0, 115.0, false), // +15 s but only +15 %
            (60.0, 40.0, false),   // faster
        ];
        for (prev, cur, want) in cases {
            let previous = run("p", vec![cell("a", Status::Passed, prev, vec![])]);
            let mut now = run("n", vec![cell("a", Status::Passed, cur, vec![])]);
            classify(&mut now, Some(&previous), &h);
            assert_eq!(now.cells[0].slowdown.is_some(), want, "{prev} -> {cur}");
        }
    }

    #[test]
    fn exit_status_per_fail_on() {
        use Status::*;
        let previous = run("p", vec![cell("a", Failed, 1.0, vec![test("t", Failed)])]);
        // (this run's cell status and test status, fail-on, expected exit)
        let cases = [
            // Already red yesterday: only --fail-on failure pages.
            (Failed, Failed, FailOn::Regression, 0),
            (Failed, Failed, FailOn::Failure, 1),
            (Failed, Failed, FailOn::Never, 0),
            // A new failure (another test broke): regression pages.
            (Failed, Error, FailOn::Regression, 0), // still failing (error after failure)
            // Flaky passed in the end: no failure, no regression.
            (Flaky, Flaky, FailOn::Failure, 0),
            (Flaky, Flaky, FailOn::Regression, 0),
            // Green.
            (Passed, Passed, FailOn::Failure, 0),
            // An error cell is a failure.
            (Error, Error, FailOn::Failure, 1),
        ];
        for (cell_status, test_status, fail_on, want) in cases {
            let mut now = run(
                "n",
                vec![cell("a", cell_status, 1.0, vec![test("t", test_status)])],
            );
            classify(&mut now, Some(&previous), &HistorySettings::default());
            assert_eq!(
                exit_status(&now, fail_on),
                want,
                "{cell_status:?} {fail_on:?}"
            );
        }
        // A regression against a green previous run.
        let green = run("p", vec![cell("a", Passed, 1.0, vec![test("t", Passed)])]);
        let mut now = run("n", vec![cell("a", Failed, 1.0, vec![test("t", Failed)])]);
        classify(&mut now, Some(&green), &HistorySettings::default());
        assert_eq!(exit_status(&now, FailOn::Regression), 1);
        assert_eq!(exit_status(&now, FailOn::Never), 0);
    }
}
