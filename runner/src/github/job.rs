//! One accepted delivery, start to end: fetch the commit on the host, read its runner.toml,
//! create one queued check run per suite × arch, run each in its own VM when the scheduler
//! gives it a slot, and complete every check run — also on failure and on shutdown.
//!
//! Problems before any suite can run (no runner.toml, a malformed one, a failed clone) get
//! one check run of their own that says what is wrong, so the user never sees silence.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::Instrument;

use super::app::App;
use super::check_output::{self, SuiteLines};
use super::checks::Checks;
use super::payload::Target;
use super::reporter::{self, CheckRunReporter, RenderContext};
use super::wire::{
    self, Annotation, CheckRunUpdate, Completion, Conclusion, Level, NewCheckRun, Output, Repo,
    Status,
};
use crate::events::Reporters;
use crate::outcome::Outcome;
use crate::run::execute::run_suite;
use crate::run::plan::{self, Overrides, SuitePlan};
use crate::serve::{Limits, ServeContext};
use crate::sources::{self, Checkout, GitStrategy};
use crate::suite::{SuiteError, SuiteFile, SUITE_FILE_NAME};

/// Name prefix of every check run we create.
pub const CHECK_PREFIX: &str = "runner";
/// `external_id` of the check runs that stand for the whole commit (no runner.toml, a bad
/// one, a failed clone): re-requesting one of them re-runs everything.
pub const EXTERNAL_ID_ALL: &str = "all";
/// Commits fetched: the tested one is enough (its history stays out of the guest anyway).
const CLONE_DEPTH: u32 = 1;
/// Clones at once: a burst of pushes must not start a hundred git processes.
pub const PARALLEL_CHECKOUTS: usize = 4;

/// What every job of the service shares.
#[derive(Debug)]
pub struct Shared {
    pub app: Arc<App>,
    pub checks: Checks,
    pub ctx: ServeContext,
    /// Architectures for runner.toml files that name none.
    pub default_arches: Vec<engine::Arch>,
    pub allow_host_setup: bool,
    pub clone_timeout: Duration,
    /// The operator's caps on what a runner.toml may ask for.
    pub limits: Limits,
    /// Transports git may fetch with.
    pub git_protocols: Vec<String>,
    /// Images a runner.toml may name.
    pub allowed_images: Vec<engine::image::ImageName>,
    /// Where checkouts are made (one temporary directory per job).
    pub work_dir: PathBuf,
    /// Permits for [`PARALLEL_CHECKOUTS`].
    pub checkouts: tokio::sync::Semaphore,
    /// Where failed VMs are kept for download; `None` unless the operator set
    /// `failure_snapshots` (a runner.toml's `keep_failed` is then ignored).
    pub snapshots: Option<Arc<super::snapshots::Store>>,
}

/// `runner / unit (riscv64)`.
pub fn check_name(plan: &SuitePlan) -> String {
    format!("{CHECK_PREFIX} / {} ({})", plan.id.suite, plan.id.arch)
}

/// `unit/riscv64`: what a re-requested check run names to be run again.
pub fn external_id(plan: &SuitePlan) -> String {
    format!("{}/{}", plan.id.suite, plan.id.arch)
}

/// Runs a delivery's work. `only`: the external id of the one suite × arch to run again.
pub async fn run(shared: Arc<Shared>, target: Target, only: Option<String>) {
    let span = tracing::info_span!("job", repo = %target.full_name, sha = %target.sha);
    run_inner(shared, target, only).instrument(span).await
}

async fn run_inner(shared: Arc<Shared>, target: Target, only: Option<String>) {
    let repo = Repo {
        installation: target.installation,
        owner: target.owner.clone(),
        name: target.repo.clone(),
    };
    let token = match shared.app.token(target.installation).await {
        Ok(t) => t,
        Err(e) => {
            // Without a token no check run can be written: the log is all there is.
            tracing::error!(installation = target.installation, error = %super::chain(&e), "no installation token; cannot report on this commit");
            return;
        }
    };
    let secrets = vec![token.0.clone()];
    // Each step reports its own failure on the commit and then answers `None`.
    let Some(dir) = fetch_sources(&shared, &repo, &target, &token.0, &secrets).await else {
        return;
    };
    let src = dir.path().join("src");
    let Some((file, lines)) = read_suite_file_at(&shared, &repo, &target, &src).await else {
        return;
    };
    let Some(plans) = plans_for(&shared, &repo, &target, &file, &lines, dir.path(), only).await
    else {
        return;
    };
    let render = RenderContext {
        suite_file: SUITE_FILE_NAME.into(),
        lines,
        checkout: src,
        secrets,
    };
    queue_and_run(shared, repo, target, plans, render, Arc::new(dir)).await;
}

