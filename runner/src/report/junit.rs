//! The JUnit reporter: one testsuite per suite × architecture with a testcase per step
//! (a failing step is a *failure*; timeouts, boot and agent problems are *errors*), plus the
//! JUnit reports produced inside the guest, each merged as its own testsuite.
//! quick-junit writes the report; `junit_read` reads the guest's.

use std::path::PathBuf;
use std::time::Duration;

use quick_junit::{NonSuccessKind, Property, Report, TestCase, TestCaseStatus, TestSuite};

use super::junit_read;
use crate::events::{Event, GuestReport, Reporter, RunId, VmFacts};
use crate::outcome::Outcome;

/// Output kept per testcase in `system-out`.
const OUTPUT_EXCERPT_BYTES: usize = 64 * 1024;

#[derive(Debug)]
pub struct JunitReporter {
    path: PathBuf,
    report: Report,
    /// Steps of the suite currently running.
    cases: Vec<TestCase>,
}

impl JunitReporter {
    pub fn new(path: PathBuf) -> Self {
        JunitReporter {
            path,
            report: Report::new("runner"),
            cases: Vec::new(),
        }
    }

    /// The report built so far (for tests).
    pub fn report(&self) -> &Report {
        &self.report
    }
}

fn suite_name(id: &RunId) -> String {
    format!("{} ({})", id.suite, id.arch)
}

fn status_for(outcome: &Outcome) -> TestCaseStatus {
    let non_success = |kind, ty: &str, message: String| {
        let mut s = TestCaseStatus::non_success(kind);
        s.set_type(ty.to_string());
        s.set_message(message);
        s
    };
    match outcome {
        Outcome::Passed => TestCaseStatus::success(),
        Outcome::Skipped => TestCaseStatus::skipped(),
        Outcome::Failed { .. } => {
            non_success(NonSuccessKind::Failure, "failure", outcome.to_string())
        }
        Outcome::TimedOut => non_success(
            NonSuccessKind::Error,
            "timeout",
            "timed out; the VM was stopped".into(),
        ),
        Outcome::Cancelled => non_success(NonSuccessKind::Error, "cancelled", "cancelled".into()),
        Outcome::InfraError { message, .. } => {
            non_success(NonSuccessKind::Error, "infrastructure", message.clone())
        }
    }
}

fn excerpt(text: &str) -> String {
    if text.len() <= OUTPUT_EXCERPT_BYTES {
        return text.to_string();
    }
    format!(
        "[... output truncated ...]\n{}",
        crate::text::truncate_front(text, OUTPUT_EXCERPT_BYTES)
    )
}

fn facts_properties(suite: &mut TestSuite, id: &RunId, facts: &VmFacts) {
    suite.add_property(Property::new("arch", id.arch.name()));
    for (k, v) in [
        ("image", &facts.image),
        ("accelerator", &facts.accel),
        ("qemu_version", &facts.qemu_version),
        ("kernel_version", &facts.kernel_version),
    ] {
        if !v.is_empty() {
            suite.add_property(Property::new(k, v.as_str()));
        }
    }
}

/// Whether a guest report records failing tests, or is not a JUnit report at all.
pub fn guest_report_failed(guest: &GuestReport) -> bool {
    match junit_read::read(&guest.xml, &guest.path) {
        Ok(r) => r.test_suites.iter().any(|s| {
            s.failures > 0
                || s.errors > 0
                || s.test_cases
                    .iter()
                    .any(|c| matches!(c.status, TestCaseStatus::NonSuccess { .. }))
        }),
        Err(_) => true,
    }
}

