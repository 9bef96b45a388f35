//! The suite executor: runs one `SuitePlan` — image, host setup, boot, workspace copy,
//! steps with live output, results back, stop — and reports every stage as events. It
//! classifies every ending into one `Outcome`.

use std::time::{Duration, Instant};

use engine::agent::AgentError;
use engine::bounded::TailBuffer;
use engine::image::{BaseImage, ImageStore};
use engine::vm::{CommandEnd, DiskSource, GuestCommand, StartKind, Vm, VmConfig, VmError};
use tokio::process::Command;
use tokio::sync::watch;

use crate::cli::AccelArg;
use crate::events::{Event, GuestReport, Reporters, VmFacts};
use crate::host;
use crate::outcome::{InfraKind, Outcome};
use crate::plan::{SuitePlan, GUEST_WORKSPACE};
use crate::workspace;

/// Deadline for the agent's first answer on a normal boot (TCG on a busy host included).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Output tail kept per step for reports.
const STEP_TAIL_BYTES: usize = 64 * 1024;
/// Largest guest JUnit file we read back.
const MAX_GUEST_REPORT: usize = 16 << 20;
/// How many guest JUnit files we read back, and how many bytes in all.
const MAX_GUEST_REPORTS: usize = 200;
const MAX_GUEST_REPORTS_TOTAL: usize = 64 << 20;
/// Largest artifacts archive we read back.
const MAX_ARTIFACTS: usize = 256 << 20;
/// Timeout for the runner's own short commands in the guest (unpack, list files).
const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the workspace archive is staged in the guest.
const GUEST_WORKSPACE_TAR: &str = "/tmp/runner-workspace.tar";
const GUEST_ARTIFACTS_TAR: &str = "/tmp/runner-artifacts.tar";

/// What every suite run shares.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub store: ImageStore,
    pub accel: AccelArg,
    pub boot_timeout: Duration,
    /// Resume VMs from saved states (and save them on first boot); off with `--cold-boot`.
    pub saved_states: bool,
}

