//! What a job can do to its own guest — a fork bomb, running out of memory, killing the
//! agent, panicking the kernel — ends as the job's failure (exit 1) with a line that says what
//! happened, within the step's timeout; never as an infrastructure error, and with no QEMU
//! and no VM directory left behind.

use std::time::{Duration, Instant};

use e2e::{assert_nothing_left, private_cache, runner_with_cache, Run};

/// The step's timeout in every test here: a fault must end the step well before it.
const STEP_TIMEOUT: &str = "60s";

/// Runs a one-step suite with `run` as the step (a 256 MiB VM: pids.max 256, the job's
/// memory.max 160 MiB) and returns the run and its wall time; checks nothing is left.
fn run_step(run: &str) -> (Run, Duration) {
    let cache = private_cache();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runner.toml"),
        format!(
            r#"
[defaults]
memory = "256M"

[[suite]]
name = "faults"
  [[suite.step]]
  name = "fault"
  timeout = "{STEP_TIMEOUT}"
  run = '''{run}'''
"#
        ),
    )
    .unwrap();
    let started = Instant::now();
    let r = runner_with_cache(dir.path(), &["test", "--arch", "riscv64"], cache.path());
    let took = started.elapsed();
    eprintln!("{run}: {took:.1?}\n{r}");
    assert_nothing_left(cache.path());
    (r, took)
}

/// The step failed as a test (exit 1, "failed" in the summary), not as an error or timeout.
fn assert_job_failure(r: &Run, message: &str) {
    assert_eq!(r.code, 1, "{r}");
    assert!(r.stdout.contains(message), "no '{message}' in:\n{r}");
    assert!(!r.stdout.contains("error:"), "{r}");
    assert_no_step_timeout(r);
}

fn assert_no_step_timeout(r: &Run) {
    assert!(!r.stdout.contains("timed out"), "{r}");
}

#[test]
fn a_fork_bomb_fails_the_job_not_the_runner() {
    // The classic bomb (bash: dash finds its builtin `:` before the function). Its shell
    // returns at once; the sleep keeps the step running while the bomb grows in the
    // background. Before the job cgroup, the bomb starved qemu-ga: exit 71 ("agent did not
    // answer") after ~50 s. Now it hits pids.max, the whole job is killed, and the step fails.
    let (r, took) = run_step("bash -c ':(){ :|:& };:'; sleep 120");
    assert_job_failure(&r, "the job hit its process limit (pids.max=256");
    assert!(took < Duration::from_secs(120), "{took:?}");
}

#[test]
fn running_out_of_memory_fails_the_job_with_a_message() {
    // `tail` keeps the whole "line" of zeros in memory: the job's memory.max (below the
    // guest's RAM) is reached, the OOM killer kills tail inside the job, the agent lives on.
    let (r, _) = run_step("head -c 2G /dev/zero | tail");
    assert_job_failure(&r, "the job ran out of memory (memory.max=160 MiB)");
    assert!(r.stderr.contains("failed (exit 137)"), "{r}");
}

#[test]
fn killing_the_agent_fails_the_job() {
    // qemu-ga is PID 1's only child: with it, init and then the kernel go down.
    let (r, _) = run_step("echo killing; pkill -9 qemu-ga; sleep 100");
    assert_job_failure(&r, "the guest agent (qemu-ga) was killed during this step");
}

#[test]
fn a_kernel_panic_fails_the_job() {
    let (r, _) = run_step("echo c > /proc/sysrq-trigger; sleep 100");
    assert_job_failure(&r, "the guest kernel panicked during this step");
    assert!(r.stdout.contains("sysrq triggered crash"), "{r}");
}

#[test]
fn a_step_that_removes_the_job_cgroup_cannot_run_the_next_unprotected() {
    // The job is root and may undo its limits; the next step then fails to enter the cgroup
    // and says so, instead of running without limits.
    let cache = private_cache();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("runner.toml"),
        r#"
[[suite]]
name = "escape"
  [[suite.step]]
  name = "remove"
  run = """
for p in $(cat /sys/fs/cgroup/job/cgroup.procs); do echo $p >/sys/fs/cgroup/agent/cgroup.procs 2>/dev/null || true; done
rmdir /sys/fs/cgroup/job
"""
  [[suite.step]]
  name = "next"
  run = "echo should not run"
"#,
    )
    .unwrap();
    let r = runner_with_cache(dir.path(), &["test", "--arch", "riscv64"], cache.path());
    assert_eq!(r.code, 1, "{r}");
    assert!(r.stdout.contains("cannot enter the job cgroup"), "{r}");
    assert!(!r.stdout.contains("should not run"), "{r}");
    assert_nothing_left(cache.path());
}

#[test]
fn a_job_flooding_the_control_port_blocks_only_itself() {
    // The control port carries the host's wake-up line to a resumed guest's helper; the
    // host never reads it. Once the helper is gone (after a resume), a job can open the
    // port and write: its writes must block in the guest (QEMU throttles the port when the
    // host's socket is full) while the VM and the runner carry on.
    let cache = private_cache();
    let dir = tempfile::tempdir().unwrap();
    let first = runner_with_cache(
        dir.path(),
        &["test", "--arch", "riscv64", "--", "true"],
        cache.path(),
    );
    assert_eq!(first.code, 0, "{first}");
    std::fs::write(
        dir.path().join("runner.toml"),
        r#"
[[suite]]
name = "flood"
  [[suite.step]]
  name = "flood"
  timeout = "60s"
  run = '''
timeout 5 sh -c 'cat /dev/zero >/dev/virtio-ports/org.runner.control.0' && rc=0 || rc=$?
echo "flood ended $rc"
'''
  [[suite.step]]
  name = "after"
  run = "echo still here"
"#,
    )
    .unwrap();
    let r = runner_with_cache(dir.path(), &["test", "--arch", "riscv64"], cache.path());
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stderr.contains("resumed from saved state"), "{r}");
    // 124: still blocked in its write when `timeout` ended it (not refused, not finished).
    assert!(r.stdout.contains("flood ended 124"), "{r}");
    assert!(r.stdout.contains("still here"), "{r}");
    assert_nothing_left(cache.path());
}

#[test]
fn an_agent_silent_longer_than_one_status_poll_only_delays_the_step() {
    // A guest busy enough (a one-CPU mipsel image bake running dpkg on a loaded host) can
    // leave one `guest-exec-status` unanswered past its 30 s timeout; that alone once failed
    // the bake (an image-build error) or the job's step ("the guest agent stopped answering
    // during this step", exit 1 after 33 s here). Stopping qemu-ga for 40 s does the same on
    // purpose: the status poll and the process-limit check go unanswered, then the agent
    // answers again and the step ends as it would have.
    let (r, took) =
        run_step("pkill -STOP -x qemu-ga; sleep 40; pkill -CONT -x qemu-ga; echo agent back");
    assert_eq!(r.code, 0, "{r}");
    assert!(r.stdout.contains("agent back"), "{r}");
    assert_no_step_timeout(&r);
    // The silence outlasted a status poll's timeout: the case this is about did happen.
    assert!(took > Duration::from_secs(40), "{took:?}");
}
