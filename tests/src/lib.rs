//! Helpers for the end-to-end tests: find (or build) the `runner` binary, run it, and check
//! that nothing is left behind (QEMU processes, VM directories).

pub mod fake_github;
pub mod fake_gitlab;
pub mod gitlab_serve;
pub mod s3_server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Once;

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// The `runner` binary: `$RUNNER_BIN`, else the workspace's debug build (built once).
pub fn runner_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("RUNNER_BIN") {
        return p.into();
    }
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let mut build = Command::new(env!("CARGO"));
        build
            .args(["build", "--quiet", "-p", "runner", "--bin", "runner"])
            .current_dir(workspace_root());
        // `cargo test` gives this process the test crate's CARGO_PKG_*/CARGO_MANIFEST_* vars.
        // Build scripts that watch them (ring's does) would see them "changed" and rebuild,
        // and the next plain `cargo build` would rebuild back: minutes per switch.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CARGO_PKG_")
                || key.starts_with("CARGO_MANIFEST_")
                || matches!(
                    key.as_ref(),
                    "CARGO_CRATE_NAME"
                        | "CARGO_PRIMARY_PACKAGE"
                        | "CARGO_TARGET_TMPDIR"
                        | "OUT_DIR"
                )
            {
                build.env_remove(key.as_ref());
            }
        }
        let status = build.status().expect("cargo build");
        assert!(status.success(), "building runner failed");
    });
    workspace_root().join("target/debug/runner")
}

/// The image cache the tests share: `$RUNNER_CACHE_DIR` or the user's default, so images
/// built once serve every test and every later run.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("RUNNER_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| {
                    PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache")
                });
            home.join("runner")
        })
}

/// The result of one `runner` run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `runner ARGS` in `cwd` with the shared cache.
pub fn runner(cwd: &Path, args: &[&str]) -> Run {
    runner_with_cache(cwd, args, &cache_dir())
}

/// `runner test --arch ARCH -- CMD...` from the workspace root, with the shared cache.
pub fn in_guest(arch: &str, cmd: &[&str]) -> Run {
    let mut args = vec!["test", "--arch", arch, "--"];
    args.extend_from_slice(cmd);
    runner(&workspace_root(), &args)
}

/// Runs `runner ARGS` in `cwd` with the given cache dir.
///
/// A watchdog bounds every run: a hang fails the test after [`RUN_DEADLINE`] (with what was
/// printed so far) instead of holding CI until some default timeout.
pub fn runner_with_cache(cwd: &Path, args: &[&str], cache: &Path) -> Run {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = Command::new(runner_bin())
        .args(args)
        .current_dir(cwd)
        .env("RUNNER_CACHE_DIR", cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run runner");
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            buf
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("stdout")));
    let err = drain(Box::new(child.stderr.take().expect("stderr")));
    let deadline = std::time::Instant::now() + RUN_DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let run = Run::from(Output {
                status: std::process::ExitStatus::default(),
                stdout: out.join().unwrap_or_default(),
                stderr: err.join().unwrap_or_default(),
            });
            panic!("runner {args:?} hung for {RUN_DEADLINE:?}:\n{run}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    Run::from(Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    })
}

/// Longest any single `runner` invocation in the tests may take (an image build included).
pub const RUN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// QEMU processes whose command line contains `fragment`.
pub fn qemu_processes_using(fragment: &str) -> Vec<String> {
    processes_using(fragment)
        .into_iter()
        .filter(|p| p.contains("qemu-system"))
        .collect()
}

/// The pids of the QEMU processes whose command line contains `fragment`.
pub fn qemu_pids_using(fragment: &str) -> Vec<u32> {
    qemu_processes_using(fragment)
        .iter()
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect()
}

/// Asserts that none of `pids` exists any more, not even as a zombie (whose command line is
/// empty, so [`qemu_processes_using`] cannot see it): whoever started them waited for them.
pub fn assert_reaped(pids: &[u32]) {
    let left: Vec<String> = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .collect();
    assert!(left.is_empty(), "processes not reaped: {left:?}");
}

/// Starts `runner ARGS` with `cache`, its output going to files in `cache`, and waits up to
/// [`RUN_DEADLINE`] for it to exit, noting the pids of the QEMU processes it runs meanwhile
/// (sampled every 50 ms) so that the test can check they are gone.
pub fn runner_noting_qemu_pids(args: &[&str], cache: &Path) -> (Run, Vec<u32>) {
    let out = cache.join("runner.stdout");
    let err = cache.join("runner.stderr");
    let mut child = Command::new(runner_bin())
        .args(args)
        .current_dir(workspace_root())
        .env("RUNNER_CACHE_DIR", cache)
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"))
        .spawn()
        .expect("run runner");
    let fragment = cache.display().to_string();
    let mut pids = Vec::new();
    let deadline = std::time::Instant::now() + RUN_DEADLINE;
    let status = loop {
        for pid in qemu_pids_using(&fragment) {
            if !pids.contains(&pid) {
                pids.push(pid);
            }
        }
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("runner {args:?} hung for {RUN_DEADLINE:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let run = Run::from(Output {
        status,
        stdout: std::fs::read(&out).unwrap_or_default(),
        stderr: std::fs::read(&err).unwrap_or_default(),
    });
    (run, pids)
}

