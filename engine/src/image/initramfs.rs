//! The small initramfs every image boots with: static busybox, the disk/ext4 modules of the
//! image's kernel (decompressed, in dependency order) and `init.sh`.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::image::ImageError;

/// The initramfs `/init`; part of the image hash.
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// The modules the root disk and the agent's ports need. Their dependencies are added from
/// `modules.dep`; a module built into the kernel is not in it and is skipped (trixie builds
/// virtio_pci and virtio_console in, bookworm ships them as modules). crc32c has no hard
/// dependency edge to ext4 (it is a "softdep"), so it is listed.
const ROOT_MODULES: &[&str] = &[
    "crc32c_generic",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "ext4",
];

/// Resolves `wanted` and their dependencies from a `modules.dep` text into load order
/// (dependencies first). Returns module paths relative to the modules dir. Built-in
/// modules (absent from modules.dep) are skipped.
pub fn load_order(modules_dep: &str, wanted: &[&str]) -> Result<Vec<String>, String> {
    use std::collections::HashMap;
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let name = module_name(path);
        let d = rest.split_whitespace().map(module_name).collect();
        deps.insert(name, (path.to_string(), d));
    }
    let mut order = Vec::new();
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        order: &mut Vec<String>,
        depth: usize,
    ) -> Result<(), String> {
        if depth > 32 {
            return Err(format!("module dependency loop at {name}"));
        }
        let Some((path, ds)) = deps.get(name) else {
            return Ok(()); // built into the kernel
        };
        for d in ds {
            visit(d, deps, order, depth + 1)?;
        }
        if !order.contains(path) {
            order.push(path.clone());
        }
        Ok(())
    }
    for w in wanted {
        visit(&w.replace('-', "_"), &deps, &mut order, 0)?;
    }
    Ok(order)
}

/// "kernel/fs/ext4/ext4.ko.xz" → "ext4"; dashes normalised to underscores like modprobe.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Builds `out` (a newc cpio) from the extracted root filesystem `rootfs` with kernel
/// `kernel_version`, using `work` as scratch space.
pub async fn build(
    rootfs: &Path,
    kernel_version: &str,
    work: &Path,
    out: &Path,
) -> Result<(), ImageError> {
    let tool = |e: std::io::Error, what: &str| ImageError::Tool {
        tool: what.into(),
        detail: e.to_string(),
    };
    let moddir = rootfs.join("usr/lib/modules").join(kernel_version);
    let dep_text = std::fs::read_to_string(moddir.join("modules.dep"))
        .map_err(|e| tool(e, "modules.dep (from depmod)"))?;
    let order = load_order(&dep_text, ROOT_MODULES).map_err(|detail| ImageError::Tool {
        tool: "modules.dep".into(),
        detail,
    })?;
    let root = work.join("initramfs");
    for d in ["bin", "dev", "proc", "sys", "newroot", "lib/modules"] {
        std::fs::create_dir_all(root.join(d)).map_err(|e| ImageError::io(&root, e))?;
    }
    let busybox = rootfs.join("usr/bin/busybox");
    std::fs::copy(&busybox, root.join("bin/busybox")).map_err(|e| ImageError::io(&busybox, e))?;
    let mut names = Vec::new();
    for rel in &order {
        let name = module_name(rel);
        let src = moddir.join(rel);
        let dst = root.join("lib/modules").join(format!("{name}.ko"));
        decompress_module(&src, &dst).await?;
        names.push(name);
    }
    write_file(&root.join("modules.order"), names.join("\n").as_bytes())?;
    write_file(&root.join("init"), INIT_SCRIPT.as_bytes())?;
    set_mode(&root.join("init"), 0o755)?;
    set_mode(&root.join("bin/busybox"), 0o755)?;
    cpio(&root, out).await
}

