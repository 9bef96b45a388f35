//! An interactive shell in the guest (`runner shell`, `runner debug`), over the live-output
//! port — no network, no extra device (a saved state fits only the exact device set).
//!
//! The port can be open only once in the guest, and the one-way output relay holds it (see
//! `exec::relay_request`). The session replaces that relay with a two-way one that opens the
//! port once: keystrokes from the host go to an input FIFO, and everything written to the
//! output FIFO (the shell's terminal, and any job daemon's output as before) goes back.
//! `script` gives bash a real pseudo-terminal, so the guest's line discipline does what a
//! terminal's does: echo, line editing, Ctrl-C to the foreground process group. Window-size
//! changes are a second `guest-exec` of `stty -F PTY` (the agent serves it while the shell
//! runs), never an in-band escape the user could type. The session ends with a per-session
//! marker after `script` exits, so the host knows the output is complete; `script -e`
//! passes the shell's exit status through to the agent.

use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{exec, job_cgroup, CommandEnd, Vm, VmError, AGENT_TIMEOUT};
use crate::agent::{AgentError, ExecRequest, ExecStatus};
use crate::qemu::spec::OUTPUT_PORT_NAME;

/// How long the guest may take to release the port after the one-way relay is stopped.
const PORT_RELEASE_TRIES: u32 = 50;
/// How long a window-size change may take in the guest.
const RESIZE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the end marker, how long the session's wrapper may take to exit.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Keystrokes held for the port at most; beyond it, input waits (the guest is not reading).
const MAX_PENDING_INPUT: usize = 64 * 1024;

/// Where the session names its pseudo-terminal, as `/proc/PID/fd/0` of the interactive shell
/// (for `stty -F` on resize; no `tty` process to start).
const TTY_FILE: &str = "/run/runner/shell.tty";
/// Keystrokes from the port, read by `script` as its standard input.
const INPUT_FIFO: &str = "/run/runner/shell.in";

/// A terminal's size in characters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

/// What the host side sends into a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ShellInput {
    /// Bytes typed, passed as they are (Ctrl-C is byte 3: the guest's pty turns it into
    /// SIGINT for its foreground process group).
    Keys(Vec<u8>),
    /// The host terminal changed size.
    Resize(WindowSize),
}

/// The shell to open.
#[derive(Debug, Clone)]
pub struct ShellSpec {
    /// Working directory in the guest.
    pub cwd: String,
    /// The whole environment (qga replaces the guest's); `TERM` should be the host's.
    pub env: Vec<(String, String)>,
    pub size: WindowSize,
}

/// The session's guest side, run by `/bin/sh -c` with `$1` end marker, `$2` rows, `$3` cols,
/// `$4` directory, `$5` ready marker (the two-way relay runs: keys sent before it would be
/// lost with the one-way relay's port). The relay's two `cat`s stay outside the job cgroup (they are the
/// runner's); the shell enters it, like a step. The one-way relay is found with the shell's
/// own `-ef` test (same device and inode as the port): a `readlink` process per guest process
/// cost seconds under TCG before the prompt appeared.
const SESSION: &str = r#"marker=$1 rows=$2 cols=$3 dir=$4 ready=$5
port=/dev/virtio-ports/PORT
for p in /proc/[0-9]*; do
  [ "$p/fd/1" -ef "$port" ] && kill "${p#/proc/}" 2>/dev/null
done
i=0
until (exec 3<>"$port") 2>/dev/null; do
  i=$((i+1))
  [ $i -ge TRIES ] && { echo "runner: cannot open $port" >&2; exit 125; }
  sleep 0.1
