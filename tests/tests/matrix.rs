//! `runner matrix` against real riscv64 and aarch64 VMs: a 2-suite × 2-architecture matrix
//! where one test fails on aarch64 only and one test is flaky on riscv64 (it fails on the
//! first attempt of each run, decided on the host, so it is deterministic); a second run
//! with the failure fixed reports it as fixed; the HTML report is opened in headless
//! Chromium. Also: the shipped example, an error cell and --fail-fast, cancellation (a
//! partial report, nothing left behind), and bad matrix files refused with one line.
//!
//! Only the first test runs two VMs at once, the others one, so that with two test threads
//! at most three VMs share the host.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{
    assert_nothing_left, private_cache, qemu_processes_using, runner_bin, runner_with_cache,
};
use quick_junit::Report;
use serde_json::Value;

const SUITES: &str = r#"
[defaults]
arch = ["riscv64", "aarch64"]

[[suite]]
name = "calc"
junit = ["out/*.xml"]
  [[suite.step]]
  name = "tests"
  run = "sh tests.sh calc"

[[suite]]
name = "io"
# On the host before every attempt: picks whether this attempt is the run's first.
host_setup = ["sh attempt.sh"]
junit = ["out/*.xml"]
  [[suite.step]]
  name = "tests"
  run = "sh tests.sh io"
"#;

/// The tests: two per suite, reported as JUnit by hand.
const TESTS_SH: &str = r#"
suite=$1
mkdir -p out
failed=0
cases=""
# check NAME ok|fail MESSAGE
check() {
  if [ "$2" = ok ]; then
    cases="$cases<testcase classname=\"$suite\" name=\"$1\"/>"
    echo "ok - $1"
  else
    failed=$((failed + 1))
    cases="$cases<testcase classname=\"$suite\" name=\"$1\"><failure message=\"$3\">$3 on $RUNNER_ARCH</failure></testcase>"
    echo "not ok - $1: $3"
  fi
}
result() { if "$@"; then echo ok; else echo fail; fi; }
case $suite in
calc)
  check adds "$(result [ $((2 + 2)) -eq 4 ])" "2 + 2 is not 4"
  # Broken on aarch64 while the workspace holds break-aarch64.
  check byte_order "$(result sh -c '! { [ "$RUNNER_ARCH" = aarch64 ] && [ -e break-aarch64 ]; }')" "byte order check failed"
  ;;
io)
  check reads "$(result grep -q check tests.sh)" "cannot read tests.sh"
  check retry_me "$(result sh -c '[ "$(cat attempt-$RUNNER_ARCH)" != first ]')" "fails on the first attempt"
  ;;
esac
printf '<testsuite name="%s" tests="2" failures="%d">%s</testsuite>\n' "$suite" "$failed" "$cases" >"out/$suite.xml"
[ "$failed" -eq 0 ]
"#;

/// Runs on the host before each `io` attempt. The marker directory lives in the host's copy
/// of the workspace, so it persists between attempts (each attempt's VM gets a fresh copy):
/// the first riscv64 attempt of a run is "first", every other one "later".
const ATTEMPT_SH: &str = r#"
mkdir -p .attempts
if [ "$RUNNER_ARCH" = riscv64 ] && [ ! -e ".attempts/$RUNNER_ARCH" ]; then
  touch ".attempts/$RUNNER_ARCH"
  echo first >"attempt-$RUNNER_ARCH"
else
  echo later >"attempt-$RUNNER_ARCH"
fi
"#;

const MATRIX: &str = r#"
suites = ["calc", "io"]
arch = ["riscv64", "aarch64"]
timeout = "10m"
retries = 1
"#;

fn project() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in [
        ("runner.toml", SUITES),
        ("tests.sh", TESTS_SH),
        ("attempt.sh", ATTEMPT_SH),
        ("nightly.toml", MATRIX),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn cell<'a>(results: &'a Value, key: &str) -> &'a Value {
    results["cells"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["key"] == key)
        .unwrap_or_else(|| panic!("no cell {key} in {results:#}"))
}

fn test<'a>(cell: &'a Value, name: &str) -> &'a Value {
    cell["tests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name)
        .unwrap_or_else(|| panic!("no test {name} in {cell:#}"))
}

