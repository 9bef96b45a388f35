//! GitLab intake: `runner serve` acting as a GitLab runner. Each `[[runners]]` entry polls
//! its GitLab for jobs, runs each in a fresh VM and reports log, state and artifacts back.

pub mod config;

pub use config::RunnerEntry;

use crate::serve::ServeContext;

/// Serves one runner entry until the context's shutdown says to stop.
pub async fn serve(entry: RunnerEntry, ctx: ServeContext) {
    let _ = entry;
    // Placeholder until the GitLab service lands: take no jobs, stop on drain.
    ctx.shutdown.draining().await;
}
