//! Bad input gets one clear line naming the thing and what to do, a documented exit code,
//! and leaves nothing behind. Most cases fail before any VM boots; the last two need a
//! (deliberately broken) copy of a real image.

use std::path::Path;
use std::process::Command;

use e2e::{assert_nothing_left, cache_dir, runner, runner_with_cache, workspace_root};

// Exit codes, as documented in the README (runner/src/exit.rs).
const USAGE: i32 = 2;
const CONFIG: i32 = 78;
const HOST: i32 = 69;
const IMAGE: i32 = 65;
const BOOT: i32 = 70;

fn error_line(stderr: &str) -> &str {
    stderr
        .lines()
        .find(|l| l.starts_with("runner: error:"))
        .unwrap_or_else(|| panic!("no error line in:\n{stderr}"))
}

#[test]
fn malformed_suite_file_names_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runner.toml"),
        "[[suite]]\nname = \"a\"\ntimout = \"5m\"\n",
    )
    .unwrap();
    let r = runner(dir.path(), &["test", "--arch", "riscv64"]);
    assert_eq!(r.code, CONFIG, "{r}");
    let line = error_line(&r.stderr);
    assert!(
        line.contains("runner.toml:3:1") && line.contains("timout"),
        "{line}"
    );
}

#[test]
fn an_image_without_the_architecture_is_refused_with_the_alternatives() {
    let r = runner(
        &workspace_root(),
        &[
            "test",
            "--arch",
            "mipsel",
            "--image",
            "debian-13",
            "--",
            "true",
        ],
    );
    assert_eq!(r.code, CONFIG, "{r}");
    assert!(
        error_line(&r.stderr).contains(
            "image 'debian-13' is Debian trixie, which has no mipsel kernel QEMU can boot; mipsel runs on: --image debian-12"
        ),
        "{r}"
    );
    // Nothing was built or booted for it.
    assert!(!r.stderr.contains("booting"), "{r}");
}

#[test]
fn unknown_architecture() {
    let r = runner(&workspace_root(), &["test", "--arch", "mips", "--", "true"]);
    assert_eq!(r.code, CONFIG, "{r}");
    assert!(
        error_line(&r.stderr)
            .contains("unknown architecture 'mips' (supported: riscv64, aarch64, x86_64, armhf, ppc64el, s390x, i386, mips64el, mipsel)"),
        "{r}"
    );
}

#[test]
fn unknown_image() {
    let r = runner(
        &workspace_root(),
        &[
            "test",
            "--arch",
            "riscv64",
            "--image",
            "fedora-99",
            "--",
            "true",
        ],
    );
    assert_eq!(r.code, CONFIG, "{r}");
    assert!(
        error_line(&r.stderr).contains("unknown image 'fedora-99'"),
        "{r}"
    );
}

#[test]
fn kvm_demanded_for_a_foreign_guest() {
    let r = runner(
        &workspace_root(),
        &["test", "--arch", "riscv64", "--accel", "kvm", "--", "true"],
    );
    assert_eq!(r.code, HOST, "{r}");
    assert!(
        error_line(&r.stderr).contains("KVM was requested but is not usable"),
        "{r}"
    );
}

