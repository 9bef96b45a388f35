//! Failure snapshots on a real riscv64 VM: `runner test --keep-failed` (here through the
//! suite's `keep_failed`) saves the VM of the step that failed, and `runner debug DIR`
//! resumes it with the step's files, background processes, environment and directory;
//! a snapshot that does not fit this host is refused in one line.

use e2e::{assert_nothing_left, private_cache, runner_with_cache};

const SUITE: &str = r#"
[[suite]]
name = "snap"
arch = ["riscv64"]
keep_failed = true
env = { SUITE_VAR = "from-the-suite" }

  [[suite.step]]
  name = "prepare"
  run = "echo prepared"

  [[suite.step]]
  name = "break"
  env = { STEP_VAR = "from-the-step" }
  run = """
echo evidence-of-the-failure > evidence.txt
sleep 1000 >/dev/null 2>&1 &
echo $! > sleeper.pid
exit 3
"""

  [[suite.step]]
  name = "never"
  run = "echo should-not-run > never.txt"
"#;

/// What `runner debug --command` runs in the resumed guest.
const LOOK: &str = r#"cat evidence.txt; echo "cwd=$(pwd)"; echo "step=$STEP_VAR suite=$SUITE_VAR runner_step=$RUNNER_STEP"
pid=$(cat sleeper.pid); kill -0 "$pid" && echo "sleeper $(cat /proc/$pid/comm) alive"
test -e never.txt && echo never-ran-wrongly; exit 7"#;

#[test]
fn a_failed_step_is_saved_and_resumed_with_its_files_processes_env_and_cwd() {
    let cache = private_cache();
    let project = tempfile::tempdir().expect("tempdir");
    std::fs::write(project.path().join("runner.toml"), SUITE).expect("runner.toml");

    let run = runner_with_cache(project.path(), &["test", "--arch", "riscv64"], cache.path());
    assert_eq!(run.code, 1, "{run}");
    assert!(
        run.stderr.contains("saved the failed VM (step 'break')"),
        "{run}"
    );
    let dir = project.path().join("runner-out/snap-riscv64/failed-vm");
    for f in ["snapshot.toml", "ram.bin", "disk.qcow2", "meta.json"] {
        assert!(
            dir.join(f).is_file(),
            "{f} missing in {}\n{run}",
            dir.display()
        );
    }
    // The saved disk needs nothing but the image: not the layer of the boot state this
    // VM was resumed from, which went with the VM.
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(dir.join("disk.qcow2"))
        .output()
        .expect("qemu-img info");
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("/images/debian-13-riscv64-") && info.contains("/rootfs.qcow2\""),
        "{info}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "the snapshot holds the job's secrets");
    let manifest = std::fs::read_to_string(dir.join("snapshot.toml")).expect("manifest");
    assert!(manifest.contains("step = \"break\""), "{manifest}");
    assert!(
        manifest.contains("STEP_VAR = \"from-the-step\""),
        "{manifest}"
    );
    eprintln!(
        "snapshot: {}",
        run.stderr
            .lines()
            .find(|l| l.contains("saved the failed VM"))
            .unwrap_or_default()
    );

    let dir_arg = dir.to_str().expect("utf-8 path");
    let debug = runner_with_cache(
        project.path(),
        &["debug", dir_arg, "--command", LOOK],
        cache.path(),
    );
    assert_eq!(debug.code, 7, "the command's own status: {debug}");
    for want in [
        "evidence-of-the-failure",
        "cwd=/workspace",
        "step=from-the-step suite=from-the-suite runner_step=break",
        "sleeper sleep alive",
    ] {
        assert!(debug.stdout.contains(want), "{want}: {debug}");
    }
    assert!(!debug.stdout.contains("never-ran-wrongly"), "{debug}");
    eprintln!(
        "debug: {}",
        debug
            .stderr
            .lines()
            .find(|l| l.contains("resumed the failed VM"))
            .unwrap_or_default()
    );

    // A snapshot this host cannot resume: refused in one line naming the difference and
    // how to get what fits, before any VM starts.
    let original = manifest.clone();
    let edit = |from: &str, to: &str| {
        assert!(original.contains(from), "{from} in {original}");
        std::fs::write(dir.join("snapshot.toml"), original.replace(from, to)).expect("write");
    };
    let key_line = original
        .lines()
        .find(|l| l.starts_with("image_key = "))
        .expect("image_key");
    edit(
        key_line,
        "image_key = \"debian-13-riscv64-00000000deadbeef\"",
    );
    let refused = runner_with_cache(project.path(), &["debug", dir_arg], cache.path());
    assert_eq!(refused.code, 65, "{refused}");
    let line = refused.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{refused}");
    assert!(
        line.contains("needs image debian-13-riscv64-00000000deadbeef")
            && line.contains("runner images build --arch riscv64 debian-13"),
        "{refused}"
    );
    let qemu_line = original
        .lines()
        .find(|l| l.starts_with("qemu_version = "))
        .expect("qemu_version");
    edit(qemu_line, "qemu_version = \"9.2.0\"");
    let refused = runner_with_cache(project.path(), &["debug", dir_arg], cache.path());
    assert_eq!(refused.code, 69, "{refused}");
    assert!(
        refused
            .stderr
            .contains("saved by QEMU 9.2.0, but this host has QEMU"),
        "{refused}"
    );
    edit("version = 1\n", "version = 1\nsurprise = true\n");
    let refused = runner_with_cache(project.path(), &["debug", dir_arg], cache.path());
    assert_eq!(refused.code, 78, "{refused}");
    assert!(refused.stderr.contains("unknown field"), "{refused}");
    assert_nothing_left(cache.path());
}