fn infra(kind: InfraKind, message: impl Into<String>) -> Outcome {
    Outcome::InfraError {
        kind,
        message: message.into(),
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    engine::image::build::error_chain(e)
}

/// Classifies a VM failure. Boot problems are `Boot`; anything after boot is `Agent`.
fn vm_error(e: &VmError, booted: bool) -> Outcome {
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
    mut cancel: watch::Receiver<bool>,
) -> Outcome {
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
        o = run_inner(plan, settings, reporters, &mut state) => o,
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
    let timed = run_timed(plan, settings, reporters, state, &platform, &image);
    match tokio::time::timeout(plan.timeout, timed).await {
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
) -> Outcome {
    let id = plan.id.clone();
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
        state_dir: settings.store.vms_dir(),
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

    let outcome = in_vm(plan, &mut vm, archive, reporters, state).await;
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
) -> Outcome {
    let id = plan.id.clone();
    if let Some(archive) = archive {
        if let Err(o) = copy_in(vm, &archive).await {
            return o;
        }
    }
    let base_env = guest_env(plan);
    let mut outcomes = Vec::new();
    let mut stop: Option<Outcome> = None;
    for (index, step) in plan.steps.iter().enumerate() {
        reporters.emit(Event::StepStarted {
            id: id.clone(),
            step: step.name.clone(),
            index: index + plan.host_setup.len(),
        });
        let mut env = base_env.clone();
        env.push(("RUNNER_STEP".into(), step.name.clone()));
        env.extend(step.env.iter().cloned());
        let current = state.current.insert(RunningStep::new(&step.name));
        let mut live = |bytes: &[u8]| {
            current.tail.push(bytes);
            reporters.emit(Event::Output {
                id: id.clone(),
                bytes: bytes.to_vec(),
            });
        };
        let result = vm
            .run(
                &step.command,
                GUEST_WORKSPACE,
                &env,
                step.timeout,
                &mut live,
            )
            .await;
        let outcome = match result {
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
            // QEMU exiting cleanly mid-step means the guest powered off, rebooted or
            // panicked (-no-reboot, panic=-1): the test's doing, not the infrastructure's.
            Err(VmError::Died {
                clean_exit: true, ..
            }) => {
                let why =
                    "\nrunner: the guest powered off, rebooted or panicked during this step\n";
                current.tail.push(why.as_bytes());
                reporters.emit(Event::Output {
                    id: id.clone(),
                    bytes: why.as_bytes().to_vec(),
                });
                Outcome::Failed {
                    exit_code: None,
                    signal: None,
                }
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
            Outcome::Failed { .. } => {
                outcomes.push(outcome);
                break;
            }
            _ => {
                // Timeout or a broken VM: nothing more can run in it.
                stop = Some(outcome);
                break;
            }
        }
    }
    if let Some(o) = stop {
        return o;
    }
    // Results come back even when a step failed: that is when they matter most.
    let results = collect_results(plan, vm, state).await;
    outcomes.push(results);
    Outcome::combine(&outcomes)
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

/// A short command of the runner's own in the guest; its output is returned, not shown.
async fn housekeeping(vm: &mut Vm, script: &str) -> Result<(CommandEnd, String), Outcome> {
    let mut out = TailBuffer::new(256 * 1024);
    let env = [
        (
            "PATH".to_string(),
            "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
        ),
        ("LANG".into(), "C.UTF-8".into()),
    ];
    let end = vm
        .run(
            &GuestCommand::Script(script.into()),
            "/",
            &env,
            HOUSEKEEPING_TIMEOUT,
            &mut |b: &[u8]| out.push(b),
        )
        .await
        .map_err(|e| vm_error(&e, true))?;
    Ok((end, out.text()))
}

async fn copy_in(vm: &mut Vm, archive: &[u8]) -> Result<(), Outcome> {
    vm.write_file(GUEST_WORKSPACE_TAR, archive)
        .await
        .map_err(|e| vm_error(&e, true))?;
    let script = format!("mkdir -p {GUEST_WORKSPACE} && tar -xf {GUEST_WORKSPACE_TAR} -C {GUEST_WORKSPACE} --no-same-owner && rm -f {GUEST_WORKSPACE_TAR}");
    match housekeeping(vm, &script).await? {
        (CommandEnd::Exited(0), _) => Ok(()),
        (end, out) => Err(infra(
            InfraKind::Agent,
            format!(
                "unpacking the workspace in the guest failed ({end:?}): {}",
                out.trim()
            ),
        )),
    }
}

/// Lists guest files matching `patterns` (relative to the workspace), one per line.
async fn list_guest_files(vm: &mut Vm, patterns: &[String]) -> Result<Vec<String>, Outcome> {
    if patterns.is_empty() {
        return Ok(Vec::new());
    }
    // Patterns are validated (relative, no `..`); quote everything but the glob characters.
    let globs: Vec<String> = patterns.iter().map(|p| shell_glob(p)).collect();
    let script = format!("cd {GUEST_WORKSPACE} || exit 0; for f in {}; do [ -f \"$f\" ] && printf '%s\\n' \"$f\"; done; exit 0", globs.join(" "));
    let (end, out) = housekeeping(vm, &script).await?;
    if end != CommandEnd::Exited(0) {
        return Err(infra(
            InfraKind::Agent,
            format!("listing result files in the guest failed ({end:?})"),
        ));
    }
    // Overlapping patterns list a file more than once; keep the first.
    let mut seen = std::collections::HashSet::new();
    Ok(out
        .lines()
        .filter(|l| !l.is_empty() && seen.insert(*l))
        .map(str::to_string)
        .collect())
}

/// Quotes a glob for sh, leaving `*`, `?` and `[...]` active.
fn shell_glob(pattern: &str) -> String {
    let mut s = String::new();
    for c in pattern.chars() {
        // Glob characters stay active; plain path characters need no quoting.
        if !("*?[]/._-".contains(c) || c.is_ascii_alphanumeric()) {
            s.push('\\');
        }
        s.push(c);
    }
    s
}

async fn collect_results(plan: &SuitePlan, vm: &mut Vm, state: &mut SuiteState<'_>) -> Outcome {
    let mut outcome = Outcome::Passed;
    match list_guest_files(vm, &plan.junit).await {
        Ok(files) => {
            for path in files {
                // Bounded in number and in total, not just per file.
                let total: usize = state.reports.iter().map(|r| r.xml.len()).sum();
                if state.reports.len() >= MAX_GUEST_REPORTS || total >= MAX_GUEST_REPORTS_TOTAL {
                    state.reports.push(GuestReport {
                        path,
                        xml: format!("<!-- not read: more than {MAX_GUEST_REPORTS} reports or {} MiB in all -->", MAX_GUEST_REPORTS_TOTAL >> 20),
                    });
                    break;
                }
                let guest_path = format!("{GUEST_WORKSPACE}/{path}");
                let limit = MAX_GUEST_REPORT.min(MAX_GUEST_REPORTS_TOTAL - total);
                match vm.read_file(&guest_path, limit).await {
                    Ok(bytes) => state.reports.push(GuestReport {
                        path,
                        xml: String::from_utf8_lossy(&bytes).into_owned(),
                    }),
                    // An unreadable or oversized report is the guest's doing: a test failure.
                    Err(VmError::Agent(AgentError::Protocol { detail, .. }))
                    | Err(VmError::Agent(AgentError::Command { desc: detail, .. })) => {
                        state.reports.push(GuestReport {
                            path: path.clone(),
                            xml: format!("<!-- {detail} -->"),
                        })
                    }
                    Err(e) => return vm_error(&e, true),
                }
            }
        }
        Err(o) => return o,
    }
    // Failing tests inside the guest's reports (or reports that are not JUnit) fail the suite,
    // even when every step exited 0.
    if state
        .reports
        .iter()
        .any(crate::report::junit::guest_report_failed)
    {
        outcome = Outcome::Failed {
            exit_code: None,
            signal: None,
        };
    }
    let files = match list_guest_files(vm, &plan.artifacts).await {
        Ok(f) => f,
        Err(o) => return o,
    };
    if !files.is_empty() {
        let list = files
            .iter()
            .map(|f| shell_quote(f))
            .collect::<Vec<_>>()
            .join(" ");
        let script = format!("cd {GUEST_WORKSPACE} && tar -cf {GUEST_ARTIFACTS_TAR} -- {list}");
        match housekeeping(vm, &script).await {
            Ok((CommandEnd::Exited(0), _)) => {
                match vm.read_file(GUEST_ARTIFACTS_TAR, MAX_ARTIFACTS).await {
                    Ok(bytes) => match workspace::unpack(&bytes, &plan.out_dir) {
                        Ok(paths) => state.artifacts = paths,
                        Err(e) => outcome = infra(InfraKind::Io, chain(&e)),
                    },
                    // Too large is the guest's doing (a failure); a broken agent is ours.
                    Err(VmError::Agent(AgentError::Protocol { .. })) => {
                        outcome = Outcome::Failed {
                            exit_code: None,
                            signal: None,
                        }
                    }
                    Err(e) => outcome = vm_error(&e, true),
                }
            }
            // tar failing on the guest's own files (unreadable, vanished) is a test failure.
            Ok(_) => {
                outcome = Outcome::Failed {
                    exit_code: None,
                    signal: None,
                }
            }
            Err(o) => return o,
        }
    }
    outcome
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
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
    fn globs_stay_globs_and_the_rest_is_quoted() {
        assert_eq!(shell_glob("build/junit/*.xml"), "build/junit/*.xml");
        assert_eq!(shell_glob("a b;$(x)"), "a\\ b\\;\\$\\(x\\)");
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