/// The DOM of `page` after headless Chromium loaded and rendered it.
fn rendered_dom(page: &Path) -> String {
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--virtual-time-budget=2000",
            "--dump-dom",
        ])
        .arg(format!("file://{}", page.display()))
        .output()
        .expect("chromium (installed by scripts/setup-host)");
    assert!(out.status.success(), "chromium failed: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn matrix_reports_a_regression_a_flaky_test_and_then_the_fix() {
    let cache = private_cache();
    let dir = project();
    let p = dir.path();
    std::fs::write(p.join("break-aarch64"), "").unwrap();
    let history = p.join("history");
    let args = [
        "matrix",
        "nightly.toml",
        "--jobs",
        "2",
        "--out",
        "report",
        "--history",
        "history",
    ];

    // Night 1: byte_order breaks on aarch64 (a new failure: exit 1), retry_me is flaky.
    let r = runner_with_cache(p, &args, cache.path());
    assert_eq!(r.code, 1, "a new failure fails the run\n{r}");
    let results = read_json(&p.join("report/results.json"));
    assert_eq!(results["schema"], "runner-matrix-results");
    assert_eq!(results["version"], 1);
    assert_eq!(results["run"]["complete"], true);
    for key in ["calc/riscv64/debian-13", "io/aarch64/debian-13"] {
        assert_eq!(
            cell(&results, key)["status"],
            "passed",
            "{key}: {results:#}"
        );
    }
    let broken = cell(&results, "calc/aarch64/debian-13");
    assert_eq!(broken["status"], "failed", "{broken:#}");
    assert_eq!(broken["attempts"], 2, "a failing cell is re-run once");
    assert_eq!(broken["accelerator"], "tcg");
    let byte_order = test(broken, "calc.byte_order");
    assert_eq!(byte_order["status"], "failed");
    assert_eq!(byte_order["change"], "new_failure");
    assert_eq!(byte_order["message"], "byte order check failed");
    assert_eq!(test(broken, "calc.adds")["status"], "passed");
    // The same test passes on riscv64: it fails on one architecture only.
    let fine = cell(&results, "calc/riscv64/debian-13");
    assert_eq!(test(fine, "calc.byte_order")["status"], "passed");
    let flaky = cell(&results, "io/riscv64/debian-13");
    assert_eq!(flaky["status"], "flaky", "{flaky:#}");
    assert_eq!(flaky["attempts"], 2);
    let retry_me = test(flaky, "io.retry_me");
    assert_eq!(retry_me["status"], "flaky");
    assert_eq!(retry_me["attempts"], 2);
    assert_eq!(retry_me["change"], "flaky");
    assert_eq!(test(flaky, "io.reads")["status"], "passed");

    // junit.xml: one testsuite per cell with the VM's facts, the guest's tests merged in.
    let xml = std::fs::read_to_string(p.join("report/junit.xml")).unwrap();
    let junit = Report::deserialize_from_str(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
    let names: Vec<_> = junit
        .test_suites
        .iter()
        .map(|s| s.name.to_string())
        .collect();
    assert_eq!(names.len(), 4, "{names:?}");
    assert!(
        names.contains(&"calc (aarch64, debian-13)".to_string()),
        "{names:?}"
    );
    for prop in [
        "arch",
        "image",
        "accelerator",
        "qemu_version",
        "kernel_version",
    ] {
        assert!(xml.contains(&format!("name=\"{prop}\"")), "{prop} in {xml}");
    }
    assert!(
        xml.contains("byte_order") && xml.contains("flakyFailure"),
        "{xml}"
    );

    // summary.md: the grid and the regression.
    let md = std::fs::read_to_string(p.join("report/summary.md")).unwrap();
    assert!(md.contains("| suite | riscv64 | aarch64 |"), "{md}");
    assert!(md.contains("Regressions (new failures)"), "{md}");
    assert!(
        md.contains("`calc/aarch64/debian-13` — `calc.byte_order`"),
        "{md}"
    );

    // index.html, as a real browser renders it: the grid and the failure's detail.
    let dom = rendered_dom(&p.join("report/index.html"));
    assert!(dom.contains("<table class=\"grid\" id=\"grid\">"), "{dom}");
    assert!(
        dom.contains("data-cell=\"calc/aarch64/debian-13\" data-status=\"failed\""),
        "{dom}"
    );
    assert!(dom.contains("data-cell=\"io/riscv64/debian-13\" data-status=\"flaky\""));
    assert!(dom.contains("id=\"regressions\""), "{dom}");
    assert!(
        dom.contains("byte order check failed on aarch64"),
        "log tail: {dom}"
    );
    assert!(
        !dom.contains("http://") && !dom.contains("https://"),
        "no external asset"
    );

    // Night 2: fixed, and the flaky test flakes again (a new run on the host).
    std::fs::remove_file(p.join("break-aarch64")).unwrap();
    std::fs::remove_dir_all(p.join(".attempts")).unwrap();
    let r = runner_with_cache(p, &args, cache.path());
    assert_eq!(r.code, 0, "a fix and a flaky test do not fail the run\n{r}");
    let second = read_json(&p.join("report/results.json"));
    let fixed = cell(&second, "calc/aarch64/debian-13");
    assert_eq!(fixed["status"], "passed");
    assert_eq!(test(fixed, "calc.byte_order")["change"], "fixed");
    assert_eq!(second["comparison"]["previous_run"], results["run"]["id"]);
    assert_eq!(second["comparison"]["counts"]["new_failure"], 0);
    assert!(second["comparison"]["counts"]["fixed"].as_u64().unwrap() >= 1);
    assert_eq!(cell(&second, "io/riscv64/debian-13")["status"], "flaky");
    let md = std::fs::read_to_string(p.join("report/summary.md")).unwrap();
    assert!(
        md.contains("Fixed") && md.contains("calc.byte_order"),
        "{md}"
    );
    // Each cell's duration trend holds the earlier run (the HTML adds this one).
    for c in second["cells"].as_array().unwrap() {
        assert_eq!(c["trend_s"].as_array().unwrap().len(), 1, "{c:#}");
    }
    // Both runs are in the history.
    let kept = std::fs::read_dir(&history)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("run-"))
        .count();
    assert_eq!(kept, 2);
    assert_nothing_left(cache.path());
}

