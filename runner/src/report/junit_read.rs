//! Reads the JUnit XML a guest wrote, leniently, into a [`quick_junit::Report`] — the one reader
//! behind the JUnit reporter, the GitHub annotations and the matrix.
//!
//! JUnit has no single schema: every producer writes its own dialect. Like GitLab's and
//! GitHub's readers we take what is there and ignore the rest: a `<testsuites>` or `<testsuite>`
//! root, suites nested to any depth (flattened: each suite keeps its own testcases), missing
//! names (a suite takes its enclosing suite's name, else the report's path; a testcase its
//! classname), `status`/`result` attributes where there is no `<failure>`/`<error>`/`<skipped>`
//! element, flaky and rerun elements, absent or malformed times. The declared counts
//! (`tests="…"`) are ignored: we count the testcases. Only what is not JUnit at all — another
//! root element, no element, malformed or truncated XML — is an error, in one line.
//!
//! The report is untrusted guest output: its size is bounded when it is read from the guest
//! (`transfer`), elements nest at most [`MAX_DEPTH`] deep, and no entity is expanded — quick-xml
//! resolves only the five predefined ones and character references; anything a DOCTYPE
//! declares stays as literal `&name;` text.

use quick_junit::{
    NonSuccessKind, Property, Report, TestCase, TestCaseStatus, TestRerun, TestSuite,
};
use quick_xml::escape::resolve_xml_entity;
use quick_xml::events::{BytesRef, BytesStart, Event};
use quick_xml::Reader;
use std::time::Duration;

/// Deepest element nesting we follow. Real reports nest four or five deep (PHPUnit's data
/// providers the deepest); the bound keeps a hostile report from growing our stacks.
pub const MAX_DEPTH: usize = 64;
/// Longest root-element name or guest note quoted in an error.
const MAX_QUOTED: usize = 200;

/// A guest report that is not JUnit at all.
#[derive(Debug, thiserror::Error)]
#[error("{path} is not valid JUnit XML: {reason}")]
pub struct NotJunit {
    /// The report's path in the guest.
    pub path: String,
    pub reason: Reason,
}

/// Why a report is not JUnit. Each reads as one line.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum Reason {
    #[error("it holds no XML element")]
    NoElement,
    /// Nothing but a comment: the runner writes its reasons for not reading a report that way.
    #[error("it holds no XML element, only the note '{0}'")]
    OnlyNote(String),
    #[error("its root element is <{0}>, not <testsuites> or <testsuite>")]
    WrongRoot(String),
    #[error("malformed XML at line {line}, column {column}: {detail}")]
    Malformed {
        line: usize,
        column: usize,
        detail: String,
    },
    #[error("it ends inside <{0}> (truncated?)")]
    Truncated(String),
    #[error("its elements nest deeper than {MAX_DEPTH}")]
    TooDeep,
}

/// Reads the guest report at `path` (used for names and messages).
pub fn read(xml: &str, path: &str) -> Result<Report, NotJunit> {
    read_report(xml, path).map_err(|reason| NotJunit {
        path: path.to_string(),
        reason,
    })
}

/// What an open element means, from its name and where it is.
#[derive(Debug)]
enum Kind {
    Suites,
    Suite,
    Case,
    /// `<failure>`, `<error>` or `<skipped>` of the open testcase.
    Outcome(TestCaseStatus),
    /// `<flakyFailure>`, `<rerunError>`, … of the open testcase.
    Rerun,
    /// Text for a field of the enclosing suite, testcase or rerun.
    Text(Field),
    /// `<properties>` of the enclosing suite or testcase.
    Properties,
    /// A `<property>`; its value is the attribute or else the text.
    Property {
        name: String,
        value: Option<String>,
    },
    /// Anything else, with all it contains.
    Ignored,
}

#[derive(Debug, Clone, Copy)]
enum Field {
    SystemOut,
    SystemErr,
    StackTrace,
}

#[derive(Debug)]
struct Open {
    name: String,
    kind: Kind,
    /// Text directly inside, for the kinds that keep it.
    text: String,
}

#[derive(Debug)]
struct OpenSuite {
    /// Its place in document order among the suites.
    slot: usize,
    suite: TestSuite,
    has_child_suites: bool,
}

#[derive(Debug)]
struct OpenCase {
    case: TestCase,
    /// The first `<failure>`/`<error>`, else the first `<skipped>`.
    outcome: Option<TestCaseStatus>,
    /// From a `status`/`result` attribute, used only when there is no outcome element.
    status_attr: Option<TestCaseStatus>,
    reruns: Vec<TestRerun>,
}

