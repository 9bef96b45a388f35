//! The `runner` binary: parses the command line and hands over to a command. Errors that
//! escape a command are printed once, with their whole chain, on one line.

use std::time::Duration;

use clap::Parser;
use engine::image::ImageStore;
use engine::sandbox::Containment;

use runner::cli::{AccelArg, Cli, Command, MatrixArgs, MatrixCommand};
use runner::commands;
use runner::report::console::Status;
use runner::run::execute::{RunSettings, BOOT_TIMEOUT};

fn main() {
    let cli = Cli::parse();
    if let Command::ProxyRelay { socket } = &cli.command {
        // One per guest connection: a small runtime, and nothing printed (stdout and
        // stderr are the guest's connection).
        let ok = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .is_ok_and(|rt| rt.block_on(runner::net::relay::run(socket)).is_ok());
        std::process::exit(if ok { 0 } else { 1 });
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runner: error: cannot start the async runtime: {e}");
            std::process::exit(runner::exit::HOST);
        }
    };
    let code = runtime.block_on(run(cli));
    // Reporters have flushed; background tasks (output readers) need not finish.
    runtime.shutdown_timeout(Duration::from_secs(1));
    std::process::exit(code);
}

async fn run(cli: Cli) -> i32 {
    let root = cli
        .cache_dir
        .clone()
        .unwrap_or_else(ImageStore::default_root);
    // Overlays name their backing file and QEMU runs in the VM directory: relative paths
    // would resolve against the wrong directory.
    let root = std::path::absolute(&root).unwrap_or(root);
    let store = ImageStore::new(root);
    let status = Status::new(cli.quiet);
    if !matches!(cli.command, Command::Serve(_)) {
        trace_phases();
    }
    // What every VM-running command shares; serve picks its own VM directory (swept
    // completely at start), the others share the cache's.
    let settings = |accel: AccelArg, saved_states, containment| RunSettings {
        store: store.clone(),
        accel: accel.into(),
        boot_timeout: boot_timeout(),
        saved_states,
        vms_dir: None,
        recipe_dir: None,
        containment,
    };
    match cli.command {
        Command::Test(args) => {
            let settings = settings(args.accel, !args.cold_boot, containment().await);
            commands::test::run(args, settings, status).await
        }
        Command::Matrix(MatrixArgs {
            command: Some(MatrixCommand::Merge(args)),
            ..
        }) => commands::matrix::merge(args, status),
        Command::Matrix(args) => {
            let settings = settings(args.accel, !args.cold_boot, containment().await);
            commands::matrix::run(args, settings, status).await
        }
        Command::Serve(args) => {
            // serve decides itself what a missing layer means (see its config's [sandbox]).
            let containment = Containment::detect().await;
            commands::serve::run(&args.config, settings(args.accel, true, containment)).await
        }
        Command::Shell(args) => {
            let settings = settings(args.accel, !args.cold_boot, containment().await);
            commands::shell::run(args, settings, status).await
        }
        Command::Debug(args) if args.pack.is_some() => commands::debug::pack(&args),
        Command::Debug(args) => {
            let settings = settings(AccelArg::Auto, false, containment().await);
            commands::debug::run(args, settings, status).await
        }
        Command::Images(cmd) => commands::images::run(cmd, &store, &status).await,
        Command::Doctor { json: true } => commands::doctor::arch_table_json(),
        Command::Doctor { json: false } => commands::doctor::run(&store).await,
        Command::ProxyRelay { .. } => unreachable!("handled before the runtime starts"),
    }
}

/// With `RUNNER_LOG` set (e.g. `RUNNER_LOG=debug`), the commands other than serve (which
/// logs by itself) write their phases to stderr, each with the time since start: where a
/// slow start spends its time.
fn trace_phases() {
    let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("RUNNER_LOG") else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_timer(tracing_subscriber::fmt::time::uptime())
        .with_ansi(false)
        .with_writer(std::io::stderr)
        .try_init();
}

/// The isolation layers this host offers; a layer that is off is said once, on one line.
async fn containment() -> Containment {
    let c = Containment::detect().await;
    if let Some(note) = c.note() {
        eprintln!("runner: {note}");
    }
    c
}

/// `RUNNER_BOOT_TIMEOUT` (e.g. "5m") overrides the boot deadline for very slow hosts.
fn boot_timeout() -> Duration {
    std::env::var("RUNNER_BOOT_TIMEOUT")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .unwrap_or(BOOT_TIMEOUT)
}
