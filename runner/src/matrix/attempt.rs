//! One attempt at a cell (one fresh VM) as recorded from the run's events, and how the
//! attempts of a cell merge into its result: the last attempt decides, and a cell or test
//! that failed before passing on a re-run is *flaky* — neither passed nor failed.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quick_junit::{NonSuccessKind, TestCaseStatus};

use crate::events::{Event, GuestReport, Reporter, StepRecord, VmFacts};
use crate::outcome::Outcome;
use crate::report::junit_read;

use super::results::{CellResult, Status, TestKind, TestResult};
use super::spec::Cell;

/// Bytes of output kept per test in the results (the HTML shows them; the history keeps
/// them, so they must stay small).
pub const LOG_TAIL_BYTES: usize = 4 * 1024;
/// Bytes of an error message kept per cell.
const MESSAGE_BYTES: usize = 4 * 1024;
/// Name of the test standing for a cell that failed outside any step (image, boot, agent),
/// as in the JUnit report.
pub const SETUP_TEST: &str = "(setup)";

/// Everything one attempt produced.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub outcome: Outcome,
    pub duration: Duration,
    pub facts: VmFacts,
    pub steps: Vec<StepRecord>,
    pub reports: Vec<GuestReport>,
}

impl Attempt {
    /// An attempt that never started a VM (the run was cancelled first, or the image could
    /// not be prepared).
    pub fn without_vm(outcome: Outcome, image: &str) -> Self {
        Attempt {
            outcome,
            duration: Duration::ZERO,
            facts: VmFacts {
                image: image.into(),
                ..Default::default()
            },
            steps: Vec::new(),
            reports: Vec::new(),
        }
    }
}

/// A reporter that records one attempt; the scheduler reads it back when the run ends.
#[derive(Debug, Clone)]
pub struct Recorder(pub Arc<Mutex<Attempt>>);

impl Recorder {
    pub fn new(image: &str) -> Self {
        Recorder(Arc::new(Mutex::new(Attempt::without_vm(
            Outcome::Cancelled,
            image,
        ))))
    }

    pub fn take(&self) -> Attempt {
        self.0.lock().expect("recorder lock").clone()
    }
}

impl Reporter for Recorder {
    fn on_event(&mut self, event: &Event) {
        let mut a = self.0.lock().expect("recorder lock");
        match event {
            Event::VmBooted { facts, .. } => a.facts = facts.clone(),
            Event::StepFinished { output_tail, .. } => {
                a.steps
                    .extend(StepRecord::from_event(event).map(|r| StepRecord {
                        output_tail: tail(output_tail, LOG_TAIL_BYTES),
                        ..r
                    }))
            }
            Event::SuiteFinished {
                outcome,
                duration,
                facts,
                reports,
                ..
            } => {
                a.outcome = outcome.clone();
                a.duration = *duration;
                a.facts = facts.clone();
                a.reports = reports.clone();
            }
            _ => {}
        }
    }
}

/// The one mapping from `Outcome` to a cell's or test's status.
pub fn status_of(outcome: &Outcome) -> Status {
    match outcome {
        Outcome::Passed => Status::Passed,
        Outcome::Skipped => Status::Skipped,
        Outcome::Failed { .. } => Status::Failed,
        Outcome::TimedOut => Status::TimedOut,
        Outcome::InfraError { .. } => Status::Error,
        Outcome::Cancelled => Status::Cancelled,
    }
}

/// The last `max` bytes of `text`, on a character boundary.
pub fn tail(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    format!("[...]\n{}", crate::text::truncate_front(text, max))
}

fn head(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    format!("{}\n[...]", crate::text::truncate(text, max))
}

/// The tests of one attempt: its steps, the testcases of its guest JUnit reports, and a
/// `(setup)` test when it failed outside any step.
pub fn tests_of(attempt: &Attempt) -> Vec<TestResult> {
    let mut tests: Vec<TestResult> = Vec::new();
    for s in &attempt.steps {
        let status = status_of(&s.outcome);
        tests.push(TestResult {
            name: format!("step: {}", s.name),
            kind: TestKind::Step,
            status,
            duration_s: s.duration.as_secs_f64(),
            attempts: 1,
            message: status.is_failing().then(|| s.outcome.to_string()),
            log_tail: (status.is_failing() && !s.output_tail.is_empty())
                .then(|| s.output_tail.clone()),
            change: None,
        });
    }
    for r in &attempt.reports {
        guest_tests(r, &mut tests);
    }
    let step_failed = tests.iter().any(|t| t.status.is_failing());
    if !attempt.outcome.is_success() && !step_failed && attempt.outcome != Outcome::Cancelled {
        tests.push(TestResult {
            name: SETUP_TEST.into(),
            kind: TestKind::Step,
            status: status_of(&attempt.outcome),
            duration_s: attempt.duration.as_secs_f64(),
            attempts: 1,
            message: Some(head(&attempt.outcome.to_string(), MESSAGE_BYTES)),
            log_tail: None,
            change: None,
        });
    }
    // Names are the tests' identity across attempts and runs: make repeats unique.
    let mut seen = HashMap::<String, u32>::new();
    for t in &mut tests {
        let n = seen.entry(t.name.clone()).or_default();
        *n += 1;
        if *n > 1 {
            t.name = format!("{} #{n}", t.name);
        }
    }
    tests
}

