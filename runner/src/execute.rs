//! The suite executor: runs one `SuitePlan` — image, host setup, boot, workspace copy,
//! steps with live output, results back, stop — and reports every stage as events. It
//! classifies every ending into one `Outcome`.
//!
//! Steps follow GitLab's rules, which include the suite file's as a special case: a step runs
//! when its `when` fits how the suite is going (`OnSuccess` steps stop after the first failure;
//! `OnFailure`/`Always` steps run after a failure, a timeout or a graceful interrupt, with
//! their own timeout). The caller can stop a run two ways ([`Controls`]): *cancel* kills the
//! VM at once; *interrupt* stops the running step gracefully, then runs the cleanup steps.

use std::time::{Duration, Instant};

use engine::bounded::TailBuffer;
use engine::image::{BaseImage, ImageStore};
use engine::vm::{CommandEnd, DiskSource, GuestFault, StartKind, Vm, VmConfig, VmError};
use tokio::process::Command;
use tokio::sync::watch;

use crate::cli::AccelArg;
use crate::events::{Event, GuestReport, Reporters, VmFacts};
use crate::host;
use crate::outcome::{InfraKind, Outcome};
use crate::plan::{GuestFile, StepWhen, SuitePlan, GUEST_WORKSPACE};
use crate::transfer;
use crate::workspace;

/// Deadline for the agent's first answer on a normal boot (TCG on a busy host included).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Output tail kept per step for reports.
const STEP_TAIL_BYTES: usize = 64 * 1024;

/// What every suite run shares.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub store: ImageStore,
    pub accel: AccelArg,
    pub boot_timeout: Duration,
    /// Resume VMs from saved states (and save them on first boot); off with `--cold-boot`.
    pub saved_states: bool,
    /// Parent of the per-VM directories; `None`: the store's `vms/`. `runner serve` uses a
    /// directory of its own that it can sweep completely at start.
    pub vms_dir: Option<std::path::PathBuf>,
}

/// How a caller stops a run.
#[derive(Debug, Clone)]
pub struct Controls {
    /// Turns true: stop now — the VM is killed and the run ends `Cancelled`.
    pub cancel: watch::Receiver<bool>,
    /// Turns true: stop gracefully — the running `OnSuccess` step is stopped (its process
    /// tree killed), no further `OnSuccess` step starts, `OnFailure`/`Always` steps still run
    /// and results are collected; the run ends `Cancelled`.
    pub interrupt: watch::Receiver<bool>,
}

impl Controls {
    /// Controls with only a hard cancel (the interrupt never fires).
    pub fn cancel_only(cancel: watch::Receiver<bool>) -> Self {
        Controls {
            cancel,
            interrupt: watch::channel(false).1,
        }
    }
}

pub(crate) fn infra(kind: InfraKind, message: impl Into<String>) -> Outcome {
    Outcome::InfraError {
        kind,
        message: message.into(),
    }
}

pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    engine::image::build::error_chain(e)
}

/// Classifies a VM failure. Boot problems are `Boot`; anything after boot is `Agent`.
pub(crate) fn vm_error(e: &VmError, booted: bool) -> Outcome {
    let kind = match e {
        VmError::Dir { .. } => InfraKind::Io,
        VmError::Spawn { .. } | VmError::Overlay(_) => InfraKind::Host,
        _ if !booted => InfraKind::Boot,
        _ => InfraKind::Agent,
    };
    infra(kind, chain(e))
}

/// Runs one suite plan to its end, whatever happens; cancellation (`cancel` turning true)
/// stops the VM and ends the suite as `Cancelled`.
pub async fn run_suite(
    plan: &SuitePlan,
    settings: &RunSettings,
    reporters: &mut Reporters,
    cancel: watch::Receiver<bool>,
) -> Outcome {
    run_suite_with(plan, settings, reporters, Controls::cancel_only(cancel)).await
}

