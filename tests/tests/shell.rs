//! `runner shell` driven through a real pseudo-terminal, as a person at a terminal would:
//! output of a command, Ctrl-C reaching the guest's foreground process, the shell's exit
//! status as runner's, window size, and the terminal's modes restored afterwards.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::{assert_nothing_left, private_cache, runner_bin};
use rustix::pty::{grantpt, openpt, ptsname, unlockpt, OpenptFlags};
use rustix::termios::{tcgetattr, tcsetwinsize, Winsize};

/// Deadline for the first prompt (a cold boot under TCG on a busy host included).
const PROMPT_DEADLINE: Duration = Duration::from_secs(300);
/// The end of bash's prompt for root.
const PROMPT: &str = "# ";
/// Deadline for a command's answer once the shell runs.
const ANSWER_DEADLINE: Duration = Duration::from_secs(30);
/// After Ctrl-C, the prompt must be back well before `sleep 30` would have ended.
const INTERRUPT_DEADLINE: Duration = Duration::from_secs(15);
/// Deadline for runner to exit after the shell did.
const EXIT_DEADLINE: Duration = Duration::from_secs(30);

/// `runner` on the slave side of a pseudo-terminal (its controlling terminal), the test on
/// the master side.
struct Session {
    child: Child,
    master: std::fs::File,
    /// Kept open so that the terminal's modes can be read after runner exits.
    slave: OwnedFd,
    chunks: mpsc::Receiver<Vec<u8>>,
    /// Everything runner wrote so far.
    seen: Vec<u8>,
    /// Where the next `expect` starts looking.
    from: usize,
    /// Where the previous `expect` started looking.
    last_from: usize,
}