/// The testcases of a guest JUnit report (a report that does not parse is one failing test,
/// as in the JUnit reporter: the guest's fault, not ours).
fn guest_tests(report: &GuestReport, out: &mut Vec<TestResult>) {
    let parsed = match junit_read::read(&report.xml, &report.path) {
        Ok(p) => p,
        Err(e) => {
            out.push(TestResult {
                name: format!("junit report {}", report.path),
                kind: TestKind::Test,
                status: Status::Failed,
                duration_s: 0.0,
                attempts: 1,
                message: Some(e.to_string()),
                log_tail: None,
                change: None,
            });
            return;
        }
    };
    for suite in &parsed.test_suites {
        for case in &suite.test_cases {
            let prefix = case
                .classname
                .as_ref()
                .map(|c| c.as_str())
                .unwrap_or(suite.name.as_str());
            let (status, message, body) = match &case.status {
                TestCaseStatus::Success { flaky_runs } if flaky_runs.is_empty() => {
                    (Status::Passed, None, None)
                }
                // The guest's own harness re-ran it: flaky by its own account.
                TestCaseStatus::Success { .. } => (Status::Flaky, None, None),
                TestCaseStatus::NonSuccess {
                    kind,
                    message,
                    description,
                    ..
                } => (
                    match kind {
                        NonSuccessKind::Failure => Status::Failed,
                        NonSuccessKind::Error => Status::Error,
                    },
                    message.as_ref().map(|m| head(m.as_str(), MESSAGE_BYTES)),
                    description.as_ref().map(|d| d.to_string()),
                ),
                TestCaseStatus::Skipped { .. } => (Status::Skipped, None, None),
            };
            let log = status.is_failing().then(|| {
                let mut text = body.unwrap_or_default();
                for extra in [&case.system_out, &case.system_err].into_iter().flatten() {
                    text.push_str(extra.as_str());
                }
                tail(&text, LOG_TAIL_BYTES)
            });
            out.push(TestResult {
                name: format!("{prefix}.{}", case.name.as_str()),
                kind: TestKind::Test,
                status,
                duration_s: case.time.map_or(0.0, |t| t.as_secs_f64()),
                attempts: 1,
                message,
                log_tail: log.filter(|l| !l.is_empty()),
                change: None,
            });
        }
    }
}

