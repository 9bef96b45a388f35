//! GitHub intake: `runner serve` acting as a GitHub App. Webhooks become suite × arch runs
//! whose progress and results are reported as check runs, one per suite × architecture.
//!
//! How a delivery flows through the modules:
//! `service` (axum: body cap, answer at once) → `webhook` (signature, de-duplication) →
//! `events` (payload → what to run) → `job` (checkout, runner.toml, plans, scheduler slot,
//! `execute::run_suite`) → `reporter` (events → milestones) → `report` (conclusion, summary,
//! annotations) → `checks` (Checks API, batching, `retry`) with tokens from `app`.

pub mod app;
pub mod checks;
pub mod config;
pub mod events;
pub mod job;
pub mod report;
pub mod reporter;
pub mod retry;
pub mod service;
pub mod summary;
pub mod webhook;

use std::sync::Arc;

pub use config::GithubConfig;

use crate::serve::ServeContext;

/// One line for an error and its sources.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    crate::execute::chain(e)
}

/// Serves the GitHub App until the service drains and every accepted delivery has been
/// reported. An error means it could not serve at all (e.g. the address is taken): one line
/// that says why, for `runner serve` to log and exit on.
pub async fn serve(config: GithubConfig, ctx: ServeContext) -> Result<(), String> {
    let creds = config.credentials()?;
    let max_body = config.max_body()?;
    let clone_timeout = config.clone_timeout()?;
    let app = app::App::new(
        config.app_id,
        &creds.private_key_pem,
        &config.api_url,
        retry::DEFAULT,
    )
    .map_err(|e| chain(&e))?;
    let app = Arc::new(app);
    let checks = checks::Checks::new(&config.api_url, app.clone(), retry::DEFAULT);
    // Checkouts live beside the VM directories: same disk, cleaned with the job.
    let work_dir = ctx.settings.store.root().join("github");
    std::fs::create_dir_all(&work_dir)
        .map_err(|e| format!("cannot create {}: {e}", work_dir.display()))?;
    let shared = Arc::new(job::Shared {
        app,
        checks,
        ctx,
        default_arches: config.arch.clone(),
        allow_host_setup: config.allow_host_setup,
        clone_timeout,
        work_dir,
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    service::serve(
        listener,
        &config.webhook_path,
        max_body,
        creds.webhook_secret,
        shared,
    )
    .await
    .map_err(|e| format!("webhook server failed: {e}"))
}
