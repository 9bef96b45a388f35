//! `runner test --arch ARCH -- CMD` against real VMs under QEMU: output, exit codes, timeouts,
//! and nothing left behind.

use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{
    assert_nothing_left, in_guest, private_cache, runner, runner_with_cache, workspace_root,
};

#[test]
fn riscv64_output_and_exit_code_pass_through() {
    let r = in_guest(
        "riscv64",
        &["sh", "-c", "echo hello from $(uname -m); exit 7"],
    );
    assert_eq!(r.code, 7, "{r}");
    assert!(r.stdout.contains("hello from riscv64"), "{r}");
}

#[test]
fn aarch64_uname_m() {
    let r = in_guest("aarch64", &["uname", "-m"]);
    assert_eq!(r.code, 0, "{r}");
    assert_eq!(r.stdout.trim(), "aarch64", "{r}");
}

#[test]
fn x86_64_uname_m_and_kvm_fallback_is_explained() {
    let r = in_guest("x86_64", &["uname", "-m"]);
    assert_eq!(r.code, 0, "{r}");
    assert_eq!(r.stdout.trim(), "x86_64", "{r}");
    // A host whose KVM cannot run guests (like our CI machines) must fall back to TCG and
    // say why in one line; a host with working KVM uses it.
    if r.stderr.contains("[tcg]") {
        let note = r
            .stderr
            .lines()
            .find(|l| l.contains("KVM not usable"))
            .unwrap_or_else(|| panic!("no fallback note: {r}"));
        assert!(note.contains("using TCG"), "{note}");
    } else {
        assert!(r.stderr.contains("[kvm]"), "{r}");
    }
}

#[test]
fn a_kvm_that_stops_its_guest_is_reported_at_once() {
    // Where /dev/kvm opens but cannot run a Linux guest (this project's CI hosts: nested,
    // no VMX), QEMU stops the guest with "KVM internal error" and waits, paused; runner used
    // to wait out the 120 s boot timeout. The probe refuses KVM on such hosts now, so a
    // verdict recorded in a private cache (format of engine/src/qemu/host.rs, probe 2) makes
    // runner try KVM anyway, as a wrong probe would. QEMU runs unsandboxed: the sandbox's
    // user may not open /dev/kvm at all.
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if std::env::consts::ARCH != "x86_64" || !kvm_opens {
        eprintln!("skipped: no x86_64 host with a /dev/kvm this user can open");
        return;
    }
    let cache = e2e::private_cache_with_own_states();
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    let verdict = format!(
        r#"{{"boot_id":"{}","probe":2,"unusable_because":null}}"#,
        boot_id.trim()
    );
    std::fs::write(cache.path().join("kvm-probe.json"), verdict).unwrap();
    let started = Instant::now();
    let out = Command::new(e2e::runner_bin())
        .args(["test", "--arch", "x86_64", "--", "true"])
        .current_dir(workspace_root())
        .env("RUNNER_CACHE_DIR", cache.path())
        .env("RUNNER_SANDBOX_OFF", "all")
        .output()
        .unwrap();
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("[kvm]"), "{stderr}");
    if out.status.success() {
        eprintln!("KVM works on this host: nothing to check");
        return;
    }
    assert_eq!(out.status.code(), Some(70), "{stderr}");
    assert!(
        stderr.contains("KVM could not run this guest (QEMU: KVM internal error")
            && stderr.contains("run with --accel tcg"),
        "{stderr}"
    );
    // Well before the boot timeout (120 s) that it used to wait out.
    assert!(took < Duration::from_secs(60), "{took:?}");
    assert_nothing_left(cache.path());
}

#[test]
fn timeout_kills_the_vm_and_reports_an_error() {
    let cache = private_cache();
    let (r, qemu) = e2e::runner_noting_qemu_pids(
        &[
            "test",
            "--arch",
            "riscv64",
            "--timeout",
            "25s",
            "--",
            "sh",
            "-c",
            "echo started; sleep 600",
        ],
        cache.path(),
    );
    assert_eq!(r.code, 124, "{r}");
    assert!(r.stdout.contains("started"), "{r}");
    assert!(!qemu.is_empty(), "no QEMU seen: {r}");
    // Gone the moment runner returns: exited and waited for, not a zombie left to init.
    e2e::assert_reaped(&qemu);
    assert_nothing_left(cache.path());
}