/// Merges a guest report's testsuites into `report` under the suite × arch's name. A report
/// that does not parse becomes a failing testcase in `cases`: the guest's fault, not ours.
pub fn merge_guest_report(
    report: &mut Report,
    cases: &mut Vec<TestCase>,
    id: &RunId,
    facts: &VmFacts,
    guest: &GuestReport,
) {
    match junit_read::read(&guest.xml, &guest.path) {
        Ok(parsed) => {
            for mut ts in parsed.test_suites {
                ts.name = format!("{} / {}", suite_name(id), ts.name.as_str()).into();
                facts_properties(&mut ts, id, facts);
                ts.add_property(Property::new("source", guest.path.as_str()));
                report.add_test_suite(ts);
            }
        }
        Err(e) => {
            let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
            status.set_type("invalid-junit");
            status.set_message(e.to_string());
            let mut case = TestCase::new(format!("junit report {}", guest.path), status);
            case.set_classname(format!("runner.{}.{}", id.suite, id.arch));
            cases.push(case);
        }
    }
}

impl Reporter for JunitReporter {
    fn on_event(&mut self, event: &Event) {
        match event {
            Event::SuiteStarted { .. } => self.cases.clear(),
            Event::StepFinished {
                id,
                step,
                outcome,
                duration,
                output_tail,
            } => {
                let mut case = TestCase::new(step.as_str(), status_for(outcome));
                case.set_classname(format!("runner.{}.{}", id.suite, id.arch));
                case.set_time(*duration);
                if !output_tail.is_empty() {
                    case.set_system_out(excerpt(output_tail));
                }
                self.cases.push(case);
            }
            Event::SuiteFinished {
                id,
                outcome,
                duration,
                facts,
                reports,
                ..
            } => {
                // A suite that failed before or between steps (boot, image, agent) gets a
                // testcase of its own so the error is visible in every JUnit viewer.
                let step_failed = self.cases.iter().any(|c| {
                    !matches!(
                        c.status,
                        TestCaseStatus::Success { .. } | TestCaseStatus::Skipped { .. }
                    )
                });
                if !outcome.is_success() && !step_failed {
                    let mut case = TestCase::new("(setup)", status_for(outcome));
                    case.set_classname(format!("runner.{}.{}", id.suite, id.arch));
                    self.cases.push(case);
                }
                let mut cases = std::mem::take(&mut self.cases);
                for guest in reports {
                    merge_guest_report(&mut self.report, &mut cases, id, facts, guest);
                }
                let mut suite = TestSuite::new(suite_name(id));
                suite.set_time(*duration);
                facts_properties(&mut suite, id, facts);
                suite.add_test_cases(cases);
                // The runner's own suite comes first.
                let guest_suites = std::mem::take(&mut self.report.test_suites);
                self.report.test_suites.clear();
                self.report.tests = 0;
                self.report.failures = 0;
                self.report.errors = 0;
                let (earlier, this_run): (Vec<_>, Vec<_>) =
                    guest_suites.into_iter().partition(|s| {
                        !s.name
                            .as_str()
                            .starts_with(&format!("{} / ", suite_name(id)))
                    });
                self.report.add_test_suites(earlier);
                self.report.add_test_suite(suite);
                self.report.add_test_suites(this_run);
            }
            _ => {}
        }
    }