/// Step 1: the commit's sources, on the host, in a new directory under the work dir (its
/// `src/`).
async fn fetch_sources(
    shared: &Shared,
    repo: &Repo,
    target: &Target,
    token: &str,
    secrets: &[String],
) -> Option<tempfile::TempDir> {
    let dir = match tempfile::Builder::new()
        .prefix("github-")
        .tempdir_in(&shared.work_dir)
    {
        Ok(d) => d,
        Err(e) => {
            let msg = format!(
                "cannot create a checkout directory in {}: {e}",
                shared.work_dir.display()
            );
            whole_commit_failure(shared, repo, target, "could not fetch the sources", &msg).await;
            return None;
        }
    };
    let https = target.clone_url.starts_with("https://") || target.clone_url.starts_with("http://");
    let checkout = Checkout {
        url: target.clone_url.clone(),
        sha: target.sha.clone(),
        refspecs: target.refspecs.clone(),
        depth: Some(CLONE_DEPTH),
        strategy: GitStrategy::Clone,
        auth: https.then(|| ("x-access-token".to_string(), token.to_string())),
        dest: dir.path().join("src"),
        timeout: shared.clone_timeout,
        protocols: shared.git_protocols.clone(),
    };
    let permit = shared
        .checkouts
        .acquire()
        .await
        .expect("the checkout semaphore is never closed");
    let started = std::time::Instant::now();
    let fetched = sources::checkout(&checkout, shared.ctx.shutdown.abort_receiver()).await;
    drop(permit);
    match fetched {
        Ok(done) => {
            tracing::info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "checked out {}",
                done.sha
            );
            Some(dir)
        }
        Err(sources::SourceError::Cancelled) => {
            tracing::info!("shutting down before the checkout finished; nothing reported");
            None
        }
        Err(e) => {
            let msg = check_output::mask(&super::chain(&e), secrets);
            tracing::warn!(error = %msg, "checkout failed");
            whole_commit_failure(shared, repo, target, "could not fetch the sources", &msg).await;
            None
        }
    }
}

/// Step 2: runner.toml at that commit, parsed and allowed by this service.
async fn read_suite_file_at(
    shared: &Shared,
    repo: &Repo,
    target: &Target,
    src: &Path,
) -> Option<(SuiteFile, SuiteLines)> {
    let suite_path = src.join(SUITE_FILE_NAME);
    let text = match read_suite_file(&suite_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::info!("no runner.toml; one neutral check run says how to add one");
            let output = check_output::missing_suite_file();
            create_completed(
                shared,
                repo,
                target,
                CHECK_PREFIX,
                Conclusion::Neutral,
                output,
            )
            .await;
            return None;
        }
        Err(e) => {
            let msg = format!("cannot read runner.toml: {e}");
            bad_suite_file(shared, repo, target, &msg, 1).await;
            return None;
        }
    };
    let file = match SuiteFile::parse(&suite_path, &text) {
        Ok(f) => f,
        Err(e) => {
            let (line, message) = match &e {
                SuiteError::Syntax {
                    line,
                    column,
                    message,
                    ..
                } => (
                    *line as u32,
                    format!("{SUITE_FILE_NAME}:{line}:{column}: {message}"),
                ),
                other => (1, format!("{SUITE_FILE_NAME}: {}", error_text(other))),
            };
            tracing::info!(error = %message, "malformed runner.toml");
            bad_suite_file(shared, repo, target, &message, line).await;
            return None;
        }
    };
    let lines = SuiteLines::scan(&text);
    if let Err((message, line)) = allowed(&file, src, shared.allow_host_setup, &lines) {
        bad_suite_file(shared, repo, target, &message, line).await;
        return None;
    }
    Some((file, lines))
}

