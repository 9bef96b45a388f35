//! The job cgroup: a job's commands run under limits that keep the VM's own machinery alive.
//!
//! Without it, a fork bomb or a memory hog in a job starves qemu-ga; the host then sees an
//! agent that stops answering and blames the infrastructure. At VM setup (once per cold boot,
//! so saved states carry it) the host mounts cgroup v2 and makes two groups:
//! - `agent`: PID 1, qemu-ga and everything it starts outside a job (the output relay, the
//!   runner's own scripts) — a high CPU weight, protected memory, never OOM-killed;
//! - `job`: where the wrapper of each job command moves itself — `pids.max` and `memory.max`
//!   below the guest's capacity, so a job exhausts its own share, not the VM's.
//!
//! While a job's command runs, the host checks `pids.events` now and then and kills the job
//! as soon as it hits its process limit: such a job is a fork bomb or as good as one, and it
//! would otherwise run into the step's timeout. After each step the host reads the job's `pids.events` and `memory.events` with the agent's
//! file calls (no fork in the guest, so they work while the job sits at its process limit) and
//! names what happened.

use std::fmt;

/// The job cgroup (its path in the guest).
pub const JOB: &str = "/sys/fs/cgroup/job";
/// The job's event counters, read after every step.
pub const PIDS_EVENTS: &str = "/sys/fs/cgroup/job/pids.events";
pub const MEMORY_EVENTS: &str = "/sys/fs/cgroup/job/memory.events";
/// Writing "1" kills every process in the job cgroup (Linux ≥ 5.14).
pub const KILL: &str = "/sys/fs/cgroup/job/cgroup.kill";
/// Largest events file we accept from the guest (a handful of short lines).
pub const EVENTS_MAX_BYTES: usize = 4096;

/// Memory kept outside the job: the kernel, qemu-ga and the runner's housekeeping need a few
/// tens of MiB; an eighth of the guest, within these bounds, leaves them room to spare.
const RESERVE_MIN_MIB: u32 = 96;
const RESERVE_MAX_MIB: u32 = 256;
/// Processes (threads count too) per MiB of guest memory, and the cap. The kernel's own
/// `threads-max` is about 8 per MiB (16 KiB stacks); an eighth of that leaves room for the
/// agent, and 1024 in the default 1 GiB VM is far more than builds and test runners use
/// (a JVM or a parallel build: a few hundred). Lower is better against fork bombs: under TCG
/// one grows only by some 30 processes a second, and is stopped when it reaches the limit.
const PIDS_PER_MIB: u32 = 1;
const PIDS_MIN: u32 = 256;
const PIDS_MAX: u32 = 32768;
/// qemu-ga's CPU weight against the job's default 100: it answers even under a fork bomb.
const AGENT_CPU_WEIGHT: u32 = 10000;
/// Memory of the `agent` group that reclaim for the job never takes.
const AGENT_MEMORY_MIN: &str = "32M";

/// The job's limits in one VM, derived from its memory size (so the host knows them without
/// asking the guest, and a saved state keyed on memory size carries the same ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobLimits {
    pub pids_max: u32,
    pub memory_max_mib: u32,
}

impl JobLimits {
    pub fn for_memory(memory_mib: u32) -> JobLimits {
        let reserve = (memory_mib / 8).clamp(RESERVE_MIN_MIB, RESERVE_MAX_MIB);
        JobLimits {
            pids_max: memory_mib
                .saturating_mul(PIDS_PER_MIB)
                .clamp(PIDS_MIN, PIDS_MAX),
            // A tiny VM still gets a job share; the reserve then shrinks with it.
            memory_max_mib: memory_mib.saturating_sub(reserve).max(memory_mib / 2),
        }
    }

    /// The guest shell script that sets the cgroups up. It runs as a child of qemu-ga, so
    /// `$PPID` is the agent. `favordynmods` (Linux ≥ 6.0): every job command's wrapper moves
    /// itself into the job cgroup, and without it each move waits for an RCU grace period —
    /// milliseconds under TCG, and forever in a resumed riscv64 guest whose timers are broken
    /// (a step `true` hung until its timeout); forks get a little dearer instead.
    pub fn setup_script(&self) -> String {
        format!(
            r#"set -e
C=/sys/fs/cgroup
grep -q "^cgroup2 $C " /proc/mounts || mount -t cgroup2 -o favordynmods cgroup2 $C 2>/dev/null || mount -t cgroup2 cgroup2 $C
mkdir -p $C/agent {JOB}
echo 1 >$C/agent/cgroup.procs
echo $PPID >$C/agent/cgroup.procs
echo -1000 >/proc/$PPID/oom_score_adj
echo +pids >$C/cgroup.subtree_control
echo +memory >$C/cgroup.subtree_control
echo +cpu >$C/cgroup.subtree_control 2>/dev/null && echo {AGENT_CPU_WEIGHT} >$C/agent/cpu.weight || true
echo {AGENT_MEMORY_MIN} >$C/agent/memory.min
echo {pids} >{JOB}/pids.max
echo {mem}M >{JOB}/memory.max
"#,
            pids = self.pids_max,
            mem = self.memory_max_mib,
        )
    }
}

