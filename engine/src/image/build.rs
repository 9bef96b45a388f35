//! The image builder. Debian's own tools do the work: mmdebstrap resolves and downloads the
//! packages with apt (signed Release file → checksummed .debs) and extracts them without
//! running foreign code; depmod indexes the modules; mkfs.ext4 fills the disk from a
//! directory. Maintainer scripts then run inside the guest itself, booted by the engine (under
//! TCG, or KVM for a guest of the host's architecture when KVM works): the one-time "bake". No
//! root-only host changes: no binfmt, loop mounts or chroot.
//!
//! No root either: extraction and `mkfs.ext4 -d` run in one fakeroot session (image/fakeroot.rs),
//! so the files in the image are owned as the packages say (root, or e.g. `root:shadow` for
//! unix_chkpwd) whoever runs the build. Root takes the same path, so CI exercises what users
//! run.
//!
//! Writes are atomic: everything happens in a staging directory that is renamed into place
//! only when complete, so a half-built image is never visible.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::process::Command;

use crate::arch::Arch;
use crate::image::recipe::Recipe;
use crate::image::store::{self, Artifact, BaseImage, ImageStore, Manifest};
use crate::image::ImageError;
use crate::image::{fakeroot, initramfs};
use crate::qemu::host::QemuBinary;
use crate::qemu::spec::Accel;
use crate::vm::{CommandEnd, DiskSource, Vm, VmConfig};

/// How long the bake VM may take to boot (first boot of a fresh disk).
const BAKE_BOOT_TIMEOUT: Duration = Duration::from_secs(180);
/// How long configuring all packages under TCG may take.
const BAKE_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long to wait for another process building the same image.
const LOCK_TIMEOUT: Duration = Duration::from_secs(60 * 60);