#[test]
fn ctrl_c_stops_the_vm_and_exits_130() {
    let cache = private_cache();
    // Returns once the command runs in the guest.
    let mut child = e2e::spawn_until_output(cache.path(), "started");
    let qemu = e2e::qemu_pids_using(&cache.path().display().to_string());
    assert!(!qemu.is_empty(), "QEMU should be running now");
    let status = e2e::interrupt_and_wait(&mut child);
    assert_eq!(status.code(), Some(130));
    e2e::assert_reaped(&qemu);
    assert_nothing_left(cache.path());
}

#[test]
fn command_not_found_in_the_guest() {
    let r = in_guest("riscv64", &["no-such-command-xyz", "arg"]);
    assert_eq!(r.code, 127, "{r}");
    // The guest says it as a shell would, with no wrapper of ours in it; runner explains.
    assert_eq!(r.stdout.trim(), "no-such-command-xyz: not found", "{r}");
    assert!(
        r.stderr
            .contains("`no-such-command-xyz` was not found in the guest"),
        "{r}"
    );
}

#[test]
fn a_127_inside_the_command_is_not_blamed_on_the_program() {
    // sh is there; the tool it calls is not. (Regression: "`sh` was not found".)
    let r = in_guest("riscv64", &["sh", "-c", "no-such-tool-xyz"]);
    assert_eq!(r.code, 127, "{r}");
    assert_eq!(r.stdout.trim(), "sh: 1: no-such-tool-xyz: not found", "{r}");
    assert!(!r.stderr.contains("was not found in the guest"), "{r}");
}

#[test]
fn signals_are_failures_not_success() {
    let r = in_guest("riscv64", &["sh", "-c", "kill -KILL $$"]);
    // sh reports a child killed by SIGKILL as 137 (128 + 9): never 0.
    assert_eq!(r.code, 137, "{r}");
}

#[test]
fn nothing_is_left_behind_after_a_normal_run() {
    let cache = private_cache();
    let r = runner_with_cache(
        &workspace_root(),
        &["test", "--arch", "riscv64", "--", "true"],
        cache.path(),
    );
    assert_eq!(r.code, 0, "{r}");
    assert_nothing_left(cache.path());
}

#[test]
fn resumed_vms_get_the_hosts_clock_and_their_own_randomness() {
    // Jobs resumed from one saved state must not share RNG output or a stale clock. The
    // guest's helper sets the clock itself on these three (a system call number per arch,
    // see Arch::clock_settime_nr) and reseeds on all: each arch is checked on a real guest.
    let script = "date +%s.%N; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'";
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    for arch in ["riscv64", "aarch64", "x86_64"] {
        let cache = e2e::private_cache_with_own_states();
        let run = |cmd: &[&str]| {
            let mut args = vec!["test", "--arch", arch, "--"];
            args.extend_from_slice(cmd);
            runner_with_cache(&workspace_root(), &args, cache.path())
        };
        // Boots cold and saves the state the two runs below resume.
        let warm_up = run(&["true"]);
        assert_eq!(warm_up.code, 0, "{arch}: {warm_up}");
        // Not a wait for anything: the saved guest's clock is now at least this far behind,
        // so a clock left unset shows below.
        std::thread::sleep(Duration::from_secs(3));
        let mut randoms = Vec::new();
        for _ in 0..2 {
            let before = now();
            let r = run(&["sh", "-c", script]);
            let after = now();
            assert_eq!(r.code, 0, "{arch}: {r}");
            // Two cold boots would pass the rest of this test without proving anything.
            assert_eq!(
                e2e::vm_start_kind(&r.stderr),
                Some(e2e::RESUMED),
                "{arch}: {r}"
            );
            let mut lines = r.stdout.lines();
            let guest_now: f64 = lines.next().unwrap().trim().parse().unwrap();
            // The clock is set from the host's time taken a few agent calls before the guest
            // sets it: it may be a little behind, never seconds.
            assert!(
                before - 1.5 <= guest_now && guest_now <= after + 0.5,
                "{arch}: guest clock {guest_now} outside the run's {before}..{after}"
            );
            randoms.push(lines.next().unwrap().to_string());
        }
        assert_ne!(
            randoms[0], randoms[1],
            "{arch}: two jobs read the same random bytes"
        );
        assert_nothing_left(cache.path());
    }
}

