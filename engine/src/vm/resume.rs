//! What a guest resumed from a saved state needs before a job's first command: the host's
//! time (its clock stopped at save time), fresh entropy (every job resumed from one state
//! starts with the same RNG state), on riscv64 timers that fire, and a job cgroup that
//! takes processes.
//!
//! The guest side is a helper process started before the state is saved, so it is saved
//! with it, blocked reading the control port (a virtio-serial port of its own, see
//! [`HELPER_PL`]). A resume writes it one line on that port ([`wake`]) the moment the state
//! is loaded — no agent call, so the helper works while the agent is still being reached —
//! and reads its one-line answer from the live-output port ([`after_restore`]): no process
//! starts after the resume. Starting one (perl) took ~0.35 s of each riscv64 resume under
//! TCG (the `guest-exec` ~0.1 s, perl's own start ~0.2 s) and seconds on mipsel; waking the
//! helper through the agent's file calls (open, write, close of a FIFO) took three agent
//! round trips more, each through agent code not yet translated after the restore.
//!
//! The host keeps its end of the control port connected from QEMU's start, before a state
//! loads: a virtio port's reader sees end-of-file while no host is connected, so a helper
//! saved with the host there must find it there when it resumes.
//!
//! The guest is trusted to answer only in the sense that a wrong answer costs the job a cold
//! boot: the answer is a status line, read with a bound, and must carry this resume's nonce.
//! Nothing the guest writes to the control port is ever read by the host.

use std::time::Duration;

use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::agent::{AgentClient, AgentError, ExecRequest};
use crate::arch::Arch;
use crate::qemu::spec::CONTROL_PORT_NAME;

