//! Running one command in the guest with live output: the shell wrapper that sends the
//! command's output to the live-output port and ends it with a per-command marker, and the
//! marker scanner that separates output from the end-of-command signal.

use std::time::Duration;

use crate::agent::ExecRequest;
use crate::qemu::spec::OUTPUT_PORT_NAME;
use crate::vm::job_cgroup;

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
    /// The program to run (`argv[0]`) is not in the guest: nothing ran (exit status 127).
    /// A 127 from inside the command (a script calling a missing tool) is `Exited(127)`.
    NotFound,
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
/// cgroup, enter the working directory, run the command, then print the end marker so the
/// host knows the output is complete. A program that does not exist ends with the other
/// marker instead: exit status 127 alone cannot tell it from a 127 of the command's own (a
/// shell that did not find a tool).
const WRAPPER: &str = r#"dir=$1; marker=$2; missing=$3; shift 3
exec </dev/null >FIFO 2>&1
ENTER_JOB
cd "$dir" || { printf '%s' "$marker"; exit 126; }
command -v "$1" >/dev/null || { printf '%s: not found\n' "$1"; printf '%s' "$missing"; exit 127; }
"$@"
rc=$?
printf '%s' "$marker"
exit $rc"#;

/// `$0` of the wrapper and of scripts: the shell's own messages start with it (`sh: 1: x: not
/// found`), as they would for `sh -c` typed by hand.
const SHELL_NAME: &str = "sh";

/// Builds the `guest-exec` request for `cmd` in `cwd`, with `env` as the whole environment,
/// for the runner's own commands: they stay outside the job cgroup, so they run even when the
/// job has used up its processes or memory.
pub fn exec_request(
    cmd: &GuestCommand,
    cwd: &str,
    env: &[(String, String)],
    markers: &EndMarkers,
) -> ExecRequest {
    wrapped_request(cmd, cwd, env, markers, "")
}

/// [`exec_request`] for a job's command: the wrapper moves itself into the job cgroup first,
/// so the command and everything it starts live under the job's limits (see [`job_cgroup`]).
/// Without the cgroup (a step removed it) the command does not run unprotected: it fails.
/// The wrapper also drops the agent's OOM immunity, which it inherited: the OOM killer must
/// be able to pick the job's processes (else it finds nothing to kill and the kernel panics).
pub fn job_exec_request(
    cmd: &GuestCommand,
    cwd: &str,
    env: &[(String, String)],
    markers: &EndMarkers,
) -> ExecRequest {
    let enter = format!(
        "echo $$ >{}/cgroup.procs && echo 0 >/proc/self/oom_score_adj || {{ echo 'runner: cannot enter the job cgroup {}'; printf '%s' \"$marker\"; exit 125; }}",
        job_cgroup::JOB,
        job_cgroup::JOB
    );
    wrapped_request(cmd, cwd, env, markers, &enter)
}

fn wrapped_request(
    cmd: &GuestCommand,
    cwd: &str,
    env: &[(String, String)],
    markers: &EndMarkers,
    enter_job: &str,
) -> ExecRequest {
    let mut args = vec![
        "-c".to_string(),
        WRAPPER
            .replace("FIFO", OUTPUT_FIFO)
            .replace("ENTER_JOB", enter_job),
        SHELL_NAME.to_string(),
        cwd.to_string(),
        markers.ran.clone(),
        markers.not_found.clone(),
    ];
    match cmd {
        GuestCommand::Argv(argv) => args.extend(argv.iter().cloned()),
        GuestCommand::Script(script) => args.extend([
            "/bin/sh".to_string(),
            "-e".into(),
            "-c".into(),
            script.clone(),
            SHELL_NAME.into(),
        ]),
    }
    ExecRequest {
        path: "/bin/sh".into(),
        args,
        env: env.to_vec(),
    }
}

/// The two ways one command's output can end; the shared random part keeps command output
/// from faking either by accident.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndMarkers {
    /// The command ran (and ended with the wrapper's exit status).
    pub ran: String,
    /// The program was not found; nothing ran.
    pub not_found: String,
}

