//! GitHub intake: `runner serve` acting as a GitHub App. Webhooks become suite × arch runs
//! whose progress and results are reported as check runs.

pub mod config;

pub use config::GithubConfig;

use crate::serve::ServeContext;

/// Serves the GitHub App until the context's shutdown says to stop.
pub async fn serve(config: GithubConfig, ctx: ServeContext) {
    let _ = config;
    // Placeholder until the GitHub service lands: stop on drain.
    ctx.shutdown.draining().await;
}
