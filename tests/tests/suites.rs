//! `runner test` with suite files against real riscv64 VMs: the shipped examples, a failing
//! suite, step timeouts, JUnit content and artifacts.

use std::path::Path;

use e2e::{
    assert_nothing_left, in_guest, private_cache, runner, runner_with_cache, workspace_root,
};
use quick_junit::Report;

fn read_junit(path: &Path) -> (String, Report) {
    let xml = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let report =
        Report::deserialize_from_str(&xml).unwrap_or_else(|e| panic!("invalid JUnit: {e}\n{xml}"));
    (xml, report)
}

/// `runner test --arch riscv64 --junit JUNIT` in `dir`.
fn test_riscv64_with_junit(dir: &Path, junit: &Path) -> e2e::Run {
    runner(
        dir,
        &[
            "test",
            "--arch",
            "riscv64",
            "--junit",
            junit.to_str().unwrap(),
        ],
    )
}

/// Copies an example into a temp dir so runs do not write into the repository.
fn example(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("cp")
        .arg("-a")
        .arg(workspace_root().join("examples").join(name).join("."))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    dir
}

#[test]
fn shell_example_passes_with_junit_and_artifacts() {
    let dir = example("shell-suite");
    let junit = dir.path().join("out/junit.xml");
    let r = test_riscv64_with_junit(dir.path(), &junit);
    assert_eq!(r.code, 0, "{r}");
    // Live output of both steps, and the summary.
    assert!(r.stdout.contains("arch: riscv64"), "{r}");
    assert!(
        r.stderr.contains("PASSED") && r.stderr.contains("smoke on riscv64"),
        "{r}"
    );
    let (xml, report) = read_junit(&junit);
    let names: Vec<_> = report
        .test_suites
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names[0], "smoke (riscv64)", "{xml}");
    assert!(names.len() >= 2, "guest report merged: {names:?}");
    assert_eq!(report.failures + report.errors, 0, "{xml}");
    assert!(xml.contains("name=\"arch\" value=\"riscv64\""), "{xml}");
    // The declared artifact came back.
    assert!(dir
        .path()
        .join("runner-out/smoke-riscv64/build/junit/shell.xml")
        .is_file());
}

#[test]
fn c_example_cross_compiles_on_the_host_and_tests_in_the_guest() {
    let dir = example("c-project");
    let junit = dir.path().join("junit.xml");
    let r = test_riscv64_with_junit(dir.path(), &junit);
    assert_eq!(r.code, 0, "{r}");
    let (xml, report) = read_junit(&junit);
    assert!(report.tests >= 3, "{xml}");
    assert!(xml.contains("host: make ARCH=$RUNNER_ARCH"), "{xml}");
}

const FAILING_SUITE: &str = r#"
[defaults]
arch = ["riscv64"]

[[suite]]
name = "mixed"
junit = ["reports/*.xml"]
artifacts = ["reports/*", "notes.txt"]

  [[suite.step]]
  name = "prepare"
  run = "echo preparing; echo kept > notes.txt"

  [[suite.step]]
  name = "lenient"
  run = "exit 5"
  allow_failure = true

  [[suite.step]]
  name = "tests"
  run = '''
mkdir -p reports
cat > reports/unit.xml <<XML
<testsuite name="unit" tests="2" failures="1">
  <testcase classname="unit" name="good"/>
  <testcase classname="unit" name="bad"><failure message="expected 1, got 2">trace</failure></testcase>
</testsuite>
XML
echo "one test failed" >&2
exit 3
'''

  [[suite.step]]
  name = "never"
  run = "echo should not run"
"#;

#[test]
fn a_failing_step_fails_the_suite_and_later_steps_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("runner.toml"), FAILING_SUITE).unwrap();
    let junit = dir.path().join("junit.xml");
    let cache = private_cache();
    let r = runner_with_cache(
        dir.path(),
        &["test", "--junit", junit.to_str().unwrap()],
        cache.path(),
    );
    assert_eq!(r.code, 1, "{r}");
    assert!(
        r.stdout.contains("preparing") && !r.stdout.contains("should not run"),
        "{r}"
    );
    let (xml, report) = read_junit(&junit);
    let suite = &report.test_suites[0];
    let status = |name: &str| {
        let case = suite
            .test_cases
            .iter()
            .find(|c| c.name.as_str() == name)
            .unwrap_or_else(|| panic!("{name}: {xml}"));
        format!("{:?}", case.status)
    };
    assert!(status("prepare").starts_with("Success"), "{xml}");
    // allow_failure: reported as a failure but the suite went on.
    assert!(status("lenient").contains("Failure"), "{xml}");
    assert!(status("tests").contains("Failure"), "{xml}");
    assert!(status("never").starts_with("Skipped"), "{xml}");
    // stderr of the step is in its output excerpt.
    assert!(xml.contains("one test failed"), "{xml}");
    // The guest's own report is merged, its failure included.
    let guest = report
        .test_suites
        .iter()
        .find(|s| s.name.as_str() == "mixed (riscv64) / unit")
        .expect(&xml);
    assert_eq!(guest.failures, 1);
    // Artifacts come back even though the suite failed.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("runner-out/mixed-riscv64/notes.txt")).unwrap(),
        "kept\n"
    );
    assert!(dir
        .path()
        .join("runner-out/mixed-riscv64/reports/unit.xml")
        .is_file());
    assert_nothing_left(cache.path());
}

