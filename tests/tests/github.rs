//! `runner serve` as a GitHub App, end to end: the real binary receives signed webhooks,
//! clones local git repositories, runs their suites in real riscv64 VMs and reports check
//! runs to a fake GitHub API (tests/src/fake_github.rs) that checks every request's shape.
//! The App's RSA key is generated per test with `openssl genrsa`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::fake_github::{CheckRun, Failure, FakeGithub};
use e2e::{assert_nothing_left, private_cache, runner_bin, runner_with_cache};
use hmac::{Hmac, Mac};
use serde_json::json;
use sha2::Sha256;

const APP_ID: u64 = 4242;
const INSTALLATION: u64 = 77;
const SECRET: &str = "test webhook secret";
/// Deadline for a suite's check run to complete in a VM (boot, steps, results, reporting).
const VM_RUN_DEADLINE: Duration = Duration::from_secs(8 * 60);
/// Deadline for check runs that need no VM (clone, parse, report, retries).
const FAST_DEADLINE: Duration = Duration::from_secs(60);
/// Deadline for the server to start or to exit after a signal.
const PROCESS_DEADLINE: Duration = Duration::from_secs(60);

/// The App's key pair, made for this test.
struct Keys {
    dir: tempfile::TempDir,
    public_pem: Vec<u8>,
}

impl Keys {
    fn new() -> Keys {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("app.pem");
        // -traditional: the PKCS#1 form GitHub hands out for App keys.
        let ok = Command::new("openssl")
            .args(["genrsa", "-traditional", "-out"])
            .arg(&key)
            .arg("2048")
            .stderr(Stdio::null())
            .status()
            .expect("openssl (scripts/setup-host installs it)")
            .success();
        assert!(ok, "openssl genrsa failed");
        let out = Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&key)
            .stderr(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success());
        std::fs::write(dir.path().join("secret"), format!("{SECRET}\n")).unwrap();
        Keys {
            dir,
            public_pem: out.stdout,
        }
    }

    fn private_key(&self) -> PathBuf {
        self.dir.path().join("app.pem")
    }
}

/// A running `runner serve` and what it logged.
struct Serve {
    child: Child,
    log: Arc<Mutex<String>>,
    addr: String,
}