    fn finish(&mut self) -> std::io::Result<()> {
        let total: Duration = self.report.test_suites.iter().filter_map(|s| s.time).sum();
        self.report.set_time(total);
        if let Some(parent) = self.path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)?;
            }
        }
        // Write to a temporary file next to the target, then rename: never a half report.
        let tmp = self.path.with_extension("xml.tmp");
        let file = std::fs::File::create(&tmp)?;
        self.report
            .serialize(std::io::BufWriter::new(file))
            .map_err(std::io::Error::other)?;
        std::fs::rename(&tmp, &self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use engine::Arch;

    fn id() -> RunId {
        RunId {
            suite: "unit".into(),
            arch: Arch::Riscv64,
        }
    }

    fn finished(reporter: &mut JunitReporter, outcome: Outcome, reports: Vec<GuestReport>) {
        reporter.on_event(&Event::SuiteFinished {
            id: id(),
            outcome,
            duration: Duration::from_secs(3),
            facts: VmFacts {
                image: "debian-13".into(),
                accel: "tcg".into(),
                ..Default::default()
            },
            reports,
            artifacts: vec![],
        });
    }

    fn step(reporter: &mut JunitReporter, name: &str, outcome: Outcome) {
        reporter.on_event(&Event::StepFinished {
            id: id(),
            step: name.into(),
            outcome,
            duration: Duration::from_millis(1500),
            output_tail: format!("output of {name}\n"),
        });
    }

    #[test]
    fn failures_and_errors_are_split() {
        let mut r = JunitReporter::new("unused.xml".into());
        r.on_event(&Event::SuiteStarted { id: id(), steps: 3 });
        step(&mut r, "build", Outcome::Passed);
        step(
            &mut r,
            "test",
            Outcome::Failed {
                exit_code: Some(2),
                signal: None,
            },
        );
        step(&mut r, "slow", Outcome::TimedOut);
        finished(&mut r, Outcome::TimedOut, vec![]);
        let xml = r.report().to_string().unwrap();
        assert_eq!(r.report().tests, 3);
        assert_eq!(r.report().failures, 1);
        assert_eq!(r.report().errors, 1);
        assert!(xml.contains("<testsuite name=\"unit (riscv64)\""), "{xml}");
        assert!(xml.contains("failed (exit 2)"), "{xml}");
        assert!(xml.contains("output of test"), "{xml}");
        assert!(xml.contains("name=\"accelerator\" value=\"tcg\""), "{xml}");
    }

    #[test]
    fn boot_failure_becomes_a_setup_error() {
        let mut r = JunitReporter::new("unused.xml".into());
        r.on_event(&Event::SuiteStarted { id: id(), steps: 1 });
        finished(
            &mut r,
            Outcome::InfraError {
                kind: crate::outcome::InfraKind::Boot,
                message: "the guest did not boot".into(),
            },
            vec![],
        );
        assert_eq!(r.report().errors, 1);
        assert!(r.report().to_string().unwrap().contains("(setup)"));
    }

    #[test]
    fn guest_reports_are_merged_under_their_own_suite() {
        let guest = GuestReport {
            path: "build/junit.xml".into(),
            // A bare <testsuite> root, as most tools write it.
            xml: r#"<?xml version="1.0"?>
<testsuite name="calc" tests="2" failures="1">
  <testcase classname="calc" name="adds" time="0.01"/>
  <testcase classname="calc" name="overflows"><failure message="expected 0">boom</failure></testcase>
</testsuite>"#
                .into(),
        };
        let mut r = JunitReporter::new("unused.xml".into());
        r.on_event(&Event::SuiteStarted { id: id(), steps: 1 });
        step(
            &mut r,
            "test",
            Outcome::Failed {
                exit_code: Some(1),
                signal: None,
            },
        );
        finished(
            &mut r,
            Outcome::Failed {
                exit_code: Some(1),
                signal: None,
            },
            vec![guest],
        );
        let names: Vec<_> = r
            .report()
            .test_suites
            .iter()
            .map(|s| s.name.to_string())
            .collect();
        assert_eq!(names, ["unit (riscv64)", "unit (riscv64) / calc"]);
        assert_eq!(r.report().tests, 3);
        assert_eq!(r.report().failures, 2);
        // And what we write reads back with the same library.
        let back = Report::deserialize_from_str(&r.report().to_string().unwrap()).unwrap();
        assert_eq!(back.test_suites.len(), 2);
    }

    #[test]
    fn invalid_guest_report_is_a_test_failure_not_a_crash() {
        let guest = GuestReport {
            path: "bad.xml".into(),
            xml: "<testsuite><oops".into(),
        };
        let mut r = JunitReporter::new("unused.xml".into());
        r.on_event(&Event::SuiteStarted { id: id(), steps: 1 });
        step(&mut r, "test", Outcome::Passed);
        finished(&mut r, Outcome::Passed, vec![guest]);
        assert_eq!(r.report().failures, 1);
        assert!(r
            .report()
            .to_string()
            .unwrap()
            .contains("bad.xml is not valid JUnit XML"));
    }

    #[test]
    fn guest_failures_are_detected() {
        // (xml, failed?)
        let cases = [
            ("<testsuite name=\"a\" tests=\"1\"><testcase name=\"x\"/></testsuite>", false),
            ("<testsuite name=\"a\" tests=\"1\"><testcase name=\"x\"><failure/></testcase></testsuite>", true),
            ("<testsuite name=\"a\" tests=\"1\"><testcase name=\"x\"><error/></testcase></testsuite>", true),
            ("<!-- larger than the limit -->", true),
        ];
        for (xml, failed) in cases {
            let g = GuestReport {
                path: "r.xml".into(),
                xml: xml.into(),
            };
            assert_eq!(guest_report_failed(&g), failed, "{xml}");
        }
    }

    /// One passing step plus `reports`: the reporter's report.
    fn with_reports(reports: Vec<GuestReport>) -> Report {
        let mut r = JunitReporter::new("unused.xml".into());
        r.on_event(&Event::SuiteStarted { id: id(), steps: 1 });
        step(&mut r, "test", Outcome::Passed);
        finished(&mut r, Outcome::Passed, reports);
        r.report().clone()
    }

    #[test]
    fn every_producers_counts_survive_the_merge() {
        use crate::report::junit_read::fixtures::{counts, ALL};
        for f in ALL {
            let report = with_reports(vec![GuestReport {
                path: f.path.into(),
                xml: f.xml.into(),
            }]);
            let mut want = f.counts;
            want.tests += 1; // the step
            assert_eq!(counts(&report), want, "{}", f.path);
            assert_eq!(report.tests, want.tests, "{}", f.path);
            assert_eq!(report.failures, want.failures, "{}", f.path);
            assert_eq!(report.errors, want.errors, "{}", f.path);
            // And what we write, a strict reader reads with the same counts.
            let back = Report::deserialize_from_str(&report.to_string().unwrap()).unwrap();
            assert_eq!(counts(&back), want, "{}", f.path);
        }
    }

    #[test]
    fn a_report_without_names_keeps_all_its_testcases() {
        // The bug: 3,000 testcases in a <testsuite> without a name became 2 testcases.
        let (xml, c) = crate::report::junit_read::fixtures::unnamed(3000);
        let report = with_reports(vec![GuestReport {
            path: "results.xml".into(),
            xml,
        }]);
        assert_eq!(report.tests, 3001);
        assert_eq!(report.failures, c.failures);
        assert_eq!(
            report.test_suites[1].name.as_str(),
            "unit (riscv64) / results.xml"
        );
    }

    #[test]
    fn a_report_that_is_not_junit_loses_no_other() {
        let pytest = &crate::report::junit_read::fixtures::ALL[0];
        let report = with_reports(vec![
            GuestReport {
                path: "proxy.xml".into(),
                xml: "<html><body>502 Bad Gateway</body></html>".into(),
            },
            GuestReport {
                path: pytest.path.into(),
                xml: pytest.xml.into(),
            },
            GuestReport {
                path: "crash.xml".into(),
                xml: "Segmentation fault".into(),
            },
        ]);
        // The step, two failing cases for the two bad reports, and pytest's six.
        assert_eq!(report.tests, 1 + 2 + 6);
        assert_eq!(report.failures, 2 + pytest.counts.failures);
        let xml = report.to_string().unwrap();
        assert!(
            xml.contains("proxy.xml is not valid JUnit XML: its root element is &lt;html&gt;"),
            "{xml}"
        );
        assert!(xml.contains("crash.xml is not valid JUnit XML: it holds no XML element"));
    }

    #[test]
    fn writes_atomically_to_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/junit.xml");
        let mut r = JunitReporter::new(path.clone());
        r.on_event(&Event::SuiteStarted { id: id(), steps: 1 });
        step(&mut r, "build", Outcome::Passed);
        finished(&mut r, Outcome::Passed, vec![]);
        r.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("unit (riscv64)"));
        assert!(!path.with_extension("xml.tmp").exists());
    }
}
