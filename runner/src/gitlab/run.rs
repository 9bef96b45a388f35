//! One job from pick-up to final report: parse the payload, say `running`, turn the job into
//! a `SuitePlan` (arch and image, variables, steps, artifacts), check out its sources on the
//! host, run it in a VM while the log streams to GitLab, upload JUnit reports and artifacts,
//! and send the final state — derived from the run's `Outcome` by [`final_state`] alone.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use engine::vm::GuestCommand;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tracing::Instrument;

use super::artifacts::{self, Upload};
use super::client::Client;
use super::config::RunnerEntry;
use super::job::{self, Artifact, Job, JobHandle, When};
use super::script;
use super::trace::{JobLog, Signals, Uploader};
use crate::events::{Event, GuestReport, Reporter, Reporters, RunId};
use crate::execute::{run_suite_with, Controls};
use crate::outcome::Outcome;
use crate::plan::{GuestFile, StepPlan, StepWhen, SuitePlan, WorkspacePlan, GUEST_WORKSPACE};
use crate::report::junit::JunitReporter;
use crate::serve::{ServeContext, Slot};
use crate::sources::{self, Checkout, GitStrategy};

/// The job variable that picks another architecture among the entry's `allowed_arches`.
pub const ARCH_VARIABLE: &str = "RUNNER_ARCH";
/// The job variable that picks another image among the entry's `allowed_images`.
pub const IMAGE_VARIABLE: &str = "RUNNER_IMAGE";
/// The job variable that adds the runner's step-level JUnit report (`true`/`1`).
pub const STEP_JUNIT_VARIABLE: &str = "RUNNER_STEP_JUNIT";
/// The job variable for after_script's timeout (e.g. `10m`); GitLab's default is 5 minutes.
pub const AFTER_SCRIPT_TIMEOUT_VARIABLE: &str = "RUNNER_AFTER_SCRIPT_TIMEOUT";
const AFTER_SCRIPT_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Where `file: true` variables are written in the guest (the variable holds the path).
const GUEST_FILE_VARIABLES: &str = "/tmp/runner-job/variables";
/// Largest source tree copied into the guest.
const MAX_SOURCES: u64 = 2 << 30;

/// What every job of one `[[runners]]` entry shares.
#[derive(Debug)]
pub struct EntryContext {
    pub entry: RunnerEntry,
    pub client: Client,
    /// The runner's `info` object, sent with every request.
    pub info: Value,
    pub serve: ServeContext,
    /// `GIT_STRATEGY: fetch` directories in use by a running job (see [`checkout_dir`]).
    pub fetch_dirs: Mutex<HashSet<PathBuf>>,
}

/// Runs the job GitLab handed over in `body` and reports it. Holds `slot` and `permit` until
/// the VM is gone. Never fails: whatever goes wrong is reported to GitLab against the job.
pub async fn run_job(
    ectx: Arc<EntryContext>,
    body: bytes::Bytes,
    slot: Slot,
    permit: OwnedSemaphorePermit,
) {
    let handle: JobHandle = match serde_json::from_slice(&body) {
        Ok(h) => h,
        Err(e) => {
            // Without id and token there is nothing to report against.
            tracing::error!("GitLab handed out a job without a usable id/token ({e}); it cannot be run or reported");
            return;
        }
    };
    let span = tracing::info_span!("job", job_id = handle.id, vm_id = tracing::field::Empty);
    run_job_inner(ectx, handle, body, slot, permit)
        .instrument(span)
        .await
}

