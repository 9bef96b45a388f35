//! One job from pick-up to final report: parse the payload, say `running`, plan it
//! (`prepare`), check out its sources on the host, restore its caches and earlier jobs'
//! artifacts into them (`workspace`), run it in a VM while the log streams to GitLab
//! (`reporter` → `trace`), save its caches, upload JUnit reports and artifacts, and send the
//! final state — derived from the run's `Outcome` by [`final_state`] alone.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tracing::Instrument;

use super::artifacts::upload_results;
use super::entry::EntryContext;
use super::job::{self, Job, JobHandle};
use super::prepare::prepare;
use super::reporter::{sanitize, unix_now, Found, TraceReporter};
use super::trace::{JobLog, Signals, Uploader};
use super::workspace;
use crate::events::Reporters;
use crate::outcome::Outcome;
use crate::report::junit::JunitReporter;
use crate::run::execute::{run_suite_with, Controls};
use crate::run::plan::WorkspacePlan;
use crate::serve::Slot;
use crate::sources::{self, Checkout, GitStrategy};

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
        Ok(r) if r.status.is_success() => signals.react(&r),
        Ok(r) if matches!(r.status.as_u16(), 403 | 404) => {
            tracing::warn!(status = %r.status, "GitLab no longer wants this job: not running it");
            signals.cancel.send_replace(true);
        }
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
    // The job runs in a task of its own: should it panic, the job is still reported (failed)
    // instead of being left running in GitLab.
    let task = {
        let ectx = ectx.clone();
        let interrupt = signals.interrupt.subscribe();
        let resources = (slot, permit);
        tokio::spawn(
            async move {
                execute(
                    &ectx, parsed, log_tx, cancel_rx, interrupt, picked_up, resources,
                )
                .await
            }
            .in_current_span(),
        )
    };
    let work = async {
        task.await.unwrap_or_else(|e| {
            tracing::error!("the job's task failed: {e}");
            failed("runner_system_failure", None)
        })
    };
    let (state, ()) = tokio::join!(work, uploader.live(log_rx, &signals));
    forward.abort();
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
    // The scheduler slot and entry permit: held until the VM is gone, then freed before the
    // (possibly slow) uploads and final report.
    resources: (Slot, OwnedSemaphorePermit),
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
            let e = crate::outcome::chain(&e);
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
    // The host directory that becomes the guest's workspace, if any.
    let mut root: Option<PathBuf> = None;
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
            sources::short(&checkout.sha)
        ));
        let result = sources::checkout(&checkout, cancel.clone()).await;
        match result {
            Ok(done) => {
                say(&sources::redact(&done.log));
                if !done.log.ends_with('\n') && !done.log.is_empty() {
                    say("\n");
                }
                say(&format!("Checked out {}\n", sources::short(&done.sha)));
                root = Some(checkout.dest.clone());
            }
            Err(e) => {
                let msg = sources::redact(&crate::outcome::chain(&e));
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

    // `untracked: true`: the guest leaves out what git tracks, the host checks it again.
    if prepared.plan.untracked.is_some() {
        workspace::list_tracked(ectx, &mut prepared, root.as_deref(), &say).await;
    }

    // The caches, then artifacts of earlier jobs, into the workspace (gitlab-runner's order).
    let caches = workspace::cache_store(ectx);
    if let Err(reason) =
        workspace::restore_caches(&caches, ectx, &job, &mut root, work.path(), &log).await
    {
        return failed(reason, None);
    }
    // Artifacts of earlier jobs, into the workspace (after the checkout, as gitlab-runner).
    if let Err(reason) =
        workspace::restore_dependencies(ectx, &job, &mut root, work.path(), &cancel, &say).await
    {
        return failed(reason, None);
    }

    // The workspace is packed in memory for the guest: the operator's cap first.
    if let Some(root) = root {
        let cap = entry.limits.max_workspace;
        match sources::tree_size(&root) {
            Ok(size) if size > cap => {
                let what = if job.dependencies.is_empty() {
                    "the job's sources"
                } else {
                    "the job's sources and dependencies' artifacts"
                };
                let over = crate::serve::OverLimit {
                    what: what.into(),
                    asked: crate::serve::limits::size_text(size),
                    key: "max_workspace_size",
                    cap: crate::serve::limits::size_text(cap),
                    fix: "use a shallower GIT_DEPTH or GIT_STRATEGY none, or ask the runner's operator to raise the limit",
                };
                tracing::warn!("job refused: {over}");
                say(&format!("\x1b[31;1mERROR: {over}\x1b[0;m\n"));
                return failed("script_failure", None);
            }
            // Unreadable: packing reports it (as the host's problem).
            _ => {}
        }
        prepared.plan.workspace = Some(WorkspacePlan {
            root,
            exclude: Vec::new(),
            max_size: cap,
        });
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
    drop(resources);
    if let Err(e) = reporters.finish() {
        say(&format!("WARNING: cannot write the step report: {e}\n"));
    }
    drop(fetch_guard);

    // Artifacts (not for a cancelled job: GitLab has already let go of it).
    if outcome != Outcome::Cancelled {
        let found = std::mem::take(&mut *found.lock().expect("not poisoned"));
        workspace::save_caches(&caches, &job, &prepared, &outcome, &found, &log).await;
        upload_results(
            ectx,
            &job,
            &prepared,
            &outcome,
            &found,
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
}