done
rm -f INPUT; mkfifo -m 600 INPUT
exec 3<>"$port"
cat <&3 1<>INPUT &
cat <>OUTPUT >&3 &
exec 3>&-
printf '%s' "$ready" >OUTPUT
echo $$ >JOB/cgroup.procs && echo 0 >/proc/self/oom_score_adj || { echo "runner: cannot enter the job cgroup JOB" >OUTPUT; printf '%s' "$marker" >OUTPUT; exit 125; }
cd "$dir" 2>/dev/null || { echo "runner: no directory $dir in the guest" >OUTPUT; printf '%s' "$marker" >OUTPUT; exit 126; }
SHELL=/bin/bash script -qec "stty rows $rows cols $cols; echo /proc/\$\$/fd/0 >TTY_FILE; exec bash -i" /dev/null <>INPUT >OUTPUT 2>&1
rc=$?
printf '%s' "$marker" >OUTPUT
exit $rc"#;

/// The `guest-exec` request that starts a session.
fn session_request(spec: &ShellSpec, marker: &str, ready: &str) -> ExecRequest {
    let script = SESSION
        .replace("PORT", OUTPUT_PORT_NAME)
        .replace("TRIES", &PORT_RELEASE_TRIES.to_string())
        .replace("INPUT", INPUT_FIFO)
        .replace("OUTPUT", exec::OUTPUT_FIFO)
        .replace("TTY_FILE", TTY_FILE)
        .replace("JOB", job_cgroup::JOB);
    ExecRequest {
        path: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            script,
            "sh".into(),
            marker.into(),
            spec.size.rows.to_string(),
            spec.size.cols.to_string(),
            spec.cwd.clone(),
            ready.into(),
        ],
        env: spec.env.clone(),
    }
}

/// The `guest-exec` request that gives the session's terminal a new size (the kernel then
/// sends SIGWINCH to its foreground process group).
fn resize_request(size: WindowSize) -> ExecRequest {
    ExecRequest {
        path: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            format!(
                "stty -F \"$(cat {TTY_FILE})\" rows {} cols {}",
                size.rows, size.cols
            ),
        ],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
    }
}

impl Vm {
    /// Opens an interactive shell (see the module header) and runs it until it exits:
    /// `input` carries keystrokes and size changes, `on_output` gets the terminal's output.
    /// Returns the shell's exit, or `Stopped` when `input` closes (the shell keeps running:
    /// stop the VM). Once a session has started, the live output of later commands still
    /// works, but a second session cannot start in the same VM.
    pub async fn shell(
        &mut self,
        spec: &ShellSpec,
        input: &mut mpsc::Receiver<ShellInput>,
        on_output: &mut (dyn FnMut(&[u8]) + Send),
    ) -> Result<CommandEnd, VmError> {
        let markers = exec::EndMarkers::new();
        let mut scanner = exec::MarkerScanner::new(&markers);
        // Keys wait until the guest's two-way relay runs; output before it is passed on.
        let ready = exec::EndMarkers::new().ran.into_bytes();
        let mut before_ready: Option<Vec<u8>> = Some(Vec::new());
        while self.output.try_recv().is_ok() {}
        let request = session_request(spec, &markers.ran, &String::from_utf8_lossy(&ready));
        let pid = match self.agent.exec(&request, AGENT_TIMEOUT).await {
            Ok(pid) => pid,
            Err(e) => return Err(self.agent_or_died(e).await),
        };
        self.left_running = Some(pid);
        let mut pending: Vec<u8> = Vec::new();
        loop {
            tokio::select! {
                chunk = self.output.recv() => match chunk {
                    Some(mut bytes) => {
                        if let Some(held) = &mut before_ready {
                            held.extend_from_slice(&bytes);
                            match held.windows(ready.len()).position(|w| w == ready.as_slice()) {
                                Some(i) => {
                                    on_output(&held[..i]);
                                    bytes = held.split_off(i + ready.len());
                                    before_ready = None;
                                }
                                None => {
                                    // Bounded: all but what could be the marker's start.
                                    let keep = held.len().saturating_sub(ready.len());
                                    on_output(&held[..keep]);
                                    held.drain(..keep);
                                    continue;
                                }
                            }
                        }
                        let out = scanner.feed(&bytes);
                        if !out.is_empty() { on_output(&out); }
                        if scanner.found() {
                            return self.session_end(pid).await;
                        }
                    }
                    None => return Err(self.died().await),
                },
                keys = input.recv(), if pending.len() < MAX_PENDING_INPUT => match keys {
                    Some(ShellInput::Keys(k)) => pending.extend_from_slice(&k),
                    Some(ShellInput::Resize(size)) => {
                        if let Err(e) = self.resize(size).await {
                            return Err(self.agent_or_died(e).await);
                        }
                    }
                    None => return Ok(CommandEnd::Stopped),
                },
                // Cancel-safe: a write either happened (n bytes) or did not.
                written = self.port_writer.write(&pending), if before_ready.is_none() && !pending.is_empty() => match written {
                    Ok(n) => { pending.drain(..n); }
                    Err(_) => return Err(self.died().await),
                },
                _ = tokio::time::sleep(exec::STATUS_POLL) => {
                    // The marker is the normal end; this catches a wrapper that died first.
                    if let Some(end) = self.poll_status_or_died(pid).await? {
                        let rest = scanner.flush();
                        if !rest.is_empty() { on_output(&rest); }
                        self.left_running = None;
                        return Ok(end);
                    }
                }
                _ = self.process.wait() => return Err(self.died().await),
            }
        }
    }

