//! Saved VM states: a job can resume a VM saved right after boot instead of booting the
//! kernel again (a cold boot under TCG takes seconds; resuming a fraction of one).
//!
//! A state directory holds `ram.bin` (QEMU's `mapped-ram` migration stream: RAM at fixed
//! offsets, sparse), `disk.qcow2` (the VM's overlay at save time, backed by the base image)
//! and `meta.json`. It is valid only for the exact QEMU command line it was saved from, so
//! callers key its path on image, architecture, accelerator, vCPUs, memory and QEMU version.
//! Writes are atomic (staging directory, then rename).

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio::net::UnixStream;

use crate::agent::{AgentClient, AgentError, ExecRequest, ExecStatus};
use crate::qemu::qmp::{QmpClient, QmpError};

/// How long saving or loading a state may take (1 GiB of RAM takes well under a second).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);
/// Poll interval for `query-migrate`.
const MIGRATION_POLL: Duration = Duration::from_millis(10);
const QMP_TIMEOUT: Duration = Duration::from_secs(5);
const AGENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the post-resume reseed-and-sleep may take before the state counts as broken.
const RESUME_CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Bumped when what a saved guest contains or the QEMU command line changes (2: the output
/// relay; 3: riscv64 without Sstc), so that states saved by an older runner are not resumed;
/// callers put it in the state's key.
pub const FORMAT: u32 = 3;

const RAM: &str = "ram.bin";
const DISK: &str = "disk.qcow2";
const META: &str = "meta.json";

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

/// Saves the running VM (whose disk is `overlay`) to `dir`, then lets it run on. The VM is
/// resumed on every path, so a failed save never costs the job.
pub async fn save(
    qmp: &mut QmpClient,
    overlay: &Path,
    base: &Path,
    dir: &Path,
) -> Result<(), StateError> {
    let parent = dir.parent().unwrap_or(Path::new("."));
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StateError::Io { path, source }
    };
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let staging = tempfile::Builder::new()
        .prefix(".saving-")
        .tempdir_in(parent)
        .map_err(io(parent))?;
    // `stop` also flushes the disk, so the overlay file is complete while we copy it.
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
        take_over(&scratch, &saved_ram).map_err(io(&saved_ram))?;
        let saved_disk = staging.path().join(DISK);
        copy_regular(overlay, &saved_disk).map_err(io(&saved_disk))?;
        read_only(&saved_disk).map_err(io(&saved_disk))?;
        let meta = staging.path().join(META);
        let id = format!("{:016x}", rand::random::<u64>());
        let record = json!({"format": FORMAT, "id": id, "base": base});
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
    let staged = staging.keep();
    if std::fs::rename(&staged, dir).is_err() {
        // Another job saved the same state first; theirs is as good as ours.
        let _ = std::fs::remove_dir_all(&staged);
    }
    Ok(())
}

/// The files of one saved state, pinned for one VM.
#[derive(Debug, Clone)]
pub struct PinnedState {
    pub ram: PathBuf,
    pub disk: PathBuf,
}

/// Hard-links the state's RAM and disk into `vm_dir`, so that the VM reads one consistent
/// state even if another job replaces or discards `dir` meanwhile. (Where links are not
/// possible, e.g. across filesystems, the state is used in place.)
pub fn pin(dir: &Path, vm_dir: &Path) -> Result<PinnedState, StateError> {
    let id = || std::fs::read_to_string(dir.join(META)).ok();
    let before = id().ok_or(StateError::Changed)?;
    let ram = vm_dir.join("state-ram.bin");
    let disk = vm_dir.join("state-disk.qcow2");
    let linked = std::fs::hard_link(dir.join(RAM), &ram)
        .and_then(|_| std::fs::hard_link(dir.join(DISK), &disk));
    if linked.is_err() {
        let _ = std::fs::remove_file(&ram);
        return Ok(PinnedState {
            ram: dir.join(RAM),
            disk: dir.join(DISK),
        });
    }
    if id().as_ref() != Some(&before) {
        return Err(StateError::Changed);
    }
    Ok(PinnedState { ram, disk })
}

/// Removes saved states that can never be resumed again: written by another state format, or
/// for a base image that is gone (rebuilt or deleted). Returns how many were removed.
pub fn prune(states_dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(states_dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let dir = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name.contains(".discarded-") || !dir.is_dir() {
            continue; // saves in progress and discards are the sweep's business
        }
        let meta: Option<serde_json::Value> = std::fs::read_to_string(dir.join(META))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let usable = meta.is_some_and(|m| {
            m["format"].as_u64() == Some(u64::from(FORMAT))
                && m["base"].as_str().is_some_and(|b| Path::new(b).is_file())
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

/// What a resumed guest needs: the host's time (its clock stopped at save time) and fresh
/// entropy (every job resumed from one state starts with the same RNG state). The reseed runs
/// as a guest process while the clock is set, so the two overlap.
pub async fn after_restore(agent: &mut AgentClient<UnixStream>) -> Result<(), AgentError> {
    // Mixed-in bytes only reach readers at the next reseed, which a resumed guest would not
    // do for a while (its clock was stopped): write fresh bytes, then force a reseed
    // (RNDRESEEDCRNG). perl-base is in Debian's Essential set, so every image has it.
    let seed: [u8; 32] = rand::random();
    let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
    let req = ExecRequest {
        path: "/usr/bin/perl".into(),
        args: vec![
            "-e".into(),
            "open(my $f, '>', '/dev/urandom') or die $!; syswrite($f, pack('H*', $ARGV[0])) or die $!; \
             ioctl($f, 0x5207, 0) or die \"RNDRESEEDCRNG: $!\"; select(undef, undef, undef, 0.02);"
                .into(),
            hex,
        ],
        env: vec![("PATH".into(), "/usr/bin:/bin".into())],
    };
    let pid = agent.exec(&req, AGENT_TIMEOUT).await?;
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
    // The process ends with a 20 ms sleep: some saved riscv64 states resume with timers that
    // never fire (every sleep hangs), and such a VM is useless. Not ending in time is how we
    // notice; the caller then discards the state and boots cold.
    let deadline = tokio::time::Instant::now() + RESUME_CHECK_TIMEOUT;
    match agent
        .wait_exit(pid, deadline, Duration::from_millis(50))
        .await?
    {
        ExecStatus::Exited(0) => Ok(()),
        ExecStatus::Running => Err(AgentError::Command {
            command: "check the resumed guest".into(),
            desc: format!(
                "a 20 ms sleep did not end within {RESUME_CHECK_TIMEOUT:?}: its timers do not fire"
            ),
        }),
        other => Err(AgentError::Command {
            command: "reseed the guest RNG".into(),
            desc: format!("{other:?}"),
        }),
    }
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

/// The base image a saved state's disk was made on (from its meta.json).
pub fn saved_base(dir: &Path) -> Option<PathBuf> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(META)).ok()?).ok()?;
    meta["base"].as_str().map(PathBuf::from)
}

fn read_only(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
}

#[cfg(test)]
mod tests {
    use super::*;

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
                json!({"format": FORMAT, "base": base}).to_string(),
                true,
            ),
            (
                "old-format",
                json!({"format": 1, "base": base}).to_string(),
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
        // A save in progress is left alone.
        std::fs::create_dir(root.path().join(".saving-x")).unwrap();
        assert_eq!(prune(root.path()), 3);
        for (name, _, kept) in cases {
            assert_eq!(root.path().join(name).exists(), kept, "{name}");
        }
        assert!(root.path().join(".saving-x").exists());
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
}
