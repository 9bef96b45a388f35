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
/// shell that did not find a tool). A job's command follows its marker with the job's
/// refused-fork count (see [`PIDS_TRAILER`]).
const WRAPPER: &str = r#"dir=$1; marker=$2; missing=$3; shift 3
exec </dev/null >FIFO 2>&1
ENTER_JOB
cd "$dir" || { printf '%s' "$marker"; exit 126; }
command -v "$1" >/dev/null || { printf '%s: not found\n' "$1"; printf '%s' "$missing"; exit 127; }
"$@"
rc=$?
END_MARKER
exit $rc"#;

/// How a job command's wrapper ends its output: the `ran` marker, then the `max` counter of
/// the job cgroup's `pids.events` (forks refused at the process limit; empty if unreadable)
/// and a record separator. Read with shell built-ins — no fork, so it works at the process
/// limit — it spares the host the three agent calls (open, read, close: ~35 ms under TCG)
/// of reading the counter after every step that ended. The job can forge it (it can forge
/// anything in its guest): a forged count hides only its own fork bomb from its own report;
/// the host reads the counter through the agent whenever the trailer is missing or bad.
const PIDS_TRAILER: &str = r#"refused=
while read -r key value; do [ "$key" = max ] && refused=$value; done 2>/dev/null <EVENTS
printf '%s%s\036' "$marker" "$refused""#;
/// The longest trailer the host waits for after the marker (a u64 and the separator).
const TRAILER_MAX: usize = 24;

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
    wrapped_request(cmd, cwd, env, markers, "", "printf '%s' \"$marker\"")
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
    let end = PIDS_TRAILER.replace("EVENTS", job_cgroup::PIDS_EVENTS);
    wrapped_request(cmd, cwd, env, markers, &enter, &end)
}