/// Step 3: the plans — runner.toml's architectures, else the service's; only the one named
/// by `only` when a single check run was re-requested. Results go under `dir`/out.
async fn plans_for(
    shared: &Shared,
    repo: &Repo,
    target: &Target,
    file: &SuiteFile,
    lines: &SuiteLines,
    dir: &Path,
    only: Option<String>,
) -> Option<Vec<SuitePlan>> {
    let arches = if file.defaults.arch.is_empty() {
        shared.default_arches.clone()
    } else {
        file.defaults.arch.clone()
    };
    let overrides = Overrides {
        out: Some(dir.join("out")),
        ..Default::default()
    };
    let mut plans = match plan::plan_suites(file, &[], &arches, &overrides) {
        Ok(p) => p,
        Err(message) => {
            let message = relative(&message, &dir.join("src"));
            bad_suite_file(shared, repo, target, &message, 1).await;
            return None;
        }
    };
    // User mode runs the job's programs on this host's kernel, with only a sandbox around
    // them: a service runs every repository's suites in a VM.
    if plans.iter().any(|p| p.mode == crate::suite::Mode::User) {
        let message = "runner.toml: mode = \"user\" is not available on this service (it runs every suite in a VM); remove `mode`";
        bad_suite_file(shared, repo, target, message, 1).await;
        return None;
    }
    // Nothing starts that asks for more than the operator allows: one check run names the cap.
    let allowed = within_limits(&shared.limits, &plans, lines)
        .and_then(|()| allowed_images(&shared.allowed_images, &plans, lines));
    if let Err((message, line)) = allowed {
        tracing::info!(error = %message, "runner.toml asks for more than this service allows");
        bad_suite_file(shared, repo, target, &message, line).await;
        return None;
    }
    for plan in &mut plans {
        shared.limits.apply(plan);
    }
    if let Some(only) = only.filter(|o| o != EXTERNAL_ID_ALL) {
        plans.retain(|p| external_id(p) == only);
        if plans.is_empty() {
            tracing::warn!(
                external_id = only,
                "re-requested check run names a suite × arch this commit no longer has"
            );
            return None;
        }
    }
    Some(plans)
}

/// Step 4: one queued check run per plan, then the runs themselves; returns when all ended.
async fn queue_and_run(
    shared: Arc<Shared>,
    repo: Repo,
    target: Target,
    plans: Vec<SuitePlan>,
    render: RenderContext,
    dir: Arc<tempfile::TempDir>,
) {
    let mut runs = tokio::task::JoinSet::new();
    for plan in plans {
        let new = NewCheckRun {
            name: check_name(&plan),
            head_sha: target.sha.clone(),
            status: Status::Queued,
            external_id: external_id(&plan),
            conclusion: None,
            completed_at: None,
            output: Some(Output {
                title: "Waiting for a VM".into(),
                summary: format!(
                    "Queued: suite `{}` will run on {} ({} image) when this host has room for its VM.",
                    plan.id.suite, plan.id.arch, plan.image
                ),
                ..Default::default()
            }),
        };
        let id = match shared.checks.create(&repo, &new).await {
            Ok(id) => id,
            Err(e) => {
                tracing::error!(check = new.name, error = %super::chain(&e), "cannot create the check run; not running this suite");
                continue;
            }
        };
        tracing::info!(check_run_id = id, check = new.name, "check run queued");
        let span = tracing::info_span!("suite", check_run_id = id, suite = %plan.id.suite, arch = %plan.id.arch);
        runs.spawn(
            run_plan(
                shared.clone(),
                repo.clone(),
                id,
                plan,
                render.clone(),
                dir.clone(),
            )
            .instrument(span),
        );
    }
    while runs.join_next().await.is_some() {}
}