/// Configures every extracted package with dpkg, inside the guest. The kernel package is
/// left unregistered: the host boots the kernel itself, and registering it would pull in
/// initramfs-tools and rebuild an initramfs nobody uses (minutes under TCG).
const BAKE_SCRIPT: &str = r#"
export DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true LC_ALL=C.UTF-8
printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
chmod 755 /usr/sbin/policy-rc.d
cd /var/cache/apt/archives
debs=$(ls *.deb | grep -v -E '^(linux-image-|initramfs-tools|klibc-utils|libklibc|dracut)')
dpkg --install --force-depends $debs
rm -f /usr/sbin/policy-rc.d /var/cache/apt/archives/*.deb /var/cache/apt/*.bin
rm -rf /boot/* /var/lib/apt/lists/* /var/log/dpkg.log /var/log/apt
mkdir -p /workspace
sync
fstrim / || true
"#;

/// The `--setup-hook` that turns the empty target into a merged-/usr tree: each top-level
/// library and binary directory is a link into /usr. The union of every architecture's
/// list; links to directories no package fills are harmless.
const MERGED_USR_HOOK: &str = r#"for d in bin sbin lib lib32 lib64 libx32 libo32; do mkdir -p "$1/usr/$d" && ln -s "usr/$d" "$1/$d"; done"#;

/// Knobs for building.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Overrides the recipe's mirror.
    pub mirror: Option<String>,
    pub qemu: QemuBinary,
    pub accel: Accel,
    /// Rebuild even when a valid image exists.
    pub force: bool,
}

/// Refuses, before anything is downloaded, an image whose Debian release is known to lack
/// `arch` (mips on trixie, riscv64 on bookworm), naming the built-in images that carry it.
pub fn check_distribution(recipe: &Recipe, arch: Arch) -> Result<(), ImageError> {
    if arch.in_distribution(&recipe.distribution) != Some(false) {
        return Ok(());
    }
    Err(ImageError::ArchNotInDistribution {
        image: recipe.name.to_string(),
        distribution: recipe.distribution.clone(),
        arch,
        alternatives: arch
            .images()
            .iter()
            .map(|i| format!("--image {i}"))
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Returns the image for (recipe, arch), building it first when it is not in the cache.
/// `progress` receives one-line status messages.
pub async fn ensure_image(
    store: &ImageStore,
    recipe: &Recipe,
    arch: Arch,
    opts: &BuildOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<BaseImage, ImageError> {
    check_distribution(recipe, arch)?;
    // The operator's --mirror is part of what is built, so part of the hash.
    let recipe = &match &opts.mirror {
        Some(m) => recipe.with_mirror(m)?,
        None => recipe.clone(),
    };
    let hash = recipe.hash(arch, initramfs::INIT_SCRIPT);
    if !opts.force {
        if let Some(image) = store.open_off_runtime(&recipe.name, arch, &hash).await? {
            return Ok(image);
        }
    }
    std::fs::create_dir_all(store.images_dir())
        .map_err(|e| ImageError::io(&store.images_dir(), e))?;
    let lock_path = store
        .images_dir()
        .join(format!(".{}-{arch}.lock", recipe.name));
    let _lock = lock(&lock_path, &format!("{} for {arch}", recipe.name), progress).await?;
    // Someone else may have finished it while we waited.
    if !opts.force {
        if let Some(image) = store.open_off_runtime(&recipe.name, arch, &hash).await? {
            return Ok(image);
        }
    }
    let started = Instant::now();
    let staging = tempfile::Builder::new()
        .prefix(".staging-")
        .tempdir_in(store.images_dir())
        .map_err(|e| ImageError::io(&store.images_dir(), e))?;
    let manifest = build_into(store, recipe, arch, &hash, opts, staging.path(), progress).await?;
    let manifest = Manifest {
        build_seconds: started.elapsed().as_secs_f64(),
        ..manifest
    };
    let text = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    let mpath = staging.path().join(store::MANIFEST);
    std::fs::write(&mpath, text).map_err(|e| ImageError::io(&mpath, e))?;
    for name in [store::KERNEL, store::INITRD, store::ROOTFS, store::MANIFEST] {
        read_only(&staging.path().join(name))?;
    }
    let final_dir = store.image_dir(&recipe.name, arch, &hash);
    if final_dir.exists() {
        // --force: move the old one aside first so the rename stays atomic.
        let old = staging.path().with_extension("old");
        std::fs::rename(&final_dir, &old).map_err(|e| ImageError::io(&final_dir, e))?;
        let _ = std::fs::remove_dir_all(&old);
    }
    let staged = staging.keep();
    std::fs::rename(&staged, &final_dir).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staged);
        ImageError::io(&final_dir, e)
    })?;
    progress(&format!(
        "built {} for {arch} in {:.0} s",
        recipe.name,
        started.elapsed().as_secs_f64()
    ));
    store
        .open_off_runtime(&recipe.name, arch, &hash)
        .await?
        .ok_or_else(|| ImageError::Corrupt {
            dir: final_dir,
            what: "vanished right after it was built".into(),
        })
}

async fn build_into(
    store: &ImageStore,
    recipe: &Recipe,
    arch: Arch,
    hash: &str,
    opts: &BuildOptions,
    staging: &Path,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<Manifest, ImageError> {
    let rootfs = staging.join("rootfs");
    let session = fakeroot::Session::new(staging.join("fakeroot.state"));
    progress(&format!(
        "downloading and extracting {} packages for {arch} from {}",
        recipe.distribution, recipe.mirror
    ));
    mmdebstrap(recipe, arch, &rootfs, &session).await?;

    let kernel_version = kernel_version(&rootfs)?;
    let kernel_src = find_kernel(&rootfs, &kernel_version)?;
    let kernel = staging.join(store::KERNEL);
    std::fs::copy(&kernel_src, &kernel).map_err(|e| ImageError::io(&kernel, e))?;
    let packages = package_versions(&rootfs)?;

    progress("indexing kernel modules and building the initramfs");
    run_tool(
        Command::new("depmod")
            .arg("-b")
            .arg(&rootfs)
            .arg(&kernel_version),
        "depmod",
    )
    .await?;
    let initrd = staging.join(store::INITRD);
    initramfs::build(&rootfs, &kernel_version, staging, &initrd).await?;
    seed_config(&rootfs)?;

    progress("creating the root filesystem");
    let raw = staging.join("rootfs.raw");
    // In the extraction's fakeroot session: mkfs.ext4 copies each file's owner as fakeroot
    // reports it (what the .deb said), not the real one (the building user).
    run_tool(
        session
            .command("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-L",
                "runner-root",
                "-E",
                "root_owner=0:0",
                "-d",
            ])
            .arg(&rootfs)
            .arg(&raw)
            .arg(format!("{}k", recipe.disk_size_bytes / 1024)),
        "mkfs.ext4",
    )
    .await?;
    // The extracted tree is in the disk now; free the space before the bake.
    let _ = std::fs::remove_dir_all(&rootfs);
    drop(session);
    let _ = std::fs::remove_dir_all(staging.join("initramfs"));

    progress(&format!(
        "configuring packages inside a {arch} guest (one-time bake under {})",
        opts.accel.name()
    ));
    // A bake whose VM failed (the agent silent for minutes: a one-CPU malta guest on a
    // loaded 2-core host did that about once in three cold builds) is tried once more from
    // the disk as it was before, kept as a sparse copy; a failure of the script is final.
    let untouched = staging.join("rootfs.raw.untouched");
    run_tool(
        Command::new("cp")
            .args(["--sparse=always", "--reflink=auto"])
            .arg(&raw)
            .arg(&untouched),
        "cp",
    )
    .await?;
    match bake(store, arch, opts, &kernel, &initrd, &raw).await {
        Err(ImageError::Bake {
            detail,
            vm_failed: true,
        }) => {
            progress(&format!(
                "the bake's VM failed ({}); baking once more from the untouched disk",
                detail.lines().next().unwrap_or_default()
            ));
            std::fs::rename(&untouched, &raw).map_err(|e| ImageError::io(&raw, e))?;
            bake(store, arch, opts, &kernel, &initrd, &raw).await?;
        }
        other => other?,
    }
    let _ = std::fs::remove_file(&untouched);

    progress("compressing the root disk");
    let qcow = staging.join(store::ROOTFS);
    run_tool(
        Command::new("qemu-img")
            .args([
                "convert",
                "-q",
                "-c",
                "-O",
                "qcow2",
                "-o",
                "compression_type=zstd",
                "-f",
                "raw",
            ])
            .arg(&raw)
            .arg(&qcow),
        "qemu-img convert",
    )
    .await?;
    let _ = std::fs::remove_file(&raw);

    let mut artifacts = BTreeMap::new();
    for name in [store::KERNEL, store::INITRD, store::ROOTFS] {
        let path = staging.join(name);
        let size = std::fs::metadata(&path)
            .map_err(|e| ImageError::io(&path, e))?
            .len();
        let hashed = path.clone();
        let sha256 = tokio::task::spawn_blocking(move || store::sha256_file(&hashed))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
            .map_err(|e| ImageError::io(&path, e))?;
        artifacts.insert(
            name.to_string(),
            Artifact {
                file: name.into(),
                sha256,
                size,
            },
        );
    }
    Ok(Manifest {
        recipe: recipe.name.to_string(),
        origin: recipe.origin.kind().into(),
        recipe_hash: hash.into(),
        arch: arch.to_string(),
        distribution: recipe.distribution.clone(),
        kernel_version,
        qemu_version: opts.qemu.version.clone(),
        built_at_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        build_seconds: 0.0,
        packages,
        artifacts,
    })
}

/// Extracts the packages into `rootfs` as an ordinary user: `chrootless` mode runs no
/// chroot (and `extract` no maintainer script), and fakeroot records the owners the .debs
/// ask for in `session` for mkfs.ext4 to apply.
async fn mmdebstrap(
    recipe: &Recipe,
    arch: Arch,
    rootfs: &Path,
    session: &fakeroot::Session,
) -> Result<(), ImageError> {
    let mut cmd = session.command("mmdebstrap");
    cmd.args(["--mode=chrootless", "--variant=extract", "--quiet"])
        .arg(format!("--arch={}", arch.debian()))
        // One option per package: an apt pattern like ?essential may not share a list.
        .args(
            recipe
                .all_packages(arch)
                .iter()
                .map(|p| format!("--include={p}")),
        )
        // Keep the .debs: the bake installs them properly inside the guest.
        .arg("--skip=cleanup/apt/cache")
        // Merged /usr from the first file on, as debootstrap does: trixie's packages ship
        // their files under /usr already, bookworm's still under /bin, /lib…, and would
        // otherwise leave an unmerged tree (no /usr/lib/modules; usrmerge converting it in
        // the bake, under TCG). Debian's own setup hook does more (a dummy package) than an
        // extract-only build needs.
        .arg(format!("--setup-hook={MERGED_USR_HOOK}"))
        // Docs, man pages and translations only slow the bake and fill the disk.
        .args([
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            "--dpkgopt=path-include=/usr/share/locale/locale.alias",
        ])
        // Validated: a plain suite name and an http(s) URL, so neither can add a
        // sources.list line of its own.
        .arg(&recipe.distribution)
        .arg(rootfs)
        .arg(&recipe.mirror);
    run_tool(&mut cmd, "mmdebstrap").await
}

/// The kernel version: the one directory under usr/lib/modules.
fn kernel_version(rootfs: &Path) -> Result<String, ImageError> {
    let dir = rootfs.join("usr/lib/modules");
    let mut versions: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| ImageError::io(&dir, e))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort();
    versions.pop().ok_or_else(|| ImageError::Tool {
        tool: "mmdebstrap".into(),
        detail: "the extracted system has no kernel modules; is the kernel package in the recipe?"
            .into(),
    })
}

fn find_kernel(rootfs: &Path, version: &str) -> Result<PathBuf, ImageError> {
    // riscv64 ships an uncompressed EFI-stub Image named vmlinux-*; the others vmlinuz-*.
    ["vmlinuz", "vmlinux"]
        .iter()
        .map(|p| rootfs.join("boot").join(format!("{p}-{version}")))
        .find(|p| p.is_file())
        .ok_or_else(|| ImageError::Tool {
            tool: "mmdebstrap".into(),
            detail: format!("no kernel image for {version} in /boot"),
        })
}

/// Package → version, from the names of the downloaded .debs (`name_version_arch.deb`,
/// with the epoch colon written as %3a).
fn package_versions(rootfs: &Path) -> Result<BTreeMap<String, String>, ImageError> {
    let dir = rootfs.join("var/cache/apt/archives");
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(&dir)
        .map_err(|e| ImageError::io(&dir, e))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(stem) = name.strip_suffix(".deb") {
            let mut parts = stem.split('_');
            if let (Some(pkg), Some(ver)) = (parts.next(), parts.next()) {
                out.insert(pkg.to_string(), ver.replace("%3a", ":"));
            }
        }
    }
    Ok(out)
}

/// Files the bake needs before dpkg has run (dpkg resolves owners by name).
fn seed_config(rootfs: &Path) -> Result<(), ImageError> {
    let base = rootfs.join("usr/share/base-passwd");
    for (master, target) in [
        ("passwd.master", "etc/passwd"),
        ("group.master", "etc/group"),
    ] {
        let dst = rootfs.join(target);
        if !dst.exists() {
            std::fs::copy(base.join(master), &dst).map_err(|e| ImageError::io(&dst, e))?;
        }
    }
    for (path, text) in [
        ("etc/hostname", "runner\n"),
        (
            "etc/hosts",
            "127.0.0.1 localhost\n127.0.1.1 runner\n::1 localhost ip6-localhost ip6-loopback\n",
        ),
        (
            "etc/fstab",
            "# the root disk is mounted by runner's initramfs\n",
        ),
    ] {
        let dst = rootfs.join(path);
        std::fs::write(&dst, text).map_err(|e| ImageError::io(&dst, e))?;
    }
    let ws = rootfs.join("workspace");
    std::fs::create_dir_all(&ws).map_err(|e| ImageError::io(&ws, e))
}

async fn bake(
    store: &ImageStore,
    arch: Arch,
    opts: &BuildOptions,
    kernel: &Path,
    initrd: &Path,
    raw: &Path,
) -> Result<(), ImageError> {
    let cfg = VmConfig {
        arch,
        accel: opts.accel,
        qemu_binary: opts.qemu.path.clone(),
        sandbox: opts.qemu.sandbox,
        // Two vCPUs speed up dpkg where the machine has them (malta has one: with two its
        // kernel stops before mounting the root disk).
        cpus: 2.min(arch.info().max_cpus),
        memory_mib: 1024.min(arch.info().max_memory_mib),
        kernel: kernel.into(),
        initrd: initrd.into(),
        disk: DiskSource::Direct {
            path: raw.into(),
            format: "raw",
        },
        state_dir: store.vms_dir(),
        boot_timeout: BAKE_BOOT_TIMEOUT,
        saved_state: None,
        // The bake runs the recipe's own, trusted packages, before any job.
        containment: Default::default(),
        network: Default::default(),
    };
    let vm_err = |e: crate::vm::VmError| ImageError::Bake {
        detail: error_chain(&e),
        vm_failed: true,
    };
    let script_err = |detail: String| ImageError::Bake {
        detail,
        vm_failed: false,
    };
    let mut vm = Vm::boot(&cfg).await.map_err(vm_err)?;
    let env = vec![(
        "PATH".to_string(),
        "/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
    )];
    let (end, log) = vm
        .run_script(BAKE_SCRIPT, &env, BAKE_TIMEOUT, 16 * 1024)
        .await
        .map_err(vm_err)?;
    if end != CommandEnd::Exited(0) {
        vm.kill().await;
        let tail: Vec<&str> = log.lines().rev().take(20).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(script_err(format!(
            "{end:?}; last output:\n{}",
            tail.join("\n")
        )));
    }
    // Make the filesystem clean before QEMU goes away: freezing ext4 commits the journal
    // and clears its needs-recovery flag, so job VMs mount it without a replay. (A
    // read-only remount is refused while qemu-ga and tini hold files open.)
    let (freeze, out) = vm
        .run_script(
            "sync; fsfreeze --freeze /",
            &env,
            Duration::from_secs(60),
            4096,
        )
        .await
        .map_err(vm_err)?;
    if freeze != CommandEnd::Exited(0) {
        vm.kill().await;
        return Err(script_err(format!(
            "could not freeze the root filesystem ({freeze:?}): {}",
            out.trim()
        )));
    }
    vm.shutdown().await;
    Ok(())
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

async fn run_tool(cmd: &mut Command, name: &str) -> Result<(), ImageError> {
    let out = crate::child::output_in_group(cmd)
        .await
        .map_err(|e| ImageError::Tool {
            tool: name.into(),
            detail: format!("{e}; run scripts/setup-host to install it"),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        if stderr.contains("No space left on device") {
            return Err(ImageError::io(
                Path::new("the image cache"),
                std::io::Error::from(nix::errno::Errno::ENOSPC),
            ));
        }
        return Err(ImageError::Tool {
            tool: name.into(),
            detail: format!("{} ({})", tail.join(" | "), out.status),
        });
    }
    Ok(())
}

fn read_only(path: &Path) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
        .map_err(|e| ImageError::io(path, e))
}

/// Takes the image's build lock (see [`crate::lockfile`]), saying so when another runner
/// is building it.
async fn lock(
    path: &Path,
    what: &str,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<crate::lockfile::Held, ImageError> {
    let held = crate::lockfile::take(path, LOCK_TIMEOUT, || {
        progress(&format!(
            "waiting for another runner that is building {what}"
        ))
    })
    .await
    .map_err(|e| ImageError::io(path, e))?;
    held.ok_or_else(|| ImageError::Locked {
        what: what.into(),
        lock: path.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_come_from_deb_names() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("var/cache/apt/archives");
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "libattr1_1%3a2.5.2-3_riscv64.deb",
            "bash_5.2.37-2_riscv64.deb",
            "lock",
        ] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        let v = package_versions(tmp.path()).unwrap();
        assert_eq!(v["libattr1"], "1:2.5.2-3");
        assert_eq!(v["bash"], "5.2.37-2");
        assert_eq!(v.len(), 2);
    }

    #[test]
    fn an_arch_missing_from_the_release_is_refused_with_the_alternatives() {
        let lookup = crate::image::RecipeLookup {
            operator_dir: None,
            repository: crate::image::RepositoryRecipes::Refused,
        };
        let trixie = lookup.find(&"debian-13".parse().unwrap()).unwrap();
        let bookworm = lookup.find(&"debian-12".parse().unwrap()).unwrap();
        let err = check_distribution(&trixie, Arch::Mipsel)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "image 'debian-13' is Debian trixie, which has no mipsel kernel QEMU can boot; mipsel runs on: --image debian-12"
        );
        assert!(check_distribution(&bookworm, Arch::Riscv64).is_err());
        for arch in Arch::ALL {
            let default = lookup.find(&arch.default_image().parse().unwrap()).unwrap();
            assert!(check_distribution(&default, arch).is_ok(), "{arch}");
        }
        // A release the table does not know (an operator's sid recipe) is not second-guessed.
        let mut sid = trixie.clone();
        sid.distribution = "sid".into();
        assert!(check_distribution(&sid, Arch::Mipsel).is_ok());
    }

    #[test]
    fn error_chain_is_one_line() {
        let e = ImageError::io(Path::new("/x"), std::io::Error::other("boom"));
        assert_eq!(error_chain(&e), "cannot write /x: boom");
        let full = ImageError::io(
            Path::new("/x"),
            std::io::Error::from(nix::errno::Errno::ENOSPC),
        );
        assert!(full.is_disk_full());
        assert!(full.to_string().contains("RUNNER_CACHE_DIR"));
    }
}