#[test]
fn a_directory_that_is_no_snapshot_is_refused_in_one_line_without_a_vm() {
    let cache = private_cache();
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("utf-8");
    let run = runner_with_cache(dir.path(), &["debug", d], cache.path());
    assert_eq!(run.code, 78, "{run}");
    assert!(
        run.stderr.contains("snapshot.toml cannot be read")
            && run.stderr.contains("runner test --keep-failed"),
        "{run}"
    );
    assert_eq!(run.stderr.trim().lines().count(), 1, "{run}");
    // A manifest, but no saved VM beside it.
    let manifest = "version = 1\narch = \"riscv64\"\nimage = \"debian-13\"\nimage_key = \"debian-13-riscv64-0123456789abcdef\"\nrootfs_sha256 = \"".to_string()
        + &"ab".repeat(32)
        + "\"\nqemu_version = \"10.0.2\"\naccel = \"tcg\"\ncpus = 2\nmemory_mib = 1024\nstate_format = 5\nsuite = \"s\"\nstep = \"t\"\ncwd = \"/workspace\"\nsaved_at_unix = 0\n[env]\n";
    std::fs::write(dir.path().join("snapshot.toml"), manifest).expect("write");
    let run = runner_with_cache(dir.path(), &["debug", d], cache.path());
    assert_eq!(run.code, 78, "{run}");
    assert!(run.stderr.contains("no complete saved VM"), "{run}");
    assert_nothing_left(cache.path());
}

#[test]
fn pack_makes_an_archive_that_unpacks_where_its_printed_commands_say() {
    // No VM: the manifest and state files are what --pack checks and carries.
    let cache = private_cache();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path().join("runner-out/unit-riscv64/failed-vm");
    std::fs::create_dir_all(&dir).expect("dir");
    let manifest = "version = 1\narch = \"riscv64\"\nimage = \"debian-13\"\nimage_key = \"debian-13-riscv64-0123456789abcdef\"\nrootfs_sha256 = \"".to_string()
        + &"ab".repeat(32)
        + "\"\nqemu_version = \"10.0.2\"\naccel = \"tcg\"\ncpus = 2\nmemory_mib = 1024\nstate_format = 5\nsuite = \"unit\"\nstep = \"check\"\ncwd = \"/workspace\"\nsaved_at_unix = 0\n[env]\n";
    std::fs::write(dir.join("snapshot.toml"), manifest).expect("manifest");
    for f in ["ram.bin", "disk.qcow2", "meta.json"] {
        std::fs::write(dir.join(f), f).expect("state file");
    }
    std::fs::create_dir(work.path().join("packed")).expect("packed");
    let run = runner_with_cache(
        work.path(),
        &[
            "debug",
            "runner-out/unit-riscv64/failed-vm",
            "--pack",
            "packed/unit-riscv64.tar.gz",
            "--fetch",
            "gh run download 1234 -R octo/demo -n runner-failed-vm-riscv64",
        ],
        cache.path(),
    );
    assert_eq!(run.code, 0, "{run}");
    let md = &run.stdout;
    assert!(
        md.starts_with("### Failed VM saved: suite `unit` on riscv64, step `check`"),
        "{md}"
    );
    assert!(md.contains("secrets included"), "{md}");
    let commands = "```sh\ngh run download 1234 -R octo/demo -n runner-failed-vm-riscv64\nmkdir -p unit-riscv64 && tar -xzf unit-riscv64.tar.gz -C unit-riscv64\nrunner images build --arch riscv64 debian-13\nrunner debug unit-riscv64/failed-vm\n```\n";
    assert!(md.ends_with(commands), "{md}");
    use std::os::unix::fs::PermissionsExt;
    let archive = work.path().join("packed/unit-riscv64.tar.gz");
    let mode = std::fs::metadata(&archive)
        .expect("archive")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "the archive holds the job's secrets");
    // Where the download puts it, the printed unpack command gives runner debug its DIR.
    let unpack = md
        .lines()
        .find(|l| l.starts_with("mkdir -p"))
        .expect("unpack line");
    let ok = std::process::Command::new("sh")
        .args(["-c", unpack])
        .current_dir(work.path().join("packed"))
        .status()
        .expect("sh")
        .success();
    assert!(ok);
    let unpacked = work.path().join("packed/unit-riscv64/failed-vm");
    assert_eq!(
        std::fs::read_to_string(unpacked.join("meta.json")).expect("meta.json"),
        "meta.json"
    );
    // Not a snapshot, or a name without .tar.gz: refused in one line.
    let bad = runner_with_cache(
        work.path(),
        &["debug", "packed", "--pack", "x.tar.gz"],
        cache.path(),
    );
    assert_eq!(bad.code, 78, "{bad}");
    assert!(bad.stderr.contains("snapshot.toml cannot be read"), "{bad}");
    let bad = runner_with_cache(
        work.path(),
        &[
            "debug",
            "runner-out/unit-riscv64/failed-vm",
            "--pack",
            "x.zip",
        ],
        cache.path(),
    );
    assert_eq!(bad.code, 2, "{bad}");
    assert!(bad.stderr.contains("name the archive NAME.tar.gz"), "{bad}");
}