#[test]
fn the_shipped_example_matrix_produces_the_four_reports() {
    let cache = private_cache();
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new("cp")
        .arg("-a")
        .arg(e2e::workspace_root().join("examples/shell-suite/."))
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success());
    let r = runner_with_cache(
        dir.path(),
        &["matrix", "nightly.toml", "--jobs", "2", "--history", "h"],
        cache.path(),
    );
    assert_eq!(r.code, 0, "{r}");
    let out = dir.path().join("matrix-report");
    for f in ["junit.xml", "results.json", "summary.md", "index.html"] {
        assert!(out.join(f).is_file(), "{f}\n{r}");
    }
    let results = read_json(&out.join("results.json"));
    // Every architecture, each on its default image (the suite checks byte order, word size
    // and dpkg's architecture in the guest).
    let cells = [
        ("riscv64", "debian-13"),
        ("aarch64", "debian-13"),
        ("x86_64", "debian-13"),
        ("armhf", "debian-13"),
        ("ppc64el", "debian-12"),
        ("s390x", "debian-12"),
        ("i386", "debian-12"),
        ("mips64el", "debian-12"),
        ("mipsel", "debian-12"),
    ];
    for (arch, image) in cells {
        let c = cell(&results, &format!("smoke/{arch}/{image}"));
        assert_eq!(c["status"], "passed", "{c:#}");
        assert!(!c["kernel_version"].as_str().unwrap().is_empty(), "{c:#}");
    }
    assert!(r.stderr.contains("9 cells: 9 passed"), "{r}");
    assert_nothing_left(cache.path());
}

