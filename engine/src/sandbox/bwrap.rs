//! The bubblewrap command line around one QEMU: a mount namespace that shows the system's
//! programs and libraries read-only, the VM's own files and nothing else, plus fresh PID,
//! IPC, UTS, network and cgroup namespaces. When the runner is root, `setpriv` inside the
//! sandbox switches to the unprivileged VM user before QEMU starts (QEMU's own
//! `-run-with user=` cannot be used: it drops privileges after `-sandbox
//! elevateprivileges=deny` is in force, and seccomp then kills it).
//!
//! Everything here is a pure function of its inputs; what the host looks like (which of
//! `/lib`, `/lib64`, … are symlinks) is read once by [`system_mounts`].

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use super::VmUser;

/// Where `setpriv` (util-linux, Essential in Debian) lives; it must be inside `/usr`.
pub const SETPRIV: &str = "/usr/bin/setpriv";

/// How a top-level system path appears in the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SystemMount {
    /// A directory, bound read-only.
    Dir(PathBuf),
    /// A symlink (merged-/usr hosts: `/lib -> usr/lib`), recreated as it is.
    Symlink { path: PathBuf, target: PathBuf },
    /// A single file, bound read-only (the dynamic loader's cache).
    File(PathBuf),
}

/// The system paths QEMU needs: `/usr` (binaries, libraries, firmware under `/usr/share`),
/// the top-level library and binary directories however this host lays them out, and
/// `/etc/ld.so.cache`. Nothing else of `/etc`: it holds the service's config and keys.
pub fn system_mounts() -> Vec<SystemMount> {
    let mut mounts = vec![SystemMount::Dir("/usr".into())];
    for top in ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"] {
        let path = PathBuf::from(top);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => {
                if let Ok(target) = std::fs::read_link(&path) {
                    mounts.push(SystemMount::Symlink { path, target });
                }
            }
            Ok(m) if m.is_dir() => mounts.push(SystemMount::Dir(path)),
            _ => {}
        }
    }
    if Path::new("/etc/ld.so.cache").is_file() {
        mounts.push(SystemMount::File("/etc/ld.so.cache".into()));
    }
    mounts
}

/// What one QEMU may see and be.
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub system: Vec<SystemMount>,
    /// Bound read-write: the VM directory (overlay, sockets), a baking image.
    pub writable: Vec<PathBuf>,
    /// Bound read-only, after the writable ones (so a file inside the VM directory, such as
    /// a pinned saved state, stays read-only even though its directory is writable).
    pub read_only: Vec<PathBuf>,
    /// Device nodes passed through (`/dev/kvm`).
    pub devices: Vec<PathBuf>,
    /// Switch to this user before QEMU starts (the runner is root).
    pub user: Option<VmUser>,
    /// Supplementary groups for `user` (the group owning `/dev/kvm`).
    pub groups: Vec<u32>,
    /// The runner is root: bwrap needs no user namespace, and must not create one (the VM
    /// user's real uid would not be mapped in it).
    pub privileged: bool,
    /// Keep the host's network namespace (guest network `full`).
    pub host_network: bool,
}

fn os(s: &str) -> OsString {
    s.into()
}

/// The full command: `bwrap [sandbox options] -- [setpriv …] QEMU ARGS`.
pub fn command(sb: &Sandbox, bwrap: &Path, qemu: &Path, qemu_args: &[OsString]) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![bwrap.into()];
    // Namespaces: no network (unless the guest's is `full`: slirp then needs the host's;
    // `proxy` goes through a UNIX socket), its own PIDs (it cannot see or ptrace other VMs,
    // which run as the same user), IPC, hostname and cgroup view.
    for flag in [
        "--unshare-pid",
        "--unshare-ipc",
        "--unshare-net",
        "--unshare-uts",
        "--unshare-cgroup-try",
    ] {
        if flag == "--unshare-net" && sb.host_network {
            continue;
        }
        a.push(os(flag));
    }
    if !sb.privileged {
        // Not root: bwrap needs a user namespace; QEMU inside must not make further ones.
        a.extend([os("--unshare-user"), os("--disable-userns")]);
    }
    // QEMU must die with bwrap, which dies with the runner (PDEATHSIG). Not `--as-pid-1`:
    // the kernel clears a process's parent-death signal when its uid changes (setpriv), so
    // it is bwrap's own PID 1 whose death (it keeps the signal) takes QEMU with it.
    a.push(os("--die-with-parent"));
    if sb.privileged {
        // Root keeps all capabilities in the sandbox unless told otherwise: keep only what
        // setpriv needs to switch users (a uid change from 0 then clears them all).
        a.extend([os("--cap-drop"), os("ALL")]);
        if sb.user.is_some() {
            a.extend([os("--cap-add"), os("CAP_SETUID")]);
            a.extend([os("--cap-add"), os("CAP_SETGID")]);
        }
    }
    for m in &sb.system {
        match m {
            SystemMount::Dir(p) | SystemMount::File(p) => {
                a.extend([os("--ro-bind"), p.into(), p.into()]);
            }
            SystemMount::Symlink { path, target } => {
                a.extend([os("--symlink"), target.into(), path.into()]);
            }
        }
    }
    // QEMU installed outside /usr (a source build under /opt): its prefix, read-only.
    if let Some(prefix) = qemu_prefix(qemu) {
        a.extend([os("--ro-bind"), prefix.clone().into(), prefix.into()]);
    }
    a.extend([os("--proc"), os("/proc"), os("--dev"), os("/dev")]);
    for d in &sb.devices {
        a.extend([os("--dev-bind"), d.into(), d.into()]);
    }
    // bwrap creates missing mount points with restrictive modes; the VM user must be able
    // to walk down to its files, so every parent is created explicitly, 0755.
    for dir in parents_to_create(sb) {
        a.extend([os("--perms"), os("0755"), os("--dir"), dir.into()]);
    }
    for p in &sb.writable {
        a.extend([os("--bind"), p.into(), p.into()]);
    }
    for p in &sb.read_only {
        a.extend([os("--ro-bind"), p.into(), p.into()]);
    }
    a.push(os("--"));
    if let Some(user) = sb.user {
        a.push(os(SETPRIV));
        a.push(format!("--reuid={}", user.uid).into());
        a.push(format!("--regid={}", user.gid).into());
        if sb.groups.is_empty() {
            a.push(os("--clear-groups"));
        } else {
            let list: Vec<String> = sb.groups.iter().map(u32::to_string).collect();
            a.push(format!("--groups={}", list.join(",")).into());
        }
        a.extend([os("--no-new-privs"), os("--")]);
    }
    a.push(qemu.into());
    a.extend(qemu_args.iter().cloned());
    a
}