/// Runs one plan when the scheduler allows and completes its check run.
async fn run_plan(
    shared: Arc<Shared>,
    repo: Repo,
    id: u64,
    mut plan: SuitePlan,
    render: RenderContext,
    // Keeps the checkout alive until every plan of the job is done.
    _dir: Arc<tempfile::TempDir>,
) {
    let shutdown = shared.ctx.shutdown.clone();
    let slot = tokio::select! {
        slot = shared.ctx.scheduler.acquire(plan.memory_mib) => slot,
        _ = shutdown.aborting() => {
            let (conclusion, headline) = check_output::conclusion(&Outcome::Cancelled);
            let output = Output {
                title: format!("{} on {}: {headline}", plan.id.suite, plan.id.arch),
                summary: "The runner service shut down before this suite got a VM. Re-run the check to try again.".into(),
                ..Default::default()
            };
            reporter::finish(&shared.checks, &repo, id, Completion { conclusion, output, annotations: Vec::new() }).await;
            return;
        }
    };
    // A snapshot is kept only where the operator provides the room and the link for it: a
    // repository must not fill the service's disk with VMs no one can reach.
    let asked_to_keep = plan.keep_failed;
    plan.keep_failed = asked_to_keep && shared.snapshots.is_some();
    let (rep, rx) = CheckRunReporter::new();
    let (epilogue_tx, epilogue) = tokio::sync::oneshot::channel();
    // In the current span: the publisher's logs then name the delivery, repo and suite.
    let publisher = tokio::spawn(
        reporter::publish(shared.checks.clone(), repo, id, rx, render, epilogue).in_current_span(),
    );
    let mut reporters = Reporters::default();
    reporters.add(Box::new(rep));
    let outcome = run_suite(
        &plan,
        &shared.ctx.settings,
        &mut reporters,
        shutdown.abort_receiver(),
    )
    .await;
    // The VM is gone: free its place before waiting on GitHub.
    drop(slot);
    drop(reporters);
    tracing::info!(%outcome, "suite finished");
    // The check run completes with the summary's last part: the kept snapshot's link, or
    // why there is none (a dropped sender adds nothing).
    let note = match &shared.snapshots {
        None if asked_to_keep && matches!(outcome, Outcome::Failed { .. } | Outcome::TimedOut) => {
            Some(super::snapshots::NOT_ENABLED.to_string())
        }
        Some(store) if plan.keep_failed => keep_snapshot(store, &plan).await,
        _ => None,
    };
    match note {
        Some(note) => {
            let _ = epilogue_tx.send(note);
        }
        None => drop(epilogue_tx),
    }
    let _ = publisher.await;
}

/// Packs the plan's failure snapshot, if its run saved one, into the store; the summary's
/// last part that says where it is (or why it could not be kept).
async fn keep_snapshot(store: &Arc<super::snapshots::Store>, plan: &SuitePlan) -> Option<String> {
    let dir = plan.out_dir.join(crate::snapshot::DIR_NAME);
    if !dir.join(crate::snapshot::MANIFEST).is_file() {
        return None;
    }
    let started = std::time::Instant::now();
    let packing = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.put(&dir))
    };
    match packing.await {
        Ok(Ok(kept)) => {
            tracing::info!(
                id_prefix = &kept.id[..8],
                bytes = kept.size,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "failure snapshot kept for download"
            );
            Some(super::snapshots::kept_summary(
                store,
                &kept,
                &plan.id.suite,
                plan.id.arch,
                plan.image.as_str(),
            ))
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %super::chain(&e), "failure snapshot not kept");
            Some(super::snapshots::not_kept(&super::chain(&e)))
        }
        Err(e) => Some(super::snapshots::not_kept(&e.to_string())),
    }
}

/// Refuses what a service must not run for whoever can push a commit: host commands (unless
/// the operator allowed them) and a workspace outside the checkout. Returns the message and
/// the line of runner.toml it is about.
fn allowed(
    file: &SuiteFile,
    checkout: &Path,
    allow_host_setup: bool,
    lines: &SuiteLines,
) -> Result<(), (String, u32)> {
    if !allow_host_setup {
        if let Some(s) = file.suites.iter().find(|s| !s.host_setup.is_empty()) {
            return Err((
                format!(
                    "suite '{}' has host_setup commands, which run on the runner's host outside any VM; this service does not run them (allow_host_setup = false). Build inside the guest instead, or ask the operator to allow host_setup for trusted repositories.",
                    s.name
                ),
                lines.suite(&s.name),
            ));
        }
    }
    let inside = match (file.workspace.root.canonicalize(), checkout.canonicalize()) {
        (Ok(ws), Ok(co)) => ws.starts_with(co),
        _ => false,
    };
    if !inside {
        return Err(("[workspace] path must stay inside the repository".into(), 1));
    }
    Ok(())
}

