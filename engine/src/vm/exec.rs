//! Running one command in the guest with live output: the shell wrapper that sends the
//! command's output to the live-output port and ends it with a per-command marker, and the
//! marker scanner that separates output from the end-of-command signal.

use std::time::Duration;

use crate::agent::ExecRequest;
use crate::qemu::spec::OUTPUT_PORT_NAME;
use crate::vm::cgroup;

/// How often `guest-exec-status` is polled while no end marker has arrived.
pub const STATUS_POLL: Duration = Duration::from_millis(200);
/// First status poll after the end marker arrived (the wrapper exits right after it).
pub const EXIT_POLL_START: Duration = Duration::from_millis(5);
/// After the command has exited, how long we wait for the rest of its output.
pub const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// What to run in the guest.
#[derive(Debug, Clone)]
pub enum GuestCommand {
    /// A program and its arguments, run as they are (no shell parsing).
    Argv(Vec<String>),
    /// A shell script run by `/bin/sh -e`.
    Script(String),
}

/// How a guest command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandEnd {
    Exited(i32),
    Signaled(i32),
    /// Still running when the timeout passed (stop it with `Vm::stop_command` or stop the VM).
    TimedOut,
    /// Still running when the caller asked to stop (see `Vm::run_stoppable`).
    Stopped,
}

/// Kills the process tree of a guest command (its wrapper's pid is `$1`): SIGTERM to the
/// whole tree, up to 3 s for it to go, then SIGKILL to whatever is left. Children are listed
/// before their parents are signalled, so nothing escapes by being reparented to PID 1.
pub const KILL_TREE: &str = r#"tree() { for c in $(pgrep -P "$1"); do tree "$c"; done; echo "$1"; }
pids=$(tree "$1")
kill -TERM $pids 2>/dev/null
i=0
while [ $i -lt 30 ]; do
  alive=
  for p in $pids; do [ -e /proc/$p/exe ] && alive=1; done
  [ -z "$alive" ] && exit 0
  sleep 0.1; i=$((i+1))
done
kill -KILL $pids 2>/dev/null
exit 0"#;

/// The FIFO that every command writes its output to; the relay copies it to the port.
pub const OUTPUT_FIFO: &str = "/run/runner/output";

/// Makes the FIFO (run once per VM, before the relay starts).
pub const MAKE_FIFO: &str =
    "mkdir -p /run/runner && rm -f /run/runner/output && mkfifo -m 600 /run/runner/output";

/// The relay: the only process that ever opens the output port. A virtio-serial port can be
/// open only once, so if commands opened it themselves, a daemon left running by one step
/// would make the next step's redirect fail. Opening the FIFO read-write keeps the relay
/// from ever seeing end-of-file; output of such daemons simply flows on.
pub fn relay_request() -> ExecRequest {
    ExecRequest {
        path: "/bin/sh".into(),
        args: vec![
            "-c".into(),
            format!("exec cat <>{OUTPUT_FIFO} >/dev/virtio-ports/{OUTPUT_PORT_NAME}"),
        ],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
    }
}

/// The wrapper: redirect everything to the output FIFO, (for a job's command) enter the job
/// cgroup, enter the working directory, run the command, then print the marker so the host
/// knows the output is complete.
const WRAPPER: &str = r#"dir=$1; marker=$2; shift 2
exec </dev/null >FIFO 2>&1
ENTER_JOB
cd "$dir" || { printf '%s' "$marker"; exit 126; }
"$@"
rc=$?
printf '%s' "$marker"
exit $rc"#;

/// Builds the `guest-exec` request for `cmd` in `cwd`, with `env` as the whole environment,
/// for the runner's own commands: they stay outside the job cgroup, so they run even when the
/// job has used up its processes or memory.
pub fn exec_request(
    cmd: &GuestCommand,
    cwd: &str,
    env: &[(String, String)],
    marker: &str,
) -> ExecRequest {
    wrapped_request(cmd, cwd, env, marker, "")
}

/// [`exec_request`] for a job's command: the wrapper moves itself into the job cgroup first,
/// so the command and everything it starts live under the job's limits (see [`cgroup`]).
/// Without the cgroup (a step removed it) the command does not run unprotected: it fails.
/// The wrapper also drops the agent's OOM immunity, which it inherited: the OOM killer must
/// be able to pick the job's processes (else it finds nothing to kill and the kernel panics).
pub fn job_exec_request(
    cmd: &GuestCommand,
    cwd: &str,
    env: &[(String, String)],
    marker: &str,
) -> ExecRequest {
    let enter = format!(
        "echo $$ >{}/cgroup.procs && echo 0 >/proc/self/oom_score_adj || {{ echo 'runner: cannot enter the job cgroup {}'; printf '%s' \"$marker\"; exit 125; }}",
        cgroup::JOB,
        cgroup::JOB
    );
    wrapped_request(cmd, cwd, env, marker, &enter)
}

fn wrapped_request(
    cmd: &GuestCommand,
    cwd: &str,
    env: &[(String, String)],
    marker: &str,
    enter_job: &str,
) -> ExecRequest {
    let mut args = vec![
        "-c".to_string(),
        WRAPPER
            .replace("FIFO", OUTPUT_FIFO)
            .replace("ENTER_JOB", enter_job),
        "runner-wrapper".to_string(),
        cwd.to_string(),
        marker.to_string(),
    ];
    match cmd {
        GuestCommand::Argv(argv) => args.extend(argv.iter().cloned()),
        GuestCommand::Script(script) => args.extend([
            "/bin/sh".to_string(),
            "-e".into(),
            "-c".into(),
            script.clone(),
        ]),
    }
    ExecRequest {
        path: "/bin/sh".into(),
        args,
        env: env.to_vec(),
    }
}

