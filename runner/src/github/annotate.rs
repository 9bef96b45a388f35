//! Where a failure is shown in the code: annotations for failing JUnit test cases (at the
//! file and line the report names when that file is in the repository, else on the suite in
//! runner.toml) and for failing steps (on their `name` line in runner.toml). The test cases
//! come from `report::cases`, the guest's JUnit files read once for every reporter.

use super::wire::{Annotation, Level};
use crate::outcome::Outcome;
use crate::report::cases::Case;
use crate::report::collect::RunRecord;
use crate::text::{cell, truncate, truncate_front, MAX_CELL};

/// Annotations per check run; past this the summary says how many more failed. (GitHub
/// takes more, 50 per request, but nobody reads the 501st.)
pub const MAX_ANNOTATIONS: usize = 500;
/// Output lines of a failing step shown in its annotation.
const STEP_DETAIL_LINES: usize = 40;
/// Longest annotation message / raw_details we send (GitHub allows 64 KB).
const MAX_ANNOTATION_TEXT: usize = 4096;

/// Where suites and steps are defined in runner.toml, for annotations.
#[derive(Debug, Clone, Default)]
pub struct SuiteLines {
    /// (suite, step or None, 1-based line of its `name = ...`).
    entries: Vec<(String, Option<String>, u32)>,
}

impl SuiteLines {
    /// Scans the text of runner.toml for `name = ...` under `[[suite]]` and `[[suite.step]]`.
    /// A plain line scan is enough: the file has already parsed, names are unique.
    pub fn scan(text: &str) -> SuiteLines {
        #[derive(PartialEq)]
        enum In {
            Other,
            Suite,
            Step,
        }
        let mut at = In::Other;
        let mut suite = String::new();
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            if t.starts_with("[[suite.step]]") {
                at = In::Step;
            } else if t.starts_with("[[suite]]") {
                at = In::Suite;
            } else if t.starts_with('[') {
                at = In::Other;
            } else if let Some(v) = t.strip_prefix("name").map(str::trim_start) {
                let Some(v) = v.strip_prefix('=') else {
                    continue;
                };
                let name = v.trim().trim_matches(|c| c == '"' || c == '\'').to_string();
                let line_no = i as u32 + 1;
                match at {
                    In::Suite => {
                        suite = name.clone();
                        entries.push((name, None, line_no));
                    }
                    In::Step => entries.push((suite.clone(), Some(name), line_no)),
                    In::Other => {}
                }
            }
        }
        SuiteLines { entries }
    }

    pub fn suite(&self, suite: &str) -> u32 {
        self.entries
            .iter()
            .find(|(s, step, _)| s == suite && step.is_none())
            .map_or(1, |e| e.2)
    }

    pub fn step(&self, suite: &str, step: &str) -> u32 {
        self.entries
            .iter()
            .find(|(s, st, _)| s == suite && st.as_deref() == Some(step))
            .map_or_else(|| self.suite(suite), |e| e.2)
    }
}

/// Turns a path from a JUnit report into one relative to the repository, if it is one.
fn repo_path(file: &str, exists: &dyn Fn(&str) -> bool) -> Option<String> {
    let rel = file
        .strip_prefix(crate::run::plan::GUEST_WORKSPACE)
        .map(|r| r.trim_start_matches('/'))
        .unwrap_or(file);
    let rel = rel.trim_start_matches("./");
    let safe = !rel.is_empty()
        && !rel.starts_with('/')
        && !rel.split('/').any(|c| c == ".." || c.is_empty());
    (safe && exists(rel)).then(|| rel.to_string())
}

