//! The image cache: built images stored content-addressed under the user's cache dir
//! (`<cache>/runner/images/<name>-<arch>-<hash>/`), each with a manifest, verified before use.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::arch::Arch;
use crate::image::recipe::hex;
use crate::image::ImageError;

pub const MANIFEST: &str = "manifest.json";
pub const KERNEL: &str = "kernel";
pub const INITRD: &str = "initrd.cpio";
pub const ROOTFS: &str = "rootfs.qcow2";
/// Prefix of the stamps recording that an artifact was hashed and matched, for this exact
/// file (size, inode, mtime, ctime): hashing the 200 MB of an image on every run would cost
/// most of a second. `runner images verify` always hashes everything.
const VERIFIED_STAMP: &str = ".verified-";

/// One artifact's entry in the manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Artifact {
    pub file: String,
    pub sha256: String,
    pub size: u64,
}

/// What a built image is and how to check it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub recipe: String,
    /// Where the recipe came from (`RecipeOrigin::kind`); empty in images of builder 1.
    #[serde(default)]
    pub origin: String,
    pub recipe_hash: String,
    pub arch: String,
    pub distribution: String,
    pub kernel_version: String,
    pub qemu_version: String,
    pub built_at_unix: u64,
    pub build_seconds: f64,
    pub packages: BTreeMap<String, String>,
    pub artifacts: BTreeMap<String, Artifact>,
}

/// A verified, ready-to-boot base image.
#[derive(Debug, Clone)]
pub struct BaseImage {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub rootfs: PathBuf,
    pub manifest: Manifest,
}

/// The cache of built images.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

impl ImageStore {
    /// `$RUNNER_CACHE_DIR`, else `$XDG_CACHE_HOME/runner` (`~/.cache/runner`).
    pub fn default_root() -> PathBuf {
        if let Some(dir) = std::env::var_os("RUNNER_CACHE_DIR") {
            return PathBuf::from(dir);
        }
        dirs::cache_dir()
            .unwrap_or_else(std::env::temp_dir)
            .join("runner")
    }

    pub fn new(root: impl Into<PathBuf>) -> Self {
        ImageStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn images_dir(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Where per-VM directories live (on the same filesystem as the images).
    pub fn vms_dir(&self) -> PathBuf {
        self.root.join("vms")
    }

    /// Where saved VM states live (see `vm::state`).
    pub fn states_dir(&self) -> PathBuf {
        self.root.join("states")
    }

    pub fn image_dir(&self, recipe: &str, arch: Arch, hash: &str) -> PathBuf {
        self.images_dir().join(format!("{recipe}-{arch}-{hash}"))
    }

    /// The image for (recipe, arch, hash): `Ok(None)` when not built, an error when it
    /// exists but does not match its manifest.
    pub fn open(
        &self,
        recipe: &str,
        arch: Arch,
        hash: &str,
    ) -> Result<Option<BaseImage>, ImageError> {
        let dir = self.image_dir(recipe, arch, hash);
        if !dir.exists() {
            return Ok(None);
        }
        let image = load(&dir)?;
        verify(&image, false)?;
        Ok(Some(image))
    }

    /// [`ImageStore::open`] on a blocking thread: verifying may hash the whole image (a few
    /// hundred MB), which on a runtime worker would stall every other job on it.
    pub async fn open_off_runtime(
        &self,
        recipe: &str,
        arch: Arch,
        hash: &str,
    ) -> Result<Option<BaseImage>, ImageError> {
        let (store, recipe, hash) = (self.clone(), recipe.to_string(), hash.to_string());
        let dir = self.image_dir(&recipe, arch, &hash);
        tokio::task::spawn_blocking(move || store.open(&recipe, arch, &hash))
            .await
            .unwrap_or_else(|e| Err(ImageError::io(&dir, std::io::Error::other(e.to_string()))))
    }

    /// Every image in the cache with its state ("ok" or what is wrong), oldest first.
    pub fn list(&self) -> Vec<(PathBuf, Result<Manifest, String>)> {
        let Ok(entries) = std::fs::read_dir(self.images_dir()) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .flatten()
            .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
            .map(|e| {
                let dir = e.path();
                let state = load(&dir)
                    .and_then(|img| verify(&img, false).map(|_| img.manifest))
                    .map_err(|e| e.to_string());
                (dir, state)
            })
            .collect();
        out.sort_by_key(|(_, m)| m.as_ref().map(|m| m.built_at_unix).unwrap_or(0));
        out
    }
}

/// Removes what killed runs left in the cache: image builds that never finished
/// (`images/.staging-*`, older than any build can take), state saves that never finished
/// (`states/.saving-*`) and discarded states. Returns how many were removed.
pub fn sweep_leftovers(store: &ImageStore) -> usize {
    use std::time::Duration;
    let rules: [(PathBuf, &str, Duration); 3] = [
        (
            store.images_dir(),
            ".staging-",
            Duration::from_secs(3 * 3600),
        ),
        (store.states_dir(), ".saving-", Duration::from_secs(3600)),
        (store.states_dir(), ".discarded-", Duration::ZERO),
    ];
    let mut removed = 0;
    for (dir, pattern, min_age) in rules {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let old_enough = e
                .metadata()
                .and_then(|m| m.modified())
                .map(|t| t.elapsed().unwrap_or_default() >= min_age)
                .unwrap_or(false);
            if !name.contains(pattern) || !old_enough {
                continue;
            }
            // A build's fakeroot daemon runs detached; it would outlive its directory.
            crate::image::fakeroot::kill_daemons_under(&e.path());
            if std::fs::remove_dir_all(e.path()).is_ok() {
                removed += 1;
            }
        }
    }
    removed
}

/// Reads an image directory's manifest.
pub fn load(dir: &Path) -> Result<BaseImage, ImageError> {
    let corrupt = |what: String| ImageError::Corrupt {
        dir: dir.into(),
        what,
    };
    let text = std::fs::read_to_string(dir.join(MANIFEST))
        .map_err(|e| corrupt(format!("manifest unreadable ({e})")))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| corrupt(format!("manifest invalid ({e})")))?;
    Ok(BaseImage {
        dir: dir.into(),
        kernel: dir.join(KERNEL),
        initrd: dir.join(INITRD),
        rootfs: dir.join(ROOTFS),
        manifest,
    })
}