async fn run_job_inner(
    ectx: Arc<EntryContext>,
    handle: JobHandle,
    body: bytes::Bytes,
    slot: Slot,
    permit: OwnedSemaphorePermit,
) {
    let picked_up = std::time::Instant::now();
    let parsed = Job::parse(&body);
    let (secrets, prefixes) = match &parsed {
        Ok(j) => (j.secrets(), j.features.token_mask_prefixes.clone()),
        Err(_) => (vec![handle.token.clone()], Vec::new()),
    };
    tracing::info!(
        name = parsed
            .as_ref()
            .map(|j| j.job_info.name.as_str())
            .unwrap_or("?"),
        "job received"
    );
    let mut uploader = Uploader::new(
        ectx.client.clone(),
        handle.id,
        handle.token.clone(),
        ectx.info.clone(),
        JobLog::new(secrets, prefixes, ectx.entry.output_limit_bytes()),
    );
    let signals = Signals::new();
    // Tell GitLab at once that the job runs (and learn if it is already cancelled).
    let running = json!({"token": handle.token, "state": "running", "info": ectx.info});
    match ectx
        .client
        .update_job(handle.id, &handle.token, &running)
        .await
    {
        Ok(r) if r.status.is_success() => {}
        Ok(r) => tracing::warn!(status = %r.status, "GitLab did not take state=running"),
        Err(e) => tracing::warn!("cannot set the job running: {e}"),
    }
    // GitLab's hard cancel and the service's abort both stop the run at once.
    let (cancel_tx, cancel_rx) = watch::channel(false);
    let forward = {
        let mut gitlab_cancel = signals.cancel.subscribe();
        let shutdown = ectx.serve.shutdown.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.aborting() => tracing::info!("service aborting: cancelling the job"),
                _ = gitlab_cancel.wait_for(|c| *c) => {}
            }
            cancel_tx.send_replace(true);
        })
    };
    let (log_tx, log_rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let work = execute(
        &ectx,
        parsed,
        log_tx,
        cancel_rx,
        signals.interrupt.subscribe(),
        picked_up,
    );
    let (state, ()) = tokio::join!(work, uploader.live(log_rx, &signals));
    forward.abort();
    // The VM is gone: free its place before the (possibly slow) final report.
    drop(slot);
    drop(permit);
    let delivered = uploader.finish(state.clone()).await;
    tracing::info!(
        state = %state["state"].as_str().unwrap_or("?"),
        failure_reason = %state["failure_reason"].as_str().unwrap_or(""),
        delivered,
        duration_s = picked_up.elapsed().as_secs_f64(),
        "job finished"
    );
}