/// Merges the attempts of `cell` (in order, at least one) into its result. The last attempt
/// decides; what failed in an earlier one and passed in the last is flaky.
pub fn merge(cell: &Cell, attempts: &[Attempt]) -> CellResult {
    let last = attempts.last().expect("a cell has at least one attempt");
    let per_attempt: Vec<Vec<TestResult>> = attempts.iter().map(tests_of).collect();
    // By name, per attempt: a guest may report thousands of tests, so no linear searches.
    let by_name: Vec<HashMap<&str, &TestResult>> = per_attempt
        .iter()
        .map(|a| a.iter().map(|t| (t.name.as_str(), t)).collect())
        .collect();
    let mut tests = per_attempt.last().cloned().unwrap_or_default();
    // Tests only seen in earlier attempts still count (e.g. a guest report lost to a
    // timeout in the last attempt): keep their latest result.
    // But when the last attempt succeeded, a failure seen only earlier was overcome: the
    // setup stand-in is dropped and the rest count as flaky, never as failing.
    let last_ok = last.outcome.is_success();
    let mut seen: HashSet<String> = tests.iter().map(|t| t.name.clone()).collect();
    for earlier in per_attempt.iter().rev().skip(1) {
        for t in earlier {
            if last_ok && t.name == SETUP_TEST {
                continue;
            }
            if seen.insert(t.name.clone()) {
                let mut t = t.clone();
                if last_ok && t.status.is_failing() {
                    t.status = Status::Flaky;
                }
                tests.push(t);
            }
        }
    }
    for t in &mut tests {
        let history: Vec<&TestResult> = by_name
            .iter()
            .filter_map(|a| a.get(t.name.as_str()).copied())
            .collect();
        t.attempts = history.len() as u32;
        let failed_before = history
            .iter()
            .take(history.len().saturating_sub(1))
            .find(|x| x.status.is_failing());
        if t.status == Status::Passed {
            if let Some(f) = failed_before {
                t.status = Status::Flaky;
                // What it said when it failed is what someone will want to read.
                t.message = f.message.clone();
                t.log_tail = f.log_tail.clone();
            }
        }
    }
    let mut status = status_of(&last.outcome);
    if status == Status::Passed && attempts.iter().any(|a| !a.outcome.is_success()) {
        status = Status::Flaky;
    }
    let message = match &last.outcome {
        Outcome::InfraError { message, .. } => Some(head(message, MESSAGE_BYTES)),
        _ => None,
    };
    CellResult {
        key: cell.key(),
        suite: cell.suite.clone(),
        arch: cell.arch.name().into(),
        image: cell.image.clone(),
        status,
        outcome: head(&last.outcome.to_string(), 200),
        message,
        duration_s: last.duration.as_secs_f64(),
        total_s: attempts.iter().map(|a| a.duration.as_secs_f64()).sum(),
        attempts: attempts.len() as u32,
        accelerator: last.facts.accel.clone(),
        qemu_version: last.facts.qemu_version.clone(),
        kernel_version: last.facts.kernel_version.clone(),
        tests,
        slowdown: None,
        trend_s: Vec::new(),
    }
}