#[test]
fn missing_qemu_says_how_to_install_it() {
    let out = Command::new(e2e::runner_bin())
        .args(["test", "--arch", "riscv64", "--", "true"])
        .env("PATH", "/nonexistent")
        .env("RUNNER_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(HOST), "{stderr}");
    assert!(
        error_line(&stderr).contains("qemu-system-riscv64 not found")
            && stderr.contains("setup-host"),
        "{stderr}"
    );
}

#[test]
fn no_suite_file_and_no_command() {
    let dir = tempfile::tempdir().unwrap();
    let r = runner(dir.path(), &["test", "--arch", "riscv64"]);
    assert_eq!(r.code, CONFIG, "{r}");
    assert!(error_line(&r.stderr).contains("no runner.toml here"), "{r}");
}

#[test]
fn bad_timeout_is_a_usage_error() {
    let r = runner(
        &workspace_root(),
        &[
            "test",
            "--arch",
            "riscv64",
            "--timeout",
            "soon",
            "--",
            "true",
        ],
    );
    assert_eq!(r.code, USAGE, "{r}");
}

/// A private cache holding a hard-linked copy of the real riscv64 image, to break at will.
fn copied_image() -> (tempfile::TempDir, std::path::PathBuf) {
    // Make sure the real image exists (built on first use).
    let r = runner(&workspace_root(), &["images", "build", "--arch", "riscv64"]);
    assert_eq!(r.code, 0, "{r}");
    // The image of today's recipe and builder: the cache may also hold older ones.
    let key = runner(&workspace_root(), &["images", "key", "--arch", "riscv64"]);
    assert_eq!(key.code, 0, "{key}");
    let real = cache_dir().join("images").join(key.stdout.trim());
    assert!(real.is_dir(), "no image at {}", real.display());
    let cache = tempfile::tempdir().unwrap();
    let copy = cache.path().join("images").join(real.file_name().unwrap());
    std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
    let status = Command::new("cp")
        .arg("-al")
        .arg(&real)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    (cache, copy)
}

/// Replaces a hard-linked file by a writable copy so the original stays intact.
fn unshare(path: &Path) {
    let data = std::fs::read(path).unwrap();
    std::fs::remove_file(path).unwrap();
    std::fs::write(path, data).unwrap();
}

#[test]
fn corrupt_image_is_detected_before_boot() {
    let (cache, image) = copied_image();
    let kernel = image.join("kernel");
    unshare(&kernel);
    let mut data = std::fs::read(&kernel).unwrap();
    let mid = data.len() / 2;
    data[mid] ^= 0xff;
    std::fs::write(&kernel, data).unwrap();
    let r = runner_with_cache(
        &workspace_root(),
        &["test", "--arch", "riscv64", "--", "true"],
        cache.path(),
    );
    assert_eq!(r.code, IMAGE, "{r}");
    let line = error_line(&r.stderr);
    assert!(
        line.contains("corrupt")
            && line.contains("kernel checksum mismatch")
            && line.contains("--force"),
        "{line}"
    );
    assert_nothing_left(cache.path());
}

#[test]
fn a_guest_that_never_boots_fails_fast_with_its_console() {
    let (cache, image) = copied_image();
    // An initramfs whose /init does not exist: the kernel panics, QEMU exits (panic=-1,
    // -no-reboot), and runner must report that at once rather than wait for its deadline.
    let initrd = image.join("initrd.cpio");
    let empty = tempfile::tempdir().unwrap();
    std::fs::create_dir(empty.path().join("dev")).unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && echo dev | cpio -o -H newc --quiet",
            empty.path().display()
        ))
        .output()
        .unwrap();
    std::fs::remove_file(&initrd).unwrap();
    std::fs::write(&initrd, &out.stdout).unwrap();
    // Keep the manifest consistent so that only the boot can fail.
    let manifest_path = image.join("manifest.json");
    unshare(&manifest_path);
    let mut manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&manifest_path).unwrap()).unwrap();
    let sum = Command::new("sha256sum").arg(&initrd).output().unwrap();
    let sum = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    manifest["artifacts"]["initrd.cpio"]["sha256"] = sum.into();
    manifest["artifacts"]["initrd.cpio"]["size"] = out.stdout.len().into();
    std::fs::write(&manifest_path, manifest.to_string()).unwrap();

    let started = std::time::Instant::now();
    let r = runner_with_cache(
        &workspace_root(),
        &["test", "--arch", "riscv64", "--", "true"],
        cache.path(),
    );
    assert_eq!(r.code, BOOT, "{r}");
    assert!(
        error_line(&r.stderr).contains("QEMU exited during boot"),
        "{r}"
    );
    assert!(r.stderr.contains("guest console"), "{r}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
    assert_nothing_left(cache.path());
}

