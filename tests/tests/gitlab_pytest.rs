//! The everyday GitLab job on our runner, end to end: `apt-get install -y python3-pytest &&
//! pytest --junitxml=report.xml` in a riscv64 VM whose only way out is the job's proxy (the
//! default allowlist: the image's Debian mirror), its JUnit report uploaded, and the packages
//! apt downloaded kept in the job's `cache:` so that the next job installs them without
//! downloading. The real `runner serve`, the fake GitLab, the real Debian mirror.

use std::io::Read;
use std::time::{Duration, Instant};

use e2e::fake_gitlab::{job_payload, FakeGitlab};
use e2e::gitlab_serve::{assert_serve_clean, config, trace, Serve, TOKEN};
use e2e::private_cache;
use serde_json::json;

/// One job: a cold networked boot, `apt-get update`, and installing Python and pytest under
/// TCG (about two minutes on a quiet machine; a loaded one takes longer).
const PYTEST_JOB_DEADLINE: Duration = Duration::from_secs(900);

/// The job's script, as a user would write it in `.gitlab-ci.yml`. apt keeps its downloads
/// in the workspace (`.apt/`), which `cache:paths` saves and restores.
const SCRIPT: &[&str] = &[
    "mkdir -p .apt/partial",
    "echo \"Dir::Cache::Archives \\\"$CI_PROJECT_DIR/.apt\\\";\" > /etc/apt/apt.conf.d/90cache",
    "printf 'def test_adds():\\n    assert 1 + 1 == 2\\n\\ndef test_joins():\\n    assert \"-\".join(\"ab\") == \"a-b\"\\n' > test_sample.py",
    "apt-get update -q",
    "apt-get install -y -q python3-pytest && python3 -m pytest --junitxml=report.xml",
];

#[test]
fn an_apt_and_pytest_job_passes_through_the_proxy_and_the_next_job_reuses_its_cache() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    // The operator's three settings: the network ceiling, the allowlist (default: the
    // image's mirror), the cache bound.
    let cfg = format!(
        "{}network = \"proxy\"\ncache_max_size = \"1G\"\n",
        config(&gl.url)
    );
    let _serve = Serve::start(cache.path(), &cfg);
    let run = |id: u64| {
        let mut job = job_payload(
            id,
            SCRIPT,
            &[],
            &[
                ("GIT_STRATEGY", "none", false),
                ("RUNNER_NETWORK", "proxy", false),
            ],
            PYTEST_JOB_DEADLINE.as_secs(),
        );
        job["cache"] = json!([{"key": "apt-non_protected", "untracked": false,
            "policy": "pull-push", "paths": [".apt/*.deb"], "when": "on_success",
            "fallback_keys": []}]);
        job["artifacts"] = json!([{"name": "junit", "untracked": false,
            "paths": ["report.xml"], "when": "always", "artifact_type": "junit",
            "artifact_format": "gzip", "expire_in": "1 week"}]);
        let started = Instant::now();
        gl.enqueue(job);
        let j = gl.wait_final(id, PYTEST_JOB_DEADLINE);
        let log = trace(&j);
        eprintln!("job {id}: {:.1} s", started.elapsed().as_secs_f64());
        assert_eq!(
            j.final_update.as_ref().unwrap()["state"],
            "success",
            "{id}: {log}"
        );
        let junit = j
            .artifacts
            .iter()
            .find(|a| a.query.get("artifact_type").map(String::as_str) == Some("junit"))
            .unwrap_or_else(|| panic!("{id}: no junit upload\n{log}"));
        let mut xml = String::new();
        flate2::read::MultiGzDecoder::new(&junit.data[..])
            .read_to_string(&mut xml)
            .unwrap();
        // pytest's own report: both tests, none failed.
        assert!(
            xml.contains("test_adds") && xml.contains("test_joins"),
            "{xml}"
        );
        assert!(xml.contains("failures=\"0\""), "{xml}");
        log
    };
    // Downloaded from the mirror by apt, through the proxy: a `Get:` line per package.
    let downloaded = |log: &str| {
        log.lines()
            .any(|l| l.starts_with("Get:") && l.contains(" python3-pytest "))
    };

    let first = run(1601);
    assert!(first.contains("no cache for apt-non_protected"), "{first}");
    assert!(downloaded(&first), "{first}");
    assert!(first.contains("Created cache apt-non_protected"), "{first}");
    assert!(!first.contains("the proxy denied"), "{first}");

    let second = run(1602);
    assert!(
        second.contains("Successfully extracted cache apt-non_protected"),
        "{second}"
    );
    assert!(!downloaded(&second), "apt downloaded again: {second}");
    assert_eq!(gl.violations(), Vec::<String>::new());
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}
