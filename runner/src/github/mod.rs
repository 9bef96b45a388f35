//! GitHub intake: `runner serve` acting as a GitHub App. Webhooks become suite × arch runs
//! whose progress and results are reported as check runs, one per suite × architecture.
//!
//! How a delivery flows through the modules:
//! `service` (axum: body cap, answer at once) → `webhook` (signature, de-duplication) →
//! `payload` (payload → what to run) → `job` (checkout, runner.toml, plans, scheduler slot,
//! `execute::run_suite`) → `reporter` (events → milestones, via `report::collect`) →
//! `check_output` (conclusion, `report::summary`, log text) and `annotate` (annotations) →
//! `checks` (Checks API, `retry`) with tokens from `app`; a failed VM kept for download goes
//! to `snapshots`, which `service` also serves. Leaves: `wire` (the API's shapes
//! and limits), `retry`, `config`.

pub mod annotate;
pub mod app;
pub mod check_output;
pub mod checks;
pub mod config;
pub mod job;
pub mod payload;
pub mod reporter;
pub mod retry;
pub mod service;
pub mod snapshots;
pub mod webhook;
pub mod wire;

use std::sync::Arc;

pub use config::GithubConfig;

use crate::serve::ServeContext;

/// One line for an error and its sources.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    crate::outcome::chain(e)
}

/// Why the GitHub App service cannot serve at all.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The `[github]` section or a file it names (checked again: it may have changed).
    #[error("{0}")]
    Config(String),
    #[error("cannot set up the App")]
    App(#[source] app::AppError),
    #[error("cannot create the checkout directory {path}")]
    WorkDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the webhook server failed")]
    Server(#[source] std::io::Error),
}

/// Serves the GitHub App until the service drains and every accepted delivery has been
/// reported. An error means it could not serve at all (e.g. the address is taken), for
/// `runner serve` to report and exit on.
pub async fn serve(config: GithubConfig, ctx: ServeContext) -> Result<(), ServeError> {
    let creds = config.credentials().map_err(ServeError::Config)?;
    let max_body = config.max_body().map_err(ServeError::Config)?;
    let clone_timeout = config.clone_timeout().map_err(ServeError::Config)?;
    let app = app::App::new(
        config.app_id,
        &creds.private_key_pem,
        &config.api_url,
        retry::DEFAULT,
    )
    .map_err(ServeError::App)?;
    let app = Arc::new(app);
    let checks = checks::Checks::new(&config.api_url, app.clone(), retry::DEFAULT);
    // Checkouts live beside the VM directories: same disk, cleaned with the job.
    let work_dir = ctx.settings.store.root().join("github");
    std::fs::create_dir_all(&work_dir).map_err(|source| ServeError::WorkDir {
        path: work_dir.clone(),
        source,
    })?;
    let swept = sweep_checkouts(&work_dir, STALE_CHECKOUT);
    if swept > 0 {
        tracing::info!(swept, "removed checkouts left by an earlier service");
    }
    let snapshots = match config.snapshots().map_err(ServeError::Config)? {
        Some(settings) => {
            let dir = ctx.settings.store.root().join("github-snapshots");
            let store = snapshots::Store::open(&dir, settings).map_err(|e| {
                ServeError::Config(format!("[github] failure_snapshots: {}", chain(&e)))
            })?;
            tracing::info!(dir = %dir.display(), "failed VMs of suites with keep_failed are kept for download");
            Some(Arc::new(store))
        }
        None => None,
    };
    let shared = Arc::new(job::Shared {
        app,
        checks,
        ctx,
        default_arches: config.arch.clone(),
        allow_host_setup: config.allow_host_setup,
        clone_timeout,
        limits: config.limits().map_err(ServeError::Config)?,
        git_protocols: config.git_protocols.clone(),
        allowed_images: config.allowed_images.clone(),
        work_dir,
        checkouts: tokio::sync::Semaphore::new(job::PARALLEL_CHECKOUTS),
        snapshots: snapshots.clone(),
    });
    // Expired snapshots are refused at once; this frees their disk.
    let sweeper = snapshots.map(|store| {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(snapshots::SWEEP_EVERY);
            loop {
                every.tick().await;
                let store = store.clone();
                let _ = tokio::task::spawn_blocking(move || store.sweep()).await;
            }
        })
    });
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: config.listen,
            source,
        })?;
    let served = service::serve(
        listener,
        &config.webhook_path,
        max_body,
        creds.webhook_secret,
        shared,
    )
    .await
    .map_err(ServeError::Server);
    if let Some(sweeper) = sweeper {
        sweeper.abort();
    }
    served
}

/// A checkout untouched for this long belongs to no running job (the longest suite timeout
/// anyone sets is hours, not a day): a killed service left it.
const STALE_CHECKOUT: std::time::Duration = std::time::Duration::from_secs(24 * 60 * 60);

/// Removes `github-*` checkouts in `dir` older than `age`. Age, not "everything": another
/// service may share the cache directory and be using its own checkouts right now.
fn sweep_checkouts(dir: &std::path::Path, age: std::time::Duration) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let now = std::time::SystemTime::now();
    let mut removed = 0;
    for e in entries.flatten() {
        let stale = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_some_and(|d| d > age);
        if stale
            && e.file_name().to_string_lossy().starts_with("github-")
            && std::fs::remove_dir_all(e.path()).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_checkouts_are_swept() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["github-old", "github-new", "other-old"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
        }
        let two_days_ago =
            std::time::SystemTime::now() - std::time::Duration::from_secs(2 * 24 * 3600);
        for name in ["github-old", "other-old"] {
            std::fs::File::open(dir.path().join(name))
                .unwrap()
                .set_modified(two_days_ago)
                .unwrap();
        }
        assert_eq!(sweep_checkouts(dir.path(), STALE_CHECKOUT), 1);
        assert!(!dir.path().join("github-old").exists());
        // A fresh checkout may belong to a running job; other names are not ours.
        assert!(dir.path().join("github-new").exists());
        assert!(dir.path().join("other-old").exists());
    }
}
