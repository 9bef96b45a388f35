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
    fn long_parents_fall_back_to_temp() {
        let parent = tempfile::tempdir().unwrap();
        let long = parent.path().join("x".repeat(100));
        let d = VmDir::create(&long).unwrap();
        assert!(d.path().starts_with(std::env::temp_dir()));
    }
}