/// The job itself; writes its log to `log` and returns the final state for GitLab.
async fn execute(
    ectx: &EntryContext,
    parsed: Result<Job, job::JobError>,
    log: mpsc::UnboundedSender<Vec<u8>>,
    cancel: watch::Receiver<bool>,
    interrupt: watch::Receiver<bool>,
    picked_up: std::time::Instant,
) -> Value {
    let say = |s: &str| {
        let _ = log.send(s.as_bytes().to_vec());
    };
    let entry = &ectx.entry;
    say(&format!(
        "\x1b[1mRunning with runner {} on {} (emulated VMs, QEMU)\x1b[0;m\n",
        env!("CARGO_PKG_VERSION"),
        entry.name
    ));
    let job = match parsed {
        Ok(j) => j,
        Err(e) => {
            tracing::error!("{e}");
            say(&format!("\x1b[31;1mERROR: {e}\x1b[0;m\n"));
            return failed("runner_system_failure", None);
        }
    };
    let work = match tempfile::Builder::new().prefix("runner-job-").tempdir() {
        Ok(d) => d,
        Err(e) => {
            say(&format!(
                "\x1b[31;1mERROR: cannot create a work directory: {e}\x1b[0;m\n"
            ));
            return failed("runner_system_failure", None);
        }
    };
    let mut prepared = match prepare(entry, &job, work.path()) {
        Ok(p) => p,
        Err(message) => {
            tracing::warn!("job refused: {message}");
            say(&format!("\x1b[31;1mERROR: {message}\x1b[0;m\n"));
            return failed("script_failure", None);
        }
    };
    for a in job
        .artifacts
        .iter()
        .filter(|a| a.artifact_type != "junit" && a.artifact_type != "archive")
    {
        say(&format!(
            "\x1b[33;1mWARNING: artifacts of type '{}' are not supported by this runner and are not uploaded\x1b[0;m\n",
            a.artifact_type
        ));
    }
    say(&format!(
        "Using {} on {} ({} vCPUs, {} MiB)\n",
        prepared.plan.image, prepared.plan.id.arch, prepared.plan.cpus, prepared.plan.memory_mib
    ));

    // Sources, on the host.
    let mut fetch_guard = None;
    if let Some(mut checkout) = prepared.checkout.take() {
        let (dest, guard) = checkout_dir(ectx, &job, &checkout, work.path());
        if guard.is_none() && checkout.strategy == GitStrategy::Fetch {
            checkout.strategy = GitStrategy::Clone;
        }
        checkout.dest = dest;
        fetch_guard = guard;
        say(&format!(
            "section_start:{}:get_sources\r\x1b[0K\x1b[36;1mGetting source from Git repository ({:?}, {})\x1b[0;m\n",
            unix_now(),
            checkout.strategy,
            short(&checkout.sha)
        ));
        let result = sources::checkout(&checkout, cancel.clone()).await;
        match result {
            Ok(done) => {
                say(&sources::redact(&done.log));
                if !done.log.ends_with('\n') && !done.log.is_empty() {
                    say("\n");
                }
                say(&format!("Checked out {}\n", short(&done.sha)));
                prepared.plan.workspace = Some(WorkspacePlan {
                    root: checkout.dest.clone(),
                    exclude: Vec::new(),
                    max_size: MAX_SOURCES,
                });
            }
            Err(e) => {
                let msg = sources::redact(&e.to_string());
                say(&format!(
                    "\x1b[31;1mERROR: getting sources failed: {msg}\x1b[0;m\n"
                ));
                let reason = match e {
                    sources::SourceError::Cancelled | sources::SourceError::Spawn(_) => {
                        "runner_system_failure"
                    }
                    _ => "script_failure",
                };
                return failed(reason, None);
            }
        }
        say(&format!("section_end:{}:get_sources\r\x1b[0K", unix_now()));
    }

    // The run.
    let found = Arc::new(Mutex::new(Found::default()));
    let mut reporters = Reporters::default();
    reporters.add(Box::new(TraceReporter {
        log: log.clone(),
        found: found.clone(),
        span: tracing::Span::current(),
        picked_up,
    }));
    let step_junit_path = work.path().join("runner-steps.xml");
    if prepared.step_junit {
        reporters.add(Box::new(JunitReporter::new(step_junit_path.clone())));
    }
    let outcome = run_suite_with(
        &prepared.plan,
        &ectx.serve.settings,
        &mut reporters,
        Controls { cancel, interrupt },
    )
    .await;
    if let Err(e) = reporters.finish() {
        say(&format!("WARNING: cannot write the step report: {e}\n"));
    }
    drop(fetch_guard);

    // Artifacts (not for a cancelled job: GitLab has already let go of it).
    if outcome != Outcome::Cancelled {
        let found = std::mem::take(&mut *found.lock().expect("not poisoned"));
        upload_results(
            ectx,
            &job,
            &prepared,
            &outcome,
            found,
            &step_junit_path,
            &say,
        )
        .await;
    }
    say(&format!("{}\n", summary(&outcome)));
    final_state(&outcome)
}

/// The one mapping from how a run ended to GitLab's state, failure_reason and exit_code.
pub fn final_state(outcome: &Outcome) -> Value {
    match outcome {
        Outcome::Passed | Outcome::Skipped => json!({"state": "success"}),
        Outcome::Failed { exit_code, .. } => failed("script_failure", *exit_code),
        Outcome::TimedOut => failed("job_execution_timeout", None),
        // A cancel by GitLab (GitLab ignores the reason then) or by the service's abort.
        Outcome::Cancelled => failed("runner_system_failure", None),
        Outcome::InfraError { .. } => failed("runner_system_failure", None),
    }
}

fn failed(reason: &str, exit_code: Option<i32>) -> Value {
    let mut v = json!({"state": "failed", "failure_reason": reason});
    if let Some(c) = exit_code {
        v["exit_code"] = json!(c);
    }
    v
}

