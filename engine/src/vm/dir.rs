//! The private per-VM directory: mode 0700, random name, holds the overlay and the sockets,
//! removed on every path (drop).

use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// UNIX socket paths are limited to 107 bytes; leave room for the socket file name.
const MAX_DIR_LEN: usize = 90;

/// A VM's private directory.
#[derive(Debug)]
pub struct VmDir {
    dir: TempDir,
}

impl VmDir {
    /// Creates a fresh directory under `parent` (or the system temp dir when `parent` would
    /// make socket paths too long). Names are random, so they cannot be guessed.
    pub fn create(parent: &Path) -> std::io::Result<VmDir> {
        std::fs::create_dir_all(parent)?;
        let parent = if parent.as_os_str().len() > MAX_DIR_LEN {
            std::env::temp_dir()
        } else {
            parent.to_path_buf()
        };
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new()
            .prefix("vm-")
            .permissions(std::fs::Permissions::from_mode(0o700))
            .tempdir_in(parent)?;
        Ok(VmDir { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The VM id shown in logs: the directory's random name.
    pub fn id(&self) -> String {
        self.dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

/// Removes VM directories left by a runner that died (their QEMU died with it, see
/// `QemuProcess::spawn`). A directory counts as abandoned when no process mentions it on its
/// command line and it is older than a minute (younger ones may be starting up right now).
pub fn sweep_abandoned(parent: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let cmdlines: Vec<String> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).into_owned())
                .collect()
        })
        .unwrap_or_default();
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .map(|t| t.elapsed().unwrap_or_default() > std::time::Duration::from_secs(60))
            .unwrap_or(false);
        if !name.starts_with("vm-") || !old {
            continue;
        }
        let needle = path.to_string_lossy();
        if !cmdlines.iter().any(|c| c.contains(needle.as_ref()))
            && std::fs::remove_dir_all(&path).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Removes everything under `parent` and kills any QEMU whose command line names it. Only for
/// a parent that one process owns exclusively (`runner serve` holds a lock on it): every
/// entry there belongs to a predecessor that died (SIGKILL, power loss), so nothing is young
/// enough to be spared. Returns how many entries were removed.
pub fn sweep_all(parent: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return 0;
    };
    let needle = parent.to_string_lossy().into_owned();
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            let cmdline = String::from_utf8_lossy(&cmdline);
            let is_qemu = cmdline.starts_with("qemu-system") || cmdline.contains("/qemu-system");
            if is_qemu && cmdline.contains(&needle) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let gone = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        if gone.is_ok() {
            removed += 1;
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn private_and_removed_on_drop() {
        let parent = tempfile::tempdir().unwrap();
        let d = VmDir::create(parent.path()).unwrap();
        let mode = std::fs::metadata(d.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(d.id().starts_with("vm-") && d.id().len() > 6);
        let path = d.path().to_path_buf();
        std::fs::write(d.join("overlay.qcow2"), b"x").unwrap();
        drop(d);
        assert!(!path.exists());
    }

    #[test]
    fn sweep_removes_only_old_unused_vm_dirs() {
        let parent = tempfile::tempdir().unwrap();
        let fresh = VmDir::create(parent.path()).unwrap();
        let stale = parent.path().join("vm-stale");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("overlay.qcow2"), "x").unwrap();
        let old = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::open(&stale)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert_eq!(sweep_abandoned(parent.path()), 1);
        assert!(!stale.exists());
        assert!(
            fresh.path().exists(),
            "a young directory may belong to a VM starting up"
        );
    }

    #[test]
    fn sweep_all_removes_everything() {
        let parent = tempfile::tempdir().unwrap();
        let fresh = VmDir::create(parent.path()).unwrap();
        std::fs::write(fresh.join("qmp.sock"), "x").unwrap();
        std::fs::write(parent.path().join("stray"), "x").unwrap();
        assert_eq!(sweep_all(parent.path()), 2);
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    }

    #[test]
    fn long_parents_fall_back_to_temp() {
        let parent = tempfile::tempdir().unwrap();
        let long = parent.path().join("x".repeat(100));
        let d = VmDir::create(&long).unwrap();
        assert!(d.path().starts_with(std::env::temp_dir()));
    }
}
