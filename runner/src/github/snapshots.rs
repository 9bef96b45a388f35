//! Failure snapshots of the App's runs, kept on this host and served for download. A check
//! run has no artifacts, so when the operator sets `[github] failure_snapshots` and a
//! suite's runner.toml says `keep_failed = true`, the failed VM (`failed-vm/`) is packed
//! (`snapshot_archive`) into this store and the check run's summary ends with its link and
//! the commands that resume it.
//!
//! The link is a capability: `/snapshots/<64 hex>.tar.gz`, 256 random bits. The server takes
//! nothing else from the request: the name is checked to be exactly that shape before any
//! path is made of it, there is no listing, and a snapshot past `keep` is 404 at once (the
//! sweep removes it later). `max_total` bounds the store's disk: the oldest snapshots go
//! first, and one larger than the whole bound is not kept.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use super::config::Snapshots;
use crate::snapshot_archive::{self, Capped};

/// The URL path under which snapshots are served.
pub const ROUTE_PREFIX: &str = "/snapshots/";
/// Suffix of a kept snapshot's file and link.
const SUFFIX: &str = ".tar.gz";
/// Prefix of a snapshot being packed; one this old was left by a killed service.
const PART_PREFIX: &str = ".part-";
const STALE_PART: Duration = Duration::from_secs(60 * 60);
/// How often expired snapshots are removed (they are refused at once anyway).
pub const SWEEP_EVERY: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot use the snapshot store {path}: {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot pack the failed VM into the snapshot store: {0}")]
    Pack(#[source] std::io::Error),
}

/// A snapshot kept in the store.
#[derive(Debug, Clone)]
pub struct Kept {
    /// 64 hex digits: the capability.
    pub id: String,
    /// Bytes of the packed snapshot.
    pub size: u64,
    /// When it stops being served.
    pub expires: SystemTime,
}

/// The store: one directory of `<id>.tar.gz` files.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    settings: Snapshots,
    /// One put or sweep at a time, so that the total they bound is the one they see.
    lock: Mutex<()>,
}

impl Store {
    /// Opens (creating, 0700) the store in `dir` and removes what expired.
    pub fn open(dir: &Path, settings: Snapshots) -> Result<Store, StoreError> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|source| StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
        let store = Store {
            dir: dir.to_path_buf(),
            settings,
            lock: Mutex::new(()),
        };
        store.sweep();
        Ok(store)
    }

    /// The link that downloads snapshot `id`.
    pub fn link(&self, id: &str) -> String {
        format!("{}{ROUTE_PREFIX}{id}{SUFFIX}", self.settings.url)
    }

    /// Packs snapshot directory `snapshot` into the store (blocking: seconds of gzip).
    pub fn put(&self, snapshot: &Path) -> Result<Kept, StoreError> {
        let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sweep_locked();
        let part = tempfile::Builder::new()
            .prefix(PART_PREFIX)
            .tempfile_in(&self.dir)
            .map_err(StoreError::Pack)?;
        let out = Capped::new(
            std::io::BufWriter::new(part.as_file()),
            self.settings.max_total,
            "failure_snapshots.max_total",
        );
        let written = snapshot_archive::pack(snapshot, out)
            .and_then(|c| {
                let size = c.written;
                c.inner.into_inner().map_err(|e| e.into_error())?;
                Ok(size)
            })
            .and_then(|size| part.as_file().sync_all().map(|()| size))
            .map_err(StoreError::Pack)?;
        let id = hex::encode(rand::random::<[u8; 32]>());
        part.persist_noclobber(self.dir.join(format!("{id}{SUFFIX}")))
            .map_err(|e| StoreError::Pack(e.error))?;
        // Room for the new one: the oldest others go.
        self.sweep_locked();
        Ok(Kept {
            id,
            size: written,
            expires: SystemTime::now() + self.settings.keep,
        })
    }

    /// The snapshot that `name` (the last part of a request's path) names, open, with its
    /// size — or `None` for anything else: not `<64 hex>.tar.gz`, unknown, or expired.
    pub fn get(&self, name: &str) -> Option<(File, u64)> {
        let id = name.strip_suffix(SUFFIX)?;
        if id.len() != 64 || !id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return None;
        }
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
            .open(self.dir.join(name))
            .ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() || self.expired(&meta, SystemTime::now()) {
            return None;
        }
        Some((file, meta.len()))
    }

    fn expired(&self, meta: &std::fs::Metadata, now: SystemTime) -> bool {
        meta.modified()
            .ok()
            .and_then(|t| now.duration_since(t).ok())
            .is_none_or(|age| age >= self.settings.keep)
    }

    /// Removes expired snapshots, then the oldest ones while the store is over `max_total`;
    /// returns how many went.
    pub fn sweep(&self) -> usize {
        let _held = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.sweep_locked()
    }

    fn sweep_locked(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return 0;
        };
        let now = SystemTime::now();
        let mut removed = 0;
        let mut kept: Vec<(SystemTime, u64, PathBuf)> = Vec::new();
        for e in entries.flatten() {
            let (Ok(meta), name) = (e.metadata(), e.file_name()) else {
                continue;
            };
            let name = name.to_string_lossy();
            let old_part = name.starts_with(PART_PREFIX)
                && meta
                    .modified()
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .is_some_and(|age| age > STALE_PART);
            let snapshot = name.ends_with(SUFFIX) && meta.is_file();
            if old_part || (snapshot && self.expired(&meta, now)) {
                if std::fs::remove_file(e.path()).is_ok() {
                    removed += 1;
                }
            } else if snapshot {
                let modified = meta.modified().unwrap_or(now);
                kept.push((modified, meta.len(), e.path()));
            }
        }
        kept.sort();
        let mut total: u64 = kept.iter().map(|(_, size, _)| size).sum();
        for (_, size, path) in kept {
            if total <= self.settings.max_total {
                break;
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= size;
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "failure snapshots removed (expired, or over max_total)"
            );
        }
        removed
    }
}

