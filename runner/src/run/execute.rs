//! The suite executor: runs one `SuitePlan` — image, host setup, boot, workspace copy,
//! steps with live output, results back, stop — and reports every stage as events. It
//! classifies every ending into one `Outcome`.
//!
//! Steps follow GitLab's rules, which include the suite file's as a special case: a step runs
//! when its `when` fits how the suite is going (`OnSuccess` steps stop after the first failure;
//! `OnFailure`/`Always` steps run after a failure, a timeout or a graceful interrupt, with
//! their own timeout). The caller can stop a run two ways ([`Controls`]): *cancel* kills the
//! VM at once; *interrupt* stops the running step gracefully, then runs the cleanup steps.

use std::path::Path;
use std::time::{Duration, Instant};

use engine::bounded::TailBuffer;
use engine::image::{BaseImage, ImageStore, RecipeLookup};
use engine::qemu::host::AccelChoice;
use engine::user::binfmt::Emulation;
use engine::user::{UserConfig, UserMachine};
use engine::vm::{CommandEnd, DiskSource, GuestCommand, StartKind, Vm, VmConfig};
use tokio::process::Command;
use tokio::sync::watch;

use crate::events::{Event, GuestReport, Reporters, VmFacts};
use crate::exit;
use crate::net::JobNetwork;
use crate::outcome::{chain, infra, vm_error, InfraKind, Outcome};
use crate::run::guest::Guest;
use crate::run::plan::{StepPlan, StepWhen, SuitePlan, GUEST_WORKSPACE};
use crate::run::platform;
use crate::snapshot;
use crate::suite::Mode;

use crate::run::{transfer, workspace};

/// Deadline for the agent's first answer on a normal boot (TCG on a busy host included).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Output tail kept per step for reports.
const STEP_TAIL_BYTES: usize = 64 * 1024;

