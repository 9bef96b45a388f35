//! `runner serve --config FILE`: loads the config, cleans up after a crashed predecessor,
//! starts one task per GitLab runner entry and the GitHub webhook server, and turns signals
//! into drain/abort the way gitlab-runner does: SIGQUIT drains (no new jobs, running ones
//! finish), SIGTERM/SIGINT abort (running jobs are cancelled and reported), a second
//! SIGTERM/SIGINT exits at once.

use std::path::Path;
use std::sync::Arc;

use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinSet;

use engine::sandbox::{self, Containment};

use crate::capacity::HostResources;
use crate::exit;
use crate::run::execute::RunSettings;
use crate::serve::config::LogFormat;
use crate::serve::{Scheduler, ServeConfig, ServeContext, ShutdownController};

pub async fn run(config_path: &Path, mut settings: RunSettings) -> i32 {
    let config = match ServeConfig::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("runner: error: {}", crate::outcome::chain(&e));
            return exit::CONFIG;
        }
    };
    init_logging(config.log_format);
    if let Err(message) = check_sandbox(&config, &settings.containment, config_path).await {
        eprintln!("runner: error: {message}");
        return exit::HOST;
    }
    // The service's VMs live in a directory of their own, locked for as long as we run:
    // whatever is in it at start belongs to a predecessor that died (even a second ago), so
    // it all goes, with any QEMU still naming it.
    let vms_dir = settings.store.root().join("serve-vms");
    let _lock = match lock_serve_dir(&settings.store.root().join("serve.lock")) {
        Ok(l) => l,
        Err(message) => {
            eprintln!("runner: error: {message}");
            return exit::HOST;
        }
    };
    let swept = engine::vm::sweep_all(&vms_dir) + super::sweep_leftovers(&settings.store);
    if swept > 0 {
        tracing::info!(swept, "removed leftovers of earlier runs");
    }
    settings.vms_dir = Some(vms_dir);
    settings.recipe_dir = config.recipe_dir.clone();
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
    // Each service ends with Ok, or Err when it could not serve at all.
    let mut services: JoinSet<Result<(), String>> = JoinSet::new();
    for entry in config.runners.clone() {
        let ctx = ctx.clone();
        services.spawn(async move {
            crate::gitlab::serve(entry, ctx).await;
            Ok(())
        });
    }
    if let Some(gh) = config.github.clone() {
        let ctx = ctx.clone();
        services.spawn(async move {
            crate::github::serve(gh, ctx)
                .await
                .map_err(|e| crate::outcome::chain(&e))
        });
    }
    let mut failed = false;
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
    // Set by the first SIGTERM/SIGINT; a fixed instant, so that other events (a service
    // finishing, SIGQUIT) do not restart the wait.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            joined = services.join_next() => {
                match joined {
                    None => break,
                    Some(Err(e)) if e.is_panic() => {
                        tracing::error!("a service panicked: {e}; stopping the others");
                        controller.abort();
                    }
                    Some(Ok(Err(e))) => {
                        tracing::error!("cannot serve: {e}; stopping the others");
                        eprintln!("runner: error: {e}");
                        failed = true;
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
                if deadline.is_some() {
                    tracing::warn!("second termination signal: exiting now");
                    return exit::CANCELLED;
                }
                deadline = Some(engine::bounded::deadline_in(config.shutdown_timeout()));
                tracing::info!(
                    timeout_s = config.shutdown_timeout,
                    "terminating: cancelling running jobs and reporting them"
                );
                controller.abort();
            }
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => {
                tracing::warn!("shutdown_timeout passed with jobs still reporting: exiting");
                return exit::CANCELLED;
            }
        }
    }
    tracing::info!("all services stopped");
    if failed {
        return exit::HOST;
    }
    exit::SUCCESS
}

/// Refuses to serve without the isolation layers the config requires (one line naming what
/// is missing and why); logs which layers are on.
async fn check_sandbox(
    config: &ServeConfig,
    containment: &Containment,
    config_path: &Path,
) -> Result<(), String> {
    let required = config.sandbox.required(sandbox::running_as_root());
    // seccomp is a property of each QEMU binary: every installed one must have it.
    let mut seccomp = true;
    for arch in engine::Arch::ALL {
        if let Ok(q) = engine::qemu::host::qemu_for(arch).await {
            seccomp &= q.sandbox;
        }
    }
    let missing = sandbox::missing(containment, &required, seccomp);
    if let Some((layer, why)) = missing.first() {
        return Err(format!(
            "the {layer} sandbox layer is required but off: {why} (or remove \"{layer}\" from [sandbox] require in {})",
            config_path.display()
        ));
    }
    let on: Vec<&str> = sandbox::Layer::ALL
        .into_iter()
        .filter(|&l| containment.is_on(l) || (l == sandbox::Layer::Seccomp && seccomp))
        .map(sandbox::Layer::name)
        .collect();
    tracing::info!(layers = ?on, "QEMU sandbox");
    for (layer, why) in &containment.off {
        tracing::warn!(layer = layer.name(), why, "sandbox layer off");
    }
    Ok(())
}

/// Takes the lock that makes this process the only `runner serve` of its cache dir.
fn lock_serve_dir(path: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use nix::fcntl::{Flock, FlockArg};
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    Flock::lock(file, FlockArg::LockExclusiveNonblock).map_err(|_| {
        format!(
            "another `runner serve` uses the cache dir of {}; give each its own --cache-dir",
            path.display()
        )
    })
}

/// Structured logs on stderr; `RUNNER_LOG` sets the filter (default `info`).
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUNNER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour codes only for a person watching, not in files or journald.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