/// How long the helper may take to start before a save, or to answer after a resume before
/// the state counts as broken. Starting perl under TCG on a loaded host took over 3 s on
/// mipsel; after a resume, not answering in time is how a state with dead timers shows. A
/// liveness check, so generous: a broken state costs this once, before the cold boot.
const HELPER_TIMEOUT: Duration = Duration::from_secs(15);
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long writing the wake-up line to the control socket may take (QEMU reads it at once
/// unless it is stuck: then the resume fails and the job boots cold).
const WAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The most the host keeps of the output port while it looks for the helper's line: the
/// line is short, and the guest must not make the host buffer without end.
const MAX_LINE: usize = 4096;
/// How the helper's lines start: `runner-resume NONCE STATUS`.
const TAG: &str = "runner-resume";

/// The helper, one perl process (perl-base is in Debian's Essential set, so every image has
/// it). Arguments: the control port's name, the live-output FIFO, the job cgroup's
/// `cgroup.procs`, the RNDRESEEDCRNG request number of the guest's kernel, its
/// `clock_settime` number (0: none), the nonce of its ready line. It finds the control port
/// by name in sysfs (the image's init names only the ports it waits for), opens it for
/// reading and the output FIFO read-write (so that open does not wait for the relay), says
/// it is ready, and blocks in `sysread` until a resume writes `TIMERS SEED NONCE SECS
/// NSECS\n`; then it prepares the guest, answers `runner-resume NONCE ok` (or `failed: why`)
/// and exits. One use: the state holds it waiting, each resume gets a copy. End-of-file
/// means no host is connected (it is, from before the state loads, see the module): it
/// reads again after a pause that doubles up to 1 s, so that a host that never writes costs
/// the guest next to nothing.
///
/// Re-arming the timers (TIMERS `rearm`). QEMU 10.0's RISC-V ACLINT timer migrates each
/// hart's `mtimecmp` but not the QEMU timer armed for it, and has no post-load hook to
/// re-arm it (fixed upstream after 10.0: "hw/intc: Save time_delta in RISC-V mtimer
/// VMState" and its series). A hart whose next timer event was pending at save time resumes
/// with it never firing; the guest kernel believes it programmed, so it writes `mtimecmp`
/// again only for a timer that expires *earlier* than that one, and as guest time has passed
/// it, no new timer is earlier: the hart's timers are dead (an idle hart with its tick
/// stopped escapes, as it programs a new tick when it wakes; hence the settle before a
/// save). An absolute `clock_nanosleep` to 1 ns after boot is earlier than anything: the
/// kernel programs the timer (SBI set_timer writes `mtimecmp` and arms QEMU's timer), the
/// interrupt fires at once, and the hart's timers run again. Done on each CPU (pinned with
/// `sched_setaffinity`); the syscall numbers are the generic table's (122, 115), which
/// riscv64 uses. The helper itself is woken by the agent's write, not by a timer.
///
/// Checking (TIMERS `check`). The helper moves itself into the job cgroup (as every job
/// command's wrapper does), then sleeps 1 ms pinned to each CPU in turn: not ending in time
/// is how a save with dead timers shows (a dead timer never fires, so a longer sleep proves
/// nothing more). Timers are per CPU — riscv64 states resumed with one hart's timer dead and
/// the other's fine, and a check on the good one let a job hang in its first `sleep` — and a
/// cgroup move can wait for an RCU grace period, which a guest with a dead hart never
/// finishes. TIMERS `rearm` needs no second round of sleeps: each CPU's re-arming sleep ends
/// only by that CPU's timer interrupt, so it is the same check (~20 ms less per riscv64
/// resume). TIMERS `trusted` (aarch64, x86_64, ...: their timers survive a save) skips the
/// sleeps.
///
/// Reseeding. Bytes written to /dev/urandom only reach readers at the next CRNG reseed, which
/// a resumed guest would not do for a while (its clock was stopped): write fresh bytes, then
/// force a reseed (RNDRESEEDCRNG, `_IO('R', 0x07)`: 0x5207 on x86, ARM, RISC-V and s390, with
/// a direction bit more on POWER and MIPS — with the x86 number the ioctl failed on ppc64el
/// and every resume there booted cold).
const HELPER_PL: &str = r#"
my ($name, $out, $procs, $reseed, $settime, $nonce) = @ARGV;
opendir(my $d, '/sys/devices/system/cpu') or die "cpus: $!";
my $n = grep { /^cpu[0-9]+$/ } readdir $d;
my $port;
for my $f (glob '/sys/class/virtio-ports/*/name') {
    open(my $h, '<', $f) or next;
    my $v = <$h> // '';
    chomp $v;
    $port = '/dev/' . (split m{/}, $f)[-2] if $v eq $name;
}
defined $port or die "no virtio port named $name";
open(my $in, '<', $port) or die "$port: $!";
open(my $o, '+<', $out) or die "$out: $!";
syswrite($o, "runner-resume $nonce ready\n") or die "$out: $!";
my $line = '';
my $pause = 0.01;
while (index($line, "\n") < 0) {
    my $room = 256 - length $line;
    $room > 0 or exit 1;
    my $got = sysread($in, $line, $room, length $line);
    defined $got or exit 1;
    if ($got == 0) {
        select(undef, undef, undef, $pause);
        $pause = $pause < 0.5 ? $pause * 2 : 1;
    }
}
my ($timers, $seed, $id, $secs, $nsecs) = split(' ', $line);
sub on_cpu { my $mask = pack('Q', 1 << $_[0]);
    syscall(122, 0, length $mask, $mask) == 0 or die "sched_setaffinity: $!"; }
my $ok = eval {
    if ($timers eq 'rearm') {
        my $long_ago = pack('qq', 0, 1);
        for my $cpu (0 .. $n - 1) {
            on_cpu($cpu);
            syscall(115, 1, 1, $long_ago, 0) == 0 or die "clock_nanosleep: $!";
        }
    }
    if ($settime) {
        syscall($settime, 0, pack('qq', $secs, $nsecs)) == 0 or die "clock_settime: $!";
    }
    open(my $f, '>', '/dev/urandom') or die "urandom: $!";
    syswrite($f, pack('H*', $seed)) or die "urandom: $!";
    ioctl($f, $reseed, 0) or die "RNDRESEEDCRNG: $!";
    open(my $c, '>', $procs) or die "cgroup: $!";
    syswrite($c, '0') or die "cgroup: $!";
    for my $cpu ($timers eq 'check' ? (0 .. $n - 1) : ()) {
        on_cpu($cpu);
        select(undef, undef, undef, 0.001);
    }
    1;
};
(my $why = $@) =~ s/\s+/ /g;
syswrite($o, "runner-resume $id " . ($ok ? 'ok' : "failed: $why") . "\n");
"#;

/// What [`after_restore`] does about the guest's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timers {
    /// Nothing: they survive a save (aarch64, x86_64).
    Trusted,
    /// Checks that every CPU can sleep: the check of a fresh save before it is published
    /// (only a save whose timers work unaided passes).
    Checked,
    /// Re-arms every CPU's timer (see [`HELPER_PL`]), which checks it as well: a job's
    /// resume on riscv64, in case a save with a dead timer got past the check.
    Rearmed,
}

