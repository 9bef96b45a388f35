//! `--mode user` / a suite's `mode = "user"`: the steps under qemu-user on this host's kernel,
//! in a sandbox whose root is the image's files — the workspace in, JUnit and artifacts out,
//! exit status, timeouts, and what the sandbox must not let through (host files, symlinks
//! planted for the runner to follow, the network, processes outliving the run).

use std::path::Path;

use e2e::{assert_nothing_left, private_cache, processes_using, runner_with_cache};

/// `runner test --mode user --arch ARCH -- CMD...` with `cache`.
fn user_mode(cache: &Path, arch: &str, cmd: &[&str]) -> e2e::Run {
    let mut args = vec!["test", "--mode", "user", "--arch", arch, "--"];
    args.extend_from_slice(cmd);
    runner_with_cache(&e2e::workspace_root(), &args, cache)
}

#[test]
fn a_command_runs_the_images_programs_for_its_architecture_without_booting() {
    let cache = private_cache();
    for (arch, uname) in [("riscv64", "riscv64"), ("aarch64", "aarch64")] {
        let r = user_mode(
            cache.path(),
            arch,
            &[
                "sh",
                "-c",
                "echo machine=$(uname -m) arch=$RUNNER_ARCH; . /etc/os-release; echo os=$ID",
            ],
        );
        assert_eq!(r.code, 0, "{r}");
        assert!(
            r.stdout.contains(&format!("machine={uname} arch={arch}")),
            "{r}"
        );
        assert!(r.stdout.contains("os=debian"), "{r}");
        assert!(r.stderr.contains("user mode: no boot"), "{r}");
    }
    // The command's exit status is runner's, as in a VM.
    let r = user_mode(cache.path(), "riscv64", &["sh", "-c", "exit 3"]);
    assert_eq!(r.code, 3, "{r}");
    assert!(r.stderr.contains("FAILED"), "{r}");
    drop_checked(cache);
}

#[test]
fn a_20_mib_workspace_reaches_the_sandbox_byte_for_byte() {
    // Streamed in chunks into the sandbox's `cat`: every file must arrive whole.
    let cache = private_cache();
    let ws = tempfile::tempdir().unwrap();
    let want = e2e::random_workspace(ws.path(), 20, 33);
    let r = runner_with_cache(
        &e2e::workspace_root(),
        &[
            "test",
            "--mode",
            "user",
            "--arch",
            "riscv64",
            "--workspace",
            ws.path().to_str().unwrap(),
            "--",
            "sh",
            "-c",
            "find . -type f -exec sha256sum {} +",
        ],
        cache.path(),
    );
    assert_eq!(r.code, 0, "{r}");
    assert_eq!(e2e::sha256sum_lines(&r.stdout), want, "{r}");
    drop_checked(cache);
}

#[test]
fn a_suite_gets_its_workspace_in_and_results_out_but_nothing_of_the_host() {
    let cache = private_cache();
    let project = tempfile::tempdir().unwrap();
    // A host file the job must not read, directly or through a symlink the runner follows.
    // Its path exists in the job's view too (its own /tmp), with other content: a runner
    // that followed the job's symlink on the host would bring back the host's.
    let secret =
        std::path::PathBuf::from(format!("/tmp/runner-e2e-secret-{}.xml", std::process::id()));
    std::fs::write(
        &secret,
        "<testsuite name=\"host-secret-4711\" tests=\"1\"><testcase name=\"h\"/></testsuite>",
    )
    .unwrap();
    struct Remove(std::path::PathBuf);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
    let _remove = Remove(secret.clone());
    std::fs::write(project.path().join("input.txt"), "from the workspace\n").unwrap();
    let toml = format!(
        r#"
[workspace]
path = "."

[[suite]]
name = "um"
mode = "user"
junit = ["report.xml", "leak.xml"]
artifacts = ["out/*"]

  [[suite.step]]
  name = "build"
  run = """
  test "$(uname -m)" = riscv64
  mkdir -p out
  cp input.txt out/copied.txt
  printf '<testsuite name="t" tests="1"><testcase name="c"/></testsuite>' > report.xml
  ! cat {secret} 2>/dev/null
  printf '<testsuite name="inner" tests="1"><testcase name="i"/></testsuite>' > {secret}
  ln -s {secret} leak.xml
  ln -s {secret} out/leak.txt
  # No network but loopback.
  test "$(grep -c ':' /proc/net/dev)" -eq 1
  """
"#,
        secret = secret.display()
    );
    std::fs::write(project.path().join("runner.toml"), toml).unwrap();
    let junit = project.path().join("junit.xml");
    let r = runner_with_cache(
        project.path(),
        &[
            "test",
            "--arch",
            "riscv64",
            "--junit",
            junit.to_str().unwrap(),
        ],
        cache.path(),
    );
    assert_eq!(r.code, 0, "{r}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("name=\"c\"") && xml.contains("name=\"i\""),
        "{xml}"
    );
    assert!(!xml.contains("host-secret-4711"), "{xml}");
    let out = project.path().join("runner-out/um-riscv64/out");
    assert_eq!(
        std::fs::read_to_string(out.join("copied.txt")).unwrap(),
        "from the workspace\n"
    );
    let leaked = std::fs::read_to_string(out.join("leak.txt")).unwrap_or_default();
    assert!(!leaked.contains("host-secret-4711"));
    // ... and the job's write to the same path went to its own /tmp.
    assert!(std::fs::read_to_string(&secret)
        .unwrap()
        .contains("host-secret-4711"));
    drop_checked(cache);
}

#[test]
fn a_timed_out_step_ends_with_every_process_it_started() {
    let cache = private_cache();
    // A script whose name is on the command line of every process running it.
    let marker = format!("user-mode-sleeper-{}", std::process::id());
    let started = std::time::Instant::now();
    let r = runner_with_cache(
        &e2e::workspace_root(),
        &[
            "test",
            "--mode",
            "user",
            "--arch",
            "riscv64",
            "--timeout",
            "3s",
            "--",
            "sh",
            "-c",
            &format!(
                "printf 'sleep 600 & sleep 600\\n' > /tmp/{marker}; echo started; exec sh /tmp/{marker}"
            ),
        ],
        cache.path(),
    );
    assert_eq!(r.code, 124, "{r}");
    assert!(r.stdout.contains("started"), "{r}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(120),
        "took {:?}",
        started.elapsed()
    );
    let left = processes_using(&marker);
    assert!(left.is_empty(), "processes left: {left:?}");
    drop_checked(cache);
}

/// The job directories are gone once runner is.
fn drop_checked(cache: tempfile::TempDir) {
    assert_nothing_left(cache.path());
}
