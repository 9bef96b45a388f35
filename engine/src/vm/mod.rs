//! A running VM as an owned resource: boot (overlay, QEMU, QMP, agent handshake under a
//! deadline), run commands with live output, move files, and stop. Dropping a `Vm` on any
//! path kills its process group and removes its directory.

mod dir;
pub mod exec;
mod fault;
pub mod job_cgroup;
pub mod overlay;
mod resume;
pub mod shell;
pub mod state;
mod stream;

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

use crate::agent::{AgentClient, AgentError, ExecStatus};
use crate::arch::Arch;
use crate::net::VmNetwork;
use crate::qemu::process::{QemuProcess, SIGTERM_GRACE};
use crate::qemu::qmp::{QmpClient, QmpError};
use crate::qemu::spec::{self, Accel, RootDisk, VmSockets, VmSpec};
use crate::sandbox::{self, Containment, SandboxError, VmView};
pub use dir::{sweep_abandoned, sweep_all, VmDir};
pub use exec::{CommandEnd, GuestCommand};
pub use fault::GuestFault;
pub use job_cgroup::{JobLimits, LimitHit};
use overlay::OverlayError;
use resume::Timers;

/// How long QEMU may take to create its sockets after it starts.
/// How many times a cold-booted VM is saved (and each save checked) before its key is given
/// up on for a while (see [`Vm::save_checked`]). Each attempt costs about one resume.
const SAVE_ATTEMPTS: u32 = 4;
/// How long a resumed guest's agent may take to answer (at most the boot timeout). It answers
/// within a second or two; one that has not in this long is stuck (a riscv64 hart with a dead
/// timer can stall it), and booting cold is quicker than waiting out the boot timeout.
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
const SOCKET_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a KVM guest's boot looks for QEMU's "KVM internal error" on its stderr.
const KVM_ERROR_POLL: Duration = Duration::from_millis(250);
/// Timeout for one QMP command.
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// Timeout for one agent command that should answer at once.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// `guest-exec-status` reaps the record it reports; give it time rather than lose the status.
const EXEC_STATUS_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a running command's agent may leave its status polls unanswered before that is
/// an error. One poll going unanswered for [`EXEC_STATUS_TIMEOUT`] is not enough: a busy guest
/// under TCG (a one-CPU mipsel image bake running dpkg on a loaded host) can hold the agent off
/// that long and then answer again. The step's own timeout still bounds the wait.
const AGENT_SILENCE_LIMIT: Duration = Duration::from_secs(120);
/// After `quit`, how long QEMU gets to exit before SIGTERM.
const QUIT_GRACE: Duration = Duration::from_secs(3);
/// After the agent's connection broke mid-command, how long QEMU gets to show it is exiting.
const DIED_GRACE: Duration = Duration::from_secs(2);
/// How often a running job command's process count is checked (see [`job_cgroup`]).
const LIMIT_POLL: Duration = Duration::from_secs(1);
/// How long killing a left-running command's process tree may take (SIGTERM grace included).
const KILL_TREE_TIMEOUT: Duration = Duration::from_secs(15);
/// Chunks of live output buffered between the port reader and the consumer. When full, the
/// reader stops reading and the guest blocks on write: memory stays bounded.
const OUTPUT_QUEUE: usize = 64;
/// Where `run_script` puts its script's output (`.tail`: the part read back).
const SCRIPT_OUTPUT: &str = "/run/runner/script.out";

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot create the VM directory under {parent}")]
    Dir {
        parent: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Overlay(#[from] OverlayError),
    #[error("cannot contain QEMU")]
    Sandbox(#[from] SandboxError),
    #[error("cannot start {binary}")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "QEMU exited during boot ({status}): {stderr}\n--- guest console (tail) ---\n{console}"
    )]
    QemuExited {
        status: ExitStatus,
        stderr: String,
        console: String,
    },
    #[error("the guest did not boot: its agent did not answer within {timeout:?}\n--- guest console (tail) ---\n{console}")]
    BootTimeout { timeout: Duration, console: String },
    /// QEMU stopped the guest with a KVM internal error (it then waits, paused, forever).
    #[error("KVM could not run this guest (QEMU: {stderr}); this host's KVM does not work for it: run with --accel tcg")]
    KvmFailed { stderr: String },
    #[error("QEMU did not create {path} within {SOCKET_TIMEOUT:?}")]
    Socket { path: PathBuf },
    #[error("QMP failed")]
    Qmp(#[from] QmpError),
    #[error("cannot resume the saved VM state")]
    State(#[from] state::StateError),
    #[error("guest agent failed")]
    Agent(#[from] AgentError),
    /// User mode's machine (no VM, the same commands; see [`crate::user`]).
    #[error(transparent)]
    User(#[from] crate::user::UserError),
    #[error("the VM stopped while a command was running ({status}): {stderr}")]
    Died {
        status: String,
        /// QEMU exited with status 0: the guest shut itself down (or panicked).
        clean_exit: bool,
        stderr: String,
    },
}

/// The disk a VM boots from.
#[derive(Debug, Clone)]
pub enum DiskSource {
    /// A fresh copy-on-write overlay of this read-only qcow2 base (normal jobs).
    Overlay(PathBuf),
    /// This image itself, writable (only the image builder's bake uses it).
    Direct { path: PathBuf, format: &'static str },
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub arch: Arch,
    pub accel: Accel,
    pub qemu_binary: PathBuf,
    pub sandbox: bool,
    pub cpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub disk: DiskSource,
    /// Parent of the per-VM directories.
    pub state_dir: PathBuf,
    /// Deadline for the agent's first answer.
    pub boot_timeout: Duration,
    /// Where the saved state for exactly this configuration lives (see [`state`]). When it
    /// exists the VM resumes from it; when it does not, a cold boot saves it. `None`: always
    /// boot cold, save nothing.
    pub saved_state: Option<PathBuf>,
    /// The isolation layers around QEMU (see [`crate::sandbox`]).
    pub containment: Containment,
    /// The guest's NIC, if any (see [`crate::net`]).
    pub network: VmNetwork,
}

/// How a VM came to life (for reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartKind {
    /// Booted from the kernel.
    Cold,
    /// Booted cold, then its state was saved for later jobs.
    ColdSaved,
    /// Resumed from a saved state.
    Restored,
    /// Booted cold because the saved state could not be used or made (the reason).
    ColdFallback(String),
}

/// A booted VM whose agent has answered.
#[derive(Debug)]
pub struct Vm {
    process: QemuProcess,
    qmp: QmpClient,
    agent: AgentClient<UnixStream>,
    output: mpsc::Receiver<Vec<u8>>,
    /// The host's end of the live-output port, towards the guest (see [`shell`]).
    port_writer: tokio::net::unix::OwnedWriteHalf,
    /// The host's end of the control port (see [`resume`]); never read.
    #[allow(dead_code)]
    control: UnixStream,
    /// A resumed VM's helper, woken and not yet answered.
    woken: Option<resume::Woken>,
    /// How long from QEMU start to the agent's first answer.
    pub boot_time: Duration,
    pub start_kind: StartKind,
    /// The overlay this VM writes to, and the base image under it, when it has one.
    overlay: Option<PathBuf>,
    base: Option<PathBuf>,
    /// What happened on the way to this start that the user should hear of (a saved state
    /// that failed its check, say), one line each.
    pub notes: Vec<String>,
    /// The wrapper pid of a command that timed out or was stopped and may still run.
    left_running: Option<i64>,
    /// The job's refused-fork count as the last job command's wrapper reported it.
    reported_pids_refused: Option<u64>,
    /// The job cgroup's limits, and its counters as last read (see [`job_cgroup`]).
    job_limits: JobLimits,
    job_counters: job_cgroup::JobCounters,
    /// The guest's architecture (the after-resume helper's syscall numbers).
    arch: Arch,
    // Last field: dropped after the process is killed.
    dir: VmDir,
}

impl Vm {
    /// Starts a VM and waits for its agent, failing at once if QEMU exits: resumed from the
    /// saved state when there is one, else booted cold (and then saved, when asked).
    pub async fn boot(cfg: &VmConfig) -> Result<Vm, VmError> {
        let Some(state_dir) = &cfg.saved_state else {
            return Vm::start(cfg, None).await;
        };
        if cfg.network != VmNetwork::None {
            // States are saved without a NIC: a VM with one cannot resume from them.
            return Vm::start(cfg, None).await;
        }
        let mut fallback = None;
        if state::is_complete(state_dir) {
            let restore_started = Instant::now();
            match Vm::resume_checked(cfg, state_dir, Timers::Rearmed).await {
                Ok(mut vm) => {
                    vm.boot_time = restore_started.elapsed();
                    return Ok(vm);
                }
                Err(why) => fallback = Some(why),
            }
            // A state that fails once will fail again: drop it; the cold boot saves anew.
            state::discard(state_dir);
        } else if let Some((why, left)) = state::unsaveable(state_dir) {
            let mut vm = Vm::start(cfg, None).await?;
            vm.start_kind = StartKind::ColdFallback(format!(
                "no saved state for this VM: {why}; saving is tried again in {} min",
                left.as_secs().div_ceil(60)
            ));
            return Ok(vm);
        }
        let mut vm = Vm::start(cfg, None).await?;
        let saved = match vm.save_checked(cfg, state_dir).await {
            Ok(saved) => saved,
            Err(e) => {
                // The VM is paused and will not run on: this boot failed.
                vm.kill().await;
                return Err(e);
            }
        };
        vm.start_kind = match (fallback, saved) {
            (Some(reason), _) => StartKind::ColdFallback(reason),
            (None, None) => StartKind::ColdSaved,
            (None, Some(why)) => StartKind::ColdFallback(why),
        };
        Ok(vm)
    }

    /// A VM resumed from the state in `dir` that passed the after-restore check, or why not
    /// (one line, for a note: a failed resume is routine, the job boots cold). `timers`:
    /// what riscv64 guests get (other guests' timers survive a save).
    async fn resume_checked(cfg: &VmConfig, dir: &Path, timers: Timers) -> Result<Vm, String> {
        let timers = if cfg.arch == Arch::Riscv64 {
            timers
        } else {
            Timers::Trusted
        };
        match Vm::start(cfg, Some((dir, timers))).await {
            Ok(mut vm) => match vm.after_restore().await {
                Ok(()) => {
                    tracing::debug!("after-resume helper answered");
                    Ok(vm)
                }
                Err(e) => {
                    vm.kill().await;
                    Err(format!("resumed VM did not respond: {e}"))
                }
            },
            Err(e) => {
                // With the cause: "does not match its checksum" must reach the user.
                let mut why = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    why = format!("{why}: {c}");
                    cause = c.source();
                }
                Err(format!(
                    "cannot resume from {}: {}",
                    dir.display(),
                    // QEMU's own exit: its last stderr lines, not the console tail.
                    if matches!(e, VmError::QemuExited { .. }) {
                        one_line(&e)
                    } else {
                        why.lines().next().unwrap_or_default().to_string()
                    }
                ))
            }
        }
    }

    /// Saves this VM's state for later jobs under `dir`, then lets it run on. Each save is
    /// resumed once in a fresh VM (the command line a job uses) and must pass the same check
    /// a job's resume does before it is published: a save can be bad (riscv64 under QEMU
    /// 10.0, see [`resume`]), and a job must never be the first to find out.
    /// A bad save is dropped and the VM saved again, [`SAVE_ATTEMPTS`] times at most; then
    /// the key is marked unsaveable for a while. Returns why nothing was published, if so;
    /// each failed attempt adds a line to [`Vm::notes`].
    async fn save_checked(
        &mut self,
        cfg: &VmConfig,
        dir: &Path,
    ) -> Result<Option<String>, VmError> {
        // The guest side of every resume from this VM's saves, saved with it.
        if let Err(e) = resume::start_helper(&mut self.agent, &mut self.output, cfg.arch).await {
            let why = format!("cannot save the VM state: {e}");
            self.notes.push(why.clone());
            state::mark_unsaveable(dir, &why);
            return Ok(Some(format!("no saved state for this VM: {why}")));
        }
        let mut why = String::new();
        for attempt in 1..=SAVE_ATTEMPTS {
            let overlay = self.overlay.clone();
            let base = self.base.clone();
            let staged = match (overlay, base) {
                (Some(overlay), Some(base)) => {
                    state::save(&mut self.qmp, &overlay, &base, dir).await
                }
                _ => Err(state::StateError::NoOverlay),
            };
            let failure = match staged {
                Ok(staged) => match Vm::resume_checked(cfg, staged.path(), Timers::Checked).await {
                    Ok(check) => {
                        check.kill().await;
                        staged.publish(dir);
                        return Ok(None);
                    }
                    Err(e) => format!("the saved state failed its check: {e}"),
                },
                Err(state::StateError::Resume(e)) => return Err(VmError::Qmp(e)),
                Err(e) => format!("cannot save the VM state: {e}"),
            };
            self.notes.push(format!(
                "saving the VM state, attempt {attempt} of {SAVE_ATTEMPTS}: {failure}"
            ));
            why = failure;
        }
        let why = format!("its last {SAVE_ATTEMPTS} saves failed ({why})");
        state::mark_unsaveable(dir, &why);
        Ok(Some(format!("no saved state for this VM: {why}")))
    }

    /// Starts QEMU and waits for the agent: booted cold, or resumed from the saved state in
    /// `resume`'s directory with its helper woken to treat the timers as said (the caller
    /// then waits for the helper with [`resume::after_restore`]).
    async fn start(cfg: &VmConfig, resume: Option<(&Path, Timers)>) -> Result<Vm, VmError> {
        let resume_from = resume.map(|(dir, _)| dir);
        let started = Instant::now();
        let dir = VmDir::create(&cfg.state_dir).map_err(|source| VmError::Dir {
            parent: cfg.state_dir.clone(),
            source,
        })?;
        let mut pinned_state = None;
        let root = match (&cfg.disk, resume_from) {
            // Resuming: the disk must be exactly as it was when the state was saved.
            (DiskSource::Overlay(_), Some(saved)) => {
                // Off the async threads: a state not verified before is hashed here.
                let (saved, vm_dir) = (saved.to_path_buf(), dir.path().to_path_buf());
                let pinned = tokio::task::spawn_blocking(move || state::pin(&saved, &vm_dir))
                    .await
                    .map_err(|_| state::StateError::Changed)??;
                tracing::debug!("saved state pinned");
                let path = dir.join("overlay.qcow2");
                overlay::create_overlay(&pinned.disk, &path).await?;
                tracing::debug!("overlay created");
                pinned_state = Some(pinned);
                RootDisk {
                    path,
                    format: "qcow2",
                }
            }
            (DiskSource::Overlay(base), None) => {
                let path = dir.join("overlay.qcow2");
                // The real path: a saved state's disk keeps it as its backing file, and a
                // path through a symlink that goes away would break every resume.
                let base = base.canonicalize().unwrap_or_else(|_| base.clone());
                overlay::create_overlay(&base, &path).await?;
                RootDisk {
                    path,
                    format: "qcow2",
                }
            }
            (DiskSource::Direct { path, format }, _) => RootDisk {
                path: path.clone(),
                format,
            },
        };
        let overlay = (root.format == "qcow2" && matches!(cfg.disk, DiskSource::Overlay(_)))
            .then(|| root.path.clone());
        let sockets = VmSockets {
            qmp: dir.join("qmp.sock"),
            agent: dir.join("agent.sock"),
            output: dir.join("output.sock"),
            control: dir.join("control.sock"),
        };
        let spec = VmSpec {
            name: format!("runner-{}", dir.id()),
            arch: cfg.arch,
            accel: cfg.accel,
            cpus: cfg.cpus,
            memory_mib: cfg.memory_mib,
            kernel: cfg.kernel.clone(),
            initrd: cfg.initrd.clone(),
            root,
            sockets: sockets.clone(),
            sandbox: cfg.sandbox,
            network: cfg.network.clone(),
        };
        let binary = cfg.qemu_binary.to_string_lossy().into_owned();
        let mut argv = spec::argv(&spec);
        if resume_from.is_some() {
            argv.extend(["-incoming".into(), "defer".into()]);
        }
        let view = vm_view(cfg, &dir, resume_from, pinned_state.as_ref());
        // QEMU may run as the VM user: its directory and overlay become that user's.
        let user = cfg.containment.user;
        sandbox::hand_over(dir.path(), user)?;
        if let Some(overlay) = &overlay {
            sandbox::hand_over(overlay, user)?;
        }
        let limits = sandbox::cgroup::limits(
            cfg.memory_mib,
            cfg.cpus,
            cfg.accel == Accel::Tcg,
            sandbox::cgroup::host_memory_bytes(),
        );
        let launch = cfg
            .containment
            .prepare(&dir.id(), &cfg.qemu_binary, argv, &view, limits)?;
        let mut process = QemuProcess::spawn(launch, dir.path())
            .map_err(|source| VmError::Spawn { binary, source })?;
        tracing::debug!("QEMU spawned");
        let job_limits = JobLimits::for_memory(cfg.memory_mib);

        let boot_timeout = match resume_from {
            Some(_) => cfg.boot_timeout.min(RESUME_TIMEOUT),
            None => cfg.boot_timeout,
        };
        let boot_deadline = crate::bounded::deadline_in(boot_timeout);
        let handshake = async {
            let qmp_stream = wait_for_socket(&sockets.qmp).await?;
            drop(qmp_stream); // probe only; QmpClient connects itself
            let mut qmp = QmpClient::connect(&sockets.qmp, QMP_TIMEOUT).await?;
            tracing::debug!("QMP connected");
            // Connected before a state loads (see `resume`): kept for the VM's life.
            let mut control = wait_for_socket(&sockets.control).await?;
            let mut woken = None;
            if let (Some(pinned), Some((_, timers))) = (&pinned_state, resume) {
                state::restore(&mut qmp, pinned).await?;
                tracing::debug!("state loaded, VM running");
                woken = Some(resume::wake(&mut control, timers).await?);
            }
            let output = wait_for_socket(&sockets.output).await?;
            let agent_stream = wait_for_socket(&sockets.agent).await?;
            let mut agent = AgentClient::new(agent_stream);
            agent.sync(boot_deadline).await?;
            tracing::debug!("guest agent answers");
            if resume_from.is_none() {
                // A resumed VM has its relay and cgroups already (it was saved with them).
                set_up_guest(&mut agent, &job_limits).await?;
            }
            Ok::<_, VmError>((qmp, output, agent, control, woken))
        };
        // A KVM that cannot run the guest stops it with an "internal error" and QEMU waits,
        // paused: say so at once instead of at the boot timeout.
        let stderr = process.stderr_reader();
        let kvm_failed = async {
            if cfg.accel != Accel::Kvm {
                return std::future::pending().await;
            }
            loop {
                tokio::time::sleep(KVM_ERROR_POLL).await;
                // The error's line comes before QEMU's register dump (~30 lines).
                if let Some(line) = kvm_internal_error(&stderr(100)) {
                    return line;
                }
            }
        };
        let result = tokio::select! {
            r = handshake => r,
            line = kvm_failed => return Err(VmError::KvmFailed { stderr: line }),
            status = process.wait() => {
                let status = status.map_err(|source| VmError::Spawn { binary: "qemu".into(), source })?;
                return Err(VmError::QemuExited {
                    status,
                    stderr: process.stderr_tail(20),
                    console: process.console_tail(30),
                });
            }
        };
        let (qmp, output_stream, agent, control, woken) = match result {
            Ok(parts) => parts,
            Err(VmError::Agent(AgentError::Timeout { .. })) => {
                return Err(VmError::BootTimeout {
                    timeout: boot_timeout,
                    console: process.console_tail(30),
                })
            }
            Err(e) => {
                // A broken pipe here usually means QEMU died: report that instead.
                if let Ok(Ok(status)) =
                    tokio::time::timeout(Duration::from_millis(500), process.wait()).await
                {
                    return Err(VmError::QemuExited {
                        status,
                        stderr: process.stderr_tail(20),
                        console: process.console_tail(30),
                    });
                }
                return Err(e);
            }
        };
        let (port_reader, port_writer) = output_stream.into_split();
        Ok(Vm {
            process,
            qmp,
            agent,
            output: spawn_output_reader(port_reader),
            port_writer,
            control,
            woken,
            boot_time: started.elapsed(),
            start_kind: if resume_from.is_some() {
                StartKind::Restored
            } else {
                StartKind::Cold
            },
            overlay,
            base: match &cfg.disk {
                DiskSource::Overlay(base) => Some(base.clone()),
                DiskSource::Direct { .. } => None,
            },
            notes: Vec::new(),
            left_running: None,
            reported_pids_refused: None,
            job_limits,
            // The job cgroup is new at setup, and saved before any job ran in it.
            job_counters: job_cgroup::JobCounters::default(),
            arch: cfg.arch,
            dir,
        })
    }

    /// Resumes the state in `dir` and nothing else: no cold boot when it does not work (a
    /// failed job's saved VM, see [`Vm::save_to`], is worth nothing booted fresh). `cfg`
    /// must describe the VM the state was saved from; its `saved_state` is not used.
    pub async fn resume(cfg: &VmConfig, dir: &Path) -> Result<Vm, VmError> {
        let started = Instant::now();
        let timers = if cfg.arch == Arch::Riscv64 {
            Timers::Rearmed
        } else {
            Timers::Trusted
        };
        let mut vm = Vm::start(cfg, Some((dir, timers))).await?;
        if let Err(e) = vm.after_restore().await {
            vm.kill().await;
            return Err(e.into());
        }
        vm.boot_time = started.elapsed();
        Ok(vm)
    }

    /// Waits for the helper woken by a resume (see [`resume`]) to prepare the guest.
    async fn after_restore(&mut self) -> Result<(), AgentError> {
        let Some(woken) = self.woken.take() else {
            return Ok(());
        };
        resume::after_restore(&mut self.agent, &mut self.output, woken, self.arch).await
    }

    /// Saves this VM as it is — RAM, devices and its disk overlay — into `dir` (which must
    /// not exist yet), then lets it run on: what `runner test --keep-failed` keeps of a
    /// failed step. The state is the same kind a saved boot is (see [`state`]), unchecked
    /// (a failed job's VM is saved once, at once, or never), and its disk is backed by the
    /// base image alone. Returns the state's size on disk.
    pub async fn save_to(&mut self, dir: &Path) -> Result<u64, VmError> {
        let (Some(overlay), Some(base)) = (self.overlay.clone(), self.base.clone()) else {
            return Err(state::StateError::NoOverlay.into());
        };
        // `runner debug` resumes it like any saved state: the helper that prepares a
        // resumed guest must be in it, waiting (it is used up by each resume).
        resume::start_helper(&mut self.agent, &mut self.output, self.arch).await?;
        let staged = state::save(&mut self.qmp, &overlay, &base, dir).await?;
        // A resumed VM's overlay is backed by its boot state's disk, which goes with this
        // VM's directory: the saved disk takes in what that layer holds.
        state::rebase_disk(staged.path(), &base, state::Rebase::Flatten).await?;
        staged.place(dir)?;
        Ok(state::size_on_disk(dir))
    }

    /// The VM's id (its directory name), for logs.
    pub fn id(&self) -> String {
        self.dir.id()
    }

    /// The VM's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// QEMU's process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// The last lines of the guest console.
    pub fn console_tail(&self, lines: usize) -> String {
        self.process.console_tail(lines)
    }

    /// Runs `cmd` in `cwd` with exactly `env`, passing live output to `on_output`, until it
    /// ends or `timeout` passes. A timed-out command is still running: stop the VM.
    pub async fn run(
        &mut self,
        cmd: &GuestCommand,
        cwd: &str,
        env: &[(String, String)],
        timeout: Duration,
        on_output: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<CommandEnd, VmError> {
        // Nobody holds the sender: this stop never fires.
        let (_, mut never) = watch::channel(false);
        self.run_in(
            Placement::Runner,
            cmd,
            cwd,
            env,
            timeout,
            &mut never,
            on_output,
        )
        .await
    }

    /// Runs a job's command like [`Vm::run`], but in the job cgroup (under the job's limits,
    /// see [`Vm::job_limits_hit`]), and also returns [`CommandEnd::Stopped`] as soon as `stop`
    /// turns true (e.g. a graceful job cancel). A stopped or timed-out command keeps running
    /// until [`Vm::stop_command`] kills it or the VM stops.
    pub async fn run_stoppable(
        &mut self,
        cmd: &GuestCommand,
        cwd: &str,
        env: &[(String, String)],
        timeout: Duration,
        stop: &mut watch::Receiver<bool>,
        on_output: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<CommandEnd, VmError> {
        self.run_in(Placement::Job, cmd, cwd, env, timeout, stop, on_output)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_in(
        &mut self,
        placement: Placement,
        cmd: &GuestCommand,
        cwd: &str,
        env: &[(String, String)],
        timeout: Duration,
        stop: &mut watch::Receiver<bool>,
        on_output: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<CommandEnd, VmError> {
        let deadline = crate::bounded::deadline_in(timeout);
        let markers = exec::EndMarkers::new();
        let mut scanner = match placement {
            Placement::Job => exec::MarkerScanner::for_job(&markers),
            Placement::Runner => exec::MarkerScanner::new(&markers),
        };
        self.reported_pids_refused = None;
        let request = match placement {
            Placement::Job => exec::job_exec_request(cmd, cwd, env, &markers),
            Placement::Runner => exec::exec_request(cmd, cwd, env, &markers),
        };
        // Output left over from an earlier command's background processes is not ours.
        while self.output.try_recv().is_ok() {}
        let pid = match self.agent.exec(&request, AGENT_TIMEOUT).await {
            Ok(pid) => pid,
            // A command that powers the guest off at once can take the agent's reply with it.
            Err(e) => return Err(self.agent_or_died(e).await),
        };
        tracing::debug!(pid, "guest command started");
        self.left_running = Some(pid);
        let mut exited: Option<CommandEnd> = None;
        let mut drain_deadline: Option<tokio::time::Instant> = None;
        // Once the marker is in, the wrapper is exiting: poll its status soon, backing off.
        let mut exit_poll = exec::EXIT_POLL_START;
        let mut next_limit_check = tokio::time::Instant::now() + LIMIT_POLL;
        // When the agent last answered; see AGENT_SILENCE_LIMIT.
        let mut answered = tokio::time::Instant::now();
        loop {
            let poll = if let Some(seen) = scanner.seen() {
                if let Some(end) = exited {
                    tracing::debug!("guest command ended");
                    self.left_running = None;
                    self.reported_pids_refused = scanner.pids_refused();
                    return Ok(match (seen, end) {
                        (exec::EndSeen::NotFound, CommandEnd::Exited(127)) => CommandEnd::NotFound,
                        _ => end,
                    });
                }
                exit_poll = (exit_poll * 2).min(exec::STATUS_POLL);
                exit_poll / 2
            } else {
                exec::STATUS_POLL
            };
            let wake = match (exited, drain_deadline) {
                (Some(_), Some(d)) => d,
                _ => (tokio::time::Instant::now() + poll).min(deadline),
            };
            tokio::select! {
                chunk = self.output.recv(), if !scanner.found() => match chunk {
                    Some(bytes) => {
                        let out = scanner.feed(&bytes);
                        if !out.is_empty() { on_output(&out); }
                        // The command printed its marker: its status is ready now.
                        if scanner.found() && exited.is_none() {
                            // Unanswered, the timer's poll asks again.
                            if let Some(end) = self.poll_patiently(pid, &mut answered).await? {
                                exited = end;
                            }
                        }
                    }
                    None => {
                        // Port closed: QEMU is gone.
                        return Err(self.died().await);
                    }
                },
                _ = stopped(stop), if exited.is_none() => {
                    let rest = scanner.flush();
                    if !rest.is_empty() { on_output(&rest); }
                    return Ok(CommandEnd::Stopped);
                }
                _ = tokio::time::sleep_until(wake) => {
                    if let Some(end) = exited {
                        // The command ended but its marker never came (e.g. the output port
                        // could not be opened): hand over what we have.
                        let rest = scanner.flush();
                        if !rest.is_empty() { on_output(&rest); }
                        self.left_running = None;
                        return Ok(end);
                    }
                    if tokio::time::Instant::now() >= deadline {
                        let rest = scanner.flush();
                        if !rest.is_empty() { on_output(&rest); }
                        return Ok(CommandEnd::TimedOut);
                    }
                    let Some(end) = self.poll_patiently(pid, &mut answered).await? else {
                        continue;
                    };
                    exited = end;
                    if matches!(placement, Placement::Job)
                        && exited.is_none()
                        && tokio::time::Instant::now() >= next_limit_check
                    {
                        next_limit_check = tokio::time::Instant::now() + LIMIT_POLL;
                        // Killed, the wrapper ends too; `job_limits_hit` then says why.
                        match self.kill_job_at_process_limit().await {
                            Ok(()) => {}
                            Err(AgentError::Timeout { .. })
                                if answered.elapsed() < AGENT_SILENCE_LIMIT =>
                            {
                                still_waiting(answered);
                            }
                            Err(e) => return Err(self.agent_or_died(e).await),
                        }
                    }
                    if exited.is_some() && !scanner.found() {
                        drain_deadline = Some(tokio::time::Instant::now() + exec::OUTPUT_DRAIN);
                    }
                }
                status = self.process.wait() => {
                    let _ = status;
                    return Err(self.died().await);
                }
            }
        }
    }

    /// Runs a shell script of the caller's own (not a user's step) in `/` with `env`, and
    /// returns how it ended with the last `keep` bytes of its output.
    pub async fn run_script(
        &mut self,
        script: &str,
        env: &[(String, String)],
        timeout: Duration,
        keep: usize,
    ) -> Result<(CommandEnd, String), VmError> {
        // The script's output goes to a file of its own, not the shared live-output port: a
        // daemon left by a user's step keeps writing there, and its lines must not end up in
        // (say) the runner's list of result files. Only the tail is kept, then read back.
        // A shell of its own keeps `-e` in force (it is off inside an `a && b || c` list).
        let quoted = crate::shell::quote(script);
        let wrapped = format!(
            "/bin/sh -e -c {quoted} >{SCRIPT_OUTPUT} 2>&1 && status=0 || status=$?\n\
             tail -c {keep} {SCRIPT_OUTPUT} >{SCRIPT_OUTPUT}.tail; rm -f {SCRIPT_OUTPUT}\n\
             exit $status\n"
        );
        let cmd = GuestCommand::Script(wrapped);
        let end = self
            .run(&cmd, "/", env, timeout, &mut |_: &[u8]| {})
            .await?;
        if end == CommandEnd::TimedOut {
            return Ok((end, String::new()));
        }
        let tail = self
            .read_file(&format!("{SCRIPT_OUTPUT}.tail"), keep.max(1))
            .await?;
        Ok((end, String::from_utf8_lossy(&tail).into_owned()))
    }

    /// What the job ran into (its process or memory limit) since the last call, read from the
    /// job cgroup's counters after a step. When it hit its process limit, all its processes
    /// are killed: a fork bomb left running would starve everything that comes after.
    ///
    /// The process limit is checked after every step (a step can exit 0 and leave a fork bomb
    /// behind); the memory limit only after a step that did not pass (`step_failed`): an OOM
    /// kill that did not fail the step is no reason to fail it, and each file read costs three
    /// agent round trips (10-30 ms under TCG) on every step.
    pub async fn job_limits_hit(&mut self, step_failed: bool) -> Result<Vec<LimitHit>, VmError> {
        // The count the step's wrapper reported as it ended (see `exec::PIDS_TRAILER`), else
        // the agent's file calls: they need no fork in the guest, so they work at the limit.
        let pids_refused = match self.reported_pids_refused.take() {
            Some(count) => count,
            None => match self.read_job_file(job_cgroup::PIDS_EVENTS).await? {
                Some(pids) => job_cgroup::pids_refused(&pids),
                None => return Ok(Vec::new()),
            },
        };
        let oom_kills = if step_failed {
            let Some(memory) = self.read_job_file(job_cgroup::MEMORY_EVENTS).await? else {
                return Ok(Vec::new());
            };
            job_cgroup::oom_kills(&memory)
        } else {
            self.job_counters.oom_kills
        };
        let now = job_cgroup::JobCounters {
            pids_refused,
            oom_kills,
        };
        let hits = now.hits_since(&self.job_counters, &self.job_limits);
        self.job_counters = now;
        if hits.iter().any(|h| matches!(h, LimitHit::Processes { .. })) {
            self.agent
                .write_file(job_cgroup::KILL, b"1", AGENT_TIMEOUT)
                .await?;
            // Its wrapper is gone with it.
            self.left_running = None;
        }
        Ok(hits)
    }

    /// Kills every process of the job when it has hit its process limit since the last
    /// [`Vm::job_limits_hit`] (a fork bomb cannot be allowed to run into the step's timeout).
    async fn kill_job_at_process_limit(&mut self) -> Result<(), AgentError> {
        let Some(events) = self.read_job_file(job_cgroup::PIDS_EVENTS).await? else {
            return Ok(());
        };
        if job_cgroup::pids_refused(&events) > self.job_counters.pids_refused {
            self.agent
                .write_file(job_cgroup::KILL, b"1", AGENT_TIMEOUT)
                .await?;
        }
        Ok(())
    }

    /// Reads one of the job cgroup's files; `None` when the agent says it cannot (the job,
    /// being root, removed its cgroup: its next command then refuses to run, and says why).
    async fn read_job_file(&mut self, path: &str) -> Result<Option<Vec<u8>>, AgentError> {
        match self
            .agent
            .read_file(path, job_cgroup::EVENTS_MAX_BYTES, AGENT_TIMEOUT)
            .await
        {
            Ok(data) => Ok(Some(data)),
            Err(AgentError::Command { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Kills the command a timed-out or stopped [`Vm::run_stoppable`] left running (its whole
    /// process tree in the guest), so that the VM can run further commands (e.g. cleanup
    /// steps). Does nothing when no command was left running.
    pub async fn stop_command(&mut self) -> Result<(), VmError> {
        let Some(pid) = self.left_running.take() else {
            return Ok(());
        };
        let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())];
        let script = format!("set -- {pid}\n{}", exec::KILL_TREE);
        match self
            .run_script(&script, &env, KILL_TREE_TIMEOUT, 4096)
            .await?
        {
            (CommandEnd::Exited(0), _) => {
                // The wrapper's exit status is waiting in the agent; collect it so that the
                // agent forgets the process (a status is reaped by the reply that reports it).
                let _ = self.poll_status(pid).await;
                Ok(())
            }
            (end, out) => Err(VmError::Agent(AgentError::Command {
                command: format!("stop guest command {pid}"),
                desc: format!("{end:?}: {}", out.trim()),
            })),
        }
    }

    /// [`Vm::poll_status`] while a command runs: when the agent's connection breaks because
    /// QEMU is exiting (the guest powered off or panicked), that is what gets reported — not
    /// an agent failure, which would make the guest's doing look like an infrastructure error.
    async fn poll_status_or_died(&mut self, pid: i64) -> Result<Option<CommandEnd>, VmError> {
        match self.poll_status(pid).await {
            Err(VmError::Agent(e)) => Err(self.agent_or_died(e).await),
            other => other,
        }
    }

    /// An agent failure, or `Died` when QEMU turns out to be exiting.
    async fn agent_or_died(&mut self, e: AgentError) -> VmError {
        let exiting = tokio::time::timeout(DIED_GRACE, self.process.wait()).await;
        if matches!(exiting, Ok(Ok(_))) {
            return self.died().await;
        }
        VmError::Agent(e)
    }

    /// [`Vm::poll_status_or_died`], where an unanswered poll is `None` (ask again later) until
    /// the agent has been silent for [`AGENT_SILENCE_LIMIT`] since `answered`.
    async fn poll_patiently(
        &mut self,
        pid: i64,
        answered: &mut tokio::time::Instant,
    ) -> Result<Option<Option<CommandEnd>>, VmError> {
        match self.poll_status_or_died(pid).await {
            Ok(end) => {
                *answered = tokio::time::Instant::now();
                Ok(Some(end))
            }
            Err(VmError::Agent(AgentError::Timeout { .. }))
                if answered.elapsed() < AGENT_SILENCE_LIMIT =>
            {
                still_waiting(*answered);
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn poll_status(&mut self, pid: i64) -> Result<Option<CommandEnd>, VmError> {
        Ok(
            match self.agent.exec_status(pid, EXEC_STATUS_TIMEOUT).await? {
                ExecStatus::Running => None,
                ExecStatus::Exited(code) => Some(CommandEnd::Exited(code)),
                ExecStatus::Signaled(sig) => Some(CommandEnd::Signaled(sig)),
            },
        )
    }

    async fn died(&mut self) -> VmError {
        let (status, clean_exit) =
            match tokio::time::timeout(Duration::from_secs(2), self.process.wait()).await {
                Ok(Ok(s)) => (s.to_string(), s.success()),
                _ => ("still running, output port closed".into(), false),
            };
        VmError::Died {
            status,
            clean_exit,
            stderr: self.process.stderr_tail(10),
        }
    }

    /// Writes `data` to `path` in the guest.
    pub async fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), VmError> {
        let timeout = AGENT_TIMEOUT + Duration::from_secs(data.len() as u64 / (1 << 20));
        Ok(self.agent.write_file(path, data, timeout).await?)
    }

    /// Reads `path` from the guest, refusing files larger than `max_bytes`.
    pub async fn read_file(&mut self, path: &str, max_bytes: usize) -> Result<Vec<u8>, VmError> {
        Ok(self.agent.read_file(path, max_bytes, AGENT_TIMEOUT).await?)
    }

    /// Stops the VM: QMP `quit`, then SIGTERM, then SIGKILL; the directory goes with `self`.
    /// Cannot fail: every step that does not work gives way to the next, harder one.
    pub async fn shutdown(mut self) {
        // An unanswered `quit` is no failure: the grace period and the signals follow.
        tracing::debug!("stopping the VM");
        let _ = self.qmp.quit(QMP_TIMEOUT).await;
        if tokio::time::timeout(QUIT_GRACE, self.process.wait())
            .await
            .is_err()
        {
            let _ = self.process.terminate(SIGTERM_GRACE).await;
        }
        tracing::debug!("QEMU exited");
    }

    /// Stops the VM at once (timeouts, cancellation): SIGTERM, then SIGKILL.
    pub async fn kill(mut self) {
        let _ = self.process.terminate(SIGTERM_GRACE).await;
    }
}

/// QEMU's "KVM internal error" line in its stderr `tail`, with the error's kind when QEMU
/// printed one ("emulation failure"), if it is there.
fn kvm_internal_error(tail: &str) -> Option<String> {
    let line = tail.lines().find(|l| l.contains("KVM internal error"))?;
    let kind = tail.lines().find(|l| l.trim() == "emulation failure");
    Some(match kind {
        Some(kind) => format!("{}: {}", line.trim(), kind.trim()),
        None => line.trim().to_string(),
    })
}

/// Says that the agent has gone unanswered since `answered` and is still waited for.
fn still_waiting(answered: tokio::time::Instant) {
    tracing::warn!(
        "the guest agent has not answered for {:.0?}; waiting up to {:?} (a busy guest)",
        answered.elapsed(),
        AGENT_SILENCE_LIMIT
    );
}

/// `e` in one line, for the note about a resume that failed: that is routine (the job boots
/// cold), so the console tail and QEMU's whole stderr that a failed boot shows are noise.
fn one_line(e: &VmError) -> String {
    match e {
        VmError::QemuExited { status, stderr, .. } => {
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            let last = &lines[lines.len().saturating_sub(3)..];
            format!("QEMU exited ({status}): {}", last.join("; "))
        }
        other => other
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string(),
    }
}

/// Where a guest command runs: the job's commands under the job's limits, the runner's own
/// outside them (so that they still run when the job has used its share up).
#[derive(Debug, Clone, Copy)]
enum Placement {
    Job,
    Runner,
}

/// Resolves when `stop` turns true; never when its sender is gone.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Sets up a freshly booted guest in one agent call: the job cgroup (see [`job_cgroup`]) and the
/// output FIFO; then starts the guest side of live output (see `exec::relay_request`).
async fn set_up_guest(
    agent: &mut AgentClient<UnixStream>,
    limits: &JobLimits,
) -> Result<(), VmError> {
    let mkfifo = crate::agent::ExecRequest {
        path: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            format!("{}\n{}", limits.setup_script(), exec::MAKE_FIFO),
        ],
        env: vec![("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
    };
    let pid = agent.exec(&mkfifo, AGENT_TIMEOUT).await?;
    let deadline = tokio::time::Instant::now() + AGENT_TIMEOUT;
    match agent.wait_exit(pid, deadline, exec::STATUS_POLL).await? {
        ExecStatus::Exited(0) => {}
        other => {
            return Err(VmError::Agent(AgentError::Command {
                command: "set up the job cgroup and the output FIFO".into(),
                desc: format!("{other:?}"),
            }))
        }
    }
    // The relay runs for the VM's whole life; its status is never collected.
    agent.exec(&exec::relay_request(), AGENT_TIMEOUT).await?;
    Ok(())
}

/// What QEMU must see of the host: its own directory writable; kernel, initramfs, base image
/// and saved state read-only (a pinned state sits in the writable directory, and is bound
/// read-only over itself there: a compromised QEMU must not alter what later jobs resume).
fn vm_view(
    cfg: &VmConfig,
    dir: &VmDir,
    resume_from: Option<&Path>,
    pinned: Option<&state::PinnedState>,
) -> VmView {
    let mut view = VmView {
        writable: vec![dir.path().to_path_buf()],
        read_only: vec![cfg.kernel.clone(), cfg.initrd.clone()],
        kvm: cfg.accel == Accel::Kvm,
        host_network: cfg.network == VmNetwork::Full,
    };
    if let VmNetwork::Proxy(relay) = &cfg.network {
        // QEMU starts the relay per guest connection; the relay connects to the socket.
        if let Some(program) = relay.relay.first() {
            view.read_only.push(PathBuf::from(program));
        }
        if let Some(dir) = relay.socket.parent() {
            view.writable.push(dir.to_path_buf());
        }
    }
    match &cfg.disk {
        DiskSource::Overlay(base) => {
            view.read_only.push(base.clone());
            // The overlay names its backing file by its real path (a cache whose images/ is
            // a link to another's must not break when the link goes): QEMU opens that one.
            if let Ok(real) = base.canonicalize() {
                if real != *base {
                    view.read_only.push(real);
                }
            }
        }
        DiskSource::Direct { path, .. } => view.writable.push(path.clone()),
    }
    if let (Some(saved), Some(pinned)) = (resume_from, pinned) {
        view.read_only
            .extend([pinned.ram.clone(), pinned.disk.clone()]);
        // The saved disk names the base image by the path it had when the state was saved
        // (another cache directory may share the states).
        if let Some(base) = state::saved_base(saved) {
            if base.is_file() && !view.read_only.contains(&base) {
                view.read_only.push(base);
            }
        }
    }
    view
}

/// Connects to a UNIX socket QEMU is about to create.
async fn wait_for_socket(path: &Path) -> Result<UnixStream, VmError> {
    let deadline = tokio::time::Instant::now() + SOCKET_TIMEOUT;
    let mut backoff = Duration::from_millis(2);
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(_) if tokio::time::Instant::now() < deadline => {
                // QEMU creates its sockets within milliseconds of starting; poll briefly.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_millis(50));
            }
            Err(_) => return Err(VmError::Socket { path: path.into() }),
        }
    }
}

/// Reads the live-output socket into a bounded queue.
fn spawn_output_reader(mut stream: tokio::net::unix::OwnedReadHalf) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(OUTPUT_QUEUE);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn a_kvm_internal_error_is_found_in_qemu_s_stderr() {
        // What QEMU 10 printed on a nested host without VMX, booting a Debian kernel.
        let tail = "KVM internal error. Suberror: 1\n\
                    extra data[0]: 0x0000000000000001\n\
                    extra data[1]: 0x008b820ff2c70f0f\n\
                    emulation failure\n\
                    EAX=0000000a EBX=02135000 ECX=cddf975b EDX=20100800\n";
        assert_eq!(
            kvm_internal_error(tail).as_deref(),
            Some("KVM internal error. Suberror: 1: emulation failure")
        );
        assert_eq!(
            kvm_internal_error("KVM internal error. Suberror: 3\n").as_deref(),
            Some("KVM internal error. Suberror: 3")
        );
        assert_eq!(kvm_internal_error("qemu-system-x86_64: warning: x\n"), None);
        assert_eq!(kvm_internal_error(""), None);
    }

    #[test]
    fn a_failed_resume_is_told_in_one_line() {
        let e = VmError::QemuExited {
            status: ExitStatus::from_raw(1 << 8),
            stderr: "qemu: Error reading dirty bitmap\n\nqemu: load of migration failed\n".into(),
            console: "[    0.0] Linux version ...\n[    1.0] more".into(),
        };
        assert_eq!(
            one_line(&e),
            "QEMU exited (exit status: 1): qemu: Error reading dirty bitmap; qemu: load of migration failed"
        );
        let e = VmError::BootTimeout {
            timeout: Duration::from_secs(3),
            console: "line 1\nline 2".into(),
        };
        assert_eq!(
            one_line(&e),
            "the guest did not boot: its agent did not answer within 3s"
        );
    }
}
