//! Saved VM states: a job can resume a VM saved right after boot instead of booting the
//! kernel again (a cold boot under TCG takes seconds; resuming a fraction of one).
//!
//! A state directory holds `ram.bin` (QEMU's `mapped-ram` migration stream: RAM at fixed
//! offsets, sparse), `disk.qcow2` (the VM's overlay at save time, backed by the base image)
//! and `meta.json`. It is valid only for the exact QEMU command line it was saved from, so
//! callers key its path on image, architecture, accelerator, vCPUs, memory and QEMU version.
//! Writes are atomic (staging directory, then rename), and a save is [`Staged`] until the
//! caller has resumed it once and checked it: only then is it published under its key, so a
//! job never resumes a state nobody has seen work. A key whose saves keep failing is
//! [marked](mark_unsaveable) for a while, and jobs boot cold without trying again.
//!
//! A state is trusted input to QEMU (a crafted migration stream or qcow2 file can crash its
//! loaders), so it is guarded like one: the states directory is 0700, the files 0400, and
//! `meta.json` records the SHA-256 of both files, checked before QEMU reads them; a mismatch
//! discards the state (the caller boots cold and says why). See [`pin`] for when the hash is
//! computed and why not on every resume.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::qemu::qmp::{QmpClient, QmpError};

/// How long saving or loading a state may take (1 GiB of RAM takes well under a second).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the guest is left idle before it is saved. riscv64 under QEMU 10.0 loses each
/// hart's armed timer in a save (see [`super::resume`]): a hart whose tick was running
/// when the VM stopped — it had just served the agent — resumes with that tick never firing.
/// After a moment of idleness every hart has stopped its tick (NO_HZ idle) and programs a
/// new one when it wakes, so the save resumes well: measured, 6 of 6 fresh saves passed
/// the check unaided after 500 ms, against 3 of 12 saved at once.
const SETTLE: Duration = Duration::from_millis(500);
/// Poll interval for `query-migrate`.
const MIGRATION_POLL: Duration = Duration::from_millis(10);
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

/// Bumped when what a saved guest contains or the QEMU command line changes (2: the output
/// relay; 3: riscv64 without Sstc; 4: the job cgroup; 5: saves checked before they are
/// published, so older ones may be bad; 6: the after-resume helper waits in the saved guest;
/// 7: it waits on the control port),
/// so that states saved by an older runner are not resumed; callers put it in the state's key.
pub const FORMAT: u32 = 7;

const RAM: &str = "ram.bin";
const DISK: &str = "disk.qcow2";
const META: &str = "meta.json";
/// Identities (device, inode, size, mtime) of the files whose hash matched, one per line.
const VERIFIED: &str = "verified";
/// The files a state's checksums cover.
const CHECKED: [&str; 2] = [RAM, DISK];

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("QMP failed during migration")]
    Qmp(#[from] QmpError),
    #[error("migration {0}")]
    Migration(String),
    #[error("cannot write the saved state to {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("only VMs on an overlay can be saved")]
    NoOverlay,
    #[error("the VM could not be resumed after saving it")]
    Resume(#[source] QmpError),
    #[error("the saved state changed while it was being read")]
    Changed,
    #[error("{file} of the saved state {dir} does not match its checksum")]
    Tampered { dir: PathBuf, file: &'static str },
}

/// The saved disk of a state directory.
pub fn disk(dir: &Path) -> PathBuf {
    dir.join(DISK)
}

/// Whether `dir` holds a complete saved state (meta.json is written last).
pub fn is_complete(dir: &Path) -> bool {
    dir.join(META).is_file() && dir.join(RAM).is_file() && dir.join(DISK).is_file()
}

async fn enable_mapped_ram(qmp: &mut QmpClient) -> Result<(), QmpError> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(json!({"capabilities": [{"capability": "mapped-ram", "state": true}]})),
        QMP_TIMEOUT,
    )
    .await
    .map(drop)
}

/// Polls `query-migrate` until the migration completes.
async fn wait_for_migration(qmp: &mut QmpClient) -> Result<(), StateError> {
    let deadline = tokio::time::Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let r = qmp.execute("query-migrate", None, QMP_TIMEOUT).await?;
        match r["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = r["error-desc"].as_str().unwrap_or("failed");
                return Err(StateError::Migration(why.to_string()));
            }
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(StateError::Migration(format!(
                    "did not finish within {MIGRATION_TIMEOUT:?}"
                )))
            }
            _ => tokio::time::sleep(MIGRATION_POLL).await,
        }
    }
}

/// A saved state in its staging directory beside its key, not yet published: removed when
/// dropped, so a state that fails its check (or a job that ends first) leaves nothing.
#[derive(Debug)]
pub struct Staged {
    dir: PathBuf,
}