/// [`run_suite`] with a graceful interrupt as well (see [`Controls`]).
pub async fn run_suite_with(
    plan: &SuitePlan,
    settings: &RunSettings,
    reporters: &mut Reporters,
    controls: Controls,
) -> Outcome {
    let Controls {
        mut cancel,
        interrupt,
    } = controls;
    let started = Instant::now();
    let id = plan.id.clone();
    reporters.emit(Event::SuiteStarted {
        id: id.clone(),
        steps: plan.steps.len() + plan.host_setup.len(),
    });
    let mut facts = VmFacts {
        image: plan.image.clone(),
        ..Default::default()
    };
    let mut state = SuiteState {
        facts: &mut facts,
        reports: Vec::new(),
        artifacts: Vec::new(),
        steps_done: 0,
        current: None,
    };
    let outcome = tokio::select! {
        o = run_inner(plan, settings, reporters, &mut state, interrupt) => o,
        _ = cancel.wait_for(|c| *c) => Outcome::Cancelled,
    };
    // A step cut short by the suite timeout or cancellation ends like the suite, with the
    // output it had produced.
    if let Some(step) = state.current.take() {
        reporters.emit(Event::StepFinished {
            id: id.clone(),
            step: step.name,
            outcome: outcome.clone(),
            duration: step.started.elapsed(),
            output_tail: step.tail.text(),
        });
        state.steps_done += 1;
    }
    // Steps that never got to run are reported as skipped.
    let done = state.steps_done;
    let (reports, artifacts) = (
        std::mem::take(&mut state.reports),
        std::mem::take(&mut state.artifacts),
    );
    let all_steps = plan
        .host_setup
        .iter()
        .map(|h| format!("host: {h}"))
        .chain(plan.steps.iter().map(|s| s.name.clone()));
    for step in all_steps.skip(done) {
        reporters.emit(Event::StepFinished {
            id: id.clone(),
            step,
            outcome: Outcome::Skipped,
            duration: Duration::ZERO,
            output_tail: String::new(),
        });
    }
    reporters.emit(Event::SuiteFinished {
        id,
        outcome: outcome.clone(),
        duration: started.elapsed(),
        facts,
        reports,
        artifacts,
    });
    outcome
}

/// What a suite run accumulates for its final event (kept outside the future so that a
/// timeout or cancellation still reports it).
struct SuiteState<'a> {
    facts: &'a mut VmFacts,
    reports: Vec<GuestReport>,
    artifacts: Vec<std::path::PathBuf>,
    steps_done: usize,
    /// The step running right now, if any.
    current: Option<RunningStep>,
}

struct RunningStep {
    name: String,
    started: Instant,
    tail: TailBuffer,
}

impl RunningStep {
    fn new(name: &str) -> Self {
        RunningStep {
            name: name.to_string(),
            started: Instant::now(),
            tail: TailBuffer::new(STEP_TAIL_BYTES),
        }
    }
}

async fn run_inner(
    plan: &SuitePlan,
    settings: &RunSettings,
    reporters: &mut Reporters,
    state: &mut SuiteState<'_>,
    interrupt: watch::Receiver<bool>,
) -> Outcome {
    let id = plan.id.clone();
    // 1. Host: QEMU, accelerator, image.
    let platform = match host::platform(id.arch, settings.accel, &settings.store).await {
        Ok(p) => p,
        Err(o) => return o,
    };
    if let Some(note) = &platform.accel.note {
        reporters.emit(Event::Note {
            message: note.clone(),
        });
    }
    state.facts.accel = platform.accel.accel.name().into();
    state.facts.qemu_version = platform.qemu.version.clone();
    let image = {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let progress = move |m: &str| {
            let _ = tx.send(m.to_string());
        };
        let build = host::base_image(
            &settings.store,
            &plan.image,
            plan.project_dir.as_deref(),
            &platform,
            None,
            false,
            &progress,
        );
        tokio::pin!(build);
        loop {
            tokio::select! {
                r = &mut build => break r,
                Some(message) = rx.recv() => reporters.emit(Event::ImageProgress { id: id.clone(), message }),
            }
        }
    };
    let image = match image {
        Ok(i) => i,
        Err(o) => return o,
    };
    state.facts.kernel_version = image.manifest.kernel_version.clone();
    let timed = run_timed(
        plan, settings, reporters, state, &platform, &image, interrupt,
    );
    // The suite timeout itself is enforced step by step (cleanup steps may outlive it); this
    // is the backstop for everything, boot and result collection included.
    match tokio::time::timeout(plan.hard_deadline(), timed).await {
        Ok(o) => o,
        Err(_) => Outcome::TimedOut,
    }
}

