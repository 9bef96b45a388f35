//! `runner shell`: an interactive shell in a fresh VM, booted like `runner test` boots one
//! (from the saved state where there is one), over the live-output port (see
//! `engine::vm::shell`). The host terminal is raw for the session; the shell's exit status
//! is runner's.

use std::io::Write;

use engine::image::{InvalidImageName, RecipeLookup};
use engine::size::Memory;
use engine::vm::shell::{ShellSpec, WindowSize};
use engine::vm::{CommandEnd, StartKind, Vm};
use engine::Arch;

use crate::cli::ShellArgs;
use crate::exit;
use crate::outcome::{chain, vm_error, Outcome};
use crate::report::console::Status;
use crate::run::execute::{guest_env, vm_config, RunSettings};
use crate::run::plan::{self, Overrides, SuitePlan, GUEST_WORKSPACE};
use crate::run::{platform, transfer, workspace};
use crate::terminal::{self, RawMode};

/// The size a session starts with when the terminal does not say.
const FALLBACK_SIZE: WindowSize = WindowSize { rows: 24, cols: 80 };

/// The plan of a session: a suite of no steps, whose machine and image follow the options.
fn plan(args: &ShellArgs) -> Result<SuitePlan, String> {
    let arch: Arch = args.arch.trim().parse().map_err(|e| format!("{e}"))?;
    let memory_mib = args
        .memory
        .as_deref()
        .map(|m| {
            Memory::parse(m)
                .map(|m| m.mib())
                .map_err(|e| format!("--memory '{m}': {e}"))
        })
        .transpose()?;
    if let Some(c) = args.cpus {
        if !(1..=64).contains(&c) {
            return Err(format!("--cpus {c} must be between 1 and 64"));
        }
    }
    let image = args
        .image
        .as_deref()
        .map(|i| {
            i.parse()
                .map_err(|e: InvalidImageName| format!("--image: {e}"))
        })
        .transpose()?;
    if let Some(ws) = &args.workspace {
        if !ws.is_dir() {
            return Err(format!("--workspace {} is not a directory", ws.display()));
        }
    }
    let ov = Overrides {
        image,
        repository_recipes: true,
        timeout: None,
        cpus: args.cpus,
        memory_mib,
        out: None,
        mode: None,
        keep_failed: false,
        network: None,
    };
    let mut plan = plan::plan_command(Vec::new(), arch, args.workspace.clone(), &ov);
    plan.id.suite = "shell".into();
    plan.steps.clear();
    Ok(plan)
}

pub async fn run(args: ShellArgs, settings: RunSettings, status: Status) -> i32 {
    let plan = match plan(&args) {
        Ok(p) => p,
        Err(msg) => {
            status.error(&msg);
            return exit::USAGE;
        }
    };
    if let Some(line) = super::swept_line(super::sweep_leftovers(&settings.store)) {
        status.line(&line);
    }
    // The workspace's size before the boot (it is packed as it streams in, after).
    if let Some(ws) = &plan.workspace {
        if let Err(e) = workspace::measure_off_runtime(ws).await {
            let outcome = crate::outcome::infra(crate::outcome::InfraKind::Io, chain(&e));
            return refused(&status, &outcome);
        }
    }
    let mut vm = match boot(&plan, &settings, &status).await {
        Ok(vm) => vm,
        Err(outcome) => return refused(&status, &outcome),
    };
    if let Some(ws) = &plan.workspace {
        if let Err(outcome) = transfer::copy_in(&mut vm, ws).await {
            vm.kill().await;
            return refused(&status, &outcome);
        }
    }
    let mut env = guest_env(&plan);
    env.retain(|(k, _)| k != "TERM" && k != "CI");
    env.push((
        "TERM".into(),
        std::env::var("TERM").unwrap_or_else(|_| "xterm-256color".into()),
    ));
    let spec = ShellSpec {
        cwd: if plan.workspace.is_some() {
            GUEST_WORKSPACE.into()
        } else {
            "/root".into()
        },
        env,
        size: terminal::size().unwrap_or(FALLBACK_SIZE),
    };
    session(vm, &spec, &status).await
}