#[derive(Debug, Default)]
struct Reading {
    path: String,
    /// Finished suites by slot; `None` while open or when dropped.
    slots: Vec<Option<TestSuite>>,
    suites: Vec<OpenSuite>,
    /// Testcases written directly under `<testsuites>`.
    loose: Option<OpenSuite>,
    case: Option<OpenCase>,
    rerun: Option<TestRerun>,
    stack: Vec<Open>,
    root_seen: bool,
    /// The first comment before the root element.
    note: Option<String>,
}

fn read_report(xml: &str, path: &str) -> Result<Report, Reason> {
    // quick-xml skips a BOM too; removing it here keeps error positions true to the text.
    let xml = xml.strip_prefix('\u{feff}').unwrap_or(xml);
    let mut reader = Reader::from_str(xml);
    // A bare `&` in a message (shell harnesses write them) is text, not an error.
    reader.config_mut().allow_dangling_amp = true;
    let mut r = Reading {
        path: path.to_string(),
        ..Default::default()
    };
    loop {
        let event = reader.read_event().map_err(|e| {
            let at = usize::try_from(reader.error_position()).unwrap_or(usize::MAX);
            malformed(xml, at, &e.to_string())
        })?;
        match event {
            Event::Start(e) => r.start(&e)?,
            Event::Empty(e) => {
                r.start(&e)?;
                r.end();
            }
            Event::End(_) => r.end(),
            Event::Text(t) => r.text(&t.xml_content().unwrap_or_default()),
            Event::CData(t) => r.text(&t.xml_content().unwrap_or_default()),
            Event::GeneralRef(e) => r.text(&reference(&e)),
            Event::Comment(c) if !r.root_seen && r.note.is_none() => {
                let note = one_line(&c.decode().unwrap_or_default());
                r.note = (!note.is_empty()).then_some(note);
            }
            // Declarations, DOCTYPEs (never expanded), processing instructions.
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            Event::Eof => break,
        }
    }
    if let Some(open) = r.stack.last() {
        return Err(Reason::Truncated(one_line(&open.name)));
    }
    if !r.root_seen {
        return Err(r.note.take().map_or(Reason::NoElement, Reason::OnlyNote));
    }
    if let Some(loose) = r.loose.take() {
        r.slots[loose.slot] = Some(loose.suite);
    }
    let mut report = Report::new(path);
    report.add_test_suites(r.slots.into_iter().flatten());
    Ok(report)
}