/// What every suite run shares.
#[derive(Debug, Clone)]
pub struct RunSettings {
    pub store: ImageStore,
    pub accel: AccelChoice,
    pub boot_timeout: Duration,
    /// Resume VMs from saved states (and save them on first boot); off with `--cold-boot`.
    pub saved_states: bool,
    /// Parent of the per-VM directories; `None`: the store's `vms/`. `runner serve` uses a
    /// directory of its own that it can sweep completely at start.
    pub vms_dir: Option<std::path::PathBuf>,
    /// The isolation layers around each QEMU, detected once per process.
    pub containment: engine::sandbox::Containment,
    /// The operator's trusted recipe directory (`NAME.toml`), looked up before the built-in
    /// recipes.
    pub recipe_dir: Option<std::path::PathBuf>,
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
        image: plan.image.to_string(),
        ..Default::default()
    };
    let mut state = SuiteState {
        facts: &mut facts,
        reports: Vec::new(),
        artifacts: Vec::new(),
        steps_done: 0,
        current: None,
        denials: None,
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
    /// The job's network proxy's denials, logged under the step that asked.
    denials: Option<crate::net::proxy::Denials>,
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
    let platform = match platform::resolve(id.arch, settings.accel, &settings.store).await {
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
    let recipes = RecipeLookup {
        operator_dir: settings.recipe_dir.clone(),
        repository: plan.repository_recipes.clone(),
    };
    let image = {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        let progress = move |m: &str| {
            let _ = tx.send(m.to_string());
        };
        let build = platform::base_image(
            &settings.store,
            &plan.image,
            &recipes,
            &platform,
            None,
            false,
            &progress,
        );
        tokio::pin!(build);
        // The operator's image_build_timeout (serve). Dropping the build on expiry kills its
        // host tools' process groups and its bake VM, and removes its staging directory.
        let expired = async {
            match plan.image_build_timeout {
                Some(limit) => {
                    tokio::time::sleep_until(engine::bounded::deadline_in(limit)).await;
                    limit
                }
                None => std::future::pending().await,
            }
        };
        tokio::pin!(expired);
        loop {
            tokio::select! {
                r = &mut build => break r,
                limit = &mut expired => break Err(image_build_expired(&plan.image, limit)),
                Some(message) = rx.recv() => reporters.emit(Event::ImageProgress { id: id.clone(), message }),
            }
        }
    };
    let image = match image {
        Ok(i) => i,
        Err(o) => return o,
    };
    state.facts.kernel_version = image.manifest.kernel_version.clone();
    // User mode's root: unpacked once per image, like the image's build before the suite
    // timeout starts.
    let sysroot = match plan.mode {
        Mode::System => None,
        Mode::User => match engine::user::sysroot::ensure(&settings.store, &image).await {
            Ok(r) => Some(r),
            Err(e) => return infra(InfraKind::Image, chain(&e)),
        },
    };
    let timed = run_timed(
        plan,
        settings,
        reporters,
        state,
        &platform,
        &image,
        sysroot.as_deref(),
        interrupt,
    );
    // The suite timeout itself is enforced step by step (cleanup steps may outlive it); this
    // is the backstop for everything, boot and result collection included.
    match tokio::time::timeout(plan.hard_deadline(), timed).await {
        Ok(o) => o,
        Err(_) => Outcome::TimedOut,
    }
}

/// The outcome of an image build cut off by the operator's `image_build_timeout`.
fn image_build_expired(image: &str, limit: Duration) -> Outcome {
    infra(
        InfraKind::Image,
        format!(
            "building image '{image}' took longer than image_build_timeout = {} (an operator limit of this service); it was stopped",
            humantime::format_duration(limit)
        ),
    )
}

/// Everything the suite timeout covers: host setup, boot, steps, results — not the image
/// build before it, which happens once and must not be cut off half-way.
#[allow(clippy::too_many_arguments)]
async fn run_timed(
    plan: &SuitePlan,
    settings: &RunSettings,
    reporters: &mut Reporters,
    state: &mut SuiteState<'_>,
    platform: &platform::Platform,
    image: &BaseImage,
    sysroot: Option<&Path>,
    interrupt: watch::Receiver<bool>,
) -> Outcome {
    let id = plan.id.clone();
    let deadline = engine::bounded::deadline_in(plan.timeout);
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

    // 3. Workspace size (before boot: a too-large workspace should not cost a boot). Only
    // measured here; it is packed while it streams into the guest (`transfer::copy_in`).
    if let Some(ws) = &plan.workspace {
        if let Err(e) = workspace::measure_off_runtime(ws).await {
            return transfer::workspace_failed(&e);
        }
    }

    if let Some(sysroot) = sysroot {
        // User mode's sandbox has no network namespace of its own to open up.
        if plan.network.mode != crate::net::NetworkMode::None {
            return infra(
                InfraKind::Config,
                "network: user mode has no guest network (its sandbox has none); use mode = \"system\" for a networked suite".to_string(),
            );
        }
        return run_user(
            plan, settings, reporters, state, sysroot, deadline, interrupt,
        )
        .await;
    }

    // 4. Boot (the job's network proxy first, when it has one; it stops with `network`).
    let network = match start_network(plan, settings) {
        Ok(n) => n,
        Err(o) => return o,
    };
    reporters.emit(Event::VmBooting {
        id: id.clone(),
        accel: state.facts.accel.clone(),
    });
    let mut cfg = vm_config(plan, settings, platform, image);
    cfg.network = network.vm.clone();
    state.denials = network.denials();
    let mut vm = match Vm::boot(&cfg).await {
        Ok(vm) => vm,
        Err(e) => return vm_error(&e, false),
    };
    state.facts.vm_id = vm.id();
    state.facts.boot_time = Some(vm.boot_time);
    for message in std::mem::take(&mut vm.notes) {
        reporters.emit(Event::Note { message });
    }
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

    // A saved VM resumes only with the same devices, and `runner debug` gives it no NIC.
    let networked = plan.network.mode != crate::net::NetworkMode::None;
    if plan.keep_failed && networked {
        reporters.emit(Event::Note {
            message: "keep_failed: a VM with a network is not saved (runner debug resumes VMs without one)".into(),
        });
    }
    let keep = (plan.keep_failed && !networked).then(|| KeepFailed {
        image: plan.image.to_string(),
        image_key: image
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        rootfs_sha256: image
            .manifest
            .artifacts
            .get("rootfs.qcow2")
            .map(|a| a.sha256.clone())
            .unwrap_or_default(),
        qemu_version: platform.qemu.version.clone(),
        accel: platform.accel.accel.name().into(),
    });
    let outcome = in_vm(
        plan,
        &mut vm,
        reporters,
        state,
        deadline,
        interrupt,
        keep.as_ref(),
    )
    .await;
    // What was denied after the last step (e.g. a background process) goes last.
    for message in state
        .denials
        .take()
        .as_ref()
        .map(crate::net::denial_notes)
        .unwrap_or_default()
    {
        reporters.emit(Event::Note { message });
    }
    // A timed-out step leaves its command running: stop hard. Otherwise stop politely.
    match outcome {
        Outcome::TimedOut => vm.kill().await,
        _ => vm.shutdown().await,
    }
    outcome
}

/// User mode (`mode = "user"`): the steps under qemu-user in a sandbox whose root is the
/// image's files — no boot. The same step loop, events and results as a VM's.
#[allow(clippy::too_many_arguments)]
async fn run_user(
    plan: &SuitePlan,
    settings: &RunSettings,
    reporters: &mut Reporters,
    state: &mut SuiteState<'_>,
    sysroot: &Path,
    deadline: tokio::time::Instant,
    interrupt: watch::Receiver<bool>,
) -> Outcome {
    let id = plan.id.clone();
    let emulation = match engine::user::binfmt::check(id.arch) {
        Ok(e) => e,
        Err(e) => return infra(InfraKind::Host, chain(&e)),
    };
    state.facts.accel = match &emulation {
        Emulation::Native => "none (user mode, native)".into(),
        Emulation::Qemu { .. } => "qemu-user".into(),
    };
    // The guest kernel is not used: the host's runs the job.
    state.facts.kernel_version = format!(
        "host {}",
        nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    reporters.emit(Event::VmBooting {
        id: id.clone(),
        accel: state.facts.accel.clone(),
    });
    let started = Instant::now();
    let cfg = UserConfig {
        arch: id.arch,
        sysroot: sysroot.to_path_buf(),
        jobs_dir: settings
            .vms_dir
            .clone()
            .unwrap_or_else(|| settings.store.vms_dir()),
        containment: settings.containment.clone(),
        memory_mib: plan.memory_mib,
        cpus: plan.cpus,
        emulation,
    };
    let mut machine = match UserMachine::start(cfg) {
        Ok(m) => m,
        Err(e) => return infra(InfraKind::Host, chain(&e)),
    };
    state.facts.vm_id = machine
        .dir()
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    state.facts.boot_time = Some(started.elapsed());
    state.facts.start = "user mode: no boot (qemu-user on the host's kernel)".into();
    reporters.emit(Event::VmBooted {
        id: id.clone(),
        facts: state.facts.clone(),
    });
    if plan.keep_failed {
        reporters.emit(Event::Note {
            message: "keep_failed: user mode has no VM to save; a failed step keeps nothing".into(),
        });
    }
    let outcome = in_vm(
        plan,
        &mut machine,
        reporters,
        state,
        deadline,
        interrupt,
        None,
    )
    .await;
    machine.stop_command().await;
    outcome
}

/// The VM a plan boots: its machine, the image's kernel and disk, and the saved state
/// for exactly this configuration (also what `runner shell` boots).
pub fn vm_config(
    plan: &SuitePlan,
    settings: &RunSettings,
    platform: &platform::Platform,
    image: &BaseImage,
) -> VmConfig {
    VmConfig {
        arch: plan.id.arch,
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
        // Only where the arch table says a resumed guest keeps running (see engine::arch).
        saved_state: (settings.saved_states && plan.id.arch.info().saved_states.allow(plan.cpus))
            .then(|| {
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
        containment: settings.containment.clone(),
        // Set by the caller, which owns the job's proxy.
        network: engine::net::VmNetwork::None,
    }
}

/// What a failure snapshot records of the machine besides the step (see `snapshot`):
/// `Some` when the plan keeps failed VMs.
#[derive(Debug, Clone)]
struct KeepFailed {
    image: String,
    image_key: String,
    rootfs_sha256: String,
    qemu_version: String,
    accel: String,
}

/// The plan's network; for `proxy` the allowlist defaults to the recipe's mirror host.
fn start_network(plan: &SuitePlan, settings: &RunSettings) -> Result<JobNetwork, Outcome> {
    let mirror = match (plan.network.mode, &plan.network.allow) {
        (crate::net::NetworkMode::Proxy, None) => RecipeLookup {
            operator_dir: settings.recipe_dir.clone(),
            repository: plan.repository_recipes.clone(),
        }
        .find(&plan.image)
        .ok()
        .map(|r| r.mirror),
        _ => None,
    };
    JobNetwork::start(&plan.network, mirror.as_deref(), settings.containment.user)
        .map_err(|e| infra(InfraKind::Io, chain(&e)))
}

/// Inside the booted guest: files in, the steps, results out.
#[allow(clippy::too_many_arguments)]
async fn in_vm<G: Guest>(
    plan: &SuitePlan,
    guest: &mut G,
    reporters: &mut Reporters,
    state: &mut SuiteState<'_>,
    deadline: tokio::time::Instant,
    mut interrupt: watch::Receiver<bool>,
    keep: Option<&KeepFailed>,
) -> Outcome {
    if let Err(o) = guest.prepare(plan).await {
        return o;
    }
    tracing::debug!("workspace and files in the guest");
    let steps = run_steps(
        plan,
        guest,
        reporters,
        state,
        deadline,
        &mut interrupt,
        keep,
    );
    let mut so_far = match steps.await {
        Steps::AllRan(so_far) => so_far,
        Steps::CutShort(outcome) => return outcome,
    };
    // An interrupt that came while only cleanup steps ran still ends the run as cancelled.
    if *interrupt.borrow() && so_far.is_success() {
        so_far = Outcome::Cancelled;
    }
    // Results come back even when a step failed: that is when they matter most.
    tracing::debug!("steps done");
    let results = guest
        .collect_results(plan, &mut state.reports, &mut state.artifacts)
        .await;
    tracing::debug!("results collected");
    Outcome::combine(&[so_far, results])
}

/// How the step loop ended.
enum Steps {
    /// Every step ran or was skipped: results can be collected.
    AllRan(Outcome),
    /// The guest can do nothing more (it died or broke, or a timed-out command still runs
    /// in it and no later step needs it): the run ends here, without results.
    CutShort(Outcome),
}

/// Runs the plan's steps in order, each only if its `when` fits how the suite is going.
async fn run_steps<G: Guest>(
    plan: &SuitePlan,
    guest: &mut G,
    reporters: &mut Reporters,
    state: &mut SuiteState<'_>,
    deadline: tokio::time::Instant,
    interrupt: &mut watch::Receiver<bool>,
    keep: Option<&KeepFailed>,
) -> Steps {
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
            skip_step(plan, step, reporters, state);
            continue;
        }
        reporters.emit(Event::StepStarted {
            id: plan.id.clone(),
            step: step.name.clone(),
            index: index + plan.host_setup.len(),
        });
        let (timeout, stop) = match step.when {
            StepWhen::OnSuccess => (
                step.timeout
                    .min(deadline.saturating_duration_since(tokio::time::Instant::now())),
                &mut *interrupt,
            ),
            _ => (step.timeout, &mut never),
        };
        let env = step_env(&base_env, step);
        let end = run_step(plan, step, guest, &env, timeout, stop, reporters, state).await;
        let outcome = match end {
            StepEnd::Ended(outcome) => outcome,
            StepEnd::GuestGone(failed) => {
                return Steps::CutShort(Outcome::combine(&[so_far, failed]))
            }
        };
        // The first step that fails the suite, as it ended: before any cleanup step runs.
        // A timed-out step counts (its hung command, still running, is what there is to
        // see); a cancelled one does not (the user asked to stop).
        let fails_suite = matches!(outcome, Outcome::Failed { .. } | Outcome::TimedOut)
            && !step.allow_failure
            && so_far.is_success();
        if let (Some(keep), true) = (keep, fails_suite) {
            keep_failed(plan, step, &env, keep, guest, reporters).await;
        }
        so_far = match after_step(plan, index, so_far, outcome) {
            Next::Continue(so_far) => so_far,
            Next::StopCommandThenContinue(so_far) => match guest.stop_command().await {
                Ok(()) => so_far,
                Err(e) => return Steps::CutShort(Outcome::combine(&[so_far, vm_error(&e, true)])),
            },
            Next::Finish(so_far) => return Steps::CutShort(so_far),
        };
    }
    Steps::AllRan(so_far)
}

/// Saves the VM of `step`, which just failed, into the plan's `failed-vm/` with its
/// manifest, and says where (or why not) in a note; a failed save costs the job nothing.
async fn keep_failed<G: Guest>(
    plan: &SuitePlan,
    step: &StepPlan,
    env: &[(String, String)],
    keep: &KeepFailed,
    guest: &mut G,
    reporters: &mut Reporters,
) {
    let dir = plan.out_dir.join(snapshot::DIR_NAME);
    let started = Instant::now();
    let saved = async {
        // An earlier run's snapshot of this suite × arch is replaced, like its artifacts.
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(format!("cannot remove the earlier {}: {e}", dir.display()))
            }
            _ => {}
        }
        let size = guest.save_to(&dir).await.map_err(|e| chain(&e))?;
        let manifest = snapshot::Manifest {
            version: snapshot::VERSION,
            arch: plan.id.arch.name().into(),
            image: keep.image.clone(),
            image_key: keep.image_key.clone(),
            rootfs_sha256: keep.rootfs_sha256.clone(),
            qemu_version: keep.qemu_version.clone(),
            accel: keep.accel.clone(),
            cpus: plan.cpus,
            memory_mib: plan.memory_mib,
            state_format: engine::vm::state::FORMAT,
            suite: plan.id.suite.clone(),
            step: step.name.clone(),
            cwd: GUEST_WORKSPACE.into(),
            saved_at_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            env: env.iter().cloned().collect(),
        };
        if let Err(e) = manifest.write(&dir) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(chain(&e));
        }
        // What the job had in memory and in its environment, secrets included: only ours.
        use std::os::unix::fs::PermissionsExt;
        let private = std::fs::Permissions::from_mode(0o700);
        if let Err(e) = std::fs::set_permissions(&dir, private) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(format!("cannot make {} private: {e}", dir.display()));
        }
        Ok(size)
    }
    .await;
    let message = match saved {
        Ok(size) => format!(
            "saved the failed VM (step '{}') to {} in {:.1} s, {} MiB on disk; resume it with `runner debug {}`",
            step.name,
            dir.display(),
            started.elapsed().as_secs_f64(),
            size.div_ceil(1 << 20),
            dir.display()
        ),
        Err(why) => format!("cannot save the failed VM: {why}"),
    };
    reporters.emit(Event::Note { message });
}

