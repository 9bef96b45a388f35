//! `runner serve` as a GitLab runner under test: the real binary started with a config
//! written for the fake GitLab, its log read back (bounded), signals, and the checks that a
//! service left nothing behind. Shared by the GitLab test files.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::fake_gitlab::{FakeGitlab, JobRecord};
use crate::{qemu_processes_using, runner_bin};

pub const TOKEN: &str = "glrt-test-token-1234";
/// Upper bound for one short job, VM included (resumed VMs take ~1 s; a cold boot ~10 s).
pub const JOB_DEADLINE: Duration = Duration::from_secs(120);

/// A running `runner serve`, killed (SIGKILL) if a test ends without stopping it.
#[derive(Debug)]
pub struct Serve {
    child: Child,
    log: PathBuf,
}

impl Serve {
    pub fn start(cache: &Path, config: &str) -> Serve {
        Serve::start_env(cache, config, &[])
    }

    /// [`Serve::start`] with extra variables in the service's environment.
    pub fn start_env(cache: &Path, config: &str, env: &[(&str, &str)]) -> Serve {
        let path = cache.join("serve.toml");
        std::fs::write(&path, config).expect("config");
        let log = cache.join(format!("serve-{}.log", rand_suffix()));
        let child = Command::new(runner_bin())
            .args(["serve", "--config"])
            .arg(&path)
            .env("RUNNER_CACHE_DIR", cache)
            .env("RUNNER_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn runner serve");
        Serve { child, log }
    }

    /// The service's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The service's log so far (bounded).
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            // Bounded: the service log of one test is small, but never read without limit.
            let _ = f.by_ref().take(4 << 20).read_to_string(&mut s);
        }
        s
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit; panics with its log after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "runner serve did not exit within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls the service log until it contains `text`.
    pub fn wait_log(&self, text: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(text) {
            assert!(
                Instant::now() < deadline,
                "'{text}' not in the service log within {timeout:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A suffix that differs between calls (file names).
pub fn rand_suffix() -> String {
    format!(
        "{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// A one-entry serve config for riscv64 jobs from the fake GitLab at `url`.
pub fn config(url: &str) -> String {
    format!(
        "concurrent = 2\ncheck_interval = 1\nshutdown_timeout = 30\n\n[[runners]]\nname = \"riscv64-emu\"\nurl = \"{url}\"\ntoken = \"{TOKEN}\"\narch = \"riscv64\"\nimage = \"debian-13\"\nlimit = 2\noutput_limit = 2048\ngit_protocols = [\"file\"]\n"
    )
}

/// No QEMU of this cache runs and the service's VM directory is empty (polled: a VM being
/// torn down may take a moment).
pub fn assert_serve_clean(cache: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let procs = qemu_processes_using(&cache.display().to_string());
        let dirs: Vec<PathBuf> = std::fs::read_dir(cache.join("serve-vms"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        if procs.is_empty() && dirs.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind after {timeout:?}: QEMU {procs:?}, VM dirs {dirs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A job's trace as text.
pub fn trace(j: &JobRecord) -> String {
    String::from_utf8_lossy(&j.trace).into_owned()
}

/// Waits until the fake has seen at least `n` job requests.
pub fn wait_requests(gl: &FakeGitlab, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while gl.with(|s| s.requests.len()) < n {
        assert!(
            Instant::now() < deadline,
            "the runner never asked for a job"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