impl Reading {
    fn start(&mut self, e: &BytesStart) -> Result<(), Reason> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(Reason::TooDeep);
        }
        let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
        let attrs = Attrs::of(e);
        let parent = self.stack.last().map(|o| &o.kind);
        let kind = match (parent, name.as_str()) {
            // A second root (reports concatenated with `cat`) is read like the first.
            (None, "testsuites") => Kind::Suites,
            (None | Some(Kind::Suites | Kind::Suite), "testsuite") => {
                self.open_suite(&attrs);
                Kind::Suite
            }
            (None, _) if self.root_seen => Kind::Ignored,
            (None, _) => return Err(Reason::WrongRoot(one_line(&name))),
            (Some(Kind::Suites | Kind::Suite), "testcase") => {
                self.open_case(&attrs);
                Kind::Case
            }
            (Some(Kind::Suite | Kind::Case), "properties") => Kind::Properties,
            (Some(Kind::Properties), "property") => Kind::Property {
                name: attrs.get("name").unwrap_or_default(),
                value: attrs.get("value"),
            },
            (Some(Kind::Case), "failure" | "error" | "skipped") => {
                let mut status = match name.as_str() {
                    "failure" => TestCaseStatus::non_success(NonSuccessKind::Failure),
                    "error" => TestCaseStatus::non_success(NonSuccessKind::Error),
                    _ => TestCaseStatus::skipped(),
                };
                if let Some(m) = attrs.get("message") {
                    status.set_message(m);
                }
                if let Some(t) = attrs.get("type").filter(|t| !t.is_empty()) {
                    status.set_type(t);
                }
                Kind::Outcome(status)
            }
            (Some(Kind::Case), "flakyFailure" | "flakyError" | "rerunFailure" | "rerunError") => {
                let mut rerun = TestRerun::new(if name.ends_with("Error") {
                    NonSuccessKind::Error
                } else {
                    NonSuccessKind::Failure
                });
                if let Some(m) = attrs.get("message") {
                    rerun.set_message(m);
                }
                if let Some(t) = attrs.get("type").filter(|t| !t.is_empty()) {
                    rerun.set_type(t);
                }
                if let Some(t) = attrs.get("time").as_deref().and_then(seconds) {
                    rerun.set_time(t);
                }
                self.rerun = Some(rerun);
                Kind::Rerun
            }
            (Some(Kind::Suite | Kind::Case | Kind::Rerun), "system-out") => {
                Kind::Text(Field::SystemOut)
            }
            (Some(Kind::Suite | Kind::Case | Kind::Rerun), "system-err") => {
                Kind::Text(Field::SystemErr)
            }
            (Some(Kind::Rerun), "stackTrace") => Kind::Text(Field::StackTrace),
            _ => Kind::Ignored,
        };
        self.root_seen = true;
        self.stack.push(Open {
            name,
            kind,
            text: String::new(),
        });
        Ok(())
    }

    fn text(&mut self, text: &str) {
        if let Some(open) = self.stack.last_mut() {
            if matches!(
                open.kind,
                Kind::Outcome(_) | Kind::Rerun | Kind::Text(_) | Kind::Property { .. }
            ) {
                open.text.push_str(text);
            }
        }
    }

    /// Closes the innermost open element (quick-xml has checked that the names match).
    fn end(&mut self) {
        let Some(open) = self.stack.pop() else {
            return;
        };
        let text = (!open.text.trim().is_empty()).then_some(open.text);
        match open.kind {
            Kind::Suite => self.close_suite(),
            Kind::Case => self.close_case(),
            Kind::Outcome(mut status) => {
                if let Some(t) = text {
                    status.set_description(t);
                }
                if let Some(case) = &mut self.case {
                    // A failure or error outweighs a skip; otherwise the first one stands.
                    let replace = match &case.outcome {
                        None => true,
                        Some(TestCaseStatus::Skipped { .. }) => {
                            matches!(status, TestCaseStatus::NonSuccess { .. })
                        }
                        Some(_) => false,
                    };
                    if replace {
                        case.outcome = Some(status);
                    }
                }
            }
            Kind::Rerun => {
                if let (Some(mut rerun), Some(case)) = (self.rerun.take(), &mut self.case) {
                    if let Some(t) = text {
                        rerun.set_description(t);
                    }
                    case.reruns.push(rerun);
                }
            }
            Kind::Text(field) => {
                let Some(t) = text else { return };
                match self.stack.last().map(|o| &o.kind) {
                    Some(Kind::Rerun) => {
                        if let Some(rerun) = &mut self.rerun {
                            match field {
                                Field::SystemOut => rerun.set_system_out(t),
                                Field::SystemErr => rerun.set_system_err(t),
                                Field::StackTrace => rerun.set_stack_trace(t),
                            };
                        }
                    }
                    Some(Kind::Case) => {
                        if let Some(case) = &mut self.case {
                            match field {
                                Field::SystemOut => case.case.set_system_out(t),
                                Field::SystemErr | Field::StackTrace => case.case.set_system_err(t),
                            };
                        }
                    }
                    Some(Kind::Suite) => {
                        if let Some(open) = self.suites.last_mut() {
                            match field {
                                Field::SystemOut => open.suite.set_system_out(t),
                                Field::SystemErr | Field::StackTrace => {
                                    open.suite.set_system_err(t)
                                }
                            };
                        }
                    }
                    _ => {}
                }
            }
            Kind::Property { name, value } => {
                let value = value.or(text).unwrap_or_default();
                let property = Property::new(name, value);
                match self.stack.iter().rev().nth(1).map(|o| &o.kind) {
                    Some(Kind::Case) => {
                        if let Some(case) = &mut self.case {
                            case.case.add_property(property);
                        }
                    }
                    Some(Kind::Suite) => {
                        if let Some(open) = self.suites.last_mut() {
                            open.suite.add_property(property);
                        }
                    }
                    _ => {}
                }
            }
            Kind::Suites | Kind::Properties | Kind::Ignored => {}
        }
    }

    fn open_suite(&mut self, attrs: &Attrs) {
        let name = attrs
            .get("name")
            .filter(|n| !n.trim().is_empty())
            .or_else(|| self.suites.last().map(|s| s.suite.name.to_string()))
            .unwrap_or_else(|| self.path.clone());
        let mut suite = TestSuite::new(name);
        if let Some(t) = attrs.get("time").as_deref().and_then(seconds) {
            suite.set_time(t);
        }
        if let Some(parent) = self.suites.last_mut() {
            parent.has_child_suites = true;
        }
        self.slots.push(None);
        self.suites.push(OpenSuite {
            slot: self.slots.len() - 1,
            suite,
            has_child_suites: false,
        });
    }

    fn close_suite(&mut self) {
        let Some(open) = self.suites.pop() else {
            return;
        };
        // A suite that only groups other suites would be an empty one in every viewer.
        let container = open.has_child_suites
            && open.suite.test_cases.is_empty()
            && open.suite.system_out.is_none()
            && open.suite.system_err.is_none();
        if !container {
            self.slots[open.slot] = Some(open.suite);
        }
    }

    fn open_case(&mut self, attrs: &Attrs) {
        let classname = attrs.get("classname").filter(|c| !c.trim().is_empty());
        let name = attrs
            .get("name")
            .filter(|n| !n.trim().is_empty())
            .or_else(|| classname.clone())
            .unwrap_or_else(|| {
                let n = self.suites.last().map_or(0, |s| s.suite.test_cases.len());
                format!("(unnamed testcase {})", n + 1)
            });
        let mut case = TestCase::new(name, TestCaseStatus::success());
        if let Some(c) = classname {
            case.set_classname(c);
        }
        if let Some(t) = attrs.get("time").as_deref().and_then(seconds) {
            case.set_time(t);
        }
        // Where the test is, for annotations (pytest, PHPUnit, xmlrunner, jest-junit write them).
        for key in ["file", "line"] {
            if let Some(v) = attrs.get(key).filter(|v| !v.is_empty()) {
                case.extra.insert(key.into(), v.into());
            }
        }
        let status_attr = attrs
            .get("status")
            .and_then(|s| status_word(&s))
            .or_else(|| attrs.get("result").and_then(|s| status_word(&s)));
        self.case = Some(OpenCase {
            case,
            outcome: None,
            status_attr,
            reruns: Vec::new(),
        });
    }

    fn close_case(&mut self) {
        let Some(open) = self.case.take() else {
            return;
        };
        let mut case = open.case;
        case.status = open
            .outcome
            .or(open.status_attr)
            .unwrap_or_else(TestCaseStatus::success);
        // Passed after failed runs: flaky runs; failed every time: reruns; skipped: none.
        match &mut case.status {
            TestCaseStatus::Success { flaky_runs } => flaky_runs.extend(open.reruns),
            status => {
                status.add_reruns(open.reruns);
            }
        }
        let suite = match self.suites.last_mut() {
            Some(open) => &mut open.suite,
            None => {
                let loose = self.loose.get_or_insert_with(|| {
                    self.slots.push(None);
                    OpenSuite {
                        slot: self.slots.len() - 1,
                        suite: TestSuite::new(self.path.as_str()),
                        has_child_suites: false,
                    }
                });
                &mut loose.suite
            }
        };
        suite.add_test_case(case);
    }
}