impl EndMarkers {
    pub fn new() -> Self {
        let id = rand::random::<u64>();
        EndMarkers {
            ran: format!("\x1erunner-end-{id:016x}\x1e"),
            not_found: format!("\x1erunner-end-{id:016x}-not-found\x1e"),
        }
    }
}

impl Default for EndMarkers {
    fn default() -> Self {
        Self::new()
    }
}

/// Which end marker came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndSeen {
    Ran,
    NotFound,
}

/// Splits a byte stream into output and an end marker, even when the marker arrives split
/// across chunks. Holds back less than one marker's length.
#[derive(Debug)]
pub struct MarkerScanner {
    /// (marker, what it means); neither is a prefix of the other.
    markers: [(Vec<u8>, EndSeen); 2],
    pending: Vec<u8>,
    seen: Option<EndSeen>,
}

impl MarkerScanner {
    pub fn new(markers: &EndMarkers) -> Self {
        MarkerScanner {
            markers: [
                (markers.ran.as_bytes().to_vec(), EndSeen::Ran),
                (markers.not_found.as_bytes().to_vec(), EndSeen::NotFound),
            ],
            pending: Vec::new(),
            seen: None,
        }
    }

    pub fn found(&self) -> bool {
        self.seen.is_some()
    }

    /// The marker that came, if one did.
    pub fn seen(&self) -> Option<EndSeen> {
        self.seen
    }