/// Checks every plan of a commit against the operator's caps; on refusal, the message and
/// the line of runner.toml it is about.
fn within_limits(
    limits: &Limits,
    plans: &[SuitePlan],
    lines: &SuiteLines,
) -> Result<(), (String, u32)> {
    limits
        .check_runs(plans.len())
        .map_err(|e| (e.to_string(), 1))?;
    for plan in plans {
        limits
            .check_plan(plan)
            .map_err(|e| (e.to_string(), lines.suite(&plan.id.suite)))?;
    }
    Ok(())
}

/// Every plan's image is one the operator allows: a repository cannot make this host build
/// an image it did not choose.
fn allowed_images(
    allowed: &[engine::image::ImageName],
    plans: &[SuitePlan],
    lines: &SuiteLines,
) -> Result<(), (String, u32)> {
    for plan in plans {
        if !allowed.contains(&plan.image) {
            let names: Vec<&str> = allowed.iter().map(|i| i.as_str()).collect();
            return Err((
                format!(
                    "suite '{}' image = {} is not allowed on this service (allowed: {}); use one of those or ask the operator to add it to allowed_images",
                    plan.id.suite,
                    plan.image.as_str(),
                    names.join(", ")
                ),
                lines.suite(&plan.id.suite),
            ));
        }
    }
    Ok(())
}

fn error_text(e: &SuiteError) -> String {
    match e {
        SuiteError::Invalid { message, .. } => message.clone(),
        other => super::chain(other),
    }
}

/// Host paths mean nothing to the user: show them relative to the checkout.
fn relative(message: &str, checkout: &Path) -> String {
    message.replace(&format!("{}/", checkout.display()), "")
}

/// A failure check run for the whole commit, with the problem annotated on runner.toml.
async fn bad_suite_file(shared: &Shared, repo: &Repo, target: &Target, message: &str, line: u32) {
    let line = line.max(1);
    let output = Output {
        title: "runner.toml cannot be used".into(),
        summary: format!(
            "Nothing was run: `{SUITE_FILE_NAME}` at this commit has a problem.\n\n```text\n{}\n```\n\nThe format is described in the runner's README; `runner test` reports the same problem locally.",
            crate::text::truncate(message, 4000).replace("```", "'''")
        ),
        text: None,
        annotations: vec![Annotation {
            path: SUITE_FILE_NAME.into(),
            start_line: line,
            end_line: line,
            annotation_level: Level::Failure,
            message: crate::text::truncate(message, 4000).to_string(),
            title: Some("runner.toml cannot be used".into()),
            raw_details: None,
        }],
    };
    let name = format!("{CHECK_PREFIX} / {SUITE_FILE_NAME}");
    create_completed(shared, repo, target, &name, Conclusion::Failure, output).await;
}

/// A failure check run for the whole commit when the failure is ours (clone, disk).
async fn whole_commit_failure(
    shared: &Shared,
    repo: &Repo,
    target: &Target,
    what: &str,
    message: &str,
) {
    let output = Output {
        title: format!("infrastructure error, not a test failure: {what}"),
        summary: format!(
            "The runner could not start on this commit.\n\n```text\n{}\n```\n\nRe-run the check once the cause is fixed.",
            crate::text::truncate(message, 4000).replace("```", "'''")
        ),
        ..Default::default()
    };
    create_completed(
        shared,
        repo,
        target,
        CHECK_PREFIX,
        Conclusion::Failure,
        output,
    )
    .await;
}