impl Timers {
    fn word(self) -> &'static str {
        match self {
            Timers::Trusted => "trusted",
            Timers::Checked => "check",
            Timers::Rearmed => "rearm",
        }
    }
}

/// Starts the helper in a running guest about to be saved (its live-output relay running,
/// the host connected to the control port), and waits until it is ready: blocked on the
/// control port, so that the save holds it so.
pub async fn start_helper(
    agent: &mut AgentClient<UnixStream>,
    output: &mut mpsc::Receiver<Vec<u8>>,
    arch: Arch,
) -> Result<(), AgentError> {
    let nonce = hex(&rand::random::<[u8; 16]>());
    let req = ExecRequest {
        path: "/usr/bin/perl".into(),
        args: vec![
            "-e".into(),
            HELPER_PL.into(),
            CONTROL_PORT_NAME.into(),
            super::exec::OUTPUT_FIFO.into(),
            format!("{}/cgroup.procs", super::job_cgroup::JOB),
            arch.ioctl_io(b'R', 0x07).to_string(),
            arch.clock_settime_nr().unwrap_or(0).to_string(),
            nonce.clone(),
        ],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
    };
    // Its status is never collected: it ends only after a resume, in another VM.
    agent.exec(&req, AGENT_TIMEOUT).await?;
    match answer(output, &nonce, Instant::now() + HELPER_TIMEOUT).await {
        Some(status) if status == "ready" => Ok(()),
        other => Err(AgentError::Command {
            command: "start the after-resume helper".into(),
            desc: match other {
                Some(status) => status,
                None => format!("not ready within {HELPER_TIMEOUT:?}"),
            },
        }),
    }
}

/// A resumed guest's helper, woken: the nonce its answer must carry.
#[derive(Debug)]
pub struct Woken {
    nonce: String,
}

/// Wakes the helper of a guest whose state has just loaded (see the module): writes it the
/// timers' treatment, a seed, the host's time and a nonce on the control port. It works
/// while the host goes on to reach the agent; [`after_restore`] waits for its answer.
pub async fn wake(control: &mut UnixStream, timers: Timers) -> Result<Woken, AgentError> {
    let nonce = hex(&rand::random::<[u8; 16]>());
    let seed = hex(&rand::random::<[u8; 32]>());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let line = format!(
        "{} {seed} {nonce} {} {}\n",
        timers.word(),
        now.as_secs(),
        now.subsec_nanos()
    );
    match tokio::time::timeout(WAKE_TIMEOUT, control.write_all(line.as_bytes())).await {
        Ok(Ok(())) => Ok(Woken { nonce }),
        Ok(Err(e)) => Err(AgentError::Io(e)),
        Err(_) => Err(AgentError::Timeout {
            command: "wake the after-resume helper".into(),
            timeout: WAKE_TIMEOUT,
        }),
    }
}

