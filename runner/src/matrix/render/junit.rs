//! `junit.xml` of a matrix: one testsuite per cell, named `SUITE (ARCH, IMAGE)`, with the
//! VM's facts as properties (arch, image, accelerator, QEMU and kernel versions) and every
//! test of the cell as a testcase — the suite's steps and, merged under them, the testcases
//! of the guest's own JUnit reports. A flaky test is a success with its failed attempt as a
//! `flakyFailure`, the way nextest and Maven's surefire write them.

use std::time::Duration;

use quick_junit::{
    NonSuccessKind, Property, Report, TestCase, TestCaseStatus, TestRerun, TestSuite,
};

use super::super::results::{RunResults, Status, TestKind, TestResult};

fn status(t: &TestResult) -> TestCaseStatus {
    let non_success = |kind, ty: &str| {
        let mut s = TestCaseStatus::non_success(kind);
        s.set_type(ty.to_string());
        if let Some(m) = &t.message {
            s.set_message(m.as_str());
        }
        s
    };
    match t.status {
        Status::Passed => TestCaseStatus::success(),
        Status::Flaky => {
            let mut s = TestCaseStatus::success();
            let mut rerun = TestRerun::new(NonSuccessKind::Failure);
            if let Some(m) = &t.message {
                rerun.set_message(m.as_str());
            }
            if let Some(l) = &t.log_tail {
                rerun.set_system_out(l.as_str());
            }
            s.add_rerun(rerun);
            s
        }
        Status::Skipped | Status::Cancelled => TestCaseStatus::skipped(),
        Status::Failed => non_success(NonSuccessKind::Failure, "failure"),
        Status::TimedOut => non_success(NonSuccessKind::Error, "timeout"),
        Status::Error => non_success(NonSuccessKind::Error, "infrastructure"),
    }
}

pub fn render(results: &RunResults) -> String {
    let mut report = Report::new("runner matrix");
    for cell in &results.cells {
        let mut suite = TestSuite::new(format!("{} ({}, {})", cell.suite, cell.arch, cell.image));
        suite.set_time(Duration::from_secs_f64(cell.duration_s.max(0.0)));
        for (k, v) in [
            ("arch", cell.arch.as_str()),
            ("image", cell.image.as_str()),
            ("accelerator", cell.accelerator.as_str()),
            ("qemu_version", cell.qemu_version.as_str()),
            ("kernel_version", cell.kernel_version.as_str()),
            ("status", cell.status.label()),
        ] {
            if !v.is_empty() {
                suite.add_property(Property::new(k, v));
            }
        }
        suite.add_property(Property::new("attempts", cell.attempts.to_string()));
        let step_class = format!("runner.{}.{}.{}", cell.suite, cell.arch, cell.image);
        for t in &cell.tests {
            let (classname, name) = match t.kind {
                TestKind::Step => (step_class.clone(), t.name.clone()),
                // "CLASS.NAME": split at the last dot that is not inside the name.
                TestKind::Test => match t.name.rsplit_once('.') {
                    Some((c, n)) => (format!("{}.{c}", cell.arch), n.to_string()),
                    None => (cell.arch.clone(), t.name.clone()),
                },
            };
            let mut case = TestCase::new(name, status(t));
            case.set_classname(classname);
            case.set_time(Duration::from_secs_f64(t.duration_s.max(0.0)));
            if t.status.is_failing() {
                if let Some(l) = &t.log_tail {
                    case.set_system_out(l.as_str());
                }
            }
            suite.add_test_case(case);
        }
        report.add_test_suite(suite);
    }
    report.set_time(Duration::from_secs_f64(results.run.duration_s.max(0.0)));
    report
        .to_string()
        .unwrap_or_else(|e| format!("<!-- cannot serialise the report: {e} -->\n"))
}