/// Creates a check run that is completed at once (one request; annotations within one batch).
async fn create_completed(
    shared: &Shared,
    repo: &Repo,
    target: &Target,
    name: &str,
    conclusion: Conclusion,
    output: Output,
) {
    let mut output = output;
    let extra: Vec<Annotation> = if output.annotations.len() > wire::MAX_ANNOTATIONS_PER_REQUEST {
        output
            .annotations
            .split_off(wire::MAX_ANNOTATIONS_PER_REQUEST)
    } else {
        Vec::new()
    };
    let new = NewCheckRun {
        name: name.to_string(),
        head_sha: target.sha.clone(),
        status: Status::Completed,
        external_id: EXTERNAL_ID_ALL.into(),
        conclusion: Some(conclusion),
        completed_at: Some(wire::timestamp(SystemTime::now())),
        output: Some(output.clone()),
    };
    match shared.checks.create(repo, &new).await {
        Ok(id) => {
            tracing::info!(
                check_run_id = id,
                ?conclusion,
                title = output.title,
                "check run created"
            );
            for chunk in wire::batches(&extra) {
                let update = CheckRunUpdate {
                    output: Some(Output {
                        title: output.title.clone(),
                        summary: output.summary.clone(),
                        text: None,
                        annotations: chunk.to_vec(),
                    }),
                    ..Default::default()
                };
                if let Err(e) = shared.checks.update(repo, id, &update).await {
                    tracing::error!(check_run_id = id, error = %super::chain(&e), "cannot add annotations");
                }
            }
        }
        Err(e) => tracing::error!(
            ?conclusion,
            title = output.title,
            error = %super::chain(&e),
            "FINAL RESULT NOT DELIVERED: cannot create the check run"
        ),
    }
}

/// Largest runner.toml read from a repository.
const MAX_SUITE_FILE: u64 = 1 << 20;

/// Reads the repository's runner.toml without trusting it: it must be a regular file (a
/// symlink to /dev/zero or to a host file is refused) of at most `MAX_SUITE_FILE` bytes.
fn read_suite_file(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind, Read};
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_file() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "it is not a regular file (symlinks are not followed)",
        ));
    }
    if meta.len() > MAX_SUITE_FILE {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!("it is larger than {MAX_SUITE_FILE} bytes"),
        ));
    }
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_SUITE_FILE)
        .read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_toml_must_be_a_small_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok.toml");
        std::fs::write(&ok, "[[suite]]\n").unwrap();
        assert_eq!(read_suite_file(&ok).unwrap(), "[[suite]]\n");
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let e = read_suite_file(&link).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
        let big = dir.path().join("big.toml");
        std::fs::write(&big, vec![b'#'; (MAX_SUITE_FILE + 1) as usize]).unwrap();
        assert!(read_suite_file(&big)
            .unwrap_err()
            .to_string()
            .contains("larger"));
        assert_eq!(
            read_suite_file(&dir.path().join("none.toml"))
                .unwrap_err()
                .kind(),
            std::io::ErrorKind::NotFound
        );
    }

    fn check(text: &str, allow_host_setup: bool) -> Result<(), (String, u32)> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SUITE_FILE_NAME);
        std::fs::write(&path, text).unwrap();
        let file = SuiteFile::parse(&path, text).unwrap();
        allowed(&file, dir.path(), allow_host_setup, &SuiteLines::scan(text))
    }

    #[test]
    fn a_repository_cannot_reach_out_of_its_vm() {
        let step = "  [[suite.step]]\n  name = \"t\"\n  run = \"true\"\n";
        let plain = format!("[[suite]]\nname = \"a\"\n{step}");
        assert!(check(&plain, false).is_ok());
        // host_setup runs on the host: refused unless the operator allows it, on its suite.
        let host = format!("[[suite]]\nname = \"a\"\n{step}\n[[suite]]\nname = \"b\"\nhost_setup = [\"make\"]\n{step}");
        let (msg, line) = check(&host, false).unwrap_err();
        assert!(msg.contains("suite 'b' has host_setup"), "{msg}");
        assert_eq!(line, 8, "the name line of suite b");
        assert!(check(&host, true).is_ok());
        // The workspace must stay inside the checkout.
        for path in ["..", "/", "sub/../.."] {
            let ws = format!("[workspace]\npath = \"{path}\"\n{plain}");
            let e = check(&ws, true).unwrap_err();
            assert!(e.0.contains("inside the repository"), "{path}: {e:?}");
        }
    }
}
