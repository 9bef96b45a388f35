//! `runner serve` as a GitLab runner, end to end: the real binary against the fake GitLab
//! (a real HTTP server), jobs running in real riscv64 VMs. Every wait polls under a deadline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::fake_gitlab::{job_payload, zip_of, DependencyArtifact, FakeGitlab};
use e2e::gitlab_serve::{
    assert_serve_clean, config, trace, wait_requests, Serve, JOB_DEADLINE, TOKEN,
};
use e2e::private_cache;
use serde_json::json;

#[test]
fn job_runs_in_riscv64_streams_masked_log_uploads_junit_and_survives_outages() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let mut serve = Serve::start(cache.path(), &config(&gl.url));
    // Enqueue after the first (empty) poll, so the next request must carry last_update.
    wait_requests(&gl, 1);
    let secret = "Zq9Xk-unique-secret-77";
    let mut job = job_payload(
        101,
        &[
            "echo \"hello from $(uname -m) in $CI_PROJECT_DIR\"",
            "echo \"secret: $MY_SECRET\"",
            // The secret leaves the guest in two writes a second apart: two chunks.
            "printf 'split-%s' \"${MY_SECRET:0:8}\"; sleep 1.5; printf '%s-end\\n' \"${MY_SECRET:8}\"",
            "mkdir -p out && printf '<testsuite name=\"t\" tests=\"1\"><testcase classname=\"c\" name=\"guest_ok\"/></testsuite>' > out/report.xml",
            "echo data > out/data.txt",
            "sleep 2; echo done",
        ],
        &["echo after-script-ran"],
        &[
            ("MY_SECRET", secret, true),
            ("GIT_STRATEGY", "none", false),
            ("RUNNER_STEP_JUNIT", "true", false),
        ],
        600,
    );
    job["artifacts"] = json!([
        {"name": "junit", "untracked": false, "paths": ["out/report.xml"], "when": "always",
         "artifact_type": "junit", "artifact_format": "gzip", "expire_in": "1 week"},
        {"name": "files", "untracked": false, "paths": ["out/data.txt"], "when": "on_success",
         "artifact_type": "archive", "artifact_format": "zip", "expire_in": null},
    ]);
    gl.enqueue(job);
    let started = Instant::now();
    let j = gl.wait_job(101, JOB_DEADLINE, "output", |j| {
        trace(j).contains("hello from")
    });
    let to_output = started.elapsed();
    // GitLab briefly down while the job runs: a burst of 502s, then a log that lost its tail
    // (416 with a shorter Range), then 503s on the final update.
    gl.with(|s| {
        s.fail_next = 3;
        s.lose_trace_once = true;
        s.fail_final_puts = 2;
    });
    let j2 = gl.wait_final(101, JOB_DEADLINE);
    // Every injected fault was met (else this test proves nothing about riding them out),
    // and the log arrived whole without a resend.
    assert_eq!(
        gl.with(|s| (s.fail_next, s.lose_trace_once, s.fail_final_puts)),
        (0, false, 0)
    );
    assert_eq!(j2.checksum_mismatches, 0);
    let log = trace(&j2);
    eprintln!(
        "figures: enqueue → first output in GitLab {:.2} s; pick-up → final state {:.2} s",
        to_output.as_secs_f64(),
        (j2.finished.unwrap() - j.picked_up.unwrap()).as_secs_f64()
    );
    let fin = j2.final_update.clone().unwrap();
    assert_eq!(fin["state"], "success", "{fin}\n{log}");
    // The first PUT says running, right after pick-up.
    assert_eq!(j2.updates[0]["state"], "running");
    // Lines are echoed like gitlab-runner's shell executor, then run.
    assert!(
        log.contains("$ echo \"hello from $(uname -m) in $CI_PROJECT_DIR\""),
        "{log}"
    );
    assert!(log.contains("hello from riscv64 in /workspace"), "{log}");
    assert!(
        log.contains("after-script-ran") && log.contains("done"),
        "{log}"
    );
    // Masked: whole, split across chunks, and never even a prefix.
    assert!(log.contains("secret: [MASKED]"), "{log}");
    assert!(log.contains("split-[MASKED]-end"), "{log}");
    assert!(!log.contains(&secret[..8]), "{log}");
    assert!(!log.contains("jobtoken-101-secret"), "{log}");
    // The fake checked crc32 and size of the whole log against its own copy (412 otherwise);
    // after the 416 the runner resumed from GitLab's offset, so no mismatch was needed.
    assert_eq!(
        fin["output"]["bytesize"].as_u64(),
        Some(j2.trace.len() as u64)
    );
    // JUnit: gzip members, type and format both as query and form fields.
    let junit = j2
        .artifacts
        .iter()
        .find(|a| a.query.get("artifact_type").map(String::as_str) == Some("junit"))
        .unwrap_or_else(|| panic!("no junit upload: {:?}", j2.artifacts));
    assert_eq!(junit.file_name, "junit.xml.gz");
    assert_eq!(junit.query["artifact_format"], "gzip");
    assert_eq!(junit.fields["artifact_type"], "junit");
    let mut xml = String::new();
    flate2::read::MultiGzDecoder::new(&junit.data[..])
        .read_to_string(&mut xml)
        .unwrap();
    // With RUNNER_STEP_JUNIT the report is the runner's own: a testcase per step, the
    // guest's report merged in.
    assert!(xml.contains("guest_ok"), "{xml}");
    assert!(
        xml.contains("name=\"script\"") && xml.contains("name=\"after_script\""),
        "{xml}"
    );
    let archive = j2
        .artifacts
        .iter()
        .find(|a| a.query.get("artifact_type").map(String::as_str) == Some("archive"))
        .unwrap_or_else(|| panic!("no archive upload: {:?}", j2.artifacts));
    assert_eq!(archive.query["artifact_format"], "zip");
    assert!(
        archive.data.windows(11).any(|w| w == b"out/data.tx"),
        "zip lacks out/data.txt"
    );
    // What the runner sent when asking for jobs.
    let requests = gl.with(|s| s.requests.clone());
    let req = &requests[1];
    assert!(req["system_id"].as_str().unwrap().len() == 14, "{req}");
    assert_eq!(req["last_update"], "lu-1", "{req}");
    for f in [
        "multi_build_steps",
        "return_exit_code",
        "trace_checksum",
        "cancel_gracefully",
        "masking",
    ] {
        assert_eq!(req["info"]["features"][f], true, "{f}: {req}");
    }
    assert_eq!(gl.violations(), Vec::<String>::new());
    assert_serve_clean(cache.path(), Duration::from_secs(10));
    serve.signal("TERM");
    assert!(
        serve.wait_exit(Duration::from_secs(30)).success(),
        "{}",
        serve.log()
    );
    // Every log line of the job names it; those after boot name the VM too.
    let service_log = serve.log();
    let vm_line = service_log
        .lines()
        .find(|l| l.contains("VM ready"))
        .unwrap_or_else(|| panic!("{service_log}"));
    assert!(
        vm_line.contains("job_id=101") && vm_line.contains("vm_id=vm-"),
        "{vm_line}"
    );
}

