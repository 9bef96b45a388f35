//! `runner serve --config FILE`: loads the config, cleans up after a crashed predecessor,
//! starts one task per GitLab runner entry and the GitHub webhook server, and turns signals
//! into drain/abort the way gitlab-runner does: SIGQUIT drains (no new jobs, running ones
//! finish), SIGTERM/SIGINT abort (running jobs are cancelled and reported), a second
//! SIGTERM/SIGINT exits at once.

use std::path::Path;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use crate::capacity::HostResources;
use crate::execute::RunSettings;
use crate::exit;
use crate::serve::config::LogFormat;
use crate::serve::{Scheduler, ServeConfig, ServeContext, ShutdownController};

pub async fn run(config_path: &Path, settings: RunSettings) -> i32 {
    let config = match ServeConfig::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("runner: error: {e}");
            return exit::CONFIG;
        }
    };
    init_logging(config.log_format);
    let swept = engine::vm::sweep_abandoned(&settings.store.vms_dir())
        + engine::image::store::sweep_leftovers(&settings.store)
        + engine::vm::state::prune(&settings.store.states_dir());
    if swept > 0 {
        tracing::info!(swept, "removed leftovers of earlier runs");
    }
    let host = HostResources::detect();
    let scheduler = Arc::new(Scheduler::new(config.concurrent, host));
    tracing::info!(
        concurrent = config.concurrent,
        cores = host.cores,
        memory_budget_mib = host.vm_budget_mib(),
        gitlab_entries = config.runners.len(),
        github = config.github.is_some(),
        "serving"
    );
    let (controller, shutdown) = ShutdownController::new();
    let ctx = ServeContext {
        settings,
        scheduler,
        shutdown,
    };
    let mut services = JoinSet::new();
    for entry in config.runners.clone() {
        services.spawn(crate::gitlab::serve(entry, ctx.clone()));
    }
    if let Some(gh) = config.github.clone() {
        services.spawn(crate::github::serve(gh, ctx.clone()));
    }
    let (mut quit, mut term, mut int) = match (
        signal(SignalKind::quit()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(q), Ok(t), Ok(i)) => (q, t, i),
        _ => {
            tracing::error!("cannot install signal handlers");
            return exit::HOST;
        }
    };
    let mut aborting = false;
    loop {
        tokio::select! {
            joined = services.join_next() => {
                match joined {
                    None => break,
                    Some(Err(e)) if e.is_panic() => {
                        tracing::error!("a service panicked: {e}; stopping the others");
                        controller.abort();
                    }
                    Some(_) => {}
                }
            }
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: taking no new jobs; running jobs will finish");
                controller.drain();
            }
            _ = async { tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} } } => {
                if aborting {
                    tracing::warn!("second termination signal: exiting now");
                    return exit::CANCELLED;
                }
                aborting = true;
                tracing::info!(
                    timeout_s = config.shutdown_timeout,
                    "terminating: cancelling running jobs and reporting them"
                );
                controller.abort();
            }
            _ = tokio::time::sleep(config.shutdown_timeout()), if aborting => {
                tracing::warn!("shutdown_timeout passed with jobs still reporting: exiting");
                return exit::CANCELLED;
            }
        }
    }
    tracing::info!("all services stopped");
    exit::SUCCESS
}

/// Structured logs on stderr; `RUNNER_LOG` sets the filter (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUNNER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
