//! Guest reports in the shapes real producers write (the files are in runner/tests/fixtures/junit),
//! with what each holds. The callers' tests check that these counts survive into their views.

use quick_junit::{Report, TestCaseStatus};

/// Testcases by outcome; `flaky` passed after failed runs.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub tests: usize,
    pub failures: usize,
    pub errors: usize,
    pub skipped: usize,
    pub flaky: usize,
}

#[derive(Debug)]
pub(crate) struct Fixture {
    pub path: &'static str,
    pub xml: &'static str,
    pub counts: Counts,
}

macro_rules! fixture {
    ($file:literal, $tests:expr, $failures:expr, $errors:expr, $skipped:expr, $flaky:expr) => {
        Fixture {
            path: $file,
            xml: include_str!(concat!("../../../tests/fixtures/junit/", $file)),
            counts: Counts {
                tests: $tests,
                failures: $failures,
                errors: $errors,
                skipped: $skipped,
                flaky: $flaky,
            },
        }
    };
}

/// (file, tests, failures, errors, skipped, flaky)
pub(crate) const ALL: &[Fixture] = &[
    // pytest (xunit1 family: file and line), skips with type, a setup error.
    fixture!("pytest.xml", 6, 1, 1, 2, 0),
    // ctest --output-junit: a bare <testsuite name="">, status="disabled" with no element.
    fixture!("ctest.xml", 5, 2, 0, 2, 0),
    // gotestsum: character references in bodies and messages, empty type="".
    fixture!("gotestsum.xml", 5, 2, 0, 1, 0),
    // go-junit-report v2: CDATA bodies, suite-level system-out.
    fixture!("go-junit-report.xml", 4, 1, 0, 1, 0),
    // cargo-nextest with retries: a flakyFailure, a rerunFailure next to its failure.
    fixture!("nextest.xml", 4, 1, 0, 0, 1),
    // Maven surefire / JUnit 5: namespaced root, properties, stackTrace, no classname.
    fixture!("surefire.xml", 6, 1, 1, 1, 1),
    // jest-junit: failures without message, a suite that failed to run.
    fixture!("jest-junit.xml", 6, 1, 1, 1, 0),
    // tap-junit: suites without a name, testcases without classname.
    fixture!("tap-junit.xml", 5, 1, 0, 1, 0),
    // unittest-xml-reporting (xmlrunner): <testsuite> root, errors with type.
    fixture!("xmlrunner.xml", 4, 1, 1, 1, 0),
    // PHPUnit: suites nested three deep, the outer one named "".
    fixture!("phpunit.xml", 6, 1, 1, 1, 0),
];

pub(crate) fn counts(report: &Report) -> Counts {
    let mut c = Counts::default();
    for case in report.test_suites.iter().flat_map(|s| &s.test_cases) {
        c.tests += 1;
        match &case.status {
            TestCaseStatus::Success { flaky_runs } => {
                c.flaky += usize::from(!flaky_runs.is_empty())
            }
            TestCaseStatus::NonSuccess { kind, .. } => match kind {
                quick_junit::NonSuccessKind::Failure => c.failures += 1,
                quick_junit::NonSuccessKind::Error => c.errors += 1,
            },
            TestCaseStatus::Skipped { .. } => c.skipped += 1,
        }
    }
    c
}

/// The bug's shape: no suite name, no classname, a malformed time, `n` testcases of which
/// every 100th fails and every 250th is skipped by a `status` attribute.
pub(crate) fn unnamed(n: usize) -> (String, Counts) {
    let mut xml = format!("<?xml version=\"1.0\"?>\n<testsuite tests=\"{n}\" time=\"12.5s\">\n");
    let mut c = Counts {
        tests: n,
        ..Default::default()
    };
    for i in 1..=n {
        if i % 100 == 0 {
            c.failures += 1;
            xml.push_str(&format!(
                "  <testcase name=\"case {i}\" time=\"0.01\"><failure message=\"case {i} failed\">exit 1</failure></testcase>\n"
            ));
        } else if i % 250 == 0 {
            c.skipped += 1;
            xml.push_str(&format!(
                "  <testcase name=\"case {i}\" status=\"skipped\"/>\n"
            ));
        } else {
            xml.push_str(&format!("  <testcase name=\"case {i}\" time=\"0.002\"/>\n"));
        }
    }
    xml.push_str("</testsuite>\n");
    (xml, c)
}