#[test]
fn cancelled_matrix_writes_a_partial_report_and_stops_every_vm() {
    let cache = private_cache();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    std::fs::write(
        p.join("runner.toml"),
        "[[suite]]\nname = \"slow\"\n  [[suite.step]]\n  name = \"sleep\"\n  run = \"sleep 600\"\n",
    )
    .unwrap();
    // Someone else's directory as history: a warning, never a crash.
    std::fs::create_dir(p.join("hist")).unwrap();
    std::fs::write(p.join("hist/notes.txt"), "not ours").unwrap();
    let mut child = Command::new(runner_bin())
        .args([
            "matrix",
            "--arch",
            "riscv64,aarch64",
            "--jobs",
            "1",
            "--out",
            "report",
            "--history",
            "hist",
        ])
        .current_dir(p)
        .env("RUNNER_CACHE_DIR", cache.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (bounded) until the first cell's VM runs (the second waits for its slot), then
    // SIGTERM runner: one cell is stopped mid-run, the other never starts.
    let deadline = Instant::now() + Duration::from_secs(180);
    while qemu_processes_using(&cache.path().display().to_string()).is_empty() {
        assert!(Instant::now() < deadline, "the VM never started");
        assert!(child.try_wait().unwrap().is_none(), "runner ended early");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("not a runner matrix history"), "{stderr}");
    let results = read_json(&p.join("report/results.json"));
    assert_eq!(results["run"]["complete"], false);
    for key in ["slow/riscv64/debian-13", "slow/aarch64/debian-13"] {
        assert_eq!(cell(&results, key)["status"], "cancelled", "{results:#}");
    }
    for f in ["index.html", "summary.md", "junit.xml"] {
        assert!(p.join("report").join(f).is_file(), "{f}");
    }
    assert_eq!(
        std::fs::read_to_string(p.join("hist/notes.txt")).unwrap(),
        "not ours"
    );
    assert_nothing_left(cache.path());
}

#[test]
fn a_cell_whose_image_cannot_be_built_is_an_error_cell_and_the_rest_run() {
    let cache = private_cache();
    let dir = project();
    let p = dir.path();
    // A project image whose mirror refuses connections: its build fails fast.
    std::fs::create_dir(p.join("images")).unwrap();
    std::fs::write(
        p.join("images/unreachable.toml"),
        "name = \"unreachable\"\ndescription = \"mirror down\"\ndistribution = \"trixie\"\nmirror = \"http://127.0.0.1:9/debian\"\ndisk_size = \"4G\"\npackages = []\n",
    )
    .unwrap();
    std::fs::write(
        p.join("two-images.toml"),
        "suites = ['calc']\narch = ['riscv64']\nimage = ['debian-13', 'unreachable']\n",
    )
    .unwrap();
    let r = runner_with_cache(
        p,
        &[
            "matrix",
            "two-images.toml",
            "--jobs",
            "1",
            "--fail-on",
            "never",
        ],
        cache.path(),
    );
    assert_eq!(r.code, 0, "--fail-on never\n{r}");
    assert!(
        r.stderr
            .contains("image unreachable for riscv64 cannot be used"),
        "{r}"
    );
    let results = read_json(&p.join("matrix-report/results.json"));
    assert_eq!(cell(&results, "calc/riscv64/debian-13")["status"], "passed");
    let broken = cell(&results, "calc/riscv64/unreachable");
    assert_eq!(broken["status"], "error", "{broken:#}");
    assert_eq!(broken["attempts"], 1, "an image failure is not retried");
    assert!(
        broken["message"].as_str().unwrap().contains("mmdebstrap"),
        "{broken:#}"
    );
    assert_eq!(test(broken, "(setup)")["change"], "new_failure");
    let md = std::fs::read_to_string(p.join("matrix-report/summary.md")).unwrap();
    assert!(
        md.contains("| suite | riscv64 · debian-13 | riscv64 · unreachable |"),
        "{md}"
    );
    assert!(md.contains("Infrastructure errors"), "{md}");

    // --fail-fast, one cell at a time, the broken image first: the other cell never runs.
    std::fs::write(
        p.join("two-images.toml"),
        "suites = ['calc']\narch = ['riscv64']\nimage = ['unreachable', 'debian-13']\n",
    )
    .unwrap();
    let r = runner_with_cache(
        p,
        &[
            "matrix",
            "two-images.toml",
            "--fail-fast",
            "--jobs",
            "1",
            "--out",
            "ff",
        ],
        cache.path(),
    );
    assert_eq!(r.code, 1, "the error cell is a new failure\n{r}");
    let results = read_json(&p.join("ff/results.json"));
    assert_eq!(
        cell(&results, "calc/riscv64/unreachable")["status"],
        "error"
    );
    assert_eq!(
        cell(&results, "calc/riscv64/debian-13")["status"],
        "cancelled"
    );
    assert_eq!(results["run"]["complete"], false);
    assert_nothing_left(cache.path());
}

#[test]
fn bad_matrix_input_is_refused_with_one_line() {
    let dir = project();
    let p = dir.path();
    // (matrix file, what the message must name)
    let cases = [
        ("arch = ['mips']", "mips"),
        ("suites = ['nope']", "no suite named 'nope'"),
        ("image = ['debian-99']", "unknown image 'debian-99'"),
        (
            "[[exclude]]\nsuite = 'calc'\n[[exclude]]\nsuite = 'io'",
            "the matrix is empty",
        ),
        ("retries = 'x'", "invalid type"),
    ];
    let cache = private_cache();
    for (matrix, want) in cases {
        std::fs::write(p.join("bad.toml"), matrix).unwrap();
        let r = runner_with_cache(p, &["matrix", "bad.toml"], cache.path());
        assert_eq!(r.code, 78, "{matrix}\n{r}");
        let lines: Vec<_> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{matrix}\n{r}");
        assert!(
            lines[0].starts_with("runner: error:") && lines[0].contains(want),
            "{matrix}\n{r}"
        );
        assert!(!p.join("matrix-report").exists(), "nothing ran");
    }
    let r = runner_with_cache(p, &["matrix", "missing.toml"], cache.path());
    assert_eq!(r.code, 78, "{r}");
    assert!(r.stderr.contains("no matrix file missing.toml"), "{r}");
}

/// Four suites with 1, 3, 3 and 1 tests, one of them failing: the cells differ in status and
/// in test count, so a cell put back in the wrong place shows.
const SHARD_SUITES: &str = r#"
[defaults]
arch = ["riscv64"]

[[suite]]
name = "one"
junit = ["out/*.xml"]
  [[suite.step]]
  name = "tests"
  run = "sh t.sh one 1 0"

[[suite]]
name = "two"
junit = ["out/*.xml"]
  [[suite.step]]
  name = "tests"
  run = "sh t.sh two 3 0"

[[suite]]
name = "three"
junit = ["out/*.xml"]
  [[suite.step]]
  name = "tests"
  run = "sh t.sh three 2 1"

[[suite]]
name = "four"
  [[suite.step]]
  name = "plain"
  run = "echo four"
"#;

/// `sh t.sh SUITE PASSING FAILING`: that many JUnit testcases of each kind.
const SHARD_TESTS_SH: &str = r#"
mkdir -p out
cases=""
i=0
while [ "$i" -lt "$2" ]; do i=$((i + 1)); cases="$cases<testcase classname=\"$1\" name=\"ok$i\"/>"; done
i=0
while [ "$i" -lt "$3" ]; do i=$((i + 1)); cases="$cases<testcase classname=\"$1\" name=\"bad$i\"><failure message=\"bad $i\"/></testcase>"; done
printf '<testsuite name="%s">%s</testsuite>\n' "$1" "$cases" >"out/$1.xml"
[ "$3" -eq 0 ]
"#;

/// A cell as compared: key, status, and its (test, status) pairs sorted.
type CellView = (String, String, Vec<(String, String)>);

/// Every cell, in the report's order.
fn cells_of(results: &Value) -> Vec<CellView> {
    results["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let mut tests: Vec<(String, String)> = c["tests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| (t["name"].to_string(), t["status"].to_string()))
                .collect();
            tests.sort();
            (c["key"].to_string(), c["status"].to_string(), tests)
        })
        .collect()
}