/// Everything the suite timeout covers: host setup, boot, steps, results — not the image
/// build before it, which happens once and must not be cut off half-way.
async fn run_timed(
    plan: &SuitePlan,
    settings: &RunSettings,
    reporters: &mut Reporters,
    state: &mut SuiteState<'_>,
    platform: &host::Platform,
    image: &BaseImage,
    interrupt: watch::Receiver<bool>,
) -> Outcome {
    let id = plan.id.clone();
    let deadline = tokio::time::Instant::now() + plan.timeout;
    // 2. Host setup commands (e.g. cross-compiling), as steps.
    for cmd in &plan.host_setup {
        state.current = Some(RunningStep::new(&format!("host: {cmd}")));
        let outcome = host_setup(plan, cmd, reporters).await;
        state.current = None;
        state.steps_done += 1;
        if !outcome.is_success() {
            return outcome;
        }
    }

    // 3. Workspace archive (before boot: a too-large workspace should not cost a boot).
    let archive = match &plan.workspace {
        Some(ws) => match workspace::pack(&ws.root, &ws.exclude, ws.max_size) {
            Ok(a) => Some(a),
            Err(e) => {
                let kind = if matches!(e, workspace::WorkspaceError::Read { .. }) {
                    InfraKind::Io
                } else {
                    InfraKind::Config
                };
                return infra(kind, chain(&e));
            }
        },
        None => None,
    };

    // 4. Boot.
    reporters.emit(Event::VmBooting {
        id: id.clone(),
        accel: state.facts.accel.clone(),
    });
    let cfg = VmConfig {
        arch: id.arch,
        accel: platform.accel.accel,
        qemu_binary: platform.qemu.path.clone(),
        sandbox: platform.qemu.sandbox,
        cpus: plan.cpus,
        memory_mib: plan.memory_mib,
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        disk: DiskSource::Overlay(image.rootfs.clone()),
        state_dir: settings
            .vms_dir
            .clone()
            .unwrap_or_else(|| settings.store.vms_dir()),
        boot_timeout: settings.boot_timeout,
        saved_state: settings.saved_states.then(|| {
            // A state fits only the exact VM it was saved from: key it on all of it.
            let image_id = image
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let disk = image
                .manifest
                .artifacts
                .get("rootfs.qcow2")
                .map(|a| a.sha256[..12].to_string())
                .unwrap_or_default();
            settings.store.states_dir().join(format!(
                "{image_id}-{disk}-{}-{}c-{}m-qemu{}-f{}",
                platform.accel.accel.name(),
                plan.cpus,
                plan.memory_mib,
                platform.qemu.version,
                engine::vm::state::FORMAT
            ))
        }),
    };
    let mut vm = match Vm::boot(&cfg).await {
        Ok(vm) => vm,
        Err(e) => return vm_error(&e, false),
    };
    state.facts.vm_id = vm.id();
    state.facts.boot_time = Some(vm.boot_time);
    state.facts.start = match &vm.start_kind {
        StartKind::Cold => "cold boot",
        StartKind::ColdSaved => "cold boot, state saved for later jobs",
        StartKind::Restored => "resumed from saved state",
        StartKind::ColdFallback(reason) => {
            reporters.emit(Event::Note {
                message: format!("{reason}; booted cold instead"),
            });
            "cold boot"
        }
    }
    .into();
    reporters.emit(Event::VmBooted {
        id: id.clone(),
        facts: state.facts.clone(),
    });

    let outcome = in_vm(
        plan, &mut vm, archive, reporters, state, deadline, interrupt,
    )
    .await;
    // A timed-out step leaves its command running: stop hard. Otherwise stop politely.
    match outcome {
        Outcome::TimedOut => vm.kill().await,
        _ => {
            let _ = vm.shutdown().await;
        }
    }
    outcome
}