/// The job cgroup's counters that matter (both only ever grow).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobCounters {
    /// Forks refused because the job was at `pids.max`.
    pub pids_refused: u64,
    /// Processes the OOM killer killed in the job.
    pub oom_kills: u64,
}

impl JobCounters {
    /// Parses `pids.events` and `memory.events` ("key value" lines; unknown keys ignored,
    /// garbage reads as 0: the guest wrote these files, so they only ever add a message).
    pub fn parse(pids_events: &[u8], memory_events: &[u8]) -> JobCounters {
        JobCounters {
            pids_refused: pids_refused(pids_events),
            oom_kills: oom_kills(memory_events),
        }
    }

    /// What the job ran into since `before`.
    pub fn hits_since(&self, before: &JobCounters, limits: &JobLimits) -> Vec<LimitHit> {
        let mut hits = Vec::new();
        if self.pids_refused > before.pids_refused {
            hits.push(LimitHit::Processes {
                pids_max: limits.pids_max,
                refused: self.pids_refused - before.pids_refused,
            });
        }
        if self.oom_kills > before.oom_kills {
            hits.push(LimitHit::Memory {
                memory_max_mib: limits.memory_max_mib,
                killed: self.oom_kills - before.oom_kills,
            });
        }
        hits
    }
}

/// Forks refused so far, from `pids.events`.
pub fn pids_refused(pids_events: &[u8]) -> u64 {
    value_of(pids_events, "max")
}

/// OOM kills so far, from `memory.events`.
pub fn oom_kills(memory_events: &[u8]) -> u64 {
    value_of(memory_events, "oom_kill")
}

fn value_of(text: &[u8], key: &str) -> u64 {
    String::from_utf8_lossy(text)
        .lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// A limit the job ran into during a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LimitHit {
    /// The job tried to have more than `pids_max` processes; all of them were then killed.
    Processes { pids_max: u32, refused: u64 },
    /// The job ran out of memory; the kernel killed `killed` of its processes.
    Memory { memory_max_mib: u32, killed: u64 },
}

impl fmt::Display for LimitHit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LimitHit::Processes { pids_max, refused } => write!(
                f,
                "the job hit its process limit (pids.max={pids_max}; {refused} forks refused); \
                 all its processes were killed"
            ),
            LimitHit::Memory {
                memory_max_mib,
                killed,
            } => write!(
                f,
                "the job ran out of memory (memory.max={memory_max_mib} MiB); \
                 the kernel killed {killed} of its processes"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_scale_with_memory() {
        // (guest MiB, pids.max, job memory.max MiB)
        let cases = [
            // the default VM: an eighth (128 MiB) kept back
            (1024, 1024, 896),
            // small: the reserve's floor, pids' floor
            (128, 256, 64),
            (512, 512, 416),
            // large: the reserve's and pids' caps
            (8192, 8192, 7936),
            (65536, 32768, 65280),
        ];
        for (mem, pids, job_mem) in cases {
            assert_eq!(
                JobLimits::for_memory(mem),
                JobLimits {
                    pids_max: pids,
                    memory_max_mib: job_mem
                },
                "{mem} MiB"
            );
        }
    }

    #[test]
    fn setup_script_sets_the_limits() {
        let s = JobLimits::for_memory(1024).setup_script();
        assert!(s.contains("echo 1024 >/sys/fs/cgroup/job/pids.max"), "{s}");
        assert!(
            s.contains("echo 896M >/sys/fs/cgroup/job/memory.max"),
            "{s}"
        );
        // The agent leaves the root group before the controllers are enabled below it.
        assert!(s.find("$PPID >$C/agent").unwrap() < s.find("+pids").unwrap());
    }

    #[test]
    fn counters_name_what_was_hit() {
        let limits = JobLimits::for_memory(1024);
        let memory = b"low 0\nhigh 0\nmax 17\noom 1\noom_kill 2\noom_group_kill 0\n";
        let before = JobCounters::parse(b"max 0\n", b"oom_kill 0\n");
        // (pids.events, memory.events, hits)
        let cases: Vec<(&[u8], &[u8], Vec<LimitHit>)> = vec![
            // nothing new ("max" in memory.events is reclaim at the limit, not an OOM)
            (b"max 0\n", b"low 0\nmax 40\noom_kill 0\n", vec![]),
            // forks refused
            (
                b"max 5\nmax.imposed 5\n",
                b"oom_kill 0\n",
                vec![LimitHit::Processes {
                    pids_max: 1024,
                    refused: 5,
                }],
            ),
            // an OOM kill
            (
                b"max 0\n",
                memory,
                vec![LimitHit::Memory {
                    memory_max_mib: 896,
                    killed: 2,
                }],
            ),
            // garbage from the guest counts as nothing
            (b"max lots\n\xff", b"oom_kill -1", vec![]),
        ];
        for (pids, mem, want) in cases {
            let now = JobCounters::parse(pids, mem);
            assert_eq!(now.hits_since(&before, &limits), want, "{pids:?} {mem:?}");
        }
        let hit = LimitHit::Processes {
            pids_max: 1024,
            refused: 5,
        };
        assert!(hit.to_string().contains("pids.max=1024"), "{hit}");
    }
}