impl Staged {
    /// The staging directory, a complete state (for a check before [`Staged::publish`]).
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Moves the state to `dir`, where jobs find it.
    pub fn publish(self, dir: &Path) {
        if std::fs::rename(&self.dir, dir).is_ok() {
            let _ = std::fs::remove_file(unsaveable_marker(dir));
        }
        // Otherwise another job published the same state first; theirs is as good as ours
        // (it was checked too), and dropping `self` removes ours.
    }
}

impl Staged {
    /// Moves the state to `dir`, which must not exist (a failed job's state, see
    /// [`super::Vm::save_to`]); on failure it is removed.
    pub fn place(self, dir: &Path) -> Result<(), StateError> {
        if dir.exists() {
            return Err(StateError::Io {
                path: dir.to_path_buf(),
                source: std::io::ErrorKind::AlreadyExists.into(),
            });
        }
        std::fs::rename(&self.dir, dir).map_err(|source| StateError::Io {
            path: dir.to_path_buf(),
            source,
        })
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Saves the running VM (whose disk is `overlay`) next to `dir`, then lets it run on. The VM
/// is resumed on every path, so a failed save never costs the job.
pub async fn save(
    qmp: &mut QmpClient,
    overlay: &Path,
    base: &Path,
    dir: &Path,
) -> Result<Staged, StateError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    // Only the runner's user may write (or read) what QEMU will load as trusted.
    set_mode(parent, 0o700).map_err(io(parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".saving-")
        .tempdir_in(parent)
        .map_err(io(parent))?;
    // `stop` also flushes the disk, so the overlay file is complete while we copy it.
    // Not a wait for anything: the idle time itself is what makes a good save (see SETTLE).
    tokio::time::sleep(SETTLE).await;
    qmp.execute("stop", None, QMP_TIMEOUT).await?;
    let result = async {
        enable_mapped_ram(qmp).await?;
        // A contained QEMU sees nothing but its own directory (the overlay's): it writes the
        // RAM there, and the state becomes the runner's, read-only, before anyone uses it.
        let scratch = overlay.with_file_name("saved-ram.bin");
        let uri = format!("file:{}", scratch.display());
        qmp.execute("migrate", Some(json!({ "uri": uri })), QMP_TIMEOUT)
            .await?;
        wait_for_migration(qmp).await?;
        let saved_ram = staging.path().join(RAM);
        let saved_disk = staging.path().join(DISK);
        let dir = staging.path().to_path_buf();
        let overlay = overlay.to_path_buf();
        // Copying the RAM file (across filesystems) and the overlay, then hashing them, is
        // seconds of disk and CPU: on a blocking thread, so that other jobs on the runtime
        // keep their keep-alives and cancellation meanwhile.
        let sums = tokio::task::spawn_blocking(move || {
            take_over(&scratch, &saved_ram).map_err(io(&saved_ram))?;
            copy_regular(&overlay, &saved_disk).map_err(io(&saved_disk))?;
            seal(&dir).map_err(io(&dir))
        })
        .await
        .map_err(|e| StateError::Migration(format!("copy and checksum task failed: {e}")))??;
        let meta = staging.path().join(META);
        let id = format!("{:016x}", rand::random::<u64>());
        // The real path: `prune` drops states whose base is gone, and a path through a
        // symlink that goes away would make a good state look stale.
        let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
        let record = json!({"format": FORMAT, "id": id, "base": base, "sha256": sums});
        std::fs::write(&meta, record.to_string()).map_err(io(&meta))?;
        Ok::<_, StateError>(())
    }
    .await;
    if result.is_err() {
        // A migration still running would keep the VM from resuming.
        let _ = qmp.execute("migrate_cancel", None, QMP_TIMEOUT).await;
    }
    // The job goes on in this VM: it must run again whatever happened above.
    qmp.execute("cont", None, QMP_TIMEOUT)
        .await
        .map_err(StateError::Resume)?;
    result?;
    Ok(Staged {
        dir: staging.keep(),
    })
}

/// How long a key whose saves all failed their check stays without one: jobs boot cold
/// meanwhile instead of each paying for more failed saves; then saving is tried again.
pub const UNSAVEABLE_FOR: Duration = Duration::from_secs(60 * 60);
const UNSAVEABLE: &str = "unsaveable";

/// `KEY.unsaveable` beside the state directory `KEY` (whose name has dots of its own).
fn unsaveable_marker(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{UNSAVEABLE}"));
    dir.with_file_name(name)
}

/// Remembers that no save of `dir`'s key passed its check, and why (one line), for
/// [`UNSAVEABLE_FOR`]. Best effort: without the marker, the next job tries again.
pub fn mark_unsaveable(dir: &Path, why: &str) {
    let _ = std::fs::write(
        unsaveable_marker(dir),
        why.lines().next().unwrap_or_default(),
    );
}

/// Why `dir`'s key is not to be saved now, and for how long still, if it was
/// [marked](mark_unsaveable) less than [`UNSAVEABLE_FOR`] ago.
pub fn unsaveable(dir: &Path) -> Option<(String, Duration)> {
    let marker = unsaveable_marker(dir);
    let age = std::fs::metadata(&marker)
        .ok()?
        .modified()
        .ok()?
        .elapsed()
        .ok()?;
    let left = UNSAVEABLE_FOR.checked_sub(age).filter(|d| !d.is_zero())?;
    // Bounded: the marker is ours, but a line is all a note needs.
    let mut why = Vec::new();
    use std::io::Read;
    std::fs::File::open(&marker)
        .ok()?
        .take(500)
        .read_to_end(&mut why)
        .ok()?;
    Some((String::from_utf8_lossy(&why).into_owned(), left))
}

/// The files of one saved state, pinned for one VM.
#[derive(Debug, Clone)]
pub struct PinnedState {
    pub ram: PathBuf,
    pub disk: PathBuf,
}

/// Hard-links the state's RAM and disk into `vm_dir`, so that the VM reads one consistent
/// state even if another job replaces or discards `dir` meanwhile (where links are not
/// possible, e.g. across filesystems, the state is used in place), and checks them against
/// the checksums in `meta.json`.
///
/// Hashing on every resume would cost more than the resume itself: `ram.bin` is as large as
/// the guest's RAM (1 GiB; sparse, ~90 MB of data) against a resume of ~0.6 s. So, as with
/// the images' `.verified-` stamps, a file is hashed once per identity — device, inode,
/// size, mtime — recorded in `verified` when its hash matched (at save time, we hashed what
/// we wrote). Any write to the file moves its mtime, so the file is hashed again before
/// QEMU reads it. (ctime would be stricter but every pin's hard link changes it.) What the
/// stamp does not stop, a process of the runner's own user resetting the mtime after a
/// write, it could not stop anyway: that user can rewrite `meta.json` and the stamp too. The
/// 0700 directory keeps every other user out; the checksum catches corruption and copies.
pub fn pin(dir: &Path, vm_dir: &Path) -> Result<PinnedState, StateError> {
    let id = || std::fs::read_to_string(dir.join(META)).ok();
    let before = id().ok_or(StateError::Changed)?;
    let ram = vm_dir.join("state-ram.bin");
    let disk = vm_dir.join("state-disk.qcow2");
    let linked = std::fs::hard_link(dir.join(RAM), &ram)
        .and_then(|_| std::fs::hard_link(dir.join(DISK), &disk));
    let pinned = if linked.is_err() {
        let _ = std::fs::remove_file(&ram);
        PinnedState {
            ram: dir.join(RAM),
            disk: dir.join(DISK),
        }
    } else {
        if id().as_ref() != Some(&before) {
            return Err(StateError::Changed);
        }
        PinnedState { ram, disk }
    };
    verify(dir, &before, &pinned)?;
    Ok(pinned)
}

/// Checks the pinned files against the checksums of `meta` (see [`pin`]).
fn verify(dir: &Path, meta: &str, pinned: &PinnedState) -> Result<(), StateError> {
    let meta: serde_json::Value = serde_json::from_str(meta).map_err(|_| StateError::Changed)?;
    let stamp_path = dir.join(VERIFIED);
    let stamp = std::fs::read_to_string(&stamp_path).unwrap_or_default();
    let mut fresh = Vec::new();
    for (file, path) in [(RAM, &pinned.ram), (DISK, &pinned.disk)] {
        let tampered = || StateError::Tampered {
            dir: dir.to_path_buf(),
            file,
        };
        let want = meta["sha256"][file].as_str().ok_or_else(tampered)?;
        let id = identity(path, want).map_err(|_| tampered())?;
        if !stamp.lines().any(|l| l == id) {
            if content_digest(path).map_err(|_| tampered())? != want {
                return Err(tampered());
            }
            fresh.push(id);
        }
    }
    if !fresh.is_empty() {
        // Best effort: without the stamp, the next resume hashes again.
        let mut text = stamp;
        text.extend(fresh.iter().map(|id| format!("{id}\n")));
        let _ = std::fs::write(&stamp_path, text);
    }
    Ok(())
}

/// The identity a `verified` line records for `path` with checksum `sum`.
fn identity(path: &Path, sum: &str) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    Ok(format!(
        "{} {} {} {}.{} {sum}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec()
    ))
}

/// Makes the files of a state just written read-only, hashes them and records them as
/// verified; returns the checksums for `meta.json`.
fn seal(dir: &Path) -> std::io::Result<serde_json::Value> {
    let mut sums = serde_json::Map::new();
    let mut stamp = String::new();
    for file in CHECKED {
        let path = dir.join(file);
        // Readable by all, writable by none: a contained QEMU runs as another user and
        // reads these through hard links in its own directory (the states directory itself
        // is 0700, so other users cannot reach them there).
        set_mode(&path, 0o444)?;
        let sum = content_digest(&path)?;
        stamp.push_str(&identity(&path, &sum)?);
        stamp.push('\n');
        sums.insert(file.into(), sum.into());
    }
    std::fs::write(dir.join(VERIFIED), stamp)?;
    Ok(sums.into())
}

/// SHA-256 over what a reader of `path` sees, reading only its data: every data extent
/// (found with SEEK_DATA/SEEK_HOLE) as offset, length and bytes, then the file's size. Holes
/// read as zeros, so two files with equal digests read the same: bytes written into a hole
/// add an extent, a hole punched removes one. `ram.bin` is 1 GiB with ~90 MB of data.
pub fn content_digest(path: &Path) -> std::io::Result<String> {
    use nix::unistd::{lseek, Whence};
    use sha2::{Digest, Sha256};
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path)?;
    let size = f.metadata()?.len();
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut pos: u64 = 0;
    while pos < size {
        let data = match lseek(f.as_raw_fd(), pos as i64, Whence::SeekData) {
            Ok(d) => d as u64,
            Err(nix::errno::Errno::ENXIO) => break, // only a hole is left
            Err(e) => return Err(e.into()),
        };
        let end = (lseek(f.as_raw_fd(), data as i64, Whence::SeekHole)? as u64).min(size);
        h.update(data.to_le_bytes());
        h.update((end - data).to_le_bytes());
        let mut at = data;
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            let n = f.read_at(&mut buf[..want], at)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            h.update(&buf[..n]);
            at += n as u64;
        }
        pos = end;
    }
    h.update(size.to_le_bytes());
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// How long a state of another format is kept: another runner version sharing the cache
/// (a CI cache restored for two branches, a developer switching builds) still resumes from
/// it, and deleting it would make the two versions re-save in turn, each job booting cold.
/// Older than this it belongs to a version nobody runs any more.
const OTHER_FORMAT_KEPT: Duration = Duration::from_secs(14 * 24 * 3600);