#[test]
fn failing_and_timed_out_jobs_report_reason_exit_code_and_still_run_after_script() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let _serve = Serve::start(cache.path(), &config(&gl.url));
    gl.enqueue(job_payload(
        201,
        &["echo before", "exit 3", "echo never-printed"],
        &["echo cleanup-ran"],
        &[("GIT_STRATEGY", "none", false)],
        600,
    ));
    let j = gl.wait_final(201, JOB_DEADLINE);
    let log = trace(&j);
    let fin = j.final_update.unwrap();
    assert_eq!(fin["state"], "failed", "{log}");
    assert_eq!(fin["failure_reason"], "script_failure", "{fin}");
    assert_eq!(fin["exit_code"], 3, "{fin}");
    assert!(
        log.contains("before") && log.contains("cleanup-ran"),
        "{log}"
    );
    assert!(
        !log.contains("never-printed"),
        "stopped at the first failing line:\n{log}"
    );
    assert!(log.contains("ERROR: Job failed: exit code 3"), "{log}");

    // Job timeout: the job fails as job_execution_timeout, after_script still runs.
    gl.enqueue(job_payload(
        202,
        &["echo started", "sleep 600"],
        &["echo after-timeout"],
        &[("GIT_STRATEGY", "none", false)],
        12,
    ));
    let j = gl.wait_final(202, JOB_DEADLINE);
    let log = trace(&j);
    let fin = j.final_update.unwrap();
    assert_eq!(
        fin["failure_reason"], "job_execution_timeout",
        "{fin}\n{log}"
    );
    assert!(log.contains("after-timeout"), "{log}");

    // A log past output_limit (2 MiB here) is cut with a notice, sent in patches of at most
    // 1 MiB (the fake refuses larger ones), and its checksum still matches.
    gl.enqueue(job_payload(
        203,
        &["seq 1 400000", "echo tail-marker"],
        &[],
        &[("GIT_STRATEGY", "none", false)],
        600,
    ));
    let j = gl.wait_final(203, JOB_DEADLINE);
    let fin = j.final_update.clone().unwrap();
    assert_eq!(fin["state"], "success", "{fin}");
    assert!(j.patches >= 2, "{} patches", j.patches);
    assert!(
        j.trace.len() < 2 * 1024 * 1024 + 1024,
        "{} bytes",
        j.trace.len()
    );
    let log = trace(&j);
    assert!(
        log.contains("exceeded limit of 2097152 bytes"),
        "{}",
        &log[log.len() - 300..]
    );
    assert!(!log.contains("tail-marker"));
    assert_serve_clean(cache.path(), Duration::from_secs(10));
    assert_eq!(gl.violations(), Vec::<String>::new());
}

#[test]
fn cancel_mid_job_graceful_and_hard_tear_the_vm_down_within_seconds() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let serve = Serve::start(cache.path(), &config(&gl.url));
    // Graceful: Job-Status canceling stops the script, after_script runs, VM goes.
    gl.enqueue(job_payload(
        301,
        &["echo started", "sleep 600"],
        &["echo after-cancel"],
        &[("GIT_STRATEGY", "none", false)],
        600,
    ));
    gl.wait_job(301, JOB_DEADLINE, "output", |j| {
        trace(j).contains("started")
    });
    let asked = Instant::now();
    gl.set_status(301, "canceling");
    let j = gl.wait_final(301, Duration::from_secs(30));
    let took = asked.elapsed();
    assert_serve_clean(cache.path(), Duration::from_secs(10));
    eprintln!(
        "figures: graceful cancel → final state {:.2} s",
        took.as_secs_f64()
    );
    // The README promises 1–2 s; generous for a loaded host, still far below the 600 s job.
    assert!(took <= CANCEL_LATENCY, "graceful cancel took {took:?}");
    let log = trace(&j);
    assert_eq!(j.final_update.unwrap()["state"], "failed");
    assert!(log.contains("after-cancel"), "{log}");
    // The service log names each step that ran in its job's span: the check below can see
    // an after_script (this one ran).
    assert!(
        ran_step(&serve.log(), 301, "after_script"),
        "{}",
        serve.log()
    );

    // Hard: Job-Status canceled aborts at once, no after_script.
    gl.enqueue(job_payload(
        302,
        &["echo started", "sleep 600"],
        &["echo should-not-run"],
        &[("GIT_STRATEGY", "none", false)],
        600,
    ));
    gl.wait_job(302, JOB_DEADLINE, "output", |j| {
        trace(j).contains("started")
    });
    let asked = Instant::now();
    gl.set_status(302, "canceled");
    // The fake refuses log patches of a canceled job (403) like GitLab; the runner still
    // sends its final state.
    gl.wait_job(302, Duration::from_secs(30), "a final PUT attempt", |j| {
        j.updates.iter().any(|u| u["state"] == "failed")
    });
    let took = asked.elapsed();
    assert_serve_clean(cache.path(), Duration::from_secs(10));
    eprintln!(
        "figures: hard cancel → final state {:.2} s, VM gone {:.2} s",
        took.as_secs_f64(),
        asked.elapsed().as_secs_f64()
    );
    assert!(took <= CANCEL_LATENCY, "hard cancel took {took:?}");
    // GitLab refuses the log of a canceled job, so the job's trace cannot show whether
    // after_script ran; the service log can (see job 301 above).
    let log = serve.log();
    assert!(ran_step(&log, 302, "script"), "{log}");
    assert!(!ran_step(&log, 302, "after_script"), "{log}");
}

/// Cancel → final state, at most (the README says 1–2 s).
const CANCEL_LATENCY: Duration = Duration::from_secs(10);

/// Whether the service log says step `step` of job `job_id` finished (run or stopped).
fn ran_step(service_log: &str, job_id: u64, step: &str) -> bool {
    service_log.lines().any(|l| {
        l.contains(&format!("job_id={job_id}"))
            && l.contains("step finished")
            && l.contains(&format!("step={step} "))
    })
}

#[test]
fn sigquit_drains_sigterm_aborts_and_sigkill_restart_leaves_nothing_behind() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    // SIGQUIT: the running job finishes, no new job is taken, the service exits 0.
    let mut serve = Serve::start(cache.path(), &config(&gl.url));
    // The job outlives the signal by far; and the test checks it did (below), so a slow
    // host fails the test instead of letting it pass without draining anything.
    gl.enqueue(job_payload(
        401,
        &["echo started", "sleep 20", "echo finished"],
        &[],
        &[("GIT_STRATEGY", "none", false)],
        600,
    ));
    gl.wait_job(401, JOB_DEADLINE, "output", |j| {
        trace(j).contains("started")
    });
    serve.signal("QUIT");
    serve.wait_log("SIGQUIT", Duration::from_secs(10));
    let j = gl.job(401);
    assert!(
        j.final_update.is_none() && !trace(&j).contains("finished"),
        "the job ended before SIGQUIT took effect: this run proves nothing about draining"
    );
    gl.enqueue(job_payload(402, &["echo no"], &[], &[], 600));
    let status = serve.wait_exit(JOB_DEADLINE);
    assert!(status.success(), "{status:?}\n{}", serve.log());
    let j = gl.job(401);
    assert_eq!(
        j.final_update.as_ref().unwrap()["state"],
        "success",
        "{}",
        trace(&j)
    );
    assert!(trace(&j).contains("finished"));
    assert_eq!(
        gl.with(|s| s.queue.len()),
        1,
        "a draining runner took a new job"
    );
    assert_serve_clean(cache.path(), Duration::from_secs(5));

    // SIGTERM: the running job is aborted and reported as runner_system_failure.
    gl.with(|s| s.queue.clear());
    let mut serve = Serve::start(cache.path(), &config(&gl.url));
    gl.enqueue(job_payload(
        403,
        &["echo started", "sleep 600"],
        &[],
        &[("GIT_STRATEGY", "none", false)],
        600,
    ));
    gl.wait_job(403, JOB_DEADLINE, "output", |j| {
        trace(j).contains("started")
    });
    serve.signal("TERM");
    serve.wait_exit(Duration::from_secs(40));
    let j = gl.job(403);
    let fin = j
        .final_update
        .clone()
        .unwrap_or_else(|| panic!("no final update:\n{}", serve.log()));
    assert_eq!(fin["failure_reason"], "runner_system_failure", "{fin}");
    assert_serve_clean(cache.path(), Duration::from_secs(5));

    // SIGKILL mid-job: the VM's directory stays behind; the next start removes it at once.
    let mut serve = Serve::start(cache.path(), &config(&gl.url));
    gl.enqueue(job_payload(
        404,
        &["echo started", "sleep 600"],
        &[],
        &[("GIT_STRATEGY", "none", false)],
        600,
    ));
    gl.wait_job(404, JOB_DEADLINE, "output", |j| {
        trace(j).contains("started")
    });
    serve.signal("KILL");
    serve.wait_exit(Duration::from_secs(10));
    let left: Vec<_> = std::fs::read_dir(cache.path().join("serve-vms"))
        .unwrap()
        .flatten()
        .collect();
    assert!(
        !left.is_empty(),
        "expected the killed service's VM directory to remain"
    );
    let mut serve = Serve::start(cache.path(), &config(&gl.url));
    serve.wait_log("polling for jobs", Duration::from_secs(30));
    assert_serve_clean(cache.path(), Duration::from_secs(5));
    serve.signal("TERM");
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    assert_eq!(gl.violations(), Vec::<String>::new());
}