impl Session {
    fn start(cache: &std::path::Path, args: &[&str]) -> Session {
        let master = openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let name = ptsname(&master, Vec::new()).expect("ptsname");
        let slave: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(name.to_str().expect("pty name"))
            .expect("open the pty's slave")
            .into();
        set_size(&master, 30, 100);
        let mut cmd = Command::new(runner_bin());
        cmd.args(args)
            .env("RUNNER_CACHE_DIR", cache)
            .env("TERM", "xterm")
            .stdin(Stdio::from(slave.try_clone().expect("dup")))
            .stdout(Stdio::from(slave.try_clone().expect("dup")))
            .stderr(Stdio::from(slave.try_clone().expect("dup")));
        // A session of its own with the pty as its controlling terminal, like a login.
        #[allow(unsafe_code)]
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                rustix::process::setsid()?;
                rustix::process::ioctl_tiocsctty(rustix::stdio::stdin())?;
                Ok(())
            });
        }
        let child = cmd.spawn().expect("spawn runner");
        let master = std::fs::File::from(master);
        let mut reader = master.try_clone().expect("dup master");
        let (tx, chunks) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Ends with EIO once every slave fd is closed (the test's own included).
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        Session {
            child,
            master,
            slave,
            chunks,
            seen: Vec::new(),
            from: 0,
            last_from: 0,
        }
    }

    /// Waits until `text` comes out (after what earlier calls matched); panics with what came
    /// when `deadline` passes first.
    fn expect(&mut self, text: &str, deadline: Duration) {
        let until = Instant::now() + deadline;
        loop {
            let hay = &self.seen[self.from..];
            if let Some(i) = hay.windows(text.len()).position(|w| w == text.as_bytes()) {
                self.last_from = self.from;
                self.from += i + text.len();
                return;
            }
            // Short slices: a runner that exited is noticed at once.
            let slice = until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200));
            match self.chunks.recv_timeout(slice) {
                Ok(chunk) => self.seen.extend_from_slice(&chunk),
                Err(_) => {
                    let exited = self.child.try_wait().expect("wait");
                    if exited.is_some() || Instant::now() >= until {
                        panic!(
                            "no {text:?} within {deadline:?} (runner: {exited:?}); the terminal showed:\n{}",
                            String::from_utf8_lossy(&self.seen)
                        );
                    }
                }
            }
        }
    }

    /// Whether `text` came out between the previous two matches.
    fn saw_since_last(&self, text: &str) -> bool {
        let last = &self.seen[self.last_from..self.from];
        last.windows(text.len()).any(|w| w == text.as_bytes())
    }

    fn resize(&mut self, rows: u16, cols: u16) {
        set_size(&self.master, rows, cols);
    }

    fn send(&mut self, bytes: &[u8]) {
        self.master.write_all(bytes).expect("write to the pty");
    }

    /// Waits for runner to exit; its exit code.
    fn wait(&mut self, deadline: Duration) -> i32 {
        let until = Instant::now() + deadline;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.code().unwrap_or(-1);
            }
            if Instant::now() >= until {
                let _ = self.child.kill();
                panic!(
                    "runner did not exit within {deadline:?}; the terminal showed:\n{}",
                    String::from_utf8_lossy(&self.seen)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sets the terminal's size (the kernel signals its foreground process group).
fn set_size(master: impl AsFd, rows: u16, cols: u16) {
    let size = Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    tcsetwinsize(master, size).expect("window size");
}

fn modes(fd: impl AsFd) -> String {
    format!("{:?}", tcgetattr(fd).expect("tcgetattr"))
}

/// One session through everything a terminal user relies on, on `arch`; returns the time
/// from start to the first prompt.
fn a_shell_session(arch: &str) -> Duration {
    let cache = private_cache();
    let started = Instant::now();
    let mut s = Session::start(cache.path(), &["shell", "--arch", arch]);
    let before = modes(&s.slave);
    s.expect("`exit` stops the VM", PROMPT_DEADLINE);
    s.expect(PROMPT, PROMPT_DEADLINE);
    let to_prompt = started.elapsed();
    eprintln!("{arch}: {to_prompt:?} to the prompt");

    // A command's output (the answer is computed: the echo of the line does not contain it).
    // Like a person, the test types the next line once the prompt is back: typed ahead,
    // the pty's own echo and bash's redraw interleave with the output.
    s.send(b"echo answer-$((6*7))\r");
    s.expect("answer-42", ANSWER_DEADLINE);
    s.expect(PROMPT, ANSWER_DEADLINE);
    // The window size of the host terminal.
    s.send(b"stty size\r");
    s.expect("30 100", ANSWER_DEADLINE);
    s.expect(PROMPT, ANSWER_DEADLINE);
    // ... and follows it: the kernel sends runner SIGWINCH. The signal and the next keys
    // reach runner on two paths, so the test asks until the new size shows (bounded).
    s.resize(40, 120);
    let until = Instant::now() + ANSWER_DEADLINE;
    loop {
        s.send(b"stty size; echo asked-$((1+1))\r");
        s.expect("asked-2", ANSWER_DEADLINE);
        if s.saw_since_last("40 120") {
            break;
        }
        assert!(
            Instant::now() < until,
            "the guest's terminal did not follow the resize"
        );
    }
    s.expect(PROMPT, ANSWER_DEADLINE);
    // Ctrl-C goes to the foreground process through the guest's line discipline. The
    // process that says it started is the foreground job itself: typed right after a
    // builtin's output, bash's own `echo start; sleep 30`, the key landed at times between
    // the builtin and the job taking the terminal, where bash loses it and sleep runs on
    // (a race of bash's job control, seen here as the old "output stall").
    s.send(b"sh -c 'echo start-$((0+1)); exec sleep 30'\r");
    s.expect("start-1", ANSWER_DEADLINE);
    let interrupted = Instant::now();
    s.send(b"\x03");
    s.expect(PROMPT, INTERRUPT_DEADLINE);
    s.send(b"echo back-$((2+3))\r");
    s.expect("back-5", INTERRUPT_DEADLINE);
    s.expect(PROMPT, ANSWER_DEADLINE);
    eprintln!(
        "{arch}: prompt back {:?} after Ctrl-C",
        interrupted.elapsed()
    );
    // The shell's exit status is runner's.
    s.send(b"exit 3\r");
    let code = s.wait(EXIT_DEADLINE);
    assert_eq!(
        code,
        3,
        "the terminal showed:\n{}",
        String::from_utf8_lossy(&s.seen)
    );
    assert_eq!(modes(&s.slave), before, "terminal modes not restored");
    drop(s);
    assert_nothing_left(cache.path());
    to_prompt
}

#[test]
fn riscv64_shell_session() {
    a_shell_session("riscv64");
}

#[test]
fn aarch64_shell_session() {
    a_shell_session("aarch64");
}

/// A riscv64 session that has run one command (so the guest's shell is up), and the
/// terminal's modes from before it started.
fn riscv64_session_at_a_prompt(cache: &std::path::Path) -> (Session, String) {
    let mut s = Session::start(cache, &["shell", "--arch", "riscv64"]);
    let before = modes(&s.slave);
    s.expect("`exit` stops the VM", PROMPT_DEADLINE);
    s.send(b"echo ready-$((1+1))\r");
    s.expect("ready-2", PROMPT_DEADLINE);
    (s, before)
}

/// The VM dying under the shell (QEMU killed) ends the session with an error, and the
/// terminal is restored.
#[test]
fn a_killed_vm_ends_the_session_and_restores_the_terminal() {
    let cache = private_cache();
    let (mut s, before) = riscv64_session_at_a_prompt(cache.path());
    // QEMU, and the sandbox's wrappers around it where there are any.
    let pids = e2e::qemu_pids_using(&cache.path().display().to_string());
    assert!(!pids.is_empty(), "no QEMU found");
    let killed = Command::new("kill")
        .arg("-KILL")
        .args(pids.iter().map(u32::to_string))
        .status()
        .expect("kill");
    assert!(killed.success());
    let code = s.wait(EXIT_DEADLINE);
    assert_eq!(code, 71, "{}", String::from_utf8_lossy(&s.seen));
    assert_eq!(modes(&s.slave), before, "terminal modes not restored");
    s.expect("runner: error:", ANSWER_DEADLINE);
    drop(s);
    assert_nothing_left(cache.path());
}

/// SIGTERM to runner mid-session: the VM stops and the terminal is restored.
#[test]
fn sigterm_ends_the_session_and_restores_the_terminal() {
    let cache = private_cache();
    let (mut s, before) = riscv64_session_at_a_prompt(cache.path());
    let term = Command::new("kill")
        .args(["-TERM", &s.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(term.success());
    let code = s.wait(EXIT_DEADLINE);
    assert_eq!(code, 130, "{}", String::from_utf8_lossy(&s.seen));
    assert_eq!(modes(&s.slave), before, "terminal modes not restored");
    drop(s);
    assert_nothing_left(cache.path());
}