fn history_runs(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("run-"))
        .count()
}

#[test]
fn two_shards_merged_report_what_the_unsharded_run_reports() {
    let cache = private_cache();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    for (name, text) in [
        ("runner.toml", SHARD_SUITES),
        ("t.sh", SHARD_TESTS_SH),
        (
            "m.toml",
            "arch = ['riscv64']\nretries = 0\ntimeout = '10m'\n",
        ),
    ] {
        std::fs::write(p.join(name), text).unwrap();
    }

    // The whole matrix on one host: the baseline, and the history the shards split by.
    let r = runner_with_cache(
        p,
        &[
            "matrix",
            "m.toml",
            "--jobs",
            "2",
            "--out",
            "full",
            "--history",
            "h",
        ],
        cache.path(),
    );
    assert_eq!(r.code, 1, "three's failure is new\n{r}");
    let full = read_json(&p.join("full/results.json"));
    assert_eq!(full["cells"].as_array().unwrap().len(), 4, "{full:#}");
    assert_eq!(cell(&full, "three/riscv64/debian-13")["status"], "failed");

    // Two shards, as two hosts would run them (here one after the other).
    let mut records = Vec::new();
    for k in ["1/2", "2/2"] {
        let out = format!("s{}", &k[..1]);
        let r = runner_with_cache(
            p,
            &[
                "matrix",
                "m.toml",
                "--shard",
                k,
                "--jobs",
                "2",
                "--out",
                &out,
                "--history",
                "h",
            ],
            cache.path(),
        );
        assert_eq!(r.code, 0, "a shard's verdict is the merge's\n{r}");
        assert!(r.stderr.contains(&format!("shard {k}: ")), "{r}");
        for f in ["shard.json", "results.json", "index.html"] {
            assert!(p.join(&out).join(f).is_file(), "{out}/{f}\n{r}");
        }
        records.push(read_json(&p.join(&out).join("shard.json")));
    }
    assert_eq!(history_runs(&p.join("h")), 1, "shards are not kept");
    eprintln!(
        "figures: unsharded {:.1} s, shards {:.1} s and {:.1} s (run one after the other)",
        full["run"]["duration_s"].as_f64().unwrap(),
        records[0]["run"]["duration_s"].as_f64().unwrap(),
        records[1]["run"]["duration_s"].as_f64().unwrap()
    );
    // Both computed the same split; together they ran every cell exactly once.
    assert_eq!(records[0]["split"], records[1]["split"]);
    assert_eq!(records[0]["matrix"], records[1]["matrix"]);
    let mut ran: Vec<String> = records
        .iter()
        .flat_map(|r| r["cells"].as_array().unwrap().clone())
        .map(|c| c["key"].as_str().unwrap().to_string())
        .collect();
    ran.sort();
    let mut all: Vec<String> = full["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["key"].as_str().unwrap().to_string())
        .collect();
    all.sort();
    assert_eq!(ran, all);
    // The split is the one the history's durations give (not, say, the cells' order).
    let history = runner::matrix::history::History::open(&p.join("h"));
    let keys: Vec<String> = records[0]["split"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["key"].as_str().unwrap().to_string())
        .collect();
    let want = runner::matrix::shard::split(&runner::matrix::shard::estimates(&keys, &history), 2);
    let got: Vec<u32> = records[0]["split"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["shard"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(got, want);

    // Merged: the same cells, statuses and tests as the unsharded run, compared with it.
    // Into a directory that held a shard before: what is there afterwards is no shard.
    std::fs::create_dir(p.join("merged")).unwrap();
    std::fs::copy(p.join("s2/shard.json"), p.join("merged/shard.json")).unwrap();
    let r = runner_with_cache(
        p,
        &[
            "matrix",
            "merge",
            "--out",
            "merged",
            "--history",
            "h",
            "s1",
            "s2",
        ],
        cache.path(),
    );
    assert_eq!(r.code, 0, "still failing is no regression\n{r}");
    let merged = read_json(&p.join("merged/results.json"));
    assert_eq!(cells_of(&merged), cells_of(&full));
    assert_eq!(merged["comparison"]["previous_run"], full["run"]["id"]);
    assert_eq!(
        merged["comparison"]["counts"]["still_failing"], 2,
        "bad1 and its step: {merged:#}"
    );
    assert_eq!(
        merged["comparison"]["counts"]["new_failure"], 0,
        "{merged:#}"
    );
    assert_eq!(merged["run"]["complete"], true);
    for c in merged["cells"].as_array().unwrap() {
        assert_eq!(c["trend_s"].as_array().unwrap().len(), 1, "{c:#}");
    }
    assert_eq!(history_runs(&p.join("h")), 2, "the merged run is kept");
    let junit = |dir: &str| {
        let xml = std::fs::read_to_string(p.join(dir).join("junit.xml")).unwrap();
        let report = Report::deserialize_from_str(&xml).unwrap_or_else(|e| panic!("{e}\n{xml}"));
        let suites: Vec<(String, usize, usize)> = report
            .test_suites
            .iter()
            .map(|s| (s.name.to_string(), s.tests, s.failures))
            .collect();
        (suites, report.tests, report.failures)
    };
    assert_eq!(junit("merged"), junit("full"));
    assert_eq!(junit("merged").0.len(), 4);
    let md = std::fs::read_to_string(p.join("merged/summary.md")).unwrap();
    assert!(md.contains("| suite | riscv64 |"), "{md}");
    // The page, as a real browser renders it.
    let dom = rendered_dom(&p.join("merged/index.html"));
    assert!(dom.contains("<table class=\"grid\" id=\"grid\">"), "{dom}");
    for c in full["cells"].as_array().unwrap() {
        let mark = format!(
            "data-cell=\"{}\" data-status=\"{}\"",
            c["key"].as_str().unwrap(),
            c["status"].as_str().unwrap()
        );
        assert!(dom.contains(&mark), "{mark}: {dom}");
    }
    assert!(
        !dom.contains("http://") && !dom.contains("https://"),
        "no external asset"
    );

    // Shards that are not the parts of one run: one line each, exit 78, nothing written.
    let mut other = records[1].clone();
    other["matrix"] = Value::from("0".repeat(64));
    std::fs::create_dir(p.join("other")).unwrap();
    std::fs::write(p.join("other/shard.json"), other.to_string()).unwrap();
    // (shard directories, what the message says)
    let cases: [(&[&str], &str); 5] = [
        (&["s1", "s1"], "shard 1/2 is given twice (s1 and s1)"),
        (&["s2"], "shard 1/2 is missing"),
        (
            &["s1", "other"],
            "s1 and other are shards of different matrices",
        ),
        (&["s1", "full"], "full is not a matrix shard"),
        (&["s1", "merged"], "merged is not a matrix shard"),
    ];
    for (dirs, want) in cases {
        let mut args = vec!["matrix", "merge", "--out", "refused", "--history", "h"];
        args.extend_from_slice(dirs);
        let r = runner_with_cache(p, &args, cache.path());
        assert_eq!(r.code, 78, "{dirs:?}\n{r}");
        let lines: Vec<_> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{dirs:?}\n{r}");
        assert!(
            lines[0].starts_with("runner: error:") && lines[0].contains(want),
            "{dirs:?}\n{r}"
        );
        assert!(!p.join("refused").exists());
    }
    assert_eq!(history_runs(&p.join("h")), 2, "nothing refused is kept");
    assert_nothing_left(cache.path());
}

#[test]
fn bad_shard_arguments_are_refused_with_one_line() {
    let dir = project();
    let p = dir.path();
    let cache = private_cache();
    // (--shard value, what the message must say); exit 2 like any bad command line.
    let cases = [
        ("3/2", "K must be between 1 and N"),
        ("0/2", "K must be between 1 and N"),
        ("1/0", "N must be between 1 and 256"),
        ("half", "expected K/N"),
    ];
    for (value, want) in cases {
        let r = runner_with_cache(
            p,
            &["matrix", "nightly.toml", "--shard", value],
            cache.path(),
        );
        assert_eq!(r.code, 2, "{value}\n{r}");
        let lines: Vec<_> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{value}\n{r}");
        assert!(
            lines[0].starts_with("runner: error: --shard") && lines[0].contains(want),
            "{value}\n{r}"
        );
        assert!(!p.join("matrix-report").exists(), "nothing ran");
    }
    // merge needs at least one shard, and a directory that is one.
    let r = runner_with_cache(p, &["matrix", "merge", "--out", "o"], cache.path());
    assert_eq!(r.code, 2, "{r}");
    let r = runner_with_cache(
        p,
        &["matrix", "merge", "--out", "o", "nowhere"],
        cache.path(),
    );
    assert_eq!(r.code, 78, "{r}");
    assert!(r.stderr.contains("nowhere is not a matrix shard"), "{r}");
}
