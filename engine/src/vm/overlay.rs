//! Copy-on-write overlays: a job's disk is a fresh qcow2 whose backing file is the read-only
//! base image, so the base is never written.

use std::path::{Path, PathBuf};

use tokio::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("qemu-img not found; run scripts/setup-host")]
    QemuImgMissing,
    #[error("failed to create overlay for {base}: {stderr}")]
    Create { base: PathBuf, stderr: String },
    #[error("failed to run qemu-img for {base}")]
    Run {
        base: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Creates `overlay` backed by `base` (qcow2).
pub async fn create_overlay(base: &Path, overlay: &Path) -> Result<(), OverlayError> {
    let out = crate::child::output_in_group(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(overlay),
    )
    .await
    .map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => OverlayError::QemuImgMissing,
        _ => OverlayError::Run {
            base: base.into(),
            source,
        },
    })?;
    if !out.status.success() {
        return Err(OverlayError::Create {
            base: base.into(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}