/// Removes saved states that cannot be resumed again: for a base image that is gone (rebuilt
/// or deleted), incomplete, or of another state format and saved over [`OTHER_FORMAT_KEPT`]
/// ago. Returns how many were removed.
pub fn prune(states_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(states_dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(key) = name.strip_suffix(&format!(".{UNSAVEABLE}")) {
            if unsaveable(&states_dir.join(key)).is_none() {
                let _ = std::fs::remove_file(&dir);
            }
            continue;
        }
        if name.starts_with('.') || name.contains(".discarded-") || !dir.is_dir() {
            continue; // saves in progress and discards are the sweep's business
        }
        let meta: Option<serde_json::Value> = std::fs::read_to_string(dir.join(META))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let saved_long_ago = || {
            std::fs::metadata(dir.join(META))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age > OTHER_FORMAT_KEPT)
        };
        let usable = meta.is_some_and(|m| {
            let base_there = m["base"].as_str().is_some_and(|b| Path::new(b).is_file());
            let format = m["format"].as_u64();
            if format != Some(u64::from(FORMAT)) {
                // Another version's: the rest of its checks are its own business.
                return format.is_some() && base_there && !saved_long_ago();
            }
            base_there && CHECKED.iter().all(|f| m["sha256"][f].is_string())
        });
        if !usable {
            discard(&dir);
            removed += 1;
        }
    }
    removed
}