/// Whether a cell that ended like this is worth another attempt: test failures and
/// timeouts, and a VM that broke (boot, agent) — not bad input, a missing host tool, a bad
/// image or a cancellation, which a re-run would only repeat.
pub fn worth_retrying(outcome: &Outcome) -> bool {
    use crate::outcome::InfraKind;
    match outcome {
        Outcome::Failed { .. } | Outcome::TimedOut => true,
        Outcome::InfraError { kind, .. } => matches!(kind, InfraKind::Boot | InfraKind::Agent),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::Arch;

    fn cell() -> Cell {
        Cell {
            suite: "unit".into(),
            arch: Arch::Aarch64,
            image: "debian-13".into(),
            timeout: None,
        }
    }

    fn failed() -> Outcome {
        Outcome::Failed {
            exit_code: Some(1),
            signal: None,
        }
    }

    /// An attempt whose guest report has `cases` as (name, passed?).
    fn attempt(cases: &[(&str, bool)]) -> Attempt {
        let all_pass = cases.iter().all(|c| c.1);
        let body: String = cases
            .iter()
            .map(|(n, ok)| {
                if *ok {
                    format!("<testcase classname=\"shell\" name=\"{n}\"/>")
                } else {
                    format!("<testcase classname=\"shell\" name=\"{n}\"><failure message=\"boom {n}\">out {n}</failure></testcase>")
                }
            })
            .collect();
        let step_outcome = if all_pass { Outcome::Passed } else { failed() };
        Attempt {
            outcome: step_outcome.clone(),
            duration: Duration::from_secs(5),
            facts: VmFacts::default(),
            steps: vec![StepRecord {
                name: "test".into(),
                outcome: step_outcome,
                duration: Duration::from_secs(2),
                output_tail: "step output".into(),
            }],
            reports: vec![GuestReport {
                path: "r.xml".into(),
                xml: format!("<testsuite name=\"s\">{body}</testsuite>"),
            }],
        }
    }

    fn status(result: &CellResult, test: &str) -> (Status, u32) {
        let t = result
            .tests
            .iter()
            .find(|t| t.name == test)
            .unwrap_or_else(|| panic!("{test} in {result:?}"));
        (t.status, t.attempts)
    }

    #[test]
    fn flaky_detection() {
        // (attempts as per-test pass/fail, expected cell status, expected (test, status))
        // Per attempt, each test as (name, passed?).
        type Attempts<'a> = &'a [&'a [(&'a str, bool)]];
        type Expected<'a> = &'a [(&'a str, Status)];
        let cases: &[(Attempts, Status, Expected)] = &[
            // One clean attempt: passed.
            (
                &[&[("a", true)]],
                Status::Passed,
                &[("shell.a", Status::Passed)],
            ),
            // Failed, then passed on the re-run: flaky, not passed and not failed.
            (
                &[&[("a", true), ("b", false)], &[("a", true), ("b", true)]],
                Status::Flaky,
                &[
                    ("shell.a", Status::Passed),
                    ("shell.b", Status::Flaky),
                    ("step: test", Status::Flaky),
                ],
            ),
            // Failed every time: failed.
            (
                &[&[("b", false)], &[("b", false)]],
                Status::Failed,
                &[("shell.b", Status::Failed)],
            ),
            // Passed, then failed (only possible with a retry for another reason): failed.
            (
                &[&[("a", false), ("b", true)], &[("a", true), ("b", false)]],
                Status::Failed,
                &[("shell.a", Status::Flaky), ("shell.b", Status::Failed)],
            ),
        ];
        for (attempts, want_cell, want_tests) in cases {
            let attempts: Vec<Attempt> = attempts.iter().map(|a| attempt(a)).collect();
            let r = merge(&cell(), &attempts);
            assert_eq!(r.status, *want_cell, "{attempts:?}");
            assert_eq!(r.attempts as usize, attempts.len());
            for (name, want) in *want_tests {
                assert_eq!(status(&r, name), (*want, attempts.len() as u32), "{name}");
            }
        }
    }

    #[test]
    fn a_flaky_test_keeps_the_message_of_its_failure() {
        let r = merge(
            &cell(),
            &[attempt(&[("b", false)]), attempt(&[("b", true)])],
        );
        let b = r.tests.iter().find(|t| t.name == "shell.b").unwrap();
        assert_eq!(b.message.as_deref(), Some("boom b"));
        assert!(b.log_tail.as_deref().unwrap().contains("out b"));
    }

    #[test]
    fn a_boot_failure_is_an_error_cell_with_a_setup_test() {
        let a = Attempt::without_vm(
            Outcome::InfraError {
                kind: crate::outcome::InfraKind::Boot,
                message: "the guest never booted".into(),
            },
            "debian-13",
        );
        let r = merge(&cell(), &[a]);
        assert_eq!(r.status, Status::Error);
        assert_eq!(status(&r, SETUP_TEST).0, Status::Error);
        assert!(r.message.unwrap().contains("never booted"));
    }

    #[test]
    fn a_boot_failure_overcome_by_a_retry_leaves_nothing_failing() {
        let boot = Attempt::without_vm(
            Outcome::InfraError {
                kind: crate::outcome::InfraKind::Boot,
                message: "the guest never booted".into(),
            },
            "debian-13",
        );
        let r = merge(&cell(), &[boot, attempt(&[("a", true)])]);
        assert_eq!(r.status, Status::Flaky);
        assert!(
            r.tests.iter().all(|t| !t.status.is_failing()),
            "{:?}",
            r.tests
        );
        assert!(r.tests.iter().all(|t| t.name != SETUP_TEST));
    }

    #[test]
    fn invalid_guest_junit_is_a_failing_test() {
        let mut a = attempt(&[("a", true)]);
        a.reports[0].xml = "<testsuite><oops".into();
        let r = merge(&cell(), &[a]);
        assert_eq!(status(&r, "junit report r.xml").0, Status::Failed);
    }

    #[test]
    fn every_producers_tests_are_read() {
        use crate::report::junit_read::fixtures::ALL;
        for f in ALL {
            let mut a = Attempt::without_vm(Outcome::Passed, "debian-13");
            a.reports.push(GuestReport {
                path: f.path.into(),
                xml: f.xml.into(),
            });
            let tests = tests_of(&a);
            let n = |s: Status| tests.iter().filter(|t| t.status == s).count();
            let c = f.counts;
            assert_eq!(tests.len(), c.tests, "{}", f.path);
            assert_eq!(n(Status::Failed), c.failures, "{}", f.path);
            assert_eq!(n(Status::Error), c.errors, "{}", f.path);
            assert_eq!(n(Status::Skipped), c.skipped, "{}", f.path);
            assert_eq!(n(Status::Flaky), c.flaky, "{}", f.path);
        }
    }

    #[test]
    fn what_is_retried() {
        use crate::outcome::InfraKind;
        let infra = |kind| Outcome::InfraError {
            kind,
            message: String::new(),
        };
        assert!(worth_retrying(&failed()));
        assert!(worth_retrying(&Outcome::TimedOut));
        assert!(worth_retrying(&infra(InfraKind::Boot)));
        assert!(!worth_retrying(&infra(InfraKind::Config)));
        assert!(!worth_retrying(&infra(InfraKind::Image)));
        assert!(!worth_retrying(&Outcome::Cancelled));
        assert!(!worth_retrying(&Outcome::Passed));
    }
}