/// The end of a failed check run's summary when its VM was kept.
pub fn kept_summary(
    store: &Store,
    kept: &Kept,
    suite: &str,
    arch: engine::Arch,
    image: &str,
) -> String {
    let fetch = [format!(
        "curl -fLo {} {}",
        snapshot_archive::ARCHIVE_NAME,
        store.link(&kept.id)
    )];
    let into = format!("{suite}-{arch}");
    let lines = snapshot_archive::resume_commands(
        &fetch,
        snapshot_archive::ARCHIVE_NAME,
        Some(&into),
        arch,
        image,
    );
    format!(
        "### Failed VM\n\nThe VM of the failed step was saved: {:.1} MiB, downloadable until {}. \
         **Careful: {}; anyone with the link can download it.** Resume it where `runner` is installed:\n\n\
         ```sh\n{}\n```\n",
        kept.size as f64 / f64::from(1 << 20),
        super::wire::timestamp(kept.expires),
        snapshot_archive::HOLDS_SECRETS,
        lines.join("\n")
    )
}

/// The end of the summary when runner.toml asks for `keep_failed` and this service keeps none.
pub const NOT_ENABLED: &str = "### Failed VM\n\n`keep_failed = true` in runner.toml is ignored here: this service does not keep failure snapshots (its operator has not set `failure_snapshots` in `[github]`). Run the suite locally with `runner test --keep-failed` instead.\n";