/// The last line of the log, like gitlab-runner's.
fn summary(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Passed | Outcome::Skipped => "\x1b[32;1mJob succeeded\x1b[0;m".into(),
        Outcome::Failed {
            exit_code: Some(c), ..
        } => format!("\x1b[31;1mERROR: Job failed: exit code {c}\x1b[0;m"),
        Outcome::TimedOut => {
            "\x1b[31;1mERROR: Job failed: execution took longer than the job timeout\x1b[0;m".into()
        }
        Outcome::Cancelled => "\x1b[31;1mERROR: Job failed: canceled\x1b[0;m".into(),
        other => format!("\x1b[31;1mERROR: Job failed: {other}\x1b[0;m"),
    }
}

/// A job turned into a plan, plus what happens around it.
#[derive(Debug)]
struct Prepared {
    plan: SuitePlan,
    checkout: Option<Checkout>,
    step_junit: bool,
    junit: Option<Artifact>,
    archive: Option<Artifact>,
}

/// Validates the job against the entry and builds its plan. Errors are the job's fault
/// (one line for its log).
fn prepare(entry: &RunnerEntry, job: &Job, work: &std::path::Path) -> Result<Prepared, String> {
    let arch = match job.var(ARCH_VARIABLE).filter(|v| !v.is_empty()) {
        None => entry.arch,
        Some(name) => {
            let allowed = entry.arches();
            let arch: engine::Arch = name
                .parse()
                .map_err(|e: engine::arch::UnknownArch| e.to_string())?;
            if !allowed.contains(&arch) {
                return Err(format!(
                    "{ARCH_VARIABLE}={name} is not allowed on runner '{}' (allowed: {}); pick one of those or add it to allowed_arches",
                    entry.name,
                    allowed.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
                ));
            }
            arch
        }
    };
    let image = match job.var(IMAGE_VARIABLE).filter(|v| !v.is_empty()) {
        None => entry.image.clone(),
        Some(name) => {
            let allowed = entry.images();
            if !allowed.iter().any(|i| i == name) {
                return Err(format!(
                    "{IMAGE_VARIABLE}={name} is not allowed on runner '{}' (allowed: {}); pick one of those or add it to allowed_images",
                    entry.name,
                    allowed.join(", ")
                ));
            }
            name.to_string()
        }
    };
    let timeout = Duration::from_secs(job.runner_info.timeout.max(1));

    // Variables: expanded unless raw; file variables become files whose path is the value.
    let raw: HashMap<String, String> = job
        .variables
        .iter()
        .map(|v| (v.key.clone(), v.value.clone()))
        .collect();
    let mut env: Vec<(String, String)> = Vec::new();
    let mut files = Vec::new();
    for v in &job.variables {
        if !valid_name(&v.key) {
            continue;
        }
        if v.file {
            let path = format!("{GUEST_FILE_VARIABLES}/{}", v.key);
            files.push(GuestFile {
                path: path.clone(),
                contents: v.value.clone().into_bytes(),
            });
            env.push((v.key.clone(), path));
        } else if v.raw {
            env.push((v.key.clone(), v.value.clone()));
        } else {
            env.push((v.key.clone(), job::expand(&v.value, &raw)));
        }
    }
    // What gitlab-runner itself adds.
    for (k, val) in [
        ("CI_PROJECT_DIR", GUEST_WORKSPACE),
        ("CI_BUILDS_DIR", "/"),
        ("CI_SERVER", "yes"),
        ("GITLAB_CI", "true"),
        ("CI", "true"),
        ("CI_RUNNER_EXECUTABLE_ARCH", arch.name()),
    ] {
        env.push((k.to_string(), val.to_string()));
    }

    let after_timeout = match job.var(AFTER_SCRIPT_TIMEOUT_VARIABLE) {
        Some(t) => humantime::parse_duration(t).map_err(|_| {
            format!("{AFTER_SCRIPT_TIMEOUT_VARIABLE}='{t}' is not a duration like 90s or 10m")
        })?,
        None => AFTER_SCRIPT_TIMEOUT,
    };
    if job.steps.is_empty() {
        return Err("the job has no steps (script) to run".into());
    }
    let steps = job
        .steps
        .iter()
        .map(|s| {
            let after = s.name == "after_script";
            StepPlan {
                name: s.name.clone(),
                // bash like gitlab-runner's shell executor (Debian images always have it).
                command: GuestCommand::Argv(vec![
                    "/bin/bash".into(),
                    "-c".into(),
                    script::step_script(&s.script),
                ]),
                timeout: if after {
                    after_timeout
                } else if s.timeout > 0 {
                    Duration::from_secs(s.timeout).min(timeout)
                } else {
                    timeout
                },
                env: Vec::new(),
                // after_script never changes the job's result (GitLab).
                allow_failure: after || s.allow_failure,
                when: match s.when {
                    When::OnSuccess => StepWhen::OnSuccess,
                    When::OnFailure => StepWhen::OnFailure,
                    When::Always => StepWhen::Always,
                },
            }
        })
        .map(|mut s| {
            s.env = env.clone();
            s
        })
        .collect();

    let junit = job
        .artifacts
        .iter()
        .find(|a| a.artifact_type == "junit")
        .cloned();
    let archive = job
        .artifacts
        .iter()
        .find(|a| a.artifact_type == "archive")
        .cloned();
    let junit_paths = junit.as_ref().map(|a| a.paths.clone()).unwrap_or_default();
    let archive_paths: Vec<String> = archive
        .as_ref()
        .map(|a| a.paths.iter().flat_map(|p| file_globs(p)).collect())
        .unwrap_or_default();
    for p in junit_paths.iter().chain(&archive_paths) {
        if p.starts_with('/') || p.split('/').any(|c| c == "..") {
            return Err(format!(
                "artifact path '{p}' must be relative to the project directory, without '..'"
            ));
        }
    }

    let strategy = match job.var("GIT_STRATEGY") {
        Some(s) => s.parse::<GitStrategy>()?,
        None if job.allow_git_fetch => GitStrategy::Fetch,
        None => GitStrategy::Clone,
    };
    let depth = match job.var("GIT_DEPTH").filter(|d| !d.is_empty()) {
        Some(d) => Some(
            d.parse::<u32>()
                .map_err(|_| format!("GIT_DEPTH '{d}' is not a number"))?,
        ),
        None => Some(job.git_info.depth),
    }
    .filter(|d| *d > 0);
    let checkout = (strategy != GitStrategy::None).then(|| Checkout {
        url: job.git_info.repo_url.clone(),
        sha: job.git_info.sha.clone(),
        refspecs: job.git_info.refspecs.clone(),
        depth,
        strategy,
        auth: None,
        dest: work.join("src"),
        timeout: Duration::from_secs(entry.clone_timeout.max(1)),
    });

    let step_junit = entry.step_junit
        || matches!(
            job.var(STEP_JUNIT_VARIABLE).map(|v| v.to_ascii_lowercase()),
            Some(ref v) if v == "true" || v == "1" || v == "yes"
        );
    let plan = SuitePlan {
        id: RunId {
            suite: job.job_info.name.clone(),
            arch,
        },
        image,
        project_dir: std::env::current_dir().ok(),
        workspace: None,
        host_setup: Vec::new(),
        steps,
        timeout,
        junit: junit_paths,
        artifacts: archive_paths,
        cpus: entry.cpus,
        memory_mib: entry.memory_mib()?,
        out_dir: work.join("artifacts"),
        files,
    };
    Ok(Prepared {
        plan,
        checkout,
        step_junit,
        junit,
        archive,
    })
}