impl Serve {
    fn start(keys: &Keys, fake: &FakeGithub, cache: &Path, extra: &str) -> Serve {
        let config = keys.dir.path().join("serve.toml");
        std::fs::write(
            &config,
            format!(
                r#"concurrent = 1
shutdown_timeout = 60
[github]
listen = "127.0.0.1:0"
app_id = {APP_ID}
private_key_path = "{}"
webhook_secret_file = "{}"
api_url = "{}"
arch = ["riscv64"]
git_protocols = ["file"]
{extra}
"#,
                keys.private_key().display(),
                keys.dir.path().join("secret").display(),
                fake.url
            ),
        )
        .unwrap();
        let mut child = Command::new(runner_bin())
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUNNER_CACHE_DIR", cache)
            .env("RUNNER_LOG", "info,runner=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("runner serve");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut l = sink.lock().unwrap();
                l.push_str(&strip_ansi(&line));
                l.push('\n');
            }
        });
        let deadline = Instant::now() + PROCESS_DEADLINE;
        let addr = loop {
            let text = log.lock().unwrap().clone();
            if let Some(addr) = text
                .lines()
                .find(|l| l.contains("webhook server listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|rest| rest.split_whitespace().next())
            {
                break addr.to_string();
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("runner serve exited ({status}) before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "runner serve did not start:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        Serve { child, log, addr }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// POSTs a webhook; returns the status code and body.
    fn post(&self, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
        let mut stream = std::net::TcpStream::connect(&self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut req = format!(
            "POST /github/webhook HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
            self.addr,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        stream.write_all(req.as_bytes()).unwrap();
        // A server refusing a body may answer and close before reading all of it.
        let _ = stream.write_all(body);
        let mut response = Vec::new();
        let _ = stream.take(1 << 20).read_to_end(&mut response);
        let text = String::from_utf8_lossy(&response).into_owned();
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        (code, body)
    }

    /// Sends only the headers of a POST whose body would be `length` bytes; returns the
    /// status the server answers with before reading any of it.
    fn post_announcing(&self, length: usize) -> u16 {
        let mut stream = std::net::TcpStream::connect(&self.addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let req = format!(
            "POST /github/webhook HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nX-Hub-Signature-256: sha256=00\r\nConnection: close\r\n\r\n",
            self.addr
        );
        stream.write_all(req.as_bytes()).unwrap();
        let mut response = Vec::new();
        let _ = stream.take(1 << 20).read_to_end(&mut response);
        let text = String::from_utf8_lossy(&response);
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    /// Sends a correctly signed delivery of `event`.
    fn deliver(&self, event: &str, delivery: &str, body: &serde_json::Value) -> (u16, String) {
        let body = body.to_string();
        self.post(
            &[
                ("X-GitHub-Event", event.into()),
                ("X-GitHub-Delivery", delivery.into()),
                (
                    "X-Hub-Signature-256",
                    sign(SECRET.as_bytes(), body.as_bytes()),
                ),
            ],
            body.as_bytes(),
        )
    }

    fn signal(&self, signal: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }

    /// Sends `signal` and waits for the process to exit; returns its exit code.
    fn stop(self, signal: &str) -> (i32, String) {
        self.signal(signal);
        self.wait_exit(signal)
    }

    fn wait_exit(mut self, signal: &str) -> (i32, String) {
        let deadline = Instant::now() + PROCESS_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader thread take the last lines.
                let log_deadline = Instant::now() + Duration::from_secs(5);
                while !self.log().contains("all services stopped") && Instant::now() < log_deadline
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                return (status.code().unwrap_or(-1), self.log());
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "runner serve did not exit after SIG{signal}:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A git repository with `files` in one commit; returns it and the commit's SHA.
fn git_repo(files: &[(&str, &str)]) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=Test", "-c", "user.email=test@example.com"])
            .args(["-c", "init.defaultBranch=main"])
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    git(&["init", "-q"]);
    if files.is_empty() {
        git(&["commit", "-q", "--allow-empty", "-m", "empty"]);
    } else {
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", "test commit"]);
    }
    let sha = git(&["rev-parse", "HEAD"]).trim().to_string();
    (dir, sha)
}

/// Adds a commit with `files` that only `refs/pull/N/head` reaches (the base repository's
/// branches stay where they were); returns its SHA.
fn pull_head(repo: &Path, number: u32, files: &[(&str, &str)]) -> String {
    let git = |args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=Fork", "-c", "user.email=fork@example.com"])
            .args(args)
            .current_dir(repo)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    git(&["checkout", "-q", "-b", "fork-work"]);
    for (path, text) in files {
        std::fs::write(repo.join(path), text).unwrap();
    }
    git(&["commit", "-q", "-am", "fork change"]);
    let sha = git(&["rev-parse", "HEAD"]);
    git(&["update-ref", &format!("refs/pull/{number}/head"), &sha]);
    git(&["checkout", "-q", "main"]);
    git(&["branch", "-q", "-D", "fork-work"]);
    sha
}

fn repository(name: &str, clone_url: &str) -> serde_json::Value {
    json!({"id": 1, "name": name, "full_name": format!("octo/{name}"), "private": false,
           "owner": {"login": "octo", "id": 2}, "clone_url": clone_url})
}

fn check_suite(name: &str, clone_url: &str, sha: &str) -> serde_json::Value {
    json!({"action": "requested",
           "check_suite": {"id": 9, "head_sha": sha, "head_branch": "main", "pull_requests": []},
           "repository": repository(name, clone_url),
           "installation": {"id": INSTALLATION}})
}

fn completed(runs: &[CheckRun], n: usize) -> bool {
    runs.len() >= n && runs.iter().all(|r| r.status() == "completed")
}

fn by_name<'a>(runs: &'a [CheckRun], name: &str) -> Vec<&'a CheckRun> {
    runs.iter().filter(|r| r.name == name).collect()
}

// ---------------------------------------------------------------------------------------------
// Real VMs.

/// A shell "test framework": two checks, the second deliberately wrong, reported as JUnit
/// with the file and line of each check.
const CALC_SH: &str = r#"#!/bin/sh
check_add() { [ $((2 + 2)) -eq 4 ]; }
check_mul() { [ $((2 * 2)) -eq 5 ]; }
mkdir -p reports
{
  echo '<testsuite name="calc" tests="2">'
  if check_add; then echo '<testcase classname="calc" name="adds" file="tests/calc.sh" line="2" time="0.01"/>'; fi
  if check_mul; then echo '<testcase classname="calc" name="multiplies" file="tests/calc.sh" line="3"/>'
  else echo '<testcase classname="calc" name="multiplies" file="tests/calc.sh" line="3" time="0.02"><failure message="expected 2 * 2 to be 5">calc.sh: 4 != 5</failure></testcase>'; fails=1; fi
  echo '</testsuite>'
} > reports/calc.xml
echo "calc: ${fails:-0} failure(s) on $(uname -m)"
exit ${fails:-0}
"#;

const VM_SUITE: &str = r#"[defaults]
arch = ["riscv64"]

[[suite]]
name = "smoke"

  [[suite.step]]
  name = "uname"
  run = "uname -m; test $(uname -m) = riscv64"

[[suite]]
name = "unit"
junit = ["reports/*.xml"]

  [[suite.step]]
  name = "calc"
  run = "sh tests/calc.sh"

[[suite]]
name = "many"
junit = ["many.xml"]

  [[suite.step]]
  name = "generate"
  run = '''
{ echo '<testsuite name="many">'
  for i in $(seq 1 120); do echo "<testcase name=\"t$i\"><failure message=\"failure $i\"/></testcase>"; done
  echo '</testsuite>'; } > many.xml
exit 1
'''
"#;

#[test]
fn check_suite_runs_each_suite_in_a_vm_and_reports_check_runs() {
    let keys = Keys::new();
    let fake = FakeGithub::start(APP_ID, &keys.public_pem);
    let cache = private_cache();
    let (repo, sha) = git_repo(&[("runner.toml", VM_SUITE), ("tests/calc.sh", CALC_SH)]);
    let serve = Serve::start(&keys, &fake, cache.path(), "");
    let url = repo.path().display().to_string();

    let t0 = Instant::now();
    // GitHub hiccups on the first update; it is retried.
    fake.inject("PATCH", "/repos/octo/demo/", &[Failure::ServerError]);
    let (code, _) = serve.deliver("check_suite", "vm-1", &check_suite("demo", &url, &sha));
    let answered = t0.elapsed();
    assert_eq!(code, 202, "{}", serve.log());
    assert!(
        answered < Duration::from_secs(1),
        "answered after {answered:?}"
    );

    let (runs, ok) = fake.wait_for(VM_RUN_DEADLINE, |r| completed(r, 3));
    assert!(
        ok,
        "check runs did not complete: {runs:#?}\n{}",
        serve.log()
    );
    eprintln!(
        "webhook answered in {answered:?}; three suites reported in {:?}",
        t0.elapsed()
    );
    assert_eq!(runs.len(), 3, "{runs:#?}");
    for r in &runs {
        // Queued on receipt, in progress once the VM booted, then completed.
        assert_eq!(r.statuses, ["queued", "in_progress", "completed"], "{r:#?}");
        assert!(r.started_at.is_some() && r.completed_at.is_some(), "{r:#?}");
        assert_eq!(r.head_sha, sha);
        assert_eq!(r.repo, "octo/demo");
        let s = r.summary();
        for frag in [
            "| architecture | riscv64 |",
            "| image | debian-13 |",
            "| accelerator |",
            "| QEMU | 10.",
        ] {
            assert!(s.contains(frag), "{frag:?} not in summary:\n{s}");
        }
    }
    let smoke = by_name(&runs, "runner / smoke (riscv64)")[0];
    assert_eq!(smoke.conclusion.as_deref(), Some("success"), "{smoke:#?}");
    assert_eq!(smoke.external_id.as_deref(), Some("smoke/riscv64"));
    assert!(smoke.annotations.is_empty(), "{smoke:#?}");
    assert!(
        smoke.output["text"]
            .as_str()
            .unwrap_or("")
            .contains("riscv64"),
        "{smoke:#?}"
    );

    let unit = by_name(&runs, "runner / unit (riscv64)")[0];
    assert_eq!(unit.conclusion.as_deref(), Some("failure"), "{unit:#?}");
    assert!(
        unit.title().contains("1 of 2 tests failed"),
        "{}",
        unit.title()
    );
    // The failing test is annotated where its report says; the failing step on runner.toml.
    let test_note = unit
        .annotations
        .iter()
        .find(|a| a["path"] == "tests/calc.sh")
        .unwrap_or_else(|| panic!("no annotation on tests/calc.sh: {unit:#?}"));
    assert_eq!(test_note["start_line"], 3);
    assert_eq!(test_note["annotation_level"], "failure");
    assert_eq!(test_note["message"], "expected 2 * 2 to be 5");
    let step_note = unit
        .annotations
        .iter()
        .find(|a| a["path"] == "runner.toml")
        .unwrap_or_else(|| panic!("no annotation on runner.toml: {unit:#?}"));
    assert_eq!(
        step_note["start_line"], 16,
        "the step's name line: {step_note}"
    );
    assert!(unit
        .summary()
        .contains("`calc.multiplies` — expected 2 * 2 to be 5"));
    assert!(unit.output["text"]
        .as_str()
        .unwrap_or("")
        .contains("calc: 1 failure(s) on riscv64"));

    // 120 failing tests and the failing step: 121 annotations, 50 per request at most, and
    // the check run completed only with the last batch.
    let many = by_name(&runs, "runner / many (riscv64)")[0];
    assert_eq!(many.annotations.len(), 121, "{:?}", many.annotation_batches);
    assert_eq!(many.annotation_batches, [50, 50, 21]);
    assert!(
        many.title().contains("120 of 120 tests failed"),
        "{}",
        many.title()
    );

    // Re-requesting the failed check run runs that suite × arch again, and only that one.
    let rerun = json!({"action": "rerequested",
        "check_run": {"id": unit.id, "head_sha": sha, "name": unit.name, "external_id": "unit/riscv64"},
        "repository": repository("demo", &url), "installation": {"id": INSTALLATION}});
    let (code, _) = serve.deliver("check_run", "vm-2", &rerun);
    assert_eq!(code, 202);
    let (runs, ok) = fake.wait_for(VM_RUN_DEADLINE, |r| completed(r, 4));
    assert!(ok, "re-run did not complete: {runs:#?}\n{}", serve.log());
    assert_eq!(
        by_name(&runs, "runner / unit (riscv64)").len(),
        2,
        "{runs:#?}"
    );
    assert_eq!(
        by_name(&runs, "runner / smoke (riscv64)").len(),
        1,
        "{runs:#?}"
    );
    assert_eq!(runs.len(), 4, "{runs:#?}");
    assert_eq!(runs[3].name, "runner / unit (riscv64)");
    assert_eq!(runs[3].conclusion.as_deref(), Some("failure"));
    // The injected 502 was retried.
    assert_eq!(fake.requests().iter().filter(|r| r.status == 0).count(), 1);

    // One token served every call (cached), and every request had the right shape.
    let token_requests = fake
        .requests()
        .iter()
        .filter(|r| r.path.ends_with("/access_tokens"))
        .count();
    assert_eq!(token_requests, 1, "{:#?}", fake.requests());
    assert_eq!(fake.violations(), Vec::<String>::new());

    let (code, log) = serve.stop("TERM");
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("FINAL RESULT NOT DELIVERED"), "{log}");
    assert_nothing_left(cache.path());
    let leftovers: Vec<_> = std::fs::read_dir(cache.path().join("github"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "checkouts left: {leftovers:?}");
}

#[test]
fn sigterm_cancels_a_running_suite_and_reports_it_cancelled() {
    let keys = Keys::new();
    let fake = FakeGithub::start(APP_ID, &keys.public_pem);
    let cache = private_cache();
    let suite = r#"[[suite]]
name = "slow"
  [[suite.step]]
  name = "wait"
  run = "echo started; sleep 600"
"#;
    let (repo, sha) = git_repo(&[("runner.toml", suite)]);
    let serve = Serve::start(&keys, &fake, cache.path(), "");
    let url = repo.path().display().to_string();
    let (code, _) = serve.deliver("check_suite", "slow-1", &check_suite("slow", &url, &sha));
    assert_eq!(code, 202);
    let (runs, ok) = fake.wait_for(VM_RUN_DEADLINE, |r| {
        r.len() == 1 && r[0].status() == "in_progress"
    });
    assert!(ok, "never in progress: {runs:#?}\n{}", serve.log());

    let (code, log) = serve.stop("TERM");
    assert_eq!(code, 0, "{log}");
    let runs = fake.check_runs();
    assert_eq!(
        runs[0].statuses,
        ["queued", "in_progress", "completed"],
        "{runs:#?}"
    );
    assert_eq!(
        runs[0].conclusion.as_deref(),
        Some("cancelled"),
        "{runs:#?}"
    );
    assert!(runs[0].title().contains("cancelled"), "{}", runs[0].title());
    assert_eq!(fake.violations(), Vec::<String>::new());
    assert_nothing_left(cache.path());
}

// ---------------------------------------------------------------------------------------------
// Bad input: no VM needed.

#[test]
fn unsigned_or_tampered_webhooks_get_401_and_nothing_happens() {
    let keys = Keys::new();
    let fake = FakeGithub::start(APP_ID, &keys.public_pem);
    let cache = private_cache();
    let serve = Serve::start(&keys, &fake, cache.path(), "max_body_size = \"1M\"");
    let (_repo, sha) = git_repo(&[("runner.toml", VM_SUITE)]);
    let body = check_suite("demo", "/nonexistent", &sha).to_string();
    let good = sign(SECRET.as_bytes(), body.as_bytes());
    let headers = |sig: Option<String>| {
        let mut h = vec![
            ("X-GitHub-Event", "check_suite".to_string()),
            ("X-GitHub-Delivery", "d-1".to_string()),
        ];
        if let Some(s) = sig {
            h.push(("X-Hub-Signature-256", s));
        }
        h
    };
    let tampered = body.replace("requested", "rerequested");
    // (case, headers, body)
    let cases = [
        ("unsigned", headers(None), body.clone()),
        ("tampered body", headers(Some(good.clone())), tampered),
        (
            "wrong secret",
            headers(Some(sign(b"guess", body.as_bytes()))),
            body.clone(),
        ),
        (
            "sha1 header only",
            headers(Some("sha1=00".into())),
            body.clone(),
        ),
    ];
    for (case, h, b) in cases {
        let (code, _) = serve.post(&h, b.as_bytes());
        assert_eq!(code, 401, "{case}");
    }
    // Events we do not handle, and ping: 2xx, nothing else.
    let (code, text) = serve.deliver("star", "d-2", &json!({"action": "created"}));
    assert_eq!((code, text.as_str()), (200, "ignored\n"));
    let (code, text) = serve.deliver("ping", "d-3", &json!({"zen": "Keep it logically awesome."}));
    assert_eq!((code, text.as_str()), (200, "pong\n"));
    // A known event with a payload missing what we need: 400.
    let (code, _) = serve.deliver("check_suite", "d-4", &json!({"action": "requested"}));
    assert_eq!(code, 400);
    // A body over the cap is refused before anyone reads it.
    // (Announced, not sent: a server that answers mid-upload may reset the connection and
    // lose its own answer, which would make this test flaky rather than the server wrong.)
    assert_eq!(serve.post_announcing(2 << 20), 413);

    // The server keeps serving, and not one API call was made.
    let (code, _) = serve.deliver("ping", "d-5", &json!({}));
    assert_eq!(code, 200);
    assert!(fake.requests().is_empty(), "{:#?}", fake.requests());
    let log = serve.log();
    assert!(log.contains("bad signature"), "{log}");
    drop(serve);
    assert_nothing_left(cache.path());
}

#[test]
fn bad_repositories_get_one_check_run_that_says_why() {
    let keys = Keys::new();
    let fake = FakeGithub::start(APP_ID, &keys.public_pem);
    let cache = private_cache();
    // GitHub misbehaves first: a 502 on the token, rate limits on the first check run.
    fake.inject("POST", "/app/installations/", &[Failure::ServerError]);
    fake.inject(
        "POST",
        "/repos/octo/",
        &[Failure::RetryAfter(1), Failure::RateLimitReset(1)],
    );
    let serve = Serve::start(&keys, &fake, cache.path(), "");

    // 1. No runner.toml: one neutral check run that says how to add one.
    let (empty, sha) = git_repo(&[("README", "hello\n")]);
    let url = empty.path().display().to_string();
    let (code, _) = serve.deliver("check_suite", "bad-1", &check_suite("empty", &url, &sha));
    assert_eq!(code, 202);
    let (runs, ok) = fake.wait_for(FAST_DEADLINE, |r| completed(r, 1));
    assert!(ok, "{runs:#?}\n{}", serve.log());
    let r = &runs[0];
    assert_eq!(r.conclusion.as_deref(), Some("neutral"), "{r:#?}");
    assert_eq!(r.statuses, ["completed"]);
    assert!(r.title().contains("No runner.toml"), "{}", r.title());
    assert!(r.summary().contains("[[suite]]"), "{}", r.summary());
    // The same delivery again (a redelivery) is ignored.
    let (code, text) = serve.deliver("check_suite", "bad-1", &check_suite("empty", &url, &sha));
    assert_eq!((code, text.as_str()), (200, "duplicate delivery ignored\n"));

    // 2. A malformed runner.toml: a failure with the parse error on its line.
    let malformed = "[[suite]]\nname = \"unit\"\n\n  [[suite.step]]\n  name = \"t\"\n  run = \"true\"\n  timeout = 5\n";
    let (bad, sha2) = git_repo(&[("runner.toml", malformed)]);
    let url2 = bad.path().display().to_string();
    let (code, _) = serve.deliver("check_suite", "bad-2", &check_suite("bad", &url2, &sha2));
    assert_eq!(code, 202);

    // 3. host_setup is refused by default (it would run on the host, outside any VM).
    let host = "[[suite]]\nname = \"cross\"\nhost_setup = [\"make\"]\n  [[suite.step]]\n  name = \"t\"\n  run = \"true\"\n";
    let (hs, sha3) = git_repo(&[("runner.toml", host)]);
    let url3 = hs.path().display().to_string();
    let (code, _) = serve.deliver(
        "check_suite",
        "bad-3",
        &check_suite("hostsetup", &url3, &sha3),
    );
    assert_eq!(code, 202);

    // 4. A clone that fails: an infrastructure failure that says so.
    let missing = cache.path().join("no-such-repo").display().to_string();
    let (code, _) = serve.deliver("check_suite", "bad-4", &check_suite("gone", &missing, &sha));
    assert_eq!(code, 202);

    // 5. A pull request from a fork: its head exists only under refs/pull/N/head of the base
    // repository (no branch reaches it), as on GitHub.
    let (base, base_sha) = git_repo(&[("README", "base\n")]);
    let fork_sha = pull_head(base.path(), 5, &[("README", "from a fork\n")]);
    assert_ne!(fork_sha, base_sha);
    let base_url = base.path().display().to_string();
    let pr = json!({"action": "opened", "number": 5,
        "pull_request": {"number": 5, "head": {"sha": fork_sha, "ref": "feature",
                         "repo": repository("fork-of-base", "/elsewhere")}},
        "repository": repository("base", &base_url), "installation": {"id": INSTALLATION}});
    let (code, _) = serve.deliver("pull_request", "bad-5", &pr);
    assert_eq!(code, 202);
    // The same pull request from a branch of the base repository is left to its check suite.
    let mut same = pr.clone();
    same["pull_request"]["head"]["repo"] = repository("base", &base_url);
    let (code, text) = serve.deliver("pull_request", "bad-6", &same);
    assert_eq!((code, text.as_str()), (200, "ignored\n"));

    // 6. The repository's own image recipe: a service never builds one on its host (it
    // would run mmdebstrap as the service user with the repository's mirror and packages).
    let evil_toml =
        "name = 'evil'\ndistribution = 'trixie'\nmirror = 'http://127.0.0.1:9/debian'\n";
    let evil_suite = "[defaults]\narch = ['riscv64']\nimage = 'evil'\n[[suite]]\nname = 'own-image'\n  [[suite.step]]\n  name = 't'\n  run = 'true'\n";
    let (evil, sha6) = git_repo(&[("runner.toml", evil_suite), ("images/evil.toml", evil_toml)]);
    let url6 = evil.path().display().to_string();
    let (code, _) = serve.deliver("check_suite", "bad-7", &check_suite("evil", &url6, &sha6));
    assert_eq!(code, 202);

    let (runs, ok) = fake.wait_for(FAST_DEADLINE, |r| completed(r, 6));
    assert!(ok, "{runs:#?}\n{}", serve.log());
    assert_eq!(runs.len(), 6, "the duplicate must not have run: {runs:#?}");
    let r = runs.iter().find(|r| r.repo == "octo/evil").unwrap();
    assert_eq!(r.conclusion.as_deref(), Some("failure"), "{r:#?}");
    assert!(
        // Refused before any lookup: the image is not one the operator allows.
        r.summary().contains(
            "image = evil is not allowed on this service (allowed: debian-13, debian-12)"
        ),
        "{}",
        r.summary()
    );
    let builders = e2e::processes_using("127.0.0.1:9/debian");
    assert!(builders.is_empty(), "{builders:?}");
    let r = runs.iter().find(|r| r.repo == "octo/base").unwrap();
    assert_eq!(r.head_sha, fork_sha);
    assert_eq!(r.conclusion.as_deref(), Some("neutral"), "{r:#?}");
    let of = |repo: &str| {
        runs.iter()
            .find(|r| r.repo == format!("octo/{repo}"))
            .unwrap()
    };

    let r = of("bad");
    assert_eq!(r.conclusion.as_deref(), Some("failure"), "{r:#?}");
    assert_eq!(r.name, "runner / runner.toml");
    assert_eq!(r.annotations.len(), 1, "{r:#?}");
    let a = &r.annotations[0];
    assert_eq!(
        (a["path"].as_str(), a["start_line"].as_u64()),
        (Some("runner.toml"), Some(7))
    );
    let msg = a["message"].as_str().unwrap();
    assert!(msg.starts_with("runner.toml:7:"), "{msg}");
    assert!(r.summary().contains("runner.toml:7:"), "{}", r.summary());

    let r = of("hostsetup");
    assert_eq!(r.conclusion.as_deref(), Some("failure"), "{r:#?}");
    assert!(
        r.annotations[0]["message"]
            .as_str()
            .unwrap()
            .contains("host_setup"),
        "{r:#?}"
    );
    assert_eq!(r.annotations[0]["start_line"], 2, "{r:#?}");

    let r = of("gone");
    assert_eq!(r.conclusion.as_deref(), Some("failure"), "{r:#?}");
    assert!(
        r.title().starts_with("infrastructure error"),
        "{}",
        r.title()
    );
    assert!(r.summary().contains("git"), "{}", r.summary());

    // The injected failures were retried, not dropped.
    let injected = fake.requests().iter().filter(|r| r.status == 0).count();
    assert_eq!(injected, 3, "{:#?}", fake.requests());
    assert_eq!(fake.violations(), Vec::<String>::new());
    let (code, log) = serve.stop("TERM");
    assert_eq!(code, 0, "{log}");
    assert!(!log.contains("FINAL RESULT NOT DELIVERED"), "{log}");
    assert_nothing_left(cache.path());
}

#[test]
fn a_refused_token_is_renewed_and_the_call_retried() {
    let keys = Keys::new();
    let fake = FakeGithub::start(APP_ID, &keys.public_pem);
    let cache = private_cache();
    // GitHub refuses the first check-run call's token (revoked, expired early) and forgets it.
    fake.inject("POST", "/repos/octo/", &[Failure::Unauthorized]);
    let serve = Serve::start(&keys, &fake, cache.path(), "");
    // A repository without runner.toml: one check run, no VM.
    let (empty, sha) = git_repo(&[("README", "hello\n")]);
    let url = empty.path().display().to_string();
    let (code, _) = serve.deliver("check_suite", "renew-1", &check_suite("empty", &url, &sha));
    assert_eq!(code, 202);
    let (runs, ok) = fake.wait_for(FAST_DEADLINE, |r| completed(r, 1));
    assert!(ok, "{runs:#?}\n{}", serve.log());
    assert_eq!(runs[0].conclusion.as_deref(), Some("neutral"), "{runs:#?}");
    let requests = fake.requests();
    let tokens: Vec<_> = requests
        .iter()
        .filter(|r| r.path.ends_with("/access_tokens"))
        .collect();
    assert_eq!(tokens.len(), 2, "one token, then a new one: {requests:#?}");
    let creates: Vec<_> = requests
        .iter()
        .filter(|r| r.method == "POST" && r.path == "/repos/octo/empty/check-runs")
        .collect();
    assert_eq!(
        creates.len(),
        2,
        "refused once, then retried: {requests:#?}"
    );
    assert_ne!(
        creates[0].authorization,
        creates[1].authorization,
        "{requests:#?}\n{}",
        serve.log()
    );
    // Nothing was sent with the revoked token after the 401.
    assert_eq!(fake.violations(), Vec::<String>::new());
    let (code, log) = serve.stop("TERM");
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("token refused; fetching a new one"), "{log}");
}

#[test]
fn sigquit_drains_new_deliveries_get_503_accepted_ones_finish() {
    let keys = Keys::new();
    let fake = FakeGithub::start(APP_ID, &keys.public_pem);
    let cache = private_cache();
    // GitHub keeps the accepted job busy for a while: two secondary rate limits in a row.
    fake.inject(
        "POST",
        "/repos/octo/",
        &[Failure::RetryAfter(2), Failure::RetryAfter(2)],
    );
    let serve = Serve::start(&keys, &fake, cache.path(), "");
    let (empty, sha) = git_repo(&[("README", "hello\n")]);
    let url = empty.path().display().to_string();
    let (code, _) = serve.deliver("check_suite", "drain-1", &check_suite("empty", &url, &sha));
    assert_eq!(code, 202);
    // Wait until the job is inside its retries, then drain.
    let deadline = Instant::now() + FAST_DEADLINE;
    while !fake
        .requests()
        .iter()
        .any(|r| r.path.ends_with("/check-runs"))
    {
        assert!(Instant::now() < deadline, "{}", serve.log());
        std::thread::sleep(Duration::from_millis(20));
    }
    serve.signal("QUIT");
    let deadline = Instant::now() + FAST_DEADLINE;
    let mut attempt = 0;
    let refused = loop {
        attempt += 1;
        let id = format!("drain-2-{attempt}");
        let (code, text) = serve.deliver("check_suite", &id, &check_suite("empty", &url, &sha));
        if code == 503 {
            break text;
        }
        // Until the signal is handled the delivery is still taken; it then finishes too.
        assert_eq!(code, 202);
        assert!(Instant::now() < deadline, "{}", serve.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(refused, "shutting down\n");
    let (code, log) = serve.wait_exit("QUIT");
    assert_eq!(code, 0, "{log}");
    // The accepted delivery was reported before the process exited.
    let runs = fake.check_runs();
    assert!(
        !runs.is_empty()
            && runs
                .iter()
                .all(|r| r.conclusion.as_deref() == Some("neutral")),
        "{runs:#?}\n{log}"
    );
    assert_eq!(fake.violations(), Vec::<String>::new());
    assert_nothing_left(cache.path());
}

#[test]
fn unusable_configs_are_refused_at_start_with_one_line() {
    let keys = Keys::new();
    let cache = private_cache();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let key = keys.private_key().display().to_string();
    // (config [github] body, exit code, fragment of the error line)
    let cases = [
        (
            format!("listen = \"127.0.0.1:0\"\napp_id = 1\nprivate_key_path = \"{key}\""),
            78,
            "needs webhook_secret or webhook_secret_file",
        ),
        (
            format!("listen = \"127.0.0.1:0\"\napp_id = 1\nprivate_key_path = \"{key}.missing\"\nwebhook_secret = \"s\""),
            78,
            "cannot read private_key_path",
        ),
        (
            format!("listen = \"127.0.0.1:0\"\napp_id = 1\nprivate_key_path = \"{key}\"\nwebhook_secret_file = \"/nonexistent/secret\""),
            78,
            "cannot read webhook_secret_file /nonexistent/secret",
        ),
        (
            format!("listen = \"127.0.0.1:{port}\"\napp_id = 1\nprivate_key_path = \"{key}\"\nwebhook_secret = \"s\""),
            69,
            &format!("cannot listen on 127.0.0.1:{port}"),
        ),
    ];
    for (body, code, frag) in cases {
        let config = keys.dir.path().join("bad.toml");
        std::fs::write(&config, format!("[github]\n{body}\n")).unwrap();
        let r = runner_with_cache(
            keys.dir.path(),
            &["serve", "--config", config.to_str().unwrap()],
            cache.path(),
        );
        assert_eq!(r.code, code, "{body}\n{r}");
        let line = r
            .stderr
            .lines()
            .find(|l| l.starts_with("runner: error: "))
            .unwrap_or_else(|| panic!("no error line: {r}"));
        assert!(line.contains(frag), "{frag:?} not in {line}");
    }
    drop(taken);
}

// ---------------------------------------------------------------------------------------------
// Attacks: a repository asking for more than the operator allows, a slow client.

/// A runner.toml of `n` one-step suites.
fn many_suites(n: usize) -> String {
    (0..n)
        .map(|i| {
            format!("[[suite]]\nname = \"s{i}\"\n[[suite.step]]\nname = \"t\"\nrun = \"true\"\n")
        })
        .collect()
}

#[test]
fn runner_toml_over_the_operators_limits_gets_a_failed_check_run_naming_the_cap() {
    let keys = Keys::new();
    let fake = FakeGithub::start(APP_ID, &keys.public_pem);
    let cache = private_cache();
    let serve = Serve::start(
        &keys,
        &fake,
        cache.path(),
        "[github.limits]\nmax_runs = 20\nmax_timeout = \"3h\"\n",
    );
    let step = "[[suite.step]]\nname = \"t\"\nrun = \"true\"\n";
    // (repository, runner.toml, what its check run must say)
    let cases = [
        ("memory", format!("[defaults]\nmemory = \"64G\"\n[[suite]]\nname = \"a\"\n{step}"), "suite 'a' memory = 64G is over this runner's limit max_memory = 4G"),
        ("cpus", format!("[defaults]\ncpus = 64\n[[suite]]\nname = \"a\"\n{step}"), "suite 'a' cpus = 64 is over this runner's limit max_cpus = 4"),
        // Once overflowed `Instant + Duration` and panicked the job's task.
        ("forever", format!("[[suite]]\nname = \"a\"\ntimeout = \"100y\"\n{step}"), "timeout '100y' is longer than 7 days"),
        ("long", format!("[[suite]]\nname = \"a\"\ntimeout = \"5h\"\n{step}"), "suite 'a' timeout = 5h is over this runner's limit max_timeout = 3h"),
        // Once meant 10,000 check runs and 10,000 VMs queued.
        ("many", many_suites(10_000), "suite × architecture runs for this commit = 10000 is over this runner's limit max_runs = 20"),
        ("huge", format!("[workspace]\nmax_size = \"64G\"\n[[suite]]\nname = \"a\"\n{step}"), "[workspace] max_size = 64G is over this runner's limit max_workspace_size = 1G"),
        // User mode runs the job's programs on this host's kernel: never for a repository.
        ("usermode", format!("[[suite]]\nname = \"a\"\nmode = \"user\"\n{step}"), "mode = \"user\" is not available on this service"),
    ];
    let mut repos = Vec::new();
    for (i, (name, toml, _)) in cases.iter().enumerate() {
        let (repo, sha) = git_repo(&[("runner.toml", toml)]);
        let url = repo.path().display().to_string();
        let (code, _) = serve.deliver(
            "check_suite",
            &format!("limit-{i}"),
            &check_suite(name, &url, &sha),
        );
        assert_eq!(code, 202);
        repos.push(repo);
    }
    let (runs, ok) = fake.wait_for(FAST_DEADLINE, |r| completed(r, cases.len()));
    assert!(ok, "{runs:#?}\n{}", serve.log());
    // One check run per commit: nothing was queued for the suites themselves.
    assert_eq!(runs.len(), cases.len(), "{runs:#?}");
    for (name, _, want) in &cases {
        let r = runs
            .iter()
            .find(|r| r.repo == format!("octo/{name}"))
            .unwrap();
        assert_eq!(r.conclusion.as_deref(), Some("failure"), "{name}: {r:#?}");
        assert!(r.summary().contains(want), "{name}: {}", r.summary());
    }
    // A client that sends its headers slowly is cut off (HEADER_READ_TIMEOUT, 10 s).
    let mut slow = std::net::TcpStream::connect(&serve.addr).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    slow.write_all(b"POST /github/webhook HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let mut rest = Vec::new();
    let closed = slow.read_to_end(&mut rest).is_ok();
    assert!(
        closed && started.elapsed() < Duration::from_secs(25),
        "a slow client kept its connection: {:?}",
        started.elapsed()
    );
    assert_eq!(fake.violations(), Vec::<String>::new());
    let (code, log) = serve.stop("TERM");
    assert_eq!(code, 0, "{log}");
    assert_nothing_left(cache.path());
}

// ---------------------------------------------------------------------------------------------
// Failure snapshots: kept by the service, served at a capability link.

/// A suite that fails with something to find in its VM, in a 1 GiB guest.
const SNAPSHOT_SUITE: &str = r#"[defaults]
arch = ["riscv64"]
memory = "1G"

[[suite]]
name = "keep"
keep_failed = true

  [[suite.step]]
  name = "break"
  run = "echo evidence-from-the-app > evidence.txt; exit 3"
"#;

/// GETs `path` from the server: the status, the headers (lower-case names) and the body.
fn get(addr: &str, path: &str) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).unwrap();
    let mut response = Vec::new();
    stream
        .take(512 << 20)
        .read_to_end(&mut response)
        .expect("the response");
    let end = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("headers");
    let head = String::from_utf8_lossy(&response[..end]).into_owned();
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (code, headers, response[end + 4..].to_vec())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

#[test]
fn a_failed_suite_with_keep_failed_is_served_at_a_link_that_runner_debug_resumes() {
    let keys = Keys::new();
    let fake = FakeGithub::start(APP_ID, &keys.public_pem);
    let cache = private_cache();
    let (repo, sha) = git_repo(&[("runner.toml", SNAPSHOT_SUITE)]);
    let serve = Serve::start(
        &keys,
        &fake,
        cache.path(),
        "failure_snapshots = { url = \"https://runner.example.com/\", keep = \"1h\", max_total = \"2G\" }",
    );
    let url = repo.path().display().to_string();
    let (code, _) = serve.deliver("check_suite", "snap-1", &check_suite("snap", &url, &sha));
    assert_eq!(code, 202, "{}", serve.log());
    let (runs, ok) = fake.wait_for(VM_RUN_DEADLINE, |r| completed(r, 1));
    assert!(ok, "{runs:#?}\n{}", serve.log());
    let run = &runs[0];
    assert_eq!(run.conclusion.as_deref(), Some("failure"), "{run:#?}");
    let summary = run.summary();
    // The summary ends with the commands; the link is the operator's URL and a 256-bit id.
    let prefix = "curl -fLo failed-vm.tar.gz https://runner.example.com/snapshots/";
    let curl = summary
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no download command in:\n{summary}\n{}", serve.log()));
    let name = &curl[prefix.len()..];
    let id = name.strip_suffix(".tar.gz").expect("NAME.tar.gz");
    assert!(
        id.len() == 64 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    assert!(
        summary.contains("secrets included; anyone with the link can download it"),
        "{summary}"
    );
    // The runner's note about the save is in the log, without the host's paths.
    let text = run.output["text"].as_str().unwrap_or("");
    assert!(
        text.contains("saved the failed VM (step 'break')"),
        "{text}"
    );
    assert!(
        !text.contains(&cache.path().display().to_string()),
        "{text}"
    );
    let tail = "mkdir -p keep-riscv64 && tar -xzf failed-vm.tar.gz -C keep-riscv64\nrunner images build --arch riscv64 debian-13\nrunner debug keep-riscv64/failed-vm\n```";
    assert!(summary.trim_end().ends_with(tail), "{summary}");

    // The link serves the packed snapshot, streamed with its length and type.
    let (code, headers, body) = get(&serve.addr, &format!("/snapshots/{name}"));
    assert_eq!(code, 200, "{headers:?}\n{}", serve.log());
    assert_eq!(header(&headers, "content-type"), Some("application/gzip"));
    assert_eq!(
        header(&headers, "content-length"),
        Some(body.len().to_string().as_str())
    );
    eprintln!(
        "kept failure snapshot of a 1 GiB riscv64 guest: {:.1} MiB compressed ({} bytes)",
        body.len() as f64 / f64::from(1 << 20),
        body.len()
    );
    // Unknown ids, other names and the directory itself: 404, nothing listed.
    let unknown = hex::encode([0x5au8; 32]);
    for path in [
        format!("/snapshots/{unknown}.tar.gz"),
        format!("/snapshots/{id}"),
        format!("/snapshots/{}.tar.gz", id.to_uppercase()),
        "/snapshots/".to_string(),
        "/snapshots/..%2f..%2fgithub".to_string(),
    ] {
        let (code, _, body) = get(&serve.addr, &path);
        assert_eq!(code, 404, "{path}: {}", String::from_utf8_lossy(&body));
        assert!(!String::from_utf8_lossy(&body).contains(id), "{path}");
    }

    // Elsewhere: the summary's commands, with the download done above.
    let elsewhere = tempfile::tempdir().unwrap();
    std::fs::write(elsewhere.path().join("failed-vm.tar.gz"), &body).unwrap();
    let unpack = summary
        .lines()
        .find(|l| l.starts_with("mkdir -p keep-riscv64"))
        .unwrap();
    let ok = Command::new("sh")
        .args(["-c", unpack])
        .current_dir(elsewhere.path())
        .status()
        .unwrap()
        .success();
    assert!(ok, "{unpack}");
    let debug = runner_with_cache(
        elsewhere.path(),
        &[
            "debug",
            "keep-riscv64/failed-vm",
            "-c",
            "cat evidence.txt; pwd",
        ],
        cache.path(),
    );
    assert_eq!(debug.code, 0, "{debug}");
    assert!(
        debug.stdout.contains("evidence-from-the-app\n/workspace"),
        "{debug}"
    );
    assert_eq!(fake.violations(), Vec::<String>::new());
    let (code, log) = serve.stop("TERM");
    assert_eq!(code, 0, "{log}");
    assert_nothing_left(cache.path());
}

#[test]
fn keep_failed_without_the_operators_setting_keeps_nothing_and_says_why() {
    let keys = Keys::new();
    let fake = FakeGithub::start(APP_ID, &keys.public_pem);
    let cache = private_cache();
    let (repo, sha) = git_repo(&[("runner.toml", SNAPSHOT_SUITE)]);
    let serve = Serve::start(&keys, &fake, cache.path(), "");
    let url = repo.path().display().to_string();
    let (code, _) = serve.deliver("check_suite", "snap-2", &check_suite("snap", &url, &sha));
    assert_eq!(code, 202, "{}", serve.log());
    let (runs, ok) = fake.wait_for(VM_RUN_DEADLINE, |r| completed(r, 1));
    assert!(ok, "{runs:#?}\n{}", serve.log());
    let run = &runs[0];
    assert_eq!(run.conclusion.as_deref(), Some("failure"), "{run:#?}");
    let summary = run.summary();
    assert!(
        summary.contains("`keep_failed = true` in runner.toml is ignored here")
            && summary.contains("has not set `failure_snapshots`"),
        "{summary}"
    );
    assert!(!summary.contains("curl"), "{summary}");
    // Nothing saved: no snapshot store, and the link route answers 404.
    assert!(!cache.path().join("github-snapshots").exists());
    let (code, _, _) = get(
        &serve.addr,
        &format!("/snapshots/{}.tar.gz", hex::encode([1u8; 32])),
    );
    assert_eq!(code, 404);
    let text = run.output["text"].as_str().unwrap_or("");
    assert!(text.contains("exit 3") || text.contains("break"), "{text}");
    assert!(!text.contains("saved the failed VM"), "{text}");
    let (code, log) = serve.stop("TERM");
    assert_eq!(code, 0, "{log}");
    assert_nothing_left(cache.path());
}