/// Reports a step whose `when` does not fit as skipped.
fn skip_step(
    plan: &SuitePlan,
    step: &StepPlan,
    reporters: &mut Reporters,
    state: &mut SuiteState<'_>,
) {
    state.steps_done += 1;
    reporters.emit(Event::StepFinished {
        id: plan.id.clone(),
        step: step.name.clone(),
        outcome: Outcome::Skipped,
        duration: Duration::ZERO,
        output_tail: String::new(),
    });
}

/// The step's environment: the suite's, then `RUNNER_STEP`, then the step's own (last wins).
fn step_env(base_env: &[(String, String)], step: &StepPlan) -> Vec<(String, String)> {
    let mut env = base_env.to_vec();
    env.push(("RUNNER_STEP".into(), step.name.clone()));
    env.extend(step.env.iter().cloned());
    last_wins(env)
}

/// How one step's command ended, as the loop needs it.
enum StepEnd {
    /// The step has an outcome and was reported finished.
    Ended(Outcome),
    /// The guest powered off, rebooted or panicked during the step: it failed, and nothing
    /// more can run.
    GuestGone(Outcome),
}

/// Runs one step with live output and reports it finished.
#[allow(clippy::too_many_arguments)]
async fn run_step<G: Guest>(
    plan: &SuitePlan,
    step: &StepPlan,
    guest: &mut G,
    env: &[(String, String)],
    timeout: Duration,
    stop: &mut watch::Receiver<bool>,
    reporters: &mut Reporters,
    state: &mut SuiteState<'_>,
) -> StepEnd {
    let id = &plan.id;
    let current = state.current.insert(RunningStep::new(&step.name));
    let denials = state.denials.clone();
    let mut live = |bytes: &[u8]| {
        // A denied request shows up before the output of the tool that made it (which
        // usually reports the 403 next), so the reason is under the failure it explains.
        let notes = denials.as_ref().map(crate::net::denial_notes);
        for note in notes.into_iter().flatten() {
            let line = format!("runner: {note}\n");
            current.tail.push(line.as_bytes());
            reporters.emit(Event::Output {
                id: id.clone(),
                bytes: line.into_bytes(),
            });
        }
        if bytes.is_empty() {
            return;
        }
        current.tail.push(bytes);
        reporters.emit(Event::Output {
            id: id.clone(),
            bytes: bytes.to_vec(),
        });
    };
    let mut result = guest
        .run_step(&step.command, env, timeout, stop, &mut live)
        .await;
    // What the job did to its guest is its failure, named in its output: a limit it hit (a
    // step can exit 0 and leave a fork bomb behind), or a guest it stopped or broke. Once a
    // job's command has started the job owns the guest; a VM that never booted failed earlier.
    let mut notes = Vec::new();
    if let Ok(end) = &result {
        let failed = *end != CommandEnd::Exited(0);
        match guest.limits_hit(failed).await {
            Ok(hits) => notes.extend(hits),
            Err(e) => result = Err(e),
        }
    }
    let fault = result.as_ref().err().and_then(|e| guest.job_fault(e));
    notes.extend(fault.iter().cloned());
    for note in &notes {
        live(format!("\nrunner: {note}\n").as_bytes());
    }
    // Denied after the step's last output: still this step's (a denial alone does not
    // fail a step; the tool that was denied decides).
    live(b"");
    let job_failed = Outcome::Failed {
        exit_code: None,
        signal: None,
    };
    let (outcome, gone) = match result {
        Ok(CommandEnd::Exited(0)) if !notes.is_empty() => (job_failed, false),
        Ok(CommandEnd::NotFound) => {
            // Only when the wrapper found argv[0] missing; a 127 from inside the command
            // is the guest's own message, already in the output.
            if let GuestCommand::Argv(argv) = &step.command {
                reporters.emit(Event::Note {
                    message: format!(
                        "exit 127: `{}` was not found in the guest (is it installed in the image?)",
                        argv[0]
                    ),
                });
            }
            (step_outcome(CommandEnd::NotFound), false)
        }
        Ok(end) => (step_outcome(end), false),
        // Nothing more can run in it.
        Err(_) if fault.is_some() => (job_failed, true),
        Err(e) => (vm_error(&e, true), false),
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
    if gone {
        StepEnd::GuestGone(outcome)
    } else {
        StepEnd::Ended(outcome)
    }
}

/// A step's outcome from how its command ended.
fn step_outcome(end: CommandEnd) -> Outcome {
    match end {
        CommandEnd::Exited(0) => Outcome::Passed,
        CommandEnd::Exited(code) => Outcome::Failed {
            exit_code: Some(code),
            signal: None,
        },
        CommandEnd::Signaled(sig) => Outcome::Failed {
            exit_code: None,
            signal: Some(sig),
        },
        CommandEnd::NotFound => Outcome::Failed {
            exit_code: Some(exit::COMMAND_NOT_FOUND),
            signal: None,
        },
        CommandEnd::TimedOut => Outcome::TimedOut,
        CommandEnd::Stopped => Outcome::Cancelled,
    }
}

/// What the loop does after a step.
#[derive(Debug, PartialEq)]
enum Next {
    Continue(Outcome),
    /// The step's command still runs and a later step needs the guest: kill it first.
    StopCommandThenContinue(Outcome),
    Finish(Outcome),
}

/// Folds step `index`'s `outcome` into `so_far` and decides what comes next.
fn after_step(plan: &SuitePlan, index: usize, so_far: Outcome, outcome: Outcome) -> Next {
    let step = &plan.steps[index];
    match &outcome {
        Outcome::Passed => Next::Continue(so_far),
        Outcome::Failed { .. } if step.allow_failure => Next::Continue(so_far),
        Outcome::Failed { .. } => Next::Continue(Outcome::combine(&[so_far, outcome])),
        Outcome::TimedOut | Outcome::Cancelled => {
            let so_far = if step.allow_failure && outcome == Outcome::TimedOut {
                so_far
            } else {
                Outcome::combine(&[so_far, outcome])
            };
            // The command still runs. Kill it only when a later step needs the VM;
            // otherwise the VM goes, and the command with it.
            let succeeded = so_far.is_success();
            let more = plan.steps[index + 1..]
                .iter()
                .any(|s| s.when.runs(succeeded));
            if more {
                Next::StopCommandThenContinue(so_far)
            } else {
                Next::Finish(so_far)
            }
        }
        // A broken VM: nothing more can run in it.
        _ => Next::Finish(Outcome::combine(&[so_far, outcome])),
    }
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
pub(crate) fn guest_env(plan: &SuitePlan) -> Vec<(String, String)> {
    let mut env = vec![
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
        ("RUNNER_DEBIAN_ARCH".into(), plan.id.arch.debian().into()),
        ("RUNNER_SUITE".into(), plan.id.suite.clone()),
        ("RUNNER_WORKSPACE".into(), GUEST_WORKSPACE.into()),
    ];
    env.extend(crate::net::guest::env(plan.network.mode));
    env
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

    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    use engine::vm::{GuestCommand, GuestFault, VmError};
    use engine::Arch;

    use crate::events::Reporter;
    use crate::run::plan::{plan_command, Overrides};

    /// How the fake guest ends the next step.
    enum Ending {
        End(CommandEnd),
        /// QEMU exits cleanly mid-step: the guest powered off or panicked.
        GuestPoweredOff,
        /// QEMU dies under the step (a crash, or killed).
        QemuCrashed,
        /// Something on the host side fails under the step (not the guest's doing).
        HostError,
        /// The run is interrupted while the step runs; the step ends `Stopped` if the loop
        /// handed it the interrupt, else it finishes normally.
        Interrupted,
    }

    /// A guest that ends each step as scripted and records what it was asked to do.
    struct FakeGuest {
        endings: VecDeque<Ending>,
        interrupt: watch::Sender<bool>,
        ran: Vec<String>,
        stopped_commands: usize,
        collected: bool,
        /// (the step that had just run, the directory) of each `save_to`.
        saved: Vec<(String, std::path::PathBuf)>,
    }

    impl Guest for FakeGuest {
        async fn prepare(&mut self, _: &SuitePlan) -> Result<(), Outcome> {
            Ok(())
        }

        async fn run_step(
            &mut self,
            _: &GuestCommand,
            env: &[(String, String)],
            _: Duration,
            stop: &mut watch::Receiver<bool>,
            live: &mut (dyn FnMut(&[u8]) + Send),
        ) -> Result<CommandEnd, VmError> {
            let name = env.iter().find(|(k, _)| k == "RUNNER_STEP").unwrap();
            self.ran.push(name.1.clone());
            live(format!("output of {}\n", name.1).as_bytes());
            match self
                .endings
                .pop_front()
                .expect("a scripted ending per step")
            {
                Ending::End(end) => Ok(end),
                Ending::GuestPoweredOff => Err(VmError::Died {
                    status: "exit status: 0".into(),
                    clean_exit: true,
                    stderr: String::new(),
                }),
                Ending::QemuCrashed => Err(VmError::Died {
                    status: "signal: 11".into(),
                    clean_exit: false,
                    stderr: String::new(),
                }),
                Ending::HostError => Err(VmError::Dir {
                    parent: "/nonexistent".into(),
                    source: std::io::Error::other("disk gone"),
                }),
                Ending::Interrupted => {
                    self.interrupt.send_replace(true);
                    Ok(if *stop.borrow() {
                        CommandEnd::Stopped
                    } else {
                        CommandEnd::Exited(0)
                    })
                }
            }
        }

        async fn stop_command(&mut self) -> Result<(), VmError> {
            self.stopped_commands += 1;
            Ok(())
        }

        async fn limits_hit(&mut self, _: bool) -> Result<Vec<String>, VmError> {
            Ok(Vec::new())
        }

        fn job_fault(&self, e: &VmError) -> Option<String> {
            GuestFault::during_job(e, "").map(|f| f.to_string())
        }

        async fn save_to(&mut self, dir: &std::path::Path) -> Result<u64, VmError> {
            self.saved
                .push((self.ran.last().cloned().unwrap_or_default(), dir.into()));
            std::fs::create_dir_all(dir).unwrap();
            Ok(1)
        }

        async fn collect_results(
            &mut self,
            _: &SuitePlan,
            _: &mut Vec<GuestReport>,
            _: &mut Vec<std::path::PathBuf>,
        ) -> Outcome {
            self.collected = true;
            Outcome::Passed
        }
    }

    struct Collect(Arc<Mutex<Vec<Event>>>);
    impl Reporter for Collect {
        fn on_event(&mut self, event: &Event) {
            self.0.lock().unwrap().push(event.clone());
        }
    }

    /// What a run in the fake guest came to.
    struct Ran {
        outcome: Outcome,
        /// Each reported step with its outcome, in order.
        finished: Vec<(String, Outcome)>,
        guest: FakeGuest,
        steps_done: usize,
    }

    /// Runs steps `(name, when, allow_failure)` in a fake guest ending them as `endings` say.
    async fn run(steps: &[(&str, StepWhen, bool)], endings: Vec<Ending>) -> Ran {
        run_keeping(steps, endings, None).await
    }

    /// [`run`], keeping a failed step's VM in `out_dir/failed-vm` when `keep` names one.
    async fn run_keeping(
        steps: &[(&str, StepWhen, bool)],
        endings: Vec<Ending>,
        keep: Option<&std::path::Path>,
    ) -> Ran {
        let mut plan = plan_command(
            vec!["true".into()],
            Arch::Riscv64,
            None,
            &Overrides::default(),
        );
        let keeping = keep.map(|out| {
            plan.out_dir = out.to_path_buf();
            KeepFailed {
                image: "debian-13".into(),
                image_key: "debian-13-riscv64-0123456789abcdef".into(),
                rootfs_sha256: "ab".repeat(32),
                qemu_version: "10.0.2".into(),
                accel: "tcg".into(),
            }
        });
        let template = plan.steps[0].clone();
        plan.steps = steps
            .iter()
            .map(|&(name, when, allow_failure)| StepPlan {
                name: name.into(),
                when,
                allow_failure,
                ..template.clone()
            })
            .collect();
        let (interrupt_tx, interrupt) = watch::channel(false);
        let mut guest = FakeGuest {
            endings: endings.into(),
            interrupt: interrupt_tx,
            ran: Vec::new(),
            stopped_commands: 0,
            collected: false,
            saved: Vec::new(),
        };
        let events = Arc::new(Mutex::new(Vec::new()));
        let mut reporters = Reporters::default();
        reporters.add(Box::new(Collect(events.clone())));
        let mut facts = VmFacts::default();
        let mut state = SuiteState {
            facts: &mut facts,
            reports: Vec::new(),
            artifacts: Vec::new(),
            steps_done: 0,
            current: None,
            denials: None,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3600);
        let outcome = in_vm(
            &plan,
            &mut guest,
            &mut reporters,
            &mut state,
            deadline,
            interrupt,
            keeping.as_ref(),
        )
        .await;
        let finished = events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                Event::StepFinished {
                    step,
                    outcome,
                    output_tail,
                    ..
                } => {
                    // A step that ran shows its own output in its tail.
                    if *outcome != Outcome::Skipped {
                        assert!(
                            output_tail.contains(&format!("output of {step}")),
                            "{output_tail}"
                        );
                    }
                    Some((step.clone(), outcome.clone()))
                }
                _ => None,
            })
            .collect();
        let steps_done = state.steps_done;
        assert!(state.current.is_none(), "no step left marked as running");
        Ran {
            outcome,
            finished,
            guest,
            steps_done,
        }
    }

    fn exit(code: i32) -> Ending {
        Ending::End(CommandEnd::Exited(code))
    }
    fn failed(code: i32) -> Outcome {
        Outcome::Failed {
            exit_code: Some(code),
            signal: None,
        }
    }
    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[tokio::test]
    async fn only_the_step_that_fails_the_suite_is_saved_before_cleanup_runs() {
        use StepWhen::*;
        let steps = [
            ("lint", OnSuccess, true),
            ("test", OnSuccess, false),
            ("logs", OnFailure, false),
        ];
        let out = tempfile::tempdir().unwrap();
        // lint fails but may; test fails the suite; the cleanup step fails too.
        let r = run_keeping(&steps, vec![exit(1), exit(2), exit(3)], Some(out.path())).await;
        let dir = out.path().join(snapshot::DIR_NAME);
        assert_eq!(r.guest.saved, [("test".to_string(), dir.clone())]);
        let s = snapshot::load(&dir).unwrap();
        assert_eq!(
            (s.manifest.step.as_str(), s.manifest.cwd.as_str()),
            ("test", "/workspace")
        );
        assert_eq!(s.manifest.env["RUNNER_STEP"], "test");
        // Not kept: nothing saved for a failure.
        let r = run(&steps, vec![exit(1), exit(2), exit(3)]).await;
        assert!(r.guest.saved.is_empty());
        // A step that timed out is kept too (its hung command is the thing to look at).
        let out = tempfile::tempdir().unwrap();
        let steps = [("hang", OnSuccess, false)];
        let r = run_keeping(
            &steps,
            vec![Ending::End(CommandEnd::TimedOut)],
            Some(out.path()),
        )
        .await;
        assert_eq!(r.guest.saved.len(), 1);
    }

    #[tokio::test]
    async fn a_failing_step_skips_later_on_success_steps_but_runs_cleanup() {
        use StepWhen::*;
        let steps = [
            ("build", OnSuccess, false),
            ("test", OnSuccess, false),
            ("logs", OnFailure, false),
            ("clean", Always, false),
        ];
        let r = run(&steps, vec![exit(2), exit(0), exit(0)]).await;
        assert_eq!(r.guest.ran, names(&["build", "logs", "clean"]));
        assert_eq!(
            r.finished,
            [
                ("build".to_string(), failed(2)),
                ("test".to_string(), Outcome::Skipped),
                ("logs".to_string(), Outcome::Passed),
                ("clean".to_string(), Outcome::Passed),
            ]
        );
        assert_eq!(r.outcome, failed(2));
        assert_eq!(r.steps_done, 4);
        assert!(r.guest.collected, "results come back after a failure");
    }

    #[tokio::test]
    async fn on_failure_steps_do_not_run_after_success() {
        use StepWhen::*;
        let steps = [("test", OnSuccess, false), ("logs", OnFailure, false)];
        let r = run(&steps, vec![exit(0)]).await;
        assert_eq!(r.guest.ran, names(&["test"]));
        assert_eq!(r.outcome, Outcome::Passed);
    }

    #[tokio::test]
    async fn allow_failure_covers_a_failure_and_a_timeout() {
        use StepWhen::*;
        // (ending of the allowed step, suite outcome)
        let cases = [
            (exit(1), Outcome::Passed),
            (Ending::End(CommandEnd::TimedOut), Outcome::Passed),
        ];
        for (ending, want) in cases {
            let steps = [("lint", OnSuccess, true), ("test", OnSuccess, false)];
            let r = run(&steps, vec![ending, exit(0)]).await;
            assert_eq!(r.guest.ran, names(&["lint", "test"]));
            assert_eq!(r.outcome, want);
        }
        // The timed-out command still runs: it is killed before the next step.
        let steps = [("lint", OnSuccess, true), ("test", OnSuccess, false)];
        let r = run(&steps, vec![Ending::End(CommandEnd::TimedOut), exit(0)]).await;
        assert_eq!(r.guest.stopped_commands, 1);
    }

    #[tokio::test]
    async fn a_timeout_without_allow_failure_fails_the_suite() {
        use StepWhen::*;
        // With a cleanup step: the command is stopped, the cleanup runs, results come back.
        let steps = [
            ("test", OnSuccess, false),
            ("more", OnSuccess, false),
            ("clean", Always, false),
        ];
        let r = run(&steps, vec![Ending::End(CommandEnd::TimedOut), exit(0)]).await;
        assert_eq!(r.guest.ran, names(&["test", "clean"]));
        assert_eq!(
            (r.outcome, r.guest.stopped_commands, r.guest.collected),
            (Outcome::TimedOut, 1, true)
        );
        // Without one: nothing more needs the guest, so it is left as it is (the VM goes).
        let r = run(
            &[("test", OnSuccess, false)],
            vec![Ending::End(CommandEnd::TimedOut)],
        )
        .await;
        assert_eq!(
            (r.outcome, r.guest.stopped_commands, r.guest.collected),
            (Outcome::TimedOut, 0, false)
        );
    }

    #[tokio::test]
    async fn an_interrupt_stops_the_step_runs_cleanup_and_cancels() {
        use StepWhen::*;
        let steps = [
            ("test", OnSuccess, false),
            ("more", OnSuccess, false),
            ("clean", Always, false),
        ];
        // The cleanup step is interrupted too, but must not be stopped by it.
        let r = run(&steps, vec![Ending::Interrupted, Ending::Interrupted]).await;
        assert_eq!(r.guest.ran, names(&["test", "clean"]));
        assert_eq!(
            r.finished,
            [
                ("test".to_string(), Outcome::Cancelled),
                ("more".to_string(), Outcome::Skipped),
                ("clean".to_string(), Outcome::Passed),
            ]
        );
        assert_eq!(
            (r.outcome, r.guest.stopped_commands),
            (Outcome::Cancelled, 1)
        );
        assert!(r.guest.collected);
    }

    #[tokio::test]
    async fn an_interrupt_during_cleanup_still_cancels() {
        use StepWhen::*;
        let steps = [("test", OnSuccess, false), ("clean", Always, false)];
        let r = run(&steps, vec![exit(0), Ending::Interrupted]).await;
        assert_eq!(r.guest.ran, names(&["test", "clean"]));
        assert_eq!(r.outcome, Outcome::Cancelled);
    }

    #[tokio::test]
    async fn a_guest_that_powers_off_fails_the_step_and_ends_the_run() {
        use StepWhen::*;
        let steps = [("test", OnSuccess, false), ("clean", Always, false)];
        let r = run(&steps, vec![Ending::GuestPoweredOff]).await;
        // Nothing more can run in it, cleanup included; no results either.
        assert_eq!(r.guest.ran, names(&["test"]));
        assert_eq!(
            r.finished,
            [(
                "test".to_string(),
                Outcome::Failed {
                    exit_code: None,
                    signal: None
                }
            )]
        );
        assert_eq!(
            r.outcome,
            Outcome::Failed {
                exit_code: None,
                signal: None
            }
        );
        assert!(!r.guest.collected);
    }

    #[tokio::test]
    async fn qemu_dying_under_a_step_is_the_jobs_failure_and_nothing_more_runs() {
        // Once the job's command runs, the job owns the guest: a VM that stops under it is
        // the job's doing (it can crash or starve its own VM), said in its output.
        use StepWhen::*;
        let steps = [("test", OnSuccess, false), ("clean", Always, false)];
        let r = run(&steps, vec![Ending::QemuCrashed]).await;
        assert_eq!(r.guest.ran, names(&["test"]));
        assert_eq!(
            r.outcome,
            Outcome::Failed {
                exit_code: None,
                signal: None
            }
        );
        assert!(!r.guest.collected);
    }

    #[tokio::test]
    async fn a_host_side_error_under_a_step_is_an_infrastructure_error() {
        use StepWhen::*;
        let steps = [("test", OnSuccess, false)];
        let r = run(&steps, vec![Ending::HostError]).await;
        assert!(
            matches!(r.outcome, Outcome::InfraError { .. }),
            "{:?}",
            r.outcome
        );
    }

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