/// An element's attributes by local name, entities resolved where they can be (an unknown
/// entity stays as written: lenient, and never expanded). Read once per element.
#[derive(Debug)]
struct Attrs(Vec<(String, String)>);

impl Attrs {
    fn of(e: &BytesStart) -> Attrs {
        let mut attributes = e.attributes();
        let attrs = attributes.with_checks(false).flatten().map(|a| {
            let key = String::from_utf8_lossy(a.key.local_name().as_ref()).into_owned();
            let value = match a.unescape_value() {
                Ok(v) => v.into_owned(),
                Err(_) => String::from_utf8_lossy(&a.value).into_owned(),
            };
            (key, value)
        });
        Attrs(attrs.collect())
    }

    fn get(&self, key: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    }
}

/// `&amp;`, `&#xA;`, … as text; any other reference stays literal.
fn reference(e: &BytesRef) -> String {
    let name = e.decode().unwrap_or_default();
    if let Ok(Some(c)) = e.resolve_char_ref() {
        return c.to_string();
    }
    match resolve_xml_entity(&name) {
        Some(s) => s.to_string(),
        None => format!("&{name};"),
    }
}

/// A testcase's outcome from a `status`/`result` attribute (ctest, some custom harnesses);
/// `None` for words that mean it ran and passed, or that we do not know.
fn status_word(word: &str) -> Option<TestCaseStatus> {
    match word.trim().to_ascii_lowercase().as_str() {
        "fail" | "failed" | "failure" => Some(TestCaseStatus::non_success(NonSuccessKind::Failure)),
        "error" | "errored" => Some(TestCaseStatus::non_success(NonSuccessKind::Error)),
        "skip" | "skipped" | "notrun" | "not_run" | "disabled" | "ignored" | "pending" => {
            Some(TestCaseStatus::skipped())
        }
        _ => None,
    }
}

/// Seconds as a duration; `None` for anything that is not a finite, non-negative number.
fn seconds(text: &str) -> Option<Duration> {
    let s: f64 = text.trim().parse().ok()?;
    Duration::try_from_secs_f64(s).ok()
}

fn malformed(xml: &str, at: usize, detail: &str) -> Reason {
    let before = &xml.as_bytes()[..at.min(xml.len())];
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    Reason::Malformed {
        line: before.iter().filter(|&&b| b == b'\n').count() + 1,
        column: before.len() - line_start + 1,
        detail: one_line(detail),
    }
}

/// Text from the report made fit for a one-line message: whitespace runs become one space,
/// at most [`MAX_QUOTED`] characters.
fn one_line(text: &str) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match flat.char_indices().nth(MAX_QUOTED) {
        Some((cut, _)) => format!("{}…", &flat[..cut]),
        None => flat,
    }
}

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