/// Guest globs for an archive path: the path itself, and, in case it names a directory, the
/// files up to three levels below it (the guest-side lister matches files only).
fn file_globs(p: &str) -> Vec<String> {
    let p = p.trim_end_matches('/');
    if p.contains(['*', '?', '[']) {
        return vec![p.to_string()];
    }
    vec![
        p.to_string(),
        format!("{p}/*"),
        format!("{p}/*/*"),
        format!("{p}/*/*/*"),
    ]
}

fn valid_name(k: &str) -> bool {
    let mut c = k.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Where a checkout goes: for `fetch`, the project's persistent directory when no other job
/// uses it right now (the guard releases it); otherwise a fresh directory of this job.
fn checkout_dir<'a>(
    ectx: &'a EntryContext,
    job: &Job,
    c: &Checkout,
    work: &std::path::Path,
) -> (PathBuf, Option<FetchGuard<'a>>) {
    if c.strategy != GitStrategy::Fetch {
        return (work.join("src"), None);
    }
    let dir = ectx
        .serve
        .settings
        .store
        .root()
        .join("serve-builds")
        .join(sanitize(&ectx.entry.name))
        .join(job.job_info.project_id.to_string());
    let mut in_use = ectx.fetch_dirs.lock().expect("not poisoned");
    if in_use.insert(dir.clone()) {
        (
            dir.clone(),
            Some(FetchGuard {
                set: &ectx.fetch_dirs,
                dir,
            }),
        )
    } else {
        (work.join("src"), None)
    }
}