#[test]
fn a_step_timeout_is_an_error_and_stops_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runner.toml"),
        "[[suite]]\nname = \"slow\"\n[[suite.step]]\nname = \"hangs\"\nrun = \"echo going; sleep 600\"\ntimeout = \"15s\"\n[[suite.step]]\nname = \"after\"\nrun = \"true\"\n",
    )
    .unwrap();
    let junit = dir.path().join("junit.xml");
    let cache = private_cache();
    let r = runner_with_cache(
        dir.path(),
        &[
            "test",
            "--arch",
            "riscv64",
            "--junit",
            junit.to_str().unwrap(),
        ],
        cache.path(),
    );
    assert_eq!(r.code, 124, "{r}");
    let (xml, report) = read_junit(&junit);
    assert_eq!(report.errors, 1, "{xml}");
    assert!(xml.contains("type=\"timeout\""), "{xml}");
    assert!(xml.contains("<skipped"), "{xml}");
    assert_nothing_left(cache.path());
}

#[test]
fn a_daemon_left_by_one_step_does_not_break_the_next() {
    // The first step leaves a process holding its stdout and writing to it often; the second
    // step must still run with live output, and the results must still be collected (once
    // the daemon's lines leaked into the runner's own file listing and failed the suite).
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runner.toml"),
        r#"
[[suite]]
name = "daemon"
junit = ["report.xml"]
  [[suite.step]]
  name = "start"
  run = "(while :; do echo tick; sleep 0.05; done) &"
  [[suite.step]]
  name = "use"
  run = '''
sleep 2
echo second-step-ran
echo '<testsuite name="d" tests="1"><testcase name="t"/></testsuite>' > report.xml
'''
"#,
    )
    .unwrap();
    let junit = dir.path().join("junit.xml");
    let r = test_riscv64_with_junit(dir.path(), &junit);
    assert_eq!(
        r.code,
        0,
        "{r}\n{}",
        std::fs::read_to_string(&junit).unwrap_or_default()
    );
    assert!(r.stdout.contains("second-step-ran"), "{r}");
    let (xml, report) = read_junit(&junit);
    assert!(
        report
            .test_suites
            .iter()
            .any(|s| s.name.as_str() == "daemon (riscv64) / d"),
        "{xml}"
    );
}

#[test]
fn failing_tests_in_a_guest_report_fail_the_run() {
    // Every step exits 0, but the guest's own JUnit report records a failure.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runner.toml"),
        r#"
[[suite]]
name = "lying"
junit = ["r.xml"]
  [[suite.step]]
  name = "tests"
  run = "echo '<testsuite name=\"x\" tests=\"1\" failures=\"1\"><testcase name=\"t\"><failure message=\"no\"/></testcase></testsuite>' > r.xml"
"#,
    )
    .unwrap();
    let r = runner(dir.path(), &["test", "--arch", "riscv64"]);
    assert_eq!(r.code, 1, "{r}");
}

#[test]
fn a_guest_that_powers_off_mid_step_is_a_test_failure() {
    // Not an infrastructure error: the test did it (sysrq 'o' powers off at once).
    let r = in_guest(
        "riscv64",
        &[
            "sh",
            "-c",
            "echo going; echo o > /proc/sysrq-trigger; sleep 30",
        ],
    );
    assert_eq!(r.code, 1, "{r}");
    assert!(r.stdout.contains("powered off"), "{r}");
}

#[test]
fn suite_selects_one_suite_and_summary_counts_its_tests() {
    let dir = tempfile::tempdir().unwrap();
    // Two suites; only `picked` runs. Its report (in the workspace the guest gets): 3 tests,
    // one skipped.
    let junit = r#"<testsuite name="s" tests="3" skipped="1"><testcase classname="s" name="one" time="0.2"/><testcase classname="s" name="two" time="1.5"/><testcase classname="s" name="three"><skipped/></testcase></testsuite>"#;
    std::fs::write(dir.path().join("r.xml"), junit).unwrap();
    std::fs::write(
        dir.path().join("runner.toml"),
        r#"[defaults]
arch = ["riscv64"]

[[suite]]
name = "picked"
junit = ["r.xml"]
  [[suite.step]]
  name = "report"
  run = "test -s r.xml"

[[suite]]
name = "other"
  [[suite.step]]
  name = "never"
  run = "false"
"#,
    )
    .unwrap();
    let summary = dir.path().join("summary.md");
    let r = runner(
        dir.path(),
        &[
            "test",
            "--suite",
            "picked",
            "--summary",
            summary.to_str().unwrap(),
        ],
    );
    assert_eq!(r.code, 0, "{r}");
    let md = std::fs::read_to_string(&summary).unwrap();
    assert_eq!(
        md.matches("\n## ").count() + usize::from(md.starts_with("## ")),
        1,
        "{md}"
    );
    for frag in [
        "## picked on riscv64: passed — 2 tests passed",
        "| tests | passed | failed | skipped | duration |",
        "| 3 | 2 | 0 | 1 |",
        "| `s.two` | 1.5 s |",
        "| `report` | passed |",
        "| architecture | riscv64 |",
    ] {
        assert!(md.contains(frag), "{frag:?} not in:\n{md}");
    }
    assert!(!md.contains("other"), "{md}");
}