#[test]
fn git_job_clones_a_local_bare_repository_on_the_host() {
    let cache = private_cache();
    let repo = tempfile::tempdir().unwrap();
    let git = |dir: &Path, args: &[&str]| {
        let out = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "t")
            .env("GIT_AUTHOR_EMAIL", "t@example.com")
            .env("GIT_COMMITTER_NAME", "t")
            .env("GIT_COMMITTER_EMAIL", "t@example.com")
            .output()
            .expect("git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let work = repo.path().join("work");
    std::fs::create_dir(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    std::fs::write(work.join("hello.txt"), "hello from git\n").unwrap();
    git(&work, &["add", "hello.txt"]);
    git(&work, &["commit", "-q", "-m", "first"]);
    let sha = git(&work, &["rev-parse", "HEAD"]);
    let bare = repo.path().join("demo.git");
    git(
        repo.path(),
        &[
            "clone",
            "-q",
            "--bare",
            work.to_str().unwrap(),
            bare.to_str().unwrap(),
        ],
    );

    let gl = FakeGitlab::start(TOKEN);
    let _serve = Serve::start(cache.path(), &config(&gl.url));
    let mut job = job_payload(
        501,
        &["cat hello.txt", "test -d .git && echo has-git-dir", "pwd"],
        &[],
        &[("GIT_STRATEGY", "clone", false), ("GIT_DEPTH", "1", false)],
        600,
    );
    job["git_info"]["repo_url"] = json!(format!("file://{}", bare.display()));
    job["git_info"]["sha"] = json!(sha);
    gl.enqueue(job);
    let j = gl.wait_final(501, JOB_DEADLINE);
    let log = trace(&j);
    assert_eq!(j.final_update.unwrap()["state"], "success", "{log}");
    assert!(
        log.contains("hello from git") && log.contains("has-git-dir"),
        "{log}"
    );
    assert!(log.contains("/workspace"), "{log}");
    assert!(!log.contains("jobtoken-501-secret"), "{log}");

    // GIT_STRATEGY fetch keeps a per-project checkout on the host between jobs.
    for id in [502, 503] {
        let mut job = job_payload(
            id,
            &["cat hello.txt"],
            &[],
            &[("GIT_STRATEGY", "fetch", false)],
            600,
        );
        job["git_info"]["repo_url"] = json!(format!("file://{}", bare.display()));
        job["git_info"]["sha"] = json!(sha);
        gl.enqueue(job);
        let j = gl.wait_final(id, JOB_DEADLINE);
        let log = trace(&j);
        assert_eq!(
            j.final_update.as_ref().unwrap()["state"],
            "success",
            "{log}"
        );
        assert!(log.contains("hello from git"), "{log}");
        if id == 503 {
            assert!(log.contains("Fetching changes into"), "{log}");
            assert!(log.contains("serve-builds"), "{log}");
        }
    }
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}

#[test]
fn bad_jobs_and_bad_entries_fail_alone_while_the_service_keeps_serving() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let cfg = format!(
        "{}\n[[runners]]\nname = \"wrong-token\"\nurl = \"{url}\"\ntoken = \"glrt-not-the-right-one\"\narch = \"riscv64\"\n\n[[runners]]\nname = \"bad-image\"\nurl = \"{url}\"\ntoken = \"{TOKEN}\"\narch = \"riscv64\"\nimage = \"no-such-image\"\n",
        config(&gl.url),
        url = gl.url
    );
    let cfg = format!(
        "{cfg}\n[[runners]]\nname = \"unreachable\"\nurl = \"http://127.0.0.1:9\"\ntoken = \"legacy-token\"\narch = \"riscv64\"\n"
    );
    let serve = Serve::start(cache.path(), &cfg);
    serve.wait_log(
        "cannot reach GitLab at http://127.0.0.1:9",
        Duration::from_secs(30),
    );
    serve.wait_log(
        "rejects the token of runner 'wrong-token'",
        Duration::from_secs(30),
    );
    serve.wait_log(
        "image 'no-such-image' cannot be used",
        Duration::from_secs(30),
    );
    // A payload with a field of the wrong type fails that job only (no VM is started).
    let mut bad = job_payload(601, &["echo x"], &[], &[], 600);
    bad["runner_info"]["timeout"] = json!("soon");
    gl.enqueue(bad);
    let j = gl.wait_final(601, Duration::from_secs(30));
    let fin = j.final_update.clone().unwrap();
    assert_eq!(fin["state"], "failed");
    assert!(trace(&j).contains("runner_info"), "{}", trace(&j));
    // A job asking for an architecture the entry does not allow fails with a clear message.
    gl.enqueue(job_payload(
        602,
        &["echo x"],
        &[],
        &[("RUNNER_ARCH", "x86_64", false)],
        600,
    ));
    let j = gl.wait_final(602, Duration::from_secs(30));
    assert!(
        trace(&j).contains("RUNNER_ARCH=x86_64 is not allowed"),
        "{}",
        trace(&j)
    );
    // And the service still runs good jobs.
    gl.enqueue(job_payload(
        603,
        &["echo still-serving"],
        &[],
        &[("GIT_STRATEGY", "none", false)],
        600,
    ));
    let j = gl.wait_final(603, JOB_DEADLINE);
    eprintln!(
        "figures: one-line job, pick-up → final state {:.2} s",
        (j.finished.unwrap() - j.picked_up.unwrap()).as_secs_f64()
    );
    assert_eq!(
        j.final_update.as_ref().unwrap()["state"],
        "success",
        "{}",
        trace(&j)
    );
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}

#[test]
fn a_malformed_config_is_refused_with_line_and_column() {
    let cache = private_cache();
    let mut serve = Serve::start(
        cache.path(),
        "concurrent = 2\n[[runners]]\nname = \"x\"\nurl = \"http://127.0.0.1:9\"\ntoken = \"t\"\narch = \"mips\"\n",
    );
    let status = serve.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(78), "{}", serve.log());
    let log = serve.log();
    let line = log.lines().next().unwrap_or_default();
    assert!(
        line.starts_with("runner: error: ")
            && line.contains("serve.toml:6:8")
            && line.contains("mips"),
        "{log}"
    );
}

/// A bare repository with one commit holding `files`; returns (its dir, the bare path, SHA).
fn bare_repo(files: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let git = |cwd: &Path, args: &[&str]| {
        let out = Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(cwd)
            .output()
            .expect("git");
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]);
    for (name, bytes) in files {
        std::fs::write(work.join(name), bytes).unwrap();
    }
    git(&work, &["add", "-A"]);
    git(&work, &["commit", "-q", "-m", "c"]);
    let sha = git(&work, &["rev-parse", "HEAD"]);
    let bare = dir.path().join("p.git");
    git(
        dir.path(),
        &["clone", "-q", "--bare", "work", bare.to_str().unwrap()],
    );
    (dir, bare, sha)
}

