//! QEMU contained (engine/src/sandbox): while a real riscv64 job runs, its QEMU is inspected
//! from outside — its user, what its mount namespace shows, its network, its cgroup's limits —
//! and a layer switched off is said once and does not stop `runner test`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::{assert_nothing_left, private_cache, runner_bin, runner_with_cache, workspace_root};

/// Whether this test process is root (`/proc/self` belongs to our effective uid).
fn root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(1)
        == 0
}

/// The QEMU process (not the bwrap around it) whose command line names `fragment`.
fn qemu_pid(fragment: &str) -> u32 {
    let found: Vec<u32> = e2e::qemu_processes_using(fragment)
        .iter()
        .filter_map(|p| {
            let (pid, cmdline) = p.split_once(": ")?;
            let argv0 = cmdline.split(' ').next()?;
            Path::new(argv0)
                .file_name()?
                .to_string_lossy()
                .starts_with("qemu-system")
                .then(|| pid.parse().ok())?
        })
        .collect();
    assert_eq!(found.len(), 1, "one QEMU expected: {found:?}");
    found[0]
}

/// "Name:\tvalue" from /proc/PID/status.
fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_string()
}

/// The directory of `pid`'s cgroup for `controller` (v1), or its unified one (v2).
fn cgroup_dir(pid: u32, controller: &str) -> PathBuf {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        if controllers.split(',').any(|c| c == controller) {
            let dir = Path::new("/sys/fs/cgroup").join(controller);
            return dir.join(path.trim_start_matches('/'));
        }
    }
    let v2 = text
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .expect("a cgroup line");
    Path::new("/sys/fs/cgroup").join(v2.trim_start_matches('/'))
}

