//! Base images: recipes, the builder (Debian's own tooling, then a one-time bake inside the
//! guest), the initramfs, and the content-addressed cache with verification.

pub mod build;
pub mod fakeroot;
pub mod initramfs;
pub mod recipe;
pub mod store;

use std::path::{Path, PathBuf};

pub use build::{ensure_image, BuildOptions};
pub use recipe::{
    ImageName, InvalidImageName, Recipe, RecipeError, RecipeLookup, RecipeOrigin, RepositoryRecipes,
};
pub use store::{BaseImage, ImageStore, Manifest};

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error("cached image {dir} is corrupt: {what}; rebuild it with `runner images build --force --arch ARCH`")]
    Corrupt { dir: PathBuf, what: String },
    #[error("{}", io_message(path, source))]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error("the image bake (configuring packages inside the guest) failed: {detail}")]
    Bake {
        detail: String,
        /// The VM failed (no boot, its agent silent), not the bake script: worth a retry.
        vm_failed: bool,
    },
    #[error("image '{image}' is Debian {distribution}, which has no {arch} kernel QEMU can boot; {arch} runs on: {alternatives}")]
    ArchNotInDistribution {
        image: String,
        distribution: String,
        arch: crate::arch::Arch,
        alternatives: String,
    },
    #[error("another runner is building {what}; waited too long for its lock {lock}")]
    Locked { what: String, lock: PathBuf },
}

impl ImageError {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        ImageError::Io {
            path: path.into(),
            source,
        }
    }

    /// Whether this failure is the host's disk being full.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, ImageError::Io { source, .. } if source.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32))
    }
}

fn io_message(path: &Path, source: &std::io::Error) -> String {
    if source.raw_os_error() == Some(nix::errno::Errno::ENOSPC as i32) {
        format!(
            "no space left on the device holding {}; free some space or point RUNNER_CACHE_DIR at a bigger disk",
            path.display()
        )
    } else {
        format!("cannot write {}", path.display())
    }
}