#[test]
fn jobs_over_the_operators_limits_fail_naming_the_cap_and_start_nothing() {
    use std::os::unix::fs::PermissionsExt;
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let cfg = format!(
        "{}[runners.limits]\nmax_timeout = \"1h\"\nmax_workspace_size = \"64K\"\n",
        config(&gl.url)
    );
    // A GIT_DIR in the service's own environment once sent every checkout's git commands to
    // that repository instead of the job's directory.
    let serve = Serve::start_env(
        cache.path(),
        &cfg,
        &[("GIT_DIR", "/nonexistent/repo.git"), ("GIT_WORK_TREE", "/")],
    );
    let (_repo, bare, sha) = bare_repo(&[("big.bin", &[7u8; 200 << 10])]);
    let url = format!("file://{}", bare.display());
    let failed_with = |id: u64, want: &str| {
        let j = gl.wait_final(id, Duration::from_secs(60));
        let log = trace(&j);
        let fin = j.final_update.clone().unwrap();
        assert_eq!(fin["state"], "failed", "{id}: {log}");
        assert_eq!(fin["failure_reason"], "script_failure", "{id}: {log}");
        assert!(log.contains(want), "{id}: no '{want}' in:\n{log}");
        assert!(
            !log.contains("Starting a"),
            "{id}: a VM was started:\n{log}"
        );
        log
    };

    // 1. A job timeout far beyond the cap (a huge one once panicked the job's task).
    gl.enqueue(job_payload(701, &["true"], &[], &[], 10u64.pow(12)));
    failed_with(701, "over this runner's limit max_timeout = 1h");
    // 2. An after_script timeout of a hundred years.
    gl.enqueue(job_payload(
        702,
        &["true"],
        &[],
        &[("RUNNER_AFTER_SCRIPT_TIMEOUT", "100y", false)],
        600,
    ));
    failed_with(
        702,
        "RUNNER_AFTER_SCRIPT_TIMEOUT = 100years is over this runner's limit max_timeout = 1h",
    );
    // 3. Sources over max_workspace_size; the clone itself works despite GIT_DIR.
    let mut job = job_payload(703, &["true"], &[], &[("GIT_DEPTH", "1", false)], 600);
    job["git_info"]["repo_url"] = json!(url);
    job["git_info"]["sha"] = json!(sha);
    gl.enqueue(job);
    let log = failed_with(703, "is over this runner's limit max_workspace_size = 64K");
    assert!(log.contains(&format!("Checked out {}", &sha[..8])), "{log}");
    // 4. GIT_STRATEGY fetch: a lock file left by a stopped git no longer fails the project's
    // next jobs, and the project's directory is private.
    let fetch_job = |id: u64| {
        let mut job = job_payload(id, &["true"], &[], &[("GIT_STRATEGY", "fetch", false)], 600);
        job["git_info"]["repo_url"] = json!(url);
        job["git_info"]["sha"] = json!(sha);
        job
    };
    gl.enqueue(fetch_job(704));
    failed_with(704, "max_workspace_size = 64K");
    let project = cache.path().join("serve-builds/riscv64-emu/42");
    let mode = std::fs::metadata(&project).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", project.display());
    std::fs::write(project.join(".git/index.lock"), "").unwrap();
    gl.enqueue(fetch_job(705));
    let log = failed_with(705, "max_workspace_size = 64K");
    assert!(log.contains("Removed .git/index.lock"), "{log}");
    // 5. A refspec that git once took for its --upload-pack option (a command on the host).
    let marker = cache.path().join("pwned");
    let mut job = job_payload(706, &["true"], &[], &[], 600);
    job["git_info"]["repo_url"] = json!(url);
    job["git_info"]["sha"] = json!(sha);
    job["git_info"]["refspecs"] = json!([format!(
        "--upload-pack=touch {};git-upload-pack",
        marker.display()
    )]);
    gl.enqueue(job);
    failed_with(706, "invalid refspec");
    assert!(
        !marker.exists(),
        "a refspec from the payload ran a command on the host"
    );

    drop(serve);
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}