/// Gives up on a state that failed: renamed away first, so a job already using it keeps its
/// files and a job saving a new one can take the name at once.
pub fn discard(dir: &Path) {
    let tomb = dir.with_extension(format!("discarded-{:08x}", rand::random::<u32>()));
    if std::fs::rename(dir, &tomb).is_ok() {
        let _ = std::fs::remove_dir_all(&tomb);
    }
}

/// Loads the state into a QEMU started with `-incoming defer`, and resumes it.
pub async fn restore(qmp: &mut QmpClient, state: &PinnedState) -> Result<(), StateError> {
    enable_mapped_ram(qmp).await?;
    let uri = format!("file:{}", state.ram.display());
    qmp.execute("migrate-incoming", Some(json!({ "uri": uri })), QMP_TIMEOUT)
        .await?;
    wait_for_migration(qmp).await?;
    qmp.execute("cont", None, QMP_TIMEOUT).await?;
    Ok(())
}

/// Opens `path` for reading only if it is a regular file and not a symlink: the VM directory
/// belongs to the VM user, and a compromised QEMU could put a link to a host secret there.
fn open_regular(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::other(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    Ok(file)
}

/// Copies the regular file `from` (never what a symlink there points to) to a new `to`.
fn copy_regular(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut src = open_regular(from)?;
    let mut dst = std::fs::File::create_new(to)?;
    std::io::copy(&mut src, &mut dst)?;
    Ok(())
}

/// Moves `from` (written by QEMU, perhaps as another user) to `to`, owned by us, read-only.
fn take_over(from: &Path, to: &Path) -> std::io::Result<()> {
    open_regular(from)?;
    if std::fs::rename(from, to).is_err() {
        // Another filesystem (a VM directory in the temp dir): copy.
        copy_regular(from, to)?;
        std::fs::remove_file(from)?;
    }
    // Through the descriptor: the name could have been swapped since the rename.
    let file = open_regular(to)?;
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    std::os::unix::fs::fchown(&file, Some(uid.as_raw()), Some(gid.as_raw()))?;
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o444))
}

