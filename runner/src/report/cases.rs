//! The guest's JUnit files read into test cases: what the markdown summary counts and lists,
//! and what GitHub annotates. A report that is not JUnit becomes one failing case saying so.

use std::time::Duration;

use quick_junit::{NonSuccessKind, TestCaseStatus};

use super::junit_read;
use crate::events::GuestReport;

/// A test case from the guest's JUnit files.
#[derive(Debug, Clone)]
pub struct Case {
    pub name: String,
    pub failed: bool,
    pub skipped: bool,
    pub message: String,
    pub details: String,
    pub time: Option<Duration>,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// The report it came from.
    pub source: String,
}

pub fn cases(reports: &[GuestReport]) -> Vec<Case> {
    let mut out = Vec::new();
    for g in reports {
        let report = match junit_read::read(&g.xml, &g.path) {
            Ok(report) => report,
            Err(e) => {
                out.push(Case {
                    name: format!("junit report {}", g.path),
                    failed: true,
                    skipped: false,
                    message: e.to_string(),
                    details: String::new(),
                    time: None,
                    file: None,
                    line: None,
                    source: g.path.clone(),
                });
                continue;
            }
        };
        for suite in &report.test_suites {
            for c in &suite.test_cases {
                let name = match &c.classname {
                    Some(cls) if !cls.is_empty() => format!("{}.{}", cls.as_str(), c.name.as_str()),
                    _ => c.name.as_str().to_string(),
                };
                let extra = |k: &str| {
                    c.extra
                        .iter()
                        .find(|(key, _)| key.as_str() == k)
                        .map(|(_, v)| v.as_str().to_string())
                };
                let (failed, skipped, message, details) = match &c.status {
                    TestCaseStatus::NonSuccess {
                        kind,
                        message,
                        description,
                        ..
                    } => {
                        let kind = match kind {
                            NonSuccessKind::Failure => "failed",
                            NonSuccessKind::Error => "error",
                        };
                        let message = message
                            .as_ref()
                            .map(|m| m.as_str().to_string())
                            .filter(|m| !m.is_empty())
                            .unwrap_or_else(|| kind.to_string());
                        let details = description.as_ref().map(|d| d.as_str().to_string());
                        (true, false, message, details.unwrap_or_default())
                    }
                    TestCaseStatus::Skipped { .. } => (false, true, String::new(), String::new()),
                    TestCaseStatus::Success { .. } => (false, false, String::new(), String::new()),
                };
                out.push(Case {
                    name,
                    failed,
                    skipped,
                    message,
                    details,
                    time: c.time,
                    file: extra("file"),
                    line: extra("line").and_then(|l| l.trim().parse().ok()),
                    source: g.path.clone(),
                });
            }
        }
    }
    out
}