/// The install prefix of a QEMU binary outside `/usr` (`/opt/qemu` for
/// `/opt/qemu/bin/qemu-system-riscv64`), which holds its firmware too.
fn qemu_prefix(qemu: &Path) -> Option<PathBuf> {
    if qemu.starts_with("/usr") {
        return None;
    }
    let bin = qemu.parent()?;
    let prefix = if bin.file_name().is_some_and(|n| n == "bin") {
        bin.parent()?
    } else {
        bin
    };
    (prefix != Path::new("/")).then(|| prefix.to_path_buf())
}

/// Every ancestor of a bound path that is not itself bound or under a bound path, shallowest
/// first (what `--dir` must create before the binds).
fn parents_to_create(sb: &Sandbox) -> Vec<PathBuf> {
    let mut bound: Vec<&Path> = sb.writable.iter().map(PathBuf::as_path).collect();
    bound.extend(sb.read_only.iter().map(PathBuf::as_path));
    bound.extend(sb.devices.iter().map(PathBuf::as_path));
    let system: Vec<&Path> = sb
        .system
        .iter()
        .map(|m| match m {
            SystemMount::Dir(p) | SystemMount::File(p) => p.as_path(),
            SystemMount::Symlink { path, .. } => path.as_path(),
        })
        .chain([Path::new("/proc"), Path::new("/dev")])
        .collect();
    let covered = |dir: &Path| {
        bound
            .iter()
            .chain(system.iter())
            .any(|b| dir.starts_with(b))
    };
    let mut dirs = BTreeSet::new();
    for p in &bound {
        for anc in p.ancestors().skip(1) {
            if anc == Path::new("/") || anc.as_os_str().is_empty() || covered(anc) {
                continue;
            }
            dirs.insert(anc.to_path_buf());
        }
    }
    let mut dirs: Vec<PathBuf> = dirs.into_iter().collect();
    dirs.sort_by_key(|d| d.components().count());
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sandbox(privileged: bool, user: Option<VmUser>) -> Sandbox {
        Sandbox {
            system: vec![
                SystemMount::Dir("/usr".into()),
                SystemMount::Symlink {
                    path: "/lib".into(),
                    target: "usr/lib".into(),
                },
                SystemMount::File("/etc/ld.so.cache".into()),
            ],
            writable: vec!["/root/.cache/runner/vms/vm-abc".into()],
            read_only: vec![
                "/root/.cache/runner/images/deb/kernel".into(),
                "/root/.cache/runner/vms/vm-abc/state-ram.bin".into(),
            ],
            devices: vec![],
            user,
            groups: vec![],
            privileged,
            host_network: false,
        }
    }

    fn text(a: &[OsString]) -> String {
        a.iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn build(sb: &Sandbox) -> String {
        text(&command(
            sb,
            Path::new("/usr/bin/bwrap"),
            Path::new("/usr/bin/qemu-system-riscv64"),
            &[os("-nodefaults"), os("-m"), os("1024M")],
        ))
    }

    const USER: VmUser = VmUser { uid: 999, gid: 995 };

    #[test]
    fn only_a_full_network_guest_keeps_the_host_network() {
        let qemu = Path::new("/usr/bin/qemu-system-riscv64");
        let joined = |sb: &Sandbox| {
            command(sb, Path::new("/usr/bin/bwrap"), qemu, &[])
                .iter()
                .map(|s| s.to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut sb = sandbox(false, None);
        assert!(joined(&sb).contains("--unshare-net"));
        sb.host_network = true;
        let s = joined(&sb);
        assert!(
            !s.contains("--unshare-net") && s.contains("--unshare-pid"),
            "{s}"
        );
    }

    #[test]
    fn root_drops_to_the_vm_user_inside_a_privileged_sandbox() {
        let s = build(&sandbox(true, Some(USER)));
        assert!(s.starts_with("/usr/bin/bwrap --unshare-pid"), "{s}");
        // bwrap's PID 1 must stay: QEMU's own parent-death signal is gone after setpriv.
        assert!(!s.contains("--as-pid-1"), "{s}");
        // No user namespace: the real uid 999 must exist outside.
        assert!(!s.contains("--unshare-user"), "{s}");
        assert!(
            s.contains("--cap-drop ALL --cap-add CAP_SETUID --cap-add CAP_SETGID"),
            "{s}"
        );
        assert!(
            s.ends_with(
                "-- /usr/bin/setpriv --reuid=999 --regid=995 --clear-groups --no-new-privs -- \
                 /usr/bin/qemu-system-riscv64 -nodefaults -m 1024M"
            ),
            "{s}"
        );
    }

    #[test]
    fn unprivileged_runs_qemu_directly_in_a_user_namespace() {
        let s = build(&sandbox(false, None));
        assert!(s.contains("--unshare-user --disable-userns"), "{s}");
        assert!(!s.contains("setpriv") && !s.contains("--cap-"), "{s}");
        assert!(
            s.ends_with("-- /usr/bin/qemu-system-riscv64 -nodefaults -m 1024M"),
            "{s}"
        );
    }

    #[test]
    fn root_without_the_vm_user_keeps_no_capabilities() {
        let s = build(&sandbox(true, None));
        assert!(s.contains("--cap-drop ALL --ro-bind"), "{s}");
        assert!(!s.contains("CAP_SETUID") && !s.contains("setpriv"), "{s}");
    }

    #[test]
    fn every_namespace_but_the_users_is_new_and_bwrap_dies_with_us() {
        let s = build(&sandbox(true, Some(USER)));
        for flag in [
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--proc /proc",
            "--dev /dev",
        ] {
            assert!(s.contains(flag), "missing {flag}: {s}");
        }
    }

    #[test]
    fn only_the_system_and_the_vms_own_files_are_visible() {
        let s = build(&sandbox(true, Some(USER)));
        assert!(
            s.contains("--ro-bind /usr /usr --symlink usr/lib /lib"),
            "{s}"
        );
        assert!(
            s.contains("--ro-bind /etc/ld.so.cache /etc/ld.so.cache"),
            "{s}"
        );
        assert!(!s.contains("--bind / /") && !s.contains("--ro-bind /etc /etc"));
        // The VM directory writable, then the pinned state inside it read-only on top.
        let vm = s
            .find("--bind /root/.cache/runner/vms/vm-abc /root")
            .expect(&s);
        let pinned = s
            .find("--ro-bind /root/.cache/runner/vms/vm-abc/state-ram.bin")
            .expect(&s);
        assert!(vm < pinned, "{s}");
        assert!(s.contains("--ro-bind /root/.cache/runner/images/deb/kernel /root"));
    }

    #[test]
    fn parents_of_bound_paths_are_created_walkable_shallowest_first() {
        let sb = sandbox(true, Some(USER));
        let dirs = parents_to_create(&sb);
        let want: Vec<PathBuf> = [
            "/root",
            "/root/.cache",
            "/root/.cache/runner",
            "/root/.cache/runner/images",
            "/root/.cache/runner/vms",
            "/root/.cache/runner/images/deb",
        ]
        .iter()
        .map(PathBuf::from)
        .collect();
        // The VM directory itself is bound, so it is not created (nor is anything in it).
        assert_eq!(dirs, want);
        let s = build(&sb);
        assert!(s.contains("--perms 0755 --dir /root --perms 0755 --dir /root/.cache "));
    }

    #[test]
    fn kvm_is_passed_through_with_its_group() {
        let mut sb = sandbox(true, Some(USER));
        sb.devices.push("/dev/kvm".into());
        sb.groups.push(104);
        let s = build(&sb);
        assert!(s.contains("--dev-bind /dev/kvm /dev/kvm"), "{s}");
        assert!(s.contains("--groups=104 --no-new-privs"), "{s}");
        // /dev is bwrap's own, never created with --dir.
        assert!(!s.contains("--dir /dev"), "{s}");
    }

    #[test]
    fn qemu_outside_usr_brings_its_prefix() {
        // (binary, prefix bound)
        let cases = [
            ("/usr/bin/qemu-system-x86_64", None),
            ("/usr/local/bin/qemu-system-x86_64", None),
            ("/opt/qemu/bin/qemu-system-x86_64", Some("/opt/qemu")),
            // A binary right in a top-level directory brings that directory.
            ("/opt/qemu-x86_64", Some("/opt")),
            ("/srv/qemu/qemu-system-x86_64", Some("/srv/qemu")),
        ];
        for (binary, prefix) in cases {
            assert_eq!(
                qemu_prefix(Path::new(binary)),
                prefix.map(PathBuf::from),
                "{binary}"
            );
        }
    }
}