#[derive(Debug)]
struct FetchGuard<'a> {
    set: &'a Mutex<HashSet<PathBuf>>,
    dir: PathBuf,
}

impl Drop for FetchGuard<'_> {
    fn drop(&mut self) {
        if let Ok(mut s) = self.set.lock() {
            s.remove(&self.dir);
        }
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(8)]
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Uploads the JUnit report and the archive artifacts whose `when` fits the outcome.
async fn upload_results(
    ectx: &EntryContext,
    job: &Job,
    prepared: &Prepared,
    outcome: &Outcome,
    found: Found,
    step_junit: &std::path::Path,
    say: &(dyn Fn(&str) + Sync),
) {
    let success = outcome.is_success();
    let fits = |w: When| match w {
        When::OnSuccess => success,
        When::OnFailure => !success,
        When::Always => true,
    };
    // JUnit: the guest's reports, or the runner's step report (which already merges them).
    let junit_when = prepared
        .junit
        .as_ref()
        .map(|a| a.when)
        .unwrap_or(When::Always);
    let mut xmls: Vec<Vec<u8>> = Vec::new();
    if prepared.step_junit {
        if let Ok(x) = std::fs::read(step_junit) {
            xmls.push(x);
        }
    } else {
        xmls.extend(found.reports.iter().map(|r| r.xml.clone().into_bytes()));
    }
    if !xmls.is_empty() && fits(junit_when) {
        say(&format!(
            "Uploading JUnit report ({} file(s))\n",
            xmls.len()
        ));
        let expire = prepared
            .junit
            .as_ref()
            .map(|a| a.expire_in.as_str())
            .unwrap_or("");
        let result = match artifacts::gzip_members(xmls.iter().map(|x| x.as_slice())) {
            Ok(data) => {
                artifacts::upload(
                    &ectx.client,
                    job.id,
                    &job.token,
                    Upload {
                        file_name: "junit.xml.gz",
                        data,
                        artifact_type: "junit",
                        artifact_format: "gzip",
                        expire_in: expire,
                    },
                )
                .await
            }
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => say("JUnit report uploaded\n"),
            Err(e) => {
                tracing::warn!("{e}");
                say(&format!("\x1b[33;1mWARNING: {e}\x1b[0;m\n"));
            }
        }
    }
    if let Some(a) = &prepared.archive {
        if !found.artifacts.is_empty() && fits(a.when) {
            say(&format!(
                "Uploading artifacts ({} file(s))\n",
                found.artifacts.len()
            ));
            let result = match artifacts::zip_files(&prepared.plan.out_dir, &found.artifacts) {
                Ok(data) => {
                    let name = if a.name.is_empty() {
                        "artifacts.zip".to_string()
                    } else {
                        format!("{}.zip", a.name)
                    };
                    artifacts::upload(
                        &ectx.client,
                        job.id,
                        &job.token,
                        Upload {
                            file_name: &name,
                            data,
                            artifact_type: "archive",
                            artifact_format: "zip",
                            expire_in: &a.expire_in,
                        },
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => say("Artifacts uploaded\n"),
                Err(e) => {
                    tracing::warn!("{e}");
                    say(&format!("\x1b[33;1mWARNING: {e}\x1b[0;m\n"));
                }
            }
        } else if found.artifacts.is_empty() && fits(a.when) {
            say("WARNING: no files matched the artifact paths\n");
        }
    }
}

/// What the run brought back (from its last event).
#[derive(Debug, Default)]
struct Found {
    reports: Vec<GuestReport>,
    artifacts: Vec<PathBuf>,
}

/// Turns run events into job log text (GitLab's collapsible sections around each step).
struct TraceReporter {
    log: mpsc::UnboundedSender<Vec<u8>>,
    found: Arc<Mutex<Found>>,
    span: tracing::Span,
    picked_up: std::time::Instant,
}

impl std::fmt::Debug for TraceReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TraceReporter")
    }
}