/// Checks every artifact against the manifest: size always; content by hash when `full`,
/// or when the file is not the one whose hash matched before (see [`VERIFIED_STAMP`]).
pub fn verify(image: &BaseImage, full: bool) -> Result<(), ImageError> {
    for name in [KERNEL, INITRD, ROOTFS] {
        let corrupt = |what: String| ImageError::Corrupt {
            dir: image.dir.clone(),
            what,
        };
        let art = image
            .manifest
            .artifacts
            .get(name)
            .ok_or_else(|| corrupt(format!("manifest lists no {name}")))?;
        let path = image.dir.join(&art.file);
        let meta = std::fs::metadata(&path).map_err(|_| corrupt(format!("{name} is missing")))?;
        if meta.len() != art.size {
            return Err(corrupt(format!(
                "{name} has {} bytes, manifest says {}",
                meta.len(),
                art.size
            )));
        }
        let stamp_path = image.dir.join(format!("{VERIFIED_STAMP}{name}"));
        let stamp = format!(
            "{} {} {}.{} {}.{} {}",
            meta.len(),
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.ctime(),
            meta.ctime_nsec(),
            art.sha256
        );
        if !full && std::fs::read_to_string(&stamp_path).ok().as_deref() == Some(&stamp) {
            continue;
        }
        let sum = sha256_file(&path).map_err(|e| corrupt(format!("{name} unreadable ({e})")))?;
        if sum != art.sha256 {
            let _ = std::fs::remove_file(&stamp_path);
            return Err(corrupt(format!("{name} checksum mismatch")));
        }
        // Best effort: without the stamp we just hash again next time.
        let _ = std::fs::write(&stamp_path, stamp);
    }
    Ok(())
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_image(dir: &Path) -> BaseImage {
        std::fs::create_dir_all(dir).unwrap();
        let mut artifacts = BTreeMap::new();
        for (name, body) in [(KERNEL, "k"), (INITRD, "i"), (ROOTFS, "disk")] {
            std::fs::write(dir.join(name), body).unwrap();
            artifacts.insert(
                name.to_string(),
                Artifact {
                    file: name.into(),
                    sha256: sha256_file(&dir.join(name)).unwrap(),
                    size: body.len() as u64,
                },
            );
        }
        let manifest = Manifest {
            recipe: "debian-13".into(),
            origin: "built-in".into(),
            recipe_hash: "abc".into(),
            arch: "riscv64".into(),
            distribution: "trixie".into(),
            kernel_version: "6.12".into(),
            qemu_version: "10.0.2".into(),
            built_at_unix: 1,
            build_seconds: 1.0,
            packages: BTreeMap::new(),
            artifacts,
        };
        std::fs::write(
            dir.join(MANIFEST),
            serde_json::to_string(&manifest).unwrap(),
        )
        .unwrap();
        load(dir).unwrap()
    }

    #[test]
    fn verifying_a_large_image_leaves_the_runtime_free() {
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::sync::Arc;
        use std::time::{Duration, Instant};
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(tmp.path());
        let img = fake_image(&store.image_dir("debian-13", Arch::Riscv64, "abc"));
        // A 128 MiB root filesystem of real content, hashed in full on this first open.
        let block: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        let body = block.repeat(32);
        std::fs::write(&img.rootfs, &body).unwrap();
        let mut manifest = img.manifest.clone();
        let rootfs = manifest.artifacts.get_mut(ROOTFS).unwrap();
        (rootfs.sha256, rootfs.size) = (sha256_file(&img.rootfs).unwrap(), body.len() as u64);
        std::fs::write(
            img.dir.join(MANIFEST),
            serde_json::to_string(&manifest).unwrap(),
        )
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        rt.block_on(async {
            // A timer on the same thread: how long did it go without running?
            let longest_ms = Arc::new(AtomicU64::new(0));
            let seen = longest_ms.clone();
            let ticker = tokio::spawn(async move {
                let mut last = Instant::now();
                loop {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let gap = last.elapsed().as_millis() as u64;
                    seen.fetch_max(gap, Ordering::Relaxed);
                    last = Instant::now();
                }
            });
            tokio::task::yield_now().await;
            let start = Instant::now();
            let opened = store
                .open_off_runtime("debian-13", Arch::Riscv64, "abc")
                .await;
            let took = start.elapsed().as_millis() as u64;
            tokio::time::sleep(Duration::from_millis(5)).await;
            ticker.abort();
            assert!(opened.unwrap().is_some());
            let stall = longest_ms.load(Ordering::Relaxed);
            assert!(
                stall < took / 2,
                "a timer on the runtime waited {stall} ms of the {took} ms verifying took"
            );
        });
    }

    #[test]
    fn missing_image_is_none_and_good_image_opens() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(tmp.path());
        assert!(store
            .open("debian-13", Arch::Riscv64, "abc")
            .unwrap()
            .is_none());
        fake_image(&store.image_dir("debian-13", Arch::Riscv64, "abc"));
        assert!(store
            .open("debian-13", Arch::Riscv64, "abc")
            .unwrap()
            .is_some());
        assert_eq!(store.list().len(), 1);
    }

    #[test]
    fn corruption_is_detected() {
        let tmp = tempfile::tempdir().unwrap();
        let img = fake_image(tmp.path());
        verify(&img, false).unwrap(); // hashes and stamps every artifact
                                      // Same size, different content, written later: only the checksum can tell.
        std::fs::write(&img.kernel, "K").unwrap();
        let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&img.kernel)
            .unwrap()
            .set_modified(later)
            .unwrap();
        let err = verify(&img, false).unwrap_err().to_string();
        assert!(err.contains("kernel checksum mismatch"), "{err}");
        std::fs::remove_file(&img.kernel).unwrap();
        let err = verify(&img, false).unwrap_err().to_string();
        assert!(err.contains("kernel is missing"), "{err}");
    }

    #[test]
    fn full_verification_ignores_the_stamps() {
        let tmp = tempfile::tempdir().unwrap();
        let img = fake_image(tmp.path());
        verify(&img, false).unwrap();
        // Forge the stamp's view: a rewrite that keeps size, inode and mtime.
        let meta = std::fs::metadata(&img.initrd).unwrap();
        std::fs::write(&img.initrd, "I").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&img.initrd)
            .unwrap()
            .set_modified(meta.modified().unwrap())
            .unwrap();
        let err = verify(&img, true).unwrap_err().to_string();
        assert!(err.contains("initrd.cpio checksum mismatch"), "{err}");
    }

    #[test]
    fn replaced_rootfs_is_rehashed() {
        let tmp = tempfile::tempdir().unwrap();
        let img = fake_image(tmp.path());
        verify(&img, false).unwrap(); // writes the stamps
                                      // A new file (new inode) in its place: the stamp no longer matches.
        std::fs::remove_file(&img.rootfs).unwrap();
        std::fs::write(&img.rootfs, "DISK").unwrap();
        let err = verify(&img, false).unwrap_err().to_string();
        assert!(err.contains("rootfs.qcow2 checksum mismatch"), "{err}");
    }

    #[test]
    fn sweep_removes_only_stale_leftovers() {
        let tmp = tempfile::tempdir().unwrap();
        let store = ImageStore::new(tmp.path());
        let fresh = store.images_dir().join(".staging-fresh");
        let discarded = store.states_dir().join("x.discarded-1234");
        std::fs::create_dir_all(&fresh).unwrap();
        std::fs::create_dir_all(&discarded).unwrap();
        assert_eq!(sweep_leftovers(&store), 1);
        assert!(fresh.exists(), "a build in progress must not be swept");
        assert!(!discarded.exists());
    }

    #[test]
    fn broken_manifest_is_corrupt() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join(MANIFEST), "{").unwrap();
        let err = load(tmp.path()).unwrap_err().to_string();
        assert!(err.contains("manifest invalid"), "{err}");
    }
}
