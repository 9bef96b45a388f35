//! The image's root filesystem as a directory on the host (user mode's root), unpacked once
//! per image into `<cache>/sysroots/<image key>/root` and shared read-only by every job.
//! Unpacked without mounting anything (no root, no loop devices): `qemu-img convert` to a
//! raw ext4 file, then e2fsprogs' `debugfs rdump`, which keeps modes, links and symlinks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use super::UserError;
use crate::image::store::{BaseImage, ImageStore};

/// How long the unpacking tools may take (seconds for the images we ship).
const UNPACK_TIMEOUT: Duration = Duration::from_secs(600);
/// How long to wait for another runner unpacking the same image.
const LOCK_TIMEOUT: Duration = Duration::from_secs(900);
/// Written last: the directory is complete.
const COMPLETE: &str = ".complete";
/// Programs every step needs in the sysroot.
const NEEDED: [&str; 2] = ["bin/sh", "usr/bin/setpriv"];

/// `<cache>/sysroots/<image key>`.
pub fn dir_for(store: &ImageStore, image: &BaseImage) -> PathBuf {
    let key = image
        .dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    store.root().join("sysroots").join(key)
}

/// The unpacked root of `image`, unpacking it first if this is its first use.
pub async fn ensure(store: &ImageStore, image: &BaseImage) -> Result<PathBuf, UserError> {
    let dir = dir_for(store, image);
    let root = dir.join("root");
    if dir.join(COMPLETE).is_file() {
        return Ok(root);
    }
    std::fs::create_dir_all(&dir).map_err(|e| UserError::io(&dir, e))?;
    let lock_path = dir.with_extension("lock");
    let _lock = lock(&lock_path, &dir).await?;
    if dir.join(COMPLETE).is_file() {
        return Ok(root);
    }
    // A half-unpacked tree from a runner that died is started over.
    if root.exists() {
        std::fs::remove_dir_all(&root).map_err(|e| UserError::io(&root, e))?;
    }
    let staging = tempfile::Builder::new()
        .prefix(".unpack-")
        .tempdir_in(&dir)
        .map_err(|e| UserError::io(&dir, e))?;
    let raw = staging.path().join("rootfs.raw");
    let tree = staging.path().join("root");
    std::fs::create_dir(&tree).map_err(|e| UserError::io(&tree, e))?;
    let fail = |why: String| UserError::Sysroot {
        dir: dir.clone(),
        why,
    };
    run(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&image.rootfs)
            .arg(&raw),
        "qemu-img convert",
    )
    .await
    .map_err(fail)?;
    let mut rdump = std::ffi::OsString::from("rdump / ");
    rdump.push(&tree);
    run(
        Command::new("debugfs").arg("-R").arg(&rdump).arg(&raw),
        "debugfs rdump",
    )
    .await
    .map_err(fail)?;
    for needed in NEEDED {
        if std::fs::symlink_metadata(tree.join(needed)).is_err() {
            return Err(fail(format!("the image has no /{needed}")));
        }
    }
    // The mount point of the job's workspace (bwrap would otherwise create it in the
    // shared tree on first use).
    let ws = tree.join("workspace");
    std::fs::create_dir_all(&ws).map_err(|e| UserError::io(&ws, e))?;
    std::fs::rename(&tree, &root).map_err(|e| UserError::io(&root, e))?;
    std::fs::write(dir.join(COMPLETE), b"").map_err(|e| UserError::io(&dir, e))?;
    Ok(root)
}

/// Runs an unpacking tool in its own process group, bounded in time.
async fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    match tokio::time::timeout(UNPACK_TIMEOUT, crate::child::output_in_group(cmd)).await {
        Err(_) => Err(format!("{what} took longer than {UNPACK_TIMEOUT:?}")),
        Ok(Err(e)) => Err(format!("cannot run {what}: {e} (run scripts/setup-host)")),
        Ok(Ok(out)) if out.status.success() => {
            // debugfs reports some failures only on stderr, with status 0.
            let err = String::from_utf8_lossy(&out.stderr);
            match err
                .lines()
                .find(|l| l.contains("rdump:") || l.contains("rdump_"))
            {
                Some(line) => Err(format!("{what}: {}", line.trim())),
                None => Ok(()),
            }
        }
        Ok(Ok(out)) => Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

async fn lock(path: &Path, dir: &Path) -> Result<crate::lockfile::Held, UserError> {
    crate::lockfile::take(path, LOCK_TIMEOUT, || {})
        .await
        .map_err(|e| UserError::io(path, e))?
        .ok_or_else(|| UserError::Locked {
            dir: dir.into(),
            lock: path.into(),
        })
}
