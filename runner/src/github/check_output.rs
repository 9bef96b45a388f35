//! What a check run shows: the conclusion (from the one `Outcome`), a title, a markdown
//! summary (counts, duration, failing and slowest tests, steps, the VM's facts), the log tail
//! as text, and (from `annotate`) annotations for failing tests and steps. Pure functions:
//! the guest's JUnit files and the suite file's text in, GitHub's shapes out — within
//! GitHub's limits.

use super::annotate;
pub use super::annotate::SuiteLines;
use super::wire::{Annotation, Conclusion, Output, MAX_OUTPUT_CHARS};
pub use crate::mask::mask;
use crate::outcome::Outcome;
use crate::report::cases::{cases, Case};
use crate::report::collect::RunRecord;
use crate::report::summary;
use crate::text::{truncate, truncate_front};

/// Longest run of backticks in a log kept as it is in `output.text` (longer runs are quoted).
const MAX_FENCE: usize = 64;
/// Longest check-run title we send.
pub(super) const MAX_TITLE: usize = 200;

/// `s` within GitHub's output limit, with a note when something was cut.
fn fit_output(s: String) -> String {
    if s.len() <= MAX_OUTPUT_CHARS {
        return s;
    }
    const NOTE: &str = "\n\n*… cut to fit GitHub's 65,535-character limit.*";
    format!("{}{NOTE}", truncate(&s, MAX_OUTPUT_CHARS - NOTE.len()))
}

/// `summary` followed by `epilogue`, within GitHub's limit: the summary is cut, never the
/// epilogue (the commands at the end of it must stay whole).
pub fn with_epilogue(summary: String, epilogue: &str) -> String {
    let room = MAX_OUTPUT_CHARS.saturating_sub(epilogue.len() + 2);
    let summary = if summary.len() > room {
        const NOTE: &str = "\n\n*… cut to fit GitHub's 65,535-character limit.*";
        format!(
            "{}{NOTE}",
            truncate(&summary, room.saturating_sub(NOTE.len()))
        )
    } else {
        summary
    };
    fit_output(format!("{}\n\n{epilogue}", summary.trim_end()))
}

/// The check run's conclusion and headline for `outcome`: THE mapping from the one
/// classification. An infrastructure error is a failure whose title says it was not the
/// tests' fault.
pub fn conclusion(outcome: &Outcome) -> (Conclusion, String) {
    let conclusion = match outcome {
        Outcome::Passed => Conclusion::Success,
        Outcome::Skipped => Conclusion::Skipped,
        Outcome::Failed { .. } | Outcome::InfraError { .. } => Conclusion::Failure,
        Outcome::TimedOut => Conclusion::TimedOut,
        Outcome::Cancelled => Conclusion::Cancelled,
    };
    (conclusion, summary::headline(outcome))
}

/// What to show on a finished check run.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub conclusion: Conclusion,
    pub output: Output,
    pub annotations: Vec<Annotation>,
}

/// Renders `run`. `suite_file` is runner.toml's path in the repository, `lines` its
/// definitions, `exists` says whether a repository-relative path exists at the tested commit,
/// `secrets` are masked in everything the guest wrote.
pub fn render(
    run: &RunRecord,
    suite_file: &str,
    lines: &SuiteLines,
    exists: &dyn Fn(&str) -> bool,
    secrets: &[String],
) -> Rendered {
    let (conclusion, _) = conclusion(&run.outcome);
    let mask = |t: &str| mask(t, secrets);
    let all = cases(&run.reports);
    let failing: Vec<&Case> = all.iter().filter(|c| c.failed).collect();
    let summary = summary::render(run, &all, &mask);

    let log = mask(&run.log_tail);
    let text = if log.trim().is_empty() {
        None
    } else {
        // A fence longer than any run of backticks in the log cannot be closed by it.
        // Very long runs of backticks (a hostile or odd guest) become quotes first, so the
        // fence stays short and the room for the log cannot underflow.
        let log = if log.contains(&"`".repeat(MAX_FENCE)) {
            log.replace('`', "'")
        } else {
            log
        };
        let longest = log.split(|c| c != '`').map(str::len).max().unwrap_or(0);
        let fence = "`".repeat(longest.max(2) + 1);
        let room = MAX_OUTPUT_CHARS.saturating_sub(200 + 2 * fence.len());
        let cut = log.len() > room;
        Some(format!(
            "{}Last output of the guest:\n\n{fence}text\n{}\n{fence}\n",
            if cut {
                "*(earlier output cut)*\n\n"
            } else {
                ""
            },
            truncate_front(&log, room)
        ))
    };

    let annotations = annotate::annotations(run, &failing, suite_file, lines, exists, &mask);
    Rendered {
        conclusion,
        output: Output {
            title: truncate(&summary.title, MAX_TITLE).to_string(),
            summary: fit_output(summary.markdown),
            text: text.map(fit_output),
            annotations: Vec::new(),
        },
        annotations,
    }
}