/// The space the files of state `dir` take on disk (`ram.bin` is sparse: far less than
/// the guest's memory).
pub fn size_on_disk(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    [RAM, DISK, META]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .map(|m| m.blocks() * 512)
        .sum()
}

/// Largest `meta.json` read from a state that may come from elsewhere.
const MAX_META_BYTES: u64 = 64 * 1024;

/// `meta.json` of state `dir`, read bounded (the state may come from elsewhere).
fn read_meta(dir: &Path) -> Result<(String, serde_json::Value), StateError> {
    use std::io::Read;
    let path = dir.join(META);
    let mut text = String::new();
    open_regular(&path)
        .and_then(|f| f.take(MAX_META_BYTES).read_to_string(&mut text))
        .map_err(|source| StateError::Io {
            path: path.clone(),
            source,
        })?;
    let parsed = serde_json::from_str(&text).map_err(|_| StateError::Tampered {
        dir: dir.to_path_buf(),
        file: META,
    })?;
    Ok((text, parsed))
}

/// How [`rebase_disk`] changes a saved disk's backing file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rebase {
    /// Onto `base`, copying into the disk whatever its backing chain has above `base`: a VM
    /// resumed from a boot state writes on top of that state's disk, which goes with the
    /// VM's directory (`qemu-img rebase`, which copies only the layers above `base`).
    Flatten,
    /// Only the recorded path (`qemu-img rebase -u`): the caller has made sure `base` is
    /// the very image the disk was saved on, found here by its key and checksum — never a
    /// path taken from the state.
    Relocate,
}