/// Finishes preparing a guest whose helper [`wake`] woke: sets the guest clock through the
/// agent where the helper cannot, and waits for the helper's answer.
pub async fn after_restore(
    agent: &mut AgentClient<UnixStream>,
    output: &mut mpsc::Receiver<Vec<u8>>,
    woken: Woken,
    arch: Arch,
) -> Result<(), AgentError> {
    if arch.clock_settime_nr().is_none() {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        match agent
            .execute("guest-set-time", json!({ "time": now }), AGENT_TIMEOUT)
            .await
        {
            // The system clock is set before qga tries to copy it to the RTC with hwclock,
            // which the image does not ship; that part failing is harmless.
            Ok(_) => {}
            Err(AgentError::Command { desc, .. }) if desc.contains("hwclock") => {}
            Err(e) => return Err(e),
        }
    }
    // Not answering in time is how a guest with dead timers shows (see HELPER_PL); the
    // caller then discards the state and boots cold.
    match answer(output, &woken.nonce, Instant::now() + HELPER_TIMEOUT).await {
        Some(status) if status == "ok" => Ok(()),
        Some(status) => Err(AgentError::Command {
            command: "prepare the resumed guest (clock, RNG, timers)".into(),
            desc: status,
        }),
        None => Err(AgentError::Command {
            command: "check the resumed guest".into(),
            desc: format!(
                "its helper did not answer within {HELPER_TIMEOUT:?}: its timers do not fire"
            ),
        }),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The status of the helper's line for `nonce` on the live-output port (at most 200
/// characters, control characters replaced), or None if the port closed or `deadline` passed first. Other lines are
/// skipped; at most [`MAX_LINE`] bytes are held at a time.
async fn answer(
    output: &mut mpsc::Receiver<Vec<u8>>,
    nonce: &str,
    deadline: Instant,
) -> Option<String> {
    let mut pending = Vec::new();
    loop {
        match tokio::time::timeout_at(deadline, output.recv()).await {
            Ok(Some(chunk)) => pending.extend_from_slice(&chunk),
            _ => return None,
        }
        if let Some(status) = take_status(&mut pending, nonce) {
            return Some(status);
        }
        if pending.len() > MAX_LINE {
            // No newline in that much: not the helper's line; keep only what could start one.
            pending.drain(..pending.len() - MAX_LINE);
        }
    }
}

/// Takes the complete lines out of `pending`, returning the status of the first one that
/// is `runner-resume NONCE STATUS`.
fn take_status(pending: &mut Vec<u8>, nonce: &str) -> Option<String> {
    let prefix = format!("{TAG} {nonce} ");
    while let Some(end) = pending.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = pending.drain(..=end).collect();
        let line = String::from_utf8_lossy(&line[..end]);
        if let Some(status) = line.strip_prefix(&prefix) {
            // Shown to the user: no control characters from the guest reach their terminal.
            let shown = status.chars().take(200);
            return Some(
                shown
                    .map(|c| if c.is_control() { '?' } else { c })
                    .collect(),
            );
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_line_with_this_resumes_nonce_counts() {
        let mut pending = b"noise\nrunner-resume 00 ok\nrunner-resume ab fai".to_vec();
        assert_eq!(take_status(&mut pending, "ab"), None);
        // The incomplete line waits for its end.
        assert_eq!(pending, b"runner-resume ab fai");
        pending.extend_from_slice(b"led: RNDRESEEDCRNG: bad\nmore");
        assert_eq!(
            take_status(&mut pending, "ab").as_deref(),
            Some("failed: RNDRESEEDCRNG: bad")
        );
    }

    #[test]
    fn the_guests_status_reaches_the_user_without_control_characters() {
        let mut pending = b"runner-resume ab failed: \x1b]0;owned\x07 cgroup\n".to_vec();
        assert_eq!(
            take_status(&mut pending, "ab").as_deref(),
            Some("failed: ?]0;owned? cgroup")
        );
    }

    #[tokio::test]
    async fn a_flood_without_the_answer_is_bounded_and_times_out() {
        let (tx, mut rx) = mpsc::channel(4);
        let flood =
            tokio::spawn(async move { while tx.send(vec![b'x'; 64 * 1024]).await.is_ok() {} });
        let deadline = Instant::now() + Duration::from_millis(200);
        assert_eq!(answer(&mut rx, "ab", deadline).await, None);
        drop(rx);
        flood.await.unwrap();
    }

    #[tokio::test]
    async fn the_answer_may_arrive_in_pieces() {
        let (tx, mut rx) = mpsc::channel(4);
        for piece in ["runner-res", "ume ab o", "k\n"] {
            tx.send(piece.as_bytes().to_vec()).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        assert_eq!(answer(&mut rx, "ab", deadline).await.as_deref(), Some("ok"));
    }
}
