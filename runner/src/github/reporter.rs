//! The check run as a reporter of one suite × arch run. The executor's `Reporter` trait is
//! synchronous and must never wait on GitHub, so [`CheckRunReporter`] only keeps what the
//! report needs (steps, a bounded log tail) and sends two milestones — VM booted, suite
//! finished — through a channel to [`publish`], an async task that PATCHes the check run.

use tokio::sync::mpsc;
use tracing::Instrument;

use super::check_output::{self, SuiteLines};
use super::checks::{Checks, ChecksError};
use super::wire::{CheckRunUpdate, Completion, Conclusion, Output, Repo, Status};
use crate::events::{Event, Reporter};
pub use crate::report::collect::Milestone;
use crate::report::collect::RunCollector;

/// Collects a run's results and hands milestones to [`publish`].
#[derive(Debug)]
pub struct CheckRunReporter {
    tx: mpsc::UnboundedSender<Milestone>,
    collector: RunCollector,
}

impl CheckRunReporter {
    pub fn new() -> (CheckRunReporter, mpsc::UnboundedReceiver<Milestone>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            CheckRunReporter {
                tx,
                collector: RunCollector::default(),
            },
            rx,
        )
    }
}

impl Reporter for CheckRunReporter {
    fn on_event(&mut self, event: &Event) {
        if let Some(m) = self.collector.on_event(event) {
            // A closed channel means the publisher is gone (shutdown); nothing left to tell.
            let _ = self.tx.send(m);
        }
    }
}

/// What rendering a finished run needs besides the run.
#[derive(Debug, Clone)]
pub struct RenderContext {
    /// runner.toml's path in the repository.
    pub suite_file: String,
    pub lines: SuiteLines,
    /// The checkout, to tell which paths from JUnit reports exist in the repository.
    pub checkout: std::path::PathBuf,
    pub secrets: Vec<String>,
}

/// PATCHes check run `id` as milestones arrive; returns once it is completed. A run that
/// ends without a result (the reporter dropped early) is completed as a failure rather than
/// left `in_progress` forever. The finished run's summary ends with what `epilogue` brings
/// (a failure snapshot's link), waited for after the run ended; nothing if its sender is
/// dropped.
pub async fn publish(
    checks: Checks,
    repo: Repo,
    id: u64,
    mut rx: mpsc::UnboundedReceiver<Milestone>,
    render: RenderContext,
    epilogue: tokio::sync::oneshot::Receiver<String>,
) {
    let mut epilogue = Some(epilogue);
    let span = tracing::info_span!("check_run", check_run_id = id);
    async move {
        while let Some(m) = rx.recv().await {
            match m {
                Milestone::Booted { at, vm_id } => {
                    tracing::info!(vm_id, "VM booted; check run in progress");
                    let update = CheckRunUpdate {
                        status: Some(Status::InProgress),
                        started_at: Some(super::wire::timestamp(at)),
                        ..Default::default()
                    };
                    if let Err(e) = checks.update(&repo, id, &update).await {
                        // Not fatal: the final result still goes out.
                        tracing::warn!(error = %super::chain(&e), "cannot mark the check run in progress");
                    }
                }
                Milestone::Finished(mut run) => {
                    // The runner's own notes name host paths (a failure snapshot's): the
                    // job's directory means nothing to the reader.
                    if let Some(job_dir) = render.checkout.parent() {
                        let host = format!("{}/", job_dir.display());
                        run.log_tail = run.log_tail.replace(&host, "");
                    }
                    let exists = |p: &str| render.checkout.join(p).is_file();
                    let r = check_output::render(
                        &run,
                        &render.suite_file,
                        &render.lines,
                        &exists,
                        &render.secrets,
                    );
                    tracing::info!(
                        outcome = %run.outcome,
                        conclusion = ?r.conclusion,
                        annotations = r.annotations.len(),
                        "run finished; completing the check run"
                    );
                    let mut output = r.output;
                    if let Some(Ok(note)) = match epilogue.take() {
                        Some(rx) => Some(rx.await),
                        None => None,
                    } {
                        output.summary = check_output::with_epilogue(output.summary, &note);
                    }
                    let completion = Completion {
                        conclusion: r.conclusion,
                        output,
                        annotations: r.annotations,
                    };
                    finish(&checks, &repo, id, completion).await;
                    return;
                }
            }
        }
        let completion = Completion {
            conclusion: Conclusion::Failure,
            output: Output {
                title: "infrastructure error, not a test failure: the run ended without a result".into(),
                summary: "The runner lost track of this run (an internal error); see the service's log.".into(),
                ..Default::default()
            },
            annotations: Vec::new(),
        };
        finish(&checks, &repo, id, completion).await;
    }
    .instrument(span)
    .await
}

/// Completes a check run; a final result that cannot be delivered is logged as an error
/// with everything needed to understand it — never dropped silently.
pub async fn finish(checks: &Checks, repo: &Repo, id: u64, completion: Completion) {
    let conclusion = completion.conclusion;
    let title = completion.output.title.clone();
    let summary = completion.output.summary.clone();
    let result = match checks.complete(repo, id, completion).await {
        // GitHub refused what we sent (an annotation it did not like, say): the verdict
        // matters more than the details, so complete it again with the verdict alone rather
        // than leave the check run in progress.
        Err(e @ ChecksError::Refused { .. }) => {
            tracing::warn!(check_run_id = id, error = %super::chain(&e), "GitHub refused the full result; sending the conclusion alone");
            let bare = Completion {
                conclusion,
                output: Output {
                    title: title.clone(),
                    summary: format!(
                        "{}\n\n*GitHub refused this run's annotations or log ({}); see the runner service's log.*",
                        crate::text::truncate(&summary, 60_000),
                        crate::text::truncate(&super::chain(&e), 500)
                    ),
                    ..Default::default()
                },
                annotations: Vec::new(),
            };
            checks.complete(repo, id, bare).await
        }
        other => other,
    };
    match result {
        Ok(()) => tracing::info!(check_run_id = id, ?conclusion, "check run completed"),
        Err(e) => tracing::error!(
            check_run_id = id,
            owner = %repo.owner,
            repo = %repo.name,
            ?conclusion,
            title,
            error = %super::chain(&e),
            "FINAL RESULT NOT DELIVERED: GitHub refused or could not be reached after all retries"
        ),
    }
}
