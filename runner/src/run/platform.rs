//! Host-side preparation shared by every command that boots VMs: QEMU for the arch, the
//! accelerator decision, and the base image (built on first use).

use engine::image::{self, BaseImage, BuildOptions, ImageName, ImageStore, RecipeLookup};
use engine::qemu::host::{self as qhost, AccelChoice, AccelDecision, QemuBinary};
use engine::Arch;

use crate::outcome::{InfraKind, Outcome};

/// Everything needed to boot VMs of one architecture.
#[derive(Debug, Clone)]
pub struct Platform {
    pub arch: Arch,
    pub qemu: QemuBinary,
    pub accel: AccelDecision,
}

/// Finds QEMU for `arch` and decides the accelerator (what QEMU says about itself is cached
/// in the store while the binary is unchanged, the KVM probe's verdict until the host reboots).
pub async fn resolve(
    arch: Arch,
    accel: AccelChoice,
    store: &ImageStore,
) -> Result<Platform, Outcome> {
    let host_err = |e: &dyn std::error::Error| Outcome::InfraError {
        kind: InfraKind::Host,
        message: image::build::error_chain(e),
    };
    let qemu = qhost::qemu_for_cached(arch, Some(&store.root().join("qemu")))
        .await
        .map_err(|e| host_err(&e))?;
    let accel = qhost::choose_accel(arch, accel, Some(&store.root().join("kvm-probe.json")))
        .await
        .map_err(|e| host_err(&e))?;
    Ok(Platform { arch, qemu, accel })
}

/// The base image `name` for `platform`, built first if it is not cached; its recipe comes
/// from where `recipes` allows.
pub async fn base_image(
    store: &ImageStore,
    name: &ImageName,
    recipes: &RecipeLookup,
    platform: &Platform,
    mirror: Option<String>,
    force: bool,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<BaseImage, Outcome> {
    let config_error = |e: &dyn std::error::Error| Outcome::InfraError {
        kind: InfraKind::Config,
        message: image::build::error_chain(e),
    };
    let recipe = recipes.find(name).map_err(|e| config_error(&e))?;
    // Before the QEMU/KVM checks and any download: asking mipsel of a trixie image is the
    // caller's mistake, with the images that would do named.
    image::build::check_distribution(&recipe, platform.arch).map_err(|e| config_error(&e))?;
    let opts = BuildOptions {
        mirror,
        qemu: platform.qemu.clone(),
        accel: platform.accel.accel,
        force,
    };
    image::ensure_image(store, &recipe, platform.arch, &opts, progress)
        .await
        .map_err(|e| Outcome::InfraError {
            kind: if e.is_disk_full() {
                InfraKind::Io
            } else {
                InfraKind::Image
            },
            message: image::build::error_chain(&e),
        })
}