/// Sets the backing file of state `dir`'s disk to `base` (see [`Rebase`]) and records the
/// disk's new checksum and base in its `meta.json`.
pub async fn rebase_disk(dir: &Path, base: &Path, how: Rebase) -> Result<(), StateError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    let (_, mut meta) = read_meta(dir)?;
    let (ram, disk) = (dir.join(RAM), dir.join(DISK));
    let base = base.canonicalize().unwrap_or_else(|_| base.to_path_buf());
    set_mode(&disk, 0o644).map_err(io(&disk))?;
    let mut rebase = tokio::process::Command::new("qemu-img");
    rebase.arg("rebase");
    if how == Rebase::Relocate {
        rebase.arg("-u");
    }
    rebase
        .args(["-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&disk);
    let out = crate::child::output_in_group(&mut rebase)
        .await
        .map_err(io(&disk))?;
    if !out.status.success() {
        return Err(StateError::Migration(format!(
            "qemu-img rebase of {} failed: {}",
            disk.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    set_mode(&disk, 0o444).map_err(io(&disk))?;
    let hashed = disk.clone();
    let disk_sum = tokio::task::spawn_blocking(move || content_digest(&hashed))
        .await
        .map_err(|_| StateError::Changed)?
        .map_err(io(&disk))?;
    let ram_sum = meta["sha256"][RAM]
        .as_str()
        .ok_or_else(|| StateError::Tampered {
            dir: dir.to_path_buf(),
            file: RAM,
        })?
        .to_string();
    // The RAM was hashed when the state was made (or verified just before): only the disk
    // is new.
    let stamp = format!(
        "{}\n{}\n",
        identity(&ram, &ram_sum).map_err(io(&ram))?,
        identity(&disk, &disk_sum).map_err(io(&disk))?
    );
    std::fs::write(dir.join(VERIFIED), stamp).map_err(io(dir))?;
    meta["base"] = json!(base);
    meta["sha256"][DISK] = json!(disk_sum);
    let path = dir.join(META);
    std::fs::write(&path, meta.to_string()).map_err(io(&path))
}

/// Makes the state in `from` — saved on this machine or another, perhaps unpacked from a CI
/// artifact — resumable here, as a new state directory `to`: its files are checked against
/// its checksums first; the RAM is hard-linked (copied across filesystems); the disk is
/// copied and [relocated](Rebase::Relocate) onto `base`, the local copy of the image it was
/// saved on.
pub async fn adopt(from: &Path, base: &Path, to: &Path) -> Result<(), StateError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    let (text, meta) = read_meta(from)?;
    if meta["format"].as_u64() != Some(u64::from(FORMAT)) {
        return Err(StateError::Migration(format!(
            "the state in {} was saved by another runner version (state format {}, this one reads {FORMAT})",
            from.display(),
            meta["format"]
        )));
    }
    let source = PinnedState {
        ram: from.join(RAM),
        disk: from.join(DISK),
    };
    let checked_from = from.to_path_buf();
    tokio::task::spawn_blocking(move || verify(&checked_from, &text, &source))
        .await
        .map_err(|_| StateError::Changed)??;
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        set_mode(parent, 0o700).map_err(io(parent))?;
    }
    std::fs::create_dir(to).map_err(io(to))?;
    let (ram, disk) = (to.join(RAM), to.join(DISK));
    if std::fs::hard_link(from.join(RAM), &ram).is_err() {
        let (src, dst) = (from.join(RAM), ram.clone());
        tokio::task::spawn_blocking(move || copy_regular(&src, &dst))
            .await
            .map_err(|_| StateError::Changed)?
            .map_err(io(&ram))?;
        set_mode(&ram, 0o444).map_err(io(&ram))?;
    }
    copy_regular(&from.join(DISK), &disk).map_err(io(&disk))?;
    let path = to.join(META);
    std::fs::write(&path, meta.to_string()).map_err(io(&path))?;
    rebase_disk(to, base, Rebase::Relocate).await
}

/// The base image a saved state's disk was made on (from its meta.json).
pub fn saved_base(dir: &Path) -> Option<PathBuf> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(META)).ok()?).ok()?;
    meta["base"].as_str().map(PathBuf::from)
}

fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `qemu-img` (or `qemu-io`) with `args`, which must succeed.
    fn qemu(tool: &str, args: &[&str]) -> String {
        let out = std::process::Command::new(tool)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{tool} {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[tokio::test]
    async fn a_flattened_disk_keeps_what_its_boot_states_layer_held() {
        // base ← boot (a boot state's disk, in a VM directory) ← overlay (the job's).
        let root = tempfile::tempdir().unwrap();
        let p = |name: &str| root.path().join(name).to_str().unwrap().to_string();
        qemu(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", &p("base.qcow2"), "4M"],
        );
        // A qcow2 layer `out` on top of `backing`.
        let layer = |backing: &str, out: &str| {
            qemu(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    "qcow2",
                    "-b",
                    &p(backing),
                    &p(out),
                ],
            )
        };
        layer("base.qcow2", "boot.qcow2");
        qemu("qemu-io", &["-c", "write -P 0x42 0 64k", &p("boot.qcow2")]);
        layer("boot.qcow2", "overlay.qcow2");
        qemu(
            "qemu-io",
            &["-c", "write -P 0x17 1M 64k", &p("overlay.qcow2")],
        );
        let dir = root.path().join("state");
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(dir.join(RAM), "ram").unwrap();
        std::fs::copy(p("overlay.qcow2"), dir.join(DISK)).unwrap();
        let sums = seal(&dir).unwrap();
        let meta = json!({"format": FORMAT, "id": "1", "base": p("base.qcow2"), "sha256": sums});
        std::fs::write(dir.join(META), meta.to_string()).unwrap();

        rebase_disk(&dir, Path::new(&p("base.qcow2")), Rebase::Flatten)
            .await
            .unwrap();
        // The boot layer goes with its VM; the saved disk no longer needs it.
        std::fs::remove_file(p("boot.qcow2")).unwrap();
        let disk = dir.join(DISK);
        let disk = disk.to_str().unwrap();
        let info = qemu("qemu-img", &["info", "-U", "--output=json", disk]);
        assert!(
            info.contains(&format!("\"backing-filename\": \"{}\"", p("base.qcow2"))),
            "{info}"
        );
        qemu(
            "qemu-io",
            &[
                "-r",
                "-U",
                "-c",
                "read -P 0x42 0 64k",
                "-c",
                "read -P 0x17 1M 64k",
                disk,
            ],
        );
        // And it is a state that pins: the new checksum is recorded.
        let vm = root.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        pin(&dir, &vm).unwrap();
    }

    #[test]
    fn a_symlink_in_the_vm_directory_is_never_followed() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "key").unwrap();
        let link = dir.path().join("saved-ram.bin");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(take_over(&link, &dir.path().join("ram.bin")).is_err());
        assert!(copy_regular(&link, &dir.path().join("disk.qcow2")).is_err());
        assert!(!dir.path().join("disk.qcow2").exists());
        // A regular file is taken over: read-only.
        let ram = dir.path().join("real-ram.bin");
        std::fs::write(&ram, "ram").unwrap();
        take_over(&ram, &dir.path().join("ram.bin")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("ram.bin"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o444);
    }

    #[test]
    fn prune_keeps_only_resumable_states() {
        let root = tempfile::tempdir().unwrap();
        let base = root.path().join("rootfs.qcow2");
        std::fs::write(&base, "disk").unwrap();
        // (state name, meta.json, kept?)
        let cases = [
            (
                "good",
                json!({"format": FORMAT, "base": base, "sha256": {RAM: "a", DISK: "b"}})
                    .to_string(),
                true,
            ),
            (
                "no-checksums",
                json!({"format": FORMAT, "base": base}).to_string(),
                false,
            ),
            (
                "other-format-recent",
                json!({"format": FORMAT + 1, "base": base}).to_string(),
                true,
            ),
            (
                "other-format-old",
                json!({"format": FORMAT - 1, "base": base}).to_string(),
                false,
            ),
            (
                "image-gone",
                json!({"format": FORMAT, "base": "/nonexistent/rootfs.qcow2"}).to_string(),
                false,
            ),
            ("no-meta", String::new(), false),
        ];
        for (name, meta, _) in &cases {
            let d = root.path().join(name);
            std::fs::create_dir(&d).unwrap();
            if !meta.is_empty() {
                std::fs::write(d.join(META), meta).unwrap();
            }
        }
        // Saved 15 days ago by a version not run since.
        let old = std::fs::File::options()
            .write(true)
            .open(root.path().join("other-format-old").join(META))
            .unwrap();
        old.set_modified(std::time::SystemTime::now() - Duration::from_secs(15 * 24 * 3600))
            .unwrap();
        // A save in progress is left alone.
        std::fs::create_dir(root.path().join(".saving-x")).unwrap();
        assert_eq!(prune(root.path()), 4);
        for (name, _, kept) in cases {
            assert_eq!(root.path().join(name).exists(), kept, "{name}");
        }
        assert!(root.path().join(".saving-x").exists());
    }

    #[test]
    fn an_unsaveable_mark_lasts_its_time_then_prune_drops_it() {
        let root = tempfile::tempdir().unwrap();
        // A key with dots of its own, like every real one ("...-qemu10.0.2-f5").
        let dir = root.path().join("img-tcg-2c-1024m-qemu10.0.2-f5");
        assert!(unsaveable(&dir).is_none());
        mark_unsaveable(&dir, "its last 4 saves failed (the check)\nsecond line");
        let marker = root
            .path()
            .join("img-tcg-2c-1024m-qemu10.0.2-f5.unsaveable");
        assert!(marker.is_file());
        let (why, left) = unsaveable(&dir).expect("marked");
        assert_eq!(why, "its last 4 saves failed (the check)");
        assert!(
            left <= UNSAVEABLE_FOR && left > UNSAVEABLE_FOR / 2,
            "{left:?}"
        );
        // A fresh mark survives a prune; one older than UNSAVEABLE_FOR does not count, and
        // the prune removes it.
        assert_eq!(prune(root.path()), 0);
        assert!(marker.is_file());
        let old = std::time::SystemTime::now() - UNSAVEABLE_FOR - Duration::from_secs(1);
        std::fs::File::options()
            .write(true)
            .open(&marker)
            .unwrap()
            .set_modified(old)
            .unwrap();
        assert!(unsaveable(&dir).is_none());
        prune(root.path());
        assert!(!marker.exists());
    }

    #[test]
    fn a_published_state_clears_the_mark_and_a_dropped_one_leaves_nothing() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("key-qemu10.0.2-f5");
        mark_unsaveable(&dir, "failed");
        let staged = |name: &str| {
            let d = root.path().join(name);
            std::fs::create_dir(&d).unwrap();
            Staged { dir: d }
        };
        drop(staged(".saving-a"));
        assert!(!root.path().join(".saving-a").exists());
        staged(".saving-b").publish(&dir);
        assert!(dir.is_dir() && unsaveable(&dir).is_none());
        // Another job's state already there: ours goes, theirs stays.
        staged(".saving-c").publish(&dir);
        assert!(!root.path().join(".saving-c").exists() && dir.is_dir());
    }

    #[test]
    fn completeness_needs_all_three_files() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_complete(dir.path()));
        for f in [RAM, DISK] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        // meta.json is written last: without it the state is still being made.
        assert!(!is_complete(dir.path()));
        std::fs::write(dir.path().join(META), "{}").unwrap();
        assert!(is_complete(dir.path()));
    }

    /// A sealed state like `save` leaves it: a sparse ram.bin (data at 1 MiB in 8 MiB), a
    /// disk, meta.json with the checksums, the `verified` stamp.
    fn sealed_state(root: &Path) -> PathBuf {
        use std::os::unix::fs::FileExt;
        let dir = root.join("state");
        std::fs::create_dir(&dir).unwrap();
        let ram = std::fs::File::create(dir.join(RAM)).unwrap();
        ram.write_all_at(b"guest memory", 1 << 20).unwrap();
        ram.set_len(8 << 20).unwrap();
        std::fs::write(dir.join(DISK), "qcow2").unwrap();
        let sums = seal(&dir).unwrap();
        let meta = json!({"format": FORMAT, "id": "1", "base": "/b", "sha256": sums});
        std::fs::write(dir.join(META), meta.to_string()).unwrap();
        dir
    }

    fn rewrite(path: &Path, edit: impl FnOnce(&std::fs::File)) {
        set_mode(path, 0o600).unwrap();
        edit(&std::fs::OpenOptions::new().write(true).open(path).unwrap());
        set_mode(path, 0o400).unwrap();
    }

    #[test]
    fn a_sealed_state_pins_and_its_files_are_read_only() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let dir = sealed_state(root.path());
        let vm = root.path().join("vm");
        std::fs::create_dir(&vm).unwrap();
        let pinned = pin(&dir, &vm).unwrap();
        assert_eq!(pinned.ram, vm.join("state-ram.bin"));
        for f in CHECKED {
            let mode = std::fs::metadata(dir.join(f)).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o444, "{f}");
        }
    }

    #[test]
    fn a_tampered_state_is_refused() {
        use std::os::unix::fs::FileExt;
        // (what was done to the state, after it was sealed)
        type Tamper = Box<dyn Fn(&Path)>;
        let cases: Vec<(&str, Tamper)> = vec![
            (
                "a byte of data changed",
                Box::new(|d| rewrite(&d.join(RAM), |f| f.write_all_at(b"G", 1 << 20).unwrap())),
            ),
            (
                "bytes written into a hole",
                Box::new(|d| rewrite(&d.join(RAM), |f| f.write_all_at(b"x", 4 << 20).unwrap())),
            ),
            (
                "truncated",
                Box::new(|d| rewrite(&d.join(RAM), |f| f.set_len(2 << 20).unwrap())),
            ),
            (
                "the disk replaced",
                Box::new(|d| rewrite(&d.join(DISK), |f| f.write_all_at(b"QCOW", 0).unwrap())),
            ),
            (
                "no checksums in meta.json",
                Box::new(|d| std::fs::write(d.join(META), r#"{"format":4}"#).unwrap()),
            ),
        ];
        for (what, tamper) in cases {
            let root = tempfile::tempdir().unwrap();
            let dir = sealed_state(root.path());
            tamper(&dir);
            let vm = root.path().join("vm");
            std::fs::create_dir(&vm).unwrap();
            match pin(&dir, &vm) {
                Err(StateError::Tampered { .. }) => {}
                other => panic!("{what}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_digest_covers_holes_without_reading_them() {
        use std::os::unix::fs::FileExt;
        let root = tempfile::tempdir().unwrap();
        let a = root.path().join("a");
        let f = std::fs::File::create(&a).unwrap();
        f.write_all_at(b"data", 4096).unwrap();
        f.set_len(1 << 30).unwrap();
        let started = std::time::Instant::now();
        let sum = content_digest(&a).unwrap();
        // 1 GiB of holes would take seconds to read; the extents take nothing.
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert_eq!(sum, content_digest(&a).unwrap());
        // Same data, different size: different content.
        f.set_len(1 << 29).unwrap();
        assert_ne!(sum, content_digest(&a).unwrap());
    }
}