#[test]
fn an_image_build_over_image_build_timeout_is_stopped_with_its_tools() {
    // A fresh cache, so a real build starts (it needs the Debian mirror, as CI has).
    let cache = tempfile::tempdir().unwrap();
    let fragment = cache.path().display().to_string();
    let gl = FakeGitlab::start(TOKEN);
    let cfg = format!(
        "{}[runners.limits]\nimage_build_timeout = \"3s\"\n",
        config(&gl.url)
    );
    let serve = Serve::start(cache.path(), &cfg);
    gl.enqueue(job_payload(
        801,
        &["true"],
        &[],
        &[("GIT_STRATEGY", "none", false)],
        600,
    ));
    let j = gl.wait_final(801, Duration::from_secs(120));
    let log = trace(&j);
    let fin = j.final_update.clone().unwrap();
    assert_eq!(fin["state"], "failed", "{log}");
    assert!(
        log.contains("took longer than image_build_timeout = 3s"),
        "{log}\n{}",
        serve.log()
    );
    // The build's tools (mmdebstrap …) are killed with it, and its staging directory goes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Everything that names the cache but the service itself.
        let service = format!("{}: ", serve.pid());
        let left: Vec<String> = e2e::processes_using(&fragment)
            .into_iter()
            .filter(|p| !p.starts_with(&service))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still running: {left:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The staging directory goes with the build; removing a few hundred MB of extracted
    // packages can outlast the processes by a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let staging: Vec<_> = std::fs::read_dir(cache.path().join("images"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        if staging
            .iter()
            .all(|n| !n.to_string_lossy().starts_with(".staging-"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "half-built image left: {staging:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(serve);
}

#[test]
fn final_update_412_resends_the_whole_log_once_and_202_is_asked_again_after_the_interval() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let interval = 2;
    gl.with(|s| {
        s.trace_interval = interval;
        // First final PUT: GitLab's copy lost a byte (412); second: still persisting (202).
        s.corrupt_trace_on_final = true;
        s.persisting_final_puts = 1;
    });
    let mut serve = Serve::start(cache.path(), &config(&gl.url));
    let mut job = job_payload(
        501,
        &["echo line-one", "echo line-two"],
        &[],
        &[("GIT_STRATEGY", "none", false)],
        600,
    );
    // Null in optional artifact fields means GitLab's default (it used to fail the job).
    job["artifacts"] = json!([{"name": null, "untracked": null, "paths": ["nothing-here/"],
        "exclude": null, "when": null, "artifact_type": null, "artifact_format": null,
        "expire_in": null}]);
    gl.enqueue(job);
    let j = gl.wait_final(501, JOB_DEADLINE);
    let log = trace(&j);
    assert_eq!(
        j.final_update.as_ref().unwrap()["state"],
        "success",
        "{log}"
    );
    // 412 once, and the whole log went again from offset 0 exactly once; GitLab's copy is
    // whole again (the final checksum matched it).
    assert_eq!(j.checksum_mismatches, 1);
    assert_eq!(j.log_resets, 1, "{log}");
    assert!(log.starts_with("\x1b[1mRunning with runner"), "{log}");
    assert!(
        log.contains("line-two") && log.contains("Job succeeded"),
        "{log}"
    );
    // Final PUTs: 412, then 202, then — not before the interval — 200.
    let finals: Vec<(Instant, u16)> = j
        .updates
        .iter()
        .zip(&j.update_replies)
        .filter(|(u, _)| u["state"] != "running")
        .map(|(_, r)| *r)
        .collect();
    let codes: Vec<u16> = finals.iter().map(|(_, c)| *c).collect();
    assert_eq!(codes, [412, 202, 200]);
    let gap = finals[2].0 - finals[1].0;
    eprintln!("figures: 202 → next final PUT {:.2} s", gap.as_secs_f64());
    assert!(
        gap >= Duration::from_secs(interval) - Duration::from_millis(100),
        "asked again after {gap:?}, before GitLab's {interval} s interval"
    );
    assert_eq!(gl.violations(), Vec::<String>::new());
    serve.signal("TERM");
    assert!(serve.wait_exit(Duration::from_secs(30)).success());
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}

/// The fake's URL with `localhost` for `127.0.0.1`: the same server, another origin.
fn gl_url_as_localhost(url: &str) -> String {
    url.replace("127.0.0.1", "localhost")
}

/// A dependency entry of a job payload, as GitLab sends it.
fn dependency(id: u64, name: &str, size: usize) -> serde_json::Value {
    json!({"id": id, "name": name, "token": format!("deptoken-{id}-secret"),
           "artifacts_file": {"filename": "artifacts.zip", "size": size}})
}

#[test]
fn earlier_jobs_artifacts_and_image_reach_the_vm_through_retries_and_a_redirect() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    // The entry's default is aarch64: the job's image: is what makes its VM riscv64.
    let cfg = config(&gl.url).replace(
        "arch = \"riscv64\"\n",
        "arch = \"aarch64\"\nallowed_arches = [\"riscv64\"]\n",
    );
    assert!(cfg.contains("allowed_arches"), "{cfg}");
    let _serve = Serve::start(cache.path(), &cfg);
    // Stage 1's artifacts: a script that runs on the guest and a data file.
    let zip = zip_of(&[
        (
            "bin/hello.sh",
            b"#!/bin/sh\necho \"hello from $(uname -m)\"\n",
            0o755,
        ),
        ("data/message.txt", b"built in stage 1\n", 0o644),
    ]);
    gl.with(|s| {
        s.dependency_artifacts.insert(
            950,
            DependencyArtifact {
                token: "deptoken-950-secret".into(),
                zip: zip.clone(),
                unavailable: 2,
                redirect: true,
                ..Default::default()
            },
        )
    });
    let mut job = job_payload(
        951,
        &["./bin/hello.sh", "cat data/message.txt data/docs.txt"],
        &[],
        &[("GIT_STRATEGY", "none", false)],
        600,
    );
    job["image"] = json!({"name": "riscv64/debian-13"});
    // Another job's artifacts in object storage (another origin): the job token stays home.
    let docs = zip_of(&[("data/docs.txt", b"from storage\n", 0o644)]);
    gl.with(|s| {
        s.dependency_artifacts.insert(
            948,
            DependencyArtifact {
                token: "deptoken-948-secret".into(),
                zip: docs.clone(),
                redirect: true,
                storage_url: Some(gl_url_as_localhost(&gl.url)),
                ..Default::default()
            },
        )
    });
    // A dependency without artifacts is not asked for.
    job["dependencies"] = json!([
        dependency(948, "docs", docs.len()),
        {"id": 949, "name": "lint", "token": "deptoken-949-secret", "artifacts_file": null},
        dependency(950, "build", zip.len()),
    ]);
    gl.enqueue(job);
    let j = gl.wait_final(951, JOB_DEADLINE);
    let log = trace(&j);
    assert_eq!(j.final_update.unwrap()["state"], "success", "{log}");
    assert!(log.contains("hello from riscv64"), "{log}");
    assert!(log.contains("built in stage 1"), "{log}");
    assert!(log.contains("from storage"), "{log}");
    assert!(log.contains("Using debian-13 on riscv64"), "{log}");
    assert!(!log.contains("deptoken-950-secret"), "{log}");
    // Two 503s retried, then GitLab's 307 followed to the storage.
    let downloads = gl.with(|s| s.downloads.clone());
    let seen: Vec<(u64, &str, u16)> = downloads
        .iter()
        .filter(|d| d.id == 950)
        .map(|d| (d.id, d.path.as_str(), d.status))
        .collect();
    let api = "/api/v4/jobs/950/artifacts";
    assert_eq!(
        seen,
        [
            (950, api, 503),
            (950, api, 503),
            (950, api, 307),
            (950, "/storage/950", 200)
        ]
    );
    assert!(downloads
        .iter()
        .filter(|d| d.id == 950)
        .all(|d| d.job_token.as_deref() == Some("deptoken-950-secret")));
    let to_storage: Vec<(&str, Option<&str>)> = downloads
        .iter()
        .filter(|d| d.id == 948)
        .map(|d| (d.path.as_str(), d.job_token.as_deref()))
        .collect();
    assert_eq!(
        to_storage,
        [
            ("/api/v4/jobs/948/artifacts", Some("deptoken-948-secret")),
            ("/storage/948", None)
        ]
    );
    assert_eq!(gl.violations(), Vec::<String>::new());
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}

#[test]
fn bad_dependencies_images_and_services_fail_the_job_naming_them_without_a_vm() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let cfg = format!(
        "{}[runners.limits]\nmax_dependencies_size = \"64K\"\n",
        config(&gl.url)
    );
    let serve = Serve::start(cache.path(), &cfg);
    // Where a `../` entry would land if it were written (the job's directory is in /tmp).
    let outside = tempfile::tempdir().unwrap();
    let escape = format!(
        "../../../../../../../..{}/escaped.txt",
        outside.path().display()
    );
    // Incompressible (xorshift), so that the download itself is over 64K.
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let noise: Vec<u8> = (0..200_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let artifacts = [
        // (dependency job, status, archive)
        (960, Some(404), zip_of(&[("a", b"a", 0o644)])),
        (961, Some(403), zip_of(&[("a", b"a", 0o644)])),
        (
            962,
            None,
            zip_of(&[
                ("ok.txt", b"fine", 0o644),
                (escape.as_str(), b"pwned", 0o644),
            ]),
        ),
        (963, None, zip_of(&[("noise.bin", &noise, 0o644)])),
        (964, Some(502), zip_of(&[("a", b"a", 0o644)])),
    ];
    gl.with(|s| {
        for (id, status, zip) in &artifacts {
            s.dependency_artifacts.insert(
                *id,
                DependencyArtifact {
                    token: format!("deptoken-{id}-secret"),
                    zip: zip.clone(),
                    status: *status,
                    ..Default::default()
                },
            );
        }
    });
    let failed_with = |id: u64, reason: &str, want: &str| {
        let j = gl.wait_final(id, Duration::from_secs(90));
        let log = trace(&j);
        let fin = j.final_update.clone().unwrap();
        assert_eq!(fin["state"], "failed", "{id}: {log}");
        assert_eq!(fin["failure_reason"], reason, "{id}: {log}");
        assert!(log.contains(want), "{id}: no '{want}' in:\n{log}");
        assert!(
            !log.contains("Starting a"),
            "{id}: a VM was started:\n{log}"
        );
    };
    let job_needing = |id: u64, dep: u64, name: &str| {
        let mut job = job_payload(id, &["true"], &[], &[("GIT_STRATEGY", "none", false)], 600);
        job["dependencies"] = json!([dependency(dep, name, 100)]);
        job
    };
    // (job, dependency, its name, failure_reason, message)
    let cases = [
        (
            970,
            960,
            "build",
            "script_failure",
            "the artifacts of dependency 'build' (job 960) are not found (404)",
        ),
        (
            971,
            961,
            "build-b",
            "script_failure",
            "GitLab refused the artifacts of dependency 'build-b' (job 961) (403)",
        ),
        (
            972,
            962,
            "evil",
            "script_failure",
            "the artifacts of dependency 'evil' (job 962) cannot be unpacked: entry '../../",
        ),
        (
            973,
            963,
            "big",
            "script_failure",
            "over this runner's limit max_dependencies_size = 64K",
        ),
        (
            974,
            964,
            "flaky",
            "runner_system_failure",
            "dependency 'flaky' (job 964) failed: 502 replies 5 times",
        ),
    ];
    for (id, dep, name, reason, want) in cases {
        gl.enqueue(job_needing(id, dep, name));
        failed_with(id, reason, want);
    }
    assert!(!outside.path().join("escaped.txt").exists());
    let retried = gl.with(|s| s.downloads.iter().filter(|d| d.id == 964).count());
    assert_eq!(retried, 5, "502s are retried a bounded number of times");

    // image: and services: refused before anything starts.
    let mut job = job_payload(975, &["true"], &[], &[], 600);
    job["image"] = json!({"name": "x86_64"});
    gl.enqueue(job);
    failed_with(
        975,
        "script_failure",
        "image 'x86_64' (architecture x86_64) is not allowed on runner 'riscv64-emu' (allowed: riscv64)",
    );
    let mut job = job_payload(976, &["true"], &[], &[], 600);
    job["image"] = json!({"name": "rust:1.80", "entrypoint": [""]});
    gl.enqueue(job);
    failed_with(
        976,
        "script_failure",
        "image 'rust:1.80' is not ARCH, IMAGE or ARCH/IMAGE",
    );
    let mut job = job_payload(977, &["true"], &[], &[], 600);
    job["services"] = json!([{"name": "postgres:16", "alias": "db"}]);
    gl.enqueue(job);
    failed_with(
        977,
        "script_failure",
        "services: (postgres:16) are not supported by this runner",
    );
    // Guest network over the entry's `network` (none unless set): refused, the limit named.
    let job = job_payload(
        978,
        &["true"],
        &[],
        &[("RUNNER_NETWORK", "proxy", false)],
        600,
    );
    gl.enqueue(job);
    failed_with(
        978,
        "script_failure",
        "the job's RUNNER_NETWORK = \"proxy\" is over this runner's limit network = \"none\"",
    );
    assert_eq!(gl.violations(), Vec::<String>::new());
    drop(serve);
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}

/// The zips of the entry's local cache (`serve-cache/`), with their sizes.
fn cache_archives(cache: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let root = cache.join("serve-cache/riscv64-emu");
    for project in std::fs::read_dir(&root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(project.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            let size = f.metadata().map(|m| m.len()).unwrap_or(0);
            out.push((f.path(), size));
        }
    }
    out
}

#[test]
fn cache_is_pushed_restored_by_key_and_fallback_kept_by_policy_and_bounded() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let cfg = format!("{}cache_max_size = \"100K\"\n", config(&gl.url));
    let _serve = Serve::start(cache.path(), &cfg);
    let run = |id: u64, script: &[&str], caches: serde_json::Value| {
        let mut job = job_payload(id, script, &[], &[("GIT_STRATEGY", "none", false)], 600);
        job["cache"] = caches;
        job["artifacts"] = json!([{"name": "report", "paths": ["report.txt"], "when": "always",
            "artifact_type": "archive", "artifact_format": "zip"}]);
        gl.enqueue(job);
        let j = gl.wait_final(id, JOB_DEADLINE);
        let log = trace(&j);
        assert_eq!(
            j.final_update.as_ref().unwrap()["state"],
            "success",
            "{id}: {log}"
        );
        (j, log)
    };
    let entry = |key: &str, policy: &str, fallback: &[&str]| {
        json!([{"key": key, "untracked": false, "policy": policy, "paths": ["vendor/"],
                "when": "on_success", "fallback_keys": fallback}])
    };
    let a = "deps-non_protected";
    // 1. Pushes: 40K of noise (incompressible) and a marker; the artifact stays separate.
    let (j, log) = run(
        1101,
        &[
            "mkdir -p vendor",
            "echo 'cached by 1101' > vendor/data.txt",
            "head -c 40000 /dev/urandom > vendor/noise.bin",
            "echo report > report.txt",
        ],
        entry(a, "pull-push", &[]),
    );
    assert!(log.contains(&format!("no cache for {a}")), "{log}");
    assert!(
        log.contains(&format!("Created cache {a} (2 file(s)")),
        "{log}"
    );
    let upload = j.artifacts.iter().find(|u| u.file_name == "report.zip");
    let upload = upload.unwrap_or_else(|| panic!("no artifact upload\n{log}"));
    let names: Vec<String> = zip::ZipArchive::new(std::io::Cursor::new(upload.data.clone()))
        .unwrap()
        .file_names()
        .map(str::to_string)
        .collect();
    assert_eq!(names, ["report.txt"], "the cache's files are not artifacts");
    // 2. Restores by key; `pull` does not save what the job changed.
    let (_, log) = run(
        1102,
        &[
            "cat vendor/data.txt",
            "echo 'changed by 1102' > vendor/data.txt",
        ],
        entry(a, "pull", &[]),
    );
    assert!(log.contains("cached by 1101"), "{log}");
    assert!(
        log.contains(&format!("Successfully extracted cache {a}")),
        "{log}"
    );
    assert!(!log.contains("Created cache"), "{log}");
    // 3. A missing key falls back to fallback_keys in order (the first one missing too).
    let (_, log) = run(
        1103,
        &["cat vendor/data.txt"],
        entry("feature-non_protected", "pull", &["nope-non_protected", a]),
    );
    assert!(log.contains("cached by 1101"), "{log}");
    assert!(!log.contains("changed by 1102"), "{log}");
    assert!(
        log.contains(&format!("Successfully extracted cache {a}")),
        "{log}"
    );
    // 4. Two more 40K caches: over 100K, so the least recently used one (1's) goes.
    for (id, key) in [(1104, "b-non_protected"), (1105, "c-non_protected")] {
        let (_, log) = run(
            id,
            &[
                "mkdir -p vendor",
                "head -c 40000 /dev/urandom > vendor/noise.bin",
            ],
            entry(key, "push", &[]),
        );
        assert!(log.contains(&format!("Created cache {key}")), "{log}");
    }
    let archives = cache_archives(cache.path());
    let total: u64 = archives.iter().map(|(_, s)| s).sum();
    assert_eq!(archives.len(), 2, "{archives:?}");
    assert!(total <= 100 << 10, "{archives:?}");
    let (_, log) = run(1106, &["test ! -e vendor/data.txt"], entry(a, "pull", &[]));
    assert!(log.contains(&format!("no cache for {a}")), "{log}");
    assert_eq!(gl.violations(), Vec::<String>::new());
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}

