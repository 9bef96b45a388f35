//! A cgroup per VM: QEMU (and bwrap around it) join it before they exec, so everything they
//! ever start is inside; it caps memory (guest RAM + QEMU's own), the number of tasks, and
//! weighs CPU by vCPUs. cgroup v2 where the runner's cgroup can delegate (systemd
//! `Delegate=yes`), else v1 controllers as root (hosts without a unified hierarchy). VM
//! cgroups are children of the runner's own, so they count against whatever limits the
//! operator put on the service. Removed when the VM ends.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What QEMU needs besides guest RAM (device emulation, I/O buffers, the binary itself).
/// The same figure the runner's capacity planning uses.
pub const QEMU_OVERHEAD_MIB: u64 = 256;
/// TCG's translated-code cache: QEMU sizes it at physical memory / 8, at most 1 GiB, and a
/// busy guest can fill it.
const TCG_CODE_CACHE_MAX: u64 = 1 << 30;
/// Tasks (processes and threads) one VM may have: QEMU needs a few dozen (vCPUs, RCU, an I/O
/// worker pool of up to 64), bwrap two; a fork bomb needs far more.
pub const PIDS_MAX: u64 = 512;
/// A VM cgroup is named `runner-` + the VM's id.
const PREFIX: &str = "runner-vm-";
/// How long the processes of a VM that was not stopped cleanly may take to die before its
/// cgroup is given up (it is swept at the next start).
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);
/// VM cgroups younger than this may be about to get their QEMU: the sweep spares them.
const SWEEP_MIN_AGE: Duration = Duration::from_secs(60);

/// Where VM cgroups are made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v2: children of `parent`, whose subtree has the memory and pids controllers.
    V2 { parent: PathBuf, cpu: bool },
    /// cgroup v1: a child in each controller's hierarchy.
    V1 {
        memory: PathBuf,
        pids: PathBuf,
        cpu: Option<PathBuf>,
    },
}

/// The limits of one VM's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids: u64,
    /// cgroup v2 scale (1–10000, 100 = one ordinary process); v1 shares are derived.
    pub cpu_weight: u64,
}

/// Limits for a VM with `memory_mib` of guest RAM and `cpus` vCPUs; under TCG also room for
/// the code cache, sized as QEMU sizes it from the host's memory.
pub fn limits(memory_mib: u32, cpus: u32, tcg: bool, host_memory_bytes: Option<u64>) -> Limits {
    let mib = 1u64 << 20;
    let code_cache = if tcg {
        host_memory_bytes
            .map(|m| (m / 8).min(TCG_CODE_CACHE_MAX))
            .unwrap_or(TCG_CODE_CACHE_MAX)
    } else {
        0
    };
    Limits {
        memory_bytes: (u64::from(memory_mib) + QEMU_OVERHEAD_MIB) * mib + code_cache,
        pids: PIDS_MAX,
        cpu_weight: (100 * u64::from(cpus.max(1))).min(10_000),
    }
}

/// cgroup v1's `cpu.shares` for a v2 weight (1024 shares is one ordinary process, like 100).
fn v1_shares(weight: u64) -> u64 {
    (weight * 1024 / 100).max(2)
}

/// The host's memory, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// One line of /proc/self/cgroup: "ID:CONTROLLERS:PATH".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Membership {
    controllers: Vec<String>,
    path: String,
}

fn parse_proc_cgroup(text: &str) -> Vec<Membership> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            Some(Membership {
                controllers: controllers
                    .split(',')
                    .filter(|c| !c.is_empty())
                    .map(str::to_string)
                    .collect(),
                path: path.to_string(),
            })
        })
        .collect()
}