/// A fresh end marker; the random part keeps command output from faking it by accident.
pub fn new_marker() -> String {
    format!("\x1erunner-end-{:016x}\x1e", rand::random::<u64>())
}

/// Splits a byte stream into output and the end marker, even when the marker arrives split
/// across chunks. Holds back at most `marker.len() - 1` bytes.
#[derive(Debug)]
pub struct MarkerScanner {
    marker: Vec<u8>,
    pending: Vec<u8>,
    found: bool,
}

impl MarkerScanner {
    pub fn new(marker: &str) -> Self {
        MarkerScanner {
            marker: marker.as_bytes().to_vec(),
            pending: Vec::new(),
            found: false,
        }
    }

    pub fn found(&self) -> bool {
        self.found
    }

    /// Feeds a chunk; returns the bytes that are certainly output. Bytes after the marker
    /// (from background processes still writing) are dropped.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.found {
            return Vec::new();
        }
        self.pending.extend_from_slice(chunk);
        if let Some(i) = find(&self.pending, &self.marker) {
            self.found = true;
            let out = self.pending[..i].to_vec();
            self.pending.clear();
            return out;
        }
        // Keep the longest suffix that could still be the start of the marker.
        let keep = (1..self.marker.len())
            .rev()
            .find(|&k| k <= self.pending.len() && self.pending.ends_with(&self.marker[..k]))
            .unwrap_or(0);
        let emit = self.pending.len() - keep;
        self.pending.drain(..emit).collect()
    }

    /// Everything still held back (used when the marker never comes).
    pub fn flush(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.pending)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_split_across_chunks_is_found() {
        let m = "\x1erunner-end-1\x1e";
        // (chunks, expected output)
        let cases: Vec<(Vec<&[u8]>, &[u8])> = vec![
            // marker whole in one chunk, output before it
            (vec![b"hello\n\x1erunner-end-1\x1e"], b"hello\n"),
            // marker split in the middle
            (vec![b"abc\x1erunner-", b"end-1\x1e"], b"abc"),
            // marker split byte by byte
            (m.as_bytes().chunks(1).collect(), b""),
            // a prefix of the marker that turns out to be output
            (
                vec![b"x\x1erunner-e", b"lse\n", b"\x1erunner-end-1\x1e"],
                b"x\x1erunner-else\n",
            ),
            // output after the marker is dropped
            (vec![b"a\x1erunner-end-1\x1etrailing"], b"a"),
        ];
        for (chunks, want) in cases {
            let mut s = MarkerScanner::new(m);
            let mut out = Vec::new();
            for c in &chunks {
                out.extend(s.feed(c));
            }
            assert!(s.found(), "{chunks:?}");
            assert_eq!(out, want, "{chunks:?}");
        }
    }

    #[test]
    fn without_marker_everything_comes_out_eventually() {
        let mut s = MarkerScanner::new("\x1eEND\x1e");
        let mut out = s.feed(b"partial\x1eEN");
        assert!(!s.found());
        out.extend(s.flush());
        assert_eq!(out, b"partial\x1eEN");
    }

    #[test]
    fn argv_commands_are_not_shell_parsed() {
        let req = exec_request(
            &GuestCommand::Argv(vec!["echo".into(), "$HOME; rm -rf /".into()]),
            "/workspace",
            &[("PATH".into(), "/usr/bin".into())],
            "M",
        );
        assert_eq!(req.path, "/bin/sh");
        assert_eq!(
            &req.args[2..],
            [
                "runner-wrapper",
                "/workspace",
                "M",
                "echo",
                "$HOME; rm -rf /"
            ]
        );
        assert!(req.args[1].contains(">/run/runner/output 2>&1"));
        // Only the relay opens the port itself.
        assert!(relay_request().args[1].contains("/dev/virtio-ports/org.runner.output.0"));
    }

    #[test]
    fn scripts_run_under_sh_e() {
        let req = exec_request(
            &GuestCommand::Script("false\necho no".into()),
            "/",
            &[],
            "M",
        );
        assert_eq!(&req.args[5..], ["/bin/sh", "-e", "-c", "false\necho no"]);
    }

    #[test]
    fn only_job_commands_enter_the_job_cgroup() {
        let cmd = GuestCommand::Argv(vec!["true".into()]);
        let job = job_exec_request(&cmd, "/", &[], "M");
        let own = exec_request(&cmd, "/", &[], "M");
        let enter = "echo $$ >/sys/fs/cgroup/job/cgroup.procs";
        assert!(job.args[1].contains(enter), "{}", job.args[1]);
        assert!(!own.args[1].contains("cgroup"), "{}", own.args[1]);
        // Entered after the redirect (so a failure is reported in the output), before the
        // command, with the rest of the request unchanged.
        let w = &job.args[1];
        assert!(w.find(">/run/runner/output").unwrap() < w.find(enter).unwrap());
        assert!(w.find(enter).unwrap() < w.find("\"$@\"").unwrap());
        assert_eq!(job.args[2..], own.args[2..]);
    }

    #[test]
    fn markers_are_unique() {
        assert_ne!(new_marker(), new_marker());
    }
}