fn wrapped_request(
    cmd: &GuestCommand,
    cwd: &str,
    env: &[(String, String)],
    markers: &EndMarkers,
    enter_job: &str,
    end_marker: &str,
) -> ExecRequest {
    let mut args = vec![
        "-c".to_string(),
        WRAPPER
            .replace("FIFO", OUTPUT_FIFO)
            .replace("ENTER_JOB", enter_job)
            .replace("END_MARKER", end_marker),
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
/// across chunks. Holds back less than one marker's length. For a job's command
/// ([`MarkerScanner::for_job`]) the `ran` marker is followed by the job's refused-fork
/// count (see [`PIDS_TRAILER`]), which it reads too, at most [`TRAILER_MAX`] bytes.
#[derive(Debug)]
pub struct MarkerScanner {
    /// (marker, what it means); neither is a prefix of the other.
    markers: [(Vec<u8>, EndSeen); 2],
    pending: Vec<u8>,
    seen: Option<EndSeen>,
    wants_trailer: bool,
    /// The trailer read so far, while it is being read.
    trailer: Option<Vec<u8>>,
    pids_refused: Option<u64>,
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
            wants_trailer: false,
            trailer: None,
            pids_refused: None,
        }
    }

    /// A scanner for the output of [`job_exec_request`]'s wrapper.
    pub fn for_job(markers: &EndMarkers) -> Self {
        MarkerScanner {
            wants_trailer: true,
            ..MarkerScanner::new(markers)
        }
    }

    /// Whether the output is complete: a marker came (and after `ran`, the trailer).
    pub fn found(&self) -> bool {
        self.seen.is_some() && self.trailer.is_none()
    }

    /// The marker that came, once the output is complete.
    pub fn seen(&self) -> Option<EndSeen> {
        self.seen.filter(|_| self.found())
    }

    /// The job's refused-fork count its wrapper reported, if it did (well-formed).
    pub fn pids_refused(&self) -> Option<u64> {
        self.pids_refused
    }

    /// Feeds a chunk; returns the bytes that are certainly output. Bytes after the marker
    /// (from background processes still writing) are dropped.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<u8> {
        if self.trailer.is_some() {
            self.feed_trailer(chunk);
            return Vec::new();
        }
        if self.seen.is_some() {
            return Vec::new();
        }
        self.pending.extend_from_slice(chunk);
        let first = self
            .markers
            .iter()
            .filter_map(|(m, kind)| find(&self.pending, m).map(|i| (i, m.len(), *kind)))
            .min_by_key(|(i, _, _)| *i);
        if let Some((i, len, kind)) = first {
            self.seen = Some(kind);
            let rest = self.pending.split_off(i + len);
            let out = self.pending[..i].to_vec();
            self.pending.clear();
            if kind == EndSeen::Ran && self.wants_trailer {
                self.trailer = Some(Vec::new());
                self.feed_trailer(&rest);
            }
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

    fn feed_trailer(&mut self, bytes: &[u8]) {
        let Some(trailer) = &mut self.trailer else {
            return;
        };
        let room = TRAILER_MAX.saturating_sub(trailer.len());
        trailer.extend_from_slice(&bytes[..bytes.len().min(room)]);
        if let Some(end) = trailer.iter().position(|&b| b == 0x1e) {
            self.pids_refused = std::str::from_utf8(&trailer[..end])
                .ok()
                .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|t| t.parse().ok());
            self.trailer = None;
        } else if trailer.len() >= TRAILER_MAX {
            self.trailer = None;
        }
    }

    /// Everything still held back (used when the marker never comes). A trailer still being
    /// read is given up.
    pub fn flush(&mut self) -> Vec<u8> {
        self.trailer = None;
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
        let req = exec_request(cmd, "/", &[], &markers());
        run_request(req, dir.path())
    }

    /// Runs `req` with its guest paths (the output FIFO, the job cgroup) moved into `dir`.
    fn run_request(mut req: ExecRequest, dir: &std::path::Path) -> (String, i32) {
        let out = dir.join("output");
        req.args[1] = req.args[1]
            .replace(OUTPUT_FIFO, &out.display().to_string())
            .replace(job_cgroup::JOB, &dir.display().to_string());
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
    fn a_job_command_reports_its_refused_forks_after_its_marker() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.procs"), "").unwrap();
        let m = markers();
        let cmd = GuestCommand::Argv(vec!["echo".into(), "hi".into()]);
        // (pids.events, what the host reads from the trailer)
        let cases = [
            (Some("max 7\nmax.imposed 0\n"), Some(7)),
            (Some("max 0\n"), Some(0)),
            // no counter (the step removed its cgroup): no count, the host asks the agent
            (None, None),
        ];
        for (events, want) in cases {
            let path = dir.path().join("pids.events");
            let _ = std::fs::remove_file(&path);
            if let Some(text) = events {
                std::fs::write(&path, text).unwrap();
            }
            let (text, rc) = run_request(job_exec_request(&cmd, "/", &[], &m), dir.path());
            assert_eq!(rc, 0);
            // Fed byte by byte, as the port may deliver it.
            let mut s = MarkerScanner::for_job(&m);
            let mut out = Vec::new();
            for b in text.as_bytes() {
                out.extend(s.feed(std::slice::from_ref(b)));
            }
            assert!(s.found(), "{text:?}");
            assert_eq!(s.seen(), Some(EndSeen::Ran));
            assert_eq!(out, b"hi\n", "{text:?}");
            assert_eq!(s.pids_refused(), want, "{text:?}");
        }
    }

    #[test]
    fn a_trailer_is_waited_for_bounded_and_only_digits_count() {
        let m = markers();
        // The marker alone: not complete until the trailer has come.
        let mut s = MarkerScanner::for_job(&m);
        assert_eq!(s.feed(format!("out{}1", m.ran).as_bytes()), b"out");
        assert!(!s.found() && s.seen().is_none());
        s.feed(b"2\x1e and a daemon's output after it");
        assert!(s.found());
        assert_eq!(s.pids_refused(), Some(12));
        // Not a number, or no end within the bound: complete, without a count.
        for trailer in ["x1\x1e".to_string(), "9".repeat(TRAILER_MAX + 5)] {
            let mut s = MarkerScanner::for_job(&m);
            s.feed(format!("{}{trailer}", m.ran).as_bytes());
            assert!(s.found(), "{trailer:?}");
            assert_eq!(s.pids_refused(), None, "{trailer:?}");
        }
        // A runner command's scanner is complete at the marker.
        let mut s = MarkerScanner::new(&m);
        s.feed(m.ran.as_bytes());
        assert!(s.found());
        assert_eq!(s.pids_refused(), None);
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
