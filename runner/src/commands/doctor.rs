//! `runner doctor`: what this host can run, and why not where it cannot.

use engine::image::ImageStore;
use engine::qemu::host as qhost;
use engine::Arch;

use crate::exit;

pub async fn run(store: &ImageStore) -> i32 {
    let mut ok = true;
    println!(
        "host: {} ({} cores)",
        std::env::consts::ARCH,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    for arch in Arch::ALL {
        match qhost::qemu_for(arch).await {
            Ok(q) => println!(
                "{arch:<8} {} {} (sandbox: {})",
                q.path.display(),
                q.version,
                if q.sandbox { "yes" } else { "no" }
            ),
            Err(e) => {
                ok = false;
                println!("{arch:<8} MISSING: {e}");
            }
        }
    }
    for tool in [
        "qemu-img",
        "mmdebstrap",
        "depmod",
        "mkfs.ext4",
        "fakeroot",
        "cpio",
        "xz",
    ] {
        match qhost::which(tool) {
            Some(p) => println!("tool     {tool}: {}", p.display()),
            None => {
                ok = false;
                println!("tool     {tool}: MISSING (run scripts/setup-host)");
            }
        }
    }
    // A fresh probe (not the cached verdict): doctor is where users look when KVM changed.
    let host = Arch::host()
        .map(|a| a.name())
        .unwrap_or(std::env::consts::ARCH);
    match qhost::probe_kvm().await {
        Ok(()) => println!("kvm      usable: {host} guests run under KVM"),
        Err(why) => println!("kvm      not usable: {why}; every guest runs under TCG"),
    }
    let images = store.list();
    println!(
        "cache    {} ({} images)",
        store.root().display(),
        images.len()
    );
    for (dir, state) in images {
        match state {
            Ok(m) => println!("image    {} {} ok", m.recipe, m.arch),
            Err(e) => println!("image    {} CORRUPT: {e}", dir.display()),
        }
    }
    if ok {
        exit::SUCCESS
    } else {
        exit::HOST
    }
}