/// Debian ships modules xz- or zstd-compressed; busybox insmod wants them plain, and the
/// kernel would otherwise decompress them at boot (slow under TCG).
async fn decompress_module(src: &Path, dst: &Path) -> Result<(), ImageError> {
    let s = src.to_string_lossy();
    let tool = if s.ends_with(".xz") {
        Some("xz")
    } else if s.ends_with(".zst") {
        Some("zstd")
    } else {
        None
    };
    let Some(tool) = tool else {
        std::fs::copy(src, dst).map_err(|e| ImageError::io(src, e))?;
        return Ok(());
    };
    let out = crate::child::output_in_group(Command::new(tool).args(["-d", "-c", "-q"]).arg(src))
        .await
        .map_err(|e| ImageError::Tool {
            tool: tool.into(),
            detail: format!("{e}; run scripts/setup-host"),
        })?;
    if !out.status.success() {
        return Err(ImageError::Tool {
            tool: tool.into(),
            detail: format!(
                "cannot decompress {}: {}",
                src.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    write_file(dst, &out.stdout)
}

/// Packs `root` into a newc cpio archive with every file owned by root.
async fn cpio(root: &Path, out: &Path) -> Result<(), ImageError> {
    let mut paths = Vec::new();
    collect(root, root, &mut paths).map_err(|e| ImageError::io(root, e))?;
    paths.sort();
    let file = std::fs::File::create(out).map_err(|e| ImageError::io(out, e))?;
    let (mut child, _guard) = crate::child::spawn_in_group(
        Command::new("cpio")
            .args(["-o", "-H", "newc", "-R", "0:0", "--quiet"])
            .current_dir(root)
            .stdin(Stdio::piped())
            .stdout(file)
            .stderr(Stdio::piped()),
    )
    .map_err(|e| ImageError::Tool {
        tool: "cpio".into(),
        detail: format!("{e}; run scripts/setup-host"),
    })?;
    let mut stdin = child.stdin.take().expect("piped");
    let list: String = paths.iter().map(|p| format!("{}\n", p.display())).collect();
    stdin
        .write_all(list.as_bytes())
        .await
        .map_err(|e| ImageError::io(out, e))?;
    drop(stdin);
    let result = child
        .wait_with_output()
        .await
        .map_err(|e| ImageError::io(out, e))?;
    if !result.status.success() {
        return Err(ImageError::Tool {
            tool: "cpio".into(),
            detail: String::from_utf8_lossy(&result.stderr).trim().to_string(),
        });
    }
    Ok(())
}

fn collect(base: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        out.push(PathBuf::from(".").join(path.strip_prefix(base).expect("under base")));
        if path.is_dir() {
            collect(base, &path, out)?;
        }
    }
    Ok(())
}

fn write_file(path: &Path, data: &[u8]) -> Result<(), ImageError> {
    std::fs::write(path, data).map_err(|e| ImageError::io(path, e))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), ImageError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| ImageError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz
kernel/fs/jbd2/jbd2.ko.xz:
kernel/fs/mbcache.ko.xz:
kernel/lib/crc16.ko.xz:
kernel/drivers/block/virtio_blk.ko.xz:
kernel/crypto/crc32c_generic.ko.xz:
";

    #[test]
    fn dependencies_load_first() {
        let order = load_order(DEP, &["crc32c_generic", "virtio_blk", "ext4"]).unwrap();
        let names: Vec<_> = order.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "crc32c_generic",
                "virtio_blk",
                "crc16",
                "mbcache",
                "jbd2",
                "ext4"
            ]
        );
    }

    #[test]
    fn builtin_modules_are_skipped() {
        // On a kernel with virtio_blk built in, it is simply not in modules.dep.
        let dep = "kernel/fs/ext4/ext4.ko: \n";
        assert_eq!(
            load_order(dep, &["virtio_blk", "ext4"]).unwrap(),
            ["kernel/fs/ext4/ext4.ko"]
        );
    }

    #[test]
    fn dependency_loops_are_an_error() {
        let dep = "a.ko: b.ko\nb.ko: a.ko\n";
        assert!(load_order(dep, &["a"]).is_err());
    }

    #[test]
    fn init_script_hands_over_to_the_agent() {
        assert!(INIT_SCRIPT.contains("org.qemu.guest_agent.0"));
        assert!(INIT_SCRIPT.starts_with("#!/bin/busybox sh"));
    }
}
