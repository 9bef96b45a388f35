//! One job in user mode: its directories (`/workspace`, `/tmp`, `/root`) on the host, and
//! each command run in a fresh bubblewrap sandbox whose root is the image's unpacked root
//! filesystem (read-only). Commands are the same [`GuestCommand`]s a VM runs, with the same
//! endings ([`CommandEnd`]); output comes back live through one pipe (stdout and stderr
//! together, as a VM's live-output port gives them).
//!
//! Everything the job wrote is read back *through the sandbox* (a `cat` inside it), never by
//! the runner following paths on the host: a job can plant symlinks in its workspace, and
//! inside the sandbox they can only point at the image's files and the job's own.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};

use super::binfmt::Emulation;
use super::UserError;
use crate::arch::Arch;
use crate::bounded::TailBuffer;
use crate::sandbox::{cgroup, Containment, VmUser};
use crate::vm::{CommandEnd, GuestCommand};

/// After a command's process ended, how long its output may take to drain (every process
/// of the sandbox is gone by then: its PID namespace ended with it).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the runner's own short commands (files in and out) may take.
const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(120);
/// The job's directories on the host and where the sandbox shows them.
const JOB_DIRS: [(&str, &str); 3] = [
    ("workspace", "/workspace"),
    ("tmp", "/tmp"),
    ("home", "/root"),
];
/// The image's setpriv (util-linux, Essential in Debian), run inside the sandbox to become
/// the VM user: the host's setpriv is not in view there.
const SETPRIV: &str = "/usr/bin/setpriv";

/// What a user-mode job needs from the host.
#[derive(Debug, Clone)]
pub struct UserConfig {
    pub arch: Arch,
    /// The image's unpacked root (see [`super::sysroot`]).
    pub sysroot: PathBuf,
    /// Where the job's directory goes (the VM directories' parent).
    pub jobs_dir: PathBuf,
    pub containment: Containment,
    /// Caps for the job's cgroup.
    pub memory_mib: u32,
    pub cpus: u32,
    pub emulation: Emulation,
}

/// A user-mode job: its directory, and the command left running by a timeout or stop.
#[derive(Debug)]
pub struct UserMachine {
    cfg: UserConfig,
    bwrap: PathBuf,
    dir: tempfile::TempDir,
    cgroup: Option<cgroup::VmCgroup>,
    running: Option<Child>,
}

impl UserMachine {
    /// Prepares the job's directories (handed to the VM user) and cgroup.
    pub fn start(cfg: UserConfig) -> Result<UserMachine, UserError> {
        let bwrap = cfg.containment.bwrap.clone().ok_or(UserError::NoSandbox)?;
        std::fs::create_dir_all(&cfg.jobs_dir).map_err(|e| UserError::io(&cfg.jobs_dir, e))?;
        let dir = tempfile::Builder::new()
            .prefix("user-")
            .tempdir_in(&cfg.jobs_dir)
            .map_err(|e| UserError::io(&cfg.jobs_dir, e))?;
        for (name, _) in JOB_DIRS {
            let p = dir.path().join(name);
            std::fs::create_dir(&p).map_err(|e| UserError::io(&p, e))?;
            crate::sandbox::hand_over(&p, cfg.containment.user)?;
        }
        let id = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let cgroup = match &cfg.containment.cgroups {
            Some(h) => Some(
                h.create(&id, &cgroup::limits(cfg.memory_mib, cfg.cpus, false, None))
                    .map_err(|source| crate::sandbox::SandboxError::Cgroup {
                        vm: id.clone(),
                        source,
                    })?,
            ),
            None => None,
        };
        Ok(UserMachine {
            cfg,
            bwrap,
            dir,
            cgroup,
            running: None,
        })
    }

    /// The job's directory on the host (its `workspace`, `tmp` and `home`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// How the host runs this job's programs.
    pub fn emulation(&self) -> &Emulation {
        &self.cfg.emulation
    }