    /// The session's wrapper printed its marker: collect its exit status.
    async fn session_end(&mut self, pid: i64) -> Result<CommandEnd, VmError> {
        let deadline = tokio::time::Instant::now() + EXIT_TIMEOUT;
        match self.agent.wait_exit(pid, deadline, exec::STATUS_POLL).await {
            Ok(ExecStatus::Exited(code)) => {
                self.left_running = None;
                Ok(CommandEnd::Exited(code))
            }
            Ok(ExecStatus::Signaled(sig)) => {
                self.left_running = None;
                Ok(CommandEnd::Signaled(sig))
            }
            Ok(ExecStatus::Running) => Ok(CommandEnd::TimedOut),
            Err(e) => Err(self.agent_or_died(e).await),
        }
    }

    async fn resize(&mut self, size: WindowSize) -> Result<(), AgentError> {
        let pid = self
            .agent
            .exec(&resize_request(size), AGENT_TIMEOUT)
            .await?;
        let deadline = tokio::time::Instant::now() + RESIZE_TIMEOUT;
        // A failed resize (the shell not started yet) is not worth ending the session for.
        let _ = self
            .agent
            .wait_exit(pid, deadline, exec::STATUS_POLL)
            .await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_script_has_every_placeholder_filled() {
        let spec = ShellSpec {
            cwd: "/workspace".into(),
            env: vec![("TERM".into(), "xterm".into())],
            size: WindowSize {
                rows: 40,
                cols: 120,
            },
        };
        let req = session_request(&spec, "\x1eM\x1e", "\x1eR\x1e");
        let script = &req.args[1];
        for placeholder in ["PORT", "TRIES", "INPUT", "OUTPUT", "TTY_FILE", "JOB/"] {
            assert!(
                !script.contains(placeholder),
                "{placeholder} left in:\n{script}"
            );
        }
        assert!(script.contains("/dev/virtio-ports/org.runner.output.0"));
        assert_eq!(
            &req.args[3..],
            ["\x1eM\x1e", "40", "120", "/workspace", "\x1eR\x1e"]
        );
        // The relay is started before the shell enters the job cgroup: it is the runner's.
        assert!(script.find("cat <>").unwrap() < script.find("cgroup.procs").unwrap());
    }

    #[test]
    fn a_resize_sets_the_sessions_pty() {
        let req = resize_request(WindowSize { rows: 24, cols: 80 });
        assert!(req.args[1].contains("stty -F \"$(cat /run/runner/shell.tty)\" rows 24 cols 80"));
    }
}