#[test]
fn cold_boot_flag_boots_the_kernel() {
    let r = runner(
        &workspace_root(),
        &[
            "test",
            "--arch",
            "riscv64",
            "--cold-boot",
            "--",
            "cat",
            "/proc/uptime",
        ],
    );
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stderr.contains("cold boot"), "{r}");
}

#[test]
fn a_killed_runner_takes_its_vm_with_it() {
    // SIGKILL gives runner no chance to clean up; its QEMU must still not outlive it.
    let cache = private_cache();
    // Returns once the command runs in the guest.
    let mut child = e2e::spawn_until_output(cache.path(), "started");
    let fragment = cache.path().display().to_string();
    assert!(
        !e2e::qemu_processes_using(&fragment).is_empty(),
        "QEMU should be running now"
    );
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !e2e::qemu_processes_using(&fragment).is_empty() {
        assert!(
            Instant::now() < deadline,
            "QEMU outlived its runner by 10 s"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn resumed_guests_keep_their_timers_on_every_arch() {
    // Regression: riscv64 guests resumed from a saved state never woke from sleep (QEMU did
    // not re-arm the Sstc timer). The second run of each arch is certainly a resumed one.
    for arch in ["riscv64", "aarch64", "x86_64"] {
        for run in 0..2 {
            let r = runner(
                &workspace_root(),
                &[
                    "test",
                    "--arch",
                    arch,
                    "--timeout",
                    "60s",
                    "--",
                    "sh",
                    "-c",
                    "sleep 1; echo slept",
                ],
            );
            assert_eq!(r.code, 0, "{arch}: {r}");
            assert_eq!(r.stdout.trim(), "slept", "{arch}: {r}");
            if run == 1 {
                // A cold boot would sleep fine: only a resumed guest tests the timers. (riscv64
                // under QEMU 10.0 loses armed timers in a save, issue 12: the runner saves
                // when they are not needed, checks each save, and re-arms them on resume.)
                assert_eq!(
                    e2e::vm_start_kind(&r.stderr),
                    Some(e2e::RESUMED),
                    "{arch}: {r}"
                );
            }
        }
    }
}

#[test]
fn a_broken_saved_state_falls_back_to_a_cold_boot_and_is_replaced() {
    let cache = e2e::private_cache_with_own_states();
    // A published state that breaks later; the fallback is the same on every arch.
    let run = |cmd: &[&str]| {
        let mut args = vec!["test", "--arch", "aarch64", "--"];
        args.extend_from_slice(cmd);
        runner_with_cache(&workspace_root(), &args, cache.path())
    };
    // 1. A cold boot saves the state.
    let first = run(&["true"]);
    assert_eq!(first.code, 0, "{first}");
    let states: Vec<_> = std::fs::read_dir(cache.path().join("states"))
        .expect("states dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(states.len(), 1, "{states:?}");
    // 2. Its RAM image gets cut short (a full disk, a crash while copying, ...).
    let ram = states[0].join("ram.bin");
    let full_size = std::fs::metadata(&ram).expect("ram.bin").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&ram)
        .and_then(|f| f.set_len(4096))
        .expect("truncate ram.bin");
    // 3. The job still runs and passes, booted cold, with one line saying why.
    let r = run(&["echo", "ran"]);
    assert_eq!(r.code, 0, "{r}");
    assert_eq!(r.stdout.trim(), "ran", "{r}");
    assert_eq!(e2e::vm_start_kind(&r.stderr), Some("cold boot"), "{r}");
    let notes: Vec<_> = r
        .stderr
        .lines()
        .filter(|l| l.contains("booted cold instead"))
        .collect();
    assert_eq!(notes.len(), 1, "{r}");
    assert!(notes[0].starts_with("runner: cannot resume from "), "{r}");
    // 4. The broken state is gone; the one saved in its place resumes.
    let size = std::fs::metadata(&ram).map(|m| m.len()).unwrap_or(0);
    assert!(size > 4096, "ram.bin is {size} bytes, was {full_size}");
    let next = run(&["true"]);
    assert_eq!(next.code, 0, "{next}");
    assert_eq!(
        e2e::vm_start_kind(&next.stderr),
        Some(e2e::RESUMED),
        "{next}"
    );
    assert_nothing_left(cache.path());
}

#[test]
fn cpus_memory_and_workspace_reach_the_guest() {
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("marker.txt"), "from the host workspace\n").unwrap();
    let r = runner(
        &workspace_root(),
        &[
            "test",
            "--arch",
            "riscv64",
            "--cpus",
            "1",
            "--memory",
            "512M",
            "--workspace",
            ws.path().to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "echo nproc=$(nproc); grep MemTotal /proc/meminfo; cat marker.txt",
        ],
    );
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stdout.contains("nproc=1\n"), "{r}");
    let kib: u64 = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal: {r}"));
    // The kernel keeps some for itself: below 512 MiB, and far above half of it.
    assert!(
        kib < 512 * 1024 && kib > 256 * 1024,
        "MemTotal {kib} kB: {r}"
    );
    assert!(r.stdout.contains("from the host workspace"), "{r}");
}

#[test]
fn a_20_mib_workspace_reaches_the_guest_byte_for_byte() {
    // Streamed in chunks through the agent (many guest-file-writes into one open file):
    // every file, at its odd size, must arrive whole.
    let ws = tempfile::tempdir().unwrap();
    let want = e2e::random_workspace(ws.path(), 20, 33);
    let r = runner(
        &workspace_root(),
        &[
            "test",
            "--arch",
            "riscv64",
            "--workspace",
            ws.path().to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "find . -type f -exec sha256sum {} +",
        ],
    );
    assert_eq!(r.code, 0, "{r}");
    assert_eq!(e2e::sha256sum_lines(&r.stdout), want, "{r}");
}

#[test]
fn doctor_into_a_pipe_closed_early_ends_quietly() {
    // `runner doctor | head -1`: the reader goes after one line. Doctor panicked on the
    // broken pipe (exit 101, a Rust backtrace on stderr) before it learnt to stop there.
    let mut child = Command::new(e2e::runner_bin())
        .arg("doctor")
        .current_dir(workspace_root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 6];
    std::io::Read::read_exact(&mut stdout, &mut first).unwrap();
    assert_eq!(&first, b"host: ");
    drop(stdout);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn doctor_lists_qemu_and_the_accelerator() {
    let r = runner(&workspace_root(), &["doctor"]);
    assert_eq!(r.code, 0, "{r}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    // (arch, a word of the facts line under it)
    let arches = [
        ("riscv64", "-M virt"),
        ("aarch64", "debian arm64"),
        ("x86_64", "-M q35"),
        ("armhf", "32-bit"),
        ("ppc64el", "only with 1 vCPU"),
        ("s390x", "big-endian"),
        ("i386", "image debian-12"),
        ("mips64el", "up to 1 vCPUs"),
        ("mipsel", "-M malta"),
    ];
    for (arch, fact) in arches {
        let i = lines
            .iter()
            .position(|l| l.starts_with(&format!("{arch} ")))
            .unwrap_or_else(|| panic!("no {arch} line: {r}"));
        // `riscv64  /usr/bin/qemu-system-riscv64 10.0.2 (sandbox: yes)`, then its facts.
        assert!(lines[i].contains(" 10."), "{}", lines[i]);
        assert!(lines[i + 1].contains(fact), "{arch}: {}", lines[i + 1]);
    }
    assert!(
        r.stdout.lines().any(
            |l| l.starts_with("kvm ") && (l.contains("usable: ") || l.contains("not usable: "))
        ),
        "{r}"
    );
}

#[test]
fn images_list_shows_the_cache_and_verify_finds_a_corrupt_copy() {
    // A private copy of the riscv64 image in a cache of its own (not `private_cache`, whose
    // images are the shared ones): the shared cache is never touched.
    let cache = tempfile::tempdir().unwrap();
    // The image of today's recipe and builder: the shared cache may also hold older ones.
    let key = runner(&workspace_root(), &["images", "key", "--arch", "riscv64"]);
    assert_eq!(key.code, 0, "{key}");
    let image = e2e::cache_dir().join("images").join(key.stdout.trim());
    assert!(
        image.is_dir(),
        "no cached riscv64 image at {} (run any riscv64 test first)",
        image.display()
    );
    let copy = cache.path().join("images").join(image.file_name().unwrap());
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    let status = Command::new("cp")
        .args(["-r", "--reflink=auto"])
        .arg(&image)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());

    let r = runner_with_cache(&workspace_root(), &["images", "list"], cache.path());
    assert_eq!(r.code, 0, "{r}");
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains(copy.to_str().unwrap()))
        .unwrap_or_else(|| panic!("the copy is not listed: {r}"));
    assert!(line.contains("riscv64") && line.contains(" ok "), "{line}");
    let r = runner_with_cache(&workspace_root(), &["images", "verify"], cache.path());
    assert_eq!(r.code, 0, "{r}");

    // One flipped byte in the kernel: verify names the image and exits 65.
    let kernel = copy.join("kernel");
    let mut bytes = std::fs::read(&kernel).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    assert!(!kernel.is_symlink());
    std::fs::write(&kernel, bytes).unwrap();
    let r = runner_with_cache(&workspace_root(), &["images", "verify"], cache.path());
    assert_eq!(r.code, 65, "{r}");
    assert!(
        r.stdout.contains("corrupt") && r.stdout.contains(copy.to_str().unwrap()),
        "{r}"
    );
}

/// Kills and reaps a child when a failed assertion unwinds past it.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_second_image_build_waits_for_the_first_and_reuses_its_image() {
    use std::io::{BufRead, BufReader, Write};
    use std::process::Stdio;
    // An empty private cache whose riscv64 build lock is held, as by a runner mid-build. The
    // lock is `flock(1)`'s, released when its `cat` reads the end of its stdin.
    let cache = tempfile::tempdir().unwrap();
    let images = cache.path().join("images");
    std::fs::create_dir_all(&images).unwrap();
    let lock = images.join(".debian-13-riscv64.lock");
    let mut holder = Command::new("flock")
        .arg("-x")
        .arg(&lock)
        .args(["-c", "echo locked; exec cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map(Reaped)
        .expect("flock(1)");
    let mut said = String::new();
    BufReader::new(holder.0.stdout.take().unwrap())
        .read_line(&mut said)
        .unwrap();
    assert_eq!(said, "locked\n");

    let mut build = Command::new(e2e::runner_bin())
        .args(["images", "build", "--arch", "riscv64"])
        .env("RUNNER_CACHE_DIR", cache.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map(Reaped)
        .expect("runner images build");
    let mut stderr = BufReader::new(build.0.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    loop {
        let line = stderr
            .next()
            .unwrap_or_else(|| panic!("ended without waiting: {seen:#?}"))
            .unwrap();
        seen.push(line.clone());
        if line.contains("waiting for another runner that is building debian-13 for riscv64") {
            break;
        }
    }

    // "The other runner" finishes: the image appears (a copy of the shared one, which has the
    // same recipe hash), then the lock is released.
    // The image of today's recipe and builder: the shared cache may also hold older ones.
    let key = runner(&workspace_root(), &["images", "key", "--arch", "riscv64"]);
    assert_eq!(key.code, 0, "{key}");
    let image = e2e::cache_dir().join("images").join(key.stdout.trim());
    assert!(
        image.is_dir(),
        "no cached riscv64 image at {} (run any riscv64 test first)",
        image.display()
    );
    let copy = images.join(image.file_name().unwrap());
    let status = Command::new("cp")
        .args(["-r", "--reflink=auto"])
        .arg(&image)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    holder.0.stdin.take().unwrap().flush().unwrap();
    assert!(holder.0.wait().unwrap().success());

    // The waiting build takes the lock, finds the image and builds nothing.
    let started = Instant::now();
    let rest: Vec<String> = stderr.map(|l| l.unwrap()).collect();
    let code = build.0.wait().unwrap().code();
    assert_eq!(code, Some(0), "{seen:#?}\n{rest:#?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    let manifest = |dir: &std::path::Path| std::fs::read(dir.join("manifest.json")).unwrap();
    assert_eq!(manifest(&copy), manifest(&image), "the image was rebuilt");
    let names: Vec<_> = std::fs::read_dir(&images)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with(".staging-")),
        "{names:?}"
    );
}