pub(super) fn annotations(
    run: &RunRecord,
    failing: &[&Case],
    suite_file: &str,
    lines: &SuiteLines,
    exists: &dyn Fn(&str) -> bool,
    mask: &dyn Fn(&str) -> String,
) -> Vec<Annotation> {
    let arch = run.id.arch.name();
    let suite_line = lines.suite(&run.id.suite);
    let mut out = Vec::new();
    for c in failing.iter().take(MAX_ANNOTATIONS) {
        let located = c
            .file
            .as_deref()
            .and_then(|f| repo_path(f, exists))
            .map(|p| (p, c.line.unwrap_or(1).max(1)));
        let (path, line) = located.unwrap_or_else(|| (suite_file.to_string(), suite_line));
        let message = mask(&c.message);
        let details = mask(&c.details);
        out.push(Annotation {
            path,
            start_line: line,
            end_line: line,
            annotation_level: Level::Failure,
            message: truncate(&message, MAX_ANNOTATION_TEXT).to_string(),
            title: Some(truncate(&format!("{} failed on {arch}", c.name), MAX_CELL).to_string()),
            raw_details: (!details.is_empty())
                .then(|| truncate(&details, MAX_ANNOTATION_TEXT).to_string())
                .or_else(|| Some(format!("from {}", c.source))),
        });
    }
    // Steps that failed on their own (a non-zero exit, a timeout) point at their definition.
    for st in &run.steps {
        if out.len() >= MAX_ANNOTATIONS {
            break;
        }
        let what = match &st.outcome {
            Outcome::Failed { .. } => st.outcome.to_string(),
            Outcome::TimedOut => "timed out".into(),
            _ => continue,
        };
        let tail = mask(&st.output_tail);
        let last: Vec<&str> = tail.lines().collect();
        let last = last[last.len().saturating_sub(STEP_DETAIL_LINES)..].join("\n");
        let line = lines.step(&run.id.suite, &st.name);
        out.push(Annotation {
            path: suite_file.to_string(),
            start_line: line,
            end_line: line,
            annotation_level: Level::Failure,
            message: format!("step '{}' {what} on {arch}", cell(&st.name)),
            title: Some(truncate(&format!("{} / {}", run.id.suite, st.name), MAX_CELL).to_string()),
            raw_details: (!last.is_empty())
                .then(|| truncate_front(&last, MAX_ANNOTATION_TEXT).to_string()),
        });
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::events::GuestReport;
    use crate::report::cases::cases;

    pub(crate) const SUITE_TOML: &str = r#"[defaults]
arch = ["riscv64"]
name = "not a suite"

[[suite]]
name = "unit"
junit = ["reports/*.xml"]

  [[suite.step]]
  name = "build"
  run = "true"

  [[suite.step]]
  name = 'tests'
  run = "false"

[[suite]]
name="other"
  [[suite.step]]
  name = "tests"
  run = "true"
"#;

    #[test]
    fn every_producers_cases_are_read() {
        use crate::report::junit_read::fixtures::{unnamed, ALL};
        let (bug, bug_counts) = unnamed(3000);
        let all = ALL
            .iter()
            .map(|f| (f.path, f.xml.to_string(), f.counts))
            .chain([("unnamed.xml", bug, bug_counts)]);
        for (path, xml, want) in all {
            let got = cases(&[GuestReport {
                path: path.into(),
                xml,
            }]);
            assert_eq!(got.len(), want.tests, "{path}");
            let failed = got.iter().filter(|c| c.failed).count();
            assert_eq!(failed, want.failures + want.errors, "{path}");
            let skipped = got.iter().filter(|c| c.skipped).count();
            assert_eq!(skipped, want.skipped, "{path}");
        }
        // pytest's file and line are where the annotation goes.
        let pytest = cases(&[GuestReport {
            path: "p.xml".into(),
            xml: ALL[0].xml.into(),
        }]);
        let c = pytest
            .iter()
            .find(|c| c.name.ends_with("test_divide_by_zero"))
            .unwrap();
        assert_eq!(
            (c.file.as_deref(), c.line),
            (Some("tests/test_calc.py"), Some(9))
        );
        assert_eq!(c.message, "ZeroDivisionError: division by zero");
        // A report that is not JUnit is one failing case that says why.
        let bad = cases(&[GuestReport {
            path: "r.xml".into(),
            xml: "<html/>".into(),
        }]);
        assert!(bad[0].failed);
        assert!(
            bad[0].message.contains("its root element is <html>"),
            "{}",
            bad[0].message
        );
    }

    #[test]
    fn suite_and_step_lines() {
        let l = SuiteLines::scan(SUITE_TOML);
        assert_eq!(l.suite("unit"), 6);
        assert_eq!(l.step("unit", "build"), 10);
        assert_eq!(l.step("unit", "tests"), 14);
        assert_eq!(l.suite("other"), 18);
        assert_eq!(l.step("other", "tests"), 20);
        // Unknown names fall back to the suite, then to line 1.
        assert_eq!(l.step("unit", "nope"), 6);
        assert_eq!(l.suite("nope"), 1);
    }
}