async fn in_vm(
    plan: &SuitePlan,
    vm: &mut Vm,
    archive: Option<Vec<u8>>,
    reporters: &mut Reporters,
    state: &mut SuiteState<'_>,
    deadline: tokio::time::Instant,
    mut interrupt: watch::Receiver<bool>,
) -> Outcome {
    let id = plan.id.clone();
    if let Some(archive) = archive {
        if let Err(o) = transfer::copy_in(vm, &archive).await {
            return o;
        }
    }
    if let Err(o) = write_files(vm, &plan.files).await {
        return o;
    }
    let base_env = guest_env(plan);
    // How the suite is going so far; decides which steps still run.
    let mut so_far = Outcome::Passed;
    // Cleanup steps are only ever cancelled hard, never interrupted.
    let (_, mut never) = watch::channel(false);
    for (index, step) in plan.steps.iter().enumerate() {
        if *interrupt.borrow() && so_far.is_success() {
            so_far = Outcome::Cancelled;
        }
        if !step.when.runs(so_far.is_success()) {
            state.steps_done += 1;
            reporters.emit(Event::StepFinished {
                id: id.clone(),
                step: step.name.clone(),
                outcome: Outcome::Skipped,
                duration: Duration::ZERO,
                output_tail: String::new(),
            });
            continue;
        }
        reporters.emit(Event::StepStarted {
            id: id.clone(),
            step: step.name.clone(),
            index: index + plan.host_setup.len(),
        });
        let mut env = base_env.clone();
        env.push(("RUNNER_STEP".into(), step.name.clone()));
        env.extend(step.env.iter().cloned());
        let env = last_wins(env);
        let (timeout, stop) = match step.when {
            StepWhen::OnSuccess => (
                step.timeout
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
                &mut interrupt,
            ),
            _ => (step.timeout, &mut never),
        };
        let current = state.current.insert(RunningStep::new(&step.name));
        let mut live = |bytes: &[u8]| {
            current.tail.push(bytes);
            reporters.emit(Event::Output {
                id: id.clone(),
                bytes: bytes.to_vec(),
            });
        };
        let mut result = vm
            .run_stoppable(
                &step.command,
                GUEST_WORKSPACE,
                &env,
                timeout,
                stop,
                &mut live,
            )
            .await;
        // What the job did to its guest is its failure, named in its output: a limit it hit
        // (a step can exit 0 and leave a fork bomb behind), or a guest it stopped or broke.
        let mut notes = Vec::new();
        if result.is_ok() {
            let failed = !matches!(result, Ok(CommandEnd::Exited(0)));
            match vm.job_limits_hit(failed).await {
                Ok(hits) => notes.extend(hits.iter().map(ToString::to_string)),
                Err(e) => result = Err(e),
            }
        }
        let fault = match &result {
            Err(e) => GuestFault::during_job(e, &vm.console_tail(40)),
            Ok(_) => None,
        };
        notes.extend(fault.iter().map(ToString::to_string));
        for note in &notes {
            let line = format!("\nrunner: {note}\n");
            current.tail.push(line.as_bytes());
            reporters.emit(Event::Output {
                id: id.clone(),
                bytes: line.into_bytes(),
            });
        }
        let outcome = match result {
            Ok(CommandEnd::Exited(0)) if !notes.is_empty() => Outcome::Failed {
                exit_code: None,
                signal: None,
            },
            Ok(CommandEnd::Exited(0)) => Outcome::Passed,
            Ok(CommandEnd::Exited(code)) => Outcome::Failed {
                exit_code: Some(code),
                signal: None,
            },
            Ok(CommandEnd::Signaled(sig)) => Outcome::Failed {
                exit_code: None,
                signal: Some(sig),
            },
            Ok(CommandEnd::TimedOut) => Outcome::TimedOut,
            Ok(CommandEnd::Stopped) => Outcome::Cancelled,
            // Once a job's command has started, the job owns the guest: a guest that powered
            // off, panicked, lost its agent or stopped answering is the job's doing, not the
            // infrastructure's (a VM that never booted failed earlier, in `Vm::boot`).
            Err(_) if fault.is_some() => {
                // Nothing more can run in it.
                let finished = state.current.take().expect("set above");
                state.steps_done += 1;
                let failed = Outcome::Failed {
                    exit_code: None,
                    signal: None,
                };
                reporters.emit(Event::StepFinished {
                    id: id.clone(),
                    step: step.name.clone(),
                    outcome: failed.clone(),
                    duration: finished.started.elapsed(),
                    output_tail: finished.tail.text(),
                });
                return Outcome::combine(&[so_far, failed]);
            }
            Err(e) => vm_error(&e, true),
        };
        let finished = state.current.take().expect("set above");
        state.steps_done += 1;
        reporters.emit(Event::StepFinished {
            id: id.clone(),
            step: step.name.clone(),
            outcome: outcome.clone(),
            duration: finished.started.elapsed(),
            output_tail: finished.tail.text(),
        });
        match &outcome {
            Outcome::Passed => {}
            Outcome::Failed { .. } if step.allow_failure => {}
            Outcome::Failed { .. } => so_far = Outcome::combine(&[so_far, outcome]),
            Outcome::TimedOut | Outcome::Cancelled => {
                if !(step.allow_failure && outcome == Outcome::TimedOut) {
                    so_far = Outcome::combine(&[so_far, outcome]);
                }
                // The command still runs. Kill it only when a later step needs the VM;
                // otherwise the VM goes, and the command with it.
                let succeeded = so_far.is_success();
                let more = plan.steps[index + 1..]
                    .iter()
                    .any(|s| s.when.runs(succeeded));
                if !more {
                    return so_far;
                }
                if let Err(e) = vm.stop_command().await {
                    return Outcome::combine(&[so_far, vm_error(&e, true)]);
                }
            }
            // A broken VM: nothing more can run in it.
            _ => return Outcome::combine(&[so_far, outcome]),
        }
    }
    // An interrupt that came while only cleanup steps ran still ends the run as cancelled.
    if *interrupt.borrow() && so_far.is_success() {
        so_far = Outcome::Cancelled;
    }
    // Results come back even when a step failed: that is when they matter most.
    let results =
        transfer::collect_results(plan, vm, &mut state.reports, &mut state.artifacts).await;
    Outcome::combine(&[so_far, results])
}