#[test]
fn interrupting_an_image_build_leaves_nothing_running_or_half_built() {
    // A fresh cache, so a real build starts (it needs the Debian mirror, as CI has).
    let cache = tempfile::tempdir().unwrap();
    let fragment = cache.path().display().to_string();
    let mut child = Command::new(e2e::runner_bin())
        .args(["images", "build", "--arch", "riscv64"])
        .env("RUNNER_CACHE_DIR", cache.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait (bounded) until the build's own tools run, then interrupt.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !e2e::processes_using(&fragment)
        .iter()
        .any(|p| p.contains("mmdebstrap"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "mmdebstrap never started"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "runner exited before building"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "runner did not stop within 20 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(code, Some(130));
    // SIGKILLed processes take a moment to die.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let left = e2e::processes_using(&fragment);
        if left.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running: {left:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let staging: Vec<_> = std::fs::read_dir(cache.path().join("images"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".staging-"))
        .collect();
    assert!(staging.is_empty(), "half-built image left: {staging:?}");
}

/// Image names and recipes come from the repository, so they are untrusted: a name that is a
/// path, or a recipe that would steer mmdebstrap, is one line on stderr and a config error,
/// and nothing is built (no staging directory, no builder process).
#[test]
fn hostile_image_names_and_recipes_build_nothing() {
    // (runner.toml's image, images/evil.toml to write, expected fragment of the error)
    let cases = [
        ("../x", "", "'../x' is not an image name"),
        ("/etc/x.toml", "", "'/etc/x.toml' is not an image name"),
        ("evil.toml", "", "'evil.toml' is not an image name"),
        (
            "evil",
            "name = 'evil'\ndistribution = \"trixie\\ndeb [trusted=yes] http://127.0.0.1:9/ x main\"\nmirror = 'http://127.0.0.1:9/debian'\n",
            "distribution 'trixie\\ndeb [trusted=yes]",
        ),
    ];
    for (image, recipe, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        let cache = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("runner.toml"),
            format!("[defaults]\nimage = {image:?}\n\n[[suite]]\nname = \"s\"\n  [[suite.step]]\n  name = \"t\"\n  run = \"true\"\n"),
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("images")).unwrap();
        std::fs::write(dir.path().join("images/evil.toml"), recipe).unwrap();
        let r = runner_with_cache(dir.path(), &["test", "--arch", "riscv64"], cache.path());
        assert_eq!(r.code, CONFIG, "{image}: {r}");
        assert!(error_line(&r.stderr).contains(want), "{image}: {r}");
        // The hostile newline is shown escaped, never as a line of its own.
        assert!(
            !r.stderr.lines().any(|l| l.trim_start().starts_with("deb ")),
            "{image}: {r}"
        );
        let staging: Vec<_> = std::fs::read_dir(cache.path().join("images"))
            .map(|d| d.flatten().map(|e| e.file_name()).collect())
            .unwrap_or_default();
        assert!(staging.is_empty(), "{image}: built something: {staging:?}");
        let procs = e2e::processes_using(&cache.path().display().to_string());
        assert!(procs.is_empty(), "{image}: {procs:?}");
    }
    // The same names on the command line are usage errors.
    let r = runner(
        &workspace_root(),
        &["test", "--arch", "riscv64", "--image", "../x", "--", "true"],
    );
    assert_eq!(r.code, USAGE, "{r}");
    assert!(
        error_line(&r.stderr).contains("--image: '../x' is not an image name"),
        "{r}"
    );
    let r = runner(
        &workspace_root(),
        &[
            "images",
            "build",
            "--arch",
            "riscv64",
            "--mirror",
            "http://x/\n[trusted=yes]",
        ],
    );
    assert_eq!(r.code, USAGE, "{r}");
    assert!(
        error_line(&r.stderr).contains("without spaces or control characters"),
        "{r}"
    );
    let r = runner(
        &workspace_root(),
        &["images", "key", "--arch", "riscv64", "/etc/x.toml"],
    );
    assert_eq!(r.code, CONFIG, "{r}");
    assert!(
        error_line(&r.stderr).contains("is not an image name"),
        "{r}"
    );
}
