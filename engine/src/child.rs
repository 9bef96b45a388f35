//! Host helper processes (image tools, `host_setup` commands) run in their own process group,
//! and the whole group is killed when the guard is dropped — on success, error, timeout or
//! cancellation alike — so no grandchild (apt, make, a compiler) outlives its step. The
//! direct child also gets SIGKILL as its parent-death signal, for when runner itself is
//! killed and no guard runs.

use std::process::{Output, Stdio};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Kills a process group when dropped.
#[derive(Debug)]
pub struct GroupGuard(Pid);

impl Drop for GroupGuard {
    fn drop(&mut self) {
        let _ = killpg(self.0, Signal::SIGKILL);
    }
}

/// Starts `cmd` (its stdio as the caller set it) in a new process group whose members are
/// killed when the returned guard is dropped; the child itself also dies with runner.
pub fn spawn_in_group(cmd: &mut Command) -> std::io::Result<(Child, Option<GroupGuard>)> {
    cmd.process_group(0).kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only makes one
    // async-signal-safe system call (prctl).
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn()?;
    let guard = child.id().map(|pid| GroupGuard(Pid::from_raw(pid as i32)));
    Ok((child, guard))
}

/// Runs `cmd` to completion in a new process group and collects its output; stdin is
/// closed. Whatever the group still runs afterwards (or when this future is dropped) is killed.
pub async fn output_in_group(cmd: &mut Command) -> std::io::Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (child, _guard) = spawn_in_group(cmd)?;
    child.wait_with_output().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn grandchildren_die_with_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("pid");
        // The grandchild detaches from our pipes so that the command itself returns at once.
        let script = format!("sleep 300 >/dev/null 2>&1 & echo $! > {}", marker.display());
        let out = output_in_group(Command::new("sh").args(["-c", &script]))
            .await
            .unwrap();
        assert!(out.status.success());
        let pid: i32 = std::fs::read_to_string(&marker)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // Killed by the guard; give the kernel a moment to deliver the signal.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false);
            if !alive {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "grandchild {pid} survived"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