fn read_number(path: &Path) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Sends a signal with kill(1), keeping the test crate free of unsafe code.
fn kill(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// A runner that is killed (and its VM with it) if the test fails while it runs.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A file that is removed again when the test ends, however it ends.
struct Secret(PathBuf);

impl Secret {
    fn new(path: PathBuf) -> Secret {
        std::fs::write(&path, "secret\n").expect("write the secret");
        Secret(path)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn a_running_qemu_sees_only_its_own_files_as_another_user_in_a_limited_cgroup() {
    let cache = private_cache();
    // Secrets on the host: a service config in the cache's parent directory, and another
    // VM's directory next to this one's.
    let secrets = tempfile::tempdir().expect("tempdir");
    let config = secrets.path().join("serve.toml");
    std::fs::write(&config, "token = \"glrt-secret\"\n").unwrap();
    // And one in root's home: the cache (and so the images QEMU reads) may live below it,
    // so the home directory's skeleton can be there, but nothing else of it.
    let home = PathBuf::from(std::env::var("HOME").expect("HOME"));
    let home_secret = Secret::new(home.join(format!(".runner-containment-{}", std::process::id())));
    let other_vm = cache.path().join("vms/vm-other1");
    std::fs::create_dir_all(&other_vm).unwrap();
    std::fs::write(other_vm.join("qmp.sock"), "").unwrap();

    // Returns once the guest runs its (blocking) command.
    let mut child = Running(e2e::spawn_until_output(cache.path(), "started"));
    let child = &mut child.0;
    let pid = qemu_pid(&cache.path().display().to_string());
    let in_ns =
        |p: &Path| PathBuf::from(format!("/proc/{pid}/root")).join(p.strip_prefix("/").unwrap());

    // Its own directory is there (the check below can see a file when there is one)…
    let own_vm = std::fs::read_dir(cache.path().join("vms"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p != &other_vm)
        .expect("this VM's directory");
    assert!(in_ns(&own_vm.join("overlay.qcow2")).exists());
    // …and nothing else of the host's: not the config, not the other VM, not /etc.
    for hidden in [
        config.as_path(),
        other_vm.as_path(),
        Path::new("/etc/passwd"),
        home_secret.0.as_path(),
    ] {
        assert!(
            !in_ns(hidden).exists(),
            "{} is visible to QEMU",
            hidden.display()
        );
    }
    // No network but loopback.
    let net = std::fs::read_to_string(format!("/proc/{pid}/net/dev")).unwrap();
    let ifaces: Vec<&str> = net
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next())
        .map(str::trim)
        .collect();
    assert_eq!(ifaces, ["lo"], "{net}");
    // seccomp on, no way to gain privileges.
    assert_eq!(status_field(pid, "Seccomp"), "2");
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");

    if root() {
        let uids = status_field(pid, "Uid");
        assert!(
            uids.split_whitespace().all(|u| u != "0"),
            "QEMU runs as root: {uids}"
        );
        assert_eq!(status_field(pid, "CapEff"), "0000000000000000");
        // The cgroup: this host has v1 controllers or a delegated v2 tree.
        let memory = cgroup_dir(pid, "memory");
        assert!(
            memory.to_string_lossy().contains("runner-vm-"),
            "{}",
            memory.display()
        );
        let limit = ["memory.limit_in_bytes", "memory.max"]
            .iter()
            .map(|f| memory.join(f))
            .find(|p| p.exists())
            .map(|p| read_number(&p))
            .expect("a memory limit");
        // Guest RAM (1 GiB by default) + 256 MiB + at most 1 GiB of TCG code cache.
        assert!(
            limit > (1 << 30) && limit <= (1024 + 256 + 1024) << 20,
            "memory limit {limit}"
        );
        assert_eq!(read_number(&cgroup_dir(pid, "pids").join("pids.max")), 512);

        // The runner stops (Ctrl-C): the cgroup goes with the VM.
        let status = e2e::interrupt_and_wait(child);
        assert_eq!(status.code(), Some(130));
        assert!(!memory.exists(), "cgroup {} left behind", memory.display());
    } else {
        kill(child.id(), "INT");
        let _ = child.wait();
    }
    std::fs::remove_dir_all(&other_vm).unwrap();
    assert_nothing_left(cache.path());
}

#[test]
fn a_layer_switched_off_is_said_once_and_the_run_still_passes() {
    let cache = private_cache();
    let out = Command::new(runner_bin())
        .args(["test", "--arch", "riscv64", "--timeout", "5m", "--", "true"])
        .current_dir(workspace_root())
        .env("RUNNER_CACHE_DIR", cache.path())
        .env("RUNNER_SANDBOX_OFF", "cgroup")
        .output()
        .expect("run runner");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let notes: Vec<&str> = stderr.lines().filter(|l| l.contains("sandbox:")).collect();
    assert_eq!(
        notes,
        ["runner: sandbox: cgroup off (switched off by RUNNER_SANDBOX_OFF)"],
        "{stderr}"
    );
    assert_nothing_left(cache.path());
}

#[test]
fn serve_refuses_to_run_without_a_required_layer() {
    let cache = private_cache();
    let config = cache.path().join("serve.toml");
    std::fs::write(
        &config,
        "[[runners]]\nname = \"a\"\nurl = \"http://127.0.0.1:9\"\ntoken = \"t\"\n\
         arch = \"riscv64\"\n[sandbox]\nrequire = [\"namespace\", \"cgroup\"]\n",
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let mut cmd = Command::new(runner_bin());
    cmd.args(["serve", "--config", &config_arg])
        .env("RUNNER_CACHE_DIR", cache.path())
        .env("RUNNER_SANDBOX_OFF", "cgroup");
    let out = cmd.output().expect("run runner");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("runner: error:"))
        .unwrap_or_else(|| panic!("{stderr}"));
    assert!(
        line.contains("the cgroup sandbox layer is required but off")
            && line.contains("RUNNER_SANDBOX_OFF"),
        "{line}"
    );
}

#[test]
fn doctor_reports_every_layer_and_why_one_is_off() {
    let r = runner_with_cache(&workspace_root(), &["doctor"], &e2e::cache_dir());
    for layer in ["uid", "namespace", "cgroup", "seccomp", "rlimits"] {
        assert!(
            r.stdout
                .lines()
                .any(|l| l.starts_with(&format!("sandbox  {layer} "))),
            "no {layer} line:\n{r}"
        );
    }
    if root() {
        // As an ordinary user, the uid switch is impossible, and doctor says why.
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(runner_bin())
            .arg("doctor")
            .env("RUNNER_CACHE_DIR", "/tmp/runner-doctor-nobody")
            .output()
            .expect("setpriv");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("sandbox  uid       off (the runner is not root"),
            "{stdout}"
        );
    }
}