    /// Runs `cmd` in `cwd` with exactly `env`, passing its output to `on_output` as it
    /// comes. A timeout or `stop` leaves it running (end it with [`Self::stop_command`]).
    pub async fn run(
        &mut self,
        cmd: &GuestCommand,
        cwd: &str,
        env: &[(String, String)],
        timeout: Duration,
        stop: &mut watch::Receiver<bool>,
        on_output: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<CommandEnd, UserError> {
        let argv = match cmd {
            GuestCommand::Argv(argv) => argv.clone(),
            GuestCommand::Script(s) => vec!["/bin/sh".into(), "-e".into(), "-c".into(), s.clone()],
        };
        self.run_argv(&argv, cwd, env, Input::None, timeout, Some(stop), on_output)
            .await
    }

    /// Kills the command a timeout or stop left running, with everything it started.
    pub async fn stop_command(&mut self) {
        if let Some(mut child) = self.running.take() {
            kill_group(&child);
            let _ = child.wait().await;
        }
    }

    /// A short command of the runner's own; its end and the last `keep` bytes of output.
    pub async fn run_script(
        &mut self,
        script: &str,
        env: &[(String, String)],
        timeout: Duration,
        keep: usize,
    ) -> Result<(CommandEnd, String), UserError> {
        let mut tail = TailBuffer::new(keep);
        let argv = ["/bin/sh".to_string(), "-c".into(), script.into()];
        let end = self
            .run_argv(&argv, "/", env, Input::None, timeout, None, &mut |b| {
                tail.push(b)
            })
            .await?;
        if matches!(end, CommandEnd::TimedOut) {
            self.stop_command().await;
        }
        Ok((end, tail.text()))
    }

    /// Writes `data` to `path` as the job sees it (only its own directories are writable).
    pub async fn write_file(&mut self, path: &str, data: &[u8]) -> Result<(), UserError> {
        self.write_input(path, Input::Bytes(data.to_vec())).await
    }

    /// Writes what arrives on `chunks` to `path` as the job sees it, chunk by chunk as they
    /// come, until the sender closes the channel (the job's workspace archive: never held
    /// whole). The command's end drops `chunks`, so a producer blocked on a full channel
    /// stops at its next send.
    pub async fn write_stream(
        &mut self,
        path: &str,
        chunks: mpsc::Receiver<Vec<u8>>,
    ) -> Result<(), UserError> {
        self.write_input(path, Input::Stream(chunks)).await
    }

    /// `cat > path` as the job, fed `input`; a command that timed out is stopped.
    async fn write_input(&mut self, path: &str, input: Input) -> Result<(), UserError> {
        let argv = [
            "/bin/sh".to_string(),
            "-c".into(),
            "umask 077; exec cat > \"$1\"".into(),
            "sh".into(),
            path.into(),
        ];
        let mut out = TailBuffer::new(4096);
        let end = self
            .run_argv(
                &argv,
                "/",
                &housekeeping_env(),
                input,
                HOUSEKEEPING_TIMEOUT,
                None,
                &mut |b| out.push(b),
            )
            .await?;
        match end {
            CommandEnd::Exited(0) => Ok(()),
            other => {
                if matches!(other, CommandEnd::TimedOut) {
                    self.stop_command().await;
                }
                Err(UserError::Command {
                    command: format!("write {path}"),
                    desc: format!("{other:?}: {}", out.text().trim()),
                })
            }
        }
    }

    /// Reads `path` as the job sees it, refusing more than `max_bytes`.
    pub async fn read_file(&mut self, path: &str, max_bytes: usize) -> Result<Vec<u8>, UserError> {
        let argv = [
            "/bin/sh".to_string(),
            "-c".into(),
            "exec cat -- \"$1\" 2>/dev/null".into(),
            "sh".into(),
            path.into(),
        ];
        let mut data = Vec::new();
        let mut too_big = false;
        let end = self
            .run_argv(
                &argv,
                "/",
                &housekeeping_env(),
                Input::None,
                HOUSEKEEPING_TIMEOUT,
                None,
                &mut |b| {
                    if data.len() + b.len() > max_bytes {
                        too_big = true;
                    } else {
                        data.extend_from_slice(b);
                    }
                },
            )
            .await?;
        if too_big {
            return Err(UserError::Command {
                command: format!("read {path}"),
                desc: format!("larger than {max_bytes} bytes"),
            });
        }
        match end {
            CommandEnd::Exited(0) => Ok(data),
            other => {
                if matches!(other, CommandEnd::TimedOut) {
                    self.stop_command().await;
                }
                Err(UserError::Command {
                    command: format!("read {path}"),
                    desc: format!("cannot read it ({other:?})"),
                })
            }
        }
    }

    /// The bwrap command line for `argv` (a pure function of the configuration).
    pub fn command(&self, argv: &[String], cwd: &str, env: &[(String, String)]) -> Vec<OsString> {
        let view = View {
            bwrap: &self.bwrap,
            sysroot: &self.cfg.sysroot,
            job: self.dir.path(),
            user: self.cfg.containment.user,
            privileged: self.cfg.containment.privileged(),
        };
        command_line(&view, argv, cwd, env)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_argv(
        &mut self,
        argv: &[String],
        cwd: &str,
        env: &[(String, String)],
        input: Input,
        timeout: Duration,
        mut stop: Option<&mut watch::Receiver<bool>>,
        on_output: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<CommandEnd, UserError> {
        // A command left running by an earlier timeout is gone before the next one starts.
        self.stop_command().await;
        let deadline = crate::bounded::deadline_in(timeout);
        let piped = !matches!(input, Input::None);
        let (mut child, mut output) = self.spawn(argv, cwd, env, piped)?;
        let streaming = matches!(input, Input::Stream(_));
        let mut feed = match (input, child.stdin.take()) {
            (Input::Bytes(data), Some(mut stdin)) => {
                // A job that does not read its input must not block the runner: written aside.
                tokio::spawn(async move {
                    let _ = stdin.write_all(&data).await;
                });
                None
            }
            (Input::Stream(chunks), Some(stdin)) => Some(Box::pin(feed(chunks, stdin))),
            _ => None,
        };
        // Whether the whole stream went in (polled beside the output, the exit and the
        // deadline: a command that stops reading cannot block the runner either).
        let mut fed: Option<std::io::Result<()>> = None;
        let mut buf = vec![0u8; 64 * 1024];
        let mut eof = false;
        let status = loop {
            tokio::select! {
                r = async { feed.as_mut().expect("guarded").await }, if feed.is_some() && fed.is_none() => {
                    fed = Some(r);
                }
                n = output.read(&mut buf), if !eof => match n {
                    Ok(0) | Err(_) => eof = true,
                    Ok(n) => on_output(&buf[..n]),
                },
                status = child.wait() => break status.map_err(|e| UserError::io(&self.bwrap, e))?,
                _ = tokio::time::sleep_until(deadline) => {
                    self.running = Some(child);
                    return Ok(CommandEnd::TimedOut);
                }
                _ = wait_for_stop(&mut stop) => {
                    self.running = Some(child);
                    return Ok(CommandEnd::Stopped);
                }
            }
        };
        // The sandbox's processes all died with it: what they wrote is in the pipe.
        let drain = crate::bounded::deadline_in(DRAIN_TIMEOUT);
        while !eof {
            match tokio::time::timeout_at(drain, output.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => on_output(&buf[..n]),
                _ => eof = true,
            }
        }
        kill_group(&child);
        // A stream not taken whole (its reader ended first) is never a success.
        drop(feed);
        if streaming && !matches!(fed, Some(Ok(()))) && status.success() {
            return Err(UserError::Command {
                command: argv.join(" "),
                desc: match fed {
                    Some(Err(e)) => format!("its input could not be written: {e}"),
                    _ => "it ended before reading all its input".into(),
                },
            });
        }
        use std::os::unix::process::ExitStatusExt;
        Ok(match (status.code(), status.signal()) {
            (Some(code), _) => CommandEnd::Exited(code),
            (None, Some(sig)) => CommandEnd::Signaled(sig),
            (None, None) => CommandEnd::Exited(-1),
        })
    }

    /// Starts bwrap in a session of its own, in the job's cgroup, its stdout and stderr one
    /// pipe (returned), its stdin a pipe or nothing.
    fn spawn(
        &self,
        argv: &[String],
        cwd: &str,
        env: &[(String, String)],
        stdin: bool,
    ) -> Result<(Child, tokio::net::unix::pipe::Receiver), UserError> {
        let (read, write): (OwnedFd, OwnedFd) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| UserError::io(&self.bwrap, e.into()))?;
        let full = self.command(argv, cwd, env);
        let child = {
            let mut cmd = Command::new(&full[0]);
            cmd.args(&full[1..])
                .env_clear()
                .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
                .stdout(Stdio::from(
                    write
                        .try_clone()
                        .map_err(|e| UserError::io(&self.bwrap, e))?,
                ))
                .stderr(Stdio::from(write))
                .kill_on_drop(true);
            let join = self.cgroup.as_ref().map(|c| c.join_handle());
            // SAFETY: the closure runs in the forked child before exec and only makes
            // async-signal-safe system calls (setsid, prctl, setrlimit, open/write/close on
            // strings prepared before the fork).
            #[allow(unsafe_code)]
            unsafe {
                cmd.pre_exec(move || {
                    nix::unistd::setsid()?;
                    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)?;
                    crate::sandbox::apply_rlimits()?;
                    if let Some(join) = &join {
                        join.join()?;
                    }
                    Ok(())
                });
            }
            cmd.spawn().map_err(|e| UserError::io(&self.bwrap, e))?
            // `cmd` (and the parent's copies of the pipe's write end) dropped here: the
            // reader sees the end of the output when the sandbox's processes are gone.
        };
        let reader = tokio::net::unix::pipe::Receiver::from_owned_fd(read)
            .map_err(|e| UserError::io(&self.bwrap, e))?;
        Ok((child, reader))
    }
}

impl Drop for UserMachine {
    fn drop(&mut self) {
        if let Some(child) = &self.running {
            kill_group(child);
        }
    }
}

/// What a command gets on its standard input.
enum Input {
    None,
    /// Written aside in one go.
    Bytes(Vec<u8>),
    /// Written chunk by chunk as they arrive, until the sender closes the channel.
    Stream(mpsc::Receiver<Vec<u8>>),
}

/// Copies `chunks` into a command's standard input, then closes it (the reader's EOF).
async fn feed(
    mut chunks: mpsc::Receiver<Vec<u8>>,
    mut stdin: tokio::process::ChildStdin,
) -> std::io::Result<()> {
    while let Some(chunk) = chunks.recv().await {
        stdin.write_all(&chunk).await?;
    }
    drop(stdin);
    Ok(())
}

/// SIGKILL to the process group bwrap leads (its PID 1 in the sandbox dies with it, and the
/// PID namespace with that).
fn kill_group(child: &Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

async fn wait_for_stop(stop: &mut Option<&mut watch::Receiver<bool>>) {
    match stop {
        Some(rx) => {
            if rx.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

fn housekeeping_env() -> Vec<(String, String)> {
    vec![
        ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        ("LANG".into(), "C.UTF-8".into()),
    ]
}

fn os(s: &str) -> OsString {
    s.into()
}

/// What a job's sandbox is made of.
struct View<'a> {
    bwrap: &'a Path,
    sysroot: &'a Path,
    /// The job's directory (its `workspace`, `tmp`, `home`).
    job: &'a Path,
    /// The unprivileged user to become (the runner is root).
    user: Option<VmUser>,
    privileged: bool,
}

/// `bwrap [namespaces] [the image as /] [the job's dirs] -- [setpriv …] ARGV`.
fn command_line(v: &View, argv: &[String], cwd: &str, env: &[(String, String)]) -> Vec<OsString> {
    let (sysroot, job, user, privileged) = (v.sysroot, v.job, v.user, v.privileged);
    let mut a = vec![v.bwrap.into()];
    for flag in [
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
        "--die-with-parent",
        "--new-session",
    ] {
        a.push(os(flag));
    }
    if privileged {
        // Root: only what setpriv needs to become the VM user (which then clears them).
        a.extend([os("--cap-drop"), os("ALL")]);
        if user.is_some() {
            a.extend(["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"].map(os));
        }
    } else {
        // Not root: a user namespace in which the job is root, as in a VM, and which it
        // cannot nest further.
        a.extend(
            [
                "--unshare-user",
                "--disable-userns",
                "--uid",
                "0",
                "--gid",
                "0",
            ]
            .map(os),
        );
    }
    a.extend([os("--ro-bind"), sysroot.into(), os("/")]);
    a.extend(
        [
            "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/run", "--tmpfs", "/var/tmp",
        ]
        .map(os),
    );
    for (name, at) in JOB_DIRS {
        a.extend([os("--bind"), job.join(name).into(), os(at)]);
    }
    a.extend([
        os("--hostname"),
        os("runner"),
        os("--chdir"),
        os(cwd),
        os("--clearenv"),
    ]);
    for (k, v) in env {
        a.extend([os("--setenv"), os(k), os(v)]);
    }
    a.push(os("--"));
    if let (true, Some(u)) = (privileged, user) {
        a.extend([
            os(SETPRIV),
            format!("--reuid={}", u.uid).into(),
            format!("--regid={}", u.gid).into(),
            os("--clear-groups"),
            os("--inh-caps=-all"),
            os("--no-new-privs"),
            os("--"),
        ]);
    }
    a.extend(argv.iter().map(OsString::from));
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(privileged: bool, user: Option<VmUser>) -> Vec<String> {
        let view = View {
            bwrap: Path::new("/usr/bin/bwrap"),
            sysroot: Path::new("/cache/sysroots/img/root"),
            job: Path::new("/cache/vms/user-x"),
            user,
            privileged,
        };
        command_line(
            &view,
            &[
                "/bin/sh".into(),
                "-e".into(),
                "-c".into(),
                "make check".into(),
            ],
            "/workspace",
            &[("CI".into(), "true".into())],
        )
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect()
    }

    fn pos(l: &[String], w: &str) -> usize {
        l.iter()
            .position(|x| x == w)
            .unwrap_or_else(|| panic!("{w} not in {l:?}"))
    }

    #[test]
    fn as_root_the_job_becomes_the_vm_user_inside_a_namespace_without_network() {
        let l = line(true, Some(VmUser { uid: 999, gid: 995 }));
        for flag in [
            "--unshare-pid",
            "--unshare-net",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
        ] {
            pos(&l, flag);
        }
        // The image is the root, read-only; the job's directories are its only writable ones.
        let root = pos(&l, "/cache/sysroots/img/root");
        assert_eq!(
            (l[root - 1].as_str(), l[root + 1].as_str()),
            ("--ro-bind", "/")
        );
        for (dir, at) in [
            ("workspace", "/workspace"),
            ("tmp", "/tmp"),
            ("home", "/root"),
        ] {
            let i = pos(&l, &format!("/cache/vms/user-x/{dir}"));
            assert_eq!((l[i - 1].as_str(), l[i + 1].as_str()), ("--bind", at));
        }
        assert!(!l.iter().any(|w| w == "--unshare-user"));
        let setpriv = pos(&l, SETPRIV);
        assert!(setpriv > pos(&l, "--"));
        assert_eq!(l[setpriv + 1], "--reuid=999");
        assert!(l.contains(&"--no-new-privs".to_string()));
        assert_eq!(l[l.len() - 4..], ["/bin/sh", "-e", "-c", "make check"]);
        let env = pos(&l, "CI");
        assert_eq!(
            (l[env - 1].as_str(), l[env + 1].as_str()),
            ("--setenv", "true")
        );
    }

    #[test]
    fn without_root_a_user_namespace_makes_the_job_root_and_no_setpriv_runs() {
        let l = line(false, None);
        pos(&l, "--unshare-user");
        pos(&l, "--disable-userns");
        assert!(!l.iter().any(|w| w == SETPRIV || w == "--cap-add"));
    }
}