/// Writes the plan's files into the guest (parent directories first).
async fn write_files(vm: &mut Vm, files: &[GuestFile]) -> Result<(), Outcome> {
    if files.is_empty() {
        return Ok(());
    }
    let parents: Vec<String> = files
        .iter()
        .filter_map(|f| std::path::Path::new(&f.path).parent())
        .map(|p| format!("'{}'", p.display().to_string().replace('\'', "'\\''")))
        .collect();
    let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())];
    let script = format!("umask 077; mkdir -p {}", parents.join(" "));
    match vm
        .run_script(&script, &env, Duration::from_secs(30), 4096)
        .await
    {
        Ok((CommandEnd::Exited(0), _)) => {}
        Ok((end, out)) => {
            return Err(infra(
                InfraKind::Agent,
                format!(
                    "creating directories in the guest failed ({end:?}): {}",
                    out.trim()
                ),
            ))
        }
        Err(e) => return Err(vm_error(&e, true)),
    }
    for f in files {
        vm.write_file(&f.path, &f.contents)
            .await
            .map_err(|e| vm_error(&e, true))?;
    }
    Ok(())
}

/// One entry per name, the last one winning (a step's env overrides the suite's): with
/// duplicates, which one a program sees depends on its libc.
fn last_wins(env: Vec<(String, String)>) -> Vec<(String, String)> {
    let mut seen = std::collections::HashSet::new();
    let mut out: Vec<(String, String)> = env
        .into_iter()
        .rev()
        .filter(|(k, _)| seen.insert(k.clone()))
        .collect();
    out.reverse();
    out
}

/// The guest environment (qga replaces the guest's environment, so it is complete).
fn guest_env(plan: &SuitePlan) -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ),
        ("HOME".into(), "/root".into()),
        ("USER".into(), "root".into()),
        ("LANG".into(), "C.UTF-8".into()),
        ("TERM".into(), "dumb".into()),
        ("CI".into(), "true".into()),
        ("RUNNER_ARCH".into(), plan.id.arch.name().into()),
        ("RUNNER_SUITE".into(), plan.id.suite.clone()),
        ("RUNNER_WORKSPACE".into(), GUEST_WORKSPACE.into()),
    ]
}

/// Runs one `host_setup` command on the host, in the workspace, as a reported step.
async fn host_setup(plan: &SuitePlan, cmd: &str, reporters: &mut Reporters) -> Outcome {
    let id = plan.id.clone();
    let step = format!("host: {cmd}");
    reporters.emit(Event::StepStarted {
        id: id.clone(),
        step: step.clone(),
        index: 0,
    });
    let started = Instant::now();
    let cwd = plan
        .workspace
        .as_ref()
        .map(|w| w.root.clone())
        .unwrap_or_else(|| ".".into());
    let result = engine::child::output_in_group(
        Command::new("/bin/sh")
            .args(["-e", "-c", cmd])
            .current_dir(&cwd)
            .env("RUNNER_ARCH", id.arch.name())
            .env("RUNNER_SUITE", &id.suite),
    )
    .await;
    let (outcome, text) = match result {
        Ok(out) => {
            let mut text = out.stdout;
            text.extend_from_slice(&out.stderr);
            reporters.emit(Event::Output {
                id: id.clone(),
                bytes: text.clone(),
            });
            let outcome = match out.status.code() {
                Some(0) => Outcome::Passed,
                code => Outcome::Failed {
                    exit_code: code,
                    signal: None,
                },
            };
            (outcome, String::from_utf8_lossy(&text).into_owned())
        }
        Err(e) => (
            infra(
                InfraKind::Host,
                format!("cannot run host_setup command in {}: {e}", cwd.display()),
            ),
            String::new(),
        ),
    };
    reporters.emit(Event::StepFinished {
        id,
        step,
        outcome: outcome.clone(),
        duration: started.elapsed(),
        output_tail: text,
    });
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn later_env_entries_override_earlier_ones() {
        let env = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            last_wins(env(&[("A", "1"), ("B", "2"), ("A", "3")])),
            env(&[("B", "2"), ("A", "3")])
        );
    }
}