/// Live processes (not zombies) whose command line contains `fragment`, as "PID: cmdline".
pub fn processes_using(fragment: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            // A zombie's cmdline is empty, so it never matches.
            text.contains(fragment)
                .then(|| format!("{}: {text}", e.file_name().to_string_lossy()))
        })
        .collect()
}

/// Entries in the cache's per-VM directories: `vms/` (`runner test`) and `serve-vms/`
/// (`runner serve`, which keeps its VMs apart so that it can sweep them all at start).
pub fn vm_dirs(cache: &Path) -> Vec<PathBuf> {
    ["vms", "serve-vms"]
        .iter()
        .flat_map(|d| {
            std::fs::read_dir(cache.join(d))
                .map(|d| d.flatten().map(|e| e.path()).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect()
}

/// A private cache dir that shares the real image cache (symlinked `images/` and `states/`)
/// but has its own
/// `vms/`, so a test can check precisely that its VMs left nothing behind.
pub fn private_cache() -> tempfile::TempDir {
    let shared = cache_dir();
    std::fs::create_dir_all(shared.join("images")).expect("image cache");
    let dir = tempfile::Builder::new()
        .prefix("runner-e2e-")
        .tempdir()
        .expect("tempdir");
    std::fs::create_dir_all(shared.join("states")).expect("state cache");
    for shared_dir in ["images", "states"] {
        std::os::unix::fs::symlink(shared.join(shared_dir), dir.path().join(shared_dir))
            .expect("symlink");
    }
    dir
}

/// Like [`private_cache`], but with saved VM states of its own (empty at first), for tests
/// that need to know which states exist or that break one on purpose.
pub fn private_cache_with_own_states() -> tempfile::TempDir {
    let shared = cache_dir();
    std::fs::create_dir_all(shared.join("images")).expect("image cache");
    let dir = tempfile::Builder::new()
        .prefix("runner-e2e-")
        .tempdir()
        .expect("tempdir");
    std::os::unix::fs::symlink(shared.join("images"), dir.path().join("images")).expect("symlink");
    dir
}

/// The start of a VM as the console reports it ("started riscv64 VM ID in 1.2s (resumed from
/// saved state; ...)"): the text before the first `;` in the parentheses.
pub fn vm_start_kind(stderr: &str) -> Option<&str> {
    let line = stderr.lines().find(|l| l.starts_with("started "))?;
    let inside = &line[line.find('(')? + 1..];
    inside.split(';').next()
}

/// How the console calls a VM resumed from a saved state (see [`vm_start_kind`]).
pub const RESUMED: &str = "resumed from saved state";

/// Asserts that no QEMU process and no VM directory of `cache` remain.
pub fn assert_nothing_left(cache: &Path) {
    let procs = qemu_processes_using(&cache.display().to_string());
    assert!(procs.is_empty(), "QEMU processes left: {procs:?}");
    let dirs = vm_dirs(cache);
    assert!(dirs.is_empty(), "VM directories left: {dirs:?}");
}

/// Starts `runner test --arch riscv64 -- sh -c 'echo MARK; sleep 600'` with `cache` and
/// returns once MARK came out of the guest (a bounded wait: runner itself times out).
pub fn spawn_until_output(cache: &Path, mark: &str) -> std::process::Child {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;
    let mut child = Command::new(runner_bin())
        .args([
            "test",
            "--arch",
            "riscv64",
            "--timeout",
            "5m",
            "--",
            "sh",
            "-c",
        ])
        .arg(format!("echo {mark}; sleep 600"))
        .env("RUNNER_CACHE_DIR", cache)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn runner");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let line = lines.next().expect("a line of output").expect("utf-8");
    assert_eq!(line, mark);
    child
}

/// How long a runner may take to stop after Ctrl-C (it stops its VM and reports first).
pub const INTERRUPT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends SIGINT (Ctrl-C) to `child` and waits for it to exit, at most [`INTERRUPT_DEADLINE`].
pub fn interrupt_and_wait(child: &mut std::process::Child) -> std::process::ExitStatus {
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(sent, "kill -INT {}", child.id());
    let deadline = std::time::Instant::now() + INTERRUPT_DEADLINE;
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "runner did not stop within {INTERRUPT_DEADLINE:?} of SIGINT"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Fills `dir` with `files` files of random bytes, about `mib` MiB in all (odd sizes, so no
/// file ends on a tar block; one empty), and returns each file's `sha256sum` line as the
/// guest prints it from the workspace (`HASH  ./PATH`), sorted.
pub fn random_workspace(dir: &Path, mib: u64, files: u64) -> Vec<String> {
    use sha2::Digest;
    use std::io::Read;
    let mut random = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    let mut lines = Vec::new();
    for k in 0..files {
        let len = if k == 0 {
            0
        } else {
            (mib << 20) / (files - 1) + k * 7
        };
        let mut body = vec![0u8; len as usize];
        random.read_exact(&mut body).expect("random bytes");
        let rel = format!("d{}/f{k}.bin", k % 4);
        let path = dir.join(&rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(&path, &body).expect("write");
        lines.push(format!(
            "{}  ./{rel}",
            hex::encode(sha2::Sha256::digest(&body))
        ));
    }
    lines.sort();
    lines
}

/// The `HASH  ./PATH` lines in a guest's `sha256sum` output, sorted.
pub fn sha256sum_lines(stdout: &str) -> Vec<String> {
    let mut lines: Vec<String> = stdout
        .lines()
        .filter(|l| l.len() > 66 && l.as_bytes()[64..66] == *b"  ")
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}