#[test]
fn keep_failed_uploads_the_failed_vm_and_runner_debug_resumes_it_from_the_artifact() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let _serve = Serve::start(cache.path(), &config(&gl.url));
    gl.enqueue(job_payload(
        211,
        &[
            "echo state-of-the-failure > /workspace/found.txt",
            "sleep 1000 >/dev/null 2>&1 &",
            "exit 4",
        ],
        &["rm /workspace/found.txt"],
        &[
            ("GIT_STRATEGY", "none", false),
            ("RUNNER_KEEP_FAILED", "true", false),
            ("DEPLOY_KEY", "hunter2-masked", true),
        ],
        600,
    ));
    let j = gl.wait_final(211, JOB_DEADLINE);
    let log = trace(&j);
    let fin = j.final_update.clone().unwrap();
    assert_eq!(
        (&fin["state"], &fin["exit_code"]),
        (&json!("failed"), &json!(4)),
        "{log}"
    );
    for want in [
        "Reproduce this failure locally",
        "/api/v4/projects/42/jobs/211/artifacts",
        "runner images build --arch riscv64 debian-13",
        "runner debug failed-vm",
    ] {
        assert!(log.contains(want), "{want}:\n{log}");
    }
    assert!(!log.contains("hunter2-masked"), "{log}");
    let archive = j
        .artifacts
        .iter()
        .find(|a| a.query.get("artifact_type").map(String::as_str) == Some("archive"))
        .unwrap_or_else(|| panic!("no archive uploaded:\n{log}"));
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(&archive.data)).expect("zip");
    let mut packed = Vec::new();
    zip.by_name("failed-vm.tar.gz")
        .expect("the snapshot in the archive")
        .read_to_end(&mut packed)
        .expect("read");
    eprintln!(
        "uploaded failure snapshot: {:.1} MiB compressed",
        packed.len() as f64 / f64::from(1 << 20)
    );

    // Another checkout: the artifact unpacked as the log says, resumed there.
    let elsewhere = tempfile::tempdir().expect("tempdir");
    std::fs::write(elsewhere.path().join("failed-vm.tar.gz"), &packed).expect("write");
    let status = Command::new("tar")
        .args(["-xzf", "failed-vm.tar.gz"])
        .current_dir(elsewhere.path())
        .status()
        .expect("tar");
    assert!(status.success());
    let debug = e2e::runner_with_cache(
        elsewhere.path(),
        &[
            "debug",
            "failed-vm",
            "--command",
            "cat found.txt; echo \"key=$DEPLOY_KEY\"; pgrep -x sleep >/dev/null && echo sleeper-alive",
        ],
        cache.path(),
    );
    assert_eq!(debug.code, 0, "{debug}");
    for want in [
        "state-of-the-failure",
        "key=hunter2-masked",
        "sleeper-alive",
    ] {
        assert!(debug.stdout.contains(want), "{want}: {debug}");
    }
    assert_serve_clean(cache.path(), Duration::from_secs(10));
    assert_eq!(gl.violations(), Vec::<String>::new());
}