    /// Feeds a chunk; returns the bytes that are certainly output. Bytes after the marker
    /// (from background processes still writing) are dropped.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.found() {
            return Vec::new();
        }
        self.pending.extend_from_slice(chunk);
        let first = self
            .markers
            .iter()
            .filter_map(|(m, kind)| find(&self.pending, m).map(|i| (i, *kind)))
            .min_by_key(|(i, _)| *i);
        if let Some((i, kind)) = first {
            self.seen = Some(kind);
            let out = self.pending[..i].to_vec();
            self.pending.clear();
            return out;
        }
        // Keep the longest suffix that could still be the start of a marker.
        let keep = self
            .markers
            .iter()
            .map(|(m, _)| {
                (1..m.len())
                    .rev()
                    .find(|&k| k <= self.pending.len() && self.pending.ends_with(&m[..k]))
                    .unwrap_or(0)
            })
            .max()
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

    fn markers() -> EndMarkers {
        EndMarkers {
            ran: "\x1erunner-end-1\x1e".into(),
            not_found: "\x1erunner-end-1-not-found\x1e".into(),
        }
    }

    #[test]
    fn marker_split_across_chunks_is_found() {
        let m = "\x1erunner-end-1\x1e";
        let nf = "\x1erunner-end-1-not-found\x1e";
        /// Chunks as they arrive, the output they carry, and the marker that ends them.
        type Case<'a> = (Vec<&'a [u8]>, &'a [u8], EndSeen);
        let cases: Vec<Case> = vec![
            // marker whole in one chunk, output before it
            (
                vec![b"hello\n\x1erunner-end-1\x1e"],
                b"hello\n",
                EndSeen::Ran,
            ),
            // marker split in the middle
            (vec![b"abc\x1erunner-", b"end-1\x1e"], b"abc", EndSeen::Ran),
            // marker split byte by byte
            (m.as_bytes().chunks(1).collect(), b"", EndSeen::Ran),
            // a prefix of the marker that turns out to be output
            (
                vec![b"x\x1erunner-e", b"lse\n", b"\x1erunner-end-1\x1e"],
                b"x\x1erunner-else\n",
                EndSeen::Ran,
            ),
            // output after the marker is dropped
            (vec![b"a\x1erunner-end-1\x1etrailing"], b"a", EndSeen::Ran),
            // the not-found marker, split where it parts from the other
            (
                vec![b"x: not found\n\x1erunner-end-1", b"-not-found\x1e"],
                b"x: not found\n",
                EndSeen::NotFound,
            ),
            // ... and byte by byte
            (nf.as_bytes().chunks(1).collect(), b"", EndSeen::NotFound),
        ];
        for (chunks, want, seen) in cases {
            let mut s = MarkerScanner::new(&markers());
            let mut out = Vec::new();
            for c in &chunks {
                out.extend(s.feed(c));
            }
            assert_eq!(s.seen(), Some(seen), "{chunks:?}");
            assert_eq!(out, want, "{chunks:?}");
        }
    }

    #[test]
    fn without_marker_everything_comes_out_eventually() {
        let mut s = MarkerScanner::new(&markers());
        let mut out = s.feed(b"partial\x1erunner-end-1");
        assert!(!s.found());
        out.extend(s.flush());
        assert_eq!(out, b"partial\x1erunner-end-1");
    }

    #[test]
    fn argv_commands_are_not_shell_parsed() {
        let req = exec_request(
            &GuestCommand::Argv(vec!["echo".into(), "$HOME; rm -rf /".into()]),
            "/workspace",
            &[("PATH".into(), "/usr/bin".into())],
            &markers(),
        );
        assert_eq!(req.path, "/bin/sh");
        let m = markers();
        assert_eq!(
            &req.args[2..],
            [
                "sh",
                "/workspace",
                &m.ran,
                &m.not_found,
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
            &markers(),
        );
        assert_eq!(
            &req.args[6..],
            ["/bin/sh", "-e", "-c", "false\necho no", "sh"]
        );
    }

    /// Runs the wrapper with the host's own `/bin/sh` (the guest's is Debian's dash too),
    /// its output file in place of the guest's FIFO; returns (output, exit status).
    fn run_wrapper(cmd: &GuestCommand) -> (String, i32) {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("output");
        let mut req = exec_request(cmd, "/", &[], &markers());
        req.args[1] = WRAPPER
            .replace("FIFO", &out.display().to_string())
            .replace("ENTER_JOB", "");
        let status = std::process::Command::new(&req.path)
            .args(&req.args)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .status()
            .unwrap();
        let text = String::from_utf8(std::fs::read(&out).unwrap()).unwrap();
        (text, status.code().unwrap())
    }

    #[test]
    fn a_missing_program_is_told_apart_from_a_127_inside_the_command() {
        let m = markers();
        // (command, output before the marker, marker, exit status)
        let cases = [
            // the program itself is missing: said as a shell would, and the other marker
            (
                GuestCommand::Argv(vec!["no-such-program-xyz".into(), "arg".into()]),
                "no-such-program-xyz: not found\n".to_string(),
                &m.not_found,
                127,
            ),
            // sh is there; the 127 is the command's own, and so is the message
            (
                GuestCommand::Argv(vec!["sh".into(), "-c".into(), "no-such-tool-xyz".into()]),
                "sh: 1: no-such-tool-xyz: not found\n".to_string(),
                &m.ran,
                127,
            ),
            // a script: the shell's message, no wrapper name in it
            (
                GuestCommand::Script("no-such-tool-xyz".into()),
                "sh: 1: no-such-tool-xyz: not found\n".to_string(),
                &m.ran,
                127,
            ),
            // a program that is there runs as before
            (
                GuestCommand::Argv(vec!["echo".into(), "hi".into()]),
                "hi\n".to_string(),
                &m.ran,
                0,
            ),
        ];
        for (cmd, want_out, want_marker, want_rc) in cases {
            let (text, rc) = run_wrapper(&cmd);
            assert_eq!(text, format!("{want_out}{want_marker}"), "{cmd:?}");
            assert_eq!(rc, want_rc, "{cmd:?}");
        }
    }

    #[test]
    fn only_job_commands_enter_the_job_cgroup() {
        let cmd = GuestCommand::Argv(vec!["true".into()]);
        let markers = EndMarkers::new();
        let job = job_exec_request(&cmd, "/", &[], &markers);
        let own = exec_request(&cmd, "/", &[], &markers);
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
        let (a, b) = (EndMarkers::new(), EndMarkers::new());
        assert_ne!(a.ran, b.ran);
        assert_ne!(a.ran, a.not_found);
        assert!(!a.not_found.starts_with(&a.ran) && !a.ran.starts_with(&a.not_found));
    }
}
