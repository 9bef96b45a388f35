//! One QEMU child process: spawned in its own process group, its console and stderr kept in
//! bounded tail buffers, and always stopped and reaped (polite → SIGTERM → SIGKILL). Its
//! containment (bwrap, cgroup, rlimits) is prepared by `sandbox`; applied here at spawn.

use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::{Child, Command};

use crate::bounded::TailBuffer;
use crate::sandbox::{self, cgroup::VmCgroup, Launch};

/// How much of the guest console we keep (the tail is what explains a failed boot).
const CONSOLE_TAIL_BYTES: usize = 64 * 1024;
/// How much of QEMU's stderr we keep.
const STDERR_TAIL_BYTES: usize = 16 * 1024;
/// After SIGTERM, how long QEMU gets before SIGKILL.
pub const SIGTERM_GRACE: Duration = Duration::from_secs(2);
/// How long dropping a still-running process waits for it to exit after SIGKILL (only a
/// process stuck in the kernel takes more than a moment).
const KILLED_EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// A running (or exited, not yet dropped) QEMU process.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    pgid: Pid,
    exit: Option<ExitStatus>,
    console: Arc<Mutex<TailBuffer>>,
    stderr: Arc<Mutex<TailBuffer>>,
    /// Held for its `Drop`, last: removed after the processes in it are gone.
    _cgroup: Option<VmCgroup>,
}

impl QemuProcess {
    /// Starts QEMU as `launch` says (directly, or inside bwrap) in a session and process
    /// group of its own, joined to its cgroup before it runs.
    pub fn spawn(launch: Launch, cwd: &Path) -> std::io::Result<Self> {
        let mut cmd = Command::new(&launch.program);
        cmd.args(&launch.args)
            .current_dir(cwd)
            // The runner's environment may hold secrets; QEMU needs none of it.
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let cgroup = launch.cgroup;
        let join_cgroup = cgroup.as_ref().map(|c| c.join_handle());
        // SAFETY: the closure runs in the forked child before exec and only makes
        // async-signal-safe system calls (setsid, prctl, setrlimit, open/write/close on
        // strings prepared before the fork).
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(move || {
                // A session of its own: its own process group (killed as one), and no
                // controlling terminal to inject keystrokes into.
                nix::unistd::setsid()?;
                // If runner itself dies without cleaning up (SIGKILL, OOM), its VMs must
                // not live on.
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                sandbox::apply_rlimits()?;
                if let Some(join) = &join_cgroup {
                    join.join()?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().expect("a just-spawned child has a pid");
        let console = Arc::new(Mutex::new(TailBuffer::new(CONSOLE_TAIL_BYTES)));
        let stderr = Arc::new(Mutex::new(TailBuffer::new(STDERR_TAIL_BYTES)));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(drain_into(out, console.clone()));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(drain_into(err, stderr.clone()));
        }
        Ok(QemuProcess {
            child,
            _cgroup: cgroup,
            pgid: Pid::from_raw(pid as i32),
            exit: None,
            console,
            stderr,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pgid.as_raw() as u32
    }

    /// Waits until QEMU exits. Cancel-safe.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        let status = self.child.wait().await?;
        self.exit = Some(status);
        Ok(status)
    }

    /// Whether QEMU has already exited (without blocking).
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
            }
        }
        self.exit
    }