/// The `[runners.cache]` of an entry named `name` whose cache is `section`, as parsed.
fn s3_store(name: &str, token: &str, section: &str, max: u64) -> runner::gitlab::s3cache::S3Store {
    let text = format!(
        "[[runners]]\nname = \"{name}\"\nurl = \"http://127.0.0.1:9\"\ntoken = \"{token}\"\narch = \"riscv64\"\n{section}"
    );
    let cfg = runner::serve::ServeConfig::parse(Path::new("serve.toml"), &text).expect("config");
    let cache = cfg.runners[0].cache.clone().expect("[runners.cache]");
    runner::gitlab::s3cache::S3Store::new(&cache, token, max).expect("store")
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn s3_cache_round_trips_through_a_real_s3_server_shared_or_per_runner() {
    use e2e::s3_server::{S3Server, SECRET_KEY};
    use runner::gitlab::s3cache::S3Error;
    let s3 = S3Server::start();
    s3.bucket("ci-cache");
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("up.zip");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(&archive, &data).unwrap();
    let shared = s3.runners_cache("ci-cache", SECRET_KEY, "Shared = true\nPath = \"ci\"");
    let own = s3.runners_cache("ci-cache", SECRET_KEY, "");
    let a = s3_store("a", "glrt-t1_aaaaaaaaaaaa", &shared, 1 << 20);
    let b = s3_store("b", "glrt-t1_bbbbbbbbbbbb", &shared, 1 << 20);
    let a_own = s3_store("a", "glrt-t1_aaaaaaaaaaaa", &own, 1 << 20);
    let b_own = s3_store("b", "glrt-t1_bbbbbbbbbbbb", &own, 1 << 20);
    block_on(async {
        // Shared: what one runner entry pushes, another restores, byte for byte.
        a.put(42, "deps-non_protected", &archive).await.unwrap();
        let got = dir.path().join("down.zip");
        let size = b.get(42, "deps-non_protected", &got).await.unwrap();
        assert_eq!(size, Some(data.len() as u64));
        assert_eq!(std::fs::read(&got).unwrap(), data);
        // Missing key, other project: no cache, not an error.
        assert_eq!(b.get(43, "deps-non_protected", &got).await.unwrap(), None);
        assert_eq!(b.get(42, "other", &got).await.unwrap(), None);
        // Not shared: each runner token has its own.
        a_own.put(42, "k", &archive).await.unwrap();
        assert_eq!(b_own.get(42, "k", &got).await.unwrap(), None);
        assert!(a_own.get(42, "k", &got).await.unwrap().is_some());
        // An archive over cache_max_size is refused while it downloads.
        let small = s3_store("b", "glrt-t1_bbbbbbbbbbbb", &shared, 1000);
        let e = small.get(42, "deps-non_protected", &got).await.unwrap_err();
        assert!(matches!(e, S3Error::TooLarge { .. }), "{e}");
        // A wrong secret: the server's refusal, named, and the secret in no message.
        let wrong = s3_store(
            "a",
            "glrt-t1_a",
            &s3.runners_cache("ci-cache", "not-the-secret", "Shared = true"),
            1 << 20,
        );
        // (The server refuses an upload before it reads the body and closes the connection:
        // the store asks again without one to say why.)
        for (e, want) in [
            (
                wrong.put(42, "k", &archive).await.unwrap_err(),
                "answered 403",
            ),
            (
                wrong.get(42, "deps-non_protected", &got).await.unwrap_err(),
                "answered 403 SignatureDoesNotMatch",
            ),
        ] {
            let msg = runner::outcome::chain(&e);
            assert!(msg.contains(want), "{msg}");
            assert!(
                !msg.contains("not-the-secret") && !msg.contains("X-Amz-Signature"),
                "{msg}"
            );
        }
        // Nothing was written with the wrong key.
        assert_eq!(b_own.get(42, "k", &got).await.unwrap(), None);
    });
    // gitlab-runner's object names.
    let objects = s3.objects();
    assert!(
        objects.contains(&"ci-cache/ci/project/42/deps-non_protected".to_string()),
        "{objects:?}"
    );
    assert!(
        objects.contains(&"ci-cache/runner/aaaaaaaaa/project/42/k".to_string()),
        "{objects:?}"
    );
}

#[test]
fn a_bad_runners_cache_section_stops_serve_at_start_naming_the_key() {
    let cache = private_cache();
    // (section, message part)
    let cases = [
        (
            "[runners.cache]\nType = \"s3\"\n[runners.cache.s3]\nServerAddress = \"127.0.0.1:9\"\nAccessKey = \"a\"\nSecretKey = \"hush-hush\"\n",
            "runner 'x': [runners.cache.s3] BucketName is missing",
        ),
        (
            "[runners.cache]\nType = \"gcs\"\n",
            "runner 'x': [runners.cache] Type = \"gcs\" is not supported",
        ),
        ("[runners.cache]\nType = \"s3\"\n[runners.cache.s3]\nBucket = \"b\"\n", "Bucket"),
    ];
    for (section, want) in cases {
        let mut serve = Serve::start(
            cache.path(),
            &format!("[[runners]]\nname = \"x\"\nurl = \"http://127.0.0.1:9\"\ntoken = \"t\"\narch = \"riscv64\"\n{section}"),
        );
        let status = serve.wait_exit(Duration::from_secs(30));
        let log = serve.log();
        assert_eq!(status.code(), Some(78), "{log}");
        let line = log.lines().next().unwrap_or_default();
        assert!(
            line.starts_with("runner: error: ") && line.contains(want),
            "{want}: {log}"
        );
        assert!(!log.contains("hush-hush"), "{log}");
    }
}

/// The names in a zip, sorted.
fn zip_names(data: &[u8]) -> Vec<String> {
    let mut names: Vec<String> = zip::ZipArchive::new(std::io::Cursor::new(data))
        .expect("zip")
        .file_names()
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

#[test]
fn cache_untracked_keeps_what_git_does_not_track_and_restores_it() {
    let cache = private_cache();
    let (_repo, bare, sha) = bare_repo(&[
        ("tracked.txt", b"tracked content\n"),
        (".gitignore", b"build/\n"),
    ]);
    let gl = FakeGitlab::start(TOKEN);
    let _serve = Serve::start(cache.path(), &config(&gl.url));
    let run = |id: u64, script: &[&str], artifacts: serde_json::Value| {
        let mut job = job_payload(id, script, &[], &[("GIT_STRATEGY", "clone", false)], 600);
        job["git_info"]["repo_url"] = json!(format!("file://{}", bare.display()));
        job["git_info"]["sha"] = json!(sha);
        job["cache"] = json!([{"key": "u-non_protected", "untracked": true, "policy": "pull-push",
            "paths": [], "when": "on_success"}]);
        job["artifacts"] = artifacts;
        gl.enqueue(job);
        let j = gl.wait_final(id, JOB_DEADLINE);
        let log = trace(&j);
        assert_eq!(
            j.final_update.as_ref().unwrap()["state"],
            "success",
            "{id}: {log}"
        );
        (j, log)
    };
    // 1. An ignored file, an untracked one, and a change to a tracked one.
    let (j, log) = run(
        2001,
        &[
            "mkdir -p build",
            "echo ignored-by-2001 > build/out.o",
            "echo untracked-by-2001 > new.txt",
            "echo changed-by-2001 > tracked.txt",
        ],
        json!([{"name": "all", "paths": [], "untracked": true, "when": "on_success",
            "artifact_type": "archive", "artifact_format": "zip"}]),
    );
    assert!(
        log.contains("Created cache u-non_protected (2 file(s)"),
        "{log}"
    );
    let archives = cache_archives(cache.path());
    assert_eq!(archives.len(), 1, "{archives:?}");
    let zip = std::fs::read(&archives[0].0).unwrap();
    // Neither the tracked files (changed or not) nor .git.
    assert_eq!(zip_names(&zip), ["build/out.o", "new.txt"]);
    // artifacts:untracked takes the same files.
    let upload = j.artifacts.iter().find(|u| u.file_name == "all.zip");
    let upload = upload.unwrap_or_else(|| panic!("no artifact upload\n{log}"));
    assert_eq!(zip_names(&upload.data), ["build/out.o", "new.txt"]);
    // 2. Same key: the untracked files are back, the tracked one is the checkout's.
    let (_, log) = run(
        2002,
        &[
            "cat build/out.o new.txt",
            "grep -qx 'tracked content' tracked.txt && echo tracked-is-the-checkouts",
        ],
        json!([]),
    );
    for want in [
        "Successfully extracted cache u-non_protected",
        "ignored-by-2001",
        "untracked-by-2001",
        "tracked-is-the-checkouts",
    ] {
        assert!(log.contains(want), "{want}: {log}");
    }
    assert_eq!(gl.violations(), Vec::<String>::new());
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}

#[test]
fn s3_shared_cache_crosses_runner_entries_pull_does_not_push_and_a_wrong_secret_only_warns() {
    use e2e::s3_server::{S3Server, SECRET_KEY};
    let cache = private_cache();
    let s3 = S3Server::start();
    s3.bucket("ci-cache");
    const TOKEN2: &str = "glrt-second-token-5678";
    const TOKEN3: &str = "glrt-third-token-9012";
    let (gl1, gl2, gl3) = (
        FakeGitlab::start(TOKEN),
        FakeGitlab::start(TOKEN2),
        FakeGitlab::start(TOKEN3),
    );
    let entry = |name: &str, url: &str, token: &str, secret: &str| {
        format!(
            "\n[[runners]]\nname = \"{name}\"\nurl = \"{url}\"\ntoken = \"{token}\"\narch = \"riscv64\"\nimage = \"debian-13\"\ngit_protocols = [\"file\"]\n{}",
            s3.runners_cache("ci-cache", secret, "Shared = true")
        )
    };
    let cfg = format!(
        "concurrent = 2\ncheck_interval = 1\nshutdown_timeout = 30\n{}{}{}",
        entry("one", &gl1.url, TOKEN, SECRET_KEY),
        entry("two", &gl2.url, TOKEN2, SECRET_KEY),
        entry("three", &gl3.url, TOKEN3, "a-wrong-secret-key"),
    );
    let serve = Serve::start(cache.path(), &cfg);
    let run = |gl: &FakeGitlab, id: u64, script: &[&str], policy: &str| {
        let mut job = job_payload(id, script, &[], &[("GIT_STRATEGY", "none", false)], 600);
        job["cache"] = json!([{"key": "s3-non_protected", "untracked": false, "policy": policy,
            "paths": ["vendor/"], "when": "on_success"}]);
        gl.enqueue(job);
        let j = gl.wait_final(id, JOB_DEADLINE);
        let log = trace(&j);
        assert_eq!(
            j.final_update.as_ref().unwrap()["state"],
            "success",
            "{id}: {log}"
        );
        assert!(
            !log.contains(SECRET_KEY) && !log.contains("a-wrong-secret-key"),
            "{log}"
        );
        assert!(!log.contains("X-Amz-Signature"), "{log}");
        log
    };
    let object = s3.root.join("ci-cache/project/42/s3-non_protected");
    // 1. Entry one pushes to the shared object.
    let log = run(
        &gl1,
        2101,
        &["mkdir -p vendor", "echo from-entry-one > vendor/data.txt"],
        "pull-push",
    );
    assert!(log.contains("no cache for s3-non_protected"), "{log}");
    assert!(
        log.contains("Created cache s3-non_protected (1 file(s)")
            && log.contains("in the shared cache"),
        "{log}"
    );
    let pushed = std::fs::read(&object).unwrap_or_else(|e| panic!("{e}: {:?}", s3.objects()));
    assert_eq!(zip_names(&pushed), ["vendor/data.txt"]);
    // 2. Entry two (another runner, another token) restores it; `pull` uploads nothing.
    let log = run(
        &gl2,
        2102,
        &[
            "cat vendor/data.txt",
            "echo changed-by-two > vendor/data.txt",
        ],
        "pull",
    );
    assert!(log.contains("from-entry-one"), "{log}");
    assert!(
        log.contains("Successfully extracted cache s3-non_protected"),
        "{log}"
    );
    assert!(!log.contains("Created cache"), "{log}");
    assert_eq!(
        std::fs::read(&object).unwrap(),
        pushed,
        "pull changed the object"
    );
    // 3. A wrong secret key: warnings, no download, no upload, the job passes.
    let log = run(
        &gl3,
        2103,
        &[
            "test ! -e vendor/data.txt",
            "mkdir -p vendor",
            "echo three > vendor/x",
        ],
        "pull-push",
    );
    assert!(
        log.contains("WARNING: cannot download cache s3-non_protected"),
        "{log}"
    );
    assert!(log.contains("answered 403"), "{log}");
    assert!(
        log.contains("WARNING: cache s3-non_protected not uploaded: the cache server answered 403"),
        "{log}"
    );
    assert_eq!(std::fs::read(&object).unwrap(), pushed);
    let service_log = serve.log();
    assert!(!service_log.contains(SECRET_KEY) && !service_log.contains("a-wrong-secret-key"));
    for gl in [&gl1, &gl2, &gl3] {
        assert_eq!(gl.violations(), Vec::<String>::new());
    }
    drop(serve);
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}

#[test]
fn cache_untracked_over_max_artifacts_size_is_a_warning_not_a_failure() {
    let cache = private_cache();
    let gl = FakeGitlab::start(TOKEN);
    let cfg = format!(
        "{}[runners.limits]\nmax_artifacts_size = \"64K\"\n",
        config(&gl.url)
    );
    let _serve = Serve::start(cache.path(), &cfg);
    let mut job = job_payload(
        2201,
        &[
            "head -c 200000 /dev/urandom > big.bin",
            "echo small > report.txt",
        ],
        &[],
        &[("GIT_STRATEGY", "none", false)],
        600,
    );
    job["cache"] = json!([{"key": "big-non_protected", "untracked": true, "policy": "push",
        "paths": [], "when": "on_success"}]);
    job["artifacts"] = json!([{"name": "report", "paths": ["report.txt"], "when": "on_success",
        "artifact_type": "archive", "artifact_format": "zip"}]);
    gl.enqueue(job);
    let j = gl.wait_final(2201, JOB_DEADLINE);
    let log = trace(&j);
    assert_eq!(
        j.final_update.as_ref().unwrap()["state"],
        "success",
        "{log}"
    );
    assert!(
        log.contains("WARNING: cache big-non_protected: the untracked files came to")
            && log.contains("over this runner's max_artifacts_size = 64K; not saved"),
        "{log}"
    );
    assert!(cache_archives(cache.path()).is_empty());
    // The artifacts still go up, without the untracked files.
    let upload = j.artifacts.iter().find(|u| u.file_name == "report.zip");
    let upload = upload.unwrap_or_else(|| panic!("no artifact upload\n{log}"));
    assert_eq!(zip_names(&upload.data), ["report.txt"]);
    assert_serve_clean(cache.path(), Duration::from_secs(10));
}