/// A cgroup filesystem from /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    /// The path inside the hierarchy that is mounted (usually "/").
    root: String,
    mount_point: PathBuf,
    v2: bool,
    /// v1: the controllers of this hierarchy.
    options: Vec<String>,
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    text.lines()
        .filter_map(|l| {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS"
            let (left, right) = l.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let fstype = *right.first()?;
            if fstype != "cgroup" && fstype != "cgroup2" {
                return None;
            }
            Some(CgroupMount {
                root: unescape(left.get(3)?),
                mount_point: PathBuf::from(unescape(left.get(4)?)),
                v2: fstype == "cgroup2",
                options: right
                    .get(2)
                    .map(|o| o.split(',').map(str::to_string).collect())
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(c as char);
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The directory of our own cgroup on `mount`, given our `path` in that hierarchy.
fn own_dir(mount: &CgroupMount, path: &str) -> Option<PathBuf> {
    let rel = if mount.root == "/" {
        path
    } else {
        // A mount of a sub-tree (containers): our path must lie in it.
        path.strip_prefix(mount.root.as_str())?
    };
    Some(mount.mount_point.join(rel.trim_start_matches('/')))
}

/// The v1 directory of our cgroup for `controller`.
fn v1_dir(mounts: &[CgroupMount], member: &[Membership], controller: &str) -> Option<PathBuf> {
    let m = mounts
        .iter()
        .find(|m| !m.v2 && m.options.iter().any(|o| o == controller))?;
    let line = member
        .iter()
        .find(|l| l.controllers.iter().any(|c| c == controller))?;
    own_dir(m, &line.path)
}

/// Our cgroup v2 directory, when there is a unified hierarchy.
fn v2_dir(mounts: &[CgroupMount], member: &[Membership]) -> Option<PathBuf> {
    let m = mounts.iter().find(|m| m.v2)?;
    let line = member.iter().find(|l| l.controllers.is_empty())?;
    own_dir(m, &line.path)
}

fn words(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

impl Hierarchy {
    /// Finds where this process may create VM cgroups, or says why it cannot.
    pub fn detect() -> Result<Hierarchy, String> {
        let member = parse_proc_cgroup(
            &std::fs::read_to_string("/proc/self/cgroup")
                .map_err(|e| format!("cannot read /proc/self/cgroup: {e}"))?,
        );
        let mounts = parse_mountinfo(
            &std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| format!("cannot read /proc/self/mountinfo: {e}"))?,
        );
        let v2 = v2_dir(&mounts, &member);
        let v2_controllers = v2
            .as_ref()
            .map(|d| words(&d.join("cgroup.controllers")))
            .unwrap_or_default();
        let has = |c: &str| v2_controllers.iter().any(|x| x == c);
        let hierarchy = if let (Some(dir), true) = (&v2, has("memory") && has("pids")) {
            delegate_v2(dir, has("cpu"))?
        } else {
            let dir = |c| v1_dir(&mounts, &member, c);
            match (dir("memory"), dir("pids")) {
                (Some(memory), Some(pids)) => {
                    for d in [&memory, &pids] {
                        if nix::unistd::access(d, nix::unistd::AccessFlags::W_OK).is_err() {
                            return Err(format!(
                                "cgroup v1: cannot create cgroups in {} (needs root)",
                                d.display()
                            ));
                        }
                    }
                    let cpu = dir("cpu")
                        .filter(|d| nix::unistd::access(d, nix::unistd::AccessFlags::W_OK).is_ok());
                    Hierarchy::V1 { memory, pids, cpu }
                }
                _ if v2.is_some() => {
                    return Err(
                        "cgroup v2 without the memory and pids controllers here, and no v1 \
                         memory/pids hierarchies"
                            .into(),
                    )
                }
                _ => return Err("no cgroup filesystem with memory and pids controllers".into()),
            }
        };
        hierarchy.sweep();
        Ok(hierarchy)
    }

    /// The parent directories VM cgroups are made in.
    pub fn parents(&self) -> Vec<&Path> {
        match self {
            Hierarchy::V2 { parent, .. } => vec![parent],
            Hierarchy::V1 { memory, pids, cpu } => {
                let mut v = vec![memory.as_path(), pids.as_path()];
                v.extend(cpu.as_deref());
                v
            }
        }
    }

    /// One line for `runner doctor`.
    pub fn describe(&self) -> String {
        match self {
            Hierarchy::V2 { parent, cpu } => format!(
                "v2 under {} (memory, pids{})",
                parent.display(),
                if *cpu { ", cpu" } else { "" }
            ),
            Hierarchy::V1 { memory, cpu, .. } => format!(
                "v1 under {} (memory, pids{})",
                memory.display(),
                if cpu.is_some() { ", cpu" } else { "" }
            ),
        }
    }

    /// The files and values that set `limits`, per cgroup directory.
    fn settings(&self, name: &str, limits: &Limits) -> Vec<(PathBuf, Vec<(&'static str, u64)>)> {
        match self {
            Hierarchy::V2 { parent, cpu } => {
                let mut files = vec![
                    ("memory.max", limits.memory_bytes),
                    ("pids.max", limits.pids),
                ];
                if *cpu {
                    files.push(("cpu.weight", limits.cpu_weight));
                }
                vec![(parent.join(name), files)]
            }
            Hierarchy::V1 { memory, pids, cpu } => {
                let mut v = vec![
                    (
                        memory.join(name),
                        vec![("memory.limit_in_bytes", limits.memory_bytes)],
                    ),
                    (pids.join(name), vec![("pids.max", limits.pids)]),
                ];
                if let Some(cpu) = cpu {
                    v.push((
                        cpu.join(name),
                        vec![("cpu.shares", v1_shares(limits.cpu_weight))],
                    ));
                }
                v
            }
        }
    }

    /// Creates the cgroup of VM `vm_id` with `limits`.
    pub fn create(&self, vm_id: &str, limits: &Limits) -> std::io::Result<VmCgroup> {
        let name = format!("runner-{vm_id}");
        let mut cgroup = VmCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        for (dir, files) in self.settings(&name, limits) {
            std::fs::create_dir(&dir)?;
            cgroup.dirs.push(dir.clone());
            for (file, value) in files {
                let path = dir.join(file);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .and_then(|mut f| f.write_all(value.to_string().as_bytes()))
                    .map_err(|e| {
                        std::io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?;
            }
            let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes())
                .map_err(|_| std::io::ErrorKind::InvalidInput)?;
            cgroup.procs.push(procs);
        }
        Ok(cgroup)
    }

    /// Removes VM cgroups left by runners that died (empty ones; a populated one cannot be
    /// removed, and its QEMU is someone's live VM).
    fn sweep(&self) {
        for parent in self.parents() {
            let Ok(entries) = std::fs::read_dir(parent) else {
                continue;
            };
            for e in entries.flatten() {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().unwrap_or_default() > SWEEP_MIN_AGE);
                if old && e.file_name().to_string_lossy().starts_with(PREFIX) {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
    }
}

/// Makes `dir` (our own v2 cgroup) able to hold VM cgroups: its subtree needs the memory and
/// pids controllers. A cgroup with processes of its own cannot enable controllers for its
/// children (v2's "no internal processes" rule), so when this runner is the only process in
/// it — a systemd service with `Delegate=yes` — the runner first moves itself into a leaf
/// child `runner`, as systemd's delegation documentation describes.
fn delegate_v2(dir: &Path, cpu: bool) -> Result<Hierarchy, String> {
    let wanted: &[&str] = if cpu {
        &["memory", "pids", "cpu"]
    } else {
        &["memory", "pids"]
    };
    let enabled = |d: &Path| {
        let on = words(&d.join("cgroup.subtree_control"));
        wanted.iter().all(|c| on.iter().any(|o| o == c))
    };
    let enable = |d: &Path| {
        let line: Vec<String> = wanted.iter().map(|c| format!("+{c}")).collect();
        std::fs::write(d.join("cgroup.subtree_control"), line.join(" "))
    };
    if enabled(dir) || enable(dir).is_ok() {
        return Ok(Hierarchy::V2 {
            parent: dir.into(),
            cpu,
        });
    }
    let me = std::process::id().to_string();
    if words(&dir.join("cgroup.procs")) != [me] {
        return Err(format!(
            "cgroup v2: cannot enable memory and pids for child cgroups of {} (other \
             processes live in it; run the runner in a cgroup of its own, e.g. a systemd \
             service with Delegate=yes)",
            dir.display()
        ));
    }
    let leaf = dir.join("runner");
    let moved = std::fs::create_dir(&leaf)
        .or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(e),
        })
        .and_then(|_| std::fs::write(leaf.join("cgroup.procs"), "0"))
        .and_then(|_| enable(dir));
    match moved {
        Ok(()) => Ok(Hierarchy::V2 {
            parent: dir.into(),
            cpu,
        }),
        Err(e) => Err(format!(
            "cgroup v2: cannot delegate {} to VM cgroups: {e}",
            dir.display()
        )),
    }
}

/// One VM's cgroup; removed when dropped.
#[derive(Debug)]
pub struct VmCgroup {
    dirs: Vec<PathBuf>,
    /// `cgroup.procs` of each directory, ready for [`VmCgroup::join`] after fork.
    procs: Vec<CString>,
}

impl VmCgroup {
    /// The cgroup's directories (one per v1 controller, or one).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// What a child needs to join this cgroup between fork and exec.
    pub fn join_handle(&self) -> CgroupJoin {
        CgroupJoin {
            procs: self.procs.clone(),
        }
    }
}

/// The `cgroup.procs` files of one VM cgroup, prepared before fork.
#[derive(Debug, Clone)]
pub struct CgroupJoin {
    procs: Vec<CString>,
}

impl CgroupJoin {
    /// Moves the calling process into the cgroup. Called between fork and exec, so it only
    /// makes system calls (open, write, close) on strings prepared beforehand.
    pub fn join(&self) -> std::io::Result<()> {
        use std::os::fd::{FromRawFd, OwnedFd};
        for procs in &self.procs {
            let fd = nix::fcntl::open(
                procs.as_c_str(),
                nix::fcntl::OFlag::O_WRONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )?;
            // SAFETY: `open` just returned this descriptor and nothing else owns it.
            #[allow(unsafe_code)]
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // "0" is the writing process itself.
            nix::unistd::write(&fd, b"0")?;
        }
        Ok(())
    }
}

impl Drop for VmCgroup {
    fn drop(&mut self) {
        if remove(&self.dirs) {
            return;
        }
        // Still populated: the VM was dropped without being stopped and reaped (an error,
        // a cancellation), and its processes are dying from the group's SIGKILL. Make sure of
        // it, and wait for them — milliseconds, bounded — so the cgroup does not outlive the
        // runner (the sweep at the next start would get it otherwise).
        for dir in &self.dirs {
            for pid in words(&dir.join("cgroup.procs")) {
                if let Ok(pid) = pid.parse::<i32>() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        while !remove(&self.dirs) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Removes each directory that still exists; true when none is left.
fn remove(dirs: &[PathBuf]) -> bool {
    // Every directory is tried, even after one failed.
    let mut all = true;
    for d in dirs.iter().filter(|d| d.exists()) {
        all &= std::fs::remove_dir(d).is_ok();
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn memory_is_guest_ram_plus_overhead_plus_the_tcg_code_cache() {
        // (guest MiB, vCPUs, tcg, host memory, memory limit, cpu weight)
        let cases = [
            // KVM: RAM + QEMU's own.
            (1024, 2, false, Some(24 << 30), (1024 + 256) * MIB, 200),
            // TCG on a big host: the code cache's 1 GiB cap.
            (
                1024,
                2,
                true,
                Some(24 << 30),
                (1024 + 256) * MIB + (1 << 30),
                200,
            ),
            // TCG on a 4 GiB host: an eighth of it.
            (
                512,
                1,
                true,
                Some(4 << 30),
                (512 + 256) * MIB + 512 * MIB,
                100,
            ),
            // Unknown host memory: assume the cap.
            (512, 1, true, None, (512 + 256) * MIB + (1 << 30), 100),
            // Weight is capped at cgroup v2's maximum.
            (2048, 200, false, None, (2048 + 256) * MIB, 10_000),
        ];
        for (ram, cpus, tcg, host, memory, weight) in cases {
            let l = limits(ram, cpus, tcg, host);
            assert_eq!(l.memory_bytes, memory, "{ram} MiB, tcg {tcg}");
            assert_eq!(l.cpu_weight, weight, "{cpus} vCPUs");
            assert_eq!(l.pids, PIDS_MAX);
        }
        assert_eq!(v1_shares(100), 1024);
        assert_eq!(v1_shares(200), 2048);
    }

    // This host's shape: v1 controllers, an empty unified hierarchy, no systemd.
    const HYBRID_CGROUP: &str = "9:name=systemd:/\n8:pids:/\n4:memory:/process_api/b6db\n\
                                 2:cpuacct:/\n1:cpu:/\n0::/\n";
    const HYBRID_MOUNTS: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 30 0:29 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
37 30 0:33 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
39 30 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn v1_paths_follow_our_membership_per_controller() {
        let m = parse_mountinfo(HYBRID_MOUNTS);
        let c = parse_proc_cgroup(HYBRID_CGROUP);
        assert_eq!(m.len(), 4, "{m:?}");
        // (controller, our directory)
        let cases = [
            ("memory", Some("/sys/fs/cgroup/memory/process_api/b6db")),
            ("pids", Some("/sys/fs/cgroup/pids")),
            ("cpu", Some("/sys/fs/cgroup/cpu")),
            ("blkio", None),
        ];
        for (controller, want) in cases {
            assert_eq!(
                v1_dir(&m, &c, controller),
                want.map(PathBuf::from),
                "{controller}"
            );
        }
        assert_eq!(v2_dir(&m, &c), Some("/sys/fs/cgroup/unified".into()));
    }

    #[test]
    fn v2_path_of_a_systemd_service() {
        let m = parse_mountinfo(
            "35 24 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n",
        );
        let c = parse_proc_cgroup("0::/system.slice/runner.service\n");
        assert_eq!(
            v2_dir(&m, &c),
            Some("/sys/fs/cgroup/system.slice/runner.service".into())
        );
        assert_eq!(v1_dir(&m, &c, "memory"), None);
    }

    #[test]
    fn a_mounted_subtree_is_followed_and_escapes_are_decoded() {
        let m = parse_mountinfo("35 24 0:30 /ci /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw\n");
        assert_eq!(m[0].mount_point, PathBuf::from("/sys/fs/cgroup x"));
        let inside = parse_proc_cgroup("0::/ci/job\n");
        assert_eq!(v2_dir(&m, &inside), Some("/sys/fs/cgroup x/job".into()));
        // Our cgroup outside the mounted part: not reachable.
        let outside = parse_proc_cgroup("0::/other\n");
        assert_eq!(v2_dir(&m, &outside), None);
    }

    #[test]
    fn settings_per_version() {
        let l = limits(1024, 2, false, None);
        let v2 = Hierarchy::V2 {
            parent: "/cg/svc".into(),
            cpu: true,
        };
        assert_eq!(
            v2.settings("runner-vm-x", &l),
            vec![(
                PathBuf::from("/cg/svc/runner-vm-x"),
                vec![
                    ("memory.max", l.memory_bytes),
                    ("pids.max", PIDS_MAX),
                    ("cpu.weight", 200)
                ]
            )]
        );
        let v1 = Hierarchy::V1 {
            memory: "/cg/memory/a".into(),
            pids: "/cg/pids".into(),
            cpu: None,
        };
        let s = v1.settings("runner-vm-x", &l);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].0, PathBuf::from("/cg/memory/a/runner-vm-x"));
        assert_eq!(s[0].1, vec![("memory.limit_in_bytes", l.memory_bytes)]);
        assert_eq!(s[1].1, vec![("pids.max", PIDS_MAX)]);
    }
}