/// The one neutral check run for a repository without runner.toml.
pub fn missing_suite_file() -> Output {
    Output {
        title: "No runner.toml in this repository".into(),
        summary: "This repository has the runner App installed, but no `runner.toml` at its root, \
so nothing was run.\n\nTo test in emulated riscv64, aarch64 or x86_64 VMs, add a `runner.toml`:\n\n\
```toml\n[defaults]\narch = [\"riscv64\", \"aarch64\"]\n\n[[suite]]\nname = \"unit\"\njunit = [\"junit.xml\"]\n\n  \
[[suite.step]]\n  name = \"test\"\n  run = \"./run-tests --junit junit.xml\"\n```\n\n\
Each suite × architecture then gets its own check run named `runner / SUITE (ARCH)`. \
Try it locally first with `runner test --arch riscv64`."
            .into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{GuestReport, RunId, StepRecord, VmFacts};
    use crate::github::annotate::tests::SUITE_TOML;
    use crate::github::annotate::MAX_ANNOTATIONS;
    use crate::outcome::InfraKind;
    use engine::Arch;
    use std::fmt::Write as _;
    use std::time::Duration;

    #[test]
    fn every_outcome_maps_to_one_conclusion() {
        // (outcome, conclusion, a fragment of the headline)
        let cases = [
            (Outcome::Passed, Conclusion::Success, "passed"),
            (
                Outcome::Failed {
                    exit_code: Some(3),
                    signal: None,
                },
                Conclusion::Failure,
                "exit 3",
            ),
            (
                Outcome::Failed {
                    exit_code: None,
                    signal: Some(9),
                },
                Conclusion::Failure,
                "signal 9",
            ),
            (Outcome::TimedOut, Conclusion::TimedOut, "timed out"),
            (Outcome::Cancelled, Conclusion::Cancelled, "cancelled"),
            (Outcome::Skipped, Conclusion::Skipped, "skipped"),
            // Infrastructure errors are failures whose title says whose fault it was.
            (
                Outcome::InfraError {
                    kind: InfraKind::Boot,
                    message: "agent never answered\nconsole tail".into(),
                },
                Conclusion::Failure,
                "infrastructure error, not a test failure: the VM did not boot: agent never answered",
            ),
        ];
        for (o, c, frag) in cases {
            let (got, title) = conclusion(&o);
            assert_eq!(got, c, "{o}");
            assert!(title.contains(frag), "{o}: {title}");
            assert!(!title.contains('\n'), "{title}");
        }
    }

    #[test]
    fn an_epilogue_survives_a_summary_at_the_limit() {
        let end = "### Failed VM\n\n```sh\nrunner debug unit-riscv64/failed-vm\n```\n";
        let full = with_epilogue("x".repeat(MAX_OUTPUT_CHARS), end);
        assert!(full.len() <= MAX_OUTPUT_CHARS, "{}", full.len());
        assert!(full.ends_with(end));
        assert!(full.contains("cut to fit"));
        assert_eq!(
            with_epilogue("short\n".into(), end),
            format!("short\n\n{end}")
        );
    }

    #[test]
    fn output_is_cut_to_githubs_limit() {
        let huge = "ü".repeat(70_000);
        let fitted = fit_output(huge.clone());
        assert!(fitted.len() <= MAX_OUTPUT_CHARS, "{}", fitted.len());
        assert!(fitted.chars().count() <= MAX_OUTPUT_CHARS);
        assert!(fitted.ends_with("limit.*"));
        assert_eq!(fit_output("short".into()), "short");
    }

    fn record(reports: Vec<GuestReport>, log: &str) -> RunRecord {
        RunRecord {
            id: RunId {
                suite: "unit".into(),
                arch: Arch::Riscv64,
            },
            outcome: Outcome::Failed {
                exit_code: Some(3),
                signal: None,
            },
            duration: Duration::from_millis(12_345),
            facts: VmFacts {
                image: "debian-13".into(),
                accel: "tcg".into(),
                qemu_version: "10.0.2".into(),
                ..Default::default()
            },
            steps: vec![StepRecord {
                name: "tests".into(),
                outcome: Outcome::Failed {
                    exit_code: Some(3),
                    signal: None,
                },
                duration: Duration::from_secs(2),
                output_tail: "line 1\nsecret ghs_abcdef here\n".into(),
            }],
            reports,
            log_tail: log.into(),
        }
    }

    #[test]
    fn failing_tests_become_annotations_where_the_report_says() {
        let xml = r#"<testsuite name="calc" tests="3" failures="2">
  <testcase classname="calc" name="adds" time="0.5"/>
  <testcase classname="calc" name="divides" file="/workspace/src/calc.py" line="42" time="1.5"><failure message="expected 2 | got 3">trace ghs_abcdef</failure></testcase>
  <testcase classname="calc" name="rounds" file="../../etc/passwd" line="1"><failure message="off by one"/></testcase>
</testsuite>"#;
        let run = record(
            vec![GuestReport {
                path: "reports/calc.xml".into(),
                xml: xml.into(),
            }],
            "building\n```\ndone ghs_abcdef\n",
        );
        let exists = |p: &str| p == "src/calc.py";
        let secrets = vec!["ghs_abcdef".to_string()];
        let r = render(
            &run,
            "runner.toml",
            &SuiteLines::scan(SUITE_TOML),
            &exists,
            &secrets,
        );
        assert_eq!(r.conclusion, Conclusion::Failure);
        assert!(
            r.output.title.contains("2 of 3 tests failed"),
            "{}",
            r.output.title
        );
        // Two test annotations and one for the failing step.
        assert_eq!(r.annotations.len(), 3, "{:#?}", r.annotations);
        let a = &r.annotations[0];
        assert_eq!((a.path.as_str(), a.start_line), ("src/calc.py", 42));
        assert_eq!(a.message, "expected 2 | got 3");
        // A path leaving the repository falls back to the suite's line in runner.toml.
        let b = &r.annotations[1];
        assert_eq!((b.path.as_str(), b.start_line), ("runner.toml", 6));
        let step = &r.annotations[2];
        assert_eq!((step.path.as_str(), step.start_line), ("runner.toml", 14));
        // Secrets never reach GitHub.
        let all = format!("{r:?}");
        assert!(!all.contains("ghs_abcdef"), "{all}");
        // The summary has counts, the failing tests (escaped), slowest tests and facts.
        let s = &r.output.summary;
        for frag in [
            "| 3 | 1 | 2 | 0 | 12.3 s |",
            "`calc.divides` — expected 2 \\| got 3",
            "### Slowest tests",
            "| `calc.divides` | 1.5 s |",
            "| `calc.adds` | 500 ms |",
            "| QEMU | 10.0.2 |",
            "| accelerator | tcg |",
        ] {
            assert!(s.contains(frag), "{frag:?} not in:\n{s}");
        }
        // The log's own ``` cannot close our fence.
        let text = r.output.text.unwrap();
        assert!(text.contains("````text\n"), "{text}");
    }

    #[test]
    fn a_log_of_backticks_cannot_break_the_output() {
        // 40,000 backticks in a row once made the room for the log underflow (a panic in
        // debug builds, a check run left in progress).
        let log = format!("start\n{}\nend\n", "`".repeat(40_000));
        let run = record(vec![], &log);
        let r = render(
            &run,
            "runner.toml",
            &SuiteLines::scan(SUITE_TOML),
            &|_| false,
            &[],
        );
        let text = r.output.text.unwrap();
        assert!(text.chars().count() <= MAX_OUTPUT_CHARS);
        assert!(
            text.contains("```text\n") && text.trim_end().ends_with("```"),
            "{}",
            &text[..200]
        );
        assert!(text.contains("end"));
    }

    #[test]
    fn broken_junit_is_a_failing_case_on_runner_toml() {
        let run = record(
            vec![GuestReport {
                path: "reports/bad.xml".into(),
                xml: "<testsuite".into(),
            }],
            "",
        );
        let r = render(
            &run,
            "runner.toml",
            &SuiteLines::scan(SUITE_TOML),
            &|_| true,
            &[],
        );
        assert!(r.annotations[0].message.contains("not valid JUnit"));
        assert_eq!(r.annotations[0].path, "runner.toml");
        assert!(r.output.text.is_none());
    }

    #[test]
    fn huge_logs_and_many_failures_stay_within_limits() {
        let mut xml = String::from("<testsuite name=\"many\">");
        for i in 0..(MAX_ANNOTATIONS + 20) {
            let _ = write!(
                xml,
                "<testcase name=\"t{i}\"><failure message=\"{}\"/></testcase>",
                "x".repeat(300)
            );
        }
        xml.push_str("</testsuite>");
        let log = "ä".repeat(200_000);
        let run = record(
            vec![GuestReport {
                path: "r.xml".into(),
                xml,
            }],
            &log,
        );
        let r = render(&run, "runner.toml", &SuiteLines::default(), &|_| true, &[]);
        assert_eq!(r.annotations.len(), MAX_ANNOTATIONS);
        assert!(r.output.summary.chars().count() <= MAX_OUTPUT_CHARS);
        let text = r.output.text.unwrap();
        assert!(text.len() <= MAX_OUTPUT_CHARS, "{}", text.len());
        assert!(text.starts_with("*(earlier output cut)*"));
        assert!(r.output.summary.contains("and 470 more"));
    }
}
