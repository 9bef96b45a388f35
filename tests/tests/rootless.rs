//! The core of runner used by an ordinary user, no root and no sudo: an image build in the
//! user's own cache, a suite with JUnit, a timeout (124) and Ctrl-C (130), all riscv64.
//!
//! Run only when `RUNNER_ROOTLESS_E2E=1`, which `scripts/test` sets when it runs this file as
//! its unprivileged user (`runner-ci`, with its own HOME and cache); otherwise every test
//! prints that it was skipped. Self-contained on purpose: the user may not be able to read
//! the checkout, so the suites are written into temporary directories and the binary comes
//! from `RUNNER_BIN`.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use e2e::{assert_nothing_left, cache_dir, runner_with_cache, Run};

const ENABLE: &str = "RUNNER_ROOTLESS_E2E";

/// Whether to run; says so on stderr when not. Refuses to run as root: the point is that
/// nothing here needs it.
fn enabled(test: &str) -> bool {
    if std::env::var_os(ENABLE).is_none_or(|v| v != "1") {
        eprintln!("SKIPPED rootless::{test}: set {ENABLE}=1 and run as an unprivileged user (scripts/test does)");
        return false;
    }
    assert_ne!(
        nix_uid(),
        0,
        "{ENABLE}=1 but running as root: these tests must prove runner works without it"
    );
    true
}

fn nix_uid() -> u32 {
    std::fs::metadata("/proc/self").expect("/proc/self").uid()
}

fn nix_gid() -> u32 {
    std::fs::metadata("/proc/self").expect("/proc/self").gid()
}

/// `runner images build --arch riscv64` in this user's cache, once per test binary; every
/// other test needs its image.
fn build_image() -> &'static Run {
    static BUILD: OnceLock<Run> = OnceLock::new();
    BUILD.get_or_init(|| {
        runner_with_cache(
            &scratch(),
            &["images", "build", "--arch", "riscv64"],
            &cache_dir(),
        )
    })
}

/// An empty working directory of this test binary's own (a shared one like /tmp could hold
/// someone else's `images/`).
fn scratch() -> PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tempdir"))
        .path()
        .to_path_buf()
}

fn image_dir() -> PathBuf {
    let key = runner_with_cache(
        &scratch(),
        &["images", "key", "--arch", "riscv64"],
        &cache_dir(),
    );
    assert_eq!(key.code, 0, "{key}");
    cache_dir().join("images").join(key.stdout.trim())
}

#[test]
fn image_builds_without_root_and_its_files_keep_their_owners() {
    if !enabled("image_builds_without_root_and_its_files_keep_their_owners") {
        return;
    }
    let build = build_image();
    assert_eq!(build.code, 0, "{build}");
    let dir = image_dir();
    let meta = std::fs::metadata(dir.join("rootfs.qcow2")).expect("built image");
    assert_eq!(
        meta.uid(),
        nix_uid(),
        "built by this user, in its own cache"
    );

    let list = runner_with_cache(&scratch(), &["images", "list"], &cache_dir());
    assert_eq!(list.code, 0, "{list}");
    assert!(
        list.stdout.contains("debian-13") && list.stdout.contains("ok"),
        "{list}"
    );
    let verify = runner_with_cache(&scratch(), &["images", "verify"], &cache_dir());
    assert_eq!(verify.code, 0, "{verify}");

    // Inside the guest, files are owned as the packages say, not by the user who built it.
    let script = format!(
        "stat -c '%n %U:%G %a' /etc/passwd /usr/sbin/unix_chkpwd /usr/bin/su /workspace /usr/lib/modules; \
         echo foreign: $(find / -xdev \\( -uid {uid} -o -gid {gid} \\) | head -n 5)",
        uid = nix_uid(),
        gid = nix_gid()
    );
    let r = runner_with_cache(
        &scratch(),
        &["test", "--arch", "riscv64", "--", "sh", "-c", &script],
        &cache_dir(),
    );
    assert_eq!(r.code, 0, "{r}");
    for want in [
        "/etc/passwd root:root 644",
        "/usr/sbin/unix_chkpwd root:shadow 2755",
        "/usr/bin/su root:root 4755",
        "/workspace root:root 755",
        "/usr/lib/modules root:root 755",
    ] {
        assert!(r.stdout.contains(want), "{want}\n{r}");
    }
    let foreign = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("foreign:"))
        .unwrap_or_else(|| panic!("no find output\n{r}"));
    assert_eq!(
        foreign.trim(),
        "",
        "files owned by the building user leaked into the image"
    );
}

#[test]
fn a_suite_with_junit_runs_as_a_plain_user() {
    if !enabled("a_suite_with_junit_runs_as_a_plain_user") {
        return;
    }
    assert_eq!(build_image().code, 0, "{}", build_image());
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runner.toml"),
        r#"
[defaults]
arch = ["riscv64"]

[[suite]]
name = "plain"
junit = ["out/*.xml"]

  [[suite.step]]
  name = "whoami"
  run = """
test "$(id -u)" = 0
mkdir -p out
printf '<testsuite name="t" tests="1"><testcase classname="t" name="guest-ok"/></testsuite>' > out/t.xml
"""
"#,
    )
    .unwrap();
    let junit = dir.path().join("report.xml");
    let cache = private_cache_of(&cache_dir());
    let r = runner_with_cache(
        dir.path(),
        &["test", "--junit", junit.to_str().unwrap()],
        cache.path(),
    );
    assert_eq!(r.code, 0, "{r}");
    let xml = std::fs::read_to_string(&junit).expect("JUnit report");
    assert!(xml.contains("guest-ok") && xml.contains("whoami"), "{xml}");
    assert_nothing_left(cache.path());
}

#[test]
fn a_timeout_exits_124_as_a_plain_user() {
    if !enabled("a_timeout_exits_124_as_a_plain_user") {
        return;
    }
    assert_eq!(build_image().code, 0, "{}", build_image());
    // A step's own timeout starts with the step, so a slow first boot (no saved state yet in
    // this user's cache) does not decide the outcome.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runner.toml"),
        "[defaults]\narch = [\"riscv64\"]\n\n[[suite]]\nname = \"slow\"\n  [[suite.step]]\n  name = \"sleeps\"\n  timeout = \"10s\"\n  run = \"echo started; sleep 600\"\n",
    )
    .unwrap();
    let cache = private_cache_of(&cache_dir());
    let r = runner_with_cache(dir.path(), &["test"], cache.path());
    assert_eq!(r.code, 124, "{r}");
    assert!(
        r.stdout.contains("started") || r.stderr.contains("started"),
        "{r}"
    );
    assert_nothing_left(cache.path());
}

#[test]
fn ctrl_c_exits_130_as_a_plain_user() {
    if !enabled("ctrl_c_exits_130_as_a_plain_user") {
        return;
    }
    assert_eq!(build_image().code, 0, "{}", build_image());
    let cache = private_cache_of(&cache_dir());
    let mut child = e2e::spawn_until_output(cache.path(), "started");
    let status = e2e::interrupt_and_wait(&mut child);
    assert_eq!(status.code(), Some(130));
    assert_nothing_left(cache.path());
}

/// A cache of this user's own that shares `shared`'s images but has its own VM dirs.
fn private_cache_of(shared: &Path) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("runner-rootless-")
        .tempdir()
        .expect("tempdir");
    for sub in ["images", "states"] {
        std::fs::create_dir_all(shared.join(sub)).expect("cache dir");
        std::os::unix::fs::symlink(shared.join(sub), dir.path().join(sub)).expect("symlink");
    }
    dir
}