/// The end of the summary when the snapshot could not be kept.
pub fn not_kept(why: &str) -> String {
    format!("### Failed VM\n\nThe VM of the failed step was saved but could not be kept for download: {why}\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path, keep: Duration, max_total: u64) -> Store {
        Store::open(
            dir,
            Snapshots {
                url: "https://runner.example.com".into(),
                keep,
                max_total,
            },
        )
        .unwrap()
    }

    /// A snapshot directory with `bytes` of incompressible RAM.
    fn snapshot(bytes: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("snapshot.toml"), "version = 1\n").unwrap();
        let noise: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>()).collect();
        std::fs::write(dir.path().join("ram.bin"), noise).unwrap();
        dir
    }

    #[test]
    fn a_kept_snapshot_is_found_by_its_id_alone() {
        let root = tempfile::tempdir().unwrap();
        let s = store(
            &root.path().join("store"),
            Duration::from_secs(3600),
            1 << 30,
        );
        let kept = s.put(snapshot(1000).path()).unwrap();
        assert_eq!(kept.id.len(), 64);
        assert_eq!(
            s.link(&kept.id),
            format!("https://runner.example.com/snapshots/{}.tar.gz", kept.id)
        );
        let (file, len) = s.get(&format!("{}.tar.gz", kept.id)).unwrap();
        assert_eq!(len, kept.size);
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(file));
        let names: Vec<String> = ar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert!(
            names.contains(&"failed-vm/snapshot.toml".to_string()),
            "{names:?}"
        );
        // Nothing but `<64 lowercase hex>.tar.gz` is looked up.
        let other = hex::encode([7u8; 32]);
        let upper = kept.id.to_uppercase();
        for name in [
            kept.id.as_str(),
            &format!("{upper}.tar.gz"),
            &format!("{other}.tar.gz"),
            &format!("../{}.tar.gz", &kept.id[3..]),
            ".tar.gz",
            "",
        ] {
            assert!(s.get(name).is_none(), "{name}");
        }
        // A symlink planted in the store is not followed.
        std::os::unix::fs::symlink(
            "/etc/passwd",
            root.path().join(format!("store/{other}.tar.gz")),
        )
        .unwrap();
        assert!(s.get(&format!("{other}.tar.gz")).is_none());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root.path().join("store"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }

    #[test]
    fn expired_snapshots_are_refused_at_once_and_swept() {
        let root = tempfile::tempdir().unwrap();
        let s = store(root.path(), Duration::from_secs(3600), 1 << 30);
        let kept = s.put(snapshot(100).path()).unwrap();
        let name = format!("{}.tar.gz", kept.id);
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(root.path().join(&name))
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
        assert!(s.get(&name).is_none());
        assert_eq!(s.sweep(), 1);
        assert!(!root.path().join(&name).exists());
    }

    #[test]
    fn the_total_is_bounded_oldest_first() {
        let root = tempfile::tempdir().unwrap();
        // Room for two 400 KiB snapshots, not three.
        let s = store(root.path(), Duration::from_secs(3600), 1 << 20);
        let ids: Vec<String> = (0..3)
            .map(|i| {
                let kept = s.put(snapshot(400 << 10).path()).unwrap();
                let when = SystemTime::now() - Duration::from_secs(100 - i * 10);
                File::options()
                    .write(true)
                    .open(root.path().join(format!("{}.tar.gz", kept.id)))
                    .unwrap()
                    .set_modified(when)
                    .unwrap();
                kept.id
            })
            .collect();
        s.sweep();
        let present: Vec<bool> = ids
            .iter()
            .map(|id| s.get(&format!("{id}.tar.gz")).is_some())
            .collect();
        assert_eq!(present, [false, true, true]);
        // One larger than the whole bound is not kept, and leaves nothing behind.
        let e = s.put(snapshot(2 << 20).path()).unwrap_err().to_string();
        assert!(
            e.contains("larger than failure_snapshots.max_total (1 MiB)"),
            "{e}"
        );
        let names: Vec<String> = std::fs::read_dir(root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn the_summary_ends_with_the_commands() {
        let root = tempfile::tempdir().unwrap();
        let s = store(root.path(), Duration::from_secs(3600), 1 << 30);
        let kept = Kept {
            id: "ab".repeat(32),
            size: 23 << 20,
            expires: SystemTime::UNIX_EPOCH,
        };
        let md = kept_summary(&s, &kept, "unit", engine::Arch::Riscv64, "debian-13");
        let link = format!(
            "https://runner.example.com/snapshots/{}.tar.gz",
            "ab".repeat(32)
        );
        assert!(
            md.contains("23.0 MiB, downloadable until 1970-01-01T00:00:00Z"),
            "{md}"
        );
        assert!(
            md.trim_end().ends_with(&format!(
                "curl -fLo failed-vm.tar.gz {link}\nmkdir -p unit-riscv64 && tar -xzf failed-vm.tar.gz -C unit-riscv64\nrunner images build --arch riscv64 debian-13\nrunner debug unit-riscv64/failed-vm\n```"
            )),
            "{md}"
        );
    }
}