    /// SIGTERM to the whole group, then SIGKILL after `grace`; returns once reaped.
    pub async fn terminate(&mut self, grace: Duration) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.try_exit() {
            return Ok(status);
        }
        signal_group(self.pgid, Signal::SIGTERM);
        if let Ok(result) = tokio::time::timeout(grace, self.wait()).await {
            return result;
        }
        signal_group(self.pgid, Signal::SIGKILL);
        if let Ok(result) = tokio::time::timeout(LEADER_EXIT_TIMEOUT, self.wait()).await {
            return result;
        }
        let _ = killpg(self.pgid, Signal::SIGKILL);
        self.wait().await
    }

    /// The last lines QEMU printed on stderr.
    pub fn stderr_tail(&self, lines: usize) -> String {
        self.stderr.lock().expect("stderr lock").last_lines(lines)
    }

    /// A reader of QEMU's stderr tail that does not borrow the process (it can watch while
    /// something else waits for the process to exit).
    pub fn stderr_reader(&self) -> impl Fn(usize) -> String + use<> {
        let stderr = self.stderr.clone();
        move |lines| stderr.lock().expect("stderr lock").last_lines(lines)
    }

    /// The last lines of the guest's serial console.
    pub fn console_tail(&self, lines: usize) -> String {
        self.console.lock().expect("console lock").last_lines(lines)
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        // Last resort for every path that did not stop the VM politely (error, panic, a
        // cancelled or timed-out future): kill the whole group now, and wait until QEMU is
        // gone and reaped. Leaving that to tokio's background reaper let `runner test`
        // exit while its QEMU was still tearing down. Blocking, as Drop cannot await; a
        // SIGKILLed process is gone within milliseconds, so the wait is short and bounded.
        if self.try_exit().is_some() {
            return;
        }
        signal_group(self.pgid, Signal::SIGKILL);
        let leader_deadline = std::time::Instant::now() + LEADER_EXIT_TIMEOUT;
        self.wait_blocking(leader_deadline);
        if self.try_exit().is_none() {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
        self.wait_blocking(std::time::Instant::now() + KILLED_EXIT_TIMEOUT);
    }
}

impl QemuProcess {
    /// Polls for the exit until `deadline` (Drop cannot await).
    fn wait_blocking(&mut self, deadline: std::time::Instant) {
        let mut backoff = Duration::from_millis(1);
        while self.try_exit().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(Duration::from_millis(20));
        }
    }
}

/// How long the group's leader (bubblewrap's monitor, when QEMU is contained) gets to reap
/// its children and exit after they were signalled, before it is killed too.
const LEADER_EXIT_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends `sig` to every member of the process group `pgid` but its leader, or to the leader
/// when it is alone. A contained QEMU runs under bubblewrap: leader (monitor) → namespace init
/// → QEMU. Signalling the whole group at once let the monitor die before it reaped the init,
/// which then lingered as a zombie of PID 1 after `runner` had exited; signalled this way the
/// monitor sees its child end, reaps it and exits by itself, and we reap the monitor.
fn signal_group(pgid: Pid, sig: Signal) {
    let members = group_members(pgid);
    if members.is_empty() {
        let _ = killpg(pgid, sig);
        return;
    }
    for pid in members {
        let _ = kill(pid, sig);
    }
}

/// The processes of group `pgid` other than its leader, from `/proc` (zombies included).
fn group_members(pgid: Pid) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != pgid.as_raw())
        .filter(|&pid| process_group_of(pid) == Some(pgid.as_raw()))
        .map(Pid::from_raw)
        .collect()
}

/// Field 5 of `/proc/PID/stat` (after the command name, which may hold spaces and ')').
fn process_group_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(2)?.parse().ok()
}

async fn drain_into<R: AsyncRead + Unpin>(mut reader: R, sink: Arc<Mutex<TailBuffer>>) {
    let mut buf = vec![0u8; 8192];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => sink.lock().expect("tail lock").push(&buf[..n]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_members_are_found_without_the_leader_and_signalled() {
        use std::os::unix::process::CommandExt;
        // A leader with one child in its group, like bubblewrap's monitor and its init.
        let mut leader = std::process::Command::new("sh")
            .args(["-c", "sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .expect("sh");
        let pgid = Pid::from_raw(leader.id() as i32);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let members = loop {
            let m = group_members(pgid);
            if !m.is_empty() || std::time::Instant::now() > deadline {
                break m;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(members.len(), 1, "{members:?}");
        assert_ne!(members[0], pgid);
        assert_eq!(process_group_of(pgid.as_raw()), Some(pgid.as_raw()));
        // The member dies; the leader sees its child end, returns from `wait` and exits by
        // itself: nobody is orphaned.
        signal_group(pgid, Signal::SIGKILL);
        let status = leader.wait().expect("wait");
        assert!(status.success() || status.code().is_some(), "{status:?}");
        assert!(group_members(pgid).is_empty());
    }
}