/// Prints an outcome that ended things before the session, and gives its exit code.
fn refused(status: &Status, outcome: &Outcome) -> i32 {
    if let Outcome::InfraError { message, .. } = outcome {
        status.error(message);
    }
    outcome.exit_code()
}

/// Finds QEMU and the image (built first if need be), and boots the plan's VM.
async fn boot(plan: &SuitePlan, settings: &RunSettings, status: &Status) -> Result<Vm, Outcome> {
    let platform = platform::resolve(plan.id.arch, settings.accel, &settings.store).await?;
    let recipes = RecipeLookup {
        operator_dir: settings.recipe_dir.clone(),
        repository: plan.repository_recipes.clone(),
    };
    let spinner = status.spinner(&format!("{}: image {}", plan.id.arch, plan.image));
    let progress = |m: &str| spinner.set_message(format!("{}: {m}", plan.id.arch));
    let image = platform::base_image(
        &settings.store,
        &plan.image,
        &recipes,
        &platform,
        None,
        false,
        &progress,
    )
    .await;
    spinner.finish_and_clear();
    let image = image?;
    let spinner = status.spinner(&format!("{}: booting", plan.id.arch));
    let cfg = vm_config(plan, settings, &platform, &image);
    let vm = Vm::boot(&cfg).await;
    spinner.finish_and_clear();
    let vm = vm.map_err(|e| vm_error(&e, false))?;
    let how = match &vm.start_kind {
        StartKind::Restored => "resumed from the saved state".to_string(),
        StartKind::ColdFallback(reason) => format!("booted cold ({reason})"),
        _ => "booted cold".to_string(),
    };
    status.line(&format!(
        "runner: {} {} {how} in {:.1} s; `exit` stops the VM",
        plan.id.arch,
        plan.image,
        vm.boot_time.as_secs_f64()
    ));
    Ok(vm)
}

/// Runs a shell session in `vm` on this terminal (raw for the session), then stops the VM.
/// Returns the shell's exit status, or runner's code for how else it ended.
pub(crate) async fn session(mut vm: Vm, spec: &ShellSpec, status: &Status) -> i32 {
    let raw = match RawMode::enter() {
        Ok(r) => r,
        Err(e) => {
            vm.kill().await;
            status.error(&chain(&e));
            return exit::USAGE;
        }
    };
    let mut input = match terminal::input() {
        Ok(i) => i,
        Err(e) => {
            drop(raw);
            vm.kill().await;
            status.error(&format!("cannot read the terminal: {e}"));
            return exit::IO;
        }
    };
    let mut stdout = std::io::stdout();
    let mut show = |bytes: &[u8]| {
        // A terminal that cannot be written to is gone: the hangup ends the session.
        let _ = stdout.write_all(bytes);
        let _ = stdout.flush();
    };
    let ended = tokio::select! {
        r = vm.shell(spec, &mut input, &mut show) => Some(r),
        _ = ended_by_signal() => None,
    };
    drop(raw);
    let code = match ended {
        Some(Ok(CommandEnd::Exited(code))) => code,
        Some(Ok(CommandEnd::Signaled(sig))) => 128 + sig,
        Some(Ok(CommandEnd::NotFound)) => exit::COMMAND_NOT_FOUND,
        Some(Ok(CommandEnd::Stopped)) | None => exit::CANCELLED,
        Some(Ok(CommandEnd::TimedOut)) => {
            status.error("the shell ended but its session in the guest did not");
            exit::AGENT
        }
        Some(Err(e)) => {
            let outcome = vm_error(&e, true);
            refused(status, &outcome)
        }
    };
    vm.kill().await;
    code
}

/// Resolves on SIGTERM or SIGHUP (the terminal went away). SIGINT cannot come from the
/// keyboard in raw mode; sent by `kill`, it ends the session too.
async fn ended_by_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut hup), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = hup.recv() => {}
        _ = int.recv() => {}
    }
}