impl TraceReporter {
    fn say(&self, s: String) {
        let _ = self.log.send(s.into_bytes());
    }
}

fn section_name(step: &str) -> String {
    if step == "script" {
        "step_script".into()
    } else {
        sanitize(step)
    }
}

impl Reporter for TraceReporter {
    fn on_event(&mut self, event: &Event) {
        match event {
            Event::Note { message } => self.say(format!("NOTE: {message}\n")),
            Event::ImageProgress { message, .. } => self.say(format!("image: {message}\n")),
            Event::VmBooting { id, accel } => self.say(format!(
                "section_start:{}:prepare_vm\r\x1b[0K\x1b[36;1mStarting a {} VM ({accel})\x1b[0;m\n",
                unix_now(),
                id.arch
            )),
            Event::VmBooted { facts, .. } => {
                self.span
                    .record("vm_id", tracing::field::display(&facts.vm_id));
                let _enter = self.span.enter();
                tracing::info!(
                    start = %facts.start,
                    boot_s = facts.boot_time.map(|d| d.as_secs_f64()).unwrap_or(0.0),
                    since_pickup_s = self.picked_up.elapsed().as_secs_f64(),
                    "VM ready"
                );
                self.say(format!(
                    "VM {} ready in {:.2} s ({}; kernel {}, QEMU {})\nsection_end:{}:prepare_vm\r\x1b[0K",
                    facts.vm_id,
                    facts.boot_time.unwrap_or_default().as_secs_f64(),
                    facts.start,
                    facts.kernel_version,
                    facts.qemu_version,
                    unix_now()
                ))
            }
            Event::StepStarted { step, .. } => self.say(format!(
                "section_start:{}:{}\r\x1b[0K\x1b[36;1mExecuting \"{}\" stage of the job script\x1b[0;m\n",
                unix_now(),
                section_name(step),
                section_name(step)
            )),
            Event::Output { bytes, .. } => {
                let _ = self.log.send(bytes.clone());
            }
            Event::StepFinished {
                step,
                outcome,
                duration,
                ..
            } => {
                if *outcome == Outcome::Skipped {
                    return;
                }
                let _enter = self.span.enter();
                tracing::info!(step = %step, outcome = %outcome, duration_s = duration.as_secs_f64(), "step finished");
                let mut s = String::new();
                if step == "after_script" && !outcome.is_success() {
                    s.push_str(&format!(
                        "\x1b[33;1mWARNING: after_script failed, but the job continues unaffected: {outcome}\x1b[0;m\n"
                    ));
                }
                s.push_str(&format!(
                    "section_end:{}:{}\r\x1b[0K",
                    unix_now(),
                    section_name(step)
                ));
                self.say(s);
            }
            Event::SuiteFinished {
                reports, artifacts, ..
            } => {
                let mut f = self.found.lock().expect("not poisoned");
                f.reports = reports.clone();
                f.artifacts = artifacts.clone();
            }
            Event::SuiteStarted { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_gitlab_states() {
        // (outcome, state, failure_reason, exit_code)
        let cases = [
            (Outcome::Passed, "success", None, None),
            (
                Outcome::Failed {
                    exit_code: Some(3),
                    signal: None,
                },
                "failed",
                Some("script_failure"),
                Some(3),
            ),
            (
                Outcome::Failed {
                    exit_code: None,
                    signal: Some(9),
                },
                "failed",
                Some("script_failure"),
                None,
            ),
            (
                Outcome::TimedOut,
                "failed",
                Some("job_execution_timeout"),
                None,
            ),
            (
                Outcome::Cancelled,
                "failed",
                Some("runner_system_failure"),
                None,
            ),
            (
                Outcome::InfraError {
                    kind: crate::outcome::InfraKind::Boot,
                    message: "x".into(),
                },
                "failed",
                Some("runner_system_failure"),
                None,
            ),
        ];
        for (o, state, reason, code) in cases {
            let v = final_state(&o);
            assert_eq!(v["state"], state, "{o}");
            assert_eq!(v["failure_reason"].as_str(), reason, "{o}");
            assert_eq!(v["exit_code"].as_i64(), code.map(i64::from), "{o}");
        }
    }

    fn entry() -> RunnerEntry {
        let cfg = crate::serve::ServeConfig::parse(
            std::path::Path::new("t.toml"),
            "[[runners]]\nname='r'\nurl='http://x'\ntoken='t'\narch='riscv64'\nallowed_arches=['aarch64']\n",
        )
        .unwrap();
        cfg.runners[0].clone()
    }

    fn job(vars: &str) -> Job {
        Job::parse(format!(r#"{{"id":1,"token":"jt","job_info":{{"name":"unit","project_id":5}},
            "git_info":{{"repo_url":"https://gitlab-ci-token:jt@h/p.git","sha":"0123456789012345678901234567890123456789","depth":20}},
            "runner_info":{{"timeout":600}},"variables":[{vars}],
            "steps":[{{"name":"script","script":["echo hi"],"timeout":600,"when":"on_success"}},
                     {{"name":"after_script","script":["echo bye"],"timeout":600,"when":"always"}}],
            "artifacts":[{{"name":"junit","paths":["report.xml"],"when":"always","artifact_type":"junit","artifact_format":"gzip"}}]}}"#).as_bytes()).unwrap()
    }

    #[test]
    fn a_job_becomes_a_plan() {
        let dir = tempfile::tempdir().unwrap();
        let j = job(
            r#"{"key":"A","value":"1"},{"key":"B","value":"x$A"},{"key":"R","value":"x$A","raw":true},
            {"key":"F","value":"file body","file":true},{"key":"GIT_STRATEGY","value":"none"},{"key":"RUNNER_ARCH","value":"aarch64"}"#,
        );
        let p = prepare(&entry(), &j, dir.path()).unwrap();
        assert_eq!(p.plan.id.arch, engine::Arch::Aarch64);
        assert!(p.checkout.is_none());
        let env = &p.plan.steps[0].env;
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("B"), Some("x1"));
        assert_eq!(get("R"), Some("x$A"));
        assert_eq!(get("F"), Some("/tmp/runner-job/variables/F"));
        assert_eq!(get("CI_PROJECT_DIR"), Some("/workspace"));
        assert_eq!(p.plan.files[0].contents, b"file body");
        assert_eq!(p.plan.steps[1].when, StepWhen::Always);
        assert!(p.plan.steps[1].allow_failure);
        assert_eq!(p.plan.steps[1].timeout, AFTER_SCRIPT_TIMEOUT);
        assert_eq!(p.plan.junit, ["report.xml"]);
    }

    #[test]
    fn git_settings_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let p = prepare(
            &entry(),
            &job(r#"{"key":"GIT_DEPTH","value":"3"}"#),
            dir.path(),
        )
        .unwrap();
        let c = p.checkout.unwrap();
        assert_eq!(c.strategy, GitStrategy::Clone);
        assert_eq!(c.depth, Some(3));
        // (variables, expected message part)
        let cases = [
            (r#"{"key":"RUNNER_ARCH","value":"x86_64"}"#, "not allowed"),
            (r#"{"key":"RUNNER_ARCH","value":"mips"}"#, "mips"),
            (
                r#"{"key":"RUNNER_IMAGE","value":"other"}"#,
                "allowed_images",
            ),
            (r#"{"key":"GIT_STRATEGY","value":"svn"}"#, "GIT_STRATEGY"),
            (r#"{"key":"GIT_DEPTH","value":"deep"}"#, "GIT_DEPTH"),
        ];
        for (vars, want) in cases {
            let e = prepare(&entry(), &job(vars), dir.path()).unwrap_err();
            assert!(e.contains(want), "{vars}: {e}");
        }
    }
}
